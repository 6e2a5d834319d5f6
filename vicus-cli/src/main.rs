//! `vicus`: the command-line tool that comes with the vicus library — development
//! certificates, a node run from a config file, one-shot sends and pings, a load generator, a
//! live three-node demo and `vicus top`, a terminal view of a running node.
//!
//! Every subcommand prints a one-line error that says what to fix and exits non-zero
//! (1 for a failure, 2 for a command line clap refused), and prints machine-readable output
//! with `--json`. Progress lines and colours appear only when stdout is a terminal. This crate
//! must not pull CLI dependencies into the library: it only uses the library's public API.

mod output;

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
enum Command {}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let out = Output::new(cli.json);
    let result: Result<(), CliError> = match cli.command {};
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => out.fail(&e),
    }
}
