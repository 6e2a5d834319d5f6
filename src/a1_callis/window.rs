//! [`IdQueue`]: values keyed by message ids that are handed out in increasing order and
//! removed in any order — the shape of the session's one in-flight table (each message with
//! its sender's token).
//!
//! Invariants: `slots[i]` holds the value for id `base + i`; the front slot is always occupied
//! (empty front slots are trimmed at once), so the oldest id is `base` and lookups are O(1).
//! Pure data structure: no IO, no clock.

use std::collections::VecDeque;

/// Room an empty queue keeps (in slots) rather than giving back.
const IDLE_KEEP: usize = 64;

/// Values keyed by increasing `u64` ids.
#[derive(Debug)]
pub(crate) struct IdQueue<T> {
    base: u64,
    slots: VecDeque<Option<T>>,
    len: usize,
}

impl<T> Default for IdQueue<T> {
    fn default() -> Self {
        Self {
            base: 0,
            slots: VecDeque::new(),
            len: 0,
        }
    }
}

impl<T> IdQueue<T> {
    /// Number of values held.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is held.
    pub(crate) fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Gives back the room a burst left behind, when nothing is held.
    pub(crate) fn shrink_if_empty(&mut self) {
        if self.slots.is_empty() && self.slots.capacity() > IDLE_KEEP {
            self.slots = VecDeque::new();
        }
    }

    fn index(&self, id: u64) -> Option<usize> {
        let offset = id.checked_sub(self.base)?;
        usize::try_from(offset)
            .ok()
            .filter(|i| *i < self.slots.len())
    }

    /// Inserts `value` for `id`, which must be greater than every id inserted before (ids
    /// skipped in between simply hold nothing). Returns false (and drops nothing) when `id`
    /// is not greater, or the gap would be absurd (over 2^20 ids).
    #[inline]
    pub(crate) fn push(&mut self, id: u64, value: T) -> bool {
        if self.slots.is_empty() {
            self.base = id;
        }
        let Some(offset) = id.checked_sub(self.base) else {
            return false;
        };
        let Ok(offset) = usize::try_from(offset) else {
            return false;
        };
        let gap = offset.checked_sub(self.slots.len());
        if gap.is_none_or(|g| g > 1 << 20) {
            return false;
        }
        while self.slots.len() < offset {
            self.slots.push_back(None);
        }
        self.slots.push_back(Some(value));
        self.len = self.len.saturating_add(1);
        true
    }

    /// The value for `id`.
    pub(crate) fn get(&self, id: u64) -> Option<&T> {
        self.index(id)
            .and_then(|i| self.slots.get(i))
            .and_then(Option::as_ref)
    }

    /// The value for `id`, mutably.
    pub(crate) fn get_mut(&mut self, id: u64) -> Option<&mut T> {
        let i = self.index(id)?;
        self.slots.get_mut(i).and_then(Option::as_mut)
    }

    /// Removes and returns the value for `id`.
    pub(crate) fn remove(&mut self, id: u64) -> Option<T> {
        let i = self.index(id)?;
        let value = self.slots.get_mut(i).and_then(Option::take)?;
        self.len = self.len.saturating_sub(1);
        while matches!(self.slots.front(), Some(None)) {
            self.slots.pop_front();
            self.base = self.base.wrapping_add(1);
        }
        Some(value)
    }

    /// The oldest id held.
    pub(crate) fn first_id(&self) -> Option<u64> {
        if self.len == 0 { None } else { Some(self.base) }
    }

    /// Every (id, value), oldest first.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (u64, &T)> {
        let base = self.base;
        self.slots
            .iter()
            .zip(0u64..)
            .filter_map(move |(slot, i)| slot.as_ref().map(|v| (base.wrapping_add(i), v)))
    }

    /// Every (id, value) mutably, oldest first.
    pub(crate) fn iter_mut(&mut self) -> impl Iterator<Item = (u64, &mut T)> {
        let base = self.base;
        self.slots
            .iter_mut()
            .zip(0u64..)
            .filter_map(move |(slot, i)| slot.as_mut().map(|v| (base.wrapping_add(i), v)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn out_of_order_removal_trims_the_front() {
        let mut q = IdQueue::default();
        for id in 10..15 {
            assert!(q.push(id, id * 2));
        }
        assert!(!q.push(12, 0), "ids only grow");
        assert_eq!(q.remove(12), Some(24));
        assert_eq!(q.remove(12), None);
        assert_eq!(q.first_id(), Some(10));
        assert_eq!(q.remove(10), Some(20));
        assert_eq!(q.remove(11), Some(22));
        assert_eq!(q.first_id(), Some(13));
        assert_eq!(q.iter().map(|(id, _)| id).collect::<Vec<_>>(), vec![13, 14]);
        assert_eq!(q.len(), 2);
        assert!(q.push(20, 40), "gaps are allowed");
        assert_eq!(q.get(20), Some(&40));
        assert_eq!(q.get(17), None);
        assert_eq!(
            q.iter().map(|(id, _)| id).collect::<Vec<_>>(),
            vec![13, 14, 20]
        );
        for id in [13, 14, 20] {
            q.remove(id);
        }
        assert!(q.is_empty() && q.first_id().is_none());
        assert!(q.push(3, 6), "an empty queue restarts at any id");
    }

    proptest! {
        #[test]
        fn behaves_like_a_btreemap(ops in proptest::collection::vec((any::<bool>(), 0u64..64), 1..300)) {
            let mut q = IdQueue::default();
            let mut model = std::collections::BTreeMap::new();
            let mut next = 1u64;
            for (push, k) in ops {
                if push {
                    next += k % 3;
                    prop_assert!(q.push(next, next));
                    model.insert(next, next);
                    next += 1;
                } else {
                    let id = next.saturating_sub(k);
                    prop_assert_eq!(q.remove(id), model.remove(&id));
                }
                prop_assert_eq!(q.len(), model.len());
                prop_assert_eq!(q.first_id(), model.keys().next().copied());
            }
            prop_assert!(q.iter().map(|(id, v)| (id, *v)).eq(model.into_iter()));
        }
    }
}
