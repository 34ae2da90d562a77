//! Memory pools: MD memory carved from one region that an LND may have
//! registered in advance (a shared-memory segment its peers have mapped,
//! an RDMA memory region), so the data path registers nothing.
//!
//! A [`MemPool`] hands out [`PoolBuf`]s: owned, writable, page-aligned
//! chunks of its region. A `PoolBuf` goes into an MD as
//! [`Segment::Pool`](crate::Segment::Pool), or is frozen into a shared
//! [`Bytes`] ([`PoolBuf::freeze`]) that an LND may lend to a peer without a
//! copy. The chunk returns to the pool when the last owner or view drops.
//! An LND recognises pool memory by address ([`MemPool::locate`]).
//!
//! ```
//! use lnet::pool::MemPool;
//! let pool = MemPool::heap(1 << 20).unwrap();
//! let mut b = pool.alloc(10_000).unwrap();
//! b.fill(7);
//! assert_eq!(b.len(), 10_000);
//! let (off, _) = pool.locate(b.as_ptr() as usize, b.len()).unwrap();
//! assert_eq!(off % 4096, 0);
//! let frozen = b.freeze();
//! assert_eq!(frozen[9_999], 7);
//! drop(frozen);
//! assert_eq!(pool.stats().in_use, 0);
//! ```

use std::collections::BTreeMap;
use std::ptr::NonNull;
use std::sync::{Arc, Mutex};

use bytes::Bytes;

use crate::error::{Error, Result};

/// Allocation granule: chunks start on a page boundary.
pub const POOL_ALIGN: usize = 4096;

/// The memory behind a pool.
///
/// # Safety
/// `base()` must point to `len()` bytes that stay valid and writable, and
/// are not used by anything but the pool, for as long as the value lives.
pub unsafe trait PoolMemory: Send + Sync + 'static {
    /// Start of the region.
    fn base(&self) -> NonNull<u8>;
    /// Its length in bytes.
    fn len(&self) -> usize;
    /// True when the region is empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Ordinary heap memory (for tests and for pools no LND shares).
struct HeapMemory {
    ptr: NonNull<u8>,
    len: usize,
    layout: std::alloc::Layout,
}

// SAFETY: the heap block is owned by this value only and freed on drop;
// access goes through the pool, which hands out disjoint chunks.
unsafe impl Send for HeapMemory {}
// SAFETY: as above: shared references only expose the base address.
unsafe impl Sync for HeapMemory {}

// SAFETY: `ptr` points to `len` bytes allocated in `new` and freed in drop.
unsafe impl PoolMemory for HeapMemory {
    fn base(&self) -> NonNull<u8> {
        self.ptr
    }
    fn len(&self) -> usize {
        self.len
    }
}

impl Drop for HeapMemory {
    fn drop(&mut self) {
        // SAFETY: allocated in `MemPool::heap` with this very layout.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

struct PoolInner {
    mem: Box<dyn PoolMemory>,
    /// Free extents: offset -> length, coalesced.
    free: Mutex<FreeList>,
}

#[derive(Default)]
struct FreeList {
    extents: BTreeMap<usize, usize>,
    in_use: usize,
    allocs: u64,
    failures: u64,
}

/// A pool's figures.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Region size.
    pub size: usize,
    /// Bytes handed out (rounded to [`POOL_ALIGN`]).
    pub in_use: usize,
    /// Largest free extent.
    pub largest_free: usize,
    /// Successful allocations so far.
    pub allocs: u64,
    /// Allocations refused for want of space.
    pub failures: u64,
}

/// A pool of MD memory over one region. Cheap to clone.
#[derive(Clone)]
pub struct MemPool {
    inner: Arc<PoolInner>,
}

impl std::fmt::Debug for MemPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemPool")
            .field("stats", &self.stats())
            .finish()
    }
}

impl MemPool {
    /// A pool over `mem`.
    pub fn new(mem: Box<dyn PoolMemory>) -> MemPool {
        let len = mem.len() / POOL_ALIGN * POOL_ALIGN;
        let mut fl = FreeList::default();
        if len > 0 {
            fl.extents.insert(0, len);
        }
        MemPool {
            inner: Arc::new(PoolInner {
                mem,
                free: Mutex::new(fl),
            }),
        }
    }

    /// A pool of `size` bytes of heap memory.
    pub fn heap(size: usize) -> Result<MemPool> {
        let size = size.div_ceil(POOL_ALIGN).max(1) * POOL_ALIGN;
        let layout = std::alloc::Layout::from_size_align(size, POOL_ALIGN)
            .map_err(|_| Error::Invalid("pool size"))?;
        // SAFETY: the layout has a non-zero size.
        let p = unsafe { std::alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(p).ok_or(Error::Invalid("out of memory"))?;
        Ok(MemPool::new(Box::new(HeapMemory {
            ptr,
            len: size,
            layout,
        })))
    }

    /// Start address of the region.
    pub fn base(&self) -> usize {
        self.inner.mem.base().as_ptr() as usize
    }
    /// Size of the region.
    pub fn size(&self) -> usize {
        self.inner.mem.len()
    }

    /// A chunk of `len` bytes (at least one byte of capacity is reserved
    /// even for `len == 0`), or `None` when no free extent is large enough.
    pub fn alloc(&self, len: usize) -> Option<PoolBuf> {
        let want = len.max(1).div_ceil(POOL_ALIGN) * POOL_ALIGN;
        let mut fl = self.inner.free.lock().unwrap_or_else(|e| e.into_inner());
        let found = fl
            .extents
            .iter()
            .find(|(_, l)| **l >= want)
            .map(|(o, l)| (*o, *l));
        let Some((off, l)) = found else {
            fl.failures += 1;
            return None;
        };
        fl.extents.remove(&off);
        if l > want {
            fl.extents.insert(off + want, l - want);
        }
        fl.in_use += want;
        fl.allocs += 1;
        Some(PoolBuf {
            pool: self.inner.clone(),
            off,
            cap: want,
            len,
        })
    }

    /// When `[addr, addr+len)` lies inside the region: its offset from
    /// the start, and the region size.
    pub fn locate(&self, addr: usize, len: usize) -> Option<(usize, usize)> {
        let base = self.base();
        let size = self.size();
        let off = addr.checked_sub(base)?;
        (off.checked_add(len)? <= size).then_some((off, size))
    }

    /// The pool's figures.
    pub fn stats(&self) -> PoolStats {
        let fl = self.inner.free.lock().unwrap_or_else(|e| e.into_inner());
        PoolStats {
            size: self.size(),
            in_use: fl.in_use,
            largest_free: fl.extents.values().copied().max().unwrap_or(0),
            allocs: fl.allocs,
            failures: fl.failures,
        }
    }
}

impl PoolInner {
    fn release(&self, off: usize, cap: usize) {
        let mut fl = self.free.lock().unwrap_or_else(|e| e.into_inner());
        fl.in_use -= cap;
        let (mut off, mut len) = (off, cap);
        if let Some((&po, &pl)) = fl.extents.range(..off).next_back() {
            if po + pl == off {
                fl.extents.remove(&po);
                off = po;
                len += pl;
            }
        }
        if let Some(&nl) = fl.extents.get(&(off + len)) {
            fl.extents.remove(&(off + len));
            len += nl;
        }
        fl.extents.insert(off, len);
    }
}

/// An owned chunk of a [`MemPool`]: `len` writable bytes.
pub struct PoolBuf {
    pool: Arc<PoolInner>,
    off: usize,
    cap: usize,
    len: usize,
}

impl std::fmt::Debug for PoolBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PoolBuf")
            .field("off", &self.off)
            .field("len", &self.len)
            .finish()
    }
}

impl PoolBuf {
    /// Offset of the chunk in its pool's region.
    pub fn offset(&self) -> usize {
        self.off
    }
    /// Bytes reserved (a multiple of [`POOL_ALIGN`]).
    pub fn capacity(&self) -> usize {
        self.cap
    }
    /// Set the length (at most the capacity).
    pub fn set_len(&mut self, len: usize) -> Result<()> {
        if len > self.cap {
            return Err(Error::Invalid("PoolBuf length over capacity"));
        }
        self.len = len;
        Ok(())
    }
    /// Freeze into shared, read-only [`Bytes`] that still live in the
    /// pool: a source an LND can lend to its peers without copying. The
    /// chunk returns to the pool when the last view drops.
    pub fn freeze(self) -> Bytes {
        Bytes::from_owner(self)
    }
}

impl std::ops::Deref for PoolBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: [off, off+len) lies inside the region (alloc checked
        // it), the region outlives `self` (we hold the pool), and the free
        // list gave this range to no one else while we own it.
        unsafe { std::slice::from_raw_parts(self.pool.mem.base().as_ptr().add(self.off), self.len) }
    }
}

impl std::ops::DerefMut for PoolBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `deref`; `&mut self` makes this the only access.
        unsafe {
            std::slice::from_raw_parts_mut(self.pool.mem.base().as_ptr().add(self.off), self.len)
        }
    }
}

impl AsRef<[u8]> for PoolBuf {
    fn as_ref(&self) -> &[u8] {
        self
    }
}

impl Drop for PoolBuf {
    fn drop(&mut self) {
        self.pool.release(self.off, self.cap);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alloc_free_coalesce() {
        let p = MemPool::heap(64 * 4096).unwrap();
        let a = p.alloc(4096).unwrap();
        let b = p.alloc(5000).unwrap();
        let c = p.alloc(1).unwrap();
        assert_eq!((a.offset(), b.offset(), c.offset()), (0, 4096, 3 * 4096));
        assert_eq!(p.stats().in_use, 4 * 4096);
        drop(b);
        let d = p.alloc(8192).unwrap();
        assert_eq!(d.offset(), 4096);
        drop(a);
        drop(c);
        drop(d);
        let s = p.stats();
        assert_eq!((s.in_use, s.largest_free), (0, 64 * 4096));
        assert!(p.alloc(65 * 4096).is_none());
        assert_eq!(p.stats().failures, 1);
    }

    #[test]
    fn frozen_views_keep_chunk() {
        let p = MemPool::heap(4 * 4096).unwrap();
        let mut a = p.alloc(100).unwrap();
        a.copy_from_slice(&[9u8; 100]);
        let f = a.freeze();
        let g = f.slice(10..20);
        drop(f);
        assert_eq!(p.stats().in_use, 4096);
        assert_eq!(&g[..], &[9u8; 10]);
        drop(g);
        assert_eq!(p.stats().in_use, 0);
        assert!(p.locate(p.base() + 4096, 4096).is_some());
        assert!(p.locate(p.base() + 4096, 4 * 4096).is_none());
        assert!(p.locate(p.base().wrapping_sub(1), 1).is_none());
    }

    proptest::proptest! {
        #[test]
        fn random_alloc_free(ops in proptest::collection::vec((0usize..20_000, proptest::bool::ANY), 1..200)) {
            let p = MemPool::heap(256 * 4096).unwrap();
            let mut held: Vec<PoolBuf> = Vec::new();
            for (len, free) in ops {
                if free && !held.is_empty() {
                    held.swap_remove(len % held.len());
                } else if let Some(b) = p.alloc(len) {
                    // chunks never overlap
                    for h in &held {
                        proptest::prop_assert!(b.offset() + b.capacity() <= h.offset() || h.offset() + h.capacity() <= b.offset());
                    }
                    held.push(b);
                }
            }
            let used: usize = held.iter().map(|b| b.capacity()).sum();
            proptest::prop_assert_eq!(p.stats().in_use, used);
            held.clear();
            proptest::prop_assert_eq!(p.stats().largest_free, 256 * 4096);
        }
    }
}
