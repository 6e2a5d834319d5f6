//! The frame codec's tests: every frame type round-trips through encode and decode (a
//! proptest), and truncated, oversized or malformed input is refused without panicking or
//! reserving memory it was only promised. Pure: no IO.

use super::*;
use proptest::prelude::*;

const MAX: u32 = 1 << 20;

fn decode_all(mut buf: BytesMut) -> Result<Vec<Frame>, FrameError> {
    let mut out = Vec::new();
    while let Some(f) = decode(&mut buf, MAX)? {
        out.push(f);
    }
    assert!(buf.is_empty(), "{} bytes left over", buf.len());
    Ok(out)
}

fn arb_text(max: usize) -> impl Strategy<Value = String> {
    proptest::collection::vec(any::<char>(), 0..max / 4).prop_map(|c| c.into_iter().collect())
}

fn arb_frame() -> impl Strategy<Value = Frame> {
    let bytes = || proptest::collection::vec(any::<u8>(), 0..300).prop_map(Bytes::from);
    prop_oneof![
        (
            any::<u16>(),
            any::<u64>(),
            any::<u32>(),
            any::<u32>(),
            arb_text(200)
        )
            .prop_map(|(version, epoch, max_frame_len, window, domus_id)| {
                Frame::Hello(Hello {
                    version,
                    epoch,
                    max_frame_len,
                    window,
                    domus_id,
                })
            }),
        any::<u64>().prop_map(Frame::Ping),
        any::<u64>().prop_map(Frame::DoneBelow),
        any::<u64>().prop_map(Frame::Pong),
        (any::<u32>(), arb_text(MAX_REASON_LEN)).prop_map(|(code, reason)| Frame::Close {
            code: WireCode(code),
            reason
        }),
        (
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
            any::<u32>(),
            bytes()
        )
            .prop_map(
                |(id, dst, src, msg_type, payload)| Frame::Message(MessageFrame {
                    id,
                    dst,
                    src,
                    msg_type,
                    payload
                })
            ),
        proptest::collection::vec(any::<u64>(), 1..50).prop_map(|ids| {
            let mut b = BytesMut::new();
            encode_accepted(&mut b, &ids);
            b.advance(HEADER_LEN);
            Frame::Accepted(AcceptedIds(b.freeze()))
        }),
        (any::<u64>(), bytes()).prop_map(|(id, payload)| Frame::Reply { id, payload }),
        (
            any::<u64>(),
            any::<u32>(),
            any::<u32>(),
            arb_text(MAX_REASON_LEN)
        )
            .prop_map(|(id, error, code, reason)| Frame::Reject(RejectFrame {
                id,
                error: WireCode(error),
                code,
                reason
            })),
        (any::<u16>(), any::<u64>(), any::<u32>()).prop_map(|(version, epoch, max_chunk)| {
            Frame::Blob(BlobFrame::Hello {
                version,
                epoch,
                max_chunk,
            })
        }),
    ]
}

proptest! {
    #[test]
    fn encode_decode_round_trips(frames in proptest::collection::vec(arb_frame(), 1..8)) {
        let mut buf = BytesMut::new();
        for f in &frames {
            f.encode(&mut buf);
        }
        prop_assert_eq!(decode_all(buf).unwrap(), frames);
    }

    #[test]
    fn t14_truncation_at_every_offset_needs_more_bytes(frame in arb_frame()) {
        let mut full = BytesMut::new();
        frame.encode(&mut full);
        for cut in 0..full.len() {
            let mut part = BytesMut::from(&full[..cut]);
            prop_assert_eq!(decode(&mut part, MAX), Ok(None));
            prop_assert_eq!(part.len(), cut, "nothing consumed on a partial frame");
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let mut buf = BytesMut::from(&bytes[..]);
        while let Ok(Some(_)) = decode(&mut buf, 1024) {}
    }
}

#[test]
fn t13_oversized_length_is_refused_before_allocation() {
    let mut buf = BytesMut::new();
    buf.put_u32(u32::MAX);
    buf.put_u8(FrameType::MESSAGE.0);
    buf.put_u8(0);
    let cap_before = buf.capacity();
    let err = decode(&mut buf, MAX).unwrap_err();
    assert!(
        matches!(err, FrameError::TooLong { len: u32::MAX, .. }),
        "{err}"
    );
    assert_eq!(
        buf.capacity(),
        cap_before,
        "nothing reserved for a refused frame"
    );
    // Control frames have their own small limits, whatever max_frame_len is.
    for t in [FrameType::PING, FrameType::CLOSE, FrameType::HELLO] {
        let mut buf = BytesMut::new();
        buf.put_u32(70_000);
        buf.put_u8(t.0);
        buf.put_u8(0);
        assert!(matches!(
            decode(&mut buf, u32::MAX),
            Err(FrameError::TooLong { .. })
        ));
    }
}

#[test]
fn t13_nested_lengths_must_match_the_outer_length() {
    // A REJECT whose reason claims more bytes than the body has.
    let mut buf = BytesMut::new();
    put_header(&mut buf, FrameType::REJECT, 8 + 4 + 4 + 2 + 3);
    buf.put_u64(1);
    buf.put_u32(4);
    buf.put_u32(0);
    buf.put_u16(200);
    buf.put_slice(b"abc");
    assert!(matches!(
        decode(&mut buf, MAX),
        Err(FrameError::Malformed { .. })
    ));
    // A PING with trailing bytes.
    let mut buf = BytesMut::new();
    put_header(&mut buf, FrameType::PING, 8);
    buf.put_u64(7);
    let mut bad = BytesMut::new();
    put_header(&mut bad, FrameType::CLOSE, 4 + 2 + 1 + 1);
    bad.put_u32(0);
    bad.put_u16(1);
    bad.put_slice(b"xy");
    assert!(decode(&mut buf, MAX).unwrap().is_some());
    assert!(matches!(
        decode(&mut bad, MAX),
        Err(FrameError::Malformed { .. })
    ));
    // An ACCEPTED body that is not a whole number of ids.
    let mut buf = BytesMut::new();
    put_header(&mut buf, FrameType::ACCEPTED, 12);
    buf.put_slice(&[0; 12]);
    assert!(matches!(
        decode(&mut buf, MAX),
        Err(FrameError::Malformed { .. })
    ));
}

#[test]
fn t15_every_type_id_has_a_defined_outcome() {
    for t in 0u8..=255 {
        for flags in [0u8, 1, 0x80] {
            let mut buf = BytesMut::new();
            buf.put_u32(0);
            buf.put_u8(t);
            buf.put_u8(flags);
            let outcome = decode(&mut buf, MAX);
            let ft = FrameType(t);
            match outcome {
                Ok(Some(Frame::Skipped(s))) => {
                    assert!(ft.is_skippable() && s == ft);
                }
                Err(FrameError::UnknownType(_)) => {
                    assert!(ft.name().is_none() && !ft.is_skippable())
                }
                Err(FrameError::BadFlags { .. }) => assert!(flags != 0 && ft.name().is_some()),
                // Known types with an empty body are malformed.
                Err(FrameError::Malformed { .. }) => {
                    assert!(flags == 0 && ft.name().is_some())
                }
                other => panic!("type {t:#04x} flags {flags:#04x}: {other:?}"),
            }
        }
    }
}

#[test]
fn payloads_are_zero_copy_slices() {
    let mut buf = BytesMut::new();
    encode_message(&mut buf, 1, 2, 3, 4, &[9; 64]);
    let base = buf.as_ptr() as usize;
    let Some(Frame::Message(m)) = decode(&mut buf, MAX).unwrap() else {
        panic!()
    };
    assert_eq!(
        m.payload.as_ptr() as usize,
        base + HEADER_LEN + MESSAGE_FIXED_LEN
    );
}

#[test]
fn reasons_are_capped_at_a_char_boundary() {
    let mut buf = BytesMut::new();
    encode_close(&mut buf, WireCode(7), &"é".repeat(400));
    let Some(Frame::Close { reason, .. }) = decode(&mut buf, MAX).unwrap() else {
        panic!()
    };
    assert!(reason.len() <= MAX_REASON_LEN && reason.chars().all(|c| c == 'é'));
}
