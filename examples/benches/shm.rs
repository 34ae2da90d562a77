//! shm between two processes, each figure beside its bound measured in the
//! same run on this machine, with the ratio:
//!
//! * 1 MiB PUT, source in our shared pool (the peer copies once through its
//!   mapping) beside a single-thread `memcpy` of 1 MiB;
//! * 1 MiB PUT between ordinary buffers (`process_vm_readv` by the peer)
//!   beside a raw `process_vm_readv` of 1 MiB from the same peer process;
//! * the bounce path (no bound; reported);
//! * loans at 4 KiB, 64 KiB and 1 MiB beside the one-copy pool path;
//! * one-way latency of an 8-byte PUT (a ping-pong of PUTs, each answered
//!   from the event callback of the one before) in busy-poll mode beside `ucx_perftest` over UCX's posix
//!   transport (Debian's `ucx-utils`), the two measured in turn round by
//!   round, with the floor of our ring alone (two threads passing 96-byte
//!   slots, no LNet work) taken before, between and after the two sides
//!   of each round and printed beside, and the ratios also given per host
//!   state over the rounds whose state held throughout; for context (no
//!   goal), the reused-MD figure beside UCX's tag matching too
//!   (`tag_lat`: a matched send, as every LNet PUT is matched on its
//!   portal's ME list, where `ucp_am_lat` matches nothing); and
//!   in the default mode beside a blocking TCP ping-pong on loopback.
//!
//! `cargo bench -p lnet-examples --bench shm` (set `SHM_BENCH_SECS` for
//! longer runs, 1 s per figure by default; `SHM_BENCH_ROUNDS` for the
//! number of interleaved rounds the copy paths' time is cut into, 15 by
//! default: on a shared machine memory bandwidth swings by 30% from one
//! second to the next, so a figure and its bound are taken in turn in
//! short rounds and each ratio is the median of the rounds' ratios;
//! `SHM_BENCH_LAT_ROUNDS` for the busy-poll latency's rounds, 15 by
//! default, reported as the median of the rounds' ratios and per host
//! state; `SHM_BENCH_ONLY=latency` for the latencies alone).

use std::io::IoSliceMut;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use lnd_loopback::LoLnd;
use lnd_loopback::shm::{ShmConfig, ShmLnd};
use lnet::{
    AckReq, EventHandler, EventKind, InsPos, Lnet, LnetBuilder, Md, MdHandle, MdOptions, ProcessId,
    Threshold, Unlink,
};
use lnet_examples::ChildNode;
use lnet_selftest::compare::{self, median};

const ECHO: u32 = 10;
const LOAN: u32 = 12;
const PONG: u32 = 13;
/// Match bits that have `shm_node` answer from its one reused MD.
const REUSE_MD_BITS: u64 = 1;
const MIB: usize = 1 << 20;

struct Srv {
    node: ChildNode,
    id: ProcessId,
    pid: i32,
}

impl Srv {
    fn start(dir: &Path, extra: &[&str]) -> Srv {
        let node = ChildNode::spawn(
            Command::new(env!("CARGO_BIN_EXE_shm_node"))
                .args(["--addr", "2", "--dir"])
                .arg(dir)
                .args(extra),
            Duration::from_secs(30),
        );
        Srv {
            id: ProcessId::new(node.ready[0].parse().unwrap(), lnet::LNET_PID_LUSTRE),
            pid: node.ready[1].parse().unwrap(),
            node,
        }
    }
    fn ask(&mut self, cmd: &str) -> String {
        self.node.ask(cmd, Duration::from_secs(10))
    }
}

fn client(dir: &Path, tune: impl FnOnce(&mut ShmConfig)) -> (Arc<Lnet>, Arc<ShmLnd>) {
    let mut cfg = ShmConfig::new(1).dir(dir);
    tune(&mut cfg);
    let shm = Arc::new(ShmLnd::new(cfg).unwrap());
    let l = LnetBuilder::new(Arc::new(LoLnd::new()))
        .ni(shm.clone())
        .build()
        .unwrap();
    (Arc::new(l), shm)
}

/// Keeps `depth` PUTs of `src` in flight (no ACK: a PUT ends when the peer
/// has the payload), each completion issuing the next from the event
/// callback, on the LND's own thread, as an LNet server would.
struct Pump {
    l: Weak<Lnet>,
    to: ProcessId,
    portal: u32,
    src: Bytes,
    stop: AtomicBool,
    done: AtomicU64,
    inflight: AtomicUsize,
    fin: Mutex<Option<std::sync::mpsc::Sender<()>>>,
}

impl Pump {
    fn issue(self: &Arc<Self>) {
        let Some(l) = self.l.upgrade() else { return };
        let me = self.clone();
        let md = l
            .md_bind(
                Md::new(self.src.clone()).handler(EventHandler::callback(move |e| {
                    assert!(e.status.is_ok(), "{:?}", e.status);
                    if e.unlinked {
                        me.done.fetch_add(1, Ordering::Relaxed);
                        if me.stop.load(Ordering::Relaxed) {
                            if me.inflight.fetch_sub(1, Ordering::AcqRel) == 1 {
                                if let Some(f) = me.fin.lock().unwrap().take() {
                                    let _ = f.send(());
                                }
                            }
                        } else {
                            me.issue();
                        }
                    }
                })),
            )
            .unwrap();
        l.put(md, AckReq::NoAck, self.to, self.portal, 1, 0, 0)
            .unwrap();
    }
}

/// Bytes per second of PUTs of `src`, `depth` in flight, for `secs`.
fn put_bw(l: &Arc<Lnet>, to: ProcessId, portal: u32, src: &Bytes, depth: usize, secs: f64) -> f64 {
    let (tx, rx) = std::sync::mpsc::channel();
    let p = Arc::new(Pump {
        l: Arc::downgrade(l),
        to,
        portal,
        src: src.clone(),
        stop: AtomicBool::new(false),
        done: AtomicU64::new(0),
        inflight: AtomicUsize::new(depth),
        fin: Mutex::new(Some(tx)),
    });
    let t0 = Instant::now();
    for _ in 0..depth {
        p.issue();
    }
    std::thread::sleep(Duration::from_secs_f64(secs));
    let n = p.done.load(Ordering::Relaxed);
    let dt = t0.elapsed().as_secs_f64();
    p.stop.store(true, Ordering::Relaxed);
    rx.recv_timeout(Duration::from_secs(30))
        .expect("pump drained");
    n as f64 * src.len() as f64 / dt
}

/// `f()` on a thread pinned to `cpu` (unpinned, with a warning, where
/// that CPU is not ours).
fn on_cpu<T: Send>(cpu: usize, f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        s.spawn(|| {
            if let Err(e) = lnet_examples::pin_to_cpu(cpu) {
                eprintln!("bound not pinned: {e}");
            }
            f()
        })
        .join()
        .expect("bound thread")
    })
}

fn cma_raw_bw(pid: i32, addr: usize, secs: f64) -> f64 {
    let mut dst = vec![0u8; MIB];
    let remote = [nix::sys::uio::RemoteIoVec {
        base: addr,
        len: MIB,
    }];
    let pid = nix::unistd::Pid::from_raw(pid);
    let t0 = Instant::now();
    let mut n = 0u64;
    while t0.elapsed().as_secs_f64() < secs {
        let got = nix::sys::uio::process_vm_readv(pid, &mut [IoSliceMut::new(&mut dst)], &remote)
            .unwrap();
        assert_eq!(got, MIB);
        n += 1;
    }
    n as f64 * MIB as f64 / t0.elapsed().as_secs_f64()
}

/// One-way latency of an 8-byte PUT, in µs: a ping-pong of PUTs without
/// ACK, each answered from an event callback on the LND's own thread (the
/// server's `PONG_PORTAL` answers ours); time / (2 x round trips).
/// With `reuse`, every PUT (ours and the server's answers) goes from one MD
/// bound once (`Threshold::Infinite`, no event handler), as UCX's `am_lat`
/// sends from one buffer; without, each from an MD bound for it, as an RPC
/// layer binds one per request.
/// Round trips per latency figure, ours and UCX's alike.
const LAT_ITERS: usize = 100_000;

fn put_lat(l: &Arc<Lnet>, to: ProcessId, n: usize, reuse: bool) -> f64 {
    let left = Arc::new(AtomicUsize::new(0));
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let tx = Mutex::new(tx);
    // The handler holds the node (as UCX's perftest holds its worker);
    // unlinking the ME below lets it go.
    let node = l.clone();
    let left2 = left.clone();
    let src = reuse.then(|| {
        l.md_bind(Md::new(vec![7u8; 8]).threshold(Threshold::Infinite))
            .unwrap()
    });
    let me = l
        .attach(
            PONG,
            ProcessId::ANY,
            0,
            u64::MAX,
            Unlink::Retain,
            InsPos::Tail,
            Md::new(vec![0u8; 8])
                .options(MdOptions::OP_PUT | MdOptions::TRUNCATE)
                .threshold(Threshold::Infinite)
                // Lent each event (no copy of it on the way in), as
                // UCX's AM handler is lent its message.
                .handler(EventHandler::callback_mut(move |e| {
                    if e.kind != EventKind::Put {
                        return;
                    }
                    // Events of one MD come one at a time (the pipe's
                    // guarantee), so the count needs no atomic update.
                    let n = left2.load(Ordering::Acquire);
                    left2.store(n.saturating_sub(1), Ordering::Release);
                    if n > 1 {
                        ping(&node, to, src);
                    } else {
                        let _ = tx.lock().unwrap().send(());
                    }
                })),
        )
        .unwrap();
    let run = |n: usize| {
        left.store(n, Ordering::Release);
        let t0 = Instant::now();
        ping(l, to, src);
        rx.recv_timeout(Duration::from_secs(60))
            .expect("ping-pong done");
        t0.elapsed().as_secs_f64() * 1e6 / n as f64 / 2.0
    };
    run(n / 10);
    let r = run(n);
    let _ = l.me_unlink(me.0);
    if let Some(md) = src {
        let _ = l.md_unlink(md);
    }
    r
}

/// One busy-poll latency round: our ring alone before, between and after
/// the two sides, and our ratios to UCX's `ucp_am_lat` (an MD bound per
/// PUT, one MD reused), with one MD reused beside UCX's tag matching
/// (`tag_lat`) when that ran.
struct Round {
    floors: [f64; 3],
    per_put: f64,
    reused: f64,
    tag: Option<f64>,
}

/// The latency rounds' ratios by host state. This host moves between
/// cross-core states (our ring alone: about 0.035, 0.06-0.08 or 0.2-0.25
/// us), for seconds or minutes at a time, and the two sides of a round
/// may run in different states; the median over all rounds then mixes
/// them. Our ring alone is timed before, between and after the two sides
/// of each round. A round's state is the median of those three; the
/// states are the runs of rounds' states, in order, with no step of more
/// than half as much again between neighbours. A round counts for its
/// state only when the state held through it: its three floors all in
/// the state and within twice each other.
fn by_state(rounds: &[Round]) -> String {
    if rounds.is_empty() {
        return String::new();
    }
    let span = |v: &mut dyn Iterator<Item = f64>| {
        v.fold((f64::INFINITY, 0.0f64), |(lo, hi), x| {
            (lo.min(x), hi.max(x))
        })
    };
    let floor_of: Vec<f64> = rounds
        .iter()
        .map(|r| median(&mut r.floors.to_vec()))
        .collect();
    let mut floors = floor_of.clone();
    floors.sort_by(f64::total_cmp);
    // Between two states, where neighbouring floors jump by half again.
    let cuts: Vec<f64> = floors
        .windows(2)
        .filter(|w| w[1] > 1.5 * w[0])
        .map(|w| (w[0] * w[1]).sqrt())
        .collect();
    let state_of = |f: f64| cuts.iter().filter(|&&c| f >= c).count();
    // Each round's state, when it held through the round.
    let held: Vec<Option<usize>> = rounds
        .iter()
        .map(|r| {
            let (lo, hi) = span(&mut r.floors.iter().copied());
            let s = state_of(r.floors[0]);
            (hi <= 2.0 * lo && r.floors.iter().all(|&x| state_of(x) == s)).then_some(s)
        })
        .collect();
    let mut out = vec![];
    for s in 0..=cuts.len() {
        let in_state: Vec<usize> = (0..rounds.len()).filter(|&i| held[i] == Some(s)).collect();
        if in_state.is_empty() {
            continue;
        }
        let (lo, hi) = span(&mut in_state.iter().map(|&i| floor_of[i]));
        let (mut per_put, mut reused): (Vec<f64>, Vec<f64>) = in_state
            .iter()
            .map(|&i| (rounds[i].per_put, rounds[i].reused))
            .unzip();
        let mut tag: Vec<f64> = in_state.iter().filter_map(|&i| rounds[i].tag).collect();
        out.push(format!(
            "ring alone {lo:.3}-{hi:.3} us, {} rounds: one MD reused {:.2}, an MD per PUT {:.2}{}",
            per_put.len(),
            median(&mut reused),
            median(&mut per_put),
            if tag.is_empty() {
                String::new()
            } else {
                format!(" (one MD reused / UCX tag_lat {:.2})", median(&mut tag))
            }
        ));
    }
    format!(
        "ratios by host state (rounds whose state held through both sides): {}; {} rounds left out, the state moved within them",
        out.join("; "),
        held.iter().filter(|h| h.is_none()).count()
    )
}

/// An 8-byte PUT to the server's pong portal: from `src` (match bits
/// `REUSE_MD_BITS`: answered from a reused MD too) or from an MD bound now.
fn ping(l: &Lnet, to: ProcessId, src: Option<MdHandle>) {
    let (md, bits) = match src {
        Some(md) => (md, REUSE_MD_BITS),
        None => (l.md_bind(Md::new(vec![7u8; 8])).unwrap(), 0),
    };
    l.put(md, AckReq::NoAck, to, PONG, bits, 0, 0).unwrap();
}

fn gbs(x: f64) -> f64 {
    x / 1e9
}

fn tmpdir() -> PathBuf {
    let d = std::env::temp_dir().join(format!("lnet-shm-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let secs: f64 = std::env::var("SHM_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1.0);
    let dir = tmpdir();
    println!("shm between two processes ({secs} s per figure; ratios are ours / bound)");

    let only_lat = std::env::var("SHM_BENCH_ONLY").is_ok_and(|v| v == "latency");
    // --- pool path and CMA, against memcpy and raw CMA.
    if !only_lat {
        // The peer's progress thread, which makes our copies, is pinned to
        // CPU 1 and each bound runs on a thread pinned there too: cores of
        // a shared host differ in memory bandwidth (one vCPU's 1 MiB memcpy
        // gets 26 GB/s while the other's gets 35), so figure and bound
        // are taken on the same core.
        let mut srv = Srv::start(&dir, &["--cpu", "1"]);
        let (l, shm) = client(&dir, |c| c.cpu = Some(0));
        let pool = shm.pool().unwrap();
        let mut chunk = pool.alloc(MIB).unwrap();
        chunk.fill(5);
        let in_pool = chunk.freeze();
        let plain = Bytes::from(vec![5u8; MIB]);
        put_bw(&l, srv.id, ECHO, &plain, 4, 0.2); // connect and warm up
        let addr: usize = srv.ask("ADDR")[5..].trim().parse().unwrap();
        // Rounds interleaved; each figure is the median of its rounds and
        // each ratio the median of the rounds' ratios.
        let (mut pooled, mut mem, mut cma, mut raw) = (vec![], vec![], vec![], vec![]);
        let (mut pool_r, mut cma_r) = (vec![], vec![]);
        let nrounds = std::env::var("SHM_BENCH_ROUNDS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(15usize)
            .max(1);
        // Short rounds: this host's memory bandwidth moves between phases
        // (memcpy of 1 MiB 26 or 35 GB/s) lasting seconds; a figure and
        // its bound taken tens of ms apart share a phase.
        let per = secs / nrounds as f64;
        for _ in 0..nrounds {
            let p = put_bw(&l, srv.id, ECHO, &in_pool, 4, per);
            let m = on_cpu(1, || compare::memcpy_mib_s(MIB, per)) * MIB as f64;
            let c = put_bw(&l, srv.id, ECHO, &plain, 4, per);
            let r = on_cpu(1, || cma_raw_bw(srv.pid, addr, per));
            pool_r.push(p / m);
            cma_r.push(c / r);
            pooled.push(p);
            mem.push(m);
            cma.push(c);
            raw.push(r);
        }
        let rounds = |v: &[f64]| {
            v.iter()
                .map(|x| format!("{x:.2}"))
                .collect::<Vec<_>>()
                .join(" ")
        };
        let (mem_m, raw_m) = (median(&mut mem), median(&mut raw));
        println!(
            "1 MiB PUT, source in our pool (peer memcpy through its mapping): {:6.2} GB/s   memcpy 1 MiB {:6.2} GB/s   ratio {:.2} (median of {nrounds} interleaved: {}; goal >= 0.9)",
            gbs(median(&mut pooled)),
            gbs(mem_m),
            median(&mut pool_r.clone()),
            rounds(&pool_r)
        );
        println!(
            "1 MiB PUT, ordinary buffers (process_vm_readv by the peer):     {:6.2} GB/s   raw process_vm_readv {:6.2} GB/s   ratio {:.2} (median of {nrounds} interleaved: {}; goal >= 0.9)",
            gbs(median(&mut cma)),
            gbs(raw_m),
            median(&mut cma_r.clone()),
            rounds(&cma_r)
        );
        println!(
            "  (raw process_vm_readv / memcpy on this machine: {:.2})",
            raw_m / mem_m
        );

        // --- loans against the one-copy pool path, same sizes.
        let mut chunk = pool.alloc(MIB).unwrap();
        chunk.fill(6);
        let frozen = chunk.freeze();
        for size in [4096usize, 65536, MIB] {
            let src = frozen.slice(..size);
            let before = shm.stats().tx_rdv;
            let loan = put_bw(&l, srv.id, LOAN, &src, 16, secs / 2.0);
            let copy = put_bw(&l, srv.id, ECHO, &src, 16, secs / 2.0);
            assert!(shm.stats().tx_rdv > before, "sent by descriptor");
            println!(
                "loaned PUT {:>7} B: {:9.0} ops/s {:8.2} GB/s   one-copy pool path {:9.0} ops/s {:8.2} GB/s   ratio {:.1}{}",
                size,
                loan / size as f64,
                gbs(loan),
                copy / size as f64,
                gbs(copy),
                loan / copy,
                if size == MIB {
                    " (goal >= 10 at 1 MiB, flat in size)"
                } else {
                    ""
                }
            );
        }
        let st = srv.ask("STATS");
        assert!(st.contains("bulk_loan"), "{st}");
        l.shutdown();
    }

    // --- bounce path.
    if !only_lat {
        let srv = Srv::start(&dir, &["--no-cma", "--no-pool"]);
        let (l, _shm) = client(&dir, |c| {
            c.use_cma = false;
            c.use_pool = false;
        });
        let plain = Bytes::from(vec![5u8; MIB]);
        put_bw(&l, srv.id, ECHO, &plain, 4, 0.2);
        let b = put_bw(&l, srv.id, ECHO, &plain, 4, secs);
        let m = compare::memcpy_mib_s(MIB, secs) * MIB as f64;
        println!(
            "1 MiB PUT, bounce buffers (no CMA, no pool):                    {:6.2} GB/s   (memcpy {:.2} GB/s; ratio {:.2}; no goal)",
            gbs(b),
            gbs(m),
            b / m
        );
        l.shutdown();
    }

    // --- latency, busy-poll: ours and UCX's taken in turn, round by round
    // (this host's latency drifts by tens of percent within seconds, so
    // figures taken minutes apart do not compare); each figure is the
    // median of its rounds and the ratio the median of the rounds' ratios.
    {
        let nrounds = std::env::var("SHM_BENCH_LAT_ROUNDS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(15usize)
            .max(1);
        let (mut ours, mut reused, mut ucx, mut floors) = (vec![], vec![], vec![], vec![]);
        let (mut ratios, mut reused_ratios) = (vec![], vec![]);
        // Per round: our ring alone before ours, between ours and UCX's,
        // and after UCX's (the host's state as each side saw it), with
        // the round's ratios.
        let mut states: Vec<Round> = vec![];
        let mut tags = vec![];
        let mut ucx_err = None;
        let mut log = vec![];
        // The ring's floor: the host's cache-line transfer time moves (0.03
        // to 0.3 us seen) from second to second, for our ring and UCX's
        // alike.
        let ring_alone = || lnd_loopback::shm::ring_floor_one_way_us(50_000, Some((0, 1)));
        for _ in 0..nrounds {
            let f0 = ring_alone();
            // Both our busy-polling progress threads stop before UCX runs
            // (they would take its CPUs). Pinned as UCX is below: server
            // on CPU 0, client on CPU 1.
            let srv = Srv::start(&dir, &["--busy-poll", "--cpu", "0"]);
            let (l, _shm) = client(&dir, |c| {
                c.busy_poll = true;
                c.cpu = Some(1);
            });
            let o = put_lat(&l, srv.id, LAT_ITERS, false);
            let r = put_lat(&l, srv.id, LAT_ITERS, true);
            drop(srv);
            l.shutdown();
            ours.push(o);
            reused.push(r);
            let f1 = ring_alone();
            floors.push(f1);
            match compare::ucx_perftest_lat_us(
                "ucp_am_lat",
                &[],
                &[("UCX_TLS", "posix")],
                LAT_ITERS as u64,
                Some((0, 1)),
            ) {
                Ok(u) => {
                    // UCX's tag matching (context, no goal): a matched
                    // send, as every LNet PUT is matched on an ME list.
                    let t = compare::ucx_perftest_lat_us(
                        "tag_lat",
                        &[],
                        &[("UCX_TLS", "posix")],
                        LAT_ITERS as u64,
                        Some((0, 1)),
                    )
                    .ok();
                    let f2 = ring_alone();
                    let ts = t.map_or("-".into(), |t| format!("{t:.3}"));
                    log.push(format!("{o:.3}/{r:.3}/{u:.3}/{ts}/{f0:.3}-{f1:.3}-{f2:.3}"));
                    ucx.push(u);
                    tags.extend(t);
                    ratios.push(o / u);
                    reused_ratios.push(r / u);
                    states.push(Round {
                        floors: [f0, f1, f2],
                        per_put: o / u,
                        reused: r / u,
                        tag: t.map(|t| r / t),
                    });
                }
                Err(e) => {
                    ucx_err = Some(e);
                    break;
                }
            }
        }
        let ours_m = median(&mut ours);
        let reused_m = median(&mut reused);
        let floor = median(&mut floors);
        let list = |v: &[f64]| {
            v.iter()
                .map(|r| format!("{r:.2}"))
                .collect::<Vec<_>>()
                .join(" ")
        };
        match ucx_err {
            None => {
                let ucx_m = median(&mut ucx);
                println!(
                    "8 B one-way latency, busy poll, an MD bound per PUT: {ours_m:6.3} us   ucx_perftest ucp_am_lat UCX_TLS=posix {ucx_m:6.3} us   ratio {:.2} (goal <= 1.0; rounds {})",
                    median(&mut ratios.clone()),
                    list(&ratios)
                );
                println!(
                    "8 B one-way latency, busy poll, one MD reused:       {reused_m:6.3} us   ucx_perftest ucp_am_lat UCX_TLS=posix {ucx_m:6.3} us   ratio {:.2} (goal <= 1.0; rounds {})",
                    median(&mut reused_ratios.clone()),
                    list(&reused_ratios)
                );
                if !tags.is_empty() {
                    let mut tr: Vec<f64> = states.iter().filter_map(|s| s.tag).collect();
                    println!(
                        "8 B one-way latency, busy poll, one MD reused:       {reused_m:6.3} us   ucx_perftest tag_lat UCX_TLS=posix    {:6.3} us   ratio {:.2} (context, no goal: UCX's matched send)",
                        median(&mut tags),
                        median(&mut tr)
                    );
                }
                println!(
                    "   rounds, us (MD per PUT / one MD / UCX am_lat / UCX tag_lat / our ring alone before-between-after): {}",
                    log.join("  ")
                );
                println!("   {}", by_state(&states));
            }
            Some(e) => {
                println!(
                    "8 B one-way latency, busy poll: {ours_m:6.3} us (one MD reused: {reused_m:6.3} us)   ucx_perftest: {e}"
                )
            }
        }
        let uct = compare::ucx_perftest_lat_us(
            "am_lat",
            &["-x", "posix", "-d", "memory"],
            &[],
            200_000,
            Some((0, 1)),
        );
        println!(
            "   bounds: our ring alone (two threads pinned as ours, no LNet work; median of the rounds) {floor:.3} us{}",
            uct.map(|t| format!("; UCT am_lat posix {t:.3} us"))
                .unwrap_or_default()
        );
    }

    // --- latency, default (adaptive spin, then sleep).
    {
        let srv = Srv::start(&dir, &[]);
        let (l, shm) = client(&dir, |_| {});
        let ours = put_lat(&l, srv.id, 50_000, false);
        let sleeps = shm.stats().sleeps;
        drop(srv);
        l.shutdown();
        let lo = std::net::IpAddr::from([127, 0, 0, 1]);
        let tcp = compare::tcp_pingpong_rtt_us(lo, lo, 20_000).expect("TCP ping-pong") / 2.0;
        println!(
            "8 B one-way latency, default mode: {ours:6.3} us   blocking TCP ping-pong {tcp:6.3} us   ratio {:.2} (goal < 1; our progress thread slept {sleeps} times)",
            ours / tcp
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
