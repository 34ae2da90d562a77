//! The shm LND between processes: this test process runs one node;
//! `shm_node` processes are its peers. Each test uses its own rendezvous
//! directory.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lnd_loopback::LoLnd;
use lnd_loopback::shm::TestDir;
use lnd_loopback::shm::{ShmConfig, ShmLnd};
use lnet::{
    AckReq, Error, EventQueue, Lnet, LnetBuilder, Md, MdBuffer, MdOptions, Nid, ProcessId,
    Threshold,
};
use lnet_examples::{
    ChildNode, ECHO_PORTAL as ECHO, PATTERN_PORTAL as PATTERN, finals, frags, get_from, pattern,
    put_echo,
};
const T: Duration = Duration::from_secs(30);
const SIZES: [usize; 6] = [0, 1, 4096, 65536, 300_001, 1 << 20];

fn tmpdir(name: &str) -> TestDir {
    TestDir::new(&format!("x-{name}"))
}

struct Server {
    node: ChildNode,
    nid: Nid,
}

impl Server {
    fn start(addr: u32, dir: &Path, extra: &[&str]) -> Server {
        let node = ChildNode::spawn(
            Command::new(env!("CARGO_BIN_EXE_shm_node"))
                .args(["--addr", &addr.to_string(), "--dir"])
                .arg(dir)
                .args(["--pool-size", &(32 << 20).to_string()])
                .args(extra),
            T,
        );
        Server {
            nid: node.ready[0].parse().unwrap(),
            node,
        }
    }
    fn id(&self) -> ProcessId {
        ProcessId::new(self.nid, lnet::LNET_PID_LUSTRE)
    }
    /// One counter of the server's LND.
    fn stat(&mut self, name: &str) -> u64 {
        let l = self.node.ask("STATS", T);
        let key = format!("{name}: ");
        let at = l.find(&key).unwrap_or_else(|| panic!("{name} in {l}")) + key.len();
        l[at..]
            .split(|c: char| !c.is_ascii_digit())
            .next()
            .unwrap()
            .parse()
            .unwrap()
    }
    fn kill(&mut self) {
        self.node.kill();
    }
}

fn client(addr: u32, dir: &Path, tune: impl FnOnce(&mut ShmConfig)) -> (Lnet, Arc<ShmLnd>) {
    let mut cfg = ShmConfig::new(addr).dir(dir);
    cfg.pool_size = 32 << 20;
    tune(&mut cfg);
    let shm = Arc::new(ShmLnd::new(cfg).unwrap());
    let l = LnetBuilder::new(Arc::new(LoLnd::new()))
        .ni(shm.clone())
        .response_timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    (l, shm)
}

fn put(l: &Lnet, to: ProcessId, src: MdBuffer, off: u32) -> Result<(), Error> {
    put_echo(l, to, src, off)
}

fn get(l: &Lnet, to: ProcessId, portal: u32, sink: MdBuffer, off: u32) -> Result<Vec<u8>, Error> {
    get_from(l, to, portal, sink, off)
}

/// PUT then GET back each size; GET the pattern. `src`/`sink` build the
/// client's buffers.
fn exchange(
    l: &Lnet,
    srv: &Server,
    src: impl Fn(&[u8]) -> MdBuffer,
    sink: impl Fn(usize) -> MdBuffer,
) {
    let reference = pattern(1 << 20, 7);
    for (i, &n) in SIZES.iter().enumerate() {
        let data = pattern(n, i as u8 + 1);
        let off = (i as u32) << 20;
        put(l, srv.id(), src(&data), off).unwrap_or_else(|e| panic!("put {n}: {e}"));
        let back = get(l, srv.id(), ECHO, sink(n), off).unwrap_or_else(|e| panic!("get {n}: {e}"));
        assert!(back == data, "echo of {n} bytes differs");
        let p = get(l, srv.id(), PATTERN, sink(n), 0).unwrap();
        assert!(p == reference[..n], "pattern of {n} bytes differs");
    }
}

/// Bulk sizes in SIZES (above the eager size of 8104 bytes).
const BULK: u64 = 3;

#[test]
fn cma_path_between_two_processes() {
    let dir = tmpdir("cma");
    let mut srv = Server::start(2, &dir, &[]);
    let (l, shm) = client(1, &dir, |_| {});
    exchange(
        &l,
        &srv,
        |d| frags(d, 3 * 4096 + 5),
        |n| frags(&vec![0; n], 8191),
    );
    let s = shm.stats();
    assert_eq!(shm.cma_with(srv.nid), Some(true));
    // echo and pattern GETs land by CMA here; PUTs by CMA at the server.
    assert_eq!(s.bulk_cma, 2 * BULK, "{s:?}");
    assert_eq!(srv.stat("bulk_cma"), BULK);
    assert_eq!(s.bulk_bounce + s.bulk_pool_read + s.bulk_pool_write, 0);
    l.shutdown();
}

#[test]
fn pool_paths_between_two_processes() {
    let dir = tmpdir("pool");
    let mut srv = Server::start(2, &dir, &["--pool-md"]);
    let (l, shm) = client(1, &dir, |_| {});
    let pool = shm.pool().unwrap();
    let in_pool = |d: &[u8]| {
        let mut b = pool.alloc(d.len()).unwrap();
        b.copy_from_slice(d);
        MdBuffer::from(b)
    };
    // Sources in our pool (the server copies from its mapping), sinks in
    // ordinary memory (we copy from the server's pool, where its MDs live).
    exchange(&l, &srv, in_pool, |n| frags(&vec![0; n], 8191));
    let s = shm.stats();
    // Echo GETs above the eager size, plus every pattern GET of a page or
    // more: the frozen pattern goes by descriptor so it could be lent.
    assert_eq!(s.bulk_pool_read, 2 * BULK + 1, "{s:?}");
    assert_eq!(srv.stat("bulk_pool_read"), BULK);
    // Sinks in our pool, sources in the server's ordinary memory: the server
    // copies into our pool.
    let plain = Server::start(3, &dir, &[]);
    exchange(
        &l,
        &plain,
        |d| frags(d, 5000),
        |n| MdBuffer::from(pool.alloc(n).unwrap()),
    );
    let s2 = shm.stats();
    assert_eq!(s2.bulk_pool_write, 2 * BULK, "{s2:?}");
    assert_eq!(s2.bulk_cma + s2.bulk_bounce, 0);
    l.shutdown();
}

#[test]
fn bounce_path_between_two_processes() {
    let dir = tmpdir("bounce");
    let mut srv = Server::start(2, &dir, &["--no-cma", "--no-pool"]);
    let (l, shm) = client(1, &dir, |c| {
        c.use_cma = false;
        c.use_pool = false;
    });
    exchange(
        &l,
        &srv,
        |d| frags(d, 4099 * 2),
        |n| frags(&vec![0; n], 3 * 4095),
    );
    let s = shm.stats();
    assert_eq!(s.bulk_bounce, 2 * BULK, "{s:?}");
    assert_eq!(srv.stat("bulk_bounce"), BULK);
    assert_eq!(s.bulk_cma + s.bulk_pool_read + s.bulk_pool_write, 0);
    l.shutdown();
}

#[test]
fn loans_between_two_processes() {
    let dir = tmpdir("loan");
    let mut srv = Server::start(2, &dir, &["--pool-md"]);
    let (l, shm) = client(1, &dir, |_| {});
    let reference = pattern(1 << 20, 7);
    for n in [4096usize, 65536, 1 << 20] {
        let q = EventQueue::new();
        let md = l
            .md_bind(
                Md::new(MdBuffer::loan_only(n))
                    .options(MdOptions::LOAN)
                    .threshold(Threshold::Finite(2))
                    .handler(q.handler()),
            )
            .unwrap();
        l.get(md, srv.id(), PATTERN, 2, 0).unwrap();
        let mut ev = finals(&q);
        let loan = ev.iter_mut().find_map(|e| e.loan.take()).expect("a loan");
        assert!(loan[..] == reference[..n]);
    }
    let s = shm.stats();
    // Frozen pool memory of a page or more goes by descriptor: all three
    // sizes are borrowed from the server's pool, then given back.
    assert_eq!(s.bulk_loan, 3, "{s:?}");
    let t0 = Instant::now();
    while srv.stat("loans_returned") < 3 && t0.elapsed() < T {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(srv.stat("loans_returned"), 3);
    l.shutdown();
}

fn dir_entries(d: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(d)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn sigkill_mid_transfer_then_restart() {
    let dir = tmpdir("kill");
    let mut srv = Server::start(2, &dir, &["--no-pool"]);
    let (l, shm) = client(1, &dir, |_| {});
    put(&l, srv.id(), frags(&[1u8; 10], 10), 0).unwrap();
    // 4 GiB of 1 MiB PUTs (one shared buffer), as many in flight as
    // credits allow; the rest queue in the core.
    let q = EventQueue::new();
    let n = 4096u64;
    let buf = bytes::Bytes::from(vec![7u8; 1 << 20]);
    for i in 0..n {
        let md = l
            .md_bind(
                Md::new(buf.clone())
                    .threshold(Threshold::Finite(2))
                    .handler(q.handler())
                    .user_ptr(i),
            )
            .unwrap();
        l.put(md, AckReq::Ack, srv.id(), ECHO, 1, 0, 0).unwrap();
    }
    let mut ended = vec![0u32; n as usize];
    let (mut ok, mut failed, mut seen) = (0, 0, 0);
    let t0 = Instant::now();
    let mut killed = false;
    while seen < n && t0.elapsed() < Duration::from_secs(120) {
        let e = q.recv_timeout(T).expect("every operation ends");
        if e.unlinked {
            ended[e.user_ptr as usize] += 1;
            seen += 1;
            if e.status.is_ok() {
                ok += 1;
            } else {
                failed += 1;
            }
        }
        if !killed && ok >= 1 {
            srv.kill();
            killed = true;
        }
    }
    assert!(killed);
    assert!(ended.iter().all(|&c| c == 1), "each ends exactly once");
    assert!(failed > 0 && ok >= 1, "ok {ok} failed {failed}");
    // The survivor removed the dead node's socket file; memfds leave nothing.
    let t1 = Instant::now();
    while dir_entries(&dir) != ["1@shm.sock"] && t1.elapsed() < T {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(dir_entries(&dir), ["1@shm.sock"]);
    assert!(shm.connected_peers().is_empty());
    assert!(shm.stats().peers_died >= 1);
    // The peer comes back: traffic resumes without restarting us.
    let srv2 = Server::start(2, &dir, &[]);
    let data = pattern(1 << 20, 42);
    put(&l, srv2.id(), frags(&data, 1 << 16), 0).unwrap();
    assert!(get(&l, srv2.id(), ECHO, frags(&vec![0; 1 << 20], 1 << 16), 0).unwrap() == data);
    l.shutdown();
}

#[test]
fn sixty_four_peers_at_once() {
    let dir = tmpdir("many");
    let srv = Server::start(1000, &dir, &[]);
    let kids: Vec<Child> = (1..=64u32)
        .map(|a| {
            Command::new(env!("CARGO_BIN_EXE_shm_node"))
                .args(["--addr", &a.to_string(), "--dir"])
                .arg(&*dir)
                .args(["--pool-size", "1048576", "--verify", &srv.nid.to_string()])
                .args(["--rounds", "2", "--stripe", "131072"])
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .expect("spawn client")
        })
        .collect();
    let mut oks = 0;
    for k in kids {
        let out = k.wait_with_output().unwrap();
        let s = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{s}");
        if s.contains("VERIFY OK") {
            oks += 1;
        }
    }
    assert_eq!(oks, 64);
    drop(srv);
    // Clients shut down cleanly: their socket files are gone.
    let t0 = Instant::now();
    while !dir_entries(&dir).is_empty() && t0.elapsed() < T {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(dir_entries(&dir).is_empty(), "{:?}", dir_entries(&dir));
}
