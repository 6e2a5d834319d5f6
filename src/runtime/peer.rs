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
//!
//! This file holds the driver's state and its turn (queues, commands, reading, writing,
//! timers); `links.rs` the types it shares with the domus, `lifecycle.rs` its callis's life
//! (attach, dial, age, close, shutdown, retirement), `dispatch.rs` the session's events.

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
use super::callis::{Alarm, ByteCounters, CallisIo, Counting, Dialer, ReadSink, Step, now};
use super::completion::Completion;
use super::ends::BlobCommand;
use super::queue::WakeQueue;
use super::{Outcome, domus_closed, yield_turn};
use crate::a0_transport::{DomusAddr, DomusId, PeerIdentity};
use crate::a1_callis::link::{Backoff, CallisAge};
pub(crate) use crate::a1_callis::session::Outgoing;
use crate::a1_callis::session::{Session, SessionConfig};
use crate::error::{Error, ErrorId};
use crate::reporting::{Counter, PeerCells, Recorder, TurnCounts};

mod dispatch;
mod lifecycle;
mod links;

pub(crate) use links::{
    Deadline, DriverContext, DriverHost, Handover, PeerCommand, PeerLinks, QueuedAnswer,
    QueuedSend, Reachability, Retirement, SendBatch, SendCmd,
};

/// What the session keeps with each of our sends, handed back when it ends: the session is
/// the one table of messages in flight.
pub(crate) struct PendingSend {
    done: Completion,
    _permit: InFlight,
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
    sends: Arc<WakeQueue<Handover>>,
    send_buf: Vec<Handover>,
    answers: Arc<WakeQueue<QueuedAnswer>>,
    answer_buf: Vec<QueuedAnswer>,
    session: Session<PendingSend>,
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
    completed: Vec<(Completion, Outcome)>,
    /// The in-flight room of the sends that ended in this dispatch, given back in one step
    /// before their outcomes are handed out.
    released: InFlight,
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
                bytes_in: Counter::primary_bytes_in,
                bytes_out: Counter::primary_bytes_out,
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
            released: InFlight::none(&links.budget),
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
        let pending = PendingSend {
            done,
            _permit: permit,
            started_us: self.now_us,
        };
        match self.session.send_with_token(msg.stamp(self.now), pending) {
            Ok(_) => self.counts.sent(),
            Err((e, pending)) => pending.done.complete(Err(e)),
        }
    }

    /// Takes a window's batch into the session: each send gets its share of the batch's
    /// room and its ticket in the batch's ring.
    fn handle_batch(&mut self, batch: SendBatch) {
        let SendBatch {
            msgs,
            ring,
            first_ticket,
            mut permit,
        } = batch;
        let tickets = (0u64..).map(|k| first_ticket.wrapping_add(k));
        for (ticket, msg) in tickets.zip(msgs) {
            let permit = permit.split(msg.size());
            let done = Completion::slot(ring.clone(), ticket);
            self.handle_send(SendCmd { msg, done, permit });
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

    /// Takes every queued send and answer (one swap each); true when there were any.
    fn poll_queues(&mut self, cx: &mut Context<'_>) -> bool {
        let mut progressed = false;
        let mut sends = std::mem::take(&mut self.send_buf);
        self.sends.take_all(&mut sends, cx);
        if !sends.is_empty() {
            progressed = true;
            for handed in sends.drain(..) {
                match handed {
                    Handover::One(cmd) => self.handle_send(cmd),
                    Handover::Batch(batch) => self.handle_batch(batch),
                }
            }
        }
        self.send_buf = sends;
        let mut answers = std::mem::take(&mut self.answer_buf);
        self.answers.take_all(&mut answers, cx);
        if !answers.is_empty() {
            progressed = true;
            for QueuedAnswer { epoch, id, answer } in answers.drain(..) {
                self.session.answer(epoch, id, answer);
            }
        }
        self.answer_buf = answers;
        progressed
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
            .store(self.session.in_flight() as u64, Ordering::Relaxed);
        c.queue_depth
            .store(self.session.queued() as u64, Ordering::Relaxed);
        let rtt = self.session.rtt().map_or(0, |d| {
            u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1)
        });
        c.rtt_us.store(rtt, Ordering::Relaxed);
        let oldest = self.session.oldest_token().map_or(0, |p| p.started_us);
        c.oldest_pending_at_us.store(oldest, Ordering::Relaxed);
    }

    fn finish(&mut self) {
        // Nothing more comes in: queued sends fail (their senders see the domus closed),
        // queued answers have no callis left to go to.
        for handed in self.sends.close() {
            match handed {
                Handover::One(cmd) => cmd.done.complete(Err(domus_closed())),
                Handover::Batch(SendBatch {
                    msgs,
                    ring,
                    first_ticket,
                    ..
                }) => {
                    let tickets = (0u64..).map(|k| first_ticket.wrapping_add(k));
                    for (ticket, _) in tickets.zip(msgs) {
                        Completion::slot(ring.clone(), ticket).complete(Err(domus_closed()));
                    }
                }
            }
        }
        drop(self.answers.close());
        self.session.fail_all(domus_closed());
        self.dispatch_events();
    }
}

/// Read bytes go into the session, which decodes and handles them after every read; reading
/// stops for the turn once the session decided to close.
struct SessionInput<'a>(&'a mut Session<PendingSend>, std::time::Instant);

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
        ErrorId::SendTimeout => rec.inc(Counter::messages_timed_out),
        id if id.is_rejection() => rec.rejected(id),
        _ => rec.inc(Counter::messages_failed),
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
