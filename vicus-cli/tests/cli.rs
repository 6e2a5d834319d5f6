//! The built `vicus` binary, end to end: `certs`, two `node` processes on loopback that
//! `send` and `ping` reach (and that route to each other), the one-line errors of bad configs
//! and missing certificates, `--json` output, and a clean exit on SIGTERM.
//!
//! Every command runs under a timeout, every node process is killed when its test ends (the
//! `Node` guard), and every test works in its own directory under the system's temp dir,
//! removed at the end.

mod common;

use std::path::Path;
use std::time::Instant;

use common::{NODE_TIMEOUT, Node, TempDir, fails, json, make_certs, node_config, ok, run, vicus};
use serde_json::Value;

fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .expect("metadata")
        .permissions()
        .mode()
        & 0o777
}

#[test]
fn certs_init_and_issue_write_a_ca_and_identities_and_refuse_to_overwrite_without_force() {
    let dir = TempDir::new("certs");
    let certs = dir.path().join("certs");
    let out = ok(vicus()
        .args([
            "--json",
            "certs",
            "init",
            "--trust-domain",
            "acme.test",
            "--dir",
        ])
        .arg(&certs));
    let init = json(&out);
    assert_eq!(init["trust_domain"], "acme.test");
    assert_eq!(init["replaced"], false);
    assert_eq!(mode(&certs.join("ca.key")), 0o600);
    let readme = std::fs::read_to_string(certs.join("README.txt")).expect("README.txt");
    assert!(readme.contains("INSECURE"), "{readme}");

    for name in ["alpha", "billing-1"] {
        let out = ok(vicus()
            .args(["--json", "certs", "issue", name, "--dir"])
            .arg(&certs));
        let issued = json(&out);
        assert_eq!(
            issued["identity"],
            format!("spiffe://acme.test/domus/{name}")
        );
        assert_eq!(mode(&certs.join(format!("{name}.key"))), 0o600);
        let pem = std::fs::read_to_string(certs.join(format!("{name}.pem"))).expect("pem");
        assert!(pem.starts_with("-----BEGIN CERTIFICATE-----"), "{pem}");
    }
    // Text output names the identity too.
    let out = ok(vicus()
        .args(["certs", "issue", "gamma", "--dir"])
        .arg(&certs));
    assert!(out.contains("spiffe://acme.test/domus/gamma"), "{out}");

    // Nothing is overwritten without --force.
    let ca_before = std::fs::read(certs.join("ca.pem")).expect("ca.pem");
    let e = fails(
        vicus()
            .args(["certs", "init", "--trust-domain", "acme.test", "--dir"])
            .arg(&certs),
    );
    assert!(e.contains("ca.pem exists") && e.contains("--force"), "{e}");
    assert_eq!(
        std::fs::read(certs.join("ca.pem")).expect("ca.pem"),
        ca_before
    );
    let e = fails(
        vicus()
            .args(["certs", "issue", "alpha", "--dir"])
            .arg(&certs),
    );
    assert!(
        e.contains("alpha.pem exists") && e.contains("--force"),
        "{e}"
    );
    ok(vicus()
        .args(["certs", "issue", "alpha", "--force", "--dir"])
        .arg(&certs));
    let out = ok(vicus()
        .args([
            "--json",
            "certs",
            "init",
            "--trust-domain",
            "acme.test",
            "--force",
            "--dir",
        ])
        .arg(&certs));
    assert_eq!(json(&out)["replaced"], true);
    assert_ne!(
        std::fs::read(certs.join("ca.pem")).expect("ca.pem"),
        ca_before
    );

    // Bad names and a missing CA say what to fix.
    let e = fails(
        vicus()
            .args(["certs", "issue", "Bad_Name", "--dir"])
            .arg(&certs),
    );
    assert!(e.contains("lower-case letters"), "{e}");
    let e = fails(vicus().args(["certs", "issue", "ca", "--dir"]).arg(&certs));
    assert!(e.contains("overwrite the CA"), "{e}");
    let nowhere = dir.path().join("nowhere");
    let e = fails(
        vicus()
            .args(["certs", "issue", "alpha", "--dir"])
            .arg(&nowhere),
    );
    assert!(e.contains("vicus certs init"), "{e}");
    let e = fails(
        vicus()
            .args(["certs", "init", "--trust-domain", "Not A Domain", "--dir"])
            .arg(dir.path().join("other")),
    );
    assert!(e.contains("--trust-domain"), "{e}");
}

#[test]
fn two_nodes_answer_send_and_ping_route_to_each_other_and_stop_on_sigterm() {
    let dir = TempDir::new("mesh");
    let certs = make_certs(&dir, "mesh.test", &["alpha", "beta", "client"]);
    let beta_config = node_config(&dir, "beta.toml", "beta", &[(20, "echo")], "");
    let beta = Node::start(&beta_config);
    assert_eq!(beta.identity, "spiffe://mesh.test/domus/beta");
    // Alpha routes taberna 20 to beta and forwards its taberna 10 there.
    let alpha_config = node_config(
        &dir,
        "alpha.toml",
        "alpha",
        &[(7, "echo"), (8, "sink"), (9, "log")],
        &format!(
            "\n[[taberna]]\nid = 10\nbehaviour = \"forward\"\nto = 20\n\n[[route]]\ntaberna = 20\naddr = \"{}\"\nidentity = \"{}\"\n",
            beta.addr, beta.identity
        ),
    );
    let alpha = Node::start(&alpha_config);
    let client = |cmd: &str, node: &Node, taberna: &str| {
        let mut c = vicus();
        c.args([
            cmd,
            "--to",
            &node.addr,
            "--taberna",
            taberna,
            "--as",
            "client",
            "--certs",
        ])
        .arg(&certs);
        c
    };

    // An echo taberna replies with the message.
    let out = ok(client("send", &alpha, "7").arg("salve"));
    assert!(
        out.starts_with("replied") && out.trim_end().ends_with(": salve"),
        "{out}"
    );
    let out = ok(client("send", &alpha, "7")
        .args(["--identity", "spiffe://mesh.test/domus/alpha"])
        .arg("again"));
    assert!(out.contains("again"), "{out}");
    let reply = json(&ok(client("send", &alpha, "7")
        .arg("--json")
        .arg("in json")));
    assert_eq!(reply["outcome"], "replied");
    assert_eq!(reply["reply"], "in json");
    assert_eq!(reply["peer"], "spiffe://mesh.test/domus/alpha");

    // A sink accepts; a log taberna accepts too.
    let out = ok(client("send", &alpha, "8").arg("to the sink"));
    assert!(out.starts_with("accepted"), "{out}");
    let accepted = json(&ok(client("send", &alpha, "9").arg("--json").arg("logged")));
    assert_eq!(accepted["outcome"], "accepted");

    // A file as a blob reaches the sink.
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    let file = dir.path().join("data.bin");
    std::fs::write(&file, &data).expect("write data.bin");
    let blob = json(&ok(client("send", &alpha, "8")
        .args(["--json", "--blob", "--file"])
        .arg(&file)));
    assert_eq!(blob["outcome"], "accepted");
    assert_eq!(blob["blob_bytes"], 3_000_000);
    // ... and the same file as one message is too large, with a hint.
    let e = fails(client("send", &alpha, "8").arg("--file").arg(&file));
    assert!(e.contains("--blob"), "{e}");

    // Alpha forwards to beta over its [[route]]: beta's echo answers.
    let out = ok(client("send", &alpha, "10").arg("via alpha"));
    assert!(out.trim_end().ends_with(": via alpha"), "{out}");

    // Errors are one line with the ErrorId, and exit 1.
    let e = fails(client("send", &alpha, "99").arg("nobody"));
    assert!(
        e.contains("UnknownTaberna") && e.contains("not delivered"),
        "{e}"
    );
    // vicus bench loads the node's echo (7) and sink (8), its defaults.
    let bench = ok(vicus()
        .args([
            "bench",
            "--to",
            &alpha.addr,
            "--as",
            "client",
            "--duration",
            "300ms",
            "--json",
            "--certs",
        ])
        .arg(&certs));
    let lines: Vec<Value> = bench.lines().map(json).collect();
    assert_eq!(lines.len(), 2, "{bench}");
    assert!(lines[0]["acked"].as_u64().is_some_and(|n| n > 0), "{bench}");
    assert!(
        lines[1]["p50_us"].as_f64().is_some_and(|p| p > 0.0),
        "{bench}"
    );
    // With --json the failure is the send's own outcome object.
    let ran = run(client("send", &alpha, "99").args(["--json", "nobody"]));
    assert_eq!(ran.code, Some(1));
    let failed = json(&ran.stdout);
    assert_eq!(failed["outcome"], "error", "{failed}");
    assert_eq!(failed["error_id"], "UnknownTaberna", "{failed}");
    assert_eq!(failed["outcome_unknown"], false, "{failed}");
    assert!(
        failed["error"]
            .as_str()
            .is_some_and(|e| e.contains("nobody") || e.contains("99")),
        "{failed}"
    );
    // A pinned identity is enforced at the handshake.
    let e = fails(
        client("send", &alpha, "7")
            .args([
                "--identity",
                "spiffe://mesh.test/domus/beta",
                "--timeout",
                "1s",
            ])
            .arg("pinned"),
    );
    assert!(
        e.contains(
            "presented spiffe://mesh.test/domus/alpha, expected spiffe://mesh.test/domus/beta"
        ),
        "{e}"
    );

    // Ping: a line per round trip, then the summary.
    let out = ok(client("ping", &alpha, "7").args(["--count", "5", "--interval", "10ms"]));
    assert_eq!(
        out.lines().filter(|l| l.starts_with("seq=")).count(),
        5,
        "{out}"
    );
    assert!(
        out.contains("5 sent, 5 answered (5 replied, 0 accepted), 0 lost"),
        "{out}"
    );
    assert!(out.contains(" p50 ") && out.contains(" p99 "), "{out}");
    let summary = json(&ok(client("ping", &beta, "20").args([
        "--json",
        "--count",
        "3",
        "--interval",
        "1ms",
    ])));
    assert_eq!(summary["sent"], 3);
    assert_eq!(summary["replied"], 3);
    assert_eq!(summary["lost"], 0);
    assert_eq!(summary["rtts_ms"].as_array().map(Vec::len), Some(3));
    for key in ["min_ms", "p50_ms", "p99_ms", "max_ms", "connect_ms"] {
        assert!(
            summary[key].as_f64().is_some_and(|v| v > 0.0),
            "{key}: {summary}"
        );
    }
    assert!(
        summary["p50_ms"].as_f64() <= summary["p99_ms"].as_f64(),
        "{summary}"
    );

    // SIGTERM: a clean shutdown, exit 0, and the tabernas' totals.
    let (code, lines) = alpha.terminate();
    assert_eq!(code, Some(0), "{lines:?}");
    let event = |name: &str| {
        lines
            .iter()
            .filter(|l| l["event"] == name)
            .collect::<Vec<_>>()
    };
    assert_eq!(event("stopping").len(), 1, "{lines:?}");
    assert_eq!(event("stopped").len(), 1, "{lines:?}");
    assert!(!event("peer_connected").is_empty(), "{lines:?}");
    let logged = event("message");
    assert!(
        logged
            .iter()
            .any(|l| l["head"] == "\"logged\"" && l["from"] == "spiffe://mesh.test/domus/client"),
        "{lines:?}"
    );
    let stats = event("taberna_stats");
    let sink = stats
        .iter()
        .find(|l| l["taberna"] == 8)
        .expect("the sink's totals");
    assert_eq!(sink["blobs"], 1, "{sink}");
    assert_eq!(sink["blob_bytes"], 3_000_000, "{sink}");
    let forward = stats
        .iter()
        .find(|l| l["taberna"] == 10)
        .expect("the forward's totals");
    assert_eq!(forward["messages"], 1, "{forward}");
    let (code, _) = beta.terminate();
    assert_eq!(code, Some(0));
}

#[test]
fn bad_configs_fail_with_one_line_naming_the_file_line_and_key() {
    let dir = TempDir::new("config");
    make_certs(&dir, "vicus.dev", &["alpha"]);
    let tls =
        "[tls]\nca = \"certs/ca.pem\"\ncert = \"certs/alpha.pem\"\nkey = \"certs/alpha.key\"\n";
    let cases: Vec<(&str, String, Vec<&str>)> = vec![
        (
            "unknown-key.toml",
            format!("bind = \"127.0.0.1:0\"\nbnd = 1\n{tls}"),
            vec!["unknown-key.toml:2:", "unknown field `bnd`"],
        ),
        (
            "bad-toml.toml",
            format!("bind = \"127.0.0.1:0\n{tls}"),
            vec!["bad-toml.toml:1:"],
        ),
        (
            "missing-cert.toml",
            "bind = \"127.0.0.1:0\"\n[tls]\nca = \"certs/ca.pem\"\ncert = \"certs/nobody.pem\"\nkey = \"certs/alpha.key\"\n".to_owned(),
            vec!["missing-cert.toml:4:", "[tls] cert", "nobody.pem"],
        ),
        (
            "not-a-cert.toml",
            "bind = \"127.0.0.1:0\"\n[tls]\nca = \"certs/ca.pem\"\ncert = \"certs/README.txt\"\nkey = \"certs/alpha.key\"\n".to_owned(),
            vec!["[tls]", "InvalidAuthMaterial"],
        ),
        (
            "bad-behaviour.toml",
            format!("bind = \"127.0.0.1:0\"\n{tls}\n[[taberna]]\nid = 1\nbehaviour = \"echoo\"\n"),
            vec!["bad-behaviour.toml:9:", "unknown variant `echoo`"],
        ),
        (
            "bad-bind.toml",
            format!("bind = \"nowhere\"\n{tls}"),
            vec!["bad-bind.toml:1:", "bind:"],
        ),
        (
            "no-tls.toml",
            "bind = \"127.0.0.1:0\"\n".to_owned(),
            vec!["no-tls.toml", "missing field `tls`"],
        ),
        (
            "two-sources.toml",
            format!(
                "bind = \"127.0.0.1:0\"\nroutes_file = \"r.toml\"\n{tls}\n[[route]]\ntaberna = 1\naddr = \"127.0.0.1:1\"\n"
            ),
            vec!["one source of routes"],
        ),
    ];
    for (file, text, expected) in cases {
        let path = dir.write(file, &text);
        let e = fails(vicus().args(["node", "--config"]).arg(&path));
        for part in expected {
            assert!(e.contains(part), "{file}: expected {part:?} in: {e}");
        }
    }
    let e = fails(
        vicus()
            .args(["node", "--config"])
            .arg(dir.path().join("absent.toml")),
    );
    assert!(e.contains("--config") && e.contains("absent.toml"), "{e}");

    // A bind address in use.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("addr").port();
    let path = dir.write(
        "in-use.toml",
        &format!("bind = \"127.0.0.1:{port}\"\n{tls}"),
    );
    let e = fails(vicus().args(["node", "--config"]).arg(&path));
    assert!(
        e.contains(&format!("127.0.0.1:{port}")) && e.contains("bind"),
        "{e}"
    );

    // With --json the error is also a JSON object on stdout.
    let path = dir.path().join("unknown-key.toml");
    let ran = run(vicus().args(["--json", "node", "--config"]).arg(&path));
    assert_eq!(ran.code, Some(1));
    assert!(
        json(&ran.stdout)["error"]
            .as_str()
            .is_some_and(|e| e.contains("bnd")),
        "{}",
        ran.stdout
    );
}

#[test]
fn clients_without_usable_certificates_fail_with_one_line() {
    let dir = TempDir::new("client");
    let certs = make_certs(&dir, "vicus.dev", &["client"]);
    let e = fails(
        vicus()
            .args(["send", "--to", "127.0.0.1:1", "--taberna", "1", "--certs"])
            .arg(&certs)
            .args(["--as", "nobody", "hi"]),
    );
    assert!(e.contains("nobody.pem"), "{e}");
    let e = fails(vicus().args(["ping", "--to", "127.0.0.1:1", "--taberna", "1"]));
    assert!(e.contains("--certs"), "{e}");
    let e = fails(
        vicus()
            .args(["send", "--to", "127.0.0.1:1", "--taberna", "1", "--ca"])
            .arg(certs.join("ca.pem"))
            .arg("hi"),
    );
    assert!(e.contains("all three"), "{e}");
    // A duration without a unit is refused by the command line parser (exit 2).
    let ran = run(vicus()
        .args([
            "send",
            "--to",
            "127.0.0.1:1",
            "--taberna",
            "1",
            "--as",
            "client",
            "--timeout",
            "5",
            "--certs",
        ])
        .arg(&certs)
        .arg("hi"));
    assert_eq!(ran.code, Some(2), "{}", ran.stderr);
    assert!(ran.stderr.contains("e.g. 5s"), "{}", ran.stderr);
    // Nobody listens: a one-line PeerUnavailable, quickly.
    let free = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = free.local_addr().expect("addr").to_string();
    drop(free);
    let e = fails(
        vicus()
            .args([
                "send",
                "--to",
                &addr,
                "--taberna",
                "1",
                "--as",
                "client",
                "--timeout",
                "1s",
                "--certs",
            ])
            .arg(&certs)
            .arg("hi"),
    );
    assert!(e.contains("failed") && e.contains("not delivered"), "{e}");
}

#[test]
fn a_watched_node_reloads_certificates_issued_again_in_place() {
    let dir = TempDir::new("watch");
    let certs = make_certs(&dir, "vicus.dev", &["alpha", "client"]);
    let config = node_config(&dir, "alpha.toml", "alpha", &[(7, "echo")], "");
    // [tls] must hold the watch keys: rewrite the file with them.
    let text = std::fs::read_to_string(&config).expect("config");
    let text = text.replace(
        "key = \"certs/alpha.key\"\n",
        "key = \"certs/alpha.key\"\nwatch = true\nwatch_interval = \"50ms\"\n",
    );
    std::fs::write(&config, text).expect("config");
    let alpha = Node::start(&config);
    ok(vicus()
        .args(["certs", "issue", "alpha", "--force", "--days", "2", "--dir"])
        .arg(&certs));
    let deadline = Instant::now() + NODE_TIMEOUT;
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match alpha.lines.recv_timeout(left) {
            Ok(line) => {
                let event = json(&line);
                if event["event"] == "auth_reloaded" {
                    break;
                }
                seen.push(event);
            }
            Err(e) => panic!("no auth_reloaded event ({e}); saw {seen:?}"),
        }
    }
    // The node still answers, with the new certificate.
    let out = ok(vicus()
        .args([
            "send",
            "--to",
            &alpha.addr,
            "--taberna",
            "7",
            "--as",
            "client",
            "--certs",
        ])
        .arg(&certs)
        .arg("after the reload"));
    assert!(out.contains("after the reload"), "{out}");
    let (code, _) = alpha.terminate();
    assert_eq!(code, Some(0));
}

/// `vicus demo --duration` beyond what the clock can add (about 9.2e18 s) panicked with
/// "overflow when adding duration to instant" after starting its nodes; now any duration over
/// the documented 365 days is a usage error at once (exit 2), naming the limit.
#[test]
fn a_demo_duration_past_the_limit_is_a_usage_error_not_a_panic() {
    for duration in [
        "9300000000000000000",
        "18446744073709551615",
        "9999999h",
        "31536001s",
    ] {
        let started = Instant::now();
        let ran = run(vicus().args(["demo", "--json", "--duration", duration]));
        assert_eq!(
            ran.code,
            Some(2),
            "--duration {duration}: stdout {}; stderr {}",
            ran.stdout,
            ran.stderr
        );
        assert!(
            ran.stderr.contains("at most 365 days") && !ran.stderr.contains("panicked"),
            "--duration {duration}: {}",
            ran.stderr
        );
        assert!(
            started.elapsed() < std::time::Duration::from_secs(10),
            "refused before any node starts"
        );
    }
}
