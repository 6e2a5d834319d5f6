//! The pre-authentication gate: how fast one source (IP address for TCP, uid for Unix sockets)
//! may connect (a token bucket, T9), how many handshakes may be in progress at once, in total
//! and per source (T7), plus the listener's counters.
//!
//! When the gate is full, a newcomer may take the slot of the oldest connection that is still
//! *silent* — admitted at least `evict_after` ago and not yet through its TLS ClientHello: that
//! connection's permit is told to give up (its handshake ends at once) and its slot passes to
//! the newcomer. A crowd of slow clients from many addresses then cannot keep a good peer out:
//! a good peer sends its ClientHello within a round trip of connecting and stops being
//! silent, while the crowd's sockets age past `evict_after` and make room.
//!
//! A connection is admitted or refused the moment it is accepted, before any TLS work and
//! before any task is spawned for it; a refused socket is simply closed. An admitted
//! connection holds an [`AdmissionPermit`] until its handshake ends (successfully or not), and
//! dropping the permit frees the slot. The table is behind a `std::sync::Mutex` held for a few
//! instructions, never across an `.await`. [`Tally`] (counts per key and in total) also serves
//! the domus's count of calles waiting for their first frame.

use std::collections::{BTreeMap, HashMap};
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

/// Rate buckets kept at most; past that, buckets that have refilled are forgotten, and if
/// every one is still in use a new source is refused (a crowd of that size is a flood).
const MAX_BUCKETS: usize = 16_384;

/// Where an unauthenticated connection comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Source {
    Ip(IpAddr),
    Uid(u32),
}

/// Why a connection was turned away at the gate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    Global,
    PerSource,
    Rate,
}

/// Things held per key and in total (handshakes per source here; calles waiting for their
/// first frame per identity in the domus). Callers check the limits they need, in their order.
#[derive(Debug)]
pub(crate) struct Tally<K> {
    total: usize,
    per_key: HashMap<K, usize>,
}

impl<K> Default for Tally<K> {
    fn default() -> Self {
        Self {
            total: 0,
            per_key: HashMap::new(),
        }
    }
}

impl<K: Eq + Hash + Clone> Tally<K> {
    /// Held in total.
    pub(crate) fn total(&self) -> usize {
        self.total
    }

    /// Held for `key`.
    pub(crate) fn count(&self, key: &K) -> usize {
        self.per_key.get(key).copied().unwrap_or(0)
    }

    /// One more for `key`.
    pub(crate) fn add(&mut self, key: &K) {
        self.total = self.total.saturating_add(1);
        let n = self.per_key.entry(key.clone()).or_insert(0);
        *n = n.saturating_add(1);
    }

    /// One fewer for `key`; a key that holds nothing is forgotten.
    pub(crate) fn remove(&mut self, key: &K) {
        self.total = self.total.saturating_sub(1);
        if let Some(n) = self.per_key.get_mut(key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.per_key.remove(key);
            }
        }
    }

    /// Whether no key holds anything.
    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.per_key.is_empty()
    }
}

#[derive(Default)]
struct Table {
    pending: Tally<Source>,
    buckets: HashMap<Source, Bucket>,
    /// Admitted connections not yet through their ClientHello, by admission order.
    silent: BTreeMap<u64, Silent>,
    /// The next permit's sequence number.
    next_seq: u64,
}

/// An admitted connection that has not sent its ClientHello yet.
struct Silent {
    source: Source,
    /// Microseconds since the gate started, at admission.
    since_us: u64,
    evict: CancellationToken,
}

/// One source's connect budget: `rate` tokens a second, at most `rate` saved up.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    /// Thousandths of a token.
    milli: u64,
    /// Microseconds since the gate started, when `milli` was last brought up to date.
    at_us: u64,
}

impl Bucket {
    /// Thousandths of a token held at `now_us`, refilled for the time since the last update
    /// (not capped).
    fn level(&self, now_us: u64, rate: u64) -> u64 {
        // `rate` tokens per second is `rate` thousandths of a token per millisecond.
        let earned = now_us.saturating_sub(self.at_us).saturating_mul(rate) / 1000;
        self.milli.saturating_add(earned)
    }

    /// Refills for the time since the last update, then takes one token if there is one.
    fn take(&mut self, now_us: u64, rate: u64) -> bool {
        self.milli = self.level(now_us, rate).min(rate.saturating_mul(1000));
        self.at_us = now_us;
        if self.milli >= 1000 {
            self.milli = self.milli.saturating_sub(1000);
            true
        } else {
            false
        }
    }

    /// Whether it has refilled completely by `now_us` (forgetting it changes nothing).
    fn is_full(&self, now_us: u64, rate: u64) -> bool {
        self.level(now_us, rate) >= rate.saturating_mul(1000)
    }
}

/// Counters a listener keeps; see [`ListenerStats`] for their meaning.
#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) admitted: AtomicU64,
    pub(crate) refused_global: AtomicU64,
    pub(crate) refused_per_source: AtomicU64,
    pub(crate) refused_rate: AtomicU64,
    pub(crate) refused_uid: AtomicU64,
    pub(crate) handshakes_ok: AtomicU64,
    pub(crate) handshakes_failed: AtomicU64,
    pub(crate) handshake_timeouts: AtomicU64,
    pub(crate) client_hello_timeouts: AtomicU64,
    pub(crate) evicted_silent: AtomicU64,
}

impl Counters {
    pub(crate) fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// A snapshot of a listener's admission and handshake counters (cumulative since bind).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ListenerStats {
    /// Handshakes in progress right now (admitted, not yet finished).
    pub pending_handshakes: usize,
    /// Connections admitted past the gate.
    pub admitted: u64,
    /// Connections closed because `max_pending_handshakes` was reached.
    pub refused_global: u64,
    /// Connections closed because their source reached `max_pending_handshakes_per_source`.
    pub refused_per_source: u64,
    /// Connections closed because their source connected faster than
    /// `max_connects_per_second_per_source`.
    pub refused_rate: u64,
    /// Unix-socket connections closed because the peer's uid is not allowed.
    pub refused_uid: u64,
    /// Handshakes that produced an authenticated stream.
    pub handshakes_ok: u64,
    /// Handshakes that failed (bad certificate, wrong protocol, peer hung up, …).
    pub handshakes_failed: u64,
    /// Handshakes that did not finish before `handshake_timeout` (or did not get through
    /// their ClientHello before `client_hello_timeout`, counted in both).
    pub handshake_timeouts: u64,
    /// Connections that sent no complete ClientHello within `client_hello_timeout`.
    pub client_hello_timeouts: u64,
    /// Silent connections (no ClientHello yet, older than a quarter of
    /// `client_hello_timeout`) closed to make room for a newcomer while the gate was full.
    pub evicted_silent: u64,
}

/// The gate shared by a listener and the permits it hands out.
pub(crate) struct Gate {
    max_total: usize,
    max_per_source: usize,
    /// How long a connection must have been silent before a newcomer may evict it.
    evict_after_us: u64,
    /// Connects a second (and burst) allowed per source.
    rate: u64,
    started: Instant,
    table: Mutex<Table>,
    pub(crate) counters: Counters,
}

impl Gate {
    /// A gate for at most `max_total` handshakes (`max_per_source` per source), `rate`
    /// connects a second per source; a connection silent for `evict_after` may be evicted
    /// for a newcomer when the gate is full.
    pub(crate) fn new(
        max_total: usize,
        max_per_source: usize,
        rate: u32,
        evict_after: Duration,
    ) -> Self {
        Self {
            max_total,
            max_per_source,
            evict_after_us: u64::try_from(evict_after.as_micros()).unwrap_or(u64::MAX),
            rate: u64::from(rate.max(1)),
            started: Instant::now(),
            table: Mutex::new(Table::default()),
            counters: Counters::default(),
        }
    }

    /// Admits a connection from `source`, or says why not. Never blocks on IO.
    pub(crate) fn try_admit(self: &Arc<Self>, source: Source) -> Result<AdmissionPermit, Refusal> {
        self.try_admit_at(source, Instant::now())
    }

    /// [`try_admit`](Self::try_admit) at a given instant (tests drive the clock).
    pub(crate) fn try_admit_at(
        self: &Arc<Self>,
        source: Source,
        now: Instant,
    ) -> Result<AdmissionPermit, Refusal> {
        let now_us = self.micros_at(now);
        // A poisoned table is still consistent (every update is a single step), so keep using it.
        let mut table = self.table.lock().unwrap_or_else(PoisonError::into_inner);
        if !self.take_token(&mut table, source, now_us) {
            Counters::bump(&self.counters.refused_rate);
            return Err(Refusal::Rate);
        }
        if table.pending.total() >= self.max_total
            && (table.pending.count(&source) >= self.max_per_source
                || !self.evict_silent(&mut table, source, now_us))
        {
            Counters::bump(&self.counters.refused_global);
            return Err(Refusal::Global);
        }
        if table.pending.count(&source) >= self.max_per_source {
            Counters::bump(&self.counters.refused_per_source);
            return Err(Refusal::PerSource);
        }
        table.pending.add(&source);
        let seq = table.next_seq;
        table.next_seq = seq.wrapping_add(1);
        let evict = CancellationToken::new();
        table.silent.insert(
            seq,
            Silent {
                source,
                since_us: now_us,
                evict: evict.clone(),
            },
        );
        Counters::bump(&self.counters.admitted);
        Ok(AdmissionPermit {
            gate: Arc::clone(self),
            source,
            seq,
            evict,
        })
    }

    /// Frees a silent connection's slot for a newcomer from `source`, and tells its permit;
    /// false when none may go. First choice: the oldest silent connection of the source that
    /// holds the most slots, if that is more than the newcomer's source would hold with it (a
    /// crowd cannot keep out a source with fewer connections: its own members never gain on
    /// each other this way). Else the oldest silent connection, once it has been silent for
    /// `evict_after`.
    fn evict_silent(&self, table: &mut Table, source: Source, now_us: u64) -> bool {
        let mine = table.pending.count(&source).saturating_add(1);
        let fattest = table
            .silent
            .iter()
            .map(|(seq, s)| (table.pending.count(&s.source), *seq))
            .filter(|(held, _)| *held > mine)
            // The most slots; among equals, the oldest (smallest sequence number).
            .max_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)))
            .map(|(_, seq)| seq);
        let victim = match fattest {
            Some(seq) => table.silent.remove(&seq),
            None => {
                let Some(oldest) = table.silent.first_entry() else {
                    return false;
                };
                if now_us.saturating_sub(oldest.get().since_us) < self.evict_after_us {
                    return false;
                }
                Some(oldest.remove())
            }
        };
        let Some(victim) = victim else {
            return false;
        };
        table.pending.remove(&victim.source);
        victim.evict.cancel();
        Counters::bump(&self.counters.evicted_silent);
        true
    }

    /// Microseconds from the gate's start to `at` (the buckets' clock).
    fn micros_at(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.started).as_micros()).unwrap_or(u64::MAX)
    }

    /// Takes one connect token of `source`; false when its bucket is empty (or no bucket can
    /// be kept for it).
    fn take_token(&self, table: &mut Table, source: Source, now_us: u64) -> bool {
        let rate = self.rate;
        if !table.buckets.contains_key(&source) && table.buckets.len() >= MAX_BUCKETS {
            table.buckets.retain(|_, b| !b.is_full(now_us, rate));
            if table.buckets.len() >= MAX_BUCKETS {
                return false;
            }
        }
        table
            .buckets
            .entry(source)
            .or_insert(Bucket {
                milli: rate.saturating_mul(1000),
                at_us: now_us,
            })
            .take(now_us, rate)
    }

    pub(crate) fn stats(&self) -> ListenerStats {
        let pending = self
            .table
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pending
            .total();
        let c = &self.counters;
        ListenerStats {
            pending_handshakes: pending,
            admitted: c.admitted.load(Ordering::Relaxed),
            refused_global: c.refused_global.load(Ordering::Relaxed),
            refused_per_source: c.refused_per_source.load(Ordering::Relaxed),
            refused_rate: c.refused_rate.load(Ordering::Relaxed),
            refused_uid: c.refused_uid.load(Ordering::Relaxed),
            handshakes_ok: c.handshakes_ok.load(Ordering::Relaxed),
            handshakes_failed: c.handshakes_failed.load(Ordering::Relaxed),
            handshake_timeouts: c.handshake_timeouts.load(Ordering::Relaxed),
            client_hello_timeouts: c.client_hello_timeouts.load(Ordering::Relaxed),
            evicted_silent: c.evicted_silent.load(Ordering::Relaxed),
        }
    }
}

/// A slot in the gate, held while one handshake is in progress; dropping it frees the slot.
/// Until [`hello_received`](Self::hello_received) the connection counts as silent and the
/// gate may evict it: [`evicted`](Self::evicted) then fires and the slot is already free.
pub(crate) struct AdmissionPermit {
    gate: Arc<Gate>,
    source: Source,
    seq: u64,
    evict: CancellationToken,
}

impl AdmissionPermit {
    pub(crate) fn gate(&self) -> &Gate {
        &self.gate
    }

    /// The connection got through its ClientHello: it can no longer be evicted. False when
    /// the gate evicted it first (its slot is gone: the handshake must not go on).
    pub(crate) fn hello_received(&self) -> bool {
        let mut table = self
            .gate
            .table
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if self.evict.is_cancelled() {
            return false;
        }
        table.silent.remove(&self.seq);
        true
    }

    /// Fires when the gate evicted this connection to make room (its slot is free already).
    pub(crate) fn evicted(&self) -> &CancellationToken {
        &self.evict
    }
}

impl Drop for AdmissionPermit {
    fn drop(&mut self) {
        let mut table = self
            .gate
            .table
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        // An evicted permit's slot was freed (under this lock) when it was evicted.
        if !self.evict.is_cancelled() {
            table.pending.remove(&self.source);
            table.silent.remove(&self.seq);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn t07_limits_hold_and_permits_free_their_slot() {
        let gate = Arc::new(Gate::new(3, 2, 1000, Duration::from_secs(1)));
        let a = Source::Ip("127.0.0.2".parse().unwrap());
        let b = Source::Uid(1000);
        let p1 = gate.try_admit(a).unwrap();
        let p2 = gate.try_admit(a).unwrap();
        assert_eq!(gate.try_admit(a).err(), Some(Refusal::PerSource));
        let p3 = gate.try_admit(b).unwrap();
        assert_eq!(gate.try_admit(b).err(), Some(Refusal::Global));
        assert_eq!(gate.stats().pending_handshakes, 3);
        drop((p1, p2, p3));
        let stats = gate.stats();
        assert_eq!(stats.pending_handshakes, 0);
        assert_eq!(
            (
                stats.admitted,
                stats.refused_global,
                stats.refused_per_source
            ),
            (3, 1, 1)
        );
        assert!(gate.table.lock().unwrap().pending.is_empty());
        let _again = gate.try_admit(a).unwrap();
    }

    #[test]
    fn t07_a_full_gate_evicts_the_oldest_silent_connection_once_it_is_old_enough() {
        // Every source holds as many slots as a newcomer would: only age makes room.
        let gate = Arc::new(Gate::new(2, 2, 1000, Duration::from_millis(100)));
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let src = |n: u8| Source::Ip(std::net::IpAddr::from([127, 0, 0, n]));
        let a = gate.try_admit_at(src(2), at(0)).unwrap();
        let b = gate.try_admit_at(src(3), at(10)).unwrap();
        // Full, and nobody has been silent long enough yet.
        assert_eq!(
            gate.try_admit_at(src(4), at(50)).err(),
            Some(Refusal::Global)
        );
        assert!(!a.evicted().is_cancelled());
        // a has: the newcomer takes its slot, a is told, the count stays at the limit.
        let c = gate.try_admit_at(src(4), at(150)).unwrap();
        assert!(a.evicted().is_cancelled());
        assert!(!b.evicted().is_cancelled());
        assert_eq!(gate.stats().pending_handshakes, 2);
        drop(a);
        assert_eq!(
            gate.stats().pending_handshakes,
            2,
            "a's slot was freed once"
        );
        // b got through its ClientHello: never evicted; c is the oldest silent one now.
        assert!(b.hello_received());
        let d = gate.try_admit_at(src(2), at(400)).unwrap();
        assert!(c.evicted().is_cancelled());
        assert!(!b.evicted().is_cancelled());
        drop((b, c, d));
        let stats = gate.stats();
        assert_eq!((stats.evicted_silent, stats.pending_handshakes), (2, 0));
        assert!(gate.table.lock().unwrap().silent.is_empty());
    }

    #[test]
    fn t07_a_source_with_fewer_slots_gets_in_past_a_crowd_at_once_and_the_crowd_cannot_churn() {
        let gate = Arc::new(Gate::new(4, 4, 1000, Duration::from_secs(10)));
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let crowd = Source::Ip("127.0.0.2".parse().unwrap());
        let held: Vec<_> = (0..4)
            .map(|_| gate.try_admit_at(crowd, t0).unwrap())
            .collect();
        // A newcomer from another source evicts the crowd's oldest silent one at once.
        let good = gate
            .try_admit_at(Source::Ip("127.0.0.3".parse().unwrap()), at(1))
            .unwrap();
        assert!(held[0].evicted().is_cancelled());
        // The crowd cannot win a slot back from its own or from the newcomer.
        assert_eq!(gate.try_admit_at(crowd, at(2)).err(), Some(Refusal::Global));
        assert!(!good.evicted().is_cancelled());
        assert!(held[1..].iter().all(|p| !p.evicted().is_cancelled()));
        // Another small source still gets in, again at the crowd's expense.
        let other = gate
            .try_admit_at(Source::Ip("127.0.0.4".parse().unwrap()), at(3))
            .unwrap();
        assert!(held[1].evicted().is_cancelled());
        assert_eq!(gate.stats().evicted_silent, 2);
        drop((held, good, other));
        assert_eq!(gate.stats().pending_handshakes, 0);
    }

    #[test]
    fn t07_a_newcomer_over_its_sources_limit_evicts_nobody() {
        let gate = Arc::new(Gate::new(2, 1, 1000, Duration::from_millis(100)));
        let t0 = Instant::now();
        let crowd = Source::Ip("127.0.0.2".parse().unwrap());
        let good = Source::Ip("127.0.0.3".parse().unwrap());
        let x = gate.try_admit_at(crowd, t0).unwrap();
        let y = gate.try_admit_at(good, t0).unwrap();
        let later = t0 + Duration::from_secs(1);
        assert_eq!(gate.try_admit_at(crowd, later).err(), Some(Refusal::Global));
        assert!(!x.evicted().is_cancelled() && !y.evicted().is_cancelled());
        assert_eq!(gate.stats().evicted_silent, 0);
    }

    #[test]
    fn t09_a_source_connecting_faster_than_its_rate_is_refused_and_others_are_not() {
        let gate = Arc::new(Gate::new(1000, 1000, 10, Duration::from_secs(1)));
        let t0 = Instant::now();
        let a = Source::Ip("127.0.0.2".parse().unwrap());
        let b = Source::Ip("127.0.0.3".parse().unwrap());
        // A burst of `rate`, then nothing until tokens come back.
        let admitted = (0..100)
            .filter(|_| gate.try_admit_at(a, t0).is_ok())
            .count();
        assert_eq!(admitted, 10);
        assert_eq!(gate.try_admit_at(a, t0).err(), Some(Refusal::Rate));
        assert!(
            gate.try_admit_at(b, t0).is_ok(),
            "another source has its own bucket"
        );
        // 10 a second: one token every 100 ms, never more than 10 saved up.
        assert!(
            gate.try_admit_at(a, t0 + Duration::from_millis(99))
                .is_err()
        );
        assert!(
            gate.try_admit_at(a, t0 + Duration::from_millis(100))
                .is_ok()
        );
        let later = t0 + Duration::from_secs(60);
        let admitted = (0..100)
            .filter(|_| gate.try_admit_at(a, later).is_ok())
            .count();
        assert_eq!(admitted, 10, "the bucket holds at most one second's worth");
        assert_eq!(gate.stats().refused_rate, 1 + 1 + 90 + 90);
    }

    #[test]
    fn t09_the_bucket_table_is_bounded_and_forgets_refilled_sources() {
        let gate = Arc::new(Gate::new(1, 1, 5, Duration::from_secs(1)));
        let t0 = Instant::now();
        let mut table = Table::default();
        for i in 0..MAX_BUCKETS as u32 {
            assert!(gate.take_token(&mut table, Source::Uid(i), gate.micros_at(t0)));
        }
        // Every bucket is in use: a new source is refused rather than growing the table.
        let fresh = Source::Uid(u32::MAX);
        assert!(!gate.take_token(&mut table, fresh, gate.micros_at(t0)));
        assert_eq!(table.buckets.len(), MAX_BUCKETS);
        // A second later every bucket has refilled and is forgotten to make room.
        let later = gate.micros_at(t0 + Duration::from_secs(1));
        assert!(gate.take_token(&mut table, fresh, later));
        assert_eq!(table.buckets.len(), 1);
    }
}
