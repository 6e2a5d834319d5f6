//! Entry points of the fuzz targets (`fuzz/fuzz_targets/`), and the regression test that
//! replays their corpus under plain `cargo test` (below); not a public API. Compiled only with
//! `--cfg fuzzing` (cargo-fuzz sets it) or for this crate's unit tests: never in a user's
//! build.
//!
//! Each function takes arbitrary bytes and must never panic on its own account: a panic means
//! the code under test broke one of the properties asserted here, and that panic is the finding.
//! All of them bound their own work, so no input can make them loop for long.
//!
//! This module must not do IO, spawn threads or read the clock more than once per input:
//! [`session_input`] and [`blob_input`] read `Instant::now()` a single time as the origin of a
//! virtual clock and only add durations to it.

use std::collections::{BTreeMap, BTreeSet, HashSet, VecDeque};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use crate::ErrorId;
use crate::a1_callis::blob::{BlobConfig, BlobEvent, BlobStreams};
use crate::a1_callis::codes::WireCode;
use crate::a1_callis::frame::{
    self, BlobFrame, Frame, FrameType, HEADER_LEN, Hello, PROTOCOL_VERSION,
};
use crate::a1_callis::session::{
    A3_MESSAGE_TYPE_BASE, Answer, Event, Outgoing, Session, SessionConfig,
};

/// The frame limit [`frame_decoder`] decodes with first (a modest 64 KiB).
const DECODER_MAX_FRAME_LEN: u32 = 64 * 1024;

/// Decodes `data` as an A1 byte stream, twice: with a 64 KiB frame limit, and with the limit
/// named by the first four bytes (big-endian) over the bytes that follow them.
///
/// Checked for every decoded frame: re-encoding it gives back exactly the bytes it was decoded
/// from (the wire format is canonical; a skippable frame keeps only its type), decoding that
/// encoding gives the same frame, and no strict prefix of it decodes. `Ok(None)` must consume
/// nothing and only happen when the buffer really holds no complete frame.
pub fn frame_decoder(data: &[u8]) {
    decode_stream(data, DECODER_MAX_FRAME_LEN);
    if let Some((limit, rest)) = data.split_first_chunk::<4>() {
        decode_stream(rest, u32::from_be_bytes(*limit));
    }
}

/// Decodes frames from `input` until the decoder asks for more bytes or reports corruption.
/// Every successful decode consumes at least a header, so this ends.
fn decode_stream(input: &[u8], max_frame_len: u32) {
    let mut buf = BytesMut::from(input);
    loop {
        let before = buf.len();
        match frame::decode(&mut buf, max_frame_len) {
            Ok(Some(f)) => {
                let consumed = before.saturating_sub(buf.len());
                assert!(
                    consumed >= HEADER_LEN,
                    "{f:?} consumed only {consumed} bytes"
                );
                let start = input.len().saturating_sub(before);
                let raw = input
                    .get(start..start.saturating_add(consumed))
                    .unwrap_or_default();
                check_round_trip(&f, raw, max_frame_len);
            }
            Ok(None) => {
                assert_eq!(buf.len(), before, "Ok(None) consumed bytes");
                if let Some(header) = buf.first_chunk::<4>()
                    && buf.len() >= HEADER_LEN
                {
                    let body = u32::from_be_bytes(*header) as usize;
                    assert!(
                        buf.len() < HEADER_LEN.saturating_add(body),
                        "Ok(None) with a complete {body}-byte frame in {} bytes",
                        buf.len()
                    );
                }
                return;
            }
            Err(_) => return,
        }
    }
}

/// `raw` is the exact wire form `f` was decoded from.
fn check_round_trip(f: &Frame, raw: &[u8], max_frame_len: u32) {
    let mut encoded = BytesMut::new();
    f.encode(&mut encoded);
    let wire = encoded.to_vec();
    match f {
        // The body and flags of a skipped frame are not kept; only its type is.
        Frame::Skipped(t) => {
            assert!(t.is_skippable(), "skipped a non-reserved type {t:?}");
            assert_eq!(raw.get(4), Some(&t.0), "skipped frame changed type");
        }
        _ => assert_eq!(wire, raw, "{f:?} does not re-encode to its own bytes"),
    }
    assert_eq!(
        frame::decode(&mut encoded, max_frame_len),
        Ok(Some(f.clone())),
        "decode(encode(f)) != f"
    );
    assert!(encoded.is_empty(), "re-encoded {f:?} left bytes behind");
    let mut prefix = BytesMut::from(wire.get(..wire.len().saturating_sub(1)).unwrap_or_default());
    let prefix_len = prefix.len();
    assert_eq!(
        frame::decode(&mut prefix, max_frame_len),
        Ok(None),
        "a strict prefix of {f:?} decoded"
    );
    assert_eq!(prefix.len(), prefix_len, "a strict prefix was consumed");
}

/// The local side of the session under test.
const LOCAL_ID: &str = "spiffe://t/domus/a";
const LOCAL_EPOCH: u64 = 1;
/// The peer the script plays; its certificate names this id.
const PEER_ID: &str = "spiffe://t/domus/b";
const PEER_EPOCH: u64 = 2;
/// At most this many script operations per input.
const MAX_STEPS: usize = 1024;
/// `poll_transmit` must run dry within this many calls (at most 8 messages are retained, and
/// every call writes at least one when any is queued).
const MAX_TRANSMITS: usize = 64;
/// Deliveries whose answer is postponed; past this many, they are answered at once.
const MAX_DEFERRED: usize = 32;
/// A2 (service) message type base.
const A2_MESSAGE_TYPE_BASE: u32 = 0x0001_0000;

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
    }
}

/// Drives one [`Session`] with `data` as the peer's bytes and as a script of driver calls.
///
/// After `connected`, a valid HELLO from the peer is fed unless the first byte is odd (then the
/// session only gets what the script feeds). The rest of `data` is a script, one operation per
/// byte with its arguments taken from the following bytes: raw chunks through
/// `recv_buf` + `handle_input` (sizes from the data), well-formed frames (MESSAGE, answers,
/// PING/PONG, HELLO, CLOSE, reserved), virtual time steps with `handle_timeout`, `send`,
/// postponed answers, reconnects, `cancel`, `fail_all` and write-progress reports (a callis
/// the session gives up is dropped, as the driver does). Every `Deliver` is answered
/// (Accepted, Replied or Rejected, now or later) and events and transmits are drained after
/// every operation.
///
/// Checked: everything `poll_transmit` writes decodes cleanly under the session's own frame
/// limit; the first frame after `connected` is our HELLO and no other HELLO is written; no
/// MESSAGE exceeds what the peer said it accepts or carries an id we do not retain; answers
/// only name delivered ids; a message is delivered at most once per peer epoch; every `send`
/// finishes exactly once (or is cancelled), `in_flight` matches, and all of them finish once
/// their deadlines pass; `poll_transmit` runs dry; after `handle_timeout(now)`,
/// `poll_timeout` is never `now` or earlier.
pub fn session_input(data: &[u8]) {
    let mut h = Harness::new(data);
    h.session.connected(h.now(), PEER_ID);
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
        h.session.answer(epoch, id, answer);
    }
    h.drain();
    h.advance(Duration::from_secs(3600));
    h.drain();
    h.check_accounting();
    assert!(
        h.outstanding.is_empty(),
        "sends never finished although their deadlines passed: {:?}",
        h.outstanding
    );
}

/// The fuzz input read front to back; reads past the end give zeros.
struct Script<'a> {
    data: &'a [u8],
}

impl<'a> Script<'a> {
    fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    fn byte(&mut self) -> u8 {
        match self.data.split_first() {
            Some((b, rest)) => {
                self.data = rest;
                *b
            }
            None => 0,
        }
    }

    fn u16(&mut self) -> u16 {
        u16::from_be_bytes([self.byte(), self.byte()])
    }

    fn take(&mut self, n: usize) -> &'a [u8] {
        let (head, rest) = self.data.split_at(n.min(self.data.len()));
        self.data = rest;
        head
    }
}

struct Harness<'a> {
    script: Script<'a>,
    session: Session,
    origin: Instant,
    elapsed: Duration,
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
            session: Session::new(fuzz_config(), LOCAL_ID.to_owned(), LOCAL_EPOCH),
            origin: Instant::now(),
            elapsed: Duration::ZERO,
            peer_epoch: PEER_EPOCH,
            outstanding: BTreeSet::new(),
            last_sent: 0,
            delivered: HashSet::new(),
            ever_delivered: HashSet::new(),
            deferred: VecDeque::new(),
            expect_hello: false,
        }
    }

    fn now(&self) -> Instant {
        self.origin + self.elapsed
    }

    fn feed(&mut self, bytes: &[u8]) {
        let now = self.now();
        self.session.recv_buf().extend_from_slice(bytes);
        self.session.handle_input(now);
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
        let now = self.now();
        self.session.disconnected(now);
        self.session.connected(now, PEER_ID);
        self.expect_hello = true;
    }

    /// Moves the virtual clock forward by `by` and fires the timers.
    fn advance(&mut self, by: Duration) {
        self.elapsed = self.elapsed.saturating_add(by);
        self.fire_timers();
    }

    fn fire_timers(&mut self) {
        let now = self.now();
        self.session.handle_timeout(now);
        if let Some(next) = self.session.poll_timeout() {
            assert!(
                next > now,
                "poll_timeout is {:?} after handle_timeout at {:?}: the driver would spin",
                next.saturating_duration_since(self.origin),
                self.elapsed
            );
        }
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
                self.advance(Duration::from_millis(ms));
            }
            // As a driver does: sleep until poll_timeout, then handle_timeout.
            10 => {
                let now = self.now();
                if let Some(at) = self.session.poll_timeout() {
                    self.elapsed = self
                        .elapsed
                        .saturating_add(at.saturating_duration_since(now));
                }
                self.fire_timers();
            }
            11 | 12 => self.send(),
            13 => {
                let all = self.script.byte() % 2 == 1;
                while let Some((epoch, id)) = self.deferred.pop_front() {
                    let answer = self.answer_from_script();
                    self.session.answer(epoch, id, answer);
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
                let now = self.now();
                if b >= 250 {
                    // The driver's report of a write attempt: moved or not, bytes waiting or
                    // not (T33).
                    let flags = self.script.byte();
                    self.session
                        .write_progress(now, flags & 1 == 1, flags & 2 == 2);
                    return;
                }
                match b % 5 {
                    0 => {
                        let id = u64::from(self.script.byte() % 16);
                        self.session.cancel(id);
                        self.outstanding.remove(&id);
                    }
                    1 => self.session.fail_all(crate::Error::new(
                        crate::ErrorId::PeerUnavailable,
                        "fuzz: the peer is unreachable",
                    )),
                    // `connected` again without `disconnected` in between.
                    2 => {
                        self.session.connected(now, PEER_ID);
                        self.expect_hello = true;
                    }
                    3 => {
                        self.session.disconnected(now);
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

    /// A well-formed MESSAGE from the peer with small ids, some of them invalid.
    fn feed_message(&mut self) {
        let id = u64::from(self.script.byte() % 48);
        let b = self.script.byte();
        let msg_type = match b % 4 {
            0 => u32::from(b),
            1 => A2_MESSAGE_TYPE_BASE | u32::from(b),
            _ => A3_MESSAGE_TYPE_BASE | u32::from(b),
        };
        let len = usize::from(self.script.byte() % 64);
        let payload = self.script.take(len);
        let mut buf = BytesMut::new();
        frame::encode_message(&mut buf, id, u64::from(b / 4), 3, msg_type, payload);
        self.feed(&buf);
    }

    /// A well-formed ACCEPTED, REPLY or REJECT for ids near the ones we sent.
    fn feed_answer(&mut self) {
        let b = self.script.byte();
        let span = self.last_sent.saturating_add(2);
        let id = u64::from(self.script.byte()) % span;
        let mut buf = BytesMut::new();
        match b % 3 {
            0 => {
                let more = u64::from(b / 3 % 3);
                let ids: Vec<u64> = (0..=more).map(|k| id.saturating_add(k) % span).collect();
                frame::encode_accepted(&mut buf, &ids);
            }
            1 => frame::encode_reply(&mut buf, id, &[b; 5]),
            _ => frame::encode_reject(&mut buf, id, WireCode(u32::from(b)), 7, "no"),
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
        let fits = !b.is_multiple_of(4)
            && len <= self.session.max_payload_len()
            && self.session.in_flight() < fuzz_config().max_in_flight as usize;
        let result = self.session.send(Outgoing {
            dst: 7,
            src: u64::from(b),
            msg_type,
            payload: Bytes::from(vec![b; len]),
            deadline: self.now() + timeout,
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
        match b % 3 {
            0 => Answer::Accepted,
            1 => Answer::Replied(Bytes::from(vec![b; usize::from(b % 64)])),
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
            Event::Deliver {
                peer_epoch,
                message,
            } => {
                let id = message.id;
                assert!(
                    self.delivered.insert(id),
                    "message {id} delivered twice in peer epoch {peer_epoch}"
                );
                self.ever_delivered.insert(id);
                if self.script.byte() % 4 == 3 && self.deferred.len() < MAX_DEFERRED {
                    self.deferred.push_back((peer_epoch, id));
                } else {
                    let answer = self.answer_from_script();
                    self.session.answer(peer_epoch, id, answer);
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

    /// Drains events (answering deliveries), then transmits until the session runs dry.
    fn drain(&mut self) {
        while let Some(event) = self.session.poll_event() {
            self.on_event(event);
        }
        let now = self.now();
        if self.session.must_abandon() {
            // As the driver does: the callis is dropped at once, whatever is queued.
            self.session.disconnected(now);
            self.expect_hello = false;
        }
        for _ in 0..MAX_TRANSMITS {
            let mut out = BytesMut::new();
            let wrote = self.session.poll_transmit(now, &mut out);
            assert_eq!(wrote, !out.is_empty(), "poll_transmit's result is wrong");
            if !wrote {
                return;
            }
            self.check_transmit(out);
        }
        panic!("poll_transmit still had bytes after {MAX_TRANSMITS} calls");
    }

    fn check_transmit(&mut self, mut out: BytesMut) {
        let limit = fuzz_config().max_frame_len;
        let max_payload = self.session.max_payload_len();
        loop {
            let f = match frame::decode(&mut out, limit) {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => panic!("the session wrote a corrupt frame: {e}"),
            };
            if std::mem::take(&mut self.expect_hello) {
                match &f {
                    Frame::Hello(h) => {
                        assert_eq!(h.domus_id, LOCAL_ID);
                        assert_eq!(h.epoch, LOCAL_EPOCH);
                        assert_eq!(h.version, PROTOCOL_VERSION);
                    }
                    other => panic!("first frame after connected is {other:?}, not HELLO"),
                }
                continue;
            }
            match f {
                Frame::Hello(h) => panic!("a HELLO not right after connected: {h:?}"),
                Frame::Message(m) => {
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
                Frame::Accepted(ids) => {
                    for id in ids.iter() {
                        self.check_answered(id);
                    }
                }
                Frame::Reply { id, .. } => self.check_answered(id),
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
        assert!(
            out.is_empty(),
            "poll_transmit ended in a partial frame ({} bytes)",
            out.len()
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
            self.session.in_flight(),
            self.outstanding.len(),
            "in_flight disagrees with the sends that have not finished"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// blob_input: two sans-IO `BlobStreams` back to back.

/// At most this many script operations per [`blob_input`] input.
const BLOB_MAX_STEPS: usize = 1024;
/// The largest single application write.
const BLOB_MAX_WRITE: usize = 4096;
/// Application bytes written per input, over all streams.
const BLOB_MAX_WRITTEN: u64 = 64 * 1024;
/// The largest BLOB_DATA payload the script injects.
const BLOB_MAX_INJECTED: usize = 8 * 1024;
/// Rounds of the final exchange; honest traffic must have gone quiet by then.
const BLOB_SETTLE_ROUNDS: usize = 4096;

/// Drives two [`BlobStreams`] connected by an in-memory pipe: `a` only sends, `b` only
/// receives. The first five bytes of `data` choose the limits (each side's `chunk_len` in
/// 64..=1020, the shared `window` in 512..=4592, `max_streams` 1..=6, `idle_timeout` 1..=5 s,
/// `max_peer_cancels_per_second` 1..=4); the rest is a script, one operation per byte with its
/// arguments taken from the following bytes: open a stream on `a` and (later) on `b`,
/// application writes/finish/cancel on `a`, take/consume/read/close/cancel on `b`,
/// `poll_transmit` with a budget on either side, delivering all or a prefix of the pending
/// bytes either way, cutting the connection (`disconnected` on both, in-flight bytes dropped)
/// and connecting again (`set_peer_chunk` + `connected`), virtual time with `handle_timeout`,
/// and hostile frames built from the data (BLOB_DATA/END/CREDIT/CANCEL/HELLO with arbitrary
/// streams, offsets and lengths) handed to either side's `handle_frame`. Like the blob driver,
/// a `Violation` cancels the stream it names and cuts the connection. Application bytes are a
/// fixed function of (stream, offset), so what arrives can be compared with what was written
/// without keeping a copy. At the end the link comes up and both sides exchange everything
/// with an eager reader until nothing moves.
///
/// The harness keeps its own account of every stream (written, acknowledged, credit seen,
/// received, taken, consumed, announced end) from the frames it hands over and the events
/// that come back. Checked, whatever the script does:
/// * nothing in `BlobStreams` panics, and what either side transmits decodes cleanly under
///   the receiver's frame limit (`chunk_len` + 16), cancels and credits before data;
/// * `poll_transmit` writes nothing while disconnected, returns whether it wrote, stops once
///   the budget is reached (the last data frame starts below it), and after an unlimited call
///   the next one writes nothing;
/// * a sender's BLOB_DATA is non-empty, within `chunk_len` and the peer's announced chunk,
///   within the credit it accepted and what was written, and carries exactly the written
///   bytes; its BLOB_END names the stream's full length, after `finish` and after the
///   receiver's first credit;
/// * a receiver's BLOB_CREDIT reports exactly what it accepted, never allows more than
///   `window` bytes past what the application consumed, and only names open streams; its
///   BLOB_END answer names a stream that holds every byte up to its end (open, or closed with
///   that length); cancels only name cancelled streams;
/// * a receiving stream never holds more than `window` bytes received but not consumed; it
///   accepts data exactly when it continues what arrived within the credit (and the announced
///   end); anything else is a `Violation` naming it, or ignored when it is a duplicate;
///   frames for streams that never existed on that side are a `Violation`, late frames for
///   closed ones are not; `is_drained`/`is_complete` agree with the account;
/// * a sender never holds more than `window` written-but-unacknowledged bytes; `acked`
///   matches; a credit acknowledging more than was ever sent is a `Violation`; a credit never
///   completes a stream: `Finished` comes exactly when a BLOB_END answer names the full
///   length of a finished stream (any other answer is a `Violation`);
/// * an idle-timeout cancel only hits a stream idle for `idle_timeout`, and after
///   `handle_timeout(now)` `poll_timeout` is later than `now`;
/// * a cancel-budget `Violation` only after more than the budget of BLOB_CANCELs arrived.
///
/// For honest traffic (no injected frame so far): no `Violation` at all apart from the cancel
/// budget, and the final exchange goes quiet. For every stream without injected frames,
/// cancels or timeouts: every byte taken is the byte written at that offset, and after the
/// final exchange the receiver took every written byte, and a finished stream is `Finished`
/// on the sender and drained (with its end) on the receiver.
pub fn blob_input(data: &[u8]) {
    let mut h = BlobHarness::new(data);
    for _ in 0..BLOB_MAX_STEPS {
        if h.script.is_empty() {
            break;
        }
        h.step();
        h.after_violation();
        h.check();
    }
    h.settle();
}

/// The byte at `offset` of `stream` (what the application writes there).
fn blob_byte(stream: u64, offset: u64) -> u8 {
    let mut x = stream.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ offset;
    x = x.wrapping_mul(0xD6E8_FEB8_6659_FD93);
    x ^= x >> 29;
    x = x.wrapping_mul(0x94D0_49BB_1331_11EB);
    (x >> 56) as u8
}

fn blob_bytes(stream: u64, offset: u64, len: usize) -> Bytes {
    (0..len as u64)
        .map(|i| blob_byte(stream, offset.wrapping_add(i)))
        .collect()
}

/// Where `chunk` differs from what was written at `offset` of `stream`, if anywhere.
fn blob_mismatch(stream: u64, offset: u64, chunk: &[u8]) -> Option<u64> {
    (0u64..)
        .zip(chunk)
        .find(|(i, b)| **b != blob_byte(stream, offset.wrapping_add(*i)))
        .map(|(i, _)| offset.wrapping_add(i))
}

/// The harness's account of one sending stream (`a`).
#[derive(Debug, Default)]
struct OutModel {
    open: bool,
    /// Bytes `write` took.
    written: u64,
    finish_called: bool,
    /// A BLOB_END went out since `a` last connected.
    end_sent: bool,
    acked: u64,
    /// The highest credit limit `a` accepted.
    limit: u64,
    /// One past the highest byte `a` ever sent.
    sent_high: u64,
    /// `a` accepted a credit for this stream.
    credited: bool,
    finished_event: bool,
    last_progress: Duration,
}

/// The harness's account of one receiving stream (`b`).
#[derive(Debug, Default)]
struct InModel {
    open: bool,
    received: u64,
    taken: u64,
    consumed: u64,
    total: Option<u64>,
    /// The highest limit `b` wrote in a credit (its real limit is at least this and `window`).
    credit_limit: u64,
    /// Closed with every byte received up to its end: a late BLOB_END of this length is
    /// answered.
    final_total: Option<u64>,
    last_progress: Duration,
}

/// Bytes one side wrote that the other has not decoded yet.
#[derive(Default)]
struct Pipe {
    /// Written, not arrived.
    pending: BytesMut,
    /// Arrived, not a complete frame yet.
    arrived: BytesMut,
}

impl Pipe {
    fn clear(&mut self) {
        self.pending.clear();
        self.arrived.clear();
    }

    fn is_empty(&self) -> bool {
        self.pending.is_empty() && self.arrived.is_empty()
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Side {
    A,
    B,
}

struct BlobHarness<'a> {
    script: Script<'a>,
    a: BlobStreams,
    b: BlobStreams,
    chunk_a: usize,
    chunk_b: usize,
    window: u64,
    max_streams: usize,
    idle: Duration,
    cancel_budget: u32,
    origin: Instant,
    elapsed: Duration,
    link_up: bool,
    a_to_b: Pipe,
    b_to_a: Pipe,
    /// The chunk `b` announced to `a` on this connection, and the other way round.
    chunk_for_a: usize,
    chunk_for_b: usize,
    next_id: u64,
    out: BTreeMap<u64, OutModel>,
    inn: BTreeMap<u64, InModel>,
    /// Streams `a` opened that `b` has not opened (or refused) yet.
    pending_in: Vec<u64>,
    written_total: u64,
    /// An injected frame was handled by either side.
    hostile: bool,
    /// Streams an injected frame named.
    tainted: BTreeSet<u64>,
    /// Streams cancelled, timed out or abandoned on either side.
    cancelled: BTreeSet<u64>,
    /// Cancels queued on each side and not written yet.
    a_cancels: BTreeSet<u64>,
    b_cancels: BTreeSet<u64>,
    /// BLOB_CANCELs handed to each side.
    cancels_to_a: u32,
    cancels_to_b: u32,
    /// A `Violation` asked for the connection to be cut.
    cut_due: bool,
}

impl<'a> BlobHarness<'a> {
    fn new(data: &'a [u8]) -> Self {
        let mut script = Script { data };
        let chunk = |b: u8| 64 + usize::from(b) * 15 / 4;
        let chunk_a = chunk(script.byte());
        let chunk_b = chunk(script.byte());
        let window = 512 + u64::from(script.byte()) * 16;
        let b = script.byte();
        let max_streams = 1 + usize::from(b % 6);
        let idle = Duration::from_secs(1 + u64::from(b / 6 % 5));
        let cancel_budget = 1 + u32::from(script.byte() % 4);
        let config = |chunk_len| BlobConfig {
            chunk_len,
            window,
            max_streams,
            idle_timeout: idle,
            max_peer_cancels_per_second: cancel_budget,
            // Never reached here (a script hands over far fewer frames): the frame budget is
            // tested in blob_tests, where the clock and the counts are exact.
            max_frames_per_second: u32::MAX,
        };
        let mut h = Self {
            script,
            a: BlobStreams::new(config(chunk_a)),
            b: BlobStreams::new(config(chunk_b)),
            chunk_a,
            chunk_b,
            window,
            max_streams,
            idle,
            cancel_budget,
            origin: Instant::now(),
            elapsed: Duration::ZERO,
            link_up: false,
            a_to_b: Pipe::default(),
            b_to_a: Pipe::default(),
            chunk_for_a: chunk_b,
            chunk_for_b: chunk_a,
            next_id: 1,
            out: BTreeMap::new(),
            inn: BTreeMap::new(),
            pending_in: Vec::new(),
            written_total: 0,
            hostile: false,
            tainted: BTreeSet::new(),
            cancelled: BTreeSet::new(),
            a_cancels: BTreeSet::new(),
            b_cancels: BTreeSet::new(),
            cancels_to_a: 0,
            cancels_to_b: 0,
            cut_due: false,
        };
        h.connect(chunk_b, chunk_a);
        h
    }

    fn now(&self) -> Instant {
        self.origin + self.elapsed
    }

    /// Whether the content and completion of `stream` are still checked.
    fn honest_stream(&self, stream: u64) -> bool {
        !self.tainted.contains(&stream) && !self.cancelled.contains(&stream)
    }

    fn open_out(&self) -> usize {
        self.out.values().filter(|o| o.open).count()
    }

    fn open_in(&self) -> usize {
        self.inn.values().filter(|i| i.open).count()
    }

    /// A stream `a` opened (or, rarely or when there is none, one it never opened).
    fn pick_out(&mut self) -> u64 {
        let b = self.script.byte();
        let n = self.out.len();
        if n == 0 || b == 255 {
            return self.next_id;
        }
        self.out
            .keys()
            .nth(usize::from(b) % n)
            .copied()
            .unwrap_or(self.next_id)
    }

    /// A stream `b` opened (or, rarely or when there is none, one it never opened).
    fn pick_in(&mut self) -> u64 {
        let b = self.script.byte();
        let n = self.inn.len();
        if n == 0 || b == 255 {
            return self.next_id;
        }
        self.inn
            .keys()
            .nth(usize::from(b) % n)
            .copied()
            .unwrap_or(self.next_id)
    }

    /// One script operation.
    fn step(&mut self) {
        let op = self.script.byte();
        match op % 26 {
            0 | 1 => self.open_outbound(),
            2 => self.open_inbound(),
            3..=5 => self.write(),
            6 => {
                let s = self.pick_out();
                let open = self.out.get(&s).is_some_and(|o| o.open);
                let result = self.a.finish(s);
                assert_eq!(result.is_ok(), open, "finish({s}) on a stream open={open}");
                if let Some(o) = self.out.get_mut(&s) {
                    o.finish_called |= open;
                }
            }
            7 => {
                let s = self.pick_out();
                self.app_cancel(Side::A, s);
            }
            8 => {
                let s = self.pick_in();
                self.take(s, false);
            }
            9 => self.consume(),
            10 | 11 => {
                let s = self.pick_in();
                self.take(s, true);
            }
            12 => self.close_inbound(),
            13 => {
                let s = self.pick_in();
                self.app_cancel(Side::B, s);
            }
            14 => {
                let budget = self.budget();
                self.transmit(Side::A, budget);
            }
            15 => {
                let budget = self.budget();
                self.transmit(Side::B, budget);
            }
            16 => {
                let n = self.deliver_len();
                self.deliver(Side::B, n);
            }
            17 => {
                let n = self.deliver_len();
                self.deliver(Side::A, n);
            }
            18 | 19 => {
                self.pump();
            }
            20 => {
                let b = self.script.byte();
                self.cut();
                if b.is_multiple_of(2) {
                    self.connect_from_script();
                }
            }
            21 => {
                if !self.link_up {
                    self.connect_from_script();
                }
            }
            22 => {
                let ms = u64::from(self.script.byte()) * 40;
                self.elapsed = self.elapsed.saturating_add(Duration::from_millis(ms));
                self.fire_timers();
            }
            23 => {
                // As a driver does: sleep until the earliest poll_timeout.
                let next = [self.a.poll_timeout(), self.b.poll_timeout()]
                    .into_iter()
                    .flatten()
                    .min();
                if let Some(at) = next {
                    let now = self.now();
                    self.elapsed = self
                        .elapsed
                        .saturating_add(at.saturating_duration_since(now));
                }
                self.fire_timers();
            }
            _ => self.inject(),
        }
    }

    fn budget(&mut self) -> usize {
        match self.script.byte() {
            0 => 0,
            255 => usize::MAX,
            b => usize::from(b) * 24,
        }
    }

    fn deliver_len(&mut self) -> Option<usize> {
        let b = self.script.byte();
        if b < 128 {
            None
        } else {
            Some(usize::from(b - 128) * 33)
        }
    }

    fn open_outbound(&mut self) {
        let s = self.next_id;
        self.next_id = self.next_id.saturating_add(1);
        let fits = self.open_out() < self.max_streams;
        let result = self.a.open_outbound(self.now(), s);
        assert_eq!(result.is_ok(), fits, "open_outbound({s}): {result:?}");
        if let Err(e) = result {
            assert_eq!(e.id(), ErrorId::BlobBufferFull, "{e}");
            return;
        }
        self.out.insert(
            s,
            OutModel {
                open: true,
                last_progress: self.elapsed,
                ..OutModel::default()
            },
        );
        self.pending_in.push(s);
    }

    /// `b`'s handler accepts the opening message of a stream `a` opened.
    fn open_inbound(&mut self) {
        let b = self.script.byte();
        if self.pending_in.is_empty() {
            return;
        }
        let i = usize::from(b) % self.pending_in.len();
        let s = self.pending_in.remove(i);
        let fits = self.open_in() < self.max_streams;
        let result = self.b.open_inbound(self.now(), s);
        assert_eq!(result.is_ok(), fits, "open_inbound({s}): {result:?}");
        if let Err(e) = result {
            assert_eq!(e.id(), ErrorId::BlobBufferFull, "{e}");
            return;
        }
        self.inn.insert(
            s,
            InModel {
                open: true,
                last_progress: self.elapsed,
                ..InModel::default()
            },
        );
    }

    fn write(&mut self) {
        let s = self.pick_out();
        let room = usize::try_from(BLOB_MAX_WRITTEN.saturating_sub(self.written_total))
            .unwrap_or(usize::MAX);
        let len = (usize::from(self.script.u16()) % (BLOB_MAX_WRITE + 1)).min(room);
        let (writable, offset) = self
            .out
            .get(&s)
            .map_or((false, 0), |o| (o.open && !o.finish_called, o.written));
        let result = self.a.write(self.now(), s, &blob_bytes(s, offset, len));
        let window = self.window;
        let elapsed = self.elapsed;
        match result {
            Ok(n) => {
                assert!(
                    writable,
                    "write({s}) accepted on a stream that is not writable"
                );
                assert!(n <= len, "write took {n} of {len} bytes");
                let o = self.out.get_mut(&s).expect("writable streams are known");
                o.written = o.written.saturating_add(n as u64);
                if n > 0 {
                    o.last_progress = elapsed;
                }
                assert!(
                    o.written.saturating_sub(o.acked) <= window,
                    "stream {s}: the sender holds {} unacknowledged bytes, window {window}",
                    o.written.saturating_sub(o.acked)
                );
                self.written_total = self.written_total.saturating_add(n as u64);
            }
            Err(e) => assert!(!writable, "write({s}) refused on a writable stream: {e}"),
        }
    }

    /// The application abandons a stream on one side.
    fn app_cancel(&mut self, side: Side, s: u64) {
        let b = self.script.byte();
        let error = if b.is_multiple_of(2) {
            ErrorId::BlobCancelled
        } else {
            ErrorId::BlobStreamNotFound
        };
        match side {
            Side::A => self.a.cancel(s, error, "fuzz: the sender gave up"),
            Side::B => self.b.cancel(s, error, "fuzz: the receiver gave up"),
        }
        self.closed_by_cancel(side, s);
    }

    /// `side` cancelled `s` itself (a cancel is queued if it was open).
    fn closed_by_cancel(&mut self, side: Side, s: u64) {
        let was_open = match side {
            Side::A => self
                .out
                .get_mut(&s)
                .is_some_and(|o| std::mem::take(&mut o.open)),
            Side::B => self
                .inn
                .get_mut(&s)
                .is_some_and(|i| std::mem::take(&mut i.open)),
        };
        if was_open {
            self.cancelled.insert(s);
            match side {
                Side::A => self.a_cancels.insert(s),
                Side::B => self.b_cancels.insert(s),
            };
        }
    }

    /// `take` (or `read`, which also consumes) on `b`.
    fn take(&mut self, s: u64, read: bool) {
        let open = self.inn.get(&s).is_some_and(|i| i.open);
        let result = if read {
            self.b.read(self.now(), s)
        } else {
            self.b.take(s)
        };
        let chunk = match result {
            Ok(c) => {
                assert!(open, "take/read({s}) on a stream b does not have: {c:?}");
                c
            }
            Err(e) => {
                assert!(!open, "take/read({s}) failed on an open stream: {e}");
                return;
            }
        };
        let honest = self.honest_stream(s);
        let elapsed = self.elapsed;
        let i = self.inn.get_mut(&s).expect("open streams are known");
        let Some(chunk) = chunk else {
            assert_eq!(
                i.taken, i.received,
                "stream {s}: take found nothing although {} bytes arrived and {} were taken",
                i.received, i.taken
            );
            return;
        };
        let len = chunk.len() as u64;
        assert!(
            i.taken.saturating_add(len) <= i.received,
            "stream {s}: took {len} bytes at {}, but only {} arrived",
            i.taken,
            i.received
        );
        if honest && let Some(at) = blob_mismatch(s, i.taken, &chunk) {
            panic!("stream {s}: byte {at} taken differs from the byte written there");
        }
        i.taken = i.taken.saturating_add(len);
        if read {
            i.consumed = i.consumed.saturating_add(len).min(i.received);
            i.last_progress = elapsed;
        }
    }

    /// The application consumed some of what it took (never more).
    fn consume(&mut self) {
        let s = self.pick_in();
        let b = self.script.byte();
        let elapsed = self.elapsed;
        let n = match self.inn.get_mut(&s) {
            Some(i) if i.open => {
                let unconsumed = i.taken.saturating_sub(i.consumed);
                let n = if b >= 128 {
                    unconsumed
                } else {
                    unconsumed.min(u64::from(b) * 16)
                };
                i.consumed = i.consumed.saturating_add(n).min(i.received);
                i.last_progress = elapsed;
                n
            }
            _ => u64::from(b),
        };
        self.b.consume(self.now(), s, n);
    }

    /// Closes a receiving stream: drained ones as the driver does, others abandoned.
    fn close_inbound(&mut self) {
        let s = self.pick_in();
        let b = self.script.byte();
        let Some(i) = self.inn.get_mut(&s) else {
            self.b.close_inbound(s);
            return;
        };
        let drained = i.total == Some(i.received) && i.taken == i.received;
        if !drained && !b.is_multiple_of(4) {
            return;
        }
        if i.open {
            i.open = false;
            if i.total == Some(i.received) {
                i.final_total = Some(i.received);
            }
            if !drained {
                self.cancelled.insert(s);
            }
        }
        self.b.close_inbound(s);
    }

    /// The link comes up with the chunk sizes the script picks (at most each side's own).
    fn connect_from_script(&mut self) {
        let b = self.script.byte();
        let c = self.script.byte();
        let for_a = if b.is_multiple_of(4) {
            1 + usize::from(c) % self.chunk_b
        } else {
            self.chunk_b
        };
        let for_b = if b % 8 == 1 {
            1 + usize::from(c) % self.chunk_a
        } else {
            self.chunk_a
        };
        self.connect(for_a, for_b);
    }

    /// Both BLOB_HELLOs arrived: each side adopts the other's chunk and connects.
    fn connect(&mut self, for_a: usize, for_b: usize) {
        self.chunk_for_a = for_a;
        self.chunk_for_b = for_b;
        self.a.set_peer_chunk(for_a);
        self.b.set_peer_chunk(for_b);
        self.a.connected();
        self.b.connected();
        for o in self.out.values_mut() {
            o.end_sent = false;
        }
        self.link_up = true;
    }

    /// The link drops with whatever was in flight.
    fn cut(&mut self) {
        self.a.disconnected();
        self.b.disconnected();
        self.a_to_b.clear();
        self.b_to_a.clear();
        self.a_cancels.clear();
        self.b_cancels.clear();
        self.link_up = false;
    }

    /// A `Violation` closed the link (as the blob driver does); a new one comes up at once.
    fn after_violation(&mut self) {
        if std::mem::take(&mut self.cut_due) {
            self.cut();
            self.connect(self.chunk_b, self.chunk_a);
        }
    }

    /// `handle_timeout` on both sides at the current virtual time.
    fn fire_timers(&mut self) {
        let now = self.now();
        for side in [Side::A, Side::B] {
            let streams = match side {
                Side::A => &mut self.a,
                Side::B => &mut self.b,
            };
            streams.handle_timeout(now);
            if let Some(next) = streams.poll_timeout() {
                assert!(
                    next > now,
                    "{side:?}: poll_timeout is {:?} after handle_timeout at {:?}: the driver would spin",
                    next.saturating_duration_since(self.origin),
                    self.elapsed
                );
            }
            for e in drain_events(streams) {
                let BlobEvent::Cancelled { stream, error } = &e else {
                    panic!("{side:?}: handle_timeout produced {e:?}");
                };
                assert_eq!(error.id(), ErrorId::BlobStreamIdleTimeout, "{e:?}");
                let last = match side {
                    Side::A => self
                        .out
                        .get(stream)
                        .filter(|o| o.open)
                        .map(|o| o.last_progress),
                    Side::B => self
                        .inn
                        .get(stream)
                        .filter(|i| i.open)
                        .map(|i| i.last_progress),
                };
                let Some(last) = last else {
                    panic!("{side:?}: idle timeout for stream {stream}, which is not open");
                };
                let idle_for = self.elapsed.saturating_sub(last);
                assert!(
                    idle_for >= self.idle,
                    "{side:?}: stream {stream} timed out after {idle_for:?} without progress (idle_timeout {:?})",
                    self.idle
                );
                self.closed_by_cancel(side, *stream);
            }
        }
    }

    /// `poll_transmit` on one side; checks what it wrote and puts it on the pipe.
    fn transmit(&mut self, side: Side, budget: usize) -> bool {
        let mut out = BytesMut::new();
        let wrote = match side {
            Side::A => self.a.poll_transmit(&mut out, budget),
            Side::B => self.b.poll_transmit(&mut out, budget),
        };
        assert_eq!(
            wrote,
            !out.is_empty(),
            "{side:?}: poll_transmit's result is wrong"
        );
        assert!(
            self.link_up || !wrote,
            "{side:?}: poll_transmit wrote {} bytes while disconnected",
            out.len()
        );
        self.check_transmit(side, &out, budget);
        match side {
            Side::A => self.a_to_b.pending.extend_from_slice(&out),
            Side::B => self.b_to_a.pending.extend_from_slice(&out),
        }
        wrote
    }

    /// An unlimited `poll_transmit` on one side, then one more that must write nothing.
    fn transmit_all(&mut self, side: Side) -> bool {
        let wrote = self.transmit(side, usize::MAX);
        let mut again = BytesMut::new();
        let more = match side {
            Side::A => self.a.poll_transmit(&mut again, usize::MAX),
            Side::B => self.b.poll_transmit(&mut again, usize::MAX),
        };
        assert!(
            !more && again.is_empty(),
            "{side:?}: {} bytes ready right after an unlimited poll_transmit",
            again.len()
        );
        wrote
    }

    /// Everything each side has, there and back.
    fn pump(&mut self) -> bool {
        let mut moved = self.transmit_all(Side::A);
        self.deliver(Side::B, None);
        moved |= self.transmit_all(Side::B);
        self.deliver(Side::A, None);
        moved
    }

    fn check_transmit(&mut self, side: Side, out: &[u8], budget: usize) {
        let limit = self.decode_limit(side.peer());
        let mut buf = BytesMut::from(out);
        let mut data_started = false;
        let mut last_data: Option<(usize, usize)> = None;
        while !buf.is_empty() {
            let before = buf.len();
            let f = match frame::decode(&mut buf, limit) {
                Ok(Some(Frame::Blob(f))) => f,
                Ok(Some(other)) => panic!("{side:?} wrote a non-blob frame {other:?}"),
                Ok(None) => panic!("{side:?}: poll_transmit ended in a partial frame"),
                Err(e) => panic!("{side:?} wrote a frame its peer cannot decode: {e}"),
            };
            let at = out.len().saturating_sub(before);
            let len = before.saturating_sub(buf.len());
            match (side, f) {
                (Side::A, BlobFrame::Cancel { stream, .. }) => {
                    assert!(!data_started, "A: a cancel after data in one poll_transmit");
                    assert!(
                        self.a_cancels.remove(&stream),
                        "A: BLOB_CANCEL for stream {stream}, which it did not cancel (or twice)"
                    );
                }
                (Side::B, BlobFrame::Cancel { stream, .. }) => {
                    assert!(
                        self.b_cancels.remove(&stream),
                        "B: BLOB_CANCEL for stream {stream}, which it did not cancel (or twice)"
                    );
                }
                (
                    Side::A,
                    BlobFrame::Data {
                        stream,
                        offset,
                        data,
                    },
                ) => {
                    data_started = true;
                    last_data = Some((at, len));
                    self.check_sent_data(stream, offset, &data);
                }
                (Side::A, BlobFrame::End { stream, total }) => {
                    data_started = true;
                    last_data = Some((at, len));
                    let Some(o) = self.out.get_mut(&stream).filter(|o| o.open) else {
                        panic!("A: BLOB_END for stream {stream}, which is not open");
                    };
                    assert!(
                        o.finish_called,
                        "A: BLOB_END for unfinished stream {stream}"
                    );
                    assert!(
                        o.credited,
                        "A: BLOB_END for stream {stream} before the receiver's first credit"
                    );
                    assert_eq!(
                        total, o.written,
                        "A: BLOB_END for stream {stream} with the wrong total"
                    );
                    o.end_sent = true;
                }
                (
                    Side::B,
                    BlobFrame::Credit {
                        stream,
                        received,
                        limit,
                    },
                ) => {
                    self.check_sent_credit(stream, received, limit);
                }
                (Side::B, BlobFrame::End { stream, total }) => {
                    let Some(i) = self.inn.get(&stream) else {
                        panic!("B: BLOB_END answer for stream {stream}, which it never had");
                    };
                    let holds = if i.open {
                        i.total == Some(total) && i.received == total
                    } else {
                        i.final_total == Some(total)
                    };
                    assert!(
                        holds,
                        "B: BLOB_END answer {total} for stream {stream}, which does not hold that end: {i:?}"
                    );
                }
                (side, f) => panic!("{side:?} wrote {f:?}"),
            }
        }
        if let Some((at, len)) = last_data {
            assert!(
                at < budget,
                "A: a {len}-byte data frame started at {at}, past the budget {budget}"
            );
        }
    }

    fn check_sent_data(&mut self, stream: u64, offset: u64, data: &[u8]) {
        let max_chunk = self.chunk_a.min(self.chunk_for_a.max(1));
        let Some(o) = self.out.get_mut(&stream).filter(|o| o.open) else {
            panic!("A: BLOB_DATA for stream {stream}, which is not open");
        };
        let len = data.len();
        let end = offset.saturating_add(len as u64);
        assert!(
            (1..=max_chunk).contains(&len),
            "A: BLOB_DATA of {len} bytes, chunk limit {max_chunk}"
        );
        assert!(
            end <= o.limit,
            "A: BLOB_DATA for stream {stream} up to {end}, past its credit {}",
            o.limit
        );
        assert!(
            end <= o.written,
            "A: BLOB_DATA for stream {stream} up to {end}, only {} written",
            o.written
        );
        if let Some(at) = blob_mismatch(stream, offset, data) {
            panic!("A: BLOB_DATA for stream {stream} carries a wrong byte at offset {at}");
        }
        o.sent_high = o.sent_high.max(end);
    }

    fn check_sent_credit(&mut self, stream: u64, received: u64, limit: u64) {
        let window = self.window;
        let Some(i) = self.inn.get_mut(&stream) else {
            panic!("B: BLOB_CREDIT for stream {stream}, which it never had");
        };
        if i.open {
            assert_eq!(
                received, i.received,
                "B: BLOB_CREDIT for stream {stream} misreports what arrived"
            );
            assert!(
                limit >= received && limit <= i.consumed.saturating_add(window),
                "B: BLOB_CREDIT for stream {stream} allows up to {limit}; consumed {}, window {window}",
                i.consumed
            );
            i.credit_limit = i.credit_limit.max(limit);
        } else {
            panic!("B: BLOB_CREDIT {received}/{limit} for stream {stream}, which is closed");
        }
    }

    fn decode_limit(&self, receiver: Side) -> u32 {
        let chunk = match receiver {
            Side::A => self.chunk_a,
            Side::B => self.chunk_b,
        };
        u32::try_from(chunk.saturating_add(frame::BLOB_DATA_FIXED_LEN)).unwrap_or(u32::MAX)
    }

    /// Delivers `n` pending bytes (all of them when `None`) to `to`, frame by frame.
    fn deliver(&mut self, to: Side, n: Option<usize>) {
        let limit = self.decode_limit(to);
        let pipe = match to {
            Side::B => &mut self.a_to_b,
            Side::A => &mut self.b_to_a,
        };
        let n = n.unwrap_or(usize::MAX).min(pipe.pending.len());
        let chunk = pipe.pending.split_to(n);
        pipe.arrived.extend_from_slice(&chunk);
        let mut arrived = std::mem::take(&mut pipe.arrived);
        loop {
            if self.cut_due {
                // The link is closing: the rest is never read.
                return;
            }
            let f = match frame::decode(&mut arrived, limit) {
                Ok(Some(Frame::Blob(f))) => f,
                Ok(Some(other)) => panic!("a non-blob frame on the pipe: {other:?}"),
                Ok(None) => break,
                Err(e) => panic!("a corrupt frame on the pipe to {to:?}: {e}"),
            };
            self.handle(to, f);
        }
        let pipe = match to {
            Side::B => &mut self.a_to_b,
            Side::A => &mut self.b_to_a,
        };
        pipe.arrived = arrived;
    }

    /// A hostile frame from the data, handed to either side.
    fn inject(&mut self) {
        let b = self.script.byte();
        let to = if b.is_multiple_of(2) {
            Side::A
        } else {
            Side::B
        };
        let stream = match self.script.byte() % 4 {
            0 => self.pick_out(),
            1 => self.pick_in(),
            2 => self
                .next_id
                .saturating_add(u64::from(self.script.byte() % 3)),
            _ => self.u64(),
        };
        let f = match b / 2 % 5 {
            0 => {
                let offset = self.hostile_u64(stream);
                let len = usize::from(self.script.u16()) % (BLOB_MAX_INJECTED + 1);
                let fill = self.script.byte();
                BlobFrame::Data {
                    stream,
                    offset,
                    data: Bytes::from(vec![fill; len]),
                }
            }
            1 => BlobFrame::End {
                stream,
                total: self.hostile_u64(stream),
            },
            2 => BlobFrame::Credit {
                stream,
                received: self.hostile_u64(stream),
                limit: self.hostile_u64(stream),
            },
            3 => {
                let code = WireCode(match self.script.byte() {
                    0 => u32::from_be_bytes([
                        self.script.byte(),
                        self.script.byte(),
                        self.script.byte(),
                        self.script.byte(),
                    ]),
                    c => u32::from(c),
                });
                let len = usize::from(self.script.byte() % 16);
                let reason = String::from_utf8_lossy(self.script.take(len)).into_owned();
                BlobFrame::Cancel {
                    stream,
                    code,
                    reason,
                }
            }
            _ => BlobFrame::Hello {
                version: self.script.u16(),
                epoch: self.u64(),
                max_chunk: u32::from(self.script.u16()),
            },
        };
        self.hostile = true;
        if !matches!(f, BlobFrame::Hello { .. }) {
            self.tainted.insert(stream);
        }
        self.handle(to, f);
    }

    fn u64(&mut self) -> u64 {
        let hi = u64::from(self.script.u16());
        let lo = u64::from(self.script.u16());
        match self.script.byte() % 4 {
            0 => u64::MAX.wrapping_sub(lo),
            1 => (hi << 48) | lo,
            _ => (hi << 16) | lo,
        }
    }

    /// An offset or length near one that matters for `stream`.
    fn hostile_u64(&mut self, stream: u64) -> u64 {
        let b = self.script.byte();
        let delta = u64::from(self.script.byte());
        let o = self.out.get(&stream);
        let i = self.inn.get(&stream);
        let base = match b % 8 {
            0 => 0,
            1 => i.map_or(0, |i| i.received),
            2 => o.map_or(0, |o| o.written),
            3 => o.map_or(0, |o| o.sent_high),
            4 => i.map_or(self.window, |i| i.consumed.saturating_add(self.window)),
            5 => i.map_or(0, |i| i.credit_limit),
            6 => u64::MAX,
            _ => return self.u64(),
        };
        if b & 8 == 0 {
            base.wrapping_add(delta)
        } else {
            base.wrapping_sub(delta)
        }
    }

    /// Hands one frame to a side and checks what it made of it against the account.
    fn handle(&mut self, to: Side, f: BlobFrame) {
        let now = self.now();
        let events = match to {
            Side::A => {
                self.a.handle_frame(now, f.clone());
                drain_events(&mut self.a)
            }
            Side::B => {
                self.b.handle_frame(now, f.clone());
                drain_events(&mut self.b)
            }
        };
        let violation = events.iter().find_map(|e| match e {
            BlobEvent::Violation { stream, error } => Some((*stream, error.clone())),
            _ => None,
        });
        let outcome = |events: &[BlobEvent]| format!("{to:?} handled {f:?}: {events:?}");
        match (to, &f) {
            (_, BlobFrame::Hello { .. }) => {
                assert!(
                    matches!(violation, Some((None, _))) && events.len() == 1,
                    "{}",
                    outcome(&events)
                );
            }
            (_, BlobFrame::Cancel { stream, .. }) => {
                let count = match to {
                    Side::A => &mut self.cancels_to_a,
                    Side::B => &mut self.cancels_to_b,
                };
                *count = count.saturating_add(1);
                let over = *count > self.cancel_budget;
                let open = match to {
                    Side::A => self.out.get(stream).is_some_and(|o| o.open),
                    Side::B => self.inn.get(stream).is_some_and(|i| i.open),
                };
                match &violation {
                    Some((None, _)) => assert!(over, "{}", outcome(&events)),
                    Some(_) => panic!("{}", outcome(&events)),
                    None if open => assert!(
                        matches!(events.as_slice(), [BlobEvent::Cancelled { stream: s, .. }] if s == stream),
                        "{}",
                        outcome(&events)
                    ),
                    None => assert!(events.is_empty(), "{}", outcome(&events)),
                }
            }
            (
                Side::B,
                BlobFrame::Data {
                    stream,
                    offset,
                    data,
                },
            ) => {
                self.b_data(*stream, *offset, data.len() as u64, &events, &violation);
            }
            (Side::B, BlobFrame::End { stream, total }) => {
                self.b_end(*stream, *total, &events, &violation);
            }
            (
                Side::A,
                BlobFrame::Credit {
                    stream,
                    received,
                    limit,
                },
            ) => {
                self.a_credit(*stream, *received, *limit, &events, &violation);
            }
            (Side::A, BlobFrame::End { stream, total }) => {
                self.a_end(*stream, *total, &events, &violation);
            }
            // Frames for the direction this side does not have: late ones for a stream it
            // had are ignored, others are violations.
            (Side::A, BlobFrame::Data { stream, .. }) => {
                let known = self.out.get(stream).is_some_and(|o| !o.open);
                self.expect_unknown(known, &events, &violation, || outcome(&events));
            }
            (Side::B, BlobFrame::Credit { stream, .. }) => {
                let known = self.inn.get(stream).is_some_and(|i| !i.open);
                self.expect_unknown(known, &events, &violation, || outcome(&events));
            }
        }
        for e in events {
            self.on_event(to, e, &f);
        }
    }

    fn expect_unknown(
        &self,
        recent: bool,
        events: &[BlobEvent],
        violation: &Option<(Option<u64>, crate::Error)>,
        outcome: impl Fn() -> String,
    ) {
        if recent {
            assert!(
                events.is_empty(),
                "a late frame was not ignored: {}",
                outcome()
            );
        } else {
            assert!(
                matches!(violation, Some((None, _))) && events.len() == 1,
                "a frame for an unknown stream: {}",
                outcome()
            );
        }
    }

    fn b_data(
        &mut self,
        s: u64,
        offset: u64,
        len: u64,
        events: &[BlobEvent],
        violation: &Option<(Option<u64>, crate::Error)>,
    ) {
        let window = self.window;
        let elapsed = self.elapsed;
        let Some(i) = self.inn.get_mut(&s).filter(|i| i.open) else {
            let known = self.inn.contains_key(&s);
            self.expect_unknown(known, events, violation, || {
                format!("B handled BLOB_DATA {s}@{offset}+{len}: {events:?}")
            });
            return;
        };
        let end = offset.saturating_add(len);
        let within_end = i.total.is_none_or(|t| end <= t);
        let acceptable = offset <= i.received && end <= i.credit_limit.max(window) && within_end;
        let what = || {
            format!(
                "B: BLOB_DATA {s}@{offset}+{len} (received {}, consumed {}, credit seen {}, total {:?}) gave {events:?}",
                i.received, i.consumed, i.credit_limit, i.total
            )
        };
        match (events, violation) {
            ([BlobEvent::Readable(r)], None) if *r == s => {
                assert!(
                    offset <= i.received && end > i.received && within_end,
                    "accepted: {}",
                    what()
                );
                assert!(
                    end.saturating_sub(i.consumed) <= window,
                    "more than the window unconsumed: {}",
                    what()
                );
                i.received = end;
                i.last_progress = elapsed;
            }
            ([], None) => assert!(end <= i.received, "ignored: {}", what()),
            ([_], Some((Some(v), _))) if *v == s => {
                assert!(!acceptable, "a violation for acceptable data: {}", what());
            }
            _ => panic!("unexpected: {}", what()),
        }
    }

    fn b_end(
        &mut self,
        s: u64,
        total: u64,
        events: &[BlobEvent],
        violation: &Option<(Option<u64>, crate::Error)>,
    ) {
        let elapsed = self.elapsed;
        let Some(i) = self.inn.get_mut(&s).filter(|i| i.open) else {
            let known = self.inn.contains_key(&s);
            self.expect_unknown(known, events, violation, || {
                format!("B handled BLOB_END {s} {total}: {events:?}")
            });
            return;
        };
        let bad = total < i.received || i.total.is_some_and(|t| t != total);
        let what = || {
            format!(
                "B: BLOB_END {s} {total} (received {}, total {:?}) gave {events:?}",
                i.received, i.total
            )
        };
        if bad {
            assert!(
                matches!(violation, Some((Some(v), _)) if *v == s) && events.len() == 1,
                "{}",
                what()
            );
            return;
        }
        let complete = total == i.received;
        let ok = if complete {
            matches!(events, [BlobEvent::Readable(r)] if *r == s)
        } else {
            events.is_empty()
        };
        assert!(ok, "{}", what());
        i.total = Some(total);
        i.last_progress = elapsed;
    }

    fn a_credit(
        &mut self,
        s: u64,
        received: u64,
        limit: u64,
        events: &[BlobEvent],
        violation: &Option<(Option<u64>, crate::Error)>,
    ) {
        let elapsed = self.elapsed;
        let Some(o) = self.out.get_mut(&s).filter(|o| o.open) else {
            let known = self.out.contains_key(&s);
            self.expect_unknown(known, events, violation, || {
                format!("A handled BLOB_CREDIT {s} {received}/{limit}: {events:?}")
            });
            return;
        };
        let what =
            |o: &OutModel| format!("A: BLOB_CREDIT {s} {received}/{limit} ({o:?}) gave {events:?}");
        if received > o.sent_high {
            assert!(
                matches!(violation, Some((Some(v), _)) if *v == s) && events.len() == 1,
                "{}",
                what(o)
            );
            return;
        }
        assert!(violation.is_none(), "{}", what(o));
        o.acked = o.acked.max(received);
        o.limit = o.limit.max(limit);
        o.credited = true;
        o.last_progress = elapsed;
        assert!(
            events
                .iter()
                .all(|e| matches!(e, BlobEvent::Writable(x) if *x == s)),
            "a credit never completes a stream: {}",
            what(o)
        );
    }

    /// A BLOB_END answer reaches the sender.
    fn a_end(
        &mut self,
        s: u64,
        total: u64,
        events: &[BlobEvent],
        violation: &Option<(Option<u64>, crate::Error)>,
    ) {
        let Some(o) = self.out.get(&s).filter(|o| o.open) else {
            let known = self.out.contains_key(&s);
            self.expect_unknown(known, events, violation, || {
                format!("A handled BLOB_END {s} {total}: {events:?}")
            });
            return;
        };
        let what = || format!("A: BLOB_END answer {s} {total} ({o:?}) gave {events:?}");
        if o.finish_called && total == o.written {
            assert!(
                matches!(events, [BlobEvent::Finished(x)] if *x == s),
                "{}",
                what()
            );
        } else {
            assert!(
                matches!(violation, Some((Some(v), _)) if *v == s) && events.len() == 1,
                "{}",
                what()
            );
        }
    }

    /// What every event means for the account; `f` is the frame that caused it.
    fn on_event(&mut self, side: Side, e: BlobEvent, f: &BlobFrame) {
        match (side, e) {
            (Side::A, BlobEvent::Writable(s)) => {
                assert!(
                    self.out.get(&s).is_some_and(|o| o.open),
                    "A: Writable({s}) for a stream that is not open"
                );
            }
            (Side::A, BlobEvent::Finished(s)) => {
                let o = self.out.get_mut(&s).expect("checked in a_end");
                o.open = false;
                o.finished_event = true;
            }
            (Side::B, BlobEvent::Readable(_)) => {}
            (side, BlobEvent::Cancelled { stream, .. }) => {
                let open = match side {
                    Side::A => self
                        .out
                        .get_mut(&stream)
                        .map(|o| std::mem::take(&mut o.open)),
                    Side::B => self
                        .inn
                        .get_mut(&stream)
                        .map(|i| std::mem::take(&mut i.open)),
                };
                assert_eq!(
                    open,
                    Some(true),
                    "{side:?}: Cancelled({stream}) for a stream that is not open"
                );
                self.cancelled.insert(stream);
            }
            (side, BlobEvent::Violation { stream, error }) => {
                let budget = matches!(f, BlobFrame::Cancel { .. }) && stream.is_none();
                assert!(
                    self.hostile || budget,
                    "{side:?}: a Violation from honest traffic: {error} (after {f:?})"
                );
                // As the blob driver: cancel the stream it names and close the link.
                if let Some(s) = stream {
                    match side {
                        Side::A => self
                            .a
                            .cancel(s, ErrorId::ProtocolViolation, error.message()),
                        Side::B => self
                            .b
                            .cancel(s, ErrorId::ProtocolViolation, error.message()),
                    }
                    self.closed_by_cancel(side, s);
                }
                self.cut_due = true;
            }
            (side, e) => panic!("{side:?} produced {e:?}"),
        }
    }

    /// Invariants that hold between any two operations.
    fn check(&self) {
        assert_eq!(self.a.open_streams(), self.open_out(), "A: open streams");
        assert_eq!(self.b.open_streams(), self.open_in(), "B: open streams");
        assert_eq!(
            self.a.has_outbound(),
            self.open_out() > 0,
            "A: has_outbound"
        );
        assert!(!self.b.has_outbound(), "B: has_outbound");
        for (s, o) in &self.out {
            let acked = self.a.acked(*s);
            if o.open {
                assert_eq!(acked, Some(o.acked), "A: acked({s})");
                assert!(
                    o.written.saturating_sub(o.acked) <= self.window,
                    "A: stream {s} holds {} unacknowledged bytes",
                    o.written.saturating_sub(o.acked)
                );
            } else {
                assert_eq!(acked, None, "A: acked({s}) of a closed stream");
            }
        }
        for (s, i) in &self.inn {
            let (drained, complete) = (self.b.is_drained(*s), self.b.is_complete(*s));
            if !i.open {
                assert!(
                    !drained && !complete,
                    "B: closed stream {s} is drained/complete"
                );
                continue;
            }
            assert!(
                i.received.saturating_sub(i.consumed) <= self.window,
                "B: stream {s} holds {} bytes received but not consumed, window {}",
                i.received.saturating_sub(i.consumed),
                self.window
            );
            assert!(
                i.taken <= i.received && i.consumed <= i.taken,
                "B: stream {s}: {i:?}"
            );
            let all_taken = i.taken == i.received;
            assert_eq!(
                drained,
                all_taken && i.total == Some(i.received),
                "B: is_drained({s}) with {i:?}"
            );
            assert_eq!(
                complete,
                all_taken && i.total == Some(i.consumed),
                "B: is_complete({s}) with {i:?}"
            );
        }
    }

    /// The link comes up and both sides exchange everything, the receiver reading eagerly and
    /// closing drained streams as the driver does, until nothing moves. Then every stream
    /// the script left alone must have arrived whole, and finished ones must have completed.
    fn settle(&mut self) {
        let mut quiet = false;
        for _ in 0..BLOB_SETTLE_ROUNDS {
            if !self.link_up {
                self.connect(self.chunk_b, self.chunk_a);
            }
            // Bytes still on the pipes move this round too.
            let mut moved = !self.a_to_b.is_empty() || !self.b_to_a.is_empty();
            moved |= self.transmit_all(Side::A);
            self.deliver(Side::B, None);
            self.after_violation();
            let open: Vec<u64> = self
                .inn
                .iter()
                .filter(|(_, i)| i.open)
                .map(|(s, _)| *s)
                .collect();
            for s in open {
                while self
                    .inn
                    .get(&s)
                    .is_some_and(|i| i.open && i.taken < i.received)
                {
                    self.take(s, true);
                }
                // What the script took without consuming is consumed now.
                let elapsed = self.elapsed;
                if let Some(i) = self.inn.get_mut(&s) {
                    let n = i.taken.saturating_sub(i.consumed);
                    i.consumed = i.taken;
                    i.last_progress = elapsed;
                    self.b.consume(self.now(), s, n);
                }
                let drained = self
                    .inn
                    .get(&s)
                    .is_some_and(|i| i.total == Some(i.received));
                if drained {
                    if let Some(i) = self.inn.get_mut(&s) {
                        i.open = false;
                        i.final_total = Some(i.received);
                    }
                    self.b.close_inbound(s);
                }
            }
            moved |= self.transmit_all(Side::B);
            self.deliver(Side::A, None);
            self.after_violation();
            self.check();
            if !moved {
                quiet = true;
                break;
            }
        }
        if !quiet {
            assert!(
                self.hostile,
                "honest traffic still moving after {BLOB_SETTLE_ROUNDS} rounds"
            );
            return;
        }
        for (s, o) in &self.out {
            let Some(i) = self.inn.get(s) else {
                // b never opened it: nothing could be sent.
                continue;
            };
            if !self.honest_stream(*s) {
                continue;
            }
            if o.finished_event && i.total.is_none() {
                panic!(
                    "stream {s}: the sender reported Finished, but the receiver never learned the end ({} of {} bytes received, BLOB_END lost)",
                    i.received, o.written
                );
            }
            assert_eq!(
                i.taken, o.written,
                "stream {s}: the receiver took {} of {} written bytes ({o:?}, {i:?})",
                i.taken, o.written
            );
            if o.finish_called {
                assert!(o.finished_event, "stream {s} never Finished: {o:?}, {i:?}");
                assert_eq!(
                    i.final_total,
                    Some(o.written),
                    "stream {s} was not drained with its end: {o:?}, {i:?}"
                );
            }
        }
    }
}

impl Side {
    fn peer(self) -> Side {
        match self {
            Side::A => Side::B,
            Side::B => Side::A,
        }
    }
}

/// Arbitrary text as a routes file (feature `file-resolver`): parsing never panics, and a file
/// that parses keeps the parser's promises — within the bounds, no taberna without a candidate
/// or listed twice, and the table built from it answers for exactly the tabernas listed.
#[cfg(feature = "file-resolver")]
pub fn routes_file(data: &[u8]) {
    use crate::RoutesFile;
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(file) = RoutesFile::parse(text) else {
        return;
    };
    assert!(file.tabernas.len() <= RoutesFile::MAX_TABERNAS);
    assert!(file.domus.len() <= RoutesFile::MAX_DOMUS);
    let mut seen = BTreeSet::new();
    for (taberna, candidates) in &file.tabernas {
        assert!(seen.insert(taberna.0), "{taberna} listed twice");
        assert!(!candidates.is_empty(), "{taberna} without a candidate");
        assert!(candidates.len() <= RoutesFile::MAX_CANDIDATES);
    }
    let table = file.table();
    assert_eq!(table.len(), file.tabernas.len());
    for (taberna, candidates) in &file.tabernas {
        assert_eq!(
            table.candidates(*taberna).map(|c| c.len()),
            Some(candidates.len())
        );
    }
    for (id, addr) in &file.domus {
        assert_eq!(table.domus_addr(id), Some(addr));
    }
}

fn drain_events(streams: &mut BlobStreams) -> Vec<BlobEvent> {
    std::iter::from_fn(|| streams.poll_event()).collect()
}

/// Replays the fuzz corpus and the minimized crash inputs through the entry points above, so
/// plain `cargo test` catches a regression without cargo-fuzz: every file under
/// `fuzz/corpus/<target>/` and `fuzz/regressions/<target>/` (see `fuzz/README.md`).
#[cfg(test)]
mod replay {
    use std::path::{Path, PathBuf};

    /// Every regular file under `fuzz/<dir>/<target>/`, except dotfiles such as `.gitkeep`.
    fn inputs(dir: &str, target: &str) -> Vec<PathBuf> {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fuzz")
            .join(dir)
            .join(target);
        let Ok(entries) = std::fs::read_dir(&root) else {
            return Vec::new();
        };
        let mut files: Vec<PathBuf> = entries
            .map(|e| e.expect("read fuzz directory entry").path())
            .filter(|p| p.is_file())
            .filter(|p| {
                !p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with('.'))
            })
            .collect();
        files.sort();
        files
    }

    /// Runs `run` on every input of `target` and fails naming every file that panics (each
    /// panic message is printed above by the panic hook).
    fn replay(target: &str, run: fn(&[u8])) -> usize {
        let mut count = 0;
        let mut failed = Vec::new();
        for dir in ["corpus", "regressions"] {
            for path in inputs(dir, target) {
                // A running fuzzer may replace corpus files while this reads them.
                let data = match std::fs::read(&path) {
                    Ok(data) => data,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => panic!("{}: {e}", path.display()),
                };
                if std::panic::catch_unwind(|| run(&data)).is_err() {
                    failed.push(path.display().to_string());
                }
                count += 1;
            }
        }
        assert!(failed.is_empty(), "{target} panics on: {failed:#?}");
        count
    }

    #[test]
    fn frame_decoder_corpus_and_regressions() {
        let n = replay("frame_decoder", super::frame_decoder);
        assert!(n > 0, "no frame_decoder inputs under fuzz/");
    }

    #[test]
    fn session_input_corpus_and_regressions() {
        let n = replay("session_input", super::session_input);
        assert!(n > 0, "no session_input inputs under fuzz/");
    }

    #[test]
    #[cfg(feature = "file-resolver")]
    fn routes_file_corpus_and_regressions() {
        let n = replay("routes_file", super::routes_file);
        assert!(n > 0, "no routes_file inputs under fuzz/");
    }

    #[test]
    fn blob_input_corpus_and_regressions() {
        let n = replay("blob_input", super::blob_input);
        assert!(n > 0, "no blob_input inputs under fuzz/");
    }
}
