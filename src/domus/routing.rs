//! Routing: resolver calls (bounded by `resolve_timeout`, a panicking resolver caught),
//! identities pinned for routes that name none, the choice among a taberna's replicas, and
//! following the resolver's route changes. It never dials to choose: reachability comes from
//! what the drivers last found.

use super::DomusInner;
use super::destination::RouteCache;
use super::peers::PeerRef;
use super::pins::Pins;
use crate::a0_transport::{DomusAddr, DomusId};
use crate::error::{Error, ErrorId};
use crate::resolve::{Candidate, CandidatesFuture, Route, RouteChanges, RouteResolver, choose};
use crate::runtime::peer::PeerCommand;
use crate::runtime::rand_u64;
use crate::taberna::TabernaId;
use bytes::BytesMut;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use tokio_util::sync::CancellationToken;

/// Re-reads every remembered route each time the resolver signals a change, and moves a peer
/// whose route now names a new address there (its drivers abandon a dial to the old one).
/// A route that no longer names the same peer is forgotten: what waits for the old peer stays
/// with it (it may have been delivered there).
pub(super) async fn follow_routes(
    inner: Arc<DomusInner>,
    mut changes: RouteChanges,
    stop: CancellationToken,
) {
    loop {
        let changed = tokio::select! {
            () = stop.cancelled() => return,
            changed = changes.changed() => changed,
        };
        if !changed {
            return;
        }
        inner.routing.bump();
        tracing::debug!(
            target: "vicus::why",
            why = "route_change",
            "the resolver signalled a route change: cached routes are resolved again"
        );
        let routed = inner.peers.routed();
        for (taberna, peer) in routed {
            let deadline = tokio::time::Instant::now() + inner.config.load().resolve_timeout;
            let candidates = tokio::select! {
                () = stop.cancelled() => return,
                candidates = inner.candidates(taberna, deadline) => candidates,
            };
            // Among replicas, the peer's own candidate (not the one a send would pick).
            let own = candidates.map(|c| {
                c.iter()
                    .find(|c| c.route.identity.as_ref() == Some(&peer))
                    .map(|c| c.route.addr.clone())
            });
            match own {
                Ok(Some(addr)) => inner.readdress(&peer, addr),
                // Resolvers can fail for a moment; the route is tried again next time.
                Err(e) if e.id() != ErrorId::UnknownTaberna => {}
                _ => inner.peers.unroute(&peer, taberna),
            }
        }
    }
}

/// A resolver lookup after its first poll ([`DomusInner::start_candidates`]).
pub(super) enum Lookup<'a> {
    Ready(Result<Arc<[Candidate]>, Error>),
    Pending(CandidatesFuture<'a>),
}

pub(super) fn resolver_panicked(taberna: TabernaId) -> Error {
    Error::new(
        ErrorId::PeerUnavailable,
        format!("the route resolver panicked while resolving {taberna}"),
    )
}

/// The routing owner: the resolver, the identities pinned for routes that named none, the
/// route caches of the domus's own sends, and the generations a cached route is checked
/// against. Each piece has its own lock or none (snapshots and atomics); none is held across
/// an `.await`.
pub(super) struct Routing {
    pub(super) resolver: Arc<dyn RouteResolver>,
    /// Identities learned for routes that named none: bounded by `max_pinned_addresses`,
    /// aged by `peer_retire_after`, dropped when another identity answers there.
    pub(super) pinned: Mutex<Pins>,
    /// Bumped each time the resolver signals that routes changed (and when a peer is
    /// forgotten or unpinned): a cached route resolves again when it differs from the one it
    /// was resolved at. Never bumped, and routes resolved on every send, when the resolver
    /// cannot signal changes.
    pub(super) generation: std::sync::atomic::AtomicU64,
    /// Whether the resolver signals changes (so resolutions may be cached), and how many it
    /// signalled (a cached resolution made before the last one is stale at once, before the
    /// route follower has handled it).
    pub(super) followed: bool,
    changes: Option<RouteChanges>,
    /// The routes this domus's own sends ([`Domus::send`](super::Domus::send) and friends)
    /// went through, per taberna (at most [`SEND_ROUTES_MAX`]): read without a lock, written
    /// on a miss.
    send_routes: arc_swap::ArcSwap<HashMap<TabernaId, Arc<RouteCache>>>,
    send_routes_writer: Mutex<()>,
}

impl Routing {
    pub(super) fn new(resolver: Arc<dyn RouteResolver>, changes: Option<RouteChanges>) -> Self {
        Self {
            resolver,
            pinned: Mutex::new(Pins::default()),
            generation: std::sync::atomic::AtomicU64::new(0),
            followed: changes.is_some(),
            changes,
            send_routes: arc_swap::ArcSwap::from_pointee(HashMap::new()),
            send_routes_writer: Mutex::new(()),
        }
    }

    /// The changes the resolver signalled so far (0 for one that signals none).
    pub(super) fn resolver_generation(&self) -> u64 {
        self.changes.as_ref().map_or(0, RouteChanges::generation)
    }

    /// Routes changed (or a peer they named went away): cached routes resolve again.
    pub(super) fn bump(&self) {
        self.generation
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    }

    /// The current generation (see [`bump`](Self::bump)).
    pub(super) fn current(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::Acquire)
    }

    /// The route cache the domus's own sends to `taberna` go through: found without a lock
    /// (a snapshot read) on the steady path; made, and kept while there is room, on a miss.
    pub(super) fn route_cache(&self, taberna: TabernaId) -> Arc<RouteCache> {
        if let Some(route) = self.send_routes.load().get(&taberna) {
            return route.clone();
        }
        let _writer = self
            .send_routes_writer
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let current = self.send_routes.load_full();
        if let Some(route) = current.get(&taberna) {
            return route.clone();
        }
        let route = Arc::new(RouteCache::new(taberna, None, false));
        if current.len() < SEND_ROUTES_MAX {
            let mut routes = HashMap::clone(&current);
            routes.insert(taberna, route.clone());
            self.send_routes.store(Arc::new(routes));
        }
        route
    }
}

/// The most tabernas whose routes the domus's own sends keep (past it, a send to a new
/// taberna resolves its route each time, as a taberna with several replicas always does).
pub(super) const SEND_ROUTES_MAX: usize = 1024;

impl DomusInner {
    /// Resolves `taberna` to a peer (learning its identity when the route names none) and
    /// returns the peer's handles, telling its drivers of a new address; remembers the route
    /// when it names the peer, so a later route change reaches the peer at once.
    pub(super) async fn route_to_peer(
        self: &Arc<Self>,
        taberna: TabernaId,
        deadline: tokio::time::Instant,
    ) -> Result<(DomusId, Arc<PeerRef>), Error> {
        let (id, peer, _sole) = self.route_to_peer_sole(taberna, deadline).await?;
        Ok((id, peer))
    }

    /// [`route_to_peer`](Self::route_to_peer), also saying whether the resolver listed one
    /// candidate only (so the choice made now is the choice every send would make, and may
    /// be kept until routes change).
    pub(super) async fn route_to_peer_sole(
        self: &Arc<Self>,
        taberna: TabernaId,
        deadline: tokio::time::Instant,
    ) -> Result<(DomusId, Arc<PeerRef>, bool), Error> {
        let candidates = self.candidates(taberna, deadline).await?;
        let sole = candidates.len() == 1;
        let route = self.pick(taberna, &candidates)?;
        let named = route.identity.is_some();
        let peer_id = match route.identity {
            Some(id) => id,
            // Rare and large (a whole dial): boxed, so every send future stays small.
            None => Box::pin(self.learn_identity(&route.addr, deadline)).await?,
        };
        if peer_id == self.local_id {
            return Err(Error::new(
                ErrorId::UnknownTaberna,
                format!("{taberna} routes to this domus, but no such taberna is registered"),
            ));
        }
        let peer = self.peer_routed(&peer_id, Some(route.addr), named.then_some(taberna));
        Ok((peer_id, peer, sole))
    }

    /// The peer `id` itself (not a taberna's route), for [`Domus::destination_on`]: at the
    /// address the resolver gives for it (bounded by `resolve_timeout` and `deadline`), else
    /// as this domus already knows it.
    pub(super) async fn peer_by_id(
        self: &Arc<Self>,
        id: &DomusId,
        deadline: tokio::time::Instant,
    ) -> Result<Arc<PeerRef>, Error> {
        let limit = self.config.load().resolve_timeout;
        let until = deadline.min(tokio::time::Instant::now() + limit);
        // Application code, as in `resolve`: a panic becomes this send's error.
        let panicked = || {
            Error::new(
                ErrorId::PeerUnavailable,
                format!("the route resolver panicked while resolving the domus {id}"),
            )
        };
        let resolver = &self.routing.resolver;
        let mut lookup =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| resolver.resolve_domus(id)))
                .map_err(|_| panicked())?;
        let guarded = std::future::poll_fn(move |cx| {
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| lookup.as_mut().poll(cx)))
                .unwrap_or_else(|_| Poll::Ready(Err(panicked())))
        });
        let addr = tokio::time::timeout_at(until, guarded)
            .await
            .map_err(|_| {
                Error::new(
                    ErrorId::PeerUnavailable,
                    format!(
                        "the resolver did not say where {id} is within {limit:?} (resolve_timeout)"
                    ),
                )
            })??;
        Ok(self.peer(id, addr))
    }

    /// Tells the drivers of `id` (if it has any) that its address is now `addr`.
    pub(super) fn readdress(&self, id: &DomusId, addr: DomusAddr) {
        self.peers.readdress(id, addr);
    }

    /// Chooses among a taberna's candidates ([`choose`]): the lowest priority that has a
    /// candidate this domus can reach now (a candidate whose peer's last dial failed, or that
    /// was forgotten unreachable there, is skipped while another can be tried), then by
    /// weight. The reachability view is taken in one look at the peer table.
    pub(super) fn pick(
        &self,
        taberna: TabernaId,
        candidates: &[Candidate],
    ) -> Result<Route, Error> {
        let no_candidate = || {
            Error::new(
                ErrorId::UnknownTaberna,
                format!("no route to {taberna}: the resolver listed no candidate"),
            )
        };
        match candidates {
            [] => return Err(no_candidate()),
            [only] => return Ok(only.route.clone()),
            _ => {}
        }
        let unreachable = self
            .peers
            .unreachable(candidates, tokio::time::Instant::now());
        let reachable = |c: &Candidate| !unreachable.contains(&&c.route);
        let chosen = choose(candidates, reachable, rand_u64())
            .map(|c| c.route.clone())
            .ok_or_else(no_candidate)?;
        tracing::debug!(
            target: "vicus::why",
            why = "replica_chosen",
            taberna = taberna.0,
            chosen = ?chosen.identity,
            at = %chosen.addr,
            candidates = candidates.len(),
            skipped_unreachable = unreachable.len(),
            "one of the taberna's replicas was chosen by weight among those reachable"
        );
        Ok(chosen)
    }

    /// Starts the resolver's lookup for `taberna` and polls it once: an in-memory resolver
    /// answers there. The resolver is application code, so a panic in it becomes an error,
    /// never a panic in the caller.
    pub(super) fn start_candidates(&self, taberna: TabernaId) -> Lookup<'_> {
        let resolver = &self.routing.resolver;
        let Ok(mut lookup) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            resolver.candidates(taberna)
        })) else {
            return Lookup::Ready(Err(resolver_panicked(taberna)));
        };
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            lookup
                .as_mut()
                .poll(&mut Context::from_waker(std::task::Waker::noop()))
        })) {
            Err(_) => Lookup::Ready(Err(resolver_panicked(taberna))),
            Ok(Poll::Ready(candidates)) => Lookup::Ready(candidates),
            Ok(Poll::Pending) => Lookup::Pending(lookup),
        }
    }

    /// Asks the resolver for `taberna`'s candidates, bounded by `resolve_timeout` (and the
    /// send's deadline). An in-memory resolver answers on the first poll, which then costs no
    /// timer.
    pub(super) async fn candidates(
        &self,
        taberna: TabernaId,
        deadline: tokio::time::Instant,
    ) -> Result<Arc<[Candidate]>, Error> {
        let mut lookup = match self.start_candidates(taberna) {
            Lookup::Ready(candidates) => return candidates,
            Lookup::Pending(lookup) => lookup,
        };
        let panicked = move || resolver_panicked(taberna);
        let guarded = std::future::poll_fn(move |cx| {
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| lookup.as_mut().poll(cx)))
                .unwrap_or_else(|_| Poll::Ready(Err(panicked())))
        });
        // A resolver that does not answer at once takes the slow, boxed path.
        Box::pin(tokio::time::timeout_at(
            deadline.min(tokio::time::Instant::now() + self.config.load().resolve_timeout),
            guarded,
        ))
        .await
        .map_err(|_| {
            Error::new(
                ErrorId::PeerUnavailable,
                format!(
                    "the resolver did not answer for {taberna} within {:?} (resolve_timeout)",
                    self.config.load().resolve_timeout
                ),
            )
        })?
    }

    /// Dials a route that names no identity, pins the identity it presents to that address,
    /// and hands the callis to the peer's driver; a pin there (see [`pins`]) answers
    /// without a dial.
    pub(super) async fn learn_identity(
        self: &Arc<Self>,
        addr: &DomusAddr,
        deadline: tokio::time::Instant,
    ) -> Result<DomusId, Error> {
        let max_idle = self.config.load().peer_retire_after;
        if let Some(id) = self
            .routing
            .pinned
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(addr, tokio::time::Instant::now(), max_idle)
        {
            return Ok(id);
        }
        let stream = tokio::time::timeout_at(deadline, self.transport.dial(addr, None))
            .await
            .map_err(|_| {
                Error::new(
                    ErrorId::PeerUnavailable,
                    format!("{addr} could not be reached before the deadline"),
                )
            })?
            .map_err(|e| {
                Error::new(ErrorId::PeerUnavailable, format!("{addr}: {}", e.message()))
            })?;
        let id = stream.peer().id().clone();
        let config = self.config.load();
        self.routing
            .pinned
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pin(
                addr.clone(),
                id.clone(),
                tokio::time::Instant::now(),
                config.max_pinned_addresses,
                config.peer_retire_after,
            );
        let peer = self.peer(&id, Some(addr.clone()));
        let _ = peer
            .tx
            .send(PeerCommand::Attach(Box::new(stream), BytesMut::new()));
        Ok(id)
    }
}
