//! A peer driver's dispatch of the session's events: a callis that opened, a message
//! delivered to a local taberna (a blob-opening one reserves its stream first), one of our
//! sends that ended (its outcome to its sender, counted), and a close. Also the answer handle
//! a delivery carries.
//!
//! Methods of [`PeerDriver`] only, called from its turn in the parent module: nothing here
//! awaits; a delivery is handed to the registry, which never blocks.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::mpsc;

use super::{PeerDriver, record_failure};
use crate::a0_transport::PeerIdentity;
use crate::a1_callis::blob::{BLOB_OPEN_TYPE, decode_blob_open, stream_parity};
use crate::a1_callis::session::{A3_MESSAGE_TYPE_BASE, Answer, Event, SendEnd, Session};
use crate::error::{Error, ErrorId};
use crate::reporting::{CallisKind, Event as Report};
use crate::runtime::completion::Completion;
use crate::runtime::ends::{BlobCommand, BlobReceiver, Reservation};
use crate::runtime::{AnswerToPeer, Delivery, InboundMessage, InboundRun, Intake, answer_result};

impl PeerDriver {
    pub(super) fn dispatch_events(&mut self) {
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
                Event::Arrived {
                    peer_epoch,
                    message,
                } => {
                    let Some(peer) = self.peer_identity.clone() else {
                        continue;
                    };
                    if message.msg_type == BLOB_OPEN_TYPE {
                        self.take_in_blob_open(peer, peer_epoch, message);
                        continue;
                    }
                    let id = message.id;
                    let intake = self.ctx.inbound.take_in(InboundMessage {
                        peer,
                        src: message.src,
                        dst: message.dst,
                        msg_type: message.msg_type,
                        payload: message.payload,
                        headers: message.headers,
                        blob: None,
                        answer: self.answer_to_peer(peer_epoch, id),
                    });
                    self.after_intake(peer_epoch, id, intake);
                }
                Event::ArrivedRun { peer_epoch, run } => {
                    let Some(peer) = self.peer_identity.clone() else {
                        continue;
                    };
                    if run.msg_type == BLOB_OPEN_TYPE {
                        for message in run.iter() {
                            self.take_in_blob_open(peer.clone(), peer_epoch, message);
                        }
                        continue;
                    }
                    self.take_in_run(&peer, peer_epoch, &run);
                }
                Event::Finished {
                    dst,
                    outcome,
                    token: p,
                    ..
                } => {
                    let answered_after = matches!(outcome, SendEnd::Answered(_))
                        .then(|| self.now_us.saturating_sub(p.started_us));
                    let result = self.outcome_to_result(dst, outcome);
                    match &result {
                        Ok(d) => self
                            .counts
                            .answered(matches!(d, Delivery::Accepted), answered_after.unwrap_or(0)),
                        Err(e) => {
                            if let Some(us) = answered_after {
                                self.ctx.recorder.latency(Duration::from_micros(us));
                            }
                            record_failure(&self.ctx.recorder, e);
                        }
                    }
                    self.completed.push((p.done, result));
                    self.released.merge(p._permit);
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
        // The room first: a sender that sees its outcome finds the room it freed.
        self.released.release_now();
        if !self.completed.is_empty() {
            // The counts first, so a sender that sees its outcome also sees it counted.
            self.counts.publish(&self.ctx.recorder, &self.cells);
            Completion::complete_all(&mut self.completed);
        }
    }

    /// A message that opens a blob stream: reserve the stream (or refuse it at once), open it
    /// on the blob driver, then hand the request in with its receiver.
    pub(super) fn take_in_blob_open(
        &mut self,
        peer: Arc<PeerIdentity>,
        peer_epoch: u64,
        message: crate::a1_callis::frame::MessageFrame,
    ) {
        let id = message.id;
        let recorder = self.ctx.recorder.clone();
        let refuse = |session: &mut Session<super::PendingSend>, error: ErrorId, reason: &str| {
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
        let intake = self.ctx.inbound.take_in(InboundMessage {
            peer,
            src: message.src,
            dst: message.dst,
            msg_type: app_type,
            payload: header,
            headers: message.headers,
            blob: Some(receiver),
            answer: self.answer_to_peer(peer_epoch, id),
        });
        self.after_intake(peer_epoch, id, intake);
    }

    /// A run of messages to one taberna: delivered in one go, each answer decided on the
    /// spot written at once.
    fn take_in_run(
        &mut self,
        peer: &Arc<PeerIdentity>,
        peer_epoch: u64,
        run: &crate::a1_callis::frame::MessageBatch,
    ) {
        let answers = self.answers.clone();
        let answer = move |id| AnswerToPeer {
            queue: answers.clone(),
            epoch: peer_epoch,
            id,
        };
        let inbound = self.ctx.inbound.clone();
        inbound.take_in_run(
            InboundRun {
                peer,
                run,
                answer: &answer,
            },
            &mut |id, intake| self.after_intake(peer_epoch, id, intake),
        );
    }

    /// Counts a delivery and writes an answer decided on the spot.
    pub(super) fn after_intake(&mut self, peer_epoch: u64, id: u64, intake: Intake) {
        match intake {
            Intake::Queued => self.counts.received(),
            Intake::Refused => {}
            Intake::Answered(answer) => self.session.answer(peer_epoch, id, answer),
            Intake::AnsweredByHandler(answer) => {
                self.counts.received();
                self.session.answer(peer_epoch, id, answer);
            }
        }
    }

    /// The handle that answers delivery `id` of the peer's run `epoch`.
    pub(super) fn answer_to_peer(&self, epoch: u64, id: u64) -> AnswerToPeer {
        AnswerToPeer {
            queue: self.answers.clone(),
            epoch,
            id,
        }
    }

    pub(super) fn outcome_to_result(&self, dst: u64, outcome: SendEnd) -> crate::runtime::Outcome {
        match outcome {
            SendEnd::Answered(answer) => {
                answer_result(answer, format_args!("taberna {dst} on {}", self.peer_id))
            }
            // Never sent because no callis opened: say why, when a dial said so.
            SendEnd::Failed(e) if e.id() == ErrorId::PeerUnavailable => {
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
            SendEnd::Failed(e) => Err(e),
        }
    }
}
