//! A map split into locked shards, for tables that every message looks up
//! (LNDs' peers): a lookup locks one shard of sixteen, never a lock that
//! every thread takes (DESIGN.md principle 6), and the shards sit on cache
//! lines of their own.

use std::collections::HashMap;
use std::hash::{BuildHasher, BuildHasherDefault, Hash, Hasher};
use std::sync::{Mutex, MutexGuard};

use crate::counters::CachePadded;

/// Shards per map (a power of two).
pub const SHARDS: usize = 16;

/// A key with its hash, computed once per lookup: the hash picks the
/// shard and indexes the shard's table.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Keyed<K> {
    h: u64,
    key: K,
}

impl<K> Hash for Keyed<K> {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.h);
    }
}

/// Passes [`Keyed`]'s precomputed hash through.
#[derive(Default)]
struct PreHashed(u64);

impl Hasher for PreHashed {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }
}

type Table<K, V> = HashMap<Keyed<K>, V, BuildHasherDefault<PreHashed>>;
type Shard<K, V> = CachePadded<Mutex<Table<K, V>>>;

/// A hash map in [`SHARDS`] locked shards. Keys are hashed with a seed
/// chosen per map (foldhash): fast, and a peer cannot choose keys that
/// collide.
///
/// ```
/// use lnet::shard::ShardedMap;
/// let m: ShardedMap<u32, &str> = ShardedMap::default();
/// m.lock(7).insert("seven");
/// assert_eq!(m.lock(7).get(), Some(&"seven"));
/// *m.lock(8).get_or_insert_with(|| "eight") = "huit";
/// assert_eq!(m.lock(8).remove(), Some("huit"));
/// let mut all = m.drain();
/// all.sort();
/// assert_eq!(all, vec![(7, "seven")]);
/// ```
pub struct ShardedMap<K, V> {
    shards: Box<[Shard<K, V>; SHARDS]>,
    hasher: foldhash::fast::RandomState,
}

impl<K, V> Default for ShardedMap<K, V> {
    fn default() -> Self {
        ShardedMap {
            shards: Box::new(std::array::from_fn(|_| {
                CachePadded(Mutex::new(HashMap::default()))
            })),
            hasher: foldhash::fast::RandomState::default(),
        }
    }
}

impl<K, V> std::fmt::Debug for ShardedMap<K, V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardedMap").finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl<K: Hash + Eq + Copy, V> ShardedMap<K, V> {
    /// Lock `key`'s shard: the guard reads and changes `key`'s entry.
    #[inline]
    pub fn lock(&self, key: K) -> KeyGuard<'_, K, V> {
        let h = self.hasher.hash_one(key);
        // Middle bits: the shard's table takes the low ones (bucket) and
        // the top ones (tag).
        let shard = &self.shards[(h >> 32) as usize & (SHARDS - 1)];
        KeyGuard {
            table: lock(shard),
            key: Keyed { h, key },
        }
    }

    /// A copy of every value (no shard stays locked).
    pub fn values(&self) -> Vec<V>
    where
        V: Clone,
    {
        self.shards
            .iter()
            .flat_map(|s| lock(s).values().cloned().collect::<Vec<_>>())
            .collect()
    }

    /// Visit every entry, one shard locked at a time.
    pub fn for_each_mut(&self, mut f: impl FnMut(&K, &mut V)) {
        for s in self.shards.iter() {
            for (k, v) in lock(s).iter_mut() {
                f(&k.key, v);
            }
        }
    }

    /// Take every entry out.
    pub fn drain(&self) -> Vec<(K, V)> {
        self.shards
            .iter()
            .flat_map(|s| lock(s).drain().map(|(k, v)| (k.key, v)).collect::<Vec<_>>())
            .collect()
    }
}

/// One key's entry, with its shard locked.
pub struct KeyGuard<'a, K, V> {
    table: MutexGuard<'a, Table<K, V>>,
    key: Keyed<K>,
}

impl<K: Hash + Eq + Copy, V> KeyGuard<'_, K, V> {
    /// The value, if any.
    #[inline]
    pub fn get(&self) -> Option<&V> {
        self.table.get(&self.key)
    }
    /// The value, to change.
    #[inline]
    pub fn get_mut(&mut self) -> Option<&mut V> {
        self.table.get_mut(&self.key)
    }
    /// The value, made by `new` when there is none.
    #[inline]
    pub fn get_or_insert_with(&mut self, new: impl FnOnce() -> V) -> &mut V {
        self.table.entry(self.key).or_insert_with(new)
    }
    /// Set the value; returns the previous one.
    pub fn insert(&mut self, v: V) -> Option<V> {
        self.table.insert(self.key, v)
    }
    /// Take the value out.
    pub fn remove(&mut self) -> Option<V> {
        self.table.remove(&self.key)
    }
}

#[cfg(test)]
mod tests {
    use super::ShardedMap;

    #[test]
    fn behaves_as_a_map_across_shards_and_threads() {
        let m: ShardedMap<u64, u64> = ShardedMap::default();
        std::thread::scope(|s| {
            for t in 0..4u64 {
                let m = &m;
                s.spawn(move || {
                    for i in 0..1000u64 {
                        *m.lock(i).get_or_insert_with(|| 0) += t + 1;
                    }
                });
            }
        });
        for i in 0..1000u64 {
            assert_eq!(m.lock(i).get(), Some(&10), "key {i}");
        }
        assert_eq!(m.lock(5).remove(), Some(10));
        assert_eq!(m.lock(5).get(), None);
        assert_eq!(m.lock(6).insert(1), Some(10));
        assert_eq!(m.values().len(), 999);
        let mut sum = 0;
        m.for_each_mut(|_, v| {
            sum += *v;
            *v += 1;
        });
        assert_eq!(sum, 998 * 10 + 1);
        assert_eq!(m.lock(7).get(), Some(&11));
        let mut keys: Vec<u64> = m.drain().into_iter().map(|(k, _)| k).collect();
        keys.sort_unstable();
        assert_eq!(keys.len(), 999);
        assert!(!keys.contains(&5) && keys.contains(&6));
        assert!(m.values().is_empty());
    }
}
