//! TCP specifics: resolving and binding a listen address, and connecting with `TCP_NODELAY`.
//!
//! No TLS and no policy here; the deadline for a connect is applied by the caller.

use std::net::SocketAddr;

use tokio::net::{TcpListener, TcpSocket, TcpStream};

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

/// Binds a TCP listener with `backlog` on the first of `addrs` that works.
pub(crate) fn bind(addrs: &[SocketAddr], backlog: u32) -> Result<TcpListener, Error> {
    let mut last = None;
    for addr in addrs {
        match bind_one(*addr, backlog) {
            Ok(listener) => return Ok(listener),
            Err(e) => last = Some((addr, e)),
        }
    }
    Err(match last {
        Some((addr, e)) => Error::io(format_args!("cannot listen on {addr}"), &e),
        None => Error::new(ErrorId::InvalidAddress, "no address to listen on"),
    })
}

fn bind_one(addr: SocketAddr, backlog: u32) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    // As `TcpListener::bind` does: a restarted node rebinds its port at once.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(backlog)
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
