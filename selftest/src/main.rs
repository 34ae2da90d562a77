//! `lnet-selftest`: measure an LNet network.
//!
//! * `lnet-selftest run` — with no arguments, a server and a client on this
//!   host over `shm` (two processes), 1 MiB writes for a few seconds;
//! * `lnet-selftest serve` — a node with the selftest service until stdin
//!   closes;
//! * `lnet-selftest sweep` — sizes from 8 B to 1 MiB, a table and an SVG;
//! * `lnet-selftest compare` — one transport beside its natural peer.

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use lnet::{Nid, ProcessId};
use lnet_selftest::bulk::Check;
use lnet_selftest::run::{self, Measurement, Mode, NodeSpec, Params};
use lnet_selftest::server::{Server, ServerConfig};

type Res<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

#[derive(Parser)]
#[command(
    name = "lnet-selftest",
    version,
    about = "Measure LNet throughput and latency"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a test (by default: server and client on this host over shm).
    Run(RunArgs),
    /// Run a node with the selftest service until stdin closes.
    Serve(NodeArgs),
    /// Measure sizes from 8 B to 1 MiB on one or more transports.
    Sweep(SweepArgs),
    /// One transport beside its natural peer (iperf3, memcpy, UCX,
    /// perftest), in the same run, with the ratios.
    Compare(CompareArgs),
}

#[derive(Args, Clone)]
struct CompareArgs {
    /// Transport: tcp, shm or rdma (also as `compare rdma`).
    #[arg(long, default_value = "shm")]
    lnd: String,
    /// The transport, positionally (overrides --lnd).
    transport: Option<String>,
    /// Seconds per bandwidth measurement.
    #[arg(long, default_value_t = 3.0)]
    duration: f64,
    /// Bytes per RPC for bandwidth.
    #[arg(long, default_value = "1M")]
    size: String,
    /// Concurrency for bandwidth.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Bandwidth rounds, ours and the peer's interleaved; each figure is
    /// the median.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
}

#[derive(Args, Clone)]
struct NodeArgs {
    /// Transport: lo, shm, tcp or rdma.
    #[arg(long, default_value = "shm")]
    lnd: String,
    /// This node's address: the NID number for shm, the IP for tcp.
    #[arg(long)]
    addr: Option<String>,
    /// TCP port to listen on (0: any); rdma: the RDMA CM port of both
    /// ends (0: 987).
    #[arg(long, default_value_t = 0)]
    port: u16,
    /// TCP port the peer listens on.
    #[arg(long, default_value_t = 988)]
    peer_port: u16,
    /// shm rendezvous directory.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// shm: do not put bulk buffers in the shared pool.
    #[arg(long)]
    no_pool: bool,
    /// shm: never sleep waiting for messages.
    #[arg(long)]
    busy_poll: bool,
    /// serve: also run the lst console on this Unix socket.
    #[arg(long)]
    console: Option<PathBuf>,
}

impl NodeArgs {
    /// Defaults for a transport whose two ends run on this host.
    fn local(lnd: &str) -> NodeArgs {
        NodeArgs {
            lnd: lnd.to_string(),
            addr: None,
            port: 0,
            peer_port: 988,
            dir: None,
            no_pool: false,
            busy_poll: false,
            console: None,
        }
    }
}

#[derive(Args, Clone)]
struct RunArgs {
    #[command(flatten)]
    node: NodeArgs,
    /// write, read or ping.
    #[arg(long, default_value = "write")]
    mode: String,
    /// Bytes per RPC, with lst's suffixes (4k, 1M); at most 1M.
    #[arg(long, default_value = "1M")]
    size: String,
    /// RPCs in flight.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Seconds to measure.
    #[arg(long, default_value_t = 5.0)]
    duration: f64,
    /// Data check: none, simple or full.
    #[arg(long, default_value = "none")]
    check: String,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    json: bool,
    /// Test the server at this NID (run only the client here).
    #[arg(long)]
    server: Option<String>,
    /// Run only the server here, until stdin closes.
    #[arg(long)]
    serve: bool,
}

#[derive(Args, Clone)]
struct SweepArgs {
    /// Transports, comma separated.
    #[arg(long, default_value = "lo,shm,tcp")]
    lnds: String,
    /// write or read.
    #[arg(long, default_value = "write")]
    mode: String,
    /// Seconds per size.
    #[arg(long, default_value_t = 1.0)]
    duration: f64,
    /// RPCs in flight.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Where to write the SVG plot.
    #[arg(long, default_value = "sweep.svg")]
    svg: PathBuf,
    /// Sizes, comma separated (default: 8 B to 1 MiB in powers of 4).
    #[arg(long)]
    sizes: Option<String>,
}

fn main() {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let cli = Cli::parse();
    let r = match cli.cmd {
        None => run_cmd(RunArgs::parse_default()),
        Some(Cmd::Run(a)) => run_cmd(a),
        Some(Cmd::Serve(a)) => serve_cmd(&a),
        Some(Cmd::Sweep(a)) => sweep_cmd(&a),
        Some(Cmd::Compare(a)) => compare_cmd(&a),
    };
    if let Err(e) = r {
        eprintln!("lnet-selftest: {e}");
        std::process::exit(1);
    }
}

impl RunArgs {
    fn parse_default() -> RunArgs {
        #[derive(Parser)]
        struct P {
            #[command(flatten)]
            a: RunArgs,
        }
        P::parse_from(["lnet-selftest"]).a
    }
    fn params(&self) -> Res<Params> {
        let mode = Mode::parse(&self.mode).ok_or("--mode is write, read or ping")?;
        let size = run::parse_size(&self.size).ok_or("bad --size")?;
        if size == 0 || size > 1 << 20 {
            return Err("--size must be 1 B ..= 1M".into());
        }
        let check = Check::parse(&self.check).ok_or("--check is none, simple or full")?;
        if !(self.duration > 0.0 && self.duration < 1e6) {
            return Err("--duration must be positive".into());
        }
        let duration = Duration::from_secs_f64(self.duration);
        Ok(Params {
            mode,
            size,
            offset: 0,
            concurrency: self.concurrency,
            duration,
            warmup: Duration::from_secs_f64((self.duration / 5.0).min(1.0)),
            check,
        })
    }
}

/// A private rendezvous directory for the two processes of a local run.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Res<TempDir> {
        let base = std::env::var_os("XDG_RUNTIME_DIR")
            .map(PathBuf::from)
            .filter(|p| p.is_dir())
            .unwrap_or_else(std::env::temp_dir);
        let p = base.join(format!("lnet-selftest-{}", std::process::id()));
        std::fs::create_dir_all(&p)?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o700))?;
        Ok(TempDir(p))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[cfg(feature = "rdma")]
fn lnd_rdma_addrs() -> Vec<(String, std::net::IpAddr)> {
    lnd_rdma::roce_ipv4_addrs()
}

#[cfg(not(feature = "rdma"))]
fn lnd_rdma_addrs() -> Vec<(String, std::net::IpAddr)> {
    Vec::new()
}

fn node_spec(a: &NodeArgs, default_addr: &str) -> Res<NodeSpec> {
    let addr = a.addr.clone().unwrap_or_else(|| default_addr.to_string());
    Ok(match a.lnd.as_str() {
        "lo" => NodeSpec::Lo,
        "shm" => NodeSpec::Shm {
            addr: addr.parse().map_err(|_| "shm --addr is a number")?,
            dir: a.dir.clone().unwrap_or_else(lnd_loopback::shm::default_dir),
            pool: !a.no_pool,
            busy_poll: a.busy_poll,
        },
        "tcp" => NodeSpec::Tcp {
            addr: addr.parse().map_err(|_| "tcp --addr is an IP address")?,
            port: a.port,
            peer_port: a.peer_port,
        },
        "rdma" | "o2ib" => NodeSpec::Rdma {
            addr: addr
                .parse()
                .map_err(|_| "rdma --addr is the RDMA interface's IP address")?,
            port: if a.port == 0 { 987 } else { a.port },
        },
        o => return Err(format!("unknown --lnd {o}: lo, shm, tcp or rdma").into()),
    })
}

/// A server child process.
struct ServerChild {
    child: Child,
    nid: Nid,
    port: u16,
}

impl ServerChild {
    fn spawn(args: &[String]) -> Res<ServerChild> {
        let exe = std::env::current_exe()?;
        let mut child = Command::new(exe)
            .arg("serve")
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let out = child.stdout.take().ok_or("no stdout")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut l = String::new();
            let _ = BufReader::new(out).read_line(&mut l);
            let _ = tx.send(l);
        });
        let line = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(l) => l,
            Err(_) => {
                let _ = child.kill();
                return Err("the server process did not start".into());
            }
        };
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.first() != Some(&"READY") || f.len() < 3 {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("the server process failed: {line:?}").into());
        }
        Ok(ServerChild {
            nid: f[1].parse()?,
            port: f[2].parse()?,
            child,
        })
    }
}

impl Drop for ServerChild {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(5) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve_cmd(a: &NodeArgs) -> Res<()> {
    let spec = node_spec(a, "1")?;
    let b = spec.build()?;
    let srv = Server::start(
        &b.node,
        ServerConfig {
            pool: b.pool.clone(),
            ..Default::default()
        },
    )?;
    let fw = lnet_selftest::framework::Framework::start(&b.node, srv, b.pool.clone())?;
    let _console = match &a.console {
        Some(p) => Some(lnet_selftest::console::serve_socket(b.node.clone(), p)?),
        None => None,
    };
    println!("READY {} {}", b.node.primary_nid(), b.port.unwrap_or(0));
    std::io::stdout().flush()?;
    for line in std::io::stdin().lock().lines() {
        if line?.trim() == "STATS" {
            println!("STATS {:?}", fw.server().stats());
            std::io::stdout().flush()?;
        }
    }
    drop(fw);
    if let Some(p) = &a.console {
        let _ = std::fs::remove_file(p);
    }
    b.node.shutdown();
    Ok(())
}

/// Where the two ends of a local run are, and what keeps them alive.
struct Pair {
    client: run::BuiltNode,
    server: ProcessId,
    label: (String, String),
    _server: Option<Server>,
    _child: Option<ServerChild>,
    _dir: Option<TempDir>,
}

/// A server child process started with `server_args` and a client node
/// built here from `client` (`default_addr` when it names none). The
/// client dials the port the child reports (tcp).
fn child_pair(
    server_args: &[String],
    client: &NodeArgs,
    default_addr: &str,
    dir: Option<TempDir>,
) -> Res<Pair> {
    let child = ServerChild::spawn(server_args)?;
    let mut na = client.clone();
    if na.lnd == "tcp" {
        na.peer_port = child.port;
    }
    let client = node_spec(&na, default_addr)?.build()?;
    Ok(Pair {
        label: (client.node.primary_nid().to_string(), child.nid.to_string()),
        server: ProcessId::new(child.nid, lnet::LNET_PID_LUSTRE),
        client,
        _server: None,
        _child: Some(child),
        _dir: dir,
    })
}

fn local_pair(a: &NodeArgs) -> Res<Pair> {
    match a.lnd.as_str() {
        "lo" => {
            let b = NodeSpec::Lo.build()?;
            let srv = Server::start(&b.node, ServerConfig::default())?;
            let id = b.node.id();
            Ok(Pair {
                label: (id.nid.to_string(), id.nid.to_string()),
                server: id,
                client: b,
                _server: Some(srv),
                _child: None,
                _dir: None,
            })
        }
        "shm" => {
            let dir = match &a.dir {
                Some(_) => None,
                None => Some(TempDir::new()?),
            };
            let d = a
                .dir
                .clone()
                .or_else(|| dir.as_ref().map(|d| d.0.clone()))
                .ok_or("no directory")?;
            let mut args = vec![
                "--lnd".into(),
                "shm".into(),
                "--addr".into(),
                "1".into(),
                "--dir".into(),
                d.display().to_string(),
            ];
            if a.no_pool {
                args.push("--no-pool".into());
            }
            if a.busy_poll {
                args.push("--busy-poll".into());
            }
            let mut na = a.clone();
            na.dir = Some(d);
            child_pair(&args, &na, "2", dir)
        }
        "tcp" => {
            // The server listens on any port; the client dials that one.
            let mut na = a.clone();
            na.port = 0;
            child_pair(
                &[
                    "--lnd".into(),
                    "tcp".into(),
                    "--addr".into(),
                    "127.0.0.2".into(),
                ],
                &na,
                "127.0.0.1",
                None,
            )
        }
        "rdma" | "o2ib" => {
            // Both ends on this host: the first two RDMA devices with an
            // IPv4 address (rxe0/rxe1 in the soft-RoCE VM).
            if !cfg!(feature = "rdma") {
                return Err("this lnet-selftest was built without RDMA: \
                            cargo build -p lnet-selftest --features rdma"
                    .into());
            }
            let devs = lnd_rdma_addrs();
            if devs.len() < 2 {
                return Err(format!(
                    "--lnd rdma on one host needs two RDMA devices with IPv4 addresses; found {devs:?}"
                )
                .into());
            }
            let port = if a.port == 0 { 987 } else { a.port };
            let mut na = a.clone();
            na.port = port;
            na.addr = Some(devs[0].1.to_string());
            child_pair(
                &[
                    "--lnd".into(),
                    "rdma".into(),
                    "--addr".into(),
                    devs[1].1.to_string(),
                    "--port".into(),
                    port.to_string(),
                ],
                &na,
                "",
                None,
            )
        }
        other => node_spec(a, "").and_then(|_| Err(format!("no local pair for {other}").into())),
    }
}

fn progress_bar(hidden: bool) -> ProgressBar {
    let pb = if hidden {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(1000)
    };
    if let Ok(st) = ProgressStyle::with_template("{spinner} [{bar:40}] {elapsed} {msg}") {
        pb.set_style(st.progress_chars("=> "));
    }
    pb
}

fn measure_with_bar(
    pair: &Pair,
    p: &Params,
    hidden: bool,
) -> Result<Measurement, Box<dyn std::error::Error + Send + Sync>> {
    let pb = progress_bar(hidden);
    pb.set_message(format!("{} {}", p.mode.name(), run::size_name(p.size)));
    let m = run::measure(
        &pair.client.node,
        pair.server,
        p,
        pair.client.pool.clone(),
        |f| pb.set_position((f * 1000.0) as u64),
    );
    pb.finish_and_clear();
    Ok(m?)
}

fn run_cmd(a: RunArgs) -> Res<()> {
    let p = a.params()?;
    if a.serve {
        return serve_cmd(&a.node);
    }
    let pair = if let Some(s) = &a.server {
        let nid: Nid = s.parse()?;
        let default = match a.node.lnd.as_str() {
            "shm" => "2",
            _ => "127.0.0.1",
        };
        let client = node_spec(&a.node, default)?.build()?;
        Pair {
            label: (client.node.primary_nid().to_string(), nid.to_string()),
            server: ProcessId::new(nid, lnet::LNET_PID_LUSTRE),
            client,
            _server: None,
            _child: None,
            _dir: None,
        }
    } else {
        local_pair(&a.node)?
    };
    let m = measure_with_bar(&pair, &p, a.json)?;
    if a.json {
        println!(
            "{}",
            run::json(&a.node.lnd, &pair.label.0, &pair.label.1, &p, &m)
        );
    } else {
        let title = format!(
            "lnet-selftest: {} {} over {} ({} -> {}), concurrency {}, check {}, {:.1} s",
            p.mode.name(),
            if p.mode == Mode::Ping {
                String::new()
            } else {
                run::size_name(p.size)
            },
            a.node.lnd,
            pair.label.0,
            pair.label.1,
            p.concurrency,
            run::check_name(p.check),
            m.seconds
        );
        print!("{}", run::table(&title, &m));
    }
    let errors = m.errors();
    pair.client.node.shutdown();
    drop(pair);
    if errors > 0 {
        return Err(format!("{errors} errors").into());
    }
    Ok(())
}

fn compare_cmd(a: &CompareArgs) -> Res<()> {
    use lnet_selftest::compare::{self, PeerError, Row};
    type Peer = Box<dyn Fn() -> Result<f64, PeerError>>;
    let mut a = a.clone();
    if let Some(t) = a.transport.take() {
        a.lnd = t;
    }
    let size = run::parse_size(&a.size).ok_or("bad --size")?;
    let secs = a.duration.max(0.5);
    let whole = secs.ceil() as u64;
    let sz = run::size_name(size);
    // Per transport: the peer's bandwidth and latency measurements, and
    // whether its latency is one-way (compared with half our round trip).
    let (bw_name, peer_bw, lat_name, peer_lat, one_way): (String, Peer, &str, Peer, bool) = match a
        .lnd
        .as_str()
    {
        "tcp" => {
            let (s, c) = ("127.0.0.2".parse()?, "127.0.0.1".parse()?);
            (
                "iperf3 -P1 (same addresses)".into(),
                Box::new(move || compare::iperf3_mib_s(s, c, 1, whole)),
                "TCP ping-pong 8 B (p50)",
                Box::new(move || compare::tcp_pingpong_rtt_us(s, c, 20_000)),
                false,
            )
        }
        "shm" => {
            let n = size.max(1) as usize;
            (
                format!("memcpy {sz}, one thread"),
                Box::new(move || Ok(compare::memcpy_mib_s(n, secs))),
                "ucx_perftest ucp_am_lat posix (avg)",
                Box::new(|| compare::ucx_posix_lat_us(100_000)),
                true,
            )
        }
        "rdma" | "o2ib" => {
            let devs = lnd_rdma_addrs();
            if devs.len() < 2 {
                return Err(format!("compare rdma needs two RDMA devices; found {devs:?}").into());
            }
            let (cd, sd) = (devs[0].clone(), devs[1].clone());
            let name = format!("ib_write_bw {sz} {} -> {}", cd.0, sd.0);
            let (cd2, sd2) = (cd.clone(), sd.clone());
            let bytes = u64::from(size.max(1));
            (
                name,
                Box::new(move || compare::ib_write_bw_mib_s(&sd.0, &cd.0, sd.1, bytes, whole)),
                "ib_write_lat 8 B (typical)",
                Box::new(move || compare::ib_write_lat_us(&sd2.0, &cd2.0, sd2.1, 8, 2000)),
                true,
            )
        }
        o => return Err(format!("compare covers tcp, shm and rdma, not {o}").into()),
    };
    let pair = local_pair(&NodeArgs::local(&a.lnd))?;
    let bw = Params {
        mode: Mode::Write,
        size,
        offset: 0,
        concurrency: a.concurrency,
        duration: Duration::from_secs_f64(secs),
        warmup: Duration::from_secs_f64((secs / 5.0).min(0.5)),
        check: Check::None,
    };
    // Bandwidth in interleaved rounds, each side's figure the median: a
    // shared or emulated link drifts between two back-to-back runs.
    let rounds = a.rounds.max(1);
    let (mut ours_v, mut peer_v, mut peer_err, mut errors) = (vec![], vec![], None, 0);
    for _ in 0..rounds {
        let m = measure_with_bar(&pair, &bw, false)?;
        errors += m.errors();
        ours_v.push(m.mib_s());
        match peer_bw() {
            Ok(v) => peer_v.push(v),
            Err(e) => peer_err = Some(e),
        }
    }
    let lat = Params {
        mode: Mode::Ping,
        concurrency: 1,
        duration: Duration::from_secs_f64((secs / 2.0).max(0.5)),
        ..bw
    };
    let ours_lat = measure_with_bar(&pair, &lat, false)?;
    errors += ours_lat.errors();
    let rtt = ours_lat.lat_us[0];
    let label = format!("{} -> {}", pair.label.0, pair.label.1);
    pair.client.node.shutdown();
    drop(pair);
    let rows = [
        Row {
            metric: format!("{sz} write bandwidth"),
            unit: "MiB/s",
            ours: compare::median(&mut ours_v),
            peer_name: bw_name,
            peer: match peer_err {
                Some(e) if peer_v.is_empty() => Err(e),
                _ => Ok(compare::median(&mut peer_v)),
            },
            higher_is_better: true,
        },
        Row {
            metric: if one_way {
                "one-way (ping RPC p50 / 2)".into()
            } else {
                "round trip (ping RPC p50)".into()
            },
            unit: "us",
            ours: if one_way { rtt / 2.0 } else { rtt },
            peer_name: lat_name.into(),
            peer: peer_lat(),
            higher_is_better: false,
        },
    ];
    println!(
        "lnet-selftest compare: {} ({label}), same run; bandwidth: median of {rounds} interleaved rounds",
        a.lnd
    );
    for r in &rows {
        println!("{}", compare::ratio_line(r));
    }
    if errors > 0 {
        return Err(format!("{errors} selftest errors").into());
    }
    Ok(())
}

fn sweep_cmd(a: &SweepArgs) -> Res<()> {
    let mode = Mode::parse(&a.mode).ok_or("--mode is write or read")?;
    let sizes: Vec<u32> = match &a.sizes {
        Some(s) => s
            .split(',')
            .map(|x| run::parse_size(x).ok_or("bad size"))
            .collect::<Result<_, _>>()?,
        None => (0..=9).map(|i| 8u32 << (2 * i)).chain([1 << 20]).collect(),
    };
    let mut series = Vec::new();
    for lnd in a.lnds.split(',') {
        let na = NodeArgs::local(lnd);
        let pair = local_pair(&na)?;
        let mut pts = Vec::new();
        for &size in &sizes {
            let p = Params {
                mode,
                size: size.min(1 << 20),
                offset: 0,
                concurrency: a.concurrency,
                duration: Duration::from_secs_f64(a.duration),
                warmup: Duration::from_secs_f64((a.duration / 5.0).min(0.5)),
                check: Check::None,
            };
            let m = measure_with_bar(&pair, &p, false)?;
            println!(
                "{lnd:>4} {:>6} {:>10.1} MiB/s {:>10.0} RPC/s p50 {:>9.1} us p99 {:>9.1} us errors {}",
                run::size_name(p.size),
                m.mib_s(),
                m.rpc_s(),
                m.lat_us[0],
                m.lat_us[1],
                m.errors()
            );
            pts.push((p.size, m));
        }
        pair.client.node.shutdown();
        series.push((lnd.to_string(), pts));
    }
    let svg = lnet_selftest::plot::sweep_svg(mode.name(), &series);
    std::fs::write(&a.svg, svg)?;
    println!("plot: {}", a.svg.display());
    Ok(())
}
