//! The TCP LND between two processes over loopback: this test process runs
//! a client node; `tcp_node` (a separate process) serves. Each test uses
//! its own 127.0.0.x addresses.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lnd_tcp::proto::ConnType;
use lnd_tcp::{AcceptMode, ConnsPerPeer, TcpConfig, TcpLnd};
use lnet::{AckReq, Error, EventQueue, Lnet, Md, Nid, ProcessId, Threshold};
use lnet_examples::{
    ChildNode, ECHO_PORTAL as ECHO, PATTERN_PORTAL as PATTERN, frags, get_from, pattern, put_echo,
    puts_across_a_peer_kill,
};
const T: Duration = Duration::from_secs(30);

struct Server {
    node: ChildNode,
    nid: Nid,
    listen: SocketAddr,
    incarnation: u64,
}

impl Server {
    fn start(addr: &str, port: u16, extra: &[&str]) -> Server {
        let node = ChildNode::spawn(
            Command::new(env!("CARGO_BIN_EXE_tcp_node"))
                .args(["--addr", addr, "--port", &port.to_string()])
                .args(extra),
            T,
        );
        Server {
            nid: node.ready[0].parse().unwrap(),
            listen: node.ready[1].parse().unwrap(),
            incarnation: node.ready[2].parse().unwrap(),
            node,
        }
    }
    fn id(&self) -> ProcessId {
        ProcessId::new(self.nid, lnet::LNET_PID_LUSTRE)
    }
    fn kill(&mut self) {
        self.node.kill();
    }
}

fn client(addr: &str, server: &Server, tune: impl FnOnce(&mut TcpConfig)) -> (Lnet, Arc<TcpLnd>) {
    let mut cfg = TcpConfig::new(addr.parse().unwrap());
    cfg.port = 0;
    cfg.peer_port = server.listen.port();
    cfg.accept = AcceptMode::None;
    cfg.conns_per_peer = ConnsPerPeer::Fixed(1);
    tune(&mut cfg);
    let tcp = TcpLnd::new(cfg);
    let l = lnd_loopback::builder()
        .ni(tcp.clone())
        .response_timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    (l, tcp)
}

/// PUT `data` (as fragments) to the echo portal at `off` with an ACK.
fn put(l: &Lnet, to: ProcessId, data: Vec<u8>, off: u32) -> Result<(), Error> {
    put_echo(l, to, frags(&data, 4096 * 3 + 5), off)
}

/// GET `len` bytes from `portal` at `off` into a fragmented MD.
fn get(l: &Lnet, to: ProcessId, portal: u32, len: usize, off: u32) -> Result<Vec<u8>, Error> {
    get_from(l, to, portal, frags(&vec![0u8; len], 8191), off)
}

/// PUT and GET back 0 B, 1 B, 4 KiB, 64 KiB and 1 MiB (patterns seeded
/// from `seed`) on the echo portal, and GET the pattern portal: all data
/// verified.
fn every_size_both_ways(l: &Lnet, srv: &Server, seed: u8) {
    let reference = pattern(1 << 20, 7);
    for (i, &n) in [0usize, 1, 4096, 65536, 1 << 20].iter().enumerate() {
        let data = pattern(n, i as u8 + seed);
        let off = (i as u32) << 20;
        put(l, srv.id(), data.clone(), off).unwrap();
        assert_eq!(get(l, srv.id(), ECHO, n, off).unwrap(), data, "echo {n}");
        assert_eq!(
            get(l, srv.id(), PATTERN, n, 0).unwrap(),
            reference[..n],
            "pattern {n}"
        );
    }
}

#[test]
fn put_and_get_of_every_size_between_two_processes() {
    let srv = Server::start("127.0.0.11", 0, &[]);
    let (l, tcp) = client("127.0.0.12", &srv, |c| {
        c.conns_per_peer = ConnsPerPeer::Fixed(2)
    });
    every_size_both_ways(&l, &srv, 1);
    // Typed connections: one control, two bulk each way, all dialled by us.
    let mut types: Vec<_> = tcp.conns(srv.nid).iter().map(|c| c.ctype).collect();
    types.sort_by_key(|t| t.to_wire());
    assert_eq!(
        types,
        [
            ConnType::Control,
            ConnType::BulkIn,
            ConnType::BulkIn,
            ConnType::BulkOut,
            ConnType::BulkOut
        ]
    );
    assert!(
        tcp.conns(srv.nid)
            .iter()
            .all(|c| c.version == 3 && c.active)
    );
    // Privileged source ports (we run as root here) when allowed.
    let s = tcp.stats();
    assert!(s.tx_msgs >= 15 && s.rx_msgs >= 15, "{s:?}");
    assert_eq!(s.protocol_errors + s.truncated + s.timeouts, 0, "{s:?}");
    l.shutdown();
}

#[test]
fn with_reader_threads_on_both_ends_every_size_moves_and_zerocopy_completes() {
    let srv = Server::start("127.0.0.77", 0, &["--reader-threads"]);
    let (l, tcp) = client("127.0.0.78", &srv, |c| {
        c.conns_per_peer = ConnsPerPeer::Fixed(2);
        c.zerocopy_min = Some(16 << 10);
        c.reader_threads = true;
    });
    every_size_both_ways(&l, &srv, 11);
    assert_eq!(tcp.conns(srv.nid).len(), 5);
    let s = tcp.stats();
    // The 64 KiB and 1 MiB PUTs went zero-copy; their completions came
    // through the error queue of a socket registered for writes only.
    assert_eq!(s.zc_sends, 2, "{s:?}");
    assert_eq!(s.protocol_errors + s.truncated + s.timeouts, 0, "{s:?}");
    assert_eq!(s.conns_closed, 0, "{s:?}");
    l.shutdown();
}

#[test]
fn protocol_v2_with_checksums_and_v4() {
    let srv = Server::start("127.0.0.13", 0, &["--protocol", "2", "--checksum"]);
    // We offer v2 with checksums on every message; the server checks them.
    let (l, tcp) = client("127.0.0.14", &srv, |c| {
        c.protocol = 2;
        c.checksum = true;
    });
    let data = pattern(300_000, 3);
    put(&l, srv.id(), data.clone(), 0).unwrap();
    assert_eq!(get(&l, srv.id(), ECHO, data.len(), 0).unwrap(), data);
    assert!(tcp.conns(srv.nid).iter().all(|c| c.version == 2));
    assert_eq!(tcp.stats().checksum_errors, 0);
    l.shutdown();

    // v4 (20-byte NIDs) on request.
    let (l, tcp) = client("127.0.0.15", &srv, |c| c.protocol = 4);
    put(&l, srv.id(), data.clone(), 1 << 20).unwrap();
    assert_eq!(get(&l, srv.id(), ECHO, data.len(), 1 << 20).unwrap(), data);
    assert!(tcp.conns(srv.nid).iter().all(|c| c.version == 4));
    l.shutdown();
}

/// IPv6 needs two addresses; loopback has only `::1`, so the test makes its
/// own network namespace with two ULA addresses on its `lo` and runs both
/// ends inside it (`tcp_node --verify` is the client).
#[test]
fn ipv6_between_two_processes_uses_protocol_v4() {
    let root = unsafe_free_is_root();
    if !root {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI runs as root; this test needs root for its network namespace"
        );
        eprintln!("ipv6 test needs root (ip netns); not run as an unprivileged user");
        return;
    }
    let ns = format!("lnetrs-v6-{}", std::process::id());
    let ip = |args: &[&str]| {
        let st = Command::new("ip")
            .args(args)
            .status()
            .expect("ip(8) from iproute2");
        assert!(st.success(), "ip {args:?}");
    };
    ip(&["netns", "add", &ns]);
    struct Ns(String);
    impl Drop for Ns {
        fn drop(&mut self) {
            let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
        }
    }
    let _guard = Ns(ns.clone());
    ip(&["-n", &ns, "link", "set", "lo", "up"]);
    ip(&[
        "-n",
        &ns,
        "addr",
        "add",
        "fd00:77::1/128",
        "dev",
        "lo",
        "nodad",
    ]);
    ip(&[
        "-n",
        &ns,
        "addr",
        "add",
        "fd00:77::2/128",
        "dev",
        "lo",
        "nodad",
    ]);
    let bin = env!("CARGO_BIN_EXE_tcp_node");
    let mut srv = Command::new("ip")
        .args([
            "netns",
            "exec",
            &ns,
            bin,
            "--addr",
            "fd00:77::1",
            "--port",
            "7988",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut r = BufReader::new(srv.stdout.take().unwrap());
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    assert!(line.starts_with("READY fd00:77::1@tcp"), "{line}");
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            &ns,
            bin,
            "--addr",
            "fd00:77::2",
            "--port",
            "0",
        ])
        .args(["--verify", "fd00:77::1@tcp", "--peer-port", "7988"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let _ = srv.kill();
    let _ = srv.wait();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("VERIFY OK version 4"), "{text}");
}

fn unsafe_free_is_root() -> bool {
    // /proc/self/status: "Uid:\treal\teffective..."
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|e| e == "0"))
        })
        .unwrap_or(false)
}

#[test]
fn ten_thousand_operations_in_flight_against_one_peer() {
    let srv = Server::start("127.0.0.16", 0, &[]);
    // A small send buffer, and the server paused while the PUTs are
    // issued: the socket fills, sends stay in flight and the peer's
    // credits must run out (on an idle machine the LND would otherwise
    // write each message at once and never queue one).
    let (l, tcp) = client("127.0.0.17", &srv, |c| c.tx_buffer_size = Some(64 << 10));
    put(&l, srv.id(), vec![0; 8], 0).unwrap();
    let signal = |sig: &str| {
        let st = Command::new("kill")
            .args([sig, &srv.node.child.id().to_string()])
            .status()
            .unwrap();
        assert!(st.success(), "kill {sig}");
    };
    signal("-STOP");
    const N: usize = 10_000;
    const SZ: usize = 512;
    let q = EventQueue::new();
    for i in 0..N {
        let md = l
            .md_bind(
                Md::new(pattern(SZ, i as u8))
                    .threshold(Threshold::Finite(2))
                    .user_ptr(i as u64)
                    .handler(q.handler()),
            )
            .unwrap();
        l.put(md, AckReq::Ack, srv.id(), ECHO, 0, (i * SZ) as u32, 0)
            .unwrap();
    }
    let paused = l.peer_credits(srv.nid).unwrap();
    signal("-CONT");
    assert!(paused.queued > 0, "messages waited for credits: {paused:?}");
    // Credits bound what is in the LND at once; nothing is lost.
    let mut done = vec![false; N];
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut finished = 0;
    while finished < N {
        assert!(Instant::now() < deadline, "only {finished} of {N} ended");
        let e = q.recv_timeout(T).expect("event");
        assert!(e.status.is_ok(), "{:?}", e.status);
        if e.unlinked {
            let i = e.user_ptr as usize;
            assert!(!done[i], "operation {i} ended twice");
            done[i] = true;
            finished += 1;
        }
    }
    let credits = l.peer_credits(srv.nid).unwrap();
    assert!(credits.min < 0, "the credit queue was used: {credits:?}");
    // Every byte landed where it was sent.
    for chunk in 0..(N * SZ).div_ceil(1 << 20) {
        let off = chunk << 20;
        let len = (N * SZ - off).min(1 << 20);
        let got = get(&l, srv.id(), ECHO, len, off as u32).unwrap();
        for (k, piece) in got.chunks(SZ).enumerate() {
            let i = (off / SZ) + k;
            assert_eq!(piece, &pattern(SZ, i as u8)[..], "op {i}");
        }
    }
    assert_eq!(tcp.stats().conns_closed, 0);
    l.shutdown();
}

#[test]
fn a_peer_killed_mid_transfer_fails_each_operation_once_then_traffic_resumes() {
    killed_mid_transfer(false, "127.0.0.18", "127.0.0.19");
}

#[test]
fn with_reader_threads_a_peer_killed_mid_transfer_fails_each_operation_once() {
    killed_mid_transfer(true, "127.0.0.79", "127.0.0.80");
}

fn killed_mid_transfer(reader_threads: bool, srv_addr: &str, cli_addr: &str) {
    let extra: &[&str] = if reader_threads {
        &["--reader-threads"]
    } else {
        &[]
    };
    let mut srv = Server::start(srv_addr, 0, extra);
    let port = srv.listen.port();
    let first_inc = srv.incarnation;
    let (l, tcp) = client(cli_addr, &srv, |c| {
        c.min_reconnect = Duration::from_millis(100);
        c.max_reconnect = Duration::from_millis(400);
        c.reader_threads = reader_threads;
    });
    put(&l, srv.id(), vec![1; 10], 0).unwrap();
    // 1 MiB each (one shared buffer): more than the sockets hold, so the
    // client is mid-stream when the stopped peer is killed.
    let payload = bytes::Bytes::from(pattern(1 << 20, 3));
    let pid = srv.node.pid();
    puts_across_a_peer_kill(
        &l,
        srv.id(),
        &payload,
        1024,
        // The response timeout (5 s) and slack: a connection left listed
        // after its writer failed once held these for 50 s.
        Duration::from_secs(20),
        || lnet_examples::sigstop(pid),
        || srv.kill(),
        String::new,
    );
    // The server restarts on the same port with a new incarnation; the
    // client, never restarted, reconnects and traffic resumes.
    let srv2 = Server::start(srv_addr, port, extra);
    assert_ne!(srv2.incarnation, first_inc);
    let data = pattern(200_000, 42);
    let mut resumed = false;
    for _ in 0..50 {
        if put(&l, srv2.id(), data.clone(), 0).is_ok() {
            resumed = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(resumed, "traffic did not resume: {:?}", tcp.stats());
    assert_eq!(get(&l, srv2.id(), ECHO, data.len(), 0).unwrap(), data);
    assert!(tcp.stats().peer_restarts >= 1, "{:?}", tcp.stats());
    l.shutdown();
}

#[test]
fn zerocopy_sends_complete_only_on_the_kernels_notification() {
    let srv = Server::start("127.0.0.26", 0, &[]);
    let (l, tcp) = client("127.0.0.27", &srv, |c| c.zerocopy_min = Some(16 << 10));
    for (i, n) in [1000usize, 16 << 10, 1 << 20].into_iter().enumerate() {
        let data = pattern(n, 50 + i as u8);
        let off = (i as u32) << 20;
        put(&l, srv.id(), data.clone(), off).unwrap();
        assert_eq!(get(&l, srv.id(), ECHO, n, off).unwrap(), data);
    }
    let s = tcp.stats();
    // Two payloads qualified; their sends completed (the PUTs above ended),
    // which only happens once the error queue reported them.
    assert_eq!(s.zc_sends, 2, "{s:?}");
    // Loopback makes the kernel copy anyway, and it says so.
    assert_eq!(s.zc_copied, 2, "{s:?}");
    l.shutdown();
}
