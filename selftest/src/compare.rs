//! `lnet-selftest compare`: each transport beside its natural peer,
//! measured in the same run, with the ratio.
//!
//! * `tcp`: bandwidth against `iperf3` (one stream, same addresses),
//!   latency against a blocking 8-byte TCP ping-pong;
//! * `shm`: bandwidth against a single-thread `memcpy` of the same size,
//!   latency against `ucx_perftest` over UCX's posix transport;
//! * `rdma`: bandwidth against `ib_write_bw`, latency against
//!   `ib_write_lat` (perftest), on the same two devices.
//!
//! Our latency is the selftest ping's round trip (a request PUT and a
//! reply PUT): it is compared with the peer's round trip (ping-pong), or
//! halved where the peer reports one-way latency (UCX, perftest). A peer
//! tool that is not installed is reported with its Debian package.
//!
//! ```
//! use lnet_selftest::compare::{Row, ratio_line};
//! let r = Row {
//!     metric: "bandwidth 1M write".into(),
//!     unit: "MiB/s",
//!     ours: 900.0,
//!     peer_name: "iperf3 -P1".into(),
//!     peer: Ok(1000.0),
//!     higher_is_better: true,
//! };
//! assert!(ratio_line(&r).contains("0.90"));
//! ```

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Why a peer measurement is missing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerError {
    /// The tool is not installed.
    #[error("`{tool}` not found: install Debian's `{package}` package (apt-get install {package})")]
    Missing {
        /// The command.
        tool: &'static str,
        /// The Debian package that has it.
        package: &'static str,
    },
    /// It ran but its output had no result.
    #[error("{0}")]
    Failed(String),
}

/// One line of the comparison.
#[derive(Debug, Clone)]
pub struct Row {
    /// What is measured.
    pub metric: String,
    /// Unit of both numbers.
    pub unit: &'static str,
    /// Our figure.
    pub ours: f64,
    /// The peer and how it ran.
    pub peer_name: String,
    /// The peer's figure.
    pub peer: Result<f64, PeerError>,
    /// Bandwidth: higher is better; latency: lower is.
    pub higher_is_better: bool,
}

impl Row {
    /// ours / peer for bandwidth, peer / ours for latency: above 1 means
    /// we do better.
    pub fn ratio(&self) -> Option<f64> {
        let p = *self.peer.as_ref().ok()?;
        if p <= 0.0 || self.ours <= 0.0 {
            return None;
        }
        Some(if self.higher_is_better {
            self.ours / p
        } else {
            p / self.ours
        })
    }
}

/// A row as text.
pub fn ratio_line(r: &Row) -> String {
    match (&r.peer, r.ratio()) {
        (Ok(p), Some(x)) => format!(
            "{:<28} ours {:>10.2} {:<6} {:<34} {:>10.2} {:<6} ratio {:.2} ({})",
            r.metric,
            r.ours,
            r.unit,
            r.peer_name,
            p,
            r.unit,
            x,
            if r.higher_is_better {
                "ours/peer"
            } else {
                "peer/ours"
            }
        ),
        (Ok(p), None) => format!(
            "{:<28} ours {:>10.2} {:<6} {:<34} {:>10.2} {:<6} ratio n/a",
            r.metric, r.ours, r.unit, r.peer_name, p, r.unit
        ),
        (Err(e), _) => format!(
            "{:<28} ours {:>10.2} {:<6} {:<34} unavailable: {e}",
            r.metric, r.ours, r.unit, r.peer_name
        ),
    }
}

fn run_tool(
    tool: &'static str,
    package: &'static str,
    cmd: &mut Command,
) -> Result<String, PeerError> {
    let out = cmd.output().map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            PeerError::Missing { tool, package }
        } else {
            PeerError::Failed(format!("{tool}: {e}"))
        }
    })?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn spawn_tool(
    tool: &'static str,
    package: &'static str,
    cmd: &mut Command,
) -> Result<std::process::Child, PeerError> {
    cmd.stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                PeerError::Missing { tool, package }
            } else {
                PeerError::Failed(format!("{tool}: {e}"))
            }
        })
}

/// The median of `v` (0 when empty).
pub fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Single-thread `memcpy` bandwidth of `size`-byte copies, MiB/s, between
/// two page-aligned buffers: the copy at its best (a copy between buffers
/// misaligned to each other runs slower, and where `vec!` puts its buffers
/// changes with the allocator's state, which moved this bound between runs).
pub fn memcpy_mib_s(size: usize, secs: f64) -> f64 {
    const PAGE: usize = 4096;
    let a = vec![3u8; size + PAGE];
    let mut b = vec![0u8; size + PAGE];
    let (sa, sb) = (a.as_ptr().align_offset(PAGE), b.as_ptr().align_offset(PAGE));
    let src = &a[sa..sa + size];
    let dst = &mut b[sb..sb + size];
    let t0 = Instant::now();
    let mut n = 0u64;
    while t0.elapsed().as_secs_f64() < secs && n < 100_000_000 {
        dst.copy_from_slice(std::hint::black_box(src));
        std::hint::black_box(&mut *dst);
        n += 1;
    }
    n as f64 * size as f64 / t0.elapsed().as_secs_f64() / (1 << 20) as f64
}

/// Median round trip of an 8-byte blocking TCP ping-pong from `client` to
/// `server` (both local addresses), µs.
pub fn tcp_pingpong_rtt_us(server: IpAddr, client: IpAddr, n: usize) -> Result<f64, PeerError> {
    let l = TcpListener::bind((server, 0)).map_err(pingpong_failed)?;
    let at = l.local_addr().map_err(pingpong_failed)?;
    let h = std::thread::spawn(move || tcp_echo_one(&l));
    let r = tcp_pingpong_client(at, client, n);
    let _ = h.join();
    r
}

/// The echo end of the TCP ping-pong: accept one connection on `l` and
/// send back every 8 bytes it reads, until it closes. Run it in another
/// process to measure a ping-pong between two processes (as two LNet
/// nodes are) with [`tcp_pingpong_client`].
pub fn tcp_echo_one(l: &TcpListener) {
    if let Ok((mut s, _)) = l.accept() {
        let _ = s.set_nodelay(true);
        let mut b = [0u8; 8];
        while s.read_exact(&mut b).is_ok() && s.write_all(&b).is_ok() {}
    }
}

/// The timing end of the TCP ping-pong against an echo at `at`, bound to
/// `client`: the median of `n` 8-byte round trips, µs.
pub fn tcp_pingpong_client(at: SocketAddr, client: IpAddr, n: usize) -> Result<f64, PeerError> {
    let mut v = TcpPingPong::connect(at, client)?.round_trips(n)?;
    Ok(median(&mut v))
}

/// The timing end of an 8-byte TCP ping-pong, kept connected so that its
/// round trips can be measured in blocks interleaved with those of the
/// thing it bounds (a machine's drift then weighs on both alike).
///
/// ```no_run
/// use lnet_selftest::compare::{TcpPingPong, median};
/// let at = "127.0.0.1:7000".parse().unwrap(); // a `tcp_echo_one` there
/// let mut pp = TcpPingPong::connect(at, "127.0.0.2".parse().unwrap())?;
/// let mut v = pp.round_trips(1000)?;
/// println!("{:.1} us", median(&mut v));
/// # Ok::<(), lnet_selftest::compare::PeerError>(())
/// ```
#[derive(Debug)]
pub struct TcpPingPong(TcpStream);

impl TcpPingPong {
    /// Connect from `client` (any port) to the echo at `at`, with
    /// TCP_NODELAY, as our TCP connections are.
    pub fn connect(at: SocketAddr, client: IpAddr) -> Result<Self, PeerError> {
        let sock = socket_bound(client).map_err(pingpong_failed)?;
        sock.connect(&at.into()).map_err(pingpong_failed)?;
        let s: TcpStream = sock.into();
        s.set_nodelay(true).map_err(pingpong_failed)?;
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .map_err(pingpong_failed)?;
        Ok(Self(s))
    }

    /// `n` round trips of 8 bytes, one after the other: each, in µs.
    pub fn round_trips(&mut self, n: usize) -> Result<Vec<f64>, PeerError> {
        let mut v = Vec::with_capacity(n);
        let mut b = [7u8; 8];
        for _ in 0..n {
            let t = Instant::now();
            self.0.write_all(&b).map_err(pingpong_failed)?;
            self.0.read_exact(&mut b).map_err(pingpong_failed)?;
            v.push(t.elapsed().as_secs_f64() * 1e6);
        }
        Ok(v)
    }
}

fn pingpong_failed(e: std::io::Error) -> PeerError {
    PeerError::Failed(format!("TCP ping-pong: {e}"))
}

fn socket_bound(addr: IpAddr) -> std::io::Result<socket2::Socket> {
    // Bind the client end to `addr`, so the ping-pong uses the addresses
    // our own test uses.
    let s = socket2::Socket::new(
        socket2::Domain::for_address((addr, 0).into()),
        socket2::Type::STREAM,
        None,
    )?;
    s.bind(&std::net::SocketAddr::new(addr, 0).into())?;
    Ok(s)
}

/// `iperf3` bandwidth of `streams` parallel streams from `client` to
/// `server`, MiB/s.
pub fn iperf3_mib_s(
    server: IpAddr,
    client: IpAddr,
    streams: usize,
    secs: u64,
) -> Result<f64, PeerError> {
    let port = TcpListener::bind((server, 0))
        .and_then(|l| l.local_addr())
        .map_err(|e| PeerError::Failed(e.to_string()))?
        .port()
        .to_string();
    let mut srv = spawn_tool(
        "iperf3",
        "iperf3",
        Command::new("iperf3").args(["-s", "-1", "-B", &server.to_string(), "-p", &port]),
    )?;
    std::thread::sleep(Duration::from_millis(300));
    let out = run_tool(
        "iperf3",
        "iperf3",
        Command::new("iperf3").args([
            "-c",
            &server.to_string(),
            "-B",
            &client.to_string(),
            "-p",
            &port,
            "-J",
            "-t",
            &secs.max(1).to_string(),
            "-P",
            &streams.max(1).to_string(),
        ]),
    );
    let _ = srv.kill();
    let _ = srv.wait();
    let j = out?;
    let at = j
        .find("\"sum_received\"")
        .ok_or_else(|| PeerError::Failed("iperf3 printed no result".into()))?;
    let rest = &j[at..];
    let k = rest
        .find("\"bits_per_second\"")
        .ok_or_else(|| PeerError::Failed("iperf3 printed no rate".into()))?;
    let num: String = rest[k + 17..]
        .chars()
        .skip_while(|c| *c == ':' || c.is_whitespace())
        .take_while(|c| c.is_ascii_digit() || matches!(c, '.' | 'e' | 'E' | '+' | '-'))
        .collect();
    num.parse::<f64>()
        .map(|b| b / 8.0 / (1 << 20) as f64)
        .map_err(|_| PeerError::Failed("iperf3 rate unreadable".into()))
}

/// `ucx_perftest ucp_am_lat` over `UCX_TLS=posix` (plus `self`), one-way
/// latency as it reports it (average), µs.
pub fn ucx_posix_lat_us(iters: u64) -> Result<f64, PeerError> {
    ucx_perftest_lat_us(
        "ucp_am_lat",
        &[],
        &[("UCX_TLS", "posix,self,tcp"), ("UCX_NET_DEVICES", "lo")],
        iters,
        None,
    )
}

/// `ucx_perftest -t test` with `args` and `env`, server and client on this
/// host: the average latency its `Final:` line reports, µs. With
/// `cpus = Some((s, c))` the server runs pinned to CPU `s` and the client
/// to CPU `c` (its `-c` option).
pub fn ucx_perftest_lat_us(
    test: &str,
    args: &[&str],
    env: &[(&str, &str)],
    iters: u64,
    cpus: Option<(usize, usize)>,
) -> Result<f64, PeerError> {
    let (srv_cpu, cli_cpu): (Vec<String>, Vec<String>) = match cpus {
        Some((s, c)) => (
            vec!["-c".into(), s.to_string()],
            vec!["-c".into(), c.to_string()],
        ),
        None => (vec![], vec![]),
    };
    let port = TcpListener::bind(("127.0.0.1", 0))
        .and_then(|l| l.local_addr())
        .map_err(|e| PeerError::Failed(e.to_string()))?
        .port()
        .to_string();
    let mut srv = spawn_tool(
        "ucx_perftest",
        "ucx-utils",
        Command::new("ucx_perftest")
            .args(["-t", test, "-p", &port])
            .args(&srv_cpu)
            .args(args)
            .envs(env.iter().copied()),
    )?;
    std::thread::sleep(Duration::from_millis(500));
    let out = run_tool(
        "ucx_perftest",
        "ucx-utils",
        Command::new("ucx_perftest")
            .args(["127.0.0.1", "-t", test, "-p", &port])
            .args(["-n", &iters.to_string()])
            .args(&cli_cpu)
            .args(args)
            .envs(env.iter().copied()),
    );
    let _ = srv.kill();
    let _ = srv.wait();
    let text = out?;
    let line = text
        .lines()
        .find(|l| l.starts_with("Final:"))
        .ok_or_else(|| PeerError::Failed("ucx_perftest printed no result".into()))?;
    // Final: iterations, 50%ile, average, overall, ...
    line.split_whitespace()
        .nth(3)
        .and_then(|x| x.parse().ok())
        .ok_or_else(|| PeerError::Failed("ucx_perftest result unreadable".into()))
}

/// perftest's `ib_write_bw` or `ib_write_lat` between two local devices:
/// server on `srv_dev`, client on `cli_dev` connecting to `srv_ip`.
/// Returns the stdout of the client.
fn perftest(
    tool: &'static str,
    srv_dev: &str,
    cli_dev: &str,
    srv_ip: IpAddr,
    args: &[&str],
) -> Result<String, PeerError> {
    let port = TcpListener::bind((srv_ip, 0))
        .and_then(|l| l.local_addr())
        .map_err(|e| PeerError::Failed(e.to_string()))?
        .port()
        .to_string();
    let mut srv = spawn_tool(
        tool,
        "perftest",
        Command::new(tool)
            .args(["-d", srv_dev, "-x", "1", "-p", &port, "-F"])
            .args(args),
    )?;
    std::thread::sleep(Duration::from_millis(800));
    let out = run_tool(
        tool,
        "perftest",
        Command::new(tool)
            .args(["-d", cli_dev, "-x", "1", "-p", &port, "-F"])
            .args(args)
            .arg(srv_ip.to_string()),
    );
    let _ = srv.kill();
    let _ = srv.wait();
    out
}

/// The numbers on perftest's result line (the one starting with the
/// message size).
fn perftest_row(text: &str, size: u64) -> Option<Vec<f64>> {
    text.lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|w| w.first().and_then(|x| x.parse::<u64>().ok()) == Some(size) && w.len() >= 4)
        .map(|w| w.iter().filter_map(|x| x.parse::<f64>().ok()).collect())
}

/// `ib_write_bw` average bandwidth of `size`-byte writes, MiB/s as
/// perftest reports "MB/sec" (2^20 bytes).
pub fn ib_write_bw_mib_s(
    srv_dev: &str,
    cli_dev: &str,
    srv_ip: IpAddr,
    size: u64,
    secs: u64,
) -> Result<f64, PeerError> {
    let text = perftest(
        "ib_write_bw",
        srv_dev,
        cli_dev,
        srv_ip,
        &["-s", &size.to_string(), "-D", &secs.max(1).to_string()],
    )?;
    // #bytes #iterations BW peak BW average MsgRate
    perftest_row(&text, size)
        .and_then(|v| v.get(3).copied())
        .ok_or_else(|| PeerError::Failed("ib_write_bw printed no result".into()))
}

/// `ib_write_lat` typical (median) one-way latency of `size`-byte
/// writes, µs.
pub fn ib_write_lat_us(
    srv_dev: &str,
    cli_dev: &str,
    srv_ip: IpAddr,
    size: u64,
    iters: u64,
) -> Result<f64, PeerError> {
    let text = perftest(
        "ib_write_lat",
        srv_dev,
        cli_dev,
        srv_ip,
        &["-s", &size.to_string(), "-n", &iters.to_string()],
    )?;
    // #bytes #iterations t_min t_max t_typical t_avg ...
    perftest_row(&text, size)
        .and_then(|v| v.get(4).copied())
        .ok_or_else(|| PeerError::Failed("ib_write_lat printed no result".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn perftest_rows_parse() {
        let bw = " #bytes     #iterations    BW peak[MB/sec]    BW average[MB/sec]   MsgRate[Mpps]\n 1048576    1000             36.21              35.90                0.000036\n";
        assert_eq!(perftest_row(bw, 1048576).unwrap()[3], 35.90);
        let lat = " #bytes #iterations    t_min[usec]    t_max[usec]  t_typical[usec]    t_avg[usec]    t_stdev[usec]   99% percentile[usec]   99.9% percentile[usec] \n 8       1000          20.10          300.5        25.30             27.00        3.1             40.0                  200.0\n";
        assert_eq!(perftest_row(lat, 8).unwrap()[4], 25.30);
        assert!(perftest_row("garbage", 8).is_none());
    }

    #[test]
    fn a_kept_ping_pong_measures_blocks_on_one_connection() {
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        let l = TcpListener::bind((lo, 0)).unwrap();
        let at = l.local_addr().unwrap();
        let echo = std::thread::spawn(move || tcp_echo_one(&l));
        let mut pp = TcpPingPong::connect(at, lo).unwrap();
        for n in [10, 1, 25] {
            let v = pp.round_trips(n).unwrap();
            assert_eq!(v.len(), n);
            assert!(v.iter().all(|t| *t > 0.0), "{v:?}");
        }
        // The echo served one connection: closing it ends the echo.
        drop(pp);
        echo.join().unwrap();
    }

    #[test]
    fn missing_tool_names_its_package() {
        let e = run_tool(
            "no-such-tool-lnet",
            "some-package",
            &mut Command::new("no-such-tool-lnet"),
        )
        .unwrap_err();
        assert!(
            e.to_string().contains("apt-get install some-package"),
            "{e}"
        );
    }

    #[test]
    fn ratios_favour_the_better_side() {
        let mut r = Row {
            metric: "m".into(),
            unit: "us",
            ours: 20.0,
            peer_name: "p".into(),
            peer: Ok(10.0),
            higher_is_better: false,
        };
        assert_eq!(r.ratio(), Some(0.5));
        r.higher_is_better = true;
        assert_eq!(r.ratio(), Some(2.0));
        r.peer = Err(PeerError::Failed("x".into()));
        assert_eq!(r.ratio(), None);
    }

    #[test]
    fn memcpy_and_pingpong_measure_something() {
        assert!(memcpy_mib_s(1 << 16, 0.05) > 0.0);
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        assert!(tcp_pingpong_rtt_us(lo, lo, 50).unwrap() > 0.0);
    }
}
