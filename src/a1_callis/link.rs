//! The link policy: the protocol rules about calles themselves rather than what they carry —
//! how long to wait before dialling again after a failure, which of two calles between the same
//! pair of domus survives, when a callis is too old to keep, and when a callis whose writes
//! do not move (or whose close cannot get out) is given up.
//!
//! Pure, like the session: time comes in as `now` and randomness as a number passed in, so the
//! rules are tested on a virtual clock in microseconds. The runtime's drivers keep one
//! [`Backoff`], one [`CallisAge`] and one [`WriteWatch`] per callis kind and ask
//! [`keep_current`] when a second callis arrives. No IO, no clock, no tokio.

use std::time::{Duration, Instant};

use crate::a0_transport::DomusId;

/// Reconnect backoff: after each failed dial the next may start only after a delay that
/// doubles from `min` up to `max`, scaled by a random factor in [0.5, 1.5) so a fleet that
/// lost one peer does not redial it in lockstep. A dial that succeeds (the callis opened)
/// resets it; so does a new address (the old failures say nothing about the new one).
///
/// Invariant: `min <= next <= max`; the delay after a failure is within `[next/2, 3·next/2)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    /// The delay (before jitter) after the next failure.
    next: Duration,
    /// No dial before this instant.
    until: Option<Instant>,
}

impl Backoff {
    /// A backoff between `min` and `max` (a `max` below `min` is raised to it).
    pub fn new(min: Duration, max: Duration) -> Self {
        Self {
            min,
            max: max.max(min),
            next: min,
            until: None,
        }
    }

    /// A dial failed at `now`; `random` (any value; its remainder modulo 1000 is used) picks
    /// the jitter. Returns the instant before which no dial may start.
    pub fn failed(&mut self, now: Instant, random: u64) -> Instant {
        let factor = 0.5 + (random % 1000) as f64 / 1000.0;
        let delay = self.next.mul_f64(factor);
        self.next = self.next.saturating_mul(2).min(self.max);
        let until = now.checked_add(delay).unwrap_or(now);
        self.until = Some(until);
        until
    }

    /// A callis opened: the next failure starts from `min` again.
    pub fn succeeded(&mut self) {
        self.next = self.min;
        self.until = None;
    }

    /// Forgets the failures so far and any wait (the peer moved to a new address).
    pub fn reset(&mut self) {
        self.succeeded();
    }

    /// Whether a dial may start at `now`.
    pub fn ready(&self, now: Instant) -> bool {
        self.until.is_none_or(|until| now >= until)
    }

    /// Whether a wait after a failure is in force at `now` (the last dial failed recently).
    pub fn waiting(&self, now: Instant) -> bool {
        !self.ready(now)
    }

    /// When the current wait ends, if one is in force.
    pub fn until(&self) -> Option<Instant> {
        self.until
    }

    /// Ends the wait (its instant has passed and the driver has seen it).
    pub fn expire(&mut self) {
        self.until = None;
    }
}

/// Who dialled a callis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialler {
    /// This domus.
    Us,
    /// The peer.
    Peer,
}

/// The one-callis rule, applied by both ends alike when a new callis arrives while one is
/// open: when the two were dialled by different sides (both sides dialled at once), the one
/// dialled by the smaller [`DomusId`] survives; when the same side dialled both, the new one
/// replaces the old (the old one is likely dead, or being replaced on purpose). Returns whether
/// the current callis is kept (and the new one closed).
pub fn keep_current(local: &DomusId, peer: &DomusId, current: Dialler, new: Dialler) -> bool {
    let id = |d: Dialler| match d {
        Dialler::Us => local,
        Dialler::Peer => peer,
    };
    current != new && id(current) < id(new)
}

/// What [`CallisAge::on_timeout`] asks of the driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AgeAction {
    /// Nothing (no limit, or no callis).
    None,
    /// The callis reached the age limit and we dialled it: dial its replacement (which takes
    /// over when it opens, by the same-side rule of [`keep_current`]).
    DialReplacement,
    /// The callis reached the age limit and the peer dialled it: leave the peer a quarter of
    /// the limit to replace it.
    Wait,
    /// The callis is a quarter of the limit past it and still in use: close it.
    Close,
}

/// The callis age limit (`max_callis_age`): a callis is used at most `limit`; the side that
/// dialled it dials a replacement at `limit`, and whoever still holds it at 1.25 × `limit`
/// closes it. Long-lived calles thus pick up rotated certificates and revocations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallisAge {
    limit: Option<Duration>,
    /// When the current callis needs attention next.
    next: Option<Instant>,
    /// The current callis is past the limit.
    old: bool,
}

impl CallisAge {
    /// An age rule with `limit` (`None`: calles may live for ever).
    pub fn new(limit: Option<Duration>) -> Self {
        Self {
            limit,
            next: None,
            old: false,
        }
    }

    /// A callis opened at `now`.
    pub fn opened(&mut self, now: Instant) {
        self.old = false;
        self.next = self.limit.and_then(|limit| now.checked_add(limit));
    }

    /// The callis is gone.
    pub fn closed(&mut self) {
        self.next = None;
        self.old = false;
    }

    /// When [`on_timeout`](Self::on_timeout) has work next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.next
    }

    /// Whether the current callis is past the limit.
    pub fn is_old(&self) -> bool {
        self.old
    }

    /// The instant from [`poll_timeout`](Self::poll_timeout) passed at `now`; `dialled_by`
    /// says who dialled the current callis.
    pub fn on_timeout(&mut self, now: Instant, dialled_by: Dialler) -> AgeAction {
        let (Some(limit), Some(next)) = (self.limit, self.next) else {
            return AgeAction::None;
        };
        if now < next {
            return AgeAction::None;
        }
        if self.old {
            self.next = None;
            return AgeAction::Close;
        }
        self.old = true;
        let grace = limit.checked_div(4).unwrap_or(limit);
        self.next = now.checked_add(grace);
        match dialled_by {
            Dialler::Us => AgeAction::DialReplacement,
            Dialler::Peer => AgeAction::Wait,
        }
    }
}

/// How long a decided close waits for writes that make no progress before the callis is
/// dropped without its CLOSE (at most the callis's idle timeout): a peer that reads gets the
/// CLOSE and everything before it; one that does not is cut off soon (T33).
pub const CLOSE_LINGER: Duration = Duration::from_secs(1);

/// What [`WriteWatch::check`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteVerdict {
    /// Writes move, or nothing waits: keep going.
    Fine,
    /// An open callis's writes made no progress for the idle timeout: the peer stopped
    /// reading. Close it (no CLOSE can reach the peer) and drop it now.
    Stalled,
    /// A closing callis could not write its CLOSE in time: drop it now.
    Abandon,
}

/// Write progress on one callis (T33): a peer that stops reading must not keep a callis, its
/// buffers and its unanswered work for ever, and a close must take effect in bounded time
/// whatever is queued. The driver reports every write attempt; the watch says when to give
/// up:
/// - open: no progress for `idle` while bytes wait → [`WriteVerdict::Stalled`];
/// - closing: no progress for [`CLOSE_LINGER`] (at most `idle`) while bytes wait, or closing
///   for `idle` in all → [`WriteVerdict::Abandon`].
///
/// Invariant: `unwritten_since` is `Some` exactly while bytes wait, and is the instant of the
/// last write that moved bytes (or of the first attempt that found them waiting).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WriteWatch {
    unwritten_since: Option<Instant>,
    closing_since: Option<Instant>,
}

impl WriteWatch {
    /// A watch for a new callis: nothing waits, no close decided.
    pub fn new() -> Self {
        Self::default()
    }

    /// A write attempt at `now`: whether it moved bytes, and whether bytes still wait.
    pub fn wrote(&mut self, now: Instant, progressed: bool, waiting: bool) {
        self.unwritten_since = if !waiting {
            None
        } else if progressed {
            Some(now)
        } else {
            Some(self.unwritten_since.unwrap_or(now))
        };
    }

    /// A close was decided at `now` (a later call keeps the first instant).
    pub fn closing(&mut self, now: Instant) {
        self.closing_since.get_or_insert(now);
    }

    /// Whether a close was decided.
    pub fn is_closing(&self) -> bool {
        self.closing_since.is_some()
    }

    fn linger(idle: Duration) -> Duration {
        CLOSE_LINGER.min(idle)
    }

    /// The verdict at `now` for a callis whose idle timeout is `idle`.
    pub fn check(&self, now: Instant, idle: Duration) -> WriteVerdict {
        let stalled = self
            .unwritten_since
            .map(|since| now.saturating_duration_since(since));
        match self.closing_since {
            None if stalled.is_some_and(|s| s >= idle) => WriteVerdict::Stalled,
            None => WriteVerdict::Fine,
            Some(since) => {
                let lingered = now.saturating_duration_since(since) >= idle;
                if lingered || stalled.is_some_and(|s| s >= Self::linger(idle)) {
                    WriteVerdict::Abandon
                } else {
                    WriteVerdict::Fine
                }
            }
        }
    }

    /// The next instant [`check`](Self::check) may change its verdict.
    pub fn poll_timeout(&self, idle: Duration) -> Option<Instant> {
        let stall_limit = if self.closing_since.is_some() {
            Self::linger(idle)
        } else {
            idle
        };
        let stall = self
            .unwritten_since
            .and_then(|since| since.checked_add(stall_limit));
        let close = self.closing_since.and_then(|since| since.checked_add(idle));
        match (stall, close) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn id(name: &str) -> DomusId {
        DomusId::spiffe("t", name).expect("id")
    }

    #[test]
    fn backoff_doubles_within_its_jitter_bounds_up_to_max_and_resets_on_success() {
        let t0 = Instant::now();
        let mut b = Backoff::new(50 * MS, 400 * MS);
        assert!(b.ready(t0));
        let mut now = t0;
        let mut nominal = 50 * MS;
        for round in 0..8 {
            for random in [0, 499, 999] {
                let mut probe = b.clone();
                let until = probe.failed(now, random);
                let delay = until - now;
                assert!(
                    delay >= nominal / 2 && delay < nominal * 3 / 2,
                    "round {round}: {delay:?} for nominal {nominal:?}"
                );
            }
            let until = b.failed(now, 7 * round);
            assert!(!b.ready(now) && b.waiting(now));
            assert!(b.ready(until));
            now = until;
            nominal = (nominal * 2).min(400 * MS);
        }
        assert_eq!(b.next, 400 * MS, "capped at max");
        b.succeeded();
        assert!(b.ready(now));
        let until = b.failed(now, 500);
        assert_eq!(until - now, 50 * MS, "from min again (factor 1.0)");
        b.reset();
        assert!(b.ready(now), "a new address waits for nothing");
    }

    #[test]
    fn the_jitter_spreads_a_fleet_that_failed_at_once() {
        let now = Instant::now();
        let delays: std::collections::BTreeSet<Duration> = (0..100u64)
            .map(|n| Backoff::new(100 * MS, 100 * MS).failed(now, n * 10) - now)
            .collect();
        assert!(delays.len() > 90, "{} distinct delays", delays.len());
        assert!(delays.iter().all(|d| *d >= 50 * MS && *d < 150 * MS));
    }

    #[test]
    fn simultaneous_dials_end_with_the_same_callis_on_both_ends() {
        let (a, b) = (id("a"), id("b"));
        // Both dialled at once: each end holds its own dial and receives the other's.
        // a (smaller) keeps the callis a dialled; b, holding the one it dialled, replaces it
        // with a's. Either order of arrival gives the same survivor on both ends.
        assert!(
            keep_current(&a, &b, Dialler::Us, Dialler::Peer),
            "a keeps its own"
        );
        assert!(
            !keep_current(&b, &a, Dialler::Us, Dialler::Peer),
            "b takes a's"
        );
        assert!(
            !keep_current(&a, &b, Dialler::Peer, Dialler::Us),
            "a switches to its own"
        );
        assert!(
            keep_current(&b, &a, Dialler::Peer, Dialler::Us),
            "b keeps a's"
        );
        // The same side dialled again: the new callis replaces the old on both ends.
        for (local, peer) in [(&a, &b), (&b, &a)] {
            assert!(!keep_current(local, peer, Dialler::Us, Dialler::Us));
            assert!(!keep_current(local, peer, Dialler::Peer, Dialler::Peer));
        }
    }

    #[test]
    fn simultaneous_dials_modelled_as_two_ends_agree_for_any_arrival_order() {
        // Each end: the callis it holds, then the other arrives; both must keep the same one.
        let (a, b) = (id("a"), id("b"));
        // Callis X dialled by a, callis Y dialled by b. Seen from a: X is Us, Y is Peer.
        for a_first in [true, false] {
            for b_first in [true, false] {
                let survivor_at = |local: &DomusId, peer: &DomusId, mine_first: bool| {
                    let (current, new) = if mine_first {
                        (Dialler::Us, Dialler::Peer)
                    } else {
                        (Dialler::Peer, Dialler::Us)
                    };
                    let kept = if keep_current(local, peer, current, new) {
                        current
                    } else {
                        new
                    };
                    // Name the survivor by who dialled it, in absolute terms.
                    match kept {
                        Dialler::Us => local.clone(),
                        Dialler::Peer => peer.clone(),
                    }
                };
                assert_eq!(
                    survivor_at(&a, &b, a_first),
                    survivor_at(&b, &a, b_first),
                    "a saw its own first: {a_first}, b saw its own first: {b_first}"
                );
            }
        }
    }

    #[test]
    fn the_dialler_replaces_an_old_callis_and_anyone_closes_it_at_one_and_a_quarter() {
        let t0 = Instant::now();
        let limit = Duration::from_secs(8);
        for (dialled_by, at_limit) in [
            (Dialler::Us, AgeAction::DialReplacement),
            (Dialler::Peer, AgeAction::Wait),
        ] {
            let mut age = CallisAge::new(Some(limit));
            age.opened(t0);
            assert_eq!(age.poll_timeout(), Some(t0 + limit));
            assert_eq!(age.on_timeout(t0 + limit - MS, dialled_by), AgeAction::None);
            assert_eq!(age.on_timeout(t0 + limit, dialled_by), at_limit);
            assert!(age.is_old());
            assert_eq!(age.poll_timeout(), Some(t0 + limit + limit / 4), "1.25x");
            assert_eq!(
                age.on_timeout(t0 + limit + limit / 4, dialled_by),
                AgeAction::Close
            );
            assert_eq!(age.poll_timeout(), None);
            // A replacement that opens in time starts young.
            age.opened(t0 + limit + MS);
            assert!(!age.is_old());
            assert_eq!(age.poll_timeout(), Some(t0 + limit + MS + limit));
        }
        let mut unlimited = CallisAge::new(None);
        unlimited.opened(t0);
        assert_eq!(unlimited.poll_timeout(), None);
        assert_eq!(
            unlimited.on_timeout(t0 + Duration::from_secs(1 << 30), Dialler::Us),
            AgeAction::None
        );
    }

    #[test]
    fn t33_a_write_watch_gives_up_on_writes_that_do_not_move() {
        let t0 = Instant::now();
        let idle = Duration::from_secs(2);
        let mut w = WriteWatch::new();
        // Nothing waits: never a verdict, no timer.
        w.wrote(t0, false, false);
        assert_eq!(w.check(t0 + 10 * idle, idle), WriteVerdict::Fine);
        assert_eq!(w.poll_timeout(idle), None);
        // Bytes wait and move now and then: each move restarts the clock.
        w.wrote(t0, true, true);
        w.wrote(t0 + 1500 * MS, true, true);
        assert_eq!(w.check(t0 + 3000 * MS, idle), WriteVerdict::Fine);
        assert_eq!(w.poll_timeout(idle), Some(t0 + 3500 * MS));
        // Then they stop moving.
        w.wrote(t0 + 3000 * MS, false, true);
        assert_eq!(w.check(t0 + 3499 * MS, idle), WriteVerdict::Fine);
        assert_eq!(w.check(t0 + 3500 * MS, idle), WriteVerdict::Stalled);
    }

    #[test]
    fn t33_a_close_waits_for_moving_writes_at_most_idle_and_for_stuck_ones_at_most_the_linger() {
        let t0 = Instant::now();
        let idle = Duration::from_secs(5);
        // Stuck: given up CLOSE_LINGER after the last move.
        let mut w = WriteWatch::new();
        w.wrote(t0, false, true);
        w.closing(t0 + 200 * MS);
        assert_eq!(w.poll_timeout(idle), Some(t0 + CLOSE_LINGER));
        assert_eq!(w.check(t0 + CLOSE_LINGER - MS, idle), WriteVerdict::Fine);
        assert_eq!(w.check(t0 + CLOSE_LINGER, idle), WriteVerdict::Abandon);
        // Moving slowly: given up `idle` after the close was decided.
        let mut w = WriteWatch::new();
        w.closing(t0);
        for step in 1..=10u32 {
            w.wrote(t0 + step * 500 * MS, true, true);
        }
        assert_eq!(w.check(t0 + 4999 * MS, idle), WriteVerdict::Fine);
        assert_eq!(w.check(t0 + idle, idle), WriteVerdict::Abandon);
        // A short idle timeout shortens the linger too.
        let mut w = WriteWatch::new();
        w.wrote(t0, false, true);
        w.closing(t0);
        assert_eq!(w.check(t0 + 300 * MS, 300 * MS), WriteVerdict::Abandon);
        // Nothing waiting at the close: nothing to give up before `idle`.
        let mut w = WriteWatch::new();
        w.closing(t0);
        w.wrote(t0, true, false);
        assert_eq!(w.check(t0 + 4 * CLOSE_LINGER, idle), WriteVerdict::Fine);
    }
}
