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
//! **Status.** This release contains the A0 transport ([`a0_transport`]): identities,
//! key material, the verifier, listeners and dialers over TCP and Unix sockets, admission limits
//! and material rotation. The A1 callis, tabernas and the `Domus` API build on it.
//!
//! ## Getting started
//!
//! ```no_run
//! # async fn run() -> Result<(), vicus::Error> {
//! use vicus::a0_transport::{Transport, TransportConfig};
//! use vicus::{AuthConfig, DomusAddr, DomusId};
//!
//! let auth = AuthConfig::from_pem_files("ca.pem", "alpha.pem", "alpha.key")?;
//! let transport = Transport::new(auth, TransportConfig::default())?;
//!
//! // Accept: admit through the pre-auth gate, then handshake on its own task.
//! let listener = transport.listen(&"127.0.0.1:7000".parse()?).await?;
//! tokio::spawn(async move {
//!     while let Ok(incoming) = listener.accept().await {
//!         tokio::spawn(async move {
//!             if let Ok(stream) = incoming.handshake().await {
//!                 println!("authenticated {}", stream.peer());
//!             }
//!         });
//!     }
//! });
//!
//! // Dial, requiring the peer to be exactly `beta`.
//! let beta = DomusId::new("spiffe://vicus.dev/domus/beta")?;
//! let stream = transport.dial(&DomusAddr::unix("/run/beta/beta.sock"), Some(&beta)).await?;
//! assert_eq!(stream.peer().id(), &beta);
//! # Ok(()) }
//! ```
//!
//! `cargo run --example handshake` runs two nodes in one process with certificates minted at
//! start-up (module `dev_certs`, feature `dev-certs`); `cargo run --example certs-dev` writes
//! insecure development certificates to disk.
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
//! Not yet part of this release: the A1 callis (acknowledged messages, replay across
//! reconnects) is built on the streams this crate hands out today.
//!
//! ## Flow control
//!
//! Not yet part of this release (A1 and blobs). At A0, every wait is bounded: connects by
//! `connect_timeout`, handshakes by `handshake_timeout`, and concurrent handshakes by
//! `max_pending_handshakes` and `max_pending_handshakes_per_source`.
//!
//! ## Live configuration
//!
//! [`a0_transport::Transport::reload_auth`] swaps certificate chain, key, trust anchors and
//! CRLs for every future handshake, atomically and after full validation (the identity must
//! stay the same); established streams are untouched.
//! [`a0_transport::Transport::set_trust_policy`] replaces the trust policy the same way. The
//! other [`a0_transport::TransportConfig`] fields are fixed when the transport is built; each is
//! documented with its default and range.
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
pub mod taberna;

#[cfg(feature = "dev-certs")]
pub mod dev_certs;

pub use a0_transport::{AuthConfig, DomusAddr, DomusId, PeerIdentity, TrustPolicy};
pub use domus::{
    Delivery, Domus, DomusBuilder, DomusConfig, MessageCodec, Receipt, Route, RouteResolver,
    SendOptions, SimpleResolver,
};
pub use error::{ERROR_MESSAGE_MAX_LEN, Error, ErrorId, Rejection, Result};
pub use taberna::{MessageType, Taberna, TabernaId, TabernaOptions, TabernaRequest};
