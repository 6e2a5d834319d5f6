//! Blob streams back to back in memory: a sender's frames go to a receiver and back, with
//! cuts, slow readers and hostile frames. No sockets, no real time.

use std::time::{Duration, Instant};

use bytes::Bytes;

use super::recently_ended::{RECENT_CAP, RecentlyEnded};
use super::*;
use crate::a1_callis::frame::{self, BlobFrame, Frame};

const CHUNK: usize = 1024;
const WINDOW: u64 = 8 * 1024;
/// Frames per second the peer may send (T16); far above what the transfers here send in one
/// virtual second.
const FRAME_BUDGET: u32 = 100_000;

fn config() -> BlobConfig {
    BlobConfig {
        chunk_len: CHUNK,
        window: WINDOW,
        max_streams: 32,
        idle_timeout: Duration::from_secs(30),
        max_peer_cancels_per_second: 100,
        max_frames_per_second: FRAME_BUDGET,
    }
}

/// Deterministic pseudo-random bytes.
fn data(len: usize, seed: u64) -> Bytes {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

type Pair = crate::testing::BlobPair;

/// The pair every test here runs on.
fn pair() -> Pair {
    Pair::new(config())
}

#[test]
fn blobs_of_every_size_around_chunk_boundaries_round_trip_intact() {
    for (n, len) in [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK, 100_000]
        .into_iter()
        .enumerate()
    {
        let mut p = pair();
        let stream = n as u64 + 1;
        p.open(stream);
        let payload = data(len, n as u64);
        assert!(
            p.transfer(stream, &payload) == payload.to_vec(),
            "{len} bytes"
        );
        assert_eq!(p.a.open_streams(), 0, "the sender's side ended at Finished");
        assert_eq!(p.b.open_streams(), 1, "the receiver closes its side itself");
        p.b.close_inbound(stream);
        assert_eq!(p.b.open_streams(), 0);
    }
}

#[test]
fn a_slow_reader_slows_the_sender_and_memory_stays_within_the_window() {
    let mut p = pair();
    p.open(1);
    let payload = data(20 * WINDOW as usize, 7);
    let mut written = 0;
    let mut got = Vec::new();
    let mut finished = false;
    let mut refused_writes = 0;
    for _ in 0..100_000 {
        if written < payload.len() {
            let n =
                p.a.write(p.now, 1, &payload.slice(written..))
                    .expect("write");
            if n == 0 {
                refused_writes += 1;
            }
            written += n;
        } else if !finished {
            p.a.finish(1).expect("finish");
            finished = true;
        }
        p.a_transmit(usize::MAX);
        p.deliver();
        // The reader takes one chunk per turn.
        let out =
            p.a.outbound
                .get(&1)
                .map_or(0, |o| o.queued_len + o.unacked_len);
        assert!(out <= WINDOW, "sender holds {out} bytes");
        if let Some(i) = p.b.inbound.get(&1) {
            assert!(
                i.unread_len <= WINDOW,
                "receiver holds {} unread bytes",
                i.unread_len
            );
        }
        if let Some(chunk) = p.b.read(p.now, 1).expect("read") {
            got.extend_from_slice(&chunk);
        }
        p.deliver();
        if p.a_events.contains(&BlobEvent::Finished(1)) {
            break;
        }
    }
    // Finished means the receiver holds every byte, not that the application read them.
    got.extend(p.read_all(1));
    assert!(p.b.is_complete(1));
    assert_eq!(got.len(), payload.len());
    assert!(got == payload.to_vec());
    assert!(refused_writes > 0, "the sender was slowed down");
    assert!(p.violation().is_none());
}

#[test]
fn t21_data_beyond_credit_duplicates_and_unknown_streams_are_violations() {
    let mut p = pair();
    p.open(1);
    p.b.handle_frame(
        p.now,
        BlobFrame::Data {
            stream: 1,
            offset: 0,
            data: data(WINDOW as usize + 1, 1),
        },
    );
    p.deliver();
    assert!(
        p.violation()
            .expect("beyond credit")
            .contains("beyond its credit")
    );
    assert_eq!(
        p.b.inbound.get(&1).map(|i| i.unread_len),
        Some(0),
        "nothing buffered"
    );

    let mut p = pair();
    p.b.handle_frame(
        p.now,
        BlobFrame::Data {
            stream: 9,
            offset: 0,
            data: data(10, 1),
        },
    );
    p.deliver();
    assert!(p.violation().expect("unknown").contains("unknown stream 9"));

    let mut p = pair();
    p.open(1);
    p.b.handle_frame(
        p.now,
        BlobFrame::Data {
            stream: 1,
            offset: 100,
            data: data(10, 1),
        },
    );
    p.deliver();
    assert!(p.violation().expect("gap").contains("gap"));

    // A late frame for a stream that just finished is absorbed, not a violation.
    let mut p = pair();
    p.open(1);
    let payload = data(100, 3);
    p.transfer(1, &payload);
    p.b.close_inbound(1);
    p.b.handle_frame(
        p.now,
        BlobFrame::Data {
            stream: 1,
            offset: 0,
            data: payload,
        },
    );
    p.deliver();
    assert!(p.violation().is_none());
}

#[test]
fn a_cut_mid_transfer_resends_what_was_lost_and_completes_intact() {
    let mut p = pair();
    p.open(1);
    let payload = data(10 * CHUNK + 17, 11);
    let mut written = 0;
    let mut got = Vec::new();
    let mut finished = false;
    for round in 0..100_000 {
        if written < payload.len() {
            written +=
                p.a.write(p.now, 1, &payload.slice(written..))
                    .expect("write");
        } else if !finished {
            p.a.finish(1).expect("finish");
            finished = true;
        }
        p.a_transmit(3 * CHUNK);
        if round % 3 == 1 {
            // The blob callis drops with frames in flight; a new one comes up.
            p.in_flight.clear();
            p.a.disconnected();
            p.b.disconnected();
            p.a.connected();
            p.b.connected();
        }
        p.deliver();
        got.extend(p.read_all(1));
        p.deliver();
        if p.a_events.contains(&BlobEvent::Finished(1)) {
            break;
        }
    }
    assert!(
        got == payload.to_vec(),
        "{} of {} bytes",
        got.len(),
        payload.len()
    );
    assert!(p.violation().is_none());
}

#[test]
fn only_the_receivers_end_answer_completes_a_stream_and_a_lost_end_is_sent_again() {
    // An empty stream: its END waits for the receiver's first credit (the receiver's side
    // may not exist yet when the sender finishes).
    let mut p = pair();
    p.a.open_outbound(p.now, 1).expect("open out");
    p.a.finish(1).expect("finish");
    assert!(
        !p.a_transmit(usize::MAX),
        "END before the receiver's credit"
    );
    p.b.open_inbound(p.now, 1).expect("open in");
    p.deliver();
    p.a_transmit(usize::MAX);
    p.deliver();
    assert!(p.b.is_drained(1));
    assert!(p.a_events.contains(&BlobEvent::Finished(1)));

    // Every byte acknowledged, then the END lost in a cut: not finished until the END is
    // sent again after the reconnect and answered.
    let payload = data(3 * CHUNK, 5);
    p.open(2);
    assert_eq!(p.a.write(p.now, 2, &payload).expect("write"), payload.len());
    p.a_transmit(usize::MAX);
    p.deliver();
    assert_eq!(p.a.acked(2), Some(payload.len() as u64));
    p.a.finish(2).expect("finish");
    p.a_transmit(usize::MAX);
    p.cut();
    p.deliver();
    assert!(!p.a_events.contains(&BlobEvent::Finished(2)));
    p.a_transmit(usize::MAX);
    p.deliver();
    assert!(p.a_events.contains(&BlobEvent::Finished(2)));
    assert_eq!(p.read_all(2), payload.to_vec());
    assert!(p.b.is_drained(2));

    // The answer lost in a cut after the receiver closed its side: the END sent again is
    // answered from the receiver's memory of recently completed streams.
    p.open(3);
    p.a.write(p.now, 3, &payload).expect("write");
    p.a.finish(3).expect("finish");
    p.a_transmit(usize::MAX);
    let mut to_b = std::mem::take(&mut p.in_flight);
    while let Ok(Some(Frame::Blob(f))) = frame::decode(&mut to_b, u32::MAX) {
        p.b.handle_frame(p.now, f);
    }
    assert_eq!(p.read_all(3), payload.to_vec());
    assert!(p.b.is_drained(3));
    p.b.close_inbound(3);
    p.cut(); // b's answer never left
    p.a_transmit(usize::MAX);
    p.deliver();
    assert!(p.a_events.contains(&BlobEvent::Finished(3)));
    assert!(p.violation().is_none());

    // An answer naming another length is a violation.
    p.open(4);
    p.a.write(p.now, 4, &payload).expect("write");
    p.a.finish(4).expect("finish");
    p.a.handle_frame(
        p.now,
        BlobFrame::End {
            stream: 4,
            total: 1,
        },
    );
    assert!(matches!(
        p.a.poll_event(),
        Some(BlobEvent::Violation {
            stream: Some(4),
            ..
        })
    ));
}

#[test]
fn sixteen_concurrent_streams_share_fairly_and_all_complete() {
    let mut p = pair();
    let payloads: Vec<Bytes> = (1..=16).map(|s| data(5 * CHUNK + s, s as u64)).collect();
    for s in 1..=16u64 {
        p.open(s);
    }
    let mut written = [0usize; 16];
    let mut got: Vec<Vec<u8>> = vec![Vec::new(); 16];
    // One budgeted write per turn: every stream must get chunks in the first rounds.
    for (i, payload) in payloads.iter().enumerate() {
        written[i] += p.a.write(p.now, i as u64 + 1, payload).expect("write");
        p.a.finish(i as u64 + 1).expect("finish");
    }
    p.a_transmit(16 * (CHUNK + 64));
    let mut first_round = std::collections::BTreeSet::new();
    let mut buf = p.in_flight.clone();
    while let Ok(Some(Frame::Blob(BlobFrame::Data { stream, .. }))) =
        frame::decode(&mut buf, u32::MAX)
    {
        first_round.insert(stream);
    }
    assert_eq!(
        first_round.len(),
        16,
        "round robin: one chunk for every stream first"
    );
    for _ in 0..10_000 {
        p.deliver();
        for (s, bytes) in got.iter_mut().enumerate() {
            bytes.extend(p.read_all(s as u64 + 1));
        }
        p.deliver();
        p.a_transmit(4 * CHUNK);
        if (1..=16).all(|s| p.a_events.contains(&BlobEvent::Finished(s))) {
            break;
        }
    }
    for (i, payload) in payloads.iter().enumerate() {
        assert_eq!(written[i], payload.len());
        assert!(got[i] == payload.to_vec(), "stream {}", i + 1);
    }
}

#[test]
fn cancel_reaches_the_other_side_and_idle_streams_time_out() {
    let mut p = pair();
    p.open(1);
    p.a.write(p.now, 1, &data(100, 1)).expect("write");
    p.a.cancel(1, ErrorId::BlobStreamNotFound, "sender dropped");
    p.a_transmit(usize::MAX);
    p.deliver();
    assert!(
        p.b_events
            .iter()
            .any(|e| matches!(e, BlobEvent::Cancelled { stream: 1, .. }))
    );
    assert_eq!(p.b.open_streams(), 0);

    let mut p = pair();
    p.open(2);
    p.now += Duration::from_secs(31);
    p.a.handle_timeout(p.now);
    p.b.handle_timeout(p.now);
    p.deliver();
    let timed_out = |events: &[BlobEvent]| {
        events.iter().any(|e| {
            matches!(e, BlobEvent::Cancelled { stream: 2, error } if error.id() == ErrorId::BlobStreamIdleTimeout)
        })
    };
    assert!(timed_out(&p.a_events) && timed_out(&p.b_events));
    assert_eq!(p.a.open_streams() + p.b.open_streams(), 0);
}

#[test]
fn t23_stream_cap_refuses_the_next_open_cheaply() {
    let mut s = BlobStreams::new(BlobConfig {
        max_streams: 2,
        ..config()
    });
    let now = Instant::now();
    s.open_inbound(now, 1).expect("1");
    s.open_outbound(now, 2).expect("2");
    let e = s.open_inbound(now, 3).expect_err("cap");
    assert_eq!(e.id(), ErrorId::BlobBufferFull);
    assert_eq!(
        s.open_inbound(now, 1).expect_err("duplicate").id(),
        ErrorId::ProtocolViolation
    );
}

#[test]
fn t17_open_cancel_churn_past_the_budget_is_a_violation_and_frees_every_stream() {
    let mut p = pair();
    // A legitimate cancel-heavy workload under the budget is never closed.
    for round in 0..3u64 {
        for i in 0..100u64 {
            let stream = 1000 * (round + 1) + i;
            p.b.open_inbound(p.now, stream).expect("open");
            p.b.handle_frame(
                p.now,
                BlobFrame::Cancel {
                    stream,
                    code: WireCode::of(ErrorId::BlobCancelled),
                    reason: "changed my mind".into(),
                },
            );
        }
        assert!(p.b.poll_event_violation().is_none(), "round {round}");
        p.now += Duration::from_millis(1001);
    }
    assert_eq!(p.b.open_streams(), 0, "cancelling frees the stream at once");
    // Past the budget within one second: a violation.
    for i in 0..101u64 {
        let stream = 9000 + i;
        p.b.open_inbound(p.now, stream).expect("open");
        p.b.handle_frame(
            p.now,
            BlobFrame::Cancel {
                stream,
                code: WireCode::of(ErrorId::BlobCancelled),
                reason: String::new(),
            },
        );
    }
    let v = p.b.poll_event_violation().expect("violation");
    assert!(v.contains("cancelled more than 100"), "{v}");
}

impl BlobStreams {
    /// The message of the first violation among the pending events (others are dropped).
    fn poll_event_violation(&mut self) -> Option<String> {
        let mut found = None;
        while let Some(e) = self.poll_event() {
            if let BlobEvent::Violation { error, .. } = e {
                found.get_or_insert(error.message().to_owned());
            }
        }
        found
    }
}

/// Drains `s`'s events and returns the messages of its violations.
fn violations(s: &mut BlobStreams) -> Vec<String> {
    std::iter::from_fn(|| s.poll_event())
        .filter_map(|e| match e {
            BlobEvent::Violation { error, .. } => Some(error.message().to_owned()),
            _ => None,
        })
        .collect()
}

/// A late credit for `stream`, as a receiver sends one after the stream ended.
fn late_credit(stream: u64) -> BlobFrame {
    BlobFrame::Credit {
        stream,
        received: 0,
        limit: WINDOW,
    }
}

#[test]
fn t16_a_flood_of_skippable_frames_closes_the_blob_callis_at_the_budget_with_one_violation() {
    let mut p = pair();
    let skipped = |n: u32| {
        let mut b = bytes::BytesMut::new();
        for _ in 0..n {
            Frame::Skipped(frame::FrameType(0x90)).encode(&mut b);
        }
        b
    };
    // Skipped frames carry nothing: they count double, so half the budget fits in a second.
    p.in_flight = skipped(FRAME_BUDGET / 2);
    p.deliver();
    assert_eq!(p.b_violations(), 0, "{:?}", p.violation());
    // One more crosses it; the rest of the flood (two budgets' worth, in the same buffer) is
    // not handled and adds no second violation.
    p.in_flight = skipped(1 + 2 * FRAME_BUDGET);
    p.deliver();
    assert_eq!(p.b_violations(), 1, "one violation per closed callis");
    let v = p.violation().expect("closed");
    assert!(
        v.contains("calm down") && v.contains("max_frames_per_second"),
        "{v}"
    );
    assert!(p.b.is_violated());
    // The next callis, a second later: an honest transfer works, and skipped frames under the
    // budget are no violation.
    p.cut();
    p.now += Duration::from_secs(1);
    assert!(!p.b.is_violated());
    p.open(1);
    let payload = data(10 * CHUNK, 4);
    assert!(p.transfer(1, &payload) == payload.to_vec());
    p.in_flight = skipped(1000);
    p.deliver();
    assert_eq!(p.b_violations(), 1, "nothing new");
}

#[test]
fn t16_a_flood_of_late_credits_for_an_ended_stream_closes_the_blob_callis_at_the_budget() {
    let mut p = pair();
    p.open(1);
    let payload = data(3 * CHUNK, 6);
    p.transfer(1, &payload);
    assert!(p.a_events.contains(&BlobEvent::Finished(1)));
    // A few late credits for a stream that just ended are normal: ignored.
    p.now += Duration::from_secs(1);
    for _ in 0..10 {
        p.a.handle_frame(p.now, late_credit(1));
    }
    assert_eq!(violations(&mut p.a), Vec::<String>::new());
    // A flood of them counts double against the frame budget and closes the callis once.
    p.now += Duration::from_secs(1);
    let mut handled = 0u32;
    let mut found = Vec::new();
    while found.is_empty() && handled < 3 * FRAME_BUDGET {
        p.a.handle_frame(p.now, late_credit(1));
        handled += 1;
        found = violations(&mut p.a);
    }
    assert_eq!(
        handled,
        FRAME_BUDGET / 2 + 1,
        "closed at the budget: {found:?}"
    );
    assert!(
        found.first().is_some_and(|v| v.contains("calm down")),
        "{found:?}"
    );
    for _ in 0..FRAME_BUDGET {
        p.a.handle_frame(p.now, late_credit(1));
    }
    assert_eq!(violations(&mut p.a), Vec::<String>::new(), "one per callis");
}

#[test]
fn a_blob_callis_closed_by_a_violation_reports_it_once_however_many_bad_frames_follow() {
    let mut p = pair();
    let unknown = |offset| BlobFrame::Data {
        stream: 9,
        offset,
        data: Bytes::from_static(b"x"),
    };
    // A buffer of 2,000 bad frames, handed over one by one as the driver decodes them.
    for i in 0..2000 {
        p.b.handle_frame(p.now, unknown(i));
    }
    let found = violations(&mut p.b);
    assert_eq!(found.len(), 1, "first: {:?}", found.first());
    assert!(found[0].contains("unknown stream 9"), "{found:?}");
    // The next callis starts clean, and its own violation is reported (once).
    p.cut();
    for i in 0..2000 {
        p.b.handle_frame(p.now, unknown(i));
    }
    assert_eq!(violations(&mut p.b).len(), 1);
}

#[test]
fn t16_the_recently_ended_set_is_bounded_and_keeps_the_newest_end_of_a_reused_id() {
    let mut r = RecentlyEnded::default();
    let reused = 1_000_000u64;
    r.remember(reused, Some(1));
    r.remember(reused, Some(2));
    assert_eq!(r.get(reused), Some(Some(2)), "the newest end wins");
    for id in 0..(RECENT_CAP as u64 - 2) {
        r.remember(id, None);
    }
    assert_eq!(r.order.len(), RECENT_CAP);
    // Evicting the reused id's older entry leaves its newer one.
    r.remember(5_000_000, None);
    assert_eq!(r.get(reused), Some(Some(2)));
    r.remember(5_000_001, None);
    assert_eq!(r.get(reused), None, "forgotten once its newest entry is");
    assert_eq!(r.get(0), Some(None));
    for id in 10_000_000..10_000_000 + 3 * RECENT_CAP as u64 {
        r.remember(id, Some(id));
    }
    assert_eq!(r.order.len(), RECENT_CAP, "bounded");
    assert_eq!(r.by_id.len(), RECENT_CAP, "bounded");
    assert_eq!(r.get(0), None, "the oldest are forgotten");
    let newest = 10_000_000 + 3 * RECENT_CAP as u64 - 1;
    assert_eq!(r.get(newest), Some(Some(newest)));
}

#[test]
fn t32_a_blob_hello_announcing_tiny_chunks_is_refused() {
    let mut s = BlobStreams::new(config());
    let e = s
        .accept_hello(frame::PROTOCOL_VERSION, 1, 16, None)
        .expect_err("16-byte chunks");
    assert_eq!(e.id(), ErrorId::ProtocolViolation);
    assert!(e.message().contains("16 bytes"), "{e}");
    // The smallest allowed size is taken; a huge one is cut to ours.
    assert!(
        s.accept_hello(frame::PROTOCOL_VERSION, 1, MIN_CHUNK_LEN as u32, None)
            .is_ok()
    );
    assert!(
        s.accept_hello(frame::PROTOCOL_VERSION, 1, u32::MAX, None)
            .is_ok()
    );
}
