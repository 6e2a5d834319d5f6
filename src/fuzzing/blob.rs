//! The `blob_input` fuzz target: two sans-IO
//! [`BlobStreams`](crate::a1_callis::blob::BlobStreams) back to back on a [`BlobPair`] (its
//! pipes, partial deliveries, cuts, timers and transfer checks), against an account of every
//! stream kept here from the frames handed over and the events that come back.
//!
//! Longer than ~800 lines because the account is one piece: what each frame and event means
//! for a stream on either side, and the properties checked against it, read together.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::Script;
use crate::ErrorId;
use crate::a1_callis::blob::{BlobConfig, BlobEvent};
use crate::a1_callis::codes::WireCode;
use crate::a1_callis::frame::{BlobFrame, Frame};
use crate::testing::pair::{BlobPair, Side, WireFrame};

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

/// Drives two [`BlobStreams`](crate::a1_callis::blob::BlobStreams) connected by the pipes of a
/// [`BlobPair`]: `a` only sends, `b` only receives. The first five bytes of `data` choose the limits (each side's `chunk_len` in
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
/// that come back. Checked, whatever the script does (the pair checks what the first two
/// points say of every transmit, and the anti-spin rule of every timer):
/// * nothing in `BlobStreams` panics, and what either side transmits decodes cleanly under
///   the receiver's frame limit (`chunk_len` + 16), cancels first, credits before data;
/// * `poll_transmit` writes nothing while disconnected, returns whether it wrote, stops once
///   the budget is reached (the last data frame or sender's BLOB_END starts below it), and
///   after an unlimited call the next one writes nothing;
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

struct BlobHarness<'a> {
    script: Script<'a>,
    /// a only sends, b only receives.
    pair: BlobPair,
    chunk_a: usize,
    chunk_b: usize,
    window: u64,
    max_streams: usize,
    idle: Duration,
    cancel_budget: u32,
    /// When the pair was built: stream progress is kept as time since then.
    origin: Instant,
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
        let pair = BlobPair::with_configs(config(chunk_a), config(chunk_b));
        Self {
            script,
            origin: pair.now,
            pair,
            chunk_a,
            chunk_b,
            window,
            max_streams,
            idle,
            cancel_budget,
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
        }
    }

    fn now(&self) -> Instant {
        self.pair.now
    }

    /// Virtual time since the start.
    fn elapsed(&self) -> Duration {
        self.pair.now.saturating_duration_since(self.origin)
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
                let result = self.pair.a.finish(s);
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
                if !self.pair.is_up() {
                    self.connect_from_script();
                }
            }
            22 => {
                let ms = u64::from(self.script.byte()) * 40;
                self.pair.now += Duration::from_millis(ms);
                self.fire_timers();
            }
            23 => {
                // As a driver does: sleep until the earliest poll_timeout.
                let next = [self.pair.a.poll_timeout(), self.pair.b.poll_timeout()]
                    .into_iter()
                    .flatten()
                    .min();
                if let Some(at) = next {
                    self.pair.now = self.pair.now.max(at);
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
        let result = self.pair.a.open_outbound(self.now(), s);
        assert_eq!(result.is_ok(), fits, "open_outbound({s}): {result:?}");
        if let Err(e) = result {
            assert_eq!(e.id(), ErrorId::BlobBufferFull, "{e}");
            return;
        }
        self.out.insert(
            s,
            OutModel {
                open: true,
                last_progress: self.elapsed(),
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
        let result = self.pair.b.open_inbound(self.now(), s);
        assert_eq!(result.is_ok(), fits, "open_inbound({s}): {result:?}");
        if let Err(e) = result {
            assert_eq!(e.id(), ErrorId::BlobBufferFull, "{e}");
            return;
        }
        self.inn.insert(
            s,
            InModel {
                open: true,
                last_progress: self.elapsed(),
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
        let result = self
            .pair
            .a
            .write(self.now(), s, &blob_bytes(s, offset, len));
        let window = self.window;
        let elapsed = self.elapsed();
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
            Side::A => self.pair.a.cancel(s, error, "fuzz: the sender gave up"),
            Side::B => self.pair.b.cancel(s, error, "fuzz: the receiver gave up"),
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
            self.pair.b.read(self.now(), s)
        } else {
            self.pair.b.take(s)
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
        let elapsed = self.elapsed();
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
        let elapsed = self.elapsed();
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
        self.pair.b.consume(self.now(), s, n);
    }

    /// Closes a receiving stream: drained ones as the driver does, others abandoned.
    fn close_inbound(&mut self) {
        let s = self.pick_in();
        let b = self.script.byte();
        let Some(i) = self.inn.get_mut(&s) else {
            self.pair.b.close_inbound(s);
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
        self.pair.b.close_inbound(s);
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
        self.pair.connect(for_a, for_b);
        for o in self.out.values_mut() {
            o.end_sent = false;
        }
    }

    /// The link drops with whatever was in flight.
    fn cut(&mut self) {
        self.pair.disconnect();
        self.a_cancels.clear();
        self.b_cancels.clear();
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
        for side in [Side::A, Side::B] {
            for e in self.pair.fire_timers(side) {
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
                let idle_for = self.elapsed().saturating_sub(last);
                assert!(
                    idle_for >= self.idle,
                    "{side:?}: stream {stream} timed out after {idle_for:?} without progress (idle_timeout {:?})",
                    self.idle
                );
                self.closed_by_cancel(side, *stream);
            }
        }
    }

    /// `poll_transmit` on one side with `budget`; checks what it wrote (on the pipe now).
    fn transmit(&mut self, side: Side, budget: usize) -> bool {
        let frames = self.pair.transmit(side, budget);
        self.check_transmit(side, &frames, budget)
    }

    /// An unlimited `poll_transmit` on one side, then one more that must write nothing.
    fn transmit_all(&mut self, side: Side) -> bool {
        let frames = self.pair.transmit_all(side);
        self.check_transmit(side, &frames, usize::MAX)
    }

    /// Everything each side has, there and back.
    fn pump(&mut self) -> bool {
        let mut moved = self.transmit_all(Side::A);
        self.deliver(Side::B, None);
        moved |= self.transmit_all(Side::B);
        self.deliver(Side::A, None);
        moved
    }

    /// What one `poll_transmit` wrote, against the account (the pair checked the framing,
    /// the order of cancels, the chunk limits and that data starts below the budget);
    /// whether it wrote anything.
    fn check_transmit(&mut self, side: Side, frames: &[WireFrame], budget: usize) -> bool {
        for WireFrame { at, len, frame } in frames {
            let (at, len) = (*at, *len);
            match (side, frame.clone()) {
                (Side::A, BlobFrame::Cancel { stream, .. }) => {
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
                    self.check_sent_data(stream, offset, &data);
                }
                (Side::A, BlobFrame::End { stream, total }) => {
                    assert!(
                        at < budget,
                        "A: a {len}-byte BLOB_END started at {at}, past the budget {budget}"
                    );
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
        !frames.is_empty()
    }

    fn check_sent_data(&mut self, stream: u64, offset: u64, data: &[u8]) {
        let Some(o) = self.out.get_mut(&stream).filter(|o| o.open) else {
            panic!("A: BLOB_DATA for stream {stream}, which is not open");
        };
        let end = offset.saturating_add(data.len() as u64);
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

    /// Delivers `n` pending bytes (all of them when `None`) to `to`, frame by frame.
    fn deliver(&mut self, to: Side, n: Option<usize>) {
        self.pair.arrive(to, n.unwrap_or(usize::MAX));
        // Once the link is closing, the rest is never read (the cut drops it).
        while !self.cut_due {
            let Some(f) = self.pair.next_frame(to) else {
                break;
            };
            let Frame::Blob(f) = f else {
                panic!("a non-blob frame on the pipe: {f:?}");
            };
            self.handle(to, f);
        }
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
        let events = self.pair.hand(to, f.clone());
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
        let elapsed = self.elapsed();
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
        let elapsed = self.elapsed();
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
        let elapsed = self.elapsed();
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
                        Side::A => {
                            self.pair
                                .a
                                .cancel(s, ErrorId::ProtocolViolation, error.message())
                        }
                        Side::B => {
                            self.pair
                                .b
                                .cancel(s, ErrorId::ProtocolViolation, error.message())
                        }
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
        assert_eq!(
            self.pair.a.open_streams(),
            self.open_out(),
            "A: open streams"
        );
        assert_eq!(
            self.pair.b.open_streams(),
            self.open_in(),
            "B: open streams"
        );
        assert_eq!(
            self.pair.a.has_outbound(),
            self.open_out() > 0,
            "A: has_outbound"
        );
        assert!(!self.pair.b.has_outbound(), "B: has_outbound");
        for (s, o) in &self.out {
            let acked = self.pair.a.acked(*s);
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
            let (drained, complete) = (self.pair.b.is_drained(*s), self.pair.b.is_complete(*s));
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
            if !self.pair.is_up() {
                self.connect(self.chunk_b, self.chunk_a);
            }
            // Bytes still on the pipes move this round too.
            let mut moved = self.pair.has_bytes_in_transit();
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
                let elapsed = self.elapsed();
                if let Some(i) = self.inn.get_mut(&s) {
                    let n = i.taken.saturating_sub(i.consumed);
                    i.consumed = i.taken;
                    i.last_progress = elapsed;
                    self.pair.b.consume(self.now(), s, n);
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
                    self.pair.b.close_inbound(s);
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
