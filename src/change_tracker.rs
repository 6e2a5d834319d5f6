//! The rule the file pollers share (the PEM watcher of feature `watch`, the routes file of
//! feature `file-resolver`): contents are acted on only once they have read **the same on two
//! polls in a row**, and a failure is reported **once** until something changes.
//!
//! [`ChangeTracker`] is fed the hash of each successful read and the message of each failed
//! one, and answers what the poller should do. It is pure: no IO, no clock, no tokio. It must
//! not decide how files are read, parsed or applied; its caller does that and tells it the
//! outcome ([`ChangeTracker::applied`], [`ChangeTracker::refused`]).

/// What the poller should do with the contents it just read (from [`ChangeTracker::read`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Step {
    /// They are the contents in force: nothing to do.
    InForce,
    /// They changed since the previous poll: wait one interval for the writer to finish.
    Settling,
    /// They are stable but were refused before (and that was reported): nothing to do.
    Refused,
    /// They are stable and new: try them, then call [`ChangeTracker::applied`] or
    /// [`ChangeTracker::refused`].
    Try,
}

/// The state of one poller; see the module docs.
///
/// Invariants: `refused` is never `applied` (applying clears it); `previous` is `None` only
/// after a failed read, so the next successful read always settles first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ChangeTracker {
    /// The hash of the contents in force (as far as the poller knows).
    applied: Option<u64>,
    /// The hash the previous poll read; `None` after a failed read.
    previous: Option<u64>,
    /// The hash of stable contents that were refused; not tried again until they change.
    refused: Option<u64>,
    /// The message of the read failure last reported; cleared by a successful read.
    read_error: Option<String>,
}

impl ChangeTracker {
    /// A tracker for a poller that starts with the contents hashed `in_force` (read just now).
    pub(crate) fn new(in_force: u64) -> Self {
        Self {
            applied: Some(in_force),
            previous: Some(in_force),
            refused: None,
            read_error: None,
        }
    }

    /// A read succeeded with contents hashed `hash`: what to do with them.
    pub(crate) fn read(&mut self, hash: u64) -> Step {
        self.read_error = None;
        let hash = Some(hash);
        if hash == self.applied {
            // Back to (or still at) the contents in force: contents refused before are tried
            // again should they reappear.
            self.previous = hash;
            self.refused = None;
            return Step::InForce;
        }
        if hash != self.previous {
            self.previous = hash;
            return Step::Settling;
        }
        if hash == self.refused {
            return Step::Refused;
        }
        Step::Try
    }

    /// The contents hashed `hash` are now in force (tried after [`Step::Try`], or applied by
    /// another path). Telling it the contents already in force changes nothing.
    pub(crate) fn applied(&mut self, hash: u64) {
        if self.applied != Some(hash) {
            self.applied = Some(hash);
            self.refused = None;
        }
    }

    /// The contents hashed `hash` were tried and refused (and the poller reported why).
    pub(crate) fn refused(&mut self, hash: u64) {
        self.refused = Some(hash);
    }

    /// A read failed with `message`: whether to report it (`false` when the last failure
    /// reported had the same message and no read succeeded since).
    pub(crate) fn read_failed(&mut self, message: &str) -> bool {
        self.previous = None;
        if self.read_error.as_deref() == Some(message) {
            return false;
        }
        self.read_error = Some(message.to_owned());
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_contents_are_tried_after_two_equal_reads_only() {
        let mut t = ChangeTracker::new(1);
        assert_eq!(t.read(1), Step::InForce);
        assert_eq!(t.read(2), Step::Settling);
        assert_eq!(t.read(3), Step::Settling);
        assert_eq!(t.read(3), Step::Try);
        t.applied(3);
        assert_eq!(t.read(3), Step::InForce);
        // Back to older contents: they too settle first.
        assert_eq!(t.read(1), Step::Settling);
        assert_eq!(t.read(1), Step::Try);
    }

    #[test]
    fn refused_contents_are_not_tried_again_until_they_change_or_come_back() {
        let mut t = ChangeTracker::new(1);
        assert_eq!(t.read(2), Step::Settling);
        assert_eq!(t.read(2), Step::Try);
        t.refused(2);
        assert_eq!(t.read(2), Step::Refused);
        assert_eq!(t.read(2), Step::Refused);
        // A failed read in between does not make it new again.
        assert!(t.read_failed("gone"));
        assert_eq!(t.read(2), Step::Settling);
        assert_eq!(t.read(2), Step::Refused);
        // The contents in force come back, then the refused ones: tried again.
        assert_eq!(t.read(1), Step::InForce);
        assert_eq!(t.read(2), Step::Settling);
        assert_eq!(t.read(2), Step::Try);
    }

    #[test]
    fn a_read_failure_is_reported_once_until_it_changes_or_a_read_succeeds() {
        let mut t = ChangeTracker::new(1);
        assert!(t.read_failed("missing"));
        assert!(!t.read_failed("missing"));
        assert!(t.read_failed("too large"));
        assert!(!t.read_failed("too large"));
        assert_eq!(t.read(1), Step::InForce);
        assert!(t.read_failed("too large"));
    }

    #[test]
    fn contents_applied_elsewhere_count_as_in_force() {
        let mut t = ChangeTracker::new(1);
        assert_eq!(t.read(2), Step::Settling);
        t.applied(2);
        assert_eq!(t.read(2), Step::InForce);
        // Repeating what is in force keeps a refusal standing.
        assert_eq!(t.read(3), Step::Settling);
        assert_eq!(t.read(3), Step::Try);
        t.refused(3);
        t.applied(2);
        assert_eq!(t.read(3), Step::Refused);
    }
}
