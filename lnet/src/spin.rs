//! A lock for short critical sections on a message's path: its
//! uncontended release is a plain store.
//!
//! `std::sync::Mutex` releases with an atomic swap (it must learn whether
//! a waiter sleeps), and a locked instruction costs about as much as a
//! cache miss to L2 on the path of a small message. Portals containers
//! and shm producer rings are held for tens of nanoseconds at a time
//! (a match, a slot's copy), so a waiter spins briefly and then yields
//! its CPU rather than sleeping: no thread ever waits on one of these
//! locks for long unless the holder was preempted, and yielding lets the
//! holder run again (on a machine with as few cores as threads too).
//!
//! Only hold one across bounded work: no blocking call, no I/O, no wait.
//!
//! ```
//! use lnet::spin::SpinLock;
//! let l = SpinLock::new(0u32);
//! *l.lock() += 1;
//! assert_eq!(*l.lock(), 1);
//! ```

/// Spin a little, then give the CPU away: the waiting strategy of
/// [`SpinLock`].
pub struct SpinThenYield;

/// `spin_loop` hints per turn before yielding (a few hundred ns).
const SPINS: usize = 32;

impl ::spin::RelaxStrategy for SpinThenYield {
    #[inline]
    fn relax() {
        for _ in 0..SPINS {
            std::hint::spin_loop();
        }
        std::thread::yield_now();
    }
}

/// A mutex whose uncontended lock is one compare-exchange and whose
/// release is a store; waiters spin, then yield (see the module).
pub type SpinLock<T> = ::spin::mutex::SpinMutex<T, SpinThenYield>;

/// The guard of a [`SpinLock`].
pub type SpinGuard<'a, T> = ::spin::mutex::SpinMutexGuard<'a, T>;

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn contended_increments_are_all_kept() {
        // More threads than this machine has cores: a preempted holder
        // must not stall the others for good.
        let l = Arc::new(SpinLock::new(0u64));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let l = l.clone();
                std::thread::spawn(move || {
                    for _ in 0..20_000 {
                        *l.lock() += 1;
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(*l.lock(), 8 * 20_000);
    }

    #[test]
    fn try_lock_fails_while_held() {
        let l = SpinLock::new(());
        let g = l.lock();
        assert!(l.try_lock().is_none());
        drop(g);
        assert!(l.try_lock().is_some());
    }
}
