//! `ocf:vmha:VirtualMachine`: the OCF resource agent that runs one libvirt domain under Pacemaker.
//!
//! Pure logic (OCF protocol, parameters, meta-data, state mapping, migration URIs, deadlines) lives
//! in modules without I/O; [`hypervisor`] is the only module that talks to libvirt and [`agent`]
//! combines both into the OCF actions.

pub mod agent;
pub mod deadline;
pub mod domain_config;
pub mod domain_state;
pub mod error;
pub mod guest_notice;
pub mod hypervisor;
pub mod logging;
pub mod manpage;
pub mod metadata;
pub mod migration;
pub mod name_cache;
pub mod ocf;
pub mod params;
pub mod qemu_process;
