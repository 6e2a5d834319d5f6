//! In-memory pairs of vicus's sans-IO state machines on a virtual clock: the one pair harness
//! of vicus's protocol tests. [`SessionPair`] wires two primary sessions back to back,
//! [`BlobPair`] two blob state machines; vicus's unit tests and its fuzz targets
//! (`vicus::fuzzing`) drive the same pumps. Bytes go through the real frame codec; time moves
//! only when the test says. Nothing here touches a socket or sleeps, so a test runs in
//! microseconds and cannot flake.
//!
//! A test plays a hostile or scripted peer through the same pair: bytes injected straight into
//! a side's receive buffer ([`SessionPair::inject_to_a`], [`BlobPair::hand`]), frames a side
//! writes dropped by a [`SessionPair::filter`], a side stalled, or a side left unconnected so
//! that what reaches it is discarded (the `session_input` fuzz target scripts the peer of
//! `a` that way).
//!
//! Checked on every transfer, for every test: `poll_transmit` says whether it wrote; what it
//! wrote is whole frames that decode (within [`SessionPair::wire_limit`], or the receiving
//! blob side's frame limit); after `handle_timeout(now)` a machine never asks to be woken at
//! or before `now` (its driver would spin). A blob side writes nothing while its callis is
//! down, its cancels before any other frame, data chunks within both sides' chunk limits and
//! starting below the budget, and nothing more right after an unlimited `poll_transmit`.
//!
//! What it must not do: hide a protocol failure. The helpers panic (documented per method)
//! when the machines refuse what a test asks, break one of the checks above or never go
//! quiet, so the test fails there.

mod blob;
mod session;

pub use blob::{BlobPair, WireFrame};
pub use session::{A, B, Filter, SessionPair, Verdict, frame_types, message_ids, record};

/// One side of a pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// `a`.
    A,
    /// `b`.
    B,
}

impl Side {
    /// The other side.
    pub fn peer(self) -> Side {
        match self {
            Side::A => Side::B,
            Side::B => Side::A,
        }
    }
}
