//! The client side of a test: brw or ping RPCs kept in flight against one
//! or more destinations, as the kernel's test units run them.
//!
//! One brw RPC: post the reply MD (match bits `rpyid`) and the bulk MD
//! (`bulkid`) on [`RDMA_PORTAL`], then PUT the request (no ACK) to the
//! server's request portal. The RPC ends when the request has gone, the
//! bulk has been read or written by the server and the reply has landed;
//! its latency is the time from posting to that moment. A read's data is
//! checked; a reply with an error status, a transport error or a timeout
//! counts as an error, never silently.
//!
//! ```
//! use std::sync::Arc;
//! use std::time::Duration;
//! use lnet_selftest::client::{Client, TestKind, TestSpec};
//! use lnet_selftest::server::Server;
//! use lnet_selftest::bulk::Check;
//! let node = Arc::new(lnd_loopback::builder().build().unwrap());
//! let _srv = Server::start(&node, Default::default()).unwrap();
//! let spec = TestSpec::new(vec![node.id()], TestKind::Brw { write: true, size: 4096, offset: 0, check: Check::Full })
//!     .loops(10);
//! let c = Client::start(&node, spec).unwrap();
//! let r = c.wait(Duration::from_secs(10));
//! assert_eq!((r.rpcs_ok, r.errors()), (10, 0));
//! node.shutdown();
//! ```

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use lnet::pool::MemPool;
use lnet::{
    AckReq, Event, EventHandler, InsPos, Lnet, Md, MdHandle, MdOptions, ProcessId, Threshold,
    Unlink,
};
use tracing::warn;

use crate::bulk::{self, BRW_MAGIC, BRW_POISON, Buf, Check};
use crate::rpc::{self, lock, next_matchbits as next_id};
use crate::wire::{
    Body, BrwReq, LST_BRW_READ, LST_BRW_WRITE, LST_FEAT_BULK_LEN, PingReq, RDMA_PORTAL, Service,
    SrpcMsg,
};

/// `LST_PING_TEST_MAGIC`.
pub const PING_MAGIC: u32 = 0xbaba_baba;

/// What each RPC of a test does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TestKind {
    /// A bulk read or write.
    Brw {
        /// Write (server GETs from us) or read (server PUTs to us).
        write: bool,
        /// Bytes per RPC (1 ..= 1 MiB).
        size: u32,
        /// Offset of the data in its first page (affects page checks).
        offset: u32,
        /// Data check.
        check: Check,
    },
    /// A ping.
    Ping,
}

impl TestKind {
    /// Bulk bytes one RPC moves.
    pub fn bytes_per_rpc(&self) -> u64 {
        match self {
            TestKind::Brw { size, .. } => u64::from(*size),
            TestKind::Ping => 0,
        }
    }
}

/// A test to run.
#[derive(Clone)]
pub struct TestSpec {
    /// Servers; `concurrency` RPCs are kept in flight to each.
    pub dests: Vec<ProcessId>,
    /// What each RPC does.
    pub kind: TestKind,
    /// RPCs in flight per destination (1 ..= 1024).
    pub concurrency: usize,
    /// RPCs per in-flight slot; `None` until stopped.
    pub loops: Option<u64>,
    /// Session features sent (default: `LST_FEAT_BULK_LEN`).
    pub features: u32,
    /// How long an RPC may take before it is aborted and counted failed.
    pub rpc_timeout: Duration,
    /// Take bulk buffers from this pool (an LND's shared memory).
    pub pool: Option<MemPool>,
    /// Write wrong data into the first page of the first `n` writes (see
    /// [`Client::inject_errors`]; set here, it cannot miss the first RPC).
    pub inject_errors: u64,
}

impl TestSpec {
    /// A test of `kind` against `dests`, concurrency 1, until stopped.
    pub fn new(dests: Vec<ProcessId>, kind: TestKind) -> TestSpec {
        TestSpec {
            dests,
            kind,
            concurrency: 1,
            loops: None,
            features: LST_FEAT_BULK_LEN,
            rpc_timeout: Duration::from_secs(64),
            pool: None,
            inject_errors: 0,
        }
    }
    /// Sets the concurrency.
    pub fn concurrency(mut self, c: usize) -> Self {
        self.concurrency = c;
        self
    }
    /// Sets the RPCs per slot.
    pub fn loops(mut self, n: u64) -> Self {
        self.loops = Some(n);
        self
    }
    /// Sets the bulk pool.
    pub fn pool(mut self, p: Option<MemPool>) -> Self {
        self.pool = p;
        self
    }
    /// Corrupts the first `n` writes' data.
    pub fn inject_errors(mut self, n: u64) -> Self {
        self.inject_errors = n;
        self
    }
}

/// Why a test could not start.
#[derive(Debug, thiserror::Error)]
pub enum TestError {
    /// A parameter is out of range.
    #[error("invalid test: {0}")]
    Invalid(&'static str),
}

/// Counters so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Progress {
    /// RPCs that ended well.
    pub rpcs_ok: u64,
    /// RPCs that failed in transport or timed out.
    pub rpcs_failed: u64,
    /// RPCs whose reply had an error status or whose data failed its
    /// check (`brw_errors` / `ping_errors`).
    pub test_errors: u64,
    /// Bulk bytes moved by RPCs that ended well.
    pub bytes: u64,
}

/// The outcome of a test.
#[derive(Clone, Debug)]
pub struct Report {
    /// RPCs that ended well.
    pub rpcs_ok: u64,
    /// RPCs that failed in transport or timed out.
    pub rpcs_failed: u64,
    /// RPCs with an error status or bad data.
    pub test_errors: u64,
    /// Bulk bytes moved by good RPCs.
    pub bytes: u64,
    /// From start to the last RPC's end.
    pub elapsed: Duration,
    /// Latency of good RPCs, nanoseconds.
    pub latency: Histogram<u64>,
    /// The first errors seen (at most 16), for `show_error`.
    pub first_errors: Vec<String>,
}

impl Report {
    /// All errors.
    pub fn errors(&self) -> u64 {
        self.rpcs_failed + self.test_errors
    }
}

struct Rpc {
    slot: usize,
    dest: ProcessId,
    start: Instant,
    pending: AtomicU32,
    failed: Mutex<Option<String>>,
    reply: Mutex<Option<Vec<u8>>>,
    buf: Mutex<Option<Buf>>,
    mds: Mutex<Vec<MdHandle>>,
}

struct Inner {
    node: Weak<Lnet>,
    spec: TestSpec,
    running: AtomicBool,
    active: Mutex<usize>,
    idle: Condvar,
    inflight: Mutex<Vec<Option<Arc<Rpc>>>>,
    left: Vec<AtomicU64>,
    ok: AtomicU64,
    failed: AtomicU64,
    test_errors: AtomicU64,
    hist: Mutex<Histogram<u64>>,
    errors: Mutex<Vec<String>>,
    inject: AtomicU64,
    started: Instant,
    last_end: Mutex<Instant>,
    seq: AtomicU32,
    /// Slots whose next RPC the driver thread starts (see [`next_rpc`]).
    ready: Mutex<std::collections::VecDeque<(usize, Option<Buf>)>>,
    ready_cv: Condvar,
}

thread_local! {
    /// True while this thread is inside [`start_rpc`]: an RPC that ends
    /// during its own start (a synchronous transport such as `lo`) hands
    /// its slot to the driver thread instead of recursing.
    static STARTING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// A running test.
pub struct Client {
    inner: Arc<Inner>,
}

impl Client {
    /// Starts the test on `node`.
    pub fn start(node: &Arc<Lnet>, spec: TestSpec) -> Result<Client, TestError> {
        if spec.dests.is_empty() {
            return Err(TestError::Invalid("no destination"));
        }
        if spec.concurrency == 0 || spec.concurrency > 1024 {
            return Err(TestError::Invalid("concurrency must be 1 ..= 1024"));
        }
        if let TestKind::Brw {
            size,
            offset,
            check,
            ..
        } = spec.kind
        {
            if size == 0 || size > bulk::MAX_BULK {
                return Err(TestError::Invalid("size must be 1 B ..= 1 MiB"));
            }
            if offset as usize >= bulk::PAGE {
                return Err(TestError::Invalid("offset must be under a page"));
            }
            if check.checks() && (size % 8 != 0 || offset % 8 != 0) {
                return Err(TestError::Invalid(
                    "data checks need a size and offset that are multiples of 8",
                ));
            }
            if check == Check::Simple && offset != 0 {
                // Each side checks the edges of its own pages, and the
                // server's bulk starts at offset 0 (as in the kernel): the
                // edges would not line up. `full` checks every word.
                return Err(TestError::Invalid(
                    "check=simple needs offset 0 (use check=full with an offset)",
                ));
            }
            if spec.features & LST_FEAT_BULK_LEN == 0 && size as usize % bulk::PAGE != 0 {
                return Err(TestError::Invalid("without BULK_LEN sizes are whole pages"));
            }
        }
        let slots = spec.dests.len() * spec.concurrency;
        let hist = Histogram::new_with_bounds(1, 600_000_000_000, 3)
            .map_err(|_| TestError::Invalid("histogram"))?;
        let now = Instant::now();
        let inject = spec.inject_errors;
        let inner = Arc::new(Inner {
            node: Arc::downgrade(node),
            left: (0..slots)
                .map(|_| AtomicU64::new(spec.loops.unwrap_or(u64::MAX)))
                .collect(),
            spec,
            running: AtomicBool::new(true),
            active: Mutex::new(slots),
            idle: Condvar::new(),
            inflight: Mutex::new(vec![None; slots]),
            ok: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            test_errors: AtomicU64::new(0),
            hist: Mutex::new(hist),
            errors: Mutex::new(Vec::new()),
            inject: AtomicU64::new(inject),
            started: now,
            last_end: Mutex::new(now),
            seq: AtomicU32::new(0),
            ready: Mutex::new(std::collections::VecDeque::new()),
            ready_cv: Condvar::new(),
        });
        {
            let mut q = lock(&inner.ready);
            for slot in 0..slots {
                let buf = match inner.spec.kind {
                    TestKind::Brw { size, .. } => {
                        Some(Buf::alloc(inner.spec.pool.as_ref(), size as usize))
                    }
                    TestKind::Ping => None,
                };
                q.push_back((slot, buf));
            }
        }
        let w = Arc::downgrade(&inner);
        std::thread::Builder::new()
            .name("lst-client".into())
            .spawn(move || driver(w))
            .map_err(|_| TestError::Invalid("cannot start the client thread"))?;
        Ok(Client { inner })
    }

    /// Counters so far.
    pub fn progress(&self) -> Progress {
        let i = &self.inner;
        // Bytes follow from the RPC count (one load: the two always agree).
        let ok = i.ok.load(Relaxed);
        Progress {
            rpcs_ok: ok,
            rpcs_failed: i.failed.load(Relaxed),
            test_errors: i.test_errors.load(Relaxed),
            bytes: ok * i.spec.kind.bytes_per_rpc(),
        }
    }

    /// True while RPCs are in flight or to come.
    pub fn is_active(&self) -> bool {
        *lock(&self.inner.active) > 0
    }

    /// Stops starting RPCs; those in flight go on to their end.
    pub fn stop(&self) {
        self.inner.running.store(false, Relaxed);
    }

    /// Write wrong data into the first page of the next `n` writes (to
    /// test that servers' checks catch it).
    pub fn inject_errors(&self, n: u64) {
        self.inner.inject.store(n, Relaxed);
    }

    /// Aborts RPCs older than the RPC timeout; returns how many.
    pub fn reap(&self) -> usize {
        let old: Vec<Arc<Rpc>> = lock(&self.inner.inflight)
            .iter()
            .flatten()
            .filter(|r| r.start.elapsed() > self.inner.spec.rpc_timeout)
            .cloned()
            .collect();
        for r in &old {
            abort(&self.inner, r, "timed out");
        }
        old.len()
    }

    /// Waits until every slot is done (loops run out, or [`stop`](Self::stop)
    /// was called), aborting RPCs that pass the RPC timeout and, after
    /// `grace`, every RPC still in flight. Then returns the report.
    pub fn wait(&self, grace: Duration) -> Report {
        let deadline = Instant::now() + grace;
        let mut aborted = false;
        loop {
            {
                let a = lock(&self.inner.active);
                if *a == 0 {
                    break;
                }
                let _ = self
                    .inner
                    .idle
                    .wait_timeout(a, Duration::from_millis(100))
                    .unwrap_or_else(|p| p.into_inner());
            }
            self.reap();
            if !aborted && Instant::now() > deadline {
                aborted = true;
                self.stop();
                let all: Vec<Arc<Rpc>> = lock(&self.inner.inflight)
                    .iter()
                    .flatten()
                    .cloned()
                    .collect();
                for r in &all {
                    abort(&self.inner, r, "aborted at the end of the test");
                }
            }
            if aborted && Instant::now() > deadline + Duration::from_secs(10) {
                // Nothing answers even the unlink: give up waiting.
                break;
            }
        }
        self.report()
    }

    /// The report so far.
    pub fn report(&self) -> Report {
        let i = &self.inner;
        let ok = i.ok.load(Relaxed);
        Report {
            rpcs_ok: ok,
            rpcs_failed: i.failed.load(Relaxed),
            test_errors: i.test_errors.load(Relaxed),
            bytes: ok * i.spec.kind.bytes_per_rpc(),
            elapsed: lock(&i.last_end).duration_since(i.started),
            latency: lock(&i.hist).clone(),
            first_errors: lock(&i.errors).clone(),
        }
    }

    /// What each RPC does.
    pub fn kind(&self) -> TestKind {
        self.inner.spec.kind
    }

    /// Forgets the latencies recorded so far (after a warm-up).
    pub fn reset_latency(&self) {
        lock(&self.inner.hist).reset();
    }

    /// The latencies recorded so far, nanoseconds.
    pub fn latency(&self) -> Histogram<u64> {
        lock(&self.inner.hist).clone()
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.stop();
    }
}

fn note_error(inner: &Inner, msg: String) {
    warn!("selftest: {msg}");
    let mut e = lock(&inner.errors);
    if e.len() < 16 {
        e.push(msg);
    }
}

fn slot_done(inner: &Inner) {
    let mut a = lock(&inner.active);
    *a = a.saturating_sub(1);
    if *a == 0 {
        inner.idle.notify_all();
    }
}

fn abort(inner: &Inner, rpc: &Rpc, why: &str) {
    {
        let mut f = lock(&rpc.failed);
        if f.is_none() {
            *f = Some(why.to_string());
        }
    }
    let mds = lock(&rpc.mds).clone();
    if let Some(node) = inner.node.upgrade() {
        for md in mds {
            let _ = node.md_unlink(md);
        }
    }
}

/// Starts queued slots' RPCs until every slot has ended.
fn driver(w: Weak<Inner>) {
    loop {
        let Some(inner) = w.upgrade() else { return };
        let item = {
            let mut q = lock(&inner.ready);
            if q.is_empty() {
                if *lock(&inner.active) == 0 {
                    return;
                }
                q = inner
                    .ready_cv
                    .wait_timeout(q, Duration::from_millis(50))
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
            q.pop_front()
        };
        if let Some((slot, buf)) = item {
            start_rpc(&inner, slot, buf);
        }
    }
}

/// Starts the next RPC of `slot` now, or (when called from inside an RPC's
/// start on this thread) queues it for the driver thread.
fn next_rpc(inner: &Arc<Inner>, slot: usize, buf: Option<Buf>) {
    if STARTING.with(|s| s.get()) {
        lock(&inner.ready).push_back((slot, buf));
        inner.ready_cv.notify_one();
        return;
    }
    start_rpc(inner, slot, buf);
}

fn start_rpc(inner: &Arc<Inner>, slot: usize, buf: Option<Buf>) {
    STARTING.with(|s| s.set(true));
    start_rpc_inner(inner, slot, buf);
    STARTING.with(|s| s.set(false));
}

/// Starts the next RPC of `slot` (or ends the slot).
fn start_rpc_inner(inner: &Arc<Inner>, slot: usize, buf: Option<Buf>) {
    if !inner.running.load(Relaxed)
        || inner.left[slot]
            .fetch_update(Relaxed, Relaxed, |n| n.checked_sub(1))
            .is_err()
    {
        return slot_done(inner);
    }
    let Some(node) = inner.node.upgrade() else {
        return slot_done(inner);
    };
    let dest = inner.spec.dests[slot % inner.spec.dests.len()];
    let rpyid = next_id();
    let bulkid = next_id();
    let kind = inner.spec.kind;
    let rpc = Arc::new(Rpc {
        slot,
        dest,
        start: Instant::now(),
        pending: AtomicU32::new(if matches!(kind, TestKind::Ping) { 2 } else { 3 }),
        failed: Mutex::new(None),
        reply: Mutex::new(None),
        buf: Mutex::new(None),
        mds: Mutex::new(Vec::new()),
    });
    lock(&inner.inflight)[slot] = Some(rpc.clone());
    let handler = |what: &'static str| {
        let w = Arc::downgrade(inner);
        let r = rpc.clone();
        EventHandler::callback(move |mut e: Event| {
            if !e.unlinked {
                return;
            }
            if let Err(err) = &e.status {
                let mut f = lock(&r.failed);
                if f.is_none() {
                    *f = Some(format!("{what}: {err}"));
                }
            }
            match what {
                "reply" if e.kind == lnet::EventKind::Put && e.status.is_ok() => {
                    *lock(&r.reply) = e.buffer.take().map(|b| b.into_vec());
                }
                "bulk" => *lock(&r.buf) = e.buffer.take().and_then(Buf::from_md),
                _ => {}
            }
            if r.pending.fetch_sub(1, Relaxed) == 1 {
                if let Some(i) = w.upgrade() {
                    finish(&i, &r);
                }
            }
        })
    };
    let fail_now = |msg: String| {
        *lock(&rpc.failed) = Some(msg);
    };
    // The reply buffer.
    match rpc::attach_msg_buffer(&node, RDMA_PORTAL, dest, rpyid, handler("reply")) {
        Ok((_, md)) => lock(&rpc.mds).push(md),
        Err(e) => {
            fail_now(format!("reply buffer: {e}"));
            lock(&inner.inflight)[slot] = None;
            finish_counted(inner, &rpc);
            return;
        }
    }
    let body = match kind {
        TestKind::Brw {
            write,
            size,
            offset,
            check,
        } => {
            let mut b = buf.unwrap_or_else(|| Buf::alloc(inner.spec.pool.as_ref(), size as usize));
            if !b.resize(size as usize) {
                b = Buf::alloc(inner.spec.pool.as_ref(), size as usize);
            }
            let off = offset as usize;
            if write {
                let magic = rpc::send_magic(&inner.inject);
                bulk::fill(b.as_mut_slice(), off, check, BRW_MAGIC);
                if magic != BRW_MAGIC {
                    let first = (bulk::PAGE - off).min(size as usize);
                    bulk::fill(&mut b.as_mut_slice()[..first], off, check, magic);
                }
            } else {
                bulk::fill(b.as_mut_slice(), off, check, BRW_POISON);
            }
            let opts = if write {
                MdOptions::OP_GET
            } else {
                MdOptions::OP_PUT
            };
            match node.attach(
                RDMA_PORTAL,
                dest,
                bulkid,
                0,
                Unlink::Unlink,
                InsPos::Tail,
                Md::new(b.into_md())
                    .options(opts)
                    .threshold(Threshold::Finite(1))
                    .handler(handler("bulk")),
            ) {
                Ok((_, md)) => lock(&rpc.mds).push(md),
                Err(e) => {
                    // Undo the reply buffer; its unlink ends the RPC.
                    fail_now(format!("bulk buffer: {e}"));
                    rpc.pending.fetch_sub(1, Relaxed);
                    rpc.pending.fetch_sub(1, Relaxed);
                    abort(inner, &rpc, "bulk buffer");
                    return;
                }
            }
            Body::BrwReq(BrwReq {
                rpyid,
                bulkid,
                rw: if write { LST_BRW_WRITE } else { LST_BRW_READ },
                len: size,
                flags: check as u32,
            })
        }
        TestKind::Ping => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            Body::PingReq(PingReq {
                rpyid,
                magic: PING_MAGIC,
                seq: inner.seq.fetch_add(1, Relaxed),
                time_sec: now.as_secs(),
                time_nsec: u64::from(now.subsec_nanos()),
            })
        }
    };
    let svc = if matches!(kind, TestKind::Ping) {
        Service::Ping
    } else {
        Service::Brw
    };
    let msg = SrpcMsg::new(inner.spec.features, body).encode(cfg!(target_endian = "big"));
    match node.md_bind(
        Md::new(msg.to_vec())
            .threshold(Threshold::Finite(1))
            .handler(handler("request")),
    ) {
        Ok(h) => {
            lock(&rpc.mds).push(h);
            if let Err(e) = node.put(h, AckReq::NoAck, dest, svc.portal(), svc as u64, 0, 0) {
                // No request went: unlink all three MDs; their final
                // events end the RPC as failed.
                fail_now(format!("request: {e}"));
                abort(inner, &rpc, "request");
            }
        }
        Err(e) => {
            fail_now(format!("request: {e}"));
            rpc.pending.fetch_sub(1, Relaxed);
            abort(inner, &rpc, "request");
        }
    }
}

/// Ends an RPC that never got going.
fn finish_counted(inner: &Arc<Inner>, rpc: &Rpc) {
    inner.failed.fetch_add(1, Relaxed);
    if let Some(m) = lock(&rpc.failed).clone() {
        note_error(inner, format!("RPC to {} failed: {m}", rpc.dest));
    }
    // Do not spin on a node that cannot post buffers: end the slot.
    slot_done(inner);
}

fn finish(inner: &Arc<Inner>, rpc: &Arc<Rpc>) {
    let slot = rpc.slot;
    lock(&inner.inflight)[slot] = None;
    let buf = lock(&rpc.buf).take();
    let failed = lock(&rpc.failed).take();
    let now = Instant::now();
    *lock(&inner.last_end) = now;
    if let Some(m) = failed {
        inner.failed.fetch_add(1, Relaxed);
        note_error(inner, format!("RPC to {} failed: {m}", rpc.dest));
    } else {
        let reply = lock(&rpc.reply).take().unwrap_or_default();
        match check_reply(inner, &reply, buf.as_ref()) {
            Ok(()) => {
                inner.ok.fetch_add(1, Relaxed);
                let ns = now.duration_since(rpc.start).as_nanos() as u64;
                let _ = lock(&inner.hist).record(ns.max(1));
            }
            Err(m) => {
                inner.test_errors.fetch_add(1, Relaxed);
                note_error(inner, format!("RPC to {}: {m}", rpc.dest));
            }
        }
    }
    next_rpc(inner, slot, buf);
}

fn check_reply(inner: &Inner, reply: &[u8], buf: Option<&Buf>) -> Result<(), String> {
    let msg = SrpcMsg::decode(reply).map_err(|e| format!("bad reply: {e}"))?;
    let swabbed = SrpcMsg::is_swabbed(reply);
    match (inner.spec.kind, msg.body) {
        (TestKind::Ping, Body::PingReply { status, magic, .. }) => {
            if status != 0 {
                return Err(format!("ping status {status}"));
            }
            if magic != PING_MAGIC {
                return Err(format!("ping magic {magic:#x}"));
            }
            Ok(())
        }
        (
            TestKind::Brw {
                write,
                offset,
                check,
                ..
            },
            Body::BrwReply { status },
        ) => {
            if status != 0 {
                return Err(format!("brw status {status}"));
            }
            if write {
                return Ok(());
            }
            let Some(b) = buf else {
                return Err("bulk buffer lost".into());
            };
            let magic = if swabbed {
                BRW_MAGIC.swap_bytes()
            } else {
                BRW_MAGIC
            };
            bulk::check(b.as_slice(), offset as usize, check, magic).map_err(|m| {
                format!(
                    "bulk data corrupted at byte {}: {:#x}, {:#x} expected",
                    m.at, m.found, m.expected
                )
            })
        }
        (_, b) => Err(format!("reply of type {}", b.msg_type())),
    }
}
