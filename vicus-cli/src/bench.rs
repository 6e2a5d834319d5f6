//! `vicus bench`: load between two nodes — pipelined one-way sends (W1) and request/reply
//! round trips (W2) — with a progress line on a terminal and a result table at the end, the
//! figures named and computed as the benchmark harness (bench/, meshbench) reports them:
//! `msgs_per_s`, `mb_per_s`, `cpu_us_per_msg`, `p50_us`, `p99_us`, `p999_us`, ….
//!
//! With `--to ADDR` it loads a running node (a `vicus node` with a sink taberna for one-way
//! and an echo taberna for request/reply); without it, it starts a node of its own in this
//! process (certificates minted in memory) and loads that over loopback TLS. It must not
//! report a figure it did not measure: lost sends are counted and shown, and a run where
//! nothing was acknowledged is an error.

use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::{Args as ClapArgs, ValueEnum};
use serde_json::json;
use vicus::dev_certs::DevCa;
use vicus::{AuthConfig, Delivery, Domus, DomusAddr, DomusId, MessageType, SendOptions, TabernaId};

use crate::client::{IdentityArgs, client_domus, parse_addr, parse_duration, parse_identity};
use crate::output::{CliError, Output};

/// The message type the bench sends (the one every `vicus` command uses).
const KIND: MessageType = crate::client::MESSAGE_TYPE;

/// Which workloads to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// Pipelined one-way sends to a sink (W1).
    Oneway,
    /// One request at a time to an echo (W2).
    Reqrep,
    /// Both, one after the other.
    Both,
}

/// `vicus bench`.
#[derive(Debug, ClapArgs)]
#[command(after_help = "Examples:\n  \
    vicus bench                                   # a node of its own, over loopback TLS\n  \
    vicus bench --to 127.0.0.1:7000 --certs certs --as client --duration 10s\n  \
    vicus bench --mode oneway --size 1024 --window 512 --json")]
pub struct Args {
    /// The node to load; without it, bench starts one in this process.
    #[arg(long, value_name = "ADDR", value_parser = parse_addr)]
    to: Option<DomusAddr>,
    /// The identity the node must prove (e.g. spiffe://vicus.dev/domus/alpha); without it the
    /// first identity seen at ADDR is trusted for this run.
    #[arg(long, value_name = "SPIFFE_ID", requires = "to", value_parser = parse_identity)]
    identity: Option<DomusId>,
    #[command(flatten)]
    who: IdentityArgs,
    /// The node's taberna that accepts one-way sends (a `behaviour = "sink"` taberna; 8 in
    /// vicus-cli/examples/node.toml).
    #[arg(long, default_value_t = 8)]
    sink: u64,
    /// The node's taberna that answers with the payload (`behaviour = "echo"`; 7 in the
    /// example).
    #[arg(long, default_value_t = 7)]
    echo: u64,
    /// Which workloads to run.
    #[arg(long, value_enum, default_value_t = Mode::Both)]
    mode: Mode,
    /// Payload bytes per message.
    #[arg(long, default_value_t = 64)]
    size: usize,
    /// One-way sends kept in flight.
    #[arg(long, default_value_t = 256)]
    window: usize,
    /// How long each workload runs (e.g. 5s, 500ms).
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    duration: Duration,
    /// How long one send may wait for its answer.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    timeout: Duration,
}

/// One workload's figures.
struct Figures {
    workload: &'static str,
    fields: Vec<(&'static str, serde_json::Value)>,
}

impl Figures {
    fn get_f64(&self, name: &str) -> f64 {
        self.fields
            .iter()
            .find(|(n, _)| *n == name)
            .and_then(|(_, v)| v.as_f64())
            .unwrap_or(0.0)
    }
}

/// Runs `vicus bench`.
pub async fn run(args: Args, out: Output) -> Result<(), CliError> {
    if args.size > 1 << 20 {
        return Err(CliError::new(format!(
            "--size {} is over 1 MiB; send large data with `vicus send --blob`",
            args.size
        )));
    }
    if args.window == 0 || args.window > vicus::Window::MAX_LIMIT {
        return Err(CliError::new(format!(
            "--window must be 1..={}",
            vicus::Window::MAX_LIMIT
        )));
    }
    let (client, local) = match &args.to {
        Some(addr) => (connect(&args, addr).await?, None),
        None => {
            let (client, node) = local_pair(&args).await?;
            (client, Some(node))
        }
    };
    let target = match &args.to {
        Some(addr) => addr.to_string(),
        None => "a node in this process (loopback TLS)".to_owned(),
    };
    out.line(&format!(
        "vicus bench: {} as {}, {} B payloads, {:?} per workload",
        target,
        client.identity(),
        args.size,
        args.duration
    ));
    let mut results = Vec::new();
    if matches!(args.mode, Mode::Oneway | Mode::Both) {
        results.push(one_way(&client, &args, out).await?);
    }
    if matches!(args.mode, Mode::Reqrep | Mode::Both) {
        results.push(round_trips(&client, &args, out).await?);
    }
    client.shutdown().await;
    if let Some(node) = local {
        node.shutdown().await;
    }
    report(&results, out);
    Ok(())
}

/// A dial-only domus routed to the node at `addr`.
async fn connect(args: &Args, addr: &DomusAddr) -> Result<Domus, CliError> {
    client_domus(args.who.auth()?, &routes(args, addr, args.identity.clone())).await
}

/// The bench's two tabernas (sink and echo) routed to the node at `addr`.
fn routes(
    args: &Args,
    addr: &DomusAddr,
    identity: Option<DomusId>,
) -> Vec<(TabernaId, DomusAddr, Option<DomusId>)> {
    [args.sink, args.echo]
        .into_iter()
        .map(|t| (TabernaId(t), addr.clone(), identity.clone()))
        .collect()
}

/// A node with a sink and an echo, and a client routed to it, both in this process.
async fn local_pair(args: &Args) -> Result<(Domus, Domus), CliError> {
    let mut ca = DevCa::new("vicus bench CA (development only)")?;
    let node_auth: AuthConfig = ca.domus_auth("bench-node")?.0;
    let client_auth: AuthConfig = ca.domus_auth("bench-client")?.0;
    let node = Domus::builder(node_auth).build().await?;
    let sink = node.taberna(TabernaId(args.sink))?;
    let echo = node.taberna(TabernaId(args.echo))?;
    tokio::spawn(async move {
        let mut batch = Vec::new();
        while sink.recv_many(&mut batch, 256).await > 0 {
            for req in batch.drain(..) {
                req.accept();
            }
        }
    });
    tokio::spawn(async move {
        while let Some(req) = echo.recv().await {
            let payload = req.payload().clone();
            req.reply(payload);
        }
    });
    let addr = node
        .local_addr()
        .cloned()
        .ok_or_else(|| CliError::new("the bench node did not bind an address"))?;
    let client = client_domus(
        client_auth,
        &routes(args, &addr, Some(node.identity().clone())),
    )
    .await?;
    Ok((client, node))
}

/// The process's CPU time (user + system) from /proc/self/stat, on Linux.
fn cpu_time() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which is in parentheses and may contain spaces).
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13 after the name.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    // /proc reports in USER_HZ, which Linux fixes at 100 for user space.
    Some(Duration::from_millis((utime + stime) * 10))
}

fn failure_line(failures: &std::collections::BTreeMap<String, u64>) -> String {
    failures
        .iter()
        .map(|(id, n)| format!("{n} × {id}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// W1: pipelined one-way sends for `duration`, `window` in flight.
async fn one_way(client: &Domus, args: &Args, out: Output) -> Result<Figures, CliError> {
    let payload = Bytes::from(vec![0x5a; args.size]);
    let options = SendOptions::default().timeout(args.timeout);
    let mut window = client.destination(TabernaId(args.sink)).window(args.window);
    let mut failures = std::collections::BTreeMap::<String, u64>::new();
    let mut settle = |acked: &mut u64, r: Result<Delivery, vicus::Error>| match r {
        Ok(_) => *acked += 1,
        Err(e) => *failures.entry(e.id().name().to_owned()).or_default() += 1,
    };
    // A short warm-up: the callis is dialled and the first sends go through.
    let first = client
        .send(TabernaId(args.sink), KIND, payload.clone(), options.clone())
        .await
        .map_err(|e| CliError::new(format!("the first one-way send failed: {e}")))?;
    let _ = first;
    let cpu0 = cpu_time();
    let t0 = Instant::now();
    let mut sent = 0u64;
    let mut acked = 0u64;
    let mut last_progress = t0;
    while t0.elapsed() < args.duration {
        match window
            .send_with(KIND, payload.clone(), options.clone())
            .await
        {
            Ok(Some(r)) => settle(&mut acked, r),
            Ok(None) => {}
            Err(e) => settle(&mut acked, Err(e)),
        }
        sent += 1;
        if last_progress.elapsed() >= Duration::from_millis(250) {
            last_progress = Instant::now();
            let secs = t0.elapsed().as_secs_f64();
            out.progress(&format!(
                "one-way  {:>10} acked  {:>12.0} msg/s  {:>5.1} s",
                acked,
                acked as f64 / secs.max(1e-9),
                secs
            ));
        }
    }
    while let Some(r) = window.next().await {
        settle(&mut acked, r);
    }
    let wall = t0.elapsed();
    let cpu = cpu0.zip(cpu_time()).map(|(a, b)| b.saturating_sub(a));
    out.progress_done();
    if acked == 0 {
        return Err(CliError::new(format!(
            "no one-way send was acknowledged ({}); is taberna {} a sink on the node?",
            failure_line(&failures),
            args.sink
        )));
    }
    let secs = wall.as_secs_f64();
    let mut fields = vec![
        ("msgs", json!(sent)),
        ("size", json!(args.size)),
        ("window", json!(args.window)),
        ("acked", json!(acked)),
        ("lost", json!(sent.saturating_sub(acked))),
        ("secs", json!(secs)),
        ("msgs_per_s", json!(acked as f64 / secs)),
        (
            "mb_per_s",
            json!(acked as f64 * args.size as f64 / 1e6 / secs),
        ),
    ];
    if let Some(cpu) = cpu {
        fields.push(("cpu_s", json!(cpu.as_secs_f64())));
        fields.push((
            "cpu_us_per_msg",
            json!(cpu.as_secs_f64() * 1e6 / acked as f64),
        ));
    }
    if !failures.is_empty() {
        fields.push(("errors", json!(failure_line(&failures))));
    }
    Ok(Figures {
        workload: "w1",
        fields,
    })
}

/// W2: one request at a time for `duration`; latency percentiles.
async fn round_trips(client: &Domus, args: &Args, out: Output) -> Result<Figures, CliError> {
    let payload = Bytes::from(vec![0xa5; args.size]);
    let options = SendOptions::default().timeout(args.timeout);
    let destination = client.destination(TabernaId(args.echo));
    let mut failures = std::collections::BTreeMap::<String, u64>::new();
    destination
        .send_with(KIND, payload.clone(), options.clone())
        .await
        .map_err(|e| CliError::new(format!("the first request failed: {e}")))?;
    let mut samples: Vec<u64> = Vec::new();
    let t0 = Instant::now();
    let mut last_progress = t0;
    while t0.elapsed() < args.duration && samples.len() < 10_000_000 {
        let t = Instant::now();
        match destination
            .send_with(KIND, payload.clone(), options.clone())
            .await
        {
            Ok(_) => samples.push(u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX)),
            Err(e) => *failures.entry(e.id().name().to_owned()).or_default() += 1,
        }
        if last_progress.elapsed() >= Duration::from_millis(250) {
            last_progress = Instant::now();
            out.progress(&format!(
                "req/reply {:>9} round trips  {:>5.1} s",
                samples.len(),
                t0.elapsed().as_secs_f64()
            ));
        }
    }
    out.progress_done();
    if samples.is_empty() {
        return Err(CliError::new(format!(
            "no request was answered ({}); is taberna {} an echo on the node?",
            failure_line(&failures),
            args.echo
        )));
    }
    samples.sort_unstable();
    let pct = |q: f64| -> f64 {
        let n = samples.len();
        let idx = ((n as f64 * q).ceil() as usize).clamp(1, n) - 1;
        samples.get(idx).copied().unwrap_or(0) as f64 / 1000.0
    };
    let mean = samples.iter().map(|&x| x as f64).sum::<f64>() / samples.len() as f64 / 1000.0;
    let mut fields = vec![
        ("iters", json!(samples.len())),
        ("size", json!(args.size)),
        ("p50_us", json!(pct(0.50))),
        ("p99_us", json!(pct(0.99))),
        ("p999_us", json!(pct(0.999))),
        ("mean_us", json!(mean)),
        (
            "min_us",
            json!(samples.first().copied().unwrap_or(0) as f64 / 1000.0),
        ),
        (
            "max_us",
            json!(samples.last().copied().unwrap_or(0) as f64 / 1000.0),
        ),
    ];
    if !failures.is_empty() {
        fields.push(("errors", json!(failure_line(&failures))));
    }
    Ok(Figures {
        workload: "w2",
        fields,
    })
}

/// The result table, or one JSON line per workload (the harness's shape: `workload`,
/// `impl`, then the figures).
fn report(results: &[Figures], out: Output) {
    if out.json {
        for r in results {
            let mut line = serde_json::Map::new();
            line.insert("workload".into(), json!(r.workload));
            line.insert("impl".into(), json!("vicus-cli"));
            for (k, v) in &r.fields {
                line.insert((*k).into(), v.clone());
            }
            out.result("", &serde_json::Value::Object(line));
        }
        return;
    }
    for r in results {
        let title = match r.workload {
            "w1" => format!(
                "W1 one-way, {} B, window {}",
                r.get_f64("size"),
                r.get_f64("window")
            ),
            _ => format!("W2 request/reply, {} B", r.get_f64("size")),
        };
        out.line(&out.bold(&title));
        for (k, v) in &r.fields {
            let shown = match v.as_f64() {
                Some(f) if v.is_f64() => format!("{f:.2}"),
                _ => v.to_string().trim_matches('"').to_owned(),
            };
            out.line(&format!("  {k:<16} {shown:>14}"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_has_a_cpu_time_on_linux() {
        if cfg!(target_os = "linux") {
            let mut x = 0u64;
            for i in 0..5_000_000u64 {
                x = x.wrapping_mul(31).wrapping_add(i);
            }
            assert!(x != 1);
            assert!(cpu_time().is_some());
        }
    }
}
