//! Routes: which domus serves a taberna. [`RouteResolver`] is the pluggable lookup;
//! [`SimpleResolver`] is an in-memory table that can change while running.
//!
//! The resolver is trusted for reachability only: identity always comes from the certificate,
//! and a route's `identity`, when given, is enforced at the handshake. Resolvers must answer
//! promptly; the domus bounds every call with `resolve_timeout`.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};

use arc_swap::ArcSwap;

use crate::a0_transport::{DomusAddr, DomusId};
use crate::error::{Error, ErrorId};
use crate::taberna::TabernaId;

/// Where a taberna lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// The domus's address.
    pub addr: DomusAddr,
    /// The identity the domus at `addr` must present; `None` accepts whatever verified
    /// identity answers (it is learned at the first dial and then pinned for that address).
    pub identity: Option<DomusId>,
}

/// The future a resolver returns.
pub type ResolveFuture<'a> = Pin<Box<dyn Future<Output = Result<Route, Error>> + Send + 'a>>;

/// Looks up the route to a taberna.
pub trait RouteResolver: Send + Sync + 'static {
    /// The route to `taberna`, or an [`ErrorId::UnknownTaberna`] error.
    fn resolve(&self, taberna: TabernaId) -> ResolveFuture<'_>;
}

/// An in-memory routing table; insert and remove while the domus runs.
///
/// Lookups read an immutable snapshot (no lock: every send resolves, from many tasks at
/// once); changes copy the table and publish the copy, one writer at a time.
#[derive(Debug, Default)]
pub struct SimpleResolver {
    routes: ArcSwap<HashMap<TabernaId, Route>>,
    writer: Mutex<()>,
}

impl SimpleResolver {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// Routes `taberna` to `addr`, expecting `identity` there when given.
    pub fn insert(&self, taberna: TabernaId, addr: DomusAddr, identity: Option<DomusId>) {
        self.update(|routes| {
            routes.insert(taberna, Route { addr, identity });
        });
    }

    /// Removes the route to `taberna`.
    pub fn remove(&self, taberna: TabernaId) -> Option<Route> {
        self.update(|routes| routes.remove(&taberna))
    }

    fn update<R>(&self, change: impl FnOnce(&mut HashMap<TabernaId, Route>) -> R) -> R {
        let _writer = self.writer.lock().unwrap_or_else(PoisonError::into_inner);
        let mut routes = HashMap::clone(&self.routes.load());
        let result = change(&mut routes);
        self.routes.store(Arc::new(routes));
        result
    }

    fn lookup(&self, taberna: TabernaId) -> Result<Route, Error> {
        self.routes.load().get(&taberna).cloned().ok_or_else(|| {
            Error::new(
                ErrorId::UnknownTaberna,
                format!("no route to {taberna}: it is not local and the resolver does not know it"),
            )
        })
    }
}

impl RouteResolver for SimpleResolver {
    fn resolve(&self, taberna: TabernaId) -> ResolveFuture<'_> {
        let route = self.lookup(taberna);
        Box::pin(async move { route })
    }
}
