//! The session's sending side: what one `poll_transmit` writes, in priority order — control,
//! answers (bounded per fill, cut to the peer's frame limit; acceptances as runs of ids),
//! then messages by the schedule and within the peer's window, consecutive ones to the same
//! taberna in one MESSAGE_BATCH. Pure: it only appends bytes to the buffer it is given.

use super::*;

impl<T> Session<T> {
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

    /// ACCEPTED runs (as many per frame as the peer's frame limit takes, at most 8192), then
    /// REPLY and REJECT frames, until `out` reaches `limit` (at least one frame goes out).
    /// Every frame fits the limit the peer announced (T32): a reply that would not is turned
    /// into a rejection that says so, and rejection reasons are cut to fit.
    pub(super) fn write_answers(&mut self, out: &mut BytesMut, limit: usize) {
        let frame_max = self.peer_max_frame_len as usize;
        let runs_per_frame = (frame_max / frame::ACCEPTED_RUN_LEN).clamp(1, 8192);
        let mut written = 0usize;
        while let Some(rest) = self.answers.accepted.get(written..)
            && !rest.is_empty()
        {
            if out.len() >= limit && written > 0 {
                break;
            }
            written =
                written.saturating_add(frame::encode_accepted_upto(out, rest, runs_per_frame));
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
                Answer::Replied(payload) | Answer::RepliedWithHeaders(payload)
                    if payload.len().saturating_add(8) > frame_max =>
                {
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
                Answer::RepliedWithHeaders(raw) => frame::encode_reply_extended(out, id, &raw),
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

    /// MESSAGE_BATCH frames (a message that cannot join the batch before it starts a new
    /// one), A2 before A3, never an id `peer_window` or more past the oldest unanswered one.
    /// Every frame fits the peer's frame limit: a message alone in a batch that would not fit
    /// goes as a MESSAGE, which does (its payload was checked against that limit).
    pub(super) fn write_messages(&mut self, out: &mut BytesMut, limit: usize) {
        let Some(oldest) = self.retained.first_id() else {
            self.schedule.clear();
            return;
        };
        let span_end = oldest.saturating_add(u64::from(self.peer_window));
        let frame_max = self.peer_max_frame_len;
        let mut batch: Option<frame::BatchWriter> = None;
        while out.len() < limit {
            // A2 first, A3 aged in (T20); nothing at or past the peer's window.
            let Some(id) = self.schedule.next_below(span_end) else {
                break;
            };
            // Ids finished or cancelled since they were queued are skipped.
            let Some(r) = self.retained.get_mut(id) else {
                continue;
            };
            if r.transmitted {
                continue;
            }
            let len = r.payload.len();
            match &mut batch {
                // A message with headers goes as a MESSAGE of its own (a batch carries none).
                _ if !r.headers.is_empty() => {
                    if let Some(done) = batch.take() {
                        done.finish(out);
                    }
                    frame::encode_message_with_headers(
                        out, id, r.dst, r.src, r.msg_type, &r.headers, &r.payload,
                    );
                }
                Some(b) if b.fits(id, r.dst, r.src, r.msg_type, len, frame_max) => {
                    b.push(out, &r.payload);
                }
                _ => {
                    if let Some(done) = batch.take() {
                        done.finish(out);
                    }
                    let alone =
                        frame::MESSAGE_FIXED_LEN.saturating_add(frame::batch_entry_len(len));
                    if alone <= frame_max as usize {
                        batch = Some(frame::BatchWriter::start(
                            out, id, r.dst, r.src, r.msg_type, &r.payload,
                        ));
                    } else {
                        frame::encode_message_with_headers(
                            out, id, r.dst, r.src, r.msg_type, &r.headers, &r.payload,
                        );
                    }
                }
            }
            r.transmitted = true;
            r.ever_transmitted = true;
            self.stats.messages_sent = self.stats.messages_sent.saturating_add(1);
        }
        if let Some(done) = batch {
            done.finish(out);
        }
    }
}

/// The priority class a message of `msg_type` is written in.
#[inline]
pub(super) fn class_of(msg_type: u32) -> Class {
    if msg_type < A3_MESSAGE_TYPE_BASE {
        Class::A2
    } else {
        Class::A3
    }
}
