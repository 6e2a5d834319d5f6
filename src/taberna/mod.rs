//! Tabernas: named inbound endpoints. A [`Taberna`] is a bounded inbox of [`TabernaRequest`]s
//! that several workers may share; every request is answered exactly once — accepted, replied
//! or rejected — and dropping one unanswered rejects it.
//!
//! This module owns the registry of local tabernas and the admission checks a delivery passes
//! before a handler sees it (allow-list, accepted types, inbox capacity). It must not block:
//! deliveries are offered with `try_send`, and a full inbox is a `TabernaBusy` answer at once.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::ops::RangeInclusive;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use tokio::sync::oneshot;

use crate::a0_transport::{DomusId, PeerIdentity};
use crate::a1_callis::session::{A1_MESSAGE_TYPE_MAX, A3_MESSAGE_TYPE_BASE, Answer};
use crate::error::{Error, ErrorId};
use crate::reporting::{C, Event, LogKind, Recorder};
use crate::runtime::ends::BlobReceiver;
use crate::runtime::{AnswerTx, Delivered, Inbound, InboundMessage};

mod inline;
pub use inline::{InlineHandler, InlineRequest, InlineTaberna, Response, SLOW_INLINE_CALL};

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
    /// The A3 type `0x0100_0000 + offset`; `None` when that would overflow.
    pub const fn app(offset: u32) -> Option<Self> {
        match A3_MESSAGE_TYPE_BASE.checked_add(offset) {
            Some(t) => Some(Self(t)),
            None => None,
        }
    }

    /// The A3 type `0x0100_0000 + offset`, for the first 65 536 application types: it cannot
    /// overflow, so it needs no unwrapping and works in a `const`
    /// (`const PING: MessageType = MessageType::application(1);`).
    pub const fn application(offset: u16) -> Self {
        Self(A3_MESSAGE_TYPE_BASE | offset as u32)
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

/// Where an answer goes.
pub(crate) enum AnswerSink {
    /// Back to a remote sender, through its peer's driver.
    Remote(AnswerTx),
    /// Back to a local sender.
    Local(oneshot::Sender<Answer>),
}

impl AnswerSink {
    fn send(self, answer: Answer) {
        match self {
            AnswerSink::Remote(tx) => tx.send(answer),
            // A closed channel means the sender is gone; there is no one left to tell.
            AnswerSink::Local(tx) => {
                let _ = tx.send(answer);
            }
        }
    }
}

/// One delivery to a taberna, waiting for its answer.
///
/// End it with exactly one of [`accept`](Self::accept), [`reply`](Self::reply) or
/// [`reject`](Self::reject). Dropping it unanswered rejects it with
/// [`ErrorId::RequestDropped`].
pub struct TabernaRequest {
    peer: Arc<PeerIdentity>,
    source: TabernaId,
    destination: TabernaId,
    message_type: MessageType,
    payload: Bytes,
    blob: Option<BlobReceiver>,
    responder: Responder,
}

/// The answering half of a [`TabernaRequest`], from [`TabernaRequest::into_parts`]: answer
/// exactly once; dropping it unanswered rejects with [`ErrorId::RequestDropped`].
pub struct Responder {
    sink: Option<AnswerSink>,
}

impl fmt::Debug for Responder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Responder")
            .field("answered", &self.sink.is_none())
            .finish()
    }
}

impl Responder {
    /// Accepts the request.
    pub fn accept(mut self) {
        self.finish(Answer::Accepted);
    }

    /// Answers with a payload.
    pub fn reply(mut self, payload: Bytes) {
        self.finish(Answer::Replied(payload));
    }

    /// Rejects with an application code and reason.
    pub fn reject(mut self, code: u32, reason: &str) {
        self.finish(Answer::application_reject(code, reason));
    }

    fn finish(&mut self, answer: Answer) {
        if let Some(sink) = self.sink.take() {
            sink.send(answer);
        }
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        self.finish(Answer::refusal(
            ErrorId::RequestDropped,
            "the handler dropped the request without answering",
        ));
    }
}

/// What a request carried, from [`TabernaRequest::into_parts`]. Not `Clone`: it may own the
/// receiving end of a blob.
#[derive(Debug)]
#[non_exhaustive]
pub struct RequestParts {
    /// Who sent it.
    pub peer: Arc<PeerIdentity>,
    /// The sender's source taberna.
    pub source: TabernaId,
    /// The taberna it was sent to.
    pub destination: TabernaId,
    /// Its message type.
    pub message_type: MessageType,
    /// Its payload.
    pub payload: Bytes,
    /// Its blob, unless [`TabernaRequest::blob`] took it already. Dropping it cancels the
    /// stream, as dropping any [`BlobReceiver`] does.
    pub blob: Option<BlobReceiver>,
}

impl fmt::Debug for TabernaRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TabernaRequest")
            .field("peer", &self.peer.id())
            .field("source", &self.source)
            .field("destination", &self.destination)
            .field("message_type", &self.message_type)
            .field("payload_len", &self.payload.len())
            .field("blob", &self.blob.is_some())
            .finish()
    }
}

impl TabernaRequest {
    pub(crate) fn new(
        peer: Arc<PeerIdentity>,
        source: TabernaId,
        destination: TabernaId,
        message_type: MessageType,
        payload: Bytes,
        sink: AnswerSink,
    ) -> Self {
        Self {
            peer,
            source,
            destination,
            message_type,
            payload,
            blob: None,
            responder: Responder { sink: Some(sink) },
        }
    }

    /// Attaches the receiving end of the blob stream this request opens.
    pub(crate) fn with_blob(mut self, blob: BlobReceiver) -> Self {
        self.blob = Some(blob);
        self
    }

    /// The blob this request carries (sent with [`Domus::send_blob`](crate::Domus::send_blob)),
    /// taken out: `None` when the request carries none or it was taken already. Take it before
    /// answering; bytes start to flow once the request is accepted (or replied to). Rejecting
    /// the request, or dropping the receiver before its end, cancels the stream.
    /// [`into_parts`](Self::into_parts) carries a blob not taken yet in
    /// [`RequestParts::blob`].
    pub fn blob(&mut self) -> Option<BlobReceiver> {
        self.blob.take()
    }

    /// Whether the request carries a blob not yet taken.
    pub fn has_blob(&self) -> bool {
        self.blob.is_some()
    }

    /// Splits the request into what it carried and the half that answers it, so the answer
    /// can be given from elsewhere (another task, after async work).
    pub fn into_parts(self) -> (RequestParts, Responder) {
        let TabernaRequest {
            peer,
            source,
            destination,
            message_type,
            payload,
            blob,
            responder,
        } = self;
        (
            RequestParts {
                peer,
                source,
                destination,
                message_type,
                payload,
                blob,
            },
            responder,
        )
    }

    /// Who sent it (verified from the peer's certificate).
    pub fn peer(&self) -> &PeerIdentity {
        &self.peer
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

    /// Its payload (zero-copy).
    pub fn payload(&self) -> &Bytes {
        &self.payload
    }

    /// Takes the payload out (leaving the request answerable).
    pub fn take_payload(&mut self) -> Bytes {
        std::mem::take(&mut self.payload)
    }

    /// Accepts it: the sender's `send` returns `Delivery::Accepted`.
    pub fn accept(self) {
        self.responder.accept();
    }

    /// Answers it with a payload: the sender's `send` returns `Delivery::Replied`.
    pub fn reply(self, payload: Bytes) {
        self.responder.reply(payload);
    }

    /// Rejects it with an application code and reason (at most 256 bytes go on the wire):
    /// the sender's `send` fails with [`ErrorId::RemoteTabernaRejected`] carrying both.
    pub fn reject(self, code: u32, reason: &str) {
        self.responder.reject(code, reason);
    }

    fn finish(&mut self, answer: Answer) {
        self.responder.finish(answer);
    }

    /// Whether it came from a peer (rather than from this domus).
    fn is_remote(&self) -> bool {
        matches!(self.responder.sink, Some(AnswerSink::Remote(_)))
    }
}

impl Inbound for Registry {
    fn deliver(&self, m: InboundMessage) -> Delivered {
        // Inline tabernas and refusals are answered here, without a TabernaRequest or an
        // answer hop: the driver writes the answer itself.
        {
            let entries = self.entries.load();
            let refused = |error: ErrorId, reason: &str| {
                self.recorder.refused(error);
                Delivered::Answered(Answer::refusal(error, reason))
            };
            let Some(entry) = entries.get(&TabernaId(m.dst)) else {
                return refused(
                    ErrorId::UnknownTaberna,
                    "no such taberna on the receiving domus",
                );
            };
            if let Some((error, reason)) = Self::check(
                entry,
                TabernaId(m.dst),
                m.peer.id(),
                MessageType(m.msg_type),
            ) {
                return refused(error, reason);
            }
            if let Inbox::Inline(handler, calls) = &entry.inbox {
                if m.blob.is_some() {
                    return refused(
                        ErrorId::MessageTypeNotAccepted,
                        "an inline taberna takes no blobs",
                    );
                }
                let view = InlineRequest {
                    peer: &m.peer,
                    source: TabernaId(m.src),
                    destination: TabernaId(m.dst),
                    message_type: MessageType(m.msg_type),
                    payload: &m.payload,
                };
                return Delivered::AnsweredByHandler(self.call_inline(
                    handler.as_ref(),
                    calls,
                    view,
                ));
            }
        }
        let mut request = TabernaRequest::new(
            m.peer,
            TabernaId(m.src),
            TabernaId(m.dst),
            MessageType(m.msg_type),
            m.payload,
            AnswerSink::Remote(m.answer),
        );
        request.blob = m.blob;
        if Registry::deliver(self, request) {
            Delivered::Queued
        } else {
            Delivered::Refused
        }
    }
}

/// The table of local tabernas. Its keys are this domus's own registrations (a peer only
/// looks them up), so a cheap multiplicative hash of the id serves instead of SipHash: every
/// delivery looks one up.
type Tabernas = HashMap<TabernaId, Arc<Entry>, std::hash::BuildHasherDefault<IdHasher>>;

/// Hashes a `TabernaId` (one `u64`) by a Fibonacci multiplication.
#[derive(Default)]
struct IdHasher(u64);

impl std::hash::Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(*b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0 ^ n).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

/// A registered taberna's admission rules and inbox.
struct Entry {
    options: TabernaOptions,
    inbox: Inbox,
}

/// Where an admitted delivery goes.
enum Inbox {
    /// A queue workers take from. Unbounded as a channel; bounded by the depth check in
    /// `deliver`, so the depth can follow the live `default_inbox_depth`.
    Queue(async_channel::Sender<TabernaRequest>),
    /// A handler called on the delivering driver, and its call count (one call in
    /// [`INLINE_SAMPLE`] is timed).
    Inline(Arc<dyn InlineHandler>, AtomicUsize),
}

/// One inline call in this many is timed.
const INLINE_SAMPLE: usize = 64;

/// The local tabernas of one domus. Reads (every send and delivery) load an immutable
/// snapshot without a lock; registering or removing a taberna copies the table and publishes
/// the copy, one writer at a time. No lock is held across an `.await`.
pub(crate) struct Registry {
    entries: ArcSwap<Tabernas>,
    writer: Mutex<()>,
    /// Bumped on every change of the table (a destination that chose between a local taberna
    /// and a peer looks again).
    generation: AtomicUsize,
    /// The depth of inboxes registered without one (live: `default_inbox_depth`).
    default_depth: AtomicUsize,
    recorder: Arc<Recorder>,
}

impl Registry {
    pub(crate) fn new(default_depth: usize, recorder: Arc<Recorder>) -> Self {
        Self {
            entries: ArcSwap::default(),
            writer: Mutex::new(()),
            generation: AtomicUsize::new(0),
            default_depth: AtomicUsize::new(default_depth),
            recorder,
        }
    }

    /// Applies a new `default_inbox_depth` to every inbox registered without its own.
    pub(crate) fn set_default_depth(&self, depth: usize) {
        self.default_depth.store(depth, Ordering::Relaxed);
    }

    pub(crate) fn contains(&self, id: TabernaId) -> bool {
        self.entries.load().contains_key(&id)
    }

    fn update<R>(&self, change: impl FnOnce(&mut Tabernas) -> R) -> R {
        let _writer = self.writer.lock().unwrap_or_else(PoisonError::into_inner);
        let mut entries = Tabernas::clone(&self.entries.load());
        let result = change(&mut entries);
        self.entries.store(Arc::new(entries));
        self.generation.fetch_add(1, Ordering::AcqRel);
        result
    }

    /// Changes so far to the table of local tabernas.
    pub(crate) fn generation(&self) -> usize {
        self.generation.load(Ordering::Acquire)
    }

    pub(crate) fn register(
        self: &Arc<Self>,
        id: TabernaId,
        options: TabernaOptions,
    ) -> Result<Taberna, Error> {
        let rx = self.update(|entries| {
            if entries.contains_key(&id) {
                return Err(Error::new(
                    ErrorId::TabernaAlreadyRegistered,
                    format!("{id} is already registered on this domus"),
                ));
            }
            let (tx, rx) = async_channel::unbounded();
            entries.insert(
                id,
                Arc::new(Entry {
                    options,
                    inbox: Inbox::Queue(tx),
                }),
            );
            Ok(rx)
        })?;
        Ok(Taberna {
            id,
            inbox: Box::pin(rx),
            registry: Arc::downgrade(self),
        })
    }

    /// Registers an inline taberna: `handler` answers each delivery on the delivering driver.
    pub(crate) fn register_inline(
        self: &Arc<Self>,
        id: TabernaId,
        options: TabernaOptions,
        handler: Arc<dyn InlineHandler>,
    ) -> Result<InlineTaberna, Error> {
        self.update(|entries| {
            if entries.contains_key(&id) {
                return Err(Error::new(
                    ErrorId::TabernaAlreadyRegistered,
                    format!("{id} is already registered on this domus"),
                ));
            }
            entries.insert(
                id,
                Arc::new(Entry {
                    options,
                    inbox: Inbox::Inline(handler, AtomicUsize::new(0)),
                }),
            );
            Ok(())
        })?;
        Ok(InlineTaberna {
            id,
            registry: Arc::downgrade(self),
        })
    }

    /// Runs an inline handler on one delivery: catches a panic (the message is answered
    /// `RequestDropped`), times one call in [`INLINE_SAMPLE`].
    fn call_inline(
        &self,
        handler: &dyn InlineHandler,
        calls: &AtomicUsize,
        request: InlineRequest<'_>,
    ) -> Answer {
        let timed = calls
            .fetch_add(1, Ordering::Relaxed)
            .is_multiple_of(INLINE_SAMPLE);
        let started = timed.then(std::time::Instant::now);
        let response =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| handler.handle(request)));
        if let Some(started) = started {
            let took = started.elapsed();
            if took > inline::SLOW_INLINE_CALL {
                self.recorder.inc(C::inline_handlers_slow);
                if let Some(suppressed) = self.recorder.log_allowed(LogKind::InlineHandlerSlow) {
                    tracing::warn!(
                        taberna = request.destination.0,
                        ?took,
                        suppressed,
                        "an inline handler took long: it runs on the peer's driver and must not block"
                    );
                }
            }
        }
        match response {
            Ok(Response::Accept) => Answer::Accepted,
            Ok(Response::Reply(payload)) => Answer::Replied(payload),
            Ok(Response::Reject { code, reason }) => Answer::application_reject(code, reason),
            Err(_) => {
                if let Some(suppressed) = self.recorder.log_allowed(LogKind::InlineHandlerSlow) {
                    tracing::warn!(
                        taberna = request.destination.0,
                        suppressed,
                        "an inline handler panicked; its message is answered RequestDropped"
                    );
                }
                Answer::refusal(ErrorId::RequestDropped, "the inline handler panicked")
            }
        }
    }

    /// Why `entry` refuses a delivery from `peer` of `message_type`, if it does.
    fn check(
        entry: &Entry,
        taberna: TabernaId,
        peer: &DomusId,
        message_type: MessageType,
    ) -> Option<(ErrorId, &'static str)> {
        // A2 types are the mesh services' own, for their reserved tabernas only. Every send
        // API refuses anything else, but a peer may write its own frames: the receiver is the
        // boundary.
        if message_type.class() == MessageClass::A2 && taberna.0 < RESERVED_TABERNA_BASE {
            return Some((
                ErrorId::InvalidMessageType,
                "an A2 (service) message type is for vicus's own service tabernas only",
            ));
        }
        if entry
            .options
            .allowed_peers
            .as_ref()
            .is_some_and(|allowed| !allowed.contains(peer))
        {
            return Some((
                ErrorId::Forbidden,
                "the sender is not on this taberna's allow-list",
            ));
        }
        if entry
            .options
            .accepted_types
            .as_ref()
            .is_some_and(|types| !types.contains(&message_type.0))
        {
            return Some((
                ErrorId::MessageTypeNotAccepted,
                "this taberna does not accept this message type",
            ));
        }
        None
    }

    fn unregister(&self, id: TabernaId) {
        self.update(|entries| entries.remove(&id));
    }

    /// Closes every inbox (shutdown): workers see the end of their stream.
    pub(crate) fn close_all(&self) {
        self.update(|entries| {
            for entry in entries.values() {
                if let Inbox::Queue(inbox) = &entry.inbox {
                    inbox.close();
                }
            }
            entries.clear();
        });
    }

    /// Offers a request to its taberna. On refusal the request is answered (rejected) here,
    /// and a request from a peer is counted as refused (by reason). Returns whether it reached
    /// the inbox (the caller counts a peer's as received).
    pub(crate) fn deliver(&self, request: TabernaRequest) -> bool {
        let remote = request.is_remote();
        let refuse = |mut request: TabernaRequest, error: ErrorId, reason: &str| {
            if remote {
                self.recorder.refused(error);
            }
            request.finish(Answer::refusal(error, reason));
        };
        let refusal = {
            let entries = self.entries.load();
            match entries.get(&request.destination) {
                None => Some((
                    ErrorId::UnknownTaberna,
                    "no such taberna on the receiving domus",
                )),
                Some(entry) => match Self::check(
                    entry,
                    request.destination,
                    request.peer.id(),
                    request.message_type,
                ) {
                    Some(refusal) => Some(refusal),
                    None => match &entry.inbox {
                        Inbox::Inline(_, _) if request.blob.is_some() => Some((
                            ErrorId::MessageTypeNotAccepted,
                            "an inline taberna takes no blobs",
                        )),
                        Inbox::Inline(handler, calls) => {
                            let view = InlineRequest {
                                peer: &request.peer,
                                source: request.source,
                                destination: request.destination,
                                message_type: request.message_type,
                                payload: &request.payload,
                            };
                            let answer = self.call_inline(handler.as_ref(), calls, view);
                            let mut request = request;
                            request.finish(answer);
                            return true;
                        }
                        Inbox::Queue(inbox) => {
                            let depth = entry
                                .options
                                .inbox_depth
                                .unwrap_or_else(|| self.default_depth.load(Ordering::Relaxed));
                            if inbox.len() >= depth {
                                self.recorder.inc(C::queue_overruns_inbox);
                                self.recorder.event(Event::QueueOverrun {
                                    taberna: request.destination.0,
                                });
                                refuse(
                                    request,
                                    ErrorId::TabernaBusy,
                                    "the taberna's inbox is full",
                                );
                                return false;
                            }
                            match inbox.try_send(request) {
                                Ok(()) => return true,
                                Err(async_channel::TrySendError::Full(r)) => {
                                    refuse(r, ErrorId::TabernaBusy, "the taberna's inbox is full");
                                    return false;
                                }
                                Err(async_channel::TrySendError::Closed(r)) => {
                                    refuse(
                                        r,
                                        ErrorId::TabernaShutdown,
                                        "the taberna is shutting down",
                                    );
                                    return false;
                                }
                            }
                        }
                    },
                },
            }
        };
        if let Some((error, reason)) = refusal {
            refuse(request, error, reason);
        }
        false
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

impl Taberna {
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
