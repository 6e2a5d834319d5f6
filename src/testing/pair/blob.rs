//! [`BlobPair`]: two blob state machines back to back (see the [parent module](super)).

use std::time::Instant;

use bytes::{Bytes, BytesMut};

use super::Side;
use crate::a1_callis::blob::{BlobConfig, BlobEvent, BlobStreams};
use crate::a1_callis::frame::{self, BlobFrame, Frame};

/// One frame a blob side wrote in one `poll_transmit`: where it starts in what that call
/// wrote, its length on the wire, and the frame.
#[derive(Debug, Clone)]
pub struct WireFrame {
    /// Its offset in the bytes of that `poll_transmit`.
    pub at: usize,
    /// Its length on the wire.
    pub len: usize,
    /// The frame.
    pub frame: BlobFrame,
}

/// Two blob state machines back to back on a virtual clock. What a side writes waits on a
/// pipe (`in_flight` from a to b, `in_flight_back` from b to a) until it arrives, whole or in
/// part ([`BlobPair::arrive`]); arrived bytes are decoded frame by frame under the receiver's
/// frame limit (its `chunk_len` plus the data frame's fixed part) and handed over.
/// [`BlobPair::deliver`] does all of that both ways at once.
pub struct BlobPair {
    /// The sending side.
    pub a: BlobStreams,
    /// The receiving side.
    pub b: BlobStreams,
    /// The virtual clock.
    pub now: Instant,
    /// a's events so far (those [`BlobPair::deliver`] collected).
    pub a_events: Vec<BlobEvent>,
    /// b's events so far (those [`BlobPair::deliver`] collected).
    pub b_events: Vec<BlobEvent>,
    /// Bytes a wrote that have not reached b yet (dropped by a cut). A test may put frames
    /// here by hand: blob frames and skippable ones, as the blob driver hands them over.
    pub in_flight: BytesMut,
    /// Bytes b wrote that have not reached a yet (dropped by a cut).
    pub in_flight_back: BytesMut,
    /// Bytes that reached b (a) but do not make a whole frame yet.
    partial_at_b: BytesMut,
    partial_at_a: BytesMut,
    /// Each side's own `chunk_len`.
    chunk_a: usize,
    chunk_b: usize,
    /// The chunk each side adopted from the other's BLOB_HELLO on the current callis.
    peer_chunk_of_a: usize,
    peer_chunk_of_b: usize,
    link_up: bool,
}

impl BlobPair {
    /// Both sides connected with `config`.
    pub fn new(config: BlobConfig) -> Self {
        Self::with_configs(config.clone(), config)
    }

    /// Both sides connected, each with its own configuration and adopting the other's
    /// `chunk_len`.
    pub fn with_configs(a: BlobConfig, b: BlobConfig) -> Self {
        let (chunk_a, chunk_b) = (a.chunk_len, b.chunk_len);
        let mut p = Self {
            a: BlobStreams::new(a),
            b: BlobStreams::new(b),
            now: Instant::now(),
            a_events: Vec::new(),
            b_events: Vec::new(),
            in_flight: BytesMut::new(),
            in_flight_back: BytesMut::new(),
            partial_at_b: BytesMut::new(),
            partial_at_a: BytesMut::new(),
            chunk_a,
            chunk_b,
            peer_chunk_of_a: chunk_b,
            peer_chunk_of_b: chunk_a,
            link_up: false,
        };
        p.connect(chunk_b, chunk_a);
        p
    }

    fn side_mut(&mut self, side: Side) -> &mut BlobStreams {
        match side {
            Side::A => &mut self.a,
            Side::B => &mut self.b,
        }
    }

    /// A blob callis comes up: both BLOB_HELLOs arrived, a adopts `for_a` as the largest
    /// chunk b accepts and b adopts `for_b`.
    pub fn connect(&mut self, for_a: usize, for_b: usize) {
        self.peer_chunk_of_a = for_a;
        self.peer_chunk_of_b = for_b;
        self.a.set_peer_chunk(for_a);
        self.b.set_peer_chunk(for_b);
        self.a.connected();
        self.b.connected();
        self.link_up = true;
    }

    /// The blob callis drops with whatever was in flight either way.
    pub fn disconnect(&mut self) {
        self.a.disconnected();
        self.b.disconnected();
        self.in_flight.clear();
        self.in_flight_back.clear();
        self.partial_at_a.clear();
        self.partial_at_b.clear();
        self.link_up = false;
    }

    /// The blob callis drops with whatever was in flight; a new one comes up, each side
    /// adopting the other's full chunk.
    pub fn cut(&mut self) {
        self.disconnect();
        self.connect(self.chunk_b, self.chunk_a);
    }

    /// Whether a blob callis is up.
    pub fn is_up(&self) -> bool {
        self.link_up
    }

    /// Whether bytes are on their way either way: written and not handed over yet, whole
    /// frames or not.
    pub fn has_bytes_in_transit(&self) -> bool {
        !(self.in_flight.is_empty()
            && self.in_flight_back.is_empty()
            && self.partial_at_a.is_empty()
            && self.partial_at_b.is_empty())
    }

    /// Opens `stream` from a to b (and b's first credit).
    ///
    /// # Panics
    /// When either side refuses the stream.
    pub fn open(&mut self, stream: u64) {
        self.a.open_outbound(self.now, stream).expect("open out");
        self.b.open_inbound(self.now, stream).expect("open in");
        // The receiver's first credit opens the window.
        self.deliver();
    }

    /// a writes at most `budget` bytes; they wait in `in_flight`.
    ///
    /// # Panics
    /// As [`transmit`](Self::transmit).
    pub fn a_transmit(&mut self, budget: usize) -> bool {
        !self.transmit(Side::A, budget).is_empty()
    }

    /// One `poll_transmit` of `side` with `budget`; what it wrote waits on its pipe, and is
    /// returned frame by frame.
    ///
    /// # Panics
    /// When the call breaks one of the pair's checks (see the module docs): it misreports
    /// whether it wrote, writes while the callis is down, writes bytes the other side cannot
    /// decode or a frame the blob callis does not carry, a cancel after another frame, a data
    /// chunk that is empty or over either side's chunk limit, or one starting at or past
    /// `budget`.
    pub fn transmit(&mut self, side: Side, budget: usize) -> Vec<WireFrame> {
        let mut out = BytesMut::new();
        let wrote = self.side_mut(side).poll_transmit(&mut out, budget);
        assert_eq!(
            wrote,
            !out.is_empty(),
            "{side:?}: poll_transmit returned {wrote} after writing {} bytes",
            out.len()
        );
        assert!(
            self.link_up || !wrote,
            "{side:?}: poll_transmit wrote {} bytes while disconnected",
            out.len()
        );
        let frames = self.check_written(side, &out, budget);
        match side {
            Side::A => self.in_flight.extend_from_slice(&out),
            Side::B => self.in_flight_back.extend_from_slice(&out),
        }
        frames
    }

    /// An unlimited [`transmit`](Self::transmit), after which the side has nothing more.
    ///
    /// # Panics
    /// As `transmit`, and when a second call right after it writes anything.
    pub fn transmit_all(&mut self, side: Side) -> Vec<WireFrame> {
        let frames = self.transmit(side, usize::MAX);
        let mut again = BytesMut::new();
        let more = self.side_mut(side).poll_transmit(&mut again, usize::MAX);
        assert!(
            !more && again.is_empty(),
            "{side:?}: {} bytes ready right after an unlimited poll_transmit",
            again.len()
        );
        frames
    }

    /// The frame limit of `receiver`: its chunk plus the data frame's fixed part.
    fn frame_limit(&self, receiver: Side) -> u32 {
        let chunk = match receiver {
            Side::A => self.chunk_a,
            Side::B => self.chunk_b,
        };
        u32::try_from(chunk.saturating_add(frame::BLOB_DATA_FIXED_LEN)).unwrap_or(u32::MAX)
    }

    fn check_written(&self, side: Side, out: &[u8], budget: usize) -> Vec<WireFrame> {
        let limit = self.frame_limit(side.peer());
        let max_chunk = match side {
            Side::A => self.chunk_a.min(self.peer_chunk_of_a.max(1)),
            Side::B => self.chunk_b.min(self.peer_chunk_of_b.max(1)),
        };
        let mut buf = BytesMut::from(out);
        let mut frames: Vec<WireFrame> = Vec::new();
        while !buf.is_empty() {
            let before = buf.len();
            let frame = match frame::decode(&mut buf, limit) {
                Ok(Some(Frame::Blob(f))) => f,
                Ok(Some(other)) => panic!("{side:?} wrote a non-blob frame {other:?}"),
                Ok(None) => panic!("{side:?}: poll_transmit ended in a partial frame"),
                Err(e) => panic!("{side:?} wrote a frame its peer cannot decode: {e}"),
            };
            let at = out.len() - before;
            let len = before - buf.len();
            match &frame {
                BlobFrame::Cancel { stream, .. } => assert!(
                    frames.is_empty()
                        || frames
                            .iter()
                            .all(|w| matches!(w.frame, BlobFrame::Cancel { .. })),
                    "{side:?}: BLOB_CANCEL {stream} after other frames in one poll_transmit"
                ),
                BlobFrame::Data { stream, data, .. } => {
                    assert!(
                        (1..=max_chunk).contains(&data.len()),
                        "{side:?}: BLOB_DATA of {} bytes for stream {stream}, chunk limit {max_chunk}",
                        data.len()
                    );
                    assert!(
                        at < budget,
                        "{side:?}: a {len}-byte data frame started at {at}, past the budget {budget}"
                    );
                }
                _ => {}
            }
            frames.push(WireFrame { at, len, frame });
        }
        frames
    }

    /// Up to `n` more bytes of the pipe toward `to` arrive there (they are handed over by
    /// [`next_frame`](Self::next_frame)).
    pub fn arrive(&mut self, to: Side, n: usize) {
        let (pipe, arrived) = match to {
            Side::B => (&mut self.in_flight, &mut self.partial_at_b),
            Side::A => (&mut self.in_flight_back, &mut self.partial_at_a),
        };
        let chunk = pipe.split_to(n.min(pipe.len()));
        arrived.extend_from_slice(&chunk);
    }

    /// The next whole frame that arrived at `to`, decoded under its frame limit.
    ///
    /// # Panics
    /// When the bytes that arrived do not decode.
    pub fn next_frame(&mut self, to: Side) -> Option<Frame> {
        let limit = self.frame_limit(to);
        let arrived = match to {
            Side::B => &mut self.partial_at_b,
            Side::A => &mut self.partial_at_a,
        };
        match frame::decode(arrived, limit) {
            Ok(f) => f,
            Err(e) => panic!("a corrupt frame on the pipe to {to:?}: {e}"),
        }
    }

    /// Hands one frame to `to` at `now` (as its driver does with what it read, or as a hostile
    /// peer would) and returns the events `to` has now.
    pub fn hand(&mut self, to: Side, f: BlobFrame) -> Vec<BlobEvent> {
        let now = self.now;
        let side = self.side_mut(to);
        side.handle_frame(now, f);
        std::iter::from_fn(|| side.poll_event()).collect()
    }

    /// Fires `side`'s timers at `now` and returns the events it has then.
    ///
    /// # Panics
    /// When the side, right after `handle_timeout(now)`, wants to be woken at or before
    /// `now`: its driver would spin.
    pub fn fire_timers(&mut self, side: Side) -> Vec<BlobEvent> {
        let now = self.now;
        let streams = self.side_mut(side);
        streams.handle_timeout(now);
        if let Some(next) = streams.poll_timeout() {
            assert!(
                next > now,
                "{side:?}: poll_timeout is {:?} in the past right after handle_timeout: the driver would spin",
                now.saturating_duration_since(next)
            );
        }
        std::iter::from_fn(|| streams.poll_event()).collect()
    }

    /// Hands everything that arrived at `to` over, collecting its events.
    ///
    /// # Panics
    /// When a frame the blob callis does not carry arrived.
    fn hand_all(&mut self, to: Side) {
        self.arrive(to, usize::MAX);
        while let Some(f) = self.next_frame(to) {
            match f {
                Frame::Blob(f) => {
                    let events = self.hand(to, f);
                    match to {
                        Side::A => self.a_events.extend(events),
                        Side::B => self.b_events.extend(events),
                    }
                }
                Frame::Skipped(_) => {
                    let now = self.now;
                    self.side_mut(to).handle_skipped(now);
                }
                other => panic!("{other:?} on the blob callis"),
            }
        }
    }

    /// Delivers what a wrote to b (and any frame put in `in_flight` by hand), lets b write
    /// everything it has, and delivers that to a; collects both sides' events.
    ///
    /// # Panics
    /// When `in_flight` holds a frame the blob callis does not carry, or a transmit breaks
    /// one of the pair's checks.
    pub fn deliver(&mut self) {
        self.hand_all(Side::B);
        self.transmit_all(Side::B);
        self.hand_all(Side::A);
        while let Some(e) = self.a.poll_event() {
            self.a_events.push(e);
        }
        while let Some(e) = self.b.poll_event() {
            self.b_events.push(e);
        }
    }

    /// Everything b can read from `stream` now.
    ///
    /// # Panics
    /// When the read fails.
    pub fn read_all(&mut self, stream: u64) -> Vec<u8> {
        let mut got = Vec::new();
        while let Some(chunk) = self.b.read(self.now, stream).expect("read") {
            got.extend_from_slice(&chunk);
        }
        got
    }

    /// Writes `payload` through stream `stream` with an eager reader; returns what arrived.
    ///
    /// # Panics
    /// When a write fails or the transfer never finishes.
    pub fn transfer(&mut self, stream: u64, payload: &Bytes) -> Vec<u8> {
        let mut written = 0;
        let mut got = Vec::new();
        let mut finished = false;
        for _ in 0..100_000 {
            if written < payload.len() {
                written += self
                    .a
                    .write(self.now, stream, &payload.slice(written..))
                    .expect("write");
            } else if !finished {
                self.a.finish(stream).expect("finish");
                finished = true;
            }
            self.a_transmit(usize::MAX);
            self.deliver();
            got.extend(self.read_all(stream));
            self.deliver();
            if self.a_events.contains(&BlobEvent::Finished(stream)) {
                assert!(self.b.is_complete(stream));
                return got;
            }
        }
        panic!("transfer of {} bytes never finished", payload.len());
    }

    /// How many protocol violations b reported.
    pub fn b_violations(&self) -> usize {
        self.b_events
            .iter()
            .filter(|e| matches!(e, BlobEvent::Violation { .. }))
            .count()
    }

    /// The first protocol violation either side reported.
    pub fn violation(&self) -> Option<String> {
        self.b_events
            .iter()
            .chain(&self.a_events)
            .find_map(|e| match e {
                BlobEvent::Violation { error, .. } => Some(error.message().to_owned()),
                _ => None,
            })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    #[should_panic(expected = "while disconnected")]
    fn a_blob_side_writing_while_the_callis_is_down_fails_the_transmit() {
        let config = BlobConfig {
            chunk_len: 1024,
            window: 4096,
            max_streams: 4,
            idle_timeout: Duration::from_secs(30),
            max_peer_cancels_per_second: 100,
            max_frames_per_second: 100_000,
        };
        let mut p = BlobPair::new(config);
        p.open(1);
        p.a.write(p.now, 1, &Bytes::from_static(b"queued"))
            .expect("write");
        // The pair believes the callis is down while a's machine still has it up.
        p.link_up = false;
        p.a_transmit(usize::MAX);
    }
}
