//! # vicus
//!
//! An embeddable, authenticated peer-to-peer mesh for Rust: a process links the crate, runs a
//! **domus** (its node), and talks to other domus over mutual TLS 1.3 on TCP or on Unix sockets —
//! no sidecar, broker or control plane.
//!
//! | term | meaning |
//! |---|---|
//! | **domus** | a running node: one listener, one identity, many peers |
//! | **taberna** | a named inbound endpoint on a domus |
//! | **callis** | one authenticated connection between two domus |
//! | **A0** | transport authentication (TLS), complete before any A1 byte |
//! | **A1** | messages and blobs over calles |
//!
//! ## Getting started
//!
//! ```no_run
//! # async fn run() -> Result<(), vicus::Error> {
//! use std::sync::Arc;
//! use bytes::Bytes;
//! use vicus::{AuthConfig, Delivery, Domus, MessageType, SendOptions, SimpleResolver, TabernaId};
//!
//! let routes = Arc::new(SimpleResolver::new());
//! let auth = AuthConfig::from_pem_files("ca.pem", "alpha.pem", "alpha.key")?;
//! let domus = Domus::builder(auth)
//!     .bind("127.0.0.1:7000".parse()?)
//!     .resolver(routes.clone())
//!     .build()
//!     .await?;
//!
//! // An endpoint: every request is accepted, replied to or rejected.
//! let inbox = domus.taberna(TabernaId(1))?;
//! tokio::spawn(async move {
//!     while let Some(request) = inbox.recv().await {
//!         println!("{} sent {} bytes", request.peer().id(), request.payload().len());
//!         request.reply(Bytes::from_static(b"thanks"));
//!     }
//! });
//!
//! // Taberna 2 lives on beta; the route pins beta's identity.
//! routes.insert(TabernaId(2), "10.0.0.2:7000".parse()?, Some("spiffe://vicus.dev/domus/beta".parse()?));
//! let kind = MessageType::app(1).expect("A3 type");
//! match domus.send(TabernaId(2), kind, Bytes::from_static(b"hi"), SendOptions::default()).await? {
//!     Delivery::Accepted => println!("accepted"),
//!     Delivery::Replied(answer) => println!("replied {answer:?}"),
//! }
//! domus.shutdown().await;
//! # Ok(()) }
//! ```
//!
//! `cargo run --example quickstart` runs two domus in one process with certificates minted at
//! start-up (module `dev_certs`, feature `dev-certs`); `cargo run --example handshake` shows the
//! A0 handshake alone over TCP and a Unix socket; `cargo run --example certs-dev` writes
//! insecure development certificates to disk. The lower layers are public too:
//! [`a0_transport::Transport`] (authenticated streams) and [`a1_callis`] (the codec and the
//! sans-IO session).
//!
//! ## Identity and security model
//!
//! * A domus is named by the **single URI SAN of its leaf certificate**, a [`DomusId`] such as
//!   `spiffe://acme.internal/domus/billing-1`. Identity is not the address: nodes may sit
//!   behind NAT or DNS names, and no IP or DNS SAN is needed. A leaf with no URI SAN, or with
//!   more than one, is refused — an identity must be unambiguous.
//! * **TLS 1.3 only, client certificates mandatory**, ALPN `vicus/1` required. rustls' TLS 1.2
//!   support is not even compiled in. The crypto provider is explicit: aws-lc-rs by default,
//!   preferring the post-quantum hybrid key exchange X25519MLKEM768, or ring with
//!   `--no-default-features --features ring`. The library never installs a process-wide
//!   provider.
//! * Chains are verified with rustls-webpki against the configured CA bundle only (never the
//!   system roots): validity window, key usage (`serverAuth` for the listener,
//!   `clientAuth` for the dialer), signatures, and CRLs when given (unknown status and expired
//!   CRLs fail closed). A certificate from another CA is refused even when its URI matches.
//! * The dialer can require an expected [`DomusId`]; the listener learns the client's id from
//!   its verified certificate. A [`TrustPolicy`] narrows accepted ids (trust domain, prefix on a
//!   `/` boundary, explicit allow-list) in both directions.
//! * The listener confirms acceptance with a 4-byte A0 verdict after the TLS handshake, so a
//!   dialer whose certificate was refused never mistakes the connection for a good one
//!   (`docs/wire-protocol.md`).
//! * Unix sockets run the same TLS handshake; the kernel's peer credentials (uid, gid, pid) are
//!   recorded in [`PeerIdentity`] and can be restricted with `unix_allowed_uids`. Socket files
//!   are created with mode 0600, and a path is only reused when it holds a dead socket of our
//!   own user; a live socket, a regular file, a directory or a symlink is never removed.
//! * Admission: a global limit and a per-source (IP or uid) limit on handshakes in progress,
//!   enforced at accept before any TLS work, and one deadline for the whole handshake.
//! * Private keys are held in `Zeroizing` buffers, wiped on drop, and never printed
//!   (`Debug` shows `[redacted]`). Copies made inside the crypto provider when it loads the key
//!   are outside our control (`docs/threat-model.md`).
//! * No `unsafe` code (`unsafe_code = "forbid"`).
//!
//! ## Delivery semantics
//!
//! * A send ends exactly once: `Ok(Delivery::Accepted)`, `Ok(Delivery::Replied(bytes))`, or an
//!   [`Error`] — the receiver's rejection (`RemoteTabernaRejected`, with
//!   [`Error::rejection`] carrying its code and reason), vicus's refusal (`UnknownTaberna`,
//!   `TabernaBusy`, `Forbidden`, …), or a local failure (`SendTimeout`, `PeerRestarted`,
//!   `PeerUnavailable`, `DomusClosed`, …).
//! * *Accepted* means the receiving taberna's handler accepted it. Nothing is acknowledged
//!   before a handler answered, and nothing accepted is lost.
//! * A message is retained until answered. If the callis drops, unanswered messages are
//!   replayed in order on the next callis with their original deadlines; the receiver's dedupe
//!   window (by sender epoch and message id) answers duplicates without delivering them twice.
//! * A timeout or `PeerRestarted` means **unknown outcome**: the message may or may not have
//!   been delivered. Make handlers idempotent where that matters.
//! * Messages to one peer are delivered in send order within a priority class (A2 before A3);
//!   answers may come back in any order.
//! * A send to a taberna on the same domus takes the same path minus the network: same
//!   checks, same answers, same errors.
//! * The typed layer ([`MessageCodec`], [`Domus::send_typed`]) encodes and decodes around the
//!   byte API.
//!
//! ## Flow control
//!
//! * Each peer has `max_in_flight_per_peer` slots (default 4096) and a byte budget
//!   `max_in_flight_bytes_per_peer` (default 64 MiB). `send` and `admit` wait for room until
//!   the send's deadline; `try_send` fails at once with `LocalQueueFull`.
//! * A misbehaving peer is cut off, not served: frames per second
//!   (`max_frames_per_second`), refusals per second (`max_refusals_per_second`), a frame that
//!   trickles in (`frame_read_timeout`) and silence (`idle_timeout`) all close its callis.
//! * `admit` returns a [`Receipt`] to await later: one task can keep thousands of sends in
//!   flight without spawning a task per message, and send futures never borrow the domus.
//! * A taberna's inbox is bounded (`inbox_depth`, default 4096); when it is full a delivery is
//!   answered `TabernaBusy` at once instead of queueing.
//! * Payloads are limited to `max_message_len` (default 1 MiB) and refused locally with
//!   `PayloadTooLarge` before anything is sent.
//! * Every wait is bounded: connects by `connect_timeout`, handshakes by `handshake_timeout`,
//!   resolver calls by `resolve_timeout`, sends by their timeout, shutdown by
//!   `shutdown_timeout`; concurrent handshakes by `max_pending_handshakes` (global and per
//!   source).
//!
//! ## Blobs
//!
//! Large data (files, snapshots, model weights) goes as a blob: [`Domus::send_blob`] sends a
//! header message and returns a [`BlobSender`] (an `AsyncWrite`) once the receiving handler
//! accepted it; the handler takes a [`BlobReceiver`] (an `AsyncRead` and a `Stream` of `Bytes`)
//! from [`TabernaRequest::blob`].
//!
//! * Blobs travel on their own callis to the peer, dialled on first use and shared by every
//!   blob to that peer in turn (one chunk each), so a bulk transfer never sits in front of a
//!   message on the primary callis.
//! * **Credit follows reads**: the sender may run at most `blob_window` (default 8 MiB) past
//!   what the receiving application has consumed, so a slow reader slows the sender down and
//!   never fails the stream. Both ends hold at most one window per stream.
//! * [`BlobSender::finish`] returns when the receiver holds every byte. Dropping either end
//!   early cancels the stream; the other end's next read or write fails with `BlobCancelled`.
//!   A stream that moves no byte for `blob_idle_timeout` fails on both sides.
//! * Per-peer stream caps (`max_blob_streams_per_peer`) and domus-wide byte budgets per
//!   direction (`blob_inbound_budget`, `blob_outbound_budget`, one window reserved per stream
//!   before the handler sees it) bound memory; over them an open fails at once with
//!   `BlobBufferFull`, never half-way through a stream.
//! * If the blob callis drops, it is dialled again and unacknowledged bytes are resent; if the
//!   peer restarted, open streams fail with `PeerRestarted`.
//! * A blob to a taberna on the same domus goes straight from sender to receiver through the
//!   same API and the same window.
//!
//! ## Live configuration
//!
//! [`a0_transport::Transport::reload_auth`] (reached through [`Domus::transport`]) swaps
//! certificate chain, key, trust anchors and CRLs for every future handshake, atomically and
//! after full validation (the identity must stay the same); established calles are untouched.
//! [`a0_transport::Transport::set_trust_policy`] replaces the trust policy the same way. The
//! other [`DomusConfig`] fields are fixed when the domus is built; each is documented with its
//! default and range.
//!
//! ## Errors
//!
//! Every failure is an [`Error`] with a stable numeric [`ErrorId`] and a message that says what
//! to fix, e.g. `PeerCertificateRejected: certificate for spiffe://vicus.dev/domus/old expired
//! at 2026-11-22T04:00:00Z …` or `IdentityMismatch: peer presented spiffe://…/a, expected
//! spiffe://…/b`. Ids `1..=26` keep aurelia 0.2's numbers.

pub mod a0_transport;
pub mod a1_callis;
pub mod domus;
mod error;
#[doc(hidden)]
pub mod fuzzing;
pub mod reporting;
pub mod taberna;

#[cfg(feature = "dev-certs")]
pub mod dev_certs;

pub use a0_transport::{AuthConfig, DomusAddr, DomusId, PeerIdentity, TrustPolicy};
pub use domus::{
    BlobReceiver, BlobSender, ConfigHandle, Delivery, Domus, DomusBuilder, DomusConfig,
    MessageCodec, Receipt, Route, RouteResolver, SendOptions, SimpleResolver,
};
pub use error::{ERROR_MESSAGE_MAX_LEN, Error, ErrorId, Rejection, Result};
pub use reporting::Reporting;
pub use taberna::{MessageType, Taberna, TabernaId, TabernaOptions, TabernaRequest};
