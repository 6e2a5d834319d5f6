//! The one map from a vicus [`ErrorId`] to an HTTP status, and the JSON body every error
//! response carries.
//!
//! Pure: no IO, no clock. Every id has exactly one status ([`status_of`] is an exhaustive
//! `match`, so a new id does not compile until it is given one here), and the gateway's own
//! refusals (a missing token, a full gateway, a body that never finished) are the few
//! [`GatewayRefusal`]s beside it. Bodies never carry internal detail beyond the id unless the
//! gateway was configured with `detailed_errors` (T35): the default `message` is a fixed text
//! per status.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::error::{Error, ErrorId};

/// How long a client is told to wait (`Retry-After`, seconds) after a refusal that clears by
/// itself (a full inbox, a full queue, a busy gateway).
pub const RETRY_AFTER_SECS: u32 = 1;

/// The HTTP status of a vicus error, and whether it carries `Retry-After`.
///
/// The table (also in the module docs of [`crate::gateway`]):
/// 4xx — the request cannot succeed as sent; 502 — the peer or the path to it failed;
/// 503 (+ `Retry-After`) — a refusal that clears by itself; 504 — a deadline passed (the
/// body's `outcome_unknown` says whether the message may have been delivered); 500 — an id a
/// send never produces (configuration and local setup errors).
pub const fn status_of(id: ErrorId) -> (StatusCode, bool) {
    use ErrorId as E;
    const RETRY: bool = true;
    match id {
        E::UnknownTaberna => (StatusCode::NOT_FOUND, false),
        E::Forbidden => (StatusCode::FORBIDDEN, false),
        E::PayloadTooLarge => (StatusCode::PAYLOAD_TOO_LARGE, false),
        E::InvalidMessageType | E::DecodeFailure | E::InvalidHeader | E::InvalidTopic => {
            (StatusCode::BAD_REQUEST, false)
        }
        // Message headers come from the request's HTTP headers (a documented prefix).
        E::HeadersTooLarge => (StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE, false),
        E::MessageTypeNotAccepted => (StatusCode::UNSUPPORTED_MEDIA_TYPE, false),
        E::RemoteTabernaRejected => (StatusCode::UNPROCESSABLE_ENTITY, false),
        E::TabernaBusy
        | E::LocalQueueFull
        | E::BlobBufferFull
        | E::TabernaShutdown
        | E::AdmissionRefused
        | E::PeerShutDown
        | E::SubscriberTooSlow => (StatusCode::SERVICE_UNAVAILABLE, RETRY),
        E::DomusClosed | E::SnapshotNotAvailable => (StatusCode::SERVICE_UNAVAILABLE, false),
        E::SendTimeout
        | E::ReceiveTimeout
        | E::BlobStreamIdleTimeout
        | E::HandshakeTimeout
        | E::ConnectTimeout => (StatusCode::GATEWAY_TIMEOUT, false),
        E::PeerUnavailable
        | E::ConnectionLost
        | E::PeerRestarted
        | E::ProtocolViolation
        | E::UnsupportedVersion
        | E::BlobCallisWithoutPrimary
        | E::BlobAckWindowExceeded
        | E::BlobStreamNotFound
        | E::BlobStreamOutOfOrder
        | E::BlobStreamMissingChunk
        | E::AddressMismatch
        | E::ResolverFailed
        | E::PeerCertificateRejected
        | E::CertificateRefusedByPeer
        | E::IdentityMismatch
        | E::HandshakeFailed
        | E::ConnectFailed
        | E::UnixPeerNotAllowed
        | E::InvalidAddress
        | E::Io
        | E::ReplyLost
        | E::RequestDropped
        | E::BlobCancelled
        | E::NotSubscribed => (StatusCode::BAD_GATEWAY, false),
        E::EncodeFailure
        | E::TabernaAlreadyRegistered
        | E::InvalidConfig
        | E::InvalidAuthMaterial
        | E::InvalidDomusId
        | E::SocketPathInUse
        | E::SocketPathOccupied => (StatusCode::INTERNAL_SERVER_ERROR, false),
    }
}

/// The fixed public text of an error response with this status (what a client reads when the
/// gateway does not expose vicus's own messages).
fn public_text(id: ErrorId) -> &'static str {
    use ErrorId as E;
    match id {
        E::UnknownTaberna => "no taberna with this id is reachable",
        E::Forbidden => "the taberna does not accept messages from this gateway's domus",
        E::PayloadTooLarge => "the payload is larger than the limit",
        E::InvalidMessageType => "the message type is missing or not an application type",
        E::DecodeFailure => "the taberna could not decode the payload",
        E::MessageTypeNotAccepted => "the taberna does not accept this message type",
        E::HeadersTooLarge => "the message headers are over a limit",
        E::InvalidHeader => "a message header is not valid",
        E::RemoteTabernaRejected => "the taberna rejected the message",
        E::SendTimeout => "no answer before the deadline: the outcome is unknown",
        _ => match status_of(id).0 {
            StatusCode::SERVICE_UNAVAILABLE => "temporarily unavailable: retry later",
            StatusCode::GATEWAY_TIMEOUT => "a deadline passed",
            StatusCode::BAD_GATEWAY => "the taberna's domus could not be reached or failed",
            _ => "the gateway's domus failed",
        },
    }
}

/// A refusal of the gateway itself, before or around vicus (no [`ErrorId`]: its body's `id`
/// is `null`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum GatewayRefusal {
    /// 400: the request is malformed (a taberna id that is not a number, a `Vicus-Blob`
    /// value that is not base64, a body the connection failed to deliver).
    BadRequest,
    /// 401 (+ `WWW-Authenticate: Bearer`): no bearer token, or not one of the configured ones.
    Unauthorized,
    /// 404: no such route (also `GET /metrics` when no renderer is configured).
    NotFound,
    /// 405: the route exists, not with this method.
    MethodNotAllowed,
    /// 408: the request body did not arrive within `request_timeout` (a blob's body: no
    /// byte for `request_timeout`). Nothing was delivered (a blob begun is cancelled).
    RequestTimeout,
    /// 503 (+ `Retry-After`): `max_concurrent` requests (or `max_pending_async` detached
    /// sends) are in progress.
    GatewayBusy,
    /// 504: the request's deadline passed while it waited for vicus (the outcome is unknown).
    GatewayTimeout,
}

impl GatewayRefusal {
    /// Its name in the body's `error` field.
    pub const fn name(self) -> &'static str {
        match self {
            Self::BadRequest => "BadRequest",
            Self::Unauthorized => "Unauthorized",
            Self::NotFound => "NotFound",
            Self::MethodNotAllowed => "MethodNotAllowed",
            Self::RequestTimeout => "RequestTimeout",
            Self::GatewayBusy => "GatewayBusy",
            Self::GatewayTimeout => "GatewayTimeout",
        }
    }

    /// Its status, and whether it carries `Retry-After`.
    pub const fn status(self) -> (StatusCode, bool) {
        match self {
            Self::BadRequest => (StatusCode::BAD_REQUEST, false),
            Self::Unauthorized => (StatusCode::UNAUTHORIZED, false),
            Self::NotFound => (StatusCode::NOT_FOUND, false),
            Self::MethodNotAllowed => (StatusCode::METHOD_NOT_ALLOWED, false),
            Self::RequestTimeout => (StatusCode::REQUEST_TIMEOUT, false),
            Self::GatewayBusy => (StatusCode::SERVICE_UNAVAILABLE, true),
            Self::GatewayTimeout => (StatusCode::GATEWAY_TIMEOUT, false),
        }
    }
}

/// An error response: a vicus error or a gateway refusal, rendered as
/// `{"error": name, "id": number | null, "message": text, "outcome_unknown": bool}` (plus
/// `"rejection": {"code", "reason"}` for `RemoteTabernaRejected`).
#[derive(Debug)]
pub(super) struct ErrorResponse {
    status: StatusCode,
    retry_after: bool,
    body: serde_json::Value,
    close: bool,
}

impl ErrorResponse {
    /// The response for a vicus error; `detailed` exposes vicus's own message.
    pub(super) fn vicus(error: &Error, detailed: bool) -> Self {
        let (status, retry_after) = status_of(error.id());
        let message = if detailed {
            error.message()
        } else {
            public_text(error.id())
        };
        let mut body = serde_json::json!({
            "error": error.id().name(),
            "id": error.id().as_u32(),
            "message": message,
            "outcome_unknown": error.outcome_unknown(),
        });
        if let (Some(r), Some(map)) = (error.rejection(), body.as_object_mut()) {
            // The application's own code and reason: what its handler chose to tell.
            map.insert(
                "rejection".to_owned(),
                serde_json::json!({ "code": r.code, "reason": r.reason }),
            );
        }
        Self {
            status,
            retry_after,
            body,
            close: false,
        }
    }

    /// The response for a refusal of the gateway's own, with a fixed message.
    pub(super) fn refusal(refusal: GatewayRefusal, message: &str) -> Self {
        let (status, retry_after) = refusal.status();
        Self {
            status,
            retry_after,
            body: serde_json::json!({
                "error": refusal.name(),
                "id": null,
                "message": message,
                "outcome_unknown": refusal == GatewayRefusal::GatewayTimeout,
            }),
            close: false,
        }
    }

    /// Marks the response `Connection: close` (a body left unread must not be parsed as the
    /// next request).
    pub(super) fn closing(mut self) -> Self {
        self.close = true;
        self
    }
}

impl IntoResponse for ErrorResponse {
    fn into_response(self) -> Response {
        let mut response = (
            self.status,
            [(header::CONTENT_TYPE, "application/json")],
            self.body.to_string(),
        )
            .into_response();
        let headers = response.headers_mut();
        if self.retry_after {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            headers.insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"vicus\""),
            );
        }
        if self.close {
            headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every id has one status, from the documented set, and the classes agree with vicus's
    /// own: a refusal that clears by itself carries `Retry-After`, an unknown outcome is never
    /// a 4xx (the client must not think it was refused).
    #[test]
    fn every_error_id_has_one_documented_status() {
        let allowed = [400, 403, 404, 413, 415, 422, 431, 500, 502, 503, 504];
        for &id in ErrorId::ALL {
            let (status, retry) = status_of(id);
            assert!(
                allowed.contains(&status.as_u16()),
                "{id} maps to an undocumented {status}"
            );
            if retry {
                assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{id}");
            }
            let error = Error::new(id, "x");
            if error.outcome_unknown() {
                assert!(
                    status.is_server_error(),
                    "{id}: unknown outcome as {status}"
                );
            }
            assert!(!public_text(id).is_empty());
        }
        // The named rows.
        let row = |id| status_of(id).0.as_u16();
        assert_eq!(row(ErrorId::UnknownTaberna), 404);
        assert_eq!(row(ErrorId::Forbidden), 403);
        assert_eq!(
            status_of(ErrorId::TabernaBusy),
            (StatusCode::SERVICE_UNAVAILABLE, true)
        );
        assert_eq!(
            status_of(ErrorId::LocalQueueFull),
            (StatusCode::SERVICE_UNAVAILABLE, true)
        );
        assert_eq!(row(ErrorId::PayloadTooLarge), 413);
        assert_eq!(row(ErrorId::SendTimeout), 504);
        assert_eq!(row(ErrorId::PeerUnavailable), 502);
    }

    /// The table in the module docs of `gateway` is the code's: every id is in exactly one
    /// row, the row of its status.
    #[test]
    fn the_documented_table_is_this_map() {
        let docs = include_str!("mod.rs");
        let mut seen = std::collections::HashMap::new();
        for line in docs.lines().filter_map(|l| l.strip_prefix("//! | ")) {
            let mut cells = line.split(" | ");
            let Some(status) = cells.next().and_then(|c| c.get(..3)?.parse::<u16>().ok()) else {
                continue;
            };
            let ids = cells.next().unwrap_or_default();
            for &id in ErrorId::ALL {
                if ids.contains(&format!("`{}`", id.name())) {
                    assert!(seen.insert(id, status).is_none(), "{id} is in two rows");
                }
            }
        }
        for &id in ErrorId::ALL {
            let documented = seen.get(&id).copied();
            assert_eq!(documented, Some(status_of(id).0.as_u16()), "{id}'s row");
            let retry_row = docs.lines().any(|l| {
                l.starts_with("//! | 503 + `Retry-After") && l.contains(&format!("`{}`", id.name()))
            });
            assert_eq!(retry_row, status_of(id).1, "{id}'s Retry-After");
        }
    }

    #[test]
    fn bodies_carry_the_id_and_say_when_the_outcome_is_unknown() {
        let e = Error::new(ErrorId::SendTimeout, "internal detail: 10.0.0.7:7000");
        let r = ErrorResponse::vicus(&e, false);
        assert_eq!(r.status, StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(r.body["error"], "SendTimeout");
        assert_eq!(r.body["id"], 12);
        assert_eq!(r.body["outcome_unknown"], true);
        assert!(!r.body.to_string().contains("10.0.0.7"), "{}", r.body);
        let detailed = ErrorResponse::vicus(&e, true);
        assert!(detailed.body.to_string().contains("10.0.0.7"));
        let busy = ErrorResponse::refusal(GatewayRefusal::GatewayBusy, "full").into_response();
        assert_eq!(busy.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(busy.headers()[header::RETRY_AFTER], "1");
    }
}
