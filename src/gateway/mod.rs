//! The HTTP gateway (feature `http-gateway`): a domus's tabernas reachable with plain HTTP.
//!
//! [`Gateway::router`] gives an [`axum::Router`] to mount in your own server, and [`serve`]
//! (plain HTTP) or [`serve_tls`] (HTTPS with client certificates) runs it on a listener with
//! the limits a server facing untrusted clients needs (`vicus node` serves it from its `[http]`
//! table). Routes:
//!
//! | route | what |
//! |---|---|
//! | `POST /tabernas/{id}` | a message (or a blob, with `Vicus-Blob`) to taberna `id` |
//! | `GET /healthz` | `200 {"status":"ok"}`, or 503 once the domus shuts down; never needs a token |
//! | `GET /metrics` | Prometheus text from the renderer given to [`GatewayConfig::metrics_renderer`] (404 without one) |
//!
//! ## A message: `POST /tabernas/{id}`
//!
//! * The **message type** is the header `Vicus-Message-Type` or the query `?type=`, as a
//!   number: decimal (`16777217`), hex (`0x01000001`) or an application offset `app:N`
//!   (`MessageType::try_app(N)`, so `app:1` is `0x01000001`). Missing or unparsable:
//!   400 `InvalidMessageType`.
//! * The **body** is the payload, at most the domus's `max_message_len` (read per request,
//!   so a live change applies): a `Content-Length` over it is refused with 413 before any of
//!   the body is read, a chunked body as soon as it passes it.
//! * **InOut** by default: the response waits for the outcome — `200` with the reply as the
//!   body (`application/octet-stream`), `204` when the taberna accepted without a reply.
//! * **InOnly** with `Prefer: respond-async` (RFC 7240): `202` as soon as vicus admitted the
//!   message (checked, routed, given in-flight room), with `Preference-Applied:
//!   respond-async`, a `Vicus-Request-Id` header and `{"request_id": N}`. The outcome then goes
//!   to the domus's event feed as [`Event::DetachedSendEnded`](crate::reporting::Event) with
//!   that id (`vicus node` prints it). At most `max_pending_async` such sends wait for their
//!   outcome at once (each ends by its send timeout); past that, 503 `GatewayBusy`.
//! * Message **headers** map to HTTP headers with the prefix `Vicus-Header-`, both ways: a
//!   request's `Vicus-Header-Tenant: acme` is the message header `tenant: acme` (repeated
//!   HTTP headers repeat; a key outside vicus's `a-z 0-9 - _ .` is 400 `InvalidHeader`; more
//!   than the domus's `max_headers` / `max_headers_len` is 431 `HeadersTooLarge`), and a
//!   reply's header `x` comes back as `vicus-header-x` (a value that cannot be an HTTP header
//!   value — a control byte — is left out, and `vicus-headers-omitted: N` says how many
//!   were). A valid W3C `traceparent` request header becomes the message's trace context (an
//!   invalid one is ignored), so the delivery continues the caller's trace; a reply's trace
//!   context comes back as `traceparent`.
//!
//! ## A blob: the same route with `Vicus-Blob`
//!
//! A request with the header `Vicus-Blob: <base64>` is a blob: the header's value (standard
//! base64, may be empty) is the blob's opening message, the body its bytes.
//! [`Domus::send_blob`] opens it (the handler's rejection or refusal ends the request with its
//! status); then each body chunk is written to the [`BlobSender`](crate::BlobSender) as it
//! arrives — never the whole body in memory: the next chunk is read only once the blob's
//! window took the last one, so a slow taberna slows the HTTP client down (TCP backpressure).
//! `204` once the taberna holds every byte (`BlobSender::finish`). The body is bounded by
//! `max_blob_len` (a `Content-Length` over it: 413 before opening); a body that brings no byte
//! for `request_timeout` is 408 and the blob is cancelled (the taberna's reader sees
//! `BlobCancelled`). `Prefer: respond-async` does not apply to blobs (the response always
//! waits for `finish`).
//!
//! ## Errors
//!
//! Every error is one status with a JSON body
//! `{"error": "<ErrorId name>", "id": <number>, "message": "…", "outcome_unknown": bool}`
//! (`"rejection": {"code", "reason"}` added for `RemoteTabernaRejected`: what the handler
//! chose to say). `message` is a fixed text per kind unless
//! [`GatewayConfig::detailed_errors`] is set — vicus's own messages name peers and addresses
//! (T35). Refusals of the gateway itself have `"id": null`. The whole table:
//!
//! | status | vicus `ErrorId`s | gateway refusals |
//! |---|---|---|
//! | 400 | `InvalidMessageType`, `DecodeFailure`, `InvalidHeader`, `InvalidTopic` | `BadRequest` (taberna id not a number, `Vicus-Blob` not base64, body broken off) |
//! | 401 | | `Unauthorized` (+ `WWW-Authenticate: Bearer`) |
//! | 403 | `Forbidden` | |
//! | 404 | `UnknownTaberna` | `NotFound` (no such route; `/metrics` without a renderer) |
//! | 405 | | `MethodNotAllowed` |
//! | 408 | | `RequestTimeout` (body not complete within `request_timeout`; `Connection: close`) |
//! | 413 | `PayloadTooLarge` (also a body over `max_message_len` / `max_blob_len`) | |
//! | 415 | `MessageTypeNotAccepted` | |
//! | 422 | `RemoteTabernaRejected` | |
//! | 431 | `HeadersTooLarge` (message headers come from HTTP headers) | |
//! | 500 | `EncodeFailure`, `TabernaAlreadyRegistered`, `InvalidConfig`, `InvalidAuthMaterial`, `InvalidDomusId`, `SocketPathInUse`, `SocketPathOccupied` (never from a send) | |
//! | 502 | `PeerUnavailable`, `ConnectionLost`, `PeerRestarted`, `ProtocolViolation`, `UnsupportedVersion`, `BlobCallisWithoutPrimary`, `BlobAckWindowExceeded`, `BlobStreamNotFound`, `BlobStreamOutOfOrder`, `BlobStreamMissingChunk`, `AddressMismatch`, `ResolverFailed`, `PeerCertificateRejected`, `CertificateRefusedByPeer`, `IdentityMismatch`, `HandshakeFailed`, `ConnectFailed`, `UnixPeerNotAllowed`, `InvalidAddress`, `Io`, `ReplyLost`, `RequestDropped`, `BlobCancelled`, `NotSubscribed` | |
//! | 503 + `Retry-After: 1` | `TabernaBusy`, `LocalQueueFull`, `BlobBufferFull`, `TabernaShutdown`, `AdmissionRefused`, `PeerShutDown`, `SubscriberTooSlow` | `GatewayBusy` |
//! | 503 | `DomusClosed`, `SnapshotNotAvailable` | |
//! | 504 | `SendTimeout`, `ReceiveTimeout`, `BlobStreamIdleTimeout`, `HandshakeTimeout`, `ConnectTimeout` | `GatewayTimeout` |
//!
//! `outcome_unknown` is [`Error::outcome_unknown`](crate::Error::outcome_unknown): true for a
//! `SendTimeout` (504: the message may have been delivered), `PeerRestarted` and the like —
//! retry only idempotent requests on those.
//!
//! ## Bounds and access
//!
//! * At most `max_concurrent` requests are handled at once (default 256); past that, 503
//!   `GatewayBusy` with `Retry-After` at once, without reading the body. Message bodies in
//!   memory are thus bounded by `max_concurrent` × `max_message_len`; blobs hold a chunk.
//! * Each request has a deadline, `request_timeout` (default 30 s): the body must arrive
//!   within it (else 408), and the send's own timeout is the domus's `send_timeout` capped by
//!   what is left of it (so it ends as `SendTimeout`, 504, with the outcome unknown).
//! * [`Access::Bearer`] requires `Authorization: Bearer <token>` on `/tabernas/…` and
//!   `/metrics` (tokens compared in constant time, never printed). [`serve`] refuses an open
//!   gateway on an address that is not loopback.
//! * HTTPS with client certificates: [`serve_tls`] with [`GatewayTls::mutual`] runs TLS 1.3
//!   with the domus's own material and verifier — every client presents a certificate of the
//!   mesh's CA (CRLs honoured) whose identity a [`TrustPolicy`](crate::TrustPolicy) accepts,
//!   or gets no HTTP at all — and hands each request its [`VerifiedClient`];
//!   [`Access::MutualTls`] makes that the access rule (a request that came another way is
//!   401). The server's leaf needs a DNS or IP SAN for HTTP clients' host name check.
//! * [`serve`] also bounds what axum leaves to the server: the time to read a request's
//!   headers (`header_read_timeout`) and the number of open connections (`max_connections`).
//!
//! This module sits above [`Domus`] and uses only its public API (plus the event feed's
//! recorder, for detached outcomes); nothing below imports it. It must not buffer a blob's
//! body, hold a request without a deadline, or put a token or vicus's internal messages in a
//! response or a log line (unless `detailed_errors`).

mod auth;
mod config;
mod serve;
mod status;

use std::future::poll_fn;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine as _;
use bytes::{Bytes, BytesMut};
use futures_core::Stream;
use tokio::sync::Semaphore;
use tokio::time::Instant;

pub use auth::{Access, BearerTokens, MAX_TOKEN_LEN, MIN_TOKEN_LEN, VerifiedClient};
pub use config::{GatewayConfig, MetricsRenderer};
pub use serve::{GatewayTls, serve, serve_tls};
use status::ErrorResponse;
pub use status::{GatewayRefusal, RETRY_AFTER_SECS, status_of};

use crate::a1_callis::headers::{Headers, TRACEPARENT, TraceContext};
use crate::domus::{Delivery, Domus, SendOptions};
use crate::error::{Error, ErrorId};
use crate::reporting::Event;
use crate::taberna::{MessageType, TabernaId};

/// The header that names the message type.
pub const MESSAGE_TYPE_HEADER: &str = "vicus-message-type";
/// The header that makes a request a blob; its value is the blob's opening message, base64.
pub const BLOB_HEADER: &str = "vicus-blob";

/// The prefix of HTTP headers that are vicus message headers, both ways: a request's
/// `Vicus-Header-Tenant: acme` is the message header `tenant: acme`, and a reply's header
/// `tenant` comes back as `vicus-header-tenant`.
pub const MESSAGE_HEADER_PREFIX: &str = "vicus-header-";

/// The response header that counts reply headers left out because their value cannot be an
/// HTTP header value (a control byte, say).
pub const HEADERS_OMITTED_HEADER: &str = "vicus-headers-omitted";
/// The response header of a `202` that names the detached send on the event feed.
pub const REQUEST_ID_HEADER: &str = "vicus-request-id";

/// The most a message body's buffer reserves before bytes arrive.
const INITIAL_BODY_CAPACITY: usize = 64 << 10;

/// The gateway in front of one domus: build it once, mount [`router`](Self::router) (or run
/// [`serve`]). Cheap to clone.
#[derive(Clone, Debug)]
pub struct Gateway {
    shared: Arc<Shared>,
}

struct Shared {
    domus: Domus,
    config: GatewayConfig,
    requests: Arc<Semaphore>,
    detached: Arc<Semaphore>,
    next_request_id: AtomicU64,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("domus", self.domus.identity())
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Gateway {
    /// A gateway sending through `domus` (it keeps the domus running, as a clone of it
    /// would); an invalid config is refused with `InvalidConfig` naming the field.
    pub fn new(domus: &Domus, config: GatewayConfig) -> Result<Self, Error> {
        config.validate()?;
        Ok(Self {
            shared: Arc::new(Shared {
                domus: domus.clone(),
                requests: Arc::new(Semaphore::new(config.max_concurrent)),
                detached: Arc::new(Semaphore::new(config.max_pending_async)),
                config,
                next_request_id: AtomicU64::new(1),
            }),
        })
    }

    /// The routes, to serve or to nest in a larger router. axum's default body limit is
    /// turned off for them: the gateway enforces its own (`max_message_len`,
    /// `max_blob_len`) while it streams.
    pub fn router(&self) -> Router {
        Router::new()
            .route("/tabernas/{id}", post(post_taberna))
            .route("/healthz", get(healthz))
            .route("/metrics", get(metrics))
            .fallback(not_found)
            .method_not_allowed_fallback(method_not_allowed)
            .layer(DefaultBodyLimit::disable())
            .with_state(self.shared.clone())
    }

    /// Requests being handled now.
    pub fn in_flight(&self) -> usize {
        self.shared.config.max_concurrent - self.shared.requests.available_permits()
    }

    /// Detached (`Prefer: respond-async`) sends still waiting for their outcome.
    pub fn pending_async(&self) -> usize {
        self.shared.config.max_pending_async - self.shared.detached.available_permits()
    }

    /// The configuration it runs with.
    pub fn config(&self) -> &GatewayConfig {
        &self.shared.config
    }
}

type SharedRef = Arc<Shared>;

/// A response for a vicus error, with the gateway's level of detail.
fn vicus_error(shared: &Shared, error: &Error) -> Response {
    tracing::debug!(target: "vicus::gateway", error = %error, "request failed");
    ErrorResponse::vicus(error, shared.config.detailed_errors).into_response()
}

fn refusal(r: GatewayRefusal, message: &str) -> Response {
    ErrorResponse::refusal(r, message).into_response()
}

fn authorized(shared: &Shared, req: &Request) -> bool {
    shared.config.access.allows(
        req.headers()
            .get(header::AUTHORIZATION)
            .map(HeaderValue::as_bytes),
        req.extensions().get::<VerifiedClient>(),
    )
}

async fn not_found() -> Response {
    refusal(GatewayRefusal::NotFound, "no such route")
}

async fn method_not_allowed() -> Response {
    refusal(
        GatewayRefusal::MethodNotAllowed,
        "use POST for /tabernas/{id}, GET for /healthz and /metrics",
    )
}

async fn healthz(State(shared): State<SharedRef>) -> Response {
    if shared.domus.is_closed() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::CONTENT_TYPE, "application/json")],
            r#"{"status":"closed"}"#,
        )
            .into_response();
    }
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        r#"{"status":"ok"}"#,
    )
        .into_response()
}

async fn metrics(State(shared): State<SharedRef>, req: Request) -> Response {
    if !authorized(&shared, &req) {
        return refusal(
            GatewayRefusal::Unauthorized,
            "credentials are required: a valid bearer token, or a verified client certificate",
        );
    }
    let Some(render) = &shared.config.metrics else {
        return refusal(
            GatewayRefusal::NotFound,
            "no metrics renderer is configured",
        );
    };
    #[cfg(feature = "metrics")]
    shared.domus.reporting().export_to_metrics();
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        render(),
    )
        .into_response()
}

/// What a request asks for, parsed from its head.
struct Head {
    taberna: TabernaId,
    msg_type: MessageType,
    /// `Some(opening message)` for a blob.
    blob: Option<Bytes>,
    respond_async: bool,
    content_length: Option<u64>,
    /// The message headers: the prefixed HTTP headers and the W3C `traceparent`.
    headers: Headers,
}

/// The message headers a request carries: every `Vicus-Header-<key>` (in order; a repeated
/// one repeats) and a valid W3C `traceparent` (an invalid one is ignored, as W3C trace
/// context says). A key vicus does not allow, or more than 65,534 bytes, is refused with
/// `InvalidHeader` / `HeadersTooLarge`; the domus's `max_headers` and `max_headers_len` apply
/// when the message is sent.
fn message_headers(http: &HeaderMap) -> Result<Headers, Error> {
    let mut headers = Headers::new();
    for (name, value) in http {
        if let Some(key) = name.as_str().strip_prefix(MESSAGE_HEADER_PREFIX) {
            headers.insert(key, value.as_bytes())?;
        }
    }
    if let Some(context) = http
        .get(TRACEPARENT)
        .and_then(|v| v.to_str().ok())
        .and_then(TraceContext::parse_traceparent)
    {
        headers.set_trace_context(context)?;
    }
    Ok(headers)
}

/// Parses a message type: decimal, `0x` hex, or `app:N`.
fn parse_message_type(s: &str) -> Option<MessageType> {
    let s = s.trim();
    if let Some(offset) = s.strip_prefix("app:") {
        return MessageType::try_app(offset.parse().ok()?);
    }
    if let Some(hex) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        return u32::from_str_radix(hex, 16).ok().map(MessageType);
    }
    s.parse().ok().map(MessageType)
}

/// The `type` parameter of a query string, if any.
fn query_type(query: Option<&str>) -> Option<&str> {
    query?
        .split('&')
        .find_map(|pair| pair.strip_prefix("type="))
}

/// Whether `Prefer` asks for `respond-async` (a comma-separated list; parameters after `;`).
fn prefers_async(headers: &HeaderMap) -> bool {
    headers.get_all("prefer").iter().any(|v| {
        v.to_str().is_ok_and(|v| {
            v.split(',').any(|p| {
                p.split(';')
                    .next()
                    .is_some_and(|t| t.trim().eq_ignore_ascii_case("respond-async"))
            })
        })
    })
}

fn parse_head(id: &str, req: &Request) -> Result<Head, Response> {
    let taberna = id.parse::<u64>().map(TabernaId).map_err(|_| {
        refusal(
            GatewayRefusal::BadRequest,
            "the taberna id in the path is not a number",
        )
    })?;
    let headers = req.headers();
    let type_text = match headers.get(MESSAGE_TYPE_HEADER) {
        Some(v) => v.to_str().ok(),
        None => query_type(req.uri().query()),
    };
    let msg_type = type_text.and_then(parse_message_type).ok_or_else(|| {
        ErrorResponse::vicus(
            &Error::new(
                ErrorId::InvalidMessageType,
                "give the message type in the Vicus-Message-Type header or ?type= \
                 (decimal, 0x hex or app:N)",
            ),
            true,
        )
        .into_response()
    })?;
    let blob = match headers.get(BLOB_HEADER) {
        None => None,
        Some(v) => Some(
            base64::engine::general_purpose::STANDARD
                .decode(v.as_bytes())
                .map(Bytes::from)
                .map_err(|_| {
                    refusal(
                        GatewayRefusal::BadRequest,
                        "the Vicus-Blob header is not standard base64",
                    )
                })?,
        ),
    };
    let content_length = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let message_headers =
        message_headers(headers).map_err(|e| ErrorResponse::vicus(&e, true).into_response())?;
    Ok(Head {
        taberna,
        msg_type,
        blob,
        respond_async: prefers_async(headers),
        content_length,
        headers: message_headers,
    })
}

/// The send a request becomes: the one place an HTTP request is mapped onto vicus.
fn to_send(head: &Head, timeout: Duration) -> (TabernaId, MessageType, SendOptions) {
    (
        head.taberna,
        head.msg_type,
        SendOptions::default()
            .timeout(timeout)
            .headers(head.headers.clone()),
    )
}

/// The response a reply becomes: 200 with its payload, its headers as `vicus-header-<key>`
/// (a `traceparent` as the W3C `traceparent` header) — the one place a reply is mapped onto
/// HTTP. A value that cannot be an HTTP header value is left out, and
/// `vicus-headers-omitted` says how many were.
fn from_reply(reply: crate::Reply) -> Response {
    let (payload, headers) = reply.into_parts();
    let mut response = (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/octet-stream")],
        payload,
    )
        .into_response();
    let mut omitted = 0usize;
    let out = response.headers_mut();
    for (key, value) in headers.iter() {
        if key == TRACEPARENT {
            if let Some(context) = TraceContext::from_bytes(value)
                && let Ok(v) = HeaderValue::from_str(&context.to_traceparent())
            {
                out.append(TRACEPARENT, v);
            }
            continue;
        }
        let name =
            axum::http::HeaderName::from_bytes(format!("{MESSAGE_HEADER_PREFIX}{key}").as_bytes());
        match (name, HeaderValue::from_bytes(value)) {
            (Ok(name), Ok(value)) => {
                out.append(name, value);
            }
            _ => omitted = omitted.saturating_add(1),
        }
    }
    if omitted > 0 {
        out.insert(HEADERS_OMITTED_HEADER, HeaderValue::from(omitted));
    }
    response
}

/// What is left of a request's deadline, at least 1 ms (a send's shortest timeout).
fn remaining(deadline: Instant) -> Duration {
    deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(1))
}

async fn post_taberna(
    State(shared): State<SharedRef>,
    Path(id): Path<String>,
    req: Request,
) -> Response {
    if !authorized(&shared, &req) {
        return refusal(
            GatewayRefusal::Unauthorized,
            "credentials are required: a valid bearer token, or a verified client certificate",
        )
        .closing_if_body(&req);
    }
    let Ok(permit) = shared.requests.clone().try_acquire_owned() else {
        return refusal(
            GatewayRefusal::GatewayBusy,
            "too many requests in progress: retry later",
        )
        .closing_if_body(&req);
    };
    let deadline = Instant::now() + shared.config.request_timeout;
    let head = match parse_head(&id, &req) {
        Ok(head) => head,
        Err(response) => return response.closing_if_body(&req),
    };
    let response = match &head.blob {
        Some(_) => send_blob(&shared, head, req.into_body(), deadline).await,
        None => send_message(&shared, head, req.into_body(), deadline).await,
    };
    drop(permit);
    response
}

/// `Connection: close` on a response given without reading a request body that was sent.
trait ClosingIfBody {
    fn closing_if_body(self, req: &Request) -> Response;
}

impl ClosingIfBody for Response {
    fn closing_if_body(mut self, req: &Request) -> Response {
        let has_body = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .is_some_and(|v| v.as_bytes() != b"0")
            || req.headers().contains_key(header::TRANSFER_ENCODING);
        if has_body {
            self.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        self
    }
}

/// The next chunk of a body (`None` at its end), or the response that ends the request:
/// 408 when nothing came by `deadline`, 400 when the connection broke it off.
async fn next_chunk(
    stream: &mut (impl Stream<Item = Result<Bytes, axum::Error>> + Unpin),
    deadline: Instant,
) -> Result<Option<Bytes>, Response> {
    match tokio::time::timeout_at(deadline, poll_fn(|cx| Pin::new(&mut *stream).poll_next(cx)))
        .await
    {
        Ok(Some(Ok(chunk))) => Ok(Some(chunk)),
        Ok(None) => Ok(None),
        Ok(Some(Err(_))) => Err(ErrorResponse::refusal(
            GatewayRefusal::BadRequest,
            "the request body was broken off",
        )
        .closing()
        .into_response()),
        Err(_) => Err(ErrorResponse::refusal(
            GatewayRefusal::RequestTimeout,
            "the request body did not arrive within the request timeout",
        )
        .closing()
        .into_response()),
    }
}

fn too_large(what: &str, limit: u64) -> Response {
    ErrorResponse::vicus(
        &Error::new(
            ErrorId::PayloadTooLarge,
            format!("the {what} is larger than {limit} bytes"),
        ),
        true,
    )
    .closing()
    .into_response()
}

async fn send_message(shared: &Shared, head: Head, body: Body, deadline: Instant) -> Response {
    let limit = shared.domus.config().snapshot().max_message_len;
    let limit_u64 = limit as u64;
    if head.content_length.is_some_and(|n| n > limit_u64) {
        // Refused before reading any of it: a client that sent `Expect: 100-continue` never
        // sends the body at all.
        return too_large("body (max_message_len)", limit_u64);
    }
    // A declared length never drives allocation (T13): a client that announces 1 MiB and
    // trickles bytes holds only what it sent.
    let mut payload = BytesMut::with_capacity(
        head.content_length
            .map_or(0, |n| usize::try_from(n).unwrap_or(limit))
            .min(limit)
            .min(INITIAL_BODY_CAPACITY),
    );
    let mut stream = body.into_data_stream();
    loop {
        match next_chunk(&mut stream, deadline).await {
            Ok(Some(chunk)) => {
                if payload.len().saturating_add(chunk.len()) > limit {
                    return too_large("body (max_message_len)", limit_u64);
                }
                payload.extend_from_slice(&chunk);
            }
            Ok(None) => break,
            Err(response) => return response,
        }
    }
    let payload = payload.freeze();
    if head.respond_async {
        return send_detached(shared, &head, payload, deadline).await;
    }
    let (taberna, msg_type, options) = to_send(&head, remaining(deadline));
    let send = shared.domus.send(taberna, msg_type, payload, options);
    // The send ends by its own timeout (capped by the deadline); the outer bound is a
    // backstop with a margin for the answer to come back.
    match tokio::time::timeout_at(deadline + Duration::from_secs(1), send).await {
        Ok(Ok(Delivery::Replied(reply))) => from_reply(reply),
        Ok(Ok(Delivery::Accepted)) => StatusCode::NO_CONTENT.into_response(),
        Ok(Err(e)) => vicus_error(shared, &e),
        Err(_) => refusal(
            GatewayRefusal::GatewayTimeout,
            "no outcome before the request's deadline: the outcome is unknown",
        ),
    }
}

/// `Prefer: respond-async`: 202 once admitted; the outcome goes to the event feed.
async fn send_detached(
    shared: &Shared,
    head: &Head,
    payload: Bytes,
    deadline: Instant,
) -> Response {
    let Ok(slot) = shared.detached.clone().try_acquire_owned() else {
        return refusal(
            GatewayRefusal::GatewayBusy,
            "too many detached sends wait for their outcome: retry later",
        );
    };
    let timeout = shared.domus.config().snapshot().send_timeout;
    let (taberna, msg_type, options) = to_send(head, timeout);
    let admit = shared.domus.admit(taberna, msg_type, payload, options);
    let receipt = match tokio::time::timeout_at(deadline, admit).await {
        Ok(Ok(receipt)) => receipt,
        Ok(Err(e)) => return vicus_error(shared, &e),
        // Dropped before admission: the message was not sent.
        Err(_) => {
            return vicus_error(
                shared,
                &Error::new(
                    ErrorId::LocalQueueFull,
                    "not admitted before the request's deadline",
                ),
            );
        }
    };
    let request_id = shared.next_request_id.fetch_add(1, Ordering::Relaxed);
    let recorder = shared.domus.reporting().recorder;
    // Ends by the send's timeout: a receipt always resolves by its deadline.
    tokio::spawn(async move {
        let outcome = match receipt.await {
            Ok(Delivery::Replied(_)) => Ok(true),
            Ok(Delivery::Accepted) => Ok(false),
            Err(e) => Err(e),
        };
        recorder.event(Event::DetachedSendEnded {
            request_id,
            taberna: taberna.0,
            outcome,
        });
        drop(slot);
    });
    let mut response = (
        StatusCode::ACCEPTED,
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            ),
            (
                header::HeaderName::from_static("preference-applied"),
                HeaderValue::from_static("respond-async"),
            ),
        ],
        format!(r#"{{"request_id":{request_id}}}"#),
    )
        .into_response();
    response
        .headers_mut()
        .insert(REQUEST_ID_HEADER, HeaderValue::from(request_id));
    response
}

async fn send_blob(shared: &Shared, head: Head, body: Body, deadline: Instant) -> Response {
    let limit = shared.config.max_blob_len;
    if head.content_length.is_some_and(|n| n > limit) {
        return too_large("blob body (max_blob_len)", limit);
    }
    let opening = head.blob.clone().unwrap_or_default();
    let (taberna, msg_type, options) = to_send(&head, remaining(deadline));
    let open = shared.domus.send_blob(taberna, msg_type, opening, options);
    let mut sender = match tokio::time::timeout_at(deadline + Duration::from_secs(1), open).await {
        Ok(Ok(sender)) => sender,
        Ok(Err(e)) => return vicus_error(shared, &e).closing_if_unread(),
        Err(_) => {
            return refusal(
                GatewayRefusal::GatewayTimeout,
                "the blob was not opened before the request's deadline",
            )
            .closing_if_unread();
        }
    };
    let idle = shared.config.request_timeout;
    let mut stream = body.into_data_stream();
    let mut sent: u64 = 0;
    loop {
        // Each chunk must come within `request_timeout` of the last; the next is read only
        // once the blob's window took this one (backpressure to the HTTP client).
        match next_chunk(&mut stream, Instant::now() + idle).await {
            Ok(Some(chunk)) => {
                sent = sent.saturating_add(chunk.len() as u64);
                if sent > limit {
                    sender.cancel("the HTTP body passed max_blob_len");
                    return too_large("blob body (max_blob_len)", limit);
                }
                if let Err(e) = sender.write_bytes(chunk).await {
                    return vicus_error(shared, &e).closing_if_unread();
                }
            }
            Ok(None) => break,
            Err(response) => {
                sender.cancel("the HTTP request body stalled or broke off");
                return response;
            }
        }
    }
    match sender.finish().await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => vicus_error(shared, &e),
    }
}

trait ClosingIfUnread {
    fn closing_if_unread(self) -> Response;
}

impl ClosingIfUnread for Response {
    /// `Connection: close`: the body was left unread.
    fn closing_if_unread(mut self) -> Response {
        self.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_types_parse_in_three_spellings_and_nothing_else() {
        assert_eq!(
            parse_message_type("16777217"),
            Some(MessageType(0x0100_0001))
        );
        assert_eq!(
            parse_message_type("0x01000001"),
            Some(MessageType(0x0100_0001))
        );
        assert_eq!(parse_message_type("app:1"), Some(MessageType::app(1)));
        for bad in [
            "",
            "app:",
            "app:-1",
            "0x",
            "one",
            "4294967296",
            "app:4294967295",
        ] {
            assert_eq!(parse_message_type(bad), None, "{bad:?}");
        }
        assert_eq!(query_type(Some("a=1&type=app:2")), Some("app:2"));
        assert_eq!(query_type(Some("types=1")), None);
    }

    #[test]
    fn respond_async_is_found_among_other_preferences() {
        let mut h = HeaderMap::new();
        assert!(!prefers_async(&h));
        h.insert("prefer", HeaderValue::from_static("wait=5, Respond-Async"));
        assert!(prefers_async(&h));
        h.insert("prefer", HeaderValue::from_static("respond-asynchronously"));
        assert!(!prefers_async(&h));
    }
}
