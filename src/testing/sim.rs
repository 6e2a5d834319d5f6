//! Domus over turmoil's simulated network (feature `sim`): many domus in one thread, on a
//! virtual clock, with the network under the test's control — partitions, per-link latency,
//! messages held and released, hosts crashed and restarted — and, for one seed, the same run
//! every time.
//!
//! A simulated domus dials through [`SimConnector`] (turmoil's TCP instead of the kernel's)
//! and accepts the calles turmoil delivers to [`SIM_PORT`] on its host; everything above the
//! byte stream — TLS 1.3 with client certificates, HELLO, sessions, replay, dedupe — is the
//! production code. [`SimNet`] holds what the hosts share: a development CA, one resolver,
//! and the seed of vicus's own randomness (epochs, reconnect jitter).
//!
//! A partition (`turmoil::partition`) drops what is sent across it; turmoil's TCP does not
//! retransmit it after `repair` as a kernel's would. So a callis that was open when a
//! partition began is dead without either side being told, and is found dead only when
//! `DomusConfig::idle_timeout` (default 20 s) passes without a byte from the peer: messages
//! held behind it are delivered that long after the last bytes heard, not at the repair (a
//! 2 s partition: 13–18 s after the repair with the defaults, under a second with
//! `idle_timeout` 1 s and `keepalive_interval` 300 ms; `tests/sim.rs` checks both). A send
//! that had no callis yet is dialled again as its backoff allows, and goes out soon after the
//! repair (as in the example below). `turmoil::hold` / `release` delay bytes instead of
//! dropping them.
//!
//! ```
//! use std::time::Duration;
//! use bytes::Bytes;
//! use vicus::testing::sim::SimNet;
//! use vicus::{Delivery, MessageType, SendOptions, TabernaId};
//!
//! const KIND: MessageType = MessageType::app(1);
//!
//! let mut sim = turmoil::Builder::new().rng_seed(7).build();
//! let net = SimNet::new(7).expect("net");
//! net.host(&mut sim, "billing", |domus, net| async move {
//!     let t = domus.taberna(TabernaId(1))?;
//!     net.route(TabernaId(1), "billing");
//!     while let Some(req) = t.recv().await {
//!         req.reply(Bytes::from_static(b"paid"));
//!     }
//!     Ok(())
//! });
//! let client = net.clone();
//! sim.client("shop", async move {
//!     let shop = client.domus("shop").await?;
//!     // The billing host went dark for a while: the send (no callis open yet) waits, and is
//!     // delivered soon after the link heals, once a redial gets through.
//!     turmoil::partition("shop", "billing");
//!     let send = tokio::spawn(shop.send(TabernaId(1), KIND, Bytes::new(), SendOptions::default()));
//!     tokio::time::sleep(Duration::from_secs(2)).await;
//!     turmoil::repair("shop", "billing");
//!     assert_eq!(send.await??, Delivery::Replied(Bytes::from_static(b"paid").into()));
//!     Ok(())
//! });
//! sim.run().expect("the simulation");
//! ```
//!
//! What it must not do: it runs only inside a turmoil simulation (its functions call
//! turmoil's, which panic outside one — that is turmoil's contract, and a test bug); it never
//! touches a real socket; its certificates are development ones.

use std::future::Future;
use std::io;
use std::sync::{Arc, Mutex, PoisonError};

use crate::a0_transport::{CallisStream, ConnectFuture, Connector};
use crate::dev_certs::DevCa;
use crate::domus::DomusBuilder;
use crate::{AuthConfig, Domus, DomusAddr, DomusConfig, Error, SimpleResolver, TabernaId};

/// The port every simulated domus accepts calles on.
pub const SIM_PORT: u16 = 4040;

/// Dials turmoil's simulated TCP; a domus built with it (and [`accept_calles`]) lives on the
/// simulated network.
#[derive(Debug, Default, Clone, Copy)]
pub struct SimConnector;

impl Connector for SimConnector {
    fn connect<'a>(&'a self, addr: &'a DomusAddr) -> ConnectFuture<'a> {
        Box::pin(async move {
            let DomusAddr::Tcp(to) = addr else {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("{addr} is not a TCP address; simulated domus are reached over TCP"),
                ));
            };
            let stream = turmoil::net::TcpStream::connect(*to).await?;
            Ok(Box::new(stream) as Box<dyn CallisStream>)
        })
    }
}

/// The address of the domus on turmoil host `host` (call inside the simulation).
pub fn host_addr(host: &str) -> DomusAddr {
    DomusAddr::Tcp((turmoil::lookup(host), SIM_PORT).into())
}

/// Builds `builder` as a simulated domus on the current turmoil host: it dials through
/// [`SimConnector`] and a task hands it every callis accepted on [`SIM_PORT`] (the task
/// ends with the domus). The builder's own bind address, if any, is ignored.
pub async fn start(builder: DomusBuilder) -> Result<Domus, Error> {
    let domus = builder
        .dial_only()
        .connector(Arc::new(SimConnector))
        .build()
        .await?;
    accept_calles(&domus).await?;
    Ok(domus)
}

/// Listens on [`SIM_PORT`] of the current host and hands every accepted stream to `domus`
/// (its handshake and the pre-authentication deadlines apply as on a real socket).
pub async fn accept_calles(domus: &Domus) -> Result<(), Error> {
    let listener = turmoil::net::TcpListener::bind(("0.0.0.0", SIM_PORT))
        .await
        .map_err(|e| Error::io("binding the simulated listener", &e))?;
    let weak = domus.downgrade();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let Some(domus) = weak.upgrade() else {
                return;
            };
            if domus.accept_stream(stream).is_err() {
                return;
            }
        }
    });
    Ok(())
}

/// What the hosts of one simulation share: a development CA (identities minted once per
/// name, so a restarted host keeps its identity), one resolver, the configuration, and the
/// seed of vicus's randomness. Cheap to clone.
#[derive(Clone)]
pub struct SimNet {
    inner: Arc<Inner>,
}

struct Inner {
    ca: Mutex<DevCa>,
    identities: Mutex<Vec<(String, AuthConfig)>>,
    resolver: Arc<SimpleResolver>,
    config: Mutex<DomusConfig>,
    seed: u64,
}

impl std::fmt::Debug for SimNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimNet")
            .field("seed", &self.inner.seed)
            .finish_non_exhaustive()
    }
}

impl SimNet {
    /// A new CA and resolver. `seed` seeds vicus's own randomness on this thread (give the
    /// turmoil builder the same one: then the whole run follows from it).
    pub fn new(seed: u64) -> Result<Self, Error> {
        crate::runtime::seeded::set(Some(seed));
        Ok(Self {
            inner: Arc::new(Inner {
                ca: Mutex::new(DevCa::new("vicus simulation CA")?),
                identities: Mutex::new(Vec::new()),
                resolver: Arc::new(SimpleResolver::new()),
                config: Mutex::new(super::Mesh::test_config()),
                seed,
            }),
        })
    }

    /// The configuration of domus built from now on (default: [`super::Mesh::test_config`]).
    pub fn set_config(&self, config: DomusConfig) {
        *self
            .inner
            .config
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = config;
    }

    /// The resolver every simulated domus shares.
    pub fn resolver(&self) -> &Arc<SimpleResolver> {
        &self.inner.resolver
    }

    /// The identity of `name` (minted on first use, the same afterwards).
    pub fn auth(&self, name: &str) -> Result<AuthConfig, Error> {
        let mut ids = self
            .inner
            .identities
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some((_, auth)) = ids.iter().find(|(n, _)| n == name) {
            return Ok(auth.clone());
        }
        let (auth, _) = self
            .inner
            .ca
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .domus_auth(name)?;
        ids.push((name.to_owned(), auth.clone()));
        Ok(auth)
    }

    /// Builds and starts the domus `name` on the current turmoil host (identity
    /// `spiffe://vicus.dev/domus/<name>`, the shared resolver and configuration).
    pub async fn domus(&self, name: &str) -> Result<Domus, Error> {
        let config = self
            .inner
            .config
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        start(
            Domus::builder(self.auth(name)?)
                .resolver(self.inner.resolver.clone())
                .config(config),
        )
        .await
    }

    /// Routes `taberna` to the domus on turmoil host `host` (call inside the simulation).
    pub fn route(&self, taberna: TabernaId, host: &str) {
        let id = crate::DomusId::spiffe("vicus.dev", host).ok();
        self.inner.resolver.insert(taberna, host_addr(host), id);
    }

    /// Registers turmoil host `name` running a domus of that name and then `serve` (given
    /// the domus and this net) — again from the start each time turmoil restarts the host.
    pub fn host<F, Fut>(&self, sim: &mut turmoil::Sim<'_>, name: &str, serve: F)
    where
        F: Fn(Domus, SimNet) -> Fut + 'static,
        Fut: Future<Output = Result<(), Box<dyn std::error::Error>>> + 'static,
    {
        let net = self.clone();
        let host = name.to_owned();
        let serve = Arc::new(serve);
        sim.host(name, move || {
            let (net, host, serve) = (net.clone(), host.clone(), serve.clone());
            async move {
                let domus = net.domus(&host).await?;
                serve(domus, net).await
            }
        });
    }
}

/// A seeded schedule of network faults for a turmoil simulation, applied between its steps:
/// every 0.2–2 s of simulated time until `faults_until`, one of — a partition of a random
/// pair of hosts (30 %), a repair (20 %), a hold (10 %) or release (10 %) of their traffic, a
/// new latency on their link up to 300 ms (20 %), or a crash of one host (10 %), which comes
/// back (turmoil bounces it) 0.5–3.5 s later. At `faults_until` everything heals: every link
/// repaired and released, latency back to 5 ms, every crashed host restarted. The same seed
/// gives the same schedule. A seeded chaos run is then a few lines:
///
/// ```no_run
/// # use std::time::Duration;
/// # let mut sim = turmoil::Builder::new().rng_seed(1).build();
/// // … hosts registered with SimNet::host …
/// let faults = vicus::testing::sim::Chaos::new(1, &["a", "b", "c"], Duration::from_secs(60))
///     .run(&mut sim)
///     .expect("the simulation");
/// println!("{} faults", faults.len());
/// ```
#[derive(Debug)]
pub struct Chaos {
    hosts: Vec<String>,
    faults_until: std::time::Duration,
    rng: u64,
}

impl Chaos {
    /// Faults among `hosts` until `faults_until` (simulated time), drawn from `seed`.
    pub fn new(seed: u64, hosts: &[&str], faults_until: std::time::Duration) -> Self {
        Self {
            hosts: hosts.iter().map(|h| (*h).to_owned()).collect(),
            faults_until,
            rng: seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1,
        }
    }

    /// xorshift64*, below `n`.
    fn below(&mut self, n: u64) -> u64 {
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        self.rng.wrapping_mul(0x2545_F491_4F6C_DD1D) % n.max(1)
    }

    /// Steps `sim` until it ends (its clients finished), applying the schedule; returns each
    /// fault applied as `"<ms> <what> <host> <host>"`. A simulation error (a host or client
    /// that failed) ends the run with that error.
    pub fn run(
        mut self,
        sim: &mut turmoil::Sim<'_>,
    ) -> Result<Vec<String>, Box<dyn std::error::Error>> {
        use std::time::Duration;
        let n = self.hosts.len();
        let mut log = Vec::new();
        let mut crashed: Vec<(usize, Duration)> = Vec::new();
        let mut next_fault = Duration::from_secs(2);
        let mut healed = false;
        loop {
            let now = sim.elapsed();
            if n >= 2 && now >= next_fault && now < self.faults_until {
                next_fault = now + Duration::from_millis(200 + self.below(1800));
                let a = usize::try_from(self.below(n as u64)).unwrap_or(0);
                let b = (a + 1 + usize::try_from(self.below(n as u64 - 1)).unwrap_or(0)) % n;
                let (ha, hb) = (self.hosts[a].clone(), self.hosts[b].clone());
                let (ha, hb) = (ha.as_str(), hb.as_str());
                let what = match self.below(10) {
                    0..=2 => {
                        sim.partition(ha, hb);
                        "partition"
                    }
                    3..=4 => {
                        sim.repair(ha, hb);
                        "repair"
                    }
                    5 => {
                        sim.hold(ha, hb);
                        "hold"
                    }
                    6 => {
                        sim.release(ha, hb);
                        "release"
                    }
                    7..=8 => {
                        sim.set_link_latency(ha, hb, Duration::from_millis(self.below(300)));
                        "latency"
                    }
                    _ if crashed.iter().all(|(h, _)| *h != a) => {
                        sim.crash(ha);
                        let back = now + Duration::from_millis(500 + self.below(3000));
                        crashed.push((a, back));
                        "crash"
                    }
                    _ => "none",
                };
                log.push(format!("{} {what} {ha} {hb}", now.as_millis()));
            }
            let until = self.faults_until;
            crashed.retain(|(h, at)| {
                if now >= *at || now >= until {
                    sim.bounce(self.hosts[*h].as_str());
                    false
                } else {
                    true
                }
            });
            if !healed && now >= self.faults_until {
                healed = true;
                for (i, a) in self.hosts.iter().enumerate() {
                    for b in &self.hosts[i + 1..] {
                        sim.release(a.as_str(), b.as_str());
                        sim.repair(a.as_str(), b.as_str());
                        sim.set_link_latency(a.as_str(), b.as_str(), Duration::from_millis(5));
                    }
                }
                log.push(format!("{} heal", now.as_millis()));
            }
            if sim.step()? {
                return Ok(log);
            }
        }
    }
}
