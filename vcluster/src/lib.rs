//! vmha virtual clusters: a named set of cluster resources (a Pacemaker tag) captured with its
//! constraints, domain definitions and optionally disk images into one archive ([`archive`]), read from a
//! CIB ([`capture`]) and translated for another cluster ([`translate`]). Pure logic and archive streams;
//! the CLI (`vmha vcluster`) does the CIB, libvirt and file work.

pub mod archive;
pub mod capture;
pub mod domain_check;
pub mod signature;
pub mod translate;

use std::collections::BTreeMap;

pub use archive::{ArchiveError, ArchiveWriter, ChunkList, DiskStats, Manifest, Verified};
pub use capture::Captured;
pub use translate::{Maps, Plan, Target};

/// Errors of capture, verification and planning.
#[derive(Debug, thiserror::Error)]
pub enum VclusterError {
    #[error("XML: {0}")]
    Xml(#[from] roxmltree::Error),
    #[error("CIB: {0}")]
    Cib(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Usage(String),
    #[error("archive content: {0}")]
    Archive(String),
    #[error("the plan cannot be carried out: {}", .0.join("; "))]
    Plan(Vec<String>),
    #[error(transparent)]
    Format(#[from] ArchiveError),
}

pub use vmha_model::printable;

/// The archive name of a VM's domain definition.
pub fn domain_file(vm: &str) -> String {
    format!("domains/{vm}.xml")
}

/// The manifest of a capture. `disks` lists each disk to capture as (VM resource id, source path, size),
/// numbered in that order; `files` is filled in by [`ArchiveWriter::new`].
pub fn manifest_for(
    c: &Captured,
    placement: BTreeMap<String, String>,
    created: String,
    consistency: &str,
    disks: &[(String, String, u64)],
) -> Manifest {
    Manifest {
        format_version: archive::FORMAT_VERSION,
        vmha_version: env!("CARGO_PKG_VERSION").to_string(),
        name: c.name.clone(),
        source_cluster: c.cluster_name.clone(),
        hosts: c.hosts.clone(),
        created,
        consistency: consistency.to_string(),
        members: c.members.clone(),
        vms: c
            .vms
            .iter()
            .map(|v| archive::VmEntry {
                resource: v.resource.clone(),
                domain_file: domain_file(&v.resource),
            })
            .collect(),
        placement,
        disks: disks
            .iter()
            .enumerate()
            .map(|(id, (vm, path, size))| archive::DiskEntry {
                id: id as u32,
                vm: vm.clone(),
                path: path.clone(),
                size: *size,
            })
            .collect(),
        files: BTreeMap::new(),
    }
}

/// The metadata entries of a capture: resources, constraints, tag and each VM's domain XML (`domains`
/// maps VM resource ids to their XML; every VM needs one).
pub fn metadata_entries(
    c: &Captured,
    domains: &BTreeMap<String, String>,
) -> Result<BTreeMap<String, Vec<u8>>, VclusterError> {
    let mut m = BTreeMap::new();
    m.insert(archive::RESOURCES.to_string(), c.resources_xml.clone().into_bytes());
    m.insert(archive::CONSTRAINTS.to_string(), c.constraints_xml.clone().into_bytes());
    m.insert(archive::TAG.to_string(), c.tag_xml.clone().into_bytes());
    for vm in &c.vms {
        let xml = domains
            .get(&vm.resource)
            .ok_or_else(|| VclusterError::NotFound(format!("no domain definition for VM {}", vm.resource)))?;
        roxmltree::Document::parse(xml)
            .map_err(|e| VclusterError::Archive(format!("domain definition of {}: {e}", vm.resource)))?;
        m.insert(domain_file(&vm.resource), xml.clone().into_bytes());
    }
    Ok(m)
}
