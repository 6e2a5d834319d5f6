//! Messaging benchmark: vicus against a raw mutual-TLS baseline.
//!
//! Every scenario runs over loopback TCP inside this one process (client and server share the
//! tokio multi-thread runtime), on connections made with the crate's own A0 transport, so the
//! baseline pays exactly the TLS 1.3 and certificate costs vicus pays. The **raw** scenarios put
//! length-prefixed frames (`u32` big-endian length, then the payload) straight on the
//! [`AuthenticatedStream`]: the sender packs many frames into ~64 KiB writes, the receiver
//! parses them out of a read buffer and counts them, and there are no acknowledgements. They
//! are the ceiling a messaging layer on the same transport can approach. The raw blob baseline
//! streams plain bytes on one such connection, in [`BLOB_WRITE_LEN`] writes.
//!
//! | scenario        | what is measured                                                            |
//! |-----------------|-----------------------------------------------------------------------------|
//! | `one_way_64b`   | one connection, N pipelined 64-byte messages; msg/s from the first write to the receiver parsing the last one |
//! | `ping_pong_64b` | one connection, sequential 64-byte request/echo round trips after a warm-up; p50/p99 latency |
//! | `fan_in_64x`    | 64 client connections (one identity each) sending N/64 messages each to one server at once; total msg/s |
//! | `blob_1gib`     | 1 GiB (scaled, at least 64 MiB) streamed in 256 KiB writes; MiB/s from the first write to the receiver reading the last byte (vicus: one blob, `Domus::send_blob`, read by the taberna's handler) |
//! | `ping_pong_during_blob` | vicus only: the `ping_pong_64b` round trips between two domus while a `blob_1gib`-sized blob streams between the same two; p50/p99 against the idle vicus `ping_pong_64b` run |
//!
//! Each scenario also reports the process's peak resident memory (`VmHWM`), reset before the
//! scenario where the kernel allows it. Every scenario runs under a deadline; a failure or a
//! timeout becomes an error row instead of a hang.
//!
//! Run it with the release profile:
//!
//! ```text
//! cargo bench --bench mesh
//! VICUS_BENCH_SCALE=0.1 cargo bench --bench mesh   # quicker, noisier
//! VICUS_BENCH_SCALE=4 cargo bench --bench mesh     # longer, steadier
//! ```
//!
//! `VICUS_BENCH_SCALE` (default 1) multiplies the message and round-trip counts and the blob
//! size. The results go to stdout as markdown (machine facts, the table, then the
//! ping-pong-during-blob section); progress goes to stderr.
//!
//! Adding a vicus scenario: write `async fn vicus_<scenario>(cfg: &BenchConfig) ->
//! BenchResult<Measurement>` that does the same work through the vicus API, and pass
//! `Some(run_scenario("vicus <scenario>", vicus_<scenario>(&cfg)).await)` as the row's `vicus`
//! outcome in `main`; the table then shows the vicus/raw ratios.

use std::error::Error;
use std::fmt::Write as _;
use std::future::Future;
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::task::{JoinHandle, JoinSet};
use vicus::DomusAddr;
use vicus::a0_transport::{AuthenticatedStream, Listener, Transport, TransportConfig};
use vicus::dev_certs::DevCa;

/// Any error a scenario can end with; `Send + Sync` so spawned tasks can return it.
type BoxError = Box<dyn Error + Send + Sync>;
/// The result of a scenario or helper.
type BenchResult<T> = Result<T, BoxError>;

/// The payload size of every message in these scenarios.
const PAYLOAD_LEN: usize = 64;
/// The frame header: the payload length as a big-endian `u32`.
const FRAME_HEADER_LEN: usize = 4;
/// Frames longer than this are treated as a corrupt stream.
const MAX_FRAME_LEN: usize = 16 << 20;
/// The sender flushes its batch buffer to the stream when the next frame would exceed this.
const WRITE_BATCH: usize = 64 * 1024;
/// The receiver keeps at least this much free space in its read buffer before each read.
const READ_CHUNK: usize = 64 * 1024;

/// One-way messages at scale 1 (`one_way_64b` in total, `fan_in_64x` across all clients);
/// sized so the raw one-connection run takes about 1 s on a 2-core machine (the raw fan-in
/// takes 2–3 s).
const BASE_ONE_WAY_MESSAGES: f64 = 20_000_000.0;
/// Measured round trips at scale 1.
const BASE_ROUND_TRIPS: f64 = 50_000.0;
/// Unmeasured round trips before the measured ones.
const WARMUP_ROUND_TRIPS: usize = 5_000;
/// Client connections in the fan-in scenario.
const FAN_IN_CLIENTS: usize = 64;
/// Blob bytes at scale 1 (`blob_1gib`, and the blob under `ping_pong_during_blob`).
const BASE_BLOB_BYTES: f64 = (1u64 << 30) as f64;
/// The smallest blob, whatever the scale.
const MIN_BLOB_BYTES: u64 = 64 << 20;
/// The size of every blob write (and of the receiver's read buffer).
const BLOB_WRITE_LEN: usize = 256 * 1024;
/// Bytes in a MiB, for the MiB/s figures.
const MIB: f64 = (1u64 << 20) as f64;
/// The deadline for one whole scenario, set-up included.
const SCENARIO_DEADLINE: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------------------------
// Configuration and results
// ---------------------------------------------------------------------------------------------

/// Workload sizes, derived from `VICUS_BENCH_SCALE`.
#[derive(Debug, Clone, Copy)]
struct BenchConfig {
    /// The multiplier applied to the base message and round-trip counts.
    scale: f64,
}

impl BenchConfig {
    /// Reads `VICUS_BENCH_SCALE` (a positive number, default 1).
    fn from_env() -> BenchResult<Self> {
        let scale = match std::env::var("VICUS_BENCH_SCALE") {
            Ok(s) => s
                .trim()
                .parse::<f64>()
                .map_err(|e| format!("VICUS_BENCH_SCALE={s:?} is not a number: {e}"))?,
            Err(std::env::VarError::NotPresent) => 1.0,
            Err(e) => return Err(format!("VICUS_BENCH_SCALE: {e}").into()),
        };
        if !(scale.is_finite() && scale > 0.0 && scale <= 1_000.0) {
            return Err(format!("VICUS_BENCH_SCALE={scale} must be in (0, 1000]").into());
        }
        Ok(Self { scale })
    }

    /// N: the messages of `one_way_64b`, and the total of `fan_in_64x`.
    fn one_way_messages(&self) -> u64 {
        scaled(BASE_ONE_WAY_MESSAGES, self.scale, FAN_IN_CLIENTS as u64)
    }

    /// The messages each `fan_in_64x` client sends (N / 64, rounded up).
    fn fan_in_messages_per_client(&self) -> u64 {
        self.one_way_messages().div_ceil(FAN_IN_CLIENTS as u64)
    }

    /// The measured round trips of `ping_pong_64b`.
    fn round_trips(&self) -> usize {
        usize::try_from(scaled(BASE_ROUND_TRIPS, self.scale, 100)).unwrap_or(usize::MAX)
    }

    /// The bytes of one blob (`blob_1gib`, `ping_pong_during_blob`).
    fn blob_bytes(&self) -> u64 {
        scaled(BASE_BLOB_BYTES, self.scale, MIN_BLOB_BYTES)
    }
}

/// `base * scale`, rounded, and at least `min`.
fn scaled(base: f64, scale: f64, min: u64) -> u64 {
    // `as` saturates for floats; the scale is bounded in `from_env` anyway.
    ((base * scale).round() as u64).max(min)
}

/// What one scenario measured. Every scenario, raw or vicus, returns one of these; fields that
/// do not apply stay `None` and show as `-` in the table.
#[derive(Debug, Clone, Default)]
struct Measurement {
    /// Messages delivered in the timed interval (for request/reply scenarios: round trips).
    messages: u64,
    /// The timed interval (set-up and handshakes excluded).
    elapsed: Duration,
    /// Round-trip latency, for request/reply scenarios.
    latency: Option<Latency>,
    /// Peak resident set size of the process in kB (`VmHWM`); filled in by [`run_scenario`].
    peak_rss_kb: Option<u64>,
    /// Bytes delivered in the timed interval, for blob scenarios; the table then shows MiB/s
    /// instead of msg/s.
    bytes: Option<u64>,
    /// A blob streamed while the measured work ran (`ping_pong_during_blob`): its bytes, and
    /// the time from its first write to its last byte read.
    concurrent_blob: Option<(u64, Duration)>,
}

impl Measurement {
    /// A throughput-only measurement.
    fn throughput(messages: u64, elapsed: Duration) -> Self {
        Self {
            messages,
            elapsed,
            ..Self::default()
        }
    }

    /// A blob measurement: `bytes` (one blob) streamed in `elapsed`.
    fn blob(bytes: u64, elapsed: Duration) -> Self {
        Self {
            messages: 1,
            elapsed,
            bytes: Some(bytes),
            ..Self::default()
        }
    }

    /// Messages (or round trips) per second over the timed interval.
    fn per_second(&self) -> f64 {
        rate(self.messages as f64, self.elapsed)
    }
}

/// `amount / elapsed` per second; 0 for an empty interval.
fn rate(amount: f64, elapsed: Duration) -> f64 {
    let secs = elapsed.as_secs_f64();
    if secs > 0.0 { amount / secs } else { 0.0 }
}

/// Round-trip latency percentiles (nearest rank).
#[derive(Debug, Clone, Copy)]
struct Latency {
    p50: Duration,
    p99: Duration,
}

impl Latency {
    /// Percentiles of `samples`; `None` when there are none.
    fn from_samples(mut samples: Vec<Duration>) -> Option<Self> {
        samples.sort_unstable();
        Some(Self {
            p50: percentile(&samples, 0.50)?,
            p99: percentile(&samples, 0.99)?,
        })
    }
}

/// The nearest-rank percentile `q` (0..=1) of sorted `samples`.
fn percentile(sorted: &[Duration], q: f64) -> Option<Duration> {
    let rank = ((q * sorted.len() as f64).ceil() as usize).max(1);
    sorted.get(rank - 1).copied()
}

/// A scenario's outcome: its measurement, or why it has none (error or timeout).
type Outcome = Result<Measurement, String>;

/// One line of the results table: a scenario's raw baseline and, once written, its vicus run.
struct Row {
    name: &'static str,
    raw: Outcome,
    vicus: Option<Outcome>,
}

/// Runs one scenario under [`SCENARIO_DEADLINE`] and records the peak RSS it reached.
///
/// The peak is reset first (`/proc/self/clear_refs`), so it covers this scenario only, the
/// memory the process already held included. Tasks a scenario spawns must be owned by it (a
/// [`JoinSet`] or a [`Task`]), so a timed-out scenario leaves nothing running.
async fn run_scenario<F>(label: &str, scenario: F) -> Outcome
where
    F: Future<Output = BenchResult<Measurement>>,
{
    // `VICUS_BENCH_ONLY=vicus` (any substring of the label) runs only the matching scenarios,
    // e.g. under a profiler.
    if let Ok(only) = std::env::var("VICUS_BENCH_ONLY") {
        if !label.contains(only.as_str()) {
            return Err("skipped (VICUS_BENCH_ONLY)".to_owned());
        }
    }
    eprintln!("running {label} ...");
    reset_peak_rss();
    let outcome = match tokio::time::timeout(SCENARIO_DEADLINE, scenario).await {
        Ok(Ok(mut m)) => {
            m.peak_rss_kb = peak_rss_kb();
            Ok(m)
        }
        Ok(Err(e)) => Err(format!("error: {e}")),
        Err(_) => Err(format!("timed out after {SCENARIO_DEADLINE:?}")),
    };
    match &outcome {
        Ok(Measurement {
            bytes: Some(bytes),
            elapsed,
            ..
        }) => eprintln!(
            "  {label}: {:.1} MiB in {:.3} s",
            *bytes as f64 / MIB,
            elapsed.as_secs_f64()
        ),
        Ok(m) => eprintln!(
            "  {label}: {} messages in {:.3} s",
            m.messages,
            m.elapsed.as_secs_f64()
        ),
        Err(e) => eprintln!("  {label}: {e}"),
    }
    outcome
}

// ---------------------------------------------------------------------------------------------
// Main
// ---------------------------------------------------------------------------------------------

fn main() -> Result<(), BoxError> {
    // `VICUS_BENCH_WORKERS` sets the runtime's worker threads (default: one per core).
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if let Ok(n) = std::env::var("VICUS_BENCH_WORKERS") {
        runtime.worker_threads(
            n.parse()
                .map_err(|_| "VICUS_BENCH_WORKERS must be a number")?,
        );
    }
    // Everything runs on the runtime's workers (as in an application), not on the thread
    // that blocks on the runtime.
    runtime
        .enable_all()
        .build()?
        .block_on(async { tokio::spawn(bench_main()).await? })
}

async fn bench_main() -> Result<(), BoxError> {
    let cfg = BenchConfig::from_env()?;
    let rss_reset = reset_peak_rss();
    let tls = tokio::time::timeout(SCENARIO_DEADLINE, describe_tls())
        .await
        .unwrap_or_else(|_| Err("timed out".into()))
        .unwrap_or_else(|e| format!("unknown ({e})"));

    // The lead adds `vicus: Some(run_scenario("vicus ...", vicus_...(&cfg)).await)` per row.
    // The blob scenarios run before `fan_in_64x`: the peak RSS reset cannot give back memory
    // the process still holds, and the fan-in's 65 domus leave far more than a blob needs.
    let mut rows = vec![
        Row {
            name: "one_way_64b",
            raw: run_scenario("raw one_way_64b", raw_one_way_64b(&cfg)).await,
            vicus: Some(run_scenario("vicus one_way_64b", vicus_one_way_64b(&cfg)).await),
        },
        Row {
            name: "ping_pong_64b",
            raw: run_scenario("raw ping_pong_64b", raw_ping_pong_64b(&cfg)).await,
            vicus: Some(run_scenario("vicus ping_pong_64b", vicus_ping_pong_64b(&cfg)).await),
        },
        Row {
            name: "blob_1gib",
            raw: run_scenario("raw blob_1gib", raw_blob_1gib(&cfg)).await,
            vicus: Some(run_scenario("vicus blob_1gib", vicus_blob_1gib(&cfg)).await),
        },
    ];
    // Compared with the idle vicus `ping_pong_64b` above rather than with a raw run, so it gets
    // a section of its own.
    let during_blob = run_scenario(
        "vicus ping_pong_during_blob",
        vicus_ping_pong_during_blob(&cfg),
    )
    .await;
    rows.push(Row {
        name: "fan_in_64x",
        raw: run_scenario("raw fan_in_64x", raw_fan_in_64x(&cfg)).await,
        vicus: Some(run_scenario("vicus fan_in_64x", vicus_fan_in_64x(&cfg)).await),
    });
    let idle = rows
        .iter()
        .find(|r| r.name == "ping_pong_64b")
        .and_then(|r| r.vicus.as_ref());

    let report = format!(
        "{}\n{}\n{}",
        machine_facts(&cfg, &tls, rss_reset),
        render_table(&rows),
        render_during_blob(idle, &during_blob)
    );
    print!("{report}");
    // `VICUS_BENCH_WRITE=1` records the run in docs/performance.md.
    if std::env::var("VICUS_BENCH_WRITE").is_ok_and(|v| v == "1") {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/performance.md");
        std::fs::write(path, performance_page(&report))?;
        eprintln!("wrote {path}");
    }
    Ok(())
}

/// docs/performance.md: what is measured, the targets, and this run's table.
fn performance_page(report: &str) -> String {
    format!(
        "# vicus performance\n\n\
         Written by `VICUS_BENCH_WRITE=1 cargo bench --bench mesh` (benches/mesh.rs). Every vicus \
         figure is a ratio against a raw baseline measured in the same run: length-prefixed \
         64-byte frames over the same mutual-TLS loopback connection (vicus's own A0 transport), \
         batched writes, no acknowledgements. vicus sends fewer messages than the raw runs \
         (1/{VICUS_COUNT_DIVISOR}); rates are per second, so the counts need not match.\n\n\
         - **one_way_64b**: one sender keeps {VICUS_PIPELINE} receipts outstanding; every message \
         is individually accepted by the receiving taberna's handler (raw: no answers at all). \
         Target: at least 0.20 of raw.\n\
         - **ping_pong_64b**: sequential request/reply round trips. Targets: p50 at most 1.5x and \
         p99 at most 2x raw.\n\
         - **fan_in_64x**: 64 client domus (64 identities, 64 calles) send to one server domus \
         with two worker tasks. Target: at least 0.10 of raw, no error; peak RSS is reported \
         for the whole process (all 65 domus).\n\
         - **blob_1gib**: one blob (`Domus::send_blob`, {BLOB_WRITE_LEN}-byte `write_all`s, then \
         `finish`) read to its end by the receiving taberna's handler as a `Stream` of `Bytes` \
         (zero-copy; reading it through `AsyncRead` adds one copy), against the same bytes \
         written on one raw connection and read into a buffer; MiB/s from the first write to \
         the last byte read. \
         Target: at least 0.80 of raw.\n\
         - **ping_pong_during_blob**: the vicus ping_pong_64b round trips (primary callis) \
         while a blob of the blob_1gib size streams between the same two domus to another \
         taberna; only round trips made while the blob streams count. Target: p99 at most 3x \
         the idle vicus ping_pong_64b p99 of the same run.\n\n\
         Numbers from a shared 2-core virtual machine are noisy; compare ratios within one run \
         only.\n\n{report}"
    )
}

// ---------------------------------------------------------------------------------------------
// vicus scenarios
// ---------------------------------------------------------------------------------------------

/// vicus sends fewer messages than the raw runs (every one is individually acknowledged, so
/// the same count would take far longer); the comparison is per second, so counts may differ.
const VICUS_COUNT_DIVISOR: u64 = 20;
/// Receipts kept outstanding by one sending task in the one-way scenarios.
const VICUS_PIPELINE: usize = 4096;
/// The A3 message type the scenarios use.
const BENCH_TYPE: vicus::MessageType = vicus::MessageType(0x0100_0001);
/// The taberna the server registers.
const BENCH_TABERNA: vicus::TabernaId = vicus::TabernaId(1);

/// A domus named `name` routing through `routes`.
async fn bench_domus(
    ca: &mut DevCa,
    name: &str,
    routes: &std::sync::Arc<vicus::SimpleResolver>,
    config: vicus::DomusConfig,
) -> BenchResult<vicus::Domus> {
    let (auth, _) = ca.domus_auth(name)?;
    Ok(vicus::Domus::builder(auth)
        .resolver(routes.clone())
        .config(config)
        .build()
        .await?)
}

/// A server domus with `workers` tasks accepting (or echoing, when `reply`) every request.
async fn bench_server(
    ca: &mut DevCa,
    routes: &std::sync::Arc<vicus::SimpleResolver>,
    workers: usize,
    reply: bool,
    config: vicus::DomusConfig,
) -> BenchResult<(vicus::Domus, JoinSet<()>)> {
    let server = bench_domus(ca, "server", routes, config).await?;
    routes.insert(
        BENCH_TABERNA,
        server.local_addr().clone(),
        Some(server.identity().clone()),
    );
    let taberna = server.taberna(BENCH_TABERNA)?;
    let mut set = JoinSet::new();
    for _ in 0..workers {
        let t = taberna.clone();
        set.spawn(async move {
            while let Some(req) = t.recv().await {
                if reply {
                    let payload = req.payload().clone();
                    req.reply(payload);
                } else {
                    req.accept();
                }
            }
        });
    }
    Ok((server, set))
}

/// Sends `count` 64-byte messages from `client`, keeping [`VICUS_PIPELINE`] receipts
/// outstanding; every one must come back accepted.
async fn vicus_pipelined_burst(client: &vicus::Domus, count: u64) -> BenchResult<u64> {
    let payload = bytes::Bytes::from(vec![7u8; PAYLOAD_LEN]);
    let mut outstanding = std::collections::VecDeque::with_capacity(VICUS_PIPELINE);
    let mut accepted = 0u64;
    for _ in 0..count {
        if outstanding.len() >= VICUS_PIPELINE {
            if let Some(r) = outstanding.pop_front() {
                if r.await? == vicus::Delivery::Accepted {
                    accepted += 1;
                }
            }
        }
        let receipt = client
            .admit(
                BENCH_TABERNA,
                BENCH_TYPE,
                payload.clone(),
                vicus::SendOptions::default(),
            )
            .await?;
        outstanding.push_back(receipt);
    }
    for r in outstanding {
        if r.await? == vicus::Delivery::Accepted {
            accepted += 1;
        }
    }
    Ok(accepted)
}

/// `one_way_64b` through vicus: pipelined sends, each accepted by the receiving taberna.
async fn vicus_one_way_64b(cfg: &BenchConfig) -> BenchResult<Measurement> {
    let count = (cfg.one_way_messages() / VICUS_COUNT_DIVISOR).max(1);
    let mut ca = DevCa::new("vicus bench CA")?;
    let routes = std::sync::Arc::new(vicus::SimpleResolver::new());
    let (server, _workers) =
        bench_server(&mut ca, &routes, 1, false, vicus::DomusConfig::default()).await?;
    let client = bench_domus(&mut ca, "client", &routes, vicus::DomusConfig::default()).await?;
    // Warm up: open the callis.
    vicus_pipelined_burst(&client, 100).await?;
    let started = Instant::now();
    let accepted = vicus_pipelined_burst(&client, count).await?;
    let elapsed = started.elapsed();
    if accepted != count {
        return Err(format!("{accepted} of {count} accepted").into());
    }
    client.shutdown().await;
    server.shutdown().await;
    Ok(Measurement::throughput(count, elapsed))
}

/// `ping_pong_64b` through vicus: sequential request/reply round trips.
async fn vicus_ping_pong_64b(cfg: &BenchConfig) -> BenchResult<Measurement> {
    let mut ca = DevCa::new("vicus bench CA")?;
    let routes = std::sync::Arc::new(vicus::SimpleResolver::new());
    let (server, _workers) =
        bench_server(&mut ca, &routes, 1, true, vicus::DomusConfig::default()).await?;
    let client = bench_domus(&mut ca, "client", &routes, vicus::DomusConfig::default()).await?;
    let payload = bytes::Bytes::from(vec![7u8; PAYLOAD_LEN]);
    let round_trip = || {
        client.send(
            BENCH_TABERNA,
            BENCH_TYPE,
            payload.clone(),
            vicus::SendOptions::default(),
        )
    };
    for _ in 0..WARMUP_ROUND_TRIPS {
        round_trip().await?;
    }
    let n = cfg.round_trips();
    let mut samples = Vec::with_capacity(n);
    let started = Instant::now();
    for _ in 0..n {
        let t0 = Instant::now();
        match round_trip().await? {
            vicus::Delivery::Replied(p) if p.len() == PAYLOAD_LEN => {}
            other => return Err(format!("unexpected answer {other:?}").into()),
        }
        samples.push(t0.elapsed());
    }
    let elapsed = started.elapsed();
    client.shutdown().await;
    server.shutdown().await;
    let mut m = Measurement::throughput(n as u64, elapsed);
    m.latency = Latency::from_samples(samples);
    Ok(m)
}

/// `fan_in_64x` through vicus: 64 client domus send concurrently to one server domus.
async fn vicus_fan_in_64x(cfg: &BenchConfig) -> BenchResult<Measurement> {
    let per_client = (cfg.fan_in_messages_per_client() / VICUS_COUNT_DIVISOR).max(1);
    let mut ca = DevCa::new("vicus bench CA")?;
    let routes = std::sync::Arc::new(vicus::SimpleResolver::new());
    let mut server_config = vicus::DomusConfig::default();
    server_config.transport.max_pending_handshakes = 256;
    server_config.transport.max_pending_handshakes_per_source = 256;
    server_config.default_inbox_depth = 1 << 18;
    let (server, _workers) = bench_server(&mut ca, &routes, 2, false, server_config).await?;
    let mut clients = Vec::with_capacity(FAN_IN_CLIENTS);
    for i in 0..FAN_IN_CLIENTS {
        let client = bench_domus(
            &mut ca,
            &format!("client-{i}"),
            &routes,
            vicus::DomusConfig::default(),
        )
        .await?;
        vicus_pipelined_burst(&client, 1).await?;
        clients.push(client);
    }
    let started = Instant::now();
    let mut set = JoinSet::new();
    for client in &clients {
        let client = client.clone();
        set.spawn(async move { vicus_pipelined_burst(&client, per_client).await });
    }
    let mut total = 0u64;
    while let Some(r) = set.join_next().await {
        total += r??;
    }
    let elapsed = started.elapsed();
    let expected = per_client * FAN_IN_CLIENTS as u64;
    if total != expected {
        return Err(format!("{total} of {expected} accepted").into());
    }
    for c in clients {
        c.shutdown().await;
    }
    server.shutdown().await;
    Ok(Measurement::throughput(total, elapsed))
}

/// The taberna the blob scenarios stream to (on the same server domus as [`BENCH_TABERNA`] in
/// `ping_pong_during_blob`).
const BLOB_TABERNA: vicus::TabernaId = vicus::TabernaId(2);

/// Registers [`BLOB_TABERNA`] on `server`, routes it, and spawns its handler: it takes one
/// request's blob, accepts the request and reads the blob to its end, which must come after
/// exactly `expected` bytes. The task returns the instant the last byte was read.
fn vicus_blob_sink(
    server: &vicus::Domus,
    routes: &std::sync::Arc<vicus::SimpleResolver>,
    expected: u64,
) -> BenchResult<Task<BenchResult<Instant>>> {
    let taberna = server.taberna(BLOB_TABERNA)?;
    routes.insert(
        BLOB_TABERNA,
        server.local_addr().clone(),
        Some(server.identity().clone()),
    );
    Ok(Task::spawn(async move {
        let mut req = taberna
            .recv()
            .await
            .ok_or("the blob taberna closed before a request came")?;
        let mut rx = req.blob().ok_or("the request carries no blob")?;
        req.accept();
        // The zero-copy way to read a blob: the `Bytes` that arrived, not copied into a
        // buffer (the raw reader's one copy, out of the TLS layer, happens here too).
        let mut seen = 0u64;
        while let Some(piece) = std::future::poll_fn(|cx| {
            futures_core::Stream::poll_next(std::pin::Pin::new(&mut rx), cx)
        })
        .await
        {
            seen += piece?.len() as u64;
            if seen > expected {
                return Err(format!("the blob is longer than the {expected} bytes sent").into());
            }
        }
        let done = Instant::now();
        if seen != expected {
            return Err(format!("the blob ended after {seen} of {expected} bytes").into());
        }
        Ok(done)
    }))
}

/// Opens a blob of `total` bytes from `client` to [`BLOB_TABERNA`] and streams it in
/// [`BLOB_WRITE_LEN`] writes, then finishes it. `on_accepted` (if any) fires when the handler
/// has accepted, just before the first write. Returns the instant of the first write.
async fn vicus_send_blob(
    client: &vicus::Domus,
    total: u64,
    on_accepted: Option<tokio::sync::oneshot::Sender<()>>,
) -> BenchResult<Instant> {
    let mut tx = client
        .send_blob(
            BLOB_TABERNA,
            BENCH_TYPE,
            Bytes::new(),
            vicus::SendOptions::default(),
        )
        .await?;
    if let Some(accepted) = on_accepted {
        // The receiver may have gone (the scenario is failing); the blob still goes out.
        let _ = accepted.send(());
    }
    let started = Instant::now();
    write_blob(&mut tx, total).await?;
    tx.finish().await?;
    Ok(started)
}

/// `blob_1gib` through vicus: one blob, read to its end by the receiving taberna's handler.
async fn vicus_blob_1gib(cfg: &BenchConfig) -> BenchResult<Measurement> {
    let total = cfg.blob_bytes();
    let mut ca = DevCa::new("vicus bench CA")?;
    let routes = std::sync::Arc::new(vicus::SimpleResolver::new());
    let server = bench_domus(&mut ca, "server", &routes, vicus::DomusConfig::default()).await?;
    let sink = vicus_blob_sink(&server, &routes, total)?;
    let client = bench_domus(&mut ca, "client", &routes, vicus::DomusConfig::default()).await?;
    let started = vicus_send_blob(&client, total, None).await?;
    let done = sink.join().await??;
    client.shutdown().await;
    server.shutdown().await;
    Ok(Measurement::blob(total, done.duration_since(started)))
}

/// `ping_pong_during_blob`: the `ping_pong_64b` round trips between two domus while a blob
/// streams between the same two. Only round trips started while the blob streams (after the
/// handler accepted it, before its last byte was read) are measured.
async fn vicus_ping_pong_during_blob(cfg: &BenchConfig) -> BenchResult<Measurement> {
    let total = cfg.blob_bytes();
    let mut ca = DevCa::new("vicus bench CA")?;
    let routes = std::sync::Arc::new(vicus::SimpleResolver::new());
    let (server, _workers) =
        bench_server(&mut ca, &routes, 1, true, vicus::DomusConfig::default()).await?;
    let sink = vicus_blob_sink(&server, &routes, total)?;
    let client = bench_domus(&mut ca, "client", &routes, vicus::DomusConfig::default()).await?;
    let payload = Bytes::from(vec![7u8; PAYLOAD_LEN]);
    let round_trip = || {
        client.send(
            BENCH_TABERNA,
            BENCH_TYPE,
            payload.clone(),
            vicus::SendOptions::default(),
        )
    };
    // Warm up (and open the primary callis) before the blob starts.
    for _ in 0..WARMUP_ROUND_TRIPS {
        round_trip().await?;
    }
    let (accepted_tx, accepted_rx) = tokio::sync::oneshot::channel();
    let sender = {
        let client = client.clone();
        Task::spawn(async move { vicus_send_blob(&client, total, Some(accepted_tx)).await })
    };
    if accepted_rx.await.is_err() {
        // The sender ended before the blob was accepted: its error says why.
        sender.join().await??;
        return Err("the blob sender ended before the blob was accepted".into());
    }
    let mut samples = Vec::with_capacity(cfg.round_trips());
    let started = Instant::now();
    while !sink.is_finished() && !sender.is_finished() {
        let t0 = Instant::now();
        match round_trip().await? {
            vicus::Delivery::Replied(p) if p.len() == PAYLOAD_LEN => {}
            other => return Err(format!("unexpected answer {other:?}").into()),
        }
        samples.push(t0.elapsed());
    }
    let elapsed = started.elapsed();
    let blob_started = sender.join().await??;
    let blob_done = sink.join().await??;
    client.shutdown().await;
    server.shutdown().await;
    if samples.is_empty() {
        return Err("the blob ended before the first round trip".into());
    }
    Ok(Measurement {
        messages: samples.len() as u64,
        elapsed,
        latency: Latency::from_samples(samples),
        concurrent_blob: Some((total, blob_done.duration_since(blob_started))),
        ..Measurement::default()
    })
}

// ---------------------------------------------------------------------------------------------
// Raw baseline scenarios
// ---------------------------------------------------------------------------------------------

/// `one_way_64b`: N pipelined 64-byte frames on one connection, no acknowledgements.
async fn raw_one_way_64b(cfg: &BenchConfig) -> BenchResult<Measurement> {
    let mut ca = DevCa::new("vicus bench CA")?;
    let (mut client, mut server) = connect_pair(&mut ca).await?;
    let n = cfg.one_way_messages();

    let receiver = Task::spawn(async move { receive_frames(&mut server, n).await });
    let start = Instant::now();
    let sender = Task::spawn(async move {
        send_frames(&mut client, &[0xA5; PAYLOAD_LEN], n).await?;
        // Keep the connection open until the receiver is done with it.
        Ok::<_, BoxError>(client)
    });
    let end = receiver.join().await??;
    let _client = sender.join().await??;
    Ok(Measurement::throughput(n, end.duration_since(start)))
}

/// `ping_pong_64b`: sequential 64-byte request/echo round trips on one connection.
async fn raw_ping_pong_64b(cfg: &BenchConfig) -> BenchResult<Measurement> {
    let mut ca = DevCa::new("vicus bench CA")?;
    let (mut client, mut server) = connect_pair(&mut ca).await?;
    let rounds = cfg.round_trips();

    let echo = Task::spawn(async move { echo_frames(&mut server).await });
    let pinger = Task::spawn(async move {
        ping_pong(
            &mut client,
            &[0x5A; PAYLOAD_LEN],
            WARMUP_ROUND_TRIPS,
            rounds,
        )
        .await
    });
    let (samples, elapsed) = pinger.join().await??;
    let echoed = echo.join().await??;
    let expected = (WARMUP_ROUND_TRIPS + rounds) as u64;
    if echoed != expected {
        return Err(format!("server echoed {echoed} frames, expected {expected}").into());
    }
    Ok(Measurement {
        messages: samples.len() as u64,
        elapsed,
        latency: Latency::from_samples(samples),
        ..Measurement::default()
    })
}

/// `fan_in_64x`: 64 clients, one identity and connection each, each sending N/64 64-byte frames
/// to one server at the same time; one server task per connection counts its frames.
async fn raw_fan_in_64x(cfg: &BenchConfig) -> BenchResult<Measurement> {
    let mut ca = DevCa::new("vicus bench CA")?;
    let mut server_config = TransportConfig::default();
    server_config.max_pending_handshakes = 256;
    server_config.max_pending_handshakes_per_source = 256;
    let server = transport(&mut ca, "server", server_config)?;
    let clients = (0..FAN_IN_CLIENTS)
        .map(|i| {
            transport(
                &mut ca,
                &format!("client-{i:02}"),
                TransportConfig::default(),
            )
        })
        .collect::<BenchResult<Vec<_>>>()?;
    let listener = listen_loopback(&server).await?;
    let (dialed, accepted) = connect_many(&listener, &clients).await?;
    let per_client = cfg.fan_in_messages_per_client();

    // Receivers return the instant they parsed their last frame; senders return `None`.
    let mut tasks: JoinSet<BenchResult<Option<Instant>>> = JoinSet::new();
    for mut stream in accepted {
        tasks.spawn(async move { receive_frames(&mut stream, per_client).await.map(Some) });
    }
    let start = Instant::now();
    for mut stream in dialed {
        tasks.spawn(async move {
            send_frames(&mut stream, &[0xC3; PAYLOAD_LEN], per_client).await?;
            Ok(None)
        });
    }
    let mut end = start;
    while let Some(joined) = tasks.join_next().await {
        if let Some(done) = joined?? {
            end = end.max(done);
        }
    }
    let total = per_client * FAN_IN_CLIENTS as u64;
    Ok(Measurement::throughput(total, end.duration_since(start)))
}

/// `blob_1gib`: the blob's bytes written on one connection in [`BLOB_WRITE_LEN`] writes and
/// read until all have arrived.
async fn raw_blob_1gib(cfg: &BenchConfig) -> BenchResult<Measurement> {
    let mut ca = DevCa::new("vicus bench CA")?;
    let (mut client, mut server) = connect_pair(&mut ca).await?;
    let total = cfg.blob_bytes();

    let receiver = Task::spawn(async move { read_blob(&mut server, total).await });
    let start = Instant::now();
    let sender = Task::spawn(async move {
        write_blob(&mut client, total).await?;
        // Keep the connection open until the receiver is done with it.
        Ok::<_, BoxError>(client)
    });
    let end = receiver.join().await??;
    let _client = sender.join().await??;
    Ok(Measurement::blob(total, end.duration_since(start)))
}

// ---------------------------------------------------------------------------------------------
// Connections
// ---------------------------------------------------------------------------------------------

/// A transport for `spiffe://vicus.dev/domus/<name>`, signed by `ca`.
fn transport(ca: &mut DevCa, name: &str, config: TransportConfig) -> BenchResult<Transport> {
    let (auth, _id) = ca.domus_auth(name)?;
    Ok(Transport::new(auth, config)?)
}

/// A TCP listener on an ephemeral loopback port.
async fn listen_loopback(t: &Transport) -> BenchResult<Listener> {
    Ok(t.listen(&DomusAddr::tcp(([127, 0, 0, 1], 0))).await?)
}

/// One authenticated connection between two fresh identities: `(dialer side, listener side)`.
async fn connect_pair(ca: &mut DevCa) -> BenchResult<(AuthenticatedStream, AuthenticatedStream)> {
    let server = transport(ca, "server", TransportConfig::default())?;
    let client = transport(ca, "client", TransportConfig::default())?;
    let listener = listen_loopback(&server).await?;
    let (dialed, accepted) = tokio::join!(client.dial(listener.local_addr(), None), async {
        listener.accept().await?.handshake().await
    });
    Ok((dialed?, accepted?))
}

/// Dials `listener` once from each of `clients`, all at once, while it accepts them (each
/// handshake on its own task). Returns `(dialer sides, listener sides)`, in completion order.
async fn connect_many(
    listener: &Listener,
    clients: &[Transport],
) -> BenchResult<(Vec<AuthenticatedStream>, Vec<AuthenticatedStream>)> {
    let mut dials = JoinSet::new();
    for client in clients {
        let client = client.clone();
        let addr = listener.local_addr().clone();
        dials.spawn(async move { client.dial(&addr, None).await });
    }
    let dial_all = async {
        let mut streams = Vec::with_capacity(clients.len());
        while let Some(joined) = dials.join_next().await {
            streams.push(joined??);
        }
        Ok::<_, BoxError>(streams)
    };
    let accept_all = async {
        let mut handshakes = JoinSet::new();
        for _ in 0..clients.len() {
            let incoming = listener.accept().await?;
            handshakes.spawn(incoming.handshake());
        }
        let mut streams = Vec::with_capacity(clients.len());
        while let Some(joined) = handshakes.join_next().await {
            streams.push(joined??);
        }
        Ok::<_, BoxError>(streams)
    };
    tokio::try_join!(dial_all, accept_all)
}

/// A spawned task that is aborted when dropped, so a scenario that fails or times out leaves
/// nothing running behind it.
struct Task<T>(JoinHandle<T>);

impl<T: Send + 'static> Task<T> {
    fn spawn<F>(fut: F) -> Self
    where
        F: Future<Output = T> + Send + 'static,
    {
        Self(tokio::spawn(fut))
    }

    /// Waits for the task's output; a panic or abort becomes an error.
    async fn join(mut self) -> BenchResult<T> {
        Ok((&mut self.0).await?)
    }

    /// Whether the task has ended (its output is then ready for [`Task::join`]).
    fn is_finished(&self) -> bool {
        self.0.is_finished()
    }
}

impl<T> Drop for Task<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

// ---------------------------------------------------------------------------------------------
// Framing
// ---------------------------------------------------------------------------------------------

/// Appends one frame (`u32` big-endian length, then `payload`) to `buf`.
fn put_frame(buf: &mut BytesMut, payload: &[u8]) -> BenchResult<()> {
    let len = u32::try_from(payload.len()).map_err(|_| "payload longer than u32::MAX")?;
    buf.put_u32(len);
    buf.put_slice(payload);
    Ok(())
}

/// Splits the next complete frame's payload off the front of `buf`, if it holds one.
fn next_frame(buf: &mut BytesMut) -> BenchResult<Option<Bytes>> {
    let Some(header) = buf.first_chunk::<FRAME_HEADER_LEN>() else {
        return Ok(None);
    };
    let len = usize::try_from(u32::from_be_bytes(*header))?;
    if len > MAX_FRAME_LEN {
        return Err(format!("frame of {len} bytes exceeds {MAX_FRAME_LEN}").into());
    }
    if buf.len() < FRAME_HEADER_LEN + len {
        return Ok(None);
    }
    buf.advance(FRAME_HEADER_LEN);
    Ok(Some(buf.split_to(len).freeze()))
}

/// Reads whatever is available into `buf`, keeping at least [`READ_CHUNK`] / 4 bytes free.
/// Returns the bytes read; 0 means end of stream.
async fn read_some<R: AsyncRead + Unpin>(r: &mut R, buf: &mut BytesMut) -> BenchResult<usize> {
    if buf.capacity() - buf.len() < READ_CHUNK / 4 {
        buf.reserve(READ_CHUNK);
    }
    Ok(r.read_buf(buf).await?)
}

/// Reads the next frame, waiting for more bytes as needed; end of stream is an error.
async fn read_frame<R: AsyncRead + Unpin>(r: &mut R, buf: &mut BytesMut) -> BenchResult<Bytes> {
    loop {
        if let Some(frame) = next_frame(buf)? {
            return Ok(frame);
        }
        if read_some(r, buf).await? == 0 {
            return Err("peer closed the connection in the middle of the exchange".into());
        }
    }
}

/// Sends `count` frames of `payload`, packed into writes of up to [`WRITE_BATCH`] bytes, then
/// flushes.
async fn send_frames<W: AsyncWrite + Unpin>(
    w: &mut W,
    payload: &[u8],
    count: u64,
) -> BenchResult<()> {
    let frame_len = FRAME_HEADER_LEN + payload.len();
    let mut batch = BytesMut::with_capacity(WRITE_BATCH.max(frame_len));
    for _ in 0..count {
        if batch.len() + frame_len > WRITE_BATCH && !batch.is_empty() {
            w.write_all(&batch).await?;
            batch.clear();
        }
        put_frame(&mut batch, payload)?;
    }
    if !batch.is_empty() {
        w.write_all(&batch).await?;
    }
    w.flush().await?;
    Ok(())
}

/// Parses and counts frames of [`PAYLOAD_LEN`] bytes until `count` have arrived; returns the
/// instant the last one was parsed. A short stream, a wrong size or extra bytes are errors.
async fn receive_frames<R: AsyncRead + Unpin>(r: &mut R, count: u64) -> BenchResult<Instant> {
    let mut buf = BytesMut::with_capacity(READ_CHUNK);
    let mut seen = 0u64;
    while seen < count {
        if read_some(r, &mut buf).await? == 0 {
            return Err(format!("stream ended after {seen} of {count} frames").into());
        }
        while let Some(frame) = next_frame(&mut buf)? {
            if frame.len() != PAYLOAD_LEN {
                return Err(
                    format!("frame of {} bytes, expected {PAYLOAD_LEN}", frame.len()).into(),
                );
            }
            seen += 1;
        }
    }
    let done = Instant::now();
    if seen != count || !buf.is_empty() {
        return Err(format!("received more than the {count} frames sent").into());
    }
    Ok(done)
}

/// Writes `total` bytes in [`BLOB_WRITE_LEN`] `write_all`s (the last one shorter when needed),
/// then flushes.
async fn write_blob<W: AsyncWrite + Unpin>(w: &mut W, total: u64) -> BenchResult<()> {
    let buf = vec![0xB7; BLOB_WRITE_LEN];
    let mut left = total;
    while left > 0 {
        let n = usize::try_from(left).map_or(BLOB_WRITE_LEN, |l| l.min(BLOB_WRITE_LEN));
        w.write_all(&buf[..n]).await?;
        left -= n as u64;
    }
    w.flush().await?;
    Ok(())
}

/// Reads into a [`BLOB_WRITE_LEN`] buffer until `total` bytes have arrived; returns the instant
/// the last one was read. A short stream or extra bytes in the last read are errors.
async fn read_blob<R: AsyncRead + Unpin>(r: &mut R, total: u64) -> BenchResult<Instant> {
    let mut buf = vec![0; BLOB_WRITE_LEN];
    let mut seen = 0u64;
    while seen < total {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            return Err(format!("stream ended after {seen} of {total} bytes").into());
        }
        seen += n as u64;
    }
    let done = Instant::now();
    if seen != total {
        return Err(format!("received {seen} bytes, more than the {total} sent").into());
    }
    Ok(done)
}

/// Client side of a ping-pong: `warmup` unmeasured and then `rounds` measured round trips of
/// one `payload` frame each, then a clean shutdown. Returns every measured round trip and the
/// wall time of the measured part.
async fn ping_pong(
    stream: &mut AuthenticatedStream,
    payload: &[u8],
    warmup: usize,
    rounds: usize,
) -> BenchResult<(Vec<Duration>, Duration)> {
    let mut out = BytesMut::with_capacity(FRAME_HEADER_LEN + payload.len());
    let mut input = BytesMut::with_capacity(READ_CHUNK);
    let mut samples = Vec::with_capacity(rounds);
    let mut measured_from = Instant::now();
    for i in 0..warmup + rounds {
        if i == warmup {
            measured_from = Instant::now();
        }
        let sent = Instant::now();
        out.clear();
        put_frame(&mut out, payload)?;
        stream.write_all(&out).await?;
        stream.flush().await?;
        let reply = read_frame(stream, &mut input).await?;
        let rtt = sent.elapsed();
        if reply.as_ref() != payload {
            return Err("the echo differs from the request".into());
        }
        if i >= warmup {
            samples.push(rtt);
        }
    }
    let elapsed = measured_from.elapsed();
    stream.shutdown().await?;
    Ok((samples, elapsed))
}

/// Server side of a ping-pong: echoes every frame back until the client shuts down; returns
/// how many it echoed.
async fn echo_frames(stream: &mut AuthenticatedStream) -> BenchResult<u64> {
    let mut input = BytesMut::with_capacity(READ_CHUNK);
    let mut out = BytesMut::with_capacity(READ_CHUNK);
    let mut echoed = 0u64;
    loop {
        while let Some(frame) = next_frame(&mut input)? {
            put_frame(&mut out, &frame)?;
            echoed += 1;
        }
        if !out.is_empty() {
            stream.write_all(&out).await?;
            stream.flush().await?;
            out.clear();
        }
        if read_some(stream, &mut input).await? == 0 {
            if input.is_empty() {
                return Ok(echoed);
            }
            return Err("stream ended inside a frame".into());
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Machine facts and memory
// ---------------------------------------------------------------------------------------------

/// Resets the process's peak RSS (`VmHWM`) to its current RSS; best effort (Linux ≥ 4.0).
fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// The process's peak RSS in kB, from `/proc/self/status`.
fn peak_rss_kb() -> Option<u64> {
    proc_status_kb("VmHWM:")
}

/// A `kB` field of `/proc/self/status`.
fn proc_status_kb(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    line.trim_start_matches(field)
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The negotiated TLS parameters, from one throwaway connection.
async fn describe_tls() -> BenchResult<String> {
    let mut ca = DevCa::new("vicus bench CA")?;
    let (client, _server) = connect_pair(&mut ca).await?;
    let show = |v: Option<String>| v.unwrap_or_else(|| "?".to_owned());
    Ok(format!(
        "{}, {}, {}",
        show(client.protocol_version().map(|v| format!("{v:?}"))),
        show(client.cipher_suite().map(|v| format!("{v:?}"))),
        show(client.key_exchange_group().map(|v| format!("{v:?}"))),
    ))
}

/// The markdown "machine" section: CPU, cores, kernel, runtime, workload sizes.
fn machine_facts(cfg: &BenchConfig, tls: &str, rss_reset: bool) -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map_or("unknown", |(_, v)| v.trim());
    let logical = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map_or_else(|_| "unknown".to_owned(), |s| s.trim().to_owned());
    let workers = tokio::runtime::Handle::current().metrics().num_workers();
    let profile = if cfg!(debug_assertions) {
        "debug (numbers are meaningless; use `cargo bench`)"
    } else {
        "release"
    };

    let mut s = String::new();
    let _ = writeln!(s, "## Machine\n");
    let _ = writeln!(s, "- CPU: {cpu}");
    let _ = writeln!(s, "- cores: {logical} (available to this process)");
    let _ = writeln!(s, "- kernel: Linux {kernel}");
    let _ = writeln!(s, "- runtime: tokio multi-thread, {workers} workers");
    let _ = writeln!(s, "- build: {profile}");
    let _ = writeln!(s, "- TLS: {tls}");
    let _ = writeln!(
        s,
        "- peak RSS: VmHWM, {}",
        if rss_reset {
            "reset before each scenario"
        } else {
            "NOT resettable here (cumulative since start)"
        }
    );
    let _ = writeln!(
        s,
        "- workload (VICUS_BENCH_SCALE={}): one_way N={}, ping_pong {} round trips after {} warm-up, fan_in {} clients x {} messages, blob {} bytes in {} byte writes",
        cfg.scale,
        cfg.one_way_messages(),
        cfg.round_trips(),
        WARMUP_ROUND_TRIPS,
        FAN_IN_CLIENTS,
        cfg.fan_in_messages_per_client(),
        cfg.blob_bytes(),
        BLOB_WRITE_LEN,
    );
    s
}

// ---------------------------------------------------------------------------------------------
// Table
// ---------------------------------------------------------------------------------------------

/// How a metric is printed.
#[derive(Clone, Copy)]
enum Unit {
    PerSecond,
    Micros,
    MiB,
    MiBPerSecond,
}

/// The metrics a measurement has, in table order.
fn metrics(m: &Measurement) -> Vec<(&'static str, Unit, f64)> {
    let mut out = vec![match m.bytes {
        Some(bytes) => (
            "MiB/s",
            Unit::MiBPerSecond,
            rate(bytes as f64 / MIB, m.elapsed),
        ),
        None => ("msg/s", Unit::PerSecond, m.per_second()),
    }];
    if let Some(l) = m.latency {
        out.push(("p50 µs", Unit::Micros, l.p50.as_secs_f64() * 1e6));
        out.push(("p99 µs", Unit::Micros, l.p99.as_secs_f64() * 1e6));
    }
    if let Some(kb) = m.peak_rss_kb {
        out.push(("peak RSS MiB", Unit::MiB, kb as f64 / 1024.0));
    }
    out
}

/// `value` in `unit`'s format.
fn format_value(unit: Unit, value: f64) -> String {
    match unit {
        Unit::PerSecond => thousands(value.round() as u64),
        Unit::Micros => format!("{value:.1}"),
        Unit::MiB | Unit::MiBPerSecond => format!("{value:.1}"),
    }
}

/// `1234567` as `1 234 567`.
fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(' ');
        }
        out.push(c);
    }
    out
}

/// Text safe inside a markdown table cell.
fn cell(text: &str) -> String {
    text.replace('|', "\\|").replace('\n', " ")
}

/// The results as a markdown table: one line per scenario and metric, with the vicus/raw ratio
/// (`-` while the vicus scenario is missing), or one error line per failed run.
fn render_table(rows: &[Row]) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "## Results\n");
    let _ = writeln!(s, "| scenario | metric | raw | vicus | vicus/raw |");
    let _ = writeln!(s, "|---|---|---:|---:|---:|");
    for row in rows {
        let vicus = row.vicus.as_ref().and_then(|v| v.as_ref().ok());
        let shape = match (&row.raw, vicus) {
            (Ok(raw), _) => Some(raw),
            (Err(_), Some(v)) => Some(v),
            (Err(_), None) => None,
        };
        if let Some(shape) = shape {
            for (name, unit, _) in metrics(shape) {
                let find = |m: &Measurement| {
                    metrics(m)
                        .into_iter()
                        .find(|(n, _, _)| *n == name)
                        .map(|(_, _, v)| v)
                };
                let raw_v = row.raw.as_ref().ok().and_then(find);
                let vicus_v = vicus.and_then(find);
                let show =
                    |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |v| format_value(unit, v));
                let ratio = match (raw_v, vicus_v) {
                    (Some(r), Some(v)) if r > 0.0 => format!("{:.2}", v / r),
                    _ => "-".to_owned(),
                };
                let _ = writeln!(
                    s,
                    "| {} | {name} | {} | {} | {ratio} |",
                    row.name,
                    show(raw_v),
                    show(vicus_v)
                );
            }
        }
        if let Err(e) = &row.raw {
            let _ = writeln!(s, "| {} | raw failed | {} | - | - |", row.name, cell(e));
        }
        if let Some(Err(e)) = &row.vicus {
            let _ = writeln!(s, "| {} | vicus failed | - | {} | - |", row.name, cell(e));
        }
    }
    let _ = writeln!(
        s,
        "\nmsg/s and MiB/s: higher is better (ping_pong counts round trips). µs and MiB: lower \
         is better. Peak RSS covers the whole process (client and server sides)."
    );
    s
}

/// The ping-pong-during-blob section: the round-trip latency of `during` (a blob streaming
/// between the same two domus) against `idle`, the vicus `ping_pong_64b` run (`None` when it
/// was not run).
fn render_during_blob(idle: Option<&Outcome>, during: &Outcome) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "## Ping-pong during a blob\n");
    let _ = writeln!(
        s,
        "vicus 64-byte request/reply round trips (primary callis) while one blob streams from \
         the same client domus to the same server domus (another taberna), against the idle \
         vicus ping_pong_64b run above. Target: p99 at most 3x idle.\n"
    );
    let _ = writeln!(s, "| metric | idle | during blob | during/idle |");
    let _ = writeln!(s, "|---|---:|---:|---:|");
    let idle = idle.map(|o| o.as_ref());
    let during_ok = during.as_ref().ok();
    let idle_ok = idle.and_then(|o| o.ok());
    let idle_latency = idle_ok.and_then(|m| m.latency);
    let during_latency = during_ok.and_then(|m| m.latency);
    let micros = |d: Duration| d.as_secs_f64() * 1e6;
    let show =
        |unit: Unit, v: Option<f64>| v.map_or_else(|| "-".to_owned(), |v| format_value(unit, v));
    let percentiles = [
        (
            "p50 µs",
            idle_latency.map(|l| micros(l.p50)),
            during_latency.map(|l| micros(l.p50)),
        ),
        (
            "p99 µs",
            idle_latency.map(|l| micros(l.p99)),
            during_latency.map(|l| micros(l.p99)),
        ),
    ];
    for (name, i, d) in percentiles {
        let ratio = match (i, d) {
            (Some(i), Some(d)) if i > 0.0 => format!("{:.2}", d / i),
            _ => "-".to_owned(),
        };
        let _ = writeln!(
            s,
            "| {name} | {} | {} | {ratio} |",
            show(Unit::Micros, i),
            show(Unit::Micros, d)
        );
    }
    let trips = |m: Option<&Measurement>| m.map(|m| m.messages as f64);
    let _ = writeln!(
        s,
        "| round trips measured | {} | {} | - |",
        show(Unit::PerSecond, trips(idle_ok)),
        show(Unit::PerSecond, trips(during_ok))
    );
    let rss = |m: Option<&Measurement>| m.and_then(|m| m.peak_rss_kb).map(|kb| kb as f64 / 1024.0);
    let _ = writeln!(
        s,
        "| peak RSS MiB | {} | {} | - |",
        show(Unit::MiB, rss(idle_ok)),
        show(Unit::MiB, rss(during_ok))
    );
    if let Some((bytes, elapsed)) = during_ok.and_then(|m| m.concurrent_blob) {
        let _ = writeln!(
            s,
            "| blob MiB/s ({:.0} MiB) | - | {} | - |",
            bytes as f64 / MIB,
            format_value(Unit::MiBPerSecond, rate(bytes as f64 / MIB, elapsed))
        );
    }
    match idle {
        None => {
            let _ = writeln!(s, "| idle not measured | no ping_pong_64b row | - | - |");
        }
        Some(Err(e)) => {
            let _ = writeln!(s, "| idle not measured | {} | - | - |", cell(e));
        }
        Some(Ok(_)) => {}
    }
    if let Err(e) = during {
        let _ = writeln!(s, "| during blob not measured | - | {} | - |", cell(e));
    }
    s
}
