//! Bulk buffers and lst's data checks.
//!
//! A brw bulk of `len` bytes starting `off` bytes into its first page is
//! checked page by page, as the kernel's brw test does: with
//! [`Check::Simple`] the first and last 8-byte words of every page's piece
//! hold the magic, with [`Check::Full`] every word does. The side that
//! produces the data writes [`BRW_MAGIC`]; the side that receives fills its
//! buffer with [`BRW_POISON`] first, so data that never arrived is caught.
//! Words are written in the writer's byte order; a receiver talking to a
//! peer of the other order swaps the magic it expects.
//!
//! ```
//! use lnet_selftest::bulk::{check, fill, Check, BRW_MAGIC};
//! let mut b = vec![0u8; 3 * 4096];
//! fill(&mut b, 0, Check::Simple, BRW_MAGIC);
//! assert!(check(&b, 0, Check::Simple, BRW_MAGIC).is_ok());
//! b[4096] ^= 1; // the first word of the second page
//! assert_eq!(check(&b, 0, Check::Simple, BRW_MAGIC).unwrap_err().at, 4096);
//! ```

use lnet::pool::{MemPool, PoolBuf};
use lnet::{MdBuffer, Segment};

/// `BRW_MAGIC`.
pub const BRW_MAGIC: u64 = 0xeeb0_eeb1_eeb2_eeb3;
/// `BRW_POISON`.
pub const BRW_POISON: u64 = 0xbeef_beef_beef_beef;
/// The page size lst's checks work in.
pub const PAGE: usize = 4096;
/// Largest bulk (`LNET_MTU`).
pub const MAX_BULK: u32 = 1 << 20;

/// lst's data checks (`LST_BRW_CHECK_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Check {
    /// No check.
    None = 1,
    /// Magic at both ends of every page.
    Simple = 2,
    /// Magic in every word.
    Full = 3,
    /// No check, and the receiver may discard the data.
    Discard = 4,
}

impl Check {
    /// From the wire value.
    pub fn from_wire(v: u32) -> Option<Check> {
        Some(match v {
            1 => Check::None,
            2 => Check::Simple,
            3 => Check::Full,
            4 => Check::Discard,
            _ => return None,
        })
    }
    /// Parses lst's spelling (`none`, `simple`, `full`).
    pub fn parse(s: &str) -> Option<Check> {
        Some(match s {
            "none" => Check::None,
            "simple" => Check::Simple,
            "full" => Check::Full,
            "discard" => Check::Discard,
            _ => return None,
        })
    }
    /// True when data is written and checked.
    pub fn checks(self) -> bool {
        matches!(self, Check::Simple | Check::Full)
    }
}

/// A word that differed from what the check expects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mismatch {
    /// Byte position in the bulk.
    pub at: usize,
    /// What was there.
    pub found: u64,
    /// What should have been.
    pub expected: u64,
}

/// The pieces of a bulk, one per page: `(start, len)` in the buffer.
pub fn pages(len: usize, off: usize) -> impl Iterator<Item = (usize, usize)> {
    let first = (PAGE - off % PAGE).min(len);
    let mut pos = 0usize;
    std::iter::from_fn(move || {
        if pos >= len {
            return None;
        }
        let n = if pos == 0 { first } else { PAGE.min(len - pos) };
        let r = (pos, n);
        pos += n;
        Some(r)
    })
}

fn word_at(b: &[u8], at: usize) -> Option<u64> {
    b.get(at..at + 8)
        .map(|s| u64::from_ne_bytes(s.try_into().unwrap_or_default()))
}

/// Writes the check pattern of `magic` into `buf` (nothing for
/// [`Check::None`]/[`Check::Discard`]). Pieces whose length is not a
/// multiple of 8 get whole words only.
pub fn fill(buf: &mut [u8], off: usize, check: Check, magic: u64) {
    let w = magic.to_ne_bytes();
    match check {
        Check::None | Check::Discard => {}
        Check::Simple => {
            for (s, n) in pages(buf.len(), off) {
                if n >= 8 {
                    buf[s..s + 8].copy_from_slice(&w);
                    buf[s + n - 8..s + n].copy_from_slice(&w);
                }
            }
        }
        Check::Full => {
            for c in buf.chunks_exact_mut(8) {
                c.copy_from_slice(&w);
            }
        }
    }
}

/// Checks `buf` against the pattern [`fill`] writes.
pub fn check(buf: &[u8], off: usize, check: Check, magic: u64) -> Result<(), Mismatch> {
    let bad = |at: usize, found: u64| Mismatch {
        at,
        found,
        expected: magic,
    };
    match check {
        Check::None | Check::Discard => Ok(()),
        Check::Simple => {
            for (s, n) in pages(buf.len(), off) {
                if n < 8 {
                    continue;
                }
                for at in [s, s + n - 8] {
                    let v = word_at(buf, at).unwrap_or(0);
                    if v != magic {
                        return Err(bad(at, v));
                    }
                }
            }
            Ok(())
        }
        Check::Full => {
            for (i, c) in buf.chunks_exact(8).enumerate() {
                let v = u64::from_ne_bytes(c.try_into().unwrap_or_default());
                if v != magic {
                    return Err(bad(i * 8, v));
                }
            }
            Ok(())
        }
    }
}

/// One bulk buffer: heap memory, or a chunk of an LND's shared pool (so
/// the transport can move it with a single copy or lend it).
#[derive(Debug)]
pub enum Buf {
    /// Heap memory.
    Heap(Vec<u8>),
    /// Pool memory.
    Pool(PoolBuf),
}

impl Buf {
    /// A buffer of `len` bytes from `pool` when it has room, else the heap.
    pub fn alloc(pool: Option<&MemPool>, len: usize) -> Buf {
        if let Some(b) = pool.and_then(|p| p.alloc(len.max(1))) {
            let mut b = b;
            // Cannot fail: the capacity is at least len.
            let _ = b.set_len(len);
            return Buf::Pool(b);
        }
        Buf::Heap(vec![0u8; len])
    }
    /// Resizes to `len`; `false` when a pool buffer is too small (drop
    /// it and allocate another).
    pub fn resize(&mut self, len: usize) -> bool {
        match self {
            Buf::Heap(v) => {
                v.resize(len, 0);
                true
            }
            Buf::Pool(p) => p.set_len(len).is_ok(),
        }
    }
    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        match self {
            Buf::Heap(v) => v,
            Buf::Pool(p) => p,
        }
    }
    /// The bytes, writable.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        match self {
            Buf::Heap(v) => v,
            Buf::Pool(p) => p,
        }
    }
    /// True for pool memory.
    pub fn is_pool(&self) -> bool {
        matches!(self, Buf::Pool(_))
    }
    /// Into MD memory.
    pub fn into_md(self) -> MdBuffer {
        match self {
            Buf::Heap(v) => v.into(),
            Buf::Pool(p) => p.into(),
        }
    }
    /// Back from the MD memory a final event returned (`None` when it is
    /// not a single heap or pool segment).
    pub fn from_md(m: MdBuffer) -> Option<Buf> {
        let mut s = m.into_segments();
        if s.len() != 1 {
            return None;
        }
        match s.pop()? {
            Segment::Vec(v) => Some(Buf::Heap(v)),
            Segment::Pool(p) => Some(Buf::Pool(p)),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_follow_the_offset() {
        let v: Vec<_> = pages(10000, 100).collect();
        assert_eq!(v, vec![(0, 3996), (3996, 4096), (8092, 1908)]);
        let v: Vec<_> = pages(8, 0).collect();
        assert_eq!(v, vec![(0, 8)]);
        assert_eq!(pages(0, 0).count(), 0);
        let total: usize = pages(1 << 20, 4088).map(|p| p.1).sum();
        assert_eq!(total, 1 << 20);
    }

    #[test]
    fn simple_checks_page_edges_only() {
        let mut b = vec![0u8; 3 * PAGE];
        fill(&mut b, 0, Check::Simple, BRW_MAGIC);
        assert!(check(&b, 0, Check::Simple, BRW_MAGIC).is_ok());
        // The middle of a page is not looked at by simple...
        b[100] ^= 0xff;
        assert!(check(&b, 0, Check::Simple, BRW_MAGIC).is_ok());
        // ...but full sees it.
        assert!(check(&b, 0, Check::Full, BRW_MAGIC).is_err());
        // The last word of the second page.
        b[2 * PAGE - 1] ^= 1;
        let m = check(&b, 0, Check::Simple, BRW_MAGIC).unwrap_err();
        assert_eq!(m.at, 2 * PAGE - 8);
        assert_eq!(m.expected, BRW_MAGIC);
    }

    #[test]
    fn full_checks_every_word_and_poison_is_caught() {
        let mut b = vec![0u8; 64 * 1024];
        fill(&mut b, 0, Check::Full, BRW_POISON);
        let m = check(&b, 0, Check::Full, BRW_MAGIC).unwrap_err();
        assert_eq!((m.at, m.found), (0, BRW_POISON));
        fill(&mut b, 0, Check::Full, BRW_MAGIC);
        assert!(check(&b, 0, Check::Full, BRW_MAGIC).is_ok());
        assert!(check(&b, 0, Check::None, 0).is_ok());
    }

    #[test]
    fn buffers_round_trip_through_md() {
        let pool = MemPool::heap(1 << 20).unwrap();
        let b = Buf::alloc(Some(&pool), 5000);
        assert!(b.is_pool());
        let mut b = Buf::from_md(b.into_md()).unwrap();
        assert!(b.resize(100));
        assert_eq!(b.as_slice().len(), 100);
        let b = Buf::alloc(None, 10);
        assert!(!b.is_pool());
    }
}
