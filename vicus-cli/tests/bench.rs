//! `vicus bench` as a user runs it: the built binary, its exit code and its output.

use std::time::Duration;

use assert_cmd::Command;

fn vicus() -> Command {
    let mut cmd = Command::cargo_bin("vicus").expect("the vicus binary");
    cmd.timeout(Duration::from_secs(60));
    cmd
}

#[test]
fn bench_against_its_own_node_reports_both_workloads_as_the_harness_names_them() {
    let out = vicus()
        .args(["bench", "--duration", "1s", "--json"])
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("utf-8");
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("each line is JSON"))
        .collect();
    assert_eq!(lines.len(), 2, "{text}");
    let w1 = &lines[0];
    assert_eq!(w1["workload"], "w1");
    assert_eq!(w1["impl"], "vicus-cli");
    assert!(w1["acked"].as_u64().expect("acked") > 0, "{w1}");
    assert_eq!(w1["lost"], 0, "{w1}");
    assert!(w1["msgs_per_s"].as_f64().expect("rate") > 0.0, "{w1}");
    let w2 = &lines[1];
    assert_eq!(w2["workload"], "w2");
    let (p50, p99) = (
        w2["p50_us"].as_f64().expect("p50"),
        w2["p99_us"].as_f64().expect("p99"),
    );
    assert!(p50 > 0.0 && p99 >= p50, "{w2}");
}

#[test]
fn the_text_table_names_the_figures() {
    let out = vicus()
        .args(["bench", "--duration", "300ms", "--mode", "reqrep"])
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("utf-8");
    for figure in ["W2 request/reply", "p50_us", "p99_us", "iters"] {
        assert!(text.contains(figure), "{figure} missing in:\n{text}");
    }
    assert!(
        !text.contains("\x1b["),
        "no colours when stdout is not a terminal"
    );
}

#[test]
fn bad_flags_and_an_unreachable_node_give_one_line_errors() {
    for (args, says) in [
        (vec!["bench", "--window", "0"], "--window"),
        (vec!["bench", "--size", "9999999"], "--size"),
        // A remote node needs an identity to present.
        (vec!["bench", "--to", "127.0.0.1:1"], "--certs"),
    ] {
        let out = vicus().args(&args).output().expect("run");
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let err = String::from_utf8(out.stderr).expect("utf-8");
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(err.starts_with("vicus: error: "), "{err}");
        assert!(err.contains(says), "{args:?}: {err}");
    }
}
