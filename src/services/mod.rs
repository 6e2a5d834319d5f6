//! vicus's own mesh services (A2): features a domus offers to other domus over vicus itself,
//! on taberna ids from [`RESERVED_TABERNA_BASE`](crate::RESERVED_TABERNA_BASE) up (which
//! applications cannot register) and with A2 message types (`0x0001_0000..=0x00FF_FFFF`, which
//! a domus sends to those tabernas only). Each service is off until the application starts it
//! and answers only the peers it allows.
//!
//! This layer sits above the domus and uses only what a domus offers; it must not reach into
//! the runtime or the session.

#[cfg(feature = "reporting-service")]
pub mod reporting;
pub mod topics;
