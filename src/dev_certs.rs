//! Development certificates minted at run time with rcgen (feature `dev-certs`).
//!
//! **Insecure by design: for examples, tests and local development only.** The CA key lives in
//! process memory and is never protected; nothing here belongs in a production deployment, where
//! identities come from your own CA, SPIRE or cert-manager.
//!
//! A [`DevCa`] mints leaf certificates whose single URI SAN is a [`DomusId`] (by default
//! `spiffe://vicus.dev/domus/<name>`, valid for client and server authentication), and can also
//! mint the broken ones the test suite needs: expired, not yet valid, without a URI SAN, with
//! the wrong key usage, and revocation lists. This module does no IO.

use std::fmt;
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, RevocationReason,
    RevokedCertParams, SanType, SerialNumber,
};
use rustls_pki_types::{
    CertificateDer, CertificateRevocationListDer, PrivateKeyDer, PrivatePkcs8KeyDer,
};
use zeroize::Zeroizing;

use crate::a0_transport::{AuthConfig, DomusId};
use crate::error::{Error, ErrorId};

/// The trust domain of development identities.
pub const DEV_TRUST_DOMAIN: &str = "vicus.dev";

fn mint_error(e: impl fmt::Display) -> Error {
    Error::new(
        ErrorId::InvalidAuthMaterial,
        format!("minting a development certificate failed: {e}"),
    )
}

/// A development certificate authority held in memory.
pub struct DevCa {
    issuer: Issuer<'static, KeyPair>,
    cert: CertificateDer<'static>,
    cert_pem: String,
    next_serial: u64,
}

impl fmt::Debug for DevCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DevCa")
            .field("key", &"[redacted]")
            .finish_non_exhaustive()
    }
}

/// What a minted leaf looks like. `Default` is a valid vicus identity: one URI SAN, valid from
/// an hour ago for 30 days, usable as client and server.
#[derive(Debug, Clone)]
pub struct LeafSpec {
    /// URI SANs (a vicus identity needs exactly one).
    pub uris: Vec<String>,
    /// DNS SANs.
    pub dns_names: Vec<String>,
    /// Start of validity.
    pub not_before: SystemTime,
    /// End of validity.
    pub not_after: SystemTime,
    /// Include the `clientAuth` extended key usage.
    pub client_auth: bool,
    /// Include the `serverAuth` extended key usage.
    pub server_auth: bool,
}

impl LeafSpec {
    /// A valid spec for `spiffe://vicus.dev/domus/<name>`.
    pub fn domus(name: &str) -> Self {
        Self::uri(format!("spiffe://{DEV_TRUST_DOMAIN}/domus/{name}"))
    }

    /// A valid spec whose single URI SAN is `uri`.
    pub fn uri(uri: impl Into<String>) -> Self {
        let now = SystemTime::now();
        Self {
            uris: vec![uri.into()],
            dns_names: Vec::new(),
            not_before: now - Duration::from_secs(3600),
            not_after: now + Duration::from_secs(30 * 86_400),
            client_auth: true,
            server_auth: true,
        }
    }
}

/// A minted leaf certificate and its private key.
pub struct DevLeaf {
    cert: CertificateDer<'static>,
    cert_pem: String,
    key_der: Zeroizing<Vec<u8>>,
    key_pem: Zeroizing<String>,
    serial: u64,
}

impl fmt::Debug for DevLeaf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DevLeaf")
            .field("serial", &self.serial)
            .field("key", &"[redacted]")
            .finish_non_exhaustive()
    }
}

impl DevLeaf {
    /// The certificate (DER).
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert
    }

    /// The certificate (PEM).
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The PKCS#8 private key (PEM).
    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// The PKCS#8 private key (DER).
    pub fn key_der(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_der.to_vec()))
    }
}

impl DevCa {
    /// Mints a new self-signed CA whose common name is `name`.
    pub fn new(name: &str) -> Result<Self, Error> {
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(mint_error)?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = SystemTime::now();
        params.not_before = (now - Duration::from_secs(2 * 3600)).into();
        params.not_after = (now + Duration::from_secs(365 * 86_400)).into();
        let key = KeyPair::generate().map_err(mint_error)?;
        let cert = params.self_signed(&key).map_err(mint_error)?;
        Ok(Self {
            cert_pem: cert.pem(),
            cert: cert.der().clone(),
            issuer: Issuer::new(params, key),
            next_serial: 1000,
        })
    }

    /// The CA certificate (DER).
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert
    }

    /// The CA certificate (PEM).
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Mints a valid leaf for `spiffe://vicus.dev/domus/<name>`.
    pub fn leaf(&mut self, name: &str) -> Result<DevLeaf, Error> {
        self.leaf_with(&LeafSpec::domus(name))
    }

    /// Mints a leaf as `spec` says (which may be deliberately broken).
    pub fn leaf_with(&mut self, spec: &LeafSpec) -> Result<DevLeaf, Error> {
        let mut params = CertificateParams::new(spec.dns_names.clone()).map_err(mint_error)?;
        for uri in &spec.uris {
            let uri = uri.as_str().try_into().map_err(mint_error)?;
            params.subject_alt_names.push(SanType::URI(uri));
        }
        params
            .distinguished_name
            .push(DnType::CommonName, "vicus dev domus");
        params.not_before = spec.not_before.into();
        params.not_after = spec.not_after.into();
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        if spec.client_auth {
            params
                .extended_key_usages
                .push(ExtendedKeyUsagePurpose::ClientAuth);
        }
        if spec.server_auth {
            params
                .extended_key_usages
                .push(ExtendedKeyUsagePurpose::ServerAuth);
        }
        let serial = self.next_serial;
        self.next_serial = self.next_serial.wrapping_add(1);
        params.serial_number = Some(SerialNumber::from(serial));
        let key = KeyPair::generate().map_err(mint_error)?;
        let cert = params.signed_by(&key, &self.issuer).map_err(mint_error)?;
        Ok(DevLeaf {
            cert_pem: cert.pem(),
            cert: cert.der().clone(),
            key_der: Zeroizing::new(key.serialize_der()),
            key_pem: Zeroizing::new(key.serialize_pem()),
            serial,
        })
    }

    /// An [`AuthConfig`] for `leaf` that trusts this CA.
    pub fn auth_config(&self, leaf: &DevLeaf) -> Result<AuthConfig, Error> {
        AuthConfig::from_der(
            vec![self.cert.clone()],
            vec![leaf.cert.clone()],
            leaf.key_der(),
        )
    }

    /// Mints a leaf for `name` and returns its [`AuthConfig`] and [`DomusId`] — the one-liner
    /// for examples.
    pub fn domus_auth(&mut self, name: &str) -> Result<(AuthConfig, DomusId), Error> {
        let leaf = self.leaf(name)?;
        let id = DomusId::spiffe(DEV_TRUST_DOMAIN, name)?;
        Ok((self.auth_config(&leaf)?, id))
    }

    /// A CRL signed by this CA that revokes `revoked`, valid from an hour ago until `next_update`.
    pub fn crl(
        &self,
        revoked: &[&DevLeaf],
        next_update: SystemTime,
    ) -> Result<CertificateRevocationListDer<'static>, Error> {
        let now = SystemTime::now();
        let params = CertificateRevocationListParams {
            this_update: (now - Duration::from_secs(3600)).into(),
            next_update: next_update.into(),
            crl_number: SerialNumber::from(1u64),
            issuing_distribution_point: None,
            revoked_certs: revoked
                .iter()
                .map(|leaf| RevokedCertParams {
                    serial_number: SerialNumber::from(leaf.serial),
                    revocation_time: (now - Duration::from_secs(60)).into(),
                    reason_code: Some(RevocationReason::KeyCompromise),
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: rcgen::KeyIdMethod::Sha256,
        };
        let crl = params.signed_by(&self.issuer).map_err(mint_error)?;
        Ok(crl.der().clone())
    }
}
