//! The session's receiving side: decoding what the peer wrote and handling each frame —
//! HELLO and its limits, deliveries through the dedupe ring, answers to our sends, PING/PONG,
//! CLOSE — within the frame and refusal budgets. Pure: no IO, no clock (`now` is passed in).

use super::*;

impl<T> Session<T> {
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

    pub(super) fn violation(&mut self, e: &dyn std::fmt::Display) {
        self.close(Error::new(
            ErrorId::ProtocolViolation,
            format!("the peer broke the A1 protocol: {e}"),
        ));
    }

    /// Counts refusals decided by vicus (not by the application) against a per-second budget,
    /// so a peer cannot make this side answer an unbounded stream of errors (T24). The clock
    /// is the time of the last received bytes: every delivery comes from input.
    pub(super) fn within_refusal_budget(&mut self, answer: &Answer) -> bool {
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
    pub(super) fn within_frame_budget(&mut self, now: Instant, f: &Frame) -> bool {
        let cost: u64 = match f {
            Frame::Ping(_) | Frame::Pong(_) | Frame::Skipped(_) => 2,
            // A batch costs what its messages would cost one frame each.
            Frame::MessageBatch(batch) => batch.len() as u64,
            _ => 1,
        };
        let budget = u64::from(self.config.max_frames_per_second);
        self.frames_per_second.admit(now, cost, budget)
    }

    pub(super) fn handle_frame(&mut self, now: Instant, f: Frame) {
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
            Frame::MessageBatch(batch) => self.handle_batch(&batch),
            Frame::Accepted(ids) => {
                for (first, last) in ids.runs() {
                    if self.link != Link::Open {
                        break;
                    }
                    self.accepted_run(first, last);
                }
            }
            Frame::Reply {
                id,
                extended: false,
                payload,
            } => self.finish_from_peer(id, Answer::Replied(payload)),
            Frame::Reply {
                id,
                extended: true,
                payload,
            } => self.finish_from_peer(id, Answer::RepliedWithHeaders(payload)),
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

    pub(super) fn peer_closed(&mut self, code: WireCode, reason: &str) {
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

    pub(super) fn handle_hello(&mut self, now: Instant, h: Hello) {
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
        // Headers count: they travel in the same frame (found by fuzzing).
        let max = self.max_payload_len();
        let too_large: Vec<u64> = self
            .retained
            .iter()
            .filter(|(_, r)| r.payload.len().saturating_add(r.headers.wire_len()) > max)
            .map(|(id, _)| id)
            .collect();
        for id in too_large {
            self.fail(
                id,
                Error::new(
                    ErrorId::PayloadTooLarge,
                    format!(
                        "the peer now accepts at most {max} bytes of payload and headers per message"
                    ),
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
    pub(super) fn peer_restarted(&mut self) {
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

    /// The peer accepted ids `first..=last`. Only the ids this side still holds are walked,
    /// so a run that names billions costs what is in flight, not what it names.
    pub(super) fn accepted_run(&mut self, first: u64, last: u64) {
        if last >= self.next_id || first == 0 {
            self.violation(&format_args!(
                "an acceptance of messages {first}..={last}, past the last one sent"
            ));
            return;
        }
        let Some(oldest) = self.retained.first_id() else {
            return;
        };
        for id in first.max(oldest)..=last {
            if let Some(r) = self.retained.remove(id) {
                self.forget_deadline(r.deadline, id);
                self.events.push_back(Event::Finished {
                    id,
                    dst: r.dst,
                    outcome: SendEnd::Answered(Answer::Accepted),
                    token: r.token,
                });
            }
        }
    }

    pub(super) fn finish_from_peer(&mut self, id: u64, answer: Answer) {
        if id >= self.next_id || id == 0 {
            self.violation(&format_args!(
                "an answer for message {id}, which was never sent"
            ));
            return;
        }
        // This side's own limit, whatever the peer applied.
        let max = self.own_max_payload_len();
        let answer = match answer.reply_bytes() {
            Some(p) if p.len() > max => too_large_reply(p.len(), max),
            // A reply's headers are held to this side's limits, as a message's are.
            _ => match answer.split_reply() {
                Some((headers, _)) => match self.check_headers(&headers, "this domus's") {
                    Ok(()) => answer,
                    Err(e) => Answer::refusal(
                        ErrorId::HeadersTooLarge,
                        format!("the reply's headers: {}", e.message()),
                    ),
                },
                None => answer,
            },
        };
        // Answers to messages we no longer hold (timed out, or answered twice after a
        // replay) are ignored.
        if let Some(r) = self.retained.remove(id) {
            self.forget_deadline(r.deadline, id);
            self.events.push_back(Event::Finished {
                id,
                dst: r.dst,
                outcome: SendEnd::Answered(answer),
                token: r.token,
            });
        }
    }

    pub(super) fn handle_message(&mut self, m: MessageFrame) {
        if self.admit_message(m.id, m.msg_type) {
            let peer_epoch = self.peer_epoch.unwrap_or_default();
            if let Err(refusal) = self.headers_refusal(&m.headers) {
                // Refused before any handler sees it, as any answer: remembered for a replay
                // and counted against max_refusals_per_second.
                self.stats.messages_delivered = self.stats.messages_delivered.saturating_sub(1);
                self.answer(peer_epoch, m.id, refusal);
                return;
            }
            self.events.push_back(Event::Arrived {
                peer_epoch,
                message: m,
            });
        }
    }

    /// Why a message's headers are refused: an extension version this side does not know, or
    /// more than its limits.
    fn headers_refusal(&self, headers: &Headers) -> Result<(), Answer> {
        if headers.is_empty() {
            return Ok(());
        }
        if let Some(version) = headers.version().filter(|v| *v != HEADERS_VERSION) {
            return Err(Answer::refusal(
                ErrorId::UnsupportedVersion,
                format!(
                    "the message's headers are extension version {version}; this domus reads version {HEADERS_VERSION}"
                ),
            ));
        }
        self.check_headers(headers, "the receiver's")
            .map_err(|e| Answer::refusal(ErrorId::HeadersTooLarge, e.message()))
    }

    /// Each message of a batch through the dedupe window, as a MESSAGE would go; the new
    /// ones leave in runs (consecutive new ids, one event each), so the driver delivers a run
    /// to its taberna in one go.
    pub(super) fn handle_batch(&mut self, batch: &frame::MessageBatch) {
        let peer_epoch = self.peer_epoch.unwrap_or_default();
        // The open run: its first id, its length and where its entries start. Only lengths
        // are read here; the payloads are cut when the run is delivered.
        let mut run: Option<(u64, u32, usize)> = None;
        let mut before = 0usize;
        // The ids as an inclusive range: a batch may end on id 2^64 - 1 (found by fuzzing:
        // an open range overflows computing the id after it).
        for (size, id) in batch.entry_sizes().zip(batch.first_id..=batch.last_id()) {
            if self.link != Link::Open {
                break;
            }
            let new = self.admit_message(id, batch.msg_type);
            match (&mut run, new) {
                (Some((_, count, _)), true) => *count = count.saturating_add(1),
                (None, true) => run = Some((id, 1, before)),
                (Some(_), false) => {
                    if let Some((first, count, from)) = run.take() {
                        self.events.push_back(Event::ArrivedRun {
                            peer_epoch,
                            run: batch.run(first, count, from, before),
                        });
                    }
                }
                (None, false) => {}
            }
            before = before.saturating_add(size);
        }
        if let Some((first, count, from)) = run {
            // The whole batch, mostly: no new bytes to cut.
            let run = if count as usize == batch.len() {
                batch.clone()
            } else {
                batch.run(first, count, from, before)
            };
            self.events.push_back(Event::ArrivedRun { peer_epoch, run });
        }
    }

    /// Message `id` of `msg_type` through the dedupe window: true when it is new and must be
    /// delivered (the caller reports it); a duplicate is answered again or waits for its
    /// handler, and anything the protocol forbids closes the callis.
    fn admit_message(&mut self, id: u64, msg_type: u32) -> bool {
        if msg_type <= A1_MESSAGE_TYPE_MAX {
            self.violation(&format_args!(
                "message type {msg_type:#x} is reserved for A1"
            ));
            return false;
        }
        match self.ring.observe(id, self.callis_seq) {
            Seen::OutsideWindow => {
                let (highest, window) = (self.ring.highest, self.ring.window);
                self.violation(&format_args!(
                    "message id {id} is outside the dedupe window (highest {highest}, window {window})"
                ));
            }
            Seen::BelowFloor => {
                let floor = self.ring.seen_floor;
                self.violation(&format_args!(
                    "message id {id} after DONE_BELOW {floor} said no id below it would come again"
                ));
            }
            Seen::DuplicateOnThisCallis => {
                self.violation(&format_args!(
                    "message id {id} arrived twice on one callis (a sender writes an id again only as a replay on a later callis)"
                ));
            }
            Seen::Replayed => {
                self.stats.duplicates_suppressed =
                    self.stats.duplicates_suppressed.saturating_add(1);
                let state = self.ring.state_mut(id).map(|s| s.clone());
                match state {
                    Some(SlotState::Answered(a)) => self.queue_answer(id, a),
                    Some(SlotState::ReplyLost) => self.queue_answer(
                        id,
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
                if let Some(state) = self.ring.state_mut(id) {
                    *state = SlotState::Answered(refusal.clone());
                }
                self.queue_answer(id, refusal);
            }
            Seen::New => {
                self.stats.messages_delivered = self.stats.messages_delivered.saturating_add(1);
                return true;
            }
        }
        false
    }
}
