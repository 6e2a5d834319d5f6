//! `vicus demo` and `vicus top` as a user runs them: the built binary, its exit code and its
//! output — piped (what scripts see) and, where tmux is installed, on a real terminal.
//!
//! Every child process is bounded: commands run with a timeout, nodes and tmux servers are
//! killed when their guard drops (also when a test fails). The view's drawing and rate
//! computation are unit-tested beside the code (src/top.rs, src/demo.rs) with ratatui's
//! `TestBackend`.

mod common;

use std::time::{Duration, Instant};

use common::{
    Node, TempDir, bin, make_certs, node_config, ok, one_line_error, run, skip_or_fail, vicus,
};

/// A development CA and certificates for `names` (trust domain vicus.dev), written by
/// `vicus certs`.
fn certs(dir: &TempDir, names: &[&str]) -> std::path::PathBuf {
    make_certs(dir, "vicus.dev", names)
}

/// Starts `vicus node` as alpha on a free loopback port with an echo taberna, with the
/// reporting service allowing `allow` (none: no service).
fn node(dir: &TempDir, allow: Option<&str>) -> Node {
    let reporting = allow
        .map(|id| format!("\n[reporting]\nallow = [\"{id}\"]\n"))
        .unwrap_or_default();
    Node::start(&node_config(
        dir,
        "node.toml",
        "alpha",
        &[(7, "echo")],
        &reporting,
    ))
}

#[test]
fn demo_for_three_seconds_counts_traffic_on_every_node_and_link() {
    let text = ok(vicus().args(["demo", "--duration", "3", "--json"]));
    assert_eq!(text.lines().count(), 1, "one JSON object: {text}");
    let summary: serde_json::Value = serde_json::from_str(&text).expect("JSON");
    let nodes = summary["nodes"].as_array().expect("nodes");
    assert_eq!(nodes.len(), 3, "{summary}");
    for node in nodes {
        for figure in ["messages_sent", "messages_received", "answers"] {
            assert!(
                node[figure].as_u64().expect(figure) > 0,
                "{figure} of {}: {node}",
                node["name"]
            );
        }
        assert!(
            node["identity"]
                .as_str()
                .expect("identity")
                .starts_with("spiffe://vicus.dev/domus/"),
            "{node}"
        );
    }
    let links = summary["links"].as_array().expect("links");
    assert_eq!(links.len(), 6, "all ordered pairs: {summary}");
    for link in links {
        let answered = ["replied", "accepted"]
            .iter()
            .map(|k| link[*k].as_u64().expect(k))
            .sum::<u64>();
        assert!(answered > 0, "{link}");
    }
    assert!(summary["total"]["messages_sent"].as_u64().expect("total") > 0);
    let ms = summary["duration_ms"].as_u64().expect("duration");
    assert!((2_900..20_000).contains(&ms), "{ms} ms");
}

#[test]
fn demo_piped_prints_a_line_per_node_each_second_and_a_final_table() {
    let text = ok(vicus().args(["demo", "--duration", "3s", "--rate", "20"]));
    for name in ["alpha", "beta", "gamma"] {
        assert!(
            text.lines()
                .any(|l| l.starts_with(name) && l.contains("sent ") && l.contains("/s")),
            "no per-second line for {name}:\n{text}"
        );
    }
    for shown in ["node", "sent", "received", "answers", "total", "alpha→beta"] {
        assert!(text.contains(shown), "no {shown:?} in\n{text}");
    }
    assert!(
        !text.contains('\x1b'),
        "no colours when stdout is not a terminal"
    );
}

#[test]
fn demo_and_top_refuse_bad_flags_with_one_line_errors() {
    for (args, says) in [
        (vec!["demo", "--duration", "0"], "--duration"),
        (vec!["demo", "--rate", "0"], "--rate"),
        (vec!["top", "127.0.0.1:1"], "no identity"),
        (
            vec![
                "top",
                "not an address",
                "--ca",
                "a",
                "--cert",
                "b",
                "--key",
                "c",
            ],
            "host:port",
        ),
    ] {
        let out = run(vicus().args(&args));
        // clap refuses with 2 and its own lines; ours is 1 and one line.
        let err = &out.stderr;
        assert!(err.contains(says), "{args:?}: {err}");
        assert_ne!(out.code, Some(0), "{args:?}");
        if out.code == Some(1) {
            one_line_error(&out);
        }
    }
    let help = vicus().args(["top", "--help"]).output().expect("help");
    let help = String::from_utf8(help.stdout).expect("utf-8");
    assert!(
        help.contains("vicus top 127.0.0.1:7000") && help.contains("[reporting]"),
        "{help}"
    );
    let help = vicus().args(["demo", "--help"]).output().expect("help");
    let help = String::from_utf8(help.stdout).expect("utf-8");
    assert!(help.contains("vicus demo --duration"), "{help}");
}

#[test]
fn top_once_json_reads_a_running_node_over_vicus() {
    let dir = TempDir::new("once");
    let certs = certs(&dir, &["alpha", "ops"]);
    let node = node(&dir, Some("spiffe://vicus.dev/domus/ops"));
    let addr = node.addr.clone();
    let started = Instant::now();
    let text = ok(vicus()
        .args(["top", &addr, "--certs", certs.to_str().expect("utf-8")])
        .args([
            "--as",
            "ops",
            "--identity",
            "spiffe://vicus.dev/domus/alpha",
        ])
        .args(["--once", "--json", "--interval", "300ms"]));
    assert!(started.elapsed() < Duration::from_secs(30));
    let value: serde_json::Value = serde_json::from_str(&text).expect("JSON");
    let report = &value["report"];
    assert_eq!(
        report["identity"], "spiffe://vicus.dev/domus/alpha",
        "{value}"
    );
    assert_eq!(report["version"], 1);
    assert!(
        report["peers"]
            .as_array()
            .expect("peers")
            .iter()
            .any(|p| p["peer"] == "spiffe://vicus.dev/domus/ops" && p["connected"] == true),
        "top itself is a connected peer: {report}"
    );
    assert!(
        report["totals"]["messages_received"]
            .as_u64()
            .expect("received")
            >= 2,
        "both report requests counted: {report}"
    );
    let rates = &value["rates"];
    assert!(
        (250..5_000).contains(&rates["elapsed_ms"].as_u64().expect("elapsed")),
        "{rates}"
    );
    assert!(
        rates["traffic"]["messages_received"]
            .as_f64()
            .expect("rate")
            > 0.0,
        "the second request arrived within the interval: {rates}"
    );

    // Piped without --json: the plain snapshot, every pane named.
    let text = ok(vicus()
        .args(["top", &addr, "--certs", certs.to_str().expect("utf-8")])
        .args(["--as", "ops", "--interval", "200ms"]));
    for pane in [
        "vicus top — spiffe://vicus.dev/domus/alpha",
        "Traffic",
        "Peers",
        "Blob streams",
        "Recent errors",
        "Events",
        "spiffe://vicus.dev/domus/ops",
    ] {
        assert!(text.contains(pane), "no {pane:?} in\n{text}");
    }
}

#[test]
fn top_refused_or_without_the_service_says_what_to_fix_in_one_line() {
    let dir = TempDir::new("refused");
    let certs = certs(&dir, &["alpha", "ops", "stranger"]);
    let certs = certs.to_str().expect("utf-8").to_owned();
    let allowing_ops = node(&dir, Some("spiffe://vicus.dev/domus/ops"));
    let addr = allowing_ops.addr.clone();
    let out = run(vicus().args([
        "top", &addr, "--certs", &certs, "--as", "stranger", "--once",
    ]));
    let err = one_line_error(&out);
    assert!(
        err.contains(&format!(
            "{addr} does not allow spiffe://vicus.dev/domus/stranger; add it to [reporting] \
             allow in the node's config"
        )),
        "{err}"
    );
    // With --json the error is also on stdout, as JSON.
    let out = run(vicus().args([
        "top", &addr, "--certs", &certs, "--as", "stranger", "--json",
    ]));
    one_line_error(&out);
    let value: serde_json::Value =
        serde_json::from_str(&out.stdout).expect("the error as JSON on stdout");
    assert!(
        value["error"]
            .as_str()
            .expect("error")
            .contains("does not allow"),
        "{value}"
    );
    drop(allowing_ops);

    let dir = TempDir::new("no-service");
    let certs = certs_in(&dir);
    let node = node(&dir, None);
    let addr = node.addr.clone();
    let out = run(vicus().args(["top", &addr, "--certs", &certs, "--as", "ops", "--once"]));
    let err = one_line_error(&out);
    assert!(
        err.contains("does not run the reporting service; enable it in the node's config"),
        "{err}"
    );

    // Nobody listening: one line, fast.
    let started = Instant::now();
    let out = run(vicus()
        .args(["top", "127.0.0.1:1", "--certs", &certs, "--as", "ops"])
        .args(["--once", "--timeout", "2s"]));
    let err = one_line_error(&out);
    assert!(err.contains("cannot reach 127.0.0.1:1"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(20));
}

fn certs_in(dir: &TempDir) -> String {
    certs(dir, &["alpha", "ops"])
        .to_str()
        .expect("utf-8")
        .to_owned()
}

/// A tmux server of this test's own (its own socket), killed when dropped.
struct Tmux {
    socket: String,
}

impl Tmux {
    /// Starts `command` in a detached 120×40 session, or `None` without tmux (which fails the
    /// test under CI: see [`skip_or_fail`]).
    fn start(tag: &str, command: &str) -> Option<Self> {
        let found = std::process::Command::new("tmux")
            .arg("-V")
            .output()
            .is_ok_and(|o| o.status.success());
        if !found {
            skip_or_fail(&format!(
                "tmux is not installed: the real-terminal check `{tag}` did not run"
            ));
            return None;
        }
        let tmux = Self {
            socket: format!("vicus-test-{tag}-{}", std::process::id()),
        };
        let status = tmux
            .cmd()
            .args(["new-session", "-d", "-x", "120", "-y", "40", command])
            .status()
            .expect("tmux new-session");
        assert!(status.success(), "tmux new-session failed");
        Some(tmux)
    }

    fn cmd(&self) -> std::process::Command {
        let mut cmd = std::process::Command::new("tmux");
        cmd.args(["-L", &self.socket, "-f", "/dev/null"]);
        cmd
    }

    fn screen(&self) -> String {
        let out = self
            .cmd()
            .args(["capture-pane", "-p"])
            .output()
            .expect("capture-pane");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Waits (at most `bound`) until the screen contains every one of `wanted`.
    fn wait_for(&self, wanted: &[&str], bound: Duration) -> String {
        let started = Instant::now();
        loop {
            let screen = self.screen();
            if wanted.iter().all(|w| screen.contains(w)) || started.elapsed() > bound {
                return screen;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn keys(&self, keys: &str) {
        let _ = self.cmd().args(["send-keys", keys]).status();
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.cmd().arg("kill-server").status();
    }
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

const PANES: [&str; 5] = [
    "Peers",
    "Traffic",
    "Blob streams",
    "Recent errors",
    "Events",
];

#[test]
fn demo_draws_its_panes_on_a_real_terminal_and_restores_it() {
    let command = format!(
        "{} demo --duration 4; echo EXIT=$?; sleep 60",
        shell_quote(bin().to_str().expect("utf-8"))
    );
    let Some(tmux) = Tmux::start("demo", &command) else {
        return;
    };
    let mut wanted = vec![
        "vicus demo — 3 nodes",
        "alpha — spiffe://vicus.dev/domus/alpha",
    ];
    wanted.extend(PANES);
    // Rates need two reports: wait for the second one (the header says "rates over").
    wanted.push("rates over");
    let screen = tmux.wait_for(&wanted, Duration::from_secs(20));
    for w in &wanted {
        assert!(screen.contains(w), "no {w:?} on the screen:\n{screen}");
    }
    // Tab shows the next node.
    tmux.keys("Tab");
    let screen = tmux.wait_for(
        &["beta — spiffe://vicus.dev/domus/beta"],
        Duration::from_secs(10),
    );
    assert!(
        screen.contains("beta — spiffe://vicus.dev/domus/beta"),
        "{screen}"
    );
    // At the end: the normal screen again, with the final table and exit 0.
    let screen = tmux.wait_for(&["EXIT="], Duration::from_secs(30));
    assert!(screen.contains("EXIT=0"), "{screen}");
    assert!(
        screen.contains("total") && screen.contains("links (answered/sent)"),
        "{screen}"
    );
    assert!(
        !screen.contains("Recent errors"),
        "the alternate screen is gone:\n{screen}"
    );
}

#[test]
fn top_draws_its_panes_on_a_real_terminal_and_q_quits() {
    let dir = TempDir::new("tmux");
    let certs = certs(&dir, &["alpha", "ops"]);
    let node = node(&dir, Some("spiffe://vicus.dev/domus/ops"));
    let addr = node.addr.clone();
    let command = format!(
        "{} top {addr} --certs {} --as ops; echo EXIT=$?; sleep 60",
        shell_quote(bin().to_str().expect("utf-8")),
        shell_quote(certs.to_str().expect("utf-8")),
    );
    let Some(tmux) = Tmux::start("top", &command) else {
        return;
    };
    let mut wanted = vec![
        "vicus top — spiffe://vicus.dev/domus/alpha",
        "spiffe://vicus.dev/domus/ops",
        "rates over",
    ];
    wanted.extend(PANES);
    let screen = tmux.wait_for(&wanted, Duration::from_secs(20));
    for w in &wanted {
        assert!(screen.contains(w), "no {w:?} on the screen:\n{screen}");
    }
    tmux.keys("q");
    let screen = tmux.wait_for(&["EXIT="], Duration::from_secs(10));
    assert!(screen.contains("EXIT=0"), "q quits cleanly:\n{screen}");
    assert!(
        !screen.contains("Blob streams"),
        "the alternate screen is gone:\n{screen}"
    );
}
