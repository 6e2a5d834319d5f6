//! [`GatewayConfig`]: the gateway's limits and access rule, each with its default and range,
//! and the check [`Gateway::new`](super::Gateway::new) runs. Plain data: no IO.

use std::sync::Arc;
use std::time::Duration;

use super::Access;
use crate::error::{Error, ErrorId};

/// Renders the metrics text served at `GET /metrics` (e.g. a Prometheus recorder's
/// `PrometheusHandle::render`).
pub type MetricsRenderer = Arc<dyn Fn() -> String + Send + Sync>;

/// The gateway's limits and access rule. Every field has a default (below) and is checked by
/// [`Gateway::new`](super::Gateway::new).
#[derive(Clone)]
#[non_exhaustive]
pub struct GatewayConfig {
    /// Who may call `/tabernas/…` and `/metrics`. Default [`Access::Open`] (refused by
    /// [`serve`](super::serve) on a non-loopback address).
    pub access: Access,
    /// Requests handled at once; more are refused 503 `GatewayBusy`. Default 256, 1..=65536.
    /// A message body is buffered whole (a send needs its payload), so the bodies in memory
    /// are bounded by `max_concurrent` × the domus's `max_message_len` (256 MiB by default);
    /// blobs are streamed and hold at most a chunk each.
    pub max_concurrent: usize,
    /// Detached (`Prefer: respond-async`) sends waiting for their outcome; more are refused 503
    /// `GatewayBusy`. Default 4096, 1..=1,048,576.
    pub max_pending_async: usize,
    /// A request's deadline: its body must arrive within it, and its send's timeout is capped
    /// by what is left. For a blob, the longest wait for the next body byte. Default 30 s,
    /// 1 ms..=1 h (a send's own range).
    pub request_timeout: Duration,
    /// The largest blob body. Default 1 GiB; at least 1.
    pub max_blob_len: u64,
    /// Put vicus's own error messages (which name peers, addresses, identities) in error
    /// bodies. Default false: a fixed text per kind.
    pub detailed_errors: bool,
    /// For [`serve`](super::serve) and [`serve_tls`](super::serve_tls): the time to read a
    /// request's headers (and to finish a TLS handshake). Default 10 s.
    pub header_read_timeout: Duration,
    /// For [`serve`](super::serve) and [`serve_tls`](super::serve_tls): open connections at most; further ones wait in the listen backlog.
    /// Default 2048.
    pub max_connections: usize,
    /// For [`serve`](super::serve): allow [`Access::Open`] on an address that is not loopback. Default false.
    pub dangerous_open_on_any_address: bool,
    pub(super) metrics: Option<MetricsRenderer>,
}

impl std::fmt::Debug for GatewayConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GatewayConfig")
            .field("access", &self.access)
            .field("max_concurrent", &self.max_concurrent)
            .field("max_pending_async", &self.max_pending_async)
            .field("request_timeout", &self.request_timeout)
            .field("max_blob_len", &self.max_blob_len)
            .field("detailed_errors", &self.detailed_errors)
            .field("header_read_timeout", &self.header_read_timeout)
            .field("max_connections", &self.max_connections)
            .field(
                "dangerous_open_on_any_address",
                &self.dangerous_open_on_any_address,
            )
            .field("metrics", &self.metrics.is_some())
            .finish()
    }
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            access: Access::Open,
            max_concurrent: 256,
            max_pending_async: 4096,
            request_timeout: Duration::from_secs(30),
            max_blob_len: 1 << 30,
            detailed_errors: false,
            header_read_timeout: Duration::from_secs(10),
            max_connections: 2048,
            dangerous_open_on_any_address: false,
            metrics: None,
        }
    }
}

impl GatewayConfig {
    /// Sets who may call the protected routes.
    pub fn access(mut self, access: Access) -> Self {
        self.access = access;
        self
    }

    /// Serves `GET /metrics` with this renderer's text (`text/plain; version=0.0.4`). With
    /// feature `metrics`, the domus's figures are exported to the `metrics` facade right
    /// before each render, so a recorder installed by the application shows them fresh.
    pub fn metrics_renderer(mut self, render: MetricsRenderer) -> Self {
        self.metrics = Some(render);
        self
    }

    /// Checks every field against its range (what [`Gateway::new`](super::Gateway::new) does); `InvalidConfig`
    /// naming the field.
    pub fn validate(&self) -> Result<(), Error> {
        let bad = |field: &str, problem: String| {
            Err(Error::new(
                ErrorId::InvalidConfig,
                format!("GatewayConfig::{field}: {problem}"),
            ))
        };
        if !(1..=65_536).contains(&self.max_concurrent) {
            return bad(
                "max_concurrent",
                format!("{} is outside 1..=65536", self.max_concurrent),
            );
        }
        if !(1..=1 << 20).contains(&self.max_pending_async) {
            return bad(
                "max_pending_async",
                format!("{} is outside 1..=1048576", self.max_pending_async),
            );
        }
        if !(1..=65_536).contains(&self.max_connections) {
            return bad(
                "max_connections",
                format!("{} is outside 1..=65536", self.max_connections),
            );
        }
        let ms = Duration::from_millis(1);
        let hour = Duration::from_secs(3600);
        for (field, d) in [
            ("request_timeout", self.request_timeout),
            ("header_read_timeout", self.header_read_timeout),
        ] {
            if !(ms..=hour).contains(&d) {
                return bad(field, format!("{d:?} is outside 1ms..=1h"));
            }
        }
        if self.max_blob_len == 0 {
            return bad("max_blob_len", "0 would refuse every blob".to_owned());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configs_out_of_range_are_refused() {
        let mut c = GatewayConfig::default();
        assert!(c.validate().is_ok());
        c.max_concurrent = 0;
        assert_eq!(
            c.validate().map_err(|e| e.id()),
            Err(ErrorId::InvalidConfig)
        );
        let c = GatewayConfig {
            request_timeout: Duration::ZERO,
            ..GatewayConfig::default()
        };
        assert!(c.validate().is_err());
    }
}
