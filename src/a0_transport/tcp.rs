//! TCP specifics: resolving and binding a listen address, and connecting with `TCP_NODELAY`.
//!
//! No TLS and no policy here; the deadline for a connect is applied by the caller.

use std::net::SocketAddr;

use tokio::net::{TcpListener, TcpStream};

use crate::error::{Error, ErrorId};

/// Resolves `host:port` (or passes an address through) to the addresses to try, in order.
pub(crate) async fn resolve(host: &str, port: u16) -> Result<Vec<SocketAddr>, Error> {
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, port))
        .await
        .map_err(|e| {
            Error::new(
                ErrorId::InvalidAddress,
                format!("cannot resolve {host}:{port}: {e}"),
            )
        })?
        .collect();
    if addrs.is_empty() {
        return Err(Error::new(
            ErrorId::InvalidAddress,
            format!("{host}:{port} resolved to no address"),
        ));
    }
    Ok(addrs)
}

/// Binds a TCP listener on the first of `addrs` that works.
pub(crate) async fn bind(addrs: &[SocketAddr]) -> Result<TcpListener, Error> {
    let mut last = None;
    for addr in addrs {
        match TcpListener::bind(addr).await {
            Ok(listener) => return Ok(listener),
            Err(e) => last = Some((addr, e)),
        }
    }
    Err(match last {
        Some((addr, e)) => Error::io(format_args!("cannot listen on {addr}"), &e),
        None => Error::new(ErrorId::InvalidAddress, "no address to listen on"),
    })
}

/// Connects to the first of `addrs` that answers, with `TCP_NODELAY` set.
pub(crate) async fn connect(addrs: &[SocketAddr]) -> Result<TcpStream, Error> {
    let mut last = None;
    for addr in addrs {
        match TcpStream::connect(addr).await {
            Ok(stream) => {
                nodelay(&stream)?;
                return Ok(stream);
            }
            Err(e) => last = Some((addr, e)),
        }
    }
    Err(match last {
        Some((addr, e)) => Error::new(
            ErrorId::ConnectFailed,
            format!("cannot connect to {addr}: {e}"),
        ),
        None => Error::new(ErrorId::InvalidAddress, "no address to connect to"),
    })
}

/// Sets `TCP_NODELAY`: vicus batches its own writes, so Nagle's delay only adds latency.
pub(crate) fn nodelay(stream: &TcpStream) -> Result<(), Error> {
    stream
        .set_nodelay(true)
        .map_err(|e| Error::io("cannot set TCP_NODELAY", &e))
}
