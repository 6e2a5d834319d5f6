//! `vicus node --config node.toml`: a domus run from a config file, with tabernas that have a
//! built-in behaviour (echo, sink, log, forward), routes from the file, a routes file or DNS
//! SRV, certificates reloaded when they change, and the reporting service for `vicus top`.
//! It prints one line when it is up (identity and address), then the domus's events and
//! errors, and shuts down cleanly on Ctrl-C or SIGTERM.
//!
//! The config is checked completely before anything starts: unknown keys, bad values, missing
//! certificate files are one-line errors naming the file, the line and the key. This module
//! reads the config and the certificates; everything else is the library's.

use std::io::Read;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use clap::Args;
use serde::Deserialize;
use serde_json::json;
use tokio::io::AsyncReadExt;
use tokio::signal::unix::{SignalKind, signal};
use tokio::task::JoinSet;
use toml::Spanned;
use vicus::reporting::{CallisKind, Event, FeedItem, SequencedError};
use vicus::watch::WatchConfig;
use vicus::{
    AuthConfig, BlobReceiver, Delivery, DnsSrvConfig, DnsSrvResolver, Domus, DomusAddr, DomusId,
    ErrorId, FileResolver, RouteResolver, SendOptions, SimpleResolver, TabernaId, TabernaRequest,
};

use crate::client::{check_readable, parse_duration};
use crate::output::{CliError, Output};

/// The longest config file read.
const MAX_CONFIG_LEN: u64 = 1 << 20;
/// How often a routes file is polled for changes.
const ROUTES_FILE_INTERVAL: Duration = Duration::from_secs(1);
/// How many payload bytes a `log` taberna shows.
const LOG_HEAD_LEN: usize = 32;
/// The most blob readers and forwards one taberna runs at once.
const MAX_WORK_PER_TABERNA: usize = 1024;
/// How long after the domus's own `shutdown_timeout` the node gives up waiting.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// `vicus node`.
#[derive(Debug, Args)]
#[command(after_help = NODE_HELP)]
pub struct NodeArgs {
    /// The node's config file (TOML; the format is below and in vicus-cli/examples/node.toml).
    #[arg(long, short, value_name = "FILE")]
    config: PathBuf,
}

const NODE_HELP: &str = r#"Example:
  vicus certs init --dir certs && vicus certs issue alpha --dir certs
  vicus node --config node.toml

node.toml (paths are relative to the config file's directory; top-level keys come before
the first [table]; any key not listed here is an error):

  bind = "127.0.0.1:7000"          # or "0.0.0.0:7000", "[::1]:7000", "unix:/run/vicus/a.sock"
  # routes_file = "routes.toml"    # routes from a file, reloaded when it changes (see below)

  [tls]
  ca = "certs/ca.pem"              # the CA bundle peers must chain to
  cert = "certs/alpha.pem"         # this node's certificate (its URI SAN is its identity)
  key = "certs/alpha.key"
  watch = true                     # reload the three files when they change (default false)
  # watch_interval = "1s"          # how often they are read (default 1s)

  [[taberna]]                      # an endpoint; as many as you like, each id once
  id = 7
  behaviour = "echo"               # echo: reply with the payload
                                   # sink: accept; log: print sender, size, first bytes; accept
                                   # forward: send it on to taberna `to` and relay the answer
  [[taberna]]
  id = 9
  behaviour = "forward"
  to = 20                          # routed by the routes below

  [[route]]                        # where other tabernas live (or routes_file, or [dns])
  taberna = 20
  addr = "127.0.0.1:7001"
  identity = "spiffe://vicus.dev/domus/beta"   # optional: pinned at the first dial without it

  # [dns]                          # routes from DNS SRV records instead
  # name_servers = ["10.96.0.10:53"]          # optional: default the system's resolv.conf
  # identity_template = "spiffe://acme.test/domus/{host}"
  # services = [{ taberna = 20, srv = "_vicus._tcp.beta.default.svc.cluster.local" }]
  # topics = [{ pattern = "orders.>", srv = "_vicus._tcp.orders.default.svc.cluster.local" }]
                                   # the publishers of a topic (needs identity_template)

  [reporting]                      # optional: serve reports to these identities (vicus top)
  allow = ["spiffe://vicus.dev/domus/ops"]

  [topics]                         # optional: publish/subscribe (vicus::services::topics)
  publishers = []                  # also announce subscriptions to these identities
  # lease = "30s"                  # subscriptions are renewed every third of it
  subscribe = [{ pattern = "orders.>", behaviour = "log" }]   # log, sink or echo
  # rules = [{ action = "publish", topics = ">", who = "*" }] # who: "*", an identity, or a
                                   # prefix ending in *; default: any authenticated peer may
                                   # publish and subscribe to anything
  [[taberna]]
  id = 12
  behaviour = "publish"            # publish each message to `topic`; reply with a summary
  topic = "orders.new"             # ({"topic","recipients","delivered"}); needs [topics]

  [http]                           # optional: the HTTP gateway (vicus::gateway)
  bind = "127.0.0.1:7080"          # the default; any other than loopback needs tokens
  token_file = "http-tokens"       # one bearer token a line (16+ visible ASCII characters);
                                   # or tokens = ["…"]; none: no token needed (loopback only)
  # max_concurrent = 256           # requests at once; more: 503 + Retry-After
  # request_timeout = "30s"        # the body must arrive within it; caps the send's timeout
  # detailed_errors = false        # true: vicus's own messages (peers, addresses) in errors
  # client_identities = ["spiffe://vicus.dev/domus/client"]
                                   # HTTPS instead, with the [tls] files: clients present a
                                   # certificate of the CA naming one of these identities
                                   # (issue this node's with --host 127.0.0.1 for curl)

Blobs sent to echo, sink or log are read to their end and counted (log prints them); forward
refuses blobs. The routes file has the format of vicus::FileResolver ([[taberna]] id and
candidates = [{ addr, identity, priority, weight }]; [[domus]] identity and addr; [[topic]]
pattern and publishers = [identities], whom [topics] announces subscriptions to). Use at
most one of [[route]], routes_file and [dns].

HTTP: POST /tabernas/{id} sends the body to taberna id (message type in the
Vicus-Message-Type header or ?type=, e.g. app:1) and answers 200 with the reply, 204 when
accepted, or the error's status with JSON; Prefer: respond-async answers 202 at once and the
outcome is printed as an event; a Vicus-Blob: <base64 header> header streams the body as a
blob. GET /healthz, GET /metrics (Prometheus text). E.g.
  curl -H 'Authorization: Bearer …' -H 'Vicus-Message-Type: app:1' \
       --data-binary 'hello' http://127.0.0.1:7080/tabernas/7

Output: one line when the node is up ("… listening on ADDR"), then a line per event and error
of the domus; with --json one JSON object per line ({"event":"started","identity":…,"addr":…}
first). Ctrl-C or SIGTERM shuts the node down cleanly (exit 0); a second one gives up waiting."#;

// ---- the config file ----------------------------------------------------------------------

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    bind: Spanned<String>,
    tls: Spanned<RawTls>,
    #[serde(default)]
    taberna: Vec<Spanned<RawTaberna>>,
    #[serde(default)]
    route: Vec<Spanned<RawRoute>>,
    routes_file: Option<Spanned<String>>,
    dns: Option<Spanned<RawDns>>,
    reporting: Option<Spanned<RawReporting>>,
    http: Option<Spanned<crate::http::RawHttp>>,
    topics: Option<Spanned<crate::node_topics::RawTopics>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    ca: Spanned<String>,
    cert: Spanned<String>,
    key: Spanned<String>,
    #[serde(default)]
    watch: bool,
    watch_interval: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTaberna {
    id: u64,
    #[serde(alias = "behavior")]
    behaviour: Behaviour,
    to: Option<u64>,
    topic: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    taberna: u64,
    addr: Spanned<String>,
    identity: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDns {
    #[serde(default)]
    name_servers: Vec<Spanned<String>>,
    identity_template: Option<String>,
    services: Vec<RawDnsService>,
    #[serde(default)]
    topics: Vec<RawDnsTopic>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDnsTopic {
    pattern: String,
    srv: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDnsService {
    taberna: u64,
    srv: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawReporting {
    allow: Vec<Spanned<String>>,
}

/// What a taberna of the node does with a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Behaviour {
    /// Replies with the payload.
    Echo,
    /// Accepts.
    Sink,
    /// Prints who sent how much, and the first bytes; accepts.
    Log,
    /// Sends the request on to another taberna and relays its answer.
    Forward,
    /// Publishes the request to a topic (needs `[topics]`) and replies with how many
    /// subscribers took it.
    Publish,
}

impl Behaviour {
    fn name(self) -> &'static str {
        match self {
            Self::Echo => "echo",
            Self::Sink => "sink",
            Self::Log => "log",
            Self::Forward => "forward",
            Self::Publish => "publish",
        }
    }
}

/// A checked config: every value parsed, every path resolved.
#[derive(Debug)]
struct NodeConfig {
    bind: DomusAddr,
    tls: Tls,
    tabernas: Vec<TabernaSpec>,
    routes: Routes,
    reporting_allow: Option<Vec<DomusId>>,
    http: Option<crate::http::Http>,
    topics: Option<crate::node_topics::TopicsSpec>,
    /// The topics of `publish` tabernas (each spec's `topic` indexes this).
    publish_topics: Vec<String>,
}

#[derive(Debug)]
struct Tls {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    /// `Some(interval)` when the files are watched.
    watch: Option<Duration>,
}

#[derive(Debug, Clone, Copy)]
struct TabernaSpec {
    id: TabernaId,
    behaviour: Behaviour,
    /// For `forward`: where to.
    to: Option<TabernaId>,
    /// For `publish`: the topic, as an index into `NodeConfig::publish_topics`.
    topic: Option<usize>,
}

#[derive(Debug)]
enum Routes {
    None,
    Static(Vec<(TabernaId, DomusAddr, Option<DomusId>)>),
    File(PathBuf),
    Dns(DnsSrvConfig),
}

impl Routes {
    fn describe(&self) -> String {
        match self {
            Self::None => "no routes".to_owned(),
            Self::Static(r) => format!("{} static route(s)", r.len()),
            Self::File(path) => format!("routes from {}", path.display()),
            Self::Dns(c) => format!("{} DNS SRV service(s)", c.services().count()),
        }
    }
}

/// The config file's text, for errors that name a line.
struct Source<'a> {
    path: &'a Path,
    text: &'a str,
}

impl Source<'_> {
    fn line_of(&self, span: &Range<usize>) -> usize {
        let end = span.start.min(self.text.len());
        self.text.as_bytes()[..end]
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
            + 1
    }

    /// An error about the value at `span`.
    fn at(&self, span: &Range<usize>, message: impl std::fmt::Display) -> CliError {
        CliError::new(format!(
            "{}:{}: {message}",
            self.path.display(),
            self.line_of(span)
        ))
    }

    /// A path from the file, relative to the file's directory.
    fn path(&self, value: &str) -> PathBuf {
        let value = Path::new(value);
        if value.is_absolute() {
            return value.to_path_buf();
        }
        match self.path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir.join(value),
            _ => value.to_path_buf(),
        }
    }
}

/// Reads and checks the config at `path`.
fn load(path: &Path) -> Result<NodeConfig, CliError> {
    let mut text = String::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_CONFIG_LEN + 1).read_to_string(&mut text))
        .map_err(|e| CliError::new(format!("--config {}: {e}", path.display())))?;
    if text.len() as u64 > MAX_CONFIG_LEN {
        return Err(CliError::new(format!(
            "--config {}: larger than {MAX_CONFIG_LEN} bytes; is it really a node config?",
            path.display()
        )));
    }
    let src = Source { path, text: &text };
    let raw: RawConfig = toml::from_str(&text).map_err(|e| {
        let message = e.message().trim_end().replace('\n', "; ");
        match e.span() {
            Some(span) => src.at(&span, message),
            None => CliError::new(format!("{}: {message}", path.display())),
        }
    })?;
    check(&src, raw)
}

fn check(src: &Source<'_>, raw: RawConfig) -> Result<NodeConfig, CliError> {
    let bind = raw
        .bind
        .get_ref()
        .parse::<DomusAddr>()
        .map_err(|e| src.at(&raw.bind.span(), format!("bind: {}", e.message())))?;

    let raw_tls = raw.tls.into_inner();
    let file = |value: &Spanned<String>, key: &str| -> Result<PathBuf, CliError> {
        let path = src.path(value.get_ref());
        check_readable(&path, &format!("[tls] {key}")).map_err(|e| src.at(&value.span(), e))?;
        Ok(path)
    };
    let tls = Tls {
        ca: file(&raw_tls.ca, "ca")?,
        cert: file(&raw_tls.cert, "cert")?,
        key: file(&raw_tls.key, "key")?,
        watch: match (raw_tls.watch, &raw_tls.watch_interval) {
            (false, None) => None,
            (false, Some(interval)) => {
                return Err(src.at(
                    &interval.span(),
                    "[tls] watch_interval is set but watch is not: add watch = true",
                ));
            }
            (true, None) => Some(vicus::watch::DEFAULT_INTERVAL),
            (true, Some(interval)) => Some(
                parse_duration(interval.get_ref())
                    .map_err(|e| src.at(&interval.span(), format!("[tls] watch_interval: {e}")))?,
            ),
        },
    };

    let mut tabernas: Vec<TabernaSpec> = Vec::with_capacity(raw.taberna.len());
    let mut publish_topics: Vec<String> = Vec::new();
    for t in &raw.taberna {
        let span = t.span();
        let t = t.get_ref();
        if tabernas.iter().any(|s| s.id.0 == t.id) {
            return Err(src.at(
                &span,
                format!(
                    "[[taberna]] id = {} is listed twice: give each taberna its own id",
                    t.id
                ),
            ));
        }
        let to = match (t.behaviour, t.to) {
            (Behaviour::Forward, Some(to)) if to == t.id => {
                return Err(src.at(
                    &span,
                    "[[taberna]] forward to itself would loop: change `to`",
                ));
            }
            (Behaviour::Forward, Some(to)) => Some(TabernaId(to)),
            (Behaviour::Forward, None) => {
                return Err(src.at(
                    &span,
                    format!(
                        "[[taberna]] id = {}: behaviour \"forward\" needs `to = <taberna id>`",
                        t.id
                    ),
                ));
            }
            (other, Some(_)) => {
                return Err(src.at(
                    &span,
                    format!(
                        "[[taberna]] id = {}: `to` is only for behaviour \"forward\", not \"{}\"",
                        t.id,
                        other.name()
                    ),
                ));
            }
            (_, None) => None,
        };
        let topic = match (t.behaviour, &t.topic) {
            (Behaviour::Publish, Some(topic)) => {
                if raw.topics.is_none() {
                    return Err(src.at(
                        &span,
                        format!(
                            "[[taberna]] id = {}: behaviour \"publish\" needs a [topics] table",
                            t.id
                        ),
                    ));
                }
                vicus::services::topics::Topic::new(topic.get_ref().as_str())
                    .map_err(|e| src.at(&topic.span(), format!("[[taberna]] topic: {e}")))?;
                publish_topics.push(topic.get_ref().clone());
                Some(publish_topics.len() - 1)
            }
            (Behaviour::Publish, None) => {
                return Err(src.at(
                    &span,
                    format!(
                        "[[taberna]] id = {}: behaviour \"publish\" needs `topic = \"a.b\"`",
                        t.id
                    ),
                ));
            }
            (other, Some(topic)) => {
                return Err(src.at(
                    &topic.span(),
                    format!(
                        "[[taberna]] id = {}: `topic` is only for behaviour \"publish\", not \"{}\"",
                        t.id,
                        other.name()
                    ),
                ));
            }
            (_, None) => None,
        };
        tabernas.push(TabernaSpec {
            id: TabernaId(t.id),
            behaviour: t.behaviour,
            to,
            topic,
        });
    }

    let sources = usize::from(!raw.route.is_empty())
        + usize::from(raw.routes_file.is_some())
        + usize::from(raw.dns.is_some());
    if sources > 1 {
        return Err(CliError::new(format!(
            "{}: use one source of routes: [[route]] tables, routes_file or [dns], not several",
            src.path.display()
        )));
    }
    let routes = if let Some(file) = &raw.routes_file {
        Routes::File(src.path(file.get_ref()))
    } else if let Some(dns) = raw.dns {
        let span = dns.span();
        let dns = dns.into_inner();
        let mut config = DnsSrvConfig::new();
        for server in &dns.name_servers {
            let addr: SocketAddr = server.get_ref().parse().map_err(|_| {
                src.at(
                    &server.span(),
                    format!(
                        "[dns] name_servers: {:?} is not ip:port (e.g. \"10.96.0.10:53\")",
                        server.get_ref()
                    ),
                )
            })?;
            config = config.name_server(addr);
        }
        if let Some(template) = dns.identity_template {
            config = config.identity_template(template);
        }
        if dns.services.is_empty() {
            return Err(src.at(
                &span,
                "[dns] services is empty: list { taberna, srv } pairs",
            ));
        }
        for service in dns.services {
            config = config.service(TabernaId(service.taberna), service.srv);
        }
        for topic in dns.topics {
            config = config.topic(topic.pattern, topic.srv);
        }
        Routes::Dns(config)
    } else if raw.route.is_empty() {
        Routes::None
    } else {
        let mut routes: Vec<(TabernaId, DomusAddr, Option<DomusId>)> = Vec::new();
        for r in &raw.route {
            let span = r.span();
            let r = r.get_ref();
            if routes.iter().any(|(t, _, _)| t.0 == r.taberna) {
                return Err(src.at(
                    &span,
                    format!(
                        "[[route]] taberna = {} is listed twice: list replicas in a routes_file",
                        r.taberna
                    ),
                ));
            }
            let addr =
                r.addr.get_ref().parse::<DomusAddr>().map_err(|e| {
                    src.at(&r.addr.span(), format!("[[route]] addr: {}", e.message()))
                })?;
            let identity = match &r.identity {
                Some(id) => Some(DomusId::new(id.get_ref()).map_err(|e| {
                    src.at(&id.span(), format!("[[route]] identity: {}", e.message()))
                })?),
                None => None,
            };
            routes.push((TabernaId(r.taberna), addr, identity));
        }
        Routes::Static(routes)
    };

    let reporting_allow = match raw.reporting {
        None => None,
        Some(reporting) => {
            let span = reporting.span();
            let mut allow = Vec::new();
            for id in &reporting.get_ref().allow {
                allow.push(DomusId::new(id.get_ref()).map_err(|e| {
                    src.at(&id.span(), format!("[reporting] allow: {}", e.message()))
                })?);
            }
            if allow.is_empty() {
                return Err(src.at(
                    &span,
                    "[reporting] allow is empty: name the identities that may read reports, or \
                     remove the section",
                ));
            }
            Some(allow)
        }
    };

    let http = match raw.http {
        None => None,
        Some(http) => Some(crate::http::check(
            http.into_inner(),
            &|span, message| src.at(span, message),
            &|value| src.path(value),
        )?),
    };

    let topics = match raw.topics {
        Some(table) => Some(crate::node_topics::check(table, &|span, message| {
            src.at(span, message)
        })?),
        None => None,
    };
    Ok(NodeConfig {
        bind,
        tls,
        tabernas,
        routes,
        reporting_allow,
        http,
        topics,
        publish_topics,
    })
}

/// The watcher's view of the three TLS files: their nearest common directory and their names
/// under it. Paths are not canonicalised: a Kubernetes volume's symlinks must be followed
/// afresh on every poll.
fn watch_config(tls: &Tls, interval: Duration) -> WatchConfig {
    let mut dir = tls.cert.parent().unwrap_or(Path::new("")).to_path_buf();
    while !(tls.ca.starts_with(&dir) && tls.key.starts_with(&dir)) {
        if !dir.pop() {
            break;
        }
    }
    let name = |path: &Path| path.strip_prefix(&dir).unwrap_or(path).to_path_buf();
    let shown_dir = if dir.as_os_str().is_empty() {
        PathBuf::from(".")
    } else {
        dir.clone()
    };
    WatchConfig::new(shown_dir)
        .ca_file(name(&tls.ca))
        .cert_file(name(&tls.cert))
        .key_file(name(&tls.key))
        .interval(interval)
}

// ---- running ------------------------------------------------------------------------------

/// What a taberna handled, printed when the node stops.
#[derive(Debug, Default)]
struct Tally {
    messages: AtomicU64,
    bytes: AtomicU64,
    blobs: AtomicU64,
    blob_bytes: AtomicU64,
    blobs_failed: AtomicU64,
}

fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

/// Runs `vicus node`.
pub async fn run(args: NodeArgs, out: Output) -> Result<(), CliError> {
    // Signals first: a SIGTERM that comes right after the "started" line is not lost.
    let mut sigterm = signal(SignalKind::terminate())
        .map_err(|e| CliError::new(format!("cannot handle SIGTERM: {e}")))?;
    let mut sigint = signal(SignalKind::interrupt())
        .map_err(|e| CliError::new(format!("cannot handle Ctrl-C: {e}")))?;

    let mut config = load(&args.config)?;
    let cfg = args.config.display().to_string();
    let auth = AuthConfig::from_pem_files(&config.tls.ca, &config.tls.cert, &config.tls.key)
        .map_err(|e| CliError::new(format!("{cfg}: [tls]: {e}")))?;

    // The routes file is watched for as long as the node runs (`_routes_watch`).
    let mut _routes_watch = None;
    let resolver: Arc<dyn RouteResolver> = match &config.routes {
        Routes::None => Arc::new(SimpleResolver::new()),
        Routes::Static(routes) => {
            let resolver = SimpleResolver::new();
            for (taberna, addr, identity) in routes {
                resolver.insert(*taberna, addr.clone(), identity.clone());
            }
            Arc::new(resolver)
        }
        Routes::File(path) => {
            let resolver = FileResolver::open(path)
                .map_err(|e| CliError::new(format!("{cfg}: routes_file: {e}")))?;
            _routes_watch = Some(
                resolver
                    .watch(ROUTES_FILE_INTERVAL)
                    .map_err(|e| CliError::new(format!("{cfg}: routes_file: {e}")))?,
            );
            resolver
        }
        Routes::Dns(dns) => Arc::new(
            DnsSrvResolver::new(dns.clone())
                .map_err(|e| CliError::new(format!("{cfg}: [dns]: {e}")))?,
        ),
    };

    let domus = Domus::builder(auth)
        .bind(config.bind.clone())
        .resolver(resolver)
        .build()
        .await
        .map_err(|e| match e.id() {
            // The material parsed but is unusable together (a key of another certificate, a
            // chain the CA does not verify, an expired certificate).
            ErrorId::InvalidAuthMaterial | ErrorId::InvalidDomusId => {
                CliError::new(format!("{cfg}: [tls]: {e}"))
            }
            _ => CliError::new(format!(
                "cannot start the node on {} (bind in {cfg}): {e}",
                config.bind
            )),
        })?;
    let reporting = domus.reporting();
    let mut events = reporting.events();
    let mut errors = reporting.errors();

    let mut handlers = JoinSet::new();
    let topics = match config.topics.take() {
        Some(spec) => {
            let described = spec.describe();
            let topics = crate::node_topics::start(&domus, spec, out, &mut handlers)
                .await
                .map_err(|e| CliError::new(format!("{cfg}: [topics]: {e}")))?;
            Some((topics, described))
        }
        None => None,
    };
    let mut tallies = Vec::new();
    for spec in &config.tabernas {
        let publisher = match (spec.topic, &topics) {
            (Some(i), Some((topics, _))) => Some(
                topics
                    .publisher(&config.publish_topics[i])
                    .map_err(|e| CliError::new(format!("{cfg}: [[taberna]] topic: {e}")))?,
            ),
            _ => None,
        };
        let taberna = domus
            .taberna(spec.id)
            .map_err(|e| CliError::new(format!("{cfg}: [[taberna]] id = {}: {e}", spec.id.0)))?;
        let tally = Arc::new(Tally::default());
        tallies.push((*spec, tally.clone()));
        let domus = domus.clone();
        let spec = *spec;
        handlers.spawn(async move {
            // Blob readers and forwards in progress: at most MAX_WORK_PER_TABERNA, so a
            // flood waits in the taberna's bounded inbox (and is refused as TabernaBusy
            // there) instead of piling up tasks here.
            let mut work = JoinSet::new();
            while let Some(request) = taberna.recv().await {
                while work.try_join_next().is_some() {}
                while work.len() >= MAX_WORK_PER_TABERNA {
                    let _ = work.join_next().await;
                }
                handle(
                    &domus,
                    spec,
                    publisher.as_ref(),
                    &tally,
                    request,
                    out,
                    &mut work,
                );
            }
            while work.join_next().await.is_some() {}
        });
    }

    let _watch = match config.tls.watch {
        Some(interval) => {
            let watch = watch_config(&config.tls, interval);
            Some(
                vicus::watch::spawn(&domus, watch)
                    .map_err(|e| CliError::new(format!("{cfg}: [tls] watch: {e}")))?,
            )
        }
        None => None,
    };
    let _reporting_service = match &config.reporting_allow {
        Some(allow) => Some(
            vicus::services::reporting::serve(&domus, allow.iter().cloned())
                .map_err(|e| CliError::new(format!("{cfg}: [reporting]: {e}")))?,
        ),
        None => None,
    };

    let http = match config.http.take() {
        Some(http) => {
            let tls = &config.tls;
            let auth = || {
                AuthConfig::from_pem_files(&tls.ca, &tls.cert, &tls.key)
                    .map_err(|e| CliError::new(format!("[tls]: {e}")))
            };
            Some(
                crate::http::start(&domus, http, auth)
                    .await
                    .map_err(|e| CliError::new(format!("{cfg}: {e}")))?,
            )
        }
        None => None,
    };
    let http_addr = http.as_ref().map(|h| h.addr.to_string());
    let http_scheme = if http.as_ref().is_some_and(|h| h.https) {
        "https"
    } else {
        "http"
    };

    let addr = domus
        .local_addr()
        .map(ToString::to_string)
        .unwrap_or_default();
    let taberna_list: Vec<String> = config
        .tabernas
        .iter()
        .map(|t| match (t.to, t.topic) {
            (Some(to), _) => format!("{} forward to {}", t.id.0, to.0),
            (_, Some(i)) => format!("{} publish to {}", t.id.0, config.publish_topics[i]),
            _ => format!("{} {}", t.id.0, t.behaviour.name()),
        })
        .collect();
    let topic_subscriptions = topics.as_ref().map(|(_, described)| described.clone());
    out.result(
        &format!(
            "vicus node {} listening on {addr} (tabernas: {}; {}{}{}{}{})",
            out.bold(domus.identity().as_str()),
            if taberna_list.is_empty() {
                "none".to_owned()
            } else {
                taberna_list.join(", ")
            },
            config.routes.describe(),
            if config.tls.watch.is_some() {
                "; certificates watched"
            } else {
                ""
            },
            if config.reporting_allow.is_some() {
                "; reporting service on"
            } else {
                ""
            },
            http_addr
                .as_ref()
                .map(|a| format!("; HTTP gateway on {http_scheme}://{a}"))
                .unwrap_or_default(),
            topic_subscriptions
                .as_ref()
                .map(|s| format!(
                    "; topics on, subscribed: {}",
                    if s.is_empty() {
                        "none".to_owned()
                    } else {
                        s.join(", ")
                    }
                ))
                .unwrap_or_default(),
        ),
        &json!({
            "event": "started",
            "identity": domus.identity().as_str(),
            "addr": addr,
            "tabernas": config.tabernas.iter().map(|t| json!({
                "id": t.id.0,
                "behaviour": t.behaviour.name(),
                "to": t.to.map(|to| to.0),
                "topic": t.topic.map(|i| config.publish_topics[i].clone()),
            })).collect::<Vec<_>>(),
            "topics": topic_subscriptions,
            "routes": config.routes.describe(),
            "watch": config.tls.watch.is_some(),
            "reporting": config.reporting_allow.is_some(),
            "http": http_addr,
            "https": http_addr.is_some() && http_scheme == "https",
        }),
    );

    let why = loop {
        tokio::select! {
            Some(item) = events.recv() => print_event(out, item),
            Some(item) = errors.recv() => print_error(out, item),
            _ = sigterm.recv() => break "SIGTERM",
            _ = sigint.recv() => break "SIGINT",
        }
    };
    out.result(
        &format!("stopping ({why}): finishing what is in flight"),
        &json!({ "event": "stopping", "signal": why }),
    );
    // No new HTTP requests; those in progress end with the connections (their sends go on).
    if let Some(http) = http {
        http.stop().await;
    }
    let bound = domus.config().snapshot().shutdown_timeout + SHUTDOWN_GRACE;
    let shutdown = tokio::time::timeout(bound, domus.shutdown());
    tokio::pin!(shutdown);
    let finished = loop {
        tokio::select! {
            done = &mut shutdown => break done.map_err(|_| CliError::new(format!(
                "the shutdown did not finish within {bound:?}; stopped anyway"
            ))),
            Some(item) = events.recv() => print_event(out, item),
            Some(item) = errors.recv() => print_error(out, item),
            _ = sigterm.recv() => break Err(CliError::new("signalled again: stopped without finishing the shutdown")),
            _ = sigint.recv() => break Err(CliError::new("interrupted again: stopped without finishing the shutdown")),
        }
    };
    while let Some(item) = events.try_recv() {
        print_event(out, item);
    }
    if finished.is_ok() {
        // The tabernas closed with the domus; their handlers end once their blobs have.
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            while handlers.join_next().await.is_some() {}
        })
        .await;
    }
    handlers.abort_all();
    for (spec, tally) in &tallies {
        print_tally(out, *spec, tally);
    }
    finished?;
    out.result("stopped", &json!({ "event": "stopped" }));
    Ok(())
}

/// Answers one request as the taberna's behaviour says; blobs are read, and forwards wait
/// for their answer, on tasks of `work`.
fn handle(
    domus: &Domus,
    spec: TabernaSpec,
    publisher: Option<&vicus::services::topics::Publisher>,
    tally: &Arc<Tally>,
    mut request: TabernaRequest,
    out: Output,
    work: &mut JoinSet<()>,
) {
    add(&tally.messages, 1);
    add(&tally.bytes, request.payload().len() as u64);
    let from = request.peer().id().clone();
    if let Some(blob) = request.blob() {
        if spec.behaviour == Behaviour::Forward {
            request.reject(
                400,
                "this taberna forwards messages, not blobs: send the blob to the taberna it forwards to",
            );
            return;
        }
        if spec.behaviour == Behaviour::Publish {
            request.reject(400, "this taberna publishes messages to a topic, not blobs");
            return;
        }
        if spec.behaviour == Behaviour::Log {
            out.result(
                &format!(
                    "taberna {} (log): blob from {from}, header {} B: {}",
                    spec.id.0,
                    request.payload().len(),
                    head(request.payload())
                ),
                &json!({
                    "event": "blob_started",
                    "taberna": spec.id.0,
                    "from": from.as_str(),
                    "header_len": request.payload().len(),
                    "header": head(request.payload()),
                }),
            );
        }
        request.accept();
        work.spawn(read_blob(blob, spec, from, tally.clone(), out));
        return;
    }
    match spec.behaviour {
        Behaviour::Echo => {
            let payload = request.take_payload();
            request.reply(payload);
        }
        Behaviour::Sink => request.accept(),
        Behaviour::Log => {
            out.result(
                &format!(
                    "taberna {} (log): {} B from {from}: {}",
                    spec.id.0,
                    request.payload().len(),
                    head(request.payload())
                ),
                &json!({
                    "event": "message",
                    "taberna": spec.id.0,
                    "from": from.as_str(),
                    "len": request.payload().len(),
                    "head": head(request.payload()),
                }),
            );
            request.accept();
        }
        Behaviour::Forward => {
            let Some(to) = spec.to else {
                request.reject(500, "forward has no target");
                return;
            };
            // The request's headers go on, the reply's come back.
            let (parts, answer_handle) = request.into_parts();
            let send = domus.send(
                to,
                parts.message_type,
                parts.payload,
                SendOptions::default().headers(parts.headers),
            );
            work.spawn(async move {
                match send.await {
                    Ok(Delivery::Accepted) => answer_handle.accept(),
                    Ok(Delivery::Replied(reply)) => {
                        let (payload, headers) = reply.into_parts();
                        answer_handle.reply_with_headers(payload, &headers);
                    }
                    Err(e) => {
                        answer_handle.reject(e.id().as_u32(), &format!("forward to {to}: {e}"))
                    }
                }
            });
        }
        Behaviour::Publish => {
            let Some(publisher) = publisher else {
                request.reject(500, "publish has no topic service");
                return;
            };
            let (parts, answer_handle) = request.into_parts();
            let report =
                publisher.publish_with_headers(parts.message_type, parts.payload, parts.headers);
            work.spawn(async move {
                match report.await {
                    Ok(report) => {
                        let summary = json!({
                            "topic": report.topic().as_str(),
                            "recipients": report.recipients(),
                            "delivered": report.delivered(),
                        });
                        answer_handle.reply(bytes::Bytes::from(summary.to_string()));
                    }
                    Err(e) => answer_handle.reject(e.id().as_u32(), &format!("publish: {e}")),
                }
            });
        }
    }
}

/// Reads a blob to its end, counting it (and printing it for `log`).
async fn read_blob(
    mut blob: BlobReceiver,
    spec: TabernaSpec,
    from: DomusId,
    tally: Arc<Tally>,
    out: Output,
) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut len = 0u64;
    let result = loop {
        match blob.read(&mut buf).await {
            Ok(0) => break Ok(()),
            Ok(n) => {
                len += n as u64;
                add(&tally.blob_bytes, n as u64);
            }
            Err(e) => break Err(e),
        }
    };
    add(&tally.blobs, 1);
    if result.is_err() {
        add(&tally.blobs_failed, 1);
    }
    if spec.behaviour == Behaviour::Log {
        let (text, error) = match &result {
            Ok(()) => (format!("{len} B, complete"), None),
            Err(e) => (format!("failed after {len} B: {e}"), Some(e.to_string())),
        };
        out.result(
            &format!("taberna {} (log): blob from {from}: {text}", spec.id.0),
            &json!({
                "event": "blob",
                "taberna": spec.id.0,
                "from": from.as_str(),
                "len": len,
                "ok": result.is_ok(),
                "error": error,
            }),
        );
    }
}

/// The first bytes of a payload, quoted, printable ASCII as is and the rest escaped (a peer
/// must not be able to write terminal escapes to our output).
pub(crate) fn head(payload: &[u8]) -> String {
    let mut shown = String::from("\"");
    for &b in payload.iter().take(LOG_HEAD_LEN) {
        match b {
            b'"' => shown.push_str("\\\""),
            b'\\' => shown.push_str("\\\\"),
            b' '..=b'~' => shown.push(char::from(b)),
            _ => shown.push_str(&format!("\\x{b:02x}")),
        }
    }
    shown.push('"');
    if payload.len() > LOG_HEAD_LEN {
        shown.push('…');
    }
    shown
}

fn kind_name(kind: &CallisKind) -> &'static str {
    match kind {
        CallisKind::Primary => "primary",
        CallisKind::Blob => "blob",
        _ => "other",
    }
}

fn print_event(out: Output, item: FeedItem<Event>) {
    let event = match item {
        FeedItem::Item(event) => event,
        FeedItem::Missed(n) => {
            out.result(
                &format!("({n} events missed: the output fell behind)"),
                &json!({ "event": "missed_events", "count": n }),
            );
            return;
        }
    };
    let (text, value) = match &event {
        Event::PeerConnected { peer, restarted } => (
            format!(
                "peer connected: {peer}{}",
                if *restarted { " (a new run)" } else { "" }
            ),
            json!({ "event": "peer_connected", "peer": peer.as_str(), "restarted": restarted }),
        ),
        Event::PeerDisconnected { peer, reason } => (
            match reason {
                Some(reason) => format!("peer disconnected: {peer}: {reason}"),
                None => format!("peer disconnected: {peer}"),
            },
            json!({
                "event": "peer_disconnected",
                "peer": peer.as_str(),
                "reason": reason.as_ref().map(ToString::to_string),
            }),
        ),
        Event::CallisUp { peer, kind } => (
            format!("callis up: {peer} ({})", kind_name(kind)),
            json!({ "event": "callis_up", "peer": peer.as_str(), "kind": kind_name(kind) }),
        ),
        Event::CallisDown { peer, kind } => (
            format!("callis down: {peer} ({})", kind_name(kind)),
            json!({ "event": "callis_down", "peer": peer.as_str(), "kind": kind_name(kind) }),
        ),
        Event::DialFailed { peer, error } => (
            format!("dial failed: {peer}: {error}"),
            json!({
                "event": "dial_failed",
                "peer": peer.as_str(),
                "error": error.id().name(),
                "message": error.message(),
            }),
        ),
        Event::SessionRestarted { peer } => (
            format!("peer restarted: {peer} (its unanswered messages failed)"),
            json!({ "event": "session_restarted", "peer": peer.as_str() }),
        ),
        Event::Backpressure { peer } => (
            format!("backpressure: sends to {peer} wait for room"),
            json!({ "event": "backpressure", "peer": peer.as_str() }),
        ),
        Event::QueueOverrun { taberna } => (
            format!("taberna {taberna}: inbox full, a delivery was refused (TabernaBusy)"),
            json!({ "event": "queue_overrun", "taberna": taberna }),
        ),
        Event::ConfigReloaded => (
            "configuration updated".to_owned(),
            json!({ "event": "config_reloaded" }),
        ),
        Event::AuthReloaded => (
            "certificates reloaded: new handshakes use the new files".to_owned(),
            json!({ "event": "auth_reloaded" }),
        ),
        Event::ShutdownStarted => (
            "shutdown started".to_owned(),
            json!({ "event": "shutdown_started" }),
        ),
        Event::ShutdownCompleted => (
            "shutdown completed".to_owned(),
            json!({ "event": "shutdown_completed" }),
        ),
        Event::DetachedSendEnded {
            request_id,
            taberna,
            outcome,
        } => (
            match outcome {
                Ok(true) => format!("http request #{request_id} to taberna {taberna}: replied"),
                Ok(false) => format!("http request #{request_id} to taberna {taberna}: accepted"),
                Err(e) => format!("http request #{request_id} to taberna {taberna}: {e}"),
            },
            json!({
                "event": "detached_send_ended",
                "request_id": request_id,
                "taberna": taberna,
                "outcome": match outcome {
                    Ok(true) => "replied",
                    Ok(false) => "accepted",
                    Err(_) => "failed",
                },
                "error": outcome.as_ref().err().map(|e| e.id().name()),
            }),
        ),
        other => (
            format!("{other:?}"),
            json!({ "event": "other", "debug": format!("{other:?}") }),
        ),
    };
    out.result(&text, &value);
}

fn print_error(out: Output, item: FeedItem<SequencedError>) {
    match item {
        FeedItem::Item(SequencedError { seq, error }) => out.result(
            &format!("error #{seq}: {error}"),
            &json!({
                "event": "error",
                "seq": seq,
                "error": error.id().name(),
                "message": error.message(),
            }),
        ),
        FeedItem::Missed(n) => out.result(
            &format!("({n} errors missed: the output fell behind)"),
            &json!({ "event": "missed_errors", "count": n }),
        ),
    }
}

fn print_tally(out: Output, spec: TabernaSpec, tally: &Tally) {
    let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
    let (messages, bytes) = (get(&tally.messages), get(&tally.bytes));
    let (blobs, blob_bytes, failed) = (
        get(&tally.blobs),
        get(&tally.blob_bytes),
        get(&tally.blobs_failed),
    );
    let mut text = format!(
        "taberna {} ({}): {messages} message(s), {bytes} B",
        spec.id.0,
        spec.behaviour.name()
    );
    if blobs > 0 {
        text.push_str(&format!("; {blobs} blob(s), {blob_bytes} B"));
        if failed > 0 {
            text.push_str(&format!(", {failed} failed"));
        }
    }
    out.result(
        &text,
        &json!({
            "event": "taberna_stats",
            "taberna": spec.id.0,
            "behaviour": spec.behaviour.name(),
            "messages": messages,
            "bytes": bytes,
            "blobs": blobs,
            "blob_bytes": blob_bytes,
            "blobs_failed": failed,
        }),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<NodeConfig, String> {
        let path = Path::new("/nonexistent-vicus/node.toml");
        let src = Source { path, text };
        let raw: RawConfig = toml::from_str(text).map_err(|e| e.message().to_owned())?;
        check(&src, raw).map_err(|e| e.to_string())
    }

    #[test]
    fn unknown_keys_and_bad_behaviours_are_refused_by_the_parser() {
        let e = parse("bnd = \"x\"").unwrap_err();
        assert!(e.contains("unknown field `bnd`"), "{e}");
        let e = parse(
            "bind = \"127.0.0.1:0\"\n[tls]\nca = \"a\"\ncert = \"b\"\nkey = \"c\"\n\
             [[taberna]]\nid = 1\nbehaviour = \"ech\"\n",
        )
        .unwrap_err();
        assert!(e.contains("echo"), "{e}");
    }

    #[test]
    fn a_missing_certificate_names_the_line_and_the_key() {
        let e =
            parse("bind = \"127.0.0.1:0\"\n[tls]\nca = \"ca.pem\"\ncert = \"b\"\nkey = \"c\"\n")
                .unwrap_err();
        assert!(
            e.starts_with("/nonexistent-vicus/node.toml:3: [tls] ca: /nonexistent-vicus/ca.pem:"),
            "{e}"
        );
    }

    #[test]
    fn the_example_config_parses() {
        let text = include_str!("../examples/node.toml");
        let raw: RawConfig = toml::from_str(text).expect("examples/node.toml");
        assert_eq!(raw.taberna.len(), 5);
        assert_eq!(raw.route.len(), 1);
        assert!(raw.tls.get_ref().watch);
        assert!(raw.http.is_some());
        assert!(raw.topics.is_some());
    }

    #[test]
    fn http_tokens_are_never_in_the_configs_debug() {
        let text = "bind = \"127.0.0.1:0\"\n[tls]\nca = \"a\"\ncert = \"b\"\nkey = \"c\"\n\
                    [http]\ntokens = [\"canary-token-0123456789\"]\n";
        let raw: RawConfig = toml::from_str(text).expect("parses");
        assert!(!format!("{raw:?}").contains("canary"), "{raw:?}");
        let http = crate::http::check(
            raw.http.expect("[http]").into_inner(),
            &|_, m| CliError::new(m),
            &|v| PathBuf::from(v),
        )
        .expect("checked");
        assert!(!format!("{http:?}").contains("canary"), "{http:?}");
    }

    #[test]
    fn an_http_bind_beyond_loopback_is_accepted_only_with_access_control() {
        let check = |http: &str| {
            let text = format!(
                "bind = \"127.0.0.1:0\"\n[tls]\nca = \"a\"\ncert = \"b\"\nkey = \"c\"\n[http]\n{http}"
            );
            let raw: RawConfig = toml::from_str(&text).expect("parses");
            crate::http::check(
                raw.http.expect("[http]").into_inner(),
                &|_, m| CliError::new(m),
                &|v| PathBuf::from(v),
            )
            .map(|h| (h.config.access.is_open(), h.client_identities.is_some()))
            .map_err(|e| e.to_string())
        };
        assert!(check("bind = \"0.0.0.0:7080\"\n").is_err());
        assert!(check("bind = \"[::]:7080\"\n").is_err());
        assert_eq!(check("bind = \"127.0.0.1:7080\"\n"), Ok((true, false)));
        assert_eq!(check(""), Ok((true, false)));
        assert_eq!(
            check("bind = \"0.0.0.0:7080\"\ntokens = [\"0123456789abcdef0123\"]\n"),
            Ok((false, false))
        );
        assert_eq!(
            check(
                "bind = \"0.0.0.0:7080\"\nclient_identities = [\"spiffe://vicus.dev/domus/c\"]\n"
            ),
            Ok((false, true))
        );
        assert!(check("client_identities = []\n").is_err());
    }

    #[test]
    fn heads_escape_what_a_terminal_would_interpret() {
        assert_eq!(
            head(b"hi \x1b[31m\"x\"\n"),
            "\"hi \\x1b[31m\\\"x\\\"\\x0a\""
        );
        assert_eq!(head(&[b'a'; 40]), format!("\"{}\"…", "a".repeat(32)));
    }

    #[test]
    fn the_watched_files_share_their_nearest_directory() {
        let tls = Tls {
            ca: "/etc/vicus/ca/ca.pem".into(),
            cert: "/etc/vicus/node/tls.crt".into(),
            key: "/etc/vicus/node/tls.key".into(),
            watch: None,
        };
        let w = watch_config(&tls, Duration::from_secs(1));
        assert_eq!(w.dir, Path::new("/etc/vicus"));
        assert_eq!(w.ca_file, Path::new("ca/ca.pem"));
        assert_eq!(w.cert_file, Path::new("node/tls.crt"));
        assert_eq!(w.key_file, Path::new("node/tls.key"));
        let relative = Tls {
            ca: "ca.pem".into(),
            cert: "a.pem".into(),
            key: "a.key".into(),
            watch: None,
        };
        let w = watch_config(&relative, Duration::from_secs(1));
        assert_eq!(w.dir, Path::new("."));
        assert_eq!(w.cert_file, Path::new("a.pem"));
    }
}
