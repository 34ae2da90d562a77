//! The selftest framework: sessions, batches and tests driven by a
//! console over LNet, as the kernel's `lnet_selftest` framework serves
//! them (services 0-5 on [`FRAMEWORK_REQUEST_PORTAL`]). A node running
//! [`Framework`] can be put into a Lustre admin's `lst` groups, and our
//! console ([`crate::console`]) drives it and kernel nodes alike.
//!
//! Also: [`call`], one selftest RPC from a console or framework to a node,
//! and an lnet-rs extension, service [`LATENCY_SERVICE`], that reports the
//! latency percentiles of the tests a node runs as a client (kernel nodes
//! do not answer it; the console then shows no latency for them).
//!
//! ```
//! use std::sync::Arc;
//! use lnet_selftest::framework::Framework;
//! use lnet_selftest::server::Server;
//! let node = Arc::new(lnd_loopback::builder().build().unwrap());
//! let srv = Server::start(&node, Default::default()).unwrap();
//! let fw = Framework::start(&node, srv, None).unwrap();
//! assert!(fw.session().is_none());
//! node.shutdown();
//! ```

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, channel};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use lnet::pool::MemPool;
use lnet::{AckReq, EventQueue, InsPos, Lnet, Md, MdOptions, Nid, ProcessId, Threshold, Unlink};
use tracing::{info, warn};

use crate::bulk::Check;
use crate::client::{Client, TestKind, TestSpec};
use crate::rpc::{self, lock};
use crate::server::{EINVAL, EPROTO, Server};
use crate::wire::{
    self, BATCH_OPC_QUERY, BATCH_OPC_RUN, BATCH_OPC_STOP, Body, FRAMEWORK_REQUEST_PORTAL,
    FwCounters, LST_BRW_WRITE, LST_FEATS_MASK, LnetCounters, RDMA_PORTAL, RpcCounters, Service,
    SessionId, SrpcMsg, StatReply, TestParams, TestReq,
};

/// `ESRCH`: not in that session.
pub const ESRCH: u32 = 3;
/// `EBUSY`: in another session.
pub const EBUSY: u32 = 16;
/// `ENOENT`.
pub const ENOENT: u32 = 2;
/// `EALREADY`.
pub const EALREADY: u32 = 114;
/// lnet-rs extension: the service id of the latency query (framework
/// portal, unused by the kernel). Request: a stat request; reply: a stat
/// reply whose `rpc.bulk_get`, `rpc.bulk_put`, `lnet.send_length` and
/// `lnet.recv_length` carry p50, p99, p99.9 (ns) and the sample count.
pub const LATENCY_SERVICE: u64 = 9;

/// A session as a node holds it.
#[derive(Clone, Debug)]
pub struct SessionInfo {
    /// Id.
    pub sid: SessionId,
    /// Name.
    pub name: String,
    /// Features.
    pub features: u32,
    /// Inactivity timeout, seconds.
    pub timeout: u32,
}

struct TestInst {
    req: TestReq,
    dests: Vec<ProcessId>,
    client: Option<Client>,
}

struct Session {
    info: SessionInfo,
    started: Instant,
    last_seen: Instant,
    batches: HashMap<u64, Vec<TestInst>>,
    brw_errors: u64,
    ping_errors: u64,
    rpcs_sent: u64,
    rpc_errors: u64,
    hist: Option<hdrhistogram::Histogram<u64>>,
}

struct Inner {
    node: Weak<Lnet>,
    server: Server,
    pool: Option<MemPool>,
    session: Mutex<Option<Session>>,
    tx: Mutex<Sender<(u64, Vec<u8>, ProcessId)>>,
    requests: AtomicU64,
}

/// The framework services of a node.
pub struct Framework {
    inner: Arc<Inner>,
}

impl Framework {
    /// Posts the framework services on `node` beside `server`'s test
    /// services. `pool` is used for the bulk of tests this node runs.
    pub fn start(
        node: &Arc<Lnet>,
        server: Server,
        pool: Option<MemPool>,
    ) -> lnet::Result<Framework> {
        let (tx, rx) = channel();
        let inner = Arc::new(Inner {
            node: Arc::downgrade(node),
            server,
            pool,
            session: Mutex::new(None),
            tx: Mutex::new(tx),
            requests: AtomicU64::new(0),
        });
        node.set_lazy(FRAMEWORK_REQUEST_PORTAL, true)?;
        for svc in [0u64, 1, 2, 3, 4, 5, LATENCY_SERVICE] {
            for _ in 0..8 {
                rpc::post_request_buffer(
                    node,
                    &inner,
                    FRAMEWORK_REQUEST_PORTAL,
                    svc,
                    queue_request,
                )?;
            }
        }
        let w = Arc::downgrade(&inner);
        std::thread::Builder::new()
            .name("lst-framework".into())
            .spawn(move || worker(w, rx))
            .map_err(|_| lnet::Error::Invalid("cannot start the framework thread"))?;
        Ok(Framework { inner })
    }

    /// The session this node is in.
    pub fn session(&self) -> Option<SessionInfo> {
        lock(&self.inner.session).as_ref().map(|s| s.info.clone())
    }

    /// The test server's counters.
    pub fn server(&self) -> &Server {
        &self.inner.server
    }

    /// Framework requests handled.
    pub fn requests(&self) -> u64 {
        self.inner.requests.load(Relaxed)
    }
}

/// Framework requests may wait on the network (a test's destination
/// list): they are served one at a time on the framework thread.
fn queue_request(inner: &Arc<Inner>, _node: &Arc<Lnet>, svc: u64, b: Vec<u8>, peer: ProcessId) {
    let _ = lock(&inner.tx).send((svc, b, peer));
}

fn worker(w: Weak<Inner>, rx: Receiver<(u64, Vec<u8>, ProcessId)>) {
    loop {
        let got = rx.recv_timeout(Duration::from_secs(1));
        let Some(inner) = w.upgrade() else { return };
        match got {
            Ok((svc, b, peer)) => {
                inner.requests.fetch_add(1, Relaxed);
                handle(&inner, svc, &b, peer);
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
        harvest(&inner);
        // Sessions end when their console has been silent too long.
        let mut s = lock(&inner.session);
        if let Some(x) = s.as_ref() {
            if x.info.timeout > 0
                && x.last_seen.elapsed() > Duration::from_secs(u64::from(x.info.timeout))
            {
                info!(name = %x.info.name, "selftest session timed out");
                end_session(&mut s);
            }
        }
    }
}

/// Folds the counters of finished client tests into the session.
fn harvest(inner: &Inner) {
    let mut g = lock(&inner.session);
    let Some(s) = g.as_mut() else { return };
    let mut done = Vec::new();
    for tests in s.batches.values_mut() {
        for t in tests.iter_mut() {
            if t.client.as_ref().is_some_and(|c| !c.is_active()) {
                done.push(t.client.take());
            }
        }
    }
    for c in done.into_iter().flatten() {
        fold(s, &c);
    }
}

/// A client test's counters as the framework reports them: RPCs sent,
/// RPC errors, brw errors, ping errors.
fn charge(c: &Client) -> [u64; 4] {
    let p = c.progress();
    let failed = p.test_errors + p.rpcs_failed;
    let ping = matches!(c.kind(), TestKind::Ping);
    [
        p.rpcs_ok + failed,
        p.rpcs_failed,
        if ping { 0 } else { failed },
        if ping { failed } else { 0 },
    ]
}

fn fold(s: &mut Session, c: &Client) {
    let [sent, errs, brw, ping] = charge(c);
    s.rpcs_sent += sent;
    s.rpc_errors += errs;
    s.brw_errors += brw;
    s.ping_errors += ping;
    let r = c.report();
    match &mut s.hist {
        Some(h) => {
            let _ = h.add(&r.latency);
        }
        None => s.hist = Some(r.latency),
    }
}

fn end_session(s: &mut Option<Session>) {
    if let Some(mut x) = s.take() {
        for tests in x.batches.values_mut() {
            for t in tests {
                if let Some(c) = &t.client {
                    c.stop();
                }
            }
        }
    }
}

fn handle(inner: &Arc<Inner>, svc: u64, b: &[u8], peer: ProcessId) {
    let Some(node) = inner.node.upgrade() else {
        return;
    };
    let msg = match SrpcMsg::decode(b) {
        Ok(m) => m,
        Err(err) => {
            warn!(%peer, %err, "framework request dropped");
            return;
        }
    };
    let swab = SrpcMsg::is_swabbed(b);
    let Some(rpyid) = msg.body.rpyid() else {
        warn!(%peer, "framework message that is not a request");
        return;
    };
    let feats = msg.ses_feats;
    let mut g = lock(&inner.session);
    let cur_sid = g.as_ref().map_or(SessionId::NONE, |s| s.info.sid);
    let cur_name = g.as_ref().map_or([0u8; 32], |s| wire::name(&s.info.name));
    let mut ok_for = |sid: SessionId| -> bool {
        match g.as_mut() {
            Some(s) if s.info.sid == sid => {
                s.last_seen = Instant::now();
                true
            }
            _ => false,
        }
    };
    let body = match (svc, msg.body) {
        (
            1,
            Body::MksnReq {
                sid, force, name, ..
            },
        ) => {
            let status = if feats & !LST_FEATS_MASK != 0 {
                EPROTO
            } else if g.is_some() && cur_sid != sid && force == 0 {
                EBUSY
            } else {
                if cur_sid != sid {
                    end_session(&mut g);
                    *g = Some(Session {
                        info: SessionInfo {
                            sid,
                            name: wire::name_str(&name),
                            features: feats,
                            timeout: 300,
                        },
                        started: Instant::now(),
                        last_seen: Instant::now(),
                        batches: HashMap::new(),
                        brw_errors: 0,
                        ping_errors: 0,
                        rpcs_sent: 0,
                        rpc_errors: 0,
                        hist: None,
                    });
                    info!(name = %wire::name_str(&name), "selftest session made");
                }
                0
            };
            let (sid, name) = match g.as_ref() {
                Some(s) => (s.info.sid, wire::name(&s.info.name)),
                None => (SessionId::NONE, [0u8; 32]),
            };
            Body::MksnReply {
                status,
                sid,
                timeout: 300,
                name,
            }
        }
        (2, Body::RmsnReq { sid, .. }) => {
            let status = if ok_for(sid) {
                end_session(&mut g);
                0
            } else {
                ESRCH
            };
            Body::RmsnReply {
                status,
                sid: cur_sid,
            }
        }
        (0, Body::DebugReq { sid, .. }) => {
            let _ = ok_for(sid);
            Body::DebugReply {
                status: 0,
                sid: cur_sid,
                timeout: g.as_ref().map_or(0, |s| s.info.timeout),
                nbatch: g.as_ref().map_or(0, |s| s.batches.len() as u32),
                name: cur_name,
            }
        }
        (5, Body::StatReq { sid, .. }) => {
            if !ok_for(sid) {
                Body::StatReply(StatReply {
                    status: ESRCH,
                    sid: cur_sid,
                    fw: FwCounters::default(),
                    rpc: RpcCounters::default(),
                    lnet: LnetCounters::default(),
                })
            } else {
                drop(g);
                harvest(inner);
                g = lock(&inner.session);
                Body::StatReply(stats(inner, &node, g.as_ref()))
            }
        }
        (LATENCY_SERVICE, Body::StatReq { sid, .. }) => {
            let ok = ok_for(sid);
            drop(g);
            harvest(inner);
            g = lock(&inner.session);
            let mut h = g.as_ref().and_then(|s| s.hist.clone());
            if let Some(s) = g.as_ref() {
                for t in s.batches.values().flatten() {
                    if let Some(c) = &t.client {
                        match &mut h {
                            Some(h) => {
                                let _ = h.add(c.latency());
                            }
                            None => h = Some(c.latency()),
                        }
                    }
                }
            }
            let (p50, p99, p999, n) = h.map_or((0, 0, 0, 0), |h| {
                (
                    h.value_at_quantile(0.5),
                    h.value_at_quantile(0.99),
                    h.value_at_quantile(0.999),
                    h.len(),
                )
            });
            Body::StatReply(StatReply {
                status: if ok { 0 } else { ESRCH },
                sid: cur_sid,
                fw: FwCounters::default(),
                rpc: RpcCounters {
                    bulk_get: p50,
                    bulk_put: p99,
                    ..Default::default()
                },
                lnet: LnetCounters {
                    send_length: p999,
                    recv_length: n,
                    ..Default::default()
                },
            })
        }
        (4, Body::TestReq(t)) => {
            let status = if !ok_for(t.sid) {
                ESRCH
            } else {
                drop(g);
                let st = add_test(inner, &node, peer, &t, swab);
                g = lock(&inner.session);
                st
            };
            Body::TestReply {
                status,
                sid: cur_sid,
            }
        }
        (3, Body::BatchReq(b)) => {
            if !ok_for(b.sid) {
                Body::BatchReply {
                    status: ESRCH,
                    sid: cur_sid,
                    active: 0,
                    time: 0,
                }
            } else {
                drop(g);
                harvest(inner);
                g = lock(&inner.session);
                let (status, active) = match g.as_mut() {
                    Some(s) => batch(inner, &node, s, b.bid, b.opc, b.testidx),
                    None => (ESRCH, 0),
                };
                Body::BatchReply {
                    status,
                    sid: cur_sid,
                    active,
                    time: 0,
                }
            }
        }
        (_, body) => {
            warn!(%peer, svc, ty = body.msg_type(), "framework request of the wrong type");
            return;
        }
    };
    drop(g);
    if let Err(err) = rpc::send_reply(
        &node,
        peer,
        rpyid,
        SrpcMsg::new(feats & LST_FEATS_MASK, body),
    ) {
        warn!(%peer, %err, "framework reply not sent");
    }
}

fn stats(inner: &Inner, node: &Lnet, s: Option<&Session>) -> StatReply {
    let sv = inner.server.stats();
    let m = node.counters().msgs;
    let (mut sent, mut errs, mut brw, mut ping, mut active) = (0, 0, 0, 0, 0u32);
    if let Some(s) = s {
        sent = s.rpcs_sent;
        errs = s.rpc_errors;
        brw = s.brw_errors;
        ping = s.ping_errors;
        for tests in s.batches.values() {
            let mut running = false;
            for t in tests {
                if let Some(c) = &t.client {
                    let [a, b, c2, d] = charge(c);
                    sent += a;
                    errs += b;
                    brw += c2;
                    ping += d;
                    running |= c.is_active();
                }
            }
            active += u32::from(running);
        }
    }
    let c32 = |v: u64| v as u32;
    StatReply {
        status: 0,
        sid: s.map_or(SessionId::NONE, |s| s.info.sid),
        fw: FwCounters {
            running_ms: s.map_or(0, |s| c32(s.started.elapsed().as_millis() as u64)),
            active_batches: active,
            zombie_sessions: 0,
            brw_errors: c32(brw + sv.brw_errors),
            ping_errors: c32(ping),
        },
        rpc: RpcCounters {
            errors: c32(errs + sv.bulk_errors),
            rpcs_sent: c32(sent + sv.rpcs_sent),
            rpcs_rcvd: c32(sv.rpcs_rcvd),
            rpcs_dropped: c32(sv.rpcs_dropped),
            rpcs_expired: 0,
            bulk_get: sv.bulk_get,
            bulk_put: sv.bulk_put,
        },
        lnet: LnetCounters {
            msgs_alloc: 0,
            msgs_max: 0,
            errors: c32(m.errors),
            send_count: c32(m.sent()),
            recv_count: c32(m.received()),
            route_count: 0,
            drop_count: c32(m.dropped()),
            send_length: m.send_length,
            recv_length: m.recv_length,
            route_length: 0,
            drop_length: m.drop_length,
        },
    }
}

fn add_test(inner: &Inner, node: &Arc<Lnet>, console: ProcessId, t: &TestReq, swab: bool) -> u32 {
    if Service::from_id(t.service).is_none_or(|s| s != Service::Brw && s != Service::Ping) {
        return EINVAL;
    }
    if t.concur == 0 || t.concur > wire::LST_MAX_CONCUR || t.ndest > 1 << 16 {
        return EINVAL;
    }
    let mut dests = Vec::new();
    if t.is_client != 0 {
        if t.ndest == 0 {
            return EINVAL;
        }
        let len = wire::ids_len(t.ndest as usize);
        let got = match get_bulk(node, console, t.bulkid, len) {
            Ok(b) => b,
            Err(e) => {
                warn!(%console, %e, "cannot fetch the test's destinations");
                return crate::server::EIO;
            }
        };
        let Some(ids) = wire::decode_ids(&got, t.ndest as usize, swab) else {
            return EINVAL;
        };
        for (nid, pid) in ids {
            match Nid::try_from_nid4(nid) {
                Ok(n) => dests.push(ProcessId::new(n, pid)),
                Err(_) => return EINVAL,
            }
        }
    }
    let mut g = lock(&inner.session);
    let Some(s) = g.as_mut() else { return ESRCH };
    s.batches.entry(t.bid).or_default().push(TestInst {
        req: *t,
        dests,
        client: None,
    });
    0
}

fn kind_of(t: &TestReq) -> Option<TestKind> {
    Some(match t.params {
        TestParams::Ping { .. } => TestKind::Ping,
        TestParams::BulkV0 { opc, npg, flags } => TestKind::Brw {
            write: opc == LST_BRW_WRITE,
            size: npg.checked_mul(4096)?,
            offset: 0,
            check: Check::from_wire(flags)?,
        },
        TestParams::BulkV1 {
            opc,
            flags,
            len,
            offset,
        } => TestKind::Brw {
            write: u32::from(opc) == LST_BRW_WRITE,
            size: len,
            offset: offset % 4096,
            check: Check::from_wire(u32::from(flags))?,
        },
    })
}

fn batch(
    inner: &Inner,
    node: &Arc<Lnet>,
    s: &mut Session,
    bid: u64,
    opc: u32,
    testidx: u32,
) -> (u32, u32) {
    let feats = s.info.features;
    let Some(tests) = s.batches.get_mut(&bid) else {
        // A batch with no test on this node: nothing to run.
        return (0, 0);
    };
    let pick = |i: usize| testidx == 0 || testidx as usize == i + 1;
    match opc {
        BATCH_OPC_RUN => {
            if tests
                .iter()
                .any(|t| t.client.as_ref().is_some_and(|c| c.is_active()))
            {
                return (EALREADY, 0);
            }
            for (i, t) in tests.iter_mut().enumerate() {
                if !pick(i) || t.req.is_client == 0 {
                    continue;
                }
                let Some(kind) = kind_of(&t.req) else {
                    return (EINVAL, 0);
                };
                let mut spec = TestSpec::new(t.dests.clone(), kind)
                    .concurrency(t.req.concur as usize)
                    .pool(inner.pool.clone());
                spec.features = feats;
                // A loop count of 0 or "-1" runs until stopped.
                if t.req.loop_count != 0 && (t.req.loop_count as i32) > 0 {
                    spec.loops = Some(u64::from(t.req.loop_count));
                }
                match Client::start(node, spec) {
                    Ok(c) => t.client = Some(c),
                    Err(e) => {
                        warn!(%e, "selftest test not started");
                        return (EINVAL, 0);
                    }
                }
            }
            (0, 0)
        }
        BATCH_OPC_STOP => {
            let mut done = Vec::new();
            for (i, t) in tests.iter_mut().enumerate() {
                if pick(i) {
                    if let Some(c) = t.client.take() {
                        c.stop();
                        done.push(c);
                    }
                }
            }
            for c in &done {
                c.wait(Duration::from_secs(5));
            }
            for c in &done {
                fold(s, c);
            }
            (0, 0)
        }
        BATCH_OPC_QUERY => {
            let active = tests
                .iter()
                .enumerate()
                .filter(|(i, t)| pick(*i) && t.client.as_ref().is_some_and(|c| c.is_active()))
                .count();
            (0, active as u32)
        }
        _ => (EINVAL, 0),
    }
}

/// Error of [`call`].
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// LNet refused the operation.
    #[error(transparent)]
    Lnet(#[from] lnet::Error),
    /// No reply in time.
    #[error("no reply within {0:?}")]
    Timeout(Duration),
    /// The reply could not be read.
    #[error("bad reply: {0}")]
    Wire(#[from] wire::WireError),
}

/// GETs `len` bytes from `peer`'s bulk MD `bulkid` on the RDMA portal.
pub fn get_bulk(
    node: &Lnet,
    peer: ProcessId,
    bulkid: u64,
    len: usize,
) -> Result<Vec<u8>, CallError> {
    let q = EventQueue::new();
    let h = node.md_bind(
        Md::new(vec![0u8; len])
            .threshold(Threshold::Finite(2))
            .handler(q.handler()),
    )?;
    if let Err(e) = node.get(h, peer, RDMA_PORTAL, bulkid, 0) {
        let _ = node.md_unlink(h);
        return Err(e.into());
    }
    let t = Duration::from_secs(30);
    let Some(mut e) = rpc::wait_final(&q, Instant::now() + t) else {
        let _ = node.md_unlink(h);
        return Err(CallError::Timeout(t));
    };
    e.status?;
    let mut b = e.buffer.take().map(|b| b.into_vec()).unwrap_or_default();
    b.truncate(e.mlength as usize);
    Ok(b)
}

/// One RPC to `peer`'s service `svc`: posts the reply buffer (and `bulk`,
/// for the peer to GET), PUTs the request `make(rpyid, bulkid)` builds,
/// and waits up to `timeout` for the reply.
pub fn call(
    node: &Lnet,
    peer: ProcessId,
    svc: u64,
    feats: u32,
    make: impl FnOnce(u64, u64) -> Body,
    bulk: Option<Vec<u8>>,
    timeout: Duration,
) -> Result<SrpcMsg, CallError> {
    let rpyid = rpc::next_matchbits();
    let bulkid = rpc::next_matchbits();
    let q = EventQueue::new();
    let (_, rh) = rpc::attach_msg_buffer(node, RDMA_PORTAL, peer, rpyid, q.handler())?;
    let mut bh = None;
    if let Some(b) = bulk {
        match node.attach(
            RDMA_PORTAL,
            peer,
            bulkid,
            0,
            Unlink::Unlink,
            InsPos::Tail,
            Md::new(b)
                .options(MdOptions::OP_GET)
                .threshold(Threshold::Finite(1)),
        ) {
            Ok((_, h)) => bh = Some(h),
            Err(e) => {
                let _ = node.md_unlink(rh);
                return Err(e.into());
            }
        }
    }
    let cleanup = |node: &Lnet| {
        let _ = node.md_unlink(rh);
        if let Some(h) = bh {
            let _ = node.md_unlink(h);
        }
    };
    let req = SrpcMsg::new(feats, make(rpyid, bulkid)).encode(cfg!(target_endian = "big"));
    let portal = if svc < 10 {
        FRAMEWORK_REQUEST_PORTAL
    } else {
        wire::REQUEST_PORTAL
    };
    let sent = node
        .md_bind(Md::new(req.to_vec()))
        .and_then(|h| node.put(h, AckReq::NoAck, peer, portal, svc, 0, 0));
    if let Err(e) = sent {
        cleanup(node);
        return Err(e.into());
    }
    let Some(mut e) = rpc::wait_final(&q, Instant::now() + timeout) else {
        cleanup(node);
        return Err(CallError::Timeout(timeout));
    };
    if let Some(h) = bh {
        let _ = node.md_unlink(h);
    }
    e.status.clone()?;
    let mut b = e.buffer.take().map(|b| b.into_vec()).unwrap_or_default();
    b.truncate(e.mlength as usize);
    Ok(SrpcMsg::decode(&b)?)
}
