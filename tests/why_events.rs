//! The "why" events (target `vicus::why`, debug level): the decisions users ask about are
//! structured `tracing` events — a refusal by allow-list, a full inbox, which replica was
//! chosen — captured here by a real `tracing` subscriber over loopback mTLS.

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use common::*;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::subscriber::Interest;
use tracing::{Event, Metadata, Subscriber};
use vicus::{ErrorId, MessageType, SendOptions, TabernaId, TabernaOptions};

const APP: MessageType = MessageType::app(1);

type Fields = BTreeMap<String, String>;

/// Keeps the fields of every `vicus::why` event.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<Fields>>>);

struct FieldMap(Fields);

impl Visit for FieldMap {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.insert(field.name().to_owned(), format!("{value:?}"));
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.to_owned());
    }
}

impl Subscriber for Capture {
    fn register_callsite(&self, _: &'static Metadata<'static>) -> Interest {
        Interest::sometimes()
    }

    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        metadata.target() == "vicus::why"
    }

    fn new_span(&self, _: &Attributes<'_>) -> Id {
        Id::from_u64(1)
    }

    fn record(&self, _: &Id, _: &Record<'_>) {}

    fn record_follows_from(&self, _: &Id, _: &Id) {}

    fn event(&self, event: &Event<'_>) {
        let mut fields = FieldMap(Fields::new());
        event.record(&mut fields);
        self.0.lock().expect("capture").push(fields.0);
    }

    fn enter(&self, _: &Id) {}

    fn exit(&self, _: &Id) {}
}

impl Capture {
    fn with(&self, why: &str) -> Vec<Fields> {
        self.0
            .lock()
            .expect("capture")
            .iter()
            .filter(|f| f.get("why").map(String::as_str) == Some(why))
            .cloned()
            .collect()
    }
}

// One thread (the default test runtime): every task of the mesh runs where the subscriber
// is the default.
#[tokio::test]
async fn refusals_overruns_and_replica_choices_are_why_events() {
    let capture = Capture::default();
    let _guard = tracing::subscriber::set_default(capture.clone());
    within(async {
        let mut mesh = default_mesh();
        let a = mesh.domus("a").await.expect("domus");
        let b = mesh.domus("b").await.expect("domus");
        let c = mesh.domus("c").await.expect("domus");
        // An allow-list that leaves a out.
        mesh.route(TabernaId(1), &b).expect("route");
        let _guarded = b
            .taberna_with(
                TabernaId(1),
                TabernaOptions::default().allowed_peers([c.identity().clone()]),
            )
            .expect("taberna");
        let e = a
            .send(
                TabernaId(1),
                APP,
                Bytes::from_static(b"x"),
                SendOptions::default(),
            )
            .await
            .expect_err("forbidden");
        assert_eq!(e.id(), ErrorId::Forbidden);
        let refused = capture.with("refused");
        assert!(
            refused
                .iter()
                .any(|f| f.get("error").map(String::as_str) == Some("Forbidden")
                    && f.get("taberna").map(String::as_str) == Some("1")
                    && f.get("peer").is_some_and(|p| p.contains("domus/a"))),
            "{refused:?}"
        );
        // A full inbox: depth 1 and a worker that never takes.
        mesh.route(TabernaId(2), &b).expect("route");
        let _stuck = b
            .taberna_with(TabernaId(2), TabernaOptions::default().inbox_depth(1))
            .expect("taberna");
        let held = tokio::spawn(
            a.destination(TabernaId(2))
                .send(APP, Bytes::from_static(b"1")),
        );
        assert!(
            eventually(std::time::Duration::from_secs(5), || _stuck.queued() == 1).await,
            "the first waits in the inbox"
        );
        let e = a
            .send(
                TabernaId(2),
                APP,
                Bytes::from_static(b"2"),
                SendOptions::default(),
            )
            .await
            .expect_err("busy");
        assert_eq!(e.id(), ErrorId::TabernaBusy);
        let overruns = capture.with("queue_overrun");
        assert!(
            overruns
                .iter()
                .any(|f| f.get("taberna").map(String::as_str) == Some("2")
                    && f.get("depth").map(String::as_str) == Some("1")),
            "{overruns:?}"
        );
        held.abort();
        // Two replicas of taberna 3: each send says which was chosen among how many.
        let candidates = [&b, &c]
            .iter()
            .map(|d| {
                vicus::Candidate::new(vicus::Route {
                    addr: addr_of(d),
                    identity: Some(d.identity().clone()),
                })
            })
            .collect();
        mesh.resolver().insert_candidates(TabernaId(3), candidates);
        let mut replicas = Vec::new();
        for d in [&b, &c] {
            replicas.push(
                d.taberna_inline(
                    TabernaId(3),
                    TabernaOptions::default(),
                    |_req: vicus::taberna::InlineRequest<'_>| vicus::taberna::InlineAnswer::Accept,
                )
                .expect("replica"),
            );
        }
        a.send(
            TabernaId(3),
            APP,
            Bytes::from_static(b"r"),
            SendOptions::default(),
        )
        .await
        .expect("accepted");
        let chosen = capture.with("replica_chosen");
        assert!(
            chosen
                .iter()
                .any(|f| f.get("taberna").map(String::as_str) == Some("3")
                    && f.get("candidates").map(String::as_str) == Some("2")),
            "{chosen:?}"
        );
    })
    .await;
}
