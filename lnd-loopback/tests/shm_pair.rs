//! Two shm nodes in one process (the multi-process tests live in
//! `examples/tests/shm.rs`): every bulk path, chosen by configuration and
//! by where the buffers live, with the data checked and the path proven by
//! the counters.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use lnd_loopback::LoLnd;
use lnd_loopback::shm::{ShmConfig, ShmLnd, StatsSnapshot, TestDir};
use lnet::{
    AckReq, Error, Event, EventKind, EventQueue, InsPos, Lnet, LnetBuilder, Md, MdBuffer,
    MdOptions, ProcessId, Segment, Threshold, Unlink,
};

const T: Duration = Duration::from_secs(20);
const PORTAL: u32 = 12;

fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 12) as u8)
        .collect()
}

fn tmpdir(name: &str) -> TestDir {
    TestDir::new(name)
}

struct Node {
    l: Lnet,
    shm: Arc<ShmLnd>,
}

fn node(addr: u32, dir: &PathBuf, tune: impl FnOnce(&mut ShmConfig)) -> Node {
    let mut cfg = ShmConfig::new(addr).dir(dir);
    cfg.pool_size = 8 << 20;
    tune(&mut cfg);
    let shm = Arc::new(ShmLnd::new(cfg).unwrap());
    let l = LnetBuilder::new(Arc::new(LoLnd::new()))
        .ni(shm.clone())
        .response_timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    Node { l, shm }
}

impl Node {
    fn id(&self) -> ProcessId {
        ProcessId::new(self.shm.nid(), lnet::LNET_PID_LUSTRE)
    }
    fn stats(&self) -> StatsSnapshot {
        self.shm.stats()
    }
}

fn finals(q: &EventQueue) -> Vec<Event> {
    let mut v = Vec::new();
    loop {
        let e = q.recv_timeout(T).expect("event");
        let done = e.unlinked;
        v.push(e);
        if done {
            return v;
        }
    }
}

fn frags(data: &[u8], piece: usize) -> MdBuffer {
    if data.is_empty() {
        return MdBuffer::from(Vec::new());
    }
    let segs: Vec<Segment> = data.chunks(piece).map(|c| c.to_vec().into()).collect();
    MdBuffer::from_frags(segs).unwrap()
}

/// Target MD on `n`: `len` bytes (in `buf`), PUT and GET, retained.
fn target(n: &Node, buf: MdBuffer) -> EventQueue {
    target_opts(n, buf, MdOptions::OP_PUT | MdOptions::OP_GET)
}

fn target_opts(n: &Node, buf: MdBuffer, opts: MdOptions) -> EventQueue {
    let q = EventQueue::new();
    n.l.attach(
        PORTAL,
        ProcessId::ANY,
        0,
        u64::MAX,
        Unlink::Retain,
        InsPos::Tail,
        Md::new(buf)
            .options(opts | MdOptions::MANAGE_REMOTE)
            .threshold(Threshold::Infinite)
            .handler(q.handler()),
    )
    .unwrap();
    q
}

fn put(from: &Node, to: &Node, src: MdBuffer, off: u32) -> Result<(), Error> {
    let q = EventQueue::new();
    let md = from
        .l
        .md_bind(
            Md::new(src)
                .threshold(Threshold::Finite(2))
                .handler(q.handler()),
        )
        .unwrap();
    from.l.put(md, AckReq::Ack, to.id(), PORTAL, 1, off, 0)?;
    for e in finals(&q) {
        e.status?;
    }
    Ok(())
}

fn get(
    from: &Node,
    to: &Node,
    sink: MdBuffer,
    opts: MdOptions,
    off: u32,
) -> Result<Vec<u8>, Error> {
    let q = EventQueue::new();
    let md = from
        .l
        .md_bind(
            Md::new(sink)
                .options(opts)
                .threshold(Threshold::Finite(2))
                .handler(q.handler()),
        )
        .unwrap();
    from.l.get(md, to.id(), PORTAL, 2, off)?;
    let mut ev = finals(&q);
    for e in &ev {
        e.status.clone()?;
    }
    assert!(ev.iter().any(|e| e.kind == EventKind::Reply));
    Ok(ev
        .iter_mut()
        .find_map(|e| e.buffer.take())
        .unwrap()
        .into_vec())
}

const SIZES: [usize; 8] = [0, 1, 4096, 8104, 8105, 65536, 300_000, 1 << 20];

/// PUT then GET back every size through `a` -> `b`; `src`/`sink` build the
/// initiator's buffers.
fn round_trips(
    a: &Node,
    b: &Node,
    src: impl Fn(&Node, &[u8]) -> MdBuffer,
    sink: impl Fn(&Node, usize) -> MdBuffer,
) {
    for (i, &n) in SIZES.iter().enumerate() {
        let data = pattern(n, i as u8 + 3);
        let off = (i as u32) << 20;
        put(a, b, src(a, &data), off).unwrap_or_else(|e| panic!("put {n}: {e}"));
        let back = get(a, b, sink(a, n), MdOptions::default(), off)
            .unwrap_or_else(|e| panic!("get {n}: {e}"));
        assert_eq!(back.len(), n);
        assert!(back == data, "data of {n} bytes differs");
    }
}

fn pool_buf(n: &Node, data: &[u8]) -> MdBuffer {
    let mut b = n.shm.pool().unwrap().alloc(data.len()).unwrap();
    b.copy_from_slice(data);
    MdBuffer::from(b)
}

#[test]
fn cma_path_between_user_buffers() {
    let d = tmpdir("cma");
    let a = node(1, &d, |_| {});
    let b = node(2, &d, |_| {});
    let _q = target(&b, MdBuffer::from(vec![0u8; 8 << 20]));
    round_trips(
        &a,
        &b,
        |_, d| frags(d, 4096 * 3 + 5),
        |_, n| frags(&vec![0; n], 8191),
    );
    let (sa, sb) = (a.stats(), b.stats());
    assert_eq!(a.shm.cma_with(b.shm.nid()), Some(true));
    // 4 sizes above the eager size each way.
    assert_eq!(sb.bulk_cma, 4, "{sb:?}");
    assert_eq!(sa.bulk_cma, 4, "{sa:?}");
    assert_eq!(
        sa.bulk_bounce + sb.bulk_bounce + sa.bulk_pool_read + sb.bulk_pool_read,
        0
    );
    assert!(sa.tx_inline >= 4);
    a.l.shutdown();
    b.l.shutdown();
}

#[test]
fn pool_paths_one_memcpy_through_the_mapping() {
    let d = tmpdir("pool");
    let a = node(1, &d, |_| {});
    let b = node(2, &d, |_| {});
    let pool_b = b.shm.pool().unwrap().alloc(8 << 20).unwrap();
    let _q = target(&b, MdBuffer::from(pool_b));
    // Source in a's pool: b copies from its mapping of a's pool. GETs land
    // from b's pool (the target MD) into a's plain memory: a copies from b's.
    round_trips(&a, &b, pool_buf, |_, n| frags(&vec![0; n], 8191));
    let (sa, sb) = (a.stats(), b.stats());
    assert_eq!(sb.bulk_pool_read, 4, "{sb:?}");
    assert_eq!(sa.bulk_pool_read, 4, "{sa:?}");
    assert_eq!(
        sa.bulk_cma + sb.bulk_cma + sa.bulk_bounce + sb.bulk_bounce,
        0
    );
    // Sink in a's own pool, source plain memory of b: b copies into a's pool.
    let e = node(3, &d, |_| {});
    let _q2 = target(&e, MdBuffer::from(vec![0u8; 8 << 20]));
    for (i, &n) in SIZES.iter().enumerate() {
        let data = pattern(n, i as u8);
        put(&a, &e, frags(&data, 5000), 0).unwrap();
        let sink = MdBuffer::from(a.shm.pool().unwrap().alloc(n).unwrap());
        assert!(get(&a, &e, sink, MdOptions::default(), 0).unwrap() == data);
    }
    assert_eq!(a.stats().bulk_pool_write, 4, "{:?}", a.stats());
    for n in [a, b, e] {
        n.l.shutdown();
    }
}

#[test]
fn bounce_path_when_cma_and_pools_are_off() {
    let d = tmpdir("bounce");
    let off = |c: &mut ShmConfig| {
        c.use_cma = false;
        c.use_pool = false;
        c.bounce_size = 64 * 1024;
        c.bounce_buffers = 3;
    };
    let a = node(1, &d, off);
    let b = node(2, &d, off);
    let _q = target(&b, MdBuffer::from(vec![0u8; 8 << 20]));
    round_trips(
        &a,
        &b,
        |_, d| frags(d, 4099 * 2),
        |_, n| frags(&vec![0; n], 4095 * 3),
    );
    let (sa, sb) = (a.stats(), b.stats());
    assert_eq!((sa.bulk_bounce, sb.bulk_bounce), (4, 4), "{sa:?} {sb:?}");
    assert_eq!(
        sa.bulk_cma + sb.bulk_cma + sa.bulk_pool_read + sb.bulk_pool_read,
        0
    );
    a.l.shutdown();
    b.l.shutdown();
}

#[test]
fn loans_are_zero_copy_and_return_the_chunk() {
    let d = tmpdir("loan");
    let a = node(1, &d, |_| {});
    let b = node(2, &d, |_| {});
    let pool_b = b.shm.pool().unwrap();
    let data = pattern(1 << 20, 9);
    let mut chunk = pool_b.alloc(data.len()).unwrap();
    chunk.copy_from_slice(&data);
    let frozen = chunk.freeze();
    let addr = frozen.as_ptr() as usize;
    let _q = target_opts(&b, MdBuffer::from(frozen), MdOptions::OP_GET);
    let used_before = pool_b.stats().in_use;
    for n in [8105usize, 65536, 1 << 20] {
        let q = EventQueue::new();
        let md =
            a.l.md_bind(
                Md::new(MdBuffer::loan_only(n))
                    .options(MdOptions::LOAN)
                    .threshold(Threshold::Finite(2))
                    .handler(q.handler()),
            )
            .unwrap();
        a.l.get(md, b.id(), PORTAL, 2, 0).unwrap();
        let mut ev = finals(&q);
        let bytes = ev.iter_mut().find_map(|e| e.loan.take()).expect("a loan");
        // The view points into b's pool, mapped in a: no copy was made.
        assert_eq!(&bytes[..], &data[..n]);
        assert_ne!(
            bytes.as_ptr() as usize,
            addr,
            "a maps b's pool at its own address"
        );
        drop(bytes);
    }
    let sa = a.stats();
    assert_eq!(sa.bulk_loan, 3, "{sa:?}");
    // Releases travel back; b drops its extra references.
    let t0 = std::time::Instant::now();
    while b.stats().loans_returned < 3 && t0.elapsed() < T {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(b.stats().loans_returned, 3);
    assert_eq!(pool_b.stats().in_use, used_before);
    a.l.shutdown();
    b.l.shutdown();
}

#[test]
fn many_in_flight_and_a_full_ring() {
    let d = tmpdir("many");
    let small = |c: &mut ShmConfig| {
        c.slots = 8;
        c.slot_size = 1024;
    };
    let a = node(1, &d, small);
    let b = node(2, &d, small);
    let qb = target(&b, MdBuffer::from(vec![0u8; 4 << 20]));
    let q = EventQueue::new();
    let n = 2000;
    for i in 0..n {
        let data = pattern(if i % 3 == 0 { 5000 } else { 100 }, i as u8);
        let md =
            a.l.md_bind(
                Md::new(data)
                    .threshold(Threshold::Finite(2))
                    .handler(q.handler())
                    .user_ptr(i),
            )
            .unwrap();
        a.l.put(
            md,
            AckReq::Ack,
            b.id(),
            PORTAL,
            1,
            (i as u32 % 512) * 8192,
            0,
        )
        .unwrap();
    }
    let mut ended = vec![0u32; n as usize];
    let t0 = std::time::Instant::now();
    let mut seen = 0;
    while seen < n && t0.elapsed() < T * 3 {
        let e = q.recv_timeout(T).expect("event");
        assert!(e.status.is_ok(), "{:?}", e.status);
        if e.unlinked {
            ended[e.user_ptr as usize] += 1;
            seen += 1;
        }
    }
    assert!(ended.iter().all(|&c| c == 1));
    let mut puts = 0;
    while let Some(e) = qb.try_recv() {
        if e.kind == EventKind::Put {
            puts += 1;
        }
    }
    assert_eq!(puts, n);
    a.l.shutdown();
    b.l.shutdown();
}

#[test]
fn simultaneous_connects_settle_on_one_connection() {
    for round in 0..20u32 {
        let d = tmpdir(&format!("race{round}"));
        let a = node(1, &d, |c| c.pool_size = 1 << 20);
        let b = node(2, &d, |c| c.pool_size = 1 << 20);
        let qa = target(&a, MdBuffer::from(vec![0u8; 4096]));
        let qb = target(&b, MdBuffer::from(vec![0u8; 4096]));
        // Both dial at once: each sends before any connection exists.
        let barrier = std::sync::Barrier::new(2);
        std::thread::scope(|s| {
            s.spawn(|| {
                barrier.wait();
                put(&a, &b, frags(&[1u8; 100], 100), 0).unwrap();
            });
            s.spawn(|| {
                barrier.wait();
                put(&b, &a, frags(&[2u8; 100], 100), 0).unwrap();
            });
        });
        assert!(qa.recv_timeout(T).is_some() && qb.recv_timeout(T).is_some());
        // One connection each way survives (the higher NID's).
        assert_eq!(a.shm.connected_peers(), vec![b.shm.nid()], "round {round}");
        assert_eq!(b.shm.connected_peers(), vec![a.shm.nid()], "round {round}");
        let (sa, sb) = (a.stats(), b.stats());
        assert!(sa.conns_up >= 1 && sb.conns_up >= 1);
        assert_eq!(sa.peers_died + sb.peers_died, 0, "{sa:?} {sb:?}");
        a.l.shutdown();
        b.l.shutdown();
    }
}
