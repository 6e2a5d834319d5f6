//! The `session_input` fuzz target: one sans-IO
//! [`Session`](crate::a1_callis::session::Session) — `a` of a [`SessionPair`] — against a
//! peer the input scripts. The peer takes b's seat: b is never connected, so what a writes
//! ends there after the pair's checks, and what the script has the peer say is injected into
//! a ([`SessionPair::inject_to_a`]).

use std::collections::{BTreeSet, HashSet, VecDeque};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};

use super::Script;
use crate::a1_callis::codes::WireCode;
use crate::a1_callis::frame::{self, Frame, FrameType, Hello, MessageFrame, PROTOCOL_VERSION};
use crate::a1_callis::headers::Headers;
use crate::a1_callis::session::{A3_MESSAGE_TYPE_BASE, Answer, Event, Outgoing, SessionConfig};
use crate::error::ErrorId;
use crate::testing::pair::{A, B, SessionPair};

/// The session under test: the pair's a.
const LOCAL_ID: &str = A;
const LOCAL_EPOCH: u64 = 1;
/// The peer the script plays; its certificate names this id (the pair's b).
const PEER_ID: &str = B;
const PEER_EPOCH: u64 = 2;
/// At most this many script operations per input.
const MAX_STEPS: usize = 1024;
/// `poll_transmit` must run dry within this many calls (at most 8 messages are retained, and
/// every call writes at least one when any is queued): the pair's `max_rounds`.
const MAX_TRANSMITS: usize = 64;
/// Deliveries whose answer is postponed; past this many, they are answered at once.
const MAX_DEFERRED: usize = 32;
/// A2 (service) message type base.
const A2_MESSAGE_TYPE_BASE: u32 = 0x0001_0000;

/// The pair the target drives: a is the session under test; b stays unconnected, silent. No
/// latency (only the script moves the clock), a's frames held to its own frame limit, and
/// `poll_transmit` must run dry within [`MAX_TRANSMITS`] calls.
fn fuzz_pair() -> SessionPair {
    let mut pair = SessionPair::new(fuzz_config());
    pair.latency = Duration::ZERO;
    pair.wire_limit = fuzz_config().max_frame_len;
    pair.max_rounds = MAX_TRANSMITS;
    pair
}

fn fuzz_config() -> SessionConfig {
    SessionConfig {
        max_frame_len: 4096,
        window: 16,
        max_in_flight: 8,
        keepalive_interval: Duration::from_secs(1),
        idle_timeout: Duration::from_secs(3),
        hello_timeout: Duration::from_secs(2),
        max_retained_reply_bytes: 256,
        transmit_batch_bytes: 1024,
        frame_read_timeout: Duration::from_secs(5),
        // Low enough that one large read (a script can feed up to ~680 frames at one instant)
        // reaches the flood close.
        max_frames_per_second: 256,
        max_refusals_per_second: 64,
        // Small enough that a script reaches the refusal of a peer that does not read.
        max_unsent_answer_bytes: 2048,
        // Small enough that a script reaches both refusals (too many, too long).
        max_headers: 2,
        max_headers_len: 32,
    }
}

/// Drives one [`Session`](crate::a1_callis::session::Session) with `data` as the peer's bytes
/// and as a script of driver calls.
///
/// After `connected`, a valid HELLO from the peer is fed unless the first byte is odd (then the
/// session only gets what the script feeds). The rest of `data` is a script, one operation per
/// byte with its arguments taken from the following bytes: raw chunks through
/// `recv_buf` + `handle_input` (sizes from the data; [`SessionPair::inject_to_a`]), well-formed frames (MESSAGE, answers,
/// PING/PONG, HELLO, CLOSE, reserved), virtual time steps with `handle_timeout`, `send`,
/// postponed answers, reconnects, `cancel`, `fail_all` and write-progress reports (a callis
/// the session gives up is dropped, as the driver does). Every `Deliver` is answered
/// (Accepted, Replied or Rejected, now or later) and events and transmits are drained after
/// every operation ([`SessionPair::pump`], with b silent).
///
/// Checked (the pair checks the first three and the last on every transfer and timer):
/// everything `poll_transmit` writes decodes cleanly under the session's own frame limit,
/// and `poll_transmit` says whether it wrote; the first frame after `connected` is our HELLO and no other HELLO is written; no
/// MESSAGE exceeds what the peer said it accepts or carries an id we do not retain; answers
/// only name delivered ids; a message is delivered at most once per peer epoch; every `send`
/// finishes exactly once (or is cancelled), `in_flight` matches, and all of them finish once
/// their deadlines pass; `poll_transmit` runs dry; after `handle_timeout(now)`,
/// `poll_timeout` is never `now` or earlier.
pub fn session_input(data: &[u8]) {
    let mut h = Harness::new(data);
    let now = h.pair.now;
    h.pair.a.connected(now, PEER_ID);
    h.expect_hello = true;
    let hello_first = data.first().is_some_and(|b| b % 2 == 0);
    h.script.byte();
    if hello_first {
        h.feed_hello(PEER_EPOCH, 16, 4096, PEER_ID, PROTOCOL_VERSION);
    }
    h.drain();
    for _ in 0..MAX_STEPS {
        if h.script.is_empty() {
            break;
        }
        h.step();
        h.drain();
        h.check_accounting();
    }
    // Answer what is still postponed, then let every deadline pass: nothing may stay in flight.
    while let Some((epoch, id)) = h.deferred.pop_front() {
        let answer = h.answer_from_script();
        h.pair.a.answer(epoch, id, answer);
    }
    h.drain();
    h.pair.skip(Duration::from_secs(3600));
    h.drain();
    h.check_accounting();
    assert!(
        h.outstanding.is_empty(),
        "sends never finished although their deadlines passed: {:?}",
        h.outstanding
    );
}

struct Harness<'a> {
    script: Script<'a>,
    /// a is the session under test; b is never connected (the script plays the peer).
    pair: SessionPair,
    /// The epoch the scripted peer announces in well-formed HELLOs.
    peer_epoch: u64,
    /// Ids `send` returned that have neither finished nor been cancelled.
    outstanding: BTreeSet<u64>,
    /// The highest id `send` returned.
    last_sent: u64,
    /// Ids delivered in the current peer epoch.
    delivered: HashSet<u64>,
    /// Ids delivered in any epoch.
    ever_delivered: HashSet<u64>,
    /// Deliveries not answered yet: (peer epoch, id).
    deferred: VecDeque<(u64, u64)>,
    /// `connected` was called and our HELLO has not been written yet.
    expect_hello: bool,
}

impl<'a> Harness<'a> {
    fn new(data: &'a [u8]) -> Self {
        Self {
            script: Script { data },
            pair: fuzz_pair(),
            peer_epoch: PEER_EPOCH,
            outstanding: BTreeSet::new(),
            last_sent: 0,
            delivered: HashSet::new(),
            ever_delivered: HashSet::new(),
            deferred: VecDeque::new(),
            expect_hello: false,
        }
    }

    fn feed(&mut self, bytes: &[u8]) {
        self.pair.inject_to_a(bytes);
    }

    fn feed_hello(&mut self, epoch: u64, window: u32, max_frame_len: u32, id: &str, version: u16) {
        let mut buf = BytesMut::new();
        frame::encode_hello(
            &mut buf,
            &Hello {
                version,
                epoch,
                max_frame_len,
                window,
                domus_id: id.to_owned(),
            },
        );
        self.feed(&buf);
    }

    fn reconnect(&mut self) {
        let now = self.pair.now;
        self.pair.a.disconnected(now);
        self.pair.a.connected(now, PEER_ID);
        self.expect_hello = true;
    }

    /// One script operation.
    fn step(&mut self) {
        let op = self.script.byte();
        match op % 16 {
            // Raw bytes from the peer, in a chunk whose size the data gives.
            0..=4 => {
                let len = usize::from(self.script.byte());
                let chunk = self.script.take(len);
                self.feed(chunk);
            }
            5 => self.feed_message(),
            6 => self.feed_answer(),
            7 => {
                let b = self.script.byte();
                let mut buf = BytesMut::new();
                if b.is_multiple_of(2) {
                    frame::encode_ping(&mut buf, u64::from(b / 2));
                } else {
                    frame::encode_pong(&mut buf, u64::from(b / 2 % 8));
                }
                self.feed(&buf);
            }
            8 => self.feed_control(),
            9 => {
                let ms = u64::from(self.script.byte()) * 25;
                self.pair.skip(Duration::from_millis(ms));
            }
            // As a driver does: sleep until poll_timeout, then handle_timeout.
            10 => self.pair.skip_to_next_timeout(),
            11 | 12 => self.send(),
            13 => {
                let all = self.script.byte() % 2 == 1;
                while let Some((epoch, id)) = self.deferred.pop_front() {
                    let answer = self.answer_from_script();
                    self.pair.a.answer(epoch, id, answer);
                    if !all {
                        break;
                    }
                }
            }
            14 => {
                let b = self.script.byte();
                self.reconnect();
                if b % 4 == 1 {
                    self.peer_epoch = self.peer_epoch.wrapping_add(1);
                }
                if b % 4 != 3 {
                    self.feed_hello(self.peer_epoch, 16, 4096, PEER_ID, PROTOCOL_VERSION);
                }
            }
            _ => {
                let b = self.script.byte();
                let now = self.pair.now;
                if b >= 250 {
                    // The driver's report of a write attempt: moved or not, bytes waiting or
                    // not (T33).
                    let flags = self.script.byte();
                    self.pair
                        .a
                        .write_progress(now, flags & 1 == 1, flags & 2 == 2);
                    return;
                }
                match b % 5 {
                    0 => {
                        let id = u64::from(self.script.byte() % 16);
                        self.pair.a.cancel(id);
                        self.outstanding.remove(&id);
                    }
                    1 => self.pair.a.fail_all(crate::Error::new(
                        crate::ErrorId::PeerUnavailable,
                        "fuzz: the peer is unreachable",
                    )),
                    // `connected` again without `disconnected` in between.
                    2 => {
                        self.pair.a.connected(now, PEER_ID);
                        self.expect_hello = true;
                    }
                    3 => {
                        self.pair.a.disconnected(now);
                        self.expect_hello = false;
                    }
                    _ => {
                        // Everything the script has left, in one read.
                        let rest = self.script.take(usize::MAX);
                        self.feed(rest);
                    }
                }
            }
        }
    }

    /// A well-formed MESSAGE, or MESSAGE_BATCH of up to four, from the peer with small ids,
    /// some of them invalid.
    fn feed_message(&mut self) {
        let id = u64::from(self.script.byte() % 48);
        let b = self.script.byte();
        let msg_type = match b % 4 {
            0 => u32::from(b),
            1 => A2_MESSAGE_TYPE_BASE | u32::from(b),
            _ => A3_MESSAGE_TYPE_BASE | u32::from(b),
        };
        let len = usize::from(self.script.byte() % 64);
        let batch = self.script.byte() % 8;
        let payload = self.script.take(len);
        let mut buf = BytesMut::new();
        if batch < 4 {
            frame::encode_message(&mut buf, id, u64::from(b / 4), 3, msg_type, payload);
        } else {
            let payload = payload.to_vec();
            let mut w =
                frame::BatchWriter::start(&mut buf, id, u64::from(b / 4), 3, msg_type, &payload);
            for k in 1..batch - 3 {
                let more = self.script.take(usize::from(k) * 3);
                w.push(&mut buf, more);
            }
            w.finish(&mut buf);
        }
        self.feed(&buf);
    }

    /// A well-formed ACCEPTED, REPLY or REJECT for ids near the ones we sent.
    fn feed_answer(&mut self) {
        let b = self.script.byte();
        let span = self.last_sent.saturating_add(2);
        let id = u64::from(self.script.byte()) % span;
        let mut buf = BytesMut::new();
        match b % 4 {
            0 => {
                let more = u64::from(b / 3 % 3);
                let ids: Vec<u64> = (0..=more).map(|k| id.saturating_add(k) % span).collect();
                frame::encode_accepted(&mut buf, &ids);
            }
            1 => frame::encode_reply(&mut buf, id, &[b; 5]),
            2 => frame::encode_reject(&mut buf, id, WireCode(u32::from(b)), 7, "no"),
            _ => {
                // One run, as long as a peer likes (up to 2^32 ids).
                let more = u32::from(self.script.byte()) << (b / 4 % 4 * 8);
                buf.put_u32(frame::ACCEPTED_RUN_LEN as u32);
                buf.put_u8(FrameType::ACCEPTED.0);
                buf.put_u8(0);
                buf.put_u64(id);
                buf.put_u32(more);
            }
        }
        self.feed(&buf);
    }

    /// A well-formed HELLO (with varied limits, epoch, id and version), CLOSE or reserved frame.
    fn feed_control(&mut self) {
        let b = self.script.byte();
        match b % 4 {
            0 | 1 => {
                let c = self.script.byte();
                let epoch = match c % 4 {
                    0 => PEER_EPOCH,
                    1 => self.peer_epoch.wrapping_add(1),
                    _ => self.peer_epoch,
                };
                self.peer_epoch = epoch;
                let window = [16, 1, 0, 4][usize::from(c / 4 % 4)];
                let max_frame_len =
                    [4096, 28, 27, 100, 65536, 4096, 4096, 1000][usize::from(c / 16 % 8)];
                let (id, version) = match c / 128 {
                    0 => (PEER_ID, PROTOCOL_VERSION),
                    _ if b % 8 == 1 => ("spiffe://t/domus/c", PROTOCOL_VERSION),
                    _ if b % 8 == 5 => (PEER_ID, PROTOCOL_VERSION.wrapping_add(1)),
                    _ => (PEER_ID, PROTOCOL_VERSION),
                };
                self.feed_hello(epoch, window, max_frame_len, id, version);
            }
            2 => {
                let mut buf = BytesMut::new();
                frame::encode_close(&mut buf, WireCode(u32::from(b / 4)), "bye");
                self.feed(&buf);
            }
            _ => {
                let t = FrameType(0x80 | (b / 4 % 64));
                let len = self.script.byte() % 16;
                let mut buf = BytesMut::new();
                buf.extend_from_slice(&u32::from(len).to_be_bytes());
                buf.extend_from_slice(&[t.0, b]);
                buf.extend_from_slice(&[0xAA; 16][..usize::from(len)]);
                self.feed(&buf);
            }
        }
    }

    fn send(&mut self) {
        let b = self.script.byte();
        let msg_type = match b % 4 {
            0 => u32::from(b),
            1 => A2_MESSAGE_TYPE_BASE | u32::from(b),
            _ => A3_MESSAGE_TYPE_BASE | u32::from(b),
        };
        let len = usize::from(self.script.u16() % 4200);
        let timeout = Duration::from_millis(u64::from(self.script.byte()) * 100);
        // Headers on some sends: none, or up to 3 (over the limit of 2) of growing values.
        let h = self.script.byte();
        let mut headers = Headers::new();
        if !h.is_multiple_of(3) {
            for i in 0..usize::from(h % 4) {
                let value = vec![h; (usize::from(h) * (i + 1)) % 24];
                headers
                    .insert(["k0", "k1", "k2"][i % 3], value)
                    .expect("a valid header");
            }
        }
        let config = fuzz_config();
        let fits = !b.is_multiple_of(4)
            && len <= self.pair.a.max_payload_len()
            && headers.len() <= usize::from(config.max_headers)
            && headers.encoded_len() <= config.max_headers_len
            && len + headers.wire_len() <= self.pair.a.max_payload_len()
            && self.pair.a.in_flight() < config.max_in_flight as usize;
        let result = self.pair.a.send(Outgoing {
            headers,
            dst: 7,
            src: u64::from(b),
            msg_type,
            payload: Bytes::from(vec![b; len]),
            deadline: self.pair.now + timeout,
        });
        match result {
            Ok(id) => {
                assert!(fits, "send accepted what it should have refused");
                assert!(id > self.last_sent, "send reused id {id}");
                self.last_sent = id;
                self.outstanding.insert(id);
            }
            Err(e) => assert!(!fits, "send refused a message that fits: {e}"),
        }
    }

    /// An answer whose kind and contents the script chooses.
    fn answer_from_script(&mut self) -> Answer {
        let b = self.script.byte();
        match b % 4 {
            0 => Answer::Accepted,
            1 => Answer::Replied(Bytes::from(vec![b; usize::from(b % 64)])),
            // A reply with headers, some past the sender's limits (2 headers, 32 bytes).
            3 => {
                let mut headers = Headers::new();
                for i in 0..usize::from(b % 5) {
                    headers
                        .insert(
                            ["r0", "r1", "r2", "r3"][i % 4],
                            vec![b; usize::from(b % 20)],
                        )
                        .expect("a valid header");
                }
                Answer::reply_with_headers(Bytes::from(vec![b; usize::from(b % 64)]), &headers)
            }
            _ => Answer::Rejected {
                error: WireCode(u32::from(b / 3)),
                code: u32::from(b),
                // Up to 510 bytes of two-byte characters: the wire cap cuts between them.
                reason: "é".repeat(usize::from(self.script.byte())),
            },
        }
    }

    fn on_event(&mut self, event: Event) {
        match event {
            Event::Connected { restarted, .. } => {
                if restarted {
                    self.delivered.clear();
                }
            }
            e @ (Event::Arrived { .. } | Event::ArrivedRun { .. }) => {
                if let Event::ArrivedRun { run, .. } = &e {
                    assert!(!run.is_empty(), "an empty run");
                    let ids: Vec<u64> = run.iter().map(|m| m.id).collect();
                    let expected: Vec<u64> = (run.first_id..=run.last_id()).collect();
                    assert_eq!(ids, expected, "a run's messages are its ids");
                }
                for (peer_epoch, id) in e.arrivals() {
                    assert!(
                        self.delivered.insert(id),
                        "message {id} delivered twice in peer epoch {peer_epoch}"
                    );
                    self.ever_delivered.insert(id);
                    if self.script.byte() % 4 == 3 && self.deferred.len() < MAX_DEFERRED {
                        self.deferred.push_back((peer_epoch, id));
                    } else {
                        let answer = self.answer_from_script();
                        self.pair.a.answer(peer_epoch, id, answer);
                    }
                }
            }
            Event::Finished { id, .. } => {
                assert!(
                    self.outstanding.remove(&id),
                    "send {id} finished but was not outstanding (twice, cancelled or never sent)"
                );
            }
            Event::Close(_) => {}
        }
    }

    /// Drains events (answering deliveries), then transmits until the session runs dry and
    /// checks every frame it wrote.
    fn drain(&mut self) {
        for event in std::mem::take(&mut self.pair.a_events) {
            self.on_event(event);
        }
        while let Some(event) = self.pair.a.poll_event() {
            self.on_event(event);
        }
        if self.pair.a.must_abandon() {
            // As the driver does: the callis is dropped at once, whatever is queued.
            let now = self.pair.now;
            self.pair.a.disconnected(now);
            self.expect_hello = false;
        }
        // Nothing reaches a while the pair pumps (b is silent), so the limit stays put.
        let max_payload = self.pair.a.max_payload_len();
        // a's frames are held to the limit a was told: the script plays b and its HELLO may
        // announce more than b's own configuration (found by fuzzing: a batch one byte over
        // b's 4,096 after a scripted HELLO of 65,536, which a rightly wrote).
        self.pair.wire_limit = self.pair.a.peer_max_frame_len();
        self.pair.pump();
        for f in std::mem::take(&mut self.pair.a_wire) {
            self.check_frame(f, max_payload);
        }
    }

    /// One frame a wrote (the pair already checked that it decodes within the frame limit).
    fn check_frame(&mut self, f: Frame, max_payload: usize) {
        if std::mem::take(&mut self.expect_hello) {
            match &f {
                Frame::Hello(h) => {
                    assert_eq!(h.domus_id, LOCAL_ID);
                    assert_eq!(h.epoch, LOCAL_EPOCH);
                    assert_eq!(h.version, PROTOCOL_VERSION);
                }
                other => panic!("first frame after connected is {other:?}, not HELLO"),
            }
            return;
        }
        match f {
            Frame::Hello(h) => panic!("a HELLO not right after connected: {h:?}"),
            Frame::Message(m) => self.check_message(&m, max_payload),
            Frame::MessageBatch(batch) => {
                assert!(!batch.is_empty(), "an empty batch");
                for m in batch.iter() {
                    self.check_message(&m, max_payload);
                }
            }
            Frame::Accepted(ids) => {
                for id in ids.iter() {
                    self.check_answered(id);
                }
            }
            Frame::Reply { id, .. } => self.check_answered(id),
            // The session itself refuses a message it will not deliver (headers over the
            // limits or of an unknown version, answers the peer does not read): such a REJECT
            // answers an id never delivered, and only those reasons may (found by fuzzing:
            // raw bytes that form a MESSAGE with a headers block).
            Frame::Reject(r) if !self.ever_delivered.contains(&r.id) => {
                let why = r.error.rejection_id();
                assert!(
                    matches!(
                        why,
                        ErrorId::HeadersTooLarge
                            | ErrorId::UnsupportedVersion
                            | ErrorId::TabernaBusy
                    ),
                    "a REJECT ({why}) for message {}, which was never delivered",
                    r.id
                );
            }
            Frame::Reject(r) => self.check_answered(r.id),
            Frame::DoneBelow(floor) => assert!(
                self.outstanding.iter().all(|id| *id >= floor),
                "DONE_BELOW {floor} while a send below it is outstanding: {:?}",
                self.outstanding
            ),
            Frame::Skipped(t) => panic!("the session wrote a reserved frame {t:?}"),
            Frame::Blob(b) => panic!("the primary session wrote a blob frame {b:?}"),
            Frame::Ping(_) | Frame::Pong(_) | Frame::Close { .. } => {}
        }
    }

    fn check_message(&self, m: &MessageFrame, max_payload: usize) {
        assert!(
            self.outstanding.contains(&m.id),
            "MESSAGE {} is not retained",
            m.id
        );
        assert!(
            m.payload.len() <= max_payload,
            "MESSAGE {} carries {} payload bytes, but the peer accepts at most {max_payload}",
            m.id,
            m.payload.len()
        );
    }

    fn check_answered(&self, id: u64) {
        assert!(
            self.ever_delivered.contains(&id),
            "an answer for message {id}, which was never delivered"
        );
    }

    fn check_accounting(&self) {
        assert_eq!(
            self.pair.a.in_flight(),
            self.outstanding.len(),
            "in_flight disagrees with the sends that have not finished"
        );
    }
}
