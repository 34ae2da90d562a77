//! One shm connection: our ring (we produce), the peer's ring (we
//! consume), the peer's pool and doorbell, and the operations in flight.

use std::collections::{HashMap, VecDeque};
use std::io::IoSliceMut;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};

use bytes::Bytes;
use lnet::counters::Sharded;
use lnet::spin::SpinLock;
use lnet::wire::{ByteOrder, HDR_NID4_SIZE, Header};
use lnet::{Delivery, Error, MemPool, NiContext, NiPin, Nid, SendNow, Sink, TxMsg};
use nix::sys::uio::{RemoteIoVec, process_vm_readv};
use tracing::{debug, trace};

use super::ring::{AtomicU32, Consumer, Peek, Producer, RingCtl};
use super::sys::Seg;
use super::wire::{
    self, CompactPut, Hello, Kind, Msg, PUT_HDR_ACK, SLOT_HDR, SLOT_MARK, SegHeader, SlotHdr,
};
use super::{ShmConfig, ShmError, Stats, inc, lock};

/// What every connection of an NI shares.
pub(crate) struct ConnEnv {
    pub(crate) ni: NiContext,
    /// Our NID on this NI.
    pub(crate) nid: Nid,
    pub(crate) cfg: ShmConfig,
    pub(crate) pool: Option<MemPool>,
    pub(crate) stats: Arc<Sharded<Stats>>,
    pub(crate) eager: usize,
}

struct ProdState {
    ring: Producer,
    /// Slots waiting for room in the ring, in order, with the message to
    /// complete once its slot is in.
    backlog: VecDeque<(Vec<u8>, Option<TxMsg>)>,
}

/// The consumer's side of a connection's incoming ring. The progress
/// thread owns it (see [`Conn::take_receiver`]): receiving takes no lock.
pub(crate) struct ConsState {
    ring: Consumer,
    scratch: Vec<u8>,
}

/// A receive waiting for the sender (a copy into our pool, or bounce
/// chunks).
struct RxPend {
    sink: Sink,
    got: usize,
    want: usize,
}

#[derive(Default)]
struct BounceTx {
    free: Vec<u32>,
    /// (cookie, next offset, bytes to send)
    jobs: VecDeque<(u64, usize, usize)>,
}

pub(crate) struct Conn {
    env: Arc<ConnEnv>,
    me: Weak<Conn>,
    pub(crate) peer: Nid,
    /// The peer's incarnation (from its hello).
    pub(crate) peer_incarnation: u64,
    peer_pid: nix::unistd::Pid,
    pub(crate) sock: UnixStream,
    out: Arc<Seg>,
    out_h: SegHeader,
    inp: Arc<Seg>,
    in_h: SegHeader,
    peer_pool: Option<(Arc<Seg>, usize)>,
    peer_bell: OwnedFd,
    cma: AtomicBool,
    /// Any thread may send; held for a slot's copy at most (a backlog's
    /// flush, a ring's worth), so its release is a plain store.
    prod: SpinLock<ProdState>,
    backlog_len: AtomicUsize,
    /// The consumer's state until the progress thread takes it: one
    /// owner, so the receive path takes no lock (two atomic operations
    /// fewer per round with messages, one on a ping-pong's critical path).
    cons: Mutex<Option<ConsState>>,
    next_cookie: AtomicU64,
    tx_pending: Mutex<HashMap<u64, TxMsg>>,
    rx_pending: Mutex<HashMap<u64, RxPend>>,
    loans: Mutex<HashMap<u64, Bytes>>,
    bounce: Mutex<BounceTx>,
    dead: AtomicBool,
}

/// A loan of a peer's pool handed to the application; dropping the last
/// view tells the peer to take its chunk back.
struct RemoteLoan {
    conn: Weak<Conn>,
    seg: Arc<Seg>,
    off: usize,
    len: usize,
    cookie: u64,
}

impl AsRef<[u8]> for RemoteLoan {
    fn as_ref(&self) -> &[u8] {
        self.seg.slice(self.off, self.len).unwrap_or(&[])
    }
}

impl Drop for RemoteLoan {
    fn drop(&mut self) {
        if let Some(c) = self.conn.upgrade() {
            if !c.is_dead() {
                c.post(Kind::Release, 0, self.cookie, &[]);
            }
        }
    }
}

/// Smallest frozen pool payload sent by descriptor (so it can be lent).
const LOAN_MIN: usize = 4096;

const DONE_OK: u32 = 0;
const DONE_FAILED: u32 = 1;

fn status_of(s: u32) -> Result<(), Error> {
    if s == DONE_OK {
        Ok(())
    } else {
        Err(Error::Network(format!(
            "the shm peer failed the transfer ({s})"
        )))
    }
}

/// Copy `[rel, rel+dst.len())` of the payload that `frags` (offsets from
/// `base` in `seg`) describe into `dst`.
fn copy_from_frags(
    seg: &Seg,
    base: usize,
    frags: &[(u64, u64)],
    mut rel: usize,
    dst: &mut [u8],
) -> Result<(), ShmError> {
    let mut done = 0;
    let mut fstart = 0usize;
    for &(o, l) in frags {
        if done == dst.len() {
            break;
        }
        let l = usize::try_from(l).map_err(|_| ShmError::OutOfBounds)?;
        if rel >= fstart + l {
            fstart += l;
            continue;
        }
        let within = rel - fstart;
        let n = (l - within).min(dst.len() - done);
        let Some(at) = usize::try_from(o)
            .ok()
            .and_then(|o| base.checked_add(o))
            .and_then(|a| a.checked_add(within))
        else {
            return Err(ShmError::OutOfBounds);
        };
        seg.read(at, &mut dst[done..done + n])?;
        done += n;
        rel += n;
        fstart += l;
    }
    if done < dst.len() {
        return Err(ShmError::OutOfBounds);
    }
    Ok(())
}

/// Run `f(offset from at, dst piece)` over the sink's memory from `at` for
/// `len` bytes (clamped to `mlength`). Returns the bytes covered.
fn fill_sink(
    sink: &mut Sink,
    at: usize,
    len: usize,
    mut f: impl FnMut(usize, &mut [u8]) -> Result<(), ShmError>,
) -> Result<usize, ShmError> {
    let end = at.saturating_add(len).min(sink.mlength());
    if at >= end {
        return Ok(0);
    }
    sink.with_iov_mut(|iov| {
        let mut pos = 0usize;
        let mut done = 0;
        for s in iov.iter_mut() {
            let (a, b) = (pos, pos + s.len());
            pos = b;
            if b <= at {
                continue;
            }
            if a >= end {
                break;
            }
            let (lo, hi) = (at.max(a), end.min(b));
            f(lo - at, &mut s[lo - a..hi - a])?;
            done += hi - lo;
        }
        Ok(done)
    })
}

/// The header of an inline slot carrying an LNet header and `plen`
/// payload bytes.
fn inline_slot_hdr(plen: usize) -> SlotHdr {
    SlotHdr {
        kind: Kind::Inline,
        flags: 0,
        len: (HDR_NID4_SIZE + plen) as u32,
        cookie: 0,
    }
}

impl Conn {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        env: Arc<ConnEnv>,
        peer: Nid,
        hello: &Hello,
        sock: UnixStream,
        out: Arc<Seg>,
        inp: Arc<Seg>,
        in_h: SegHeader,
        peer_pool: Option<(Arc<Seg>, usize)>,
        peer_bell: OwnedFd,
    ) -> Result<Arc<Conn>, ShmError> {
        let mut hb = [0u8; SegHeader::LEN];
        out.read(0, &mut hb)?;
        let out_h = SegHeader::decode(&hb, out.len() as u64, wire::SEG_RING)?;
        // Check the control blocks are addressable before anyone relies on it.
        out.ctl(out_h.ctl_off as usize)?;
        inp.ctl(in_h.ctl_off as usize)?;
        let peer_pid = nix::unistd::Pid::from_raw(hello.pid as i32);
        let cma = env.cfg.use_cma && probe_cma(peer_pid, hello.probe_addr, hello.probe_value);
        if env.cfg.use_cma && !cma {
            inc(&env.stats.local().cma_refused);
            debug!(target: "net", %peer, "process_vm_readv not allowed towards this peer");
        }
        let nbounce = out_h.nbounce;
        Ok(Arc::new_cyclic(|me| Conn {
            me: me.clone(),
            peer,
            peer_incarnation: hello.incarnation,
            peer_pid,
            sock,
            prod: SpinLock::new(ProdState {
                ring: Producer::new(out_h.nslots as u64),
                backlog: VecDeque::new(),
            }),
            cons: Mutex::new(Some(ConsState {
                ring: Consumer::new(in_h.nslots as u64),
                scratch: vec![0u8; in_h.slot_size as usize],
            })),
            out,
            out_h,
            inp,
            in_h,
            peer_pool: if env.cfg.use_pool { peer_pool } else { None },
            peer_bell,
            cma: AtomicBool::new(cma),
            backlog_len: AtomicUsize::new(0),
            next_cookie: AtomicU64::new(1),
            tx_pending: Mutex::new(HashMap::new()),
            rx_pending: Mutex::new(HashMap::new()),
            loans: Mutex::new(HashMap::new()),
            bounce: Mutex::new(BounceTx {
                free: (0..nbounce).rev().collect(),
                jobs: VecDeque::new(),
            }),
            dead: AtomicBool::new(false),
            env,
        }))
    }

    pub(crate) fn is_dead(&self) -> bool {
        self.dead.load(Ordering::SeqCst)
    }
    pub(crate) fn cma_ok(&self) -> bool {
        self.cma.load(Ordering::Relaxed)
    }
    pub(crate) fn has_peer_pool(&self) -> bool {
        self.peer_pool.is_some()
    }
    fn arc(&self) -> Option<Arc<Conn>> {
        self.me.upgrade()
    }

    fn out_ctl(&self) -> &RingCtl {
        // Checked in `new`.
        self.out
            .ctl(self.out_h.ctl_off as usize)
            .expect("checked at connect")
    }
    fn in_ctl(&self) -> &RingCtl {
        self.inp
            .ctl(self.in_h.ctl_off as usize)
            .expect("checked at connect")
    }
    fn out_slot(&self, idx: u64) -> usize {
        self.out_h.data_off as usize + idx as usize * self.out_h.slot_size as usize
    }
    fn in_slot(&self, idx: u64) -> usize {
        self.in_h.data_off as usize + idx as usize * self.in_h.slot_size as usize
    }
    /// The mark of the outgoing slot at offset `off` (from `out_slot`).
    fn out_mark(&self, off: usize) -> &AtomicU32 {
        // Slots are inside the segment and 64-byte aligned (checked in `new`).
        self.out.mark(off).expect("checked at connect")
    }
    /// The mark of the incoming slot at offset `off` (from `in_slot`).
    fn in_mark(&self, off: usize) -> &AtomicU32 {
        self.inp.mark(off).expect("checked at connect")
    }
    /// Write a slot laid out from offset 0 (`slot`, its mark bytes
    /// ignored) at `off`, all but the mark, which only the ring stores.
    fn write_slot(&self, off: usize, slot: &[u8]) -> bool {
        slot.len() >= SLOT_MARK && self.out.write(off + SLOT_MARK, &slot[SLOT_MARK..]).is_ok()
    }

    fn ring_peer(&self) {
        inc(&self.env.stats.local().wakeups_sent);
        let _ = nix::unistd::write(&self.peer_bell, &1u64.to_ne_bytes());
    }

    // ------------------------------------------------------------ sending

    /// Send an LNet message (inline or with a bulk descriptor).
    pub(crate) fn send_msg(&self, tx: TxMsg) {
        let hb = match tx.header().encode_nid4(ByteOrder::NATIVE) {
            Ok(h) => h,
            Err(e) => {
                tx.complete(Err(Error::Network(format!("header: {e}"))));
                return;
            }
        };
        let plen = tx.payload_len();
        // A frozen pool buffer of a page or more goes by descriptor even
        // when it would fit a slot: the receiver may borrow it (no copy at
        // all) or copy it once, instead of twice through the slot.
        let lendable = plen >= LOAN_MIN
            && self.env.cfg.use_pool
            && self.env.pool.as_ref().is_some_and(|p| {
                tx.payload_bytes()
                    .is_some_and(|b| p.locate(b.as_ptr() as usize, b.len()).is_some())
            });
        if plen <= self.env.eager && !lendable {
            inc(&self.env.stats.local().tx_inline);
            self.send_inline(tx, &hb, plen);
        } else {
            inc(&self.env.stats.local().tx_rdv);
            self.send_rdv(tx, &hb);
        }
    }

    /// Fill and publish the next slot straight in the ring, when nothing
    /// waits before it and there is room: `fill(slot offset)` writes it
    /// (false: it could not). `None`: no room, the caller queues.
    fn write_direct(&self, fill: impl FnOnce(usize) -> bool) -> Option<bool> {
        let wake = {
            let mut p = self.prod.lock();
            if !p.backlog.is_empty() {
                return None;
            }
            let ctl = self.out_ctl();
            let idx = p.ring.reserve(ctl)?;
            let off = self.out_slot(idx);
            if !fill(off) {
                return Some(false);
            }
            p.ring.publish(ctl, self.out_mark(off))
        };
        if wake {
            self.ring_peer();
        }
        Some(true)
    }

    /// Write an inline slot at `off`: the LNet header `hb`, then `plen`
    /// payload bytes by `payload(offset)`, then the slot header.
    fn fill_inline(
        &self,
        off: usize,
        hb: &[u8; HDR_NID4_SIZE],
        plen: usize,
        payload: impl FnOnce(usize) -> bool,
    ) -> bool {
        let mut shb = [0u8; SLOT_HDR];
        inline_slot_hdr(plen).encode(&mut shb);
        self.out.write(off + SLOT_HDR, hb).is_ok()
            && payload(off + SLOT_HDR + HDR_NID4_SIZE)
            && self.write_slot(off, &shb)
    }

    /// [`lnet::Lnd::send_now`] on this connection: an inline slot written
    /// straight into the ring, or declined (too large for a slot, a
    /// backlog, no room).
    pub(crate) fn send_now(&self, hdr: &Header, payload: &[u8]) -> SendNow {
        let plen = payload.len();
        if plen > self.env.eager {
            return SendNow::Declined;
        }
        // A PUT of ours to this peer goes with the compact header.
        let direct = if let Some(put) = CompactPut::of(hdr, self.env.nid, self.peer) {
            let mut hb = [0u8; SLOT_HDR + PUT_HDR_ACK];
            let n = put.encode(plen, &mut hb);
            self.write_direct(|off| {
                self.write_slot(off, &hb[..n]) && self.out.write(off + n, payload).is_ok()
            })
        } else {
            let hb = match hdr.encode_nid4(ByteOrder::NATIVE) {
                Ok(h) => h,
                Err(e) => return SendNow::Failed(Error::Network(format!("header: {e}"))),
            };
            self.write_direct(|off| {
                self.fill_inline(off, &hb, plen, |at| self.out.write(at, payload).is_ok())
            })
        };
        match direct {
            Some(true) => {
                inc(&self.env.stats.local().tx_inline);
                SendNow::Sent
            }
            Some(false) => SendNow::Failed(Error::Network("shm slot write".into())),
            None => SendNow::Declined,
        }
    }

    fn send_inline(&self, tx: TxMsg, hb: &[u8; HDR_NID4_SIZE], plen: usize) {
        let direct = self.write_direct(|off| {
            self.fill_inline(off, hb, plen, |at| {
                tx.with_payload(|iov| self.out.write_vectored(at, plen, iov, 0))
                    .is_ok_and(|n| n == plen)
            })
        });
        match direct {
            Some(true) => tx.complete(Ok(())),
            Some(false) => tx.complete(Err(Error::Network("shm slot write".into()))),
            None => {
                let mut v = vec![0u8; SLOT_HDR + HDR_NID4_SIZE + plen];
                inline_slot_hdr(plen).encode(&mut v);
                v[SLOT_HDR..SLOT_HDR + HDR_NID4_SIZE].copy_from_slice(hb);
                tx.copy_payload_to(0, &mut v[SLOT_HDR + HDR_NID4_SIZE..]);
                self.enqueue(v, Some(tx));
            }
        }
    }

    fn send_rdv(&self, tx: TxMsg, hb: &[u8; HDR_NID4_SIZE]) {
        let cookie = self.next_cookie.fetch_add(1, Ordering::Relaxed);
        let frags = tx.raw_fragments();
        let mut flags = 0u8;
        let mut desc: Vec<(u64, u64)> = Vec::with_capacity(frags.len());
        let in_pool = self.env.cfg.use_pool
            && self
                .env
                .pool
                .as_ref()
                .is_some_and(|p| frags.iter().all(|&(a, l)| p.locate(a, l).is_some()));
        if in_pool {
            let p = self.env.pool.as_ref().expect("checked");
            flags |= wire::RDV_POOL;
            for &(a, l) in &frags {
                desc.push((p.locate(a, l).expect("checked").0 as u64, l as u64));
            }
            if frags.len() == 1 && tx.payload_bytes().is_some() {
                flags |= wire::RDV_LOANABLE;
            }
        } else {
            desc.extend(frags.iter().map(|&(a, l)| (a as u64, l as u64)));
        }
        if self.peer_pool.is_some() {
            flags |= wire::RDV_CAN_WRITE;
        }
        let mut fb = vec![0u8; wire::frags_len(desc.len())];
        wire::encode_frags(&mut fb, &desc);
        lock(&self.tx_pending).insert(cookie, tx);
        if self.is_dead() {
            if let Some(tx) = lock(&self.tx_pending).remove(&cookie) {
                tx.complete(Err(Error::PeerDown(self.peer.to_string())));
            }
            return;
        }
        self.post(Kind::Rdv, flags, cookie, &[hb, &fb]);
    }

    /// Post a slot built from `parts`: straight into the ring when it can,
    /// else queued in order.
    pub(crate) fn post(&self, kind: Kind, flags: u8, cookie: u64, parts: &[&[u8]]) {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        let sh = SlotHdr {
            kind,
            flags,
            len: len as u32,
            cookie,
        };
        if SLOT_HDR + len <= self.out_h.slot_size as usize {
            let direct = self.write_direct(|off| {
                let mut at = off + SLOT_HDR;
                for p in parts {
                    if self.out.write(at, p).is_err() {
                        return false;
                    }
                    at += p.len();
                }
                let mut shb = [0u8; SLOT_HDR];
                sh.encode(&mut shb);
                self.write_slot(off, &shb)
            });
            if direct.is_some() {
                return;
            }
        }
        let mut v = vec![0u8; SLOT_HDR + len];
        wire::encode(&mut v, kind, flags, cookie, parts);
        self.enqueue(v, None);
    }

    fn enqueue(&self, slot: Vec<u8>, tx: Option<TxMsg>) {
        if slot.len() > self.out_h.slot_size as usize {
            // Only a descriptor of more fragments than a slot holds could
            // get here; LNET_MAX_IOV fragments fit the smallest slot size.
            if let Some(tx) = tx {
                tx.complete(Err(Error::Network("message too large for a slot".into())));
            }
            return;
        }
        {
            let mut p = self.prod.lock();
            p.backlog.push_back((slot, tx));
            self.backlog_len.fetch_add(1, Ordering::Relaxed);
        }
        if self.is_dead() {
            self.fail_backlog(Error::PeerDown(self.peer.to_string()));
            return;
        }
        self.flush_backlog();
    }

    /// Move waiting slots into the ring while there is room. Returns the
    /// slots moved.
    fn flush_backlog(&self) -> usize {
        if self.backlog_len.load(Ordering::Relaxed) == 0 {
            return 0;
        }
        let mut done = Vec::new();
        let mut wake = false;
        let mut moved = 0;
        {
            let mut p = self.prod.lock();
            let ctl = self.out_ctl();
            // Bounded: each turn moves a slot or stops.
            loop {
                if p.backlog.is_empty() {
                    break;
                }
                match p.ring.reserve(ctl) {
                    Some(idx) => {
                        let (slot, tx) = p.backlog.pop_front().expect("not empty");
                        self.backlog_len.fetch_sub(1, Ordering::Relaxed);
                        let off = self.out_slot(idx);
                        let ok = self.write_slot(off, &slot);
                        wake |= p.ring.publish(ctl, self.out_mark(off));
                        moved += 1;
                        if let Some(tx) = tx {
                            done.push((tx, ok));
                        }
                    }
                    None => {
                        // Ask the consumer to ring us when a slot frees;
                        // if one freed meanwhile, go on.
                        if !p.ring.want_space(ctl) {
                            break;
                        }
                    }
                }
            }
            if p.backlog.is_empty() {
                p.ring.got_space(ctl);
            }
        }
        if wake {
            self.ring_peer();
        }
        for (tx, ok) in done {
            tx.complete(if ok {
                Ok(())
            } else {
                Err(Error::Network("shm slot write".into()))
            });
        }
        moved
    }

    fn fail_backlog(&self, err: Error) {
        let txs: Vec<TxMsg> = {
            let mut p = self.prod.lock();
            self.backlog_len.store(0, Ordering::Relaxed);
            p.backlog.drain(..).filter_map(|(_, t)| t).collect()
        };
        for tx in txs {
            tx.complete(Err(err.clone()));
        }
    }

    // ---------------------------------------------------------- receiving

    /// The consumer's state, once: the progress thread keeps it for as long
    /// as it polls this connection.
    pub(crate) fn take_receiver(&self) -> Option<ConsState> {
        lock(&self.cons).take()
    }

    /// One round of the progress thread: queued slots out, arrived slots
    /// in (with `cons`, this connection's receiver, and `pin`, the loop's
    /// hold on the core, taken here when a message needs it). Returns the
    /// work done; an error means the peer broke the protocol.
    pub(crate) fn progress(
        &self,
        cons: &mut ConsState,
        pin: &mut Option<NiPin>,
    ) -> Result<usize, ShmError> {
        if self.is_dead() {
            return Ok(0);
        }
        let mut n = self.flush_backlog();
        let ctl = self.in_ctl();
        let slot_size = self.in_h.slot_size as usize;
        for _ in 0..64 {
            // The next slot's mark, in the line that carries its header:
            // idle, this is the one shared line polled.
            let off = self.in_slot(cons.ring.slot);
            match cons.ring.peek(self.in_mark(off)) {
                Peek::Empty => {
                    // Keep the slot's second line coming too (a message
                    // under a full LNet header spans two), so that it is
                    // not a second transfer in a row once the mark moves.
                    // Only a hint: it is read after the mark as ever.
                    self.inp.prefetch(off + 64, 64);
                    break;
                }
                Peek::Corrupt => return Err(ShmError::BadSlot("slot mark")),
                Peek::Ready(_) => {}
            }
            let mut shb = [0u8; SLOT_HDR];
            self.inp.read(off, &mut shb)?;
            let sh = SlotHdr::decode(&shb, slot_size)?;
            if sh.kind == Kind::Put || sh.kind == Kind::Inline {
                if pin.is_none() {
                    *pin = self.env.ni.pin();
                }
                if sh.kind == Kind::Put {
                    self.on_put(off, &sh, pin.as_ref())?;
                } else {
                    self.on_inline(off, &sh, pin.as_ref())?;
                }
            } else {
                let total = SLOT_HDR + sh.len as usize;
                let st = &mut *cons;
                self.inp.read(off, &mut st.scratch[..total])?;
                let (_, msg) = wire::decode(&st.scratch[..total])?;
                self.on_msg(sh.cookie, msg)?;
            }
            // Counted once handled (off a ping-pong's critical path).
            inc(&self.env.stats.local().rx_msgs);
            if cons.ring.release(ctl) {
                self.ring_peer();
            }
            n += 1;
        }
        Ok(n)
    }

    pub(crate) fn prepare_sleep(&self, cons: &ConsState) -> bool {
        let mut ready = cons
            .ring
            .prepare_sleep(self.in_ctl(), self.in_mark(self.in_slot(cons.ring.slot)));
        if self.backlog_len.load(Ordering::Relaxed) > 0 {
            ready |= self.prod.lock().ring.want_space(self.out_ctl());
        }
        ready
    }

    pub(crate) fn awake(&self, cons: &ConsState) {
        cons.ring.awake(self.in_ctl());
    }

    fn on_inline(&self, off: usize, sh: &SlotHdr, pin: Option<&NiPin>) -> Result<(), ShmError> {
        let len = sh.len as usize;
        if len < HDR_NID4_SIZE {
            return Err(ShmError::BadSlot("short LNet header"));
        }
        let mut hb = [0u8; HDR_NID4_SIZE];
        self.inp.read(off + SLOT_HDR, &mut hb)?;
        let hdr = Header::decode_nid4(&hb, ByteOrder::NATIVE)
            .map_err(|_| ShmError::BadSlot("bad LNet header"))?;
        let plen = len - HDR_NID4_SIZE;
        if hdr.payload_length as usize != plen {
            return Err(ShmError::BadSlot("inline payload length"));
        }
        self.deliver_inline(&hdr, off + SLOT_HDR + HDR_NID4_SIZE, plen, pin)
    }

    /// A [`Kind::Put`] slot at `off`: its compact header stands for the
    /// LNet header of a PUT from the peer's NID to ours.
    fn on_put(&self, off: usize, sh: &SlotHdr, pin: Option<&NiPin>) -> Result<(), ShmError> {
        let hl = CompactPut::header_len(sh)?;
        let mut b = [0u8; PUT_HDR_ACK];
        self.inp.read(off + SLOT_HDR, &mut b[..hl])?;
        let put = CompactPut::decode(sh, &b[..hl])?;
        // Below the slot's size (checked in `SlotHdr::decode`), so below
        // LNET_MTU.
        let plen = sh.len as usize - hl;
        let hdr = put.header(self.peer, self.env.nid, plen as u32);
        self.deliver_inline(&hdr, off + SLOT_HDR + hl, plen, pin)
    }

    /// Hand the core an inline message, header `hdr`, its `plen` payload
    /// bytes at `poff` in the slot.
    fn deliver_inline(
        &self,
        hdr: &Header,
        poff: usize,
        plen: usize,
        pin: Option<&NiPin>,
    ) -> Result<(), ShmError> {
        trace!(target: "nettrace", peer = %self.peer, ty = ?hdr.msg_type(), plen, "shm inline");
        // A PUT into MD memory is copied from the slot under the match.
        let fill = |rel, dst: &mut [u8]| self.inp.read(poff + rel, dst);
        let d = match pin {
            Some(p) => p.parse_inline(hdr, self.peer, fill)?,
            // The node is gone.
            None => Delivery::Discard(hdr.payload_length),
        };
        match d {
            Delivery::Receive(mut sink) => {
                let n = sink.mlength().min(plen);
                let r = fill_sink(&mut sink, 0, n, |rel, dst| self.inp.read(poff + rel, dst));
                sink.complete(r.map(|_| ()).map_err(Error::from));
            }
            Delivery::Deferred(d) => {
                let mut v = vec![0u8; plen];
                self.inp.read(poff, &mut v)?;
                d.on_ready(move |d| {
                    if let Delivery::Receive(mut sink) = d {
                        sink.write_at(0, &v);
                        sink.complete(Ok(()));
                    }
                });
            }
            Delivery::Reply(tx) => {
                tx.complete(Err(Error::Invalid("shm does not send replies inline")))
            }
            Delivery::Discard(_) | Delivery::Done => {}
        }
        Ok(())
    }

    fn on_msg(&self, cookie: u64, msg: Msg<'_>) -> Result<(), ShmError> {
        match msg {
            Msg::Inline { .. } | Msg::Put { .. } => unreachable!("handled by on_inline/on_put"),
            Msg::Rdv { hdr, flags, frags } => {
                let total: u64 = frags.iter().map(|f| f.1).sum();
                if total != hdr.payload_length as u64 {
                    return Err(ShmError::BadSlot("descriptor does not cover the payload"));
                }
                let Some(me) = self.arc() else { return Ok(()) };
                match self.env.ni.parse(&hdr, self.peer) {
                    Delivery::Deferred(d) => {
                        d.on_ready(move |d| me.rdv_deliver(d, cookie, flags, frags))
                    }
                    d => self.rdv_deliver(d, cookie, flags, frags),
                }
            }
            Msg::Done { status, loaned } => {
                let tx = lock(&self.tx_pending).remove(&cookie);
                if let Some(tx) = tx {
                    if loaned {
                        if let Some(b) = tx.payload_bytes() {
                            lock(&self.loans).insert(cookie, b);
                        }
                    }
                    tx.complete(status_of(status));
                }
            }
            Msg::WriteReq { frags } => self.on_write_req(cookie, &frags),
            Msg::WriteDone { status } => {
                if let Some(rx) = lock(&self.rx_pending).remove(&cookie) {
                    inc(&self.env.stats.local().bulk_pool_write);
                    rx.sink.complete(status_of(status));
                }
            }
            Msg::BounceReq { want } => {
                let len = lock(&self.tx_pending).get(&cookie).map(|t| t.payload_len());
                if let Some(len) = len {
                    let want = (want as usize).min(len);
                    if want == 0 {
                        return Ok(());
                    }
                    lock(&self.bounce).jobs.push_back((cookie, 0, want));
                    self.pump_bounce();
                }
            }
            Msg::BounceData { idx, off, len } => self.on_bounce_data(cookie, idx, off, len)?,
            Msg::BounceFree { idx } => {
                if idx >= self.out_h.nbounce {
                    return Err(ShmError::BadSlot("bounce index"));
                }
                {
                    let mut b = lock(&self.bounce);
                    if b.free.contains(&idx) {
                        return Err(ShmError::BadSlot("bounce buffer freed twice"));
                    }
                    b.free.push(idx);
                }
                self.pump_bounce();
            }
            Msg::Release => {
                if lock(&self.loans).remove(&cookie).is_some() {
                    inc(&self.env.stats.local().loans_returned);
                }
            }
        }
        Ok(())
    }

    /// Move a matched bulk payload into its sink, by the cheapest way open.
    fn rdv_deliver(&self, d: Delivery, cookie: u64, flags: u8, frags: Vec<(u64, u64)>) {
        let mut sink = match d {
            Delivery::Receive(s) => s,
            Delivery::Reply(tx) => {
                tx.complete(Err(Error::Invalid("shm does not send replies inline")));
                self.done(cookie, DONE_OK, false);
                return;
            }
            // Dropped: as on a wire, the sender's part is done.
            _ => {
                self.done(cookie, DONE_OK, false);
                return;
            }
        };
        let mlen = sink.mlength();
        if mlen == 0 {
            sink.complete(Ok(()));
            self.done(cookie, DONE_OK, false);
            return;
        }
        // 1/4: the source is in the sender's pool, which we have mapped.
        if flags & wire::RDV_POOL != 0 {
            let Some((seg, base)) = self.peer_pool.clone() else {
                sink.complete(Err(Error::Network("pool descriptor without a pool".into())));
                self.done(cookie, DONE_FAILED, false);
                return;
            };
            if flags & wire::RDV_LOANABLE != 0 && sink.accepts_loan() && frags.len() == 1 {
                let off = base.checked_add(frags[0].0 as usize);
                if let Some(off) = off.filter(|o| seg.slice(*o, mlen).is_ok()) {
                    let view = RemoteLoan {
                        conn: self.me.clone(),
                        seg,
                        off,
                        len: mlen,
                        cookie,
                    };
                    sink.set_loan(Bytes::from_owner(view));
                    inc(&self.env.stats.local().bulk_loan);
                    // Done before the application can see (and drop) the
                    // loan: its Release must reach the sender after this.
                    self.done(cookie, DONE_OK, true);
                    sink.complete(Ok(()));
                    return;
                }
            }
            let r = fill_sink(&mut sink, 0, mlen, |rel, dst| {
                copy_from_frags(&seg, base, &frags, rel, dst)
            });
            let ok = r.is_ok();
            if ok {
                inc(&self.env.stats.local().bulk_pool_read);
            }
            sink.complete(r.map(|_| ()).map_err(Error::from));
            self.done(cookie, if ok { DONE_OK } else { DONE_FAILED }, false);
            return;
        }
        // 1: our sink is in our pool, which the sender has mapped.
        let sender_maps_ours = flags & wire::RDV_CAN_WRITE != 0;
        if let Some(pool) = self.env.pool.as_ref().filter(|_| self.env.cfg.use_pool) {
            let dst = sink.raw_fragments();
            if sender_maps_ours {
                let mut ext = Vec::with_capacity(dst.len());
                let all = dst.iter().all(|&(a, l)| match pool.locate(a, l) {
                    Some((o, _)) => {
                        ext.push((o as u64, l as u64));
                        true
                    }
                    None => false,
                });
                if all && !dst.is_empty() {
                    let mut fb = vec![0u8; wire::frags_len(ext.len())];
                    wire::encode_frags(&mut fb, &ext);
                    lock(&self.rx_pending).insert(
                        cookie,
                        RxPend {
                            sink,
                            got: 0,
                            want: mlen,
                        },
                    );
                    self.post(Kind::WriteReq, 0, cookie, &[&fb]);
                    return;
                }
            }
        }
        // 2: CMA straight from the sender's MD.
        if self.cma_ok() {
            match self.cma_read(&mut sink, &frags, mlen) {
                Ok(()) => {
                    inc(&self.env.stats.local().bulk_cma);
                    sink.complete(Ok(()));
                    self.done(cookie, DONE_OK, false);
                    return;
                }
                Err(e) => {
                    // Not allowed after all (or the sender's memory moved):
                    // fall back to bounce buffers from now on.
                    debug!(target: "net", peer = %self.peer, error = %e, "process_vm_readv failed; bouncing");
                    self.cma.store(false, Ordering::Relaxed);
                }
            }
        }
        // 3: bounce buffers.
        lock(&self.rx_pending).insert(
            cookie,
            RxPend {
                sink,
                got: 0,
                want: mlen,
            },
        );
        self.post(Kind::BounceReq, 0, cookie, &[&(mlen as u32).to_ne_bytes()]);
    }

    fn cma_read(&self, sink: &mut Sink, frags: &[(u64, u64)], mlen: usize) -> std::io::Result<()> {
        let mut remote = Vec::with_capacity(frags.len());
        let mut left = mlen;
        for &(a, l) in frags {
            if left == 0 {
                break;
            }
            let n = (l as usize).min(left);
            remote.push(RemoteIoVec {
                base: a as usize,
                len: n,
            });
            left -= n;
        }
        let pid = self.peer_pid;
        let n =
            sink.with_iov_mut(|iov: &mut [IoSliceMut<'_>]| process_vm_readv(pid, iov, &remote))?;
        if n != mlen {
            return Err(std::io::Error::other("short process_vm_readv"));
        }
        Ok(())
    }

    fn done(&self, cookie: u64, status: u32, loaned: bool) {
        let flags = if loaned { wire::DONE_LOANED } else { 0 };
        self.post(Kind::Done, flags, cookie, &[&status.to_ne_bytes()]);
    }

    /// The receiver asks us to copy our payload into its pool.
    fn on_write_req(&self, cookie: u64, frags: &[(u64, u64)]) {
        let Some(tx) = lock(&self.tx_pending).remove(&cookie) else {
            return;
        };
        let r = (|| -> Result<(), ShmError> {
            let (seg, base) = self
                .peer_pool
                .as_ref()
                .ok_or(ShmError::BadSlot("no pool to write"))?;
            let mut skip = 0usize;
            for &(o, l) in frags {
                let l = usize::try_from(l).map_err(|_| ShmError::OutOfBounds)?;
                let n = l.min(tx.payload_len().saturating_sub(skip));
                let at = usize::try_from(o)
                    .ok()
                    .and_then(|o| base.checked_add(o))
                    .ok_or(ShmError::OutOfBounds)?;
                tx.with_payload(|iov| seg.write_vectored(at, n, iov, skip))?;
                skip += n;
            }
            Ok(())
        })();
        let status = if r.is_ok() { DONE_OK } else { DONE_FAILED };
        self.post(Kind::WriteDone, 0, cookie, &[&status.to_ne_bytes()]);
        tx.complete(r.map_err(Error::from));
    }

    /// Stream queued bounce jobs into free bounce buffers.
    fn pump_bounce(&self) {
        let bsize = self.out_h.bounce_size as usize;
        // Bounded: each turn sends a chunk, drops a job, or stops.
        loop {
            let (cookie, idx, pos, n) = {
                let mut b = lock(&self.bounce);
                let Some(&(cookie, pos, want)) = b.jobs.front() else {
                    return;
                };
                let Some(idx) = b.free.pop() else { return };
                let pend = lock(&self.tx_pending);
                let Some(tx) = pend.get(&cookie) else {
                    b.free.push(idx);
                    b.jobs.pop_front();
                    continue;
                };
                let n = bsize.min(want - pos);
                let at = self.out_h.bounce_off as usize + idx as usize * bsize;
                if tx
                    .with_payload(|iov| self.out.write_vectored(at, n, iov, pos))
                    .is_err()
                {
                    b.free.push(idx);
                    b.jobs.pop_front();
                    continue;
                }
                drop(pend);
                if pos + n >= want {
                    b.jobs.pop_front();
                } else if let Some(j) = b.jobs.front_mut() {
                    j.1 = pos + n;
                }
                (cookie, idx, pos, n)
            };
            let mut body = [0u8; 16];
            body[0..4].copy_from_slice(&idx.to_ne_bytes());
            body[4..8].copy_from_slice(&(n as u32).to_ne_bytes());
            body[8..16].copy_from_slice(&(pos as u64).to_ne_bytes());
            self.post(Kind::BounceData, 0, cookie, &[&body]);
        }
    }

    fn on_bounce_data(&self, cookie: u64, idx: u32, off: u64, len: u32) -> Result<(), ShmError> {
        if idx >= self.in_h.nbounce || len == 0 || len > self.in_h.bounce_size {
            return Err(ShmError::BadSlot("bounce descriptor"));
        }
        let at = self.in_h.bounce_off as usize + idx as usize * self.in_h.bounce_size as usize;
        let finished = {
            let mut pend = lock(&self.rx_pending);
            match pend.get_mut(&cookie) {
                Some(rx) => {
                    if off != rx.got as u64 || rx.got + len as usize > rx.want {
                        return Err(ShmError::BadSlot("bounce chunk out of order"));
                    }
                    fill_sink(&mut rx.sink, rx.got, len as usize, |rel, dst| {
                        self.inp.read(at + rel, dst)
                    })?;
                    rx.got += len as usize;
                    if rx.got == rx.want {
                        pend.remove(&cookie)
                    } else {
                        None
                    }
                }
                None => None,
            }
        };
        self.post(Kind::BounceFree, 0, 0, &[&idx.to_ne_bytes()]);
        if let Some(rx) = finished {
            inc(&self.env.stats.local().bulk_bounce);
            rx.sink.complete(Ok(()));
            self.done(cookie, DONE_OK, false);
        }
        Ok(())
    }

    // ------------------------------------------------------------ teardown

    /// End the connection: every operation it carried ends with `err`.
    /// True the first time.
    pub(crate) fn kill(&self, err: Error) -> bool {
        if self.dead.swap(true, Ordering::SeqCst) {
            return false;
        }
        let _ = self.sock.shutdown(std::net::Shutdown::Both);
        let txs: Vec<TxMsg> = lock(&self.tx_pending).drain().map(|(_, t)| t).collect();
        let rxs: Vec<RxPend> = lock(&self.rx_pending).drain().map(|(_, r)| r).collect();
        lock(&self.loans).clear();
        lock(&self.bounce).jobs.clear();
        self.fail_backlog(err.clone());
        for tx in txs {
            tx.complete(Err(err.clone()));
        }
        for rx in rxs {
            rx.sink.complete(Err(err.clone()));
        }
        true
    }
}

/// Read the peer's probe word with `process_vm_readv`: true when CMA works
/// towards it (same user, and neither Yama nor a container forbids it).
fn probe_cma(pid: nix::unistd::Pid, addr: u64, value: u64) -> bool {
    let mut got = [0u8; 8];
    let remote = [RemoteIoVec {
        base: addr as usize,
        len: 8,
    }];
    matches!(
        process_vm_readv(pid, &mut [IoSliceMut::new(&mut got)], &remote),
        Ok(8)
    ) && u64::from_ne_bytes(got) == value
}
