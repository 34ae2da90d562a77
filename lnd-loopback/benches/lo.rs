#![allow(missing_docs)]
//! `lo` PUT of 1 MiB beside a plain 1 MiB `memcpy`, in the same run, and
//! the core's cost per small message (`lo_8B`: bind an 8-byte MD, PUT it,
//! match, deliver, both MDs' events, unlink: everything a message costs
//! but a transport's own work, since `lo` delivers in the calling thread).
//!
//! Criterion measures both (as bytes/s); then an interleaved pass measures
//! them alternately and prints our throughput, memcpy's, and the ratio
//! (goal: at least 0.9).

use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput};
use lnet::{
    AckReq, EventHandler, InsPos, Lnet, Md, MdHandle, MdOptions, ProcessId, Threshold, Unlink,
};

const SIZE: usize = 1 << 20;

struct Setup {
    lnet: Lnet,
    src: MdHandle,
    events: Arc<AtomicU64>,
}

fn setup() -> Setup {
    let lnet = lnd_loopback::builder().build().unwrap();
    let events = Arc::new(AtomicU64::new(0));
    let e = events.clone();
    let h = EventHandler::callback(move |_| {
        e.fetch_add(1, Ordering::Relaxed);
    });
    let e = events.clone();
    lnet.attach(
        5,
        ProcessId::ANY,
        1,
        0,
        Unlink::Retain,
        InsPos::Tail,
        Md::new(vec![0u8; 8])
            .options(MdOptions::OP_PUT | MdOptions::TRUNCATE)
            .threshold(Threshold::Infinite)
            .handler(EventHandler::callback(move |_| {
                e.fetch_add(1, Ordering::Relaxed);
            })),
    )
    .unwrap();
    lnet.attach(
        4,
        ProcessId::ANY,
        1,
        0,
        Unlink::Retain,
        InsPos::Tail,
        Md::new(vec![0u8; SIZE])
            .options(MdOptions::OP_PUT | MdOptions::MANAGE_REMOTE)
            .threshold(Threshold::Infinite)
            .handler(h.clone()),
    )
    .unwrap();
    let src = lnet
        .md_bind(
            Md::new(vec![7u8; SIZE])
                .threshold(Threshold::Infinite)
                .handler(h),
        )
        .unwrap();
    Setup { lnet, src, events }
}

/// One 8-byte message through the core: a fresh bound MD (no handler, as a
/// server's reply buffer), PUT without ACK onto portal 5's MD, whose
/// callback counts the PUT event.
fn small_put(s: &Setup) {
    let md = s.lnet.md_bind(Md::new(vec![7u8; 8])).unwrap();
    s.lnet
        .put(md, AckReq::NoAck, s.lnet.id(), 5, 1, 0, 0)
        .unwrap();
}

fn lo_put(s: &Setup) {
    let before = s.events.load(Ordering::Relaxed);
    s.lnet
        .put(s.src, AckReq::NoAck, s.lnet.id(), 4, 1, 0, 0)
        .unwrap();
    // lo delivers in the calling thread: SEND and PUT have happened.
    debug_assert_eq!(s.events.load(Ordering::Relaxed), before + 2);
}

fn main() {
    let s = setup();
    let src = vec![7u8; SIZE];
    let mut dst = vec![0u8; SIZE];
    let mut c = Criterion::default().configure_from_args();
    {
        let mut g = c.benchmark_group("lo_1MiB");
        g.throughput(Throughput::Bytes(SIZE as u64));
        g.bench_function("lo_put", |b| b.iter(|| lo_put(&s)));
        g.bench_function("memcpy", |b| {
            b.iter(|| black_box(&mut dst).copy_from_slice(black_box(&src)))
        });
        g.finish();
    }
    {
        let mut g = c.benchmark_group("lo_8B");
        g.throughput(Throughput::Elements(1));
        g.bench_function("bind_put_deliver", |b| {
            b.iter(|| {
                let before = s.events.load(Ordering::Relaxed);
                small_put(&s);
                debug_assert_eq!(s.events.load(Ordering::Relaxed), before + 1);
            })
        });
        g.finish();
    }
    c.final_summary();

    // Interleaved pass: alternate the two so both see the same machine.
    let rounds = 400;
    let (mut ours, mut base) = (Vec::with_capacity(rounds), Vec::with_capacity(rounds));
    for _ in 0..rounds {
        let t = Instant::now();
        lo_put(&s);
        ours.push(t.elapsed());
        let t = Instant::now();
        black_box(&mut dst).copy_from_slice(black_box(&src));
        base.push(t.elapsed());
    }
    let med = |v: &mut Vec<Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    let (o, b) = (med(&mut ours), med(&mut base));
    let gbs = |d: Duration| SIZE as f64 / d.as_secs_f64() / 1e9;
    println!(
        "lo PUT 1 MiB: {:.2} GB/s | memcpy 1 MiB: {:.2} GB/s | ratio {:.3} (goal >= 0.9; medians of {rounds} interleaved rounds)",
        gbs(o),
        gbs(b),
        gbs(o) / gbs(b)
    );
}
