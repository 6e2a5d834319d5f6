//! `vicus::testing::FaultProxy`, checked against plain TCP servers (no TLS): each fault does
//! what it says, and the proxy cleans up after itself.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

/// Bound on "promptly": generous so a loaded machine never flakes.
const PROMPTLY: Duration = Duration::from_secs(5);
/// How long a stalled round trip must stay stalled.
const STALL: Duration = Duration::from_millis(300);

/// A loopback server that echoes every connection until EOF or error.
async fn echo_server() -> SocketAddr {
    let listener = TcpListener::bind(("127.0.0.1", 0))
        .await
        .expect("bind echo");
    let addr = listener.local_addr().expect("echo address");
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = conn.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

/// A loopback server that reads each connection to its end and reports how many bytes it got.
async fn counting_server() -> (SocketAddr, mpsc::UnboundedReceiver<u64>) {
    let listener = TcpListener::bind(("127.0.0.1", 0))
        .await
        .expect("bind sink");
    let addr = listener.local_addr().expect("sink address");
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let mut total = 0u64;
                while let Ok(n @ 1..) = conn.read(&mut buf).await {
                    total += n as u64;
                }
                let _ = tx.send(total);
            });
        }
    });
    (addr, rx)
}

async fn connect(proxy: &FaultProxy) -> TcpStream {
    TcpStream::connect(proxy.addr())
        .await
        .expect("connect to proxy")
}

/// Sends `msg` and reads back exactly as many bytes; panics if anything goes wrong.
async fn round_trip(s: &mut TcpStream, msg: &[u8]) {
    s.write_all(msg).await.expect("write");
    let mut back = vec![0u8; msg.len()];
    s.read_exact(&mut back).await.expect("read echo");
    assert_eq!(back, msg);
}

#[tokio::test]
async fn forwards_both_ways_and_counts_connections() {
    within(async {
        let proxy = FaultProxy::start(echo_server().await).await.expect("proxy");
        let mut a = connect(&proxy).await;
        let mut b = connect(&proxy).await;
        round_trip(&mut a, b"hello through the proxy").await;
        let big: Vec<u8> = (0..200_000u32).map(|i| i as u8).collect();
        round_trip(&mut b, &big).await;
        assert_eq!(proxy.connections(), 2);
        assert_eq!(proxy.total_accepted(), 2);

        // A half-close is passed on: the echo server sees EOF and closes its side.
        a.shutdown().await.expect("half-close");
        assert!(closed_within(&mut a, PROMPTLY).await);
        assert!(eventually(PROMPTLY, || proxy.connections() == 1).await);
    })
    .await;
}

#[tokio::test]
async fn cut_all_ends_reads_and_later_connections_work() {
    within(async {
        let proxy = FaultProxy::start(echo_server().await).await.expect("proxy");
        let mut a = connect(&proxy).await;
        let mut b = connect(&proxy).await;
        round_trip(&mut a, b"a").await;
        round_trip(&mut b, b"b").await;

        proxy.cut_all();
        assert!(closed_within(&mut a, PROMPTLY).await, "a still open");
        assert!(closed_within(&mut b, PROMPTLY).await, "b still open");
        assert!(eventually(PROMPTLY, || proxy.connections() == 0).await);

        let mut c = connect(&proxy).await;
        round_trip(&mut c, b"after the cut").await;
        assert_eq!(proxy.total_accepted(), 3);
    })
    .await;
}

#[tokio::test]
async fn cut_after_bytes_closes_after_about_n_bytes() {
    const LIMIT: u64 = 1000;
    within(async {
        let (upstream, mut counts) = counting_server().await;
        let proxy = FaultProxy::start(upstream).await.expect("proxy");
        proxy.cut_after_bytes(LIMIT);
        let mut client = connect(&proxy).await;
        // Several writes so the limit falls inside a chunk; later writes may fail on the reset.
        for _ in 0..4 {
            if client.write_all(&[7u8; 700]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(closed_within(&mut client, PROMPTLY).await);
        let got = counts.recv().await.expect("server count");
        assert!(got <= LIMIT, "upstream got {got} bytes, limit {LIMIT}");
        assert!(got >= 700, "upstream got only {got} bytes");

        // Disabling the limit applies to the next connection.
        proxy.cut_after_bytes(None);
        let mut client = connect(&proxy).await;
        client.write_all(&[7u8; 3000]).await.expect("write");
        client.shutdown().await.expect("half-close");
        assert_eq!(counts.recv().await, Some(3000));
    })
    .await;
}

#[tokio::test]
async fn blackhole_stalls_round_trips_but_keeps_the_connection() {
    within(async {
        let proxy = FaultProxy::start(echo_server().await).await.expect("proxy");
        let mut client = connect(&proxy).await;
        round_trip(&mut client, b"before").await;

        proxy.set_blackhole(true);
        client
            .write_all(b"lost")
            .await
            .expect("write into blackhole");
        let mut buf = [0u8; 4];
        let read = tokio::time::timeout(STALL, client.read_exact(&mut buf)).await;
        assert!(
            read.is_err(),
            "round trip completed (or ended) through a blackhole"
        );
        assert_eq!(proxy.connections(), 1);

        // Still open: once the blackhole lifts, the same connection carries bytes again.
        proxy.set_blackhole(false);
        round_trip(&mut client, b"after").await;
    })
    .await;
}

#[tokio::test]
async fn refuse_closes_new_connections_at_once() {
    within(async {
        let proxy = FaultProxy::start(echo_server().await).await.expect("proxy");
        let mut kept = connect(&proxy).await;
        round_trip(&mut kept, b"kept").await;

        proxy.set_refuse(true);
        let mut refused = connect(&proxy).await;
        assert!(closed_within(&mut refused, PROMPTLY).await);
        assert_eq!(proxy.total_accepted(), 2);
        assert_eq!(proxy.connections(), 1);
        round_trip(&mut kept, b"existing ones are untouched").await;

        proxy.set_refuse(false);
        let mut later = connect(&proxy).await;
        round_trip(&mut later, b"accepted again").await;
    })
    .await;
}

#[tokio::test]
async fn delay_holds_each_chunk() {
    const DELAY: Duration = Duration::from_millis(50);
    within(async {
        let proxy = FaultProxy::start(echo_server().await).await.expect("proxy");
        let mut client = connect(&proxy).await;
        proxy.set_delay(DELAY);
        let started = Instant::now();
        round_trip(&mut client, b"slow").await;
        // Only a lower bound: the chunk was delayed once each way.
        assert!(started.elapsed() >= 2 * DELAY);
    })
    .await;
}

#[tokio::test]
async fn throttle_limits_the_byte_rate_and_lifting_it_restores_full_speed() {
    const RATE: u64 = 64 * 1024;
    within(async {
        let (upstream, mut counts) = counting_server().await;
        let proxy = FaultProxy::start(upstream).await.expect("proxy");
        proxy.set_throttle(Some(RATE));
        // 64 KiB at 64 KiB/s: the proxy holds each 16 KiB chunk for its quarter second, so
        // the last byte reaches the server no sooner than ~0.75 s after the first.
        let mut client = connect(&proxy).await;
        let started = Instant::now();
        client.write_all(&[7u8; 64 * 1024]).await.expect("write");
        client.shutdown().await.expect("shutdown");
        let got = counts.recv().await.expect("count");
        let throttled = started.elapsed();
        assert_eq!(got, 64 * 1024);
        assert!(
            throttled >= Duration::from_millis(700),
            "64 KiB went through a 64 KiB/s throttle in {throttled:?}"
        );

        proxy.set_throttle(None);
        let mut client = connect(&proxy).await;
        let started = Instant::now();
        client.write_all(&[7u8; 1024 * 1024]).await.expect("write");
        client.shutdown().await.expect("shutdown");
        assert_eq!(counts.recv().await.expect("count"), 1024 * 1024);
        assert!(
            started.elapsed() < throttled,
            "1 MiB unthrottled took {:?}, longer than 64 KiB throttled",
            started.elapsed()
        );
    })
    .await;
}

#[tokio::test]
async fn dropping_the_proxy_closes_live_connections() {
    within(async {
        let proxy = FaultProxy::start(echo_server().await).await.expect("proxy");
        let addr = proxy.addr();
        let mut client = connect(&proxy).await;
        round_trip(&mut client, b"alive").await;

        drop(proxy);
        assert!(closed_within(&mut client, PROMPTLY).await);
        // The listener goes away too: connecting is soon refused.
        let deadline = Instant::now() + PROMPTLY;
        while TcpStream::connect(addr).await.is_ok() {
            assert!(Instant::now() < deadline, "proxy still accepts after drop");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
}
