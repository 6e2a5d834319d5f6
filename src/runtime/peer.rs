//! The peer driver: the one task that owns a peer's [`Session`] and its current callis.
//!
//! It is the only async code of A1. Each wake-up it takes commands (sends, answers, new
//! calles), reads whatever the socket has into the session, fires the session's timers,
//! dispatches the session's events (deliveries to tabernas, answers to waiting senders), and
//! writes everything the session has ready in one buffer — many frames per TLS record. When
//! the callis drops it keeps the session (and so every unanswered message) and dials again:
//! immediately the first time, then with exponential backoff and jitter.
//!
//! It holds no lock across an `.await` (it holds no lock at all), and every wait it makes is
//! a socket, a channel or a timer the session scheduled.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::BytesMut;
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use super::budget::{InFlight, InFlightBudget};
use super::callis::{
    Alarm, ByteCounters, CallisIo, Counting, Dialer, ReadSink, Step, dialler_of, now,
};
use super::completion::Completion;
use super::ends::BlobCommand;
use super::ends::{BlobReceiver, Reservation};
use super::queue::WakeQueue;
use super::{
    AnswerTx, Delivered, Delivery, Inbound, InboundMessage, answer_result, domus_closed, yield_turn,
};
use crate::a0_transport::{AuthenticatedStream, DomusAddr, DomusId, PeerIdentity, Transport};
use crate::a1_callis::blob::{BLOB_OPEN_TYPE, decode_blob_open, stream_parity};
use crate::a1_callis::link::{AgeAction, Backoff, CallisAge, keep_current};
use crate::a1_callis::reply_budget::ReplyBudget;
pub(crate) use crate::a1_callis::session::Outgoing;
use crate::a1_callis::session::{
    A3_MESSAGE_TYPE_BASE, Answer, Event, Outcome, Session, SessionConfig,
};
use crate::a1_callis::window::IdQueue;
use crate::error::{Error, ErrorId};
use crate::reporting::{C, CallisKind, Event as Report, PeerCells, Recorder, TurnCounts};

/// A message to deliver, from the send path through the peer's send queue; `done` gets the
/// outcome; `permit` is its share of the peer's in-flight budget, returned when it finishes.
pub(crate) struct SendCmd {
    pub(crate) msg: Outgoing,
    pub(crate) done: Completion,
    pub(crate) permit: InFlight,
}

/// An answer of a local taberna to delivery `id` of the peer's run `epoch`, through the
/// peer's answer queue.
pub(crate) struct AnswerCmd {
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
    pub(crate) sends: Arc<WakeQueue<SendCmd>>,
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
/// driver asks `forget` to remove the peer — at once when the peer shut down or said it waits
/// for nothing, else `after` the last callis closed (and `after` its start for a driver no
/// send or callis reached: it was made for one on its way). The peer's session then ends; a later
/// contact makes a new one whose ids start at `id_floor`, above every id this one used.
pub(crate) struct Retirement {
    pub(crate) after: Duration,
    pub(crate) forget: Arc<dyn Forget>,
    /// The lowest id a new session may use (every session that ended raised it past its
    /// own ids).
    pub(crate) id_floor: Arc<std::sync::atomic::AtomicU64>,
    /// Whether the peer's blob driver has a callis or a stream (it keeps this up to date).
    pub(crate) blob_active: Arc<std::sync::atomic::AtomicBool>,
}

/// The domus's side of forgetting a peer.
pub(crate) trait Forget: Send + Sync {
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
        sends: &Arc<WakeQueue<SendCmd>>,
        unreachable: bool,
        shut_down: bool,
    ) -> bool;

    /// Whether a send to `taberna` that `peer` cannot deliver has another replica to go to
    /// now (see [`Forget::redirect`]).
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

    fn set(&self, why_not: Option<Error>) {
        self.why_not.store(why_not.map(Arc::new));
    }
}

struct PendingSend {
    done: Completion,
    _permit: InFlight,
    dst: u64,
    /// When it was handed to the driver (`Recorder::now_us`), for latency and pending age.
    started_us: u64,
}

/// Bytes read per wake-up before other work gets a turn.
const READ_BUDGET: usize = 1 << 20;
/// Commands taken per wake-up before other work gets a turn.
const COMMAND_BUDGET: usize = 4096;
/// Read buffer growth step.
const READ_RESERVE: usize = 64 * 1024;
/// How often a driver gives back empty buffer and queue room at most.
const RELEASE_EVERY: Duration = Duration::from_secs(1);

/// One peer's task. Poll it to completion (the domus spawns it on its task tracker).
pub(crate) struct PeerDriver {
    peer_id: DomusId,
    ctx: Arc<DriverContext>,
    commands: mpsc::UnboundedReceiver<PeerCommand>,
    /// Sends queued by the send path, and answers queued by local tabernas, with the buffers
    /// their batches are swapped into.
    sends: Arc<WakeQueue<SendCmd>>,
    send_buf: Vec<SendCmd>,
    answers: Arc<WakeQueue<AnswerCmd>>,
    answer_buf: Vec<AnswerCmd>,
    session: Session,
    pending: IdQueue<PendingSend>,
    /// The current callis, once authenticated.
    callis: Option<CallisIo>,
    peer_identity: Option<Arc<PeerIdentity>>,
    dialer: Dialer,
    last_dial_error: Option<Error>,
    /// Follows the session's `poll_timeout`.
    timer: Alarm,
    /// When empty buffers were last given back.
    released_at: Option<std::time::Instant>,
    shutting_down: bool,
    cancelled: Pin<Box<WaitForCancellationFutureOwned>>,
    close_reason: Option<Error>,
    blob_tx: mpsc::UnboundedSender<BlobCommand>,
    blob_in_streams: Arc<Semaphore>,
    cells: Arc<PeerCells>,
    /// Where the primary callis's bytes are counted.
    counting: Counting,
    /// The current callis said HELLO (and was counted as up).
    open_reported: bool,
    /// `PeerConnected` was reported and no `PeerDisconnected` since. A callis replaced by a
    /// newer one (the duplicate tie-break, `max_callis_age`) is a callis down and up, not
    /// the peer's: messages never waited for a callis.
    peer_up_reported: bool,
    /// `max_callis_age` for the current callis, and the alarm that follows it.
    age: CallisAge,
    age_timer: Alarm,
    /// Message counts of this turn, published once at its end (or before outcomes are
    /// handed back).
    counts: TurnCounts,
    /// Outcomes of this dispatch, handed to their senders after the counts are published.
    completed: Vec<(Completion, Result<Delivery, Error>)>,
    /// The clock, read once per turn of the driver loop (every session call of the turn uses
    /// it): `now` and the same instant as the recorder's microseconds.
    now: std::time::Instant,
    now_us: u64,
    /// The peer said it shut down (CLOSE `DomusClosed`), to this driver or to the one that
    /// retired before it (`PeerLinks::shut_down`), and no callis has opened since: a failed
    /// dial then fails what waits for it at once, with `PeerShutDown`.
    peer_shut_down: bool,
    reachability: Arc<Reachability>,
    budget: Arc<InFlightBudget>,
    retirement: Retirement,
    /// Since when no callis has been open (`None` while one is).
    down_since: Option<std::time::Instant>,
    /// A send or a command reached this driver. One that none reached yet was made for one
    /// on its way (a send, an inbound callis): it does not retire at once, or that one would
    /// find it gone and need a second driver.
    used: bool,
    /// Follows [`PeerDriver::retire_at`].
    retire_timer: Alarm,
    /// The session's refusals of a peer that does not read its answers, as last reported.
    unread_refusals_reported: u64,
}

impl PeerDriver {
    pub(crate) fn new(
        peer_id: DomusId,
        addr: Option<DomusAddr>,
        ctx: Arc<DriverContext>,
        session: SessionConfig,
        commands: mpsc::UnboundedReceiver<PeerCommand>,
        cancel: CancellationToken,
        links: PeerLinks,
    ) -> Self {
        // Ids start above every id an earlier session with this peer used (it may still
        // remember those).
        let first_id = links
            .retirement
            .id_floor
            .load(std::sync::atomic::Ordering::Acquire);
        let session = Session::new(session, ctx.local_id.as_str().to_owned(), ctx.local_epoch)
            .with_reply_budget(ctx.reply_budget.clone())
            .with_first_id(first_id);
        let dialer = Dialer::new(
            peer_id.clone(),
            addr,
            ctx.transport.clone(),
            ctx.recorder.clone(),
            Backoff::new(ctx.reconnect_backoff_min, ctx.reconnect_backoff_max),
        );
        let counting = Counting {
            recorder: ctx.recorder.clone(),
            cells: links.cells.clone(),
            counters: ByteCounters {
                bytes_in: C::primary_bytes_in,
                bytes_out: C::primary_bytes_out,
            },
        };
        let driver = Self {
            peer_id,
            ctx,
            commands,
            sends: links.sends,
            send_buf: Vec::new(),
            answers: Arc::new(WakeQueue::default()),
            answer_buf: Vec::new(),
            session,
            pending: IdQueue::default(),
            callis: None,
            peer_identity: None,
            dialer,
            last_dial_error: None,
            timer: Alarm::new(),
            released_at: None,
            shutting_down: false,
            cancelled: Box::pin(cancel.cancelled_owned()),
            close_reason: None,
            blob_tx: links.blob_tx,
            blob_in_streams: links.blob_in_streams,
            counting,
            cells: links.cells,
            open_reported: false,
            peer_up_reported: false,
            age: CallisAge::new(links.max_callis_age),
            age_timer: Alarm::new(),
            now: now(),
            now_us: 0,
            counts: TurnCounts::default(),
            completed: Vec::new(),
            peer_shut_down: links.shut_down,
            reachability: links.reachability,
            budget: links.budget,
            retirement: links.retirement,
            down_since: Some(now()),
            used: false,
            retire_timer: Alarm::new(),
            unread_refusals_reported: 0,
        };
        if driver.peer_shut_down {
            driver.reachability.set(Some(driver.shut_down_error()));
        }
        driver
    }

    /// When this peer may be forgotten, if nothing changes: `None` while anything is open,
    /// dialling or in flight either way (see [`Retirement`]).
    fn retire_at(&self) -> Option<std::time::Instant> {
        let down_since = self.down_since?;
        let idle = !self.shutting_down
            && self.callis.is_none()
            && self.dialer.is_idle()
            && self.pending.is_empty()
            && self.completed.is_empty()
            && self.session.is_quiescent()
            && self.sends.is_empty()
            && self.answers.is_empty()
            && !self.retirement.blob_active.load(Ordering::Acquire);
        if !idle {
            return None;
        }
        if self.used && (self.peer_shut_down || self.session.peer_waits_for_nothing()) {
            return Some(down_since);
        }
        down_since.checked_add(self.retirement.after)
    }

    /// The peer cannot be reached: what it cannot have received (never written on any
    /// callis) goes to another replica of its taberna when the route lists one (asked once
    /// per taberna); everything else stays as it was. A send the other replica turns down
    /// after all (no room there) comes back here, with its deadline, under a new id.
    fn redirect_unsent(&mut self) {
        let table = &self.retirement.forget;
        let peer = &self.peer_id;
        let mut asked = std::collections::HashMap::new();
        let unsent = self.session.take_unsent(|dst| {
            *asked
                .entry(dst)
                .or_insert_with(|| table.can_redirect(peer, dst))
        });
        for (id, msg) in unsent {
            let Some(p) = self.pending.remove(id) else {
                continue;
            };
            let cmd = SendCmd {
                msg,
                done: p.done,
                permit: p._permit,
            };
            if let Err(cmd) = self.retirement.forget.redirect(&self.peer_id, cmd) {
                self.handle_send(cmd);
            } else {
                tracing::debug!(peer = %self.peer_id, "unsent message handed to another replica");
            }
        }
    }

    /// Asks the domus to forget this peer; true when it did (the driver then ends).
    fn retire(&mut self) -> bool {
        let unreachable = self.reachability.why_not().is_some();
        if !self.retirement.forget.forget(
            &self.peer_id,
            &self.sends,
            unreachable,
            self.peer_shut_down,
        ) {
            return false;
        }
        self.retirement
            .id_floor
            .fetch_max(self.session.next_id(), Ordering::AcqRel);
        tracing::debug!(peer = %self.peer_id, "idle peer forgotten");
        let _ = self.blob_tx.send(BlobCommand::Retire);
        self.commands.close();
        // A callis the domus handed over just before the peer was forgotten goes to the new
        // driver; the other commands concern this driver only.
        while let Ok(cmd) = self.commands.try_recv() {
            if let PeerCommand::Attach(stream, prefix) = cmd {
                self.retirement
                    .forget
                    .attach_again(*stream, CallisKind::Primary, prefix);
            }
        }
        true
    }

    /// Takes a message into the session (or fails it at once when it cannot be sent).
    fn handle_send(&mut self, SendCmd { msg, done, permit }: SendCmd) {
        self.used = true;
        if self.shutting_down {
            done.complete(Err(domus_closed()));
            return;
        }
        if self.peer_shut_down && self.callis.is_none() && self.dialer.is_waiting() {
            // It shut down and the last dial since failed: fail now rather than wait for the
            // deadline (the next dial after the backoff may find it back).
            done.complete(Err(self.shut_down_error()));
            return;
        }
        let dst = msg.dst;
        match self.session.send(msg) {
            Ok(id) => {
                self.counts.sent();
                // Session ids only grow, so this cannot be refused.
                self.pending.push(
                    id,
                    PendingSend {
                        done,
                        _permit: permit,
                        dst,
                        started_us: self.now_us,
                    },
                );
            }
            Err(e) => done.complete(Err(e)),
        }
    }

    fn handle_command(&mut self, cmd: PeerCommand) {
        self.used = true;
        match cmd {
            PeerCommand::Attach(stream, prefix) => self.attach(*stream, prefix),
            PeerCommand::SetAddr(addr) => {
                // A dial to the old address is abandoned: what waits goes the new way now.
                // Failures at the old address say nothing of the new one: the peer may be
                // chosen again (a replica that came back elsewhere gets sends at once).
                if self.dialer.set_addr(addr) {
                    self.reachability.set(None);
                }
            }
            PeerCommand::Recheck => self.recheck(),
            PeerCommand::Disconnect => {
                if self.callis.is_some() {
                    self.session.close(Error::new(
                        ErrorId::ConnectionLost,
                        "the application closed the callis (Domus::disconnect)",
                    ));
                }
            }
            PeerCommand::Shutdown => self.begin_shutdown(),
        }
    }

    fn recheck(&mut self) {
        let Some(callis) = &self.callis else {
            return;
        };
        if let Err(e) = callis.stream().recheck(&self.ctx.transport) {
            let e = Error::new(
                e.id(),
                format!("{} is no longer trusted: {}", self.peer_id, e.message()),
            );
            tracing::debug!(peer = %self.peer_id, error = %e, "closing a callis whose peer is no longer trusted");
            self.ctx.recorder.error(e.clone());
            self.session.close(e);
        }
    }

    fn begin_shutdown(&mut self) {
        if self.shutting_down {
            return;
        }
        self.shutting_down = true;
        self.dialer.stop();
        if self.callis.is_some() {
            // Deliveries the handlers still hold are answered before the CLOSE goes out.
            self.session.shut_down();
        }
    }

    /// The error of a send that cannot go out because the peer shut down (and, when a dial
    /// failed since, why it still cannot be reached).
    fn shut_down_error(&self) -> Error {
        match &self.last_dial_error {
            // A permanent refusal since (another identity answers at its address, our
            // certificate is refused there) says more than the shutdown: the route itself is
            // wrong now, and the caller must be able to tell (T11).
            Some(dial) if dial.id().is_permanent_dial_failure() => Error::new(
                dial.id(),
                format!(
                    "{} shut down, and its address refuses it now ({}); the message was not sent",
                    self.peer_id,
                    dial.message()
                ),
            ),
            Some(dial) => Error::new(
                ErrorId::PeerShutDown,
                format!(
                    "{} shut down and cannot be reached ({}); the message was not sent",
                    self.peer_id,
                    dial.message()
                ),
            ),
            None => Error::new(
                ErrorId::PeerShutDown,
                format!("{} shut down; the message was not sent", self.peer_id),
            ),
        }
    }

    /// Adopts a new callis, or keeps the current one. When both sides dialled at once, the
    /// callis dialled by the smaller id survives (both ends apply the same rule); a new callis
    /// dialled by the same side as the current one replaces it (the old one is likely dead).
    fn attach(&mut self, new: AuthenticatedStream, prefix: BytesMut) {
        // The bytes the accept path read to tell the callis's kind were read from it.
        self.counting.read(prefix.len());
        if self.shutting_down {
            return;
        }
        if let Some(current) = &self.callis {
            if keep_current(
                &self.ctx.local_id,
                &self.peer_id,
                current.dialler(),
                dialler_of(&new),
            ) {
                tracing::debug!(peer = %self.peer_id, "duplicate callis closed; keeping the one dialled by the smaller id");
                return;
            }
            tracing::debug!(peer = %self.peer_id, "switching to a newer callis");
            self.close_callis(false);
        }
        // A dial of ours still in progress is left to finish: the peer may already hold that
        // callis, and both ends must judge the same pair of calles by the same rule.
        self.dialer.end_wait();
        let identity = Arc::new(new.peer().clone());
        self.cells.identity.store(Some(identity.clone()));
        self.peer_identity = Some(identity);
        self.session.connected(self.now, self.peer_id.as_str());
        // The write buffer grows with what is written (and is given back when idle).
        self.callis = Some(CallisIo::new(new, BytesMut::new(), self.counting.clone()));
        self.down_since = None;
        self.age.opened(self.now);
        if !prefix.is_empty() {
            self.session.recv_buf().extend_from_slice(&prefix);
            self.session.handle_input(self.now);
        }
    }

    fn drop_stream(&mut self) {
        self.close_callis(true);
    }

    /// Closes the current callis; `peer_down`: the peer is reported disconnected too (false
    /// when a newer callis replaces it at once).
    fn close_callis(&mut self, peer_down: bool) {
        if self.open_reported {
            self.open_reported = false;
            self.cells.connected.store(false, Ordering::Relaxed);
            self.ctx
                .recorder
                .callis(CallisKind::Primary, &self.peer_id, false);
        }
        if peer_down && self.peer_up_reported {
            self.peer_up_reported = false;
            self.ctx.recorder.event(Report::PeerDisconnected {
                peer: self.peer_id.clone(),
                reason: self.close_reason.take(),
            });
        }
        self.callis = None;
        self.down_since = Some(self.now);
        self.age.closed();
        self.session.disconnected(self.now);
    }

    /// The current callis reached `max_callis_age` (or a quarter of it more): see
    /// [`CallisAge`]. A callis we dialled gets a replacement dial, which takes over when it
    /// attaches; either side closes it a quarter of the age later if it is still in use.
    fn on_age_timer(&mut self) {
        let Some(callis) = &self.callis else {
            return;
        };
        match self.age.on_timeout(self.now, callis.dialler()) {
            AgeAction::DialReplacement => {
                if !self.dialer.is_dialling() && !self.shutting_down {
                    tracing::debug!(peer = %self.peer_id, "callis reached max_callis_age; dialling its replacement");
                    self.dialer.start();
                }
            }
            AgeAction::Close => {
                tracing::debug!(peer = %self.peer_id, "closing a callis past max_callis_age");
                self.session.close(Error::new(
                    ErrorId::ConnectionLost,
                    "the callis reached max_callis_age; a new one replaces it",
                ));
            }
            AgeAction::Wait | AgeAction::None => {}
        }
    }

    /// Dials when messages wait and nothing else is under way.
    fn maybe_dial(&mut self) {
        if !self.shutting_down
            && self.callis.is_none()
            && self.dialer.is_idle()
            && self.session.in_flight() > 0
        {
            self.dialer.start();
        }
    }

    fn dial_failed(&mut self, error: Error) {
        let permanent = error.id().is_permanent_dial_failure();
        tracing::debug!(peer = %self.peer_id, error = %error, permanent, "dial failed");
        let rec = &self.ctx.recorder;
        if error.id() == ErrorId::IdentityMismatch {
            rec.inc(C::identity_mismatches);
            if let Some(addr) = self.dialer.addr() {
                self.retirement.forget.not_at(&self.peer_id, addr);
            }
        }
        rec.event(Report::DialFailed {
            peer: self.peer_id.clone(),
            error: error.clone(),
        });
        rec.error(error.clone());
        self.last_dial_error = Some(error.clone());
        self.redirect_unsent();
        if self.peer_shut_down {
            let e = self.shut_down_error();
            self.reachability.set(Some(e.clone()));
            self.session.fail_unsent(e);
        } else {
            let unreachable = Error::new(
                error.id().unreachable_send_id(),
                format!("{} could not be reached: {}", self.peer_id, error.message()),
            );
            self.reachability.set(Some(unreachable.clone()));
            if permanent {
                // What the peer may have received stays until its deadline.
                self.session.fail_unsent(unreachable);
            }
        }
    }

    fn dispatch_events(&mut self) {
        while let Some(event) = self.session.poll_event() {
            match event {
                Event::Connected {
                    peer_epoch,
                    restarted,
                } => {
                    self.dialer.connected();
                    self.last_dial_error = None;
                    self.peer_shut_down = false;
                    self.reachability.set(None);
                    let _ = self.blob_tx.send(BlobCommand::PeerEpoch {
                        epoch: peer_epoch,
                        restarted,
                    });
                    let rec = &self.ctx.recorder;
                    if !self.open_reported {
                        self.open_reported = true;
                        self.cells.connected.store(true, Ordering::Relaxed);
                        rec.callis(CallisKind::Primary, &self.peer_id, true);
                    }
                    if !self.peer_up_reported || restarted {
                        self.peer_up_reported = true;
                        rec.event(Report::PeerConnected {
                            peer: self.peer_id.clone(),
                            restarted,
                        });
                    }
                    if restarted {
                        rec.event(Report::SessionRestarted {
                            peer: self.peer_id.clone(),
                        });
                    }
                    tracing::debug!(peer = %self.peer_id, peer_epoch, restarted, "callis open");
                }
                Event::Deliver {
                    peer_epoch,
                    message,
                } => {
                    let Some(peer) = self.peer_identity.clone() else {
                        continue;
                    };
                    if message.msg_type == BLOB_OPEN_TYPE {
                        self.deliver_blob_open(peer, peer_epoch, message);
                        continue;
                    }
                    let id = message.id;
                    let delivered = self.ctx.inbound.deliver(InboundMessage {
                        peer,
                        src: message.src,
                        dst: message.dst,
                        msg_type: message.msg_type,
                        payload: message.payload,
                        blob: None,
                        answer: self.answer_tx(peer_epoch, id),
                    });
                    self.delivered(peer_epoch, id, delivered);
                }
                Event::Finished { id, outcome } => {
                    if let Some(p) = self.pending.remove(id) {
                        let answered_after = matches!(outcome, Outcome::Answered(_))
                            .then(|| self.now_us.saturating_sub(p.started_us));
                        let result = self.outcome_to_result(p.dst, outcome);
                        match &result {
                            Ok(d) => self.counts.answered(
                                matches!(d, Delivery::Accepted),
                                answered_after.unwrap_or(0),
                            ),
                            Err(e) => {
                                if let Some(us) = answered_after {
                                    self.ctx.recorder.latency(Duration::from_micros(us));
                                }
                                record_failure(&self.ctx.recorder, e);
                            }
                        }
                        self.completed.push((p.done, result));
                    }
                }
                Event::Close(error) => {
                    tracing::debug!(peer = %self.peer_id, error = %error, "closing callis");
                    if error.id().is_protocol_violation() {
                        self.ctx.recorder.protocol_violation(&self.peer_id, &error);
                    }
                    if error.id() == ErrorId::PeerShutDown {
                        // Sends from now on dial at once, and fail at once if that fails.
                        self.peer_shut_down = true;
                        self.dialer.connected();
                        let not_sent = Error::new(
                            ErrorId::PeerShutDown,
                            format!("{} shut down; the message was not sent", self.peer_id),
                        );
                        self.reachability.set(Some(not_sent.clone()));
                        // Sends waiting for in-flight room end now, not delivered. Left
                        // waiting, they would take the room the answers read with this CLOSE
                        // freed only after this turn, by when the driver may have retired:
                        // then a new driver would have to dial the peer for them.
                        self.budget.refuse_waiting(not_sent);
                    }
                    self.close_reason = Some(error);
                }
            }
        }
        if !self.completed.is_empty() {
            // The counts first, so a sender that sees its outcome also sees it counted.
            self.counts.publish(&self.ctx.recorder, &self.cells);
            Completion::complete_all(&mut self.completed);
        }
    }

    /// A message that opens a blob stream: reserve the stream (or refuse it at once), open it
    /// on the blob driver, then deliver the request with its receiver.
    fn deliver_blob_open(
        &mut self,
        peer: Arc<PeerIdentity>,
        peer_epoch: u64,
        message: crate::a1_callis::frame::MessageFrame,
    ) {
        let id = message.id;
        let recorder = self.ctx.recorder.clone();
        let refuse = |session: &mut Session, error: ErrorId, reason: &str| {
            recorder.refused(error);
            session.answer(peer_epoch, id, Answer::refusal(error, reason));
        };
        let Some((stream, app_type, header)) = decode_blob_open(&message.payload) else {
            refuse(
                &mut self.session,
                ErrorId::DecodeFailure,
                "a blob-opening message is shorter than its 12-byte prefix",
            );
            return;
        };
        if stream & 1 != stream_parity(&self.peer_id, &self.ctx.local_id) {
            refuse(
                &mut self.session,
                ErrorId::ProtocolViolation,
                "the blob stream id has the other side's parity",
            );
            return;
        }
        if app_type < A3_MESSAGE_TYPE_BASE {
            refuse(
                &mut self.session,
                ErrorId::InvalidMessageType,
                "a blob's message type must be an application (A3) type",
            );
            return;
        }
        let Ok(slot) = self.blob_in_streams.clone().try_acquire_owned() else {
            refuse(
                &mut self.session,
                ErrorId::BlobBufferFull,
                "too many blob streams are open with this peer (max_blob_streams_per_peer)",
            );
            return;
        };
        let window = u32::try_from(self.ctx.blob_window).unwrap_or(u32::MAX);
        let Ok(bytes) = self
            .ctx
            .blob_in_budget
            .clone()
            .try_acquire_many_owned(window)
        else {
            refuse(
                &mut self.session,
                ErrorId::BlobBufferFull,
                "the receiving domus's blob budget is used up (blob_inbound_budget)",
            );
            return;
        };
        let (app_tx, app_rx) = mpsc::unbounded_channel();
        let opened = self.blob_tx.send(BlobCommand::OpenInbound {
            stream,
            app: app_tx,
            reservation: Reservation {
                _stream: Some(slot),
                _bytes: Some(bytes),
            },
        });
        if opened.is_err() {
            refuse(
                &mut self.session,
                ErrorId::DomusClosed,
                "the receiving domus is shutting down",
            );
            return;
        }
        let receiver = BlobReceiver::remote(app_rx, self.blob_tx.clone(), stream);
        let delivered = self.ctx.inbound.deliver(InboundMessage {
            peer,
            src: message.src,
            dst: message.dst,
            msg_type: app_type,
            payload: header,
            blob: Some(receiver),
            answer: self.answer_tx(peer_epoch, id),
        });
        self.delivered(peer_epoch, id, delivered);
    }

    /// Counts a delivery and writes an answer decided on the spot.
    fn delivered(&mut self, peer_epoch: u64, id: u64, delivered: Delivered) {
        match delivered {
            Delivered::Queued => self.counts.received(),
            Delivered::Refused => {}
            Delivered::Answered(answer) => self.session.answer(peer_epoch, id, answer),
            Delivered::AnsweredByHandler(answer) => {
                self.counts.received();
                self.session.answer(peer_epoch, id, answer);
            }
        }
    }

    /// The handle that answers delivery `id` of the peer's run `epoch`.
    fn answer_tx(&self, epoch: u64, id: u64) -> AnswerTx {
        AnswerTx {
            queue: self.answers.clone(),
            epoch,
            id,
        }
    }

    /// Takes every queued send and answer (one swap each); true when there were any.
    fn poll_queues(&mut self, cx: &mut Context<'_>) -> bool {
        let mut progressed = false;
        let mut sends = std::mem::take(&mut self.send_buf);
        self.sends.take_all(&mut sends, cx);
        if !sends.is_empty() {
            progressed = true;
            for cmd in sends.drain(..) {
                self.handle_send(cmd);
            }
        }
        self.send_buf = sends;
        let mut answers = std::mem::take(&mut self.answer_buf);
        self.answers.take_all(&mut answers, cx);
        if !answers.is_empty() {
            progressed = true;
            for AnswerCmd { epoch, id, answer } in answers.drain(..) {
                self.session.answer(epoch, id, answer);
            }
        }
        self.answer_buf = answers;
        progressed
    }

    fn outcome_to_result(&self, dst: u64, outcome: Outcome) -> Result<Delivery, Error> {
        match outcome {
            Outcome::Answered(answer) => {
                answer_result(answer, format_args!("taberna {dst} on {}", self.peer_id))
            }
            // Never sent because no callis opened: say why, when a dial said so.
            Outcome::Failed(e) if e.id() == ErrorId::PeerUnavailable => {
                match &self.last_dial_error {
                    Some(dial) => Err(Error::new(
                        dial.id().unreachable_send_id(),
                        format!(
                            "{} could not be reached before the send's deadline ({}); the message was never sent",
                            self.peer_id,
                            dial.message()
                        ),
                    )),
                    None => Err(Error::new(
                        ErrorId::PeerUnavailable,
                        format!("{}: {}", self.peer_id, e.message()),
                    )),
                }
            }
            Outcome::Failed(e) => Err(e),
        }
    }

    /// Gives back buffer and queue room that is empty now, at most once per
    /// [`RELEASE_EVERY`] (the session's timer, which fires at least every keepalive
    /// interval, calls it): an idle peer holds almost nothing, a busy one pays a few
    /// allocations a second.
    fn release_idle_memory(&mut self) {
        if self
            .released_at
            .is_some_and(|at| self.now.saturating_duration_since(at) < RELEASE_EVERY)
        {
            return;
        }
        self.released_at = Some(self.now);
        self.session.release_idle_memory();
        if let Some(callis) = self.callis.as_mut() {
            callis.release_idle_buffers();
        }
    }

    /// Reads what the socket has into the session (which handles each read at once).
    fn poll_read(&mut self, cx: &mut Context<'_>) -> Step {
        let Some(callis) = self.callis.as_mut() else {
            return Step::IDLE;
        };
        callis.poll_read(
            cx,
            &mut SessionInput(&mut self.session, self.now),
            READ_BUDGET,
            (4096, READ_RESERVE),
        )
    }

    /// Writes what the session has ready.
    fn poll_write(&mut self, cx: &mut Context<'_>) -> Step {
        let Some(callis) = self.callis.as_mut() else {
            return Step::IDLE;
        };
        let session = &mut self.session;
        let now = self.now;
        callis.poll_write(cx, usize::MAX, |buf| session.poll_transmit(now, buf))
    }

    fn poll_timer(&mut self, cx: &mut Context<'_>) -> bool {
        if self.timer.poll(cx, self.session.poll_timeout()) {
            self.session.handle_timeout(self.now);
            self.release_idle_memory();
            return true;
        }
        false
    }

    /// Publishes this peer's live figures for `Reporting::snapshot`, and counts the
    /// session's refusals of a peer that does not read its answers (T31) as refused
    /// `TabernaBusy` deliveries.
    fn publish_cells(&mut self) {
        let refused = self.session.stats().refused_unread_answers;
        for _ in self.unread_refusals_reported..refused {
            self.ctx.recorder.refused(ErrorId::TabernaBusy);
        }
        self.unread_refusals_reported = refused;
        let c = &self.cells;
        c.in_flight
            .store(self.pending.len() as u64, Ordering::Relaxed);
        c.queue_depth
            .store(self.session.queued() as u64, Ordering::Relaxed);
        let rtt = self.session.rtt().map_or(0, |d| {
            u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1)
        });
        c.rtt_us.store(rtt, Ordering::Relaxed);
        let oldest = self
            .pending
            .first_id()
            .and_then(|id| self.pending.get(id))
            .map_or(0, |p| p.started_us);
        c.oldest_pending_at_us.store(oldest, Ordering::Relaxed);
    }

    fn finish(&mut self) {
        // Nothing more comes in: queued sends fail (their senders see the domus closed),
        // queued answers have no callis left to go to.
        for cmd in self.sends.close() {
            cmd.done.complete(Err(domus_closed()));
        }
        drop(self.answers.close());
        self.session.fail_all(domus_closed());
        self.dispatch_events();
        for (_, p) in self.pending.drain() {
            p.done.complete(Err(domus_closed()));
        }
    }
}

/// Read bytes go into the session, which decodes and handles them after every read; reading
/// stops for the turn once the session decided to close.
struct SessionInput<'a>(&'a mut Session, std::time::Instant);

impl ReadSink for SessionInput<'_> {
    fn buf(&mut self) -> &mut BytesMut {
        self.0.recv_buf()
    }

    fn after_read(&mut self) -> bool {
        self.0.handle_input(self.1);
        !self.0.is_closing()
    }
}

/// Counts a send that ended in an error: timed out, rejected by the receiving side (by id,
/// see [`ErrorId::is_rejection`]) or failed.
pub(crate) fn record_failure(rec: &Recorder, e: &Error) {
    match e.id() {
        ErrorId::SendTimeout => rec.inc(C::messages_timed_out),
        id if id.is_rejection() => rec.rejected(id),
        _ => rec.inc(C::messages_failed),
    }
}

impl Future for PeerDriver {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        // Checked once per wake-up: cancellation registers its waker here and wakes us.
        if this.cancelled.as_mut().poll(cx).is_ready() {
            this.finish();
            return Poll::Ready(());
        }
        for _ in 0..32 {
            this.now = now();
            this.now_us = this.ctx.recorder.us_at(this.now);
            let mut progressed = this.poll_queues(cx);
            // Commands.
            for _ in 0..COMMAND_BUDGET {
                match this.commands.poll_recv(cx) {
                    Poll::Ready(Some(cmd)) => {
                        this.handle_command(cmd);
                        progressed = true;
                    }
                    Poll::Ready(None) => {
                        this.finish();
                        return Poll::Ready(());
                    }
                    Poll::Pending => break,
                }
            }
            // Dialling and backoff.
            progressed |= this.dialer.poll_wait(cx);
            this.maybe_dial();
            if let Poll::Ready(result) = this.dialer.poll_dial(cx) {
                progressed = true;
                match result {
                    Ok(stream) => this.attach(stream, BytesMut::new()),
                    Err(e) => this.dial_failed(e),
                }
            }
            if this.age_timer.poll(cx, this.age.poll_timeout()) {
                this.on_age_timer();
                progressed = true;
            }
            // Reading.
            let read = this.poll_read(cx);
            progressed |= read.progressed;
            if !read.alive {
                this.drop_stream();
            }
            // Timers, then events.
            progressed |= this.poll_timer(cx);
            this.dispatch_events();
            // Writing.
            let written = this.poll_write(cx);
            progressed |= written.progressed;
            if !written.alive {
                this.drop_stream();
            }
            if let Some(callis) = &this.callis {
                // The session keeps the write deadline (T33).
                let waiting = !callis.is_drained();
                this.session
                    .write_progress(this.now, written.progressed, waiting);
            }
            this.dispatch_events();
            // A close the session decided takes effect once its CLOSE frame is out, or at
            // once when the peer reads nothing (whatever is still queued is dropped; what is
            // unanswered is replayed on the next callis).
            if this.callis.is_some()
                && (this.session.must_abandon()
                    || (this.session.is_closing()
                        && this.callis.as_ref().is_some_and(CallisIo::is_drained)))
            {
                this.drop_stream();
                progressed = true;
            }
            if this.shutting_down && this.callis.is_none() {
                this.finish();
                return Poll::Ready(());
            }
            progressed |= this.poll_timer(cx);
            if !progressed && this.retire_timer.poll(cx, this.retire_at()) {
                if this.retire() {
                    this.finish();
                    return Poll::Ready(());
                }
                progressed = true;
            }
            if !progressed {
                this.counts.publish(&this.ctx.recorder, &this.cells);
                this.publish_cells();
                return Poll::Pending;
            }
        }
        // Plenty of work: let other tasks run, then continue.
        this.counts.publish(&this.ctx.recorder, &this.cells);
        yield_turn(cx);
        Poll::Pending
    }
}
