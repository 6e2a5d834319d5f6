//! The DNS SRV resolver against a real DNS server in the test process: hickory-server serving
//! an in-memory zone on a loopback UDP and TCP port, whose records the tests add, change and
//! remove while domus run. Covers TTL refresh, NXDOMAIN, multi-address targets, a slow and a
//! dead server, the resolver conformance suite, and a six-domus fleet (three replicas of one
//! taberna) through kills and restarts.
#![cfg(all(feature = "dns-srv", feature = "test-util"))]

mod common;

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::within;
use hickory_server::Server;
use hickory_server::net::runtime::{Time, TokioRuntimeProvider};
use hickory_server::proto::rr::rdata::{A, SOA, SRV};
use hickory_server::proto::rr::{LowerName, Name, RData, Record, RecordSet, RecordType, RrKey};
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::store::in_memory::InMemoryZoneHandler;
use hickory_server::zone_handler::{AxfrPolicy, Catalog, ZoneHandler, ZoneType};
use vicus::testing::Mesh;
use vicus::testing::conformance::{ResolverUnderTest, check_resolver};
use vicus::{
    Candidate, Delivery, DnsSrvConfig, DnsSrvResolver, Domus, DomusAddr, ErrorId, MessageType,
    RouteResolver, SendOptions, TabernaId,
};

const APP: MessageType = MessageType::app(1);
const ORIGIN: &str = "vicus.test.";
const TEMPLATE: &str = "spiffe://vicus.dev/domus/{host}";

/// A catalog answering after a delay the test sets (0: at once).
struct Delayed {
    catalog: Catalog,
    delay_ms: Arc<AtomicU64>,
}

#[async_trait::async_trait]
impl RequestHandler for Delayed {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        response_handle: R,
    ) -> ResponseInfo {
        let ms = self.delay_ms.load(Ordering::SeqCst);
        if ms > 0 {
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        self.catalog
            .handle_request::<R, T>(request, response_handle)
            .await
    }
}

/// A DNS server for `vicus.test.` on loopback (UDP and TCP on one port).
struct Zone {
    handler: Arc<InMemoryZoneHandler<TokioRuntimeProvider>>,
    addr: SocketAddr,
    delay_ms: Arc<AtomicU64>,
    server: Option<Server<Delayed>>,
}

fn name(text: &str) -> Name {
    Name::from_str(text).expect("a DNS name")
}

impl Zone {
    async fn start() -> Zone {
        let origin = name(ORIGIN);
        let handler = Arc::new(InMemoryZoneHandler::<TokioRuntimeProvider>::empty(
            origin.clone(),
            ZoneType::Primary,
            AxfrPolicy::Deny,
        ));
        // Negative answers are cached for the SOA minimum: 1 s.
        let soa = SOA::new(
            name("ns.vicus.test."),
            name("admin.vicus.test."),
            1,
            60,
            60,
            600,
            1,
        );
        assert!(
            handler
                .upsert(Record::from_rdata(origin.clone(), 1, RData::SOA(soa)), 1)
                .await
        );
        let mut catalog = Catalog::new();
        catalog.upsert(
            LowerName::new(&origin),
            vec![handler.clone() as Arc<dyn ZoneHandler>],
        );
        let delay_ms = Arc::new(AtomicU64::new(0));
        let mut server = Server::new(Delayed {
            catalog,
            delay_ms: delay_ms.clone(),
        });
        // UDP on a free port, then TCP on the same one (retry if TCP's is taken).
        let (udp, tcp) = loop {
            let udp = tokio::net::UdpSocket::bind("127.0.0.1:0")
                .await
                .expect("udp");
            let port = udp.local_addr().expect("addr").port();
            if let Ok(tcp) = tokio::net::TcpListener::bind(("127.0.0.1", port)).await {
                break (udp, tcp);
            }
        };
        let addr = udp.local_addr().expect("addr");
        server.register_socket(udp);
        server.register_listener(tcp, Duration::from_secs(5), 64 * 1024);
        Zone {
            handler,
            addr,
            delay_ms,
            server: Some(server),
        }
    }

    /// Replaces `owner`'s records of `rtype` with `records` (none: removes them), in one step.
    async fn set(&self, owner: &str, rtype: RecordType, ttl: u32, data: Vec<RData>) {
        let owner = name(owner);
        let key = RrKey::new(LowerName::new(&owner), rtype);
        let mut records = self.handler.records_mut().await;
        if data.is_empty() {
            records.remove(&key);
            return;
        }
        let mut set = RecordSet::with_ttl(owner.clone(), rtype, ttl);
        set.set_records(
            data.into_iter()
                .map(|d| Record::from_rdata(owner.clone(), ttl, d))
                .collect(),
        );
        records.insert(key, Arc::new(set));
    }

    /// `srv_name` lists `targets` (host label, port, priority, weight) under `vicus.test.`, each
    /// host at `ips`.
    async fn serve(&self, srv_name: &str, ttl: u32, targets: &[(&str, u16, u16, u16)]) {
        let mut srv = Vec::new();
        for (host, port, priority, weight) in targets {
            let target = format!("{host}.hosts.{ORIGIN}");
            srv.push(RData::SRV(SRV::new(
                *priority,
                *weight,
                *port,
                name(&target),
            )));
        }
        self.set(srv_name, RecordType::SRV, ttl, srv).await;
    }

    async fn host(&self, host: &str, ttl: u32, ips: &[Ipv4Addr]) {
        let owner = format!("{host}.hosts.{ORIGIN}");
        let data = ips.iter().map(|ip| RData::A(A(*ip))).collect();
        self.set(&owner, RecordType::A, ttl, data).await;
    }

    fn set_delay(&self, delay: Duration) {
        self.delay_ms.store(
            u64::try_from(delay.as_millis()).expect("ms"),
            Ordering::SeqCst,
        );
    }

    async fn stop(&mut self) {
        if let Some(mut server) = self.server.take() {
            let _ = server.shutdown_gracefully().await;
        }
    }
}

fn config(zone: &Zone) -> DnsSrvConfig {
    DnsSrvConfig::new()
        .name_server(zone.addr)
        .identity_template(TEMPLATE)
        .query_timeout(Duration::from_millis(300))
        .ttl_bounds(Duration::from_millis(100), Duration::from_secs(60))
        .negative_ttl(Duration::from_millis(200))
        .retry_interval(Duration::from_millis(100))
}

fn srv_name(service: &str) -> String {
    format!("_vicus._tcp.{service}.{ORIGIN}")
}

fn loopback(n: u8) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 0, n)
}

/// The candidates as (address, identity, priority, weight), sorted.
fn summary(c: &[Candidate]) -> Vec<(String, String, u16, u16)> {
    let mut v: Vec<_> = c
        .iter()
        .map(|c| {
            (
                c.route.addr.to_string(),
                c.route
                    .identity
                    .as_ref()
                    .map(ToString::to_string)
                    .unwrap_or_default(),
                c.priority,
                c.weight,
            )
        })
        .collect();
    v.sort();
    v
}

/// Polls `resolver` for `taberna` until `ok` holds of its answer, for at most `bound`.
async fn until<F>(
    resolver: &dyn RouteResolver,
    taberna: TabernaId,
    bound: Duration,
    ok: F,
) -> Duration
where
    F: Fn(&Result<Arc<[Candidate]>, vicus::Error>) -> bool,
{
    let start = tokio::time::Instant::now();
    loop {
        let got = resolver.candidates(taberna).await;
        if ok(&got) {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < bound,
            "not within {bound:?}; last answer {:?}",
            got.map(|c| summary(&c))
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn srv_answers_become_candidates_with_every_address_and_follow_dns_within_one_ttl() {
    within(async {
        let zone = Zone::start().await;
        let t = TabernaId(7);
        let name = srv_name("billing");
        zone.serve(&name, 1, &[("a", 7001, 0, 10), ("b", 7002, 0, 10), ("c", 7003, 1, 5)])
            .await;
        zone.host("a", 1, &[loopback(1), loopback(2)]).await;
        zone.host("b", 1, &[loopback(3)]).await;
        zone.host("c", 1, &[loopback(4)]).await;
        let resolver = DnsSrvResolver::new(config(&zone).service(t, &name)).expect("resolver");
        let mut changes = resolver.changes().expect("the resolver signals changes");
        let first = resolver.candidates(t).await.expect("candidates");
        assert_eq!(
            summary(&first),
            vec![
                ("127.0.0.1:7001".into(), "spiffe://vicus.dev/domus/a".into(), 0, 5),
                ("127.0.0.2:7001".into(), "spiffe://vicus.dev/domus/a".into(), 0, 5),
                ("127.0.0.3:7002".into(), "spiffe://vicus.dev/domus/b".into(), 0, 10),
                ("127.0.0.4:7003".into(), "spiffe://vicus.dev/domus/c".into(), 1, 5),
            ],
            "every address of every target, the two-address target's weight split"
        );
        // A second ask is answered from the cache, at once.
        let again = std::pin::pin!(resolver.candidates(t));
        let polled = poll_once(again)
            .expect("answered on the first poll")
            .expect("candidates");
        assert_eq!(summary(&polled), summary(&first));

        // A record changes: seen by the background refresh within about one TTL (1 s), and
        // signalled.
        zone.serve(&name, 1, &[("a", 7001, 0, 10), ("b", 7009, 0, 10)]).await;
        let took = until(&resolver, t, Duration::from_secs(4), |got| {
            matches!(got, Ok(c) if c.len() == 3 && c.iter().any(|c| c.route.addr.to_string() == "127.0.0.3:7009"))
        })
        .await;
        println!("a changed SRV record was seen after {took:?} (TTL 1 s)");
        assert!(
            tokio::time::timeout(Duration::from_secs(1), changes.changed())
                .await
                .expect("a change was signalled")
        );

        // An address is added to a target.
        zone.host("b", 1, &[loopback(3), loopback(5)]).await;
        until(&resolver, t, Duration::from_secs(4), |got| {
            matches!(got, Ok(c) if c.len() == 4)
        })
        .await;

        // The service goes away: NXDOMAIN is an answer (no replica), not a failure.
        zone.set(&name, RecordType::SRV, 1, Vec::new()).await;
        until(&resolver, t, Duration::from_secs(4), |got| {
            matches!(got, Err(e) if e.id() == ErrorId::UnknownTaberna)
        })
        .await;
        // And comes back.
        zone.serve(&name, 1, &[("c", 7003, 0, 1)]).await;
        until(&resolver, t, Duration::from_secs(4), |got| {
            matches!(got, Ok(c) if summary(c) == vec![("127.0.0.4:7003".into(), "spiffe://vicus.dev/domus/c".into(), 0, 1)])
        })
        .await;

        // A name DNS never had: UnknownTaberna at the first lookup.
        let t2 = TabernaId(8);
        let other = DnsSrvResolver::new(config(&zone).service(t2, srv_name("nobody")))
            .expect("resolver");
        let e = other.candidates(t2).await.expect_err("no such service");
        assert_eq!(e.id(), ErrorId::UnknownTaberna, "{e}");
        assert!(e.message().contains("nobody"), "{e}");
    })
    .await;
}

/// Polls a future once by hand: `Some` when it was ready at once.
fn poll_once<F: Future>(mut f: Pin<&mut F>) -> Option<F::Output> {
    match f
        .as_mut()
        .poll(&mut std::task::Context::from_waker(std::task::Waker::noop()))
    {
        std::task::Poll::Ready(out) => Some(out),
        std::task::Poll::Pending => None,
    }
}

#[tokio::test]
async fn a_slow_or_dead_dns_server_keeps_the_last_good_answer_reports_once_and_bounds_first_lookups()
 {
    within(async {
        let mut zone = Zone::start().await;
        let mut mesh = Mesh::new().expect("mesh");
        let server = mesh.domus("server").await.expect("server");
        let inbox = server.taberna(TabernaId(5)).expect("taberna");
        tokio::spawn(async move {
            while let Some(req) = inbox.recv().await {
                req.accept();
            }
        });
        let port = match server.local_addr() {
            Some(DomusAddr::Tcp(a)) => a.port(),
            other => panic!("{other:?}"),
        };
        let known = srv_name("known");
        zone.serve(&known, 1, &[("server", port, 0, 1)]).await;
        zone.host("server", 1, &[loopback(1)]).await;
        let fresh = srv_name("fresh");
        let resolver = Arc::new(
            DnsSrvResolver::new(
                config(&zone)
                    .service(TabernaId(5), &known)
                    .service(TabernaId(6), &fresh),
            )
            .expect("resolver"),
        );
        let mut client_config = Mesh::test_config();
        client_config.resolve_timeout = Duration::from_millis(500);
        let client = mesh
            .builder("client")
            .expect("builder")
            .resolver(resolver.clone())
            .config(client_config)
            .build()
            .await
            .expect("client");
        let mut errors = client.reporting().errors();
        let opts = SendOptions::default().timeout(Duration::from_secs(5));
        let out = client
            .send(TabernaId(5), APP, Bytes::from_static(b"1"), opts.clone())
            .await
            .expect("routed by DNS");
        assert_eq!(out, Delivery::Accepted);

        // The server turns slow (3 s > query timeout 300 ms > ...): refreshes fail, the answer
        // stays, sends keep working, and the failure is reported once.
        zone.set_delay(Duration::from_secs(3));
        let first = tokio::time::timeout(Duration::from_secs(5), errors.recv())
            .await
            .expect("a DNS failure is reported")
            .expect("feed open");
        let first = match first {
            vicus::reporting::FeedItem::Item(e) => e,
            other => panic!("{other:?}"),
        };
        assert_eq!(first.error.id(), ErrorId::ResolverFailed, "{}", first.error);
        assert!(first.error.message().contains("known"), "{}", first.error);
        assert!(
            first.error.message().contains("keeping the 1 candidate"),
            "{}",
            first.error
        );
        for i in 0..5u8 {
            let out = client
                .send(TabernaId(5), APP, Bytes::from(vec![i]), opts.clone())
                .await
                .expect("the last good answer still routes");
            assert_eq!(out, Delivery::Accepted);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        // A taberna never looked up: its first lookup is bounded by resolve_timeout.
        let started = tokio::time::Instant::now();
        let e = client
            .send(TabernaId(6), APP, Bytes::from_static(b"x"), opts.clone())
            .await
            .expect_err("DNS does not answer in time");
        let took = started.elapsed();
        assert!(
            matches!(e.id(), ErrorId::PeerUnavailable | ErrorId::ResolverFailed),
            "{e}"
        );
        assert!(took < Duration::from_secs(2), "bounded: {took:?}");
        // Still one report for the outage (the failed first lookup of `fresh` is part of it).
        let mut reports = Vec::new();
        while let Ok(Some(vicus::reporting::FeedItem::Item(e))) =
            tokio::time::timeout(Duration::from_millis(100), errors.recv()).await
        {
            reports.push(e.error);
        }
        assert!(
            reports
                .iter()
                .all(|e| !e.message().contains("_vicus._tcp.known")),
            "the outage was reported once: {reports:?}"
        );

        // The server stops altogether: still the old answer.
        zone.stop().await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let out = client
            .send(TabernaId(5), APP, Bytes::from_static(b"2"), opts)
            .await
            .expect("the last good answer still routes");
        assert_eq!(out, Delivery::Accepted);
        client.shutdown().await;
        mesh.shutdown().await;
    })
    .await;
}

/// The conformance suite, with the zone as the source: a taberna's candidates become one SRV
/// name, each candidate a target named after its identity.
struct DnsUnderTest {
    zone: Zone,
    resolver: Arc<DnsSrvResolver>,
    names: HashMap<TabernaId, String>,
}

impl ResolverUnderTest for DnsUnderTest {
    fn resolver(&self) -> Arc<dyn RouteResolver> {
        self.resolver.clone()
    }

    fn set<'a>(
        &'a self,
        taberna: TabernaId,
        candidates: Vec<Candidate>,
    ) -> Pin<Box<dyn Future<Output = ()> + Send + 'a>> {
        Box::pin(async move {
            let Some(srv) = self.names.get(&taberna) else {
                panic!("{taberna} has no SRV name in this test");
            };
            let mut targets = Vec::new();
            for c in &candidates {
                let id = c
                    .route
                    .identity
                    .as_ref()
                    .expect("conformance candidates name identities");
                let host = id
                    .to_string()
                    .rsplit('/')
                    .next()
                    .expect("a name")
                    .to_owned();
                let DomusAddr::Tcp(addr) = &c.route.addr else {
                    panic!("a TCP candidate");
                };
                let IpAddr::V4(ip) = addr.ip() else {
                    panic!("IPv4")
                };
                self.zone.host(&host, 1, &[ip]).await;
                targets.push((host, addr.port(), c.priority, c.weight));
            }
            let targets: Vec<(&str, u16, u16, u16)> = targets
                .iter()
                .map(|(h, p, pr, w)| (h.as_str(), *p, *pr, *w))
                .collect();
            self.zone.serve(srv, 1, &targets).await;
        })
    }

    fn remove<'a>(&'a self, taberna: TabernaId) -> Pin<Box<dyn Future<Output = ()> + Send + 'a>> {
        Box::pin(async move {
            if let Some(srv) = self.names.get(&taberna) {
                self.zone.set(srv, RecordType::SRV, 1, Vec::new()).await;
            }
        })
    }
}

#[tokio::test]
async fn the_dns_srv_resolver_passes_the_resolver_conformance_suite() {
    within(async {
        let zone = Zone::start().await;
        let names: HashMap<TabernaId, String> = (1..=3u64)
            .map(|i| {
                (
                    TabernaId(0xC0F0_0000 + i),
                    srv_name(&format!("conformance{i}")),
                )
            })
            .collect();
        let mut config = config(&zone);
        for (t, n) in &names {
            config = config.service(*t, n);
        }
        let resolver = Arc::new(DnsSrvResolver::new(config).expect("resolver"));
        let target = DnsUnderTest {
            zone,
            resolver,
            names,
        };
        // Changes reach the resolver within a TTL (1 s) plus a refresh.
        let report = check_resolver(&target, Duration::from_secs(4)).await;
        assert!(report.checks.len() >= 7, "{report:?}");
        report.assert_passed();
    })
    .await;
}

/// Seen: message id → the replicas that delivered it.
type Seen = Arc<Mutex<BTreeMap<u64, Vec<&'static str>>>>;

/// A replica `name` serving `taberna`: records each delivery's id in `seen` and counts it.
async fn replica(
    mesh: &mut Mesh,
    name: &'static str,
    taberna: TabernaId,
    seen: Seen,
    count: Arc<AtomicU64>,
) -> Domus {
    let r = mesh.domus(name).await.expect("replica");
    let t = r.taberna(taberna).expect("taberna");
    tokio::spawn(async move {
        while let Some(req) = t.recv().await {
            let id = req
                .payload()
                .get(..8)
                .and_then(|b| <[u8; 8]>::try_from(b).ok())
                .map(u64::from_be_bytes)
                .expect("an 8-byte id");
            seen.lock().expect("seen").entry(id).or_default().push(name);
            count.fetch_add(1, Ordering::SeqCst);
            req.accept();
        }
    });
    r
}

/// Issue 14's fleet: three replicas of one taberna found through DNS SRV by three clients.
/// Sends spread by weight; a replica killed → sends that never reached it go to the others and
/// nothing is delivered twice; the replica returns (a new port, as a restarted pod gets a new
/// address) → DNS says so and it gets traffic again within a TTL.
#[tokio::test]
async fn six_domus_three_replicas_through_dns_srv_spread_fail_over_and_come_back() {
    within(async {
        let zone = Zone::start().await;
        let mut mesh = Mesh::new().expect("mesh");
        let billing = TabernaId(42);
        let seen: Seen = Arc::default();
        let counts: HashMap<&'static str, Arc<AtomicU64>> = ["r1", "r2", "r3"]
            .into_iter()
            .map(|n| (n, Arc::default()))
            .collect();
        let port = |d: &Domus| match d.local_addr() {
            Some(DomusAddr::Tcp(a)) => a.port(),
            other => panic!("{other:?}"),
        };
        let r1 = replica(&mut mesh, "r1", billing, seen.clone(), counts["r1"].clone()).await;
        let r2 = replica(&mut mesh, "r2", billing, seen.clone(), counts["r2"].clone()).await;
        let r3 = replica(&mut mesh, "r3", billing, seen.clone(), counts["r3"].clone()).await;
        let name = srv_name("billing");
        for r in ["r1", "r2", "r3"] {
            zone.host(r, 1, &[loopback(1)]).await;
        }
        let weights = |p1, p2, p3| vec![("r1", p1, 0, 1), ("r2", p2, 0, 1), ("r3", p3, 0, 2)];
        zone.serve(&name, 1, &weights(port(&r1), port(&r2), port(&r3)))
            .await;
        let mut client_config = Mesh::test_config();
        // A replica found down is avoided for this long (longer than the test's phases).
        client_config.reconnect_backoff_max = Duration::from_secs(2);
        let mut clients = Vec::new();
        for c in ["c1", "c2", "c3"] {
            let resolver = Arc::new(
                DnsSrvResolver::new(config(&zone).service(billing, &name)).expect("resolver"),
            );
            clients.push(
                mesh.builder(c)
                    .expect("builder")
                    .resolver(resolver)
                    .config(client_config.clone())
                    .build()
                    .await
                    .expect("client"),
            );
        }
        let next_id = AtomicU64::new(0);
        let burst = |n: u64| {
            let sends: Vec<_> = (0..n)
                .map(|i| {
                    let id = next_id.fetch_add(1, Ordering::SeqCst);
                    let client = clients[(i % 3) as usize].clone();
                    tokio::spawn(async move {
                        let out = client
                            .send(
                                billing,
                                APP,
                                Bytes::copy_from_slice(&id.to_be_bytes()),
                                SendOptions::default().timeout(Duration::from_secs(10)),
                            )
                            .await;
                        (id, out)
                    })
                })
                .collect();
            async move {
                let mut ok = 0u64;
                for s in sends {
                    let (id, out) = s.await.expect("join");
                    match out {
                        Ok(Delivery::Accepted) => ok += 1,
                        other => panic!("send {id}: {other:?}"),
                    }
                }
                ok
            }
        };
        let count = |n: &str| counts[n].load(Ordering::SeqCst);

        // 1. Spread by weight 1 : 1 : 2.
        assert_eq!(burst(600).await, 600);
        let spread = [count("r1"), count("r2"), count("r3")];
        println!("600 sends over weights 1/1/2: {spread:?}");
        assert_eq!(spread.iter().sum::<u64>(), 600);
        assert!((90..=210).contains(&spread[0]), "{spread:?}");
        assert!((90..=210).contains(&spread[1]), "{spread:?}");
        assert!((210..=390).contains(&spread[2]), "{spread:?}");

        // 2. r2 crashes (no goodbye). DNS still lists it; sends that choose it never leave
        // and are delivered by r1 or r3.
        let r2_port = port(&r2);
        let r2_id = r2.identity().clone();
        drop(mesh.remove("r2"));
        drop(r2);
        // The clients see its calles close (a message written before they notice may have
        // reached it, and rightly stays with it: that is not what this phase measures).
        let noticed = tokio::time::Instant::now();
        while clients
            .iter()
            .any(|c| c.reporting().connected_peers().contains(&r2_id))
        {
            assert!(
                noticed.elapsed() < Duration::from_secs(5),
                "the clients did not see r2 go"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let r2_before = count("r2");
        let before = [count("r1"), count("r3")];
        assert_eq!(burst(300).await, 300);
        assert_eq!(count("r2"), r2_before, "nothing reached the dead replica");
        assert_eq!(count("r1") + count("r3"), before[0] + before[1] + 300);

        // 3. r2 returns at a new port (a restarted pod); DNS is updated and within about one
        // TTL the clients send to it again.
        let r2 = replica(&mut mesh, "r2", billing, seen.clone(), counts["r2"].clone()).await;
        assert_ne!(port(&r2), r2_port);
        zone.serve(&name, 1, &weights(port(&r1), port(&r2), port(&r3)))
            .await;
        let back = tokio::time::Instant::now();
        let returned = count("r2");
        loop {
            assert_eq!(burst(30).await, 30);
            if count("r2") > returned {
                break;
            }
            // One TTL (1 s) for the refresh to see it, plus slack for a loaded machine; the
            // clients' memory that r2 was down (2 s) is for its old address only.
            assert!(
                back.elapsed() < Duration::from_secs(3),
                "the returned replica got no traffic within 3 s"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        println!(
            "r2 got traffic again {:?} after DNS listed it",
            back.elapsed()
        );
        assert_eq!(burst(400).await, 400);
        let last = count("r2") - returned;
        assert!(last >= 40, "the returned replica takes its share: {last}");

        // Nothing was delivered twice, and every accepted send was delivered once.
        {
            let seen = seen.lock().expect("seen");
            let total = next_id.load(Ordering::SeqCst);
            assert_eq!(seen.len() as u64, total, "every send delivered");
            let twice: Vec<_> = seen.iter().filter(|(_, by)| by.len() > 1).collect();
            assert!(twice.is_empty(), "delivered twice: {twice:?}");
        }
        for c in &clients {
            c.shutdown().await;
        }
        mesh.shutdown().await;
    })
    .await;
}

/// What DNS decides, and the strict form that narrows it: the template's `{host}` comes from
/// the SRV target, so an answer naming another target steers sends to whichever domus the CA
/// certified under that name (here `evil`, a real domus of the same CA). With
/// `allow_identities` (and `strict`), a target whose templated identity is not on the list is
/// refused: no send reaches it, alone it fails the lookup, beside allowed ones it is left out
/// and reported.
#[tokio::test]
async fn an_srv_target_whose_templated_identity_is_not_allowed_is_refused() {
    within(async {
        let zone = Zone::start().await;
        let mut mesh = Mesh::new().expect("mesh");
        let t = TabernaId(9);
        let port = |d: &Domus| match d.local_addr() {
            Some(DomusAddr::Tcp(a)) => a.port(),
            other => panic!("{other:?}"),
        };
        let billing = mesh.domus("billing-0").await.expect("billing-0");
        let evil = mesh.domus("evil").await.expect("evil");
        common::spawn_named_echo(billing.taberna(t).expect("taberna"), "billing-0");
        common::spawn_named_echo(evil.taberna(t).expect("taberna"), "evil");
        zone.host("billing-0", 1, &[loopback(1)]).await;
        zone.host("evil", 1, &[loopback(1)]).await;
        let name = srv_name("billing");
        // A poisoned answer: the service's only target is `evil`.
        zone.serve(&name, 1, &[("evil", port(&evil), 0, 1)]).await;
        let opts = SendOptions::default().timeout(Duration::from_secs(5));
        let client = |mesh: &mut Mesh, who: &str, resolver: DnsSrvResolver| {
            mesh.builder(who)
                .expect("builder")
                .resolver(Arc::new(resolver))
                .dial_only()
                .build()
        };

        // The template alone: DNS chose the identity, and the send went to `evil`.
        let trusting = client(
            &mut mesh,
            "trusting",
            DnsSrvResolver::new(config(&zone).service(t, &name)).expect("resolver"),
        )
        .await
        .expect("client");
        let out = trusting
            .send(t, APP, Bytes::from_static(b"1"), opts.clone())
            .await
            .expect("delivered");
        assert_eq!(
            out,
            Delivery::Replied(Bytes::from_static(b"evil:1").into()),
            "DNS steers a template-only resolver to any identity the template produces"
        );

        // Strict: only billing's replicas.
        let strict_config = config(&zone)
            .service(t, &name)
            .allow_identities(&name, ["spiffe://vicus.dev/domus/billing-*"])
            .strict();
        let strict = client(
            &mut mesh,
            "strict",
            DnsSrvResolver::new(strict_config).expect("resolver"),
        )
        .await
        .expect("client");
        let mut errors = strict.reporting().errors();
        let e = strict
            .send(t, APP, Bytes::from_static(b"2"), opts.clone())
            .await
            .expect_err("the only target is not allowed");
        assert_eq!(e.id(), ErrorId::ResolverFailed, "{e}");
        assert!(
            e.message().contains("spiffe://vicus.dev/domus/evil") && e.message().contains("allow"),
            "{e}"
        );

        // The answer lists billing-0 and evil: every send goes to billing-0, and evil's
        // exclusion is reported.
        zone.serve(
            &name,
            1,
            &[
                ("evil", port(&evil), 0, 1),
                ("billing-0", port(&billing), 0, 1),
            ],
        )
        .await;
        let started = tokio::time::Instant::now();
        loop {
            match strict
                .send(t, APP, Bytes::from_static(b"3"), opts.clone())
                .await
            {
                Ok(out) => {
                    assert_eq!(
                        out,
                        Delivery::Replied(Bytes::from_static(b"billing-0:3").into())
                    );
                    break;
                }
                // The failed first lookup is retried every retry_interval (100 ms).
                Err(e) if e.id() == ErrorId::ResolverFailed => {}
                Err(e) => panic!("{e}"),
            }
            assert!(
                started.elapsed() < Duration::from_secs(4),
                "billing-0 was not reached"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        for i in 0..20u8 {
            let out = strict
                .send(t, APP, Bytes::from(vec![b'a' + i]), opts.clone())
                .await
                .expect("delivered");
            let mut expected = b"billing-0:".to_vec();
            expected.push(b'a' + i);
            assert_eq!(
                out,
                Delivery::Replied(Bytes::from(expected).into()),
                "send {i}"
            );
        }
        let mut reported = Vec::new();
        while let Ok(Some(vicus::reporting::FeedItem::Item(e))) =
            tokio::time::timeout(Duration::from_millis(300), errors.recv()).await
        {
            reported.push(e.error.message().to_owned());
        }
        assert!(
            reported
                .iter()
                .any(|m| m.contains("domus/evil") && m.contains("allow")),
            "the refused target is reported: {reported:?}"
        );
        trusting.shutdown().await;
        strict.shutdown().await;
        mesh.shutdown().await;
    })
    .await;
}

/// The `ResolverFailed` entries of `errors` until it stays quiet for 300 ms.
async fn resolver_failures(errors: &mut vicus::reporting::ErrorReceiver) -> Vec<String> {
    let mut found = Vec::new();
    while let Ok(Some(item)) = tokio::time::timeout(Duration::from_millis(300), errors.recv()).await
    {
        match item {
            vicus::reporting::FeedItem::Item(e) if e.error.id() == ErrorId::ResolverFailed => {
                found.push(e.error.message().to_owned());
            }
            vicus::reporting::FeedItem::Item(_) => {}
            other => panic!("{other:?}"),
        }
    }
    found
}

/// A DNS outage is one entry on the error feed however many SRV names it hits (here four,
/// all refreshed while the server is too slow), and the next outage after every name
/// answered again is one more.
#[tokio::test]
async fn a_dns_outage_is_reported_once_per_resolver_however_many_names_it_hits() {
    within(async {
        let zone = Zone::start().await;
        let mut mesh = Mesh::new().expect("mesh");
        zone.host("h", 1, &[loopback(1)]).await;
        // A short query timeout: each failing lookup below ends within a few hundred ms.
        let mut config = config(&zone).query_timeout(Duration::from_millis(100));
        let tabernas: Vec<TabernaId> = (1..=4).map(TabernaId).collect();
        for t in &tabernas {
            let name = srv_name(&format!("svc{}", t.0));
            zone.serve(&name, 1, &[("h", 7000, 0, 1)]).await;
            config = config.service(*t, &name);
        }
        let resolver = Arc::new(DnsSrvResolver::new(config).expect("resolver"));
        let client = mesh
            .builder("client")
            .expect("builder")
            .resolver(resolver.clone())
            .dial_only()
            .build()
            .await
            .expect("client");
        let mut errors = client.reporting().errors();
        for t in &tabernas {
            resolver.candidates(*t).await.expect("answered");
        }

        for outage in 1..=2 {
            // Too slow for the query timeout: once the answers' TTL (1 s) is over, refreshes
            // fail. Wait for the first report, then make sure every name's refresh failed
            // (refresh_now waits for each lookup).
            zone.set_delay(Duration::from_secs(3));
            let first = tokio::time::timeout(Duration::from_secs(5), errors.recv())
                .await
                .expect("the outage is reported")
                .expect("feed open");
            let mut reports = match first {
                vicus::reporting::FeedItem::Item(e) if e.error.id() == ErrorId::ResolverFailed => {
                    vec![e.error.message().to_owned()]
                }
                other => panic!("{other:?}"),
            };
            resolver.refresh_now().await;
            resolver.refresh_now().await;
            reports.extend(resolver_failures(&mut errors).await);
            println!(
                "outage {outage}: {} report(s) for 4 failing names",
                reports.len()
            );
            assert_eq!(reports.len(), 1, "outage {outage}: {reports:#?}");
            assert!(
                reports[0].contains("not reported until every name answers again"),
                "{}",
                reports[0]
            );
            for t in &tabernas {
                resolver
                    .candidates(*t)
                    .await
                    .expect("the last good answer stays");
            }
            // DNS answers again: every name, so the outage is over (nothing is reported).
            zone.set_delay(Duration::ZERO);
            resolver.refresh_now().await;
            resolver.refresh_now().await;
            assert_eq!(resolver_failures(&mut errors).await, Vec::<String>::new());
        }
        client.shutdown().await;
        mesh.shutdown().await;
    })
    .await;
}

/// DNS SRV names the publishers of a topic (`DnsSrvConfig::topic`): a subscriber with no
/// session and no configured publisher finds the publisher through DNS, is granted by it,
/// and gets its publishes.
#[tokio::test]
async fn dns_srv_names_the_publishers_of_a_topic() {
    use vicus::services::topics::{Topics, TopicsConfig};
    within(async {
        let zone = Zone::start().await;
        let mut mesh = Mesh::new().expect("mesh");
        let news = mesh.domus("news-0").await.expect("news-0");
        let port = match news.local_addr() {
            Some(DomusAddr::Tcp(a)) => a.port(),
            other => panic!("{other:?}"),
        };
        zone.host("news-0", 1, &[loopback(1)]).await;
        let name = srv_name("news");
        zone.serve(&name, 1, &[("news-0", port, 0, 1)]).await;
        let resolver = DnsSrvResolver::new(config(&zone).topic("news.>", &name)).expect("resolver");
        let listed = resolver.topic_publishers().await.expect("listed");
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].pattern, "news.>");
        assert_eq!(listed[0].publishers, vec![news.identity().clone()]);
        let reader = mesh
            .builder("reader")
            .expect("builder")
            .resolver(Arc::new(resolver))
            .dial_only()
            .build()
            .await
            .expect("reader");
        let publisher = Topics::start(&news, TopicsConfig::default()).expect("start");
        let topics = Topics::start(&reader, TopicsConfig::default()).expect("start");
        let mut sub = topics.subscribe("news.*").await.expect("subscribe");
        assert!(sub.granted_by(news.identity()), "{:?}", sub.grants());
        let report = publisher.publish("news.today", APP, Bytes::from_static(b"headline"));
        let copy = sub
            .recv_timeout(Duration::from_secs(5))
            .await
            .expect("copy");
        assert_eq!(&copy.payload()[..], b"headline");
        copy.accept();
        assert_eq!(report.await.expect("publish").delivered(), 1);
        // A topic entry without an identity template is refused: publishers are identities.
        let e = DnsSrvResolver::new(
            DnsSrvConfig::new()
                .name_server(zone.addr)
                .topic("news.>", &name),
        )
        .expect_err("no template");
        assert_eq!(e.id(), ErrorId::InvalidConfig);
        reader.shutdown().await;
        mesh.shutdown().await;
    })
    .await;
}
