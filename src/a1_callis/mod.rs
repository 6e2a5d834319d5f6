//! **A1: the callis.** One authenticated connection per peer carries HELLO, keepalive,
//! messages and their answers, framed by a pure codec ([`frame`]) and driven by a sans-IO
//! session state machine ([`session`]; its transmit schedule and its deadline index are small
//! pure structs of their own, `schedule` and `deadlines`). The reason numbers frames carry are
//! mapped to and from [`ErrorId`](crate::ErrorId), and classified, in one place ([`codes`]).
//! Blob streams have their own sans-IO state machine
//! ([`blob`]: credit-based flow control, fair chunking, resend after reconnect), driven on a
//! second callis per peer by the runtime's blob driver. The link policy ([`link`]: reconnect
//! backoff, the one-callis tie-break, the callis age limit) is pure too.
//!
//! Everything async lives one layer up, in the runtime, which drives these machines; this
//! layer names nothing above it. It must not know about TLS, certificates or sockets (it receives bytes and returns
//! bytes), nor read the clock: time is always passed in.

#![cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::indexing_slicing,
        clippy::arithmetic_side_effects
    )
)]

pub mod blob;
pub mod codes;
pub(crate) mod deadlines;
pub mod frame;
pub mod headers;
pub mod link;
pub mod rate;
pub mod reply_budget;
pub(crate) mod schedule;
pub mod session;
pub(crate) mod window;
