//! Feature `metrics`: mirrors the reporting counters and gauges into the [`metrics`] facade, so
//! whatever exporter the application installed (Prometheus, StatsD, …) shows them.
//!
//! The hot paths do not call the facade: they keep updating vicus's own atomics, and
//! [`Reporting::export_to_metrics`] publishes the totals (as absolute counters) and the gauges
//! now. A domus built with the feature does that every [`EXPORT_INTERVAL`] and once more when
//! it shuts down; call it yourself right before a scrape for the freshest figures.
//!
//! Names are stable: `vicus_<counter>_total` for counters, `vicus_<gauge>` and
//! `vicus_<gauge>_peak` for gauges, `vicus_peer_*` per peer (label `peer`, bounded by the peers
//! this domus talks to), `vicus_rejected_total` (sends of ours refused), `vicus_refused_total`
//! (messages from peers refused before a handler) and `vicus_handshake_failures_by_reason_total`
//! (label `reason`, an [`ErrorId`](crate::ErrorId) name), `vicus_send_latency_seconds` (label
//! `quantile`), `vicus_listener_<counter>_total` and `vicus_listener_pending_handshakes` (the
//! listener's pre-authentication admission and handshake counters), `vicus_crypto_provider_info`
//! (1, label `provider`). Every series carries the
//! label `domus` (this domus's id). This module must not label anything with unbounded values
//! (message ids, addresses, peer-chosen strings).

use std::time::Duration;

use super::{Gauge, Reporting};

/// How often a running domus publishes into the facade.
pub const EXPORT_INTERVAL: Duration = Duration::from_secs(1);

fn gauge(domus: &str, name: &str, g: Gauge) {
    metrics::gauge!(format!("vicus_{name}"), "domus" => domus.to_owned()).set(g.current as f64);
    metrics::gauge!(format!("vicus_{name}_peak"), "domus" => domus.to_owned()).set(g.peak as f64);
}

impl Reporting {
    /// Publishes every counter total and gauge into the `metrics` facade now (see the module
    /// docs for the names).
    pub fn export_to_metrics(&self) {
        let s = self.snapshot();
        let domus = self.recorder.domus.clone();
        for (name, value) in s.totals.named() {
            metrics::counter!(format!("vicus_{name}_total"), "domus" => domus.clone())
                .absolute(value);
        }
        gauge(&domus, "peers", s.peers);
        gauge(&domus, "primary_calles", s.primary_calles);
        gauge(&domus, "blob_calles", s.blob_calles);
        gauge(&domus, "blob_streams", s.blob_streams);
        for (reason, n) in &self.recorder.rejected_totals() {
            metrics::counter!("vicus_rejected_total", "domus" => domus.clone(), "reason" => reason.name())
                .absolute(*n);
        }
        for (reason, n) in &self.recorder.refused_totals() {
            metrics::counter!("vicus_refused_total", "domus" => domus.clone(), "reason" => reason.name())
                .absolute(*n);
        }
        for (reason, n) in &self.recorder.handshake_failure_totals() {
            metrics::counter!(
                "vicus_handshake_failures_by_reason_total",
                "domus" => domus.clone(),
                "reason" => reason.name()
            )
            .absolute(*n);
        }
        metrics::gauge!("vicus_crypto_provider_info", "domus" => domus.clone(), "provider" => s.crypto_provider)
            .set(1.0);
        let l = s.listener;
        for (name, value) in [
            ("admitted", l.admitted),
            ("refused_global", l.refused_global),
            ("refused_per_source", l.refused_per_source),
            ("refused_rate", l.refused_rate),
            ("refused_uid", l.refused_uid),
            ("handshakes_ok", l.handshakes_ok),
            ("handshakes_failed", l.handshakes_failed),
            ("handshake_timeouts", l.handshake_timeouts),
            ("client_hello_timeouts", l.client_hello_timeouts),
            ("evicted_silent", l.evicted_silent),
        ] {
            metrics::counter!(format!("vicus_listener_{name}_total"), "domus" => domus.clone())
                .absolute(value);
        }
        metrics::gauge!("vicus_listener_pending_handshakes", "domus" => domus.clone())
            .set(l.pending_handshakes as f64);
        let latency = self.recorder.latency_totals();
        for (q, d) in [
            ("0.5", latency.p50),
            ("0.9", latency.p90),
            ("0.99", latency.p99),
        ] {
            metrics::gauge!("vicus_send_latency_seconds", "domus" => domus.clone(), "quantile" => q)
                .set(d.as_secs_f64());
        }
        for p in &s.per_peer {
            let peer = p.peer.to_string();
            let labels = [("domus", domus.clone()), ("peer", peer)];
            metrics::gauge!("vicus_peer_connected", &labels).set(f64::from(u8::from(p.connected)));
            metrics::gauge!("vicus_peer_rtt_seconds", &labels)
                .set(p.rtt.map_or(0.0, |d| d.as_secs_f64()));
            metrics::gauge!("vicus_peer_in_flight", &labels).set(p.in_flight as f64);
            metrics::gauge!("vicus_peer_queue_depth", &labels).set(p.queue_depth as f64);
            metrics::gauge!("vicus_peer_oldest_pending_seconds", &labels)
                .set(p.oldest_pending.map_or(0.0, |d| d.as_secs_f64()));
            metrics::counter!("vicus_peer_bytes_in_total", &labels).absolute(p.bytes_in);
            metrics::counter!("vicus_peer_bytes_out_total", &labels).absolute(p.bytes_out);
        }
        // The topic service's figures while it runs (not per pattern: a label per pattern
        // would let subscribers choose the series' cardinality).
        if let Some(t) = &s.topics {
            for (name, value) in [
                ("subscriptions", t.subscriptions),
                ("subscribers", t.subscribers),
                ("lanes", t.lanes),
                ("local_subscriptions", t.local_subscriptions),
            ] {
                metrics::gauge!(format!("vicus_topic_{name}"), "domus" => domus.clone())
                    .set(value as f64);
            }
        }
    }
}
