//! `vicus ping`: round-trip times to a taberna, one request at a time, with min, p50, p99,
//! max and losses at the end. The first request opens the connection (TCP, TLS, HELLO) and is
//! timed on its own, so the statistics are of round trips on an open callis.

use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use clap::Args;
use serde_json::json;
use tokio::signal::unix::{SignalKind, signal};
use vicus::{Delivery, Domus, DomusId, SendOptions};

use crate::client::{MESSAGE_TYPE, TabernaTarget, millis, parse_duration, show_duration};
use crate::output::{CliError, Output};

/// The most requests one run sends.
const MAX_COUNT: u32 = 1_000_000;
/// The largest payload a ping carries (well under the default message limit).
const MAX_SIZE: usize = 64 * 1024;

/// `vicus ping`.
#[derive(Debug, Args)]
#[command(after_help = "Examples:
  vicus ping --to 127.0.0.1:7000 --taberna 7 --certs ./certs --as client
  vicus ping --to 127.0.0.1:7000 --taberna 7 --certs ./certs --as client --count 100 --interval 10ms
  vicus --json ping --to node.internal:7000 --taberna 7 --ca ca.pem --cert me.pem --key me.key

Point it at an echo taberna (a reply is checked against what was sent); a taberna that accepts
counts too. The first request opens the connection and is reported as `connected in …`, not
counted. Ctrl-C stops early and prints the summary. Exits 1 when nothing was answered.")]
pub struct PingArgs {
    #[command(flatten)]
    target: TabernaTarget,
    /// How many requests to time.
    #[arg(long, short, value_name = "N", default_value_t = 10)]
    count: u32,
    /// The pause between an answer and the next request.
    #[arg(long, short, value_name = "DURATION", default_value = "200ms", value_parser = parse_duration)]
    interval: Duration,
    /// How long to wait for each answer before counting it lost.
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = parse_duration)]
    timeout: Duration,
    /// Payload bytes per request (8 to 65536): a sequence number, then padding.
    #[arg(long, value_name = "BYTES", default_value_t = 32)]
    size: usize,
}

/// What the timed requests came back with.
#[derive(Debug, Default)]
struct Tally {
    rtts: Vec<Duration>,
    replied: u64,
    accepted: u64,
    mismatched: u64,
    lost: u64,
}

/// Runs `vicus ping`.
pub async fn run(args: PingArgs, out: Output) -> Result<(), CliError> {
    if !(1..=MAX_COUNT).contains(&args.count) {
        return Err(CliError::new(format!(
            "--count {}: give 1 to {MAX_COUNT}",
            args.count
        )));
    }
    if !(8..=MAX_SIZE).contains(&args.size) {
        return Err(CliError::new(format!(
            "--size {}: give 8 to {MAX_SIZE} bytes",
            args.size
        )));
    }
    if !(Duration::from_millis(1)..=Duration::from_secs(3600)).contains(&args.timeout) {
        return Err(CliError::new(format!(
            "--timeout {:?}: give 1ms to 1h",
            args.timeout
        )));
    }
    let mut sigint = signal(SignalKind::interrupt())
        .map_err(|e| CliError::new(format!("cannot handle Ctrl-C: {e}")))?;
    let domus = args.target.client().await?;
    let result = ping(&domus, &args, out, &mut sigint).await;
    let peer = domus.reporting().connected_peers().into_iter().next();
    domus.shutdown().await;
    let (connect, tally, interrupted) = result?;
    summary(&args, out, peer.as_ref(), connect, tally, interrupted)
}

/// The connect time, what the timed requests got, and whether Ctrl-C cut the run short.
async fn ping(
    domus: &Domus,
    args: &PingArgs,
    out: Output,
    sigint: &mut tokio::signal::unix::Signal,
) -> Result<(Duration, Tally, bool), CliError> {
    let taberna = args.target.taberna();
    let options = SendOptions::default().timeout(args.timeout);
    let request = |seq: u64| {
        let mut payload = BytesMut::with_capacity(args.size);
        payload.put_u64(seq);
        payload.resize(args.size, b'.');
        payload.freeze()
    };
    let started = Instant::now();
    let first = domus.send(taberna, MESSAGE_TYPE, request(0), options.clone());
    let first = tokio::select! {
        outcome = first => outcome,
        _ = sigint.recv() => return Err(CliError::new("interrupted before the first answer")),
    };
    first.map_err(|e| {
        CliError::new(format!(
            "cannot reach taberna {} at {}: {e}",
            args.target.taberna, args.target.to
        ))
    })?;
    let connect = started.elapsed();
    let mut tally = Tally::default();
    let mut interrupted = false;
    // Whether a progress line is open on the terminal (to end before another line).
    let mut progress = false;
    for seq in 1..=u64::from(args.count) {
        let payload: Bytes = request(seq);
        let sent_at = Instant::now();
        let send = domus.send(taberna, MESSAGE_TYPE, payload.clone(), options.clone());
        let outcome = tokio::select! {
            outcome = send => outcome,
            _ = sigint.recv() => { interrupted = true; break; }
        };
        let rtt = sent_at.elapsed();
        let line = match outcome {
            Ok(delivery) => {
                tally.rtts.push(rtt);
                let how = match delivery {
                    Delivery::Replied(reply) if reply == payload => {
                        tally.replied += 1;
                        "replied"
                    }
                    Delivery::Replied(_) => {
                        tally.replied += 1;
                        tally.mismatched += 1;
                        "replied with other bytes"
                    }
                    Delivery::Accepted => {
                        tally.accepted += 1;
                        "accepted"
                    }
                };
                format!("seq={seq} {} {how}", show_duration(rtt))
            }
            Err(e) => {
                tally.lost += 1;
                if std::mem::take(&mut progress) {
                    out.progress_done();
                }
                out.line(&format!("seq={seq} lost: {e}"));
                continue;
            }
        };
        if out.tty {
            progress = true;
            out.progress(&format!("ping {seq}/{}: {line}", args.count));
        } else {
            out.line(&line);
        }
        if seq < u64::from(args.count) {
            tokio::select! {
                () = tokio::time::sleep(args.interval) => {}
                _ = sigint.recv() => { interrupted = true; break; }
            }
        }
    }
    if progress {
        out.progress_done();
    }
    Ok((connect, tally, interrupted))
}

/// The nearest-rank `q` quantile of sorted `values`.
fn quantile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn summary(
    args: &PingArgs,
    out: Output,
    peer: Option<&DomusId>,
    connect: Duration,
    mut tally: Tally,
    interrupted: bool,
) -> Result<(), CliError> {
    let answered = tally.rtts.len() as u64;
    let sent = answered + tally.lost;
    if answered == 0 {
        return Err(CliError::new(format!(
            "no answer from taberna {} at {}: all {sent} request(s) lost (see the lines above)",
            args.target.taberna, args.target.to
        )));
    }
    let rtts_ms: Vec<f64> = tally.rtts.iter().copied().map(millis).collect();
    tally.rtts.sort_unstable();
    let (min, max) = (tally.rtts[0], tally.rtts[tally.rtts.len() - 1]);
    let (p50, p99) = (quantile(&tally.rtts, 0.50), quantile(&tally.rtts, 0.99));
    let who = peer.map(|p| format!(" ({p})")).unwrap_or_default();
    let mut text = format!(
        "--- taberna {} at {}{who} ---\n{sent} sent, {answered} answered ({} replied, {} accepted), {} lost{}; connected in {}\nrtt min {} p50 {} p99 {} max {}",
        args.target.taberna,
        args.target.to,
        tally.replied,
        tally.accepted,
        tally.lost,
        if interrupted { ", interrupted" } else { "" },
        show_duration(connect),
        show_duration(min),
        show_duration(p50),
        show_duration(p99),
        show_duration(max),
    );
    if tally.mismatched > 0 {
        text.push_str(&format!(
            "\n{} repl(ies) differed from the request: is this an echo taberna?",
            tally.mismatched
        ));
    }
    out.result(
        &text,
        &json!({
            "taberna": args.target.taberna,
            "to": args.target.to.to_string(),
            "peer": peer.map(DomusId::as_str),
            "sent": sent,
            "answered": answered,
            "replied": tally.replied,
            "accepted": tally.accepted,
            "mismatched": tally.mismatched,
            "lost": tally.lost,
            "interrupted": interrupted,
            "connect_ms": millis(connect),
            "min_ms": millis(min),
            "p50_ms": millis(p50),
            "p99_ms": millis(p99),
            "max_ms": millis(max),
            "rtts_ms": rtts_ms,
        }),
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_nearest_rank() {
        let ms = |n: u64| Duration::from_millis(n);
        let v: Vec<Duration> = (1..=100).map(ms).collect();
        assert_eq!(quantile(&v, 0.50), ms(50));
        assert_eq!(quantile(&v, 0.99), ms(99));
        assert_eq!(quantile(&v[..1], 0.99), ms(1));
        assert_eq!(quantile(&v[..5], 0.50), ms(3));
        assert_eq!(quantile(&v[..5], 0.99), ms(5));
        assert_eq!(quantile(&[], 0.5), Duration::ZERO);
    }
}
