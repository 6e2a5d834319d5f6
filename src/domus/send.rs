//! The send path every API shares: check a send (domus open, message type, size, timeout),
//! take the peer's in-flight room (at once, or waiting in line until the send's deadline),
//! and hand the message to the peer's driver; and the [`Receipt`] a caller awaits.
//!
//! It never blocks a thread and holds no lock across an `.await`: the only waits are for
//! room (bounded by the send's deadline) and for the resolver (bounded by `resolve_timeout`).

use super::DomusInner;
use super::peers::PeerRef;
use super::receipt::{Receipt, ReceiptKind};
use crate::a0_transport::{DomusAddr, DomusId};
use crate::a1_callis::headers::Headers;
use crate::error::{Error, ErrorId};
use crate::reporting::{Counter, Event};
use crate::runtime::budget::{InFlight, InFlightBudget};
use crate::runtime::completion::{Completion, SingleSlot};
use crate::runtime::domus_closed;
use crate::runtime::peer::{Deadline, Handover, QueuedSend, SendBatch, SendCmd, record_failure};
use crate::taberna::RESERVED_TABERNA_BASE;
use crate::taberna::{MessageClass, MessageType, TabernaId};
use bytes::Bytes;
use std::sync::Arc;
use std::time::Duration;

/// Per-send options.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct SendOptions {
    /// How long to wait for the answer; default `DomusConfig::send_timeout`.
    pub timeout: Option<Duration>,
    /// The taberna the receiver sees as the source; default `TabernaId(0)`.
    pub source: Option<TabernaId>,
    /// Headers the message carries ([`Headers`]; none by default). Within this domus's
    /// `max_headers` and `max_headers_len`, and the receiver's (it refuses more with
    /// `HeadersTooLarge`); they count toward `max_message_len`.
    pub headers: Headers,
}

/// The shortest timeout a send may ask for.
pub(super) const MIN_SEND_TIMEOUT: Duration = Duration::from_millis(1);

/// The longest timeout a send may ask for (as `DomusConfig::send_timeout`): a message is never
/// replayed past it, which bounds how long a peer must remember what it delivered.
pub(super) const MAX_SEND_TIMEOUT: Duration = Duration::from_secs(3600);

impl SendOptions {
    /// The send's timeout (this option's, else `default`) and its deadline from now; a
    /// timeout outside 1 ms..=1 h is refused with `InvalidConfig` (a huge one would overflow
    /// the clock).
    pub(super) fn deadline(
        &self,
        default: Duration,
    ) -> Result<(Duration, tokio::time::Instant), Error> {
        let timeout = self.checked_timeout(default)?;
        let now = tokio::time::Instant::now();
        Ok((timeout, now.checked_add(timeout).unwrap_or(now)))
    }

    /// The send's timeout: this option's, else `default`; outside 1 ms..=1 h it is refused
    /// with `InvalidConfig`.
    fn checked_timeout(&self, default: Duration) -> Result<Duration, Error> {
        let timeout = self.timeout.unwrap_or(default);
        if !(MIN_SEND_TIMEOUT..=MAX_SEND_TIMEOUT).contains(&timeout) {
            return Err(Error::invalid_config(
                "SendOptions::timeout",
                format!("{timeout:?} is outside {MIN_SEND_TIMEOUT:?}..={MAX_SEND_TIMEOUT:?}"),
            ));
        }
        Ok(timeout)
    }

    /// Sets the timeout (1 ms to 1 h; others are refused when the send starts).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Sets the source taberna.
    pub fn source(mut self, source: TabernaId) -> Self {
        self.source = Some(source);
        self
    }

    /// Sets the headers.
    pub fn headers(mut self, headers: Headers) -> Self {
        self.headers = headers;
        self
    }
}

/// Takes room for `send` at `peer` and hands it over there (it moves from a driver that
/// cannot deliver it); gives it back, with its old room, when `peer` has no room or no
/// driver.
pub(super) fn move_send(peer: &PeerRef, send: SendCmd) -> Result<(), SendCmd> {
    let Some(permit) = peer.budget.try_take(send.msg.size()) else {
        return Err(send);
    };
    let SendCmd {
        msg,
        done,
        permit: old,
    } = send;
    match peer
        .sends
        .push(Handover::One(SendCmd { msg, done, permit }))
    {
        Ok(()) => Ok(()),
        Err(Handover::One(SendCmd { msg, done, .. })) => Err(SendCmd {
            msg,
            done,
            permit: old,
        }),
        // Never: a batch was not pushed.
        Err(Handover::Batch(_)) => Ok(()),
    }
}

/// What [`DomusInner::check_send`] found: how long the send may take and where it comes
/// from. No clock was read: a send that goes straight to its driver is given its deadline
/// there; one that must wait first takes [`deadline`](Self::deadline) when it starts to.
pub(super) struct CheckedSend {
    pub(super) timeout: Duration,
    pub(super) source: TabernaId,
}

impl CheckedSend {
    /// The message for the peer's driver, which stamps its deadline.
    #[inline]
    pub(super) fn outgoing(
        &self,
        taberna: TabernaId,
        msg_type: MessageType,
        (payload, headers): (Bytes, Headers),
    ) -> QueuedSend {
        QueuedSend {
            dst: taberna.0,
            src: self.source.0,
            msg_type: msg_type.0,
            headers,
            payload,
            // A timeout is at most an hour (MAX_SEND_TIMEOUT): its nanoseconds fit a u64.
            deadline: Deadline::After(u64::try_from(self.timeout.as_nanos()).unwrap_or(u64::MAX)),
        }
    }

    /// The send's deadline, from now: for a send that must wait (for a route, for room)
    /// before it reaches its driver, which then keeps it (the wait counts).
    pub(super) fn deadline(&self) -> tokio::time::Instant {
        let now = tokio::time::Instant::now();
        now.checked_add(self.timeout).unwrap_or(now)
    }
}

/// The headers a send carries: its options' (within this domus's `max_headers` and
/// `max_headers_len`, and with a `payload_len`-byte payload within `max_message_len`), with
/// the trace context of the span the send is made in when the `otel` feature finds one.
pub(super) fn checked_headers(
    config: &super::DomusConfig,
    options: &SendOptions,
    payload_len: usize,
) -> Result<Headers, Error> {
    let mut headers = options.headers.clone();
    crate::observe::attach_current_trace(&mut headers);
    if headers.is_empty() {
        return Ok(headers);
    }
    let (count, len) = (headers.len(), headers.encoded_len());
    if count > usize::from(config.max_headers) || len > config.max_headers_len {
        return Err(Error::new(
            ErrorId::HeadersTooLarge,
            format!(
                "{count} headers of {len} bytes are over this domus's limits ({} headers, {} bytes: max_headers, max_headers_len)",
                config.max_headers, config.max_headers_len
            ),
        ));
    }
    if payload_len.saturating_add(headers.wire_len()) > config.max_message_len {
        return Err(Error::new(
            ErrorId::PayloadTooLarge,
            format!(
                "payload of {payload_len} bytes and headers of {} exceed max_message_len ({}); headers count toward it",
                headers.wire_len(),
                config.max_message_len
            ),
        ));
    }
    Ok(headers)
}

/// How admission waits for an in-flight slot.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Wait {
    UntilDeadline,
    No,
}

/// Takes one in-flight slot and `bytes` of the peer's budget: at once when they are free (no
/// timer), else waiting in line until `deadline` (or failing at once when `wait` is `No`);
/// either failure is `LocalQueueFull`. A wait the peer's driver turns away (the peer shut
/// down) fails with its reason, `PeerShutDown`. The message was never sent in every case.
pub(super) async fn acquire(
    budget: &Arc<InFlightBudget>,
    bytes: u32,
    wait: Wait,
    deadline: tokio::time::Instant,
    peer: &DomusId,
) -> Result<InFlight, Error> {
    if let Some(taken) = budget.try_take(bytes) {
        return Ok(taken);
    }
    if wait == Wait::No {
        return Err(Error::new(
            ErrorId::LocalQueueFull,
            format!(
                "the in-flight room to {peer} is used up (max_in_flight_per_peer / max_in_flight_bytes_per_peer)"
            ),
        ));
    }
    tokio::time::timeout_at(deadline, budget.take(bytes))
        .await
        .map_err(|_| {
            Error::new(
                ErrorId::LocalQueueFull,
                format!(
                    "the in-flight room to {peer} did not free up before the send's deadline; the message was never sent"
                ),
            )
        })?
}

impl DomusInner {
    /// Every caller holds a handle that keeps the domus from being dropped (a [`Domus`] or a
    /// [`Destination`]), so only `shutdown` can have closed it.
    pub(super) fn check_open(&self) -> Result<(), Error> {
        if self.closed.load(std::sync::atomic::Ordering::Acquire) {
            return Err(Error::new(
                ErrorId::DomusClosed,
                format!("{} has been shut down", self.local_id),
            ));
        }
        Ok(())
    }

    /// The checks every send makes before it goes anywhere: the domus is open, the type is an
    /// application type, the payload fits `max_message_len`, the timeout is in range.
    pub(super) fn check_send(
        &self,
        taberna: TabernaId,
        msg_type: MessageType,
        payload: &Bytes,
        options: &SendOptions,
    ) -> Result<(CheckedSend, Headers), Error> {
        self.check_open()?;
        // A2 types are the mesh services' own: they go to the services' reserved tabernas only.
        let service = msg_type.class() == MessageClass::A2 && taberna.0 >= RESERVED_TABERNA_BASE;
        if msg_type.class() != MessageClass::A3 && !service {
            return Err(Error::new(
                ErrorId::InvalidMessageType,
                format!(
                    "message type {:#x} is not an application (A3) type; use MessageType::app(n)",
                    msg_type.0
                ),
            ));
        }
        let config = self.config.load();
        if payload.len() > config.max_message_len {
            return Err(Error::new(
                ErrorId::PayloadTooLarge,
                format!(
                    "payload of {} bytes exceeds max_message_len ({}); send large data as a blob",
                    payload.len(),
                    config.max_message_len
                ),
            ));
        }
        let timeout = options.checked_timeout(config.send_timeout)?;
        // Most sends carry no headers (and, without the otel feature, gain none): no call.
        let headers = if options.headers.is_empty() && !cfg!(feature = "otel") {
            Headers::new()
        } else {
            checked_headers(&config, options, payload.len())?
        };
        Ok((
            CheckedSend {
                timeout,
                source: options.source.unwrap_or(TabernaId(0)),
            },
            headers,
        ))
    }

    /// Takes the peer's in-flight room for `msg`: at once when it is free, else by waiting
    /// in line (see [`wait_for_room`](Self::wait_for_room)).
    pub(super) async fn room_for(
        &self,
        peer: &PeerRef,
        peer_id: &DomusId,
        msg: &QueuedSend,
        wait: Wait,
        deadline: tokio::time::Instant,
    ) -> Result<InFlight, Error> {
        let size = msg.size();
        // Callers box this future (it is the slow path), so what it waits on is not boxed
        // again: one allocation per waiting send.
        match peer.budget.try_take(size) {
            Some(permit) => Ok(permit),
            None => {
                let a3 = MessageType(msg.msg_type).class() == MessageClass::A3;
                self.wait_for_room(peer, peer_id, size, a3, wait, deadline)
                    .await
            }
        }
    }

    /// Hands an admitted message (its room taken) to the peer's driver.
    pub(super) fn hand_over(
        self: &Arc<Self>,
        peer: &PeerRef,
        msg: QueuedSend,
        permit: InFlight,
    ) -> Result<Receipt, Error> {
        let (done, slot) = SingleSlot::new();
        self.hand_over_to(peer, msg, permit, done)?;
        Ok(Receipt {
            kind: ReceiptKind::Slot(slot),
        })
    }

    /// Hands a batch of admitted messages to the peer's driver in one push; gives it back
    /// when the driver is gone (the caller sends them one by one instead, which finds or
    /// makes the peer's next driver).
    pub(super) fn hand_over_batch(
        &self,
        peer: &PeerRef,
        batch: SendBatch,
    ) -> Result<(), SendBatch> {
        match peer.sends.push(Handover::Batch(batch)) {
            Ok(()) => Ok(()),
            Err(Handover::Batch(batch)) => Err(batch),
            // Never: one send was not pushed.
            Err(Handover::One(_)) => Ok(()),
        }
    }

    /// Hands an admitted message to the peer's driver, its outcome to go to `done`.
    pub(super) fn hand_over_to(
        self: &Arc<Self>,
        peer: &PeerRef,
        msg: QueuedSend,
        permit: InFlight,
        done: Completion,
    ) -> Result<(), Error> {
        let Err(Handover::One(cmd)) = peer
            .sends
            .push(Handover::One(SendCmd { msg, done, permit }))
        else {
            return Ok(());
        };
        // The driver is gone while the domus runs: it retired (the peer was forgotten while
        // idle) just as this send found it. A new driver takes the message, with room of its
        // own.
        if !self.closed.load(std::sync::atomic::Ordering::Acquire) {
            let again = self.peer(
                &peer.id,
                peer.addr.load_full().map(|a| DomusAddr::clone(&a)),
            );
            if move_send(&again, cmd).is_ok() {
                return Ok(());
            }
        }
        let e = domus_closed();
        record_failure(&self.recorder, &e);
        Err(e)
    }

    /// Waits in line for `size` bytes and a slot of the peer's in-flight room until `deadline`
    /// (or fails at once for `Wait::No`). A failure is an outbound queue overrun, counted and
    /// published; a wait that reached the deadline says why when the peer is unreachable (the
    /// send was never sent because of that, not because the peer was slow).
    pub(super) async fn wait_for_room(
        &self,
        peer: &PeerRef,
        peer_id: &DomusId,
        size: u32,
        a3: bool,
        wait: Wait,
        deadline: tokio::time::Instant,
    ) -> Result<InFlight, Error> {
        let taken = acquire(&peer.budget, size, wait, deadline, peer_id).await;
        // Taking room is all this waits for: any of these means the queue was full.
        if taken.as_ref().is_err_and(|e| e.id().is_queue_overrun()) {
            self.recorder.inc(if a3 {
                Counter::queue_overruns_send_a3
            } else {
                Counter::queue_overruns_send_a2
            });
            self.recorder.event(Event::Backpressure {
                peer: peer_id.clone(),
            });
        }
        let taken = taken.map_err(|e| match (e.id(), peer.reachability.why_not()) {
            (ErrorId::LocalQueueFull, Some(why)) if wait == Wait::UntilDeadline => Error::new(
                why.id(),
                format!(
                    "waited for room until the send's deadline; the message was never sent: {}",
                    why.message()
                ),
            ),
            _ => e,
        });
        if let Err(e) = &taken {
            record_failure(&self.recorder, e);
        }
        taken
    }
}
