//! Wakers for the runtime's unit tests (test builds only): one that counts its wake-ups and
//! one that unparks a thread, for checking who is woken how often and that no wake-up is lost
//! between two threads. Nothing here runs outside tests.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Wake, Waker};

/// Counts its wake-ups.
pub(crate) struct Counter(AtomicUsize);

impl Counter {
    /// A counter at zero and a waker that counts into it.
    pub(crate) fn waker() -> (Arc<Self>, Waker) {
        let counter = Arc::new(Self(AtomicUsize::new(0)));
        (counter.clone(), Waker::from(counter))
    }

    /// Wake-ups so far.
    pub(crate) fn count(&self) -> usize {
        self.0.load(Ordering::Relaxed)
    }
}

impl Wake for Counter {
    fn wake(self: Arc<Self>) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

/// A waker that unparks the thread that made it.
pub(crate) fn unpark_current() -> Waker {
    Waker::from(Arc::new(Unpark(std::thread::current())))
}

struct Unpark(std::thread::Thread);

impl Wake for Unpark {
    fn wake(self: Arc<Self>) {
        self.0.unpark();
    }
}

/// Parks this thread until a wake-up (from [`unpark_current`]'s waker) comes. A lost
/// wake-up would park for good: past 4 s it fails the test with `what` instead of hanging.
pub(crate) fn park_for_wake(what: impl std::fmt::Display) {
    let parked = std::time::Instant::now();
    std::thread::park_timeout(std::time::Duration::from_secs(5));
    assert!(
        parked.elapsed() < std::time::Duration::from_secs(4),
        "{what}: never woken"
    );
}
