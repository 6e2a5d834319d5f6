//! Feature `http-gateway`: `vicus::gateway` mounted in a real HTTP server on loopback and called
//! with real clients (reqwest, and `curl` as a process): every status of the table a send can
//! reach, InOut and InOnly, a 100 MiB blob streamed through with its checksum checked at the
//! taberna, a body over the limit refused before it is sent, 200 concurrent requests, a client
//! that never finishes its body, bearer tokens, HTTPS with client certificates, and the
//! Prometheus text of `/metrics` compared with the domus's snapshot. T35. Every listener is on
//! loopback (the rule for other addresses is a unit test in `gateway/serve.rs`).
//!
//! One file past 800 lines: the tests share the mesh of tabernas, the server and the client
//! helpers at its top, and each test is one row of the list.
#![cfg(feature = "http-gateway")]

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use vicus::gateway::{Access, BearerTokens, Gateway, GatewayConfig};
use vicus::reporting::{Event, FeedItem};
use vicus::{Domus, ErrorId, TabernaId, TabernaOptions};

const TOKEN: &str = "test-token-0123456789abcdef";

/// A gateway in front of `domus`, served by `vicus::gateway::serve` on an ephemeral loopback
/// port; the server task ends with the test's runtime.
async fn serve(domus: &Domus, config: GatewayConfig) -> (Gateway, SocketAddr) {
    let gateway = Gateway::new(domus, config).expect("gateway");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let g = gateway.clone();
    tokio::spawn(async move {
        vicus::gateway::serve(listener, g, std::future::pending())
            .await
            .expect("serve");
    });
    (gateway, addr)
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .expect("client")
}

/// POST `body` to taberna `id` with message type `app:1`; the status and the JSON body (or
/// `Null` for a body that is not JSON).
async fn post(
    addr: SocketAddr,
    id: u64,
    body: &'static [u8],
    extra: &[(&str, &str)],
) -> (u16, serde_json::Value, reqwest::header::HeaderMap) {
    let mut req = client()
        .post(format!("http://{addr}/tabernas/{id}"))
        .header("Vicus-Message-Type", "app:1")
        .body(body);
    for (k, v) in extra {
        req = req.header(*k, *v);
    }
    let response = req.send().await.expect("response");
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let bytes = response.bytes().await.expect("body");
    let json = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
    (status, json, headers)
}

/// Checks an error body: its name, its id, and the status.
fn assert_error(
    got: &(u16, serde_json::Value, reqwest::header::HeaderMap),
    status: u16,
    id: ErrorId,
) {
    assert_eq!(got.0, status, "{:?}", got.1);
    assert_eq!(got.1["error"], id.name(), "{:?}", got.1);
    assert_eq!(got.1["id"], id.as_u32(), "{:?}", got.1);
}

/// Taberna 1 echoes (payload and headers), 2 accepts, 3 rejects (code 7), 4 refuses the gateway's domus
/// (allow-list), 5 accepts only type app:9, 6 never answers and holds one request at most;
/// all on domus `b`, reached over loopback mTLS from the gateway's domus `gw`.
async fn mesh() -> (Mesh, Domus) {
    let mesh = Mesh::with_domus(&["gw", "b"]).await.expect("mesh");
    let b = mesh.get("b").expect("b");
    let echo = mesh.taberna("b", TabernaId(1)).expect("t1");
    tokio::spawn(async move {
        // Echoes the payload, and the message headers as the reply's.
        while let Some(mut r) = echo.recv().await {
            let payload = r.take_payload();
            let headers = r.headers().clone();
            r.reply_with_headers(payload, &headers);
        }
    });
    let sink = mesh.taberna("b", TabernaId(2)).expect("t2");
    tokio::spawn(async move {
        while let Some(r) = sink.recv().await {
            r.accept();
        }
    });
    let rejecting = mesh.taberna("b", TabernaId(3)).expect("t3");
    tokio::spawn(async move {
        while let Some(r) = rejecting.recv().await {
            r.reject(7, "no thanks");
        }
    });
    let other = DomusId::spiffe("vicus.dev", "someone-else").expect("id");
    let forbidden = b
        .taberna_with(
            TabernaId(4),
            TabernaOptions::default().allowed_peers([other]),
        )
        .expect("t4");
    let typed = b
        .taberna_with(
            TabernaId(5),
            TabernaOptions::default().accepted_types(0x0100_0009..=0x0100_0009),
        )
        .expect("t5");
    let silent = b
        .taberna_with(TabernaId(6), TabernaOptions::default().inbox_depth(1))
        .expect("t6");
    for t in [4, 5, 6] {
        mesh.route(TabernaId(t), &b).expect("route");
    }
    // Registered and never read: their requests wait until the senders give up.
    tokio::spawn(async move {
        let _kept = (forbidden, typed, silent);
        std::future::pending::<()>().await
    });
    // Taberna 7 is routed to b, where nothing is registered.
    mesh.route(TabernaId(7), &b).expect("route 7");
    // Taberna 8 is routed to a port where nothing listens.
    let dead = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let dead_addr = dead.local_addr().expect("addr");
    drop(dead);
    mesh.resolver().insert(
        TabernaId(8),
        vicus::DomusAddr::Tcp(dead_addr),
        Some(DomusId::spiffe("vicus.dev", "nobody").expect("id")),
    );
    let gw = mesh.get("gw").expect("gw");
    (mesh, gw)
}

use vicus::DomusId;

/// Each status a send can reach through the gateway, from a real client: the table's rows for
/// 200, 204, 400, 401, 403, 404, 413, 415, 422, 502, 503 (+ Retry-After) and 504 (outcome
/// unknown).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_status_a_send_can_reach() {
    within(async {
        let (_mesh, gw) = mesh().await;
        gw.config()
            .update(|c| {
                c.max_message_len = 1024;
                c.send_timeout = Duration::from_secs(2);
            })
            .expect("config");
        let mut config = GatewayConfig::default();
        config.request_timeout = Duration::from_secs(3);
        let (_g, addr) = serve(&gw, config).await;

        let replied = post(addr, 1, b"hello", &[]).await;
        assert_eq!(replied.0, 200);
        let reply = client()
            .post(format!("http://{addr}/tabernas/1?type=0x01000001"))
            .body("hello")
            .send()
            .await
            .expect("send");
        assert_eq!(reply.status().as_u16(), 200);
        assert_eq!(
            reply.bytes().await.expect("body"),
            Bytes::from_static(b"hello")
        );
        assert_eq!(post(addr, 2, b"x", &[]).await.0, 204);

        let rejected = post(addr, 3, b"x", &[]).await;
        assert_error(&rejected, 422, ErrorId::RemoteTabernaRejected);
        assert_eq!(rejected.1["rejection"]["code"], 7);
        assert_eq!(rejected.1["rejection"]["reason"], "no thanks");
        assert_error(&post(addr, 4, b"x", &[]).await, 403, ErrorId::Forbidden);
        assert_error(
            &post(addr, 5, b"x", &[]).await,
            415,
            ErrorId::MessageTypeNotAccepted,
        );
        assert_error(
            &post(addr, 7, b"x", &[]).await,
            404,
            ErrorId::UnknownTaberna,
        );
        assert_error(
            &post(addr, 1, &[b'x'; 2048], &[]).await,
            413,
            ErrorId::PayloadTooLarge,
        );
        let untyped = client()
            .post(format!("http://{addr}/tabernas/1"))
            .body("x")
            .send()
            .await
            .expect("send");
        assert_eq!(untyped.status().as_u16(), 400);
        let bad_id = client()
            .post(format!("http://{addr}/tabernas/not-a-number?type=app:1"))
            .send()
            .await
            .expect("send");
        assert_eq!(bad_id.status().as_u16(), 400);

        // 504: written to b, never answered: the outcome is unknown.
        let timed_out = post(addr, 6, b"first", &[]).await;
        assert_error(&timed_out, 504, ErrorId::SendTimeout);
        assert_eq!(timed_out.1["outcome_unknown"], true);
        // 503 + Retry-After: taberna 6's one-slot inbox still holds that request.
        let busy = post(addr, 6, b"second", &[]).await;
        assert_error(&busy, 503, ErrorId::TabernaBusy);
        assert_eq!(busy.2["retry-after"], "1");
        assert_eq!(busy.1["outcome_unknown"], false);

        // 502: nothing listens where taberna 8 is routed.
        let unreachable = post(addr, 8, b"x", &[]).await;
        assert_error(&unreachable, 502, ErrorId::PeerUnavailable);
        // No internal detail (the address) in the body by default.
        assert!(
            !unreachable.1.to_string().contains("127.0.0.1"),
            "{}",
            unreachable.1
        );

        // Every error is JSON, the router's own too.
        let wrong_method = client()
            .get(format!("http://{addr}/tabernas/1"))
            .send()
            .await
            .expect("get");
        assert_eq!(wrong_method.status().as_u16(), 405);
        let no_route = client()
            .get(format!("http://{addr}/nowhere"))
            .send()
            .await
            .expect("get");
        assert_eq!(no_route.status().as_u16(), 404);
        let body: serde_json::Value =
            serde_json::from_slice(&no_route.bytes().await.expect("body")).unwrap_or_default();
        assert_eq!(body["error"], "NotFound");

        // /healthz is open and says ok.
        let health = client()
            .get(format!("http://{addr}/healthz"))
            .send()
            .await
            .expect("healthz");
        assert_eq!(health.status().as_u16(), 200);
    })
    .await;
}

/// Bearer tokens: no token or a wrong one is 401 with `WWW-Authenticate`, the right one
/// passes; `/healthz` needs none.
#[tokio::test]
async fn bearer_tokens_guard_the_send_route() {
    within(async {
        let (_mesh, gw) = mesh().await;
        let tokens = BearerTokens::new([TOKEN]).expect("tokens");
        let (_g, addr) = serve(&gw, GatewayConfig::default().access(Access::Bearer(tokens))).await;
        let none = post(addr, 1, b"x", &[]).await;
        assert_eq!(none.0, 401);
        assert_eq!(none.1["error"], "Unauthorized");
        assert!(none.2.contains_key("www-authenticate"));
        let wrong = post(
            addr,
            1,
            b"x",
            &[("Authorization", "Bearer test-token-0123456789abcdeX")],
        )
        .await;
        assert_eq!(wrong.0, 401);
        let auth = format!("Bearer {TOKEN}");
        let right = post(addr, 1, b"x", &[("Authorization", auth.as_str())]).await;
        assert_eq!(right.0, 200);
        let health = client()
            .get(format!("http://{addr}/healthz"))
            .send()
            .await
            .expect("healthz");
        assert_eq!(health.status().as_u16(), 200);
    })
    .await;
}

/// InOnly: `Prefer: respond-async` answers 202 with a request id at once, and the outcome of
/// that id reaches the domus's event feed — accepted for one taberna, the rejection for
/// another.
#[tokio::test]
async fn respond_async_is_202_and_the_outcome_reaches_the_event_feed() {
    within(async {
        let (_mesh, gw) = mesh().await;
        let mut events = gw.reporting().events();
        let (gateway, addr) = serve(&gw, GatewayConfig::default()).await;
        let accepted = post(addr, 2, b"x", &[("Prefer", "respond-async")]).await;
        assert_eq!(accepted.0, 202, "{:?}", accepted.1);
        assert_eq!(accepted.2["preference-applied"], "respond-async");
        let id_a = accepted.1["request_id"].as_u64().expect("request_id");
        assert_eq!(accepted.2["vicus-request-id"], id_a.to_string().as_str());
        let rejected = post(addr, 3, b"x", &[("Prefer", "respond-async")]).await;
        assert_eq!(rejected.0, 202);
        let id_r = rejected.1["request_id"].as_u64().expect("request_id");
        let (mut saw_a, mut saw_r) = (false, false);
        while !(saw_a && saw_r) {
            if let FeedItem::Item(Event::DetachedSendEnded {
                request_id,
                taberna,
                outcome,
            }) = events.recv().await.expect("feed")
            {
                if request_id == id_a {
                    assert_eq!(taberna, 2);
                    assert_eq!(outcome, Ok(false));
                    saw_a = true;
                } else if request_id == id_r {
                    assert_eq!(taberna, 3);
                    let e = outcome.expect_err("rejected");
                    assert_eq!(e.id(), ErrorId::RemoteTabernaRejected);
                    saw_r = true;
                }
            }
        }
        assert!(eventually(Duration::from_secs(5), || gateway.pending_async() == 0).await);
        // A body over the limit, or a refusal found at admission (an A1 message type), is
        // the response itself, not a 202.
        let too_big = post(addr, 2, &[0; 2 << 20], &[("Prefer", "respond-async")]).await;
        assert_error(&too_big, 413, ErrorId::PayloadTooLarge);
        let a1 = client()
            .post(format!("http://{addr}/tabernas/2?type=1"))
            .header("Prefer", "respond-async")
            .body("x")
            .send()
            .await
            .expect("send");
        assert_eq!(a1.status().as_u16(), 400);
        let body: serde_json::Value =
            serde_json::from_slice(&a1.bytes().await.expect("body")).unwrap_or_default();
        assert_eq!(body["error"], "InvalidMessageType", "{body}");
    })
    .await;
}

/// Once the domus shuts down, `/healthz` says so (503) and a send is 503 `DomusClosed`
/// (no `Retry-After`: this domus will not come back).
#[tokio::test]
async fn a_closed_domus_is_503_on_healthz_and_on_sends() {
    within(async {
        let (_mesh, gw) = mesh().await;
        let (_g, addr) = serve(&gw, GatewayConfig::default()).await;
        gw.shutdown().await;
        let health = client()
            .get(format!("http://{addr}/healthz"))
            .send()
            .await
            .expect("healthz");
        assert_eq!(health.status().as_u16(), 503);
        let closed = post(addr, 1, b"x", &[]).await;
        assert_error(&closed, 503, ErrorId::DomusClosed);
        assert!(!closed.2.contains_key("retry-after"));
    })
    .await;
}

/// The test data: byte `i` of the stream.
fn pattern(i: u64) -> u8 {
    (i.wrapping_mul(2_654_435_761) >> 13) as u8
}

/// A running checksum (FNV-1a, 64 bits) over a stream of chunks.
#[derive(Clone, Copy)]
struct Fnv(u64);

impl Fnv {
    fn new() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
    fn update(&mut self, data: &[u8]) {
        for &b in data {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
}

/// A 100 MiB blob streamed from a real client through the gateway to a taberna on another
/// domus: the taberna reads it with a running checksum, which must equal the sender's; the
/// opening message from `Vicus-Blob` arrives as the request's payload; the gateway held at most
/// a window of it (the client's stream is produced lazily, chunk by chunk).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_100_mib_blob_streams_through_with_its_checksum_checked_at_the_taberna() {
    const LEN: u64 = 100 << 20;
    const CHUNK: u64 = 64 << 10;
    tokio::time::timeout(Duration::from_secs(240), async {
        let mut mesh = Mesh::with_domus(&["gw", "b"]).await.expect("mesh");
        let blobs = mesh.taberna("b", TabernaId(10)).expect("taberna");
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let mut request = blobs.recv().await.expect("request");
            assert_eq!(request.payload().as_ref(), b"report.bin");
            let mut blob = request.blob().expect("a blob");
            request.accept();
            let mut sum = Fnv::new();
            let mut len = 0u64;
            let mut buf = vec![0u8; 256 << 10];
            loop {
                let n = blob.read(&mut buf).await.expect("read");
                if n == 0 {
                    break;
                }
                sum.update(&buf[..n]);
                len += n as u64;
            }
            let _ = done_tx.send((len, sum.0));
        });
        let gw = mesh.get("gw").expect("gw");
        let _ = &mut mesh;
        let (gateway, addr) = serve(&gw, GatewayConfig::default()).await;
        let mut expected = Fnv::new();
        for start in (0..LEN).step_by(CHUNK as usize) {
            let chunk: Vec<u8> = (start..start + CHUNK).map(pattern).collect();
            expected.update(&chunk);
        }
        let chunks = futures_stream(LEN, CHUNK);
        let response = client()
            .post(format!("http://{addr}/tabernas/10"))
            .header("Vicus-Message-Type", "app:1")
            .header("Vicus-Blob", "cmVwb3J0LmJpbg==")
            .body(reqwest::Body::wrap_stream(chunks))
            .send()
            .await
            .expect("response");
        assert_eq!(response.status().as_u16(), 204);
        let (len, sum) = done_rx.await.expect("the taberna read the blob");
        assert_eq!(len, LEN);
        assert_eq!(sum, expected.0, "checksum at the taberna");
        assert_eq!(gateway.in_flight(), 0);
    })
    .await
    .expect("the blob test exceeded its deadline");
}

/// The blob's chunks as a lazily produced stream (nothing is built ahead of the reader).
fn futures_stream(
    len: u64,
    chunk: u64,
) -> impl futures_core::Stream<Item = Result<Vec<u8>, std::io::Error>> + Send + Sync + 'static {
    struct Chunks {
        at: u64,
        len: u64,
        chunk: u64,
    }
    impl futures_core::Stream for Chunks {
        type Item = Result<Vec<u8>, std::io::Error>;
        fn poll_next(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Self::Item>> {
            if self.at >= self.len {
                return std::task::Poll::Ready(None);
            }
            let start = self.at;
            let end = (start + self.chunk).min(self.len);
            self.at = end;
            std::task::Poll::Ready(Some(Ok((start..end).map(pattern).collect())))
        }
    }
    Chunks { at: 0, len, chunk }
}

/// Writes a raw request head (and `body`) and reads the response until the server closes or
/// 4 KiB arrived; the response's text.
async fn raw(
    addr: SocketAddr,
    head: &str,
    body: &[u8],
    read_within: Duration,
) -> (String, tokio::net::TcpStream) {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(head.as_bytes()).await.expect("head");
    s.write_all(body).await.expect("body");
    let mut buf = vec![0u8; 4096];
    let mut got = 0;
    let _ = tokio::time::timeout(read_within, async {
        loop {
            match s.read(&mut buf[got..]).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    got += n;
                    if String::from_utf8_lossy(&buf[..got]).contains("\r\n\r\n{")
                        && buf[..got].ends_with(b"}")
                    {
                        break;
                    }
                }
            }
        }
    })
    .await;
    (String::from_utf8_lossy(&buf[..got]).into_owned(), s)
}

/// A `Content-Length` over `max_message_len` is refused with 413 before the body is sent:
/// the client wrote only the head, and the answer comes anyway (and the connection closes).
/// A chunked body is cut as soon as it passes the limit.
#[tokio::test]
async fn a_body_over_the_limit_is_refused_before_it_is_sent() {
    within(async {
        let (_mesh, gw) = mesh().await;
        let (_g, addr) = serve(&gw, GatewayConfig::default()).await;
        let head = format!(
            "POST /tabernas/1 HTTP/1.1\r\nHost: {addr}\r\nVicus-Message-Type: app:1\r\n\
             Content-Length: {}\r\nExpect: 100-continue\r\n\r\n",
            100u64 << 20
        );
        let (response, _s) = raw(addr, &head, b"", Duration::from_secs(10)).await;
        assert!(response.starts_with("HTTP/1.1 413"), "{response}");
        assert!(!response.contains("100 Continue"), "{response}");
        assert!(response.contains("\"PayloadTooLarge\""), "{response}");
        assert!(
            response.to_ascii_lowercase().contains("connection: close"),
            "{response}"
        );
        // Chunked, no length announced: refused once 1 MiB + 1 passed.
        let big: Vec<u8> = vec![b'z'; (1 << 20) + 1];
        let response = client()
            .post(format!("http://{addr}/tabernas/1?type=app:1"))
            .body(reqwest::Body::wrap_stream(futures_stream_of(big)))
            .send()
            .await
            .expect("response");
        assert_eq!(response.status().as_u16(), 413);
    })
    .await;
}

fn futures_stream_of(
    data: Vec<u8>,
) -> impl futures_core::Stream<Item = Result<Vec<u8>, std::io::Error>> + Send + Sync + 'static {
    let mut chunks: Vec<Vec<u8>> = data.chunks(64 << 10).map(<[u8]>::to_vec).collect();
    chunks.reverse();
    struct Once(Vec<Vec<u8>>);
    impl futures_core::Stream for Once {
        type Item = Result<Vec<u8>, std::io::Error>;
        fn poll_next(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Self::Item>> {
            std::task::Poll::Ready(self.0.pop().map(Ok))
        }
    }
    Once(chunks)
}

/// 200 requests at once from one client, to an echo taberna on another domus: every one gets
/// its own payload back. Then, with `max_concurrent = 1` and one request held, the next is
/// 503 `GatewayBusy` with `Retry-After`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_requests_and_the_cap_past_them() {
    within(async {
        let (_mesh, gw) = mesh().await;
        let (gateway, addr) = serve(&gw, GatewayConfig::default()).await;
        let client = client();
        let mut all = tokio::task::JoinSet::new();
        for i in 0..200u32 {
            let client = client.clone();
            all.spawn(async move {
                let body = format!("request {i}");
                let response = client
                    .post(format!("http://{addr}/tabernas/1?type=app:1"))
                    .body(body.clone())
                    .send()
                    .await
                    .expect("response");
                assert_eq!(response.status().as_u16(), 200);
                assert_eq!(response.text().await.expect("text"), body);
            });
        }
        let mut n = 0;
        while let Some(done) = all.join_next().await {
            done.expect("request task");
            n += 1;
        }
        assert_eq!(n, 200);
        assert_eq!(gateway.in_flight(), 0);

        let mut capped = GatewayConfig::default();
        capped.max_concurrent = 1;
        capped.request_timeout = Duration::from_secs(2);
        let (capped, addr) = serve(&gw, capped).await;
        // Held: taberna 6 never answers (until the 2 s deadline).
        let held = tokio::spawn(post(addr, 6, b"held", &[]));
        assert!(eventually(Duration::from_secs(5), || capped.in_flight() == 1).await);
        let busy = post(addr, 1, b"x", &[]).await;
        assert_eq!(busy.0, 503);
        assert_eq!(busy.1["error"], "GatewayBusy");
        assert_eq!(busy.2["retry-after"], "1");
        assert_eq!(held.await.expect("held").0, 504);
        assert_eq!(post(addr, 1, b"x", &[]).await.0, 200);
    })
    .await;
}

/// A client that announces a body and never finishes it is cut at the request deadline with
/// 408 and `Connection: close`; nothing reached the taberna and the gateway holds nothing
/// afterwards (no request in flight).
#[tokio::test]
async fn a_body_that_never_finishes_is_cut_at_the_deadline_and_nothing_leaks() {
    within(async {
        let (gw_mesh, gw) = mesh().await;
        let mut config = GatewayConfig::default();
        config.request_timeout = Duration::from_millis(500);
        let (gateway, addr) = serve(&gw, config).await;
        let before = gw.reporting().snapshot().totals.messages_sent;
        let head = format!(
            "POST /tabernas/2 HTTP/1.1\r\nHost: {addr}\r\nVicus-Message-Type: app:1\r\n\
             Content-Length: 1000\r\n\r\n"
        );
        let started = std::time::Instant::now();
        let (response, mut s) = raw(addr, &head, b"only ten..", Duration::from_secs(10)).await;
        assert!(response.starts_with("HTTP/1.1 408"), "{response}");
        assert!(response.contains("\"RequestTimeout\""), "{response}");
        assert!(started.elapsed() < Duration::from_secs(5));
        // The server closed the connection.
        assert!(closed_within(&mut s, Duration::from_secs(5)).await);
        assert_eq!(gateway.in_flight(), 0);
        assert_eq!(gw.reporting().snapshot().totals.messages_sent, before);

        // The same for a blob: 408, and the blob begun is cancelled at the taberna.
        let blobs = gw_mesh.taberna("b", TabernaId(9)).expect("t9");
        let (read_tx, read_rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let mut request = blobs.recv().await.expect("request");
            let mut blob = request.blob().expect("a blob");
            request.accept();
            let mut buf = vec![0u8; 4096];
            let end = loop {
                match blob.read(&mut buf).await {
                    Ok(0) => break Ok(()),
                    Ok(_) => {}
                    Err(e) => break Err(e),
                }
            };
            let _ = read_tx.send(end);
        });
        let (blob_response, _s) = raw(
            addr,
            &format!(
                "POST /tabernas/9 HTTP/1.1\r\nHost: {addr}\r\nVicus-Message-Type: app:1\r\n\
                 Vicus-Blob: \r\nContent-Length: 1000\r\n\r\n"
            ),
            b"ten bytes.",
            Duration::from_secs(10),
        )
        .await;
        assert!(blob_response.starts_with("HTTP/1.1 408"), "{blob_response}");
        assert_eq!(gateway.in_flight(), 0);
        let end = read_rx.await.expect("the taberna read");
        assert!(
            end.is_err(),
            "the taberna's reader must see the cancel, not an end"
        );
    })
    .await;
}

/// `serve` bounds what comes before the gateway sees a request: a client that sends half a
/// request head, or nothing at all, is disconnected after `header_read_timeout`.
#[tokio::test]
async fn a_request_head_that_never_finishes_is_cut_by_serve() {
    within(async {
        let (_mesh, gw) = mesh().await;
        let mut config = GatewayConfig::default();
        config.header_read_timeout = Duration::from_millis(300);
        let (gateway, addr) = serve(&gw, config).await;
        let mut half = tokio::net::TcpStream::connect(addr).await.expect("connect");
        half.write_all(b"POST /tabernas/1 HTTP/1.1\r\nHost: x\r\n")
            .await
            .expect("write");
        let mut silent = tokio::net::TcpStream::connect(addr).await.expect("connect");
        assert!(closed_within(&mut half, Duration::from_secs(5)).await);
        assert!(closed_within(&mut silent, Duration::from_secs(5)).await);
        assert_eq!(gateway.in_flight(), 0);
    })
    .await;
}

/// `curl` (a process) posts into the gateway: the reply comes back as the body, and an error
/// as its JSON with the status (`-w` prints it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_sends_a_message_and_reads_the_reply() {
    if std::process::Command::new("curl")
        .arg("--version")
        .output()
        .is_err()
    {
        skip_or_fail("curl is not installed: the gateway is not checked with curl");
        return;
    }
    within(async {
        let (_mesh, gw) = mesh().await;
        let (_g, addr) = serve(&gw, GatewayConfig::default()).await;
        let run = |args: Vec<String>| {
            tokio::task::spawn_blocking(move || {
                std::process::Command::new("curl")
                    .args(["-sS", "--max-time", "20"])
                    .args(args)
                    .output()
                    .expect("curl")
            })
        };
        let out = run(vec![
            "-H".into(),
            "Vicus-Message-Type: app:1".into(),
            "--data-binary".into(),
            "hello from curl".into(),
            format!("http://{addr}/tabernas/1"),
        ])
        .await
        .expect("join");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(out.stdout, b"hello from curl");
        let out = run(vec![
            "-w".into(),
            "\n%{http_code}".into(),
            "--data-binary".into(),
            "x".into(),
            format!("http://{addr}/tabernas/7?type=app:1"),
        ])
        .await
        .expect("join");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(text.ends_with("\n404"), "{text}");
        assert!(text.contains("\"UnknownTaberna\""), "{text}");
    })
    .await;
}

/// `GET /metrics`: the text of a Prometheus recorder, refreshed from the domus at the scrape,
/// parsed back and compared with the domus's own snapshot.
#[cfg(feature = "metrics")]
#[tokio::test]
async fn metrics_text_parses_back_to_the_snapshot() {
    use std::sync::Arc;
    within(async {
        let (_mesh, gw) = mesh().await;
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        metrics::set_global_recorder(recorder).expect("the only recorder of this test binary");
        let config = GatewayConfig::default().metrics_renderer(Arc::new(move || handle.render()));
        let (_g, addr) = serve(&gw, config).await;
        for _ in 0..3 {
            assert_eq!(post(addr, 2, b"x", &[]).await.0, 204);
        }
        assert_eq!(post(addr, 3, b"x", &[]).await.0, 422);
        let response = client()
            .get(format!("http://{addr}/metrics"))
            .send()
            .await
            .expect("metrics");
        assert_eq!(response.status().as_u16(), 200);
        assert!(
            response.headers()["content-type"]
                .to_str()
                .expect("ascii")
                .starts_with("text/plain")
        );
        let text = response.text().await.expect("text");
        let snapshot = gw.reporting().snapshot();
        let id = gw.identity().to_string();
        // name{labels} value, for this domus.
        let value = |name: &str| -> Option<f64> {
            text.lines()
                .filter(|l| !l.starts_with('#'))
                .find(|l| {
                    l.split(['{', ' ']).next() == Some(name)
                        && l.contains(&format!("domus=\"{id}\""))
                })
                .and_then(|l| l.rsplit(' ').next())
                .and_then(|v| v.parse().ok())
        };
        for (name, total) in snapshot.totals.named() {
            if matches!(
                name,
                "messages_sent" | "messages_accepted" | "messages_rejected"
            ) {
                let got = value(&format!("vicus_{name}_total"))
                    .unwrap_or_else(|| panic!("vicus_{name}_total missing in:\n{text}"));
                assert_eq!(got, total as f64, "vicus_{name}_total");
            }
        }
        assert_eq!(value("vicus_messages_sent_total"), Some(4.0));
        assert_eq!(value("vicus_messages_accepted_total"), Some(3.0));
        assert_eq!(value("vicus_messages_rejected_total"), Some(1.0));
    })
    .await;
}

/// HTTPS with client certificates of the mesh (`serve_tls`, `Access::MutualTls`), called with
/// curl: a client whose identity the policy allows gets its reply; no certificate, an identity
/// not on the list, or a certificate of another CA get no HTTP at all (the handshake fails);
/// the same gateway mounted without TLS answers 401, and `serve` refuses it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_admits_only_the_allowed_mesh_identities() {
    use vicus::TrustPolicy;
    use vicus::dev_certs::{DevCa, LeafSpec};
    use vicus::gateway::{GatewayTls, serve_tls};
    if std::process::Command::new("curl")
        .arg("--version")
        .output()
        .is_err()
    {
        skip_or_fail("curl is not installed: the gateway's mutual TLS is not checked");
        return;
    }
    within(async {
        let (mut mesh, gw) = mesh().await;
        let ca = mesh.ca();
        // The gateway's certificate names 127.0.0.1 too, for curl's host name check.
        let mut spec = LeafSpec::domus("gw-https");
        spec.dns_names = vec!["127.0.0.1".to_owned()];
        let server = ca.leaf_with(&spec).expect("server leaf");
        let server_auth = ca.auth_config(&server).expect("auth");
        let client = ca.leaf("http-client").expect("client leaf");
        let stranger = ca.leaf("stranger").expect("stranger leaf");
        let mut other_ca = DevCa::new("another CA").expect("CA");
        let foreign = other_ca.leaf("http-client").expect("foreign leaf");
        let dir = tempdir();
        let write = |name: &str, text: &str| {
            let path = dir.join(name);
            std::fs::write(&path, text).expect("write");
            path.display().to_string()
        };
        let ca_pem = write("ca.pem", mesh.ca().cert_pem());
        let pems = |name: &str, leaf: &vicus::dev_certs::DevLeaf| {
            (
                write(&format!("{name}.pem"), leaf.cert_pem()),
                write(&format!("{name}.key"), leaf.key_pem()),
            )
        };
        let client_files = pems("client", &client);
        let stranger_files = pems("stranger", &stranger);
        let foreign_files = pems("foreign", &foreign);

        let allowed = DomusId::spiffe("vicus.dev", "http-client").expect("id");
        let tls =
            GatewayTls::mutual(&server_auth, TrustPolicy::allow_list([allowed])).expect("tls");
        let gateway =
            Gateway::new(&gw, GatewayConfig::default().access(Access::MutualTls)).expect("gateway");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let g = gateway.clone();
        tokio::spawn(async move {
            serve_tls(listener, g, tls, std::future::pending())
                .await
                .expect("serve_tls");
        });

        let curl = |cert: Option<(String, String)>| {
            let ca_pem = ca_pem.clone();
            tokio::task::spawn_blocking(move || {
                let mut cmd = std::process::Command::new("curl");
                cmd.args([
                    "-sS",
                    "--max-time",
                    "20",
                    "-w",
                    "\n%{http_code}",
                    "--cacert",
                ])
                .arg(&ca_pem);
                if let Some((cert, key)) = cert {
                    cmd.arg("--cert").arg(cert).arg("--key").arg(key);
                }
                cmd.args(["--data-binary", "over https"])
                    .arg(format!("https://{addr}/tabernas/1?type=app:1"));
                let out = cmd.output().expect("curl");
                String::from_utf8_lossy(&out.stdout).into_owned()
            })
        };
        let ok = curl(Some(client_files)).await.expect("join");
        assert_eq!(ok, "over https\n200", "the allowed identity");
        for (who, cert) in [
            ("no certificate", None),
            ("an identity not on the list", Some(stranger_files)),
            ("another CA", Some(foreign_files)),
        ] {
            let out = curl(cert).await.expect("join");
            assert!(out.ends_with("000"), "{who}: {out}");
        }

        // The same gateway without the handshake: 401 (the router mounted in axum's own
        // server), and serve refuses it.
        let plain = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let plain_addr = plain.local_addr().expect("addr");
        let router = gateway.router();
        tokio::spawn(async move {
            let _ = axum::serve(plain, router).await;
        });
        let unauthorized = post(plain_addr, 1, b"x", &[]).await;
        assert_eq!(unauthorized.0, 401);
        let refused = vicus::gateway::serve(
            TcpListener::bind("127.0.0.1:0").await.expect("bind"),
            gateway,
            std::future::pending(),
        )
        .await
        .expect_err("refused");
        assert_eq!(refused.id(), ErrorId::InvalidConfig);
    })
    .await;
}

/// Message headers map to HTTP headers with the `Vicus-Header-` prefix both ways, through
/// reqwest and curl; a W3C `traceparent` becomes the message's trace context; a key vicus
/// does not allow is 400 `InvalidHeader`, more headers than the domus takes 431.
#[tokio::test]
async fn message_headers_map_to_http_headers_both_ways() {
    within(async {
        let (_mesh, gw) = mesh().await;
        let (_g, addr) = serve(&gw, GatewayConfig::default()).await;
        let traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let got = post(
            addr,
            1,
            b"with headers",
            &[
                ("Vicus-Header-Tenant", "acme"),
                ("Vicus-Header-X-Request-Id", "r-1"),
                ("Traceparent", traceparent),
                ("X-Other", "not a message header"),
            ],
        )
        .await;
        assert_eq!(got.0, 200, "{:?}", got.1);
        let h = &got.2;
        assert_eq!(h["vicus-header-tenant"], "acme");
        assert_eq!(h["vicus-header-x-request-id"], "r-1");
        assert_eq!(h["traceparent"], traceparent);
        assert!(h.get("vicus-header-x-other").is_none());

        // A key vicus does not allow (an HTTP header name may hold '!'), and too many.
        let bad = post(addr, 1, b"x", &[("Vicus-Header-Bang!", "v")]).await;
        assert_error(&bad, 400, ErrorId::InvalidHeader);
        let names: Vec<String> = (0..17).map(|i| format!("Vicus-Header-K{i}")).collect();
        let many: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), "v")).collect();
        let over = post(addr, 1, b"x", &many).await;
        assert_error(&over, 431, ErrorId::HeadersTooLarge);

        // curl, both ways.
        if std::process::Command::new("curl")
            .arg("--version")
            .output()
            .is_err()
        {
            skip_or_fail("curl is not installed: headers are not checked with curl");
            return;
        }
        let out = tokio::task::spawn_blocking(move || {
            std::process::Command::new("curl")
                .args(["-sS", "--max-time", "20", "-D", "-"])
                .args(["-H", "Vicus-Message-Type: app:1"])
                .args(["-H", "Vicus-Header-Tenant: from-curl"])
                .args(["--data-binary", "hi"])
                .arg(format!("http://{addr}/tabernas/1"))
                .output()
                .expect("curl")
        })
        .await
        .expect("join");
        let text = String::from_utf8_lossy(&out.stdout).to_lowercase();
        assert!(text.contains("vicus-header-tenant: from-curl"), "{text}");
    })
    .await;
}
