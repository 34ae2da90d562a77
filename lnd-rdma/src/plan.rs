//! Pure planning of RDMA transfers: how a source's registered fragments are
//! written into a sink's RDMA descriptor, in work requests of at most
//! `max_sge` scatter-gather entries, each within one sink fragment.

use crate::wire::RdmaDesc;

/// A local scatter-gather entry: (address, length, lkey).
pub type Sge = (u64, u32, u32);

/// One RDMA WRITE: local SGEs and the remote (address, rkey).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WriteWr {
    /// Local pieces, in order.
    pub sges: Vec<Sge>,
    /// Remote address.
    pub remote_addr: u64,
    /// Remote key.
    pub rkey: u32,
}

/// Plan the writes that move `min(source, sink)` bytes from `src` into
/// `dst`. Returns the work requests and the bytes they move.
///
/// ```
/// use lnd_rdma::plan::plan_writes;
/// use lnd_rdma::wire::{RdmaDesc, RdmaFrag};
/// let dst = RdmaDesc { key: 9, frags: vec![RdmaFrag { nob: 100, addr: 0x1000 }] };
/// let (wrs, n) = plan_writes(&[(0x5000, 60, 1), (0x6000, 60, 2)], &dst, 30);
/// assert_eq!(n, 100);
/// assert_eq!(wrs.len(), 1);
/// assert_eq!(wrs[0].sges, vec![(0x5000, 60, 1), (0x6000, 40, 2)]);
/// ```
pub fn plan_writes(src: &[Sge], dst: &RdmaDesc, max_sge: usize) -> (Vec<WriteWr>, u64) {
    let max_sge = max_sge.max(1);
    let mut wrs = Vec::new();
    let mut total = 0u64;
    let (mut si, mut so) = (0usize, 0u32);
    for f in &dst.frags {
        let mut doff = 0u32;
        while doff < f.nob && si < src.len() {
            let mut sges = Vec::new();
            let start = doff;
            while doff < f.nob && si < src.len() && sges.len() < max_sge {
                let (a, l, k) = src[si];
                let n = (l - so).min(f.nob - doff);
                if n > 0 {
                    sges.push((a + u64::from(so), n, k));
                }
                so += n;
                doff += n;
                if so == l {
                    si += 1;
                    so = 0;
                }
            }
            if !sges.is_empty() {
                total += u64::from(doff - start);
                wrs.push(WriteWr {
                    sges,
                    remote_addr: f.addr + u64::from(start),
                    rkey: dst.key,
                });
            }
        }
        if si >= src.len() {
            break;
        }
    }
    (wrs, total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::RdmaFrag;
    use proptest::prelude::*;

    proptest! {
        /// Every byte lands once, in order, SGE limits hold, and no write
        /// crosses a sink fragment.
        #[test]
        fn writes_cover_min(src in proptest::collection::vec(0u32..5000, 1..20),
                            dst in proptest::collection::vec(1u32..9000, 1..10),
                            max_sge in 1usize..6) {
            let mut a = 0x10_0000u64;
            let srcs: Vec<Sge> = src.iter().map(|&l| { let s = (a, l, 7); a += 0x10000; s }).collect();
            let mut d = 0x90_0000u64;
            let rd = RdmaDesc { key: 3, frags: dst.iter().map(|&n| { let f = RdmaFrag { nob: n, addr: d }; d += 0x10000; f }).collect() };
            let (wrs, n) = plan_writes(&srcs, &rd, max_sge);
            let want = u64::from(src.iter().sum::<u32>()).min(rd.len());
            prop_assert_eq!(n, want);
            // Flatten both sides byte-address streams and compare.
            let mut local = vec![];
            let mut remote = vec![];
            for w in &wrs {
                prop_assert!(w.sges.len() <= max_sge && !w.sges.is_empty());
                let len: u64 = w.sges.iter().map(|s| u64::from(s.1)).sum();
                let frag = rd.frags.iter().find(|f| w.remote_addr >= f.addr && w.remote_addr < f.addr + u64::from(f.nob)).unwrap();
                prop_assert!(w.remote_addr + len <= frag.addr + u64::from(frag.nob));
                for s in &w.sges { local.push((s.0, s.1)); }
                remote.push((w.remote_addr, len));
            }
            let mut expect_local = vec![];
            let mut left = want;
            for s in &srcs { if left == 0 { break; } let n = u64::from(s.1).min(left); if n > 0 { expect_local.push(s.0); } left -= n; }
            let mut merged: Vec<u64> = local.iter().map(|x| x.0).collect();
            merged.dedup_by(|b, a| { // contiguous pieces of one source fragment
                (*b & !0xffff) == (*a & !0xffff) });
            prop_assert_eq!(merged, expect_local);
        }
    }
}
