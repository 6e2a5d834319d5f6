//! The blob driver: the one task that owns a peer's [`BlobStreams`] and its blob callis.
//!
//! Blobs travel on their own callis so a bulk transfer never sits in front of a message. The
//! side with bytes to send dials it (once the primary callis has told us the peer's epoch);
//! both ends start with BLOB_HELLO (version, epoch, largest chunk accepted). A BLOB_HELLO
//! from another run of the peer than the one we knew means it restarted: the streams of the
//! old run fail with `PeerRestarted`. When the callis drops, every
//! stream stays open and the driver dials again; unacknowledged bytes are then sent again.
//!
//! Each wake-up the driver takes commands (new streams, bytes from senders, consumption from
//! receivers, cancels), reads frames into the streams, fires their idle timers, hands events
//! to the application's ends (bytes to receivers, window back to senders, completion, errors)
//! and writes what the streams have ready — at most [`TURN_BYTES`] each way per turn so a
//! wake-up stays short. A peer that breaks the blob protocol gets a CLOSE with a reason and
//! loses that callis; the stream it named fails.
//!
//! A blob callis that carries no stream for `blob_idle_timeout` is closed (either side may);
//! the next blob dials a new one. So an idle peer holds no blob socket, a half-open one is not
//! kept forever, and blob calles pick up rotated certificates.
//!
//! It holds no lock, and every wait it makes is a socket, a channel or a timer.
//!
//! This file holds the driver's state, the commands from the application's ends, the
//! streams' events and the turn; `link.rs` its callis (attach, dial, decode, read, write,
//! close, idle).

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::BytesMut;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Sleep;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use super::callis::{Alarm, ByteCounters, CallisIo, Counting, Dialer, now};
use super::ends::{BlobCommand, Piece, Reservation, SenderShared};
use super::peer::DriverHost;
use super::{domus_closed, yield_turn};
use crate::a0_transport::{DomusAddr, DomusId, Transport};
use crate::a1_callis::blob::{BlobConfig, BlobEvent, BlobStreams};
use crate::a1_callis::link::{Backoff, WriteWatch};
use crate::error::{Error, ErrorId};
use crate::reporting::{CallisKind, Counter, PeerCells, Recorder};

mod link;

/// What a blob driver needs from its domus.
pub(crate) struct BlobContext {
    pub(crate) transport: Transport,
    pub(crate) local_id: DomusId,
    pub(crate) local_epoch: u64,
    pub(crate) reconnect_backoff_min: Duration,
    pub(crate) reconnect_backoff_max: Duration,
    pub(crate) recorder: Arc<Recorder>,
}

/// Bytes read, and bytes written, per turn (one poll). Small turns keep the worker thread
/// free for other tasks — above all the primary callis of the same peer, whose messages must
/// not wait behind a bulk transfer's encryption.
const TURN_BYTES: usize = 64 * 1024;
/// Read buffer growth step.
const READ_RESERVE: usize = 128 * 1024;
/// Commands taken per turn.
const COMMAND_BUDGET: usize = 1024;

struct OutEnd {
    shared: Arc<SenderShared>,
    released: u64,
    done: Option<oneshot::Sender<Result<(), Error>>>,
    _reservation: Reservation,
}

struct InEnd {
    app: mpsc::UnboundedSender<Piece>,
    reservation: Option<Reservation>,
}

struct Link {
    io: CallisIo,
    recv: BytesMut,
    /// The peer's BLOB_HELLO has been checked: streams may use this callis.
    open: bool,
    /// A CLOSE is queued: drop the callis once it is written.
    closing: bool,
    /// Whether writes move (T33): a peer that reads nothing loses the callis, and a CLOSE
    /// that cannot be written in time is given up.
    writes: WriteWatch,
}

/// One peer's blob task. Poll it to completion (the domus spawns it on its task tracker).
pub(crate) struct BlobDriver {
    peer_id: DomusId,
    ctx: Arc<BlobContext>,
    commands: mpsc::UnboundedReceiver<BlobCommand>,
    /// This peer's blob limits.
    config: BlobConfig,
    streams: BlobStreams,
    outs: HashMap<u64, OutEnd>,
    ins: HashMap<u64, InEnd>,
    link: Option<Link>,
    dialer: Dialer,
    peer_epoch: Option<u64>,
    /// Follows the streams' `poll_timeout`.
    timer: Alarm,
    /// Runs while an open callis carries no stream; closes it when it fires.
    idle_timer: Option<Pin<Box<Sleep>>>,
    /// Follows the callis's write deadline (its [`WriteWatch`]).
    write_timer: Alarm,
    shutting_down: bool,
    cancelled: Pin<Box<WaitForCancellationFutureOwned>>,
    /// Where the blob callis's bytes are counted.
    counting: Counting,
    /// Whether a callis or a stream is open (the peer driver reads it before forgetting the
    /// peer).
    active: Arc<std::sync::atomic::AtomicBool>,
    /// The peer was forgotten while this driver was idle: stop.
    retired: bool,
    /// Where a callis that arrives as this driver retires goes instead.
    host: Arc<dyn DriverHost>,
}

/// What a blob driver shares with its peer's driver and its domus.
pub(crate) struct BlobLinks {
    /// This peer's blob limits, read from the domus's config when the peer was first
    /// contacted (so `max_frames_per_second` applies to new peers, as on the primary callis).
    pub(crate) config: BlobConfig,
    /// Where the blob callis's bytes are counted.
    pub(crate) cells: Arc<PeerCells>,
    /// Whether a callis or a stream is open (the peer driver reads it before retiring).
    pub(crate) active: Arc<std::sync::atomic::AtomicBool>,
    /// Where a callis that arrives as the driver retires goes instead.
    pub(crate) host: Arc<dyn DriverHost>,
}

impl BlobDriver {
    pub(crate) fn new(
        peer_id: DomusId,
        addr: Option<DomusAddr>,
        ctx: Arc<BlobContext>,
        commands: mpsc::UnboundedReceiver<BlobCommand>,
        cancel: CancellationToken,
        BlobLinks {
            config,
            cells,
            active,
            host,
        }: BlobLinks,
    ) -> Self {
        let dialer = Dialer::new(
            peer_id.clone(),
            addr,
            ctx.transport.clone(),
            ctx.recorder.clone(),
            Backoff::new(ctx.reconnect_backoff_min, ctx.reconnect_backoff_max),
        );
        let counting = Counting {
            recorder: ctx.recorder.clone(),
            cells,
            counters: ByteCounters {
                bytes_in: Counter::blob_bytes_in,
                bytes_out: Counter::blob_bytes_out,
            },
        };
        Self {
            peer_id,
            streams: BlobStreams::new(config.clone()),
            config,
            ctx,
            commands,
            outs: HashMap::new(),
            ins: HashMap::new(),
            link: None,
            dialer,
            peer_epoch: None,
            timer: Alarm::new(),
            idle_timer: None,
            write_timer: Alarm::new(),
            shutting_down: false,
            cancelled: Box::pin(cancel.cancelled_owned()),
            counting,
            active,
            retired: false,
            host,
        }
    }

    /// Whether a callis, a dial or a stream is open.
    fn is_active(&self) -> bool {
        self.link.is_some()
            || !self.dialer.is_idle()
            || !self.outs.is_empty()
            || !self.ins.is_empty()
    }

    fn stream_opened(&self) {
        self.ctx.recorder.inc(Counter::blob_streams_opened);
        self.ctx.recorder.blob_stream(true);
    }

    fn stream_ended(&self, completed: bool) {
        self.ctx.recorder.inc(if completed {
            Counter::blob_streams_completed
        } else {
            Counter::blob_streams_cancelled
        });
        self.ctx.recorder.blob_stream(false);
    }

    fn handle_command(&mut self, cmd: BlobCommand) {
        match cmd {
            BlobCommand::OpenOutbound {
                stream,
                sender,
                reservation,
            } => {
                if self.shutting_down {
                    sender.fail(domus_closed());
                    return;
                }
                match self.streams.open_outbound(now(), stream) {
                    Ok(()) => {
                        self.stream_opened();
                        self.outs.insert(
                            stream,
                            OutEnd {
                                shared: sender,
                                released: 0,
                                done: None,
                                _reservation: reservation,
                            },
                        );
                    }
                    Err(e) => sender.fail(e),
                }
            }
            BlobCommand::OpenInbound {
                stream,
                app,
                reservation,
            } => {
                if self.shutting_down {
                    let _ = app.send(Piece::Failed(domus_closed()));
                    return;
                }
                match self.streams.open_inbound(now(), stream) {
                    Ok(()) => {
                        self.stream_opened();
                        self.ins.insert(
                            stream,
                            InEnd {
                                app,
                                reservation: Some(reservation),
                            },
                        );
                    }
                    Err(e) => {
                        let _ = app.send(Piece::Failed(e));
                    }
                }
            }
            BlobCommand::Write { stream, data } => {
                let len = data.len();
                match self.streams.write(now(), stream, &data) {
                    Ok(n) if n == len => {}
                    Ok(_) => {
                        // The sender's permits make this impossible; fail loudly, not silently.
                        let e = Error::new(
                            ErrorId::BlobBufferFull,
                            format!("blob stream {stream} was handed more than its window"),
                        );
                        self.streams
                            .cancel(stream, ErrorId::BlobBufferFull, e.message());
                        self.fail_end(stream, e);
                    }
                    // The stream already ended; its sender has been told.
                    Err(_) => {}
                }
            }
            BlobCommand::Finish { stream, done } => {
                if let Err(e) = self.streams.finish(stream) {
                    let e = self
                        .outs
                        .get(&stream)
                        .and_then(|o| o.shared.error())
                        .unwrap_or(e);
                    let _ = done.send(Err(e));
                } else if let Some(out) = self.outs.get_mut(&stream) {
                    out.done = Some(done);
                }
            }
            BlobCommand::Consumed { stream, n } => self.streams.consume(now(), stream, n),
            BlobCommand::Cancel { stream, reason } => {
                self.streams.cancel(stream, ErrorId::BlobCancelled, &reason);
                if let Some(out) = self.outs.remove(&stream) {
                    self.stream_ended(false);
                    let e = Error::new(
                        ErrorId::BlobCancelled,
                        format!("blob stream {stream} was cancelled: {reason}"),
                    );
                    out.shared.fail(e.clone());
                    if let Some(done) = out.done {
                        let _ = done.send(Err(e));
                    }
                }
                if self.ins.remove(&stream).is_some() {
                    self.stream_ended(false);
                }
            }
            BlobCommand::Attach { io, prefix } => self.attach(*io, prefix),
            BlobCommand::PeerEpoch { epoch, restarted } => {
                let changed = self.peer_epoch.is_some_and(|old| old != epoch);
                if changed || restarted {
                    self.fail_all(Error::new(
                        ErrorId::PeerRestarted,
                        format!("{} restarted; its blob streams are lost", self.peer_id),
                    ));
                    self.drop_link();
                }
                self.peer_epoch = Some(epoch);
            }
            BlobCommand::Retire => {
                // Only an idle driver stops: one that took a stream meanwhile serves it.
                if !self.is_active() {
                    self.retired = true;
                    // Nothing more comes in; a callis handed over just before goes to the
                    // peer's next blob driver (the rest concerns no stream of this one).
                    self.commands.close();
                    while let Ok(cmd) = self.commands.try_recv() {
                        if let BlobCommand::Attach { io, prefix } = cmd {
                            self.host.attach_again(*io, CallisKind::Blob, prefix);
                        }
                    }
                }
            }
            BlobCommand::SetAddr(addr) => {
                // A dial to the old address is abandoned and started again at the new one.
                self.dialer.set_addr(addr);
            }
            BlobCommand::Recheck => {
                let refused = self
                    .link
                    .as_ref()
                    .and_then(|l| l.io.stream().recheck(&self.ctx.transport).err());
                if let Some(e) = refused {
                    let e = Error::new(
                        e.id(),
                        format!("{} is no longer trusted: {}", self.peer_id, e.message()),
                    );
                    self.close_link(&e);
                }
            }
            BlobCommand::Disconnect => {
                if self.link.is_some() {
                    self.close_link(&Error::new(
                        ErrorId::ConnectionLost,
                        "the application closed the callis (Domus::disconnect)",
                    ));
                }
            }
            BlobCommand::Shutdown => self.begin_shutdown(),
        }
    }

    fn begin_shutdown(&mut self) {
        if self.shutting_down {
            return;
        }
        self.shutting_down = true;
        self.dialer.stop();
        let ids: Vec<u64> = self.outs.keys().chain(self.ins.keys()).copied().collect();
        for stream in ids {
            self.streams
                .cancel(stream, ErrorId::DomusClosed, "the peer is shutting down");
            self.fail_end(stream, domus_closed());
        }
    }

    fn fail_all(&mut self, error: Error) {
        self.streams.fail_all(&error);
        // fail_all reports every stream as Cancelled; dispatch tells their ends.
        self.dispatch_events();
    }

    /// Tells a stream's local end that it failed, and forgets the end.
    fn fail_end(&mut self, stream: u64, error: Error) {
        if let Some(out) = self.outs.remove(&stream) {
            self.stream_ended(false);
            out.shared.fail(error.clone());
            if let Some(done) = out.done {
                let _ = done.send(Err(error.clone()));
            }
        }
        if let Some(inb) = self.ins.remove(&stream) {
            self.stream_ended(false);
            let _ = inb.app.send(Piece::Failed(error));
        }
    }

    fn dispatch_events(&mut self) {
        while let Some(event) = self.streams.poll_event() {
            match event {
                BlobEvent::Writable(stream) => {
                    if let (Some(acked), Some(out)) =
                        (self.streams.acked(stream), self.outs.get_mut(&stream))
                    {
                        out.shared.release(acked.saturating_sub(out.released));
                        out.released = out.released.max(acked);
                    }
                }
                BlobEvent::Readable(stream) => self.hand_over(stream),
                BlobEvent::Finished(stream) => {
                    if let Some(out) = self.outs.remove(&stream) {
                        self.stream_ended(true);
                        if let Some(done) = out.done {
                            let _ = done.send(Ok(()));
                        }
                    }
                }
                BlobEvent::Cancelled { stream, error } => self.fail_end(stream, error),
                BlobEvent::Violation { stream, error } => {
                    if let Some(stream) = stream {
                        self.streams
                            .cancel(stream, ErrorId::ProtocolViolation, error.message());
                        self.fail_end(stream, error.clone());
                    }
                    self.close_link(&error);
                }
            }
        }
    }

    /// Moves a receiving stream's bytes to its application end; ends it once drained.
    fn hand_over(&mut self, stream: u64) {
        let Some(inb) = self.ins.get_mut(&stream) else {
            return;
        };
        while let Ok(Some(chunk)) = self.streams.take(stream) {
            let _ = inb.app.send(Piece::Data(chunk));
        }
        if self.streams.is_drained(stream) {
            let _ = inb.app.send(Piece::End(inb.reservation.take()));
            self.streams.close_inbound(stream);
            self.ins.remove(&stream);
            self.stream_ended(true);
        }
    }

    fn poll_timer(&mut self, cx: &mut Context<'_>) -> bool {
        if self.timer.poll(cx, self.streams.poll_timeout()) {
            self.streams.handle_timeout(now());
            return true;
        }
        false
    }

    /// Takes queued commands; false when every sender is gone.
    fn poll_commands(&mut self, cx: &mut Context<'_>) -> (bool, bool) {
        let mut progressed = false;
        for _ in 0..COMMAND_BUDGET {
            match self.commands.poll_recv(cx) {
                Poll::Ready(Some(cmd)) => {
                    self.handle_command(cmd);
                    progressed = true;
                }
                Poll::Ready(None) => return (progressed, false),
                Poll::Pending => break,
            }
        }
        (progressed, true)
    }

    fn finish(&mut self) {
        self.streams.fail_all(&domus_closed());
        self.dispatch_events();
        let ids: Vec<u64> = self.outs.keys().chain(self.ins.keys()).copied().collect();
        for stream in ids {
            self.fail_end(stream, domus_closed());
        }
    }
}

impl Future for BlobDriver {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        if this.cancelled.as_mut().poll(cx).is_ready() {
            this.finish();
            return Poll::Ready(());
        }
        for _ in 0..4 {
            let mut progressed = false;
            let (p, alive) = this.poll_commands(cx);
            progressed |= p;
            if !alive {
                this.finish();
                return Poll::Ready(());
            }
            progressed |= this.dialer.poll_wait(cx);
            this.maybe_dial();
            if let Poll::Ready(result) = this.dialer.poll_dial(cx) {
                progressed = true;
                match result {
                    Ok(io) => this.attach(io, BytesMut::new()),
                    Err(e) => {
                        tracing::debug!(peer = %this.peer_id, error = %e, "blob callis dial failed");
                    }
                }
            }
            let read = this.poll_read(cx);
            let (p, alive, read_full) = (read.progressed, read.alive, read.full);
            progressed |= p;
            if p {
                // Commands queued before these bytes arrived (a stream opened by the primary
                // callis, say) must be seen before the bytes are.
                let (p, alive) = this.poll_commands(cx);
                progressed |= p;
                if !alive {
                    this.finish();
                    return Poll::Ready(());
                }
                this.handle_input();
            }
            if !alive {
                this.drop_link();
            }
            progressed |= this.poll_timer(cx);
            this.dispatch_events();
            let written = this.poll_write(cx);
            let (p, alive, write_full) = (written.progressed, written.alive, written.full);
            progressed |= p;
            if !alive {
                this.drop_link();
            }
            progressed |= this.watch_writes(cx, p);
            this.dispatch_events();
            if let Some(link) = &this.link
                && link.closing
                && link.io.is_drained()
            {
                this.take_link();
                progressed = true;
            }
            if this.shutting_down {
                let idle = this
                    .link
                    .as_ref()
                    .is_none_or(|l| !l.open || l.io.is_drained());
                if idle {
                    this.take_link();
                    this.finish();
                    return Poll::Ready(());
                }
            }
            progressed |= this.poll_timer(cx);
            progressed |= this.poll_idle(cx);
            if read_full || write_full {
                // A full turn: give the worker back, come back at once.
                break;
            }
            if this.retired {
                this.finish();
                return Poll::Ready(());
            }
            if !progressed {
                this.active
                    .store(this.is_active(), std::sync::atomic::Ordering::Release);
                return Poll::Pending;
            }
        }
        this.active
            .store(this.is_active(), std::sync::atomic::Ordering::Release);
        yield_turn(cx);
        Poll::Pending
    }
}
