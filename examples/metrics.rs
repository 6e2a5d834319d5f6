//! vicus metrics scraped as Prometheus text: two domus exchange messages and a blob, then the
//! reporting counters and gauges mirrored into the `metrics` facade are rendered the way a
//! Prometheus scrape would see them.
//!
//! Run with `cargo run --example metrics --features metrics`.

use std::sync::Arc;

use bytes::Bytes;
use metrics_exporter_prometheus::PrometheusBuilder;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use vicus::dev_certs::DevCa;
use vicus::{Domus, MessageType, SendOptions, SimpleResolver, TabernaId};

const T: TabernaId = TabernaId(1);
const KIND: MessageType = MessageType::app(1);

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // The application owns the exporter; vicus only talks to the `metrics` facade.
    let prometheus = PrometheusBuilder::new().install_recorder()?;

    let mut ca = DevCa::new("vicus metrics example CA")?;
    let routes = Arc::new(SimpleResolver::new());
    let (alpha_auth, _) = ca.domus_auth("alpha")?;
    let (beta_auth, _) = ca.domus_auth("beta")?;
    let alpha = Domus::builder(alpha_auth)
        .resolver(routes.clone())
        .build()
        .await?;
    let beta = Domus::builder(beta_auth)
        .resolver(routes.clone())
        .build()
        .await?;
    let beta_addr = beta.local_addr().cloned().ok_or("beta listens")?;
    routes.insert(T, beta_addr, Some(beta.identity().clone()));

    let inbox = beta.taberna(T)?;
    tokio::spawn(async move {
        while let Some(mut request) = inbox.recv().await {
            if let Some(mut blob) = request.blob() {
                request.accept();
                let mut sink = Vec::new();
                let _ = blob.read_to_end(&mut sink).await;
            } else if request.payload().as_ref() == b"no" {
                request.reject(1, "refused");
            } else {
                request.accept();
            }
        }
    });

    for i in 0..100u32 {
        let payload = if i % 10 == 0 { "no" } else { "yes" };
        let _ = alpha
            .send(T, KIND, Bytes::from(payload), SendOptions::default())
            .await;
    }
    let mut blob = alpha
        .send_blob(T, KIND, Bytes::new(), SendOptions::default())
        .await?;
    blob.write_all(&vec![7u8; 4 << 20]).await?;
    blob.finish().await?;

    // A scrape: publish the freshest figures, then render.
    alpha.reporting().export_to_metrics();
    beta.reporting().export_to_metrics();
    let text = prometheus.render();
    for line in text.lines().filter(|l| {
        l.starts_with("vicus_messages")
            || l.starts_with("vicus_rejected")
            || l.starts_with("vicus_blob_streams")
            || l.starts_with("vicus_send_latency")
            || l.starts_with("vicus_peer_rtt")
            || l.starts_with("vicus_primary_calles ")
            || l.starts_with("vicus_primary_calles{")
    }) {
        println!("{line}");
    }
    println!("({} lines in the full scrape)", text.lines().count());

    alpha.shutdown().await;
    beta.shutdown().await;
    Ok(())
}
