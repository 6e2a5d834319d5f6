//! The application's ends of a blob stream: [`BlobSender`] (an `AsyncWrite`) and
//! [`BlobReceiver`] (an `AsyncRead` and a `Stream` of `Bytes`).
//!
//! Both ends talk to the peer's blob driver through commands (or, for a taberna on the same
//! domus, straight to each other). Memory is bounded on both sides by the stream's window: a
//! sender takes one permit per byte before handing bytes over and gets them back only when the
//! receiver acknowledges them; a receiver's queue only ever holds bytes the peer had credit for,
//! and credit follows what the application consumes.
//!
//! [`BlobCommand`] is what these ends (and the domus) ask of a peer's blob driver.
//!
//! This module must not block and must not hold a lock: every wait is a semaphore or a channel,
//! and every one of them ends when the stream fails (the driver closes the semaphore or sends
//! the failure).

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio_util::sync::PollSemaphore;

use crate::a0_transport::{AuthenticatedStream, DomusAddr, DomusId};
use crate::a1_callis::blob::{
    BLOB_OPEN_PREFIX_LEN, BLOB_OPEN_TYPE, encode_blob_open, stream_parity,
};
use crate::a1_callis::session::Outgoing;
use crate::error::{Error, ErrorId};

/// What the rest of the domus asks of a peer's blob driver.
pub(crate) enum BlobCommand {
    /// A blob-opening message is going out: open the sending stream (it sends nothing until
    /// the receiver's first credit).
    OpenOutbound {
        stream: u64,
        sender: Arc<SenderShared>,
        reservation: Reservation,
    },
    /// A blob-opening message arrived: open the receiving stream and grant one window.
    OpenInbound {
        stream: u64,
        app: mpsc::UnboundedSender<Piece>,
        reservation: Reservation,
    },
    /// Bytes a sender's window already allows.
    Write { stream: u64, data: Bytes },
    /// The sender wrote its last byte; `done` learns when the receiver holds them all.
    Finish {
        stream: u64,
        done: oneshot::Sender<Result<(), Error>>,
    },
    /// A receiver consumed `n` bytes.
    Consumed { stream: u64, n: u64 },
    /// The local end abandons the stream (either direction).
    Cancel { stream: u64, reason: String },
    /// An authenticated callis whose first frame was a BLOB_HELLO (already read into
    /// `prefix`).
    Attach {
        io: Box<AuthenticatedStream>,
        prefix: BytesMut,
    },
    /// The primary callis opened with a peer in run `epoch`.
    PeerEpoch { epoch: u64, restarted: bool },
    /// Learn (or change) the address to dial.
    SetAddr(DomusAddr),
    /// Close the blob callis (the application asked); streams resume on the next one.
    Disconnect,
    /// The authentication material changed: close the callis if its peer would be refused now.
    Recheck,
    /// Cancel every stream (telling the peer), close the callis and stop.
    Shutdown,
    /// The peer was forgotten (its primary driver found everything idle): stop if this
    /// driver is idle too.
    Retire,
}

/// What a blob driver hands a receiving application, in order.
pub(crate) enum Piece {
    /// The next bytes.
    Data(Bytes),
    /// Every byte has been handed over; the stream's reservation goes with the end.
    End(Option<Reservation>),
    /// The stream failed.
    Failed(Error),
}

/// A stream's share of the blob budgets: one stream slot of its peer and its window's bytes
/// of the domus-wide budget. Released on drop.
#[derive(Default)]
pub(crate) struct Reservation {
    pub(crate) _stream: Option<OwnedSemaphorePermit>,
    pub(crate) _bytes: Option<OwnedSemaphorePermit>,
}

/// State shared by a [`BlobSender`] and whatever drains it: the byte permits of its window
/// and its failure, once there is one.
pub(crate) struct SenderShared {
    room: Arc<Semaphore>,
    error: OnceLock<Error>,
}

impl SenderShared {
    pub(crate) fn new(window: usize) -> Arc<Self> {
        Arc::new(Self {
            room: Arc::new(Semaphore::new(window)),
            error: OnceLock::new(),
        })
    }

    /// Fails the stream: the next write (or the one waiting) returns `error`.
    pub(crate) fn fail(&self, error: Error) {
        let _ = self.error.set(error);
        self.room.close();
    }

    /// Gives `n` bytes of window back (the receiver acknowledged or consumed them).
    pub(crate) fn release(&self, n: u64) {
        if n > 0 && !self.room.is_closed() {
            let n = usize::try_from(n).unwrap_or(usize::MAX);
            self.room.add_permits(
                n.min(Semaphore::MAX_PERMITS.saturating_sub(self.room.available_permits())),
            );
        }
    }

    pub(crate) fn error(&self) -> Option<Error> {
        self.error.get().cloned()
    }
}

/// Where a sender's bytes go.
enum SendPath {
    /// To the peer's blob driver.
    Remote {
        tx: mpsc::UnboundedSender<BlobCommand>,
        stream: u64,
    },
    /// Straight to a receiver on the same domus.
    Local {
        tx: Option<mpsc::UnboundedSender<Piece>>,
        eof: Option<oneshot::Receiver<()>>,
    },
}

/// The sending end of a blob stream, from [`Domus::send_blob`](crate::Domus::send_blob).
///
/// Write with [`tokio::io::AsyncWriteExt`] (or [`write_bytes`](Self::write_bytes) to hand
/// over `Bytes` without a copy), then call [`finish`](Self::finish): it returns once the
/// receiver holds every byte. A write waits while the stream's window is full, that is while
/// the receiver has not acknowledged enough; it fails once the stream fails (the receiver
/// dropped its end, the peer restarted, no progress within `blob_idle_timeout`, …).
/// Dropping a sender before `finish` cancels the stream, and the receiver's next read fails
/// with [`ErrorId::BlobCancelled`]. `AsyncWrite::poll_shutdown` is `finish`.
pub struct BlobSender {
    shared: Arc<SenderShared>,
    room: PollSemaphore,
    path: SendPath,
    /// Largest piece handed over at once.
    chunk: usize,
    /// `finish` or `cancel` was called (or the stream ended): dropping does nothing more.
    done: bool,
    finishing: Option<Finishing>,
}

/// How a finishing sender learns that the receiver holds every byte.
enum Finishing {
    /// The blob driver answers once the peer's receiver acknowledged the end.
    Remote(oneshot::Receiver<Result<(), Error>>),
    /// A receiver on the same domus signals that it read the end (or is dropped before).
    Local(Option<oneshot::Receiver<()>>),
}

impl fmt::Debug for BlobSender {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("BlobSender");
        if let SendPath::Remote { stream, .. } = &self.path {
            d.field("stream", stream);
        } else {
            d.field("local", &true);
        }
        d.field("failed", &self.shared.error.get().is_some())
            .finish_non_exhaustive()
    }
}

fn closed() -> Error {
    Error::new(
        ErrorId::DomusClosed,
        "the domus was shut down while the blob stream was open",
    )
}

fn finished_already() -> Error {
    Error::new(
        ErrorId::BlobStreamNotFound,
        "the blob stream was already finished or cancelled",
    )
}

fn io_error(e: Error) -> std::io::Error {
    std::io::Error::other(e)
}

impl BlobSender {
    pub(crate) fn remote(
        shared: Arc<SenderShared>,
        tx: mpsc::UnboundedSender<BlobCommand>,
        stream: u64,
        chunk: usize,
    ) -> Self {
        Self {
            room: PollSemaphore::new(shared.room.clone()),
            shared,
            path: SendPath::Remote { tx, stream },
            chunk: chunk.max(1),
            done: false,
            finishing: None,
        }
    }

    pub(crate) fn local(
        shared: Arc<SenderShared>,
        tx: mpsc::UnboundedSender<Piece>,
        eof: oneshot::Receiver<()>,
        chunk: usize,
    ) -> Self {
        Self {
            room: PollSemaphore::new(shared.room.clone()),
            shared,
            path: SendPath::Local {
                tx: Some(tx),
                eof: Some(eof),
            },
            chunk: chunk.max(1),
            done: false,
            finishing: None,
        }
    }

    fn failure(&self) -> Error {
        self.shared.error().unwrap_or_else(closed)
    }

    /// Takes up to `want` bytes of window: at once if any is free, else waits for a chunk's
    /// worth.
    fn poll_room(&mut self, cx: &mut Context<'_>, want: usize) -> Poll<Result<usize, Error>> {
        if self.done {
            return Poll::Ready(Err(finished_already()));
        }
        if let Some(e) = self.shared.error() {
            return Poll::Ready(Err(e));
        }
        let free = self.shared.room.available_permits();
        if free > 0 {
            let n = u32::try_from(want.min(free)).unwrap_or(u32::MAX);
            if let Ok(permit) = self.shared.room.try_acquire_many(n) {
                permit.forget();
                return Poll::Ready(Ok(n as usize));
            }
        }
        let n = u32::try_from(want.min(self.chunk)).unwrap_or(u32::MAX);
        match self.room.poll_acquire_many(cx, n) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) => Poll::Ready(Err(self.failure())),
            Poll::Ready(Some(permit)) => {
                permit.forget();
                Poll::Ready(Ok(n as usize))
            }
        }
    }

    /// Hands bytes the window already allows to the driver (or the local receiver).
    fn push(&mut self, data: Bytes) -> Result<(), Error> {
        match &mut self.path {
            SendPath::Remote { tx, stream } => tx
                .send(BlobCommand::Write {
                    stream: *stream,
                    data,
                })
                .map_err(|_| closed()),
            SendPath::Local { tx, .. } => match tx {
                Some(tx) => tx.send(Piece::Data(data)).map_err(|_| self.failure()),
                None => Err(finished_already()),
            },
        }
    }

    /// Writes `data` without copying it, waiting for window as needed.
    pub async fn write_bytes(&mut self, mut data: Bytes) -> Result<(), Error> {
        while !data.is_empty() {
            let want = data.len();
            let n = std::future::poll_fn(|cx| self.poll_room(cx, want)).await?;
            let piece = data.split_to(n.min(data.len()));
            self.push(piece)?;
        }
        Ok(())
    }

    /// Marks the end of the stream and waits until the receiver holds every byte. Fails when
    /// the stream fails first (bounded by `blob_idle_timeout` without progress).
    pub async fn finish(mut self) -> Result<(), Error> {
        std::future::poll_fn(|cx| self.poll_finish(cx)).await
    }

    fn poll_finish(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        if self.finishing.is_none() {
            if self.done {
                return Poll::Ready(Err(finished_already()));
            }
            if let Some(e) = self.shared.error() {
                self.done = true;
                return Poll::Ready(Err(e));
            }
            let finishing = match &mut self.path {
                SendPath::Remote { tx, stream } => {
                    let (done_tx, done_rx) = oneshot::channel();
                    if tx
                        .send(BlobCommand::Finish {
                            stream: *stream,
                            done: done_tx,
                        })
                        .is_err()
                    {
                        self.done = true;
                        return Poll::Ready(Err(closed()));
                    }
                    Finishing::Remote(done_rx)
                }
                SendPath::Local { tx, eof } => {
                    // Closing the queue is the end of the stream; the receiver answers once
                    // it has read it.
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(Piece::End(None));
                    }
                    Finishing::Local(eof.take())
                }
            };
            self.done = true;
            self.finishing = Some(finishing);
        }
        match self.finishing.as_mut() {
            None | Some(Finishing::Local(None)) => Poll::Ready(Err(finished_already())),
            Some(Finishing::Remote(rx)) => Pin::new(rx)
                .poll(cx)
                .map(|r| r.unwrap_or_else(|_| Err(closed()))),
            Some(Finishing::Local(Some(eof))) => Pin::new(eof).poll(cx).map(|r| {
                r.map_err(|_| {
                    self.shared.error().unwrap_or_else(|| {
                        Error::new(
                            ErrorId::BlobCancelled,
                            "the receiver was dropped before it read the end",
                        )
                    })
                })
            }),
        }
    }

    /// Abandons the stream; the receiver's next read fails with [`ErrorId::BlobCancelled`]
    /// and `reason`.
    pub fn cancel(mut self, reason: &str) {
        self.cancel_with(reason);
    }

    fn cancel_with(&mut self, reason: &str) {
        if self.done {
            return;
        }
        self.done = true;
        let error = Error::new(
            ErrorId::BlobCancelled,
            format!("the sender cancelled the blob stream: {reason}"),
        );
        match &mut self.path {
            SendPath::Remote { tx, stream } => {
                let _ = tx.send(BlobCommand::Cancel {
                    stream: *stream,
                    reason: reason.to_owned(),
                });
            }
            SendPath::Local { tx, .. } => {
                if let Some(tx) = tx.take() {
                    let _ = tx.send(Piece::Failed(error.clone()));
                }
            }
        }
        self.shared.fail(error);
    }
}

impl Drop for BlobSender {
    fn drop(&mut self) {
        self.cancel_with("the sender was dropped before finish()");
    }
}

impl AsyncWrite for BlobSender {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        // Big writes are taken a few chunks at a time so the window keeps moving.
        let want = buf.len().min(this.chunk.saturating_mul(4));
        match this.poll_room(cx, want) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Err(e)) => Poll::Ready(Err(io_error(e))),
            Poll::Ready(Ok(n)) => {
                let n = n.min(buf.len());
                let data = Bytes::copy_from_slice(buf.get(..n).unwrap_or_default());
                match this.push(data) {
                    Ok(()) => Poll::Ready(Ok(n)),
                    Err(e) => Poll::Ready(Err(io_error(e))),
                }
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        // Bytes written are already on their way; `finish` waits for the receiver.
        match self.shared.error() {
            Some(e) if !self.done => Poll::Ready(Err(io_error(e))),
            _ => Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.get_mut().poll_finish(cx).map_err(io_error)
    }
}

/// Where a receiver reports what it consumed.
enum RecvBack {
    Remote {
        tx: mpsc::UnboundedSender<BlobCommand>,
        stream: u64,
    },
    Local {
        sender: Arc<SenderShared>,
        eof: Option<oneshot::Sender<()>>,
    },
}

#[derive(Clone, PartialEq)]
enum RecvState {
    Open,
    Ended,
    Failed(Error),
}

/// The receiving end of a blob stream, from [`TabernaRequest::blob`](crate::TabernaRequest::blob).
///
/// Read it as an [`AsyncRead`] or as a [`Stream`](futures_core::Stream) of `Bytes` (zero-copy
/// slices of what arrived). It ends (EOF, `None`) after the last byte; it fails with the
/// stream's error when the sender cancels, the peer restarts or the stream times out. The
/// sender may only run a window ahead of what this end has consumed, so reading slowly slows
/// the sender down and never fails the stream (short of `blob_idle_timeout` with no progress
/// at all). Dropping it before the end cancels the stream; the sender's next write fails.
pub struct BlobReceiver {
    rx: mpsc::UnboundedReceiver<Piece>,
    back: RecvBack,
    current: Bytes,
    state: RecvState,
}

impl fmt::Debug for BlobReceiver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("BlobReceiver");
        if let RecvBack::Remote { stream, .. } = &self.back {
            d.field("stream", stream);
        } else {
            d.field("local", &true);
        }
        d.field(
            "state",
            &match &self.state {
                RecvState::Open => "open",
                RecvState::Ended => "ended",
                RecvState::Failed(_) => "failed",
            },
        )
        .finish_non_exhaustive()
    }
}

impl BlobReceiver {
    pub(crate) fn remote(
        rx: mpsc::UnboundedReceiver<Piece>,
        tx: mpsc::UnboundedSender<BlobCommand>,
        stream: u64,
    ) -> Self {
        Self {
            rx,
            back: RecvBack::Remote { tx, stream },
            current: Bytes::new(),
            state: RecvState::Open,
        }
    }

    pub(crate) fn local(
        rx: mpsc::UnboundedReceiver<Piece>,
        sender: Arc<SenderShared>,
        eof: oneshot::Sender<()>,
    ) -> Self {
        Self {
            rx,
            back: RecvBack::Local {
                sender,
                eof: Some(eof),
            },
            current: Bytes::new(),
            state: RecvState::Open,
        }
    }

    fn consumed(&mut self, n: usize) {
        match &mut self.back {
            RecvBack::Remote { tx, stream } => {
                let _ = tx.send(BlobCommand::Consumed {
                    stream: *stream,
                    n: n as u64,
                });
            }
            RecvBack::Local { sender, .. } => sender.release(n as u64),
        }
    }

    /// The next piece: `Some(Ok)` bytes, `None` at the end, `Some(Err)` once on failure.
    fn poll_piece(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, Error>>> {
        match &self.state {
            RecvState::Ended => return Poll::Ready(None),
            RecvState::Failed(e) => return Poll::Ready(Some(Err(e.clone()))),
            RecvState::Open => {}
        }
        loop {
            let piece = match self.rx.poll_recv(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(p) => p,
            };
            match piece {
                Some(Piece::Data(b)) => {
                    if b.is_empty() {
                        continue;
                    }
                    self.consumed(b.len());
                    return Poll::Ready(Some(Ok(b)));
                }
                Some(Piece::End(_reservation)) => {
                    self.state = RecvState::Ended;
                    if let RecvBack::Local { eof, .. } = &mut self.back
                        && let Some(eof) = eof.take()
                    {
                        let _ = eof.send(());
                    }
                    return Poll::Ready(None);
                }
                Some(Piece::Failed(e)) => {
                    self.state = RecvState::Failed(e.clone());
                    return Poll::Ready(Some(Err(e)));
                }
                None => {
                    let e = closed();
                    self.state = RecvState::Failed(e.clone());
                    return Poll::Ready(Some(Err(e)));
                }
            }
        }
    }
}

impl Drop for BlobReceiver {
    fn drop(&mut self) {
        if self.state != RecvState::Open {
            return;
        }
        match &mut self.back {
            RecvBack::Remote { tx, stream } => {
                let _ = tx.send(BlobCommand::Cancel {
                    stream: *stream,
                    reason: "the receiver was dropped before the end of the stream".to_owned(),
                });
            }
            RecvBack::Local { sender, .. } => sender.fail(Error::new(
                ErrorId::BlobCancelled,
                "the receiver was dropped before the end of the stream",
            )),
        }
    }
}

impl futures_core::Stream for BlobReceiver {
    type Item = Result<Bytes, Error>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if !this.current.is_empty() {
            return Poll::Ready(Some(Ok(std::mem::take(&mut this.current))));
        }
        match this.poll_piece(cx) {
            // A failure is reported once; the stream then ends.
            Poll::Ready(Some(Err(e))) => {
                if matches!(this.state, RecvState::Failed(_)) {
                    this.state = RecvState::Ended;
                }
                Poll::Ready(Some(Err(e)))
            }
            other => other,
        }
    }
}

impl AsyncRead for BlobReceiver {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if this.current.is_empty() {
            match this.poll_piece(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => return Poll::Ready(Ok(())),
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(io_error(e))),
                Poll::Ready(Some(Ok(b))) => this.current = b,
            }
        }
        let n = this.current.len().min(buf.remaining());
        buf.put_slice(this.current.get(..n).unwrap_or_default());
        bytes::Buf::advance(&mut this.current, n);
        Poll::Ready(Ok(()))
    }
}

/// The longest application header a blob's opening message carries when messages are limited
/// to `max_message_len` (the opening message's own prefix takes the rest).
pub(crate) fn max_blob_header(max_message_len: usize) -> usize {
    max_message_len.saturating_sub(BLOB_OPEN_PREFIX_LEN)
}

/// The bytes a blob's opening message adds to its application header.
pub(crate) const BLOB_OPEN_OVERHEAD: usize = BLOB_OPEN_PREFIX_LEN;

/// A blob stream this side opens to `peer`: its id (the `n`th of this side's, with this side's
/// parity, so the two sides never pick the same id) and the message that opens it on the
/// primary callis, addressed to taberna `dst` from `src`, carrying the application's type
/// and header.
pub(crate) fn outbound_opening(
    local: &DomusId,
    peer: &DomusId,
    n: u64,
    (dst, src): (u64, u64),
    app_type: u32,
    (header, headers): (&[u8], crate::a1_callis::headers::Headers),
    deadline: std::time::Instant,
) -> (u64, Outgoing) {
    let stream = n
        .saturating_mul(2)
        .saturating_add(stream_parity(local, peer));
    let msg = Outgoing {
        dst,
        src,
        msg_type: BLOB_OPEN_TYPE,
        headers,
        payload: encode_blob_open(stream, app_type, header),
        deadline,
    };
    (stream, msg)
}
