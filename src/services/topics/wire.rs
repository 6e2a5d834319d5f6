//! The bodies of the topic service's messages, byte for byte as `docs/wire-protocol.md`
//! ("Topics") says: a subscriber's announcement (SUBSCRIBE, UNSUBSCRIBE), the publisher's
//! answer to it (its grants), and one subscriber's copy of a publish (PUBLISH). All integers
//! big-endian; a pattern or topic is a `u16` length and that many UTF-8 bytes, checked as
//! [`TopicPattern`] / [`Topic`] are.
//!
//! Pure: every length is checked against the body and the bounds below before anything is
//! kept; a PUBLISH's payload stays a slice of the message. It must not decide anything: the
//! service applies the policy and the table.

use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::name::{MAX_TOPIC_LEN, Topic, TopicPattern};

/// The A2 type of a subscriber's SUBSCRIBE announcement (also its renewal).
pub const SUBSCRIBE_TYPE: u32 = 0x0002_0001;
/// The A2 type of a subscriber's UNSUBSCRIBE announcement.
pub const UNSUBSCRIBE_TYPE: u32 = 0x0002_0002;
/// The A2 type of one subscriber's copy of a publish.
pub const PUBLISH_TYPE: u32 = 0x0002_0003;

/// The most patterns one announcement carries.
pub const MAX_PATTERNS: usize = 256;

/// The longest lease a subscriber may ask for (a publisher grants at most its own lease).
pub const MAX_LEASE: Duration = Duration::from_secs(3600);

/// Why a body does not decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum WireError {
    /// Shorter than its fields say, or bytes left after them.
    Length,
    /// A pattern or topic that is not one ([`TopicPattern::new`], [`Topic::new`]).
    Name,
    /// No patterns, or more than [`MAX_PATTERNS`].
    Count,
    /// A lease of 0 or over [`MAX_LEASE`].
    Lease,
    /// A grant verdict this side does not know.
    Verdict,
    /// Not a type of the topic service.
    Type,
}

/// What a subscriber announces to a publisher.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Announcement {
    /// Subscribe to (or renew) these patterns, each for `lease`.
    Subscribe {
        /// The lease the subscriber asks for.
        lease: Duration,
        /// The patterns.
        patterns: Vec<TopicPattern>,
    },
    /// End these subscriptions now.
    Unsubscribe {
        /// The patterns.
        patterns: Vec<TopicPattern>,
    },
}

/// A publisher's verdict on one pattern of a SUBSCRIBE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Verdict {
    /// Subscribed (or renewed) until the granted lease runs out.
    Granted = 0,
    /// The subscriber holds as many patterns as this publisher allows one subscriber.
    PerSubscriberFull = 1,
    /// This publisher's table is full.
    TableFull = 2,
    /// The topic policy does not let this subscriber subscribe to this pattern.
    Forbidden = 3,
}

/// A publisher's answer to a SUBSCRIBE: the lease it granted, and a verdict per pattern in
/// the announcement's order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grants {
    /// The lease granted (at most the one asked for).
    pub lease: Duration,
    /// One verdict per pattern announced.
    pub verdicts: Vec<Verdict>,
}

/// One subscriber's copy of a publish: the topic, the application's message type and the
/// payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publication {
    /// The topic published to.
    pub topic: Topic,
    /// The application's (A3) message type.
    pub msg_type: u32,
    /// The payload (a slice of the message).
    pub payload: Bytes,
}

fn put_name(out: &mut BytesMut, name: &str) {
    // Names are at most MAX_TOPIC_LEN bytes (checked when they were made).
    out.put_u16(u16::try_from(name.len()).unwrap_or(u16::MAX));
    out.put_slice(name.as_bytes());
}

fn take_name(body: &mut Bytes) -> Result<String, WireError> {
    if body.remaining() < 2 {
        return Err(WireError::Length);
    }
    let len = usize::from(body.get_u16());
    if len > MAX_TOPIC_LEN {
        return Err(WireError::Name);
    }
    if body.remaining() < len {
        return Err(WireError::Length);
    }
    let raw = body.split_to(len);
    String::from_utf8(raw.to_vec()).map_err(|_| WireError::Name)
}

fn put_patterns(out: &mut BytesMut, patterns: &[TopicPattern]) {
    out.put_u16(u16::try_from(patterns.len()).unwrap_or(u16::MAX));
    for p in patterns {
        put_name(out, p.as_str());
    }
}

/// Reads `count u16` and that many patterns; `count` from `min` to [`MAX_PATTERNS`].
fn take_patterns(body: &mut Bytes, min: usize) -> Result<Vec<TopicPattern>, WireError> {
    if body.remaining() < 2 {
        return Err(WireError::Length);
    }
    let count = usize::from(body.get_u16());
    if count < min || count > MAX_PATTERNS {
        return Err(WireError::Count);
    }
    // Each pattern takes at least 3 bytes: a count past what the body can hold is refused
    // before anything is reserved for it.
    if body.remaining() < count.saturating_mul(3) {
        return Err(WireError::Length);
    }
    let mut patterns = Vec::with_capacity(count);
    for _ in 0..count {
        patterns.push(TopicPattern::new(take_name(body)?).map_err(|_| WireError::Name)?);
    }
    Ok(patterns)
}

fn millis(d: Duration) -> u32 {
    u32::try_from(d.as_millis()).unwrap_or(u32::MAX)
}

fn take_lease(body: &mut Bytes) -> Result<Duration, WireError> {
    if body.remaining() < 4 {
        return Err(WireError::Length);
    }
    let lease = Duration::from_millis(u64::from(body.get_u32()));
    if lease.is_zero() || lease > MAX_LEASE {
        return Err(WireError::Lease);
    }
    Ok(lease)
}

fn finish<T>(body: &Bytes, value: T) -> Result<T, WireError> {
    if body.has_remaining() {
        Err(WireError::Length)
    } else {
        Ok(value)
    }
}

impl Announcement {
    /// The message type it is sent with.
    pub fn msg_type(&self) -> u32 {
        match self {
            Announcement::Subscribe { .. } => SUBSCRIBE_TYPE,
            Announcement::Unsubscribe { .. } => UNSUBSCRIBE_TYPE,
        }
    }

    /// The body: SUBSCRIBE `lease_ms u32` · patterns; UNSUBSCRIBE patterns (patterns: `count
    /// u16`, then each a `u16` length and its bytes).
    pub fn encode(&self) -> Bytes {
        let mut out = BytesMut::new();
        match self {
            Announcement::Subscribe { lease, patterns } => {
                out.put_u32(millis(*lease));
                put_patterns(&mut out, patterns);
            }
            Announcement::Unsubscribe { patterns } => put_patterns(&mut out, patterns),
        }
        out.freeze()
    }

    /// Reads an announcement of type `msg_type`.
    pub fn decode(msg_type: u32, mut body: Bytes) -> Result<Self, WireError> {
        match msg_type {
            SUBSCRIBE_TYPE => {
                let lease = take_lease(&mut body)?;
                // No patterns: a hello (the publisher answers empty grants and announces its
                // own subscriptions back).
                let patterns = take_patterns(&mut body, 0)?;
                finish(&body, Announcement::Subscribe { lease, patterns })
            }
            UNSUBSCRIBE_TYPE => {
                let patterns = take_patterns(&mut body, 1)?;
                finish(&body, Announcement::Unsubscribe { patterns })
            }
            _ => Err(WireError::Type),
        }
    }
}

impl Grants {
    /// The body: `lease_ms u32` · `count u16` · one verdict `u8` per pattern.
    pub fn encode(&self) -> Bytes {
        let mut out = BytesMut::with_capacity(6usize.saturating_add(self.verdicts.len()));
        out.put_u32(millis(self.lease));
        out.put_u16(u16::try_from(self.verdicts.len()).unwrap_or(u16::MAX));
        for v in &self.verdicts {
            out.put_u8(*v as u8);
        }
        out.freeze()
    }

    /// Reads grants.
    pub fn decode(mut body: Bytes) -> Result<Self, WireError> {
        let lease = take_lease(&mut body)?;
        if body.remaining() < 2 {
            return Err(WireError::Length);
        }
        let count = usize::from(body.get_u16());
        if count > MAX_PATTERNS {
            return Err(WireError::Count);
        }
        if body.remaining() != count {
            return Err(WireError::Length);
        }
        let verdicts = body
            .iter()
            .map(|b| match b {
                0 => Ok(Verdict::Granted),
                1 => Ok(Verdict::PerSubscriberFull),
                2 => Ok(Verdict::TableFull),
                3 => Ok(Verdict::Forbidden),
                _ => Err(WireError::Verdict),
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self { lease, verdicts })
    }
}

impl Publication {
    /// The body: the topic (`u16` length, bytes) · `msg_type u32` · the payload (the rest).
    pub fn encode(topic: &Topic, msg_type: u32, payload: &[u8]) -> Bytes {
        let mut out = BytesMut::with_capacity(
            topic
                .as_str()
                .len()
                .saturating_add(6)
                .saturating_add(payload.len()),
        );
        put_name(&mut out, topic.as_str());
        out.put_u32(msg_type);
        out.put_slice(payload);
        out.freeze()
    }

    /// Reads a publication; the payload is a slice of `body`.
    pub fn decode(mut body: Bytes) -> Result<Self, WireError> {
        let topic = Topic::new(take_name(&mut body)?).map_err(|_| WireError::Name)?;
        if body.remaining() < 4 {
            return Err(WireError::Length);
        }
        let msg_type = body.get_u32();
        Ok(Self {
            topic,
            msg_type,
            payload: body,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn p(s: &str) -> TopicPattern {
        TopicPattern::new(s).unwrap()
    }

    #[test]
    fn announcements_round_trip_and_are_byte_exact() {
        let sub = Announcement::Subscribe {
            lease: Duration::from_secs(30),
            patterns: vec![p("a.*"), p("b")],
        };
        let body = sub.encode();
        assert_eq!(
            &body[..],
            &[0, 0, 0x75, 0x30, 0, 2, 0, 3, b'a', b'.', b'*', 0, 1, b'b']
        );
        assert_eq!(Announcement::decode(SUBSCRIBE_TYPE, body), Ok(sub));
        let unsub = Announcement::Unsubscribe {
            patterns: vec![p("a.>")],
        };
        assert_eq!(
            Announcement::decode(UNSUBSCRIBE_TYPE, unsub.encode()),
            Ok(unsub)
        );
        let grants = Grants {
            lease: Duration::from_secs(10),
            verdicts: vec![Verdict::Granted, Verdict::Forbidden],
        };
        assert_eq!(Grants::decode(grants.encode()), Ok(grants));
        let topic = Topic::new("orders.eu").unwrap();
        let body = Publication::encode(&topic, 0x0100_0001, b"hi");
        let back = Publication::decode(body.clone()).unwrap();
        assert_eq!(back.topic, topic);
        assert_eq!(back.msg_type, 0x0100_0001);
        assert_eq!(&back.payload[..], b"hi");
        // Zero-copy: the payload is the tail of the body.
        assert_eq!(back.payload.as_ptr(), body[body.len() - 2..].as_ptr());
        // A SUBSCRIBE of no patterns is a hello; its grants are empty.
        let hello = Announcement::Subscribe {
            lease: Duration::from_secs(1),
            patterns: Vec::new(),
        };
        assert_eq!(&hello.encode()[..], &[0, 0, 0x03, 0xe8, 0, 0]);
        assert_eq!(
            Announcement::decode(SUBSCRIBE_TYPE, hello.encode()),
            Ok(hello)
        );
        let none = Grants {
            lease: Duration::from_secs(1),
            verdicts: Vec::new(),
        };
        assert_eq!(Grants::decode(none.encode()), Ok(none));
        // The example of docs/wire-protocol.md.
        let body = Publication::encode(&Topic::new("a.b").unwrap(), 0x0100_0001, b"hi");
        assert_eq!(&body[..], &[0, 3, b'a', b'.', b'b', 1, 0, 0, 1, b'h', b'i']);
    }

    #[test]
    fn malformed_bodies_are_refused() {
        let cases: &[(u32, &[u8], WireError)] = &[
            (SUBSCRIBE_TYPE, &[0, 0, 0], WireError::Length),
            (
                SUBSCRIBE_TYPE,
                &[0, 0, 0, 0, 0, 1, 0, 1, b'a'],
                WireError::Lease,
            ),
            (UNSUBSCRIBE_TYPE, &[0, 0], WireError::Count),
            (SUBSCRIBE_TYPE, &[0, 0, 0, 1, 0xff, 0xff], WireError::Count),
            (
                SUBSCRIBE_TYPE,
                &[0, 0, 0, 1, 0, 1, 0, 5, b'a'],
                WireError::Length,
            ),
            (
                SUBSCRIBE_TYPE,
                &[0, 0, 0, 1, 0, 1, 0, 3, b'a', b'*', b'b'],
                WireError::Name,
            ),
            (
                SUBSCRIBE_TYPE,
                &[0, 0, 0, 1, 0, 1, 0, 1, b'a', 9],
                WireError::Length,
            ),
            (
                SUBSCRIBE_TYPE,
                &[0, 0, 0, 1, 0, 200, 0, 1, b'a'],
                WireError::Length,
            ),
            (UNSUBSCRIBE_TYPE, &[0, 1, 0, 2, 0xc3, 0x28], WireError::Name),
            (PUBLISH_TYPE, &[0, 1, b'a'], WireError::Type),
        ];
        for (t, raw, error) in cases {
            assert_eq!(
                Announcement::decode(*t, Bytes::copy_from_slice(raw)),
                Err(*error),
                "{raw:?}"
            );
        }
        assert_eq!(
            Grants::decode(Bytes::from_static(&[0, 0, 0, 1, 0, 1, 7])),
            Err(WireError::Verdict)
        );
        assert_eq!(
            Publication::decode(Bytes::from_static(&[0, 3, b'a', b'.', b'*', 0, 0, 0, 1])),
            Err(WireError::Name)
        );
        assert_eq!(
            Publication::decode(Bytes::from_static(&[0, 1, b'a', 0, 0])),
            Err(WireError::Length)
        );
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(t in 0u32..4, raw in proptest::collection::vec(any::<u8>(), 0..600)) {
            let body = Bytes::from(raw);
            let _ = Announcement::decode(SUBSCRIBE_TYPE + t, body.clone());
            let _ = Grants::decode(body.clone());
            let _ = Publication::decode(body);
        }
    }
}
