//! Issue 13, transient peers: a domus forgets a peer it no longer talks to (its driver,
//! session and dedupe state) — at once when the peer shut down, after `peer_retire_after`
//! when it vanished — so peers that come and go do not grow it without bound, and a
//! forgotten peer that comes back is served afresh with exactly-once intact.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use tokio::io::AsyncReadExt;
use vicus::{Delivery, Domus, DomusConfig, MessageType, SendOptions, TabernaId};

const APP: MessageType = MessageType::app(13);

fn opts() -> SendOptions {
    SendOptions::default().timeout(Duration::from_secs(10))
}

/// Accepts everything on `t`, counting deliveries.
fn spawn_counting(t: vicus::Taberna) -> Arc<AtomicU64> {
    let count = Arc::new(AtomicU64::new(0));
    let seen = count.clone();
    tokio::spawn(async move {
        while let Some(req) = t.recv().await {
            seen.fetch_add(1, Ordering::SeqCst);
            req.accept();
        }
    });
    count
}

#[tokio::test]
async fn peers_that_come_send_and_shut_down_are_forgotten_and_leave_nothing_behind() {
    const CLIENTS: usize = 1_000;
    within(async {
        let mut mesh = Mesh::new().expect("mesh");
        let server = mesh.domus("server").await.expect("domus");
        let delivered = spawn_counting(mesh.taberna("server", TabernaId(1)).expect("taberna"));
        let base_tasks = server.task_count();
        let mut most_peers = 0;
        for n in 0..CLIENTS {
            // A fresh identity each time, as short-lived workers or CLI runs would have.
            let client = mesh
                .builder(&format!("client-{n}"))
                .expect("mint")
                .dial_only()
                .build()
                .await
                .expect("client");
            for _ in 0..3 {
                send_job(&client, n).await;
            }
            client.shutdown().await;
            most_peers = most_peers.max(server.peer_count());
        }
        assert_eq!(delivered.load(Ordering::SeqCst), 3 * CLIENTS as u64);
        // Each departed peer is forgotten once its CLOSE is read: nothing accumulates.
        assert!(
            eventually(Duration::from_secs(5), || server.peer_count() == 0).await,
            "{} peers still known",
            server.peer_count()
        );
        assert!(most_peers <= 3, "at most {most_peers} peers known at once");
        assert!(
            eventually(Duration::from_secs(5), || server.task_count() <= base_tasks).await,
            "tasks: {} now, {base_tasks} before any client",
            server.task_count()
        );
        let snapshot = server.reporting().snapshot();
        assert!(snapshot.per_peer.is_empty(), "{:?}", snapshot.per_peer);
    })
    .await;
}

#[tokio::test]
async fn a_peer_that_vanishes_is_kept_for_peer_retire_after_then_forgotten() {
    within(async {
        let mut mesh = Mesh::new().expect("mesh");
        let mut config = Mesh::test_config();
        config.peer_retire_after = Duration::from_secs(1);
        let server = mesh.domus_with("server", config).await.expect("domus");
        spawn_counting(mesh.taberna("server", TabernaId(1)).expect("taberna"));
        let client = mesh
            .builder("client")
            .expect("mint")
            .dial_only()
            .build()
            .await
            .expect("client");
        client
            .send(TabernaId(1), APP, Bytes::from_static(b"x"), opts())
            .await
            .expect("send");
        assert_eq!(server.peer_count(), 1);
        // A crash: no shutdown, no CLOSE. The server cannot know whether the client will
        // come back and replay, so it keeps the dedupe state for peer_retire_after.
        drop(client);
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(server.peer_count(), 1, "kept while it could still replay");
        assert!(
            eventually(Duration::from_secs(5), || server.peer_count() == 0).await,
            "forgotten after peer_retire_after"
        );
    })
    .await;
}

#[tokio::test]
async fn a_forgotten_peer_that_comes_back_gets_every_message_exactly_once_both_ways() {
    within(async {
        let mut mesh = Mesh::new().expect("mesh");
        let a = mesh.domus("a").await.expect("a");
        let mut config: DomusConfig = Mesh::test_config();
        config.peer_retire_after = Duration::from_secs(1);
        let b = mesh.domus_with("b", config).await.expect("b");
        let at_a = spawn_counting(mesh.taberna("a", TabernaId(1)).expect("taberna"));
        let at_b = spawn_counting(mesh.taberna("b", TabernaId(2)).expect("taberna"));
        let round = |n: u64| {
            let (a, b) = (a.clone(), b.clone());
            async move {
                for _ in 0..n {
                    let to_b = a.send(TabernaId(2), APP, Bytes::from_static(b"a->b"), opts());
                    let to_a = b.send(TabernaId(1), APP, Bytes::from_static(b"b->a"), opts());
                    let (to_b, to_a) = tokio::join!(to_b, to_a);
                    assert_eq!(to_b.expect("a -> b"), Delivery::Accepted);
                    assert_eq!(to_a.expect("b -> a"), Delivery::Accepted);
                }
            }
        };
        round(5).await;
        // The callis goes away and b forgets a (nothing in flight; a may still replay, so b
        // waits peer_retire_after). a remembers b.
        a.disconnect(b.identity()).expect("disconnect");
        assert!(
            eventually(Duration::from_secs(5), || b.peer_count() == 0).await,
            "b forgot a"
        );
        assert_eq!(a.peer_count(), 1);
        // b's new session with a uses ids a has never seen (a still holds what it saw from
        // b's old one), and a's ids reach b's fresh dedupe state: nothing is lost, nothing
        // is taken for a duplicate.
        round(5).await;
        assert_eq!(at_a.load(Ordering::SeqCst), 10, "deliveries at a");
        assert_eq!(at_b.load(Ordering::SeqCst), 10, "deliveries at b");
        let _: &Domus = &a;
    })
    .await;
}

/// Sends one job to taberna 1 and expects it accepted (`run` names the loop's round).
async fn send_job(client: &Domus, run: impl std::fmt::Display) {
    let out = client
        .send(TabernaId(1), APP, Bytes::from_static(b"job"), opts())
        .await
        .unwrap_or_else(|e| panic!("run {run}: {e}"));
    assert_eq!(out, Delivery::Accepted, "run {run}");
}

/// A client that dials only, under the identity "client" each time (a new run, a new epoch),
/// as CLI runs are.
async fn client_run(mesh: &mut Mesh) -> Domus {
    mesh.builder("client")
        .expect("mint")
        .dial_only()
        .build()
        .await
        .expect("client")
}

/// Reads every blob on `t` to its end; counts the bytes.
fn spawn_blob_reader(t: vicus::Taberna) -> Arc<AtomicU64> {
    let bytes = Arc::new(AtomicU64::new(0));
    let seen = bytes.clone();
    tokio::spawn(async move {
        while let Some(mut req) = t.recv().await {
            let Some(mut blob) = req.blob() else {
                req.accept();
                continue;
            };
            req.accept();
            let seen = seen.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                while let Ok(n) = blob.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    seen.fetch_add(n as u64, Ordering::SeqCst);
                }
            });
        }
    });
    bytes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_restarts_under_one_identity_sends_messages_then_blobs_every_run() {
    const RUNS: usize = 60;
    const BLOB: usize = 1_000_000;
    within(async {
        let mut mesh = Mesh::new().expect("mesh");
        let _server = mesh.domus("server").await.expect("domus");
        let read = spawn_blob_reader(mesh.taberna("server", TabernaId(1)).expect("taberna"));
        for run in 0..RUNS {
            // Like CLI runs: a new process (a new epoch) with the same identity each time.
            let client = client_run(&mut mesh).await;
            send_job(&client, run).await;
            client.shutdown().await;
            let client = client_run(&mut mesh).await;
            let started = std::time::Instant::now();
            let mut blob = client
                .send_blob(TabernaId(1), APP, Bytes::from_static(b"h"), opts())
                .await
                .unwrap_or_else(|e| panic!("run {run}: open: {e}"));
            blob.write_bytes(Bytes::from(vec![7u8; BLOB]))
                .await
                .unwrap_or_else(|e| panic!("run {run}: write: {e}"));
            blob.finish()
                .await
                .unwrap_or_else(|e| panic!("run {run}: finish after {:?}: {e}", started.elapsed()));
            client.shutdown().await;
        }
        assert!(
            eventually(Duration::from_secs(5), || read.load(Ordering::SeqCst)
                == (RUNS * BLOB) as u64)
            .await
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_comes_back_as_it_is_forgotten_is_served_on_its_first_callis() {
    const RUNS: u64 = 150;
    within(async {
        let mut mesh = Mesh::new().expect("mesh");
        let server = mesh.domus("server").await.expect("domus");
        let delivered = spawn_counting(mesh.taberna("server", TabernaId(1)).expect("taberna"));
        for run in 0..RUNS {
            // The server forgets the last run's client (it shut down) as this one, under the
            // same identity, connects: the new client is served on its first callis, whichever
            // driver it met. (The narrowest race, a callis queued to a driver in the moment it
            // retires, is handed to the next driver; this loop rarely hits that moment.)
            let client = client_run(&mut mesh).await;
            send_job(&client, run).await;
            let dials = client.reporting().snapshot().counters.dial_attempts;
            assert_eq!(dials, 1, "run {run}: the client dialled {dials} times");
            client.shutdown().await;
        }
        assert_eq!(delivered.load(Ordering::SeqCst), RUNS);
        let opened = server.reporting().snapshot().counters.primary_calles_opened;
        assert_eq!(opened, RUNS, "one primary callis per run");
    })
    .await;
}
