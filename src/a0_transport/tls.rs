//! TLS 1.3 configuration and the mutual handshake itself, identical over TCP and Unix sockets.
//!
//! Configs are built with `builder_with_provider` from an explicit crypto provider (the library
//! never installs a process-wide default) and allow TLS 1.3 only; rustls' `tls12` feature is not
//! compiled in. Every callis runs a full handshake: session tickets and resumption are off, so a
//! certificate is verified on every connection. ALPN `vicus/1` is required on both sides.
//!
//! After the TLS handshake the listener sends a 4-byte **A0 verdict** (`docs/wire-protocol.md`),
//! and the dialer hands out its stream only after reading it. In TLS 1.3 the client finishes
//! its handshake before the server has checked the client's certificate; without the verdict a
//! dialer whose certificate was refused would believe it was connected.
//!
//! This module never touches the clock directly except through tokio's deadlines and rustls'
//! own time provider, and holds no lock across an `.await`.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use rustls::client::Resumption;
use rustls::crypto::CryptoProvider;
use rustls::crypto::hash::{Hash, HashAlgorithm};
use rustls::pki_types::ServerName;
use rustls::server::NoServerSessionStorage;
use rustls::sign::{CertifiedKey, SingleCertAndKey};
use rustls::{AlertDescription, ClientConfig, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;
use tokio_rustls::{LazyConfigAcceptor, StartHandshake, TlsConnector};

use super::admission::{AdmissionPermit, Counters};
use super::identity::{CertFingerprint, DomusId, PeerIdentity, TrustPolicy, UnixCredentials};
use super::material::AuthConfig;
use super::stream::{AuthenticatedStream, Socket};
use super::verifier::{PeerVerifier, TrustStore, domus_id_of};
use crate::error::{Error, ErrorId};

/// The ALPN protocol id every vicus connection negotiates.
pub const ALPN_PROTOCOL: &[u8] = b"vicus/1";

/// The A0 verdict the listener sends after a successful handshake: magic `VA`, version 1,
/// status 0 (accepted).
const VERDICT_ACCEPTED: [u8; 4] = [b'V', b'A', 1, 0];

/// SNI is disabled; rustls still needs a syntactically valid name for the client side.
const PLACEHOLDER_SERVER_NAME: &str = "vicus.invalid";

/// Which built-in provider is the default when features `aws-lc-rs` and `ring` are enabled
/// as given: aws-lc-rs whenever it is compiled in (it is the default feature), ring only
/// without it. Both together is legal — Cargo unifies features across a dependency tree, so a
/// crate elsewhere may enable `ring` — and the choice is then reported, never silent.
pub(crate) const fn provider_rule(aws_lc_rs: bool, ring: bool) -> Option<&'static str> {
    match (aws_lc_rs, ring) {
        (true, _) => Some("aws-lc-rs"),
        (false, true) => Some("ring"),
        (false, false) => None,
    }
}

/// The name of the provider [`default_crypto_provider`] returns: `"aws-lc-rs"` or `"ring"`.
pub const DEFAULT_CRYPTO_PROVIDER: &str =
    match provider_rule(cfg!(feature = "aws-lc-rs"), cfg!(feature = "ring")) {
        Some(name) => name,
        None => "none",
    };

/// Whether both built-in providers are compiled in (the default is then aws-lc-rs).
pub(crate) const BOTH_PROVIDERS_COMPILED: bool = cfg!(all(feature = "aws-lc-rs", feature = "ring"));

/// The crypto provider vicus uses unless told otherwise: aws-lc-rs (post-quantum hybrid key
/// exchange X25519MLKEM768 preferred) with feature `aws-lc-rs`, else ring with feature `ring`;
/// see [`DEFAULT_CRYPTO_PROVIDER`].
#[cfg(feature = "aws-lc-rs")]
pub fn default_crypto_provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// The crypto provider vicus uses unless told otherwise: aws-lc-rs (post-quantum hybrid key
/// exchange X25519MLKEM768 preferred) with feature `aws-lc-rs`, else ring with feature `ring`;
/// see [`DEFAULT_CRYPTO_PROVIDER`].
#[cfg(all(feature = "ring", not(feature = "aws-lc-rs")))]
pub fn default_crypto_provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

#[cfg(not(any(feature = "aws-lc-rs", feature = "ring")))]
compile_error!("vicus needs a crypto provider: enable feature `aws-lc-rs` (default) or `ring`");

/// Everything derived from one [`AuthConfig`], swapped as a whole on reload.
pub(crate) struct LoadedMaterial {
    pub(crate) local_id: DomusId,
    certified: Arc<CertifiedKey>,
    store: Arc<TrustStore>,
}

impl LoadedMaterial {
    /// The trust anchors and CRLs of this material.
    pub(crate) fn store(&self) -> &TrustStore {
        &self.store
    }

    /// Parses and checks `auth`: trust anchors and CRLs usable, leaf names exactly one valid
    /// URI SAN, private key loadable and matching the leaf.
    pub(crate) fn load(auth: &AuthConfig, provider: &CryptoProvider) -> Result<Self, Error> {
        let store = TrustStore::new(auth, provider.signature_verification_algorithms)?;
        let leaf = auth.chain.first().ok_or_else(|| {
            Error::new(
                ErrorId::InvalidAuthMaterial,
                "the certificate chain is empty",
            )
        })?;
        let parsed = webpki::EndEntityCert::try_from(leaf).map_err(|e| {
            Error::new(
                ErrorId::InvalidAuthMaterial,
                format!("our leaf certificate cannot be parsed: {e}"),
            )
        })?;
        let local_id = domus_id_of(&parsed).map_err(|e| {
            Error::new(
                ErrorId::InvalidAuthMaterial,
                format!(
                    "our own leaf certificate is unusable: {}",
                    e.message().replace("the peer's", "its")
                ),
            )
        })?;
        let signing_key = provider
            .key_provider
            .load_private_key(auth.key.clone_key())
            .map_err(|e| {
                Error::new(
                    ErrorId::InvalidAuthMaterial,
                    format!("the private key cannot be loaded: {e}"),
                )
            })?;
        let certified = CertifiedKey::new(auth.chain.clone(), signing_key);
        match certified.keys_match() {
            Ok(()) => {}
            Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
            Err(_) => {
                return Err(Error::new(
                    ErrorId::InvalidAuthMaterial,
                    format!("the private key does not match the leaf certificate for {local_id}"),
                ));
            }
        }
        Ok(Self {
            local_id,
            certified: Arc::new(certified),
            store: Arc::new(store),
        })
    }
}

impl LoadedMaterial {
    /// Verifies this domus's own chain with the verifier peers run, against this material's
    /// own trust anchors and CRLs, at the current time, for either role (a leaf usable only as
    /// a server or only as a client still loads). Material that fails here would be refused
    /// at every handshake by peers that trust the same anchors.
    pub(crate) fn verify_own_chain(&self) -> Result<(), Error> {
        let Some((leaf, intermediates)) = self.certified.cert.split_first() else {
            return Err(Error::new(
                ErrorId::InvalidAuthMaterial,
                "the certificate chain is empty",
            ));
        };
        let now = rustls::pki_types::UnixTime::now();
        let as_server =
            self.store
                .verify(leaf, intermediates, now, webpki::KeyUsage::server_auth());
        let Err((_, why)) = as_server else {
            return Ok(());
        };
        let as_client =
            self.store
                .verify(leaf, intermediates, now, webpki::KeyUsage::client_auth());
        if as_client.is_ok() {
            return Ok(());
        }
        Err(Error::new(
            ErrorId::InvalidAuthMaterial,
            format!(
                "the certificate chain of {} does not verify against its own trust anchors, so peers trusting them would refuse it: {}",
                self.local_id,
                why.message()
            ),
        ))
    }
}

/// The SHA-256 implementation of `provider`, found through its TLS 1.3 cipher suites.
pub(crate) fn sha256_of(provider: &CryptoProvider) -> Result<&'static dyn Hash, Error> {
    provider
        .cipher_suites
        .iter()
        .filter_map(|suite| suite.tls13())
        .map(|suite| suite.common.hash_provider)
        .find(|hash| hash.algorithm() == HashAlgorithm::SHA256)
        .ok_or_else(|| {
            Error::invalid_config(
                "crypto provider",
                "it offers no TLS 1.3 cipher suite with SHA-256",
            )
        })
}

/// A server config for TLS beside the mesh (the HTTP gateway's HTTPS, feature
/// `http-gateway`): the certificate and key of `auth`, TLS 1.3 only, no session resumption,
/// ALPN `alpn`, and client certificates **mandatory**, verified by the very verifier a domus
/// runs on a dialer (the CA bundle and CRLs of `auth`, `clientAuth`, exactly one URI SAN that
/// `policy` accepts).
#[cfg(feature = "http-gateway")]
pub(crate) fn mutual_tls_server_config(
    auth: &AuthConfig,
    policy: TrustPolicy,
    provider: Arc<CryptoProvider>,
    alpn: Vec<Vec<u8>>,
) -> Result<ServerConfig, Error> {
    tls13_only(&provider)?;
    let material = LoadedMaterial::load(auth, &provider)?;
    material.verify_own_chain()?;
    let verifier = Arc::new(PeerVerifier::new(
        material.store.clone(),
        Arc::new(policy),
        None,
    ));
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| Error::invalid_config("crypto provider", e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(SingleCertAndKey::from(material.certified.clone())));
    config.alpn_protocols = alpn;
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(config)
}

/// The identity a verified peer's leaf names (its one URI SAN), if it parses.
#[cfg(feature = "http-gateway")]
pub(crate) fn identity_of_leaf(leaf: &rustls::pki_types::CertificateDer<'_>) -> Option<DomusId> {
    let cert = webpki::EndEntityCert::try_from(leaf).ok()?;
    domus_id_of(&cert).ok()
}

fn tls13_only(provider: &Arc<CryptoProvider>) -> Result<(), Error> {
    ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map(|_| ())
        .map_err(|e| Error::invalid_config("crypto provider", format!("it cannot do TLS 1.3: {e}")))
}

/// When a handshake must be finished, and the budget it was given (for the error message).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Deadline {
    pub(crate) at: Instant,
    pub(crate) budget: Duration,
}

impl Deadline {
    /// The deadline `budget` from now.
    pub(crate) fn after(budget: Duration) -> Self {
        let now = Instant::now();
        Self {
            at: now.checked_add(budget).unwrap_or(now),
            budget,
        }
    }
}

/// The parts of a handshake that do not change per connection.
pub(crate) struct HandshakeContext {
    pub(crate) provider: Arc<CryptoProvider>,
    pub(crate) sha256: &'static dyn Hash,
}

impl HandshakeContext {
    pub(crate) fn new(provider: Arc<CryptoProvider>) -> Result<Self, Error> {
        tls13_only(&provider)?;
        let sha256 = sha256_of(&provider)?;
        Ok(Self { provider, sha256 })
    }

    fn server_config(
        &self,
        material: &LoadedMaterial,
        verifier: Arc<PeerVerifier>,
    ) -> Result<ServerConfig, Error> {
        let mut config = ServerConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| Error::new(ErrorId::HandshakeFailed, e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(Arc::new(SingleCertAndKey::from(material.certified.clone())));
        config.alpn_protocols = vec![ALPN_PROTOCOL.to_vec()];
        config.session_storage = Arc::new(NoServerSessionStorage {});
        config.send_tls13_tickets = 0;
        Ok(config)
    }

    fn client_config(
        &self,
        material: &LoadedMaterial,
        verifier: Arc<PeerVerifier>,
    ) -> Result<ClientConfig, Error> {
        let mut config = ClientConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| Error::new(ErrorId::HandshakeFailed, e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_cert_resolver(Arc::new(SingleCertAndKey::from(
                material.certified.clone(),
            )));
        config.alpn_protocols = vec![ALPN_PROTOCOL.to_vec()];
        config.resumption = Resumption::disabled();
        config.enable_sni = false;
        Ok(config)
    }

    fn fingerprint(&self, der: &[u8]) -> CertFingerprint {
        let digest = self.sha256.hash(der);
        let mut out = [0u8; 32];
        for (dst, src) in out.iter_mut().zip(digest.as_ref()) {
            *dst = *src;
        }
        CertFingerprint(out)
    }

    /// Runs the listener side of the handshake on an admitted socket, until `deadline`; the
    /// ClientHello must arrive within `hello.timeout` (and, for a socket admitted by the
    /// gate, before the gate evicts it to make room).
    pub(crate) async fn accept(
        &self,
        material: &LoadedMaterial,
        policy: Arc<TrustPolicy>,
        socket: Socket,
        unix: Option<UnixCredentials>,
        deadline: Deadline,
        hello: HelloWait<'_>,
    ) -> Result<AuthenticatedStream, Error> {
        let verifier = Arc::new(PeerVerifier::new(material.store.clone(), policy, None));
        let work = async {
            let start = hello.wait(socket, deadline.at).await?;
            let config = self.server_config(material, verifier.clone())?;
            let mut tls = start
                .into_stream(Arc::new(config))
                .await
                .map_err(|e| handshake_error(&e, &verifier))?;
            let (_, conn) = tls.get_ref();
            let peer = self.peer_identity(conn, unix)?;
            tls.write_all(&VERDICT_ACCEPTED)
                .await
                .map_err(|e| handshake_error(&e, &verifier))?;
            tls.flush()
                .await
                .map_err(|e| handshake_error(&e, &verifier))?;
            Ok(AuthenticatedStream::new(
                tokio_rustls::TlsStream::Server(tls),
                peer,
            ))
        };
        tokio::time::timeout_at(deadline.at, work)
            .await
            .map_err(|_| Error::handshake_timeout(deadline.budget))?
    }

    /// Runs the dialer side of the handshake on a connected socket, until `deadline`.
    pub(crate) async fn connect(
        &self,
        material: &LoadedMaterial,
        policy: Arc<TrustPolicy>,
        expected: Option<DomusId>,
        socket: Socket,
        unix: Option<UnixCredentials>,
        deadline: Deadline,
    ) -> Result<AuthenticatedStream, Error> {
        let verifier = Arc::new(PeerVerifier::new(material.store.clone(), policy, expected));
        let config = self.client_config(material, verifier.clone())?;
        let connector = TlsConnector::from(Arc::new(config));
        let name = ServerName::try_from(PLACEHOLDER_SERVER_NAME)
            .map_err(|e| Error::new(ErrorId::HandshakeFailed, e.to_string()))?;
        let work = async {
            let mut tls = connector
                .connect(name, socket)
                .await
                .map_err(|e| handshake_error(&e, &verifier))?;
            let (_, conn) = tls.get_ref();
            let peer = self.peer_identity(conn, unix)?;
            let mut verdict = [0u8; 4];
            tls.read_exact(&mut verdict)
                .await
                .map_err(|e| handshake_error(&e, &verifier))?;
            check_verdict(verdict)?;
            Ok(AuthenticatedStream::new(
                tokio_rustls::TlsStream::Client(tls),
                peer,
            ))
        };
        tokio::time::timeout_at(deadline.at, work)
            .await
            .map_err(|_| Error::handshake_timeout(deadline.budget))?
    }

    fn peer_identity(
        &self,
        conn: &rustls::CommonState,
        unix: Option<UnixCredentials>,
    ) -> Result<PeerIdentity, Error> {
        if conn.protocol_version() != Some(rustls::ProtocolVersion::TLSv1_3) {
            return Err(Error::new(
                ErrorId::HandshakeFailed,
                "the handshake did not negotiate TLS 1.3",
            ));
        }
        if conn.alpn_protocol() != Some(ALPN_PROTOCOL) {
            return Err(Error::new(
                ErrorId::HandshakeFailed,
                "the peer did not negotiate ALPN vicus/1; it is not a vicus node",
            ));
        }
        // The verifier accepted exactly these certificates during this handshake; read the
        // identity back from the same leaf.
        let leaf = conn
            .peer_certificates()
            .and_then(|certs| certs.first())
            .ok_or_else(|| {
                Error::new(
                    ErrorId::PeerCertificateRejected,
                    "the peer presented no certificate",
                )
            })?;
        let parsed = webpki::EndEntityCert::try_from(leaf).map_err(|e| {
            Error::new(
                ErrorId::PeerCertificateRejected,
                format!("unparsable peer certificate: {e}"),
            )
        })?;
        let id = domus_id_of(&parsed)?;
        Ok(PeerIdentity::new(id, self.fingerprint(leaf), unix))
    }
}

fn check_verdict(verdict: [u8; 4]) -> Result<(), Error> {
    match verdict {
        VERDICT_ACCEPTED => Ok(()),
        [b'V', b'A', 1, code] => Err(Error::new(
            ErrorId::AdmissionRefused,
            format!("the listener refused the connection after the handshake (A0 code {code})"),
        )),
        other => Err(Error::new(
            ErrorId::HandshakeFailed,
            format!(
                "the peer sent an invalid A0 verdict {other:02x?}; it is not a vicus node or speaks another version"
            ),
        )),
    }
}

/// Turns a failed handshake into the most specific [`Error`] this side can know.
/// How the listener waits for a connection's TLS ClientHello: a deadline of its own
/// (`client_hello_timeout`), shorter than the whole handshake's, and for a socket the gate
/// admitted, its permit, which the gate may evict while the socket is silent.
pub(crate) struct HelloWait<'a> {
    pub(crate) timeout: Duration,
    pub(crate) permit: Option<&'a AdmissionPermit>,
}

impl HelloWait<'_> {
    /// Reads the ClientHello (nothing else) and marks the permit as no longer silent.
    async fn wait(
        self,
        socket: Socket,
        handshake_at: Instant,
    ) -> Result<StartHandshake<Socket>, Error> {
        let read = LazyConfigAcceptor::new(rustls::server::Acceptor::default(), socket);
        let at = Instant::now()
            .checked_add(self.timeout)
            .map_or(handshake_at, |at| at.min(handshake_at));
        let evicted = async {
            match self.permit {
                Some(permit) => permit.evicted().cancelled().await,
                None => std::future::pending().await,
            }
        };
        let start = tokio::select! {
            biased;
            () = evicted => return Err(Self::evicted_error()),
            read = tokio::time::timeout_at(at, read) => match read {
                Ok(Ok(start)) => start,
                Ok(Err(e)) => {
                    return Err(Error::new(
                        ErrorId::HandshakeFailed,
                        format!("reading the ClientHello failed: {e}; the peer is not speaking TLS 1.3 or closed the connection"),
                    ));
                }
                Err(_) => {
                    if let Some(permit) = self.permit {
                        Counters::bump(&permit.gate().counters.client_hello_timeouts);
                    }
                    return Err(Error::new(
                        ErrorId::HandshakeTimeout,
                        format!(
                            "no complete TLS ClientHello within {:?} (client_hello_timeout); the peer is slow, stalled or not speaking TLS",
                            self.timeout
                        ),
                    ));
                }
            },
        };
        if let Some(permit) = self.permit
            && !permit.hello_received()
        {
            return Err(Self::evicted_error());
        }
        Ok(start)
    }

    fn evicted_error() -> Error {
        Error::new(
            ErrorId::HandshakeTimeout,
            "closed before its ClientHello arrived: the pre-authentication gate was full and this connection had been silent longest (see client_hello_timeout)",
        )
    }
}

fn handshake_error(err: &io::Error, verifier: &PeerVerifier) -> Error {
    if let Some(detail) = verifier.take_detail() {
        return detail;
    }
    let Some(tls) = err
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
    else {
        return match err.kind() {
            io::ErrorKind::UnexpectedEof
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::BrokenPipe => Error::new(
                ErrorId::HandshakeFailed,
                format!(
                    "the peer closed the connection during the handshake ({err}); it may have refused us before TLS (admission limits, Unix uid) or is not a vicus node"
                ),
            ),
            _ => Error::new(
                ErrorId::HandshakeFailed,
                format!("handshake I/O failed: {err}"),
            ),
        };
    };
    tls_error(tls)
}

fn tls_error(tls: &rustls::Error) -> Error {
    use rustls::Error as T;
    match tls {
        T::AlertReceived(alert) => alert_error(*alert),
        T::NoCertificatesPresented => Error::new(
            ErrorId::PeerCertificateRejected,
            "the peer presented no client certificate; every vicus node must authenticate with one",
        ),
        T::PeerIncompatible(why) => Error::new(
            ErrorId::HandshakeFailed,
            format!(
                "the peer cannot do what vicus requires (TLS 1.3 with a shared cipher suite and key exchange): {why:?}"
            ),
        ),
        T::NoApplicationProtocol => Error::new(
            ErrorId::HandshakeFailed,
            "the peer does not offer ALPN vicus/1; it is not a vicus node",
        ),
        T::InvalidCertificate(why) => Error::new(
            ErrorId::PeerCertificateRejected,
            format!("the peer's certificate was refused: {why:?}"),
        ),
        T::InvalidMessage(_)
        | T::InappropriateMessage { .. }
        | T::InappropriateHandshakeMessage { .. } => Error::new(
            ErrorId::HandshakeFailed,
            format!("the peer sent bytes that are not a valid TLS 1.3 handshake ({tls})"),
        ),
        other => Error::new(
            ErrorId::HandshakeFailed,
            format!("TLS handshake failed: {other}"),
        ),
    }
}

fn alert_error(alert: AlertDescription) -> Error {
    use AlertDescription as A;
    let refused = |hint: &str| {
        Error::new(
            ErrorId::CertificateRefusedByPeer,
            format!("the peer refused our certificate (TLS alert {alert:?}): {hint}"),
        )
    };
    match alert {
        A::CertificateExpired => refused("it has expired or is not yet valid; renew it"),
        A::CertificateRevoked => refused("it has been revoked"),
        A::UnknownCA => refused("it is not signed by a CA the peer trusts"),
        A::CertificateRequired => refused("we sent none, and the peer requires one"),
        A::BadCertificate | A::UnsupportedCertificate | A::CertificateUnknown | A::AccessDenied => {
            refused(
                "its identity is not one the peer accepts (trust policy or expected identity), or its usage/chain is wrong",
            )
        }
        A::ProtocolVersion => Error::new(
            ErrorId::HandshakeFailed,
            "the peer refused our TLS version; vicus speaks TLS 1.3 only",
        ),
        A::NoApplicationProtocol => Error::new(
            ErrorId::HandshakeFailed,
            "the peer does not speak ALPN vicus/1",
        ),
        other => Error::new(
            ErrorId::HandshakeFailed,
            format!("the peer aborted the handshake (TLS alert {other:?})"),
        ),
    }
}

#[cfg(test)]
mod provider_tests {
    use super::provider_rule;

    #[test]
    fn the_provider_rule_prefers_aws_lc_rs_and_never_picks_silently() {
        assert_eq!(provider_rule(true, false), Some("aws-lc-rs"));
        assert_eq!(provider_rule(false, true), Some("ring"));
        assert_eq!(provider_rule(true, true), Some("aws-lc-rs"));
        assert_eq!(provider_rule(false, false), None);
    }
}
