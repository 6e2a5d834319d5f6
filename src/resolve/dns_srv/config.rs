//! What a [`DnsSrvResolver`](super::DnsSrvResolver) asks and how ([`DnsSrvConfig`]), its
//! checks, and the pure pieces a lookup uses: the identity template, the identity patterns
//! of `allow_identities`, and the `{service}`/`{namespace}` parts of an SRV name.
//!
//! Pure: no IO, no clock, no DNS. It must not accept a configuration the resolver cannot
//! bound (names, durations) or a template or pattern that could name more than it says.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use hickory_resolver::proto::rr::Name;

use super::MAX_NAMES;
use crate::a0_transport::DomusId;
use crate::error::{Error, ErrorId, untrusted};
use crate::taberna::TabernaId;

/// What a [`DnsSrvResolver`](super::DnsSrvResolver) asks and how. Build with
/// [`DnsSrvConfig::new`] and the setters; checked by
/// [`DnsSrvResolver::new`](super::DnsSrvResolver::new).
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
    /// `{namespace}` from this configuration: see the [module docs](crate::resolve::dns_srv)
    /// for what that lets DNS decide, and [`allow_identities`](Self::allow_identities) to
    /// narrow it.
    pub identity_template: Option<String>,
    /// Refuse to build unless every SRV name has an allow-list
    /// ([`allow_identities`](Self::allow_identities)) and an identity template is set, so no
    /// name can route to an identity DNS chose freely. Default `false`; the setting for
    /// strict setups (see the [module docs](crate::resolve::dns_srv)).
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
    /// Topic pattern → the SRV name listing its publishers.
    topics: Vec<(String, String)>,
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
            topics: Vec::new(),
            allowed: Vec::new(),
        }
    }

    /// Lists the domus under the SRV name `srv_name` as the publishers of topics `pattern`
    /// matches ([`RouteResolver::topic_publishers`](crate::RouteResolver::topic_publishers)):
    /// their identities are the template's for each target, so this needs an
    /// [`identity_template`](Self::identity_template). The name is looked up and refreshed
    /// like a service's.
    pub fn topic(mut self, pattern: impl Into<String>, srv_name: impl Into<String>) -> Self {
        self.topics.push((pattern.into(), srv_name.into()));
        self
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

pub(super) fn invalid(what: String) -> Error {
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
pub(super) struct Template(Vec<Piece>);

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

    pub(super) fn render(&self, srv: &SrvParts, target: &str, port: u16) -> String {
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
pub(super) enum Allowed {
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

    pub(super) fn allows(&self, id: &str) -> bool {
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
pub(super) struct SrvParts {
    service: String,
    namespace: String,
}

impl SrvParts {
    pub(super) fn of(name: &str) -> Self {
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

/// The index of the SRV name `text` in `names`, added (absolute, each once) if new; at most
/// [`MAX_NAMES`] names.
fn name_index(names: &mut Vec<(Name, String)>, text: &str) -> Result<usize, Error> {
    let name = absolute(text)?;
    if let Some(i) = names.iter().position(|(n, _)| *n == name) {
        return Ok(i);
    }
    if names.len() >= MAX_NAMES {
        return Err(invalid(format!(
            "more than {MAX_NAMES} SRV names in one DnsSrvResolver"
        )));
    }
    names.push((name, text.trim_end_matches('.').to_owned()));
    Ok(names.len().saturating_sub(1))
}

/// A configuration that passed [`DnsSrvConfig::check`]: what a resolver is built from.
pub(super) struct Checked {
    pub(super) template: Option<Template>,
    /// The SRV names, absolute and as given (without a final dot), each once.
    pub(super) names: Vec<(Name, String)>,
    /// Taberna → index into `names`.
    pub(super) services: HashMap<TabernaId, usize>,
    /// Per name (as `names`): the identities its candidates may have; empty: any.
    pub(super) allowed: Vec<Vec<Allowed>>,
    /// Topic pattern → index into `names` (its publishers).
    pub(super) topics: Vec<(String, usize)>,
}

impl DnsSrvConfig {
    /// Checks the whole configuration (bounds, names, template, patterns, strictness) without
    /// any IO: what [`DnsSrvResolver::new`](super::DnsSrvResolver::new) refuses with
    /// `InvalidConfig`.
    pub(super) fn check(&self) -> Result<Checked, Error> {
        let template = self
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
            self.query_timeout,
            ms,
            Duration::from_secs(60),
        )?;
        bounded("min_ttl", self.min_ttl, ms, day)?;
        bounded("max_ttl", self.max_ttl, self.min_ttl, day)?;
        bounded("negative_ttl", self.negative_ttl, ms, day)?;
        bounded("retry_interval", self.retry_interval, ms, day)?;
        let mut names: Vec<(Name, String)> = Vec::new();
        let mut services = HashMap::new();
        for (taberna, text) in &self.services {
            let index = name_index(&mut names, text)?;
            if services.insert(*taberna, index).is_some() {
                return Err(invalid(format!(
                    "{taberna} is given two SRV names; a taberna is routed by one"
                )));
            }
        }
        let mut topics = Vec::with_capacity(self.topics.len());
        for (pattern, text) in &self.topics {
            if pattern.is_empty() || pattern.len() > 256 {
                return Err(invalid(format!(
                    "topic pattern \"{}\" must be 1 to 256 bytes",
                    untrusted(pattern)
                )));
            }
            topics.push((pattern.clone(), name_index(&mut names, text)?));
        }
        if template.is_none() && !topics.is_empty() {
            return Err(invalid(
                "topic needs an identity_template (publishers are named by identity)".to_owned(),
            ));
        }
        let mut allowed: Vec<Vec<Allowed>> = names.iter().map(|_| Vec::new()).collect();
        for (text, pattern) in &self.allowed {
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
        if template.is_none() && !self.allowed.is_empty() {
            return Err(invalid(
                "allow_identities needs an identity_template (without one, candidates name no \
                 identity to check)"
                    .to_owned(),
            ));
        }
        if self.strict_identities {
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
        Ok(Checked {
            template,
            names,
            services,
            allowed,
            topics,
        })
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
}
