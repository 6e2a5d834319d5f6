//! Routes: which domus serves a taberna — the resolver layer, below the domus.
//!
//! A domus asks its [`RouteResolver`] where a taberna lives; this module holds that trait,
//! what it answers ([`Route`], [`Candidate`]), the resolvers vicus ships ([`SimpleResolver`]
//! in memory, `DnsSrvResolver` with feature `dns-srv`, `FileResolver` with feature
//! `file-resolver`) and the rule the domus chooses among replicas by ([`choose`]).
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
//!
//! # Writing a resolver
//!
//! Everything an implementation names is reachable from this module (the identity, address,
//! taberna id and error types are re-exported here too):
//!
//! * [`RouteResolver::resolve`] (required): the one [`Route`] to a taberna, or an
//!   [`ErrorId::UnknownTaberna`] error. A resolver that knows replicas implements
//!   [`RouteResolver::candidates`] as well and lists them all; the domus chooses.
//! * [`RouteResolver::resolve_domus`]: where a domus named by identity is reached (optional).
//! * [`RouteResolver::changes`]: keep a [`RouteNotifier`], return its
//!   [`subscribe`](RouteNotifier::subscribe), call [`notify`](RouteNotifier::notify) after a
//!   change (optional; without it routes are re-read by the next send only).
//! * [`RouteResolver::attach`]: a resolver whose source fails in the background keeps the
//!   [`ResolverFeed`] of each domus in a [`ResolverFeeds`] and reports there (optional).
//!
//! The futures are boxed ([`ResolveFuture`], [`CandidatesFuture`], [`ResolveDomusFuture`]); an
//! in-memory answer is `Box::pin(std::future::ready(..))`, which the domus reads on its first
//! poll without a timer. The contract a domus relies on (exact candidates, unknown tabernas
//! as `UnknownTaberna` never a hang, changes seen within a bound, no panic on odd ids, the
//! same answer to concurrent lookups) is a test: `vicus::testing::conformance::check_resolver`
//! (feature `test-util`) runs it against your resolver.
//!
//! ```
//! use std::sync::Arc;
//! use vicus::resolve::{
//!     Candidate, CandidatesFuture, DomusAddr, Error, ErrorId, ResolveFuture, Route,
//!     RouteResolver, TabernaId,
//! };
//!
//! /// Two replicas of taberna 7; nothing else.
//! struct Fixed(Arc<[Candidate]>);
//!
//! impl RouteResolver for Fixed {
//!     fn resolve(&self, taberna: TabernaId) -> ResolveFuture<'_> {
//!         let route = match (taberna, self.0.first()) {
//!             (TabernaId(7), Some(first)) => Ok(first.route.clone()),
//!             _ => Err(Error::new(ErrorId::UnknownTaberna, format!("no route to {taberna}"))),
//!         };
//!         Box::pin(std::future::ready(route))
//!     }
//!
//!     fn candidates(&self, taberna: TabernaId) -> CandidatesFuture<'_> {
//!         let candidates = match taberna {
//!             TabernaId(7) => Ok(self.0.clone()),
//!             _ => Err(Error::new(ErrorId::UnknownTaberna, format!("no route to {taberna}"))),
//!         };
//!         Box::pin(std::future::ready(candidates))
//!     }
//! }
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let replica = |port, priority| Candidate {
//!     route: Route { addr: DomusAddr::tcp(([10, 0, 0, 5], port)), identity: None },
//!     priority,
//!     weight: 1,
//! };
//! let resolver = Fixed(Arc::from([replica(7000, 0), replica(7001, 1)]));
//! # let _ = resolver;
//! # Ok(()) }
//! ```
//!
//! # Choosing a replica
//!
//! [`choose`] is the rule, as a pure function the domus calls with its view of which
//! candidates it can reach and one random number: the lowest priority that has a reachable
//! candidate, then by weight (see [`Candidate`] and [`choose`] for the edge cases).
//!
//! This module must not import the runtime or the domus: it names only the transport's
//! address and identity types, the taberna id, the reporting's error feed and the error
//! types. The domus calls it; it never calls the domus. [`choose`] reads no clock and no
//! randomness of its own.

mod choice;
#[cfg(feature = "dns-srv")]
pub mod dns_srv;
#[cfg(feature = "file-resolver")]
pub mod file;
mod simple;

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError, Weak};

pub use choice::choose;
#[cfg(feature = "dns-srv")]
pub use dns_srv::{DnsSrvConfig, DnsSrvResolver};
#[cfg(feature = "file-resolver")]
pub use file::{FileResolver, FileWatchHandle, RouteTable, RoutesFile};
pub use simple::SimpleResolver;

// What the trait's signatures and `Route` name, so an implementation imports from one path.
pub use crate::a0_transport::{DomusAddr, DomusId};
pub use crate::error::{Error, ErrorId};
pub use crate::taberna::TabernaId;

use crate::reporting::Recorder;

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
/// weight) — the rule is [`choose`]. A candidate whose domus shut down or could not be
/// dialled is skipped while another can be tried (and for `reconnect_backoff_max` after its
/// peer was forgotten).
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

/// Domus that publish to topics a pattern names, as a resolver lists them
/// ([`RouteResolver::topic_publishers`]): the topic service announces a subscription to the
/// publishers of every entry whose pattern can match a topic the subscription's pattern
/// matches (besides the peers it has a session with). The publishers are reached at the
/// addresses [`RouteResolver::resolve_domus`] gives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicPublishers {
    /// A topic pattern (`orders.>`, `metrics.*.cpu`, an exact topic); one that is not a
    /// valid pattern is ignored by the topic service.
    pub pattern: String,
    /// The domus that may publish to it.
    pub publishers: Vec<DomusId>,
}

/// The future [`RouteResolver::topic_publishers`] returns.
pub type TopicPublishersFuture<'a> =
    Pin<Box<dyn Future<Output = Result<Arc<[TopicPublishers]>, Error>> + Send + 'a>>;

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

    /// Which domus publish to which topics, for the topic service
    /// ([`crate::services::topics`]) to announce subscriptions to them. Default: none (the
    /// service then announces to the peers it has a session with and those its config
    /// names).
    fn topic_publishers(&self) -> TopicPublishersFuture<'_> {
        Box::pin(std::future::ready(Ok(Arc::from([]))))
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
    /// Changes signalled so far, readable without a lock by every receiver.
    generation: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl Default for RouteNotifier {
    fn default() -> Self {
        Self {
            tx: tokio::sync::watch::Sender::new(0),
            generation: std::sync::Arc::default(),
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
        self.generation
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        self.tx
            .send_modify(|generation| *generation = generation.wrapping_add(1));
    }

    /// A receiver of the changes signalled from now on.
    pub fn subscribe(&self) -> RouteChanges {
        RouteChanges {
            rx: self.tx.subscribe(),
            generation: self.generation.clone(),
        }
    }
}

/// Route changes, from [`RouteResolver::changes`].
#[derive(Debug, Clone)]
pub struct RouteChanges {
    rx: tokio::sync::watch::Receiver<u64>,
    generation: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl RouteChanges {
    /// Waits for the next change; `false` once the resolver (its notifier) is gone.
    pub async fn changed(&mut self) -> bool {
        self.rx.changed().await.is_ok()
    }

    /// How many changes were signalled so far: read without a lock or a wait, so a cached
    /// route can be checked against it on every send (it moves as soon as `notify` returns).
    pub fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::Acquire)
    }
}
