//! [`InFlightBudget`]: a peer's in-flight budget — messages and payload bytes — taken by a send
//! before it goes to the driver and given back when it ends.
//!
//! One atomic word holds both counts, so the uncontended path (a send that fits, an answer
//! that frees room) is one compare-and-swap or one add, with no lock: the two tokio semaphores
//! it replaces each took a mutex on every release. Waiters are served in arrival order (a
//! large message is never starved by small ones behind it): while anyone waits, newcomers
//! queue too, and each release wakes the front of the queue, which takes its room or keeps
//! waiting. The queue's lock is held only to push, pop or wake, never across an `.await`.
//!
//! The peer's driver can turn away everyone waiting at once ([`InFlightBudget::refuse_waiting`]:
//! the peer shut down, so no room they wait for will be of use); sends that start waiting
//! afterwards wait as usual.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Waker};

use crate::error::Error;

/// Free slots in the high half, free bytes in the low half.
const SLOT: u64 = 1 << 32;
const BYTES: u64 = SLOT - 1;

/// See the module docs.
pub(crate) struct InFlightBudget {
    free: AtomicU64,
    /// Sends queued for room (mirrors `queue.len()`, read without the lock).
    waiting: AtomicUsize,
    queue: Mutex<Queue>,
}

#[derive(Default)]
struct Queue {
    next_ticket: u64,
    waiters: VecDeque<(u64, Option<Waker>)>,
    /// The last [`InFlightBudget::refuse_waiting`]: every ticket below this one was turned
    /// away (an earlier refusal's tickets get this one's reason if they were not polled since).
    refused: Option<(u64, Error)>,
}

/// Sends' share of the budget — a slot each and their payloads' bytes — given back on
/// drop. Usually one send's; a batch takes one for all its sends, and the driver
/// [splits](InFlight::split) it into each send's, and [merges](InFlight::merge) the shares
/// of sends that ended in one turn, to give them back in one step.
pub(crate) struct InFlight {
    budget: Arc<InFlightBudget>,
    slots: u32,
    bytes: u32,
}

impl InFlight {
    /// Takes one slot and `bytes` out of this share (a batch's) as a share of its own: one
    /// send of the batch. What this share does not hold is not taken.
    pub(crate) fn split(&mut self, bytes: u32) -> InFlight {
        let slots = self.slots.min(1);
        let bytes = bytes.min(self.bytes);
        self.slots = self.slots.saturating_sub(slots);
        self.bytes = self.bytes.saturating_sub(bytes);
        InFlight {
            budget: self.budget.clone(),
            slots,
            bytes,
        }
    }

    /// Adds `other` (a share of the same budget) to this one: both are given back together.
    /// A share of another budget is given back at once.
    pub(crate) fn merge(&mut self, mut other: InFlight) {
        if !Arc::ptr_eq(&self.budget, &other.budget) {
            return;
        }
        self.slots = self.slots.saturating_add(std::mem::take(&mut other.slots));
        self.bytes = self.bytes.saturating_add(std::mem::take(&mut other.bytes));
    }

    /// An empty share of `budget`, to merge others into.
    pub(crate) fn none(budget: &Arc<InFlightBudget>) -> InFlight {
        InFlight {
            budget: budget.clone(),
            slots: 0,
            bytes: 0,
        }
    }

    /// Gives back what this share holds now (it holds nothing after).
    pub(crate) fn release_now(&mut self) {
        let (slots, bytes) = (
            std::mem::take(&mut self.slots),
            std::mem::take(&mut self.bytes),
        );
        self.budget.release(slots, bytes);
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.release_now();
    }
}

impl InFlightBudget {
    /// A budget of `slots` messages and `bytes` payload bytes.
    pub(crate) fn new(slots: u32, bytes: u32) -> Arc<Self> {
        Arc::new(Self {
            free: AtomicU64::new((u64::from(slots) << 32) | u64::from(bytes)),
            waiting: AtomicUsize::new(0),
            queue: Mutex::new(Queue::default()),
        })
    }

    /// Takes one slot and `bytes` if they are free and nobody is queued for room.
    pub(crate) fn try_take(self: &Arc<Self>, bytes: u32) -> Option<InFlight> {
        self.try_take_many(1, bytes)
    }

    /// Takes `slots` slots and `bytes` in one step (a batch of sends) if they are all free
    /// and nobody is queued for room.
    pub(crate) fn try_take_many(self: &Arc<Self>, slots: u32, bytes: u32) -> Option<InFlight> {
        if self.waiting.load(Ordering::Acquire) > 0 {
            return None;
        }
        self.take_now_many(slots, bytes)
    }

    /// Waits (in arrival order) until one slot and `bytes` are free, and takes them; fails
    /// with the refusal if [`refuse_waiting`](Self::refuse_waiting) turns it away first. The
    /// future may be dropped at any time (a deadline): it leaves the queue then.
    pub(crate) fn take(self: &Arc<Self>, bytes: u32) -> Take {
        Take {
            budget: self.clone(),
            bytes,
            ticket: None,
        }
    }

    /// Turns away every send waiting for room now: each ends at once with `why`. Sends that
    /// start waiting after this call wait as usual.
    pub(crate) fn refuse_waiting(&self, why: Error) {
        let mut queue = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
        if queue.waiters.is_empty() {
            return;
        }
        queue.refused = Some((queue.next_ticket, why));
        let refused = queue.waiters.len();
        for (_, waker) in queue.waiters.drain(..) {
            if let Some(waker) = waker {
                waker.wake();
            }
        }
        self.waiting.fetch_sub(refused, Ordering::AcqRel);
    }

    fn take_now(self: &Arc<Self>, bytes: u32) -> Option<InFlight> {
        self.take_now_many(1, bytes)
    }

    fn take_now_many(self: &Arc<Self>, slots: u32, bytes: u32) -> Option<InFlight> {
        let need = (u64::from(slots) << 32) | u64::from(bytes);
        let mut current = self.free.load(Ordering::Acquire);
        loop {
            if current >> 32 < u64::from(slots) || (current & BYTES) < u64::from(bytes) {
                return None;
            }
            match self.free.compare_exchange_weak(
                current,
                current.wrapping_sub(need),
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => {
                    return Some(InFlight {
                        budget: self.clone(),
                        slots,
                        bytes,
                    });
                }
                Err(actual) => current = actual,
            }
        }
    }

    fn release(&self, slots: u32, bytes: u32) {
        if slots == 0 && bytes == 0 {
            return;
        }
        self.free.fetch_add(
            (u64::from(slots) << 32) | u64::from(bytes),
            Ordering::AcqRel,
        );
        if self.waiting.load(Ordering::Acquire) > 0 {
            self.wake_front();
        }
    }

    fn wake_front(&self) {
        let queue = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((_, Some(waker))) = queue.waiters.front() {
            waker.wake_by_ref();
        }
    }
}

/// The future of [`InFlightBudget::take`].
pub(crate) struct Take {
    budget: Arc<InFlightBudget>,
    bytes: u32,
    /// Its place in the queue, once it had to wait.
    ticket: Option<u64>,
}

impl Future for Take {
    type Output = Result<InFlight, Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        let budget = &this.budget;
        let Some(ticket) = this.ticket else {
            // First poll: take at once when nobody waits and it fits; else queue.
            if let Some(taken) = budget.try_take(this.bytes) {
                return Poll::Ready(Ok(taken));
            }
            let mut queue = budget.queue.lock().unwrap_or_else(PoisonError::into_inner);
            let ticket = queue.next_ticket;
            queue.next_ticket = ticket.wrapping_add(1);
            queue.waiters.push_back((ticket, Some(cx.waker().clone())));
            budget.waiting.fetch_add(1, Ordering::AcqRel);
            this.ticket = Some(ticket);
            drop(queue);
            // Room may have come back between the check and the queueing.
            budget.wake_front();
            return Poll::Pending;
        };
        let mut queue = budget.queue.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((below, why)) = &queue.refused
            && ticket < *below
        {
            // Turned away (and already out of the queue).
            this.ticket = None;
            return Poll::Ready(Err(why.clone()));
        }
        let front = queue.waiters.front().map(|(t, _)| *t) == Some(ticket);
        if front && let Some(taken) = budget.take_now(this.bytes) {
            queue.waiters.pop_front();
            budget.waiting.fetch_sub(1, Ordering::AcqRel);
            this.ticket = None;
            // The next one may fit too.
            if let Some((_, Some(next))) = queue.waiters.front() {
                next.wake_by_ref();
            }
            return Poll::Ready(Ok(taken));
        }
        if let Some(entry) = queue.waiters.iter_mut().find(|(t, _)| *t == ticket) {
            entry.1 = Some(cx.waker().clone());
        }
        Poll::Pending
    }
}

impl Drop for Take {
    fn drop(&mut self) {
        let Some(ticket) = self.ticket else {
            return;
        };
        let budget = &self.budget;
        let mut queue = budget.queue.lock().unwrap_or_else(PoisonError::into_inner);
        let was_front = queue.waiters.front().map(|(t, _)| *t) == Some(ticket);
        if let Some(at) = queue.waiters.iter().position(|(t, _)| *t == ticket) {
            queue.waiters.remove(at);
            budget.waiting.fetch_sub(1, Ordering::AcqRel);
        }
        if was_front && let Some((_, Some(next))) = queue.waiters.front() {
            next.wake_by_ref();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorId;
    use std::time::Duration;

    #[test]
    fn sends_that_fit_take_and_give_back_without_waiting() {
        let b = InFlightBudget::new(2, 100);
        let one = b.try_take(60).expect("fits");
        assert!(b.try_take(41).is_none(), "bytes are short");
        let two = b.try_take(40).expect("fits exactly");
        assert!(b.try_take(0).is_none(), "slots are short");
        drop(one);
        assert!(b.try_take(60).is_some(), "given back");
        drop(two);
    }

    #[test]
    fn a_batch_takes_its_room_in_one_step_and_its_sends_give_it_back_together() {
        let b = InFlightBudget::new(8, 1000);
        assert!(b.try_take_many(9, 0).is_none(), "more slots than there are");
        assert!(
            b.try_take_many(2, 1001).is_none(),
            "more bytes than there are"
        );
        let mut batch = b.try_take_many(5, 500).expect("fits");
        assert!(b.try_take_many(4, 0).is_none(), "three slots left");
        let sends: Vec<InFlight> = (0..5).map(|_| batch.split(100)).collect();
        assert!(sends.iter().all(|s| s.slots == 1 && s.bytes == 100));
        assert_eq!((batch.slots, batch.bytes), (0, 0), "all handed out");
        drop(batch);
        assert!(
            b.try_take_many(4, 0).is_none(),
            "an empty batch gives back nothing"
        );
        // The driver merges what ended in a turn and gives it back once.
        let mut ended = InFlight::none(&b);
        for s in sends {
            ended.merge(s);
        }
        assert!(
            b.try_take_many(4, 0).is_none(),
            "merged, not given back yet"
        );
        drop(ended);
        assert!(b.try_take_many(8, 1000).is_some(), "everything given back");
    }

    #[tokio::test(start_paused = true)]
    async fn waiters_are_served_in_arrival_order_and_a_dropped_one_leaves_the_queue() {
        let b = InFlightBudget::new(4, 100);
        let held = b.try_take(100).expect("all the bytes");
        // A large waiter first, then a small one: the small one must not overtake.
        let large = tokio::spawn({
            let b = b.clone();
            async move { b.take(80).await }
        });
        tokio::time::sleep(Duration::from_millis(1)).await;
        let small = tokio::spawn({
            let b = b.clone();
            async move { b.take(10).await }
        });
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert!(b.try_take(1).is_none(), "no barging past the queue");
        // A waiter that gives up (its deadline) leaves without blocking the others.
        let quitter = {
            let b = b.clone();
            tokio::time::timeout(Duration::from_millis(5), async move { b.take(1).await })
        };
        assert!(quitter.await.is_err());
        drop(held);
        let large = tokio::time::timeout(Duration::from_secs(1), large)
            .await
            .expect("the large one first")
            .expect("join")
            .expect("room");
        let small = tokio::time::timeout(Duration::from_secs(1), small)
            .await
            .expect("then the small one")
            .expect("join")
            .expect("room");
        assert_eq!(b.waiting.load(Ordering::Acquire), 0);
        drop((large, small));
        assert!(b.try_take(100).is_some(), "everything given back");
    }

    #[tokio::test(start_paused = true)]
    async fn refused_waiters_end_at_once_and_later_ones_wait_as_usual() {
        let b = InFlightBudget::new(1, 100);
        let held = b.try_take(0).expect("the only slot");
        let waiters: Vec<_> = (0..3)
            .map(|_| {
                let b = b.clone();
                tokio::spawn(async move { b.take(1).await })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert_eq!(b.waiting.load(Ordering::Acquire), 3);
        // The room comes back as the refusal happens (one turn of the peer's driver): the
        // waiters are turned away all the same, the front one included.
        drop(held);
        b.refuse_waiting(Error::new(ErrorId::PeerShutDown, "the peer shut down"));
        assert_eq!(b.waiting.load(Ordering::Acquire), 0);
        for w in waiters {
            let e = tokio::time::timeout(Duration::from_secs(1), w)
                .await
                .expect("ends at once")
                .expect("join")
                .map(drop)
                .expect_err("turned away");
            assert_eq!(e.id(), ErrorId::PeerShutDown);
        }
        // A send that waits after the refusal waits for room, and gets it.
        let held = b.try_take(0).expect("the slot is free again");
        let later = tokio::spawn({
            let b = b.clone();
            async move { b.take(1).await }
        });
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert!(!later.is_finished(), "it waits for room");
        drop(held);
        let taken = tokio::time::timeout(Duration::from_secs(1), later)
            .await
            .expect("room came back")
            .expect("join")
            .expect("not turned away");
        drop(taken);
        assert!(b.try_take(100).is_some(), "everything given back");
    }
}
