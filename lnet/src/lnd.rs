//! The LND boundary: what a transport implements ([`Lnd`]) and what the
//! core hands it ([`TxMsg`] to send, [`Sink`] to receive into).
//!
//! # The contract
//!
//! * **Start-up.** [`Lnd::startup`] receives an [`NiContext`], the LND's
//!   handle on the core, and answers with the NI's NID and its limits
//!   ([`LndLimits`]: largest payload, eager size, NI and per-peer credits).
//! * **Send.** The core calls [`Lnd::send`] with a [`TxMsg`]: the LNet
//!   header, the next-hop peer NID, and the payload as read-only slices of
//!   the source MD (no copy has been made). The LND completes it exactly
//!   once with [`TxMsg::complete`]; dropping it uncompleted completes it
//!   with an error, so an operation can never hang on a lost message.
//! * **Receive.** For each arriving message the LND decodes the LNet header
//!   and calls [`NiContext::parse`] *before* touching the payload. The core
//!   matches it and answers with a [`Delivery`]: receive into a [`Sink`]
//!   (the matched MD's memory, exactly `mlength` bytes at the right
//!   offset), discard the payload, nothing to receive, or wait (a lazy
//!   portal). The LND then moves the payload straight into the sink and
//!   completes it once.
//! * **Peers.** The LND reports peers going up, down, or coming back with a
//!   new incarnation through [`NiContext::peer_event`]; the core ends the
//!   operations that can no longer finish.
//!
//! # How each transport uses it
//!
//! * **`lo`** (in-process): `send` calls `parse` at once; the payload moves
//!   with one `memcpy` from the source MD into the sink
//!   ([`copy_payload`]), or as a shared [`Bytes`] without any copy when the
//!   source is `Bytes` and the sink accepts loans.
//! * **TCP** (socklnd): `send` writes the ksock header, the LNet header and
//!   [`TxMsg::with_payload`]'s slices with one vectored write. The receive
//!   path reads the headers, calls `parse`, and reads the payload from the
//!   socket straight into [`Sink::with_iov_mut`]'s slices (reading and
//!   dropping what exceeds `mlength`). A [`Delivery::Deferred`] parks the
//!   connection until the core decides, as socklnd does.
//! * **Shared memory**: small messages travel inline in ring slots; for
//!   bulk, the LND copies from the peer's mapping (or by
//!   `process_vm_readv`) into the sink's slices, or hands a loan of the
//!   peer's pool to a sink that [accepts loans](Sink::accepts_loan).
//! * **RDMA** (o2iblnd): the LNet header travels in IMMEDIATE / PUT_REQ /
//!   GET_REQ messages. For PUT_REQ the receiver calls `parse`, registers the
//!   sink's memory ([`Sink::raw_fragments`]) and answers PUT_ACK with its
//!   RDMA descriptor; the sender RDMA-writes, and the sink completes on
//!   PUT_DONE. An RDMA LND sets [`LndLimits::reply_inline`]: a GET then
//!   yields [`Delivery::Reply`], the REPLY whose payload the LND RDMA-writes
//!   into the sink described by GET_REQ before sending GET_DONE.

use std::io::{IoSlice, IoSliceMut};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bytes::{Bytes, BytesMut};

use crate::error::Error;
use crate::nid::{NetType, Nid, Pid};
use crate::node::{Inner, RxToken, TxToken};
use crate::portals::md::MdBuffer;
use crate::sync::{Slot, SlotFuture};
use crate::wire::Header;

/// What an LND tells the core at start-up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LndLimits {
    /// Largest payload one message may carry (at most [`crate::LNET_MTU`]).
    pub max_payload: u32,
    /// Payloads up to this size travel inline with the header.
    pub eager_size: u32,
    /// NI transmit credits: messages in flight on this NI.
    pub credits: i32,
    /// Per-peer transmit credits.
    pub peer_credits: i32,
    /// The LND sends the REPLY to an incoming GET itself (RDMA): `parse`
    /// returns [`Delivery::Reply`] for GETs.
    pub reply_inline: bool,
    /// PUTs with payloads up to this size (capped at [`SEND_NOW_CAP`]),
    /// and GETs, are offered to [`Lnd::send_now`] first; 0 (the default)
    /// offers none.
    pub send_now_max: u32,
}

/// The largest payload the core offers to [`Lnd::send_now`] (it copies
/// the payload out of the MD onto its stack).
pub const SEND_NOW_CAP: usize = 512;

/// What [`Lnd::send_now`] did with a message.
#[derive(Debug)]
pub enum SendNow {
    /// It left, as [`TxMsg::complete`] with success would say.
    Sent,
    /// It cannot leave at once (no connection yet, a backlog, no room):
    /// the core sends it the usual way, through [`Lnd::send`].
    Declined,
    /// It failed: the core completes it with this error.
    Failed(Error),
}

impl Default for LndLimits {
    fn default() -> Self {
        LndLimits {
            max_payload: crate::LNET_MTU,
            eager_size: 4096,
            credits: 256,
            peer_credits: 8,
            reply_inline: false,
            send_now_max: 0,
        }
    }
}

/// What [`Lnd::startup`] returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LndInfo {
    /// The NI's NID.
    pub nid: Nid,
    /// Its limits.
    pub limits: LndLimits,
}

/// A transport (LND), started once per NI.
pub trait Lnd: Send + Sync + 'static {
    /// The network type this LND serves.
    fn net_type(&self) -> NetType;
    /// Start the NI. `ni` is the LND's handle on the core; keep it.
    fn startup(&self, ni: NiContext) -> Result<LndInfo, Error>;
    /// Send a message; complete it exactly once.
    fn send(&self, tx: TxMsg);
    /// Send a small message at once, from the calling thread, when that
    /// takes no waiting and no queueing: header `hdr`, to `peer`, with
    /// `payload` (at most [`LndLimits::send_now_max`] bytes, the core's
    /// copy of the MD's). The core offers it only when no message waits
    /// for a credit on this NI and no send is under way on this thread,
    /// so a message sent now overtakes none; it takes no credits (it is
    /// not in flight once this returns) and holds no core lock meanwhile.
    /// Must not call back into the core. The default declines.
    ///
    /// ```
    /// use lnet::{Lnd, SendNow};
    /// # fn f(lnd: &dyn Lnd, hdr: &lnet::wire::Header) {
    /// match lnd.send_now(hdr.dest_nid, hdr, b"8 bytes!") {
    ///     SendNow::Sent => {}                  // gone; complete the PUT
    ///     SendNow::Declined => { /* build a TxMsg and call send */ }
    ///     SendNow::Failed(e) => eprintln!("{e}"),
    /// }
    /// # }
    /// ```
    fn send_now(&self, peer: Nid, hdr: &Header, payload: &[u8]) -> SendNow {
        let _ = (peer, hdr, payload);
        SendNow::Declined
    }
    /// Stop: complete every message and sink still held (with errors) and
    /// release resources. Called once, at node shutdown.
    fn shutdown(&self);
}

/// A strong hold on the core behind an [`NiContext`], for an LND's
/// receive loop: the node is reached through one reference count taken
/// for a burst of messages rather than one per message (an atomic
/// operation fewer on each message's way in). The loop drops it when it
/// goes idle; holding it never delays the node's shutdown, which stops the
/// LND (and its loop) first.
///
/// ```
/// # fn f(ni: &lnet::NiContext, hdr: &lnet::wire::Header, from: lnet::Nid, slot: &[u8]) {
/// let mut pin = None;
/// // ... a message arrived:
/// if pin.is_none() {
///     pin = ni.pin();
/// }
/// if let Some(p) = &pin {
///     let _ = p.parse_inline(hdr, from, |off, dst: &mut [u8]| {
///         dst.copy_from_slice(&slot[off..off + dst.len()]);
///         Ok::<(), std::convert::Infallible>(())
///     });
/// }
/// // ... idle: let it go.
/// drop(pin);
/// # }
/// ```
pub struct NiPin {
    inner: Arc<Inner>,
    ni: usize,
}

impl std::fmt::Debug for NiPin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NiPin(ni {})", self.ni)
    }
}

impl NiPin {
    /// [`NiContext::parse_inline`], through this hold.
    pub fn parse_inline<E: std::fmt::Display>(
        &self,
        hdr: &Header,
        from: Nid,
        mut fill: impl FnMut(usize, &mut [u8]) -> Result<(), E>,
    ) -> Result<Delivery, E> {
        let mut err = None;
        let mut f = |off: usize, dst: &mut [u8]| {
            fill(off, dst).map_err(|e| {
                let core = Error::Network(format!("inline payload: {e}"));
                err = Some(e);
                core
            })
        };
        let d = self.inner.parse_with(self.ni, hdr, from, Some(&mut f));
        match err {
            Some(e) => Err(e),
            None => Ok(d),
        }
    }
}

/// Peer events an LND reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeerEvent {
    /// A connection to the peer is up.
    Up,
    /// The peer is unreachable (connections failed or closed).
    Down,
    /// The peer came back with a new incarnation: everything it had in
    /// flight with us is gone.
    Restarted,
}

/// The LND's handle on the core.
#[derive(Clone)]
pub struct NiContext {
    pub(crate) inner: Weak<Inner>,
    pub(crate) ni: usize,
}

impl std::fmt::Debug for NiContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NiContext(ni {})", self.ni)
    }
}

impl NiContext {
    /// Hand the core an arriving message's header; `from` is the NID of the
    /// peer it came from (the last hop). Returns where its payload goes.
    pub fn parse(&self, hdr: &Header, from: Nid) -> Delivery {
        match self.inner.upgrade() {
            Some(i) => i.parse(self.ni, hdr, from),
            None => Delivery::Discard(hdr.payload_length),
        }
    }
    /// [`NiContext::parse`] for a message whose whole payload the LND
    /// holds (inline in its receive buffer): when a PUT matches an MD with
    /// memory, the core calls `fill(offset, dst)` for each destination
    /// slice (the matched length, in order; copy `dst.len()` bytes of the
    /// payload from `offset`), completes the receive and returns
    /// [`Delivery::Done`], with no [`Sink`] made. Any other outcome is
    /// returned as `parse` returns it, for the LND to handle as usual.
    ///
    /// `fill` runs under the core's portal lock: it must copy and return,
    /// never block or call back into the core. A `fill` error ends the
    /// receive with an error event and is returned.
    pub fn parse_inline<E: std::fmt::Display>(
        &self,
        hdr: &Header,
        from: Nid,
        fill: impl FnMut(usize, &mut [u8]) -> Result<(), E>,
    ) -> Result<Delivery, E> {
        match self.pin() {
            Some(p) => p.parse_inline(hdr, from, fill),
            None => Ok(Delivery::Discard(hdr.payload_length)),
        }
    }
    /// A hold on the core for a burst of calls (see [`NiPin`]); `None`
    /// once the node is gone.
    pub fn pin(&self) -> Option<NiPin> {
        Some(NiPin {
            inner: self.inner.upgrade()?,
            ni: self.ni,
        })
    }
    /// Report a peer event.
    pub fn peer_event(&self, peer: Nid, ev: PeerEvent) {
        if let Some(i) = self.inner.upgrade() {
            i.peer_event(self.ni, peer, ev);
        }
    }
    /// The node's pid.
    pub fn pid(&self) -> Pid {
        self.inner.upgrade().map_or(0, |i| i.pid())
    }
    /// True once the node is shutting down.
    pub fn is_shutting_down(&self) -> bool {
        self.inner.upgrade().is_none_or(|i| i.is_shutting_down())
    }
}

/// Where an arriving message's payload goes.
#[derive(Debug)]
pub enum Delivery {
    /// Receive into this sink: the first [`Sink::mlength`] bytes of the
    /// payload go into it, the rest (up to the header's payload length) is
    /// read and dropped.
    Receive(Sink),
    /// Drop the message: consume and discard this many payload bytes.
    Discard(u32),
    /// Nothing to receive (ACK, GET).
    Done,
    /// A lazy portal holds the message until an MD is attached; wait for
    /// the decision.
    Deferred(Deferred),
    /// (LNDs with [`LndLimits::reply_inline`]) The REPLY to this GET: send
    /// it by the LND's own means and complete it.
    Reply(TxMsg),
}

/// A delivery the core will decide later.
pub struct Deferred {
    pub(crate) slot: Arc<Slot<Delivery>>,
}

impl std::fmt::Debug for Deferred {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Deferred")
    }
}

impl Deferred {
    /// Block up to `d` for the decision.
    pub fn wait_timeout(&self, d: Duration) -> Option<Delivery> {
        self.slot.wait_timeout(d)
    }
    /// Run `f` with the decision (at once if it is already made).
    pub fn on_ready(self, f: impl FnOnce(Delivery) + Send + 'static) {
        self.slot.on_ready(f)
    }
    /// Await the decision.
    pub async fn wait(self) -> Option<Delivery> {
        SlotFuture(self.slot).await
    }
}

/// The sending half the core keeps for a deferred delivery; dropping it
/// undecided tells the LND to discard.
pub(crate) struct DeferredSender {
    pub(crate) slot: Arc<Slot<Delivery>>,
    pub(crate) len: u32,
    pub(crate) fired: bool,
}

impl DeferredSender {
    pub(crate) fn fire(mut self, d: Delivery) {
        self.fired = true;
        self.slot.fire(d);
    }
}

impl Drop for DeferredSender {
    fn drop(&mut self) {
        if !self.fired {
            self.slot.fire(Delivery::Discard(self.len));
        }
    }
}

pub(crate) type SharedMem = Arc<Mutex<MdBuffer>>;

pub(crate) fn lock_mem(m: &SharedMem) -> std::sync::MutexGuard<'_, MdBuffer> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// An opaque identity of an MD's memory, for an LND's registration cache
/// (RDMA memory regions). It is live only while the MD's memory exists,
/// and while a key is held no other MD can take its identity, so a cached
/// registration can never be applied to memory freed and allocated again.
#[derive(Clone)]
pub struct MemKey(Weak<Mutex<MdBuffer>>);

impl std::fmt::Debug for MemKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MemKey({:p}, live {})", self.0.as_ptr(), self.is_live())
    }
}

impl MemKey {
    /// True while the MD's memory exists.
    pub fn is_live(&self) -> bool {
        self.0.strong_count() > 0
    }
    /// True when both keys name the same MD memory.
    pub fn same(&self, other: &MemKey) -> bool {
        Weak::ptr_eq(&self.0, &other.0)
    }
}

/// A message to send. Complete it exactly once.
///
/// Boxed: it travels by value through the core, the LND and back, and a
/// pointer is cheaper to move than the state.
pub struct TxMsg(Box<TxState>);

/// The state behind a [`TxMsg`] (opaque outside the core).
#[doc(hidden)]
pub struct TxState {
    pub(crate) inner: Arc<Inner>,
    pub(crate) hdr: Header,
    pub(crate) peer: Nid,
    pub(crate) ni: usize,
    pub(crate) mem: Option<SharedMem>,
    pub(crate) offset: usize,
    pub(crate) len: usize,
    pub(crate) credits_held: bool,
    pub(crate) token: Option<TxToken>,
}

impl std::fmt::Debug for TxMsg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TxMsg")
            .field("type", &self.hdr.msg_type())
            .field("peer", &self.peer)
            .field("len", &self.len)
            .finish()
    }
}

impl std::ops::Deref for TxMsg {
    type Target = TxState;
    fn deref(&self) -> &TxState {
        &self.0
    }
}
impl std::ops::DerefMut for TxMsg {
    fn deref_mut(&mut self) -> &mut TxState {
        &mut self.0
    }
}
impl std::ops::Deref for Sink {
    type Target = SinkState;
    fn deref(&self) -> &SinkState {
        &self.0
    }
}
impl std::ops::DerefMut for Sink {
    fn deref_mut(&mut self) -> &mut SinkState {
        &mut self.0
    }
}

impl TxMsg {
    pub(crate) fn new(s: TxState) -> Self {
        TxMsg(Box::new(s))
    }
    /// The LNet header.
    pub fn header(&self) -> &Header {
        &self.hdr
    }
    /// The next hop (the peer NI to send to).
    pub fn peer(&self) -> Nid {
        self.peer
    }
    /// Payload bytes.
    pub fn payload_len(&self) -> usize {
        self.len
    }
    /// Run `f` on the payload's slices (the source MD's memory, locked
    /// meanwhile: do not block in `f`).
    pub fn with_payload<R>(&self, f: impl FnOnce(&[IoSlice<'_>]) -> R) -> R {
        match &self.mem {
            Some(m) => {
                let g = lock_mem(m);
                f(&g.slices(self.offset, self.len))
            }
            None => f(&[]),
        }
    }
    /// A zero-copy view of the payload when the source is one shared
    /// `Bytes` segment.
    pub fn payload_bytes(&self) -> Option<Bytes> {
        if self.len == 0 {
            return Some(Bytes::new());
        }
        self.mem
            .as_ref()
            .and_then(|m| lock_mem(m).bytes_view(self.offset, self.len))
    }
    /// Copy the payload from `off` into `dst`; returns bytes copied.
    pub fn copy_payload_to(&self, off: usize, dst: &mut [u8]) -> usize {
        match &self.mem {
            Some(m) if off < self.len => {
                let n = dst.len().min(self.len - off);
                lock_mem(m).copy_out(self.offset + off, &mut dst[..n])
            }
            _ => 0,
        }
    }
    /// Raw (address, length) of each payload fragment, for registration with
    /// hardware or for `process_vm_*` (valid until completion).
    pub fn raw_fragments(&self) -> Vec<(usize, usize)> {
        self.with_payload(|s| s.iter().map(|x| (x.as_ptr() as usize, x.len())).collect())
    }
    /// The identity of the source MD's memory (none without payload).
    pub fn mem_key(&self) -> Option<MemKey> {
        self.mem.as_ref().map(|m| MemKey(Arc::downgrade(m)))
    }
    /// Complete the message: it left (or failed to).
    pub fn complete(mut self, status: Result<(), Error>) {
        self.finish(status);
    }
    fn finish(&mut self, status: Result<(), Error>) {
        // The token by reference (it is large): cleared once done, so a
        // drop afterwards does not finish again.
        let st = &mut *self.0;
        if let Some(tok) = &st.token {
            drop(st.mem.take());
            st.inner
                .tx_done(st.ni, st.peer, &st.hdr, st.credits_held, tok, status);
            st.token = None;
        }
    }
}

impl Drop for TxMsg {
    fn drop(&mut self) {
        if self.token.is_some() {
            self.finish(Err(Error::Network("message dropped by the LND".into())));
        }
    }
}

/// Where an arriving payload goes: a range of the matched MD. Complete it
/// exactly once.
///
/// Boxed, like [`TxMsg`].
pub struct Sink(Box<SinkState>);

/// The state behind a [`Sink`] (opaque outside the core).
#[doc(hidden)]
pub struct SinkState {
    pub(crate) inner: Arc<Inner>,
    pub(crate) mem: Option<SharedMem>,
    pub(crate) offset: usize,
    pub(crate) mlength: usize,
    pub(crate) rlength: usize,
    pub(crate) loan_ok: bool,
    pub(crate) loan: Option<Bytes>,
    pub(crate) alloc: Option<BytesMut>,
    pub(crate) token: Option<RxToken>,
}

impl std::fmt::Debug for Sink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sink")
            .field("mlength", &self.mlength)
            .field("rlength", &self.rlength)
            .finish()
    }
}

impl Sink {
    pub(crate) fn new(s: SinkState) -> Self {
        Sink(Box::new(s))
    }
    /// Bytes that go into the MD.
    pub fn mlength(&self) -> usize {
        self.mlength
    }
    /// Bytes of payload on the wire (`mlength` plus what is dropped).
    pub fn rlength(&self) -> usize {
        self.rlength
    }
    /// True when the MD takes the payload as a loaned [`Bytes`].
    pub fn accepts_loan(&self) -> bool {
        self.loan_ok
    }
    /// Hand over the payload as a loan (only when [`Sink::accepts_loan`]);
    /// it is cut to `mlength`.
    pub fn set_loan(&mut self, mut b: Bytes) -> bool {
        if !self.loan_ok {
            return false;
        }
        b.truncate(self.mlength);
        self.loan = Some(b);
        true
    }
    /// Run `f` on the destination's writable slices (`mlength` bytes in
    /// all; the MD's memory is locked meanwhile: do not block in `f`).
    pub fn with_iov_mut<R>(&mut self, f: impl FnOnce(&mut [IoSliceMut<'_>]) -> R) -> R {
        match &self.mem {
            Some(m) => {
                let mut g = lock_mem(m);
                let mut v = g.slices_mut(self.offset, self.mlength);
                f(&mut v)
            }
            None => {
                let st = &mut *self.0;
                let a = st.alloc.get_or_insert_with(|| BytesMut::zeroed(st.mlength));
                let mut v = [IoSliceMut::new(&mut a[..])];
                f(&mut v)
            }
        }
    }
    /// Copy `src` into the destination at `off`; returns bytes copied.
    pub fn write_at(&mut self, off: usize, src: &[u8]) -> usize {
        if off >= self.mlength {
            return 0;
        }
        let n = src.len().min(self.mlength - off);
        match &self.mem {
            Some(m) => lock_mem(m).copy_in(self.offset + off, &src[..n]),
            None => {
                let st = &mut *self.0;
                let a = st.alloc.get_or_insert_with(|| BytesMut::zeroed(st.mlength));
                a[off..off + n].copy_from_slice(&src[..n]);
                n
            }
        }
    }
    /// Raw (address, length) of each destination fragment, for
    /// registration with hardware or `process_vm_*` (valid until
    /// completion).
    pub fn raw_fragments(&mut self) -> Vec<(usize, usize)> {
        self.with_iov_mut(|s| {
            s.iter_mut()
                .map(|x| (x.as_mut_ptr() as usize, x.len()))
                .collect()
        })
    }
    /// The identity of the destination MD's memory (none for a sink that
    /// allocates its own buffer).
    pub fn mem_key(&self) -> Option<MemKey> {
        self.mem.as_ref().map(|m| MemKey(Arc::downgrade(m)))
    }
    /// Record that only `n` bytes arrived (an RDMA LND learns a REPLY's
    /// real length from GET_DONE, after the data landed): the event reports
    /// `n` as both received and matched length. Larger values are ignored.
    pub fn set_received(&mut self, n: usize) {
        if n >= self.mlength {
            return;
        }
        self.mlength = n;
        self.rlength = n;
        if let Some(tok) = self.token.as_mut() {
            tok.set_length(n as u32);
        }
    }
    /// Complete the receive.
    pub fn complete(mut self, status: Result<(), Error>) {
        self.finish(status);
    }
    fn finish(&mut self, status: Result<(), Error>) {
        let st = &mut *self.0;
        if let Some(tok) = &st.token {
            drop(st.mem.take());
            let loan = st
                .loan
                .take()
                .or_else(|| st.alloc.take().map(BytesMut::freeze));
            st.inner.rx_done(tok, status, loan);
            st.token = None;
        }
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        if self.token.is_some() {
            self.finish(Err(Error::Network("receive dropped by the LND".into())));
        }
    }
}

/// Move a message's payload into a sink in-process: a loan when the source
/// is shared `Bytes` and the sink takes loans, else one copy. Returns the
/// bytes moved. Used by `lo`.
pub fn copy_payload(tx: &TxMsg, sink: &mut Sink) -> usize {
    let n = sink.mlength.min(tx.len);
    if sink.loan_ok {
        if let Some(b) = tx.payload_bytes() {
            sink.set_loan(b);
            return n;
        }
    }
    let (Some(src), Some(dst)) = (&tx.mem, &sink.mem) else {
        // Loan-only sink without a shareable source: one copy into a new buffer.
        let mut buf = BytesMut::zeroed(n);
        tx.copy_payload_to(0, &mut buf);
        if sink.loan_ok {
            sink.set_loan(buf.freeze());
        } else {
            sink.write_at(0, &buf);
        }
        return n;
    };
    if Arc::ptr_eq(src, dst) {
        let mut tmp = vec![0u8; n];
        tx.copy_payload_to(0, &mut tmp);
        return sink.write_at(0, &tmp);
    }
    // Lock in address order so two copies in opposite directions cannot
    // deadlock.
    let (s, mut d) = if Arc::as_ptr(src) < Arc::as_ptr(dst) {
        let s = lock_mem(src);
        (s, lock_mem(dst))
    } else {
        let d = lock_mem(dst);
        (lock_mem(src), d)
    };
    let srcs = s.slices(tx.offset, n);
    let mut dsts = d.slices_mut(sink.offset, n);
    let (mut si, mut so, mut done) = (0usize, 0usize, 0usize);
    for dslice in dsts.iter_mut() {
        let mut doff = 0;
        while doff < dslice.len() && si < srcs.len() {
            let k = (dslice.len() - doff).min(srcs[si].len() - so);
            dslice[doff..doff + k].copy_from_slice(&srcs[si][so..so + k]);
            doff += k;
            so += k;
            done += k;
            if so == srcs[si].len() {
                si += 1;
                so = 0;
            }
        }
    }
    done
}
