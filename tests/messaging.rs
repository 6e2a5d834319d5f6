//! Messaging between domus over real loopback mTLS: delivery, answers, errors, reconnects,
//! shutdown. Test names carry the threat they cover (../shared/THREATS.md).

mod common;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use vicus::dev_certs::DevCa;
use vicus::{
    Delivery, Domus, DomusConfig, ErrorId, MessageType, SendOptions, SimpleResolver, TabernaId,
};

const APP: MessageType = match MessageType::app(1) {
    Some(t) => t,
    None => panic!(),
};

struct Mesh {
    ca: DevCa,
    resolver: Arc<SimpleResolver>,
}

impl Mesh {
    fn new() -> Self {
        Self {
            ca: ca(),
            resolver: Arc::new(SimpleResolver::new()),
        }
    }

    async fn domus(&mut self, name: &str) -> Domus {
        self.domus_with(name, DomusConfig::default()).await
    }

    async fn domus_with(&mut self, name: &str, config: DomusConfig) -> Domus {
        let (auth, _) = self.ca.domus_auth(name).expect("mint");
        Domus::builder(auth)
            .resolver(self.resolver.clone())
            .config(config)
            .build()
            .await
            .expect("build domus")
    }

    fn route(&self, taberna: u64, to: &Domus) {
        self.resolver.insert(
            TabernaId(taberna),
            to.local_addr().clone(),
            Some(to.identity().clone()),
        );
    }
}

/// A worker that answers every request: payload "echo:<payload>" as a reply.
fn spawn_echo(t: vicus::Taberna) {
    tokio::spawn(async move {
        while let Some(req) = t.recv().await {
            let mut reply = b"echo:".to_vec();
            reply.extend_from_slice(req.payload());
            req.reply(Bytes::from(reply));
        }
    });
}

#[tokio::test]
async fn reply_round_trip_and_sender_identity_visible() {
    within(async {
        let mut mesh = Mesh::new();
        let a = mesh.domus("a").await;
        let b = mesh.domus("b").await;
        mesh.route(10, &b);
        let t = b.taberna(TabernaId(10)).expect("taberna");
        let seen = tokio::spawn(async move {
            let req = t.recv().await.expect("request");
            let who = req.peer().id().clone();
            let source = req.source();
            req.reply(Bytes::from_static(b"pong"));
            (who, source)
        });
        let out = a
            .send(
                TabernaId(10),
                APP,
                Bytes::from_static(b"ping"),
                SendOptions::default().source(TabernaId(3)),
            )
            .await
            .expect("send");
        assert_eq!(out, Delivery::Replied(Bytes::from_static(b"pong")));
        let (who, source) = seen.await.expect("join");
        assert_eq!(&who, a.identity());
        assert_eq!(source, TabernaId(3));
    })
    .await;
}

#[tokio::test]
async fn ten_thousand_pipelined_sends_all_accepted_exactly_once() {
    within(async {
        let mut mesh = Mesh::new();
        let a = mesh.domus("a").await;
        let b = mesh.domus("b").await;
        mesh.route(10, &b);
        let t = b
            .taberna_with(
                TabernaId(10),
                vicus::TabernaOptions::default().inbox_depth(10_000),
            )
            .expect("taberna");
        let counter = tokio::spawn(async move {
            let mut seen = std::collections::HashSet::new();
            while seen.len() < 10_000 {
                let req = t.recv().await.expect("request");
                let n = u32::from_be_bytes(req.payload()[..4].try_into().expect("4 bytes"));
                assert!(seen.insert(n), "message {n} delivered twice");
                req.accept();
            }
            seen.len()
        });
        let mut receipts = Vec::with_capacity(10_000);
        for n in 0u32..10_000 {
            let receipt = a
                .admit(
                    TabernaId(10),
                    APP,
                    Bytes::copy_from_slice(&n.to_be_bytes()),
                    SendOptions::default(),
                )
                .await
                .expect("admitted");
            receipts.push(receipt);
        }
        for r in receipts {
            assert_eq!(r.await.expect("accepted"), Delivery::Accepted);
        }
        assert_eq!(counter.await.expect("join"), 10_000);
    })
    .await;
}
