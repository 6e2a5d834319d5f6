//! [`Completion`]: how a send's outcome gets from the peer's driver back to whoever waits for
//! it, and [`CompletionRing`]: the slots a pipelined sender (a window) reuses for that, so a
//! send through it allocates nothing for its outcome.
//!
//! A lone send waits on a oneshot (one allocation). A window keeps up to its limit of sends
//! in flight, so it owns one ring of that many slots, allocated once: the driver writes an
//! outcome into the slot of the send's ticket and wakes the window only when that is the
//! send it waits for. A completion that is dropped unfulfilled (the driver went away) fills
//! its slot with `DomusClosed`, so no window waits forever.
//!
//! The ring's lock is held for one slot write or read, never across an `.await` (nothing here
//! awaits).

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Waker};

use tokio::sync::oneshot;

use super::{Outcome, domus_closed};

/// Where one send's outcome goes. Fulfilled once; dropped unfulfilled, it reports
/// `DomusClosed`.
pub(crate) struct Completion(Option<To>);

enum To {
    Oneshot(oneshot::Sender<Outcome>),
    Slot(Arc<CompletionRing>, u64),
    Single(Arc<Single>),
}

impl Completion {
    /// A completion read through `rx` (a [`Receipt`](crate::Receipt), for instance).
    pub(crate) fn oneshot() -> (Self, oneshot::Receiver<Outcome>) {
        let (tx, rx) = oneshot::channel();
        (Self(Some(To::Oneshot(tx))), rx)
    }

    /// The completion of the send with `ticket` in `ring`.
    pub(crate) fn slot(ring: Arc<CompletionRing>, ticket: u64) -> Self {
        Self(Some(To::Slot(ring, ticket)))
    }

    /// Hands `outcome` to whoever waits (nothing happens when nobody does any more).
    pub(crate) fn complete(mut self, outcome: Outcome) {
        if let Some(to) = self.0.take() {
            to.fulfil(outcome);
        }
    }

    /// Hands every outcome in `batch` to its waiter, in order, and leaves `batch` empty (to be
    /// reused). A run of outcomes for one ring (a window's sends, answered by one frame) takes
    /// that ring's lock once and wakes its window at most once, instead of once per send.
    pub(crate) fn complete_all(batch: &mut Vec<(Completion, Outcome)>) {
        let mut items = batch.drain(..).peekable();
        while let Some((mut done, outcome)) = items.next() {
            let Some(to) = done.0.take() else { continue };
            let (ring, ticket) = match to {
                To::Slot(ring, ticket) => (ring, ticket),
                other => {
                    other.fulfil(outcome);
                    continue;
                }
            };
            let wake = {
                let mut inner = ring.lock();
                let mut wake = inner.put(ticket, outcome);
                while items.peek().is_some_and(|(next, _)| next.is_slot_of(&ring)) {
                    let Some((mut next, outcome)) = items.next() else {
                        break;
                    };
                    if let Some(To::Slot(_, ticket)) = next.0.take()
                        && let Some(waker) = inner.put(ticket, outcome)
                    {
                        wake = Some(waker);
                    }
                }
                wake
            };
            if let Some(waker) = wake {
                waker.wake();
            }
        }
    }

    fn is_slot_of(&self, ring: &Arc<CompletionRing>) -> bool {
        matches!(&self.0, Some(To::Slot(r, _)) if Arc::ptr_eq(r, ring))
    }
}

impl To {
    fn fulfil(self, outcome: Outcome) {
        match self {
            To::Oneshot(tx) => {
                let _ = tx.send(outcome);
            }
            To::Slot(ring, ticket) => ring.complete(ticket, outcome),
            To::Single(single) => {
                let waker = {
                    let mut state = single.lock();
                    state.outcome = Some(outcome);
                    state.waker.take()
                };
                if let Some(waker) = waker {
                    waker.wake();
                }
            }
        }
    }
}

impl Drop for Completion {
    fn drop(&mut self) {
        if let Some(to) = self.0.take() {
            to.fulfil(Err(domus_closed()));
        }
    }
}

/// The completion of one send that its caller awaits by itself (a receipt's): one
/// allocation holding the outcome and the waiter's waker, taken from a small pool of this
/// thread's and given back to it when the receipt is dropped, so a steady stream of sends
/// allocates nothing for their outcomes. Given back only when nothing else holds it (the
/// driver dropped its completion): then no outcome of an earlier send can reach it.
pub(crate) struct SingleSlot(Option<Arc<Single>>);

/// What a [`SingleSlot`] and its completion share.
pub(crate) struct Single {
    state: Mutex<SingleState>,
}

#[derive(Default)]
struct SingleState {
    outcome: Option<Outcome>,
    waker: Option<Waker>,
}

impl Single {
    fn lock(&self) -> MutexGuard<'_, SingleState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Slots a thread keeps for reuse.
const SINGLE_POOL: usize = 256;

thread_local! {
    static SINGLES: std::cell::RefCell<Vec<Arc<Single>>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

impl SingleSlot {
    /// A slot and the completion that fills it.
    pub(crate) fn new() -> (Completion, SingleSlot) {
        let single = SINGLES
            .with(|pool| pool.borrow_mut().pop())
            .unwrap_or_else(|| {
                Arc::new(Single {
                    state: Mutex::new(SingleState::default()),
                })
            });
        (
            Completion(Some(To::Single(single.clone()))),
            SingleSlot(Some(single)),
        )
    }

    /// The outcome when it has come; otherwise `cx` is woken when it does.
    pub(crate) fn poll(&self, cx: &mut Context<'_>) -> std::task::Poll<Outcome> {
        let Some(single) = &self.0 else {
            return std::task::Poll::Ready(Err(domus_closed()));
        };
        let mut state = single.lock();
        if let Some(outcome) = state.outcome.take() {
            return std::task::Poll::Ready(outcome);
        }
        if !state
            .waker
            .as_ref()
            .is_some_and(|w| w.will_wake(cx.waker()))
        {
            state.waker = Some(cx.waker().clone());
        }
        std::task::Poll::Pending
    }
}

impl Drop for SingleSlot {
    fn drop(&mut self) {
        let Some(mut single) = self.0.take() else {
            return;
        };
        // Only this handle holds it: clear it and keep it for the thread's next send.
        if let Some(only) = Arc::get_mut(&mut single) {
            let state = only.state.get_mut().unwrap_or_else(PoisonError::into_inner);
            *state = SingleState::default();
            SINGLES.with(|pool| {
                let mut pool = pool.borrow_mut();
                if pool.len() < SINGLE_POOL {
                    pool.push(single);
                }
            });
        }
    }
}

/// The outcome slots of one window, one per send it may have in flight.
pub(crate) struct CompletionRing {
    inner: Mutex<Ring>,
}

struct Ring {
    /// Slot `ticket % len` holds the outcome of `ticket`, with the ticket (a slot can still
    /// hold the outcome of a send whose taker was dropped; it is never handed to another).
    slots: Vec<Option<(u64, Outcome)>>,
    /// The ticket the window waits for, and its waker.
    waiting: Option<(u64, Waker)>,
}

impl std::fmt::Debug for CompletionRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CompletionRing").finish_non_exhaustive()
    }
}

impl CompletionRing {
    /// A ring for at most `capacity` sends in flight at once (at least one).
    pub(crate) fn new(capacity: usize) -> Self {
        let mut slots = Vec::new();
        slots.resize_with(capacity.max(1), || None);
        Self {
            inner: Mutex::new(Ring {
                slots,
                waiting: None,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Ring> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn complete(&self, ticket: u64, outcome: Outcome) {
        let wake = self.lock().put(ticket, outcome);
        if let Some(waker) = wake {
            waker.wake();
        }
    }

    /// The outcome of `ticket` when it has come; otherwise remembers `cx` to be woken when it
    /// does.
    #[cfg(test)]
    pub(crate) fn poll_take(&self, ticket: u64, cx: &mut Context<'_>) -> std::task::Poll<Outcome> {
        let mut taker = self.taker();
        match taker.take(ticket) {
            Some(outcome) => std::task::Poll::Ready(outcome),
            None => {
                taker.wait_for(ticket, cx);
                std::task::Poll::Pending
            }
        }
    }

    /// The ring locked for taking outcomes: a window takes the one it waits for and, under the
    /// same lock, those of the sends behind it that have come too. Dropped at once (never held
    /// across an `.await`).
    pub(crate) fn taker(&self) -> Taker<'_> {
        Taker(self.lock())
    }

    /// How many sends the ring has slots for.
    #[cfg(test)]
    fn capacity(&self) -> usize {
        self.lock().slots.len()
    }
}

/// See [`CompletionRing::taker`].
pub(crate) struct Taker<'a>(MutexGuard<'a, Ring>);

impl Taker<'_> {
    /// The outcome of `ticket`, when it has come.
    pub(crate) fn take(&mut self, ticket: u64) -> Option<Outcome> {
        let at = self.0.index(ticket);
        let slot = self.0.slots.get_mut(at)?;
        if slot.as_ref().is_some_and(|(t, _)| *t == ticket) {
            slot.take().map(|(_, outcome)| outcome)
        } else {
            None
        }
    }

    /// Wakes `cx` when the outcome of `ticket` comes.
    pub(crate) fn wait_for(&mut self, ticket: u64, cx: &mut Context<'_>) {
        match &mut self.0.waiting {
            Some((t, waker)) if *t == ticket && waker.will_wake(cx.waker()) => {}
            waiting => *waiting = Some((ticket, cx.waker().clone())),
        }
    }
}

impl Ring {
    /// Stores the outcome of `ticket`; the window's waker when it waits for that one.
    fn put(&mut self, ticket: u64, outcome: Outcome) -> Option<Waker> {
        let at = self.index(ticket);
        if let Some(slot) = self.slots.get_mut(at) {
            *slot = Some((ticket, outcome));
        }
        match self.waiting.take() {
            Some((t, waker)) if t == ticket => Some(waker),
            other => {
                self.waiting = other;
                None
            }
        }
    }

    fn index(&self, ticket: u64) -> usize {
        let len = u64::try_from(self.slots.len()).unwrap_or(u64::MAX).max(1);
        usize::try_from(ticket.checked_rem(len).unwrap_or(0)).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::Delivery;
    use crate::runtime::test_wakers::{Counter, park_for_wake, unpark_current};
    use std::sync::atomic::Ordering;
    use std::task::Poll;

    #[test]
    fn outcomes_reach_their_ticket_only_and_the_waiter_is_woken_once_for_its_own() {
        let ring = Arc::new(CompletionRing::new(2));
        let (wakes, waker) = Counter::waker();
        let mut cx = Context::from_waker(&waker);
        assert!(ring.poll_take(0, &mut cx).is_pending());
        // Ticket 1 completes first: no wake (the window waits for 0), kept for later.
        Completion::slot(ring.clone(), 1).complete(Ok(Delivery::Accepted));
        assert_eq!(wakes.count(), 0);
        Completion::slot(ring.clone(), 0).complete(Ok(Delivery::Replied("r".into())));
        assert_eq!(wakes.count(), 1);
        assert_eq!(
            ring.poll_take(0, &mut cx),
            Poll::Ready(Ok(Delivery::Replied("r".into())))
        );
        assert_eq!(
            ring.poll_take(1, &mut cx),
            Poll::Ready(Ok(Delivery::Accepted))
        );
        // Ticket 2 shares slot 0 with ticket 0 and never sees a stale outcome of another.
        Completion::slot(ring.clone(), 4).complete(Ok(Delivery::Accepted));
        assert!(ring.poll_take(2, &mut cx).is_pending());
        // Dropped unfulfilled: the waiter hears that the domus closed.
        drop(Completion::slot(ring.clone(), 2));
        match ring.poll_take(2, &mut cx) {
            Poll::Ready(Err(e)) => assert_eq!(e.id(), crate::ErrorId::DomusClosed),
            other => panic!("{other:?}"),
        }
        assert_eq!(ring.capacity(), 2);
    }

    #[test]
    fn a_single_slot_is_reused_by_the_thread_only_once_nothing_else_holds_it() {
        let (wakes, waker) = Counter::waker();
        let mut cx = Context::from_waker(&waker);
        let (done, slot) = SingleSlot::new();
        let first = slot.0.clone().expect("slot");
        assert!(slot.poll(&mut cx).is_pending());
        done.complete(Ok(Delivery::Accepted));
        assert_eq!(wakes.count(), 1);
        assert_eq!(slot.poll(&mut cx), Poll::Ready(Ok(Delivery::Accepted)));
        drop(first);
        drop(slot);
        // The next send on this thread takes the same ring, cleared.
        let (done, slot) = SingleSlot::new();
        let again = slot.0.clone().expect("slot");
        assert!(
            slot.poll(&mut cx).is_pending(),
            "no outcome of the last send"
        );
        // A receipt dropped while the driver still holds its completion is not reused: the
        // late outcome lands in a ring nobody will take from the pool.
        drop(slot);
        let (_other_done, other) = SingleSlot::new();
        assert!(
            !Arc::ptr_eq(other.0.as_ref().expect("slot"), &again),
            "a ring the driver still holds is not handed out again"
        );
        done.complete(Ok(Delivery::Replied("late".into())));
        assert!(other.poll(&mut cx).is_pending());
    }

    #[test]
    fn a_batch_fills_each_ring_and_oneshot_in_order_and_wakes_each_window_once() {
        let (a, b) = (
            Arc::new(CompletionRing::new(8)),
            Arc::new(CompletionRing::new(8)),
        );
        let ((wakes_a, waker_a), (wakes_b, waker_b)) = (Counter::waker(), Counter::waker());
        let (mut cx_a, mut cx_b) = (Context::from_waker(&waker_a), Context::from_waker(&waker_b));
        assert!(a.poll_take(2, &mut cx_a).is_pending());
        assert!(b.poll_take(0, &mut cx_b).is_pending());
        let (lone, mut lone_rx) = Completion::oneshot();
        let replied = |n: u8| Ok(Delivery::Replied(vec![n].into()));
        let mut batch = vec![
            (Completion::slot(a.clone(), 0), replied(0)),
            (Completion::slot(a.clone(), 1), replied(1)),
            (Completion::slot(a.clone(), 2), replied(2)),
            (lone, replied(9)),
            (Completion::slot(a.clone(), 3), replied(3)),
            (Completion::slot(b.clone(), 0), replied(10)),
            (Completion::slot(b.clone(), 1), replied(11)),
        ];
        Completion::complete_all(&mut batch);
        assert!(batch.is_empty());
        assert_eq!(wakes_a.count(), 1, "a waited for ticket 2");
        assert_eq!(wakes_b.count(), 1, "b waited for ticket 0");
        assert_eq!(
            lone_rx.try_recv().expect("the oneshot's outcome"),
            replied(9)
        );
        let mut taker = a.taker();
        for n in 0..4u8 {
            assert_eq!(taker.take(u64::from(n)), Some(replied(n)), "ticket {n}");
        }
        assert_eq!(taker.take(4), None, "nothing came for ticket 4");
        drop(taker);
        assert_eq!(b.poll_take(1, &mut cx_b), Poll::Ready(replied(11)));
        assert_eq!(b.poll_take(0, &mut cx_b), Poll::Ready(replied(10)));
        // An outcome for a ticket that is not in its slot any more is never handed to another.
        let mut batch = vec![(Completion::slot(a.clone(), 12), replied(12))];
        Completion::complete_all(&mut batch);
        assert_eq!(a.taker().take(4), None, "slot 4 holds ticket 12, not 4");
        assert_eq!(a.taker().take(12), Some(replied(12)));
    }

    #[test]
    fn a_window_on_one_thread_gets_every_outcome_a_driver_on_another_writes() {
        const SENDS: u64 = 200_000;
        const LIMIT: u64 = 64;
        let ring = Arc::new(CompletionRing::new(LIMIT as usize));
        // The window may run at most LIMIT tickets ahead of what it took.
        let taken = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let driver = {
            let (ring, taken) = (ring.clone(), taken.clone());
            std::thread::spawn(move || {
                for ticket in 0..SENDS {
                    while ticket >= taken.load(Ordering::Acquire) + LIMIT {
                        std::hint::spin_loop();
                    }
                    Completion::slot(ring.clone(), ticket)
                        .complete(Ok(Delivery::Replied(ticket.to_be_bytes().to_vec().into())));
                }
            })
        };
        let waker = unpark_current();
        let mut cx = Context::from_waker(&waker);
        for ticket in 0..SENDS {
            let outcome = loop {
                match ring.poll_take(ticket, &mut cx) {
                    Poll::Ready(outcome) => break outcome,
                    Poll::Pending => park_for_wake(format_args!("ticket {ticket}: the window")),
                }
            };
            assert_eq!(
                outcome,
                Ok(Delivery::Replied(ticket.to_be_bytes().to_vec().into())),
                "ticket {ticket}"
            );
            taken.store(ticket + 1, Ordering::Release);
        }
        driver.join().expect("driver thread");
    }
}
