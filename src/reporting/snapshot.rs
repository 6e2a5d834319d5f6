//! The figures a snapshot holds: the counters — one list, from which the public [`Counters`],
//! the atomic cells behind them and the enum producers name a counter with are all made —,
//! gauges with their peaks, the latency histogram, per-peer figures, and the [`Snapshot`] that
//! carries them.
//!
//! Plain data and the counter cells: no clock, no lock, no IO. Recording, reading and
//! resetting are the recorder's.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::a0_transport::DomusId;
use crate::error::ErrorId;

/// Atomic cells that start on a cache line of their own and share it with nothing else of
/// the recorder's (128 bytes: x86 fetches lines in pairs). The cells inside stay contiguous:
/// every driver adds to the same ones at the end of its turns (true sharing, once per turn),
/// and padding each would cost kilobytes per domus for nothing.
#[derive(Default)]
#[repr(align(128))]
pub(super) struct Lines<T>(pub(super) T);

macro_rules! counters {
    ($( $(#[$doc:meta])* $name:ident, )*) => {
        /// Counters, as deltas since the last
        /// [`Reporting::snapshot_and_reset`](super::Reporting::snapshot_and_reset) (or since
        /// the domus started).
        #[derive(Debug, Clone, Default, PartialEq, Eq)]
        #[non_exhaustive]
        pub struct Counters {
            $( $(#[$doc])* pub $name: u64, )*
        }

        /// One cell per counter, the block on cache lines of its own (see [`Lines`]):
        /// nothing the recorder reads on every call shares a line with them.
        #[derive(Default)]
        pub(super) struct CounterCells(Lines<CounterBlock>);

        #[derive(Default)]
        pub(super) struct CounterBlock {
            $( $name: AtomicU64, )*
        }

        impl CounterCells {
            pub(super) fn load(&self) -> Counters {
                Counters { $( $name: self.0.0.$name.load(Ordering::Relaxed), )* }
            }
        }

        impl Counters {
            pub(super) fn minus(&self, base: &Counters) -> Counters {
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
        pub(crate) enum Counter { $( $name, )* }

        impl CounterCells {
            pub(super) fn cell(&self, c: Counter) -> &AtomicU64 {
                match c { $( Counter::$name => &self.0.0.$name, )* }
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

/// A metrics snapshot (see [`Reporting::snapshot`](super::Reporting::snapshot)).
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
    /// The topic service's figures now, while it runs on this domus
    /// ([`crate::services::topics`]).
    pub topics: Option<TopicsFigures>,
}

/// What the topic service holds, as a [`Snapshot`] carries it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct TopicsFigures {
    /// As a publisher: subscriptions held for other domus (and this one).
    pub subscriptions: u64,
    /// As a publisher: distinct subscribers among them.
    pub subscribers: u64,
    /// As a publisher: subscribers with a lane (copies sent recently).
    pub lanes: u64,
    /// As a subscriber: this domus's own subscriptions.
    pub local_subscriptions: u64,
    /// As a publisher: each pattern held and how many subscribers hold it, most held first
    /// (at most [`TopicsFigures::MAX_PATTERNS`]).
    pub patterns: Vec<(String, u64)>,
}

impl TopicsFigures {
    /// The most patterns a snapshot lists.
    pub const MAX_PATTERNS: usize = 64;
}
