//! Feature `metrics`: reporting mirrored into the `metrics` facade, rendered as Prometheus text.
#![cfg(feature = "metrics")]

mod common;

use std::sync::Arc;

use bytes::Bytes;
use common::*;
use metrics_exporter_prometheus::PrometheusBuilder;
use vicus::{Domus, MessageType, SendOptions, SimpleResolver, TabernaId};

#[tokio::test]
async fn exported_counters_and_gauges_match_the_snapshot_with_stable_names() {
    within(async {
        let mut ca = ca();
        let routes = Arc::new(SimpleResolver::new());
        let (a_auth, _) = ca.domus_auth("a").expect("mint");
        let (b_auth, _) = ca.domus_auth("b").expect("mint");
        let a = Domus::builder(a_auth)
            .resolver(routes.clone())
            .build()
            .await
            .expect("a");
        let b = Domus::builder(b_auth).build().await.expect("b");
        routes.insert(TabernaId(1), addr_of(&b), Some(b.identity().clone()));
        let t = b.taberna(TabernaId(1)).expect("taberna");
        tokio::spawn(async move {
            while let Some(req) = t.recv().await {
                if req.payload().is_empty() {
                    req.reject(9, "empty");
                } else {
                    req.accept();
                }
            }
        });
        let app = MessageType::app(1);
        for _ in 0..5 {
            a.send(
                TabernaId(1),
                app,
                Bytes::from_static(b"x"),
                SendOptions::default(),
            )
            .await
            .expect("sent");
        }
        let _ = a
            .send(TabernaId(1), app, Bytes::new(), SendOptions::default())
            .await
            .expect_err("rejected");
        // The topic service's figures are exported too (started after the sends: its
        // announcement to b, which runs no topic service, would count as a send).
        let mut config = vicus::services::topics::TopicsConfig::default();
        config.announce_timeout = std::time::Duration::from_secs(5);
        let topics = vicus::services::topics::Topics::start(&b, config).expect("topics");
        let _subscription = topics.subscribe("metrics.>").await.expect("subscribe");
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            a.reporting().export_to_metrics();
            b.reporting().export_to_metrics();
        });
        let text = handle.render();
        let id = a.identity().to_string();
        let line = |name: &str| {
            text.lines()
                .find(|l| l.starts_with(name) && l.contains(&id))
                .unwrap_or_else(|| panic!("{name} missing in:\n{text}"))
                .rsplit(' ')
                .next()
                .expect("value")
                .to_owned()
        };
        assert_eq!(line("vicus_messages_sent_total{"), "6");
        assert_eq!(line("vicus_messages_accepted_total{"), "5");
        assert_eq!(line("vicus_messages_rejected_total{"), "1");
        assert_eq!(line("vicus_primary_calles{"), "1");

        assert!(
            text.lines().any(|l| l.starts_with("vicus_rejected_total{")
                && l.contains("reason=\"RemoteTabernaRejected\"")
                && l.ends_with(" 1")),
            "{text}"
        );
        let b_id = b.identity().to_string();
        for name in [
            "vicus_topic_subscriptions{",
            "vicus_topic_local_subscriptions{",
        ] {
            assert!(
                text.lines()
                    .any(|l| l.starts_with(name) && l.contains(&b_id) && l.ends_with(" 1")),
                "{name} of b in:\n{text}"
            );
        }
        assert!(
            !text
                .lines()
                .any(|l| l.starts_with("vicus_topic_") && l.contains(&format!("domus=\"{id}\""))),
            "a runs no topic service"
        );
        assert!(
            text.lines().any(|l| l.starts_with("vicus_peer_in_flight{")
                && l.contains(&format!("peer=\"{}\"", b.identity()))),
            "{text}"
        );
    })
    .await;
}
