//! A peer driver's callis and its life: adopting a callis (the duplicate tie-break), closing
//! it, dialling and what a failed dial means for what waits, `max_callis_age`, re-verifying
//! the peer when the authentication material changes, shutting down, and retiring an idle
//! peer (handing what it never sent to another replica first).
//!
//! Methods of [`PeerDriver`] only, called from its turn in the parent module: nothing here
//! awaits, and nothing reaches past the driver's own state except through
//! [`Retirement`](super::Retirement)'s trait.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::BytesMut;

use super::{PeerCommand, PeerDriver, SendCmd};
use crate::a0_transport::AuthenticatedStream;
use crate::a1_callis::link::{AgeAction, keep_current};
use crate::error::{Error, ErrorId};
use crate::reporting::{CallisKind, Counter, Event as Report};
use crate::runtime::callis::{CallisIo, dialler_of};
use crate::runtime::ends::BlobCommand;

impl PeerDriver {
    /// When this peer may be forgotten, if nothing changes: `None` while anything is open,
    /// dialling or in flight either way (see [`Retirement`](super::Retirement)).
    pub(super) fn retire_at(&self) -> Option<std::time::Instant> {
        let down_since = self.down_since?;
        let idle = !self.shutting_down
            && self.callis.is_none()
            && self.dialer.is_idle()
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
    pub(super) fn redirect_unsent(&mut self) {
        let host = &self.retirement.host;
        let peer = &self.peer_id;
        let mut asked = std::collections::HashMap::new();
        let unsent = self.session.take_unsent(|dst| {
            *asked
                .entry(dst)
                .or_insert_with(|| host.can_redirect(peer, dst))
        });
        for (_, msg, p) in unsent {
            let cmd = SendCmd {
                msg: msg.into(),
                done: p.done,
                permit: p._permit,
            };
            if let Err(cmd) = self.retirement.host.redirect(&self.peer_id, cmd) {
                self.handle_send(cmd);
            } else {
                tracing::debug!(peer = %self.peer_id, "unsent message handed to another replica");
            }
        }
    }

    /// Asks the domus to forget this peer; true when it did (the driver then ends).
    pub(super) fn retire(&mut self) -> bool {
        let unreachable = self.reachability.why_not().is_some();
        if !self.retirement.host.forget(
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
                    .host
                    .attach_again(*stream, CallisKind::Primary, prefix);
            }
        }
        true
    }

    pub(super) fn recheck(&mut self) {
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

    pub(super) fn begin_shutdown(&mut self) {
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
    pub(super) fn shut_down_error(&self) -> Error {
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
    pub(super) fn attach(&mut self, new: AuthenticatedStream, prefix: BytesMut) {
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

    pub(super) fn drop_stream(&mut self) {
        self.close_callis(true);
    }

    /// Closes the current callis; `peer_down`: the peer is reported disconnected too (false
    /// when a newer callis replaces it at once).
    pub(super) fn close_callis(&mut self, peer_down: bool) {
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
    /// [`CallisAge`](crate::a1_callis::link::CallisAge). A callis we dialled gets a
    /// replacement dial, which takes over when it attaches; either side closes it a quarter of
    /// the age later if it is still in use.
    pub(super) fn on_age_timer(&mut self) {
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
    pub(super) fn maybe_dial(&mut self) {
        if !self.shutting_down
            && self.callis.is_none()
            && self.dialer.is_idle()
            && self.session.in_flight() > 0
        {
            self.dialer.start();
        }
    }

    pub(super) fn dial_failed(&mut self, error: Error) {
        let permanent = error.id().is_permanent_dial_failure();
        tracing::debug!(peer = %self.peer_id, error = %error, permanent, "dial failed");
        let rec = &self.ctx.recorder;
        if error.id() == ErrorId::IdentityMismatch {
            rec.inc(Counter::identity_mismatches);
            if let Some(addr) = self.dialer.addr() {
                self.retirement.host.not_at(&self.peer_id, addr);
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
}
