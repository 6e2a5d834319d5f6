//! One trace across three domus, printed by OpenTelemetry's stdout exporter:
//! `cargo run --example otel_three_domus --features otel`.
//!
//! `gateway` sends an order to `orders` (taberna 1); its handler, inside the delivery's span,
//! asks `stock` (taberna 2) before it replies. Every span printed — the client's root, each
//! `vicus.send`, each `vicus.deliver` — has the same trace id, and each delivery's parent is
//! the send that caused it. The three domus run in this process over loopback mutual TLS with
//! development certificates (`vicus::testing::Mesh`).

use bytes::Bytes;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing::Instrument;
use tracing_subscriber::layer::SubscriberExt;
use vicus::testing::Mesh;
use vicus::{MessageType, SendOptions, TabernaId};

const ORDER: MessageType = MessageType::app(1);

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(opentelemetry_stdout::SpanExporter::default())
        .build();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("example")))
        .with(
            tracing_subscriber::filter::Targets::new()
                .with_target("vicus", tracing::Level::DEBUG)
                .with_target("otel_three_domus", tracing::Level::INFO),
        );
    tracing::subscriber::set_global_default(subscriber)?;

    let mut mesh = Mesh::new()?;
    let gateway = mesh.domus("gateway").await?;
    let orders = mesh.domus("orders").await?;
    let stock = mesh.domus("stock").await?;
    let order_inbox = mesh.taberna("orders", TabernaId(1))?;
    let stock_inbox = mesh.taberna("stock", TabernaId(2))?;

    let asker = orders.clone();
    let orders_handler = tokio::spawn(async move {
        while let Some(request) = order_inbox.recv().await {
            let span = request.span().clone();
            // A send's span is made when it is called: call it inside the delivery's span.
            let checked = span
                .in_scope(|| {
                    asker.send(
                        TabernaId(2),
                        ORDER,
                        Bytes::from_static(b"tea?"),
                        SendOptions::default(),
                    )
                })
                .instrument(span.clone())
                .await;
            match checked {
                Ok(_) => request.reply(Bytes::from_static(b"ordered")),
                Err(e) => request.reject(1, &e.to_string()),
            }
        }
    });
    let stock_handler = tokio::spawn(async move {
        while let Some(request) = stock_inbox.recv().await {
            request.accept();
        }
    });

    let root = tracing::info_span!("client order");
    let outcome = root
        .in_scope(|| {
            gateway.send(
                TabernaId(1),
                ORDER,
                Bytes::from_static(b"3 x tea"),
                SendOptions::default(),
            )
        })
        .await?;
    if let Some(context) = vicus::otel::context_of(&root) {
        println!("trace {} -> {outcome:?}", context.to_traceparent());
    }
    drop(root);

    mesh.shutdown().await;
    orders_handler.abort();
    stock_handler.abort();
    provider.shutdown()?;
    let _ = stock;
    Ok(())
}
