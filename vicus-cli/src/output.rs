//! How the `vicus` command talks to its user: one-line errors, `--json` output, and progress
//! or colour only when stdout is a terminal. Every subcommand goes through [`Output`]; nothing
//! else writes to stdout or stderr.

use std::fmt;
use std::io::{IsTerminal, Write};

/// A failure to report: one line saying what went wrong and what to do.
#[derive(Debug)]
pub struct CliError {
    message: String,
    /// What `--json` prints for this failure; default `{"error": message}`.
    json: Option<serde_json::Value>,
}

impl CliError {
    /// A failure with `message` (one line; newlines are folded).
    pub fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into().replace('\n', " "),
            json: None,
        }
    }

    /// The same failure, printed as `value` with `--json` (a command's own result shape,
    /// e.g. `{"outcome": "error", …}`); `"error"` is added to it when it is an object.
    pub fn with_json(mut self, mut value: serde_json::Value) -> Self {
        if let Some(object) = value.as_object_mut() {
            object
                .entry("error")
                .or_insert_with(|| serde_json::Value::String(self.message.clone()));
        }
        self.json = Some(value);
        self
    }
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl From<vicus::Error> for CliError {
    fn from(e: vicus::Error) -> Self {
        Self::new(e.to_string())
    }
}

/// Where results, progress and errors go.
#[derive(Debug, Clone, Copy)]
pub struct Output {
    /// `--json`: results as one JSON document (or one per line for streams).
    pub json: bool,
    /// stdout is a terminal: progress lines and colours are allowed.
    pub tty: bool,
}

impl Output {
    /// Output for this process.
    pub fn new(json: bool) -> Self {
        Self {
            json,
            tty: std::io::stdout().is_terminal(),
        }
    }

    /// Prints a result: `value` as JSON with `--json`, else `text`.
    pub fn result(&self, text: &str, value: &serde_json::Value) {
        let mut stdout = std::io::stdout().lock();
        let _ = if self.json {
            writeln!(stdout, "{value}")
        } else {
            writeln!(stdout, "{text}")
        };
    }

    /// Prints a line of text (not in `--json` mode, where only results are printed).
    pub fn line(&self, text: &str) {
        if !self.json {
            let _ = writeln!(std::io::stdout().lock(), "{text}");
        }
    }

    /// Rewrites the current terminal line with `text` (only on a terminal, not with `--json`).
    pub fn progress(&self, text: &str) {
        if self.tty && !self.json {
            let mut stdout = std::io::stdout().lock();
            let _ = write!(stdout, "\r\x1b[2K{text}");
            let _ = stdout.flush();
        }
    }

    /// Ends a progress line.
    pub fn progress_done(&self) {
        if self.tty && !self.json {
            let _ = writeln!(std::io::stdout().lock());
        }
    }

    /// `text` in bold when colours are allowed.
    pub fn bold(&self, text: &str) -> String {
        if self.tty && !self.json {
            format!("\x1b[1m{text}\x1b[0m")
        } else {
            text.to_owned()
        }
    }

    /// Reports `error` (one line on stderr; `{"error": …}` on stdout with `--json`) and gives
    /// the exit code for a failure.
    pub fn fail(&self, error: &CliError) -> std::process::ExitCode {
        if self.json {
            let v = error
                .json
                .clone()
                .unwrap_or_else(|| serde_json::json!({ "error": error.to_string() }));
            let _ = writeln!(std::io::stdout().lock(), "{v}");
        }
        let _ = writeln!(std::io::stderr().lock(), "vicus: error: {error}");
        std::process::ExitCode::FAILURE
    }
}
