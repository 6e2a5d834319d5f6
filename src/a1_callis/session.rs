//! The sans-IO A1 session with one peer: HELLO, keepalive, message ids, retention and replay,
//! deduplication, answers, and transmit scheduling (which message goes next is the rule of
//! `a1_callis::schedule`, which send expires next the index of `a1_callis::deadlines`).
//!
//! A `Session` lives as long as the peer relationship, across any number of calles: when a
//! callis drops, every unanswered message is kept and replayed in its original order on the
//! next one; a changed peer epoch fails what was transmitted with `PeerRestarted`.
//!
//! It never reads a clock, touches a socket or spawns anything: time comes in as `now`, bytes
//! come in through [`Session::recv_buf`] + [`Session::handle_input`] and go out through
//! [`Session::poll_transmit`]. The driver calls, in any order and as often as it likes:
//!
//! 1. [`connected`](Session::connected) when a callis is authenticated,
//!    [`disconnected`](Session::disconnected) when it is gone;
//! 2. [`send`](Session::send) / [`answer`](Session::answer) for work from the application;
//! 3. `recv_buf().extend(..)` then [`handle_input`](Session::handle_input) for bytes read;
//! 4. [`handle_timeout`](Session::handle_timeout) when [`poll_timeout`](Session::poll_timeout)
//!    passes;
//! 5. then drains [`poll_event`](Session::poll_event) and
//!    [`poll_transmit`](Session::poll_transmit) (write everything it returns in one write).
//!
//! Delivery contract: a message is retained until the peer answers it (ACCEPTED, REPLY or
//! REJECT) or its deadline passes. The receiver remembers every id inside its dedupe window
//! (ring of `window` slots) with its answer, so a replayed duplicate is answered again and never
//! delivered twice. The sender never uses an id `window` or more past its oldest unanswered
//! one, which is what makes the ring safe.
//!
//! This file is over 800 lines on purpose: it holds the session's types and every call a
//! driver makes, the session's contract, in one place; the work behind the calls lives in
//! `session/` (receive, transmit, timers, the dedupe ring, the answer queue).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use super::codes::WireCode;
use super::deadlines::Deadlines;
use super::frame::{self, Frame, Hello, MessageFrame, PROTOCOL_VERSION, RejectFrame};
use super::headers::HEADERS_VERSION;
pub use super::headers::{Headers, TraceContext};
use super::link::{WriteVerdict, WriteWatch};
use super::rate::RateWindow;
use super::reply_budget::ReplyBudget;
pub use super::schedule::A3_AGING;

mod answers;
mod dedupe;
mod receive;
mod timers;
mod transmit;

use super::schedule::{Class, Schedule};
use super::window::IdQueue;
use crate::error::{Error, ErrorId, untrusted};
use answers::AnswerQueue;
use dedupe::{DedupeRing, Seen, SlotState};
use transmit::class_of;

/// The last message type of the A1 (transport control) range; never valid in a MESSAGE frame.
pub const A1_MESSAGE_TYPE_MAX: u32 = 0x0000_FFFF;
/// The first message type of the A3 (application) range; below it (and above A1) is A2.
pub const A3_MESSAGE_TYPE_BASE: u32 = 0x0100_0000;

/// Limits and timers of a session. Validated by the domus configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionConfig {
    /// The longest frame body this side accepts (and so the longest payload plus 28 bytes).
    pub max_frame_len: u32,
    /// This side's dedupe window: how many ids past the oldest unanswered one the peer may use.
    pub window: u32,
    /// The most messages this side retains (queued or unanswered) for the peer.
    pub max_in_flight: u32,
    /// How often an open callis is probed with PING.
    pub keepalive_interval: Duration,
    /// A callis that receives nothing for this long is closed.
    pub idle_timeout: Duration,
    /// How long the peer has to send its HELLO once the callis is up.
    pub hello_timeout: Duration,
    /// Reply payload bytes the session keeps for resending after a reconnect, when it has a
    /// budget of its own (see [`Session::with_reply_budget`]).
    pub max_retained_reply_bytes: usize,
    /// A soft cap on the bytes one [`Session::poll_transmit`] call produces.
    pub transmit_batch_bytes: usize,
    /// How long one frame may take to arrive once its first byte did (a peer that trickles a
    /// frame byte by byte is closed even though it is never idle).
    pub frame_read_timeout: Duration,
    /// Frames accepted from the peer per second before the callis is closed as a flood
    /// (PING, PONG and skipped frames count double).
    pub max_frames_per_second: u32,
    /// Deliveries per second this side may refuse on its own (unknown taberna, forbidden,
    /// wrong type) before the callis is closed as abusive.
    pub max_refusals_per_second: u32,
    /// Answer bytes (replies, rejections, acceptances) that may wait to be written to the
    /// peer: once this many wait, new deliveries from the peer are refused with `TabernaBusy`
    /// (not delivered) until the peer reads (T31). The number of answers waiting needs no
    /// limit of its own: a correct peer never has more than `window` unanswered messages, so
    /// more answers owed than `window` is a protocol violation.
    pub max_unsent_answer_bytes: usize,
    /// The most headers one message may carry, either way: a send with more fails with
    /// `HeadersTooLarge`, and a message from the peer with more is refused with it.
    pub max_headers: u16,
    /// The most bytes one message's headers may take ([`Headers::encoded_len`]), either way.
    pub max_headers_len: usize,
}

impl Default for SessionConfig {
    fn default() -> Self {
        Self {
            max_frame_len: 4 * 1024 * 1024,
            window: 8192,
            max_in_flight: 4096,
            keepalive_interval: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(20),
            hello_timeout: Duration::from_secs(10),
            max_retained_reply_bytes: 8 * 1024 * 1024,
            transmit_batch_bytes: 256 * 1024,
            frame_read_timeout: Duration::from_secs(30),
            max_frames_per_second: 4_000_000,
            max_refusals_per_second: 10_000,
            max_unsent_answer_bytes: 16 * 1024 * 1024,
            max_headers: 16,
            max_headers_len: 4096,
        }
    }
}

/// A message the application wants delivered.
#[derive(Debug, Clone)]
pub struct Outgoing {
    /// Destination taberna.
    pub dst: u64,
    /// Source taberna.
    pub src: u64,
    /// Message type (A2 or A3).
    pub msg_type: u32,
    /// Headers (empty for most messages: then they cost nothing, on the wire or here).
    pub headers: Headers,
    /// Payload.
    pub payload: Bytes,
    /// When the send gives up with `SendTimeout`.
    pub deadline: Instant,
}

impl Outgoing {
    /// The payload's size as the in-flight budget counts it.
    pub fn size(&self) -> u32 {
        u32::try_from(self.payload.len()).unwrap_or(u32::MAX)
    }
}

/// How a receiver answers a delivered message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// Accepted without a reply payload.
    Accepted,
    /// Answered with a reply payload.
    Replied(Bytes),
    /// Answered with a reply that carries headers: a headers block ([`Headers`]' wire form)
    /// followed by the payload, as the REPLY frame carries them (one buffer: an answer takes
    /// no more room for the headers only some replies have).
    RepliedWithHeaders(Bytes),
    /// Refused: an [`ErrorId`]'s wire code, the application's code and a reason.
    Rejected {
        /// The wire code ([`WireCode::APPLICATION_REJECT`] for an application reject).
        error: WireCode,
        /// Application code (0 when the refusal is not the application's).
        code: u32,
        /// Reason text (capped on the wire).
        reason: String,
    },
}

impl Answer {
    /// A reply with `headers` (a plain reply when they are empty). With headers, the payload
    /// is copied behind the headers block.
    pub fn reply_with_headers(payload: Bytes, headers: &Headers) -> Self {
        if headers.is_empty() {
            return Answer::Replied(payload);
        }
        let mut raw = BytesMut::with_capacity(headers.wire_len().saturating_add(payload.len()));
        headers.put(&mut raw);
        raw.extend_from_slice(&payload);
        Answer::RepliedWithHeaders(raw.freeze())
    }

    /// The reply's bytes on the wire after the id (its headers block, if any, and its
    /// payload); `None` for an acceptance or a rejection.
    pub fn reply_bytes(&self) -> Option<&Bytes> {
        match self {
            Answer::Replied(p) | Answer::RepliedWithHeaders(p) => Some(p),
            _ => None,
        }
    }

    /// A reply with headers split into its headers and its payload (zero-copy). `None` for
    /// any other answer, or a block that does not read back (never one this side checked).
    pub fn split_reply(&self) -> Option<(Headers, Bytes)> {
        let Answer::RepliedWithHeaders(raw) = self else {
            return None;
        };
        let mut payload = raw.clone();
        let headers = Headers::take(&mut payload).ok()?;
        Some((headers, payload))
    }

    /// A refusal decided by vicus rather than by the application (code 0): the one
    /// constructor for them.
    pub(crate) fn refusal(error: ErrorId, reason: impl Into<String>) -> Self {
        Answer::Rejected {
            error: error.into(),
            code: 0,
            reason: reason.into(),
        }
    }

    /// The receiving application's rejection, with its code and reason.
    pub(crate) fn application_reject(code: u32, reason: impl Into<String>) -> Self {
        Answer::Rejected {
            error: WireCode::APPLICATION_REJECT,
            code,
            reason: reason.into(),
        }
    }
}

/// How one of our sends ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SendEnd {
    /// The peer answered.
    Answered(Answer),
    /// It failed locally (timeout, peer restarted, session closed).
    Failed(Error),
}

/// What the session tells its driver. `T` is the token each send carried (see
/// [`Session`]).
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Event<T = ()> {
    /// HELLO exchanged; the callis is open. `restarted` when the peer's epoch changed since
    /// the previous callis.
    Connected {
        /// The peer's epoch.
        peer_epoch: u64,
        /// Whether it differs from the previous one.
        restarted: bool,
    },
    /// A new message for a local taberna; answer it with [`Session::answer`] using this epoch.
    Arrived {
        /// The peer epoch the id belongs to.
        peer_epoch: u64,
        /// The message.
        message: MessageFrame,
    },
    /// New messages with consecutive ids, all for one local taberna, from one taberna, of one
    /// type (a run of a MESSAGE_BATCH the dedupe window let through): deliver them in one go,
    /// then answer each with [`Session::answer`] using this epoch.
    ArrivedRun {
        /// The peer epoch the ids belong to.
        peer_epoch: u64,
        /// The messages.
        run: frame::MessageBatch,
    },
    /// One of our sends ended.
    Finished {
        /// The id [`Session::send`] returned.
        id: u64,
        /// The taberna it was sent to (so the token need not keep it).
        dst: u64,
        /// How it ended.
        outcome: SendEnd,
        /// The token the send was given to [`Session::send_with_token`].
        token: T,
    },
    /// The callis must be closed (protocol violation, idle, the peer closed it, hello
    /// timeout). Unanswered work stays retained for the next callis.
    Close(Error),
}

impl<T> Event<T> {
    /// The deliveries this event reports, as (peer epoch, id): one for
    /// [`Arrived`](Event::Arrived), each of a run for [`ArrivedRun`](Event::ArrivedRun), none
    /// for the others.
    pub fn arrivals(&self) -> Vec<(u64, u64)> {
        match self {
            Event::Arrived {
                peer_epoch,
                message,
            } => vec![(*peer_epoch, message.id)],
            Event::ArrivedRun { peer_epoch, run } => (run.first_id..=run.last_id())
                .map(|id| (*peer_epoch, id))
                .collect(),
            _ => Vec::new(),
        }
    }
}

#[derive(Debug)]
struct Retained<T> {
    /// The sender's token, handed back with the outcome.
    token: T,
    dst: u64,
    src: u64,
    msg_type: u32,
    headers: Headers,
    payload: Bytes,
    deadline: Instant,
    /// Written on the current callis (cleared when it drops, so the message is replayed).
    transmitted: bool,
    /// Written at least once in the peer's current epoch: the peer may have it.
    ever_transmitted: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Link {
    Down,
    AwaitingHello {
        deadline: Instant,
    },
    Open,
    /// A close was decided; nothing more is read, only the CLOSE frame goes out.
    Closing,
}

/// A reply at most this long is kept in the dedupe state as a copy of its own.
const SMALL_REPLY: usize = 4096;

/// Room (in elements) an empty queue keeps rather than giving back in
/// [`Session::release_idle_memory`].
const IDLE_KEEP: usize = 64;

/// The sender reports DONE_BELOW once its floor (its oldest retained id) moved this many ids,
/// and with every keepalive probe: the receiver's dedupe state then follows the in-flight
/// window, and empties for a quiet peer.
const DONE_BELOW_STEP: u64 = 64;

/// Counters a session keeps (cumulative).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SessionStats {
    /// MESSAGE frames written (replays included).
    pub messages_sent: u64,
    /// Messages replayed on a later callis.
    pub messages_replayed: u64,
    /// New messages delivered to the application.
    pub messages_delivered: u64,
    /// Duplicate messages suppressed by the dedupe window.
    pub duplicates_suppressed: u64,
    /// Reserved frames skipped.
    pub frames_skipped: u64,
    /// Callis opened (HELLO exchanged).
    pub opened: u64,
    /// New messages refused with `TabernaBusy` (not delivered) because
    /// `max_unsent_answer_bytes` of answers waited for the peer to read them.
    pub refused_unread_answers: u64,
}

/// The A1 session with one peer. See the module docs for the calling order.
///
/// `T` is what the driver needs back when one of its sends ends (the waiting sender's
/// completion, in the runtime): plain data the session stores with the message and returns in
/// [`Event::Finished`], never looks into. The session is the one table of messages in flight;
/// no table above it is keyed by the same ids.
#[derive(Debug)]
pub struct Session<T = ()> {
    config: SessionConfig,
    local_id: String,
    local_epoch: u64,
    link: Link,
    /// The id the peer's certificate names; its HELLO must say the same.
    peer_cert_id: Option<String>,
    peer_epoch: Option<u64>,
    peer_max_frame_len: u32,
    peer_window: u32,
    hello_pending: bool,
    close_pending: Option<(WireCode, String)>,
    // Outbound.
    next_id: u64,
    /// The floor last reported with DONE_BELOW on the current callis.
    done_below_sent: u64,
    retained: IdQueue<Retained<T>>,
    /// The deadline of every retained message, earliest first.
    deadlines: Deadlines,
    /// Retained messages waiting to be written on the current callis, in the order they go.
    schedule: Schedule,
    // Inbound.
    ring: DedupeRing,
    answers: AnswerQueue,
    /// The number of the current callis (counts `connected` calls): a slot remembers the
    /// callis its id last arrived on.
    callis_seq: u32,
    /// Write progress on the current callis (T33), as the driver reports it.
    writes: WriteWatch,
    /// The callis must be dropped now, without waiting for what is queued.
    abandon: bool,
    /// The latest `now` the driver passed in (a close decided without one dates from it).
    last_now: Option<Instant>,
    read_buf: BytesMut,
    /// When the incomplete frame at the front of `read_buf` started arriving.
    partial_frame_since: Option<Instant>,
    /// Frames from the peer in the current second (T16).
    frames_per_second: RateWindow,
    /// Refusals this side decided in the current second (T24).
    refusals_per_second: RateWindow,
    // Keepalive.
    last_rx: Option<Instant>,
    next_ping: Option<Instant>,
    ping_outstanding: Option<(u64, Instant)>,
    ping_to_send: Option<u64>,
    pings_sent: u64,
    pongs: Vec<u64>,
    rtt: Option<Duration>,
    events: VecDeque<Event<T>>,
    stats: SessionStats,
}

impl<T> Session<T> {
    /// A session for a domus named `local_id` running with epoch `local_epoch`.
    ///
    /// The session keeps replies for replay within a budget of its own of
    /// `config.max_retained_reply_bytes`; [`with_reply_budget`](Self::with_reply_budget)
    /// shares one instead.
    pub fn new(config: SessionConfig, local_id: String, local_epoch: u64) -> Self {
        let budget = Arc::new(ReplyBudget::new(config.max_retained_reply_bytes));
        let ring = DedupeRing::new(config.window, budget);
        Self {
            peer_max_frame_len: config.max_frame_len,
            peer_window: 1,
            config,
            local_id,
            local_epoch,
            link: Link::Down,
            peer_cert_id: None,
            peer_epoch: None,
            hello_pending: false,
            close_pending: None,
            next_id: 1,
            done_below_sent: 1,
            retained: IdQueue::default(),
            deadlines: Deadlines::default(),
            schedule: Schedule::default(),
            ring,
            answers: AnswerQueue::default(),
            callis_seq: 0,
            writes: WriteWatch::new(),
            abandon: false,
            last_now: None,
            read_buf: BytesMut::new(),
            partial_frame_since: None,
            frames_per_second: RateWindow::new(),
            refusals_per_second: RateWindow::new(),
            last_rx: None,
            next_ping: None,
            ping_outstanding: None,
            ping_to_send: None,
            pings_sent: 0,
            pongs: Vec::new(),
            rtt: None,
            events: VecDeque::new(),
            stats: SessionStats::default(),
        }
    }

    /// Keeps replies within `budget`, shared with other sessions (a domus gives all its
    /// sessions one), instead of a budget of its own. Call before the session has kept any.
    pub fn with_reply_budget(mut self, budget: Arc<ReplyBudget>) -> Self {
        let window = u32::try_from(self.ring.window).unwrap_or(u32::MAX);
        self.ring = DedupeRing::new(window, budget);
        self
    }

    /// Gives back the room bursts left behind in whatever is empty now: the read buffer (when
    /// it holds no partial frame), the send queues, the answer queue, the deadline list, the
    /// retained table and the dedupe slots. Nothing held is touched, so calling it is always
    /// safe; the runtime calls it now and then (a quiet session then holds almost nothing,
    /// and a busy one pays a few allocations each time).
    pub fn release_idle_memory(&mut self) {
        fn shrink_deque<T>(q: &mut VecDeque<T>) {
            if q.is_empty() && q.capacity() > IDLE_KEEP {
                *q = VecDeque::new();
            }
        }
        if self.read_buf.is_empty() && self.read_buf.capacity() > 0 {
            self.read_buf = BytesMut::new();
        }
        self.schedule.shrink_if_empty();
        self.deadlines.shrink_if_empty();
        shrink_deque(&mut self.answers.others);
        shrink_deque(&mut self.ring.slots);
        if self.answers.accepted.is_empty() && self.answers.accepted.capacity() > IDLE_KEEP {
            self.answers.accepted = Vec::new();
        }
        if self.pongs.is_empty() && self.pongs.capacity() > IDLE_KEEP {
            self.pongs = Vec::new();
        }
        self.retained.shrink_if_empty();
    }

    /// Starts the ids at `first`: a session made for a peer this domus forgot earlier
    /// starts above every id any earlier session used (the peer may still remember those),
    /// and tests of id arithmetic start anywhere.
    pub fn with_first_id(mut self, first: u64) -> Self {
        self.next_id = first.max(1);
        self
    }

    /// The id the next message will get: every id this session used is below it.
    pub fn next_id(&self) -> u64 {
        self.next_id
    }

    /// Whether forgetting this session now loses nothing this side holds: no message of
    /// ours is unanswered or queued, no delivery of the peer's waits for its handler or for
    /// its answer to be written, nothing is left to report. (Whether the *peer* may still
    /// replay something is [`Session::peer_waits_for_nothing`], or time.)
    pub fn is_quiescent(&self) -> bool {
        self.retained.is_empty()
            && self.schedule.is_empty()
            && self.answers.accepted.is_empty()
            && self.answers.others.is_empty()
            && self.events.is_empty()
            && self.ring.pending().is_empty()
    }

    /// Whether the peer said (DONE_BELOW) it will never send again any id this session has
    /// seen from it: it has nothing unanswered that it could replay, so the dedupe state
    /// protects nothing.
    pub fn peer_waits_for_nothing(&self) -> bool {
        self.ring.highest < self.ring.seen_floor
    }

    /// Whether HELLO has been exchanged on the current callis.
    pub fn is_open(&self) -> bool {
        self.link == Link::Open
    }

    /// The last measured round-trip time.
    pub fn rtt(&self) -> Option<Duration> {
        self.rtt
    }

    /// Messages retained (queued or unanswered).
    pub fn in_flight(&self) -> usize {
        self.retained.len()
    }

    /// Messages queued but not yet written.
    pub fn queued(&self) -> usize {
        self.schedule.len()
    }

    /// Counters.
    pub fn stats(&self) -> SessionStats {
        self.stats
    }

    /// The peer's epoch, once a HELLO has been seen.
    pub fn peer_epoch(&self) -> Option<u64> {
        self.peer_epoch
    }

    /// The longest frame body the peer accepts, as its HELLO said (this side's own limit
    /// until a HELLO arrives): every frame this side writes stays within it.
    pub fn peer_max_frame_len(&self) -> u32 {
        self.peer_max_frame_len
    }

    /// The longest payload in one message (or reply) either way: the smaller of what the peer
    /// accepts and what this side accepts.
    pub fn max_payload_len(&self) -> usize {
        (self.peer_max_frame_len.min(self.config.max_frame_len) as usize)
            .saturating_sub(frame::MESSAGE_FIXED_LEN)
    }

    /// The longest payload this side accepts (its `max_message_len`).
    fn own_max_payload_len(&self) -> usize {
        (self.config.max_frame_len as usize).saturating_sub(frame::MESSAGE_FIXED_LEN)
    }

    /// A new callis to the peer is authenticated; `peer_cert_id` is the id its certificate
    /// names. Queues our HELLO.
    pub fn connected(&mut self, now: Instant, peer_cert_id: &str) {
        self.callis_seq = self.callis_seq.wrapping_add(1);
        self.reset_write_progress();
        self.last_now = Some(now);
        self.read_buf.clear();
        self.partial_frame_since = None;
        self.answers = AnswerQueue::default();
        self.pongs.clear();
        self.ping_outstanding = None;
        self.ping_to_send = None;
        self.next_ping = None;
        self.close_pending = None;
        self.peer_cert_id = Some(peer_cert_id.to_owned());
        self.hello_pending = true;
        self.done_below_sent = 1;
        self.last_rx = Some(now);
        self.link = Link::AwaitingHello {
            deadline: now.checked_add(self.config.hello_timeout).unwrap_or(now),
        };
    }

    /// The current callis is gone. Everything unanswered is kept for the next one.
    pub fn disconnected(&mut self, _now: Instant) {
        self.reset_write_progress();
        self.link = Link::Down;
        self.hello_pending = false;
        self.close_pending = None;
        self.read_buf.clear();
        self.partial_frame_since = None;
        self.answers = AnswerQueue::default();
        self.pongs.clear();
        self.ping_outstanding = None;
        self.ping_to_send = None;
        self.next_ping = None;
        self.requeue_all();
    }

    fn reset_write_progress(&mut self) {
        self.writes = WriteWatch::new();
        self.abandon = false;
    }

    /// The close just decided dates from the latest `now` the driver passed in.
    fn mark_closing(&mut self) {
        if let Some(now) = self.last_now {
            self.writes.closing(now);
        }
    }

    /// Rebuilds the transmit queues from everything retained, in id (= send) order.
    fn requeue_all(&mut self) {
        self.schedule.clear();
        for (id, r) in self.retained.iter_mut() {
            if r.transmitted {
                self.stats.messages_replayed = self.stats.messages_replayed.saturating_add(1);
            }
            r.transmitted = false;
            self.schedule.push(id, class_of(r.msg_type));
        }
    }

    /// Queues a message with the token to hand back when it ends; returns its id. Fails at
    /// once (giving the token back) when the payload is too large or `max_in_flight` messages
    /// are already retained.
    pub fn send_with_token(&mut self, msg: Outgoing, token: T) -> Result<u64, (Error, T)> {
        match self.admit(&msg) {
            Ok(id) => {
                self.retain(id, msg, token);
                Ok(id)
            }
            Err(e) => Err((e, token)),
        }
    }

    /// Headers within this side's limits (`whose` names the side in the error).
    pub(crate) fn check_headers(&self, headers: &Headers, whose: &str) -> Result<(), Error> {
        let (count, len) = (headers.len(), headers.encoded_len());
        let (max_count, max_len) = (self.config.max_headers, self.config.max_headers_len);
        if count > usize::from(max_count) || len > max_len {
            return Err(Error::new(
                ErrorId::HeadersTooLarge,
                format!(
                    "{count} headers of {len} bytes are over {whose} limits ({max_count} headers, {max_len} bytes: max_headers, max_headers_len)"
                ),
            ));
        }
        Ok(())
    }

    /// The id `msg` gets, or why it cannot be sent.
    fn admit(&self, msg: &Outgoing) -> Result<u64, Error> {
        if msg.msg_type <= A1_MESSAGE_TYPE_MAX {
            return Err(Error::new(
                ErrorId::InvalidMessageType,
                format!(
                    "message type {:#x} is in the reserved A1 range",
                    msg.msg_type
                ),
            ));
        }
        let max = self.max_payload_len();
        if msg.payload.len() > max {
            return Err(Error::new(
                ErrorId::PayloadTooLarge,
                format!(
                    "payload of {} bytes exceeds the {max}-byte limit for one message (max_frame_len); send large data as a blob",
                    msg.payload.len()
                ),
            ));
        }
        if !msg.headers.is_empty() {
            self.check_headers(&msg.headers, "this domus's")?;
            let total = msg.payload.len().saturating_add(msg.headers.wire_len());
            if total > max {
                return Err(Error::new(
                    ErrorId::PayloadTooLarge,
                    format!(
                        "payload of {} bytes and headers of {} exceed the {max}-byte limit for one message (headers count toward max_message_len)",
                        msg.payload.len(),
                        msg.headers.wire_len()
                    ),
                ));
            }
        }
        if self.retained.len() >= self.config.max_in_flight as usize {
            return Err(Error::new(
                ErrorId::LocalQueueFull,
                format!(
                    "{} messages to this peer are already in flight (max_in_flight)",
                    self.retained.len()
                ),
            ));
        }
        let id = self.next_id;
        if id == u64::MAX {
            return Err(Error::new(
                ErrorId::LocalQueueFull,
                "this session used up its 2^64 message ids; restart the domus for a new epoch",
            ));
        }
        Ok(id)
    }

    /// Retains `msg` under `id` (from [`admit`](Self::admit)) and schedules it.
    fn retain(&mut self, id: u64, msg: Outgoing, token: T) {
        self.next_id = id.saturating_add(1);
        self.schedule.push(id, class_of(msg.msg_type));
        self.deadlines.insert(msg.deadline, id);
        self.retained.push(
            id,
            Retained {
                token,
                dst: msg.dst,
                src: msg.src,
                msg_type: msg.msg_type,
                headers: msg.headers,
                payload: msg.payload,
                deadline: msg.deadline,
                transmitted: false,
                ever_transmitted: false,
            },
        );
    }

    /// Why message `id` failed at its deadline. Only a message the peer could have received
    /// (written on some callis in the peer's current epoch) ends as `SendTimeout`, whose
    /// outcome is unknown; one never written ends as `PeerUnavailable` (no open callis, the
    /// driver adds why) or `LocalQueueFull` (the callis was open but the peer's window never
    /// let it out), both certainly not delivered.
    fn expiry_error(&self, id: u64) -> Error {
        let written = self.retained.get(id).is_some_and(|r| r.ever_transmitted);
        if written {
            Error::new(
                ErrorId::SendTimeout,
                "no answer before the send's deadline (the message may or may not have been delivered)",
            )
        } else if self.link == Link::Open {
            Error::new(
                ErrorId::LocalQueueFull,
                "the message waited in the queue until the send's deadline and was never sent (the peer's window stayed full)",
            )
        } else {
            Error::new(
                ErrorId::PeerUnavailable,
                "no callis to the peer opened before the send's deadline; the message was never sent",
            )
        }
    }

    /// Fails every retained message that was never written in the peer's current epoch (so
    /// the peer cannot have it) with `error`; the others stay retained until answered or their
    /// deadline (the peer is unreachable now, but may have delivered them).
    pub fn fail_unsent(&mut self, error: Error) {
        let ids: Vec<u64> = self
            .retained
            .iter()
            .filter(|(_, r)| !r.ever_transmitted)
            .map(|(id, _)| id)
            .collect();
        for id in ids {
            self.fail(id, error.clone());
        }
    }

    /// Takes back every message the peer cannot have (never written on any callis in its
    /// current epoch) whose destination taberna `wanted` accepts, with the id it had here, so
    /// it can be sent another way (to another replica); no outcome is reported for them.
    /// What the peer may have, and what `wanted` declines, stays as it was.
    pub fn take_unsent(&mut self, mut wanted: impl FnMut(u64) -> bool) -> Vec<(u64, Outgoing, T)> {
        let ids: Vec<u64> = self
            .retained
            .iter()
            .filter(|(_, r)| !r.ever_transmitted && wanted(r.dst))
            .map(|(id, _)| id)
            .collect();
        let mut taken = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some(r) = self.retained.remove(id) {
                self.forget_deadline(r.deadline, id);
                taken.push((
                    id,
                    Outgoing {
                        dst: r.dst,
                        src: r.src,
                        msg_type: r.msg_type,
                        headers: r.headers,
                        payload: r.payload,
                        deadline: r.deadline,
                    },
                    r.token,
                ));
            }
        }
        if !taken.is_empty() {
            let retained = &self.retained;
            self.schedule.retain(|id| retained.get(id).is_some());
        }
        taken
    }

    /// The domus is shutting down: every delivery still waiting for its handler is answered
    /// with a `PeerShutDown` rejection (the handler may have acted on it: its outcome is
    /// unknown to the sender), then the callis closes with CLOSE `DomusClosed`, written after
    /// those answers. Nothing is read after this, so nothing more is delivered.
    pub fn shut_down(&mut self) {
        if self.link == Link::Open {
            let epoch = self.peer_epoch.unwrap_or_default();
            let pending = self.ring.pending();
            for id in pending {
                self.answer(
                    epoch,
                    id,
                    Answer::refusal(
                        ErrorId::PeerShutDown,
                        "the receiving domus shut down before a handler answered; the handler may have acted on the message",
                    ),
                );
            }
        }
        self.close(Error::new(
            ErrorId::DomusClosed,
            "the domus is shutting down",
        ));
    }

    /// Fails every retained message with `error` (the domus is closing); those written in the
    /// peer's current epoch are marked as perhaps delivered ([`Error::outcome_unknown`]).
    pub fn fail_all(&mut self, error: Error) {
        self.fail_each(|written| {
            if written {
                error.clone().maybe_delivered()
            } else {
                error.clone()
            }
        });
    }

    /// Fails every retained message with the error `error_for(written)` gives, `written`
    /// saying whether it was written in the peer's current epoch (so the peer may have it).
    fn fail_each(&mut self, error_for: impl Fn(bool) -> Error) {
        let ids: Vec<(u64, bool)> = self
            .retained
            .iter()
            .map(|(id, r)| (id, r.ever_transmitted))
            .collect();
        for (id, written) in ids {
            self.fail(id, error_for(written));
        }
        self.schedule.clear();
    }

    /// Gives up on a send (its caller went away): nothing is reported for it, and its token
    /// is handed back.
    pub fn cancel(&mut self, id: u64) -> Option<T> {
        let r = self.retained.remove(id)?;
        self.forget_deadline(r.deadline, id);
        Some(r.token)
    }

    /// The token of the oldest message retained.
    pub fn oldest_token(&self) -> Option<&T> {
        self.retained
            .first_id()
            .and_then(|id| self.retained.get(id))
            .map(|r| &r.token)
    }

    /// Drops the deadline of a message that finished (removed from `retained` already).
    #[inline]
    fn forget_deadline(&mut self, deadline: Instant, id: u64) {
        let retained = &self.retained;
        self.deadlines.forget(deadline, id, |at, id| {
            retained.get(id).is_some_and(|r| r.deadline == at)
        });
    }

    /// Answers a message delivered with `peer_epoch`. Answers for an older epoch (the peer
    /// restarted since) or for ids no longer in the window are dropped.
    pub fn answer(&mut self, peer_epoch: u64, id: u64, answer: Answer) {
        if self.peer_epoch != Some(peer_epoch) {
            return;
        }
        // A reply is a message too: it is held to the smaller of both sides' payload limits.
        let answer = match answer.reply_bytes() {
            Some(p) if p.len() > self.max_payload_len() => {
                too_large_reply(p.len(), self.max_payload_len())
            }
            _ => answer,
        };
        if !self.within_refusal_budget(&answer) {
            let budget = self.config.max_refusals_per_second;
            self.close(Error::new(
                ErrorId::ProtocolViolation,
                format!(
                    "the peer sent more than {budget} deliveries in one second that were refused (unknown taberna, forbidden, wrong type); max_refusals_per_second"
                ),
            ));
            return;
        }
        if !matches!(self.ring.state_mut(id), Some(SlotState::Pending)) {
            return;
        }
        let kept = match &answer {
            Answer::Replied(p) | Answer::RepliedWithHeaders(p)
                if !self.ring.take_reply_bytes(p.len()) =>
            {
                SlotState::ReplyLost
            }
            // A small reply is kept as a copy of its own: it must not pin the (much larger)
            // buffer its bytes were cut from (a request's read buffer, say).
            Answer::Replied(p) if p.len() <= SMALL_REPLY => {
                SlotState::Answered(Answer::Replied(Bytes::copy_from_slice(p)))
            }
            Answer::RepliedWithHeaders(p) if p.len() <= SMALL_REPLY => {
                SlotState::Answered(Answer::RepliedWithHeaders(Bytes::copy_from_slice(p)))
            }
            _ => SlotState::Answered(answer.clone()),
        };
        if let Some(state) = self.ring.state_mut(id) {
            *state = kept;
        }
        if self.link == Link::Open {
            self.queue_answer(id, answer);
        }
    }

    /// Queues an answer to be written. A correct peer never has more than `window` messages
    /// unanswered (it never writes an id `window` or more past its oldest unanswered one),
    /// so more answers owed than that is a violation (T31).
    #[inline]
    fn queue_answer(&mut self, id: u64, answer: Answer) {
        if self.answers.len() >= self.config.window.max(1) as usize {
            let window = self.config.window;
            self.violation(&format_args!(
                "more than {window} answers are owed to it: it ran past its window of {window} message ids without reading its answers"
            ));
            return;
        }
        self.answers.push(id, answer);
    }

    /// Answer bytes waiting to be written to the peer (see
    /// [`SessionConfig::max_unsent_answer_bytes`]).
    pub fn unsent_answer_bytes(&self) -> usize {
        self.answers.bytes
    }

    /// The buffer the driver reads socket bytes into before calling
    /// [`handle_input`](Self::handle_input).
    pub fn recv_buf(&mut self) -> &mut BytesMut {
        &mut self.read_buf
    }

    /// Closes the current callis with `error` (its id goes on the wire as the reason code).
    pub fn close(&mut self, error: Error) {
        if matches!(self.link, Link::Down | Link::Closing) {
            return;
        }
        self.close_pending = Some((error.id().into(), error.message().to_owned()));
        self.link = Link::Closing;
        self.mark_closing();
        self.events.push_back(Event::Close(error));
    }

    fn fail(&mut self, id: u64, error: Error) {
        if let Some(r) = self.retained.remove(id) {
            self.forget_deadline(r.deadline, id);
            self.events.push_back(Event::Finished {
                id,
                dst: r.dst,
                outcome: SendEnd::Failed(error),
                token: r.token,
            });
        }
    }

    /// The next event, if any.
    pub fn poll_event(&mut self) -> Option<Event<T>> {
        self.events.pop_front()
    }

    /// Whether the driver should close the socket once the pending bytes are written.
    pub fn is_closing(&self) -> bool {
        self.link == Link::Closing
    }
}

impl Session<()> {
    /// Queues a message that needs no token; returns its id. Fails at once when the
    /// payload is too large or `max_in_flight` messages are already retained.
    pub fn send(&mut self, msg: Outgoing) -> Result<u64, Error> {
        self.send_with_token(msg, ()).map_err(|(e, ())| e)
    }
}

/// The rejection that replaces a reply of `len` bytes over the `max`-byte payload limit.
pub(crate) fn too_large_reply(len: usize, max: usize) -> Answer {
    Answer::refusal(
        ErrorId::PayloadTooLarge,
        format!("the reply of {len} bytes exceeds the {max}-byte payload limit (max_message_len)"),
    )
}

#[cfg(test)]
#[path = "pair_tests.rs"]
mod pair_tests;

#[cfg(test)]
#[path = "untrusted_peer_tests.rs"]
mod untrusted_peer_tests;

#[cfg(test)]
#[path = "batch_tests.rs"]
mod batch_tests;
