//! [`Destination`]: the handle a sender keeps for one taberna, and [`Window`], the pipelined
//! sender built on it; and [`RouteCache`], the one send path every send API takes ("check,
//! take room, hand over"): a destination's, a window's, and the domus's own
//! ([`Domus::send`](super::Domus::send), which keeps one route cache per taberna).
//!
//! A route cache resolves its route once — a local taberna, or a peer and its handles — and
//! keeps the answer until the resolver says routes changed (or a local taberna was registered
//! or removed), so the sends through it skip the resolver, the peer table and their locks. A
//! resolver that cannot signal changes is asked on every send. A destination also keeps its
//! choice among a taberna's replicas; the domus's own caches keep a sole route only, so each
//! of its sends picks a replica as the resolver's weights ask.
//!
//! This module decides nothing the send path does not: every check, limit and error is the
//! one of [`DomusInner::check_send`](super::DomusInner::check_send) and the admission in `send.rs`.
//! It holds no lock across an `.await` (it holds none at all: the caches are `ArcSwap`s).

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use tokio_util::either::Either;
use tokio_util::sync::DropGuard;
use tracing::Instrument;

use super::{
    CheckedSend, Delivery, DomusInner, Outcome, PeerRef, Receipt, ReceiptKind, SendOptions, Wait,
};
use crate::a0_transport::DomusId;
use crate::error::Error;
use crate::runtime::completion::{Completion, CompletionRing, SingleSlot};
use crate::runtime::peer::{Deadline, QueuedSend, SendBatch};
use crate::taberna::{MessageType, TabernaId};

/// Where a destination's sends go, as last resolved.
enum Target {
    /// A taberna on this domus.
    Local,
    /// A taberna on a peer.
    Remote { id: DomusId, peer: Arc<PeerRef> },
}

/// A send in a window: its slot in the window's ring, or a receipt (sends off the fast path),
/// or its outcome already taken from the ring (with the outcome of an older send, under the
/// same lock) and not handed out yet.
#[derive(Debug)]
enum InWindow {
    Slot(u64),
    Receipt(Receipt),
    Taken(Outcome),
}

impl From<Receipt> for InWindow {
    fn from(receipt: Receipt) -> Self {
        InWindow::Receipt(receipt)
    }
}

/// A completion read through a [`Receipt`] (a pooled slot: nothing allocated on the steady
/// path).
fn receipt() -> (Completion, Receipt) {
    let (done, slot) = SingleSlot::new();
    (
        done,
        Receipt {
            kind: ReceiptKind::Slot(slot),
        },
    )
}

/// A resolution and the generations it is valid for.
struct Resolved {
    routes: u64,
    resolver: u64,
    tabernas: usize,
    target: Target,
}

/// The route of one taberna as last resolved, and the send path through it: shared by a
/// [`Destination`]'s clones, and by the domus's own sends to a taberna
/// ([`DomusInner::route_cache`]), so that [`Domus::send`](super::Domus::send) takes the same fast
/// path.
///
/// Invariant: a cached resolution is used only while it is fresh (the resolver signals route
/// changes, and neither the routes nor the local tabernas changed since it was made). A
/// `sticky` cache keeps a choice among several replicas (a destination sticks to its pick);
/// the domus's caches keep only a taberna's sole route, so its sends still pick a replica
/// each, as the resolver's weights ask.
pub(super) struct RouteCache {
    taberna: TabernaId,
    /// The domus the taberna must be on ([`Domus::destination_on`]); `None`: wherever the
    /// resolver routes the taberna.
    on: Option<DomusId>,
    sticky: bool,
    cache: ArcSwapOption<Resolved>,
}

impl RouteCache {
    pub(super) fn new(taberna: TabernaId, on: Option<DomusId>, sticky: bool) -> Self {
        Self {
            taberna,
            on,
            sticky,
            cache: ArcSwapOption::empty(),
        }
    }

    /// The send path through this route. The fast path — a fresh cached route to a peer
    /// with room — is synchronous and takes no reference count: it reads the cache through a
    /// guard and hands the message over, its outcome to the completion `done` makes. A fresh
    /// route without room boxes only the wait for room; everything else (resolving, a local
    /// taberna) is one boxed future and gives a receipt. So the send future stays small.
    pub(super) async fn admit_with<R: From<Receipt>>(
        &self,
        inner: &Arc<DomusInner>,
        msg_type: MessageType,
        payload: Bytes,
        // Borrowed: the caller's future holds the options once, this one a reference.
        options: &SendOptions,
        wait: Wait,
        done: impl FnOnce() -> (Completion, R),
    ) -> Result<R, Error> {
        let (checked, headers) = inner.check_send(self.taberna, msg_type, &payload, options)?;
        let mut msg = checked.outgoing(self.taberna, msg_type, (payload, headers));
        let cached = self.cache.load();
        let waits_for_room = match cached.as_deref().filter(|r| self.fresh(inner, r)) {
            Some(Resolved {
                target: Target::Remote { peer, .. },
                ..
            }) => {
                if let Some(permit) = peer.budget.try_take(msg.size()) {
                    let (completion, out) = done();
                    return inner
                        .hand_over_to(peer, msg, permit, completion)
                        .map(|()| out);
                }
                true
            }
            _ => false,
        };
        let resolved = arc_swap::Guard::into_inner(cached);
        if let (
            true,
            Some(Resolved {
                target: Target::Remote { id, peer },
                ..
            }),
        ) = (waits_for_room, resolved.as_deref())
        {
            // Only the wait is boxed (a waiting send costs that allocation and no more), and
            // the route is held by one reference count. The wait counts against the send's
            // deadline, which it keeps.
            let deadline = checked.deadline();
            msg.deadline = Deadline::At(deadline.into_std());
            let permit = Box::pin(inner.room_for(peer, id, &msg, wait, deadline)).await?;
            return inner.hand_over(peer, msg, permit).map(R::from);
        }
        drop(resolved);
        Box::pin(self.admit_slow(inner, checked, msg, wait))
            .await
            .map(R::from)
    }

    /// A window's batch on the fast path: every payload checked, then — when the route is a
    /// fresh cached peer with room for all of them — the whole batch handed over at once (one
    /// check of the route, one take of the room, one push, the outcomes to consecutive
    /// tickets of `ring` from `first_ticket`). `Ok(false)`: nothing was sent, send them one by
    /// one (no fresh route to a peer, no room for them all, the driver gone).
    pub(super) fn admit_batch_now(
        &self,
        inner: &Arc<DomusInner>,
        msg_type: MessageType,
        payloads: &[Bytes],
        options: &SendOptions,
        (ring, first_ticket): (&Arc<CompletionRing>, u64),
    ) -> Result<bool, Error> {
        // The largest payload stands for all: every other check is the same for each.
        let Some(largest) = payloads.iter().max_by_key(|p| p.len()) else {
            return Ok(true);
        };
        let (checked, headers) = inner.check_send(self.taberna, msg_type, largest, options)?;
        let cached = self.cache.load();
        let Some(Resolved {
            target: Target::Remote { peer, .. },
            ..
        }) = cached.as_deref().filter(|r| self.fresh(inner, r))
        else {
            return Ok(false);
        };
        let slots = u32::try_from(payloads.len()).unwrap_or(u32::MAX);
        let bytes = payloads.iter().fold(0u32, |sum, p| {
            sum.saturating_add(u32::try_from(p.len()).unwrap_or(u32::MAX))
        });
        let Some(permit) = peer.budget.try_take_many(slots, bytes) else {
            return Ok(false);
        };
        let msgs = payloads
            .iter()
            .map(|p| checked.outgoing(self.taberna, msg_type, (p.clone(), headers.clone())))
            .collect();
        let batch = SendBatch {
            msgs,
            ring: ring.clone(),
            first_ticket,
            permit,
        };
        // Given back (with its room) when the driver is gone: sent one by one then.
        Ok(inner.hand_over_batch(peer, batch).is_ok())
    }

    /// A send that missed the fast path: no fresh cached route (resolve it), a local taberna,
    /// or no room at the peer now (wait for it).
    async fn admit_slow(
        &self,
        inner: &Arc<DomusInner>,
        checked: CheckedSend,
        mut msg: QueuedSend,
        wait: Wait,
    ) -> Result<Receipt, Error> {
        // Resolving and waiting count against the send's deadline, which it keeps.
        let deadline = checked.deadline();
        msg.deadline = Deadline::At(deadline.into_std());
        let resolved = match self.fresh_cached(inner) {
            Some(resolved) => resolved,
            None => self.resolve(inner, deadline).await?,
        };
        match &resolved.target {
            Target::Local => Ok(inner.send_local(
                self.taberna,
                checked.source,
                MessageType(msg.msg_type),
                (msg.payload, msg.headers),
                checked.timeout,
                None,
            )),
            Target::Remote { id, peer } => {
                let permit = inner.room_for(peer, id, &msg, wait, deadline).await?;
                inner.hand_over(peer, msg, permit)
            }
        }
    }

    /// The cached resolution (a reference count), while it still holds.
    fn fresh_cached(&self, inner: &DomusInner) -> Option<Arc<Resolved>> {
        self.cache.load_full().filter(|r| self.fresh(inner, r))
    }

    /// Whether a cached resolution still holds.
    fn fresh(&self, inner: &DomusInner, resolved: &Resolved) -> bool {
        inner.routing.followed
            && resolved.routes == inner.routing.current()
            && resolved.resolver == inner.routing.resolver_generation()
            && resolved.tabernas == inner.registry.generation()
    }

    /// Resolves the route as a send through the domus does, and caches it (a choice among
    /// several replicas only when `sticky`).
    async fn resolve(
        &self,
        inner: &Arc<DomusInner>,
        deadline: tokio::time::Instant,
    ) -> Result<Arc<Resolved>, Error> {
        // Read before resolving: a change from here on leaves the cache stale, never wrong.
        let routes = inner.routing.current();
        let resolver = inner.routing.resolver_generation();
        let tabernas = inner.registry.generation();
        let mut keep = true;
        let target = match &self.on {
            Some(id) if id == &inner.local_id => Target::Local,
            Some(id) => Target::Remote {
                id: id.clone(),
                peer: Box::pin(inner.peer_by_id(id, deadline)).await?,
            },
            None if inner.registry.contains(self.taberna) => Target::Local,
            None => {
                let (id, peer, sole) = inner.route_to_peer_sole(self.taberna, deadline).await?;
                keep = sole || self.sticky;
                Target::Remote { id, peer }
            }
        };
        let resolved = Arc::new(Resolved {
            routes,
            resolver,
            tabernas,
            target,
        });
        if keep {
            self.cache.store(Some(resolved.clone()));
        }
        Ok(resolved)
    }

    /// The peer the route named when it was last resolved.
    fn peer(&self) -> Option<DomusId> {
        match self.cache.load().as_deref().map(|r| &r.target) {
            Some(Target::Remote { id, .. }) => Some(id.clone()),
            _ => None,
        }
    }
}

/// A handle for sending to one taberna, from [`Domus::destination`](super::Domus::destination).
///
/// Cheap to clone (the clones share the cached route) and `Send + Sync`; it keeps the domus
/// running, like a [`Domus`](super::Domus) clone. Its sends behave exactly like
/// [`Domus::send`](super::Domus::send) and friends to the same taberna — same checks, answers
/// and errors — and take the same path; a destination also keeps its choice among a
/// taberna's replicas until routes change, where `Domus::send` picks one per send.
#[derive(Clone)]
pub struct Destination {
    inner: Arc<DomusInner>,
    _guard: Arc<DropGuard>,
    route: Arc<RouteCache>,
}

impl std::fmt::Debug for Destination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let target = match self.route.cache.load().as_deref().map(|r| &r.target) {
            None => "unresolved".to_owned(),
            Some(Target::Local) => "local".to_owned(),
            Some(Target::Remote { id, .. }) => id.to_string(),
        };
        f.debug_struct("Destination")
            .field("taberna", &self.route.taberna)
            .field("target", &target)
            .finish()
    }
}

impl Destination {
    pub(super) fn new(
        inner: Arc<DomusInner>,
        guard: Arc<DropGuard>,
        taberna: TabernaId,
        on: Option<DomusId>,
    ) -> Self {
        Self {
            inner,
            _guard: guard,
            route: Arc::new(RouteCache::new(taberna, on, true)),
        }
    }

    /// The taberna this handle sends to.
    pub fn taberna(&self) -> TabernaId {
        self.route.taberna
    }

    /// The peer the route named when it was last resolved (`None` before the first send, or
    /// when the taberna is local).
    pub fn peer(&self) -> Option<DomusId> {
        self.route.peer()
    }

    /// Forgets the cached route: the next send resolves it again.
    pub fn refresh(&self) {
        self.route.cache.store(None);
    }

    /// Sends a message with default options and waits for its answer.
    pub fn send(
        &self,
        msg_type: MessageType,
        payload: Bytes,
    ) -> impl Future<Output = Outcome> + Send + 'static {
        self.send_with(msg_type, payload, SendOptions::default())
    }

    /// Sends a message and waits for its answer.
    pub fn send_with(
        &self,
        msg_type: MessageType,
        payload: Bytes,
        options: SendOptions,
    ) -> impl Future<Output = Outcome> + Send + 'static {
        send_through(
            self.inner.clone(),
            self.route.clone(),
            (msg_type, payload, options),
            Wait::UntilDeadline,
        )
    }

    /// Like [`send_with`](Self::send_with), but fails at once with
    /// [`ErrorId::LocalQueueFull`](crate::ErrorId::LocalQueueFull) when the peer has no free
    /// in-flight room.
    pub fn try_send(
        &self,
        msg_type: MessageType,
        payload: Bytes,
        options: SendOptions,
    ) -> impl Future<Output = Outcome> + Send + 'static {
        send_through(
            self.inner.clone(),
            self.route.clone(),
            (msg_type, payload, options),
            Wait::No,
        )
    }

    /// Admits a send (checks, an in-flight slot) and returns its [`Receipt`] to await later.
    pub fn admit(
        &self,
        msg_type: MessageType,
        payload: Bytes,
        options: SendOptions,
    ) -> impl Future<Output = Result<Receipt, Error>> + Send + 'static {
        admit_through(
            self.inner.clone(),
            self.route.clone(),
            (msg_type, payload, options),
            Wait::UntilDeadline,
        )
    }

    /// A pipelined sender that keeps at most `limit` sends (1 to [`Window::MAX_LIMIT`]) in flight
    /// through this destination and yields their outcomes in send order. Its sends allocate
    /// nothing for their outcomes: the window holds one outcome slot per send it may keep
    /// (about 64 bytes each), made with its first send.
    pub fn window(&self, limit: usize) -> Window {
        let limit = limit.clamp(1, Window::MAX_LIMIT);
        Window {
            destination: self.clone(),
            limit,
            outstanding: VecDeque::with_capacity(limit.min(4096)),
            ring: None,
            next_ticket: 0,
        }
    }

    /// A window's send: its outcome goes to the window's ring (nothing allocated for it),
    /// except on the slow path, which gives a receipt.
    fn admit_into<'a>(
        &'a self,
        msg_type: MessageType,
        payload: Bytes,
        options: &'a SendOptions,
        ring: &'a Arc<CompletionRing>,
        ticket: u64,
    ) -> impl Future<Output = Result<InWindow, Error>> + Send + 'a {
        self.route.admit_with(
            &self.inner,
            msg_type,
            payload,
            options,
            Wait::UntilDeadline,
            move || {
                (
                    Completion::slot(ring.clone(), ticket),
                    InWindow::Slot(ticket),
                )
            },
        )
    }
}

/// A message to send: its type, payload and options.
pub(super) type Message = (MessageType, Bytes, SendOptions);

/// Admits a send through `route`, then waits for the answer (one future, so the admission's
/// state is not kept beside the receipt's). The one path of every send API that waits for
/// its answer.
///
/// The send runs in a `vicus.send` span (debug level) from call to outcome, with the domus,
/// the taberna, the message type and the outcome; like `#[instrument]`, the span is made
/// when the send is called (its parent is the span current then); the message carries its
/// trace context (feature `otel`), so the delivery continues the send.
pub(super) fn send_through(
    inner: Arc<DomusInner>,
    route: Arc<RouteCache>,
    (msg_type, payload, options): Message,
    wait: Wait,
) -> impl Future<Output = Outcome> + Send + 'static {
    let span = tracing::debug_span!(
        "vicus.send",
        domus = %inner.local_id,
        taberna = route.taberna.0,
        msg_type = msg_type.0,
        outcome = tracing::field::Empty,
    );
    let send = send_unobserved(inner, route, (msg_type, payload, options), wait);
    if span.is_disabled() {
        return Either::Left(send);
    }
    // Boxed: the observed path's state (its span twice) is paid for only when someone
    // listens; the send future itself stays as small as it was without spans.
    Either::Right(Box::pin(async move {
        let outcome = send.instrument(span.clone()).await;
        span.record("outcome", outcome_name(&outcome));
        outcome
    }))
}

async fn send_unobserved(
    inner: Arc<DomusInner>,
    route: Arc<RouteCache>,
    (msg_type, payload, options): Message,
    wait: Wait,
) -> Outcome {
    let receipt = route
        .admit_with(&inner, msg_type, payload, &options, wait, receipt)
        .await?;
    receipt.await
}

/// How a send ended, for its span: `accepted`, `replied`, or the error's name.
pub(super) fn outcome_name(outcome: &Outcome) -> &'static str {
    match outcome {
        Ok(Delivery::Accepted) => "accepted",
        Ok(Delivery::Replied(_)) => "replied",
        Err(e) => e.id().name(),
    }
}

/// Admits a send through `route` and returns its receipt.
pub(super) async fn admit_through(
    inner: Arc<DomusInner>,
    route: Arc<RouteCache>,
    (msg_type, payload, options): Message,
    wait: Wait,
) -> Result<Receipt, Error> {
    route
        .admit_with(&inner, msg_type, payload, &options, wait, receipt)
        .await
}

/// A pipelined sender, from [`Destination::window`]: it keeps up to its limit of sends in
/// flight and hands their outcomes back in the order they were sent — the receipt queue one
/// would otherwise write by hand.
///
/// Drive it from a task on the runtime's workers (`tokio::spawn`) rather than from
/// `block_on`'s own thread: every send and outcome crosses between the window and its peer's
/// driver, and a thread outside the runtime makes each crossing a wake-up of another thread.
/// Measured with the benchmark's one-way 64 B workload on two cores: the same rate, about
/// 25% less CPU per message on a worker.
///
/// ```no_run
/// # async fn run(domus: vicus::Domus) -> Result<(), vicus::Error> {
/// # use bytes::Bytes;
/// # const KIND: vicus::MessageType = vicus::MessageType::app(1);
/// let mut window = domus.destination(vicus::TabernaId(2)).window(1024);
/// for n in 0u32..100_000 {
///     // Full: the oldest send's outcome comes back before the next one goes out.
///     if let Some(outcome) = window.send(KIND, Bytes::copy_from_slice(&n.to_be_bytes())).await? {
///         outcome?;
///     }
/// }
/// while let Some(outcome) = window.next().await {
///     outcome?;
/// }
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Window {
    destination: Destination,
    limit: usize,
    outstanding: VecDeque<InWindow>,
    /// Where the driver puts the outcomes of this window's fast-path sends (one slot per
    /// send the window may hold; made on the first such send).
    ring: Option<Arc<CompletionRing>>,
    next_ticket: u64,
}

impl Window {
    /// The most sends a window keeps in flight (a larger limit is taken as this one).
    pub const MAX_LIMIT: usize = 65_536;

    /// Sends a message with default options (see [`send_with`](Self::send_with)).
    pub fn send(
        &mut self,
        msg_type: MessageType,
        payload: Bytes,
    ) -> impl Future<Output = Result<Option<Outcome>, Error>> + Send + '_ {
        self.send_with(msg_type, payload, SendOptions::default())
    }

    /// Sends a message. When the window is full, first waits for the oldest send and returns
    /// its outcome (`Some`); otherwise `None`. An `Err` means this message was not admitted
    /// (the same errors as [`Destination::admit`]); sends already in the window are not
    /// affected.
    pub async fn send_with(
        &mut self,
        msg_type: MessageType,
        payload: Bytes,
        options: SendOptions,
    ) -> Result<Option<Outcome>, Error> {
        let oldest = if self.outstanding.len() >= self.limit {
            self.next().await
        } else {
            None
        };
        let limit = self.limit;
        let ring = self
            .ring
            .get_or_insert_with(|| Arc::new(CompletionRing::new(limit)));
        let ticket = self.next_ticket;
        let entry = self
            .destination
            .admit_into(msg_type, payload, &options, ring, ticket)
            .await?;
        self.next_ticket = ticket.wrapping_add(1);
        self.outstanding.push_back(entry);
        Ok(oldest)
    }

    /// Sends every payload of `payloads` as a message of `msg_type` with `options`, in order —
    /// the fast way to send a burst one already holds: while the route is a cached peer with
    /// room, each stretch that fits the window goes to the peer's driver as one batch (one
    /// check, one take of in-flight room, one hand-over), where [`send_with`](Self::send_with)
    /// does that once per message. When the window fills, it waits for the oldest sends and
    /// pushes their outcomes onto `outcomes`, in send order, as [`send`](Self::send) returns
    /// them. Returns how many messages it sent (all of them, when `Ok`).
    ///
    /// An `Err` is the error of the first message not admitted (the same errors as
    /// [`send_with`](Self::send_with)); the messages before it are in the window (its
    /// [`len`](Self::len) grew by that many), none after it was sent. A payload over the
    /// limit fails the stretch it is in before anything of it is sent.
    pub async fn send_many<I>(
        &mut self,
        msg_type: MessageType,
        payloads: I,
        options: SendOptions,
        outcomes: &mut Vec<Outcome>,
    ) -> Result<usize, Error>
    where
        I: IntoIterator<Item = Bytes>,
    {
        let mut payloads = payloads.into_iter().peekable();
        let mut stretch = Vec::new();
        let mut sent = 0usize;
        while payloads.peek().is_some() {
            if self.outstanding.len() >= self.limit {
                // Full: the oldest outcome, then every one that came with it (answers come in
                // runs), so the next stretch is as long as what came back.
                if let Some(outcome) = self.next().await {
                    outcomes.push(outcome);
                }
                let mut cx = Context::from_waker(std::task::Waker::noop());
                while let Poll::Ready(Some(outcome)) = self.poll_next(&mut cx) {
                    outcomes.push(outcome);
                }
                continue;
            }
            let room = self.limit.saturating_sub(self.outstanding.len());
            stretch.clear();
            stretch.extend(payloads.by_ref().take(room));
            let limit = self.limit;
            let ring = self
                .ring
                .get_or_insert_with(|| Arc::new(CompletionRing::new(limit)))
                .clone();
            let first = self.next_ticket;
            let batched = self.destination.route.admit_batch_now(
                &self.destination.inner,
                msg_type,
                &stretch,
                &options,
                (&ring, first),
            )?;
            if batched {
                for k in 0..stretch.len() as u64 {
                    let ticket = first.wrapping_add(k);
                    self.outstanding.push_back(InWindow::Slot(ticket));
                }
                self.next_ticket = first.wrapping_add(stretch.len() as u64);
                sent = sent.saturating_add(stretch.len());
                continue;
            }
            // One by one: the window has room for each.
            for payload in stretch.drain(..) {
                let ticket = self.next_ticket;
                let entry = self
                    .destination
                    .admit_into(msg_type, payload, &options, &ring, ticket)
                    .await?;
                self.next_ticket = ticket.wrapping_add(1);
                self.outstanding.push_back(entry);
                sent = sent.saturating_add(1);
            }
        }
        Ok(sent)
    }

    /// The outcome of the oldest send still in the window; `None` when it is empty. Dropping
    /// this future before it is ready loses nothing: the send stays the oldest.
    pub async fn next(&mut self) -> Option<Outcome> {
        std::future::poll_fn(|cx| self.poll_next(cx)).await
    }

    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<Outcome>> {
        let outcome = match self.outstanding.front_mut() {
            None => return Poll::Ready(None),
            Some(InWindow::Receipt(receipt)) => ready!(Pin::new(receipt).poll(cx)),
            // A placeholder goes in; the entry leaves the window below.
            Some(InWindow::Taken(outcome)) => std::mem::replace(outcome, Ok(Delivery::Accepted)),
            Some(InWindow::Slot(ticket)) => {
                let ticket = *ticket;
                let Some(ring) = &self.ring else {
                    return Poll::Ready(Some(Err(crate::runtime::domus_closed())));
                };
                let mut taker = ring.taker();
                let Some(outcome) = taker.take(ticket) else {
                    taker.wait_for(ticket, cx);
                    return Poll::Pending;
                };
                // The outcomes behind it came in the same answer, mostly: take them under
                // this lock rather than one lock (and one crossing of the driver's cache
                // lines) each.
                for entry in self.outstanding.iter_mut().skip(1) {
                    let InWindow::Slot(next) = *entry else { break };
                    let Some(outcome) = taker.take(next) else {
                        break;
                    };
                    *entry = InWindow::Taken(outcome);
                }
                outcome
            }
        };
        self.outstanding.pop_front();
        Poll::Ready(Some(outcome))
    }

    /// Waits for every send in the window and returns their outcomes in send order.
    pub async fn drain(&mut self) -> Vec<Outcome> {
        let mut out = Vec::with_capacity(self.outstanding.len());
        while let Some(outcome) = self.next().await {
            out.push(outcome);
        }
        out
    }

    /// Sends in the window (admitted, outcome not taken yet).
    pub fn len(&self) -> usize {
        self.outstanding.len()
    }

    /// Whether no send is in the window.
    pub fn is_empty(&self) -> bool {
        self.outstanding.is_empty()
    }

    /// The most sends the window keeps in flight.
    pub fn limit(&self) -> usize {
        self.limit
    }
}
