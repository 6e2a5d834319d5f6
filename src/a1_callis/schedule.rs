//! [`Schedule`]: which queued message a session writes next. A2 (service) messages go before
//! A3 (application) ones, but while an A3 message waits, one goes after every [`A3_AGING`] A2
//! messages in a row, so a flood of A2 delays A3 and never starves it (T20); FIFO within a
//! class; never an id at or past the end of the peer's window.
//!
//! Invariants: each class queue holds ids in strictly increasing order (ids are queued in the
//! order the session hands them out, and after a cut the session queues everything it
//! retains again in id order), so the front of a queue is its oldest id and the window test
//! looks at the fronts only. `a2_streak` counts the A2 ids taken in a row while an A3 id was
//! ready, and never exceeds [`A3_AGING`]: once it is reached, the next pick is A3.
//!
//! The queues may hold ids that finished since they were queued (answered, expired,
//! cancelled): the session skips them when they come up, so finishing a message costs
//! nothing here. Pure: no IO, no clock; the window's end comes in as an argument.

use std::collections::VecDeque;

/// While A3 messages wait, one goes after this many A2 messages in a row (aging: A2 comes
/// first, A3 is never starved).
pub const A3_AGING: u32 = 16;

/// Room (in ids) an empty queue keeps rather than giving back.
const IDLE_KEEP: usize = 64;

/// The priority class of a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Class {
    /// A2: a mesh service's message; goes first.
    A2,
    /// A3: an application's message.
    A3,
}

/// The ids waiting to be written, per class; see the module docs.
#[derive(Debug, Default)]
pub(crate) struct Schedule {
    a2: VecDeque<u64>,
    a3: VecDeque<u64>,
    /// A2 ids taken in a row while an A3 id was ready.
    a2_streak: u32,
}

impl Schedule {
    /// Queues `id`, greater than every id queued in its class so far.
    #[inline]
    pub(crate) fn push(&mut self, id: u64, class: Class) {
        match class {
            Class::A2 => self.a2.push_back(id),
            Class::A3 => self.a3.push_back(id),
        }
    }

    /// Ids queued, both classes.
    pub(crate) fn len(&self) -> usize {
        self.a2.len().saturating_add(self.a3.len())
    }

    /// Whether nothing is queued.
    pub(crate) fn is_empty(&self) -> bool {
        self.a2.is_empty() && self.a3.is_empty()
    }

    /// Forgets every queued id (the streak stays: it counts picks, not ids).
    pub(crate) fn clear(&mut self) {
        self.a2.clear();
        self.a3.clear();
    }

    /// Keeps only the ids `keep` accepts, in their order.
    pub(crate) fn retain(&mut self, mut keep: impl FnMut(u64) -> bool) {
        self.a2.retain(|id| keep(*id));
        self.a3.retain(|id| keep(*id));
    }

    /// Takes the next id to write among those below `end` (the end of the peer's window):
    /// A2 first, unless an A3 id is ready and [`A3_AGING`] A2 ids went in a row while it
    /// was. `None` when no queued id is below `end`.
    #[inline]
    pub(crate) fn next_below(&mut self, end: u64) -> Option<u64> {
        let a2_ready = self.a2.front().is_some_and(|&id| id < end);
        let a3_ready = self.a3.front().is_some_and(|&id| id < end);
        let from_a2 = match (a2_ready, a3_ready) {
            (true, true) => self.a2_streak < A3_AGING,
            (true, false) => true,
            (false, true) => false,
            (false, false) => return None,
        };
        self.a2_streak = if from_a2 && a3_ready {
            self.a2_streak.saturating_add(1)
        } else {
            0
        };
        if from_a2 {
            self.a2.pop_front()
        } else {
            self.a3.pop_front()
        }
    }

    /// Gives back the room a burst left behind in a queue that is empty.
    pub(crate) fn shrink_if_empty(&mut self) {
        for q in [&mut self.a2, &mut self.a3] {
            if q.is_empty() && q.capacity() > IDLE_KEEP {
                *q = VecDeque::new();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Everything `s` hands out below `end`, in order.
    fn drain(s: &mut Schedule, end: u64) -> Vec<u64> {
        std::iter::from_fn(|| s.next_below(end)).collect()
    }

    #[test]
    fn a2_goes_first_and_each_class_keeps_its_order() {
        let mut s = Schedule::default();
        s.push(1, Class::A3);
        s.push(2, Class::A2);
        s.push(3, Class::A3);
        s.push(4, Class::A2);
        assert_eq!(s.len(), 4);
        assert_eq!(drain(&mut s, u64::MAX), vec![2, 4, 1, 3]);
        assert!(s.is_empty());
    }

    #[test]
    fn one_a3_goes_after_every_a3_aging_a2_in_a_row_while_it_waits() {
        let mut s = Schedule::default();
        let a2: Vec<u64> = (1..=40).collect();
        for id in &a2 {
            s.push(*id, Class::A2);
        }
        for id in 100..103 {
            s.push(id, Class::A3);
        }
        let order = drain(&mut s, u64::MAX);
        let aging = A3_AGING as usize;
        let mut expected: Vec<u64> = a2[..aging].to_vec();
        expected.push(100);
        expected.extend(&a2[aging..2 * aging]);
        expected.push(101);
        expected.extend(&a2[2 * aging..]);
        expected.push(102);
        assert_eq!(order, expected);
    }

    #[test]
    fn a2_alone_builds_no_streak() {
        let mut s = Schedule::default();
        for id in 1..=100 {
            s.push(id, Class::A2);
        }
        assert_eq!(drain(&mut s, u64::MAX).len(), 100);
        // 100 A2 ids went while no A3 waited: an A3 queued now waits its full turn.
        for id in 101..=120 {
            s.push(id, Class::A2);
        }
        s.push(200, Class::A3);
        let order = drain(&mut s, u64::MAX);
        assert_eq!(
            order.iter().position(|id| *id == 200),
            Some(A3_AGING as usize)
        );
    }

    #[test]
    fn nothing_at_or_past_the_window_end_leaves_and_the_other_class_may_go_first() {
        let mut s = Schedule::default();
        s.push(5, Class::A2);
        s.push(3, Class::A3);
        assert_eq!(s.next_below(3), None);
        // Only the A3 id is inside the window: it goes, A2 waits for the window to move.
        assert_eq!(s.next_below(4), Some(3));
        assert_eq!(s.next_below(5), None);
        assert_eq!(s.next_below(6), Some(5));
        assert_eq!(s.next_below(u64::MAX), None);
    }

    #[test]
    fn retain_and_clear_keep_the_order_of_what_stays() {
        let mut s = Schedule::default();
        for id in 1..=10 {
            s.push(id, if id % 3 == 0 { Class::A3 } else { Class::A2 });
        }
        s.retain(|id| id % 2 == 0);
        assert_eq!(s.len(), 5);
        assert_eq!(drain(&mut s, u64::MAX), vec![2, 4, 8, 10, 6]);
        s.push(11, Class::A2);
        s.clear();
        assert!(s.is_empty());
        assert_eq!(s.next_below(u64::MAX), None);
    }
}
