//! Address → identity pins (routes that name no identity), over real TLS on loopback: the
//! table stays within `max_pinned_addresses` however many addresses the resolver names, and
//! an address taken over by another identity (a Kubernetes pod IP reused by another pod: here
//! a second domus with its own certificate bound at the first one's address after it stopped)
//! is served again after one mismatch, without restarting the sender — while a route that
//! names the old identity keeps refusing the newcomer (T3, T11).

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::{Mesh, addr_of, spawn_named_echo, within};
use vicus::{Delivery, Domus, DomusAddr, ErrorId, MessageType, SendOptions, TabernaId};

const APP: MessageType = MessageType::app(1);

fn opts(ms: u64) -> SendOptions {
    SendOptions::default().timeout(Duration::from_millis(ms))
}

/// Builds a domus named `name` bound at `addr`, retrying while the port is still held by the
/// domus that just stopped there.
async fn bind_again(mesh: &mut Mesh, name: &str, addr: &DomusAddr) -> Domus {
    let started = tokio::time::Instant::now();
    loop {
        let built = mesh
            .builder(name)
            .expect("builder")
            .bind(addr.clone())
            .build()
            .await;
        match built {
            Ok(d) => return d,
            Err(e) => {
                assert!(
                    started.elapsed() < Duration::from_secs(5),
                    "{addr} could not be bound again: {e}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

#[tokio::test]
async fn t11_an_address_reused_by_another_identity_is_served_again_after_the_mismatch() {
    within(async {
        let mut mesh = Mesh::new().expect("mesh");
        let t = TabernaId(10);
        let x = mesh.domus("x").await.expect("x");
        let at = addr_of(&x);
        let x_id = x.identity().clone();
        spawn_named_echo(x.taberna(t).expect("taberna"), "x");
        // The route names no identity: the first dial learns x's and pins it at `at`.
        mesh.resolver().insert(t, at.clone(), None);
        let client = mesh.domus("client").await.expect("client");
        let out = client
            .send(t, APP, Bytes::from_static(b"1"), opts(5_000))
            .await
            .expect("x answers");
        assert_eq!(out, Delivery::Replied(Bytes::from_static(b"x:1").into()));
        assert_eq!(client.pinned_addresses(), 1);

        // x stops; y, another identity from the same CA, takes its address.
        x.shutdown().await;
        drop(mesh.remove("x"));
        drop(x);
        let y = bind_again(&mut mesh, "y", &at).await;
        assert_eq!(addr_of(&y), at);
        spawn_named_echo(y.taberna(t).expect("taberna"), "y");

        // The same client, not restarted: a send may fail while the pin still names x (the
        // dial meets y: IdentityMismatch; or x's goodbye: PeerShutDown), then y serves.
        let started = tokio::time::Instant::now();
        let mut failures = Vec::new();
        loop {
            match client
                .send(t, APP, Bytes::from_static(b"2"), opts(2_000))
                .await
            {
                Ok(Delivery::Replied(reply)) if reply == Bytes::from_static(b"y:2") => break,
                Ok(other) => panic!("unexpected answer {other:?}"),
                Err(e) => {
                    assert!(
                        matches!(
                            e.id(),
                            ErrorId::IdentityMismatch
                                | ErrorId::PeerShutDown
                                | ErrorId::PeerUnavailable
                        ),
                        "{e}"
                    );
                    failures.push(e);
                }
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "y was never served at the reused address: {} failures, last {:?}",
                failures.len(),
                failures.last()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        println!(
            "served by the new identity after {} failed send(s): {:?}",
            failures.len(),
            failures.iter().map(|e| e.id()).collect::<Vec<_>>()
        );
        assert!(
            failures.len() <= 3,
            "the mismatch re-resolves at once: {failures:?}"
        );
        assert_eq!(client.pinned_addresses(), 1, "one address, pinned anew");
        // Later sends keep going to y.
        for _ in 0..3 {
            let out = client
                .send(t, APP, Bytes::from_static(b"3"), opts(5_000))
                .await
                .expect("y answers");
            assert_eq!(out, Delivery::Replied(Bytes::from_static(b"y:3").into()));
        }

        // A route that names x at that address never moves to y: refused at the handshake.
        let named = TabernaId(11);
        mesh.resolver().insert(named, at.clone(), Some(x_id));
        let e = client
            .send(named, APP, Bytes::from_static(b"4"), opts(5_000))
            .await
            .expect_err("y is not x");
        assert_eq!(e.id(), ErrorId::IdentityMismatch, "{e}");
        // And the unnamed route still reaches y.
        let out = client
            .send(t, APP, Bytes::from_static(b"5"), opts(5_000))
            .await
            .expect("y answers");
        assert_eq!(out, Delivery::Replied(Bytes::from_static(b"y:5").into()));
        client.shutdown().await;
        y.shutdown().await;
        mesh.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn pins_stay_within_max_pinned_addresses_under_many_distinct_addresses() {
    within(async {
        const SERVERS: u64 = 12;
        const MAX: usize = 4;
        let mut mesh = Mesh::new().expect("mesh");
        let mut servers = Vec::new();
        for i in 0..SERVERS {
            let name: &'static str = Box::leak(format!("s{i}").into_boxed_str());
            let s = mesh.domus(name).await.expect("server");
            spawn_named_echo(s.taberna(TabernaId(100 + i)).expect("taberna"), name);
            // Twelve distinct addresses, none naming an identity.
            mesh.resolver()
                .insert(TabernaId(100 + i), addr_of(&s), None);
            servers.push(s);
        }
        let mut config = Mesh::test_config();
        config.max_pinned_addresses = MAX;
        let client = mesh.domus_with("client", config).await.expect("client");
        let mut most = 0;
        for round in 0..2 {
            for i in 0..SERVERS {
                let out = client
                    .send(
                        TabernaId(100 + i),
                        APP,
                        Bytes::from_static(b"?"),
                        opts(5_000),
                    )
                    .await
                    .unwrap_or_else(|e| panic!("round {round}, s{i}: {e}"));
                assert_eq!(
                    out,
                    Delivery::Replied(Bytes::from(format!("s{i}:?")).into()),
                    "each address reaches its own domus, evicted or not"
                );
                most = most.max(client.pinned_addresses());
                assert!(
                    client.pinned_addresses() <= MAX,
                    "{} pins after s{i} (max_pinned_addresses {MAX})",
                    client.pinned_addresses()
                );
            }
        }
        println!("{SERVERS} addresses twice: at most {most} pins held (bound {MAX})");
        assert_eq!(most, MAX, "the table fills up to its bound");
        // Lowered while running: the next pin (an address not pinned yet; sends to the
        // twelve go through their cached routes) evicts down to the new bound.
        let extra = mesh.domus("extra").await.expect("server");
        spawn_named_echo(extra.taberna(TabernaId(99)).expect("taberna"), "extra");
        mesh.resolver().insert(TabernaId(99), addr_of(&extra), None);
        client
            .config()
            .update(|c| c.max_pinned_addresses = 1)
            .expect("live");
        client
            .send(TabernaId(99), APP, Bytes::from_static(b"!"), opts(5_000))
            .await
            .expect("the extra server answers");
        assert_eq!(client.pinned_addresses(), 1);
        client.shutdown().await;
        extra.shutdown().await;
        mesh.shutdown().await;
    })
    .await;
}
