//! Counters: per node, per NI and per peer NI.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use crate::wire::MsgType;

/// Message and byte counters by message type (`struct lnet_counters_common`
/// and more).
#[derive(Default, Debug)]
pub struct MsgCounters {
    send_count: [AtomicU64; 5],
    recv_count: [AtomicU64; 5],
    drop_count: [AtomicU64; 5],
    send_length: AtomicU64,
    recv_length: AtomicU64,
    drop_length: AtomicU64,
    errors: AtomicU64,
}

/// A snapshot of [`MsgCounters`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CounterSnapshot {
    /// Messages sent, by [`MsgType`] index.
    pub send_count: [u64; 5],
    /// Messages received, by type.
    pub recv_count: [u64; 5],
    /// Messages dropped, by type.
    pub drop_count: [u64; 5],
    /// Payload bytes sent.
    pub send_length: u64,
    /// Payload bytes received.
    pub recv_length: u64,
    /// Payload bytes dropped.
    pub drop_length: u64,
    /// Send or receive errors.
    pub errors: u64,
}

impl CounterSnapshot {
    /// All messages sent.
    pub fn sent(&self) -> u64 {
        self.send_count.iter().sum()
    }
    /// All messages received.
    pub fn received(&self) -> u64 {
        self.recv_count.iter().sum()
    }
    /// All messages dropped.
    pub fn dropped(&self) -> u64 {
        self.drop_count.iter().sum()
    }
}

impl CounterSnapshot {
    /// Add `o` into `self` (a node's figures are the sum of its NIs').
    pub(crate) fn add(&mut self, o: &CounterSnapshot) {
        for i in 0..5 {
            self.send_count[i] += o.send_count[i];
            self.recv_count[i] += o.recv_count[i];
            self.drop_count[i] += o.drop_count[i];
        }
        self.send_length += o.send_length;
        self.recv_length += o.recv_length;
        self.drop_length += o.drop_length;
        self.errors += o.errors;
    }
}

impl MsgCounters {
    pub(crate) fn sent(&self, t: MsgType, bytes: u32) {
        self.send_count[t.index()].fetch_add(1, Relaxed);
        self.send_length.fetch_add(bytes.into(), Relaxed);
    }
    pub(crate) fn received(&self, t: MsgType, bytes: u32) {
        self.recv_count[t.index()].fetch_add(1, Relaxed);
        self.recv_length.fetch_add(bytes.into(), Relaxed);
    }
    pub(crate) fn dropped(&self, t: MsgType, bytes: u32) {
        self.drop_count[t.index()].fetch_add(1, Relaxed);
        self.drop_length.fetch_add(bytes.into(), Relaxed);
    }
    pub(crate) fn error(&self) {
        self.errors.fetch_add(1, Relaxed);
    }
    /// Read every counter.
    pub fn snapshot(&self) -> CounterSnapshot {
        let rd = |a: &[AtomicU64; 5]| std::array::from_fn(|i| a[i].load(Relaxed));
        CounterSnapshot {
            send_count: rd(&self.send_count),
            recv_count: rd(&self.recv_count),
            drop_count: rd(&self.drop_count),
            send_length: self.send_length.load(Relaxed),
            recv_length: self.recv_length.load(Relaxed),
            drop_length: self.drop_length.load(Relaxed),
            errors: self.errors.load(Relaxed),
        }
    }
}

/// Why the core dropped an incoming message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// No ME/MD matched (and the portal is not lazy).
    NoMatch,
    /// A matching MD was too small and does not truncate.
    TooLarge,
    /// Addressed to a NID or pid that is not ours.
    NotForUs,
    /// Portal index out of range.
    BadPortal,
    /// ACK/REPLY naming an MD that no longer waits for it.
    StaleHandle,
    /// A lazy portal's queue of waiting messages was full.
    LazyOverflow,
    /// A lazy portal was turned off, or the node shut down, with messages waiting.
    LazyFlushed,
    /// Message type not expected here (HELLO).
    BadType,
    /// The NI is not up (or the node is shutting down).
    NiDown,
}

impl DropReason {
    /// All reasons.
    pub const ALL: [DropReason; 9] = [
        DropReason::NoMatch,
        DropReason::TooLarge,
        DropReason::NotForUs,
        DropReason::BadPortal,
        DropReason::StaleHandle,
        DropReason::LazyOverflow,
        DropReason::LazyFlushed,
        DropReason::BadType,
        DropReason::NiDown,
    ];
}

/// Node-wide counters beyond messages (the node's message counts are
/// the sum of its NIs').
#[derive(Default, Debug)]
pub struct NodeCounters {
    drops: [AtomicU64; 9],
    lazy_delayed: AtomicU64,
    response_timeouts: AtomicU64,
}

/// A snapshot of [`NodeCounters`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeCounterSnapshot {
    /// Messages and bytes.
    pub msgs: CounterSnapshot,
    /// Drops by reason, in [`DropReason::ALL`] order.
    pub drops: Vec<(DropReason, u64)>,
    /// PUTs that waited on a lazy portal.
    pub lazy_delayed: u64,
    /// ACK/REPLY deadlines that expired.
    pub response_timeouts: u64,
}

impl NodeCounterSnapshot {
    /// Drops for one reason.
    pub fn drops_for(&self, r: DropReason) -> u64 {
        self.drops.iter().find(|(x, _)| *x == r).map_or(0, |x| x.1)
    }
}

impl NodeCounters {
    pub(crate) fn drop_reason(&self, r: DropReason) {
        let i = DropReason::ALL.iter().position(|x| *x == r).unwrap_or(0);
        self.drops[i].fetch_add(1, Relaxed);
    }
    pub(crate) fn lazy_delayed(&self) {
        self.lazy_delayed.fetch_add(1, Relaxed);
    }
    pub(crate) fn response_timeout(&self) {
        self.response_timeouts.fetch_add(1, Relaxed);
    }
    /// Read every counter; `msgs` are the node's message counts.
    pub fn snapshot(&self, msgs: CounterSnapshot) -> NodeCounterSnapshot {
        NodeCounterSnapshot {
            msgs,
            drops: DropReason::ALL
                .iter()
                .enumerate()
                .map(|(i, r)| (*r, self.drops[i].load(Relaxed)))
                .collect(),
            lazy_delayed: self.lazy_delayed.load(Relaxed),
            response_timeouts: self.response_timeouts.load(Relaxed),
        }
    }
}

/// Threads' counter shards: enough that threads rarely share one (a
/// power of two).
pub const STAT_SHARDS: usize = 16;
const _: () = assert!(STAT_SHARDS.is_power_of_two());

/// A value on cache lines of its own (128 bytes: adjacent-line prefetch
/// pairs lines), so that writers of neighbouring values do not share a
/// line: shards of a table, per-thread counters.
///
/// ```
/// let shards: Vec<lnet::CachePadded<std::sync::Mutex<u32>>> =
///     (0..4).map(|_| Default::default()).collect();
/// assert_eq!(std::mem::align_of_val(&shards[0]), 128);
/// *shards[1].lock().unwrap() += 1;
/// ```
#[repr(align(128))]
#[derive(Debug, Default)]
pub struct CachePadded<T>(pub T);

impl<T> std::ops::Deref for CachePadded<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

/// A block of counters written on the message path, one copy per thread
/// shard: each thread adds to its own copy, so no cache line is written
/// by every thread (DESIGN.md principle 6); reading sums the copies.
///
/// ```
/// lnet::lnd_stats! {
///     /// Counters of an example LND.
///     Stats, StatsSnapshot;
///     /// Messages sent.
///     tx_msgs,
/// }
/// use std::sync::atomic::Ordering::Relaxed;
/// let s = lnet::counters::Sharded::<Stats>::default();
/// s.local().tx_msgs.fetch_add(2, Relaxed);
/// std::thread::scope(|t| {
///     t.spawn(|| s.local().tx_msgs.fetch_add(3, Relaxed));
/// });
/// assert_eq!(s.snapshot().tx_msgs, 5);
/// ```
#[derive(Debug)]
pub struct Sharded<T> {
    shards: Box<[CachePadded<T>; STAT_SHARDS]>,
}

impl<T: Default> Default for Sharded<T> {
    fn default() -> Self {
        Sharded {
            shards: Box::new(std::array::from_fn(|_| CachePadded(T::default()))),
        }
    }
}

/// This thread's shard: threads take shards round-robin on first use.
/// (Inline: LNDs in other crates count on every message.)
#[inline]
fn shard_index() -> usize {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    thread_local! {
        // A const initialiser: the per-message read is one TLS load.
        static SHARD: std::cell::Cell<usize> = const { std::cell::Cell::new(usize::MAX) };
    }
    SHARD.with(|s| {
        let i = s.get();
        if i != usize::MAX {
            return i;
        }
        let i = (NEXT.fetch_add(1, Relaxed) as usize) & (STAT_SHARDS - 1);
        s.set(i);
        i
    })
}

impl<T: StatBlock> Sharded<T> {
    /// The calling thread's copy: count here.
    #[inline]
    pub fn local(&self) -> &T {
        &self.shards[shard_index() & (STAT_SHARDS - 1)].0
    }
    /// Every counter, summed over the shards.
    pub fn snapshot(&self) -> T::Snapshot {
        let mut sum = T::Snapshot::default();
        for s in self.shards.iter() {
            s.0.add_to(&mut sum);
        }
        sum
    }
}

/// A counter block that [`Sharded`] can sum (implemented by
/// [`lnd_stats!`](crate::lnd_stats)).
pub trait StatBlock {
    /// Its plain copy.
    type Snapshot: Default;
    /// Add this block's counts into `sum`.
    fn add_to(&self, sum: &mut Self::Snapshot);
}

/// Declare an LND's counter block: `Stats` (one monotonic `AtomicU64` per
/// name) and `StatsSnapshot` (the same fields as `u64`), with
/// `Stats::snapshot()`. Every LND counts its refusals and data paths this
/// way, in a [`Sharded`] block when the counters are written per message.
///
/// ```
/// lnet::lnd_stats! {
///     /// Counters of an example LND.
///     Stats, StatsSnapshot;
///     /// Messages sent.
///     tx_msgs,
///     /// Messages received.
///     rx_msgs,
/// }
/// let s = Stats::default();
/// s.tx_msgs.fetch_add(2, std::sync::atomic::Ordering::Relaxed);
/// assert_eq!(s.snapshot().tx_msgs, 2);
/// ```
#[macro_export]
macro_rules! lnd_stats {
    ($(#[$sm:meta])* $stats:ident, $snap:ident; $( $(#[$m:meta])* $name:ident ),* $(,)?) => {
        $(#[$sm])*
        #[derive(Debug, Default)]
        pub struct $stats { $( $(#[$m])* pub $name: ::std::sync::atomic::AtomicU64, )* }
        #[doc = concat!("A copy of [`", stringify!($stats), "`].")]
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
        pub struct $snap { $( $(#[$m])* pub $name: u64, )* }
        impl $stats {
            /// Read every counter.
            pub fn snapshot(&self) -> $snap {
                $snap { $( $name: self.$name.load(::std::sync::atomic::Ordering::Relaxed), )* }
            }
        }
        impl $crate::counters::StatBlock for $stats {
            type Snapshot = $snap;
            fn add_to(&self, sum: &mut $snap) {
                $( sum.$name += self.$name.load(::std::sync::atomic::Ordering::Relaxed); )*
            }
        }
    };
}

#[cfg(test)]
mod tests {
    use super::Sharded;
    use std::sync::atomic::Ordering::Relaxed;

    crate::lnd_stats! {
        /// Test block.
        Block, BlockSnapshot;
        /// Messages.
        msgs,
        /// Bytes.
        bytes,
    }

    #[test]
    fn sharded_counts_sum_over_threads() {
        let s = Sharded::<Block>::default();
        // More threads than shards: some share one, none is lost.
        std::thread::scope(|t| {
            for k in 0..(super::STAT_SHARDS as u64 + 4) {
                let s = &s;
                t.spawn(move || {
                    for _ in 0..1000 {
                        s.local().msgs.fetch_add(1, Relaxed);
                        s.local().bytes.fetch_add(k, Relaxed);
                    }
                });
            }
        });
        let n = super::STAT_SHARDS as u64 + 4;
        let snap = s.snapshot();
        assert!(s.local().snapshot().msgs <= snap.msgs);
        assert_eq!(snap.msgs, 1000 * n);
        assert_eq!(snap.bytes, 1000 * (n * (n - 1) / 2));
    }
}
