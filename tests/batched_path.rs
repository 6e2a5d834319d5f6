//! The batched message path end to end over loopback mTLS: messages pipelined through a
//! window travel in MESSAGE_BATCH frames and are delivered to each taberna in runs; a taberna
//! whose handler is blocked does not stall another on the same callis (its bounded inbox
//! fills and further deliveries to it are refused `TabernaBusy`, while the driver keeps
//! delivering the rest); and a slow worker's answers, given all at once, come back in order.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use vicus::{Delivery, DomusConfig, ErrorId, MessageType, TabernaId, TabernaOptions};

const APP: MessageType = MessageType::app(1);

#[tokio::test]
async fn a_blocked_taberna_does_not_stall_another_on_the_same_callis() {
    within(async {
        let mut mesh = default_mesh();
        let a = mesh.domus("a").await.expect("domus");
        let b = mesh.domus("b").await.expect("domus");
        mesh.route(TabernaId(1), &b).expect("route");
        mesh.route(TabernaId(2), &b).expect("route");
        // Taberna 1's worker is stuck: it takes nothing until released.
        let stuck = b
            .taberna_with(TabernaId(1), TabernaOptions::default().inbox_depth(16))
            .expect("taberna 1");
        let (release, released) = tokio::sync::oneshot::channel::<()>();
        let stuck_worker = tokio::spawn(async move {
            let _ = released.await;
            let mut n = 0;
            while let Ok(Some(req)) =
                tokio::time::timeout(Duration::from_millis(500), stuck.recv()).await
            {
                req.accept();
                n += 1;
            }
            n
        });
        // Taberna 2 answers at once, inline.
        let _fast = b
            .taberna_inline(
                TabernaId(2),
                TabernaOptions::default(),
                |_req: vicus::taberna::InlineRequest<'_>| vicus::taberna::InlineAnswer::Accept,
            )
            .expect("taberna 2");
        // Interleaved: 64 to the stuck taberna, then 5,000 to the other on the same callis.
        let to_stuck = a.destination(TabernaId(1));
        let mut stuck_sends = Vec::new();
        for n in 0u32..64 {
            stuck_sends.push(tokio::spawn(
                to_stuck.send(APP, Bytes::copy_from_slice(&n.to_be_bytes())),
            ));
        }
        let mut window = a.destination(TabernaId(2)).window(1024);
        let started = std::time::Instant::now();
        let mut accepted = 0;
        for n in 0u32..5_000 {
            if let Some(outcome) = window
                .send(APP, Bytes::copy_from_slice(&n.to_be_bytes()))
                .await
                .expect("admitted")
            {
                assert_eq!(outcome.expect("accepted"), Delivery::Accepted);
                accepted += 1;
            }
        }
        for outcome in window.drain().await {
            assert_eq!(outcome.expect("accepted"), Delivery::Accepted);
            accepted += 1;
        }
        assert_eq!(accepted, 5_000);
        println!(
            "5,000 sends to taberna 2 answered in {:?} while taberna 1 is stuck",
            started.elapsed()
        );
        // The stuck taberna holds 16; every other send to it was refused (those refusals were
        // written before the 5,000 answers above; their tasks may still be waking up).
        assert!(
            eventually(Duration::from_secs(5), || {
                stuck_sends.iter().filter(|s| s.is_finished()).count() >= 48
            })
            .await,
            "48 refusals"
        );
        let mut busy = 0;
        let mut waiting = Vec::new();
        for send in stuck_sends {
            if send.is_finished() {
                let err = send.await.expect("task").expect_err("refused");
                assert_eq!(err.id(), ErrorId::TabernaBusy, "{err}");
                busy += 1;
            } else {
                waiting.push(send);
            }
        }
        assert_eq!(busy, 64 - 16, "the inbox holds 16");
        assert_eq!(waiting.len(), 16);
        release.send(()).expect("worker");
        for send in waiting {
            assert_eq!(
                send.await.expect("task").expect("accepted once released"),
                Delivery::Accepted
            );
        }
        assert_eq!(stuck_worker.await.expect("worker"), 16);
    })
    .await;
}

#[tokio::test]
async fn pipelined_sends_arrive_in_order_through_batches_to_a_worker_that_takes_them_many_at_once()
{
    within(async {
        let mut mesh = default_mesh();
        let a = mesh.domus("a").await.expect("domus");
        let b = mesh.domus("b").await.expect("domus");
        mesh.route(TabernaId(7), &b).expect("route");
        let t = b.taberna(TabernaId(7)).expect("taberna");
        const N: u32 = 20_000;
        let worker = tokio::spawn(async move {
            let mut next = 0u32;
            let mut buf = Vec::new();
            let mut most = 0;
            // The run's answers go back in one push per flush.
            let mut answers = vicus::taberna::AnswerBatch::new();
            while next < N {
                let got = t.recv_many(&mut buf, 4096).await;
                assert!(got > 0, "the inbox closed at {next}");
                most = most.max(got);
                for req in buf.drain(..) {
                    let n = u32::from_be_bytes(req.payload()[..4].try_into().expect("4 bytes"));
                    assert_eq!(n, next, "in send order");
                    next += 1;
                    answers.reply(req, Bytes::copy_from_slice(&n.to_be_bytes()));
                }
                assert_eq!(answers.len(), got);
                answers.flush();
                assert!(answers.is_empty());
            }
            most
        });
        let mut window = a.destination(TabernaId(7)).window(2048);
        let mut expect = 0u32;
        let mut check = |outcome: vicus::Outcome| {
            assert_eq!(
                outcome.expect("replied"),
                Delivery::Replied(Bytes::copy_from_slice(&expect.to_be_bytes()).into())
            );
            expect += 1;
        };
        for n in 0..N {
            if let Some(outcome) = window
                .send(APP, Bytes::copy_from_slice(&n.to_be_bytes()))
                .await
                .expect("admitted")
            {
                check(outcome);
            }
        }
        for outcome in window.drain().await {
            check(outcome);
        }
        assert_eq!(expect, N);
        let most = worker.await.expect("worker");
        println!("the worker took up to {most} requests at once");
        assert!(most > 1, "runs reach the worker's inbox together");
    })
    .await;
}

#[tokio::test]
async fn an_answer_batch_answers_local_and_remote_senders_once_even_when_dropped() {
    within(async {
        let mut mesh = default_mesh();
        let a = mesh.domus("a").await.expect("domus");
        let b = mesh.domus("b").await.expect("domus");
        mesh.route(TabernaId(9), &b).expect("route");
        let t = b.taberna(TabernaId(9)).expect("taberna");
        // One from a peer, one from b itself (a local send), one rejected.
        let remote = tokio::spawn(
            a.destination(TabernaId(9))
                .send(APP, Bytes::from_static(b"r")),
        );
        let local = tokio::spawn(
            b.destination(TabernaId(9))
                .send(APP, Bytes::from_static(b"l")),
        );
        let rejected = tokio::spawn(
            a.destination(TabernaId(9))
                .send(APP, Bytes::from_static(b"x")),
        );
        let mut reqs = Vec::new();
        while reqs.len() < 3 {
            t.recv_many(&mut reqs, 8).await;
        }
        {
            let mut answers = vicus::taberna::AnswerBatch::new();
            for req in reqs.drain(..) {
                match req.payload().as_ref() {
                    b"x" => answers.reject(req, 42, "no"),
                    b"l" => answers.reply(req, Bytes::from_static(b"local")),
                    _ => answers.accept(req),
                }
            }
            // The local answer went at once; the two remote ones wait for the drop.
            assert_eq!(answers.len(), 2);
        }
        assert_eq!(
            remote.await.expect("task").expect("accepted"),
            Delivery::Accepted
        );
        assert_eq!(
            local.await.expect("task").expect("replied"),
            Delivery::Replied(Bytes::from_static(b"local").into())
        );
        let err = rejected.await.expect("task").expect_err("rejected");
        assert_eq!(err.id(), ErrorId::RemoteTabernaRejected);
    })
    .await;
}

#[tokio::test]
async fn send_many_hands_bursts_over_in_batches_and_keeps_send_order_and_errors() {
    within(async {
        let mut mesh = default_mesh();
        let a = mesh.domus("a").await.expect("domus");
        let b = mesh.domus("b").await.expect("domus");
        mesh.route(TabernaId(5), &b).expect("route");
        let _echo = b
            .taberna_inline(
                TabernaId(5),
                TabernaOptions::default(),
                |req: vicus::taberna::InlineRequest<'_>| {
                    vicus::taberna::InlineAnswer::Reply(req.payload().clone())
                },
            )
            .expect("taberna");
        let mut window = a.destination(TabernaId(5)).window(256);
        let mut outcomes = Vec::new();
        let payloads =
            |range: std::ops::Range<u32>| range.map(|n| Bytes::copy_from_slice(&n.to_be_bytes()));
        let sent = window
            .send_many(APP, payloads(0..10_000), Default::default(), &mut outcomes)
            .await
            .expect("all admitted");
        assert_eq!(sent, 10_000);
        assert!(window.len() <= 256);
        outcomes.extend(window.drain().await);
        assert_eq!(outcomes.len(), 10_000);
        for (n, outcome) in (0u32..).zip(outcomes.drain(..)) {
            assert_eq!(
                outcome.expect("replied"),
                Delivery::Replied(Bytes::copy_from_slice(&n.to_be_bytes()).into()),
                "outcome {n} in send order"
            );
        }
        // A payload over the limit fails its stretch before any of it is sent.
        let limit = DomusConfig::default().max_message_len;
        let mut burst: Vec<Bytes> = payloads(0..10).collect();
        burst.push(Bytes::from(vec![0u8; limit + 1]));
        let err = window
            .send_many(APP, burst, Default::default(), &mut outcomes)
            .await
            .expect_err("too large");
        assert_eq!(err.id(), ErrorId::PayloadTooLarge);
        assert!(window.is_empty(), "nothing of the stretch was sent");
        // A local taberna takes the one-by-one path, with the same outcomes.
        let _local = a
            .taberna_inline(
                TabernaId(6),
                TabernaOptions::default(),
                |_req: vicus::taberna::InlineRequest<'_>| vicus::taberna::InlineAnswer::Accept,
            )
            .expect("local taberna");
        let mut local = a.destination(TabernaId(6)).window(8);
        let sent = local
            .send_many(APP, payloads(0..100), Default::default(), &mut outcomes)
            .await
            .expect("admitted");
        assert_eq!(sent, 100);
        outcomes.extend(local.drain().await);
        assert_eq!(outcomes.len(), 100);
        assert!(outcomes.iter().all(|o| o == &Ok(Delivery::Accepted)));
    })
    .await;
}
