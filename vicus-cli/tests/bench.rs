//! `vicus bench` as a user runs it: the built binary, its exit code and its output.

mod common;

use common::{fails, ok, run, vicus};

#[test]
fn bench_against_its_own_node_reports_both_workloads_as_the_harness_names_them() {
    let text = ok(vicus().args(["bench", "--duration", "1s", "--json"]));
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
    let text = ok(vicus().args(["bench", "--duration", "300ms", "--mode", "reqrep"]));
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
        // Exit 1, one line on stderr, starting "vicus: error: ".
        let err = fails(vicus().args(&args));
        assert!(err.contains(says), "{args:?}: {err}");
    }
    // A malformed address or identity is a usage error, as for send and ping (exit 2).
    for (args, says) in [
        (vec!["bench", "--to", "nowhere"], "--to"),
        (
            vec!["bench", "--to", "127.0.0.1:1", "--identity", "not-spiffe"],
            "--identity",
        ),
    ] {
        let ran = run(vicus().args(&args));
        assert_eq!(ran.code, Some(2), "{args:?}: {}", ran.stderr);
        assert!(ran.stderr.contains(says), "{args:?}: {}", ran.stderr);
    }
}
