//! The session against a peer that holds a valid certificate and breaks the rules on purpose
//! (T31 answer amplification, T32 limits a peer announces, T33 a peer that stops reading),
//! in memory on the pair harness's virtual clock. Each test drives the hostile side by hand:
//! frames injected straight into the victim's receive buffer (`inject_to_a`/`inject_to_b`),
//! reads withheld.

use std::time::Duration;

use bytes::{Bytes, BytesMut};

use super::*;
use crate::a1_callis::frame::{self, Frame};
use crate::testing::pair::{A, B, record};

const APP: u32 = A3_MESSAGE_TYPE_BASE + 1;

type Pair = crate::testing::SessionPair;

fn closed_with(events: &[Event]) -> Option<&Error> {
    events.iter().find_map(|e| match e {
        Event::Close(err) => Some(err),
        _ => None,
    })
}

/// Everything `s` writes now, however many fills that takes (at most 1,000).
fn transmit_all(s: &mut Session, now: Instant) -> BytesMut {
    let mut out = BytesMut::new();
    for _ in 0..1_000 {
        if !s.poll_transmit(now, &mut out) {
            break;
        }
    }
    out
}

#[test]
fn t31_duplicates_of_an_answered_id_on_one_callis_close_it_and_bring_back_nothing() {
    let mut p = Pair::new(SessionConfig::default());
    p.connect();
    let id = p.send(APP, b"echo me", Duration::from_secs(5));
    p.pump();
    let epoch = p.b.peer_epoch().expect("epoch");
    p.b.answer(epoch, id, Answer::Replied(Bytes::from(vec![7u8; 1 << 20])));
    p.pump();
    assert!(
        matches!(p.outcome(id), Some(SendEnd::Answered(Answer::Replied(r))) if r.len() == 1 << 20)
    );
    // The hostile peer read its 1 MiB answer, then writes the same id 64 times at once.
    let mut dups = BytesMut::new();
    for _ in 0..64 {
        frame::encode_message(&mut dups, id, 7, 3, APP, b"echo me");
    }
    p.inject_to_b(&dups);
    p.drain_events();
    let out = transmit_all(&mut p.b, p.now);
    assert!(
        out.len() < 4096,
        "64 duplicates of 2 KiB brought back {} bytes",
        out.len()
    );
    let error = closed_with(&p.b_events).expect("the callis is closed");
    assert_eq!(error.id(), ErrorId::ProtocolViolation);
    assert!(error.message().contains("twice on one callis"), "{error}");
    assert_eq!(p.delivered_ids(), vec![id], "delivered once");
}

#[test]
fn t31_a_replay_on_the_next_callis_is_answered_once_more_and_no_more() {
    let mut p = Pair::new(SessionConfig::default());
    p.connect();
    let id = p.send(APP, b"q", Duration::from_secs(5));
    p.pump();
    // The answer is lost with the callis: a replays on the next one and b answers again.
    p.stall_b_to_a = true;
    let epoch = p.b.peer_epoch().expect("epoch");
    p.b.answer(epoch, id, Answer::Replied(Bytes::from_static(b"r")));
    p.pump();
    p.cut();
    p.stall_b_to_a = false;
    p.b_wire.clear();
    p.connect();
    p.pump();
    assert_eq!(
        p.outcome(id),
        Some(SendEnd::Answered(Answer::Replied("r".into())))
    );
    let replies = p
        .b_wire
        .iter()
        .filter(|f| matches!(f, Frame::Reply { .. }))
        .count();
    assert_eq!(replies, 1);
    assert_eq!(p.delivered_ids(), vec![id]);
    assert!(p.a.is_open() && p.b.is_open());
}

#[test]
fn t31_answers_owed_to_a_peer_that_runs_past_the_window_close_its_callis() {
    let config = SessionConfig {
        window: 64,
        max_in_flight: 64,
        ..SessionConfig::default()
    };
    let mut p = Pair::new(config);
    p.connect();
    p.b_auto = Some(Answer::Accepted);
    // Ids 1..=1000, ten at a time, each ten answered before the next arrive, never reading
    // an answer: a correct sender stops 64 ids past the oldest one it has no answer for.
    for first in (1..=1000).step_by(10) {
        let mut ten = BytesMut::new();
        for id in first..first + 10 {
            frame::encode_message(&mut ten, id, 7, 3, APP, b"x");
        }
        p.inject_to_b(&ten);
        p.drain_events();
    }
    assert!(p.delivered_ids().len() <= 80, "{}", p.delivered_ids().len());
    let error = closed_with(&p.b_events).expect("closed");
    assert_eq!(error.id(), ErrorId::ProtocolViolation);
    assert!(error.message().contains("window"), "{error}");
    assert!(transmit_all(&mut p.b, p.now).len() < 64 * 1024);
}

#[test]
fn t31_answer_bytes_owed_to_a_peer_that_does_not_read_are_bounded() {
    let mut p = Pair::new(SessionConfig::default());
    p.connect();
    // b answers each request with 1 MiB; a sends 64 requests, one after the other's answer
    // is ready, and reads nothing for a while.
    p.b_auto = Some(Answer::Replied(Bytes::from(vec![1u8; 1 << 20])));
    p.stall_b_to_a = true;
    let ids: Vec<u64> = (0..64)
        .map(|_| {
            let id = p.send(APP, b"big please", Duration::from_secs(30));
            p.pump();
            id
        })
        .collect();
    let default_cap = SessionConfig::default().max_unsent_answer_bytes;
    assert!(
        p.b.unsent_answer_bytes() <= default_cap + (1 << 20) + 64,
        "{} answer bytes owed",
        p.b.unsent_answer_bytes()
    );
    // Once a reads again, every request has its outcome: replied, or refused as not delivered
    // (TabernaBusy), never lost.
    p.stall_b_to_a = false;
    p.pump();
    let (mut replied, mut busy) = (0, 0);
    for id in ids {
        match p.outcome(id) {
            Some(SendEnd::Answered(Answer::Replied(r))) if r.len() == 1 << 20 => replied += 1,
            Some(SendEnd::Answered(Answer::Rejected { error, reason, .. }))
                if error == WireCode::of(ErrorId::TabernaBusy) =>
            {
                assert!(reason.contains("max_unsent_answer_bytes"), "{reason}");
                busy += 1;
            }
            other => panic!("send {id}: {other:?}"),
        }
    }
    assert!(
        (16..=17).contains(&replied),
        "{replied} replied, {busy} refused"
    );
    assert_eq!(replied + busy, 64);
    assert!(p.a.is_open() && p.b.is_open(), "nothing was closed");
}

#[test]
fn t31_one_fill_writes_a_bounded_number_of_answer_bytes() {
    let mut p = Pair::new(SessionConfig::default());
    p.connect();
    p.b_auto = Some(Answer::Replied(Bytes::from(vec![2u8; 100 * 1024])));
    p.stall_b_to_a = true;
    for _ in 0..40 {
        p.send(APP, b"q", Duration::from_secs(30));
    }
    p.pump();
    let batch = SessionConfig::default().transmit_batch_bytes;
    let mut out = BytesMut::new();
    assert!(p.b.poll_transmit(p.now, &mut out));
    assert!(
        out.len() <= batch + 100 * 1024 + 64,
        "one fill wrote {} bytes",
        out.len()
    );
    // The rest follows in later fills, in order, and nothing is lost.
    p.stall_b_to_a = false;
    p.inject_to_a(&out);
    p.pump();
    assert_eq!(p.finished().len(), 40);
}

#[test]
fn t32_every_frame_fits_the_limit_the_peer_announced_at_1000_and_at_the_minimum() {
    // max_message_len 1000, and 0 (the smallest: a frame limit of 28 bytes).
    for frame_limit in [1000 + frame::MESSAGE_FIXED_LEN, frame::MESSAGE_FIXED_LEN] {
        let config = SessionConfig {
            max_frame_len: frame_limit as u32,
            window: 8192,
            max_in_flight: 5000,
            ..SessionConfig::default()
        };
        let mut p = Pair::new(config);
        p.connect();
        p.b_auto = Some(Answer::Accepted);
        let ids: Vec<u64> = (0..5000)
            .map(|_| p.send(APP, b"", Duration::from_secs(30)))
            .collect();
        p.pump();
        assert!(
            closed_with(&p.a_events).is_none(),
            "{:?}",
            p.a_events.last()
        );
        assert!(closed_with(&p.b_events).is_none());
        for id in &ids {
            assert_eq!(p.outcome(*id), Some(SendEnd::Answered(Answer::Accepted)));
        }
        let mut delivered = p.delivered_ids();
        delivered.sort_unstable();
        delivered.dedup();
        assert_eq!(delivered.len(), 5000, "each delivered once");
        let too_long = p
            .b_wire
            .iter()
            .filter(|f| matches!(f, Frame::Accepted(ids) if ids.len() * 8 > frame_limit))
            .count();
        assert_eq!(too_long, 0);
    }
}

#[test]
fn t32_rejections_with_long_reasons_fit_the_smallest_frame_limit() {
    let config = SessionConfig {
        max_frame_len: frame::MESSAGE_FIXED_LEN as u32,
        ..SessionConfig::default()
    };
    let mut p = Pair::new(config);
    p.connect();
    p.b_auto = Some(Answer::Rejected {
        error: WireCode::of(ErrorId::RemoteTabernaRejected),
        code: 9,
        reason: "é".repeat(150),
    });
    let ids: Vec<u64> = (0..100)
        .map(|_| p.send(APP, b"", Duration::from_secs(30)))
        .collect();
    p.pump();
    assert!(
        closed_with(&p.a_events).is_none(),
        "{:?}",
        p.a_events.last()
    );
    for id in ids {
        match p.outcome(id) {
            Some(SendEnd::Answered(Answer::Rejected { code, reason, .. })) => {
                assert_eq!(code, 9);
                assert!(reason.len() <= frame::MESSAGE_FIXED_LEN - 18, "{reason}");
                assert!(reason.chars().all(|c| c == 'é'), "cut at a character");
            }
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn t32_a_hello_below_the_smallest_frame_vicus_writes_is_refused_clearly() {
    let mut p = Pair::new(SessionConfig::default());
    p.b = Session::new(
        SessionConfig {
            max_frame_len: 27,
            ..SessionConfig::default()
        },
        B.into(),
        2,
    );
    p.connect();
    let error = closed_with(&p.a_events).expect("a refuses b's HELLO");
    assert_eq!(error.id(), ErrorId::ProtocolViolation);
    assert!(
        error.message().contains("frame limit of 27 bytes"),
        "{error}"
    );
    assert!(!p.a.is_open());
}

#[test]
fn t32_a_huge_announced_window_is_clamped_to_our_own() {
    let ours = SessionConfig {
        window: 64,
        max_in_flight: 64,
        ..SessionConfig::default()
    };
    let mut p = Pair::new(ours);
    p.b = Session::new(
        SessionConfig {
            window: u32::MAX,
            ..SessionConfig::default()
        },
        B.into(),
        2,
    );
    p.connect();
    // b answers everything but the first message, for ever.
    let first = p.send(APP, b"held", Duration::from_secs(600));
    p.pump();
    for _ in 0..100 {
        while p.a.in_flight() < 64 {
            p.send(APP, b"x", Duration::from_secs(600));
        }
        p.pump();
        let epoch = p.b.peer_epoch().expect("epoch");
        let delivered: Vec<u64> = p.delivered_ids();
        for id in delivered.into_iter().filter(|id| *id != first) {
            p.b.answer(epoch, id, Answer::Accepted);
        }
        p.pump();
    }
    let highest = p.delivered_ids().into_iter().max().expect("some");
    assert!(
        highest < first + 64,
        "a wrote id {highest}, {} past its oldest unanswered one",
        highest - first
    );
}

#[test]
fn t33_writes_that_make_no_progress_for_idle_timeout_abandon_the_callis() {
    let config = SessionConfig {
        idle_timeout: Duration::from_secs(1),
        keepalive_interval: Duration::from_millis(100),
        ..SessionConfig::default()
    };
    let mut p = Pair::new(config);
    p.connect();
    let id = p.send(APP, b"stuck", Duration::from_secs(60));
    // b keeps sending (so a is never read-idle) but never reads what a writes: a's writes
    // stop making progress.
    let mut out = BytesMut::new();
    assert!(p.a.poll_transmit(p.now, &mut out));
    p.a.write_progress(p.now, true, true);
    let start = p.now;
    let mut closed_at = None;
    for _ in 0..50 {
        p.now += Duration::from_millis(100);
        let mut ping = BytesMut::new();
        frame::encode_ping(&mut ping, 1);
        p.inject_to_a(&ping);
        p.a.write_progress(p.now, false, true);
        if p.a.poll_timeout().is_some_and(|t| t <= p.now) {
            p.a.handle_timeout(p.now);
        }
        if p.a.must_abandon() {
            closed_at = Some(p.now);
            break;
        }
    }
    let closed_at = closed_at.expect("a gave up the callis");
    let after = closed_at - start;
    assert!(
        after >= Duration::from_secs(1) && after <= Duration::from_millis(1200),
        "{after:?}"
    );
    p.drain_events();
    let error = closed_with(&p.a_events).expect("close reported");
    assert_eq!(error.id(), ErrorId::ConnectionLost);
    assert!(error.message().contains("idle_timeout"), "{error}");
    // The message was never answered: it is replayed, once, on the next callis.
    p.cut();
    p.b_events.clear();
    p.b_auto = Some(Answer::Accepted);
    p.connect();
    p.pump();
    assert_eq!(p.outcome(id), Some(SendEnd::Answered(Answer::Accepted)));
    assert_eq!(p.delivered_ids(), vec![id]);
}

#[test]
fn t33_a_close_takes_effect_in_bounded_time_whatever_is_queued() {
    let config = SessionConfig {
        idle_timeout: Duration::from_secs(2),
        ..SessionConfig::default()
    };
    let mut s = Session::new(config, A.into(), 1);
    let mut now = Instant::now();
    s.connected(now, B);
    let mut hello = BytesMut::new();
    frame::encode_hello(
        &mut hello,
        &frame::Hello {
            version: frame::PROTOCOL_VERSION,
            epoch: 9,
            max_frame_len: 1 << 20,
            window: 64,
            domus_id: B.into(),
        },
    );
    s.recv_buf().extend_from_slice(&hello);
    s.handle_input(now);
    assert!(s.is_open());
    let _ = transmit_all(&mut s, now);
    // The socket took nothing more since: a close is decided with bytes still queued.
    s.write_progress(now, false, true);
    s.close(Error::new(
        ErrorId::ConnectionLost,
        "the application closed it",
    ));
    let mut out = BytesMut::new();
    s.poll_transmit(now, &mut out);
    let mut wire = Vec::new();
    record(&mut wire, &out);
    assert!(matches!(wire.last(), Some(Frame::Close { .. })));
    assert!(!s.must_abandon(), "the CLOSE gets its chance first");
    let mut abandoned_after = None;
    for step in 1..=40u32 {
        now += Duration::from_millis(100);
        s.write_progress(now, false, true);
        if s.poll_timeout().is_some_and(|t| t <= now) {
            s.handle_timeout(now);
        }
        if s.must_abandon() {
            abandoned_after = Some(Duration::from_millis(100) * step);
            break;
        }
    }
    let after = abandoned_after.expect("the close took effect");
    assert!(after <= Duration::from_secs(1), "{after:?}");
}
