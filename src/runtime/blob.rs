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

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::AsyncWrite;
use tokio::sync::{mpsc, oneshot};
use tokio::time::{Instant, Sleep};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use super::ends::{BlobCommand, Piece, Reservation, SenderShared};
use super::{jitter, yield_turn};
use crate::a0_transport::{AuthenticatedStream, DomusAddr, DomusId, Transport};
use crate::a1_callis::blob::{BlobConfig, BlobEvent, BlobStreams};
use crate::a1_callis::frame::{self, BlobFrame, Frame, PROTOCOL_VERSION};
use crate::error::{Error, ErrorId};
use crate::reporting::{C, CallisKind, PeerCells, Recorder};

/// What a blob driver needs from its domus.
pub(crate) struct BlobContext {
    pub(crate) transport: Transport,
    pub(crate) local_id: DomusId,
    pub(crate) local_epoch: u64,
    pub(crate) config: BlobConfig,
    pub(crate) reconnect_backoff_min: Duration,
    pub(crate) reconnect_backoff_max: Duration,
    pub(crate) recorder: Arc<Recorder>,
}

type DialFuture = Pin<Box<dyn Future<Output = Result<AuthenticatedStream, Error>> + Send>>;

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
    io: AuthenticatedStream,
    recv: BytesMut,
    wbuf: BytesMut,
    wpos: usize,
    flushed: bool,
    /// The peer's BLOB_HELLO has been checked: streams may use this callis.
    open: bool,
    /// A CLOSE is queued: drop the callis once it is written.
    closing: bool,
}

/// One peer's blob task. Poll it to completion (`tokio::spawn`).
pub(crate) struct BlobDriver {
    peer_id: DomusId,
    addr: Option<DomusAddr>,
    ctx: Arc<BlobContext>,
    commands: mpsc::UnboundedReceiver<BlobCommand>,
    streams: BlobStreams,
    outs: HashMap<u64, OutEnd>,
    ins: HashMap<u64, InEnd>,
    link: Option<Link>,
    dial: Option<DialFuture>,
    backoff: Option<Pin<Box<Sleep>>>,
    backoff_next: Duration,
    peer_epoch: Option<u64>,
    timer: Pin<Box<Sleep>>,
    timer_at: Option<Instant>,
    /// Runs while an open callis carries no stream; closes it when it fires.
    idle_timer: Option<Pin<Box<Sleep>>>,
    shutting_down: bool,
    cancelled: Pin<Box<WaitForCancellationFutureOwned>>,
    cells: Arc<PeerCells>,
}

fn now() -> std::time::Instant {
    Instant::now().into_std()
}

fn closed() -> Error {
    Error::new(ErrorId::DomusClosed, "the domus has been shut down")
}

impl BlobDriver {
    pub(crate) fn new(
        peer_id: DomusId,
        addr: Option<DomusAddr>,
        ctx: Arc<BlobContext>,
        commands: mpsc::UnboundedReceiver<BlobCommand>,
        cancel: CancellationToken,
        cells: Arc<PeerCells>,
    ) -> Self {
        Self {
            peer_id,
            addr,
            streams: BlobStreams::new(ctx.config.clone()),
            backoff_next: ctx.reconnect_backoff_min,
            ctx,
            commands,
            outs: HashMap::new(),
            ins: HashMap::new(),
            link: None,
            dial: None,
            backoff: None,
            peer_epoch: None,
            timer: Box::pin(tokio::time::sleep_until(Instant::now())),
            timer_at: None,
            idle_timer: None,
            shutting_down: false,
            cancelled: Box::pin(cancel.cancelled_owned()),
            cells,
        }
    }

    fn stream_opened(&self) {
        self.ctx.recorder.inc(C::blob_streams_opened);
        self.ctx.recorder.blob_stream(true);
    }

    fn stream_ended(&self, completed: bool) {
        self.ctx.recorder.inc(if completed {
            C::blob_streams_completed
        } else {
            C::blob_streams_cancelled
        });
        self.ctx.recorder.blob_stream(false);
    }

    /// Forgets the callis (reporting it down if it had opened).
    fn take_link(&mut self) -> Option<Link> {
        let link = self.link.take();
        if link.as_ref().is_some_and(|l| l.open) {
            self.ctx
                .recorder
                .callis(CallisKind::Blob, &self.peer_id, false);
        }
        link
    }

    fn handle_command(&mut self, cmd: BlobCommand) {
        match cmd {
            BlobCommand::OpenOutbound {
                stream,
                sender,
                reservation,
            } => {
                if self.shutting_down {
                    sender.fail(closed());
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
                    let _ = app.send(Piece::Failed(closed()));
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
            BlobCommand::SetAddr(addr) => {
                // As the peer driver does: a dial to the old address is abandoned, a backoff
                // cut short (maybe_dial dials the new address on this turn).
                if self.addr.as_ref() != Some(&addr) {
                    self.addr = Some(addr);
                    self.dial = None;
                    self.backoff = None;
                    self.backoff_next = self.ctx.reconnect_backoff_min;
                }
            }
            BlobCommand::Recheck => {
                let refused = self
                    .link
                    .as_ref()
                    .and_then(|l| l.io.recheck(&self.ctx.transport).err());
                if let Some(e) = refused {
                    let e = Error::new(
                        e.id(),
                        format!("{} is no longer trusted: {}", self.peer_id, e.message()),
                    );
                    self.close_link(&e);
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
        self.dial = None;
        self.backoff = None;
        let ids: Vec<u64> = self.outs.keys().chain(self.ins.keys()).copied().collect();
        for stream in ids {
            self.streams
                .cancel(stream, ErrorId::DomusClosed, "the peer is shutting down");
            self.fail_end(stream, closed());
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

    fn dialer_of<'a>(&'a self, io: &AuthenticatedStream) -> &'a DomusId {
        if io.is_dialer() {
            &self.ctx.local_id
        } else {
            &self.peer_id
        }
    }

    /// Adopts a new blob callis (same tie-break as the primary: when both sides dialled at
    /// once, the one dialled by the smaller id survives).
    fn attach(&mut self, io: AuthenticatedStream, prefix: BytesMut) {
        // The bytes the accept path read to tell the callis's kind were read from it.
        self.ctx.recorder.add(C::blob_bytes_in, prefix.len() as u64);
        self.cells
            .bytes_in
            .fetch_add(prefix.len() as u64, Ordering::Relaxed);
        if self.shutting_down {
            return;
        }
        if let Some(current) = &self.link {
            let keep_current = {
                let current_dialer = self.dialer_of(&current.io);
                let new_dialer = self.dialer_of(&io);
                current_dialer != new_dialer && current_dialer < new_dialer
            };
            if keep_current {
                return;
            }
            self.drop_link();
        }
        let mut wbuf = BytesMut::with_capacity(2 * TURN_BYTES);
        let max_chunk = u32::try_from(self.ctx.config.chunk_len).unwrap_or(u32::MAX);
        frame::encode_blob_hello(&mut wbuf, PROTOCOL_VERSION, self.ctx.local_epoch, max_chunk);
        self.backoff = None;
        self.link = Some(Link {
            io,
            recv: prefix,
            wbuf,
            wpos: 0,
            flushed: false,
            open: false,
            closing: false,
        });
        // The peer's BLOB_HELLO (and maybe more) may already be here.
        self.handle_input();
    }

    fn drop_link(&mut self) {
        if self.take_link().is_some() {
            self.streams.disconnected();
        }
    }

    /// Queues a CLOSE and stops using the callis; it is dropped once the CLOSE is written.
    fn close_link(&mut self, error: &Error) {
        tracing::debug!(peer = %self.peer_id, error = %error, "closing blob callis");
        if error.id() == ErrorId::ProtocolViolation || error.id() == ErrorId::UnsupportedVersion {
            self.ctx.recorder.protocol_violation(&self.peer_id, error);
        }
        if let Some(link) = self.link.as_mut() {
            if !link.closing {
                link.closing = true;
                frame::encode_close(&mut link.wbuf, error.id().as_u32(), error.message());
                link.flushed = false;
            }
        }
        self.streams.disconnected();
    }

    fn maybe_dial(&mut self) {
        if self.shutting_down
            || self.link.is_some()
            || self.dial.is_some()
            || self.backoff.is_some()
            || self.peer_epoch.is_none()
            || !self.streams.has_outbound()
        {
            return;
        }
        let Some(addr) = self.addr.clone() else {
            return;
        };
        let transport = self.ctx.transport.clone();
        let expected = self.peer_id.clone();
        self.ctx.recorder.inc(C::dial_attempts);
        self.dial = Some(Box::pin(async move {
            transport.dial(&addr, Some(&expected)).await
        }));
    }

    fn dial_failed(&mut self, error: &Error) {
        tracing::debug!(peer = %self.peer_id, error = %error, "blob callis dial failed");
        self.ctx.recorder.inc(C::dial_failures);
        self.backoff = Some(Box::pin(tokio::time::sleep(jitter(self.backoff_next))));
        self.backoff_next = self
            .backoff_next
            .saturating_mul(2)
            .min(self.ctx.reconnect_backoff_max);
    }

    /// Decodes what the callis has read and hands it to the streams.
    fn handle_input(&mut self) {
        let max = u32::try_from(
            self.ctx
                .config
                .chunk_len
                .saturating_add(frame::BLOB_DATA_FIXED_LEN),
        )
        .unwrap_or(u32::MAX);
        loop {
            let Some(link) = self.link.as_mut() else {
                return;
            };
            if link.closing {
                return;
            }
            let decoded = frame::decode(&mut link.recv, max);
            let frame = match decoded {
                Ok(Some(f)) => f,
                Ok(None) => return,
                Err(e) => {
                    let e = Error::new(
                        ErrorId::ProtocolViolation,
                        format!("corrupt blob callis: {e}"),
                    );
                    self.close_link(&e);
                    return;
                }
            };
            if !link.open {
                match frame {
                    Frame::Blob(BlobFrame::Hello {
                        version,
                        epoch,
                        max_chunk,
                    }) => {
                        if version != PROTOCOL_VERSION {
                            let e = Error::new(
                                ErrorId::UnsupportedVersion,
                                format!(
                                    "blob callis speaks version {version}, we speak {PROTOCOL_VERSION}"
                                ),
                            );
                            self.close_link(&e);
                            return;
                        }
                        link.open = true;
                        self.ctx
                            .recorder
                            .callis(CallisKind::Blob, &self.peer_id, true);
                        if self.peer_epoch.is_some_and(|known| known != epoch) {
                            // A freshly authenticated callis from the same identity in another
                            // run: the peer restarted (the old run cannot answer a new dial), so
                            // streams of the old run are lost.
                            self.fail_all(Error::new(
                                ErrorId::PeerRestarted,
                                format!("{} restarted; its blob streams are lost", self.peer_id),
                            ));
                        }
                        self.peer_epoch = Some(epoch);
                        self.backoff_next = self.ctx.reconnect_backoff_min;
                        self.streams.set_peer_chunk(max_chunk as usize);
                        self.streams.connected();
                    }
                    other => {
                        let e = Error::new(
                            ErrorId::ProtocolViolation,
                            format!(
                                "the first frame on a blob callis was {other:?}, not BLOB_HELLO"
                            ),
                        );
                        self.close_link(&e);
                        return;
                    }
                }
                continue;
            }
            match frame {
                Frame::Blob(f) => self.streams.handle_frame(now(), f),
                Frame::Close { code, reason } => {
                    tracing::debug!(peer = %self.peer_id, code, reason = %crate::error::untrusted(&reason), "peer closed the blob callis");
                    self.drop_link();
                    return;
                }
                Frame::Skipped(_) => {}
                other => {
                    let e = Error::new(
                        ErrorId::ProtocolViolation,
                        format!("{:?} on the blob callis", frame_name(&other)),
                    );
                    self.close_link(&e);
                    return;
                }
            }
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

    /// Reads at most [`TURN_BYTES`] from the callis; returns (progressed, alive, whether the
    /// turn's budget ran out with more perhaps waiting).
    fn poll_read(&mut self, cx: &mut Context<'_>) -> (bool, bool, bool) {
        let Some(link) = self.link.as_mut() else {
            return (false, true, false);
        };
        let mut read = 0usize;
        let mut progressed = false;
        while read < TURN_BYTES {
            if link.recv.capacity().saturating_sub(link.recv.len()) < 16 * 1024 {
                link.recv.reserve(READ_RESERVE);
            }
            let mut room = bytes::BufMut::limit(&mut link.recv, TURN_BYTES.saturating_sub(read));
            match tokio_util::io::poll_read_buf(Pin::new(&mut link.io), cx, &mut room) {
                Poll::Ready(Ok(0)) => return (true, false, false),
                Poll::Ready(Ok(n)) => {
                    read = read.saturating_add(n);
                    progressed = true;
                    self.ctx.recorder.add(C::blob_bytes_in, n as u64);
                    self.cells.bytes_in.fetch_add(n as u64, Ordering::Relaxed);
                }
                Poll::Ready(Err(e)) => {
                    tracing::debug!(peer = %self.peer_id, error = %e, "blob callis read failed");
                    return (true, false, false);
                }
                Poll::Pending => return (progressed, true, false),
            }
        }
        (progressed, true, true)
    }

    /// Writes at most [`TURN_BYTES`] of what the streams have ready; returns (progressed,
    /// alive, whether the turn's budget ran out with more perhaps waiting).
    fn poll_write(&mut self, cx: &mut Context<'_>) -> (bool, bool, bool) {
        let Some(link) = self.link.as_mut() else {
            return (false, true, false);
        };
        let mut progressed = false;
        let mut written = 0usize;
        let mut saturated = false;
        loop {
            if written >= TURN_BYTES {
                saturated = true;
                break;
            }
            if link.wpos >= link.wbuf.len() {
                link.wbuf.clear();
                link.wpos = 0;
                if link.closing
                    || !link.open
                    || !self.streams.poll_transmit(&mut link.wbuf, TURN_BYTES)
                {
                    break;
                }
                link.flushed = false;
            }
            let end = link
                .wbuf
                .len()
                .min(link.wpos.saturating_add(TURN_BYTES.saturating_sub(written)));
            let Some(chunk) = link.wbuf.get(link.wpos..end) else {
                break;
            };
            match Pin::new(&mut link.io).poll_write(cx, chunk) {
                Poll::Ready(Ok(0)) => return (true, false, false),
                Poll::Ready(Ok(n)) => {
                    link.wpos = link.wpos.saturating_add(n);
                    written = written.saturating_add(n);
                    progressed = true;
                    self.ctx.recorder.add(C::blob_bytes_out, n as u64);
                    self.cells.bytes_out.fetch_add(n as u64, Ordering::Relaxed);
                }
                Poll::Ready(Err(e)) => {
                    tracing::debug!(peer = %self.peer_id, error = %e, "blob callis write failed");
                    return (true, false, false);
                }
                Poll::Pending => return (progressed, true, false),
            }
        }
        if !link.flushed {
            match Pin::new(&mut link.io).poll_flush(cx) {
                Poll::Ready(Ok(())) => link.flushed = true,
                Poll::Ready(Err(_)) => return (true, false, false),
                Poll::Pending => {}
            }
        }
        (progressed, true, saturated)
    }

    /// Closes an open callis that has carried no stream for `blob_idle_timeout`.
    fn poll_idle(&mut self, cx: &mut Context<'_>) -> bool {
        let idle = self.link.as_ref().is_some_and(|l| l.open && !l.closing)
            && self.streams.open_streams() == 0
            && self.outs.is_empty()
            && self.ins.is_empty();
        if !idle {
            self.idle_timer = None;
            return false;
        }
        let after = self.ctx.config.idle_timeout;
        let timer = self
            .idle_timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(after)));
        if timer.as_mut().poll(cx).is_pending() {
            return false;
        }
        self.idle_timer = None;
        self.close_link(&Error::new(
            ErrorId::ConnectionLost,
            "the blob callis carried no stream for blob_idle_timeout",
        ));
        true
    }

    fn poll_timer(&mut self, cx: &mut Context<'_>) -> bool {
        let wanted = self.streams.poll_timeout().map(Instant::from_std);
        if wanted != self.timer_at {
            self.timer_at = wanted;
            if let Some(at) = wanted {
                self.timer.as_mut().reset(at);
            }
        }
        if self.timer_at.is_some() && self.timer.as_mut().poll(cx).is_ready() {
            self.timer_at = None;
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
        self.streams.fail_all(&closed());
        self.dispatch_events();
        let ids: Vec<u64> = self.outs.keys().chain(self.ins.keys()).copied().collect();
        for stream in ids {
            self.fail_end(stream, closed());
        }
    }
}

fn frame_name(f: &Frame) -> &'static str {
    match f {
        Frame::Hello(_) => "HELLO",
        Frame::Ping(_) => "PING",
        Frame::Pong(_) => "PONG",
        Frame::Close { .. } => "CLOSE",
        Frame::Message(_) => "MESSAGE",
        Frame::Accepted(_) => "ACCEPTED",
        Frame::Reply { .. } => "REPLY",
        Frame::Reject(_) => "REJECT",
        Frame::Blob(_) => "a blob frame",
        _ => "an unexpected frame",
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
            if let Some(b) = this.backoff.as_mut() {
                if b.as_mut().poll(cx).is_ready() {
                    this.backoff = None;
                    progressed = true;
                }
            }
            this.maybe_dial();
            if let Some(d) = this.dial.as_mut() {
                if let Poll::Ready(result) = d.as_mut().poll(cx) {
                    this.dial = None;
                    progressed = true;
                    match result {
                        Ok(io) => this.attach(io, BytesMut::new()),
                        Err(e) => this.dial_failed(&e),
                    }
                }
            }
            let (p, alive, read_full) = this.poll_read(cx);
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
            let (p, alive, write_full) = this.poll_write(cx);
            progressed |= p;
            if !alive {
                this.drop_link();
            }
            this.dispatch_events();
            if let Some(link) = &this.link {
                if link.closing && link.wpos >= link.wbuf.len() && link.flushed {
                    this.take_link();
                    progressed = true;
                }
            }
            if this.shutting_down {
                let idle = this
                    .link
                    .as_ref()
                    .is_none_or(|l| !l.open || (l.wpos >= l.wbuf.len() && l.flushed));
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
            if !progressed {
                return Poll::Pending;
            }
        }
        yield_turn(cx);
        Poll::Pending
    }
}
