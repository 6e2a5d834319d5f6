//! T13 measured on the heap: a peer's declared frame lengths never decide what a domus
//! allocates. With dhat counting every allocation of this test process, an authenticated
//! peer that says HELLO and then (1) declares a MESSAGE of almost the whole frame limit and
//! sends only a trickle of it, or (2) declares a 1 GiB frame, makes the domus's live heap grow
//! by what actually arrived (plus its usual buffers), not by what was declared. One test per
//! process (dhat counts process-wide).

mod common;

use std::time::Duration;

use bytes::{BufMut, BytesMut};
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use vicus::a0_transport::{AuthenticatedStream, Transport};
use vicus::a1_callis::frame::{self, FrameType, Hello};

#[global_allocator]
static ALLOC: dhat::Alloc = dhat::Alloc;

fn live_bytes() -> usize {
    dhat::HeapStats::get().curr_bytes
}

/// A hand-made callis from `evil` to `b` that has said HELLO.
async fn callis_with_hello(evil: &Transport, b: &vicus::Domus) -> AuthenticatedStream {
    let mut io = evil
        .dial(&addr_of(b), Some(b.identity()))
        .await
        .expect("dial");
    say_hello(&mut io, evil.local_id().as_str()).await;
    io
}

/// HELLO on a hand-made callis.
async fn say_hello(io: &mut AuthenticatedStream, me: &str) {
    let mut out = BytesMut::new();
    frame::encode_hello(
        &mut out,
        &Hello {
            version: frame::PROTOCOL_VERSION,
            epoch: 9,
            max_frame_len: 1 << 20,
            window: 64,
            domus_id: me.to_owned(),
        },
    );
    io.write_all(&out).await.expect("HELLO");
    // The domus's HELLO and first PING.
    let mut buf = vec![0u8; 4096];
    let _ = tokio::time::timeout(Duration::from_millis(500), io.read(&mut buf)).await;
}

/// A MESSAGE header declaring `len` body bytes.
fn header(len: u32) -> BytesMut {
    let mut h = BytesMut::new();
    h.put_u32(len);
    h.put_u8(FrameType::MESSAGE.0);
    h.put_u8(0);
    h
}

#[tokio::test]
async fn t13_declared_lengths_do_not_drive_the_heap() {
    let _profiler = dhat::Profiler::builder().testing().build();
    within(async {
        let mut mesh = Mesh::new().expect("mesh");
        let b = mesh.domus("b").await.expect("b");
        let _t = b.taberna(vicus::TabernaId(1)).expect("taberna");
        let evil = transport(mesh.ca(), "evil");
        // The largest MESSAGE body the domus accepts: its payload limit plus the fixed part.
        let limit = u32::try_from(b.config().snapshot().max_message_len).expect("u32")
            + frame::MESSAGE_FIXED_LEN as u32;

        // (1) Almost the whole limit declared, 4 KiB sent, then silence.
        let mut io = callis_with_hello(&evil, &b).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        let before = live_bytes();
        let mut partial = header(limit);
        partial.put_slice(&[0u8; 4096]);
        io.write_all(&partial).await.expect("partial frame");
        io.flush().await.expect("flush");
        tokio::time::sleep(Duration::from_millis(300)).await;
        let grown = live_bytes().saturating_sub(before);
        println!("declared {limit} B, sent 4 KiB: live heap +{grown} B");
        assert!(
            grown < 256 * 1024,
            "a {limit}-byte declaration with 4 KiB sent grew the heap by {grown} B"
        );
        // The control: bytes that do arrive are held (the partial frame waits for its end),
        // and the count sees them.
        io.write_all(&vec![0u8; 512 * 1024])
            .await
            .expect("more of the frame");
        io.flush().await.expect("flush");
        let arrived = eventually(Duration::from_secs(10), || {
            live_bytes().saturating_sub(before) >= 512 * 1024
        })
        .await;
        let held = live_bytes().saturating_sub(before);
        println!("then 512 KiB more of it: live heap +{held} B");
        assert!(arrived, "516 KiB arrived but the heap grew by {held} B");
        drop(io);

        // (2) 1 GiB declared: refused on sight (the callis is closed), nothing reserved.
        let mut io = callis_with_hello(&evil, &b).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        let before = live_bytes();
        io.write_all(&header(1 << 30)).await.expect("header");
        io.flush().await.expect("flush");
        let mut sink = vec![0u8; 4096];
        let closed = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                match io.read(&mut sink).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await;
        assert!(closed.is_ok(), "the callis is closed");
        let grown = live_bytes().saturating_sub(before);
        println!("declared 1 GiB: live heap +{grown} B when the callis was closed");
        assert!(
            grown < 256 * 1024,
            "1 GiB declared grew the heap by {grown} B"
        );
        let max = dhat::HeapStats::get().max_bytes;
        println!("peak live heap of the whole test: {max} B");
        assert!(max < 16 << 20, "peak heap {max} B");
    })
    .await;
}
