//! Topics over loopback mutual TLS: publishers fan a publish out to every subscriber they
//! know, each copy an acknowledged message with its outcome in the publisher's report;
//! wildcards, a subscriber joining mid-stream, a slow subscriber, unsubscribe, a crashed
//! subscriber ageing out, and the topic policy on both sides.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use vicus::services::topics::{
    Action, CopyOutcome, Grant, SlowSubscriber, TopicPattern, TopicPolicy, Topics, TopicsConfig,
    Who,
};
use vicus::testing::Mesh;
use vicus::{Domus, DomusId, ErrorId, MessageType};

const TICK: MessageType = MessageType::app(7);

/// A mesh whose resolver knows every domus's address by identity (so a subscriber can reach
/// a publisher it has no session with yet).
async fn build(mesh: &mut Mesh, names: &[&str]) -> Vec<Domus> {
    let mut out = Vec::new();
    for name in names {
        let domus = mesh.domus(name).await.expect("domus");
        let addr = domus.local_addr().cloned().expect("listens");
        mesh.resolver().insert_domus(domus.identity().clone(), addr);
        out.push(domus);
    }
    out
}

fn config_with_publishers(publishers: &[&Domus]) -> TopicsConfig {
    let mut config = TopicsConfig::default();
    for p in publishers {
        config = config.publisher(p.identity().clone());
    }
    config
}

fn seq(payload: &[u8]) -> (u8, u32) {
    let publisher = payload[0];
    let n = u32::from_be_bytes([payload[1], payload[2], payload[3], payload[4]]);
    (publisher, n)
}

fn payload(publisher: u8, n: u32) -> Bytes {
    let mut v = vec![publisher];
    v.extend_from_slice(&n.to_be_bytes());
    Bytes::from(v)
}

/// Three publishers, five subscribers (exact topic, `*` and `>`): every publish reaches every
/// subscriber exactly once, in each publisher's order, and every report says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_publishers_five_subscribers_get_every_publish_once_in_order() {
    within(async {
        let mut mesh = default_mesh();
        let pubs = build(&mut mesh, &["p0", "p1", "p2"]).await;
        let subs = build(&mut mesh, &["s0", "s1", "s2", "s3", "s4"]).await;
        let publishers: Vec<Topics> = pubs
            .iter()
            .map(|d| Topics::start(d, TopicsConfig::default()).expect("start"))
            .collect();
        let patterns = [
            "orders.eu.new",
            "orders.*.new",
            "orders.>",
            ">",
            "orders.eu.*",
        ];
        let mut tasks = Vec::new();
        const N: u32 = 40;
        for (domus, pattern) in subs.iter().zip(patterns) {
            let topics = Topics::start(
                domus,
                config_with_publishers(&pubs.iter().collect::<Vec<_>>()),
            )
            .expect("start");
            let mut sub = topics.subscribe(pattern).await.expect("subscribe");
            for p in &pubs {
                assert!(
                    sub.granted_by(p.identity()),
                    "{pattern}: {:?}",
                    sub.grants()
                );
            }
            tasks.push(tokio::spawn(async move {
                let _keep = topics;
                let mut got: BTreeMap<u8, Vec<u32>> = BTreeMap::new();
                for _ in 0..(N * 3) {
                    let m = sub
                        .recv_timeout(Duration::from_secs(20))
                        .await
                        .expect("copy");
                    assert_eq!(m.topic().as_str(), "orders.eu.new");
                    assert_eq!(m.message_type(), TICK);
                    let (p, n) = seq(m.payload());
                    assert!(m.publisher().id().as_str().ends_with(&format!("p{p}")));
                    got.entry(p).or_default().push(n);
                    m.accept();
                }
                got
            }));
        }
        let mut runs = Vec::new();
        for (i, topics) in publishers.iter().enumerate() {
            let publisher = topics.publisher("orders.eu.new").expect("topic");
            runs.push(tokio::spawn(async move {
                let mut window = publisher.window(8);
                let mut reports = Vec::new();
                for n in 0..N {
                    if let Some(r) = window.publish(TICK, payload(i as u8, n)).await {
                        reports.push(r.expect("publish"));
                    }
                }
                reports.extend(
                    window
                        .drain()
                        .await
                        .into_iter()
                        .map(|r| r.expect("publish")),
                );
                reports
            }));
        }
        for run in runs {
            let reports = run.await.expect("publisher");
            assert_eq!(reports.len(), N as usize);
            for r in reports {
                assert_eq!(r.recipients(), 5, "{r:?}");
                assert!(r.all_delivered(), "{r:?}");
                assert!(r.outcome_unknown().is_empty());
            }
        }
        for task in tasks {
            let got = task.await.expect("subscriber");
            assert_eq!(got.len(), 3);
            for (_, ns) in got {
                assert_eq!(
                    ns,
                    (0..N).collect::<Vec<_>>(),
                    "each publisher's order, no gap, no repeat"
                );
            }
        }
        mesh.shutdown().await;
    })
    .await;
}

/// A publish nobody subscribed to succeeds with zero recipients; a topic with a wildcard or a
/// system type is refused as a whole.
#[tokio::test]
async fn a_publish_without_subscribers_reports_zero_recipients() {
    within(async {
        let mut mesh = default_mesh();
        let nodes = build(&mut mesh, &["a", "b"]).await;
        let topics = Topics::start(&nodes[0], TopicsConfig::default()).expect("start");
        let _b = Topics::start(&nodes[1], TopicsConfig::default()).expect("start");
        let report = topics
            .publish("nobody.listens", TICK, Bytes::from_static(b"x"))
            .await
            .expect("publish");
        assert_eq!(report.recipients(), 0);
        assert!(report.all_delivered());
        let e = topics
            .publish("bad.*", TICK, Bytes::new())
            .await
            .expect_err("wildcard topic");
        assert_eq!(e.id(), ErrorId::InvalidTopic);
        let e = topics
            .publish("a.b", MessageType(5), Bytes::new())
            .await
            .expect_err("system type");
        assert_eq!(e.id(), ErrorId::InvalidMessageType);
        let e = topics.subscribe("a..b").await.expect_err("empty segment");
        assert_eq!(e.id(), ErrorId::InvalidTopic);
        assert_eq!(
            Topics::start(&nodes[0], TopicsConfig::default())
                .expect_err("twice")
                .id(),
            ErrorId::TabernaAlreadyRegistered
        );
        mesh.shutdown().await;
    })
    .await;
}

/// A domus subscribed to its own topic gets its own publishes (a local copy).
#[tokio::test]
async fn a_domus_receives_its_own_publishes() {
    within(async {
        let mut mesh = default_mesh();
        let nodes = build(&mut mesh, &["solo"]).await;
        let topics = Topics::start(&nodes[0], TopicsConfig::default()).expect("start");
        let mut sub = topics.subscribe("self.*").await.expect("subscribe");
        assert!(sub.granted_by(nodes[0].identity()));
        let publish = topics.publish("self.test", TICK, Bytes::from_static(b"hi"));
        let m = sub
            .recv_timeout(Duration::from_secs(5))
            .await
            .expect("copy");
        assert_eq!(&m.payload()[..], b"hi");
        m.reply(Bytes::from_static(b"seen"));
        let report = publish.await.expect("publish");
        assert_eq!(report.recipients(), 1);
        match report.outcome(nodes[0].identity()) {
            Some(CopyOutcome::Replied(r)) => assert_eq!(&r[..], b"seen"),
            other => panic!("{other:?}"),
        }
        mesh.shutdown().await;
    })
    .await;
}

/// A subscriber that joins while a publisher is publishing gets every publish started after
/// its grant (the publisher's ack), and nothing is repeated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_joining_mid_stream_sees_everything_after_its_grant() {
    within(async {
        let mut mesh = default_mesh();
        let nodes = build(&mut mesh, &["pub", "late"]).await;
        let publisher = Topics::start(&nodes[0], TopicsConfig::default()).expect("start");
        let late = Topics::start(&nodes[1], config_with_publishers(&[&nodes[0]])).expect("start");
        let started = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
        let counter = started.clone();
        let p = publisher.publisher("feed.x").expect("topic");
        let run = tokio::spawn(async move {
            let mut reports = Vec::new();
            for n in 0..400u32 {
                counter.store(n, std::sync::atomic::Ordering::SeqCst);
                reports.push((n, p.publish(TICK, payload(0, n)).await.expect("publish")));
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            reports
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut sub = late.subscribe("feed.*").await.expect("subscribe");
        // Every publish started after this point must reach the subscription.
        let from = started.load(std::sync::atomic::Ordering::SeqCst) + 1;
        assert!(sub.granted_by(nodes[0].identity()));
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            while let Ok(m) = sub.recv_timeout(Duration::from_secs(2)).await {
                got.push(seq(m.payload()).1);
                m.accept();
                if got.last() == Some(&399) {
                    break;
                }
            }
            got
        });
        let reports = run.await.expect("publisher");
        let got = reader.await.expect("reader");
        assert!(
            from < 400,
            "the subscription came after the stream ended; nothing was checked"
        );
        let first = *got.first().expect("copies after the grant");
        assert!(
            first <= from,
            "first copy {first}, grant before publish {from}"
        );
        assert_eq!(
            got,
            (first..400).collect::<Vec<_>>(),
            "contiguous, once each"
        );
        for (n, r) in reports {
            if n >= from {
                assert_eq!(r.recipients(), 1, "publish {n} after the grant");
                assert!(r.all_delivered());
            }
        }
        mesh.shutdown().await;
    })
    .await;
}

/// A subscriber that never reads does not hold the others back: its copies fail as too
/// slow (its inbox full, its lane full or waiting too long) while the fast subscriber gets
/// every publish.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_subscriber_does_not_slow_the_others() {
    within(async {
        let mut mesh = default_mesh();
        let nodes = build(&mut mesh, &["pub", "fast", "slow"]).await;
        let config = TopicsConfig::default()
            .window(4, 512)
            .slow_default(SlowSubscriber::FailCopy {
                after: Duration::from_millis(200),
            })
            .copy_timeout(Duration::from_secs(3));
        let publisher = Topics::start(&nodes[0], config).expect("start");
        let fast = Topics::start(&nodes[1], config_with_publishers(&[&nodes[0]])).expect("start");
        let slow = Topics::start(
            &nodes[2],
            config_with_publishers(&[&nodes[0]]).subscription_depth(2),
        )
        .expect("start");
        let mut fast_sub = fast.subscribe("load.>").await.expect("subscribe");
        let _slow_sub = slow.subscribe("load.>").await.expect("subscribe");
        const N: u32 = 200;
        let reader = tokio::spawn(async move {
            let mut n = 0;
            while n < N {
                let m = fast_sub
                    .recv_timeout(Duration::from_secs(10))
                    .await
                    .expect("fast copy");
                assert_eq!(seq(m.payload()).1, n);
                m.accept();
                n += 1;
            }
        });
        let p = publisher.publisher("load.test").expect("topic");
        let mut window = p.window(N as usize);
        for n in 0..N {
            assert!(window.publish(TICK, payload(0, n)).await.is_none());
        }
        // The fast subscriber has everything before the slow one's first copies time out.
        tokio::time::timeout(Duration::from_millis(2800), reader)
            .await
            .expect("the fast subscriber was held back")
            .expect("reader");
        let reports = window.drain().await;
        let mut too_slow = 0;
        for r in reports {
            let r = r.expect("publish");
            assert!(
                r.outcome(nodes[1].identity())
                    .is_some_and(CopyOutcome::is_delivered)
            );
            let slow_outcome = r.outcome(nodes[2].identity()).expect("slow listed");
            if slow_outcome
                .error()
                .is_some_and(|e| e.id() == ErrorId::SubscriberTooSlow)
            {
                too_slow += 1;
            }
        }
        assert!(
            too_slow >= (N as usize) - 16,
            "{too_slow} copies failed as too slow"
        );
        mesh.shutdown().await;
    })
    .await;
}

/// Unsubscribing ends delivery at once: the next publish goes to nobody.
#[tokio::test]
async fn unsubscribe_is_immediate() {
    within(async {
        let mut mesh = default_mesh();
        let nodes = build(&mut mesh, &["pub", "sub"]).await;
        let publisher = Topics::start(&nodes[0], TopicsConfig::default()).expect("start");
        let subscriber =
            Topics::start(&nodes[1], config_with_publishers(&[&nodes[0]])).expect("start");
        let mut sub = subscriber.subscribe("a.b").await.expect("subscribe");
        let report = publisher.publish("a.b", TICK, Bytes::new());
        sub.recv_timeout(Duration::from_secs(5))
            .await
            .expect("copy")
            .accept();
        assert_eq!(report.await.expect("publish").delivered(), 1);
        assert_eq!(publisher.stats().subscriptions, 1);
        sub.unsubscribe().await;
        assert_eq!(publisher.stats().subscriptions, 0);
        let report = publisher
            .publish("a.b", TICK, Bytes::new())
            .await
            .expect("publish");
        assert_eq!(report.recipients(), 0);
        // Dropping a subscription withdraws it too (in the background).
        let sub = subscriber.subscribe("a.*").await.expect("subscribe");
        assert_eq!(publisher.stats().subscriptions, 1);
        drop(sub);
        assert!(
            eventually(Duration::from_secs(5), || publisher.stats().subscriptions
                == 0)
            .await
        );
        mesh.shutdown().await;
    })
    .await;
}

/// A subscriber that crashes (no unsubscribe) ages out when its lease runs out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_subscriber_ages_out() {
    within(async {
        let mut mesh = default_mesh();
        let nodes = build(&mut mesh, &["pub", "doomed"]).await;
        let lease = Duration::from_millis(600);
        let publisher =
            Topics::start(&nodes[0], TopicsConfig::default().lease(lease)).expect("start");
        let doomed_id: DomusId = nodes[1].identity().clone();
        {
            let subscriber =
                Topics::start(&nodes[1], config_with_publishers(&[&nodes[0]]).lease(lease))
                    .expect("start");
            let sub = subscriber.subscribe("x.y").await.expect("subscribe");
            assert!(sub.granted_by(nodes[0].identity()));
            assert_eq!(publisher.stats().subscriptions, 1);
            // Renewals keep it past one lease.
            tokio::time::sleep(lease * 2).await;
            assert_eq!(publisher.stats().subscriptions, 1, "renewed");
            // A crash: the domus goes away first, so no unsubscribe gets out.
            nodes[1].shutdown().await;
            drop(sub);
            drop(subscriber);
        }
        let doomed = mesh.remove("doomed").expect("known");
        drop(doomed);
        drop(nodes);
        assert!(
            eventually(Duration::from_secs(5), || publisher.stats().subscriptions
                == 0)
            .await,
            "the lease of {doomed_id} ran out"
        );
        mesh.shutdown().await;
    })
    .await;
}

/// The policy holds on both sides: a publisher refuses a subscription it does not allow
/// (the grant says `Forbidden`), and a subscriber refuses a copy from a publisher it does
/// not allow (the report says `Forbidden`, nothing reaches the subscription).
#[tokio::test]
async fn the_topic_policy_refuses_both_ways() {
    within(async {
        let mut mesh = default_mesh();
        let nodes = build(&mut mesh, &["pub", "ok", "nosy"]).await;
        let pattern = |s: &str| TopicPattern::new(s).expect("pattern");
        let ok_id = nodes[1].identity().as_str().to_owned();
        // The publisher lets only "ok" subscribe, and only to metrics.*.
        let publisher_policy = TopicPolicy::deny_all()
            .allow(Action::Publish, pattern(">"), Who::Anyone)
            .allow(
                Action::Subscribe,
                pattern("metrics.*"),
                Who::Identity(ok_id),
            );
        let publisher = Topics::start(&nodes[0], TopicsConfig::default().policy(publisher_policy))
            .expect("start");
        // "ok" takes publishes only from identities under .../domus/trusted-.
        let ok_policy = TopicPolicy::deny_all()
            .allow(Action::Subscribe, pattern(">"), Who::Anyone)
            .allow(
                Action::Publish,
                pattern(">"),
                Who::Prefix("spiffe://vicus.dev/domus/trusted-".into()),
            );
        let ok = Topics::start(
            &nodes[1],
            config_with_publishers(&[&nodes[0]]).policy(ok_policy),
        )
        .expect("start");
        let nosy = Topics::start(&nodes[2], config_with_publishers(&[&nodes[0]])).expect("start");

        let wide = ok.subscribe("metrics.>").await.expect("subscribe");
        assert!(
            matches!(
                wide.grants().iter().find(|(p, _)| p == nodes[0].identity()),
                Some((_, Grant::Refused(_)))
            ),
            "{:?}",
            wide.grants()
        );
        let nosy_sub = nosy.subscribe("metrics.cpu").await.expect("subscribe");
        assert!(
            !nosy_sub.granted_by(nodes[0].identity()),
            "{:?}",
            nosy_sub.grants()
        );

        let mut sub = ok.subscribe("metrics.cpu").await.expect("subscribe");
        assert!(sub.granted_by(nodes[0].identity()));
        let report = publisher
            .publish("metrics.cpu", TICK, Bytes::from_static(b"1"))
            .await
            .expect("publish");
        assert_eq!(
            report.recipients(),
            1,
            "only ok holds a subscription: {report:?}"
        );
        let outcome = report.outcome(nodes[1].identity()).expect("ok listed");
        assert_eq!(
            outcome.error().map(|e| e.id()),
            Some(ErrorId::Forbidden),
            "{outcome:?}"
        );
        assert!(sub.try_recv().is_none());

        // A live policy change: the publisher drops what it no longer allows.
        publisher.set_policy(TopicPolicy::deny_all().allow(
            Action::Publish,
            pattern(">"),
            Who::Anyone,
        ));
        assert_eq!(publisher.stats().subscriptions, 0);
        mesh.shutdown().await;
    })
    .await;
}

/// A subscriber with no session and no configured publisher finds the publisher through the
/// resolver's topic entries (`RouteResolver::topic_publishers`), for patterns that overlap.
#[tokio::test]
async fn the_resolver_names_the_publishers_of_a_topic() {
    within(async {
        let mut mesh = default_mesh();
        let nodes = build(&mut mesh, &["news", "reader"]).await;
        mesh.resolver()
            .insert_topic_publishers("news.>", vec![nodes[0].identity().clone()]);
        let publisher = Topics::start(&nodes[0], TopicsConfig::default()).expect("start");
        let reader = Topics::start(&nodes[1], TopicsConfig::default()).expect("start");
        assert_eq!(nodes[1].peer_count(), 0, "no session yet");
        let unrelated = reader.subscribe("sports.*").await.expect("subscribe");
        assert!(
            !unrelated.granted_by(nodes[0].identity()),
            "not listed for sports"
        );
        let mut sub = reader.subscribe("news.*.today").await.expect("subscribe");
        assert!(sub.granted_by(nodes[0].identity()), "{:?}", sub.grants());
        let report = publisher.publish("news.eu.today", TICK, Bytes::from_static(b"n"));
        sub.recv_timeout(Duration::from_secs(5))
            .await
            .expect("copy")
            .accept();
        assert_eq!(report.await.expect("publish").delivered(), 1);
        mesh.shutdown().await;
    })
    .await;
}

/// The topic service's figures are in the domus's snapshot and in the reporting service's
/// report (what `vicus top` draws), and leave the snapshot when the service stops.
#[tokio::test]
async fn the_snapshot_and_the_reporting_service_show_topics() {
    use vicus::services::reporting::{self, REPORTING_TABERNA, ReportRequest};
    within(async {
        let mut mesh = default_mesh();
        let nodes = build(&mut mesh, &["hub", "sub", "ops"]).await;
        assert!(nodes[0].reporting().snapshot().topics.is_none());
        let hub = Topics::start(&nodes[0], TopicsConfig::default()).expect("start");
        let sub = Topics::start(&nodes[1], config_with_publishers(&[&nodes[0]])).expect("start");
        let _a = sub.subscribe("a.>").await.expect("subscribe");
        let _b = sub.subscribe("b.c").await.expect("subscribe");
        let _own = hub.subscribe("a.>").await.expect("subscribe");
        let figures = nodes[0].reporting().snapshot().topics.expect("figures");
        assert_eq!(figures.subscriptions, 3);
        assert_eq!(figures.subscribers, 2);
        assert_eq!(figures.local_subscriptions, 1);
        assert_eq!(
            figures.patterns,
            vec![("a.>".to_owned(), 2), ("b.c".to_owned(), 1)]
        );
        let _service = reporting::serve(&nodes[0], [nodes[2].identity().clone()]).expect("serve");
        mesh.route(REPORTING_TABERNA, &nodes[0]).expect("route");
        let report = reporting::fetch(&nodes[2], ReportRequest::default(), Duration::from_secs(5))
            .await
            .expect("report");
        let topics = report.topics.expect("topics in the report");
        assert_eq!((topics.subscriptions, topics.subscribers), (3, 2));
        assert_eq!(topics.patterns[0], ("a.>".to_owned(), 2));
        drop(_own);
        drop(hub);
        assert!(nodes[0].reporting().snapshot().topics.is_none());
        mesh.shutdown().await;
    })
    .await;
}

/// A peer that runs no topic service is announced to once (it answers `UnknownTaberna`)
/// and then skipped until it connects anew, so renewals do not keep failing against it.
#[tokio::test]
async fn a_peer_without_the_service_is_not_announced_to_again() {
    within(async {
        let mut mesh = default_mesh();
        let nodes = build(&mut mesh, &["topical", "plain"]).await;
        let plain_taberna = nodes[1].taberna(vicus::TabernaId(5)).expect("taberna");
        mesh.route(vicus::TabernaId(5), &nodes[1]).expect("route");
        let send = tokio::spawn(nodes[0].send(
            vicus::TabernaId(5),
            TICK,
            Bytes::new(),
            vicus::SendOptions::default(),
        ));
        plain_taberna
            .recv_timeout(Duration::from_secs(5))
            .await
            .expect("request")
            .accept();
        send.await
            .expect("task")
            .expect("a session with the plain peer");
        let topics = Topics::start(&nodes[0], TopicsConfig::default()).expect("start");
        let first = topics.subscribe("x").await.expect("subscribe");
        match first
            .grants()
            .iter()
            .find(|(p, _)| p == nodes[1].identity())
        {
            Some((_, Grant::Failed(e))) => assert_eq!(e.id(), ErrorId::UnknownTaberna),
            other => panic!("{other:?}"),
        }
        let second = topics.subscribe("y").await.expect("subscribe");
        assert!(
            second
                .grants()
                .iter()
                .all(|(p, _)| p != nodes[1].identity()),
            "{:?}",
            second.grants()
        );
        mesh.shutdown().await;
    })
    .await;
}

/// With `SlowSubscriber::DropSubscriber`, a subscriber that falls behind loses its
/// subscriptions at that publisher (until it renews them), and the publisher stops sending
/// to it at once.
#[tokio::test]
async fn drop_subscriber_policy_drops_a_subscriber_that_falls_behind() {
    within(async {
        let mut mesh = default_mesh();
        let nodes = build(&mut mesh, &["pub", "stuck"]).await;
        let config = TopicsConfig::default()
            .window(1, 1)
            .slow(
                TopicPattern::new("strict.>").expect("pattern"),
                SlowSubscriber::DropSubscriber {
                    after: Duration::from_millis(100),
                },
            )
            .copy_timeout(Duration::from_secs(2));
        let publisher = Topics::start(&nodes[0], config).expect("start");
        let stuck = Topics::start(&nodes[1], config_with_publishers(&[&nodes[0]])).expect("start");
        // It never reads: its first copy stays unanswered (the window), the second waits in
        // the lane, the third finds the lane full.
        let sub = stuck.subscribe("strict.>").await.expect("subscribe");
        let p = publisher.publisher("strict.x").expect("topic");
        let first = p.publish(TICK, Bytes::new());
        assert!(eventually(Duration::from_secs(5), || sub.queued() == 1).await);
        let second = p.publish(TICK, Bytes::new());
        let third = p.publish(TICK, Bytes::new()).await.expect("publish");
        assert_eq!(
            third
                .outcome(nodes[1].identity())
                .and_then(CopyOutcome::error)
                .map(vicus::Error::id),
            Some(ErrorId::SubscriberTooSlow)
        );
        assert_eq!(publisher.stats().subscriptions, 0, "dropped");
        let after = publisher
            .publish("strict.x", TICK, Bytes::new())
            .await
            .expect("publish");
        assert_eq!(after.recipients(), 0);
        // The copies already on their way end too (the first at its deadline, unanswered).
        let second = second.await.expect("publish");
        assert!(
            second
                .outcome(nodes[1].identity())
                .is_some_and(|o| !o.is_delivered())
        );
        let first = first.await.expect("publish");
        assert!(
            first
                .outcome(nodes[1].identity())
                .is_some_and(|o| !o.is_delivered())
        );
        mesh.shutdown().await;
    })
    .await;
}

/// T36: peers that flood a publisher with subscriptions (hundreds of announcements of 256
/// patterns each, wildcards included) are held to the table's bounds — per subscriber and
/// in total — and told so in their grants; a malformed announcement is refused with the
/// service's code; nothing else changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t36_subscription_floods_are_held_to_the_table_bounds() {
    use vicus::services::topics::wire::{Announcement, Grants, SUBSCRIBE_TYPE};
    within(async {
        let mut mesh = default_mesh();
        let nodes = build(&mut mesh, &["victim", "a1", "a2", "a3", "a4", "a5"]).await;
        let victim = Topics::start(&nodes[0], TopicsConfig::default().table_limits(256, 1024))
            .expect("start");
        let mut granted_total = 0usize;
        let mut refused_total = 0usize;
        for (k, attacker) in nodes[1..].iter().enumerate() {
            let mut window = attacker
                .destination_on(nodes[0].identity(), vicus::services::topics::TOPICS_TABERNA)
                .window(32);
            let mut answers = Vec::new();
            for round in 0..40u32 {
                let patterns = (0..256u32)
                    .map(|i| {
                        let text = if i % 2 == 0 {
                            format!("flood.{k}.{round}.{i}")
                        } else {
                            format!("flood.*.{round}.{i}.>")
                        };
                        TopicPattern::new(text).expect("pattern")
                    })
                    .collect();
                let body = Announcement::Subscribe {
                    lease: Duration::from_secs(3600),
                    patterns,
                }
                .encode();
                if let Some(outcome) = window
                    .send(MessageType(SUBSCRIBE_TYPE), body)
                    .await
                    .expect("admitted")
                {
                    answers.push(outcome);
                }
            }
            answers.extend(window.drain().await);
            let mut granted = 0;
            for answer in answers {
                let reply = match answer.expect("answered") {
                    vicus::Delivery::Replied(reply) => reply,
                    other => panic!("{other:?}"),
                };
                let grants = Grants::decode(reply.into_payload()).expect("grants");
                granted += grants
                    .verdicts
                    .iter()
                    .filter(|v| **v == vicus::services::topics::Verdict::Granted)
                    .count();
                refused_total += grants
                    .verdicts
                    .iter()
                    .filter(|v| **v != vicus::services::topics::Verdict::Granted)
                    .count();
            }
            assert!(granted <= 256, "attacker {k}: {granted} granted");
            granted_total += granted;
        }
        assert_eq!(
            granted_total, 1024,
            "four attackers fill the table, the fifth gets none"
        );
        assert_eq!(refused_total, 5 * 40 * 256 - 1024);
        let stats = victim.stats();
        assert_eq!(stats.subscriptions, 1024);
        // A malformed announcement: refused with the service's code, before the table.
        let e = nodes[1]
            .destination_on(nodes[0].identity(), vicus::services::topics::TOPICS_TABERNA)
            .send(
                MessageType(SUBSCRIBE_TYPE),
                Bytes::from_static(&[0, 0, 0, 1, 0xff]),
            )
            .await
            .expect_err("malformed");
        assert_eq!(e.id(), ErrorId::RemoteTabernaRejected, "{e}");
        assert_eq!(
            e.rejection().map(|r| r.code),
            Some(vicus::services::topics::SERVICE_REJECT_CODES + 1)
        );
        assert_eq!(victim.stats().subscriptions, 1024);
        mesh.shutdown().await;
    })
    .await;
}

/// A copy in flight when its subscriber leaves is still reported with its real outcome: the
/// publisher drops the subscriber's lane, but the lane finishes what it holds.
#[tokio::test]
async fn a_copy_in_flight_when_the_subscriber_leaves_keeps_its_real_outcome() {
    within(async {
        let mut mesh = default_mesh();
        let nodes = build(&mut mesh, &["pub", "leaver"]).await;
        let lease = Duration::from_millis(600);
        let publisher =
            Topics::start(&nodes[0], TopicsConfig::default().lease(lease)).expect("start");
        let leaver = Topics::start(&nodes[1], config_with_publishers(&[&nodes[0]]).lease(lease))
            .expect("start");
        let mut sub = leaver.subscribe("bye.*").await.expect("subscribe");
        let report = tokio::spawn(publisher.publish("bye.now", TICK, Bytes::new()));
        let held = sub
            .recv_timeout(Duration::from_secs(5))
            .await
            .expect("copy");
        sub.unsubscribe().await;
        assert_eq!(publisher.stats().subscriptions, 0);
        // Past a renewal period of the publisher: the lane of a subscriber with nothing
        // held is dropped.
        assert!(eventually(Duration::from_secs(5), || publisher.stats().lanes == 0).await);
        held.reply(Bytes::from_static(b"late but here"));
        let report = report.await.expect("task").expect("publish");
        match report.outcome(nodes[1].identity()) {
            Some(CopyOutcome::Replied(r)) => assert_eq!(&r[..], b"late but here"),
            other => panic!("{other:?}"),
        }
        mesh.shutdown().await;
    })
    .await;
}
