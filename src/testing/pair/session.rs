//! [`SessionPair`]: two primary sessions back to back (see the [parent module](super)).

use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use super::Side;
use crate::a1_callis::frame::{self, Frame, FrameType};
use crate::a1_callis::session::{Answer, Event, Outgoing, SendEnd, Session, SessionConfig};

/// The identity of [`SessionPair::a`].
pub const A: &str = "spiffe://t/domus/a";
/// The identity of [`SessionPair::b`].
pub const B: &str = "spiffe://t/domus/b";

/// What a [`SessionPair::filter`] does with one frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The frame reaches the other side.
    Pass,
    /// The frame is lost; the frames around it still arrive.
    Drop,
}

/// Decides, frame by frame, what reaches the other side; called with the side that wrote the
/// frame.
pub type Filter = Box<dyn FnMut(Side, &Frame) -> Verdict>;

/// Two sessions wired back to back. Bytes written by one side are decoded by the other after
/// `latency` of virtual time; either direction can be stalled, and frames can be dropped by
/// `filter`.
pub struct SessionPair {
    /// The sending side (it also answers what b sends).
    pub a: Session,
    /// The receiving side.
    pub b: Session,
    /// The virtual clock.
    pub now: Instant,
    /// How long bytes take each way.
    pub latency: Duration,
    /// While set, nothing a writes reaches b (a is not even asked to write).
    pub stall_a_to_b: bool,
    /// While set, nothing b writes reaches a (b is not even asked to write).
    pub stall_b_to_a: bool,
    /// a's events so far.
    pub a_events: Vec<Event>,
    /// b's events so far.
    pub b_events: Vec<Event>,
    /// Frames a wrote, in order (those the filter dropped too).
    pub a_wire: Vec<Frame>,
    /// Frames b wrote, in order (those the filter dropped too).
    pub b_wire: Vec<Frame>,
    /// When set, b answers every delivery with this at once.
    pub b_auto: Option<Answer>,
    /// Frames the filter drops never reach the other side; `None` passes everything.
    pub filter: Option<Filter>,
    /// The longest frame body either side may write: a longer one fails the test (default:
    /// no limit).
    pub wire_limit: u32,
    /// How many rounds [`pump`](Self::pump) allows before it calls the pair livelocked.
    pub max_rounds: usize,
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
            filter: None,
            wire_limit: u32::MAX,
            max_rounds: 10_000,
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
                headers: Default::default(),
                dst: 7,
                src: 3,
                msg_type,
                payload: Bytes::from_static(payload),
                deadline: self.now + timeout,
            })
            .expect("send accepted")
    }

    /// Bytes straight into a's receive buffer, as if b's end of the callis wrote them
    /// (whatever b's session is doing), handled at `now`. Events stay queued in the session
    /// until [`drain_events`](Self::drain_events) or a pump.
    pub fn inject_to_a(&mut self, bytes: &[u8]) {
        self.a.recv_buf().extend_from_slice(bytes);
        self.a.handle_input(self.now);
    }

    /// Bytes straight into b's receive buffer, as if a's end of the callis wrote them; see
    /// [`inject_to_a`](Self::inject_to_a).
    pub fn inject_to_b(&mut self, bytes: &[u8]) {
        self.b.recv_buf().extend_from_slice(bytes);
        self.b.handle_input(self.now);
    }

    /// Collects both sides' events (and lets `b_auto` answer b's deliveries).
    pub fn drain_events(&mut self) {
        while let Some(e) = self.a.poll_event() {
            self.a_events.push(e);
        }
        while let Some(e) = self.b.poll_event() {
            if let Some(answer) = &self.b_auto {
                for (peer_epoch, id) in e.arrivals() {
                    self.b.answer(peer_epoch, id, answer.clone());
                }
            }
            self.b_events.push(e);
        }
    }

    /// Moves bytes both ways until neither side has anything to say.
    ///
    /// # Panics
    /// When the two never go quiet (`max_rounds` rounds): a livelock, which a test must see.
    /// When a side's `poll_transmit` misreports whether it wrote, or writes something that is
    /// not whole frames within `wire_limit`.
    pub fn pump(&mut self) {
        for _ in 0..self.max_rounds {
            self.drain_events();
            let a_moved = !self.stall_a_to_b && self.transfer(Side::A);
            let b_moved = !self.stall_b_to_a && self.transfer(Side::B);
            self.drain_events();
            if !a_moved && !b_moved {
                return;
            }
        }
        panic!("the pair never went quiet");
    }

    /// One `poll_transmit` of `from`, carried to the other side `latency` later; whether it
    /// wrote anything.
    fn transfer(&mut self, from: Side) -> bool {
        let (writer, reader, wire) = match from {
            Side::A => (&mut self.a, &mut self.b, &mut self.a_wire),
            Side::B => (&mut self.b, &mut self.a, &mut self.b_wire),
        };
        let mut buf = BytesMut::new();
        let wrote = writer.poll_transmit(self.now, &mut buf);
        assert_eq!(
            wrote,
            !buf.is_empty(),
            "{from:?}: poll_transmit returned {wrote} after writing {} bytes",
            buf.len()
        );
        if !wrote {
            return false;
        }
        self.now += self.latency;
        carry(
            from,
            buf,
            self.wire_limit,
            wire,
            self.filter.as_mut(),
            reader.recv_buf(),
        );
        reader.handle_input(self.now);
        true
    }

    /// The earliest instant either side has a timer due.
    pub fn next_timeout(&self) -> Option<Instant> {
        [self.a.poll_timeout(), self.b.poll_timeout()]
            .into_iter()
            .flatten()
            .min()
    }

    /// Fires both sides' timers at `now` (nothing is pumped).
    ///
    /// # Panics
    /// When a side, right after `handle_timeout(now)`, wants to be woken at or before `now`:
    /// its driver would spin.
    pub fn fire_timers(&mut self) {
        let now = self.now;
        for (side, session) in [(Side::A, &mut self.a), (Side::B, &mut self.b)] {
            session.handle_timeout(now);
            if let Some(next) = session.poll_timeout() {
                assert!(
                    next > now,
                    "{side:?}: poll_timeout is {:?} in the past right after handle_timeout: the driver would spin",
                    now.saturating_duration_since(next)
                );
            }
        }
    }

    /// The clock jumps by `by` and the timers fire once, as for a driver that woke late
    /// (nothing is pumped; [`advance`](Self::advance) fires every timer on the way instead).
    ///
    /// # Panics
    /// As [`fire_timers`](Self::fire_timers).
    pub fn skip(&mut self, by: Duration) {
        self.now += by;
        self.fire_timers();
    }

    /// As a driver does: sleeps until the earliest timer (if one is set and in the future),
    /// then fires the timers (nothing is pumped).
    ///
    /// # Panics
    /// As [`fire_timers`](Self::fire_timers).
    pub fn skip_to_next_timeout(&mut self) {
        if let Some(at) = self.next_timeout() {
            self.now = self.now.max(at);
        }
        self.fire_timers();
    }

    /// Advances virtual time, firing both sides' timers whenever one is due, and pumps.
    ///
    /// # Panics
    /// As [`fire_timers`](Self::fire_timers) and [`pump`](Self::pump).
    pub fn advance(&mut self, by: Duration) {
        let end = self.now + by;
        while let Some(t) = self.next_timeout().filter(|t| *t <= end) {
            self.now = self.now.max(t);
            self.fire_timers();
            self.pump();
        }
        self.now = end;
        self.fire_timers();
        self.pump();
    }

    /// The ids b delivered, in order.
    pub fn delivered_ids(&self) -> Vec<u64> {
        self.b_events
            .iter()
            .flat_map(Event::arrivals)
            .map(|(_, id)| id)
            .collect()
    }

    /// How send `id` ended, if it did.
    pub fn outcome(&self, id: u64) -> Option<SendEnd> {
        self.finished()
            .into_iter()
            .find(|(i, _)| *i == id)
            .map(|(_, o)| o)
    }

    /// Every send of a's that ended, in the order they ended.
    pub fn finished(&self) -> Vec<(u64, SendEnd)> {
        self.a_events
            .iter()
            .filter_map(|e| match e {
                Event::Finished { id, outcome, .. } => Some((*id, outcome.clone())),
                _ => None,
            })
            .collect()
    }

    /// b answers every delivery it has seen with `answer`.
    pub fn answer_all(&mut self, answer: Answer) {
        let pending: Vec<(u64, u64)> = self.b_events.iter().flat_map(Event::arrivals).collect();
        for (epoch, id) in pending {
            self.b.answer(epoch, id, answer.clone());
        }
    }
}

/// What `from` wrote in one `poll_transmit`: checks that it is whole frames within `limit`,
/// records each on `wire`, and appends to `to` (the receiver's buffer) the bytes of those
/// `filter` lets through.
///
/// # Panics
/// When the bytes do not decode, or end in a partial frame.
fn carry(
    from: Side,
    mut bytes: BytesMut,
    limit: u32,
    wire: &mut Vec<Frame>,
    filter: Option<&mut Filter>,
    to: &mut BytesMut,
) {
    let Some(filter) = filter else {
        // Everything passes: the bytes go over as they are, then are decoded in place.
        to.extend_from_slice(&bytes);
        decode_frames(from, &mut bytes, limit, |f, _| wire.push(f));
        return;
    };
    let mut rest = BytesMut::from(&bytes[..]);
    let mut at = 0;
    decode_frames(from, &mut rest, limit, |f, len| {
        if filter(from, &f) == Verdict::Pass {
            to.extend_from_slice(bytes.get(at..at + len).unwrap_or_default());
        }
        at += len;
        wire.push(f);
    });
}

/// Decodes every frame of `bytes`, handing each to `each` with its length on the wire.
///
/// # Panics
/// When the bytes do not decode, or end in a partial frame.
fn decode_frames(from: Side, bytes: &mut BytesMut, limit: u32, mut each: impl FnMut(Frame, usize)) {
    while !bytes.is_empty() {
        let before = bytes.len();
        let f = match frame::decode(bytes, limit) {
            Ok(Some(f)) => f,
            Ok(None) => panic!("{from:?}: poll_transmit ended in a partial frame ({before} bytes)"),
            Err(e) => panic!("{from:?} wrote a frame that does not decode (limit {limit}): {e}"),
        };
        each(f, before - bytes.len());
    }
}

/// Decodes `bytes` (whole frames) onto `wire`.
pub fn record(wire: &mut Vec<Frame>, bytes: &[u8]) {
    let mut buf = BytesMut::from(bytes);
    while let Ok(Some(f)) = frame::decode(&mut buf, u32::MAX) {
        wire.push(f);
    }
}

/// The id of every message on `wire`, MESSAGE and MESSAGE_BATCH alike, in wire order.
pub fn message_ids(wire: &[Frame]) -> Vec<u64> {
    wire.iter()
        .flat_map(|f| match f {
            Frame::Message(m) => vec![m.id],
            Frame::MessageBatch(b) => b.iter().map(|m| m.id).collect(),
            _ => Vec::new(),
        })
        .collect()
}

/// The type of each frame.
pub fn frame_types(wire: &[Frame]) -> Vec<FrameType> {
    wire.iter().map(Frame::frame_type).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[should_panic(expected = "wrote a frame that does not decode")]
    fn a_frame_over_the_wire_limit_fails_the_pump() {
        let mut p = SessionPair::new(SessionConfig::default());
        p.connect();
        p.wire_limit = 64;
        p.send(
            crate::a1_callis::session::A3_MESSAGE_TYPE_BASE,
            &[0; 100],
            Duration::from_secs(5),
        );
        p.pump();
    }

    #[test]
    fn a_filter_sees_every_frame_and_what_it_drops_never_arrives() {
        let mut p = SessionPair::new(SessionConfig::default());
        p.filter = Some(Box::new(|from, f| match (from, f) {
            (Side::B, Frame::Hello(_)) => Verdict::Drop,
            _ => Verdict::Pass,
        }));
        p.connect();
        // b wrote its HELLO (and a PING once a's arrived), but only the PING reached a.
        assert_eq!(
            frame_types(&p.b_wire).get(..2),
            Some(&[FrameType::HELLO, FrameType::PING][..])
        );
        assert_eq!(p.b.peer_epoch(), Some(1), "a's HELLO reached b");
        assert_eq!(p.a.peer_epoch(), None, "b's HELLO never reached a");
        let closed = p.a_events.iter().find_map(|e| match e {
            Event::Close(error) => Some(error.message().to_owned()),
            _ => None,
        });
        assert!(
            closed
                .as_deref()
                .is_some_and(|m| m.contains("before HELLO")),
            "{closed:?}"
        );
    }
}
