//! A node with one shm NI that serves two portals until its stdin closes:
//! the peer process of the shm tests and benchmarks.
//!
//! * portal 10 (`ECHO_PORTAL`): one 8 MiB MD taking PUTs and serving GETs
//!   at the offset the initiator names (any match bits); page-aligned, as
//!   a server's bulk buffers are (or in our pool with `--pool-md`);
//! * portal 11 (`PATTERN_PORTAL`): 1 MiB of `pattern(len, 7)` for GETs;
//! * portal 12 (`LOAN_PORTAL`): PUTs of up to 1 MiB taken as loans (zero
//!   copy when the sender's buffer is frozen pool memory) and dropped;
//! * portal 13 (`PONG_PORTAL`): each PUT is answered, from the event
//!   callback, by an 8-byte PUT back to the initiator's portal 13 with the
//!   same match bits: from an MD bound for that answer, or, for match bits
//!   `REUSE_MD_BITS` (1), from one MD bound once for all answers.
//!
//! Prints `READY <nid> <pid>` once up. On a line `STATS` on stdin it prints
//! `STATS <counters>` (the LND's [`StatsSnapshot`] in Debug form); on
//! `ADDR`, `ADDR <address>` of the pattern's 1 MiB in this process (a
//! source for a raw `process_vm_readv` baseline).
//! Options: `--addr N` (the NID number, required), `--dir DIR`
//! (rendezvous directory), `--no-cma`, `--no-pool`, `--pool-md` (both MDs
//! in the shared pool; the pattern is frozen, so peers may borrow it),
//! `--busy-poll`, `--cpu N` (pin the progress thread), `--pool-size BYTES`.
//!
//! With `--verify NID` it is a client instead: `--rounds N` times it PUTs
//! and GETs 0 B to 1 MiB (at most `--stripe BYTES`) into its own stripe of
//! the echo MD of the node at NID, checks every byte, prints `VERIFY OK`
//! and exits 0 (1 on any failure).
//!
//! [`StatsSnapshot`]: lnd_loopback::shm::StatsSnapshot

use std::io::{BufRead, Write};
use std::sync::Arc;
use std::time::Duration;

use lnd_loopback::LoLnd;
use lnd_loopback::shm::{ShmConfig, ShmLnd};
use lnet::{
    AckReq, EventQueue, InsPos, Lnet, LnetBuilder, Md, MdBuffer, MdOptions, ProcessId, Threshold,
    Unlink,
};
use lnet_examples::{final_events, frags, pattern};

pub use lnet_examples::{ECHO_PORTAL, PATTERN_PORTAL};
/// Portal of an MD that takes PUTs as loans (and drops them at once).
pub const LOAN_PORTAL: u32 = 12;
/// Portal that answers each PUT with a PUT of the same 8 bytes back to
/// the initiator's `PONG_PORTAL` (a latency ping-pong).
pub const PONG_PORTAL: u32 = 13;
/// Match bits of a ping answered from one MD bound for all answers.
pub const REUSE_MD_BITS: u64 = 1;

type Res<T> = Result<T, Box<dyn std::error::Error>>;

fn main() -> Res<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let opt = |k: &str| lnet_examples::opt(&args, k);
    let flag = |k: &str| args.iter().any(|a| a == k);
    let addr: u32 = opt("--addr").ok_or("--addr N is required")?.parse()?;
    let mut cfg = ShmConfig::new(addr);
    if let Some(d) = opt("--dir") {
        cfg = cfg.dir(d);
    }
    cfg.use_cma = !flag("--no-cma");
    cfg.use_pool = !flag("--no-pool");
    cfg.busy_poll = flag("--busy-poll");
    if let Some(c) = opt("--cpu") {
        cfg.cpu = Some(c.parse()?);
    }
    if let Some(s) = opt("--pool-size") {
        cfg.pool_size = s.parse()?;
    }
    let shm = Arc::new(ShmLnd::new(cfg)?);
    let node = Arc::new(
        LnetBuilder::new(Arc::new(LoLnd::new()))
            .ni(shm.clone())
            .response_timeout(Duration::from_secs(20))
            .build()?,
    );
    if let Some(peer) = opt("--verify") {
        let rounds: usize = opt("--rounds").map_or(Ok(1), |r| r.parse())?;
        let stripe: u32 = opt("--stripe").map_or(Ok(1 << 20), |r| r.parse())?;
        let peer = ProcessId::new(peer.parse()?, lnet::LNET_PID_LUSTRE);
        let r = verify(&node, peer, rounds, addr, stripe.clamp(1, 1 << 20));
        node.shutdown();
        return match r {
            Ok(()) => {
                println!("VERIFY OK");
                Ok(())
            }
            Err(e) => {
                println!("VERIFY FAILED {e}");
                std::process::exit(1);
            }
        };
    }
    let pool_md = flag("--pool-md");
    let echo: MdBuffer = if pool_md {
        let pool = shm.pool().ok_or("--pool-md needs a pool")?;
        let mut b = pool.alloc(8 << 20).ok_or("pool too small")?;
        b.fill(0);
        b.into()
    } else {
        lnet_examples::page_aligned_zeroed(8 << 20).into()
    };
    let pat = pattern(1 << 20, 7);
    let pattern_addr;
    let pattern_md: MdBuffer = if pool_md {
        let pool = shm.pool().ok_or("--pool-md needs a pool")?;
        let mut b = pool.alloc(pat.len()).ok_or("pool too small")?;
        b.copy_from_slice(&pat);
        let f = b.freeze();
        pattern_addr = f.as_ptr() as usize;
        f.into()
    } else {
        pattern_addr = pat.as_ptr() as usize;
        pat.into()
    };
    lnet_examples::attach_echo_and_pattern(&node, echo, pattern_md)?;
    node.attach(
        LOAN_PORTAL,
        ProcessId::ANY,
        0,
        u64::MAX,
        Unlink::Retain,
        InsPos::Tail,
        Md::new(MdBuffer::loan_only(1 << 20))
            .options(MdOptions::OP_PUT | MdOptions::LOAN)
            .threshold(Threshold::Infinite),
    )?;
    // The handler holds the node, as a server's request handler does:
    // `shutdown` below unlinks the MD, and the handler with it.
    let held = node.clone();
    // The answer to a ping with match bits 1 comes from this one bound MD
    // (as UCX answers from one buffer); others from an MD bound for it.
    let pong_md = node.md_bind(Md::new(vec![0u8; 8]).threshold(Threshold::Infinite))?;
    node.attach(
        PONG_PORTAL,
        ProcessId::ANY,
        0,
        u64::MAX,
        Unlink::Retain,
        InsPos::Tail,
        Md::new(vec![0u8; 8])
            .options(MdOptions::OP_PUT | MdOptions::TRUNCATE)
            .threshold(Threshold::Infinite)
            // Lent each event: no copy of it on the latency path.
            .handler(lnet::EventHandler::callback_mut(move |e| {
                if e.kind != lnet::EventKind::Put {
                    return;
                }
                let l = &held;
                let md = if e.match_bits == REUSE_MD_BITS {
                    Ok(pong_md)
                } else {
                    l.md_bind(Md::new(vec![0u8; 8]))
                };
                if let Ok(md) = md {
                    let _ = l.put(
                        md,
                        AckReq::NoAck,
                        e.initiator,
                        PONG_PORTAL,
                        e.match_bits,
                        0,
                        0,
                    );
                }
            })),
    )?;
    println!("READY {} {}", shm.nid(), std::process::id());
    std::io::stdout().flush()?;
    let stdin = std::io::stdin();
    for line in stdin.lock().lines() {
        let line = line?;
        match line.trim() {
            "STATS" => println!("STATS {:?}", shm.stats()),
            "ADDR" => println!("ADDR {pattern_addr}"),
            _ => {}
        }
        std::io::stdout().flush()?;
    }
    node.shutdown();
    Ok(())
}

fn wait_final(q: &EventQueue) -> Res<Vec<lnet::Event>> {
    let v = final_events(q, Duration::from_secs(30)).ok_or("no event in 30 s")?;
    for e in &v {
        e.status.clone()?;
    }
    Ok(v)
}

fn verify(node: &Lnet, peer: ProcessId, rounds: usize, me: u32, stripe: u32) -> Res<()> {
    // Each client writes its own stripe of the 8 MiB echo MD (clients
    // with addresses that differ modulo the stripe count do not collide).
    let base = (me % ((8 << 20) / stripe)) * stripe;
    for r in 0..rounds {
        for (i, &n) in [0usize, 1, 4096, 65536, 1 << 20].iter().enumerate() {
            let n = n.min(stripe as usize);
            let data = pattern(n, (me as u8) ^ (r as u8) ^ (i as u8));
            let q = EventQueue::new();
            let md = node.md_bind(
                Md::new(frags(&data, 3 * 4096 + 5))
                    .threshold(Threshold::Finite(2))
                    .handler(q.handler()),
            )?;
            node.put(md, AckReq::Ack, peer, ECHO_PORTAL, 1, base, 0)?;
            wait_final(&q)?;
            let q = EventQueue::new();
            let md = node.md_bind(
                Md::new(frags(&vec![0u8; n], 8191))
                    .threshold(Threshold::Finite(2))
                    .handler(q.handler()),
            )?;
            node.get(md, peer, ECHO_PORTAL, 2, base)?;
            let mut ev = wait_final(&q)?;
            let got = ev
                .iter_mut()
                .find_map(|e| e.buffer.take())
                .ok_or("no buffer")?
                .into_vec();
            if got != data {
                return Err(format!("{n} bytes: echo differs").into());
            }
        }
    }
    Ok(())
}
