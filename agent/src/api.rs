//! vmha's D-Bus API: the names, paths, path escaping, errors and client proxies live in the `vmha-api`
//! crate (shared with the CLI and the resource agent); re-exported here for vmhad's modules.

pub use vmha_api::*;
