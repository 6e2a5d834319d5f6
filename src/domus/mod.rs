//! The domus: one node of the mesh. It ties the A0 transport, the runtime's per-peer drivers,
//! the local tabernas and the resolver together, and owns every task it spawns (all of them
//! on its task tracker).
//!
//! The send path is: check the message type and size locally, short-circuit to a local
//! taberna when the id is ours, else resolve the route (bounded by `resolve_timeout`), take an
//! in-flight slot on the peer (waiting, or failing fast for `try_send`), and hand the message to
//! the peer's driver; the returned [`Receipt`] resolves when the peer answers.
//!
//! Shared tables (peers, address→identity pins) are behind `std::sync::Mutex`es held for a
//! lookup or an insert, never across an `.await`; each is bounded (pins: by `DomusConfig::max_pinned_addresses`). Dropping the last [`Domus`] handle cancels
//! every task it spawned.

mod config;
mod destination;
mod pins;

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::AsyncReadExt;
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio_util::sync::{CancellationToken, DropGuard};
use tokio_util::task::TaskTracker;

pub use crate::runtime::Delivery;
pub use crate::runtime::ends::{BlobReceiver, BlobSender};
pub use config::DomusConfig;
pub use destination::{Destination, Outcome, Window};

use crate::a0_transport::{
    AuthConfig, AuthenticatedStream, CallisStream, Connector, DomusAddr, DomusId, Listener,
    PeerIdentity, Tally, Transport,
};
use crate::a1_callis::blob::{
    BLOB_OPEN_PREFIX_LEN, BLOB_OPEN_TYPE, encode_blob_open, stream_parity,
};
use crate::a1_callis::frame::{FrameType, HEADER_LEN};
use crate::a1_callis::reply_budget::ReplyBudget;
use crate::a1_callis::session::{A3_MESSAGE_TYPE_BASE, Answer, Outgoing, Session, too_large_reply};
use crate::error::{Error, ErrorId};
use crate::reporting::{C, Event, Recorder, Reporting};
use crate::resolve::{
    Candidate, CandidatesFuture, ResolverFeed, Route, RouteChanges, RouteResolver, SimpleResolver,
    choose,
};
use crate::runtime::blob::{BlobContext, BlobDriver, BlobLinks};
use crate::runtime::budget::{InFlight, InFlightBudget};
use crate::runtime::completion::Completion;
use crate::runtime::ends as blob;
use crate::runtime::ends::BlobCommand;
use crate::runtime::peer::{
    DriverContext, Forget, PeerCommand, PeerDriver, PeerLinks, Reachability, Retirement, SendCmd,
    record_failure,
};
use crate::runtime::queue::WakeQueue;
use crate::runtime::{answer_result, domus_closed, rand_u64};
use crate::taberna::{
    AnswerSink, MessageClass, MessageType, Registry, Taberna, TabernaId, TabernaOptions,
    TabernaRequest,
};

/// Per-send options.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct SendOptions {
    /// How long to wait for the answer; default `DomusConfig::send_timeout`.
    pub timeout: Option<Duration>,
    /// The taberna the receiver sees as the source; default `TabernaId(0)`.
    pub source: Option<TabernaId>,
}

pub use crate::taberna::RESERVED_TABERNA_BASE;

fn check_not_reserved(id: TabernaId) -> Result<(), Error> {
    if id.0 >= RESERVED_TABERNA_BASE {
        return Err(Error::invalid_config(
            "TabernaId",
            format!(
                "{id} is reserved for vicus's own services (ids from {RESERVED_TABERNA_BASE:#x} \
                 up); choose a smaller id"
            ),
        ));
    }
    Ok(())
}

/// The shortest timeout a send may ask for.
const MIN_SEND_TIMEOUT: Duration = Duration::from_millis(1);
/// The longest timeout a send may ask for (as `DomusConfig::send_timeout`): a message is never
/// replayed past it, which bounds how long a peer must remember what it delivered.
const MAX_SEND_TIMEOUT: Duration = Duration::from_secs(3600);

impl SendOptions {
    /// The send's timeout (this option's, else `default`) and its deadline from now; a
    /// timeout outside 1 ms..=1 h is refused with `InvalidConfig` (a huge one would overflow
    /// the clock).
    fn deadline(&self, default: Duration) -> Result<(Duration, tokio::time::Instant), Error> {
        let timeout = self.timeout.unwrap_or(default);
        if !(MIN_SEND_TIMEOUT..=MAX_SEND_TIMEOUT).contains(&timeout) {
            return Err(Error::invalid_config(
                "SendOptions::timeout",
                format!("{timeout:?} is outside {MIN_SEND_TIMEOUT:?}..={MAX_SEND_TIMEOUT:?}"),
            ));
        }
        let now = tokio::time::Instant::now();
        Ok((timeout, now.checked_add(timeout).unwrap_or(now)))
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
}

/// An admitted send: await it for the outcome. Holding many receipts is how one task keeps
/// thousands of sends in flight.
pub struct Receipt {
    inner: ReceiptKind,
}

enum ReceiptKind {
    /// The peer's driver completes it.
    Remote(oneshot::Receiver<Result<Delivery, Error>>),
    /// A taberna on this domus answers it, within the send's timeout (kept here: no task
    /// waits for a local answer).
    Local(Box<LocalAnswer>),
}

/// A local send waiting for its taberna's answer.
struct LocalAnswer {
    answer: oneshot::Receiver<Answer>,
    deadline: Pin<Box<tokio::time::Sleep>>,
    timeout: Duration,
    context: String,
    max_reply: usize,
    recorder: Arc<Recorder>,
}

impl LocalAnswer {
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Result<Delivery, Error>> {
        let context = &self.context;
        let result = match Pin::new(&mut self.answer).poll(cx) {
            Poll::Ready(Ok(Answer::Replied(p))) if p.len() > self.max_reply => {
                answer_result(too_large_reply(p.len(), self.max_reply), context)
            }
            Poll::Ready(Ok(answer)) => answer_result(answer, context),
            Poll::Ready(Err(_)) => Err(Error::new(
                ErrorId::RequestDropped,
                format!("{context} dropped the request"),
            )),
            Poll::Pending => match self.deadline.as_mut().poll(cx) {
                Poll::Ready(()) => Err(Error::new(
                    ErrorId::SendTimeout,
                    format!("{context} did not answer within {:?}", self.timeout),
                )),
                Poll::Pending => return Poll::Pending,
            },
        };
        match &result {
            Ok(Delivery::Accepted) => self.recorder.inc(C::messages_accepted),
            Ok(Delivery::Replied(_)) => self.recorder.inc(C::messages_replied),
            Err(e) => record_failure(&self.recorder, e),
        }
        Poll::Ready(result)
    }
}

impl std::fmt::Debug for Receipt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match &self.inner {
            ReceiptKind::Remote(_) => "remote",
            ReceiptKind::Local(_) => "local",
        };
        f.debug_struct("Receipt").field("to", &kind).finish()
    }
}

impl Future for Receipt {
    type Output = Result<Delivery, Error>;

    /// A local send is counted (accepted, replied, failed) when its receipt resolves.
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match &mut self.inner {
            ReceiptKind::Remote(rx) => Pin::new(rx).poll(cx).map(|r| {
                r.unwrap_or_else(|_| {
                    Err(Error::new(
                        ErrorId::DomusClosed,
                        "the domus was shut down before the send finished",
                    ))
                })
            }),
            ReceiptKind::Local(local) => local.poll(cx),
        }
    }
}

/// Encodes and decodes application messages for the typed layer ([`Domus::send_typed`]).
pub trait MessageCodec: Send + Sync + 'static {
    /// The message type.
    type Message: Send + 'static;
    /// Encodes a message.
    fn encode(&self, message: &Self::Message) -> Result<Bytes, Error>;
    /// Decodes a message.
    fn decode(&self, bytes: &Bytes) -> Result<Self::Message, Error>;
}

/// Builds a [`Domus`].
pub struct DomusBuilder {
    auth: AuthConfig,
    listen: Listen,
    resolver: Option<Arc<dyn RouteResolver>>,
    config: DomusConfig,
    provider: Option<Arc<rustls::crypto::CryptoProvider>>,
    connector: Option<Arc<dyn Connector>>,
}

impl std::fmt::Debug for DomusBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DomusBuilder")
            .field("listen", &self.listen)
            .finish_non_exhaustive()
    }
}

/// Where a domus takes inbound calles from.
#[derive(Debug, Clone)]
enum Listen {
    /// `127.0.0.1:0`.
    Default,
    At(DomusAddr),
    /// No listener: the domus only dials.
    Nowhere,
}

impl DomusBuilder {
    /// The address to listen on (TCP, host name or Unix socket). Default: `127.0.0.1:0`.
    /// Undoes [`dial_only`](Self::dial_only).
    pub fn bind(mut self, addr: DomusAddr) -> Self {
        self.listen = Listen::At(addr);
        self
    }

    /// Builds a domus with no listener, for clients and tools: it dials the peers it sends
    /// to, and the answers, replies and blobs come back on the calles it dialled. Nothing
    /// is bound, so no peer can dial it ([`Domus::local_addr`] is `None`); a peer reaches
    /// its tabernas only over a callis it dialled. [`Domus::accept_stream`] still serves a
    /// stream handed to it explicitly. Undoes [`bind`](Self::bind).
    pub fn dial_only(mut self) -> Self {
        self.listen = Listen::Nowhere;
        self
    }

    /// The route resolver. Default: an empty [`SimpleResolver`] (only local tabernas).
    pub fn resolver(mut self, resolver: Arc<dyn RouteResolver>) -> Self {
        self.resolver = Some(resolver);
        self
    }

    /// The configuration. Default: [`DomusConfig::default`].
    pub fn config(mut self, config: DomusConfig) -> Self {
        self.config = config;
        self
    }

    /// Dial peers through `connector` instead of TCP and Unix sockets: the seam an in-memory
    /// or simulated network uses to carry calles (the other end hands its streams to
    /// [`Domus::accept_stream`]). Handshakes, identities and deadlines are unchanged.
    pub fn connector(mut self, connector: Arc<dyn Connector>) -> Self {
        self.connector = Some(connector);
        self
    }

    /// An explicit rustls crypto provider (reported as `"custom"`). Default:
    /// [`default_crypto_provider`](crate::a0_transport::default_crypto_provider).
    pub fn crypto_provider(mut self, provider: Arc<rustls::crypto::CryptoProvider>) -> Self {
        self.provider = Some(provider);
        self
    }

    /// Validates everything, binds the listener (unless [`dial_only`](Self::dial_only)) and
    /// starts the domus on the current tokio runtime.
    pub async fn build(self) -> Result<Domus, Error> {
        self.config.validate()?;
        let provider_name = match &self.provider {
            Some(_) => "custom",
            None => crate::a0_transport::DEFAULT_CRYPTO_PROVIDER,
        };
        if self.provider.is_none() && crate::a0_transport::BOTH_PROVIDERS_COMPILED {
            tracing::warn!(
                "vicus is built with both crypto features, aws-lc-rs and ring; it uses aws-lc-rs. \
                 For ring, depend on vicus with `default-features = false, features = [\"ring\"]`, \
                 or pass a provider to DomusBuilder::crypto_provider"
            );
        }
        let provider = self
            .provider
            .unwrap_or_else(crate::a0_transport::default_crypto_provider);
        let mut transport =
            Transport::with_crypto_provider(self.auth, self.config.transport.clone(), provider)?;
        transport.check_own_chain()?;
        if let Some(connector) = self.connector {
            transport = transport.with_connector(connector);
        }
        let listener = match self.listen {
            Listen::Default => Some(
                transport
                    .listen(&DomusAddr::tcp(([127, 0, 0, 1], 0)))
                    .await?,
            ),
            Listen::At(addr) => Some(transport.listen(&addr).await?),
            Listen::Nowhere => None,
        };
        let local_addr = listener.as_ref().map(|l| l.local_addr().clone());
        let local_id = transport.local_id();
        let cancel = CancellationToken::new();
        let recorder = Recorder::new(&local_id);
        if let Some(l) = &listener {
            recorder.set_listener(l.stats_handle());
        }
        recorder.set_crypto_provider(provider_name);
        match &local_addr {
            Some(addr) => {
                tracing::info!(id = %local_id, addr = %addr, crypto_provider = provider_name, "domus started");
            }
            None => {
                tracing::info!(id = %local_id, crypto_provider = provider_name, "domus started (dial only)");
            }
        }
        let registry = Arc::new(Registry::new(
            self.config.default_inbox_depth,
            recorder.clone(),
        ));
        let epoch = rand_u64() | 1;
        let reply_budget = Arc::new(ReplyBudget::new(self.config.max_retained_reply_bytes));
        let reading = reply_budget.clone();
        recorder.set_retained_replies(Box::new(move || {
            u64::try_from(reading.used()).unwrap_or(u64::MAX)
        }));
        let resolver = self
            .resolver
            .unwrap_or_else(|| Arc::new(SimpleResolver::new()));
        let route_changes = resolver.changes();
        resolver.attach(ResolverFeed::new(&recorder));
        let shared = Arc::new(Shared {
            driver_ctx: Arc::new(DriverContext {
                transport: transport.clone(),
                inbound: registry.clone(),
                local_id: local_id.clone(),
                reconnect_backoff_min: self.config.reconnect_backoff_min,
                reconnect_backoff_max: self.config.reconnect_backoff_max,
                blob_window: self.config.blob_window,
                blob_in_budget: Arc::new(Semaphore::new(self.config.blob_inbound_budget)),
                recorder: recorder.clone(),
            }),
            blob_ctx: Arc::new(BlobContext {
                transport: transport.clone(),
                local_id: local_id.clone(),
                local_epoch: epoch,
                reconnect_backoff_min: self.config.reconnect_backoff_min,
                reconnect_backoff_max: self.config.reconnect_backoff_max,
                recorder: recorder.clone(),
            }),
            recorder,
            blob_out_budget: Arc::new(Semaphore::new(self.config.blob_outbound_budget)),
            reply_budget,
            local_identity: Arc::new(PeerIdentity::new(
                local_id.clone(),
                crate::a0_transport::CertFingerprint([0; 32]),
                None,
            )),
            transport,
            local_id,
            local_addr,
            epoch,
            resolver,
            config: arc_swap::ArcSwap::from_pointee(self.config),
            config_writer: Mutex::new(()),
            registry,
            peers: Mutex::new(HashMap::new()),
            unopened: Mutex::new(Tally::default()),
            pinned: Mutex::new(pins::Pins::default()),
            tasks: TaskTracker::new(),
            cancel: cancel.clone(),
            accept_stop: cancel.child_token(),
            closed: std::sync::atomic::AtomicBool::new(false),
            route_generation: std::sync::atomic::AtomicU64::new(0),
            routes_followed: route_changes.is_some(),
            id_floor: Arc::new(std::sync::atomic::AtomicU64::new(1)),
            down: Mutex::new(HashMap::new()),
        });
        #[cfg(feature = "metrics")]
        {
            let reporting = Reporting {
                recorder: shared.recorder.clone(),
            };
            let stop = shared.accept_stop.clone();
            shared.tasks.spawn(async move {
                let mut tick = tokio::time::interval(crate::reporting::EXPORT_INTERVAL);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        () = stop.cancelled() => {
                            reporting.export_to_metrics();
                            return;
                        }
                        _ = tick.tick() => reporting.export_to_metrics(),
                    }
                }
            });
        }
        shared.tasks.spawn(recheck_peers(
            Arc::downgrade(&shared),
            shared.accept_stop.clone(),
        ));
        if let Some(changes) = route_changes {
            shared.tasks.spawn(follow_routes(
                shared.clone(),
                changes,
                shared.accept_stop.clone(),
            ));
        }
        if let Some(listener) = listener {
            shared.tasks.spawn(accept_loop(
                shared.clone(),
                listener,
                shared.accept_stop.clone(),
            ));
        }
        Ok(Domus {
            shared,
            _guard: Arc::new(cancel.drop_guard()),
        })
    }
}

/// The handles of one peer's two drivers (messages, blobs) and its budgets.
struct PeerRef {
    /// The peer, and the address its drivers were last given (a send that finds the driver
    /// retired hands its message to a new one there).
    id: DomusId,
    addr: arc_swap::ArcSwapOption<DomusAddr>,
    tx: mpsc::UnboundedSender<PeerCommand>,
    /// Sends for the peer's driver, taken in batches.
    sends: Arc<WakeQueue<SendCmd>>,
    /// The peer's in-flight budget: messages and payload bytes, one count.
    budget: Arc<InFlightBudget>,
    blob_tx: mpsc::UnboundedSender<BlobCommand>,
    /// Sending blob streams open with this peer (one permit each).
    blob_out_streams: Arc<Semaphore>,
    /// Blob stream ids allocated so far.
    next_stream: Arc<std::sync::atomic::AtomicU64>,
    /// Whether the peer can be reached (its driver says), for sends that waited for room.
    reachability: Arc<Reachability>,
}

struct PeerHandle {
    /// Shared: one reference count per send instead of one per channel and semaphore.
    links: Arc<PeerRef>,
    /// The address last given to the drivers (told again only when it changes).
    addr: Option<DomusAddr>,
    /// Tabernas sent to whose route named this peer (at most [`ROUTED_MAX`]): re-resolved
    /// when the resolver says its routes changed.
    routed: std::collections::HashSet<TabernaId>,
}

impl PeerHandle {
    /// Tells both drivers of a new address (nothing when it is the one they have).
    fn set_addr(&mut self, addr: DomusAddr) {
        if self.addr.as_ref() == Some(&addr) {
            return;
        }
        let _ = self.links.tx.send(PeerCommand::SetAddr(addr.clone()));
        let _ = self.links.blob_tx.send(BlobCommand::SetAddr(addr.clone()));
        self.links.addr.store(Some(Arc::new(addr.clone())));
        self.addr = Some(addr);
    }
}

/// Verifies the certificates of every connected peer again every `peer_recheck_interval`
/// (see [`DomusConfig::peer_recheck_interval`]). Holds the domus weakly: it keeps nothing
/// alive.
async fn recheck_peers(shared: std::sync::Weak<Shared>, stop: CancellationToken) {
    /// How often a domus with rechecks turned off looks whether they were turned on.
    const OFF_POLL: Duration = Duration::from_secs(1);
    loop {
        let every = match shared.upgrade() {
            Some(s) => s.config.load().peer_recheck_interval,
            None => return,
        };
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(every.unwrap_or(OFF_POLL)) => {}
        }
        let Some(shared) = shared.upgrade() else {
            return;
        };
        if every.is_some() && shared.config.load().peer_recheck_interval.is_some() {
            shared.recheck_all();
        }
    }
}

/// The most routes remembered per peer for [`follow_routes`]; past it, new tabernas are
/// re-read by their next send only.
const ROUTED_MAX: usize = 4096;

/// Re-reads every remembered route each time the resolver signals a change, and moves a peer
/// whose route now names a new address there (its drivers abandon a dial to the old one).
/// A route that no longer names the same peer is forgotten: what waits for the old peer stays
/// with it (it may have been delivered there).
async fn follow_routes(shared: Arc<Shared>, mut changes: RouteChanges, stop: CancellationToken) {
    loop {
        let changed = tokio::select! {
            () = stop.cancelled() => return,
            changed = changes.changed() => changed,
        };
        if !changed {
            return;
        }
        shared
            .route_generation
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        let routed: Vec<(TabernaId, DomusId)> = shared
            .peers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .flat_map(|(id, p)| p.routed.iter().map(move |t| (*t, id.clone())))
            .collect();
        for (taberna, peer) in routed {
            let deadline = tokio::time::Instant::now() + shared.config.load().resolve_timeout;
            let candidates = tokio::select! {
                () = stop.cancelled() => return,
                candidates = shared.candidates(taberna, deadline) => candidates,
            };
            // Among replicas, the peer's own candidate (not the one a send would pick).
            let own = candidates.map(|c| {
                c.iter()
                    .find(|c| c.route.identity.as_ref() == Some(&peer))
                    .map(|c| c.route.addr.clone())
            });
            match own {
                Ok(Some(addr)) => shared.readdress(&peer, addr),
                // Resolvers can fail for a moment; the route is tried again next time.
                Err(e) if e.id() != ErrorId::UnknownTaberna => {}
                _ => {
                    if let Some(p) = shared
                        .peers
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .get_mut(&peer)
                    {
                        p.routed.remove(&taberna);
                    }
                }
            }
        }
    }
}

/// A resolver lookup after its first poll ([`Shared::start_candidates`]).
enum Lookup<'a> {
    Ready(Result<Arc<[Candidate]>, Error>),
    Pending(CandidatesFuture<'a>),
}

fn resolver_panicked(taberna: TabernaId) -> Error {
    Error::new(
        ErrorId::PeerUnavailable,
        format!("the route resolver panicked while resolving {taberna}"),
    )
}

/// Takes room for `send` at `peer` and hands it over there (it moves from a driver that
/// cannot deliver it); gives it back, with its old room, when `peer` has no room or no
/// driver.
fn move_send(peer: &PeerRef, send: SendCmd) -> Result<(), SendCmd> {
    let Some(permit) = peer.budget.try_take(send.msg.size()) else {
        return Err(send);
    };
    let SendCmd {
        msg,
        done,
        permit: old,
    } = send;
    match peer.sends.push(SendCmd { msg, done, permit }) {
        Ok(()) => Ok(()),
        Err(SendCmd { msg, done, .. }) => Err(SendCmd {
            msg,
            done,
            permit: old,
        }),
    }
}

struct Shared {
    transport: Transport,
    driver_ctx: Arc<DriverContext>,
    blob_ctx: Arc<BlobContext>,
    recorder: Arc<Recorder>,
    blob_out_budget: Arc<Semaphore>,
    /// The reply bytes all sessions together may keep for replay.
    reply_budget: Arc<ReplyBudget>,
    local_id: DomusId,
    local_identity: Arc<PeerIdentity>,
    /// `None` for a dial-only domus.
    local_addr: Option<DomusAddr>,
    epoch: u64,
    resolver: Arc<dyn RouteResolver>,
    /// The configuration in force; swapped whole by `ConfigHandle::update`.
    config: arc_swap::ArcSwap<DomusConfig>,
    config_writer: Mutex<()>,
    registry: Arc<Registry>,
    peers: Mutex<HashMap<DomusId, PeerHandle>>,
    /// Authenticated inbound calles waiting for their first frame, per identity (T8).
    unopened: Mutex<Tally<DomusId>>,
    /// Identities learned for routes that named none: bounded by `max_pinned_addresses`,
    /// aged by `peer_retire_after`, dropped when another identity answers there.
    pinned: Mutex<pins::Pins>,
    tasks: TaskTracker,
    cancel: CancellationToken,
    accept_stop: CancellationToken,
    closed: std::sync::atomic::AtomicBool,
    /// Bumped each time the resolver signals that routes changed: a [`Destination`] resolves
    /// again when it differs from the one it resolved at. Stays `None`-like (never bumped, and
    /// destinations resolve on every send) when the resolver cannot signal changes.
    route_generation: std::sync::atomic::AtomicU64,
    /// Whether the resolver signals changes (so resolutions may be cached).
    routes_followed: bool,
    /// The first message id a new session may use: raised past its ids by every session
    /// that ends when its peer is forgotten, so a peer that comes back after that never sees
    /// an id it saw before.
    id_floor: Arc<std::sync::atomic::AtomicU64>,
    /// Peers forgotten while they could not be reached (at most [`DOWN_REMEMBERED`]), keyed
    /// by identity: see [`Down`].
    down: Mutex<HashMap<DomusId, Down>>,
}

/// How many unreachable, forgotten peers a domus remembers.
const DOWN_REMEMBERED: usize = 4096;

/// What a domus remembers of a peer it forgot while the peer could not be reached, at the
/// address it failed at: a candidate naming another address (a replica that came back
/// elsewhere) is not avoided, and a driver dialling another address is not told.
struct Down {
    /// Until when a choice among a taberna's candidates avoids the peer.
    avoid_until: tokio::time::Instant,
    addr: Option<DomusAddr>,
    /// The peer had shut down (its CLOSE said so) and no callis opened since: until when its
    /// next driver is told so (`peer_retire_after`, as long as an idle peer that did not shut
    /// down is remembered), so that sends to it dial once and fail at once with
    /// `PeerShutDown` while it cannot be reached — as they would have with the driver that
    /// retired. Taken by that driver.
    shut_down_until: Option<tokio::time::Instant>,
}

impl Down {
    /// When nothing of it is worth keeping any more.
    fn expires(&self) -> tokio::time::Instant {
        self.shut_down_until
            .map_or(self.avoid_until, |t| t.max(self.avoid_until))
    }
}

/// Forgets an idle peer for its driver (see [`crate::runtime::peer::Retirement`]).
struct Forgetter(std::sync::Weak<Shared>);

impl Forget for Forgetter {
    fn forget(
        &self,
        peer: &DomusId,
        sends: &Arc<WakeQueue<SendCmd>>,
        unreachable: bool,
        shut_down: bool,
    ) -> bool {
        let Some(shared) = self.0.upgrade() else {
            return false;
        };
        let mut peers = shared.peers.lock().unwrap_or_else(PoisonError::into_inner);
        let ours = peers
            .get(peer)
            .is_some_and(|p| Arc::ptr_eq(&p.links.sends, sends));
        if !ours || !sends.close_if_empty() {
            return false;
        }
        if let Some(forgotten) = peers.remove(peer)
            && unreachable
        {
            shared.remember_down(peer, forgotten.addr, shut_down);
        }
        drop(peers);
        shared.recorder.peer_removed(peer);
        // Destinations holding the old driver resolve again before their next send.
        shared
            .route_generation
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        true
    }

    fn can_redirect(&self, peer: &DomusId, taberna: u64) -> bool {
        self.0
            .upgrade()
            .is_some_and(|shared| shared.alternatives(peer, TabernaId(taberna)).is_some())
    }

    fn redirect(&self, peer: &DomusId, send: SendCmd) -> Result<(), SendCmd> {
        let Some(shared) = self.0.upgrade() else {
            return Err(send);
        };
        shared.redirect(peer, send)
    }

    fn attach_again(&self, stream: AuthenticatedStream, kind: FrameType, prefix: BytesMut) {
        if let Some(shared) = self.0.upgrade() {
            shared.attach_inbound(stream, kind, prefix);
        }
    }

    fn not_at(&self, peer: &DomusId, addr: &DomusAddr) {
        let Some(shared) = self.0.upgrade() else {
            return;
        };
        let unpinned = shared
            .pinned
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .unpin(addr, peer);
        if unpinned {
            tracing::debug!(%peer, %addr, "another identity answers at a pinned address; the next send there learns it");
            // Destinations that resolved to the pinned peer resolve again before their next send.
            shared
                .route_generation
                .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        }
    }
}

/// A running node. Cheap to clone; the domus stops when the last clone is dropped (or at
/// [`Domus::shutdown`]).
#[derive(Clone)]
pub struct Domus {
    shared: Arc<Shared>,
    _guard: Arc<DropGuard>,
}

impl std::fmt::Debug for Domus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Domus")
            .field("id", &self.shared.local_id)
            .field("addr", &self.shared.local_addr)
            .finish_non_exhaustive()
    }
}

/// A handle on a domus that does not keep it running (from [`Domus::downgrade`]): helpers
/// that live beside a domus hold one, so dropping the application's last [`Domus`] still stops
/// it.
#[derive(Clone)]
pub struct WeakDomus {
    shared: std::sync::Weak<Shared>,
    guard: std::sync::Weak<DropGuard>,
}

impl WeakDomus {
    /// The domus, unless every [`Domus`] clone is gone (it is then stopping or stopped).
    pub fn upgrade(&self) -> Option<Domus> {
        Some(Domus {
            _guard: self.guard.upgrade()?,
            shared: self.shared.upgrade()?,
        })
    }
}

impl std::fmt::Debug for WeakDomus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WeakDomus")
            .field("alive", &(self.guard.strong_count() > 0))
            .finish_non_exhaustive()
    }
}

/// The live configuration of a domus, from [`Domus::config`].
#[derive(Clone)]
pub struct ConfigHandle {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for ConfigHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("ConfigHandle")
            .field(&self.shared.config.load())
            .finish()
    }
}

impl ConfigHandle {
    /// The configuration in force now.
    pub fn snapshot(&self) -> DomusConfig {
        DomusConfig::clone(&self.shared.config.load())
    }

    /// Changes the configuration: `change` edits a copy, which is validated like the
    /// builder's and must leave the fields fixed at build time alone; then it replaces the
    /// configuration in one step and an [`Event::ConfigReloaded`] is published. On error
    /// nothing changes. Returns the configuration now in force.
    pub fn update(&self, change: impl FnOnce(&mut DomusConfig)) -> Result<DomusConfig, Error> {
        let shared = &self.shared;
        let _writer = shared
            .config_writer
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let current = shared.config.load_full();
        let mut next = DomusConfig::clone(&current);
        change(&mut next);
        let checked = next.validate().and_then(|()| next.check_fixed(&current));
        if let Err(e) = checked {
            shared.recorder.error(e.clone());
            return Err(e);
        }
        shared.registry.set_default_depth(next.default_inbox_depth);
        shared.reply_budget.set_cap(next.max_retained_reply_bytes);
        shared.config.store(Arc::new(next.clone()));
        shared.recorder.event(Event::ConfigReloaded);
        Ok(next)
    }
}

/// What [`Shared::check_send`] found: when the send ends and where it comes from.
struct CheckedSend {
    timeout: Duration,
    deadline: tokio::time::Instant,
    source: TabernaId,
}

impl CheckedSend {
    /// The message for the peer's session.
    fn outgoing(&self, taberna: TabernaId, msg_type: MessageType, payload: Bytes) -> Outgoing {
        Outgoing {
            dst: taberna.0,
            src: self.source.0,
            msg_type: msg_type.0,
            payload,
            deadline: self.deadline.into_std(),
        }
    }
}

/// How admission waits for an in-flight slot.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Wait {
    UntilDeadline,
    No,
}

impl Domus {
    /// Starts building a domus that authenticates with `auth`.
    pub fn builder(auth: AuthConfig) -> DomusBuilder {
        DomusBuilder {
            auth,
            listen: Listen::Default,
            resolver: None,
            config: DomusConfig::default(),
            provider: None,
            connector: None,
        }
    }

    /// The address the domus listens on (with the real port when bound to port 0); `None`
    /// for a [dial-only](DomusBuilder::dial_only) domus.
    pub fn local_addr(&self) -> Option<&DomusAddr> {
        self.shared.local_addr.as_ref()
    }

    /// This domus's identity.
    pub fn identity(&self) -> &DomusId {
        &self.shared.local_id
    }

    /// The TLS crypto provider this domus runs on: `"aws-lc-rs"`, `"ring"` or `"custom"` (see
    /// the crate docs, *Identity and security model*, for how it is chosen).
    pub fn crypto_provider(&self) -> &'static str {
        self.shared.recorder.crypto_provider()
    }

    /// This run's epoch (random; peers use it to detect a restart).
    pub fn epoch(&self) -> u64 {
        self.shared.epoch
    }

    /// The live configuration: [`ConfigHandle::snapshot`] reads it, [`ConfigHandle::update`]
    /// changes it (see [`DomusConfig`] for which fields apply when).
    pub fn config(&self) -> ConfigHandle {
        ConfigHandle {
            shared: self.shared.clone(),
        }
    }

    /// Swaps the authentication material (certificate chain, key, trust anchors, CRLs) for
    /// every future handshake, after validating it; the identity must stay the same.
    /// Established calles keep running, except those whose peer the new material no longer
    /// accepts (a revoked certificate, an anchor removed): they are closed at once. On failure nothing changes and the error is also
    /// published on the error feed; on success an [`Event::AuthReloaded`] is.
    pub fn reload_auth(&self, auth: AuthConfig) -> Result<(), Error> {
        match self.shared.transport.reload_auth(auth) {
            Ok(()) => {
                self.shared.recorder.event(Event::AuthReloaded);
                // Live calles are verified again: a peer the new CRLs revoke (or the new
                // anchors no longer cover) loses its calles now, not at its next handshake.
                self.shared.recheck_all();
                Ok(())
            }
            Err(e) => {
                self.shared.recorder.error(e.clone());
                Err(e)
            }
        }
    }

    /// Serves an inbound callis that arrived over `io`, any byte stream (an in-memory duplex,
    /// a simulated network) rather than this domus's listener: the TLS handshake, the
    /// connection limits and the first frame go exactly as for an accepted socket. The
    /// counterpart of [`DomusBuilder::connector`] on the dialling side. Returns at once; the
    /// work runs on the domus's tasks (and ends with it).
    pub fn accept_stream(&self, io: impl CallisStream) -> Result<(), Error> {
        let shared = &self.shared;
        shared.check_open()?;
        let transport = shared.transport.clone();
        shared.tasks.spawn(serve_inbound(
            shared.clone(),
            shared.accept_stop.clone(),
            async move { transport.accept_over(io).await },
        ));
        Ok(())
    }

    /// Replaces the trust policy (which verified peer ids are accepted) for every future
    /// handshake; established calles are not touched.
    pub fn set_trust_policy(&self, policy: crate::TrustPolicy) {
        self.shared.transport.set_trust_policy(policy);
    }

    /// The A0 transport. Not part of the stable API (its shape follows the transport's
    /// internals); use [`reload_auth`](Self::reload_auth) and
    /// [`set_trust_policy`](Self::set_trust_policy).
    #[doc(hidden)]
    pub fn transport(&self) -> &Transport {
        &self.shared.transport
    }

    /// Registers a taberna with default options.
    pub fn taberna(&self, id: TabernaId) -> Result<Taberna, Error> {
        self.taberna_with(id, TabernaOptions::default())
    }

    /// Registers an inline taberna: `handler` answers each delivery on the driver of the peer
    /// that sent it (the same thread, in the same turn) — no inbox, no worker task, no answer
    /// channel. For cheap handlers that never block or await; see
    /// [`taberna::InlineHandler`](crate::taberna::InlineHandler). Messages from this domus itself
    /// are answered on the sending task. An inline taberna takes no blobs.
    pub fn taberna_inline(
        &self,
        id: TabernaId,
        options: TabernaOptions,
        handler: impl crate::taberna::InlineHandler,
    ) -> Result<crate::taberna::InlineTaberna, Error> {
        check_not_reserved(id)?;
        self.shared.check_open()?;
        options.validate()?;
        self.shared
            .registry
            .register_inline(id, options, Arc::new(handler))
    }

    /// Registers a taberna; options outside their ranges (see [`TabernaOptions`]) are refused
    /// with `InvalidConfig` naming the field.
    pub fn taberna_with(&self, id: TabernaId, options: TabernaOptions) -> Result<Taberna, Error> {
        check_not_reserved(id)?;
        self.service_taberna(id, options)
    }

    /// Registers a taberna for one of vicus's own services (ids in the reserved range).
    pub(crate) fn service_taberna(
        &self,
        id: TabernaId,
        options: TabernaOptions,
    ) -> Result<Taberna, Error> {
        self.shared.check_open()?;
        options.validate()?;
        self.shared.registry.register(id, options)
    }

    /// Sends a message and waits for its answer. The future holds no borrow of the domus.
    pub fn send(
        &self,
        taberna: TabernaId,
        msg_type: MessageType,
        payload: Bytes,
        options: SendOptions,
    ) -> impl Future<Output = Result<Delivery, Error>> + Send + 'static {
        self.shared
            .clone()
            .send_owned(taberna, msg_type, payload, options, Wait::UntilDeadline)
    }

    /// Like [`send`](Self::send), but fails at once with [`ErrorId::LocalQueueFull`] when the
    /// peer has no free in-flight slot.
    pub fn try_send(
        &self,
        taberna: TabernaId,
        msg_type: MessageType,
        payload: Bytes,
        options: SendOptions,
    ) -> impl Future<Output = Result<Delivery, Error>> + Send + 'static {
        self.shared
            .clone()
            .send_owned(taberna, msg_type, payload, options, Wait::No)
    }

    /// Admits a send (checks, routing, an in-flight slot) and returns a [`Receipt`] to await
    /// later: the way to keep many sends in flight from one task.
    pub fn admit(
        &self,
        taberna: TabernaId,
        msg_type: MessageType,
        payload: Bytes,
        options: SendOptions,
    ) -> impl Future<Output = Result<Receipt, Error>> + Send + 'static {
        self.shared
            .clone()
            .admit(taberna, msg_type, payload, options, Wait::UntilDeadline)
    }

    /// Opens a blob stream to a taberna: sends `header` as the opening message (with
    /// `msg_type`, an A3 type) and returns the [`BlobSender`] once the receiving handler has
    /// accepted it (a rejection or a failure is returned here instead). The handler gets the
    /// bytes from [`TabernaRequest::blob`]. Blobs travel on their own callis to the peer, so
    /// they never delay messages; a taberna on this domus gets them directly.
    ///
    /// Fails at once with [`ErrorId::BlobBufferFull`] when `max_blob_streams_per_peer` streams
    /// are already open to that peer or `blob_outbound_budget` is used up (the receiver
    /// answers the same when its limits are reached).
    pub fn send_blob(
        &self,
        taberna: TabernaId,
        msg_type: MessageType,
        header: Bytes,
        options: SendOptions,
    ) -> impl Future<Output = Result<BlobSender, Error>> + Send + 'static {
        let shared = self.shared.clone();
        async move { shared.send_blob(taberna, msg_type, header, options).await }
    }

    /// A handle for sending to `taberna`: it resolves the route once and keeps the answer
    /// until the resolver says routes changed (a resolver that cannot say so is asked on every
    /// send), so a send through it skips the route lookup. Cheap to clone; it keeps the domus
    /// running like a [`Domus`] clone. [`Destination::window`] pipelines many sends.
    pub fn destination(&self, taberna: TabernaId) -> Destination {
        Destination::new(self.shared.clone(), self._guard.clone(), taberna, None)
    }

    /// A [`Destination`] for `taberna` on the domus `peer` specifically, whatever the
    /// resolver routes that taberna to (or when it routes it nowhere): the peer is reached at
    /// the address the resolver gives for it ([`RouteResolver::resolve_domus`]), else over
    /// a callis it already has with this domus — so a server can send to a dial-only client
    /// that contacted it — or at an address learned for it earlier. With no address and no
    /// callis, sends wait for one until their deadline, then fail as not delivered. `peer`
    /// may be this domus itself (the send is then local).
    pub fn destination_on(&self, peer: &DomusId, taberna: TabernaId) -> Destination {
        Destination::new(
            self.shared.clone(),
            self._guard.clone(),
            taberna,
            Some(peer.clone()),
        )
    }

    /// Encodes `message` with `codec` and sends it; a reply is decoded with the same codec.
    /// The message is encoded before this returns; the future owns a clone of the codec and
    /// holds no borrow (`Send + 'static`, like [`send`](Self::send)).
    pub fn send_typed<C: MessageCodec + Clone>(
        &self,
        codec: &C,
        taberna: TabernaId,
        msg_type: MessageType,
        message: &C::Message,
        options: SendOptions,
    ) -> impl Future<Output = Result<Option<C::Message>, Error>> + Send + 'static {
        let encoded = codec.encode(message);
        let codec = codec.clone();
        let shared = self.shared.clone();
        async move {
            let payload = encoded?;
            let delivery = shared
                .admit(taberna, msg_type, payload, options, Wait::UntilDeadline)
                .await?
                .await?;
            match delivery {
                Delivery::Accepted => Ok(None),
                Delivery::Replied(bytes) => codec.decode(&bytes).map(Some),
            }
        }
    }

    /// Closes the calles to `peer` now (primary and blob), without losing anything:
    /// unanswered messages are replayed and open blob streams resume on the next callis,
    /// which is dialled at once when something waits for it, else by the next send — the way
    /// to re-establish a connection (after a network change, say) without rebuilding the
    /// domus. Fails with `PeerUnavailable` when this domus has no session with `peer`.
    pub fn disconnect(&self, peer: &DomusId) -> Result<(), Error> {
        let links = self
            .shared
            .peers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(peer)
            .map(|p| p.links.clone());
        let Some(links) = links else {
            return Err(Error::new(
                ErrorId::PeerUnavailable,
                format!("this domus has no session with {peer}"),
            ));
        };
        let _ = links.tx.send(PeerCommand::Disconnect);
        let _ = links.blob_tx.send(BlobCommand::Disconnect);
        Ok(())
    }

    /// A handle that does not keep this domus running (see [`WeakDomus`]).
    pub fn downgrade(&self) -> WeakDomus {
        WeakDomus {
            shared: Arc::downgrade(&self.shared),
            guard: Arc::downgrade(&self._guard),
        }
    }

    /// The peers with a live session (a peer this domus forgot, see
    /// `DomusConfig::peer_retire_after`, no longer counts).
    pub fn peer_count(&self) -> usize {
        self.shared
            .peers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// Address → identity pins held now (routes without an identity; at most
    /// `DomusConfig::max_pinned_addresses`). A diagnostic for tests, not part of the stable
    /// API.
    #[doc(hidden)]
    pub fn pinned_addresses(&self) -> usize {
        self.shared
            .pinned
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// Tasks this domus is running (accept loop, route follower, handshakes, peer and blob
    /// drivers). A diagnostic for tests, not part of the stable API.
    #[doc(hidden)]
    pub fn task_count(&self) -> usize {
        self.shared.tasks.len()
    }

    /// Graceful shutdown: stop accepting, refuse new sends, let every peer driver write what
    /// it has and close its callis, fail what is unanswered with `DomusClosed`, and close the
    /// tabernas. Bounded by `shutdown_timeout`; after that everything is cancelled.
    pub async fn shutdown(&self) {
        let shared = &self.shared;
        shared.recorder.event(Event::ShutdownStarted);
        shared
            .closed
            .store(true, std::sync::atomic::Ordering::Release);
        let peers = shared.peer_links();
        // The accept loop stops first (peers told of the shutdown find no listener when they
        // dial again); drivers answer what their handlers hold, write their CLOSE and end,
        // within the bound.
        shared.accept_stop.cancel();
        for p in peers {
            let _ = p.tx.send(PeerCommand::Shutdown);
            let _ = p.blob_tx.send(BlobCommand::Shutdown);
        }
        shared.tasks.close();
        if tokio::time::timeout(shared.config.load().shutdown_timeout, shared.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(id = %shared.local_id, "shutdown timed out; cancelling remaining tasks");
        }
        shared.cancel.cancel();
        shared.tasks.wait().await;
        shared.registry.close_all();
        shared
            .peers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
        shared.recorder.peers_cleared();
        shared.recorder.event(Event::ShutdownCompleted);
    }

    /// Metrics, events and errors of this domus.
    pub fn reporting(&self) -> Reporting {
        Reporting {
            recorder: self.shared.recorder.clone(),
        }
    }
}

impl Shared {
    /// Every caller holds a handle that keeps the domus from being dropped (a [`Domus`] or a
    /// [`Destination`]), so only `shutdown` can have closed it.
    fn check_open(&self) -> Result<(), Error> {
        if self.closed.load(std::sync::atomic::Ordering::Acquire) {
            return Err(Error::new(
                ErrorId::DomusClosed,
                format!("{} has been shut down", self.local_id),
            ));
        }
        Ok(())
    }

    /// Admits, then waits for the answer (one future, so the admission's state is not kept
    /// beside the receipt's).
    async fn send_owned(
        self: Arc<Self>,
        taberna: TabernaId,
        msg_type: MessageType,
        payload: Bytes,
        options: SendOptions,
        wait: Wait,
    ) -> Result<Delivery, Error> {
        let receipt = self
            .admit(taberna, msg_type, payload, options, wait)
            .await?;
        receipt.await
    }

    async fn admit(
        self: Arc<Self>,
        taberna: TabernaId,
        msg_type: MessageType,
        payload: Bytes,
        options: SendOptions,
        wait: Wait,
    ) -> Result<Receipt, Error> {
        let checked = self.check_send(taberna, msg_type, &payload, &options)?;
        if self.registry.contains(taberna) {
            return Ok(self.send_local(
                taberna,
                checked.source,
                msg_type,
                payload,
                checked.timeout,
                None,
            ));
        }
        let (peer_id, peer) = self.route_to_peer(taberna, checked.deadline).await?;
        let msg = checked.outgoing(taberna, msg_type, payload);
        match peer.budget.try_take(msg.size()) {
            Some(permit) => self.hand_over(&peer, msg, permit),
            None => {
                // Waiting for room: only the wait is boxed, so the common send stays small
                // and a waiting one costs one allocation of the wait's size.
                let a3 = msg.msg_type >= A3_MESSAGE_TYPE_BASE;
                let permit = Box::pin(self.wait_for_room(
                    &peer,
                    &peer_id,
                    msg.size(),
                    a3,
                    wait,
                    checked.deadline,
                ))
                .await?;
                self.hand_over(&peer, msg, permit)
            }
        }
    }

    /// The checks every send makes before it goes anywhere: the domus is open, the type is an
    /// application type, the payload fits `max_message_len`, the timeout is in range.
    fn check_send(
        &self,
        taberna: TabernaId,
        msg_type: MessageType,
        payload: &Bytes,
        options: &SendOptions,
    ) -> Result<CheckedSend, Error> {
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
        let (timeout, deadline) = options.deadline(config.send_timeout)?;
        Ok(CheckedSend {
            timeout,
            deadline,
            source: options.source.unwrap_or(TabernaId(0)),
        })
    }

    /// Takes the peer's in-flight room for `msg` and hands it to the peer's driver. Room that
    /// is free is taken without waiting and without an allocation; waiting for it is the slow,
    /// boxed path.
    async fn admit_to_peer(
        self: &Arc<Self>,
        peer: &PeerRef,
        peer_id: &DomusId,
        msg: Outgoing,
        wait: Wait,
        deadline: tokio::time::Instant,
    ) -> Result<Receipt, Error> {
        let permit = self.room_for(peer, peer_id, &msg, wait, deadline).await?;
        self.hand_over(peer, msg, permit)
    }

    /// Takes the peer's in-flight room for `msg`: at once when it is free, else by waiting
    /// in line (see [`wait_for_room`](Self::wait_for_room)).
    async fn room_for(
        &self,
        peer: &PeerRef,
        peer_id: &DomusId,
        msg: &Outgoing,
        wait: Wait,
        deadline: tokio::time::Instant,
    ) -> Result<InFlight, Error> {
        let size = msg.size();
        // Callers box this future (it is the slow path), so what it waits on is not boxed
        // again: one allocation per waiting send.
        match peer.budget.try_take(size) {
            Some(permit) => Ok(permit),
            None => {
                let a3 = msg.msg_type >= A3_MESSAGE_TYPE_BASE;
                self.wait_for_room(peer, peer_id, size, a3, wait, deadline)
                    .await
            }
        }
    }

    /// Hands an admitted message (its room taken) to the peer's driver.
    fn hand_over(
        self: &Arc<Self>,
        peer: &PeerRef,
        msg: Outgoing,
        permit: InFlight,
    ) -> Result<Receipt, Error> {
        let (done, rx) = Completion::oneshot();
        self.hand_over_to(peer, msg, permit, done)?;
        Ok(Receipt {
            inner: ReceiptKind::Remote(rx),
        })
    }

    /// Hands an admitted message to the peer's driver, its outcome to go to `done`.
    fn hand_over_to(
        self: &Arc<Self>,
        peer: &PeerRef,
        msg: Outgoing,
        permit: InFlight,
        done: Completion,
    ) -> Result<(), Error> {
        let Err(cmd) = peer.sends.push(SendCmd { msg, done, permit }) else {
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
    async fn wait_for_room(
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
        if taken.as_ref().is_err_and(|e| {
            matches!(
                e.id(),
                ErrorId::LocalQueueFull | ErrorId::PeerUnavailable | ErrorId::PeerShutDown
            )
        }) {
            self.recorder.inc(if a3 {
                C::queue_overruns_send_a3
            } else {
                C::queue_overruns_send_a2
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

    /// Opens a blob stream: checks, routing, the stream's reservation, then the opening
    /// message; returns the sender once the receiving handler accepted it.
    async fn send_blob(
        self: &Arc<Self>,
        taberna: TabernaId,
        msg_type: MessageType,
        header: Bytes,
        options: SendOptions,
    ) -> Result<BlobSender, Error> {
        self.check_open()?;
        if msg_type.class() != MessageClass::A3 {
            return Err(Error::new(
                ErrorId::InvalidMessageType,
                format!(
                    "message type {:#x} is not an application (A3) type; use MessageType::app(n)",
                    msg_type.0
                ),
            ));
        }
        let max_header = self
            .config
            .load()
            .max_message_len
            .saturating_sub(BLOB_OPEN_PREFIX_LEN);
        if header.len() > max_header {
            return Err(Error::new(
                ErrorId::PayloadTooLarge,
                format!(
                    "a blob header of {} bytes exceeds {max_header} (max_message_len minus {BLOB_OPEN_PREFIX_LEN}); put it in the blob",
                    header.len()
                ),
            ));
        }
        let (timeout, deadline) = options.deadline(self.config.load().send_timeout)?;
        let source = options.source.unwrap_or(TabernaId(0));
        let window = self.config.load().blob_window;
        let chunk = self.config.load().blob_chunk_len;
        if self.registry.contains(taberna) {
            let (piece_tx, piece_rx) = mpsc::unbounded_channel();
            let (eof_tx, eof_rx) = oneshot::channel();
            let sender = blob::SenderShared::new(window);
            let receiver = BlobReceiver::local(piece_rx, sender.clone(), eof_tx);
            self.send_local(taberna, source, msg_type, header, timeout, Some(receiver))
                .await?;
            return Ok(BlobSender::local(sender, piece_tx, eof_rx, chunk));
        }
        // The stream and its opening message must reach one incarnation of the peer's
        // drivers: a driver pair that retired (the peer forgotten while idle) just as this
        // send found it takes neither, and the open starts again with the new pair.
        let mut attempts = 0u32;
        loop {
            let (peer_id, peer) = self.route_to_peer(taberna, deadline).await?;
            let open = BlobOpen {
                taberna,
                source,
                msg_type,
                header: &header,
                deadline,
                window,
                chunk,
            };
            match self.open_blob_on(&peer, &peer_id, open).await? {
                Some(sender) => return Ok(sender),
                None if attempts < BLOB_OPEN_RETIRED_RETRIES => {
                    self.check_open()?;
                    attempts += 1;
                }
                None => return Err(domus_closed()),
            }
        }
    }

    /// Opens a blob stream on one peer's drivers; `None` when they retired before taking the
    /// opening message (nothing was sent; the caller looks the peer up again).
    async fn open_blob_on(
        self: &Arc<Self>,
        peer: &Arc<PeerRef>,
        peer_id: &DomusId,
        BlobOpen {
            taberna,
            source,
            msg_type,
            header,
            deadline,
            window,
            chunk,
        }: BlobOpen<'_>,
    ) -> Result<Option<BlobSender>, Error> {
        let full = |what: &str| {
            Error::new(
                ErrorId::BlobBufferFull,
                format!("no blob stream to {peer_id} can open now: {what}"),
            )
        };
        let slot = peer
            .blob_out_streams
            .clone()
            .try_acquire_owned()
            .map_err(|_| full("max_blob_streams_per_peer streams are open"))?;
        let bytes = self
            .blob_out_budget
            .clone()
            .try_acquire_many_owned(u32::try_from(window).unwrap_or(u32::MAX))
            .map_err(|_| full("blob_outbound_budget is used up"))?;
        let n = peer
            .next_stream
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let stream = n
            .saturating_mul(2)
            .saturating_add(stream_parity(&self.local_id, peer_id));
        let sender = blob::SenderShared::new(window);
        let opened = peer.blob_tx.send(BlobCommand::OpenOutbound {
            stream,
            sender: sender.clone(),
            reservation: blob::Reservation {
                _stream: Some(slot),
                _bytes: Some(bytes),
            },
        });
        if opened.is_err() {
            // The blob driver retired (or the domus closed: the caller finds out).
            return Ok(None);
        }
        // From here until the sender exists, a failure (or the caller dropping this future)
        // cancels the stream.
        let mut guard = CancelOnDrop {
            tx: Some(peer.blob_tx.clone()),
            stream,
        };
        let msg = Outgoing {
            dst: taberna.0,
            src: source.0,
            msg_type: BLOB_OPEN_TYPE,
            payload: encode_blob_open(stream, msg_type.0, header),
            deadline: deadline.into_std(),
        };
        let permit = self
            .room_for(peer, peer_id, &msg, Wait::UntilDeadline, deadline)
            .await?;
        // Not `hand_over`: its fallback would give the message to a new driver while the
        // stream sits with the old blob driver. The blob driver only retires when told by
        // this peer driver, after the OpenOutbound above: so when the message is taken, the
        // stream is too.
        let (done, rx) = Completion::oneshot();
        if peer.sends.push(SendCmd { msg, done, permit }).is_err() {
            return Ok(None);
        }
        Receipt {
            inner: ReceiptKind::Remote(rx),
        }
        .await?;
        guard.tx = None;
        Ok(Some(BlobSender::remote(
            sender,
            peer.blob_tx.clone(),
            stream,
            chunk,
        )))
    }

    fn send_local(
        self: &Arc<Self>,
        taberna: TabernaId,
        source: TabernaId,
        msg_type: MessageType,
        payload: Bytes,
        timeout: Duration,
        blob: Option<BlobReceiver>,
    ) -> Receipt {
        let (answer_tx, answer_rx) = oneshot::channel();
        let mut request = TabernaRequest::new(
            self.local_identity.clone(),
            source,
            taberna,
            msg_type,
            payload,
            AnswerSink::Local(answer_tx),
        );
        if let Some(blob) = blob {
            request = request.with_blob(blob);
        }
        self.recorder.inc(C::messages_sent);
        self.registry.deliver(request);
        Receipt {
            inner: ReceiptKind::Local(Box::new(LocalAnswer {
                answer: answer_rx,
                deadline: Box::pin(tokio::time::sleep(timeout)),
                timeout,
                context: format!("local {taberna}"),
                max_reply: self.config.load().max_message_len,
                recorder: self.recorder.clone(),
            })),
        }
    }

    /// Resolves `taberna` to a peer (learning its identity when the route names none) and
    /// returns the peer's handles, telling its drivers of a new address; remembers the route
    /// when it names the peer, so a later route change reaches the peer at once.
    async fn route_to_peer(
        self: &Arc<Self>,
        taberna: TabernaId,
        deadline: tokio::time::Instant,
    ) -> Result<(DomusId, Arc<PeerRef>), Error> {
        let route = self.resolve(taberna, deadline).await?;
        let named = route.identity.is_some();
        let peer_id = match route.identity {
            Some(id) => id,
            // Rare and large (a whole dial): boxed, so every send future stays small.
            None => Box::pin(self.learn_identity(&route.addr, deadline)).await?,
        };
        if peer_id == self.local_id {
            return Err(Error::new(
                ErrorId::UnknownTaberna,
                format!("{taberna} routes to this domus, but no such taberna is registered"),
            ));
        }
        let peer = self.peer_routed(&peer_id, Some(route.addr), named.then_some(taberna));
        Ok((peer_id, peer))
    }

    /// The peer `id` itself (not a taberna's route), for [`Domus::destination_on`]: at the
    /// address the resolver gives for it (bounded by `resolve_timeout` and `deadline`), else
    /// as this domus already knows it.
    async fn peer_by_id(
        self: &Arc<Self>,
        id: &DomusId,
        deadline: tokio::time::Instant,
    ) -> Result<Arc<PeerRef>, Error> {
        let limit = self.config.load().resolve_timeout;
        let until = deadline.min(tokio::time::Instant::now() + limit);
        // Application code, as in `resolve`: a panic becomes this send's error.
        let panicked = || {
            Error::new(
                ErrorId::PeerUnavailable,
                format!("the route resolver panicked while resolving the domus {id}"),
            )
        };
        let resolver = &self.resolver;
        let mut lookup =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| resolver.resolve_domus(id)))
                .map_err(|_| panicked())?;
        let guarded = std::future::poll_fn(move |cx| {
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| lookup.as_mut().poll(cx)))
                .unwrap_or_else(|_| Poll::Ready(Err(panicked())))
        });
        let addr = tokio::time::timeout_at(until, guarded)
            .await
            .map_err(|_| {
                Error::new(
                    ErrorId::PeerUnavailable,
                    format!(
                        "the resolver did not say where {id} is within {limit:?} (resolve_timeout)"
                    ),
                )
            })??;
        Ok(self.peer(id, addr))
    }

    /// Tells the drivers of `id` (if it has any) that its address is now `addr`.
    fn readdress(&self, id: &DomusId, addr: DomusAddr) {
        let mut peers = self.peers.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(p) = peers.get_mut(id) {
            p.set_addr(addr);
        }
    }

    /// Asks the resolver, bounded by `resolve_timeout` (and the send's deadline). An in-memory
    /// resolver answers on the first poll, which then costs no timer.
    async fn resolve(
        &self,
        taberna: TabernaId,
        deadline: tokio::time::Instant,
    ) -> Result<Route, Error> {
        let candidates = self.candidates(taberna, deadline).await?;
        self.pick(taberna, &candidates)
    }

    /// Another replica for a send `from` cannot deliver and never wrote anywhere (see
    /// [`Forget::redirect`]): the taberna's candidates as the resolver gives them at once
    /// (a resolver that must wait is not asked), without `from` and without any this domus
    /// cannot reach now, chosen as a send chooses; the send takes room there afresh.
    fn redirect(self: &Arc<Self>, from: &DomusId, send: SendCmd) -> Result<(), SendCmd> {
        let taberna = TabernaId(send.msg.dst);
        let Some(others) = self.alternatives(from, taberna) else {
            return Err(send);
        };
        let Ok(Route {
            addr,
            identity: Some(to),
        }) = self.pick(taberna, &others)
        else {
            return Err(send);
        };
        move_send(&self.peer_routed(&to, Some(addr), Some(taberna)), send)
    }

    /// The candidates of `taberna` other than `from` that a send may move to now (see
    /// [`Shared::redirect`]); `None` when there is none, or the resolver does not answer at
    /// once.
    fn alternatives(&self, from: &DomusId, taberna: TabernaId) -> Option<Vec<Candidate>> {
        if self.closed.load(std::sync::atomic::Ordering::Acquire) {
            return None;
        }
        let Lookup::Ready(Ok(candidates)) = self.start_candidates(taberna) else {
            return None;
        };
        let others: Vec<Candidate> = candidates
            .iter()
            .filter(|c| {
                c.route.identity.as_ref().is_some_and(|id| {
                    id != from && id != &self.local_id && self.may_choose(id, &c.route.addr)
                })
            })
            .cloned()
            .collect();
        (!others.is_empty()).then_some(others)
    }

    /// Remembers that `peer` could not be reached at `addr` when it was forgotten: candidate
    /// choice avoids it there for `reconnect_backoff_max`, and when it had `shut_down`, its
    /// next driver there is told so for `peer_retire_after` (see [`Down`]). When the table is
    /// full, what expires first makes room.
    fn remember_down(&self, peer: &DomusId, addr: Option<DomusAddr>, shut_down: bool) {
        let now = tokio::time::Instant::now();
        let config = self.config.load();
        let entry = Down {
            avoid_until: now + config.reconnect_backoff_max,
            // A driver with no address cannot dial: there is nothing to tell it.
            shut_down_until: (shut_down && addr.is_some()).then(|| now + config.peer_retire_after),
            addr,
        };
        let mut down = self.down.lock().unwrap_or_else(PoisonError::into_inner);
        if down.len() >= DOWN_REMEMBERED && !down.contains_key(peer) {
            down.retain(|_, d| d.expires() > now);
            if down.len() >= DOWN_REMEMBERED {
                let first = down
                    .iter()
                    .min_by_key(|(_, d)| d.expires())
                    .map(|(id, _)| id.clone());
                if let Some(first) = first {
                    down.remove(&first);
                }
            }
        }
        down.insert(peer.clone(), entry);
    }

    /// Whether `peer` is remembered as shut down at `addr` (see [`Down`]); the memory goes to
    /// the peer's new driver, which keeps it from then on (nothing is left to tell the next).
    fn take_shut_down(&self, peer: &DomusId, addr: Option<&DomusAddr>) -> bool {
        let mut down = self.down.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(d) = down.get_mut(peer) else {
            return false;
        };
        let until = d.shut_down_until.take();
        addr.is_some()
            && d.addr.as_ref() == addr
            && until.is_some_and(|t| t > tokio::time::Instant::now())
    }

    /// Whether a send may choose the candidate `id` at `addr`: its peer is not known to be
    /// unreachable there (by its driver, or remembered after it was forgotten). A failure at
    /// another address does not count: the candidate moved (a restarted replica).
    fn may_choose(&self, id: &DomusId, addr: &DomusAddr) -> bool {
        if let Some(p) = self
            .peers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(id)
        {
            return p.addr.as_ref() != Some(addr) || p.links.reachability.why_not().is_none();
        }
        let now = tokio::time::Instant::now();
        self.down
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(id)
            .is_none_or(|d| d.avoid_until <= now || d.addr.as_ref() != Some(addr))
    }

    /// Chooses among a taberna's candidates: the lowest priority that has a candidate this
    /// domus can reach now (a candidate whose peer's last dial failed is skipped while another
    /// can be tried), then by weight.
    fn pick(&self, taberna: TabernaId, candidates: &[Candidate]) -> Result<Route, Error> {
        let no_candidate = || {
            Error::new(
                ErrorId::UnknownTaberna,
                format!("no route to {taberna}: the resolver listed no candidate"),
            )
        };
        match candidates {
            [] => return Err(no_candidate()),
            [only] => return Ok(only.route.clone()),
            _ => {}
        }
        // The reachability view, taken once (one look at the peer table, one at the memory of
        // forgotten peers) for `choose`: the routes `may_choose` would refuse. A candidate
        // without an identity is always reachable; reachability depends on the route only.
        let mut unreachable: Vec<&Route> = Vec::new();
        let mut forgotten: Vec<&Route> = Vec::new();
        {
            let peers = self.peers.lock().unwrap_or_else(PoisonError::into_inner);
            for route in candidates.iter().map(|c| &c.route) {
                let Some(id) = &route.identity else { continue };
                match peers.get(id) {
                    Some(p) if p.addr.as_ref() == Some(&route.addr) => {
                        if p.links.reachability.why_not().is_some() {
                            unreachable.push(route);
                        }
                    }
                    Some(_) => {}
                    None => forgotten.push(route),
                }
            }
        }
        if !forgotten.is_empty() {
            let now = tokio::time::Instant::now();
            let down = self.down.lock().unwrap_or_else(PoisonError::into_inner);
            unreachable.extend(forgotten.into_iter().filter(|route| {
                route
                    .identity
                    .as_ref()
                    .and_then(|id| down.get(id))
                    .is_some_and(|d| d.avoid_until > now && d.addr.as_ref() == Some(&route.addr))
            }));
        }
        let reachable = |c: &Candidate| !unreachable.contains(&&c.route);
        choose(candidates, reachable, rand_u64())
            .map(|c| c.route.clone())
            .ok_or_else(no_candidate)
    }

    /// Starts the resolver's lookup for `taberna` and polls it once: an in-memory resolver
    /// answers there. The resolver is application code, so a panic in it becomes an error,
    /// never a panic in the caller.
    fn start_candidates(&self, taberna: TabernaId) -> Lookup<'_> {
        let resolver = &self.resolver;
        let Ok(mut lookup) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            resolver.candidates(taberna)
        })) else {
            return Lookup::Ready(Err(resolver_panicked(taberna)));
        };
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            lookup
                .as_mut()
                .poll(&mut Context::from_waker(std::task::Waker::noop()))
        })) {
            Err(_) => Lookup::Ready(Err(resolver_panicked(taberna))),
            Ok(Poll::Ready(candidates)) => Lookup::Ready(candidates),
            Ok(Poll::Pending) => Lookup::Pending(lookup),
        }
    }

    /// Asks the resolver for `taberna`'s candidates, bounded by `resolve_timeout` (and the
    /// send's deadline). An in-memory resolver answers on the first poll, which then costs no
    /// timer.
    async fn candidates(
        &self,
        taberna: TabernaId,
        deadline: tokio::time::Instant,
    ) -> Result<Arc<[Candidate]>, Error> {
        let mut lookup = match self.start_candidates(taberna) {
            Lookup::Ready(candidates) => return candidates,
            Lookup::Pending(lookup) => lookup,
        };
        let panicked = move || resolver_panicked(taberna);
        let guarded = std::future::poll_fn(move |cx| {
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| lookup.as_mut().poll(cx)))
                .unwrap_or_else(|_| Poll::Ready(Err(panicked())))
        });
        // A resolver that does not answer at once takes the slow, boxed path.
        Box::pin(tokio::time::timeout_at(
            deadline.min(tokio::time::Instant::now() + self.config.load().resolve_timeout),
            guarded,
        ))
        .await
        .map_err(|_| {
            Error::new(
                ErrorId::PeerUnavailable,
                format!(
                    "the resolver did not answer for {taberna} within {:?} (resolve_timeout)",
                    self.config.load().resolve_timeout
                ),
            )
        })?
    }

    /// Dials a route that names no identity, pins the identity it presents to that address,
    /// and hands the callis to the peer's driver; a pin there (see [`pins`]) answers
    /// without a dial.
    async fn learn_identity(
        self: &Arc<Self>,
        addr: &DomusAddr,
        deadline: tokio::time::Instant,
    ) -> Result<DomusId, Error> {
        let max_idle = self.config.load().peer_retire_after;
        if let Some(id) = self
            .pinned
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(addr, tokio::time::Instant::now(), max_idle)
        {
            return Ok(id);
        }
        let stream = tokio::time::timeout_at(deadline, self.transport.dial(addr, None))
            .await
            .map_err(|_| {
                Error::new(
                    ErrorId::PeerUnavailable,
                    format!("{addr} could not be reached before the deadline"),
                )
            })?
            .map_err(|e| {
                Error::new(ErrorId::PeerUnavailable, format!("{addr}: {}", e.message()))
            })?;
        let id = stream.peer().id().clone();
        let config = self.config.load();
        self.pinned
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pin(
                addr.clone(),
                id.clone(),
                tokio::time::Instant::now(),
                config.max_pinned_addresses,
                config.peer_retire_after,
            );
        let peer = self.peer(&id, Some(addr.clone()));
        let _ = peer
            .tx
            .send(PeerCommand::Attach(Box::new(stream), BytesMut::new()));
        Ok(id)
    }

    /// The driver for `id`, started on first use.
    fn peer(self: &Arc<Self>, id: &DomusId, addr: Option<DomusAddr>) -> Arc<PeerRef> {
        self.peer_routed(id, addr, None)
    }

    /// [`peer`](Self::peer), remembering that `taberna`'s route names this peer (under the
    /// same lock, so a send pays no second one).
    fn peer_routed(
        self: &Arc<Self>,
        id: &DomusId,
        addr: Option<DomusAddr>,
        taberna: Option<TabernaId>,
    ) -> Arc<PeerRef> {
        let mut peers = self.peers.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(p) = peers.get_mut(id)
            && !p.links.tx.is_closed()
            && !p.links.blob_tx.is_closed()
        {
            if let Some(addr) = addr {
                p.set_addr(addr);
            }
            if let Some(t) = taberna
                && p.routed.len() < ROUTED_MAX
                && !p.routed.contains(&t)
            {
                p.routed.insert(t);
            }
            return p.links.clone();
        }
        // Every command is bounded elsewhere: sends by the in-flight semaphore, answers by the
        // peer's dedupe window, calles by the A0 admission gate.
        let (tx, rx) = mpsc::unbounded_channel();
        let sends = Arc::new(WakeQueue::default());
        let budget = InFlightBudget::new(
            self.config.load().max_in_flight_per_peer,
            u32::try_from(self.config.load().max_in_flight_bytes_per_peer).unwrap_or(u32::MAX),
        );
        let session = Session::new(
            self.config.load().session(),
            self.local_id.as_str().to_owned(),
            self.epoch,
        )
        .with_reply_budget(self.reply_budget.clone())
        .with_first_id(self.id_floor.load(std::sync::atomic::Ordering::Acquire));
        // Blob commands are bounded by the streams' windows and the stream caps.
        let (blob_tx, blob_rx) = mpsc::unbounded_channel();
        let blob_in_streams =
            Arc::new(Semaphore::new(self.config.load().max_blob_streams_per_peer));
        let cells = self.recorder.peer_added(id);
        let reachability = Arc::new(Reachability::default());
        let shut_down = self.take_shut_down(id, addr.as_ref());
        let blob_active = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let forget: Arc<dyn Forget> = Arc::new(Forgetter(Arc::downgrade(self)));
        let driver = PeerDriver::new(
            id.clone(),
            addr.clone(),
            self.driver_ctx.clone(),
            session,
            rx,
            self.cancel.child_token(),
            PeerLinks {
                sends: sends.clone(),
                blob_tx: blob_tx.clone(),
                blob_in_streams,
                cells: cells.clone(),
                max_callis_age: self.config.load().max_callis_age,
                reachability: reachability.clone(),
                budget: budget.clone(),
                shut_down,
                retirement: Retirement {
                    after: self.config.load().peer_retire_after,
                    forget: forget.clone(),
                    id_floor: self.id_floor.clone(),
                    blob_active: blob_active.clone(),
                },
            },
        );
        self.tasks.spawn(driver);
        self.tasks.spawn(BlobDriver::new(
            id.clone(),
            addr.clone(),
            self.blob_ctx.clone(),
            blob_rx,
            self.cancel.child_token(),
            BlobLinks {
                config: self.config.load().blob(),
                cells,
                active: blob_active,
                forget,
            },
        ));
        let links = Arc::new(PeerRef {
            id: id.clone(),
            addr: arc_swap::ArcSwapOption::new(addr.clone().map(Arc::new)),
            tx,
            sends,
            budget,
            blob_tx,
            blob_out_streams: Arc::new(Semaphore::new(
                self.config.load().max_blob_streams_per_peer,
            )),
            next_stream: Arc::new(std::sync::atomic::AtomicU64::new(1)),
            reachability,
        });
        peers.insert(
            id.clone(),
            PeerHandle {
                links: links.clone(),
                addr,
                routed: taberna.into_iter().collect(),
            },
        );
        links
    }
}

/// Takes one in-flight slot and `bytes` of the peer's budget: at once when they are free (no
/// timer), else waiting in line until `deadline` (or failing at once when `wait` is `No`);
/// either failure is `LocalQueueFull`. A wait the peer's driver turns away (the peer shut
/// down) fails with its reason, `PeerShutDown`. The message was never sent in every case.
async fn acquire(
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

async fn accept_loop(shared: Arc<Shared>, listener: Listener, stop: CancellationToken) {
    loop {
        let incoming = tokio::select! {
            () = stop.cancelled() => return,
            r = listener.accept() => r,
        };
        let incoming = match incoming {
            Ok(i) => i,
            Err(e) => {
                if let Some(suppressed) = shared
                    .recorder
                    .log_allowed(crate::reporting::LogKind::AcceptFailed)
                {
                    tracing::warn!(error = %e, suppressed, "accept failed; retrying shortly");
                }
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(Duration::from_millis(50)) => continue,
                }
            }
        };
        shared.tasks.spawn(serve_inbound(
            shared.clone(),
            stop.clone(),
            incoming.handshake(),
        ));
    }
}

/// Runs an inbound handshake, then the first steps every inbound callis takes before a driver
/// owns it: the connection limits, its first frame (which tells a primary callis from a blob
/// callis) within `hello_timeout`, and the hand-over to the peer's driver.
async fn serve_inbound(
    shared: Arc<Shared>,
    stop: CancellationToken,
    handshake: impl Future<Output = Result<AuthenticatedStream, Error>>,
) {
    let result = tokio::select! {
        () = stop.cancelled() => return,
        r = handshake => r,
    };
    let stream = match result {
        Ok(stream) => stream,
        Err(e) => {
            tracing::debug!(error = %e, "inbound handshake failed");
            shared.recorder.handshake_failed(&e);
            return;
        }
    };
    let mut stream = stream;
    let peer_id = stream.peer().id().clone();
    let mut prefix = BytesMut::with_capacity(512);
    let slot = match UnopenedSlot::take(&shared, &peer_id) {
        Ok(slot) => slot,
        Err(e) => return shared.refuse(stream, e, &prefix).await,
    };
    let hello_timeout = shared.config.load().hello_timeout;
    let first = tokio::select! {
        () = stop.cancelled() => return,
        r = tokio::time::timeout(hello_timeout, first_frame(&mut stream, &mut prefix)) => r,
    };
    drop(slot);
    match first {
        Ok(Ok(kind)) => {
            if let Err(e) = shared.check_peer_limit(&peer_id) {
                return shared.refuse(stream, e, &prefix).await;
            }
            shared.attach_inbound(stream, kind, prefix);
        }
        Ok(Err(e)) if e.id() == ErrorId::ProtocolViolation => {
            shared.refuse(stream, e, &prefix).await;
        }
        Ok(Err(e)) => {
            shared
                .recorder
                .add(C::primary_bytes_in, prefix.len() as u64);
            tracing::debug!(peer = %peer_id, error = %e, "inbound callis closed before its first frame");
        }
        Err(_) => {
            let e = Error::new(
                ErrorId::ProtocolViolation,
                format!(
                    "the callis sent no complete first frame within {hello_timeout:?} (hello_timeout)"
                ),
            );
            shared.refuse(stream, e, &prefix).await;
        }
    }
}

/// One authenticated inbound callis counted in `Shared::unopened` until it is dropped.
struct UnopenedSlot {
    shared: Arc<Shared>,
    peer: DomusId,
}

impl UnopenedSlot {
    /// Counts a callis from `peer`, or refuses it past `max_unopened_calles_per_peer` or
    /// `max_unopened_calles`.
    fn take(shared: &Arc<Shared>, peer: &DomusId) -> Result<Self, Error> {
        let config = shared.config.load();
        let mut table = shared
            .unopened
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let mine = table.count(peer);
        if mine >= config.max_unopened_calles_per_peer {
            return Err(Error::new(
                ErrorId::AdmissionRefused,
                format!(
                    "{peer} already has {mine} calles waiting for their first frame (max_unopened_calles_per_peer)"
                ),
            ));
        }
        if table.total() >= config.max_unopened_calles {
            return Err(Error::new(
                ErrorId::AdmissionRefused,
                format!(
                    "{} calles are already waiting for their first frame (max_unopened_calles)",
                    table.total()
                ),
            ));
        }
        table.add(peer);
        Ok(Self {
            shared: shared.clone(),
            peer: peer.clone(),
        })
    }
}

impl Drop for UnopenedSlot {
    fn drop(&mut self) {
        self.shared
            .unopened
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.peer);
    }
}

/// How long a refused callis may take to receive its CLOSE before it is dropped.
const REFUSAL_WRITE_TIMEOUT: Duration = Duration::from_secs(1);

/// The longest first frame read to tell a primary callis from a blob callis (a HELLO or a
/// BLOB_HELLO is far shorter).
const FIRST_FRAME_MAX: usize = 4096;

/// Reads an inbound callis up to the end of its first frame into `buf` (the whole first
/// frame, perhaps more) and returns the frame's type. A first frame that is neither HELLO nor
/// BLOB_HELLO, or longer than either can be, is a `ProtocolViolation`.
async fn first_frame(
    stream: &mut AuthenticatedStream,
    buf: &mut BytesMut,
) -> Result<FrameType, Error> {
    loop {
        if let Some(header) = buf.get(..HEADER_LEN) {
            let mut len = [0u8; 4];
            len.copy_from_slice(header.get(..4).unwrap_or(&[0; 4]));
            let len = u32::from_be_bytes(len) as usize;
            let kind = FrameType(header.get(4).copied().unwrap_or(0));
            if len > FIRST_FRAME_MAX || (kind != FrameType::HELLO && kind != FrameType::BLOB_HELLO)
            {
                return Err(Error::new(
                    ErrorId::ProtocolViolation,
                    format!("the first frame on a callis was {kind:?} of {len} bytes"),
                ));
            }
            if buf.len() >= HEADER_LEN.saturating_add(len) {
                return Ok(kind);
            }
        }
        let n = stream
            .read_buf(buf)
            .await
            .map_err(|e| Error::io("reading the first frame", &e))?;
        if n == 0 {
            return Err(Error::new(
                ErrorId::ConnectionLost,
                "the peer closed the callis before its first frame",
            ));
        }
    }
}

/// What a blob's opening message says, and until when it may be sent.
struct BlobOpen<'a> {
    taberna: TabernaId,
    source: TabernaId,
    msg_type: MessageType,
    header: &'a Bytes,
    deadline: tokio::time::Instant,
    /// The stream's window and chunk length (`blob_window`, `blob_chunk_len`).
    window: usize,
    chunk: usize,
}

/// How often a blob open looks its peer up again after finding the peer's drivers retired.
const BLOB_OPEN_RETIRED_RETRIES: u32 = 3;

/// Cancels a blob stream whose opening did not complete (failed, or its future was dropped).
struct CancelOnDrop {
    tx: Option<mpsc::UnboundedSender<BlobCommand>>,
    stream: u64,
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if let Some(tx) = self.tx.take() {
            let _ = tx.send(BlobCommand::Cancel {
                stream: self.stream,
                reason: "the blob's opening message failed".to_owned(),
            });
        }
    }
}

impl Shared {
    /// The handles of every known peer's drivers, taken under the peer table's lock (and
    /// used after it is released).
    fn peer_links(&self) -> Vec<Arc<PeerRef>> {
        self.peers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .map(|p| p.links.clone())
            .collect()
    }

    /// Tells every peer's drivers to verify their calles' peer certificates again (each one
    /// closes a callis whose peer is no longer trusted).
    fn recheck_all(&self) {
        for p in self.peer_links() {
            let _ = p.tx.send(PeerCommand::Recheck);
            let _ = p.blob_tx.send(BlobCommand::Recheck);
        }
    }

    /// Refuses an inbound callis from an identity that is not connected when `max_peers`
    /// primary calles are open already.
    fn check_peer_limit(&self, peer: &DomusId) -> Result<(), Error> {
        let max = self.config.load().max_peers;
        let (connected, open) = self.recorder.connection_census(peer);
        if !connected && open >= max as u64 {
            return Err(Error::new(
                ErrorId::AdmissionRefused,
                format!("{open} peers are connected already (max_peers); {peer} is refused"),
            ));
        }
        Ok(())
    }

    /// Writes a CLOSE carrying `error` (within [`REFUSAL_WRITE_TIMEOUT`]) and drops an
    /// inbound callis that never reached a driver, after `read` was read from it. A refusal
    /// by the connection limits counts in `calles_refused`, a bad first frame in
    /// `protocol_violations`; either is published on the error feed (naming the peer) and
    /// logged, rate-limited. The bytes read and the CLOSE written count like any callis's.
    async fn refuse(&self, mut stream: AuthenticatedStream, error: Error, read: &[u8]) {
        let peer = stream.peer().id().clone();
        self.recorder.add(C::primary_bytes_in, read.len() as u64);
        if error.id() == ErrorId::ProtocolViolation {
            self.recorder.protocol_violation(&peer, &error);
        } else {
            self.recorder.inc(C::calles_refused);
            if let Some(suppressed) = self
                .recorder
                .log_allowed(crate::reporting::LogKind::CallisRefused)
            {
                tracing::warn!(%peer, error = %error, suppressed, "inbound callis refused");
            }
            self.recorder.error(error.clone());
        }
        let mut close = BytesMut::new();
        crate::a1_callis::frame::encode_close(&mut close, error.id().as_u32(), error.message());
        let written = tokio::time::timeout(REFUSAL_WRITE_TIMEOUT, async {
            tokio::io::AsyncWriteExt::write_all(&mut stream, &close).await?;
            tokio::io::AsyncWriteExt::shutdown(&mut stream).await
        })
        .await;
        if matches!(written, Ok(Ok(()))) {
            self.recorder.add(C::primary_bytes_out, close.len() as u64);
        }
    }

    fn attach_inbound(
        self: &Arc<Self>,
        stream: AuthenticatedStream,
        kind: FrameType,
        prefix: BytesMut,
    ) {
        if self.check_open().is_err() {
            return;
        }
        let id = stream.peer().id().clone();
        let peer = self.peer(&id, None);
        // A driver that retired just now (its peer forgotten while idle) is replaced: the
        // second lookup makes a new one.
        if kind == FrameType::BLOB_HELLO {
            let cmd = BlobCommand::Attach {
                io: Box::new(stream),
                prefix,
            };
            if let Err(mpsc::error::SendError(cmd)) = peer.blob_tx.send(cmd) {
                let _ = self.peer(&id, None).blob_tx.send(cmd);
            }
        } else {
            let cmd = PeerCommand::Attach(Box::new(stream), prefix);
            if let Err(mpsc::error::SendError(cmd)) = peer.tx.send(cmd) {
                let _ = self.peer(&id, None).tx.send(cmd);
            }
        }
    }
}
