//! The agent's errors: each names the VM and the failed call, and maps to an OCF exit code.

use std::io;
use std::path::PathBuf;

use virt_sys as sys;

use crate::domain_config::ConfigError;
use crate::migration::PlanError;
use crate::ocf::OcfStatus;
use crate::params::ParamError;

/// Everything that can make an action fail.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Params(#[from] ParamError),
    #[error("config file {path}: {source}")]
    ConfigUnreadable {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("config file {path}: {source}")]
    ConfigInvalid {
        path: PathBuf,
        #[source]
        source: ConfigError,
    },
    #[error("domain={domain:?} differs from the name {in_config:?} in config file {path}")]
    NameMismatch {
        domain: String,
        in_config: String,
        path: PathBuf,
    },
    #[error("cannot tell which VM this is: {0}")]
    NoIdentity(String),
    #[error("cannot connect to {uri} ({call}): {}", .source.message())]
    Connect {
        uri: String,
        call: &'static str,
        #[source]
        source: virt::error::Error,
    },
    #[error("VM {vm}: {call} failed: {}", .source.message())]
    Libvirt {
        vm: String,
        call: &'static str,
        #[source]
        source: virt::error::Error,
    },
    #[error("VM {vm}: not defined on this host ({uri}), and no config file to create it from")]
    UnknownDomain { vm: String, uri: String },
    #[error(
        "VM {vm}: another persistent domain of this name (UUID {existing}) is defined on this \
         host; undefine it, or manage it with domain= instead of config="
    )]
    ConflictingDefinition { vm: String, existing: String },
    #[error("VM {vm}: {what}")]
    Failed { vm: String, what: String },
    #[error("OCF_RESKEY_CRM_meta_migrate_target is not set")]
    NoMigrateTarget,
    #[error("VM {vm}: cannot plan the migration: {source}")]
    Plan {
        vm: String,
        #[source]
        source: PlanError,
    },
}

impl AgentError {
    /// The OCF exit code that tells Pacemaker how far the failure reaches.
    pub fn status(&self) -> OcfStatus {
        match self {
            AgentError::Params(_)
            | AgentError::ConfigInvalid { .. }
            | AgentError::NameMismatch { .. }
            | AgentError::Plan { .. } => OcfStatus::ErrConfigured,
            AgentError::ConfigUnreadable { .. }
            | AgentError::NoIdentity(_)
            | AgentError::UnknownDomain { .. }
            | AgentError::ConflictingDefinition { .. } => OcfStatus::ErrInstalled,
            AgentError::NoMigrateTarget => OcfStatus::ErrArgs,
            AgentError::Connect { source, .. } => connect_status(source),
            AgentError::Libvirt { .. } | AgentError::Failed { .. } => OcfStatus::ErrGeneric,
        }
    }

    /// A libvirt failure of `call` about `vm`.
    pub fn libvirt(vm: &str, call: &'static str, source: virt::error::Error) -> AgentError {
        AgentError::Libvirt {
            vm: vm.to_owned(),
            call,
            source,
        }
    }

    /// A failure about `vm` that is not a single libvirt call.
    pub fn failed(vm: &str, what: impl Into<String>) -> AgentError {
        AgentError::Failed {
            vm: vm.to_owned(),
            what: what.into(),
        }
    }

    /// A failure of one of the calls wrapped in `libvirt-ext`.
    pub fn ext(vm: &str, err: libvirt_ext::Error) -> AgentError {
        match err {
            libvirt_ext::Error::Libvirt { call, source } => AgentError::libvirt(vm, call, source),
            other => AgentError::failed(vm, other.to_string()),
        }
    }
}

/// A connection failure: a missing driver is this node's problem (5), refused credentials are a
/// permission problem (4), anything else (daemon down or hung) is soft (1).
fn connect_status(err: &virt::error::Error) -> OcfStatus {
    match err.code().to_raw() {
        sys::VIR_ERR_NO_CONNECT => OcfStatus::ErrInstalled,
        sys::VIR_ERR_AUTH_FAILED
        | sys::VIR_ERR_AUTH_UNAVAILABLE
        | sys::VIR_ERR_AUTH_CANCELLED
        | sys::VIR_ERR_ACCESS_DENIED
        | sys::VIR_ERR_OPERATION_DENIED => OcfStatus::ErrPerm,
        _ => OcfStatus::ErrGeneric,
    }
}

/// Whether a libvirt error says the domain does not exist (any more).
pub fn is_no_domain(err: &virt::error::Error) -> bool {
    err.code().to_raw() == sys::VIR_ERR_NO_DOMAIN
}

#[cfg(test)]
mod tests {
    use super::*;

    fn libvirt_error(uri: &str) -> virt::error::Error {
        virt::error::clear_error_callback();
        virt::connect::Connect::open(Some(uri)).expect_err("must fail")
    }

    #[test]
    fn exit_codes_reflect_how_far_the_failure_reaches() {
        let table = [
            (AgentError::Params(ParamError::NoIdentity), OcfStatus::ErrConfigured),
            (
                AgentError::ConfigUnreadable {
                    path: "/x".into(),
                    source: io::Error::from(io::ErrorKind::NotFound),
                },
                OcfStatus::ErrInstalled,
            ),
            (
                AgentError::ConfigInvalid {
                    path: "/x".into(),
                    source: ConfigError::NoName,
                },
                OcfStatus::ErrConfigured,
            ),
            (AgentError::NoMigrateTarget, OcfStatus::ErrArgs),
            (AgentError::failed("a", "b"), OcfStatus::ErrGeneric),
            (
                AgentError::UnknownDomain {
                    vm: "a".into(),
                    uri: "test:///default".into(),
                },
                OcfStatus::ErrInstalled,
            ),
        ];
        for (err, status) in table {
            assert_eq!(err.status(), status, "{err}");
        }
    }

    #[test]
    fn an_unreachable_daemon_is_a_soft_failure() {
        let uri = "qemu+unix:///system?socket=/nonexistent/vmha-test.sock";
        let err = AgentError::Connect {
            uri: uri.into(),
            call: "virConnectOpen",
            source: libvirt_error(uri),
        };
        assert_eq!(err.status(), OcfStatus::ErrGeneric, "{err}");
        assert!(err
            .to_string()
            .starts_with(&format!("cannot connect to {uri} (virConnectOpen): ")));
    }

    #[test]
    fn messages_name_the_vm_and_the_call() {
        let err = AgentError::libvirt("web1", "virDomainCreateXML", libvirt_error("bad:///"));
        let text = err.to_string();
        assert!(text.starts_with("VM web1: virDomainCreateXML failed: "), "{text}");
        assert!(!text.contains("code="), "libvirt's debug suffix stays out: {text}");
    }
}
