//! A one-shot slot: a value delivered once, consumed by a blocking wait, a
//! future or a callback. Used for deliveries the core decides later (lazy
//! portals).

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Condvar, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

type Callback<T> = Box<dyn FnOnce(T) + Send>;

enum State<T> {
    Empty,
    Waker(Waker),
    Callback(Callback<T>),
    Ready(T),
    Done,
}

pub(crate) struct Slot<T> {
    state: Mutex<State<T>>,
    cv: Condvar,
}

impl<T: Send + 'static> Slot<T> {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Slot {
            state: Mutex::new(State::Empty),
            cv: Condvar::new(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State<T>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Deliver the value (at most once; a second call is ignored).
    pub(crate) fn fire(&self, v: T) {
        let mut s = self.lock();
        match std::mem::replace(&mut *s, State::Done) {
            State::Callback(f) => {
                drop(s);
                f(v);
            }
            State::Waker(w) => {
                *s = State::Ready(v);
                drop(s);
                self.cv.notify_all();
                w.wake();
            }
            State::Empty => {
                *s = State::Ready(v);
                drop(s);
                self.cv.notify_all();
            }
            other @ (State::Ready(_) | State::Done) => *s = other,
        }
    }

    pub(crate) fn on_ready(&self, f: impl FnOnce(T) + Send + 'static) {
        let mut s = self.lock();
        match std::mem::replace(&mut *s, State::Done) {
            State::Ready(v) => {
                drop(s);
                f(v);
            }
            State::Done => {}
            _ => *s = State::Callback(Box::new(f)),
        }
    }

    pub(crate) fn wait_timeout(&self, d: Duration) -> Option<T> {
        let deadline = Instant::now() + d;
        let mut s = self.lock();
        loop {
            if let State::Ready(_) = &*s {
                if let State::Ready(v) = std::mem::replace(&mut *s, State::Done) {
                    return Some(v);
                }
            }
            let now = Instant::now();
            if now >= deadline || matches!(&*s, State::Done) {
                return None;
            }
            s = self
                .cv
                .wait_timeout(s, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    pub(crate) fn poll(&self, cx: &mut Context<'_>) -> Poll<Option<T>> {
        let mut s = self.lock();
        match std::mem::replace(&mut *s, State::Done) {
            State::Ready(v) => Poll::Ready(Some(v)),
            State::Done => Poll::Ready(None),
            _ => {
                *s = State::Waker(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

/// Future over a slot.
pub(crate) struct SlotFuture<T>(pub(crate) Arc<Slot<T>>);

impl<T: Send + 'static> Future for SlotFuture<T> {
    type Output = Option<T>;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<T>> {
        self.0.poll(cx)
    }
}
