//! Entry points of the fuzz targets (`fuzz/fuzz_targets/`), and the regression test that
//! replays their corpus under plain `cargo test` (below); not a public API. Compiled only with
//! `--cfg fuzzing` (cargo-fuzz sets it) or for this crate's unit tests: never in a user's
//! build.
//!
//! [`session_input`] and [`blob_input`] drive the same pair harness as vicus's protocol unit
//! tests (`vicus::testing`'s [`SessionPair`](crate::testing::SessionPair) and
//! [`BlobPair`](crate::testing::BlobPair), so the fuzz workspace enables feature `test-util`):
//! the pumps, pipes, virtual clock and the checks every transfer gets are the pair's; what
//! is here is the script each input is read as, and the account of what the machines must
//! do that the input is checked against. [`frame_decoder`] and `routes_file` need no pair.
//!
//! Each function takes arbitrary bytes and must never panic on its own account: a panic means
//! the code under test broke one of the properties asserted here, and that panic is the finding.
//! All of them bound their own work, so no input can make them loop for long.
//!
//! This module must not do IO, spawn threads or read the clock more than once per input:
//! [`session_input`] and [`blob_input`] read `Instant::now()` a single time (when their pair
//! is built) as the origin of a virtual clock and only add durations to it.

#[cfg(not(feature = "test-util"))]
compile_error!(
    "vicus::fuzzing drives vicus::testing's pair harness: build with feature `test-util` (fuzz/Cargo.toml does)"
);

mod blob;
mod session;

use bytes::BytesMut;

pub use blob::blob_input;
pub use session::session_input;

use crate::a1_callis::frame::{self, Frame, HEADER_LEN};

/// The frame limit [`frame_decoder`] decodes with first (a modest 64 KiB).
const DECODER_MAX_FRAME_LEN: u32 = 64 * 1024;

/// Decodes `data` as an A1 byte stream, twice: with a 64 KiB frame limit, and with the limit
/// named by the first four bytes (big-endian) over the bytes that follow them.
///
/// Checked for every decoded frame: re-encoding it gives back exactly the bytes it was decoded
/// from (the wire format is canonical; a skippable frame keeps only its type), decoding that
/// encoding gives the same frame, and no strict prefix of it decodes. `Ok(None)` must consume
/// nothing and only happen when the buffer really holds no complete frame.
pub fn frame_decoder(data: &[u8]) {
    decode_stream(data, DECODER_MAX_FRAME_LEN);
    if let Some((limit, rest)) = data.split_first_chunk::<4>() {
        decode_stream(rest, u32::from_be_bytes(*limit));
    }
}

/// Decodes frames from `input` until the decoder asks for more bytes or reports corruption.
/// Every successful decode consumes at least a header, so this ends.
fn decode_stream(input: &[u8], max_frame_len: u32) {
    let mut buf = BytesMut::from(input);
    loop {
        let before = buf.len();
        match frame::decode(&mut buf, max_frame_len) {
            Ok(Some(f)) => {
                let consumed = before.saturating_sub(buf.len());
                assert!(
                    consumed >= HEADER_LEN,
                    "{f:?} consumed only {consumed} bytes"
                );
                let start = input.len().saturating_sub(before);
                let raw = input
                    .get(start..start.saturating_add(consumed))
                    .unwrap_or_default();
                check_round_trip(&f, raw, max_frame_len);
            }
            Ok(None) => {
                assert_eq!(buf.len(), before, "Ok(None) consumed bytes");
                if let Some(header) = buf.first_chunk::<4>()
                    && buf.len() >= HEADER_LEN
                {
                    let body = u32::from_be_bytes(*header) as usize;
                    assert!(
                        buf.len() < HEADER_LEN.saturating_add(body),
                        "Ok(None) with a complete {body}-byte frame in {} bytes",
                        buf.len()
                    );
                }
                return;
            }
            Err(_) => return,
        }
    }
}

/// `raw` is the exact wire form `f` was decoded from.
fn check_round_trip(f: &Frame, raw: &[u8], max_frame_len: u32) {
    let mut encoded = BytesMut::new();
    f.encode(&mut encoded);
    let wire = encoded.to_vec();
    match f {
        // The body and flags of a skipped frame are not kept; only its type is.
        Frame::Skipped(t) => {
            assert!(t.is_skippable(), "skipped a non-reserved type {t:?}");
            assert_eq!(raw.get(4), Some(&t.0), "skipped frame changed type");
        }
        _ => assert_eq!(wire, raw, "{f:?} does not re-encode to its own bytes"),
    }
    assert_eq!(
        frame::decode(&mut encoded, max_frame_len),
        Ok(Some(f.clone())),
        "decode(encode(f)) != f"
    );
    assert!(encoded.is_empty(), "re-encoded {f:?} left bytes behind");
    let mut prefix = BytesMut::from(wire.get(..wire.len().saturating_sub(1)).unwrap_or_default());
    let prefix_len = prefix.len();
    assert_eq!(
        frame::decode(&mut prefix, max_frame_len),
        Ok(None),
        "a strict prefix of {f:?} decoded"
    );
    assert_eq!(prefix.len(), prefix_len, "a strict prefix was consumed");
}

/// The fuzz input read front to back; reads past the end give zeros.
struct Script<'a> {
    data: &'a [u8],
}

impl<'a> Script<'a> {
    fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    fn byte(&mut self) -> u8 {
        match self.data.split_first() {
            Some((b, rest)) => {
                self.data = rest;
                *b
            }
            None => 0,
        }
    }

    fn u16(&mut self) -> u16 {
        u16::from_be_bytes([self.byte(), self.byte()])
    }

    fn take(&mut self, n: usize) -> &'a [u8] {
        let (head, rest) = self.data.split_at(n.min(self.data.len()));
        self.data = rest;
        head
    }
}

/// Arbitrary bytes as each body of the topic service (`services::topics::wire`): the first
/// byte picks the message type. Whatever decodes must encode back to the same bytes (one
/// encoding per value), and every name in it must be a valid topic or pattern.
pub fn topic_messages(data: &[u8]) {
    use crate::services::topics::wire::{
        Announcement, Grants, PUBLISH_TYPE, Publication, SUBSCRIBE_TYPE,
    };
    use crate::services::topics::{Topic, TopicPattern};
    let Some((&pick, rest)) = data.split_first() else {
        return;
    };
    let body = bytes::Bytes::copy_from_slice(rest);
    let msg_type = SUBSCRIBE_TYPE.saturating_add(u32::from(pick % 4));
    if let Ok(a) = Announcement::decode(msg_type, body.clone()) {
        assert_eq!(a.msg_type(), msg_type);
        assert_eq!(a.encode(), body, "an announcement has one encoding");
        let patterns = match &a {
            Announcement::Subscribe { patterns, .. } | Announcement::Unsubscribe { patterns } => {
                patterns
            }
        };
        for p in patterns {
            assert!(TopicPattern::new(p.as_str()).is_ok());
        }
    }
    if let Ok(g) = Grants::decode(body.clone()) {
        assert_eq!(g.encode(), body, "grants have one encoding");
    }
    if msg_type == PUBLISH_TYPE
        && let Ok(p) = Publication::decode(body.clone())
    {
        assert!(Topic::new(p.topic.as_str()).is_ok());
        assert_eq!(
            Publication::encode(&p.topic, p.msg_type, &p.payload),
            body,
            "a publication has one encoding"
        );
    }
}

/// Arbitrary text as a routes file (feature `file-resolver`): parsing never panics, and a file
/// that parses keeps the parser's promises — within the bounds, no taberna without a candidate
/// or listed twice, and the table built from it answers for exactly the tabernas listed.
#[cfg(feature = "file-resolver")]
pub fn routes_file(data: &[u8]) {
    use std::collections::BTreeSet;

    use crate::RoutesFile;
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(file) = RoutesFile::parse(text) else {
        return;
    };
    assert!(file.tabernas.len() <= RoutesFile::MAX_TABERNAS);
    assert!(file.domus.len() <= RoutesFile::MAX_DOMUS);
    let mut seen = BTreeSet::new();
    for (taberna, candidates) in &file.tabernas {
        assert!(seen.insert(taberna.0), "{taberna} listed twice");
        assert!(!candidates.is_empty(), "{taberna} without a candidate");
        assert!(candidates.len() <= RoutesFile::MAX_CANDIDATES);
    }
    let table = file.table();
    assert_eq!(table.len(), file.tabernas.len());
    for (taberna, candidates) in &file.tabernas {
        assert_eq!(
            table.candidates(*taberna).map(|c| c.len()),
            Some(candidates.len())
        );
    }
    for (id, addr) in &file.domus {
        assert_eq!(table.domus_addr(id), Some(addr));
    }
}

/// Replays the fuzz corpus and the minimized crash inputs through the entry points above, so
/// plain `cargo test` catches a regression without cargo-fuzz: every file under
/// `fuzz/corpus/<target>/` and `fuzz/regressions/<target>/` (see `fuzz/README.md`).
#[cfg(test)]
mod replay {
    use std::path::{Path, PathBuf};

    /// Every regular file under `fuzz/<dir>/<target>/`, except dotfiles such as `.gitkeep`.
    fn inputs(dir: &str, target: &str) -> Vec<PathBuf> {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fuzz")
            .join(dir)
            .join(target);
        let Ok(entries) = std::fs::read_dir(&root) else {
            return Vec::new();
        };
        let mut files: Vec<PathBuf> = entries
            .map(|e| e.expect("read fuzz directory entry").path())
            .filter(|p| p.is_file())
            .filter(|p| {
                !p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with('.'))
            })
            .collect();
        files.sort();
        files
    }

    /// Runs `run` on every input of `target` and fails naming every file that panics (each
    /// panic message is printed above by the panic hook).
    fn replay(target: &str, run: fn(&[u8])) -> usize {
        let mut count = 0;
        let mut failed = Vec::new();
        for dir in ["corpus", "regressions"] {
            for path in inputs(dir, target) {
                // A running fuzzer may replace corpus files while this reads them.
                let data = match std::fs::read(&path) {
                    Ok(data) => data,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => panic!("{}: {e}", path.display()),
                };
                if std::panic::catch_unwind(|| run(&data)).is_err() {
                    failed.push(path.display().to_string());
                }
                count += 1;
            }
        }
        assert!(failed.is_empty(), "{target} panics on: {failed:#?}");
        count
    }

    #[test]
    fn frame_decoder_corpus_and_regressions() {
        let n = replay("frame_decoder", super::frame_decoder);
        assert!(n > 0, "no frame_decoder inputs under fuzz/");
    }

    #[test]
    fn session_input_corpus_and_regressions() {
        let n = replay("session_input", super::session_input);
        assert!(n > 0, "no session_input inputs under fuzz/");
    }

    #[test]
    #[cfg(feature = "file-resolver")]
    fn routes_file_corpus_and_regressions() {
        let n = replay("routes_file", super::routes_file);
        assert!(n > 0, "no routes_file inputs under fuzz/");
    }

    #[test]
    fn topic_messages_corpus_and_regressions() {
        let n = replay("topic_messages", super::topic_messages);
        assert!(n > 0, "no topic_messages inputs under fuzz/");
    }

    #[test]
    fn blob_input_corpus_and_regressions() {
        let n = replay("blob_input", super::blob_input);
        assert!(n > 0, "no blob_input inputs under fuzz/");
    }
}
