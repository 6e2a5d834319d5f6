//! Wire codes: the one place where the reason numbers that travel in frames meet [`ErrorId`].
//!
//! Three frames carry a reason number: REJECT (its `error` field; the application's own
//! `code` beside it is the application's business, not ours), CLOSE and BLOB_CANCEL (their
//! `code`). On the wire each is a [`WireCode`]: the stable number of an [`ErrorId`]
//! (DESIGN §9), so encoding is `WireCode::from(id)` and nothing else. Decoding is where a
//! peer gets a say — any `u32` may arrive — and it is written here once, per frame kind:
//!
//! - in a REJECT, [`WireCode::rejection_id`]: a number this version does not know becomes
//!   [`UNKNOWN_IN_REJECT`] (`RemoteTabernaRejected`): the peer did refuse the message, a newer
//!   vicus may name a refusal this one lacks, and the sender's caller must see a refusal, not a
//!   transport failure;
//! - in a CLOSE or BLOB_CANCEL, [`WireCode::closing_id`]: an unknown number becomes
//!   [`UNKNOWN_IN_CLOSE`] (`ConnectionLost`): the callis or stream ended for a reason this
//!   version cannot name, which is what `ConnectionLost` says.
//!
//! A few numbers mean more on the wire than their id does, and have constants:
//! [`WireCode::APPLICATION_REJECT`] (a REJECT that carries the application's code),
//! [`WireCode::PEER_SHUT_DOWN`] (in a REJECT: a handler held the message when the receiver
//! shut down, so the outcome is unknown) and [`WireCode::DOMUS_CLOSED`] (in a CLOSE: the peer
//! shuts down in order, having answered everything it delivered).
//!
//! Every classification of codes lives here too (STYLE 7), so that "which ids count as X" is
//! one list, tested in one table: on [`WireCode`] where the question is about what travels
//! (which refusals count against `max_refusals_per_second`), and as `pub(crate)` methods on
//! [`ErrorId`] where the question is about an error this domus holds (a permanent dial
//! failure, a send rejected by its receiver, a room wait that overran, a close that is the
//! peer's protocol violation). They sit in this module rather than in `error.rs` so that the
//! lists are found together, and `error.rs` stays the public catalogue of ids.
//!
//! Pure: no IO, no clock, no allocation. This module must not build messages or errors
//! (that stays with the code that knows the context), and must not hand a peer's number to
//! the caller as anything but a known [`ErrorId`] or one of the two fallbacks above.

use std::fmt;

use crate::error::ErrorId;

/// A reason number as it travels in REJECT (`error`), CLOSE and BLOB_CANCEL (`code`): the
/// stable number of an [`ErrorId`], or — from a peer — any `u32`.
///
/// An open newtype, like [`FrameType`](super::frame::FrameType): a number this version does
/// not know is kept as it came (and reported as such), never rejected at the codec.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct WireCode(pub u32);

/// What a REJECT's number becomes when this version does not know it (see the module doc).
pub const UNKNOWN_IN_REJECT: ErrorId = ErrorId::RemoteTabernaRejected;

/// What a CLOSE's or BLOB_CANCEL's number becomes when this version does not know it (see the
/// module doc).
pub const UNKNOWN_IN_CLOSE: ErrorId = ErrorId::ConnectionLost;

impl WireCode {
    /// In a REJECT: the receiving application refused the message; the REJECT's `code` and
    /// reason are the application's.
    pub const APPLICATION_REJECT: Self = Self::of(ErrorId::RemoteTabernaRejected);
    /// In a REJECT: a handler held the message when the receiving domus shut down, so the
    /// handler may have acted on it (the sender's outcome is unknown).
    pub const PEER_SHUT_DOWN: Self = Self::of(ErrorId::PeerShutDown);
    /// In a CLOSE: the peer shuts down in order; it answered every message it delivered
    /// before this CLOSE, so what is unanswered was never delivered.
    pub const DOMUS_CLOSED: Self = Self::of(ErrorId::DomusClosed);

    /// The code of `id` (its stable number).
    pub const fn of(id: ErrorId) -> Self {
        Self(id.as_u32())
    }

    /// The id this number names, or `None` when this version does not know it.
    pub fn error_id(self) -> Option<ErrorId> {
        ErrorId::try_from(self.0).ok()
    }

    /// The id a REJECT with this number reaches the sender as: its own id, or
    /// [`UNKNOWN_IN_REJECT`] for an unknown number.
    pub fn rejection_id(self) -> ErrorId {
        self.error_id().unwrap_or(UNKNOWN_IN_REJECT)
    }

    /// The id a CLOSE or BLOB_CANCEL with this number is named by: its own id, or
    /// [`UNKNOWN_IN_CLOSE`] for an unknown number.
    pub fn closing_id(self) -> ErrorId {
        self.error_id().unwrap_or(UNKNOWN_IN_CLOSE)
    }

    /// Whether a refusal with this number, written by this side, counts against
    /// `max_refusals_per_second` (T24): the refusals vicus decides itself on what the peer
    /// sent — a taberna that does not exist or does not take it, a message type out of range,
    /// a blob open refused for the peer's own fault or over the stream cap (T23). Not the
    /// application's rejections, nor answers about this side's own state (busy, shutting
    /// down, a reply too large or lost), which a peer cannot force at will.
    pub(crate) fn is_counted_refusal(self) -> bool {
        matches!(
            self.error_id(),
            Some(
                ErrorId::UnknownTaberna
                    | ErrorId::Forbidden
                    | ErrorId::MessageTypeNotAccepted
                    | ErrorId::InvalidMessageType
                    | ErrorId::BlobBufferFull
                    | ErrorId::DecodeFailure
                    | ErrorId::ProtocolViolation
                    | ErrorId::HeadersTooLarge
            )
        )
    }
}

impl From<ErrorId> for WireCode {
    fn from(id: ErrorId) -> Self {
        Self::of(id)
    }
}

/// The number, as it travels.
impl fmt::Display for WireCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

/// The id's name and number when the number is known (`DomusClosed(23)`), else
/// `WireCode(n)`.
impl fmt::Debug for WireCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.error_id() {
            Some(id) => write!(f, "{}({})", id.name(), self.0),
            None => write!(f, "WireCode({})", self.0),
        }
    }
}

/// Classifications of the errors this domus holds.
impl ErrorId {
    /// A dial failure that will not change by itself (the wrong peer answered, a certificate
    /// was refused, the address is malformed): what waits for the peer fails at once.
    pub(crate) fn is_permanent_dial_failure(self) -> bool {
        matches!(
            self,
            ErrorId::IdentityMismatch
                | ErrorId::PeerCertificateRejected
                | ErrorId::CertificateRefusedByPeer
                | ErrorId::InvalidAddress
        )
    }

    /// The id a send that could not reach its peer fails with after a dial failed with this
    /// id: a permanent failure keeps its own id, so the caller can tell a misdirected route
    /// from a peer that is down (T11); anything else is `PeerUnavailable`.
    pub(crate) fn unreachable_send_id(self) -> ErrorId {
        if self.is_permanent_dial_failure() {
            self
        } else {
            ErrorId::PeerUnavailable
        }
    }

    /// A send that ended with this id was refused by the receiving side (its application,
    /// its taberna registry, or its domus's checks), rather than lost, timed out or failed
    /// here: counted in `messages_rejected` and in `rejected_by` under this id.
    pub(crate) fn is_rejection(self) -> bool {
        matches!(
            self,
            ErrorId::RemoteTabernaRejected
                | ErrorId::UnknownTaberna
                | ErrorId::TabernaBusy
                | ErrorId::Forbidden
                | ErrorId::MessageTypeNotAccepted
                | ErrorId::InvalidMessageType
                | ErrorId::PayloadTooLarge
                | ErrorId::BlobBufferFull
                | ErrorId::RequestDropped
                | ErrorId::TabernaShutdown
                | ErrorId::DecodeFailure
                | ErrorId::HeadersTooLarge
        )
    }

    /// For the error of a wait for a peer's in-flight room (which waits for nothing else):
    /// the room did not come — the queue was full, or the peer's driver turned the waiters
    /// away — so the send counts as an outbound queue overrun.
    pub(crate) fn is_queue_overrun(self) -> bool {
        matches!(
            self,
            ErrorId::LocalQueueFull | ErrorId::PeerUnavailable | ErrorId::PeerShutDown
        )
    }

    /// A reason to close a callis that is the peer's fault on the wire (it broke the protocol
    /// or speaks another version): counted in `protocol_violations` and published with the
    /// peer's identity.
    pub(crate) fn is_protocol_violation(self) -> bool {
        matches!(
            self,
            ErrorId::ProtocolViolation | ErrorId::UnsupportedVersion
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_id_round_trips_through_its_code() {
        for &id in ErrorId::ALL {
            let code = WireCode::from(id);
            assert_eq!(code.0, id.as_u32(), "{id}: the code is the stable number");
            assert_eq!(code.error_id(), Some(id));
            assert_eq!(code.rejection_id(), id);
            assert_eq!(code.closing_id(), id);
        }
    }

    #[test]
    fn unknown_numbers_become_the_documented_fallbacks() {
        let known: std::collections::HashSet<u32> =
            ErrorId::ALL.iter().map(|id| id.as_u32()).collect();
        // Around every known number, the gaps between the ranges, and the extremes.
        let candidates = (0..=300).chain([1000, 65_535, u32::MAX - 1, u32::MAX]);
        let mut unknown = 0;
        for n in candidates.filter(|n| !known.contains(n)) {
            let code = WireCode(n);
            assert_eq!(code.error_id(), None, "{n}");
            assert_eq!(code.rejection_id(), ErrorId::RemoteTabernaRejected, "{n}");
            assert_eq!(code.closing_id(), ErrorId::ConnectionLost, "{n}");
            assert!(!code.is_counted_refusal(), "{n}");
            assert_eq!(format!("{code:?}"), format!("WireCode({n})"));
            unknown += 1;
        }
        assert!(unknown > 200, "the table tested {unknown} unknown numbers");
        assert_eq!(format!("{:?}", WireCode::DOMUS_CLOSED), "DomusClosed(23)");
        assert_eq!(WireCode::PEER_SHUT_DOWN.to_string(), "157");
    }

    #[test]
    fn the_named_codes_are_their_ids() {
        assert_eq!(
            WireCode::APPLICATION_REJECT.error_id(),
            Some(ErrorId::RemoteTabernaRejected)
        );
        assert_eq!(
            WireCode::PEER_SHUT_DOWN.error_id(),
            Some(ErrorId::PeerShutDown)
        );
        assert_eq!(
            WireCode::DOMUS_CLOSED.error_id(),
            Some(ErrorId::DomusClosed)
        );
    }

    /// Every id against every classification: a change to any list shows up here as a
    /// changed row, not as a behaviour change somewhere else.
    #[test]
    fn classification_table() {
        // (id, counted refusal, permanent dial failure, rejection, queue overrun, violation)
        #[rustfmt::skip]
        let table: &[(ErrorId, bool, bool, bool, bool, bool)] = &[
            (ErrorId::UnknownTaberna,           true,  false, true,  false, false),
            (ErrorId::LocalQueueFull,           false, false, false, true,  false),
            (ErrorId::PeerUnavailable,          false, false, false, true,  false),
            (ErrorId::RemoteTabernaRejected,    false, false, true,  false, false),
            (ErrorId::ConnectionLost,           false, false, false, false, false),
            (ErrorId::PeerRestarted,            false, false, false, false, false),
            (ErrorId::ProtocolViolation,        true,  false, false, false, true ),
            (ErrorId::UnsupportedVersion,       false, false, false, false, true ),
            (ErrorId::EncodeFailure,            false, false, false, false, false),
            (ErrorId::DecodeFailure,            true,  false, true,  false, false),
            (ErrorId::TabernaBusy,              false, false, true,  false, false),
            (ErrorId::SendTimeout,              false, false, false, false, false),
            (ErrorId::BlobCallisWithoutPrimary, false, false, false, false, false),
            (ErrorId::BlobAckWindowExceeded,    false, false, false, false, false),
            (ErrorId::BlobStreamNotFound,       false, false, false, false, false),
            (ErrorId::BlobStreamOutOfOrder,     false, false, false, false, false),
            (ErrorId::BlobStreamIdleTimeout,    false, false, false, false, false),
            (ErrorId::BlobStreamMissingChunk,   false, false, false, false, false),
            (ErrorId::BlobBufferFull,           true,  false, true,  false, false),
            (ErrorId::AddressMismatch,          false, false, false, false, false),
            (ErrorId::TabernaAlreadyRegistered, false, false, false, false, false),
            (ErrorId::InvalidConfig,            false, false, false, false, false),
            (ErrorId::DomusClosed,              false, false, false, false, false),
            (ErrorId::ReceiveTimeout,           false, false, false, false, false),
            (ErrorId::SnapshotNotAvailable,     false, false, false, false, false),
            (ErrorId::TabernaShutdown,          false, false, true,  false, false),
            (ErrorId::ResolverFailed,           false, false, false, false, false),
            (ErrorId::InvalidAuthMaterial,      false, false, false, false, false),
            (ErrorId::InvalidDomusId,           false, false, false, false, false),
            (ErrorId::PeerCertificateRejected,  false, true,  false, false, false),
            (ErrorId::CertificateRefusedByPeer, false, true,  false, false, false),
            (ErrorId::IdentityMismatch,         false, true,  false, false, false),
            (ErrorId::HandshakeFailed,          false, false, false, false, false),
            (ErrorId::HandshakeTimeout,         false, false, false, false, false),
            (ErrorId::ConnectFailed,            false, false, false, false, false),
            (ErrorId::ConnectTimeout,           false, false, false, false, false),
            (ErrorId::AdmissionRefused,         false, false, false, false, false),
            (ErrorId::UnixPeerNotAllowed,       false, false, false, false, false),
            (ErrorId::SocketPathInUse,          false, false, false, false, false),
            (ErrorId::SocketPathOccupied,       false, false, false, false, false),
            (ErrorId::InvalidAddress,           false, true,  false, false, false),
            (ErrorId::Io,                       false, false, false, false, false),
            (ErrorId::PayloadTooLarge,          false, false, true,  false, false),
            (ErrorId::Forbidden,                true,  false, true,  false, false),
            (ErrorId::MessageTypeNotAccepted,   true,  false, true,  false, false),
            (ErrorId::InvalidMessageType,       true,  false, true,  false, false),
            (ErrorId::ReplyLost,                false, false, false, false, false),
            (ErrorId::RequestDropped,           false, false, true,  false, false),
            (ErrorId::BlobCancelled,            false, false, false, false, false),
            (ErrorId::PeerShutDown,             false, false, false, true,  false),
            (ErrorId::HeadersTooLarge,          true,  false, true,  false, false),
            (ErrorId::InvalidHeader,            false, false, false, false, false),
            (ErrorId::SubscriberTooSlow,        false, false, false, false, false),
            (ErrorId::NotSubscribed,            false, false, false, false, false),
            (ErrorId::InvalidTopic,             false, false, false, false, false),
        ];
        let listed: Vec<ErrorId> = table.iter().map(|row| row.0).collect();
        assert_eq!(listed, ErrorId::ALL, "one row per id, in numeric order");
        for &(id, refusal, permanent, rejection, overrun, violation) in table {
            let code = WireCode::from(id);
            assert_eq!(code.is_counted_refusal(), refusal, "{id}: counted refusal");
            assert_eq!(id.is_permanent_dial_failure(), permanent, "{id}: permanent");
            assert_eq!(id.is_rejection(), rejection, "{id}: rejection");
            assert_eq!(id.is_queue_overrun(), overrun, "{id}: queue overrun");
            assert_eq!(id.is_protocol_violation(), violation, "{id}: violation");
            let unreachable = if permanent {
                id
            } else {
                ErrorId::PeerUnavailable
            };
            assert_eq!(id.unreachable_send_id(), unreachable, "{id}: unreachable");
        }
    }
}
