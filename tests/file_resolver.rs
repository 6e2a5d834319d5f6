//! The routes file resolver (feature `file-resolver`) against real domus: a rewrite of the
//! file moves new sends to another domus without a restart, garbage in the file is reported
//! once while the old routes keep delivering, and the resolver passes the conformance suite.
//! Every file is published the way a careful writer does: a temporary file renamed over it.
#![cfg(feature = "file-resolver")]

mod common;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use vicus::resolve::{Candidate, RouteResolver};
use vicus::testing::MESH_MESSAGE_TYPE;
use vicus::testing::conformance::{ResolverUnderTest, check_resolver};
use vicus::{Delivery, Domus, ErrorId, FileResolver, FileWatchHandle, SendOptions, TabernaId};

const INTERVAL: Duration = Duration::from_millis(50);
/// A change is in force within two intervals; this much more for a loaded machine.
const SLACK: Duration = Duration::from_secs(1);
/// Long enough for many polls: what must not happen has had every chance to.
const QUIET: Duration = Duration::from_millis(500);
const TABERNA: TabernaId = TabernaId(7);

/// A private directory holding `routes.toml`; removed when dropped.
struct RoutesDir {
    dir: TempDir,
}

impl RoutesDir {
    fn new(text: &str) -> Self {
        let dir = Self { dir: tempdir() };
        dir.publish(text);
        dir
    }

    fn path(&self) -> PathBuf {
        self.dir.join("routes.toml")
    }

    /// Writes a temporary file and renames it over `routes.toml` (one step for a reader).
    fn publish(&self, text: &str) {
        let tmp = self.dir.join("routes.toml.tmp");
        std::fs::write(&tmp, text).expect("write the temporary routes file");
        std::fs::rename(&tmp, self.path()).expect("rename it over routes.toml");
    }
}

/// A routes file sending [`TABERNA`] to `to` (its address, its identity pinned).
fn routes_to(to: &Domus) -> String {
    format!(
        "[[taberna]]\nid = {}\ncandidates = [{{ addr = \"{}\", identity = \"{}\" }}]\n",
        TABERNA.0,
        addr_of(to),
        to.identity()
    )
}

async fn send(from: &Domus, payload: &'static [u8]) -> Result<Delivery, vicus::Error> {
    from.send(
        TABERNA,
        MESH_MESSAGE_TYPE,
        Bytes::from_static(payload),
        SendOptions::default().timeout(Duration::from_secs(5)),
    )
    .await
}

/// Sends until one is answered by `name` (or `bound` passes); how long that took.
async fn until_answered_by(from: &Domus, name: &str, bound: Duration) -> Duration {
    let start = Instant::now();
    let want = Delivery::Replied(Bytes::from(format!("{name}:x")).into());
    loop {
        let got = send(from, b"x").await;
        if got.as_ref().ok() == Some(&want) {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < bound,
            "no send reached {name} within {bound:?}; the last got {got:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The `ResolverFailed` errors on `domus`'s error feed so far.
fn resolver_failures(domus: &Domus) -> Vec<vicus::Error> {
    domus
        .reporting()
        .errors_since(0, 10_000)
        .errors
        .into_iter()
        .map(|e| e.error)
        .filter(|e| e.id() == ErrorId::ResolverFailed)
        .collect()
}

/// Waits (at most [`SLACK`]) until `domus` has reported `n` `ResolverFailed` errors, then
/// [`QUIET`] more, and returns them all: the caller checks there are still `n` (each problem
/// reported once, not again at every poll).
async fn resolver_failures_after(domus: &Domus, n: usize) -> Vec<vicus::Error> {
    assert!(
        eventually(SLACK, || resolver_failures(domus).len() >= n).await,
        "{n} ResolverFailed errors expected within {SLACK:?}: {:?}",
        resolver_failures(domus)
    );
    tokio::time::sleep(QUIET).await;
    resolver_failures(domus)
}

/// b and c each serve [`TABERNA`] (answering with their names); a is routed by a routes file
/// that starts out pointing at b.
struct Setup {
    mesh: vicus::testing::Mesh,
    a: Domus,
    b: Domus,
    c: Domus,
    routes: RoutesDir,
    _watch: FileWatchHandle,
}

async fn setup() -> Setup {
    let mut mesh = vicus::testing::Mesh::with_domus(&["b", "c"])
        .await
        .expect("mesh");
    let b = mesh.get("b").expect("b");
    let c = mesh.get("c").expect("c");
    spawn_named_echo(b.taberna(TABERNA).expect("taberna on b"), "b");
    spawn_named_echo(c.taberna(TABERNA).expect("taberna on c"), "c");
    let routes = RoutesDir::new(&routes_to(&b));
    let resolver = FileResolver::open(routes.path()).expect("open the routes file");
    let watch = resolver.watch(INTERVAL).expect("watch the routes file");
    let a = mesh
        .builder("a")
        .expect("builder")
        .resolver(resolver)
        .build()
        .await
        .expect("a");
    Setup {
        mesh,
        a,
        b,
        c,
        routes,
        _watch: watch,
    }
}

#[tokio::test]
async fn a_rewrite_of_the_routes_file_moves_new_sends_to_another_domus() {
    within(async {
        let s = setup().await;
        assert_eq!(
            send(&s.a, b"x").await.expect("a reaches b"),
            Delivery::Replied(Bytes::from_static(b"b:x").into())
        );

        s.routes.publish(&routes_to(&s.c));
        let took = until_answered_by(&s.a, "c", 2 * INTERVAL + SLACK).await;
        println!("the rewrite was in force after {took:?}");
        // And it stays there: nothing was restarted, and no later send goes back to b.
        for _ in 0..5 {
            assert_eq!(
                send(&s.a, b"x").await.expect("a reaches c"),
                Delivery::Replied(Bytes::from_static(b"c:x").into())
            );
        }
        assert!(resolver_failures(&s.a).is_empty());
        s.mesh.shutdown().await;
        s.a.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn garbage_is_reported_once_the_old_routes_stay_and_a_fix_is_applied() {
    within(async {
        let s = setup().await;
        assert_eq!(
            send(&s.a, b"x").await.expect("a reaches b"),
            Delivery::Replied(Bytes::from_static(b"b:x").into())
        );

        s.routes.publish("[[taberna]\nthis is not toml\n");
        let failures = resolver_failures_after(&s.a, 1).await;
        assert_eq!(failures.len(), 1, "reported once: {failures:?}");
        let m = failures[0].message();
        assert!(m.contains(&*s.routes.path().to_string_lossy()), "{m}");
        assert!(m.contains("line 1"), "{m}");
        assert!(m.contains("stay in force"), "{m}");
        // The routes read before still deliver.
        assert_eq!(
            send(&s.a, b"x").await.expect("a still reaches b"),
            Delivery::Replied(Bytes::from_static(b"b:x").into())
        );

        // A stable file with a bad value: reported once too, naming its line.
        s.routes.publish(&format!(
            "{}[[domus]]\nidentity = \"spiffe://vicus.dev/domus/b\"\naddr = \"nowhere\"\n",
            routes_to(&s.c)
        ));
        let failures = resolver_failures_after(&s.a, 2).await;
        assert_eq!(failures.len(), 2, "{failures:?}");
        assert!(failures[1].message().contains("line 6"), "{failures:?}");

        // The file disappears: one read error, and the routes stay.
        std::fs::remove_file(s.routes.path()).expect("remove the routes file");
        let failures = resolver_failures_after(&s.a, 3).await;
        assert_eq!(failures.len(), 3, "{failures:?}");
        assert!(
            failures[2].message().contains("cannot open"),
            "{failures:?}"
        );
        assert_eq!(
            send(&s.a, b"x").await.expect("a still reaches b"),
            Delivery::Replied(Bytes::from_static(b"b:x").into())
        );

        // Fixed: applied, and nothing more is reported.
        s.routes.publish(&routes_to(&s.c));
        until_answered_by(&s.a, "c", 2 * INTERVAL + SLACK).await;
        tokio::time::sleep(QUIET).await;
        assert_eq!(resolver_failures(&s.a).len(), 3);
        assert!(resolver_failures(&s.b).is_empty(), "b has its own resolver");
        s.mesh.shutdown().await;
        s.a.shutdown().await;
    })
    .await;
}

/// The routes file as a [`ResolverUnderTest`]: `set` and `remove` rewrite the whole file.
struct FileUnderTest {
    resolver: Arc<FileResolver>,
    tabernas: Mutex<BTreeMap<u64, Vec<Candidate>>>,
    routes: RoutesDir,
    _watch: FileWatchHandle,
}

impl FileUnderTest {
    fn new() -> Self {
        let routes = RoutesDir::new("");
        let resolver = FileResolver::open(routes.path()).expect("open the routes file");
        let watch = resolver.watch(INTERVAL).expect("watch the routes file");
        Self {
            resolver,
            tabernas: Mutex::new(BTreeMap::new()),
            routes,
            _watch: watch,
        }
    }

    fn rewrite(&self, change: impl FnOnce(&mut BTreeMap<u64, Vec<Candidate>>)) {
        let mut tabernas = self.tabernas.lock().expect("not poisoned");
        change(&mut tabernas);
        let mut text = String::new();
        for (id, candidates) in tabernas.iter() {
            let _ = writeln!(text, "[[taberna]]\nid = {id}\ncandidates = [");
            for c in candidates {
                let identity = c
                    .route
                    .identity
                    .as_ref()
                    .map(|i| format!(", identity = \"{i}\""))
                    .unwrap_or_default();
                let _ = writeln!(
                    text,
                    "  {{ addr = \"{}\"{identity}, priority = {}, weight = {} }},",
                    c.route.addr, c.priority, c.weight
                );
            }
            text.push_str("]\n");
        }
        self.routes.publish(&text);
    }
}

impl ResolverUnderTest for FileUnderTest {
    fn resolver(&self) -> Arc<dyn RouteResolver> {
        self.resolver.clone()
    }

    fn set<'a>(
        &'a self,
        taberna: TabernaId,
        candidates: Vec<Candidate>,
    ) -> Pin<Box<dyn Future<Output = ()> + Send + 'a>> {
        self.rewrite(|t| {
            t.insert(taberna.0, candidates);
        });
        Box::pin(std::future::ready(()))
    }

    fn remove<'a>(&'a self, taberna: TabernaId) -> Pin<Box<dyn Future<Output = ()> + Send + 'a>> {
        self.rewrite(|t| {
            t.remove(&taberna.0);
        });
        Box::pin(std::future::ready(()))
    }
}

#[tokio::test]
async fn the_file_resolver_passes_the_resolver_conformance_suite() {
    within(async {
        let target = FileUnderTest::new();
        let report = check_resolver(&target, 8 * INTERVAL).await;
        assert!(report.checks.len() >= 7, "{report:?}");
        report.assert_passed();
    })
    .await;
}

#[tokio::test]
async fn reload_now_applies_at_once_and_returns_what_is_wrong() {
    within(async {
        let routes = RoutesDir::new("");
        let resolver = FileResolver::open(routes.path()).expect("open the routes file");
        let mut changes = resolver.changes().expect("the resolver signals changes");
        assert!(!resolver.reload_now().await.expect("unchanged"));
        routes.publish("[[taberna]]\nid = 7\ncandidates = [{ addr = \"127.0.0.1:9\" }]\n");
        assert!(resolver.reload_now().await.expect("applied"));
        assert_eq!(resolver.table().len(), 1);
        tokio::time::timeout(Duration::from_secs(5), changes.changed())
            .await
            .expect("the change is signalled");
        routes.publish("[[taberna]]\nid = 7\ncandidates = []\n");
        let e = resolver.reload_now().await.expect_err("invalid");
        assert_eq!(e.id(), ErrorId::InvalidConfig);
        assert!(e.message().contains("no candidates"), "{e}");
        assert_eq!(resolver.table().len(), 1, "the routes in force stay");
    })
    .await;
}

#[tokio::test]
async fn a_resolver_has_one_poller_at_a_time_and_a_dropped_one_frees_it() {
    within(async {
        let routes = RoutesDir::new("");
        let resolver = FileResolver::open(routes.path()).expect("open the routes file");
        let first = resolver.watch(INTERVAL).expect("the first watch");
        let e = resolver
            .watch(INTERVAL * 2)
            .expect_err("a second poller while the first lives");
        assert_eq!(e.id(), ErrorId::InvalidConfig);
        assert!(e.message().contains("watched already"), "{e}");
        // A refused interval leaves the running poller alone, and the poller still applies.
        assert!(resolver.watch(Duration::ZERO).is_err());
        routes.publish("[[taberna]]\nid = 7\ncandidates = [{ addr = \"127.0.0.1:9\" }]\n");
        let started = Instant::now();
        while resolver.table().len() != 1 {
            assert!(
                started.elapsed() < SLACK,
                "the first poller applies the file"
            );
            tokio::time::sleep(INTERVAL / 2).await;
        }
        drop(first);
        let again = resolver
            .watch(INTERVAL)
            .expect("watched again once dropped");
        routes.publish("");
        let started = Instant::now();
        while !resolver.table().is_empty() {
            assert!(started.elapsed() < SLACK, "the new poller applies the file");
            tokio::time::sleep(INTERVAL / 2).await;
        }
        drop(again);
    })
    .await;
}
