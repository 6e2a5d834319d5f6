//! The blob driver's callis: adopting one (the duplicate tie-break, our BLOB_HELLO first),
//! dialling when a stream has bytes to send, decoding what it reads into the streams (the
//! peer's BLOB_HELLO first, then blob frames only), reading and writing at most [`TURN_BYTES`]
//! a turn, watching that writes move (T33), closing it with a reason, and closing it when it
//! carried no stream for `blob_idle_timeout`.
//!
//! Methods of [`BlobDriver`] only, called from its turn in the parent module: nothing here
//! awaits or blocks, and a frame the peer sent after the reason to close is never handled.

use std::future::Future;
use std::task::Context;

use bytes::BytesMut;

use super::{BlobDriver, Link, READ_RESERVE, TURN_BYTES};
use crate::a0_transport::AuthenticatedStream;
use crate::a1_callis::frame::{self, BlobFrame, Frame, PROTOCOL_VERSION};
use crate::a1_callis::link::{WriteVerdict, WriteWatch, keep_current};
use crate::error::{Error, ErrorId};
use crate::reporting::CallisKind;
use crate::runtime::callis::{CallisIo, ReadSink, Step, dialler_of, now};

impl BlobDriver {
    /// Forgets the callis (reporting it down if it had opened).
    pub(super) fn take_link(&mut self) -> Option<Link> {
        let link = self.link.take();
        if link.as_ref().is_some_and(|l| l.open) {
            self.ctx
                .recorder
                .callis(CallisKind::Blob, &self.peer_id, false);
        }
        link
    }

    /// Adopts a new blob callis (same tie-break as the primary: when both sides dialled at
    /// once, the one dialled by the smaller id survives).
    pub(super) fn attach(&mut self, io: AuthenticatedStream, prefix: BytesMut) {
        // The bytes the accept path read to tell the callis's kind were read from it.
        self.counting.read(prefix.len());
        if self.shutting_down {
            return;
        }
        if let Some(current) = &self.link {
            if keep_current(
                &self.ctx.local_id,
                &self.peer_id,
                current.io.dialler(),
                dialler_of(&io),
            ) {
                return;
            }
            self.drop_link();
        }
        let mut wbuf = BytesMut::with_capacity(2 * TURN_BYTES);
        let max_chunk = u32::try_from(self.config.chunk_len).unwrap_or(u32::MAX);
        frame::encode_blob_hello(&mut wbuf, PROTOCOL_VERSION, self.ctx.local_epoch, max_chunk);
        self.dialer.end_wait();
        self.link = Some(Link {
            io: CallisIo::new(io, wbuf, self.counting.clone()),
            recv: prefix,
            open: false,
            closing: false,
            writes: WriteWatch::new(),
        });
        // The peer's BLOB_HELLO (and maybe more) may already be here.
        self.handle_input();
    }

    pub(super) fn drop_link(&mut self) {
        if self.take_link().is_some() {
            self.streams.disconnected();
        }
    }

    /// Queues a CLOSE and stops using the callis; it is dropped once the CLOSE is written.
    /// Only the first reason to close a callis is reported: one closed callis is one protocol
    /// violation (and one entry on the error feed), however many bad frames it had buffered.
    pub(super) fn close_link(&mut self, error: &Error) {
        let Some(link) = self.link.as_mut().filter(|l| !l.closing) else {
            self.streams.disconnected();
            return;
        };
        tracing::debug!(peer = %self.peer_id, error = %error, "closing blob callis");
        if error.id().is_protocol_violation() {
            self.ctx.recorder.protocol_violation(&self.peer_id, error);
        }
        link.closing = true;
        // What the peer sent after the reason to close is never handled.
        link.recv.clear();
        link.io
            .queue(|out| frame::encode_close(out, error.id().into(), error.message()));
        self.streams.disconnected();
    }

    /// Dials when a stream has bytes to send, no callis is up, and the peer's run is known.
    pub(super) fn maybe_dial(&mut self) {
        if !self.shutting_down
            && self.link.is_none()
            && self.dialer.is_idle()
            && self.peer_epoch.is_some()
            && self.streams.has_outbound()
        {
            self.dialer.start();
        }
    }

    /// Decodes what the callis has read and hands it to the streams. Stops at the first
    /// frame that decides to close the callis (the rest of the buffer is dropped, as the
    /// primary callis drops what follows its CLOSE decision).
    pub(super) fn handle_input(&mut self) {
        let max = u32::try_from(
            self.config
                .chunk_len
                .saturating_add(frame::BLOB_DATA_FIXED_LEN),
        )
        .unwrap_or(u32::MAX);
        let now = now();
        loop {
            let Some(link) = self.link.as_mut() else {
                return;
            };
            if link.closing {
                link.recv.clear();
                return;
            }
            if self.streams.is_violated() {
                // The violation event is dispatched next and closes the callis.
                link.recv.clear();
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
                let Frame::Blob(BlobFrame::Hello {
                    version,
                    epoch,
                    max_chunk,
                }) = frame
                else {
                    let e = Error::new(
                        ErrorId::ProtocolViolation,
                        format!("the first frame on a blob callis was {frame:?}, not BLOB_HELLO"),
                    );
                    self.close_link(&e);
                    return;
                };
                match self
                    .streams
                    .accept_hello(version, epoch, max_chunk, self.peer_epoch)
                {
                    Ok(_restarted) => {
                        link.open = true;
                        self.ctx
                            .recorder
                            .callis(CallisKind::Blob, &self.peer_id, true);
                        self.peer_epoch = Some(epoch);
                        self.dialer.connected();
                    }
                    Err(e) => {
                        self.close_link(&e);
                        return;
                    }
                }
                continue;
            }
            match frame {
                Frame::Blob(f) => self.streams.handle_frame(now, f),
                Frame::Close { code, reason } => {
                    tracing::debug!(peer = %self.peer_id, code = code.0, reason = %crate::error::untrusted(&reason), "peer closed the blob callis");
                    self.drop_link();
                    return;
                }
                Frame::Skipped(_) => self.streams.handle_skipped(now),
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

    /// Reads at most [`TURN_BYTES`] from the callis.
    pub(super) fn poll_read(&mut self, cx: &mut Context<'_>) -> Step {
        let Some(link) = self.link.as_mut() else {
            return Step::IDLE;
        };
        link.io.poll_read(
            cx,
            &mut LinkInput(&mut link.recv),
            TURN_BYTES,
            (16 * 1024, READ_RESERVE),
        )
    }

    /// Writes at most [`TURN_BYTES`] of what the streams have ready.
    pub(super) fn poll_write(&mut self, cx: &mut Context<'_>) -> Step {
        let Some(link) = self.link.as_mut() else {
            return Step::IDLE;
        };
        let (closing, open) = (link.closing, link.open);
        let streams = &mut self.streams;
        link.io.poll_write(cx, TURN_BYTES, |out| {
            !closing && open && streams.poll_transmit(out, TURN_BYTES)
        })
    }

    /// Reports a write attempt to the callis's [`WriteWatch`] and acts on its verdict: a
    /// callis whose writes made no progress for `blob_idle_timeout` (the peer reads nothing)
    /// is dropped at once, its streams waiting for the next one; a CLOSE that cannot be
    /// written in time is given up. True when it dropped the callis or its timer fired.
    pub(super) fn watch_writes(&mut self, cx: &mut Context<'_>, progressed: bool) -> bool {
        let idle = self.config.idle_timeout;
        let Some(link) = self.link.as_mut() else {
            self.write_timer.poll(cx, None);
            return false;
        };
        let now = now();
        link.writes.wrote(now, progressed, !link.io.is_drained());
        if link.closing {
            link.writes.closing(now);
        }
        let verdict = link.writes.check(now, idle);
        let fired = self.write_timer.poll(cx, link.writes.poll_timeout(idle));
        match verdict {
            WriteVerdict::Fine => fired,
            WriteVerdict::Stalled => {
                tracing::debug!(peer = %self.peer_id, "the peer read nothing on the blob callis for blob_idle_timeout; dropping it");
                self.drop_link();
                true
            }
            WriteVerdict::Abandon => {
                tracing::debug!(peer = %self.peer_id, "the blob callis's CLOSE could not be written in time; dropping it");
                self.take_link();
                true
            }
        }
    }

    /// Closes an open callis that has carried no stream for `blob_idle_timeout`.
    pub(super) fn poll_idle(&mut self, cx: &mut Context<'_>) -> bool {
        let idle = self.link.as_ref().is_some_and(|l| l.open && !l.closing)
            && self.streams.open_streams() == 0
            && self.outs.is_empty()
            && self.ins.is_empty();
        if !idle {
            self.idle_timer = None;
            return false;
        }
        let after = self.config.idle_timeout;
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
}

/// Read bytes wait in the callis's receive buffer; the driver decodes them after the turn's
/// reads (commands queued meanwhile come first).
struct LinkInput<'a>(&'a mut BytesMut);

impl ReadSink for LinkInput<'_> {
    fn buf(&mut self) -> &mut BytesMut {
        self.0
    }

    fn after_read(&mut self) -> bool {
        true
    }
}

fn frame_name(f: &Frame) -> &'static str {
    match f {
        Frame::Hello(_) => "HELLO",
        Frame::Ping(_) => "PING",
        Frame::Pong(_) => "PONG",
        Frame::Close { .. } => "CLOSE",
        Frame::Message(_) => "MESSAGE",
        Frame::MessageBatch(_) => "MESSAGE_BATCH",
        Frame::Accepted(_) => "ACCEPTED",
        Frame::Reply { .. } => "REPLY",
        Frame::Reject(_) => "REJECT",
        Frame::Blob(_) => "a blob frame",
        _ => "an unexpected frame",
    }
}
