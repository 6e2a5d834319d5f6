//! [`serve`]: the gateway's router on a TCP listener, with the bounds axum's own `serve`
//! leaves out — a deadline for reading a request's headers (slowloris) and a cap on open
//! connections — and the rule that an open gateway stays on loopback.
//!
//! One accept loop and one task per connection, all ended when `shutdown` completes. It must
//! not accept past `max_connections` (it waits for a connection to close first).

use std::future::Future;
use std::sync::Arc;

use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use super::Gateway;
use crate::error::{Error, ErrorId};

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
    if config.access.is_open() && !local.ip().is_loopback() && !config.dangerous_open_on_any_address
    {
        return Err(Error::new(
            ErrorId::InvalidConfig,
            format!(
                "the HTTP gateway would be open to anyone on {local}: configure bearer tokens \
                 (Access::Bearer), bind a loopback address, or set \
                 dangerous_open_on_any_address"
            ),
        ));
    }
    let service = TowerToHyperService::new(gateway.router());
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
        let service = service.clone();
        let header_read_timeout = config.header_read_timeout;
        connections.spawn(async move {
            let mut http = hyper::server::conn::http1::Builder::new();
            http.timer(TokioTimer::new())
                .header_read_timeout(header_read_timeout);
            // A failed connection (a reset, a header deadline) ends only itself.
            let _ = http.serve_connection(TokioIo::new(stream), service).await;
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
