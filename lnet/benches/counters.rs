#![allow(missing_docs)]
//! Message-path counters written by two threads at once: one block shared
//! by both (every increment pulls the line from the other core) against
//! [`Sharded`] blocks (each thread writes its own). Per increment; the
//! ratio shared/sharded is what to read on a shared machine.
//!
//! `cargo bench -p lnet --bench counters`

use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use lnet::counters::Sharded;

lnet::lnd_stats! {
    /// Counters as an LND's message path writes them.
    Stats, StatsSnapshot;
    /// Messages.
    msgs,
    /// Bytes.
    bytes,
}

/// Two threads each counting `iters` messages into the block `pick`
/// chooses for them: the wall time.
fn two_threads(iters: u64, pick: &(dyn Fn() -> &'static Stats + Sync)) -> Duration {
    let t = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| {
                for _ in 0..iters {
                    let c = pick();
                    c.msgs.fetch_add(1, Relaxed);
                    c.bytes.fetch_add(8, Relaxed);
                }
            });
        }
    });
    t.elapsed()
}

fn counters(c: &mut Criterion) {
    let shared: &'static Stats = Box::leak(Box::default());
    let sharded: &'static Sharded<Stats> = Box::leak(Box::default());
    let mut g = c.benchmark_group("counters_2_threads");
    g.bench_function("one_shared_block", |b| {
        b.iter_custom(|n| two_threads(n, &|| shared))
    });
    g.bench_function("sharded", |b| {
        b.iter_custom(|n| two_threads(n, &|| sharded.local()))
    });
    g.finish();
    let s = sharded.snapshot();
    assert_eq!(s.bytes, 8 * s.msgs, "every count summed");
}

criterion_group!(benches, counters);
criterion_main!(benches);
