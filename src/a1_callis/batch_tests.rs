//! The batched wire on the session pair harness (virtual clock): MESSAGE_BATCH frames cut
//! by a dropped callis, duplicates on either side of a batch's edge after a replay, batches
//! held to the frame limit the peer announced, and acceptances written as runs.

use std::time::Duration;

use bytes::{Bytes, BytesMut};

use super::*;
use crate::a1_callis::frame::{Frame, FrameType};
use crate::testing::pair::{frame_types, message_ids, record};

type Pair = crate::testing::pair::SessionPair;

const APP: u32 = A3_MESSAGE_TYPE_BASE | 1;

fn accepted() -> SendEnd {
    SendEnd::Answered(Answer::Accepted)
}

fn send_n(p: &mut Pair, n: usize, payload: &'static [u8]) -> Vec<u64> {
    (0..n)
        .map(|_| p.send(APP, payload, Duration::from_secs(30)))
        .collect()
}

#[test]
fn consecutive_messages_to_one_taberna_go_as_one_batch_and_are_accepted_as_one_run() {
    let mut p = Pair::new(SessionConfig::default());
    p.connect();
    p.b_auto = Some(Answer::Accepted);
    let ids = send_n(
        &mut p,
        200,
        b"sixty-four bytes, more or less, as W1 sends them",
    );
    p.pump();
    assert_eq!(p.delivered_ids(), ids);
    let batches: Vec<&Frame> = p
        .a_wire
        .iter()
        .filter(|f| matches!(f, Frame::MessageBatch(_)))
        .collect();
    assert_eq!(
        batches.len(),
        1,
        "one write, one batch: {:?}",
        frame_types(&p.a_wire)
    );
    let runs: Vec<(u64, u64)> = p
        .b_wire
        .iter()
        .filter_map(|f| match f {
            Frame::Accepted(ids) => Some(ids.runs().collect::<Vec<_>>()),
            _ => None,
        })
        .flatten()
        .collect();
    assert_eq!(
        runs,
        vec![(ids[0], ids[199])],
        "one run for the whole batch"
    );
    assert!(p.finished().iter().all(|(_, o)| *o == accepted()));
    assert_eq!(p.a.in_flight(), 0);
}

#[test]
fn a_batch_cut_in_half_by_a_dropped_callis_is_replayed_whole_and_delivered_once() {
    let mut p = Pair::new(SessionConfig::default());
    p.connect();
    let ids = send_n(&mut p, 50, b"m");
    // The first half of the batch arrives; the callis drops before the rest.
    let mut out = BytesMut::new();
    assert!(p.a.poll_transmit(p.now, &mut out));
    let half = out.len() / 2;
    p.inject_to_b(&out[..half]);
    p.drain_events();
    assert!(
        p.delivered_ids().is_empty(),
        "half a frame delivers nothing"
    );
    p.cut();
    p.a_wire.clear();
    p.connect();
    assert_eq!(message_ids(&p.a_wire), ids, "replayed in order");
    assert_eq!(p.delivered_ids(), ids);
    // A batch split across two reads on one callis is one frame too.
    let more = send_n(&mut p, 40, b"split");
    let mut out = BytesMut::new();
    assert!(p.a.poll_transmit(p.now, &mut out));
    p.inject_to_b(&out[..7]);
    p.inject_to_b(&out[7..]);
    p.drain_events();
    let delivered = p.delivered_ids();
    assert_eq!(delivered.get(50..), Some(more.as_slice()));
    p.answer_all(Answer::Accepted);
    p.pump();
    assert_eq!(p.finished().len(), 90, "every send finished once");
    assert_eq!(p.b.stats().duplicates_suppressed, 0);
}

#[test]
fn a_replayed_batch_that_spans_answered_and_new_ids_delivers_each_once() {
    let mut p = Pair::new(SessionConfig::default());
    p.connect();
    let first = send_n(&mut p, 10, b"old");
    p.pump();
    assert_eq!(p.delivered_ids(), first);
    // b answers the ten, but the answers are lost with the callis; meanwhile ten more
    // messages wait, so the replay is one batch across the edge of what b has seen.
    let epoch = p.b.peer_epoch().expect("epoch");
    p.stall_b_to_a = true;
    for id in &first {
        p.b.answer(epoch, *id, Answer::Accepted);
    }
    p.pump();
    p.cut();
    p.stall_b_to_a = false;
    let second = send_n(&mut p, 10, b"new");
    p.a_wire.clear();
    p.connect();
    let all: Vec<u64> = first.iter().chain(&second).copied().collect();
    assert_eq!(message_ids(&p.a_wire), all);
    assert_eq!(
        p.a_wire
            .iter()
            .filter(|f| matches!(f, Frame::MessageBatch(_)))
            .count(),
        1,
        "the replay and the new messages share a batch"
    );
    assert_eq!(p.delivered_ids(), all, "nothing delivered twice");
    assert_eq!(p.b.stats().duplicates_suppressed, 10);
    // The ten old ones were answered again from b's dedupe state.
    let mut finished: Vec<u64> = p.finished().iter().map(|(id, _)| *id).collect();
    finished.sort_unstable();
    assert_eq!(finished, first);
    p.answer_all(Answer::Accepted);
    p.pump();
    assert_eq!(p.finished().len(), 20);
    assert_eq!(p.a.in_flight(), 0);
}

#[test]
fn a_batch_never_passes_the_frame_limit_the_peer_announced() {
    for limit in [frame::MIN_FRAME_LEN, 29, 100, 1000] {
        let b_config = SessionConfig {
            max_frame_len: limit,
            ..SessionConfig::default()
        };
        let mut p = Pair::new(SessionConfig::default());
        p.b = Session::new(b_config, crate::testing::pair::B.into(), 2);
        // The pump fails the test on any frame over the limit.
        p.wire_limit = limit;
        p.connect();
        p.b_auto = Some(Answer::Accepted);
        let max = p.a.max_payload_len();
        let payload: &'static [u8] = &[7u8; 2000];
        let payload = payload.get(..max.min(40)).expect("40 bytes at most");
        let ids: Vec<u64> = (0..300)
            .map(|_| {
                p.a.send(Outgoing {
                    headers: Default::default(),
                    dst: 7,
                    src: 3,
                    msg_type: APP,
                    payload: Bytes::copy_from_slice(payload),
                    deadline: p.now + Duration::from_secs(30),
                })
                .expect("send")
            })
            .collect();
        p.pump();
        assert_eq!(p.delivered_ids(), ids, "limit {limit}");
        assert_eq!(p.finished().len(), 300, "limit {limit}");
        let types = frame_types(&p.a_wire);
        if frame::MESSAGE_FIXED_LEN + frame::batch_entry_len(payload.len()) > limit as usize {
            // A message alone as a batch would pass the limit: it goes as a MESSAGE (28
            // bytes of header, and the payload the limit leaves room for).
            assert!(types.contains(&FrameType::MESSAGE), "{types:?}");
            assert!(!types.contains(&FrameType::MESSAGE_BATCH), "{types:?}");
        } else {
            assert!(types.contains(&FrameType::MESSAGE_BATCH), "{types:?}");
            assert!(!types.contains(&FrameType::MESSAGE), "{types:?}");
        }
        // (HELLO has its own limit, whatever the peer's.)
        for f in p.a_wire.iter().filter(|f| !matches!(f, Frame::Hello(_))) {
            let mut buf = BytesMut::new();
            f.encode(&mut buf);
            assert!(
                buf.len() - frame::HEADER_LEN <= limit as usize,
                "a {:?} of {} bytes over the limit {limit}",
                f.frame_type(),
                buf.len() - frame::HEADER_LEN
            );
        }
        assert!(p.a.is_open() && p.b.is_open(), "limit {limit}");
    }
}

#[test]
fn batches_follow_the_destination_and_type_and_never_reorder() {
    let mut p = Pair::new(SessionConfig::default());
    p.connect();
    p.b_auto = Some(Answer::Accepted);
    let mut ids = Vec::new();
    for (dst, n) in [(1u64, 3), (2, 2), (1, 4)] {
        for _ in 0..n {
            ids.push(
                p.a.send(Outgoing {
                    headers: Default::default(),
                    dst,
                    src: 3,
                    msg_type: APP,
                    payload: Bytes::from_static(b"x"),
                    deadline: p.now + Duration::from_secs(30),
                })
                .expect("send"),
            );
        }
    }
    p.pump();
    assert_eq!(p.delivered_ids(), ids);
    let sizes: Vec<(u64, usize)> = p
        .a_wire
        .iter()
        .filter_map(|f| match f {
            Frame::MessageBatch(b) => Some((b.dst, b.len())),
            _ => None,
        })
        .collect();
    assert_eq!(sizes, vec![(1, 3), (2, 2), (1, 4)]);
    let mut wire = Vec::new();
    let mut buf = BytesMut::new();
    for f in &p.a_wire {
        f.encode(&mut buf);
    }
    record(&mut wire, &buf);
    assert_eq!(message_ids(&wire), ids, "re-encoded, the same messages");
}

#[test]
fn an_acceptance_run_is_walked_over_what_is_held_only_and_a_run_past_the_last_id_closes() {
    use bytes::BufMut;
    let run = |first: u64, more: u32| {
        let mut b = BytesMut::new();
        b.put_u32(frame::ACCEPTED_RUN_LEN as u32);
        b.put_u8(FrameType::ACCEPTED.0);
        b.put_u8(0);
        b.put_u64(first);
        b.put_u32(more);
        b
    };
    let mut p = Pair::new(SessionConfig::default());
    let base = 1u64 << 40;
    p.a = Session::new(SessionConfig::default(), crate::testing::pair::A.into(), 1)
        .with_first_id(base);
    p.connect();
    let ids = send_n(&mut p, 3, b"held");
    p.pump();
    // 2^32 ids, all below what a holds: nothing to walk, nothing finishes.
    p.inject_to_a(&run(1, u32::MAX));
    p.drain_events();
    assert!(p.finished().is_empty());
    assert_eq!(p.a.in_flight(), 3);
    // A run that starts far below and ends on the middle one finishes the first two.
    p.inject_to_a(&run(base - 1_000_000, 1_000_001));
    p.drain_events();
    assert_eq!(
        p.finished(),
        vec![(ids[0], accepted()), (ids[1], accepted())]
    );
    // A run past the last id sent is a violation.
    p.inject_to_a(&run(ids[2], 1));
    p.drain_events();
    assert!(
        p.a_events.iter().any(|e| matches!(
            e,
            Event::Close(err) if err.id() == crate::ErrorId::ProtocolViolation
        )),
        "{:?}",
        p.a_events
    );
}
