//! The receiver's dedupe state ([`DedupeRing`]): which ids of the peer it has seen, on which
//! callis, and how each was answered, so a replay is answered again and never delivered twice.
//! Pure data structure with its invariants; no IO, no clock.

use super::*;

#[derive(Debug, Clone, Default)]
pub(super) enum SlotState {
    #[default]
    Pending,
    Answered(Answer),
    /// Answered with a reply that was not kept (retention budget).
    ReplyLost,
}

/// One id the receiver has seen: how it was answered, and the last callis it arrived on (a
/// correct sender writes an id at most once per callis: again only as a replay on a later
/// one).
#[derive(Debug, Clone)]
pub(super) struct Slot {
    pub(super) state: SlotState,
    pub(super) callis: u32,
}

/// The receiver's dedupe state: what it delivered from `base` on and how each was answered,
/// so a replayed duplicate is answered again and never delivered twice.
///
/// Invariants: `slots[i]` is id `base + i`; `slots.len() <= window`; every id below `base` was
/// of no more use: the sender said it will not send it again (DONE_BELOW), or may no longer
/// send it (it is `window` or more below the highest id seen). So memory follows what is in
/// flight when the sender reports its floor, and never exceeds the window.
#[derive(Debug)]
pub(super) struct DedupeRing {
    pub(super) base: u64,
    /// `None`: an id not seen (yet) inside the window.
    pub(super) slots: VecDeque<Option<Slot>>,
    pub(super) window: u64,
    pub(super) highest: u64,
    /// What the peer said it will never send again (DONE_BELOW); a MESSAGE below it is a
    /// violation.
    pub(super) seen_floor: u64,
    /// Reply bytes this ring keeps, taken from `budget`.
    pub(super) retained_reply_bytes: usize,
    /// The allowance those bytes come from (shared by every session of a domus).
    pub(super) budget: Arc<ReplyBudget>,
}

impl Drop for DedupeRing {
    fn drop(&mut self) {
        self.budget.give_back(self.retained_reply_bytes);
    }
}

pub(super) enum Seen {
    New,
    /// Seen before on an earlier callis (a replay): now marked as seen on this one too.
    Replayed,
    /// Seen before on this very callis: a correct sender never does that.
    DuplicateOnThisCallis,
    OutsideWindow,
    /// Below what the sender said it will never send again.
    BelowFloor,
}

impl DedupeRing {
    pub(super) fn new(window: u32, budget: Arc<ReplyBudget>) -> Self {
        Self {
            base: 1,
            slots: VecDeque::new(),
            window: u64::from(window.max(1)),
            highest: 0,
            seen_floor: 1,
            retained_reply_bytes: 0,
            budget,
        }
    }

    /// Keeps `bytes` more reply bytes if the budget has room.
    pub(super) fn take_reply_bytes(&mut self, bytes: usize) -> bool {
        if !self.budget.try_take(bytes) {
            return false;
        }
        self.retained_reply_bytes = self.retained_reply_bytes.saturating_add(bytes);
        true
    }

    pub(super) fn give_back_reply_bytes(&mut self, bytes: usize) {
        let bytes = bytes.min(self.retained_reply_bytes);
        self.retained_reply_bytes = self.retained_reply_bytes.saturating_sub(bytes);
        self.budget.give_back(bytes);
    }

    pub(super) fn state_mut(&mut self, id: u64) -> Option<&mut SlotState> {
        let i = usize::try_from(id.checked_sub(self.base)?).ok()?;
        self.slots.get_mut(i)?.as_mut().map(|slot| &mut slot.state)
    }

    /// Records that `id` arrived on callis number `callis`.
    pub(super) fn observe(&mut self, id: u64, callis: u32) -> Seen {
        let window = self.window;
        if id == 0 || (self.highest >= window && id <= self.highest.saturating_sub(window)) {
            return Seen::OutsideWindow;
        }
        if id < self.seen_floor {
            return Seen::BelowFloor;
        }
        // Ids `window` or more below the new one can no longer come: forget them.
        let lowest_kept = id.saturating_sub(window).saturating_add(1);
        self.forget_below(lowest_kept);
        if id < self.base {
            return Seen::OutsideWindow;
        }
        let Ok(i) = usize::try_from(id.saturating_sub(self.base)) else {
            return Seen::OutsideWindow;
        };
        // Ids mostly come one after another: one more slot at the back.
        if i == self.slots.len() {
            self.slots.push_back(None);
        } else if i > self.slots.len() {
            self.slots.resize(i.saturating_add(1), None);
        }
        let Some(slot) = self.slots.get_mut(i) else {
            return Seen::OutsideWindow;
        };
        if let Some(seen) = slot {
            if seen.callis == callis {
                return Seen::DuplicateOnThisCallis;
            }
            seen.callis = callis;
            return Seen::Replayed;
        }
        *slot = Some(Slot {
            state: SlotState::Pending,
            callis,
        });
        self.highest = self.highest.max(id);
        Seen::New
    }

    /// Forgets every id below `floor` (their answers and the reply bytes they kept).
    pub(super) fn forget_below(&mut self, floor: u64) {
        while self.base < floor {
            match self.slots.pop_front() {
                Some(slot) => {
                    if let Some(Slot {
                        state:
                            SlotState::Answered(Answer::Replied(old) | Answer::RepliedWithHeaders(old)),
                        ..
                    }) = slot
                    {
                        self.give_back_reply_bytes(old.len());
                    }
                    self.base = self.base.saturating_add(1);
                }
                None => {
                    self.base = floor;
                    break;
                }
            }
        }
        if self.slots.is_empty() && self.slots.capacity() > 1024 {
            self.slots.shrink_to(64);
        }
    }

    /// The peer will never send an id below `floor` again (DONE_BELOW): forget them, and
    /// refuse a MESSAGE below it from now on. A lower floor than one already known changes
    /// nothing.
    pub(super) fn done_below(&mut self, floor: u64) {
        if floor > self.seen_floor {
            self.seen_floor = floor;
            self.forget_below(floor);
        }
    }

    pub(super) fn reset(&mut self) {
        self.slots = VecDeque::new();
        self.base = 1;
        self.highest = 0;
        self.seen_floor = 1;
        self.give_back_reply_bytes(self.retained_reply_bytes);
    }

    /// Every delivery still waiting for its handler.
    pub(super) fn pending(&self) -> Vec<u64> {
        (self.base..)
            .zip(self.slots.iter())
            .filter(|(_, s)| {
                matches!(
                    s,
                    Some(Slot {
                        state: SlotState::Pending,
                        ..
                    })
                )
            })
            .map(|(id, _)| id)
            .collect()
    }
}
