//! [`serve`]: the gateway's router on a TCP listener, with the bounds axum's own `serve`
//! leaves out — a deadline for reading a request's headers (slowloris) and a cap on open
//! connections — and the rule that an open gateway stays on loopback. [`serve_tls`]: the same
//! over TLS 1.3 with mandatory client certificates ([`GatewayTls`]), verified by the domus's
//! own verifier against the mesh's CA.
//!
//! One accept loop and one task per connection, all ended when `shutdown` completes. It must
//! not accept past `max_connections` (it waits for a connection to close first), and a TLS
//! handshake gets `header_read_timeout` like a request head.

use std::future::Future;
use std::sync::Arc;

use axum::Extension;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use super::{Access, Gateway, GatewayConfig, VerifiedClient};
use crate::a0_transport::{AuthConfig, TrustPolicy, default_crypto_provider};
use crate::error::{Error, ErrorId};

/// TLS for [`serve_tls`]: HTTPS whose clients must present a certificate of the mesh.
#[derive(Clone)]
pub struct GatewayTls {
    config: Arc<rustls::ServerConfig>,
}

impl std::fmt::Debug for GatewayTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GatewayTls").finish_non_exhaustive()
    }
}

impl GatewayTls {
    /// HTTPS (TLS 1.3, ALPN `http/1.1`) with the certificate, key, CA bundle and CRLs of
    /// `auth` — typically the domus's own material — and a client certificate required from
    /// every client, verified exactly as a domus verifies a peer that dials it (chains to the
    /// CA bundle only, `clientAuth`, CRLs, exactly one URI SAN) and accepted when `clients`
    /// accepts its identity (e.g. `TrustPolicy::allow_list`). HTTP clients check the server's
    /// certificate by host name, so give the leaf a DNS or IP SAN besides its URI SAN (a leaf
    /// with only a URI SAN verifies for vicus, not for curl or a browser). The default crypto
    /// provider is used. Material that does not load is refused with `InvalidAuthMaterial`.
    pub fn mutual(auth: &AuthConfig, clients: TrustPolicy) -> Result<Self, Error> {
        let config = crate::a0_transport::mutual_tls_server_config(
            auth,
            clients,
            default_crypto_provider(),
            vec![b"http/1.1".to_vec()],
        )?;
        Ok(Self {
            config: Arc::new(config),
        })
    }
}

/// Serves `gateway` on `listener` (HTTP/1.1) until `shutdown` completes; then stops accepting
/// and drops every connection still open.
///
/// Refused with `InvalidConfig` before serving anything when the gateway is open
/// ([`Access::Open`](super::Access::Open)) and the listener is not bound to a loopback
/// address, unless `dangerous_open_on_any_address` is set. Fails with `Io` when the listener
/// fails (accept errors of one connection, such as a reset, are skipped).
pub async fn serve(
    listener: TcpListener,
    gateway: Gateway,
    shutdown: impl Future<Output = ()>,
) -> Result<(), Error> {
    let local = listener
        .local_addr()
        .map_err(|e| Error::io("the gateway's listener", &e))?;
    let config = gateway.config().clone();
    if matches!(config.access, Access::MutualTls) {
        return Err(Error::new(
            ErrorId::InvalidConfig,
            "Access::MutualTls needs the TLS handshake of serve_tls; serve has none",
        ));
    }
    check_exposure(local, &config)?;
    let service = TowerToHyperService::new(gateway.router());
    let header_read_timeout = config.header_read_timeout;
    accept_loop(listener, &config, shutdown, move |stream| {
        let service = service.clone();
        async move { serve_connection(stream, service, header_read_timeout).await }
    })
    .await
}

/// The loopback rule of [`serve`]: an open gateway only on a loopback address, unless
/// `dangerous_open_on_any_address`.
fn check_exposure(local: std::net::SocketAddr, config: &GatewayConfig) -> Result<(), Error> {
    if config.access.is_open() && !local.ip().is_loopback() && !config.dangerous_open_on_any_address
    {
        return Err(Error::new(
            ErrorId::InvalidConfig,
            format!(
                "the HTTP gateway would be open to anyone on {local}: configure bearer tokens \
                 (Access::Bearer) or client certificates (serve_tls), bind a loopback address, \
                 or set dangerous_open_on_any_address"
            ),
        ));
    }
    Ok(())
}

/// Serves `gateway` on `listener` over TLS ([`GatewayTls`]: every client presents a verified
/// certificate of the mesh) until `shutdown` completes. Each request carries its connection's
/// [`VerifiedClient`]; with [`Access::MutualTls`] that is the access rule (bearer tokens can
/// be required on top with [`Access::Bearer`]). A handshake must finish within
/// `header_read_timeout`. Since every client is authenticated, any address may be bound.
pub async fn serve_tls(
    listener: TcpListener,
    gateway: Gateway,
    tls: GatewayTls,
    shutdown: impl Future<Output = ()>,
) -> Result<(), Error> {
    let config = gateway.config().clone();
    let acceptor = tokio_rustls::TlsAcceptor::from(tls.config);
    let router = gateway.router();
    let header_read_timeout = config.header_read_timeout;
    accept_loop(listener, &config, shutdown, move |stream| {
        let acceptor = acceptor.clone();
        let router = router.clone();
        async move {
            let Ok(Ok(tls)) =
                tokio::time::timeout(header_read_timeout, acceptor.accept(stream)).await
            else {
                // A failed or slow handshake ends only this connection.
                return;
            };
            let client = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|chain| chain.first())
                .and_then(crate::a0_transport::identity_of_leaf);
            let Some(client) = client else {
                return;
            };
            let service = TowerToHyperService::new(router.layer(Extension(VerifiedClient(client))));
            serve_connection(tls, service, header_read_timeout).await;
        }
    })
    .await
}

/// One HTTP/1.1 connection, with hyper's header-read deadline.
async fn serve_connection<S, IO>(io: IO, service: S, header_read_timeout: std::time::Duration)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::Service<
            hyper::Request<hyper::body::Incoming>,
            Response = axum::response::Response,
        > + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(header_read_timeout);
    // A failed connection (a reset, a header deadline) ends only itself.
    let _ = http.serve_connection(TokioIo::new(io), service).await;
}

/// Accepts connections until `shutdown`, at most `max_connections` open at once, each run by
/// `connection` on a task of its own; then drops those still open.
async fn accept_loop<F, Fut>(
    listener: TcpListener,
    config: &GatewayConfig,
    shutdown: impl Future<Output = ()>,
    connection: F,
) -> Result<(), Error>
where
    F: Fn(TcpStream) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(config.max_connections));
    let mut connections = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        while connections.try_join_next().is_some() {}
        let slot = tokio::select! {
            () = &mut shutdown => break,
            slot = slots.clone().acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => break,
            },
        };
        let stream = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) if is_per_connection(&e) => continue,
                Err(e) => return Err(Error::io("the gateway's listener", &e)),
            },
        };
        let _ = stream.set_nodelay(true);
        let run = connection(stream);
        connections.spawn(async move {
            run.await;
            drop(slot);
        });
    }
    connections.abort_all();
    Ok(())
}

/// An accept error that concerns one connection (the listener itself is fine).
fn is_per_connection(e: &std::io::Error) -> bool {
    use std::io::ErrorKind as K;
    matches!(
        e.kind(),
        K::ConnectionAborted | K::ConnectionReset | K::ConnectionRefused | K::Interrupted
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gateway::BearerTokens;

    /// T35: open only on loopback; tokens (or the explicit dangerous flag) for anything else.
    /// Checked on addresses alone, so no test listens beyond loopback.
    #[test]
    fn an_open_gateway_stays_on_loopback() {
        let open = GatewayConfig::default();
        for local in ["127.0.0.1:7080", "[::1]:7080", "127.3.4.5:1"] {
            assert!(
                check_exposure(local.parse().expect("addr"), &open).is_ok(),
                "{local}"
            );
        }
        for local in ["0.0.0.0:7080", "[::]:7080", "10.0.0.7:80"] {
            let e = check_exposure(local.parse().expect("addr"), &open).expect_err(local);
            assert_eq!(e.id(), ErrorId::InvalidConfig);
        }
        let tokens = BearerTokens::new(["0123456789abcdef"]).expect("tokens");
        let guarded = GatewayConfig::default().access(Access::Bearer(tokens));
        assert!(check_exposure("0.0.0.0:7080".parse().expect("addr"), &guarded).is_ok());
        let dangerous = GatewayConfig {
            dangerous_open_on_any_address: true,
            ..GatewayConfig::default()
        };
        assert!(check_exposure("0.0.0.0:7080".parse().expect("addr"), &dangerous).is_ok());
    }
}
