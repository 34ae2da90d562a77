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
