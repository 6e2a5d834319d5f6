//! A delivery waiting for its answer: [`TabernaRequest`], its answering half [`AnswerHandle`]
//! (from [`TabernaRequest::into_parts`], with [`RequestParts`]), and where the answer goes —
//! back through the peer's driver, or to a local sender.
//!
//! Every request is answered exactly once: answering consumes it, and dropping it unanswered
//! rejects it with `RequestDropped`. Nothing here blocks or awaits: an answer is queued to the
//! peer's driver or sent on a oneshot channel.

use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::oneshot;

use super::{MessageType, TabernaId};
use crate::a0_transport::PeerIdentity;
use crate::a1_callis::headers::{Headers, TraceContext};
use crate::a1_callis::session::Answer;
use crate::error::ErrorId;
use crate::runtime::AnswerToPeer;
use crate::runtime::ends::BlobReceiver;

/// Where an answer goes.
pub(crate) enum AnswerTarget {
    /// Back to a remote sender, through its peer's driver.
    Remote(AnswerToPeer),
    /// Back to a local sender.
    Local(oneshot::Sender<Answer>),
}

impl AnswerTarget {
    fn send(self, answer: Answer) {
        match self {
            AnswerTarget::Remote(peer) => peer.send(answer),
            // A closed channel means the sender is gone; there is no one left to tell.
            AnswerTarget::Local(tx) => {
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
    pub(super) peer: Arc<PeerIdentity>,
    pub(super) source: TabernaId,
    pub(super) destination: TabernaId,
    pub(super) message_type: MessageType,
    pub(super) payload: Bytes,
    pub(super) headers: Headers,
    pub(super) blob: Option<BlobReceiver>,
    answer_handle: AnswerHandle,
}

/// The answering half of a [`TabernaRequest`], from [`TabernaRequest::into_parts`]: answer
/// exactly once; dropping it unanswered rejects with [`ErrorId::RequestDropped`].
pub struct AnswerHandle {
    target: Option<AnswerTarget>,
    /// The delivery's `vicus.deliver` span: it ends when the request is answered (or
    /// dropped), with the answer recorded.
    span: tracing::Span,
}

impl fmt::Debug for AnswerHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AnswerHandle")
            .field("answered", &self.target.is_none())
            .finish()
    }
}

impl AnswerHandle {
    /// Accepts the request.
    pub fn accept(mut self) {
        self.finish(Answer::Accepted);
    }

    /// Answers with a payload.
    pub fn reply(mut self, payload: Bytes) {
        self.finish(Answer::Replied(payload));
    }

    /// Answers with a payload and headers (see [`TabernaRequest::reply_with_headers`]).
    pub fn reply_with_headers(mut self, payload: Bytes, headers: &Headers) {
        self.finish(Answer::reply_with_headers(payload, headers));
    }

    /// Rejects with an application code and reason.
    pub fn reject(mut self, code: u32, reason: &str) {
        self.finish(Answer::application_reject(code, reason));
    }

    fn finish(&mut self, answer: Answer) {
        if let Some(target) = self.target.take() {
            if !self.span.is_disabled() {
                self.span.record("answer", answer_name(&answer));
            }
            target.send(answer);
        }
    }

    /// The delivery's span (see [`TabernaRequest::span`]).
    pub fn span(&self) -> &tracing::Span {
        &self.span
    }
}

/// An answer's name in a delivery span: `accepted`, `replied`, or the refusal's error.
fn answer_name(answer: &Answer) -> &'static str {
    match answer {
        Answer::Accepted => "accepted",
        Answer::Replied(_) | Answer::RepliedWithHeaders(_) => "replied",
        Answer::Rejected { error, .. } => error.error_id().map_or("rejected", ErrorId::name),
    }
}

impl Drop for AnswerHandle {
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
    /// Its headers.
    pub headers: Headers,
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
            .field("headers", &self.headers)
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
        target: AnswerTarget,
    ) -> Self {
        Self {
            peer,
            source,
            destination,
            message_type,
            payload,
            headers: Headers::new(),
            blob: None,
            answer_handle: AnswerHandle {
                target: Some(target),
                span: tracing::Span::none(),
            },
        }
    }

    /// Attaches the headers the message carried and opens its delivery span (which continues
    /// the trace the headers carry, with the `otel` feature). Every request gets here once.
    pub(crate) fn with_headers(mut self, headers: Headers) -> Self {
        self.answer_handle.span = crate::observe::delivery_span(
            self.destination.0,
            self.message_type.0,
            self.peer.id(),
            &headers,
        );
        self.headers = headers;
        self
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
    pub fn into_parts(self) -> (RequestParts, AnswerHandle) {
        let TabernaRequest {
            peer,
            source,
            destination,
            message_type,
            payload,
            headers,
            blob,
            answer_handle,
        } = self;
        (
            RequestParts {
                peer,
                source,
                destination,
                message_type,
                payload,
                headers,
                blob,
            },
            answer_handle,
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

    /// The headers the sender attached ([`SendOptions::headers`](crate::SendOptions::headers)).
    pub fn headers(&self) -> &Headers {
        &self.headers
    }

    /// The sender's W3C trace context, when the message carried one (the `traceparent`
    /// header): for a handler that propagates traces by hand. With the `otel` feature the
    /// request's delivery span already continues it.
    pub fn trace_context(&self) -> Option<TraceContext> {
        self.headers.trace_context()
    }

    /// The delivery's `vicus.deliver` span (debug level: taberna, message type, peer, and the
    /// answer when it is given), from the request's arrival to its answer. A handler that
    /// works asynchronously runs its work in it — `work.instrument(request.span().clone())`
    /// — so its own spans and events belong to the delivery (and, with the `otel` feature,
    /// to the sender's trace). Disabled when no subscriber wants it.
    pub fn span(&self) -> &tracing::Span {
        &self.answer_handle.span
    }

    /// Takes the payload out (leaving the request answerable).
    pub fn take_payload(&mut self) -> Bytes {
        std::mem::take(&mut self.payload)
    }

    /// Accepts it: the sender's `send` returns `Delivery::Accepted`.
    pub fn accept(self) {
        self.answer_handle.accept();
    }

    /// Answers it with a payload: the sender's `send` returns `Delivery::Replied`.
    pub fn reply(self, payload: Bytes) {
        self.answer_handle.reply(payload);
    }

    /// Answers it with a payload and headers: the sender's `send` returns
    /// `Delivery::Replied(reply)` and [`Reply::headers`](crate::Reply::headers) holds them.
    /// With headers, the payload is copied behind them (a reply without is not). The
    /// headers count toward the reply's size limit, and the sender holds them to its
    /// `max_headers` and `max_headers_len` (over: its send fails with `HeadersTooLarge`).
    pub fn reply_with_headers(self, payload: Bytes, headers: &Headers) {
        self.answer_handle.reply_with_headers(payload, headers);
    }

    /// Rejects it with an application code and reason (at most 256 bytes go on the wire):
    /// the sender's `send` fails with [`ErrorId::RemoteTabernaRejected`] carrying both.
    pub fn reject(self, code: u32, reason: &str) {
        self.answer_handle.reject(code, reason);
    }

    pub(super) fn finish(&mut self, answer: Answer) {
        self.answer_handle.finish(answer);
    }

    /// Where its answer goes, taken out: the request is then answered by whoever holds it
    /// (dropping the request no longer rejects it).
    pub(super) fn take_target(&mut self) -> Option<AnswerTarget> {
        self.answer_handle.target.take()
    }

    /// Whether it came from a peer (rather than from this domus).
    pub(super) fn is_remote(&self) -> bool {
        matches!(self.answer_handle.target, Some(AnswerTarget::Remote(_)))
    }
}

/// Answers for many requests, handed back together: the answers for one peer go to its
/// driver in one push (one lock, at most one wake-up) when the batch is
/// [flushed](Self::flush) or dropped, instead of one push each. Answers for local senders go
/// at once. For a worker that takes its requests with
/// [`Taberna::recv_many`](crate::Taberna::recv_many):
///
/// ```no_run
/// # async fn run(taberna: vicus::Taberna) {
/// let mut requests = Vec::new();
/// let mut answers = vicus::taberna::AnswerBatch::new();
/// while taberna.recv_many(&mut requests, 256).await > 0 {
///     for request in requests.drain(..) {
///         answers.accept(request);
///     }
///     answers.flush();
/// }
/// # }
/// ```
///
/// Every request put in the batch is answered exactly once, when the batch is flushed or
/// dropped; the answers to one peer keep their order.
#[derive(Default)]
pub struct AnswerBatch {
    remote: Vec<crate::runtime::AnswerToPeer>,
    answers: Vec<Answer>,
}

impl fmt::Debug for AnswerBatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AnswerBatch")
            .field("waiting", &self.remote.len())
            .finish()
    }
}

impl AnswerBatch {
    /// An empty batch.
    pub fn new() -> Self {
        Self::default()
    }

    /// Accepts `request` (at the next flush).
    pub fn accept(&mut self, request: TabernaRequest) {
        self.add(request, Answer::Accepted);
    }

    /// Answers `request` with a payload (at the next flush).
    pub fn reply(&mut self, request: TabernaRequest, payload: Bytes) {
        self.add(request, Answer::Replied(payload));
    }

    /// Answers `request` with a payload and headers (at the next flush; see
    /// [`TabernaRequest::reply_with_headers`]).
    pub fn reply_with_headers(
        &mut self,
        request: TabernaRequest,
        payload: Bytes,
        headers: &Headers,
    ) {
        self.add(request, Answer::reply_with_headers(payload, headers));
    }

    /// Rejects `request` with an application code and reason (at the next flush).
    pub fn reject(&mut self, request: TabernaRequest, code: u32, reason: &str) {
        self.add(request, Answer::application_reject(code, reason));
    }

    /// Answers waiting for the next flush.
    pub fn len(&self) -> usize {
        self.remote.len()
    }

    /// Whether no answer waits.
    pub fn is_empty(&self) -> bool {
        self.remote.is_empty()
    }

    fn add(&mut self, mut request: TabernaRequest, answer: Answer) {
        match request.take_target() {
            Some(AnswerTarget::Remote(to)) => {
                self.remote.push(to);
                self.answers.push(answer);
            }
            Some(local) => local.send(answer),
            None => {}
        }
    }

    /// Hands every waiting answer to its peer's driver: one push per run of answers to the
    /// same peer.
    pub fn flush(&mut self) {
        let mut run = Vec::new();
        let mut targets = self.remote.drain(..).zip(self.answers.drain(..)).peekable();
        while let Some((to, answer)) = targets.next() {
            let queue = to.queue.clone();
            run.push(to.queued(answer));
            while let Some((next, _)) = targets.peek()
                && Arc::ptr_eq(&next.queue, &queue)
            {
                if let Some((next, answer)) = targets.next() {
                    run.push(next.queued(answer));
                }
            }
            // A closed queue: the peer's driver is gone, no one is left to tell.
            let _ = queue.push_many(&mut run);
            run.clear();
        }
    }
}

impl Drop for AnswerBatch {
    fn drop(&mut self) {
        self.flush();
    }
}
