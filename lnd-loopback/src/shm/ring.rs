//! The index protocol of a single-producer single-consumer ring and its
//! wake-ups, kept apart from the memory it lives in so that loom can
//! model-check it.
//!
//! The control block sits in the producer's shared segment. The producer
//! owns `tail`, the consumer owns `head`; both are free-running counters
//! (slot = counter mod `nslots`). A slot is written by the producer before
//! it publishes `tail` (release) and read by the consumer after it loads
//! `tail` (acquire); the consumer hands it back by storing `head`
//! (release), which the producer loads (acquire) before reusing the slot.
//!
//! Wake-ups (no lost wake-up, no syscall while both sides are busy):
//! * the consumer, before it sleeps, sets `consumer_sleeping`, then looks
//!   at `tail` once more; the producer, after publishing, looks at
//!   `consumer_sleeping` and rings the consumer's doorbell only if it was
//!   set (clearing it). A `SeqCst` fence on both sides orders the store
//!   before the load, so at least one of them sees the other.
//! * the same handshake runs the other way (`producer_waiting` / `head`)
//!   when the producer has messages queued for want of a free slot.

#[cfg(lnet_loom)]
pub(crate) use loom::sync::atomic::{AtomicU32, AtomicU64, Ordering, fence};
#[cfg(not(lnet_loom))]
pub(crate) use std::sync::atomic::{AtomicU32, AtomicU64, Ordering, fence};

/// The ring's shared control words, each on its own cache line.
#[repr(C, align(64))]
pub(crate) struct RingCtl {
    pub(crate) tail: AtomicU64,
    _p0: [u64; 7],
    pub(crate) head: AtomicU64,
    _p1: [u64; 7],
    pub(crate) consumer_sleeping: AtomicU32,
    _p2: [u32; 15],
    pub(crate) producer_waiting: AtomicU32,
    _p3: [u32; 15],
}

/// Bytes the control block occupies.
#[cfg(not(lnet_loom))]
pub(crate) const RING_CTL_SIZE: usize = 256;
#[cfg(not(lnet_loom))]
const _: () = assert!(std::mem::size_of::<RingCtl>() == RING_CTL_SIZE);

impl RingCtl {
    /// A zeroed control block (tests and the floor measurement; in
    /// production it lives in a segment).
    pub(crate) fn new() -> Self {
        RingCtl {
            tail: AtomicU64::new(0),
            _p0: [0; 7],
            head: AtomicU64::new(0),
            _p1: [0; 7],
            consumer_sleeping: AtomicU32::new(0),
            _p2: [0; 15],
            producer_waiting: AtomicU32::new(0),
            _p3: [0; 15],
        }
    }
}

/// The slot after `slot` in a ring of `nslots`.
#[inline]
fn next_slot(slot: u64, nslots: u64) -> u64 {
    if slot + 1 >= nslots { 0 } else { slot + 1 }
}

/// The producer's private view of a ring.
#[derive(Debug)]
pub(crate) struct Producer {
    pub(crate) nslots: u64,
    /// Next counter to publish (our copy of `tail`).
    pub(crate) tail: u64,
    /// Last `head` seen (saves a shared-line load per message).
    pub(crate) cached_head: u64,
    /// `tail % nslots`, kept as the counter moves: no division (tens of
    /// cycles) on the way to every slot.
    pub(crate) slot: u64,
}

impl Producer {
    pub(crate) fn new(nslots: u64) -> Self {
        Producer {
            nslots,
            tail: 0,
            cached_head: 0,
            slot: 0,
        }
    }

    /// The slot index to fill next, when there is room. A `head` that runs
    /// ahead of `tail` (a corrupt or hostile consumer) reads as "full".
    pub(crate) fn reserve(&mut self, ctl: &RingCtl) -> Option<u64> {
        if self.tail.wrapping_sub(self.cached_head) >= self.nslots {
            self.cached_head = ctl.head.load(Ordering::Acquire);
            let used = self.tail.wrapping_sub(self.cached_head);
            if used >= self.nslots {
                return None;
            }
        }
        Some(self.slot)
    }

    /// Publish the reserved slot. Returns true when the consumer asked to
    /// be woken (ring its doorbell).
    pub(crate) fn publish(&mut self, ctl: &RingCtl) -> bool {
        self.tail = self.tail.wrapping_add(1);
        self.slot = next_slot(self.slot, self.nslots);
        ctl.tail.store(self.tail, Ordering::Release);
        fence(Ordering::SeqCst);
        ctl.consumer_sleeping.load(Ordering::Relaxed) != 0
    }

    /// Before sleeping with messages queued: ask to be woken when a slot
    /// frees. Returns true when one is free already (do not sleep).
    pub(crate) fn want_space(&mut self, ctl: &RingCtl) -> bool {
        ctl.producer_waiting.store(1, Ordering::Relaxed);
        fence(Ordering::SeqCst);
        self.cached_head = ctl.head.load(Ordering::Acquire);
        let free = self.tail.wrapping_sub(self.cached_head) < self.nslots;
        if free {
            ctl.producer_waiting.store(0, Ordering::Relaxed);
        }
        free
    }

    /// After waking for space: stop asking the consumer for wake-ups.
    pub(crate) fn got_space(&self, ctl: &RingCtl) {
        ctl.producer_waiting.store(0, Ordering::Relaxed);
    }
}

/// The consumer's private view of a ring.
#[derive(Debug)]
pub(crate) struct Consumer {
    pub(crate) nslots: u64,
    /// Next counter to read (our copy of `head`).
    pub(crate) head: u64,
    /// `head % nslots`, kept as the counter moves (see [`Producer::slot`]).
    pub(crate) slot: u64,
}

/// What [`Consumer::peek`] found.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Peek {
    /// Nothing to read.
    Empty,
    /// A published slot at this index.
    Ready(u64),
    /// `tail` claims more than the ring holds: the producer is broken.
    Corrupt,
}

impl Consumer {
    pub(crate) fn new(nslots: u64) -> Self {
        Consumer {
            nslots,
            head: 0,
            slot: 0,
        }
    }

    /// The next published slot, if any.
    pub(crate) fn peek(&self, ctl: &RingCtl) -> Peek {
        let tail = ctl.tail.load(Ordering::Acquire);
        let n = tail.wrapping_sub(self.head);
        if n == 0 {
            Peek::Empty
        } else if n > self.nslots {
            Peek::Corrupt
        } else {
            Peek::Ready(self.slot)
        }
    }

    /// Hand the slot back. Returns true when the producer asked to be
    /// woken (ring its doorbell).
    pub(crate) fn release(&mut self, ctl: &RingCtl) -> bool {
        self.head = self.head.wrapping_add(1);
        self.slot = next_slot(self.slot, self.nslots);
        ctl.head.store(self.head, Ordering::Release);
        fence(Ordering::SeqCst);
        ctl.producer_waiting.load(Ordering::Relaxed) != 0
    }

    /// Before sleeping: ask to be woken. Returns true when a message is
    /// there already (do not sleep).
    pub(crate) fn prepare_sleep(&self, ctl: &RingCtl) -> bool {
        ctl.consumer_sleeping.store(1, Ordering::Relaxed);
        fence(Ordering::SeqCst);
        let ready = ctl.tail.load(Ordering::Acquire) != self.head;
        if ready {
            ctl.consumer_sleeping.store(0, Ordering::Relaxed);
        }
        ready
    }

    /// After waking (or deciding not to sleep).
    pub(crate) fn awake(&self, ctl: &RingCtl) {
        ctl.consumer_sleeping.store(0, Ordering::Relaxed);
    }
}

#[cfg(all(test, not(lnet_loom)))]
mod tests {
    use super::*;

    fn ctl() -> Box<RingCtl> {
        Box::new(RingCtl::new())
    }

    #[test]
    fn full_empty_wrap() {
        let c = ctl();
        let mut p = Producer::new(4);
        let mut q = Consumer::new(4);
        assert_eq!(q.peek(&c), Peek::Empty);
        for round in 0..10u64 {
            for i in 0..4 {
                assert_eq!(p.reserve(&c), Some(i));
                p.publish(&c);
            }
            assert_eq!(p.reserve(&c), None, "round {round}");
            for i in 0..4 {
                assert_eq!(q.peek(&c), Peek::Ready(i));
                q.release(&c);
            }
            assert_eq!(q.peek(&c), Peek::Empty);
        }
    }

    #[test]
    fn counters_wrap_u64() {
        let c = ctl();
        let start = u64::MAX - 2;
        c.tail.store(start, Ordering::Relaxed);
        c.head.store(start, Ordering::Relaxed);
        let mut p = Producer {
            nslots: 4,
            tail: start,
            cached_head: start,
            slot: 1,
        };
        let mut q = Consumer {
            nslots: 4,
            head: start,
            slot: 1,
        };
        for k in 0..8u64 {
            let i = p.reserve(&c).expect("room");
            assert_eq!(i, (1 + k) % 4, "slots follow the counter");
            p.publish(&c);
            assert_eq!(q.peek(&c), Peek::Ready(i), "both sides on one slot");
            q.release(&c);
        }
        assert_eq!(q.peek(&c), Peek::Empty);
    }

    #[test]
    fn hostile_indices() {
        let c = ctl();
        let q = Consumer::new(4);
        c.tail.store(1000, Ordering::Relaxed);
        assert_eq!(q.peek(&c), Peek::Corrupt);
        let mut p = Producer::new(4);
        c.head.store(77, Ordering::Relaxed);
        p.cached_head = 0;
        p.tail = 4;
        assert_eq!(p.reserve(&c), None, "head ahead of tail reads as full");
    }

    #[test]
    fn wake_flags() {
        let c = ctl();
        let mut p = Producer::new(2);
        let mut q = Consumer::new(2);
        assert!(!q.prepare_sleep(&c));
        p.reserve(&c).unwrap();
        assert!(p.publish(&c), "sleeping consumer must be woken");
        q.awake(&c);
        assert!(p.reserve(&c).is_some());
        assert!(!p.publish(&c), "the consumer is awake");
        assert!(!p.want_space(&c));
        assert_eq!(q.peek(&c), Peek::Ready(0));
        assert!(q.release(&c), "waiting producer must be woken");
        p.got_space(&c);
    }
}

#[cfg(all(test, lnet_loom))]
mod loom_tests {
    use super::*;
    use loom::sync::{Arc, Condvar, Mutex};
    use loom::thread;

    /// An eventfd model: a counter and a condition variable.
    #[derive(Default)]
    struct Doorbell {
        n: Mutex<u64>,
        cv: Condvar,
    }
    impl Doorbell {
        fn ring(&self) {
            *self.n.lock().unwrap() += 1;
            self.cv.notify_one();
        }
        fn wait(&self) {
            let mut g = self.n.lock().unwrap();
            while *g == 0 {
                g = self.cv.wait(g).unwrap();
            }
            *g = 0;
        }
    }

    /// Slots modelled as loom cells, so unsynchronised access is caught.
    struct Slots(Vec<loom::cell::UnsafeCell<u64>>);
    // SAFETY: access is ordered by the ring protocol under test; loom
    // checks that claim.
    unsafe impl Sync for Slots {}

    /// Producer sends `n` values through a ring of `nslots`, sleeping for
    /// space when full; the consumer sleeps when empty. Loom explores every
    /// interleaving: a lost wake-up shows as a deadlock, a slot race as a
    /// causality violation, a wrong value as a failed assert.
    fn run(nslots: u64, n: u64) {
        loom::model(move || {
            let ctl = Arc::new(RingCtl::new());
            let slots = Arc::new(Slots(
                (0..nslots)
                    .map(|_| loom::cell::UnsafeCell::new(0))
                    .collect(),
            ));
            let cons_bell = Arc::new(Doorbell::default());
            let prod_bell = Arc::new(Doorbell::default());
            let (c2, s2, cb, pb) = (
                ctl.clone(),
                slots.clone(),
                cons_bell.clone(),
                prod_bell.clone(),
            );
            let prod = thread::spawn(move || {
                let mut p = Producer::new(nslots);
                let mut i = 0;
                while i < n {
                    match p.reserve(&c2) {
                        Some(idx) => {
                            // SAFETY: the ring protocol gives this slot to the producer.
                            s2.0[idx as usize].with_mut(|v| unsafe { *v = i + 100 });
                            if p.publish(&c2) {
                                cb.ring();
                            }
                            i += 1;
                        }
                        None => {
                            if !p.want_space(&c2) {
                                pb.wait();
                            }
                            p.got_space(&c2);
                        }
                    }
                }
            });
            let mut q = Consumer::new(nslots);
            let mut got = 0;
            while got < n {
                match q.peek(&ctl) {
                    Peek::Ready(idx) => {
                        // SAFETY: published by the producer, ours until release.
                        let v = slots.0[idx as usize].with(|v| unsafe { *v });
                        assert_eq!(v, got + 100);
                        got += 1;
                        if q.release(&ctl) {
                            prod_bell.ring();
                        }
                    }
                    Peek::Empty => {
                        if !q.prepare_sleep(&ctl) {
                            cons_bell.wait();
                        }
                        q.awake(&ctl);
                    }
                    Peek::Corrupt => panic!("corrupt"),
                }
            }
            prod.join().unwrap();
        });
    }

    #[test]
    fn loom_two_messages() {
        run(3, 2);
    }

    #[test]
    fn loom_one_slot_wraps() {
        run(1, 3);
    }

    #[test]
    fn loom_two_slots_full_and_empty() {
        run(2, 3);
    }
}

/// The floor under the shm transport's latency, in µs: the one-way time
/// of `round_trips` ping-pongs between two threads, each message one
/// inline slot of an 8-byte PUT (slot header, LNet header and payload:
/// 96 bytes) written and published through this ring protocol, read and
/// released on the other side. No LNet work at all: what is left is the
/// ring's index protocol and the cache-line transfers between the two
/// CPUs. Benchmarks print it beside the full path to show how much of
/// a message's latency the transport itself accounts for.
///
/// `cpus` pins the two threads (first, echo), as the benchmark pins the
/// progress threads it compares this with. On a shared host the figure
/// moves with the host's cache-line transfer time (0.08 to 0.27 µs seen
/// here, minutes apart), so compare it only with figures taken beside it.
///
/// ```
/// let us = lnd_loopback::shm::ring_floor_one_way_us(1_000, None);
/// assert!(us > 0.0);
/// ```
#[cfg(not(lnet_loom))]
pub fn ring_floor_one_way_us(round_trips: u64, cpus: Option<(usize, usize)>) -> f64 {
    use std::sync::Arc;
    use std::sync::atomic::AtomicU64;
    const NSLOTS: u64 = 64;
    const WORDS: usize = 12;
    /// One direction: control block and slots, as in a segment (slots on
    /// lines of their own).
    struct Dir {
        ctl: RingCtl,
        slots: Vec<[AtomicU64; 16]>,
    }
    let dir = || {
        Arc::new(Dir {
            ctl: RingCtl::new(),
            slots: (0..NSLOTS)
                .map(|_| std::array::from_fn(|_| AtomicU64::new(0)))
                .collect(),
        })
    };
    let (ab, ba) = (dir(), dir());
    let side = move |out: Arc<Dir>, inp: Arc<Dir>, first: bool, cpu: Option<usize>| {
        if let Some(cpu) = cpu {
            super::pin_to(cpu);
        }
        let (mut p, mut q) = (Producer::new(NSLOTS), Consumer::new(NSLOTS));
        let mut msg = [7u64; WORDS];
        let send = |p: &mut Producer, msg: &[u64; WORDS]| {
            // The peer releases each slot before answering: never full.
            let i = p.reserve(&out.ctl).unwrap_or(0) as usize;
            for (w, v) in out.slots[i].iter().zip(msg) {
                w.store(*v, Ordering::Relaxed);
            }
            p.publish(&out.ctl);
        };
        let t0 = std::time::Instant::now();
        let deadline = t0 + std::time::Duration::from_secs(60);
        if first {
            send(&mut p, &msg);
        }
        let mut done = 0;
        while done < round_trips {
            let i = match q.peek(&inp.ctl) {
                Peek::Ready(i) => i as usize,
                _ => {
                    if std::time::Instant::now() > deadline {
                        break;
                    }
                    std::hint::spin_loop();
                    continue;
                }
            };
            for (v, w) in msg.iter_mut().zip(&inp.slots[i]) {
                *v = w.load(Ordering::Relaxed);
            }
            q.release(&inp.ctl);
            done += 1;
            if !(first && done == round_trips) {
                send(&mut p, &msg);
            }
        }
        t0.elapsed().as_secs_f64() * 1e6 / done.max(1) as f64 / 2.0
    };
    let (ab2, ba2) = (ab.clone(), ba.clone());
    // Both sides on threads of their own, so pinning never touches the
    // caller's thread.
    let echo = std::thread::spawn(move || side(ba2, ab2, false, cpus.map(|c| c.1)));
    let first = std::thread::spawn(move || side(ab, ba, true, cpus.map(|c| c.0)));
    let r = first.join().unwrap_or(f64::NAN);
    let _ = echo.join();
    r
}
