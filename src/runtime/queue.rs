//! [`WakeQueue`]: how sends and answers reach a peer's driver in batches.
//!
//! Many producers (sending tasks, handlers answering) push; the one driver takes everything
//! pushed so far in one swap. The driver is woken only when the queue goes from empty to
//! non-empty, so a burst of a thousand answers costs one wake-up, not a thousand. The lock is
//! held for a push or a swap, never across an `.await` (nothing here awaits).
//!
//! Bounded by its producers: sends hold in-flight room (the peer's budget), answers belong to
//! deliveries inside the peer's dedupe window.

use std::sync::{Mutex, PoisonError};
use std::task::{Context, Waker};

/// See the module docs.
pub(crate) struct WakeQueue<T> {
    inner: Mutex<Inner<T>>,
}

struct Inner<T> {
    items: Vec<T>,
    /// The driver's waker, from the last time it found the queue empty.
    waker: Option<Waker>,
    closed: bool,
}

impl<T> Default for WakeQueue<T> {
    fn default() -> Self {
        Self {
            inner: Mutex::new(Inner {
                items: Vec::new(),
                waker: None,
                closed: false,
            }),
        }
    }
}

impl<T> WakeQueue<T> {
    /// Queues `item` for the driver, waking it if the queue was empty. Gives the item back
    /// when the driver is gone.
    pub(crate) fn push(&self, item: T) -> Result<(), T> {
        let wake = {
            let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
            if inner.closed {
                return Err(item);
            }
            inner.items.push(item);
            if inner.items.len() == 1 {
                inner.waker.clone()
            } else {
                None
            }
        };
        if let Some(waker) = wake {
            waker.wake();
        }
        Ok(())
    }

    /// Moves everything queued into `out` (which the caller drains and reuses); when nothing
    /// was queued, remembers `cx`'s waker for the next push.
    pub(crate) fn take_all(&self, out: &mut Vec<T>, cx: &mut Context<'_>) {
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        if inner.items.is_empty() {
            if !inner
                .waker
                .as_ref()
                .is_some_and(|w| w.will_wake(cx.waker()))
            {
                inner.waker = Some(cx.waker().clone());
            }
            return;
        }
        std::mem::swap(&mut inner.items, out);
    }

    /// Closes the queue if nothing is queued (pushes fail from then on, and the pusher gets
    /// its item back to hand elsewhere); false, and still open, when something is.
    pub(crate) fn close_if_empty(&self) -> bool {
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        if !inner.items.is_empty() {
            return false;
        }
        inner.closed = true;
        inner.waker = None;
        true
    }

    /// Whether nothing is queued.
    pub(crate) fn is_empty(&self) -> bool {
        self.inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .items
            .is_empty()
    }

    /// The driver is gone: pushes fail from now on, and what was queued is returned (to be
    /// failed by the caller).
    pub(crate) fn close(&self) -> Vec<T> {
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        inner.closed = true;
        inner.waker = None;
        std::mem::take(&mut inner.items)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::Wake;

    struct Counter(AtomicUsize);

    impl Wake for Counter {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    #[test]
    fn a_burst_wakes_the_driver_once_and_is_taken_in_one_swap() {
        let q = WakeQueue::default();
        let wakes = Arc::new(Counter(AtomicUsize::new(0)));
        let waker = Waker::from(wakes.clone());
        let mut cx = Context::from_waker(&waker);
        let mut out = Vec::new();
        q.take_all(&mut out, &mut cx);
        assert!(out.is_empty());
        for n in 0..1000 {
            q.push(n).expect("open");
        }
        assert_eq!(
            wakes.0.load(Ordering::Relaxed),
            1,
            "empty -> non-empty only"
        );
        q.take_all(&mut out, &mut cx);
        assert_eq!(out.len(), 1000);
        out.clear();
        q.take_all(&mut out, &mut cx);
        q.push(7).expect("open");
        assert_eq!(wakes.0.load(Ordering::Relaxed), 2);
        assert_eq!(q.close(), vec![7]);
        assert_eq!(q.push(8), Err(8), "closed");
    }
}
