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
//! let kind = MessageType::app(1);
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
//! [`a0_transport::Transport`] (authenticated streams) and [`a1_callis`] (the codec, the
//! sans-IO session and blob streams, and the link policy). Calles need not run over sockets:
//! [`DomusBuilder::connector`] dials through any [`a0_transport::Connector`] and
//! [`Domus::accept_stream`] serves any byte stream, with the same TLS handshake — the seam an
//! in-memory or simulated network plugs into. A client or a tool that only sends builds its
//! domus with [`DomusBuilder::dial_only`]: nothing is bound, and its answers (and anything a
//! peer sends it) come back on the calles it dialled.
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
//!   `vicus = { default-features = false, features = ["ring"] }`. When both features are on
//!   (Cargo unifies features, so another crate may turn `ring` on), aws-lc-rs is used and the
//!   domus logs a warning at build that says so; [`DomusBuilder::crypto_provider`] takes any
//!   provider instead. [`Domus::crypto_provider`], `Snapshot::crypto_provider` and the
//!   start-up log line name the provider in use. The library never installs a process-wide
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
//! ## Addressing
//!
//! A send names a taberna. By default the domus asks its resolver where that taberna lives
//! ([`RouteResolver::resolve`]: an address and, usually, the identity expected there), so a
//! taberna id routed this way names one endpoint in the whole mesh — give each service its
//! own ids. A send can also name the domus: [`Domus::destination_on`] sends to a taberna on
//! one specific domus, reached at the address the resolver gives for that identity
//! ([`RouteResolver::resolve_domus`], e.g. [`SimpleResolver::insert_domus`]) or over a callis
//! it already has with this domus — how a server sends to a dial-only client that contacted
//! it. A resolver may list several replicas for a taberna ([`RouteResolver::candidates`],
//! [`SimpleResolver::insert_candidates`]): the lowest priority that can be reached is used,
//! spread by weight, and a send moves to another replica only when it is certain the first
//! never received it (see [`Candidate`]) — never a message that may have been delivered.
//! Whichever way it was addressed, the peer is the one its certificate proves. Routes can
//! also come from a TOML file that is reloaded while the domus runs: `FileResolver`
//! (feature `file-resolver`; the format is in its module's docs), applied once two polls read
//! the same contents, its failures reported on the domus's error feed; or from DNS SRV
//! records: `DnsSrvResolver` (feature `dns-srv`). Module [`resolve`] holds the resolver
//! layer: the trait and everything an implementation names, the resolvers above, and the
//! replica choice as a pure function ([`resolve::choose`]); its docs say how to write a
//! resolver and test it against the conformance suite.
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
//! * Every failed send says whether the message may have reached a handler:
//!   [`Error::outcome_unknown`]. **Unknown outcome** (make handlers idempotent where that
//!   matters): `SendTimeout` — the message was written to the peer and not answered before
//!   its deadline; `PeerRestarted` — the peer restarted while it was unanswered; a
//!   `PeerShutDown` the peer answered with — a handler held it when the peer shut down; a
//!   `DomusClosed` for a message already written when this domus shut down. **Not
//!   delivered** — every other error: `LocalQueueFull` (no in-flight room before its deadline,
//!   or at once for `try_send`; or the peer's window never let it out), `PeerUnavailable` (no
//!   callis to the peer opened before its deadline; it carries the last dial error, e.g.
//!   "connection refused"), `PeerShutDown` from the peer's CLOSE, `PayloadTooLarge`,
//!   `InvalidMessageType`, `DomusClosed` for a message never written — or refused by the
//!   receiver (its rejection, `UnknownTaberna`, `TabernaBusy`, `Forbidden`, …). So only a send
//!   the peer could have received ends as `SendTimeout`, and an unreachable peer is reported
//!   as `PeerUnavailable` whichever queue the send waited in.
//! * **Replicas never get a message twice.** When a taberna has several candidates, a send is
//!   handed to another one only when the first cannot have it: it was never written on any
//!   callis to the first (the dial failed, or the first refused it before delivery). A message
//!   that was written — so may have been delivered — stays with the replica it went to: it is
//!   replayed there when that replica comes back, or ends at its deadline as `SendTimeout`.
//!   Exactly-once therefore holds per replica, and no message is delivered by two replicas.
//! * A peer that shuts down says so (CLOSE `DomusClosed`) after answering every request its
//!   handlers still hold (with a `PeerShutDown` rejection); it reads nothing more. When its
//!   senders read that CLOSE, their unanswered sends and those waiting for in-flight room end
//!   at once with `PeerShutDown` (not delivered); a send handed over just as the CLOSE is
//!   read counts as a later one. Later sends dial it once: when that dial fails they fail at
//!   once with `PeerShutDown` carrying the dial error (as does every send until the reconnect
//!   backoff lets the next dial go), and once it is back (a new run) they are sent as usual.
//!   A dial that gets no answer (a port that takes the connection and never replies) keeps
//!   them waiting for it, up to their deadline (`PeerUnavailable`), as for any peer that
//!   cannot be reached. This holds after the peer was forgotten too: the domus remembers that
//!   it shut down for `DomusConfig::peer_retire_after`, for up to 4,096 such peers.
//! * **Forgetting a peer.** A domus forgets a peer it no longer talks to — its driver, its
//!   session, its dedupe state — once no callis is open or being dialled and nothing is in
//!   flight either way: at once when the peer shut down (its CLOSE said so) or has said
//!   (DONE_BELOW) that it waits for no answer, else `DomusConfig::peer_retire_after` (default
//!   1 h, the longest send timeout) after its last callis closed. Peers that come and go thus
//!   cost nothing once gone. A forgotten peer that comes back gets a fresh session whose
//!   message ids start above every id used before, so its own dedupe state never mistakes a
//!   new message for an old one. The wait protects exactly-once: a peer may replay a message
//!   whose answer it never got until that send's deadline, so set `peer_retire_after` no
//!   lower than the longest send timeout your peers use.
//! * Messages to one peer are delivered in send order within a priority class (A2 before A3,
//!   with one waiting A3 message after every 16 A2 ones so A3 is never starved);
//!   answers may come back in any order.
//! * A send to a taberna on the same domus takes the same path minus the network: same
//!   checks, same answers, same errors.
//! * The fast path: [`Domus::destination`] gives a cheap handle that resolves its route once
//!   (and follows route changes); [`Destination::window`] keeps many sends in flight and
//!   yields their outcomes in order; [`Taberna::recv_many`] drains a burst per wake-up; and
//!   [`Domus::taberna_inline`] runs a cheap, non-blocking handler on the driver itself (no
//!   queue, no task switch; a slow one is counted in `inline_handlers_slow`).
//! * Batches: consecutive messages to one taberna travel as one MESSAGE_BATCH frame (one
//!   header, ids implicit) and are acknowledged as runs of ids, whatever API sent them; the
//!   receiver lets a batch through its dedupe window and hands each run of new messages to
//!   its taberna with one lookup. A burst one already holds goes fastest through
//!   [`Window::send_many`] (one check, one take of in-flight room and one hand-over per
//!   stretch that fits the window), and a worker that takes requests with
//!   [`Taberna::recv_many`] answers them in one push per peer with
//!   [`taberna::AnswerBatch`]. A taberna whose worker is slow or blocked holds up no other:
//!   its bounded inbox fills and what more arrives for it is refused `TabernaBusy`, while
//!   its peer's driver keeps delivering to the others (an inline handler, which runs on the
//!   driver, must not block).
//! * Routes are read by every send. A resolver that signals changes
//!   ([`RouteResolver::changes`]; [`SimpleResolver`] does on every insert and remove) makes
//!   the domus re-read at once the routes it has used: a peer whose route names it at a new
//!   address is dialled there, abandoning a dial to the old one, and the messages waiting for
//!   it are replayed on the new callis. A route that names no identity never moves a peer
//!   (its address may lead to another domus); an open callis is kept (it works).
//! * The typed layer ([`MessageCodec`], [`Domus::send_typed`], [`Taberna::recv_typed`])
//!   encodes and decodes around the byte API: a request that does not decode is refused with
//!   `DecodeFailure` before a handler sees it. With feature `serde`, `vicus::codec::Cbor<T>`
//!   and `vicus::codec::Json<T>` are ready codecs for any serde type.
//!
//! ## Flow control
//!
//! * Each peer has `max_in_flight_per_peer` slots (default 4096) and a byte budget
//!   `max_in_flight_bytes_per_peer` (default 64 MiB). `send` and `admit` wait for room until
//!   the send's deadline; `try_send` fails at once with `LocalQueueFull`.
//! * A misbehaving peer is cut off, not served: frames per second
//!   (`max_frames_per_second`), refusals per second (`max_refusals_per_second`), a frame that
//!   trickles in (`frame_read_timeout`) and silence (`idle_timeout`) all close its callis, and
//!   so does a peer that stops reading: writes that make no progress for `idle_timeout` drop
//!   the callis (its unanswered messages replay on the next one). Whatever a peer announces is
//!   bounded by this side's own limits (its window by `dedupe_window`), and every frame written
//!   fits the limit the peer announced.
//! * Answers a peer does not read are bounded: once `max_unsent_answer_bytes` (default 16 MiB)
//!   of replies and refusals wait for it, its new messages are answered `TabernaBusy` (not
//!   delivered) until it reads. The same message id twice on one callis is a protocol
//!   violation (a sender repeats an id only to replay it on a later callis), so a peer cannot
//!   make a domus answer one message many times.
//! * [`Destination::window`] keeps many sends in flight from one task and hands back their
//!   outcomes in order; underneath, `admit` returns a [`Receipt`] to await later: one task
//!   can keep thousands of sends in
//!   flight without spawning a task per message, and send futures never borrow the domus.
//! * A taberna's inbox is bounded (`inbox_depth`, default 4096); when it is full a delivery is
//!   answered `TabernaBusy` at once instead of queueing.
//! * Payloads are limited to `max_message_len` (default 1 MiB) and refused locally with
//!   `PayloadTooLarge` before anything is sent. Replies are held to the same limit on both
//!   ends: a handler's reply larger than either side's `max_message_len` is not sent, and the
//!   sender's send fails with `PayloadTooLarge`.
//! * Every wait is bounded: connects by `connect_timeout`, handshakes by `handshake_timeout`,
//!   resolver calls by `resolve_timeout`, sends by their timeout, shutdown by
//!   `shutdown_timeout`; concurrent handshakes by `max_pending_handshakes` (global and per
//!   source).
//! * Connections are limited before they cost much: connects per second per source IP or uid
//!   (`max_connects_per_second_per_source`, before TLS), authenticated calles waiting for their
//!   first frame (`max_unopened_calles_per_peer`, `max_unopened_calles`), connected peers
//!   (`max_peers`), one primary and one blob callis per identity (a new one replaces the old),
//!   and optionally a callis's age (`max_callis_age`). Refusals are counted
//!   (`calles_refused`, `Snapshot::listener`) and reach the peer as a CLOSE `AdmissionRefused`.
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
//! [`Domus::config`] returns a [`ConfigHandle`]: `snapshot()` reads the configuration in force,
//! `update(|c| …)` changes it. An update is validated like the builder's configuration (zero or
//! absurd values are refused with `InvalidConfig` and a message naming the field), fields fixed
//! at build time may not change, and it replaces the configuration in one step or not at all;
//! a [`reporting::Event::ConfigReloaded`] follows. When each field applies:
//!
//! | when | fields |
//! |---|---|
//! | **live** (next send, delivery or accepted callis) | `send_timeout`, `resolve_timeout`, `max_message_len` (the local check), `default_inbox_depth` (tabernas registered without their own depth), `hello_timeout` (telling inbound calles apart), `shutdown_timeout`, `max_unopened_calles_per_peer`, `max_unopened_calles`, `max_peers` (connection limits, T8), `max_pinned_addresses`, `max_retained_reply_bytes`, `peer_recheck_interval` (from the next check) |
//! | **new peers** (first contacted after the change) | `max_in_flight_per_peer`, `max_in_flight_bytes_per_peer`, `dedupe_window`, `max_unsent_answer_bytes`, `max_headers` and `max_headers_len` (what this domus takes from a peer; its own sends are checked against the current value), `keepalive_interval`, `idle_timeout`, `frame_read_timeout`, `max_frames_per_second`, `max_refusals_per_second`, `max_callis_age`, `peer_retire_after`, and the frame limit derived from `max_message_len` |
//! | **fixed** at build (a change is refused) | `transport`, `reconnect_backoff_min`, `reconnect_backoff_max`, `blob_chunk_len`, `blob_window`, `max_blob_streams_per_peer`, `blob_idle_timeout`, `blob_inbound_budget`, `blob_outbound_budget`, `max_blob_cancels_per_second` |
//!
//! Every field's default and range are on [`DomusConfig`].
//!
//! Certificates rotate with [`Domus::reload_auth`]: certificate chain, key, trust anchors and
//! CRLs are swapped for every future handshake, atomically and after full validation (the
//! identity must stay the same; a key that does not match its certificate, or a chain the
//! anchors do not verify, is refused and the old material stays). Established calles keep
//! running, except those of a peer whose certificate a new CRL revokes: they close at once, and
//! its next handshake is refused. `DomusConfig::max_callis_age` bounds how long a callis (and
//! the certificates it was opened with) stays in use.
//! [`Domus::set_trust_policy`] replaces the trust policy the same way.
//!
//! ## Observability
//!
//! [`Domus::reporting`] returns a [`Reporting`] handle. The library installs no subscriber or
//! exporter; it logs through `tracing` (warnings a peer can trigger are rate-limited per kind
//! and say how many were suppressed).
//!
//! * Spans (`tracing`, debug level; nothing is built or recorded when no subscriber wants
//!   them): `vicus.send` from a [`Domus::send`] (or `try_send`, `send_typed`,
//!   [`Destination::send`]) to its outcome (`domus`, `taberna`, `msg_type`, `outcome`:
//!   `accepted`, `replied` or the error's name); `vicus.deliver` from a delivery's arrival to
//!   its answer (`taberna`, `msg_type`, `peer`, `answer`) — [`TabernaRequest::span`] hands it
//!   to an asynchronous handler (`work.instrument(request.span().clone())`), an inline
//!   handler runs inside it; `vicus.peer` around each peer's drivers (`domus`, `peer`: the
//!   calles going up and down, refusals and the "why" events below are inside it);
//!   `vicus.handshake` around each TLS handshake (`direction`, the address, the authenticated
//!   `peer` or the error); `vicus.blob_open` around [`Domus::send_blob`]'s opening
//!   (`taberna`, `msg_type`, `outcome`) — the receiving handler's `vicus.deliver` span covers
//!   the blob's request.
//! * Message headers: [`SendOptions::headers`] attaches a few key/value pairs to a message
//!   ([`Headers`]: correlation ids, a tenant, a content type), [`TabernaRequest::headers`]
//!   reads them, and a handler's [`TabernaRequest::reply_with_headers`] sends some back
//!   ([`Reply::headers`]); bounded by `max_headers` and `max_headers_len` on both sides
//!   ([`ErrorId::HeadersTooLarge`] when over), zero bytes on the wire when absent
//!   (`docs/wire-protocol.md`). The W3C trace context is one of them (`traceparent`, a
//!   [`TraceContext`]; [`TabernaRequest::trace_context`] for a handler that propagates by
//!   hand). With the feature `otel` (OpenTelemetry through `tracing-opentelemetry`) a message
//!   carries the context of the span it is sent in and its `vicus.deliver` span continues
//!   it — one trace across every domus a request crosses, replays included; see the `otel`
//!   module and `examples/otel_three_domus.rs`.
//! * "Why" events: the decisions users ask about are `tracing` events at debug level with
//!   target `vicus::why` and a `why` field naming the decision — `refused` (deliveries refused
//!   before a handler saw them: `taberna`, `peer`, `error` such as `Forbidden` or
//!   `UnknownTaberna`, `reason`, `messages`), `queue_overrun` (a taberna's inbox full:
//!   `taberna`, `peer`, `depth`), `replica_chosen` (one of several replicas picked: `taberna`,
//!   `chosen`, `at`, `candidates`, `skipped_unreachable`), `failover` (a message its peer
//!   never received moved to another replica: `taberna`, `from`, `to`) and `route_change`
//!   (the resolver signalled new routes). Turn them on with a filter such as
//!   `vicus::why=debug`.
//! * `snapshot()` / `snapshot_and_reset()`: counters as deltas since the last reset (and
//!   totals), gauges with their peak since the last reset, send-to-answer latency (p50, p90,
//!   p99 from power-of-two buckets), rejections of our sends (`rejected_by`), messages from
//!   peers refused before a handler saw them (`refused_by`) and handshake failures by
//!   [`ErrorId`], and per
//!   peer: connected, RTT, sends in flight, queue depth, oldest pending age, bytes and
//!   messages in and out;
//!   `listener` holds the listener's pre-authentication counters since bind (admitted, refused
//!   in total, per source, by connect rate, by uid; handshakes ok, failed, timed out; pending).
//!   `connected_peers()` lists the peers with an open callis.
//! * Counters ([`reporting::Counters`]): `primary_calles_opened`, `primary_calles_closed`,
//!   `blob_calles_opened`, `blob_calles_closed`, `dial_attempts`, `dial_failures`,
//!   `identity_mismatches`, `protocol_violations` (every callis closed for a violation, a bad
//!   first frame included), `handshake_failures`, `messages_sent`, `messages_received` (what
//!   reached a local taberna from a peer), `messages_refused` (what vicus refused before any
//!   handler: unknown taberna, allow-list, type, full inbox, blob limits), `messages_accepted`,
//!   `messages_replied`, `messages_rejected`,
//!   `messages_timed_out`, `messages_failed`, `queue_overruns_send_a2`,
//!   `queue_overruns_send_a3` (outbound queue overruns per class), `queue_overruns_inbox`,
//!   `inline_handlers_slow` (sampled inline-handler calls over 1 ms),
//!   `calles_refused` (inbound calles refused by the connection limits),
//!   `primary_bytes_in`, `primary_bytes_out`, `blob_bytes_in`, `blob_bytes_out` (every byte
//!   read or written on a callis after TLS, first frames included, so one side's `_out`
//!   equals the other's `_in`),
//!   `blob_streams_opened`, `blob_streams_completed`, `blob_streams_cancelled`. Gauges: `peers`,
//!   `primary_calles`, `blob_calles`, `blob_streams`.
//! * `events()`: a feed of [`reporting::Event`]s — `PeerConnected`, `PeerDisconnected` (with
//!   the reason), `CallisUp`, `CallisDown`, `DialFailed`, `SessionRestarted`, `Backpressure`,
//!   `QueueOverrun`, `ConfigReloaded`, `AuthReloaded`, `ShutdownStarted`, `ShutdownCompleted`.
//! * `errors()` and `errors_since(seq, limit)`: errors with sequence numbers (protocol
//!   violations, dial and handshake failures, refused updates and reloads); the last 1024 are
//!   kept for catching up.
//! * Feeds are bounded and never block a producer: a subscriber that falls behind receives
//!   [`reporting::FeedItem::Missed`] with the number of items it lost, and `errors_since` says
//!   how many errors the ring no longer holds.
//! * Feature `metrics` mirrors all of this into the [`metrics`](https://docs.rs/metrics)
//!   facade (`vicus_<counter>_total`, `vicus_<gauge>`, `vicus_<gauge>_peak`, `vicus_peer_*`
//!   with a `peer` label, `vicus_rejected_total`, `vicus_refused_total` and
//!   `vicus_handshake_failures_by_reason_total` with a `reason` label,
//!   `vicus_send_latency_seconds` with a `quantile` label, `vicus_topic_*` while the topic
//!   service runs; all with a `domus` label), every
//!   second and on demand (`Reporting::export_to_metrics`); `cargo run --example metrics
//!   --features metrics` prints them as Prometheus text.
//! * Feature `reporting-service` serves all of this to other domus over vicus itself:
//!   `services::reporting::serve(&domus, allow)` answers the identities on `allow` (others are
//!   refused `Forbidden`) with a JSON report of the snapshot and the recent events and errors;
//!   `services::reporting::fetch` reads one. It is vicus's first mesh (A2) service: it lives
//!   on a reserved taberna (ids from [`RESERVED_TABERNA_BASE`] up are not the application's)
//!   and is off until started. `vicus top ADDR` (the `vicus` command, `vicus-cli/`) draws it
//!   live.
//!
//! ## Topics (publish/subscribe)
//!
//! [`services::topics`] adds publish/subscribe without a broker: `Topics::start(&domus,
//! TopicsConfig::default())` on each domus that takes part, then `topics.subscribe("orders.*")`
//! (a bounded inbox of copies, each answered like a taberna request, with the publisher's
//! verified identity) and `topics.publish("orders.eu", msg_type, payload)` (one acknowledged
//! copy per subscriber known at that moment, and a `PublishReport` with each subscriber's
//! outcome). Every copy rides the session like any message — exactly once, replayed across
//! cuts — and a slow subscriber never holds the others back. The module documents the
//! consistency model (effect point, order per publisher, leases) and `docs/wire-protocol.md`
//! the service's messages.
//!
//! ## HTTP gateway
//!
//! Feature `http-gateway` adds `vicus::gateway`: an [axum](https://docs.rs/axum) `Router` in
//! front of a domus, to mount in your own server (`Gateway::router`) or to run with
//! `gateway::serve`, which adds a header-read deadline and a connection cap and refuses an
//! open gateway on an address that is not loopback. `vicus node` serves it from its `[http]`
//! table.
//!
//! * `POST /tabernas/{id}` sends the body to taberna `id`; the message type is the header
//!   `Vicus-Message-Type` or `?type=` (decimal, `0x…` or `app:N`). **InOut** by default: 200
//!   with the reply as the body, 204 when accepted without one. **InOnly** with
//!   `Prefer: respond-async`: 202 with a request id once vicus admitted the message; the
//!   outcome goes to the event feed (`reporting::Event::DetachedSendEnded`).
//! * The same route with `Vicus-Blob: <base64 opening message>` streams the body into
//!   [`Domus::send_blob`] chunk by chunk as it arrives (never buffered whole; the blob's window
//!   paces the HTTP client); 204 once the taberna holds every byte.
//! * Every [`ErrorId`] maps to exactly one status, with a JSON body
//!   `{"error", "id", "message", "outcome_unknown"}`: e.g. `UnknownTaberna` 404, `Forbidden`
//!   403, `PayloadTooLarge` 413, `TabernaBusy` and `LocalQueueFull` 503 with `Retry-After`,
//!   `SendTimeout` 504 (`"outcome_unknown": true`), `PeerUnavailable` 502 — the whole table is
//!   in the module's docs, and a unit test holds the docs to the code.
//! * Bounded: bodies by `max_message_len` (a `Content-Length` over it is refused before the
//!   body is read) and `max_blob_len`, requests at once by `max_concurrent` (503 +
//!   `Retry-After` past it), each request by `request_timeout` (408 for a body that does not
//!   arrive; the send's timeout is capped by what is left). Access: bearer tokens, compared
//!   in constant time and never printed, or HTTPS with client certificates of the mesh
//!   (`gateway::serve_tls`: TLS 1.3, the domus's own verifier, a [`TrustPolicy`] on the
//!   client's identity).
//! * `GET /healthz` (no token needed) and `GET /metrics` (the text of a renderer you give,
//!   e.g. a Prometheus recorder's; with feature `metrics` the domus's figures are exported
//!   right before each render).
//!
//! ## Testing an application
//!
//! Feature `test-util` adds the module `vicus::testing`: a `Mesh` (a development CA, a shared
//! resolver and named domus on loopback in one line, tabernas registered and routed by name)
//! and a `FaultProxy` to put on a route (cut, blackhole, delay, throttle, refuse,
//! cut after N bytes). Enable it in `[dev-dependencies]` only; vicus's own integration tests
//! are written with it.
//!
//! Feature `sim` adds `testing::sim`: domus over [turmoil](https://docs.rs/turmoil)'s
//! simulated network, so one test runs many domus deterministically on one thread and a
//! virtual clock — partitions, latency, held and released traffic, hosts crashed and
//! restarted — with the production TLS, sessions and replay above the simulated byte stream;
//! the same seed gives the same run. `cargo run --example simulation --features sim` shows a
//! taberna tested under a partition.
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
// The fuzz harness: compiled for the fuzz targets (cargo-fuzz sets `--cfg fuzzing`; they
// build with feature `test-util`, whose pair harness it drives) and for this crate's own
// tests (which replay the corpus), never into a user's build.
#[cfg(any(fuzzing, test))]
#[doc(hidden)]
pub mod fuzzing;
pub mod reporting;
pub mod resolve;
mod runtime;
pub mod services;
pub mod taberna;

#[cfg(feature = "serde")]
pub mod codec;
#[cfg(feature = "dev-certs")]
pub mod dev_certs;
#[cfg(feature = "http-gateway")]
pub mod gateway;
#[cfg(feature = "test-util")]
pub mod testing;
#[cfg(feature = "watch")]
pub mod watch;
// The "two polls agree, report once" rule of the file pollers (watch, file-resolver).
#[cfg(any(feature = "watch", feature = "file-resolver"))]
mod change_tracker;
mod observe;
#[cfg(feature = "otel")]
pub mod otel;

pub use a0_transport::{AuthConfig, DomusAddr, DomusId, PeerIdentity, TrustPolicy};
pub use a1_callis::headers::{Headers, TraceContext};
pub use domus::{
    BlobReceiver, BlobSender, ConfigHandle, Delivery, Destination, Domus, DomusBuilder,
    DomusConfig, MessageCodec, Outcome, RESERVED_TABERNA_BASE, Receipt, Reply, SendOptions,
    WeakDomus, Window,
};
pub use error::{ERROR_MESSAGE_MAX_LEN, Error, ErrorId, Rejection, Result};
pub use reporting::Reporting;
pub use resolve::{
    Candidate, ResolverFeed, ResolverFeeds, Route, RouteChanges, RouteNotifier, RouteResolver,
    SimpleResolver, TopicPublishers,
};
#[cfg(feature = "dns-srv")]
pub use resolve::{DnsSrvConfig, DnsSrvResolver};
#[cfg(feature = "file-resolver")]
pub use resolve::{FileResolver, FileWatchHandle, RouteTable, RoutesFile};
pub use taberna::{MessageType, Taberna, TabernaId, TabernaOptions, TabernaRequest, TypedRequest};
