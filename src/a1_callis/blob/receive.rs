//! The peer's side of [`BlobStreams`]: every frame that arrives on the blob callis is
//! checked here against the stream it names — its credit, its offsets, its announced end —
//! and against the per-second frame and cancel budgets (T16, T17). What the peer may not do is
//! a [`BlobEvent::Violation`], and the first one decides the callis's end.
//!
//! Must not buffer anything the peer was not allowed to send, trust a length or offset before
//! checking it, or do IO: it only updates the streams and queues events. The application's
//! side (open, write, read, cancel) and the writer (`poll_transmit`) are in the parent module.

use std::time::Instant;

use bytes::Bytes;

use super::{BlobEvent, BlobStreams};
use crate::a1_callis::frame::BlobFrame;
use crate::error::{Error, ErrorId, untrusted};

impl BlobStreams {
    /// Whether a violation decided the current callis's end: the driver closes it and feeds
    /// nothing more ([`handle_frame`](Self::handle_frame) would ignore it).
    pub fn is_violated(&self) -> bool {
        self.violated
    }

    /// Handles one frame from the blob callis. Ignored once [`is_violated`](Self::is_violated).
    pub fn handle_frame(&mut self, now: Instant, f: BlobFrame) {
        if self.violated {
            return;
        }
        // Only bytes are progress; everything else a peer could repeat for free.
        let cost = match &f {
            BlobFrame::Data { data, .. } if !data.is_empty() => 1,
            _ => 2,
        };
        if !self.within_frame_budget(now, cost) {
            return;
        }
        match f {
            BlobFrame::Data {
                stream,
                offset,
                data,
            } => self.on_data(now, stream, offset, data),
            BlobFrame::End { stream, total } => self.on_end(now, stream, total),
            BlobFrame::Hello { .. } => self.violation(None, "a second BLOB_HELLO".to_owned()),
            BlobFrame::Credit {
                stream,
                received,
                limit,
            } => self.on_credit(now, stream, received, limit),
            BlobFrame::Cancel {
                stream,
                code,
                reason,
            } => {
                if !self.within_cancel_budget(now) {
                    let budget = self.config.max_peer_cancels_per_second;
                    self.violation(
                        None,
                        format!("the peer cancelled more than {budget} blob streams in one second"),
                    );
                    return;
                }
                let known = self.outbound.remove(&stream).is_some()
                    | self.inbound.remove(&stream).is_some();
                if known {
                    self.remember(stream, None);
                    let id = code.closing_id();
                    self.events.push_back(BlobEvent::Cancelled {
                        stream,
                        error: Error::new(
                            id,
                            format!(
                                "the peer cancelled blob stream {stream}: {}",
                                untrusted(&reason)
                            ),
                        ),
                    });
                }
            }
        }
    }

    /// A frame of a reserved, skippable type (T15) arrived on the blob callis: it carries
    /// nothing, so it only counts (double) against the frame budget. Ignored once
    /// [`is_violated`](Self::is_violated).
    pub fn handle_skipped(&mut self, now: Instant) {
        if !self.violated {
            self.within_frame_budget(now, 2);
        }
    }

    /// Counts a received frame against the per-second budget (T16); past it, the callis is
    /// closed with a violation and false is returned.
    fn within_frame_budget(&mut self, now: Instant, cost: u64) -> bool {
        let budget = self.config.max_frames_per_second;
        if self.frames_per_second.admit(now, cost, u64::from(budget)) {
            return true;
        }
        self.violation(
            None,
            format!(
                "more than {budget} frames in one second on the blob callis (max_frames_per_second); calm down"
            ),
        );
        false
    }

    /// Counts a cancel from the peer against the per-second budget.
    fn within_cancel_budget(&mut self, now: Instant) -> bool {
        let budget = u64::from(self.config.max_peer_cancels_per_second);
        self.cancels_per_second.admit(now, 1, budget)
    }

    /// The first violation on a callis decides its end; the caller returns at once, and no
    /// later frame is handled until the next callis.
    fn violation(&mut self, stream: Option<u64>, message: String) {
        if std::mem::replace(&mut self.violated, true) {
            return;
        }
        self.events.push_back(BlobEvent::Violation {
            stream,
            error: Error::new(ErrorId::ProtocolViolation, message),
        });
    }

    fn on_data(&mut self, now: Instant, stream: u64, offset: u64, data: Bytes) {
        let Some(inb) = self.inbound.get_mut(&stream) else {
            if self.recent(stream).is_none() {
                self.violation(None, format!("BLOB_DATA for unknown stream {stream}"));
            }
            return;
        };
        let end = offset.saturating_add(data.len() as u64);
        if end > inb.limit {
            let limit = inb.limit;
            self.violation(
                Some(stream),
                format!(
                    "BLOB_DATA for stream {stream} up to offset {end}, beyond its credit {limit}"
                ),
            );
            return;
        }
        if offset > inb.received {
            let received = inb.received;
            self.violation(
                Some(stream),
                format!(
                    "BLOB_DATA for stream {stream} at offset {offset} leaves a gap after {received}"
                ),
            );
            return;
        }
        if inb.total.is_some_and(|t| end > t) {
            self.violation(
                Some(stream),
                format!("BLOB_DATA for stream {stream} past its announced end"),
            );
            return;
        }
        // After a reconnect the sender resends from its last acknowledged offset: keep only
        // what is new.
        let skip = usize::try_from(inb.received.saturating_sub(offset)).unwrap_or(usize::MAX);
        if skip >= data.len() {
            return;
        }
        let fresh = data.slice(skip..);
        let len = fresh.len() as u64;
        inb.received = inb.received.saturating_add(len);
        inb.unread_len = inb.unread_len.saturating_add(len);
        inb.unread.push_back(fresh);
        inb.last_progress = now;
        // Acknowledge every quarter window even when the application does not read.
        if inb.received.saturating_sub(inb.last_credit_received) >= self.config.window / 4 {
            inb.credit_due = true;
        }
        if inb.total == Some(inb.received) {
            inb.end_ack_due = true;
        }
        self.events.push_back(BlobEvent::Readable(stream));
    }

    /// A BLOB_END: the sender's end of a receiving stream, or the receiver's answer for a
    /// sending one.
    fn on_end(&mut self, now: Instant, stream: u64, total: u64) {
        if self.outbound.contains_key(&stream) {
            self.on_end_ack(stream, total);
            return;
        }
        let Some(inb) = self.inbound.get_mut(&stream) else {
            match self.recent(stream) {
                // The sender missed our answer (lost in a cut): answer again.
                Some(Some(done)) if done == total => self.owe_end_ack(stream, total),
                Some(_) => {}
                None => self.violation(None, format!("BLOB_END for unknown stream {stream}")),
            }
            return;
        };
        if total < inb.received || inb.total.is_some_and(|t| t != total) {
            self.violation(
                Some(stream),
                format!("BLOB_END for stream {stream} contradicts what arrived"),
            );
            return;
        }
        inb.total = Some(total);
        inb.last_progress = now;
        if inb.received == total {
            inb.end_ack_due = true;
            self.events.push_back(BlobEvent::Readable(stream));
        }
    }

    /// The receiver holds every byte of a sending stream: it is complete.
    fn on_end_ack(&mut self, stream: u64, total: u64) {
        let Some(out) = self.outbound.get(&stream) else {
            return;
        };
        if !out.finished || total != out.written() {
            let (finished, written) = (out.finished, out.written());
            self.violation(
                Some(stream),
                format!(
                    "BLOB_END answer for stream {stream} claims {total} bytes; the stream has {written} (finished: {finished})"
                ),
            );
            return;
        }
        self.outbound.remove(&stream);
        self.remember(stream, None);
        self.events.push_back(BlobEvent::Finished(stream));
    }

    fn on_credit(&mut self, now: Instant, stream: u64, received: u64, limit: u64) {
        let window = self.config.window;
        let Some(out) = self.outbound.get_mut(&stream) else {
            if self.recent(stream).is_none() {
                self.violation(None, format!("BLOB_CREDIT for unknown stream {stream}"));
            }
            return;
        };
        // After a reconnect `next_offset` rewinds to the last acknowledgement we saw; the
        // receiver may hold more than that, but never more than was ever sent.
        let sent = out.high;
        if received > sent {
            self.violation(Some(stream), format!(
                "BLOB_CREDIT for stream {stream} acknowledges {received} bytes, only {sent} were sent"
            ));
            return;
        }
        let room_before = window.saturating_sub(out.queued_len.saturating_add(out.unacked_len));
        while let Some((offset, chunk)) = out.unacked.front() {
            let chunk_end = offset.saturating_add(chunk.len() as u64);
            if chunk_end > received {
                break;
            }
            out.unacked_len = out.unacked_len.saturating_sub(chunk.len() as u64);
            out.unacked.pop_front();
        }
        // Bytes waiting to be sent again that the receiver already holds are skipped.
        while out.next_offset < received {
            let Some(front) = out.queued.pop_front() else {
                break;
            };
            let gap =
                usize::try_from(received.saturating_sub(out.next_offset)).unwrap_or(usize::MAX);
            let n = gap.min(front.len());
            if n < front.len() {
                out.queued.push_front(front.slice(n..));
            }
            out.queued_len = out.queued_len.saturating_sub(n as u64);
            out.next_offset = out.next_offset.saturating_add(n as u64);
        }
        out.acked = out.acked.max(received);
        out.limit = out.limit.max(limit);
        out.credited = true;
        out.last_progress = now;
        let room_after = window.saturating_sub(out.queued_len.saturating_add(out.unacked_len));
        if room_after > room_before && !out.finished {
            self.events.push_back(BlobEvent::Writable(stream));
        }
    }
}
