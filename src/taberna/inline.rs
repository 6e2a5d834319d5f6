//! Inline tabernas: a handler that runs on the driver of the peer that sent the message, for
//! work that is cheap and never waits (counting, routing, storing into a lock-free structure,
//! answering from memory). No queue, no task switch, no answer channel: the answer goes into
//! the same write as the acknowledgements around it.
//!
//! The price is that a slow handler slows every message of that peer's callis. So a handler
//! must not block or await; one that takes long anyway is made visible: the driver times one
//! call in 64, and a call over [`SLOW_INLINE_CALL`] counts in `inline_handlers_slow` and logs a
//! (rate-limited) warning. A handler that panics answers its message with `RequestDropped`
//! and logs; it does not take the callis down.

use std::fmt;
use std::sync::Weak;
use std::time::Duration;

use bytes::Bytes;

use super::{MessageType, Registry, TabernaId};
use crate::a0_transport::PeerIdentity;

/// A sampled inline call longer than this counts as slow.
pub const SLOW_INLINE_CALL: Duration = Duration::from_millis(1);

/// A message for an inline taberna, lent to its handler for the length of the call.
#[derive(Debug, Clone, Copy)]
pub struct InlineRequest<'a> {
    pub(crate) peer: &'a PeerIdentity,
    pub(crate) source: TabernaId,
    pub(crate) destination: TabernaId,
    pub(crate) message_type: MessageType,
    pub(crate) payload: &'a Bytes,
    pub(crate) headers: &'a crate::a1_callis::headers::Headers,
}

impl<'a> InlineRequest<'a> {
    /// The headers the sender attached.
    pub fn headers(&self) -> &'a crate::a1_callis::headers::Headers {
        self.headers
    }

    /// Who sent it (verified from the peer's certificate).
    pub fn peer(&self) -> &'a PeerIdentity {
        self.peer
    }

    /// The taberna on the sender's side it came from.
    pub fn source(&self) -> TabernaId {
        self.source
    }

    /// The taberna it was sent to.
    pub fn destination(&self) -> TabernaId {
        self.destination
    }

    /// Its message type.
    pub fn message_type(&self) -> MessageType {
        self.message_type
    }

    /// Its payload (clone it — a reference count — to keep it).
    pub fn payload(&self) -> &'a Bytes {
        self.payload
    }
}

/// How an inline handler answers.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum InlineAnswer {
    /// The sender's send returns `Delivery::Accepted`.
    Accept,
    /// The sender's send returns `Delivery::Replied` with this payload.
    Reply(Bytes),
    /// The sender's send fails with `RemoteTabernaRejected` carrying the code and reason.
    Reject {
        /// The application's code.
        code: u32,
        /// Why (at most 256 bytes go on the wire).
        reason: String,
    },
}

/// A handler of an inline taberna (see the module docs): any
/// `Fn(InlineRequest<'_>) -> InlineAnswer + Send + Sync`.
pub trait InlineHandler: Send + Sync + 'static {
    /// Answers one message. Must not block.
    fn handle(&self, request: InlineRequest<'_>) -> InlineAnswer;
}

impl<F> InlineHandler for F
where
    F: Fn(InlineRequest<'_>) -> InlineAnswer + Send + Sync + 'static,
{
    fn handle(&self, request: InlineRequest<'_>) -> InlineAnswer {
        self(request)
    }
}

/// A registered inline taberna, from
/// [`Domus::taberna_inline`](crate::Domus::taberna_inline): dropping it unregisters the
/// taberna (deliveries after that are refused with `UnknownTaberna`).
pub struct InlineTaberna {
    pub(crate) id: TabernaId,
    pub(crate) registry: Weak<Registry>,
}

impl InlineTaberna {
    /// Its id.
    pub fn id(&self) -> TabernaId {
        self.id
    }
}

impl fmt::Debug for InlineTaberna {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InlineTaberna")
            .field("id", &self.id)
            .finish()
    }
}

impl Drop for InlineTaberna {
    fn drop(&mut self) {
        if let Some(registry) = self.registry.upgrade() {
            registry.unregister(self.id);
        }
    }
}
