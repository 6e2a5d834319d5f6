//! The peer table ([`PeerTable`]): one entry per peer, live with its drivers' handles and
//! budgets or remembered after it was forgotten unreachable; making a peer's drivers on first
//! contact, forgetting an idle peer for its driver, and re-verifying every connected peer's
//! certificate. The table's lock is held for a lookup or an update only, never across an
//! `.await`.

use super::DomusInner;
use crate::a0_transport::{AuthenticatedStream, DomusAddr, DomusId};
use crate::reporting::CallisKind;
use crate::resolve::{Candidate, Route};
use crate::runtime::blob::{BlobDriver, BlobLinks};
use crate::runtime::budget::InFlightBudget;
use crate::runtime::ends::BlobCommand;
use crate::runtime::peer::{
    DriverHost, Handover, PeerCommand, PeerDriver, PeerLinks, Reachability, Retirement, SendCmd,
};
use crate::runtime::queue::WakeQueue;
use crate::taberna::TabernaId;
use bytes::BytesMut;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// The handles of one peer's two drivers (messages, blobs) and its budgets.
pub(super) struct PeerRef {
    /// The peer, and the address its drivers were last given (a send that finds the driver
    /// retired hands its message to a new one there).
    pub(super) id: DomusId,
    pub(super) addr: arc_swap::ArcSwapOption<DomusAddr>,
    pub(super) tx: mpsc::UnboundedSender<PeerCommand>,
    /// Sends for the peer's driver, taken in batches.
    pub(super) sends: Arc<WakeQueue<Handover>>,
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

/// The most routes remembered per peer for the route follower (`routing::follow_routes`); past it, new tabernas are
/// re-read by their next send only.
pub(super) const ROUTED_MAX: usize = 4096;

/// How many unreachable, forgotten peers a domus remembers.
pub(super) const DOWN_REMEMBERED: usize = 4096;

/// What a domus remembers of a peer it forgot while the peer could not be reached, at the
/// address it failed at: a candidate naming another address (a replica that came back
/// elsewhere) is not avoided, and a driver dialling another address is not told.
pub(super) struct Down {
    /// Until when a choice among a taberna's candidates avoids the peer.
    pub(super) avoid_until: tokio::time::Instant,
    pub(super) addr: Option<DomusAddr>,
    /// The peer had shut down (its CLOSE said so) and no callis opened since: until when its
    /// next driver is told so (`peer_retire_after`, as long as an idle peer that did not shut
    /// down is remembered), so that sends to it dial once and fail at once with
    /// `PeerShutDown` while it cannot be reached — as they would have with the driver that
    /// retired. Taken by that driver.
    pub(super) shut_down_until: Option<tokio::time::Instant>,
}

impl Down {
    /// Whether the peer is remembered as shut down at `addr` at `now` (its next driver is
    /// told so once: the entry is replaced by the live peer).
    pub(super) fn shut_down_at(&self, addr: Option<&DomusAddr>, now: tokio::time::Instant) -> bool {
        addr.is_some()
            && self.addr.as_ref() == addr
            && self.shut_down_until.is_some_and(|t| t > now)
    }

    /// When nothing of it is worth keeping any more.
    pub(super) fn expires(&self) -> tokio::time::Instant {
        self.shut_down_until
            .map_or(self.avoid_until, |t| t.max(self.avoid_until))
    }
}

/// What the table holds for one peer: its live drivers, or what is remembered of it after it
/// was forgotten while it could not be reached ([`Down`]).
enum PeerEntry {
    Live(PeerHandle),
    Gone(Down),
}

/// The peer table: every peer this domus knows, by identity, in one map under one lock —
/// the live ones with their drivers' handles, and the ones forgotten while unreachable with
/// what choice and their next driver must know ([`Down`]).
///
/// Invariants: `gone` counts the `Gone` entries and never exceeds [`DOWN_REMEMBERED`] (what
/// expires first makes room); a `Live` entry's queue is closed only by [`PeerTable::forget`],
/// under the lock, so a send never finds a forgotten peer's queue open. The lock is held for
/// a lookup or an update only (making a peer's drivers spawns them, it awaits nothing).
pub(super) struct PeerTable {
    entries: Mutex<Entries>,
    /// The first message id a new session may use: raised past its ids by every session
    /// that ends when its peer is forgotten, so a peer that comes back after that never sees
    /// an id it saw before.
    pub(super) id_floor: Arc<std::sync::atomic::AtomicU64>,
}

#[derive(Default)]
struct Entries {
    map: HashMap<DomusId, PeerEntry>,
    gone: usize,
}

impl PeerTable {
    pub(super) fn new() -> Self {
        Self {
            entries: Mutex::new(Entries::default()),
            id_floor: Arc::new(std::sync::atomic::AtomicU64::new(1)),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Entries> {
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The live peer `id`'s handles, if its drivers still run (a retired driver's are not).
    fn live_mut<'a>(entries: &'a mut Entries, id: &DomusId) -> Option<&'a mut PeerHandle> {
        match entries.map.get_mut(id) {
            Some(PeerEntry::Live(p)) if !p.links.tx.is_closed() && !p.links.blob_tx.is_closed() => {
                Some(p)
            }
            _ => None,
        }
    }

    /// The live peer `id` (its address updated to `addr`, `taberna` remembered as routed to
    /// it), or one `make` builds now, told whether the peer was remembered as shut down at
    /// `addr` (see [`Down`]).
    pub(super) fn get_or_make(
        &self,
        id: &DomusId,
        addr: Option<DomusAddr>,
        taberna: Option<TabernaId>,
        make: impl FnOnce(bool) -> Arc<PeerRef>,
    ) -> Arc<PeerRef> {
        let mut entries = self.lock();
        if let Some(p) = Self::live_mut(&mut entries, id) {
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
        let shut_down = match entries.map.get(id) {
            Some(PeerEntry::Gone(d)) => d.shut_down_at(addr.as_ref(), tokio::time::Instant::now()),
            _ => false,
        };
        let links = make(shut_down);
        let old = entries.map.insert(
            id.clone(),
            PeerEntry::Live(PeerHandle {
                links: links.clone(),
                addr,
                routed: taberna.into_iter().collect(),
            }),
        );
        if matches!(old, Some(PeerEntry::Gone(_))) {
            entries.gone = entries.gone.saturating_sub(1);
        }
        links
    }

    /// The live peer `id`'s handles.
    pub(super) fn links(&self, id: &DomusId) -> Option<Arc<PeerRef>> {
        match self.lock().map.get(id) {
            Some(PeerEntry::Live(p)) => Some(p.links.clone()),
            _ => None,
        }
    }

    /// Every live peer's handles, taken under the lock (and used after it is released).
    pub(super) fn all_links(&self) -> Vec<Arc<PeerRef>> {
        self.lock()
            .map
            .values()
            .filter_map(|e| match e {
                PeerEntry::Live(p) => Some(p.links.clone()),
                PeerEntry::Gone(_) => None,
            })
            .collect()
    }

    /// How many peers are live.
    pub(super) fn live(&self) -> usize {
        let entries = self.lock();
        entries.map.len().saturating_sub(entries.gone)
    }

    /// Every (taberna, peer) pair a send's route named (for following route changes).
    pub(super) fn routed(&self) -> Vec<(TabernaId, DomusId)> {
        self.lock()
            .map
            .iter()
            .flat_map(|(id, e)| {
                let tabernas = match e {
                    PeerEntry::Live(p) => p.routed.iter().copied().collect(),
                    PeerEntry::Gone(_) => Vec::new(),
                };
                tabernas.into_iter().map(move |t| (t, id.clone()))
            })
            .collect()
    }

    /// Forgets that `taberna`'s route named `peer`.
    pub(super) fn unroute(&self, peer: &DomusId, taberna: TabernaId) {
        if let Some(PeerEntry::Live(p)) = self.lock().map.get_mut(peer) {
            p.routed.remove(&taberna);
        }
    }

    /// Tells the live peer `id`'s drivers that its address is now `addr`.
    pub(super) fn readdress(&self, id: &DomusId, addr: DomusAddr) {
        if let Some(PeerEntry::Live(p)) = self.lock().map.get_mut(id) {
            p.set_addr(addr);
        }
    }

    /// Whether a send may choose the candidate `id` at `addr` at `now`: its peer is not known
    /// to be unreachable there (by its driver, or remembered after it was forgotten). A
    /// failure at another address does not count: the candidate moved (a restarted replica).
    #[cfg(test)]
    fn may_choose(&self, id: &DomusId, addr: &DomusAddr, now: tokio::time::Instant) -> bool {
        Self::choosable(self.lock().map.get(id), addr, now)
    }

    /// The routes among `candidates` whose peer a send may not choose at `now` (see
    /// [`may_choose`](Self::may_choose)), in one look at the table.
    pub(super) fn unreachable<'a>(
        &self,
        candidates: &'a [Candidate],
        now: tokio::time::Instant,
    ) -> Vec<&'a Route> {
        let entries = self.lock();
        candidates
            .iter()
            .map(|c| &c.route)
            .filter(|route| {
                route
                    .identity
                    .as_ref()
                    .is_some_and(|id| !Self::choosable(entries.map.get(id), &route.addr, now))
            })
            .collect()
    }

    fn choosable(entry: Option<&PeerEntry>, addr: &DomusAddr, now: tokio::time::Instant) -> bool {
        match entry {
            Some(PeerEntry::Live(p)) => {
                p.addr.as_ref() != Some(addr) || p.links.reachability.why_not().is_none()
            }
            Some(PeerEntry::Gone(d)) => d.avoid_until <= now || d.addr.as_ref() != Some(addr),
            None => true,
        }
    }

    /// Forgets the live peer whose send queue is `sends`, when nothing is queued in it
    /// (closing the queue under the lock, so a racing send goes to a new driver); `down` is
    /// what to remember of it (a peer that could not be reached), `None` to remember nothing.
    /// False: the peer stays.
    pub(super) fn forget(
        &self,
        peer: &DomusId,
        sends: &Arc<WakeQueue<Handover>>,
        down: impl FnOnce(Option<DomusAddr>) -> Option<Down>,
    ) -> bool {
        let mut entries = self.lock();
        let ours = matches!(
            entries.map.get(peer),
            Some(PeerEntry::Live(p)) if Arc::ptr_eq(&p.links.sends, sends)
        );
        if !ours || !sends.close_if_empty() {
            return false;
        }
        let Some(PeerEntry::Live(forgotten)) = entries.map.remove(peer) else {
            return true;
        };
        if let Some(down) = down(forgotten.addr) {
            let now = tokio::time::Instant::now();
            if entries.gone >= DOWN_REMEMBERED {
                Self::make_room(&mut entries, now);
            }
            entries.map.insert(peer.clone(), PeerEntry::Gone(down));
            entries.gone = entries.gone.saturating_add(1);
        }
        true
    }

    /// Drops what has expired of the forgotten peers; when they all still count, the one that
    /// expires first.
    fn make_room(entries: &mut Entries, now: tokio::time::Instant) {
        let before = entries.map.len();
        entries
            .map
            .retain(|_, e| !matches!(e, PeerEntry::Gone(d) if d.expires() <= now));
        let dropped = before.saturating_sub(entries.map.len());
        entries.gone = entries.gone.saturating_sub(dropped);
        if entries.gone < DOWN_REMEMBERED {
            return;
        }
        let first = entries
            .map
            .iter()
            .filter_map(|(id, e)| match e {
                PeerEntry::Gone(d) => Some((id, d.expires())),
                PeerEntry::Live(_) => None,
            })
            .min_by_key(|(_, at)| *at)
            .map(|(id, _)| id.clone());
        if let Some(first) = first {
            entries.map.remove(&first);
            entries.gone = entries.gone.saturating_sub(1);
        }
    }

    /// Forgets everything (the domus shut down).
    pub(super) fn clear(&self) {
        let mut entries = self.lock();
        entries.map.clear();
        entries.gone = 0;
    }
}

/// Verifies the certificates of every connected peer again every `peer_recheck_interval`
/// (see [`DomusConfig::peer_recheck_interval`]). Holds the domus weakly: it keeps nothing
/// alive.
pub(super) async fn recheck_peers(inner: std::sync::Weak<DomusInner>, stop: CancellationToken) {
    /// How often a domus with rechecks turned off looks whether they were turned on.
    const OFF_POLL: Duration = Duration::from_secs(1);
    loop {
        let every = match inner.upgrade() {
            Some(s) => s.config.load().peer_recheck_interval,
            None => return,
        };
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(every.unwrap_or(OFF_POLL)) => {}
        }
        let Some(inner) = inner.upgrade() else {
            return;
        };
        if every.is_some() && inner.config.load().peer_recheck_interval.is_some() {
            inner.recheck_all();
        }
    }
}

/// The domus as its peers' drivers see it ([`DriverHost`]): held weakly, so a driver does not
/// keep its domus alive.
pub(super) struct DomusHost(pub(super) std::sync::Weak<DomusInner>);

impl DriverHost for DomusHost {
    fn forget(
        &self,
        peer: &DomusId,
        sends: &Arc<WakeQueue<Handover>>,
        unreachable: bool,
        shut_down: bool,
    ) -> bool {
        let Some(inner) = self.0.upgrade() else {
            return false;
        };
        let remembered = |addr| unreachable.then(|| inner.down_memory(addr, shut_down));
        if !inner.peers.forget(peer, sends, remembered) {
            return false;
        }
        inner.recorder.peer_removed(peer);
        // Destinations holding the old driver resolve again before their next send.
        inner.routing.bump();
        true
    }

    fn can_redirect(&self, peer: &DomusId, taberna: u64) -> bool {
        self.0
            .upgrade()
            .is_some_and(|inner| inner.alternatives(peer, TabernaId(taberna)).is_some())
    }

    fn redirect(&self, peer: &DomusId, send: SendCmd) -> Result<(), SendCmd> {
        let Some(inner) = self.0.upgrade() else {
            return Err(send);
        };
        inner.redirect(peer, send)
    }

    fn attach_again(&self, stream: AuthenticatedStream, kind: CallisKind, prefix: BytesMut) {
        if let Some(inner) = self.0.upgrade() {
            inner.attach_inbound(stream, kind, prefix);
        }
    }

    fn not_at(&self, peer: &DomusId, addr: &DomusAddr) {
        let Some(inner) = self.0.upgrade() else {
            return;
        };
        let unpinned = inner
            .routing
            .pinned
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .unpin(addr, peer);
        if unpinned {
            tracing::debug!(%peer, %addr, "another identity answers at a pinned address; the next send there learns it");
            // Destinations that resolved to the pinned peer resolve again before their next send.
            inner.routing.bump();
        }
    }
}

impl DomusInner {
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
        self.peers
            .get_or_make(id, addr.clone(), taberna, |shut_down| {
                self.start_peer(id, addr, shut_down)
            })
    }

    /// Starts the drivers of peer `id` (at `addr`; `shut_down`: it is remembered as shut down
    /// there) and returns their handles.
    fn start_peer(
        self: &Arc<Self>,
        id: &DomusId,
        addr: Option<DomusAddr>,
        shut_down: bool,
    ) -> Arc<PeerRef> {
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
        let blob_active = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let host: Arc<dyn DriverHost> = Arc::new(DomusHost(Arc::downgrade(self)));
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
                    host: host.clone(),
                    id_floor: self.peers.id_floor.clone(),
                    blob_active: blob_active.clone(),
                },
            },
        );
        // Everything a peer's drivers log (calles up and down, refusals, failovers) is inside
        // their span; a delivery's span is a child of it.
        // A root span: a peer outlives the send that first reached it.
        let span =
            tracing::debug_span!(parent: None, "vicus.peer", domus = %self.local_id, peer = %id);
        self.tasks.spawn(driver.instrument(span.clone()));
        self.tasks.spawn(
            BlobDriver::new(
                id.clone(),
                addr.clone(),
                self.blob_ctx.clone(),
                blob_rx,
                self.cancel.child_token(),
                BlobLinks {
                    config: self.config.load().blob(),
                    cells,
                    active: blob_active,
                    host,
                },
            )
            .instrument(span),
        );
        Arc::new(PeerRef {
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
        })
    }

    /// The handles of every live peer's drivers.
    pub(super) fn peer_links(&self) -> Vec<Arc<PeerRef>> {
        self.peers.all_links()
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

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: usize) -> DomusId {
        DomusId::spiffe("t", &format!("p{n}")).expect("id")
    }

    fn addr(port: u16) -> DomusAddr {
        DomusAddr::tcp(([127, 0, 0, 1], port))
    }

    /// Handles of a peer whose drivers never run (their channels stay open while the
    /// receivers live in `keep`).
    fn links(peer: &DomusId, keep: &mut Vec<Box<dyn std::any::Any>>) -> Arc<PeerRef> {
        let (tx, rx) = mpsc::unbounded_channel();
        let (blob_tx, blob_rx) = mpsc::unbounded_channel();
        keep.push(Box::new(rx));
        keep.push(Box::new(blob_rx));
        Arc::new(PeerRef {
            id: peer.clone(),
            addr: arc_swap::ArcSwapOption::empty(),
            tx,
            sends: Arc::new(WakeQueue::default()),
            budget: InFlightBudget::new(4, 1 << 20),
            blob_tx,
            blob_out_streams: Arc::new(Semaphore::new(1)),
            next_stream: Arc::new(std::sync::atomic::AtomicU64::new(1)),
            reachability: Arc::new(Reachability::default()),
        })
    }

    fn gone(at: u16, until: tokio::time::Instant, shut_down: bool) -> Down {
        Down {
            avoid_until: until,
            addr: Some(addr(at)),
            shut_down_until: shut_down.then_some(until),
        }
    }

    #[tokio::test]
    async fn a_peer_is_live_or_remembered_in_one_entry_and_the_memory_is_bounded() {
        let table = PeerTable::new();
        let mut keep = Vec::new();
        let now = tokio::time::Instant::now();
        let later = now + Duration::from_secs(60);
        // A live peer, then forgotten while unreachable: remembered, not live.
        let p = table.get_or_make(&id(0), Some(addr(1)), None, |shut| {
            assert!(!shut, "nothing remembered yet");
            links(&id(0), &mut keep)
        });
        assert_eq!(table.live(), 1);
        assert!(table.forget(&id(0), &p.sends, |a| {
            assert_eq!(a, Some(addr(1)));
            Some(gone(1, later, true))
        }));
        assert_eq!(table.live(), 0);
        assert!(table.links(&id(0)).is_none());
        assert!(!table.may_choose(&id(0), &addr(1), now), "avoided there");
        assert!(
            table.may_choose(&id(0), &addr(2), now),
            "not at another address"
        );
        assert!(
            table.may_choose(&id(0), &addr(1), later),
            "not after the memory ends"
        );
        // Its next driver at that address is told it shut down; at another address, not.
        let mut told = None;
        table.get_or_make(&id(0), Some(addr(1)), None, |shut| {
            told = Some(shut);
            links(&id(0), &mut keep)
        });
        assert_eq!(told, Some(true));
        assert_eq!(table.live(), 1);
        // A forget that is not ours (another queue) or with sends queued changes nothing.
        let other = Arc::new(WakeQueue::default());
        assert!(!table.forget(&id(0), &other, |_| None));
        assert_eq!(table.live(), 1);
        // Forgotten while reachable: nothing remembered.
        let live = table.links(&id(0)).expect("live");
        assert!(table.forget(&id(0), &live.sends, |_| None));
        assert!(table.may_choose(&id(0), &addr(1), now));
        // The memory of unreachable peers stays within its bound.
        for n in 1..=DOWN_REMEMBERED + 100 {
            let p = table.get_or_make(&id(n), Some(addr(1)), None, |_| links(&id(n), &mut keep));
            assert!(table.forget(&id(n), &p.sends, |_| Some(gone(1, later, false))));
        }
        let entries = table.lock();
        assert_eq!(entries.gone, DOWN_REMEMBERED);
        assert_eq!(entries.map.len(), DOWN_REMEMBERED);
    }
}
