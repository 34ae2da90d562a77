//! MDs of one portal container, addressed by cookies that index a slab:
//! a lookup is a bounds check, an array access and a compare (no hash),
//! and the cookie carries a sequence number, so a stale or forged cookie
//! (an old handle, an ACK's wire handle) finds nothing rather than
//! another MD.
//!
//! Cookie layout, low bits first: the container ([`CONTAINER_BITS`]),
//! the slot index ([`INDEX_BITS`]), then the sequence number's low bits.

use slab::Slab;

use crate::node::CONTAINER_BITS;

/// Bits of a cookie that hold the slot index: up to 16 M MDs per
/// container at once.
pub(crate) const INDEX_BITS: u32 = 24;
const INDEX_MASK: u64 = (1 << INDEX_BITS) - 1;

pub(crate) struct MdTable<T> {
    slab: Slab<(u64, T)>,
}

impl<T> Default for MdTable<T> {
    fn default() -> Self {
        MdTable { slab: Slab::new() }
    }
}

impl<T> MdTable<T> {
    fn index(&self, cookie: u64) -> usize {
        ((cookie >> CONTAINER_BITS) & INDEX_MASK) as usize
    }

    /// Store `v` under a new cookie made of `seq`, its slot and
    /// `container`. None when the container is full.
    pub(crate) fn insert(&mut self, seq: u64, container: usize, v: T) -> Option<u64> {
        let e = self.slab.vacant_entry();
        let idx = e.key() as u64;
        if idx > INDEX_MASK {
            return None;
        }
        let cookie =
            (seq << (CONTAINER_BITS + INDEX_BITS)) | (idx << CONTAINER_BITS) | container as u64;
        e.insert((cookie, v));
        Some(cookie)
    }

    pub(crate) fn get(&self, cookie: u64) -> Option<&T> {
        match self.slab.get(self.index(cookie)) {
            Some((c, v)) if *c == cookie => Some(v),
            _ => None,
        }
    }

    pub(crate) fn get_mut(&mut self, cookie: u64) -> Option<&mut T> {
        let i = self.index(cookie);
        match self.slab.get_mut(i) {
            Some((c, v)) if *c == cookie => Some(v),
            _ => None,
        }
    }

    pub(crate) fn contains(&self, cookie: u64) -> bool {
        self.get(cookie).is_some()
    }

    /// The entry under `cookie`, to read, change or remove.
    pub(crate) fn entry(&mut self, cookie: u64) -> Option<MdEntry<'_, T>> {
        let idx = self.index(cookie);
        self.contains(cookie).then_some(MdEntry {
            table: self,
            idx,
            cookie,
        })
    }

    /// Every (cookie, entry), in slot order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (u64, &T)> + '_ {
        self.slab.iter().map(|(_, (c, v))| (*c, v))
    }

    /// Every cookie, in slot order.
    pub(crate) fn cookies(&self) -> impl Iterator<Item = u64> + '_ {
        self.slab.iter().map(|(_, (c, _))| *c)
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.slab.len()
    }
}

/// An entry of an [`MdTable`] that is known to exist.
pub(crate) struct MdEntry<'a, T> {
    table: &'a mut MdTable<T>,
    idx: usize,
    cookie: u64,
}

impl<T> MdEntry<'_, T> {
    pub(crate) fn key(&self) -> u64 {
        self.cookie
    }
    pub(crate) fn get(&self) -> &T {
        &self.table.slab[self.idx].1
    }
    pub(crate) fn get_mut(&mut self) -> &mut T {
        &mut self.table.slab[self.idx].1
    }
    pub(crate) fn remove(self) -> T {
        self.table.slab.remove(self.idx).1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookies_find_their_own_entry_and_nothing_else() {
        let mut t = MdTable::default();
        assert_eq!(CONTAINER_BITS, 7);
        let a = t.insert(1, 3, "a").unwrap();
        let b = t.insert(2, 3, "b").unwrap();
        assert_eq!(a & 0x7f, 3, "container in the low bits");
        assert_eq!((t.get(a), t.get(b)), (Some(&"a"), Some(&"b")));
        assert_eq!(t.entry(a).map(MdEntry::remove), Some("a"));
        assert_eq!(t.get(a), None, "removed");
        assert!(t.entry(a).is_none(), "removed once");
        // The slot is reused under a new sequence number: the old cookie
        // does not reach the new entry.
        let c = t.insert(3, 3, "c").unwrap();
        assert_eq!(t.index(c), t.index(a));
        assert_ne!(c, a);
        assert_eq!(t.get(a), None);
        assert_eq!(t.get(c), Some(&"c"));
        // Forged cookies: out of range, all ones, wrong sequence.
        assert_eq!(t.get(u64::MAX), None);
        assert_eq!(t.get(c ^ (1 << 40)), None);
        assert_eq!(t.get_mut(c + (5 << 7)), None);
        assert_eq!(t.cookies().collect::<Vec<_>>(), vec![c, b]);
        assert!(t.entry(a).is_none());
        let mut e = t.entry(b).unwrap();
        assert_eq!((e.key(), *e.get()), (b, "b"));
        *e.get_mut() = "B";
        assert_eq!(
            t.iter().map(|(_, v)| *v).collect::<Vec<_>>(),
            vec!["c", "B"]
        );
        assert_eq!(t.entry(b).unwrap().remove(), "B");
        assert_eq!(t.get(b), None);
        t.insert(4, 3, "d").unwrap();
        assert_eq!(t.len(), 2);
    }
}
