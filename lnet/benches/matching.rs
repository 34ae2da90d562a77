#![allow(missing_docs)]
//! Matching on a portal with 10,000 and 100,000 MEs.
//!
//! * unique: every ME has its own match bits and no ignore bits (LNet's
//!   unique portals); the message matches one in the middle. Cost should
//!   not depend on the number of MEs.
//! * wildcard: every ME has ignore bits; the message matches only the
//!   last one, so the whole list is walked (the worst case).

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use lnet::portals::matching::{Decision, InsPos, MatchCriteria, MatchTable};
use lnet::{Nid, ProcessId};

fn table(n: u64, wildcard: bool) -> MatchTable<u64> {
    let mut t = MatchTable::new();
    for i in 0..n {
        let crit = MatchCriteria {
            match_id: ProcessId::ANY,
            match_bits: if wildcard { i << 8 } else { i },
            ignore_bits: if wildcard { 0xff } else { 0 },
        };
        t.insert(i + 1, crit, InsPos::Tail, i);
    }
    t
}

fn bench(c: &mut Criterion) {
    let src = ProcessId::new(Nid::LO, 12345);
    let mut g = c.benchmark_group("match");
    for n in [10_000u64, 100_000] {
        let mut u = table(n, false);
        g.bench_with_input(BenchmarkId::new("unique", n), &n, |b, &n| {
            b.iter(|| black_box(u.find(&src, black_box(n / 2), |_, v| Decision::Stop(*v))))
        });
        let mut w = table(n, true);
        g.bench_with_input(BenchmarkId::new("wildcard_last", n), &n, |b, &n| {
            b.iter(|| {
                black_box(w.find(&src, black_box((n - 1) << 8 | 3), |_, v| Decision::Stop(*v)))
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
