//! `vicus pub` and `vicus sub`: publish to a topic from a client that dials one node, or
//! subscribe to a pattern at one node and print what it publishes — through the library's
//! topic service (`vicus::services::topics`), over the same mutual TLS as every command.
//!
//! A client reaches the subscribers a node announces to it (the node's own subscriptions)
//! when it publishes, and the publishes of that node when it subscribes: topics have no
//! broker, and a client that dials one node knows only that node. This module must not
//! print anything but through [`crate::output`], and must not wait without a deadline.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Args;
use serde_json::{Value, json};
use vicus::services::topics::{CopyOutcome, Topics, TopicsConfig};
use vicus::{Domus, DomusAddr, DomusId, SimpleResolver};

use crate::client::{
    IdentityArgs, MESSAGE_TYPE, parse_addr, parse_duration, parse_identity, show_duration,
};
use crate::output::{CliError, Output};

/// Where the node is and who it is (its identity is needed: topics address domus, not
/// tabernas).
#[derive(Debug, Args)]
pub struct NodeTarget {
    /// The node's address: host:port, ip:port, [v6]:port or unix:/path.
    #[arg(long, value_name = "ADDR", value_parser = parse_addr)]
    to: DomusAddr,
    /// The node's identity (as `vicus node` prints it at start), e.g.
    /// spiffe://vicus.dev/domus/alpha.
    #[arg(long, value_name = "SPIFFE_ID", value_parser = parse_identity)]
    identity: DomusId,
    #[command(flatten)]
    who: IdentityArgs,
}

impl NodeTarget {
    /// A dial-only client domus that reaches the node by its identity, and its topic service.
    async fn start(&self, config: TopicsConfig) -> Result<(Domus, Topics), CliError> {
        let resolver = Arc::new(SimpleResolver::new());
        resolver.insert_domus(self.identity.clone(), self.to.clone());
        let domus = Domus::builder(self.who.auth()?)
            .dial_only()
            .resolver(resolver)
            .build()
            .await
            .map_err(|e| CliError::new(format!("cannot start the client: {e}")))?;
        let topics = Topics::start(&domus, config)?;
        Ok((domus, topics))
    }
}

/// `vicus pub`.
#[derive(Debug, Args)]
#[command(after_help = "Examples:
  vicus pub orders.eu.new 'order 42' --to 127.0.0.1:7000 --identity spiffe://vicus.dev/domus/alpha --certs ./certs --as client
  vicus --json pub metrics.cpu 0.93 --count 10 --to 127.0.0.1:7000 --identity spiffe://vicus.dev/domus/alpha --certs ./certs --as client

Meets the node (it announces its subscriptions to this client), waits until they arrived
(at most --settle), publishes MESSAGE --count times and prints, per publish, each subscriber
and what became of its copy. Exits 1 when a copy was not delivered.")]
pub struct PubArgs {
    /// The topic (dot-separated, no wildcards).
    topic: String,
    /// The message (UTF-8 text).
    message: String,
    #[command(flatten)]
    node: NodeTarget,
    /// How many times to publish it.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    count: u32,
    /// How long to wait for the node's subscriptions after meeting it.
    #[arg(long, value_name = "DURATION", default_value = "2s", value_parser = parse_duration)]
    settle: Duration,
    /// The deadline of each copy.
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = parse_duration)]
    timeout: Duration,
}

/// Runs `vicus pub`.
pub async fn run_pub(args: PubArgs, out: Output) -> Result<(), CliError> {
    if args.settle > Duration::from_secs(60) {
        return Err(CliError::new("--settle: at most 1m"));
    }
    if !(Duration::from_millis(1)..=Duration::from_secs(3600)).contains(&args.timeout) {
        return Err(CliError::new("--timeout: give 1ms to 1h"));
    }
    let (domus, topics) = args
        .node
        .start(TopicsConfig::default().copy_timeout(args.timeout))
        .await?;
    let result = publish(&args, &topics, out).await;
    drop(topics);
    domus.shutdown().await;
    result
}

async fn publish(args: &PubArgs, topics: &Topics, out: Output) -> Result<(), CliError> {
    let node = &args.node.identity;
    topics.meet(node).await.map_err(|e| {
        CliError::new(format!(
            "cannot meet {node} at {}: {e} (does it run the topic service: [topics] in its config?)",
            args.node.to
        ))
    })?;
    let settle_until = Instant::now() + args.settle;
    while topics.stats().subscriptions == 0 && Instant::now() < settle_until {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let publisher = topics.publisher(&args.topic)?;
    let mut failed = 0usize;
    for n in 1..=args.count {
        let started = Instant::now();
        let report = publisher
            .publish(MESSAGE_TYPE, Bytes::from(args.message.clone()))
            .await?;
        let elapsed = started.elapsed();
        let mut copies = Vec::new();
        let mut lines = Vec::new();
        for (subscriber, outcome) in report.copies() {
            let (what, detail) = match outcome {
                CopyOutcome::Accepted => ("accepted", Value::Null),
                CopyOutcome::Replied(reply) => (
                    "replied",
                    Value::from(String::from_utf8_lossy(reply.payload()).into_owned()),
                ),
                CopyOutcome::Rejected(e) => ("rejected", Value::from(e.to_string())),
                CopyOutcome::NotDelivered(e) => ("not delivered", Value::from(e.to_string())),
                _ => ("other", Value::Null),
            };
            if !outcome.is_delivered() {
                failed += 1;
            }
            lines.push(match &detail {
                Value::String(s) => format!("  {subscriber}: {what}: {s}"),
                _ => format!("  {subscriber}: {what}"),
            });
            copies.push(json!({
                "subscriber": subscriber.as_str(),
                "outcome": what,
                "detail": detail,
                "outcome_unknown": outcome.error().is_some_and(vicus::Error::outcome_unknown),
            }));
        }
        let head = match report.recipients() {
            0 => format!("publish {n} to {}: no subscribers", args.topic),
            k => format!(
                "publish {n} to {}: {} of {k} subscribers took it in {}",
                args.topic,
                report.delivered(),
                show_duration(elapsed)
            ),
        };
        let text = std::iter::once(head)
            .chain(lines)
            .collect::<Vec<_>>()
            .join("\n");
        out.result(
            &text,
            &json!({
                "publish": n,
                "topic": args.topic,
                "recipients": report.recipients(),
                "delivered": report.delivered(),
                "copies": copies,
                "elapsed_ms": crate::client::millis(elapsed),
            }),
        );
    }
    if failed > 0 {
        return Err(CliError::new(format!("{failed} copies were not delivered")));
    }
    Ok(())
}

/// `vicus sub`.
#[derive(Debug, Args)]
#[command(after_help = "Examples:
  vicus sub 'orders.>' --to 127.0.0.1:7000 --identity spiffe://vicus.dev/domus/alpha --certs ./certs --as client
  vicus --json sub 'metrics.*' --count 5 --to 127.0.0.1:7000 --identity spiffe://vicus.dev/domus/alpha --certs ./certs --as client

Subscribes at the node (the grant is printed first) and prints each copy it publishes — the
topic, the publisher and the message — accepting it (or replying with --reply). Stops after
--count copies, after --for, or on Ctrl-C.")]
pub struct SubArgs {
    /// The pattern: a topic, or one with `*` (one segment) and `>` (the rest).
    pattern: String,
    #[command(flatten)]
    node: NodeTarget,
    /// Stop after this many copies.
    #[arg(long)]
    count: Option<u64>,
    /// Stop after this long.
    #[arg(long = "for", value_name = "DURATION", value_parser = parse_duration)]
    duration: Option<Duration>,
    /// Answer each copy with this reply instead of accepting it.
    #[arg(long, value_name = "TEXT")]
    reply: Option<String>,
}

/// Runs `vicus sub`.
pub async fn run_sub(args: SubArgs, out: Output) -> Result<(), CliError> {
    let config = TopicsConfig::default().publisher(args.node.identity.clone());
    let (domus, topics) = args.node.start(config).await?;
    let result = subscribe(&args, &topics, out).await;
    drop(topics);
    domus.shutdown().await;
    result
}

async fn subscribe(args: &SubArgs, topics: &Topics, out: Output) -> Result<(), CliError> {
    let node = &args.node.identity;
    let mut sub = topics.subscribe(&args.pattern).await?;
    match sub.grants().iter().find(|(p, _)| p == node) {
        Some((_, vicus::services::topics::Grant::Granted { lease })) => out.result(
            &format!("subscribed to {} at {node} (lease {lease:?})", args.pattern),
            &json!({"event": "subscribed", "pattern": args.pattern, "publisher": node.as_str(),
                    "lease_ms": lease.as_millis()}),
        ),
        other => {
            return Err(CliError::new(format!(
                "{node} did not grant {}: {other:?}",
                args.pattern
            )));
        }
    }
    let until = args.duration.map(|d| tokio::time::Instant::now() + d);
    let mut seen = 0u64;
    loop {
        if args.count.is_some_and(|c| seen >= c) {
            return Ok(());
        }
        let next = async {
            match until {
                Some(at) => tokio::time::timeout_at(at, sub.recv()).await.ok(),
                None => Some(sub.recv().await),
            }
        };
        let message = tokio::select! {
            m = next => m,
            _ = tokio::signal::ctrl_c() => None,
        };
        let Some(Some(message)) = message else {
            return Ok(());
        };
        seen += 1;
        let text = String::from_utf8_lossy(message.payload()).into_owned();
        out.result(
            &format!(
                "{} from {}: {text}",
                message.topic(),
                message.publisher().id()
            ),
            &json!({
                "event": "copy",
                "topic": message.topic().as_str(),
                "publisher": message.publisher().id().as_str(),
                "type": message.message_type().0,
                "message": text,
                "len": message.payload().len(),
            }),
        );
        match &args.reply {
            Some(reply) => message.reply(Bytes::from(reply.clone())),
            None => message.accept(),
        }
    }
}
