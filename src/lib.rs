//! # vicus
//!
//! An embeddable, authenticated peer-to-peer mesh for Rust.
//!
//! (Crate documentation is filled in below; see the sections.)

pub mod a0_transport;
mod error;

pub use a0_transport::{AuthConfig, DomusAddr, DomusId, PeerIdentity, TrustPolicy};
pub use error::{ERROR_MESSAGE_MAX_LEN, Error, ErrorId, Result};

#[cfg(feature = "dev-certs")]
pub mod dev_certs;
