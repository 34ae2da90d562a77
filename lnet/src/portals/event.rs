//! Events: what happened to an MD, delivered to its handler.

use std::collections::VecDeque;
use std::fmt;
use std::pin::Pin;
use std::sync::{Arc, Condvar, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::error::Error;
use crate::nid::{Nid, ProcessId};
use crate::portals::MdHandle;
use crate::portals::md::MdBuffer;
use crate::wire::MsgType;

/// Event kinds (`enum lnet_event_kind`, same values).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EventKind {
    /// A GET read from this MD (target side), once its REPLY went out.
    Get = 1,
    /// A PUT landed in this MD (target side).
    Put = 2,
    /// The REPLY to our GET landed in this MD (initiator side).
    Reply = 3,
    /// The ACK of our PUT arrived (initiator side).
    Ack = 4,
    /// Our PUT or GET left (initiator side).
    Send = 5,
    /// The MD was unlinked with no other event to say so.
    Unlink = 6,
}

/// One event (`struct lnet_event`).
pub struct Event {
    /// What happened.
    pub kind: EventKind,
    /// The target process of the operation.
    pub target: ProcessId,
    /// The initiator of the operation.
    pub initiator: ProcessId,
    /// The NID of the last hop the message came through (for incoming
    /// messages; our own NID for outgoing ones).
    pub sender: Nid,
    /// Portal index.
    pub pt_index: u32,
    /// Match bits of the operation.
    pub match_bits: u64,
    /// Requested length.
    pub rlength: u32,
    /// Manipulated (matched) length.
    pub mlength: u32,
    /// Offset in the MD.
    pub offset: u32,
    /// The MD.
    pub md: MdHandle,
    /// The MD's user value.
    pub user_ptr: u64,
    /// Out-of-band data of a PUT.
    pub hdr_data: u64,
    /// LNet message type behind the event.
    pub msg_type: MsgType,
    /// Success, or why the operation failed.
    pub status: Result<(), Error>,
    /// True on the MD's final event: nothing more will happen to it.
    pub unlinked: bool,
    /// The MD's memory, handed back with the final event.
    pub buffer: Option<MdBuffer>,
    /// The payload, for an MD with [`crate::MdOptions::LOAN`].
    pub loan: Option<Bytes>,
}

impl fmt::Debug for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Event")
            .field("kind", &self.kind)
            .field("initiator", &self.initiator)
            .field("target", &self.target)
            .field("pt_index", &self.pt_index)
            .field("match_bits", &format_args!("{:#x}", self.match_bits))
            .field("rlength", &self.rlength)
            .field("mlength", &self.mlength)
            .field("offset", &self.offset)
            .field("hdr_data", &self.hdr_data)
            .field("status", &self.status)
            .field("unlinked", &self.unlinked)
            .field("buffer", &self.buffer.as_ref().map(MdBuffer::len))
            .field("loan", &self.loan.as_ref().map(Bytes::len))
            .finish()
    }
}

/// Where an MD's events go.
#[derive(Clone, Default)]
pub enum EventHandler {
    /// Nowhere (the MD's memory is dropped when it unlinks).
    #[default]
    None,
    /// A callback, run on whatever thread completed the operation; it must
    /// not block.
    Callback(Arc<dyn Fn(Event) + Send + Sync>),
    /// A queue, read synchronously or as an async stream.
    Queue(EventQueue),
    /// A callback lent each event, as LNet's own handlers are (they get a
    /// pointer); run as [`EventHandler::Callback`] is.
    CallbackMut(Arc<dyn Fn(&mut Event) + Send + Sync>),
}

impl EventHandler {
    /// A callback handler.
    pub fn callback(f: impl Fn(Event) + Send + Sync + 'static) -> Self {
        EventHandler::Callback(Arc::new(f))
    }

    /// A callback handler lent each event: it takes out of it what it
    /// keeps (the MD's [`Event::buffer`] on its last event, a
    /// [`Event::loan`]); what it leaves is dropped once it returns.
    ///
    /// For the latency path: an event is a few hundred bytes, and one
    /// handed over by value is copied once more on its way into the
    /// callback (8 ns of the core's 61 per inline receive here, `cargo
    /// bench -p lnd-loopback --bench hop`).
    ///
    /// ```
    /// use lnet::{EventHandler, EventKind, MdBuffer};
    /// use std::sync::{Arc, Mutex};
    ///
    /// let back: Arc<Mutex<Option<MdBuffer>>> = Arc::default();
    /// let keep = back.clone();
    /// let _h = EventHandler::callback_mut(move |ev| {
    ///     if ev.kind == EventKind::Put {
    ///         println!("{} bytes from {}", ev.mlength, ev.initiator);
    ///     }
    ///     if ev.unlinked {
    ///         *keep.lock().unwrap() = ev.buffer.take();
    ///     }
    /// });
    /// ```
    pub fn callback_mut(f: impl Fn(&mut Event) + Send + Sync + 'static) -> Self {
        EventHandler::CallbackMut(Arc::new(f))
    }

    // Inlined into the pipe's delivery loop: one move of the (large)
    // event fewer per delivery.
    #[inline(always)]
    pub(crate) fn deliver(&self, mut ev: Event) {
        match self {
            EventHandler::None => {}
            EventHandler::Callback(f) => f(ev),
            EventHandler::Queue(q) => q.push(ev),
            EventHandler::CallbackMut(f) => f(&mut ev),
        }
    }
}

impl fmt::Debug for EventHandler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            EventHandler::None => "None",
            EventHandler::Callback(_) => "Callback",
            EventHandler::CallbackMut(_) => "CallbackMut",
            EventHandler::Queue(_) => "Queue",
        })
    }
}

#[derive(Default)]
struct QueueState {
    events: VecDeque<Event>,
    waker: Option<Waker>,
}

/// An event queue: many MDs may share one. Blocking reads for threads,
/// a [`futures_core::Stream`] for async code.
///
/// ```
/// use lnet::EventQueue;
/// use std::time::Duration;
/// let q = EventQueue::new();
/// assert!(q.recv_timeout(Duration::from_millis(1)).is_none());
/// ```
#[derive(Clone, Default)]
pub struct EventQueue {
    inner: Arc<(Mutex<QueueState>, Condvar)>,
}

impl EventQueue {
    /// An empty queue.
    pub fn new() -> Self {
        Self::default()
    }
    /// The handler that feeds this queue.
    pub fn handler(&self) -> EventHandler {
        EventHandler::Queue(self.clone())
    }
    fn push(&self, ev: Event) {
        let w = {
            let mut s = self.inner.0.lock().unwrap_or_else(|e| e.into_inner());
            s.events.push_back(ev);
            s.waker.take()
        };
        self.inner.1.notify_one();
        if let Some(w) = w {
            w.wake();
        }
    }
    /// The next event, if one is waiting.
    pub fn try_recv(&self) -> Option<Event> {
        self.inner
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .events
            .pop_front()
    }
    /// Number of waiting events.
    pub fn len(&self) -> usize {
        self.inner
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .events
            .len()
    }
    /// True when no event waits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Wait up to `timeout` for the next event.
    pub fn recv_timeout(&self, timeout: Duration) -> Option<Event> {
        let deadline = Instant::now() + timeout;
        let mut s = self.inner.0.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(e) = s.events.pop_front() {
                return Some(e);
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            s = self
                .inner
                .1
                .wait_timeout(s, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

impl futures_core::Stream for EventQueue {
    type Item = Event;
    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Event>> {
        let mut s = self.inner.0.lock().unwrap_or_else(|e| e.into_inner());
        match s.events.pop_front() {
            Some(e) => Poll::Ready(Some(e)),
            None => {
                s.waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}
