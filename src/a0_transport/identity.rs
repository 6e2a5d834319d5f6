//! Who a peer is: [`DomusId`] (the URI SAN of its verified leaf certificate), [`PeerIdentity`]
//! (what a handshake proved about the peer) and [`TrustPolicy`] (which ids this domus accepts).
//!
//! Pure data and string checks: no IO, no TLS, no clock. Parsing is strict on purpose — an id is
//! compared byte for byte, so anything that could make two spellings mean the same id (upper-case
//! scheme or host, `.`/`..` segments, a trailing slash, percent-escapes, a query or fragment,
//! user-info) is refused rather than normalised.

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use crate::error::{Error, ErrorId, untrusted};

/// The longest accepted [`DomusId`], in bytes (SPIFFE's limit).
pub const DOMUS_ID_MAX_LEN: usize = 2048;

/// The longest accepted authority (SPIFFE trust domain), in bytes.
const AUTHORITY_MAX_LEN: usize = 255;

/// The identity of a domus: the single URI SAN of its leaf certificate, such as
/// `spiffe://acme.internal/domus/billing-1`.
///
/// Accepted form: `scheme://authority[/segment…]` where the scheme is lower-case
/// (`[a-z][a-z0-9+.-]*`), the authority is a lower-case host (`[a-z0-9._-]`, optionally `:port`),
/// and each path segment is non-empty, not `.` or `..`, and made of `[A-Za-z0-9._~-]`. A
/// `spiffe://` id must have a path (a trust domain alone names no workload). Cloning is cheap.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DomusId(Arc<str>);

impl DomusId {
    /// Parses and validates an id.
    pub fn new(s: &str) -> Result<Self, Error> {
        validate_domus_id(s).map_err(|why| {
            Error::new(
                ErrorId::InvalidDomusId,
                format!("\"{}\" is not a valid domus id: {why}", untrusted(s)),
            )
        })?;
        Ok(Self(Arc::from(s)))
    }

    /// Builds the SPIFFE-shaped id `spiffe://<trust_domain>/domus/<name>`.
    pub fn spiffe(trust_domain: &str, name: &str) -> Result<Self, Error> {
        Self::new(&format!("spiffe://{trust_domain}/domus/{name}"))
    }

    /// The id as written in the certificate.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The URI scheme, e.g. `spiffe`.
    pub fn scheme(&self) -> &str {
        self.0.split_once("://").map_or("", |(scheme, _)| scheme)
    }

    /// The authority: for SPIFFE ids, the trust domain (e.g. `acme.internal`).
    pub fn trust_domain(&self) -> &str {
        let rest = self.0.split_once("://").map_or("", |(_, rest)| rest);
        rest.split_once('/')
            .map_or(rest, |(authority, _)| authority)
    }

    /// The path after the authority, including its leading `/` (empty when there is none).
    pub fn path(&self) -> &str {
        let rest = self.0.split_once("://").map_or("", |(_, rest)| rest);
        rest.find('/').map_or("", |at| &rest[at..])
    }
}

impl FromStr for DomusId {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        Self::new(s)
    }
}

impl TryFrom<&str> for DomusId {
    type Error = Error;
    fn try_from(s: &str) -> Result<Self, Error> {
        Self::new(s)
    }
}

impl fmt::Display for DomusId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for DomusId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DomusId({})", self.0)
    }
}

fn validate_domus_id(s: &str) -> Result<(), &'static str> {
    if s.is_empty() {
        return Err("it is empty");
    }
    if s.len() > DOMUS_ID_MAX_LEN {
        return Err("it is longer than 2048 bytes");
    }
    if !s.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("it contains whitespace, control or non-ASCII characters");
    }
    let (scheme, rest) = s
        .split_once("://")
        .ok_or("it is not of the form scheme://authority/path")?;
    let mut scheme_bytes = scheme.bytes();
    match scheme_bytes.next() {
        Some(b) if b.is_ascii_lowercase() => {}
        _ => return Err("the scheme must start with a lower-case letter"),
    }
    if !scheme_bytes.all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"+.-".contains(&b)) {
        return Err("the scheme may only contain a-z, 0-9, '+', '.' and '-'");
    }
    if rest.contains(['?', '#']) {
        return Err("a query or fragment is not allowed");
    }
    let (authority, path) = match rest.find('/') {
        Some(at) => rest.split_at(at),
        None => (rest, ""),
    };
    validate_authority(authority)?;
    if scheme == "spiffe" && path.is_empty() {
        return Err("a spiffe:// id needs a path after the trust domain");
    }
    if path.is_empty() {
        return Ok(());
    }
    if path.ends_with('/') {
        return Err("a trailing '/' is not allowed");
    }
    for segment in path.split('/').skip(1) {
        if segment.is_empty() {
            return Err("empty path segments ('//') are not allowed");
        }
        if segment == "." || segment == ".." {
            return Err("'.' and '..' path segments are not allowed");
        }
        if !segment
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._~-".contains(&b))
        {
            return Err("path segments may only contain A-Z, a-z, 0-9, '.', '_', '~' and '-'");
        }
    }
    Ok(())
}

fn validate_authority(authority: &str) -> Result<(), &'static str> {
    if authority.is_empty() {
        return Err("the authority (trust domain) is empty");
    }
    if authority.len() > AUTHORITY_MAX_LEN {
        return Err("the authority (trust domain) is longer than 255 bytes");
    }
    let (host, port) = match authority.split_once(':') {
        Some((host, port)) => (host, Some(port)),
        None => (authority, None),
    };
    if host.is_empty() {
        return Err("the authority has no host");
    }
    if !host
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
    {
        return Err(
            "the authority may only contain a-z, 0-9, '.', '_' and '-' (no user-info, no upper case)",
        );
    }
    if let Some(port) = port
        && (port.is_empty() || port.len() > 5 || !port.bytes().all(|b| b.is_ascii_digit()))
    {
        return Err("the authority's port must be 1 to 5 digits");
    }
    Ok(())
}

/// The SHA-256 digest of a peer's DER-encoded leaf certificate.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct CertFingerprint(pub [u8; 32]);

impl fmt::Display for CertFingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for CertFingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CertFingerprint({self})")
    }
}

/// The kernel's credentials for the process at the other end of a Unix socket, read with
/// `SO_PEERCRED` when the connection was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct UnixCredentials {
    /// The peer process's user id.
    pub uid: u32,
    /// The peer process's group id.
    pub gid: u32,
    /// The peer process's id, where the platform reports it.
    pub pid: Option<i32>,
}

/// What a completed handshake proved about the peer.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PeerIdentity {
    id: DomusId,
    fingerprint: CertFingerprint,
    unix: Option<UnixCredentials>,
}

impl PeerIdentity {
    pub(crate) fn new(
        id: DomusId,
        fingerprint: CertFingerprint,
        unix: Option<UnixCredentials>,
    ) -> Self {
        Self {
            id,
            fingerprint,
            unix,
        }
    }

    /// The verified id (the URI SAN of the peer's leaf certificate).
    pub fn id(&self) -> &DomusId {
        &self.id
    }

    /// The SHA-256 fingerprint of the peer's leaf certificate.
    pub fn fingerprint(&self) -> CertFingerprint {
        self.fingerprint
    }

    /// The peer process's uid/gid/pid, on Unix-socket connections.
    pub fn unix_credentials(&self) -> Option<UnixCredentials> {
        self.unix
    }
}

impl fmt::Display for PeerIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.id)?;
        if let Some(c) = self.unix {
            write!(f, " (uid {}, gid {}", c.uid, c.gid)?;
            if let Some(pid) = c.pid {
                write!(f, ", pid {pid}")?;
            }
            f.write_str(")")?;
        }
        Ok(())
    }
}

/// Which verified ids this domus accepts from peers, in both directions.
///
/// The certificate chain is always verified against the configured CA bundle first; the policy
/// then narrows which of those certificates' ids are welcome. The default accepts any valid
/// [`DomusId`].
#[derive(Clone, PartialEq, Eq, Default)]
pub struct TrustPolicy {
    rule: Rule,
}

#[derive(Clone, PartialEq, Eq, Default)]
enum Rule {
    #[default]
    Any,
    TrustDomains(BTreeSet<String>),
    Prefixes(Vec<String>),
    AllowList(BTreeSet<DomusId>),
}

impl TrustPolicy {
    /// Accepts any valid [`DomusId`] whose certificate chains to the CA bundle (the default).
    pub fn any() -> Self {
        Self::default()
    }

    /// Accepts only ids whose authority (trust domain) is one of `domains`.
    pub fn trust_domains<I, S>(domains: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self {
            rule: Rule::TrustDomains(domains.into_iter().map(Into::into).collect()),
        }
    }

    /// Accepts only ids in the trust domain `domain`.
    pub fn trust_domain(domain: impl Into<String>) -> Self {
        Self::trust_domains([domain])
    }

    /// Accepts only ids that equal one of `prefixes` or continue it at a `/` boundary: the
    /// prefix `spiffe://acme/domus` accepts `spiffe://acme/domus/a` but not
    /// `spiffe://acme/domusevil`.
    pub fn prefixes<I, S>(prefixes: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self {
            rule: Rule::Prefixes(prefixes.into_iter().map(Into::into).collect()),
        }
    }

    /// Accepts exactly the listed ids.
    pub fn allow_list<I>(ids: I) -> Self
    where
        I: IntoIterator<Item = DomusId>,
    {
        Self {
            rule: Rule::AllowList(ids.into_iter().collect()),
        }
    }

    /// Checks `id` against the policy; the error says why it was refused.
    pub fn check(&self, id: &DomusId) -> Result<(), Error> {
        let allowed = match &self.rule {
            Rule::Any => true,
            Rule::TrustDomains(domains) => domains.contains(id.trust_domain()),
            Rule::Prefixes(prefixes) => prefixes.iter().any(|p| has_segment_prefix(id, p)),
            Rule::AllowList(ids) => ids.contains(id),
        };
        if allowed {
            Ok(())
        } else {
            Err(Error::new(
                ErrorId::PeerCertificateRejected,
                format!("peer {id} is not allowed by the trust policy ({self:?})"),
            ))
        }
    }
}

fn has_segment_prefix(id: &DomusId, prefix: &str) -> bool {
    let id = id.as_str();
    match id.strip_prefix(prefix) {
        Some("") => true,
        Some(rest) => prefix.ends_with('/') || rest.starts_with('/'),
        None => false,
    }
}

impl fmt::Debug for TrustPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.rule {
            Rule::Any => f.write_str("any id"),
            Rule::TrustDomains(d) => write!(f, "trust domains {d:?}"),
            Rule::Prefixes(p) => write!(f, "prefixes {p:?}"),
            Rule::AllowList(ids) if ids.len() <= 8 => {
                write!(
                    f,
                    "allow-list {:?}",
                    ids.iter().map(DomusId::as_str).collect::<Vec<_>>()
                )
            }
            Rule::AllowList(ids) => write!(f, "allow-list of {} ids", ids.len()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_spiffe_and_generic_ids() {
        for ok in [
            "spiffe://vicus.dev/domus/a",
            "spiffe://acme.internal/ns/prod/sa/billing-1",
            "vicus://node-7",
            "urn-like+x://host_1:8443/a/b~c",
        ] {
            let id = DomusId::new(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
            assert_eq!(id.as_str(), ok);
        }
        let id = DomusId::new("spiffe://vicus.dev/domus/a").unwrap();
        assert_eq!(id.scheme(), "spiffe");
        assert_eq!(id.trust_domain(), "vicus.dev");
        assert_eq!(id.path(), "/domus/a");
    }

    #[test]
    fn t03_refuses_ambiguous_or_malformed_ids() {
        for bad in [
            "",
            "spiffe://vicus.dev",
            "spiffe://vicus.dev/",
            "spiffe://Vicus.dev/a",
            "SPIFFE://vicus.dev/a",
            "spiffe://vicus.dev/a/",
            "spiffe://vicus.dev//a",
            "spiffe://vicus.dev/./a",
            "spiffe://vicus.dev/../a",
            "spiffe://vicus.dev/a?x=1",
            "spiffe://vicus.dev/a#f",
            "spiffe://user@vicus.dev/a",
            "spiffe://vicus.dev/a%2fb",
            "spiffe://vicus.dev/a b",
            "spiffe://vicus.dev/a\nb",
            "spiffe://vicus.dev/é",
            "spiffe:///a",
            "spiffe://:1/a",
            "spiffe://h:123456/a",
            "1abc://h/a",
            "no-scheme/a",
        ] {
            let err = DomusId::new(bad).expect_err(bad);
            assert_eq!(err.id(), ErrorId::InvalidDomusId, "{bad}");
            assert!(!err.message().contains('\n'));
        }
        let long = format!("spiffe://d/{}", "a".repeat(DOMUS_ID_MAX_LEN));
        assert!(DomusId::new(&long).is_err());
    }

    #[test]
    fn trust_policy_rules() {
        let a = DomusId::new("spiffe://acme/domus/a").unwrap();
        let evil = DomusId::new("spiffe://acme/domusevil").unwrap();
        let other = DomusId::new("spiffe://other/domus/a").unwrap();
        assert!(TrustPolicy::any().check(&other).is_ok());
        let td = TrustPolicy::trust_domain("acme");
        assert!(td.check(&a).is_ok());
        assert_eq!(
            td.check(&other).unwrap_err().id(),
            ErrorId::PeerCertificateRejected
        );
        let p = TrustPolicy::prefixes(["spiffe://acme/domus"]);
        assert!(p.check(&a).is_ok());
        assert!(p.check(&evil).is_err());
        let p2 = TrustPolicy::prefixes(["spiffe://acme/domus/"]);
        assert!(p2.check(&a).is_ok());
        let list = TrustPolicy::allow_list([a.clone()]);
        assert!(list.check(&a).is_ok());
        assert!(list.check(&evil).is_err());
        let scheme_only = TrustPolicy::prefixes(["spiffe://"]);
        assert!(scheme_only.check(&a).is_ok());
        assert!(
            scheme_only
                .check(&DomusId::new("vicus://a").unwrap())
                .is_err()
        );
    }
}
