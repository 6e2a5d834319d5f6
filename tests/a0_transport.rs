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
    Transport::new(
        ca.auth_config(&leaf).expect("auth"),
        TransportConfig::default(),
    )
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
        assert_eq!(
            mode & 0o777,
            0o600,
            "T10: the socket gets the configured mode"
        );
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
        assert!(
            !path.exists(),
            "the listener removes its socket file when dropped"
        );
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
        let rogue = Transport::new(
            auth_trusting(&ca_a, &rogue_leaf),
            TransportConfig::default(),
        )
        .expect("transport");
        let l = listen_tcp(&server).await;
        let (dialed, accepted) = handshake_pair(&rogue, &l, None).await;
        let accepted = accepted.expect_err("server must refuse");
        assert_eq!(
            accepted.id(),
            ErrorId::PeerCertificateRejected,
            "{accepted}"
        );
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
        assert_eq!(
            accepted.id(),
            ErrorId::PeerCertificateRejected,
            "{accepted}"
        );
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
        let rogue_server = Transport::new(
            auth_trusting(&ca_a, &rogue_leaf),
            TransportConfig::default(),
        )
        .expect("transport");
        let l = listen_tcp(&rogue_server).await;
        let (dialed, accepted) = handshake_pair(&client, &l, Some(&id("b"))).await;
        let dialed = dialed.expect_err("client must refuse the server");
        assert_eq!(dialed.id(), ErrorId::PeerCertificateRejected, "{dialed}");
        assert!(dialed.message().contains("unknown issuer"), "{dialed}");
        let accepted = accepted.expect_err("server learns it was refused");
        assert_eq!(
            accepted.id(),
            ErrorId::CertificateRefusedByPeer,
            "{accepted}"
        );
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

/// A root, intermediates and leaves minted with rcgen directly (the dev CA has no
/// intermediates): a chain through an intermediate that expired must be refused even though
/// the leaf itself is valid.
mod chains {
    use std::time::{Duration, SystemTime};

    use rcgen::{
        BasicConstraints, CertificateParams, CertificateRevocationListParams, DnType,
        ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose,
        RevocationReason, RevokedCertParams, SanType, SerialNumber,
    };
    use rustls::pki_types::CertificateRevocationListDer;

    pub(crate) struct Ca {
        pub(crate) pem: String,
        issuer: Issuer<'static, KeyPair>,
    }

    fn ca_params(name: &str, from: SystemTime, until: SystemTime) -> CertificateParams {
        let mut p = CertificateParams::new(Vec::<String>::new()).expect("params");
        p.distinguished_name.push(DnType::CommonName, name);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        p.not_before = from.into();
        p.not_after = until.into();
        p
    }

    pub(crate) fn root() -> Ca {
        let now = SystemTime::now();
        let p = ca_params(
            "chain root",
            now - Duration::from_secs(86_400),
            now + Duration::from_secs(86_400),
        );
        let key = KeyPair::generate().expect("key");
        let cert = p.self_signed(&key).expect("root");
        Ca {
            pem: cert.pem(),
            issuer: Issuer::new(p, key),
        }
    }

    pub(crate) fn intermediate(root: &Ca, from: SystemTime, until: SystemTime) -> Ca {
        intermediate_numbered(root, from, until, 1)
    }

    /// An intermediate with serial number `serial` (so a CRL can name it).
    pub(crate) fn intermediate_numbered(
        root: &Ca,
        from: SystemTime,
        until: SystemTime,
        serial: u64,
    ) -> Ca {
        let mut p = ca_params("chain intermediate", from, until);
        p.serial_number = Some(SerialNumber::from(serial));
        let key = KeyPair::generate().expect("key");
        let cert = p.signed_by(&key, &root.issuer).expect("intermediate");
        Ca {
            pem: cert.pem(),
            issuer: Issuer::new(p, key),
        }
    }

    /// A CRL from `issuer` revoking the certificates it issued with these serials.
    pub(crate) fn crl(issuer: &Ca, serials: &[u64]) -> CertificateRevocationListDer<'static> {
        let now = SystemTime::now();
        let params = CertificateRevocationListParams {
            this_update: (now - Duration::from_secs(3600)).into(),
            next_update: (now + Duration::from_secs(3600)).into(),
            crl_number: SerialNumber::from(1u64),
            issuing_distribution_point: None,
            revoked_certs: serials
                .iter()
                .map(|&serial| RevokedCertParams {
                    serial_number: SerialNumber::from(serial),
                    revocation_time: (now - Duration::from_secs(60)).into(),
                    reason_code: Some(RevocationReason::CaCompromise),
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: KeyIdMethod::Sha256,
        };
        params.signed_by(&issuer.issuer).expect("crl").der().clone()
    }

    /// A transport for `name` whose chain runs leaf → `inter` → `root`, trusting `root`.
    pub(crate) fn transport_via(
        root: &Ca,
        inter: &Ca,
        name: &str,
    ) -> vicus::a0_transport::Transport {
        let (leaf, key) = leaf(inter, name);
        let chain = format!("{leaf}{}", inter.pem);
        let auth =
            vicus::AuthConfig::from_pem(root.pem.as_bytes(), chain.as_bytes(), key.as_bytes())
                .expect("auth");
        vicus::a0_transport::Transport::new(auth, vicus::a0_transport::TransportConfig::default())
            .expect("transport")
    }

    /// A valid leaf signed by the root itself.
    pub(crate) fn leaf_of_root(root: &Ca, name: &str) -> (String, String) {
        leaf(root, name)
    }

    /// A valid leaf for `spiffe://vicus.dev/domus/<name>`: (certificate PEM, key PEM).
    pub(crate) fn leaf(issuer: &Ca, name: &str) -> (String, String) {
        let mut p = CertificateParams::new(Vec::<String>::new()).expect("params");
        let uri = format!("spiffe://vicus.dev/domus/{name}");
        p.subject_alt_names
            .push(SanType::URI(uri.as_str().try_into().expect("uri")));
        let now = SystemTime::now();
        p.not_before = (now - Duration::from_secs(3600)).into();
        p.not_after = (now + Duration::from_secs(3600)).into();
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ClientAuth,
            ExtendedKeyUsagePurpose::ServerAuth,
        ];
        let key = KeyPair::generate().expect("key");
        let cert = p.signed_by(&key, &issuer.issuer).expect("leaf");
        (cert.pem(), key.serialize_pem())
    }
}

#[tokio::test]
async fn t02_a_chain_through_an_expired_intermediate_is_refused() {
    within(async {
        let now = SystemTime::now();
        let root = chains::root();
        let (server_leaf, server_key) = chains::leaf_of_root(&root, "server");
        let server = Transport::new(
            vicus::AuthConfig::from_pem(
                root.pem.as_bytes(),
                server_leaf.as_bytes(),
                server_key.as_bytes(),
            )
            .expect("auth"),
            TransportConfig::default(),
        )
        .expect("server");
        let l = listen_tcp(&server).await;
        // Control: the same shape of chain through a valid intermediate is accepted.
        let fresh = chains::intermediate(
            &root,
            now - Duration::from_secs(3600),
            now + Duration::from_secs(3600),
        );
        let good = chains::transport_via(&root, &fresh, "good");
        let (dialed, accepted) = handshake_pair(&good, &l, None).await;
        dialed.expect("a valid chain dials");
        accepted.expect("a valid chain is accepted");
        // An intermediate that expired yesterday: the leaf is valid, the chain is not.
        let stale = chains::intermediate(
            &root,
            now - Duration::from_secs(2 * 86_400),
            now - Duration::from_secs(86_400),
        );
        let bad = chains::transport_via(&root, &stale, "bad");
        let (dialed, accepted) = handshake_pair(&bad, &l, None).await;
        let accepted = accepted.expect_err("an expired intermediate is refused");
        assert_eq!(
            accepted.id(),
            ErrorId::PeerCertificateRejected,
            "{accepted}"
        );
        assert!(accepted.message().contains("expired"), "{accepted}");
        assert_eq!(
            dialed.expect_err("the client learns it was refused").id(),
            ErrorId::CertificateRefusedByPeer
        );
    })
    .await;
}

#[tokio::test]
async fn t04_a_chain_through_a_revoked_intermediate_is_refused() {
    within(async {
        let now = SystemTime::now();
        let (from, until) = (
            now - Duration::from_secs(3600),
            now + Duration::from_secs(3600),
        );
        let root = chains::root();
        let good = chains::intermediate_numbered(&root, from, until, 41);
        let revoked = chains::intermediate_numbered(&root, from, until, 42);
        // The root revokes intermediate 42; each intermediate's own CRL revokes nothing (the
        // leaves' status must be known too: unknown status is refused).
        let crls = vec![
            chains::crl(&root, &[42]),
            chains::crl(&good, &[]),
            chains::crl(&revoked, &[]),
        ];
        let (server_leaf, server_key) = chains::leaf_of_root(&root, "server");
        let server = Transport::new(
            vicus::AuthConfig::from_pem(
                root.pem.as_bytes(),
                server_leaf.as_bytes(),
                server_key.as_bytes(),
            )
            .expect("auth")
            .with_crls(crls),
            TransportConfig::default(),
        )
        .expect("server");
        let l = listen_tcp(&server).await;
        let (dialed, accepted) =
            handshake_pair(&chains::transport_via(&root, &good, "good"), &l, None).await;
        dialed.expect("a chain through a good intermediate dials");
        accepted.expect("and is accepted");
        let (dialed, accepted) =
            handshake_pair(&chains::transport_via(&root, &revoked, "bad"), &l, None).await;
        let accepted = accepted.expect_err("a revoked intermediate is refused");
        assert_eq!(
            accepted.id(),
            ErrorId::PeerCertificateRejected,
            "{accepted}"
        );
        assert!(accepted.message().contains("revoked"), "{accepted}");
        assert_eq!(
            dialed.expect_err("the client learns it was refused").id(),
            ErrorId::CertificateRefusedByPeer
        );
    })
    .await;
}

#[tokio::test]
async fn t04_an_expired_crl_refuses_the_peers_it_covers_until_a_fresh_one_is_loaded() {
    within(async {
        let mut ca = ca();
        let server_leaf = ca.leaf("server").expect("mint");
        let good = transport(&mut ca, "good");
        // A CRL revoking nobody whose next update was due a minute ago.
        let stale = ca
            .crl(&[], SystemTime::now() - Duration::from_secs(60))
            .expect("crl");
        let server = Transport::new(
            ca.auth_config(&server_leaf)
                .expect("auth")
                .with_crls(vec![stale]),
            TransportConfig::default(),
        )
        .expect("transport");
        let l = listen_tcp(&server).await;
        let (dialed, accepted) = handshake_pair(&good, &l, None).await;
        let accepted = accepted.expect_err("an expired CRL proves nothing");
        assert_eq!(
            accepted.id(),
            ErrorId::PeerCertificateRejected,
            "{accepted}"
        );
        assert!(
            accepted
                .message()
                .contains("the CRL that covers it expired"),
            "{accepted}"
        );
        assert!(dialed.is_err(), "the client is refused");
        // A fresh CRL, loaded live: the same peer is accepted again.
        let fresh = ca
            .crl(&[], SystemTime::now() + Duration::from_secs(3600))
            .expect("crl");
        server
            .reload_auth(
                ca.auth_config(&server_leaf)
                    .expect("auth")
                    .with_crls(vec![fresh]),
            )
            .expect("reload");
        let (dialed, accepted) = handshake_pair(&good, &l, None).await;
        dialed.expect("dials after the reload");
        accepted.expect("accepted after the reload");
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
        assert_eq!(
            accepted.id(),
            ErrorId::PeerCertificateRejected,
            "{accepted}"
        );
        assert!(
            accepted.message().contains("no client certificate"),
            "{accepted}"
        );
        assert!(
            client.is_err(),
            "the client gets an alert instead of a verdict"
        );
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
        let own = Transport::new(
            ca.auth_config(&leaf).expect("auth"),
            TransportConfig::default(),
        )
        .expect_err("a domus needs a URI SAN");
        assert_eq!(own.id(), ErrorId::InvalidAuthMaterial);
        assert!(own.message().contains("no URI SAN"), "{own}");
        // ...and a hand-built client presenting it is refused by the listener.
        let l = listen_tcp(&server).await;
        let connector = raw_tls_client(Some(&leaf));
        let (client, accepted) = tokio::join!(raw_handshake(&connector, &l), accept_one(&l));
        let accepted = accepted.expect_err("no URI SAN, no stream");
        assert_eq!(
            accepted.id(),
            ErrorId::PeerCertificateRejected,
            "{accepted}"
        );
        assert!(accepted.message().contains("no URI SAN"), "{accepted}");
        assert!(client.is_err());
    })
    .await;
}

#[tokio::test]
async fn t03_server_identity_not_the_expected_one_refused() {
    within(async {
        let mut ca = ca();
        let client = transport(&mut ca, "client");
        let a = transport(&mut ca, "a");
        let l = listen_tcp(&a).await;
        // The resolver said "b lives here", but a answers.
        let (dialed, accepted) = handshake_pair(&client, &l, Some(&id("b"))).await;
        let dialed = dialed.expect_err("wrong identity, no stream");
        assert_eq!(dialed.id(), ErrorId::IdentityMismatch, "{dialed}");
        assert!(
            dialed.message().contains(
                "peer presented spiffe://vicus.dev/domus/a, expected spiffe://vicus.dev/domus/b"
            ),
            "{dialed}"
        );
        let accepted = accepted.expect_err("server learns it was refused");
        assert_eq!(
            accepted.id(),
            ErrorId::CertificateRefusedByPeer,
            "{accepted}"
        );
    })
    .await;
}

/// A TLS 1.2-only ClientHello, written by hand so the tree never compiles rustls' TLS 1.2.
fn tls12_only_client_hello() -> Vec<u8> {
    let mut body = vec![0x03, 0x03]; // client_version TLS 1.2
    body.extend_from_slice(&[0x42; 32]); // random
    body.push(0); // no session id
    body.extend_from_slice(&[0x00, 0x04, 0xc0, 0x2f, 0xc0, 0x2b]); // two ECDHE-GCM suites
    body.extend_from_slice(&[0x01, 0x00]); // null compression
    let extensions: &[u8] = &[
        0x00, 0x0a, 0x00, 0x04, 0x00, 0x02, 0x00, 0x1d, // supported_groups: x25519
        0x00, 0x0b, 0x00, 0x02, 0x01, 0x00, // ec_point_formats: uncompressed
        0x00, 0x0d, 0x00, 0x06, 0x00, 0x04, 0x04, 0x03, 0x08, 0x04, // signature_algorithms
    ];
    body.extend_from_slice(&(extensions.len() as u16).to_be_bytes());
    body.extend_from_slice(extensions);
    let mut handshake = vec![0x01, 0x00];
    handshake.extend_from_slice(&(body.len() as u16).to_be_bytes());
    handshake.extend_from_slice(&body);
    let mut record = vec![0x16, 0x03, 0x01];
    record.extend_from_slice(&(handshake.len() as u16).to_be_bytes());
    record.extend_from_slice(&handshake);
    record
}

#[tokio::test]
async fn t06_tls12_only_client_refused() {
    within(async {
        let mut ca = ca();
        let server = transport(&mut ca, "server");
        let l = listen_tcp(&server).await;
        let DomusAddr::Tcp(addr) = l.local_addr().clone() else {
            unreachable!()
        };
        let client = async {
            let mut tcp = TcpStream::connect(addr).await.expect("connect");
            tcp.write_all(&tls12_only_client_hello())
                .await
                .expect("write");
            let mut reply = Vec::new();
            let _ = tcp.read_to_end(&mut reply).await;
            reply
        };
        let (reply, accepted) = tokio::join!(client, accept_one(&l));
        let accepted = accepted.expect_err("TLS 1.2 refused");
        assert_eq!(accepted.id(), ErrorId::HandshakeFailed, "{accepted}");
        assert!(accepted.message().contains("TLS 1.3"), "{accepted}");
        // The client is told why: a fatal protocol_version alert (record type 21, alert 70).
        assert_eq!(reply.first(), Some(&0x15), "{reply:02x?}");
        assert_eq!(reply.last(), Some(&70), "{reply:02x?}");
    })
    .await;
}

#[tokio::test]
async fn t10_unix_peer_uid_not_allowed_closed_before_tls() {
    within(async {
        let dir = tempdir();
        let path = dir.join("strict.sock");
        let mut ca = ca();
        let me = rustix::process::geteuid().as_raw();
        let mut config = TransportConfig::default();
        config.unix_allowed_uids = Some(BTreeSet::from([me.wrapping_add(4242)]));
        let server = transport_with(&mut ca, "server", config);
        let client = transport(&mut ca, "client");
        let l = server
            .listen(&DomusAddr::unix(&path))
            .await
            .expect("listen");
        let accepted = tokio::spawn(async move {
            let r = tokio::time::timeout(Duration::from_millis(500), l.accept()).await;
            (r.is_err(), l.stats())
        });
        let dialed = client
            .dial(&DomusAddr::unix(&path), None)
            .await
            .expect_err("uid not allowed");
        assert_eq!(dialed.id(), ErrorId::HandshakeFailed, "{dialed}");
        assert!(
            dialed.message().contains("closed the connection"),
            "{dialed}"
        );
        let (nothing_accepted, stats) = accepted.await.expect("join");
        assert!(
            nothing_accepted,
            "a refused uid never reaches accept()'s caller"
        );
        assert_eq!((stats.refused_uid, stats.admitted), (1, 0));
    })
    .await;
}

/// The child half of `t10_a_process_running_as_nobody_cannot_connect_to_a_0600_socket`: run
/// only when that test re-executes this binary as `nobody` (ignored otherwise). Exits 0 when
/// the connect succeeds, 13 on `EACCES`, 1 on anything else.
#[test]
#[ignore = "run by t10_a_process_running_as_nobody_cannot_connect_to_a_0600_socket"]
fn t10_child_connect() {
    let Some(path) = std::env::var_os("VICUS_T10_CONNECT") else {
        return;
    };
    let code = match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => 0,
        Err(e) if e.raw_os_error() == Some(13) => 13,
        Err(e) => {
            eprintln!("connect failed: {e}");
            1
        }
    };
    std::process::exit(code);
}

#[tokio::test]
async fn t10_a_process_running_as_nobody_cannot_connect_to_a_0600_socket() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    if !rustix::process::geteuid().is_root() {
        skip_or_fail("t10 nobody test: starting a process as nobody needs root");
        return;
    }
    within(async {
        // A directory anyone may traverse, so only the socket's own mode stands in the way.
        let dir = tempdir();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        // This test binary, copied where `nobody` may execute it.
        let exe = dir.join("child");
        std::fs::copy(std::env::current_exe().expect("exe"), &exe).expect("copy binary");
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let connect_as_nobody = |path: std::path::PathBuf| {
            let exe = exe.clone();
            async move {
                tokio::task::spawn_blocking(move || {
                    std::process::Command::new(exe)
                        .args([
                            "--ignored",
                            "--exact",
                            "t10_child_connect",
                            "--test-threads=1",
                        ])
                        .env("VICUS_T10_CONNECT", path)
                        .uid(65534)
                        .gid(65534)
                        .stdout(std::process::Stdio::null())
                        .status()
                        .map(|s| s.code())
                })
                .await
                .expect("join")
            }
        };
        let mut ca = ca();
        // Control: with mode 0666 the same child connects, so the refusal below is the mode's.
        let mut open = TransportConfig::default();
        open.unix_socket_mode = 0o666;
        let server = transport_with(&mut ca, "open", open);
        let open_path = dir.join("open.sock");
        let _open = server
            .listen(&DomusAddr::unix(&open_path))
            .await
            .expect("listen");
        let control = match connect_as_nobody(open_path).await {
            Ok(code) => code,
            Err(e) => {
                // The sandbox forbids starting a process as another user: nothing to check.
                skip_or_fail(&format!(
                    "t10 nobody test: cannot start a process as nobody ({e})"
                ));
                return;
            }
        };
        assert_eq!(control, Some(0), "the control child connects");
        // The default mode 0600: the same child gets EACCES.
        let server = transport(&mut ca, "strict");
        let strict_path = dir.join("strict.sock");
        let _strict = server
            .listen(&DomusAddr::unix(&strict_path))
            .await
            .expect("listen");
        assert_eq!(
            connect_as_nobody(strict_path)
                .await
                .expect("the child ran once already"),
            Some(13),
            "EACCES for nobody"
        );
        let _ = std::fs::remove_dir_all(&dir);
    })
    .await;
}

#[tokio::test]
async fn t12_trust_policy_excluding_the_peer_trust_domain_refuses_it() {
    within(async {
        let mut ca = ca();
        let mut config = TransportConfig::default();
        config.trust_policy = TrustPolicy::trust_domain("vicus.dev");
        let server = transport_with(&mut ca, "server", config);
        let outsider =
            transport_from_spec(&mut ca, &LeafSpec::uri("spiffe://other.example/domus/x"));
        let l = listen_tcp(&server).await;
        let (dialed, accepted) = handshake_pair(&outsider, &l, None).await;
        let accepted = accepted.expect_err("other trust domain refused");
        assert_eq!(
            accepted.id(),
            ErrorId::PeerCertificateRejected,
            "{accepted}"
        );
        assert!(
            accepted
                .message()
                .contains("not allowed by the trust policy"),
            "{accepted}"
        );
        assert_eq!(
            dialed.expect_err("client learns it").id(),
            ErrorId::CertificateRefusedByPeer
        );
        // A peer from the allowed domain still gets in, and the policy can change live.
        let insider = transport(&mut ca, "insider");
        let (ok, _) = handshake_pair(&insider, &l, None).await;
        ok.expect("allowed domain");
        server.set_trust_policy(TrustPolicy::any());
        let (ok, _) = handshake_pair(&outsider, &l, None).await;
        ok.expect("policy relaxed live");
    })
    .await;
}

#[tokio::test]
async fn t12_other_uri_scheme_refused_by_scheme_prefix_policy() {
    within(async {
        let mut ca = ca();
        let mut config = TransportConfig::default();
        config.trust_policy = TrustPolicy::prefixes(["spiffe://vicus.dev/domus/"]);
        let server = transport_with(&mut ca, "server", config);
        let other = transport_from_spec(&mut ca, &LeafSpec::uri("https://vicus.dev/domus/x"));
        let l = listen_tcp(&server).await;
        let (_, accepted) = handshake_pair(&other, &l, None).await;
        assert_eq!(
            accepted.expect_err("other scheme").id(),
            ErrorId::PeerCertificateRejected
        );
    })
    .await;
}

#[tokio::test]
async fn t12_certificate_without_client_auth_usage_refused_as_client() {
    within(async {
        let mut ca = ca();
        let server = transport(&mut ca, "server");
        let mut spec = LeafSpec::domus("server-only");
        spec.client_auth = false;
        let server_only = transport_from_spec(&mut ca, &spec);
        let l = listen_tcp(&server).await;
        let (_, accepted) = handshake_pair(&server_only, &l, None).await;
        let accepted = accepted.expect_err("no clientAuth EKU");
        assert_eq!(accepted.id(), ErrorId::PeerCertificateRejected);
        assert!(
            accepted.message().contains("extended key usage"),
            "{accepted}"
        );
    })
    .await;
}

#[tokio::test]
async fn t04_revoked_client_certificate_refused() {
    within(async {
        let mut ca = ca();
        let revoked_leaf = ca.leaf("revoked").expect("mint");
        let good_leaf = ca.leaf("good").expect("mint");
        let server_leaf = ca.leaf("server").expect("mint");
        let crl = ca
            .crl(
                &[&revoked_leaf],
                SystemTime::now() + Duration::from_secs(3600),
            )
            .expect("crl");
        let server = Transport::new(
            ca.auth_config(&server_leaf)
                .expect("auth")
                .with_crls(vec![crl]),
            TransportConfig::default(),
        )
        .expect("transport");
        let l = listen_tcp(&server).await;
        let revoked = Transport::new(
            ca.auth_config(&revoked_leaf).expect("auth"),
            TransportConfig::default(),
        )
        .expect("transport");
        let (dialed, accepted) = handshake_pair(&revoked, &l, None).await;
        let accepted = accepted.expect_err("revoked");
        assert_eq!(accepted.id(), ErrorId::PeerCertificateRejected);
        assert!(accepted.message().contains("revoked"), "{accepted}");
        assert!(
            dialed
                .expect_err("told")
                .message()
                .contains("CertificateRevoked")
        );
        let good = Transport::new(
            ca.auth_config(&good_leaf).expect("auth"),
            TransportConfig::default(),
        )
        .expect("transport");
        let (ok, _) = handshake_pair(&good, &l, None).await;
        ok.expect("an unrevoked peer still connects");
    })
    .await;
}

#[tokio::test]
async fn t07_silent_client_dropped_at_timeout_without_delaying_a_good_client() {
    within(async {
        let mut ca = ca();
        let mut config = TransportConfig::default();
        config.handshake_timeout = Duration::from_millis(1500);
        let server = transport_with(&mut ca, "server", config);
        let good = transport(&mut ca, "good");
        let l = Arc::new(listen_tcp(&server).await);
        let DomusAddr::Tcp(addr) = l.local_addr().clone() else {
            unreachable!()
        };
        // The silent client connects first and never says a word.
        let mut silent = TcpStream::connect(addr).await.expect("connect");
        let silent_incoming = l.accept().await.expect("admitted");
        let started = tokio::time::Instant::now();
        let silent_task = tokio::spawn(silent_incoming.handshake());
        // Meanwhile a good client handshakes normally.
        let (dialed, accepted) = handshake_pair(&good, &l, None).await;
        dialed.expect("good client dials");
        accepted.expect("good client accepted");
        assert!(
            !silent_task.is_finished(),
            "the good handshake finished while the silent one was still waiting"
        );
        let silent_result = silent_task
            .await
            .expect("join")
            .expect_err("silent times out");
        assert_eq!(
            silent_result.id(),
            ErrorId::HandshakeTimeout,
            "{silent_result}"
        );
        assert!(started.elapsed() >= Duration::from_millis(1000));
        assert!(closed_within(&mut silent, Duration::from_secs(5)).await);
        let stats = l.stats();
        assert_eq!(
            (
                stats.handshake_timeouts,
                stats.handshakes_ok,
                stats.pending_handshakes
            ),
            (1, 1, 0)
        );
    })
    .await;
}

#[tokio::test]
async fn t07_full_pre_auth_gate_closes_the_next_connection_at_once() {
    within(async {
        let mut ca = ca();
        let mut config = TransportConfig::default();
        config.max_pending_handshakes = 2;
        config.max_pending_handshakes_per_source = 2;
        // The held connections stay evictable-free for this test (a quarter of this).
        config.client_hello_timeout = Duration::from_secs(60);
        let server = transport_with(&mut ca, "server", config);
        let l = listen_tcp(&server).await;
        let DomusAddr::Tcp(addr) = l.local_addr().clone() else {
            unreachable!()
        };
        let _s1 = TcpStream::connect(addr).await.expect("connect");
        let _s2 = TcpStream::connect(addr).await.expect("connect");
        let held1 = l.accept().await.expect("first admitted");
        let held2 = l.accept().await.expect("second admitted");
        assert_eq!(l.stats().pending_handshakes, 2);
        let mut third = TcpStream::connect(addr).await.expect("connect");
        let l = Arc::new(l);
        let acceptor = {
            let l = l.clone();
            tokio::spawn(async move { l.accept().await?.handshake().await })
        };
        assert!(
            closed_within(&mut third, Duration::from_secs(2)).await,
            "over-limit connection closed at once"
        );
        assert_eq!(l.stats().refused_global, 1);
        // Freeing a slot lets the next client in.
        drop(held1);
        let mut ca2 = ca;
        let good = transport(&mut ca2, "good");
        let dialed = good.dial(l.local_addr(), None);
        let (dialed, accepted) = tokio::join!(dialed, async { acceptor.await.expect("join") });
        dialed.expect("a freed slot admits the next client");
        accepted.expect("and it authenticates");
        drop(held2);
        assert_eq!(l.stats().pending_handshakes, 0);
    })
    .await;
}

#[tokio::test]
async fn t07_per_source_limit_leaves_other_sources_unaffected() {
    within(async {
        let mut ca = ca();
        let mut config = TransportConfig::default();
        config.max_pending_handshakes_per_source = 1;
        let server = transport_with(&mut ca, "server", config);
        let l = server
            .listen(&DomusAddr::tcp(([0, 0, 0, 0], 0)))
            .await
            .expect("listen");
        let DomusAddr::Tcp(bound) = l.local_addr().clone() else {
            unreachable!()
        };
        let addr: std::net::SocketAddr = ([127, 0, 0, 1], bound.port()).into();
        let connect_from = |src: [u8; 4]| async move {
            let sock = tokio::net::TcpSocket::new_v4().expect("socket");
            sock.bind((src, 0).into()).expect("bind source");
            sock.connect(addr).await.expect("connect")
        };
        let _first = connect_from([127, 0, 0, 2]).await;
        let held = l.accept().await.expect("admitted");
        let mut second = connect_from([127, 0, 0, 2]).await;
        let _other = connect_from([127, 0, 0, 3]).await;
        let other_incoming = l.accept().await.expect("another source is admitted");
        assert_eq!(
            other_incoming.remote_addr().map(|a| a.ip()),
            Some([127, 0, 0, 3].into())
        );
        assert!(closed_within(&mut second, Duration::from_secs(2)).await);
        let stats = l.stats();
        assert_eq!((stats.refused_per_source, stats.pending_handshakes), (1, 2));
        drop((held, other_incoming));
        assert_eq!(l.stats().pending_handshakes, 0);
    })
    .await;
}

/// Raises this process's soft limit on open files to `wanted` if it is lower and the hard
/// limit allows it (what `ulimit -n` does in a shell); Err says why it stays too low.
fn at_least_open_files(wanted: u64) -> Result<(), String> {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    if limit.current.is_none_or(|n| n >= wanted) {
        return Ok(());
    }
    if limit.maximum.is_some_and(|n| n < wanted) {
        return Err(format!(
            "needs {wanted} open files and the hard limit is {:?}",
            limit.maximum
        ));
    }
    setrlimit(
        Resource::Nofile,
        Rlimit {
            current: Some(wanted),
            maximum: limit.maximum,
        },
    )
    .map_err(|e| format!("raising the open-file limit to {wanted}: {e}"))
}

/// The attack of issue 13 at its measured scale: 1,000 sockets from 50 source addresses (20
/// each, under the per-source cap), half silent and half dripping a byte every 300 ms, each
/// reconnecting 100 ms after the listener closes it, against the default limits (256 handshakes at once). A good peer
/// from another address still handshakes promptly: the ClientHello deadline closes the
/// silent ones, and a full gate makes room by closing the oldest silent one.
#[tokio::test]
async fn t07_a_crowd_of_silent_sockets_from_many_addresses_does_not_keep_a_good_peer_out() {
    const SOURCES: u8 = 50;
    const PER_SOURCE: usize = 20;
    if let Err(why) = at_least_open_files(4_096) {
        skip_or_fail(&format!("t07 crowd test: {why}"));
        return;
    }
    within(async {
        let mut ca = ca();
        let server = transport(&mut ca, "server");
        let good = transport(&mut ca, "good");
        let l = Arc::new(
            server
                .listen(&DomusAddr::tcp(([0, 0, 0, 0], 0)))
                .await
                .expect("listen"),
        );
        let DomusAddr::Tcp(bound) = l.local_addr().clone() else {
            unreachable!()
        };
        let addr: std::net::SocketAddr = ([127, 0, 0, 1], bound.port()).into();
        // The accept loop a domus runs: every admitted connection gets its handshake task.
        let acceptor = {
            let l = l.clone();
            tokio::spawn(async move {
                let mut tasks = tokio::task::JoinSet::new();
                while let Ok(incoming) = l.accept().await {
                    tasks.spawn(incoming.handshake());
                    while tasks.try_join_next().is_some() {}
                }
            })
        };
        let stop = tokio_util::sync::CancellationToken::new();
        let mut crowd = tokio::task::JoinSet::new();
        for source in 0..SOURCES {
            for n in 0..PER_SOURCE {
                let stop = stop.clone();
                let drips = n % 2 == 1;
                crowd.spawn(async move {
                    while !stop.is_cancelled() {
                        let sock = tokio::net::TcpSocket::new_v4().expect("socket");
                        sock.bind(([127, 0, 1, 10 + source], 0).into())
                            .expect("bind source");
                        if let Ok(conn) = sock.connect(addr).await {
                            // Silent, or dripping the start of a TLS record a byte at a
                            // time: either way no ClientHello ever completes. Wait for
                            // the listener to give up.
                            let (mut r, mut w) = conn.into_split();
                            let drip = async {
                                for byte in [0x16u8, 0x03, 0x01, 0x02, 0x00, 0x01] {
                                    if !drips || w.write_all(&[byte]).await.is_err() {
                                        break;
                                    }
                                    tokio::time::sleep(Duration::from_millis(300)).await;
                                }
                                std::future::pending::<()>().await;
                            };
                            let mut buf = [0u8; 64];
                            tokio::select! {
                                _ = stop.cancelled() => return,
                                _ = r.read(&mut buf) => {}
                                () = drip => {}
                            }
                        }
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                });
            }
        }
        // Let the crowd fill the gate.
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        let filled = l.stats();
        assert!(
            filled.pending_handshakes >= 200,
            "the crowd fills the gate: {filled:?}"
        );
        let mut times = Vec::new();
        for _ in 0..20 {
            let started = std::time::Instant::now();
            // A good peer retries a refused connection at once, as a domus's dialer does
            // after its first (short) backoff.
            loop {
                let sock = tokio::net::TcpSocket::new_v4().expect("socket");
                sock.bind(([127, 0, 0, 3], 0).into()).expect("bind source");
                let tcp = sock.connect(addr).await.expect("connect");
                match good.connect_over(tcp, None).await {
                    Ok(_) => break,
                    Err(e) => {
                        assert_eq!(e.id(), ErrorId::HandshakeFailed, "{e}");
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                }
            }
            times.push(started.elapsed());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        stop.cancel();
        let during = l.stats();
        times.sort();
        eprintln!(
            "good peer during the attack: p50 {:?}, max {:?}; {during:?}",
            times[times.len() / 2],
            times[times.len() - 1]
        );
        // THREATS.md T7: under 1 s during the attack (measured here: a few ms to tens of ms)
        // for 19 of the 20 tries. The last is allowed one TCP SYN retransmission (1 s): on a
        // loaded machine a debug-built accept loop can fall behind the crowd's reconnects,
        // and the kernel's accept queue, not the gate, then drops a SYN.
        assert!(
            times[times.len() - 2] < Duration::from_secs(1),
            "a good peer waited {times:?}"
        );
        assert!(
            times[times.len() - 1] < Duration::from_millis(2_500),
            "a good peer waited {times:?}"
        );
        assert!(during.evicted_silent > 0, "{during:?}");
        while crowd.join_next().await.is_some() {}
        // The gate empties once the crowd has gone.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while l.stats().pending_handshakes > 0 {
            assert!(tokio::time::Instant::now() < deadline, "{:?}", l.stats());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        acceptor.abort();
    })
    .await;
}

#[tokio::test]
async fn t09_a_connect_flood_from_one_address_is_cut_at_accept_and_others_still_connect() {
    within(async {
        let mut ca = ca();
        let mut config = TransportConfig::default();
        config.max_connects_per_second_per_source = 50;
        let server = transport_with(&mut ca, "server", config);
        let l = Arc::new(
            server
                .listen(&DomusAddr::tcp(([0, 0, 0, 0], 0)))
                .await
                .expect("listen"),
        );
        let DomusAddr::Tcp(bound) = l.local_addr().clone() else {
            unreachable!()
        };
        let addr: std::net::SocketAddr = ([127, 0, 0, 1], bound.port()).into();
        // The application's accept loop: admitted connections are dropped at once (their
        // handshake slot too), so only the rate limit refuses anything.
        let (seen_tx, mut seen_rx) = tokio::sync::mpsc::unbounded_channel();
        let acceptor = {
            let l = l.clone();
            tokio::spawn(async move {
                while let Ok(incoming) = l.accept().await {
                    let _ = seen_tx.send(incoming.remote_addr().map(|a| a.ip()));
                }
            })
        };
        let connect_from = |src: [u8; 4]| async move {
            let sock = tokio::net::TcpSocket::new_v4().expect("socket");
            sock.bind((src, 0).into()).expect("bind source");
            sock.connect(addr).await.expect("connect")
        };
        let started = std::time::Instant::now();
        let mut flood = Vec::new();
        for _ in 0..2_000 {
            flood.push(connect_from([127, 0, 0, 2]).await);
        }
        let elapsed = started.elapsed();
        // The last connection is far over the budget: closed before any TLS byte.
        let mut last = flood.pop().expect("connections");
        assert!(closed_within(&mut last, Duration::from_secs(2)).await);
        // Another address has its own budget.
        let _other = connect_from([127, 0, 0, 3]).await;
        let other_seen = tokio::time::timeout(Duration::from_secs(5), async {
            while let Some(ip) = seen_rx.recv().await {
                if ip == Some([127, 0, 0, 3].into()) {
                    return true;
                }
            }
            false
        })
        .await
        .unwrap_or(false);
        assert!(other_seen, "127.0.0.3 was admitted");
        let stats = l.stats();
        // One second's burst plus what the elapsed time earned, and a little slack.
        let allowed = 50 + (elapsed.as_secs_f64() * 50.0) as u64 + 5;
        assert!(
            stats.admitted <= allowed + 1,
            "{} admitted from the flood in {elapsed:?} (allowed about {allowed})",
            stats.admitted
        );
        assert!(
            stats.refused_rate >= 2_000 - allowed,
            "{} refused by rate: {stats:?}",
            stats.refused_rate
        );
        acceptor.abort();
    })
    .await;
}

#[tokio::test]
async fn t14_garbage_instead_of_client_hello_closes_without_panic() {
    within(async {
        let mut ca = ca();
        let server = transport(&mut ca, "server");
        let l = listen_tcp(&server).await;
        let DomusAddr::Tcp(addr) = l.local_addr().clone() else {
            unreachable!()
        };
        for garbage in [
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
            vec![0xff; 4096],
            vec![0x16, 0x03, 0x01, 0xff, 0xff, 0x01],
        ] {
            let client = async {
                let mut tcp = TcpStream::connect(addr).await.expect("connect");
                let _ = tcp.write_all(&garbage).await;
                closed_within(&mut tcp, Duration::from_secs(5)).await
            };
            let (closed, accepted) = tokio::join!(client, accept_one(&l));
            assert_eq!(
                accepted.expect_err("garbage").id(),
                ErrorId::HandshakeFailed
            );
            assert!(closed, "the connection is closed");
        }
        let stats = l.stats();
        assert_eq!((stats.handshakes_failed, stats.pending_handshakes), (3, 0));
        let good = transport(&mut ca, "good");
        let (ok, _) = handshake_pair(&good, &l, None).await;
        ok.expect("the listener still serves good clients");
    })
    .await;
}

#[tokio::test]
async fn reload_switches_new_handshakes_to_new_certificate_and_keeps_established_streams() {
    within(async {
        let mut ca = ca();
        let server = transport(&mut ca, "server");
        let client = transport(&mut ca, "client");
        let l = listen_tcp(&server).await;
        let (before_d, before_a) = handshake_pair(&client, &l, None).await;
        let (mut before_d, mut before_a) = (before_d.expect("dial"), before_a.expect("accept"));
        let old_fp = before_d.peer().fingerprint();

        // Rotate to a new leaf (same identity) signed by a new CA, trusting both CAs.
        let mut new_ca = ca_named("vicus test CA 2");
        let new_leaf = new_ca.leaf("server").expect("mint");
        let rotated = vicus::AuthConfig::from_der(
            vec![ca.cert_der().clone(), new_ca.cert_der().clone()],
            vec![new_leaf.cert_der().clone()],
            new_leaf.key_der(),
        )
        .expect("auth");
        server.reload_auth(rotated).expect("reload");

        // The old client does not trust the new CA yet: proof the new certificate is in use.
        let (refused, _) = handshake_pair(&client, &l, None).await;
        assert_eq!(
            refused.expect_err("old trust").id(),
            ErrorId::PeerCertificateRejected
        );
        let fresh_leaf = ca.leaf("client2").expect("mint");
        let new_client = Transport::new(
            vicus::AuthConfig::from_der(
                vec![new_ca.cert_der().clone()],
                vec![fresh_leaf.cert_der().clone()],
                fresh_leaf.key_der(),
            )
            .expect("auth"),
            TransportConfig::default(),
        )
        .expect("transport");
        let (after_d, _after_a) = handshake_pair(&new_client, &l, Some(&id("server"))).await;
        let after_d = after_d.expect("new handshake with new certificate");
        assert_ne!(after_d.peer().fingerprint(), old_fp);
        assert_eq!(
            after_d.peer().fingerprint(),
            fingerprint_of(new_leaf.cert_der())
        );

        // The stream established before the reload still works.
        ping_pong(&mut before_d, &mut before_a).await;
    })
    .await;
}

fn fingerprint_of(der: &CertificateDer<'_>) -> vicus::a0_transport::CertFingerprint {
    let hash = vicus::a0_transport::default_crypto_provider()
        .cipher_suites
        .iter()
        .filter_map(|s| s.tls13())
        .map(|s| s.common.hash_provider)
        .find(|h| h.algorithm() == rustls::crypto::hash::HashAlgorithm::SHA256)
        .expect("sha256");
    let digest = hash.hash(der.as_ref());
    vicus::a0_transport::CertFingerprint(digest.as_ref().try_into().expect("32 bytes"))
}

#[tokio::test]
async fn t29_invalid_reloads_are_refused_and_change_nothing() {
    within(async {
        let mut ca = ca();
        let server = transport(&mut ca, "server");
        let client = transport(&mut ca, "client");
        // Another identity.
        let (other, _) = ca.domus_auth("someone-else").expect("mint");
        let e = server
            .reload_auth(other)
            .expect_err("identity change refused");
        assert_eq!(e.id(), ErrorId::InvalidAuthMaterial);
        assert!(e.message().contains("keeps its identity"), "{e}");
        // A key that does not belong to the certificate.
        let leaf = ca.leaf("server").expect("mint");
        let stranger = ca.leaf("stranger").expect("mint");
        let mismatched = vicus::AuthConfig::from_der(
            vec![ca.cert_der().clone()],
            vec![leaf.cert_der().clone()],
            stranger.key_der(),
        )
        .expect("parses");
        let e = server
            .reload_auth(mismatched)
            .expect_err("mismatched key refused");
        assert!(e.message().contains("does not match"), "{e}");
        // The old material keeps working.
        let l = listen_tcp(&server).await;
        let (ok, _) = handshake_pair(&client, &l, Some(&id("server"))).await;
        ok.expect("old material still serves");
    })
    .await;
}

#[test]
fn t27_debug_of_auth_config_shows_no_key_bytes() {
    let mut ca = ca();
    let leaf = ca.leaf("a").expect("mint");
    let auth = vicus::AuthConfig::from_pem(
        ca.cert_pem().as_bytes(),
        leaf.cert_pem().as_bytes(),
        leaf.key_pem().as_bytes(),
    )
    .expect("pem");
    let shown = format!("{auth:?} {auth:#?}");
    assert!(shown.contains("[redacted]"), "{shown}");
    let key_der = leaf.key_der();
    let key = key_der.secret_der();
    // No run of 8 key bytes, in decimal list or hex form, and no line of the PEM body.
    for window in key.windows(8).step_by(8) {
        let as_list = format!("{:?}", window).trim_matches(['[', ']']).to_owned();
        assert!(!shown.contains(&as_list), "key bytes leaked: {shown}");
        let hex: String = window.iter().map(|b| format!("{b:02x}")).collect();
        assert!(!shown.contains(&hex));
    }
    for line in leaf.key_pem().lines().filter(|l| !l.starts_with("-----")) {
        assert!(!shown.contains(line));
    }
}

#[test]
fn config_validation_names_the_field() {
    let mut c = TransportConfig::default();
    c.handshake_timeout = Duration::ZERO;
    let e = c.validate().expect_err("zero timeout");
    assert_eq!(e.id(), ErrorId::InvalidConfig);
    assert!(e.message().starts_with("handshake_timeout"), "{e}");
    let mut c = TransportConfig::default();
    c.max_pending_handshakes_per_source = c.max_pending_handshakes + 1;
    assert!(
        c.validate()
            .expect_err("per source > total")
            .message()
            .starts_with("max_pending_handshakes_per_source")
    );
    let mut c = TransportConfig::default();
    c.unix_socket_mode = 0o4777;
    assert!(c.validate().is_err());
    let mut c = TransportConfig::default();
    c.unix_allowed_uids = Some(BTreeSet::new());
    assert!(c.validate().is_err());
    assert!(TransportConfig::default().validate().is_ok());
}

#[tokio::test]
async fn t10_socket_path_stale_socket_replaced_live_socket_and_other_files_kept() {
    within(async {
        let dir = tempdir();
        let mut ca = ca();
        let server = transport(&mut ca, "server");

        // (3) A stale socket (its listener is gone, the file is left) is replaced.
        let stale = dir.join("stale.sock");
        drop(std::os::unix::net::UnixListener::bind(&stale).expect("bind"));
        assert!(stale.exists());
        let l = server
            .listen(&DomusAddr::unix(&stale))
            .await
            .expect("stale replaced");

        // A live socket is never replaced.
        let e = server
            .listen(&DomusAddr::unix(&stale))
            .await
            .expect_err("in use");
        assert_eq!(e.id(), ErrorId::SocketPathInUse, "{e}");
        drop(l);

        // (5) A regular file is not deleted.
        let file = dir.join("file.sock");
        std::fs::write(&file, b"precious").expect("write");
        let e = server
            .listen(&DomusAddr::unix(&file))
            .await
            .expect_err("file");
        assert_eq!(e.id(), ErrorId::SocketPathOccupied, "{e}");
        assert!(e.message().contains("not a socket"), "{e}");
        assert_eq!(std::fs::read(&file).expect("still there"), b"precious");

        // (4) A symlink is neither followed nor removed, even when it points at a stale socket.
        let target = dir.join("victim.sock");
        drop(std::os::unix::net::UnixListener::bind(&target).expect("bind"));
        let link = dir.join("link.sock");
        std::os::unix::fs::symlink(&target, &link).expect("symlink");
        let e = server
            .listen(&DomusAddr::unix(&link))
            .await
            .expect_err("symlink");
        assert_eq!(e.id(), ErrorId::SocketPathOccupied, "{e}");
        assert!(
            std::fs::symlink_metadata(&link)
                .expect("link kept")
                .file_type()
                .is_symlink()
        );
        assert!(target.exists(), "the symlink's target is untouched");

        // A directory is not touched either.
        let sub = dir.join("dir.sock");
        std::fs::create_dir(&sub).expect("mkdir");
        let e = server
            .listen(&DomusAddr::unix(&sub))
            .await
            .expect_err("dir");
        assert_eq!(e.id(), ErrorId::SocketPathOccupied);
        assert!(sub.is_dir());
    })
    .await;
}

#[tokio::test]
async fn dial_errors_are_typed_and_bounded() {
    within(async {
        let mut ca = ca();
        let client = transport(&mut ca, "client");
        // Nothing listens on this port (bind then drop to find a free one).
        let free = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = free.local_addr().expect("addr");
        drop(free);
        let e = client
            .dial(&DomusAddr::Tcp(addr), None)
            .await
            .expect_err("refused");
        assert_eq!(e.id(), ErrorId::ConnectFailed, "{e}");
        let e = client
            .dial(&DomusAddr::unix("/nonexistent/vicus.sock"), None)
            .await
            .expect_err("no socket");
        assert_eq!(e.id(), ErrorId::ConnectFailed, "{e}");
        // A listener that accepts TCP but never speaks TLS: the dial ends at the handshake
        // timeout, not never.
        let mut config = TransportConfig::default();
        config.handshake_timeout = Duration::from_millis(300);
        let impatient = transport_with(&mut ca, "impatient", config);
        let mute = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let mute_addr = mute.local_addr().expect("addr");
        let _keep = tokio::spawn(async move {
            let held = mute.accept().await;
            tokio::time::sleep(Duration::from_secs(10)).await;
            drop(held);
        });
        let e = impatient
            .dial(&DomusAddr::Tcp(mute_addr), None)
            .await
            .expect_err("timeout");
        assert_eq!(e.id(), ErrorId::HandshakeTimeout, "{e}");
    })
    .await;
}

#[tokio::test]
async fn pem_files_load_and_handshake() {
    within(async {
        let dir = tempdir();
        let mut ca = ca();
        let leaf = ca.leaf("from-files").expect("mint");
        std::fs::write(dir.join("ca.pem"), ca.cert_pem()).expect("write");
        std::fs::write(dir.join("leaf.pem"), leaf.cert_pem()).expect("write");
        std::fs::write(dir.join("leaf.key"), leaf.key_pem()).expect("write");
        let auth = vicus::AuthConfig::from_pem_files(
            dir.join("ca.pem"),
            dir.join("leaf.pem"),
            dir.join("leaf.key"),
        )
        .expect("load PEM files");
        let from_files = Transport::new(auth, TransportConfig::default()).expect("transport");
        assert_eq!(from_files.local_id(), id("from-files"));
        let server = transport(&mut ca, "server");
        let l = listen_tcp(&server).await;
        let (dialed, accepted) = handshake_pair(&from_files, &l, Some(&id("server"))).await;
        dialed.expect("dial");
        assert_eq!(accepted.expect("accept").peer().id(), &id("from-files"));
        // A key file holding a certificate is refused with a message naming the file.
        let e = vicus::AuthConfig::from_pem_files(
            dir.join("ca.pem"),
            dir.join("leaf.pem"),
            dir.join("leaf.pem"),
        )
        .expect_err("no key in a certificate file");
        assert_eq!(e.id(), ErrorId::InvalidAuthMaterial);
        assert!(e.message().contains("leaf.pem"), "{e}");
    })
    .await;
}

/// Connections to `sa` that complete within 300 ms, `n` tried at once; they are kept open
/// (and returned) so none leaves the listener's queue.
async fn connects_within(sa: std::net::SocketAddr, n: usize) -> Vec<TcpStream> {
    let mut tries = tokio::task::JoinSet::new();
    for _ in 0..n {
        tries.spawn(tokio::time::timeout(
            Duration::from_millis(300),
            TcpStream::connect(sa),
        ));
    }
    let mut open = Vec::new();
    while let Some(done) = tries.join_next().await {
        if let Ok(Ok(Ok(stream))) = done {
            open.push(stream);
        }
    }
    open
}

#[tokio::test]
async fn listen_backlog_bounds_the_connections_the_kernel_holds_before_accept() {
    within(async {
        let mut ca = ca();
        for backlog in [2u32, 64] {
            let mut config = TransportConfig::default();
            config.listen_backlog = backlog;
            let t = transport_with(&mut ca, "server", config);
            // Nobody accepts: what connects is what the kernel queues for the listener.
            let l = listen_tcp(&t).await;
            let DomusAddr::Tcp(sa) = l.local_addr().clone() else {
                panic!("a TCP listener");
            };
            let open = connects_within(sa, 16).await;
            if backlog == 2 {
                // Linux queues backlog + 1 and drops later SYNs (retried after a second). Two
                // connects racing for the last place can both finish on the client's side, so
                // a few more than 3 may show up; never most of the 16.
                assert!(open.len() <= 6, "{} connected with backlog 2", open.len());
                assert!(!open.is_empty());
            } else {
                assert_eq!(open.len(), 16, "with backlog 64");
            }
        }
        // A Unix socket too (the standard library's own backlog is replaced).
        let dir = tempdir();
        for backlog in [2u32, 64] {
            let mut config = TransportConfig::default();
            config.listen_backlog = backlog;
            let t = transport_with(&mut ca, "server", config);
            let path = dir.join(format!("backlog-{backlog}.sock"));
            let _l = t.listen(&DomusAddr::unix(&path)).await.expect("listen");
            let mut open = Vec::new();
            for _ in 0..16 {
                // A full queue refuses a non-blocking connect at once (EAGAIN).
                if let Ok(s) = tokio::net::UnixStream::connect(&path).await {
                    open.push(s);
                }
            }
            if backlog == 2 {
                assert!(open.len() <= 3, "{} connected with backlog 2", open.len());
            } else {
                assert_eq!(open.len(), 16, "with backlog 64");
            }
        }
        let mut config = TransportConfig::default();
        config.listen_backlog = 0;
        let (auth, _) = ca.domus_auth("zero").expect("mint");
        let e = Transport::new(auth, config).expect_err("a backlog of 0");
        assert_eq!(e.id(), ErrorId::InvalidConfig, "{e}");
        assert!(e.message().contains("listen_backlog"), "{e}");
    })
    .await;
}
