//! What the commands that talk to a running node share: the identity flags
//! (`--certs DIR --as NAME`, or `--ca/--cert/--key`) turned into an [`AuthConfig`], a
//! dial-only client domus routed to that node, duration parsing (`5s`, `200ms`), and the
//! message type the tools send.
//!
//! This module must not print anything (the commands report through [`crate::output`]) and
//! must not keep state between calls.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use vicus::{AuthConfig, Domus, DomusAddr, DomusId, MessageType, SimpleResolver, TabernaId};

use crate::output::CliError;

/// The message type `vicus send`, `vicus ping` and `vicus bench` send: the first application
/// type. A `vicus node` taberna accepts every type.
pub const MESSAGE_TYPE: MessageType = MessageType::app(1);

/// Who a client command is: a directory written by `vicus certs` and a name in it, or three
/// explicit PEM files.
#[derive(Debug, Clone, Default, Args)]
pub struct IdentityArgs {
    /// Directory written by `vicus certs init` / `vicus certs issue` (with --as).
    #[arg(long, value_name = "DIR")]
    pub certs: Option<PathBuf>,
    /// The name issued in --certs: uses DIR/ca.pem, DIR/NAME.pem and DIR/NAME.key.
    #[arg(long = "as", value_name = "NAME")]
    pub name: Option<String>,
    /// CA bundle (PEM) to trust, instead of --certs.
    #[arg(long, value_name = "FILE")]
    pub ca: Option<PathBuf>,
    /// This client's certificate chain (PEM, leaf first), instead of --certs.
    #[arg(long, value_name = "FILE")]
    pub cert: Option<PathBuf>,
    /// This client's private key (PEM), instead of --certs.
    #[arg(long, value_name = "FILE")]
    pub key: Option<PathBuf>,
}

impl IdentityArgs {
    /// The CA bundle, certificate and key files these flags name, checked to exist.
    pub fn files(&self) -> Result<[PathBuf; 3], CliError> {
        let explicit = self.ca.is_some() || self.cert.is_some() || self.key.is_some();
        let files = match (&self.certs, &self.name) {
            (Some(_), _) | (_, Some(_)) if explicit => {
                return Err(CliError::new(
                    "give either --certs DIR --as NAME or --ca, --cert and --key, not both",
                ));
            }
            (Some(dir), Some(name)) => [
                dir.join("ca.pem"),
                dir.join(format!("{name}.pem")),
                dir.join(format!("{name}.key")),
            ],
            (Some(_), None) => {
                return Err(CliError::new(
                    "--certs needs --as NAME: the name issued with `vicus certs issue NAME`",
                ));
            }
            (None, Some(_)) => {
                return Err(CliError::new(
                    "--as needs --certs DIR: the directory written by `vicus certs init`",
                ));
            }
            (None, None) => match (&self.ca, &self.cert, &self.key) {
                (Some(ca), Some(cert), Some(key)) => [ca.clone(), cert.clone(), key.clone()],
                (None, None, None) => {
                    return Err(CliError::new(
                        "no identity: give --certs DIR --as NAME (from `vicus certs`), or --ca, \
                         --cert and --key",
                    ));
                }
                _ => {
                    return Err(CliError::new(
                        "--ca, --cert and --key go together: give all three",
                    ));
                }
            },
        };
        let flags = if self.certs.is_some() {
            ["--certs", "--certs/--as", "--certs/--as"]
        } else {
            ["--ca", "--cert", "--key"]
        };
        for (path, flag) in files.iter().zip(flags) {
            check_readable(path, flag)?;
        }
        Ok(files)
    }

    /// The [`AuthConfig`] these flags name: files checked and parsed, errors saying which
    /// flag to fix.
    pub fn auth(&self) -> Result<AuthConfig, CliError> {
        let [ca, cert, key] = self.files()?;
        AuthConfig::from_pem_files(&ca, &cert, &key).map_err(|e| {
            CliError::new(format!(
                "the identity files are unusable ({}): {e}",
                if self.certs.is_some() {
                    "check --certs and --as"
                } else {
                    "check --ca, --cert and --key"
                }
            ))
        })
    }
}

/// Fails with a message naming `flag` when `path` is not a readable file.
pub fn check_readable(path: &Path, flag: &str) -> Result<(), CliError> {
    match std::fs::metadata(path) {
        Ok(meta) if meta.is_file() => Ok(()),
        Ok(_) => Err(CliError::new(format!(
            "{flag}: {} is not a file",
            path.display()
        ))),
        Err(e) => Err(CliError::new(format!("{flag}: {}: {e}", path.display()))),
    }
}

/// Parses `--to`: `host:port`, `ip:port`, `[v6]:port`, `tcp://host:port` or `unix:/path`.
pub fn parse_addr(s: &str) -> Result<DomusAddr, String> {
    s.parse::<DomusAddr>().map_err(|e| e.message().to_owned())
}

/// Parses `--identity`: a domus id such as `spiffe://vicus.dev/domus/alpha`.
pub fn parse_identity(s: &str) -> Result<DomusId, String> {
    DomusId::new(s).map_err(|e| e.message().to_owned())
}

/// Parses a duration: a number and a unit (`ns`, `us`, `ms`, `s`, `m`, `h`), or several
/// (`1m30s`); the number may have a fraction (`1.5s`). A bare number is refused, since its
/// unit would be a guess. Usable as a clap `value_parser`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = |why: &str| format!("\"{s}\" is not a duration ({why}); write e.g. 5s, 200ms, 1m30s");
    let text = s.trim();
    if text.is_empty() {
        return Err(bad("it is empty"));
    }
    let mut total = Duration::ZERO;
    let mut rest = text;
    while !rest.is_empty() {
        let number_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let (number, tail) = rest.split_at(number_len);
        let unit_len = tail
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(unit_len);
        if number.is_empty() {
            return Err(bad("a number must come first"));
        }
        let value: f64 = number.parse().map_err(|_| bad("the number is malformed"))?;
        let seconds_per_unit = match unit {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" | "min" => 60.0,
            "h" => 3600.0,
            "" => return Err(bad("add a unit: ms, s, m or h")),
            _ => return Err(bad("the unit must be ns, us, ms, s, m or h")),
        };
        let part = Duration::try_from_secs_f64(value * seconds_per_unit)
            .map_err(|_| bad("it is too long"))?;
        total = total
            .checked_add(part)
            .ok_or_else(|| bad("it is too long"))?;
        rest = tail;
    }
    Ok(total)
}

/// A duration for people: `850µs`, `12.3ms`, `4.20s`.
pub fn show_duration(d: Duration) -> String {
    let micros = d.as_secs_f64() * 1e6;
    if micros < 1000.0 {
        format!("{micros:.0}µs")
    } else if micros < 1e6 {
        format!("{:.2}ms", micros / 1000.0)
    } else {
        format!("{:.2}s", micros / 1e6)
    }
}

/// A duration in milliseconds, for JSON (fractional, to the microsecond).
pub fn millis(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1000.0
}

/// The taberna a client command talks to (`vicus send`, `vicus ping`), where its node is, and
/// who this client is.
#[derive(Debug, Args)]
pub struct TabernaTarget {
    /// The node's address: host:port, ip:port, [v6]:port or unix:/path.
    #[arg(long, value_name = "ADDR", value_parser = parse_addr)]
    pub to: DomusAddr,
    /// The taberna on that node (for `vicus ping`, an echo taberna ideally).
    #[arg(long, value_name = "ID")]
    pub taberna: u64,
    /// The identity the node must present (e.g. spiffe://vicus.dev/domus/alpha); without it,
    /// any identity the CA verified is accepted.
    #[arg(long, value_name = "SPIFFE_ID", value_parser = parse_identity)]
    pub identity: Option<DomusId>,
    #[command(flatten)]
    pub who: IdentityArgs,
}

impl TabernaTarget {
    /// The taberna, as the library names it.
    pub fn taberna(&self) -> TabernaId {
        TabernaId(self.taberna)
    }

    /// A dial-only client domus with these flags' identity, routed to the taberna.
    pub async fn client(&self) -> Result<Domus, CliError> {
        let route = (self.taberna(), self.to.clone(), self.identity.clone());
        client_domus(self.who.auth()?, &[route]).await
    }
}

/// A dial-only domus authenticated with `auth` whose resolver routes each
/// `(taberna, address, expected identity)` of `routes`. Without an expected identity, the
/// first verified identity that answers at the address is pinned there.
pub async fn client_domus(
    auth: AuthConfig,
    routes: &[(TabernaId, DomusAddr, Option<DomusId>)],
) -> Result<Domus, CliError> {
    let resolver = Arc::new(SimpleResolver::new());
    for (taberna, addr, identity) in routes {
        resolver.insert(*taberna, addr.clone(), identity.clone());
    }
    Domus::builder(auth)
        .dial_only()
        .resolver(resolver)
        .build()
        .await
        .map_err(|e| CliError::new(format!("cannot start the client: {e}")))
}

/// Runs `command` on a multi-thread tokio runtime made for it.
pub fn block_on<F>(command: F) -> Result<(), CliError>
where
    F: std::future::Future<Output = Result<(), CliError>>,
{
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| CliError::new(format!("cannot start the async runtime: {e}")))?
        .block_on(command)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units_and_fractions() {
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("200ms"), Ok(Duration::from_millis(200)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("250us"), Ok(Duration::from_micros(250)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
    }

    #[test]
    fn durations_without_a_unit_or_malformed_are_refused() {
        for bad in ["", "5", "s", "5 s", "1.2.3s", "5parsecs", "-1s", "1e400s"] {
            let e = parse_duration(bad).unwrap_err();
            assert!(e.contains("e.g. 5s"), "{bad:?}: {e}");
        }
    }

    #[test]
    fn identity_flags_must_be_complete_and_not_mixed() {
        let mixed = IdentityArgs {
            certs: Some("d".into()),
            name: Some("a".into()),
            ca: Some("ca.pem".into()),
            ..Default::default()
        };
        assert!(mixed.files().unwrap_err().to_string().contains("not both"));
        let half = IdentityArgs {
            ca: Some("ca.pem".into()),
            ..Default::default()
        };
        assert!(half.files().unwrap_err().to_string().contains("all three"));
        let no_name = IdentityArgs {
            certs: Some("d".into()),
            ..Default::default()
        };
        assert!(no_name.files().unwrap_err().to_string().contains("--as"));
        let none = IdentityArgs::default();
        assert!(
            none.files()
                .unwrap_err()
                .to_string()
                .contains("no identity")
        );
        let missing = IdentityArgs {
            certs: Some("/nonexistent-vicus-dir".into()),
            name: Some("a".into()),
            ..Default::default()
        };
        let e = missing.files().unwrap_err().to_string();
        assert!(e.contains("/nonexistent-vicus-dir/ca.pem"), "{e}");
    }
}
