//! Reporting: what a domus is doing, for the application to read. Metrics (counters, gauges
//! with peaks, a send-latency histogram, per-peer figures), an event feed and an error feed.
//!
//! Producers (drivers, the accept loop, admission) only touch atomics and non-blocking
//! channels: reporting never blocks, never allocates per message, and never holds a lock
//! across an `.await` (the few locks here guard small tables and are held for a copy). Feeds
//! are bounded: a subscriber that falls behind is told how many items it missed; the error
//! ring keeps the last [`ERROR_RING_LEN`] errors and counts what it dropped.
//!
//! This module must not log peer-controlled text unescaped (everything passes through
//! [`Error`]'s escaping) and must not decide anything: it only records.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::broadcast;

#[cfg(feature = "metrics")]
mod export;
#[cfg(feature = "metrics")]
pub use export::EXPORT_INTERVAL;

use crate::a0_transport::DomusId;
use crate::error::{Error, ErrorId};

/// Errors kept for [`Reporting::errors_since`].
pub const ERROR_RING_LEN: usize = 1024;
/// Events buffered per subscriber before it starts missing some.
pub const EVENT_BUFFER_LEN: usize = 1024;
/// Buckets of the latency histogram: bucket `i` counts answers within `2^i` µs.
const LATENCY_BUCKETS: usize = 32;

/// Which callis an event or a byte count is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum CallisKind {
    /// The primary callis: messages and their answers.
    Primary,
    /// The blob callis.
    Blob,
}

/// Something that happened, from [`Reporting::events`].
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Event {
    /// A session with a peer opened (its primary callis said HELLO). A callis that replaces
    /// the current one at once (the tie-break between two dialled at the same time, or a
    /// replacement for `max_callis_age`) is a `CallisDown` and a `CallisUp` on the side that
    /// switches, not a `PeerDisconnected` and `PeerConnected` (unless the peer restarted);
    /// the other side may see the old callis close before the new one reaches it and then
    /// reports the peer down and up.
    PeerConnected {
        /// The peer.
        peer: DomusId,
        /// Whether the peer is a new run of a domus we knew (a restart).
        restarted: bool,
    },
    /// The primary callis to a peer closed; messages wait for the next one.
    PeerDisconnected {
        /// The peer.
        peer: DomusId,
        /// Why, when known.
        reason: Option<Error>,
    },
    /// A callis came up.
    CallisUp {
        /// The peer.
        peer: DomusId,
        /// Which callis.
        kind: CallisKind,
    },
    /// A callis went down.
    CallisDown {
        /// The peer.
        peer: DomusId,
        /// Which callis.
        kind: CallisKind,
    },
    /// Dialling a peer failed.
    DialFailed {
        /// The peer.
        peer: DomusId,
        /// Why.
        error: Error,
    },
    /// A peer restarted: its unanswered messages and open blobs failed with `PeerRestarted`.
    SessionRestarted {
        /// The peer.
        peer: DomusId,
    },
    /// A send waited for (or failed for lack of) room in a peer's in-flight budget.
    Backpressure {
        /// The peer.
        peer: DomusId,
    },
    /// A delivery was refused because a taberna's inbox was full.
    QueueOverrun {
        /// The taberna.
        taberna: u64,
    },
    /// [`ConfigHandle::update`](crate::ConfigHandle::update) applied a new configuration.
    ConfigReloaded,
    /// New authentication material is in force for new handshakes.
    AuthReloaded,
    /// `shutdown()` began.
    ShutdownStarted,
    /// `shutdown()` finished.
    ShutdownCompleted,
}

/// An item of a feed: the next item, or how many the subscriber missed by falling behind.
#[derive(Debug, Clone, PartialEq)]
pub enum FeedItem<T> {
    /// The next item.
    Item(T),
    /// This many items were dropped for this subscriber before the next one.
    Missed(u64),
}

/// A subscription to the event feed (from [`Reporting::events`]).
#[derive(Debug)]
pub struct EventReceiver {
    rx: broadcast::Receiver<Event>,
}

impl EventReceiver {
    /// The next event; `None` once the domus is gone.
    pub async fn recv(&mut self) -> Option<FeedItem<Event>> {
        match self.rx.recv().await {
            Ok(e) => Some(FeedItem::Item(e)),
            Err(broadcast::error::RecvError::Lagged(n)) => Some(FeedItem::Missed(n)),
            Err(broadcast::error::RecvError::Closed) => None,
        }
    }

    /// The next event if one is ready.
    pub fn try_recv(&mut self) -> Option<FeedItem<Event>> {
        match self.rx.try_recv() {
            Ok(e) => Some(FeedItem::Item(e)),
            Err(broadcast::error::TryRecvError::Lagged(n)) => Some(FeedItem::Missed(n)),
            Err(_) => None,
        }
    }
}

/// An error with its sequence number (1, 2, 3, … per domus).
#[derive(Debug, Clone, PartialEq)]
pub struct SequencedError {
    /// Its position in this domus's error feed.
    pub seq: u64,
    /// The error.
    pub error: Error,
}

/// The result of [`Reporting::errors_since`].
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ErrorsSince {
    /// Errors after the given sequence number, oldest first.
    pub errors: Vec<SequencedError>,
    /// Errors after the given sequence number that the ring no longer holds.
    pub missed: u64,
}

/// A subscription to the error feed (from [`Reporting::errors`]).
#[derive(Debug)]
pub struct ErrorReceiver {
    rx: broadcast::Receiver<SequencedError>,
}

impl ErrorReceiver {
    /// The next error; `None` once the domus is gone.
    pub async fn recv(&mut self) -> Option<FeedItem<SequencedError>> {
        match self.rx.recv().await {
            Ok(e) => Some(FeedItem::Item(e)),
            Err(broadcast::error::RecvError::Lagged(n)) => Some(FeedItem::Missed(n)),
            Err(broadcast::error::RecvError::Closed) => None,
        }
    }
}

macro_rules! counters {
    ($( $(#[$doc:meta])* $name:ident, )*) => {
        /// Counters, as deltas since the last [`Reporting::snapshot_and_reset`] (or since the
        /// domus started).
        #[derive(Debug, Clone, Default, PartialEq, Eq)]
        #[non_exhaustive]
        pub struct Counters {
            $( $(#[$doc])* pub $name: u64, )*
        }

        #[derive(Default)]
        struct CounterCells {
            $( $name: AtomicU64, )*
        }

        impl CounterCells {
            fn load(&self) -> Counters {
                Counters { $( $name: self.$name.load(Ordering::Relaxed), )* }
            }
        }

        impl Counters {
            fn minus(&self, base: &Counters) -> Counters {
                Counters { $( $name: self.$name.saturating_sub(base.$name), )* }
            }

            /// Every counter with its stable name (the names the `metrics` feature uses).
            pub fn named(&self) -> Vec<(&'static str, u64)> {
                vec![ $( (stringify!($name), self.$name), )* ]
            }
        }

        /// A counter a producer increments.
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        #[allow(non_camel_case_types)]
        pub(crate) enum C { $( $name, )* }

        impl CounterCells {
            fn cell(&self, c: C) -> &AtomicU64 {
                match c { $( C::$name => &self.$name, )* }
            }
        }
    };
}

counters! {
    /// Primary calles that opened (HELLO exchanged).
    primary_calles_opened,
    /// Primary calles that closed.
    primary_calles_closed,
    /// Blob calles that opened (BLOB_HELLO exchanged).
    blob_calles_opened,
    /// Blob calles that closed.
    blob_calles_closed,
    /// Dials started (primary and blob).
    dial_attempts,
    /// Dials that failed.
    dial_failures,
    /// Handshakes (either side) where the peer was not the identity expected.
    identity_mismatches,
    /// Calles closed because the peer broke the protocol.
    protocol_violations,
    /// Inbound handshakes that failed.
    handshake_failures,
    /// Messages handed to a peer's session (or a local taberna).
    messages_sent,
    /// Messages from peers that reached a local taberna's inbox (blob-opening messages
    /// included).
    messages_received,
    /// Messages from peers that vicus refused before any handler saw them (unknown taberna,
    /// allow-list, message type, full inbox, blob limits, a peer that does not read its
    /// answers); by reason in `Snapshot::refused_by`.
    messages_refused,
    /// Sends answered `Accepted`.
    messages_accepted,
    /// Sends answered with a reply.
    messages_replied,
    /// Sends rejected (by the receiving application or by vicus).
    messages_rejected,
    /// Sends that ended in `SendTimeout`.
    messages_timed_out,
    /// Sends that failed otherwise (peer restarted, unavailable, domus closed, …).
    messages_failed,
    /// Outbound queue overruns of class A2 (vicus's own messages, such as blob opens): refused
    /// for lack of in-flight room to the peer, at once or when the wait for room reached the
    /// deadline (`LocalQueueFull`, or `PeerUnavailable` / `PeerShutDown` when the peer could
    /// not be reached). Control frames never queue past their
    /// bounds (acknowledgements are batched, owed PONGs coalesced), so they have no counter.
    queue_overruns_send_a2,
    /// Outbound queue overruns of class A3 (application messages), counted as for A2.
    queue_overruns_send_a3,
    /// Deliveries refused because a taberna's inbox was full (`TabernaBusy`).
    queue_overruns_inbox,
    /// Sampled calls of inline handlers that took longer than `SLOW_INLINE_CALL` (one call in
    /// 64 is timed): a handler that blocks the driver it runs on.
    inline_handlers_slow,
    /// Authenticated inbound calles refused by the connection limits
    /// (`max_unopened_calles_per_peer`, `max_unopened_calles`, `max_peers`; T8).
    calles_refused,
    /// Bytes read from primary calles (after TLS).
    primary_bytes_in,
    /// Bytes written to primary calles (before TLS).
    primary_bytes_out,
    /// Bytes read from blob calles.
    blob_bytes_in,
    /// Bytes written to blob calles.
    blob_bytes_out,
    /// Blob streams opened (either direction).
    blob_streams_opened,
    /// Blob streams completed (either direction).
    blob_streams_completed,
    /// Blob streams cancelled or failed (either direction).
    blob_streams_cancelled,
}

/// Gauges: the value now and the highest value since the last reset.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Gauge {
    /// The value now.
    pub current: u64,
    /// The highest value since the last reset.
    pub peak: u64,
}

/// Send-to-answer latency of remote sends since the last reset.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Latency {
    /// Answers measured.
    pub count: u64,
    /// Median, upper bound of its power-of-two bucket.
    pub p50: Duration,
    /// 90th percentile, same resolution.
    pub p90: Duration,
    /// 99th percentile, same resolution.
    pub p99: Duration,
    /// Counts per bucket: entry `i` counts answers that took at most `2^i` µs.
    pub buckets: Vec<u64>,
}

/// Per-peer figures.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct PeerReport {
    /// The peer.
    pub peer: DomusId,
    /// Whether its primary callis is open now.
    pub connected: bool,
    /// The last keepalive round-trip time.
    pub rtt: Option<Duration>,
    /// Sends waiting for an answer.
    pub in_flight: u64,
    /// Messages and answers queued but not yet written.
    pub queue_depth: u64,
    /// How long the oldest unanswered send has waited.
    pub oldest_pending: Option<Duration>,
    /// Bytes read from this peer (both calles).
    pub bytes_in: u64,
    /// Bytes written to this peer (both calles).
    pub bytes_out: u64,
    /// Messages handed to this peer's session (as `Counters::messages_sent`, for this peer).
    pub messages_out: u64,
    /// Messages from this peer that reached a local taberna (as
    /// `Counters::messages_received`, for this peer).
    pub messages_in: u64,
    /// What the peer proved in the handshake of its current (or last) primary callis: its
    /// certificate's fingerprint, and its process credentials over a Unix socket.
    pub identity: Option<crate::a0_transport::PeerIdentity>,
}

/// A metrics snapshot (see [`Reporting::snapshot`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Snapshot {
    /// Counter deltas since the last reset.
    pub counters: Counters,
    /// Counters since the domus started.
    pub totals: Counters,
    /// Peers with a session (driver), connected or not.
    pub peers: Gauge,
    /// Primary calles open.
    pub primary_calles: Gauge,
    /// Blob calles open.
    pub blob_calles: Gauge,
    /// Blob streams open (both directions).
    pub blob_streams: Gauge,
    /// Rejections since the last reset by error id (`RemoteTabernaRejected` for the
    /// application's own, `UnknownTaberna`, `TabernaBusy`, …).
    pub rejected_by: BTreeMap<ErrorId, u64>,
    /// Messages from peers refused before any handler saw them, since the last reset, by
    /// error id (`UnknownTaberna`, `Forbidden`, `MessageTypeNotAccepted`, `TabernaBusy`, …).
    pub refused_by: BTreeMap<ErrorId, u64>,
    /// Inbound handshake failures since the last reset by reason.
    pub handshake_failures_by: BTreeMap<ErrorId, u64>,
    /// Send-to-answer latency since the last reset.
    pub latency: Latency,
    /// Per-peer figures now.
    pub per_peer: Vec<PeerReport>,
    /// The listener's admission and handshake counters since it was bound (connections
    /// refused before TLS by the pre-authentication limits — in total, per source, by connect
    /// rate, by uid — and handshake outcomes); not reset by `snapshot_and_reset`.
    pub listener: crate::a0_transport::ListenerStats,
    /// Reply bytes this domus keeps now so replies survive a reconnect, for all peers
    /// together (bounded by `max_retained_reply_bytes`; each is freed once its sender said it
    /// saw it).
    pub retained_reply_bytes: u64,
    /// Time covered by the deltas.
    pub interval: Duration,
    /// The TLS crypto provider this domus runs on: `"aws-lc-rs"`, `"ring"`, or `"custom"`
    /// (one passed to `DomusBuilder::crypto_provider`).
    pub crypto_provider: &'static str,
}

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
struct LogLimiter {
    window: AtomicU64,
    lines: AtomicU64,
    suppressed: AtomicU64,
}

impl LogLimiter {
    /// Whether a line may be logged now; if so, how many were suppressed before it.
    fn allow(&self, now_us: u64) -> Option<u64> {
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

/// The shared recorder behind [`Reporting`].
pub(crate) struct Recorder {
    /// The domus's id, as a label for exported metrics and for [`Reporting::identity`].
    domus: String,
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
    latency: [AtomicU64; LATENCY_BUCKETS],
    per_peer: Mutex<HashMap<DomusId, Arc<PeerCells>>>,
    /// The domus's listener, once bound.
    listener: std::sync::OnceLock<crate::a0_transport::StatsHandle>,
    /// The crypto provider's name, once the domus has chosen it.
    crypto_provider: std::sync::OnceLock<&'static str>,
    /// Reads the reply bytes the domus keeps (its reply budget), once the domus has one.
    retained_replies: std::sync::OnceLock<Box<dyn Fn() -> u64 + Send + Sync>>,
    /// The feeds, made on the first subscription (each holds `EVENT_BUFFER_LEN` slots; a
    /// domus nobody listens to need not pay for them).
    events: std::sync::OnceLock<broadcast::Sender<Event>>,
    errors: std::sync::OnceLock<broadcast::Sender<SequencedError>>,
    ring: Mutex<ErrorRing>,
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
struct ErrorRing {
    next_seq: u64,
    items: VecDeque<SequencedError>,
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
            latency: std::array::from_fn(|_| AtomicU64::new(0)),
            per_peer: Mutex::new(HashMap::new()),
            listener: std::sync::OnceLock::new(),
            crypto_provider: std::sync::OnceLock::new(),
            retained_replies: std::sync::OnceLock::new(),
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
    pub(crate) fn add(&self, c: C, n: u64) {
        self.counters.cell(c).fetch_add(n, Ordering::Relaxed);
    }

    /// Adds one to a counter.
    pub(crate) fn inc(&self, c: C) {
        self.add(c, 1);
    }

    pub(crate) fn callis(&self, kind: CallisKind, peer: &DomusId, up: bool) {
        let (gauge, opened, closed) = match kind {
            CallisKind::Primary => (
                &self.primary_calles,
                C::primary_calles_opened,
                C::primary_calles_closed,
            ),
            CallisKind::Blob => (
                &self.blob_calles,
                C::blob_calles_opened,
                C::blob_calles_closed,
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
        self.inc(C::messages_rejected);
        *self
            .rejected_by
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(id)
            .or_default() += 1;
    }

    /// A message from a peer refused before any handler saw it.
    pub(crate) fn refused(&self, id: ErrorId) {
        self.inc(C::messages_refused);
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
        self.inc(C::protocol_violations);
        if let Some(suppressed) = self.log_allowed(LogKind::ProtocolViolation) {
            tracing::warn!(%peer, error = %error, suppressed, "protocol violation; callis closed");
        }
        self.error(Error::new(
            error.id(),
            format!("{peer}: {}", error.message()),
        ));
    }

    pub(crate) fn handshake_failed(&self, error: &Error) {
        self.inc(C::handshake_failures);
        if error.id() == ErrorId::IdentityMismatch {
            self.inc(C::identity_mismatches);
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
        if let Some(cell) = self.latency.get(bucket) {
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

    fn snapshot(&self, reset: bool) -> Snapshot {
        let totals = self.counters.load();
        let buckets: Vec<u64> = self
            .latency
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
    fn rejected_totals(&self) -> BTreeMap<ErrorId, u64> {
        self.rejected_by
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    #[cfg(feature = "metrics")]
    fn refused_totals(&self) -> BTreeMap<ErrorId, u64> {
        self.refused_by
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    #[cfg(feature = "metrics")]
    fn handshake_failure_totals(&self) -> BTreeMap<ErrorId, u64> {
        self.handshake_failures_by
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    #[cfg(feature = "metrics")]
    fn latency_totals(&self) -> Latency {
        latency_of(
            self.latency
                .iter()
                .map(|b| b.load(Ordering::Relaxed))
                .collect(),
        )
    }

    fn per_peer_reports(&self) -> Vec<PeerReport> {
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
            (C::messages_sent, std::mem::take(&mut self.sent)),
            (C::messages_received, std::mem::take(&mut self.received)),
            (C::messages_accepted, std::mem::take(&mut self.accepted)),
            (C::messages_replied, std::mem::take(&mut self.replied)),
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

/// What a domus is doing: metrics, events and errors. From
/// [`Domus::reporting`](crate::Domus::reporting); cheap to clone.
#[derive(Debug, Clone)]
pub struct Reporting {
    pub(crate) recorder: Arc<Recorder>,
}

impl Reporting {
    /// Metrics now: counter deltas since the last reset (and totals), gauges with their peaks
    /// since the last reset, latency since the last reset, per-peer figures now.
    pub fn snapshot(&self) -> Snapshot {
        self.recorder.snapshot(false)
    }

    /// Like [`snapshot`](Self::snapshot), then starts a new interval: counters, peaks and
    /// latency restart from here.
    pub fn snapshot_and_reset(&self) -> Snapshot {
        self.recorder.snapshot(true)
    }

    /// Subscribes to the event feed (events from now on).
    pub fn events(&self) -> EventReceiver {
        EventReceiver {
            rx: self
                .recorder
                .events
                .get_or_init(|| broadcast::channel(EVENT_BUFFER_LEN).0)
                .subscribe(),
        }
    }

    /// Subscribes to the error feed (errors from now on).
    pub fn errors(&self) -> ErrorReceiver {
        ErrorReceiver {
            rx: self
                .recorder
                .errors
                .get_or_init(|| broadcast::channel(EVENT_BUFFER_LEN).0)
                .subscribe(),
        }
    }

    /// The identity of the domus these figures are about.
    pub fn identity(&self) -> &str {
        &self.recorder.domus
    }

    /// Up to `limit` errors with a sequence number greater than `seq` (0 for all kept),
    /// oldest first, and how many of those the ring no longer holds.
    pub fn errors_since(&self, seq: u64, limit: usize) -> ErrorsSince {
        let ring = self
            .recorder
            .ring
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let oldest_kept = ring.items.front().map_or(ring.next_seq, |e| e.seq);
        let missed = oldest_kept.saturating_sub(seq.saturating_add(1));
        let errors = ring
            .items
            .iter()
            .filter(|e| e.seq > seq)
            .take(limit)
            .cloned()
            .collect();
        ErrorsSince { errors, missed }
    }

    /// The sequence number of the latest error (0 when there was none).
    pub fn last_error_seq(&self) -> u64 {
        self.recorder
            .ring
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .next_seq
            .saturating_sub(1)
    }

    /// The peers whose primary callis is open now.
    pub fn connected_peers(&self) -> Vec<DomusId> {
        self.recorder
            .per_peer_reports()
            .into_iter()
            .filter(|p| p.connected)
            .map(|p| p.peer)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn test_id() -> DomusId {
        DomusId::spiffe("vicus.dev", "test").expect("id")
    }

    #[test]
    fn latency_quantiles_come_from_power_of_two_buckets() {
        let r = Recorder::new(&test_id());
        for us in [1u64, 3, 3, 10, 100, 1000, 1000, 1000, 1000, 5000] {
            r.latency(Duration::from_micros(us));
        }
        let l = r.snapshot(false).latency;
        assert_eq!(l.count, 10);
        assert_eq!(l.p50, Duration::from_micros(128));
        assert_eq!(l.p90, Duration::from_micros(1024));
        assert_eq!(l.p99, Duration::from_micros(8192));
    }

    #[test]
    fn t30_the_error_ring_is_bounded_and_counts_what_it_dropped() {
        let r = Recorder::new(&test_id());
        let reporting = Reporting {
            recorder: r.clone(),
        };
        for i in 0..(ERROR_RING_LEN as u64 + 500) {
            r.error(Error::new(ErrorId::ProtocolViolation, format!("e{i}")));
        }
        let all = reporting.errors_since(0, usize::MAX);
        assert_eq!(all.errors.len(), ERROR_RING_LEN);
        assert_eq!(all.missed, 500);
        assert_eq!(all.errors[0].seq, 501);
        let tail = reporting.errors_since(reporting.last_error_seq() - 3, 2);
        assert_eq!(tail.missed, 0);
        assert_eq!(
            tail.errors.iter().map(|e| e.seq).collect::<Vec<_>>(),
            vec![
                reporting.last_error_seq() - 2,
                reporting.last_error_seq() - 1
            ]
        );
    }

    #[test]
    fn t30_a_million_warnings_log_at_most_the_budget_per_window_and_count_the_rest() {
        let limiter = LogLimiter::default();
        let window_us = LOG_WINDOW.as_micros() as u64;
        let mut logged = 0u64;
        let mut reported_suppressed = 0u64;
        // 1M warnings spread over three windows.
        for i in 0..1_000_000u64 {
            let now = i * (3 * window_us) / 1_000_000;
            if let Some(suppressed) = limiter.allow(now) {
                logged += 1;
                reported_suppressed += suppressed;
            }
        }
        assert_eq!(logged, 3 * LOG_LINES_PER_WINDOW);
        // Every suppressed line is reported with a later line, except those after the last one.
        let pending = limiter.suppressed.load(Ordering::Relaxed);
        assert_eq!(logged + reported_suppressed + pending, 1_000_000);
    }

    #[test]
    fn deltas_add_up_to_totals_and_peaks_restart_at_reset() {
        let r = Recorder::new(&test_id());
        let rep = Reporting {
            recorder: r.clone(),
        };
        let mut sum = 0;
        for round in 1..=5u64 {
            r.add(C::messages_sent, round);
            r.blob_stream(true);
            sum += rep.snapshot_and_reset().counters.messages_sent;
        }
        let s = rep.snapshot();
        assert_eq!(sum, 15);
        assert_eq!(s.totals.messages_sent, 15);
        assert_eq!(s.counters.messages_sent, 0);
        assert_eq!(
            s.blob_streams,
            Gauge {
                current: 5,
                peak: 5
            }
        );
        for _ in 0..5 {
            r.blob_stream(false);
        }
        rep.snapshot_and_reset();
        r.blob_stream(true);
        assert_eq!(
            rep.snapshot().blob_streams,
            Gauge {
                current: 1,
                peak: 1
            }
        );
    }
}
