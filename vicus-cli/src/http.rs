//! `vicus node`'s `[http]` table: the library's HTTP gateway (`vicus::gateway`) served beside
//! the domus, with `/metrics` rendered by a Prometheus recorder this process installs.
//!
//! The table is checked with the rest of the config: an address that is not loopback needs
//! bearer tokens (`tokens` or `token_file`), tokens are held redacted and never printed, and
//! every limit is the library's (`GatewayConfig`). This module reads the token file; the
//! serving is the library's `gateway::serve`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use toml::Spanned;
use vicus::gateway::{Access, BearerTokens, Gateway, GatewayConfig, GatewayTls};
use vicus::{AuthConfig, Domus, DomusId, TrustPolicy};

use crate::client::parse_duration;
use crate::output::CliError;

/// Where the gateway listens when `[http]` gives no `bind`.
pub const DEFAULT_HTTP_BIND: &str = "127.0.0.1:7080";
/// The longest token file read.
const MAX_TOKEN_FILE_LEN: u64 = 64 << 10;

/// `[http]` as written (`Debug` leaves the tokens out).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHttp {
    bind: Option<Spanned<String>>,
    tokens: Option<Spanned<Vec<String>>>,
    token_file: Option<Spanned<String>>,
    max_concurrent: Option<Spanned<usize>>,
    request_timeout: Option<Spanned<String>>,
    #[serde(default)]
    detailed_errors: bool,
    client_identities: Option<Spanned<Vec<Spanned<String>>>>,
}

impl std::fmt::Debug for RawHttp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawHttp")
            .field("bind", &self.bind)
            .field(
                "tokens",
                &self
                    .tokens
                    .as_ref()
                    .map(|t| format!("[{} redacted]", t.get_ref().len())),
            )
            .field("token_file", &self.token_file)
            .field("max_concurrent", &self.max_concurrent)
            .field("request_timeout", &self.request_timeout)
            .field("detailed_errors", &self.detailed_errors)
            .field("client_identities", &self.client_identities)
            .finish()
    }
}

/// `[http]` checked.
#[derive(Debug)]
pub struct Http {
    pub bind: SocketAddr,
    pub config: GatewayConfig,
    /// HTTPS with client certificates: the identities that may connect.
    pub client_identities: Option<Vec<DomusId>>,
}

/// Checks `[http]`; `at(span, message)` makes an error naming the config's line, `path`
/// resolves a path relative to the config file.
pub fn check(
    raw: RawHttp,
    at: &dyn Fn(&std::ops::Range<usize>, String) -> CliError,
    path: &dyn Fn(&str) -> PathBuf,
) -> Result<Http, CliError> {
    let bind = match &raw.bind {
        None => DEFAULT_HTTP_BIND
            .parse()
            .map_err(|_| CliError::new("default bind"))?,
        Some(b) => b.get_ref().parse::<SocketAddr>().map_err(|_| {
            at(
                &b.span(),
                format!(
                    "[http] bind: {:?} is not ip:port (e.g. \"127.0.0.1:7080\")",
                    b.get_ref()
                ),
            )
        })?,
    };
    let mut config = GatewayConfig::default();
    let tokens: Option<Vec<String>> = match (&raw.tokens, &raw.token_file) {
        (Some(_), Some(file)) => {
            return Err(at(
                &file.span(),
                "[http] give tokens or token_file, not both".to_owned(),
            ));
        }
        (Some(tokens), None) => Some(tokens.get_ref().clone()),
        (None, Some(file)) => {
            let file_path = path(file.get_ref());
            let text = read_token_file(&file_path)
                .map_err(|e| at(&file.span(), format!("[http] token_file: {e}")))?;
            Some(
                text.lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty() && !l.starts_with('#'))
                    .map(str::to_owned)
                    .collect(),
            )
        }
        (None, None) => None,
    };
    if let Some(tokens) = tokens {
        let span = raw
            .tokens
            .as_ref()
            .map(Spanned::span)
            .or_else(|| raw.token_file.as_ref().map(Spanned::span))
            .unwrap_or_default();
        let tokens = BearerTokens::new(&tokens)
            .map_err(|e| at(&span, format!("[http] tokens: {}", e.message())))?;
        config.access = Access::Bearer(tokens);
    }
    let client_identities = match &raw.client_identities {
        None => None,
        Some(list) => {
            let mut ids = Vec::new();
            for id in list.get_ref() {
                ids.push(DomusId::new(id.get_ref()).map_err(|e| {
                    at(
                        &id.span(),
                        format!("[http] client_identities: {}", e.message()),
                    )
                })?);
            }
            if ids.is_empty() {
                return Err(at(
                    &list.span(),
                    "[http] client_identities is empty: name the identities that may connect, \
                     or remove the key"
                        .to_owned(),
                ));
            }
            if config.access.is_open() {
                config.access = Access::MutualTls;
            }
            Some(ids)
        }
    };
    if config.access.is_open() && !bind.ip().is_loopback() {
        let span = raw.bind.as_ref().map(Spanned::span).unwrap_or_default();
        return Err(at(
            &span,
            format!(
                "[http] bind = \"{bind}\" is not a loopback address: anyone who reaches it could \
                 send as this node; add tokens, token_file or client_identities"
            ),
        ));
    }
    if let Some(n) = &raw.max_concurrent {
        config.max_concurrent = *n.get_ref();
    }
    if let Some(t) = &raw.request_timeout {
        config.request_timeout = parse_duration(t.get_ref())
            .map_err(|e| at(&t.span(), format!("[http] request_timeout: {e}")))?;
    }
    config.detailed_errors = raw.detailed_errors;
    config.validate().map_err(|e| {
        let span = raw
            .max_concurrent
            .as_ref()
            .map(Spanned::span)
            .or_else(|| raw.request_timeout.as_ref().map(Spanned::span))
            .unwrap_or_default();
        at(&span, format!("[http]: {}", e.message()))
    })?;
    Ok(Http {
        bind,
        config,
        client_identities,
    })
}

/// Reads a token file: one token a line (blank lines and `#` comments skipped). Warned about
/// nothing here: the node's start-up line never shows tokens.
fn read_token_file(path: &std::path::Path) -> Result<String, String> {
    use std::io::Read;
    let mut text = String::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_TOKEN_FILE_LEN + 1).read_to_string(&mut text))
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if text.len() as u64 > MAX_TOKEN_FILE_LEN {
        return Err(format!(
            "{}: larger than {MAX_TOKEN_FILE_LEN} bytes",
            path.display()
        ));
    }
    Ok(text)
}

/// The gateway running: its address, and how to stop it.
pub struct Running {
    pub addr: SocketAddr,
    /// Served over HTTPS with client certificates.
    pub https: bool,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), vicus::Error>>,
}

impl Running {
    /// Stops accepting, drops the open connections, and waits (bounded) for the server task.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), &mut self.task).await;
        self.task.abort();
    }
}

/// Binds `http.bind`, installs the Prometheus recorder for `/metrics`, and serves the gateway
/// (over HTTPS with the node's own certificate, key and CA when `client_identities` is set;
/// `auth` is that material, read again from the node's [tls] files).
pub async fn start(
    domus: &Domus,
    http: Http,
    auth: impl FnOnce() -> Result<AuthConfig, CliError>,
) -> Result<Running, CliError> {
    let tls = match &http.client_identities {
        Some(ids) => Some(
            GatewayTls::mutual(&auth()?, TrustPolicy::allow_list(ids.iter().cloned()))
                .map_err(|e| CliError::new(format!("[http] client_identities: {e}")))?,
        ),
        None => None,
    };
    let listener = TcpListener::bind(http.bind)
        .await
        .map_err(|e| CliError::new(format!("[http] bind {}: {e}", http.bind)))?;
    let addr = listener
        .local_addr()
        .map_err(|e| CliError::new(format!("[http] bind {}: {e}", http.bind)))?;
    // The domus mirrors its figures into the `metrics` facade; this process's recorder renders
    // them (the library installs none).
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder)
        .map_err(|e| CliError::new(format!("[http] cannot install the metrics recorder: {e}")))?;
    let config = http
        .config
        .metrics_renderer(Arc::new(move || handle.render()));
    let gateway = Gateway::new(domus, config).map_err(|e| CliError::new(format!("[http]: {e}")))?;
    let (stop, stopped) = oneshot::channel::<()>();
    let stopped = async move {
        let _ = stopped.await;
    };
    let https = tls.is_some();
    let task = match tls {
        Some(tls) => tokio::spawn(vicus::gateway::serve_tls(listener, gateway, tls, stopped)),
        None => tokio::spawn(vicus::gateway::serve(listener, gateway, stopped)),
    };
    Ok(Running {
        addr,
        https,
        stop: Some(stop),
        task,
    })
}
