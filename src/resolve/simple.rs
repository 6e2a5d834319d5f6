//! [`SimpleResolver`]: an in-memory routing table that can change while domus run.
//!
//! It must not block a lookup: lookups read an immutable snapshot, and only writers take its
//! lock. It does no IO.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use arc_swap::ArcSwap;

use super::{
    Candidate, CandidatesFuture, ResolveDomusFuture, ResolveFuture, Route, RouteChanges,
    RouteNotifier, RouteResolver, TopicPublishers, TopicPublishersFuture,
};
use crate::a0_transport::{DomusAddr, DomusId};
use crate::error::{Error, ErrorId};
use crate::taberna::TabernaId;

/// An in-memory routing table; insert and remove while the domus runs (each change reaches
/// running domus at once, see the [module docs](super)).
///
/// Lookups read an immutable snapshot (no lock: every send resolves, from many tasks at
/// once); changes copy the table and publish the copy, one writer at a time.
#[derive(Debug, Default)]
pub struct SimpleResolver {
    routes: ArcSwap<HashMap<TabernaId, Arc<[Candidate]>>>,
    /// Addresses of domus by identity, for sends addressed to a domus.
    domus: ArcSwap<HashMap<DomusId, DomusAddr>>,
    /// Who publishes to which topics (for the topic service).
    topics: ArcSwap<Vec<TopicPublishers>>,
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

    /// Lists `publishers` as the domus that publish to topics `pattern` matches (replacing
    /// what was listed for that pattern; an empty list removes it).
    pub fn insert_topic_publishers(&self, pattern: &str, publishers: Vec<DomusId>) {
        let _writer = self.writer.lock().unwrap_or_else(PoisonError::into_inner);
        let mut topics = Vec::clone(&self.topics.load());
        topics.retain(|t| t.pattern != pattern);
        if !publishers.is_empty() {
            topics.push(TopicPublishers {
                pattern: pattern.to_owned(),
                publishers,
            });
        }
        self.topics.store(Arc::new(topics));
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

    fn topic_publishers(&self) -> TopicPublishersFuture<'_> {
        let topics: Arc<[TopicPublishers]> = Arc::from(self.topics.load().as_slice());
        Box::pin(std::future::ready(Ok(topics)))
    }

    fn resolve_domus<'a>(&'a self, id: &'a DomusId) -> ResolveDomusFuture<'a> {
        let addr = self.domus.load().get(id).cloned();
        Box::pin(std::future::ready(Ok(addr)))
    }

    fn changes(&self) -> Option<RouteChanges> {
        Some(self.notifier.subscribe())
    }
}
