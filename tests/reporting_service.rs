//! The reporting service (feature `reporting-service`): a node serves its report to the peers
//! it allows, over vicus itself; others are refused before the service sees them.
#![cfg(all(feature = "reporting-service", feature = "test-util"))]

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::within;
use vicus::services::reporting::{self, REPORTING_TABERNA, ReportRequest};
use vicus::testing::Mesh;
use vicus::{ErrorId, MessageType, RESERVED_TABERNA_BASE, SendOptions, TabernaId};

#[tokio::test]
async fn an_allowed_peer_reads_the_report_and_others_are_refused() {
    within(async {
        let mut mesh = Mesh::new().expect("mesh");
        let node = mesh.domus("node").await.expect("node");
        let ops = mesh.domus("ops").await.expect("ops");
        let stranger = mesh.domus("stranger").await.expect("stranger");
        let _service = reporting::serve(&node, [ops.identity().clone()]).expect("serve");
        mesh.route(REPORTING_TABERNA, &node).expect("route");
        // Some traffic for the report to show.
        let inbox = mesh.taberna("node", TabernaId(3)).expect("taberna");
        tokio::spawn(async move {
            while let Some(req) = inbox.recv().await {
                req.accept();
            }
        });
        let opts = SendOptions::default().timeout(Duration::from_secs(5));
        for _ in 0..3 {
            ops.send(
                TabernaId(3),
                MessageType::app(1),
                Bytes::new(),
                opts.clone(),
            )
            .await
            .expect("accepted");
        }
        let mine = ops.reporting().snapshot();
        let to_node = mine
            .per_peer
            .iter()
            .find(|p| &p.peer == node.identity())
            .expect("ops sees node");
        assert_eq!(to_node.messages_out, 3, "{to_node:?}");
        assert_eq!(to_node.messages_in, 0, "{to_node:?}");

        let first = reporting::fetch(&ops, ReportRequest::default(), Duration::from_secs(5))
            .await
            .expect("the allowed peer gets a report");
        assert_eq!(first.version, reporting::REPORT_VERSION);
        assert_eq!(first.identity, node.identity().to_string());
        let ops_there = first
            .peers
            .iter()
            .find(|p| p.peer == ops.identity().to_string())
            .expect("the node lists ops");
        assert!(ops_there.connected, "{ops_there:?}");
        // Three messages reached the node's tabernas (and this report request, counted once
        // the node's driver ends the turn that delivered it, which may be after the report).
        assert!((3..=4).contains(&ops_there.messages_in), "{ops_there:?}");
        assert!(
            first.totals.contains_key("messages_received"),
            "{:?}",
            first.totals.keys()
        );
        assert!(
            first.events.iter().any(|e| e.kind == "PeerConnected"),
            "{:?}",
            first.events
        );
        // Asking again with what was seen brings only newer events.
        let seen = first.events.last().map_or(0, |e| e.seq);
        let again = reporting::fetch(
            &ops,
            ReportRequest {
                events_after: seen,
                errors_after: 0,
            },
            Duration::from_secs(5),
        )
        .await
        .expect("report");
        assert!(
            again.events.iter().all(|e| e.seq > seen),
            "{:?}",
            again.events
        );

        let refused = reporting::fetch(&stranger, ReportRequest::default(), Duration::from_secs(5))
            .await
            .expect_err("not on the allow-list");
        assert_eq!(refused.id(), ErrorId::Forbidden, "{refused}");

        // The reserved range and A2 types are vicus's services' own.
        let e = node
            .taberna(TabernaId(RESERVED_TABERNA_BASE + 7))
            .expect_err("reserved id");
        assert_eq!(e.id(), ErrorId::InvalidConfig, "{e}");
        let e = ops
            .send(TabernaId(3), MessageType(0x0001_0001), Bytes::new(), opts)
            .await
            .expect_err("A2 types go to the services' tabernas only");
        assert_eq!(e.id(), ErrorId::InvalidMessageType, "{e}");
        let e = reporting::serve(&node, []).expect_err("empty allow-list");
        assert_eq!(e.id(), ErrorId::InvalidConfig, "{e}");
        mesh.shutdown().await;
    })
    .await;
}
