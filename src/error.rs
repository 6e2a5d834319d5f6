//! The crate's single public error type and its stable numeric [`ErrorId`]s.
//!
//! Every failure a caller can see is an [`Error`]: a stable [`ErrorId`] to match on and a bounded,
//! human-readable message that says what to fix. Ids `1..=26` keep the numbers aurelia 0.2 gives
//! its errors of the same meaning, so its users can map theirs; vicus's own ids are
//! `ResolverFailed` (27, added after that range) and everything from 100 on.
//!
//! Reserved ids: vicus itself never produces `BlobCallisWithoutPrimary` (13),
//! `BlobAckWindowExceeded` (14), `BlobStreamOutOfOrder` (16), `BlobStreamMissingChunk` (18),
//! `AddressMismatch` (20), `SnapshotNotAvailable` (25) or `UnixPeerNotAllowed` (110); each
//! variant's doc says what vicus reports instead. They keep their numbers (aurelia's, for
//! 13–25) so that no number changes meaning, and a peer may still name one: in a REJECT or
//! BLOB_CANCEL it reaches the caller as that id, in a CLOSE by name in the `ConnectionLost`.
//!
//! How an id travels in a frame, what a number a peer sends becomes, and which ids count as
//! what (a refusal, a permanent dial failure, an overrun, …) is written once, in
//! [`crate::a1_callis::codes`]; this module is the catalogue of ids and the error type.
//!
//! This module must not hold a peer-controlled string unbounded or unescaped: everything that
//! comes from the wire or from a certificate goes through [`untrusted`] first.

use std::fmt;
use std::time::Duration;

/// A `Result` whose error is [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The longest message an [`Error`] carries, in bytes; longer messages are cut at a character
/// boundary and end in `…`.
pub const ERROR_MESSAGE_MAX_LEN: usize = 1024;

/// The longest rendering of a single peer-controlled string (a SAN, a peer's reason text) inside
/// an error message.
const UNTRUSTED_MAX_CHARS: usize = 200;

macro_rules! error_ids {
    ($( $(#[$doc:meta])* $name:ident = $num:literal, )*) => {
        /// A stable numeric identifier for each kind of failure.
        ///
        /// The numbers never change meaning once released. `1..=26` are the numbers aurelia 0.2
        /// uses for the same failures; vicus's own are 27 (`ResolverFailed`) and from 100 on
        /// (A0 transport: 100–149, A1 delivery: 150–199). Ids documented as *reserved* are
        /// never produced by vicus itself (each says what vicus reports instead); a peer may
        /// still name one in a REJECT or BLOB_CANCEL frame, and it reaches the caller as that
        /// id.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        #[non_exhaustive]
        #[repr(u32)]
        pub enum ErrorId {
            $( $(#[$doc])* $name = $num, )*
        }

        impl ErrorId {
            /// Every id, in numeric order.
            pub const ALL: &'static [ErrorId] = &[$(ErrorId::$name,)*];

            /// The stable number of this id.
            pub const fn as_u32(self) -> u32 {
                self as u32
            }

            /// The variant's name, e.g. `"HandshakeTimeout"`.
            pub const fn name(self) -> &'static str {
                match self {
                    $(ErrorId::$name => stringify!($name),)*
                }
            }
        }

        impl TryFrom<u32> for ErrorId {
            type Error = u32;

            /// Maps a number back to its id; unknown numbers are returned as the error.
            fn try_from(value: u32) -> std::result::Result<Self, u32> {
                match value {
                    $($num => Ok(ErrorId::$name),)*
                    other => Err(other),
                }
            }
        }
    };
}

error_ids! {
    /// The target taberna is not registered.
    UnknownTaberna = 1,
    /// The local outbound queue is full: no in-flight room before the send's deadline (or at
    /// once, for `try_send`). The message was not sent.
    LocalQueueFull = 2,
    /// The peer cannot be reached: no callis to it opened before the send's deadline (the
    /// message says why, with the last dial error). The message was not sent.
    PeerUnavailable = 3,
    /// The remote taberna rejected the delivery.
    RemoteTabernaRejected = 4,
    /// The connection was lost.
    ConnectionLost = 5,
    /// The peer restarted; work retained for its previous session is lost.
    PeerRestarted = 6,
    /// The peer broke the wire protocol.
    ProtocolViolation = 7,
    /// The peer speaks a protocol version we do not support.
    UnsupportedVersion = 8,
    /// Encoding an outgoing message failed.
    EncodeFailure = 9,
    /// Decoding an incoming message failed.
    DecodeFailure = 10,
    /// The destination taberna's inbox is full.
    TabernaBusy = 11,
    /// A send was written to the peer but not answered within its timeout: the outcome is
    /// unknown (it may or may not have been delivered).
    SendTimeout = 12,
    /// Reserved (aurelia's number): a blob callis that arrives without a primary callis.
    /// vicus does not produce it: a blob callis is authenticated on its own (mutual TLS) and
    /// served by its peer's blob driver whether a primary callis is open or not; the epoch
    /// in its BLOB_HELLO tells a restarted peer apart.
    BlobCallisWithoutPrimary = 13,
    /// Reserved (aurelia's number): a peer sent blob data beyond its credit. vicus does not
    /// produce it: such data is a `ProtocolViolation` (naming the credit) that closes the
    /// blob callis.
    BlobAckWindowExceeded = 14,
    /// A blob stream id is unknown.
    BlobStreamNotFound = 15,
    /// Reserved (aurelia's number): a blob chunk arrived out of order. vicus does not
    /// produce it: blob data travels in order on one TLS stream; data that leaves a gap is a
    /// `ProtocolViolation`, and data received already (resent after a reconnect) is dropped.
    BlobStreamOutOfOrder = 16,
    /// A blob stream was idle for too long.
    BlobStreamIdleTimeout = 17,
    /// Reserved (aurelia's number): a blob chunk is missing. vicus does not produce it (see
    /// `BlobStreamOutOfOrder`): unacknowledged bytes are resent on the next blob callis, and
    /// a stream whose data stops coming ends in `BlobStreamIdleTimeout`.
    BlobStreamMissingChunk = 18,
    /// The blob byte budget is exhausted.
    BlobBufferFull = 19,
    /// Reserved (aurelia's number): a peer's address does not match what was expected. vicus
    /// does not produce it: a peer is known by its certificate's identity, not its address
    /// (a dial that reaches another identity ends in `IdentityMismatch`).
    AddressMismatch = 20,
    /// A taberna with this id is already registered.
    TabernaAlreadyRegistered = 21,
    /// A configuration value is invalid.
    InvalidConfig = 22,
    /// The domus has been shut down.
    DomusClosed = 23,
    /// A receive did not complete within its timeout.
    ReceiveTimeout = 24,
    /// Reserved (aurelia's number): a reporting snapshot is not available. vicus does not
    /// produce it: a domus's own snapshot is always available, and a node that does not run
    /// the reporting service answers `UnknownTaberna` (see `services::reporting::fetch`).
    SnapshotNotAvailable = 25,
    /// The destination taberna is shutting down.
    TabernaShutdown = 26,
    /// The route resolver could not get an answer from its source (DNS failed or timed out, a
    /// routes file is unreadable or invalid). Reported on the error feed; the routes it gave
    /// before are kept.
    ResolverFailed = 27,

    /// Key material (certificates, key, CA bundle, CRLs) could not be read or is unusable.
    InvalidAuthMaterial = 100,
    /// A string is not a valid [`DomusId`](crate::DomusId).
    InvalidDomusId = 101,
    /// The peer's certificate was refused by our verification (chain, validity, revocation,
    /// identity or trust policy).
    PeerCertificateRejected = 102,
    /// The peer refused our certificate (it sent a TLS alert).
    CertificateRefusedByPeer = 103,
    /// The peer presented a valid identity, but not the one we dialled.
    IdentityMismatch = 104,
    /// The TLS handshake failed for a reason other than a certificate.
    HandshakeFailed = 105,
    /// The whole handshake did not finish within its deadline.
    HandshakeTimeout = 106,
    /// The TCP or Unix-socket connect failed.
    ConnectFailed = 107,
    /// The connect did not finish within its deadline.
    ConnectTimeout = 108,
    /// A connection was turned away before any TLS work (admission limits).
    AdmissionRefused = 109,
    /// Reserved: a Unix-socket peer's uid is not in `unix_allowed_uids`. vicus does not
    /// produce it: such a connection is closed before any TLS work and counted in
    /// `ListenerStats::refused_uid` (never returned by `Listener::accept`), and the dialer,
    /// told nothing by design, sees `HandshakeFailed` ("closed the connection").
    UnixPeerNotAllowed = 110,
    /// Something already listens on the Unix-socket path.
    SocketPathInUse = 111,
    /// The Unix-socket path holds something that is not a stale socket of ours.
    SocketPathOccupied = 112,
    /// An address could not be parsed or resolved.
    InvalidAddress = 113,
    /// A socket operation failed.
    Io = 114,

    /// A payload is larger than the peer (or this domus) accepts in one frame.
    PayloadTooLarge = 150,
    /// The destination taberna does not accept messages from this peer (its allow-list).
    Forbidden = 151,
    /// The destination taberna does not accept this message type.
    MessageTypeNotAccepted = 152,
    /// The message type is outside the range the caller may use (applications send A3 only).
    InvalidMessageType = 153,
    /// A reply was produced but could not be kept for a resend after a reconnect (the
    /// per-peer reply retention budget was exhausted).
    ReplyLost = 154,
    /// The handler dropped the request without answering it.
    RequestDropped = 155,
    /// The other end of a blob stream cancelled it (dropped its sender or receiver early, or
    /// called `cancel`).
    BlobCancelled = 156,
    /// The peer shut down (it said so with a CLOSE `DomusClosed`). A send that ends with it was
    /// never delivered, unless the peer's own rejection carries it: then a handler had the
    /// message when the peer shut down and the outcome is unknown (see *Delivery semantics*).
    PeerShutDown = 157,
    /// A message's headers are over a limit: more than the receiver's (or this domus's)
    /// `max_headers` entries or `max_headers_len` bytes, or past the 65,534 bytes the wire
    /// allows. The receiver refuses such a message before any handler sees it.
    HeadersTooLarge = 158,
    /// A header is not valid: a key outside `a-z 0-9 - _ .` or over 64 bytes, a value over
    /// 65,535 bytes, or a `traceparent` that is not a W3C trace context.
    InvalidHeader = 159,
    /// A subscriber fell behind: its copy of a publish waited longer than the topic's
    /// slow-subscriber policy allows, or found its lane or inbox full. The copy was not
    /// delivered; the other subscribers are not held back.
    SubscriberTooSlow = 160,
    /// A copy of a publish reached a subscriber that no longer holds a matching
    /// subscription (it ended while the copy was on its way). Nothing was delivered.
    NotSubscribed = 161,
    /// A topic or topic pattern is not valid (empty or over-long segments, a wildcard in a
    /// topic, `>` not last, more than the allowed length or segments).
    InvalidTopic = 162,
}

impl fmt::Display for ErrorId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.name(), self.as_u32())
    }
}

/// The error type of every fallible vicus operation.
///
/// Match on [`Error::id`]; the message is for people. Messages are bounded to
/// [`ERROR_MESSAGE_MAX_LEN`] bytes and never contain key material.
#[derive(Clone, PartialEq, Eq)]
pub struct Error {
    id: ErrorId,
    message: Box<str>,
    rejection: Option<Box<Rejection>>,
    /// Set on a send's error when the message may have reached a handler (see
    /// [`Error::outcome_unknown`]) for an id that does not say so by itself.
    may_have_been_delivered: bool,
}

/// What a receiving taberna said when it rejected a delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// The application's reject code.
    pub code: u32,
    /// The application's reason (bounded, escaped).
    pub reason: String,
}

impl Error {
    /// Creates an error with the given id and message (cut to [`ERROR_MESSAGE_MAX_LEN`]).
    pub fn new(id: ErrorId, message: impl Into<String>) -> Self {
        let mut message: String = message.into();
        truncate_at_char_boundary(&mut message, ERROR_MESSAGE_MAX_LEN);
        Self {
            id,
            message: message.into_boxed_str(),
            rejection: None,
            may_have_been_delivered: false,
        }
    }

    /// An application rejection: id [`ErrorId::RemoteTabernaRejected`], carrying the
    /// receiver's code and reason.
    pub(crate) fn rejected(code: u32, reason: &str, context: impl fmt::Display) -> Self {
        let reason = untrusted(reason);
        let mut e = Self::new(
            ErrorId::RemoteTabernaRejected,
            format!("{context} rejected the message with code {code}: {reason}"),
        );
        e.rejection = Some(Box::new(Rejection { code, reason }));
        e
    }

    /// The receiver's code and reason, when this is an application rejection.
    pub fn rejection(&self) -> Option<&Rejection> {
        self.rejection.as_deref()
    }

    /// For the error of a send: whether the message may have reached a handler on the
    /// receiving domus, so the outcome is unknown (make handlers idempotent where it matters).
    /// True for [`ErrorId::SendTimeout`] (it was written to the peer and not answered before
    /// its deadline), [`ErrorId::PeerRestarted`] (the peer restarted while it was unanswered),
    /// a [`ErrorId::PeerShutDown`] the peer answered with (a handler held it when the peer shut
    /// down), and a [`ErrorId::DomusClosed`] for a message already written when this domus
    /// shut down. False for every other error: the receiver refused the message, or it was
    /// never delivered (`LocalQueueFull`, `PeerUnavailable`, a `PeerShutDown` from the
    /// peer's CLOSE, `PayloadTooLarge`, …).
    pub fn outcome_unknown(&self) -> bool {
        self.may_have_been_delivered
            || matches!(self.id, ErrorId::SendTimeout | ErrorId::PeerRestarted)
    }

    /// Marks a send's error as one whose message may have reached a handler.
    pub(crate) fn maybe_delivered(mut self) -> Self {
        self.may_have_been_delivered = true;
        self
    }

    /// The stable id of this failure.
    pub fn id(&self) -> ErrorId {
        self.id
    }

    /// The human-readable message (without the id).
    pub fn message(&self) -> &str {
        &self.message
    }

    pub(crate) fn io(what: impl fmt::Display, err: &std::io::Error) -> Self {
        Self::new(ErrorId::Io, format!("{what}: {err}"))
    }

    pub(crate) fn invalid_config(field: &str, problem: impl fmt::Display) -> Self {
        Self::new(ErrorId::InvalidConfig, format!("{field}: {problem}"))
    }

    pub(crate) fn handshake_timeout(after: Duration) -> Self {
        Self::new(
            ErrorId::HandshakeTimeout,
            format!(
                "handshake did not finish within {after:?} (handshake_timeout); the peer is slow, stalled or not speaking vicus"
            ),
        )
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("Error");
        d.field("id", &self.id).field("message", &self.message);
        if let Some(r) = &self.rejection {
            d.field("rejection", r);
        }
        if self.may_have_been_delivered {
            d.field("outcome_unknown", &true);
        }
        d.finish()
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.id.name(), self.message)
    }
}

impl std::error::Error for Error {}

fn truncate_at_char_boundary(s: &mut String, max: usize) {
    if s.len() <= max {
        return;
    }
    let mut cut = max.saturating_sub('…'.len_utf8());
    while !s.is_char_boundary(cut) {
        cut = cut.saturating_sub(1);
    }
    s.truncate(cut);
    s.push('…');
}

/// Renders a peer-controlled string for a log line or an error message: escaped (no newlines,
/// control characters or terminal escapes survive) and capped in length.
pub(crate) fn untrusted(s: &str) -> String {
    let mut out = String::with_capacity(s.len().min(UNTRUSTED_MAX_CHARS) + 2);
    for (n, c) in s.chars().enumerate() {
        if n >= UNTRUSTED_MAX_CHARS {
            out.push('…');
            break;
        }
        // Control characters (newlines, ESC of terminal sequences) and invisible
        // formatting characters (bidi overrides) are escaped; everything else is kept.
        if c.is_control()
            || matches!(c, '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
        {
            out.extend(c.escape_debug());
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_and_are_unique() {
        let mut seen = std::collections::HashSet::new();
        for id in ErrorId::ALL {
            assert!(seen.insert(id.as_u32()), "duplicate number for {id}");
            assert_eq!(ErrorId::try_from(id.as_u32()), Ok(*id));
        }
        assert_eq!(ErrorId::try_from(0), Err(0));
        assert_eq!(ErrorId::UnknownTaberna.as_u32(), 1);
        assert_eq!(ErrorId::TabernaShutdown.as_u32(), 26);
    }

    #[test]
    fn messages_are_bounded_at_a_char_boundary() {
        let e = Error::new(ErrorId::Io, "é".repeat(ERROR_MESSAGE_MAX_LEN));
        assert!(e.message().len() <= ERROR_MESSAGE_MAX_LEN);
        assert!(e.message().ends_with('…'));
    }

    #[test]
    fn t30_untrusted_strings_are_escaped_and_capped() {
        let s = untrusted("spiffe://x/\n\u{1b}[31mred");
        assert!(!s.contains('\n') && !s.contains('\u{1b}'));
        assert!(s.contains("\\n") && s.contains("\\u{1b}"));
        let long = untrusted(&"a".repeat(10_000));
        assert!(long.chars().count() <= UNTRUSTED_MAX_CHARS + 1);
    }
}
