//! The selftest service and client over `lo` and `shm` (two shm nodes in
//! this process): every mode with data checks, injected corruption caught
//! by `simple` and `full`, bad requests refused.

use std::sync::Arc;
use std::time::Duration;

use lnd_loopback::shm::{ShmConfig, ShmLnd};
use lnet::{Lnet, ProcessId};
use lnet_selftest::bulk::Check;
use lnet_selftest::client::{Client, TestKind, TestSpec};
use lnet_selftest::server::{Server, ServerConfig};

const T: Duration = Duration::from_secs(30);

fn lo() -> Arc<Lnet> {
    Arc::new(lnd_loopback::builder().build().unwrap())
}

struct ShmPair {
    a: Arc<Lnet>,
    b: Arc<Lnet>,
    pool_a: Option<lnet::pool::MemPool>,
    pool_b: Option<lnet::pool::MemPool>,
    dir: std::path::PathBuf,
}

impl Drop for ShmPair {
    fn drop(&mut self) {
        self.a.shutdown();
        self.b.shutdown();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn shm_pair(tag: &str) -> ShmPair {
    let dir = std::env::temp_dir().join(format!("lst-svc-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    let mk = |n: u32| {
        let mut cfg = ShmConfig::new(n).dir(&dir);
        cfg.pool_size = 16 << 20;
        let s = Arc::new(ShmLnd::new(cfg).unwrap());
        let node = Arc::new(lnd_loopback::builder().ni(s.clone()).build().unwrap());
        (node, s.pool())
    };
    let (a, pool_a) = mk(1);
    let (b, pool_b) = mk(2);
    ShmPair {
        a,
        b,
        pool_a,
        pool_b,
        dir,
    }
}

fn brw(write: bool, size: u32, offset: u32, check: Check) -> TestKind {
    TestKind::Brw {
        write,
        size,
        offset,
        check,
    }
}

fn run(client: &Arc<Lnet>, server: ProcessId, spec: TestSpec) -> lnet_selftest::client::Report {
    let c = Client::start(
        client,
        TestSpec {
            dests: vec![server],
            ..spec
        },
    )
    .unwrap();
    c.wait(T)
}

fn every_mode(client: &Arc<Lnet>, server: ProcessId, pool: Option<lnet::pool::MemPool>) {
    for check in [Check::Simple, Check::Full] {
        for write in [true, false] {
            for (size, off) in [
                (8, 0),
                (4096, 0),
                (4096 + 8, 0),
                (65536, 8),
                (1 << 20, 0),
                (300_000, 4088),
            ] {
                let off = if check == Check::Simple { 0 } else { off };
                let spec = TestSpec::new(vec![], brw(write, size, off, check))
                    .concurrency(4)
                    .loops(3)
                    .pool(pool.clone());
                let r = run(client, server, spec);
                assert_eq!(
                    (r.rpcs_ok, r.errors()),
                    (12, 0),
                    "write={write} size={size} off={off} {check:?}: {:?}",
                    r.first_errors
                );
                assert_eq!(r.bytes, 12 * u64::from(size));
                assert_eq!(r.latency.len(), 12);
            }
        }
    }
    let r = run(
        client,
        server,
        TestSpec::new(vec![], TestKind::Ping)
            .concurrency(8)
            .loops(50),
    );
    assert_eq!((r.rpcs_ok, r.errors()), (400, 0), "{:?}", r.first_errors);
}

#[test]
fn lo_every_mode_with_checks() {
    let node = lo();
    let srv = Server::start(&node, ServerConfig::default()).unwrap();
    every_mode(&node, node.id(), None);
    let s = srv.stats();
    assert_eq!(s.brw_errors, 0);
    assert_eq!(s.pings, 400);
    assert!(s.bulk_get > 0 && s.bulk_put > 0);
    assert_eq!(s.rpcs_rcvd, s.rpcs_sent);
    node.shutdown();
}

#[test]
fn shm_every_mode_with_checks() {
    let p = shm_pair("modes");
    let srv = Server::start(
        &p.a,
        ServerConfig {
            pool: p.pool_a.clone(),
            ..Default::default()
        },
    )
    .unwrap();
    every_mode(&p.b, p.a.id(), p.pool_b.clone());
    // Heap buffers on the client too (the CMA or bounce path).
    every_mode(&p.b, p.a.id(), None);
    assert_eq!(srv.stats().brw_errors, 0);
}

fn corruption_is_caught(client: &Arc<Lnet>, server_node: &Arc<Lnet>, srv: &Server) {
    for check in [Check::Simple, Check::Full] {
        // A write whose data is bad: the server's check fails it, the
        // reply says EBADMSG, the client counts it.
        let before = srv.stats().brw_errors;
        // Injected in the spec: set before the first RPC starts (set after
        // `start`, a fast transport could finish all ten first).
        let c = Client::start(
            client,
            TestSpec::new(vec![server_node.id()], brw(true, 65536, 0, check))
                .loops(10)
                .inject_errors(1),
        )
        .unwrap();
        let r = c.wait(T);
        // Exactly one RPC of ten carries it.
        assert_eq!(
            (r.rpcs_ok, r.test_errors, r.rpcs_failed),
            (9, 1, 0),
            "{check:?}"
        );
        assert!(
            r.first_errors[0].contains("status 74"),
            "{:?}",
            r.first_errors
        );
        assert_eq!(srv.stats().brw_errors, before + 1);
        // A read whose data is bad: the client's check catches it.
        srv.inject_errors(1);
        let r = run(
            client,
            server_node.id(),
            TestSpec::new(vec![], brw(false, 65536, 0, check)).loops(10),
        );
        assert_eq!((r.rpcs_ok, r.test_errors), (9, 1), "{check:?}");
        assert!(
            r.first_errors[0].contains("corrupted"),
            "{:?}",
            r.first_errors
        );
    }
    // With no check, corruption goes unseen (and nothing is counted).
    srv.inject_errors(1);
    let r = run(
        client,
        server_node.id(),
        TestSpec::new(vec![], brw(false, 65536, 0, Check::None)).loops(10),
    );
    assert_eq!((r.rpcs_ok, r.errors()), (10, 0));
}

#[test]
fn lo_corruption_is_caught() {
    let node = lo();
    let srv = Server::start(&node, ServerConfig::default()).unwrap();
    corruption_is_caught(&node, &node, &srv);
    node.shutdown();
}

#[test]
fn shm_corruption_is_caught() {
    let p = shm_pair("corrupt");
    let srv = Server::start(&p.a, ServerConfig::default()).unwrap();
    corruption_is_caught(&p.b, &p.a, &srv);
}

#[test]
fn no_server_is_an_error_not_a_hang() {
    // A node with nothing on the selftest portals: requests are dropped,
    // each RPC times out and is counted as failed.
    let node = lo();
    let mut spec = TestSpec::new(vec![node.id()], brw(true, 4096, 0, Check::None)).loops(2);
    spec.rpc_timeout = Duration::from_millis(300);
    let c = Client::start(&node, spec).unwrap();
    let r = c.wait(T);
    assert_eq!((r.rpcs_ok, r.rpcs_failed), (0, 2));
    assert!(
        r.first_errors[0].contains("timed out"),
        "{:?}",
        r.first_errors
    );
    node.shutdown();
}

#[test]
fn bad_parameters_are_refused() {
    let node = lo();
    let _srv = Server::start(&node, ServerConfig::default()).unwrap();
    for (kind, conc) in [
        (brw(true, 0, 0, Check::None), 1),
        (brw(true, (1 << 20) + 1, 0, Check::None), 1),
        (brw(true, 4096, 4096, Check::None), 1),
        (brw(true, 4095, 0, Check::Full), 1),
        (brw(true, 4096, 8, Check::Simple), 1),
        (TestKind::Ping, 0),
        (TestKind::Ping, 1025),
    ] {
        assert!(
            Client::start(
                &node,
                TestSpec::new(vec![node.id()], kind).concurrency(conc)
            )
            .is_err(),
            "{kind:?} x{conc}"
        );
    }
    node.shutdown();
}

/// PUTs raw request bytes to the brw service and returns the reply's
/// bytes (or None when no reply came within 2 s).
fn raw_request(node: &Arc<Lnet>, bytes: Vec<u8>, rpyid: u64) -> Option<Vec<u8>> {
    use lnet::{AckReq, EventQueue, InsPos, Md, MdOptions, Threshold, Unlink};
    use lnet_selftest::wire::{RDMA_PORTAL, REQUEST_PORTAL};
    let q = EventQueue::new();
    let (_, reply_md) = node
        .attach(
            RDMA_PORTAL,
            ProcessId::ANY,
            rpyid,
            0,
            Unlink::Unlink,
            InsPos::Tail,
            Md::new(vec![0u8; 160])
                .options(MdOptions::OP_PUT)
                .threshold(Threshold::Finite(1))
                .handler(q.handler()),
        )
        .unwrap();
    let md = node.md_bind(Md::new(bytes)).unwrap();
    node.put(md, AckReq::NoAck, node.id(), REQUEST_PORTAL, 11, 0, 0)
        .unwrap();
    let got = q
        .recv_timeout(Duration::from_secs(2))
        .map(|mut e| e.buffer.take().unwrap().into_vec());
    if got.is_none() {
        node.md_unlink(reply_md).unwrap();
    }
    got
}

#[test]
fn bad_requests_get_errors_or_are_dropped() {
    use lnet_selftest::wire::{Body, BrwReq, SrpcMsg};
    let node = lo();
    let srv = Server::start(&node, ServerConfig::default()).unwrap();
    let status = |b: Vec<u8>| match SrpcMsg::decode(&b).unwrap().body {
        Body::BrwReply { status } => status,
        b => panic!("{b:?}"),
    };
    let req = |rw, len, flags, feats| {
        SrpcMsg::new(
            feats,
            Body::BrwReq(BrwReq {
                rpyid: 77,
                bulkid: 78,
                rw,
                len,
                flags,
            }),
        )
        .encode(false)
        .to_vec()
    };
    // Unknown direction, unknown check, zero and oversized lengths, a
    // partial page without BULK_LEN, unknown feature bits: each answered
    // with an error status and no bulk.
    for (bytes, want) in [
        (req(7, 4096, 1, 1), 22),
        (req(2, 4096, 9, 1), 22),
        (req(2, 0, 1, 1), 22),
        (req(2, (1 << 20) + 1, 1, 1), 22),
        (req(2, 100, 1, 0), 22),
        (req(2, 4096, 1, 0x80), 71),
    ] {
        let r = raw_request(&node, bytes, 77).expect("a reply");
        assert_eq!(status(r), want);
    }
    // Another version: EPROTO, as the kernel answers.
    let mut b = req(2, 4096, 1, 1);
    b[4] = 9;
    assert_eq!(status(raw_request(&node, b, 77).expect("reply")), 71);
    // Garbage: dropped without a reply, counted.
    assert!(raw_request(&node, vec![0xa5; 160], 77).is_none());
    let s = srv.stats();
    assert_eq!(s.rpcs_refused, 7);
    assert_eq!(s.rpcs_dropped, 1);
    assert_eq!(s.bulk_get + s.bulk_put, 0);
    // The service still works.
    let r = run(
        &node,
        node.id(),
        TestSpec::new(vec![], TestKind::Ping).loops(3),
    );
    assert_eq!(r.rpcs_ok, 3);
    node.shutdown();
}
