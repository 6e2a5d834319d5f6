//! Testing your own taberna under a network partition, deterministically, with
//! `vicus::testing::sim` (turmoil's simulated network): `cargo run --example simulation
//! --features sim`.
//!
//! A warehouse domus reserves stock; a shop domus sends reservations. Halfway through, the
//! link between them is partitioned for fifteen simulated seconds. The reservations sent while
//! it is down wait (each send has a 30 s deadline), are delivered after the link heals, and
//! each is applied exactly once — the stock at the end proves it. The whole run takes a
//! fraction of a second of real time, and the same seed replays it exactly.
//!
//! *After* the heal, not at it: turmoil drops what is sent across a partition (a kernel's TCP
//! would retransmit it), so the callis that was open when the partition began is dead without
//! either side being told. It is found dead when `idle_timeout` (default 20 s) passes without a
//! byte from the peer, and the held reservations then go out on a new callis: here about 5 s
//! after the heal, 20 s after the last bytes heard. A 2 s partition waits the same way: 13–18 s
//! after the heal with the defaults (depending on when the last keepalive was heard), under a
//! second with `idle_timeout` 1 s and `keepalive_interval` 300 ms. A send whose peer had no
//! callis yet is dialled again as soon as its backoff allows (under a second after a 2 s
//! partition).

use std::cell::Cell;
use std::rc::Rc;
use std::time::Duration;

use bytes::Bytes;
use vicus::testing::sim::SimNet;
use vicus::{Delivery, MessageType, SendOptions, TabernaId};

const RESERVE: MessageType = MessageType::app(1);
const WAREHOUSE: TabernaId = TabernaId(1);

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let seed = 2026;
    let mut sim = turmoil::Builder::new()
        .rng_seed(seed)
        .simulation_duration(Duration::from_secs(120))
        .build();
    let net = SimNet::new(seed)?;
    let stock = Rc::new(Cell::new(100u64));
    let shelf = stock.clone();
    net.host(&mut sim, "warehouse", move |domus, net| {
        let shelf = shelf.clone();
        async move {
            let reservations = domus.taberna(WAREHOUSE)?;
            net.route(WAREHOUSE, "warehouse");
            while let Some(req) = reservations.recv().await {
                // The handler under test: take one item, answer with what is left.
                shelf.set(shelf.get() - 1);
                req.reply(Bytes::from(shelf.get().to_string()));
            }
            Ok(())
        }
    });
    let client = net.clone();
    sim.client("shop", async move {
        let shop = client.domus("shop").await?;
        let options = SendOptions::default().timeout(Duration::from_secs(30));
        let mut sends = Vec::new();
        for n in 0..20u32 {
            if n == 10 {
                println!(
                    "[{:>6.2?}] partition shop <-> warehouse",
                    turmoil::elapsed()
                );
                turmoil::partition("shop", "warehouse");
            }
            let send = shop.send(
                WAREHOUSE,
                RESERVE,
                Bytes::from(n.to_string()),
                options.clone(),
            );
            sends.push(tokio::task::spawn_local(send));
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        tokio::time::sleep(Duration::from_secs(10)).await;
        println!("[{:>6.2?}] repair", turmoil::elapsed());
        turmoil::repair("shop", "warehouse");
        for (n, send) in sends.into_iter().enumerate() {
            match send.await?? {
                Delivery::Replied(left) => println!(
                    "[{:>6.2?}] reservation {n:>2}: {} left",
                    turmoil::elapsed(),
                    String::from_utf8_lossy(&left)
                ),
                other => return Err(format!("reservation {n}: {other:?}").into()),
            }
        }
        Ok(())
    });
    sim.run()?;
    println!(
        "stock at the end: {} (100 - 20 reservations, each applied once)",
        stock.get()
    );
    assert_eq!(stock.get(), 80);
    Ok(())
}
