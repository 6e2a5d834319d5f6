//! Feature `otel`: one trace across three domus, checked with a real OpenTelemetry SDK
//! pipeline (its in-memory span exporter, fed by tracing-opentelemetry). A request from `a`
//! to `b`, which asks `c` before it replies, is one trace: `b`'s delivery is a child of `a`'s
//! send, `b`'s send to `c` a child of that delivery, `c`'s delivery a child of it. A message
//! lost in a blackhole and replayed on a new callis is delivered in the same trace, as a
//! child of the same send. A `traceparent` set by hand wins over the span's.
//!
//! The subscriber is the test thread's default and every domus runs on the test's
//! current-thread runtime, so each test sees only its own spans.
#![cfg(feature = "otel")]

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use opentelemetry::trace::{SpanId, TraceId, TracerProvider as _};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use tracing::Instrument;
use tracing_subscriber::layer::SubscriberExt;
use vicus::{Headers, MessageType, SendOptions, TabernaId, TraceContext};

const T: MessageType = MessageType::app(1);

struct Pipeline {
    exporter: InMemorySpanExporter,
    _provider: SdkTracerProvider,
    _guard: tracing::subscriber::DefaultGuard,
}

/// A real SDK pipeline: tracing spans (vicus's at debug, the test's own) through
/// tracing-opentelemetry into the in-memory exporter, exported as each span ends.
fn pipeline() -> Pipeline {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    let tracer = provider.tracer("vicus-test");
    let filter = tracing_subscriber::filter::Targets::new()
        .with_target("vicus", tracing::Level::DEBUG)
        .with_target("otel_traces", tracing::Level::TRACE);
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(tracer))
        .with(filter);
    let guard = tracing::subscriber::set_default(subscriber);
    Pipeline {
        exporter,
        _provider: provider,
        _guard: guard,
    }
}

fn finished(p: &Pipeline) -> Vec<SpanData> {
    p.exporter.get_finished_spans().expect("spans")
}

fn named<'a>(spans: &'a [SpanData], name: &str) -> Vec<&'a SpanData> {
    spans.iter().filter(|s| s.name == name).collect()
}

fn one<'a>(spans: &'a [SpanData], name: &str, attr: (&str, i64)) -> &'a SpanData {
    let found: Vec<_> = named(spans, name)
        .into_iter()
        .filter(|s| {
            s.attributes
                .iter()
                // A u64 field reaches OpenTelemetry as a string, an i64 as an integer.
                .any(|kv| kv.key.as_str() == attr.0 && kv.value.to_string() == attr.1.to_string())
        })
        .collect();
    assert_eq!(
        found.len(),
        1,
        "one {name} span with {attr:?}; all spans: {:#?}",
        spans
            .iter()
            .map(|s| (&s.name, &s.attributes))
            .collect::<Vec<_>>()
    );
    found[0]
}

#[tokio::test]
async fn a_request_across_three_domus_is_one_trace_with_correct_parents() {
    let p = pipeline();
    within(async {
        let mut mesh = default_mesh();
        let a = mesh.domus("a").await.expect("domus");
        let b = mesh.domus("b").await.expect("domus");
        let c = mesh.domus("c").await.expect("domus");
        let tb = b.taberna(TabernaId(1)).expect("taberna");
        mesh.route(TabernaId(1), &b).expect("route");
        let tc = c.taberna(TabernaId(2)).expect("taberna");
        mesh.route(TabernaId(2), &c).expect("route");

        // b asks c inside its delivery span, then replies.
        let b2 = b.clone();
        let middle = tokio::spawn(async move {
            let request = tb.recv().await.expect("a request");
            let span = request.span().clone();
            // Called inside the delivery span (a send's span, like #[instrument]'s, is made
            // when it is called).
            let asked = span
                .in_scope(|| {
                    b2.send(
                        TabernaId(2),
                        T,
                        Bytes::from_static(b"ask c"),
                        SendOptions::default(),
                    )
                })
                .instrument(span.clone())
                .await
                .expect("c answered");
            assert!(matches!(asked, vicus::Delivery::Accepted));
            request.reply(Bytes::from_static(b"done"));
        });
        let last = tokio::spawn(async move {
            let request = tc.recv().await.expect("a request");
            // The context the handler can read to propagate by hand.
            assert!(request.trace_context().is_some());
            request.accept();
        });
        let root = tracing::info_span!("client-request");
        let root_trace = {
            let delivery = root
                .in_scope(|| {
                    a.send(
                        TabernaId(1),
                        T,
                        Bytes::from_static(b"start"),
                        SendOptions::default(),
                    )
                })
                .await
                .expect("answered");
            assert!(matches!(delivery, vicus::Delivery::Replied(_)));
            vicus::otel::context_of(&root).expect("the root has a context")
        };
        drop(root);
        middle.await.expect("b");
        last.await.expect("c");
        // Every span ends when its delivery or send does; the exporter is synchronous.
        let done = eventually(Duration::from_secs(5), || {
            named(&finished(&p), "vicus.deliver").len() >= 2
        })
        .await;
        assert!(
            done,
            "{:#?}",
            finished(&p)
                .iter()
                .map(|s| (&s.name, &s.attributes))
                .collect::<Vec<_>>()
        );
        let spans = finished(&p);
        let trace = TraceId::from_bytes(root_trace.trace_id);
        let root_id = SpanId::from_bytes(root_trace.span_id);

        let send_a = one(&spans, "vicus.send", ("taberna", 1));
        let deliver_b = one(&spans, "vicus.deliver", ("taberna", 1));
        let send_b = one(&spans, "vicus.send", ("taberna", 2));
        let deliver_c = one(&spans, "vicus.deliver", ("taberna", 2));
        for s in [send_a, deliver_b, send_b, deliver_c] {
            assert_eq!(
                s.span_context.trace_id(),
                trace,
                "{} in another trace",
                s.name
            );
        }
        assert_eq!(send_a.parent_span_id, root_id);
        assert_eq!(deliver_b.parent_span_id, send_a.span_context.span_id());
        assert!(deliver_b.parent_span_is_remote);
        assert_eq!(send_b.parent_span_id, deliver_b.span_context.span_id());
        assert_eq!(deliver_c.parent_span_id, send_b.span_context.span_id());
        // The outcomes and answers are recorded.
        let has = |s: &SpanData, k: &str, v: &str| {
            s.attributes
                .iter()
                .any(|kv| kv.key.as_str() == k && kv.value.as_str() == v)
        };
        assert!(has(send_a, "outcome", "replied"));
        assert!(has(deliver_b, "answer", "replied"));
        assert!(has(deliver_c, "answer", "accepted"));
        // The handshakes were traced too.
        assert!(!named(&spans, "vicus.handshake").is_empty());
    })
    .await;
}

#[tokio::test]
async fn a_replayed_delivery_belongs_to_the_trace_of_its_send() {
    let p = pipeline();
    within(async {
        let mut mesh = default_mesh();
        let a = mesh.domus("a").await.expect("domus");
        let b = mesh.domus("b").await.expect("domus");
        let tb = b.taberna(TabernaId(1)).expect("taberna");
        let proxy = mesh
            .route_through_proxy(TabernaId(1), &b)
            .await
            .expect("proxy");
        // A first message opens the callis through the proxy.
        let warm = tokio::spawn(a.send(
            TabernaId(1),
            T,
            Bytes::from_static(b"warm"),
            SendOptions::default(),
        ));
        tb.recv().await.expect("warm").accept();
        warm.await.expect("join").expect("accepted");

        // The next message is written into a blackhole, then the callis is cut: the sender
        // replays it on the next callis.
        proxy.set_blackhole(true);
        let root = tracing::info_span!("replayed-request");
        let send = tokio::spawn(root.in_scope(|| {
            a.send(
                TabernaId(1),
                T,
                Bytes::from_static(b"lost once"),
                SendOptions::default().timeout(Duration::from_secs(20)),
            )
        }));
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(tb.try_recv().is_none(), "the blackhole let it through");
        proxy.cut_all();
        proxy.set_blackhole(false);
        let request = tb.recv().await.expect("the replay");
        assert_eq!(&request.payload()[..], b"lost once");
        let carried = request.trace_context().expect("a context");
        request.accept();
        send.await.expect("join").expect("accepted");
        assert!(
            proxy.total_accepted() >= 2,
            "no second callis: not a replay"
        );
        let root_trace = vicus::otel::context_of(&root).expect("a context");
        drop(root);
        assert_eq!(carried.trace_id, root_trace.trace_id);

        let spans = finished(&p);
        let sends: Vec<_> = named(&spans, "vicus.send")
            .into_iter()
            .filter(|s| s.span_context.trace_id() == TraceId::from_bytes(root_trace.trace_id))
            .collect();
        assert_eq!(sends.len(), 1);
        let delivered: Vec<_> = named(&spans, "vicus.deliver")
            .into_iter()
            .filter(|s| s.span_context.trace_id() == TraceId::from_bytes(root_trace.trace_id))
            .collect();
        assert_eq!(delivered.len(), 1, "delivered once, in the send's trace");
        assert_eq!(delivered[0].parent_span_id, sends[0].span_context.span_id());
    })
    .await;
}

#[tokio::test]
async fn a_traceparent_set_by_hand_wins_over_the_span() {
    let _p = pipeline();
    within(async {
        let mut mesh = default_mesh();
        let a = mesh.domus("a").await.expect("domus");
        let b = mesh.domus("b").await.expect("domus");
        let tb = b.taberna(TabernaId(1)).expect("taberna");
        mesh.route(TabernaId(1), &b).expect("route");
        let mine = TraceContext::new([0x42; 16], [0x24; 8], 1).expect("valid");
        let mut headers = Headers::new();
        headers.set_trace_context(mine).expect("valid");
        let send = tokio::spawn(tracing::info_span!("some-span").in_scope(|| {
            a.send(
                TabernaId(1),
                T,
                Bytes::from_static(b"x"),
                SendOptions::default().headers(headers),
            )
        }));
        let request = tb.recv().await.expect("a request");
        assert_eq!(request.trace_context(), Some(mine));
        request.accept();
        send.await.expect("join").expect("accepted");
    })
    .await;
}

#[tokio::test]
async fn a_blob_opening_continues_the_trace_it_was_opened_in() {
    let p = pipeline();
    within(async {
        let mut mesh = default_mesh();
        let a = mesh.domus("a").await.expect("domus");
        let b = mesh.domus("b").await.expect("domus");
        let tb = b.taberna(TabernaId(1)).expect("taberna");
        mesh.route(TabernaId(1), &b).expect("route");
        let root = tracing::info_span!("upload");
        let opening = root.in_scope(|| {
            a.send_blob(
                TabernaId(1),
                T,
                Bytes::from_static(b"name"),
                SendOptions::default(),
            )
        });
        let receiving = async {
            let mut request = tb.recv().await.expect("the blob's request");
            assert!(request.trace_context().is_some());
            let mut blob = request.blob().expect("a blob");
            request.accept();
            let mut got = Vec::new();
            tokio::io::AsyncReadExt::read_to_end(&mut blob, &mut got)
                .await
                .expect("read");
            got
        };
        let sending = async {
            let mut sender = opening.await.expect("opened");
            sender
                .write_bytes(Bytes::from_static(b"blob bytes"))
                .await
                .expect("write");
            sender.finish().await.expect("finish");
        };
        let (got, ()) = tokio::join!(receiving, sending);
        assert_eq!(got, b"blob bytes");
        let root_trace = vicus::otel::context_of(&root).expect("a context");
        drop(root);
        let spans = finished(&p);
        let trace = TraceId::from_bytes(root_trace.trace_id);
        let open = named(&spans, "vicus.blob_open");
        assert_eq!(open.len(), 1);
        assert_eq!(open[0].span_context.trace_id(), trace);
        let delivered = named(&spans, "vicus.deliver");
        assert_eq!(delivered.len(), 1);
        assert_eq!(delivered[0].span_context.trace_id(), trace);
        assert_eq!(delivered[0].parent_span_id, open[0].span_context.span_id());
    })
    .await;
}
