//! [`DomusBuilder`]: validates the configuration, builds the transport, binds the listener
//! and starts the domus's tasks (accept loop, route follower, certificate recheck, metrics
//! export) on the caller's runtime. Nothing is started before every check passed.

use super::config::DomusConfig;
use super::inbound::accept_loop;
use super::peers::recheck_peers;
use super::routing::follow_routes;
use super::{Domus, DomusInner};
use crate::a0_transport::{AuthConfig, Connector, DomusAddr, PeerIdentity, Transport};
use crate::a1_callis::reply_budget::ReplyBudget;
use crate::error::Error;
use crate::reporting::Recorder;
use crate::resolve::{ResolverFeed, RouteResolver, SimpleResolver};
use crate::runtime::blob::BlobContext;
use crate::runtime::peer::DriverContext;
use crate::runtime::rand_u64;
use crate::taberna::Registry;
use std::sync::{Arc, Mutex};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Builds a [`Domus`].
pub struct DomusBuilder {
    pub(super) auth: AuthConfig,
    pub(super) listen: Listen,
    pub(super) resolver: Option<Arc<dyn RouteResolver>>,
    pub(super) config: DomusConfig,
    pub(super) provider: Option<Arc<rustls::crypto::CryptoProvider>>,
    pub(super) connector: Option<Arc<dyn Connector>>,
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
pub(super) enum Listen {
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
        let inner = Arc::new(DomusInner {
            driver_ctx: Arc::new(DriverContext {
                transport: transport.clone(),
                inbound: registry.clone(),
                local_id: local_id.clone(),
                local_epoch: epoch,
                reply_budget: reply_budget.clone(),
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
            config: arc_swap::ArcSwap::from_pointee(self.config),
            config_writer: Mutex::new(()),
            registry,
            peers: super::peers::PeerTable::new(),
            routing: super::routing::Routing::new(resolver, route_changes.clone()),
            gate: super::inbound::InboundGate::default(),
            tasks: TaskTracker::new(),
            cancel: cancel.clone(),
            accept_stop: cancel.child_token(),
            closed: std::sync::atomic::AtomicBool::new(false),
        });
        #[cfg(feature = "metrics")]
        {
            let reporting = crate::reporting::Reporting {
                recorder: inner.recorder.clone(),
            };
            let stop = inner.accept_stop.clone();
            inner.tasks.spawn(async move {
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
        inner.tasks.spawn(recheck_peers(
            Arc::downgrade(&inner),
            inner.accept_stop.clone(),
        ));
        if let Some(changes) = route_changes {
            inner.tasks.spawn(follow_routes(
                inner.clone(),
                changes,
                inner.accept_stop.clone(),
            ));
        }
        if let Some(listener) = listener {
            inner.tasks.spawn(accept_loop(
                inner.clone(),
                listener,
                inner.accept_stop.clone(),
            ));
        }
        Ok(Domus {
            inner,
            _guard: Arc::new(cancel.drop_guard()),
        })
    }
}
