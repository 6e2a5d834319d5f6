//! Feature `serde`: typed messages over real loopback mTLS with the ready codecs — nested
//! types round trip as requests and replies in CBOR and in JSON, and a payload that does not
//! decode is refused with `DecodeFailure` before the handler sees it.
#![cfg(feature = "serde")]

mod common;

use std::collections::BTreeMap;

use bytes::Bytes;
use common::*;
use serde::{Deserialize, Serialize};
use vicus::codec::{Cbor, Json};
use vicus::{ErrorId, MessageCodec, MessageType, SendOptions, TabernaId};

const ORDER: MessageType = MessageType::app(7);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum Line {
    Item { sku: String, quantity: u32 },
    Note(String),
    Discount { percent: f64, code: Option<String> },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Order {
    id: u64,
    customer: String,
    lines: Vec<Line>,
    tags: BTreeMap<String, Vec<u8>>,
    previous: Option<Box<Order>>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Receipt {
    order: u64,
    total_cents: i64,
    lines: usize,
}

fn order(id: u64) -> Order {
    Order {
        id,
        customer: format!("customer ✓ {id}"),
        lines: vec![
            Line::Item {
                sku: "tea".into(),
                quantity: 3,
            },
            Line::Note("by the door".into()),
            Line::Discount {
                percent: 12.5,
                code: None,
            },
        ],
        tags: [("region".to_owned(), vec![1, 2, 255])]
            .into_iter()
            .collect(),
        previous: (id > 1).then(|| Box::new(order(id - 1))),
    }
}

/// A worker that answers every order it can decode with a receipt, counting what it saw.
fn spawn_cashier<C, R>(t: vicus::Taberna, codec: C, reply: R) -> tokio::task::JoinHandle<Vec<u64>>
where
    C: MessageCodec<Message = Order> + Clone,
    R: MessageCodec<Message = Receipt> + Clone,
{
    tokio::spawn(async move {
        let mut seen = Vec::new();
        while let Some(typed) = t.recv_typed(&codec).await {
            seen.push(typed.message.id);
            let receipt = Receipt {
                order: typed.message.id,
                total_cents: 1234,
                lines: typed.message.lines.len(),
            };
            if typed.message.id == 99 {
                break;
            }
            typed.reply_typed(&reply, &receipt).expect("encodes");
        }
        seen
    })
}

#[tokio::test]
async fn nested_types_round_trip_as_requests_and_replies_in_cbor_and_json() {
    within(async {
        let mut mesh = default_mesh();
        let a = mesh.domus("a").await.expect("domus");
        let b = mesh.domus("b").await.expect("domus");
        mesh.route(TabernaId(1), &b).expect("route");
        mesh.route(TabernaId(2), &b).expect("route");
        let cbor = spawn_cashier(
            b.taberna(TabernaId(1)).expect("taberna"),
            Cbor::<Order>::new(),
            Cbor::<Receipt>::new(),
        );
        let json = spawn_cashier(
            b.taberna(TabernaId(2)).expect("taberna"),
            Json::<Order>::new(),
            Json::<Receipt>::new(),
        );
        for (taberna, codec_is_cbor) in [(TabernaId(1), true), (TabernaId(2), false)] {
            for id in 1..=5u64 {
                let sent = order(id);
                // The reply comes back as bytes and is decoded with the reply codec.
                let payload = if codec_is_cbor {
                    Cbor::<Order>::new().encode(&sent)
                } else {
                    Json::<Order>::new().encode(&sent)
                }
                .expect("encode");
                let delivery = a
                    .send(taberna, ORDER, payload, SendOptions::default())
                    .await
                    .expect("answered");
                let vicus::Delivery::Replied(bytes) = delivery else {
                    panic!("{delivery:?}");
                };
                let receipt = if codec_is_cbor {
                    Cbor::<Receipt>::new().decode(&bytes)
                } else {
                    Json::<Receipt>::new().decode(&bytes)
                }
                .expect("a receipt");
                assert_eq!(
                    receipt,
                    Receipt {
                        order: id,
                        total_cents: 1234,
                        lines: 3
                    }
                );
            }
        }
        // send_typed: the same in one call each way (request and reply share a codec there).
        let echo = b.taberna(TabernaId(3)).expect("taberna");
        mesh.route(TabernaId(3), &b).expect("route");
        let echoer = tokio::spawn(async move {
            let codec = Cbor::<Order>::new();
            let typed = echo.recv_typed(&codec).await.expect("one");
            let mut back = typed.message.clone();
            back.customer.push_str(" (seen)");
            typed.reply_typed(&codec, &back).expect("encodes");
        });
        let codec = Cbor::<Order>::new();
        let back = a
            .send_typed(
                &codec,
                TabernaId(3),
                ORDER,
                &order(4),
                SendOptions::default(),
            )
            .await
            .expect("answered")
            .expect("a reply");
        let mut expected = order(4);
        expected.customer.push_str(" (seen)");
        assert_eq!(back, expected);
        echoer.await.expect("echoer");
        // Stop the cashiers (order 99 ends each loop unanswered: RequestDropped).
        for t in [TabernaId(1), TabernaId(2)] {
            let payload = if t == TabernaId(1) {
                Cbor::<Order>::new().encode(&order(99))
            } else {
                Json::<Order>::new().encode(&order(99))
            }
            .expect("encode");
            let e = a
                .send(t, ORDER, payload, SendOptions::default())
                .await
                .expect_err("dropped");
            assert_eq!(e.id(), ErrorId::RequestDropped);
        }
        assert_eq!(cbor.await.expect("cbor"), vec![1, 2, 3, 4, 5, 99]);
        assert_eq!(json.await.expect("json"), vec![1, 2, 3, 4, 5, 99]);
    })
    .await;
}

#[tokio::test]
async fn a_payload_that_does_not_decode_is_refused_with_decode_failure_and_never_reaches_the_handler()
 {
    within(async {
        let mut mesh = default_mesh();
        let a = mesh.domus("a").await.expect("domus");
        let b = mesh.domus("b").await.expect("domus");
        mesh.route(TabernaId(1), &b).expect("route");
        let cashier = spawn_cashier(
            b.taberna(TabernaId(1)).expect("taberna"),
            Json::<Order>::new(),
            Json::<Receipt>::new(),
        );
        // Not JSON, JSON of the wrong shape, and CBOR where JSON is expected.
        let receipt_json = Json::<Receipt>::new()
            .encode(&Receipt {
                order: 1,
                total_cents: 0,
                lines: 0,
            })
            .expect("encode");
        let cbor_order = Cbor::<Order>::new().encode(&order(1)).expect("encode");
        for bad in [Bytes::from_static(b"{ not json"), receipt_json, cbor_order] {
            let e = a
                .send(TabernaId(1), ORDER, bad, SendOptions::default())
                .await
                .expect_err("refused");
            assert_eq!(e.id(), ErrorId::DecodeFailure, "{e}");
            assert!(
                e.message().contains("Order"),
                "the reason names the type: {e}"
            );
        }
        // A good one after them is the first the handler sees.
        let good = Json::<Order>::new().encode(&order(2)).expect("encode");
        a.send(TabernaId(1), ORDER, good, SendOptions::default())
            .await
            .expect("answered");
        let stop = Json::<Order>::new().encode(&order(99)).expect("encode");
        let _ = a
            .send(TabernaId(1), ORDER, stop, SendOptions::default())
            .await;
        assert_eq!(cashier.await.expect("cashier"), vec![2, 99]);
    })
    .await;
}

/// The codecs alone (no domus): nested types in both formats, and what does not decode.
mod codecs {
    use super::*;

    #[test]
    fn nested_types_round_trip_in_both_formats_and_cbor_is_the_compact_one() {
        let (cbor, json) = (Cbor::<Order>::new(), Json::<Order>::new());
        let m = order(3);
        assert_eq!(
            cbor.decode(&cbor.encode(&m).expect("encode"))
                .expect("decode"),
            m
        );
        assert_eq!(
            json.decode(&json.encode(&m).expect("encode"))
                .expect("decode"),
            m
        );
        assert!(cbor.encode(&m).expect("cbor").len() < json.encode(&m).expect("json").len());
    }

    #[test]
    fn a_payload_that_does_not_decode_is_a_decode_failure_naming_the_type() {
        let (cbor, json) = (Cbor::<Order>::new(), Json::<Order>::new());
        for bad in [&b""[..], b"\xff\xff", b"{\"id\":1}", b"not json"] {
            let bytes = Bytes::copy_from_slice(bad);
            for e in [
                cbor.decode(&bytes).expect_err("cbor"),
                json.decode(&bytes).expect_err("json"),
            ] {
                assert_eq!(e.id(), ErrorId::DecodeFailure);
                assert!(e.message().contains("Order"), "{e}");
            }
        }
        let other = Json::<u32>::new().encode(&7).expect("encode");
        assert_eq!(
            json.decode(&other).expect_err("shape").id(),
            ErrorId::DecodeFailure
        );
    }
}
