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

mod blob_open;
mod builder;
mod config;
mod destination;
mod failover;
mod inbound;
mod local;
mod peers;
mod pins;
mod receipt;
mod routing;
mod send;

use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use tracing::Instrument;

use bytes::Bytes;
use tokio::sync::Semaphore;
use tokio_util::sync::{CancellationToken, DropGuard};
use tokio_util::task::TaskTracker;

pub use crate::runtime::ends::{BlobReceiver, BlobSender};
pub use crate::runtime::{Delivery, Outcome, Reply};
pub use builder::DomusBuilder;
use builder::Listen;
pub use config::DomusConfig;
pub use destination::{Destination, Window};
use inbound::serve_inbound;
use peers::{PeerRef, PeerTable};
pub use receipt::Receipt;
use receipt::ReceiptKind;
pub use send::SendOptions;
use send::{CheckedSend, Wait};

use crate::a0_transport::{AuthConfig, CallisStream, DomusAddr, DomusId, PeerIdentity, Transport};
use crate::a1_callis::reply_budget::ReplyBudget;
use crate::error::{Error, ErrorId};
use crate::reporting::{Event, Recorder, Reporting};
use crate::runtime::blob::BlobContext;
use crate::runtime::ends::BlobCommand;
use crate::runtime::peer::{DriverContext, PeerCommand};
use crate::taberna::{MessageType, Registry, Taberna, TabernaId, TabernaOptions};

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

pub use crate::taberna::MessageCodec;

/// The state of one domus behind every handle on it ([`Domus`], [`WeakDomus`],
/// [`ConfigHandle`], destinations, windows, and its drivers' [`DomusHost`](peers::DomusHost)):
/// its transport, configuration, peers, routes, tabernas and tasks.
struct DomusInner {
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
    /// The configuration in force; swapped whole by `ConfigHandle::update`.
    config: arc_swap::ArcSwap<DomusConfig>,
    config_writer: Mutex<()>,
    registry: Arc<Registry>,
    /// Every peer, live or remembered (one table, one lock).
    peers: PeerTable,
    /// Where sends go: the resolver, pinned identities, route caches and their generations.
    routing: routing::Routing,
    /// The admission state of inbound calles.
    gate: inbound::InboundGate,
    tasks: TaskTracker,
    cancel: CancellationToken,
    accept_stop: CancellationToken,
    closed: std::sync::atomic::AtomicBool,
}

/// A running node. Cheap to clone; the domus stops when the last clone is dropped (or at
/// [`Domus::shutdown`]).
#[derive(Clone)]
pub struct Domus {
    inner: Arc<DomusInner>,
    _guard: Arc<DropGuard>,
}

impl std::fmt::Debug for Domus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Domus")
            .field("id", &self.inner.local_id)
            .field("addr", &self.inner.local_addr)
            .finish_non_exhaustive()
    }
}

/// A handle on a domus that does not keep it running (from [`Domus::downgrade`]): helpers
/// that live beside a domus hold one, so dropping the application's last [`Domus`] still stops
/// it.
#[derive(Clone)]
pub struct WeakDomus {
    inner: std::sync::Weak<DomusInner>,
    guard: std::sync::Weak<DropGuard>,
}

impl WeakDomus {
    /// The domus, unless every [`Domus`] clone is gone (it is then stopping or stopped).
    pub fn upgrade(&self) -> Option<Domus> {
        Some(Domus {
            _guard: self.guard.upgrade()?,
            inner: self.inner.upgrade()?,
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
    inner: Arc<DomusInner>,
}

impl std::fmt::Debug for ConfigHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("ConfigHandle")
            .field(&self.inner.config.load())
            .finish()
    }
}

impl ConfigHandle {
    /// The configuration in force now.
    pub fn snapshot(&self) -> DomusConfig {
        DomusConfig::clone(&self.inner.config.load())
    }

    /// Changes the configuration: `change` edits a copy, which is validated like the
    /// builder's and must leave the fields fixed at build time alone; then it replaces the
    /// configuration in one step and an [`Event::ConfigReloaded`] is published. On error
    /// nothing changes. Returns the configuration now in force.
    pub fn update(&self, change: impl FnOnce(&mut DomusConfig)) -> Result<DomusConfig, Error> {
        let inner = &self.inner;
        let _writer = inner
            .config_writer
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let current = inner.config.load_full();
        let mut next = DomusConfig::clone(&current);
        change(&mut next);
        let checked = next.validate().and_then(|()| next.check_fixed(&current));
        if let Err(e) = checked {
            inner.recorder.error(e.clone());
            return Err(e);
        }
        inner.registry.set_default_depth(next.default_inbox_depth);
        inner.reply_budget.set_cap(next.max_retained_reply_bytes);
        inner.config.store(Arc::new(next.clone()));
        inner.recorder.event(Event::ConfigReloaded);
        Ok(next)
    }
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
        self.inner.local_addr.as_ref()
    }

    /// This domus's identity.
    pub fn identity(&self) -> &DomusId {
        &self.inner.local_id
    }

    /// The TLS crypto provider this domus runs on: `"aws-lc-rs"`, `"ring"` or `"custom"` (see
    /// the crate docs, *Identity and security model*, for how it is chosen).
    pub fn crypto_provider(&self) -> &'static str {
        self.inner.recorder.crypto_provider()
    }

    /// This run's epoch (random; peers use it to detect a restart).
    pub fn epoch(&self) -> u64 {
        self.inner.epoch
    }

    /// The live configuration: [`ConfigHandle::snapshot`] reads it, [`ConfigHandle::update`]
    /// changes it (see [`DomusConfig`] for which fields apply when).
    pub fn config(&self) -> ConfigHandle {
        ConfigHandle {
            inner: self.inner.clone(),
        }
    }

    /// Swaps the authentication material (certificate chain, key, trust anchors, CRLs) for
    /// every future handshake, after validating it; the identity must stay the same.
    /// Established calles keep running, except those whose peer the new material no longer
    /// accepts (a revoked certificate, an anchor removed): they are closed at once. On failure nothing changes and the error is also
    /// published on the error feed; on success an [`Event::AuthReloaded`] is.
    pub fn reload_auth(&self, auth: AuthConfig) -> Result<(), Error> {
        match self.inner.transport.reload_auth(auth) {
            Ok(()) => {
                self.inner.recorder.event(Event::AuthReloaded);
                // Live calles are verified again: a peer the new CRLs revoke (or the new
                // anchors no longer cover) loses its calles now, not at its next handshake.
                self.inner.recheck_all();
                Ok(())
            }
            Err(e) => {
                self.inner.recorder.error(e.clone());
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
        let inner = &self.inner;
        inner.check_open()?;
        let transport = inner.transport.clone();
        inner.tasks.spawn(serve_inbound(
            inner.clone(),
            inner.accept_stop.clone(),
            async move { transport.accept_over(io).await },
        ));
        Ok(())
    }

    /// Replaces the trust policy (which verified peer ids are accepted) for every future
    /// handshake; established calles are not touched.
    pub fn set_trust_policy(&self, policy: crate::TrustPolicy) {
        self.inner.transport.set_trust_policy(policy);
    }

    /// The A0 transport. Not part of the stable API (its shape follows the transport's
    /// internals); use [`reload_auth`](Self::reload_auth) and
    /// [`set_trust_policy`](Self::set_trust_policy).
    #[doc(hidden)]
    pub fn transport(&self) -> &Transport {
        &self.inner.transport
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
        self.inner.check_open()?;
        options.validate()?;
        self.inner
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
        self.inner.check_open()?;
        options.validate()?;
        self.inner.registry.register(id, options)
    }

    /// Sends a message and waits for its answer. The future holds no borrow of the domus.
    pub fn send(
        &self,
        taberna: TabernaId,
        msg_type: MessageType,
        payload: Bytes,
        options: SendOptions,
    ) -> impl Future<Output = Outcome> + Send + 'static {
        let route = self.inner.routing.route_cache(taberna);
        destination::send_through(
            self.inner.clone(),
            route,
            (msg_type, payload, options),
            Wait::UntilDeadline,
        )
    }

    /// Like [`send`](Self::send), but fails at once with [`ErrorId::LocalQueueFull`] when the
    /// peer has no free in-flight slot.
    pub fn try_send(
        &self,
        taberna: TabernaId,
        msg_type: MessageType,
        payload: Bytes,
        options: SendOptions,
    ) -> impl Future<Output = Outcome> + Send + 'static {
        let route = self.inner.routing.route_cache(taberna);
        destination::send_through(
            self.inner.clone(),
            route,
            (msg_type, payload, options),
            Wait::No,
        )
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
        let route = self.inner.routing.route_cache(taberna);
        destination::admit_through(
            self.inner.clone(),
            route,
            (msg_type, payload, options),
            Wait::UntilDeadline,
        )
    }

    /// Opens a blob stream to a taberna: sends `header` as the opening message (with
    /// `msg_type`, an A3 type) and returns the [`BlobSender`] once the receiving handler has
    /// accepted it (a rejection or a failure is returned here instead). The handler gets the
    /// bytes from [`TabernaRequest::blob`](crate::TabernaRequest::blob). Blobs travel on their own callis to the peer, so
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
        let inner = self.inner.clone();
        // The opening runs in a `vicus.blob_open` span (debug level), made at the call like a
        // send's; its opening message carries the span's trace context (feature `otel`).
        let span = tracing::debug_span!(
            "vicus.blob_open",
            domus = %inner.local_id,
            taberna = taberna.0,
            msg_type = msg_type.0,
            outcome = tracing::field::Empty,
        );
        async move {
            let opened = inner
                .send_blob(taberna, msg_type, header, options)
                .instrument(span.clone())
                .await;
            if !span.is_disabled() {
                span.record(
                    "outcome",
                    match &opened {
                        Ok(_) => "opened",
                        Err(e) => e.id().name(),
                    },
                );
            }
            opened
        }
    }

    /// The route resolver this domus was built with (for services that ask it more than
    /// routes, e.g. the topic service's [`RouteResolver::topic_publishers`](crate::RouteResolver::topic_publishers)).
    pub fn resolver(&self) -> Arc<dyn crate::RouteResolver> {
        self.inner.routing.resolver.clone()
    }

    /// A handle for sending to `taberna`: it resolves the route once and keeps the answer
    /// until the resolver says routes changed (a resolver that cannot say so is asked on every
    /// send), so a send through it skips the route lookup. Cheap to clone; it keeps the domus
    /// running like a [`Domus`] clone. [`Destination::window`] pipelines many sends.
    pub fn destination(&self, taberna: TabernaId) -> Destination {
        Destination::new(self.inner.clone(), self._guard.clone(), taberna, None)
    }

    /// A [`Destination`] for `taberna` on the domus `peer` specifically, whatever the
    /// resolver routes that taberna to (or when it routes it nowhere): the peer is reached at
    /// the address the resolver gives for it ([`RouteResolver::resolve_domus`](crate::resolve::RouteResolver::resolve_domus)), else over
    /// a callis it already has with this domus — so a server can send to a dial-only client
    /// that contacted it — or at an address learned for it earlier. With no address and no
    /// callis, sends wait for one until their deadline, then fail as not delivered. `peer`
    /// may be this domus itself (the send is then local).
    pub fn destination_on(&self, peer: &DomusId, taberna: TabernaId) -> Destination {
        Destination::new(
            self.inner.clone(),
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
        let inner = self.inner.clone();
        let route = inner.routing.route_cache(taberna);
        async move {
            let payload = encoded?;
            let delivery = destination::send_through(
                inner,
                route,
                (msg_type, payload, options),
                Wait::UntilDeadline,
            )
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
        let links = self.inner.peers.links(peer);
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
            inner: Arc::downgrade(&self.inner),
            guard: Arc::downgrade(&self._guard),
        }
    }

    /// Whether [`shutdown`](Self::shutdown) has begun: every send from then on fails with
    /// [`ErrorId::DomusClosed`] (what a health check reports).
    pub fn is_closed(&self) -> bool {
        self.inner.closed.load(std::sync::atomic::Ordering::Acquire)
    }

    /// The peers with a live session (a peer this domus forgot, see
    /// `DomusConfig::peer_retire_after`, no longer counts).
    pub fn peer_count(&self) -> usize {
        self.inner.peers.live()
    }

    /// Address → identity pins held now (routes without an identity; at most
    /// `DomusConfig::max_pinned_addresses`). A diagnostic for tests, not part of the stable
    /// API.
    #[doc(hidden)]
    pub fn pinned_addresses(&self) -> usize {
        self.inner
            .routing
            .pinned
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// Tasks this domus is running (accept loop, route follower, handshakes, peer and blob
    /// drivers). A diagnostic for tests, not part of the stable API.
    #[doc(hidden)]
    pub fn task_count(&self) -> usize {
        self.inner.tasks.len()
    }

    /// Graceful shutdown: stop accepting, refuse new sends, let every peer driver write what
    /// it has and close its callis, fail what is unanswered with `DomusClosed`, and close the
    /// tabernas. Bounded by `shutdown_timeout`; after that everything is cancelled.
    pub async fn shutdown(&self) {
        let inner = &self.inner;
        inner.recorder.event(Event::ShutdownStarted);
        inner
            .closed
            .store(true, std::sync::atomic::Ordering::Release);
        let peers = inner.peer_links();
        // The accept loop stops first (peers told of the shutdown find no listener when they
        // dial again); drivers answer what their handlers hold, write their CLOSE and end,
        // within the bound.
        inner.accept_stop.cancel();
        for p in peers {
            let _ = p.tx.send(PeerCommand::Shutdown);
            let _ = p.blob_tx.send(BlobCommand::Shutdown);
        }
        inner.tasks.close();
        if tokio::time::timeout(inner.config.load().shutdown_timeout, inner.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(id = %inner.local_id, "shutdown timed out; cancelling remaining tasks");
        }
        inner.cancel.cancel();
        inner.tasks.wait().await;
        inner.registry.close_all();
        inner.peers.clear();
        inner.recorder.peers_cleared();
        inner.recorder.event(Event::ShutdownCompleted);
    }

    /// Metrics, events and errors of this domus.
    pub fn reporting(&self) -> Reporting {
        Reporting {
            recorder: self.inner.recorder.clone(),
        }
    }
}
