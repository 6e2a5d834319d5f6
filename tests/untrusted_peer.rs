//! An authenticated peer is still untrusted input: hand-written peers with valid certificates
//! over real mutual TLS on loopback that re-send answered ids (T31), announce limits we must
//! not trust or must fit (T32), stop reading (T33), or send A2 message types to application
//! tabernas. Test names carry the threat they cover (../shared/THREATS.md).

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use common::*;
use vicus::a1_callis::codes::WireCode;
use vicus::a1_callis::frame::{self, Frame};
use vicus::{Delivery, DomusConfig, ErrorId, MessageType, SendOptions, TabernaId};

const APP: MessageType = MessageType::app(7);

/// Quick redials; the rest default.
fn fast() -> DomusConfig {
    let mut c = DomusConfig::default();
    c.reconnect_backoff_min = Duration::from_millis(10);
    c.reconnect_backoff_max = Duration::from_millis(200);
    c
}

/// Echoes every request's payload back on `t`.
fn spawn_echo(t: vicus::Taberna) {
    tokio::spawn(async move {
        while let Some(req) = t.recv().await {
            let payload = req.payload().clone();
            req.reply(payload);
        }
    });
}

/// Round trips of `n` small requests from `from` to taberna 10 on `to`; each one's time.
async fn round_trips(from: &vicus::Domus, to: &vicus::Domus, n: usize) -> Vec<Duration> {
    let _ = to;
    let dest = from.destination(TabernaId(10));
    let mut times = Vec::with_capacity(n);
    for _ in 0..n {
        let start = Instant::now();
        let answer = dest
            .send(APP, Bytes::from_static(b"ping"))
            .await
            .expect("a good peer's request is answered");
        assert_eq!(
            answer,
            Delivery::Replied(Bytes::from_static(b"ping").into())
        );
        times.push(start.elapsed());
    }
    times
}

fn p99(mut times: Vec<Duration>) -> Duration {
    times.sort_unstable();
    let i = (times.len() * 99 / 100).min(times.len() - 1);
    times[i]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t31_thirty_thousand_duplicates_of_a_1_mib_answer_cost_little_and_close_only_that_callis() {
    within(async {
        let mut mesh = Mesh::new().expect("mesh");
        let victim = mesh.domus_with("victim", fast()).await.expect("victim");
        spawn_echo(victim.taberna(TabernaId(10)).expect("taberna"));
        let good = mesh.domus_with("good", fast()).await.expect("good");
        mesh.route(TabernaId(10), &victim).expect("route");
        let baseline = p99(round_trips(&good, &victim, 200).await);

        // The attacker: one 1 MiB echo, read in full.
        let evil = transport(mesh.ca(), "evil");
        let mut raw = RawPeer::connect(&evil, &victim, 77, 8192, 4 << 20).await;
        let mut out = BytesMut::new();
        let big = vec![0x5Au8; (1 << 20) - 64];
        frame::encode_message(&mut out, 1, 10, 0, APP.0, &big);
        raw.write(&out).await.expect("write");
        let reply = raw
            .read_until(|f| matches!(f, Frame::Reply { id: 1, .. }))
            .await
            .expect("the echo");
        let Frame::Reply { payload, .. } = reply else {
            unreachable!()
        };
        assert_eq!(payload.len(), big.len());
        let violations_before = victim.reporting().snapshot().totals.protocol_violations;
        let rss_before = rss_bytes();

        // Then 30,000 duplicates of its id in one write, never reading again, while the good
        // peer keeps sending.
        let mut dups = BytesMut::new();
        for _ in 0..30_000 {
            frame::encode_message(&mut dups, 1, 10, 0, APP.0, b"");
        }
        let attack = tokio::spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(10), raw.write(&dups)).await;
            raw
        });
        let during = round_trips(&good, &victim, 200).await;
        assert!(
            eventually(Duration::from_secs(10), || {
                victim.reporting().snapshot().totals.protocol_violations > violations_before
            })
            .await,
            "the attacker's callis is closed as a violation"
        );
        let grown = rss_bytes().saturating_sub(rss_before);
        let _raw = attack.await.expect("attack task");
        let during = p99(during);
        println!(
            "T31: RSS grew {} KiB; good peer p99 {baseline:?} before, {during:?} during",
            grown / 1024
        );
        assert!(grown < 16 << 20, "the victim grew by {grown} bytes");
        assert_eq!(
            victim.reporting().snapshot().totals.protocol_violations,
            violations_before + 1,
            "one closed callis, one violation"
        );
        // Generous: this machine is shared; the point is that the good peer is not starved.
        assert!(
            during <= (baseline * 20).max(Duration::from_millis(500)),
            "p99 {during:?} during the attack, {baseline:?} before"
        );
        // The good peer is still served after it.
        round_trips(&good, &victim, 10).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t33_a_peer_that_pings_and_never_reads_is_cut_off_and_its_messages_replay_once() {
    within(async {
        let mut mesh = Mesh::new().expect("mesh");
        let mut config = fast();
        config.keepalive_interval = Duration::from_millis(250);
        config.idle_timeout = Duration::from_secs(1);
        let victim = mesh.domus_with("victim", config).await.expect("victim");
        let evil = transport(mesh.ca(), "evil");
        let evil_id = evil.local_id();
        let mut raw = RawPeer::connect(&evil, &victim, 77, 8192, 4 << 20).await;
        assert!(
            eventually(Duration::from_secs(5), || victim
                .reporting()
                .connected_peers()
                .contains(&evil_id))
            .await
        );
        // The peer keeps writing PINGs (so it is never read-idle) and reads nothing.
        let pinger = tokio::spawn(async move {
            for nonce in 0u64.. {
                let mut ping = BytesMut::new();
                frame::encode_ping(&mut ping, nonce);
                if raw.write(&ping).await.is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        // The victim has 32 MiB for it: far more than the socket buffers hold.
        let dest = victim.destination_on(&evil_id, TabernaId(5));
        let start = Instant::now();
        let sends: Vec<_> = (0..512u32)
            .map(|n| {
                let dest = dest.clone();
                tokio::spawn(async move {
                    let mut payload = vec![0u8; 64 * 1024];
                    payload[..4].copy_from_slice(&n.to_be_bytes());
                    dest.send_with(
                        APP,
                        Bytes::from(payload),
                        SendOptions::default().timeout(Duration::from_secs(25)),
                    )
                    .await
                })
            })
            .collect();
        let closed = victim.reporting().snapshot().totals.primary_calles_closed;
        assert!(
            eventually(Duration::from_secs(10), || {
                victim.reporting().snapshot().totals.primary_calles_closed > closed
            })
            .await,
            "the callis of a peer that reads nothing is closed"
        );
        let cut_after = start.elapsed();
        println!("T33: cut off {cut_after:?} after the sends started (idle_timeout 1 s)");
        assert!(cut_after < Duration::from_secs(8), "{cut_after:?}");
        pinger.abort();

        // The same peer (same run) comes back and reads: every message is delivered once.
        let mut raw = RawPeer::connect(&evil, &victim, 77, 8192, 4 << 20).await;
        let mut seen = std::collections::BTreeSet::new();
        let mut ids = std::collections::BTreeSet::new();
        while seen.len() < 512 {
            let batch = raw.read_messages().await.expect("the replayed messages");
            for m in batch {
                let n = u32::from_be_bytes(m.payload[..4].try_into().expect("4 bytes"));
                assert!(seen.insert(n), "message {n} delivered twice");
                assert!(ids.insert(m.id), "id {} twice", m.id);
                let mut out = BytesMut::new();
                frame::encode_accepted(&mut out, &[m.id]);
                raw.write(&out).await.expect("answer");
            }
        }
        for send in sends {
            let outcome = send.await.expect("task");
            assert_eq!(outcome.expect("accepted"), Delivery::Accepted);
        }
    })
    .await;
}

/// Five thousand pipelined sends through one window, all answered once, with no violation
/// and no second callis, at `max_message_len`.
async fn pipelined_at(max_message_len: usize) {
    let mut mesh = Mesh::new().expect("mesh");
    let mut config = fast();
    config.max_message_len = max_message_len;
    config.max_in_flight_per_peer = 5000;
    config.max_in_flight_bytes_per_peer = 64 << 20;
    config.default_inbox_depth = 5000;
    let a = mesh.domus_with("a", config.clone()).await.expect("a");
    let b = mesh.domus_with("b", config).await.expect("b");
    let t = b.taberna(TabernaId(10)).expect("taberna");
    mesh.route(TabernaId(10), &b).expect("route");
    let received = Arc::new(AtomicU64::new(0));
    let counter = received.clone();
    tokio::spawn(async move {
        while let Some(req) = t.recv().await {
            counter.fetch_add(1, Ordering::Relaxed);
            if req.payload().first() == Some(&1) {
                req.reject(9, &"why ".repeat(100));
            } else {
                req.accept();
            }
        }
    });
    let mut window = a.destination(TabernaId(10)).window(5000);
    let payload = if max_message_len == 0 {
        Bytes::new()
    } else {
        Bytes::from(vec![0u8; max_message_len])
    };
    for _ in 0..5000 {
        assert!(
            window
                .send(APP, payload.clone())
                .await
                .expect("admitted")
                .is_none()
        );
    }
    let outcomes = window.drain().await;
    assert_eq!(outcomes.len(), 5000);
    for outcome in outcomes {
        assert_eq!(outcome.expect("accepted"), Delivery::Accepted);
    }
    assert_eq!(
        received.load(Ordering::Relaxed),
        5000,
        "each delivered once"
    );
    // Rejections with long reasons fit too (cut to what the frame limit leaves).
    if max_message_len > 0 {
        let mut window = a.destination(TabernaId(10)).window(100);
        let mut reject = vec![0u8; max_message_len];
        reject[0] = 1;
        for _ in 0..100 {
            window
                .send(APP, Bytes::from(reject.clone()))
                .await
                .expect("admitted");
        }
        for outcome in window.drain().await {
            let e = outcome.expect_err("rejected");
            assert_eq!(e.id(), ErrorId::RemoteTabernaRejected, "{e}");
        }
    }
    for d in [&a, &b] {
        let totals = d.reporting().snapshot().totals;
        assert_eq!(totals.protocol_violations, 0);
        assert_eq!(totals.primary_calles_opened, 1, "no callis was replaced");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t32_five_thousand_pipelined_sends_at_max_message_len_1000_are_accepted_once() {
    within(pipelined_at(1000)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t32_five_thousand_pipelined_sends_at_the_smallest_max_message_len_are_accepted_once() {
    within(pipelined_at(0)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t32_rejections_with_long_reasons_reach_a_sender_with_the_smallest_frame_limit() {
    within(async {
        let mut mesh = Mesh::new().expect("mesh");
        let mut small = fast();
        small.max_message_len = 0;
        let a = mesh.domus_with("a", small).await.expect("a");
        let b = mesh.domus_with("b", fast()).await.expect("b");
        let t = b.taberna(TabernaId(10)).expect("taberna");
        mesh.route(TabernaId(10), &b).expect("route");
        tokio::spawn(async move {
            while let Some(req) = t.recv().await {
                req.reject(9, &"a long reason ".repeat(20));
            }
        });
        let mut window = a.destination(TabernaId(10)).window(10);
        for _ in 0..10 {
            window.send(APP, Bytes::new()).await.expect("admitted");
        }
        for outcome in window.drain().await {
            let e = outcome.expect_err("rejected");
            assert_eq!(e.id(), ErrorId::RemoteTabernaRejected, "{e}");
        }
        for d in [&a, &b] {
            assert_eq!(d.reporting().snapshot().totals.protocol_violations, 0);
        }
    })
    .await;
}

#[tokio::test]
async fn a2_message_types_to_an_application_taberna_are_refused_by_the_receiver() {
    within(async {
        let mut mesh = Mesh::new().expect("mesh");
        let victim = mesh.domus_with("victim", fast()).await.expect("victim");
        let t = victim.taberna(TabernaId(10)).expect("taberna");
        let evil = transport(mesh.ca(), "evil");
        let mut raw = RawPeer::connect(&evil, &victim, 77, 8192, 1 << 20).await;
        let mut out = BytesMut::new();
        // The reporting service's type, the top of the A2 range, then an A3 one.
        frame::encode_message(&mut out, 1, 10, 0, 0x0001_0001, b"report?");
        frame::encode_message(&mut out, 2, 10, 0, 0x00FF_FFFF, b"service?");
        frame::encode_message(&mut out, 3, 10, 0, APP.0, b"app");
        raw.write(&out).await.expect("write");
        for id in [1, 2] {
            let f = raw
                .read_until(|f| matches!(f, Frame::Reject(r) if r.id == id))
                .await
                .expect("a rejection");
            let Frame::Reject(r) = f else { unreachable!() };
            assert_eq!(r.error, WireCode::of(ErrorId::InvalidMessageType), "{r:?}");
        }
        // Only the application's message reaches the handler.
        let req = tokio::time::timeout(Duration::from_secs(5), t.recv())
            .await
            .expect("a request")
            .expect("open");
        assert_eq!(req.message_type(), APP);
        req.accept();
        raw.read_until(|f| matches!(f, Frame::Accepted(ids) if ids.iter().any(|i| i == 3)))
            .await
            .expect("accepted");
        assert!(t.try_recv().is_none(), "nothing else was delivered");
        let snap = victim.reporting().snapshot();
        assert_eq!(
            snap.refused_by.get(&ErrorId::InvalidMessageType),
            Some(&2),
            "{:?}",
            snap.refused_by
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t33_a_peer_that_never_reads_its_blob_callis_loses_it() {
    use tokio::io::AsyncWriteExt;
    within(async {
        let mut mesh = Mesh::new().expect("mesh");
        let mut config = fast();
        config.blob_idle_timeout = Duration::from_secs(1);
        let victim = mesh.domus_with("victim", config).await.expect("victim");
        let evil = transport(mesh.ca(), "evil");
        let evil_id = evil.local_id();
        let mut primary = RawPeer::connect(&evil, &victim, 77, 8192, 4 << 20).await;
        // The peer's blob callis: BLOB_HELLO, then it reads nothing more on it.
        let mut blob = evil
            .dial(&addr_of(&victim), Some(victim.identity()))
            .await
            .expect("dial");
        let mut hello = BytesMut::new();
        frame::encode_blob_hello(&mut hello, frame::PROTOCOL_VERSION, 77, 1 << 20);
        blob.write_all(&hello).await.expect("BLOB_HELLO");
        assert!(
            eventually(Duration::from_secs(5), || {
                victim.reporting().snapshot().blob_calles.current == 1
            })
            .await
        );
        // The victim streams a blob to the peer, which accepts it and grants plenty of credit.
        mesh.resolver().insert(
            TabernaId(5),
            vicus::DomusAddr::tcp(([127, 0, 0, 1], 9)),
            Some(evil_id.clone()),
        );
        let sender = {
            let victim = victim.clone();
            tokio::spawn(async move {
                let mut tx = victim
                    .send_blob(TabernaId(5), APP, Bytes::new(), SendOptions::default())
                    .await?;
                let chunk = vec![7u8; 1 << 20];
                for _ in 0..64 {
                    tx.write_all(&chunk)
                        .await
                        .map_err(|e| vicus::Error::new(ErrorId::Io, e.to_string()))?;
                }
                Ok::<_, vicus::Error>(())
            })
        };
        let m = primary
            .read_messages()
            .await
            .and_then(|batch| batch.into_iter().next())
            .expect("the blob's opening message");
        let stream = u64::from_be_bytes(m.payload[..8].try_into().expect("stream id"));
        let mut out = BytesMut::new();
        frame::encode_accepted(&mut out, &[m.id]);
        primary.write(&out).await.expect("accept");
        let mut credit = BytesMut::new();
        frame::encode_blob_credit(&mut credit, stream, 0, 1 << 30);
        blob.write_all(&credit).await.expect("credit");
        let closed = victim.reporting().snapshot().totals.blob_calles_closed;
        let start = Instant::now();
        assert!(
            eventually(Duration::from_secs(10), || {
                victim.reporting().snapshot().totals.blob_calles_closed > closed
            })
            .await,
            "the blob callis of a peer that reads nothing is dropped"
        );
        println!("T33 blob: dropped {:?} after the credit", start.elapsed());
        // The stream itself fails (nothing moved for blob_idle_timeout), it does not hang.
        let result = tokio::time::timeout(Duration::from_secs(10), sender)
            .await
            .expect("the sender ends")
            .expect("task");
        assert!(result.is_err(), "{result:?}");
    })
    .await;
}
