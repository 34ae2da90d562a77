//! The index protocol of a single-producer single-consumer ring and its
//! wake-ups, kept apart from the memory it lives in so that loom can
//! model-check it.
//!
//! The producer owns a free-running counter `tail`, the consumer a
//! free-running counter `head` (slot = counter mod `nslots`). A slot is
//! published by its *mark*, the first 4 bytes of the slot: the producer
//! writes the slot, then stores the mark `tail + 1` (low 32 bits, release);
//! the consumer waits for the mark it expects, `head + 1`, in the slot it
//! reads next (acquire), so a message crosses between the cores in the
//! cache line that carries its header, with no shared index to read first.
//! The consumer hands the slot back by storing `head` (release) in the
//! control block, which the producer loads (acquire) only when its cached
//! copy says the ring is full. Any mark other than the expected one and
//! the one a slot holds from its previous lap (or zero, before its first)
//! is a broken producer.
//!
//! Wake-ups (no lost wake-up, no syscall while both sides are busy):
//! * the consumer, before it sleeps, sets `consumer_sleeping`, then looks
//!   at the next slot's mark once more; the producer, after publishing,
//!   looks at `consumer_sleeping` and rings the consumer's doorbell only if
//!   it was set (clearing it). A `SeqCst` fence on both sides orders the
//!   store before the load, so at least one of them sees the other.
//! * the same handshake runs the other way (`producer_waiting` / `head`)
//!   when the producer has messages queued for want of a free slot.

#[cfg(lnet_loom)]
pub(crate) use loom::sync::atomic::{AtomicU32, AtomicU64, Ordering, fence};
#[cfg(not(lnet_loom))]
pub(crate) use std::sync::atomic::{AtomicU32, AtomicU64, Ordering, fence};

/// The ring's shared control words, each on its own cache line.
#[repr(C, align(64))]
pub(crate) struct RingCtl {
    /// Unused since version 3 of the segment (the marks publish).
    _p0: [u64; 8],
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
            _p0: [0; 8],
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

    /// Publish the reserved slot, whose mark is `mark`. Returns true when
    /// the consumer asked to be woken (ring its doorbell).
    pub(crate) fn publish(&mut self, ctl: &RingCtl, mark: &AtomicU32) -> bool {
        self.tail = self.tail.wrapping_add(1);
        self.slot = next_slot(self.slot, self.nslots);
        mark.store(self.tail as u32, Ordering::Release);
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
    /// The next slot holds a mark no correct producer writes there.
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

    /// The next published slot, if any; `mark` is the mark of slot
    /// [`Consumer::slot`].
    #[inline]
    pub(crate) fn peek(&self, mark: &AtomicU32) -> Peek {
        let m = mark.load(Ordering::Acquire);
        let want = self.head.wrapping_add(1) as u32;
        if m == want {
            Peek::Ready(self.slot)
        } else if m == want.wrapping_sub(self.nslots as u32) || (m == 0 && self.head < self.nslots)
        {
            Peek::Empty
        } else {
            Peek::Corrupt
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

    /// Before sleeping: ask to be woken (`mark` as for [`Consumer::peek`]).
    /// Returns true when a message, or a broken mark, is there already
    /// (do not sleep).
    pub(crate) fn prepare_sleep(&self, ctl: &RingCtl, mark: &AtomicU32) -> bool {
        ctl.consumer_sleeping.store(1, Ordering::Relaxed);
        fence(Ordering::SeqCst);
        let ready = self.peek(mark) != Peek::Empty;
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
    fn marks(n: usize) -> Vec<AtomicU32> {
        (0..n).map(|_| AtomicU32::new(0)).collect()
    }

    #[test]
    fn full_empty_wrap() {
        let c = ctl();
        let m = marks(4);
        let mut p = Producer::new(4);
        let mut q = Consumer::new(4);
        assert_eq!(q.peek(&m[0]), Peek::Empty);
        for round in 0..10u64 {
            for i in 0..4 {
                assert_eq!(p.reserve(&c), Some(i));
                p.publish(&c, &m[i as usize]);
            }
            assert_eq!(p.reserve(&c), None, "round {round}");
            for i in 0..4 {
                assert_eq!(q.peek(&m[q.slot as usize]), Peek::Ready(i));
                q.release(&c);
            }
            assert_eq!(q.peek(&m[q.slot as usize]), Peek::Empty);
        }
    }

    #[test]
    fn counters_wrap_u64_and_marks_wrap_u32() {
        for start in [u64::MAX - 2, u32::MAX as u64 - 2] {
            let c = ctl();
            // The marks the slots hold from the lap before `start`.
            let m = marks(4);
            for k in 0..4u64 {
                let ctr = start.wrapping_sub(4).wrapping_add(k);
                m[((1 + k) % 4) as usize].store(ctr.wrapping_add(1) as u32, Ordering::Relaxed);
            }
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
            assert_eq!(q.peek(&m[1]), Peek::Empty, "last lap's mark");
            for k in 0..8u64 {
                let i = p.reserve(&c).expect("room");
                assert_eq!(i, (1 + k) % 4, "slots follow the counter");
                p.publish(&c, &m[i as usize]);
                assert_eq!(
                    q.peek(&m[i as usize]),
                    Peek::Ready(i),
                    "both sides on one slot"
                );
                q.release(&c);
            }
            assert_eq!(q.peek(&m[q.slot as usize]), Peek::Empty);
        }
    }

    #[test]
    fn hostile_marks_and_indices() {
        let c = ctl();
        let m = marks(4);
        let q = Consumer::new(4);
        for bad in [2, 1000, u32::MAX] {
            m[0].store(bad, Ordering::Relaxed);
            assert_eq!(q.peek(&m[0]), Peek::Corrupt, "mark {bad}");
        }
        m[0].store(1, Ordering::Relaxed);
        assert_eq!(q.peek(&m[0]), Peek::Ready(0));
        // After the first lap a zero mark is no longer "never written".
        let q = Consumer {
            nslots: 4,
            head: 8,
            slot: 0,
        };
        m[0].store(0, Ordering::Relaxed);
        assert_eq!(q.peek(&m[0]), Peek::Corrupt);
        m[0].store(5, Ordering::Relaxed);
        assert_eq!(q.peek(&m[0]), Peek::Empty);
        let mut p = Producer::new(4);
        c.head.store(77, Ordering::Relaxed);
        p.cached_head = 0;
        p.tail = 4;
        assert_eq!(p.reserve(&c), None, "head ahead of tail reads as full");
    }

    #[test]
    fn wake_flags() {
        let c = ctl();
        let m = marks(2);
        let mut p = Producer::new(2);
        let mut q = Consumer::new(2);
        assert!(!q.prepare_sleep(&c, &m[0]));
        p.reserve(&c).unwrap();
        assert!(p.publish(&c, &m[0]), "sleeping consumer must be woken");
        q.awake(&c);
        assert!(p.reserve(&c).is_some());
        assert!(!p.publish(&c, &m[1]), "the consumer is awake");
        assert!(!p.want_space(&c));
        assert_eq!(q.peek(&m[0]), Peek::Ready(0));
        assert!(q.release(&c), "waiting producer must be woken");
        p.got_space(&c);
        assert!(q.prepare_sleep(&c, &m[1]), "a message is there: no sleep");
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

    /// Slots modelled as loom cells, so unsynchronised access is caught,
    /// each with its mark.
    struct Slots(Vec<loom::cell::UnsafeCell<u64>>, Vec<AtomicU32>);
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
                (0..nslots).map(|_| AtomicU32::new(0)).collect(),
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
                            if p.publish(&c2, &s2.1[idx as usize]) {
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
                let mark = &slots.1[q.slot as usize];
                match q.peek(mark) {
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
                        if !q.prepare_sleep(&ctl, mark) {
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
/// slot of an 8-byte PUT under the compact header (48 bytes: mark, the
/// rest of the slot header, PUT header and payload) written and published
/// through this ring protocol, read and released on the other side. No
/// LNet work at all: what is left is the ring's protocol and the
/// cache-line transfers between the two CPUs. Benchmarks print it beside the full path to show how much of
/// a message's latency the transport itself accounts for.
///
/// `cpus` pins the two threads (first, echo), as the benchmark pins the
/// progress threads it compares this with. On a shared host the figure
/// moves with the host's cache-line transfer time (0.03 to 0.3 µs seen
/// here, minutes apart), so compare it only with figures taken beside it.
///
/// ```
/// let us = lnd_loopback::shm::ring_floor_one_way_us(1_000, None);
/// assert!(us > 0.0);
/// ```
#[cfg(not(lnet_loom))]
pub fn ring_floor_one_way_us(round_trips: u64, cpus: Option<(usize, usize)>) -> f64 {
    use std::sync::Arc;
    const NSLOTS: u64 = 64;
    /// The message after the mark, in 4-byte words.
    const WORDS: usize = 11;
    /// A slot's first line: the mark, then the message.
    #[repr(C, align(64))]
    struct Line([AtomicU32; 16]);
    /// One direction: control block and slots, as in a segment.
    struct Dir {
        ctl: RingCtl,
        slots: Vec<Line>,
    }
    let dir = || {
        Arc::new(Dir {
            ctl: RingCtl::new(),
            slots: (0..NSLOTS)
                .map(|_| Line(std::array::from_fn(|_| AtomicU32::new(0))))
                .collect(),
        })
    };
    let (ab, ba) = (dir(), dir());
    let side = move |out: Arc<Dir>, inp: Arc<Dir>, first: bool, cpu: Option<usize>| {
        if let Some(cpu) = cpu {
            super::pin_to(cpu);
        }
        let (mut p, mut q) = (Producer::new(NSLOTS), Consumer::new(NSLOTS));
        let mut msg = [7u32; WORDS];
        let send = |p: &mut Producer, msg: &[u32; WORDS]| {
            // The peer releases each slot before answering: never full.
            let i = p.reserve(&out.ctl).unwrap_or(0) as usize;
            let line = &out.slots[i].0;
            for (w, v) in line[1..].iter().zip(msg) {
                w.store(*v, Ordering::Relaxed);
            }
            p.publish(&out.ctl, &line[0]);
        };
        let t0 = std::time::Instant::now();
        let deadline = t0 + std::time::Duration::from_secs(60);
        if first {
            send(&mut p, &msg);
        }
        let mut done = 0;
        while done < round_trips {
            let i = match q.peek(&inp.slots[q.slot as usize].0[0]) {
                Peek::Ready(i) => i as usize,
                _ => {
                    if std::time::Instant::now() > deadline {
                        break;
                    }
                    std::hint::spin_loop();
                    continue;
                }
            };
            for (v, w) in msg.iter_mut().zip(&inp.slots[i].0[1..]) {
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
