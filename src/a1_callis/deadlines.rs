//! [`Deadlines`]: the send deadlines of the messages a session retains, earliest first —
//! what `poll_timeout` reports and `handle_timeout` expires.
//!
//! Most sends share one timeout, so their deadlines come in non-decreasing order: those go on
//! a queue (O(1) at both ends). A deadline earlier than the last one queued (a shorter
//! per-send timeout) goes to a sorted set instead.
//!
//! Invariants: `in_order` is sorted by (deadline, id), so the earliest entry is its front or
//! the first of `out_of_order`. Every live message (one the session retains) has exactly one
//! entry, (its deadline, its id), in one of the two. `out_of_order` holds live entries only
//! ([`forget`](Deadlines::forget) removes a finished message's entry there), while
//! `in_order` may still hold entries of messages that finished behind its front: they are
//! dropped when they reach the front, and the front is live after every `forget`. So
//! finishing a message in send order costs O(1), and memory follows what is retained.
//!
//! Which messages are live is the session's to say (it owns the table of messages): the
//! methods that drop stale entries ask it through a closure. Pure: no IO, no clock.

use std::collections::{BTreeSet, VecDeque};
use std::time::Instant;

/// Room (in entries) an empty queue keeps rather than giving back.
const IDLE_KEEP: usize = 64;

/// The deadlines of retained messages; see the module docs.
#[derive(Debug, Default)]
pub(crate) struct Deadlines {
    /// Deadlines in send order while they do not decrease.
    in_order: VecDeque<(Instant, u64)>,
    /// Deadlines earlier than one already queued.
    out_of_order: BTreeSet<(Instant, u64)>,
}

impl Deadlines {
    /// Message `id` (newer than every message inserted so far) must finish by `at`.
    #[inline]
    pub(crate) fn insert(&mut self, at: Instant, id: u64) {
        if self.in_order.back().is_none_or(|(last, _)| *last <= at) {
            self.in_order.push_back((at, id));
        } else {
            self.out_of_order.insert((at, id));
        }
    }

    /// Message `id`, due at `at`, finished; `live(at, id)` says whether a message is still
    /// retained with that deadline. Drops its entry, and every stale entry at the front.
    #[inline]
    pub(crate) fn forget(&mut self, at: Instant, id: u64, live: impl Fn(Instant, u64) -> bool) {
        if !self.out_of_order.is_empty() {
            self.out_of_order.remove(&(at, id));
        }
        while let Some(&(front_at, front)) = self.in_order.front() {
            if live(front_at, front) {
                break;
            }
            self.in_order.pop_front();
        }
    }

    /// The earliest entry: (deadline, id).
    #[inline]
    pub(crate) fn earliest(&self) -> Option<(Instant, u64)> {
        let in_order = self.in_order.front().copied();
        let early = self.out_of_order.first().copied();
        match (in_order, early) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Takes the entry of the earliest live message due at `now` (its deadline at or before
    /// `now`) and returns its id; stale entries met on the way are dropped. `None` when no
    /// live message is due.
    pub(crate) fn pop_due(
        &mut self,
        now: Instant,
        live: impl Fn(Instant, u64) -> bool,
    ) -> Option<u64> {
        while let Some(entry) = self.earliest() {
            if entry.0 > now {
                return None;
            }
            if self.in_order.front() == Some(&entry) {
                self.in_order.pop_front();
            } else {
                self.out_of_order.remove(&entry);
            }
            if live(entry.0, entry.1) {
                return Some(entry.1);
            }
        }
        None
    }

    /// Gives back the room a burst left behind, when the queue is empty.
    pub(crate) fn shrink_if_empty(&mut self) {
        if self.in_order.is_empty() && self.in_order.capacity() > IDLE_KEEP {
            self.in_order = VecDeque::new();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::time::Duration;

    use super::*;

    /// A session's retained messages, reduced to their deadlines, with the index beside them.
    struct Model {
        t0: Instant,
        live: BTreeMap<u64, Instant>,
        index: Deadlines,
        next_id: u64,
    }

    impl Model {
        fn new() -> Self {
            Self {
                t0: Instant::now(),
                live: BTreeMap::new(),
                index: Deadlines::default(),
                next_id: 1,
            }
        }

        fn at(&self, ms: u64) -> Instant {
            self.t0 + Duration::from_millis(ms)
        }

        fn send(&mut self, ms: u64) -> u64 {
            let id = self.next_id;
            self.next_id += 1;
            let at = self.at(ms);
            self.live.insert(id, at);
            self.index.insert(at, id);
            id
        }

        fn finish(&mut self, id: u64) {
            let at = self.live.remove(&id).expect("live");
            let live = &self.live;
            self.index
                .forget(at, id, |at, id| live.get(&id) == Some(&at));
        }

        fn expire(&mut self, ms: u64) -> Vec<u64> {
            let now = self.at(ms);
            let mut expired = Vec::new();
            loop {
                let live = &self.live;
                let Some(id) = self.index.pop_due(now, |at, id| live.get(&id) == Some(&at)) else {
                    break;
                };
                self.live.remove(&id);
                expired.push(id);
            }
            expired
        }

        /// The earliest entry is the earliest live deadline (stale ones hidden by the front
        /// rule), and every live message has its entry.
        fn check(&self) {
            let earliest_live = self.live.iter().map(|(id, at)| (*at, *id)).min();
            assert_eq!(self.index.earliest(), earliest_live);
            for (id, at) in &self.live {
                assert!(
                    self.index.in_order.contains(&(*at, *id))
                        || self.index.out_of_order.contains(&(*at, *id)),
                    "message {id} has no entry"
                );
            }
            assert!(
                self.index
                    .out_of_order
                    .iter()
                    .all(|(at, id)| self.live.get(id) == Some(at)),
                "a stale entry in out_of_order"
            );
            assert!(self.index.in_order.iter().is_sorted());
        }
    }

    #[test]
    fn one_timeout_for_all_stays_in_send_order_and_finishing_in_order_empties_it() {
        let mut m = Model::new();
        let ids: Vec<u64> = (0..5).map(|i| m.send(1000 + i)).collect();
        assert!(m.index.out_of_order.is_empty());
        m.check();
        for id in ids {
            m.finish(id);
            m.check();
        }
        assert!(m.index.in_order.is_empty());
        assert_eq!(m.index.earliest(), None);
    }

    #[test]
    fn a_shorter_timeout_is_kept_aside_and_comes_first() {
        let mut m = Model::new();
        let long = m.send(5000);
        let short = m.send(100);
        assert_eq!(m.index.out_of_order.len(), 1);
        assert_eq!(m.index.earliest(), Some((m.at(100), short)));
        assert_eq!(m.expire(99), Vec::<u64>::new());
        assert_eq!(m.expire(100), vec![short]);
        m.check();
        assert_eq!(m.expire(5000), vec![long]);
        m.check();
        assert_eq!(m.index.earliest(), None);
    }

    #[test]
    fn an_entry_finished_behind_the_front_is_dropped_when_it_reaches_the_front() {
        let mut m = Model::new();
        let first = m.send(100);
        let second = m.send(200);
        let third = m.send(300);
        m.finish(second);
        // Still queued behind a live front, but never reported.
        assert_eq!(m.index.in_order.len(), 3);
        m.check();
        m.finish(first);
        assert_eq!(
            m.index.in_order.len(),
            1,
            "the stale entry went with the front"
        );
        assert_eq!(m.expire(1000), vec![third]);
    }

    #[test]
    fn expiry_takes_every_due_message_in_deadline_order_and_skips_stale_entries() {
        let mut m = Model::new();
        let a = m.send(300);
        let b = m.send(400);
        let c = m.send(100);
        let d = m.send(200);
        let e = m.send(900);
        m.finish(b);
        m.check();
        assert_eq!(m.expire(500), vec![c, d, a]);
        m.check();
        assert_eq!(m.live.keys().copied().collect::<Vec<_>>(), vec![e]);
        assert_eq!(m.expire(900), vec![e]);
        assert_eq!(m.index.earliest(), None);
    }

    #[test]
    fn ties_keep_send_order() {
        let mut m = Model::new();
        let ids: Vec<u64> = (0..4).map(|_| m.send(50)).collect();
        assert_eq!(m.expire(50), ids);
    }
}
