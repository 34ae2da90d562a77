//! A node with one TCP NI that serves two portals until its stdin closes:
//! the peer used by the TCP tests and benchmarks, and a handy target for
//! interoperability checks against kernel LNet (`lctl ping` it).
//!
//! * portal 10 (`ECHO_PORTAL`): one 8 MiB MD taking PUTs and serving GETs
//!   at the offset the initiator names (any match bits), so a PUT followed
//!   by a GET of the same range returns the data;
//! * portal 11 (`PATTERN_PORTAL`): 1 MiB of `pattern(len, 7)` for GETs.
//!
//! Prints `READY <nid> <listen address> <incarnation>` once up. Options:
//! `--addr IP` (127.0.0.1), `--port N` (0: any), `--accept all|secure|none`
//! (all), `--protocol 2|3|4` (3), `--conns N` (1), `--checksum`,
//! `--zerocopy BYTES`, `--timeout SECS` (socket timeout, 50), `--cpu N`
//! (run on CPU N only), `--reader-threads` (a thread per connection reads
//! it, see `TcpConfig::reader_threads`).
//!
//! With `--verify NID --peer-port P` it is a client instead: it PUTs and
//! GETs 0 B to 1 MiB against another `tcp_node` at NID, checks every byte,
//! prints `VERIFY OK version V` and exits 0 (1 on any failure).

use std::io::{BufRead, Write};
use std::time::Duration;

use lnd_tcp::{AcceptMode, ConnsPerPeer, TcpConfig, TcpLnd};
use lnet::{Md, ProcessId, Threshold};
use lnet_examples::pattern;

pub use lnet_examples::{ECHO_PORTAL, PATTERN_PORTAL};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let opt = |k: &str| lnet_examples::opt(&args, k);
    if let Some(c) = opt("--cpu") {
        // Before the runtime starts: its threads inherit the placement.
        lnet_examples::pin_to_cpu(c.parse()?)?;
    }
    let addr = opt("--addr")
        .unwrap_or_else(|| "127.0.0.1".into())
        .parse()?;
    let mut cfg = TcpConfig::new(addr).port(opt("--port").map_or(Ok(0), |p| p.parse())?);
    cfg.accept = match opt("--accept").as_deref() {
        None | Some("all") => AcceptMode::All,
        Some("secure") => AcceptMode::Secure,
        Some("none") => AcceptMode::None,
        Some(o) => return Err(format!("bad --accept {o}").into()),
    };
    if let Some(p) = opt("--protocol") {
        cfg.protocol = p.parse()?;
    }
    cfg.conns_per_peer = ConnsPerPeer::Fixed(opt("--conns").map_or(Ok(1), |p| p.parse())?);
    cfg.checksum = args.iter().any(|a| a == "--checksum");
    cfg.reader_threads = args.iter().any(|a| a == "--reader-threads");
    if let Some(z) = opt("--zerocopy") {
        cfg.zerocopy_min = Some(z.parse()?);
    }
    if let Some(t) = opt("--threads") {
        cfg.threads = t.parse()?;
    }
    if let Some(p) = opt("--peer-port") {
        cfg.peer_port = p.parse()?;
    }
    if let Some(t) = opt("--timeout") {
        cfg.sock_timeout = Duration::from_secs(t.parse()?);
    }
    let tcp = TcpLnd::new(cfg);
    let node = lnd_loopback::builder().ni(tcp.clone()).build()?;
    lnet_examples::attach_echo_and_pattern(
        &node,
        vec![0u8; 8 << 20].into(),
        pattern(1 << 20, 7).into(),
    )?;
    if let Some(peer) = opt("--verify") {
        return verify(&node, &tcp, peer.parse()?);
    }
    let listen = tcp
        .listen_addr()
        .map_or_else(|| "-".to_string(), |a| a.to_string());
    println!(
        "READY {} {} {}",
        node.primary_nid(),
        listen,
        tcp.incarnation().unwrap_or(0)
    );
    std::io::stdout().flush()?;
    // Serve until the parent closes our stdin.
    let mut line = String::new();
    let stdin = std::io::stdin();
    while stdin.lock().read_line(&mut line)? > 0 {
        line.clear();
    }
    let s = tcp.stats();
    // The parent may have stopped reading (a closed pipe is not an error).
    let _ = writeln!(std::io::stdout(), "STATS {s:?}");
    node.shutdown();
    Ok(())
}

fn verify(
    node: &lnet::Lnet,
    tcp: &TcpLnd,
    peer: lnet::Nid,
) -> Result<(), Box<dyn std::error::Error>> {
    use lnet::{AckReq, EventQueue};
    let to = ProcessId::new(peer, lnet::LNET_PID_LUSTRE);
    let wait = |q: &EventQueue| -> Result<lnet::Event, Box<dyn std::error::Error>> {
        loop {
            let e = q
                .recv_timeout(Duration::from_secs(30))
                .ok_or("no event within 30 s")?;
            e.status.clone()?;
            if e.unlinked {
                return Ok(e);
            }
        }
    };
    for n in [0usize, 1, 4096, 65536, 1 << 20] {
        let data = pattern(n, n as u8);
        let q = EventQueue::new();
        let md = node.md_bind(
            Md::new(data.clone())
                .threshold(Threshold::Finite(2))
                .handler(q.handler()),
        )?;
        node.put(md, AckReq::Ack, to, ECHO_PORTAL, 0, 0, 0)?;
        wait(&q)?;
        let md = node.md_bind(
            Md::new(vec![0u8; n])
                .threshold(Threshold::Finite(2))
                .handler(q.handler()),
        )?;
        node.get(md, to, ECHO_PORTAL, 0, 0)?;
        let e = wait(&q)?;
        let got = e.buffer.ok_or("no buffer")?.into_vec();
        if got != data {
            return Err(format!("data mismatch at {n} bytes").into());
        }
    }
    let v = tcp.conns(peer).first().map_or(0, |c| c.version);
    println!("VERIFY OK version {v}");
    node.shutdown();
    Ok(())
}
