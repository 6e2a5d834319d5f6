//! Shared support for the `vicus` binary's integration tests: the binary under a timeout,
//! temporary directories removed on drop, the "exit 1 with one line on stderr" check, a
//! `vicus node` child process killed on drop, certificates and node configs written with
//! `vicus` itself, and the rule for a missing prerequisite ([`skip_or_fail`]).
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use assert_cmd::Command;
use serde_json::Value;

/// A prerequisite of a test is missing (`what` says which, and what is not checked): under CI
/// (`CI` set to `true` or `1`, as `.ci/run` exports it) the test fails here, since a check CI
/// skips is a check nobody runs; elsewhere one `SKIPPED: …` line goes to stderr (past the test
/// harness's capture) and the caller returns. The library's tests/common has the same rule.
pub fn skip_or_fail(what: &str) {
    let in_ci = std::env::var("CI").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    assert!(
        !in_ci,
        "missing prerequisite under CI: {what} (.ci/run installs what the tests need)"
    );
    use std::io::Write as _;
    let _ = writeln!(std::io::stderr(), "SKIPPED: {what}");
}

/// The longest any one command may run.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a node may take to print its first line, or to exit after SIGTERM.
pub const NODE_TIMEOUT: Duration = Duration::from_secs(30);

/// A directory of its own for one test, removed when dropped.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let path = std::env::temp_dir().join(format!(
            "vicus-cli-test-{tag}-{}-{}-{nanos}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&path).expect("create the test directory");
        Self(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn write(&self, name: &str, contents: &str) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, contents).expect("write a test file");
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The built `vicus` binary.
pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_vicus"))
}

/// `vicus` under a timeout.
pub fn vicus() -> Command {
    let mut cmd = Command::new(bin());
    cmd.timeout(COMMAND_TIMEOUT);
    cmd
}

/// What a finished command printed.
pub struct Ran {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

pub fn run(cmd: &mut Command) -> Ran {
    let output = cmd.output().expect("run vicus");
    Ran {
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// Runs `cmd`, which must succeed; its stdout.
pub fn ok(cmd: &mut Command) -> String {
    let ran = run(cmd);
    assert_eq!(
        ran.code,
        Some(0),
        "expected success; stdout: {}; stderr: {}",
        ran.stdout,
        ran.stderr
    );
    ran.stdout
}

/// Checks that `ran` failed with exit code 1 and exactly one line on stderr; that line.
pub fn one_line_error(ran: &Ran) -> String {
    assert_eq!(
        ran.code,
        Some(1),
        "expected exit 1; stdout: {}; stderr: {}",
        ran.stdout,
        ran.stderr
    );
    let lines: Vec<&str> = ran.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "expected one stderr line: {:?}", ran.stderr);
    assert!(lines[0].starts_with("vicus: error: "), "{}", lines[0]);
    lines[0].to_owned()
}

/// Runs `cmd`, which must fail with exit code 1 and exactly one line on stderr; that line.
pub fn fails(cmd: &mut Command) -> String {
    one_line_error(&run(cmd))
}

pub fn json(line: &str) -> Value {
    serde_json::from_str(line.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"))
}

/// A running `vicus --json node`, killed when dropped.
pub struct Node {
    child: Child,
    pub addr: String,
    pub identity: String,
    /// The first line it printed (`{"event":"started",…}`).
    pub started: Value,
    pub lines: mpsc::Receiver<String>,
    /// What it wrote to stderr so far (read on a thread, so it never blocks on a full pipe).
    stderr: Arc<Mutex<String>>,
}

impl Node {
    pub fn start(config: &Path) -> Self {
        let mut child = std::process::Command::new(bin())
            .args(["--json", "node", "--config"])
            .arg(config)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start vicus node");
        let (tx, lines) = mpsc::channel();
        let stdout = child.stdout.take().expect("stdout");
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut pipe = child.stderr.take().expect("stderr");
        let written = stderr.clone();
        std::thread::spawn(move || {
            let mut chunk = [0u8; 4096];
            while let Ok(n @ 1..) = pipe.read(&mut chunk) {
                let text = String::from_utf8_lossy(&chunk[..n]);
                written.lock().expect("stderr").push_str(&text);
            }
        });
        let mut node = Self {
            child,
            addr: String::new(),
            identity: String::new(),
            started: Value::Null,
            lines,
            stderr,
        };
        let first = match node.lines.recv_timeout(NODE_TIMEOUT) {
            Ok(line) => line,
            Err(e) => {
                let _ = node.child.kill();
                let _ = node.child.wait();
                std::thread::sleep(Duration::from_millis(100));
                let stderr = node.stderr.lock().expect("stderr").clone();
                panic!("the node printed no first line ({e}); stderr: {stderr}");
            }
        };
        let started = json(&first);
        assert_eq!(started["event"], "started", "{first}");
        node.addr = started["addr"].as_str().expect("addr").to_owned();
        node.identity = started["identity"].as_str().expect("identity").to_owned();
        node.started = started;
        node
    }

    /// Sends SIGTERM and waits for the exit; its exit code and every line it printed after
    /// the first.
    pub fn terminate(mut self) -> (Option<i32>, Vec<Value>) {
        let status = std::process::Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -TERM failed");
        let deadline = Instant::now() + NODE_TIMEOUT;
        let code = loop {
            if let Some(status) = self.child.try_wait().expect("wait for the node") {
                break status.code();
            }
            assert!(
                Instant::now() < deadline,
                "the node did not exit within {NODE_TIMEOUT:?} of SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut lines = Vec::new();
        while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(5)) {
            lines.push(json(&line));
        }
        (code, lines)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A CA for `trust_domain` in `dir/certs` and a certificate for each of `names`.
pub fn make_certs(dir: &TempDir, trust_domain: &str, names: &[&str]) -> PathBuf {
    let certs = dir.path().join("certs");
    ok(vicus()
        .args(["certs", "init", "--trust-domain", trust_domain, "--dir"])
        .arg(&certs));
    for name in names {
        ok(vicus().args(["certs", "issue", name, "--dir"]).arg(&certs));
    }
    certs
}

/// A node config with `tabernas` (`(id, behaviour)`) and `extra` appended.
pub fn node_config(
    dir: &TempDir,
    file: &str,
    name: &str,
    tabernas: &[(u64, &str)],
    extra: &str,
) -> PathBuf {
    let mut text = format!(
        "bind = \"127.0.0.1:0\"\n\n[tls]\nca = \"certs/ca.pem\"\ncert = \"certs/{name}.pem\"\nkey = \"certs/{name}.key\"\n"
    );
    for (id, behaviour) in tabernas {
        text.push_str(&format!(
            "\n[[taberna]]\nid = {id}\nbehaviour = \"{behaviour}\"\n"
        ));
    }
    text.push_str(extra);
    dir.write(file, &text)
}
