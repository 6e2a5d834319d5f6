//! Routes from DNS SRV records (feature `dns-srv`): [`DnsSrvResolver`] maps tabernas to SRV
//! names — a Kubernetes headless Service publishes one SRV answer per ready pod, e.g.
//! `_vicus._tcp.billing.prod.svc.cluster.local` — and lists every address of every target as a
//! [`Candidate`], with the SRV priority and weight and an identity derived from a template.
//!
//! How answers are kept:
//!
//! * **First lookup**: the first send to a taberna asks DNS (SRV, then A/AAAA for targets the
//!   answer's additional section does not cover). Concurrent first sends share one query; the
//!   query runs on its own task, so a send that gives up (its `resolve_timeout`) does not
//!   cancel it for the others.
//! * **Cached by TTL, refreshed in the background**: every name looked up once is asked again
//!   when its answer expires (the smallest TTL of the records it used, clamped to
//!   [`DnsSrvConfig::min_ttl`]..=[`DnsSrvConfig::max_ttl`]). Sends never wait for a refresh.
//!   A refresh that changes the answer signals [`RouteResolver::changes`], so running domus
//!   re-read their routes at once: a DNS change reaches new sends within one TTL.
//! * **DNS failures keep the last good answer**: a refresh that times out or fails (SERVFAIL,
//!   refused, no server) keeps what was known and is retried every
//!   [`DnsSrvConfig::retry_interval`]. An outage is reported once per resolver on the error
//!   feed of every domus using it ([`ErrorId::ResolverFailed`]), by its first failure, however
//!   many names it hits: it lasts from a failure while every name answered until every name
//!   answers again (so a name that keeps failing holds the outage open and hides later ones;
//!   each name's failure is also logged at debug level). A first lookup that fails fails the
//!   send with its own error.
//! * **NXDOMAIN or no records is an answer**: the service does not exist (or has no ready
//!   pods); sends to its tabernas fail with `UnknownTaberna` until DNS lists it again
//!   (remembered for [`DnsSrvConfig::negative_ttl`]).
//! * **All addresses are used**: a target with several A/AAAA records gives one candidate per
//!   address; the target's weight is split among them, so a dual-stack pod does not get twice
//!   the traffic of a single-stack one. A target of `.` (RFC 2782: "not available here") is
//!   skipped.
//!
//! Identity — what DNS decides, and what it cannot:
//!
//! * **The answer chooses the addresses and the names that fill the template.** Each
//!   candidate's expected identity is rendered from [`DnsSrvConfig::identity_template`] and
//!   enforced at the handshake: the certificate there must carry it, under the domus's trust
//!   anchors and trust policy. But `{target}`, `{host}` and `{port}` come from the DNS answer;
//!   only `{service}` and `{namespace}` come from the configured SRV name. So whoever controls
//!   the answers (the DNS server, or anyone on the path to it: plain DNS is not authenticated)
//!   can steer a send to any domus whose identity the template produces from *some* target
//!   name — with `spiffe://prod.example/ns/{namespace}/pod/{host}`, any pod of that namespace
//!   the CA certified, not only the Service's own. DNS can never make a send accept an
//!   identity the template cannot produce, nor a certificate the trust anchors refuse.
//! * **Strict setups** bind each SRV name to the identities its replicas may have with
//!   [`DnsSrvConfig::allow_identities`] (e.g. `spiffe://prod.example/ns/prod/pod/billing-*`)
//!   and set [`DnsSrvConfig::strict_identities`], which refuses a configuration in which a
//!   name has no allow-list: DNS then only chooses *which* replica of that service a send
//!   goes to. A target outside the list is left out (and reported); an answer with none
//!   inside fails the lookup, and the last good answer stays.
//! * **Without a template** candidates name no identity: whoever the trust anchors certify at
//!   the address is believed, learned at the first dial and pinned there (see
//!   [`Route::identity`](crate::resolve::Route::identity)).
//!
//! Replicas must have distinct identities (a peer is its identity).
//!
//! This module must not block a send on DNS once a name has been answered, must not let an
//! unbounded number of names or records grow its state (names come from the configuration;
//! at most [`DnsSrvResolver::MAX_CANDIDATES`] candidates per name), and must not report the same
//! outage twice.

mod config;
mod lookup;

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};

use arc_swap::ArcSwapOption;
use std::time::Duration;

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{NameServerConfig, ResolverConfig, ResolverOpts};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::Name;
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

pub use config::DnsSrvConfig;
use config::{Allowed, Checked, Template, invalid};

use super::{
    Candidate, CandidatesFuture, ResolveDomusFuture, ResolveFuture, ResolverFeed, ResolverFeeds,
    RouteChanges, RouteNotifier, RouteResolver, TopicPublishers, TopicPublishersFuture,
};
use crate::a0_transport::DomusId;
use crate::error::{Error, ErrorId};
use crate::taberna::TabernaId;

const MAX_CANDIDATES: usize = DnsSrvResolver::MAX_CANDIDATES;
const MAX_NAMES: usize = DnsSrvResolver::MAX_NAMES;
/// The most name lookups a refresh runs at once.
const REFRESH_CONCURRENCY: usize = 16;

/// What DNS last said about one SRV name (not answered yet: no `Known` at all).
#[derive(Debug, Clone, PartialEq)]
enum Known {
    /// The replicas (never empty).
    Found(Arc<[Candidate]>),
    /// NXDOMAIN or no SRV records.
    Absent,
}

/// The lookup state of one SRV name (what DNS said is in `Inner::answered`).
struct Entry {
    /// When to ask again.
    due: Instant,
    /// A lookup is running; its result is published here.
    running: Option<watch::Receiver<bool>>,
    /// Why the last lookup of this name failed, while it keeps failing (the outage it is part
    /// of is reported once, see [`Inner::store`]).
    failing: Option<Error>,
    /// The last warning about targets left out, reported once until it changes.
    warned: Option<String>,
}

/// One lookup's result.
struct Answer {
    known: Known,
    /// How long it holds.
    ttl: Duration,
    /// Targets left out (no address, an identity that does not parse), if any.
    warning: Option<String>,
}

impl Answer {
    fn absent(ttl: Duration) -> Self {
        Self {
            known: Known::Absent,
            ttl,
            warning: None,
        }
    }
}

struct Inner {
    config: DnsSrvConfig,
    template: Option<Template>,
    dns: TokioResolver,
    /// Taberna → index into `names`.
    services: HashMap<TabernaId, usize>,
    /// Topic pattern → index into `names` (its publishers).
    topics: Vec<(String, usize)>,
    names: Vec<(Name, String)>,
    /// Per name (as `names`): the identities its candidates may have; empty: any.
    allowed: Vec<Vec<Allowed>>,
    entries: Mutex<Vec<Entry>>,
    notifier: RouteNotifier,
    feeds: ResolverFeeds,
    /// Wakes the refresher when a name is first answered (its due time is new).
    wake: Notify,
    refresher: Mutex<Option<JoinHandle<()>>>,
    /// Whether the refresher was started (checked on every lookup without a lock).
    refresher_started: AtomicBool,
    /// What DNS last said about each name (`None`: not answered yet), readable without a
    /// lock — every send looks here first; written only by [`Inner::store`].
    answered: Vec<ArcSwapOption<Known>>,
}

/// A [`RouteResolver`] reading replicas from DNS SRV records (see the
/// [module docs](crate::resolve::dns_srv)). Share one per process; build it with
/// [`DnsSrvResolver::new`] inside a tokio runtime.
///
/// ```no_run
/// # async fn run(auth: vicus::AuthConfig) -> Result<(), vicus::Error> {
/// use std::sync::Arc;
/// use vicus::{DnsSrvConfig, DnsSrvResolver, Domus, MessageType, SendOptions, TabernaId};
///
/// let billing = TabernaId(7);
/// let name = "_vicus._tcp.billing.prod.svc.cluster.local";
/// let resolver = DnsSrvResolver::new(
///     DnsSrvConfig::new()
///         .service(billing, name)
///         .identity_template("spiffe://prod.example/ns/{namespace}/pod/{host}")
///         // DNS chooses among billing's pods only (see the module docs).
///         .allow_identities(name, ["spiffe://prod.example/ns/prod/pod/billing-*"])
///         .strict(),
/// )?;
/// let domus = Domus::builder(auth).resolver(Arc::new(resolver)).build().await?;
/// let invoice = bytes::Bytes::from_static(b"invoice");
/// domus
///     .send(billing, MessageType::app(1), invoice, SendOptions::default())
///     .await?;
/// # Ok(()) }
/// ```
pub struct DnsSrvResolver {
    inner: Arc<Inner>,
}

impl fmt::Debug for DnsSrvResolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DnsSrvResolver")
            .field("name_servers", &self.inner.config.name_servers)
            .field("names", &self.inner.names.len())
            .finish_non_exhaustive()
    }
}

impl Drop for DnsSrvResolver {
    fn drop(&mut self) {
        if let Some(task) = self
            .inner
            .refresher
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
            task.abort();
        }
    }
}

impl DnsSrvResolver {
    /// The most candidates kept for one SRV name (addresses beyond it are dropped).
    pub const MAX_CANDIDATES: usize = 256;
    /// The most SRV names one resolver serves.
    pub const MAX_NAMES: usize = 4096;

    /// A resolver for `config`'s services; `InvalidConfig` for a bad name, template or bound,
    /// or when the system's DNS configuration cannot be read (no name servers given).
    pub fn new(config: DnsSrvConfig) -> Result<Self, Error> {
        let Checked {
            template,
            names,
            services,
            allowed,
            topics,
        } = config.check()?;
        let mut opts = ResolverOpts::default();
        opts.timeout = config.query_timeout;
        opts.attempts = 1;
        // Our own cache decides when to ask again; hickory's must not answer for longer.
        opts.positive_max_ttl = Some(config.max_ttl);
        opts.negative_max_ttl = Some(config.negative_ttl);
        opts.ndots = 0;
        let builder = if config.name_servers.is_empty() {
            TokioResolver::builder_tokio().map_err(|e| {
                invalid(format!(
                    "the system's DNS configuration could not be read ({e}); name the servers \
                     with DnsSrvConfig::name_server"
                ))
            })?
        } else {
            let servers = config
                .name_servers
                .iter()
                .map(|addr| {
                    let mut server = NameServerConfig::udp_and_tcp(addr.ip());
                    for c in &mut server.connections {
                        c.port = addr.port();
                    }
                    server
                })
                .collect();
            TokioResolver::builder_with_config(
                ResolverConfig::from_name_servers(servers),
                TokioRuntimeProvider::default(),
            )
        };
        let dns = builder
            .with_options(opts)
            .build()
            .map_err(|e| invalid(format!("the DNS resolver could not be built: {e}")))?;
        let names_len = names.len();
        let entries = names
            .iter()
            .map(|_| Entry {
                due: Instant::now(),
                running: None,
                failing: None,
                warned: None,
            })
            .collect();
        Ok(Self {
            inner: Arc::new(Inner {
                config,
                template,
                dns,
                services,
                topics,
                names,
                allowed,
                entries: Mutex::new(entries),
                notifier: RouteNotifier::new(),
                feeds: ResolverFeeds::new(),
                wake: Notify::new(),
                refresher: Mutex::new(None),
                refresher_started: AtomicBool::new(false),
                answered: (0..names_len).map(|_| ArcSwapOption::empty()).collect(),
            }),
        })
    }

    /// Asks DNS again for every name looked up so far, now, and waits for the answers (each
    /// bounded by the query timeout). What a background refresh does, for tests and for an
    /// application that knows DNS just changed.
    pub async fn refresh_now(&self) {
        let indices: Vec<usize> = (0..self.inner.answered.len())
            .filter(|&i| self.inner.known(i).is_some())
            .collect();
        for i in indices {
            if let Some(mut done) = Inner::start_lookup(&self.inner, i) {
                let _ = done.wait_for(|d| *d).await;
            }
        }
    }

    fn ensure_refresher(&self) {
        if self.inner.refresher_started.load(Ordering::Acquire) {
            return;
        }
        let mut refresher = self
            .inner
            .refresher
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if refresher.is_none()
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            *refresher = Some(rt.spawn(refresh(Arc::downgrade(&self.inner))));
            self.inner.refresher_started.store(true, Ordering::Release);
        }
    }

    fn lookup(&self, taberna: TabernaId) -> CandidatesFuture<'_> {
        let Some(&index) = self.inner.services.get(&taberna) else {
            return Box::pin(std::future::ready(Err(Error::new(
                ErrorId::UnknownTaberna,
                format!("no route to {taberna}: the DNS SRV resolver has no name for it"),
            ))));
        };
        self.ensure_refresher();
        // The common case, without a lock: DNS has answered this name.
        if let Some(known) = self.inner.known(index) {
            return Box::pin(std::future::ready(self.inner.reply(taberna, index, &known)));
        }
        let inner = self.inner.clone();
        // Not yet: wait for the lookup running, or start one — unless the last one failed and
        // its retry is not due (then that failure).
        let running = {
            let entries = inner.entries.lock().unwrap_or_else(PoisonError::into_inner);
            // Answered since the look above (store writes it under this lock).
            if let Some(known) = inner.known(index) {
                return Box::pin(std::future::ready(inner.reply(taberna, index, &known)));
            }
            match entries.get(index) {
                Some(e) => match (&e.running, &e.failing) {
                    (Some(running), _) => Some(running.clone()),
                    (None, Some(error)) if e.due > Instant::now() => {
                        return Box::pin(std::future::ready(Err(error.clone())));
                    }
                    (None, _) => None,
                },
                None => None,
            }
        };
        Box::pin(async move {
            if let Some(mut done) = running.or_else(|| Inner::start_lookup(&inner, index)) {
                let _ = done.wait_for(|d| *d).await;
            }
            inner
                .answer(taberna, index)
                .unwrap_or_else(|| Err(inner.not_yet(index)))
        })
    }
}

impl Inner {
    /// What DNS last said about name `index`, if it has answered.
    fn known(&self, index: usize) -> Option<Arc<Known>> {
        self.answered.get(index).and_then(ArcSwapOption::load_full)
    }

    /// A send's answer from what DNS said.
    fn reply(
        &self,
        taberna: TabernaId,
        index: usize,
        known: &Known,
    ) -> Result<Arc<[Candidate]>, Error> {
        match known {
            Known::Found(c) => Ok(c.clone()),
            Known::Absent => Err(self.absent(taberna, index)),
        }
    }

    /// The answer for `taberna` when DNS has given one (or failed at the first lookup).
    fn answer(&self, taberna: TabernaId, index: usize) -> Option<Result<Arc<[Candidate]>, Error>> {
        if let Some(known) = self.known(index) {
            return Some(self.reply(taberna, index, &known));
        }
        let entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        entries.get(index)?.failing.clone().map(Err)
    }

    fn absent(&self, taberna: TabernaId, index: usize) -> Error {
        let name = self.names.get(index).map_or("", |(_, t)| t.as_str());
        Error::new(
            ErrorId::UnknownTaberna,
            format!("no route to {taberna}: DNS lists no replica under {name}"),
        )
    }

    fn not_yet(&self, index: usize) -> Error {
        let name = self.names.get(index).map_or("", |(_, t)| t.as_str());
        Error::new(
            ErrorId::ResolverFailed,
            format!("DNS has not answered for {name} yet"),
        )
    }

    /// Keeps a lookup's result: a new answer replaces the old one (and signals a change when it
    /// differs); a failure keeps the old one and is retried soon. An outage — from a failure
    /// while every name answered until every name answers again — is reported once, by its
    /// first failure, whatever the number of names it hits (each name's failure is logged at
    /// debug level and fails that name's first lookups with its own error).
    fn store(&self, index: usize, result: Result<Answer, Error>) {
        let now = Instant::now();
        let mut report = None;
        let mut changed = false;
        let mut recovered = false;
        {
            let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
            let outage = entries.iter().any(|e| e.failing.is_some());
            let Some(entry) = entries.get_mut(index) else {
                return;
            };
            entry.running = None;
            match result {
                Ok(Answer {
                    known,
                    ttl,
                    warning,
                }) => {
                    if warning.is_some() && warning != entry.warned {
                        report = warning
                            .clone()
                            .map(|w| Error::new(ErrorId::ResolverFailed, w));
                    }
                    entry.warned = warning;
                    changed = self.known(index).as_deref() != Some(&known);
                    if let Some(slot) = self.answered.get(index) {
                        slot.store(Some(Arc::new(known)));
                    }
                    entry.due = now + ttl;
                    recovered = entry.failing.take().is_some();
                }
                Err(error) => {
                    entry.due = now + self.config.retry_interval;
                    if !outage {
                        let kept = match self.known(index).as_deref() {
                            Some(Known::Found(c)) => {
                                format!("; keeping the {} candidate(s) it gave before", c.len())
                            }
                            Some(Known::Absent) => "; it listed no replica before".to_owned(),
                            None => String::new(),
                        };
                        report = Some(Error::new(
                            ErrorId::ResolverFailed,
                            format!(
                                "{}{kept} (further DNS failures of this resolver are not \
                                 reported until every name answers again)",
                                error.message()
                            ),
                        ));
                    } else if entry.failing.is_none() {
                        tracing::debug!(error = %error, "DNS SRV lookup failed during an outage already reported");
                    }
                    entry.failing = Some(error);
                }
            }
            if recovered && !entries.iter().any(|e| e.failing.is_some()) {
                tracing::info!("DNS answers every SRV name again; the outage is over");
            }
        }
        if let Some(error) = report {
            tracing::warn!(%error, "DNS SRV lookup failed");
            self.feeds.report(&error);
        }
        if changed {
            self.notifier.notify();
        }
        self.wake.notify_one();
    }
}

/// The background refresh: asks again for every answered name when it is due. Aborted when
/// the resolver is dropped.
async fn refresh(inner: Weak<Inner>) {
    loop {
        let Some(strong) = inner.upgrade() else {
            return;
        };
        let now = Instant::now();
        let (due, next): (Vec<usize>, Option<Instant>) = {
            let entries = strong
                .entries
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            // Names asked at least once: answered, or failed at their first lookup.
            let asked: Vec<(usize, &Entry)> = entries
                .iter()
                .enumerate()
                .filter(|(i, e)| strong.known(*i).is_some() || e.failing.is_some())
                .collect();
            let due = asked
                .iter()
                .filter(|(_, e)| e.running.is_none() && e.due <= now)
                .map(|(i, _)| *i)
                .collect();
            let next = asked
                .iter()
                .filter(|(_, e)| e.due > now)
                .map(|(_, e)| e.due)
                .min();
            (due, next)
        };
        let mut running = Vec::new();
        for i in due.into_iter().take(REFRESH_CONCURRENCY) {
            if let Some(done) = Inner::start_lookup(&strong, i) {
                running.push(done);
            }
        }
        let wait_until = next.unwrap_or(now + strong.config.max_ttl);
        if running.is_empty() {
            // Holding `strong` here is fine: dropping the resolver aborts this task.
            tokio::select! {
                () = tokio::time::sleep_until(wait_until) => {}
                () = strong.wake.notified() => {}
            }
        } else {
            drop(strong);
            for mut done in running {
                let _ = done.wait_for(|d| *d).await;
            }
        }
    }
}

impl RouteResolver for DnsSrvResolver {
    fn resolve(&self, taberna: TabernaId) -> ResolveFuture<'_> {
        let candidates = self.lookup(taberna);
        Box::pin(async move {
            let candidates = candidates.await?;
            candidates.first().map(|c| c.route.clone()).ok_or_else(|| {
                Error::new(ErrorId::UnknownTaberna, format!("no route to {taberna}"))
            })
        })
    }

    fn candidates(&self, taberna: TabernaId) -> CandidatesFuture<'_> {
        self.lookup(taberna)
    }

    /// The publishers of each topic pattern the configuration names
    /// ([`DnsSrvConfig::topic`]): the identities of its SRV name's candidates, looked up like
    /// a service's (the first call waits for DNS, bounded by the query timeout; later ones
    /// read the cached answer). A name DNS does not answer lists no publisher.
    fn topic_publishers(&self) -> TopicPublishersFuture<'_> {
        if self.inner.topics.is_empty() {
            return Box::pin(std::future::ready(Ok(Arc::from([]))));
        }
        self.ensure_refresher();
        let inner = self.inner.clone();
        Box::pin(async move {
            let mut listed = Vec::with_capacity(inner.topics.len());
            for (pattern, index) in &inner.topics {
                if inner.known(*index).is_none() {
                    let running = {
                        let entries = inner.entries.lock().unwrap_or_else(PoisonError::into_inner);
                        match entries.get(*index) {
                            Some(e) => match (&e.running, &e.failing) {
                                (Some(running), _) => Some(Some(running.clone())),
                                (None, Some(_)) if e.due > Instant::now() => None,
                                (None, _) => Some(None),
                            },
                            None => None,
                        }
                    };
                    if let Some(running) = running
                        && let Some(mut done) =
                            running.or_else(|| Inner::start_lookup(&inner, *index))
                    {
                        let _ = done.wait_for(|d| *d).await;
                    }
                }
                if let Some(Known::Found(candidates)) = inner.known(*index).as_deref() {
                    let mut publishers: Vec<DomusId> = Vec::new();
                    for c in candidates.iter() {
                        if let Some(id) = &c.route.identity
                            && !publishers.contains(id)
                        {
                            publishers.push(id.clone());
                        }
                    }
                    if !publishers.is_empty() {
                        listed.push(TopicPublishers {
                            pattern: pattern.clone(),
                            publishers,
                        });
                    }
                }
            }
            Ok(Arc::from(listed))
        })
    }

    /// The address of a domus some SRV answer listed under that identity (with an identity
    /// template), else `None`.
    fn resolve_domus<'a>(&'a self, id: &'a DomusId) -> ResolveDomusFuture<'a> {
        let addr =
            (0..self.inner.answered.len()).find_map(|i| match self.inner.known(i).as_deref() {
                Some(Known::Found(c)) => c
                    .iter()
                    .find(|c| c.route.identity.as_ref() == Some(id))
                    .map(|c| c.route.addr.clone()),
                _ => None,
            });
        Box::pin(std::future::ready(Ok(addr)))
    }

    fn changes(&self) -> Option<RouteChanges> {
        Some(self.inner.notifier.subscribe())
    }

    fn attach(&self, feed: ResolverFeed) {
        self.inner.feeds.add(feed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_config_is_checked_when_the_resolver_is_built() {
        let server: std::net::SocketAddr = "127.0.0.1:53".parse().expect("addr");
        let ok = DnsSrvConfig::new().name_server(server);
        let t = TabernaId(1);
        let cases = [
            (ok.clone().service(t, "bad..name"), "not a DNS name"),
            (
                ok.clone().service(t, "_a._tcp.x").service(t, "_b._tcp.x"),
                "two SRV names",
            ),
            (ok.clone().query_timeout(Duration::ZERO), "query_timeout"),
            (
                ok.clone()
                    .ttl_bounds(Duration::from_secs(10), Duration::from_secs(1)),
                "max_ttl",
            ),
            (ok.clone().identity_template("{nope}"), "unknown variable"),
            (
                ok.clone()
                    .identity_template("spiffe://td/{host}")
                    .service(t, "_a._tcp.x")
                    .allow_identities("_b._tcp.x", ["spiffe://td/a"]),
                "no service or group routes to",
            ),
            (
                ok.clone()
                    .service(t, "_a._tcp.x")
                    .allow_identities("_a._tcp.x.", ["spiffe://td/a"]),
                "needs an identity_template",
            ),
            (
                ok.clone().service(t, "_a._tcp.x").strict(),
                "strict_identities needs an identity_template",
            ),
            (
                ok.clone()
                    .identity_template("spiffe://td/{host}")
                    .service(t, "_a._tcp.x")
                    .service(TabernaId(2), "_b._tcp.x")
                    .allow_identities("_a._tcp.x", ["spiffe://td/a-*"])
                    .strict(),
                "_b._tcp.x has no allow_identities",
            ),
        ];
        for (config, says) in cases {
            let e = DnsSrvResolver::new(config).expect_err(says);
            assert_eq!(e.id(), ErrorId::InvalidConfig);
            assert!(e.message().contains(says), "{says}: {}", e.message());
        }
        let r =
            DnsSrvResolver::new(ok.group([TabernaId(1), TabernaId(2)], "_vicus._tcp.billing.test"))
                .expect("builds");
        assert_eq!(r.inner.names.len(), 1, "a group shares one name");
        let strict = DnsSrvResolver::new(
            DnsSrvConfig::new()
                .name_server(server)
                .identity_template("spiffe://td/{host}")
                .service(t, "_a._tcp.x")
                .allow_identities("_a._tcp.x.", ["spiffe://td/a-*", "spiffe://td/b"])
                .strict(),
        )
        .expect("every name has an allow-list");
        assert_eq!(
            strict.inner.allowed[0].len(),
            2,
            "a final dot names the same name"
        );
        let unknown = r.candidates(TabernaId(3)).await.expect_err("unknown");
        assert_eq!(unknown.id(), ErrorId::UnknownTaberna);
    }
}
