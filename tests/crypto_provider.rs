//! Which TLS crypto provider a domus runs on is a visible, documented choice: the default
//! (aws-lc-rs whenever its feature is on, ring only without it) or an explicit provider, and
//! the snapshot says which. `.ci/run` runs this file with ring alone and with both features,
//! so the real exchange below (a handshake over TCP, a message answered, a blob streamed and
//! checked) runs on ring too, not only the provider's name.

mod common;

use std::hash::{DefaultHasher, Hasher};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use rustls::NamedGroup;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use vicus::a0_transport::{DEFAULT_CRYPTO_PROVIDER, default_crypto_provider};
use vicus::{Delivery, Domus, MessageType, SendOptions, TabernaId};

/// What the documented rule picks for the features this test was built with.
fn expected() -> &'static str {
    if cfg!(feature = "aws-lc-rs") {
        "aws-lc-rs"
    } else {
        "ring"
    }
}

#[tokio::test]
async fn the_crypto_provider_in_use_is_reported_and_follows_the_documented_rule() {
    within(async {
        let mut ca = ca();
        assert_eq!(DEFAULT_CRYPTO_PROVIDER, expected());
        let (auth, _) = ca.domus_auth("default").expect("mint");
        let domus = Domus::builder(auth).build().await.expect("domus");
        assert_eq!(domus.crypto_provider(), expected());
        assert_eq!(
            domus.reporting().snapshot().crypto_provider,
            expected(),
            "the snapshot names the provider"
        );
        // An explicit provider is the caller's choice and reported as such.
        let (auth, _) = ca.domus_auth("explicit").expect("mint");
        let explicit = Domus::builder(auth)
            .crypto_provider(default_crypto_provider())
            .build()
            .await
            .expect("domus");
        assert_eq!(explicit.crypto_provider(), "custom");
        explicit.shutdown().await;
        domus.shutdown().await;
    })
    .await;
}

/// The key exchange the provider the rule picks negotiates by default: aws-lc-rs prefers the
/// post-quantum hybrid, ring has none and agrees on X25519.
fn expected_key_exchange() -> NamedGroup {
    if cfg!(feature = "aws-lc-rs") {
        NamedGroup::X25519MLKEM768
    } else {
        NamedGroup::X25519
    }
}

fn hash(bytes: &[u8]) -> u64 {
    let mut h = DefaultHasher::new();
    h.write(bytes);
    h.finish()
}

#[tokio::test]
async fn a_handshake_a_message_and_a_blob_go_through_on_the_provider_the_rule_picks() {
    within(async {
        // The handshake alone, over TCP, with certificates from a fresh CA: the key exchange
        // it negotiated shows which provider ran it.
        let mut ca = ca();
        let dialer = transport(&mut ca, "dialer");
        let acceptor = transport(&mut ca, "acceptor");
        let listener = listen_tcp(&acceptor).await;
        let (a, b) = handshake_pair(&dialer, &listener, Some(&id("acceptor"))).await;
        let (mut a, mut b) = (a.expect("dial"), b.expect("accept"));
        assert_eq!(a.key_exchange_group(), Some(expected_key_exchange()));
        assert_eq!(b.key_exchange_group(), Some(expected_key_exchange()));
        assert_eq!(b.peer().id(), &id("dialer"));
        ping_pong(&mut a, &mut b).await;

        // Two domus on the same provider: a message answered, then a blob streamed and
        // checked on arrival.
        let mut mesh = Mesh::new().expect("mesh");
        let client = mesh.domus("client").await.expect("domus");
        let server = mesh.domus("server").await.expect("domus");
        assert_eq!(client.crypto_provider(), expected());
        assert_eq!(server.crypto_provider(), expected());
        spawn_named_echo(
            mesh.taberna("server", TabernaId(1)).expect("taberna"),
            "server",
        );
        let answer = mesh
            .send("client", TabernaId(1), Bytes::from_static(b"hello"))
            .await
            .expect("send");
        assert_eq!(
            answer,
            Delivery::Replied(Bytes::from_static(b"server:hello").into())
        );

        let blobs = mesh.taberna("server", TabernaId(2)).expect("taberna");
        let payload: Bytes = (0..4u32 << 20)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let expected_hash = hash(&payload);
        let reader = tokio::spawn(async move {
            let mut req = blobs.recv().await.expect("request");
            let who = req.peer().id().clone();
            let mut rx = req.blob().expect("a blob");
            req.accept();
            let mut got = Vec::new();
            rx.read_to_end(&mut got).await.expect("read the blob");
            (who, got)
        });
        let kind = MessageType::app(7);
        let mut tx = client
            .send_blob(
                TabernaId(2),
                kind,
                Bytes::from_static(b"header"),
                SendOptions::default().timeout(Duration::from_secs(10)),
            )
            .await
            .expect("blob opened");
        for piece in payload.chunks(64 * 1024) {
            tx.write_all(piece).await.expect("write the blob");
        }
        tx.finish().await.expect("blob finished");
        let (who, got) = reader.await.expect("join");
        assert_eq!(&who, client.identity());
        assert_eq!(got.len(), payload.len());
        assert_eq!(hash(&got), expected_hash, "the blob arrived intact");
        mesh.shutdown().await;
    })
    .await;
}
