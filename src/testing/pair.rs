//! In-memory pairs of vicus's sans-IO state machines on a virtual clock, for tests of the
//! protocol itself (vicus's own unit tests use them): [`SessionPair`] wires two primary
//! sessions back to back, [`BlobPair`] two blob state machines. Bytes go through the real
//! frame codec; time moves only when the test says. Nothing here touches a socket or sleeps,
//! so a test runs in microseconds and cannot flake.
//!
//! What it must not do: hide a protocol failure. The helpers panic (documented per method)
//! when the machines refuse what a test asks or never go quiet, so the test fails there.

use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use crate::a1_callis::blob::{BlobConfig, BlobEvent, BlobStreams};
use crate::a1_callis::frame::{self, Frame, FrameType};
use crate::a1_callis::session::{Answer, Event, Outcome, Outgoing, Session, SessionConfig};

/// The identity of [`SessionPair::a`].
pub const A: &str = "spiffe://t/domus/a";
/// The identity of [`SessionPair::b`].
pub const B: &str = "spiffe://t/domus/b";

/// Two sessions wired back to back. Bytes written by one side are decoded by the other after
/// `latency` of virtual time; either direction can be stalled.
pub struct SessionPair {
    /// The sending side (it also answers what b sends).
    pub a: Session,
    /// The receiving side.
    pub b: Session,
    /// The virtual clock.
    pub now: Instant,
    /// How long bytes take each way.
    pub latency: Duration,
    /// While set, nothing a writes reaches b.
    pub stall_a_to_b: bool,
    /// While set, nothing b writes reaches a.
    pub stall_b_to_a: bool,
    /// a's events so far.
    pub a_events: Vec<Event>,
    /// b's events so far.
    pub b_events: Vec<Event>,
    /// Frame types as they went over the wire, per direction.
    pub a_wire: Vec<Frame>,
    /// Frames b wrote, in order.
    pub b_wire: Vec<Frame>,
    /// When set, b answers every delivery with this at once.
    pub b_auto: Option<Answer>,
}

impl SessionPair {
    /// Two sessions, `a` (`spiffe://t/domus/a`, epoch 1) and `b` (`spiffe://t/domus/b`,
    /// epoch 2), not connected yet; bytes take 50 µs of virtual time each way.
    pub fn new(config: SessionConfig) -> Self {
        Self {
            a: Session::new(config.clone(), A.into(), 1),
            b: Session::new(config, B.into(), 2),
            now: Instant::now(),
            latency: Duration::from_micros(50),
            stall_a_to_b: false,
            stall_b_to_a: false,
            a_events: Vec::new(),
            b_events: Vec::new(),
            a_wire: Vec::new(),
            b_wire: Vec::new(),
            b_auto: None,
        }
    }

    /// Opens the callis: both sides connected, HELLOs exchanged.
    pub fn connect(&mut self) {
        self.a.connected(self.now, B);
        self.b.connected(self.now, A);
        self.pump();
    }

    /// The callis drops on both sides (whatever was in flight is lost).
    pub fn cut(&mut self) {
        self.a.disconnected(self.now);
        self.b.disconnected(self.now);
        self.drain_events();
    }

    /// `a` queues a message to taberna 7 (from taberna 3) with `timeout`; its id.
    ///
    /// # Panics
    /// When the session refuses it (a test asking for a send the session cannot take).
    pub fn send(&mut self, msg_type: u32, payload: &'static [u8], timeout: Duration) -> u64 {
        self.a
            .send(Outgoing {
                dst: 7,
                src: 3,
                msg_type,
                payload: Bytes::from_static(payload),
                deadline: self.now + timeout,
            })
            .expect("send accepted")
    }

    /// Collects both sides' events (and lets `b_auto` answer b's deliveries).
    pub fn drain_events(&mut self) {
        while let Some(e) = self.a.poll_event() {
            self.a_events.push(e);
        }
        while let Some(e) = self.b.poll_event() {
            if let (
                Some(answer),
                Event::Deliver {
                    peer_epoch,
                    message,
                },
            ) = (&self.b_auto, &e)
            {
                self.b.answer(*peer_epoch, message.id, answer.clone());
            }
            self.b_events.push(e);
        }
    }

    /// Moves bytes both ways until neither side has anything to say.
    ///
    /// # Panics
    /// When the two never go quiet (10 000 rounds): a livelock, which a test must see.
    pub fn pump(&mut self) {
        for _ in 0..10_000 {
            self.drain_events();
            let mut moved = false;
            let mut buf = BytesMut::new();
            if !self.stall_a_to_b && self.a.poll_transmit(self.now, &mut buf) {
                moved = true;
                self.now += self.latency;
                record(&mut self.a_wire, &buf);
                self.b.recv_buf().extend_from_slice(&buf);
                self.b.handle_input(self.now);
            }
            let mut buf = BytesMut::new();
            if !self.stall_b_to_a && self.b.poll_transmit(self.now, &mut buf) {
                moved = true;
                self.now += self.latency;
                record(&mut self.b_wire, &buf);
                self.a.recv_buf().extend_from_slice(&buf);
                self.a.handle_input(self.now);
            }
            self.drain_events();
            if !moved {
                return;
            }
        }
        panic!("the pair never went quiet");
    }

    /// Advances virtual time, firing both sides' timers, and pumps.
    pub fn advance(&mut self, by: Duration) {
        let end = self.now + by;
        loop {
            let next = [self.a.poll_timeout(), self.b.poll_timeout()]
                .into_iter()
                .flatten()
                .filter(|t| *t <= end)
                .min();
            let Some(t) = next else { break };
            self.now = self.now.max(t);
            self.a.handle_timeout(self.now);
            self.b.handle_timeout(self.now);
            self.pump();
        }
        self.now = end;
        self.a.handle_timeout(self.now);
        self.b.handle_timeout(self.now);
        self.pump();
    }

    /// The ids b delivered, in order.
    pub fn delivered_ids(&self) -> Vec<u64> {
        self.b_events
            .iter()
            .filter_map(|e| match e {
                Event::Deliver { message, .. } => Some(message.id),
                _ => None,
            })
            .collect()
    }

    /// How send `id` ended, if it did.
    pub fn outcome(&self, id: u64) -> Option<Outcome> {
        self.finished()
            .into_iter()
            .find(|(i, _)| *i == id)
            .map(|(_, o)| o)
    }

    /// Every send of a's that ended, in the order they ended.
    pub fn finished(&self) -> Vec<(u64, Outcome)> {
        self.a_events
            .iter()
            .filter_map(|e| match e {
                Event::Finished { id, outcome } => Some((*id, outcome.clone())),
                _ => None,
            })
            .collect()
    }

    /// b answers every delivery it has seen with `answer`.
    pub fn answer_all(&mut self, answer: Answer) {
        let pending: Vec<(u64, u64)> = self
            .b_events
            .iter()
            .filter_map(|e| match e {
                Event::Deliver {
                    peer_epoch,
                    message,
                } => Some((*peer_epoch, message.id)),
                _ => None,
            })
            .collect();
        for (epoch, id) in pending {
            self.b.answer(epoch, id, answer.clone());
        }
    }
}

/// Decodes `bytes` (whole frames) onto `wire`.
pub fn record(wire: &mut Vec<Frame>, bytes: &[u8]) {
    let mut buf = BytesMut::from(bytes);
    while let Ok(Some(f)) = frame::decode(&mut buf, u32::MAX) {
        wire.push(f);
    }
}

/// The type of each frame.
pub fn frame_types(wire: &[Frame]) -> Vec<FrameType> {
    wire.iter()
        .map(|f| match f {
            Frame::Hello(_) => FrameType::HELLO,
            Frame::Ping(_) => FrameType::PING,
            Frame::Pong(_) => FrameType::PONG,
            Frame::Close { .. } => FrameType::CLOSE,
            Frame::Message(_) => FrameType::MESSAGE,
            Frame::Accepted(_) => FrameType::ACCEPTED,
            Frame::Reply { .. } => FrameType::REPLY,
            Frame::Reject(_) => FrameType::REJECT,
            Frame::Skipped(t) => *t,
            Frame::Blob(_) => FrameType::BLOB_DATA,
            Frame::DoneBelow(_) => FrameType::DONE_BELOW,
        })
        .collect()
}

/// Two blob state machines back to back on a virtual clock: what a writes waits in
/// `in_flight` until [`BlobPair::deliver`] hands it to b (and b's credit back to a).
pub struct BlobPair {
    /// The sending side.
    pub a: BlobStreams,
    /// The receiving side.
    pub b: BlobStreams,
    /// The virtual clock.
    pub now: Instant,
    /// a's events so far.
    pub a_events: Vec<BlobEvent>,
    /// b's events so far.
    pub b_events: Vec<BlobEvent>,
    /// Bytes a wrote that b has not handled yet (dropped by `cut`).
    pub in_flight: BytesMut,
}

impl BlobPair {
    /// Both sides connected with `config`.
    pub fn new(config: BlobConfig) -> Self {
        let mut p = Self {
            a: BlobStreams::new(config.clone()),
            b: BlobStreams::new(config),
            now: Instant::now(),
            a_events: Vec::new(),
            b_events: Vec::new(),
            in_flight: BytesMut::new(),
        };
        p.a.connected();
        p.b.connected();
        p
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
    pub fn a_transmit(&mut self, budget: usize) -> bool {
        self.a.poll_transmit(&mut self.in_flight, budget)
    }

    /// Delivers what a wrote to b (and any frame put in `in_flight` by hand: blob frames and
    /// skippable ones, as the blob driver hands them over), and b's answers to a.
    ///
    /// # Panics
    /// When `in_flight` holds a frame the blob callis does not carry.
    pub fn deliver(&mut self) {
        let mut buf = std::mem::take(&mut self.in_flight);
        while let Ok(Some(f)) = frame::decode(&mut buf, u32::MAX) {
            match f {
                Frame::Blob(b) => self.b.handle_frame(self.now, b),
                Frame::Skipped(_) => self.b.handle_skipped(self.now),
                other => panic!("{other:?} on the blob callis"),
            }
        }
        let mut back = BytesMut::new();
        self.b.poll_transmit(&mut back, usize::MAX);
        while let Ok(Some(f)) = frame::decode(&mut back, u32::MAX) {
            let Frame::Blob(b) = f else { panic!("{f:?}") };
            self.a.handle_frame(self.now, b);
        }
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

    /// The blob callis drops with whatever was in flight; a new one comes up.
    pub fn cut(&mut self) {
        self.in_flight.clear();
        self.a.disconnected();
        self.b.disconnected();
        self.a.connected();
        self.b.connected();
    }
}
