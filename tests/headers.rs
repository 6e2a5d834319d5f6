//! Message headers over real loopback mTLS: a message carries its headers (repeats and binary
//! values included) to a remote taberna, to a local one and with a blob's opening; messages
//! with and without headers pipelined together all arrive intact; over-limit headers are
//! refused with `HeadersTooLarge` by the sender at once and by a receiver with lower limits
//! before its handler sees them (the callis stays up); headers count toward
//! `max_message_len`.

mod common;

use bytes::Bytes;
use common::*;
use tokio::io::AsyncReadExt;
use vicus::{DomusConfig, ErrorId, Headers, MessageType, SendOptions, TabernaId};

const T: MessageType = MessageType::app(1);

fn some_headers(n: u32) -> Headers {
    Headers::new()
        .with("tenant", "acme")
        .expect("valid")
        .with("x-request-id", format!("req-{n}"))
        .expect("valid")
        .with("tenant", "second")
        .expect("valid")
        .with("bin", [0u8, 255, 10])
        .expect("valid")
}

#[tokio::test]
async fn headers_reach_remote_and_local_tabernas_and_blob_openings() {
    within(async {
        let mut mesh = default_mesh();
        let a = mesh.domus("a").await.expect("domus");
        let b = mesh.domus("b").await.expect("domus");
        mesh.route(TabernaId(1), &b).expect("route");
        let remote = b.taberna(TabernaId(1)).expect("taberna");
        let local = a.taberna(TabernaId(2)).expect("taberna");
        mesh.route(TabernaId(2), &a).expect("route");

        for (taberna, inbox) in [(TabernaId(1), &remote), (TabernaId(2), &local)] {
            let send = tokio::spawn(a.send(
                taberna,
                T,
                Bytes::from_static(b"payload"),
                SendOptions::default().headers(some_headers(7)),
            ));
            let request = inbox.recv().await.expect("a request");
            let h = request.headers();
            assert_eq!(h.len(), 4);
            assert_eq!(h.get_str("tenant"), Some("acme"));
            assert_eq!(h.get_str("x-request-id"), Some("req-7"));
            assert_eq!(h.get("bin"), Some(&[0u8, 255, 10][..]));
            let tenants: Vec<_> = h.iter().filter(|(k, _)| *k == "tenant").collect();
            assert_eq!(tenants.len(), 2);
            assert_eq!(&request.payload()[..], b"payload");
            request.accept();
            send.await.expect("join").expect("accepted");
        }

        // A blob's opening message carries them too.
        let opening = a.send_blob(
            TabernaId(1),
            T,
            Bytes::from_static(b"header"),
            SendOptions::default().headers(some_headers(9)),
        );
        let receiving = async {
            let mut request = remote.recv().await.expect("the blob's request");
            assert_eq!(request.headers().get_str("x-request-id"), Some("req-9"));
            let mut blob = request.blob().expect("a blob");
            request.accept();
            let mut got = Vec::new();
            blob.read_to_end(&mut got).await.expect("read");
            got
        };
        let sending = async {
            let mut sender = opening.await.expect("opened");
            sender
                .write_bytes(Bytes::from_static(b"blob bytes"))
                .await
                .expect("write");
            sender.finish().await.expect("finish");
        };
        let (got, ()) = tokio::join!(receiving, sending);
        assert_eq!(got, b"blob bytes");
    })
    .await;
}

#[tokio::test]
async fn messages_with_and_without_headers_pipelined_together_all_arrive_intact() {
    within(async {
        let mut mesh = default_mesh();
        let a = mesh.domus("a").await.expect("domus");
        let b = mesh.domus("b").await.expect("domus");
        mesh.route(TabernaId(1), &b).expect("route");
        let inbox = b.taberna(TabernaId(1)).expect("taberna");
        let n = 300u32;
        let mut window = a.destination(TabernaId(1)).window(64);
        let receiver = tokio::spawn(async move {
            let mut seen = Vec::new();
            for _ in 0..n {
                let r = inbox.recv().await.expect("a request");
                let i: u32 = std::str::from_utf8(r.payload())
                    .expect("utf8")
                    .parse()
                    .expect("a number");
                let carried = r.headers().get_str("x-request-id").map(str::to_owned);
                // Every third message carries headers; the others none.
                if i.is_multiple_of(3) {
                    assert_eq!(carried, Some(format!("req-{i}")), "message {i}");
                    assert_eq!(r.headers().len(), 4);
                } else {
                    assert!(r.headers().is_empty(), "message {i}");
                }
                seen.push(i);
                r.accept();
            }
            seen
        });
        for i in 0..n {
            let options = if i.is_multiple_of(3) {
                SendOptions::default().headers(some_headers(i))
            } else {
                SendOptions::default()
            };
            if let Some(oldest) = window
                .send_with(T, Bytes::from(i.to_string()), options)
                .await
                .expect("admitted")
            {
                oldest.expect("accepted");
            }
        }
        for outcome in window.drain().await {
            outcome.expect("accepted");
        }
        let mut seen = receiver.await.expect("receiver");
        seen.sort_unstable();
        assert_eq!(seen, (0..n).collect::<Vec<_>>());
    })
    .await;
}

#[tokio::test]
async fn over_limit_headers_are_refused_by_sender_and_receiver_with_headers_too_large() {
    within(async {
        let mut mesh = default_mesh();
        let a = mesh.domus("a").await.expect("domus");
        let mut strict = DomusConfig::default();
        strict.max_headers = 2;
        strict.max_headers_len = 64;
        let b = mesh.domus_with("b", strict).await.expect("domus");
        mesh.route(TabernaId(1), &b).expect("route");
        let inbox = b.taberna(TabernaId(1)).expect("taberna");

        // The receiver's limits: 4 headers are over its 2. Refused before the handler.
        let e = a
            .send(
                TabernaId(1),
                T,
                Bytes::from_static(b"x"),
                SendOptions::default().headers(some_headers(1)),
            )
            .await
            .expect_err("refused");
        assert_eq!(e.id(), ErrorId::HeadersTooLarge, "{e}");
        assert!(e.message().contains("receiver"), "{e}");
        // One long value: over its 64 bytes.
        let long = Headers::new().with("k", vec![b'v'; 100]).expect("valid");
        let e = a
            .send(
                TabernaId(1),
                T,
                Bytes::from_static(b"x"),
                SendOptions::default().headers(long),
            )
            .await
            .expect_err("refused");
        assert_eq!(e.id(), ErrorId::HeadersTooLarge, "{e}");

        // The callis stays up and the handler saw none of them: the next message is first.
        let ok = Headers::new().with("tenant", "acme").expect("valid");
        let send = tokio::spawn(a.send(
            TabernaId(1),
            T,
            Bytes::from_static(b"fine"),
            SendOptions::default().headers(ok),
        ));
        let request = inbox.recv().await.expect("a request");
        assert_eq!(&request.payload()[..], b"fine");
        request.accept();
        send.await.expect("join").expect("accepted");
        assert!(inbox.try_recv().is_none());

        // The sender's own limits: refused at once, nothing sent.
        let e = b
            .send(
                TabernaId(1),
                T,
                Bytes::from_static(b"x"),
                SendOptions::default().headers(some_headers(2)),
            )
            .await
            .expect_err("refused");
        assert_eq!(e.id(), ErrorId::HeadersTooLarge, "{e}");
        assert!(e.message().contains("this domus"), "{e}");
        assert!(inbox.try_recv().is_none());
    })
    .await;
}

#[tokio::test]
async fn headers_count_toward_max_message_len() {
    within(async {
        let mut mesh = default_mesh();
        let mut config = DomusConfig::default();
        config.max_message_len = 1024;
        let a = mesh.domus_with("a", config.clone()).await.expect("domus");
        let b = mesh.domus_with("b", config).await.expect("domus");
        mesh.route(TabernaId(1), &b).expect("route");
        let _inbox = b.taberna(TabernaId(1)).expect("taberna");
        let headers = Headers::new().with("k", vec![1u8; 100]).expect("valid");
        let e = a
            .send(
                TabernaId(1),
                T,
                Bytes::from(vec![0u8; 1000]),
                SendOptions::default().headers(headers),
            )
            .await
            .expect_err("too large");
        assert_eq!(e.id(), ErrorId::PayloadTooLarge, "{e}");
        assert!(e.message().contains("headers"), "{e}");
    })
    .await;
}

#[test]
fn invalid_headers_are_refused_when_built() {
    let mut h = Headers::new();
    assert_eq!(
        h.insert("Upper", "v").expect_err("refused").id(),
        ErrorId::InvalidHeader
    );
    assert_eq!(
        h.insert("traceparent", "not a context")
            .expect_err("refused")
            .id(),
        ErrorId::InvalidHeader
    );
    assert!(h.is_empty());
}

#[tokio::test]
async fn replies_carry_headers_back_from_remote_and_local_tabernas() {
    within(async {
        let mut mesh = default_mesh();
        let a = mesh.domus("a").await.expect("domus");
        let b = mesh.domus("b").await.expect("domus");
        mesh.route(TabernaId(1), &b).expect("route");
        mesh.route(TabernaId(2), &a).expect("route");
        let remote = b.taberna(TabernaId(1)).expect("taberna");
        let local = a.taberna(TabernaId(2)).expect("taberna");
        for (taberna, inbox) in [(TabernaId(1), &remote), (TabernaId(2), &local)] {
            let send = tokio::spawn(a.send(
                taberna,
                T,
                Bytes::from_static(b"question"),
                SendOptions::default(),
            ));
            let request = inbox.recv().await.expect("a request");
            let back = Headers::new()
                .with("content-type", "text/plain")
                .expect("valid")
                .with("x-served-by", "b")
                .expect("valid");
            request.reply_with_headers(Bytes::from_static(b"answer"), &back);
            let delivery = send.await.expect("join").expect("replied");
            let vicus::Delivery::Replied(reply) = delivery else {
                panic!("{delivery:?}");
            };
            assert_eq!(reply, Bytes::from_static(b"answer"));
            assert_eq!(reply.headers().get_str("content-type"), Some("text/plain"));
            assert_eq!(reply.headers().get_str("x-served-by"), Some("b"));
            // A reply without headers has none.
            let send = tokio::spawn(a.send(
                taberna,
                T,
                Bytes::from_static(b"again"),
                SendOptions::default(),
            ));
            inbox
                .recv()
                .await
                .expect("a request")
                .reply(Bytes::from_static(b"plain"));
            let delivery = send.await.expect("join").expect("replied");
            let vicus::Delivery::Replied(reply) = delivery else {
                panic!("{delivery:?}");
            };
            assert!(reply.headers().is_empty());
            assert_eq!(reply, Bytes::from_static(b"plain"));
        }
    })
    .await;
}

#[tokio::test]
async fn reply_headers_over_the_senders_limits_fail_the_send_with_headers_too_large() {
    within(async {
        let mut mesh = default_mesh();
        let mut strict = DomusConfig::default();
        strict.max_headers = 1;
        let a = mesh.domus_with("a", strict).await.expect("domus");
        let b = mesh.domus("b").await.expect("domus");
        mesh.route(TabernaId(1), &b).expect("route");
        let inbox = b.taberna(TabernaId(1)).expect("taberna");
        let send = tokio::spawn(a.send(
            TabernaId(1),
            T,
            Bytes::from_static(b"q"),
            SendOptions::default(),
        ));
        inbox
            .recv()
            .await
            .expect("a request")
            .reply_with_headers(Bytes::from_static(b"a"), &some_headers(3));
        let e = send.await.expect("join").expect_err("refused");
        assert_eq!(e.id(), ErrorId::HeadersTooLarge, "{e}");
        assert!(e.message().contains("reply"), "{e}");
    })
    .await;
}

#[tokio::test]
async fn a_batch_of_answers_carries_reply_headers() {
    within(async {
        let mut mesh = default_mesh();
        let a = mesh.domus("a").await.expect("domus");
        let b = mesh.domus("b").await.expect("domus");
        mesh.route(TabernaId(1), &b).expect("route");
        let inbox = b.taberna(TabernaId(1)).expect("taberna");
        let sends: Vec<_> = (0..3u8)
            .map(|i| {
                tokio::spawn(a.send(
                    TabernaId(1),
                    T,
                    Bytes::from(vec![i]),
                    SendOptions::default(),
                ))
            })
            .collect();
        let mut got = Vec::new();
        while got.len() < 3 {
            inbox.recv_many(&mut got, 3).await;
        }
        let mut answers = vicus::taberna::AnswerBatch::new();
        for request in got {
            let n = request.payload()[0];
            let headers = Headers::new().with("n", [n]).expect("valid");
            answers.reply_with_headers(request, Bytes::from_static(b"ok"), &headers);
        }
        answers.flush();
        for send in sends {
            let vicus::Delivery::Replied(reply) = send.await.expect("join").expect("replied")
            else {
                panic!("not a reply");
            };
            assert_eq!(reply, Bytes::from_static(b"ok"));
            assert_eq!(reply.headers().len(), 1);
        }
    })
    .await;
}
