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

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use super::codes::WireCode;
use super::deadlines::Deadlines;
use super::frame::{self, Frame, Hello, MessageFrame, PROTOCOL_VERSION, RejectFrame};
use super::link::{WriteVerdict, WriteWatch};
use super::rate::RateWindow;
use super::reply_budget::ReplyBudget;
pub use super::schedule::A3_AGING;
use super::schedule::{Class, Schedule};
use super::window::IdQueue;
use crate::error::{Error, ErrorId, untrusted};

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
pub enum Outcome {
    /// The peer answered.
    Answered(Answer),
    /// It failed locally (timeout, peer restarted, session closed).
    Failed(Error),
}

/// What the session tells its driver.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// HELLO exchanged; the callis is open. `restarted` when the peer's epoch changed since
    /// the previous callis.
    Connected {
        /// The peer's epoch.
        peer_epoch: u64,
        /// Whether it differs from the previous one.
        restarted: bool,
    },
    /// A new message for a local taberna; answer it with [`Session::answer`] using this epoch.
    Deliver {
        /// The peer epoch the id belongs to.
        peer_epoch: u64,
        /// The message.
        message: MessageFrame,
    },
    /// One of our sends ended.
    Finished {
        /// The id [`Session::send`] returned.
        id: u64,
        /// How it ended.
        outcome: Outcome,
    },
    /// The callis must be closed (protocol violation, idle, the peer closed it, hello
    /// timeout). Unanswered work stays retained for the next callis.
    Close(Error),
}

#[derive(Debug)]
struct Retained {
    dst: u64,
    src: u64,
    msg_type: u32,
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

#[derive(Debug, Clone, Default)]
enum SlotState {
    #[default]
    Pending,
    Answered(Answer),
    /// Answered with a reply that was not kept (retention budget).
    ReplyLost,
}

/// One id the receiver has seen: how it was answered, and the last callis it arrived on (a
/// correct sender writes an id at most once per callis: again only as a replay on a later
/// one).
#[derive(Debug, Clone)]
struct Slot {
    state: SlotState,
    callis: u32,
}

/// The receiver's dedupe state: what it delivered from `base` on and how each was answered,
/// so a replayed duplicate is answered again and never delivered twice.
///
/// Invariants: `slots[i]` is id `base + i`; `slots.len() <= window`; every id below `base` was
/// of no more use: the sender said it will not send it again (DONE_BELOW), or may no longer
/// send it (it is `window` or more below the highest id seen). So memory follows what is in
/// flight when the sender reports its floor, and never exceeds the window.
#[derive(Debug)]
struct DedupeRing {
    base: u64,
    /// `None`: an id not seen (yet) inside the window.
    slots: VecDeque<Option<Slot>>,
    window: u64,
    highest: u64,
    /// What the peer said it will never send again (DONE_BELOW); a MESSAGE below it is a
    /// violation.
    seen_floor: u64,
    /// Reply bytes this ring keeps, taken from `budget`.
    retained_reply_bytes: usize,
    /// The allowance those bytes come from (shared by every session of a domus).
    budget: Arc<ReplyBudget>,
}

impl Drop for DedupeRing {
    fn drop(&mut self) {
        self.budget.give_back(self.retained_reply_bytes);
    }
}

enum Seen {
    New,
    /// Seen before on an earlier callis (a replay): now marked as seen on this one too.
    Replayed,
    /// Seen before on this very callis: a correct sender never does that.
    DuplicateOnThisCallis,
    OutsideWindow,
    /// Below what the sender said it will never send again.
    BelowFloor,
}

impl DedupeRing {
    fn new(window: u32, budget: Arc<ReplyBudget>) -> Self {
        Self {
            base: 1,
            slots: VecDeque::new(),
            window: u64::from(window.max(1)),
            highest: 0,
            seen_floor: 1,
            retained_reply_bytes: 0,
            budget,
        }
    }

    /// Keeps `bytes` more reply bytes if the budget has room.
    fn take_reply_bytes(&mut self, bytes: usize) -> bool {
        if !self.budget.try_take(bytes) {
            return false;
        }
        self.retained_reply_bytes = self.retained_reply_bytes.saturating_add(bytes);
        true
    }

    fn give_back_reply_bytes(&mut self, bytes: usize) {
        let bytes = bytes.min(self.retained_reply_bytes);
        self.retained_reply_bytes = self.retained_reply_bytes.saturating_sub(bytes);
        self.budget.give_back(bytes);
    }

    fn state_mut(&mut self, id: u64) -> Option<&mut SlotState> {
        let i = usize::try_from(id.checked_sub(self.base)?).ok()?;
        self.slots.get_mut(i)?.as_mut().map(|slot| &mut slot.state)
    }

    /// Records that `id` arrived on callis number `callis`.
    fn observe(&mut self, id: u64, callis: u32) -> Seen {
        let window = self.window;
        if id == 0 || (self.highest >= window && id <= self.highest.saturating_sub(window)) {
            return Seen::OutsideWindow;
        }
        if id < self.seen_floor {
            return Seen::BelowFloor;
        }
        // Ids `window` or more below the new one can no longer come: forget them.
        let lowest_kept = id.saturating_sub(window).saturating_add(1);
        self.forget_below(lowest_kept);
        if id < self.base {
            return Seen::OutsideWindow;
        }
        let Ok(i) = usize::try_from(id.saturating_sub(self.base)) else {
            return Seen::OutsideWindow;
        };
        if i >= self.slots.len() {
            self.slots.resize(i.saturating_add(1), None);
        }
        let Some(slot) = self.slots.get_mut(i) else {
            return Seen::OutsideWindow;
        };
        if let Some(seen) = slot {
            if seen.callis == callis {
                return Seen::DuplicateOnThisCallis;
            }
            seen.callis = callis;
            return Seen::Replayed;
        }
        *slot = Some(Slot {
            state: SlotState::Pending,
            callis,
        });
        self.highest = self.highest.max(id);
        Seen::New
    }

    /// Forgets every id below `floor` (their answers and the reply bytes they kept).
    fn forget_below(&mut self, floor: u64) {
        while self.base < floor {
            match self.slots.pop_front() {
                Some(slot) => {
                    if let Some(Slot {
                        state: SlotState::Answered(Answer::Replied(old)),
                        ..
                    }) = slot
                    {
                        self.give_back_reply_bytes(old.len());
                    }
                    self.base = self.base.saturating_add(1);
                }
                None => {
                    self.base = floor;
                    break;
                }
            }
        }
        if self.slots.is_empty() && self.slots.capacity() > 1024 {
            self.slots.shrink_to(64);
        }
    }

    /// The peer will never send an id below `floor` again (DONE_BELOW): forget them, and
    /// refuse a MESSAGE below it from now on. A lower floor than one already known changes
    /// nothing.
    fn done_below(&mut self, floor: u64) {
        if floor > self.seen_floor {
            self.seen_floor = floor;
            self.forget_below(floor);
        }
    }

    fn reset(&mut self) {
        self.slots = VecDeque::new();
        self.base = 1;
        self.highest = 0;
        self.seen_floor = 1;
        self.give_back_reply_bytes(self.retained_reply_bytes);
    }

    /// Every delivery still waiting for its handler.
    fn pending(&self) -> Vec<u64> {
        (self.base..)
            .zip(self.slots.iter())
            .filter(|(_, s)| {
                matches!(
                    s,
                    Some(Slot {
                        state: SlotState::Pending,
                        ..
                    })
                )
            })
            .map(|(id, _)| id)
            .collect()
    }
}

/// The answers waiting to be written, and what they take on the wire.
///
/// Invariant: `bytes` is the sum of [`answer_wire_len`] over everything queued.
#[derive(Debug, Default)]
struct AnswerQueue {
    accepted: Vec<u64>,
    others: VecDeque<(u64, Answer)>,
    bytes: usize,
}

impl AnswerQueue {
    fn len(&self) -> usize {
        self.accepted.len().saturating_add(self.others.len())
    }

    fn is_empty(&self) -> bool {
        self.accepted.is_empty() && self.others.is_empty()
    }

    #[inline]
    fn push(&mut self, id: u64, answer: Answer) {
        if let Answer::Accepted = answer {
            self.bytes = self.bytes.saturating_add(8);
            self.accepted.push(id);
            return;
        }
        self.bytes = self.bytes.saturating_add(answer_wire_len(&answer));
        self.others.push_back((id, answer));
    }

    fn pop_other(&mut self) -> Option<(u64, Answer)> {
        let (id, answer) = self.others.pop_front()?;
        self.bytes = self.bytes.saturating_sub(answer_wire_len(&answer));
        Some((id, answer))
    }

    /// Forgets the first `n` accepted ids (written).
    fn written_accepted(&mut self, n: usize) {
        let n = n.min(self.accepted.len());
        self.accepted.drain(..n);
        self.bytes = self.bytes.saturating_sub(n.saturating_mul(8));
    }
}

/// About what `answer` takes on the wire (an accepted id: its 8 bytes in a shared frame).
fn answer_wire_len(answer: &Answer) -> usize {
    match answer {
        Answer::Accepted => 8,
        Answer::Replied(payload) => (frame::HEADER_LEN + 8).saturating_add(payload.len()),
        Answer::Rejected { reason, .. } => (frame::HEADER_LEN + frame::REJECT_FIXED_LEN)
            .saturating_add(reason.len().min(frame::MAX_REASON_LEN)),
    }
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
#[derive(Debug)]
pub struct Session {
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
    retained: IdQueue<Retained>,
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
    events: VecDeque<Event>,
    stats: SessionStats,
}

impl Session {
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

    /// Queues a message; returns its id. Fails at once when the payload is too large or
    /// `max_in_flight` messages are already retained.
    pub fn send(&mut self, msg: Outgoing) -> Result<u64, Error> {
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
        self.next_id = id.saturating_add(1);
        self.schedule.push(id, class_of(msg.msg_type));
        self.deadlines.insert(msg.deadline, id);
        self.retained.push(
            id,
            Retained {
                dst: msg.dst,
                src: msg.src,
                msg_type: msg.msg_type,
                payload: msg.payload,
                deadline: msg.deadline,
                transmitted: false,
                ever_transmitted: false,
            },
        );
        Ok(id)
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
    pub fn take_unsent(&mut self, mut wanted: impl FnMut(u64) -> bool) -> Vec<(u64, Outgoing)> {
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
                        payload: r.payload,
                        deadline: r.deadline,
                    },
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

    /// Gives up on a send (its caller went away). Nothing is reported for it.
    pub fn cancel(&mut self, id: u64) {
        if let Some(r) = self.retained.remove(id) {
            self.forget_deadline(r.deadline, id);
        }
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
        let answer = match answer {
            Answer::Replied(p) if p.len() > self.max_payload_len() => {
                too_large_reply(p.len(), self.max_payload_len())
            }
            other => other,
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
            Answer::Replied(p) if !self.ring.take_reply_bytes(p.len()) => SlotState::ReplyLost,
            // A small reply is kept as a copy of its own: it must not pin the (much larger)
            // buffer its bytes were cut from (a request's read buffer, say).
            Answer::Replied(p) if p.len() <= SMALL_REPLY => {
                SlotState::Answered(Answer::Replied(Bytes::copy_from_slice(p)))
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

    /// Decodes and handles every complete frame in the receive buffer.
    pub fn handle_input(&mut self, now: Instant) {
        self.last_now = Some(now);
        if matches!(self.link, Link::Down | Link::Closing) {
            self.read_buf.clear();
            return;
        }
        if !self.read_buf.is_empty() {
            self.last_rx = Some(now);
        }
        loop {
            if matches!(self.link, Link::Down | Link::Closing) {
                self.read_buf.clear();
                return;
            }
            match frame::decode(&mut self.read_buf, self.config.max_frame_len) {
                Ok(Some(f)) => {
                    self.partial_frame_since = None;
                    self.handle_frame(now, f);
                }
                Ok(None) => {
                    // A frame has started but is not complete: its clock starts now (T14).
                    if self.read_buf.is_empty() {
                        self.partial_frame_since = None;
                    } else if self.partial_frame_since.is_none() {
                        self.partial_frame_since = Some(now);
                    }
                    return;
                }
                Err(e) => {
                    self.violation(&e);
                    return;
                }
            }
        }
    }

    fn violation(&mut self, e: &dyn std::fmt::Display) {
        self.close(Error::new(
            ErrorId::ProtocolViolation,
            format!("the peer broke the A1 protocol: {e}"),
        ));
    }

    /// Queues a PING to measure the RTT. One probe at a time; a missing PONG is caught by the
    /// idle timeout.
    fn probe(&mut self, now: Instant) {
        if self.ping_outstanding.is_none() {
            self.pings_sent = self.pings_sent.wrapping_add(1);
            self.ping_outstanding = Some((self.pings_sent, now));
            self.ping_to_send = Some(self.pings_sent);
        }
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

    /// Counts refusals decided by vicus (not by the application) against a per-second budget,
    /// so a peer cannot make this side answer an unbounded stream of errors (T24). The clock
    /// is the time of the last received bytes: every delivery comes from input.
    fn within_refusal_budget(&mut self, answer: &Answer) -> bool {
        let Answer::Rejected { error, .. } = answer else {
            return true;
        };
        if !error.is_counted_refusal() {
            return true;
        }
        let Some(now) = self.last_rx else {
            return true;
        };
        let budget = u64::from(self.config.max_refusals_per_second);
        self.refusals_per_second.admit(now, 1, budget)
    }

    /// Counts a received frame against the per-second budget (T16); frames that carry no
    /// application progress cost double. False when the budget is exhausted.
    fn within_frame_budget(&mut self, now: Instant, f: &Frame) -> bool {
        let cost: u64 = match f {
            Frame::Ping(_) | Frame::Pong(_) | Frame::Skipped(_) => 2,
            _ => 1,
        };
        let budget = u64::from(self.config.max_frames_per_second);
        self.frames_per_second.admit(now, cost, budget)
    }

    fn handle_frame(&mut self, now: Instant, f: Frame) {
        if !self.within_frame_budget(now, &f) {
            let budget = self.config.max_frames_per_second;
            self.violation(&format_args!(
                "more than {budget} frames in one second (max_frames_per_second); calm down"
            ));
            return;
        }
        if let Link::AwaitingHello { .. } = self.link {
            match f {
                Frame::Hello(h) => self.handle_hello(now, h),
                Frame::Close { code, reason } => self.peer_closed(code, &reason),
                other => self.violation(&format_args!("{other:?} before HELLO")),
            }
            return;
        }
        match f {
            Frame::Hello(_) => self.violation(&"a second HELLO"),
            Frame::Ping(nonce) => {
                // At most a few PONGs are owed at once; a peer that pings faster than we
                // write is coalesced to its newest nonce.
                if self.pongs.len() >= 8 {
                    self.pongs.clear();
                }
                self.pongs.push(nonce);
            }
            Frame::Pong(nonce) => {
                if let Some((sent_nonce, sent_at)) = self.ping_outstanding
                    && sent_nonce == nonce
                {
                    self.rtt = Some(now.saturating_duration_since(sent_at));
                    self.ping_outstanding = None;
                }
            }
            Frame::Close { code, reason } => self.peer_closed(code, &reason),
            Frame::Message(m) => self.handle_message(m),
            Frame::Accepted(ids) => {
                for id in ids.iter() {
                    self.finish_from_peer(id, Answer::Accepted);
                }
            }
            Frame::Reply { id, payload } => self.finish_from_peer(id, Answer::Replied(payload)),
            Frame::Reject(RejectFrame {
                id,
                error,
                code,
                reason,
            }) => self.finish_from_peer(
                id,
                Answer::Rejected {
                    error,
                    code,
                    reason,
                },
            ),
            Frame::Skipped(_) => {
                self.stats.frames_skipped = self.stats.frames_skipped.saturating_add(1);
            }
            Frame::Blob(_) => self.violation(&"a blob frame on the primary callis"),
            Frame::DoneBelow(floor) => self.ring.done_below(floor),
        }
    }

    fn peer_closed(&mut self, code: WireCode, reason: &str) {
        self.link = Link::Closing;
        self.mark_closing();
        self.close_pending = None;
        if code == WireCode::DOMUS_CLOSED {
            // A peer that shuts down answers every message it delivered before its CLOSE
            // (see `shut_down`), and reads nothing after it: what is unanswered now was never
            // delivered, and will not be.
            let error = Error::new(
                ErrorId::PeerShutDown,
                "the peer shut down before this message was delivered (it was not delivered)",
            );
            self.fail_each(|_| error.clone());
            self.events.push_back(Event::Close(Error::new(
                ErrorId::PeerShutDown,
                format!("the peer shut down: {}", untrusted(reason)),
            )));
            return;
        }
        self.events.push_back(Event::Close(Error::new(
            ErrorId::ConnectionLost,
            format!(
                "the peer closed the callis ({}): {}",
                code.closing_id().name(),
                untrusted(reason)
            ),
        )));
    }

    fn handle_hello(&mut self, now: Instant, h: Hello) {
        if h.version != PROTOCOL_VERSION {
            self.close(Error::new(
                ErrorId::UnsupportedVersion,
                format!(
                    "the peer speaks A1 version {}, this domus speaks {PROTOCOL_VERSION}",
                    h.version
                ),
            ));
            return;
        }
        if self.peer_cert_id.as_deref() != Some(h.domus_id.as_str()) {
            let cert = self.peer_cert_id.clone().unwrap_or_default();
            self.violation(&format_args!(
                "its HELLO names {} but its certificate names {cert}",
                untrusted(&h.domus_id)
            ));
            return;
        }
        if h.max_frame_len < frame::MIN_FRAME_LEN {
            self.violation(&format_args!(
                "its HELLO announces a frame limit of {} bytes, below the {} bytes of the smallest frame this side must be able to write (a MESSAGE with an empty payload)",
                h.max_frame_len,
                frame::MIN_FRAME_LEN
            ));
            return;
        }
        if h.window == 0 {
            self.violation(&"its HELLO announces a window of 0 message ids");
            return;
        }
        let restarted = self.peer_epoch.is_some_and(|e| e != h.epoch);
        if restarted {
            self.peer_restarted();
        }
        self.peer_epoch = Some(h.epoch);
        self.peer_max_frame_len = h.max_frame_len;
        // A larger window than our own would only grow our per-message state (T32): the
        // span of ids in flight is ours to bound.
        self.peer_window = h.window.min(self.config.window.max(1));
        self.link = Link::Open;
        self.next_ping = now.checked_add(self.config.keepalive_interval);
        // A first probe at once, so the RTT is known one round trip after the callis opens
        // instead of one keepalive interval later.
        self.probe(now);
        self.stats.opened = self.stats.opened.saturating_add(1);
        // The peer may accept less than when these messages were queued (it restarted with
        // other limits): what no longer fits fails here instead of killing every callis.
        let max = self.max_payload_len();
        let too_large: Vec<u64> = self
            .retained
            .iter()
            .filter(|(_, r)| r.payload.len() > max)
            .map(|(id, _)| id)
            .collect();
        for id in too_large {
            self.fail(
                id,
                Error::new(
                    ErrorId::PayloadTooLarge,
                    format!("the peer now accepts at most {max} payload bytes per message"),
                ),
            );
        }
        self.requeue_all();
        self.events.push_back(Event::Connected {
            peer_epoch: h.epoch,
            restarted,
        });
    }

    /// The peer's epoch changed: what it may have received is unknowable, and its dedupe
    /// state is gone.
    fn peer_restarted(&mut self) {
        let lost: Vec<u64> = self
            .retained
            .iter()
            .filter(|(_, r)| r.ever_transmitted)
            .map(|(id, _)| id)
            .collect();
        for id in lost {
            self.fail(
                id,
                Error::new(
                    ErrorId::PeerRestarted,
                    "the peer restarted while this message was unanswered; it may or may not have been delivered",
                ),
            );
        }
        self.ring.reset();
    }

    fn fail(&mut self, id: u64, error: Error) {
        if let Some(r) = self.retained.remove(id) {
            self.forget_deadline(r.deadline, id);
            self.events.push_back(Event::Finished {
                id,
                outcome: Outcome::Failed(error),
            });
        }
    }

    fn finish_from_peer(&mut self, id: u64, answer: Answer) {
        if id >= self.next_id || id == 0 {
            self.violation(&format_args!(
                "an answer for message {id}, which was never sent"
            ));
            return;
        }
        // This side's own limit, whatever the peer applied.
        let max = self.own_max_payload_len();
        let answer = match answer {
            Answer::Replied(p) if p.len() > max => too_large_reply(p.len(), max),
            other => other,
        };
        // Answers to messages we no longer hold (timed out, or answered twice after a
        // replay) are ignored.
        if let Some(r) = self.retained.remove(id) {
            self.forget_deadline(r.deadline, id);
            self.events.push_back(Event::Finished {
                id,
                outcome: Outcome::Answered(answer),
            });
        }
    }

    fn handle_message(&mut self, m: MessageFrame) {
        if m.msg_type <= A1_MESSAGE_TYPE_MAX {
            self.violation(&format_args!(
                "message type {:#x} is reserved for A1",
                m.msg_type
            ));
            return;
        }
        match self.ring.observe(m.id, self.callis_seq) {
            Seen::OutsideWindow => {
                let (highest, window) = (self.ring.highest, self.ring.window);
                self.violation(&format_args!(
                    "message id {} is outside the dedupe window (highest {highest}, window {window})",
                    m.id
                ));
            }
            Seen::BelowFloor => {
                let floor = self.ring.seen_floor;
                self.violation(&format_args!(
                    "message id {} after DONE_BELOW {floor} said no id below it would come again",
                    m.id
                ));
            }
            Seen::DuplicateOnThisCallis => {
                self.violation(&format_args!(
                    "message id {} arrived twice on one callis (a sender writes an id again only as a replay on a later callis)",
                    m.id
                ));
            }
            Seen::Replayed => {
                self.stats.duplicates_suppressed =
                    self.stats.duplicates_suppressed.saturating_add(1);
                let state = self.ring.state_mut(m.id).map(|s| s.clone());
                match state {
                    Some(SlotState::Answered(a)) => self.queue_answer(m.id, a),
                    Some(SlotState::ReplyLost) => self.queue_answer(
                        m.id,
                        Answer::refusal(
                            ErrorId::ReplyLost,
                            "the reply was produced but not retained across the reconnect",
                        ),
                    ),
                    // Still with the handler: its answer will go out when it comes.
                    Some(SlotState::Pending) | None => {}
                }
            }
            Seen::New if self.answers.bytes >= self.config.max_unsent_answer_bytes => {
                // The peer does not read its answers: what it sends now is not delivered
                // (and says so), so its answers stop growing (T31).
                self.stats.refused_unread_answers =
                    self.stats.refused_unread_answers.saturating_add(1);
                let refusal = Answer::refusal(
                    ErrorId::TabernaBusy,
                    "not delivered: the receiving domus holds max_unsent_answer_bytes of answers the sender has not read yet",
                );
                if let Some(state) = self.ring.state_mut(m.id) {
                    *state = SlotState::Answered(refusal.clone());
                }
                self.queue_answer(m.id, refusal);
            }
            Seen::New => {
                self.stats.messages_delivered = self.stats.messages_delivered.saturating_add(1);
                let peer_epoch = self.peer_epoch.unwrap_or_default();
                self.events.push_back(Event::Deliver {
                    peer_epoch,
                    message: m,
                });
            }
        }
    }

    /// The driver's report after each write attempt on the current callis: whether bytes
    /// moved, and whether bytes still wait to be written. Writes that make no progress for
    /// `idle_timeout` close the callis at once (T33: the peer stopped reading; a CLOSE could
    /// not reach it anyway), and a decided close waits at most [`CLOSE_LINGER`](super::link::CLOSE_LINGER) for writes
    /// that make no progress (see [`must_abandon`](Self::must_abandon) and
    /// [`WriteWatch`]).
    pub fn write_progress(&mut self, now: Instant, progressed: bool, waiting: bool) {
        self.last_now = Some(now);
        self.writes.wrote(now, progressed, waiting);
        if self.link == Link::Closing {
            self.writes.closing(now);
        }
    }

    /// Whether the driver must drop the callis now, whatever is still queued for it: its
    /// writes stopped making progress (T33), or its close could not be written in time.
    /// Everything unanswered is replayed on the next callis, as after any cut.
    pub fn must_abandon(&self) -> bool {
        self.abandon
    }

    /// The write deadlines at `now`: a stalled writer closes and is abandoned; a close that
    /// cannot get out in time is abandoned.
    fn check_write_progress(&mut self, now: Instant) {
        if self.link == Link::Down {
            return;
        }
        match self.writes.check(now, self.config.idle_timeout) {
            WriteVerdict::Fine => {}
            WriteVerdict::Stalled => {
                self.close(Error::new(
                    ErrorId::ConnectionLost,
                    format!(
                        "the peer read nothing this side wrote for {:?} (idle_timeout); it is stalled or does not read",
                        self.config.idle_timeout
                    ),
                ));
                self.abandon = true;
            }
            WriteVerdict::Abandon => self.abandon = true,
        }
    }

    /// Handles everything due at `now`: send deadlines, HELLO deadline, keepalive, idle,
    /// write progress.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.last_now = Some(now);
        self.handle_timers(now);
        // Last: a close the timers just decided (idle, hello) is judged too, so a callis whose
        // writes stalled long ago is given up now rather than at a deadline already past.
        self.check_write_progress(now);
    }

    fn handle_timers(&mut self, now: Instant) {
        loop {
            let retained = &self.retained;
            let due = self.deadlines.pop_due(now, |at, id| {
                retained.get(id).is_some_and(|r| r.deadline == at)
            });
            let Some(id) = due else {
                break;
            };
            let error = self.expiry_error(id);
            self.fail(id, error);
        }
        if let Some(since) = self.partial_frame_since
            && matches!(self.link, Link::Open | Link::AwaitingHello { .. })
            && now.saturating_duration_since(since) >= self.config.frame_read_timeout
        {
            self.partial_frame_since = None;
            self.close(Error::new(
                ErrorId::ProtocolViolation,
                format!(
                    "a frame took longer than {:?} to arrive (frame_read_timeout)",
                    self.config.frame_read_timeout
                ),
            ));
            return;
        }
        match self.link {
            Link::AwaitingHello { deadline } if now >= deadline => {
                self.close(Error::new(
                    ErrorId::ProtocolViolation,
                    "the peer sent no HELLO within hello_timeout",
                ));
            }
            Link::Open => {
                if let Some(last) = self.last_rx
                    && now.saturating_duration_since(last) >= self.config.idle_timeout
                {
                    self.close(Error::new(
                        ErrorId::ConnectionLost,
                        format!(
                            "nothing received for {:?} (idle_timeout); the peer is gone or stalled",
                            self.config.idle_timeout
                        ),
                    ));
                    return;
                }
                let due = self.next_ping.is_some_and(|t| now >= t);
                if due {
                    self.next_ping = now.checked_add(self.config.keepalive_interval);
                    self.probe(now);
                }
            }
            _ => {}
        }
    }

    /// The next instant [`handle_timeout`](Self::handle_timeout) has work.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let mut next = self.deadlines.earliest().map(|(t, _)| t);
        let mut consider = |t: Option<Instant>| {
            if let Some(t) = t {
                next = Some(next.map_or(t, |n| n.min(t)));
            }
        };
        if matches!(self.link, Link::Open | Link::AwaitingHello { .. }) {
            consider(
                self.partial_frame_since
                    .and_then(|t| t.checked_add(self.config.frame_read_timeout)),
            );
        }
        match self.link {
            Link::AwaitingHello { deadline } => consider(Some(deadline)),
            Link::Open => {
                consider(
                    self.last_rx
                        .and_then(|t| t.checked_add(self.config.idle_timeout)),
                );
                consider(self.next_ping);
            }
            _ => {}
        }
        if !self.abandon && self.link != Link::Down {
            consider(self.writes.poll_timeout(self.config.idle_timeout));
        }
        next
    }

    /// The next event, if any.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// Whether the driver should close the socket once the pending bytes are written.
    pub fn is_closing(&self) -> bool {
        self.link == Link::Closing
    }

    /// Appends frames to `out` in priority order — control (HELLO, CLOSE, PONG, PING), then
    /// answers, then A2 messages, then A3 — until about `transmit_batch_bytes`. Returns
    /// whether anything was written.
    pub fn poll_transmit(&mut self, now: Instant, out: &mut BytesMut) -> bool {
        self.last_now = Some(now);
        let start = out.len();
        if self.link == Link::Down {
            return false;
        }
        let limit = start.saturating_add(self.config.transmit_batch_bytes);
        if self.hello_pending {
            self.hello_pending = false;
            frame::encode_hello(
                out,
                &Hello {
                    version: PROTOCOL_VERSION,
                    epoch: self.local_epoch,
                    max_frame_len: self.config.max_frame_len,
                    window: self.config.window,
                    domus_id: self.local_id.clone(),
                },
            );
        }
        if self.close_pending.is_some() {
            // Answers owed go out before the CLOSE: a shutdown answers every delivery still
            // waiting for its handler, and the peer must read them before it reads the CLOSE.
            self.write_answers(out, limit);
            if self.answers.is_empty()
                && let Some((code, reason)) = self.close_pending.take()
            {
                frame::encode_close(out, code, &reason);
            }
            return out.len() > start;
        }
        if self.link != Link::Open {
            return out.len() > start;
        }
        for nonce in self.pongs.drain(..) {
            frame::encode_pong(out, nonce);
        }
        let probing = self.ping_to_send.is_some();
        if let Some(nonce) = self.ping_to_send.take() {
            frame::encode_ping(out, nonce);
        }
        // The floor goes out every DONE_BELOW_STEP ids, and with each keepalive probe (so a
        // quiet peer's dedupe state empties within one keepalive interval).
        let floor = self.retained.first_id().unwrap_or(self.next_id);
        if floor > self.done_below_sent
            && (floor.saturating_sub(self.done_below_sent) >= DONE_BELOW_STEP || probing)
        {
            frame::encode_done_below(out, floor);
            self.done_below_sent = floor;
        }
        self.write_answers(out, limit);
        self.write_messages(out, limit);
        out.len() > start
    }
}

impl Session {
    /// ACCEPTED ids (as many per frame as the peer's frame limit takes, at most 8192), then
    /// REPLY and REJECT frames, until `out` reaches `limit` (at least one frame goes out).
    /// Every frame fits the limit the peer announced (T32): a reply that would not is turned
    /// into a rejection that says so, and rejection reasons are cut to fit.
    fn write_answers(&mut self, out: &mut BytesMut, limit: usize) {
        let frame_max = self.peer_max_frame_len as usize;
        let ids_per_frame = (frame_max / 8).clamp(1, 8192);
        let mut written = 0usize;
        for chunk in self.answers.accepted.chunks(ids_per_frame) {
            if out.len() >= limit && written > 0 {
                break;
            }
            frame::encode_accepted(out, chunk);
            written = written.saturating_add(chunk.len());
        }
        self.answers.written_accepted(written);
        let reason_room = frame_max
            .saturating_sub(frame::REJECT_FIXED_LEN)
            .min(frame::MAX_REASON_LEN);
        while out.len() < limit {
            let Some((id, answer)) = self.answers.pop_other() else {
                break;
            };
            match answer {
                // A reply the peer would refuse as too long is turned into a rejection that
                // says so, instead of a frame that closes the callis.
                Answer::Replied(payload) if payload.len().saturating_add(8) > frame_max => {
                    let reason = format!(
                        "the reply of {} bytes is larger than the sender accepts",
                        payload.len()
                    );
                    frame::encode_reject(
                        out,
                        id,
                        ErrorId::PayloadTooLarge.into(),
                        0,
                        frame::capped(&reason, reason_room),
                    );
                }
                Answer::Replied(payload) => frame::encode_reply(out, id, &payload),
                Answer::Rejected {
                    error,
                    code,
                    reason,
                } => {
                    frame::encode_reject(out, id, error, code, frame::capped(&reason, reason_room))
                }
                Answer::Accepted => frame::encode_accepted(out, &[id]),
            }
        }
    }

    /// MESSAGE frames, A2 before A3, never an id `peer_window` or more past the oldest
    /// unanswered one.
    fn write_messages(&mut self, out: &mut BytesMut, limit: usize) {
        let Some(oldest) = self.retained.first_id() else {
            self.schedule.clear();
            return;
        };
        let span_end = oldest.saturating_add(u64::from(self.peer_window));
        while out.len() < limit {
            // A2 first, A3 aged in (T20); nothing at or past the peer's window.
            let Some(id) = self.schedule.next_below(span_end) else {
                return;
            };
            // Ids finished or cancelled since they were queued are skipped.
            let Some(r) = self.retained.get_mut(id) else {
                continue;
            };
            if r.transmitted {
                continue;
            }
            frame::encode_message(out, id, r.dst, r.src, r.msg_type, &r.payload);
            r.transmitted = true;
            r.ever_transmitted = true;
            self.stats.messages_sent = self.stats.messages_sent.saturating_add(1);
        }
    }
}

/// The priority class a message of `msg_type` is written in.
#[inline]
fn class_of(msg_type: u32) -> Class {
    if msg_type < A3_MESSAGE_TYPE_BASE {
        Class::A2
    } else {
        Class::A3
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
