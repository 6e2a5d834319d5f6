//! The event and error feeds' types: [`Event`]s (what happened, and on which [`CallisKind`]),
//! the receivers a subscriber reads them from (one that falls behind is told how many it
//! missed, [`FeedItem::Missed`]), and the errors kept for
//! [`Reporting::errors_since`](super::Reporting::errors_since).
//!
//! Data types and non-blocking receivers only: nothing here records or decides anything, and
//! peer-controlled text arrives already escaped (inside [`Error`]).

use tokio::sync::broadcast;

use crate::a0_transport::DomusId;
use crate::error::Error;

/// Which callis an event or a byte count is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum CallisKind {
    /// The primary callis: messages and their answers.
    Primary,
    /// The blob callis.
    Blob,
}

/// Something that happened, from [`Reporting::events`](super::Reporting::events).
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
    /// A send whose caller did not wait for its outcome ended: an HTTP gateway request with
    /// `Prefer: respond-async`, answered `202 Accepted` with this `request_id` once vicus
    /// admitted the message (feature `http-gateway`).
    DetachedSendEnded {
        /// The id the gateway's 202 response gave (`Vicus-Request-Id`).
        request_id: u64,
        /// The destination taberna.
        taberna: u64,
        /// `Ok(true)` replied (the reply is dropped), `Ok(false)` accepted, or the error.
        outcome: Result<bool, Error>,
    },
}

/// An item of a feed: the next item, or how many the subscriber missed by falling behind.
#[derive(Debug, Clone, PartialEq)]
pub enum FeedItem<T> {
    /// The next item.
    Item(T),
    /// This many items were dropped for this subscriber before the next one.
    Missed(u64),
}

/// A subscription to the event feed (from [`Reporting::events`](super::Reporting::events)).
#[derive(Debug)]
pub struct EventReceiver {
    pub(super) rx: broadcast::Receiver<Event>,
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

/// The result of [`Reporting::errors_since`](super::Reporting::errors_since).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ErrorsSince {
    /// Errors after the given sequence number, oldest first.
    pub errors: Vec<SequencedError>,
    /// Errors after the given sequence number that the ring no longer holds.
    pub missed: u64,
}

/// A subscription to the error feed (from [`Reporting::errors`](super::Reporting::errors)).
#[derive(Debug)]
pub struct ErrorReceiver {
    pub(super) rx: broadcast::Receiver<SequencedError>,
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
