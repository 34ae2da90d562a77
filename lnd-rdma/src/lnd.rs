//! The o2iblnd-compatible LND: connections over RDMA CM, messages over one
//! RC queue pair per peer, bulk by RDMA WRITE from the data source into the
//! sink, credits as the kernel keeps them.
//!
//! Threads per NI: a CM thread (connection events, on the event channel's
//! fd), a completion thread (spins briefly on the CQ, then sleeps on the
//! completion channel; also drains async device events) and a timer thread
//! (timeouts, keepalive NOOPs, reconnects). Nothing calls into the LNet core
//! while holding a connection lock.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use lnet::shard::ShardedMap;
use lnet::wire::{Header, MsgBody, MsgType};
use lnet::{Delivery, Error, Lnd, LndInfo, LndLimits, MemKey, Net, NetType, NiContext, Nid};
use lnet::{PeerEvent, Sink, TxMsg};
use tracing::{debug, info, warn};

use crate::plan::{Sge, plan_writes};
use crate::verbs::{CmEventKind, CmId, Completion, Device, EventChannel, Mr, QpCaps, SendWr};
use crate::wire::{
    self, Body, ConnParams, IMMEDIATE_MAX, IMMEDIATE_PAYLOAD, MSG_SIZE, Msg, RdmaDesc, RdmaFrag,
    Rej, reject,
};

const ENODATA: i32 = 61;
const EPROTO: i32 = 71;
const KIND_RECV: u64 = 0;
const KIND_SEND: u64 = 1;

/// Configuration of one RDMA NI.
#[derive(Clone, Debug)]
pub struct RdmaConfig {
    /// The IP address of the RDMA device's interface: the NID's address.
    pub addr: IpAddr,
    /// The network number (`o2ib<N>`).
    pub net_num: u16,
    /// The RDMA CM port to listen on and connect to (o2iblnd: 987).
    pub port: u16,
    /// Queue depth (peer credits) we offer.
    pub queue_depth: u16,
    /// Largest RDMA descriptor we accept.
    pub max_frags: u16,
    /// A message with no progress for this long fails and closes its
    /// connection (o2iblnd's `timeout`).
    pub timeout: Duration,
    /// Address/route resolution and connection establishment timeout.
    pub connect_timeout: Duration,
    /// Send a NOOP on a connection idle for this long (0: never).
    pub keepalive: Duration,
    /// Compute and send message checksums (received ones are always
    /// verified).
    pub checksum: bool,
    /// Most cached registrations of user memory.
    pub reg_cache: usize,
    /// Pre-registered bounce buffers (1 MiB each) for sinks of several
    /// fragments.
    pub bounce_buffers: usize,
    /// First reconnect delay after a failure (doubles up to the max).
    pub reconnect_min: Duration,
    /// Largest reconnect delay.
    pub reconnect_max: Duration,
    /// The QPs' local ACK timeout exponent (4.096 µs × 2^n before an
    /// unacknowledged packet is resent, up to `retry_count` times before
    /// the connection fails); `None` keeps RDMA CM's default. 19 (≈ 2 s)
    /// tolerates the stalls of emulated (soft-RoCE under QEMU) links.
    /// Environment: `LNET_RDMA_ACK_TIMEOUT`.
    pub ack_timeout: Option<u8>,
    /// How often the QPs resend unacknowledged packets (a timeout or a
    /// sequence-error NAK) before the connection fails, 0..=7 (o2iblnd's
    /// `retry_count`, 5). Soft-RoCE counts a NAK for packets it received
    /// out of order as a retry and treats 7 as "unlimited"; the soft-RoCE
    /// test harness sets 7 because a two-vCPU VM reorders rxe's packets.
    /// Environment: `LNET_RDMA_RETRY_COUNT`.
    pub retry_count: u8,
}

impl RdmaConfig {
    /// Defaults for the interface address `addr`, with the tunables that
    /// an environment variable names (as kernel module parameters would
    /// for o2iblnd) taken from it: `LNET_RDMA_RETRY_COUNT` (0..=7) and
    /// `LNET_RDMA_ACK_TIMEOUT` (exponent 0..=31). A value out of range or
    /// not a number is ignored with a warning.
    ///
    /// ```
    /// let cfg = lnd_rdma::RdmaConfig::new("10.0.0.1".parse().unwrap());
    /// assert_eq!(cfg.port, 987);
    /// assert!(cfg.retry_count <= 7);
    /// ```
    pub fn new(addr: IpAddr) -> RdmaConfig {
        let mut c = RdmaConfig::defaults(addr);
        if let Some(v) = env_tunable("LNET_RDMA_RETRY_COUNT", 7) {
            c.retry_count = v;
        }
        if let Some(v) = env_tunable("LNET_RDMA_ACK_TIMEOUT", 31) {
            c.ack_timeout = Some(v);
        }
        c
    }

    /// The built-in defaults, without looking at the environment.
    pub fn defaults(addr: IpAddr) -> RdmaConfig {
        RdmaConfig {
            addr,
            net_num: 0,
            port: wire::DEFAULT_PORT,
            queue_depth: wire::DEFAULT_QUEUE_DEPTH,
            max_frags: wire::MAX_FRAGS,
            timeout: Duration::from_secs(50),
            connect_timeout: Duration::from_secs(10),
            keepalive: Duration::from_secs(100),
            checksum: false,
            reg_cache: 256,
            bounce_buffers: 4,
            reconnect_min: Duration::from_millis(100),
            reconnect_max: Duration::from_secs(10),
            ack_timeout: Some(19),
            retry_count: 5,
        }
    }
}

/// A small numeric tunable from the environment, if set and valid.
fn env_tunable(name: &str, max: u8) -> Option<u8> {
    let v = std::env::var(name).ok()?;
    match parse_tunable(&v, max) {
        Some(n) => Some(n),
        None => {
            warn!("{name}={v:?} ignored: not a number in 0..={max}");
            None
        }
    }
}

fn parse_tunable(v: &str, max: u8) -> Option<u8> {
    v.trim().parse::<u8>().ok().filter(|n| *n <= max)
}

/// Counters of an RDMA NI.
#[derive(Debug, Default)]
pub struct RdmaStats {
    /// Connections established (both directions).
    pub conns_established: AtomicU64,
    /// Connections closed.
    pub conns_closed: AtomicU64,
    /// Connection requests we rejected.
    pub rejects_sent: AtomicU64,
    /// Rejects we received.
    pub rejects_received: AtomicU64,
    /// Reconnects after a parameter reject (queue depth / fragments).
    pub renegotiations: AtomicU64,
    /// Malformed or unexpected messages (each closes its connection).
    pub protocol_errors: AtomicU64,
    /// Operations timed out.
    pub timeouts: AtomicU64,
    /// NOOPs sent to return credits or keep alive.
    pub noops_sent: AtomicU64,
    /// Times a send waited for a peer credit.
    pub credit_waits: AtomicU64,
    /// RDMA WRITE work requests posted.
    pub rdma_writes: AtomicU64,
    /// Registrations made for user memory (cache misses).
    pub reg_misses: AtomicU64,
    /// Cached registrations reused.
    pub reg_hits: AtomicU64,
    /// Sinks received through a bounce buffer (several fragments).
    pub bounced: AtomicU64,
    /// Asynchronous device events seen.
    pub async_events: AtomicU64,
}

/// A point-in-time copy of [`RdmaStats`].
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RdmaStatsSnapshot {
    /// See [`RdmaStats`].
    pub conns_established: u64,
    /// See [`RdmaStats`].
    pub conns_closed: u64,
    /// See [`RdmaStats`].
    pub rejects_sent: u64,
    /// See [`RdmaStats`].
    pub rejects_received: u64,
    /// See [`RdmaStats`].
    pub renegotiations: u64,
    /// See [`RdmaStats`].
    pub protocol_errors: u64,
    /// See [`RdmaStats`].
    pub timeouts: u64,
    /// See [`RdmaStats`].
    pub noops_sent: u64,
    /// See [`RdmaStats`].
    pub credit_waits: u64,
    /// See [`RdmaStats`].
    pub rdma_writes: u64,
    /// See [`RdmaStats`].
    pub reg_misses: u64,
    /// See [`RdmaStats`].
    pub reg_hits: u64,
    /// See [`RdmaStats`].
    pub bounced: u64,
    /// See [`RdmaStats`].
    pub async_events: u64,
}

fn inc(a: &AtomicU64) {
    a.fetch_add(1, Ordering::Relaxed);
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A registered buffer we own (receive rings, message slots, bounce).
struct RegBuf {
    mr: Mr,
    buf: Vec<u8>,
}

impl RegBuf {
    fn new(dev: &Device, len: usize) -> std::io::Result<RegBuf> {
        let buf = vec![0u8; len];
        let mr = dev.reg(buf.as_ptr() as usize, len)?;
        Ok(RegBuf { mr, buf })
    }
    fn addr(&self) -> u64 {
        self.buf.as_ptr() as u64
    }
}

/// Memory that stays registered while an operation uses it.
enum Reg {
    /// Cached or pool registration (shared).
    Shared(#[allow(dead_code)] Arc<Mr>),
    /// A bounce buffer (returned to the pool on drop).
    Bounce(BounceBuf),
}

struct BounceBuf {
    buf: Option<RegBuf>,
    pool: Weak<Shared>,
}

impl Drop for BounceBuf {
    fn drop(&mut self) {
        if let (Some(b), Some(s)) = (self.buf.take(), self.pool.upgrade()) {
            let mut p = lock(&s.bounce);
            if p.len() < s.cfg.bounce_buffers {
                p.push(b);
            }
        }
    }
}

/// What a connection waits for, by cookie.
enum Waiting {
    /// Our PUT_REQ, waiting for PUT_ACK or PUT_NAK.
    PutSrc { tx: TxMsg, since: Instant },
    /// Our PUT_ACK, waiting for PUT_DONE.
    PutSink {
        sink: Sink,
        reg: Reg,
        since: Instant,
    },
    /// Our GET_REQ, waiting for GET_DONE.
    GetSink {
        tx: TxMsg,
        /// The REPLY's sink and its registration (none when the REPLY
        /// cannot land).
        sink: Option<Box<(Sink, Reg)>>,
        since: Instant,
    },
}

impl Waiting {
    fn since(&self) -> Instant {
        match self {
            Waiting::PutSrc { since, .. }
            | Waiting::PutSink { since, .. }
            | Waiting::GetSink { since, .. } => *since,
        }
    }
    fn fail(self, e: &Error) {
        match self {
            Waiting::PutSrc { tx, .. } => tx.complete(Err(e.clone())),
            Waiting::PutSink { sink, .. } => sink.complete(Err(e.clone())),
            Waiting::GetSink { tx, sink, .. } => {
                if let Some(b) = sink {
                    b.0.complete(Err(e.clone()));
                }
                tx.complete(Err(e.clone()));
            }
        }
    }
}

/// A message queued on a connection.
struct OutMsg {
    body: Body,
    /// IMMEDIATE payload source, or the LNet message this one completes.
    tx: Option<TxMsg>,
    /// Writes to post before the message (PUT_DONE / GET_DONE), and the
    /// registrations they use.
    writes: Vec<crate::plan::WriteWr>,
    regs: Vec<Reg>,
    /// Complete `tx` when this message's send completes.
    complete_on_send: bool,
}

/// A posted send, until its completion.
struct Posted {
    tx: Option<TxMsg>,
    _regs: Vec<Reg>,
    noop: bool,
    wrs: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Connecting,
    Established,
    Closed,
}

struct ConnState {
    state: State,
    params: ConnParams,
    peer_stamp: u64,
    credits: i32,
    outstanding: i32,
    reserved: i32,
    noops_posted: i32,
    queue_rsrvd: VecDeque<OutMsg>,
    queue_cred: VecDeque<OutMsg>,
    queue_nocred: VecDeque<OutMsg>,
    force_noop: bool,
    waiting: HashMap<u64, Waiting>,
    slots_free: Vec<u32>,
    posted: HashMap<u32, Posted>,
    posted_wrs: u32,
    posted_recvs: u32,
    last_send: Instant,
    started: Instant,
    active: bool,
    /// Message slots (registered); a slot is written only while free.
    txbuf: RegBuf,
}

/// CQ entries a connection holds; given back when it is dropped.
struct CqShare {
    n: u32,
    used: Arc<AtomicU32>,
}

impl Drop for CqShare {
    fn drop(&mut self) {
        self.used.fetch_sub(self.n, Ordering::AcqRel);
    }
}

struct Conn {
    // Field order is drop order: the QP goes before the buffers it used.
    cmid: CmId,
    _cq: CqShare,
    id: u32,
    peer: Nid,
    rx: RegBuf,
    nrx: u32,
    send_cap: u32,
    st: Mutex<ConnState>,
}

struct PeerState {
    /// The connection we send on (the newest).
    conn: Option<Arc<Conn>>,
    /// The peer's other connections of the same incarnation: o2iblnd keeps
    /// every connection a peer opens (a kernel with `conns_per_peer` > 1
    /// opens several), so we keep them too; they carry the peer's sends
    /// and complete what was posted on them. When `conn` closes, the
    /// newest of these takes its place.
    others: Vec<Arc<Conn>>,
    /// Messages waiting for a connection.
    queue: VecDeque<TxMsg>,
    /// Known incarnation (0: never connected).
    incarnation: u64,
    /// Parameters to offer (after a parameter reject).
    params: ConnParams,
    backoff: Duration,
    next_try: Option<Instant>,
    down_since: Option<Instant>,
    up: bool,
    /// A connect is being set up (between the decision to dial and
    /// `conn` being set): nobody else dials meanwhile.
    dialing: bool,
}

impl PeerState {
    /// Forget connection `c`: when it is the one we send on, the newest of
    /// the others takes its place. True when `c` was the one we sent on
    /// and none is left.
    fn forget(&mut self, c: &Arc<Conn>) -> bool {
        self.others.retain(|x| !Arc::ptr_eq(x, c));
        if !self.conn.as_ref().is_some_and(|x| Arc::ptr_eq(x, c)) {
            return false;
        }
        self.conn = self.others.pop();
        self.conn.is_none()
    }

    /// Make `c` the connection we send on; an established one it replaces
    /// stays among the others, one still being set up is returned.
    fn promote(&mut self, c: &Arc<Conn>) -> Option<Arc<Conn>> {
        if self.conn.as_ref().is_some_and(|x| Arc::ptr_eq(x, c)) {
            return None;
        }
        self.others.retain(|x| !Arc::ptr_eq(x, c));
        let old = self.conn.replace(c.clone())?;
        if lock(&old.st).state == State::Established {
            self.others.push(old);
            return None;
        }
        Some(old)
    }
}

struct CacheEntry {
    key: MemKey,
    mr: Arc<Mr>,
    used: u64,
}

pub(crate) struct Shared {
    cfg: RdmaConfig,
    nid: Nid,
    incarnation: u64,
    ni: OnceLock<NiContext>,
    chan: EventChannel,
    dev: OnceLock<Arc<Device>>,
    listener: Mutex<Option<CmId>>,
    /// By NID, sharded: a send locks one shard, not a lock every sending
    /// thread takes.
    peers: ShardedMap<Nid, PeerState>,
    conns: Mutex<HashMap<u32, Arc<Conn>>>,
    /// Closed connections waiting for their work requests to flush.
    zombies: Mutex<Vec<(Arc<Conn>, Instant)>>,
    next_conn: AtomicU32,
    next_cookie: AtomicU64,
    /// CQ entries the live connections may fill.
    cq_used: Arc<AtomicU32>,
    cache: Mutex<(Vec<CacheEntry>, u64)>,
    pools: Mutex<Vec<Arc<Mr>>>,
    bounce: Mutex<Vec<RegBuf>>,
    stop: AtomicBool,
    threads: Mutex<Vec<JoinHandle<()>>>,
    stats: RdmaStats,
}

/// The RDMA LND (one NI). Create it, register it with the node as the
/// `o2ib` NI, and it serves until the node shuts down.
///
/// ```no_run
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use lnd_rdma::{RdmaConfig, RdmaLnd};
/// let lnd = RdmaLnd::new(RdmaConfig::new("10.77.0.1".parse()?))?;
/// println!("NI {}", lnd.nid());
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct RdmaLnd {
    sh: Arc<Shared>,
}

impl std::fmt::Debug for RdmaLnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RdmaLnd({})", self.sh.nid)
    }
}

/// Why the LND could not start.
#[derive(Debug, thiserror::Error)]
pub enum RdmaError {
    /// A verbs or RDMA CM call failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The address is not on an RDMA device.
    #[error("no RDMA device has address {0} (devices: {1})")]
    NoDevice(IpAddr, String),
}

impl RdmaLnd {
    /// Bind the listener on `cfg.addr:cfg.port` and open the device's
    /// resources. Fails when the address is not on an RDMA device.
    pub fn new(cfg: RdmaConfig) -> Result<RdmaLnd, RdmaError> {
        let chan = EventChannel::new()?;
        let listener = CmId::new(&chan, 0)?;
        listener.set_reuseaddr();
        listener.bind(SocketAddr::new(cfg.addr, cfg.port))?;
        let ctx = listener.context_ptr();
        if ctx == 0 {
            return Err(RdmaError::NoDevice(
                cfg.addr,
                crate::verbs::device_names().join(", "),
            ));
        }
        let dev = Arc::new(Device::open(ctx, 32768)?);
        listener.listen(64)?;
        let nid = Nid::from_ip(Net::new(NetType::O2IBLND, cfg.net_num), cfg.addr);
        let incarnation = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64);
        let mut bounce = Vec::new();
        for _ in 0..cfg.bounce_buffers {
            bounce.push(RegBuf::new(&dev, lnet::LNET_MTU as usize)?);
        }
        info!(target: "net", %nid, device = %dev.name, port = cfg.port, "o2ib NI bound");
        let sh = Arc::new(Shared {
            cfg,
            nid,
            incarnation,
            ni: OnceLock::new(),
            chan,
            dev: OnceLock::new(),
            listener: Mutex::new(Some(listener)),
            peers: ShardedMap::default(),
            conns: Mutex::new(HashMap::new()),
            zombies: Mutex::new(Vec::new()),
            next_conn: AtomicU32::new(1),
            cq_used: Arc::new(AtomicU32::new(0)),
            next_cookie: AtomicU64::new(1),
            cache: Mutex::new((Vec::new(), 0)),
            pools: Mutex::new(Vec::new()),
            bounce: Mutex::new(bounce),
            stop: AtomicBool::new(false),
            threads: Mutex::new(Vec::new()),
            stats: RdmaStats::default(),
        });
        let _ = sh.dev.set(dev);
        Ok(RdmaLnd { sh })
    }

    /// This NI's NID.
    pub fn nid(&self) -> Nid {
        self.sh.nid
    }

    /// The RDMA device's name.
    pub fn device_name(&self) -> String {
        self.sh.dev().name.clone()
    }

    /// Register a memory pool once, so buffers from it never need a
    /// registration on the data path.
    pub fn register_pool(&self, pool: &lnet::pool::MemPool) -> std::io::Result<()> {
        let mr = self.sh.dev().reg(pool.base(), pool.size())?;
        lock(&self.sh.pools).push(Arc::new(mr));
        Ok(())
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> RdmaStatsSnapshot {
        let s = &self.sh.stats;
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        RdmaStatsSnapshot {
            conns_established: g(&s.conns_established),
            conns_closed: g(&s.conns_closed),
            rejects_sent: g(&s.rejects_sent),
            rejects_received: g(&s.rejects_received),
            renegotiations: g(&s.renegotiations),
            protocol_errors: g(&s.protocol_errors),
            timeouts: g(&s.timeouts),
            noops_sent: g(&s.noops_sent),
            credit_waits: g(&s.credit_waits),
            rdma_writes: g(&s.rdma_writes),
            reg_misses: g(&s.reg_misses),
            reg_hits: g(&s.reg_hits),
            bounced: g(&s.bounced),
            async_events: g(&s.async_events),
        }
    }

    /// Open one more connection to `peer` beside those it has, as a kernel
    /// o2iblnd with `conns_per_peer` > 1 does (tests play such a peer
    /// with it; we dial one connection per peer ourselves).
    #[doc(hidden)]
    pub fn dial_extra(&self, peer: Nid) {
        self.sh.dial(peer, true);
    }

    /// Connections to `peer` we hold: the one we send on and the others
    /// (established or being set up).
    pub fn conn_count(&self, peer: Nid) -> usize {
        let peers = self.sh.peers.lock(peer);
        peers
            .get()
            .map_or(0, |p| usize::from(p.conn.is_some()) + p.others.len())
    }

    /// The negotiated queue depth of the connection to `peer`, if one is
    /// established.
    pub fn conn_queue_depth(&self, peer: Nid) -> Option<u16> {
        let peers = self.sh.peers.lock(peer);
        let c = peers.get()?.conn.clone()?;
        let st = lock(&c.st);
        (st.state == State::Established).then_some(st.params.queue_depth)
    }
}

impl Lnd for RdmaLnd {
    fn net_type(&self) -> NetType {
        NetType::O2IBLND
    }

    fn startup(&self, ni: NiContext) -> Result<LndInfo, Error> {
        let _ = self.sh.ni.set(ni);
        let mut th = lock(&self.sh.threads);
        for (name, f) in [
            ("o2ib-cm", Shared::cm_loop as fn(&Arc<Shared>)),
            ("o2ib-cq", Shared::cq_loop),
            ("o2ib-timer", Shared::timer_loop),
        ] {
            let sh = self.sh.clone();
            th.push(
                std::thread::Builder::new()
                    .name(name.into())
                    .spawn(move || f(&sh))
                    .map_err(|e| Error::Network(format!("spawn {name}: {e}")))?,
            );
        }
        Ok(LndInfo {
            nid: self.sh.nid,
            limits: LndLimits {
                max_payload: lnet::LNET_MTU,
                eager_size: IMMEDIATE_MAX as u32,
                credits: 256,
                peer_credits: i32::from(self.sh.cfg.queue_depth),
                reply_inline: true,
                send_now_max: 0,
            },
        })
    }

    fn send(&self, tx: TxMsg) {
        self.sh.send_lnet(tx);
    }

    fn shutdown(&self) {
        let sh = &self.sh;
        sh.stop.store(true, Ordering::SeqCst);
        let conns: Vec<Arc<Conn>> = lock(&sh.conns).values().cloned().collect();
        for c in conns {
            sh.close(&c, Error::Shutdown);
        }
        let mut queued: Vec<TxMsg> = Vec::new();
        sh.peers
            .for_each_mut(|_, p| queued.extend(p.queue.drain(..)));
        for tx in queued {
            tx.complete(Err(Error::Shutdown));
        }
        let th: Vec<_> = lock(&sh.threads).drain(..).collect();
        for t in th {
            let _ = t.join();
        }
        // Give flushes a moment, then drop everything in order.
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline && !lock(&sh.zombies).is_empty() {
            sh.poll_cq_once();
            sh.reap(false);
            std::thread::sleep(Duration::from_millis(5));
        }
        sh.reap(true);
        lock(&sh.conns).clear();
        drop(sh.peers.drain());
        lock(&sh.cache).0.clear();
        lock(&sh.pools).clear();
        lock(&sh.bounce).clear();
        *lock(&sh.listener) = None;
    }
}

fn wr_id(kind: u64, conn: u32, idx: u32) -> u64 {
    (kind << 62) | (u64::from(conn) << 32) | u64::from(idx)
}

fn errno_err(status: i32, what: &str) -> Error {
    if status == -ENODATA {
        Error::Dropped
    } else {
        Error::Network(format!("{what}: peer status {status}"))
    }
}

impl Shared {
    fn dev(&self) -> &Arc<Device> {
        self.dev.get().expect("device opened in new()")
    }

    fn ni(&self) -> Option<&NiContext> {
        self.ni.get()
    }

    fn cookie(&self) -> u64 {
        self.next_cookie.fetch_add(1, Ordering::Relaxed)
    }

    fn new_peer(&self) -> PeerState {
        PeerState {
            conn: None,
            others: Vec::new(),
            queue: VecDeque::new(),
            incarnation: 0,
            params: self.my_params(),
            backoff: self.cfg.reconnect_min,
            next_try: None,
            down_since: None,
            up: false,
            dialing: false,
        }
    }

    fn my_params(&self) -> ConnParams {
        ConnParams {
            queue_depth: self.cfg.queue_depth,
            max_frags: self.cfg.max_frags,
            max_msg_size: MSG_SIZE as u32,
        }
    }

    // ---------------------------------------------------------------- send

    fn send_lnet(self: &Arc<Self>, tx: TxMsg) {
        if self.stop.load(Ordering::Relaxed) {
            tx.complete(Err(Error::Shutdown));
            return;
        }
        let peer = tx.peer();
        let conn = {
            let mut peers = self.peers.lock(peer);
            let p = peers.get_or_insert_with(|| self.new_peer());
            match &p.conn {
                Some(c) if lock(&c.st).state == State::Established => Some(c.clone()),
                _ => {
                    p.queue.push_back(tx);
                    let connecting = p.conn.is_some();
                    let waiting = p.next_try.is_some_and(|t| t > Instant::now());
                    drop(peers);
                    if !connecting && !waiting {
                        self.connect(peer);
                    }
                    return;
                }
            }
        };
        if let Some(c) = conn {
            self.launch(&c, tx);
        }
    }

    /// Turn an LNet message into o2iblnd messages on an established
    /// connection.
    fn launch(self: &Arc<Self>, c: &Arc<Conn>, tx: TxMsg) {
        let hdr = *tx.header();
        if hdr.msg_type() == MsgType::Get {
            // The REPLY's sink, now: its descriptor travels in GET_REQ.
            let rh = reply_header(&hdr);
            let Some(ni) = self.ni() else {
                tx.complete(Err(Error::Shutdown));
                return;
            };
            let (sink, rd) = match ni.parse(&rh, tx.peer()) {
                Delivery::Receive(mut s) => match self.sink_rd(&mut s) {
                    Ok((reg, rd)) => (Some(Box::new((s, reg))), rd),
                    Err(e) => {
                        s.complete(Err(e.clone()));
                        tx.complete(Err(e));
                        return;
                    }
                },
                _ => (None, RdmaDesc::default()),
            };
            let rd = if rd.frags.is_empty() {
                // Nothing can land (zero-length MD): a descriptor of one
                // empty fragment, which the kernel accepts.
                RdmaDesc {
                    key: 0,
                    frags: vec![RdmaFrag { nob: 0, addr: 0 }],
                }
            } else {
                rd
            };
            let cookie = self.cookie();
            let out = OutMsg {
                body: Body::GetReq { hdr, cookie, rd },
                tx: None,
                writes: vec![],
                regs: vec![],
                complete_on_send: false,
            };
            let mut st = lock(&c.st);
            st.waiting.insert(
                cookie,
                Waiting::GetSink {
                    tx,
                    sink,
                    since: Instant::now(),
                },
            );
            st.queue_rsrvd.push_back(out);
            drop(st);
            self.check_sends(c);
            return;
        }
        if tx.payload_len() <= IMMEDIATE_MAX {
            let out = OutMsg {
                body: Body::Immediate { hdr },
                tx: Some(tx),
                writes: vec![],
                regs: vec![],
                complete_on_send: true,
            };
            lock(&c.st).queue_cred.push_back(out);
        } else {
            let cookie = self.cookie();
            let mut st = lock(&c.st);
            st.waiting.insert(
                cookie,
                Waiting::PutSrc {
                    tx,
                    since: Instant::now(),
                },
            );
            st.queue_rsrvd.push_back(OutMsg {
                body: Body::PutReq { hdr, cookie },
                tx: None,
                writes: vec![],
                regs: vec![],
                complete_on_send: false,
            });
        }
        self.check_sends(c);
    }

    /// Post what credits, slots and the send queue allow.
    fn check_sends(self: &Arc<Self>, c: &Arc<Conn>) {
        let mut failed: Option<String> = None;
        let mut done: Vec<TxMsg> = Vec::new();
        {
            let mut st = lock(&c.st);
            if st.state != State::Established {
                return;
            }
            let hiw = (i32::from(st.params.queue_depth) / 2).max(1);
            loop {
                while st.reserved > 0 {
                    let Some(m) = st.queue_rsrvd.pop_front() else {
                        break;
                    };
                    st.reserved -= 1;
                    st.queue_cred.push_back(m);
                }
                if st.slots_free.is_empty() || st.posted_wrs >= c.send_cap {
                    break;
                }
                let msg = if !st.queue_nocred.is_empty() {
                    let need = 1 + st.queue_nocred[0].writes.len() as u32;
                    if st.posted_wrs + need > c.send_cap {
                        break;
                    }
                    st.queue_nocred.pop_front()
                } else if !st.queue_cred.is_empty() && st.credits > 0 {
                    st.credits -= 1;
                    st.queue_cred.pop_front()
                } else {
                    if !st.queue_cred.is_empty() {
                        inc(&self.stats.credit_waits);
                    }
                    let need = st.outstanding >= hiw || st.force_noop;
                    if need && st.noops_posted < 2 {
                        st.force_noop = false;
                        st.noops_posted += 1;
                        inc(&self.stats.noops_sent);
                        Some(OutMsg {
                            body: Body::Noop,
                            tx: None,
                            writes: vec![],
                            regs: vec![],
                            complete_on_send: false,
                        })
                    } else {
                        None
                    }
                };
                let Some(m) = msg else { break };
                if let Err(e) = self.post_msg(c, &mut st, m, &mut done) {
                    failed = Some(e);
                    break;
                }
            }
        }
        for tx in done {
            tx.complete(Err(Error::Network("message could not be encoded".into())));
        }
        if let Some(e) = failed {
            self.close(c, Error::Network(e));
        }
    }

    fn post_msg(
        &self,
        c: &Conn,
        st: &mut ConnState,
        m: OutMsg,
        bad: &mut Vec<TxMsg>,
    ) -> Result<(), String> {
        let slot = st.slots_free.pop().expect("checked");
        let off = slot as usize * MSG_SIZE;
        let credits = st.outstanding.clamp(0, 255);
        let msg = Msg {
            version: wire::VERSION_2,
            credits: credits as u8,
            srcnid: self.nid,
            srcstamp: self.incarnation,
            dstnid: c.peer,
            dststamp: st.peer_stamp,
            body: m.body,
        };
        // The slot is ours until its send completes (taken from the free
        // list under the connection's lock).
        let (tx_addr, tx_lkey) = (st.txbuf.addr(), st.txbuf.mr.lkey);
        let buf = &mut st.txbuf.buf[off..off + MSG_SIZE];
        let plen = match (&msg.body, &m.tx) {
            (Body::Immediate { .. }, Some(tx)) => {
                let n = tx.payload_len();
                tx.copy_payload_to(0, &mut buf[IMMEDIATE_PAYLOAD..IMMEDIATE_PAYLOAD + n]);
                n
            }
            _ => 0,
        };
        let nob = match msg.encode(buf, plen, self.cfg.checksum) {
            Ok(n) => n,
            Err(e) => {
                warn!(target: "neterror", peer = %c.peer, "encode: {e}");
                st.slots_free.push(slot);
                if let Some(tx) = m.tx {
                    bad.push(tx);
                }
                return Ok(());
            }
        };
        st.outstanding -= credits;
        let sges: Vec<Vec<Sge>> = m.writes.iter().map(|w| w.sges.clone()).collect();
        let mut wrs: Vec<SendWr<'_>> = m
            .writes
            .iter()
            .zip(sges.iter())
            .map(|(w, s)| SendWr {
                wr_id: wr_id(KIND_SEND, c.id, u32::MAX),
                sges: s,
                remote: Some((w.remote_addr, w.rkey)),
                signaled: false,
            })
            .collect();
        let msg_sge = [(tx_addr + off as u64, nob as u32, tx_lkey)];
        wrs.push(SendWr {
            wr_id: wr_id(KIND_SEND, c.id, slot),
            sges: &msg_sge,
            remote: None,
            signaled: true,
        });
        let n = wrs.len() as u32;
        self.stats
            .rdma_writes
            .fetch_add(u64::from(n - 1), Ordering::Relaxed);
        let noop = matches!(msg.body, Body::Noop);
        let posted = Posted {
            tx: if m.complete_on_send { m.tx } else { None },
            _regs: m.regs,
            noop,
            wrs: n,
        };
        match c.cmid.post_send(&wrs) {
            Ok(()) => {
                st.posted.insert(slot, posted);
                st.posted_wrs += n;
                st.last_send = Instant::now();
                Ok(())
            }
            Err(e) => {
                st.slots_free.push(slot);
                if let Some(tx) = posted.tx {
                    bad.push(tx);
                }
                Err(format!("post_send: {e}"))
            }
        }
    }

    // ------------------------------------------------------ registration

    /// Registration covering [addr, addr+len): a registered pool, the
    /// cache (keyed by the MD's memory identity), or a new entry.
    fn reg_for(&self, key: Option<&MemKey>, addr: usize, len: usize) -> Result<Arc<Mr>, Error> {
        if let Some(mr) = lock(&self.pools).iter().find(|m| m.covers(addr, len)) {
            return Ok(mr.clone());
        }
        let Some(key) = key else {
            return Err(Error::Network("unregistrable memory".into()));
        };
        let mut cache = lock(&self.cache);
        cache.1 += 1;
        let now = cache.1;
        if let Some(e) = cache
            .0
            .iter_mut()
            .find(|e| e.key.same(key) && e.key.is_live() && e.mr.covers(addr, len))
        {
            e.used = now;
            inc(&self.stats.reg_hits);
            return Ok(e.mr.clone());
        }
        inc(&self.stats.reg_misses);
        // Whole pages: those holding the buffer are mapped.
        let page = 4096usize;
        let start = addr & !(page - 1);
        let end = (addr + len.max(1)).div_ceil(page) * page;
        let mr = Arc::new(
            self.dev()
                .reg(start, end - start)
                .map_err(|e| Error::Network(format!("memory registration: {e}")))?,
        );
        cache.0.retain(|e| e.key.is_live());
        if cache.0.len() >= self.cfg.reg_cache.max(1) {
            // Evict the least recently used entry no operation holds.
            if let Some(i) = cache
                .0
                .iter()
                .enumerate()
                .filter(|(_, e)| Arc::strong_count(&e.mr) == 1)
                .min_by_key(|(_, e)| e.used)
                .map(|(i, _)| i)
            {
                cache.0.swap_remove(i);
            }
        }
        if cache.0.len() < self.cfg.reg_cache.max(1) {
            cache.0.push(CacheEntry {
                key: key.clone(),
                mr: mr.clone(),
                used: now,
            });
        }
        Ok(mr)
    }

    /// Register a sink and describe it for the peer: one fragment of the
    /// MD's memory directly, several through a bounce buffer.
    fn sink_rd(self: &Arc<Self>, s: &mut Sink) -> Result<(Reg, RdmaDesc), Error> {
        let frags = s.raw_fragments();
        let frags: Vec<(usize, usize)> = frags.into_iter().filter(|f| f.1 > 0).collect();
        if frags.len() <= 1 {
            let (addr, len) = frags.first().copied().unwrap_or((0, 0));
            if len == 0 {
                return Ok((
                    Reg::Bounce(BounceBuf {
                        buf: None,
                        pool: Weak::new(),
                    }),
                    RdmaDesc {
                        key: 0,
                        frags: vec![RdmaFrag { nob: 0, addr: 0 }],
                    },
                ));
            }
            let mr = self.reg_for(s.mem_key().as_ref(), addr, len)?;
            let rd = RdmaDesc {
                key: mr.rkey,
                frags: vec![RdmaFrag {
                    nob: len as u32,
                    addr: addr as u64,
                }],
            };
            return Ok((Reg::Shared(mr), rd));
        }
        inc(&self.stats.bounced);
        let len = s.mlength();
        let buf = match lock(&self.bounce).pop() {
            Some(b) => b,
            None => RegBuf::new(self.dev(), lnet::LNET_MTU as usize)
                .map_err(|e| Error::Network(format!("bounce registration: {e}")))?,
        };
        let rd = RdmaDesc {
            key: buf.mr.rkey,
            frags: vec![RdmaFrag {
                nob: len as u32,
                addr: buf.addr(),
            }],
        };
        Ok((
            Reg::Bounce(BounceBuf {
                buf: Some(buf),
                pool: Arc::downgrade(self),
            }),
            rd,
        ))
    }

    /// SGEs for a message's payload (registering as needed).
    fn source_sges(&self, tx: &TxMsg) -> Result<(Vec<Sge>, Vec<Reg>), Error> {
        let key = tx.mem_key();
        let mut sges = Vec::new();
        let mut regs = Vec::new();
        for (addr, len) in tx.raw_fragments() {
            if len == 0 {
                continue;
            }
            let mr = self.reg_for(key.as_ref(), addr, len)?;
            sges.push((addr as u64, len as u32, mr.lkey));
            regs.push(Reg::Shared(mr));
        }
        Ok((sges, regs))
    }

    /// Queue the RDMA writes of `tx`'s payload into `rd`, then `done`
    /// (PUT_DONE or GET_DONE) carrying the byte count.
    fn queue_rdma(
        self: &Arc<Self>,
        c: &Arc<Conn>,
        tx: TxMsg,
        rd: &RdmaDesc,
        put: bool,
        cookie: u64,
    ) {
        let (writes, regs, status) = match self.source_sges(&tx) {
            Ok((sges, regs)) => {
                let (w, n) = plan_writes(&sges, rd, c.send_cap.min(self.dev().max_sge) as usize);
                (w, regs, n as i32)
            }
            Err(e) => {
                warn!(target: "neterror", peer = %c.peer, "source registration: {e}");
                (vec![], vec![], -EPROTO)
            }
        };
        let body = if put {
            Body::PutDone { cookie, status }
        } else {
            Body::GetDone { cookie, status }
        };
        lock(&c.st).queue_nocred.push_back(OutMsg {
            body,
            tx: Some(tx),
            writes,
            regs,
            complete_on_send: true,
        });
        self.check_sends(c);
    }

    fn queue_nocred(self: &Arc<Self>, c: &Arc<Conn>, body: Body) {
        lock(&c.st).queue_nocred.push_back(OutMsg {
            body,
            tx: None,
            writes: vec![],
            regs: vec![],
            complete_on_send: false,
        });
        self.check_sends(c);
    }

    fn give_credit(self: &Arc<Self>, c: &Arc<Conn>) {
        lock(&c.st).outstanding += 1;
        self.check_sends(c);
    }

    // ------------------------------------------------------------ receive

    fn cq_loop(self: &Arc<Self>) {
        let mut idle_since = Instant::now();
        let mut last_async = Instant::now();
        while !self.stop.load(Ordering::Relaxed) {
            if self.poll_cq_once() > 0 {
                idle_since = Instant::now();
                continue;
            }
            if last_async.elapsed() > Duration::from_millis(100) {
                last_async = Instant::now();
                if crate::verbs::wait_readable(self.dev().async_fd(), Duration::ZERO) {
                    for e in self.dev().async_events() {
                        inc(&self.stats.async_events);
                        warn!(target: "neterror", device = %self.dev().name, "async event: {e}");
                    }
                }
            }
            if idle_since.elapsed() < Duration::from_micros(50) {
                std::hint::spin_loop();
                continue;
            }
            if self.dev().arm().is_err() {
                std::thread::sleep(Duration::from_millis(1));
                continue;
            }
            if self.poll_cq_once() > 0 {
                idle_since = Instant::now();
                continue;
            }
            self.dev().wait(Duration::from_millis(50));
            idle_since = Instant::now() - Duration::from_micros(40);
        }
    }

    fn poll_cq_once(self: &Arc<Self>) -> usize {
        let mut wcs = [Completion::default(); 32];
        let n = self.dev().poll(&mut wcs).unwrap_or(0);
        if n == 0 {
            return 0;
        }
        for wc in &wcs[..n] {
            self.completion(*wc);
        }
        self.reap(false);
        n
    }

    fn conn_by_id(&self, id: u32) -> Option<Arc<Conn>> {
        if let Some(c) = lock(&self.conns).get(&id) {
            return Some(c.clone());
        }
        lock(&self.zombies)
            .iter()
            .find(|(c, _)| c.id == id)
            .map(|(c, _)| c.clone())
    }

    fn completion(self: &Arc<Self>, wc: Completion) {
        let kind = wc.wr_id >> 62;
        let cid = ((wc.wr_id >> 32) & 0x3fff_ffff) as u32;
        let idx = wc.wr_id as u32;
        let Some(c) = self.conn_by_id(cid) else {
            return;
        };
        // Status 5 is a flush (the QP already went to error); anything
        // else is the first sign of trouble and worth an operator's eye.
        if !wc.ok && wc.status != 5 {
            warn!(target: "neterror", peer = %c.peer, status = wc.status, recv = kind == KIND_RECV, "work request failed");
        }
        if kind == KIND_RECV {
            lock(&c.st).posted_recvs -= 1;
            if !wc.ok {
                // Flushes of a connection still being set up (rejected or
                // failed) are expected: the CM event decides its fate.
                if lock(&c.st).state == State::Established {
                    debug!(target: "net", peer = %c.peer, status = wc.status, "receive failed");
                    self.close(
                        &c,
                        Error::Network(format!("receive failed (wc {})", wc.status)),
                    );
                }
                return;
            }
            self.handle_rx(&c, idx, wc.len as usize);
            return;
        }
        // A send (signaled message; its writes went before it).
        let posted = {
            let mut st = lock(&c.st);
            let p = st.posted.remove(&idx);
            if let Some(p) = &p {
                st.posted_wrs -= p.wrs;
                st.slots_free.push(idx);
                if p.noop {
                    st.noops_posted -= 1;
                }
            }
            p
        };
        if let Some(p) = posted {
            if let Some(tx) = p.tx {
                tx.complete(if wc.ok {
                    Ok(())
                } else {
                    Err(Error::Network(format!("send failed (wc {})", wc.status)))
                });
            }
        }
        if !wc.ok {
            if lock(&c.st).state == State::Established {
                self.close(
                    &c,
                    Error::Network(format!("send failed (wc {})", wc.status)),
                );
            }
        } else {
            self.check_sends(&c);
        }
    }

    fn repost(&self, c: &Conn, idx: u32) -> bool {
        let mut st = lock(&c.st);
        if st.state == State::Closed {
            return false;
        }
        let off = idx as usize * MSG_SIZE;
        match c.cmid.post_recv(
            wr_id(KIND_RECV, c.id, idx),
            c.rx.addr() + off as u64,
            MSG_SIZE as u32,
            c.rx.mr.lkey,
        ) {
            Ok(()) => {
                st.posted_recvs += 1;
                true
            }
            Err(_) => false,
        }
    }

    fn protocol_error(self: &Arc<Self>, c: &Arc<Conn>, why: String) {
        inc(&self.stats.protocol_errors);
        warn!(target: "neterror", peer = %c.peer, "protocol error: {why}");
        self.close(c, Error::Network(format!("protocol error: {why}")));
    }

    /// The operation `cookie` names, if `fits` accepts it; otherwise a
    /// protocol error (the connection closes) and `None`. `rsrvd`: the
    /// message gives back a reserved credit (PUT_ACK, PUT_NAK, GET_DONE).
    fn take_waiting(
        self: &Arc<Self>,
        c: &Arc<Conn>,
        cookie: u64,
        rsrvd: bool,
        what: &str,
        fits: fn(&Waiting) -> bool,
    ) -> Option<Waiting> {
        let w = {
            let mut st = lock(&c.st);
            if rsrvd {
                st.reserved += 1;
            }
            st.waiting.remove(&cookie)
        };
        match w {
            Some(w) if fits(&w) => Some(w),
            Some(other) => {
                other.fail(&Error::Network(format!("unexpected {what}")));
                self.protocol_error(c, format!("{what} for another kind of operation"));
                None
            }
            None => {
                self.protocol_error(c, format!("{what} with unknown cookie"));
                None
            }
        }
    }

    /// One received message, read in place from its receive buffer. The
    /// buffer is reposted as soon as what we need of it is taken: at once
    /// after decoding, or for IMMEDIATE after its payload went straight
    /// into the matched MD (copied only when a lazy portal defers it);
    /// credits are given back only after the repost.
    fn handle_rx(self: &Arc<Self>, c: &Arc<Conn>, idx: u32, len: usize) {
        let off = idx as usize * MSG_SIZE;
        let buf = &c.rx.buf[off..off + len.min(MSG_SIZE)];
        let (msg, prange) = match Msg::decode(buf) {
            Ok(m) => m,
            Err(e) => return self.protocol_error(c, e.to_string()),
        };
        let (expect_stamp, qd) = {
            let st = lock(&c.st);
            (st.peer_stamp, st.params.queue_depth)
        };
        if msg.srcnid != c.peer
            || msg.dstnid != self.nid
            || msg.dststamp != self.incarnation
            || msg.srcstamp != expect_stamp
        {
            return self.protocol_error(c, "stale or misaddressed message".into());
        }
        if msg.credits > 0 {
            let mut st = lock(&c.st);
            if st.credits + i32::from(msg.credits) > i32::from(qd) {
                drop(st);
                return self.protocol_error(c, format!("bad credits {}", msg.credits));
            }
            st.credits += i32::from(msg.credits);
            drop(st);
            self.check_sends(c);
        }
        let Some(ni) = self.ni().cloned() else { return };
        if let Body::Immediate { hdr } = &msg.body {
            let Some(payload) = buf[prange].get(..hdr.payload_length as usize) else {
                return self.protocol_error(c, "IMMEDIATE shorter than its header".into());
            };
            match ni.parse(hdr, c.peer) {
                Delivery::Deferred(w) => {
                    let (sh, conn, p) = (self.clone(), c.clone(), payload.to_vec());
                    w.on_ready(move |d| sh.immediate_delivery(&conn, d, &p));
                }
                d => self.immediate_delivery(c, d, payload),
            }
            if self.repost(c, idx) {
                self.give_credit(c);
            }
            return;
        }
        if !self.repost(c, idx) {
            return;
        }
        match msg.body {
            Body::Noop | Body::Immediate { .. } => {}
            Body::PutReq { hdr, cookie } => {
                let sh = self.clone();
                let conn = c.clone();
                deliver(ni.parse(&hdr, c.peer), move |d| {
                    sh.put_req_delivery(&conn, d, cookie)
                });
            }
            Body::PutAck {
                src_cookie,
                dst_cookie,
                rd,
            } => {
                let Some(Waiting::PutSrc { tx, .. }) =
                    self.take_waiting(c, src_cookie, true, "PUT_ACK", |w| {
                        matches!(w, Waiting::PutSrc { .. })
                    })
                else {
                    return;
                };
                if rd.frags.len() > usize::from(self.cfg.max_frags) {
                    tx.complete(Err(Error::Network("sink descriptor too large".into())));
                    return self.protocol_error(c, "PUT_ACK with too many frags".into());
                }
                self.queue_rdma(c, tx, &rd, true, dst_cookie);
                self.check_sends(c);
            }
            Body::PutNak { cookie, status } => {
                let Some(Waiting::PutSrc { tx, .. }) =
                    self.take_waiting(c, cookie, true, "PUT_NAK", |w| {
                        matches!(w, Waiting::PutSrc { .. })
                    })
                else {
                    return;
                };
                tx.complete(if status >= 0 {
                    Ok(())
                } else {
                    Err(errno_err(status, "PUT refused"))
                });
                self.check_sends(c);
            }
            Body::PutDone { cookie, status } => {
                let Some(Waiting::PutSink { sink, reg, .. }) =
                    self.take_waiting(c, cookie, false, "PUT_DONE", |w| {
                        matches!(w, Waiting::PutSink { .. })
                    })
                else {
                    return;
                };
                finish_sink(sink, reg, status);
                self.give_credit(c);
            }
            Body::GetReq { hdr, cookie, rd } => {
                if hdr.msg_type() != MsgType::Get {
                    return self.protocol_error(c, "GET_REQ without a GET header".into());
                }
                let sh = self.clone();
                let conn = c.clone();
                deliver(ni.parse(&hdr, c.peer), move |d| {
                    sh.get_req_delivery(&conn, d, cookie, rd)
                });
                self.give_credit(c);
            }
            Body::GetDone { cookie, status } => {
                let Some(Waiting::GetSink { tx, sink, .. }) =
                    self.take_waiting(c, cookie, true, "GET_DONE", |w| {
                        matches!(w, Waiting::GetSink { .. })
                    })
                else {
                    return;
                };
                tx.complete(Ok(()));
                if let Some(b) = sink {
                    let (s, r) = *b;
                    finish_sink(s, r, status);
                }
                self.check_sends(c);
            }
            Body::ConnReq(_) | Body::ConnAck(_) => {
                self.protocol_error(c, "connection message on an open connection".into());
            }
        }
    }

    fn immediate_delivery(self: &Arc<Self>, c: &Arc<Conn>, d: Delivery, payload: &[u8]) {
        match d {
            Delivery::Receive(mut s) => {
                s.write_at(0, &payload[..s.mlength().min(payload.len())]);
                s.complete(Ok(()));
            }
            Delivery::Reply(tx) => {
                // A small GET sent as IMMEDIATE (the kernel does): the
                // REPLY goes back as an ordinary message.
                if lock(&c.st).state == State::Established {
                    self.launch(c, tx);
                } else {
                    tx.complete(Err(Error::PeerDown(c.peer.to_string())));
                }
            }
            Delivery::Discard(_) | Delivery::Done | Delivery::Deferred(_) => {}
        }
    }

    fn put_req_delivery(self: &Arc<Self>, c: &Arc<Conn>, d: Delivery, cookie: u64) {
        match d {
            Delivery::Receive(mut s) if s.mlength() > 0 => match self.sink_rd(&mut s) {
                Ok((reg, rd)) => {
                    let dst_cookie = self.cookie();
                    lock(&c.st).waiting.insert(
                        dst_cookie,
                        Waiting::PutSink {
                            sink: s,
                            reg,
                            since: Instant::now(),
                        },
                    );
                    // The PUT_REQ's credit returns with PUT_DONE.
                    self.queue_nocred(
                        c,
                        Body::PutAck {
                            src_cookie: cookie,
                            dst_cookie,
                            rd,
                        },
                    );
                }
                Err(e) => {
                    s.complete(Err(e));
                    self.queue_nocred(
                        c,
                        Body::PutNak {
                            cookie,
                            status: -ENODATA,
                        },
                    );
                    self.give_credit(c);
                }
            },
            Delivery::Receive(s) => {
                s.complete(Ok(()));
                self.queue_nocred(c, Body::PutNak { cookie, status: 0 });
                self.give_credit(c);
            }
            other => {
                if let Delivery::Reply(tx) = other {
                    tx.complete(Err(Error::Network("PUT_REQ carried a GET".into())));
                }
                self.queue_nocred(
                    c,
                    Body::PutNak {
                        cookie,
                        status: -ENODATA,
                    },
                );
                self.give_credit(c);
            }
        }
    }

    fn get_req_delivery(self: &Arc<Self>, c: &Arc<Conn>, d: Delivery, cookie: u64, rd: RdmaDesc) {
        match d {
            Delivery::Reply(tx) => self.queue_rdma(c, tx, &rd, false, cookie),
            Delivery::Receive(s) => {
                s.complete(Err(Error::Network("GET_REQ delivered as a receive".into())));
                self.queue_nocred(
                    c,
                    Body::GetDone {
                        cookie,
                        status: -ENODATA,
                    },
                );
            }
            _ => self.queue_nocred(
                c,
                Body::GetDone {
                    cookie,
                    status: -ENODATA,
                },
            ),
        }
    }

    // ----------------------------------------------------- connections

    fn new_conn(
        self: &Arc<Self>,
        cmid: CmId,
        id: u32,
        peer: Nid,
        params: ConnParams,
        active: bool,
    ) -> Result<Arc<Conn>, String> {
        let qd = u32::from(params.queue_depth.max(1));
        let nrx = qd * 2 + 2;
        let nslots = qd * 3 + 4;
        let dev = self.dev();
        let send_cap = 256u32.max(qd * 4);
        // Every work request of every connection must fit the shared CQ:
        // refuse a connection that could overflow it.
        let need = send_cap + 8 + nrx;
        let used = self.cq_used.fetch_add(need, Ordering::AcqRel) + need;
        let cq = CqShare {
            n: need,
            used: self.cq_used.clone(),
        };
        if used > dev.cqe {
            return Err(format!(
                "completion queue full ({} entries): too many connections",
                dev.cqe
            ));
        }
        let rx = RegBuf::new(dev, nrx as usize * MSG_SIZE).map_err(|e| e.to_string())?;
        let txbuf = RegBuf::new(dev, nslots as usize * MSG_SIZE).map_err(|e| e.to_string())?;
        Ok(Arc::new(Conn {
            cmid,
            _cq: cq,
            id,
            peer,
            rx,
            nrx,
            send_cap,
            st: Mutex::new(ConnState {
                state: State::Connecting,
                params,
                peer_stamp: 0,
                credits: 0,
                outstanding: 0,
                reserved: 0,
                noops_posted: 0,
                queue_rsrvd: VecDeque::new(),
                queue_cred: VecDeque::new(),
                queue_nocred: VecDeque::new(),
                force_noop: false,
                waiting: HashMap::new(),
                slots_free: (0..nslots).rev().collect(),
                posted: HashMap::new(),
                posted_wrs: 0,
                posted_recvs: 0,
                last_send: Instant::now(),
                started: Instant::now(),
                active,
                txbuf,
            }),
        }))
    }

    /// Create the QP on a connection's id and pre-post every receive.
    fn setup_qp(&self, c: &Arc<Conn>) -> Result<(), String> {
        if c.cmid.context_ptr() != self.dev().context_ptr() {
            return Err("connection is on another RDMA device".into());
        }
        let caps = QpCaps {
            send_wr: c.send_cap + 8,
            recv_wr: c.nrx,
            send_sge: self.dev().max_sge,
        };
        c.cmid
            .create_qp(self.dev(), caps)
            .map_err(|e| e.to_string())?;
        for i in 0..c.nrx {
            if !self.repost(c, i) {
                return Err("posting receives failed".into());
            }
        }
        Ok(())
    }

    fn connect(self: &Arc<Self>, peer: Nid) {
        self.dial(peer, false);
    }

    /// Dial `peer`; `extra`: one more connection beside those it has (what
    /// a kernel o2iblnd with `conns_per_peer` > 1 does; tests use it to
    /// play that peer).
    fn dial(self: &Arc<Self>, peer: Nid, extra: bool) {
        let Some(ip) = peer.ip() else {
            self.fail_peer(peer, Error::NoRoute(format!("{peer} has no IP address")));
            return;
        };
        // Decide and mark under the peers lock: the send path, the timer
        // and a reject's retry may all want to dial at once, and two
        // connections would make the peer replace the first (failing what
        // was already posted on it).
        let params = {
            let mut peers = self.peers.lock(peer);
            let p = peers.get_or_insert_with(|| self.new_peer());
            if !extra {
                if p.conn.is_some() || p.dialing {
                    return;
                }
                p.dialing = true;
            }
            p.params
        };
        let id = self.next_conn.fetch_add(1, Ordering::Relaxed) & 0x3fff_ffff;
        // The connection is in the maps before resolution starts, so its
        // first CM event always finds it.
        let conn = CmId::new(&self.chan, u64::from(id))
            .map_err(|e| e.to_string())
            .and_then(|cmid| self.new_conn(cmid, id, peer, params, true));
        let c = match conn {
            Ok(c) => c,
            Err(e) => {
                if let Some(p) = self.peers.lock(peer).get_mut() {
                    if !extra {
                        p.dialing = false;
                    }
                }
                warn!(target: "neterror", %peer, "connect: {e}");
                self.conn_failed(peer, None, Error::Network(e));
                return;
            }
        };
        debug!(target: "net", %peer, conn = id, "connecting");
        lock(&self.conns).insert(id, c.clone());
        if !extra {
            let mut peers = self.peers.lock(peer);
            let p = peers.get_or_insert_with(|| self.new_peer());
            p.dialing = false;
            match &p.conn {
                // The peer connected to us meanwhile: use that one.
                Some(_) => {
                    drop(peers);
                    self.discard(&c);
                    return;
                }
                None => p.conn = Some(c.clone()),
            }
        }
        // Short resolution attempts, retried until the connect timeout: a
        // neighbour update the CM misses costs one attempt, not the whole
        // connect timeout.
        let attempt = self.cfg.connect_timeout.min(Duration::from_secs(1));
        if let Err(e) = c.cmid.resolve_addr(
            SocketAddr::new(self.cfg.addr, 0),
            SocketAddr::new(ip, self.cfg.port),
            attempt,
        ) {
            self.conn_failed(peer, Some(&c), Error::Network(e.to_string()));
        }
    }

    fn cm_loop(self: &Arc<Self>) {
        while !self.stop.load(Ordering::Relaxed) {
            let Some(ev) = self.chan.next(Duration::from_millis(100)) else {
                continue;
            };
            let kind = ev.kind();
            let status = ev.status();
            let private = ev.private_data();
            let ctx = ev.id_context() as u32;
            debug!(target: "net", event = %ev.name(), status, "cm event");
            if kind == CmEventKind::ConnectRequest {
                let id = self.next_conn.fetch_add(1, Ordering::Relaxed) & 0x3fff_ffff;
                let cmid = ev.take_new_id(u64::from(id));
                let from = ev.peer_addr();
                drop(ev);
                self.passive(cmid, id, &private, from);
                continue;
            }
            let ev_id = ev.id_ptr();
            drop(ev);
            let Some(c) = lock(&self.conns).get(&ctx).cloned() else {
                continue;
            };
            if c.cmid.raw() != ev_id {
                continue;
            }
            match kind {
                CmEventKind::AddrResolved => {
                    if let Err(e) = c.cmid.resolve_route(self.cfg.connect_timeout) {
                        self.conn_failed(c.peer, Some(&c), Error::Network(e.to_string()));
                    }
                }
                CmEventKind::RouteResolved => {
                    if let Err(e) = self.active_connect(&c) {
                        self.conn_failed(c.peer, Some(&c), Error::Network(e));
                    }
                }
                CmEventKind::Established => self.established(&c, &private),
                CmEventKind::Rejected => self.rejected(&c, &private, status),
                CmEventKind::AddrError
                | CmEventKind::RouteError
                | CmEventKind::ConnectError
                | CmEventKind::Unreachable => {
                    let e =
                        Error::Network(format!("connection failed: {kind:?} (status {status})"));
                    self.conn_failed(c.peer, Some(&c), e);
                }
                CmEventKind::Disconnected | CmEventKind::DeviceRemoval => {
                    self.close(&c, Error::PeerDown(format!("{} disconnected", c.peer)));
                }
                _ => {}
            }
        }
    }

    fn active_connect(self: &Arc<Self>, c: &Arc<Conn>) -> Result<(), String> {
        self.setup_qp(c)?;
        let (params, stamp) = {
            let peers = self.peers.lock(c.peer);
            let p = peers.get();
            (lock(&c.st).params, p.map_or(0, |p| p.incarnation))
        };
        let req = Msg {
            version: wire::VERSION_2,
            credits: 0,
            srcnid: self.nid,
            srcstamp: self.incarnation,
            dstnid: c.peer,
            dststamp: stamp,
            body: Body::ConnReq(params),
        };
        let mut b = [0u8; 64];
        let n = req.encode(&mut b, 0, false).map_err(|e| e.to_string())?;
        if let Some(t) = self.cfg.ack_timeout {
            c.cmid.set_ack_timeout(t);
        }
        c.cmid
            .connect(&b[..n], self.cfg.retry_count)
            .map_err(|e| e.to_string())
    }

    fn reject(&self, cmid: &CmId, why: u8) {
        inc(&self.stats.rejects_sent);
        let rej = Rej {
            version: wire::VERSION_2,
            why,
            incarnation: self.incarnation,
            cp: self.my_params(),
        };
        cmid.reject(&rej.encode());
    }

    fn passive(self: &Arc<Self>, cmid: CmId, id: u32, private: &[u8], from: Option<SocketAddr>) {
        let (req, _) = match Msg::decode(private) {
            Ok(m) => m,
            Err(e) => {
                warn!(target: "neterror", ?from, "bad connection request: {e}");
                inc(&self.stats.protocol_errors);
                let why = match e {
                    wire::ProtoError::BadVersion(_) => reject::CONN_UNCOMPAT,
                    _ => reject::FATAL,
                };
                self.reject(&cmid, why);
                return;
            }
        };
        let Body::ConnReq(cp) = req.body else {
            inc(&self.stats.protocol_errors);
            self.reject(&cmid, reject::FATAL);
            return;
        };
        let peer = req.srcnid;
        if req.dstnid != self.nid || peer.ip() != from.map(|a| a.ip()) && from.is_some() {
            warn!(target: "neterror", %peer, ?from, dst = %req.dstnid, "connection request for another NID");
            self.reject(&cmid, reject::FATAL);
            return;
        }
        if req.version != wire::VERSION_2 {
            self.reject(&cmid, reject::CONN_UNCOMPAT);
            return;
        }
        if req.dststamp != 0 && req.dststamp != self.incarnation {
            self.reject(&cmid, reject::CONN_STALE);
            return;
        }
        if cp.queue_depth > self.cfg.queue_depth || cp.queue_depth == 0 {
            info!(target: "net", %peer, theirs = cp.queue_depth, ours = self.cfg.queue_depth, "queue depth too large: reject with ours");
            self.reject(&cmid, reject::MSG_QUEUE_SIZE);
            return;
        }
        if cp.max_frags > self.cfg.max_frags {
            self.reject(&cmid, reject::RDMA_FRAGS);
            return;
        }
        if cp.max_msg_size as usize > MSG_SIZE {
            self.reject(&cmid, reject::FATAL);
            return;
        }
        // Connection race: both sides dialling. The larger NID's attempt
        // wins, as in o2iblnd.
        let old = {
            let peers = self.peers.lock(peer);
            peers.get().and_then(|p| p.conn.clone())
        };
        if let Some(o) = &old {
            let st = lock(&o.st);
            if st.state == State::Connecting && st.active && self.nid > peer {
                drop(st);
                self.reject(&cmid, reject::CONN_RACE);
                return;
            }
        }
        let c = match self.new_conn(cmid, id, peer, cp, false) {
            Ok(c) => c,
            Err(e) => {
                warn!(target: "neterror", %peer, "accept: {e}");
                return;
            }
        };
        if let Err(e) = self.setup_qp(&c) {
            warn!(target: "neterror", %peer, "accept: {e}");
            self.reject(&c.cmid, reject::NO_RESOURCES);
            return;
        }
        lock(&c.st).peer_stamp = req.srcstamp;
        let ack = Msg {
            version: wire::VERSION_2,
            credits: 0,
            srcnid: self.nid,
            srcstamp: self.incarnation,
            dstnid: peer,
            dststamp: req.srcstamp,
            body: Body::ConnAck(cp),
        };
        let mut b = [0u8; 64];
        let n = ack.encode(&mut b, 0, false).expect("fits");
        lock(&self.conns).insert(id, c.clone());
        if let Some(t) = self.cfg.ack_timeout {
            c.cmid.set_ack_timeout(t);
        }
        if let Err(e) = c.cmid.accept(&b[..n], self.cfg.retry_count) {
            warn!(target: "neterror", %peer, "rdma_accept: {e}");
            lock(&self.conns).remove(&id);
            return;
        }
        // The new connection is the one we send on. An established one of
        // the same incarnation stays beside it (o2iblnd keeps every
        // connection a peer opens); a losing attempt of ours, or anything
        // from an earlier incarnation, is closed.
        let (restarted, stale) = {
            let mut peers = self.peers.lock(peer);
            let p = peers.get_or_insert_with(|| self.new_peer());
            let restarted = p.incarnation != 0 && p.incarnation != req.srcstamp;
            p.incarnation = req.srcstamp;
            let mut stale = Vec::new();
            if restarted {
                stale.append(&mut p.others);
                stale.extend(p.conn.take());
            }
            stale.extend(p.promote(&c));
            (restarted, stale)
        };
        for o in stale {
            if !Arc::ptr_eq(&o, &c) {
                self.close_quiet(&o, Error::PeerDown(format!("{peer} reconnected")));
            }
        }
        if restarted {
            if let Some(ni) = self.ni() {
                ni.peer_event(peer, PeerEvent::Restarted);
            }
        }
    }

    fn established(self: &Arc<Self>, c: &Arc<Conn>, private: &[u8]) {
        let active = lock(&c.st).active;
        if let Some((timeout, retry)) = c.cmid.qp_timeout_retry() {
            debug!(target: "net", peer = %c.peer, active, ack_timeout = timeout, retry_count = retry, "QP attributes");
        }
        if active {
            let ack = match Msg::decode(private) {
                Ok((m, _)) => m,
                Err(e) => {
                    inc(&self.stats.protocol_errors);
                    return self.conn_failed(
                        c.peer,
                        Some(c),
                        Error::Network(format!("bad CONNACK: {e}")),
                    );
                }
            };
            let Body::ConnAck(cp) = ack.body else {
                inc(&self.stats.protocol_errors);
                return self.conn_failed(
                    c.peer,
                    Some(c),
                    Error::Network("CONNACK expected".into()),
                );
            };
            let mine = lock(&c.st).params;
            if ack.srcnid != c.peer
                || ack.dstnid != self.nid
                || ack.dststamp != self.incarnation
                || cp.queue_depth == 0
                || cp.queue_depth > mine.queue_depth
                || cp.max_frags > mine.max_frags
                || cp.max_msg_size as usize > MSG_SIZE
            {
                inc(&self.stats.protocol_errors);
                return self.conn_failed(
                    c.peer,
                    Some(c),
                    Error::Network("CONNACK does not match our request".into()),
                );
            }
            let restarted = {
                let mut peers = self.peers.lock(c.peer);
                let p = peers.get_mut();
                match p {
                    Some(p) => {
                        let r = p.incarnation != 0 && p.incarnation != ack.srcstamp;
                        p.incarnation = ack.srcstamp;
                        r
                    }
                    None => false,
                }
            };
            let mut st = lock(&c.st);
            st.params = cp;
            st.peer_stamp = ack.srcstamp;
            drop(st);
            if restarted {
                if let Some(ni) = self.ni() {
                    ni.peer_event(c.peer, PeerEvent::Restarted);
                }
            }
        }
        let queued = {
            let mut st = lock(&c.st);
            st.state = State::Established;
            st.credits = i32::from(st.params.queue_depth);
            st.reserved = i32::from(st.params.queue_depth);
            st.last_send = Instant::now();
            drop(st);
            let mut peers = self.peers.lock(c.peer);
            match peers.get_mut() {
                Some(p) => {
                    p.backoff = self.cfg.reconnect_min;
                    p.next_try = None;
                    p.down_since = None;
                    p.up = true;
                    // One of ours still connecting finishes on its own.
                    let _ = p.promote(c);
                    p.queue.drain(..).collect::<Vec<_>>()
                }
                None => vec![],
            }
        };
        inc(&self.stats.conns_established);
        info!(target: "net", peer = %c.peer, qd = lock(&c.st).params.queue_depth, active, "connection established");
        if let Some(ni) = self.ni() {
            ni.peer_event(c.peer, PeerEvent::Up);
        }
        for tx in queued {
            self.launch(c, tx);
        }
        // The peer's first messages can complete on our receive queue
        // before the CM tells us the connection is up (the passive side
        // especially); what they made us queue (a PUT_NAK, a GET_DONE, a
        // NOOP) waited for this: send it now, not at the next send.
        self.check_sends(c);
    }

    fn rejected(self: &Arc<Self>, c: &Arc<Conn>, private: &[u8], status: i32) {
        inc(&self.stats.rejects_received);
        let rej = Rej::decode(private);
        let mine = lock(&c.st).params;
        let retry_now = match rej {
            Some((r, true))
                if r.why == reject::MSG_QUEUE_SIZE
                    && r.cp.queue_depth > 0
                    && r.cp.queue_depth < mine.queue_depth =>
            {
                info!(target: "net", peer = %c.peer, theirs = r.cp.queue_depth, "queue depth negotiated down");
                self.renegotiate(
                    c.peer,
                    ConnParams {
                        queue_depth: r.cp.queue_depth,
                        ..mine
                    },
                );
                true
            }
            Some((r, true))
                if r.why == reject::RDMA_FRAGS
                    && r.cp.max_frags > 0
                    && r.cp.max_frags < mine.max_frags =>
            {
                self.renegotiate(
                    c.peer,
                    ConnParams {
                        max_frags: r.cp.max_frags,
                        ..mine
                    },
                );
                true
            }
            Some((r, _)) if r.why == reject::CONN_RACE => {
                // The peer's own attempt wins; it will connect to us.
                debug!(target: "net", peer = %c.peer, "lost the connection race");
                self.discard(c);
                let mut peers = self.peers.lock(c.peer);
                if let Some(p) = peers.get_mut() {
                    if p.forget(c) {
                        p.next_try = Some(Instant::now() + self.cfg.reconnect_min);
                    }
                }
                return;
            }
            Some((r, _)) if r.why == reject::CONN_STALE => {
                if let Some(p) = self.peers.lock(c.peer).get_mut() {
                    p.incarnation = 0;
                }
                true
            }
            Some((r, _)) => {
                warn!(target: "neterror", peer = %c.peer, why = reject::name(r.why), "connection rejected");
                false
            }
            None => {
                // No o2iblnd record: the CM itself refused (nobody listens
                // on that port). Retried with backoff; logged at debug so a
                // peer that is down does not flood the log.
                debug!(target: "neterror", peer = %c.peer, status, "connection rejected (no listener?)");
                false
            }
        };
        if retry_now {
            self.discard(c);
            if let Some(p) = self.peers.lock(c.peer).get_mut() {
                p.forget(c);
            }
            self.connect(c.peer);
        } else {
            self.conn_failed(
                c.peer,
                Some(c),
                Error::PeerDown(format!("{} rejected the connection", c.peer)),
            );
        }
    }

    fn renegotiate(&self, peer: Nid, p: ConnParams) {
        inc(&self.stats.renegotiations);
        if let Some(ps) = self.peers.lock(peer).get_mut() {
            ps.params = p;
        }
    }

    /// A connection attempt failed: back off; fail queued messages once the
    /// peer has been unreachable for the connect timeout.
    fn conn_failed(self: &Arc<Self>, peer: Nid, c: Option<&Arc<Conn>>, e: Error) {
        if let Some(c) = c {
            self.close_quiet(c, e.clone());
        }
        let (fail, was_up) = {
            let mut peers = self.peers.lock(peer);
            let Some(p) = peers.get_mut() else {
                return;
            };
            if let Some(c) = c {
                p.forget(c);
            }
            if p.conn.is_some() {
                // Another of its connections still serves the peer.
                return;
            }
            let now = Instant::now();
            let since = *p.down_since.get_or_insert(now);
            p.next_try = Some(now + p.backoff);
            p.backoff = (p.backoff * 2).min(self.cfg.reconnect_max);
            let was_up = std::mem::replace(&mut p.up, false);
            let fail: Vec<TxMsg> = if now.duration_since(since) >= self.cfg.connect_timeout {
                p.queue.drain(..).collect()
            } else {
                vec![]
            };
            (fail, was_up)
        };
        debug!(target: "net", %peer, "connection failed: {e}");
        for tx in fail {
            tx.complete(Err(Error::PeerDown(format!("{peer}: {e}"))));
        }
        if was_up {
            if let Some(ni) = self.ni() {
                ni.peer_event(peer, PeerEvent::Down);
            }
        }
    }

    fn fail_peer(&self, peer: Nid, e: Error) {
        let q: Vec<TxMsg> = self
            .peers
            .lock(peer)
            .get_mut()
            .map(|p| p.queue.drain(..).collect())
            .unwrap_or_default();
        for tx in q {
            tx.complete(Err(e.clone()));
        }
    }

    /// Close a connection: everything it holds ends once with `e`; the
    /// peer is reported down.
    fn close(self: &Arc<Self>, c: &Arc<Conn>, e: Error) {
        if !self.close_quiet(c, e) {
            return;
        }
        // Down only when it was the last of the peer's connections.
        let was = {
            let mut peers = self.peers.lock(c.peer);
            let last = peers.get_mut().map(|p| (p.forget(c), p));
            match last {
                Some((true, p)) => {
                    p.next_try = Some(Instant::now() + p.backoff);
                    std::mem::replace(&mut p.up, false)
                }
                _ => false,
            }
        };
        if was {
            if let Some(ni) = self.ni() {
                ni.peer_event(c.peer, PeerEvent::Down);
            }
        }
    }

    /// Close without touching the peer's state. False if already closed.
    fn close_quiet(self: &Arc<Self>, c: &Arc<Conn>, e: Error) -> bool {
        let (waiting, queued, in_flight) = {
            let mut st = lock(&c.st);
            if st.state == State::Closed {
                return false;
            }
            st.state = State::Closed;
            let w: Vec<Waiting> = st.waiting.drain().map(|(_, w)| w).collect();
            let mut q: Vec<OutMsg> = st.queue_cred.drain(..).collect();
            q.extend(st.queue_rsrvd.drain(..));
            q.extend(st.queue_nocred.drain(..));
            let in_flight = st.posted.values().filter(|p| p.tx.is_some()).count();
            (w, q, in_flight)
        };
        inc(&self.stats.conns_closed);
        if waiting.is_empty() && queued.is_empty() && in_flight == 0 {
            debug!(target: "net", peer = %c.peer, "closing connection: {e}");
        } else {
            // Operations fail because of this close: say why, once.
            warn!(target: "neterror", peer = %c.peer, waiting = waiting.len(),
                queued = queued.len(), posted = in_flight, "closing connection: {e}");
        }
        c.cmid.disconnect();
        lock(&self.conns).remove(&c.id);
        self.retire(c.clone());
        for w in waiting {
            w.fail(&e);
        }
        for m in queued {
            if let Some(tx) = m.tx {
                tx.complete(Err(e.clone()));
            }
        }
        true
    }

    /// Drop a connection that never carried traffic (a lost race, a
    /// rejected attempt, a dial made redundant): closed, out of the maps,
    /// reaped once its receives flush.
    fn discard(&self, c: &Arc<Conn>) {
        lock(&c.st).state = State::Closed;
        lock(&self.conns).remove(&c.id);
        self.retire(c.clone());
    }

    fn retire(&self, c: Arc<Conn>) {
        lock(&self.zombies).push((c, Instant::now()));
    }

    /// Drop closed connections whose work requests have all flushed (or,
    /// with `force`, all of them).
    fn reap(&self, force: bool) {
        let gone: Vec<Arc<Conn>> = {
            let mut z = lock(&self.zombies);
            let mut out = Vec::new();
            let mut i = 0;
            while i < z.len() {
                let (c, since) = &z[i];
                let st = lock(&c.st);
                let flushed = st.posted.is_empty() && st.posted_recvs == 0;
                drop(st);
                if force || flushed || since.elapsed() > Duration::from_secs(30) {
                    out.push(z.swap_remove(i).0);
                } else {
                    i += 1;
                }
            }
            out
        };
        for c in gone {
            let posted: Vec<Posted> = lock(&c.st).posted.drain().map(|(_, p)| p).collect();
            for p in posted {
                if let Some(tx) = p.tx {
                    tx.complete(Err(Error::Network("connection closed".into())));
                }
            }
            drop(c);
        }
    }

    // -------------------------------------------------------------- timer

    fn timer_loop(self: &Arc<Self>) {
        while !self.stop.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(100));
            let conns: Vec<Arc<Conn>> = lock(&self.conns).values().cloned().collect();
            for c in conns {
                let (timed_out, idle, connecting_too_long) = {
                    let st = lock(&c.st);
                    let t = st
                        .waiting
                        .values()
                        .any(|w| w.since().elapsed() > self.cfg.timeout);
                    let idle = st.state == State::Established
                        && !self.cfg.keepalive.is_zero()
                        && st.last_send.elapsed() > self.cfg.keepalive;
                    let ct = st.state == State::Connecting
                        && st.started.elapsed() > self.cfg.connect_timeout + Duration::from_secs(1);
                    (t, idle, ct)
                };
                if timed_out {
                    inc(&self.stats.timeouts);
                    warn!(target: "neterror", peer = %c.peer, "operation timed out: closing connection");
                    self.close(&c, Error::Timeout);
                } else if connecting_too_long {
                    self.conn_failed(
                        c.peer,
                        Some(&c),
                        Error::Network("connection timed out".into()),
                    );
                } else if idle {
                    lock(&c.st).force_noop = true;
                    self.check_sends(&c);
                }
            }
            // Reconnect peers with queued messages once their backoff ends.
            let due: Vec<Nid> = {
                let now = Instant::now();
                let mut due = Vec::new();
                self.peers.for_each_mut(|nid, p| {
                    if p.conn.is_none()
                        && !p.queue.is_empty()
                        && p.next_try.is_none_or(|t| t <= now)
                    {
                        p.next_try = Some(now + p.backoff);
                        due.push(*nid);
                    }
                });
                due
            };
            for nid in due {
                self.connect(nid);
            }
            self.reap(false);
        }
    }
}

fn reply_header(get: &Header) -> Header {
    let MsgBody::Get {
        return_wmd,
        sink_length,
        ..
    } = get.body
    else {
        unreachable!("checked by caller")
    };
    Header {
        dest_nid: get.src_nid,
        src_nid: get.dest_nid,
        dest_pid: get.src_pid,
        src_pid: get.dest_pid,
        payload_length: sink_length,
        body: MsgBody::Reply {
            dst_wmd: return_wmd,
        },
    }
}

/// Run `f` with the delivery now, or when a lazy portal decides.
fn deliver(d: Delivery, f: impl FnOnce(Delivery) + Send + 'static) {
    match d {
        Delivery::Deferred(w) => w.on_ready(f),
        d => f(d),
    }
}

/// Complete a sink whose data arrived by RDMA (`status`: bytes, or a
/// negative errno).
fn finish_sink(mut sink: Sink, reg: Reg, status: i32) {
    if status < 0 {
        sink.complete(Err(errno_err(status, "transfer failed")));
        return;
    }
    let n = (status as usize).min(sink.mlength());
    if let Reg::Bounce(b) = &reg {
        if let Some(buf) = &b.buf {
            sink.write_at(0, &buf.buf[..n]);
        }
    }
    sink.set_received(n);
    sink.complete(Ok(()));
}

#[cfg(test)]
mod tests {
    use super::parse_tunable;

    #[test]
    fn tunables_from_the_environment_are_range_checked() {
        assert_eq!(parse_tunable("7", 7), Some(7));
        assert_eq!(parse_tunable(" 0\n", 7), Some(0));
        assert_eq!(parse_tunable("8", 7), None);
        assert_eq!(parse_tunable("-1", 7), None);
        assert_eq!(parse_tunable("", 7), None);
        assert_eq!(parse_tunable("19", 31), Some(19));
        assert_eq!(parse_tunable("300", 31), None);
    }
}
