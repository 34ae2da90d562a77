//! Credits, as LNet counts them: a counter that may go negative, where a
//! negative value is the number of messages queued for a credit.

/// One credit counter (NI tx credits, peer NI tx credits, router buffers).
///
/// ```
/// use lnet::Credits;
/// let mut c = Credits::new(1);
/// assert!(c.take());      // granted
/// assert!(!c.take());     // must queue
/// assert_eq!(c.min(), -1);
/// assert!(c.give_back()); // a queued message may now go
/// assert!(!c.give_back());
/// assert_eq!(c.available(), 1);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Credits {
    max: i32,
    cur: i32,
    min: i32,
}

impl Credits {
    /// `max` credits, all available.
    pub fn new(max: i32) -> Self {
        Credits {
            max,
            cur: max,
            min: max,
        }
    }
    /// Take a credit; false when the caller must queue (the counter then
    /// counts it as waiting).
    pub fn take(&mut self) -> bool {
        self.cur -= 1;
        self.min = self.min.min(self.cur);
        self.cur >= 0
    }
    /// Return a credit; true when a queued message should now take it.
    pub fn give_back(&mut self) -> bool {
        self.cur += 1;
        self.cur <= 0
    }
    /// Forget a queued message that will never take its credit (it was
    /// failed while waiting).
    pub fn cancel_wait(&mut self) {
        if self.cur < 0 {
            self.cur += 1;
        }
    }
    /// Current value (negative: that many are queued).
    pub fn available(&self) -> i32 {
        self.cur
    }
    /// Lowest value ever reached.
    pub fn min(&self) -> i32 {
        self.min
    }
    /// The configured number.
    pub fn max(&self) -> i32 {
        self.max
    }
}

/// A credit counter shared between threads without a lock on the common
/// path (an NI's credits, taken and returned by every message of every
/// connection): taking or returning a credit is one atomic addition; only a
/// message that must wait, and the return that releases it, take the lock
/// of the wait queue kept beside the counter.
///
/// A taker that gets `false` must wait; a returner that gets `true` must
/// release one waiter. The two meet under the queue's lock: the returner
/// pops a queued waiter or, when that waiter has not queued itself yet,
/// leaves it a hand-off that it takes instead of queueing.
///
/// ```
/// use lnet::credits::SharedCredits;
/// let c = SharedCredits::new(1);
/// assert!(c.take());       // granted
/// assert!(!c.take());      // must wait
/// assert_eq!(c.snapshot(0).min, -1);
/// assert!(c.give_back());  // release the waiter
/// assert!(!c.give_back());
/// assert_eq!(c.snapshot(0).available, 1);
/// ```
#[derive(Debug)]
pub struct SharedCredits {
    max: std::sync::atomic::AtomicI32,
    cur: std::sync::atomic::AtomicI32,
    min: std::sync::atomic::AtomicI32,
}

impl SharedCredits {
    /// `max` credits, all available.
    pub fn new(max: i32) -> Self {
        use std::sync::atomic::AtomicI32;
        SharedCredits {
            max: AtomicI32::new(max),
            cur: AtomicI32::new(max),
            min: AtomicI32::new(max),
        }
    }
    /// Start over with `max` credits (before any traffic).
    pub fn reset(&self, max: i32) {
        use std::sync::atomic::Ordering::Relaxed;
        self.max.store(max, Relaxed);
        self.cur.store(max, Relaxed);
        self.min.store(max, Relaxed);
    }
    /// Take a credit; false when the caller must wait.
    pub fn take(&self) -> bool {
        use std::sync::atomic::Ordering::{AcqRel, Relaxed};
        let now = self.cur.fetch_sub(1, AcqRel) - 1;
        if now < self.min.load(Relaxed) {
            self.min.fetch_min(now, Relaxed);
        }
        now >= 0
    }
    /// Return a credit; true when a waiter must now be released.
    pub fn give_back(&self) -> bool {
        self.cur.fetch_add(1, std::sync::atomic::Ordering::AcqRel) < 0
    }
    /// The counter's figures, with `queued` waiters.
    pub fn snapshot(&self, queued: usize) -> CreditSnapshot {
        use std::sync::atomic::Ordering::Relaxed;
        CreditSnapshot {
            max: self.max.load(Relaxed),
            available: self.cur.load(Relaxed),
            min: self.min.load(Relaxed),
            queued,
        }
    }
}

/// A snapshot of one credit counter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CreditSnapshot {
    /// Configured credits.
    pub max: i32,
    /// Current value (negative: queued messages).
    pub available: i32,
    /// Lowest value reached.
    pub min: i32,
    /// Messages waiting.
    pub queued: usize,
}

#[cfg(test)]
mod tests {
    use super::SharedCredits;
    use std::collections::VecDeque;
    use std::sync::{Arc, Mutex};

    /// Threads send through 3 shared credits, waiting and releasing each
    /// other as the core does (a returner pops a queued waiter or leaves a
    /// hand-off): every message goes exactly once, never more than 3 at a
    /// time, and all credits come back.
    #[test]
    fn shared_credits_hand_over_without_loss() {
        const THREADS: usize = 4;
        const PER: usize = 2_000;
        struct Q {
            waiting: VecDeque<usize>,
            handoffs: usize,
        }
        let c = Arc::new(SharedCredits::new(3));
        let q = Arc::new(Mutex::new(Q {
            waiting: VecDeque::new(),
            handoffs: 0,
        }));
        let sent = Arc::new(Mutex::new(vec![0u8; THREADS * PER]));
        let active = Arc::new(std::sync::atomic::AtomicI32::new(0));
        // Send message `m` on a credit: count it, then return the credit
        // and send whatever that releases (as tx_done does).
        fn go(
            mut m: usize,
            c: &SharedCredits,
            q: &Mutex<Q>,
            sent: &Mutex<Vec<u8>>,
            active: &std::sync::atomic::AtomicI32,
        ) {
            use std::sync::atomic::Ordering::SeqCst;
            loop {
                assert!(
                    active.fetch_add(1, SeqCst) < 3,
                    "more in flight than credits"
                );
                sent.lock().unwrap()[m] += 1;
                active.fetch_sub(1, SeqCst);
                if !c.give_back() {
                    return;
                }
                let mut g = q.lock().unwrap();
                match g.waiting.pop_front() {
                    Some(next) => m = next,
                    None => {
                        g.handoffs += 1;
                        return;
                    }
                }
            }
        }
        let hs: Vec<_> = (0..THREADS)
            .map(|t| {
                let (c, q, sent, active) = (c.clone(), q.clone(), sent.clone(), active.clone());
                std::thread::spawn(move || {
                    for i in 0..PER {
                        let m = t * PER + i;
                        if !c.take() {
                            let mut g = q.lock().unwrap();
                            if g.handoffs == 0 {
                                g.waiting.push_back(m);
                                continue;
                            }
                            g.handoffs -= 1;
                        }
                        go(m, &c, &q, &sent, &active);
                    }
                })
            })
            .collect();
        for h in hs {
            h.join().unwrap();
        }
        assert!(sent.lock().unwrap().iter().all(|&n| n == 1));
        let g = q.lock().unwrap();
        assert!(g.waiting.is_empty());
        assert_eq!(g.handoffs, 0);
        let s = c.snapshot(0);
        assert_eq!((s.max, s.available), (3, 3));
        assert!(s.min < 3);
    }
}
