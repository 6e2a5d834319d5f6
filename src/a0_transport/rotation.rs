//! Live rotation of A0 material: swapping certificate, key, trust anchors and CRLs (or the
//! trust policy) for future handshakes.
//!
//! A reload is validated completely before it is published, and published atomically (an
//! `ArcSwap` store). Handshakes already running keep the material they started with; established
//! streams are never touched here. [`AuthenticatedStream::recheck`] lets the owner of a live
//! stream verify its peer's chain again against the material now in force (after a CRL or
//! trust-anchor change); this module must not close anything itself — that is the domus's job,
//! which knows its calles.

use std::sync::Arc;

use super::Transport;
use super::identity::TrustPolicy;
use super::material::AuthConfig;
use super::stream::AuthenticatedStream;
use super::tls::LoadedMaterial;
use crate::error::{Error, ErrorId};

impl Transport {
    /// Replaces certificate chain, private key, trust anchors and CRLs for every future
    /// handshake, on every listener and dial of this transport.
    ///
    /// The new leaf must name the same [`DomusId`](super::DomusId) as the current one: a domus
    /// does not change identity while running. Its chain must verify against the new trust
    /// anchors (and CRLs) now, as [`check_own_chain`](Self::check_own_chain) checks: a
    /// certificate peers would refuse never replaces one they accept. On any error nothing
    /// changes.
    pub fn reload_auth(&self, auth: AuthConfig) -> Result<(), Error> {
        let loaded = LoadedMaterial::load(&auth, &self.shared.ctx.provider)?;
        drop(auth);
        loaded.verify_own_chain()?;
        let current = self.local_id();
        if loaded.local_id != current {
            return Err(Error::new(
                ErrorId::InvalidAuthMaterial,
                format!(
                    "the new certificate names {}, but this domus is {current}; a domus keeps its identity across reloads",
                    loaded.local_id
                ),
            ));
        }
        self.shared.material.store(Arc::new(loaded));
        tracing::info!(id = %current, "A0 material reloaded");
        Ok(())
    }

    /// Verifies this transport's own certificate chain as peers will: against its trust
    /// anchors and CRLs, at the current time. [`Domus::builder`](crate::Domus::builder) and
    /// [`reload_auth`](Self::reload_auth) refuse material that fails it; a transport built
    /// directly with [`Transport::new`](super::Transport::new) does not check it (so tests can
    /// play a peer with a bad certificate), and a running domus can call this to learn that its
    /// certificate expired.
    pub fn check_own_chain(&self) -> Result<(), Error> {
        self.shared.material.load().verify_own_chain()
    }

    /// Replaces the trust policy for every future handshake.
    pub fn set_trust_policy(&self, policy: TrustPolicy) {
        self.shared.policy.store(Arc::new(policy));
    }

    /// The trust policy in force.
    pub fn trust_policy(&self) -> TrustPolicy {
        TrustPolicy::clone(&self.shared.policy.load())
    }
}

impl AuthenticatedStream {
    /// Verifies this stream's peer again, with the trust anchors, CRLs and trust policy now in
    /// force in `transport`: its chain (for the role it played in the handshake) and its
    /// identity. An error says why the peer would be refused today.
    pub fn recheck(&self, transport: &Transport) -> Result<(), Error> {
        let material = transport.shared.material.load_full();
        let policy = transport.shared.policy.load_full();
        let chain = self.peer_chain();
        let Some((leaf, intermediates)) = chain.split_first() else {
            return Err(Error::new(
                ErrorId::PeerCertificateRejected,
                "the peer presented no certificate",
            ));
        };
        // We dialled: the peer was the server.
        let usage = if self.is_dialer() {
            webpki::KeyUsage::server_auth()
        } else {
            webpki::KeyUsage::client_auth()
        };
        let id = material
            .store()
            .verify(
                leaf,
                intermediates,
                rustls::pki_types::UnixTime::now(),
                usage,
            )
            .map_err(|(_, e)| e)?;
        policy.check(&id)
    }
}
