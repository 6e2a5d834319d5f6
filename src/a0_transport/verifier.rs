//! The one certificate verifier vicus uses, for both directions of the mutual handshake.
//!
//! **Why a custom verifier, and why it is still strict.** rustls' stock server verifier checks
//! DNS/IP names, but a domus is named by a URI SAN, not by its address. So this verifier runs
//! exactly the checks rustls' webpki verifiers run — chain building to the configured trust
//! anchors only (never system roots), validity window at the handshake time rustls passes in,
//! extended key usage (`serverAuth` for the listener's certificate, `clientAuth` for the
//! dialer's), signature algorithms from the crypto provider, CRLs with unknown status and
//! expired CRLs failing closed — through the same `rustls-webpki` calls, and then replaces the
//! DNS name check with ours: the leaf must carry exactly one URI SAN that parses as a
//! [`DomusId`], the [`TrustPolicy`] must accept it, and on the dialer side it must equal the
//! identity the route expected. Handshake signatures are checked by rustls' own
//! `verify_tls13_signature`. TLS 1.2 is not offered, so its signature hook always fails.
//!
//! One verifier is made per handshake. It records the full, human-readable reason for a refusal
//! in `detail`, because rustls carries only a coarse error (and turns it into the alert the peer
//! sees); the handshake code reads `detail` back to build the caller's [`Error`].
//!
//! This module does no IO and never reads the clock itself.

use std::fmt;
use std::sync::{Arc, Mutex};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{WebPkiSupportedAlgorithms, verify_tls13_signature};
use rustls::pki_types::{CertificateDer, ServerName, TrustAnchor, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};
use webpki::{
    CertRevocationList, EndEntityCert, ExpirationPolicy, KeyUsage, OwnedCertRevocationList,
    RevocationCheckDepth, RevocationOptionsBuilder, UnknownStatusPolicy,
};

use super::identity::{DomusId, TrustPolicy};
use super::material::AuthConfig;
use crate::error::{Error, ErrorId, untrusted};

/// Trust anchors, CRLs and signature algorithms, parsed once per loaded [`AuthConfig`].
pub(crate) struct TrustStore {
    roots: Vec<TrustAnchor<'static>>,
    crls: Vec<CertRevocationList<'static>>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl TrustStore {
    pub(crate) fn new(
        auth: &AuthConfig,
        algorithms: WebPkiSupportedAlgorithms,
    ) -> Result<Self, Error> {
        let mut roots = Vec::with_capacity(auth.trust_anchors.len());
        for (n, ca) in auth.trust_anchors.iter().enumerate() {
            let anchor = webpki::anchor_from_trusted_cert(ca).map_err(|e| {
                Error::new(
                    ErrorId::InvalidAuthMaterial,
                    format!(
                        "CA certificate #{} in the bundle cannot be used as a trust anchor: {e}",
                        n.saturating_add(1)
                    ),
                )
            })?;
            roots.push(anchor.to_owned());
        }
        let mut crls = Vec::with_capacity(auth.crls.len());
        for (n, crl) in auth.crls.iter().enumerate() {
            let owned = OwnedCertRevocationList::from_der(crl).map_err(|e| {
                Error::new(
                    ErrorId::InvalidAuthMaterial,
                    format!("CRL #{} cannot be parsed: {e}", n.saturating_add(1)),
                )
            })?;
            crls.push(CertRevocationList::from(owned));
        }
        Ok(Self {
            roots,
            crls,
            algorithms,
        })
    }

    /// Verifies a peer's chain for `usage` at `now` and returns the leaf's [`DomusId`].
    pub(crate) fn verify(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        usage: KeyUsage,
    ) -> Result<DomusId, (rustls::Error, Error)> {
        let cert = EndEntityCert::try_from(end_entity).map_err(|e| {
            (
                CertificateError::BadEncoding.into(),
                rejected(format!("the peer's certificate cannot be parsed: {e}")),
            )
        })?;
        let subject = describe_claimed_identity(&cert);
        let crl_refs: Vec<&CertRevocationList<'static>> = self.crls.iter().collect();
        let revocation = match RevocationOptionsBuilder::new(&crl_refs) {
            Ok(builder) => Some(
                builder
                    .with_depth(RevocationCheckDepth::Chain)
                    .with_status_policy(UnknownStatusPolicy::Deny)
                    .with_expiration_policy(ExpirationPolicy::Enforce)
                    .build(),
            ),
            // No CRLs configured: revocation is not checked.
            Err(_) => None,
        };
        cert.verify_for_usage(
            self.algorithms.all,
            &self.roots,
            intermediates,
            now,
            usage,
            revocation,
            None,
        )
        .map_err(|e| map_webpki_error(e, &subject))?;
        domus_id_of(&cert).map_err(|e| (CertificateError::ApplicationVerificationFailure.into(), e))
    }
}

fn rejected(message: String) -> Error {
    Error::new(ErrorId::PeerCertificateRejected, message)
}

/// "certificate for spiffe://x" — or a description of what the unverified leaf claims.
fn describe_claimed_identity(cert: &EndEntityCert<'_>) -> String {
    let uris: Vec<&str> = cert.valid_uri_names().take(3).collect();
    match uris.as_slice() {
        [] => "peer certificate (no URI SAN)".to_owned(),
        [one] => format!("certificate for {}", untrusted(one)),
        many => format!(
            "certificate for {} (and more URIs)",
            untrusted(many.first().copied().unwrap_or_default())
        ),
    }
}

/// The [`DomusId`] named by a leaf certificate: its single URI SAN.
pub(crate) fn domus_id_of(cert: &EndEntityCert<'_>) -> Result<DomusId, Error> {
    let mut uris = cert.valid_uri_names();
    let Some(first) = uris.next() else {
        return Err(rejected(
            "the peer's certificate has no URI SAN; a vicus identity is the certificate's single URI SAN (e.g. spiffe://trust.domain/domus/name)".to_owned(),
        ));
    };
    if uris.next().is_some() {
        return Err(rejected(format!(
            "the peer's certificate carries more than one URI SAN (first: {}); vicus needs exactly one to know who the peer is",
            untrusted(first)
        )));
    }
    DomusId::new(first).map_err(|e| {
        rejected(format!(
            "the peer's URI SAN is not a usable domus id: {}",
            e.message()
        ))
    })
}

fn map_webpki_error(e: webpki::Error, subject: &str) -> (rustls::Error, Error) {
    use webpki::Error as W;
    match e {
        W::CertExpired { time, not_after } => (
            CertificateError::ExpiredContext { time, not_after }.into(),
            rejected(format!(
                "{subject} expired at {} (checked at {}); renew it",
                rfc3339(not_after),
                rfc3339(time)
            )),
        ),
        W::CertNotValidYet { time, not_before } => (
            CertificateError::NotValidYetContext { time, not_before }.into(),
            rejected(format!(
                "{subject} is not valid until {} (checked at {}); check the issuer's and this host's clocks",
                rfc3339(not_before),
                rfc3339(time)
            )),
        ),
        W::UnknownIssuer => (
            CertificateError::UnknownIssuer.into(),
            rejected(format!(
                "{subject} does not chain to any CA in our trust bundle (unknown issuer); is it signed by another CA?"
            )),
        ),
        W::CertRevoked => (
            CertificateError::Revoked.into(),
            rejected(format!(
                "{subject} has been revoked (listed in a configured CRL)"
            )),
        ),
        W::UnknownRevocationStatus => (
            CertificateError::UnknownRevocationStatus.into(),
            rejected(format!(
                "{subject}: no configured CRL covers its issuer, and unknown revocation status is refused; add that issuer's CRL"
            )),
        ),
        W::CrlExpired { time, next_update } => (
            CertificateError::ExpiredRevocationListContext { time, next_update }.into(),
            rejected(format!(
                "{subject}: the CRL that covers it expired at {} (checked at {}); load a fresh CRL",
                rfc3339(next_update),
                rfc3339(time)
            )),
        ),
        #[allow(deprecated)]
        W::RequiredEkuNotFound | W::RequiredEkuNotFoundContext(_) => (
            CertificateError::InvalidPurpose.into(),
            rejected(format!(
                "{subject} is not issued for this role (extended key usage lacks serverAuth/clientAuth as needed)"
            )),
        ),
        W::InvalidSignatureForPublicKey => (
            CertificateError::BadSignature.into(),
            rejected(format!("{subject} has a signature that does not verify")),
        ),
        other => (
            CertificateError::BadEncoding.into(),
            rejected(format!("{subject} was refused: {other}")),
        ),
    }
}

/// Formats seconds since the Unix epoch as an RFC 3339 UTC timestamp.
pub(crate) fn rfc3339(t: UnixTime) -> String {
    let secs = t.as_secs();
    let days = secs / 86_400;
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to a (year, month, day) in the proleptic Gregorian calendar.
// `days` is at most u64::MAX / 86 400 (about 2.1e14), so no step below can overflow or
// underflow: every subtraction removes a part of the value it is subtracted from.
#[allow(clippy::arithmetic_side_effects)]
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    // Shift the epoch to 0000-03-01 so leap days fall at the end of each 400-year era.
    let z = days + 719_468;
    let era = z / 146_097;
    let day_of_era = z % 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let mp = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = year_of_era + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

/// The per-handshake verifier, used as rustls' client-certificate verifier on the listener side
/// and as its server-certificate verifier on the dialer side. See the module docs.
pub(crate) struct PeerVerifier {
    store: Arc<TrustStore>,
    policy: Arc<TrustPolicy>,
    expected: Option<DomusId>,
    detail: Mutex<Option<Error>>,
}

impl PeerVerifier {
    pub(crate) fn new(
        store: Arc<TrustStore>,
        policy: Arc<TrustPolicy>,
        expected: Option<DomusId>,
    ) -> Self {
        Self {
            store,
            policy,
            expected,
            detail: Mutex::new(None),
        }
    }

    /// The full reason for the last refusal, if this verifier refused the peer.
    pub(crate) fn take_detail(&self) -> Option<Error> {
        self.detail.lock().ok().and_then(|mut d| d.take())
    }

    fn check(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        usage: KeyUsage,
    ) -> Result<(), rustls::Error> {
        let outcome = self
            .store
            .verify(end_entity, intermediates, now, usage)
            .and_then(|id| {
                self.policy
                    .check(&id)
                    .map_err(|e| (CertificateError::ApplicationVerificationFailure.into(), e))?;
                match &self.expected {
                    Some(expected) if *expected != id => Err((
                        CertificateError::ApplicationVerificationFailure.into(),
                        Error::new(
                            ErrorId::IdentityMismatch,
                            format!("peer presented {id}, expected {expected}"),
                        ),
                    )),
                    _ => Ok(()),
                }
            });
        match outcome {
            Ok(()) => Ok(()),
            Err((tls_error, detail)) => {
                if let Ok(mut slot) = self.detail.lock() {
                    *slot = Some(detail);
                }
                Err(tls_error)
            }
        }
    }

    fn signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.store.algorithms)
    }
}

impl fmt::Debug for PeerVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PeerVerifier")
            .field("policy", &self.policy)
            .field("expected", &self.expected)
            .finish_non_exhaustive()
    }
}

fn tls12_refused() -> rustls::Error {
    rustls::Error::PeerIncompatible(rustls::PeerIncompatible::Tls12NotOffered)
}

impl ClientCertVerifier for PeerVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // No hints: every vicus node has exactly one certificate, so naming our CAs to
        // unauthenticated clients would only leak information.
        &[]
    }

    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.check(end_entity, intermediates, now, KeyUsage::client_auth())
            .map(|()| ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(tls12_refused())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.store.algorithms.supported_schemes()
    }
}

impl ServerCertVerifier for PeerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // The server name is a fixed placeholder (SNI is off); identity is the URI SAN, checked
        // against `expected` in `check`.
        self.check(end_entity, intermediates, now, KeyUsage::server_auth())
            .map(|()| ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(tls12_refused())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.store.algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_formats_known_instants() {
        let at = |s| {
            rfc3339(UnixTime::since_unix_epoch(std::time::Duration::from_secs(
                s,
            )))
        };
        assert_eq!(at(0), "1970-01-01T00:00:00Z");
        assert_eq!(at(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(at(1_795_000_000), "2026-11-18T11:06:40Z");
    }
}
