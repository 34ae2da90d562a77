//! The LNet instance: NIs, the portal table, MDs, the message lifecycle,
//! credits, lazy portals, response deadlines and shutdown.
//!
//! Locking: resources live in *containers*, one per portal (its MEs, the
//! MDs attached to them, its lazy queue) and a few for bound MDs (with the
//! response deadlines of the operations they initiated). An MD never moves
//! between containers and its cookie names its container, so an ACK or a
//! REPLY finds its MD with one hash lookup under one container lock. NI
//! credits, peer credits (sharded) and containers are separate locks and
//! never held together, nor across a call into an LND or an event handler.
//! Container locks are [`SpinLock`]s: held for a match, a copy of a
//! payload at hand or an MD's bookkeeping, they are released with a plain
//! store, a locked instruction fewer on each message's path.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::hash::{BuildHasher, Hash, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tracing::{debug, warn};

use crate::counters::{
    CachePadded, CounterSnapshot, DropReason, MsgCounters, NodeCounterSnapshot, NodeCounters,
};
use crate::credits::{CreditSnapshot, Credits, SharedCredits};
use crate::error::{Error, Result};
use crate::lnd::{
    Deferred, DeferredSender, Delivery, Lnd, LndInfo, NiContext, PeerEvent, SEND_NOW_CAP, SendNow,
    SharedMem, Sink, SinkState, TxMsg, TxState,
};
use crate::mdtable::MdTable;
use crate::nid::{LNET_PID_LUSTRE, Nid, Pid, ProcessId};
use crate::portals::event::{Event, EventHandler, EventKind};
use crate::portals::matching::{Decision, InsPos, MatchCriteria, MatchTable};
use crate::portals::md::{MdBuffer, MdMatch, MdOptions, MdView, Op, Threshold};
use crate::portals::{AckReq, Md, MdHandle, MeHandle, Unlink};
use crate::shard::ShardedMap;
use crate::spin::{SpinGuard, SpinLock};
use crate::sync::Slot;
use crate::wire::{Header, MsgBody, MsgType, WireHandle};
use crate::{LNET_MTU, MAX_PORTALS};

const BOUND_SHARDS: usize = 16;
/// Container index bits in a cookie.
pub(crate) const CONTAINER_BITS: u32 = 7;

/// Configuration of an [`Lnet`] instance.
#[derive(Clone, Debug)]
pub struct Config {
    /// Our pid.
    pub pid: Pid,
    /// How long an operation waits for its ACK or REPLY.
    pub response_timeout: Duration,
    /// Messages a lazy portal holds at most (beyond: dropped, counted).
    pub lazy_max: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            pid: LNET_PID_LUSTRE,
            response_timeout: Duration::from_secs(50),
            lazy_max: 1024,
        }
    }
}

/// Builds an [`Lnet`]: `0@lo` always (its LND is a required argument),
/// then one NI per network.
///
/// ```no_run
/// # fn lo() -> std::sync::Arc<dyn lnet::Lnd> { unimplemented!() }
/// let lnet = lnet::LnetBuilder::new(lo())
///     .pid(lnet::LNET_PID_LUSTRE)
///     .response_timeout(std::time::Duration::from_secs(10))
///     .build()
///     .unwrap();
/// ```
pub struct LnetBuilder {
    cfg: Config,
    lnds: Vec<Arc<dyn Lnd>>,
}

impl LnetBuilder {
    /// Start with the `lo` LND (which must serve [`crate::NetType::LOLND`]).
    pub fn new(lo: Arc<dyn Lnd>) -> Self {
        LnetBuilder {
            cfg: Config::default(),
            lnds: vec![lo],
        }
    }
    /// Add an NI served by `lnd`.
    pub fn ni(mut self, lnd: Arc<dyn Lnd>) -> Self {
        self.lnds.push(lnd);
        self
    }
    /// Set our pid.
    pub fn pid(mut self, pid: Pid) -> Self {
        self.cfg.pid = pid;
        self
    }
    /// Set the ACK/REPLY deadline.
    pub fn response_timeout(mut self, d: Duration) -> Self {
        self.cfg.response_timeout = d;
        self
    }
    /// Set how many messages a lazy portal holds.
    pub fn lazy_max(mut self, n: usize) -> Self {
        self.cfg.lazy_max = n;
        self
    }
    /// Start every NI.
    pub fn build(self) -> Result<Lnet> {
        if self.lnds[0].net_type() != crate::NetType::LOLND {
            return Err(Error::Invalid("the first LND must be lo"));
        }
        let epoch = random_u64() | 1;
        let inner = Arc::new(Inner {
            cfg: self.cfg,
            epoch,
            nis: self
                .lnds
                .into_iter()
                .map(|lnd| NiState {
                    lnd,
                    info: OnceLock::new(),
                    credits: SharedCredits::new(1),
                    tx: Mutex::new(NiTx {
                        queue: VecDeque::new(),
                        handoffs: 0,
                    }),
                    backlog: CachePadded::default(),
                    counters: MsgCounters::default(),
                })
                .collect(),
            containers: (0..MAX_PORTALS + BOUND_SHARDS)
                .map(|_| CachePadded::default())
                .collect(),
            next_seq: AtomicU64::new(1),
            peers: ShardedMap::default(),
            counters: NodeCounters::default(),
            shutting_down: AtomicBool::new(false),
            monitor: Monitor::default(),
        });
        let lnet = Lnet {
            inner: inner.clone(),
            monitor: Mutex::new(None),
        };
        for (i, ni) in inner.nis.iter().enumerate() {
            let ctx = NiContext {
                inner: Arc::downgrade(&inner),
                ni: i,
            };
            let info = ni.lnd.startup(ctx)?;
            if info.nid.net().net_type() != ni.lnd.net_type() || (i == 0 && info.nid != Nid::LO) {
                return Err(Error::Invalid("LND returned a NID of another network"));
            }
            if inner.nis[..i]
                .iter()
                .any(|o| o.info.get().is_some_and(|x| x.nid.net() == info.nid.net()))
            {
                return Err(Error::Invalid("two NIs on one network"));
            }
            let mut limits = info.limits;
            limits.max_payload = limits.max_payload.min(LNET_MTU);
            limits.credits = limits.credits.max(1);
            limits.peer_credits = limits.peer_credits.max(1);
            ni.credits.reset(limits.credits);
            let _ = ni.info.set(LndInfo {
                nid: info.nid,
                limits,
            });
            debug!(target: "net", nid = %info.nid, "NI up");
        }
        let weak = Arc::downgrade(&inner);
        let tick = (inner.cfg.response_timeout / 8)
            .clamp(Duration::from_millis(5), Duration::from_millis(500));
        *lock(&lnet.monitor) = Some(
            std::thread::Builder::new()
                .name("lnet-monitor".into())
                .spawn(move || monitor_loop(weak, tick))
                .map_err(|e| Error::Network(format!("spawning monitor: {e}")))?,
        );
        Ok(lnet)
    }
}

fn random_u64() -> u64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    std::process::id().hash(&mut h);
    Instant::now().hash(&mut h);
    h.finish()
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// An LNet node. Dropping it shuts it down.
pub struct Lnet {
    inner: Arc<Inner>,
    monitor: Mutex<Option<JoinHandle<()>>>,
}

#[derive(Default)]
struct Monitor {
    stop: Mutex<bool>,
    cv: Condvar,
}

fn monitor_loop(inner: Weak<Inner>, tick: Duration) {
    loop {
        let Some(i) = inner.upgrade() else { return };
        {
            let stop = lock(&i.monitor.stop);
            if *stop {
                return;
            }
            let (stop, _) = i
                .monitor
                .cv
                .wait_timeout(stop, tick)
                .unwrap_or_else(|e| e.into_inner());
            if *stop {
                return;
            }
        }
        i.expire_responses(Instant::now());
    }
}

struct NiState {
    lnd: Arc<dyn Lnd>,
    info: OnceLock<LndInfo>,
    /// Taken and returned without a lock; `tx` only holds the waiters.
    credits: SharedCredits,
    tx: Mutex<NiTx>,
    /// Messages waiting for a credit on this NI or any of its peers (the
    /// queues of `tx` and of its peer NIs): while there are none, a small
    /// PUT may leave through [`Lnd::send_now`] without overtaking any.
    /// Changed under the queue's lock; read without one.
    backlog: CachePadded<AtomicUsize>,
    counters: MsgCounters,
}

/// Messages waiting for an NI credit.
struct NiTx {
    queue: VecDeque<TxMsg>,
    /// Credits returned for waiters that had not queued themselves yet
    /// (see [`SharedCredits`]).
    handoffs: usize,
}

/// Peer NIs by (NI index, peer NID), in locked shards; each lookup
/// hashes its key once, seeded per process (a peer cannot choose NIDs
/// that collide).
type PeerTable = ShardedMap<(usize, Nid), PeerNi>;

struct PeerNi {
    credits: Credits,
    queue: VecDeque<TxMsg>,
    /// Shared with the threads that count this peer's messages (see
    /// [`Inner::count_peer`]); peers are never removed, so a thread's
    /// handle never goes stale.
    counters: Arc<MsgCounters>,
    up: bool,
}

/// Event information saved until the event is due.
#[derive(Clone, Copy, Debug)]
pub(crate) struct EvInfo {
    target: ProcessId,
    initiator: ProcessId,
    sender: Nid,
    pt_index: u32,
    match_bits: u64,
    rlength: u32,
    mlength: u32,
    offset: u32,
    hdr_data: u64,
    msg_type: MsgType,
}

/// What a completing TxMsg was for.
pub(crate) enum TxToken {
    /// Our PUT or GET, from bound MD `md`.
    Initiator { md: u64, ev: EvInfo },
    /// Our REPLY to a GET on attached MD `md`.
    Reply { md: u64, ev: EvInfo },
    /// Our ACK.
    Ack,
    /// Our PUT or GET from a bound MD that has nothing more to hear about
    /// it: no handler, no response awaited, and nothing left in flight on
    /// its account once it left at once (see `initiate`).
    Detached,
}

/// What a completing Sink was for.
pub(crate) enum RxToken {
    /// A PUT into attached MD `md`.
    Put {
        md: u64,
        ev: EvInfo,
        ack: Option<(WireHandle, usize, Nid)>,
    },
    /// The REPLY to our GET, into bound MD `md`.
    Reply { md: u64, ev: EvInfo },
}

impl RxToken {
    /// Only `n` bytes arrived (the LND learnt it late).
    pub(crate) fn set_length(&mut self, n: u32) {
        let ev = match self {
            RxToken::Put { ev, .. } | RxToken::Reply { ev, .. } => ev,
        };
        ev.mlength = ev.mlength.min(n);
        ev.rlength = ev.rlength.min(n);
    }
}

struct Awaiting {
    kind: MsgType,
    deadline: Instant,
    peer: Nid,
}

/// Per-MD event delivery: events are queued in order and delivered by one
/// thread at a time, outside every core lock.
///
/// The delivering thread holds the pipe's claim (`busy`). Events are only
/// ever queued under the MD's container lock, and the thread that queues
/// one tries to claim the pipe right after, still under that lock; the
/// claimer gives the claim back only under the queue's lock, having found
/// the queue empty. So, seen under the container lock, an unclaimed pipe
/// has nothing queued, and claiming it is one atomic operation: no queue
/// lock on the way to the usual event.
struct EventPipe {
    handler: EventHandler,
    busy: AtomicBool,
    /// Held for a push or a pop only: a spin lock (its release is a plain
    /// store; the drain after every delivered event takes it once).
    q: SpinLock<PipeQ>,
}

/// Events waiting for delivery. Most MDs see one event at a time, so the
/// first waits inline and only a backlog allocates.
#[derive(Default)]
struct PipeQ {
    first: Option<Event>,
    rest: VecDeque<Event>,
}

impl PipeQ {
    fn push(&mut self, e: Event) {
        if self.first.is_none() && self.rest.is_empty() {
            self.first = Some(e);
        } else {
            self.rest.push_back(e);
        }
    }
    fn pop(&mut self) -> Option<Event> {
        // (Checked first: `take` on an empty slot still copies the whole,
        // event-sized, option.)
        if self.first.is_some() {
            self.first.take()
        } else {
            self.rest.pop_front()
        }
    }
}

impl EventPipe {
    fn new(handler: EventHandler) -> Self {
        EventPipe {
            handler,
            busy: AtomicBool::new(false),
            q: SpinLock::new(PipeQ::default()),
        }
    }

    /// Claim the pipe (under its MD's container lock).
    #[inline]
    fn claim(&self) -> bool {
        self.busy
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
    }

    /// Deliver what is queued, then give the claim back; the caller holds
    /// the claim.
    fn drain(&self) {
        loop {
            let next = {
                let mut g = self.q.lock();
                match g.pop() {
                    Some(e) => e,
                    None => {
                        self.busy.store(false, Ordering::Release);
                        return;
                    }
                }
            };
            self.handler.deliver(next);
        }
    }

    /// Deliver `first`, then whatever queued meanwhile; the caller holds
    /// the claim.
    #[inline(always)]
    fn deliver_from(&self, first: Event) {
        self.handler.deliver(first);
        self.drain();
    }
}

/// Queue the event `make` builds on `pipe`, under its MD's container lock.
/// An unclaimed pipe (nothing queued, see [`EventPipe`]) is claimed and the
/// event built straight into `after` (no queue lock, and no moves of the
/// event on the way); otherwise it is queued in order, and its pipe
/// claimed for `after` to deliver if nobody holds it.
#[inline]
fn queue_event(pipe: &Arc<EventPipe>, make: impl FnOnce() -> Event, after: &mut After) {
    if after.direct_pipe.is_none() && pipe.claim() {
        after.direct_pipe = Some(pipe.clone());
        after.direct_ev = Some(make());
        return;
    }
    pipe.q.lock().push(make());
    if pipe.claim() {
        after.push_pipe(pipe.clone());
    }
}

/// An event to deliver straight to its handler once the container lock is
/// released: the usual case, an MD that lives on and whose pipe nobody
/// holds. [`claim_direct`] claims the pipe under the lock, as
/// [`queue_event`] would; [`DirectEv::deliver`] then builds the event
/// once, as the handler's argument (not in an [`After`], to be moved out
/// of it and again into the call: about 20 ns per event). Used for an
/// inline PUT's event (`put_filled`) and for every event of an operation
/// that ends later (`op_done_now`: SEND, REPLY, a PUT through a sink).
struct DirectEv {
    pipe: Arc<EventPipe>,
    md: u64,
    user_ptr: u64,
}

/// Claim MD `md`'s pipe for a [`DirectEv`], under its container's lock:
/// `None` when the MD has no handler, is done (its last event carries its
/// buffer: [`emit_in`]) or its pipe is held (the event must queue).
#[inline]
fn claim_direct(m: &MdState, md: u64) -> Option<DirectEv> {
    if is_done(m) {
        return None;
    }
    let pipe = m.pipe.as_ref()?;
    pipe.claim().then(|| DirectEv {
        pipe: pipe.clone(),
        md,
        user_ptr: m.user_ptr,
    })
}

impl DirectEv {
    /// Deliver the event of `kind` described by `ev`, then whatever queued
    /// meanwhile (with no core lock held).
    #[inline(always)]
    fn deliver(self, kind: EventKind, ev: &EvInfo, status: Result<(), Error>, loan: Option<Bytes>) {
        self.pipe
            .deliver_from(make_event(kind, ev, self.md, self.user_ptr, status, loan));
    }
}

/// An MD's memory: its own, reached under its container's lock, until an
/// LND needs it outside that lock (a [`TxMsg`] or a [`Sink`] holds it);
/// from then on shared, behind a mutex of its own. An MD whose payloads
/// only ever travel inline (copied under the container lock) never pays
/// for the sharing: no allocation, no second lock.
enum MdMem {
    Own(MdBuffer),
    Shared(SharedMem),
}

impl MdMem {
    /// The memory, shared (made so on first use).
    fn shared(&mut self) -> SharedMem {
        if let MdMem::Own(b) = self {
            *self = MdMem::Shared(Arc::new(Mutex::new(std::mem::take(b))));
        }
        match self {
            MdMem::Shared(s) => s.clone(),
            MdMem::Own(_) => unreachable!("made shared above"),
        }
    }

    #[inline]
    fn with<R>(&self, f: impl FnOnce(&MdBuffer) -> R) -> R {
        match self {
            MdMem::Own(b) => f(b),
            MdMem::Shared(s) => f(&crate::lnd::lock_mem(s)),
        }
    }

    #[inline]
    fn with_mut<R>(&mut self, f: impl FnOnce(&mut MdBuffer) -> R) -> R {
        match self {
            MdMem::Own(b) => f(b),
            MdMem::Shared(s) => f(&mut crate::lnd::lock_mem(s)),
        }
    }

    /// The buffer back at unlink; `None` while an LND still holds the
    /// memory (a bug there: the caller warns).
    fn into_buffer(self) -> Option<MdBuffer> {
        match self {
            MdMem::Own(b) => Some(b),
            MdMem::Shared(a) => Arc::try_unwrap(a)
                .ok()
                .map(|mx| mx.into_inner().unwrap_or_else(|e| e.into_inner())),
        }
    }
}

struct MdState {
    view: MdView,
    mem: MdMem,
    loan_only: bool,
    /// None when the MD has no handler: its events go nowhere.
    pipe: Option<Arc<EventPipe>>,
    user_ptr: u64,
    me: Option<u64>,
    pending: u32,
    unlinking: bool,
    awaiting: Option<Awaiting>,
    abort: Option<Error>,
}

/// Copies an inline payload into the MD: (offset in the payload,
/// destination slice).
pub(crate) type Fill<'a> = &'a mut dyn FnMut(usize, &mut [u8]) -> Result<()>;

/// Copy an inline payload into `[offset, offset + mlength)` of `mem`
/// with `fill`, slice by slice.
fn fill_mem(mem: &mut MdMem, offset: u32, mlength: u32, fill: Fill<'_>) -> Result<()> {
    mem.with_mut(|b| b.try_for_each_mut(offset as usize, mlength as usize, fill))
        .map(|_| ())
}

impl MdState {
    /// A sink over `[offset, offset + mlength)` of this MD.
    fn sink(
        &mut self,
        inner: &Arc<Inner>,
        offset: u32,
        mlength: u32,
        rlength: u32,
        tok: RxToken,
    ) -> Sink {
        Sink::new(SinkState {
            inner: inner.clone(),
            mem: if self.loan_only {
                None
            } else {
                Some(self.mem.shared())
            },
            offset: offset as usize,
            mlength: mlength as usize,
            rlength: rlength as usize,
            loan_ok: self.loan_only || self.view.options.contains(MdOptions::LOAN),
            loan: None,
            alloc: None,
            token: Some(tok),
        })
    }
}

struct MeState {
    md: Option<u64>,
    unlink: bool,
}

struct Delayed {
    hdr: Header,
    from: Nid,
    ni: usize,
    tx: DeferredSender,
}

#[derive(Default)]
struct Container {
    table: MatchTable<MeState>,
    mds: MdTable<MdState>,
    lazy: bool,
    delayed: VecDeque<Delayed>,
    timers: Timers,
}

/// Things to do once the container lock is released.
#[derive(Default)]
struct After {
    /// A pipe this After has claimed (see `queue_event`), and the event
    /// for it (both set or neither): delivered first, and also if the
    /// After is dropped unrun.
    direct_pipe: Option<Arc<EventPipe>>,
    direct_ev: Option<Event>,
    /// The usual single pipe this After claimed with events queued on it
    /// (see `queue_event`), to drain (and give back), without allocating.
    pipe: Option<Arc<EventPipe>>,
    /// The rest, rare: allocated when first needed (and an After without
    /// it costs one check to drop).
    more: Option<Box<AfterMore>>,
}

#[derive(Default)]
struct AfterMore {
    pipes: Vec<Arc<EventPipe>>,
    fires: Vec<(DeferredSender, Delivery)>,
}

impl After {
    fn more(&mut self) -> &mut AfterMore {
        self.more.get_or_insert_with(Box::default)
    }

    /// A pipe this After claimed (each is claimed once).
    fn push_pipe(&mut self, p: Arc<EventPipe>) {
        match &self.pipe {
            None => self.pipe = Some(p),
            Some(_) => self.more().pipes.push(p),
        }
    }

    /// A deferred message's delivery, fired once the locks are released.
    fn push_fire(&mut self, tx: DeferredSender, d: Delivery) {
        self.more().fires.push((tx, d));
    }

    /// Deliver the event of the pipe this After claimed, if any.
    #[inline(always)]
    fn deliver_direct(&mut self) {
        if let Some(p) = self.direct_pipe.take() {
            let e = self.direct_ev.take().expect("a claimed pipe has its event");
            p.deliver_from(e);
        }
    }

    fn run(&mut self) {
        self.deliver_direct();
        if let Some(p) = self.pipe.take() {
            p.drain();
        }
        if let Some(m) = self.more.take() {
            m.run();
        }
    }
}

impl AfterMore {
    /// The rest of [`After::run`], in the same order: pipes, then
    /// deferred deliveries.
    #[cold]
    fn run(self) {
        for p in &self.pipes {
            p.drain();
        }
        for (tx, d) in self.fires {
            tx.fire(d);
        }
    }
}

impl Drop for After {
    fn drop(&mut self) {
        // A claimed pipe must not stay claimed: deliver what it holds.
        self.deliver_direct();
        if let Some(p) = self.pipe.take() {
            p.drain();
        }
        if let Some(m) = &mut self.more {
            for p in std::mem::take(&mut m.pipes) {
                p.drain();
            }
        }
    }
}

pub(crate) struct Inner {
    cfg: Config,
    epoch: u64,
    nis: Vec<NiState>,
    containers: Box<[CachePadded<SpinLock<Container>>]>,
    next_seq: AtomicU64,
    /// Shards on lines of their own: threads locking neighbouring shards
    /// do not share a cache line.
    peers: PeerTable,
    counters: NodeCounters,
    shutting_down: AtomicBool,
    monitor: Monitor,
}

/// The stack buffer of an immediate send of at most this many bytes.
const SEND_NOW_SMALL: usize = 64;

/// Sequence numbers a thread takes from its node's counter at a time.
const SEQ_BLOCK_LEN: u64 = 256;

thread_local! {
    /// This thread's block of cookie sequence numbers: (the node's epoch,
    /// next, end). A thread that switches nodes takes a new block.
    static SEQ_BLOCK: Cell<(u64, u64, u64)> = const { Cell::new((0, 0, 0)) };
    /// True while an LND send is on this thread's stack: sends issued
    /// meanwhile wait in `LAUNCH_Q` (so an LND that completes inside
    /// `send`, like `lo`, never recurses). A flag of its own, without
    /// drop glue, so the common check costs one load.
    static LAUNCHING: Cell<bool> = const { Cell::new(false) };
    /// The sends waiting for this thread's launch to return.
    static LAUNCH_Q: RefCell<VecDeque<TxMsg>> = const { RefCell::new(VecDeque::new()) };
    /// The counters of the peer NI this thread counted last.
    static LAST_PEER: RefCell<Option<LastPeer>> = const { RefCell::new(None) };
}

/// A thread's handle on the counters of a peer NI: (the node's epoch,
/// NI, peer NID, its counters).
type LastPeer = (u64, usize, Nid, Arc<MsgCounters>);

fn container_of(cookie: u64) -> usize {
    (cookie & ((1 << CONTAINER_BITS) - 1)) as usize
}

impl Inner {
    pub(crate) fn pid(&self) -> Pid {
        self.cfg.pid
    }
    pub(crate) fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Acquire)
    }

    /// A fresh sequence number for an ME or MD cookie: unique in this
    /// node's epoch and never reused. Each thread takes them from a block
    /// of its own, so binding an MD per message does not write a line
    /// that every thread writes.
    fn new_seq(&self) -> u64 {
        SEQ_BLOCK.with(|b| {
            let (node, next, end) = b.get();
            if node == self.epoch && next < end {
                b.set((node, next + 1, end));
                return next;
            }
            let start = self.next_seq.fetch_add(SEQ_BLOCK_LEN, Ordering::Relaxed);
            b.set((self.epoch, start + 1, start + SEQ_BLOCK_LEN));
            start
        })
    }

    fn new_cookie(&self, container: usize) -> u64 {
        Self::cookie(self.new_seq(), container)
    }

    fn cookie(seq: u64, container: usize) -> u64 {
        (seq << CONTAINER_BITS) | container as u64
    }

    fn ni_info(&self, ni: usize) -> Option<&LndInfo> {
        self.nis.get(ni).and_then(|n| n.info.get())
    }

    fn is_local(&self, nid: &Nid) -> bool {
        *nid == Nid::LO
            || self
                .nis
                .iter()
                .any(|n| n.info.get().is_some_and(|i| i.nid == *nid))
    }

    /// The NI that reaches `dst`, and the source NID to use.
    fn route(&self, dst: &Nid) -> Option<(usize, Nid)> {
        // A NID of ours is local (through `lo`, NI 0); otherwise the first
        // NI after `lo` on the destination's network. One pass over the
        // NIs, comparing networks first (two small fields; a whole NID
        // is five), and whole NIDs only on the destination's network,
        // where ours can be.
        let net = dst.net();
        if net == Nid::LO.net() {
            return (*dst == Nid::LO).then_some((0, *dst));
        }
        let mut via = None;
        for (i, n) in self.nis.iter().enumerate().skip(1) {
            let Some(x) = n.info.get() else { continue };
            if x.nid.net() != net {
                continue;
            }
            if x.nid == *dst {
                return Some((0, *dst));
            }
            via = via.or(Some((i, x.nid)));
        }
        via
    }

    /// Every NI's message counters: its own (drops, and messages that
    /// never reached a peer) plus its peers'.
    fn ni_counters(&self) -> Vec<CounterSnapshot> {
        let mut v: Vec<CounterSnapshot> = self.nis.iter().map(|n| n.counters.snapshot()).collect();
        self.peers.for_each_mut(|(ni, _), p| {
            if let Some(s) = v.get_mut(*ni) {
                s.add(&p.counters.snapshot());
            }
        });
        v
    }

    /// Count on peer NI (`ni`, `nid`) with `f`, as every message the LND
    /// hands over or takes at once is counted: through this thread's
    /// handle on the counters of the peer it counted last (a ping-pong's,
    /// or a burst's from one peer), not a lookup in the peer table (a
    /// hash, a shard lock, a probe: about 12 ns a message here, `cargo
    /// bench -p lnd-loopback --bench hop`).
    fn count_peer(&self, ni: usize, nid: Nid, f: impl FnOnce(&MsgCounters)) {
        LAST_PEER.with(|last| {
            // Nothing that counts calls back in here, but a borrow that
            // fails costs only the fast path.
            let Ok(mut last) = last.try_borrow_mut() else {
                return self.with_peer(ni, nid, |p| f(&p.counters));
            };
            if let Some((epoch, i, n, c)) = &*last
                && *epoch == self.epoch
                && *i == ni
                && *n == nid
            {
                return f(c);
            }
            let c = self.with_peer(ni, nid, |p| p.counters.clone());
            f(&c);
            *last = Some((self.epoch, ni, nid, c));
        })
    }

    fn with_peer<R>(&self, ni: usize, nid: Nid, f: impl FnOnce(&mut PeerNi) -> R) -> R {
        let pc = self.ni_info(ni).map_or(8, |i| i.limits.peer_credits);
        let mut g = self.peers.lock((ni, nid));
        // Known peer (every message but the first): a lookup, not the
        // entry API (which moves the key in and out on every call).
        if let Some(p) = g.get_mut() {
            return f(p);
        }
        let p = g.get_or_insert_with(|| PeerNi {
            credits: Credits::new(pc),
            queue: VecDeque::new(),
            counters: Arc::default(),
            up: true,
        });
        f(p)
    }

    // ---------------------------------------------------------------- send

    /// Send through credits: peer credit first, then NI credit; queue when
    /// either runs out.
    pub(crate) fn send(self: &Arc<Self>, tx: TxMsg) {
        if self.is_shutting_down() {
            tx.complete(Err(Error::Shutdown));
            return;
        }
        let max = self.ni_info(tx.ni).map_or(0, |i| i.limits.max_payload) as usize;
        if tx.len > max {
            tx.complete(Err(Error::TooLarge));
            return;
        }
        let (ni, peer) = (tx.ni, tx.peer);
        let granted = self.with_peer(ni, peer, move |p| {
            if p.credits.take() {
                Some(tx)
            } else {
                p.queue.push_back(tx);
                self.nis[ni].backlog.fetch_add(1, Ordering::Relaxed);
                None
            }
        });
        if let Some(tx) = granted {
            self.send_ni(tx);
        }
    }

    fn send_ni(self: &Arc<Self>, mut tx: TxMsg) {
        let ni = &self.nis[tx.ni];
        // The peer credit now, the NI's once granted (a queued message
        // counts as waiting for it).
        tx.credits_held = true;
        if !ni.credits.take() {
            let mut g = lock(&ni.tx);
            if g.handoffs == 0 {
                g.queue.push_back(tx);
                ni.backlog.fetch_add(1, Ordering::Relaxed);
                return;
            }
            g.handoffs -= 1;
        }
        self.lnd_send(tx);
    }

    fn lnd_send(self: &Arc<Self>, tx: TxMsg) {
        if LAUNCHING.get() {
            LAUNCH_Q.with(|q| q.borrow_mut().push_back(tx));
            return;
        }
        LAUNCHING.set(true);
        self.nis[tx.ni].lnd.send(tx);
        self.drain_launch();
    }

    /// Hand the LND what queued on this thread's launch queue while a
    /// send was under way, until it is empty; then end the launch.
    fn drain_launch(self: &Arc<Self>) {
        loop {
            let more = LAUNCH_Q.with(|q| q.borrow_mut().pop_front());
            match more {
                Some(t) => self.nis[t.ni].lnd.send(t),
                None => {
                    LAUNCHING.set(false);
                    return;
                }
            }
        }
    }

    /// May a message with `plen` payload bytes to NI `ni` go through
    /// [`Lnd::send_now`]:
    /// the LND takes that size, no message waits for a credit on the NI
    /// (so it overtakes none), and no send is under way on this thread.
    fn may_send_now(&self, ni: usize, plen: u32) -> bool {
        let Some(n) = self.nis.get(ni) else {
            return false;
        };
        let max = n.info.get().map_or(0, |i| i.limits.send_now_max) as usize;
        // Relaxed: this thread's own queued messages are seen in program
        // order; another thread's are unordered with ours anyway.
        max > 0
            && plen as usize <= max.min(SEND_NOW_CAP)
            && n.backlog.load(Ordering::Relaxed) == 0
            && !self.is_shutting_down()
            && !LAUNCHING.get()
    }

    /// Offer a small message to the LND's [`Lnd::send_now`] and complete
    /// it here, or send it the usual way when declined. Runs as a send on
    /// this thread's stack: what the completion's event handler sends
    /// waits its turn instead of recursing.
    fn send_now(self: &Arc<Self>, ni: usize, hdr: &Header, payload: &[u8], tok: TxToken) {
        self.offer_now(ni, hdr.dest_nid, hdr, payload, tok, |tok| {
            let mem = (!payload.is_empty())
                .then(|| Arc::new(Mutex::new(MdBuffer::from(payload.to_vec()))));
            self.send(self.initiator_tx(*hdr, ni, mem, payload.len(), tok));
        });
    }

    /// Offer `hdr` and `payload` to NI `ni`'s [`Lnd::send_now`], as a send
    /// on this thread's stack: taken or failed, the message completes
    /// here with `tok` (counted on `peer`); declined, `declined` gets the
    /// token back and sends it the usual way (dropped first otherwise, so
    /// whatever it holds is released before the completion).
    fn offer_now(
        self: &Arc<Self>,
        ni: usize,
        peer: Nid,
        hdr: &Header,
        payload: &[u8],
        tok: TxToken,
        declined: impl FnOnce(TxToken),
    ) {
        LAUNCHING.set(true);
        let status = match self.nis[ni].lnd.send_now(peer, hdr, payload) {
            SendNow::Sent => Ok(()),
            SendNow::Failed(e) => Err(e),
            SendNow::Declined => {
                declined(tok);
                self.drain_launch();
                return;
            }
        };
        drop(declined);
        self.sent_now(ni, peer, hdr, &tok, status);
        self.drain_launch();
    }

    /// Send an ACK or a REPLY: through [`Lnd::send_now`] when it may go
    /// that way (as our small PUTs and GETs do), else the usual way.
    fn send_response(self: &Arc<Self>, tx: TxMsg) {
        let n = tx.len;
        if !self.may_send_now(tx.ni, n as u32) {
            self.send(tx);
        } else if n <= SEND_NOW_SMALL {
            self.response_now::<SEND_NOW_SMALL>(tx);
        } else {
            self.response_now::<SEND_NOW_CAP>(tx);
        }
    }

    /// [`Inner::send_response`] through [`Lnd::send_now`]: the payload (at
    /// most `N` bytes) copied onto the stack, then offered. Taken or
    /// failed, the message completes here as an immediate send does (its
    /// token finished, counted on its peer); declined, it goes the usual
    /// way.
    fn response_now<const N: usize>(self: &Arc<Self>, mut tx: TxMsg) {
        let mut buf = [0u8; N];
        let n = tx.len;
        if tx.copy_payload_to(0, &mut buf[..n]) != n {
            return self.send(tx);
        }
        // The token out of the message: completed here, the message must
        // not finish again (nor count on the NI) when it is dropped.
        let Some(tok) = tx.token.take() else { return };
        let (ni, peer, hdr) = (tx.ni, tx.peer, tx.hdr);
        self.offer_now(ni, peer, &hdr, &buf[..n], tok, |tok| {
            tx.token = Some(tok);
            self.send(tx);
        });
    }

    /// [`Inner::send_now`] for our PUT or GET, its payload already copied
    /// out of its MD under the container lock `c`: the MD unlinked first
    /// when the send used it up (`unlink`), then the message offered with
    /// no core lock held.
    fn send_immediate(
        self: &Arc<Self>,
        mut c: SpinGuard<'_, Container>,
        unlink: Option<u64>,
        ni: usize,
        hdr: &Header,
        payload: &[u8],
        tok: TxToken,
    ) {
        let Container { mds, timers, .. } = &mut *c;
        // A bound MD without a handler, used up: no ME, no event. Out of
        // the table now; its memory is released once the message has left
        // (a `free` or two off the way to the wire: an RPC layer binds an
        // MD per message).
        let gone = unlink.and_then(|md| mds.entry(md)).map(|o| o.remove());
        timers.compact(mds);
        drop(c);
        self.send_now(ni, hdr, payload, tok);
        drop(gone);
    }

    /// Our PUT or GET as a message for [`Lnd::send`]: to the header's
    /// destination on NI `ni`, `len` payload bytes from `mem`.
    fn initiator_tx(
        self: &Arc<Self>,
        hdr: Header,
        ni: usize,
        mem: Option<SharedMem>,
        len: usize,
        tok: TxToken,
    ) -> TxMsg {
        TxMsg::new(TxState {
            inner: self.clone(),
            peer: hdr.dest_nid,
            hdr,
            ni,
            mem,
            offset: 0,
            len,
            credits_held: false,
            token: Some(tok),
        })
    }

    /// A message [`Lnd::send_now`] took (or failed) completed: counted on
    /// its peer NI (it took no credit), then its operation's bookkeeping.
    fn sent_now(
        self: &Arc<Self>,
        ni: usize,
        peer: Nid,
        hdr: &Header,
        tok: &TxToken,
        status: Result<(), Error>,
    ) {
        let ok = status.is_ok();
        if !ok {
            debug!(target: "neterror", %peer, ?status, "send failed");
        }
        let mtype = hdr.msg_type();
        self.count_peer(ni, peer, |c| {
            if ok {
                c.sent(mtype, hdr.payload_length);
            } else {
                c.error();
            }
        });
        self.token_done(tok, status);
    }

    /// A TxMsg completed.
    pub(crate) fn tx_done(
        self: &Arc<Self>,
        ni: usize,
        peer: Nid,
        hdr: &Header,
        credits_held: bool,
        tok: &TxToken,
        status: Result<(), Error>,
    ) {
        let mtype = hdr.msg_type();
        let ok = status.is_ok();
        if !ok {
            debug!(target: "neterror", %peer, ?mtype, ?status, "send failed");
        }
        // Credits back first: whatever they release goes out after us.
        // A message that got its credits is counted on its peer NI (under
        // the peer lock, without atomics); one that never reached a peer,
        // on the NI itself.
        let mut release = Vec::new();
        if credits_held {
            let n = &self.nis[ni];
            if n.credits.give_back() {
                let mut g = lock(&n.tx);
                match g.queue.pop_front() {
                    Some(t) => {
                        n.backlog.fetch_sub(1, Ordering::Relaxed);
                        release.push((t, true));
                    }
                    None => g.handoffs += 1,
                }
            }
            self.with_peer(ni, peer, |p| {
                if ok {
                    p.counters.sent(mtype, hdr.payload_length);
                } else {
                    p.counters.error();
                }
                if p.credits.give_back() {
                    if let Some(t) = p.queue.pop_front() {
                        self.nis[ni].backlog.fetch_sub(1, Ordering::Relaxed);
                        release.push((t, false));
                    }
                }
            });
        } else if let Some(n) = self.nis.get(ni) {
            if ok {
                n.counters.sent(mtype, hdr.payload_length);
            } else {
                n.counters.error();
            }
        }
        self.token_done(tok, status);
        for (t, ni_ready) in release {
            if ni_ready {
                self.lnd_send(t);
            } else {
                self.send_ni(t);
            }
        }
    }

    /// The operation behind a completed message: its event and MD
    /// bookkeeping.
    fn token_done(self: &Arc<Self>, tok: &TxToken, status: Result<(), Error>) {
        // Our PUT or GET left (a failed send loses the response it waited
        // for); a REPLY we sent is the GET on our MD. An ACK, or an
        // operation detached from its MD, has nothing left to do: no
        // `After` is built for it (the usual immediate send's case).
        let (md, ev, kind, lost_response) = match *tok {
            TxToken::Initiator { md, ref ev } => (md, ev, EventKind::Send, status.is_err()),
            TxToken::Reply { md, ref ev } => (md, ev, EventKind::Get, false),
            TxToken::Ack | TxToken::Detached => return,
        };
        let c = self.containers[container_of(md)].lock();
        self.op_done_now(c, md, kind, ev, status, None, lost_response);
    }

    /// An operation on MD `md` ended (see [`op_settle`]): its event of
    /// `kind`, delivered now ([`Inner::emit_now`]).
    #[allow(clippy::too_many_arguments)]
    fn op_done_now(
        self: &Arc<Self>,
        c: SpinGuard<'_, Container>,
        md: u64,
        kind: EventKind,
        ev: &EvInfo,
        status: Result<(), Error>,
        loan: Option<Bytes>,
        lost_response: bool,
    ) {
        self.emit_now(c, md, kind, ev, loan, |_, m, timers| {
            op_settle(m, timers, lost_response);
            status
        });
    }

    /// MD `md`'s event of `kind` (the MD in container `c`, whose lock is
    /// released here), delivered now: every event the core makes outside
    /// an [`After`] it already holds goes this way. `prep` first does, on
    /// the MD found with the one lookup, what the event completes, and
    /// gives the event's status. The usual event (of an MD that lives on,
    /// its pipe free) then goes straight to its handler ([`DirectEv`]);
    /// the last one, or one behind a busy pipe, through an [`After`]
    /// ([`emit_in`]).
    #[inline(always)]
    fn emit_now(
        self: &Arc<Self>,
        mut c: SpinGuard<'_, Container>,
        md: u64,
        kind: EventKind,
        ev: &EvInfo,
        loan: Option<Bytes>,
        prep: impl FnOnce(&mut MatchTable<MeState>, &mut MdState, &mut Timers) -> Result<(), Error>,
    ) {
        let Some((mut o, table, timers)) = md_entry(&mut c, md) else {
            return;
        };
        let status = prep(table, o.get_mut(), timers);
        if let Some(d) = claim_direct(o.get(), md) {
            drop(c);
            d.deliver(kind, ev, status, loan);
            return;
        }
        let mut after = After::default();
        emit_in(table, o, kind, ev, status, loan, &mut after);
        drop(c);
        after.run();
    }

    // ------------------------------------------------------------- receive

    fn drop_msg(&self, ni: usize, hdr: &Header, r: DropReason) -> Delivery {
        self.counters.drop_reason(r);
        if let Some(n) = self.nis.get(ni) {
            n.counters.dropped(hdr.msg_type(), hdr.payload_length);
        }
        debug!(target: "net", reason = ?r, src = %hdr.src_nid, ty = ?hdr.msg_type(), "dropping message");
        Delivery::Discard(hdr.payload_length)
    }

    pub(crate) fn parse(self: &Arc<Self>, ni: usize, hdr: &Header, from: Nid) -> Delivery {
        self.parse_with(ni, hdr, from, None)
    }

    /// [`Inner::parse`]; with `fill`, a PUT's payload is at hand (inline in
    /// the LND's receive buffer) and, when it lands in MD memory, is copied
    /// by `fill` under the match and completed at once (one lookup, no
    /// [`Sink`]): the result is then [`Delivery::Done`].
    pub(crate) fn parse_with(
        self: &Arc<Self>,
        ni: usize,
        hdr: &Header,
        from: Nid,
        fill: Option<Fill<'_>>,
    ) -> Delivery {
        let Some(info) = self.ni_info(ni) else {
            return self.drop_msg(ni, hdr, DropReason::NiDown);
        };
        if self.is_shutting_down() {
            return self.drop_msg(ni, hdr, DropReason::NiDown);
        }
        if hdr.payload_length > info.limits.max_payload {
            return self.drop_msg(ni, hdr, DropReason::TooLarge);
        }
        // Addressed, as a rule, to the NI it came in on: one comparison.
        let local = hdr.dest_nid == info.nid || self.is_local(&hdr.dest_nid);
        if !local || hdr.dest_pid != self.cfg.pid {
            return self.drop_msg(ni, hdr, DropReason::NotForUs);
        }
        let mtype = hdr.msg_type();
        let d = match hdr.body {
            MsgBody::Put { .. } => self.parse_put(ni, hdr, from, fill),
            MsgBody::Get { .. } => self.parse_get(ni, hdr, from, info.limits.reply_inline),
            MsgBody::Ack { .. } => self.parse_ack(ni, hdr),
            MsgBody::Reply { .. } => self.parse_reply(ni, hdr, from),
            MsgBody::Hello { .. } => return self.drop_msg(ni, hdr, DropReason::BadType),
        };
        // Counted once handled, as LNet counts a message when it is
        // finalized: after its event, and after whatever the event's
        // handler sent in answer (off a ping-pong's critical path).
        self.count_peer(ni, from, |c| c.received(mtype, hdr.payload_length));
        d
    }

    fn target_ev(&self, hdr: &Header, from: Nid) -> EvInfo {
        let (pt_index, match_bits, hdr_data) = match hdr.body {
            MsgBody::Put {
                ptl_index,
                match_bits,
                hdr_data,
                ..
            } => (ptl_index, match_bits, hdr_data),
            MsgBody::Get {
                ptl_index,
                match_bits,
                ..
            } => (ptl_index, match_bits, 0),
            _ => (0, 0, 0),
        };
        EvInfo {
            target: ProcessId::new(hdr.dest_nid, hdr.dest_pid),
            initiator: ProcessId::new(hdr.src_nid, hdr.src_pid),
            sender: from,
            pt_index,
            match_bits,
            rlength: 0,
            mlength: 0,
            offset: 0,
            hdr_data,
            msg_type: hdr.msg_type(),
        }
    }

    /// Find an MD for a PUT/GET in portal container `c`, walking its MEs in
    /// order.
    fn match_in(
        c: &mut Container,
        op: Op,
        src: &ProcessId,
        bits: u64,
        rlen: u32,
        roff: u32,
    ) -> Option<(u64, MdMatch)> {
        let Container { table, mds, .. } = c;
        table
            .find(src, bits, |_, me| {
                let Some(mdc) = me.md else {
                    return Decision::Skip;
                };
                let Some(md) = mds.get(mdc) else {
                    return Decision::Skip;
                };
                if md.unlinking {
                    return Decision::Skip;
                }
                match md.view.try_match(op, rlen, roff) {
                    MdMatch::None => Decision::Skip,
                    r => Decision::Stop((mdc, r)),
                }
            })
            .map(|(_, r)| r)
    }

    /// Commit a match on `md` and, when it is exhausted, detach it.
    fn commit(c: &mut Container, md: u64, offset: u32, mlength: u32) {
        let Container { table, mds, .. } = c;
        let Some(m) = mds.get_mut(md) else { return };
        commit_on(table, m, offset, mlength);
        m.pending += 1;
    }

    fn parse_put(
        self: &Arc<Self>,
        ni: usize,
        hdr: &Header,
        from: Nid,
        fill: Option<Fill<'_>>,
    ) -> Delivery {
        let MsgBody::Put {
            ptl_index,
            match_bits,
            offset,
            ..
        } = hdr.body
        else {
            unreachable!()
        };
        if ptl_index as usize >= MAX_PORTALS {
            return self.drop_msg(ni, hdr, DropReason::BadPortal);
        }
        let src = ProcessId::new(hdr.src_nid, hdr.src_pid);
        let mut c = self.containers[ptl_index as usize].lock();
        match Self::match_in(
            &mut c,
            Op::Put,
            &src,
            match_bits,
            hdr.payload_length,
            offset,
        ) {
            Some((md, MdMatch::Ok { offset, mlength })) => match fill {
                // The payload is at hand and the MD has memory: copy it in
                // under the match (container, then memory when shared: the
                // order `initiate` takes too) and complete now.
                Some(fill) if c.mds.get(md).is_some_and(|m| !m.loan_only) => {
                    self.put_filled(c, md, ni, hdr, from, (offset, mlength), fill);
                    Delivery::Done
                }
                _ => Delivery::Receive(self.put_sink(&mut c, md, ni, hdr, from, offset, mlength)),
            },
            Some((_, _)) => {
                drop(c);
                self.drop_msg(ni, hdr, DropReason::TooLarge)
            }
            None if c.lazy => {
                if c.delayed.len() >= self.cfg.lazy_max {
                    drop(c);
                    return self.drop_msg(ni, hdr, DropReason::LazyOverflow);
                }
                let slot = Slot::new();
                c.delayed.push_back(Delayed {
                    hdr: *hdr,
                    from,
                    ni,
                    tx: DeferredSender {
                        slot: slot.clone(),
                        len: hdr.payload_length,
                        fired: false,
                    },
                });
                self.counters.lazy_delayed();
                Delivery::Deferred(Deferred { slot })
            }
            None => {
                drop(c);
                self.drop_msg(ni, hdr, DropReason::NoMatch)
            }
        }
    }

    /// A PUT matched on `md` whose payload `fill` copies in now, under the
    /// match: commit, copy, event and ACK with one MD lookup, and nothing
    /// counted in flight (it never leaves the container lock).
    #[allow(clippy::too_many_arguments)]
    fn put_filled(
        self: &Arc<Self>,
        c: SpinGuard<'_, Container>,
        md: u64,
        ni: usize,
        hdr: &Header,
        from: Nid,
        (offset, mlength): (u32, u32),
        fill: Fill<'_>,
    ) {
        let ev = self.put_ev(hdr, from, offset, mlength);
        let mut ack = None;
        self.emit_now(c, md, EventKind::Put, &ev, None, |table, m, _| {
            commit_on(table, m, offset, mlength);
            let status = fill_mem(&mut m.mem, offset, mlength, fill);
            ack = put_ack(m, hdr).filter(|_| status.is_ok());
            status
        });
        // The ACK after the event and whatever queued behind it.
        if let Some(wmd) = ack {
            self.send_response(self.ack_msg(&ev, wmd, ni, from));
        }
    }

    /// Commit a PUT's match on `md` (detaching it when exhausted) and
    /// make the sink for its payload: one lookup for both.
    #[allow(clippy::too_many_arguments)]
    fn put_sink(
        self: &Arc<Self>,
        c: &mut Container,
        md: u64,
        ni: usize,
        hdr: &Header,
        from: Nid,
        offset: u32,
        mlength: u32,
    ) -> Sink {
        let Container { table, mds, .. } = c;
        let m = mds.get_mut(md).expect("matched md");
        commit_on(table, m, offset, mlength);
        m.pending += 1;
        let (ev, ack) = (self.put_ev(hdr, from, offset, mlength), put_ack(m, hdr));
        let ack = ack.map(|wmd| (wmd, ni, from));
        m.sink(
            self,
            offset,
            mlength,
            hdr.payload_length,
            RxToken::Put { md, ev, ack },
        )
    }

    /// The PUT event's information for `hdr`, matched at `offset` for
    /// `mlength` bytes.
    fn put_ev(&self, hdr: &Header, from: Nid, offset: u32, mlength: u32) -> EvInfo {
        let mut ev = self.target_ev(hdr, from);
        ev.rlength = hdr.payload_length;
        ev.mlength = mlength;
        ev.offset = offset;
        ev
    }

    /// A PUT into `md` ended with `status`: its event, then its ACK when
    /// it succeeded and one was asked for.
    fn put_done(
        self: &Arc<Self>,
        c: SpinGuard<'_, Container>,
        md: u64,
        ev: &EvInfo,
        ack: Option<(WireHandle, usize, Nid)>,
        status: Result<(), Error>,
        loan: Option<Bytes>,
    ) {
        let ack = ack.filter(|_| status.is_ok());
        self.op_done_now(c, md, EventKind::Put, ev, status, loan, false);
        // The ACK after the event and whatever queued behind it.
        if let Some((wmd, ni, peer)) = ack {
            self.send_response(self.ack_msg(ev, wmd, ni, peer));
        }
    }

    /// The ACK of a PUT described by `ev`, to `wmd` at the initiator.
    fn ack_msg(self: &Arc<Self>, ev: &EvInfo, wmd: WireHandle, ni: usize, peer: Nid) -> TxMsg {
        TxMsg::new(TxState {
            inner: self.clone(),
            hdr: Header {
                dest_nid: ev.initiator.nid,
                src_nid: ev.target.nid,
                dest_pid: ev.initiator.pid,
                src_pid: self.cfg.pid,
                payload_length: 0,
                body: MsgBody::Ack {
                    dst_wmd: wmd,
                    match_bits: ev.match_bits,
                    mlength: ev.mlength,
                },
            },
            peer,
            ni,
            mem: None,
            offset: 0,
            len: 0,
            credits_held: false,
            token: Some(TxToken::Ack),
        })
    }

    fn parse_get(self: &Arc<Self>, ni: usize, hdr: &Header, from: Nid, inline: bool) -> Delivery {
        let MsgBody::Get {
            return_wmd,
            match_bits,
            ptl_index,
            src_offset,
            sink_length,
        } = hdr.body
        else {
            unreachable!()
        };
        if ptl_index as usize >= MAX_PORTALS {
            return self.drop_msg(ni, hdr, DropReason::BadPortal);
        }
        let src = ProcessId::new(hdr.src_nid, hdr.src_pid);
        let mut c = self.containers[ptl_index as usize].lock();
        let (md, offset, mlength) =
            match Self::match_in(&mut c, Op::Get, &src, match_bits, sink_length, src_offset) {
                Some((md, MdMatch::Ok { offset, mlength })) => (md, offset, mlength),
                Some(_) => {
                    drop(c);
                    return self.drop_msg(ni, hdr, DropReason::TooLarge);
                }
                None => {
                    drop(c);
                    return self.drop_msg(ni, hdr, DropReason::NoMatch);
                }
            };
        Self::commit(&mut c, md, offset, mlength);
        let mut ev = self.target_ev(hdr, from);
        ev.rlength = sink_length;
        ev.mlength = mlength;
        ev.offset = offset;
        let mem = Some(c.mds.get_mut(md).expect("matched md").mem.shared());
        drop(c);
        let reply = TxMsg::new(TxState {
            inner: self.clone(),
            hdr: Header {
                dest_nid: hdr.src_nid,
                src_nid: hdr.dest_nid,
                dest_pid: hdr.src_pid,
                src_pid: self.cfg.pid,
                payload_length: mlength,
                body: MsgBody::Reply {
                    dst_wmd: return_wmd,
                },
            },
            peer: from,
            ni,
            mem,
            offset: offset as usize,
            len: mlength as usize,
            credits_held: false,
            token: Some(TxToken::Reply { md, ev }),
        });
        if inline {
            Delivery::Reply(reply)
        } else {
            self.send_response(reply);
            Delivery::Done
        }
    }

    /// The bound MD an ACK or REPLY names, if it is ours and still waiting
    /// for that kind of response.
    fn response_md(
        &self,
        wmd: &WireHandle,
        kind: MsgType,
    ) -> Option<(u64, SpinGuard<'_, Container>)> {
        if wmd.interface_cookie != self.epoch {
            return None;
        }
        let md = wmd.object_cookie;
        let ci = container_of(md);
        if ci < MAX_PORTALS || ci >= self.containers.len() {
            return None;
        }
        let mut c = self.containers[ci].lock();
        let m = c.mds.get_mut(md)?;
        if m.awaiting.as_ref().is_none_or(|a| a.kind != kind) {
            return None;
        }
        m.awaiting = None;
        m.view.threshold.dec();
        c.timers.remove();
        Some((md, c))
    }

    fn parse_ack(self: &Arc<Self>, ni: usize, hdr: &Header) -> Delivery {
        let MsgBody::Ack {
            dst_wmd,
            match_bits,
            mlength,
        } = hdr.body
        else {
            unreachable!()
        };
        let Some((md, c)) = self.response_md(&dst_wmd, MsgType::Ack) else {
            return self.drop_msg(ni, hdr, DropReason::StaleHandle);
        };
        let ev = EvInfo {
            target: ProcessId::new(hdr.src_nid, hdr.src_pid),
            initiator: ProcessId::new(hdr.dest_nid, hdr.dest_pid),
            sender: hdr.src_nid,
            pt_index: 0,
            match_bits,
            rlength: mlength,
            mlength,
            offset: 0,
            hdr_data: 0,
            msg_type: MsgType::Ack,
        };
        self.emit_now(c, md, EventKind::Ack, &ev, None, |_, _, _| Ok(()));
        Delivery::Done
    }

    fn parse_reply(self: &Arc<Self>, ni: usize, hdr: &Header, from: Nid) -> Delivery {
        let MsgBody::Reply { dst_wmd } = hdr.body else {
            unreachable!()
        };
        let Some((md, mut c)) = self.response_md(&dst_wmd, MsgType::Reply) else {
            return self.drop_msg(ni, hdr, DropReason::StaleHandle);
        };
        let m = c.mds.get_mut(md).expect("response md");
        let rlength = hdr.payload_length;
        let mlength = rlength.min(m.view.length);
        let mut ev = EvInfo {
            target: ProcessId::new(hdr.src_nid, hdr.src_pid),
            initiator: ProcessId::new(hdr.dest_nid, hdr.dest_pid),
            sender: from,
            pt_index: 0,
            match_bits: 0,
            rlength,
            mlength,
            offset: 0,
            hdr_data: 0,
            msg_type: MsgType::Reply,
        };
        if mlength < rlength && !m.view.options.contains(MdOptions::TRUNCATE) {
            ev.mlength = 0;
            self.emit_now(c, md, EventKind::Reply, &ev, None, |_, _, _| {
                Err(Error::TooLarge)
            });
            return self.drop_msg(ni, hdr, DropReason::TooLarge);
        }
        m.pending += 1;
        Delivery::Receive(m.sink(self, 0, mlength, rlength, RxToken::Reply { md, ev }))
    }

    /// A Sink completed.
    pub(crate) fn rx_done(
        self: &Arc<Self>,
        tok: &RxToken,
        status: Result<(), Error>,
        loan: Option<Bytes>,
    ) {
        match *tok {
            RxToken::Put { md, ref ev, ack } => {
                let c = self.containers[container_of(md)].lock();
                self.put_done(c, md, ev, ack, status, loan);
            }
            RxToken::Reply { md, ref ev } => {
                let c = self.containers[container_of(md)].lock();
                self.op_done_now(c, md, EventKind::Reply, ev, status, loan, false);
            }
        }
    }

    // -------------------------------------------------- timeouts and peers

    fn expire_responses(self: &Arc<Self>, now: Instant) {
        for ci in MAX_PORTALS..self.containers.len() {
            let mut after = After::default();
            {
                let mut c = self.containers[ci].lock();
                while let Some((deadline, md)) = c.timers.pop_due(now) {
                    if !awaits(&c.mds, md, deadline) {
                        continue;
                    }
                    self.counters.response_timeout();
                    warn!(target: "neterror", md, "response timed out");
                    abort_md(&mut c, md, Error::Timeout, &mut after);
                }
            }
            after.run();
        }
    }

    pub(crate) fn peer_event(self: &Arc<Self>, ni: usize, peer: Nid, ev: PeerEvent) {
        self.with_peer(ni, peer, |p| p.up = !matches!(ev, PeerEvent::Down));
        if ev != PeerEvent::Restarted {
            return;
        }
        // Its state is gone: nothing it owed us will come.
        for ci in MAX_PORTALS..self.containers.len() {
            let mut after = After::default();
            {
                let mut c = self.containers[ci].lock();
                let victims: Vec<u64> = c
                    .mds
                    .iter()
                    .filter(|(_, m)| m.awaiting.as_ref().is_some_and(|a| a.peer == peer))
                    .map(|(k, _)| k)
                    .collect();
                for md in victims {
                    let err = Error::PeerDown(peer.to_string());
                    abort_md(&mut c, md, err, &mut after);
                }
            }
            after.run();
        }
    }

    // ------------------------------------------------------------ shutdown

    fn shutdown(self: &Arc<Self>) {
        if self.shutting_down.swap(true, Ordering::AcqRel) {
            return;
        }
        debug!(target: "net", "shutting down");
        // Messages waiting for credits never left.
        let mut waiting = Vec::new();
        for ni in &self.nis {
            waiting.extend(lock(&ni.tx).queue.drain(..));
            ni.backlog.store(0, Ordering::Relaxed);
        }
        self.peers
            .for_each_mut(|_, p| waiting.extend(p.queue.drain(..)));
        for mut t in waiting {
            // Credit counters are not used after shutdown.
            t.credits_held = false;
            t.complete(Err(Error::Shutdown));
        }
        for ni in self.nis.iter().rev() {
            ni.lnd.shutdown();
        }
        for ci in 0..self.containers.len() {
            let mut after = After::default();
            {
                let mut c = self.containers[ci].lock();
                for d in c.delayed.drain(..) {
                    self.counters.drop_reason(DropReason::LazyFlushed);
                    let len = d.hdr.payload_length;
                    after.push_fire(d.tx, Delivery::Discard(len));
                }
                let mds: Vec<u64> = c.mds.cookies().collect();
                for md in mds {
                    abort_md(&mut c, md, Error::Shutdown, &mut after);
                }
            }
            after.run();
        }
        *lock(&self.monitor.stop) = true;
        self.monitor.cv.notify_all();
    }
}

/// Commit an accepted match on MD `m` (one operation consumed, its local
/// offset advanced) and detach it from its ME when that used it up.
fn commit_on(table: &mut MatchTable<MeState>, m: &mut MdState, offset: u32, mlength: u32) {
    m.view.commit(offset, mlength);
    if m.view.exhausted() {
        detach_me(table, m);
    }
}

/// Take MD `m` off its ME (and the ME off its list when it unlinks with
/// its MD).
fn detach_me(table: &mut MatchTable<MeState>, m: &mut MdState) {
    let Some(me) = m.me.take() else { return };
    let unlink = table.get(me).is_none_or(|s| s.unlink);
    if unlink {
        table.remove(me);
    } else if let Some(s) = table.get_mut(me) {
        s.md = None;
    }
}

type MdEntry<'a> = crate::mdtable::MdEntry<'a, MdState>;

/// The response deadlines of a container's MDs, in the order they were
/// set. Every deadline is the time it was set (read under the container
/// lock) plus the node's one response timeout, so that order is also
/// deadline order: setting one is a push, the next due is at the front.
///
/// An answered operation leaves its entry behind (no search per ACK or
/// REPLY); due entries are checked against their MD, which must still
/// wait with that same deadline. Stale entries are dropped whenever they
/// outnumber the live ones (plus a constant), so the queue stays bounded
/// by the MDs waiting.
#[derive(Default)]
struct Timers {
    q: VecDeque<(Instant, u64)>,
    /// Deadlines still set (MDs with `awaiting`).
    live: usize,
}

impl Timers {
    /// Stale entries allowed beyond the live ones before a clean-up.
    const SLACK: usize = 64;

    fn insert(&mut self, deadline: Instant, md: u64) {
        self.q.push_back((deadline, md));
        self.live += 1;
    }

    /// A deadline was cleared (its response came or the MD was aborted).
    fn remove(&mut self) {
        self.live = self.live.saturating_sub(1);
    }

    /// The front entry if it is due by `now` (it may be stale).
    fn pop_due(&mut self, now: Instant) -> Option<(Instant, u64)> {
        match self.q.front() {
            Some(&(d, _)) if d <= now => self.q.pop_front(),
            _ => None,
        }
    }

    /// Drop stale entries once they outnumber the live ones (plus the
    /// slack): what keeps the queue bounded.
    #[inline]
    fn compact(&mut self, mds: &MdTable<MdState>) {
        if self.q.len() > 2 * self.live + Self::SLACK {
            self.retain_live(mds);
        }
    }

    #[cold]
    fn retain_live(&mut self, mds: &MdTable<MdState>) {
        self.q.retain(|&(d, md)| awaits(mds, md, d));
    }
}

/// Whether `md` still waits for a response due at `deadline`.
fn awaits(mds: &MdTable<MdState>, md: u64, deadline: Instant) -> bool {
    mds.get(md)
        .and_then(|m| m.awaiting.as_ref())
        .is_some_and(|a| a.deadline == deadline)
}

/// MD `md`'s entry in `c`, found once, with the container's ME list and
/// response timers beside it.
fn md_entry(
    c: &mut Container,
    md: u64,
) -> Option<(MdEntry<'_>, &mut MatchTable<MeState>, &mut Timers)> {
    let Container {
        table, mds, timers, ..
    } = c;
    mds.entry(md).map(|o| (o, table, timers))
}

/// End whatever MD `md` waits for with `err` and unlink it.
fn abort_md(c: &mut Container, md: u64, err: Error, after: &mut After) {
    let Some((mut o, table, timers)) = md_entry(c, md) else {
        return;
    };
    let m = o.get_mut();
    let had_wait = m.awaiting.take();
    m.unlinking = true;
    if had_wait.is_some() {
        timers.remove();
    }
    if had_wait.is_some() || err == Error::Shutdown {
        m.abort = Some(err);
    }
    detach_me(table, m);
    finish_in(table, o, None, after);
}

/// An operation's bookkeeping before its event, on its MD `m`: no longer
/// in flight (and, with `lost_response`, the response it waited for will
/// not come).
fn op_settle(m: &mut MdState, timers: &mut Timers, lost_response: bool) {
    m.pending -= 1;
    if lost_response {
        // Consume the response's share of the threshold as if it came.
        if m.awaiting.take().is_some() {
            m.view.threshold.dec();
            timers.remove();
        }
    }
}

/// The handle a PUT with header `hdr` asks to be ACKed on, if it asks
/// and its MD `m` allows it.
fn put_ack(m: &MdState, hdr: &Header) -> Option<WireHandle> {
    let MsgBody::Put { ack_wmd, .. } = hdr.body else {
        unreachable!()
    };
    (!ack_wmd.is_none() && !m.view.options.contains(MdOptions::ACK_DISABLE)).then_some(ack_wmd)
}

fn emit_in(
    table: &mut MatchTable<MeState>,
    o: MdEntry<'_>,
    kind: EventKind,
    ev: &EvInfo,
    status: Result<(), Error>,
    loan: Option<Bytes>,
    after: &mut After,
) {
    let m = o.get();
    let Some(pipe) = &m.pipe else {
        finish_in(table, o, None, after);
        return;
    };
    let make = || make_event(kind, ev, o.key(), m.user_ptr, status, loan);
    if !is_done(m) {
        // The usual case: the MD lives on; its event is built where it
        // waits for delivery.
        queue_event(pipe, make, after);
        return;
    }
    let event = make();
    finish_in(table, o, Some(event), after);
}

/// The event of `kind` described by `ev` for MD `md` (not its last: no
/// buffer).
#[inline(always)]
fn make_event(
    kind: EventKind,
    ev: &EvInfo,
    md: u64,
    user_ptr: u64,
    status: Result<(), Error>,
    loan: Option<Bytes>,
) -> Event {
    Event {
        kind,
        target: ev.target,
        initiator: ev.initiator,
        sender: ev.sender,
        pt_index: ev.pt_index,
        match_bits: ev.match_bits,
        rlength: ev.rlength,
        mlength: ev.mlength,
        offset: ev.offset,
        md: MdHandle(md),
        user_ptr,
        hdr_data: ev.hdr_data,
        msg_type: ev.msg_type,
        status,
        unlinked: false,
        buffer: None,
        loan,
    }
}

/// True when MD `m` has nothing more to do: it is unlinked, or used up
/// with nothing in flight and no response awaited.
fn is_done(m: &MdState) -> bool {
    (m.unlinking || m.view.exhausted()) && m.pending == 0 && m.awaiting.is_none()
}

/// Queue `event` (if any) for the MD in `o`; when the MD is done, unlink
/// it and hand its buffer back with the last event.
#[inline]
fn finish_in(
    table: &mut MatchTable<MeState>,
    mut o: MdEntry<'_>,
    event: Option<Event>,
    after: &mut After,
) {
    let md = o.key();
    let m = o.get_mut();
    if !is_done(m) {
        if let Some(pipe) = &m.pipe
            && let Some(e) = event
        {
            queue_event(pipe, || e, after);
        }
        return;
    }
    detach_me(table, m);
    let m = o.remove();
    let Some(pipe) = m.pipe else {
        // No handler: no events; the buffer is simply released.
        if matches!(&m.mem, MdMem::Shared(a) if Arc::strong_count(a) > 1) {
            warn!(target: "neterror", md, "MD memory still referenced at unlink");
        }
        return;
    };
    let buffer = Some(m.mem.into_buffer().unwrap_or_else(|| {
        warn!(target: "neterror", md, "MD memory still referenced at unlink");
        MdBuffer::default()
    }));
    let last = match (event, m.abort) {
        (Some(mut e), None) => {
            e.unlinked = true;
            e.buffer = buffer;
            e
        }
        (e, abort) => {
            if let Some(e) = e {
                queue_event(&pipe, || e, after);
            }
            Event {
                kind: EventKind::Unlink,
                target: ProcessId::ANY,
                initiator: ProcessId::ANY,
                sender: Nid::ANY,
                pt_index: 0,
                match_bits: 0,
                rlength: 0,
                mlength: 0,
                offset: 0,
                md: MdHandle(md),
                user_ptr: m.user_ptr,
                hdr_data: 0,
                msg_type: MsgType::Put,
                status: abort.map_or(Ok(()), Err),
                unlinked: true,
                buffer,
                loan: None,
            }
        }
    };
    queue_event(&pipe, || last, after);
}

// ------------------------------------------------------------- public API

impl Lnet {
    /// Start building a node; `lo` is the loopback LND.
    pub fn builder(lo: Arc<dyn Lnd>) -> LnetBuilder {
        LnetBuilder::new(lo)
    }

    /// Our pid.
    pub fn pid(&self) -> Pid {
        self.inner.cfg.pid
    }

    /// Our NIDs, `0@lo` first.
    pub fn nids(&self) -> Vec<Nid> {
        self.inner
            .nis
            .iter()
            .filter_map(|n| n.info.get().map(|i| i.nid))
            .collect()
    }

    /// Our primary NID: the first NI's after `lo`, or `0@lo` when there is none.
    pub fn primary_nid(&self) -> Nid {
        self.nids().get(1).copied().unwrap_or(Nid::LO)
    }

    /// This node's process id on its primary NID.
    pub fn id(&self) -> ProcessId {
        ProcessId::new(self.primary_nid(), self.pid())
    }

    fn check_md(md: &Md) -> Result<()> {
        if md.threshold == Threshold::Finite(0) {
            return Err(Error::Invalid("threshold 0"));
        }
        if md.buffer.len() > u32::MAX as usize {
            return Err(Error::Invalid("MD longer than 4 GiB"));
        }
        if md.options.contains(MdOptions::MAX_SIZE) && md.max_size as usize > md.buffer.len() {
            return Err(Error::Invalid("max_size larger than the MD"));
        }
        Ok(())
    }

    fn md_state(md: Md, me: Option<u64>) -> MdState {
        let loan_only = md.buffer.is_loan_only();
        MdState {
            view: MdView {
                options: md.options,
                length: md.buffer.len() as u32,
                offset: 0,
                threshold: md.threshold,
                max_size: md.max_size,
            },
            mem: MdMem::Own(md.buffer),
            loan_only,
            pipe: (!matches!(md.handler, EventHandler::None))
                .then(|| Arc::new(EventPipe::new(md.handler))),
            user_ptr: md.user_ptr,
            me,
            pending: 0,
            unlinking: false,
            awaiting: None,
            abort: None,
        }
    }

    /// Attach a match entry to `portal` (`LNetMEAttach`).
    pub fn me_attach(
        &self,
        portal: u32,
        match_id: ProcessId,
        match_bits: u64,
        ignore_bits: u64,
        unlink: Unlink,
        pos: InsPos,
    ) -> Result<MeHandle> {
        let p = portal as usize;
        if p >= MAX_PORTALS {
            return Err(Error::Invalid("portal index out of range"));
        }
        if self.inner.is_shutting_down() {
            return Err(Error::Shutdown);
        }
        let key = self.inner.new_cookie(p);
        let crit = MatchCriteria {
            match_id,
            match_bits,
            ignore_bits,
        };
        self.inner.containers[p].lock().table.insert(
            key,
            crit,
            pos,
            MeState {
                md: None,
                unlink: unlink == Unlink::Unlink,
            },
        );
        Ok(MeHandle(key))
    }

    /// Attach an MD to an ME that has none (`LNetMDAttach`). Messages held
    /// by a lazy portal are offered to it at once.
    pub fn md_attach(&self, me: MeHandle, md: Md) -> Result<MdHandle> {
        Self::check_md(&md)?;
        if !md.buffer.is_writable() && md.options.contains(MdOptions::OP_PUT) {
            return Err(Error::Invalid("PUT target with read-only memory"));
        }
        let p = container_of(me.0);
        if p >= MAX_PORTALS {
            return Err(Error::NoEntry);
        }
        let inner = &self.inner;
        let mut after = After::default();
        let seq = inner.new_seq();
        let cookie;
        {
            let mut c = inner.containers[p].lock();
            if inner.is_shutting_down() {
                return Err(Error::Shutdown);
            }
            let me_state = c.table.get_mut(me.0).ok_or(Error::NoEntry)?;
            if me_state.md.is_some() {
                return Err(Error::Invalid("ME already has an MD"));
            }
            cookie = c
                .mds
                .insert(seq, p, Self::md_state(md, Some(me.0)))
                .ok_or(Error::Invalid("too many MDs on this portal"))?;
            c.table.get_mut(me.0).expect("me").md = Some(cookie);
            // Offer waiting messages to the new MD, in arrival order.
            let crit = *c.table.criteria(me.0).expect("me");
            let mut i = 0;
            while i < c.delayed.len() {
                if c.mds.get(cookie).is_none_or(|m| m.me.is_none()) {
                    break;
                }
                let d = &c.delayed[i];
                let MsgBody::Put {
                    match_bits, offset, ..
                } = d.hdr.body
                else {
                    unreachable!()
                };
                let src = ProcessId::new(d.hdr.src_nid, d.hdr.src_pid);
                if !crit.accepts(&src, match_bits) {
                    i += 1;
                    continue;
                }
                match c.mds.get(cookie).expect("attached md").view.try_match(
                    Op::Put,
                    d.hdr.payload_length,
                    offset,
                ) {
                    MdMatch::None => break,
                    MdMatch::Drop => {
                        let d = c.delayed.remove(i).expect("delayed");
                        inner.counters.drop_reason(DropReason::TooLarge);
                        if let Some(n) = inner.nis.get(d.ni) {
                            n.counters.dropped(MsgType::Put, d.hdr.payload_length);
                        }
                        let len = d.hdr.payload_length;
                        after.push_fire(d.tx, Delivery::Discard(len));
                    }
                    MdMatch::Ok { offset, mlength } => {
                        let d = c.delayed.remove(i).expect("delayed");
                        let sink =
                            inner.put_sink(&mut c, cookie, d.ni, &d.hdr, d.from, offset, mlength);
                        after.push_fire(d.tx, Delivery::Receive(sink));
                    }
                }
            }
        }
        after.run();
        Ok(MdHandle(cookie))
    }

    /// Attach an ME and its MD in one step.
    #[allow(clippy::too_many_arguments)]
    pub fn attach(
        &self,
        portal: u32,
        match_id: ProcessId,
        match_bits: u64,
        ignore_bits: u64,
        unlink: Unlink,
        pos: InsPos,
        md: Md,
    ) -> Result<(MeHandle, MdHandle)> {
        let me = self.me_attach(portal, match_id, match_bits, ignore_bits, unlink, pos)?;
        match self.md_attach(me, md) {
            Ok(h) => Ok((me, h)),
            Err(e) => {
                let _ = self.me_unlink(me);
                Err(e)
            }
        }
    }

    /// Create a free-floating MD for initiating operations (`LNetMDBind`).
    pub fn md_bind(&self, md: Md) -> Result<MdHandle> {
        Self::check_md(&md)?;
        if self.inner.is_shutting_down() {
            return Err(Error::Shutdown);
        }
        // Consecutive binds spread over the bound-MD containers.
        let seq = self.inner.new_seq();
        let shard = MAX_PORTALS + (seq as usize % BOUND_SHARDS);
        let st = Self::md_state(md, None);
        self.inner.containers[shard]
            .lock()
            .mds
            .insert(seq, shard, st)
            .map(MdHandle)
            .ok_or(Error::Invalid("too many bound MDs"))
    }

    /// Unlink an MD (`LNetMDUnlink`). If nothing is in flight, its UNLINK
    /// event (with the buffer) is delivered now; otherwise the last
    /// operation's event carries `unlinked`. A response it still waited for
    /// ends with [`Error::Aborted`].
    pub fn md_unlink(&self, md: MdHandle) -> Result<()> {
        let ci = container_of(md.0);
        if ci >= self.inner.containers.len() {
            return Err(Error::NoEntry);
        }
        let mut after = After::default();
        {
            let mut c = self.inner.containers[ci].lock();
            if !c.mds.contains(md.0) {
                return Err(Error::NoEntry);
            }
            abort_md(&mut c, md.0, Error::Aborted, &mut after);
        }
        after.run();
        Ok(())
    }

    /// Unlink an ME and its MD (`LNetMEUnlink`).
    pub fn me_unlink(&self, me: MeHandle) -> Result<()> {
        let p = container_of(me.0);
        if p >= MAX_PORTALS {
            return Err(Error::NoEntry);
        }
        let mut after = After::default();
        {
            let mut c = self.inner.containers[p].lock();
            let (_, st) = c.table.remove(me.0).ok_or(Error::NoEntry)?;
            if let Some(md) = st.md {
                if let Some(m) = c.mds.get_mut(md) {
                    m.me = None;
                }
                abort_md(&mut c, md, Error::Aborted, &mut after);
            }
        }
        after.run();
        Ok(())
    }

    /// Make `portal` lazy (unmatched PUTs wait for an MD) or not (they are
    /// dropped; turning laziness off drops those waiting).
    pub fn set_lazy(&self, portal: u32, lazy: bool) -> Result<()> {
        let p = portal as usize;
        if p >= MAX_PORTALS {
            return Err(Error::Invalid("portal index out of range"));
        }
        let mut after = After::default();
        {
            let mut c = self.inner.containers[p].lock();
            c.lazy = lazy;
            if !lazy {
                for d in c.delayed.drain(..) {
                    self.inner.counters.drop_reason(DropReason::LazyFlushed);
                    let len = d.hdr.payload_length;
                    after.push_fire(d.tx, Delivery::Discard(len));
                }
            }
        }
        after.run();
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn initiate(
        &self,
        mdh: MdHandle,
        op: Op,
        ack: AckReq,
        target: ProcessId,
        portal: u32,
        match_bits: u64,
        offset: u32,
        hdr_data: u64,
    ) -> Result<()> {
        let inner = &self.inner;
        if inner.is_shutting_down() {
            return Err(Error::Shutdown);
        }
        if portal as usize >= MAX_PORTALS {
            return Err(Error::Invalid("portal index out of range"));
        }
        let ci = container_of(mdh.0);
        if ci < MAX_PORTALS || ci >= inner.containers.len() {
            return Err(Error::Invalid("not a bound MD"));
        }
        let route = inner.route(&target.nid);
        let src_nid = route.map_or(Nid::ANY, |r| r.1);
        let wants_response = op == Op::Get || ack == AckReq::Ack;
        let mut c = inner.containers[ci].lock();
        // One lookup: the MD and the container's response timers beside it.
        let Container { mds, timers, .. } = &mut *c;
        let m = mds.get_mut(mdh.0).ok_or(Error::NoEntry)?;
        if m.unlinking || m.view.exhausted() {
            return Err(Error::NoEntry);
        }
        if m.awaiting.is_some() || (wants_response && m.pending > 0) {
            return Err(Error::Invalid("MD already has an operation in flight"));
        }
        if wants_response && m.view.threshold == Threshold::Finite(1) {
            return Err(Error::Invalid("threshold must allow the ACK/REPLY (2)"));
        }
        let len = m.view.length;
        if op == Op::Put && (len > LNET_MTU || m.loan_only) {
            return Err(Error::Invalid(
                "PUT source larger than LNET_MTU or without memory",
            ));
        }
        if op == Op::Get && !m.loan_only && !m.mem.with(|b| b.is_writable()) {
            return Err(Error::Invalid("GET sink with read-only memory"));
        }
        m.view.threshold.dec();
        let plen = if op == Op::Put { len } else { 0 };
        let ni = route.map_or(0, |r| r.0);
        let immediate = route.is_some() && inner.may_send_now(ni, plen);
        // Leaving at once from an MD without a handler, and waiting for no
        // response, the operation has no bookkeeping left: no SEND event
        // to deliver, nothing in flight to count. If that used the MD up,
        // it is unlinked as soon as its payload is copied out (unless an
        // earlier operation is still in flight, whose completion will).
        let detached = immediate && m.pipe.is_none() && !wants_response;
        let unlink_now = detached && m.view.exhausted() && m.pending == 0;
        if !detached {
            m.pending += 1;
        }
        let wmd = WireHandle {
            interface_cookie: inner.epoch,
            object_cookie: mdh.0,
        };
        let body = match op {
            Op::Put => MsgBody::Put {
                ack_wmd: if ack == AckReq::Ack {
                    wmd
                } else {
                    WireHandle::NONE
                },
                match_bits,
                hdr_data,
                ptl_index: portal,
                offset,
            },
            Op::Get => MsgBody::Get {
                return_wmd: wmd,
                match_bits,
                ptl_index: portal,
                src_offset: offset,
                sink_length: len.min(LNET_MTU),
            },
        };
        if wants_response {
            let deadline = Instant::now() + inner.cfg.response_timeout;
            m.awaiting = Some(Awaiting {
                kind: if op == Op::Get {
                    MsgType::Reply
                } else {
                    MsgType::Ack
                },
                deadline,
                peer: target.nid,
            });
            timers.insert(deadline, mdh.0);
        }
        let token = if detached {
            TxToken::Detached
        } else {
            TxToken::Initiator {
                md: mdh.0,
                ev: EvInfo {
                    target,
                    initiator: ProcessId::new(src_nid, inner.cfg.pid),
                    sender: src_nid,
                    pt_index: portal,
                    match_bits,
                    rlength: len,
                    mlength: len,
                    offset,
                    hdr_data,
                    msg_type: if op == Op::Put {
                        MsgType::Put
                    } else {
                        MsgType::Get
                    },
                },
            }
        };
        let hdr = Header {
            dest_nid: target.nid,
            src_nid,
            dest_pid: target.pid,
            src_pid: inner.cfg.pid,
            payload_length: plen,
            body,
        };
        if immediate {
            // A small PUT, or a GET (no payload), leaves from here at once
            // when the LND can take it: no TxMsg, no credits (it is not in
            // flight afterwards). A PUT's payload is copied out under the
            // container lock, and the LND called with no core lock held.
            // A buffer sized to the payload's class: the usual tiny
            // message zeroes 64 bytes of stack, not the whole cap.
            // Copied from the MD found above (no second lookup).
            let n = plen as usize;
            let unlink = unlink_now.then_some(mdh.0);
            let (mut small, mut big);
            let buf: &mut [u8] = if n <= SEND_NOW_SMALL {
                small = [0u8; SEND_NOW_SMALL];
                &mut small[..n]
            } else {
                big = [0u8; SEND_NOW_CAP];
                &mut big[..n]
            };
            m.mem.with(|b| b.copy_out(0, buf));
            inner.send_immediate(c, unlink, ni, &hdr, buf, token);
            return Ok(());
        }
        let mem = (op == Op::Put).then(|| m.mem.shared());
        let tx = inner.initiator_tx(hdr, ni, mem, plen as usize, token);
        let Container { mds, timers, .. } = &mut *c;
        timers.compact(mds);
        drop(c);
        match route {
            Some(_) => inner.send(tx),
            None => tx.complete(Err(Error::NoRoute(target.nid.to_string()))),
        }
        Ok(())
    }

    /// PUT the whole of bound MD `md` to `target` (`LNetPut`). Events: SEND
    /// when it left, then ACK (if asked for, and the target allows) or a
    /// timeout.
    #[allow(clippy::too_many_arguments)]
    pub fn put(
        &self,
        md: MdHandle,
        ack: AckReq,
        target: ProcessId,
        portal: u32,
        match_bits: u64,
        offset: u32,
        hdr_data: u64,
    ) -> Result<()> {
        self.initiate(
            md,
            Op::Put,
            ack,
            target,
            portal,
            match_bits,
            offset,
            hdr_data,
        )
    }

    /// GET up to the length of bound MD `md` from `target` (`LNetGet`).
    /// Events: SEND, then REPLY (or a timeout).
    pub fn get(
        &self,
        md: MdHandle,
        target: ProcessId,
        portal: u32,
        match_bits: u64,
        offset: u32,
    ) -> Result<()> {
        self.initiate(
            md,
            Op::Get,
            AckReq::NoAck,
            target,
            portal,
            match_bits,
            offset,
            0,
        )
    }

    /// Node counters; `msgs` is the sum of every NI's [`Self::ni_counters`].
    pub fn counters(&self) -> NodeCounterSnapshot {
        let mut msgs = CounterSnapshot::default();
        for n in self.inner.ni_counters() {
            msgs.add(&n);
        }
        self.inner.counters.snapshot(msgs)
    }

    /// Counters of the NI with NID `nid`: what its peer NIs sent and
    /// received, plus the NI's drops and the sends that never reached a
    /// peer. Summed when read (the message path counts each message once,
    /// on its peer NI, under that peer's lock).
    pub fn ni_counters(&self, nid: Nid) -> Option<CounterSnapshot> {
        let ni = self
            .inner
            .nis
            .iter()
            .position(|n| n.info.get().is_some_and(|i| i.nid == nid))?;
        Some(self.inner.ni_counters()[ni])
    }

    /// Credits of the NI with NID `nid`.
    pub fn ni_credits(&self, nid: Nid) -> Option<CreditSnapshot> {
        self.inner
            .nis
            .iter()
            .find(|n| n.info.get().is_some_and(|i| i.nid == nid))
            .map(|n| n.credits.snapshot(lock(&n.tx).queue.len()))
    }

    fn peer_ni_index(&self, peer: &Nid) -> usize {
        self.inner.route(peer).map_or(0, |r| r.0)
    }

    /// Counters of peer NI `peer` (on the NI that reaches it).
    ///
    /// A message is counted once the core has handled it, as LNet counts
    /// a message when it finalizes it: a PUT whose payload the LND had at
    /// hand ([`NiContext::parse_inline`](crate::NiContext::parse_inline))
    /// after its event, and after whatever that event's handler sent in
    /// answer; any other message when its header has been matched.
    pub fn peer_counters(&self, peer: Nid) -> Option<CounterSnapshot> {
        let ni = self.peer_ni_index(&peer);
        self.inner
            .peers
            .lock((ni, peer))
            .get()
            .map(|p| p.counters.snapshot())
    }

    /// Credits of peer NI `peer`.
    pub fn peer_credits(&self, peer: Nid) -> Option<CreditSnapshot> {
        let ni = self.peer_ni_index(&peer);
        self.inner
            .peers
            .lock((ni, peer))
            .get()
            .map(|p| CreditSnapshot {
                max: p.credits.max(),
                available: p.credits.available(),
                min: p.credits.min(),
                queued: p.queue.len(),
            })
    }

    /// True unless an LND reported `peer` down.
    pub fn peer_is_up(&self, peer: Nid) -> bool {
        let ni = self.peer_ni_index(&peer);
        self.inner.peers.lock((ni, peer)).get().is_none_or(|p| p.up)
    }

    /// Stop: every pending operation ends with an error event, every MD is
    /// unlinked (its buffer handed back), every NI stopped.
    pub fn shutdown(&self) {
        self.inner.shutdown();
        if let Some(h) = lock(&self.monitor).take() {
            let _ = h.join();
        }
    }
}

impl Drop for Lnet {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl std::fmt::Debug for Lnet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lnet")
            .field("nids", &self.nids())
            .field("pid", &self.pid())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn waiting(deadline: Instant) -> MdState {
        let mut m = Lnet::md_state(Md::new(vec![0u8; 1]), None);
        m.awaiting = Some(Awaiting {
            kind: MsgType::Ack,
            deadline,
            peer: Nid::LO,
        });
        m
    }

    #[test]
    fn response_deadlines_skip_answered_entries_and_stay_bounded() {
        let mut mds: MdTable<MdState> = MdTable::default();
        let mut t = Timers::default();
        let t0 = Instant::now();
        let mut kept = 0;
        // 10,000 operations, each answered before the next starts, as a
        // client issuing one RPC at a time does; one left unanswered.
        for i in 0..10_000u64 {
            let d = t0 + Duration::from_micros(i);
            let md = mds.insert(i, MAX_PORTALS, waiting(d)).unwrap();
            t.insert(d, md);
            t.compact(&mds);
            assert!(t.q.len() <= 2 * t.live + Timers::SLACK + 1);
            if i != 5_000 {
                mds.get_mut(md).unwrap().awaiting = None;
                t.remove();
            } else {
                kept = md;
            }
        }
        assert_eq!(t.live, 1);
        assert!(t.q.len() <= 2 + Timers::SLACK + 1, "{} entries", t.q.len());
        // Only the unanswered one is found due, and only once it is.
        assert_eq!(t.pop_due(t0 - Duration::from_secs(1)), None);
        let mut due = Vec::new();
        while let Some((d, md)) = t.pop_due(t0 + Duration::from_secs(1)) {
            if awaits(&mds, md, d) {
                due.push(md);
            }
        }
        assert_eq!(due, [kept]);
        assert!(t.q.is_empty());
    }
}
