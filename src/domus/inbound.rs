//! The inbound gate: the accept loop, the admission limits for authenticated calles (per
//! identity, in total, connected peers; T8), reading a callis's first frame to tell a primary
//! from a blob callis within `hello_timeout`, refusing with a CLOSE, and handing each callis to
//! its peer's drivers. Every wait is bounded.

use super::DomusInner;
use crate::a0_transport::{AuthenticatedStream, DomusId, Listener, Tally};
use crate::error::{Error, ErrorId};
use crate::reporting::CallisKind;
use crate::reporting::Counter;
use crate::runtime::accept::{read_first_frame, refuse};
use crate::runtime::ends::BlobCommand;
use crate::runtime::peer::PeerCommand;
use bytes::BytesMut;
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// The inbound gate's own state: authenticated calles waiting for their first frame, per
/// identity (T8). Held for a count or an update only.
#[derive(Default)]
pub(super) struct InboundGate {
    pub(super) unopened: Mutex<Tally<DomusId>>,
}

pub(super) async fn accept_loop(
    inner: Arc<DomusInner>,
    listener: Listener,
    stop: CancellationToken,
) {
    loop {
        let incoming = tokio::select! {
            () = stop.cancelled() => return,
            r = listener.accept() => r,
        };
        let incoming = match incoming {
            Ok(i) => i,
            Err(e) => {
                if let Some(suppressed) = inner
                    .recorder
                    .log_allowed(crate::reporting::LogKind::AcceptFailed)
                {
                    tracing::warn!(error = %e, suppressed, "accept failed; retrying shortly");
                }
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(Duration::from_millis(50)) => continue,
                }
            }
        };
        inner.tasks.spawn(serve_inbound(
            inner.clone(),
            stop.clone(),
            incoming.handshake(),
        ));
    }
}

/// Runs an inbound handshake, then the first steps every inbound callis takes before a driver
/// owns it: the connection limits, its first frame (which tells a primary callis from a blob
/// callis) within `hello_timeout`, and the hand-over to the peer's driver.
pub(super) async fn serve_inbound(
    inner: Arc<DomusInner>,
    stop: CancellationToken,
    handshake: impl Future<Output = Result<AuthenticatedStream, Error>>,
) {
    let result = tokio::select! {
        () = stop.cancelled() => return,
        r = handshake => r,
    };
    let stream = match result {
        Ok(stream) => stream,
        Err(e) => {
            tracing::debug!(error = %e, "inbound handshake failed");
            inner.recorder.handshake_failed(&e);
            return;
        }
    };
    let mut stream = stream;
    let peer_id = stream.peer().id().clone();
    let mut prefix = BytesMut::with_capacity(512);
    let slot = match UnopenedSlot::take(&inner, &peer_id) {
        Ok(slot) => slot,
        Err(e) => return inner.refuse(stream, e, &prefix).await,
    };
    let hello_timeout = inner.config.load().hello_timeout;
    let first = tokio::select! {
        () = stop.cancelled() => return,
        r = tokio::time::timeout(hello_timeout, read_first_frame(&mut stream, &mut prefix)) => r,
    };
    drop(slot);
    match first {
        Ok(Ok(kind)) => {
            if let Err(e) = inner.check_peer_limit(&peer_id) {
                return inner.refuse(stream, e, &prefix).await;
            }
            inner.attach_inbound(stream, kind, prefix);
        }
        Ok(Err(e)) if e.id() == ErrorId::ProtocolViolation => {
            inner.refuse(stream, e, &prefix).await;
        }
        Ok(Err(e)) => {
            inner
                .recorder
                .add(Counter::primary_bytes_in, prefix.len() as u64);
            tracing::debug!(peer = %peer_id, error = %e, "inbound callis closed before its first frame");
        }
        Err(_) => {
            let e = Error::new(
                ErrorId::ProtocolViolation,
                format!(
                    "the callis sent no complete first frame within {hello_timeout:?} (hello_timeout)"
                ),
            );
            inner.refuse(stream, e, &prefix).await;
        }
    }
}

/// One authenticated inbound callis counted in `DomusInner::unopened` until it is dropped.
pub(super) struct UnopenedSlot {
    pub(super) inner: Arc<DomusInner>,
    pub(super) peer: DomusId,
}

impl UnopenedSlot {
    /// Counts a callis from `peer`, or refuses it past `max_unopened_calles_per_peer` or
    /// `max_unopened_calles`.
    pub(super) fn take(inner: &Arc<DomusInner>, peer: &DomusId) -> Result<Self, Error> {
        let config = inner.config.load();
        let mut table = inner
            .gate
            .unopened
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let mine = table.count(peer);
        if mine >= config.max_unopened_calles_per_peer {
            return Err(Error::new(
                ErrorId::AdmissionRefused,
                format!(
                    "{peer} already has {mine} calles waiting for their first frame (max_unopened_calles_per_peer)"
                ),
            ));
        }
        if table.total() >= config.max_unopened_calles {
            return Err(Error::new(
                ErrorId::AdmissionRefused,
                format!(
                    "{} calles are already waiting for their first frame (max_unopened_calles)",
                    table.total()
                ),
            ));
        }
        table.add(peer);
        Ok(Self {
            inner: inner.clone(),
            peer: peer.clone(),
        })
    }
}

impl Drop for UnopenedSlot {
    fn drop(&mut self) {
        self.inner
            .gate
            .unopened
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.peer);
    }
}

impl DomusInner {
    /// Refuses an inbound callis from an identity that is not connected when `max_peers`
    /// primary calles are open already.
    pub(super) fn check_peer_limit(&self, peer: &DomusId) -> Result<(), Error> {
        let max = self.config.load().max_peers;
        let (connected, open) = self.recorder.connection_census(peer);
        if !connected && open >= max as u64 {
            return Err(Error::new(
                ErrorId::AdmissionRefused,
                format!("{open} peers are connected already (max_peers); {peer} is refused"),
            ));
        }
        Ok(())
    }

    /// Writes a CLOSE carrying `error` (within the runtime's refusal timeout) and drops an
    /// inbound callis that never reached a driver, after `read` was read from it. A refusal
    /// by the connection limits counts in `calles_refused`, a bad first frame in
    /// `protocol_violations`; either is published on the error feed (naming the peer) and
    /// logged, rate-limited. The bytes read and the CLOSE written count like any callis's.
    pub(super) async fn refuse(&self, mut stream: AuthenticatedStream, error: Error, read: &[u8]) {
        let peer = stream.peer().id().clone();
        self.recorder
            .add(Counter::primary_bytes_in, read.len() as u64);
        if error.id() == ErrorId::ProtocolViolation {
            self.recorder.protocol_violation(&peer, &error);
        } else {
            self.recorder.inc(Counter::calles_refused);
            if let Some(suppressed) = self
                .recorder
                .log_allowed(crate::reporting::LogKind::CallisRefused)
            {
                tracing::warn!(%peer, error = %error, suppressed, "inbound callis refused");
            }
            self.recorder.error(error.clone());
        }
        if let Some(written) = refuse(&mut stream, &error).await {
            self.recorder
                .add(Counter::primary_bytes_out, written as u64);
        }
    }

    pub(super) fn attach_inbound(
        self: &Arc<Self>,
        stream: AuthenticatedStream,
        kind: CallisKind,
        prefix: BytesMut,
    ) {
        if self.check_open().is_err() {
            return;
        }
        let id = stream.peer().id().clone();
        let peer = self.peer(&id, None);
        // A driver that retired just now (its peer forgotten while idle) is replaced: the
        // second lookup makes a new one.
        if kind == CallisKind::Blob {
            let cmd = BlobCommand::Attach {
                io: Box::new(stream),
                prefix,
            };
            if let Err(mpsc::error::SendError(cmd)) = peer.blob_tx.send(cmd) {
                let _ = self.peer(&id, None).blob_tx.send(cmd);
            }
        } else {
            let cmd = PeerCommand::Attach(Box::new(stream), prefix);
            if let Err(mpsc::error::SendError(cmd)) = peer.tx.send(cmd) {
                let _ = self.peer(&id, None).tx.send(cmd);
            }
        }
    }
}
