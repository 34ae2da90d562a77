//! Nodes and measurements behind `lnet-selftest run`, `serve` and `sweep`.
//!
//! [`NodeSpec`] builds a node on one transport (`lo`, `shm`, `tcp`);
//! [`measure`] runs a client test for a while and turns it into a
//! [`Measurement`]: bandwidth, RPC and LNet message rates over the
//! measured window (after a warm-up), latency percentiles, errors.
//!
//! ```
//! use std::sync::Arc;
//! use std::time::Duration;
//! use lnet_selftest::run::{measure, Mode, Params};
//! use lnet_selftest::server::Server;
//! let node = Arc::new(lnd_loopback::builder().build().unwrap());
//! let _srv = Server::start(&node, Default::default()).unwrap();
//! let p = Params { mode: Mode::Ping, duration: Duration::from_millis(200), ..Params::default() };
//! let m = measure(&node, node.id(), &p, None, |_| {}).unwrap();
//! assert!(m.rpcs > 0 && m.errors() == 0);
//! node.shutdown();
//! ```

use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use lnd_loopback::LoLnd;
use lnd_loopback::shm::{ShmConfig, ShmLnd};
use lnd_tcp::{AcceptMode, ConnsPerPeer, SourcePort, TcpConfig, TcpLnd};
use lnet::pool::MemPool;
use lnet::{Lnet, LnetBuilder, ProcessId};

use crate::bulk::Check;
use crate::client::{Client, Progress, TestKind, TestSpec};

/// What each RPC does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// The client's data is written to the server (server GETs).
    Write,
    /// The server's data is read by the client (server PUTs).
    Read,
    /// Ping RPCs, no bulk.
    Ping,
}

impl Mode {
    /// Parses `write`, `read`, `ping`.
    pub fn parse(s: &str) -> Option<Mode> {
        Some(match s {
            "write" => Mode::Write,
            "read" => Mode::Read,
            "ping" => Mode::Ping,
            _ => return None,
        })
    }
    /// Its name.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Write => "write",
            Mode::Read => "read",
            Mode::Ping => "ping",
        }
    }
}

/// The parameters of one measurement.
#[derive(Clone, Debug)]
pub struct Params {
    /// Write, read or ping.
    pub mode: Mode,
    /// Bytes per brw RPC.
    pub size: u32,
    /// Offset in the first page.
    pub offset: u32,
    /// RPCs in flight.
    pub concurrency: usize,
    /// Measured time (after the warm-up).
    pub duration: Duration,
    /// Warm-up before measuring (not counted).
    pub warmup: Duration,
    /// Data check.
    pub check: Check,
}

impl Default for Params {
    fn default() -> Self {
        Params {
            mode: Mode::Write,
            size: 1 << 20,
            offset: 0,
            concurrency: 8,
            duration: Duration::from_secs(5),
            warmup: Duration::ZERO,
            check: Check::None,
        }
    }
}

impl Params {
    /// The client test these parameters describe.
    pub fn kind(&self) -> TestKind {
        match self.mode {
            Mode::Ping => TestKind::Ping,
            m => TestKind::Brw {
                write: m == Mode::Write,
                size: self.size,
                offset: self.offset,
                check: self.check,
            },
        }
    }
}

/// The figures of one measurement.
#[derive(Clone, Debug)]
pub struct Measurement {
    /// Seconds measured.
    pub seconds: f64,
    /// Good RPCs in the window.
    pub rpcs: u64,
    /// Bulk bytes of those RPCs.
    pub bytes: u64,
    /// LNet messages the client node sent and received in the window.
    pub lnet_msgs: u64,
    /// RPCs that failed (transport, timeout), whole run.
    pub rpc_errors: u64,
    /// RPCs with a bad status or bad data, whole run.
    pub data_errors: u64,
    /// Latency percentiles of the window, microseconds: p50, p99, p99.9.
    pub lat_us: [f64; 3],
    /// Mean, min and max latency, microseconds.
    pub lat_mean_min_max_us: [f64; 3],
    /// The first errors.
    pub first_errors: Vec<String>,
}

impl Measurement {
    /// All errors.
    pub fn errors(&self) -> u64 {
        self.rpc_errors + self.data_errors
    }
    /// MiB/s.
    pub fn mib_s(&self) -> f64 {
        self.bytes as f64 / (1024.0 * 1024.0) / self.seconds.max(1e-9)
    }
    /// RPCs/s.
    pub fn rpc_s(&self) -> f64 {
        self.rpcs as f64 / self.seconds.max(1e-9)
    }
    /// LNet messages/s.
    pub fn msg_s(&self) -> f64 {
        self.lnet_msgs as f64 / self.seconds.max(1e-9)
    }
}

/// Why a measurement failed.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The test could not start.
    #[error(transparent)]
    Test(#[from] crate::client::TestError),
    /// No good RPC completed.
    #[error("no RPC completed: {0}")]
    NothingCompleted(String),
}

/// Runs the client side of `p` from `node` against `server` and measures
/// it. `tick` is called about every 100 ms with the elapsed fraction of
/// the measured time and the counters so far.
pub fn measure(
    node: &Arc<Lnet>,
    server: ProcessId,
    p: &Params,
    pool: Option<MemPool>,
    mut tick: impl FnMut(f64),
) -> Result<Measurement, RunError> {
    let spec = TestSpec::new(vec![server], p.kind())
        .concurrency(p.concurrency)
        .pool(pool);
    let c = Client::start(node, spec)?;
    let end_warm = Instant::now() + p.warmup;
    while Instant::now() < end_warm && c.is_active() {
        std::thread::sleep(Duration::from_millis(20));
        c.reap();
    }
    let t0 = Instant::now();
    let p0 = c.progress();
    let m0 = node.counters().msgs;
    c.reset_latency();
    let end = t0 + p.duration;
    loop {
        let now = Instant::now();
        if now >= end || !c.is_active() {
            break;
        }
        std::thread::sleep((end - now).min(Duration::from_millis(100)));
        c.reap();
        tick(t0.elapsed().as_secs_f64() / p.duration.as_secs_f64().max(1e-9));
    }
    let p1 = c.progress();
    let m1 = node.counters().msgs;
    let seconds = t0.elapsed().as_secs_f64();
    let hist = c.latency();
    c.stop();
    let r = c.wait(Duration::from_secs(30));
    let d = |a: Progress, b: Progress| (b.rpcs_ok - a.rpcs_ok, b.bytes - a.bytes);
    let (rpcs, bytes) = d(p0, p1);
    let q = |x: f64| hist.value_at_quantile(x) as f64 / 1000.0;
    let m = Measurement {
        seconds,
        rpcs,
        bytes,
        lnet_msgs: (m1.sent() + m1.received()) - (m0.sent() + m0.received()),
        rpc_errors: r.rpcs_failed,
        data_errors: r.test_errors,
        lat_us: [q(0.5), q(0.99), q(0.999)],
        lat_mean_min_max_us: [
            hist.mean() / 1000.0,
            hist.min() as f64 / 1000.0,
            hist.max() as f64 / 1000.0,
        ],
        first_errors: r.first_errors,
    };
    if r.rpcs_ok == 0 {
        return Err(RunError::NothingCompleted(
            m.first_errors.first().cloned().unwrap_or_default(),
        ));
    }
    Ok(m)
}

/// A transport to build a node on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NodeSpec {
    /// Only `0@lo`: client and server in one process.
    Lo,
    /// A `shm` NI `addr@shm` in rendezvous directory `dir`.
    Shm {
        /// NID number.
        addr: u32,
        /// Rendezvous directory.
        dir: PathBuf,
        /// Use the shared pool for bulk buffers.
        pool: bool,
        /// Never sleep waiting for messages.
        busy_poll: bool,
    },
    /// A `tcp` NI.
    Tcp {
        /// Address to listen on and use as the NID.
        addr: std::net::IpAddr,
        /// Port to listen on (0: any).
        port: u16,
        /// Port peers listen on.
        peer_port: u16,
    },
    /// An `o2ib` NI (RDMA; built with the `rdma` feature).
    Rdma {
        /// The RDMA interface's IP address (the NID).
        addr: std::net::IpAddr,
        /// RDMA CM port, the same on both ends (o2iblnd: 987).
        port: u16,
    },
}

/// A built node and what it offers the selftest.
pub struct BuiltNode {
    /// The node.
    pub node: Arc<Lnet>,
    /// Memory for bulk buffers that its transport moves best.
    pub pool: Option<MemPool>,
    /// The TCP port it listens on, for `tcp`.
    pub port: Option<u16>,
}

impl NodeSpec {
    /// Builds the node.
    pub fn build(&self) -> Result<BuiltNode, Box<dyn std::error::Error + Send + Sync>> {
        let b = LnetBuilder::new(Arc::new(LoLnd::new())).response_timeout(Duration::from_secs(30));
        Ok(match self {
            NodeSpec::Lo => BuiltNode {
                node: Arc::new(b.build()?),
                pool: None,
                port: None,
            },
            NodeSpec::Shm {
                addr,
                dir,
                pool,
                busy_poll,
            } => {
                let mut cfg = ShmConfig::new(*addr).dir(dir);
                cfg.use_pool = *pool;
                cfg.busy_poll = *busy_poll;
                let shm = Arc::new(ShmLnd::new(cfg)?);
                let node = Arc::new(b.ni(shm.clone()).build()?);
                BuiltNode {
                    node,
                    pool: shm.pool(),
                    port: None,
                }
            }
            NodeSpec::Tcp {
                addr,
                port,
                peer_port,
            } => {
                let mut cfg = TcpConfig::new(*addr).port(*port);
                cfg.accept = AcceptMode::All;
                cfg.source_port = SourcePort::Ephemeral;
                cfg.peer_port = *peer_port;
                cfg.conns_per_peer = ConnsPerPeer::Fixed(1);
                let tcp = TcpLnd::new(cfg);
                let node = Arc::new(b.ni(tcp.clone()).build()?);
                BuiltNode {
                    node,
                    pool: None,
                    port: tcp.listen_addr().map(|a| a.port()),
                }
            }
            #[cfg(feature = "rdma")]
            NodeSpec::Rdma { addr, port } => {
                let mut cfg = lnd_rdma::RdmaConfig::new(*addr);
                cfg.port = *port;
                let rdma = lnd_rdma::RdmaLnd::new(cfg)?;
                // Bulk buffers from one pool registered once: no
                // registration on the data path.
                let pool = MemPool::heap(256 << 20)?;
                rdma.register_pool(&pool)?;
                let node = Arc::new(b.ni(Arc::new(rdma)).build()?);
                BuiltNode {
                    node,
                    pool: Some(pool),
                    port: Some(*port),
                }
            }
            #[cfg(not(feature = "rdma"))]
            NodeSpec::Rdma { .. } => {
                return Err("this lnet-selftest was built without RDMA: \
                            cargo build -p lnet-selftest --features rdma"
                    .into());
            }
        })
    }
}

/// Formats bytes as lst writes sizes (`1M`, `4K`, `100`).
pub fn size_name(n: u32) -> String {
    if n >= 1 << 20 && n % (1 << 20) == 0 {
        format!("{}M", n >> 20)
    } else if n >= 1024 && n % 1024 == 0 {
        format!("{}K", n >> 10)
    } else {
        n.to_string()
    }
}

/// Parses a size with lst's suffixes (`4k`, `1M`, plain bytes).
pub fn parse_size(s: &str) -> Option<u32> {
    let s = s.trim();
    let (num, mul) = match s.char_indices().last()? {
        (i, 'k' | 'K') => (&s[..i], 1024u64),
        (i, 'm' | 'M') => (&s[..i], 1 << 20),
        (i, 'b' | 'B') => (&s[..i], 1),
        _ => (s, 1),
    };
    let v = num.parse::<u64>().ok()?.checked_mul(mul)?;
    u32::try_from(v).ok()
}

/// The report table.
pub fn table(title: &str, m: &Measurement) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "{title}");
    let _ = writeln!(
        s,
        "{:>10} {:>10} {:>12} {:>9} {:>9} {:>9} {:>7}",
        "MiB/s", "RPC/s", "LNet msg/s", "p50 us", "p99 us", "p99.9 us", "errors"
    );
    let _ = writeln!(
        s,
        "{:>10.1} {:>10.0} {:>12.0} {:>9.1} {:>9.1} {:>9.1} {:>7}",
        m.mib_s(),
        m.rpc_s(),
        m.msg_s(),
        m.lat_us[0],
        m.lat_us[1],
        m.lat_us[2],
        m.errors()
    );
    for e in m.first_errors.iter().take(5) {
        let _ = writeln!(s, "error: {e}");
    }
    s
}

fn json_str(s: &str) -> String {
    let mut o = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(o, "\\u{:04x}", c as u32);
            }
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

/// One JSON object with the figures of a run (the fields are documented
/// in the README's selftest section).
pub fn json(lnd: &str, client: &str, server: &str, p: &Params, m: &Measurement) -> String {
    let errs: Vec<String> = m.first_errors.iter().map(|e| json_str(e)).collect();
    format!(
        concat!(
            "{{\"lnd\":{},\"mode\":{},\"size\":{},\"concurrency\":{},\"check\":{},",
            "\"client\":{},\"server\":{},\"seconds\":{:.6},\"rpcs\":{},\"bytes\":{},",
            "\"lnet_msgs\":{},\"mib_per_s\":{:.3},\"rpcs_per_s\":{:.3},\"lnet_msgs_per_s\":{:.3},",
            "\"latency_us\":{{\"p50\":{:.3},\"p99\":{:.3},\"p99_9\":{:.3},\"mean\":{:.3},\"min\":{:.3},\"max\":{:.3}}},",
            "\"errors\":{},\"rpc_errors\":{},\"data_errors\":{},\"first_errors\":[{}]}}"
        ),
        json_str(lnd),
        json_str(p.mode.name()),
        if p.mode == Mode::Ping { 0 } else { p.size },
        p.concurrency,
        json_str(check_name(p.check)),
        json_str(client),
        json_str(server),
        m.seconds,
        m.rpcs,
        m.bytes,
        m.lnet_msgs,
        m.mib_s(),
        m.rpc_s(),
        m.msg_s(),
        m.lat_us[0],
        m.lat_us[1],
        m.lat_us[2],
        m.lat_mean_min_max_us[0],
        m.lat_mean_min_max_us[1],
        m.lat_mean_min_max_us[2],
        m.errors(),
        m.rpc_errors,
        m.data_errors,
        errs.join(",")
    )
}

/// lst's name of a check.
pub fn check_name(c: Check) -> &'static str {
    match c {
        Check::None => "none",
        Check::Simple => "simple",
        Check::Full => "full",
        Check::Discard => "discard",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4k"), Some(4096));
        assert_eq!(parse_size("1M"), Some(1 << 20));
        assert_eq!(parse_size("100"), Some(100));
        assert_eq!(parse_size("8b"), Some(8));
        assert_eq!(parse_size("x"), None);
        assert_eq!(parse_size("99999999M"), None);
        assert_eq!(size_name(1 << 20), "1M");
        assert_eq!(size_name(4096), "4K");
        assert_eq!(size_name(100), "100");
    }

    #[test]
    fn json_escapes() {
        assert_eq!(json_str("a\"b\\\n"), "\"a\\\"b\\\\\\u000a\"");
    }
}
