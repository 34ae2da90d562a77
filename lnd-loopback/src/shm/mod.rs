//! `shm`: LNet between processes on one host, through shared memory.
//!
//! # How it works
//!
//! * **Rendezvous.** Each node listens on a Unix-domain socket named after
//!   its NID (`7@shm.sock`) in a per-user directory (`$XDG_RUNTIME_DIR/lnet-shm`,
//!   else `/dev/shm/lnet-shm-<uid>`, mode 0700, refused when anyone else
//!   owns it). Connecting peers exchange a hello and, beside it
//!   (SCM_RIGHTS), their ring segment, their shared pool and their
//!   doorbell eventfd. All are memfds: nothing is left in any file system
//!   when a process dies. The socket stays open: its closing is how a
//!   peer's death is seen, at once. A socket file left by a crash is
//!   removed by the next node that binds the name, by a survivor that sees
//!   its peer die, or by [`cleanup`] (`lnet-shm-clean`).
//! * **Messages.** Per direction, a single-producer single-consumer ring of
//!   fixed-size slots in the sender's segment ([`ShmConfig::slots`] x
//!   [`ShmConfig::slot_size`]). A message whose payload fits in a slot
//!   travels inline; a PUT of ours to the peer under a 24-byte header of
//!   what the connection does not already say (an 8-byte PUT fills one
//!   cache line), any other message under LNet's 72 bytes. The receiver's progress thread polls its rings, spins
//!   briefly when idle ([`ShmConfig::spin`]), then sleeps on its eventfd;
//!   a sender rings the doorbell only when the receiver said it sleeps
//!   ([`ShmConfig::busy_poll`] never sleeps). Core credits bound what a
//!   sender puts in a ring; what does not fit waits in order for a slot.
//! * **Bulk**, chosen per message by the receiver once it has matched the
//!   header (the sender's slot carries where the payload is):
//!   1. *pool, one copy*: the source lies in the sender's shared pool,
//!      which the receiver has mapped: one `memcpy` into the MD. Or the
//!      destination lies in the receiver's pool: the sender copies into it.
//!   2. *CMA, one copy*: `process_vm_readv` from the sender's MD into the
//!      receiver's MD, if the connect-time probe found it allowed.
//!   3. *bounce*: a pipelined copy through the sender's bounce buffers.
//!   4. *loan, no copy*: a source frozen in the sender's pool
//!      ([`lnet::PoolBuf::freeze`]) reaches an MD that takes loans
//!      ([`lnet::MdOptions::LOAN`]) as a `Bytes` view of the sender's memory;
//!      the chunk goes back to the sender's pool when the last view drops.
//! * **Safety.** Every segment starts with a magic, version and size,
//!   checked against the file; every offset, length and index read from
//!   shared memory is bounds-checked before use; segments are sealed
//!   against shrinking. A peer that breaks the protocol is disconnected
//!   and counted. The unsafe code is all in one module (`sys`).
//!
//! ```no_run
//! use lnd_loopback::shm::{ShmConfig, ShmLnd};
//! use std::sync::Arc;
//! let lnd = Arc::new(ShmLnd::new(ShmConfig::new(7)).unwrap());
//! let node = lnet::LnetBuilder::new(Arc::new(lnd_loopback::LoLnd::new()))
//!     .ni(lnd.clone())
//!     .build()
//!     .unwrap();
//! let buf = lnd.pool().unwrap().alloc(1 << 20).unwrap(); // shared pool memory
//! # drop((node, buf));
//! ```

mod conn;
mod ring;
#[cfg(not(lnet_loom))]
pub use ring::ring_floor_one_way_us;
mod sys;
pub mod wire;

#[cfg(all(test, not(lnet_loom)))]
mod tests;

use std::cell::{Cell, RefCell};
use std::io::ErrorKind;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use lnet::counters::Sharded;
use lnet::shard::ShardedMap;
use lnet::wire::Header;
use lnet::{
    Error, Lnd, LndInfo, LndLimits, MemPool, Net, NetType, NiContext, NiPin, Nid, PeerEvent,
    SendNow, TxMsg,
};
use nix::poll::{PollFd, PollFlags, poll};
use nix::sys::eventfd::{EfdFlags, EventFd};
use tracing::{debug, info, warn};

use conn::{Conn, ConnEnv, ConsState};
use sys::Seg;
use wire::{Hello, RejectReason, SegHeader};

/// Errors of the shm transport.
#[derive(Debug, thiserror::Error)]
pub enum ShmError {
    /// A system call failed.
    #[error("{0}: {1}")]
    Os(&'static str, std::io::Error),
    /// A segment from a peer is malformed.
    #[error("bad segment: {0}")]
    BadSegment(&'static str),
    /// A hello from a peer is malformed.
    #[error("bad hello: {0}")]
    BadHello(&'static str),
    /// A ring slot from a peer is malformed.
    #[error("bad slot: {0}")]
    BadSlot(&'static str),
    /// An offset or length points outside a segment.
    #[error("offset or length outside the segment")]
    OutOfBounds,
    /// The peer refused the connection.
    #[error("refused by the peer: {0:?}")]
    Rejected(u32),
    /// The rendezvous directory is unsafe to use.
    #[error("rendezvous directory {0}: {1}")]
    Directory(PathBuf, &'static str),
    /// The socket name is taken by a live node.
    #[error("{0} is in use by a live node")]
    InUse(PathBuf),
}

impl From<ShmError> for Error {
    fn from(e: ShmError) -> Self {
        Error::Network(e.to_string())
    }
}

/// Configuration of one shm NI.
#[derive(Clone, Debug)]
pub struct ShmConfig {
    /// The NI's address: its NID is `<addr>@shm<net>`.
    pub addr: u32,
    /// Network number (`shm0`, `shm1`…).
    pub net: u16,
    /// Rendezvous directory (default: see the module docs).
    pub dir: Option<PathBuf>,
    /// Slots per ring.
    pub slots: u32,
    /// Bytes per slot; payloads up to `slot_size - 88` travel inline.
    pub slot_size: u32,
    /// Bounce buffers per connection and direction.
    pub bounce_buffers: u32,
    /// Bytes per bounce buffer.
    pub bounce_size: u32,
    /// Bytes of this node's shared pool (0: no pool).
    pub pool_size: usize,
    /// Use the pools (ours and the peers') for bulk; off forces CMA or bounce.
    pub use_pool: bool,
    /// Use `process_vm_readv` when the probe allows it; off forces bounce.
    pub use_cma: bool,
    /// Never sleep: the progress thread polls its rings without pause.
    pub busy_poll: bool,
    /// Pin the progress thread to this CPU (as UCX's `-c` or LNet's CPU
    /// partitions do): with busy polling, a thread that never migrates
    /// keeps its ring lines in its own cache. `None` (the default) leaves
    /// placement to the scheduler.
    pub cpu: Option<usize>,
    /// How long an idle progress thread spins before it sleeps (the
    /// starting point: it adapts between `spin / 8` and `spin * 4` to how
    /// soon work arrives after it sleeps).
    pub spin: Duration,
    /// Connection set-up timeout.
    pub connect_timeout: Duration,
}

impl ShmConfig {
    /// Defaults for NID `<addr>@shm`.
    pub fn new(addr: u32) -> Self {
        ShmConfig {
            addr,
            net: 0,
            dir: None,
            slots: 64,
            slot_size: 8192,
            bounce_buffers: 4,
            bounce_size: 256 * 1024,
            pool_size: 64 << 20,
            use_pool: true,
            use_cma: true,
            busy_poll: false,
            cpu: None,
            spin: Duration::from_micros(50),
            connect_timeout: Duration::from_secs(5),
        }
    }
    /// Set the rendezvous directory.
    pub fn dir(mut self, d: impl Into<PathBuf>) -> Self {
        self.dir = Some(d.into());
        self
    }
    /// The NID this configuration gives.
    pub fn nid(&self) -> Nid {
        Nid::new4(Net::new(NetType::SHMLND, self.net), self.addr)
    }
    fn eager(&self) -> usize {
        self.slot_size as usize - wire::SLOT_HDR - lnet::wire::HDR_NID4_SIZE
    }
}

lnet::lnd_stats! {
    /// Counters of one shm NI (all monotonic).
    Stats, StatsSnapshot;
    /// Messages sent inline.
    tx_inline,
    /// Messages sent with a bulk descriptor.
    tx_rdv,
    /// Messages received.
    rx_msgs,
    /// Bulk moved by one copy from the sender's pool mapping.
    bulk_pool_read,
    /// Bulk moved by the sender's copy into our pool.
    bulk_pool_write,
    /// Bulk moved by `process_vm_readv`.
    bulk_cma,
    /// Bulk moved through bounce buffers.
    bulk_bounce,
    /// Payloads handed over as loans of a peer's pool.
    bulk_loan,
    /// Loans of our pool returned by peers.
    loans_returned,
    /// Doorbells rung.
    wakeups_sent,
    /// Times the progress thread slept.
    sleeps,
    /// Connections set up.
    conns_up,
    /// Peers whose socket closed (death or shutdown).
    peers_died,
    /// Malformed slots (the connection was closed).
    bad_slots,
    /// Refused or failed hellos.
    bad_hellos,
    /// Hellos naming a NID that is not ours.
    wrong_nid,
    /// Peers where the CMA probe failed.
    cma_refused,
    /// Connection attempts that failed.
    connect_failed,
}

pub(crate) fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// The default rendezvous directory for this user.
pub fn default_dir() -> PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) if !d.is_empty() => Path::new(&d).join("lnet-shm"),
        _ => PathBuf::from(format!("/dev/shm/lnet-shm-{}", nix::unistd::getuid())),
    }
}

/// Create (mode 0700) or check the rendezvous directory: it must be ours
/// and closed to everyone else.
pub fn prepare_dir(dir: &Path) -> Result<(), ShmError> {
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
        Err(e) => return Err(ShmError::Os("mkdir", e)),
    }
    let md = std::fs::symlink_metadata(dir).map_err(|e| ShmError::Os("stat", e))?;
    if !md.is_dir() {
        return Err(ShmError::Directory(dir.into(), "not a directory"));
    }
    if md.uid() != nix::unistd::getuid().as_raw() {
        return Err(ShmError::Directory(dir.into(), "owned by another user"));
    }
    if md.permissions().mode() & 0o077 != 0 {
        return Err(ShmError::Directory(dir.into(), "open to other users"));
    }
    Ok(())
}

/// Remove socket files in `dir` that no live node listens on (left by a
/// crash). Returns the paths removed.
pub fn cleanup(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut gone = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        if p.extension().is_some_and(|x| x == "sock") && remove_if_stale(&p) {
            gone.push(p);
        }
    }
    Ok(gone)
}

/// Remove `p` when nothing listens on it. True when removed.
fn remove_if_stale(p: &Path) -> bool {
    probe_listener(p) == Listener::Gone && std::fs::remove_file(p).is_ok()
}

/// What a connect tells of the listener behind a socket file.
#[derive(Debug, PartialEq, Eq)]
enum Listener {
    /// Refused: nothing listens.
    Gone,
    /// Accepted, then closed or reset at once: its process is exiting (a
    /// killed process's listener closes with its other descriptors, maybe
    /// after we saw its connection to us end).
    Dying,
    /// Anything else: somebody listens (perhaps the restarted peer).
    Live,
}

fn probe_listener(p: &Path) -> Listener {
    use std::io::Read;
    match UnixStream::connect(p) {
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => Listener::Gone,
        Err(_) => Listener::Live,
        Ok(mut s) => {
            let _ = s.set_read_timeout(Some(Duration::from_millis(20)));
            let mut b = [0u8; 1];
            match s.read(&mut b) {
                Ok(0) => Listener::Dying,
                Err(e) if e.kind() == ErrorKind::ConnectionReset => Listener::Dying,
                _ => Listener::Live,
            }
        }
    }
}

/// Remove a dead peer's socket file once its listener is gone: looked at
/// again for up to a second while it is still closing, on a thread of its
/// own (the progress thread must not wait). A live listener's file stays.
fn reap_socket_file(path: PathBuf) {
    let reap = move || {
        for _ in 0..100 {
            match probe_listener(&path) {
                Listener::Gone => {
                    let _ = std::fs::remove_file(&path);
                    return;
                }
                Listener::Live => return,
                Listener::Dying => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    };
    if let Err(e) = std::thread::Builder::new()
        .name("shm-reap".into())
        .spawn(reap)
    {
        debug!(target: "net", error = %e, "no thread to remove a dead peer's socket file");
    }
}

fn sock_path(dir: &Path, nid: Nid) -> PathBuf {
    dir.join(format!("{nid}.sock"))
}

/// The word a peer reads with `process_vm_readv` to learn whether CMA is
/// allowed between us.
static PROBE: AtomicU64 = AtomicU64::new(0);

enum PeerState {
    /// A connection is being set up; messages wait here (bounded by credits).
    Connecting(Vec<TxMsg>),
    Up(Arc<Conn>),
}

pub(crate) struct Shared {
    /// Unique in the process (names this NI in threads' connection caches).
    id: u64,
    cfg: ShmConfig,
    nid: Nid,
    ni: NiContext,
    incarnation: u64,
    dir: PathBuf,
    path: PathBuf,
    doorbell: EventFd,
    /// By NID, sharded: a send locks one shard, not a lock every
    /// sending thread takes.
    peers: ShardedMap<Nid, PeerState>,
    conns: Mutex<Vec<Arc<Conn>>>,
    conns_gen: AtomicU64,
    stop: AtomicBool,
    env: Arc<ConnEnv>,
}

/// The shm LND.
pub struct ShmLnd {
    cfg: ShmConfig,
    pool: Option<(MemPool, Arc<Seg>)>,
    stats: Arc<Sharded<Stats>>,
    shared: OnceLock<Arc<Shared>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl std::fmt::Debug for ShmLnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShmLnd")
            .field("nid", &self.cfg.nid())
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl ShmLnd {
    /// A new shm LND; its pool exists at once (allocate MD memory from
    /// [`ShmLnd::pool`] before or after the node starts).
    pub fn new(cfg: ShmConfig) -> Result<ShmLnd, ShmError> {
        if cfg.slot_size < 1024 || cfg.slot_size > wire::MAX_SLOT || cfg.slot_size % 64 != 0 {
            return Err(ShmError::BadSegment(
                "slot_size must be 1 KiB..64 KiB, a multiple of 64",
            ));
        }
        if cfg.slots == 0 || cfg.slots > wire::MAX_SLOTS {
            return Err(ShmError::BadSegment("slots must be 1..4096"));
        }
        if cfg.bounce_buffers == 0
            || cfg.bounce_buffers > wire::MAX_BOUNCE
            || cfg.bounce_size < 4096
            || cfg.bounce_size > wire::MAX_BOUNCE_SIZE
        {
            return Err(ShmError::BadSegment(
                "bounce buffers: 1..64 of 4 KiB..4 MiB",
            ));
        }
        let pool = if cfg.pool_size > 0 {
            let size = wire::SEG_HDR_SIZE + cfg.pool_size.div_ceil(4096) * 4096;
            let seg = Arc::new(Seg::create(c"lnet-shm-pool", size)?);
            let h = SegHeader {
                kind: wire::SEG_POOL,
                size: size as u64,
                data_off: wire::SEG_HDR_SIZE as u64,
                ..Default::default()
            };
            seg.write(0, &h.encode())?;
            let pool = MemPool::new(Box::new(seg.region(wire::SEG_HDR_SIZE)?));
            Some((pool, seg))
        } else {
            None
        };
        Ok(ShmLnd {
            cfg,
            pool,
            stats: Arc::default(),
            shared: OnceLock::new(),
            threads: Mutex::new(Vec::new()),
        })
    }

    /// This node's shared pool: MD memory its peers can reach with one
    /// copy, or borrow without any.
    pub fn pool(&self) -> Option<MemPool> {
        self.pool.as_ref().map(|(p, _)| p.clone())
    }
    /// The NI's NID.
    pub fn nid(&self) -> Nid {
        self.cfg.nid()
    }
    /// Counters.
    pub fn stats(&self) -> StatsSnapshot {
        self.stats.snapshot()
    }
    /// The socket this NI listens on (once started).
    pub fn socket_path(&self) -> Option<PathBuf> {
        self.shared.get().map(|s| s.path.clone())
    }
    /// Peers with a live connection.
    pub fn connected_peers(&self) -> Vec<Nid> {
        let Some(sh) = self.shared.get() else {
            return Vec::new();
        };
        let mut v: Vec<Nid> = lock(&sh.conns).iter().map(|c| c.peer).collect();
        v.sort();
        v
    }
    /// Whether CMA is in use towards `peer` (the connect-time probe).
    pub fn cma_with(&self, peer: Nid) -> Option<bool> {
        let sh = self.shared.get()?;
        lock(&sh.conns)
            .iter()
            .find(|c| c.peer == peer)
            .map(|c| c.cma_ok())
    }
}

impl Lnd for ShmLnd {
    fn net_type(&self) -> NetType {
        NetType::SHMLND
    }

    fn startup(&self, ni: NiContext) -> Result<LndInfo, Error> {
        let cfg = self.cfg.clone();
        let nid = cfg.nid();
        let dir = cfg.dir.clone().unwrap_or_else(default_dir);
        prepare_dir(&dir)?;
        let path = sock_path(&dir, nid);
        if path.exists() && !remove_if_stale(&path) {
            return Err(ShmError::InUse(path).into());
        }
        let listener = UnixListener::bind(&path).map_err(|e| ShmError::Os("bind", e))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| ShmError::Os("listen", e))?;
        let doorbell =
            EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
                .map_err(|e| ShmError::Os("eventfd", e.into()))?;
        let incarnation = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
            ^ (u64::from(std::process::id()) << 32);
        if PROBE.load(Ordering::Relaxed) == 0 {
            PROBE.store(incarnation | 1, Ordering::Relaxed);
        }
        let env = Arc::new(ConnEnv {
            ni: ni.clone(),
            nid: cfg.nid(),
            cfg: cfg.clone(),
            pool: self.pool.as_ref().map(|(p, _)| p.clone()),
            stats: self.stats.clone(),
            eager: cfg.eager(),
        });
        static NEXT_ID: AtomicU64 = AtomicU64::new(0);
        let sh = Arc::new(Shared {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            cfg: cfg.clone(),
            nid,
            ni,
            incarnation,
            dir,
            path,
            doorbell,
            peers: ShardedMap::default(),
            conns: Mutex::new(Vec::new()),
            conns_gen: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            env,
        });
        self.shared
            .set(sh.clone())
            .map_err(|_| Error::Invalid("shm NI started twice"))?;
        let pool_fd = self.pool.as_ref().map(|(_, s)| s.clone());
        let s1 = sh.clone();
        let s2 = sh.clone();
        let mut th = lock(&self.threads);
        th.push(
            std::thread::Builder::new()
                .name(format!("shm-progress-{}", cfg.addr))
                .spawn(move || {
                    if let Some(cpu) = s1.cfg.cpu {
                        pin_to(cpu);
                    }
                    progress_loop(&s1)
                })
                .map_err(|e| ShmError::Os("spawn", e))?,
        );
        th.push(
            std::thread::Builder::new()
                .name(format!("shm-accept-{}", cfg.addr))
                .spawn(move || accept_loop(&s2, listener, pool_fd))
                .map_err(|e| ShmError::Os("spawn", e))?,
        );
        info!(target: "net", %nid, path = %sh.path.display(), "shm NI up");
        let eager = cfg.eager() as u32;
        Ok(LndInfo {
            nid,
            limits: LndLimits {
                max_payload: lnet::LNET_MTU,
                eager_size: eager,
                credits: 1024,
                peer_credits: (cfg.slots as i32 / 2).max(1),
                reply_inline: false,
                send_now_max: eager,
            },
        })
    }

    fn send(&self, tx: TxMsg) {
        let Some(sh) = self.shared.get() else {
            tx.complete(Err(Error::Shutdown));
            return;
        };
        if sh.stop.load(Ordering::Acquire) {
            tx.complete(Err(Error::Shutdown));
            return;
        }
        let peer = tx.peer();
        if let Some(c) = with_up_conn(sh, peer, |c| c.clone()) {
            c.send_msg(tx);
            return;
        }
        let conn = {
            let mut peers = sh.peers.lock(peer);
            match peers.get_mut() {
                // Came up since `with_up_conn` looked.
                Some(PeerState::Up(c)) if !c.is_dead() => c.clone(),
                Some(PeerState::Connecting(q)) => {
                    q.push(tx);
                    return;
                }
                _ => {
                    peers.insert(PeerState::Connecting(vec![tx]));
                    drop(peers);
                    let sh2 = sh.clone();
                    let pool = self.pool.as_ref().map(|(_, s)| s.clone());
                    let spawned = std::thread::Builder::new()
                        .name("shm-connect".into())
                        .spawn(move || connect_peer(&sh2, peer, pool));
                    if spawned.is_err() {
                        fail_connecting(sh, peer, Error::Network("cannot spawn".into()));
                    }
                    return;
                }
            }
        };
        conn.send_msg(tx);
    }

    fn send_now(&self, peer: Nid, hdr: &Header, payload: &[u8]) -> SendNow {
        let Some(sh) = self.shared.get() else {
            return SendNow::Declined;
        };
        if sh.stop.load(Ordering::Acquire) {
            return SendNow::Declined;
        }
        with_up_conn(sh, peer, |c| c.send_now(hdr, payload)).unwrap_or(SendNow::Declined)
    }

    fn shutdown(&self) {
        let Some(sh) = self.shared.get() else { return };
        sh.stop.store(true, Ordering::Release);
        let _ = sh.doorbell.write(1);
        for t in lock(&self.threads).drain(..) {
            let _ = t.join();
        }
        let conns: Vec<Arc<Conn>> = lock(&sh.conns).drain(..).collect();
        let peers: Vec<(Nid, PeerState)> = sh.peers.drain();
        for c in conns {
            c.kill(Error::Shutdown);
        }
        for (_, p) in peers {
            if let PeerState::Connecting(q) = p {
                for tx in q {
                    tx.complete(Err(Error::Shutdown));
                }
            }
        }
        let _ = std::fs::remove_file(&sh.path);
        debug!(target: "net", nid = %sh.nid, "shm NI down");
    }
}

thread_local! {
    /// The connection this thread last sent on, with its NI's id and
    /// peer: a stream of sends to one peer (a ping-pong's answers) skips
    /// the peer table's hash and lock. On a progress thread, for its own
    /// NI, it is held strongly (no reference count taken per send: an
    /// answer sent from an event callback takes two atomic operations
    /// fewer), and the thread lets it go whenever its NI's connections
    /// change and when it stops, so a retired connection's memory is
    /// freed at once. Elsewhere it is weak: a thread that sent once and
    /// idles must not keep a dead peer's mappings.
    static LAST_CONN: RefCell<Option<(u64, Nid, Cached)>> = const { RefCell::new(None) };
    /// The id of the NI whose progress thread this is, plus one (0: none).
    static PROGRESS_OF: Cell<u64> = const { Cell::new(0) };
}

enum Cached {
    Strong(Arc<Conn>),
    Weak(Weak<Conn>),
}

/// `f` on the live connection to `peer` on `sh`: this thread's cached one,
/// else the peer table's (then cached). None while it is connecting or
/// down. `f` may send again (the cache is then left as it is).
fn with_up_conn<R>(sh: &Shared, peer: Nid, f: impl FnOnce(&Arc<Conn>) -> R) -> Option<R> {
    LAST_CONN.with(|l| {
        let mut held = None;
        if let Ok(b) = l.try_borrow() {
            if let Some((id, p, c)) = &*b {
                if *id == sh.id && *p == peer {
                    match c {
                        Cached::Strong(c) if !c.is_dead() => return Some(f(c)),
                        Cached::Weak(w) => held = w.upgrade().filter(|c| !c.is_dead()),
                        Cached::Strong(_) => {}
                    }
                }
            }
        }
        if let Some(c) = held {
            return Some(f(&c));
        }
        let c = match sh.peers.lock(peer).get() {
            Some(PeerState::Up(c)) if !c.is_dead() => Some(c.clone()),
            _ => None,
        };
        if let Ok(mut b) = l.try_borrow_mut() {
            let strong = PROGRESS_OF.get() == sh.id + 1;
            *b = c.as_ref().map(|c| {
                let held = if strong {
                    Cached::Strong(c.clone())
                } else {
                    Cached::Weak(Arc::downgrade(c))
                };
                (sh.id, peer, held)
            });
        }
        c.map(|c| f(&c))
    })
}

/// On a progress thread: let its cached connection go (see `LAST_CONN`).
fn forget_last_conn() {
    LAST_CONN.with(|l| {
        if let Ok(mut b) = l.try_borrow_mut() {
            *b = None;
        }
    });
}

fn fail_connecting(sh: &Shared, peer: Nid, err: Error) {
    let q = {
        let mut peers = sh.peers.lock(peer);
        match peers.get() {
            Some(PeerState::Connecting(_)) => match peers.remove() {
                Some(PeerState::Connecting(q)) => q,
                _ => Vec::new(),
            },
            _ => Vec::new(),
        }
    };
    for tx in q {
        tx.complete(Err(err.clone()));
    }
    sh.ni.peer_event(peer, PeerEvent::Down);
}

/// Install an established connection: it replaces whatever was there; the
/// messages that waited for it are sent in order.
fn install(sh: &Arc<Shared>, c: Arc<Conn>) {
    let (queued, old) = {
        let mut peers = sh.peers.lock(c.peer);
        let prev = peers.insert(PeerState::Up(c.clone()));
        lock(&sh.conns).push(c.clone());
        match prev {
            Some(PeerState::Connecting(q)) => (q, None),
            Some(PeerState::Up(o)) => (Vec::new(), Some(o)),
            None => (Vec::new(), None),
        }
    };
    sh.conns_gen.fetch_add(1, Ordering::AcqRel);
    let _ = sh.doorbell.write(1);
    inc(&sh.env.stats.local().conns_up);
    if let Some(o) = old {
        retire(sh, &o, Error::PeerDown(o.peer.to_string()));
    }
    sh.ni.peer_event(c.peer, PeerEvent::Up);
    debug!(target: "net", peer = %c.peer, cma = c.cma_ok(), pool = c.has_peer_pool(), "shm connection up");
    for tx in queued {
        c.send_msg(tx);
    }
}

/// Take a connection out of service and end everything it carried.
fn retire(sh: &Shared, c: &Arc<Conn>, err: Error) {
    {
        let mut peers = sh.peers.lock(c.peer);
        if matches!(peers.get(), Some(PeerState::Up(x)) if Arc::ptr_eq(x, c)) {
            peers.remove();
        }
        lock(&sh.conns).retain(|x| !Arc::ptr_eq(x, c));
    }
    sh.conns_gen.fetch_add(1, Ordering::AcqRel);
    if c.kill(err) {
        inc(&sh.env.stats.local().peers_died);
        // Nothing it owed us will come; then mark it down.
        sh.ni.peer_event(c.peer, PeerEvent::Restarted);
        sh.ni.peer_event(c.peer, PeerEvent::Down);
        // A crashed peer leaves its socket file: remove it once nobody
        // listens there any more.
        if !sh.stop.load(Ordering::Acquire) {
            reap_socket_file(sock_path(&sh.dir, c.peer));
        }
    }
}

/// Our half of a connection: our ring segment (we produce into it).
fn make_ring(cfg: &ShmConfig) -> Result<(Arc<Seg>, SegHeader), ShmError> {
    let slots_bytes = cfg.slots as u64 * cfg.slot_size as u64;
    let bounce_off = (wire::SEG_HDR_SIZE as u64 + slots_bytes).div_ceil(4096) * 4096;
    let size = bounce_off + cfg.bounce_buffers as u64 * cfg.bounce_size as u64;
    let h = SegHeader {
        kind: wire::SEG_RING,
        size,
        nslots: cfg.slots,
        slot_size: cfg.slot_size,
        data_off: wire::SEG_HDR_SIZE as u64,
        nbounce: cfg.bounce_buffers,
        bounce_size: cfg.bounce_size,
        bounce_off,
        ctl_off: 1024,
    };
    let seg = Arc::new(Seg::create(c"lnet-shm-ring", size as usize)?);
    seg.write(0, &h.encode())?;
    Ok((seg, h))
}

/// A peer's ring (and its header), its pool (and where the pool region
/// starts), its doorbell.
type PeerSegs = (Arc<Seg>, SegHeader, Option<(Arc<Seg>, usize)>, OwnedFd);

/// Map and check a peer's segments: ring, optional pool.
fn map_peer(fds: Vec<OwnedFd>, flags: u32) -> Result<PeerSegs, ShmError> {
    let want = if flags & wire::HELLO_HAS_POOL != 0 {
        3
    } else {
        2
    };
    if fds.len() != want {
        return Err(ShmError::BadHello("wrong number of descriptors"));
    }
    let mut it = fds.into_iter();
    let ring = Seg::map(it.next().ok_or(ShmError::BadHello("fds"))?)?;
    let mut hb = [0u8; SegHeader::LEN];
    ring.read(0, &mut hb)?;
    let rh = SegHeader::decode(&hb, ring.len() as u64, wire::SEG_RING)?;
    let bell = it.next().ok_or(ShmError::BadHello("fds"))?;
    let pool = match it.next() {
        Some(fd) => {
            let p = Seg::map(fd)?;
            p.read(0, &mut hb)?;
            let ph = SegHeader::decode(&hb, p.len() as u64, wire::SEG_POOL)?;
            Some((Arc::new(p), ph.data_off as usize))
        }
        None => None,
    };
    Ok((Arc::new(ring), rh, pool, bell))
}

fn our_hello(sh: &Shared, dst: Nid, active: bool, has_pool: bool) -> Hello {
    Hello {
        reject: 0,
        flags: if has_pool { wire::HELLO_HAS_POOL } else { 0 }
            | if active { wire::HELLO_ACTIVE } else { 0 },
        src_nid: u64::from(sh.nid.addr4().unwrap_or(0)),
        dst_nid: u64::from(dst.addr4().unwrap_or(0)),
        incarnation: sh.incarnation,
        pid: std::process::id(),
        probe_addr: &PROBE as *const AtomicU64 as u64,
        probe_value: PROBE.load(Ordering::Relaxed),
    }
}

fn fds_of(ring: &Seg, pool: &Option<Arc<Seg>>, bell: &EventFd) -> Vec<std::os::fd::RawFd> {
    let mut v = vec![ring.fd(), bell.as_raw_fd()];
    if let Some(p) = pool {
        v.push(p.fd());
    }
    v
}

fn reject(s: &UnixStream, why: RejectReason) {
    let h = Hello {
        reject: why as u32,
        ..Default::default()
    };
    let _ = sys::send_with_fds(s, &h.encode(), &[]);
}

/// Our side of a new connection to `peer`.
fn connect_peer(sh: &Arc<Shared>, peer: Nid, pool: Option<Arc<Seg>>) {
    match try_connect(sh, peer, &pool) {
        Ok(Some(c)) => install(sh, c),
        Ok(None) => {
            // We lost a simultaneous connect: the peer's connection to us
            // is (or will shortly be) installed by the acceptor.
            let deadline = Instant::now() + sh.cfg.connect_timeout;
            while Instant::now() < deadline && !sh.stop.load(Ordering::Acquire) {
                if matches!(sh.peers.lock(peer).get(), Some(PeerState::Up(_)) | None) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            fail_connecting(sh, peer, Error::PeerDown(peer.to_string()));
        }
        Err(e) => {
            inc(&sh.env.stats.local().connect_failed);
            debug!(target: "net", %peer, error = %e, "shm connect failed");
            fail_connecting(sh, peer, Error::PeerDown(format!("{peer}: {e}")));
        }
    }
}

fn try_connect(
    sh: &Arc<Shared>,
    peer: Nid,
    pool: &Option<Arc<Seg>>,
) -> Result<Option<Arc<Conn>>, ShmError> {
    if peer.net() != sh.nid.net() || peer.addr4().is_none() {
        return Err(ShmError::BadHello("not a NID of this shm network"));
    }
    let s =
        UnixStream::connect(sock_path(&sh.dir, peer)).map_err(|e| ShmError::Os("connect", e))?;
    s.set_read_timeout(Some(sh.cfg.connect_timeout))
        .map_err(|e| ShmError::Os("timeout", e))?;
    let (ring, _) = make_ring(&sh.cfg)?;
    let h = our_hello(sh, peer, true, pool.is_some());
    sys::send_with_fds(&s, &h.encode(), &fds_of(&ring, pool, &sh.doorbell))
        .map_err(|e| ShmError::Os("send hello", e))?;
    let mut b = [0u8; Hello::LEN];
    let fds = sys::recv_with_fds(&s, &mut b, 3).map_err(|e| ShmError::Os("hello reply", e))?;
    let rh = Hello::decode(&b)?;
    if rh.reject == RejectReason::Race as u32 {
        return Ok(None);
    }
    if rh.reject != 0 {
        return Err(ShmError::Rejected(rh.reject));
    }
    if u64::from(peer.addr4().unwrap_or(0)) != rh.src_nid {
        return Err(ShmError::BadHello("the peer is not whom we dialled"));
    }
    let (pring, prh, ppool, pbell) = map_peer(fds, rh.flags)?;
    let c = Conn::new(sh.env.clone(), peer, &rh, s, ring, pring, prh, ppool, pbell)?;
    Ok(Some(c))
}

fn accept_loop(sh: &Arc<Shared>, l: UnixListener, pool: Option<Arc<Seg>>) {
    while !sh.stop.load(Ordering::Acquire) {
        let mut fds = [PollFd::new(l.as_fd(), PollFlags::POLLIN)];
        if poll(&mut fds, 100u16).unwrap_or(0) <= 0 {
            continue;
        }
        match l.accept() {
            Ok((s, _)) => {
                if let Err(e) = accept_one(sh, s, &pool) {
                    warn!(target: "neterror", error = %e, "shm hello refused");
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(e) => {
                warn!(target: "neterror", error = %e, "shm accept");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

/// Serve one connecting peer's hello. A refusal is counted before it is
/// answered and before the socket closes, so a peer that sees it refused
/// also sees it counted.
fn accept_one(sh: &Arc<Shared>, s: UnixStream, pool: &Option<Arc<Seg>>) -> Result<(), ShmError> {
    let (h, peer, (pring, prh, ppool, pbell), ring) = match admit(sh, &s) {
        Ok(Some(a)) => a,
        // Answered: we are shutting down, or the peer lost a race.
        Ok(None) => return Ok(()),
        Err((e, why)) => {
            inc(&sh.env.stats.local().bad_hellos);
            if let Some(why) = why {
                reject(&s, why);
            }
            return Err(e);
        }
    };
    let reply = our_hello(sh, peer, false, pool.is_some());
    let fds = fds_of(&ring, pool, &sh.doorbell);
    let made =
        Conn::new(sh.env.clone(), peer, &h, s, ring, pring, prh, ppool, pbell).and_then(|c| {
            sys::send_with_fds(&c.sock, &reply.encode(), &fds)
                .map_err(|e| ShmError::Os("hello reply", e))?;
            Ok(c)
        });
    match made {
        Ok(c) => {
            install(sh, c);
            Ok(())
        }
        Err(e) => {
            inc(&sh.env.stats.local().bad_hellos);
            Err(e)
        }
    }
}

/// A refused hello: the error and the answer it gets, if any.
type Refusal = (ShmError, Option<RejectReason>);

/// A hello admitted: the peer's hello and NID, its segments mapped, and
/// our ring for it.
type Admitted = (Hello, Nid, PeerSegs, Arc<Seg>);

/// The checks of [`accept_one`] on the connecting peer's hello, up to
/// our ring for it; `None` when the hello was answered here (we are
/// shutting down, or the peer lost a simultaneous connect).
fn admit(sh: &Arc<Shared>, s: &UnixStream) -> Result<Option<Admitted>, Refusal> {
    let silent = |e: ShmError| (e, None);
    s.set_nonblocking(false)
        .map_err(|e| silent(ShmError::Os("socket", e)))?;
    s.set_read_timeout(Some(sh.cfg.connect_timeout.min(Duration::from_secs(2))))
        .map_err(|e| silent(ShmError::Os("socket", e)))?;
    let mut b = [0u8; Hello::LEN];
    let fds = match sys::recv_with_fds(s, &mut b, 3) {
        Ok(f) => f,
        // A probe (a survivor checking whether we are alive) or a silent
        // client: nothing to answer.
        Err(e) => return Err(silent(ShmError::Os("hello", e))),
    };
    let h = Hello::decode(&b).map_err(silent)?;
    if h.dst_nid != u64::from(sh.nid.addr4().unwrap_or(0)) {
        inc(&sh.env.stats.local().wrong_nid);
        return Err((
            ShmError::BadHello("names a NID that is not ours"),
            Some(RejectReason::WrongNid),
        ));
    }
    if sh.stop.load(Ordering::Acquire) {
        reject(s, RejectReason::Shutdown);
        return Ok(None);
    }
    let peer = Nid::new4(sh.nid.net(), h.src_nid as u32);
    let segs = map_peer(fds, h.flags).map_err(|e| (e, Some(RejectReason::Invalid)))?;
    // Simultaneous connects: the higher NID's connection wins. A second
    // hello from a live peer we are already connected to (same
    // incarnation) lost such a race too: keep the connection we have. A
    // new incarnation means the peer restarted: the new one replaces it.
    {
        let peers = sh.peers.lock(peer);
        let lost = match peers.get() {
            Some(PeerState::Connecting(_)) => sh.nid > peer,
            Some(PeerState::Up(c)) => !c.is_dead() && c.peer_incarnation == h.incarnation,
            None => false,
        };
        if lost {
            drop(peers);
            reject(s, RejectReason::Race);
            return Ok(None);
        }
    }
    let (ring, _) = make_ring(&sh.cfg).map_err(silent)?;
    Ok(Some((h, peer, segs, ring)))
}

/// Pin the calling thread to `cpu`; a CPU that does not exist or is not
/// ours is logged and ignored (the thread still runs, unpinned).
pub(crate) fn pin_to(cpu: usize) {
    let mut set = nix::sched::CpuSet::new();
    let r = set
        .set(cpu)
        .and_then(|()| nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set));
    match r {
        Ok(()) => debug!(target: "net", cpu, "shm progress thread pinned"),
        Err(e) => warn!(target: "net", cpu, error = %e, "shm progress thread not pinned"),
    }
}

/// A connection the progress thread polls, with its receiver (taken from
/// the connection when the thread first sees it, kept across rebuilds of
/// the list).
struct Polled {
    conn: Arc<Conn>,
    rx: ConsState,
}

/// The progress thread's list after `sh.conns` changed: the receivers of
/// the connections still there move over, new ones are taken. (Only this
/// thread takes receivers, so every connection has one.)
fn repoll(sh: &Shared, old: Vec<Polled>) -> Vec<Polled> {
    let mut old: Vec<Option<Polled>> = old.into_iter().map(Some).collect();
    let now: Vec<Arc<Conn>> = lock(&sh.conns).clone();
    now.into_iter()
        .filter_map(|conn| {
            let kept = old
                .iter_mut()
                .find(|p| p.as_ref().is_some_and(|p| Arc::ptr_eq(&p.conn, &conn)))
                .and_then(Option::take);
            match kept {
                Some(p) => Some(p),
                None => conn.take_receiver().map(|rx| Polled { conn, rx }),
            }
        })
        .collect()
}

/// Idle passes of a progress loop, after it last found work, that poll
/// without a `pause` between them (a microsecond or two).
const HOT_PASSES: u32 = 256;

fn progress_loop(sh: &Arc<Shared>) {
    let mut conns: Vec<Polled> = Vec::new();
    // The hold on the core while messages flow (see `NiPin`): taken at the
    // first message, let go when the loop sleeps or stops.
    let mut pin: Option<NiPin> = None;
    PROGRESS_OF.set(sh.id + 1);
    let mut gen_seen = u64::MAX;
    let mut idle_since = Instant::now();
    let mut idle_iters = 0u32;
    let mut last_sock_check = Instant::now();
    let mut spin = sh.cfg.spin;
    let sock_every = Duration::from_millis(2);
    while !sh.stop.load(Ordering::Acquire) {
        let g = sh.conns_gen.load(Ordering::Acquire);
        if g != gen_seen {
            forget_last_conn();
            conns = repoll(sh, std::mem::take(&mut conns));
            gen_seen = g;
        }
        let mut work = 0;
        // An idle pass is these loads and nothing else (no Vec to build
        // and drop): its length is what a busy poller adds to latency.
        let mut broken = false;
        for p in &mut conns {
            let c = &p.conn;
            match c.progress(&mut p.rx, &mut pin) {
                Ok(n) => work += n,
                Err(e) => {
                    broken = true;
                    inc(&sh.env.stats.local().bad_slots);
                    warn!(target: "neterror", peer = %c.peer, error = %e, "shm peer broke the protocol; disconnecting");
                    retire(sh, c, Error::Network(e.to_string()));
                }
            }
        }
        if broken {
            gen_seen = u64::MAX;
        }
        if work > 0 {
            idle_iters = 0;
            continue;
        }
        // Read the clock only now and then: polling stays a few loads (not
        // even on the first idle pass after work, where a reply is most
        // likely to land next; idleness is timed from the 64th pass).
        idle_iters += 1;
        if idle_iters % 64 != 0 {
            // Flat out at first: an answer to what was just handled lands
            // within microseconds, and a `pause` here (25 ns on this
            // project's EPYC test hosts) would delay seeing it by half that
            // on average. Politely after that.
            if idle_iters > HOT_PASSES {
                std::hint::spin_loop();
            }
            continue;
        }
        let now = Instant::now();
        if idle_iters == 64 {
            idle_since = now;
        }
        if now.duration_since(last_sock_check) >= sock_every {
            last_sock_check = now;
            if check_sockets(sh, &conns, 0) {
                gen_seen = u64::MAX;
            }
        }
        if sh.cfg.busy_poll || now.duration_since(idle_since) < spin {
            std::hint::spin_loop();
            continue;
        }
        // Sleep: tell every producer, look once more, then wait.
        pin = None;
        let mut ready = false;
        for p in &conns {
            ready |= p.conn.prepare_sleep(&p.rx);
        }
        if !ready {
            inc(&sh.env.stats.local().sleeps);
            if check_sockets(sh, &conns, 100) {
                gen_seen = u64::MAX;
            }
        }
        for p in &conns {
            p.conn.awake(&p.rx);
        }
        let _ = sh.doorbell.read();
        // Adapt the spin: a wake-up that came soon after we slept says
        // traffic is steady (spin longer next time); a long sleep says it
        // is not (spin less), between spin/8 and spin*4.
        let slept = Instant::now().duration_since(now);
        spin = if slept < spin {
            (spin * 2).min(sh.cfg.spin * 4)
        } else if slept > spin * 16 {
            (spin / 2).max(sh.cfg.spin / 8)
        } else {
            spin
        };
        idle_iters = 0;
    }
    forget_last_conn();
    PROGRESS_OF.set(0);
}

/// Poll the doorbell and every connection's socket for up to `ms`; retire
/// connections whose socket closed. True when one was retired.
fn check_sockets(sh: &Arc<Shared>, conns: &[Polled], ms: u16) -> bool {
    let mut fds: Vec<PollFd<'_>> = Vec::with_capacity(conns.len() + 1);
    fds.push(PollFd::new(sh.doorbell.as_fd(), PollFlags::POLLIN));
    for p in conns {
        fds.push(PollFd::new(p.conn.sock.as_fd(), PollFlags::POLLIN));
    }
    if poll(&mut fds, ms).unwrap_or(0) <= 0 {
        return false;
    }
    let dead: Vec<usize> = fds[1..]
        .iter()
        .enumerate()
        .filter(|(_, f)| f.revents().is_some_and(|r| !r.is_empty()))
        .map(|(i, _)| i)
        .collect();
    drop(fds);
    let mut any = false;
    for i in dead {
        // After the hello the socket carries nothing: readable means closed
        // (or a peer writing garbage, which ends the connection too).
        let c = &conns[i].conn;
        debug!(target: "net", peer = %c.peer, "shm peer socket closed");
        retire(sh, c, Error::PeerDown(c.peer.to_string()));
        any = true;
    }
    any
}

/// A test's rendezvous directory under the system's temporary directory,
/// emptied of any earlier run's leftovers when made and removed when
/// dropped if the nodes left it empty (what they leave behind stays, to be
/// looked at). Test support shared by this crate's and the examples' tests.
///
/// ```
/// let d = lnd_loopback::shm::TestDir::new("doc");
/// std::fs::create_dir_all(&*d).unwrap();
/// let p = d.to_path_buf();
/// drop(d);
/// assert!(!p.exists());
/// ```
#[doc(hidden)]
pub struct TestDir(std::path::PathBuf);

impl TestDir {
    /// `lnet-shm-test-<pid>-<name>` in the temporary directory.
    pub fn new(name: &str) -> TestDir {
        let d = std::env::temp_dir().join(format!("lnet-shm-test-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        TestDir(d)
    }
}

impl std::ops::Deref for TestDir {
    type Target = std::path::PathBuf;
    fn deref(&self) -> &std::path::PathBuf {
        &self.0
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.0);
    }
}
