//! Topics under simulated chaos (feature `sim`, on turmoil): three domus, each subscribed to
//! every topic and publishing to its own, while links are partitioned, held, slowed and hosts
//! crash and restart. After every seed: every publish ended (unless its own host crashed under
//! it), every copy a report called delivered reached that subscriber exactly once, nothing
//! reached a subscriber twice, and once the faults healed (and subscriptions were renewed) a
//! publish from every host reaches every host. (30 s of faults per seed: 200 seeds in
//! about 20 s of CI.)

mod common;

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::rc::Rc;
use std::time::Duration;

use bytes::Bytes;
use vicus::services::topics::{CopyOutcome, Topics, TopicsConfig};
use vicus::testing::sim::{Chaos, SimNet, host_addr};
use vicus::{DomusId, MessageType};

const KIND: MessageType = MessageType::app(9);
const HOSTS: [&str; 3] = ["t0", "t1", "t2"];
const CHAOS: Duration = Duration::from_secs(30);
const PUBLISHES_STOP: Duration = Duration::from_secs(32);
/// After the heal, renewals (every third of the lease) have reached every publisher.
const PROBE_AT: Duration = Duration::from_secs(40);
const END: Duration = Duration::from_secs(47);
const LEASE: Duration = Duration::from_secs(6);

/// A copy: publisher, its publish number, the subscriber.
type CopyId = (usize, u64, usize);

#[derive(Default)]
struct Ledger {
    delivered: BTreeMap<CopyId, u32>,
    /// Publishes started, with the run of their host.
    started: BTreeMap<(usize, u64), u64>,
    /// Publishes whose report came back.
    reported: BTreeSet<(usize, u64)>,
    /// Copies a report said were delivered.
    accepted: BTreeSet<CopyId>,
    runs: [u64; 3],
    next: [u64; 3],
    /// After the heal: probes every host got, per publisher.
    probes: BTreeMap<usize, usize>,
}

fn index_of(id: &DomusId) -> usize {
    HOSTS
        .iter()
        .position(|h| id.as_str().ends_with(&format!("/{h}")))
        .expect("a known host")
}

fn payload(me: usize, n: u64) -> Bytes {
    let mut v = vec![me as u8];
    v.extend_from_slice(&n.to_le_bytes());
    Bytes::from(v)
}

fn run_seed(seed: u64) {
    let ledger = Rc::new(RefCell::new(Ledger::default()));
    let mut sim = turmoil::Builder::new()
        .rng_seed(seed)
        .simulation_duration(END + Duration::from_secs(30))
        .tick_duration(Duration::from_millis(10))
        .min_message_latency(Duration::from_millis(1))
        .max_message_latency(Duration::from_millis(20))
        .build();
    let net = SimNet::new(seed).expect("net");
    let mut config = vicus::testing::Mesh::test_config();
    config.keepalive_interval = Duration::from_millis(500);
    config.idle_timeout = Duration::from_secs(2);
    config.send_timeout = Duration::from_secs(10);
    net.set_config(config);
    let ids: Vec<DomusId> = HOSTS
        .iter()
        .map(|h| DomusId::spiffe("vicus.dev", h).expect("id"))
        .collect();
    for (me, name) in HOSTS.iter().enumerate() {
        let ledger = ledger.clone();
        let ids = ids.clone();
        net.host(&mut sim, name, move |domus, net| {
            let ledger = ledger.clone();
            let ids = ids.clone();
            async move {
                // Every host's address by identity (inside the simulation, where the
                // names resolve).
                for (id, host) in ids.iter().zip(HOSTS) {
                    net.resolver().insert_domus(id.clone(), host_addr(host));
                }
                let run = {
                    let mut l = ledger.borrow_mut();
                    l.runs[me] += 1;
                    l.runs[me]
                };
                let mut config = TopicsConfig::default().lease(LEASE);
                config.announce_timeout = Duration::from_secs(2);
                for (i, id) in ids.iter().enumerate() {
                    if i != me {
                        config = config.publisher(id.clone());
                    }
                }
                let topics = Topics::start(&domus, config)?;
                let mut sub = topics.subscribe("sim.>").await?;
                let seen = ledger.clone();
                tokio::task::spawn_local(async move {
                    while let Some(m) = sub.recv().await {
                        let p = m.payload();
                        let from = usize::from(p[0]);
                        let n = u64::from_le_bytes(p[1..9].try_into().expect("9 bytes"));
                        let mut l = seen.borrow_mut();
                        if from >= 100 {
                            *l.probes.entry(from - 100).or_default() += 1;
                        } else {
                            *l.delivered.entry((from, n, me)).or_default() += 1;
                        }
                        drop(l);
                        m.accept();
                    }
                });
                let publisher = topics.publisher(&format!("sim.{}", HOSTS[me]))?;
                while turmoil::elapsed() < PUBLISHES_STOP {
                    let n = {
                        let mut l = ledger.borrow_mut();
                        l.next[me] += 1;
                        let n = l.next[me];
                        l.started.insert((me, n), run);
                        n
                    };
                    let report = publisher.publish(KIND, payload(me, n));
                    let ledger = ledger.clone();
                    tokio::task::spawn_local(async move {
                        let report = report.await.expect("a valid publish");
                        let mut l = ledger.borrow_mut();
                        l.reported.insert((me, n));
                        for (subscriber, outcome) in report.copies() {
                            if matches!(outcome, CopyOutcome::Accepted) {
                                l.accepted.insert((me, n, index_of(subscriber)));
                            }
                        }
                    });
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
                tokio::time::sleep(PROBE_AT - turmoil::elapsed().min(PROBE_AT)).await;
                let probe = publisher
                    .publish(KIND, payload(100 + me, 0))
                    .await
                    .expect("a valid publish");
                assert_eq!(
                    probe.recipients(),
                    HOSTS.len(),
                    "{}: after the heal the probe went to {:?}",
                    HOSTS[me],
                    probe.copies()
                );
                assert!(probe.all_delivered(), "{probe:?}");
                let _keep = topics;
                std::future::pending::<()>().await;
                Ok(())
            }
        });
    }
    sim.client("clock", async move {
        tokio::time::sleep(END).await;
        Ok(())
    });
    Chaos::new(seed, &HOSTS, CHAOS)
        .run(&mut sim)
        .unwrap_or_else(|e| panic!("seed {seed}: the simulation failed: {e}"));
    let l = ledger.borrow();
    for (copy, n) in &l.delivered {
        assert!(*n <= 1, "seed {seed}: copy {copy:?} delivered {n} times");
    }
    for copy in &l.accepted {
        assert_eq!(
            l.delivered.get(copy),
            Some(&1),
            "seed {seed}: copy {copy:?} reported delivered, delivered {:?} times",
            l.delivered.get(copy)
        );
    }
    for (publish, run) in &l.started {
        if l.runs[publish.0] == *run {
            assert!(
                l.reported.contains(publish),
                "seed {seed}: publish {publish:?} never reported (its host did not crash)"
            );
        }
    }
    for (me, host) in HOSTS.iter().enumerate() {
        assert_eq!(
            l.probes.get(&me),
            Some(&HOSTS.len()),
            "seed {seed}: the probe of {host} reached {:?} hosts",
            l.probes.get(&me)
        );
    }
    assert!(
        l.accepted.len() > l.started.len(),
        "seed {seed}: only {} copies accepted for {} publishes",
        l.accepted.len(),
        l.started.len()
    );
}

#[test]
fn topics_under_chaos_every_reported_copy_delivered_exactly_once_seeds_1_to_100() {
    common::run_sim_seeds(1..=common::sim_seeds_per_test(), run_seed);
}

#[test]
fn topics_under_chaos_another_100_seeds() {
    let n = common::sim_seeds_per_test();
    common::run_sim_seeds(2_000_001..=2_000_000 + n, run_seed);
}
