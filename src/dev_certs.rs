//! Development certificates minted at run time with rcgen (feature `dev-certs`).
//!
//! **Insecure by design: for examples, tests and local development only.** The CA key lives in
//! process memory and is never protected; nothing here belongs in a production deployment, where
//! identities come from your own CA, SPIRE or cert-manager.
//!
//! A [`DevCa`] mints leaf certificates whose single URI SAN is a [`DomusId`] (by default
//! `spiffe://vicus.dev/domus/<name>`, valid for client and server authentication), and can also
//! mint the broken ones the test suite needs: expired, not yet valid, without a URI SAN, with
//! the wrong key usage, and revocation lists. A CA can be written out as PEM
//! ([`DevCa::cert_pem`], [`DevCa::key_pem`]) and loaded again ([`DevCa::from_pem`]), which is
//! how `vicus certs` keeps one on disk between runs. This module does no IO: reading and
//! writing the PEM files (and their permissions) is the caller's job.

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
use crate::error::{Error, ErrorId, untrusted};

/// The trust domain of development identities.
pub const DEV_TRUST_DOMAIN: &str = "vicus.dev";

fn mint_error(e: impl fmt::Display) -> Error {
    Error::new(
        ErrorId::InvalidAuthMaterial,
        format!("minting a development certificate failed: {e}"),
    )
}

fn load_error(message: impl fmt::Display) -> Error {
    Error::new(
        ErrorId::InvalidAuthMaterial,
        format!("the development CA cannot be loaded: {message}"),
    )
}

/// A development certificate authority held in memory.
///
/// Its private key is kept in a `Zeroizing` buffer (wiped on drop) and never printed: `Debug`
/// shows `[redacted]`. Copies rcgen and the crypto library make while signing are outside our
/// control — one more reason this is for development only.
pub struct DevCa {
    issuer: Issuer<'static, KeyPair>,
    cert: CertificateDer<'static>,
    cert_pem: String,
    key_pem: Zeroizing<String>,
    /// The trust domain the CA names in its URI SAN (`spiffe://<domain>`), if any.
    trust_domain: Option<String>,
    next_serial: u64,
}

impl fmt::Debug for DevCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DevCa")
            .field("trust_domain", &self.trust_domain)
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
    /// Mints a new self-signed CA whose common name is `name`. Its leaves
    /// ([`leaf`](Self::leaf)) are in the trust domain [`DEV_TRUST_DOMAIN`].
    pub fn new(name: &str) -> Result<Self, Error> {
        Self::mint(name, None)
    }

    /// Mints a new self-signed CA for the trust domain `trust_domain` (e.g. `acme.test`): its
    /// certificate carries the trust domain's own SPIFFE id, `spiffe://<trust_domain>`, as its
    /// one URI SAN, so [`from_pem`](Self::from_pem) reads the trust domain back, and
    /// [`leaf`](Self::leaf) mints `spiffe://<trust_domain>/domus/<name>`. Fails with
    /// `InvalidDomusId` when `trust_domain` is not a bare lower-case host name (no path, no
    /// port) that makes valid ids.
    pub fn for_trust_domain(trust_domain: &str) -> Result<Self, Error> {
        let bad = |why: &str| {
            Error::new(
                ErrorId::InvalidDomusId,
                format!(
                    "\"{}\" is not a usable trust domain (lower-case letters, digits, '.', '-' \
                     and '_'): {why}",
                    untrusted(trust_domain)
                ),
            )
        };
        let id = DomusId::spiffe(trust_domain, "x").map_err(|e| bad(e.message()))?;
        if id.trust_domain() != trust_domain || trust_domain.contains(':') {
            return Err(bad("a trust domain has no path and no port"));
        }
        Self::mint(
            &format!("vicus INSECURE development CA for {trust_domain}"),
            Some(trust_domain),
        )
    }

    fn mint(name: &str, trust_domain: Option<&str>) -> Result<Self, Error> {
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(mint_error)?;
        params.distinguished_name.push(DnType::CommonName, name);
        if let Some(domain) = trust_domain {
            let uri = format!("spiffe://{domain}")
                .try_into()
                .map_err(mint_error)?;
            params.subject_alt_names.push(SanType::URI(uri));
        }
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
            key_pem: Zeroizing::new(key.serialize_pem()),
            trust_domain: trust_domain.map(str::to_owned),
            issuer: Issuer::new(params, key),
            next_serial: 1000,
        })
    }

    /// Loads a CA written out before: its certificate (PEM, exactly one) and its private key
    /// (PKCS#8 PEM, as [`key_pem`](Self::key_pem) gives it). The key must be the
    /// certificate's, and the certificate, when it has a key usage extension, must allow
    /// signing certificates. The trust domain is read back from a `spiffe://<domain>` URI SAN
    /// (see [`for_trust_domain`](Self::for_trust_domain)); without one it is
    /// [`DEV_TRUST_DOMAIN`]. Serial numbers of its new leaves start at a random point, so
    /// leaves minted by different runs do not share one. Fails with `InvalidAuthMaterial`
    /// saying what is wrong.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, Error> {
        use rustls_pki_types::pem::PemObject;
        let certs = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| load_error(format!("its certificate PEM cannot be parsed: {e}")))?;
        let cert = match <[_; 1]>::try_from(certs) {
            Ok([cert]) => cert,
            Err(certs) => {
                return Err(load_error(format!(
                    "its certificate PEM holds {} certificates; give exactly one, the CA's",
                    certs.len()
                )));
            }
        };
        let key = KeyPair::from_pem(key_pem)
            .map_err(|e| load_error(format!("its private key PEM cannot be used: {e}")))?;
        let parsed = webpki::EndEntityCert::try_from(&cert)
            .map_err(|e| load_error(format!("its certificate cannot be parsed: {e}")))?;
        if parsed.subject_public_key_info().as_ref()
            != rcgen::PublicKeyData::subject_public_key_info(&key).as_slice()
        {
            return Err(load_error(
                "the private key does not belong to the CA certificate",
            ));
        }
        let trust_domain = parsed
            .valid_uri_names()
            .filter_map(|uri| uri.strip_prefix("spiffe://"))
            .find(|domain| !domain.is_empty() && !domain.contains('/'))
            .map(str::to_owned);
        let issuer = Issuer::from_ca_cert_der(&cert, key)
            .map_err(|e| load_error(format!("its certificate cannot be read as a CA: {e}")))?;
        let usages = issuer.key_usages();
        if !usages.is_empty() && !usages.contains(&KeyUsagePurpose::KeyCertSign) {
            return Err(load_error(
                "its certificate may not sign certificates (no keyCertSign key usage): is it a \
                 leaf rather than the CA?",
            ));
        }
        Ok(Self {
            issuer,
            cert_pem: cert_pem.to_owned(),
            cert,
            key_pem: Zeroizing::new(key_pem.to_owned()),
            trust_domain,
            // 2^40 and up, below 2^62: positive in DER, never one of `new`'s small serials.
            next_serial: (1 << 40) | (crate::runtime::rand_u64() >> 2),
        })
    }

    /// The CA's private key (PKCS#8 PEM), to write to a file only the owner can read.
    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// The trust domain the CA names (see [`for_trust_domain`](Self::for_trust_domain));
    /// `None` for a CA from [`new`](Self::new), whose leaves are in [`DEV_TRUST_DOMAIN`].
    pub fn trust_domain(&self) -> Option<&str> {
        self.trust_domain.as_deref()
    }

    /// The CA certificate (DER).
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert
    }

    /// The CA certificate (PEM).
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Mints a valid leaf for `spiffe://<trust domain>/domus/<name>`: the CA's
    /// [`trust_domain`](Self::trust_domain), else `vicus.dev`.
    pub fn leaf(&mut self, name: &str) -> Result<DevLeaf, Error> {
        let domain = self.trust_domain.as_deref().unwrap_or(DEV_TRUST_DOMAIN);
        let spec = LeafSpec::uri(format!("spiffe://{domain}/domus/{name}"));
        self.leaf_with(&spec)
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
        let domain = self.trust_domain.as_deref().unwrap_or(DEV_TRUST_DOMAIN);
        let id = DomusId::spiffe(domain, name)?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::a0_transport::{Transport, TransportConfig};

    /// `leaf`'s chain verifies against `ca_pem` the way a peer would check it.
    fn verifies_against(ca_pem: &str, leaf: &DevLeaf) -> Result<(), Error> {
        let auth = AuthConfig::from_pem(
            ca_pem.as_bytes(),
            leaf.cert_pem().as_bytes(),
            leaf.key_pem().as_bytes(),
        )?;
        Transport::new(auth, TransportConfig::default())?.check_own_chain()
    }

    #[test]
    fn a_ca_written_out_and_loaded_again_mints_leaves_its_old_certificate_verifies() {
        let ca = DevCa::for_trust_domain("acme.test").expect("mint");
        assert_eq!(ca.trust_domain(), Some("acme.test"));
        let mut loaded = DevCa::from_pem(ca.cert_pem(), ca.key_pem()).expect("load");
        assert_eq!(loaded.trust_domain(), Some("acme.test"));
        assert_eq!(loaded.cert_pem(), ca.cert_pem());
        let (auth, id) = loaded.domus_auth("billing-1").expect("leaf");
        assert_eq!(id.as_str(), "spiffe://acme.test/domus/billing-1");
        let transport = Transport::new(auth, TransportConfig::default()).expect("transport");
        assert_eq!(transport.local_id(), id);
        let leaf = loaded.leaf("billing-2").expect("leaf");
        verifies_against(ca.cert_pem(), &leaf).expect("verifies against the original CA");
        // Another CA's certificate does not.
        let other = DevCa::for_trust_domain("acme.test").expect("mint");
        assert!(verifies_against(other.cert_pem(), &leaf).is_err());
    }

    #[test]
    fn a_ca_from_new_names_no_trust_domain_and_mints_vicus_dev_leaves() {
        let mut ca = DevCa::new("plain").expect("mint");
        assert_eq!(ca.trust_domain(), None);
        let mut loaded = DevCa::from_pem(ca.cert_pem(), ca.key_pem()).expect("load");
        assert_eq!(loaded.trust_domain(), None);
        let (_, id) = loaded.domus_auth("alpha").expect("leaf");
        assert_eq!(id.as_str(), "spiffe://vicus.dev/domus/alpha");
        let (_, id) = ca.domus_auth("beta").expect("leaf");
        assert_eq!(id.as_str(), "spiffe://vicus.dev/domus/beta");
    }

    #[test]
    fn loading_refuses_a_foreign_key_a_leaf_and_broken_pem() {
        let a = DevCa::for_trust_domain("a.test").expect("mint");
        let b = DevCa::for_trust_domain("a.test").expect("mint");
        let e = DevCa::from_pem(a.cert_pem(), b.key_pem()).unwrap_err();
        assert_eq!(e.id(), ErrorId::InvalidAuthMaterial);
        assert!(e.message().contains("does not belong"), "{e}");

        let mut a = a;
        let leaf = a.leaf("n").expect("leaf");
        let e = DevCa::from_pem(leaf.cert_pem(), leaf.key_pem()).unwrap_err();
        assert!(e.message().contains("keyCertSign"), "{e}");

        let e = DevCa::from_pem("not pem", a.key_pem()).unwrap_err();
        assert!(e.message().contains("0 certificates"), "{e}");
        let two = format!("{}{}", a.cert_pem(), b.cert_pem());
        let e = DevCa::from_pem(&two, a.key_pem()).unwrap_err();
        assert!(e.message().contains("2 certificates"), "{e}");
        let e = DevCa::from_pem(
            a.cert_pem(),
            "-----BEGIN PRIVATE KEY-----\n-----END PRIVATE KEY-----\n",
        )
        .unwrap_err();
        assert!(e.message().contains("private key"), "{e}");
    }

    #[test]
    fn a_bad_trust_domain_is_refused() {
        for bad in ["", "Upper.Case", "a/b", "a.test:80", "sp ace"] {
            let e = DevCa::for_trust_domain(bad).unwrap_err();
            assert_eq!(e.id(), ErrorId::InvalidDomusId, "{bad:?}");
        }
    }

    #[test]
    fn debug_never_shows_the_key() {
        let ca = DevCa::for_trust_domain("a.test").expect("mint");
        let shown = format!("{ca:?}");
        assert!(
            shown.contains("[redacted]") && shown.contains("a.test"),
            "{shown}"
        );
        let body = ca.key_pem().lines().nth(1).expect("a base64 line");
        assert!(!shown.contains(body));
    }
}
