//! [`AuthConfig`]: the key material a domus authenticates with — the CA bundle it trusts, its
//! certificate chain, its private key and optional CRLs — read from PEM files, PEM bytes or DER.
//!
//! This module parses and holds material; it does not build TLS configs (see `tls.rs`). The
//! private key lives in a `Zeroizing` wrapper, so our copy is wiped when the config is dropped,
//! and `Debug` never prints it. Copies the crypto provider makes when it loads the key are
//! outside our control (documented as residual risk in `docs/threat-model.md`).

use std::fmt;
use std::fs;
use std::io::Read;
use std::path::Path;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use zeroize::Zeroizing;

use crate::error::{Error, ErrorId};

/// The longest PEM or DER file [`AuthConfig`] reads (certificate bundles are far smaller).
const MAX_MATERIAL_FILE_LEN: u64 = 4 * 1024 * 1024;

/// The key material a domus authenticates with.
///
/// * `trust_anchors`: the CA certificates that peers' chains must end at. Use a CA dedicated
///   to the mesh; the system's roots are never consulted.
/// * `chain`: this domus's leaf certificate first, then any intermediates. The leaf must carry
///   exactly one URI SAN — that URI is the domus's [`DomusId`](crate::DomusId).
/// * the private key for the leaf: PKCS#8, SEC1 or PKCS#1.
/// * optional CRLs: when any are given, every certificate in a peer's chain must be covered by
///   a current CRL from its issuer (unknown status and expired CRLs fail closed).
///
/// `Debug` prints counts and `[redacted]` for the key; the key bytes are zeroized on drop.
pub struct AuthConfig {
    pub(crate) trust_anchors: Vec<CertificateDer<'static>>,
    pub(crate) chain: Vec<CertificateDer<'static>>,
    pub(crate) key: Zeroizing<PrivateKeyDer<'static>>,
    pub(crate) crls: Vec<CertificateRevocationListDer<'static>>,
}

impl AuthConfig {
    /// Builds a config from DER values.
    pub fn from_der(
        trust_anchors: Vec<CertificateDer<'static>>,
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Result<Self, Error> {
        let key = Zeroizing::new(key);
        if trust_anchors.is_empty() {
            return Err(material_error(
                "the CA bundle is empty: give at least one trust anchor",
            ));
        }
        if chain.is_empty() {
            return Err(material_error(
                "the certificate chain is empty: give the leaf certificate first",
            ));
        }
        if key.secret_der().is_empty() {
            return Err(material_error("the private key is empty"));
        }
        Ok(Self {
            trust_anchors,
            chain,
            key,
            crls: Vec::new(),
        })
    }

    /// Builds a config from PEM text: the CA bundle, this domus's chain (leaf first) and its
    /// private key.
    pub fn from_pem(ca_pem: &[u8], chain_pem: &[u8], key_pem: &[u8]) -> Result<Self, Error> {
        let trust_anchors = certs_from_pem(ca_pem, "CA bundle")?;
        let chain = certs_from_pem(chain_pem, "certificate chain")?;
        let key = key_from_pem(key_pem)?;
        Self::from_der(trust_anchors, chain, key)
    }

    /// Reads PEM files: the CA bundle, this domus's chain (leaf first) and its private key.
    ///
    /// Logs a warning when the key file is readable by group or others.
    pub fn from_pem_files(
        ca_path: impl AsRef<Path>,
        chain_path: impl AsRef<Path>,
        key_path: impl AsRef<Path>,
    ) -> Result<Self, Error> {
        let ca = read_material_file(ca_path.as_ref())?;
        let chain = read_material_file(chain_path.as_ref())?;
        warn_if_key_file_is_shared(key_path.as_ref());
        let key = read_material_file(key_path.as_ref())?;
        Self::from_pem(&ca, &chain, &key).map_err(|e| {
            Error::new(
                e.id(),
                format!(
                    "{} (files: {}, {}, {})",
                    e.message(),
                    ca_path.as_ref().display(),
                    chain_path.as_ref().display(),
                    key_path.as_ref().display()
                ),
            )
        })
    }

    /// Adds certificate revocation lists (DER).
    pub fn with_crls(mut self, crls: Vec<CertificateRevocationListDer<'static>>) -> Self {
        self.crls.extend(crls);
        self
    }

    /// Adds certificate revocation lists from PEM text (`-----BEGIN X509 CRL-----`).
    pub fn with_crls_pem(self, pem: &[u8]) -> Result<Self, Error> {
        let crls = CertificateRevocationListDer::pem_slice_iter(pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| material_error(format!("the CRL PEM could not be parsed: {e}")))?;
        if crls.is_empty() {
            return Err(material_error(
                "no X509 CRL section found in the CRL PEM text",
            ));
        }
        Ok(self.with_crls(crls))
    }
}

impl Clone for AuthConfig {
    fn clone(&self) -> Self {
        Self {
            trust_anchors: self.trust_anchors.clone(),
            chain: self.chain.clone(),
            key: Zeroizing::new(self.key.clone_key()),
            crls: self.crls.clone(),
        }
    }
}

impl fmt::Debug for AuthConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthConfig")
            .field("trust_anchors", &self.trust_anchors.len())
            .field("chain", &self.chain.len())
            .field("key", &"[redacted]")
            .field("crls", &self.crls.len())
            .finish()
    }
}

fn material_error(message: impl Into<String>) -> Error {
    Error::new(ErrorId::InvalidAuthMaterial, message)
}

fn certs_from_pem(pem: &[u8], what: &str) -> Result<Vec<CertificateDer<'static>>, Error> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| material_error(format!("the {what} PEM could not be parsed: {e}")))?;
    if certs.is_empty() {
        return Err(material_error(format!(
            "no CERTIFICATE section found in the {what} PEM text"
        )));
    }
    Ok(certs)
}

fn key_from_pem(pem: &[u8]) -> Result<PrivateKeyDer<'static>, Error> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| {
        material_error(format!(
            "no usable private key (PKCS#8, SEC1 or PKCS#1) in the key PEM text: {e}"
        ))
    })
}

fn read_material_file(path: &Path) -> Result<Zeroizing<Vec<u8>>, Error> {
    let file = fs::File::open(path)
        .map_err(|e| material_error(format!("cannot open {}: {e}", path.display())))?;
    let mut buf = Zeroizing::new(Vec::new());
    file.take(MAX_MATERIAL_FILE_LEN + 1)
        .read_to_end(&mut buf)
        .map_err(|e| material_error(format!("cannot read {}: {e}", path.display())))?;
    if buf.len() as u64 > MAX_MATERIAL_FILE_LEN {
        return Err(material_error(format!(
            "{} is larger than {MAX_MATERIAL_FILE_LEN} bytes; is it really key material?",
            path.display()
        )));
    }
    Ok(buf)
}

fn warn_if_key_file_is_shared(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = fs::metadata(path) {
        let mode = meta.permissions().mode();
        if mode & 0o077 != 0 {
            tracing::warn!(
                path = %path.display(),
                mode = format_args!("{:o}", mode & 0o777),
                "private key file is readable by group or others; chmod 600 it"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_or_wrong_pem_is_refused_with_a_message() {
        let e = AuthConfig::from_pem(b"", b"", b"").unwrap_err();
        assert_eq!(e.id(), ErrorId::InvalidAuthMaterial);
        assert!(e.message().contains("CA bundle"), "{e}");
        let e = AuthConfig::from_pem(
            b"-----BEGIN CERTIFICATE-----\n!!\n-----END CERTIFICATE-----\n",
            b"",
            b"",
        )
        .unwrap_err();
        assert_eq!(e.id(), ErrorId::InvalidAuthMaterial);
    }

    #[test]
    fn missing_file_names_the_path() {
        let e = AuthConfig::from_pem_files("/nonexistent/ca.pem", "/x", "/y").unwrap_err();
        assert!(e.message().contains("/nonexistent/ca.pem"), "{e}");
    }
}
