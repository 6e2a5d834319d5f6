//! `vicus::testing::Mesh` through its public API: a mesh in one line, tabernas registered and
//! routed by name, sends by name, restarts under the same name, typed errors for unknown names,
//! a crash by dropping the only handle, and a fault proxy placed on a route.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use vicus::testing::MESH_MESSAGE_TYPE;
use vicus::{Delivery, ErrorId, SendOptions, TabernaId};

#[tokio::test]
async fn a_mesh_in_one_line_routes_and_sends_by_name_and_follows_a_restart() {
    within(async {
        let mut mesh = Mesh::with_domus(&["a", "b", "c"]).await.expect("mesh");
        assert_eq!(mesh.names().collect::<Vec<_>>(), ["a", "b", "c"]);
        spawn_named_echo(mesh.taberna("b", TabernaId(1)).expect("taberna"), "b");
        spawn_named_echo(mesh.taberna("c", TabernaId(2)).expect("taberna"), "c");
        for (from, to, want) in [
            ("a", 1, "b:x"),
            ("a", 2, "c:x"),
            ("b", 2, "c:x"),
            ("c", 1, "b:x"),
        ] {
            let out = mesh
                .send(from, TabernaId(to), Bytes::from_static(b"x"))
                .await
                .expect("send");
            assert_eq!(
                out,
                Delivery::Replied(Bytes::from(want).into()),
                "{from} -> {to}"
            );
        }
        // The receiver sees the sender's identity as the mesh minted it.
        let seen = mesh.taberna("a", TabernaId(3)).expect("taberna");
        let b = mesh.get("b").expect("b");
        let send = tokio::spawn(b.send(
            TabernaId(3),
            MESH_MESSAGE_TYPE,
            Bytes::from_static(b"who"),
            SendOptions::default(),
        ));
        let req = seen.recv().await.expect("request");
        assert_eq!(req.peer().id(), b.identity());
        req.accept();
        assert_eq!(send.await.expect("join").expect("send"), Delivery::Accepted);

        // A restart under the same name takes it over; the route follows the new address.
        b.shutdown().await;
        drop(b);
        let b = mesh.domus("b").await.expect("restart b");
        spawn_named_echo(mesh.taberna("b", TabernaId(1)).expect("taberna"), "b2");
        // a may not have read the old b's CLOSE yet: a send that races it fails as not
        // delivered (PeerShutDown), which a caller may retry at once.
        let out = match mesh.send("a", TabernaId(1), Bytes::from_static(b"y")).await {
            Err(e) if e.id() == ErrorId::PeerShutDown && !e.outcome_unknown() => mesh
                .send("a", TabernaId(1), Bytes::from_static(b"y"))
                .await
                .expect("the retry reaches the new run"),
            other => other.expect("send after restart"),
        };
        assert_eq!(out, Delivery::Replied(Bytes::from_static(b"b2:y").into()));
        assert_eq!(mesh.get("b").expect("b").epoch(), b.epoch());
        mesh.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn unknown_names_are_typed_errors_and_a_removed_domus_stops_when_dropped() {
    within(async {
        let mut mesh = Mesh::with_domus(&["a", "b"]).await.expect("mesh");
        for err in [
            mesh.get("nobody").map(drop).expect_err("unknown"),
            mesh.taberna("nobody", TabernaId(1))
                .map(drop)
                .expect_err("unknown"),
            mesh.send("nobody", TabernaId(1), Bytes::new())
                .await
                .map(drop)
                .expect_err("unknown"),
        ] {
            assert_eq!(err.id(), ErrorId::InvalidConfig, "{err}");
            assert!(err.message().contains("nobody"), "{err}");
        }
        let t = mesh.taberna("b", TabernaId(1)).expect("taberna");
        drop(t);
        // Removing hands back the only handle: dropping it stops b like a crash, and a send
        // to its taberna then fails instead of hanging.
        let b = mesh.remove("b").expect("b was known");
        assert!(mesh.get("b").is_err());
        drop(b);
        let a = mesh.get("a").expect("a");
        let err = a
            .send(
                TabernaId(1),
                MESH_MESSAGE_TYPE,
                Bytes::from_static(b"anyone?"),
                SendOptions::default().timeout(Duration::from_secs(2)),
            )
            .await
            .expect_err("b is gone");
        // Never dialled before the crash, so the message cannot have reached anyone.
        assert!(!err.outcome_unknown(), "{err}");
    })
    .await;
}

#[tokio::test]
async fn a_route_through_the_fault_proxy_carries_sends_and_a_cut_is_survived() {
    within(async {
        let mesh = Mesh::with_domus(&["a", "b"]).await.expect("mesh");
        let b = mesh.get("b").expect("b");
        spawn_named_echo(b.taberna(TabernaId(9)).expect("taberna"), "b");
        let proxy = mesh
            .route_through_proxy(TabernaId(9), &b)
            .await
            .expect("proxy");
        let out = mesh
            .send("a", TabernaId(9), Bytes::from_static(b"1"))
            .await
            .expect("through the proxy");
        assert_eq!(out, Delivery::Replied(Bytes::from_static(b"b:1").into()));
        assert!(
            proxy.connections() >= 1,
            "the callis goes through the proxy"
        );
        proxy.cut_all();
        let out = mesh
            .send("a", TabernaId(9), Bytes::from_static(b"2"))
            .await
            .expect("after the cut");
        assert_eq!(out, Delivery::Replied(Bytes::from_static(b"b:2").into()));
        assert!(proxy.total_accepted() >= 2, "the cut callis was redialled");
    })
    .await;
}

#[tokio::test]
async fn the_simple_resolver_passes_the_resolver_conformance_suite() {
    use vicus::testing::conformance::{SimpleResolverUnderTest, check_resolver};
    within(async {
        let target = SimpleResolverUnderTest::default();
        let report = check_resolver(&target, Duration::from_secs(2)).await;
        assert!(report.checks.len() >= 7, "{report:?}");
        report.assert_passed();
    })
    .await;
}

/// The suite can fail: a resolver that never answers for unknown tabernas, and another that
/// ignores changes, are caught.
#[tokio::test]
async fn the_conformance_suite_catches_a_hanging_and_a_stale_resolver() {
    use std::future::Future;
    use std::pin::Pin;
    use std::sync::Arc;
    use vicus::resolve::{Candidate, ResolveFuture, RouteResolver};
    use vicus::testing::conformance::{ResolverUnderTest, check_resolver};

    /// Answers what was set first, forever; hangs for anything unknown.
    struct Stale(std::sync::Mutex<Option<(TabernaId, vicus::Route)>>);
    impl RouteResolver for Stale {
        fn resolve(&self, taberna: TabernaId) -> ResolveFuture<'_> {
            let known = self.0.lock().unwrap().clone();
            Box::pin(async move {
                match known {
                    Some((t, r)) if t == taberna => Ok(r),
                    _ => std::future::pending().await,
                }
            })
        }
    }
    struct Target(Arc<Stale>);
    impl ResolverUnderTest for Target {
        fn resolver(&self) -> Arc<dyn RouteResolver> {
            self.0.clone()
        }
        fn set<'a>(
            &'a self,
            taberna: TabernaId,
            candidates: Vec<Candidate>,
        ) -> Pin<Box<dyn Future<Output = ()> + Send + 'a>> {
            let mut first = self.0.0.lock().unwrap();
            if first.is_none() {
                *first = Some((taberna, candidates[0].route.clone()));
            }
            Box::pin(async {})
        }
        fn remove<'a>(&'a self, _: TabernaId) -> Pin<Box<dyn Future<Output = ()> + Send + 'a>> {
            Box::pin(async {})
        }
    }
    within(async {
        let report = check_resolver(
            &Target(Arc::new(Stale(std::sync::Mutex::new(None)))),
            Duration::from_millis(300),
        )
        .await;
        let failed: Vec<&str> = report.failures().map(|c| c.name).collect();
        println!("{failed:?}");
        assert!(!report.passed());
        assert!(failed.iter().any(|n| n.contains("unknown")), "{failed:?}");
        assert!(failed.iter().any(|n| n.contains("change")), "{failed:?}");
    })
    .await;
}
