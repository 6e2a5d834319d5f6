//! Two sessions back to back in memory on a virtual clock: the `Pair` harness and the
//! protocol tests that run on it (replay, dedupe, keepalive, priority, batching, epochs).
//! Everything here takes microseconds and cannot flake: no sockets, no real time.
//!
//! Over 800 lines on purpose: one test per protocol rule, each a few dozen lines of one
//! scenario, sharing the small helpers at the top; splitting it would only scatter them.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use super::*;
use crate::a1_callis::frame::{self, Frame, FrameType};
use crate::a1_callis::reply_budget::ReplyBudget;
use crate::testing::pair::{A, B, Side, Verdict, frame_types, message_ids, record};
const APP: u32 = A3_MESSAGE_TYPE_BASE + 1;
const SERVICE: u32 = 0x0001_0000;

type Pair = crate::testing::SessionPair;

fn accepted() -> SendEnd {
    SendEnd::Answered(Answer::Accepted)
}

fn failed_with(o: &SendEnd) -> Option<ErrorId> {
    match o {
        SendEnd::Failed(e) => Some(e.id()),
        SendEnd::Answered(_) => None,
    }
}

fn closed_with(events: &[Event]) -> Option<ErrorId> {
    events.iter().find_map(|e| match e {
        Event::Close(err) => Some(err.id()),
        _ => None,
    })
}

#[test]
fn hello_opens_both_sides() {
    let mut p = Pair::new(SessionConfig::default());
    p.connect();
    assert!(p.a.is_open() && p.b.is_open());
    assert!(p.a_events.contains(&Event::Connected {
        peer_epoch: 2,
        restarted: false
    }));
    assert_eq!(p.b.peer_epoch(), Some(1));
}

#[test]
fn messages_are_delivered_in_order_and_acks_are_batched() {
    let mut p = Pair::new(SessionConfig::default());
    p.connect();
    let ids: Vec<u64> = (0..100)
        .map(|_| p.send(APP, b"hello", Duration::from_secs(5)))
        .collect();
    p.pump();
    assert_eq!(p.delivered_ids(), ids);
    p.answer_all(Answer::Accepted);
    p.pump();
    let finished = p.finished();
    assert_eq!(finished.len(), 100);
    assert!(finished.iter().all(|(_, o)| *o == accepted()));
    let acks: Vec<&Frame> = p
        .b_wire
        .iter()
        .filter(|f| matches!(f, Frame::Accepted(_)))
        .collect();
    assert_eq!(
        acks.len(),
        1,
        "one ACCEPTED frame answers all 100: {acks:?}"
    );
    assert_eq!(p.a.in_flight(), 0);
}

#[test]
fn replies_and_rejects_reach_the_sender() {
    let mut p = Pair::new(SessionConfig::default());
    p.connect();
    let r = p.send(APP, b"q", Duration::from_secs(5));
    let j = p.send(APP, b"q", Duration::from_secs(5));
    p.pump();
    let epoch = p.b.peer_epoch().expect("epoch");
    p.b.answer(epoch, r, Answer::Replied(Bytes::from_static(b"answer")));
    let reject = Answer::Rejected {
        error: WireCode::of(ErrorId::RemoteTabernaRejected),
        code: 42,
        reason: "no thanks".into(),
    };
    p.b.answer(epoch, j, reject.clone());
    p.pump();
    let finished = p.finished();
    assert!(finished.contains(&(
        r,
        SendEnd::Answered(Answer::Replied(Bytes::from_static(b"answer")))
    )));
    assert!(finished.contains(&(j, SendEnd::Answered(reject))));
}

#[test]
fn t26_replay_after_a_cut_keeps_order_deadlines_and_exactly_once() {
    let mut p = Pair::new(SessionConfig::default());
    p.connect();
    let ids: Vec<u64> = (0..10)
        .map(|_| p.send(APP, b"m", Duration::from_secs(5)))
        .collect();
    p.pump();
    assert_eq!(p.delivered_ids(), ids);
    // b answers the first five, but the answers never leave b before the cut.
    let epoch = p.b.peer_epoch().expect("epoch");
    p.stall_b_to_a = true;
    for id in &ids[..5] {
        p.b.answer(epoch, *id, Answer::Accepted);
    }
    p.pump();
    p.cut();
    p.stall_b_to_a = false;
    p.a_wire.clear();
    p.connect();
    // a replays all ten in their original order; b suppresses the duplicates and re-sends
    // the five answers it had.
    assert_eq!(message_ids(&p.a_wire), ids);
    assert_eq!(p.delivered_ids(), ids, "nothing delivered twice");
    assert_eq!(p.b.stats().duplicates_suppressed, 10);
    assert_eq!(p.finished().len(), 5);
    // The other five are answered on the new callis.
    for id in &ids[5..] {
        p.b.answer(epoch, *id, Answer::Accepted);
    }
    p.pump();
    let mut finished: Vec<u64> = p.finished().iter().map(|(id, _)| *id).collect();
    finished.sort_unstable();
    assert_eq!(finished, ids, "every send finished exactly once");
    assert_eq!(p.a.stats().messages_replayed, 10);

    // A replayed message keeps its original deadline.
    let late = p.send(APP, b"late", Duration::from_secs(5));
    p.pump();
    p.cut();
    p.advance(Duration::from_secs(4));
    p.connect();
    assert!(p.finished().iter().all(|(id, _)| *id != late));
    p.advance(Duration::from_millis(1100));
    let outcome = p
        .finished()
        .into_iter()
        .find(|(id, _)| *id == late)
        .expect("finished");
    assert_eq!(failed_with(&outcome.1), Some(ErrorId::SendTimeout));
}

#[test]
fn a_message_frame_lost_alone_is_replayed_on_the_next_callis_and_nothing_is_delivered_twice() {
    let mut p = Pair::new(SessionConfig::default());
    p.connect();
    p.b_auto = Some(Answer::Accepted);
    // To three tabernas, so three frames (a batch is one destination's).
    let ids: Vec<u64> = (0..3)
        .map(|dst| {
            p.a.send(Outgoing {
                headers: Default::default(),
                dst,
                src: 3,
                msg_type: APP,
                payload: Bytes::from_static(b"m"),
                deadline: p.now + Duration::from_secs(5),
            })
            .expect("send")
        })
        .collect();
    // The callis loses the second frame and nothing else (the frames around it go in the
    // same write).
    let lost = ids[1];
    p.filter = Some(Box::new(move |from, f| match f {
        Frame::MessageBatch(b) if from == Side::A && b.first_id == lost => Verdict::Drop,
        _ => Verdict::Pass,
    }));
    p.pump();
    assert_eq!(p.delivered_ids(), vec![ids[0], ids[2]]);
    assert_eq!(
        p.finished(),
        vec![(ids[0], accepted()), (ids[2], accepted())]
    );
    assert_eq!(p.a.in_flight(), 1, "the lost one is retained");
    // Nothing tells a it was lost until the callis is replaced: then it goes again, once.
    p.filter = None;
    p.cut();
    p.connect();
    p.pump();
    assert_eq!(p.delivered_ids(), vec![ids[0], ids[2], lost]);
    assert_eq!(p.outcome(lost), Some(accepted()));
    assert_eq!(p.a.in_flight(), 0);
    assert!(p.a.is_open() && p.b.is_open());
}

#[test]
fn t19_a_duplicate_id_is_answered_again_on_a_later_callis_never_delivered_twice() {
    let mut p = Pair::new(SessionConfig::default());
    p.connect();
    p.b_auto = Some(Answer::Accepted);
    // The answer is lost with the callis, so a sends the same id again on the next one.
    p.stall_b_to_a = true;
    let id = p.send(APP, b"once", Duration::from_secs(5));
    p.pump();
    p.cut();
    p.stall_b_to_a = false;
    p.b_wire.clear();
    p.connect();
    p.pump();
    assert_eq!(p.delivered_ids(), vec![id]);
    assert!(
        p.b_wire
            .iter()
            .any(|f| matches!(f, Frame::Accepted(ids) if ids.iter().eq([id]))),
        "the duplicate is answered again: {:?}",
        p.b_wire
    );
    assert_eq!(p.outcome(id), Some(accepted()));
    // The same id twice on one callis is a violation (see untrusted_peer_tests, T31).
}

#[test]
fn t19_ids_far_outside_the_window_are_a_violation() {
    let config = SessionConfig {
        window: 16,
        ..SessionConfig::default()
    };
    let mut p = Pair::new(config);
    p.connect();
    let mut buf = BytesMut::new();
    frame::encode_message(&mut buf, 100, 7, 3, APP, b"x");
    frame::encode_message(&mut buf, 50, 7, 3, APP, b"x");
    p.inject_to_b(&buf);
    p.drain_events();
    assert_eq!(closed_with(&p.b_events), Some(ErrorId::ProtocolViolation));
    assert_eq!(p.delivered_ids(), vec![100]);
    // The CLOSE goes out with the violation's id as its code.
    let mut out = BytesMut::new();
    p.b.poll_transmit(p.now, &mut out);
    assert!(matches!(
        frame::decode(&mut out, u32::MAX),
        Ok(Some(Frame::Close { code, .. })) if code == WireCode::of(ErrorId::ProtocolViolation)
    ));
    assert!(p.b.is_closing());
}

#[test]
fn t19_ids_near_2_pow_32_and_the_end_of_the_id_space() {
    let mut p = Pair::new(SessionConfig::default());
    p.a = Session::new(SessionConfig::default(), A.into(), 1).with_first_id((1 << 32) - 5);
    p.b_auto = Some(Answer::Accepted);
    p.connect();
    for _ in 0..10 {
        p.send(APP, b"x", Duration::from_secs(5));
    }
    p.pump();
    assert_eq!(p.delivered_ids().len(), 10);
    assert_eq!(p.finished().len(), 10);
    let mut s = Session::new(SessionConfig::default(), A.into(), 1).with_first_id(u64::MAX - 2);
    let msg = || Outgoing {
        headers: Default::default(),
        dst: 1,
        src: 1,
        msg_type: APP,
        payload: Bytes::new(),
        deadline: Instant::now() + Duration::from_secs(1),
    };
    assert!(s.send(msg()).is_ok());
    assert!(s.send(msg()).is_ok());
    assert_eq!(
        s.send(msg()).expect_err("ids exhausted").id(),
        ErrorId::LocalQueueFull
    );
}

#[test]
fn the_sender_never_runs_more_than_a_window_ahead() {
    let config = SessionConfig {
        window: 4,
        ..SessionConfig::default()
    };
    let mut p = Pair::new(config);
    p.connect();
    let ids: Vec<u64> = (0..10)
        .map(|_| p.send(APP, b"w", Duration::from_secs(5)))
        .collect();
    p.pump();
    assert_eq!(p.delivered_ids(), ids[..4].to_vec());
    let epoch = p.b.peer_epoch().expect("epoch");
    p.b.answer(epoch, ids[0], Answer::Accepted);
    p.pump();
    assert_eq!(p.delivered_ids(), ids[..5].to_vec());
}

#[test]
fn keepalive_measures_rtt_and_idle_timeout_closes() {
    let mut p = Pair::new(SessionConfig::default());
    p.latency = Duration::from_millis(3);
    p.connect();
    // The first probe goes out as the callis opens: the RTT is known well before the first
    // keepalive interval (5 s).
    p.advance(Duration::from_millis(50));
    let rtt = p.a.rtt().expect("rtt measured right after the hello");
    assert!(rtt >= Duration::from_millis(6), "{rtt:?}");
    assert!(p.b.rtt().is_some(), "both sides probe");
    p.advance(Duration::from_secs(5));
    // Keepalives keep an idle but healthy callis open well past idle_timeout.
    p.advance(Duration::from_secs(60));
    assert!(p.a.is_open() && p.b.is_open());
    assert_eq!(closed_with(&p.a_events), None);
    // A peer that goes silent is closed after idle_timeout.
    p.stall_b_to_a = true;
    p.advance(Duration::from_secs(19));
    assert!(p.a.is_open());
    p.advance(Duration::from_secs(2));
    assert_eq!(closed_with(&p.a_events), Some(ErrorId::ConnectionLost));
}

#[test]
fn missing_hello_closes_at_hello_timeout() {
    let mut p = Pair::new(SessionConfig::default());
    p.stall_b_to_a = true;
    p.connect();
    p.advance(Duration::from_secs(11));
    assert_eq!(closed_with(&p.a_events), Some(ErrorId::ProtocolViolation));
}

#[test]
fn t20_control_and_answers_go_before_a2_before_a3() {
    let mut p = Pair::new(SessionConfig::default());
    // Queued before the callis exists: A3 first, then A2.
    let a3: Vec<u64> = (0..5)
        .map(|_| p.send(APP, b"app", Duration::from_secs(5)))
        .collect();
    let a2: Vec<u64> = (0..5)
        .map(|_| p.send(SERVICE, b"svc", Duration::from_secs(5)))
        .collect();
    p.connect();
    let expected: Vec<u64> = a2.iter().chain(&a3).copied().collect();
    assert_eq!(p.delivered_ids(), expected, "A2 overtakes A3");
    // b owes answers and has its own messages queued: answers go first.
    for _ in 0..3 {
        p.b.send(Outgoing {
            headers: Default::default(),
            dst: 1,
            src: 1,
            msg_type: APP,
            payload: Bytes::from_static(b"from b"),
            deadline: p.now + Duration::from_secs(5),
        })
        .expect("send");
    }
    p.answer_all(Answer::Accepted);
    let mut out = BytesMut::new();
    p.b.poll_transmit(p.now, &mut out);
    let mut wire = Vec::new();
    record(&mut wire, &out);
    assert_eq!(
        frame_types(&wire),
        vec![FrameType::ACCEPTED, FrameType::MESSAGE_BATCH],
        "b's three messages to one taberna go as one batch"
    );
}

#[test]
fn t20_a3_ages_under_an_a2_flood_one_after_every_sixteen_a2() {
    let mut p = Pair::new(SessionConfig::default());
    let a3: Vec<u64> = (0..3)
        .map(|_| p.send(APP, b"app", Duration::from_secs(5)))
        .collect();
    let a2: Vec<u64> = (0..100)
        .map(|_| p.send(SERVICE, b"svc", Duration::from_secs(5)))
        .collect();
    p.connect();
    let order = p.delivered_ids();
    assert_eq!(order.len(), 103);
    // A2 first, then each waiting A3 message after 16 A2 ones; within a class, send order.
    let positions: Vec<usize> = a3
        .iter()
        .map(|id| order.iter().position(|o| o == id).expect("delivered"))
        .collect();
    assert_eq!(positions, [16, 33, 50]);
    let a2_order: Vec<u64> = order.iter().copied().filter(|id| a2.contains(id)).collect();
    assert_eq!(a2_order, a2);
}

#[test]
fn epoch_change_fails_retained_sends_with_peer_restarted() {
    let mut p = Pair::new(SessionConfig::default());
    p.connect();
    let sent: Vec<u64> = (0..5)
        .map(|_| p.send(APP, b"m", Duration::from_secs(30)))
        .collect();
    p.pump();
    p.cut();
    // Queued while down: never transmitted, so it survives the restart.
    let queued = p.send(APP, b"q", Duration::from_secs(30));
    // b restarts: same identity, new epoch, no memory.
    p.b = Session::new(SessionConfig::default(), B.into(), 99);
    p.b_events.clear();
    p.b_auto = Some(Answer::Accepted);
    p.connect();
    assert!(p.a_events.contains(&Event::Connected {
        peer_epoch: 99,
        restarted: true
    }));
    let finished = p.finished();
    for id in &sent {
        let (_, outcome) = finished.iter().find(|(i, _)| i == id).expect("finished");
        assert_eq!(failed_with(outcome), Some(ErrorId::PeerRestarted));
    }
    assert!(finished.contains(&(queued, accepted())));
    // New sends work.
    let fresh = p.send(APP, b"new", Duration::from_secs(5));
    p.pump();
    assert!(p.finished().contains(&(fresh, accepted())));
}

#[test]
fn answers_for_an_old_peer_epoch_are_dropped() {
    let mut p = Pair::new(SessionConfig::default());
    p.connect();
    let id = p.send(APP, b"m", Duration::from_secs(5));
    p.pump();
    let old_epoch = p.b.peer_epoch().expect("epoch");
    // a restarts; b's handler answers afterwards with the old epoch.
    p.cut();
    p.a = Session::new(SessionConfig::default(), A.into(), 77);
    p.connect();
    p.b.answer(old_epoch, id, Answer::Accepted);
    p.b_wire.clear();
    p.pump();
    assert!(
        !p.b_wire.iter().any(|f| matches!(f, Frame::Accepted(_))),
        "{:?}",
        p.b_wire
    );
}

#[test]
fn a_hello_that_lies_about_identity_or_version_closes() {
    let mut p = Pair::new(SessionConfig::default());
    p.a.connected(p.now, "spiffe://t/domus/someone-else");
    p.b.connected(p.now, A);
    p.pump();
    assert_eq!(closed_with(&p.a_events), Some(ErrorId::ProtocolViolation));

    let mut s: Session = Session::new(SessionConfig::default(), A.into(), 1);
    s.connected(Instant::now(), B);
    let mut buf = BytesMut::new();
    frame::encode_hello(
        &mut buf,
        &frame::Hello {
            version: 9,
            epoch: 1,
            max_frame_len: 1 << 20,
            window: 16,
            domus_id: B.into(),
        },
    );
    s.recv_buf().extend_from_slice(&buf);
    s.handle_input(Instant::now());
    assert!(
        matches!(s.poll_event(), Some(Event::Close(e)) if e.id() == ErrorId::UnsupportedVersion)
    );
}

#[test]
fn local_refusals_are_immediate_and_typed() {
    let config = SessionConfig {
        max_frame_len: 1024,
        max_in_flight: 2,
        ..SessionConfig::default()
    };
    let mut s = Session::new(config, A.into(), 1);
    let msg = |len: usize, msg_type: u32| Outgoing {
        headers: Default::default(),
        dst: 1,
        src: 1,
        msg_type,
        payload: Bytes::from(vec![0u8; len]),
        deadline: Instant::now() + Duration::from_secs(1),
    };
    let e = s.send(msg(2000, APP)).expect_err("too large");
    assert_eq!(e.id(), ErrorId::PayloadTooLarge);
    assert!(e.message().contains("2000 bytes"), "{e}");
    assert_eq!(
        s.send(msg(1, 5)).expect_err("A1 type").id(),
        ErrorId::InvalidMessageType
    );
    s.send(msg(1, APP)).expect("1");
    s.send(msg(1, APP)).expect("2");
    assert_eq!(
        s.send(msg(1, APP)).expect_err("full").id(),
        ErrorId::LocalQueueFull
    );
}

#[test]
fn a_reply_over_the_retention_budget_becomes_reply_lost_on_replay() {
    let config = SessionConfig {
        max_retained_reply_bytes: 4,
        ..SessionConfig::default()
    };
    let mut p = Pair::new(config);
    p.connect();
    let id = p.send(APP, b"q", Duration::from_secs(5));
    p.pump();
    let epoch = p.b.peer_epoch().expect("epoch");
    p.stall_b_to_a = true;
    p.b.answer(
        epoch,
        id,
        Answer::Replied(Bytes::from_static(b"too big to keep")),
    );
    p.pump();
    p.cut();
    p.stall_b_to_a = false;
    p.connect();
    let (_, outcome) = p.finished().pop().expect("finished");
    assert!(matches!(
        outcome,
        SendEnd::Answered(Answer::Rejected { error, .. }) if error == WireCode::of(ErrorId::ReplyLost)
    ));
}

/// A pair whose receiver keeps replies within `budget` (shared with other pairs).
fn pair_sharing(budget: &Arc<ReplyBudget>) -> Pair {
    let mut p = Pair::new(SessionConfig::default());
    p.b = Session::new(SessionConfig::default(), B.into(), 2).with_reply_budget(budget.clone());
    p
}

/// Sends one request, answers it with `reply` while the answer cannot reach the sender,
/// reconnects, and returns the outcome the replay got.
fn reply_across_a_cut(p: &mut Pair, reply: &'static [u8]) -> SendEnd {
    p.connect();
    let id = p.send(APP, b"q", Duration::from_secs(5));
    p.pump();
    let epoch = p.b.peer_epoch().expect("epoch");
    p.stall_b_to_a = true;
    p.b.answer(epoch, id, Answer::Replied(Bytes::from_static(reply)));
    p.pump();
    p.cut();
    p.stall_b_to_a = false;
    p.connect();
    p.finished().pop().expect("finished").1
}

#[test]
fn receivers_sharing_a_reply_budget_keep_no_more_than_it_together_and_give_back_on_drop() {
    let budget = Arc::new(ReplyBudget::new(20));
    let mut first = pair_sharing(&budget);
    let mut second = pair_sharing(&budget);
    let reply = b"fifteen bytes!!";
    assert_eq!(
        reply_across_a_cut(&mut first, reply),
        SendEnd::Answered(Answer::Replied(Bytes::from_static(reply)))
    );
    // The first receiver still keeps its reply (no DONE_BELOW yet): 15 of the 20 bytes.
    assert_eq!(budget.used(), 15);
    // Each receiver alone is under the cap, but together they are not: the second reply is
    // sent, not kept, and its replay gets ReplyLost.
    assert!(matches!(
        reply_across_a_cut(&mut second, reply),
        SendEnd::Answered(Answer::Rejected { error, .. }) if error == WireCode::of(ErrorId::ReplyLost)
    ));
    assert_eq!(budget.used(), 15);
    // A receiver that goes away gives back what it kept.
    drop(first);
    assert_eq!(budget.used(), 0);
    let mut third = pair_sharing(&budget);
    assert_eq!(
        reply_across_a_cut(&mut third, reply),
        SendEnd::Answered(Answer::Replied(Bytes::from_static(reply)))
    );
    assert_eq!(budget.used(), 15);
}

#[test]
fn t15_skippable_frames_are_counted_not_fatal() {
    let mut p = Pair::new(SessionConfig::default());
    p.connect();
    let mut buf = BytesMut::new();
    Frame::Skipped(FrameType(0x90)).encode(&mut buf);
    p.inject_to_b(&buf);
    p.drain_events();
    assert_eq!(closed_with(&p.b_events), None);
    assert_eq!(p.b.stats().frames_skipped, 1);
}

#[test]
fn sends_with_shorter_timeouts_expire_first() {
    let mut p = Pair::new(SessionConfig::default());
    p.connect();
    let long1 = p.send(APP, b"1", Duration::from_secs(5));
    let short = p.send(APP, b"2", Duration::from_secs(1));
    let long2 = p.send(APP, b"3", Duration::from_secs(5));
    p.pump();
    p.advance(Duration::from_millis(1500));
    let finished = p.finished();
    assert_eq!(finished.len(), 1, "{finished:?}");
    assert_eq!(finished[0].0, short);
    assert_eq!(failed_with(&finished[0].1), Some(ErrorId::SendTimeout));
    // Answering the first one leaves the last one's deadline in force.
    let epoch = p.b.peer_epoch().expect("epoch");
    p.b.answer(epoch, long1, Answer::Accepted);
    p.pump();
    p.advance(Duration::from_secs(4));
    let finished = p.finished();
    assert!(finished.contains(&(long1, accepted())));
    let last = finished
        .iter()
        .find(|(id, _)| *id == long2)
        .expect("expired");
    assert_eq!(failed_with(&last.1), Some(ErrorId::SendTimeout));
    assert_eq!(p.a.in_flight(), 0);
}

#[test]
fn t14_a_frame_trickled_byte_by_byte_is_closed_at_frame_read_timeout() {
    let mut p = Pair::new(SessionConfig::default());
    p.connect();
    let mut frame_bytes = BytesMut::new();
    frame::encode_message(&mut frame_bytes, 1, 7, 3, APP, &[0u8; 100]);
    // One byte every 5 s: never idle for 20 s, but the frame takes minutes.
    for byte in frame_bytes.iter().take(8) {
        p.inject_to_b(&[*byte]);
        p.advance(Duration::from_secs(5));
    }
    assert_eq!(closed_with(&p.b_events), Some(ErrorId::ProtocolViolation));
    assert!(p.delivered_ids().is_empty());
}

#[test]
fn continuous_traffic_never_trips_the_frame_read_timeout() {
    let mut p = Pair::new(SessionConfig::default());
    p.b_auto = Some(Answer::Accepted);
    p.connect();
    // Frames split across reads so a partial frame is always pending, for two minutes.
    let mut stream = BytesMut::new();
    for id in 1..=200u64 {
        frame::encode_message(&mut stream, id, 7, 3, APP, &[1u8; 50]);
    }
    let chunks: Vec<Vec<u8>> = stream.chunks(37).map(<[u8]>::to_vec).collect();
    for chunk in chunks {
        p.inject_to_b(&chunk);
        p.now += Duration::from_millis(600);
        p.b.handle_timeout(p.now);
        p.drain_events();
    }
    assert_eq!(closed_with(&p.b_events), None);
    assert_eq!(p.delivered_ids().len(), 200);
}

#[test]
fn t16_a_frame_flood_is_closed_at_the_budget() {
    let config = SessionConfig {
        max_frames_per_second: 10_000,
        ..SessionConfig::default()
    };
    let mut p = Pair::new(config);
    p.connect();
    // 6,000 skippable empty frames at once: 12,000 budget units in one second.
    let mut flood = BytesMut::new();
    for _ in 0..6_000 {
        Frame::Skipped(FrameType(0x90)).encode(&mut flood);
    }
    p.inject_to_b(&flood);
    p.drain_events();
    assert_eq!(closed_with(&p.b_events), Some(ErrorId::ProtocolViolation));
    assert!(p.b.stats().frames_skipped <= 5_000);
    // A legitimate peer under the budget, spread over seconds, is never closed.
    let mut q = Pair::new(SessionConfig {
        max_frames_per_second: 10_000,
        ..SessionConfig::default()
    });
    q.b_auto = Some(Answer::Accepted);
    q.connect();
    for _ in 0..5 {
        for _ in 0..1_000 {
            q.send(APP, b"ok", Duration::from_secs(30));
        }
        q.pump();
        q.advance(Duration::from_millis(1100));
    }
    assert_eq!(closed_with(&q.b_events), None);
    assert_eq!(q.delivered_ids().len(), 5_000);
}

#[test]
fn t18_a_ping_flood_never_reading_owes_at_most_eight_pongs() {
    let mut p = Pair::new(SessionConfig::default());
    p.connect();
    let mut flood = BytesMut::new();
    for nonce in 0..100_000u64 {
        frame::encode_ping(&mut flood, nonce);
    }
    // The flooder never reads: b handles all of it before writing anything.
    p.inject_to_b(&flood);
    let mut out = BytesMut::new();
    p.b.poll_transmit(p.now, &mut out);
    let mut wire = Vec::new();
    record(&mut wire, &out);
    let pongs = wire.iter().filter(|f| matches!(f, Frame::Pong(_))).count();
    assert!(pongs <= 8, "{pongs} PONGs owed");
    assert!(
        out.len() < 1024,
        "the reply to 100k PINGs is {} bytes",
        out.len()
    );
}

#[test]
fn a_peer_that_restarts_with_a_smaller_frame_limit_fails_what_no_longer_fits() {
    // Found by the session_input fuzz target (fuzz/regressions/session_input/).
    let mut p = Pair::new(SessionConfig::default());
    p.connect();
    p.cut();
    let big = p.send(APP, &[9u8; 3000], Duration::from_secs(5));
    let small = p.send(APP, b"fits", Duration::from_secs(5));
    let small_config = SessionConfig {
        max_frame_len: 100,
        ..SessionConfig::default()
    };
    p.b = Session::new(small_config, B.into(), 99);
    p.b_auto = Some(Answer::Accepted);
    p.connect();
    let finished = p.finished();
    let (_, outcome) = finished.iter().find(|(id, _)| *id == big).expect("big");
    assert_eq!(failed_with(outcome), Some(ErrorId::PayloadTooLarge));
    assert!(finished.contains(&(small, accepted())));
    assert!(p.a.is_open() && p.b.is_open(), "no callis was closed");
}

#[test]
fn a_reply_larger_than_the_sender_accepts_becomes_a_rejection() {
    let mut p = Pair::new(SessionConfig {
        max_frame_len: 200,
        ..SessionConfig::default()
    });
    p.b = Session::new(SessionConfig::default(), B.into(), 2);
    p.connect();
    let id = p.send(APP, b"q", Duration::from_secs(5));
    p.pump();
    let epoch = p.b.peer_epoch().expect("epoch");
    p.b.answer(epoch, id, Answer::Replied(Bytes::from(vec![0u8; 1000])));
    p.pump();
    let (_, outcome) = p.finished().pop().expect("finished");
    assert!(matches!(
        outcome,
        SendEnd::Answered(Answer::Rejected { error, .. }) if error == WireCode::of(ErrorId::PayloadTooLarge)
    ));
    assert!(p.a.is_open());
}

#[test]
fn t24_a_peer_spamming_unknown_tabernas_is_closed_at_the_refusal_budget() {
    let config = SessionConfig {
        max_refusals_per_second: 100,
        ..SessionConfig::default()
    };
    let mut p = Pair::new(config);
    p.b_auto = Some(Answer::Rejected {
        error: WireCode::of(ErrorId::UnknownTaberna),
        code: 0,
        reason: "no such taberna".into(),
    });
    p.connect();
    for _ in 0..150 {
        p.send(APP, b"?", Duration::from_secs(30));
    }
    p.pump();
    assert_eq!(closed_with(&p.b_events), Some(ErrorId::ProtocolViolation));
    // Application rejects never count.
    let mut q = Pair::new(SessionConfig {
        max_refusals_per_second: 100,
        ..SessionConfig::default()
    });
    q.b_auto = Some(Answer::Rejected {
        error: WireCode::of(ErrorId::RemoteTabernaRejected),
        code: 1,
        reason: "no".into(),
    });
    q.connect();
    for _ in 0..150 {
        q.send(APP, b"?", Duration::from_secs(30));
    }
    q.pump();
    assert_eq!(closed_with(&q.b_events), None);
    assert_eq!(q.finished().len(), 150);
}

fn rejected_with(o: &SendEnd) -> Option<WireCode> {
    match o {
        SendEnd::Answered(Answer::Rejected { error, .. }) => Some(*error),
        _ => None,
    }
}

#[test]
fn a_reply_over_the_payload_limit_is_turned_into_a_rejection_on_both_ends() {
    // b's handler replies one byte over the limit both sides share: b refuses to send it.
    let config = SessionConfig {
        max_frame_len: (1000 + frame::MESSAGE_FIXED_LEN) as u32,
        ..SessionConfig::default()
    };
    let mut p = Pair::new(config);
    p.connect();
    let epoch = p.b.peer_epoch().expect("epoch");
    let fits = p.send(APP, b"1", Duration::from_secs(5));
    let over = p.send(APP, b"2", Duration::from_secs(5));
    p.pump();
    p.b.answer(epoch, fits, Answer::Replied(Bytes::from(vec![0u8; 1000])));
    p.b.answer(epoch, over, Answer::Replied(Bytes::from(vec![0u8; 1001])));
    p.pump();
    let outcome = |id| p.outcome(id);
    assert!(
        matches!(outcome(fits), Some(SendEnd::Answered(Answer::Replied(r))) if r.len() == 1000)
    );
    assert_eq!(
        outcome(over).as_ref().and_then(rejected_with),
        Some(WireCode::of(ErrorId::PayloadTooLarge))
    );

    // A peer that ignores the limit: a's own check refuses what b wrote anyway, and the
    // callis stays open (the frame itself was within the frame limit).
    let late = p.send(APP, b"3", Duration::from_secs(5));
    p.pump();
    let mut wire = BytesMut::new();
    frame::encode_reply(&mut wire, late, &[0u8; 1001]);
    p.inject_to_a(&wire);
    p.drain_events();
    let finished = p.finished();
    let got = finished.iter().find(|(i, _)| *i == late).map(|(_, o)| o);
    assert_eq!(
        got.and_then(rejected_with),
        Some(WireCode::of(ErrorId::PayloadTooLarge))
    );
    assert_eq!(closed_with(&p.a_events), None);
}

#[test]
fn a_shutdown_answers_every_held_delivery_before_its_close_and_the_rest_fail_as_not_delivered() {
    let mut p = Pair::new(SessionConfig::default());
    p.connect();
    let epoch = p.b.peer_epoch().expect("epoch");
    let answered = p.send(APP, b"1", Duration::from_secs(5));
    let held = p.send(APP, b"2", Duration::from_secs(5));
    p.pump();
    p.b.answer(epoch, answered, Answer::Accepted);
    // Queued behind a stall: b never reads it.
    p.stall_a_to_b = true;
    let unsent = p.send(APP, b"3", Duration::from_secs(5));
    p.pump();
    p.b.shut_down();
    p.pump();
    let outcome = |id| p.outcome(id);
    assert_eq!(outcome(answered), Some(accepted()));
    assert_eq!(
        outcome(held).as_ref().and_then(rejected_with),
        Some(WireCode::of(ErrorId::PeerShutDown)),
        "the held delivery is answered: its handler had it"
    );
    assert_eq!(
        outcome(unsent).as_ref().and_then(failed_with),
        Some(ErrorId::PeerShutDown),
        "the one b never read fails at the CLOSE"
    );
    assert_eq!(closed_with(&p.a_events), Some(ErrorId::PeerShutDown));
    // The CLOSE came after the answers on the wire.
    let close_at = p
        .b_wire
        .iter()
        .position(|f| matches!(f, Frame::Close { .. }));
    let reject_at = p.b_wire.iter().position(|f| matches!(f, Frame::Reject(_)));
    assert!(reject_at < close_at, "{:?}", p.b_wire);
}

#[test]
fn a_send_that_expires_unsent_is_not_a_send_timeout() {
    // Never connected: no callis opened before the deadline.
    let mut p = Pair::new(SessionConfig::default());
    let lonely = p.send(APP, b"1", Duration::from_secs(1));
    p.advance(Duration::from_millis(1100));
    let finished = p.finished();
    assert_eq!(finished.len(), 1);
    assert_eq!(finished[0].0, lonely);
    assert_eq!(failed_with(&finished[0].1), Some(ErrorId::PeerUnavailable));
    // Written, then the callis dropped: the peer may have it.
    let mut p = Pair::new(SessionConfig::default());
    p.connect();
    let written = p.send(APP, b"2", Duration::from_secs(1));
    p.pump();
    p.cut();
    p.advance(Duration::from_millis(1100));
    let finished = p.finished();
    assert_eq!(finished[0].0, written);
    assert_eq!(failed_with(&finished[0].1), Some(ErrorId::SendTimeout));
}

#[test]
fn the_receivers_dedupe_state_follows_what_is_in_flight_and_empties_for_a_quiet_peer() {
    let mut p = Pair::new(SessionConfig::default());
    p.connect();
    p.b_auto = Some(Answer::Accepted);
    for _ in 0..10 {
        for _ in 0..1000 {
            p.send(APP, b"m", Duration::from_secs(30));
        }
        p.pump();
        // With every answered, the receiver keeps at most one report's worth of ids.
        assert!(
            p.b.ring.slots.len() <= DONE_BELOW_STEP as usize,
            "{} ids kept",
            p.b.ring.slots.len()
        );
    }
    assert_eq!(p.delivered_ids().len(), 10_000);
    // The next keepalive probe carries the floor: nothing is kept for a quiet peer.
    p.advance(SessionConfig::default().keepalive_interval + Duration::from_millis(10));
    p.pump();
    assert_eq!(p.b.ring.slots.len(), 0);
    assert_eq!(p.b.ring.retained_reply_bytes, 0);
    // A peer that sends an id it said it was done with breaks the protocol.
    let mut again = BytesMut::new();
    frame::encode_message(&mut again, 5, 7, 3, APP, b"again");
    p.inject_to_b(&again);
    p.drain_events();
    assert_eq!(closed_with(&p.b_events), Some(ErrorId::ProtocolViolation));
}

#[test]
fn a_small_reply_is_kept_as_its_own_copy_not_a_slice_of_a_larger_buffer() {
    let mut p = Pair::new(SessionConfig::default());
    p.connect();
    let epoch = p.b.peer_epoch().expect("epoch");
    let id = p.send(APP, b"q", Duration::from_secs(5));
    p.pump();
    let big = Bytes::from(vec![7u8; 1 << 20]);
    let reply = big.slice(10..20);
    p.b.answer(epoch, id, Answer::Replied(reply.clone()));
    match p.b.ring.state_mut(id) {
        Some(SlotState::Answered(Answer::Replied(kept))) => {
            assert_eq!(kept, &reply);
            assert_ne!(
                kept.as_ptr(),
                reply.as_ptr(),
                "a copy, not the 1 MiB buffer"
            );
        }
        other => panic!("{other:?}"),
    }
}
