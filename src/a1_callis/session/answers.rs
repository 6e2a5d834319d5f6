//! The answers waiting to be written ([`AnswerQueue`]) and their size on the wire: what T31
//! bounds. Pure data structure; no IO.

use super::*;

/// The answers waiting to be written, and what they take on the wire.
///
/// Invariant: `bytes` is the sum of [`answer_wire_len`] over everything queued.
#[derive(Debug, Default)]
pub(super) struct AnswerQueue {
    pub(super) accepted: Vec<u64>,
    pub(super) others: VecDeque<(u64, Answer)>,
    pub(super) bytes: usize,
}

impl AnswerQueue {
    pub(super) fn len(&self) -> usize {
        self.accepted.len().saturating_add(self.others.len())
    }

    pub(super) fn is_empty(&self) -> bool {
        self.accepted.is_empty() && self.others.is_empty()
    }

    #[inline]
    pub(super) fn push(&mut self, id: u64, answer: Answer) {
        if let Answer::Accepted = answer {
            self.bytes = self.bytes.saturating_add(frame::ACCEPTED_RUN_LEN);
            self.accepted.push(id);
            return;
        }
        self.bytes = self.bytes.saturating_add(answer_wire_len(&answer));
        self.others.push_back((id, answer));
    }

    pub(super) fn pop_other(&mut self) -> Option<(u64, Answer)> {
        let (id, answer) = self.others.pop_front()?;
        self.bytes = self.bytes.saturating_sub(answer_wire_len(&answer));
        Some((id, answer))
    }

    /// Forgets the first `n` accepted ids (written).
    pub(super) fn written_accepted(&mut self, n: usize) {
        let n = n.min(self.accepted.len());
        self.accepted.drain(..n);
        self.bytes = self
            .bytes
            .saturating_sub(n.saturating_mul(frame::ACCEPTED_RUN_LEN));
    }
}

/// At most what `answer` takes on the wire (an accepted id: a run of its own, 12 bytes, in a
/// shared frame; consecutive ids share a run).
pub(super) fn answer_wire_len(answer: &Answer) -> usize {
    match answer {
        Answer::Accepted => frame::ACCEPTED_RUN_LEN,
        Answer::Replied(payload) | Answer::RepliedWithHeaders(payload) => {
            (frame::HEADER_LEN + 8).saturating_add(payload.len())
        }
        Answer::Rejected { reason, .. } => (frame::HEADER_LEN + frame::REJECT_FIXED_LEN)
            .saturating_add(reason.len().min(frame::MAX_REASON_LEN)),
    }
}
