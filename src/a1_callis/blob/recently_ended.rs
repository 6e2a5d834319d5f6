//! The set of blob streams that ended lately, so that a late frame naming one is ignored (a
//! late BLOB_END answered) instead of counted as a violation. Bounded: it remembers the last
//! [`RECENT_CAP`] streams and forgets the oldest first.
//!
//! Pure and small: no IO, no clock; O(1) per lookup, because a peer chooses how many late
//! frames it sends.

use std::collections::{HashMap, VecDeque};

/// Streams remembered as recently ended.
pub(super) const RECENT_CAP: usize = 1024;

/// The last [`RECENT_CAP`] streams that ended, each with the length it completed with (for
/// receiving streams that completed), looked up in O(1): a late frame naming one is checked
/// once per frame, and a peer chooses how many it sends.
///
/// Invariants: `order` holds at most `RECENT_CAP` entries, oldest first; every key of
/// `by_id` is in `order` with the same generation (so `by_id` is never larger than
/// `order`). A stream that ends a second time (a peer reused its id) gets a new generation:
/// its older entry in `order` then names a generation `by_id` no longer holds, and evicting
/// it leaves the newer one alone.
#[derive(Debug, Default)]
pub(super) struct RecentlyEnded {
    /// Stream and generation, in the order they ended: the order they are forgotten in.
    pub(super) order: VecDeque<(u64, u64)>,
    /// Stream → (completed length, generation).
    pub(super) by_id: HashMap<u64, (Option<u64>, u64)>,
    next_generation: u64,
}

impl RecentlyEnded {
    pub(super) fn remember(&mut self, stream: u64, total: Option<u64>) {
        if self.order.len() >= RECENT_CAP
            && let Some((old, generation)) = self.order.pop_front()
            && self.by_id.get(&old).is_some_and(|(_, g)| *g == generation)
        {
            self.by_id.remove(&old);
        }
        let generation = self.next_generation;
        self.next_generation = self.next_generation.wrapping_add(1);
        self.order.push_back((stream, generation));
        self.by_id.insert(stream, (total, generation));
    }

    /// Whether `stream` ended lately, and the length it completed with.
    pub(super) fn get(&self, stream: u64) -> Option<Option<u64>> {
        self.by_id.get(&stream).map(|(total, _)| *total)
    }
}
