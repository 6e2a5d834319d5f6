//! Shared support for the loopback integration tests: a CA and identities minted per test,
//! a deadline wrapper every async test runs under, polling a condition under a deadline, the
//! rule for a missing prerequisite ([`skip_or_fail`]), and small socket helpers. The mesh and
//! the fault proxy are the public ones from `vicus::testing` (feature `test-util`).
#![allow(dead_code, unreachable_pub, unused_imports)]

use std::future::Future;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use vicus::a0_transport::{AuthenticatedStream, Listener, Transport, TransportConfig};
use vicus::dev_certs::DevCa;
use vicus::{DomusAddr, DomusId, Error};

/// The bound on any single test; generous so a loaded CI machine never flakes.
pub const TEST_DEADLINE: Duration = Duration::from_secs(30);

/// Runs `fut` under [`TEST_DEADLINE`]; a hang fails the test instead of stalling the suite.
pub async fn within<F: Future>(fut: F) -> F::Output {
    tokio::time::timeout(TEST_DEADLINE, fut)
        .await
        .expect("test exceeded its deadline")
}

/// Polls `cond` every 10 ms until it holds or `limit` passes; whether it held. For a
/// condition a test waits for: a fixed sleep before an assertion flakes on a loaded machine
/// and wastes time on an idle one.
pub async fn eventually(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    while tokio::time::Instant::now() < deadline {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    cond()
}

/// Whether this run is CI's: the `CI` variable set to `true` or `1` (`.ci/run` exports it).
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"))
}

/// A prerequisite of a test is missing (`what` says which, and what is not checked): under CI
/// the test fails here, since a check CI skips is a check nobody runs; elsewhere one
/// `SKIPPED: …` line goes to stderr (past the test harness's capture, so it shows in a plain
/// `cargo test`) and the caller returns.
pub fn skip_or_fail(what: &str) {
    assert!(
        !in_ci(),
        "missing prerequisite under CI: {what} (.ci/run installs what the tests need)"
    );
    use std::io::Write as _;
    let _ = writeln!(std::io::stderr(), "SKIPPED: {what}");
}

/// A fresh development CA for one test.
pub fn ca() -> DevCa {
    ca_named("vicus test CA")
}

/// A fresh development CA with the given common name.
pub fn ca_named(name: &str) -> DevCa {
    DevCa::new(name).expect("mint CA")
}

/// A transport for `spiffe://vicus.dev/domus/<name>` signed by `ca`.
pub fn transport(ca: &mut DevCa, name: &str) -> Transport {
    transport_with(ca, name, TransportConfig::default())
}

/// Like [`transport`], with a config.
pub fn transport_with(ca: &mut DevCa, name: &str, config: TransportConfig) -> Transport {
    let (auth, id) = ca.domus_auth(name).expect("mint leaf");
    let t = Transport::new(auth, config).expect("transport");
    assert_eq!(t.local_id(), id);
    t
}

pub fn id(name: &str) -> DomusId {
    DomusId::spiffe("vicus.dev", name).expect("valid id")
}

/// A TCP listener on an ephemeral loopback port.
pub async fn listen_tcp(t: &Transport) -> Listener {
    t.listen(&DomusAddr::tcp(([127, 0, 0, 1], 0)))
        .await
        .expect("listen")
}

/// Accepts one connection and runs its handshake.
pub async fn accept_one(l: &Listener) -> Result<AuthenticatedStream, Error> {
    l.accept().await?.handshake().await
}

/// Dials `l` from `dialer` while `l` accepts; returns (dialer result, listener result).
pub async fn handshake_pair(
    dialer: &Transport,
    l: &Listener,
    expected: Option<&DomusId>,
) -> (
    Result<AuthenticatedStream, Error>,
    Result<AuthenticatedStream, Error>,
) {
    tokio::join!(dialer.dial(l.local_addr(), expected), accept_one(l))
}

/// Proves a stream pair carries bytes both ways.
pub async fn ping_pong(a: &mut AuthenticatedStream, b: &mut AuthenticatedStream) {
    a.write_all(b"ping").await.expect("write ping");
    a.flush().await.expect("flush");
    let mut buf = [0u8; 4];
    b.read_exact(&mut buf).await.expect("read ping");
    assert_eq!(&buf, b"ping");
    b.write_all(b"pong").await.expect("write pong");
    b.flush().await.expect("flush");
    a.read_exact(&mut buf).await.expect("read pong");
    assert_eq!(&buf, b"pong");
}

/// Reads until EOF or error; true when the peer closed (EOF or reset) within `limit`.
pub async fn closed_within(s: &mut tokio::net::TcpStream, limit: Duration) -> bool {
    let mut buf = [0u8; 1024];
    let read_to_end = async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(limit, read_to_end).await.is_ok()
}

/// An [`vicus::AuthConfig`] that presents `leaf` and trusts only `trusted`.
pub fn auth_trusting(trusted: &DevCa, leaf: &vicus::dev_certs::DevLeaf) -> vicus::AuthConfig {
    vicus::AuthConfig::from_der(
        vec![trusted.cert_der().clone()],
        vec![leaf.cert_der().clone()],
        leaf.key_der(),
    )
    .expect("auth config")
}

/// A fresh private directory under the system temp dir (mode 0700, a unique name per call),
/// removed when the returned guard is dropped.
pub fn tempdir() -> TempDir {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let dir = std::env::temp_dir().join(format!(
        "vicus-test-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).expect("create temp dir");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    TempDir(dir)
}

/// A private directory from [`tempdir`], removed with what it holds when dropped.
#[derive(Debug)]
pub struct TempDir(std::path::PathBuf);

impl std::ops::Deref for TempDir {
    type Target = std::path::Path;

    fn deref(&self) -> &std::path::Path {
        &self.0
    }
}

impl AsRef<std::path::Path> for TempDir {
    fn as_ref(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub use vicus::testing::{FaultProxy, Mesh};

/// Replies "<name>:<payload>" to every request on `t` (which replica answered shows).
pub fn spawn_named_echo(t: vicus::Taberna, name: &'static str) {
    tokio::spawn(async move {
        while let Some(req) = t.recv().await {
            let mut reply = format!("{name}:").into_bytes();
            reply.extend_from_slice(req.payload());
            req.reply(bytes::Bytes::from(reply));
        }
    });
}

/// The address a listening domus is bound to (every test domus listens unless built
/// `dial_only`).
pub fn addr_of(d: &vicus::Domus) -> DomusAddr {
    d.local_addr().cloned().expect("the domus listens")
}

/// A hand-written peer over a real mutual-TLS callis: it says HELLO and then writes and
/// reads raw frames as it likes, as a hostile (or broken) implementation with a valid
/// certificate would.
pub struct RawPeer {
    pub io: AuthenticatedStream,
    pub buf: bytes::BytesMut,
}

impl RawPeer {
    /// Dials `to` as the identity of `transport` and writes a HELLO with `epoch`, `window`
    /// and `max_frame_len`.
    pub async fn connect(
        transport: &Transport,
        to: &vicus::Domus,
        epoch: u64,
        window: u32,
        max_frame_len: u32,
    ) -> RawPeer {
        use vicus::a1_callis::frame::{self, Hello};
        let mut io = transport
            .dial(&addr_of(to), Some(to.identity()))
            .await
            .expect("dial");
        let mut out = bytes::BytesMut::new();
        frame::encode_hello(
            &mut out,
            &Hello {
                version: frame::PROTOCOL_VERSION,
                epoch,
                max_frame_len,
                window,
                domus_id: transport.local_id().as_str().to_owned(),
            },
        );
        io.write_all(&out).await.expect("write HELLO");
        RawPeer {
            io,
            buf: bytes::BytesMut::new(),
        }
    }

    /// Writes `bytes` (whole frames).
    pub async fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.io.write_all(bytes).await?;
        self.io.flush().await
    }

    /// Reads frames until `pred` matches one; `None` when the callis ends or nothing comes
    /// for 10 s.
    /// The messages of the next MESSAGE or MESSAGE_BATCH frame (other frames are skipped).
    #[allow(dead_code)]
    pub async fn read_messages(&mut self) -> Option<Vec<vicus::a1_callis::frame::MessageFrame>> {
        use vicus::a1_callis::frame::Frame;
        match self
            .read_until(|f| matches!(f, Frame::Message(_) | Frame::MessageBatch(_)))
            .await?
        {
            Frame::Message(m) => Some(vec![m]),
            Frame::MessageBatch(batch) => Some(batch.iter().collect()),
            _ => None,
        }
    }

    pub async fn read_until(
        &mut self,
        mut pred: impl FnMut(&vicus::a1_callis::frame::Frame) -> bool,
    ) -> Option<vicus::a1_callis::frame::Frame> {
        loop {
            while let Ok(Some(f)) = vicus::a1_callis::frame::decode(&mut self.buf, 1 << 27) {
                if pred(&f) {
                    return Some(f);
                }
            }
            match tokio::time::timeout(Duration::from_secs(10), self.io.read_buf(&mut self.buf))
                .await
            {
                Ok(Ok(n)) if n > 0 => {}
                _ => return None,
            }
        }
    }
}

/// This process's resident set size in bytes (Linux).
pub fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("read /proc/self/statm");
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .expect("statm's resident field");
    pages * 4096
}

/// A mesh whose domus run with `DomusConfig::default()` (the production defaults, not the
/// short timers of `Mesh::test_config`).
pub fn default_mesh() -> Mesh {
    let mut mesh = Mesh::new().expect("mesh");
    mesh.set_config(vicus::DomusConfig::default());
    mesh
}

/// How many seeds each simulated chaos test runs: `VICUS_SIM_SEEDS`, else 100 (a file's two
/// chaos tests together run twice that many, on both cores).
pub fn sim_seeds_per_test() -> u64 {
    std::env::var("VICUS_SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(100)
}

/// Runs `run_seed` for every seed of `seeds` in turn (each panics on a failed check) and
/// prints how many ran and how long they took.
pub fn run_sim_seeds<R>(seeds: impl Iterator<Item = u64>, mut run_seed: impl FnMut(u64) -> R) {
    let started = std::time::Instant::now();
    let mut n = 0;
    for seed in seeds {
        run_seed(seed);
        n += 1;
    }
    println!("{n} seeds in {:?}", started.elapsed());
}
