//! Two domus on loopback, certificates minted at start-up: a taberna that replies, one
//! request/reply, a pipelined burst of acknowledged messages, a rejection, a 256 MiB blob
//! streamed to a second taberna and checked on arrival, and a metrics snapshot at the end.
//!
//! Run with `cargo run --example quickstart`. (`cargo run --example handshake` shows the A0
//! handshake alone, over TCP and over a Unix socket.)

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use vicus::dev_certs::DevCa;
use vicus::{Delivery, Domus, MessageType, SendOptions, SimpleResolver, TabernaId};

const GREETER: TabernaId = TabernaId(1);
const STORE: TabernaId = TabernaId(2);
const ECHO: MessageType = MessageType::app(1);

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Development identities (never for production): spiffe://vicus.dev/domus/{alpha,beta}.
    let mut ca = DevCa::new("vicus quickstart CA")?;
    let (alpha_auth, _) = ca.domus_auth("alpha")?;
    let (beta_auth, _) = ca.domus_auth("beta")?;

    // One shared in-memory route table: taberna 1 lives on beta.
    let routes = Arc::new(SimpleResolver::new());
    let beta = Domus::builder(beta_auth)
        .resolver(routes.clone())
        .build()
        .await?;
    // Alpha only dials: no listener, its answers come back on the callis it opens.
    let alpha = Domus::builder(alpha_auth)
        .resolver(routes.clone())
        .dial_only()
        .build()
        .await?;
    let beta_addr = beta.local_addr().cloned().ok_or("beta listens")?;
    for taberna in [GREETER, STORE] {
        routes.insert(taberna, beta_addr.clone(), Some(beta.identity().clone()));
    }
    println!("alpha {} (dial only)", alpha.identity());
    println!("beta  {} at {beta_addr}", beta.identity());

    // Beta's taberna: replies to "hello", rejects "nope", accepts everything else.
    let greeter = beta.taberna(GREETER)?;
    tokio::spawn(async move {
        while let Some(request) = greeter.recv().await {
            match request.payload().as_ref() {
                b"hello" => {
                    let answer = format!("salve, {}", request.peer().id());
                    request.reply(Bytes::from(answer));
                }
                b"nope" => request.reject(403, "not today"),
                _ => request.accept(),
            }
        }
    });

    // A destination resolves its route once; request/reply through it.
    let greeter_on_beta = alpha.destination(GREETER);
    let reply = greeter_on_beta
        .send(ECHO, Bytes::from_static(b"hello"))
        .await?;
    if let Delivery::Replied(text) = reply {
        println!("reply: {}", String::from_utf8_lossy(&text));
    }

    // A pipelined burst: a window keeps 1024 sends in flight and hands back their outcomes in
    // order.
    let n = 20_000u32;
    let started = Instant::now();
    let mut window = greeter_on_beta.window(1024);
    let mut accepted = 0u32;
    for i in 0..n {
        let payload = Bytes::copy_from_slice(&i.to_be_bytes());
        if let Some(outcome) = window.send(ECHO, payload).await?
            && outcome? == Delivery::Accepted
        {
            accepted += 1;
        }
    }
    for outcome in window.drain().await {
        if outcome? == Delivery::Accepted {
            accepted += 1;
        }
    }
    let took = started.elapsed();
    println!(
        "burst: {accepted}/{n} accepted in {took:.2?} ({:.0} msg/s, each one acknowledged)",
        f64::from(n) / took.as_secs_f64()
    );

    // A rejection carries the receiver's code and reason.
    match alpha
        .send(
            GREETER,
            ECHO,
            Bytes::from_static(b"nope"),
            SendOptions::default(),
        )
        .await
    {
        Err(e) => println!(
            "rejected as expected: {e} (code {:?})",
            e.rejection().map(|r| r.code)
        ),
        Ok(other) => println!("unexpected: {other:?}"),
    }

    // A blob: the header names it; the handler accepts, then reads the bytes as they arrive
    // (a slow reader would slow the sender down, never fail the transfer).
    let store = beta.taberna(STORE)?;
    let stored = tokio::spawn(async move {
        let mut request = store.recv().await.ok_or("store closed")?;
        let name = String::from_utf8_lossy(request.payload()).into_owned();
        let mut blob = request.blob().ok_or("no blob")?;
        request.accept();
        let mut buf = vec![0u8; 256 * 1024];
        let (mut len, mut sum) = (0u64, 0u64);
        loop {
            let n = blob.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            len += n as u64;
            sum = buf[..n]
                .iter()
                .fold(sum, |s, b| s.wrapping_add(u64::from(*b)));
        }
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>((name, len, sum))
    });
    let size = 256u64 << 20;
    let piece: Vec<u8> = (0..256 * 1024u32).map(|i| (i % 251) as u8).collect();
    let piece_sum = piece
        .iter()
        .fold(0u64, |s, b| s.wrapping_add(u64::from(*b)));
    let started = Instant::now();
    let mut blob = alpha
        .send_blob(
            STORE,
            ECHO,
            Bytes::from_static(b"snapshot-0001"),
            SendOptions::default(),
        )
        .await?;
    for _ in 0..size / piece.len() as u64 {
        blob.write_all(&piece).await?;
    }
    blob.finish().await?;
    let took = started.elapsed();
    let (name, len, sum) = stored.await?.map_err(|e| e.to_string())?;
    let expected_sum = piece_sum.wrapping_mul(size / piece.len() as u64);
    println!(
        "blob {name}: {len} bytes in {took:.2?} ({:.0} MiB/s), checksum {}",
        len as f64 / (1024.0 * 1024.0) / took.as_secs_f64(),
        if len == size && sum == expected_sum {
            "ok"
        } else {
            "MISMATCH"
        }
    );

    // What alpha saw, from its metrics (see the crate docs, "Observability").
    let s = alpha.reporting().snapshot();
    let t = &s.totals;
    println!(
        "alpha metrics: {} sent, {} accepted, {} replied, {} rejected; send latency p50 {:?} p99 {:?}; \
         {} blob stream(s) completed, {} MiB over the blob callis, {} MiB over the primary",
        t.messages_sent,
        t.messages_accepted,
        t.messages_replied,
        t.messages_rejected,
        s.latency.p50,
        s.latency.p99,
        t.blob_streams_completed,
        t.blob_bytes_out >> 20,
        t.primary_bytes_out >> 20,
    );
    for p in &s.per_peer {
        println!(
            "  peer {}: connected {}, rtt {:?}, in flight {}, {} KiB in / {} KiB out",
            p.peer,
            p.connected,
            p.rtt,
            p.in_flight,
            p.bytes_in >> 10,
            p.bytes_out >> 10
        );
    }

    alpha.shutdown().await;
    beta.shutdown().await;
    println!("both domus shut down cleanly");
    Ok(())
}
