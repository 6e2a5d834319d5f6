//! Reporting, live configuration and certificate rotation, over real loopback mTLS. Test names
//! carry the threat they cover (../shared/THREATS.md).

mod common;

use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use vicus::reporting::{CallisKind, Event, FeedItem};
use vicus::{Delivery, Domus, ErrorId, MessageType, SendOptions, TabernaId, TabernaOptions};

const APP: MessageType = MessageType::app(3);

fn opts() -> SendOptions {
    SendOptions::default().timeout(Duration::from_secs(10))
}

/// Replies to "r", rejects "x" with code 7, accepts the rest; takes and drains blobs.
fn spawn_worker(t: vicus::Taberna) {
    tokio::spawn(async move {
        while let Some(mut req) = t.recv().await {
            if let Some(mut blob) = req.blob() {
                req.accept();
                tokio::spawn(async move {
                    let mut sink = Vec::new();
                    let _ = blob.read_to_end(&mut sink).await;
                });
                continue;
            }
            match req.payload().as_ref() {
                b"r" => req.reply(Bytes::from_static(b"ok")),
                b"x" => req.reject(7, "no"),
                _ => req.accept(),
            }
        }
    });
}

#[tokio::test]
async fn counters_move_by_exactly_the_expected_amounts_and_deltas_add_up_to_totals() {
    within(async {
        let mut mesh = Mesh::new().expect("mesh");
        let a = mesh.domus("a").await.expect("domus");
        let b = mesh.domus("b").await.expect("domus");
        mesh.route(TabernaId(10), &b).expect("route");
        spawn_worker(b.taberna(TabernaId(10)).expect("taberna"));
        let rep = a.reporting();
        let mut deltas = vicus::reporting::Counters::default();
        let mut add = |c: &vicus::reporting::Counters| {
            deltas.messages_sent += c.messages_sent;
            deltas.messages_accepted += c.messages_accepted;
            deltas.messages_replied += c.messages_replied;
            deltas.messages_rejected += c.messages_rejected;
        };
        // Phase 1: 10 replies, 10 accepts.
        for i in 0..20 {
            let payload = if i % 2 == 0 { "r" } else { "a" };
            a.send(TabernaId(10), APP, Bytes::from(payload), opts())
                .await
                .expect("sent");
        }
        add(&rep.snapshot_and_reset().counters);
        // Phase 2: 3 rejects and one 100 KiB blob.
        for _ in 0..3 {
            let e = a
                .send(TabernaId(10), APP, Bytes::from_static(b"x"), opts())
                .await
                .expect_err("rejected");
            assert_eq!(e.id(), ErrorId::RemoteTabernaRejected);
        }
        let mut blob = a
            .send_blob(TabernaId(10), APP, Bytes::new(), opts())
            .await
            .expect("blob");
        blob.write_all(&[5u8; 100 * 1024]).await.expect("write");
        blob.finish().await.expect("finish");
        let phase2 = rep.snapshot_and_reset();
        add(&phase2.counters);
        assert_eq!(
            phase2
                .rejected_by
                .get(&ErrorId::RemoteTabernaRejected)
                .copied(),
            Some(3)
        );
        let s = rep.snapshot();
        let t = &s.totals;
        // 20 + 3 messages + the blob's opening message.
        assert_eq!(t.messages_sent, 24);
        assert_eq!(t.messages_replied, 10);
        assert_eq!(t.messages_accepted, 11);
        assert_eq!(t.messages_rejected, 3);
        assert_eq!(t.messages_timed_out + t.messages_failed, 0);
        assert_eq!(t.blob_streams_opened, 1);
        assert_eq!(t.blob_streams_completed, 1);
        assert_eq!(t.blob_streams_cancelled, 0);
        assert_eq!(t.primary_calles_opened, 1);
        assert_eq!(t.blob_calles_opened, 1);
        assert!(t.blob_bytes_out >= 100 * 1024, "{}", t.blob_bytes_out);
        assert!(t.primary_bytes_out > 0 && t.primary_bytes_in > 0);
        // Deltas over the intervals add up to the totals.
        assert_eq!(deltas.messages_sent, t.messages_sent);
        assert_eq!(deltas.messages_accepted, t.messages_accepted);
        assert_eq!(deltas.messages_replied, t.messages_replied);
        assert_eq!(deltas.messages_rejected, t.messages_rejected);
        assert_eq!(s.counters.messages_sent, 0, "a fresh interval");
        assert_eq!(s.primary_calles.current, 1);
        assert_eq!(s.blob_streams.current, 0);
        // Latency over every answered remote send (phase 2 only after the reset).
        assert_eq!(phase2.latency.count, 4);
        assert!(phase2.latency.p50 <= phase2.latency.p99);
        // The receiver counted every delivery.
        assert_eq!(b.reporting().snapshot().totals.messages_received, 24);
        // Per-peer figures.
        let peer = s
            .per_peer
            .iter()
            .find(|p| &p.peer == b.identity())
            .expect("b");
        assert!(peer.connected);
        assert_eq!(peer.in_flight, 0);
        assert!(peer.bytes_out >= 100 * 1024);
        assert_eq!(rep.connected_peers(), vec![b.identity().clone()]);
    })
    .await;
}

#[tokio::test]
async fn events_arrive_in_order_for_connect_traffic_and_peer_shutdown() {
    within(async {
        let mut mesh = Mesh::new().expect("mesh");
        let a = mesh.domus("a").await.expect("domus");
        let b = mesh.domus("b").await.expect("domus");
        mesh.route(TabernaId(10), &b).expect("route");
        spawn_worker(b.taberna(TabernaId(10)).expect("taberna"));
        let mut a_events = a.reporting().events();
        let mut b_events = b.reporting().events();
        a.send(TabernaId(10), APP, Bytes::from_static(b"r"), opts())
            .await
            .expect("sent");
        b.shutdown().await;
        let mut seen = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            match tokio::time::timeout(Duration::from_millis(100), a_events.recv()).await {
                Ok(Some(FeedItem::Item(e))) => {
                    let done = matches!(e, Event::PeerDisconnected { .. });
                    seen.push(e);
                    if done {
                        break;
                    }
                }
                Ok(Some(FeedItem::Missed(n))) => panic!("missed {n}"),
                Ok(None) => break,
                Err(_) => {}
            }
        }
        let pos = |f: &dyn Fn(&Event) -> bool| seen.iter().position(f);
        let up = pos(&|e| {
            matches!(
                e,
                Event::CallisUp {
                    kind: CallisKind::Primary,
                    ..
                }
            )
        })
        .expect("callis up");
        let connected = pos(&|e| {
            matches!(
                e,
                Event::PeerConnected {
                    restarted: false,
                    ..
                }
            )
        })
        .expect("connected");
        let down = pos(&|e| {
            matches!(
                e,
                Event::CallisDown {
                    kind: CallisKind::Primary,
                    ..
                }
            )
        })
        .expect("callis down");
        let gone = pos(&|e| matches!(e, Event::PeerDisconnected { .. })).expect("disconnected");
        assert!(
            up < connected && connected < down && down < gone,
            "{seen:?}"
        );
        let mut b_seen = Vec::new();
        while let Some(FeedItem::Item(e)) = b_events.try_recv() {
            b_seen.push(e);
        }
        let started = b_seen
            .iter()
            .position(|e| *e == Event::ShutdownStarted)
            .expect("started");
        let completed = b_seen
            .iter()
            .position(|e| *e == Event::ShutdownCompleted)
            .expect("completed");
        assert!(started < completed, "{b_seen:?}");
    })
    .await;
}

#[tokio::test]
async fn a_lagging_subscriber_is_told_what_it_missed_and_the_node_keeps_going() {
    within(async {
        let mut mesh = Mesh::new().expect("mesh");
        let a = mesh.domus("a").await.expect("domus");
        let b = mesh.domus("b").await.expect("domus");
        mesh.route(TabernaId(10), &b).expect("route");
        // An inbox of one that nobody reads: every send after the first overruns it.
        let _held = b
            .taberna_with(TabernaId(10), TabernaOptions::default().inbox_depth(1))
            .expect("taberna");
        let mut lagging = b.reporting().events();
        let n = vicus::reporting::EVENT_BUFFER_LEN + 500;
        let started = Instant::now();
        let mut receipts = Vec::with_capacity(n);
        for _ in 0..n {
            receipts.push(
                a.admit(TabernaId(10), APP, Bytes::new(), opts())
                    .await
                    .expect("admitted"),
            );
        }
        let mut busy = 0;
        for r in receipts.into_iter().skip(1) {
            if r.await.expect_err("busy").id() == ErrorId::TabernaBusy {
                busy += 1;
            }
        }
        assert_eq!(busy, n - 1);
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
        match lagging.recv().await {
            Some(FeedItem::Missed(missed)) => assert!(missed >= 400, "{missed}"),
            other => panic!("expected a lag report, got {other:?}"),
        }
        assert!(matches!(
            lagging.recv().await,
            Some(FeedItem::Item(Event::QueueOverrun { taberna: 10 }))
        ));
        let s = b.reporting().snapshot();
        assert_eq!(s.totals.queue_overruns_inbox, (n - 1) as u64);
        assert_eq!(
            s.rejected_by.get(&ErrorId::TabernaBusy),
            None,
            "the receiver does not count rejections it sends"
        );
        assert_eq!(
            a.reporting()
                .snapshot()
                .rejected_by
                .get(&ErrorId::TabernaBusy)
                .copied(),
            Some((n - 1) as u64)
        );
    })
    .await;
}

#[tokio::test]
async fn live_updates_of_send_timeout_and_inbox_depth_apply_to_the_next_send() {
    within(async {
        let mut mesh = Mesh::new().expect("mesh");
        let a = mesh.domus("a").await.expect("domus");
        let b = mesh.domus("b").await.expect("domus");
        mesh.route(TabernaId(10), &b).expect("route");
        mesh.route(TabernaId(11), &b).expect("route");
        // Taberna 10 never answers; taberna 11 is never read (default depth).
        let silent = b.taberna(TabernaId(10)).expect("taberna");
        let _unread = b.taberna(TabernaId(11)).expect("taberna");
        let mut events = a.reporting().events();
        a.config()
            .update(|c| c.send_timeout = Duration::from_millis(200))
            .expect("update");
        assert!(matches!(
            events.try_recv(),
            Some(FeedItem::Item(Event::ConfigReloaded))
        ));
        let started = Instant::now();
        let e = a
            .send(TabernaId(10), APP, Bytes::new(), SendOptions::default())
            .await
            .expect_err("times out");
        assert_eq!(e.id(), ErrorId::SendTimeout);
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
        drop(silent);

        // Depth 2 on b: the third unread delivery is refused.
        b.config()
            .update(|c| c.default_inbox_depth = 2)
            .expect("update");
        let mut outcomes = Vec::new();
        for _ in 0..3 {
            outcomes.push(
                a.send(
                    TabernaId(11),
                    APP,
                    Bytes::new(),
                    opts().timeout(Duration::from_millis(300)),
                )
                .await
                .map_err(|e| e.id()),
            );
        }
        assert_eq!(outcomes[2], Err(ErrorId::TabernaBusy), "{outcomes:?}");
        // Raised to 4: the next one fits again.
        b.config()
            .update(|c| c.default_inbox_depth = 4)
            .expect("update");
        let next = a
            .send(
                TabernaId(11),
                APP,
                Bytes::new(),
                opts().timeout(Duration::from_millis(300)),
            )
            .await
            .map_err(|e| e.id());
        assert_eq!(next, Err(ErrorId::SendTimeout), "queued, not refused");
    })
    .await;
}

#[tokio::test]
async fn t29_invalid_live_updates_are_refused_by_field_and_change_nothing() {
    within(async {
        let mut mesh = Mesh::new().expect("mesh");
        let a = mesh.domus("a").await.expect("domus");
        let before = a.config().snapshot();
        let e = a
            .config()
            .update(|c| c.send_timeout = Duration::ZERO)
            .expect_err("zero");
        assert_eq!(e.id(), ErrorId::InvalidConfig);
        assert!(e.message().starts_with("send_timeout"), "{e}");
        let e = a
            .config()
            .update(|c| {
                c.send_timeout = Duration::from_secs(3);
                c.blob_window = 1 << 20;
            })
            .expect_err("fixed");
        assert!(e.message().starts_with("blob_window"), "{e}");
        let e = a
            .config()
            .update(|c| c.default_inbox_depth = 0)
            .expect_err("zero depth");
        assert!(e.message().starts_with("default_inbox_depth"), "{e}");
        assert_eq!(a.config().snapshot(), before, "nothing changed");
        let b = mesh.domus("b").await.expect("domus");
        mesh.route(TabernaId(10), &b).expect("route");
        spawn_worker(b.taberna(TabernaId(10)).expect("taberna"));
        // Invalid material is refused too, and the old material keeps working.
        let leaf1 = mesh.ca().leaf("a").expect("mint");
        let leaf2 = mesh.ca().leaf("a").expect("mint");
        let mismatched = vicus::AuthConfig::from_der(
            vec![mesh.ca().cert_der().clone()],
            vec![leaf1.cert_der().clone()],
            leaf2.key_der(),
        )
        .and_then(|auth| a.reload_auth(auth))
        .expect_err("a key that does not match the certificate");
        assert_eq!(
            mismatched.id(),
            ErrorId::InvalidAuthMaterial,
            "{mismatched}"
        );
        let (wrong_name, _) = mesh.ca().domus_auth("not-a").expect("mint");
        let e = a.reload_auth(wrong_name).expect_err("identity must stay");
        assert_eq!(e.id(), ErrorId::InvalidAuthMaterial);
        // The old material still works, with the old configuration.
        a.send(TabernaId(10), APP, Bytes::from_static(b"r"), opts())
            .await
            .expect("a still talks");
        let errors = a.reporting().errors_since(0, 100);
        assert!(
            errors
                .errors
                .iter()
                .any(|x| x.error.message().starts_with("send_timeout")),
            "refused updates reach the error feed"
        );
    })
    .await;
}

#[tokio::test]
async fn rotation_under_traffic_loses_no_send_and_new_calles_present_the_new_certificate() {
    within(async {
        let mut mesh = Mesh::new().expect("mesh");
        let a = mesh.domus("a").await.expect("domus");
        let b_leaf = mesh.ca().leaf("b").expect("mint");
        let auth = mesh.ca().auth_config(&b_leaf).expect("auth");
        let b = mesh.builder_for(auth).build().await.expect("domus");
        mesh.route(TabernaId(10), &b).expect("route");
        spawn_worker(b.taberna(TabernaId(10)).expect("taberna"));
        let probe = transport(mesh.ca(), "probe");
        let first = probe
            .dial(&addr_of(&b), Some(b.identity()))
            .await
            .expect("probe");
        let old_fp = first.peer().fingerprint();
        drop(first);
        let mut events = b.reporting().events();
        let sender = {
            let a = a.clone();
            tokio::spawn(async move {
                let mut n = 0u32;
                let until = Instant::now() + Duration::from_millis(800);
                while Instant::now() < until {
                    a.send(TabernaId(10), APP, Bytes::from_static(b"r"), opts())
                        .await
                        .expect("no send fails during rotation");
                    n += 1;
                }
                n
            })
        };
        tokio::time::sleep(Duration::from_millis(200)).await;
        let new_leaf = mesh.ca().leaf("b").expect("mint");
        b.reload_auth(mesh.ca().auth_config(&new_leaf).expect("auth"))
            .expect("reload");
        let sent = sender.await.expect("join");
        assert!(sent > 10, "{sent}");
        let mut reloaded = false;
        while let Some(item) = events.try_recv() {
            reloaded |= item == FeedItem::Item(Event::AuthReloaded);
        }
        assert!(reloaded, "an AuthReloaded event");
        let second = probe
            .dial(&addr_of(&b), Some(b.identity()))
            .await
            .expect("probe after reload");
        assert_ne!(
            second.peer().fingerprint(),
            old_fp,
            "the new certificate is in use"
        );
    })
    .await;
}

#[tokio::test]
async fn t04_a_crl_reload_closes_a_revoked_peers_calles_and_refuses_its_next_handshake() {
    within(async {
        let mut mesh = Mesh::new().expect("mesh");
        let a_leaf = mesh.ca().leaf("a").expect("mint");
        let auth = mesh.ca().auth_config(&a_leaf).expect("auth");
        let a = mesh.builder_for(auth).build().await.expect("domus");
        let b_leaf = mesh.ca().leaf("b").expect("mint");
        let auth = mesh.ca().auth_config(&b_leaf).expect("auth");
        let b = mesh.builder_for(auth).build().await.expect("domus");
        mesh.route(TabernaId(10), &b).expect("route");
        spawn_worker(b.taberna(TabernaId(10)).expect("taberna"));
        assert_eq!(
            a.send(TabernaId(10), APP, Bytes::from_static(b"r"), opts())
                .await
                .expect("before"),
            Delivery::Replied(Bytes::from_static(b"ok").into())
        );
        let crl = mesh
            .ca()
            .crl(&[&a_leaf], SystemTime::now() + Duration::from_secs(3600))
            .expect("crl");
        b.reload_auth(
            mesh.ca()
                .auth_config(&b_leaf)
                .expect("auth")
                .with_crls(vec![crl]),
        )
        .expect("reload with CRL");
        // The live callis from the revoked peer is closed within a second...
        let started = Instant::now();
        while b.reporting().connected_peers().contains(a.identity()) {
            assert!(
                started.elapsed() < Duration::from_secs(1),
                "the revoked peer is still connected"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let closed = b.reporting().errors_since(0, 100);
        assert!(
            closed
                .errors
                .iter()
                .any(|x| x.error.message().contains("no longer trusted")
                    && x.error.message().contains("revoked")),
            "{closed:?}"
        );
        // ... and its later sends fail (with the refusal itself once a dial was refused).
        let e = a
            .send(
                TabernaId(10),
                APP,
                Bytes::from_static(b"r"),
                opts().timeout(Duration::from_secs(3)),
            )
            .await
            .expect_err("a revoked peer cannot send");
        assert!(
            matches!(
                e.id(),
                ErrorId::CertificateRefusedByPeer | ErrorId::PeerUnavailable | ErrorId::SendTimeout
            ),
            "{e}"
        );
        let seq = b.reporting().last_error_seq();
        let e = a
            .transport()
            .dial(&addr_of(&b), Some(b.identity()))
            .await
            .expect_err("revoked at the next handshake");
        assert!(
            matches!(
                e.id(),
                ErrorId::CertificateRefusedByPeer | ErrorId::HandshakeFailed
            ),
            "{e}"
        );
        // b says why, on its error feed and in its metrics.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let since = b.reporting().errors_since(seq, 10);
            if let Some(x) = since
                .errors
                .iter()
                .find(|x| x.error.message().contains("revoked"))
            {
                assert_eq!(x.error.id(), ErrorId::PeerCertificateRejected);
                break;
            }
            assert!(Instant::now() < deadline, "no revocation error: {since:?}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let refused = b
            .reporting()
            .snapshot()
            .handshake_failures_by
            .get(&ErrorId::PeerCertificateRejected)
            .copied()
            .unwrap_or(0);
        assert!(refused >= 1, "{refused}");
    })
    .await;
}

#[tokio::test]
async fn t02_a_peer_whose_certificate_expires_under_an_open_callis_is_cut_off() {
    within(async {
        let mut mesh = Mesh::new().expect("mesh");
        // a's certificate runs out a few seconds from now (rcgen keeps whole seconds).
        let mut spec = vicus::dev_certs::LeafSpec::domus("a");
        spec.not_after = SystemTime::now() + Duration::from_secs(4);
        let a_leaf = mesh.ca().leaf_with(&spec).expect("mint");
        let auth = mesh.ca().auth_config(&a_leaf).expect("auth");
        let a = mesh.builder_for(auth).build().await.expect("domus");
        let mut config = Mesh::test_config();
        config.peer_recheck_interval = Some(Duration::from_millis(200));
        let b_leaf = mesh.ca().leaf("b").expect("mint");
        let auth = mesh.ca().auth_config(&b_leaf).expect("auth");
        let b = mesh
            .builder_for(auth)
            .config(config)
            .build()
            .await
            .expect("domus");
        mesh.route(TabernaId(10), &b).expect("route");
        spawn_worker(b.taberna(TabernaId(10)).expect("taberna"));
        assert_eq!(
            a.send(TabernaId(10), APP, Bytes::from_static(b"r"), opts())
                .await
                .expect("while valid"),
            Delivery::Replied(Bytes::from_static(b"ok").into())
        );
        assert!(b.reporting().connected_peers().contains(a.identity()));
        // The callis stays open past the certificate's end only until b's next check.
        let expires = spec.not_after;
        let deadline = expires + Duration::from_secs(2);
        while b.reporting().connected_peers().contains(a.identity()) {
            assert!(
                SystemTime::now() < deadline,
                "the peer is still connected 2 s after its certificate expired"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(
            SystemTime::now() + Duration::from_secs(1) >= expires,
            "closed before the certificate expired"
        );
        let feed = b.reporting().errors_since(0, 100);
        assert!(
            feed.errors.iter().any(|x| {
                let m = x.error.message();
                m.contains("no longer trusted") && m.contains("expired")
            }),
            "{feed:?}"
        );
        // Its next handshake is refused, so a's send fails with the refusal.
        let e = a
            .send(TabernaId(10), APP, Bytes::from_static(b"r"), opts())
            .await
            .expect_err("an expired peer cannot send");
        assert_eq!(e.id(), ErrorId::CertificateRefusedByPeer, "{e}");
    })
    .await;
}

/// The scripted exchange of the two counter tests: from `a` to `b`, one message accepted,
/// one replied to, one rejected by the handler, one to a taberna `b` does not have, one to a
/// taberna whose allow-list excludes `a`, and a 100 KiB blob.
async fn scripted_exchange(mesh: &Mesh, a: &Domus, b: &Domus) {
    mesh.route(TabernaId(10), b).expect("route");
    mesh.route(TabernaId(11), b).expect("route");
    mesh.route(TabernaId(12), b).expect("route");
    let t = b.taberna(TabernaId(10)).expect("taberna");
    let _closed = b
        .taberna_with(
            TabernaId(12),
            TabernaOptions::default().allowed_peers([id("someone-else")]),
        )
        .expect("taberna");
    let handler = tokio::spawn(async move {
        for _ in 0..4 {
            let mut req = t.recv().await.expect("request");
            match req.payload().as_ref() {
                b"accept" => req.accept(),
                b"reply" => req.reply(Bytes::from_static(b"the reply")),
                b"reject" => req.reject(7, "no"),
                b"blob" => {
                    let mut rx = req.blob().expect("a blob");
                    req.accept();
                    let mut all = Vec::new();
                    rx.read_to_end(&mut all).await.expect("blob read");
                    assert_eq!(all.len(), 100 * 1024);
                }
                other => panic!("unexpected {other:?}"),
            }
        }
    });
    let send = |taberna: u64, payload: &'static [u8]| {
        a.send(
            TabernaId(taberna),
            APP,
            Bytes::from_static(payload),
            opts().timeout(Duration::from_secs(5)),
        )
    };
    assert_eq!(send(10, b"accept").await, Ok(Delivery::Accepted));
    assert!(matches!(send(10, b"reply").await, Ok(Delivery::Replied(_))));
    let rejected = send(10, b"reject").await.expect_err("rejected");
    assert_eq!(rejected.id(), ErrorId::RemoteTabernaRejected);
    let unknown = send(11, b"x").await.expect_err("unknown");
    assert_eq!(unknown.id(), ErrorId::UnknownTaberna);
    let forbidden = send(12, b"x").await.expect_err("forbidden");
    assert_eq!(forbidden.id(), ErrorId::Forbidden);
    let mut blob = a
        .send_blob(
            TabernaId(10),
            APP,
            Bytes::from_static(b"blob"),
            opts().timeout(Duration::from_secs(5)),
        )
        .await
        .expect("blob opened");
    blob.write_all(&vec![9u8; 100 * 1024])
        .await
        .expect("blob write");
    blob.finish().await.expect("blob finished");
    handler.await.expect("handler");
}

/// Snapshots of both sides once neither changes for 100 ms (keepalive pings and acks have
/// settled).
async fn settled(a: &Domus, b: &Domus) -> (vicus::reporting::Snapshot, vicus::reporting::Snapshot) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut last = (a.reporting().snapshot(), b.reporting().snapshot());
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = (a.reporting().snapshot(), b.reporting().snapshot());
        let same = |x: &vicus::reporting::Snapshot, y: &vicus::reporting::Snapshot| {
            x.totals == y.totals && x.per_peer == y.per_peer
        };
        if same(&now.0, &last.0) && same(&now.1, &last.1) {
            return now;
        }
        assert!(Instant::now() < deadline, "the counters never settled");
        last = now;
    }
}

#[tokio::test]
async fn received_counts_only_what_reached_a_taberna_and_refusals_are_counted_by_reason() {
    within(async {
        let mut mesh = Mesh::new().expect("mesh");
        let a = mesh.domus("a").await.expect("domus");
        let b = mesh.domus("b").await.expect("domus");
        scripted_exchange(&mesh, &a, &b).await;
        let (sa, sb) = settled(&a, &b).await;
        let (ca, cb) = (&sa.totals, &sb.totals);
        // The sender: six messages (the blob's opening one included), each answered.
        assert_eq!(ca.messages_sent, 6, "{ca:?}");
        assert_eq!(ca.messages_accepted, 2, "accept and the blob's opening");
        assert_eq!(ca.messages_replied, 1);
        assert_eq!(ca.messages_rejected, 3, "{:?}", sa.rejected_by);
        assert_eq!(
            sa.rejected_by.into_iter().collect::<Vec<_>>(),
            vec![
                (ErrorId::UnknownTaberna, 1),
                (ErrorId::RemoteTabernaRejected, 1),
                (ErrorId::Forbidden, 1),
            ]
        );
        assert_eq!((ca.messages_received, ca.messages_refused), (0, 0));
        // The receiver: four reached the taberna; two were refused before any handler.
        assert_eq!(cb.messages_received, 4, "{cb:?}");
        assert_eq!(cb.messages_refused, 2, "{cb:?}");
        assert_eq!(
            sb.refused_by.into_iter().collect::<Vec<_>>(),
            vec![(ErrorId::UnknownTaberna, 1), (ErrorId::Forbidden, 1)]
        );
        assert_eq!(cb.messages_sent, 0);
        assert_eq!(cb.messages_rejected, 0, "b sent nothing that was rejected");
        assert_eq!((cb.blob_streams_opened, cb.blob_streams_completed), (1, 1));
    })
    .await;
}

#[tokio::test]
async fn every_byte_written_on_a_callis_is_counted_as_read_on_the_other_end() {
    within(async {
        let mut mesh = Mesh::new().expect("mesh");
        let a = mesh.domus("a").await.expect("domus");
        let b = mesh.domus("b").await.expect("domus");
        scripted_exchange(&mesh, &a, &b).await;
        let (sa, sb) = settled(&a, &b).await;
        let (ca, cb) = (&sa.totals, &sb.totals);
        assert!(ca.primary_bytes_out > 0 && ca.blob_bytes_out > 100 * 1024);
        assert_eq!(ca.primary_bytes_out, cb.primary_bytes_in, "a→b primary");
        assert_eq!(cb.primary_bytes_out, ca.primary_bytes_in, "b→a primary");
        assert_eq!(ca.blob_bytes_out, cb.blob_bytes_in, "a→b blob");
        assert_eq!(cb.blob_bytes_out, ca.blob_bytes_in, "b→a blob");
        let peer = |s: &vicus::reporting::Snapshot, who: &Domus| {
            s.per_peer
                .iter()
                .find(|p| &p.peer == who.identity())
                .cloned()
                .expect("a peer report")
        };
        let (a_of_b, b_of_a) = (peer(&sa, &b), peer(&sb, &a));
        assert_eq!(a_of_b.bytes_out, b_of_a.bytes_in, "a→b per peer");
        assert_eq!(b_of_a.bytes_out, a_of_b.bytes_in, "b→a per peer");
        assert_eq!(
            a_of_b.bytes_out,
            ca.primary_bytes_out + ca.blob_bytes_out,
            "a talks to b only"
        );
    })
    .await;
}

#[tokio::test]
async fn t29_a_chain_its_own_trust_anchors_do_not_verify_is_refused_at_build_and_reload() {
    within(async {
        let mut mesh = Mesh::new().expect("mesh");
        let mut other = ca_named("another CA");
        // a's identity with a key that matches, but signed by a CA a does not trust.
        let stranger = other.leaf("a").expect("mint");
        let e = Domus::builder(auth_trusting(mesh.ca(), &stranger))
            .build()
            .await
            .expect_err("the builder verifies the domus's own chain");
        assert_eq!(e.id(), ErrorId::InvalidAuthMaterial, "{e}");
        assert!(e.message().contains("trust anchors"), "{e}");

        let a = mesh.domus("a").await.expect("domus");
        let b = mesh.domus("b").await.expect("domus");
        mesh.route(TabernaId(10), &b).expect("route");
        mesh.route(TabernaId(20), &a).expect("route");
        spawn_worker(b.taberna(TabernaId(10)).expect("taberna"));
        spawn_worker(a.taberna(TabernaId(20)).expect("taberna"));
        let mut events = a.reporting().events();
        let seq = a.reporting().last_error_seq();
        let e = a
            .reload_auth(auth_trusting(mesh.ca(), &stranger))
            .expect_err("reload_auth verifies the new chain");
        assert_eq!(e.id(), ErrorId::InvalidAuthMaterial, "{e}");
        assert!(e.message().contains("trust anchors"), "{e}");
        let e = a
            .transport()
            .reload_auth(auth_trusting(mesh.ca(), &stranger))
            .expect_err("so does the transport's");
        assert_eq!(e.id(), ErrorId::InvalidAuthMaterial, "{e}");
        while let Some(item) = events.try_recv() {
            assert_ne!(
                item,
                FeedItem::Item(Event::AuthReloaded),
                "nothing reloaded"
            );
        }
        assert!(!a.reporting().errors_since(seq, 10).errors.is_empty());
        // The old material stays: new calles both ways still handshake.
        for (from, to) in [(&a, 10), (&b, 20)] {
            from.send(
                TabernaId(to),
                APP,
                Bytes::from_static(b"still here"),
                opts().timeout(Duration::from_secs(5)),
            )
            .await
            .expect("the old material still serves");
        }
        let probe = transport(mesh.ca(), "probe");
        probe
            .dial(&addr_of(&a), Some(a.identity()))
            .await
            .expect("a fresh handshake with a still works");
    })
    .await;
}
