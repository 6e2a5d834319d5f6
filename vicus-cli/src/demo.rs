//! `vicus demo`: three nodes on loopback in this process — alpha, beta and gamma — with
//! development certificates minted in memory at start (no files), traffic on all six links
//! between them, and a live view read the way `vicus top` reads a node: over vicus, from each
//! node's reporting service, by a viewer identity the nodes allow.
//!
//! Each node has an echo taberna (replies with the payload) and a sink taberna (accepts, and
//! reads any blob to its end); one shared [`SimpleResolver`] routes them all. Each link sends
//! `--rate` messages a second, alternately a request to the echo and a one-way send to the
//! sink, and a 64 KiB blob every two seconds, at most [`MAX_IN_FLIGHT`] unanswered at once.
//! Each node also runs the topic service, subscribes to `demo.>` and publishes
//! `demo.<name>.tick` once a second: every tick reaches all three (its own node too).
//!
//! On a terminal the view is `vicus top`'s screen for the node chosen (Tab, ←/→, 1–3) under
//! a table of all three; elsewhere it prints one line a second per node. At the end (the
//! `--duration`, or q, Esc or Ctrl-C) it stops the traffic, shuts the nodes down gracefully
//! and prints a final table (or one JSON object with `--json`). It fails unless every link
//! had answers. The certificates are development ones: this must not be a template for
//! production identities.

use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Args as ClapArgs;
use ratatui::Frame;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::Span;
use ratatui::widgets::{Block, Cell, Row, Table};
use serde::Serialize;
use serde_json::json;
use tokio::io::AsyncReadExt;
use tokio::sync::watch;
use tokio::task::JoinSet;
use vicus::dev_certs::{DEV_TRUST_DOMAIN, DevCa};
use vicus::services::reporting::{self, REPORTING_TABERNA, RemoteReport, ReportingService};
use vicus::services::topics::{Publisher, Subscription, Topics, TopicsConfig};
use vicus::{Delivery, Domus, DomusAddr, DomusId, SendOptions, SimpleResolver, Taberna, TabernaId};

use crate::client::{MESSAGE_TYPE, client_domus, parse_duration};
use crate::output::{CliError, Output};
use crate::top::{self, Key, Keys, Screen, View, Watch, fmt_bytes, fmt_micros, fmt_rate};

/// The nodes' names (identities `spiffe://vicus.dev/domus/<name>`).
const NAMES: [&str; 3] = ["alpha", "beta", "gamma"];
/// The viewer's name: the identity each node's reporting service allows.
const VIEWER: &str = "viewer";
/// Unanswered sends one link keeps at most; a tick finding the link full skips its sends
/// (counted), so a slow node slows the demo instead of growing a queue.
const MAX_IN_FLIGHT: usize = 64;
/// How long one demo send may wait for its answer.
const SEND_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one report may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(2);
/// Time between blobs on one link.
const BLOB_EVERY: Duration = Duration::from_secs(2);
/// Bytes of one blob.
const BLOB_LEN: usize = 64 * 1024;
/// Time between refreshes of the view.
const REFRESH: Duration = Duration::from_secs(1);
/// How long the end waits for the sends still in flight.
const DRAIN: Duration = Duration::from_secs(6);

/// `vicus demo`.
#[derive(Debug, ClapArgs)]
#[command(after_help = "Examples:\n  \
    vicus demo                          # until q, Esc or Ctrl-C\n  \
    vicus demo --duration 10s --rate 200\n  \
    vicus demo --duration 3 --json      # for scripts and CI: the final summary as one JSON object\n\n\
    On a terminal: Tab, ←/→ or 1-3 choose the node shown; q, Esc or Ctrl-C end the demo.\n\
    Elsewhere it prints one line per node each second. It exits 0 only if every link had answers.")]
pub struct Args {
    /// Stop after this long (3 or 3s, 500ms, 1m; at most 365 days); without it, run until q,
    /// Esc or Ctrl-C.
    #[arg(long, value_parser = parse_demo_duration)]
    duration: Option<Duration>,
    /// Messages per second on each of the six links: requests with replies and one-way sends,
    /// alternately.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=20_000))]
    rate: u32,
}

/// The longest `--duration`: far beyond any demo, and far below what the clock can add
/// (a deadline past it overflowed the clock and panicked).
const MAX_DEMO_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

/// A duration as `parse_duration` reads it, or a bare number of seconds (`--duration 3`);
/// more than [`MAX_DEMO_DURATION`] is refused.
fn parse_demo_duration(s: &str) -> Result<Duration, String> {
    let d = match s.trim().parse::<u64>() {
        Ok(secs) => Duration::from_secs(secs),
        Err(_) => parse_duration(s)?,
    };
    if d.is_zero() {
        return Err("the demo needs some time: give e.g. 3s".to_owned());
    }
    if d > MAX_DEMO_DURATION {
        return Err(
            "the demo runs for at most 365 days; leave --duration out to run until q, Esc or \
             Ctrl-C"
                .to_owned(),
        );
    }
    Ok(d)
}

/// One node of the demo and what runs on it.
struct Node {
    name: &'static str,
    domus: Domus,
    addr: DomusAddr,
    echo: TabernaId,
    sink: TabernaId,
    _reporting: ReportingService,
}

/// What the view knows of one node.
struct Shown {
    name: &'static str,
    addr: String,
    watch: Watch,
    view: Option<View>,
    problem: Option<String>,
}

/// What one link did.
#[derive(Debug, Clone, Default, Serialize)]
struct LinkStats {
    from: &'static str,
    to: &'static str,
    /// Sends admitted (requests, one-way sends and blobs).
    sent: u64,
    /// Requests answered with a reply.
    replied: u64,
    /// One-way sends accepted.
    accepted: u64,
    /// Blobs accepted and streamed to their end.
    blobs: u64,
    /// Sends that failed (rejected, timed out, unreachable).
    failed: u64,
    /// Sends a tick skipped because the link already had `MAX_IN_FLIGHT` unanswered.
    skipped: u64,
    /// The last failure, if any.
    last_error: Option<String>,
}

impl LinkStats {
    fn answered(&self) -> u64 {
        self.replied + self.accepted + self.blobs
    }

    fn count(&mut self, done: Result<Result<Sent, vicus::Error>, tokio::task::JoinError>) {
        match done {
            Ok(Ok(Sent::Replied)) => self.replied += 1,
            Ok(Ok(Sent::Accepted)) => self.accepted += 1,
            Ok(Ok(Sent::Blob)) => self.blobs += 1,
            Ok(Err(e)) => {
                self.failed += 1;
                self.last_error = Some(e.to_string());
            }
            Err(e) => {
                self.failed += 1;
                self.last_error = Some(format!("the send task failed: {e}"));
            }
        }
    }
}

/// How a send ended well.
enum Sent {
    Replied,
    Accepted,
    Blob,
}

/// `vicus demo`.
pub async fn run(args: Args, out: Output) -> Result<(), CliError> {
    let started = Instant::now();
    let mut ca = DevCa::new("vicus demo CA (in memory, development only)")?;
    let viewer_leaf = ca.leaf(VIEWER)?;
    let viewer_id = DomusId::spiffe(DEV_TRUST_DOMAIN, VIEWER)?;
    let routes = std::sync::Arc::new(SimpleResolver::new());
    let loopback: DomusAddr = "127.0.0.1:0".parse()?;

    let mut nodes = Vec::new();
    let mut viewers = Vec::new();
    for (i, name) in NAMES.into_iter().enumerate() {
        let (auth, id) = ca.domus_auth(name)?;
        let domus = Domus::builder(auth)
            .bind(loopback.clone())
            .resolver(routes.clone())
            .build()
            .await?;
        let addr = domus
            .local_addr()
            .cloned()
            .ok_or_else(|| CliError::new("a demo node has no listening address"))?;
        let offset = u64::try_from(i).unwrap_or(0);
        let (echo, sink) = (TabernaId(100 + offset), TabernaId(200 + offset));
        tokio::spawn(serve_echo(domus.taberna(echo)?));
        tokio::spawn(serve_sink(domus.taberna(sink)?));
        for taberna in [echo, sink] {
            routes.insert(taberna, addr.clone(), Some(id.clone()));
        }
        let service = reporting::serve(&domus, [viewer_id.clone()])?;
        // One viewer domus per node: REPORTING_TABERNA is one id, routed to one node each.
        viewers.push(
            client_domus(
                ca.auth_config(&viewer_leaf)?,
                &[(REPORTING_TABERNA, addr.clone(), Some(id))],
            )
            .await?,
        );
        nodes.push(Node {
            name,
            domus,
            addr,
            echo,
            sink,
            _reporting: service,
        });
    }

    out.line(&format!(
        "vicus demo: {} on loopback, {} msg/s per link, {}",
        nodes
            .iter()
            .map(|n| format!("{} at {}", n.name, n.addr))
            .collect::<Vec<_>>()
            .join(", "),
        args.rate,
        match args.duration {
            Some(d) => format!("for {}", crate::client::show_duration(d)),
            None => "until Ctrl-C".to_owned(),
        }
    ));

    let (stop_tx, stop_rx) = watch::channel(false);
    // A topic: every node subscribes to demo.> and publishes demo.<name>.tick once a second.
    for n in &nodes {
        routes.insert_domus(n.domus.identity().clone(), n.addr.clone());
    }
    let topic_tally = std::sync::Arc::new(TopicTally::default());
    let mut topic_services = Vec::new();
    for n in &nodes {
        let mut config = TopicsConfig::default();
        for other in nodes.iter().filter(|o| o.name != n.name) {
            config = config.publisher(other.domus.identity().clone());
        }
        topic_services.push(Topics::start(&n.domus, config)?);
    }
    // Publishers stop with the traffic; subscribers once the publishers' last copies are
    // answered.
    let (receivers_stop, receivers_stop_rx) = watch::channel(false);
    let mut publishers = JoinSet::new();
    let mut receivers = JoinSet::new();
    for (n, topics) in nodes.iter().zip(&topic_services) {
        let sub = topics.subscribe("demo.>").await?;
        receivers.spawn(receive_topic(
            sub,
            topic_tally.clone(),
            receivers_stop_rx.clone(),
        ));
        publishers.spawn(publish_ticks(
            topics.publisher(&format!("demo.{}.tick", n.name))?,
            topic_tally.clone(),
            stop_rx.clone(),
        ));
    }
    let mut links = JoinSet::new();
    for from in &nodes {
        for to in nodes.iter().filter(|n| n.name != from.name) {
            links.spawn(drive_link(
                from.domus.clone(),
                (from.name, to.name),
                (to.echo, to.sink),
                args.rate,
                stop_rx.clone(),
            ));
        }
    }

    let shown: Vec<Shown> = nodes
        .iter()
        .map(|n| Shown {
            name: n.name,
            addr: n.addr.to_string(),
            watch: Watch::default(),
            view: None,
            problem: None,
        })
        .collect();
    let watched = watch_nodes(shown, &viewers, &args, started, out).await;

    // The end: traffic stops first, then the figures are read, then everything shuts down.
    let _ = stop_tx.send(true);
    while publishers.join_next().await.is_some() {}
    let _ = receivers_stop.send(true);
    while receivers.join_next().await.is_some() {}
    drop(topic_services);
    let mut stats = Vec::new();
    while let Some(done) = links.join_next().await {
        match done {
            Ok(s) => stats.push(s),
            Err(e) => return Err(CliError::new(format!("a demo link failed: {e}"))),
        }
    }
    stats.sort_by_key(|s| (position(s.from), position(s.to)));
    let elapsed = started.elapsed();
    let mut summary = summarize(&nodes, &stats, elapsed, args.rate);
    summary.topics = topic_tally.summary();
    for viewer in &viewers {
        viewer.shutdown().await;
    }
    let mut closing = JoinSet::new();
    for node in &nodes {
        let domus = node.domus.clone();
        closing.spawn(async move { domus.shutdown().await });
    }
    while closing.join_next().await.is_some() {}
    drop(nodes);
    watched?;

    out.result(&summary_text(&summary, out), &summary.to_json());
    let dry: Vec<String> = stats
        .iter()
        .filter(|s| s.answered() == 0)
        .map(|s| {
            format!(
                "{}→{} ({} sent, none answered{})",
                s.from,
                s.to,
                s.sent,
                s.last_error
                    .as_ref()
                    .map(|e| format!(": {e}"))
                    .unwrap_or_default()
            )
        })
        .collect();
    if dry.is_empty() {
        Ok(())
    } else {
        Err(CliError::new(format!(
            "no traffic flowed on {}; is loopback TCP blocked here?",
            dry.join(", ")
        )))
    }
}

fn position(name: &str) -> usize {
    NAMES.iter().position(|n| *n == name).unwrap_or(usize::MAX)
}

async fn serve_echo(taberna: Taberna) {
    while let Some(request) = taberna.recv().await {
        let payload = request.payload().clone();
        request.reply(payload);
    }
}

async fn serve_sink(taberna: Taberna) {
    while let Some(mut request) = taberna.recv().await {
        match request.blob() {
            Some(mut blob) => {
                request.accept();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 16 * 1024];
                    while let Ok(n) = blob.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                    }
                });
            }
            None => request.accept(),
        }
    }
}

/// Sends on one link until `stop` says so, then waits (bounded) for what is in flight.
async fn drive_link(
    from: Domus,
    (from_name, to_name): (&'static str, &'static str),
    (echo, sink): (TabernaId, TabernaId),
    rate: u32,
    mut stop: watch::Receiver<bool>,
) -> LinkStats {
    let mut stats = LinkStats {
        from: from_name,
        to: to_name,
        ..LinkStats::default()
    };
    // Ticks no faster than every 2 ms; each sends its share of the rate.
    let period = (Duration::from_secs(1) / rate).max(Duration::from_millis(2));
    let per_tick = ((f64::from(rate) * period.as_secs_f64()).round() as u64).max(1);
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let first_blob = tokio::time::Instant::now() + Duration::from_millis(300);
    let mut blobs = tokio::time::interval_at(first_blob, BLOB_EVERY);
    blobs.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let options = SendOptions::default().timeout(SEND_TIMEOUT);
    let mut in_flight: JoinSet<Result<Sent, vicus::Error>> = JoinSet::new();
    let mut n: u64 = 0;
    loop {
        tokio::select! {
            biased;
            _ = stop.changed() => break,
            Some(done) = in_flight.join_next(), if !in_flight.is_empty() => stats.count(done),
            _ = ticker.tick() => {
                for _ in 0..per_tick {
                    if in_flight.len() >= MAX_IN_FLIGHT {
                        stats.skipped += 1;
                        continue;
                    }
                    n += 1;
                    stats.sent += 1;
                    let payload = Bytes::from(format!("{from_name}→{to_name} #{n}"));
                    let (domus, options) = (from.clone(), options.clone());
                    if n.is_multiple_of(2) {
                        in_flight.spawn(async move {
                            match domus.send(echo, MESSAGE_TYPE, payload, options).await? {
                                Delivery::Replied(_) => Ok(Sent::Replied),
                                Delivery::Accepted => Ok(Sent::Accepted),
                            }
                        });
                    } else {
                        in_flight.spawn(async move {
                            domus.send(sink, MESSAGE_TYPE, payload, options).await?;
                            Ok(Sent::Accepted)
                        });
                    }
                }
            }
            _ = blobs.tick() => {
                if in_flight.len() < MAX_IN_FLIGHT {
                    stats.sent += 1;
                    let (domus, options) = (from.clone(), options.clone());
                    let header = Bytes::from(format!("{from_name}→{to_name} blob"));
                    in_flight.spawn(async move {
                        let mut blob = domus.send_blob(sink, MESSAGE_TYPE, header, options).await?;
                        for _ in 0..4 {
                            blob.write_bytes(Bytes::from(vec![0x5a; BLOB_LEN / 4])).await?;
                        }
                        blob.finish().await?;
                        Ok(Sent::Blob)
                    });
                } else {
                    stats.skipped += 1;
                }
            }
        }
    }
    let drained = tokio::time::timeout(DRAIN, async {
        while let Some(done) = in_flight.join_next().await {
            stats.count(done);
        }
    })
    .await;
    if drained.is_err() {
        in_flight.abort_all();
    }
    stats
}

/// Asks the three nodes for their reports every second and shows them, until the duration
/// is reached or the user quits. Returns the first error that ends the view.
async fn watch_nodes(
    mut shown: Vec<Shown>,
    viewers: &[Domus],
    args: &Args,
    started: Instant,
    out: Output,
) -> Result<(), CliError> {
    let live = out.tty && !out.json;
    let mut screen = if live { Some(Screen::enter()?) } else { None };
    let mut keys = if live { Some(Keys::start()) } else { None };
    let mut selected = 0usize;
    let mut rounds_seen = 0u64;
    // Checked: a deadline the clock cannot represent is no deadline (the parser already
    // refuses such durations).
    let deadline = args
        .duration
        .and_then(|d| tokio::time::Instant::now().checked_add(d));
    let until_deadline = async move {
        match deadline {
            Some(at) => tokio::time::sleep_until(at).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(until_deadline);
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let mut ticker = tokio::time::interval(REFRESH);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut pending: Option<tokio::task::JoinHandle<Round>> = None;
    let result = loop {
        if let Some(screen) = &mut screen {
            let frame = DemoFrame {
                shown: &shown,
                selected,
                elapsed: started.elapsed(),
                duration: args.duration,
                rate: args.rate,
            };
            if let Err(e) = screen.draw(|f| render(f, &frame)) {
                break Err(e);
            }
        }
        tokio::select! {
            _ = &mut until_deadline => break Ok(()),
            _ = &mut ctrl_c => break Ok(()),
            _ = ticker.tick(), if pending.is_none() => {
                let asks: Vec<_> = viewers
                    .iter()
                    .zip(&shown)
                    .map(|(viewer, node)| (viewer.clone(), node.watch.request()))
                    .collect();
                pending = Some(tokio::spawn(fetch_round(asks)));
            }
            round = async { pending.as_mut().expect("guarded").await }, if pending.is_some() => {
                pending = None;
                let round = match round {
                    Ok(round) => round,
                    Err(e) => break Err(CliError::new(format!("the report fetch failed: {e}"))),
                };
                let at = Instant::now();
                rounds_seen += 1;
                for (node, result) in shown.iter_mut().zip(round) {
                    match result {
                        Ok(report) => {
                            let mut view = node.watch.observe(report, at);
                            view.title = format!("{} — {}", node.name, view.identity);
                            node.view = Some(view);
                            node.problem = None;
                        }
                        Err(e) => node.problem = Some(e.to_string()),
                    }
                    if let (Some(view), Some(problem)) = (&mut node.view, &node.problem) {
                        view.status = Some(problem.clone());
                    }
                }
                if !live && rounds_seen > 1 {
                    for node in &shown {
                        out.line(&summary_line(node));
                    }
                }
            }
            key = next_key(&mut keys) => match key {
                Some(Key::Quit) | None => break Ok(()),
                Some(Key::Next) => selected = (selected + 1) % shown.len(),
                Some(Key::Previous) => selected = (selected + shown.len() - 1) % shown.len(),
                Some(Key::Select(i)) if i < shown.len() => selected = i,
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

/// One report from each node, in the nodes' order.
type Round = Vec<Result<RemoteReport, vicus::Error>>;

/// Asks every node at once; each ask is a viewer routed to its node and what to ask it for.
async fn fetch_round(asks: Vec<(Domus, reporting::ReportRequest)>) -> Round {
    let mut round: Vec<Option<Result<RemoteReport, vicus::Error>>> =
        asks.iter().map(|_| None).collect();
    let mut fetches = JoinSet::new();
    for (i, (viewer, request)) in asks.into_iter().enumerate() {
        fetches.spawn(async move { (i, top::fetch_once(&viewer, request, FETCH_TIMEOUT).await) });
    }
    while let Some(done) = fetches.join_next().await {
        if let Ok((i, result)) = done {
            round[i] = Some(result);
        }
    }
    round
        .into_iter()
        .map(|r| {
            r.unwrap_or_else(|| {
                Err(vicus::Error::new(
                    vicus::ErrorId::DomusClosed,
                    "the report fetch task failed",
                ))
            })
        })
        .collect()
}

async fn next_key(keys: &mut Option<Keys>) -> Option<Key> {
    match keys {
        Some(keys) => keys.next().await,
        None => std::future::pending().await,
    }
}

/// One node's line a second when stdout is not a terminal.
fn summary_line(node: &Shown) -> String {
    match (&node.view, &node.problem) {
        (_, Some(problem)) => format!("{:<6} no report: {problem}", node.name),
        (None, None) => format!("{:<6} no report yet", node.name),
        (Some(v), None) => format!(
            "{:<6} sent {}/s · received {}/s · answers {}/s · in {}/s · out {}/s · peers {} · \
             blob streams {} done · p99 {}",
            node.name,
            fmt_rate(v.rates.messages_sent),
            fmt_rate(v.rates.messages_received),
            fmt_rate(v.rates.answers),
            fmt_bytes(v.rates.bytes_in),
            fmt_bytes(v.rates.bytes_out),
            v.gauges.get("peers").copied().unwrap_or(0),
            v.blobs.completed,
            fmt_micros(v.latency.p99_us),
        ),
    }
}

/// What the demo's screen draws.
struct DemoFrame<'a> {
    shown: &'a [Shown],
    selected: usize,
    elapsed: Duration,
    duration: Option<Duration>,
    rate: u32,
}

/// A table of the three nodes, then `vicus top`'s panes for the one selected.
fn render(frame: &mut Frame<'_>, demo: &DemoFrame<'_>) {
    let nodes_height = u16::try_from(demo.shown.len()).unwrap_or(3) + 3;
    let [nodes, node] = Layout::vertical([Constraint::Length(nodes_height), Constraint::Min(0)])
        .areas(frame.area());
    render_nodes(frame, nodes, demo);
    let Some(chosen) = demo.shown.get(demo.selected) else {
        return;
    };
    match &chosen.view {
        Some(view) => top::render_in(frame, node, view),
        None => top::render_message(
            frame,
            node,
            chosen.name,
            chosen
                .problem
                .as_deref()
                .unwrap_or("waiting for the first report…"),
        ),
    }
}

fn render_nodes(frame: &mut Frame<'_>, area: Rect, demo: &DemoFrame<'_>) {
    let time = match demo.duration {
        Some(d) => format!(
            "{:.0}s of {:.0}s",
            demo.elapsed.as_secs_f64(),
            d.as_secs_f64()
        ),
        None => format!("{:.0}s", demo.elapsed.as_secs_f64()),
    };
    let title = format!(
        " vicus demo — 3 nodes on loopback · {time} · {} msg/s per link · Tab/1-3 choose · q quits ",
        demo.rate
    );
    let header = Row::new(
        [
            "",
            "node",
            "address",
            "peers",
            "sent/s",
            "recv/s",
            "answers/s",
            "in/s",
            "out/s",
            "p99",
            "blobs",
            "errors",
        ]
        .map(Cell::from),
    )
    .style(Style::default().add_modifier(Modifier::BOLD));
    let rows: Vec<Row<'_>> = demo
        .shown
        .iter()
        .enumerate()
        .map(|(i, node)| {
            let marker = if i == demo.selected { "▶" } else { " " };
            let mut cells = vec![marker.to_owned(), node.name.to_owned(), node.addr.clone()];
            match &node.view {
                Some(v) => cells.extend([
                    v.gauges.get("peers").copied().unwrap_or(0).to_string(),
                    fmt_rate(v.rates.messages_sent),
                    fmt_rate(v.rates.messages_received),
                    fmt_rate(v.rates.answers),
                    format!("{}/s", fmt_bytes(v.rates.bytes_in)),
                    format!("{}/s", fmt_bytes(v.rates.bytes_out)),
                    fmt_micros(v.latency.p99_us),
                    v.blobs.completed.to_string(),
                    v.errors.len().to_string(),
                ]),
                None => cells.push("-".to_owned()),
            }
            let style = if i == demo.selected {
                Style::default().add_modifier(Modifier::BOLD)
            } else if node.problem.is_some() {
                Style::default().fg(Color::Red)
            } else {
                Style::default()
            };
            Row::new(cells.into_iter().map(Cell::from).collect::<Vec<_>>()).style(style)
        })
        .collect();
    let widths = [
        Constraint::Length(1),
        Constraint::Length(6),
        Constraint::Length(21),
        Constraint::Length(5),
        Constraint::Length(7),
        Constraint::Length(7),
        Constraint::Length(9),
        Constraint::Length(11),
        Constraint::Length(11),
        Constraint::Length(9),
        Constraint::Length(6),
        Constraint::Length(6),
    ];
    let block = Block::bordered().title(Span::styled(
        title,
        Style::default().add_modifier(Modifier::BOLD),
    ));
    frame.render_widget(Table::new(rows, widths).header(header).block(block), area);
}

/// The end-of-demo summary (the JSON `--json` prints).
#[derive(Debug, Serialize)]
struct Summary {
    duration_ms: u64,
    rate_per_link: u32,
    nodes: Vec<NodeSummary>,
    links: Vec<LinkStats>,
    total: Totals,
    topics: TopicSummary,
}

/// The demo topic's figures.
#[derive(Debug, Default, Clone, Copy, Serialize)]
struct TopicSummary {
    /// Publishes made (one a second per node).
    publishes: u64,
    /// Copies the publishers' reports listed.
    copies: u64,
    /// Copies the reports said were delivered.
    delivered: u64,
    /// Copies the subscriptions received.
    received: u64,
}

/// Counts of the demo topic, shared by its tasks.
#[derive(Debug, Default)]
struct TopicTally {
    publishes: std::sync::atomic::AtomicU64,
    copies: std::sync::atomic::AtomicU64,
    delivered: std::sync::atomic::AtomicU64,
    received: std::sync::atomic::AtomicU64,
}

impl TopicTally {
    fn summary(&self) -> TopicSummary {
        use std::sync::atomic::Ordering::Relaxed;
        TopicSummary {
            publishes: self.publishes.load(Relaxed),
            copies: self.copies.load(Relaxed),
            delivered: self.delivered.load(Relaxed),
            received: self.received.load(Relaxed),
        }
    }
}

/// Accepts every copy of the demo topic until the demo stops.
async fn receive_topic(
    mut sub: Subscription,
    tally: std::sync::Arc<TopicTally>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            copy = sub.recv() => match copy {
                Some(copy) => {
                    tally.received.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    copy.accept();
                }
                None => return,
            },
            _ = stop.changed() => break,
        }
    }
    sub.unsubscribe().await;
}

/// Publishes a tick a second until the demo stops.
async fn publish_ticks(
    publisher: Publisher,
    tally: std::sync::Arc<TopicTally>,
    mut stop: watch::Receiver<bool>,
) {
    use std::sync::atomic::Ordering::Relaxed;
    let mut every = tokio::time::interval(Duration::from_secs(1));
    let mut n = 0u64;
    loop {
        tokio::select! {
            _ = every.tick() => {}
            _ = stop.changed() => return,
        }
        n += 1;
        // Bounded by the copies' deadline; the demo waits for the last report.
        let report = publisher
            .publish(MESSAGE_TYPE, Bytes::from(format!("tick {n}")))
            .await;
        tally.publishes.fetch_add(1, Relaxed);
        if let Ok(report) = report {
            tally.copies.fetch_add(report.recipients() as u64, Relaxed);
            tally
                .delivered
                .fetch_add(report.delivered() as u64, Relaxed);
        }
    }
}

#[derive(Debug, Serialize)]
struct NodeSummary {
    name: &'static str,
    identity: String,
    addr: String,
    messages_sent: u64,
    messages_received: u64,
    /// Answers to this node's sends: replies and acceptances.
    answers: u64,
    failed: u64,
    bytes_in: u64,
    bytes_out: u64,
    blob_streams_completed: u64,
}

#[derive(Debug, Default, Serialize)]
struct Totals {
    messages_sent: u64,
    messages_received: u64,
    answers: u64,
    failed: u64,
}

fn summarize(nodes: &[Node], links: &[LinkStats], elapsed: Duration, rate: u32) -> Summary {
    let nodes: Vec<NodeSummary> = nodes
        .iter()
        .map(|n| {
            let t = n.domus.reporting().snapshot().totals;
            NodeSummary {
                name: n.name,
                identity: n.domus.identity().to_string(),
                addr: n.addr.to_string(),
                messages_sent: t.messages_sent,
                messages_received: t.messages_received,
                answers: t.messages_accepted + t.messages_replied,
                failed: t.messages_rejected + t.messages_timed_out + t.messages_failed,
                bytes_in: t.primary_bytes_in + t.blob_bytes_in,
                bytes_out: t.primary_bytes_out + t.blob_bytes_out,
                blob_streams_completed: t.blob_streams_completed,
            }
        })
        .collect();
    let mut total = Totals::default();
    for n in &nodes {
        total.messages_sent += n.messages_sent;
        total.messages_received += n.messages_received;
        total.answers += n.answers;
        total.failed += n.failed;
    }
    Summary {
        duration_ms: u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX),
        rate_per_link: rate,
        nodes,
        links: links.to_vec(),
        total,
        topics: TopicSummary::default(),
    }
}

fn summary_text(s: &Summary, out: Output) -> String {
    let mut lines = vec![
        out.bold(&format!(
            "vicus demo: {} nodes, {:.1} s, {} links at {} msg/s",
            s.nodes.len(),
            s.duration_ms as f64 / 1000.0,
            s.links.len(),
            s.rate_per_link
        )),
        format!(
            "{:<7} {:<32} {:>9} {:>9} {:>9} {:>7} {:>11} {:>11} {:>6}",
            "node", "identity", "sent", "received", "answers", "failed", "in", "out", "blobs"
        ),
    ];
    for n in &s.nodes {
        lines.push(format!(
            "{:<7} {:<32} {:>9} {:>9} {:>9} {:>7} {:>11} {:>11} {:>6}",
            n.name,
            n.identity,
            n.messages_sent,
            n.messages_received,
            n.answers,
            n.failed,
            fmt_bytes(n.bytes_in as f64),
            fmt_bytes(n.bytes_out as f64),
            n.blob_streams_completed
        ));
    }
    lines.push(format!(
        "{:<7} {:<32} {:>9} {:>9} {:>9} {:>7}",
        "total",
        "",
        s.total.messages_sent,
        s.total.messages_received,
        s.total.answers,
        s.total.failed
    ));
    lines.push(format!(
        "topic demo.>: {} publishes, {} of {} copies delivered, {} received",
        s.topics.publishes, s.topics.delivered, s.topics.copies, s.topics.received
    ));
    lines.push(format!(
        "links (answered/sent): {}",
        s.links
            .iter()
            .map(|l| {
                let skipped = if l.skipped > 0 {
                    format!(" ({} skipped: link full)", l.skipped)
                } else {
                    String::new()
                };
                format!("{}→{} {}/{}{skipped}", l.from, l.to, l.answered(), l.sent)
            })
            .collect::<Vec<_>>()
            .join(" · ")
    ));
    lines.join("\n")
}

impl Summary {
    fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or_else(|e| json!({ "error": e.to_string() }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ratatui::Terminal;
    use ratatui::backend::TestBackend;

    #[test]
    fn durations_may_be_bare_seconds() {
        assert_eq!(parse_demo_duration("3"), Ok(Duration::from_secs(3)));
        assert_eq!(parse_demo_duration("3s"), Ok(Duration::from_secs(3)));
        assert_eq!(parse_demo_duration("500ms"), Ok(Duration::from_millis(500)));
        assert!(parse_demo_duration("0").is_err());
        assert!(parse_demo_duration("soon").is_err());
        assert_eq!(
            parse_demo_duration("365d").map_err(|e| e.contains("unit")),
            Err(true),
            "days are not a unit"
        );
        assert_eq!(parse_demo_duration("31536000"), Ok(MAX_DEMO_DURATION));
        for too_long in [
            "31536001",
            "9300000000000000000",
            "18446744073709551615",
            "9999999h",
        ] {
            let e = parse_demo_duration(too_long).expect_err(too_long);
            assert!(e.contains("at most 365 days"), "{too_long}: {e}");
        }
    }

    #[test]
    fn the_demo_screen_shows_the_nodes_and_the_chosen_one() {
        let report: RemoteReport = serde_json::from_value(json!({
            "version": 1,
            "identity": "spiffe://vicus.dev/domus/beta",
            "crypto_provider": "aws-lc-rs",
            "interval_ms": 2000,
            "totals": { "messages_sent": 10 },
            "gauges": { "peers": 3 },
            "latency": { "count": 0, "p50_us": 0, "p90_us": 0, "p99_us": 0 },
            "peers": [], "events": [], "events_missed": 0, "errors": [], "errors_missed": 0,
        }))
        .expect("report");
        let shown: Vec<Shown> = NAMES
            .iter()
            .map(|name| Shown {
                name,
                addr: "127.0.0.1:4000".to_owned(),
                watch: Watch::default(),
                view: None,
                problem: None,
            })
            .collect();
        let mut shown = shown;
        let mut view = shown[1].watch.observe(report, Instant::now());
        view.title = format!("beta — {}", view.identity);
        shown[1].view = Some(view);
        let frame = DemoFrame {
            shown: &shown,
            selected: 1,
            elapsed: Duration::from_secs(2),
            duration: Some(Duration::from_secs(5)),
            rate: 50,
        };
        let mut terminal = Terminal::new(TestBackend::new(120, 40)).expect("terminal");
        terminal.draw(|f| render(f, &frame)).expect("draw");
        let buffer = terminal.backend().buffer();
        let text: String = (0..buffer.area.height)
            .map(|y| {
                (0..buffer.area.width)
                    .map(|x| buffer[(x, y)].symbol())
                    .collect::<String>()
                    + "\n"
            })
            .collect();
        for shown in [
            "vicus demo — 3 nodes",
            "2s of 5s",
            "alpha",
            "gamma",
            "beta — spiffe://vicus.dev/domus/beta",
            "Peers",
            "Traffic",
            "Blob streams",
            "Recent errors",
            "Events",
        ] {
            assert!(text.contains(shown), "no {shown:?} in\n{text}");
        }
    }
}
