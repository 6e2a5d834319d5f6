//! The [`Recorder`] that producers write into — counters, gauges, the latency buckets,
//! per-peer cells, the error ring and the feeds — and read back as a [`Snapshot`]; the log
//! budgets per kind of warning a peer can trigger (T30); and [`TurnCounts`], the counts a
//! driver keeps during a turn and publishes once.
//!
//! Producers touch only atomics and non-blocking channels here: it must never block, never
//! allocate per message, and hold its few locks for a copy only (never across an `.await`).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::broadcast;

use super::feeds::{CallisKind, Event, SequencedError};
use super::snapshot::{
    Counter, CounterCells, Counters, Gauge, Latency, Lines, PeerReport, Snapshot,
};
use super::{ERROR_RING_LEN, LATENCY_BUCKETS};
use crate::a0_transport::DomusId;
use crate::error::{Error, ErrorId};

#[derive(Default)]
struct GaugeCell {
    current: AtomicU64,
    peak: AtomicU64,
}

impl GaugeCell {
    fn add(&self, d: i64) {
        let now = if d >= 0 {
            self.current
                .fetch_add(d.unsigned_abs(), Ordering::Relaxed)
                .saturating_add(d.unsigned_abs())
        } else {
            let mut cur = self.current.load(Ordering::Relaxed);
            loop {
                let next = cur.saturating_sub(d.unsigned_abs());
                match self.current.compare_exchange_weak(
                    cur,
                    next,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                ) {
                    Ok(_) => break next,
                    Err(actual) => cur = actual,
                }
            }
        };
        self.peak.fetch_max(now, Ordering::Relaxed);
    }

    fn read(&self) -> Gauge {
        Gauge {
            current: self.current.load(Ordering::Relaxed),
            peak: self.peak.load(Ordering::Relaxed),
        }
    }

    fn reset_peak(&self) {
        self.peak
            .store(self.current.load(Ordering::Relaxed), Ordering::Relaxed);
    }
}

/// Log lines of one kind allowed per [`LOG_WINDOW`]; the rest are counted and the count is
/// attached to the next line let through (T30: a peer cannot flood the application's logs).
pub const LOG_LINES_PER_WINDOW: u64 = 10;
/// The window of [`LOG_LINES_PER_WINDOW`].
pub const LOG_WINDOW: Duration = Duration::from_secs(10);

/// Kinds of warnings a peer can trigger, each with its own log budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LogKind {
    AcceptFailed,
    CallisRefused,
    ProtocolViolation,
    InlineHandlerSlow,
}

#[derive(Default)]
pub(super) struct LogLimiter {
    window: AtomicU64,
    lines: AtomicU64,
    pub(super) suppressed: AtomicU64,
}

impl LogLimiter {
    /// Whether a line may be logged now; if so, how many were suppressed before it.
    pub(super) fn allow(&self, now_us: u64) -> Option<u64> {
        let window_us = u64::try_from(LOG_WINDOW.as_micros()).unwrap_or(u64::MAX);
        let current = now_us / window_us.max(1);
        if self.window.swap(current, Ordering::Relaxed) != current {
            self.lines.store(0, Ordering::Relaxed);
        }
        if self.lines.fetch_add(1, Ordering::Relaxed) < LOG_LINES_PER_WINDOW {
            Some(self.suppressed.swap(0, Ordering::Relaxed))
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

/// Live figures of one peer, written by its drivers.
#[derive(Default)]
pub(crate) struct PeerCells {
    pub(crate) connected: std::sync::atomic::AtomicBool,
    pub(crate) rtt_us: AtomicU64,
    pub(crate) in_flight: AtomicU64,
    pub(crate) queue_depth: AtomicU64,
    /// Microseconds since the domus started at which the oldest unanswered send was made;
    /// 0 when none.
    pub(crate) oldest_pending_at_us: AtomicU64,
    pub(crate) bytes_in: AtomicU64,
    pub(crate) bytes_out: AtomicU64,
    pub(crate) messages_in: AtomicU64,
    pub(crate) messages_out: AtomicU64,
    /// The identity of the current (or last) primary callis; written when a callis is adopted.
    pub(crate) identity: arc_swap::ArcSwapOption<crate::a0_transport::PeerIdentity>,
}

/// The shared recorder behind [`Reporting`](super::Reporting).
/// Reads the topic service's figures; `None` once the service is gone.
pub(crate) type TopicsSource =
    Box<dyn Fn() -> Option<super::snapshot::TopicsFigures> + Send + Sync>;

pub(crate) struct Recorder {
    /// The domus's id, as a label for exported metrics and for
    /// [`Reporting::identity`](super::Reporting::identity).
    pub(super) domus: String,
    started: Instant,
    counters: CounterCells,
    base: Mutex<Base>,
    peers: GaugeCell,
    primary_calles: GaugeCell,
    blob_calles: GaugeCell,
    blob_streams: GaugeCell,
    rejected_by: Mutex<BTreeMap<ErrorId, u64>>,
    refused_by: Mutex<BTreeMap<ErrorId, u64>>,
    handshake_failures_by: Mutex<BTreeMap<ErrorId, u64>>,
    /// On lines of their own, like the counters: drivers add to them at the end of their
    /// turns.
    latency: Lines<[AtomicU64; LATENCY_BUCKETS]>,
    per_peer: Mutex<HashMap<DomusId, Arc<PeerCells>>>,
    /// The domus's listener, once bound.
    listener: std::sync::OnceLock<crate::a0_transport::StatsHandle>,
    /// The crypto provider's name, once the domus has chosen it.
    crypto_provider: std::sync::OnceLock<&'static str>,
    /// Reads the reply bytes the domus keeps (its reply budget), once the domus has one.
    retained_replies: std::sync::OnceLock<Box<dyn Fn() -> u64 + Send + Sync>>,
    /// Reads the topic service's figures while it runs (it sets and clears this).
    topics: Mutex<Option<TopicsSource>>,
    /// The feeds, made on the first subscription (each holds `EVENT_BUFFER_LEN` slots; a
    /// domus nobody listens to need not pay for them).
    pub(super) events: std::sync::OnceLock<broadcast::Sender<Event>>,
    pub(super) errors: std::sync::OnceLock<broadcast::Sender<SequencedError>>,
    pub(super) ring: Mutex<ErrorRing>,
    log_limits: [LogLimiter; 4],
}

/// Where the current interval started: the totals then.
struct Base {
    counters: Counters,
    at: Instant,
    rejected_by: BTreeMap<ErrorId, u64>,
    refused_by: BTreeMap<ErrorId, u64>,
    handshake_failures_by: BTreeMap<ErrorId, u64>,
    latency: Vec<u64>,
}

#[derive(Default)]
pub(super) struct ErrorRing {
    pub(super) next_seq: u64,
    pub(super) items: VecDeque<SequencedError>,
}

impl fmt::Debug for Recorder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Recorder").finish_non_exhaustive()
    }
}

impl Recorder {
    pub(crate) fn new(domus: &DomusId) -> Arc<Self> {
        let now = Instant::now();
        Arc::new(Self {
            domus: domus.to_string(),
            started: now,
            counters: CounterCells::default(),
            base: Mutex::new(Base {
                counters: Counters::default(),
                at: now,
                rejected_by: BTreeMap::new(),
                refused_by: BTreeMap::new(),
                handshake_failures_by: BTreeMap::new(),
                latency: vec![0; LATENCY_BUCKETS],
            }),
            peers: GaugeCell::default(),
            primary_calles: GaugeCell::default(),
            blob_calles: GaugeCell::default(),
            blob_streams: GaugeCell::default(),
            rejected_by: Mutex::new(BTreeMap::new()),
            refused_by: Mutex::new(BTreeMap::new()),
            handshake_failures_by: Mutex::new(BTreeMap::new()),
            latency: Lines(std::array::from_fn(|_| AtomicU64::new(0))),
            per_peer: Mutex::new(HashMap::new()),
            listener: std::sync::OnceLock::new(),
            crypto_provider: std::sync::OnceLock::new(),
            retained_replies: std::sync::OnceLock::new(),
            topics: Mutex::new(None),
            events: std::sync::OnceLock::new(),
            errors: std::sync::OnceLock::new(),
            ring: Mutex::new(ErrorRing {
                next_seq: 1,
                items: VecDeque::new(),
            }),
            log_limits: Default::default(),
        })
    }

    /// Adds `n` to a counter.
    pub(crate) fn add(&self, c: Counter, n: u64) {
        self.counters.cell(c).fetch_add(n, Ordering::Relaxed);
    }

    /// Adds one to a counter.
    pub(crate) fn inc(&self, c: Counter) {
        self.add(c, 1);
    }

    pub(crate) fn callis(&self, kind: CallisKind, peer: &DomusId, up: bool) {
        let (gauge, opened, closed) = match kind {
            CallisKind::Primary => (
                &self.primary_calles,
                Counter::primary_calles_opened,
                Counter::primary_calles_closed,
            ),
            CallisKind::Blob => (
                &self.blob_calles,
                Counter::blob_calles_opened,
                Counter::blob_calles_closed,
            ),
        };
        if up {
            self.inc(opened);
            gauge.add(1);
            self.event(Event::CallisUp {
                peer: peer.clone(),
                kind,
            });
        } else {
            self.inc(closed);
            gauge.add(-1);
            self.event(Event::CallisDown {
                peer: peer.clone(),
                kind,
            });
        }
    }

    pub(crate) fn blob_stream(&self, opened: bool) {
        self.blob_streams.add(if opened { 1 } else { -1 });
    }

    pub(crate) fn peer_added(&self, peer: &DomusId) -> Arc<PeerCells> {
        let cells = Arc::new(PeerCells::default());
        let mut map = self.per_peer.lock().unwrap_or_else(PoisonError::into_inner);
        if map.insert(peer.clone(), cells.clone()).is_none() {
            self.peers.add(1);
        }
        cells
    }

    /// Whether `peer`'s primary callis is open now, and how many primary calles are open.
    pub(crate) fn connection_census(&self, peer: &DomusId) -> (bool, u64) {
        let connected = self
            .per_peer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(peer)
            .is_some_and(|c| c.connected.load(Ordering::Relaxed));
        (
            connected,
            self.primary_calles.current.load(Ordering::Relaxed),
        )
    }

    /// Lets snapshots read the listener's admission counters.
    pub(crate) fn set_listener(&self, handle: crate::a0_transport::StatsHandle) {
        let _ = self.listener.set(handle);
    }

    /// Lets snapshots read the reply bytes the domus keeps.
    /// Sets (or with `None` clears) where the topic service's figures are read.
    pub(crate) fn set_topics(&self, source: Option<TopicsSource>) {
        *self.topics.lock().unwrap_or_else(PoisonError::into_inner) = source;
    }

    fn topics_figures(&self) -> Option<super::snapshot::TopicsFigures> {
        let guard = self.topics.lock().unwrap_or_else(PoisonError::into_inner);
        guard.as_ref().and_then(|read| read())
    }

    pub(crate) fn set_retained_replies(&self, read: Box<dyn Fn() -> u64 + Send + Sync>) {
        let _ = self.retained_replies.set(read);
    }

    /// Records which crypto provider the domus runs on.
    pub(crate) fn set_crypto_provider(&self, name: &'static str) {
        let _ = self.crypto_provider.set(name);
    }

    /// The crypto provider's name (`"none"` before the domus chose one).
    pub(crate) fn crypto_provider(&self) -> &'static str {
        self.crypto_provider.get().copied().unwrap_or("none")
    }

    /// A peer was forgotten (idle, `peer_retire_after`): its figures leave the snapshot.
    pub(crate) fn peer_removed(&self, peer: &DomusId) {
        let mut map = self.per_peer.lock().unwrap_or_else(PoisonError::into_inner);
        if map.remove(peer).is_some() {
            self.peers.add(-1);
        }
    }

    pub(crate) fn peers_cleared(&self) {
        let mut map = self.per_peer.lock().unwrap_or_else(PoisonError::into_inner);
        let n = map.len() as i64;
        map.clear();
        self.peers.add(-n);
    }

    pub(crate) fn rejected(&self, id: ErrorId) {
        self.inc(Counter::messages_rejected);
        *self
            .rejected_by
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(id)
            .or_default() += 1;
    }

    /// A message from a peer refused before any handler saw it.
    pub(crate) fn refused(&self, id: ErrorId) {
        self.inc(Counter::messages_refused);
        *self
            .refused_by
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(id)
            .or_default() += 1;
    }

    /// A peer broke the protocol on a callis (which is being closed): counted, logged
    /// (rate-limited) and published on the error feed with the peer's identity.
    pub(crate) fn protocol_violation(&self, peer: &DomusId, error: &Error) {
        self.inc(Counter::protocol_violations);
        if let Some(suppressed) = self.log_allowed(LogKind::ProtocolViolation) {
            tracing::warn!(%peer, error = %error, suppressed, "protocol violation; callis closed");
        }
        self.error(Error::new(
            error.id(),
            format!("{peer}: {}", error.message()),
        ));
    }

    pub(crate) fn handshake_failed(&self, error: &Error) {
        self.inc(Counter::handshake_failures);
        if error.id() == ErrorId::IdentityMismatch {
            self.inc(Counter::identity_mismatches);
        }
        *self
            .handshake_failures_by
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(error.id())
            .or_default() += 1;
        self.error(error.clone());
    }

    /// Records one send-to-answer latency.
    pub(crate) fn latency(&self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        self.add_latency(latency_bucket(us), 1);
    }

    /// Adds `n` answers to latency bucket `bucket` (see [`latency_bucket`]).
    pub(crate) fn add_latency(&self, bucket: usize, n: u64) {
        if let Some(cell) = self.latency.0.get(bucket) {
            cell.fetch_add(n, Ordering::Relaxed);
        }
    }

    /// Microseconds since the domus started (for pending-age stamps).
    pub(crate) fn now_us(&self) -> u64 {
        self.us_at(Instant::now())
    }

    /// [`now_us`](Self::now_us) for an instant the caller read already (a driver reads the
    /// clock once per turn).
    pub(crate) fn us_at(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.started).as_micros())
            .unwrap_or(u64::MAX)
            .max(1)
    }

    /// Whether a warning of `kind` may be logged now (see [`LOG_LINES_PER_WINDOW`]); if so,
    /// how many of that kind were suppressed before it.
    pub(crate) fn log_allowed(&self, kind: LogKind) -> Option<u64> {
        let limiter = match kind {
            LogKind::AcceptFailed => &self.log_limits[0],
            LogKind::CallisRefused => &self.log_limits[1],
            LogKind::ProtocolViolation => &self.log_limits[2],
            LogKind::InlineHandlerSlow => &self.log_limits[3],
        };
        limiter.allow(self.now_us())
    }

    /// Publishes an event; never blocks (a subscriber that falls behind misses the oldest).
    pub(crate) fn event(&self, event: Event) {
        if let Some(feed) = self.events.get() {
            let _ = feed.send(event);
        }
    }

    /// Publishes an error on the error feed and keeps it in the ring.
    pub(crate) fn error(&self, error: Error) {
        let item = {
            let mut ring = self.ring.lock().unwrap_or_else(PoisonError::into_inner);
            let seq = ring.next_seq;
            ring.next_seq = seq.saturating_add(1);
            if ring.items.len() >= ERROR_RING_LEN {
                ring.items.pop_front();
            }
            let item = SequencedError { seq, error };
            ring.items.push_back(item.clone());
            item
        };
        if let Some(feed) = self.errors.get() {
            let _ = feed.send(item);
        }
    }

    pub(super) fn snapshot(&self, reset: bool) -> Snapshot {
        let totals = self.counters.load();
        let buckets: Vec<u64> = self
            .latency
            .0
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        let rejected_total = self
            .rejected_by
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let refused_total = self
            .refused_by
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let handshake_total = self
            .handshake_failures_by
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let topics = self.topics_figures();
        let mut base = self.base.lock().unwrap_or_else(PoisonError::into_inner);
        let counters = totals.minus(&base.counters);
        let interval = base.at.elapsed();
        let rejected_by = minus_map(&rejected_total, &base.rejected_by);
        let refused_by = minus_map(&refused_total, &base.refused_by);
        let handshake_failures_by = minus_map(&handshake_total, &base.handshake_failures_by);
        let delta_buckets: Vec<u64> = buckets
            .iter()
            .zip(base.latency.iter())
            .map(|(a, b)| a.saturating_sub(*b))
            .collect();
        let snapshot = Snapshot {
            counters,
            totals: totals.clone(),
            peers: self.peers.read(),
            primary_calles: self.primary_calles.read(),
            blob_calles: self.blob_calles.read(),
            blob_streams: self.blob_streams.read(),
            rejected_by,
            refused_by,
            handshake_failures_by,
            latency: latency_of(delta_buckets),
            per_peer: self.per_peer_reports(),
            listener: self
                .listener
                .get()
                .map(crate::a0_transport::StatsHandle::stats)
                .unwrap_or_default(),
            retained_reply_bytes: self.retained_replies.get().map_or(0, |read| read()),
            interval,
            crypto_provider: self.crypto_provider(),
            topics,
        };
        if reset {
            *base = Base {
                counters: totals,
                at: Instant::now(),
                rejected_by: rejected_total,
                refused_by: refused_total,
                handshake_failures_by: handshake_total,
                latency: buckets,
            };
            for g in [
                &self.peers,
                &self.primary_calles,
                &self.blob_calles,
                &self.blob_streams,
            ] {
                g.reset_peak();
            }
        }
        snapshot
    }

    #[cfg(feature = "metrics")]
    pub(super) fn rejected_totals(&self) -> BTreeMap<ErrorId, u64> {
        self.rejected_by
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    #[cfg(feature = "metrics")]
    pub(super) fn refused_totals(&self) -> BTreeMap<ErrorId, u64> {
        self.refused_by
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    #[cfg(feature = "metrics")]
    pub(super) fn handshake_failure_totals(&self) -> BTreeMap<ErrorId, u64> {
        self.handshake_failures_by
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    #[cfg(feature = "metrics")]
    pub(super) fn latency_totals(&self) -> Latency {
        latency_of(
            self.latency
                .0
                .iter()
                .map(|b| b.load(Ordering::Relaxed))
                .collect(),
        )
    }

    pub(super) fn per_peer_reports(&self) -> Vec<PeerReport> {
        let now = self.now_us();
        let map = self.per_peer.lock().unwrap_or_else(PoisonError::into_inner);
        let mut out: Vec<PeerReport> = map
            .iter()
            .map(|(peer, c)| {
                let rtt = c.rtt_us.load(Ordering::Relaxed);
                let oldest = c.oldest_pending_at_us.load(Ordering::Relaxed);
                PeerReport {
                    peer: peer.clone(),
                    connected: c.connected.load(Ordering::Relaxed),
                    rtt: (rtt > 0).then(|| Duration::from_micros(rtt)),
                    in_flight: c.in_flight.load(Ordering::Relaxed),
                    queue_depth: c.queue_depth.load(Ordering::Relaxed),
                    oldest_pending: (oldest > 0)
                        .then(|| Duration::from_micros(now.saturating_sub(oldest))),
                    bytes_in: c.bytes_in.load(Ordering::Relaxed),
                    bytes_out: c.bytes_out.load(Ordering::Relaxed),
                    messages_out: c.messages_out.load(Ordering::Relaxed),
                    messages_in: c.messages_in.load(Ordering::Relaxed),
                    identity: c.identity.load_full().map(|i| (*i).clone()),
                }
            })
            .collect();
        out.sort_by(|a, b| a.peer.cmp(&b.peer));
        out
    }
}

fn minus_map(
    now: &BTreeMap<ErrorId, u64>,
    base: &BTreeMap<ErrorId, u64>,
) -> BTreeMap<ErrorId, u64> {
    now.iter()
        .map(|(k, v)| (*k, v.saturating_sub(base.get(k).copied().unwrap_or(0))))
        .filter(|(_, v)| *v > 0)
        .collect()
}

fn latency_of(buckets: Vec<u64>) -> Latency {
    let count: u64 = buckets.iter().sum();
    let quantile = |q: f64| -> Duration {
        if count == 0 {
            return Duration::ZERO;
        }
        let target = ((count as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0u64;
        for (i, n) in buckets.iter().enumerate() {
            seen = seen.saturating_add(*n);
            if seen >= target {
                return Duration::from_micros(1u64 << i.min(63));
            }
        }
        Duration::from_micros(1u64 << (LATENCY_BUCKETS - 1))
    };
    Latency {
        count,
        p50: quantile(0.50),
        p90: quantile(0.90),
        p99: quantile(0.99),
        buckets,
    }
}

/// The latency bucket of an answer that took `us` microseconds: bucket `i` holds answers
/// within `2^i` µs.
pub(crate) fn latency_bucket(us: u64) -> usize {
    let us = us.max(1);
    ((64 - (us - 1).leading_zeros()) as usize).min(LATENCY_BUCKETS - 1)
}

/// Counts a driver keeps while it works and publishes into the [`Recorder`] once per turn,
/// so the message path touches no shared counter per message.
#[derive(Debug, Default)]
pub(crate) struct TurnCounts {
    sent: u64,
    received: u64,
    accepted: u64,
    replied: u64,
    latency: [u32; LATENCY_BUCKETS],
    dirty: bool,
}

impl TurnCounts {
    pub(crate) fn sent(&mut self) {
        self.sent = self.sent.saturating_add(1);
        self.dirty = true;
    }

    pub(crate) fn received(&mut self) {
        self.received = self.received.saturating_add(1);
        self.dirty = true;
    }

    /// An answered send: accepted (else replied), after `us` microseconds.
    pub(crate) fn answered(&mut self, accepted: bool, us: u64) {
        if accepted {
            self.accepted = self.accepted.saturating_add(1);
        } else {
            self.replied = self.replied.saturating_add(1);
        }
        if let Some(cell) = self.latency.get_mut(latency_bucket(us)) {
            *cell = cell.saturating_add(1);
        }
        self.dirty = true;
    }

    /// Adds everything counted since the last publish to `rec` (and the messages to the
    /// peer's `cells`), and starts again.
    pub(crate) fn publish(&mut self, rec: &Recorder, cells: &PeerCells) {
        if !std::mem::take(&mut self.dirty) {
            return;
        }
        if self.sent > 0 {
            cells.messages_out.fetch_add(self.sent, Ordering::Relaxed);
        }
        if self.received > 0 {
            cells
                .messages_in
                .fetch_add(self.received, Ordering::Relaxed);
        }
        for (c, n) in [
            (Counter::messages_sent, std::mem::take(&mut self.sent)),
            (
                Counter::messages_received,
                std::mem::take(&mut self.received),
            ),
            (
                Counter::messages_accepted,
                std::mem::take(&mut self.accepted),
            ),
            (Counter::messages_replied, std::mem::take(&mut self.replied)),
        ] {
            if n > 0 {
                rec.add(c, n);
            }
        }
        for (bucket, n) in self.latency.iter_mut().enumerate() {
            if *n > 0 {
                rec.add_latency(bucket, u64::from(std::mem::take(n)));
            }
        }
    }
}
