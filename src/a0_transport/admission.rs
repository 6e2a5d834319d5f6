//! The pre-authentication gate: how many handshakes may be in progress at once, in total and per
//! source (IP address for TCP, uid for Unix sockets), plus the listener's counters.
//!
//! A connection is admitted or refused the moment it is accepted, before any TLS work; a refused
//! socket is simply closed. An admitted connection holds an [`AdmissionPermit`] until its
//! handshake ends (successfully or not), and dropping the permit frees the slot. The table is
//! behind a `std::sync::Mutex` held for a few instructions, never across an `.await`.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

/// Where an unauthenticated connection comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Source {
    Ip(IpAddr),
    Uid(u32),
}

/// Why a connection was turned away at the gate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    Global,
    PerSource,
}

#[derive(Default)]
struct Table {
    total: usize,
    per_source: HashMap<Source, usize>,
}

/// Counters a listener keeps; see [`ListenerStats`] for their meaning.
#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) admitted: AtomicU64,
    pub(crate) refused_global: AtomicU64,
    pub(crate) refused_per_source: AtomicU64,
    pub(crate) refused_uid: AtomicU64,
    pub(crate) handshakes_ok: AtomicU64,
    pub(crate) handshakes_failed: AtomicU64,
    pub(crate) handshake_timeouts: AtomicU64,
}

impl Counters {
    pub(crate) fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// A snapshot of a listener's admission and handshake counters (cumulative since bind).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ListenerStats {
    /// Handshakes in progress right now (admitted, not yet finished).
    pub pending_handshakes: usize,
    /// Connections admitted past the gate.
    pub admitted: u64,
    /// Connections closed because `max_pending_handshakes` was reached.
    pub refused_global: u64,
    /// Connections closed because their source reached `max_pending_handshakes_per_source`.
    pub refused_per_source: u64,
    /// Unix-socket connections closed because the peer's uid is not allowed.
    pub refused_uid: u64,
    /// Handshakes that produced an authenticated stream.
    pub handshakes_ok: u64,
    /// Handshakes that failed (bad certificate, wrong protocol, peer hung up, …).
    pub handshakes_failed: u64,
    /// Handshakes that did not finish before `handshake_timeout`.
    pub handshake_timeouts: u64,
}

/// The gate shared by a listener and the permits it hands out.
pub(crate) struct Gate {
    max_total: usize,
    max_per_source: usize,
    table: Mutex<Table>,
    pub(crate) counters: Counters,
}

impl Gate {
    pub(crate) fn new(max_total: usize, max_per_source: usize) -> Self {
        Self {
            max_total,
            max_per_source,
            table: Mutex::new(Table::default()),
            counters: Counters::default(),
        }
    }

    /// Admits a connection from `source`, or says why not. Never blocks on IO.
    pub(crate) fn try_admit(self: &Arc<Self>, source: Source) -> Result<AdmissionPermit, Refusal> {
        // A poisoned table is still consistent (every update is a single step), so keep using it.
        let mut table = self.table.lock().unwrap_or_else(PoisonError::into_inner);
        if table.total >= self.max_total {
            Counters::bump(&self.counters.refused_global);
            return Err(Refusal::Global);
        }
        let count = table.per_source.entry(source).or_insert(0);
        if *count >= self.max_per_source {
            Counters::bump(&self.counters.refused_per_source);
            return Err(Refusal::PerSource);
        }
        *count = count.saturating_add(1);
        table.total = table.total.saturating_add(1);
        Counters::bump(&self.counters.admitted);
        Ok(AdmissionPermit {
            gate: Arc::clone(self),
            source,
        })
    }

    pub(crate) fn stats(&self) -> ListenerStats {
        let pending = self
            .table
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .total;
        let c = &self.counters;
        ListenerStats {
            pending_handshakes: pending,
            admitted: c.admitted.load(Ordering::Relaxed),
            refused_global: c.refused_global.load(Ordering::Relaxed),
            refused_per_source: c.refused_per_source.load(Ordering::Relaxed),
            refused_uid: c.refused_uid.load(Ordering::Relaxed),
            handshakes_ok: c.handshakes_ok.load(Ordering::Relaxed),
            handshakes_failed: c.handshakes_failed.load(Ordering::Relaxed),
            handshake_timeouts: c.handshake_timeouts.load(Ordering::Relaxed),
        }
    }
}

/// A slot in the gate, held while one handshake is in progress; dropping it frees the slot.
pub(crate) struct AdmissionPermit {
    gate: Arc<Gate>,
    source: Source,
}

impl AdmissionPermit {
    pub(crate) fn gate(&self) -> &Gate {
        &self.gate
    }
}

impl Drop for AdmissionPermit {
    fn drop(&mut self) {
        let mut table = self
            .gate
            .table
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        table.total = table.total.saturating_sub(1);
        if let Some(count) = table.per_source.get_mut(&self.source) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                table.per_source.remove(&self.source);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn t07_limits_hold_and_permits_free_their_slot() {
        let gate = Arc::new(Gate::new(3, 2));
        let a = Source::Ip("127.0.0.2".parse().unwrap());
        let b = Source::Uid(1000);
        let p1 = gate.try_admit(a).unwrap();
        let p2 = gate.try_admit(a).unwrap();
        assert_eq!(gate.try_admit(a).err(), Some(Refusal::PerSource));
        let p3 = gate.try_admit(b).unwrap();
        assert_eq!(gate.try_admit(b).err(), Some(Refusal::Global));
        assert_eq!(gate.stats().pending_handshakes, 3);
        drop((p1, p2, p3));
        let stats = gate.stats();
        assert_eq!(stats.pending_handshakes, 0);
        assert_eq!(
            (
                stats.admitted,
                stats.refused_global,
                stats.refused_per_source
            ),
            (3, 1, 1)
        );
        assert!(gate.table.lock().unwrap().per_source.is_empty());
        let _again = gate.try_admit(a).unwrap();
    }
}
