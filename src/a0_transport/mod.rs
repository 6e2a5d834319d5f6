//! **A0: transport authentication.** Mutual TLS 1.3 over TCP and Unix sockets; the peer's
//! identity is read from its verified certificate before any A1 byte is exchanged.
//!
//! The entry point is [`Transport`]: built from an [`AuthConfig`] and a [`TransportConfig`], it
//! [listens](Transport::listen) and [dials](Transport::dial), and both directions end in an
//! [`AuthenticatedStream`] that knows its peer's [`PeerIdentity`]. A listener admits
//! connections through a pre-authentication gate (global and per-source limits, a whole-handshake
//! deadline) before any TLS work is done, and [`Transport::reload_auth`] swaps certificate, key
//! and trust anchors for future handshakes without touching established streams.
//!
//! This layer must not parse or produce A1 frames, spawn tasks, or keep per-peer state: it hands
//! out authenticated streams and forgets them.

#![cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::indexing_slicing,
        clippy::arithmetic_side_effects
    )
)]

mod admission;
mod identity;
mod material;
mod rotation;
mod stream;
mod tcp;
mod tls;
mod unix;
mod verifier;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::crypto::CryptoProvider;
use tokio::net::{TcpListener, UnixListener};
use tracing::Instrument;

pub use admission::ListenerStats;
pub use identity::{
    CertFingerprint, DOMUS_ID_MAX_LEN, DomusId, PeerIdentity, TrustPolicy, UnixCredentials,
};
pub use material::AuthConfig;
pub use stream::{AuthenticatedStream, CallisStream, ConnectFuture, Connector, DomusAddr};
pub(crate) use tls::BOTH_PROVIDERS_COMPILED;
pub use tls::{ALPN_PROTOCOL, DEFAULT_CRYPTO_PROVIDER, default_crypto_provider};
#[cfg(feature = "http-gateway")]
pub(crate) use tls::{identity_of_leaf, mutual_tls_server_config};

pub(crate) use admission::Tally;
use admission::{AdmissionPermit, Counters, Gate, Source};
use stream::Socket;
use tls::{Deadline, HandshakeContext, HelloWait, LoadedMaterial};

use crate::error::{Error, ErrorId};

/// Limits and timeouts of the A0 transport. Plain data: build it with `default()` and set
/// fields; [`Transport::new`] validates it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct TransportConfig {
    /// The deadline for a whole handshake, from the moment a connection is accepted (or a
    /// dialled socket connects) until the stream is authenticated, A0 verdict included.
    /// Default 10 s; 100 ms to 5 min. It bounds how long a silent or slow client can hold a
    /// pre-authentication slot.
    pub handshake_timeout: Duration,
    /// The deadline for a connection's TLS ClientHello, from accept: a client that has not
    /// sent a complete one by then is closed. Default 1 s; 10 ms to 60 s (a longer value
    /// than `handshake_timeout` changes nothing). It also decides which connections a full
    /// pre-authentication gate may close to admit a newcomer: those silent (no ClientHello
    /// yet) for at least a quarter of it, oldest first. A good peer sends its ClientHello
    /// within one round trip of connecting, so this only needs to exceed the slowest round
    /// trip of a legitimate peer (with margin); shorter values free the gate from a crowd of
    /// silent sockets sooner.
    pub client_hello_timeout: Duration,
    /// The deadline for the TCP/Unix connect (and name resolution) when dialling.
    /// Default 5 s; 10 ms to 5 min.
    pub connect_timeout: Duration,
    /// The most handshakes a listener runs at once; further connections are closed at accept,
    /// before any TLS work. Default 256; 1 to 65 536. Bounds the CPU and memory an
    /// unauthenticated crowd can take.
    pub max_pending_handshakes: usize,
    /// The most handshakes at once from one source IP (TCP) or one uid (Unix socket).
    /// Default 32; 1 to `max_pending_handshakes`. Keeps one noisy host from filling the
    /// global limit.
    pub max_pending_handshakes_per_source: usize,
    /// Connections one source IP (TCP) or uid (Unix socket) may open per second, with a burst
    /// of as many; the rest are closed at accept, before TLS and before any task is spawned
    /// for them (T9). Default 1000; 1 to 1 000 000.
    pub max_connects_per_second_per_source: u32,
    /// The permission bits of a Unix socket this domus binds. Default `0o600`; must include
    /// `0o600` and nothing beyond `0o777`.
    pub unix_socket_mode: u32,
    /// When set, Unix-socket peers whose uid (from `SO_PEERCRED`) is not listed are closed at
    /// accept, before TLS. In addition to, never instead of, the certificate check. Default
    /// `None` (any uid that can open the socket file).
    pub unix_allowed_uids: Option<BTreeSet<u32>>,
    /// Which verified peer ids are accepted. Default: any. Can be replaced live with
    /// [`Transport::set_trust_policy`].
    pub trust_policy: TrustPolicy,
    /// The listen backlog of the sockets this transport binds: connections the kernel
    /// completes and holds until they are accepted. When a fleet reconnects at once (this
    /// node restarted), connections beyond it are dropped by the kernel and retried by the
    /// clients after a second or more. Default 1024; 1 to 65 535 (Linux caps it at
    /// `net.core.somaxconn`, 4096 on current kernels).
    pub listen_backlog: u32,
}

impl Default for TransportConfig {
    fn default() -> Self {
        Self {
            handshake_timeout: Duration::from_secs(10),
            client_hello_timeout: Duration::from_secs(1),
            connect_timeout: Duration::from_secs(5),
            max_pending_handshakes: 256,
            max_pending_handshakes_per_source: 32,
            max_connects_per_second_per_source: 1000,
            unix_socket_mode: 0o600,
            unix_allowed_uids: None,
            trust_policy: TrustPolicy::any(),
            listen_backlog: 1024,
        }
    }
}

impl TransportConfig {
    /// Checks every field's range; the error names the field.
    pub fn validate(&self) -> Result<(), Error> {
        let within = |field: &str, v: Duration, lo: Duration, hi: Duration| {
            if v < lo || v > hi {
                Err(Error::invalid_config(
                    field,
                    format!("{v:?} is outside {lo:?}..={hi:?}"),
                ))
            } else {
                Ok(())
            }
        };
        within(
            "handshake_timeout",
            self.handshake_timeout,
            Duration::from_millis(100),
            Duration::from_secs(300),
        )?;
        within(
            "client_hello_timeout",
            self.client_hello_timeout,
            Duration::from_millis(10),
            Duration::from_secs(60),
        )?;
        within(
            "connect_timeout",
            self.connect_timeout,
            Duration::from_millis(10),
            Duration::from_secs(300),
        )?;
        if !(1..=65_536).contains(&self.max_pending_handshakes) {
            return Err(Error::invalid_config(
                "max_pending_handshakes",
                format!("{} is outside 1..=65536", self.max_pending_handshakes),
            ));
        }
        if !(1..=self.max_pending_handshakes).contains(&self.max_pending_handshakes_per_source) {
            return Err(Error::invalid_config(
                "max_pending_handshakes_per_source",
                format!(
                    "{} is outside 1..=max_pending_handshakes ({})",
                    self.max_pending_handshakes_per_source, self.max_pending_handshakes
                ),
            ));
        }
        if !(1..=65_535).contains(&self.listen_backlog) {
            return Err(Error::invalid_config(
                "listen_backlog",
                format!("{} is outside 1..=65535", self.listen_backlog),
            ));
        }
        if !(1..=1_000_000).contains(&self.max_connects_per_second_per_source) {
            return Err(Error::invalid_config(
                "max_connects_per_second_per_source",
                format!(
                    "{} is outside 1..=1000000",
                    self.max_connects_per_second_per_source
                ),
            ));
        }
        if self.unix_socket_mode & !0o777 != 0 || self.unix_socket_mode & 0o600 != 0o600 {
            return Err(Error::invalid_config(
                "unix_socket_mode",
                format!(
                    "{:o} must include 0o600 (the owner must connect) and nothing beyond 0o777",
                    self.unix_socket_mode
                ),
            ));
        }
        if self
            .unix_allowed_uids
            .as_ref()
            .is_some_and(BTreeSet::is_empty)
        {
            return Err(Error::invalid_config(
                "unix_allowed_uids",
                "an empty set would refuse every peer; use None to allow any uid",
            ));
        }
        Ok(())
    }
}

struct Shared {
    ctx: HandshakeContext,
    config: TransportConfig,
    material: ArcSwap<LoadedMaterial>,
    policy: ArcSwap<TrustPolicy>,
    /// Opens dialled streams instead of TCP / Unix connects, when set.
    connector: Option<Arc<dyn Connector>>,
}

/// The A0 transport of one domus: its identity, key material and limits, used to listen and
/// dial. Cloning is cheap and every clone shares the same material.
#[derive(Clone)]
pub struct Transport {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transport")
            .field("local_id", &self.local_id())
            .field("config", &self.shared.config)
            .finish_non_exhaustive()
    }
}

impl Transport {
    /// Builds a transport with the default crypto provider (see [`default_crypto_provider`]).
    ///
    /// The material must parse, its leaf must name exactly one URI SAN and the key must match
    /// it. Whether the chain verifies against the trust anchors is not checked here (a test
    /// may play a peer with a bad certificate); [`Transport::check_own_chain`] checks it, and
    /// a domus and [`Transport::reload_auth`] refuse material that fails it.
    pub fn new(auth: AuthConfig, config: TransportConfig) -> Result<Self, Error> {
        Self::with_crypto_provider(auth, config, default_crypto_provider())
    }

    /// Builds a transport with an explicit rustls crypto provider.
    pub fn with_crypto_provider(
        auth: AuthConfig,
        config: TransportConfig,
        provider: Arc<CryptoProvider>,
    ) -> Result<Self, Error> {
        config.validate()?;
        let ctx = HandshakeContext::new(provider)?;
        let material = LoadedMaterial::load(&auth, &ctx.provider)?;
        drop(auth);
        let policy = Arc::new(config.trust_policy.clone());
        Ok(Self {
            shared: Arc::new(Shared {
                ctx,
                material: ArcSwap::from_pointee(material),
                policy: ArcSwap::new(policy),
                config,
                connector: None,
            }),
        })
    }

    /// This transport, dialling through `connector` instead of TCP and Unix sockets (see
    /// [`Connector`]). The result is a new transport: set it up before cloning, since a
    /// reload on one is not seen by the other.
    pub fn with_connector(self, connector: Arc<dyn Connector>) -> Self {
        let shared = &self.shared;
        Self {
            shared: Arc::new(Shared {
                ctx: HandshakeContext {
                    provider: shared.ctx.provider.clone(),
                    sha256: shared.ctx.sha256,
                },
                config: shared.config.clone(),
                material: ArcSwap::new(shared.material.load_full()),
                policy: ArcSwap::new(shared.policy.load_full()),
                connector: Some(connector),
            }),
        }
    }

    /// Runs the dialling side of the handshake over `io`, any byte stream to a listening
    /// domus (an in-memory duplex, a simulated network): the same TLS 1.3, identity checks and
    /// `handshake_timeout` as [`dial`](Self::dial).
    pub async fn connect_over(
        &self,
        io: impl CallisStream,
        expected: Option<&DomusId>,
    ) -> Result<AuthenticatedStream, Error> {
        let deadline = Deadline::after(self.shared.config.handshake_timeout);
        let material = self.shared.material.load_full();
        let policy = self.shared.policy.load_full();
        self.shared
            .ctx
            .connect(
                &material,
                policy,
                expected.cloned(),
                Socket::Other(Box::new(io)),
                None,
                deadline,
            )
            .await
    }

    /// Runs the listening side of the handshake over `io` (see
    /// [`connect_over`](Self::connect_over)), within `handshake_timeout`. The listener's
    /// admission gate does not apply: the caller chose to hand this stream over.
    pub async fn accept_over(&self, io: impl CallisStream) -> Result<AuthenticatedStream, Error> {
        let deadline = Deadline::after(self.shared.config.handshake_timeout);
        let material = self.shared.material.load_full();
        let policy = self.shared.policy.load_full();
        let hello = HelloWait {
            timeout: self.shared.config.client_hello_timeout,
            permit: None,
        };
        self.shared
            .ctx
            .accept(
                &material,
                policy,
                Socket::Other(Box::new(io)),
                None,
                deadline,
                hello,
            )
            .await
    }

    /// This domus's identity: the URI SAN of its own leaf certificate.
    pub fn local_id(&self) -> DomusId {
        self.shared.material.load().local_id.clone()
    }

    /// The configuration this transport was built with.
    pub fn config(&self) -> &TransportConfig {
        &self.shared.config
    }

    /// Binds a listener at `addr` (TCP, host name or Unix socket path).
    pub async fn listen(&self, addr: &DomusAddr) -> Result<Listener, Error> {
        let config = &self.shared.config;
        let (socket, local_addr, guard) = match addr {
            DomusAddr::Tcp(a) => {
                let l = tcp::bind(&[*a], config.listen_backlog)?;
                let local = listen_addr(&l)?;
                (ListenSocket::Tcp(l), DomusAddr::Tcp(local), None)
            }
            DomusAddr::TcpHost { host, port } => {
                let addrs = tcp::resolve(host, *port).await?;
                let l = tcp::bind(&addrs, config.listen_backlog)?;
                let local = listen_addr(&l)?;
                (ListenSocket::Tcp(l), DomusAddr::Tcp(local), None)
            }
            DomusAddr::Unix(path) => {
                let (l, guard) = unix::bind(path, config.unix_socket_mode, config.listen_backlog)?;
                (
                    ListenSocket::Unix(l),
                    DomusAddr::Unix(path.clone()),
                    Some(guard),
                )
            }
        };
        tracing::debug!(addr = %local_addr, id = %self.local_id(), "listening");
        Ok(Listener {
            socket,
            shared: self.shared.clone(),
            gate: Arc::new(Gate::new(
                config.max_pending_handshakes,
                config.max_pending_handshakes_per_source,
                config.max_connects_per_second_per_source,
                config
                    .client_hello_timeout
                    .checked_div(4)
                    .unwrap_or_default(),
            )),
            local_addr,
            _socket_file: guard,
        })
    }

    /// Connects to `addr` and runs the mutual handshake. When `expected` is given, the peer
    /// must present exactly that id or the handshake is aborted with
    /// [`ErrorId::IdentityMismatch`].
    ///
    /// Runs in a `vicus.handshake` span (debug level; `direction = "dial"`, the address, and
    /// the peer once authenticated).
    pub async fn dial(
        &self,
        addr: &DomusAddr,
        expected: Option<&DomusId>,
    ) -> Result<AuthenticatedStream, Error> {
        let span = tracing::debug_span!(
            "vicus.handshake",
            domus = %self.shared.material.load().local_id,
            direction = "dial",
            addr = %addr,
            peer = tracing::field::Empty,
        );
        let result = self
            .dial_in_span(addr, expected)
            .instrument(span.clone())
            .await;
        record_handshake(&span, &result);
        result
    }

    async fn dial_in_span(
        &self,
        addr: &DomusAddr,
        expected: Option<&DomusId>,
    ) -> Result<AuthenticatedStream, Error> {
        let config = &self.shared.config;
        let connect = async {
            if let Some(connector) = &self.shared.connector {
                let io = connector.connect(addr).await.map_err(|e| {
                    Error::new(ErrorId::ConnectFailed, format!("connecting to {addr}: {e}"))
                })?;
                return Ok((Socket::Other(io), None));
            }
            match addr {
                DomusAddr::Tcp(a) => Ok((Socket::Tcp(tcp::connect(&[*a]).await?), None)),
                DomusAddr::TcpHost { host, port } => {
                    let addrs = tcp::resolve(host, *port).await?;
                    Ok((Socket::Tcp(tcp::connect(&addrs).await?), None))
                }
                DomusAddr::Unix(path) => {
                    let s = unix::connect(path).await?;
                    let creds = unix::peer_credentials(&s)?;
                    Ok::<_, Error>((Socket::Unix(s), Some(creds)))
                }
            }
        };
        let (socket, creds) = tokio::time::timeout(config.connect_timeout, connect)
            .await
            .map_err(|_| {
                Error::new(
                    ErrorId::ConnectTimeout,
                    format!(
                        "connecting to {addr} took longer than {:?} (connect_timeout)",
                        config.connect_timeout
                    ),
                )
            })??;
        let deadline = Deadline::after(config.handshake_timeout);
        let material = self.shared.material.load_full();
        let policy = self.shared.policy.load_full();
        self.shared
            .ctx
            .connect(
                &material,
                policy,
                expected.cloned(),
                socket,
                creds,
                deadline,
            )
            .await
            .map_err(|e| Error::new(e.id(), format!("dialling {addr}: {}", e.message())))
    }
}

/// Records a handshake's end in its span: the authenticated peer, or the error.
fn record_handshake(span: &tracing::Span, result: &Result<AuthenticatedStream, Error>) {
    match result {
        Ok(stream) => {
            span.record("peer", tracing::field::display(stream.peer().id()));
        }
        Err(e) => {
            span.in_scope(|| tracing::debug!(error = %e, "handshake failed"));
        }
    }
}

fn listen_addr(l: &TcpListener) -> Result<SocketAddr, Error> {
    l.local_addr()
        .map_err(|e| Error::io("cannot read the listener's address", &e))
}

enum ListenSocket {
    Tcp(TcpListener),
    Unix(UnixListener),
}

/// A bound listener. [`accept`](Listener::accept) admits connections through the
/// pre-authentication gate; run each [`Incoming::handshake`] on its own task so a slow client
/// never delays another.
pub struct Listener {
    socket: ListenSocket,
    shared: Arc<Shared>,
    gate: Arc<Gate>,
    local_addr: DomusAddr,
    _socket_file: Option<unix::SocketFileGuard>,
}

/// Reads a listener's [`ListenerStats`] from elsewhere (reporting).
#[derive(Clone)]
pub(crate) struct StatsHandle(Arc<Gate>);

impl StatsHandle {
    pub(crate) fn stats(&self) -> ListenerStats {
        self.0.stats()
    }
}

impl std::fmt::Debug for Listener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Listener")
            .field("local_addr", &self.local_addr)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl Listener {
    /// The bound address (with the real port when bound to port 0).
    pub fn local_addr(&self) -> &DomusAddr {
        &self.local_addr
    }

    /// Admission and handshake counters.
    pub fn stats(&self) -> ListenerStats {
        self.gate.stats()
    }

    /// A handle that reads [`stats`](Self::stats) after the listener has moved into its
    /// accept loop.
    pub(crate) fn stats_handle(&self) -> StatsHandle {
        StatsHandle(self.gate.clone())
    }

    /// Waits for the next connection that passes the gate.
    ///
    /// Connections over the global or per-source limit, and Unix peers whose uid is not
    /// allowed, are closed here without any TLS work and counted in [`Listener::stats`]; they
    /// are never returned. An `Err` is an accept-level socket error (e.g. out of file
    /// descriptors); the listener stays usable.
    pub async fn accept(&self) -> Result<Incoming, Error> {
        loop {
            let (socket, source, unix_creds, remote) = match &self.socket {
                ListenSocket::Tcp(l) => {
                    let (s, addr) = l
                        .accept()
                        .await
                        .map_err(|e| Error::io("accepting a TCP connection failed", &e))?;
                    if tcp::nodelay(&s).is_err() {
                        continue;
                    }
                    (Socket::Tcp(s), Source::Ip(addr.ip()), None, Some(addr))
                }
                ListenSocket::Unix(l) => {
                    let (s, _) = l
                        .accept()
                        .await
                        .map_err(|e| Error::io("accepting a Unix connection failed", &e))?;
                    let Ok(creds) = unix::peer_credentials(&s) else {
                        continue;
                    };
                    if let Some(allowed) = &self.shared.config.unix_allowed_uids
                        && !allowed.contains(&creds.uid)
                    {
                        Counters::bump(&self.gate.counters.refused_uid);
                        tracing::debug!(
                            uid = creds.uid,
                            "Unix peer uid not allowed; closed before TLS"
                        );
                        continue;
                    }
                    (Socket::Unix(s), Source::Uid(creds.uid), Some(creds), None)
                }
            };
            match self.gate.try_admit(source) {
                Ok(permit) => {
                    return Ok(Incoming {
                        socket,
                        unix_creds,
                        remote,
                        deadline: Deadline::after(self.shared.config.handshake_timeout),
                        permit,
                        shared: self.shared.clone(),
                    });
                }
                Err(refusal) => {
                    tracing::debug!(
                        ?source,
                        ?refusal,
                        "pre-auth limit reached; closed before TLS"
                    );
                    drop(socket);
                }
            }
        }
    }
}

/// An admitted, not yet authenticated connection. It holds a pre-authentication slot until
/// [`handshake`](Incoming::handshake) finishes or it is dropped; its deadline started when it
/// was accepted.
pub struct Incoming {
    socket: Socket,
    unix_creds: Option<UnixCredentials>,
    remote: Option<SocketAddr>,
    deadline: Deadline,
    permit: AdmissionPermit,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Incoming {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Incoming")
            .field("remote", &self.remote)
            .field("unix", &self.unix_creds)
            .finish_non_exhaustive()
    }
}

impl Incoming {
    /// The client's socket address, on TCP.
    pub fn remote_addr(&self) -> Option<SocketAddr> {
        self.remote
    }

    /// The client process's credentials, on a Unix socket.
    pub fn unix_credentials(&self) -> Option<UnixCredentials> {
        self.unix_creds
    }

    /// Runs the mutual handshake with the material current at this moment, within the
    /// deadline that started at accept.
    ///
    /// Runs in a `vicus.handshake` span (debug level; `direction = "accept"`, the remote
    /// address, and the peer once authenticated).
    pub async fn handshake(self) -> Result<AuthenticatedStream, Error> {
        let span = tracing::debug_span!(
            "vicus.handshake",
            domus = %self.shared.material.load().local_id,
            direction = "accept",
            remote = ?self.remote,
            peer = tracing::field::Empty,
        );
        let result = self.handshake_in_span().instrument(span.clone()).await;
        record_handshake(&span, &result);
        result
    }

    async fn handshake_in_span(self) -> Result<AuthenticatedStream, Error> {
        let Incoming {
            socket,
            unix_creds,
            remote,
            deadline,
            permit,
            shared,
        } = self;
        let material = shared.material.load_full();
        let policy = shared.policy.load_full();
        let hello = HelloWait {
            timeout: shared.config.client_hello_timeout,
            permit: Some(&permit),
        };
        let result = shared
            .ctx
            .accept(&material, policy, socket, unix_creds, deadline, hello)
            .await;
        let counters = &permit.gate().counters;
        match &result {
            Ok(stream) => {
                Counters::bump(&counters.handshakes_ok);
                tracing::debug!(peer = %stream.peer(), ?remote, "peer authenticated");
            }
            Err(e) if e.id() == ErrorId::HandshakeTimeout => {
                Counters::bump(&counters.handshake_timeouts);
            }
            Err(e) => {
                Counters::bump(&counters.handshakes_failed);
                tracing::debug!(?remote, error = %e, "handshake refused");
            }
        }
        drop(permit);
        result
    }
}
