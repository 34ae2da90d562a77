//! The match list of one portal, as a pure data structure.
//!
//! Portals semantics: match entries (MEs) form an ordered list; an incoming
//! PUT or GET walks it from the head and the first ME whose match id and
//! match bits accept the message, and whose MD accepts it, wins.
//!
//! Walking a list of 100,000 MEs per message is not an option, so the list
//! is kept in two indexes that together preserve its order:
//!
//! * MEs without ignore bits are hashed by their match bits; each hash
//!   bucket is sorted by position;
//! * MEs with ignore bits (wildcards) sit in an ordered map by position.
//!
//! Positions are integers: attaching at the head takes one below the
//! current minimum, at the tail one above the maximum. A lookup merges the
//! message's bucket with the wildcard list in position order, so a portal
//! of unique match bits costs one hash lookup however many MEs it holds
//! (LNet's "unique" portals), and wildcard MEs cost what they must.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::ops::Bound::{Excluded, Unbounded};

use slab::Slab;

use crate::nid::ProcessId;

/// Where a new ME goes in the list (`enum lnet_ins_pos`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InsPos {
    /// Before every existing ME.
    Head,
    /// After every existing ME.
    Tail,
}

/// The matching criteria of an ME.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MatchCriteria {
    /// Which initiators match (wildcards allowed).
    pub match_id: ProcessId,
    /// Bits to compare.
    pub match_bits: u64,
    /// Bits to ignore in the comparison.
    pub ignore_bits: u64,
}

impl MatchCriteria {
    /// True when a message from `src` with `bits` matches.
    pub fn accepts(&self, src: &ProcessId, bits: u64) -> bool {
        (self.match_bits ^ bits) & !self.ignore_bits == 0 && self.match_id.matches(src)
    }
}

/// What the caller decided about one candidate ME.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision<R> {
    /// Not this one: keep walking.
    Skip,
    /// Stop here with this result.
    Stop(R),
}

struct Entry<T> {
    key: u64,
    pos: i64,
    crit: MatchCriteria,
    value: T,
}

/// One portal's ordered match list, indexed. `T` is the caller's per-ME
/// state; keys are the caller's ME cookies.
pub struct MatchTable<T> {
    /// The MEs, in a slab: the indexes below name them by slot, so a walk
    /// reaches a candidate's state without hashing its key.
    entries: Slab<Entry<T>>,
    /// Slot of each ME by key (the by-key API: unlink, state).
    slots: HashMap<u64, usize, foldhash::fast::RandomState>,
    /// Buckets of exact MEs by match bits (position, slot), each in
    /// position order: a deque, so that the usual unlink (the oldest ME,
    /// at the front, as a server's posted request buffers are consumed)
    /// and the usual attach (at either end) cost no shifting however many
    /// MEs share the bits.
    exact: HashMap<u64, VecDeque<(i64, usize)>, foldhash::fast::RandomState>,
    /// Wildcard MEs by position (slot, criteria), the criteria inline so
    /// a walk touches only this map until something matches.
    wild: BTreeMap<i64, (usize, MatchCriteria)>,
    /// `wild`'s first entry, copied out: most wildcard lookups stop at it,
    /// without starting a walk of the map.
    wild_first: Option<(i64, usize, MatchCriteria)>,
    head: i64,
    tail: i64,
}

impl<T> Default for MatchTable<T> {
    fn default() -> Self {
        MatchTable {
            entries: Slab::new(),
            slots: HashMap::default(),
            exact: HashMap::default(),
            wild: BTreeMap::new(),
            wild_first: None,
            head: 0,
            tail: 0,
        }
    }
}

impl<T> MatchTable<T> {
    /// An empty list.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of MEs.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Insert an ME under `key` (which must be new).
    pub fn insert(&mut self, key: u64, crit: MatchCriteria, pos: InsPos, value: T) {
        let p = match pos {
            InsPos::Head => {
                self.head -= 1;
                self.head
            }
            InsPos::Tail => {
                self.tail += 1;
                self.tail
            }
        };
        if self.slots.contains_key(&key) {
            debug_assert!(false, "duplicate ME key");
            return;
        }
        let slot = self.entries.insert(Entry {
            key,
            pos: p,
            crit,
            value,
        });
        self.slots.insert(key, slot);
        if crit.ignore_bits == 0 {
            let b = self.exact.entry(crit.match_bits).or_default();
            let at = b.partition_point(|(q, _)| *q < p);
            b.insert(at, (p, slot));
        } else {
            self.wild.insert(p, (slot, crit));
            if self.wild_first.is_none_or(|(q, ..)| p < q) {
                self.wild_first = Some((p, slot, crit));
            }
        }
    }

    /// Remove the ME `key`, giving back its state.
    pub fn remove(&mut self, key: u64) -> Option<(MatchCriteria, T)> {
        let slot = self.slots.remove(&key)?;
        let e = self.entries.remove(slot);
        if e.crit.ignore_bits == 0 {
            if let Some(b) = self.exact.get_mut(&e.crit.match_bits) {
                // Sorted by position (unique): found by bisection.
                if let Ok(i) = b.binary_search_by_key(&e.pos, |(p, _)| *p) {
                    b.remove(i);
                }
                if b.is_empty() {
                    self.exact.remove(&e.crit.match_bits);
                }
            }
        } else {
            self.wild.remove(&e.pos);
            if self.wild_first.is_some_and(|(q, ..)| q == e.pos) {
                self.wild_first = self.wild.first_key_value().map(|(&q, &(s, c))| (q, s, c));
            }
        }
        Some((e.crit, e.value))
    }

    /// The state of ME `key`.
    pub fn get(&self, key: u64) -> Option<&T> {
        self.entry(key).map(|e| &e.value)
    }

    /// The state of ME `key`, mutably.
    pub fn get_mut(&mut self, key: u64) -> Option<&mut T> {
        let slot = *self.slots.get(&key)?;
        self.entries.get_mut(slot).map(|e| &mut e.value)
    }

    /// The criteria of ME `key`.
    pub fn criteria(&self, key: u64) -> Option<&MatchCriteria> {
        self.entry(key).map(|e| &e.crit)
    }

    fn entry(&self, key: u64) -> Option<&Entry<T>> {
        self.entries.get(*self.slots.get(&key)?)
    }

    /// Walk, in list order, the MEs that accept a message from `src` with
    /// `bits`, asking `decide` about each; return the first `Stop`.
    pub fn find<R>(
        &mut self,
        src: &ProcessId,
        bits: u64,
        mut decide: impl FnMut(u64, &mut T) -> Decision<R>,
    ) -> Option<(u64, R)> {
        // No hashing at all on a portal with only wildcard MEs.
        let bucket = if self.exact.is_empty() {
            None
        } else {
            self.exact.get(&bits).filter(|b| !b.is_empty())
        };
        let Some(bucket) = bucket else {
            return self.find_wild(src, bits, decide);
        };
        let mut bi = bucket.iter().peekable();
        let mut wi = self.wild.iter().peekable();
        loop {
            let take_bucket = match (bi.peek(), wi.peek()) {
                (None, None) => return None,
                (Some(_), None) => true,
                (None, Some(_)) => false,
                (Some((bp, _)), Some((wp, _))) => bp < *wp,
            };
            let slot = if take_bucket {
                bi.next().map(|(_, s)| *s)
            } else {
                match wi.next() {
                    Some((_, (s, c))) if c.accepts(src, bits) => Some(*s),
                    Some(_) => continue,
                    None => None,
                }
            };
            let slot = slot?;
            let Some(e) = self.entries.get_mut(slot) else {
                continue;
            };
            let key = e.key;
            // A wildcard ME was checked above on its inline criteria; an
            // exact one's bits are its bucket's: only its initiator is left.
            if take_bucket && !e.crit.match_id.matches(src) {
                continue;
            }
            if let Decision::Stop(r) = decide(key, &mut e.value) {
                return Some((key, r));
            }
        }
    }

    /// [`MatchTable::find`] when only wildcards can match (the usual case
    /// of a portal whose MEs all ignore some bits): no merge.
    fn find_wild<R>(
        &mut self,
        src: &ProcessId,
        bits: u64,
        mut decide: impl FnMut(u64, &mut T) -> Decision<R>,
    ) -> Option<(u64, R)> {
        let Self {
            entries,
            wild,
            wild_first,
            ..
        } = self;
        let (first, s, c) = (*wild_first)?;
        if c.accepts(src, bits)
            && let Some(e) = entries.get_mut(s)
            && let Decision::Stop(r) = decide(e.key, &mut e.value)
        {
            return Some((e.key, r));
        }
        for (s, c) in wild.range((Excluded(first), Unbounded)).map(|(_, v)| v) {
            if !c.accepts(src, bits) {
                continue;
            }
            if let Some(e) = entries.get_mut(*s)
                && let Decision::Stop(r) = decide(e.key, &mut e.value)
            {
                return Some((e.key, r));
            }
        }
        None
    }

    /// MEs in the two indexes: equal to [`MatchTable::len`] unless an
    /// index kept a removed ME.
    #[cfg(test)]
    fn indexed(&self) -> usize {
        self.exact.values().map(VecDeque::len).sum::<usize>() + self.wild.len()
    }

    /// Keys in list order (for diagnostics and tests; O(n log n)).
    pub fn keys_in_order(&self) -> Vec<u64> {
        let mut v: Vec<(i64, u64)> = self.entries.iter().map(|(_, e)| (e.pos, e.key)).collect();
        v.sort_unstable();
        v.into_iter().map(|(_, k)| k).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nid::{LNET_PID_ANY, Nid};
    use proptest::prelude::*;

    fn crit(bits: u64, ignore: u64, nid: Nid, pid: u32) -> MatchCriteria {
        MatchCriteria {
            match_id: ProcessId::new(nid, pid),
            match_bits: bits,
            ignore_bits: ignore,
        }
    }

    #[test]
    fn order_head_tail_and_wildcards() {
        let mut t = MatchTable::new();
        let any = ProcessId::ANY;
        t.insert(1, crit(5, 0, Nid::ANY, LNET_PID_ANY), InsPos::Tail, ());
        t.insert(2, crit(0, !0, Nid::ANY, LNET_PID_ANY), InsPos::Tail, ());
        t.insert(3, crit(5, 0, Nid::ANY, LNET_PID_ANY), InsPos::Head, ());
        assert_eq!(t.keys_in_order(), [3, 1, 2]);
        let src = ProcessId::new(Nid::LO, 1);
        assert_eq!(t.find(&src, 5, |_, _| Decision::Stop(())), Some((3, ())));
        assert_eq!(t.find(&src, 6, |_, _| Decision::Stop(())), Some((2, ())));
        // Skipping falls through in order.
        let mut seen = vec![];
        t.find::<()>(&src, 5, |k, _| {
            seen.push(k);
            Decision::Skip
        });
        assert_eq!(seen, [3, 1, 2]);
        t.remove(3);
        assert_eq!(t.find(&src, 5, |_, _| Decision::Stop(())), Some((1, ())));
        let _ = any;
    }

    #[test]
    fn ignore_bits_and_match_id() {
        let mut t = MatchTable::new();
        let a: Nid = "1.1.1.1@tcp".parse().unwrap();
        let b: Nid = "1.1.1.2@tcp".parse().unwrap();
        t.insert(1, crit(0xf0, 0x0f, a, LNET_PID_ANY), InsPos::Tail, ());
        t.insert(2, crit(0xf0, 0x0f, Nid::ANY, 7), InsPos::Tail, ());
        let go = |t: &mut MatchTable<()>, src: ProcessId, bits| {
            t.find(&src, bits, |_, _| Decision::Stop(())).map(|x| x.0)
        };
        assert_eq!(go(&mut t, ProcessId::new(a, 1), 0xf3), Some(1));
        assert_eq!(go(&mut t, ProcessId::new(b, 1), 0xf3), None);
        assert_eq!(go(&mut t, ProcessId::new(b, 7), 0xfe), Some(2));
        assert_eq!(go(&mut t, ProcessId::new(a, 1), 0xe3), None);
    }

    /// The reference model: a plain ordered Vec walked from the head.
    #[derive(Default)]
    struct Model(Vec<(u64, MatchCriteria)>);
    impl Model {
        fn insert(&mut self, k: u64, c: MatchCriteria, pos: InsPos) {
            match pos {
                InsPos::Head => self.0.insert(0, (k, c)),
                InsPos::Tail => self.0.push((k, c)),
            }
        }
        fn remove(&mut self, k: u64) {
            self.0.retain(|(q, _)| *q != k);
        }
        fn find(&self, src: &ProcessId, bits: u64, skip: &dyn Fn(u64) -> bool) -> Option<u64> {
            self.0
                .iter()
                .find(|(k, c)| c.accepts(src, bits) && !skip(*k))
                .map(|(k, _)| *k)
        }
    }

    #[derive(Debug, Clone)]
    enum Op {
        Insert {
            bits: u64,
            ignore: u64,
            nid: u8,
            pid: u8,
            head: bool,
        },
        Remove(usize),
        Find {
            bits: u64,
            nid: u8,
            pid: u8,
            skip_mod: u64,
        },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (
                0u64..8,
                prop_oneof![Just(0u64), Just(1), Just(6), Just(!0)],
                0u8..3,
                0u8..3,
                any::<bool>()
            )
                .prop_map(|(bits, ignore, nid, pid, head)| Op::Insert {
                    bits,
                    ignore,
                    nid,
                    pid,
                    head
                }),
            (0usize..64).prop_map(Op::Remove),
            (0u64..8, 1u8..3, 1u8..3, 1u64..4).prop_map(|(bits, nid, pid, skip_mod)| Op::Find {
                bits,
                nid,
                pid,
                skip_mod
            }),
        ]
    }

    fn nid_of(n: u8) -> Nid {
        if n == 0 {
            Nid::ANY
        } else {
            Nid::new4(crate::Net::new(crate::NetType::SHMLND, 0), n.into())
        }
    }
    fn pid_of(p: u8) -> u32 {
        if p == 0 { LNET_PID_ANY } else { p.into() }
    }

    proptest! {
        #[test]
        fn matches_reference_model(ops in proptest::collection::vec(op(), 1..200)) {
            let mut t = MatchTable::new();
            let mut m = Model::default();
            let mut next = 1u64;
            for o in ops {
                match o {
                    Op::Insert { bits, ignore, nid, pid, head } => {
                        let c = crit(bits, ignore, nid_of(nid), pid_of(pid));
                        let pos = if head { InsPos::Head } else { InsPos::Tail };
                        t.insert(next, c, pos, ());
                        m.insert(next, c, pos);
                        next += 1;
                    }
                    Op::Remove(i) => {
                        if !m.0.is_empty() {
                            let k = m.0[i % m.0.len()].0;
                            prop_assert!(t.remove(k).is_some());
                            m.remove(k);
                        }
                    }
                    Op::Find { bits, nid, pid, skip_mod } => {
                        let src = ProcessId::new(nid_of(nid), pid_of(pid));
                        let skip = |k: u64| k % skip_mod == 0;
                        let got = t.find(&src, bits, |k, _| if skip(k) { Decision::Skip } else { Decision::Stop(()) });
                        prop_assert_eq!(got.map(|x| x.0), m.find(&src, bits, &skip));
                    }
                }
                prop_assert_eq!(t.keys_in_order(), m.0.iter().map(|x| x.0).collect::<Vec<_>>());
                prop_assert_eq!(t.indexed(), t.len(), "an index kept a removed ME");
                prop_assert_eq!(
                    t.wild_first.map(|(p, s, c)| (p, s, c.match_bits, c.ignore_bits)),
                    t.wild.first_key_value().map(|(&p, &(s, c))| (p, s, c.match_bits, c.ignore_bits)),
                    "the cached first wildcard is not the map's"
                );
            }
        }
    }
}
