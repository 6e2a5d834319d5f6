//! `vicus send`: one message (text, or a file's bytes) or one file as a blob to a taberna, and
//! its outcome: accepted, the reply, or the error with its `ErrorId` name and whether the
//! message may have been delivered.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Args;
use serde_json::{Value, json};
use tokio::io::AsyncReadExt;
use vicus::{Delivery, Domus, DomusConfig, DomusId, SendOptions, TabernaId};

use crate::client::{MESSAGE_TYPE, TabernaTarget, millis, parse_duration, show_duration};
use crate::output::{CliError, Output};

/// The shortest and longest `--timeout` a send may have (the library's bounds).
const TIMEOUT_RANGE: std::ops::RangeInclusive<Duration> =
    Duration::from_millis(1)..=Duration::from_secs(3600);
/// How much of a file a blob send reads at a time.
const BLOB_PIECE: usize = 256 * 1024;

/// `vicus send`.
#[derive(Debug, Args)]
#[command(after_help = "Examples:
  vicus send --to 127.0.0.1:7000 --taberna 7 --certs ./certs --as client 'hello'
  vicus send --to 127.0.0.1:7000 --taberna 8 --certs ./certs --as client --file data.json
  vicus send --to 127.0.0.1:7000 --taberna 8 --certs ./certs --as client --file big.tar --blob
  vicus --json send --to unix:/run/vicus/a.sock --taberna 7 --ca ca.pem --cert me.pem --key me.key hi

Prints `accepted`, the reply (as text when it is printable UTF-8, else as hex), or the error;
exits 1 when the send failed. With --blob, MESSAGE (default: the file's name) is the blob's
header message and the file's bytes stream after it.")]
pub struct SendArgs {
    #[command(flatten)]
    target: TabernaTarget,
    /// How long to wait for the answer (e.g. 500ms, 5s, 1m).
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = parse_duration)]
    timeout: Duration,
    /// Send the bytes of this file (as one message, or as a blob with --blob).
    #[arg(long, value_name = "PATH")]
    file: Option<PathBuf>,
    /// Stream --file as a blob instead of one message (no size limit).
    #[arg(long, requires = "file")]
    blob: bool,
    /// The message to send (UTF-8 text); with --blob, the blob's header.
    message: Option<String>,
}

/// Runs `vicus send`.
pub async fn run(args: SendArgs, out: Output) -> Result<(), CliError> {
    if !TIMEOUT_RANGE.contains(&args.timeout) {
        return Err(CliError::new(format!(
            "--timeout {:?}: give 1ms to 1h",
            args.timeout
        )));
    }
    let taberna = args.target.taberna();
    let what = What::from_args(&args).await?;
    let domus = args.target.client().await?;
    let options = SendOptions::default().timeout(args.timeout);
    let started = Instant::now();
    let result = match what {
        What::Message(payload) => domus
            .send(taberna, MESSAGE_TYPE, payload, options)
            .await
            .map(|d| (d, None)),
        What::Blob { header, path, len } => {
            send_blob(&domus, taberna, header, &path, len, options, out)
                .await
                .map(|sent| (Delivery::Accepted, Some(sent)))
        }
    };
    let elapsed = started.elapsed();
    let peer = domus.reporting().connected_peers().into_iter().next();
    domus.shutdown().await;
    let (delivery, blob_bytes) = result.map_err(|e| {
        CliError::new(format!(
            "send to taberna {} at {} failed: {e} ({})",
            args.target.taberna,
            args.target.to,
            if e.outcome_unknown() {
                "outcome unknown: it may have been delivered"
            } else {
                "not delivered"
            }
        ))
        .with_json(json!({
            "outcome": "error",
            "taberna": args.target.taberna,
            "to": args.target.to.to_string(),
            "error_id": e.id().name(),
            "outcome_unknown": e.outcome_unknown(),
            "elapsed_ms": millis(elapsed),
        }))
    })?;
    let mut value = json!({
        "taberna": args.target.taberna,
        "to": args.target.to.to_string(),
        "peer": peer.as_ref().map(DomusId::as_str),
        "elapsed_ms": millis(elapsed),
    });
    let by = peer.map(|p| format!(" by {p}")).unwrap_or_default();
    let text = match delivery {
        Delivery::Accepted => {
            value["outcome"] = json!("accepted");
            match blob_bytes {
                Some(n) => {
                    value["blob_bytes"] = json!(n);
                    format!("accepted{by}: blob of {n} B in {}", show_duration(elapsed))
                }
                None => format!("accepted{by} in {}", show_duration(elapsed)),
            }
        }
        Delivery::Replied(reply) => {
            value["outcome"] = json!("replied");
            value["len"] = json!(reply.len());
            let shown = match printable(&reply) {
                Some(text) => {
                    value["reply"] = Value::from(text);
                    text.to_owned()
                }
                None => {
                    let hex = hex(&reply);
                    value["reply_hex"] = Value::from(hex.as_str());
                    format!("(hex) {hex}")
                }
            };
            format!(
                "replied{by} in {} ({} B): {shown}",
                show_duration(elapsed),
                reply.len()
            )
        }
    };
    out.result(&text, &value);
    Ok(())
}

/// What to send.
enum What {
    Message(Bytes),
    Blob {
        header: Bytes,
        path: PathBuf,
        len: u64,
    },
}

impl What {
    async fn from_args(args: &SendArgs) -> Result<Self, CliError> {
        let max = DomusConfig::default().max_message_len;
        match (&args.file, &args.message, args.blob) {
            (None, None, _) => Err(CliError::new(
                "nothing to send: give a MESSAGE or --file PATH",
            )),
            (None, Some(message), _) => Ok(Self::Message(Bytes::from(message.clone()))),
            (Some(_), Some(_), false) => Err(CliError::new(
                "give a MESSAGE or --file, not both (with --blob, MESSAGE is the blob's header)",
            )),
            (Some(path), header, blob) => {
                let meta = tokio::fs::metadata(path)
                    .await
                    .map_err(|e| CliError::new(format!("--file {}: {e}", path.display())))?;
                if !meta.is_file() {
                    return Err(CliError::new(format!(
                        "--file {}: not a regular file",
                        path.display()
                    )));
                }
                if blob {
                    let header = match header {
                        Some(h) => h.clone(),
                        None => path
                            .file_name()
                            .map(|n| n.to_string_lossy().into_owned())
                            .unwrap_or_default(),
                    };
                    return Ok(Self::Blob {
                        header: Bytes::from(header),
                        path: path.clone(),
                        len: meta.len(),
                    });
                }
                if meta.len() > max as u64 {
                    return Err(CliError::new(format!(
                        "--file {} is {} B, more than one message carries ({max} B): add --blob \
                         to stream it",
                        path.display(),
                        meta.len()
                    )));
                }
                let bytes = tokio::fs::read(path)
                    .await
                    .map_err(|e| CliError::new(format!("--file {}: {e}", path.display())))?;
                Ok(Self::Message(Bytes::from(bytes)))
            }
        }
    }
}

/// Streams the file at `path` as a blob; the number of bytes sent.
async fn send_blob(
    domus: &Domus,
    taberna: TabernaId,
    header: Bytes,
    path: &std::path::Path,
    len: u64,
    options: SendOptions,
    out: Output,
) -> Result<u64, vicus::Error> {
    let io = |e: std::io::Error| {
        vicus::Error::new(
            vicus::ErrorId::Io,
            format!("reading {}: {e}", path.display()),
        )
    };
    let mut file = tokio::fs::File::open(path).await.map_err(io)?;
    let mut sender = domus
        .send_blob(taberna, MESSAGE_TYPE, header, options)
        .await?;
    let started = Instant::now();
    let mut shown = Instant::now();
    let mut progress = false;
    let mut sent = 0u64;
    loop {
        let mut piece = vec![0u8; BLOB_PIECE];
        let n = file.read(&mut piece).await.map_err(io)?;
        if n == 0 {
            break;
        }
        piece.truncate(n);
        sender.write_bytes(Bytes::from(piece)).await?;
        sent += n as u64;
        if shown.elapsed() >= Duration::from_millis(100) {
            shown = Instant::now();
            progress = true;
            let rate = sent as f64 / started.elapsed().as_secs_f64().max(1e-9) / 1e6;
            out.progress(&format!(
                "blob: {sent} / {len} B ({:.0}%), {rate:.1} MB/s",
                sent as f64 * 100.0 / len.max(1) as f64
            ));
        }
    }
    let finished = sender.finish().await;
    if progress {
        out.progress_done();
    }
    finished.map(|()| sent)
}

/// `bytes` as text when they are UTF-8 without control characters (newlines and tabs aside),
/// so a reply cannot write terminal escapes.
fn printable(bytes: &[u8]) -> Option<&str> {
    let text = std::str::from_utf8(bytes).ok()?;
    let clean = text
        .chars()
        .all(|c| !c.is_control() || matches!(c, '\n' | '\t' | '\r'));
    clean.then_some(text)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_are_text_only_without_terminal_escapes() {
        assert_eq!(printable(b"hello\nworld"), Some("hello\nworld"));
        assert_eq!(printable(b"\x1b[2J"), None);
        assert_eq!(printable(&[0xff, 0x00]), None);
        assert_eq!(hex(&[0xff, 0x00, 0x1b]), "ff001b");
    }
}
