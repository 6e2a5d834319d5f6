//! Replays the fuzz corpus and the minimized crash inputs through the fuzz entry points, so
//! plain `cargo test` catches a regression without cargo-fuzz: every file under
//! `fuzz/corpus/<target>/` and `fuzz/regressions/<target>/` (see `fuzz/README.md`).

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
            let data = std::fs::read(&path).expect("read fuzz input");
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
    let n = replay("frame_decoder", vicus::fuzzing::frame_decoder);
    assert!(n > 0, "no frame_decoder inputs under fuzz/");
}

#[test]
fn session_input_corpus_and_regressions() {
    let n = replay("session_input", vicus::fuzzing::session_input);
    assert!(n > 0, "no session_input inputs under fuzz/");
}

#[test]
fn blob_input_corpus_and_regressions() {
    let n = replay("blob_input", vicus::fuzzing::blob_input);
    assert!(n > 0, "no blob_input inputs under fuzz/");
}
