//! The peer table: one entry per peer with its drivers' handles and budgets; making a peer's
//! drivers on first contact, forgetting an idle peer for its driver, and re-verifying every
//! connected peer's certificate. The table's lock is held for a lookup or an insert only,
//! never across an `.await`.

use super::Shared;
use super::routing::ROUTED_MAX;
use crate::a0_transport::{AuthenticatedStream, DomusAddr, DomusId};
use crate::reporting::CallisKind;
use crate::runtime::blob::{BlobDriver, BlobLinks};
use crate::runtime::budget::InFlightBudget;
use crate::runtime::ends::BlobCommand;
use crate::runtime::peer::{
    Forget, PeerCommand, PeerDriver, PeerLinks, Reachability, Retirement, SendCmd,
};
use crate::runtime::queue::WakeQueue;
use crate::taberna::TabernaId;
use bytes::BytesMut;
use std::sync::{Arc, PoisonError};
use std::time::Duration;
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;

/// The handles of one peer's two drivers (messages, blobs) and its budgets.
pub(super) struct PeerRef {
    /// The peer, and the address its drivers were last given (a send that finds the driver
    /// retired hands its message to a new one there).
    pub(super) id: DomusId,
    pub(super) addr: arc_swap::ArcSwapOption<DomusAddr>,
    pub(super) tx: mpsc::UnboundedSender<PeerCommand>,
    /// Sends for the peer's driver, taken in batches.
    pub(super) sends: Arc<WakeQueue<SendCmd>>,
    /// The peer's in-flight budget: messages and payload bytes, one count.
    pub(super) budget: Arc<InFlightBudget>,
    pub(super) blob_tx: mpsc::UnboundedSender<BlobCommand>,
    /// Sending blob streams open with this peer (one permit each).
    pub(super) blob_out_streams: Arc<Semaphore>,
    /// Blob stream ids allocated so far.
    pub(super) next_stream: Arc<std::sync::atomic::AtomicU64>,
    /// Whether the peer can be reached (its driver says), for sends that waited for room.
    pub(super) reachability: Arc<Reachability>,
}

pub(super) struct PeerHandle {
    /// Shared: one reference count per send instead of one per channel and semaphore.
    pub(super) links: Arc<PeerRef>,
    /// The address last given to the drivers (told again only when it changes).
    pub(super) addr: Option<DomusAddr>,
    /// Tabernas sent to whose route named this peer (at most [`ROUTED_MAX`]): re-resolved
    /// when the resolver says its routes changed.
    pub(super) routed: std::collections::HashSet<TabernaId>,
}

impl PeerHandle {
    /// Tells both drivers of a new address (nothing when it is the one they have).
    pub(super) fn set_addr(&mut self, addr: DomusAddr) {
        if self.addr.as_ref() == Some(&addr) {
            return;
        }
        let _ = self.links.tx.send(PeerCommand::SetAddr(addr.clone()));
        let _ = self.links.blob_tx.send(BlobCommand::SetAddr(addr.clone()));
        self.links.addr.store(Some(Arc::new(addr.clone())));
        self.addr = Some(addr);
    }
}

/// Verifies the certificates of every connected peer again every `peer_recheck_interval`
/// (see [`DomusConfig::peer_recheck_interval`]). Holds the domus weakly: it keeps nothing
/// alive.
pub(super) async fn recheck_peers(shared: std::sync::Weak<Shared>, stop: CancellationToken) {
    /// How often a domus with rechecks turned off looks whether they were turned on.
    const OFF_POLL: Duration = Duration::from_secs(1);
    loop {
        let every = match shared.upgrade() {
            Some(s) => s.config.load().peer_recheck_interval,
            None => return,
        };
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(every.unwrap_or(OFF_POLL)) => {}
        }
        let Some(shared) = shared.upgrade() else {
            return;
        };
        if every.is_some() && shared.config.load().peer_recheck_interval.is_some() {
            shared.recheck_all();
        }
    }
}

/// Forgets an idle peer for its driver (see [`crate::runtime::peer::Retirement`]).
pub(super) struct Forgetter(pub(super) std::sync::Weak<Shared>);

impl Forget for Forgetter {
    fn forget(
        &self,
        peer: &DomusId,
        sends: &Arc<WakeQueue<SendCmd>>,
        unreachable: bool,
        shut_down: bool,
    ) -> bool {
        let Some(shared) = self.0.upgrade() else {
            return false;
        };
        let mut peers = shared.peers.lock().unwrap_or_else(PoisonError::into_inner);
        let ours = peers
            .get(peer)
            .is_some_and(|p| Arc::ptr_eq(&p.links.sends, sends));
        if !ours || !sends.close_if_empty() {
            return false;
        }
        if let Some(forgotten) = peers.remove(peer)
            && unreachable
        {
            shared.remember_down(peer, forgotten.addr, shut_down);
        }
        drop(peers);
        shared.recorder.peer_removed(peer);
        // Destinations holding the old driver resolve again before their next send.
        shared
            .route_generation
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        true
    }

    fn can_redirect(&self, peer: &DomusId, taberna: u64) -> bool {
        self.0
            .upgrade()
            .is_some_and(|shared| shared.alternatives(peer, TabernaId(taberna)).is_some())
    }

    fn redirect(&self, peer: &DomusId, send: SendCmd) -> Result<(), SendCmd> {
        let Some(shared) = self.0.upgrade() else {
            return Err(send);
        };
        shared.redirect(peer, send)
    }

    fn attach_again(&self, stream: AuthenticatedStream, kind: CallisKind, prefix: BytesMut) {
        if let Some(shared) = self.0.upgrade() {
            shared.attach_inbound(stream, kind, prefix);
        }
    }

    fn not_at(&self, peer: &DomusId, addr: &DomusAddr) {
        let Some(shared) = self.0.upgrade() else {
            return;
        };
        let unpinned = shared
            .pinned
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .unpin(addr, peer);
        if unpinned {
            tracing::debug!(%peer, %addr, "another identity answers at a pinned address; the next send there learns it");
            // Destinations that resolved to the pinned peer resolve again before their next send.
            shared
                .route_generation
                .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        }
    }
}

impl Shared {
    /// The driver for `id`, started on first use.
    pub(super) fn peer(self: &Arc<Self>, id: &DomusId, addr: Option<DomusAddr>) -> Arc<PeerRef> {
        self.peer_routed(id, addr, None)
    }

    /// [`peer`](Self::peer), remembering that `taberna`'s route names this peer (under the
    /// same lock, so a send pays no second one).
    pub(super) fn peer_routed(
        self: &Arc<Self>,
        id: &DomusId,
        addr: Option<DomusAddr>,
        taberna: Option<TabernaId>,
    ) -> Arc<PeerRef> {
        let mut peers = self.peers.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(p) = peers.get_mut(id)
            && !p.links.tx.is_closed()
            && !p.links.blob_tx.is_closed()
        {
            if let Some(addr) = addr {
                p.set_addr(addr);
            }
            if let Some(t) = taberna
                && p.routed.len() < ROUTED_MAX
                && !p.routed.contains(&t)
            {
                p.routed.insert(t);
            }
            return p.links.clone();
        }
        // Every command is bounded elsewhere: sends by the in-flight semaphore, answers by the
        // peer's dedupe window, calles by the A0 admission gate.
        let (tx, rx) = mpsc::unbounded_channel();
        let sends = Arc::new(WakeQueue::default());
        let budget = InFlightBudget::new(
            self.config.load().max_in_flight_per_peer,
            u32::try_from(self.config.load().max_in_flight_bytes_per_peer).unwrap_or(u32::MAX),
        );
        // Blob commands are bounded by the streams' windows and the stream caps.
        let (blob_tx, blob_rx) = mpsc::unbounded_channel();
        let blob_in_streams =
            Arc::new(Semaphore::new(self.config.load().max_blob_streams_per_peer));
        let cells = self.recorder.peer_added(id);
        let reachability = Arc::new(Reachability::default());
        let shut_down = self.take_shut_down(id, addr.as_ref());
        let blob_active = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let forget: Arc<dyn Forget> = Arc::new(Forgetter(Arc::downgrade(self)));
        let driver = PeerDriver::new(
            id.clone(),
            addr.clone(),
            self.driver_ctx.clone(),
            self.config.load().session(),
            rx,
            self.cancel.child_token(),
            PeerLinks {
                sends: sends.clone(),
                blob_tx: blob_tx.clone(),
                blob_in_streams,
                cells: cells.clone(),
                max_callis_age: self.config.load().max_callis_age,
                reachability: reachability.clone(),
                budget: budget.clone(),
                shut_down,
                retirement: Retirement {
                    after: self.config.load().peer_retire_after,
                    forget: forget.clone(),
                    id_floor: self.id_floor.clone(),
                    blob_active: blob_active.clone(),
                },
            },
        );
        self.tasks.spawn(driver);
        self.tasks.spawn(BlobDriver::new(
            id.clone(),
            addr.clone(),
            self.blob_ctx.clone(),
            blob_rx,
            self.cancel.child_token(),
            BlobLinks {
                config: self.config.load().blob(),
                cells,
                active: blob_active,
                forget,
            },
        ));
        let links = Arc::new(PeerRef {
            id: id.clone(),
            addr: arc_swap::ArcSwapOption::new(addr.clone().map(Arc::new)),
            tx,
            sends,
            budget,
            blob_tx,
            blob_out_streams: Arc::new(Semaphore::new(
                self.config.load().max_blob_streams_per_peer,
            )),
            next_stream: Arc::new(std::sync::atomic::AtomicU64::new(1)),
            reachability,
        });
        peers.insert(
            id.clone(),
            PeerHandle {
                links: links.clone(),
                addr,
                routed: taberna.into_iter().collect(),
            },
        );
        links
    }

    /// The handles of every known peer's drivers, taken under the peer table's lock (and
    /// used after it is released).
    pub(super) fn peer_links(&self) -> Vec<Arc<PeerRef>> {
        self.peers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .map(|p| p.links.clone())
            .collect()
    }

    /// Tells every peer's drivers to verify their calles' peer certificates again (each one
    /// closes a callis whose peer is no longer trusted).
    pub(super) fn recheck_all(&self) {
        for p in self.peer_links() {
            let _ = p.tx.send(PeerCommand::Recheck);
            let _ = p.blob_tx.send(BlobCommand::Recheck);
        }
    }
}
