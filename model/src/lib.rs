//! vmha's domain model, shared by the daemon, the CLI and the agents: the cluster as Pacemaker's CIB
//! describes it ([`cib`]), the CIB changes vmha makes ([`change`]) and the guest channel protocol
//! ([`guest`]). Pure logic, no I/O.

pub mod arbitration;
pub mod bound_edges;
pub mod change;
pub mod cib;
pub mod clone;
pub mod domain;
pub mod failover;
pub mod group;
pub mod guest;
pub mod health;
pub mod policy;
pub mod replica;
pub mod round_record;
pub mod site;
pub mod whatif;

pub use cib::{ClusterView, Constraint, HostView, VmState, VmView};

/// `text` fit to print on a terminal or in a log: control characters (and the DEL and C1 controls,
/// which terminals act on) are escaped as `\u{..}`, a backslash is doubled. Everything that came from
/// an archive (or a guest) goes through this before it is printed, in the plan and in errors.
pub fn printable(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            c if c.is_control()
                || matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}') =>
            {
                out.push_str(&format!("\\u{{{:x}}}", u32::from(c)))
            }
            c => out.push(c),
        }
    }
    out
}

/// Resource agents whose resources vmha treats as virtual machines.
pub const VM_AGENTS: [(&str, &str, &str); 2] =
    [("ocf", "vmha", "VirtualMachine"), ("ocf", "heartbeat", "VirtualDomain")];

/// Errors of the domain model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("the CIB is not well-formed XML: {0}")]
    Xml(#[from] roxmltree::Error),
    #[error("the CIB has no <{0}> section")]
    MissingSection(&'static str),
    #[error("invalid {what} {value:?}: {why}")]
    Invalid {
        what: &'static str,
        value: String,
        why: &'static str,
    },
}
