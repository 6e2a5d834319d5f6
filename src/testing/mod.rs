//! Test support for applications built on vicus, and for vicus's own tests (feature
//! `test-util`): a whole mesh in one line and a fault-injecting TCP proxy to put between two
//! of its domus.
//!
//! - [`Mesh`]: a development CA, one shared [`SimpleResolver`] and any number of named
//!   domus listening on loopback, built with a configuration that redials within
//!   milliseconds; helpers register a taberna and route it, and send.
//! - [`FaultProxy`]: relays TCP between two domus and can cut, blackhole, delay, throttle,
//!   refuse or cut after N bytes, while the test runs.
//! - [`conformance::check_resolver`]: the contract a [`crate::RouteResolver`] must keep, as a
//!   test its author runs (see [`conformance::ResolverUnderTest`]).
//! - [`SessionPair`] / [`BlobPair`]: the sans-IO state machines back to back on a virtual
//!   clock, with injection, a frame filter and checks on every transfer; vicus's protocol
//!   unit tests and its fuzz targets drive these same pairs.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), vicus::Error> {
//! use bytes::Bytes;
//! use vicus::{Delivery, TabernaId};
//! use vicus::testing::Mesh;
//!
//! let mut mesh = Mesh::with_domus(&["client", "billing"]).await?;
//! let billing = mesh.taberna("billing", TabernaId(7))?;
//! tokio::spawn(async move {
//!     while let Some(req) = billing.recv().await {
//!         req.reply(Bytes::from_static(b"paid"));
//!     }
//! });
//! let answer = mesh.send("client", TabernaId(7), Bytes::from_static(b"invoice 42")).await?;
//! assert_eq!(answer, Delivery::Replied(Bytes::from_static(b"paid").into()));
//! mesh.shutdown().await;
//! # Ok(()) }
//! ```
//!
//! What it must not do: it is for tests and development only — its certificates come from
//! [`crate::dev_certs`] (never production identities) and everything it binds is loopback.
//! It never panics on what a test passes in (unknown names are errors). It keeps a handle on
//! each domus it built by name (they run until the mesh is dropped or shut down);
//! [`Mesh::remove`] gives a test the only handle back, to crash that domus by dropping it.

pub mod conformance;
mod fault_proxy;
pub mod pair;
#[cfg(feature = "sim")]
pub mod sim;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

pub use fault_proxy::FaultProxy;
pub use pair::{BlobPair, SessionPair};

use crate::dev_certs::DevCa;
use crate::domus::DomusBuilder;
use crate::{
    AuthConfig, Domus, DomusAddr, DomusConfig, Error, MessageType, Outcome, SendOptions,
    SimpleResolver, Taberna, TabernaId,
};

/// The message type [`Mesh::send`] uses.
pub const MESH_MESSAGE_TYPE: MessageType = MessageType::app(1);

/// A development CA, a shared resolver and named domus on loopback; see the module docs.
pub struct Mesh {
    ca: DevCa,
    resolver: Arc<SimpleResolver>,
    config: DomusConfig,
    nodes: Vec<(String, Domus)>,
}

impl std::fmt::Debug for Mesh {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mesh")
            .field("ca", &self.ca)
            .field(
                "nodes",
                &self.nodes.iter().map(|(n, _)| n).collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

impl Mesh {
    /// A fresh CA and resolver, no domus yet; domus are built with [`Mesh::test_config`].
    pub fn new() -> Result<Self, Error> {
        Ok(Self {
            ca: DevCa::new("vicus testing CA")?,
            resolver: Arc::new(SimpleResolver::new()),
            config: Self::test_config(),
            nodes: Vec::new(),
        })
    }

    /// A mesh with one listening domus per name.
    pub async fn with_domus(names: &[&str]) -> Result<Self, Error> {
        let mut mesh = Self::new()?;
        for name in names {
            mesh.domus(name).await?;
        }
        Ok(mesh)
    }

    /// The defaults, except that a lost callis is redialled after 10–200 ms instead of
    /// seconds, so tests that cut connections stay fast.
    pub fn test_config() -> DomusConfig {
        DomusConfig {
            reconnect_backoff_min: Duration::from_millis(10),
            reconnect_backoff_max: Duration::from_millis(200),
            ..DomusConfig::default()
        }
    }

    /// Uses `config` for the domus built from now on by [`Mesh::domus`].
    pub fn set_config(&mut self, config: DomusConfig) {
        self.config = config;
    }

    /// The CA every domus of the mesh trusts (mint more identities or CRLs with it).
    pub fn ca(&mut self) -> &mut DevCa {
        &mut self.ca
    }

    /// The resolver every domus of the mesh shares.
    pub fn resolver(&self) -> &Arc<SimpleResolver> {
        &self.resolver
    }

    /// A builder for a domus named `name` (identity `spiffe://vicus.dev/domus/<name>`, signed
    /// by the mesh's CA), with the mesh's resolver and configuration; for a domus the test
    /// wants to adjust (`dial_only`, a connector, a Unix socket). Domus built from it are not
    /// known by name to the mesh.
    pub fn builder(&mut self, name: &str) -> Result<DomusBuilder, Error> {
        let (auth, _) = self.ca.domus_auth(name)?;
        Ok(self.builder_for(auth))
    }

    /// A builder for a domus presenting `auth` (an identity the test minted itself), with the
    /// mesh's resolver and configuration.
    pub fn builder_for(&self, auth: AuthConfig) -> DomusBuilder {
        Domus::builder(auth)
            .resolver(self.resolver.clone())
            .config(self.config.clone())
    }

    /// Builds a domus named `name` listening on loopback with the mesh's configuration, and
    /// knows it by that name from now on (a domus built again under the same name, e.g. a
    /// restart, takes the name over).
    pub async fn domus(&mut self, name: &str) -> Result<Domus, Error> {
        let config = self.config.clone();
        self.domus_with(name, config).await
    }

    /// Like [`Mesh::domus`], with its own configuration.
    pub async fn domus_with(&mut self, name: &str, config: DomusConfig) -> Result<Domus, Error> {
        let domus = self.builder(name)?.config(config).build().await?;
        match self.nodes.iter_mut().find(|(n, _)| n == name) {
            Some(slot) => slot.1 = domus.clone(),
            None => self.nodes.push((name.to_owned(), domus.clone())),
        }
        Ok(domus)
    }

    /// The domus known by `name`.
    pub fn get(&self, name: &str) -> Result<Domus, Error> {
        self.nodes
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, domus)| domus.clone())
            .ok_or_else(|| Error::invalid_config("Mesh", format!("no domus named {name:?}")))
    }

    /// Forgets the domus known by `name` and hands back the mesh's handle on it: when the
    /// test drops that and its own handles, the domus stops as a crashed process would
    /// (no graceful shutdown).
    pub fn remove(&mut self, name: &str) -> Option<Domus> {
        let at = self.nodes.iter().position(|(n, _)| n == name)?;
        Some(self.nodes.remove(at).1)
    }

    /// The names the mesh knows, in the order their domus were first built.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.nodes.iter().map(|(n, _)| n.as_str())
    }

    /// Routes `taberna` to `to` (its listening address and its identity) in the shared
    /// resolver.
    pub fn route(&self, taberna: TabernaId, to: &Domus) -> Result<(), Error> {
        let addr = to
            .local_addr()
            .cloned()
            .ok_or_else(|| Error::invalid_config("Mesh::route", "the domus does not listen"))?;
        self.resolver
            .insert(taberna, addr, Some(to.identity().clone()));
        Ok(())
    }

    /// Routes `taberna` to `to` through a new [`FaultProxy`] in front of it; the proxy's
    /// faults then apply to every callis a domus opens to `to` for that taberna.
    pub async fn route_through_proxy(
        &self,
        taberna: TabernaId,
        to: &Domus,
    ) -> Result<FaultProxy, Error> {
        let Some(DomusAddr::Tcp(addr)) = to.local_addr().cloned() else {
            return Err(Error::invalid_config(
                "Mesh::route_through_proxy",
                "the domus does not listen on TCP",
            ));
        };
        let proxy = FaultProxy::start(addr)
            .await
            .map_err(|e| Error::io("starting a fault proxy", &e))?;
        self.resolver.insert(
            taberna,
            DomusAddr::Tcp(proxy.addr()),
            Some(to.identity().clone()),
        );
        Ok(proxy)
    }

    /// Registers `taberna` on the domus named `on` and routes it there.
    pub fn taberna(&self, on: &str, taberna: TabernaId) -> Result<Taberna, Error> {
        let domus = self.get(on)?;
        let t = domus.taberna(taberna)?;
        self.route(taberna, &domus)?;
        Ok(t)
    }

    /// Sends `payload` from the domus named `from` to `taberna` (type
    /// [`MESH_MESSAGE_TYPE`], default options) and waits for its answer.
    pub async fn send(&self, from: &str, taberna: TabernaId, payload: Bytes) -> Outcome {
        let domus = self.get(from)?;
        domus
            .send(taberna, MESH_MESSAGE_TYPE, payload, SendOptions::default())
            .await
    }

    /// Shuts down every domus the mesh knows by name (each gracefully, one after another).
    pub async fn shutdown(&self) {
        for (_, domus) in &self.nodes {
            domus.shutdown().await;
        }
    }
}
