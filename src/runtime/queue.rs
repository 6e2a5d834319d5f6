//! [`WakeQueue`]: how sends and answers reach a peer's driver in batches.
//!
//! Many producers (sending tasks, handlers answering) push; the one driver takes everything
//! pushed so far in one swap. A push wakes the driver only when the driver last found the
//! queue empty (it is waiting, or about to): a burst of a thousand answers costs one wake-up,
//! not a thousand, and a push while the driver is busy costs none — the driver takes again
//! until it finds the queue empty before it waits. The lock is held for a push or a swap,
//! never across an `.await` (nothing here awaits).
//!
//! Bounded by its producers: sends hold in-flight room (the peer's budget), answers belong to
//! deliveries inside the peer's dedupe window.

use std::sync::{Mutex, MutexGuard, PoisonError};
use std::task::{Context, Waker};

/// See the module docs.
pub(crate) struct WakeQueue<T> {
    inner: Mutex<Inner<T>>,
}

struct Inner<T> {
    items: Vec<T>,
    /// The driver's waker, from the last time it found the queue empty.
    waker: Option<Waker>,
    /// The driver found the queue empty and has not taken since: the next push wakes it.
    armed: bool,
    closed: bool,
}

impl<T> Default for WakeQueue<T> {
    fn default() -> Self {
        Self {
            inner: Mutex::new(Inner {
                items: Vec::new(),
                waker: None,
                armed: false,
                closed: false,
            }),
        }
    }
}

impl<T> WakeQueue<T> {
    /// Queues `item` for the driver, waking it if it found the queue empty the last time it
    /// looked. Gives the item back when the driver is gone.
    pub(crate) fn push(&self, item: T) -> Result<(), T> {
        let Some(mut inner) = self.open() else {
            return Err(item);
        };
        inner.items.push(item);
        Self::wake_if_armed(inner);
        Ok(())
    }

    /// Queues every item of `items` (which is left empty) under one lock, waking the driver
    /// at most once. Gives them back (still in `items`) when the driver is gone.
    pub(crate) fn push_many(&self, items: &mut Vec<T>) -> Result<(), ()> {
        if items.is_empty() {
            return Ok(());
        }
        let Some(mut inner) = self.open() else {
            return Err(());
        };
        if inner.items.is_empty() {
            std::mem::swap(&mut inner.items, items);
        } else {
            inner.items.append(items);
        }
        Self::wake_if_armed(inner);
        Ok(())
    }

    /// The queue, locked, unless the driver is gone.
    fn open(&self) -> Option<MutexGuard<'_, Inner<T>>> {
        let inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        (!inner.closed).then_some(inner)
    }

    /// After a push: wakes the driver (outside the lock) when it found the queue empty the
    /// last time it looked.
    fn wake_if_armed(mut inner: MutexGuard<'_, Inner<T>>) {
        let wake = if std::mem::take(&mut inner.armed) {
            inner.waker.clone()
        } else {
            None
        };
        drop(inner);
        if let Some(waker) = wake {
            waker.wake();
        }
    }

    /// Moves everything queued into `out` (which the caller drains and reuses); when nothing
    /// was queued, remembers `cx`'s waker for the next push.
    ///
    /// Pushes after a take that found something do not wake the driver: it must take again,
    /// until a take finds the queue empty, before it waits.
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
            inner.armed = true;
            return;
        }
        inner.armed = false;
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
    use crate::runtime::test_wakers::{Counter, park_for_wake, unpark_current};
    use std::sync::Arc;

    #[test]
    fn a_burst_wakes_the_driver_once_and_is_taken_in_one_swap() {
        let q = WakeQueue::default();
        let (wakes, waker) = Counter::waker();
        let mut cx = Context::from_waker(&waker);
        let mut out = Vec::new();
        q.take_all(&mut out, &mut cx);
        assert!(out.is_empty());
        for n in 0..1000 {
            q.push(n).expect("open");
        }
        assert_eq!(wakes.count(), 1, "empty -> non-empty only");
        q.take_all(&mut out, &mut cx);
        assert_eq!(out.len(), 1000);
        out.clear();
        q.take_all(&mut out, &mut cx);
        q.push(7).expect("open");
        assert_eq!(wakes.count(), 2);
        // A driver that took something is busy: pushes meanwhile wake nobody, and its next
        // take gets them; only a take that finds nothing arms the queue again.
        q.take_all(&mut out, &mut cx);
        assert_eq!(out, vec![7]);
        out.clear();
        q.push(8).expect("open");
        q.push(9).expect("open");
        assert_eq!(wakes.count(), 2, "the driver is busy");
        q.take_all(&mut out, &mut cx);
        assert_eq!(out, vec![8, 9]);
        out.clear();
        q.take_all(&mut out, &mut cx);
        q.push(10).expect("open");
        assert_eq!(wakes.count(), 3, "the driver waits again");
        assert_eq!(q.close(), vec![10]);
        assert_eq!(q.push(11), Err(11), "closed");
    }

    #[test]
    fn a_batch_pushed_at_once_wakes_the_driver_once_and_keeps_its_order() {
        let q = WakeQueue::default();
        let (wakes, waker) = Counter::waker();
        let mut cx = Context::from_waker(&waker);
        let mut out = Vec::new();
        q.take_all(&mut out, &mut cx);
        q.push(0).expect("open");
        let mut batch: Vec<u32> = (1..100).collect();
        q.push_many(&mut batch).expect("open");
        assert!(batch.is_empty());
        assert_eq!(wakes.count(), 1, "one wake for the push and the batch");
        q.take_all(&mut out, &mut cx);
        assert_eq!(out, (0..100).collect::<Vec<_>>());
        out.clear();
        q.take_all(&mut out, &mut cx);
        let mut batch = vec![7, 8];
        q.push_many(&mut batch).expect("open");
        assert_eq!(wakes.count(), 2);
        drop(q.close());
        let mut batch = vec![9];
        assert!(q.push_many(&mut batch).is_err());
        assert_eq!(batch, vec![9], "given back");
    }

    #[test]
    fn a_driver_on_another_thread_that_takes_until_empty_gets_every_item_in_order() {
        const ITEMS: u64 = 200_000;
        let q = Arc::new(WakeQueue::default());
        let producer = {
            let q = q.clone();
            std::thread::spawn(move || {
                for n in 0..ITEMS {
                    q.push(n).expect("open");
                    // Now and then the driver runs dry and waits.
                    if n % 5_000 == 0 {
                        std::thread::sleep(std::time::Duration::from_millis(1));
                    }
                }
            })
        };
        let waker = unpark_current();
        let mut cx = Context::from_waker(&waker);
        let (mut out, mut next) = (Vec::new(), 0u64);
        while next < ITEMS {
            q.take_all(&mut out, &mut cx);
            if out.is_empty() {
                // Found empty, so armed: the next push must wake this thread.
                park_for_wake(format_args!("item {next}: the driver"));
                continue;
            }
            for n in out.drain(..) {
                assert_eq!(n, next, "in push order");
                next += 1;
            }
        }
        producer.join().expect("producer thread");
    }
}
