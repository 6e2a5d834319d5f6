//! A0 transport over real loopback sockets with certificates minted per test.
//!
//! Test names carry the threat they cover (../shared/THREATS.md, T1–T12). Each refusal test
//! checks the error on both sides where that side can know it, that no stream was handed out,
//! and that the listener's counters return to their baseline.

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use common::*;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use vicus::a0_transport::{Transport, TransportConfig, TrustPolicy};
use vicus::dev_certs::{DevCa, DevLeaf, LeafSpec};
use vicus::{DomusAddr, ErrorId};

fn transport_from_spec(ca: &mut DevCa, spec: &LeafSpec) -> Transport {
    let leaf = ca.leaf_with(spec).expect("mint leaf");
    Transport::new(ca.auth_config(&leaf).expect("auth"), TransportConfig::default())
        .expect("transport")
}

#[tokio::test]
async fn handshake_over_tcp_both_sides_see_identity() {
    within(async {
        let mut ca = ca();
        let a = transport(&mut ca, "a");
        let b = transport(&mut ca, "b");
        let l = listen_tcp(&b).await;
        let (dialed, accepted) = handshake_pair(&a, &l, Some(&id("b"))).await;
        let (mut dialed, mut accepted) = (dialed.expect("dial"), accepted.expect("accept"));
        assert_eq!(dialed.peer().id(), &id("b"));
        assert_eq!(accepted.peer().id(), &id("a"));
        assert!(dialed.is_dialer() && !accepted.is_dialer());
        assert_eq!(
            dialed.protocol_version(),
            Some(rustls::ProtocolVersion::TLSv1_3)
        );
        assert_eq!(dialed.peer().unix_credentials(), None);
        assert_ne!(dialed.peer().fingerprint(), accepted.peer().fingerprint());
        ping_pong(&mut dialed, &mut accepted).await;
        let stats = l.stats();
        assert_eq!((stats.handshakes_ok, stats.pending_handshakes), (1, 0));
    })
    .await;
}

#[cfg(feature = "aws-lc-rs")]
#[tokio::test]
async fn t06_negotiates_tls13_with_post_quantum_key_exchange() {
    within(async {
        let mut ca = ca();
        let a = transport(&mut ca, "a");
        let b = transport(&mut ca, "b");
        let l = listen_tcp(&b).await;
        let (dialed, accepted) = handshake_pair(&a, &l, None).await;
        let (dialed, accepted) = (dialed.expect("dial"), accepted.expect("accept"));
        for s in [&dialed, &accepted] {
            assert_eq!(s.protocol_version(), Some(rustls::ProtocolVersion::TLSv1_3));
            assert_eq!(
                s.key_exchange_group(),
                Some(rustls::NamedGroup::X25519MLKEM768)
            );
        }
    })
    .await;
}

#[tokio::test]
async fn handshake_over_unix_socket_both_sides_see_identity_and_credentials() {
    within(async {
        let dir = tempdir();
        let path = dir.join("b.sock");
        let mut ca = ca();
        let a = transport(&mut ca, "a");
        let b = transport(&mut ca, "b");
        let l = b.listen(&DomusAddr::unix(&path)).await.expect("listen");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).expect("stat").permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "T10: the socket gets the configured mode");
        let (dialed, accepted) = handshake_pair(&a, &l, Some(&id("b"))).await;
        let (mut dialed, mut accepted) = (dialed.expect("dial"), accepted.expect("accept"));
        assert_eq!(dialed.peer().id(), &id("b"));
        assert_eq!(accepted.peer().id(), &id("a"));
        let me = rustix::process::geteuid().as_raw();
        let creds = accepted.peer().unix_credentials().expect("unix creds");
        assert_eq!(creds.uid, me);
        assert_eq!(creds.pid, Some(std::process::id() as i32));
        assert_eq!(dialed.peer().unix_credentials().map(|c| c.uid), Some(me));
        ping_pong(&mut dialed, &mut accepted).await;
        drop(l);
        assert!(!path.exists(), "the listener removes its socket file when dropped");
    })
    .await;
}

#[tokio::test]
async fn t01_client_certificate_from_another_ca_refused() {
    within(async {
        let mut ca_a = ca();
        let mut ca_b = ca_named("rogue CA");
        let server = transport(&mut ca_a, "server");
        // The URI of a legitimate node, but signed by a CA the server does not trust.
        let rogue_leaf = ca_b.leaf("a").expect("mint");
        let rogue =
            Transport::new(auth_trusting(&ca_a, &rogue_leaf), TransportConfig::default())
                .expect("transport");
        let l = listen_tcp(&server).await;
        let (dialed, accepted) = handshake_pair(&rogue, &l, None).await;
        let accepted = accepted.expect_err("server must refuse");
        assert_eq!(accepted.id(), ErrorId::PeerCertificateRejected, "{accepted}");
        assert!(accepted.message().contains("unknown issuer"), "{accepted}");
        assert!(
            accepted.message().contains("spiffe://vicus.dev/domus/a"),
            "{accepted}"
        );
        let dialed = dialed.expect_err("client learns it was refused");
        assert_eq!(dialed.id(), ErrorId::CertificateRefusedByPeer, "{dialed}");
        assert!(dialed.message().contains("UnknownCA"), "{dialed}");
        let stats = l.stats();
        assert_eq!((stats.handshakes_failed, stats.pending_handshakes), (1, 0));
        // A rogue CA that copies our CA's name is refused too (its signature does not verify).
        let mut twin = ca();
        let twin_leaf = twin.leaf("a").expect("mint");
        let twin_client =
            Transport::new(auth_trusting(&ca_a, &twin_leaf), TransportConfig::default())
                .expect("transport");
        let (dialed, accepted) = handshake_pair(&twin_client, &l, None).await;
        let accepted = accepted.expect_err("server must refuse the twin");
        assert_eq!(accepted.id(), ErrorId::PeerCertificateRejected, "{accepted}");
        assert!(accepted.message().contains("does not verify"), "{accepted}");
        assert!(dialed.is_err());
        // (d) a well-behaved peer is unaffected.
        let good = transport(&mut ca_a, "good");
        let (ok, _) = handshake_pair(&good, &l, None).await;
        assert!(ok.is_ok());
    })
    .await;
}

#[tokio::test]
async fn t01_server_certificate_from_another_ca_refused() {
    within(async {
        let mut ca_a = ca();
        let mut ca_b = ca_named("rogue CA");
        let client = transport(&mut ca_a, "client");
        let rogue_leaf = ca_b.leaf("b").expect("mint");
        // The rogue server trusts CA-A, so it would happily accept the client.
        let rogue_server =
            Transport::new(auth_trusting(&ca_a, &rogue_leaf), TransportConfig::default())
                .expect("transport");
        let l = listen_tcp(&rogue_server).await;
        let (dialed, accepted) = handshake_pair(&client, &l, Some(&id("b"))).await;
        let dialed = dialed.expect_err("client must refuse the server");
        assert_eq!(dialed.id(), ErrorId::PeerCertificateRejected, "{dialed}");
        assert!(dialed.message().contains("unknown issuer"), "{dialed}");
        let accepted = accepted.expect_err("server learns it was refused");
        assert_eq!(accepted.id(), ErrorId::CertificateRefusedByPeer, "{accepted}");
    })
    .await;
}

#[tokio::test]
async fn t02_expired_certificate_refused() {
    within(async {
        let mut ca = ca();
        let server = transport(&mut ca, "server");
        let now = SystemTime::now();
        let mut spec = LeafSpec::domus("old");
        spec.not_before = now - Duration::from_secs(86_400);
        spec.not_after = now - Duration::from_secs(1);
        let expired = transport_from_spec(&mut ca, &spec);
        let l = listen_tcp(&server).await;
        let (dialed, accepted) = handshake_pair(&expired, &l, None).await;
        let accepted = accepted.expect_err("expired client refused");
        assert_eq!(accepted.id(), ErrorId::PeerCertificateRejected);
        assert!(
            accepted
                .message()
                .contains("certificate for spiffe://vicus.dev/domus/old expired at"),
            "{accepted}"
        );
        let dialed = dialed.expect_err("client learns why");
        assert_eq!(dialed.id(), ErrorId::CertificateRefusedByPeer);
        assert!(dialed.message().contains("CertificateExpired"), "{dialed}");
    })
    .await;
}

#[tokio::test]
async fn t02_not_yet_valid_server_certificate_refused() {
    within(async {
        let mut ca = ca();
        let client = transport(&mut ca, "client");
        let now = SystemTime::now();
        let mut spec = LeafSpec::domus("future");
        spec.not_before = now + Duration::from_secs(3600);
        spec.not_after = now + Duration::from_secs(7200);
        let future = transport_from_spec(&mut ca, &spec);
        let l = listen_tcp(&future).await;
        let (dialed, accepted) = handshake_pair(&client, &l, None).await;
        let dialed = dialed.expect_err("not-yet-valid server refused");
        assert_eq!(dialed.id(), ErrorId::PeerCertificateRejected);
        assert!(dialed.message().contains("is not valid until"), "{dialed}");
        assert_eq!(
            accepted.expect_err("server learns why").id(),
            ErrorId::CertificateRefusedByPeer
        );
    })
    .await;
}

/// A verifier for the hand-built rustls client below: it trusts any server, because the test
/// is about what the *server* does with a client that sends no certificate.
#[derive(Debug)]
struct AnyServer(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("no TLS 1.2".into()))
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A hand-built rustls client (TLS 1.3, ALPN vicus/1) presenting `cert`, or none.
fn raw_tls_client(cert: Option<&DevLeaf>) -> tokio_rustls::TlsConnector {
    let provider = vicus::a0_transport::default_crypto_provider();
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("tls13")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer(provider)));
    let mut config = match cert {
        Some(leaf) => builder
            .with_client_auth_cert(vec![leaf.cert_der().clone()], leaf.key_der())
            .expect("client cert"),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![vicus::a0_transport::ALPN_PROTOCOL.to_vec()];
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

/// Connects with `connector`, completes the client side and waits for the A0 verdict.
async fn raw_handshake(
    connector: &tokio_rustls::TlsConnector,
    l: &vicus::a0_transport::Listener,
) -> std::io::Result<()> {
    let DomusAddr::Tcp(addr) = l.local_addr().clone() else {
        panic!("TCP listener expected")
    };
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from("vicus.invalid").expect("name");
    let mut tls = connector.connect(name, tcp).await?;
    let mut verdict = [0u8; 4];
    tls.read_exact(&mut verdict).await.map(|_| ())
}

#[tokio::test]
async fn t05_client_without_certificate_refused() {
    within(async {
        let mut ca = ca();
        let server = transport(&mut ca, "server");
        let l = listen_tcp(&server).await;
        let connector = raw_tls_client(None);
        let (client, accepted) = tokio::join!(raw_handshake(&connector, &l), accept_one(&l));
        let accepted = accepted.expect_err("no certificate, no stream");
        assert_eq!(accepted.id(), ErrorId::PeerCertificateRejected, "{accepted}");
        assert!(accepted.message().contains("no client certificate"), "{accepted}");
        assert!(client.is_err(), "the client gets an alert instead of a verdict");
        assert_eq!(l.stats().handshakes_failed, 1);
    })
    .await;
}

#[tokio::test]
async fn t03_leaf_without_uri_san_refused() {
    within(async {
        let mut ca = ca();
        let server = transport(&mut ca, "server");
        let mut spec = LeafSpec::domus("x");
        spec.uris.clear();
        spec.dns_names = vec!["x.vicus.dev".into()];
        let leaf = ca.leaf_with(&spec).expect("mint");
        // Our own transport refuses such material outright...
        let own = Transport::new(ca.auth_config(&leaf).expect("auth"), TransportConfig::default())
            .expect_err("a domus needs a URI SAN");
        assert_eq!(own.id(), ErrorId::InvalidAuthMaterial);
        assert!(own.message().contains("no URI SAN"), "{own}");
        // ...and a hand-built client presenting it is refused by the listener.
        let l = listen_tcp(&server).await;
        let connector = raw_tls_client(Some(&leaf));
        let (client, accepted) = tokio::join!(raw_handshake(&connector, &l), accept_one(&l));
        let accepted = accepted.expect_err("no URI SAN, no stream");
        assert_eq!(accepted.id(), ErrorId::PeerCertificateRejected, "{accepted}");
        assert!(accepted.message().contains("no URI SAN"), "{accepted}");
        assert!(client.is_err());
    })
    .await;
}
