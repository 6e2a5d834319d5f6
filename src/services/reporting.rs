//! The reporting service (feature `reporting-service`): a domus serves its metrics snapshot,
//! its recent events and its recent errors to the peers on an allow-list, so a remote viewer
//! (`vicus top`) can watch it without any extra port or HTTP server.
//!
//! * [`serve`] registers the taberna [`REPORTING_TABERNA`] (only the allowed identities may
//!   deliver to it; others are answered `Forbidden` before the service sees them) and answers
//!   each [`REPORT`] request with a [`RemoteReport`] as JSON.
//! * [`fetch`] asks for one: route [`REPORTING_TABERNA`] to the node (its address, and its
//!   identity when known) in the asking domus's resolver first.
//! * A request says which events and errors the asker has seen (`events_after`,
//!   `errors_after`); the reply carries the newer ones (at most [`MAX_EVENTS`] and
//!   [`MAX_ERRORS`]) and how many were missed. Events are numbered by the service from its
//!   start; errors by the domus's error feed.
//!
//! A report holds no key material and no payloads: counters, gauges, latency, per-peer
//! figures (at most [`MAX_PEERS`]), and the text of events and errors. The service must not
//! answer a peer that is not allowed, must not grow with the number of requests (its event
//! ring is bounded), and stops when its [`ReportingService`] handle is dropped or the domus
//! shuts down.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio_util::task::AbortOnDropHandle;

use crate::a0_transport::DomusId;
use crate::domus::{Delivery, Domus, SendOptions};
use crate::error::{Error, ErrorId};
use crate::reporting::{Event, FeedItem, Snapshot};
use crate::taberna::{MessageType, TabernaId, TabernaOptions};

/// The taberna the reporting service answers on.
pub const REPORTING_TABERNA: TabernaId = TabernaId(crate::domus::RESERVED_TABERNA_BASE + 1);
/// The A2 message type of a report request.
pub const REPORT: MessageType = MessageType(0x0001_0001);
/// The version of [`RemoteReport`]'s JSON shape.
pub const REPORT_VERSION: u32 = 1;
/// The most events a report carries (and the service keeps).
pub const MAX_EVENTS: usize = 256;
/// The most errors a report carries.
pub const MAX_ERRORS: usize = 64;
/// The most peers a report lists (the busiest by bytes first).
pub const MAX_PEERS: usize = 512;
/// The largest request accepted.
const MAX_REQUEST_LEN: usize = 1024;

/// What a request asks for: what the asker has already seen.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReportRequest {
    /// Events with a sequence number above this are sent.
    #[serde(default)]
    pub events_after: u64,
    /// Errors with a sequence number above this are sent.
    #[serde(default)]
    pub errors_after: u64,
}

/// A domus's figures as the reporting service sends them (JSON, shape [`REPORT_VERSION`]).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct RemoteReport {
    /// [`REPORT_VERSION`].
    pub version: u32,
    /// The reporting domus's identity.
    pub identity: String,
    /// Its TLS crypto provider.
    pub crypto_provider: String,
    /// Time covered by the counters (since the domus started, unless it resets its own
    /// snapshots).
    pub interval_ms: u64,
    /// Counter totals since the domus started, by name (`messages_sent`, `bytes_in`, …).
    pub totals: BTreeMap<String, u64>,
    /// Gauges now: `peers`, `primary_calles`, `blob_calles`, `blob_streams`,
    /// `retained_reply_bytes`, `pending_handshakes`.
    pub gauges: BTreeMap<String, u64>,
    /// Send-to-answer latency: answers measured and p50/p90/p99 in microseconds.
    pub latency: LatencyReport,
    /// Per-peer figures (at most [`MAX_PEERS`]).
    pub peers: Vec<PeerFigures>,
    /// Events after the request's `events_after`, oldest first.
    pub events: Vec<EventReport>,
    /// Events the service no longer held (or dropped while falling behind).
    pub events_missed: u64,
    /// Errors after the request's `errors_after`, oldest first.
    pub errors: Vec<ErrorReport>,
    /// Errors the domus's ring no longer held.
    pub errors_missed: u64,
    /// The topic service's figures, when it runs on the domus (absent from reports of
    /// domus before it).
    #[serde(default)]
    pub topics: Option<TopicsReport>,
}

/// The topic service's figures in a [`RemoteReport`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicsReport {
    /// Subscriptions the domus holds as a publisher.
    pub subscriptions: u64,
    /// Distinct subscribers among them.
    pub subscribers: u64,
    /// Subscribers with a lane (copies sent recently).
    pub lanes: u64,
    /// The domus's own subscriptions.
    pub local_subscriptions: u64,
    /// Patterns held and how many subscribers hold each, most held first (at most 64).
    pub patterns: Vec<(String, u64)>,
}

/// Latency figures of a [`RemoteReport`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LatencyReport {
    /// Answers measured.
    pub count: u64,
    /// Median, µs.
    pub p50_us: u64,
    /// 90th percentile, µs.
    pub p90_us: u64,
    /// 99th percentile, µs.
    pub p99_us: u64,
}

/// One peer in a [`RemoteReport`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerFigures {
    /// The peer's identity.
    pub peer: String,
    /// Whether its primary callis is open.
    pub connected: bool,
    /// Last keepalive round trip, µs.
    pub rtt_us: Option<u64>,
    /// Sends waiting for an answer.
    pub in_flight: u64,
    /// Messages and answers queued, not yet written.
    pub queue_depth: u64,
    /// Age of the oldest unanswered send, ms.
    pub oldest_pending_ms: Option<u64>,
    /// Bytes read from the peer.
    pub bytes_in: u64,
    /// Bytes written to the peer.
    pub bytes_out: u64,
    /// Messages sent to the peer.
    #[serde(default)]
    pub messages_out: u64,
    /// Messages the peer delivered here.
    #[serde(default)]
    pub messages_in: u64,
}

/// One event in a [`RemoteReport`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventReport {
    /// Its number (1, 2, … from the service's start).
    pub seq: u64,
    /// The event's kind (`PeerConnected`, `DialFailed`, …).
    pub kind: String,
    /// The peer it is about, if any.
    pub peer: Option<String>,
    /// A one-line description.
    pub text: String,
}

/// One error in a [`RemoteReport`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorReport {
    /// Its number in the domus's error feed.
    pub seq: u64,
    /// The [`ErrorId`] name.
    pub id: String,
    /// The message.
    pub message: String,
}

/// The running service; dropping it stops the service and frees its taberna.
#[derive(Debug)]
pub struct ReportingService {
    /// Aborted when the handle is dropped.
    task: AbortOnDropHandle<()>,
}

impl ReportingService {
    /// Whether the service has stopped (the domus shut down).
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }
}

/// Starts the reporting service on `domus`, answering only the identities in `allow` (an
/// empty list is refused: it would answer nobody). Must be called inside a tokio runtime.
pub fn serve(
    domus: &Domus,
    allow: impl IntoIterator<Item = DomusId>,
) -> Result<ReportingService, Error> {
    let allow: BTreeSet<DomusId> = allow.into_iter().collect();
    if allow.is_empty() {
        return Err(Error::invalid_config(
            "reporting service allow-list",
            "is empty; name the identities that may read this domus's reports",
        ));
    }
    let options = TabernaOptions::default()
        .allowed_peers(allow)
        .accepted_types(REPORT.0..=REPORT.0)
        .inbox_depth(16);
    let taberna = domus.service_taberna(REPORTING_TABERNA, options)?;
    let reporting = domus.reporting();
    let mut events = reporting.events();
    let rt = tokio::runtime::Handle::try_current().map_err(|_| {
        Error::invalid_config(
            "reporting service",
            "serve must be called inside a tokio runtime",
        )
    })?;
    let task = rt.spawn(async move {
        let mut ring = EventRing::default();
        loop {
            tokio::select! {
                request = taberna.recv() => {
                    let Some(request) = request else { return };
                    let asked = if request.payload().len() > MAX_REQUEST_LEN {
                        None
                    } else if request.payload().is_empty() {
                        Some(ReportRequest::default())
                    } else {
                        serde_json::from_slice::<ReportRequest>(request.payload()).ok()
                    };
                    match asked {
                        None => request.reject(1, "not a report request (JSON ReportRequest)"),
                        Some(asked) => {
                            let report = build(&reporting.snapshot(), &reporting, &ring, asked);
                            match serde_json::to_vec(&report) {
                                Ok(json) => request.reply(Bytes::from(json)),
                                Err(_) => request.reject(2, "the report could not be encoded"),
                            }
                        }
                    }
                }
                event = events.recv() => match event {
                    Some(FeedItem::Item(e)) => ring.push(&e),
                    Some(FeedItem::Missed(n)) => ring.missed = ring.missed.saturating_add(n),
                    None => return,
                },
            }
        }
    });
    Ok(ReportingService {
        task: AbortOnDropHandle::new(task),
    })
}

/// Asks the node `REPORTING_TABERNA` is routed to (in `domus`'s resolver) for its report,
/// saying what was seen already; bounded by `timeout`. A node that does not allow this domus
/// answers `Forbidden`; one without the service `UnknownTaberna`.
pub async fn fetch(
    domus: &Domus,
    request: ReportRequest,
    timeout: Duration,
) -> Result<RemoteReport, Error> {
    let payload = serde_json::to_vec(&request)
        .map_err(|e| Error::new(ErrorId::EncodeFailure, format!("report request: {e}")))?;
    let options = SendOptions::default().timeout(timeout);
    match domus
        .send(REPORTING_TABERNA, REPORT, Bytes::from(payload), options)
        .await?
    {
        Delivery::Replied(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
            Error::new(
                ErrorId::DecodeFailure,
                format!("the node's report is not a version-{REPORT_VERSION} report: {e}"),
            )
        }),
        Delivery::Accepted => Err(Error::new(
            ErrorId::DecodeFailure,
            "the node accepted the report request without a report",
        )),
    }
}

/// The last [`MAX_EVENTS`] events, numbered.
#[derive(Debug, Default)]
struct EventRing {
    items: VecDeque<EventReport>,
    next_seq: u64,
    /// Events the feed dropped before the service read them.
    missed: u64,
}

impl EventRing {
    fn push(&mut self, event: &Event) {
        self.next_seq = self.next_seq.saturating_add(1);
        if self.items.len() >= MAX_EVENTS {
            self.items.pop_front();
        }
        let (kind, peer, text) = describe(event);
        self.items.push_back(EventReport {
            seq: self.next_seq,
            kind: kind.to_owned(),
            peer,
            text,
        });
    }

    /// Events after `seq`, and how many of those are no longer held.
    fn after(&self, seq: u64) -> (Vec<EventReport>, u64) {
        let events: Vec<EventReport> = self.items.iter().filter(|e| e.seq > seq).cloned().collect();
        let oldest_held = self
            .items
            .front()
            .map_or(self.next_seq.saturating_add(1), |e| e.seq);
        let gone = oldest_held.saturating_sub(seq.saturating_add(1));
        (events, gone.saturating_add(self.missed))
    }
}

fn describe(event: &Event) -> (&'static str, Option<String>, String) {
    match event {
        Event::PeerConnected { peer, restarted } => (
            "PeerConnected",
            Some(peer.to_string()),
            if *restarted {
                format!("{peer} connected (a new run)")
            } else {
                format!("{peer} connected")
            },
        ),
        Event::PeerDisconnected { peer, reason } => (
            "PeerDisconnected",
            Some(peer.to_string()),
            match reason {
                Some(r) => format!("{peer} disconnected: {r}"),
                None => format!("{peer} disconnected"),
            },
        ),
        Event::CallisUp { peer, kind } => (
            "CallisUp",
            Some(peer.to_string()),
            format!("{kind:?} callis to {peer} up"),
        ),
        Event::CallisDown { peer, kind } => (
            "CallisDown",
            Some(peer.to_string()),
            format!("{kind:?} callis to {peer} down"),
        ),
        Event::DialFailed { peer, error } => (
            "DialFailed",
            Some(peer.to_string()),
            format!("dialling {peer} failed: {error}"),
        ),
        Event::SessionRestarted { peer } => (
            "SessionRestarted",
            Some(peer.to_string()),
            format!("{peer} restarted; its unanswered sends failed"),
        ),
        Event::Backpressure { peer } => (
            "Backpressure",
            Some(peer.to_string()),
            format!("sends to {peer} waited for in-flight room"),
        ),
        Event::QueueOverrun { taberna } => (
            "QueueOverrun",
            None,
            format!("taberna {taberna}'s inbox was full; a delivery was refused"),
        ),
        Event::ConfigReloaded => ("ConfigReloaded", None, "configuration updated".to_owned()),
        Event::AuthReloaded => (
            "AuthReloaded",
            None,
            "new certificates in force for new handshakes".to_owned(),
        ),
        Event::ShutdownStarted => ("ShutdownStarted", None, "shutdown started".to_owned()),
        Event::ShutdownCompleted => ("ShutdownCompleted", None, "shutdown completed".to_owned()),
        Event::DetachedSendEnded {
            request_id,
            taberna,
            outcome,
        } => (
            "DetachedSendEnded",
            None,
            match outcome {
                Ok(true) => format!("detached send #{request_id} to taberna {taberna}: replied"),
                Ok(false) => format!("detached send #{request_id} to taberna {taberna}: accepted"),
                Err(e) => format!("detached send #{request_id} to taberna {taberna}: {e}"),
            },
        ),
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn build(
    snapshot: &Snapshot,
    reporting: &crate::Reporting,
    ring: &EventRing,
    asked: ReportRequest,
) -> RemoteReport {
    let mut peers: Vec<PeerFigures> = snapshot
        .per_peer
        .iter()
        .map(|p| PeerFigures {
            peer: p.peer.to_string(),
            connected: p.connected,
            rtt_us: p.rtt.map(micros),
            in_flight: p.in_flight,
            queue_depth: p.queue_depth,
            oldest_pending_ms: p.oldest_pending.map(millis),
            bytes_in: p.bytes_in,
            bytes_out: p.bytes_out,
            messages_out: p.messages_out,
            messages_in: p.messages_in,
        })
        .collect();
    peers.sort_by(|a, b| {
        (b.bytes_in.saturating_add(b.bytes_out), &a.peer)
            .cmp(&(a.bytes_in.saturating_add(a.bytes_out), &b.peer))
    });
    peers.truncate(MAX_PEERS);
    let gauges = BTreeMap::from([
        ("peers".to_owned(), snapshot.peers.current),
        ("primary_calles".to_owned(), snapshot.primary_calles.current),
        ("blob_calles".to_owned(), snapshot.blob_calles.current),
        ("blob_streams".to_owned(), snapshot.blob_streams.current),
        (
            "retained_reply_bytes".to_owned(),
            snapshot.retained_reply_bytes,
        ),
        (
            "pending_handshakes".to_owned(),
            u64::try_from(snapshot.listener.pending_handshakes).unwrap_or(u64::MAX),
        ),
    ]);
    let topics = snapshot.topics.as_ref().map(|t| TopicsReport {
        subscriptions: t.subscriptions,
        subscribers: t.subscribers,
        lanes: t.lanes,
        local_subscriptions: t.local_subscriptions,
        patterns: t.patterns.clone(),
    });
    let (events, events_missed) = ring.after(asked.events_after);
    let since = reporting.errors_since(asked.errors_after, MAX_ERRORS);
    RemoteReport {
        version: REPORT_VERSION,
        identity: reporting.identity().to_string(),
        crypto_provider: snapshot.crypto_provider.to_owned(),
        interval_ms: millis(snapshot.interval),
        totals: snapshot
            .totals
            .named()
            .into_iter()
            .map(|(n, v)| (n.to_owned(), v))
            .collect(),
        gauges,
        latency: LatencyReport {
            count: snapshot.latency.count,
            p50_us: micros(snapshot.latency.p50),
            p90_us: micros(snapshot.latency.p90),
            p99_us: micros(snapshot.latency.p99),
        },
        peers,
        events,
        events_missed,
        errors: since
            .errors
            .into_iter()
            .map(|e| ErrorReport {
                seq: e.seq,
                id: e.error.id().name().to_owned(),
                message: e.error.message().to_owned(),
            })
            .collect(),
        errors_missed: since.missed,
        topics,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_event_ring_is_bounded_and_says_what_was_missed() {
        let mut ring = EventRing::default();
        for _ in 0..(MAX_EVENTS + 10) {
            ring.push(&Event::ConfigReloaded);
        }
        assert_eq!(ring.items.len(), MAX_EVENTS);
        let (events, missed) = ring.after(0);
        assert_eq!(events.len(), MAX_EVENTS);
        assert_eq!(missed, 10, "the ten oldest are gone");
        let last = ring.next_seq;
        let (events, missed) = ring.after(last - 3);
        assert_eq!(
            events.iter().map(|e| e.seq).collect::<Vec<_>>(),
            vec![last - 2, last - 1, last]
        );
        assert_eq!(missed, 0);
        assert!(ring.after(last).0.is_empty());
    }

    #[test]
    fn requests_are_strict_json() {
        assert_eq!(
            serde_json::from_slice::<ReportRequest>(br#"{"events_after":3}"#).ok(),
            Some(ReportRequest {
                events_after: 3,
                errors_after: 0
            })
        );
        assert!(serde_json::from_slice::<ReportRequest>(br#"{"evil":1}"#).is_err());
    }
}
