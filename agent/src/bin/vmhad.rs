//! `vmhad`: vmha's per-host D-Bus service (placeholder until the Pacemaker CIB backend lands).
fn main() {}
