//! vmhad, vmha's per-host D-Bus service: the D-Bus API ([`api`], re-exported from the `vmha-api` crate),
//! the cluster state it publishes ([`state`]), its D-Bus objects ([`objects`]), the operations it runs as
//! jobs ([`jobs`]), the operations crate's ports over the real libraries ([`ports`]), caller authorization
//! ([`auth`]), where it logs ([`logging`]), its CIB access ([`backend`]), the guest channels ([`guest`]) and its command line
//! ([`options`]).
//!
//! The library also still holds code only the `vmha` CLI (crate `vmha-cli`) runs: the placement policy
//! and what-if commands ([`placement`]), the virtual-cluster tag commands ([`vcluster::run`]), `vmha check`
//! ([`check`]), group autoscale measurements ([`autoscale`]) and `vmha keygen` ([`authkey::generate`]).

pub mod api;
pub mod archive_store;
pub mod auth;
pub mod authkey;
pub mod autoscale;
pub mod backend;
pub mod check;
pub mod confined;
pub mod daemon;
pub mod envelope;
pub mod errors;
pub mod failures;
pub mod free_capacity;
pub mod guest;
pub mod health;
pub mod heartbeats;
#[cfg(test)]
mod interface_xml;
pub mod jobs;
pub mod logging;
pub mod membership;
pub mod objects;
pub mod options;
pub mod pacemaker;
pub mod placement;
pub mod ports;
pub mod postmortem;
pub mod readiness;
pub mod relay;
pub mod signals;
pub mod site;
pub mod state;
pub mod vcluster;
pub mod whatif;
