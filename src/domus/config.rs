//! [`DomusConfig`]: every limit and timer of a domus in one plain struct, with its default, its
//! range and the reason for it, validated before a domus starts.
//!
//! Pure data and checks; no IO. A running domus changes it through
//! [`ConfigHandle::update`](super::ConfigHandle::update), which validates the whole struct and
//! refuses changes to the fields fixed at build time; [`TransportConfig`] holds the A0 limits.

use std::time::Duration;

use crate::a0_transport::TransportConfig;
use crate::a1_callis::frame::MESSAGE_FIXED_LEN;
use crate::a1_callis::session::SessionConfig;
use crate::error::Error;

/// The configuration of a domus. Build it with `default()` and set fields.
///
/// When a change made with [`ConfigHandle::update`](super::ConfigHandle::update) applies:
///
/// | when | fields |
/// |---|---|
/// | **live**: the next send, delivery or accepted callis | `send_timeout`, `resolve_timeout`, `max_message_len` (the local check; the frame limit a peer is told applies to new peers), `default_inbox_depth` (every taberna registered without its own depth), `hello_timeout` (telling inbound calles apart; sessions: new peers), `shutdown_timeout`, `max_unopened_calles_per_peer`, `max_unopened_calles`, `max_peers`, `max_pinned_addresses` (the next pin), `max_retained_reply_bytes` (replies kept from then on), `peer_recheck_interval` (from the next check) |
/// | **new peers**: peers first contacted after the change (and peers after a restart of this domus) | `max_in_flight_per_peer`, `max_in_flight_bytes_per_peer`, `dedupe_window`, `max_unsent_answer_bytes`, `max_headers`, `max_headers_len`, `keepalive_interval`, `idle_timeout`, `frame_read_timeout`, `max_frames_per_second`, `max_refusals_per_second`, `max_callis_age`, `peer_retire_after` |
/// | **fixed** at build: a change is refused with `InvalidConfig` naming the field | `transport` (use `Domus::reload_auth` and `Domus::set_trust_policy` for authentication), `reconnect_backoff_min`, `reconnect_backoff_max`, every `blob_*` field, `max_blob_streams_per_peer`, `max_blob_cancels_per_second` |
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct DomusConfig {
    /// A0: handshake and connect deadlines, admission limits, trust policy.
    pub transport: TransportConfig,
    /// How long a send waits for its answer (including waiting for capacity and for a
    /// callis) unless `SendOptions::timeout` says otherwise. Default 10 s; 1 ms to 1 h.
    pub send_timeout: Duration,
    /// The bound on one resolver call. Default 2 s; 1 ms to 1 min.
    pub resolve_timeout: Duration,
    /// The largest message payload this domus sends or accepts, replies included (a reply
    /// over the limit of either side reaches the sender as `PayloadTooLarge`). Default 1 MiB;
    /// 0 to 64 MiB. Larger data belongs in a blob.
    pub max_message_len: usize,
    /// Messages in flight (queued or unanswered) per peer; `send` waits for a slot, `try_send`
    /// fails with `LocalQueueFull`. Default 4096; 1 to 1 048 576.
    pub max_in_flight_per_peer: u32,
    /// Payload bytes in flight (queued or unanswered) per peer: the memory one slow or absent
    /// peer can pin. `send` waits for room, `try_send` fails with `LocalQueueFull`. Default
    /// 64 MiB; at least `max_message_len`, at most 4 GiB − 1.
    pub max_in_flight_bytes_per_peer: usize,
    /// The receiver's dedupe window in message ids (each slot remembers one answer). Default
    /// 8192; at least `max_in_flight_per_peer`, at most 1 048 576.
    pub dedupe_window: u32,
    /// Reply bytes kept so a reply survives a reconnect, for all peers together: a receiver
    /// keeps each reply until its sender says it has seen it (DONE_BELOW), and a reply that
    /// does not fit is sent but not kept (a replayed request then gets `ReplyLost`). Default
    /// 32 MiB; 0 to 16 GiB.
    pub max_retained_reply_bytes: usize,
    /// Answer bytes (replies and refusals) that may wait for one peer to read them: once
    /// that many wait, new messages from the peer are refused with `TabernaBusy` (not
    /// delivered, said so in the reason) until it reads again, so a peer that sends requests
    /// and never reads cannot make this domus hold unbounded replies (T31). The most a peer
    /// can be owed is this plus one reply, and at most `dedupe_window` answers (a peer owed
    /// more ran past its window: a protocol violation). A peer that reads nothing at all is
    /// cut off after `idle_timeout` (T33). Default 16 MiB; 64 KiB to 4 GiB.
    pub max_unsent_answer_bytes: usize,
    /// The most headers one message may carry ([`Headers`](crate::Headers)), either way: a
    /// send with more fails at once with `HeadersTooLarge`, and a message from a peer with
    /// more is refused with it before any handler sees it. Default 16; 0 (no headers at all)
    /// to 1,024.
    pub max_headers: u16,
    /// The most bytes one message's headers may take (keys, values and 3 bytes each), either
    /// way, as `max_headers`. Headers also count toward `max_message_len`. Default 4 KiB; 0
    /// to 65,534.
    pub max_headers_len: usize,
    /// How often an open callis is probed with a PING (RTT is measured from it). Default
    /// 5 s; 10 ms to 10 min.
    pub keepalive_interval: Duration,
    /// A callis that receives nothing for this long is closed. Default 20 s; more than
    /// `keepalive_interval`, at most 1 h.
    pub idle_timeout: Duration,
    /// How long a peer has to send its HELLO. Default 10 s; 10 ms to 5 min.
    pub hello_timeout: Duration,
    /// How long one frame may take to arrive once its first byte has (a peer trickling a
    /// frame is closed even though it is never idle). Default 30 s; 10 ms to 1 h.
    pub frame_read_timeout: Duration,
    /// Frames one peer may send per second on one callis before it is closed as a flood
    /// (PING, PONG and skipped frames count double). The blob callis has the same budget of
    /// its own: BLOB_DATA carrying bytes counts once, every other frame twice (with 64 KiB
    /// chunks the default allows far more than any link carries). Default 4 000 000, far
    /// above what a legitimate peer produces on this stack; 1 000 to 100 000 000.
    pub max_frames_per_second: u32,
    /// Deliveries per second from one peer that this domus may refuse on its own (unknown
    /// taberna, allow-list, message type) before it closes the peer's callis: error replies
    /// cannot be used to make it do unbounded work. Application rejects and `TabernaBusy` do
    /// not count. Default 10 000; 1 to 10 000 000.
    pub max_refusals_per_second: u32,
    /// The first reconnect delay after a failed dial; it doubles (with jitter) up to
    /// `reconnect_backoff_max`. Default 50 ms; 1 ms to 1 min.
    pub reconnect_backoff_min: Duration,
    /// The longest reconnect delay. Default 5 s; at least `reconnect_backoff_min`, at most 10 min.
    pub reconnect_backoff_max: Duration,
    /// The inbox depth of a taberna registered without one. Default 4096 (one peer's whole
    /// in-flight window fits, so a single fast sender is never told `TabernaBusy` by a taberna
    /// that keeps up on average); 1 to 1 048 576.
    pub default_inbox_depth: usize,
    /// How long `shutdown()` waits for pending work before it stops everything. Default 5 s;
    /// 1 ms to 10 min.
    pub shutdown_timeout: Duration,
    /// The largest BLOB_DATA payload this domus writes and accepts (the smaller of both
    /// sides' values is used). Default 64 KiB; 1 KiB to 1 MiB.
    pub blob_chunk_len: usize,
    /// Per-stream blob window: how far a sender may run ahead of what the receiving
    /// application consumed, and how many bytes a sending stream holds. Default 8 MiB; at
    /// least `blob_chunk_len`, at most 256 MiB.
    pub blob_window: usize,
    /// Blob streams open at once with one peer, per direction; one more is refused with
    /// `BlobBufferFull`. Default 64; 1 to 4096.
    pub max_blob_streams_per_peer: usize,
    /// A blob stream that moves no byte for this long fails with `BlobStreamIdleTimeout` on
    /// both sides, and a blob callis that carries no stream for this long is closed (the next
    /// blob dials a new one). Default 30 s; 10 ms to 1 h.
    pub blob_idle_timeout: Duration,
    /// Bytes reserved for receiving blob streams, all peers together: every stream reserves
    /// one `blob_window` when it opens, and an open that does not fit is refused with
    /// `BlobBufferFull`. Default 512 MiB; at least `blob_window`, at most 1 TiB.
    pub blob_inbound_budget: usize,
    /// The same for sending blob streams. Default 512 MiB; at least `blob_window`, at most
    /// 1 TiB.
    pub blob_outbound_budget: usize,
    /// Blob streams a peer may cancel in one second; past that its blob callis closes as a
    /// protocol violation (open/cancel churn, T17). Default 1000; 1 to 10 000 000.
    pub max_blob_cancels_per_second: u32,
    /// Authenticated inbound calles from one identity still waiting for their first frame
    /// (HELLO or BLOB_HELLO, within `hello_timeout`); one more is refused at once with a
    /// CLOSE `AdmissionRefused` (T8). An honest peer has at most its primary and blob callis
    /// and a redial in that state. Default 4; 1 to 1024.
    pub max_unopened_calles_per_peer: usize,
    /// The same, all identities together. Default 256; 1 to 65 536.
    pub max_unopened_calles: usize,
    /// Peers with an open primary callis at once: an inbound callis from one more identity is
    /// refused with a CLOSE `AdmissionRefused` (T8). A connected peer may always replace its
    /// calles (each identity holds at most one primary and one blob callis: a new one replaces
    /// the old), and the dials this domus makes are not limited. Default 4096; 1 to 1 000 000.
    pub max_peers: usize,
    /// Addresses whose identity this domus remembers for routes that name none (a route
    /// without `identity` accepts whichever identity the trust anchors certify there; the
    /// first dial learns it and later sends reuse it). One more evicts the pin used longest
    /// ago, which costs only a handshake at that address's next send; a pin unused for
    /// `peer_retire_after` is forgotten, and one whose peer no longer answers there (another
    /// identity did) is dropped at that dial. Bounded because a resolver can name any number of
    /// addresses. Default 4096 (as `max_peers`); 1 to 1 000 000.
    pub max_pinned_addresses: usize,
    /// The longest a primary callis is used. The side that dialled it dials a replacement
    /// once it is this old (the new callis takes over, unanswered messages are replayed on
    /// it, nothing is lost); the side that accepted it closes it at 1.25 times this age if
    /// it is still in use. Long-lived calles thus pick up rotated certificates and revocations
    /// and cannot be held forever (T8). Default `None` (no limit); 100 ms to 365 days.
    pub max_callis_age: Option<Duration>,
    /// How long a peer stays known after its last callis closed, when nothing is in flight
    /// either way; then its driver, session and dedupe state are forgotten (a later contact
    /// starts afresh, with message ids above every id used before). A peer is forgotten at
    /// once, without waiting, when it shut down (its CLOSE said so) or when it has said
    /// (DONE_BELOW) that it waits for no answer: it cannot replay anything then. Otherwise
    /// the wait protects exactly-once: a peer may replay an answered message (whose answer
    /// it never got) until that send's deadline, at most 1 h (`SendOptions::timeout`), so a
    /// value below the longest send timeout your peers use can deliver such a message twice.
    /// An address pin (`max_pinned_addresses`) unused this long is forgotten too (from the
    /// next look-up on), and a peer forgotten after it shut down is remembered as shut down
    /// this long (sends to it keep failing at once while it cannot be reached). Default 1 h;
    /// 1 s to 7 days.
    pub peer_retire_after: Duration,
    /// How often the certificate of every connected peer is verified again, as at a
    /// handshake: a callis whose peer's certificate expired since (or that the trust anchors
    /// and CRLs no longer accept) is closed, with the reason on the error feed, and the
    /// peer's next handshake is refused. `None`: only at `Domus::reload_auth` and at
    /// handshakes, so a callis could outlive its peer's certificate. Default 60 s; 100 ms to
    /// 1 day.
    pub peer_recheck_interval: Option<Duration>,
}

impl Default for DomusConfig {
    fn default() -> Self {
        Self {
            transport: TransportConfig::default(),
            send_timeout: Duration::from_secs(10),
            resolve_timeout: Duration::from_secs(2),
            max_message_len: 1024 * 1024,
            max_in_flight_per_peer: 4096,
            max_in_flight_bytes_per_peer: 64 * 1024 * 1024,
            dedupe_window: 8192,
            max_retained_reply_bytes: 32 * 1024 * 1024,
            max_unsent_answer_bytes: 16 * 1024 * 1024,
            max_headers: 16,
            max_headers_len: 4096,
            keepalive_interval: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(20),
            hello_timeout: Duration::from_secs(10),
            frame_read_timeout: Duration::from_secs(30),
            max_frames_per_second: 4_000_000,
            max_refusals_per_second: 10_000,
            reconnect_backoff_min: Duration::from_millis(50),
            reconnect_backoff_max: Duration::from_secs(5),
            default_inbox_depth: 4096,
            shutdown_timeout: Duration::from_secs(5),
            blob_chunk_len: 64 * 1024,
            blob_window: 8 * 1024 * 1024,
            max_blob_streams_per_peer: 64,
            blob_idle_timeout: Duration::from_secs(30),
            blob_inbound_budget: 512 * 1024 * 1024,
            blob_outbound_budget: 512 * 1024 * 1024,
            max_blob_cancels_per_second: 1000,
            max_unopened_calles_per_peer: 4,
            max_unopened_calles: 256,
            max_peers: 4096,
            max_pinned_addresses: 4096,
            max_callis_age: None,
            peer_retire_after: Duration::from_secs(3600),
            peer_recheck_interval: Some(Duration::from_secs(60)),
        }
    }
}

fn within(field: &str, v: Duration, lo: Duration, hi: Duration) -> Result<(), Error> {
    if v < lo || v > hi {
        return Err(Error::invalid_config(
            field,
            format!("{v:?} is outside {lo:?}..={hi:?}"),
        ));
    }
    Ok(())
}

fn count(field: &str, v: u64, lo: u64, hi: u64) -> Result<(), Error> {
    if v < lo || v > hi {
        return Err(Error::invalid_config(
            field,
            format!("{v} is outside {lo}..={hi}"),
        ));
    }
    Ok(())
}

const MS: Duration = Duration::from_millis(1);
const MIN: Duration = Duration::from_secs(60);

impl DomusConfig {
    /// Checks every field and relation; the error names the field.
    pub fn validate(&self) -> Result<(), Error> {
        self.transport.validate()?;
        within("send_timeout", self.send_timeout, MS, 60 * MIN)?;
        within("resolve_timeout", self.resolve_timeout, MS, MIN)?;
        count("max_message_len", self.max_message_len as u64, 0, 64 << 20)?;
        count(
            "max_in_flight_per_peer",
            u64::from(self.max_in_flight_per_peer),
            1,
            1 << 20,
        )?;
        count(
            "max_in_flight_bytes_per_peer",
            self.max_in_flight_bytes_per_peer as u64,
            (self.max_message_len as u64).max(1),
            u64::from(u32::MAX),
        )?;
        count("dedupe_window", u64::from(self.dedupe_window), 1, 1 << 20)?;
        if self.dedupe_window < self.max_in_flight_per_peer {
            return Err(Error::invalid_config(
                "dedupe_window",
                format!(
                    "{} must be at least max_in_flight_per_peer ({})",
                    self.dedupe_window, self.max_in_flight_per_peer
                ),
            ));
        }
        count(
            "max_retained_reply_bytes",
            self.max_retained_reply_bytes as u64,
            0,
            1 << 34,
        )?;
        count(
            "max_unsent_answer_bytes",
            self.max_unsent_answer_bytes as u64,
            64 * 1024,
            1 << 32,
        )?;
        count("max_headers", u64::from(self.max_headers), 0, 1024)?;
        count(
            "max_headers_len",
            self.max_headers_len as u64,
            0,
            crate::a1_callis::headers::MAX_HEADERS_LEN as u64,
        )?;
        within(
            "keepalive_interval",
            self.keepalive_interval,
            10 * MS,
            10 * MIN,
        )?;
        within(
            "idle_timeout",
            self.idle_timeout,
            self.keepalive_interval.saturating_add(MS),
            60 * MIN,
        )?;
        within("hello_timeout", self.hello_timeout, 10 * MS, 5 * MIN)?;
        within(
            "frame_read_timeout",
            self.frame_read_timeout,
            10 * MS,
            60 * MIN,
        )?;
        count(
            "max_frames_per_second",
            u64::from(self.max_frames_per_second),
            1000,
            100_000_000,
        )?;
        count(
            "max_refusals_per_second",
            u64::from(self.max_refusals_per_second),
            1,
            10_000_000,
        )?;
        count(
            "max_unopened_calles_per_peer",
            self.max_unopened_calles_per_peer as u64,
            1,
            1024,
        )?;
        count(
            "max_unopened_calles",
            self.max_unopened_calles as u64,
            1,
            65_536,
        )?;
        count("max_peers", self.max_peers as u64, 1, 1_000_000)?;
        count(
            "max_pinned_addresses",
            self.max_pinned_addresses as u64,
            1,
            1_000_000,
        )?;
        if let Some(age) = self.max_callis_age {
            within("max_callis_age", age, 100 * MS, 365 * 24 * 60 * MIN)?;
        }
        if let Some(every) = self.peer_recheck_interval {
            within("peer_recheck_interval", every, 100 * MS, 24 * 60 * MIN)?;
        }
        within(
            "peer_retire_after",
            self.peer_retire_after,
            1000 * MS,
            7 * 24 * 60 * MIN,
        )?;
        within("reconnect_backoff_min", self.reconnect_backoff_min, MS, MIN)?;
        within(
            "reconnect_backoff_max",
            self.reconnect_backoff_max,
            self.reconnect_backoff_min,
            10 * MIN,
        )?;
        count(
            "default_inbox_depth",
            self.default_inbox_depth as u64,
            1,
            1 << 20,
        )?;
        within("shutdown_timeout", self.shutdown_timeout, MS, 10 * MIN)?;
        count(
            "blob_chunk_len",
            self.blob_chunk_len as u64,
            crate::a1_callis::blob::MIN_CHUNK_LEN as u64,
            1 << 20,
        )?;
        count(
            "blob_window",
            self.blob_window as u64,
            self.blob_chunk_len as u64,
            256 << 20,
        )?;
        count(
            "max_blob_streams_per_peer",
            self.max_blob_streams_per_peer as u64,
            1,
            4096,
        )?;
        within(
            "blob_idle_timeout",
            self.blob_idle_timeout,
            10 * MS,
            60 * MIN,
        )?;
        count(
            "blob_inbound_budget",
            self.blob_inbound_budget as u64,
            self.blob_window as u64,
            1 << 40,
        )?;
        count(
            "blob_outbound_budget",
            self.blob_outbound_budget as u64,
            self.blob_window as u64,
            1 << 40,
        )?;
        count(
            "max_blob_cancels_per_second",
            u64::from(self.max_blob_cancels_per_second),
            1,
            10_000_000,
        )?;
        Ok(())
    }

    /// Refuses a live change to a field fixed when the domus was built.
    pub(crate) fn check_fixed(&self, built: &DomusConfig) -> Result<(), Error> {
        let fixed: [(&str, bool); 10] = [
            ("transport", self.transport != built.transport),
            (
                "reconnect_backoff_min",
                self.reconnect_backoff_min != built.reconnect_backoff_min,
            ),
            (
                "reconnect_backoff_max",
                self.reconnect_backoff_max != built.reconnect_backoff_max,
            ),
            (
                "blob_chunk_len",
                self.blob_chunk_len != built.blob_chunk_len,
            ),
            ("blob_window", self.blob_window != built.blob_window),
            (
                "max_blob_streams_per_peer",
                self.max_blob_streams_per_peer != built.max_blob_streams_per_peer,
            ),
            (
                "blob_idle_timeout",
                self.blob_idle_timeout != built.blob_idle_timeout,
            ),
            (
                "blob_inbound_budget",
                self.blob_inbound_budget != built.blob_inbound_budget,
            ),
            (
                "blob_outbound_budget",
                self.blob_outbound_budget != built.blob_outbound_budget,
            ),
            (
                "max_blob_cancels_per_second",
                self.max_blob_cancels_per_second != built.max_blob_cancels_per_second,
            ),
        ];
        match fixed.iter().find(|(_, changed)| *changed) {
            Some((field, _)) => Err(Error::invalid_config(
                field,
                "is fixed when the domus is built and cannot change on a running domus",
            )),
            None => Ok(()),
        }
    }

    pub(crate) fn blob(&self) -> crate::a1_callis::blob::BlobConfig {
        crate::a1_callis::blob::BlobConfig {
            chunk_len: self.blob_chunk_len,
            window: self.blob_window as u64,
            // Both directions share one table; the per-direction caps are enforced (with
            // budgets) before a stream opens.
            max_streams: self.max_blob_streams_per_peer.saturating_mul(2),
            idle_timeout: self.blob_idle_timeout,
            max_peer_cancels_per_second: self.max_blob_cancels_per_second,
            max_frames_per_second: self.max_frames_per_second,
        }
    }

    pub(crate) fn session(&self) -> SessionConfig {
        SessionConfig {
            max_frame_len: u32::try_from(self.max_message_len.saturating_add(MESSAGE_FIXED_LEN))
                .unwrap_or(u32::MAX),
            window: self.dedupe_window,
            max_in_flight: self.max_in_flight_per_peer,
            keepalive_interval: self.keepalive_interval,
            idle_timeout: self.idle_timeout,
            hello_timeout: self.hello_timeout,
            max_retained_reply_bytes: self.max_retained_reply_bytes,
            max_unsent_answer_bytes: self.max_unsent_answer_bytes,
            transmit_batch_bytes: 256 * 1024,
            frame_read_timeout: self.frame_read_timeout,
            max_frames_per_second: self.max_frames_per_second,
            max_refusals_per_second: self.max_refusals_per_second,
            max_headers: self.max_headers,
            max_headers_len: self.max_headers_len,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_bad_values_name_their_field() {
        DomusConfig::default().validate().unwrap();
        type Change = Box<dyn Fn(&mut DomusConfig)>;
        let cases: Vec<(&str, Change)> = vec![
            (
                "send_timeout",
                Box::new(|c| c.send_timeout = Duration::ZERO),
            ),
            (
                "max_in_flight_per_peer",
                Box::new(|c| c.max_in_flight_per_peer = 0),
            ),
            ("dedupe_window", Box::new(|c| c.dedupe_window = 10)),
            (
                "idle_timeout",
                Box::new(|c| c.idle_timeout = Duration::from_secs(1)),
            ),
            (
                "reconnect_backoff_max",
                Box::new(|c| c.reconnect_backoff_max = MS),
            ),
            ("max_message_len", Box::new(|c| c.max_message_len = 1 << 30)),
            (
                "default_inbox_depth",
                Box::new(|c| c.default_inbox_depth = 0),
            ),
            ("blob_window", Box::new(|c| c.blob_window = 100)),
            (
                "blob_inbound_budget",
                Box::new(|c| c.blob_inbound_budget = 1),
            ),
        ];
        for (field, change) in cases {
            let mut c = DomusConfig::default();
            change(&mut c);
            let e = c.validate().unwrap_err();
            assert!(e.message().starts_with(field), "{field}: {e}");
        }
    }
}
