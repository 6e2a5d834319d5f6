//! [`DomusAddr`] (where a domus listens) and [`AuthenticatedStream`] (a TLS 1.3 stream whose
//! peer has been verified), plus the socket type both transports share.
//!
//! Pure plumbing: byte delegation to the socket and to tokio-rustls. No policy, no timeouts.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::str::FromStr;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpStream, UnixStream};

use super::identity::PeerIdentity;
use crate::error::{Error, ErrorId};

/// Where a domus listens or is dialled.
#[derive(Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum DomusAddr {
    /// A TCP socket address (port 0 when binding picks a free port).
    Tcp(SocketAddr),
    /// A host name and port, resolved when dialled or bound.
    TcpHost {
        /// The DNS name or address literal.
        host: String,
        /// The TCP port.
        port: u16,
    },
    /// A Unix socket path.
    Unix(PathBuf),
}

impl DomusAddr {
    /// A TCP address.
    pub fn tcp(addr: impl Into<SocketAddr>) -> Self {
        Self::Tcp(addr.into())
    }

    /// A Unix socket path.
    pub fn unix(path: impl Into<PathBuf>) -> Self {
        Self::Unix(path.into())
    }
}

impl FromStr for DomusAddr {
    type Err = Error;

    /// Parses `unix:/path`, `unix:///path`, `tcp://host:port`, `1.2.3.4:5`, `[::1]:5` or
    /// `host:port`.
    fn from_str(s: &str) -> Result<Self, Error> {
        let bad = |why: &str| {
            Error::new(
                ErrorId::InvalidAddress,
                format!(
                    "\"{}\" is not a domus address: {why}",
                    crate::error::untrusted(s)
                ),
            )
        };
        if let Some(path) = s.strip_prefix("unix:") {
            let path = path.strip_prefix("//").unwrap_or(path);
            if !path.starts_with('/') {
                return Err(bad("a Unix socket path must be absolute (unix:/path)"));
            }
            return Ok(Self::Unix(PathBuf::from(path)));
        }
        let rest = s.strip_prefix("tcp://").unwrap_or(s);
        if let Ok(addr) = rest.parse::<SocketAddr>() {
            return Ok(Self::Tcp(addr));
        }
        let (host, port) = rest
            .rsplit_once(':')
            .ok_or_else(|| bad("expected host:port or unix:/path"))?;
        let port = port
            .parse::<u16>()
            .map_err(|_| bad("the port is not a number from 0 to 65535"))?;
        if host.is_empty() || host.contains(['/', '[', ']', ' ']) {
            return Err(bad("the host name is empty or malformed"));
        }
        Ok(Self::TcpHost {
            host: host.to_owned(),
            port,
        })
    }
}

impl fmt::Display for DomusAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Tcp(addr) => write!(f, "{addr}"),
            Self::TcpHost { host, port } => write!(f, "{host}:{port}"),
            Self::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

impl fmt::Debug for DomusAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DomusAddr({self})")
    }
}

impl From<SocketAddr> for DomusAddr {
    fn from(addr: SocketAddr) -> Self {
        Self::Tcp(addr)
    }
}

/// Any byte stream that can carry a callis: TLS runs over it exactly as over a socket. A
/// TCP or Unix socket is one; so is an in-memory duplex (`tokio::io::duplex`) or a simulated
/// network's stream, handed to [`Transport::connect_over`](super::Transport::connect_over),
/// [`Transport::accept_over`](super::Transport::accept_over) or a [`Connector`].
pub trait CallisStream: AsyncRead + AsyncWrite + Send + Unpin + 'static {}

impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> CallisStream for T {}

/// The future a [`Connector`] returns.
pub type ConnectFuture<'a> =
    Pin<Box<dyn std::future::Future<Output = io::Result<Box<dyn CallisStream>>> + Send + 'a>>;

/// Opens the byte stream a dial runs its handshake over, instead of a TCP or Unix connect:
/// the seam through which an in-memory or simulated network carries calles. The handshake,
/// identity checks and deadlines stay the same; `connect_timeout` bounds this call.
pub trait Connector: Send + Sync + 'static {
    /// A stream to the domus at `addr`.
    fn connect<'a>(&'a self, addr: &'a DomusAddr) -> ConnectFuture<'a>;
}

/// A connected TCP or Unix socket (or another carrier), before or under TLS.
pub(crate) enum Socket {
    Tcp(TcpStream),
    Unix(UnixStream),
    Other(Box<dyn CallisStream>),
}

impl fmt::Debug for Socket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Tcp(s) => s.fmt(f),
            Self::Unix(s) => s.fmt(f),
            Self::Other(_) => f.write_str("Socket::Other"),
        }
    }
}

impl AsyncRead for Socket {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Self::Unix(s) => Pin::new(s).poll_read(cx, buf),
            Self::Other(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Socket {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Self::Unix(s) => Pin::new(s).poll_write(cx, buf),
            Self::Other(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Self::Unix(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Self::Other(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Self::Tcp(s) => s.is_write_vectored(),
            Self::Unix(s) => s.is_write_vectored(),
            Self::Other(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(s) => Pin::new(s).poll_flush(cx),
            Self::Unix(s) => Pin::new(s).poll_flush(cx),
            Self::Other(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Self::Unix(s) => Pin::new(s).poll_shutdown(cx),
            Self::Other(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// A TLS 1.3 stream over TCP or a Unix socket whose peer has been authenticated.
///
/// It exists only after the whole A0 exchange succeeded: the peer's chain was verified, its
/// identity passed the trust policy (and matched the expected id, when dialling), and the
/// listener confirmed it accepted us. Reading and writing go through TLS.
pub struct AuthenticatedStream {
    tls: tokio_rustls::TlsStream<Socket>,
    peer: PeerIdentity,
}

impl AuthenticatedStream {
    pub(crate) fn new(tls: tokio_rustls::TlsStream<Socket>, peer: PeerIdentity) -> Self {
        Self { tls, peer }
    }

    /// Who the peer is.
    pub fn peer(&self) -> &PeerIdentity {
        &self.peer
    }

    fn common(&self) -> &rustls::CommonState {
        match &self.tls {
            tokio_rustls::TlsStream::Client(s) => s.get_ref().1,
            tokio_rustls::TlsStream::Server(s) => s.get_ref().1,
        }
    }

    /// The negotiated TLS version (always TLS 1.3).
    pub fn protocol_version(&self) -> Option<rustls::ProtocolVersion> {
        self.common().protocol_version()
    }

    /// The negotiated cipher suite.
    pub fn cipher_suite(&self) -> Option<rustls::CipherSuite> {
        self.common().negotiated_cipher_suite().map(|s| s.suite())
    }

    /// The negotiated key-exchange group (X25519MLKEM768 with the default aws-lc-rs provider).
    pub fn key_exchange_group(&self) -> Option<rustls::NamedGroup> {
        self.common()
            .negotiated_key_exchange_group()
            .map(|g| g.name())
    }

    /// The peer's certificate chain as presented in the handshake (leaf first).
    pub fn peer_chain(&self) -> Vec<rustls::pki_types::CertificateDer<'static>> {
        let certs = match &self.tls {
            tokio_rustls::TlsStream::Client(s) => s.get_ref().1.peer_certificates(),
            tokio_rustls::TlsStream::Server(s) => s.get_ref().1.peer_certificates(),
        };
        certs
            .map(|c| c.iter().map(|d| d.clone().into_owned()).collect())
            .unwrap_or_default()
    }

    /// Whether this side dialled the connection.
    pub fn is_dialer(&self) -> bool {
        matches!(self.tls, tokio_rustls::TlsStream::Client(_))
    }

    /// The peer's socket address, on TCP.
    pub fn peer_socket_addr(&self) -> Option<SocketAddr> {
        match self.socket() {
            Socket::Tcp(s) => s.peer_addr().ok(),
            Socket::Unix(_) | Socket::Other(_) => None,
        }
    }

    fn socket(&self) -> &Socket {
        match &self.tls {
            tokio_rustls::TlsStream::Client(s) => s.get_ref().0,
            tokio_rustls::TlsStream::Server(s) => s.get_ref().0,
        }
    }
}

impl fmt::Debug for AuthenticatedStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthenticatedStream")
            .field("peer", &self.peer)
            .field("dialer", &self.is_dialer())
            .finish_non_exhaustive()
    }
}

impl AsyncRead for AuthenticatedStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tls).poll_read(cx, buf)
    }
}

impl AsyncWrite for AuthenticatedStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tls).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tls).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tls.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tls).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tls).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_addresses() {
        assert_eq!(
            "127.0.0.1:7000".parse::<DomusAddr>().unwrap(),
            DomusAddr::Tcp("127.0.0.1:7000".parse().unwrap())
        );
        assert_eq!(
            "tcp://[::1]:7".parse::<DomusAddr>().unwrap(),
            DomusAddr::Tcp("[::1]:7".parse().unwrap())
        );
        assert_eq!(
            "unix:///run/v.sock".parse::<DomusAddr>().unwrap(),
            DomusAddr::unix("/run/v.sock")
        );
        assert_eq!(
            "unix:/run/v.sock".parse::<DomusAddr>().unwrap(),
            DomusAddr::unix("/run/v.sock")
        );
        assert_eq!(
            "node-1.internal:9000".parse::<DomusAddr>().unwrap(),
            DomusAddr::TcpHost {
                host: "node-1.internal".into(),
                port: 9000
            }
        );
        for bad in ["", "unix:rel/path", "host", "host:99999", ":80", "a b:1"] {
            assert_eq!(
                bad.parse::<DomusAddr>().unwrap_err().id(),
                ErrorId::InvalidAddress,
                "{bad}"
            );
        }
    }
}
