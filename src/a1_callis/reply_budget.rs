//! The reply bytes a domus keeps so an answer survives a reconnect, counted once for all its
//! sessions. A receiver keeps each reply until the sender's DONE_BELOW says it was seen; this
//! budget bounds what all peers together can make it keep, so memory does not grow with the
//! number of peers times a per-peer allowance. A reply that does not fit is still sent; it is
//! only not kept (a duplicate of it is answered `ReplyLost`).
//!
//! Pure: two atomics, no clock, no I/O. It must not block: a session asks and is told at once.

use std::sync::atomic::{AtomicUsize, Ordering};

/// A shared allowance of retained reply bytes. Sessions take from it when they keep a reply
/// and give back when they forget one (or are dropped).
#[derive(Debug)]
pub struct ReplyBudget {
    cap: AtomicUsize,
    used: AtomicUsize,
}

impl ReplyBudget {
    /// A budget of `cap` bytes.
    pub fn new(cap: usize) -> Self {
        Self {
            cap: AtomicUsize::new(cap),
            used: AtomicUsize::new(0),
        }
    }

    /// Changes the cap. Bytes already kept stay kept; a lower cap only refuses new ones until
    /// enough are given back.
    pub fn set_cap(&self, cap: usize) {
        self.cap.store(cap, Ordering::Relaxed);
    }

    /// The cap.
    pub fn cap(&self) -> usize {
        self.cap.load(Ordering::Relaxed)
    }

    /// The bytes kept now, by every session sharing this budget.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    /// Takes `bytes` if they fit under the cap; `false` (and nothing taken) if not.
    pub(crate) fn try_take(&self, bytes: usize) -> bool {
        let cap = self.cap();
        self.used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |used| {
                used.checked_add(bytes).filter(|&next| next <= cap)
            })
            .is_ok()
    }

    /// Gives back `bytes` taken before.
    pub(crate) fn give_back(&self, bytes: usize) {
        let _ = self
            .used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |used| {
                Some(used.saturating_sub(bytes))
            });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn takes_what_fits_gives_back_and_follows_a_new_cap() {
        let b = ReplyBudget::new(10);
        assert!(b.try_take(6));
        assert!(!b.try_take(5), "6 + 5 is over 10");
        assert!(b.try_take(4));
        assert_eq!(b.used(), 10);
        b.give_back(6);
        assert_eq!(b.used(), 4);
        b.set_cap(3);
        assert!(!b.try_take(1), "4 kept is already over the new cap");
        b.give_back(4);
        assert!(b.try_take(3));
        assert!(!b.try_take(usize::MAX), "no overflow");
        b.give_back(usize::MAX);
        assert_eq!(b.used(), 0);
    }
}
