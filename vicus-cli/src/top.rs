//! `vicus top ADDR`: a live terminal view of a running node, read over vicus itself from the
//! node's reporting service (`vicus::services::reporting`, enabled in the node's config with
//! `[reporting] allow = [...]`).
//!
//! Three layers, each testable alone:
//! * the model — [`Watch`] keeps what was seen (the previous report, the event and error
//!   rings) and turns each new [`RemoteReport`] into a [`View`]: rates per second, per peer
//!   and in total. It is pure: no IO, no clock (the caller passes `now`), and a counter that
//!   went backwards (a restarted node) gives a rate of 0, never a panic;
//! * the drawing — [`render_in`] draws a [`View`] into a ratatui frame and [`text`] writes the
//!   same figures as plain lines; neither does IO;
//! * the driver — [`run`] is the only place that dials, awaits, touches the terminal or
//!   prints. On a terminal it takes the alternate screen and raw mode and always gives them
//!   back ([`Screen`] restores them on drop, also on an error or a panic); elsewhere, or with
//!   `--once`/`--json`, it prints one snapshot and exits.
//!
//! `vicus demo` reuses the model, the drawing and the terminal pieces for its three nodes.

use std::collections::{BTreeMap, VecDeque};
use std::io::Stdout;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use clap::Args as ClapArgs;
use ratatui::Terminal;
use ratatui::backend::CrosstermBackend;
use ratatui::crossterm::event::{self, Event as TermEvent, KeyCode, KeyEventKind, KeyModifiers};
use ratatui::crossterm::terminal::{
    EnterAlternateScreen, LeaveAlternateScreen, disable_raw_mode, enable_raw_mode,
};
use ratatui::crossterm::{cursor, execute};
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Cell, Paragraph, Row, Table};
use ratatui::{Frame, layout::Alignment};
use serde::Serialize;
use serde_json::json;
use vicus::services::reporting::{
    self, ErrorReport, EventReport, REPORTING_TABERNA, RemoteReport, ReportRequest,
};
use vicus::{Domus, DomusAddr, DomusId, ErrorId};

use crate::client::{IdentityArgs, client_domus, parse_duration};
use crate::output::{CliError, Output};

/// Events kept for the "Events" pane (the service sends only the new ones each time).
const KEEP_EVENTS: usize = 200;
/// Errors kept for the "Recent errors" pane.
const KEEP_ERRORS: usize = 50;

/// `vicus top`.
#[derive(Debug, ClapArgs)]
#[command(after_help = "Examples:\n  \
    vicus top 127.0.0.1:7000 --certs certs --as ops\n  \
    vicus top 127.0.0.1:7000 --identity spiffe://vicus.dev/domus/alpha --ca ca.pem --cert ops.pem --key ops.key\n  \
    vicus top 127.0.0.1:7000 --certs certs --as ops --once --json   # one snapshot with rates, for scripts\n\n\
    The node must run its reporting service and allow the identity top presents:\n  \
    [reporting]\n  \
    allow = [\"spiffe://vicus.dev/domus/ops\"]\n\n\
    Keys: q, Esc or Ctrl-C quits. When stdout is not a terminal (or with --once or --json), top\n\
    prints one snapshot (two reports one --interval apart, for the rates) and exits.")]
pub struct Args {
    /// The node's address: host:port, or unix:/path.
    #[arg(value_name = "ADDR")]
    addr: String,
    /// The identity the node must prove (e.g. spiffe://vicus.dev/domus/alpha); without it the
    /// first identity the CA vouches for at ADDR is trusted for this run.
    #[arg(long, value_name = "SPIFFE_ID")]
    identity: Option<String>,
    #[command(flatten)]
    who: IdentityArgs,
    /// Time between refreshes (e.g. 1s, 500ms).
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    interval: Duration,
    /// How long one report may take, dial and handshake included.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    timeout: Duration,
    /// Print one snapshot and exit (what happens anyway when stdout is not a terminal).
    #[arg(long)]
    once: bool,
}

// ---------------------------------------------------------------------------------------
// The model.

/// A counter's growth per second between two readings; 0 when it went backwards (the node
/// restarted or reset it) or no time passed.
pub fn per_second(previous: u64, current: u64, elapsed: Duration) -> f64 {
    if current < previous || elapsed.is_zero() {
        return 0.0;
    }
    // Precision: u64 → f64 loses bits only above 2^53, far beyond any counter here.
    (current - previous) as f64 / elapsed.as_secs_f64()
}

/// The traffic figures of a report: totals (`T = u64`) or rates per second (`T = f64`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Traffic<T> {
    /// Messages this node sent.
    pub messages_sent: T,
    /// Messages that reached one of its tabernas.
    pub messages_received: T,
    /// Answers to its sends: accepted or replied.
    pub answers: T,
    /// Its sends that were rejected.
    pub rejected: T,
    /// Its sends that timed out or failed otherwise.
    pub failed: T,
    /// Messages from peers that it refused before a handler saw them.
    pub refused: T,
    /// Bytes read, both calles.
    pub bytes_in: T,
    /// Bytes written, both calles.
    pub bytes_out: T,
}

impl Traffic<u64> {
    /// The figures of a report's totals (a missing counter counts as 0).
    pub fn from_totals(totals: &BTreeMap<String, u64>) -> Self {
        let get = |name: &str| totals.get(name).copied().unwrap_or(0);
        Self {
            messages_sent: get("messages_sent"),
            messages_received: get("messages_received"),
            answers: get("messages_accepted").saturating_add(get("messages_replied")),
            rejected: get("messages_rejected"),
            failed: get("messages_timed_out").saturating_add(get("messages_failed")),
            refused: get("messages_refused"),
            bytes_in: get("primary_bytes_in").saturating_add(get("blob_bytes_in")),
            bytes_out: get("primary_bytes_out").saturating_add(get("blob_bytes_out")),
        }
    }

    /// The rates per second from `previous` to `self`.
    pub fn rates_since(&self, previous: &Self, elapsed: Duration) -> Traffic<f64> {
        let r = |p: u64, c: u64| per_second(p, c, elapsed);
        Traffic {
            messages_sent: r(previous.messages_sent, self.messages_sent),
            messages_received: r(previous.messages_received, self.messages_received),
            answers: r(previous.answers, self.answers),
            rejected: r(previous.rejected, self.rejected),
            failed: r(previous.failed, self.failed),
            refused: r(previous.refused, self.refused),
            bytes_in: r(previous.bytes_in, self.bytes_in),
            bytes_out: r(previous.bytes_out, self.bytes_out),
        }
    }
}

/// Blob streams: gauges now, totals, and rates per second.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Blobs {
    /// Streams open now (both directions).
    pub open: u64,
    /// Blob calles open now.
    pub calles: u64,
    /// Streams opened since the node started.
    pub opened: u64,
    /// Streams completed.
    pub completed: u64,
    /// Streams cancelled or failed.
    pub cancelled: u64,
    /// Streams opened per second.
    pub opened_per_s: f64,
    /// Streams completed per second.
    pub completed_per_s: f64,
    /// Blob bytes read per second.
    pub bytes_in_per_s: f64,
    /// Blob bytes written per second.
    pub bytes_out_per_s: f64,
}

/// One row of the "Peers" pane.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct PeerRow {
    /// The peer's identity.
    pub peer: String,
    /// Its primary callis is open.
    pub connected: bool,
    /// Last keepalive round trip, µs.
    pub rtt_us: Option<u64>,
    /// Messages it delivered here per second (`None` for a peer the previous report did not
    /// have).
    pub msgs_in_per_s: Option<f64>,
    /// Messages sent to it per second.
    pub msgs_out_per_s: Option<f64>,
    /// Bytes read from it per second (`None` for a peer the previous report did not have).
    pub bytes_in_per_s: Option<f64>,
    /// Bytes written to it per second.
    pub bytes_out_per_s: Option<f64>,
    /// Sends to it waiting for an answer.
    pub in_flight: u64,
    /// Messages and answers queued for it, not yet written.
    pub queue_depth: u64,
    /// Age of the oldest unanswered send, ms.
    pub oldest_pending_ms: Option<u64>,
}

/// What the screen shows, computed from two reports; see [`View::new`].
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct View {
    /// The header's title.
    pub title: String,
    /// The node's identity.
    pub identity: String,
    /// Its TLS crypto provider.
    pub crypto_provider: String,
    /// How long its counters have run, ms.
    pub uptime_ms: u64,
    /// Time between the two reports (0 for the first).
    pub elapsed_ms: u64,
    /// Whether rates could be computed (there was a previous report of the same node).
    pub has_rates: bool,
    /// The gauges as the node sent them (`peers`, `primary_calles`, …).
    pub gauges: BTreeMap<String, u64>,
    /// Send-to-answer latency.
    pub latency: reporting::LatencyReport,
    /// Totals since the node started.
    pub totals: Traffic<u64>,
    /// Rates per second since the previous report (0 without one).
    pub rates: Traffic<f64>,
    /// Blob streams.
    pub blobs: Blobs,
    /// Peers, the busiest first (the order the node sent).
    pub peers: Vec<PeerRow>,
    /// Recent events, oldest first.
    pub events: Vec<EventReport>,
    /// Events the viewer could not get (the node no longer held them).
    pub events_missed: u64,
    /// Recent errors, oldest first.
    pub errors: Vec<ErrorReport>,
    /// Errors the viewer could not get.
    pub errors_missed: u64,
    /// A problem with the last refresh (shown in the header), e.g. the node is unreachable.
    pub status: Option<String>,
    /// The topic service's figures, when it runs on the node.
    pub topics: Option<vicus::services::reporting::TopicsReport>,
}

impl View {
    /// The view of `current`, with rates from `previous` taken `elapsed` earlier (none when
    /// `previous` is `None` or is another node's report). Events and errors are the ones in
    /// `current`; [`Watch`] replaces them with all it has kept.
    pub fn new(previous: Option<&RemoteReport>, current: &RemoteReport, elapsed: Duration) -> Self {
        let previous = previous.filter(|p| p.identity == current.identity);
        let totals = Traffic::from_totals(&current.totals);
        let get = |r: &RemoteReport, name: &str| r.totals.get(name).copied().unwrap_or(0);
        let gauge = |name: &str| current.gauges.get(name).copied().unwrap_or(0);
        let (rates, blob_rates) = match previous {
            Some(p) => {
                let r = |name: &str| per_second(get(p, name), get(current, name), elapsed);
                (
                    totals.rates_since(&Traffic::from_totals(&p.totals), elapsed),
                    [
                        r("blob_streams_opened"),
                        r("blob_streams_completed"),
                        r("blob_bytes_in"),
                        r("blob_bytes_out"),
                    ],
                )
            }
            None => (Traffic::default(), [0.0; 4]),
        };
        let peers = current
            .peers
            .iter()
            .map(|now| {
                let before = previous.and_then(|p| p.peers.iter().find(|b| b.peer == now.peer));
                PeerRow {
                    peer: now.peer.clone(),
                    connected: now.connected,
                    rtt_us: now.rtt_us,
                    msgs_in_per_s: before
                        .map(|b| per_second(b.messages_in, now.messages_in, elapsed)),
                    msgs_out_per_s: before
                        .map(|b| per_second(b.messages_out, now.messages_out, elapsed)),
                    bytes_in_per_s: before.map(|b| per_second(b.bytes_in, now.bytes_in, elapsed)),
                    bytes_out_per_s: before
                        .map(|b| per_second(b.bytes_out, now.bytes_out, elapsed)),
                    in_flight: now.in_flight,
                    queue_depth: now.queue_depth,
                    oldest_pending_ms: now.oldest_pending_ms,
                }
            })
            .collect();
        Self {
            title: format!("vicus top — {}", current.identity),
            identity: current.identity.clone(),
            crypto_provider: current.crypto_provider.clone(),
            uptime_ms: current.interval_ms,
            elapsed_ms: if previous.is_some() {
                u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX)
            } else {
                0
            },
            has_rates: previous.is_some(),
            gauges: current.gauges.clone(),
            latency: current.latency.clone(),
            totals,
            rates,
            blobs: Blobs {
                open: gauge("blob_streams"),
                calles: gauge("blob_calles"),
                opened: get(current, "blob_streams_opened"),
                completed: get(current, "blob_streams_completed"),
                cancelled: get(current, "blob_streams_cancelled"),
                opened_per_s: blob_rates[0],
                completed_per_s: blob_rates[1],
                bytes_in_per_s: blob_rates[2],
                bytes_out_per_s: blob_rates[3],
            },
            peers,
            events: current.events.clone(),
            events_missed: current.events_missed,
            errors: current.errors.clone(),
            errors_missed: current.errors_missed,
            status: None,
            topics: current.topics.clone(),
        }
    }

    /// The computed rates as JSON (what `--json` prints beside the report).
    pub fn rates_json(&self) -> serde_json::Value {
        json!({
            "elapsed_ms": self.elapsed_ms,
            "traffic": self.rates,
            "blobs": {
                "opened_per_s": self.blobs.opened_per_s,
                "completed_per_s": self.blobs.completed_per_s,
                "bytes_in_per_s": self.blobs.bytes_in_per_s,
                "bytes_out_per_s": self.blobs.bytes_out_per_s,
            },
            "peers": self.peers.iter().map(|p| json!({
                "peer": p.peer,
                "msgs_in_per_s": p.msgs_in_per_s,
                "msgs_out_per_s": p.msgs_out_per_s,
                "bytes_in_per_s": p.bytes_in_per_s,
                "bytes_out_per_s": p.bytes_out_per_s,
            })).collect::<Vec<_>>(),
        })
    }
}

/// What a viewer has seen of one node: the previous report (for rates), the events and
/// errors so far (the service sends only newer ones), and what to ask for next. Pure.
#[derive(Debug, Default)]
pub struct Watch {
    previous: Option<(RemoteReport, Instant)>,
    request: ReportRequest,
    events: VecDeque<EventReport>,
    errors: VecDeque<ErrorReport>,
    events_missed: u64,
    errors_missed: u64,
}

impl Watch {
    /// What to ask the node for next.
    pub fn request(&self) -> ReportRequest {
        self.request
    }

    /// Takes in `report`, received at `now`, and gives the view of it.
    pub fn observe(&mut self, report: RemoteReport, now: Instant) -> View {
        // Another node, or the same one restarted: start over.
        let previous = self.previous.as_ref().filter(|(p, _)| same_run(p, &report));
        let elapsed = previous.map_or(Duration::ZERO, |(_, at)| now.saturating_duration_since(*at));
        let mut view = View::new(previous.map(|(p, _)| p), &report, elapsed);
        if previous.is_none() && self.previous.is_some() {
            self.events.clear();
            self.errors.clear();
        }
        for e in &report.events {
            push_bounded(&mut self.events, e.clone(), KEEP_EVENTS);
        }
        for e in &report.errors {
            push_bounded(&mut self.errors, e.clone(), KEEP_ERRORS);
        }
        self.events_missed = self.events_missed.saturating_add(report.events_missed);
        self.errors_missed = self.errors_missed.saturating_add(report.errors_missed);
        let restarted = self.previous.is_some() && previous.is_none();
        self.request = ReportRequest {
            events_after: report.events.last().map_or(
                if restarted {
                    0
                } else {
                    self.request.events_after
                },
                |e| e.seq,
            ),
            errors_after: report.errors.last().map_or(
                if restarted {
                    0
                } else {
                    self.request.errors_after
                },
                |e| e.seq,
            ),
        };
        view.events = self.events.iter().cloned().collect();
        view.errors = self.errors.iter().cloned().collect();
        view.events_missed = self.events_missed;
        view.errors_missed = self.errors_missed;
        self.previous = Some((report, now));
        view
    }
}

/// Whether `current` comes from the same run of the same node as `previous`: the same
/// identity, and no counter total went backwards (totals count from the domus's start and are
/// never reset, unlike `interval_ms`, which an application's own resets shorten).
fn same_run(previous: &RemoteReport, current: &RemoteReport) -> bool {
    previous.identity == current.identity
        && previous
            .totals
            .iter()
            .all(|(name, before)| current.totals.get(name).is_none_or(|now| now >= before))
}

fn push_bounded<T>(ring: &mut VecDeque<T>, item: T, limit: usize) {
    if ring.len() >= limit {
        ring.pop_front();
    }
    ring.push_back(item);
}

// ---------------------------------------------------------------------------------------
// Formatting.

/// A count per second: `0`, `12.5`, `3.4k`, `1.2M`.
pub fn fmt_rate(v: f64) -> String {
    if v <= 0.0 {
        "0".to_owned()
    } else if v < 99.95 {
        // Below this, one decimal (99.96 would print as "100.0").
        format!("{v:.1}")
    } else if v < 10_000.0 {
        format!("{v:.0}")
    } else if v < 10_000_000.0 {
        format!("{:.1}k", v / 1e3)
    } else {
        format!("{:.1}M", v / 1e6)
    }
}

/// Bytes, in binary units: `512 B`, `1.5 KiB`, `3.0 MiB`.
pub fn fmt_bytes(v: f64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = v.max(0.0);
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{v:.0} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// A duration in µs: `350 µs`, `1.2 ms`, `2.05 s`.
pub fn fmt_micros(us: u64) -> String {
    if us < 1_000 {
        format!("{us} µs")
    } else if us < 100_000 {
        format!("{:.1} ms", us as f64 / 1e3)
    } else if us < 1_000_000 {
        format!("{:.0} ms", us as f64 / 1e3)
    } else {
        format!("{:.2} s", us as f64 / 1e6)
    }
}

fn fmt_millis(ms: u64) -> String {
    fmt_micros(ms.saturating_mul(1000))
}

fn fmt_uptime(ms: u64) -> String {
    let s = ms / 1000;
    if s < 60 {
        format!("{s}s")
    } else if s < 3600 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{}h{:02}m", s / 3600, (s / 60) % 60)
    }
}

fn opt<T>(v: Option<T>, f: impl FnOnce(T) -> String) -> String {
    v.map_or_else(|| "-".to_owned(), f)
}

/// The header's gauge line: peers, calles, blob streams.
fn gauge_line(view: &View) -> String {
    let g = |name: &str| view.gauges.get(name).copied().unwrap_or(0);
    let topics = view.topics.as_ref().map_or_else(String::new, |t| {
        format!(
            " · topics: {} subscriptions from {} subscribers, {} own",
            t.subscriptions, t.subscribers, t.local_subscriptions
        )
    });
    format!(
        "peers {} · primary calles {} · blob calles {} · blob streams {} · pending handshakes {} · retained replies {}{topics}",
        g("peers"),
        g("primary_calles"),
        g("blob_calles"),
        g("blob_streams"),
        g("pending_handshakes"),
        fmt_bytes(g("retained_reply_bytes") as f64),
    )
}

/// The topic patterns held and their subscribers (text mode), when the node runs topics.
fn topics_line(view: &View) -> Option<String> {
    let t = view.topics.as_ref()?;
    if t.patterns.is_empty() {
        return Some("topics: no subscriptions held".to_owned());
    }
    let list: Vec<String> = t
        .patterns
        .iter()
        .map(|(p, n)| format!("{p} ({n})"))
        .collect();
    Some(format!("topics: {}", list.join(", ")))
}

fn latency_line(view: &View) -> String {
    let l = &view.latency;
    if l.count == 0 {
        "latency: no answers measured yet".to_owned()
    } else {
        format!(
            "latency p50 {} · p90 {} · p99 {} ({} answers)",
            fmt_micros(l.p50_us),
            fmt_micros(l.p90_us),
            fmt_micros(l.p99_us),
            l.count
        )
    }
}

/// The traffic rows: name, per second, total.
fn traffic_rows(view: &View) -> Vec<(&'static str, String, String)> {
    let (r, t) = (&view.rates, &view.totals);
    let n = |v: u64| v.to_string();
    let b = |v: u64| fmt_bytes(v as f64);
    vec![
        (
            "messages sent",
            fmt_rate(r.messages_sent),
            n(t.messages_sent),
        ),
        (
            "messages received",
            fmt_rate(r.messages_received),
            n(t.messages_received),
        ),
        ("answers", fmt_rate(r.answers), n(t.answers)),
        ("rejected", fmt_rate(r.rejected), n(t.rejected)),
        ("failed/timed out", fmt_rate(r.failed), n(t.failed)),
        ("refused", fmt_rate(r.refused), n(t.refused)),
        (
            "bytes in",
            format!("{}/s", fmt_bytes(r.bytes_in)),
            b(t.bytes_in),
        ),
        (
            "bytes out",
            format!("{}/s", fmt_bytes(r.bytes_out)),
            b(t.bytes_out),
        ),
    ]
}

fn blob_rows(view: &View) -> Vec<(&'static str, String, String)> {
    let bl = &view.blobs;
    vec![
        ("open now", bl.open.to_string(), String::new()),
        ("blob calles", bl.calles.to_string(), String::new()),
        ("opened", fmt_rate(bl.opened_per_s), bl.opened.to_string()),
        (
            "completed",
            fmt_rate(bl.completed_per_s),
            bl.completed.to_string(),
        ),
        ("cancelled", String::new(), bl.cancelled.to_string()),
        (
            "bytes in",
            format!("{}/s", fmt_bytes(bl.bytes_in_per_s)),
            String::new(),
        ),
        (
            "bytes out",
            format!("{}/s", fmt_bytes(bl.bytes_out_per_s)),
            String::new(),
        ),
    ]
}

fn peer_cells(p: &PeerRow) -> [String; 10] {
    [
        p.peer.clone(),
        if p.connected { "up" } else { "down" }.to_owned(),
        opt(p.rtt_us, fmt_micros),
        opt(p.msgs_in_per_s, fmt_rate),
        opt(p.msgs_out_per_s, fmt_rate),
        opt(p.bytes_in_per_s, |v| format!("{}/s", fmt_bytes(v))),
        opt(p.bytes_out_per_s, |v| format!("{}/s", fmt_bytes(v))),
        p.in_flight.to_string(),
        p.queue_depth.to_string(),
        opt(p.oldest_pending_ms, fmt_millis),
    ]
}

const PEER_HEADER: [&str; 10] = [
    "peer",
    "state",
    "rtt",
    "msg in/s",
    "msg out/s",
    "in/s",
    "out/s",
    "in-flight",
    "queue",
    "oldest",
];

/// The view as plain lines: what `top` prints when stdout is not a terminal.
pub fn text(view: &View) -> String {
    let mut out = String::new();
    let mut line = |s: String| {
        out.push_str(&s);
        out.push('\n');
    };
    line(format!(
        "{} ({}, up {}{})",
        view.title,
        view.crypto_provider,
        fmt_uptime(view.uptime_ms),
        if view.has_rates {
            format!(", rates over {}", fmt_millis(view.elapsed_ms))
        } else {
            String::new()
        }
    ));
    if let Some(status) = &view.status {
        line(format!("status: {status}"));
    }
    line(gauge_line(view));
    if let Some(topics) = topics_line(view) {
        line(topics);
    }
    line(latency_line(view));
    line(String::new());
    line(format!("Traffic  {:>10}  {:>12}", "per second", "total"));
    for (name, rate, total) in traffic_rows(view) {
        line(format!("  {name:<18} {rate:>12}  {total:>12}"));
    }
    line(String::new());
    line("Peers".to_owned());
    let width = view
        .peers
        .iter()
        .map(|p| p.peer.len())
        .max()
        .unwrap_or(4)
        .max(4);
    let row = |c: [&str; 10]| {
        format!(
            "  {:<width$}  {:<5} {:>9} {:>9} {:>9} {:>12} {:>12} {:>9} {:>6} {:>9}",
            c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7], c[8], c[9]
        )
    };
    line(row(PEER_HEADER));
    if view.peers.is_empty() {
        line("  (no peers)".to_owned());
    }
    for p in &view.peers {
        let c = peer_cells(p);
        line(row([
            &c[0], &c[1], &c[2], &c[3], &c[4], &c[5], &c[6], &c[7], &c[8], &c[9],
        ]));
    }
    line(String::new());
    line("Blob streams".to_owned());
    for (name, now, total) in blob_rows(view) {
        line(format!("  {name:<18} {now:>12}  {total:>12}"));
    }
    line(String::new());
    line(format!("Recent errors ({} missed)", view.errors_missed));
    if view.errors.is_empty() {
        line("  (none)".to_owned());
    }
    for e in view.errors.iter().rev().take(10).rev() {
        line(format!("  #{} {}: {}", e.seq, e.id, e.message));
    }
    line(String::new());
    line(format!("Events ({} missed)", view.events_missed));
    if view.events.is_empty() {
        line("  (none)".to_owned());
    }
    for e in view.events.iter().rev().take(10).rev() {
        line(format!("  #{} {}", e.seq, e.text));
    }
    out
}

// ---------------------------------------------------------------------------------------
// Drawing (ratatui; no IO).

fn pane(title: &str) -> Block<'_> {
    Block::bordered().title(Span::styled(
        format!(" {title} "),
        Style::default().add_modifier(Modifier::BOLD),
    ))
}

fn bold() -> Style {
    Style::default().add_modifier(Modifier::BOLD)
}

fn dim() -> Style {
    Style::default().fg(Color::DarkGray)
}

/// Draws `view` over the whole frame.
pub fn render(frame: &mut Frame<'_>, view: &View) {
    render_in(frame, frame.area(), view);
}

/// Draws `view` in `area`: a header, then "Peers", "Traffic" beside "Blob streams", and
/// "Recent errors" beside "Events".
pub fn render_in(frame: &mut Frame<'_>, area: Rect, view: &View) {
    let peers_height = u16::try_from(view.peers.len())
        .unwrap_or(u16::MAX)
        .saturating_add(3)
        .clamp(4, 16);
    // Three lines of figures, and one more for a refresh that failed.
    let header_height = if view.status.is_some() { 6 } else { 5 };
    let [header, peers, middle, bottom] = Layout::vertical([
        Constraint::Length(header_height),
        Constraint::Length(peers_height),
        Constraint::Length(11),
        Constraint::Min(4),
    ])
    .areas(area);
    render_header(frame, header, view);
    render_peers(frame, peers, view);
    let [traffic, blobs] =
        Layout::horizontal([Constraint::Percentage(50), Constraint::Percentage(50)]).areas(middle);
    render_figures(frame, traffic, "Traffic", &traffic_rows(view));
    render_figures(frame, blobs, "Blob streams", &blob_rows(view));
    let [errors, events] =
        Layout::horizontal([Constraint::Percentage(50), Constraint::Percentage(50)]).areas(bottom);
    render_errors(frame, errors, view);
    render_events(frame, events, view);
}

fn render_header(frame: &mut Frame<'_>, area: Rect, view: &View) {
    let mut first = vec![Span::raw(format!(
        "provider {} · up {} · ",
        view.crypto_provider,
        fmt_uptime(view.uptime_ms)
    ))];
    first.push(if view.has_rates {
        Span::raw(format!("rates over {}", fmt_millis(view.elapsed_ms)))
    } else {
        Span::styled("rates from the next refresh", dim())
    });
    let mut lines = vec![
        Line::from(first),
        Line::from(gauge_line(view)),
        Line::from(latency_line(view)),
    ];
    if let Some(status) = &view.status {
        lines.push(Line::styled(
            format!("{status} (showing the last report)"),
            Style::default().fg(Color::Red).add_modifier(Modifier::BOLD),
        ));
    }
    frame.render_widget(Paragraph::new(lines).block(pane(&view.title)), area);
}

fn render_peers(frame: &mut Frame<'_>, area: Rect, view: &View) {
    let header = Row::new(PEER_HEADER.map(Cell::from)).style(bold());
    let rows: Vec<Row<'_>> = view
        .peers
        .iter()
        .map(|p| {
            let cells = peer_cells(p);
            let state = if p.connected {
                Style::default().fg(Color::Green)
            } else {
                Style::default().fg(Color::Red)
            };
            Row::new(
                cells
                    .into_iter()
                    .enumerate()
                    .map(|(i, c)| {
                        if i == 1 {
                            Cell::from(c).style(state)
                        } else {
                            Cell::from(c)
                        }
                    })
                    .collect::<Vec<_>>(),
            )
        })
        .collect();
    let widths = [
        Constraint::Fill(1),
        Constraint::Length(5),
        Constraint::Length(9),
        Constraint::Length(9),
        Constraint::Length(9),
        Constraint::Length(12),
        Constraint::Length(12),
        Constraint::Length(9),
        Constraint::Length(6),
        Constraint::Length(9),
    ];
    let title = format!("Peers ({})", view.peers.len());
    frame.render_widget(
        Table::new(rows, widths).header(header).block(pane(&title)),
        area,
    );
}

fn render_figures(
    frame: &mut Frame<'_>,
    area: Rect,
    title: &str,
    rows: &[(&'static str, String, String)],
) {
    let header = Row::new([
        Cell::from(""),
        Cell::from(Line::from("per second").alignment(Alignment::Right)),
        Cell::from(Line::from("total").alignment(Alignment::Right)),
    ])
    .style(bold());
    let rows: Vec<Row<'_>> = rows
        .iter()
        .map(|(name, now, total)| {
            Row::new([
                Cell::from(*name),
                Cell::from(Line::from(now.clone()).alignment(Alignment::Right)),
                Cell::from(Line::from(total.clone()).alignment(Alignment::Right)),
            ])
        })
        .collect();
    let widths = [
        Constraint::Length(18),
        Constraint::Fill(1),
        Constraint::Fill(1),
    ];
    frame.render_widget(
        Table::new(rows, widths).header(header).block(pane(title)),
        area,
    );
}

/// The newest entries that fit in `area` (oldest of them first).
fn tail<T>(items: &[T], area: Rect) -> &[T] {
    let fit = usize::from(area.height.saturating_sub(2));
    &items[items.len().saturating_sub(fit)..]
}

fn render_errors(frame: &mut Frame<'_>, area: Rect, view: &View) {
    let lines: Vec<Line<'_>> = if view.errors.is_empty() {
        vec![Line::styled("(none)", dim())]
    } else {
        tail(&view.errors, area)
            .iter()
            .map(|e| {
                Line::from(vec![
                    Span::styled(format!("#{} ", e.seq), dim()),
                    Span::styled(e.id.clone(), Style::default().fg(Color::Red)),
                    Span::raw(format!(": {}", e.message)),
                ])
            })
            .collect()
    };
    let title = if view.errors_missed > 0 {
        format!("Recent errors ({} missed)", view.errors_missed)
    } else {
        "Recent errors".to_owned()
    };
    frame.render_widget(Paragraph::new(lines).block(pane(&title)), area);
}

fn render_events(frame: &mut Frame<'_>, area: Rect, view: &View) {
    let lines: Vec<Line<'_>> = if view.events.is_empty() {
        vec![Line::styled("(none)", dim())]
    } else {
        tail(&view.events, area)
            .iter()
            .map(|e| {
                Line::from(vec![
                    Span::styled(format!("#{} ", e.seq), dim()),
                    Span::raw(e.text.clone()),
                ])
            })
            .collect()
    };
    let title = if view.events_missed > 0 {
        format!("Events ({} missed)", view.events_missed)
    } else {
        "Events".to_owned()
    };
    frame.render_widget(Paragraph::new(lines).block(pane(&title)), area);
}

/// Draws a one-pane message (while connecting, or when a node has no report yet).
pub fn render_message(frame: &mut Frame<'_>, area: Rect, title: &str, message: &str) {
    frame.render_widget(Paragraph::new(message.to_owned()).block(pane(title)), area);
}

// ---------------------------------------------------------------------------------------
// The terminal.

/// The terminal in raw mode on the alternate screen; dropping it gives the terminal back as
/// it was (also when the view ends with an error or a panic).
pub struct Screen {
    terminal: Terminal<CrosstermBackend<Stdout>>,
    // Dropped after `terminal` (fields drop in order): leaves the alternate screen.
    _restore: RestoreOnDrop,
}

impl Screen {
    /// Takes over the terminal.
    pub fn enter() -> Result<Self, CliError> {
        let failed =
            |e: std::io::Error| CliError::new(format!("cannot take over the terminal: {e}"));
        enable_raw_mode().map_err(failed)?;
        // From here on, dropping `restore` undoes what was done, whatever fails next.
        let restore = RestoreOnDrop;
        execute!(std::io::stdout(), EnterAlternateScreen, cursor::Hide).map_err(failed)?;
        let terminal = Terminal::new(CrosstermBackend::new(std::io::stdout())).map_err(failed)?;
        Ok(Self {
            terminal,
            _restore: restore,
        })
    }

    /// Draws a frame.
    pub fn draw(&mut self, f: impl FnOnce(&mut Frame<'_>)) -> Result<(), CliError> {
        self.terminal
            .draw(f)
            .map(|_| ())
            .map_err(|e| CliError::new(format!("cannot draw on the terminal: {e}")))
    }
}

/// Leaves the alternate screen, shows the cursor and ends raw mode when dropped.
struct RestoreOnDrop;

impl Drop for RestoreOnDrop {
    fn drop(&mut self) {
        let _ = execute!(std::io::stdout(), LeaveAlternateScreen, cursor::Show);
        let _ = disable_raw_mode();
    }
}

/// What a key press asks the view to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Key {
    /// q, Esc or Ctrl-C.
    Quit,
    /// Tab or →.
    Next,
    /// Shift-Tab or ←.
    Previous,
    /// A digit 1–9: that item.
    Select(usize),
    /// The terminal was resized (or something else needs a redraw).
    Redraw,
}

/// Reads the terminal's keys on a thread of its own (crossterm's reads block) and hands them
/// to the async side; stops when dropped.
pub struct Keys {
    rx: tokio::sync::mpsc::Receiver<Key>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Keys {
    /// Starts reading.
    pub fn start() -> Self {
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            while !stopped.load(Ordering::Relaxed) {
                // Wakes every 100 ms to see whether it should stop.
                match event::poll(Duration::from_millis(100)) {
                    Ok(false) => continue,
                    Ok(true) => {}
                    Err(_) => return,
                }
                let key = match event::read() {
                    Ok(TermEvent::Key(k)) if k.kind != KeyEventKind::Release => match k.code {
                        KeyCode::Char('q') | KeyCode::Esc => Key::Quit,
                        KeyCode::Char('c') if k.modifiers.contains(KeyModifiers::CONTROL) => {
                            Key::Quit
                        }
                        KeyCode::Tab | KeyCode::Right => Key::Next,
                        KeyCode::BackTab | KeyCode::Left => Key::Previous,
                        KeyCode::Char(c @ '1'..='9') => Key::Select(usize::from(c as u8 - b'1')),
                        _ => continue,
                    },
                    Ok(TermEvent::Resize(..)) => Key::Redraw,
                    Ok(_) => continue,
                    Err(_) => return,
                };
                if tx.blocking_send(key).is_err() {
                    return;
                }
            }
        });
        Self {
            rx,
            stop,
            thread: Some(thread),
        }
    }

    /// The next key; `None` when the terminal can no longer be read.
    pub async fn next(&mut self) -> Option<Key> {
        self.rx.recv().await
    }
}

impl Drop for Keys {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.rx.close();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

// ---------------------------------------------------------------------------------------
// The driver.

/// The one-line error for a report that could not be had from `addr`, saying what to fix.
pub fn fetch_error(error: &vicus::Error, addr: &str, me: &DomusId) -> CliError {
    CliError::new(match error.id() {
        ErrorId::Forbidden => {
            format!("{addr} does not allow {me}; add it to [reporting] allow in the node's config")
        }
        ErrorId::UnknownTaberna => format!(
            "{addr} does not run the reporting service; enable it in the node's config \
             ([reporting] allow = [\"{me}\"])"
        ),
        ErrorId::PeerUnavailable
        | ErrorId::ConnectFailed
        | ErrorId::ConnectTimeout
        | ErrorId::SendTimeout
        | ErrorId::PeerShutDown
        | ErrorId::ConnectionLost => {
            format!("cannot reach {addr} ({error}); check the address and that the node is running")
        }
        ErrorId::PeerCertificateRejected
        | ErrorId::CertificateRefusedByPeer
        | ErrorId::IdentityMismatch
        | ErrorId::HandshakeFailed => format!(
            "{addr} and this viewer do not trust each other ({error}); check --identity and \
             that both certificates come from the same CA"
        ),
        _ => format!("reading the report of {addr} failed: {error}"),
    })
}

/// One report from the node REPORTING_TABERNA is routed to in `domus`, bounded by `timeout`.
pub async fn fetch_once(
    domus: &Domus,
    request: ReportRequest,
    timeout: Duration,
) -> Result<RemoteReport, vicus::Error> {
    let bound = timeout.saturating_add(Duration::from_secs(1));
    match tokio::time::timeout(bound, reporting::fetch(domus, request, timeout)).await {
        Ok(result) => result,
        Err(_) => Err(vicus::Error::new(
            ErrorId::SendTimeout,
            format!("no report within {timeout:?}"),
        )),
    }
}

/// `vicus top`.
pub async fn run(args: Args, out: Output) -> Result<(), CliError> {
    let addr: DomusAddr = args.addr.parse().map_err(|e: vicus::Error| {
        CliError::new(format!(
            "{e}; give the node's address as host:port or unix:/path"
        ))
    })?;
    let expected = match &args.identity {
        Some(id) => Some(DomusId::new(id).map_err(|e| {
            CliError::new(format!(
                "--identity: {e} (e.g. spiffe://vicus.dev/domus/alpha)"
            ))
        })?),
        None => None,
    };
    if args.interval < Duration::from_millis(50) {
        return Err(CliError::new(
            "--interval must be at least 50ms (e.g. --interval 1s)",
        ));
    }
    let auth = args.who.auth()?;
    let domus = client_domus(auth, &[(REPORTING_TABERNA, addr, expected)]).await?;
    let result = if args.once || out.json || !out.tty {
        once(&domus, &args, out).await
    } else {
        live(&domus, &args).await
    };
    domus.shutdown().await;
    result
}

/// Two reports one interval apart, printed as one snapshot.
async fn once(domus: &Domus, args: &Args, out: Output) -> Result<(), CliError> {
    let me = domus.identity().clone();
    let mut watch = Watch::default();
    let first = fetch_once(domus, watch.request(), args.timeout)
        .await
        .map_err(|e| fetch_error(&e, &args.addr, &me))?;
    watch.observe(first, Instant::now());
    tokio::time::sleep(args.interval).await;
    let second = fetch_once(domus, watch.request(), args.timeout)
        .await
        .map_err(|e| fetch_error(&e, &args.addr, &me))?;
    let view = watch.observe(second.clone(), Instant::now());
    // The report as the node sent it, but with every event and error seen in both.
    let mut report = second;
    report.events = view.events.clone();
    report.errors = view.errors.clone();
    let value = json!({ "report": report, "rates": view.rates_json() });
    out.result(text(&view).trim_end(), &value);
    Ok(())
}

/// The live view until q, Esc or Ctrl-C.
async fn live(domus: &Domus, args: &Args) -> Result<(), CliError> {
    let me = domus.identity().clone();
    let mut screen = Screen::enter()?;
    let mut keys = Keys::start();
    let mut watch = Watch::default();
    let mut view: Option<View> = None;
    let mut ticker = tokio::time::interval(args.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut pending: Option<tokio::task::JoinHandle<Result<RemoteReport, vicus::Error>>> = None;
    let title = format!("vicus top — {}", args.addr);
    let result = loop {
        let drawn = screen.draw(|frame| match &view {
            Some(v) => render(frame, v),
            None => render_message(
                frame,
                frame.area(),
                &title,
                &format!("asking {} for its report… (q quits)", args.addr),
            ),
        });
        if let Err(e) = drawn {
            break Err(e);
        }
        tokio::select! {
            _ = ticker.tick(), if pending.is_none() => {
                let (domus, request, timeout) = (domus.clone(), watch.request(), args.timeout);
                pending = Some(tokio::spawn(async move {
                    fetch_once(&domus, request, timeout).await
                }));
            }
            done = async { pending.as_mut().expect("guarded").await }, if pending.is_some() => {
                pending = None;
                match done {
                    Ok(Ok(report)) => view = Some(watch.observe(report, Instant::now())),
                    Ok(Err(e)) => {
                        let problem = fetch_error(&e, &args.addr, &me);
                        match &mut view {
                            // Never reached: say what to fix and stop.
                            None => break Err(problem),
                            Some(v) => v.status = Some(problem.to_string()),
                        }
                    }
                    Err(e) => break Err(CliError::new(format!("the report fetch failed: {e}"))),
                }
            }
            key = keys.next() => match key {
                Some(Key::Quit) | None => break Ok(()),
                Some(_) => {}
            },
        }
    };
    if let Some(task) = pending {
        task.abort();
    }
    drop(keys);
    drop(screen);
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use ratatui::backend::TestBackend;

    fn report(value: serde_json::Value) -> RemoteReport {
        serde_json::from_value(value).expect("a RemoteReport")
    }

    fn two_reports() -> (RemoteReport, RemoteReport) {
        let first = report(json!({
            "version": 1,
            "identity": "spiffe://vicus.dev/domus/alpha",
            "crypto_provider": "aws-lc-rs",
            "interval_ms": 10_000,
            "totals": {
                "messages_sent": 1000, "messages_received": 900, "messages_accepted": 400,
                "messages_replied": 500, "primary_bytes_in": 100_000, "primary_bytes_out": 200_000,
                "blob_streams_opened": 2, "blob_streams_completed": 2, "blob_bytes_out": 65_536,
            },
            "gauges": { "peers": 2, "primary_calles": 2, "blob_calles": 1, "blob_streams": 0 },
            "latency": { "count": 900, "p50_us": 310, "p90_us": 800, "p99_us": 2_400 },
            "peers": [
                { "peer": "spiffe://vicus.dev/domus/beta", "connected": true, "rtt_us": 250,
                  "in_flight": 1, "queue_depth": 0, "oldest_pending_ms": 3,
                  "bytes_in": 50_000, "bytes_out": 100_000 },
            ],
            "events": [
                { "seq": 1, "kind": "PeerConnected", "peer": "spiffe://vicus.dev/domus/beta",
                  "text": "spiffe://vicus.dev/domus/beta connected" },
            ],
            "events_missed": 0,
            "errors": [],
            "errors_missed": 0,
        }));
        let mut second = first.clone();
        second.interval_ms = 12_000;
        second.totals.insert("messages_sent".into(), 1500);
        second.totals.insert("messages_received".into(), 1300);
        second.totals.insert("primary_bytes_in".into(), 120_480);
        second.totals.insert("blob_streams_opened".into(), 4);
        second.peers[0].bytes_in = 70_480;
        second.peers[0].messages_in = 300;
        second.peers.push(reporting::PeerFigures {
            peer: "spiffe://vicus.dev/domus/gamma".into(),
            connected: false,
            ..Default::default()
        });
        second.events = vec![EventReport {
            seq: 2,
            kind: "DialFailed".into(),
            peer: Some("spiffe://vicus.dev/domus/gamma".into()),
            text: "dialling spiffe://vicus.dev/domus/gamma failed: refused".into(),
        }];
        second.errors = vec![ErrorReport {
            seq: 7,
            id: "PeerUnavailable".into(),
            message: "no callis to gamma".into(),
        }];
        (first, second)
    }

    #[test]
    fn rates_are_growth_per_second_and_regressions_give_zero() {
        let s = Duration::from_secs(2);
        assert_eq!(per_second(100, 300, s), 100.0);
        assert_eq!(
            per_second(300, 100, s),
            0.0,
            "a counter reset is not negative"
        );
        assert_eq!(per_second(0, u64::MAX, s), u64::MAX as f64 / 2.0);
        assert_eq!(per_second(5, 10, Duration::ZERO), 0.0, "no time, no rate");
    }

    #[test]
    fn a_view_computes_rates_from_two_reports() {
        let (first, second) = two_reports();
        let view = View::new(Some(&first), &second, Duration::from_secs(2));
        assert!(view.has_rates);
        assert_eq!(view.rates.messages_sent, 250.0);
        assert_eq!(view.rates.messages_received, 200.0);
        assert_eq!(view.rates.bytes_in, 10_240.0);
        assert_eq!(view.rates.answers, 0.0);
        assert_eq!(view.totals.answers, 900);
        assert_eq!(view.blobs.opened_per_s, 1.0);
        assert_eq!(view.peers[0].bytes_in_per_s, Some(10_240.0));
        assert_eq!(
            view.peers[0].msgs_in_per_s,
            Some(150.0),
            "a report without messages_in reads as 0"
        );
        assert_eq!(view.peers[0].msgs_out_per_s, Some(0.0));
        assert_eq!(view.peers[0].bytes_out_per_s, Some(0.0));
        assert_eq!(view.peers[1].bytes_in_per_s, None, "new peer: no rate yet");

        let first_only = View::new(None, &first, Duration::ZERO);
        assert!(!first_only.has_rates);
        assert_eq!(first_only.rates, Traffic::default());
    }

    #[test]
    fn a_restarted_node_gives_zero_rates_and_is_asked_for_everything_again() {
        let (first, _) = two_reports();
        let mut restarted = first.clone();
        restarted.interval_ms = 500;
        restarted.totals.insert("messages_sent".into(), 3);
        restarted.peers[0].bytes_in = 10;
        let view = View::new(Some(&first), &restarted, Duration::from_secs(1));
        assert_eq!(view.rates.messages_sent, 0.0);
        assert_eq!(view.peers[0].bytes_in_per_s, Some(0.0));

        let t0 = Instant::now();
        let mut watch = Watch::default();
        watch.observe(first, t0);
        assert_eq!(watch.request().events_after, 1);
        restarted.events.clear();
        let view = watch.observe(restarted, t0 + Duration::from_secs(1));
        assert!(!view.has_rates, "totals went backwards: a new run");
        assert_eq!(watch.request(), ReportRequest::default());
    }

    #[test]
    fn the_watch_keeps_events_and_errors_across_reports() {
        let (first, second) = two_reports();
        let t0 = Instant::now();
        let mut watch = Watch::default();
        let v1 = watch.observe(first, t0);
        assert!(!v1.has_rates);
        let v2 = watch.observe(second, t0 + Duration::from_secs(2));
        assert!(v2.has_rates);
        assert_eq!(v2.elapsed_ms, 2000);
        assert_eq!(v2.rates.messages_sent, 250.0);
        assert_eq!(
            v2.events.iter().map(|e| e.seq).collect::<Vec<_>>(),
            vec![1, 2]
        );
        assert_eq!(v2.errors.len(), 1);
        assert_eq!(
            watch.request(),
            ReportRequest {
                events_after: 2,
                errors_after: 7
            }
        );
    }

    fn screen_text(view: &View, width: u16, height: u16) -> String {
        let mut terminal = Terminal::new(TestBackend::new(width, height)).expect("terminal");
        terminal.draw(|f| render(f, view)).expect("draw");
        let buffer = terminal.backend().buffer();
        let mut s = String::new();
        for y in 0..buffer.area.height {
            for x in 0..buffer.area.width {
                s.push_str(buffer[(x, y)].symbol());
            }
            s.push('\n');
        }
        s
    }

    #[test]
    fn the_screen_shows_every_pane_a_peer_and_a_rate() {
        let (first, second) = two_reports();
        let t0 = Instant::now();
        let mut watch = Watch::default();
        watch.observe(first, t0);
        let view = watch.observe(second, t0 + Duration::from_secs(2));
        let screen = screen_text(&view, 120, 40);
        for title in [
            "vicus top — spiffe://vicus.dev/domus/alpha",
            "Peers (2)",
            "Traffic",
            "Blob streams",
            "Recent errors",
            "Events",
        ] {
            assert!(screen.contains(title), "no {title:?} in\n{screen}");
        }
        for shown in [
            "spiffe://vicus.dev/domus/beta",
            "spiffe://vicus.dev/domus/gamma",
            "10.0 KiB/s", // beta's bytes in per second
            "250",        // messages sent per second
            "250 µs",     // beta's RTT
            "p99 2.4 ms",
            "PeerUnavailable",
            "dialling spiffe://vicus.dev/domus/gamma failed",
            "down",
        ] {
            assert!(screen.contains(shown), "no {shown:?} in\n{screen}");
        }
        let mut stale = view.clone();
        stale.status = Some("cannot reach 127.0.0.1:7000".to_owned());
        let screen = screen_text(&stale, 120, 40);
        assert!(
            screen.contains("cannot reach 127.0.0.1:7000 (showing the last report)"),
            "{screen}"
        );
        assert!(screen.contains("Events"), "{screen}");
        // A small terminal still draws (ratatui clips; nothing panics).
        let small = screen_text(&view, 40, 10);
        assert!(small.contains("vicus top"), "{small}");
    }

    #[test]
    fn the_text_snapshot_has_the_same_figures() {
        let (first, second) = two_reports();
        let view = View::new(Some(&first), &second, Duration::from_secs(2));
        let text = text(&view);
        for shown in [
            "vicus top — spiffe://vicus.dev/domus/alpha",
            "Traffic",
            "Peers",
            "Blob streams",
            "Recent errors",
            "Events",
            "spiffe://vicus.dev/domus/beta",
            "10.0 KiB/s",
            "250",
        ] {
            assert!(text.contains(shown), "no {shown:?} in\n{text}");
        }
        let rates = view.rates_json();
        assert_eq!(rates["traffic"]["messages_sent"], 250.0);
        assert_eq!(rates["peers"][0]["bytes_in_per_s"], 10_240.0);
    }

    #[test]
    fn formats() {
        assert_eq!(fmt_rate(0.0), "0");
        assert_eq!(fmt_rate(12.34), "12.3");
        assert_eq!(fmt_rate(2500.0), "2500");
        assert_eq!(fmt_rate(25_000.0), "25.0k");
        assert_eq!(fmt_bytes(512.0), "512 B");
        assert_eq!(fmt_bytes(1536.0), "1.5 KiB");
        assert_eq!(fmt_micros(350), "350 µs");
        assert_eq!(fmt_micros(2_400), "2.4 ms");
        assert_eq!(fmt_micros(997_000), "997 ms");
        assert_eq!(fmt_micros(1_500_000), "1.50 s");
        assert_eq!(fmt_uptime(3_725_000), "1h02m");
    }

    #[test]
    fn errors_say_what_to_fix() {
        let me = DomusId::new("spiffe://vicus.dev/domus/ops").expect("id");
        let e = fetch_error(
            &vicus::Error::new(ErrorId::Forbidden, "not allowed"),
            "127.0.0.1:7000",
            &me,
        );
        assert_eq!(
            e.to_string(),
            "127.0.0.1:7000 does not allow spiffe://vicus.dev/domus/ops; add it to [reporting] \
             allow in the node's config"
        );
        let e = fetch_error(
            &vicus::Error::new(ErrorId::UnknownTaberna, "no such taberna"),
            "127.0.0.1:7000",
            &me,
        );
        assert!(
            e.to_string().contains("does not run the reporting service"),
            "{e}"
        );
    }
}
