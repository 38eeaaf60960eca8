//! vmha's multi-step operations, written against traits ([`ports`]) so that they carry no D-Bus, libvirt
//! or Pacemaker code: vmhad runs them over the real libraries, and [`sim`] (feature `sim`) runs them in
//! memory, deterministically, with a fault injected at any call.
//!
//! - [`clone`]: live clone, with its write-ahead journal, rollback and recovery by a restarted vmhad or
//!   the next DC.
//! - [`bounds`]: the members a time bound will stop asked to drain before its window starts (on the DC).

pub mod bounds;
pub mod clone;
pub mod error;
pub mod group;
pub mod ports;
#[cfg(any(test, feature = "sim"))]
pub mod sim;
pub mod state;
pub mod vcluster;
pub mod vm;

pub use error::OpError;
pub use ports::Ports;
