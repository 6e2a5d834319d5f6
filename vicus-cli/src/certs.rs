//! `vicus certs`: an INSECURE development CA on disk and node certificates issued from it.
//!
//! `init` writes `DIR/ca.pem`, `DIR/ca.key` (mode 0600) and `DIR/README.txt`; `issue NAME`
//! loads that CA and writes `DIR/NAME.pem` and `DIR/NAME.key` (0600), a leaf whose single URI
//! SAN is `spiffe://<trust domain>/domus/NAME`, usable as TLS client and server. The trust
//! domain lives in the CA certificate itself (its URI SAN `spiffe://<trust domain>`), so the
//! directory needs nothing else. Nothing is overwritten without `--force`, and a run either
//! writes all of its files or fails before writing any (a file appearing meanwhile aside).
//! Minting is the library's (`vicus::dev_certs`); this module only does the files.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use clap::{Args, Subcommand};
use serde_json::json;
use vicus::DomusId;
use vicus::dev_certs::{DevCa, LeafSpec};

use crate::output::{CliError, Output};

/// The directory `vicus certs` uses when --dir is not given.
const DEFAULT_DIR: &str = "vicus-certs";
/// The longest a node certificate may be valid (the CA is valid for a year).
const MAX_LEAF_DAYS: u64 = 365;

/// `vicus certs`.
#[derive(Debug, Args)]
#[command(after_help = "Examples:
  vicus certs init --dir ./certs --trust-domain acme.test
  vicus certs issue alpha --dir ./certs
  vicus certs issue beta --dir ./certs --days 7

INSECURE: development material only. The CA key sits unprotected in DIR/ca.key; never deploy
these files or trust this CA outside development.")]
pub struct CertsArgs {
    #[command(subcommand)]
    command: CertsCommand,
}

#[derive(Debug, Subcommand)]
enum CertsCommand {
    /// Create a development CA: DIR/ca.pem, DIR/ca.key and DIR/README.txt.
    #[command(after_help = "Example:
  vicus certs init --dir ./certs --trust-domain acme.test

The CA is valid for 365 days. --force replaces an existing CA: certificates it issued stop
being trusted by nodes that load the new ca.pem, so issue them again.")]
    Init {
        /// Directory to write to (created if missing, mode 0700).
        #[arg(long, value_name = "DIR", default_value = DEFAULT_DIR)]
        dir: PathBuf,
        /// The trust domain of every identity this CA issues: spiffe://T/domus/NAME.
        #[arg(long, value_name = "T", default_value = vicus::dev_certs::DEV_TRUST_DOMAIN)]
        trust_domain: String,
        /// Replace an existing CA in DIR.
        #[arg(long)]
        force: bool,
    },
    /// Issue a node certificate from the CA in DIR: DIR/NAME.pem and DIR/NAME.key.
    #[command(after_help = "Example:
  vicus certs issue alpha --dir ./certs
  vicus node --config node.toml   # with [tls] cert = \"certs/alpha.pem\", key = \"certs/alpha.key\"

NAME becomes the identity spiffe://<trust domain>/domus/NAME: 1 to 63 lower-case letters,
digits and '-', not starting or ending with '-' (and not \"ca\"). --host adds a DNS name or
IP address for HTTPS clients (a node's [http] gateway with client_identities):
  vicus certs issue alpha --dir ./certs --host 127.0.0.1 --host alpha.internal")]
    Issue {
        /// The node's name (a DNS-label-like name, e.g. alpha or billing-1).
        name: String,
        /// Directory holding the CA (from `vicus certs init`).
        #[arg(long, value_name = "DIR", default_value = DEFAULT_DIR)]
        dir: PathBuf,
        /// Days the certificate is valid (1 to 365).
        #[arg(long, value_name = "N", default_value_t = 30)]
        days: u64,
        /// Replace an existing certificate and key for NAME.
        #[arg(long)]
        force: bool,
        /// A DNS name or IP address to add (repeatable), for HTTPS clients' host name check;
        /// vicus itself names the node by its URI only.
        #[arg(long, value_name = "HOST")]
        host: Vec<String>,
    },
}

/// Runs `vicus certs`.
pub fn run(args: CertsArgs, out: Output) -> Result<(), CliError> {
    match args.command {
        CertsCommand::Init {
            dir,
            trust_domain,
            force,
        } => init(&dir, &trust_domain, force, out),
        CertsCommand::Issue {
            name,
            dir,
            days,
            force,
            host,
        } => issue(&dir, &name, days, force, &host, out),
    }
}

fn init(dir: &Path, trust_domain: &str, force: bool, out: Output) -> Result<(), CliError> {
    let ca = DevCa::for_trust_domain(trust_domain)
        .map_err(|e| CliError::new(format!("--trust-domain: {}", e.message())))?;
    let cert = dir.join("ca.pem");
    let key = dir.join("ca.key");
    let readme = dir.join("README.txt");
    let replaced = cert.exists() || key.exists();
    let readme_contents = readme_text(trust_domain);
    let files = [
        (&cert, ca.cert_pem(), 0o644),
        (&key, ca.key_pem(), 0o600),
        (&readme, readme_contents.as_str(), 0o644),
    ];
    // The README is ours to rewrite; the CA is only replaced with --force.
    refuse_existing(&[&cert, &key], force, "replace the CA")?;
    create_dir(dir)?;
    for (path, contents, mode) in files {
        write_file(path, contents, mode)?;
    }
    let mut text = format!(
        "{} development CA for {trust_domain}: {} and {} (INSECURE: development only)",
        if replaced { "replaced the" } else { "wrote a" },
        cert.display(),
        key.display()
    );
    if replaced {
        text.push_str(
            "\ncertificates issued by the old CA are no longer trusted: issue them again",
        );
    }
    text.push_str(&format!(
        "\nnext: vicus certs issue NAME --dir {}",
        dir.display()
    ));
    out.result(
        &text,
        &json!({
            "trust_domain": trust_domain,
            "ca_cert": shown(&cert),
            "ca_key": shown(&key),
            "readme": shown(&readme),
            "replaced": replaced,
        }),
    );
    Ok(())
}

fn issue(
    dir: &Path,
    name: &str,
    days: u64,
    force: bool,
    hosts: &[String],
    out: Output,
) -> Result<(), CliError> {
    check_name(name)?;
    for host in hosts {
        let dns_like = !host.is_empty()
            && host.len() <= 253
            && host.split('.').all(|l| {
                !l.is_empty() && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            });
        if host.parse::<std::net::IpAddr>().is_err() && !dns_like {
            return Err(CliError::new(format!(
                "--host {host:?}: give a DNS name (e.g. alpha.internal) or an IP address"
            )));
        }
    }
    if !(1..=MAX_LEAF_DAYS).contains(&days) {
        return Err(CliError::new(format!(
            "--days {days}: give 1 to {MAX_LEAF_DAYS} (the CA itself is valid for a year)"
        )));
    }
    let mut ca = load_ca(dir)?;
    let trust_domain = ca.trust_domain().map(str::to_owned).ok_or_else(|| {
        CliError::new(format!(
            "{} names no trust domain (no spiffe:// URI SAN): it was not made by `vicus certs \
             init`; create one with `vicus certs init --dir {}`",
            dir.join("ca.pem").display(),
            dir.display()
        ))
    })?;
    let id = DomusId::spiffe(&trust_domain, name)
        .map_err(|e| CliError::new(format!("NAME {name:?}: {}", e.message())))?;
    let cert = dir.join(format!("{name}.pem"));
    let key = dir.join(format!("{name}.key"));
    refuse_existing(&[&cert, &key], force, "replace them")?;
    let mut spec = LeafSpec::uri(id.as_str());
    spec.dns_names = hosts.to_vec();
    let not_after = SystemTime::now() + Duration::from_secs(days * 86_400);
    spec.not_after = not_after;
    let leaf = ca
        .leaf_with(&spec)
        .map_err(|e| CliError::new(format!("cannot issue {name}: {e}")))?;
    write_file(&cert, leaf.cert_pem(), 0o644)?;
    write_file(&key, leaf.key_pem(), 0o600)?;
    let until = time::OffsetDateTime::from(not_after).date();
    out.result(
        &format!(
            "issued {id}: {} and {}, valid until {until} (INSECURE: development only)",
            cert.display(),
            key.display()
        ),
        &json!({
            "identity": id.as_str(),
            "cert": shown(&cert),
            "key": shown(&key),
            "ca": shown(&dir.join("ca.pem")),
            "valid_days": days,
            "not_after": until.to_string(),
            "hosts": hosts,
        }),
    );
    Ok(())
}

/// A path for JSON output.
fn shown(path: &Path) -> String {
    path.display().to_string()
}

/// Loads the CA `vicus certs init` wrote to `dir`.
fn load_ca(dir: &Path) -> Result<DevCa, CliError> {
    let cert_path = dir.join("ca.pem");
    let key_path = dir.join("ca.key");
    let read = |path: &Path| {
        fs::read_to_string(path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                CliError::new(format!(
                    "no CA in {} ({} is missing): run `vicus certs init --dir {}` first, or \
                     point --dir at the CA's directory",
                    dir.display(),
                    path.display(),
                    dir.display()
                ))
            } else {
                CliError::new(format!("cannot read {}: {e}", path.display()))
            }
        })
    };
    let cert = read(&cert_path)?;
    // The CA key is wiped from memory when this function returns.
    let key = zeroize::Zeroizing::new(read(&key_path)?);
    DevCa::from_pem(&cert, &key).map_err(|e| {
        CliError::new(format!(
            "{} / {}: {}",
            cert_path.display(),
            key_path.display(),
            e.message()
        ))
    })
}

/// A node name: a DNS label in lower case (so it is a file name and an id segment everywhere).
fn check_name(name: &str) -> Result<(), CliError> {
    let fits = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if !fits {
        return Err(CliError::new(format!(
            "NAME {name:?}: use 1 to 63 lower-case letters, digits and '-', not starting or \
             ending with '-' (e.g. alpha, billing-1)"
        )));
    }
    if name == "ca" {
        return Err(CliError::new(
            "NAME \"ca\" would overwrite the CA's own files: choose another name",
        ));
    }
    Ok(())
}

/// Fails, naming the first of `paths` that exists, unless `force`.
fn refuse_existing(paths: &[&PathBuf], force: bool, what: &str) -> Result<(), CliError> {
    if force {
        return Ok(());
    }
    match paths.iter().find(|p| p.exists()) {
        Some(existing) => Err(CliError::new(format!(
            "{} exists: pass --force to {what}, or choose another --dir",
            existing.display()
        ))),
        None => Ok(()),
    }
}

fn create_dir(dir: &Path) -> Result<(), CliError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| CliError::new(format!("--dir: cannot create {}: {e}", dir.display())))
}

/// Writes `contents` to `path` with `mode`: into a new temporary file beside it, then renamed
/// over `path`, so a reader never sees half a file and a key is never readable by others,
/// not even for a moment.
fn write_file(path: &Path, contents: &str, mode: u32) -> Result<(), CliError> {
    let failed = |e: std::io::Error| CliError::new(format!("cannot write {}: {e}", path.display()));
    let file_name = path.file_name().map(|n| n.to_string_lossy().into_owned());
    let tmp = path.with_file_name(format!(
        ".{}.{}.tmp",
        file_name.as_deref().unwrap_or("vicus"),
        std::process::id()
    ));
    let written = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .and_then(|mut f| {
            f.write_all(contents.as_bytes())?;
            f.sync_all()
        })
        .and_then(|()| fs::rename(&tmp, path));
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(failed(e));
    }
    Ok(())
}

fn readme_text(trust_domain: &str) -> String {
    format!(
        "INSECURE DEVELOPMENT CERTIFICATES — written by `vicus certs`

Everything in this directory is insecure development material. The CA's private key
(ca.key) sits here unprotected, so anyone who can read it can mint any identity in the
trust domain {trust_domain}. Never deploy these files, never add ca.pem to a trust store
outside development, and never commit this directory.

  ca.pem       the CA certificate (the trust bundle nodes load as [tls] ca)
  ca.key       the CA's private key (mode 0600)
  NAME.pem     a node certificate: the single URI SAN spiffe://{trust_domain}/domus/NAME,
               usable as TLS client and server
  NAME.key     its private key (mode 0600)

Issue another node certificate with `vicus certs issue NAME --dir <this directory>`.
Production identities come from your own CA, SPIRE or cert-manager; vicus accepts any
certificate whose leaf carries exactly one URI SAN.
"
    )
}
