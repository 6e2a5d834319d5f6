//! The registry of one domus's local tabernas, and the admission a delivery passes before a
//! handler sees it: the taberna exists, the sender is on its allow-list, the message type is
//! accepted (and an A2 type goes to a service taberna only), the inbox has room. A refusal is
//! answered at once and counted; an inline taberna's handler is called here, on the
//! delivering driver.
//!
//! Must not block: the table is an immutable snapshot read without a lock (registering copies
//! it, one writer at a time), and a delivery is offered with `try_send`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use arc_swap::ArcSwap;

use super::inline::{self, InlineAnswer, InlineHandler, InlineRequest, InlineTaberna};
use super::request::AnswerTarget;
use super::{
    MessageClass, MessageType, RESERVED_TABERNA_BASE, Taberna, TabernaId, TabernaOptions,
    TabernaRequest,
};
use crate::a0_transport::DomusId;
use crate::a1_callis::session::Answer;
use crate::error::{Error, ErrorId};
use crate::reporting::{Counter, Event, LogKind, Recorder};
use crate::runtime::{Inbound, InboundMessage, InboundRun, Intake};

impl Inbound for Registry {
    fn take_in(&self, m: InboundMessage) -> Intake {
        // Inline tabernas and refusals are answered here, without a TabernaRequest or an
        // answer hop: the driver writes the answer itself.
        {
            let entries = self.entries.load();
            let refused = |error: ErrorId, reason: &str| {
                self.recorder.refused(error);
                why_refused(TabernaId(m.dst), m.peer.id(), error, reason, 1);
                Intake::Answered(Answer::refusal(error, reason))
            };
            let Some(entry) = entries.get(&TabernaId(m.dst)) else {
                return refused(
                    ErrorId::UnknownTaberna,
                    "no such taberna on the receiving domus",
                );
            };
            if let Some((error, reason)) = Self::check(
                entry,
                TabernaId(m.dst),
                m.peer.id(),
                MessageType(m.msg_type),
            ) {
                return refused(error, reason);
            }
            if let Inbox::Inline(handler, calls) = &entry.inbox {
                if m.blob.is_some() {
                    return refused(
                        ErrorId::MessageTypeNotAccepted,
                        "an inline taberna takes no blobs",
                    );
                }
                let view = InlineRequest {
                    peer: &m.peer,
                    source: TabernaId(m.src),
                    destination: TabernaId(m.dst),
                    message_type: MessageType(m.msg_type),
                    payload: &m.payload,
                    headers: &m.headers,
                };
                return Intake::AnsweredByHandler(self.call_inline(handler.as_ref(), calls, view));
            }
        }
        let mut request = TabernaRequest::new(
            m.peer,
            TabernaId(m.src),
            TabernaId(m.dst),
            MessageType(m.msg_type),
            m.payload,
            AnswerTarget::Remote(m.answer),
        );
        request.blob = m.blob;
        let request = request.with_headers(m.headers);
        if self.offer(request) {
            Intake::Queued
        } else {
            Intake::Refused
        }
    }

    fn take_in_run(&self, run: InboundRun<'_>, intake: &mut dyn FnMut(u64, Intake)) {
        self.deliver_run(run, intake);
    }
}

impl Registry {
    /// [`Inbound::take_in_run`]: the run's taberna is looked up and checked once.
    fn deliver_run(&self, run: InboundRun<'_>, intake: &mut dyn FnMut(u64, Intake)) {
        let batch = run.run;
        let dst = TabernaId(batch.dst);
        let msg_type = MessageType(batch.msg_type);
        let entries = self.entries.load();
        let entry = entries.get(&dst);
        let refusal = match entry {
            None => Some((
                ErrorId::UnknownTaberna,
                "no such taberna on the receiving domus",
            )),
            Some(entry) => Self::check(entry, dst, run.peer.id(), msg_type),
        };
        let (Some(entry), None) = (entry, refusal) else {
            let (error, reason) = refusal.unwrap_or((
                ErrorId::UnknownTaberna,
                "no such taberna on the receiving domus",
            ));
            why_refused(dst, run.peer.id(), error, reason, batch.len());
            for m in batch.iter() {
                self.recorder.refused(error);
                intake(m.id, Intake::Answered(Answer::refusal(error, reason)));
            }
            return;
        };
        match &entry.inbox {
            Inbox::Inline(handler, calls) => {
                let n = batch.len();
                let first = calls.fetch_add(n, Ordering::Relaxed);
                for (k, m) in batch.iter().enumerate() {
                    let view = InlineRequest {
                        peer: run.peer,
                        source: TabernaId(batch.src),
                        destination: dst,
                        message_type: msg_type,
                        payload: &m.payload,
                        headers: &m.headers,
                    };
                    let timed = first.wrapping_add(k).is_multiple_of(INLINE_SAMPLE);
                    let answer = self.call_inline_timed(handler.as_ref(), timed, view);
                    intake(m.id, Intake::AnsweredByHandler(answer));
                }
            }
            Inbox::Queue(inbox) => {
                for m in batch.iter() {
                    let request = TabernaRequest::new(
                        run.peer.clone(),
                        TabernaId(batch.src),
                        dst,
                        msg_type,
                        m.payload,
                        AnswerTarget::Remote((run.answer)(m.id)),
                    )
                    .with_headers(m.headers);
                    let queued = self.enqueue(entry, inbox, request);
                    intake(
                        m.id,
                        if queued {
                            Intake::Queued
                        } else {
                            Intake::Refused
                        },
                    );
                }
            }
        }
    }
}

/// The "why" event of deliveries refused before any handler saw them (target `vicus::why`,
/// debug level): which taberna, which peer, the error and the reason, and how many messages.
fn why_refused(taberna: TabernaId, peer: &DomusId, error: ErrorId, reason: &str, messages: usize) {
    tracing::debug!(
        target: "vicus::why",
        why = "refused",
        taberna = taberna.0,
        peer = %peer,
        error = error.name(),
        reason,
        messages,
        "deliveries refused before any handler saw them"
    );
}

/// The table of local tabernas. Its keys are this domus's own registrations (a peer only
/// looks them up), so a cheap multiplicative hash of the id serves instead of SipHash: every
/// delivery looks one up.
type Tabernas = HashMap<TabernaId, Arc<Entry>, std::hash::BuildHasherDefault<IdHasher>>;

/// Hashes a `TabernaId` (one `u64`) by a Fibonacci multiplication.
#[derive(Default)]
struct IdHasher(u64);

impl std::hash::Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(*b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0 ^ n).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

/// A registered taberna's admission rules and inbox.
struct Entry {
    options: TabernaOptions,
    inbox: Inbox,
}

/// Where an admitted delivery goes.
enum Inbox {
    /// A queue workers take from. Unbounded as a channel; bounded by the depth check in
    /// `offer`, so the depth can follow the live `default_inbox_depth`.
    Queue(async_channel::Sender<TabernaRequest>),
    /// A handler called on the delivering driver, and its call count (one call in
    /// [`INLINE_SAMPLE`] is timed).
    Inline(Arc<dyn InlineHandler>, AtomicUsize),
}

/// One inline call in this many is timed.
const INLINE_SAMPLE: usize = 64;

/// The local tabernas of one domus. Reads (every send and delivery) load an immutable
/// snapshot without a lock; registering or removing a taberna copies the table and publishes
/// the copy, one writer at a time. No lock is held across an `.await`.
pub(crate) struct Registry {
    entries: ArcSwap<Tabernas>,
    writer: Mutex<()>,
    /// Bumped on every change of the table (a destination that chose between a local taberna
    /// and a peer looks again).
    generation: AtomicUsize,
    /// The depth of inboxes registered without one (live: `default_inbox_depth`).
    default_depth: AtomicUsize,
    recorder: Arc<Recorder>,
}

impl Registry {
    pub(crate) fn new(default_depth: usize, recorder: Arc<Recorder>) -> Self {
        Self {
            entries: ArcSwap::default(),
            writer: Mutex::new(()),
            generation: AtomicUsize::new(0),
            default_depth: AtomicUsize::new(default_depth),
            recorder,
        }
    }

    /// Applies a new `default_inbox_depth` to every inbox registered without its own.
    pub(crate) fn set_default_depth(&self, depth: usize) {
        self.default_depth.store(depth, Ordering::Relaxed);
    }

    pub(crate) fn contains(&self, id: TabernaId) -> bool {
        self.entries.load().contains_key(&id)
    }

    fn update<R>(&self, change: impl FnOnce(&mut Tabernas) -> R) -> R {
        let _writer = self.writer.lock().unwrap_or_else(PoisonError::into_inner);
        let mut entries = Tabernas::clone(&self.entries.load());
        let result = change(&mut entries);
        self.entries.store(Arc::new(entries));
        self.generation.fetch_add(1, Ordering::AcqRel);
        result
    }

    /// Changes so far to the table of local tabernas.
    pub(crate) fn generation(&self) -> usize {
        self.generation.load(Ordering::Acquire)
    }

    pub(crate) fn register(
        self: &Arc<Self>,
        id: TabernaId,
        options: TabernaOptions,
    ) -> Result<Taberna, Error> {
        let rx = self.update(|entries| {
            if entries.contains_key(&id) {
                return Err(Error::new(
                    ErrorId::TabernaAlreadyRegistered,
                    format!("{id} is already registered on this domus"),
                ));
            }
            let (tx, rx) = async_channel::unbounded();
            entries.insert(
                id,
                Arc::new(Entry {
                    options,
                    inbox: Inbox::Queue(tx),
                }),
            );
            Ok(rx)
        })?;
        Ok(Taberna {
            id,
            inbox: Box::pin(rx),
            registry: Arc::downgrade(self),
        })
    }

    /// Registers an inline taberna: `handler` answers each delivery on the delivering driver.
    pub(crate) fn register_inline(
        self: &Arc<Self>,
        id: TabernaId,
        options: TabernaOptions,
        handler: Arc<dyn InlineHandler>,
    ) -> Result<InlineTaberna, Error> {
        self.update(|entries| {
            if entries.contains_key(&id) {
                return Err(Error::new(
                    ErrorId::TabernaAlreadyRegistered,
                    format!("{id} is already registered on this domus"),
                ));
            }
            entries.insert(
                id,
                Arc::new(Entry {
                    options,
                    inbox: Inbox::Inline(handler, AtomicUsize::new(0)),
                }),
            );
            Ok(())
        })?;
        Ok(InlineTaberna {
            id,
            registry: Arc::downgrade(self),
        })
    }

    /// Runs an inline handler on one delivery: catches a panic (the message is answered
    /// `RequestDropped`), times one call in [`INLINE_SAMPLE`].
    fn call_inline(
        &self,
        handler: &dyn InlineHandler,
        calls: &AtomicUsize,
        request: InlineRequest<'_>,
    ) -> Answer {
        let timed = calls
            .fetch_add(1, Ordering::Relaxed)
            .is_multiple_of(INLINE_SAMPLE);
        self.call_inline_timed(handler, timed, request)
    }

    /// Runs an inline handler on one delivery, timing the call when `timed`.
    fn call_inline_timed(
        &self,
        handler: &dyn InlineHandler,
        timed: bool,
        request: InlineRequest<'_>,
    ) -> Answer {
        let started = timed.then(std::time::Instant::now);
        let span = crate::observe::delivery_span(
            request.destination.0,
            request.message_type.0,
            request.peer.id(),
            request.headers,
        );
        let call =
            || std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| handler.handle(request)));
        let answer = if span.is_disabled() {
            call()
        } else {
            span.in_scope(call)
        };
        if let Some(started) = started {
            let took = started.elapsed();
            if took > inline::SLOW_INLINE_CALL {
                self.recorder.inc(Counter::inline_handlers_slow);
                if let Some(suppressed) = self.recorder.log_allowed(LogKind::InlineHandlerSlow) {
                    tracing::warn!(
                        taberna = request.destination.0,
                        ?took,
                        suppressed,
                        "an inline handler took long: it runs on the peer's driver and must not block"
                    );
                }
            }
        }
        match answer {
            Ok(InlineAnswer::Accept) => Answer::Accepted,
            Ok(InlineAnswer::Reply(payload)) => Answer::Replied(payload),
            Ok(InlineAnswer::Reject { code, reason }) => Answer::application_reject(code, reason),
            Err(_) => {
                if let Some(suppressed) = self.recorder.log_allowed(LogKind::InlineHandlerSlow) {
                    tracing::warn!(
                        taberna = request.destination.0,
                        suppressed,
                        "an inline handler panicked; its message is answered RequestDropped"
                    );
                }
                Answer::refusal(ErrorId::RequestDropped, "the inline handler panicked")
            }
        }
    }

    /// Puts an admitted request in `entry`'s inbox `inbox` if its depth allows; else refuses
    /// it (`TabernaBusy`, or `TabernaShutdown` when the taberna is going away).
    fn enqueue(
        &self,
        entry: &Entry,
        inbox: &async_channel::Sender<TabernaRequest>,
        request: TabernaRequest,
    ) -> bool {
        let remote = request.is_remote();
        let refuse = |mut request: TabernaRequest, error: ErrorId, reason: &str| {
            if remote {
                self.recorder.refused(error);
            }
            why_refused(request.destination, request.peer.id(), error, reason, 1);
            request.finish(Answer::refusal(error, reason));
        };
        let depth = entry
            .options
            .inbox_depth
            .unwrap_or_else(|| self.default_depth.load(Ordering::Relaxed));
        if inbox.len() >= depth {
            self.recorder.inc(Counter::queue_overruns_inbox);
            tracing::debug!(
                target: "vicus::why",
                why = "queue_overrun",
                taberna = request.destination.0,
                peer = %request.peer.id(),
                depth,
                "the taberna's inbox is full: the delivery is refused TabernaBusy"
            );
            self.recorder.event(Event::QueueOverrun {
                taberna: request.destination.0,
            });
            refuse(request, ErrorId::TabernaBusy, "the taberna's inbox is full");
            return false;
        }
        match inbox.try_send(request) {
            Ok(()) => true,
            Err(async_channel::TrySendError::Full(r)) => {
                refuse(r, ErrorId::TabernaBusy, "the taberna's inbox is full");
                false
            }
            Err(async_channel::TrySendError::Closed(r)) => {
                refuse(r, ErrorId::TabernaShutdown, "the taberna is shutting down");
                false
            }
        }
    }

    /// Why `entry` refuses a delivery from `peer` of `message_type`, if it does.
    fn check(
        entry: &Entry,
        taberna: TabernaId,
        peer: &DomusId,
        message_type: MessageType,
    ) -> Option<(ErrorId, &'static str)> {
        // A2 types are the mesh services' own, for their reserved tabernas only. Every send
        // API refuses anything else, but a peer may write its own frames: the receiver is the
        // boundary.
        if message_type.class() == MessageClass::A2 && taberna.0 < RESERVED_TABERNA_BASE {
            return Some((
                ErrorId::InvalidMessageType,
                "an A2 (service) message type is for vicus's own service tabernas only",
            ));
        }
        if entry
            .options
            .allowed_peers
            .as_ref()
            .is_some_and(|allowed| !allowed.contains(peer))
        {
            return Some((
                ErrorId::Forbidden,
                "the sender is not on this taberna's allow-list",
            ));
        }
        if entry
            .options
            .accepted_types
            .as_ref()
            .is_some_and(|types| !types.contains(&message_type.0))
        {
            return Some((
                ErrorId::MessageTypeNotAccepted,
                "this taberna does not accept this message type",
            ));
        }
        None
    }

    pub(super) fn unregister(&self, id: TabernaId) {
        self.update(|entries| entries.remove(&id));
    }

    /// Closes every inbox (shutdown): workers see the end of their stream.
    pub(crate) fn close_all(&self) {
        self.update(|entries| {
            for entry in entries.values() {
                if let Inbox::Queue(inbox) = &entry.inbox {
                    inbox.close();
                }
            }
            entries.clear();
        });
    }

    /// Offers a request to its taberna. On refusal the request is answered (rejected) here,
    /// and a request from a peer is counted as refused (by reason). Returns whether it reached
    /// the inbox (the caller counts a peer's as received).
    pub(crate) fn offer(&self, request: TabernaRequest) -> bool {
        let remote = request.is_remote();
        let refuse = |mut request: TabernaRequest, error: ErrorId, reason: &str| {
            if remote {
                self.recorder.refused(error);
            }
            why_refused(request.destination, request.peer.id(), error, reason, 1);
            request.finish(Answer::refusal(error, reason));
        };
        let refusal = {
            let entries = self.entries.load();
            match entries.get(&request.destination) {
                None => Some((
                    ErrorId::UnknownTaberna,
                    "no such taberna on the receiving domus",
                )),
                Some(entry) => match Self::check(
                    entry,
                    request.destination,
                    request.peer.id(),
                    request.message_type,
                ) {
                    Some(refusal) => Some(refusal),
                    None => match &entry.inbox {
                        Inbox::Inline(_, _) if request.blob.is_some() => Some((
                            ErrorId::MessageTypeNotAccepted,
                            "an inline taberna takes no blobs",
                        )),
                        Inbox::Inline(handler, calls) => {
                            let view = InlineRequest {
                                peer: &request.peer,
                                source: request.source,
                                destination: request.destination,
                                message_type: request.message_type,
                                payload: &request.payload,
                                headers: &request.headers,
                            };
                            let answer = self.call_inline(handler.as_ref(), calls, view);
                            let mut request = request;
                            request.finish(answer);
                            return true;
                        }
                        Inbox::Queue(inbox) => return self.enqueue(entry, inbox, request),
                    },
                },
            }
        };
        if let Some((error, reason)) = refusal {
            refuse(request, error, reason);
        }
        false
    }
}
