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
//!   [`Route::identity`]).
//!
//! Replicas must have distinct identities (a peer is its identity).
//!
//! This module must not block a send on DNS once a name has been answered, must not let an
//! unbounded number of names or records grow its state (names come from the configuration;
//! at most [`DnsSrvResolver::MAX_CANDIDATES`] candidates per name), and must not report the same
//! outage twice.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};

use arc_swap::ArcSwapOption;
use std::time::Duration;

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{NameServerConfig, ResolverConfig, ResolverOpts};
use hickory_resolver::net::NetError;
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::{Name, RData};
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::{
    Candidate, CandidatesFuture, ResolveDomusFuture, ResolveFuture, ResolverFeed, ResolverFeeds,
    Route, RouteChanges, RouteNotifier, RouteResolver,
};
use crate::a0_transport::{DomusAddr, DomusId};
use crate::error::{Error, ErrorId, untrusted};
use crate::taberna::TabernaId;

const MAX_CANDIDATES: usize = DnsSrvResolver::MAX_CANDIDATES;
const MAX_NAMES: usize = DnsSrvResolver::MAX_NAMES;
/// The most name lookups a refresh runs at once.
const REFRESH_CONCURRENCY: usize = 16;

/// What a [`DnsSrvResolver`] asks and how. Build with [`DnsSrvConfig::new`] and the setters;
/// checked by [`DnsSrvResolver::new`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct DnsSrvConfig {
    /// DNS servers to ask (UDP, then TCP on truncation or error). Empty: the system's
    /// configuration (`/etc/resolv.conf`, as in a Kubernetes pod).
    pub name_servers: Vec<SocketAddr>,
    /// The expected identity of each candidate, with `{target}` (the SRV target without its
    /// final dot), `{host}` (the target's first label: a pod's hostname or dashed IP),
    /// `{service}` and `{namespace}` (from an SRV name of the Kubernetes form
    /// `_port._proto.service.namespace.svc.zone`; otherwise `{service}` is the label after
    /// `_proto` and `{namespace}` is empty) and `{port}`. `None`: candidates name no identity.
    /// `{target}`, `{host}` and `{port}` come from the DNS answer, `{service}` and
    /// `{namespace}` from this configuration: see the module docs for what that lets DNS
    /// decide, and [`allow_identities`](Self::allow_identities) to narrow it.
    pub identity_template: Option<String>,
    /// Refuse to build unless every SRV name has an allow-list
    /// ([`allow_identities`](Self::allow_identities)) and an identity template is set, so no
    /// name can route to an identity DNS chose freely. Default `false`; the setting for
    /// strict setups (see the module docs).
    pub strict_identities: bool,
    /// How long one DNS query may take (each name server is tried once more after it).
    pub query_timeout: Duration,
    /// The shortest time an answer is kept before it is asked again (a TTL of 0 counts as
    /// this).
    pub min_ttl: Duration,
    /// The longest time an answer is kept before it is asked again, whatever its TTL.
    pub max_ttl: Duration,
    /// How long "no such name" is believed before it is asked again.
    pub negative_ttl: Duration,
    /// How often a name whose lookup failed is asked again (the last good answer is kept
    /// meanwhile).
    pub retry_interval: Duration,
    services: Vec<(TabernaId, String)>,
    /// SRV name → identity patterns its candidates must match.
    allowed: Vec<(String, String)>,
}

impl Default for DnsSrvConfig {
    fn default() -> Self {
        Self::new()
    }
}

impl DnsSrvConfig {
    /// The system's DNS servers, no identity template, no services; 2 s query timeout, TTLs
    /// clamped to 1 s ..= 5 min, 5 s negative TTL, 1 s retry.
    pub fn new() -> Self {
        Self {
            name_servers: Vec::new(),
            identity_template: None,
            strict_identities: false,
            query_timeout: Duration::from_secs(2),
            min_ttl: Duration::from_secs(1),
            max_ttl: Duration::from_secs(300),
            negative_ttl: Duration::from_secs(5),
            retry_interval: Duration::from_secs(1),
            services: Vec::new(),
            allowed: Vec::new(),
        }
    }

    /// Asks `server` (may be called more than once) instead of the system's servers.
    pub fn name_server(mut self, server: SocketAddr) -> Self {
        self.name_servers.push(server);
        self
    }

    /// Routes `taberna` to the replicas listed under the SRV name `srv_name`, e.g.
    /// `_vicus._tcp.billing.prod.svc.cluster.local` (a final dot is optional: names are
    /// always absolute, never searched).
    pub fn service(mut self, taberna: TabernaId, srv_name: impl Into<String>) -> Self {
        self.services.push((taberna, srv_name.into()));
        self
    }

    /// Routes every taberna of a group (the tabernas one kind of domus serves) to `srv_name`.
    pub fn group(
        mut self,
        tabernas: impl IntoIterator<Item = TabernaId>,
        srv_name: impl Into<String>,
    ) -> Self {
        let name = srv_name.into();
        for taberna in tabernas {
            self.services.push((taberna, name.clone()));
        }
        self
    }

    /// Sets [`identity_template`](Self::identity_template).
    pub fn identity_template(mut self, template: impl Into<String>) -> Self {
        self.identity_template = Some(template.into());
        self
    }

    /// Allows only identities matching one of `patterns` for the candidates of `srv_name`
    /// (named as in [`service`](Self::service); may be called again to add patterns). A
    /// pattern is an identity, or a prefix ending in `*`, which matches one or more further
    /// characters other than `/`: `spiffe://prod.example/ns/prod/pod/billing-*` admits
    /// `…/pod/billing-0` but not `…/pod/frontend-0` nor `…/pod/billing-0/x`. A target whose
    /// templated identity no pattern matches is left out of the answer (reported on the
    /// error feed as `ResolverFailed`, like any unusable target); an answer with no allowed
    /// target fails the lookup, which keeps the last good answer. Needs an
    /// [`identity_template`](Self::identity_template).
    pub fn allow_identities(
        mut self,
        srv_name: impl Into<String>,
        patterns: impl IntoIterator<Item = impl Into<String>>,
    ) -> Self {
        let name = srv_name.into();
        for pattern in patterns {
            self.allowed.push((name.clone(), pattern.into()));
        }
        self
    }

    /// Sets [`strict_identities`](Self::strict_identities).
    pub fn strict(mut self) -> Self {
        self.strict_identities = true;
        self
    }

    /// Sets [`query_timeout`](Self::query_timeout).
    pub fn query_timeout(mut self, timeout: Duration) -> Self {
        self.query_timeout = timeout;
        self
    }

    /// Sets [`min_ttl`](Self::min_ttl) and [`max_ttl`](Self::max_ttl).
    pub fn ttl_bounds(mut self, min: Duration, max: Duration) -> Self {
        self.min_ttl = min;
        self.max_ttl = max;
        self
    }

    /// Sets [`negative_ttl`](Self::negative_ttl).
    pub fn negative_ttl(mut self, ttl: Duration) -> Self {
        self.negative_ttl = ttl;
        self
    }

    /// Sets [`retry_interval`](Self::retry_interval).
    pub fn retry_interval(mut self, interval: Duration) -> Self {
        self.retry_interval = interval;
        self
    }

    /// The tabernas routed and the SRV name of each, in the order given.
    pub fn services(&self) -> impl Iterator<Item = (TabernaId, &str)> {
        self.services.iter().map(|(t, n)| (*t, n.as_str()))
    }
}

fn invalid(what: String) -> Error {
    Error::new(ErrorId::InvalidConfig, what)
}

/// A DNS name as given, made absolute.
fn absolute(name: &str) -> Result<Name, Error> {
    let text = if name.ends_with('.') {
        name.to_owned()
    } else {
        format!("{name}.")
    };
    Name::from_utf8(&text)
        .map_err(|e| invalid(format!("\"{}\" is not a DNS name: {e}", untrusted(name))))
}

/// The identity template, split into text and variables once.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Text(String),
    Target,
    Host,
    Service,
    Namespace,
    Port,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Template(Vec<Piece>);

impl Template {
    fn parse(template: &str) -> Result<Self, Error> {
        let mut pieces = Vec::new();
        let mut rest = template;
        while let Some(open) = rest.find('{') {
            let (text, after) = rest.split_at(open);
            if !text.is_empty() {
                pieces.push(Piece::Text(text.to_owned()));
            }
            let after = after.get(1..).unwrap_or_default();
            let Some(close) = after.find('}') else {
                return Err(invalid(format!(
                    "identity template \"{}\": a '{{' is not closed",
                    untrusted(template)
                )));
            };
            let (var, tail) = after.split_at(close);
            pieces.push(match var {
                "target" => Piece::Target,
                "host" => Piece::Host,
                "service" => Piece::Service,
                "namespace" => Piece::Namespace,
                "port" => Piece::Port,
                other => {
                    return Err(invalid(format!(
                        "identity template \"{}\": unknown variable {{{}}} (use {{target}}, \
                         {{host}}, {{service}}, {{namespace}} or {{port}})",
                        untrusted(template),
                        untrusted(other)
                    )));
                }
            });
            rest = tail.get(1..).unwrap_or_default();
        }
        if rest.contains('}') {
            return Err(invalid(format!(
                "identity template \"{}\": a '}}' has no '{{'",
                untrusted(template)
            )));
        }
        if !rest.is_empty() {
            pieces.push(Piece::Text(rest.to_owned()));
        }
        Ok(Self(pieces))
    }

    fn render(&self, srv: &SrvParts, target: &str, port: u16) -> String {
        let host = target.split('.').next().unwrap_or(target);
        let mut out = String::new();
        for piece in &self.0 {
            match piece {
                Piece::Text(t) => out.push_str(t),
                Piece::Target => out.push_str(target),
                Piece::Host => out.push_str(host),
                Piece::Service => out.push_str(&srv.service),
                Piece::Namespace => out.push_str(&srv.namespace),
                Piece::Port => out.push_str(&port.to_string()),
            }
        }
        out
    }
}

/// One pattern of [`DnsSrvConfig::allow_identities`].
#[derive(Debug, Clone, PartialEq, Eq)]
enum Allowed {
    /// This identity.
    Exact(String),
    /// This prefix and one or more characters other than `/`.
    Prefix(String),
}

impl Allowed {
    fn parse(pattern: &str) -> Result<Self, Error> {
        let bad = |why: &str| {
            invalid(format!(
                "identity pattern \"{}\": {why}",
                untrusted(pattern)
            ))
        };
        let (allowed, example) = match pattern.strip_suffix('*') {
            Some("") => return Err(bad("a pattern needs more than '*'")),
            Some(prefix) => (Self::Prefix(prefix.to_owned()), format!("{prefix}x")),
            None => (Self::Exact(pattern.to_owned()), pattern.to_owned()),
        };
        let text = match &allowed {
            Self::Exact(t) | Self::Prefix(t) => t,
        };
        if text.contains('*') {
            return Err(bad("'*' may only end a pattern"));
        }
        DomusId::new(&example).map_err(|e| bad(e.message()))?;
        Ok(allowed)
    }

    fn allows(&self, id: &str) -> bool {
        match self {
            Self::Exact(e) => id == e,
            Self::Prefix(p) => id
                .strip_prefix(p.as_str())
                .is_some_and(|rest| !rest.is_empty() && !rest.contains('/')),
        }
    }
}

/// `{service}` and `{namespace}` as read from an SRV name.
#[derive(Debug, Clone, PartialEq, Eq)]
struct SrvParts {
    service: String,
    namespace: String,
}

impl SrvParts {
    fn of(name: &str) -> Self {
        let labels: Vec<&str> = name.trim_end_matches('.').split('.').collect();
        // `_port._proto.service.namespace.svc.zone…` (Kubernetes), else `_port._proto.service…`.
        let service = labels.get(2).copied().unwrap_or_default().to_owned();
        let namespace = match (labels.get(3), labels.get(4)) {
            (Some(ns), Some(&"svc")) => (*ns).to_owned(),
            _ => String::new(),
        };
        Self { service, namespace }
    }
}

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

/// A [`RouteResolver`] reading replicas from DNS SRV records (see the module docs). Share one
/// per process; build it with [`DnsSrvResolver::new`] inside a tokio runtime.
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
///     .send(billing, MessageType::application(1), invoice, SendOptions::default())
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
        let template = config
            .identity_template
            .as_deref()
            .map(Template::parse)
            .transpose()?;
        let bounded = |what: &str, d: Duration, min: Duration, max: Duration| {
            if d < min || d > max {
                Err(invalid(format!(
                    "DnsSrvConfig::{what} is {d:?}; it must be within {min:?} ..= {max:?}"
                )))
            } else {
                Ok(())
            }
        };
        let ms = Duration::from_millis(1);
        let day = Duration::from_secs(86_400);
        bounded(
            "query_timeout",
            config.query_timeout,
            ms,
            Duration::from_secs(60),
        )?;
        bounded("min_ttl", config.min_ttl, ms, day)?;
        bounded("max_ttl", config.max_ttl, config.min_ttl, day)?;
        bounded("negative_ttl", config.negative_ttl, ms, day)?;
        bounded("retry_interval", config.retry_interval, ms, day)?;
        let mut names: Vec<(Name, String)> = Vec::new();
        let mut services = HashMap::new();
        for (taberna, text) in &config.services {
            let name = absolute(text)?;
            let index = match names.iter().position(|(n, _)| *n == name) {
                Some(i) => i,
                None => {
                    if names.len() >= MAX_NAMES {
                        return Err(invalid(format!(
                            "more than {MAX_NAMES} SRV names in one DnsSrvResolver"
                        )));
                    }
                    names.push((name, text.trim_end_matches('.').to_owned()));
                    names.len().saturating_sub(1)
                }
            };
            if services.insert(*taberna, index).is_some() {
                return Err(invalid(format!(
                    "{taberna} is given two SRV names; a taberna is routed by one"
                )));
            }
        }
        let mut allowed: Vec<Vec<Allowed>> = names.iter().map(|_| Vec::new()).collect();
        for (text, pattern) in &config.allowed {
            let name = absolute(text)?;
            let Some(slot) = names
                .iter()
                .position(|(n, _)| *n == name)
                .and_then(|i| allowed.get_mut(i))
            else {
                return Err(invalid(format!(
                    "allow_identities names \"{}\", which no service or group routes to",
                    untrusted(text)
                )));
            };
            slot.push(Allowed::parse(pattern)?);
        }
        if template.is_none() && !config.allowed.is_empty() {
            return Err(invalid(
                "allow_identities needs an identity_template (without one, candidates name no \
                 identity to check)"
                    .to_owned(),
            ));
        }
        if config.strict_identities {
            if template.is_none() {
                return Err(invalid(
                    "strict_identities needs an identity_template".to_owned(),
                ));
            }
            if let Some(i) = allowed.iter().position(Vec::is_empty) {
                let name = names.get(i).map_or("", |(_, t)| t.as_str());
                return Err(invalid(format!(
                    "strict_identities: {name} has no allow_identities; give the identities \
                     its replicas may have"
                )));
            }
        }
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

    /// Starts a lookup of name `index` on its own task unless one is running; the receiver
    /// turns `true` when its result is stored.
    fn start_lookup(inner: &Arc<Self>, index: usize) -> Option<watch::Receiver<bool>> {
        let rt = tokio::runtime::Handle::try_current().ok()?;
        let (tx, rx) = watch::channel(false);
        {
            let mut entries = inner.entries.lock().unwrap_or_else(PoisonError::into_inner);
            let entry = entries.get_mut(index)?;
            if let Some(running) = &entry.running {
                return Some(running.clone());
            }
            entry.running = Some(rx.clone());
        }
        let weak = Arc::downgrade(inner);
        rt.spawn(async move {
            let Some(inner) = weak.upgrade() else { return };
            // A lookup that ends without storing (a panic in the DNS client, a runtime shutting
            // down) stores a failure instead, so the name is not left "running" for ever.
            let mut guard = StoreOnDrop {
                inner: inner.clone(),
                index,
                stored: false,
            };
            // SRV, then A/AAAA per target not covered by the additional section: bounded as a
            // whole, so a lookup always ends.
            let limit = inner.config.query_timeout.saturating_mul(4);
            let result = match tokio::time::timeout(limit, inner.query(index)).await {
                Ok(result) => result,
                Err(_) => Err(Error::new(
                    ErrorId::ResolverFailed,
                    format!(
                        "the DNS lookup of {} took longer than {limit:?}",
                        inner.names.get(index).map_or("", |(_, t)| t.as_str())
                    ),
                )),
            };
            inner.store(index, result);
            guard.stored = true;
            let _ = tx.send(true);
        });
        Some(rx)
    }

    /// Asks DNS for name `index`: its candidates and how long they hold.
    async fn query(&self, index: usize) -> Result<Answer, Error> {
        let Some((name, text)) = self.names.get(index) else {
            return Ok(Answer::absent(self.config.negative_ttl));
        };
        let srv_parts = SrvParts::of(text);
        let failed = |e: &NetError| {
            Error::new(
                ErrorId::ResolverFailed,
                format!("the DNS lookup of {text} (SRV) failed: {e}"),
            )
        };
        let lookup = match self.dns.srv_lookup(name.clone()).await {
            Ok(lookup) => lookup,
            Err(e) if e.is_nx_domain() || e.is_no_records_found() => {
                return Ok(Answer::absent(self.config.negative_ttl));
            }
            Err(e) => return Err(failed(&e)),
        };
        let now = std::time::Instant::now();
        let mut ttl = lookup.valid_until().saturating_duration_since(now);
        let mut candidates: Vec<Candidate> = Vec::new();
        let mut target_errors: Vec<String> = Vec::new();
        let mut targets = 0usize;
        for record in lookup.answers() {
            let RData::SRV(srv) = &record.data else {
                continue;
            };
            let target = &srv.target;
            if target.is_root() {
                continue;
            }
            targets = targets.saturating_add(1);
            let mut ips: Vec<IpAddr> = lookup
                .additionals()
                .iter()
                .filter(|r| r.name == *target)
                .filter_map(|r| match &r.data {
                    RData::A(a) => Some(IpAddr::V4(a.0)),
                    RData::AAAA(a) => Some(IpAddr::V6(a.0)),
                    _ => None,
                })
                .collect();
            if ips.is_empty() {
                match self.dns.lookup_ip(target.clone()).await {
                    Ok(found) => {
                        ttl = ttl.min(found.valid_until().saturating_duration_since(now));
                        ips.extend(found.iter());
                    }
                    Err(e) if e.is_nx_domain() || e.is_no_records_found() => {}
                    Err(e) => target_errors.push(format!("{target}: {e}")),
                }
            }
            ips.sort_unstable();
            ips.dedup();
            let target_text = target.to_utf8();
            let target_text = target_text.trim_end_matches('.');
            let allowed = self.allowed.get(index).map_or(&[][..], Vec::as_slice);
            let identity = match &self.template {
                Some(t) => {
                    let rendered = t.render(&srv_parts, target_text, srv.port);
                    match DomusId::new(&rendered) {
                        Ok(id)
                            if !allowed.is_empty()
                                && !allowed.iter().any(|a| a.allows(id.as_str())) =>
                        {
                            target_errors.push(format!(
                                "{target_text}: the identity template gives \"{}\", which \
                                 allow_identities does not allow for {text}",
                                untrusted(&rendered)
                            ));
                            continue;
                        }
                        Ok(id) => Some(id),
                        Err(e) => {
                            target_errors.push(format!(
                                "{target_text}: the identity template gives \"{}\", which is \
                                 not a domus identity ({})",
                                untrusted(&rendered),
                                e.message()
                            ));
                            continue;
                        }
                    }
                }
                None => None,
            };
            let count = u16::try_from(ips.len().max(1)).unwrap_or(u16::MAX);
            let share = if srv.weight == 0 {
                0
            } else {
                (srv.weight / count).max(1)
            };
            for ip in ips {
                if candidates.len() >= MAX_CANDIDATES {
                    break;
                }
                candidates.push(Candidate {
                    route: Route {
                        addr: DomusAddr::Tcp(SocketAddr::new(ip, srv.port)),
                        identity: identity.clone(),
                    },
                    priority: srv.priority,
                    weight: share,
                });
            }
        }
        if candidates.is_empty() {
            if !target_errors.is_empty() {
                return Err(Error::new(
                    ErrorId::ResolverFailed,
                    format!(
                        "the DNS lookup of {text} gave {targets} target(s), none usable: {}",
                        target_errors.join("; ")
                    ),
                ));
            }
            return Ok(Answer::absent(self.config.negative_ttl));
        }
        let warning = (!target_errors.is_empty()).then(|| {
            format!(
                "the DNS lookup of {text}: some targets are not used: {}",
                target_errors.join("; ")
            )
        });
        candidates.sort_by(|a, b| {
            (a.priority, a.route.addr.to_string(), a.weight).cmp(&(
                b.priority,
                b.route.addr.to_string(),
                b.weight,
            ))
        });
        Ok(Answer {
            known: Known::Found(Arc::from(candidates)),
            ttl: ttl.clamp(self.config.min_ttl, self.config.max_ttl),
            warning,
        })
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

/// Stores a failure for a lookup whose task ended before it stored its result.
struct StoreOnDrop {
    inner: Arc<Inner>,
    index: usize,
    stored: bool,
}

impl Drop for StoreOnDrop {
    fn drop(&mut self) {
        if !self.stored {
            let name = self
                .inner
                .names
                .get(self.index)
                .map_or("", |(_, t)| t.as_str());
            self.inner.store(
                self.index,
                Err(Error::new(
                    ErrorId::ResolverFailed,
                    format!("the DNS lookup of {name} ended without an answer"),
                )),
            );
        }
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

    fn parts(name: &str) -> SrvParts {
        SrvParts::of(name)
    }

    #[test]
    fn templates_render_kubernetes_names() {
        let t = Template::parse("spiffe://td/ns/{namespace}/sa/{service}/pod/{host}:{port}")
            .expect("parses");
        let srv = parts("_vicus._tcp.billing.prod.svc.cluster.local");
        assert_eq!(srv.service, "billing");
        assert_eq!(srv.namespace, "prod");
        assert_eq!(
            t.render(&srv, "web-0.billing.prod.svc.cluster.local", 7000),
            "spiffe://td/ns/prod/sa/billing/pod/web-0:7000"
        );
        let t = Template::parse("{target}").expect("parses");
        assert_eq!(t.render(&srv, "a.b", 1), "a.b");
    }

    #[test]
    fn names_outside_kubernetes_have_a_service_and_no_namespace() {
        let srv = parts("_vicus._tcp.billing.example.com.");
        assert_eq!(srv.service, "billing");
        assert_eq!(srv.namespace, "");
        let short = parts("billing");
        assert_eq!(short.service, "");
    }

    #[test]
    fn bad_templates_say_what_is_wrong() {
        for (template, says) in [
            ("spiffe://td/{pod}", "unknown variable {pod}"),
            ("spiffe://td/{host", "not closed"),
            ("spiffe://td/host}", "has no '{'"),
        ] {
            let e = Template::parse(template).expect_err(template);
            assert_eq!(e.id(), ErrorId::InvalidConfig);
            assert!(e.message().contains(says), "{template}: {}", e.message());
        }
        assert_eq!(
            Template::parse("plain").expect("parses").0,
            vec![Piece::Text("plain".into())]
        );
    }

    #[test]
    fn identity_patterns_match_one_identity_or_one_final_path_segment() {
        let prefix = Allowed::parse("spiffe://td/ns/prod/pod/billing-*").expect("parses");
        assert!(prefix.allows("spiffe://td/ns/prod/pod/billing-0"));
        assert!(prefix.allows("spiffe://td/ns/prod/pod/billing-abc"));
        for refused in [
            "spiffe://td/ns/prod/pod/billing-",
            "spiffe://td/ns/prod/pod/billing-0/x",
            "spiffe://td/ns/prod/pod/frontend-0",
            "spiffe://td/ns/other/pod/billing-0",
            "spiffe://td/ns/prod/pod/billing",
        ] {
            assert!(!prefix.allows(refused), "{refused}");
        }
        let exact = Allowed::parse("spiffe://td/ns/prod/pod/billing-0").expect("parses");
        assert!(exact.allows("spiffe://td/ns/prod/pod/billing-0"));
        assert!(!exact.allows("spiffe://td/ns/prod/pod/billing-00"));
        for (pattern, says) in [
            ("*", "more than '*'"),
            ("spiffe://td/*/pod/x", "may only end"),
            ("spiffe://td/ns/**", "may only end"),
            ("not an identity", "not a valid domus id"),
        ] {
            let e = Allowed::parse(pattern).expect_err(pattern);
            assert_eq!(e.id(), ErrorId::InvalidConfig);
            assert!(e.message().contains(says), "{pattern}: {}", e.message());
        }
    }

    #[tokio::test]
    async fn a_lookup_task_that_dies_leaves_a_failure_not_a_name_running_for_ever() {
        let server: SocketAddr = "127.0.0.1:9".parse().expect("addr");
        let r = DnsSrvResolver::new(
            DnsSrvConfig::new()
                .name_server(server)
                .service(TabernaId(1), "_vicus._tcp.x.test"),
        )
        .expect("builds");
        let (_tx, rx) = watch::channel(false);
        r.inner.entries.lock().expect("entries")[0].running = Some(rx);
        drop(StoreOnDrop {
            inner: r.inner.clone(),
            index: 0,
            stored: false,
        });
        let entries = r.inner.entries.lock().expect("entries");
        assert!(entries[0].running.is_none(), "no longer running");
        let failing = entries[0].failing.as_ref().expect("a failure is kept");
        assert_eq!(failing.id(), ErrorId::ResolverFailed);
        assert!(failing.message().contains("without an answer"), "{failing}");
    }

    #[tokio::test]
    async fn a_config_is_checked_when_the_resolver_is_built() {
        let server: SocketAddr = "127.0.0.1:53".parse().expect("addr");
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
