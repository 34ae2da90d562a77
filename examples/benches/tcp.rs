//! TCP LND against its natural peers, in one run on the same loopback
//! addresses: 1 MiB PUT bandwidth beside `iperf3` (one stream, and as many
//! streams as we have connections), and the round trip of an 8-byte PUT
//! with ACK beside a plain TCP ping-pong of 8 bytes written here — blocking
//! on both ends (the goal's bound), and with both ends on tokio runtimes
//! like our nodes' (the runtime's own share of the ratio). The round trip
//! is measured for two pairs of nodes: connections read on the LND's
//! runtime (the default) and read by threads of their own
//! (`TcpConfig::reader_threads`, on both ends).
//!
//! `cargo bench -p lnet-examples --bench tcp` (`-- --secs N` to change the
//! measuring time per round, 5 s by default; `TCP_BENCH_ROUNDS` rounds, 3 by
//! default, interleaved with the peers' and reduced to medians;
//! `TCP_BENCH_THREADS` runtime workers on each side, `TCP_BENCH_RTT_N` round
//! trips, `TCP_BENCH_ONLY=latency` to skip the bandwidth part,
//! `TCP_BENCH_PIN=1` to run the client ends on CPU 0 and the server ends
//! on CPU 1, as two hosts would be: the scheduler then cannot put both
//! ends of one ping-pong on one CPU in some rounds and not in others).
//! Prints ours, theirs and the ratio. The round trips of the goal's pairs
//! (the blocking ping-pong, kept connected, and our two callback chains)
//! are taken in blocks in turn within each round, so the machine's drift
//! weighs on them alike.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lnd_tcp::{AcceptMode, ConnsPerPeer, TcpConfig, TcpLnd};
use lnet::{AckReq, EventQueue, Lnet, Md, ProcessId, Threshold};
use lnet_selftest::compare::{self, median};

const SRV: &str = "127.0.0.21";
const CLI: &str = "127.0.0.22";
/// The client of the pair whose connections are read by threads.
const CLI_THREADS: &str = "127.0.0.23";

struct Srv(Child, ProcessId, u16);
impl Drop for Srv {
    fn drop(&mut self) {
        // Close its stdin: the node shuts down and exits by itself (so a
        // profiler attached to it sees a clean exit); kill it if it hangs.
        drop(self.0.stdin.take());
        for _ in 0..50 {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `TCP_BENCH_PIN=1`: client ends on CPU 0, server ends on CPU 1.
fn pinned() -> bool {
    std::env::var("TCP_BENCH_PIN").is_ok_and(|v| v == "1")
}

fn threads() -> usize {
    std::env::var("TCP_BENCH_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2)
}

/// A `tcp_node` on `SRV`; `reader_threads`: a thread per connection reads it.
fn server(reader_threads: bool) -> Srv {
    let mut p = Command::new(env!("CARGO_BIN_EXE_tcp_node"));
    p.args(["--addr", SRV, "--port", "0", "--conns", "1"])
        .args(["--threads", &threads().to_string()]);
    if reader_threads {
        p.arg("--reader-threads");
    }
    if pinned() {
        p.args(["--cpu", "1"]);
    }
    let mut p = p
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("tcp_node");
    let mut line = String::new();
    BufReader::new(p.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let f: Vec<&str> = line.split_whitespace().collect();
    let nid: lnet::Nid = f[1].parse().unwrap();
    let port = f[2].parse::<std::net::SocketAddr>().unwrap().port();
    Srv(p, ProcessId::new(nid, lnet::LNET_PID_LUSTRE), port)
}

/// Our client node at `addr`, dialling the server's `port`.
fn client(addr: &str, port: u16, reader_threads: bool) -> (Lnet, Arc<TcpLnd>) {
    let mut cfg = TcpConfig::new(addr.parse().unwrap());
    cfg.port = 0;
    cfg.peer_port = port;
    cfg.accept = AcceptMode::None;
    cfg.conns_per_peer = ConnsPerPeer::Fixed(1);
    cfg.threads = threads();
    cfg.reader_threads = reader_threads;
    let tcp = TcpLnd::new(cfg);
    (
        lnd_loopback::builder().ni(tcp.clone()).build().unwrap(),
        tcp,
    )
}

/// 1 MiB PUTs with ACK, `depth` in flight, for `secs`: bytes per second.
fn put_bw(l: &Lnet, to: ProcessId, depth: usize, secs: f64) -> f64 {
    let q = EventQueue::new();
    // Shared, not copied per PUT: a server sends from its own buffers.
    let buf = bytes::Bytes::from(vec![0x5au8; 1 << 20]);
    let launch = |i: u64| {
        let md = l
            .md_bind(
                Md::new(buf.clone())
                    .threshold(Threshold::Finite(2))
                    .user_ptr(i)
                    .handler(q.handler()),
            )
            .unwrap();
        l.put(md, AckReq::Ack, to, 10, 0, 0, 0).unwrap();
    };
    for i in 0..depth as u64 {
        launch(i);
    }
    let t0 = Instant::now();
    let mut done = 0u64;
    let mut i = depth as u64;
    let mut inflight = depth;
    while inflight > 0 {
        let e = q.recv_timeout(Duration::from_secs(30)).expect("event");
        assert!(e.status.is_ok(), "{:?}", e.status);
        if e.unlinked {
            done += 1;
            inflight -= 1;
            if t0.elapsed().as_secs_f64() < secs {
                launch(i);
                i += 1;
                inflight += 1;
            }
        }
    }
    (done as f64 * (1 << 20) as f64) / t0.elapsed().as_secs_f64()
}

/// PUT+ACKs one after the other, each issued from the previous one's final
/// event callback (on the transport's own thread, as an LNet server
/// would): every round trip, in µs.
fn put_rtt_cb(l: &Arc<Lnet>, to: ProcessId, n: usize) -> Vec<f64> {
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};
    struct Chain {
        l: std::sync::Weak<Lnet>,
        to: ProcessId,
        left: AtomicUsize,
        /// When each PUT was issued, then the round trips.
        at: Mutex<(Instant, Vec<f64>)>,
        fin: Mutex<Option<std::sync::mpsc::Sender<()>>>,
    }
    fn fire(c: &Arc<Chain>) {
        let Some(l) = c.l.upgrade() else { return };
        let me = c.clone();
        let md = l
            .md_bind(
                Md::new(vec![1u8; 8])
                    .threshold(Threshold::Finite(2))
                    .handler(lnet::EventHandler::callback(move |e| {
                        assert!(e.status.is_ok(), "{:?}", e.status);
                        if e.unlinked {
                            {
                                let mut g = me.at.lock().unwrap();
                                let rtt = g.0.elapsed().as_secs_f64() * 1e6;
                                g.1.push(rtt);
                                g.0 = Instant::now();
                            }
                            if me.left.fetch_sub(1, Ordering::AcqRel) > 1 {
                                fire(&me);
                            } else if let Some(f) = me.fin.lock().unwrap().take() {
                                let _ = f.send(());
                            }
                        }
                    })),
            )
            .unwrap();
        l.put(md, AckReq::Ack, c.to, 10, 0, 0, 0).unwrap();
    }
    let (tx, rx) = std::sync::mpsc::channel();
    let c = Arc::new(Chain {
        l: Arc::downgrade(l),
        to,
        left: AtomicUsize::new(n),
        at: Mutex::new((Instant::now(), Vec::with_capacity(n))),
        fin: Mutex::new(Some(tx)),
    });
    c.at.lock().unwrap().0 = Instant::now();
    fire(&c);
    rx.recv_timeout(Duration::from_secs(60))
        .expect("chain done");
    std::mem::take(&mut c.at.lock().unwrap().1)
}

fn put_rtt(l: &Lnet, to: ProcessId, n: usize) -> Vec<f64> {
    let q = EventQueue::new();
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let md = l
            .md_bind(
                Md::new(vec![1u8; 8])
                    .threshold(Threshold::Finite(2))
                    .handler(q.handler()),
            )
            .unwrap();
        l.put(md, AckReq::Ack, to, 10, 0, 0, 0).unwrap();
        loop {
            let e = q.recv_timeout(Duration::from_secs(10)).expect("event");
            if e.unlinked {
                break;
            }
        }
        v.push(t.elapsed().as_secs_f64() * 1e6);
    }
    v
}

/// A tokio runtime shaped like our nodes' (multi-thread, `threads()`
/// workers).
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads())
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// The ping-pong's echo end in a process of its own (this bench binary,
/// started with `TCP_BENCH_ECHO=1`, or `=tokio` to echo from a task on a
/// tokio runtime): prints its port, echoes one connection, exits.
fn echo_child(on_tokio: bool) {
    if pinned() {
        lnet_examples::pin_to_cpu(1).expect("pin the echo end");
    }
    let l = std::net::TcpListener::bind((SRV, 0)).expect("echo listener");
    println!("{}", l.local_addr().unwrap().port());
    if !on_tokio {
        return compare::tcp_echo_one(&l);
    }
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (s, _) = l.accept().expect("accept");
    s.set_nodelay(true).unwrap();
    s.set_nonblocking(true).unwrap();
    let rt = runtime();
    let task = rt.spawn(async move {
        let mut s = tokio::net::TcpStream::from_std(s).expect("register");
        let mut b = [0u8; 8];
        while s.read_exact(&mut b).await.is_ok() && s.write_all(&b).await.is_ok() {}
    });
    let _ = rt.block_on(task);
}

/// An echo end of the ping-pong in a process of its own (as our server
/// node is), blocking or on tokio: the child and its address.
fn echo_process(on_tokio: bool) -> (Child, std::net::SocketAddr) {
    let mut p = Command::new(std::env::current_exe().unwrap())
        .env("TCP_BENCH_ECHO", if on_tokio { "tokio" } else { "1" })
        .stdout(Stdio::piped())
        .spawn()
        .expect("echo child");
    let mut line = String::new();
    BufReader::new(p.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let port: u16 = line.trim().parse().expect("echo port");
    (p, std::net::SocketAddr::new(SRV.parse().unwrap(), port))
}

/// The blocking TCP ping-pong between two processes, kept connected for
/// the whole run so that its round trips can be measured in blocks
/// interleaved with ours.
struct PingPong(Child, Option<compare::TcpPingPong>);

impl PingPong {
    fn start() -> Self {
        let (p, at) = echo_process(false);
        let c = compare::TcpPingPong::connect(at, CLI.parse().unwrap()).expect("TCP ping-pong");
        Self(p, Some(c))
    }

    fn round_trips(&mut self, n: usize) -> Vec<f64> {
        let c = self.1.as_mut().expect("connected");
        c.round_trips(n).expect("TCP ping-pong")
    }
}

impl Drop for PingPong {
    fn drop(&mut self) {
        // Closing the connection ends the echo child.
        drop(self.1.take());
        let _ = self.0.wait();
    }
}

/// The TCP ping-pong between two processes with both ends on tokio:
/// median round trip of `n`, µs.
fn tokio_pingpong_2proc(n: usize) -> f64 {
    let (mut p, at) = echo_process(true);
    let r = tokio_pingpong_client(at, n);
    let _ = p.wait();
    r
}

/// The ping-pong's client end in a task on a tokio runtime: median round
/// trip of `n`, µs.
fn tokio_pingpong_client(at: std::net::SocketAddr, n: usize) -> f64 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rt = runtime();
    let task = rt.spawn(async move {
        let sock = tokio::net::TcpSocket::new_v4().expect("socket");
        sock.bind((CLI.parse::<std::net::IpAddr>().unwrap(), 0).into())
            .expect("bind");
        let mut s = sock.connect(at).await.expect("connect");
        s.set_nodelay(true).unwrap();
        let mut v = Vec::with_capacity(n);
        let mut b = [7u8; 8];
        for _ in 0..n {
            let t = Instant::now();
            s.write_all(&b).await.expect("write");
            s.read_exact(&mut b).await.expect("read");
            v.push(t.elapsed().as_secs_f64() * 1e6);
        }
        median(&mut v)
    });
    rt.block_on(task).expect("ping-pong task")
}

fn main() {
    if let Some(v) = std::env::var_os("TCP_BENCH_ECHO") {
        return echo_child(v == "tokio");
    }
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--list") {
        // cargo bench/test harness probing: nothing to list.
        return;
    }
    let secs: f64 = args
        .iter()
        .position(|a| a == "--secs")
        .and_then(|i| args.get(i + 1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(5.0);
    if pinned() {
        // Before any runtime or thread starts: they inherit it.
        lnet_examples::pin_to_cpu(0).expect("pin the client end");
    }
    let srv = server(false);
    let (l, tcp) = client(CLI, srv.2, false);
    let l = Arc::new(l);
    // Warm up: connections, page faults.
    put_bw(&l, srv.1, 4, 0.5);
    let conns = tcp.conns(srv.1.nid).len();
    let gb = 1e9;
    let iperf3 = |streams: usize, secs: f64| {
        let (srv, cli) = (SRV.parse().unwrap(), CLI.parse().unwrap());
        match compare::iperf3_mib_s(srv, cli, streams, secs.max(1.0) as u64) {
            Ok(m) => Some(m * (1 << 20) as f64),
            Err(e) => {
                println!("{e}");
                None
            }
        }
    };
    // Rounds interleaved (ours, iperf3 -P 1, iperf3 -P conns), each figure
    // the median of its rounds: single runs on this shared machine vary by
    // more than the margin being measured.
    let rounds = std::env::var("TCP_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3usize)
        .max(1);
    let only_lat = std::env::var("TCP_BENCH_ONLY").is_ok_and(|v| v == "latency");
    let (mut ours, mut t1, mut tn) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..if only_lat { 0 } else { rounds } {
        ours.push(put_bw(&l, srv.1, 8, secs));
        t1.extend(iperf3(1, secs));
        tn.extend(iperf3(conns, secs));
    }
    if !only_lat {
        let show = |v: &[f64]| {
            v.iter()
                .map(|x| format!("{:.2}", x / gb))
                .collect::<Vec<_>>()
                .join(" ")
        };
        println!(
            "tcp 1 MiB PUT+ACK, 8 in flight, {conns} connections (1 bulk each way); median of {rounds} interleaved rounds of {secs} s"
        );
        let rounds_ours = show(&ours);
        let ours = median(&mut ours);
        println!(
            "  lnet-rs        {:8.3} GB/s   (rounds: {rounds_ours})",
            ours / gb
        );
        if !t1.is_empty() {
            let t = median(&mut t1.clone());
            println!(
                "  iperf3 -P 1    {:8.3} GB/s   (rounds: {})   ratio {:.3} (goal >= 0.9)",
                t / gb,
                show(&t1),
                ours / t
            );
        }
        if !tn.is_empty() {
            let t = median(&mut tn.clone());
            println!(
                "  iperf3 -P {conns}    {:8.3} GB/s   (rounds: {})   ratio {:.3}",
                t / gb,
                show(&tn),
                ours / t
            );
        }
    }
    let n = std::env::var("TCP_BENCH_RTT_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5000);
    // Round trips, also in interleaved rounds: each round's figure is the
    // median of its `n` round trips, the result the median of the rounds.
    // The same with a second pair whose connections are read by threads
    // of their own (`TcpConfig::reader_threads`) on both ends.
    let srv_t = server(true);
    let (l_t, _) = client(CLI_THREADS, srv_t.2, true);
    let l_t = Arc::new(l_t);
    for (node, to) in [(&l, srv.1), (&l_t, srv_t.1)] {
        let _ = put_rtt(node, to, 200);
        let _ = put_rtt_cb(node, to, 200);
    }
    let (mut queued, mut plain, mut chained, mut means) = (vec![], vec![], vec![], vec![]);
    let (mut in_process, mut on_tokio) = (vec![], vec![]);
    let (mut queued_t, mut chained_t) = (vec![], vec![]);
    // The goal's pairs (the blocking ping-pong and our two callback
    // chains) are measured in blocks of `n / BLOCKS` round trips taken in
    // turn, so a drift of the machine within a round (these shared 2-core
    // hosts drift by 20 % and more within seconds) weighs on all three alike.
    const BLOCKS: usize = 10;
    let block = (n / BLOCKS).max(1);
    let mut pp = PingPong::start();
    let _ = pp.round_trips(200);
    for _ in 0..rounds {
        queued.push(median(&mut put_rtt(&l, srv.1, n)));
        on_tokio.push(tokio_pingpong_2proc(n));
        in_process.push(
            compare::tcp_pingpong_rtt_us(SRV.parse().unwrap(), CLI.parse().unwrap(), n)
                .expect("TCP ping-pong"),
        );
        let (mut p, mut t, mut r) = (vec![], vec![], vec![]);
        for _ in 0..BLOCKS {
            p.extend(pp.round_trips(block));
            t.extend(put_rtt_cb(&l_t, srv_t.1, block));
            r.extend(put_rtt_cb(&l, srv.1, block));
        }
        plain.push(median(&mut p));
        chained_t.push(median(&mut t));
        means.push(r.iter().sum::<f64>() / r.len() as f64);
        chained.push(median(&mut r));
        queued_t.push(median(&mut put_rtt(&l_t, srv_t.1, n)));
    }
    drop(pp);
    // Ratios per round (each pairs figures measured minutes apart at most),
    // reduced to their median, as the shm bench does.
    let ratios = |a: &[f64], b: &[f64]| -> (f64, String) {
        let mut r: Vec<f64> = a.iter().zip(b).map(|(x, y)| x / y).collect();
        let shown = r
            .iter()
            .map(|x| format!("{x:.2}"))
            .collect::<Vec<_>>()
            .join(" ");
        (median(&mut r), shown)
    };
    let (ratio, per_round) = ratios(&chained, &plain);
    let (ratio_t, per_round_t) = ratios(&chained_t, &plain);
    let (tokio_share, _) = ratios(&on_tokio, &plain);
    let (lnet_share, _) = ratios(&chained, &on_tokio);
    let threads_rtt = median(&mut in_process);
    let tokio_rtt = median(&mut on_tokio);
    let (queued, plain, chained, mean) = (
        median(&mut queued),
        median(&mut plain),
        median(&mut chained),
        median(&mut means),
    );
    let (queued_t, chained_t) = (median(&mut queued_t), median(&mut chained_t));
    println!(
        "8-byte round trip, median of {n} per round, median of {rounds} interleaved rounds{}",
        if pinned() {
            "; client ends on CPU 0, server ends on CPU 1 (TCP_BENCH_PIN=1)"
        } else {
            ""
        }
    );
    println!(
        "  TCP ping-pong, blocking read/write, two processes    {plain:8.1} us   (the goal's bound; in blocks taken in turn with the two callback chains)"
    );
    println!(
        "  lnet-rs PUT+ACK, reader threads, next from the ACK callback {chained_t:8.1} us   ratio callback/TCP {ratio_t:.2} (goal <= 1.3; rounds {per_round_t}; ratio of the medians {:.2})",
        chained_t / plain
    );
    println!(
        "  lnet-rs PUT+ACK, reader threads, a thread waiting on an event queue {queued_t:8.1} us   ratio {:.2}",
        queued_t / plain
    );
    println!(
        "  lnet-rs PUT+ACK, readers on the runtime (default), next from the ACK callback {chained:8.1} us   (mean {mean:.1})   ratio callback/TCP {ratio:.2} (goal <= 1.3; rounds {per_round}; ratio of the medians {:.2})",
        chained / plain
    );
    println!(
        "  lnet-rs PUT+ACK, readers on the runtime, a thread waiting on an event queue {queued:8.1} us   ratio {:.2}",
        queued / plain
    );
    println!(
        "  TCP ping-pong, both ends on tokio, two processes     {tokio_rtt:8.1} us   ratio tokio/blocking {tokio_share:.2} (the runtime's share), runtime callback/tokio {lnet_share:.2} (LNet's own)"
    );
    println!(
        "  TCP ping-pong, two threads of one process            {threads_rtt:8.1} us   ratio runtime callback/TCP {:.2} (no address-space switch per hop{})",
        chained / threads_rtt,
        if pinned() { "; both on CPU 0" } else { "" }
    );
    l_t.shutdown();
    drop(srv_t);
    l.shutdown();
}
