//! Blobs between domus over real loopback mTLS: round trips, flow control, cancellation,
//! reconnects, limits, and a hand-crafted peer that breaks the rules. Test names carry the
//! threat they cover (../shared/THREATS.md).

mod common;

use std::hash::{DefaultHasher, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use vicus::a1_callis::codes::WireCode;
use vicus::a1_callis::frame::{self, BlobFrame, Frame, Hello};
use vicus::{
    BlobReceiver, BlobSender, Domus, DomusAddr, DomusConfig, ErrorId, MessageType, SendOptions,
    TabernaId, TabernaRequest,
};

const APP: MessageType = MessageType::app(7);

/// Defaults with quick reconnects.
fn fast() -> DomusConfig {
    let mut c = DomusConfig::default();
    c.reconnect_backoff_min = Duration::from_millis(10);
    c.reconnect_backoff_max = Duration::from_millis(200);
    c
}

/// Small chunks and windows, so tests cross many boundaries with little data.
fn small() -> DomusConfig {
    let mut c = fast();
    c.blob_chunk_len = 1024;
    c.blob_window = 8 * 1024;
    c
}

/// Deterministic pseudo-random bytes.
fn data(len: usize, seed: u64) -> Bytes {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let take = (len - out.len()).min(8);
        out.extend_from_slice(&x.to_le_bytes()[..take]);
    }
    Bytes::from(out)
}

fn hash(bytes: &[u8]) -> u64 {
    let mut h = DefaultHasher::new();
    h.write(bytes);
    h.finish()
}

async fn open(a: &Domus, taberna: u64) -> Result<BlobSender, vicus::Error> {
    a.send_blob(
        TabernaId(taberna),
        APP,
        Bytes::from_static(b"header"),
        SendOptions::default().timeout(Duration::from_secs(10)),
    )
    .await
}

/// Accepts the next request on `t` and returns its blob receiver.
async fn accept_blob(t: &vicus::Taberna) -> BlobReceiver {
    let mut req: TabernaRequest = t.recv().await.expect("request");
    assert_eq!(req.payload().as_ref(), b"header");
    assert_eq!(req.message_type(), APP);
    let rx = req.blob().expect("a blob");
    req.accept();
    rx
}

/// Opens a blob from `a` to taberna 10 while `t` accepts it.
async fn open_pair(a: &Domus, t: &vicus::Taberna) -> (BlobSender, BlobReceiver) {
    let (tx, rx) = tokio::join!(open(a, 10), accept_blob(t));
    (tx.expect("opened"), rx)
}

/// Sends `payload` as one blob (writes of 64 KiB) and finishes.
async fn send_all(mut tx: BlobSender, payload: Bytes) -> Result<(), vicus::Error> {
    for piece in payload.chunks(64 * 1024) {
        tx.write_all(piece)
            .await
            .map_err(|e| vicus::Error::new(ErrorId::Io, e.to_string()))?;
    }
    tx.finish().await
}

#[tokio::test]
async fn a_64_mib_random_blob_round_trips_intact_and_the_receiver_knows_the_sender() {
    within(async {
        let mut mesh = Mesh::new().expect("mesh");
        let a = mesh.domus("a").await.expect("domus");
        let b = mesh.domus("b").await.expect("domus");
        mesh.route(TabernaId(10), &b).expect("route");
        let t = b.taberna(TabernaId(10)).expect("taberna");
        let payload = data(64 << 20, 1);
        let expected = hash(&payload);
        let reader = tokio::spawn(async move {
            let mut req = t.recv().await.expect("request");
            let who = req.peer().id().clone();
            let mut rx = req.blob().expect("blob");
            req.accept();
            let mut got = Vec::with_capacity(64 << 20);
            rx.read_to_end(&mut got).await.expect("read");
            (who, got)
        });
        let tx = open(&a, 10).await.expect("opened");
        send_all(tx, payload.clone()).await.expect("sent");
        let (who, got) = reader.await.expect("join");
        assert_eq!(&who, a.identity());
        assert_eq!(got.len(), payload.len());
        assert_eq!(hash(&got), expected);
    })
    .await;
}

#[tokio::test]
async fn empty_blobs_and_sizes_around_chunk_and_window_boundaries_round_trip() {
    within(async {
        let mut mesh = Mesh::new().expect("mesh");
        let a = mesh.domus_with("a", small()).await.expect("domus");
        let b = mesh.domus_with("b", small()).await.expect("domus");
        mesh.route(TabernaId(10), &b).expect("route");
        let t = b.taberna(TabernaId(10)).expect("taberna");
        for (i, len) in [0usize, 1, 1023, 1024, 1025, 2048, 8191, 8192, 8193, 50_000]
            .into_iter()
            .enumerate()
        {
            let payload = data(len, i as u64);
            let (tx, mut rx) = open_pair(&a, &t).await;
            let sent = tokio::spawn(send_all(tx, payload.clone()));
            let mut got = Vec::new();
            rx.read_to_end(&mut got).await.expect("read");
            sent.await.expect("join").expect("finish");
            assert!(got == payload, "size {len}");
        }
    })
    .await;
}

#[tokio::test]
async fn sixteen_concurrent_blobs_to_one_peer_all_complete_intact() {
    within(async {
        let mut mesh = Mesh::new().expect("mesh");
        let a = mesh.domus("a").await.expect("domus");
        let b = mesh.domus("b").await.expect("domus");
        mesh.route(TabernaId(10), &b).expect("route");
        let t = b.taberna(TabernaId(10)).expect("taberna");
        let receivers = tokio::spawn(async move {
            let mut readers = Vec::new();
            for _ in 0..16 {
                let mut req = t.recv().await.expect("request");
                let seed = req.payload().clone();
                let mut rx = req.blob().expect("blob");
                req.accept();
                readers.push(tokio::spawn(async move {
                    let mut got = Vec::new();
                    rx.read_to_end(&mut got).await.expect("read");
                    (seed, hash(&got), got.len())
                }));
            }
            let mut out = Vec::new();
            for r in readers {
                out.push(r.await.expect("join"));
            }
            out
        });
        let mut senders = Vec::new();
        for i in 0..16u64 {
            let a = a.clone();
            senders.push(tokio::spawn(async move {
                let payload = data(1_000_000 + i as usize * 7919, i);
                let tx = a
                    .send_blob(
                        TabernaId(10),
                        APP,
                        Bytes::copy_from_slice(&i.to_be_bytes()),
                        SendOptions::default(),
                    )
                    .await
                    .expect("opened");
                send_all(tx, payload.clone()).await.expect("sent");
                (i, hash(&payload), payload.len())
            }));
        }
        let mut sent = Vec::new();
        for s in senders {
            sent.push(s.await.expect("join"));
        }
        let got = receivers.await.expect("join");
        assert_eq!(got.len(), 16);
        for (seed, h, len) in got {
            let i = u64::from_be_bytes(seed[..8].try_into().expect("8 bytes"));
            let (_, want_h, want_len) = sent.iter().find(|s| s.0 == i).expect("known");
            assert_eq!((h, len), (*want_h, *want_len), "blob {i}");
        }
    })
    .await;
}

#[tokio::test]
async fn a_reader_taking_one_chunk_per_10_ms_slows_the_sender_and_the_transfer_completes() {
    within(async {
        let mut config = fast();
        config.blob_chunk_len = 16 * 1024;
        config.blob_window = 64 * 1024;
        let window = config.blob_window as u64;
        let mut mesh = Mesh::new().expect("mesh");
        let a = mesh.domus_with("a", config.clone()).await.expect("domus");
        let b = mesh.domus_with("b", config).await.expect("domus");
        mesh.route(TabernaId(10), &b).expect("route");
        let t = b.taberna(TabernaId(10)).expect("taberna");
        let consumed = Arc::new(AtomicU64::new(0));
        let seen = consumed.clone();
        let total = 1 << 20;
        let reader = tokio::spawn(async move {
            let mut rx = accept_blob(&t).await;
            let mut got = Vec::new();
            while let Some(chunk) = futures_next(&mut rx).await {
                let chunk = chunk.expect("chunk");
                got.extend_from_slice(&chunk);
                seen.fetch_add(chunk.len() as u64, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            got
        });
        let payload = data(total, 5);
        let mut tx = open(&a, 10).await.expect("opened");
        let mut written = 0u64;
        let mut max_ahead = 0u64;
        for piece in payload.chunks(4096) {
            tx.write_all(piece).await.expect("write");
            written += piece.len() as u64;
            let ahead = written.saturating_sub(consumed.load(Ordering::SeqCst));
            max_ahead = max_ahead.max(ahead);
        }
        tx.finish().await.expect("finish");
        let got = reader.await.expect("join");
        assert!(got == payload);
        // The sender holds at most one window (queued and unacknowledged) and the receiver
        // at most one window past what its application consumed.
        assert!(
            max_ahead <= 2 * window + 16 * 1024,
            "the sender ran {max_ahead} bytes ahead of the reader (window {window})"
        );
    })
    .await;
}

/// The next item of a blob receiver's `Stream`.
async fn futures_next(rx: &mut BlobReceiver) -> Option<Result<Bytes, vicus::Error>> {
    std::future::poll_fn(|cx| futures_core::Stream::poll_next(std::pin::Pin::new(&mut *rx), cx))
        .await
}

#[tokio::test]
async fn a_dropped_sender_fails_the_reader_with_a_cancel_error_at_once() {
    within(async {
        let mut mesh = Mesh::new().expect("mesh");
        let a = mesh.domus("a").await.expect("domus");
        let b = mesh.domus("b").await.expect("domus");
        mesh.route(TabernaId(10), &b).expect("route");
        let t = b.taberna(TabernaId(10)).expect("taberna");
        let (mut tx, mut rx) = open_pair(&a, &t).await;
        tx.write_all(&data(100_000, 1)).await.expect("write");
        let mut buf = vec![0u8; 1000];
        rx.read_exact(&mut buf).await.expect("first bytes");
        let dropped = Instant::now();
        drop(tx);
        let err = loop {
            match futures_next(&mut rx).await {
                Some(Ok(_)) => continue,
                Some(Err(e)) => break e,
                None => panic!("a cancelled stream must not end cleanly"),
            }
        };
        assert_eq!(err.id(), ErrorId::BlobCancelled, "{err}");
        assert!(
            dropped.elapsed() < Duration::from_secs(5),
            "took {:?}",
            dropped.elapsed()
        );
    })
    .await;
}

#[tokio::test]
async fn a_dropped_receiver_makes_the_next_write_fail_at_once() {
    within(async {
        let mut mesh = Mesh::new().expect("mesh");
        let a = mesh.domus("a").await.expect("domus");
        let b = mesh.domus("b").await.expect("domus");
        mesh.route(TabernaId(10), &b).expect("route");
        let t = b.taberna(TabernaId(10)).expect("taberna");
        let (mut tx, rx) = open_pair(&a, &t).await;
        tx.write_all(&data(10_000, 1)).await.expect("write");
        let dropped = Instant::now();
        drop(rx);
        let piece = data(64 * 1024, 2);
        let err = loop {
            if let Err(e) = tx.write_all(&piece).await {
                break e;
            }
            assert!(
                dropped.elapsed() < Duration::from_secs(5),
                "writes keep succeeding"
            );
        };
        let inner = err
            .get_ref()
            .and_then(|e| e.downcast_ref::<vicus::Error>())
            .expect("a vicus error inside");
        assert_eq!(inner.id(), ErrorId::BlobCancelled, "{inner}");
        assert!(dropped.elapsed() < Duration::from_secs(5));
    })
    .await;
}

#[tokio::test]
async fn the_blob_callis_cut_mid_transfer_reconnects_and_the_blob_completes_intact() {
    within(async {
        let mut mesh = Mesh::new().expect("mesh");
        let a = mesh.domus("a").await.expect("domus");
        let b = mesh.domus("b").await.expect("domus");
        let DomusAddr::Tcp(b_addr) = addr_of(&b) else {
            panic!("tcp")
        };
        let proxy = FaultProxy::start(b_addr).await.expect("proxy");
        mesh.resolver().insert(
            TabernaId(10),
            DomusAddr::Tcp(proxy.addr()),
            Some(b.identity().clone()),
        );
        let t = b.taberna(TabernaId(10)).expect("taberna");
        let received = Arc::new(AtomicU64::new(0));
        let seen = received.clone();
        let reader = tokio::spawn(async move {
            let mut rx = accept_blob(&t).await;
            let mut got = Vec::new();
            while let Some(chunk) = futures_next(&mut rx).await {
                let chunk = chunk.expect("chunk");
                got.extend_from_slice(&chunk);
                seen.store(got.len() as u64, Ordering::SeqCst);
            }
            got
        });
        let payload = data(32 << 20, 9);
        let tx = open(&a, 10).await.expect("opened");
        let sender = tokio::spawn(send_all(tx, payload.clone()));
        while received.load(Ordering::SeqCst) < 4 << 20 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let before = proxy.total_accepted();
        proxy.cut_all();
        sender.await.expect("join").expect("finish after reconnect");
        let got = reader.await.expect("join");
        assert!(proxy.total_accepted() > before, "a new callis was dialled");
        assert_eq!(got.len(), payload.len());
        assert_eq!(hash(&got), hash(&payload));
    })
    .await;
}

#[tokio::test]
async fn messages_are_answered_promptly_while_a_large_blob_streams() {
    within(async {
        let mut mesh = Mesh::new().expect("mesh");
        let a = mesh.domus("a").await.expect("domus");
        let b = mesh.domus("b").await.expect("domus");
        mesh.route(TabernaId(10), &b).expect("route");
        mesh.route(TabernaId(11), &b).expect("route");
        let t = b.taberna(TabernaId(10)).expect("taberna");
        let echo = b.taberna(TabernaId(11)).expect("taberna");
        tokio::spawn(async move {
            while let Some(req) = echo.recv().await {
                let p = req.payload().clone();
                req.reply(p);
            }
        });
        let reader = tokio::spawn(async move {
            let mut rx = accept_blob(&t).await;
            let mut n = 0usize;
            while let Some(chunk) = futures_next(&mut rx).await {
                n += chunk.expect("chunk").len();
            }
            n
        });
        let tx = open(&a, 10).await.expect("opened");
        let total = 256 << 20;
        let sender = tokio::spawn(send_all(tx, data(total, 3)));
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut worst = Duration::ZERO;
        let mut rounds = 0;
        while !sender.is_finished() && rounds < 500 {
            let start = Instant::now();
            a.send(
                TabernaId(11),
                APP,
                Bytes::from_static(&[7; 64]),
                SendOptions::default(),
            )
            .await
            .expect("answered");
            worst = worst.max(start.elapsed());
            rounds += 1;
        }
        sender.await.expect("join").expect("blob sent");
        assert_eq!(reader.await.expect("join"), total);
        assert!(rounds > 0);
        // Generous: the real figure is in the benchmark (docs/performance.md).
        assert!(
            worst < Duration::from_millis(500),
            "a message took {worst:?} during the blob"
        );
    })
    .await;
}

#[tokio::test]
async fn t22_a_stalled_blob_times_out_on_both_sides_and_releases_its_reservation() {
    within(async {
        let mut config = fast();
        config.blob_idle_timeout = Duration::from_millis(300);
        config.max_blob_streams_per_peer = 1;
        let mut mesh = Mesh::new().expect("mesh");
        let a = mesh.domus_with("a", config.clone()).await.expect("domus");
        let b = mesh.domus_with("b", config).await.expect("domus");
        mesh.route(TabernaId(10), &b).expect("route");
        let t = b.taberna(TabernaId(10)).expect("taberna");
        let (mut tx, mut rx) = open_pair(&a, &t).await;
        tx.write_all(&data(1000, 1)).await.expect("write");
        // The sender stalls: the reader gets its 1000 bytes, then the idle timeout.
        let mut got = 0;
        let err = loop {
            match futures_next(&mut rx).await {
                Some(Ok(b)) => got += b.len(),
                Some(Err(e)) => break e,
                None => panic!("ended"),
            }
        };
        assert_eq!(got, 1000, "{err}");
        assert_eq!(err.id(), ErrorId::BlobStreamIdleTimeout, "{err}");
        let err = tx
            .write_all(&[1; 10])
            .await
            .expect_err("the sender timed out too");
        let inner = err
            .get_ref()
            .and_then(|e| e.downcast_ref::<vicus::Error>())
            .expect("vicus error");
        assert_eq!(inner.id(), ErrorId::BlobStreamIdleTimeout, "{inner}");
        drop(tx);
        drop(rx);
        // Both reservations are back: with a cap of one stream, another opens and completes.
        let (tx, mut rx) = open_pair(&a, &t).await;
        let sent = tokio::spawn(send_all(tx, data(5000, 2)));
        let mut all = Vec::new();
        rx.read_to_end(&mut all).await.expect("read");
        sent.await.expect("join").expect("finish");
        assert_eq!(all.len(), 5000);
        // Left running on each side: the accept loop, the route follower (the resolver signals
        // changes), the certificate rechecker, the peer driver and the blob driver (and, with
        // the `metrics` feature, the exporter).
        let left = 5 + usize::from(cfg!(feature = "metrics"));
        let mut tasks = (a.task_count(), b.task_count());
        for _ in 0..100 {
            if tasks.0 <= left && tasks.1 <= left {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
            tasks = (a.task_count(), b.task_count());
        }
        assert!(
            tasks.0 <= left && tasks.1 <= left,
            "tasks leaked: {tasks:?}"
        );
    })
    .await;
}

#[tokio::test]
async fn t23_streams_past_the_cap_are_refused_cheaply_and_the_open_ones_progress() {
    within(async {
        let mut sender_config = fast();
        sender_config.max_blob_streams_per_peer = 6;
        let mut receiver_config = fast();
        receiver_config.max_blob_streams_per_peer = 4;
        let mut mesh = Mesh::new().expect("mesh");
        let a = mesh.domus_with("a", sender_config).await.expect("domus");
        let b = mesh.domus_with("b", receiver_config).await.expect("domus");
        mesh.route(TabernaId(10), &b).expect("route");
        let t = b.taberna(TabernaId(10)).expect("taberna");
        let t2 = t.clone();
        let acceptor = tokio::spawn(async move {
            let mut rxs = Vec::new();
            for _ in 0..4 {
                rxs.push(accept_blob(&t2).await);
            }
            rxs
        });
        let mut txs = Vec::new();
        for _ in 0..4 {
            txs.push(open(&a, 10).await.expect("under the cap"));
        }
        let mut rxs = acceptor.await.expect("join");
        // The receiver's cap (4) refuses the fifth before its handler sees it.
        let err = open(&a, 10).await.expect_err("over the receiver's cap");
        assert_eq!(err.id(), ErrorId::BlobBufferFull, "{err}");
        assert_eq!(t.queued(), 0, "the handler never saw the refused open");
        // The sender's own cap (6) refuses at once, without a round trip.
        let mut c = fast();
        c.max_blob_streams_per_peer = 1;
        let lone = mesh.domus_with("c", c).await.expect("domus");
        let _held = open(&lone, 10).await;
        let start = Instant::now();
        let err = open(&lone, 10).await.expect_err("over the sender's cap");
        assert_eq!(err.id(), ErrorId::BlobBufferFull, "{err}");
        assert!(start.elapsed() < Duration::from_millis(100));
        // The open streams still complete.
        let mut sends = Vec::new();
        for (i, tx) in txs.into_iter().enumerate() {
            sends.push(tokio::spawn(send_all(tx, data(300_000, i as u64))));
        }
        for (i, rx) in rxs.iter_mut().enumerate() {
            let mut got = Vec::new();
            rx.read_to_end(&mut got).await.expect("read");
            assert!(got == data(300_000, i as u64));
        }
        for s in sends {
            s.await.expect("join").expect("finish");
        }
    })
    .await;
}

#[tokio::test]
async fn a_peer_restart_fails_open_blob_streams_with_peer_restarted() {
    within(async {
        let mut mesh = Mesh::new().expect("mesh");
        let a = mesh.domus("a").await.expect("domus");
        let (auth_b, _) = mesh.ca().domus_auth("b").expect("mint");
        let auth_b2 = auth_b.clone();
        let b = Domus::builder(auth_b)
            .config(fast())
            .build()
            .await
            .expect("b");
        let addr = addr_of(&b);
        mesh.route(TabernaId(10), &b).expect("route");
        let t = b.taberna(TabernaId(10)).expect("taberna");
        let (mut tx, rx) = open_pair(&a, &t).await;
        tx.write_all(&data(10_000, 1)).await.expect("write");
        // b dies without a word (no shutdown, so no cancel reaches a) ...
        drop((rx, t, b));
        // ... and comes back at the same address with the same identity, in a new run.
        let mut b2 = None;
        for _ in 0..200 {
            match Domus::builder(auth_b2.clone())
                .bind(addr.clone())
                .config(fast())
                .build()
                .await
            {
                Ok(d) => {
                    b2 = Some(d);
                    break;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
        let _b2 = b2.expect("b2 bound");
        // a's blob driver redials for its open stream and meets the new run.
        let err = loop {
            match tx.write_all(&[0; 1024]).await {
                Ok(()) => tokio::time::sleep(Duration::from_millis(5)).await,
                Err(e) => break e,
            }
        };
        let inner = err
            .get_ref()
            .and_then(|e| e.downcast_ref::<vicus::Error>())
            .expect("vicus error");
        assert_eq!(inner.id(), ErrorId::PeerRestarted, "{inner}");
    })
    .await;
}

#[tokio::test]
async fn a_blob_to_a_taberna_on_the_same_domus_works_through_the_same_api() {
    within(async {
        let mut mesh = Mesh::new().expect("mesh");
        let a = mesh.domus_with("a", small()).await.expect("domus");
        let t = a.taberna(TabernaId(10)).expect("taberna");
        let payload = data(200_000, 4);
        let worker = tokio::spawn(async move {
            let mut rx = accept_blob(&t).await;
            let mut got = Vec::new();
            rx.read_to_end(&mut got).await.expect("read");
            let mut rx2 = accept_blob(&t).await;
            let err = loop {
                match futures_next(&mut rx2).await {
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => break e,
                    None => panic!("a cancelled local stream must not end cleanly"),
                }
            };
            (got, err)
        });
        let tx = open(&a, 10).await.expect("opened locally");
        send_all(tx, payload.clone()).await.expect("finished");
        let mut tx2 = open(&a, 10).await.expect("opened locally");
        tx2.write_all(&[1; 100]).await.expect("write");
        tx2.cancel("changed my mind");
        let (got, err) = worker.await.expect("join");
        assert!(got == payload);
        assert_eq!(err.id(), ErrorId::BlobCancelled, "{err}");
        assert!(err.message().contains("changed my mind"), "{err}");
    })
    .await;
}

#[tokio::test]
async fn a_request_split_into_parts_keeps_its_blob_and_answers_from_another_task() {
    within(async {
        let mut mesh = Mesh::new().expect("mesh");
        let a = mesh.domus_with("a", small()).await.expect("domus");
        let b = mesh.domus_with("b", small()).await.expect("domus");
        mesh.route(TabernaId(10), &b).expect("route");
        let t = b.taberna(TabernaId(10)).expect("taberna");
        let payload = data(100_000, 9);
        let worker = tokio::spawn(async move {
            let req: TabernaRequest = t.recv().await.expect("request");
            assert!(req.has_blob());
            let (parts, answer_handle) = req.into_parts();
            let mut rx = parts.blob.expect("into_parts carries the blob");
            assert_eq!(parts.payload.as_ref(), b"header");
            // Answered from another task, after the split.
            tokio::spawn(async move { answer_handle.accept() })
                .await
                .expect("join");
            let mut got = Vec::new();
            rx.read_to_end(&mut got).await.expect("read");
            got
        });
        let tx = open(&a, 10).await.expect("accepted");
        send_all(tx, payload.clone()).await.expect("finished");
        assert!(worker.await.expect("join") == payload);
    })
    .await;
}

#[tokio::test]
async fn an_idle_blob_callis_closes_after_blob_idle_timeout_and_the_next_blob_dials_again() {
    within(async {
        let mut mesh = Mesh::new().expect("mesh");
        let mut config = small();
        config.blob_idle_timeout = Duration::from_millis(300);
        let a = mesh.domus_with("a", config.clone()).await.expect("domus");
        let b = mesh.domus_with("b", config).await.expect("domus");
        mesh.route(TabernaId(10), &b).expect("route");
        let t = b.taberna(TabernaId(10)).expect("taberna");
        let payload = data(50_000, 12);
        for round in 1..=2u64 {
            let (tx, mut rx) = open_pair(&a, &t).await;
            let (sent, got) = tokio::join!(send_all(tx, payload.clone()), async {
                let mut got = Vec::new();
                rx.read_to_end(&mut got).await.expect("read");
                got
            });
            sent.expect("finished");
            assert!(got == payload, "round {round}");
            assert_eq!(
                a.reporting().snapshot().blob_calles.current,
                1,
                "round {round}"
            );
            // No stream for blob_idle_timeout: both ends let the callis go.
            let deadline = Instant::now() + Duration::from_secs(5);
            while a.reporting().snapshot().blob_calles.current != 0
                || b.reporting().snapshot().blob_calles.current != 0
            {
                assert!(
                    Instant::now() < deadline,
                    "round {round}: the idle blob callis stayed open"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            assert_eq!(a.reporting().snapshot().totals.blob_calles_opened, round);
        }
    })
    .await;
}

/// Reads frames from a raw callis until `pred` matches one (or the callis ends).
async fn read_until(
    io: &mut vicus::a0_transport::AuthenticatedStream,
    buf: &mut BytesMut,
    mut pred: impl FnMut(&Frame) -> bool,
) -> Option<Frame> {
    loop {
        while let Ok(Some(f)) = frame::decode(buf, 1 << 24) {
            if pred(&f) {
                return Some(f);
            }
        }
        match tokio::time::timeout(Duration::from_secs(10), io.read_buf(buf)).await {
            Ok(Ok(n)) if n > 0 => {}
            _ => return None,
        }
    }
}

#[tokio::test]
async fn t21_a_peer_writing_past_its_credit_loses_its_blob_callis_with_a_violation() {
    within(async {
        let mut mesh = Mesh::new().expect("mesh");
        let mut config = fast();
        config.blob_chunk_len = 4096;
        config.blob_window = 16 * 1024;
        let b = mesh.domus_with("b", config).await.expect("domus");
        let t = b.taberna(TabernaId(10)).expect("taberna");
        let evil = transport(mesh.ca(), "evil");
        let evil_id = evil.local_id();
        let epoch = 77u64;
        // The primary callis: HELLO, then a message that opens blob stream `stream`.
        let mut primary = evil
            .dial(&addr_of(&b), Some(b.identity()))
            .await
            .expect("dial");
        let mut out = BytesMut::new();
        frame::encode_hello(
            &mut out,
            &Hello {
                version: frame::PROTOCOL_VERSION,
                epoch,
                max_frame_len: 1 << 20,
                window: 1024,
                domus_id: evil_id.as_str().to_owned(),
            },
        );
        let stream = 2 + u64::from(evil_id.as_str() > b.identity().as_str());
        let mut open_payload = BytesMut::new();
        bytes::BufMut::put_u64(&mut open_payload, stream);
        bytes::BufMut::put_u32(&mut open_payload, APP.0);
        bytes::BufMut::put_slice(&mut open_payload, b"header");
        frame::encode_message(&mut out, 1, 10, 0, 0x0001_0000, &open_payload);
        primary.write_all(&out).await.expect("write");
        let mut rx = accept_blob(&t).await;
        let mut pbuf = BytesMut::new();
        read_until(&mut primary, &mut pbuf, |f| matches!(f, Frame::Accepted(_)))
            .await
            .expect("accepted");
        // The blob callis: BLOB_HELLO, wait for the credit, then write past it.
        let mut blob = evil
            .dial(&addr_of(&b), Some(b.identity()))
            .await
            .expect("dial");
        let mut out = BytesMut::new();
        frame::encode_blob_hello(&mut out, frame::PROTOCOL_VERSION, epoch, 1 << 20);
        blob.write_all(&out).await.expect("write");
        let mut bbuf = BytesMut::new();
        let credit = read_until(&mut blob, &mut bbuf, |f| {
            matches!(f, Frame::Blob(BlobFrame::Credit { .. }))
        })
        .await
        .expect("credit");
        let Frame::Blob(BlobFrame::Credit { limit, .. }) = credit else {
            unreachable!()
        };
        assert_eq!(limit, 16 * 1024, "one window");
        let mut out = BytesMut::new();
        let mut offset = 0u64;
        while offset < limit + 4096 {
            frame::encode_blob_data(&mut out, stream, offset, &[0xAB; 4096]);
            offset += 4096;
        }
        let _ = blob.write_all(&out).await;
        let close = read_until(&mut blob, &mut bbuf, |f| matches!(f, Frame::Close { .. }))
            .await
            .expect("a CLOSE before the callis ends");
        let Frame::Close { code, reason } = close else {
            unreachable!()
        };
        assert_eq!(code, WireCode::of(ErrorId::ProtocolViolation));
        assert!(reason.contains("beyond its credit"), "{reason}");
        // The callis then ends; the application's stream fails with the violation and held
        // no more than its window.
        assert!(read_until(&mut blob, &mut bbuf, |_| false).await.is_none());
        let mut got = 0u64;
        let err = loop {
            match futures_next(&mut rx).await {
                Some(Ok(b)) => got += b.len() as u64,
                Some(Err(e)) => break e,
                None => panic!("ended"),
            }
        };
        assert!(got <= limit, "{got} bytes delivered past the credit");
        assert_eq!(err.id(), ErrorId::ProtocolViolation, "{err}");
        let _ = bbuf.remaining();
    })
    .await;
}

/// Writes `chunk` (`frames` frames) again and again until a write fails or `max` frames went
/// out; returns how many went out.
async fn write_until_cut<W: tokio::io::AsyncWrite + Unpin>(
    w: &mut W,
    chunk: &[u8],
    frames: u64,
    max: u64,
) -> u64 {
    let mut sent = 0u64;
    while sent < max && w.write_all(chunk).await.is_ok() {
        sent += frames;
    }
    sent
}

#[tokio::test]
async fn t16_a_skippable_frame_flood_on_the_blob_callis_is_closed_and_counted_once_per_callis() {
    within(async {
        let mut mesh = Mesh::new().expect("mesh");
        // A budget a debug build on a busy 2-core machine surely decodes past within a
        // second (skipped frames count double: 50,000 of them).
        let mut config = fast();
        config.max_frames_per_second = 100_000;
        let b = mesh.domus_with("b", config).await.expect("domus");
        let a = mesh.domus("a").await.expect("domus");
        mesh.route(TabernaId(10), &b).expect("route");
        mesh.route(TabernaId(11), &b).expect("route");
        spawn_named_echo(b.taberna(TabernaId(10)).expect("taberna"), "b");
        // A well-behaved peer keeps sending while the flooder floods.
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let round_trips = {
            let (a, stop) = (a.clone(), stop.clone());
            tokio::spawn(async move {
                let opts = SendOptions::default().timeout(Duration::from_secs(10));
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let answer = a
                        .send(TabernaId(10), APP, Bytes::from_static(b"rt"), opts.clone())
                        .await
                        .expect("the well-behaved peer is answered");
                    let vicus::Delivery::Replied(reply) = answer else {
                        panic!("{answer:?}")
                    };
                    assert_eq!(reply.as_ref(), b"b:rt");
                    n += 1;
                }
                n
            })
        };
        let evil = transport(mesh.ca(), "evil");
        let mut flood = BytesMut::new();
        for _ in 0..10_000 {
            Frame::Skipped(frame::FrameType(0x90)).encode(&mut flood);
        }
        let flood = flood.freeze();
        // The budget belongs to the peer's blob streams, which outlive a callis: a second
        // callis within the same second is over budget from its first frames.
        for round in 1..=2u64 {
            let seq = b.reporting().last_error_seq();
            let before = b.reporting().snapshot().totals.protocol_violations;
            let started = Instant::now();
            let io = evil
                .dial(&addr_of(&b), Some(b.identity()))
                .await
                .expect("dial");
            let (mut rd, mut wr) = tokio::io::split(io);
            let mut hello = BytesMut::new();
            frame::encode_blob_hello(&mut hello, frame::PROTOCOL_VERSION, 77, 1 << 20);
            wr.write_all(&hello).await.expect("BLOB_HELLO");
            let writer = {
                let flood = flood.clone();
                tokio::spawn(
                    async move { write_until_cut(&mut wr, &flood, 10_000, 200_000_000).await },
                )
            };
            // The flooder is told why, then cut off.
            let mut buf = BytesMut::new();
            let close = tokio::time::timeout(Duration::from_secs(10), async {
                loop {
                    while let Ok(Some(f)) = frame::decode(&mut buf, 1 << 20) {
                        if let Frame::Close { code, reason } = f {
                            return Some((code, reason));
                        }
                    }
                    match rd.read_buf(&mut buf).await {
                        Ok(0) | Err(_) => return None,
                        Ok(_) => {}
                    }
                }
            })
            .await
            .expect("the blob callis is closed in time");
            let took = started.elapsed();
            let (code, reason) = close.expect("a CLOSE before the callis ends");
            assert_eq!(code, WireCode::of(ErrorId::ProtocolViolation), "{reason}");
            assert!(reason.contains("calm down"), "{reason}");
            let sent = tokio::time::timeout(Duration::from_secs(10), writer)
                .await
                .expect("the flooder's writes fail in time")
                .expect("join");
            assert!(sent < 200_000_000, "round {round}: cut after {sent} frames");
            // Generous: the cut comes within about a second of budget, whatever the load.
            assert!(
                took < Duration::from_secs(5),
                "round {round}: closed after {took:?}"
            );
            eprintln!("round {round}: closed after {took:?}, {sent} skipped frames written");
            // Exactly one violation for the closed callis, and one entry on the error feed,
            // however many frames it had buffered; still one a moment later.
            let counted = || b.reporting().snapshot().totals.protocol_violations - before;
            assert_eq!(counted(), 1, "round {round}");
            tokio::time::sleep(Duration::from_millis(200)).await;
            assert_eq!(counted(), 1, "round {round}, a moment later");
            let feed = b.reporting().errors_since(seq, 64);
            assert_eq!(
                feed.missed, 0,
                "round {round}: the error feed's ring was wiped"
            );
            let ours: Vec<_> = feed
                .errors
                .iter()
                .filter(|e| e.error.id() == ErrorId::ProtocolViolation)
                .collect();
            assert_eq!(ours.len(), 1, "round {round}: {:?}", feed.errors);
            assert!(
                ours[0].error.message().contains(evil.local_id().as_str()),
                "{:?}",
                ours[0]
            );
        }
        stop.store(true, Ordering::Relaxed);
        let answered = round_trips.await.expect("join");
        assert!(answered > 0, "the well-behaved peer was answered");
        // Its blobs still flow too.
        let t = b.taberna(TabernaId(11)).expect("taberna");
        let (tx, mut rx) = tokio::join!(open(&a, 11), accept_blob(&t));
        let payload = data(100_000, 9);
        let sent = tokio::spawn(send_all(tx.expect("opened"), payload.clone()));
        let mut got = Vec::new();
        while let Some(piece) = futures_next(&mut rx).await {
            got.extend_from_slice(&piece.expect("bytes"));
        }
        sent.await.expect("join").expect("finished");
        assert!(got == payload, "the good peer's blob arrived intact");
        a.shutdown().await;
        b.shutdown().await;
    })
    .await;
}
