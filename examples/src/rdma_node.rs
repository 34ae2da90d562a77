//! A node with one o2ib (RDMA) NI that serves two portals until its stdin
//! closes: the peer of the RDMA tests, and a target for interoperability
//! checks against kernel LNet (`lctl ping <nid>` from a Lustre node).
//!
//! * portal 10: one 8 MiB MD taking PUTs and serving GETs at the offset
//!   the initiator names;
//! * portal 11: 1 MiB of `pattern(len, 7)` for GETs.
//!
//! Prints `READY <nid>` once up; on stdin EOF prints `STATS <counters>`.
//! Options: `--addr IP` (the RDMA interface's address, required), `--port
//! N` (987), `--qd N` (queue depth, 8), `--frags N` (max RDMA fragments,
//! 257), `--timeout SECS` (50).

use std::io::{BufRead, Write};
use std::time::Duration;

use lnd_rdma::{RdmaConfig, RdmaLnd};
use lnet_examples::pattern;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let opt = |k: &str| lnet_examples::opt(&args, k);
    let addr = opt("--addr").ok_or("--addr IP is required")?.parse()?;
    let mut cfg = RdmaConfig::new(addr);
    if let Some(p) = opt("--port") {
        cfg.port = p.parse()?;
    }
    if let Some(q) = opt("--qd") {
        cfg.queue_depth = q.parse()?;
    }
    if let Some(f) = opt("--frags") {
        cfg.max_frags = f.parse()?;
    }
    if let Some(t) = opt("--timeout") {
        cfg.timeout = Duration::from_secs(t.parse()?);
    }
    let rdma = RdmaLnd::new(cfg)?;
    let node = lnd_loopback::builder()
        .ni(std::sync::Arc::new(rdma.clone()))
        .build()?;
    lnet_examples::attach_echo_and_pattern(
        &node,
        vec![0u8; 8 << 20].into(),
        pattern(1 << 20, 7).into(),
    )?;
    println!("READY {}", node.primary_nid());
    std::io::stdout().flush()?;
    let mut line = String::new();
    let stdin = std::io::stdin();
    while stdin.lock().read_line(&mut line)? > 0 {
        line.clear();
    }
    // The parent may have stopped reading (a closed pipe is not an error).
    let _ = writeln!(std::io::stdout(), "STATS {:?}", rdma.stats());
    std::io::stdout().flush()?;
    node.shutdown();
    Ok(())
}
