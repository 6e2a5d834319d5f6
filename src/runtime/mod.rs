//! **The runtime**: the only async A1 code. One task per peer owns its primary callis and
//! drives the pure [`Session`](crate::a1_callis::session::Session) ([`peer`]); one task per
//! peer owns its blob callis and drives the pure
//! [`BlobStreams`](crate::a1_callis::blob::BlobStreams) ([`blob`]); [`ends`] are the
//! application's ends of blob streams; [`accept`] reads an inbound callis's first frame and
//! writes the CLOSE that refuses one.
//!
//! The runtime sits above `a1_callis` and below `taberna` and `domus`: it names no type of
//! theirs. What it hands up — a delivery from a peer, with the handle that answers it — goes
//! through [`Inbound`], which the upper layer implements.
//!
//! It holds no lock across an `.await`, and every wait it makes is a socket, a channel or a
//! timer.

#![cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::indexing_slicing,
        clippy::arithmetic_side_effects
    )
)]

pub(crate) mod accept;
pub(crate) mod blob;
pub(crate) mod budget;
pub(crate) mod callis;
pub(crate) mod completion;
pub(crate) mod ends;
pub(crate) mod peer;
pub(crate) mod queue;
#[cfg(test)]
mod test_wakers;

use std::future::Future;
use std::sync::Arc;
use std::task::Context;

use bytes::Bytes;

use crate::a0_transport::PeerIdentity;
use crate::a1_callis::codes::WireCode;
use crate::a1_callis::headers::Headers;
pub(crate) use crate::a1_callis::session::Answer;
use crate::a1_callis::session::too_large_reply;
use crate::error::{Error, ErrorId, untrusted};
use ends::BlobReceiver;

/// How a delivery ended when it did not fail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery {
    /// The receiving taberna accepted it.
    Accepted,
    /// The receiving taberna answered with a payload (and perhaps headers).
    Replied(Reply),
}

/// A reply: its payload and the headers the replying handler attached
/// ([`TabernaRequest::reply_with_headers`](crate::TabernaRequest::reply_with_headers); none
/// for most). Derefs to its payload, and compares equal to bytes equal to the payload (its
/// headers aside), so code that only wants the payload reads it as a `Bytes`.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Reply {
    payload: Bytes,
    headers: Headers,
}

impl Reply {
    /// A reply without headers.
    pub fn new(payload: Bytes) -> Self {
        Self {
            payload,
            headers: Headers::new(),
        }
    }

    /// A reply with headers.
    pub fn with_headers(payload: Bytes, headers: Headers) -> Self {
        Self { payload, headers }
    }

    /// The payload.
    pub fn payload(&self) -> &Bytes {
        &self.payload
    }

    /// The headers (empty when the handler attached none).
    pub fn headers(&self) -> &Headers {
        &self.headers
    }

    /// The payload, by value.
    pub fn into_payload(self) -> Bytes {
        self.payload
    }

    /// The payload and the headers.
    pub fn into_parts(self) -> (Bytes, Headers) {
        (self.payload, self.headers)
    }
}

impl std::ops::Deref for Reply {
    type Target = Bytes;

    fn deref(&self) -> &Bytes {
        &self.payload
    }
}

impl AsRef<[u8]> for Reply {
    fn as_ref(&self) -> &[u8] {
        &self.payload
    }
}

impl From<Bytes> for Reply {
    fn from(payload: Bytes) -> Self {
        Self::new(payload)
    }
}

impl From<Vec<u8>> for Reply {
    fn from(payload: Vec<u8>) -> Self {
        Self::new(payload.into())
    }
}

impl From<&'static str> for Reply {
    fn from(payload: &'static str) -> Self {
        Self::new(payload.into())
    }
}

impl From<&'static [u8]> for Reply {
    fn from(payload: &'static [u8]) -> Self {
        Self::new(payload.into())
    }
}

impl From<Reply> for Bytes {
    fn from(reply: Reply) -> Self {
        reply.payload
    }
}

impl PartialEq<Bytes> for Reply {
    fn eq(&self, other: &Bytes) -> bool {
        self.payload == *other
    }
}

impl PartialEq<[u8]> for Reply {
    fn eq(&self, other: &[u8]) -> bool {
        self.payload == other
    }
}

impl PartialEq<&[u8]> for Reply {
    fn eq(&self, other: &&[u8]) -> bool {
        self.payload == *other
    }
}

impl<const N: usize> PartialEq<&[u8; N]> for Reply {
    fn eq(&self, other: &&[u8; N]) -> bool {
        self.payload == other[..]
    }
}

impl PartialEq<Vec<u8>> for Reply {
    fn eq(&self, other: &Vec<u8>) -> bool {
        self.payload == other[..]
    }
}

impl std::fmt::Debug for Reply {
    /// The payload as `Bytes` shows it, and the headers when there are any.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.headers.is_empty() {
            std::fmt::Debug::fmt(&self.payload, f)
        } else {
            write!(f, "{:?} with headers {:?}", self.payload, self.headers)
        }
    }
}

/// The outcome of one send: how the receiver answered, or why it failed.
pub type Outcome = Result<Delivery, Error>;

/// What a local taberna's answer means for its caller: as [`answer_result`], after holding a
/// reply to `max_reply` bytes (the receiver's `max_message_len`, which a remote reply meets on
/// the wire).
pub(crate) fn local_answer_result(
    answer: Answer,
    max_reply: usize,
    context: impl std::fmt::Display,
) -> Outcome {
    match answer.reply_bytes() {
        Some(p) if p.len() > max_reply => {
            answer_result(too_large_reply(p.len(), max_reply), context)
        }
        _ => answer_result(answer, context),
    }
}

/// What a send's answer means for its caller: the one mapping of answers to results, for
/// remote and local tabernas alike. `context` names the destination in error messages.
#[inline]
pub(crate) fn answer_result(answer: Answer, context: impl std::fmt::Display) -> Outcome {
    let (error, code, reason) = match answer {
        Answer::Accepted => return Ok(Delivery::Accepted),
        Answer::Replied(payload) => return Ok(Delivery::Replied(Reply::new(payload))),
        Answer::RepliedWithHeaders(raw) => {
            let mut payload = raw;
            // Checked when the frame (or the local answer) was made; a block that did not
            // read back would have no headers to give.
            let headers =
                crate::a1_callis::headers::Headers::take(&mut payload).unwrap_or_default();
            return Ok(Delivery::Replied(Reply::with_headers(payload, headers)));
        }
        Answer::Rejected {
            error,
            code,
            reason,
        } => (error, code, reason),
    };
    match error {
        WireCode::APPLICATION_REJECT => Err(Error::rejected(code, &reason, context)),
        // A handler held it when the receiving domus shut down.
        WireCode::PEER_SHUT_DOWN => Err(Error::new(
            ErrorId::PeerShutDown,
            format!("{context}: {}", untrusted(&reason)),
        )
        .maybe_delivered()),
        _ => match error.error_id() {
            Some(id) => Err(Error::new(id, format!("{context}: {}", untrusted(&reason)))),
            None => Err(Error::new(
                error.rejection_id(),
                format!(
                    "{context} refused the message with unknown error {error}: {}",
                    untrusted(&reason)
                ),
            )),
        },
    }
}

/// A message from a peer for a local taberna, with the handle that answers it.
pub(crate) struct InboundMessage {
    /// Who sent it (from the verified certificate).
    pub(crate) peer: Arc<PeerIdentity>,
    /// The sender's source taberna.
    pub(crate) src: u64,
    /// The destination taberna.
    pub(crate) dst: u64,
    /// The application's message type.
    pub(crate) msg_type: u32,
    /// The payload (for a blob, the application's header).
    pub(crate) payload: Bytes,
    /// Its headers (empty for most).
    pub(crate) headers: crate::a1_callis::headers::Headers,
    /// The receiving end of the blob this message opens, if it opens one.
    pub(crate) blob: Option<BlobReceiver>,
    /// Answers it (exactly once).
    pub(crate) answer: AnswerToPeer,
}

/// Where the runtime hands deliveries: implemented by the upper layer (the taberna
/// registry). It must not block; a refusal is answered through [`InboundMessage::answer`].
pub(crate) trait Inbound: Send + Sync + 'static {
    /// Takes a delivery in: offers it to its taberna, or refuses it.
    fn take_in(&self, message: InboundMessage) -> Intake;

    /// Takes a run of deliveries to one taberna in (its taberna looked up and checked once),
    /// and tells `intake` what became of each, by id, in order.
    fn take_in_run(&self, run: InboundRun<'_>, intake: &mut dyn FnMut(u64, Intake));
}

/// Messages for one taberna from one peer, with consecutive ids (a run of a MESSAGE_BATCH the
/// session let through), lent to [`Inbound::take_in_run`].
pub(crate) struct InboundRun<'a> {
    /// Who sent them (from the verified certificate).
    pub(crate) peer: &'a Arc<PeerIdentity>,
    /// The messages (none opens a blob).
    pub(crate) run: &'a crate::a1_callis::frame::MessageBatch,
    /// The handle that answers message `id`, for a taberna whose handler answers later.
    pub(crate) answer: &'a dyn Fn(u64) -> AnswerToPeer,
}

/// What became of a delivery handed to [`Inbound::take_in`].
pub(crate) enum Intake {
    /// It waits in the taberna's inbox; its handler answers through its `AnswerToPeer`.
    Queued,
    /// It was refused and answered through its `AnswerToPeer` (and counted as refused).
    Refused,
    /// It was refused here (counted as refused); the driver writes this answer itself.
    Answered(Answer),
    /// An inline handler answered it on this driver; the driver writes this answer itself.
    AnsweredByHandler(Answer),
}

/// The answering handle of a delivery from a peer: it carries the answer back to the peer's
/// driver, which writes it on the callis.
pub(crate) struct AnswerToPeer {
    pub(crate) queue: Arc<queue::WakeQueue<peer::QueuedAnswer>>,
    pub(crate) epoch: u64,
    pub(crate) id: u64,
}

impl AnswerToPeer {
    /// The answer as its driver takes it.
    pub(crate) fn queued(self, answer: Answer) -> peer::QueuedAnswer {
        peer::QueuedAnswer {
            epoch: self.epoch,
            id: self.id,
            answer,
        }
    }

    /// Sends the answer. A closed queue means the peer's driver is gone: there is no one
    /// left to tell.
    pub(crate) fn send(self, answer: Answer) {
        let _ = self.queue.push(peer::QueuedAnswer {
            epoch: self.epoch,
            id: self.id,
            answer,
        });
    }
}

/// Schedules this task again after the other runnable tasks (as `tokio::task::yield_now`
/// does), rather than through a plain self-wake, which tokio runs next on the same worker and
/// so starves every other task (the primary callis above all) while a bulk transfer runs.
pub(crate) fn yield_turn(cx: &mut Context<'_>) {
    let mut deferred = std::pin::pin!(tokio::task::yield_now());
    // The first poll defers the wake-up to the scheduler and is always pending.
    let _ = deferred.as_mut().poll(cx);
}

/// The error of work cut short because this domus shut down.
pub(crate) fn domus_closed() -> Error {
    Error::new(ErrorId::DomusClosed, "the domus has been shut down")
}

/// A non-cryptographic random number (jitter and epochs need unpredictability across
/// processes, not secrecy): std's randomly seeded SipHash over a counter.
pub(crate) fn rand_u64() -> u64 {
    #[cfg(feature = "sim")]
    if let Some(n) = seeded::next() {
        return n;
    }
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    h.finish()
}

/// A seeded stand-in for [`rand_u64`] on one thread, for deterministic simulations (feature
/// `sim`): a simulation runs every domus on one thread, so seeding it makes every epoch and
/// every reconnect jitter follow from the seed.
#[cfg(feature = "sim")]
pub(crate) mod seeded {
    use std::cell::Cell;

    thread_local! {
        static STATE: Cell<Option<u64>> = const { Cell::new(None) };
    }

    /// From now on `rand_u64` on this thread draws from `seed` (`None`: from the OS again).
    pub(crate) fn set(seed: Option<u64>) {
        STATE.with(|s| s.set(seed));
    }

    /// The next number of the seeded sequence (splitmix64), if this thread is seeded.
    pub(crate) fn next() -> Option<u64> {
        STATE.with(|s| {
            let x = s.get()?.wrapping_add(0x9E37_79B9_7F4A_7C15);
            s.set(Some(x));
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            Some(z ^ (z >> 31))
        })
    }
}
