//! The domus: one node of the mesh. It ties the A0 transport, the per-peer A1 drivers, the
//! local tabernas and the resolver together, and owns every task it spawns.
//!
//! The send path is: check the message type and size locally, short-circuit to a local
//! taberna when the id is ours, else resolve the route (bounded by `resolve_timeout`), take an
//! in-flight slot on the peer (waiting, or failing fast for `try_send`), and hand the message to
//! the peer's driver; the returned [`Receipt`] resolves when the peer answers.
//!
//! Shared tables (peers, address→identity pins) are behind `std::sync::Mutex`es held for a
//! lookup or an insert, never across an `.await`. Dropping the last [`Domus`] handle cancels
//! every task it spawned.

mod config;
mod resolver;

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio_util::sync::{CancellationToken, DropGuard};
use tokio_util::task::TaskTracker;

pub use config::DomusConfig;
pub use resolver::{ResolveFuture, Route, RouteResolver, SimpleResolver};

use crate::a0_transport::{
    AuthConfig, AuthenticatedStream, DomusAddr, DomusId, Listener, PeerIdentity, Transport,
};
use crate::a1_callis::driver::{DriverContext, InFlight, PeerCommand, PeerDriver, rand_u64};
use crate::a1_callis::session::{Answer, Outgoing, Session};
use crate::error::{Error, ErrorId, untrusted};
use crate::taberna::{
    AnswerSink, MessageClass, MessageType, Registry, Taberna, TabernaId, TabernaOptions,
    TabernaRequest,
};

/// How a delivery ended when it did not fail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery {
    /// The receiving taberna accepted it.
    Accepted,
    /// The receiving taberna answered with a payload.
    Replied(Bytes),
}

/// Per-send options.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct SendOptions {
    /// How long to wait for the answer; default `DomusConfig::send_timeout`.
    pub timeout: Option<Duration>,
    /// The taberna the receiver sees as the source; default `TabernaId(0)`.
    pub source: Option<TabernaId>,
}

impl SendOptions {
    /// Sets the timeout.
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
#[derive(Debug)]
pub struct Receipt {
    rx: oneshot::Receiver<Result<Delivery, Error>>,
}

impl Future for Receipt {
    type Output = Result<Delivery, Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.rx).poll(cx).map(|r| {
            r.unwrap_or_else(|_| {
                Err(Error::new(
                    ErrorId::DomusClosed,
                    "the domus was shut down before the send finished",
                ))
            })
        })
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
    bind: Option<DomusAddr>,
    resolver: Option<Arc<dyn RouteResolver>>,
    config: DomusConfig,
    provider: Option<Arc<rustls::crypto::CryptoProvider>>,
}

impl std::fmt::Debug for DomusBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DomusBuilder")
            .field("bind", &self.bind)
            .finish_non_exhaustive()
    }
}

impl DomusBuilder {
    /// The address to listen on (TCP, host name or Unix socket). Default: `127.0.0.1:0`.
    pub fn bind(mut self, addr: DomusAddr) -> Self {
        self.bind = Some(addr);
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

    /// An explicit rustls crypto provider.
    pub fn crypto_provider(mut self, provider: Arc<rustls::crypto::CryptoProvider>) -> Self {
        self.provider = Some(provider);
        self
    }

    /// Validates everything, binds the listener and starts the domus on the current tokio
    /// runtime.
    pub async fn build(self) -> Result<Domus, Error> {
        self.config.validate()?;
        let provider = self
            .provider
            .unwrap_or_else(crate::a0_transport::default_crypto_provider);
        let transport =
            Transport::with_crypto_provider(self.auth, self.config.transport.clone(), provider)?;
        let bind = self
            .bind
            .unwrap_or_else(|| DomusAddr::tcp(([127, 0, 0, 1], 0)));
        let listener = transport.listen(&bind).await?;
        let local_addr = listener.local_addr().clone();
        let local_id = transport.local_id();
        let cancel = CancellationToken::new();
        let registry = Arc::new(Registry::default());
        let shared = Arc::new(Shared {
            driver_ctx: Arc::new(DriverContext {
                transport: transport.clone(),
                registry: registry.clone(),
                local_id: local_id.clone(),
                reconnect_backoff_min: self.config.reconnect_backoff_min,
                reconnect_backoff_max: self.config.reconnect_backoff_max,
            }),
            local_identity: Arc::new(PeerIdentity::new(
                local_id.clone(),
                crate::a0_transport::CertFingerprint([0; 32]),
                None,
            )),
            transport,
            local_id,
            local_addr,
            epoch: rand_u64() | 1,
            resolver: self
                .resolver
                .unwrap_or_else(|| Arc::new(SimpleResolver::new())),
            config: self.config,
            registry,
            peers: Mutex::new(HashMap::new()),
            pinned: Mutex::new(HashMap::new()),
            tasks: TaskTracker::new(),
            cancel: cancel.clone(),
            accept_stop: cancel.child_token(),
            closed: std::sync::atomic::AtomicBool::new(false),
        });
        let accept_shared = shared.clone();
        shared.tasks.spawn(accept_loop(
            accept_shared,
            listener,
            shared.accept_stop.clone(),
        ));
        Ok(Domus {
            shared,
            _guard: Arc::new(cancel.drop_guard()),
        })
    }
}

struct PeerHandle {
    tx: mpsc::UnboundedSender<PeerCommand>,
    slots: Arc<Semaphore>,
    bytes: Arc<Semaphore>,
    /// The address last given to the driver (told again only when it changes).
    addr: Option<DomusAddr>,
}

struct Shared {
    transport: Transport,
    driver_ctx: Arc<DriverContext>,
    local_id: DomusId,
    local_identity: Arc<PeerIdentity>,
    local_addr: DomusAddr,
    epoch: u64,
    resolver: Arc<dyn RouteResolver>,
    config: DomusConfig,
    registry: Arc<Registry>,
    peers: Mutex<HashMap<DomusId, PeerHandle>>,
    /// Identities learned for routes that named none.
    pinned: Mutex<HashMap<DomusAddr, DomusId>>,
    tasks: TaskTracker,
    cancel: CancellationToken,
    accept_stop: CancellationToken,
    closed: std::sync::atomic::AtomicBool,
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
            bind: None,
            resolver: None,
            config: DomusConfig::default(),
            provider: None,
        }
    }

    /// The address the domus listens on (with the real port when bound to port 0).
    pub fn local_addr(&self) -> &DomusAddr {
        &self.shared.local_addr
    }

    /// This domus's identity.
    pub fn identity(&self) -> &DomusId {
        &self.shared.local_id
    }

    /// This run's epoch (random; peers use it to detect a restart).
    pub fn epoch(&self) -> u64 {
        self.shared.epoch
    }

    /// The configuration.
    pub fn config(&self) -> &DomusConfig {
        &self.shared.config
    }

    /// The A0 transport (for certificate reloads: [`Transport::reload_auth`]).
    pub fn transport(&self) -> &Transport {
        &self.shared.transport
    }

    /// Registers a taberna with default options.
    pub fn taberna(&self, id: TabernaId) -> Result<Taberna, Error> {
        self.taberna_with(id, TabernaOptions::default())
    }

    /// Registers a taberna.
    pub fn taberna_with(&self, id: TabernaId, options: TabernaOptions) -> Result<Taberna, Error> {
        self.shared.check_open()?;
        let depth = options
            .inbox_depth
            .unwrap_or(self.shared.config.default_inbox_depth);
        if depth == 0 || depth > 1 << 20 {
            return Err(Error::invalid_config(
                "inbox_depth",
                format!("{depth} is outside 1..=1048576"),
            ));
        }
        self.shared.registry.register(id, options, depth)
    }

    /// Sends a message and waits for its answer. The future holds no borrow of the domus.
    pub fn send(
        &self,
        taberna: TabernaId,
        msg_type: MessageType,
        payload: Bytes,
        options: SendOptions,
    ) -> impl Future<Output = Result<Delivery, Error>> + Send + 'static {
        let admitted = self.admit(taberna, msg_type, payload, options);
        async move { admitted.await?.await }
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
        let shared = self.shared.clone();
        async move {
            shared
                .admit(taberna, msg_type, payload, options, Wait::No)
                .await?
                .await
        }
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
        let shared = self.shared.clone();
        async move {
            shared
                .admit(taberna, msg_type, payload, options, Wait::UntilDeadline)
                .await
        }
    }

    /// Encodes `message` with `codec` and sends it; a reply is decoded with the same codec.
    pub async fn send_typed<C: MessageCodec>(
        &self,
        codec: &C,
        taberna: TabernaId,
        msg_type: MessageType,
        message: &C::Message,
        options: SendOptions,
    ) -> Result<Option<C::Message>, Error> {
        let payload = codec.encode(message)?;
        match self.send(taberna, msg_type, payload, options).await? {
            Delivery::Accepted => Ok(None),
            Delivery::Replied(bytes) => codec.decode(&bytes).map(Some),
        }
    }

    /// The peers with a live session.
    pub fn peer_count(&self) -> usize {
        self.shared
            .peers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// Tasks this domus is running (accept loop, handshakes, peer drivers).
    pub fn task_count(&self) -> usize {
        self.shared.tasks.len()
    }

    /// Graceful shutdown: stop accepting, refuse new sends, let every peer driver write what
    /// it has and close its callis, fail what is unanswered with `DomusClosed`, and close the
    /// tabernas. Bounded by `shutdown_timeout`; after that everything is cancelled.
    pub async fn shutdown(&self) {
        let shared = &self.shared;
        shared
            .closed
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let peers: Vec<mpsc::UnboundedSender<PeerCommand>> = shared
            .peers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .map(|p| p.tx.clone())
            .collect();
        for tx in peers {
            let _ = tx.send(PeerCommand::Shutdown);
        }
        // The accept loop stops at once; drivers finish their writes within the bound.
        shared.accept_stop.cancel();
        shared.tasks.close();
        if tokio::time::timeout(shared.config.shutdown_timeout, shared.tasks.wait())
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
    }
}

impl Shared {
    fn check_open(&self) -> Result<(), Error> {
        if self.closed.load(std::sync::atomic::Ordering::SeqCst) || self.cancel.is_cancelled() {
            return Err(Error::new(
                ErrorId::DomusClosed,
                format!("{} has been shut down", self.local_id),
            ));
        }
        Ok(())
    }

    async fn admit(
        self: &Arc<Self>,
        taberna: TabernaId,
        msg_type: MessageType,
        payload: Bytes,
        options: SendOptions,
        wait: Wait,
    ) -> Result<Receipt, Error> {
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
        if payload.len() > self.config.max_message_len {
            return Err(Error::new(
                ErrorId::PayloadTooLarge,
                format!(
                    "payload of {} bytes exceeds max_message_len ({}); send large data as a blob",
                    payload.len(),
                    self.config.max_message_len
                ),
            ));
        }
        let timeout = options.timeout.unwrap_or(self.config.send_timeout);
        let deadline = tokio::time::Instant::now() + timeout;
        let source = options.source.unwrap_or(TabernaId(0));
        if self.registry.contains(taberna) {
            return Ok(self.send_local(taberna, source, msg_type, payload, timeout));
        }
        let route = self.resolve(taberna, deadline).await?;
        let peer_id = match route.identity {
            Some(id) => id,
            None => self.learn_identity(&route.addr, deadline).await?,
        };
        if peer_id == self.local_id {
            return Err(Error::new(
                ErrorId::UnknownTaberna,
                format!("{taberna} routes to this domus, but no such taberna is registered"),
            ));
        }
        let (tx, slots, bytes) = self.peer(&peer_id, Some(route.addr));
        let size = u32::try_from(payload.len()).unwrap_or(u32::MAX);
        let slot = acquire(&slots, 1, wait, deadline, &peer_id, "in-flight slot").await?;
        let bytes = acquire(
            &bytes,
            size,
            wait,
            deadline,
            &peer_id,
            "in-flight byte budget",
        )
        .await?;
        let permit = InFlight {
            _slot: slot,
            _bytes: bytes,
        };
        let (done, rx) = oneshot::channel();
        let msg = Outgoing {
            dst: taberna.0,
            src: source.0,
            msg_type: msg_type.0,
            payload,
            deadline: deadline.into_std(),
        };
        tx.send(PeerCommand::Send { msg, done, permit })
            .map_err(|_| closed())?;
        Ok(Receipt { rx })
    }

    fn send_local(
        self: &Arc<Self>,
        taberna: TabernaId,
        source: TabernaId,
        msg_type: MessageType,
        payload: Bytes,
        timeout: Duration,
    ) -> Receipt {
        let (answer_tx, answer_rx) = oneshot::channel();
        let request = TabernaRequest::new(
            self.local_identity.clone(),
            source,
            taberna,
            msg_type,
            payload,
            AnswerSink::Local(answer_tx),
        );
        self.registry.deliver(request);
        let (done, rx) = oneshot::channel();
        let context = format!("local {taberna}");
        tokio::spawn(async move {
            let result = match tokio::time::timeout(timeout, answer_rx).await {
                Ok(Ok(answer)) => local_result(answer, &context),
                Ok(Err(_)) => Err(Error::new(
                    ErrorId::RequestDropped,
                    format!("{context} dropped the request"),
                )),
                Err(_) => Err(Error::new(
                    ErrorId::SendTimeout,
                    format!("{context} did not answer within {timeout:?}"),
                )),
            };
            let _ = done.send(result);
        });
        Receipt { rx }
    }

    /// Asks the resolver, bounded by `resolve_timeout` (and the send's deadline). An in-memory
    /// resolver answers on the first poll, which then costs no timer.
    async fn resolve(
        &self,
        taberna: TabernaId,
        deadline: tokio::time::Instant,
    ) -> Result<Route, Error> {
        // The resolver is application code: a panic in it becomes an error for this send,
        // never a panic in the caller.
        let panicked = || {
            Error::new(
                ErrorId::PeerUnavailable,
                format!("the route resolver panicked while resolving {taberna}"),
            )
        };
        let resolver = &self.resolver;
        let mut lookup =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| resolver.resolve(taberna)))
                .map_err(|_| panicked())?;
        let first = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            lookup
                .as_mut()
                .poll(&mut Context::from_waker(std::task::Waker::noop()))
        }))
        .map_err(|_| panicked())?;
        if let Poll::Ready(route) = first {
            return route;
        }
        let guarded = std::future::poll_fn(move |cx| {
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| lookup.as_mut().poll(cx)))
                .unwrap_or_else(|_| Poll::Ready(Err(panicked())))
        });
        tokio::time::timeout_at(
            deadline.min(tokio::time::Instant::now() + self.config.resolve_timeout),
            guarded,
        )
        .await
        .map_err(|_| {
            Error::new(
                ErrorId::PeerUnavailable,
                format!(
                    "the resolver did not answer for {taberna} within {:?} (resolve_timeout)",
                    self.config.resolve_timeout
                ),
            )
        })?
    }

    /// Dials a route that names no identity, pins the identity it presents to that address,
    /// and hands the callis to the peer's driver.
    async fn learn_identity(
        self: &Arc<Self>,
        addr: &DomusAddr,
        deadline: tokio::time::Instant,
    ) -> Result<DomusId, Error> {
        if let Some(id) = self
            .pinned
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(addr)
        {
            return Ok(id.clone());
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
        self.pinned
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(addr.clone(), id.clone());
        let (tx, _, _) = self.peer(&id, Some(addr.clone()));
        let _ = tx.send(PeerCommand::Attach(Box::new(stream)));
        Ok(id)
    }

    /// The driver for `id`, started on first use.
    fn peer(
        self: &Arc<Self>,
        id: &DomusId,
        addr: Option<DomusAddr>,
    ) -> (
        mpsc::UnboundedSender<PeerCommand>,
        Arc<Semaphore>,
        Arc<Semaphore>,
    ) {
        let mut peers = self.peers.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(p) = peers.get_mut(id) {
            if !p.tx.is_closed() {
                if addr.is_some() && addr != p.addr {
                    if let Some(addr) = &addr {
                        let _ = p.tx.send(PeerCommand::SetAddr(addr.clone()));
                    }
                    p.addr = addr;
                }
                return (p.tx.clone(), p.slots.clone(), p.bytes.clone());
            }
        }
        // Every command is bounded elsewhere: sends by the in-flight semaphore, answers by the
        // peer's dedupe window, calles by the A0 admission gate.
        let (tx, rx) = mpsc::unbounded_channel();
        let slots = Arc::new(Semaphore::new(self.config.max_in_flight_per_peer as usize));
        let bytes = Arc::new(Semaphore::new(self.config.max_in_flight_bytes_per_peer));
        let session = Session::new(
            self.config.session(),
            self.local_id.as_str().to_owned(),
            self.epoch,
        );
        let driver = PeerDriver::new(
            id.clone(),
            addr.clone(),
            self.driver_ctx.clone(),
            session,
            rx,
            tx.clone(),
            self.cancel.child_token(),
        );
        self.tasks.spawn(driver);
        peers.insert(
            id.clone(),
            PeerHandle {
                tx: tx.clone(),
                slots: slots.clone(),
                bytes: bytes.clone(),
                addr,
            },
        );
        (tx, slots, bytes)
    }
}

/// Takes `n` permits: at once when they are free (no timer), else waiting until `deadline`
/// (or failing at once with `LocalQueueFull` when `wait` is `No`).
async fn acquire(
    semaphore: &Arc<Semaphore>,
    n: u32,
    wait: Wait,
    deadline: tokio::time::Instant,
    peer: &DomusId,
    what: &str,
) -> Result<OwnedSemaphorePermit, Error> {
    match semaphore.clone().try_acquire_many_owned(n) {
        Ok(permit) => return Ok(permit),
        Err(tokio::sync::TryAcquireError::Closed) => return Err(closed()),
        Err(tokio::sync::TryAcquireError::NoPermits) => {}
    }
    if wait == Wait::No {
        return Err(Error::new(
            ErrorId::LocalQueueFull,
            format!(
                "the {what} to {peer} is used up (max_in_flight_per_peer / max_in_flight_bytes_per_peer)"
            ),
        ));
    }
    tokio::time::timeout_at(deadline, semaphore.clone().acquire_many_owned(n))
        .await
        .map_err(|_| {
            Error::new(
                ErrorId::SendTimeout,
                format!("the {what} to {peer} did not free up before the send's deadline"),
            )
        })?
        .map_err(|_| closed())
}

fn closed() -> Error {
    Error::new(ErrorId::DomusClosed, "the domus has been shut down")
}

fn local_result(answer: Answer, context: &str) -> Result<Delivery, Error> {
    match answer {
        Answer::Accepted => Ok(Delivery::Accepted),
        Answer::Replied(p) => Ok(Delivery::Replied(p)),
        Answer::Rejected {
            error,
            code,
            reason,
        } => match ErrorId::try_from(error) {
            Ok(ErrorId::RemoteTabernaRejected) | Err(_) => {
                Err(Error::rejected(code, &reason, context))
            }
            Ok(id) => Err(Error::new(id, format!("{context}: {}", untrusted(&reason)))),
        },
    }
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
                tracing::warn!(error = %e, "accept failed; retrying shortly");
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(Duration::from_millis(50)) => continue,
                }
            }
        };
        let shared2 = shared.clone();
        let stop2 = stop.clone();
        shared.tasks.spawn(async move {
            let result = tokio::select! {
                () = stop2.cancelled() => return,
                r = incoming.handshake() => r,
            };
            match result {
                Ok(stream) => shared2.attach_inbound(stream),
                Err(e) => tracing::debug!(error = %e, "inbound handshake failed"),
            }
        });
    }
}

impl Shared {
    fn attach_inbound(self: &Arc<Self>, stream: AuthenticatedStream) {
        if self.check_open().is_err() {
            return;
        }
        let id = stream.peer().id().clone();
        let (tx, _, _) = self.peer(&id, None);
        let _ = tx.send(PeerCommand::Attach(Box::new(stream)));
    }
}
