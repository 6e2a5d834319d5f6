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

/// Headers for a generated MESSAGE: none for most ids, some for others.
fn message_headers(id: u64) -> crate::a1_callis::headers::Headers {
    let mut h = crate::a1_callis::headers::Headers::new();
    for i in 0..(id % 4) {
        h.insert(&format!("k-{i}"), vec![i as u8; (id % 50) as usize])
            .unwrap();
    }
    h
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
                    headers: message_headers(id),
                    payload
                })
            ),
        proptest::collection::vec(any::<u64>(), 1..50).prop_map(|ids| {
            let mut b = BytesMut::new();
            encode_accepted(&mut b, &ids);
            b.advance(HEADER_LEN);
            Frame::Accepted(AcceptedIds(b.freeze()))
        }),
        (
            0u64..u64::MAX - 64,
            any::<u64>(),
            any::<u64>(),
            any::<u32>(),
            proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..200), 1..20)
        )
            .prop_map(|(first, dst, src, msg_type, payloads)| {
                let mut b = BytesMut::new();
                let mut w = BatchWriter::start(&mut b, first, dst, src, msg_type, &payloads[0]);
                for p in &payloads[1..] {
                    w.push(&mut b, p);
                }
                w.finish(&mut b);
                decode(&mut b, u32::MAX)
                    .expect("a written batch decodes")
                    .expect("whole")
            }),
        (any::<u64>(), bytes()).prop_map(|(id, payload)| Frame::Reply {
            id,
            extended: false,
            payload
        }),
        (any::<u64>(), bytes()).prop_map(|(id, payload)| {
            // A headers block, then the payload.
            let mut raw = BytesMut::new();
            message_headers(id | 1).put(&mut raw);
            raw.extend_from_slice(&payload);
            Frame::Reply {
                id,
                extended: true,
                payload: raw.freeze(),
            }
        }),
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
    // An ACCEPTED body that is not a whole number of runs.
    let mut buf = BytesMut::new();
    put_header(&mut buf, FrameType::ACCEPTED, 8);
    buf.put_slice(&[0; 8]);
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
                // Known types with an empty body are malformed (MESSAGE and REPLY may be
                // extended).
                Err(FrameError::Malformed { .. }) => assert!(
                    ft.name().is_some()
                        && (flags == 0
                            || ((ft == FrameType::MESSAGE || ft == FrameType::REPLY)
                                && flags == FLAG_EXTENDED))
                ),
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

proptest! {
    #[test]
    fn a_batch_carries_its_messages_with_consecutive_ids(
        first in 1u64..1 << 40,
        payloads in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..20_000), 1..12),
    ) {
        let mut b = BytesMut::new();
        let mut w = BatchWriter::start(&mut b, first, 7, 3, 0x0100_0001, &payloads[0]);
        for p in &payloads[1..] {
            prop_assert!(!w.fits(first + 1 + (payloads.len() as u64), 7, 3, 0x0100_0001, 0, u32::MAX));
            w.push(&mut b, p);
        }
        w.finish(&mut b);
        let Some(Frame::MessageBatch(batch)) = decode(&mut b, u32::MAX).unwrap() else {
            panic!("not a batch")
        };
        prop_assert_eq!(batch.len(), payloads.len());
        prop_assert_eq!(batch.last_id(), first + payloads.len() as u64 - 1);
        for (k, (m, p)) in batch.iter().zip(&payloads).enumerate() {
            prop_assert_eq!(m.id, first + k as u64);
            prop_assert_eq!((m.dst, m.src, m.msg_type), (7, 3, 0x0100_0001));
            prop_assert_eq!(&m.payload[..], &p[..]);
        }
    }

    #[test]
    fn accepted_runs_name_exactly_the_ids_given(
        ids in proptest::collection::vec(1u64..200, 1..300),
        max_runs in 1usize..20,
    ) {
        let mut rest = &ids[..];
        let mut named = Vec::new();
        while !rest.is_empty() {
            let mut b = BytesMut::new();
            let took = encode_accepted_upto(&mut b, rest, max_runs);
            prop_assert!(took >= 1);
            let Some(Frame::Accepted(acc)) = decode(&mut b, u32::MAX).unwrap() else {
                panic!("not ACCEPTED")
            };
            prop_assert!(acc.len() <= max_runs);
            named.extend(acc.iter());
            rest = &rest[took..];
        }
        prop_assert_eq!(named, ids);
    }
}

#[test]
fn a_consecutive_run_of_ids_is_one_twelve_byte_run() {
    let mut b = BytesMut::new();
    encode_accepted(&mut b, &(5..=1004).collect::<Vec<u64>>());
    assert_eq!(b.len(), HEADER_LEN + ACCEPTED_RUN_LEN);
    let Some(Frame::Accepted(acc)) = decode(&mut b, MAX).unwrap() else {
        panic!()
    };
    assert_eq!(acc.runs().collect::<Vec<_>>(), vec![(5, 1004)]);
}

#[test]
fn malformed_batches_and_runs_are_refused() {
    let batch = |entries: &[u8], first: u64| {
        let mut b = BytesMut::new();
        put_header(
            &mut b,
            FrameType::MESSAGE_BATCH,
            MESSAGE_FIXED_LEN + entries.len(),
        );
        b.put_u64(first);
        b.put_u64(7);
        b.put_u64(3);
        b.put_u32(0x0100_0001);
        b.put_slice(entries);
        decode(&mut b, MAX)
    };
    let refused = |r: Result<Option<Frame>, FrameError>, why: &str| match r {
        Err(FrameError::Malformed { what, .. }) => assert!(what.contains(why), "{what}"),
        other => panic!("{why}: {other:?}"),
    };
    refused(batch(&[], 1), "at least one");
    refused(batch(&[3, b'a', b'b'], 1), "longer than the rest");
    // 1 written in two bytes: not minimal, so it would not re-encode to itself.
    refused(batch(&[0x81, 0x00, b'a'], 1), "minimal");
    refused(batch(&[0x80], 1), "minimal");
    // Over u32.
    refused(batch(&[0xFF, 0xFF, 0xFF, 0xFF, 0x7F], 1), "minimal");
    refused(batch(&[0, 0], u64::MAX), "2^64");
    assert!(matches!(
        batch(&[0], u64::MAX),
        Ok(Some(Frame::MessageBatch(_)))
    ));
    assert!(
        batch(&[0x80, 0x01], 1).is_err(),
        "128 bytes promised, none there"
    );
    let mut b = BytesMut::new();
    put_header(&mut b, FrameType::ACCEPTED, ACCEPTED_RUN_LEN);
    b.put_u64(u64::MAX - 1);
    b.put_u32(2);
    refused(decode(&mut b, MAX), "2^64");
}

#[test]
fn batch_payloads_are_zero_copy_slices() {
    let mut buf = BytesMut::new();
    let mut w = BatchWriter::start(&mut buf, 1, 2, 3, 4, &[9; 64]);
    w.push(&mut buf, &[8; 300]);
    w.finish(&mut buf);
    let base = buf.as_ptr() as usize;
    let Some(Frame::MessageBatch(b)) = decode(&mut buf, MAX).unwrap() else {
        panic!()
    };
    let at: Vec<usize> = b
        .iter()
        .map(|m| m.payload.as_ptr() as usize - base)
        .collect();
    assert_eq!(
        at,
        vec![
            HEADER_LEN + MESSAGE_FIXED_LEN + 1,
            HEADER_LEN + MESSAGE_FIXED_LEN + 1 + 64 + 2
        ]
    );
}

#[test]
fn the_batch_and_runs_in_docs_wire_protocol_are_byte_exact() {
    let mut b = BytesMut::new();
    let mut w = BatchWriter::start(&mut b, 41, 2, 1, 0x0100_0001, b"hi");
    w.push(&mut b, &[0; 200]);
    w.finish(&mut b);
    let mut expected = vec![0, 0, 0, 0xe9, 0x14, 0];
    expected.extend([0, 0, 0, 0, 0, 0, 0, 0x29]);
    expected.extend([0, 0, 0, 0, 0, 0, 0, 2]);
    expected.extend([0, 0, 0, 0, 0, 0, 0, 1]);
    expected.extend([1, 0, 0, 1]);
    expected.extend([2, b'h', b'i']);
    expected.extend([0xc8, 0x01]);
    expected.extend([0; 200]);
    assert_eq!(&b[..], &expected[..]);
    let mut a = BytesMut::new();
    encode_accepted(&mut a, &[41, 42, 50]);
    let mut expected = vec![0, 0, 0, 0x18, 0x11, 0];
    expected.extend([0, 0, 0, 0, 0, 0, 0, 0x29, 0, 0, 0, 1]);
    expected.extend([0, 0, 0, 0, 0, 0, 0, 0x32, 0, 0, 0, 0]);
    assert_eq!(&a[..], &expected[..]);
}

#[test]
fn a_message_without_headers_has_no_extension_and_flags_zero() {
    let mut buf = BytesMut::new();
    encode_message(&mut buf, 1, 2, 3, 0x0100_0000, b"hi");
    assert_eq!(buf.len(), HEADER_LEN + MESSAGE_FIXED_LEN + 2);
    assert_eq!(buf[5], 0, "flags");
}

/// The MESSAGE with headers in docs/wire-protocol.md, byte for byte.
#[test]
fn the_message_with_headers_in_docs_wire_protocol_is_byte_exact() {
    use crate::a1_callis::headers::Headers;
    let headers = Headers::new().with("tenant", "acme").unwrap();
    let mut buf = BytesMut::new();
    encode_message_with_headers(&mut buf, 7, 2, 1, 0x0100_0001, &headers, b"hi");
    let expected: Vec<u8> = [
        &[0x00, 0x00, 0x00, 0x2e, 0x10, 0x01][..], // header: 46 bytes, MESSAGE, EXTENDED
        &[0, 0, 0, 0, 0, 0, 0, 7],                 // id 7
        &[0, 0, 0, 0, 0, 0, 0, 2],                 // dst 2
        &[0, 0, 0, 0, 0, 0, 0, 1],                 // src 1
        &[0x01, 0x00, 0x00, 0x01],                 // msg_type
        &[0x00, 0x0e],                             // block: 14 bytes
        &[0x01],                                   // version 1
        &[0x06, b't', b'e', b'n', b'a', b'n', b't'], // key "tenant"
        &[0x00, 0x04, b'a', b'c', b'm', b'e'],     // value "acme"
        b"hi",                                     // payload
    ]
    .concat();
    assert_eq!(&buf[..], &expected[..]);
    let Some(Frame::Message(m)) = decode(&mut buf, MAX).unwrap() else {
        panic!()
    };
    assert_eq!(m.headers, headers);
    assert_eq!(&m.payload[..], b"hi");
}

#[test]
fn malformed_extensions_are_refused_and_other_frames_take_no_flag() {
    use crate::a1_callis::headers::Headers;
    let headers = Headers::new().with("a", "b").unwrap();
    let mut good = BytesMut::new();
    encode_message_with_headers(&mut good, 1, 2, 3, 0x0100_0000, &headers, b"p");
    // The block's length pointing past the body.
    let mut bad = good.clone();
    bad[HEADER_LEN + MESSAGE_FIXED_LEN + 1] = 0xff;
    assert!(matches!(
        decode(&mut bad, MAX),
        Err(FrameError::Malformed { .. })
    ));
    // The flag without a block.
    let mut bare = BytesMut::new();
    encode_message(&mut bare, 1, 2, 3, 0x0100_0000, b"");
    bare[5] = FLAG_EXTENDED;
    assert!(matches!(
        decode(&mut bare, MAX),
        Err(FrameError::Malformed { .. })
    ));
    // A key outside the alphabet.
    let mut upper = good.clone();
    upper[HEADER_LEN + MESSAGE_FIXED_LEN + 4] = b'A';
    assert!(matches!(
        decode(&mut upper, MAX),
        Err(FrameError::Malformed { .. })
    ));
    // A REPLY whose block is malformed.
    let mut reply = BytesMut::new();
    encode_reply_extended(&mut reply, 1, &[0, 9, 1, 1, b'a']);
    assert!(matches!(
        decode(&mut reply, MAX),
        Err(FrameError::Malformed { .. })
    ));
    // MESSAGE_BATCH and ACCEPTED define no flag.
    for t in [FrameType::MESSAGE_BATCH, FrameType::ACCEPTED] {
        let mut buf = BytesMut::new();
        buf.put_u32(8);
        buf.put_u8(t.0);
        buf.put_u8(FLAG_EXTENDED);
        buf.put_u64(1);
        assert!(matches!(
            decode(&mut buf, MAX),
            Err(FrameError::BadFlags { .. })
        ));
    }
}
