//! Routes: which domus serves a taberna. [`RouteResolver`] is the pluggable lookup;
//! [`SimpleResolver`] is an in-memory table that can change while running.
//!
//! The resolver is trusted for reachability only: identity always comes from the certificate,
//! and a route's `identity`, when given, is enforced at the handshake. Resolvers must answer
//! promptly; the domus bounds every call with `resolve_timeout`.
//!
//! When routes are read: every send (and blob open) resolves its taberna. A resolver whose
//! answers change can also say so ([`RouteResolver::changes`]; [`SimpleResolver`] does on
//! every insert and remove): the domus then resolves again, at once, every taberna it has sent
//! to, and a peer whose route now names another address is dialled there — a dial still
//! running to the old address is abandoned, so messages waiting for that peer are replayed
//! on the new path without waiting for a new send or a handshake timeout. Only routes that
//! name the peer's identity move a peer: a route without one may lead to another domus.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError, Weak};

use arc_swap::ArcSwap;

use crate::a0_transport::{DomusAddr, DomusId};
use crate::error::{Error, ErrorId};
use crate::reporting::Recorder;
use crate::taberna::TabernaId;

/// Where a taberna lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// The domus's address.
    pub addr: DomusAddr,
    /// The identity the domus at `addr` must present; `None` accepts whatever verified
    /// identity answers there. That identity is learned at the first dial and pinned to the
    /// address so later sends skip the handshake; a pin is forgotten when unused for
    /// `DomusConfig::peer_retire_after`, evicted past `DomusConfig::max_pinned_addresses`,
    /// and dropped when a dial there meets another identity (the send that met it fails with
    /// `IdentityMismatch`; the next one learns the newcomer). Name the identity when a route
    /// must reach one domus and no other.
    pub identity: Option<DomusId>,
}

/// The future a resolver returns.
pub type ResolveFuture<'a> = Pin<Box<dyn Future<Output = Result<Route, Error>> + Send + 'a>>;

/// One of the places a taberna may be served (a replica), as a resolver lists them
/// ([`RouteResolver::candidates`]). Like a DNS SRV record: the lowest `priority` is used while
/// any of its candidates can be reached, and among those a send picks one with probability
/// proportional to `weight` (weight 0 is used only when no candidate of that priority has a
/// weight). A candidate whose domus shut down or could not be dialled is skipped while
/// another can be tried (and for `reconnect_backoff_max` after its peer was forgotten).
/// [`crate::Domus::send`] chooses per send; a [`crate::Destination`] chooses when it resolves
/// (first send, and after a route change) and keeps that choice.
///
/// **Failover**: a send that chose a candidate which then cannot be reached goes to another
/// candidate only if it never went out on any callis to the first (the first cannot have
/// it): it is handed over when a dial to the first fails, with its deadline, taking room at
/// the new one. A message that was written to a candidate (and so may have been delivered)
/// is never sent to a second one: it waits for the first to come back, or ends at its
/// deadline as `SendTimeout` (outcome unknown). Failover asks the resolver only when it
/// answers at once (as [`SimpleResolver`] does).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// Where it is and who must answer there (see [`Route`]).
    pub route: Route,
    /// Lower is preferred.
    pub priority: u16,
    /// The share of sends among candidates of the same priority.
    pub weight: u16,
}

impl Candidate {
    /// A candidate for `route` at priority 0, weight 1.
    pub fn new(route: Route) -> Self {
        Self {
            route,
            priority: 0,
            weight: 1,
        }
    }
}

/// The future [`RouteResolver::candidates`] returns.
pub type CandidatesFuture<'a> =
    Pin<Box<dyn Future<Output = Result<Arc<[Candidate]>, Error>> + Send + 'a>>;

/// The future [`RouteResolver::resolve_domus`] returns.
pub type ResolveDomusFuture<'a> =
    Pin<Box<dyn Future<Output = Result<Option<DomusAddr>, Error>> + Send + 'a>>;

/// Looks up the route to a taberna.
pub trait RouteResolver: Send + Sync + 'static {
    /// The route to `taberna`, or an [`ErrorId::UnknownTaberna`] error.
    fn resolve(&self, taberna: TabernaId) -> ResolveFuture<'_>;

    /// Every place `taberna` is served (replicas), for the domus to choose among — by
    /// priority, then weight, skipping candidates it cannot reach now (see [`Candidate`]).
    /// Default: the one route [`resolve`](Self::resolve) gives. An empty list is an
    /// unknown taberna.
    fn candidates(&self, taberna: TabernaId) -> CandidatesFuture<'_> {
        let route = self.resolve(taberna);
        Box::pin(async move { Ok(Arc::from([Candidate::new(route.await?)])) })
    }

    /// Where the domus `id` itself is reached, for sends addressed to a domus rather than
    /// routed by taberna ([`crate::Domus::destination_on`]). Default: `Ok(None)` — such sends
    /// then go over a callis the peer already has with this domus, or to an address learned
    /// for it earlier.
    fn resolve_domus<'a>(&'a self, id: &'a DomusId) -> ResolveDomusFuture<'a> {
        let _ = id;
        Box::pin(std::future::ready(Ok(None)))
    }

    /// A signal that fires whenever the answers of [`resolve`](Self::resolve) may have
    /// changed, so the domus re-reads its routes at once (see the module docs). Default:
    /// `None`, and routes are re-read by the next send only. A resolver that can change keeps a
    /// [`RouteNotifier`], returns [`RouteNotifier::subscribe`] here and calls
    /// [`RouteNotifier::notify`] after each change.
    fn changes(&self) -> Option<RouteChanges> {
        None
    }

    /// Called once by each domus built with this resolver, with that domus's error feed: a
    /// resolver whose source can fail in the background (DNS, a routes file) reports there.
    /// A resolver shared by several domus is attached to each; [`ResolverFeeds`] keeps them.
    /// Default: ignored.
    fn attach(&self, feed: ResolverFeed) {
        let _ = feed;
    }
}

/// One domus's error feed, handed to its resolver ([`RouteResolver::attach`]). It does not keep
/// the domus alive: once the domus is gone, [`report`](Self::report) returns `false`.
#[derive(Clone)]
pub struct ResolverFeed {
    recorder: Weak<Recorder>,
}

impl std::fmt::Debug for ResolverFeed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResolverFeed")
            .field("open", &!self.is_closed())
            .finish()
    }
}

impl ResolverFeed {
    pub(crate) fn new(recorder: &Arc<Recorder>) -> Self {
        Self {
            recorder: Arc::downgrade(recorder),
        }
    }

    /// Publishes `error` on the domus's error feed; `false` when the domus is gone.
    pub fn report(&self, error: Error) -> bool {
        match self.recorder.upgrade() {
            Some(recorder) => {
                recorder.error(error);
                true
            }
            None => false,
        }
    }

    /// Whether the domus is gone.
    pub fn is_closed(&self) -> bool {
        self.recorder.strong_count() == 0
    }
}

/// The feeds of every domus a resolver is attached to, for resolvers that report background
/// failures: [`add`](Self::add) in [`RouteResolver::attach`], [`report`](Self::report) on
/// failure. Feeds of domus that are gone are dropped; at most [`ResolverFeeds::MAX`] are kept.
#[derive(Debug, Default)]
pub struct ResolverFeeds {
    feeds: Mutex<Vec<ResolverFeed>>,
}

impl ResolverFeeds {
    /// The most feeds kept (a resolver shared by more domus reports to the first ones).
    pub const MAX: usize = 1024;

    /// No feeds yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a domus's feed.
    pub fn add(&self, feed: ResolverFeed) {
        let mut feeds = self.feeds.lock().unwrap_or_else(PoisonError::into_inner);
        feeds.retain(|f| !f.is_closed());
        if feeds.len() < Self::MAX {
            feeds.push(feed);
        }
    }

    /// Publishes `error` on every attached domus's error feed; the number that took it.
    pub fn report(&self, error: &Error) -> usize {
        let feeds: Vec<ResolverFeed> = {
            let mut feeds = self.feeds.lock().unwrap_or_else(PoisonError::into_inner);
            feeds.retain(|f| !f.is_closed());
            feeds.clone()
        };
        feeds.iter().filter(|f| f.report(error.clone())).count()
    }
}

/// The sending side of [`RouteChanges`]: a resolver calls [`notify`](Self::notify) after its
/// answers changed. Many changes in a row may be seen as one; none is lost (the last one is
/// always seen). Never blocks.
#[derive(Debug)]
pub struct RouteNotifier {
    tx: tokio::sync::watch::Sender<u64>,
}

impl Default for RouteNotifier {
    fn default() -> Self {
        Self {
            tx: tokio::sync::watch::Sender::new(0),
        }
    }
}

impl RouteNotifier {
    /// A notifier nobody listens to yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Signals that routes changed.
    pub fn notify(&self) {
        self.tx
            .send_modify(|generation| *generation = generation.wrapping_add(1));
    }

    /// A receiver of the changes signalled from now on.
    pub fn subscribe(&self) -> RouteChanges {
        RouteChanges {
            rx: self.tx.subscribe(),
        }
    }
}

/// Route changes, from [`RouteResolver::changes`].
#[derive(Debug, Clone)]
pub struct RouteChanges {
    rx: tokio::sync::watch::Receiver<u64>,
}

impl RouteChanges {
    /// Waits for the next change; `false` once the resolver (its notifier) is gone.
    pub async fn changed(&mut self) -> bool {
        self.rx.changed().await.is_ok()
    }
}

/// An in-memory routing table; insert and remove while the domus runs (each change reaches
/// running domus at once, see the module docs).
///
/// Lookups read an immutable snapshot (no lock: every send resolves, from many tasks at
/// once); changes copy the table and publish the copy, one writer at a time.
#[derive(Debug, Default)]
pub struct SimpleResolver {
    routes: ArcSwap<HashMap<TabernaId, Arc<[Candidate]>>>,
    /// Addresses of domus by identity, for sends addressed to a domus.
    domus: ArcSwap<HashMap<DomusId, DomusAddr>>,
    writer: Mutex<()>,
    notifier: RouteNotifier,
}

impl SimpleResolver {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// Routes `taberna` to `addr`, expecting `identity` there when given (its only
    /// candidate).
    pub fn insert(&self, taberna: TabernaId, addr: DomusAddr, identity: Option<DomusId>) {
        self.insert_candidates(taberna, vec![Candidate::new(Route { addr, identity })]);
    }

    /// Routes `taberna` to several replicas (see [`Candidate`]); an empty list removes the
    /// route.
    pub fn insert_candidates(&self, taberna: TabernaId, candidates: Vec<Candidate>) {
        self.update(|routes| {
            if candidates.is_empty() {
                routes.remove(&taberna);
            } else {
                routes.insert(taberna, Arc::from(candidates));
            }
        });
    }

    /// Removes the route to `taberna` (its first candidate is returned).
    pub fn remove(&self, taberna: TabernaId) -> Option<Route> {
        self.update(|routes| routes.remove(&taberna))
            .and_then(|c| c.first().map(|c| c.route.clone()))
    }

    /// Says where the domus `id` is reached (for [`crate::Domus::destination_on`]).
    pub fn insert_domus(&self, id: DomusId, addr: DomusAddr) {
        let _writer = self.writer.lock().unwrap_or_else(PoisonError::into_inner);
        let mut domus = HashMap::clone(&self.domus.load());
        domus.insert(id, addr);
        self.domus.store(Arc::new(domus));
        self.notifier.notify();
    }

    /// Forgets where the domus `id` is reached.
    pub fn remove_domus(&self, id: &DomusId) -> Option<DomusAddr> {
        let _writer = self.writer.lock().unwrap_or_else(PoisonError::into_inner);
        let mut domus = HashMap::clone(&self.domus.load());
        let removed = domus.remove(id);
        self.domus.store(Arc::new(domus));
        self.notifier.notify();
        removed
    }

    fn update<R>(&self, change: impl FnOnce(&mut HashMap<TabernaId, Arc<[Candidate]>>) -> R) -> R {
        let _writer = self.writer.lock().unwrap_or_else(PoisonError::into_inner);
        let mut routes = HashMap::clone(&self.routes.load());
        let result = change(&mut routes);
        self.routes.store(Arc::new(routes));
        self.notifier.notify();
        result
    }

    fn lookup(&self, taberna: TabernaId) -> Result<Arc<[Candidate]>, Error> {
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
        let route = self.lookup(taberna).and_then(|c| {
            c.first().map(|c| c.route.clone()).ok_or_else(|| {
                Error::new(ErrorId::UnknownTaberna, format!("no route to {taberna}"))
            })
        });
        Box::pin(async move { route })
    }

    fn candidates(&self, taberna: TabernaId) -> CandidatesFuture<'_> {
        let candidates = self.lookup(taberna);
        Box::pin(async move { candidates })
    }

    fn resolve_domus<'a>(&'a self, id: &'a DomusId) -> ResolveDomusFuture<'a> {
        let addr = self.domus.load().get(id).cloned();
        Box::pin(std::future::ready(Ok(addr)))
    }

    fn changes(&self) -> Option<RouteChanges> {
        Some(self.notifier.subscribe())
    }
}
