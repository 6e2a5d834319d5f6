//! Topics from the command line, end to end with the built binary: a `vicus node` with a
//! `[topics]` table (a log subscription and a `publish` taberna), `vicus pub` into the
//! node's subscription, and `vicus sub` receiving what the node publishes when `vicus send`
//! reaches its publish taberna. Every process runs under a deadline and is killed at the end.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::{NODE_TIMEOUT, Node, TempDir, bin, fails, json, make_certs, node_config, ok, vicus};

/// A background `vicus --json sub …`, killed when dropped; its stdout lines on a channel.
struct Sub {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Sub {
    fn start(args: &[&str], certs: &std::path::Path) -> Self {
        let mut child = std::process::Command::new(bin())
            .args(["--json", "sub"])
            .args(args)
            .arg("--certs")
            .arg(certs)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start vicus sub");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self { child, lines }
    }

    fn next(&self) -> serde_json::Value {
        json(
            &self
                .lines
                .recv_timeout(NODE_TIMEOUT)
                .expect("a line from vicus sub"),
        )
    }

    fn exit_code(mut self) -> Option<i32> {
        let deadline = std::time::Instant::now() + NODE_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status.code();
            }
            assert!(
                std::time::Instant::now() < deadline,
                "vicus sub did not exit"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Sub {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn pub_and_sub_through_a_node_with_topics() {
    let dir = TempDir::new("topics");
    let certs = make_certs(&dir, "topics.test", &["hub", "client", "listener"]);
    let config = node_config(
        &dir,
        "hub.toml",
        "hub",
        &[],
        "\n[topics]\nsubscribe = [{ pattern = \"orders.>\", behaviour = \"log\" }]\n\n[[taberna]]\nid = 12\nbehaviour = \"publish\"\ntopic = \"orders.new\"\n",
    );
    let hub = Node::start(&config);
    assert_eq!(hub.started["topics"][0], "orders.> log", "{}", hub.started);

    // vicus pub reaches the node's own subscription, and the node logs the copy.
    let out = ok(vicus()
        .args([
            "--json",
            "pub",
            "orders.eu.new",
            "order 42",
            "--to",
            &hub.addr,
        ])
        .args(["--identity", &hub.identity, "--as", "client", "--certs"])
        .arg(&certs));
    let report = json(out.lines().next().expect("one report"));
    assert_eq!(report["recipients"], 1, "{report}");
    assert_eq!(report["delivered"], 1, "{report}");
    assert_eq!(report["copies"][0]["subscriber"], hub.identity.as_str());
    assert_eq!(report["copies"][0]["outcome"], "accepted");
    let logged = loop {
        let line = json(&hub.lines.recv_timeout(NODE_TIMEOUT).expect("node line"));
        if line["event"] == "topic_message" {
            break line;
        }
    };
    assert_eq!(logged["topic"], "orders.eu.new");
    assert!(
        logged["head"].as_str().expect("head").contains("order 42"),
        "{logged}"
    );
    assert!(logged["from"].as_str().expect("from").ends_with("/client"));

    // vicus sub at the node gets what the node publishes (its publish taberna).
    let sub = Sub::start(
        &[
            "orders.*",
            "--count",
            "1",
            "--to",
            &hub.addr,
            "--identity",
            &hub.identity,
            "--as",
            "listener",
        ],
        &certs,
    );
    let granted = sub.next();
    assert_eq!(granted["event"], "subscribed", "{granted}");
    let reply = json(&ok(vicus()
        .args(["--json", "send", "--to", &hub.addr, "--taberna", "12"])
        .args(["--as", "client", "--certs"])
        .arg(&certs)
        .arg("fresh order")));
    let summary = json(reply["reply"].as_str().expect("a reply"));
    assert_eq!(summary["topic"], "orders.new");
    assert_eq!(
        summary["recipients"], 2,
        "the node's own and the listener: {summary}"
    );
    assert_eq!(summary["delivered"], 2, "{summary}");
    let copy = sub.next();
    assert_eq!(copy["event"], "copy", "{copy}");
    assert_eq!(copy["topic"], "orders.new");
    assert_eq!(copy["message"], "fresh order");
    assert_eq!(copy["publisher"], hub.identity.as_str());
    assert_eq!(sub.exit_code(), Some(0));

    // A topic with a wildcard is a one-line error.
    let e = fails(
        vicus()
            .args(["pub", "orders.*", "x", "--to", &hub.addr])
            .args(["--identity", &hub.identity, "--as", "client", "--certs"])
            .arg(&certs),
    );
    assert!(
        e.contains("wildcard") || e.contains("InvalidTopic") || e.contains("topic"),
        "{e}"
    );
    let (code, _) = hub.terminate();
    assert_eq!(code, Some(0));
}
