//! The session's timers: send deadlines, the HELLO deadline, keepalive and read idleness, the
//! frame read deadline, and write progress (T33); `poll_timeout` says when the next is due.
//! Pure: time comes in as `now`.

use super::*;

impl<T> Session<T> {
    /// The driver's report after each write attempt on the current callis: whether bytes
    /// moved, and whether bytes still wait to be written. Writes that make no progress for
    /// `idle_timeout` close the callis at once (T33: the peer stopped reading; a CLOSE could
    /// not reach it anyway), and a decided close waits at most [`CLOSE_LINGER`](crate::a1_callis::link::CLOSE_LINGER) for writes
    /// that make no progress (see [`must_abandon`](Self::must_abandon) and
    /// [`WriteWatch`]).
    pub fn write_progress(&mut self, now: Instant, progressed: bool, waiting: bool) {
        self.last_now = Some(now);
        self.writes.wrote(now, progressed, waiting);
        if self.link == Link::Closing {
            self.writes.closing(now);
        }
    }

    /// Whether the driver must drop the callis now, whatever is still queued for it: its
    /// writes stopped making progress (T33), or its close could not be written in time.
    /// Everything unanswered is replayed on the next callis, as after any cut.
    pub fn must_abandon(&self) -> bool {
        self.abandon
    }

    /// The write deadlines at `now`: a stalled writer closes and is abandoned; a close that
    /// cannot get out in time is abandoned.
    pub(super) fn check_write_progress(&mut self, now: Instant) {
        if self.link == Link::Down {
            return;
        }
        match self.writes.check(now, self.config.idle_timeout) {
            WriteVerdict::Fine => {}
            WriteVerdict::Stalled => {
                self.close(Error::new(
                    ErrorId::ConnectionLost,
                    format!(
                        "the peer read nothing this side wrote for {:?} (idle_timeout); it is stalled or does not read",
                        self.config.idle_timeout
                    ),
                ));
                self.abandon = true;
            }
            WriteVerdict::Abandon => self.abandon = true,
        }
    }

    /// Handles everything due at `now`: send deadlines, HELLO deadline, keepalive, idle,
    /// write progress.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.last_now = Some(now);
        self.handle_timers(now);
        // Last: a close the timers just decided (idle, hello) is judged too, so a callis whose
        // writes stalled long ago is given up now rather than at a deadline already past.
        self.check_write_progress(now);
    }

    pub(super) fn handle_timers(&mut self, now: Instant) {
        loop {
            let retained = &self.retained;
            let due = self.deadlines.pop_due(now, |at, id| {
                retained.get(id).is_some_and(|r| r.deadline == at)
            });
            let Some(id) = due else {
                break;
            };
            let error = self.expiry_error(id);
            self.fail(id, error);
        }
        if let Some(since) = self.partial_frame_since
            && matches!(self.link, Link::Open | Link::AwaitingHello { .. })
            && now.saturating_duration_since(since) >= self.config.frame_read_timeout
        {
            self.partial_frame_since = None;
            self.close(Error::new(
                ErrorId::ProtocolViolation,
                format!(
                    "a frame took longer than {:?} to arrive (frame_read_timeout)",
                    self.config.frame_read_timeout
                ),
            ));
            return;
        }
        match self.link {
            Link::AwaitingHello { deadline } if now >= deadline => {
                self.close(Error::new(
                    ErrorId::ProtocolViolation,
                    "the peer sent no HELLO within hello_timeout",
                ));
            }
            Link::Open => {
                if let Some(last) = self.last_rx
                    && now.saturating_duration_since(last) >= self.config.idle_timeout
                {
                    self.close(Error::new(
                        ErrorId::ConnectionLost,
                        format!(
                            "nothing received for {:?} (idle_timeout); the peer is gone or stalled",
                            self.config.idle_timeout
                        ),
                    ));
                    return;
                }
                let due = self.next_ping.is_some_and(|t| now >= t);
                if due {
                    self.next_ping = now.checked_add(self.config.keepalive_interval);
                    self.probe(now);
                }
            }
            _ => {}
        }
    }

    /// The next instant [`handle_timeout`](Self::handle_timeout) has work.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let mut next = self.deadlines.earliest().map(|(t, _)| t);
        let mut consider = |t: Option<Instant>| {
            if let Some(t) = t {
                next = Some(next.map_or(t, |n| n.min(t)));
            }
        };
        if matches!(self.link, Link::Open | Link::AwaitingHello { .. }) {
            consider(
                self.partial_frame_since
                    .and_then(|t| t.checked_add(self.config.frame_read_timeout)),
            );
        }
        match self.link {
            Link::AwaitingHello { deadline } => consider(Some(deadline)),
            Link::Open => {
                consider(
                    self.last_rx
                        .and_then(|t| t.checked_add(self.config.idle_timeout)),
                );
                consider(self.next_ping);
            }
            _ => {}
        }
        if !self.abandon && self.link != Link::Down {
            consider(self.writes.poll_timeout(self.config.idle_timeout));
        }
        next
    }

    /// Queues a PING to measure the RTT. One probe at a time; a missing PONG is caught by the
    /// idle timeout.
    pub(super) fn probe(&mut self, now: Instant) {
        if self.ping_outstanding.is_none() {
            self.pings_sent = self.pings_sent.wrapping_add(1);
            self.ping_outstanding = Some((self.pings_sent, now));
            self.ping_to_send = Some(self.pings_sent);
        }
    }
}
