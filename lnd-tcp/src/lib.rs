//! `lnd-tcp`: the socklnd-equivalent TCP transport, wire-compatible with
//! kernel LNet's `ksocklnd`.
//!
//! * **Acceptor** on [`TcpConfig::port`] (988 by default) with LNet's
//!   accept modes ([`AcceptMode`]); it reads the acceptor request (v1 with
//!   an 8-byte NID, v2 with a 20-byte NID) and answers unknown requests as
//!   the kernel's acceptor does.
//! * **Hello**: protocol v2, v3 (default over IPv4) and v4 (20-byte NIDs,
//!   IPv6), negotiated as socklnd does; incarnations detect restarted
//!   peers; simultaneous dials resolve in favour of the higher NID.
//! * **Typed connections**: one control connection and `conns_per_peer`
//!   bulk-in and bulk-out connections per peer; messages under
//!   [`TcpConfig::min_bulk`] go on control, larger ones round-robin over the
//!   bulk-out connections.
//! * **Data path**: the reader takes the ksock and LNet headers, lets the
//!   core match the message, then reads the payload from the socket
//!   straight into the matched MD's memory; the writer sends the headers and
//!   the MD's fragments with one vectored write (or `MSG_ZEROCOPY`,
//!   [`TcpConfig::zerocopy_min`]).
//! * **Failures**: every refusal and close is counted by reason
//!   ([`StatsSnapshot`]) and logged; peers are redialled with backoff;
//!   keepalive NOOPs and a peer timeout find dead peers.
//!
//! It runs on its own tokio runtime ([`TcpConfig::threads`] workers).
//!
//! ```no_run
//! use std::sync::Arc;
//! use lnd_tcp::{AcceptMode, TcpConfig, TcpLnd};
//!
//! let mut cfg = TcpConfig::new("127.0.0.1".parse().unwrap()).port(7988);
//! cfg.accept = AcceptMode::All;
//! let tcp = TcpLnd::new(cfg);
//! let node = lnd_loopback::builder().ni(tcp.clone()).build().unwrap();
//! assert_eq!(node.primary_nid().to_string(), "127.0.0.1@tcp");
//! ```

mod config;
mod conn;
mod error;
pub mod proto;
mod zc;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use lnet::counters::Sharded;
use lnet::shard::ShardedMap;
use lnet::wire::ByteOrder;
use lnet::{
    Error, LNET_PID_ANY, Lnd, LndInfo, LndLimits, Net, NetType, NiContext, Nid, PeerEvent, Pid,
    TxMsg,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::watch;

pub use config::{AcceptMode, ConnsPerPeer, SourcePort, TcpConfig, conns_for_speed, link_speed};
pub use error::{Reject, Stats, StatsSnapshot};
use proto::{
    AcceptorRequest, ActiveVerdict, CONN_NONE, ConnType, FirstWord, Fit, Framing, Hello, KsockHdr,
    PassiveVerdict,
};

/// The network type this LND serves.
pub const NET_TYPE: NetType = NetType::SOCKLND;

/// Most handshakes in progress at once; further connections are closed at
/// once (bounded memory under a connection flood).
const MAX_HANDSHAKES: usize = 4096;
/// How often the reaper checks keepalives and queued messages.
const REAPER_TICK: Duration = Duration::from_millis(250);
/// Peers with nothing to do are forgotten after this long.
const PEER_IDLE_FORGET: Duration = Duration::from_secs(600);
/// Version retries when the peer asks for another protocol.
const MAX_VERSION_RETRIES: usize = 3;

/// The TCP LND. Build with [`TcpLnd::new`], pass to
/// [`lnet::LnetBuilder::ni`].
pub struct TcpLnd {
    cfg: TcpConfig,
    stats: Arc<Sharded<Stats>>,
    shared: OnceLock<Arc<Shared>>,
    rt: Mutex<Option<tokio::runtime::Runtime>>,
}

impl std::fmt::Debug for TcpLnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpLnd")
            .field("address", &self.cfg.address)
            .field("port", &self.cfg.port)
            .finish()
    }
}

/// One established connection, as [`TcpLnd::conns`] lists it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnInfo {
    /// Its type on our side.
    pub ctype: ConnType,
    /// Negotiated protocol version.
    pub version: u32,
    /// Our address.
    pub local: SocketAddr,
    /// The peer's address.
    pub remote: SocketAddr,
    /// True when we dialled it.
    pub active: bool,
}

impl TcpLnd {
    /// A TCP LND with these settings (started by the node).
    pub fn new(cfg: TcpConfig) -> Arc<TcpLnd> {
        Arc::new(TcpLnd {
            cfg,
            stats: Arc::default(),
            shared: OnceLock::new(),
            rt: Mutex::new(None),
        })
    }
    /// The counters.
    pub fn stats(&self) -> StatsSnapshot {
        self.stats.snapshot()
    }
    /// The acceptor's address once started (None in accept mode `none`).
    pub fn listen_addr(&self) -> Option<SocketAddr> {
        self.shared.get().and_then(|s| s.listen)
    }
    /// This NI's incarnation (what peers see in our hello).
    pub fn incarnation(&self) -> Option<u64> {
        self.shared.get().map(|s| s.incarnation)
    }
    /// Established connections to `peer`.
    pub fn conns(&self, peer: Nid) -> Vec<ConnInfo> {
        let Some(sh) = self.shared.get() else {
            return Vec::new();
        };
        let Some(p) = sh.peer(peer) else {
            return Vec::new();
        };
        let st = lock(&p.st);
        st.conns.iter().map(|c| c.info).collect()
    }
    /// Close every connection to `peer` (its operations in flight fail).
    pub fn close_peer(&self, peer: Nid) {
        if let Some(sh) = self.shared.get() {
            if let Some(p) = sh.peer(peer) {
                sh.close_all(&p, Reject::Shutdown);
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Lnd for TcpLnd {
    fn net_type(&self) -> NetType {
        NET_TYPE
    }

    fn startup(&self, ni: NiContext) -> Result<LndInfo, Error> {
        let cfg = self.cfg.clone();
        let nid = Nid::from_ip(Net::new(NET_TYPE, cfg.net_num), cfg.address);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(cfg.threads.max(1))
            .thread_name("lnd-tcp")
            .enable_all()
            .build()
            .map_err(|e| Error::Network(format!("tcp runtime: {e}")))?;
        let listener = if cfg.accept == AcceptMode::None {
            None
        } else {
            let l = listen(cfg.listen_addr())
                .map_err(|e| Error::Network(format!("listen on {}: {e}", cfg.listen_addr())))?;
            Some(l)
        };
        let listen = listener.as_ref().and_then(|l| l.local_addr().ok());
        let bulk = match cfg.conns_per_peer {
            ConnsPerPeer::Fixed(n) => n.max(1),
            ConnsPerPeer::Auto => conns_for_speed(link_speed(cfg.address)),
        };
        let (stop_tx, _) = watch::channel(false);
        let sh = Arc::new(Shared {
            pid: ni.pid(),
            ni,
            nid,
            incarnation: new_incarnation(),
            listen,
            bulk_conns: bulk,
            peers: ShardedMap::default(),
            stats: self.stats.clone(),
            handle: rt.handle().clone(),
            shutting_down: AtomicBool::new(false),
            stop: stop_tx,
            epoch: coarse_ms(),
            handshakes: Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES)),
            cfg,
        });
        if let Some(l) = listener {
            let s = sh.clone();
            let _g = rt.enter();
            let l =
                TcpListener::from_std(l).map_err(|e| Error::Network(format!("listener: {e}")))?;
            rt.spawn(async move { s.accept_loop(l).await });
        }
        {
            let s = sh.clone();
            rt.spawn(async move { s.reaper().await });
        }
        tracing::info!(target: "net", %nid, ?listen, bulk_conns = bulk, "tcp NI up");
        let limits = LndLimits {
            max_payload: lnet::LNET_MTU,
            eager_size: sh.cfg.min_bulk as u32,
            credits: sh.cfg.credits,
            peer_credits: sh.cfg.peer_credits,
            reply_inline: false,
            send_now_max: 0,
        };
        *lock(&self.rt) = Some(rt);
        let _ = self.shared.set(sh);
        Ok(LndInfo { nid, limits })
    }

    fn send(&self, tx: TxMsg) {
        match self.shared.get() {
            Some(sh) => sh.launch(tx),
            None => tx.complete(Err(Error::Shutdown)),
        }
    }

    fn shutdown(&self) {
        if let Some(sh) = self.shared.get() {
            sh.shutdown();
        }
        if let Some(rt) = lock(&self.rt).take() {
            if tokio::runtime::Handle::try_current().is_ok() {
                rt.shutdown_background();
            } else {
                rt.shutdown_timeout(Duration::from_secs(2));
            }
        }
    }
}

fn listen(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let s = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )?;
    s.set_reuse_address(true)?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    s.bind(&addr.into())?;
    s.listen(1024)?;
    s.set_nonblocking(true)?;
    Ok(s.into())
}

/// A monotonic clock in milliseconds, at the kernel tick's resolution (a
/// few ms: enough for keepalive and peer timeouts). Read on every received
/// message, so the cheap coarse clock rather than `Instant::now`.
fn coarse_ms() -> u64 {
    use nix::time::{ClockId, clock_gettime};
    clock_gettime(ClockId::CLOCK_MONOTONIC_COARSE)
        .or_else(|_| clock_gettime(ClockId::CLOCK_MONOTONIC))
        .map(|t| t.tv_sec() as u64 * 1000 + t.tv_nsec() as u64 / 1_000_000)
        .unwrap_or(0)
}

fn new_incarnation() -> u64 {
    // Nanoseconds since the epoch, as the kernel stamps its NIs: a restarted
    // node always has a larger one. Mixed with the pid so two processes
    // started in the same nanosecond still differ.
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    t ^ (u64::from(std::process::id()) << 48)
}

/// Bytes of a message on the wire, as socklnd sizes it to choose a
/// connection type (ksock header + 8-byte-NID LNet header + payload).
fn frame_len(tx: &TxMsg) -> usize {
    proto::KSOCK_HDR_SIZE + lnet::wire::HDR_NID4_SIZE + tx.payload_len()
}

/// A message waiting for a connection.
struct Queued {
    since: Instant,
    tx: TxMsg,
}

pub(crate) struct PeerState {
    pid: Pid,
    incarnation: Option<u64>,
    version: Option<u32>,
    conns: Vec<Arc<conn::Conn>>,
    queue: VecDeque<Queued>,
    connecting: bool,
    /// Passive handshakes accepted but not registered yet, by wire type.
    accepting: [u16; 4],
    backoff: Duration,
    retry_at: Option<Instant>,
    rr: usize,
    up: bool,
    last_ping: Instant,
    idle_since: Instant,
}

impl PeerState {
    /// Passive handshakes of type `ct` accepted but not registered yet.
    fn accepting_mut(&mut self, ct: ConnType) -> &mut u16 {
        &mut self.accepting[ct.to_wire() as usize % 4]
    }
}

pub(crate) struct Peer {
    nid: Nid,
    st: Mutex<PeerState>,
    /// [`Shared::now_ms`] when we last heard from it.
    last_alive: AtomicU64,
}

pub(crate) struct Shared {
    cfg: TcpConfig,
    ni: NiContext,
    nid: Nid,
    pid: Pid,
    incarnation: u64,
    listen: Option<SocketAddr>,
    bulk_conns: u16,
    /// Peers by NID: a send locks one shard, not a lock every
    /// connection's thread takes.
    peers: ShardedMap<Nid, Arc<Peer>>,
    stats: Arc<Sharded<Stats>>,
    handle: tokio::runtime::Handle,
    shutting_down: AtomicBool,
    stop: watch::Sender<bool>,
    /// [`coarse_ms`] when the NI started.
    epoch: u64,
    handshakes: Arc<tokio::sync::Semaphore>,
}

/// A passive connection of type `ct` counted for its peer from the
/// accept decision until it is registered (or fails).
struct Reserved {
    peer: Arc<Peer>,
    ct: ConnType,
}

impl Drop for Reserved {
    fn drop(&mut self) {
        let mut st = lock(&self.peer.st);
        let n = st.accepting_mut(self.ct);
        *n = n.saturating_sub(1);
    }
}

/// What a handshake established, before the connection is registered.
struct Established {
    stream: TcpStream,
    hello: Hello,
    ctype: ConnType,
    framing: Framing,
    active: bool,
}

impl Shared {
    fn now_ms(&self) -> u64 {
        coarse_ms().saturating_sub(self.epoch)
    }

    fn peer(&self, nid: Nid) -> Option<Arc<Peer>> {
        self.peers.lock(nid).get().cloned()
    }

    fn peer_or_new(&self, nid: Nid) -> Arc<Peer> {
        let mut slot = self.peers.lock(nid);
        if let Some(p) = slot.get() {
            // Known peer (every message after the first).
            return p.clone();
        }
        slot.get_or_insert_with(|| {
            Arc::new(Peer {
                nid,
                st: Mutex::new(PeerState {
                    pid: LNET_PID_ANY,
                    incarnation: None,
                    version: None,
                    conns: Vec::new(),
                    queue: VecDeque::new(),
                    connecting: false,
                    accepting: [0; 4],
                    backoff: self.cfg.min_reconnect,
                    retry_at: None,
                    rr: 0,
                    up: false,
                    last_ping: Instant::now(),
                    idle_since: Instant::now(),
                }),
                last_alive: AtomicU64::new(self.now_ms()),
            })
        })
        .clone()
    }

    /// The best connection for a message of `nob` bytes (socklnd's
    /// `ksocknal_find_conn_locked`: a fitting type, round robin among
    /// equals).
    fn pick(&self, st: &mut PeerState, nob: usize) -> Option<Arc<conn::Conn>> {
        let min_bulk = self.cfg.min_bulk;
        let fit = |c: &Arc<conn::Conn>| {
            if c.is_closing() {
                Fit::No
            } else {
                proto::fit(c.info.ctype, nob, min_bulk)
            }
        };
        // The best fit and how many share it, in one pass; then the
        // round-robin choice among them (this runs per message).
        let (mut best, mut n) = (Fit::No, 0usize);
        for c in &st.conns {
            let f = fit(c);
            if f > best {
                (best, n) = (f, 1);
            } else if f == best {
                n += 1;
            }
        }
        if best == Fit::No {
            return None;
        }
        st.rr = st.rr.wrapping_add(1);
        let k = if n == 1 { 0 } else { st.rr % n };
        st.conns.iter().filter(|c| fit(c) == best).nth(k).cloned()
    }

    /// Assign every held message to a connection (sent by the caller once
    /// the peer lock is released); those with none go to `failed`.
    fn place_queue(
        &self,
        st: &mut PeerState,
        ready: &mut Vec<(Arc<conn::Conn>, TxMsg)>,
        failed: &mut Vec<TxMsg>,
    ) {
        let q: Vec<_> = st.queue.drain(..).collect();
        for item in q {
            match self.pick(st, frame_len(&item.tx)) {
                Some(c) => ready.push((c, item.tx)),
                None => failed.push(item.tx),
            }
        }
    }

    /// `send`: queue on a connection, or hold it and dial.
    fn launch(self: &Arc<Self>, tx: TxMsg) {
        if self.shutting_down.load(Ordering::Acquire) {
            tx.complete(Err(Error::Shutdown));
            return;
        }
        let to = tx.peer();
        if to.net() != Net::new(NET_TYPE, self.cfg.net_num) || to.ip().is_none() {
            tx.complete(Err(Error::NoRoute(to.to_string())));
            return;
        }
        let peer = self.peer_or_new(to);
        let nob = frame_len(&tx);
        let mut st = lock(&peer.st);
        if let Some(c) = self.pick(&mut st, nob) {
            drop(st);
            if let Err(conn::Out::Msg(tx)) = c.send(conn::Out::Msg(tx)) {
                // The writer just exited: hold the message for the next
                // connection.
                self.hold(&peer, tx);
            }
            return;
        }
        if st.conns.is_empty() && !st.connecting && st.retry_at.is_some_and(|t| t > Instant::now())
        {
            // The last attempt failed and the backoff has not expired: the
            // peer is down; fail at once rather than hold until the next try.
            drop(st);
            tx.complete(Err(Error::PeerDown(to.to_string())));
            return;
        }
        st.queue.push_back(Queued {
            since: Instant::now(),
            tx,
        });
        self.maybe_dial(&peer, &mut st);
    }

    fn hold(self: &Arc<Self>, peer: &Arc<Peer>, tx: TxMsg) {
        let mut st = lock(&peer.st);
        st.queue.push_back(Queued {
            since: Instant::now(),
            tx,
        });
        self.maybe_dial(peer, &mut st);
    }

    fn maybe_dial(self: &Arc<Self>, peer: &Arc<Peer>, st: &mut PeerState) {
        if st.connecting || self.shutting_down.load(Ordering::Acquire) {
            return;
        }
        st.connecting = true;
        let s = self.clone();
        let p = peer.clone();
        let at = st.retry_at;
        self.handle.spawn(async move { s.connector(p, at).await });
    }

    /// Dial a peer: control first, then the bulk connections still missing.
    async fn connector(self: Arc<Self>, peer: Arc<Peer>, mut at: Option<Instant>) {
        while let Some(next) = self.connect_round(&peer, at).await {
            at = Some(next);
        }
    }

    /// One round of dialling; `Some(when)` to go again then (we were
    /// refused and nothing connects us yet), still marked connecting.
    async fn connect_round(
        self: &Arc<Self>,
        peer: &Arc<Peer>,
        at: Option<Instant>,
    ) -> Option<Instant> {
        if let Some(at) = at {
            tokio::time::sleep_until(at.into()).await;
        }
        let want = [
            (ConnType::Control, 1u16),
            (ConnType::BulkIn, self.bulk_conns),
            (ConnType::BulkOut, self.bulk_conns),
        ];
        let mut failure = None;
        let mut refused = false;
        'types: for (ct, n) in want {
            loop {
                if self.shutting_down.load(Ordering::Acquire) {
                    break 'types;
                }
                let have = self.have(&lock(&peer.st), ct);
                if have >= n as usize {
                    break;
                }
                match self.dial(peer, ct).await {
                    Ok(Some(est)) => {
                        if let Err(r) = self.register(peer, est) {
                            failure = Some(r);
                            break 'types;
                        }
                    }
                    // Refused (race lost or duplicate): the peer's own
                    // connections serve us.
                    Ok(None) => {
                        refused = true;
                        break 'types;
                    }
                    Err(r) => {
                        failure = Some(r);
                        break 'types;
                    }
                }
            }
        }
        let mut failed = Vec::new();
        // Sent after the peer lock is released: a send may complete at
        // once, and completion may start the next send to this peer.
        let mut ready = Vec::new();
        let mut again = None;
        {
            let mut st = lock(&peer.st);
            st.connecting = false;
            if let Some(r) = failure {
                Stats::inc(&self.stats.local().connect_failures);
                let delay = st.backoff;
                st.backoff = (st.backoff * 2).min(self.cfg.max_reconnect);
                st.retry_at = Some(Instant::now() + delay);
                tracing::warn!(target: "neterror", peer = %peer.nid, reason = %r,
                    retry_in = ?delay, "connect failed");
                if st.conns.is_empty() {
                    failed.extend(st.queue.drain(..).map(|q| q.tx));
                }
            } else if refused && st.conns.is_empty() && !st.queue.is_empty() {
                // Refused, yet nothing connects us: the peer's own dial
                // failed, or it still counts a connection we already
                // closed. Dial again after the backoff (socklnd retries an
                // EALREADY route later); held messages wait, up to the
                // socket timeout.
                let delay = st.backoff;
                st.backoff = (st.backoff * 2).min(self.cfg.max_reconnect);
                st.connecting = true;
                again = Some(Instant::now() + delay);
            } else {
                st.backoff = self.cfg.min_reconnect;
                st.retry_at = None;
            }
            if !st.queue.is_empty() && !st.conns.is_empty() {
                // Anything still held goes out now.
                self.place_queue(&mut st, &mut ready, &mut failed);
            }
        }
        for (c, tx) in ready {
            if let Err(conn::Out::Msg(tx)) = c.send(conn::Out::Msg(tx)) {
                failed.push(tx);
            }
        }
        let down = !failed.is_empty();
        for tx in failed {
            tx.complete(Err(Error::PeerDown(peer.nid.to_string())));
        }
        if down {
            self.ni.peer_event(peer.nid, PeerEvent::Down);
        }
        again
    }

    async fn connect_socket(&self, to: SocketAddr) -> Result<TcpStream, Reject> {
        let new = || {
            if to.is_ipv6() {
                TcpSocket::new_v6()
            } else {
                TcpSocket::new_v4()
            }
        };
        let timeout = self.cfg.sock_timeout;
        if self.cfg.source_port == SourcePort::Privileged {
            for port in (proto::MIN_RESERVED_PORT..=proto::MAX_RESERVED_PORT).rev() {
                let s = new()?;
                let _ = s.set_reuseaddr(true);
                match s.bind(SocketAddr::new(self.cfg.address, port)) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => continue,
                    // Not allowed (not root): fall back to an ephemeral port.
                    Err(_) => break,
                }
                match tokio::time::timeout(timeout, s.connect(to)).await {
                    Ok(Ok(st)) => return Ok(st),
                    Ok(Err(e))
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::AddrInUse | std::io::ErrorKind::AddrNotAvailable
                        ) =>
                    {
                        continue;
                    }
                    Ok(Err(e)) => return Err(e.into()),
                    Err(_) => return Err(Reject::Timeout),
                }
            }
        }
        let s = new()?;
        s.bind(SocketAddr::new(self.cfg.address, 0))?;
        match tokio::time::timeout(timeout, s.connect(to)).await {
            Ok(r) => Ok(r?),
            Err(_) => Err(Reject::Timeout),
        }
    }

    /// One outbound connection of type `ct`: acceptor request, hello, and
    /// the version retry. `Ok(None)` when the peer refused it.
    async fn dial(&self, peer: &Arc<Peer>, ct: ConnType) -> Result<Option<Established>, Reject> {
        let ip = peer.nid.ip().ok_or(Reject::BadNid)?;
        let to = SocketAddr::new(ip, self.cfg.peer_port);
        let needs_large = ip.is_ipv6() || !peer.nid.is_nid4() || !self.nid.is_nid4();
        let (mut version, dst_pid, dst_inc) = {
            let st = lock(&peer.st);
            (
                st.version
                    .unwrap_or_else(|| proto::initial_version(self.cfg.protocol, needs_large)),
                st.pid,
                st.incarnation.unwrap_or(0),
            )
        };
        for _ in 0..MAX_VERSION_RETRIES {
            let mut s = self.connect_socket(to).await?;
            let req = AcceptorRequest::for_nid(peer.nid).encode(ByteOrder::NATIVE);
            let hello = Hello {
                version,
                src_nid: self.nid,
                dst_nid: peer.nid,
                src_pid: self.pid,
                dst_pid,
                src_incarnation: self.incarnation,
                dst_incarnation: dst_inc,
                ctype: ct.to_wire(),
            };
            let mut out = req;
            out.extend_from_slice(&hello.encode(ByteOrder::NATIVE)?);
            let t = self.cfg.sock_timeout;
            io_timeout(t, s.write_all(&out)).await?;
            let (got, order) = read_hello(&mut s, t).await?;
            match proto::active_check(&got, version, ct, peer.nid, self.nid)? {
                ActiveVerdict::Connected => {
                    return Ok(Some(Established {
                        stream: s,
                        hello: got,
                        ctype: ct,
                        framing: Framing {
                            version,
                            peer_order: order,
                        },
                        active: true,
                    }));
                }
                ActiveVerdict::RetryWith(v) if Hello::known_version(v) && v != version => {
                    tracing::debug!(target: "net", peer = %peer.nid, from = version, to = v,
                        "peer wants another protocol version");
                    version = v;
                }
                ActiveVerdict::RetryWith(v) => return Err(Reject::BadVersion(v)),
                ActiveVerdict::Refused => {
                    Stats::inc(&self.stats.local().races);
                    tracing::debug!(target: "net", peer = %peer.nid, ?ct, "connection refused by peer (race or duplicate)");
                    return Ok(None);
                }
            }
        }
        Err(Reject::BadVersion(version))
    }

    async fn accept_loop(self: Arc<Self>, l: TcpListener) {
        let mut stop = self.stop.subscribe();
        loop {
            let r = tokio::select! {
                r = l.accept() => r,
                _ = stop.changed() => return,
            };
            let (s, from) = match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(target: "neterror", error = %e, "accept failed");
                    // EMFILE and friends: do not spin.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            Stats::inc(&self.stats.local().accepted);
            let Ok(permit) = self.handshakes.clone().try_acquire_owned() else {
                tracing::warn!(target: "neterror", %from, "too many handshakes in progress; closing");
                continue;
            };
            let sh = self.clone();
            self.handle.spawn(async move {
                let r = tokio::time::timeout(sh.cfg.accept_timeout, sh.passive(s, from)).await;
                let r = r.unwrap_or(Err(Reject::Timeout));
                drop(permit);
                match r {
                    Ok(Some((peer, est, reserved))) => {
                        if let Err(e) = sh.register(&peer, est) {
                            sh.stats.local().count(&e);
                        }
                        // Released once the connection is counted as up
                        // (counted twice for a moment, never zero times).
                        drop(reserved);
                    }
                    Ok(None) => {}
                    Err(e) => {
                        sh.stats.local().count(&e);
                        tracing::warn!(target: "neterror", %from, reason = %e, "refused connection");
                    }
                }
            });
        }
    }

    /// The passive handshake. `Ok(None)`: refused politely (race).
    async fn passive(
        self: &Arc<Self>,
        mut s: TcpStream,
        from: SocketAddr,
    ) -> Result<Option<(Arc<Peer>, Established, Reserved)>, Reject> {
        if self.cfg.accept == AcceptMode::Secure && from.port() > proto::MAX_RESERVED_PORT {
            return Err(Reject::Unprivileged(from.port()));
        }
        let mut w = [0u8; 4];
        read_exact(&mut s, &mut w).await?;
        match proto::first_word(w) {
            FirstWord::Acceptor(order) => {
                let mut v = [0u8; 4];
                read_exact(&mut s, &mut v).await?;
                let version = match order {
                    ByteOrder::Little => u32::from_le_bytes(v),
                    ByteOrder::Big => u32::from_be_bytes(v),
                };
                let Some(n) = proto::acceptor_rest_len(version) else {
                    let _ = s
                        .write_all(&AcceptorRequest::version_answer(ByteOrder::NATIVE))
                        .await;
                    return Err(Reject::BadAcceptorVersion(version));
                };
                let mut rest = [0u8; 20];
                read_exact(&mut s, &mut rest[..n]).await?;
                let nid = proto::acceptor_nid(version, &rest[..n], order)?;
                if nid != self.nid {
                    return Err(Reject::WrongNid(nid));
                }
            }
            FirstWord::Hello => {
                let _ = s
                    .write_all(&AcceptorRequest::version_answer(ByteOrder::NATIVE))
                    .await;
                return Err(Reject::NoAcceptorRequest);
            }
            FirstWord::OldTcp => return Err(Reject::BadMagic(proto::LNET_PROTO_TCP_MAGIC)),
            FirstWord::Unknown(m) => return Err(Reject::BadMagic(m)),
        }
        let mut p = [0u8; 8];
        read_exact(&mut s, &mut p).await?;
        let (order, version) = Hello::decode_prefix(p)?;
        if !Hello::known_version(version) {
            // Tell the peer what we speak (type NONE), as the kernel does.
            let v =
                proto::initial_version(self.cfg.protocol, from.is_ipv6() || !self.nid.is_nid4());
            let mine = Hello {
                version: v,
                src_nid: self.nid,
                dst_nid: Nid::ANY,
                src_pid: self.pid,
                dst_pid: LNET_PID_ANY,
                src_incarnation: self.incarnation,
                dst_incarnation: 0,
                ctype: CONN_NONE,
            };
            if let Ok(b) = mine.encode(ByteOrder::NATIVE) {
                let _ = s.write_all(&b).await;
            }
            return Err(Reject::BadVersion(version));
        }
        let mut rest = [0u8; proto::HELLO_NID16_SIZE];
        let rest = &mut rest[..Hello::size(version) - 8];
        read_exact(&mut s, rest).await?;
        let (h, nips) = Hello::decode_rest(version, order, rest)?;
        let mut ips = [0u8; 4 * proto::MAX_HELLO_IPS as usize];
        read_exact(&mut s, &mut ips[..4 * nips as usize]).await?;
        // Validate before a peer entry exists for this NID, then decide
        // and reserve under the peer's lock, so that our own connector
        // (which counts reservations) never dials a type we are accepting.
        proto::passive_check(&h, self.nid, false, |_| false)?;
        let peer = self.peer_or_new(h.src_nid);
        // Accepted: the type, reserved until registered. Refused: why.
        let decision: Result<(ConnType, Reserved), Reject> = {
            let mut st = lock(&peer.st);
            let inc = h.src_incarnation;
            match proto::passive_check(&h, self.nid, st.connecting, |ct| self.enough(&st, ct, inc))?
            {
                PassiveVerdict::Accept(ct) => {
                    *st.accepting_mut(ct) += 1;
                    Ok((
                        ct,
                        Reserved {
                            peer: peer.clone(),
                            ct,
                        },
                    ))
                }
                PassiveVerdict::Refuse(r) => Err(r),
            }
        };
        let mut answer = Hello {
            version,
            src_nid: self.nid,
            dst_nid: h.src_nid,
            src_pid: self.pid,
            dst_pid: h.src_pid,
            src_incarnation: self.incarnation,
            dst_incarnation: h.src_incarnation,
            ctype: CONN_NONE,
        };
        match decision {
            Ok((ct, reserved)) => {
                answer.ctype = ct.to_wire();
                s.write_all(&answer.encode(ByteOrder::NATIVE)?).await?;
                Ok(Some((
                    peer,
                    Established {
                        stream: s,
                        hello: h,
                        ctype: ct,
                        framing: Framing {
                            version,
                            peer_order: order,
                        },
                        active: false,
                    },
                    reserved,
                )))
            }
            Err(r) => {
                self.stats.local().count(&r);
                tracing::debug!(target: "net", peer = %h.src_nid, reason = %r,
                    "refusing a dial (a connection race or a duplicate)");
                let _ = s.write_all(&answer.encode(ByteOrder::NATIVE)?).await;
                Ok(None)
            }
        }
    }

    /// Whether a dial of type `ct` (our side's view) from a peer of
    /// incarnation `inc` would duplicate a connection `st` already has or
    /// is accepting. The control connection is unique. How many bulk
    /// connections a peer dials is its own choice (its `conns_per_peer`),
    /// except in a type we already supply in full by our own dials: that
    /// one is the late half of a connection race (both ends dialled the
    /// same direction; ours was up before theirs arrived and our dialling
    /// had ended, so the NID-order rule no longer applied). A new
    /// incarnation never duplicates: its connections replace the old ones.
    fn enough(&self, st: &PeerState, ct: ConnType, inc: u64) -> bool {
        if st.incarnation.is_some_and(|i| i != inc) {
            return false;
        }
        match ct {
            ConnType::Control => self.have(st, ct) >= 1,
            ConnType::BulkIn | ConnType::BulkOut => {
                let ours = st
                    .conns
                    .iter()
                    .filter(|c| c.info.ctype == ct && c.info.active && !c.is_closing())
                    .count();
                ours >= usize::from(self.bulk_conns)
            }
            ConnType::Any => false,
        }
    }

    /// Connections of type `ct` up or being accepted.
    fn have(&self, st: &PeerState, ct: ConnType) -> usize {
        st.conns
            .iter()
            .filter(|c| c.info.ctype == ct && !c.is_closing())
            .count()
            + st.accepting[ct.to_wire() as usize % 4] as usize
    }

    fn setup_socket(&self, s: &TcpStream) {
        let r = socket2::SockRef::from(s);
        let _ = s.set_nodelay(self.cfg.nodelay);
        if let Some(n) = self.cfg.tx_buffer_size {
            let _ = r.set_send_buffer_size(n);
        }
        if let Some(n) = self.cfg.rx_buffer_size {
            let _ = r.set_recv_buffer_size(n);
        }
        if let Some((idle, intvl, count)) = self.cfg.tcp_keepalive {
            let ka = socket2::TcpKeepalive::new()
                .with_time(idle)
                .with_interval(intvl)
                .with_retries(count);
            let _ = r.set_tcp_keepalive(&ka);
        }
    }

    /// Add an established connection to its peer: detect a restarted peer,
    /// start the connection's reader and writer, send what was waiting.
    fn register(self: &Arc<Self>, peer: &Arc<Peer>, est: Established) -> Result<(), Reject> {
        if self.shutting_down.load(Ordering::Acquire) {
            return Err(Reject::Shutdown);
        }
        self.setup_socket(&est.stream);
        let local = est.stream.local_addr()?;
        let remote = est.stream.peer_addr()?;
        let mode = if self.cfg.reader_threads {
            conn::ReaderMode::Thread
        } else {
            conn::ReaderMode::Runtime
        };
        let (c, rd, wr) = conn::Conn::new(
            ConnInfo {
                ctype: est.ctype,
                version: est.framing.version,
                local,
                remote,
                active: est.active,
            },
            est.framing,
            est.stream,
            mode,
            self.cfg.sock_timeout,
            self.stop.subscribe(),
            self.cfg.checksum,
            self.cfg.zerocopy_min,
            self.stats.clone(),
        )?;
        let mut stale = Vec::new();
        let mut restarted = false;
        let was_up;
        let mut failed = Vec::new();
        let mut ready = Vec::new();
        {
            let mut st = lock(&peer.st);
            if let Some(inc) = st.incarnation {
                if inc != est.hello.src_incarnation {
                    restarted = true;
                    stale = std::mem::take(&mut st.conns);
                }
            }
            st.incarnation = Some(est.hello.src_incarnation);
            st.version = Some(est.framing.version);
            st.pid = est.hello.src_pid;
            st.conns.push(c.clone());
            was_up = st.up && !restarted;
            st.up = true;
            st.backoff = self.cfg.min_reconnect;
            st.retry_at = None;
            self.place_queue(&mut st, &mut ready, &mut failed);
        }
        peer.last_alive.store(self.now_ms(), Ordering::Relaxed);
        Stats::inc(&self.stats.local().conns_established);
        tracing::debug!(target: "net", peer = %peer.nid, ctype = ?est.ctype,
            version = est.framing.version, %local, %remote, active = est.active, "connection up");
        for old in stale {
            self.close_conn(peer, &old, Reject::Stale);
        }
        if restarted {
            Stats::inc(&self.stats.local().peer_restarts);
            tracing::info!(target: "net", peer = %peer.nid, "peer restarted (new incarnation)");
            self.ni.peer_event(peer.nid, PeerEvent::Restarted);
        }
        for (c, tx) in ready {
            if let Err(conn::Out::Msg(tx)) = c.send(conn::Out::Msg(tx)) {
                failed.push(tx);
            }
        }
        for tx in failed {
            tx.complete(Err(Error::PeerDown(peer.nid.to_string())));
        }
        if !was_up {
            self.ni.peer_event(peer.nid, PeerEvent::Up);
        }
        let sh = self.clone();
        let p = peer.clone();
        let c2 = c.clone();
        match mode {
            conn::ReaderMode::Runtime => {
                self.handle.spawn(async move {
                    let r = conn::reader(&sh, &p, &c2, rd).await;
                    sh.close_conn(&p, &c2, r.err().unwrap_or(Reject::Eof));
                });
            }
            conn::ReaderMode::Thread => {
                // The reader's waits other than reads (a lazy portal's
                // decision, the stop signals) still need the runtime.
                let handle = self.handle.clone();
                // Counted before it starts, so `ended` never runs ahead.
                Stats::inc(&self.stats.local().reader_threads_started);
                let spawned =
                    std::thread::Builder::new()
                        .name("lnd-tcp-rx".into())
                        .spawn(move || {
                            let r = handle.block_on(conn::reader(&sh, &p, &c2, rd));
                            sh.close_conn(&p, &c2, r.err().unwrap_or(Reject::Eof));
                            Stats::inc(&sh.stats.local().reader_threads_ended);
                        });
                if let Err(e) = spawned {
                    Stats::inc(&self.stats.local().reader_threads_ended);
                    self.close_conn(peer, &c, Reject::from(e));
                }
            }
        }
        let sh = self.clone();
        let p = peer.clone();
        self.handle.spawn(async move {
            let r = conn::writer(&sh, &c, wr).await;
            if let Err(e) = r {
                sh.close_conn(&p, &c, e);
            }
        });
        Ok(())
    }

    /// Close one connection (idempotent); when it was the peer's last,
    /// the peer is down and held messages are redialled for.
    pub(crate) fn close_conn(self: &Arc<Self>, peer: &Arc<Peer>, c: &Arc<conn::Conn>, why: Reject) {
        if !c.begin_close() {
            return;
        }
        Stats::inc(&self.stats.local().conns_closed);
        self.stats.local().count(&why);
        match why {
            Reject::Eof | Reject::Shutdown | Reject::Stale => {
                tracing::debug!(target: "net", peer = %peer.nid, ctype = ?c.info.ctype, reason = %why, "connection closed")
            }
            _ => {
                tracing::warn!(target: "neterror", peer = %peer.nid, ctype = ?c.info.ctype, remote = %c.info.remote, reason = %why, "closing connection")
            }
        }
        let down;
        {
            let mut st = lock(&peer.st);
            st.conns.retain(|x| !Arc::ptr_eq(x, c));
            down = st.conns.is_empty() && st.up && why != Reject::Stale;
            if st.conns.is_empty() {
                st.up = false;
                st.idle_since = Instant::now();
                if !st.queue.is_empty() {
                    self.maybe_dial(peer, &mut st);
                }
            }
        }
        if down {
            self.ni.peer_event(peer.nid, PeerEvent::Down);
        }
    }

    fn close_all(self: &Arc<Self>, peer: &Arc<Peer>, why: Reject) {
        let conns = lock(&peer.st).conns.clone();
        for c in conns {
            self.close_conn(peer, &c, why);
        }
    }

    /// Keepalives, peer timeouts, held messages past the socket timeout,
    /// forgetting idle peers.
    async fn reaper(self: Arc<Self>) {
        let mut stop = self.stop.subscribe();
        loop {
            tokio::select! {
                _ = tokio::time::sleep(REAPER_TICK) => {}
                _ = stop.changed() => return,
            }
            let peers = self.peers.values();
            let now = Instant::now();
            let now_ms = self.now_ms();
            let mut forget = Vec::new();
            for p in peers {
                let mut expired = Vec::new();
                let mut dead = false;
                let mut ping = None;
                {
                    let mut st = lock(&p.st);
                    while st
                        .queue
                        .front()
                        .is_some_and(|q| now.duration_since(q.since) > self.cfg.sock_timeout)
                    {
                        if let Some(q) = st.queue.pop_front() {
                            expired.push(q.tx);
                        }
                    }
                    if !st.conns.is_empty() {
                        if let Some(ka) = self.cfg.keepalive {
                            let silent = Duration::from_millis(
                                now_ms.saturating_sub(p.last_alive.load(Ordering::Relaxed)),
                            );
                            if silent > self.cfg.peer_timeout {
                                dead = true;
                            } else if silent > ka && now.duration_since(st.last_ping) > ka {
                                st.last_ping = now;
                                ping = self.pick(&mut st, proto::KSOCK_HDR_SIZE);
                            }
                        }
                    } else if st.queue.is_empty()
                        && !st.connecting
                        && now.duration_since(st.idle_since) > PEER_IDLE_FORGET
                    {
                        forget.push(p.nid);
                    }
                }
                if let Some(c) = ping {
                    let _ = c.send(conn::Out::Noop(KsockHdr::keepalive()));
                }
                for tx in expired {
                    tx.complete(Err(Error::Timeout));
                }
                if dead {
                    Stats::inc(&self.stats.local().peer_timeouts);
                    tracing::warn!(target: "neterror", peer = %p.nid, "peer silent past the peer timeout; closing");
                    self.close_all(&p, Reject::Timeout);
                }
            }
            for n in forget {
                // Checked under the shard's lock: no send finds the peer
                // in between.
                let mut slot = self.peers.lock(n);
                let idle = slot.get().is_some_and(|p| {
                    let st = lock(&p.st);
                    st.conns.is_empty() && st.queue.is_empty() && !st.connecting
                });
                if idle {
                    slot.remove();
                }
            }
        }
    }

    fn shutdown(self: &Arc<Self>) {
        self.shutting_down.store(true, Ordering::Release);
        let _ = self.stop.send(true);
        let peers: Vec<_> = self.peers.drain().into_iter().map(|(_, p)| p).collect();
        for p in peers {
            self.close_all(&p, Reject::Shutdown);
            let q: Vec<_> = lock(&p.st).queue.drain(..).collect();
            for item in q {
                item.tx.complete(Err(Error::Shutdown));
            }
        }
    }
}

async fn io_timeout<T>(
    t: Duration,
    f: impl std::future::Future<Output = std::io::Result<T>>,
) -> Result<T, Reject> {
    match tokio::time::timeout(t, f).await {
        Ok(r) => r.map_err(Reject::from),
        Err(_) => Err(Reject::Timeout),
    }
}

async fn read_exact(s: &mut TcpStream, b: &mut [u8]) -> Result<(), Reject> {
    s.read_exact(b).await.map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            Reject::Truncated
        } else {
            Reject::from(e)
        }
    })?;
    Ok(())
}

async fn read_hello(s: &mut TcpStream, t: Duration) -> Result<(Hello, ByteOrder), Reject> {
    let f = async {
        let mut p = [0u8; 8];
        read_exact(s, &mut p).await?;
        let (order, version) = Hello::decode_prefix(p)?;
        if !Hello::known_version(version) {
            return Err(Reject::BadVersion(version));
        }
        let mut rest = [0u8; proto::HELLO_NID16_SIZE];
        let rest = &mut rest[..Hello::size(version) - 8];
        read_exact(s, rest).await?;
        let (h, nips) = Hello::decode_rest(version, order, rest)?;
        let mut ips = [0u8; 4 * proto::MAX_HELLO_IPS as usize];
        read_exact(s, &mut ips[..4 * nips as usize]).await?;
        Ok((h, order))
    };
    match tokio::time::timeout(t, f).await {
        Ok(r) => r,
        Err(_) => Err(Reject::Timeout),
    }
}
