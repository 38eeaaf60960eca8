//! vmhad, vmha's per-host D-Bus service, and the pieces the `vmha` CLI shares with it: the D-Bus API
//! ([`api`]), the cluster state it publishes ([`state`]), its D-Bus objects ([`objects`]), the
//! operations it runs as jobs ([`jobs`]), the operations crate's ports over the real libraries
//! ([`ports`]), caller authorization ([`auth`]), its CIB access ([`backend`]), the guest channels
//! ([`guest`]) and its command line ([`options`]).

pub mod api;
pub mod auth;
pub mod authkey;
pub mod autoscale;
pub mod backend;
pub mod check;
pub mod confined;
pub mod daemon;
pub mod failures;
pub mod guest;
pub mod jobs;
pub mod membership;
pub mod objects;
pub mod options;
pub mod pacemaker;
pub mod placement;
pub mod ports;
pub mod progress;
pub mod readiness;
pub mod relay;
pub mod state;
pub mod vcluster;
