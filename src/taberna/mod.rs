//! Tabernas: named inbound endpoints. A [`Taberna`] is a bounded inbox of [`TabernaRequest`]s
//! that several workers may share; every request is answered exactly once — accepted, replied
//! or rejected — and dropping one unanswered rejects it.
//!
//! This module owns the registry of local tabernas and the admission checks a delivery passes
//! before a handler sees it (allow-list, accepted types, inbox capacity). It must not block:
//! deliveries are offered with `try_send`, and a full inbox is a `TabernaBusy` answer at once.
//!
//! Here: ids, message types, options and the [`Taberna`] workers receive from;
//! `registry.rs` the registry and its admission; `request.rs` a request and how it is
//! answered; `inline.rs` tabernas answered on the delivering driver.

use std::collections::BTreeSet;
use std::fmt;
use std::ops::RangeInclusive;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use crate::a0_transport::DomusId;
use bytes::Bytes;

use crate::a1_callis::session::{A1_MESSAGE_TYPE_MAX, A3_MESSAGE_TYPE_BASE, Answer};
use crate::error::{Error, ErrorId};

mod inline;
mod registry;
mod request;

pub use inline::{InlineAnswer, InlineHandler, InlineRequest, InlineTaberna, SLOW_INLINE_CALL};
pub(crate) use registry::Registry;
pub(crate) use request::AnswerTarget;
pub use request::{AnswerBatch, AnswerHandle, RequestParts, TabernaRequest};

/// The deepest inbox a taberna may have.
const MAX_INBOX_DEPTH: usize = 1 << 20;

/// The id of a taberna, unique within its domus and routed by the resolver.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TabernaId(pub u64);

/// Taberna ids from here up are reserved for vicus's own services (`vicus::services`); an
/// application registering one is refused with `InvalidConfig`, and an A2 (service) message
/// type is delivered to these tabernas only.
pub const RESERVED_TABERNA_BASE: u64 = 0xFFFF_FFFF_FFFF_FF00;

impl fmt::Display for TabernaId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "taberna {}", self.0)
    }
}

/// A message type. `0x0000_0000..=0x0000_FFFF` is reserved for A1, `0x0001_0000..=0x00FF_FFFF`
/// for A2 mesh services, and `0x0100_0000..` is the application's (A3); a send carries an A3
/// type, or an A2 type to one of the services' reserved tabernas (`vicus::services`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MessageType(pub u32);

/// The priority class of a message type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageClass {
    /// Transport control; never carried in a message.
    A1,
    /// Mesh services: sent before A3.
    A2,
    /// Applications.
    A3,
}

impl MessageType {
    /// The A3 type `0x0100_0000 + offset`, for the first 65 536 application types: it cannot
    /// overflow, so it needs no unwrapping and works in a `const`
    /// (`const PING: MessageType = MessageType::app(1);`). [`try_app`](Self::try_app) takes
    /// any `u32` offset.
    pub const fn app(offset: u16) -> Self {
        Self(A3_MESSAGE_TYPE_BASE | offset as u32)
    }

    /// The A3 type `0x0100_0000 + offset` for an offset of any size; `None` when that would
    /// overflow a `u32`.
    ///
    /// ```
    /// # use vicus::MessageType;
    /// assert_eq!(MessageType::try_app(70_000), Some(MessageType(0x0101_1170)));
    /// assert_eq!(MessageType::try_app(u32::MAX), None);
    /// ```
    pub const fn try_app(offset: u32) -> Option<Self> {
        match A3_MESSAGE_TYPE_BASE.checked_add(offset) {
            Some(t) => Some(Self(t)),
            None => None,
        }
    }

    /// This type's class.
    pub const fn class(self) -> MessageClass {
        if self.0 <= A1_MESSAGE_TYPE_MAX {
            MessageClass::A1
        } else if self.0 < A3_MESSAGE_TYPE_BASE {
            MessageClass::A2
        } else {
            MessageClass::A3
        }
    }
}

/// Options of a taberna.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct TabernaOptions {
    /// Requests waiting for a worker; when full, new deliveries are answered `TabernaBusy` at
    /// once. Default: the domus's `default_inbox_depth`; 1 to 1 048 576.
    pub inbox_depth: Option<usize>,
    /// When set, only these peers may deliver; others get `Forbidden` and the handler never
    /// sees them. Default: any authenticated peer; an empty set is refused (it would refuse
    /// everyone).
    pub allowed_peers: Option<BTreeSet<DomusId>>,
    /// When set, only these message types are accepted; others get `MessageTypeNotAccepted`.
    /// Default: any type; an empty range is refused.
    pub accepted_types: Option<RangeInclusive<u32>>,
}

impl TabernaOptions {
    /// Checks every field; the error names the field (`TabernaOptions::inbox_depth`, …).
    pub fn validate(&self) -> Result<(), Error> {
        if let Some(depth) = self.inbox_depth
            && (depth == 0 || depth > MAX_INBOX_DEPTH)
        {
            return Err(Error::invalid_config(
                "TabernaOptions::inbox_depth",
                format!("{depth} is outside 1..={MAX_INBOX_DEPTH}"),
            ));
        }
        if self.allowed_peers.as_ref().is_some_and(BTreeSet::is_empty) {
            return Err(Error::invalid_config(
                "TabernaOptions::allowed_peers",
                "an empty allow-list would refuse every sender; use None to allow any peer",
            ));
        }
        if let Some(types) = &self.accepted_types
            && types.is_empty()
        {
            return Err(Error::invalid_config(
                "TabernaOptions::accepted_types",
                format!(
                    "{:#x}..={:#x} is empty and would refuse every message",
                    types.start(),
                    types.end()
                ),
            ));
        }
        Ok(())
    }

    /// Sets the inbox depth.
    pub fn inbox_depth(mut self, depth: usize) -> Self {
        self.inbox_depth = Some(depth);
        self
    }

    /// Restricts senders to `peers`.
    pub fn allowed_peers(mut self, peers: impl IntoIterator<Item = DomusId>) -> Self {
        self.allowed_peers = Some(peers.into_iter().collect());
        self
    }

    /// Restricts message types to `types`.
    pub fn accepted_types(mut self, types: RangeInclusive<u32>) -> Self {
        self.accepted_types = Some(types);
        self
    }
}

/// A registered taberna: a bounded inbox of [`TabernaRequest`]s.
///
/// Clone it to share the inbox between workers; each request goes to exactly one. It is also
/// a `Stream`. The taberna is unregistered when the last clone is dropped.
pub struct Taberna {
    id: TabernaId,
    // Boxed so `Taberna` is `Unpin` (the receiver's stream state is self-referential).
    inbox: Pin<Box<async_channel::Receiver<TabernaRequest>>>,
    registry: std::sync::Weak<Registry>,
}

impl Clone for Taberna {
    fn clone(&self) -> Self {
        Self {
            id: self.id,
            inbox: Box::pin(async_channel::Receiver::clone(&self.inbox)),
            registry: self.registry.clone(),
        }
    }
}

impl fmt::Debug for Taberna {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Taberna")
            .field("id", &self.id)
            .field("queued", &self.inbox.len())
            .finish()
    }
}

/// Encodes and decodes application messages for the typed layer:
/// [`Domus::send_typed`](crate::Domus::send_typed) on the sending side, [`Taberna::recv_typed`] and
/// [`TypedRequest::reply_typed`] on the receiving side. Ready ones for serde types:
/// `vicus::codec::{Cbor, Json}` (feature `serde`).
pub trait MessageCodec: Send + Sync + 'static {
    /// The message type.
    type Message: Send + 'static;
    /// Encodes a message.
    fn encode(&self, message: &Self::Message) -> Result<Bytes, Error>;
    /// Decodes a message.
    fn decode(&self, bytes: &Bytes) -> Result<Self::Message, Error>;
}

/// A request whose payload a codec decoded, from [`Taberna::recv_typed`]: the message, and
/// the request itself to answer (with its sender, its payload and any blob).
#[derive(Debug)]
#[non_exhaustive]
pub struct TypedRequest<M> {
    /// The decoded payload.
    pub message: M,
    /// The request, to answer exactly once.
    pub request: TabernaRequest,
}

impl<M> TypedRequest<M> {
    /// Answers with `reply` encoded by `codec`. A reply that does not encode is not sent:
    /// the error comes back here, and the request, dropped unanswered, is rejected with
    /// `RequestDropped`.
    pub fn reply_typed<C: MessageCodec>(self, codec: &C, reply: &C::Message) -> Result<(), Error> {
        let bytes = codec.encode(reply)?;
        self.request.reply(bytes);
        Ok(())
    }
}

impl Taberna {
    /// The next request whose payload `codec` decodes, with its message; `None` once the
    /// domus shut down. A request that does not decode is refused at once with
    /// [`ErrorId::DecodeFailure`] (the sender's send fails with that id, the reason saying
    /// what did not decode) and never handed out.
    pub async fn recv_typed<C: MessageCodec>(&self, codec: &C) -> Option<TypedRequest<C::Message>> {
        loop {
            let mut request = self.recv().await?;
            match codec.decode(request.payload()) {
                Ok(message) => return Some(TypedRequest { message, request }),
                Err(e) => request.finish(Answer::refusal(ErrorId::DecodeFailure, e.message())),
            }
        }
    }

    /// Its id.
    pub fn id(&self) -> TabernaId {
        self.id
    }

    /// Requests waiting in the inbox.
    pub fn queued(&self) -> usize {
        self.inbox.len()
    }

    /// The next request; `None` once the domus shut down.
    pub async fn recv(&self) -> Option<TabernaRequest> {
        self.inbox.recv().await.ok()
    }

    /// The next request, waiting at most `timeout`.
    pub async fn recv_timeout(&self, timeout: Duration) -> Result<TabernaRequest, Error> {
        match tokio::time::timeout(timeout, self.inbox.recv()).await {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(_)) => Err(Error::new(
                ErrorId::TabernaShutdown,
                format!("{} was shut down", self.id),
            )),
            Err(_) => Err(Error::new(
                ErrorId::ReceiveTimeout,
                format!("nothing arrived at {} within {timeout:?}", self.id),
            )),
        }
    }

    /// Waits for the next request, then takes every other one already waiting too, up to
    /// `limit` in all (at least one), appending them to `buf`: a handler drains a burst in one
    /// wake-up. Returns how many were added; 0 only once the domus shut down.
    pub async fn recv_many(&self, buf: &mut Vec<TabernaRequest>, limit: usize) -> usize {
        let Ok(first) = self.inbox.recv().await else {
            return 0;
        };
        buf.push(first);
        let mut taken = 1;
        while taken < limit.max(1) {
            match self.inbox.try_recv() {
                Ok(request) => {
                    buf.push(request);
                    taken += 1;
                }
                Err(_) => break,
            }
        }
        taken
    }

    /// A request if one is waiting.
    pub fn try_recv(&self) -> Option<TabernaRequest> {
        self.inbox.try_recv().ok()
    }
}

impl Drop for Taberna {
    fn drop(&mut self) {
        // The registry's sender plus this receiver: when this is the last receiver, unregister.
        if self.inbox.receiver_count() == 1
            && let Some(registry) = self.registry.upgrade()
        {
            registry.unregister(self.id);
        }
    }
}

impl futures_core::Stream for Taberna {
    type Item = TabernaRequest;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<TabernaRequest>> {
        self.get_mut().inbox.as_mut().poll_next(cx)
    }
}
