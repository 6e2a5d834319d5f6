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
//! [`Error`](crate::Error)'s escaping) and must not decide anything: it only records.
//!
//! Here: the [`Reporting`] handle an application reads. `snapshot.rs` holds the figures
//! (counters, gauges, latency, per-peer, [`Snapshot`]), `recorder.rs` the recorder producers
//! write into, `feeds.rs` the event and error feeds, `export.rs` the `metrics` mirror.

use std::sync::{Arc, PoisonError};

use tokio::sync::broadcast;

#[cfg(feature = "metrics")]
mod export;
#[cfg(feature = "metrics")]
pub use export::EXPORT_INTERVAL;

use crate::a0_transport::DomusId;

/// Errors kept for [`Reporting::errors_since`].
pub const ERROR_RING_LEN: usize = 1024;
/// Events buffered per subscriber before it starts missing some.
pub const EVENT_BUFFER_LEN: usize = 1024;
/// Buckets of the latency histogram: bucket `i` counts answers within `2^i` µs.
const LATENCY_BUCKETS: usize = 32;

mod feeds;
mod recorder;
mod snapshot;

pub use feeds::{
    CallisKind, ErrorReceiver, ErrorsSince, Event, EventReceiver, FeedItem, SequencedError,
};
pub use recorder::{LOG_LINES_PER_WINDOW, LOG_WINDOW};
pub(crate) use recorder::{LogKind, PeerCells, Recorder, TurnCounts};
pub(crate) use snapshot::Counter;
pub use snapshot::{Counters, Gauge, Latency, PeerReport, Snapshot, TopicsFigures};

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

    /// Sets (or clears) where the topic service's figures are read for snapshots.
    pub(crate) fn set_topics(&self, source: Option<recorder::TopicsSource>) {
        self.recorder.set_topics(source);
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
    use std::sync::atomic::Ordering;
    use std::time::Duration;

    use super::recorder::LogLimiter;
    use super::*;
    use crate::error::{Error, ErrorId};

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
            r.add(Counter::messages_sent, round);
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
