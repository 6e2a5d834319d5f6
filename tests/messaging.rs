//! Messaging between domus over real loopback mTLS: delivery, answers, errors, reconnects,
//! shutdown. Test names carry the threat they cover (../shared/THREATS.md).

mod common;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use vicus::DomusAddr;
use vicus::{Delivery, Domus, DomusConfig, ErrorId, MessageType, SendOptions, TabernaId};

const APP: MessageType = MessageType::app(1);

// Every test's mesh keeps the default configuration (`default_mesh`: these tests check the
// defaults' reconnect behaviour).

/// A worker that answers every request: payload "echo:<payload>" as a reply.
fn spawn_echo(t: vicus::Taberna) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while let Some(req) = t.recv().await {
            let mut reply = b"echo:".to_vec();
            reply.extend_from_slice(req.payload());
            req.reply(Bytes::from(reply));
        }
    })
}

/// A configuration that redials within milliseconds (tests that cut calles).
fn fast_backoff() -> DomusConfig {
    let mut config = DomusConfig::default();
    config.reconnect_backoff_min = Duration::from_millis(5);
    config.reconnect_backoff_max = Duration::from_millis(50);
    config
}

fn send_opts(timeout_ms: u64) -> SendOptions {
    SendOptions::default().timeout(Duration::from_millis(timeout_ms))
}

#[tokio::test]
async fn reply_round_trip_and_sender_identity_visible() {
    within(async {
        let mut mesh = default_mesh();
        let a = mesh.domus("a").await.expect("domus");
        let b = mesh.domus("b").await.expect("domus");
        mesh.route(TabernaId(10), &b).expect("route");
        let t = b.taberna(TabernaId(10)).expect("taberna");
        let seen = tokio::spawn(async move {
            let req = t.recv().await.expect("request");
            let who = req.peer().id().clone();
            let source = req.source();
            req.reply(Bytes::from_static(b"pong"));
            (who, source)
        });
        let out = a
            .send(
                TabernaId(10),
                APP,
                Bytes::from_static(b"ping"),
                SendOptions::default().source(TabernaId(3)),
            )
            .await
            .expect("send");
        assert_eq!(out, Delivery::Replied(Bytes::from_static(b"pong").into()));
        let (who, source) = seen.await.expect("join");
        assert_eq!(&who, a.identity());
        assert_eq!(source, TabernaId(3));
    })
    .await;
}

#[tokio::test]
async fn ten_thousand_pipelined_sends_all_accepted_exactly_once() {
    within(async {
        let mut mesh = default_mesh();
        let a = mesh.domus("a").await.expect("domus");
        let b = mesh.domus("b").await.expect("domus");
        mesh.route(TabernaId(10), &b).expect("route");
        let t = b
            .taberna_with(
                TabernaId(10),
                vicus::TabernaOptions::default().inbox_depth(10_000),
            )
            .expect("taberna");
        let counter = tokio::spawn(async move {
            let mut seen = std::collections::HashSet::new();
            while seen.len() < 10_000 {
                let req = t.recv().await.expect("request");
                let n = u32::from_be_bytes(req.payload()[..4].try_into().expect("4 bytes"));
                assert!(seen.insert(n), "message {n} delivered twice");
                req.accept();
            }
            seen.len()
        });
        let mut receipts = Vec::with_capacity(10_000);
        for n in 0u32..10_000 {
            let receipt = a
                .admit(
                    TabernaId(10),
                    APP,
                    Bytes::copy_from_slice(&n.to_be_bytes()),
                    SendOptions::default(),
                )
                .await
                .expect("admitted");
            receipts.push(receipt);
        }
        for r in receipts {
            assert_eq!(r.await.expect("accepted"), Delivery::Accepted);
        }
        assert_eq!(counter.await.expect("join"), 10_000);
    })
    .await;
}

#[tokio::test]
async fn reject_code_and_reason_reach_the_sender() {
    within(async {
        let mut mesh = default_mesh();
        let a = mesh.domus("a").await.expect("domus");
        let b = mesh.domus("b").await.expect("domus");
        mesh.route(TabernaId(10), &b).expect("route");
        let t = b.taberna(TabernaId(10)).expect("taberna");
        tokio::spawn(async move {
            let req = t.recv().await.expect("request");
            req.reject(451, "unavailable for legal reasons");
        });
        let err = a
            .send(TabernaId(10), APP, Bytes::new(), SendOptions::default())
            .await
            .expect_err("rejected");
        assert_eq!(err.id(), ErrorId::RemoteTabernaRejected, "{err}");
        let rejection = err.rejection().expect("carries the rejection");
        assert_eq!(rejection.code, 451);
        assert_eq!(rejection.reason, "unavailable for legal reasons");
    })
    .await;
}

#[tokio::test]
async fn t24_unknown_tabernas_get_typed_errors_and_nothing_leaks() {
    within(async {
        let mut mesh = default_mesh();
        let a = mesh.domus("a").await.expect("domus");
        let b = mesh.domus("b").await.expect("domus");
        for id in [0, u64::MAX, 77] {
            mesh.route(TabernaId(id), &b).expect("route");
        }
        let gone = b.taberna(TabernaId(78)).expect("taberna");
        mesh.route(TabernaId(78), &b).expect("route");
        drop(gone);
        for id in [0, u64::MAX, 77, 78] {
            let err = a
                .send(TabernaId(id), APP, Bytes::new(), send_opts(5_000))
                .await
                .expect_err("unknown");
            assert_eq!(err.id(), ErrorId::UnknownTaberna, "{id}: {err}");
        }
        // No route at all.
        let err = a
            .send(TabernaId(12345), APP, Bytes::new(), send_opts(5_000))
            .await
            .expect_err("no route");
        assert_eq!(err.id(), ErrorId::UnknownTaberna, "{err}");
    })
    .await;
}

#[tokio::test]
async fn t25_full_inbox_answers_taberna_busy_at_once() {
    within(async {
        let mut mesh = default_mesh();
        let a = mesh.domus("a").await.expect("domus");
        let b = mesh.domus("b").await.expect("domus");
        mesh.route(TabernaId(10), &b).expect("route");
        let t = b
            .taberna_with(
                TabernaId(10),
                vicus::TabernaOptions::default().inbox_depth(2),
            )
            .expect("taberna");
        // Nobody reads: two fill the inbox, the third is refused at once.
        let [r1, r2]: [vicus::Receipt; 2] = admit_empty(&a, 2).await.try_into().expect("two");
        assert!(
            eventually(Duration::from_secs(10), || t.queued() == 2).await,
            "the first two reach the inbox: {} queued",
            t.queued()
        );
        let started = tokio::time::Instant::now();
        let err = a
            .send(TabernaId(10), APP, Bytes::new(), send_opts(10_000))
            .await
            .expect_err("busy");
        assert_eq!(err.id(), ErrorId::TabernaBusy, "{err}");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "refused at once, not at the timeout"
        );
        assert_eq!(t.queued(), 2);
        for _ in 0..2 {
            t.recv().await.expect("queued").accept();
        }
        assert_eq!(r1.await.expect("1"), Delivery::Accepted);
        assert_eq!(r2.await.expect("2"), Delivery::Accepted);
    })
    .await;
}

#[tokio::test]
async fn a_peer_not_on_the_allow_list_is_refused_before_the_handler() {
    within(async {
        let mut mesh = default_mesh();
        let a = mesh.domus("a").await.expect("domus");
        let c = mesh.domus("c").await.expect("domus");
        let b = mesh.domus("b").await.expect("domus");
        mesh.route(TabernaId(10), &b).expect("route");
        let t = b
            .taberna_with(
                TabernaId(10),
                vicus::TabernaOptions::default().allowed_peers([c.identity().clone()]),
            )
            .expect("taberna");
        let err = a
            .send(TabernaId(10), APP, Bytes::new(), send_opts(5_000))
            .await
            .expect_err("forbidden");
        assert_eq!(err.id(), ErrorId::Forbidden, "{err}");
        assert_eq!(t.queued(), 0, "the handler never saw it");
        spawn_echo(t);
        let ok = c
            .send(
                TabernaId(10),
                APP,
                Bytes::from_static(b"hi"),
                send_opts(5_000),
            )
            .await
            .expect("allowed peer");
        assert_eq!(ok, Delivery::Replied(Bytes::from_static(b"echo:hi").into()));
    })
    .await;
}

#[tokio::test]
async fn a_handler_that_never_answers_ends_in_send_timeout() {
    within(async {
        let mut mesh = default_mesh();
        let a = mesh.domus("a").await.expect("domus");
        let b = mesh.domus("b").await.expect("domus");
        mesh.route(TabernaId(10), &b).expect("route");
        let t = b.taberna(TabernaId(10)).expect("taberna");
        let holder = tokio::spawn(async move {
            let req = t.recv().await.expect("request");
            tokio::time::sleep(Duration::from_secs(3)).await;
            drop(req);
        });
        let started = tokio::time::Instant::now();
        let err = a
            .send(TabernaId(10), APP, Bytes::new(), send_opts(300))
            .await
            .expect_err("timeout");
        assert_eq!(err.id(), ErrorId::SendTimeout, "{err}");
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(290) && took < Duration::from_secs(3),
            "{took:?}"
        );
        holder.abort();
    })
    .await;
}

#[tokio::test]
async fn oversized_payloads_and_non_application_types_are_refused_locally() {
    within(async {
        let mut mesh = default_mesh();
        let mut config = DomusConfig::default();
        config.max_message_len = 1000;
        let a = mesh.domus_with("a", config).await.expect("domus");
        let b = mesh.domus("b").await.expect("domus");
        mesh.route(TabernaId(10), &b).expect("route");
        let err = a
            .send(
                TabernaId(10),
                APP,
                Bytes::from(vec![0u8; 1001]),
                send_opts(5_000),
            )
            .await
            .expect_err("too large");
        assert_eq!(err.id(), ErrorId::PayloadTooLarge);
        assert!(err.message().contains("1001 bytes"), "{err}");
        assert!(err.message().contains("max_message_len"), "{err}");
        let err = a
            .send(
                TabernaId(10),
                MessageType(0x0001_0000),
                Bytes::new(),
                send_opts(5_000),
            )
            .await
            .expect_err("A2 is not for applications");
        assert_eq!(err.id(), ErrorId::InvalidMessageType);
        assert_eq!(b.peer_count(), 0, "nothing was sent");
    })
    .await;
}

#[tokio::test]
async fn send_timeouts_outside_their_range_are_refused_not_a_panic() {
    within(async {
        let mut mesh = default_mesh();
        let a = mesh.domus("a").await.expect("domus");
        let b = mesh.domus("b").await.expect("domus");
        mesh.route(TabernaId(10), &b).expect("route");
        spawn_echo(b.taberna(TabernaId(10)).expect("taberna"));
        for timeout in [Duration::MAX, Duration::ZERO, Duration::from_secs(3601)] {
            let opts = SendOptions::default().timeout(timeout);
            let err = a
                .send(TabernaId(10), APP, Bytes::new(), opts.clone())
                .await
                .expect_err("refused");
            assert_eq!(err.id(), ErrorId::InvalidConfig, "{timeout:?}: {err}");
            assert!(err.message().contains("SendOptions::timeout"), "{err}");
            let err = a
                .send_blob(TabernaId(10), APP, Bytes::new(), opts)
                .await
                .expect_err("refused");
            assert_eq!(err.id(), ErrorId::InvalidConfig, "{timeout:?}: {err}");
        }
        a.send(TabernaId(10), APP, Bytes::new(), send_opts(3_600_000))
            .await
            .expect("the longest allowed timeout works");
    })
    .await;
}

#[tokio::test]
async fn try_send_fails_fast_when_the_peer_has_no_free_slot() {
    within(async {
        let mut mesh = default_mesh();
        let mut config = DomusConfig::default();
        config.max_in_flight_per_peer = 2;
        let a = mesh.domus_with("a", config).await.expect("domus");
        let b = mesh.domus("b").await.expect("domus");
        mesh.route(TabernaId(10), &b).expect("route");
        let t = b.taberna(TabernaId(10)).expect("taberna");
        let [r1, r2]: [vicus::Receipt; 2] = admit_empty(&a, 2).await.try_into().expect("two");
        let err = a
            .try_send(TabernaId(10), APP, Bytes::new(), send_opts(10_000))
            .await
            .expect_err("full");
        assert_eq!(err.id(), ErrorId::LocalQueueFull, "{err}");
        let totals = a.reporting().snapshot().totals;
        assert_eq!(totals.queue_overruns_send_a3, 1, "one application overrun");
        assert_eq!(
            totals.queue_overruns_send_a2, 0,
            "no vicus message was refused"
        );
        spawn_echo(t);
        assert!(r1.await.is_ok() && r2.await.is_ok());
        a.try_send(TabernaId(10), APP, Bytes::new(), send_opts(10_000))
            .await
            .expect("a slot is free again");
    })
    .await;
}

#[tokio::test]
async fn local_short_circuit_has_the_same_semantics() {
    within(async {
        let mut mesh = default_mesh();
        let a = mesh.domus("a").await.expect("domus");
        let t = a.taberna(TabernaId(5)).expect("taberna");
        spawn_echo(t);
        let out = a
            .send(
                TabernaId(5),
                APP,
                Bytes::from_static(b"x"),
                send_opts(5_000),
            )
            .await
            .expect("local");
        assert_eq!(out, Delivery::Replied(Bytes::from_static(b"echo:x").into()));
        let r = a.taberna(TabernaId(6)).expect("taberna");
        let rejecter = tokio::spawn(async move {
            let req = r.recv().await.expect("request");
            assert_eq!(req.peer().id().as_str(), "spiffe://vicus.dev/domus/a");
            req.reject(7, "local no");
        });
        let err = a
            .send(TabernaId(6), APP, Bytes::new(), send_opts(5_000))
            .await
            .expect_err("rejected");
        assert_eq!(err.rejection().map(|r| r.code), Some(7));
        rejecter.await.expect("join");
        let busy = a
            .taberna_with(
                TabernaId(8),
                vicus::TabernaOptions::default().inbox_depth(1),
            )
            .expect("taberna");
        let _held = a
            .admit(TabernaId(8), APP, Bytes::new(), send_opts(5_000))
            .await
            .expect("1");
        let err = a
            .send(TabernaId(8), APP, Bytes::new(), send_opts(5_000))
            .await
            .expect_err("busy");
        assert_eq!(err.id(), ErrorId::TabernaBusy);
        drop(busy);
    })
    .await;
}

#[tokio::test]
async fn t26_a_connection_cut_mid_burst_loses_nothing_and_hangs_nothing() {
    within(async {
        let mut mesh = default_mesh();
        let a = mesh.domus_with("a", fast_backoff()).await.expect("domus");
        let b = mesh.domus("b").await.expect("domus");
        let proxy = mesh
            .route_through_proxy(TabernaId(10), &b)
            .await
            .expect("proxy");
        let t = b
            .taberna_with(
                TabernaId(10),
                vicus::TabernaOptions::default().inbox_depth(10_000),
            )
            .expect("taberna");
        let delivered = Arc::new(std::sync::Mutex::new(
            std::collections::HashMap::<u32, u32>::new(),
        ));
        let seen = delivered.clone();
        tokio::spawn(async move {
            while let Some(req) = t.recv().await {
                let n = u32::from_be_bytes(req.payload()[..4].try_into().expect("4 bytes"));
                *seen.lock().expect("lock").entry(n).or_default() += 1;
                req.accept();
            }
        });
        let mut receipts = Vec::new();
        for n in 0u32..3000 {
            if n % 500 == 250 {
                proxy.cut_all();
            }
            receipts.push(
                a.admit(
                    TabernaId(10),
                    APP,
                    Bytes::copy_from_slice(&n.to_be_bytes()),
                    send_opts(15_000),
                )
                .await
                .expect("admitted"),
            );
            if n % 100 == 0 {
                tokio::task::yield_now().await;
            }
        }
        let mut accepted = Vec::new();
        for (n, r) in receipts.into_iter().enumerate() {
            match r.await {
                Ok(Delivery::Accepted) => accepted.push(n as u32),
                Ok(other) => panic!("unexpected {other:?}"),
                Err(e) => panic!("message {n} failed: {e}"),
            }
        }
        let delivered = delivered.lock().expect("lock");
        for n in &accepted {
            assert_eq!(
                delivered.get(n),
                Some(&1),
                "message {n} delivered exactly once"
            );
        }
        assert_eq!(accepted.len(), 3000);
        assert!(
            proxy.total_accepted() > 1,
            "the callis was really cut and re-dialled"
        );
    })
    .await;
}

#[tokio::test]
async fn a_restarted_peer_fails_retained_sends_with_peer_restarted_and_new_sends_work() {
    within(async {
        let mut mesh = default_mesh();
        let mut config = DomusConfig::default();
        config.reconnect_backoff_min = Duration::from_millis(10);
        config.reconnect_backoff_max = Duration::from_millis(100);
        let a = mesh.domus_with("a", config).await.expect("domus");
        let (auth_b, _) = mesh.ca().domus_auth("b").expect("mint");
        let auth_b2 = auth_b.clone();
        let b = Domus::builder(auth_b).build().await.expect("b");
        let addr = addr_of(&b);
        mesh.route(TabernaId(10), &b).expect("route");
        let t = b.taberna(TabernaId(10)).expect("taberna");
        // b receives five messages and never answers them.
        let holder = tokio::spawn(async move {
            let mut held = Vec::new();
            for _ in 0..5 {
                held.push(t.recv().await.expect("request"));
            }
            held
        });
        let receipts: Vec<_> = admit_empty(&a, 5).await;
        let held = holder.await.expect("join");
        let first_epoch = b.epoch();
        // A crash, not a shutdown (a shutdown would answer the held requests first): the
        // domus is dropped, its tasks are cancelled and nothing more is written.
        drop(b);
        drop(held);
        // Same address, same identity, new epoch (the old listener closes as its task ends).
        let b2 = loop {
            match Domus::builder(auth_b2.clone())
                .bind(addr.clone())
                .build()
                .await
            {
                Ok(b2) => break b2,
                Err(e) => {
                    assert_eq!(e.id(), ErrorId::Io, "{e}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        };
        assert_ne!(b2.epoch(), first_epoch);
        let t2 = b2.taberna(TabernaId(10)).expect("taberna");
        spawn_echo(t2);
        for r in receipts {
            let err = r.await.expect_err("retained sends fail");
            assert_eq!(err.id(), ErrorId::PeerRestarted, "{err}");
        }
        let out = a
            .send(
                TabernaId(10),
                APP,
                Bytes::from_static(b"again"),
                send_opts(5_000),
            )
            .await
            .expect("new sends work");
        assert_eq!(
            out,
            Delivery::Replied(Bytes::from_static(b"echo:again").into())
        );
    })
    .await;
}

/// Admits `n` empty messages to taberna 10 (10 s timeout) and returns their receipts.
async fn admit_empty(a: &Domus, n: usize) -> Vec<vicus::Receipt> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(
            a.admit(TabernaId(10), APP, Bytes::new(), send_opts(10_000))
                .await
                .expect("admitted"),
        );
    }
    out
}

#[tokio::test]
async fn two_domus_dialling_each_other_at_once_end_with_one_callis() {
    within(async {
        let mut mesh = default_mesh();
        let a = mesh.domus("a").await.expect("domus");
        let b = mesh.domus("b").await.expect("domus");
        let DomusAddr::Tcp(a_addr) = addr_of(&a) else {
            unreachable!()
        };
        let DomusAddr::Tcp(b_addr) = addr_of(&b) else {
            unreachable!()
        };
        let to_a = FaultProxy::start(a_addr).await.expect("proxy");
        let to_b = FaultProxy::start(b_addr).await.expect("proxy");
        mesh.resolver().insert(
            TabernaId(1),
            DomusAddr::Tcp(to_a.addr()),
            Some(a.identity().clone()),
        );
        mesh.resolver().insert(
            TabernaId(2),
            DomusAddr::Tcp(to_b.addr()),
            Some(b.identity().clone()),
        );
        spawn_echo(a.taberna(TabernaId(1)).expect("taberna"));
        spawn_echo(b.taberna(TabernaId(2)).expect("taberna"));
        for round in 0..3 {
            let (x, y) = tokio::join!(
                a.send(
                    TabernaId(2),
                    APP,
                    Bytes::from_static(b"ab"),
                    send_opts(5_000)
                ),
                b.send(
                    TabernaId(1),
                    APP,
                    Bytes::from_static(b"ba"),
                    send_opts(5_000)
                ),
            );
            x.unwrap_or_else(|e| panic!("round {round} a->b: {e}"));
            y.unwrap_or_else(|e| panic!("round {round} b->a: {e}"));
        }
        // Let the losing callis close.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while to_a.connections() + to_b.connections() != 1 && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(
            to_a.connections() + to_b.connections(),
            1,
            "exactly one callis survives (a side {} / b side {})",
            to_a.connections(),
            to_b.connections()
        );
        let (x, y) = tokio::join!(
            a.send(TabernaId(2), APP, Bytes::new(), send_opts(5_000)),
            b.send(TabernaId(1), APP, Bytes::new(), send_opts(5_000)),
        );
        assert!(x.is_ok() && y.is_ok());
        assert_eq!(to_a.connections() + to_b.connections(), 1);
    })
    .await;
}

#[tokio::test]
async fn shutdown_finishes_within_its_bound_and_refuses_new_work() {
    within(async {
        let mut mesh = default_mesh();
        let a = mesh.domus("a").await.expect("domus");
        let b = mesh.domus("b").await.expect("domus");
        mesh.route(TabernaId(10), &b).expect("route");
        spawn_echo(b.taberna(TabernaId(10)).expect("taberna"));
        for _ in 0..50 {
            a.send(TabernaId(10), APP, Bytes::new(), send_opts(5_000))
                .await
                .expect("send");
        }
        let started = tokio::time::Instant::now();
        b.shutdown().await;
        a.shutdown().await;
        let took = started.elapsed();
        assert!(took < Duration::from_secs(2), "shutdown took {took:?}");
        assert_eq!(a.task_count(), 0);
        let err = a
            .send(TabernaId(10), APP, Bytes::new(), send_opts(5_000))
            .await
            .expect_err("closed");
        assert_eq!(err.id(), ErrorId::DomusClosed);
        assert_eq!(
            a.taberna(TabernaId(11)).expect_err("closed").id(),
            ErrorId::DomusClosed
        );
    })
    .await;
}

#[tokio::test]
async fn dropping_a_domus_leaves_no_task_running() {
    within(async {
        let metrics = tokio::runtime::Handle::current().metrics();
        let baseline = metrics.num_alive_tasks();
        {
            let mut mesh = default_mesh();
            let a = mesh.domus("a").await.expect("domus");
            let b = mesh.domus("b").await.expect("domus");
            mesh.route(TabernaId(10), &b).expect("route");
            spawn_echo(b.taberna(TabernaId(10)).expect("taberna"));
            for _ in 0..20 {
                a.send(TabernaId(10), APP, Bytes::new(), send_opts(5_000))
                    .await
                    .expect("send");
            }
            assert!(metrics.num_alive_tasks() > baseline);
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while metrics.num_alive_tasks() > baseline && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(metrics.num_alive_tasks(), baseline, "every task ended");
    })
    .await;
}

/// A codec for `u64` counters (big-endian), for the typed layer.
#[derive(Clone)]
struct U64Codec;

impl vicus::MessageCodec for U64Codec {
    type Message = u64;
    fn encode(&self, m: &u64) -> Result<Bytes, vicus::Error> {
        Ok(Bytes::copy_from_slice(&m.to_be_bytes()))
    }
    fn decode(&self, b: &Bytes) -> Result<u64, vicus::Error> {
        let raw: [u8; 8] = b.as_ref().try_into().map_err(|_| {
            vicus::Error::new(
                ErrorId::DecodeFailure,
                format!("{} bytes, expected 8", b.len()),
            )
        })?;
        Ok(u64::from_be_bytes(raw))
    }
}

#[tokio::test]
async fn typed_layer_parts_stream_and_receive_timeout() {
    within(async {
        let mut mesh = default_mesh();
        let a = mesh.domus("a").await.expect("domus");
        let b = mesh.domus("b").await.expect("domus");
        mesh.route(TabernaId(10), &b).expect("route");
        let mut t = b.taberna(TabernaId(10)).expect("taberna");
        let e = t
            .recv_timeout(Duration::from_millis(50))
            .await
            .expect_err("empty");
        assert_eq!(e.id(), ErrorId::ReceiveTimeout);
        // The worker consumes the taberna as a Stream and answers from another task.
        let worker = tokio::spawn(async move {
            use std::pin::Pin;
            let next =
                std::future::poll_fn(|cx| futures_core::Stream::poll_next(Pin::new(&mut t), cx));
            let request = next.await.expect("a request");
            let (parts, answer_handle) = request.into_parts();
            let n = u64::from_be_bytes(parts.payload.as_ref().try_into().expect("8 bytes"));
            tokio::spawn(async move {
                answer_handle.reply(Bytes::copy_from_slice(&(n + 1).to_be_bytes()));
            });
            parts.peer.id().clone()
        });
        let answer = a
            .send_typed(&U64Codec, TabernaId(10), APP, &41, send_opts(5_000))
            .await
            .expect("typed send");
        assert_eq!(answer, Some(42));
        assert_eq!(&worker.await.expect("join"), a.identity());
    })
    .await;
}

/// A resolver that never answers, or panics.
struct BadResolver {
    panic: bool,
}

impl vicus::RouteResolver for BadResolver {
    fn resolve(&self, _: TabernaId) -> vicus::resolve::ResolveFuture<'_> {
        if self.panic {
            panic!("resolver bug");
        }
        Box::pin(std::future::pending())
    }
}

#[tokio::test]
async fn t11_a_hanging_or_panicking_resolver_gives_an_error_not_a_hang() {
    within(async {
        let mut ca = ca();
        for panic in [false, true] {
            let (auth, _) = ca.domus_auth(if panic { "p" } else { "h" }).expect("mint");
            let mut config = DomusConfig::default();
            config.resolve_timeout = Duration::from_millis(200);
            let d = Domus::builder(auth)
                .resolver(Arc::new(BadResolver { panic }))
                .config(config)
                .build()
                .await
                .expect("domus");
            let started = tokio::time::Instant::now();
            let err = d
                .send(TabernaId(1), APP, Bytes::new(), send_opts(10_000))
                .await
                .expect_err("no route");
            assert_eq!(err.id(), ErrorId::PeerUnavailable, "{err}");
            assert!(started.elapsed() < Duration::from_secs(5));
            if panic {
                assert!(err.message().contains("panicked"), "{err}");
            } else {
                assert!(err.message().contains("resolve_timeout"), "{err}");
            }
        }
    })
    .await;
}

#[tokio::test]
async fn t11_a_route_without_identity_learns_and_pins_it() {
    within(async {
        let mut mesh = default_mesh();
        let a = mesh.domus("a").await.expect("domus");
        let b = mesh.domus("b").await.expect("domus");
        mesh.resolver().insert(TabernaId(10), addr_of(&b), None);
        spawn_echo(b.taberna(TabernaId(10)).expect("taberna"));
        for _ in 0..3 {
            let out = a
                .send(
                    TabernaId(10),
                    APP,
                    Bytes::from_static(b"?"),
                    send_opts(5_000),
                )
                .await
                .expect("send");
            assert_eq!(out, Delivery::Replied(Bytes::from_static(b"echo:?").into()));
        }
        assert_eq!(a.peer_count(), 1, "one peer, learned once");
        // A route that names the wrong identity is refused at the handshake.
        let c = mesh.domus("c").await.expect("domus");
        mesh.resolver()
            .insert(TabernaId(11), addr_of(&b), Some(c.identity().clone()));
        let err = a
            .send(TabernaId(11), APP, Bytes::new(), send_opts(5_000))
            .await
            .expect_err("misdirected");
        assert_eq!(err.id(), ErrorId::IdentityMismatch, "{err}");
        assert!(err.message().contains("expected"), "{err}");
    })
    .await;
}

#[tokio::test]
async fn t25_the_per_peer_byte_budget_bounds_what_a_slow_peer_pins() {
    within(async {
        let mut mesh = default_mesh();
        let mut config = DomusConfig::default();
        config.max_message_len = 600;
        config.max_in_flight_bytes_per_peer = 1000;
        let a = mesh.domus_with("a", config).await.expect("domus");
        let b = mesh.domus("b").await.expect("domus");
        mesh.route(TabernaId(10), &b).expect("route");
        let t = b.taberna(TabernaId(10)).expect("taberna");
        let held = a
            .admit(
                TabernaId(10),
                APP,
                Bytes::from(vec![1u8; 600]),
                send_opts(10_000),
            )
            .await
            .expect("first fits");
        let err = a
            .try_send(
                TabernaId(10),
                APP,
                Bytes::from(vec![2u8; 600]),
                send_opts(10_000),
            )
            .await
            .expect_err("over the byte budget");
        assert_eq!(err.id(), ErrorId::LocalQueueFull, "{err}");
        let err = a
            .send(
                TabernaId(10),
                APP,
                Bytes::from(vec![3u8; 600]),
                send_opts(200),
            )
            .await
            .expect_err("waits, then gives up");
        assert_eq!(
            err.id(),
            ErrorId::LocalQueueFull,
            "never sent, so not a SendTimeout: {err}"
        );
        // Small messages still fit beside the big one.
        spawn_echo(t);
        a.send(
            TabernaId(10),
            APP,
            Bytes::from(vec![4u8; 300]),
            send_opts(5_000),
        )
        .await
        .expect("fits");
        // The echo of 600 bytes is 605: over a's max_message_len, so it comes back refused.
        let echoed = held.await.expect_err("the echo is too large a reply");
        assert_eq!(echoed.id(), ErrorId::PayloadTooLarge, "{echoed}");
        // 595 bytes beside the 600 held before would not fit: the budget was returned (and
        // its 600-byte echo is within the limit).
        a.try_send(
            TabernaId(10),
            APP,
            Bytes::from(vec![5u8; 595]),
            send_opts(5_000),
        )
        .await
        .expect("budget returned");
    })
    .await;
}

#[tokio::test]
async fn messaging_over_a_unix_socket_shows_the_peer_process() {
    within(async {
        let dir = tempdir();
        let mut mesh = default_mesh();
        let a = mesh.domus("a").await.expect("domus");
        let (auth, _) = mesh.ca().domus_auth("b").expect("mint");
        let b = Domus::builder(auth)
            .bind(DomusAddr::unix(dir.join("b.sock")))
            .resolver(mesh.resolver().clone())
            .build()
            .await
            .expect("unix domus");
        mesh.route(TabernaId(10), &b).expect("route");
        let t = b.taberna(TabernaId(10)).expect("taberna");
        let seen = tokio::spawn(async move {
            let req = t.recv().await.expect("request");
            let creds = req.peer().unix_credentials();
            req.reply(Bytes::from_static(b"local"));
            creds
        });
        let out = a
            .send(TabernaId(10), APP, Bytes::new(), send_opts(5_000))
            .await
            .expect("send over the Unix socket");
        assert_eq!(out, Delivery::Replied(Bytes::from_static(b"local").into()));
        let creds = seen.await.expect("join").expect("Unix credentials");
        assert_eq!(creds.pid, Some(std::process::id() as i32));
    })
    .await;
}

/// A worker that replies to every request with as many bytes as its payload's first four
/// bytes say.
fn spawn_sized_replies(t: vicus::Taberna) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while let Some(req) = t.recv().await {
            let n = u32::from_be_bytes(req.payload()[..4].try_into().expect("4 bytes"));
            req.reply(Bytes::from(vec![7u8; n as usize]));
        }
    })
}

async fn reply_of(a: &Domus, taberna: u64, n: u32) -> Result<usize, ErrorId> {
    match a
        .send(
            TabernaId(taberna),
            APP,
            Bytes::copy_from_slice(&n.to_be_bytes()),
            send_opts(5_000),
        )
        .await
    {
        Ok(Delivery::Replied(p)) => Ok(p.len()),
        Ok(other) => panic!("{other:?}"),
        Err(e) => Err(e.id()),
    }
}

#[tokio::test]
async fn replies_are_held_to_max_message_len_on_both_ends_and_locally() {
    within(async {
        let mut mesh = default_mesh();
        let mut small = DomusConfig::default();
        small.max_message_len = 1000;
        // The sender's limit: a reply larger than the sender accepts is refused.
        let a = mesh.domus_with("a", small.clone()).await.expect("domus");
        let b = mesh.domus("b").await.expect("domus");
        mesh.route(TabernaId(10), &b).expect("route");
        spawn_sized_replies(b.taberna(TabernaId(10)).expect("taberna"));
        assert_eq!(reply_of(&a, 10, 1000).await, Ok(1000));
        assert_eq!(
            reply_of(&a, 10, 1001).await,
            Err(ErrorId::PayloadTooLarge),
            "a reply one byte over the sender's max_message_len"
        );
        // The receiver's own limit applies to what it sends back.
        let c = mesh.domus_with("c", small.clone()).await.expect("domus");
        mesh.route(TabernaId(11), &c).expect("route");
        spawn_sized_replies(c.taberna(TabernaId(11)).expect("taberna"));
        assert_eq!(reply_of(&b, 11, 1000).await, Ok(1000));
        assert_eq!(
            reply_of(&b, 11, 1001).await,
            Err(ErrorId::PayloadTooLarge),
            "a reply one byte over the receiver's max_message_len"
        );
        // And a taberna on the same domus.
        spawn_sized_replies(a.taberna(TabernaId(12)).expect("taberna"));
        assert_eq!(reply_of(&a, 12, 1000).await, Ok(1000));
        assert_eq!(reply_of(&a, 12, 1001).await, Err(ErrorId::PayloadTooLarge));
        // The callis survives: the next send is answered.
        assert_eq!(reply_of(&a, 10, 10).await, Ok(10));
    })
    .await;
}

#[tokio::test]
async fn a_peer_that_shuts_down_ends_every_waiting_send_at_once_with_a_documented_error() {
    within(async {
        let mut mesh = default_mesh();
        let mut config = DomusConfig::default();
        config.max_in_flight_per_peer = 500;
        let a = mesh.domus_with("a", config).await.expect("domus");
        let b = mesh.domus("b").await.expect("domus");
        mesh.route(TabernaId(10), &b).expect("route");
        // b's handler takes every request and never answers.
        let t = b.taberna(TabernaId(10)).expect("taberna");
        let (held_tx, mut held_rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Some(req) = t.recv().await {
                let _ = held_tx.send(req);
            }
        });
        let mut in_flight = Vec::new();
        for n in 0u32..500 {
            in_flight.push(
                a.admit(
                    TabernaId(10),
                    APP,
                    Bytes::copy_from_slice(&n.to_be_bytes()),
                    send_opts(10_000),
                )
                .await
                .expect("admitted"),
            );
        }
        let mut held = Vec::new();
        while held.len() < 500 {
            held.push(held_rx.recv().await.expect("delivered"));
        }
        // 50 more wait for room: every in-flight slot is taken.
        let (ended_tx, mut ended_rx) = tokio::sync::mpsc::unbounded_channel();
        for _ in 0..50 {
            let send = a.send(TabernaId(10), APP, Bytes::new(), send_opts(10_000));
            let ended = ended_tx.clone();
            tokio::spawn(async move {
                let _ = ended.send(("waiting", send.await, tokio::time::Instant::now()));
            });
        }
        for receipt in in_flight {
            let ended = ended_tx.clone();
            tokio::spawn(async move {
                let _ = ended.send(("in flight", receipt.await, tokio::time::Instant::now()));
            });
        }
        drop(ended_tx);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            ended_rx.try_recv().is_err(),
            "nothing ends before the shutdown"
        );
        let started = tokio::time::Instant::now();
        b.shutdown().await;
        let shut = tokio::time::Instant::now();
        let mut outcomes = std::collections::BTreeMap::<(&str, ErrorId), usize>::new();
        let mut latest = shut;
        for _ in 0..550 {
            let (kind, result, at) = tokio::time::timeout(Duration::from_secs(5), ended_rx.recv())
                .await
                .expect("every send ends")
                .expect("an outcome");
            let e = result.expect_err("nothing can succeed");
            assert_eq!(
                e.outcome_unknown(),
                kind == "in flight",
                "only what a handler held may have been acted on: {e}"
            );
            *outcomes.entry((kind, e.id())).or_default() += 1;
            latest = latest.max(at);
        }
        println!(
            "shutdown took {:?}; the last send ended {:?} after it returned: {outcomes:?}",
            shut - started,
            latest - shut
        );
        // "At once", against the 10 s deadline: 100 ms was exceeded in 2 of 600 runs on a
        // loaded 2-core machine (108 and 178 ms) although every send ended correctly.
        assert!(
            latest - shut < Duration::from_secs(1),
            "every send ends within 1 s of the peer's shutdown, long before its deadline ({:?})",
            latest - shut
        );
        // The handler had the 500: the receiver answered them before it closed, so their
        // outcome is unknown, and says so; the 50 were never sent.
        assert_eq!(
            outcomes.into_iter().collect::<Vec<_>>(),
            vec![
                (("in flight", ErrorId::PeerShutDown), 500),
                (("waiting", ErrorId::PeerShutDown), 50),
            ]
        );
        drop(held);
    })
    .await;
}

/// Issue 20 item 7 on real sockets: the round above (500 sends held by the peer's handler, 50
/// waiting for room, then the peer shuts down) 100 times, each with a new peer, on a two-thread
/// runtime, where a waiting send and the peer's driver run side by side. Before the fix the
/// driver could read the answers that freed the room and the CLOSE, and retire (the peer shut
/// down), while waiting sends had not taken that room yet: they then went to a new driver that
/// did not know, which dialled, was refused, and kept them to their deadline (`PeerUnavailable
/// … Connection refused`): in three runs before the fix, round 0, 0 and 2 failed so (traced:
/// the driver retired 0.3–0.5 ms after reading the CLOSE, the first waiting send came 0.1 ms
/// later). `tests/sim.rs` makes that interleaving happen in every round.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_sends_end_with_peer_shut_down_in_100_rounds_on_two_threads() {
    const IN_FLIGHT: u32 = 500;
    const WAITING: usize = 50;
    within(async {
        let mut mesh = default_mesh();
        let mut config = DomusConfig::default();
        config.max_in_flight_per_peer = IN_FLIGHT;
        let a = mesh.domus_with("a", config).await.expect("domus");
        let started = tokio::time::Instant::now();
        let mut slowest = Duration::ZERO;
        for round in 0..100 {
            let b = mesh.domus(&format!("b{round}")).await.expect("domus");
            mesh.route(TabernaId(10), &b).expect("route");
            let t = b.taberna(TabernaId(10)).expect("taberna");
            let (ended_tx, mut ended_rx) = tokio::sync::mpsc::unbounded_channel();
            let send = |kind: &'static str| {
                let send = a.send(TabernaId(10), APP, Bytes::new(), send_opts(10_000));
                let ended = ended_tx.clone();
                tokio::spawn(async move {
                    let _ = ended.send((kind, send.await));
                });
            };
            for _ in 0..IN_FLIGHT {
                send("in flight");
            }
            let mut held = Vec::new();
            while held.len() < IN_FLIGHT as usize {
                held.push(t.recv().await.expect("delivered"));
            }
            for _ in 0..WAITING {
                send("waiting");
            }
            drop(ended_tx);
            // The waiting sends queue for room.
            tokio::time::sleep(Duration::from_millis(5)).await;
            let shut = tokio::time::Instant::now();
            b.shutdown().await;
            let mut ended = 0;
            while let Some((kind, result)) = ended_rx.recv().await {
                let e = result.expect_err("nothing can succeed");
                assert!(
                    e.id() == ErrorId::PeerShutDown && e.outcome_unknown() == (kind == "in flight"),
                    "round {round}: a send {kind} ended {:?} after the shutdown with: {e}",
                    shut.elapsed()
                );
                ended += 1;
            }
            assert_eq!(ended, IN_FLIGHT as usize + WAITING);
            slowest = slowest.max(shut.elapsed());
            drop(held);
        }
        println!(
            "100 rounds in {:?}; the slowest ended {slowest:?} after its shutdown",
            started.elapsed()
        );
        assert!(
            slowest < Duration::from_secs(5),
            "every round ends long before the sends' 10 s deadline ({slowest:?})"
        );
    })
    .await;
}

#[tokio::test]
async fn a_send_to_an_unreachable_peer_says_so_whichever_queue_it_waited_in() {
    within(async {
        let mut mesh = default_mesh();
        let mut config = fast_backoff();
        config.max_in_flight_per_peer = 2;
        let a = mesh.domus_with("a", config).await.expect("domus");
        // A port nothing listens on.
        let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let dead = closed.local_addr().expect("addr");
        drop(closed);
        mesh.resolver()
            .insert(TabernaId(10), DomusAddr::Tcp(dead), Some(id("ghost")));
        let sends: Vec<_> = (0..4)
            .map(|_| tokio::spawn(a.send(TabernaId(10), APP, Bytes::new(), send_opts(300))))
            .collect();
        for (n, send) in sends.into_iter().enumerate() {
            let e = send.await.expect("join").expect_err("unreachable");
            assert_eq!(
                e.id(),
                ErrorId::PeerUnavailable,
                "send {n} (two held a slot, two waited for one): {e}"
            );
            assert!(
                e.message().contains(&dead.to_string()),
                "send {n} carries the last dial error: {e}"
            );
            assert!(!e.outcome_unknown(), "never sent: {e}");
        }
        // A message the peer could have received ends as SendTimeout: b got it, then its
        // callis was cut and b could no longer be reached.
        let b = mesh.domus("b").await.expect("domus");
        let proxy = mesh
            .route_through_proxy(TabernaId(11), &b)
            .await
            .expect("proxy");
        let t = b.taberna(TabernaId(11)).expect("taberna");
        let silent = tokio::spawn(a.send(TabernaId(11), APP, Bytes::new(), send_opts(500)));
        let req = t.recv().await.expect("delivered");
        proxy.set_refuse(true);
        proxy.cut_all();
        let e = silent.await.expect("join").expect_err("no answer");
        assert_eq!(
            e.id(),
            ErrorId::SendTimeout,
            "it may have been delivered: {e}"
        );
        assert!(e.outcome_unknown());
        drop(req);
    })
    .await;
}

#[tokio::test]
async fn a_route_change_reaches_messages_already_waiting_for_the_peer() {
    within(async {
        let mut mesh = default_mesh();
        let a = mesh.domus_with("a", fast_backoff()).await.expect("domus");
        let b = mesh.domus("b").await.expect("domus");
        let old_path = mesh
            .route_through_proxy(TabernaId(10), &b)
            .await
            .expect("proxy");
        let t = b.taberna(TabernaId(10)).expect("taberna");
        tokio::spawn(async move {
            while let Some(req) = t.recv().await {
                req.accept();
            }
        });
        a.send(TabernaId(10), APP, Bytes::new(), send_opts(5_000))
            .await
            .expect("the old path works");
        // The old path goes dark (connections are accepted, nothing gets through: a redial
        // there would wait for handshake_timeout, 10 s) and the callis on it is cut.
        old_path.set_blackhole(true);
        old_path.cut_all();
        let mut receipts = Vec::new();
        for _ in 0..300 {
            receipts.push(
                a.admit(TabernaId(10), APP, Bytes::new(), send_opts(20_000))
                    .await
                    .expect("admitted"),
            );
        }
        assert!(
            eventually(Duration::from_secs(10), || old_path.total_accepted() >= 2).await,
            "a redialled the old path: {} accepted there",
            old_path.total_accepted()
        );
        // The route moves to b's own address; no new send is made.
        let moved = tokio::time::Instant::now();
        mesh.route(TabernaId(10), &b).expect("route");
        for (n, r) in receipts.into_iter().enumerate() {
            let out = tokio::time::timeout(Duration::from_secs(3), r)
                .await
                .unwrap_or_else(|_| panic!("send {n} still waits 3 s after the route changed"));
            assert_eq!(out, Ok(Delivery::Accepted), "send {n}");
        }
        println!(
            "300 retained sends answered {:?} after the route changed",
            moved.elapsed()
        );
    })
    .await;
}

/// Carries calles over in-memory duplex pipes instead of sockets: a dial to `<name>.sim:1`
/// hands the other end of a fresh pipe to the domus registered under that name.
#[derive(Default)]
struct DuplexNet {
    domus: std::sync::Mutex<std::collections::HashMap<String, Domus>>,
}

impl vicus::a0_transport::Connector for DuplexNet {
    fn connect<'a>(&'a self, addr: &'a DomusAddr) -> vicus::a0_transport::ConnectFuture<'a> {
        Box::pin(async move {
            let DomusAddr::TcpHost { host, .. } = addr else {
                return Err(std::io::Error::other("not a simulated address"));
            };
            let target = self.domus.lock().expect("lock").get(host).cloned();
            let target = target.ok_or_else(|| {
                std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "no such domus")
            })?;
            let (near, far) = tokio::io::duplex(256 * 1024);
            target.accept_stream(far).map_err(std::io::Error::other)?;
            Ok(Box::new(near) as Box<dyn vicus::a0_transport::CallisStream>)
        })
    }
}

#[tokio::test]
async fn calles_can_be_carried_by_an_in_memory_stream_instead_of_a_socket() {
    within(async {
        let mut mesh = default_mesh();
        let net = Arc::new(DuplexNet::default());
        let mut domus = Vec::new();
        for name in ["a", "b"] {
            let (auth, _) = mesh.ca().domus_auth(name).expect("mint");
            let d = Domus::builder(auth)
                .resolver(mesh.resolver().clone())
                .connector(net.clone())
                .build()
                .await
                .expect("build");
            net.domus
                .lock()
                .expect("lock")
                .insert(format!("{name}.sim"), d.clone());
            domus.push(d);
        }
        let (a, b) = (&domus[0], &domus[1]);
        for (taberna, to, name) in [(10, b, "b"), (20, a, "a")] {
            mesh.resolver().insert(
                TabernaId(taberna),
                DomusAddr::TcpHost {
                    host: format!("{name}.sim"),
                    port: 1,
                },
                Some(to.identity().clone()),
            );
        }
        spawn_echo(b.taberna(TabernaId(10)).expect("taberna"));
        spawn_echo(a.taberna(TabernaId(20)).expect("taberna"));
        let out = a
            .send(
                TabernaId(10),
                APP,
                Bytes::from_static(b"hi"),
                send_opts(5_000),
            )
            .await
            .expect("a to b over the pipe");
        assert_eq!(
            out,
            Delivery::Replied(Bytes::from_static(b"echo:hi").into())
        );
        let out = b
            .send(
                TabernaId(20),
                APP,
                Bytes::from_static(b"yo"),
                send_opts(5_000),
            )
            .await
            .expect("b to a over the pipe");
        assert_eq!(
            out,
            Delivery::Replied(Bytes::from_static(b"echo:yo").into())
        );
        // Nothing went through either listener: every callis is a pipe.
        for d in [a, b] {
            assert_eq!(d.reporting().snapshot().listener.admitted, 0);
        }
        assert_eq!(a.reporting().connected_peers(), vec![b.identity().clone()]);
        for d in domus.iter() {
            d.shutdown().await;
        }
    })
    .await;
}

const PIPELINED: MessageType = MessageType::app(7);

#[tokio::test]
async fn a_destination_resolves_once_follows_route_changes_and_pipelines_through_a_window() {
    within(async {
        let mut mesh = default_mesh();
        let a = mesh.domus_with("a", fast_backoff()).await.expect("domus");
        let b = mesh.domus("b").await.expect("domus");
        let c = mesh.domus("c").await.expect("domus");
        mesh.route(TabernaId(10), &b).expect("route");
        // b and c both serve taberna 10 and say who they are.
        for d in [&b, &c] {
            let t = d.taberna(TabernaId(10)).expect("taberna");
            let me = d.identity().to_string();
            tokio::spawn(async move {
                let mut batch = Vec::new();
                while t.recv_many(&mut batch, 64).await > 0 {
                    for req in batch.drain(..) {
                        req.reply(Bytes::from(me.clone()));
                    }
                }
            });
        }
        let dest = a.destination(TabernaId(10));
        assert_eq!(dest.peer(), None, "nothing resolved yet");
        let out = dest
            .send(PIPELINED, Bytes::new())
            .await
            .expect("through the destination");
        assert_eq!(
            out,
            Delivery::Replied(Bytes::from(b.identity().to_string()).into())
        );
        assert_eq!(dest.peer().as_ref(), Some(b.identity()));
        // The route moves to c: the destination follows it without being told.
        mesh.route(TabernaId(10), &c).expect("route");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let out = dest.send(PIPELINED, Bytes::new()).await.expect("send");
            if out == Delivery::Replied(Bytes::from(c.identity().to_string()).into()) {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "still sent to b: {out:?}"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(dest.peer().as_ref(), Some(c.identity()));
        // A window keeps at most its limit in flight and yields outcomes in send order.
        let mut window = dest.window(64);
        let mut early = 0;
        for _ in 0..5_000 {
            if let Some(outcome) = window
                .send(PIPELINED, Bytes::new())
                .await
                .expect("admitted")
            {
                outcome.expect("answered");
                early += 1;
            }
            assert!(window.len() <= 64);
        }
        assert_eq!(early, 5_000 - 64, "one outcome per send past the limit");
        let rest = window.drain().await;
        assert_eq!(rest.len(), 64);
        assert!(rest.iter().all(Result::is_ok));
        assert!(window.is_empty());
        // A destination to a taberna on the same domus goes the local way.
        let local = a.taberna(TabernaId(30)).expect("taberna");
        spawn_echo(local);
        let here = a.destination(TabernaId(30));
        assert_eq!(
            here.send(PIPELINED, Bytes::from_static(b"x")).await,
            Ok(Delivery::Replied(Bytes::from_static(b"echo:x").into()))
        );
        assert_eq!(here.peer(), None);
        // Its errors are the domus's: an unknown taberna, a non-application type.
        let nowhere = a.destination(TabernaId(99));
        assert_eq!(
            nowhere
                .send(PIPELINED, Bytes::new())
                .await
                .map_err(|e| e.id()),
            Err(ErrorId::UnknownTaberna)
        );
        let e = dest
            .send(MessageType(0x0001_0005), Bytes::new())
            .await
            .expect_err("A2 is not for applications");
        assert_eq!(e.id(), ErrorId::InvalidMessageType);
    })
    .await;
}

#[tokio::test]
async fn recv_many_takes_a_burst_in_one_wake_up_and_ends_at_shutdown() {
    within(async {
        let mut mesh = default_mesh();
        let a = mesh.domus("a").await.expect("domus");
        let b = mesh.domus("b").await.expect("domus");
        mesh.route(TabernaId(10), &b).expect("route");
        let t = b.taberna(TabernaId(10)).expect("taberna");
        let dest = a.destination(TabernaId(10));
        let mut receipts = Vec::new();
        for _ in 0..200 {
            receipts.push(
                dest.admit(PIPELINED, Bytes::new(), SendOptions::default())
                    .await
                    .expect("admitted"),
            );
        }
        // Wait until all 200 are in the inbox, then one call takes at most its limit.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while t.queued() < 200 {
            assert!(tokio::time::Instant::now() < deadline, "{}", t.queued());
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let mut batch = Vec::new();
        assert_eq!(t.recv_many(&mut batch, 150).await, 150);
        assert_eq!(t.recv_many(&mut batch, 150).await, 50, "what was left");
        assert_eq!(batch.len(), 200);
        for req in batch.drain(..) {
            req.accept();
        }
        for r in receipts {
            assert_eq!(r.await, Ok(Delivery::Accepted));
        }
        b.shutdown().await;
        assert_eq!(t.recv_many(&mut batch, 10).await, 0, "ended");
    })
    .await;
}

#[tokio::test]
async fn disconnect_closes_the_calles_keeps_what_is_unanswered_and_the_next_callis_delivers_it() {
    within(async {
        let mut mesh = default_mesh();
        let a = mesh.domus_with("a", fast_backoff()).await.expect("domus");
        let b = mesh.domus("b").await.expect("domus");
        mesh.route(TabernaId(10), &b).expect("route");
        let t = b.taberna(TabernaId(10)).expect("taberna");
        let dest = a.destination(TabernaId(10));
        // One request is held by b's handler while the callis goes away.
        let held = dest
            .admit(PIPELINED, Bytes::from_static(b"held"), send_opts(10_000))
            .await
            .expect("admitted");
        let req = t.recv().await.expect("delivered");
        assert_eq!(a.reporting().snapshot().totals.primary_calles_opened, 1);
        // The sender sees which certificate its peer presented.
        let probe = transport(mesh.ca(), "probe");
        let seen = probe
            .dial(&addr_of(&b), Some(b.identity()))
            .await
            .expect("probe")
            .peer()
            .fingerprint();
        let report = a.reporting().snapshot().per_peer;
        let of_b = report.iter().find(|p| &p.peer == b.identity()).expect("b");
        assert_eq!(of_b.identity.as_ref().map(|i| i.fingerprint()), Some(seen));

        a.disconnect(b.identity()).expect("a session with b");
        // The callis closes, and one is dialled again at once (a message waits for it).
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let totals = a.reporting().snapshot().totals;
            if totals.primary_calles_closed >= 1 && totals.primary_calles_opened >= 2 {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "{totals:?}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // The handler answers now; the message is replayed on the next callis (dialled at
        // once: it is unanswered) and answered from b's dedupe window, exactly once.
        req.accept();
        assert_eq!(held.await, Ok(Delivery::Accepted));
        spawn_echo(t);
        assert_eq!(
            dest.send(PIPELINED, Bytes::from_static(b"again")).await,
            Ok(Delivery::Replied(Bytes::from_static(b"echo:again").into()))
        );
        assert_eq!(a.reporting().snapshot().totals.primary_calles_opened, 2);
        assert_eq!(
            a.disconnect(&id("stranger")).map_err(|e| e.id()),
            Err(ErrorId::PeerUnavailable)
        );
    })
    .await;
}

#[tokio::test]
async fn send_futures_stay_small() {
    within(async {
        let mut mesh = default_mesh();
        let a = mesh.domus("a").await.expect("domus");
        let d = a.destination(TabernaId(1));
        let sizes = [
            (
                "Domus::admit",
                std::mem::size_of_val(&a.admit(TabernaId(1), APP, Bytes::new(), send_opts(1))),
            ),
            (
                "Destination::send",
                std::mem::size_of_val(&d.send(APP, Bytes::new())),
            ),
            (
                "Destination::admit",
                std::mem::size_of_val(&d.admit(APP, Bytes::new(), send_opts(1))),
            ),
            ("Window::send", {
                let mut w = d.window(4);
                std::mem::size_of_val(&w.send(APP, Bytes::new()))
            }),
        ];
        println!("{sizes:?}");
        for (what, size) in sizes {
            assert!(size <= 512, "{what} is {size} bytes");
        }
        // The plain send does more (a route lookup per send) and stays within 1 KiB.
        let plain = std::mem::size_of_val(&a.send(TabernaId(1), APP, Bytes::new(), send_opts(1)));
        assert!(plain <= 1024, "Domus::send is {plain} bytes");
    })
    .await;
}

#[tokio::test]
async fn an_inline_taberna_answers_on_the_driver_with_the_same_semantics() {
    use vicus::taberna::InlineAnswer;
    within(async {
        let mut mesh = default_mesh();
        let a = mesh.domus("a").await.expect("domus");
        let b = mesh.domus("b").await.expect("domus");
        mesh.route(TabernaId(10), &b).expect("route");
        mesh.route(TabernaId(11), &b).expect("route");
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let log = seen.clone();
        let inline = b
            .taberna_inline(
                TabernaId(10),
                vicus::TabernaOptions::default(),
                move |req: vicus::taberna::InlineRequest<'_>| {
                    log.lock().expect("lock").push(req.peer().id().clone());
                    match req.payload().as_ref() {
                        b"accept" => InlineAnswer::Accept,
                        b"reject" => InlineAnswer::Reject {
                            code: 9,
                            reason: "no".into(),
                        },
                        b"panic" => panic!("a handler bug"),
                        b"slow" => {
                            std::thread::sleep(Duration::from_millis(3));
                            InlineAnswer::Accept
                        }
                        other => InlineAnswer::Reply(Bytes::copy_from_slice(other)),
                    }
                },
            )
            .expect("inline taberna");
        let to = a.destination(TabernaId(10));
        assert_eq!(
            to.send(PIPELINED, Bytes::from_static(b"accept")).await,
            Ok(Delivery::Accepted)
        );
        assert_eq!(
            to.send(PIPELINED, Bytes::from_static(b"ping")).await,
            Ok(Delivery::Replied(Bytes::from_static(b"ping").into()))
        );
        let e = to
            .send(PIPELINED, Bytes::from_static(b"reject"))
            .await
            .expect_err("rejected");
        assert_eq!(e.rejection().map(|r| r.code), Some(9));
        // A panicking handler answers RequestDropped; the callis lives on.
        let e = to
            .send(PIPELINED, Bytes::from_static(b"panic"))
            .await
            .expect_err("dropped");
        assert_eq!(e.id(), ErrorId::RequestDropped, "{e}");
        assert_eq!(
            to.send(PIPELINED, Bytes::from_static(b"accept")).await,
            Ok(Delivery::Accepted)
        );
        assert!(
            seen.lock()
                .expect("lock")
                .iter()
                .all(|id| id == a.identity())
        );
        // A slow handler is made visible: one call in 64 is timed.
        for _ in 0..128 {
            to.send(PIPELINED, Bytes::from_static(b"slow"))
                .await
                .expect("slow");
        }
        let slow = b.reporting().snapshot().totals.inline_handlers_slow;
        assert!(slow >= 1, "{slow}");
        assert!(b.reporting().snapshot().totals.messages_received >= 133);
        // Blobs are refused; a local send goes through the same handler.
        let e = a
            .send_blob(TabernaId(10), PIPELINED, Bytes::new(), send_opts(5_000))
            .await
            .expect_err("no blobs");
        assert_eq!(e.id(), ErrorId::MessageTypeNotAccepted, "{e}");
        assert_eq!(
            b.send(
                TabernaId(10),
                PIPELINED,
                Bytes::from_static(b"me"),
                send_opts(5_000)
            )
            .await,
            Ok(Delivery::Replied(Bytes::from_static(b"me").into()))
        );
        // The usual options apply, and dropping it unregisters the taberna.
        let _fenced = b
            .taberna_inline(
                TabernaId(11),
                vicus::TabernaOptions::default().allowed_peers([id("someone-else")]),
                |_: vicus::taberna::InlineRequest<'_>| InlineAnswer::Accept,
            )
            .expect("inline taberna");
        let e = a
            .send(TabernaId(11), PIPELINED, Bytes::new(), send_opts(5_000))
            .await
            .expect_err("forbidden");
        assert_eq!(e.id(), ErrorId::Forbidden);
        drop(inline);
        let e = to.send(PIPELINED, Bytes::new()).await.expect_err("gone");
        assert_eq!(e.id(), ErrorId::UnknownTaberna);
    })
    .await;
}

#[tokio::test]
async fn a_dial_only_domus_binds_nothing_yet_sends_streams_blobs_and_is_reached_over_its_own_callis()
 {
    within(async {
        let mut mesh = default_mesh();
        let b = mesh.domus("b").await.expect("domus");
        let (auth, _) = mesh.ca().domus_auth("client").expect("mint");
        let client = Domus::builder(auth)
            .resolver(mesh.resolver().clone())
            .config(fast_backoff())
            .dial_only()
            .build()
            .await
            .expect("build a dial-only domus");
        assert_eq!(client.local_addr(), None);
        // No accept loop: one task fewer than a listening domus with no peers.
        assert_eq!(client.task_count() + 1, b.task_count());
        mesh.route(TabernaId(10), &b).expect("route");
        spawn_echo(b.taberna(TabernaId(10)).expect("taberna"));
        let dest = client.destination(TabernaId(10));
        assert_eq!(
            dest.send(APP, Bytes::from_static(b"hi")).await,
            Ok(Delivery::Replied(Bytes::from_static(b"echo:hi").into()))
        );

        // A blob goes out on a second callis the client dials too.
        let sink = b.taberna(TabernaId(11)).expect("taberna");
        mesh.route(TabernaId(11), &b).expect("route");
        let reader = tokio::spawn(async move {
            let mut req = sink.recv().await.expect("request");
            let rx = req.blob().expect("a blob");
            req.accept();
            let mut all = Vec::new();
            let mut rx = rx;
            tokio::io::AsyncReadExt::read_to_end(&mut rx, &mut all)
                .await
                .expect("read");
            all
        });
        let mut tx = client
            .send_blob(TabernaId(11), APP, Bytes::new(), send_opts(5_000))
            .await
            .expect("blob opened");
        let body = vec![7u8; 300_000];
        tokio::io::AsyncWriteExt::write_all(&mut tx, &body)
            .await
            .expect("write");
        tx.finish().await.expect("finish");
        assert_eq!(reader.await.expect("join"), body);

        // b reaches the client's taberna over the callis the client dialled: the route names
        // the client's identity, and its address is never dialled (nothing listens there).
        let inbox = client.taberna(TabernaId(20)).expect("taberna");
        spawn_echo(inbox);
        let empty = common::tempdir();
        let nowhere = empty.join("nobody-listens.sock");
        mesh.resolver().insert(
            TabernaId(20),
            DomusAddr::unix(nowhere),
            Some(client.identity().clone()),
        );
        assert_eq!(
            b.send(
                TabernaId(20),
                APP,
                Bytes::from_static(b"push"),
                send_opts(5_000)
            )
            .await,
            Ok(Delivery::Replied(Bytes::from_static(b"echo:push").into()))
        );
        let totals = client.reporting().snapshot();
        assert_eq!(totals.listener.admitted, 0, "{:?}", totals.listener);
        assert_eq!(b.reporting().snapshot().totals.primary_calles_opened, 1);
    })
    .await;
}

#[tokio::test]
async fn replies_kept_for_replay_share_one_domus_wide_budget_and_are_freed_once_seen() {
    within(async {
        let mut mesh = default_mesh();
        let mut config = DomusConfig::default();
        config.max_retained_reply_bytes = 1 << 20;
        let b = mesh.domus_with("b", config).await.expect("domus");
        mesh.route(TabernaId(10), &b).expect("route");
        let t = b.taberna(TabernaId(10)).expect("taberna");
        const BIG: usize = 600 * 1024;
        tokio::spawn(async move {
            while let Some(req) = t.recv().await {
                if req.payload().as_ref() == b"big" {
                    req.reply(Bytes::from(vec![1u8; BIG]));
                } else {
                    req.accept();
                }
            }
        });
        let mut clients = Vec::new();
        for name in ["c1", "c2"] {
            let (auth, _) = mesh.ca().domus_auth(name).expect("mint");
            let c = Domus::builder(auth)
                .resolver(mesh.resolver().clone())
                .dial_only()
                .build()
                .await
                .expect("client");
            clients.push(c.destination(TabernaId(10)));
        }
        let retained = || b.reporting().snapshot().retained_reply_bytes;
        let big = || Bytes::from_static(b"big");
        let replied = |d: Result<Delivery, vicus::Error>| {
            matches!(d, Ok(Delivery::Replied(r)) if r.len() == BIG)
        };
        assert!(replied(clients[0].send(APP, big()).await));
        assert_eq!(retained(), BIG as u64);
        // Each peer alone would fit; together they do not: the second reply is sent, not kept.
        assert!(replied(clients[1].send(APP, big()).await));
        assert_eq!(retained(), BIG as u64);
        // c1 moves on: its DONE_BELOW tells b the big reply was seen, and b frees it.
        for _ in 0..70 {
            assert_eq!(
                clients[0].send(APP, Bytes::from_static(b"small")).await,
                Ok(Delivery::Accepted)
            );
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
        while retained() != 0 {
            assert!(tokio::time::Instant::now() < deadline, "{}", retained());
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // The cap is live: at 0 nothing more is kept.
        b.config()
            .update(|c| c.max_retained_reply_bytes = 0)
            .expect("update");
        assert!(replied(clients[1].send(APP, big()).await));
        assert_eq!(retained(), 0);
    })
    .await;
}

#[tokio::test]
async fn a_window_yields_in_send_order_when_answers_come_out_of_order_and_loses_nothing_to_a_dropped_wait()
 {
    within(async {
        let mut mesh = default_mesh();
        let a = mesh.domus("a").await.expect("domus");
        let b = mesh.domus("b").await.expect("domus");
        mesh.route(TabernaId(10), &b).expect("route");
        let t = b.taberna(TabernaId(10)).expect("taberna");
        let mut window = a.destination(TabernaId(10)).window(8);
        for n in 0u8..8 {
            assert_eq!(
                window
                    .send(APP, Bytes::from(vec![n]))
                    .await
                    .map_err(|e| e.id()),
                Ok(None)
            );
        }
        // The handler holds all eight, then answers them newest first.
        let mut held = Vec::new();
        while held.len() < 8 {
            held.push(t.recv().await.expect("request"));
        }
        // Waiting for the oldest and giving up on the wait (a timeout, a select) loses nothing.
        assert!(
            tokio::time::timeout(Duration::from_millis(50), window.next())
                .await
                .is_err()
        );
        assert_eq!(window.len(), 8);
        for req in held.into_iter().rev() {
            let n = req.payload()[0];
            req.reply(Bytes::from(vec![n]));
        }
        for n in 0u8..8 {
            assert_eq!(
                window.next().await,
                Some(Ok(Delivery::Replied(Bytes::from(vec![n]).into()))),
                "outcome {n} in send order"
            );
        }
        assert_eq!(window.next().await, None);
        // Sends still in a window when their peer's domus shuts down fail, not hang.
        for n in 0u8..4 {
            window
                .send(APP, Bytes::from(vec![n]))
                .await
                .expect("admitted");
        }
        let mut held = Vec::new();
        while held.len() < 4 {
            held.push(t.recv().await.expect("request"));
        }
        b.shutdown().await;
        drop(held);
        for outcome in window.drain().await {
            let e = outcome.expect_err("b shut down before answering");
            assert!(
                matches!(e.id(), ErrorId::PeerShutDown | ErrorId::RequestDropped),
                "{e}"
            );
        }
    })
    .await;
}

/// Waits for `PeerDisconnected` about `peer` on `events` and returns its reason.
async fn disconnected_reason(
    events: &mut vicus::reporting::EventReceiver,
    peer: &vicus::DomusId,
) -> Option<vicus::Error> {
    use vicus::reporting::{Event, FeedItem};
    loop {
        match events.recv().await {
            Some(FeedItem::Item(Event::PeerDisconnected { peer: p, reason })) if &p == peer => {
                return reason;
            }
            Some(_) => {}
            None => panic!("the event feed ended"),
        }
    }
}

/// Issue 13: a half-open callis (the link goes dark: no FIN, no reset, nothing gets through)
/// is found by `idle_timeout` on both sides, and the messages written into the dark are
/// replayed on the next callis once the link is back, each delivered exactly once.
#[tokio::test]
async fn a_half_open_callis_is_found_by_idle_timeout_on_both_sides_and_its_messages_are_replayed() {
    within(async {
        let mut mesh = Mesh::new().expect("mesh");
        let mut config = Mesh::test_config();
        config.keepalive_interval = Duration::from_millis(50);
        config.idle_timeout = Duration::from_millis(400);
        mesh.set_config(config);
        let a = mesh.domus("a").await.expect("domus");
        let b = mesh.domus("b").await.expect("domus");
        let proxy = mesh
            .route_through_proxy(TabernaId(10), &b)
            .await
            .expect("proxy");
        let t = b.taberna(TabernaId(10)).expect("taberna");
        let (seen_tx, mut seen_rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Some(req) = t.recv().await {
                let _ = seen_tx.send(req.payload().clone());
                req.accept();
            }
        });
        let first = a
            .send(
                TabernaId(10),
                APP,
                Bytes::from_static(b"0"),
                send_opts(5_000),
            )
            .await
            .expect("before the link goes dark");
        assert_eq!(first, Delivery::Accepted);
        let mut a_events = a.reporting().events();
        let mut b_events = b.reporting().events();

        proxy.set_blackhole(true);
        let dark = tokio::time::Instant::now();
        let sends: Vec<_> = (1..=10u8)
            .map(|n| {
                tokio::spawn(a.send(TabernaId(10), APP, Bytes::from(vec![n]), send_opts(15_000)))
            })
            .collect();
        // Both ends notice on their own, from silence alone.
        let (a_reason, b_reason) = tokio::join!(
            disconnected_reason(&mut a_events, b.identity()),
            disconnected_reason(&mut b_events, a.identity()),
        );
        let found = dark.elapsed();
        for reason in [a_reason, b_reason] {
            let reason = reason.expect("a reason");
            assert_eq!(reason.id(), ErrorId::ConnectionLost, "{reason}");
            assert!(reason.message().contains("idle_timeout"), "{reason}");
        }
        // idle_timeout counts from the last byte received, up to one keepalive interval (50 ms)
        // before the link went dark.
        assert!(found >= Duration::from_millis(340), "found after {found:?}");
        println!("half-open callis found by both ends {found:?} after the link went dark");

        // The link comes back; connections stuck on the dark path are reset.
        proxy.set_blackhole(false);
        proxy.cut_all();
        for send in sends {
            let out = send
                .await
                .expect("join")
                .expect("replayed on the next callis");
            assert_eq!(out, Delivery::Accepted);
        }
        let mut seen = Vec::new();
        while let Ok(p) = seen_rx.try_recv() {
            seen.push(p);
        }
        seen.sort();
        let mut want: Vec<Bytes> = (1..=10u8).map(|n| Bytes::from(vec![n])).collect();
        want.push(Bytes::from_static(b"0"));
        want.sort();
        assert_eq!(seen, want, "each message delivered exactly once");
    })
    .await;
}

/// T2 while connected: a peer's certificate expires under an open callis. The callis keeps
/// working until `max_callis_age` replaces it; the replacement handshake is refused as
/// expired, the old callis is retired, and sends from then on fail at once as not delivered,
/// naming the expiry.
#[tokio::test]
async fn t02_a_certificate_that_expires_under_an_open_callis_ends_its_use_by_max_callis_age() {
    within(async {
        let mut mesh = default_mesh();
        let mut config = Mesh::test_config();
        config.max_callis_age = Some(Duration::from_millis(1500));
        mesh.set_config(config.clone());
        let a = mesh.domus("a").await.expect("domus");
        // b's certificate is valid for about three more seconds (certificates count whole
        // seconds).
        let mut spec = vicus::dev_certs::LeafSpec::domus("b");
        spec.not_after = std::time::SystemTime::now() + Duration::from_secs(3);
        let leaf = mesh.ca().leaf_with(&spec).expect("mint");
        let auth = mesh.ca().auth_config(&leaf).expect("auth");
        let b = mesh
            .builder_for(auth)
            .config(config)
            .build()
            .await
            .expect("b");
        mesh.route(TabernaId(10), &b).expect("route");
        spawn_echo(b.taberna(TabernaId(10)).expect("taberna"));
        let out = a
            .send(
                TabernaId(10),
                APP,
                Bytes::from_static(b"1"),
                send_opts(5_000),
            )
            .await
            .expect("while valid");
        assert_eq!(out, Delivery::Replied(Bytes::from_static(b"echo:1").into()));
        // Past not_after, plus the ages at which the callis is replaced (1.5 s) and closed
        // by the side that accepted it (1.25 times that), sends stop being delivered: sent
        // until the first one fails, which must say why.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        let err = loop {
            let out = a
                .send(
                    TabernaId(10),
                    APP,
                    Bytes::from_static(b"2"),
                    send_opts(3_000),
                )
                .await;
            match out {
                Ok(out) => assert_eq!(out, Delivery::Replied(Bytes::from_static(b"echo:2").into())),
                // Written on the old callis as it closed: its outcome is honestly unknown
                // (it ends at its deadline, as any send in flight through a close with no
                // callis after it). The sends after it are the ones that must fail at once.
                Err(err) if err.id() == ErrorId::SendTimeout && err.outcome_unknown() => {}
                Err(err) => break err,
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "an expired peer is still used 20 s on"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert!(!err.outcome_unknown(), "{err}");
        assert!(err.message().contains("expired"), "{err}");
    })
    .await;
}

/// Issue 14, addressing: a send can name the domus as well as the taberna. A server sends to
/// a dial-only client over the callis the client opened (no route, no address); a domus the
/// resolver knows by identity only is reached without any taberna entry; the domus itself is
/// local; a domus nobody can reach ends as not delivered at the deadline.
#[tokio::test]
async fn destination_on_reaches_a_named_domus_without_a_taberna_route() {
    within(async {
        let mut mesh = Mesh::new().expect("mesh");
        let server = mesh.domus("server").await.expect("server");
        let client = mesh
            .builder("client")
            .expect("mint")
            .dial_only()
            .build()
            .await
            .expect("client");
        let c = mesh.domus("c").await.expect("c");
        mesh.route(TabernaId(1), &server).expect("route");
        spawn_echo(server.taberna(TabernaId(1)).expect("taberna"));
        // The client's own taberna: it has no address, and no route names it.
        spawn_echo(client.taberna(TabernaId(50)).expect("taberna"));
        spawn_echo(c.taberna(TabernaId(60)).expect("taberna"));
        assert_eq!(
            client
                .send(
                    TabernaId(1),
                    APP,
                    Bytes::from_static(b"hi"),
                    send_opts(5_000)
                )
                .await
                .expect("client -> server"),
            Delivery::Replied(Bytes::from_static(b"echo:hi").into())
        );
        // Back to the client over its own callis.
        let back = server.destination_on(client.identity(), TabernaId(50));
        assert_eq!(
            back.send(APP, Bytes::from_static(b"push"))
                .await
                .expect("server -> dial-only client"),
            Delivery::Replied(Bytes::from_static(b"echo:push").into())
        );
        // A domus known to the resolver by identity only.
        mesh.resolver()
            .insert_domus(c.identity().clone(), addr_of(&c));
        assert_eq!(
            server
                .destination_on(c.identity(), TabernaId(60))
                .send(APP, Bytes::from_static(b"c"))
                .await
                .expect("server -> c by identity"),
            Delivery::Replied(Bytes::from_static(b"echo:c").into())
        );
        // This domus itself: local.
        assert_eq!(
            server
                .destination_on(server.identity(), TabernaId(1))
                .send(APP, Bytes::from_static(b"me"))
                .await
                .expect("local"),
            Delivery::Replied(Bytes::from_static(b"echo:me").into())
        );
        // Nobody knows where "ghost" is and it never called: not delivered, at the deadline.
        let err = server
            .destination_on(&id("ghost"), TabernaId(1))
            .send_with(
                APP,
                Bytes::from_static(b"?"),
                SendOptions::default().timeout(Duration::from_millis(300)),
            )
            .await
            .expect_err("unreachable");
        assert!(!err.outcome_unknown(), "{err}");
        println!("to an unknown domus: {err}");
    })
    .await;
}

/// Domus named `names`, each serving `taberna` by accepting and counting what it gets.
async fn replicas(
    mesh: &mut Mesh,
    names: &[&str],
    taberna: TabernaId,
) -> (Vec<Domus>, Vec<Arc<std::sync::atomic::AtomicU64>>) {
    let mut replicas = Vec::new();
    let mut counts = Vec::new();
    for name in names {
        let r = mesh.domus(name).await.expect("replica");
        let t = r.taberna(taberna).expect("taberna");
        let n = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let seen = n.clone();
        tokio::spawn(async move {
            while let Some(req) = t.recv().await {
                seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                req.accept();
            }
        });
        counts.push(n);
        replicas.push(r);
    }
    (replicas, counts)
}

/// Issue 14, replicas: a taberna served by several domus. Sends spread by weight among the
/// lowest priority; replicas that shut down are skipped and the next priority takes over.
#[tokio::test]
async fn sends_spread_over_replicas_by_priority_and_weight_and_skip_the_ones_that_are_down() {
    use std::sync::atomic::Ordering;
    use vicus::{Candidate, Route};
    within(async {
        let mut mesh = Mesh::new().expect("mesh");
        // a avoids a replica it found down for reconnect_backoff_max: long enough here for
        // every send below, however slow the machine.
        let mut config = Mesh::test_config();
        config.reconnect_backoff_max = Duration::from_secs(30);
        let a = mesh.domus_with("a", config).await.expect("a");
        let (replicas, counts) = replicas(&mut mesh, &["r1", "r2", "r3"], TabernaId(77)).await;
        let candidate = |r: &Domus, priority, weight| Candidate {
            route: Route {
                addr: addr_of(r),
                identity: Some(r.identity().clone()),
            },
            priority,
            weight,
        };
        mesh.resolver().insert_candidates(
            TabernaId(77),
            vec![
                candidate(&replicas[0], 0, 1),
                candidate(&replicas[1], 0, 3),
                candidate(&replicas[2], 1, 1),
            ],
        );
        for _ in 0..400 {
            let out = a
                .send(
                    TabernaId(77),
                    APP,
                    Bytes::from_static(b"x"),
                    send_opts(5_000),
                )
                .await
                .expect("send");
            assert_eq!(out, Delivery::Accepted);
        }
        let got: Vec<u64> = counts.iter().map(|c| c.load(Ordering::SeqCst)).collect();
        println!("400 sends over weights 1 / 3 (priority 0) and 1 (priority 1): {got:?}");
        assert_eq!(
            got[2], 0,
            "the priority-1 replica waits while priority 0 is up"
        );
        assert_eq!(got[0] + got[1], 400);
        assert!((50..=160).contains(&got[0]), "weight 1 of 4: {got:?}");
        // Priority 0 goes away: its replicas say so as they shut down, and sends move on.
        replicas[0].shutdown().await;
        replicas[1].shutdown().await;
        let gone = [
            replicas[0].identity().clone(),
            replicas[1].identity().clone(),
        ];
        assert!(
            eventually(Duration::from_secs(10), || {
                a.reporting()
                    .snapshot()
                    .per_peer
                    .iter()
                    .all(|p| !gone.contains(&p.peer) || !p.connected)
            })
            .await,
            "a saw the priority-0 replicas go: {:?}",
            a.reporting().snapshot().per_peer
        );
        for _ in 0..20 {
            let out = a
                .send(
                    TabernaId(77),
                    APP,
                    Bytes::from_static(b"y"),
                    send_opts(5_000),
                )
                .await
                .expect("send to the remaining replica");
            assert_eq!(out, Delivery::Accepted);
        }
        assert_eq!(counts[2].load(Ordering::SeqCst), 20);
    })
    .await;
}

/// Issue 14, safe failover: a replica crashes; sends that chose it before anyone knew, and so
/// never went out on any callis, are handed to the other replica and delivered once there.
/// Nothing that may have reached the dead replica is sent again.
#[tokio::test]
async fn sends_that_never_left_for_a_dead_replica_are_delivered_by_another() {
    use std::sync::atomic::Ordering;
    use vicus::{Candidate, Route};
    within(async {
        let mut mesh = Mesh::new().expect("mesh");
        let a = mesh.domus("a").await.expect("a");
        let (mut replicas, counts) = replicas(&mut mesh, &["r1", "r2"], TabernaId(88)).await;
        let candidates = replicas
            .iter()
            .map(|r| {
                Candidate::new(Route {
                    addr: addr_of(r),
                    identity: Some(r.identity().clone()),
                })
            })
            .collect();
        mesh.resolver().insert_candidates(TabernaId(88), candidates);
        // Both replicas are connected and used.
        for _ in 0..40 {
            a.send(
                TabernaId(88),
                APP,
                Bytes::from_static(b"warm"),
                send_opts(5_000),
            )
            .await
            .expect("warm up");
        }
        let before: Vec<u64> = counts.iter().map(|c| c.load(Ordering::SeqCst)).collect();
        assert!(before.iter().all(|n| *n > 0), "{before:?}");
        // r1 crashes (no shutdown, no CLOSE: its callis just ends, its port refuses).
        let r1 = mesh.remove("r1").expect("r1");
        let r1_delivered = counts[0].clone();
        let Some(DomusAddr::Tcp(r1_addr)) = r1.local_addr().cloned() else {
            panic!("r1 listens on TCP");
        };
        drop(replicas.remove(0));
        drop(r1);
        // Its tasks have ended once its port refuses.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(r1_addr).await.is_ok() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "r1's port still accepts after it crashed"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let frozen = r1_delivered.load(Ordering::SeqCst);
        // Sends made now still choose r1 about half the time (nothing says it is down yet);
        // those are never written anywhere, and end up at r2 — well before their deadline.
        let started = tokio::time::Instant::now();
        let sends: Vec<_> = (0..40)
            .map(|_| {
                tokio::spawn(a.send(
                    TabernaId(88),
                    APP,
                    Bytes::from_static(b"after"),
                    send_opts(10_000),
                ))
            })
            .collect();
        for s in sends {
            let out = s.await.expect("join").expect("delivered by a replica");
            assert_eq!(out, Delivery::Accepted);
        }
        let took = started.elapsed();
        println!("40 sends after r1 died: all accepted in {took:?}");
        assert!(
            took < Duration::from_secs(5),
            "failed over, not timed out: {took:?}"
        );
        assert_eq!(
            r1_delivered.load(Ordering::SeqCst),
            frozen,
            "nothing reached the dead"
        );
        assert_eq!(counts[1].load(Ordering::SeqCst), before[1] + 40);
    })
    .await;
}

/// The mesh's routes, answered on the second poll: the domus cannot read them at once, so a
/// send that chose an unreachable replica is not handed to another (failover asks only a
/// resolver that answers at once). What such a send chooses in the first place is all that
/// keeps it from a replica that is down — the replica choice's reachability view.
struct AnswersLater(Arc<vicus::SimpleResolver>);

impl vicus::RouteResolver for AnswersLater {
    fn resolve(&self, taberna: TabernaId) -> vicus::resolve::ResolveFuture<'_> {
        Box::pin(async move {
            tokio::task::yield_now().await;
            self.0.resolve(taberna).await
        })
    }

    fn candidates(&self, taberna: TabernaId) -> vicus::resolve::CandidatesFuture<'_> {
        Box::pin(async move {
            tokio::task::yield_now().await;
            self.0.candidates(taberna).await
        })
    }

    fn changes(&self) -> Option<vicus::RouteChanges> {
        self.0.changes()
    }
}

/// Issue 21 (the replica choice as a pure function fed a reachability view): a replica whose
/// peer the domus still holds, with its last dial failed, is not chosen while another can be
/// reached — even where failover could not rescue the send.
#[tokio::test]
async fn a_replica_whose_dial_failed_is_not_chosen_while_another_can_be_reached() {
    use std::sync::atomic::Ordering;
    use vicus::{Candidate, Route};
    within(async {
        let mut mesh = Mesh::new().expect("mesh");
        let mut config = Mesh::test_config();
        config.reconnect_backoff_max = Duration::from_secs(30);
        let a = mesh
            .builder("a")
            .expect("a")
            .resolver(Arc::new(AnswersLater(mesh.resolver().clone())))
            .config(config)
            .build()
            .await
            .expect("a");
        let (replicas, counts) = replicas(&mut mesh, &["r2"], TabernaId(66)).await;
        // "ghost" is listed at a port where nothing listens.
        let ghost_addr = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            DomusAddr::tcp(l.local_addr().expect("addr"))
        };
        let ghost = Candidate::new(Route {
            addr: ghost_addr,
            identity: Some("spiffe://vicus.dev/domus/ghost".parse().expect("id")),
        });
        let r2 = Candidate::new(Route {
            addr: addr_of(&replicas[0]),
            identity: Some(replicas[0].identity().clone()),
        });
        // A send while ghost is the only candidate waits for it: its peer stays in a's
        // table, and its dial fails.
        mesh.resolver()
            .insert_candidates(TabernaId(66), vec![ghost.clone()]);
        let waiting = tokio::spawn(a.send(
            TabernaId(66),
            APP,
            Bytes::from_static(b"to the ghost"),
            send_opts(25_000),
        ));
        assert!(
            eventually(Duration::from_secs(10), || {
                a.reporting().snapshot().totals.dial_failures > 0
            })
            .await,
            "a's dial to the ghost failed"
        );
        // Now r2 serves it too, with the same priority and weight: every send goes there.
        mesh.resolver()
            .insert_candidates(TabernaId(66), vec![ghost, r2]);
        for i in 0..40 {
            let out = a
                .send(
                    TabernaId(66),
                    APP,
                    Bytes::from_static(b"x"),
                    send_opts(3_000),
                )
                .await
                .unwrap_or_else(|e| panic!("send {i} went to the ghost: {e}"));
            assert_eq!(out, Delivery::Accepted);
        }
        assert_eq!(counts[0].load(Ordering::SeqCst), 40);
        assert!(
            !waiting.is_finished(),
            "the ghost's send still waits for it"
        );
        waiting.abort();
    })
    .await;
}

/// Issue 21, the other half of the reachability view: a replica that shut down, whose peer
/// the domus has forgotten, is remembered as down and not chosen (for
/// `reconnect_backoff_max`) while another can be reached — even where failover could not
/// rescue the send.
#[tokio::test]
async fn a_forgotten_replica_that_shut_down_is_not_chosen_while_another_can_be_reached() {
    use std::sync::atomic::Ordering;
    use vicus::{Candidate, Route};
    within(async {
        let mut mesh = Mesh::new().expect("mesh");
        let mut config = Mesh::test_config();
        config.reconnect_backoff_max = Duration::from_secs(30);
        let a = mesh
            .builder("a")
            .expect("a")
            .resolver(Arc::new(AnswersLater(mesh.resolver().clone())))
            .config(config)
            .build()
            .await
            .expect("a");
        let (replicas, counts) = replicas(&mut mesh, &["r1", "r2"], TabernaId(67)).await;
        let candidates = replicas
            .iter()
            .map(|r| {
                Candidate::new(Route {
                    addr: addr_of(r),
                    identity: Some(r.identity().clone()),
                })
            })
            .collect();
        mesh.resolver().insert_candidates(TabernaId(67), candidates);
        // a talks to r1 (and so will see its CLOSE).
        for _ in 0..100 {
            if counts[0].load(Ordering::SeqCst) > 0 {
                break;
            }
            a.send(
                TabernaId(67),
                APP,
                Bytes::from_static(b"warm"),
                send_opts(5_000),
            )
            .await
            .expect("warm up");
        }
        assert!(
            counts[0].load(Ordering::SeqCst) > 0,
            "r1 was chosen at least once"
        );
        let r1_delivered = counts[0].load(Ordering::SeqCst);
        let r2_before = counts[1].load(Ordering::SeqCst);
        replicas[0].shutdown().await;
        // a forgets r1 (it shut down and nothing is in flight): r1 leaves a's peer report.
        let r1 = replicas[0].identity().clone();
        assert!(
            eventually(Duration::from_secs(10), || {
                a.reporting()
                    .snapshot()
                    .per_peer
                    .iter()
                    .all(|p| p.peer != r1)
            })
            .await,
            "a forgot r1: {:?}",
            a.reporting().snapshot().per_peer
        );
        for i in 0..40 {
            let out = a
                .send(
                    TabernaId(67),
                    APP,
                    Bytes::from_static(b"y"),
                    send_opts(3_000),
                )
                .await
                .unwrap_or_else(|e| panic!("send {i} went to r1, which shut down: {e}"));
            assert_eq!(out, Delivery::Accepted);
        }
        assert_eq!(counts[0].load(Ordering::SeqCst), r1_delivered);
        assert_eq!(counts[1].load(Ordering::SeqCst), r2_before + 40);
    })
    .await;
}
