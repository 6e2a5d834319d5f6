//! `vicus`: the command-line tool that comes with the vicus library — development
//! certificates, a node run from a config file, one-shot sends and pings, a load generator, a
//! live three-node demo and `vicus top`, a terminal view of a running node.
//!
//! Every subcommand prints a one-line error that says what to fix and exits non-zero
//! (1 for a failure, 2 for a command line clap refused), and prints machine-readable output
//! with `--json`. Progress lines and colours appear only when stdout is a terminal. This crate
//! must not pull CLI dependencies into the library: it only uses the library's public API.

mod bench;
mod certs;
mod client;
mod demo;
mod http;
mod node;
mod node_topics;
mod output;
mod ping;
mod send;
mod top;
mod topics;

use clap::{Parser, Subcommand};

use crate::output::{CliError, Output};

/// The vicus command: certificates, nodes, sends, pings, load, a demo mesh and a live view.
#[derive(Debug, Parser)]
#[command(name = "vicus", version, about, propagate_version = true)]
struct Cli {
    /// Print machine-readable JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// INSECURE development certificates: a CA (`certs init`) and node certificates
    /// (`certs issue NAME`).
    Certs(certs::CertsArgs),
    /// Run a node from a config file: tabernas with built-in behaviours, routes, certificate
    /// reload, events printed as they happen.
    Node(node::NodeArgs),
    /// Send one message, or a file as a blob, to a taberna and print the outcome.
    Send(send::SendArgs),
    /// Publish a message to a topic: reaches the subscribers a node announces to this client
    /// (its [topics] subscriptions), with each one's outcome.
    Pub(topics::PubArgs),
    /// Subscribe to a topic pattern at a node and print each copy it publishes.
    Sub(topics::SubArgs),
    /// Round-trip times to a taberna, with min, p50, p99 and max at the end.
    Ping(ping::PingArgs),
    /// Load a node: pipelined one-way sends and request/reply round trips, with the figures
    /// the benchmark harness reports.
    Bench(bench::Args),
    /// A live terminal view of a running node (peers, rates, queues, blob streams, errors,
    /// events), read over vicus from the node's reporting service.
    Top(top::Args),
    /// Three nodes on loopback in this process, certificates minted at start, traffic
    /// between all of them and a live view.
    Demo(demo::Args),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let out = Output::new(cli.json);
    let result: Result<(), CliError> = match cli.command {
        Command::Certs(args) => certs::run(args, out),
        Command::Node(args) => client::block_on(node::run(args, out)),
        Command::Send(args) => client::block_on(send::run(args, out)),
        Command::Ping(args) => client::block_on(ping::run(args, out)),
        Command::Bench(args) => client::block_on(bench::run(args, out)),
        Command::Top(args) => client::block_on(top::run(args, out)),
        Command::Demo(args) => client::block_on(demo::run(args, out)),
        Command::Pub(args) => client::block_on(topics::run_pub(args, out)),
        Command::Sub(args) => client::block_on(topics::run_sub(args, out)),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => out.fail(&e),
    }
}
