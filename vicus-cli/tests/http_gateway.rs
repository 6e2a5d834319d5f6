//! `vicus node`'s `[http]` table end to end: a node process serving the HTTP gateway, called
//! with `curl` (a process): a reply, an acceptance, a 202 whose outcome the node prints as an
//! event, a blob from a file, the bearer token, `/healthz` and `/metrics`; and the config
//! rules (a non-loopback bind without tokens, unknown keys). T35.

mod common;

use std::process::Output;
use std::time::{Duration, Instant};

use common::{Node, TempDir, fails, json, make_certs, node_config, skip_or_fail, vicus};

const TOKEN: &str = "test-token-0123456789abcdef";

fn curl_installed() -> bool {
    std::process::Command::new("curl")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// `curl -sS --max-time 20 -w '\n%{http_code}' ARGS`: the body and the status.
fn curl(args: &[&str]) -> (String, u16) {
    let Output {
        status,
        stdout,
        stderr,
    } = std::process::Command::new("curl")
        .args(["-sS", "--max-time", "20", "-w", "\n%{http_code}"])
        .args(args)
        .output()
        .expect("run curl");
    assert!(
        status.success(),
        "curl failed: {}",
        String::from_utf8_lossy(&stderr)
    );
    let text = String::from_utf8_lossy(&stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').expect("the status line");
    (body.to_owned(), code.parse().expect("a status"))
}

fn bearer() -> String {
    format!("Authorization: Bearer {TOKEN}")
}

/// The next line the node prints that `matches`, within `limit`.
fn line_where(
    node: &Node,
    limit: Duration,
    matches: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = node
            .lines
            .recv_timeout(left)
            .expect("the node printed the line in time");
        let value = json(&line);
        if matches(&value) {
            return value;
        }
    }
}

#[test]
fn a_node_serves_the_http_gateway_to_curl() {
    if !curl_installed() {
        skip_or_fail("curl is not installed: vicus node's HTTP gateway is not checked");
        return;
    }
    let dir = TempDir::new("http");
    make_certs(&dir, "vicus.dev", &["alpha"]);
    dir.write("http-tokens", &format!("# who may call\n{TOKEN}\n"));
    let config = node_config(
        &dir,
        "alpha.toml",
        "alpha",
        &[(7, "echo"), (8, "sink")],
        "\n[http]\nbind = \"127.0.0.1:0\"\ntoken_file = \"http-tokens\"\nrequest_timeout = \"5s\"\n",
    );
    let node = Node::start(&config);
    let http = node.started["http"]
        .as_str()
        .expect("the started line names the HTTP address");
    let url = |path: &str| format!("http://{http}{path}");
    let auth = bearer();

    // InOut: the reply is the body.
    let (body, code) = curl(&[
        "-H",
        &auth,
        "-H",
        "Vicus-Message-Type: app:1",
        "--data-binary",
        "salve",
        &url("/tabernas/7"),
    ]);
    assert_eq!((body.as_str(), code), ("salve", 200));
    // Accepted without a reply.
    let (_, code) = curl(&[
        "-H",
        &auth,
        "--data-binary",
        "x",
        &url("/tabernas/8?type=app:1"),
    ]);
    assert_eq!(code, 204);
    // No token: 401.
    let (body, code) = curl(&["--data-binary", "x", &url("/tabernas/7?type=app:1")]);
    assert_eq!(code, 401, "{body}");
    assert_eq!(json(&body)["error"], "Unauthorized");
    // No such taberna anywhere.
    let (body, code) = curl(&[
        "-H",
        &auth,
        "--data-binary",
        "x",
        &url("/tabernas/99?type=app:1"),
    ]);
    assert_eq!(code, 404, "{body}");
    assert_eq!(json(&body)["error"], "UnknownTaberna");

    // InOnly: 202 with an id, and the node prints the outcome of that id.
    let (body, code) = curl(&[
        "-H",
        &auth,
        "-H",
        "Prefer: respond-async",
        "--data-binary",
        "later",
        &url("/tabernas/8?type=app:1"),
    ]);
    assert_eq!(code, 202, "{body}");
    let id = json(&body)["request_id"].as_u64().expect("request_id");
    let event = line_where(&node, Duration::from_secs(10), |v| {
        v["event"] == "detached_send_ended" && v["request_id"] == id
    });
    assert_eq!(event["outcome"], "accepted", "{event}");
    assert_eq!(event["taberna"], 8);

    // A blob from a file: 1 MiB streamed to the echo taberna, which reads and counts it.
    let blob = dir.write("blob.bin", &"v".repeat(1 << 20));
    let (body, code) = curl(&[
        "-H",
        &auth,
        "-H",
        "Vicus-Message-Type: app:1",
        "-H",
        "Vicus-Blob: YmxvYg==",
        "--data-binary",
        &format!("@{}", blob.display()),
        &url("/tabernas/7"),
    ]);
    assert_eq!(code, 204, "{body}");

    // Health needs no token; metrics do, and show this domus's counters.
    let (body, code) = curl(&[&url("/healthz")]);
    assert_eq!((code, json(&body)["status"].as_str()), (200, Some("ok")));
    let (_, code) = curl(&[&url("/metrics")]);
    assert_eq!(code, 401);
    let (text, code) = curl(&["-H", &auth, &url("/metrics")]);
    assert_eq!(code, 200);
    let label = format!("domus=\"{}\"", node.identity);
    let accepted = text
        .lines()
        .find(|l| l.starts_with("vicus_messages_accepted_total{") && l.contains(&label))
        .unwrap_or_else(|| panic!("no vicus_messages_accepted_total in:\n{text}"));
    let value: f64 = accepted
        .rsplit(' ')
        .next()
        .and_then(|v| v.parse().ok())
        .expect("a value");
    // The 204 and the detached send (the blob's opening message too).
    assert!(value >= 2.0, "{accepted}");

    let (code, lines) = node.terminate();
    assert_eq!(code, Some(0));
    let tally = lines
        .iter()
        .find(|v| v["event"] == "taberna_stats" && v["taberna"] == 7)
        .unwrap_or_else(|| panic!("no tally for taberna 7 in {lines:?}"));
    assert_eq!(tally["blob_bytes"], 1 << 20, "{tally}");
}

/// `[http] client_identities`: HTTPS with the node's own certificate (issued with `--host
/// 127.0.0.1`) and CA; curl with the allowed client's certificate gets its reply, curl without
/// a certificate or with another identity's gets no HTTP at all. (That client certificates
/// make a bind beyond loopback acceptable is checked on the config alone, in node.rs: tests
/// listen on loopback only.)
#[test]
fn a_node_serves_https_to_the_client_identities_it_names() {
    if !curl_installed() {
        skip_or_fail("curl is not installed: vicus node's HTTPS gateway is not checked");
        return;
    }
    let dir = TempDir::new("https");
    let certs = make_certs(&dir, "vicus.dev", &["client", "stranger"]);
    common::ok(
        vicus()
            .args(["certs", "issue", "alpha", "--host", "127.0.0.1", "--dir"])
            .arg(&certs),
    );
    let config = node_config(
        &dir,
        "alpha.toml",
        "alpha",
        &[(7, "echo")],
        "\n[http]\nbind = \"127.0.0.1:0\"\nclient_identities = [\"spiffe://vicus.dev/domus/client\"]\n",
    );
    let node = Node::start(&config);
    assert_eq!(node.started["https"], true, "{}", node.started);
    let port = node.started["http"]
        .as_str()
        .and_then(|a| a.rsplit(':').next())
        .expect("the HTTP address")
        .to_owned();
    let url = format!("https://127.0.0.1:{port}/tabernas/7?type=app:1");
    let file = |name: &str| certs.join(name).display().to_string();
    let ca = file("ca.pem");
    let https = |who: Option<&str>| {
        let mut args = vec!["--cacert".to_owned(), ca.clone()];
        if let Some(who) = who {
            args.extend([
                "--cert".to_owned(),
                file(&format!("{who}.pem")),
                "--key".to_owned(),
                file(&format!("{who}.key")),
            ]);
        }
        args.extend(["--data-binary".to_owned(), "salve".to_owned(), url.clone()]);
        let out = std::process::Command::new("curl")
            .args(["-sS", "--max-time", "20", "-w", "\n%{http_code}"])
            .args(&args)
            .output()
            .expect("run curl");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert_eq!(https(Some("client")), "salve\n200");
    assert!(https(None).ends_with("000"));
    assert!(https(Some("stranger")).ends_with("000"));
    let (code, _) = node.terminate();
    assert_eq!(code, Some(0));
}

#[test]
fn an_http_bind_beyond_loopback_needs_tokens_and_unknown_keys_are_refused() {
    let dir = TempDir::new("http-config");
    make_certs(&dir, "vicus.dev", &["alpha"]);
    let open = node_config(
        &dir,
        "open.toml",
        "alpha",
        &[],
        "\n[http]\nbind = \"0.0.0.0:0\"\n",
    );
    let e = fails(vicus().args(["node", "--config"]).arg(&open));
    assert!(e.contains("[http] bind") && e.contains("tokens"), "{e}");
    let typo = node_config(
        &dir,
        "typo.toml",
        "alpha",
        &[],
        "\n[http]\nbnid = \"127.0.0.1:0\"\n",
    );
    let e = fails(vicus().args(["node", "--config"]).arg(&typo));
    assert!(e.contains("bnid"), "{e}");
    let short = node_config(
        &dir,
        "short.toml",
        "alpha",
        &[],
        "\n[http]\ntokens = [\"short\"]\n",
    );
    let e = fails(vicus().args(["node", "--config"]).arg(&short));
    assert!(e.contains("[http] tokens"), "{e}");
    assert!(!e.contains("\"short\""), "a token is never printed: {e}");
}
