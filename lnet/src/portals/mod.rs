//! The portals layer: portal table, match entries, memory descriptors,
//! events.
//!
//! A target exposes memory by attaching an ME (who may match, which bits)
//! to a portal and an MD (the memory, options, threshold) to the ME. An
//! initiator binds an MD and PUTs it or GETs into it. Events report each
//! step; the last one for an MD has `unlinked` set and gives the memory
//! back.
//!
//! ```
//! use lnet::{Md, MdOptions, Threshold, EventQueue};
//! let q = EventQueue::new();
//! let md = Md::new(vec![0u8; 4096])
//!     .options(MdOptions::OP_PUT | MdOptions::TRUNCATE)
//!     .threshold(Threshold::Infinite)
//!     .handler(q.handler());
//! assert_eq!(md.buffer.len(), 4096);
//! ```

pub mod event;
pub mod matching;
pub mod md;

use event::EventHandler;
use md::{MdBuffer, MdOptions, Threshold};

/// Names an MD (its cookie, never reused).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MdHandle(pub(crate) u64);

impl MdHandle {
    /// The cookie (the object cookie of its wire handle).
    pub fn cookie(&self) -> u64 {
        self.0
    }
}

/// Names an ME.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MeHandle(pub(crate) u64);

/// Whether an ME goes away with its MD (`enum lnet_unlink`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unlink {
    /// Keep the ME when its MD is unlinked (another MD may be attached).
    Retain,
    /// Unlink the ME with its MD ("use once").
    Unlink,
}

/// Whether a PUT asks for an ACK (`enum lnet_ack_req`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AckReq {
    /// Ask for an ACK.
    Ack,
    /// Don't.
    NoAck,
}

/// A memory descriptor to attach or bind (`struct lnet_md`).
#[derive(Debug)]
pub struct Md {
    /// The memory (the MD owns it until its final event).
    pub buffer: MdBuffer,
    /// Operations it serves before unlinking itself (default 1).
    pub threshold: Threshold,
    /// Per-operation maximum with [`MdOptions::MAX_SIZE`].
    pub max_size: u32,
    /// Options.
    pub options: MdOptions,
    /// A value of the user's, echoed in every event.
    pub user_ptr: u64,
    /// Where its events go.
    pub handler: EventHandler,
}

impl Md {
    /// An MD over `buffer`, threshold 1, no options, no handler.
    pub fn new(buffer: impl Into<MdBuffer>) -> Self {
        Md {
            buffer: buffer.into(),
            threshold: Threshold::Finite(1),
            max_size: 0,
            options: MdOptions::NONE,
            user_ptr: 0,
            handler: EventHandler::None,
        }
    }
    /// Set the threshold.
    pub fn threshold(mut self, t: Threshold) -> Self {
        self.threshold = t;
        self
    }
    /// Set the options.
    pub fn options(mut self, o: MdOptions) -> Self {
        self.options = o;
        self
    }
    /// Set `max_size` (and the MAX_SIZE option).
    pub fn max_size(mut self, n: u32) -> Self {
        self.max_size = n;
        self.options |= MdOptions::MAX_SIZE;
        self
    }
    /// Set the user value.
    pub fn user_ptr(mut self, v: u64) -> Self {
        self.user_ptr = v;
        self
    }
    /// Set the event handler.
    pub fn handler(mut self, h: EventHandler) -> Self {
        self.handler = h;
        self
    }
}
