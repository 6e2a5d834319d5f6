//! What a peer's driver and the rest of the domus share: the commands and queues that reach
//! the driver ([`SendCmd`], [`QueuedAnswer`], [`PeerCommand`]), what the driver is given when it
//! starts ([`DriverContext`], [`PeerLinks`]), how it asks to be forgotten and hands back what
//! it cannot deliver ([`Retirement`], the [`DriverHost`] trait the domus implements), and the
//! reachability it publishes ([`Reachability`]).
//!
//! Types only, and the trait through which the driver reaches up: the domus's own types are
//! never named here (layers point down), and nothing here awaits or locks across a wait.

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::sync::{Semaphore, mpsc};

use super::Outgoing;
use crate::a0_transport::{AuthenticatedStream, DomusAddr, DomusId, Transport};
use crate::a1_callis::reply_budget::ReplyBudget;
use crate::a1_callis::session::Answer;
use crate::error::Error;
use crate::reporting::{CallisKind, PeerCells, Recorder};
use crate::runtime::Inbound;
use crate::runtime::budget::{InFlight, InFlightBudget};
use crate::runtime::completion::{Completion, CompletionRing};
use crate::runtime::ends::BlobCommand;
use crate::runtime::queue::WakeQueue;

/// When a queued message's send gives up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Deadline {
    /// This many nanoseconds after the driver takes the message: the sending task reads no
    /// clock, the driver stamps everything it takes in one turn with the instant of that
    /// turn. Nanoseconds in a `u64` rather than a `Duration`: beside an `Instant`'s niche the
    /// enum then takes 16 bytes instead of 24, which keeps a [`SendCmd`] under the size the
    /// compiler moves inline (a larger one is copied by `memcpy` calls at every hand-over).
    After(u64),
    /// At this instant: a send that already waited (for room, for a route), or one moved
    /// from another driver, keeps the deadline it had.
    At(std::time::Instant),
}

/// A message on its way to a driver: a session [`Outgoing`] whose deadline the driver
/// stamps when it takes it.
#[derive(Debug, Clone)]
pub(crate) struct QueuedSend {
    pub(crate) dst: u64,
    pub(crate) src: u64,
    pub(crate) msg_type: u32,
    pub(crate) headers: crate::a1_callis::headers::Headers,
    pub(crate) payload: bytes::Bytes,
    pub(crate) deadline: Deadline,
}

impl QueuedSend {
    /// The payload's size as the in-flight budget counts it.
    pub(crate) fn size(&self) -> u32 {
        u32::try_from(self.payload.len()).unwrap_or(u32::MAX)
    }

    /// The message for the session, its deadline stamped from `now` (the driver's turn).
    pub(crate) fn stamp(self, now: std::time::Instant) -> Outgoing {
        let deadline = match self.deadline {
            Deadline::After(nanos) => now.checked_add(Duration::from_nanos(nanos)).unwrap_or(now),
            Deadline::At(at) => at,
        };
        Outgoing {
            dst: self.dst,
            src: self.src,
            msg_type: self.msg_type,
            headers: self.headers,
            payload: self.payload,
            deadline,
        }
    }
}

impl From<Outgoing> for QueuedSend {
    fn from(m: Outgoing) -> Self {
        Self {
            dst: m.dst,
            src: m.src,
            msg_type: m.msg_type,
            headers: m.headers,
            payload: m.payload,
            deadline: Deadline::At(m.deadline),
        }
    }
}

/// A message to deliver, from the send path through the peer's send queue; `done` gets the
/// outcome; `permit` is its share of the peer's in-flight budget, returned when it finishes.
pub(crate) struct SendCmd {
    pub(crate) msg: QueuedSend,
    pub(crate) done: Completion,
    pub(crate) permit: InFlight,
}

/// Sends handed over together (a window's batch): one share of the in-flight budget for all
/// of them and one completion ring, the sends' outcomes going to consecutive tickets from
/// `first_ticket`. The driver splits it into its sends.
pub(crate) struct SendBatch {
    pub(crate) msgs: Vec<QueuedSend>,
    pub(crate) ring: Arc<CompletionRing>,
    pub(crate) first_ticket: u64,
    pub(crate) permit: InFlight,
}

/// What the send path hands a driver through its send queue: one send, or a batch.
pub(crate) enum Handover {
    /// One send.
    One(SendCmd),
    /// Many sends through one window.
    Batch(SendBatch),
}

/// An answer of a local taberna to delivery `id` of the peer's run `epoch`, through the
/// peer's answer queue.
pub(crate) struct QueuedAnswer {
    pub(crate) epoch: u64,
    pub(crate) id: u64,
    pub(crate) answer: Answer,
}

/// What the rest of the domus asks of a peer's driver, besides sends and answers (which come
/// in batches through their own queues).
pub(crate) enum PeerCommand {
    /// A freshly authenticated callis with this peer, and any bytes already read from it
    /// (its first frame, read to tell a primary callis from a blob callis).
    Attach(Box<AuthenticatedStream>, BytesMut),
    /// Learn (or change) the address to dial.
    SetAddr(DomusAddr),
    /// Close the current callis (the application asked): what is unanswered stays and is
    /// replayed on the next one, dialled when something waits for it.
    Disconnect,
    /// The authentication material changed: verify the peer of the current callis again and
    /// close it if the peer would be refused now (a revoked certificate, say).
    Recheck,
    /// Finish pending writes, close the callis, fail what is left, and stop.
    Shutdown,
}

/// What a driver needs from its domus.
pub(crate) struct DriverContext {
    pub(crate) transport: Transport,
    /// Where deliveries from peers go (the taberna registry).
    pub(crate) inbound: Arc<dyn Inbound>,
    pub(crate) local_id: DomusId,
    /// This domus's run (its HELLO's epoch).
    pub(crate) local_epoch: u64,
    /// The reply bytes every session of the domus together may keep for replay.
    pub(crate) reply_budget: Arc<ReplyBudget>,
    pub(crate) reconnect_backoff_min: Duration,
    pub(crate) reconnect_backoff_max: Duration,
    /// Bytes every receiving blob stream reserves, and the domus-wide budget they come from.
    pub(crate) blob_window: usize,
    pub(crate) blob_in_budget: Arc<Semaphore>,
    pub(crate) recorder: Arc<Recorder>,
}

/// What a peer driver shares with the rest of its peer: the blob driver's commands, the
/// receiving-stream slots, and the live figures reporting reads.
pub(crate) struct PeerLinks {
    /// Sends for this peer, queued by the send path.
    pub(crate) sends: Arc<WakeQueue<Handover>>,
    pub(crate) blob_tx: mpsc::UnboundedSender<BlobCommand>,
    /// Receiving streams open with this peer (one permit each).
    pub(crate) blob_in_streams: Arc<Semaphore>,
    pub(crate) cells: Arc<PeerCells>,
    /// `DomusConfig::max_callis_age` when the peer was created.
    pub(crate) max_callis_age: Option<Duration>,
    /// Whether the peer can be reached, for sends waiting for room.
    pub(crate) reachability: Arc<Reachability>,
    /// The peer's in-flight budget, whose waiting sends the driver turns away when the peer
    /// shuts down.
    pub(crate) budget: Arc<InFlightBudget>,
    /// The peer's previous driver retired after the peer shut down, and no callis opened
    /// since (the domus remembered it): this one starts out knowing (`peer_shut_down`).
    pub(crate) shut_down: bool,
    /// How the driver asks to be forgotten, and when it may (see [`Retirement`]).
    pub(crate) retirement: Retirement,
}

/// When and how an idle peer is forgotten (`DomusConfig::peer_retire_after`): once no
/// callis is open or dialling, nothing is in flight either way and the blob side is idle, the
/// driver asks its `host` to forget the peer — at once when the peer shut down or said it
/// waits for nothing, else `after` the last callis closed (and `after` its start for a driver
/// no send or callis reached: it was made for one on its way). The peer's session then ends; a
/// later contact makes a new one whose ids start at `id_floor`, above every id this one used.
pub(crate) struct Retirement {
    pub(crate) after: Duration,
    /// The domus that runs the driver: what the driver asks of it.
    pub(crate) host: Arc<dyn DriverHost>,
    /// The lowest id a new session may use (every session that ended raised it past its
    /// own ids).
    pub(crate) id_floor: Arc<std::sync::atomic::AtomicU64>,
    /// Whether the peer's blob driver has a callis or a stream (it keeps this up to date).
    pub(crate) blob_active: Arc<std::sync::atomic::AtomicBool>,
}

/// What a peer's drivers ask of the domus that runs them: to forget the peer when it retires,
/// to hand a send it cannot deliver to another replica, to pass a callis that arrived as it
/// retired to the next driver, and to drop an address pin another identity answered at.
/// Implemented by the domus (the runtime names no domus type).
pub(crate) trait DriverHost: Send + Sync {
    /// Removes `peer` if `sends` is still its queue and nothing is queued in it, closing the
    /// queue under the same lock (a send that races this is handed to a new driver). False:
    /// the peer stays and the driver keeps running. `unreachable`: the peer shut down or its
    /// last dial failed (the domus remembers that a while, to route around it);
    /// `shut_down`: the peer shut down and no callis opened since (the domus tells the
    /// peer's next driver, so a send that races this, or comes later, still fails at once
    /// when the peer cannot be reached).
    fn forget(
        &self,
        peer: &DomusId,
        sends: &Arc<WakeQueue<Handover>>,
        unreachable: bool,
        shut_down: bool,
    ) -> bool;

    /// Whether a send to `taberna` that `peer` cannot deliver has another replica to go to
    /// now (see [`DriverHost::redirect`]).
    fn can_redirect(&self, peer: &DomusId, taberna: u64) -> bool;

    /// Hands a send `peer` could not deliver — it never went out on any callis, and the
    /// peer cannot be reached — to another replica serving its taberna, if the route lists
    /// one this domus can reach now; gives the send back otherwise.
    fn redirect(&self, peer: &DomusId, send: SendCmd) -> Result<(), SendCmd>;

    /// Hands an inbound callis that reached a driver as it retired (its first frame's kind,
    /// and the bytes read to learn it) to the peer's next driver, so the peer that just
    /// connected is not cut off.
    fn attach_again(&self, stream: AuthenticatedStream, kind: CallisKind, prefix: BytesMut);

    /// A dial to `addr` expecting `peer` met another identity: an address→identity pin of
    /// `peer` there is stale, and the next send on a route without an identity learns anew.
    fn not_at(&self, peer: &DomusId, addr: &DomusAddr);
}

/// Whether a peer can be reached, as its driver last found out: read by sends that waited
/// for room in the peer's in-flight budget until their deadline, so they can say why they
/// were never sent. Written by the driver only (when a dial fails, the peer shuts down, or a
/// callis opens).
#[derive(Default)]
pub(crate) struct Reachability {
    why_not: arc_swap::ArcSwapOption<Error>,
}

impl Reachability {
    /// Why the peer cannot be reached now, if it cannot.
    pub(crate) fn why_not(&self) -> Option<Error> {
        self.why_not.load_full().map(|e| Error::clone(&e))
    }

    pub(super) fn set(&self, why_not: Option<Error>) {
        self.why_not.store(why_not.map(Arc::new));
    }
}
#[cfg(test)]
mod tests {
    /// A send crosses several hand-overs (the send queue, the driver, the session); past 128
    /// bytes the compiler copies it with `memcpy` calls instead of inline moves, which cost
    /// about 150 instructions per message when a field of 8 bytes tipped it over (measured
    /// with the instruction counter, issue 23).
    #[test]
    fn a_send_stays_small_enough_to_move_inline() {
        assert!(std::mem::size_of::<super::SendCmd>() <= 120);
        assert!(std::mem::size_of::<super::Deadline>() <= 16);
    }
}
