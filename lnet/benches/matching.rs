#![allow(missing_docs)]
//! Matching on a portal with 10,000 and 100,000 MEs.
//!
//! * unique: every ME has its own match bits and no ignore bits (LNet's
//!   unique portals); the message matches one in the middle. Cost should
//!   not depend on the number of MEs.
//! * wildcard: every ME has ignore bits; the message matches only the
//!   last one, so the whole list is walked (the worst case).
//! * posted: N MEs share one set of match bits, as a server's posted
//!   request buffers do; each message matches the oldest, which is
//!   unlinked, and a fresh one is posted at the tail. Cost should not
//!   depend on N (16, 256 or 4,096 buffers).

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
    for n in [16u64, 256, 4096] {
        let mut t = MatchTable::new();
        let crit = MatchCriteria {
            match_id: ProcessId::ANY,
            match_bits: 7,
            ignore_bits: 0,
        };
        for i in 0..n {
            t.insert(i + 1, crit, InsPos::Tail, i);
        }
        let mut next = n + 1;
        g.bench_with_input(BenchmarkId::new("posted_consume_repost", n), &n, |b, _| {
            b.iter(|| {
                let (k, _) = t
                    .find(&src, 7, |_, v| Decision::Stop(*v))
                    .expect("a buffer");
                black_box(t.remove(k));
                t.insert(next, crit, InsPos::Tail, next);
                next += 1;
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
