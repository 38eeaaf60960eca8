//! Safe wrappers for the libvirt C calls that `virt` 0.5 lacks or wraps lossily.
//!
//! This crate is the only place in vmha's libvirt code that holds `unsafe`; every block states why
//! it is sound. Errors carry the name of the libvirt call and libvirt's own error.
#![allow(unsafe_code)]

pub mod events;

use std::ffi::{c_int, CString, NulError};
use std::ptr;
use std::time::Duration;

use virt::domain::Domain;
use virt_sys as sys;

/// A failed libvirt call: which call, and libvirt's error (code, domain, message).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// libvirt returned failure; `source` is the thread's last libvirt error.
    #[error("{call}: {source}")]
    Libvirt {
        call: &'static str,
        #[source]
        source: virt::error::Error,
    },
    /// An argument could not be passed to C (it contains a NUL byte).
    #[error("{call}: argument contains a NUL byte")]
    Nul {
        call: &'static str,
        #[source]
        source: NulError,
    },
    /// A step did not finish in time (libvirtd hung?); the work goes on in the background.
    #[error("{what}: no answer within {after:?} (is libvirtd hung?)")]
    Timeout { what: &'static str, after: Duration },
    /// A helper thread could not be started.
    #[error("{what}: {source}")]
    Thread {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// A step failed without a libvirt error.
    #[error("{what}")]
    Failed { what: &'static str },
    /// The process's glib loop thread, which runs libvirt's event loop, is not there.
    #[error("libvirt's event loop: {0}")]
    EventLoop(#[from] vmha_glib_loop::Error),
}

impl Error {
    /// libvirt's error, when the failure came from libvirt.
    pub fn libvirt_error(&self) -> Option<&virt::error::Error> {
        match self {
            Error::Libvirt { source, .. } => Some(source),
            Error::Nul { .. }
            | Error::Timeout { .. }
            | Error::Thread { .. }
            | Error::Failed { .. }
            | Error::EventLoop(_) => None,
        }
    }
}

/// The raw `virDomainState` and reason codes of a domain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawState {
    /// A `virDomainState` value (`VIR_DOMAIN_RUNNING`, ...).
    pub state: u32,
    /// The reason code whose meaning depends on `state` (`virDomainPausedReason`, ...).
    pub reason: i32,
}

fn last_error(call: &'static str) -> Error {
    Error::Libvirt {
        call,
        source: virt::error::Error::last_error(),
    }
}

/// `virDomainGetState`, reporting failure (virt 0.5's `Domain::state` ignores the return code and
/// turns a failed call into an "unknown" state).
pub fn domain_state(domain: &Domain) -> Result<RawState, Error> {
    let mut state: c_int = -1;
    let mut reason: c_int = -1;
    // SAFETY: `domain.as_ptr()` is a live virDomainPtr owned by `domain`, which outlives the call;
    // `state` and `reason` are valid, writable c_ints on this stack frame; flags must be 0.
    let rc = unsafe { sys::virDomainGetState(domain.as_ptr(), &mut state, &mut reason, 0) };
    if rc < 0 {
        return Err(last_error("virDomainGetState"));
    }
    Ok(RawState {
        state: u32::try_from(state).unwrap_or(u32::MAX),
        reason,
    })
}

/// `virDomainSaveFlags`: save the memory state of a running domain to `path` and stop it.
/// `flags` is a bit set of `virDomainSaveRestoreFlags`.
pub fn save_domain(domain: &Domain, path: &str, flags: u32) -> Result<(), Error> {
    let call = "virDomainSaveFlags";
    let to = CString::new(path).map_err(|source| Error::Nul { call, source })?;
    // SAFETY: `domain.as_ptr()` is a live virDomainPtr owned by `domain`; `to` is a NUL-terminated
    // string that lives until the call returns; a null `dxml` means "keep the domain's XML", which
    // the API documents as allowed. libvirt copies what it needs and keeps no pointer.
    let rc = unsafe { sys::virDomainSaveFlags(domain.as_ptr(), to.as_ptr(), ptr::null(), flags) };
    if rc < 0 {
        return Err(last_error(call));
    }
    Ok(())
}

/// `virDomainRestoreFlags`: start a domain from the save image at `path` (its XML is the one in the
/// image). `flags` is a bit set of `virDomainSaveRestoreFlags` (e.g. `VIR_DOMAIN_SAVE_RUNNING`).
pub fn restore_domain(conn: &virt::connect::Connect, path: &str, flags: u32) -> Result<(), Error> {
    let call = "virDomainRestoreFlags";
    let from = CString::new(path).map_err(|source| Error::Nul { call, source })?;
    // SAFETY: `conn.as_ptr()` is a live virConnectPtr owned by `conn`, which outlives the call; `from` is
    // a NUL-terminated string alive until the call returns; a null `dxml` means "use the image's XML",
    // as the API documents. libvirt keeps no pointer to either.
    let rc = unsafe { sys::virDomainRestoreFlags(conn.as_ptr(), from.as_ptr(), ptr::null(), flags) };
    if rc < 0 {
        return Err(last_error(call));
    }
    Ok(())
}

/// The storage pool whose target is the directory `dir`: an existing one (`virStoragePoolLookupByTargetPath`)
/// or a new transient `dir` pool named `name` (`virStoragePoolCreateXML`), which disappears when libvirtd
/// restarts. Volumes in it are created with [`virt::storage_vol::StorageVol::create_xml`].
pub fn dir_pool(
    conn: &virt::connect::Connect,
    dir: &str,
    name: &str,
) -> Result<virt::storage_pool::StoragePool, Error> {
    pool_of_dir(conn, dir, name, None)
}

/// As [`dir_pool`], but a new pool's directory is made when missing (`VIR_STORAGE_POOL_CREATE_WITH_BUILD`),
/// with permissions `mode` (e.g. 0o700) and owned by libvirtd's user.
pub fn dir_pool_built(
    conn: &virt::connect::Connect,
    dir: &str,
    name: &str,
    mode: u32,
) -> Result<virt::storage_pool::StoragePool, Error> {
    pool_of_dir(conn, dir, name, Some(mode))
}

fn pool_of_dir(
    conn: &virt::connect::Connect,
    dir: &str,
    name: &str,
    build_mode: Option<u32>,
) -> Result<virt::storage_pool::StoragePool, Error> {
    let call = "virStoragePoolLookupByTargetPath";
    let path = CString::new(dir).map_err(|source| Error::Nul { call, source })?;
    // SAFETY: `conn.as_ptr()` is a live virConnectPtr owned by `conn`; `path` is a NUL-terminated string
    // alive for the call. A non-null result is a new reference that StoragePool takes over and frees.
    let found = unsafe { sys::virStoragePoolLookupByTargetPath(conn.as_ptr(), path.as_ptr()) };
    if !found.is_null() {
        // SAFETY: `found` is a valid, owned virStoragePoolPtr (checked non-null above).
        return Ok(unsafe { virt::storage_pool::StoragePool::from_ptr(found) });
    }
    let call = "virStoragePoolCreateXML";
    let escape = |v: &str| v.replace('&', "&amp;").replace('<', "&lt;").replace('\'', "&apos;");
    let permissions = build_mode.map_or(String::new(), |m| {
        format!("<permissions><mode>{m:04o}</mode></permissions>")
    });
    let xml = format!(
        "<pool type='dir'><name>{}</name><target><path>{}</path>{permissions}</target></pool>",
        escape(name),
        escape(dir)
    );
    let xml = CString::new(xml).map_err(|source| Error::Nul { call, source })?;
    let flags = if build_mode.is_some() {
        sys::VIR_STORAGE_POOL_CREATE_WITH_BUILD
    } else {
        0
    };
    // SAFETY: as above; `xml` is a NUL-terminated pool definition alive for the call; `flags` is 0 or
    // VIR_STORAGE_POOL_CREATE_WITH_BUILD.
    let created = unsafe { sys::virStoragePoolCreateXML(conn.as_ptr(), xml.as_ptr(), flags) };
    if created.is_null() {
        return Err(last_error(call));
    }
    // SAFETY: `created` is a valid, owned virStoragePoolPtr (checked non-null above).
    Ok(unsafe { virt::storage_pool::StoragePool::from_ptr(created) })
}

/// `virDomainBlockRebase` without flags: starts a block pull into `disk`'s active layer of everything
/// above `base` in its backing chain (`None`: the whole chain); when the job ends, `base` is the active
/// layer's backing file. Poll [`block_job_active`] for the end.
pub fn block_pull(domain: &Domain, disk: &str, base: Option<&str>) -> Result<(), Error> {
    let call = "virDomainBlockRebase";
    let disk = CString::new(disk).map_err(|source| Error::Nul { call, source })?;
    let base = base
        .map(|b| CString::new(b).map_err(|source| Error::Nul { call, source }))
        .transpose()?;
    // SAFETY: `domain.as_ptr()` is a live virDomainPtr owned by `domain`; `disk` and `base` (or null, which
    // the API documents as "the whole chain") are NUL-terminated strings alive for the call; bandwidth 0
    // means unlimited; flags 0. libvirt keeps no pointer.
    let rc = unsafe {
        sys::virDomainBlockRebase(
            domain.as_ptr(),
            disk.as_ptr(),
            base.as_ref().map_or(ptr::null(), |b| b.as_ptr()),
            0,
            0,
        )
    };
    if rc < 0 {
        return Err(last_error(call));
    }
    Ok(())
}

/// `virDomainGetBlockJobInfo`: whether a block job runs on `disk`.
pub fn block_job_active(domain: &Domain, disk: &str) -> Result<bool, Error> {
    let call = "virDomainGetBlockJobInfo";
    let disk = CString::new(disk).map_err(|source| Error::Nul { call, source })?;
    let mut info = sys::virDomainBlockJobInfo {
        type_: 0,
        bandwidth: 0,
        cur: 0,
        end: 0,
    };
    // SAFETY: `domain.as_ptr()` is a live virDomainPtr owned by `domain`; `disk` is NUL-terminated and alive
    // for the call; `info` is a valid, writable struct on this frame; flags 0.
    let rc = unsafe { sys::virDomainGetBlockJobInfo(domain.as_ptr(), disk.as_ptr(), &mut info, 0) };
    if rc < 0 {
        return Err(last_error(call));
    }
    Ok(rc == 1)
}

/// `virDomainBackupBegin` without a checkpoint: starts the backup job `backup_xml` describes (push mode:
/// QEMU copies each disk, as it was when the job began, into the target file while the guest runs).
/// Watch it with `Domain::job_stats`; [`abort_job`] cancels it.
pub fn backup_begin(domain: &Domain, backup_xml: &str) -> Result<(), Error> {
    let call = "virDomainBackupBegin";
    let xml = CString::new(backup_xml).map_err(|source| Error::Nul { call, source })?;
    // SAFETY: `domain.as_ptr()` is a live virDomainPtr owned by `domain`; `xml` is NUL-terminated and alive
    // for the call; a null checkpoint XML means "no checkpoint"; flags 0. libvirt keeps no pointer.
    let rc = unsafe { sys::virDomainBackupBegin(domain.as_ptr(), xml.as_ptr(), ptr::null(), 0) };
    if rc < 0 {
        return Err(last_error(call));
    }
    Ok(())
}

/// `virDomainMigrateGetMaxDowntime`: the longest the domain's vCPUs may be stopped for the last pass of
/// a live migration or live memory capture (ms): QEMU stops them once it expects the rest of the
/// memory to go out within it. (virt 0.5 has only the setter, `Domain::migrate_set_max_downtime`.)
pub fn max_downtime(domain: &Domain) -> Result<u64, Error> {
    let mut downtime: std::ffi::c_ulonglong = 0;
    // SAFETY: `domain.as_ptr()` is a live virDomainPtr owned by `domain`, which outlives the call;
    // `downtime` is a valid, writable c_ulonglong on this stack frame; flags must be 0.
    let rc = unsafe { sys::virDomainMigrateGetMaxDowntime(domain.as_ptr(), &mut downtime, 0) };
    if rc < 0 {
        return Err(last_error("virDomainMigrateGetMaxDowntime"));
    }
    Ok(downtime)
}

/// `virDomainAbortJob`: abort the domain's current background job (for example a live migration
/// started by another thread or connection). Fails when no job is running.
pub fn abort_job(domain: &Domain) -> Result<(), Error> {
    // SAFETY: `domain.as_ptr()` is a live virDomainPtr owned by `domain`, which outlives the call.
    // libvirt allows this call concurrently with a running job on the same domain.
    let rc = unsafe { sys::virDomainAbortJob(domain.as_ptr()) };
    if rc < 0 {
        return Err(last_error("virDomainAbortJob"));
    }
    Ok(())
}

/// The host's memory as `virNodeGetMemoryStats` reports it over all cells, in KiB: (total, free, buffers,
/// cached); a field the host does not report reads 0.
pub fn node_memory_kib(conn: &virt::connect::Connect) -> Result<(u64, u64, u64, u64), Error> {
    let call = "virNodeGetMemoryStats";
    let mut n: c_int = 0;
    // SAFETY: `conn.as_ptr()` is a live virConnectPtr owned by `conn`; a null `params` with `nparams`
    // pointing at 0 asks only for the number of fields, which libvirt writes into `n`.
    let rc = unsafe {
        sys::virNodeGetMemoryStats(
            conn.as_ptr(),
            sys::VIR_NODE_MEMORY_STATS_ALL_CELLS,
            ptr::null_mut(),
            &mut n,
            0,
        )
    };
    if rc < 0 {
        return Err(last_error(call));
    }
    let Ok(len) = usize::try_from(n) else {
        return Ok((0, 0, 0, 0));
    };
    if len == 0 {
        return Ok((0, 0, 0, 0));
    }
    let mut params = vec![
        sys::_virNodeMemoryStats {
            field: [0; 80],
            value: 0,
        };
        len
    ];
    // SAFETY: `params` holds `n` zeroed virNodeMemoryStats records, which libvirt fills (at most `n`, the
    // number it gave above; it writes how many it filled back into `n`); all are alive for the call.
    let rc = unsafe {
        sys::virNodeGetMemoryStats(
            conn.as_ptr(),
            sys::VIR_NODE_MEMORY_STATS_ALL_CELLS,
            params.as_mut_ptr(),
            &mut n,
            0,
        )
    };
    if rc < 0 {
        return Err(last_error(call));
    }
    let filled = usize::try_from(n).unwrap_or(0).min(len);
    let mut out = (0, 0, 0, 0);
    for p in &params[..filled] {
        // The field name is a NUL-terminated string within its 80 bytes (libvirt's VIR_NODE_MEMORY_FIELD_LENGTH).
        let bytes: Vec<u8> = p.field.iter().take_while(|&&c| c != 0).map(|&c| c as u8).collect();
        match bytes.as_slice() {
            b"total" => out.0 = p.value,
            b"free" => out.1 = p.value,
            b"buffers" => out.2 = p.value,
            b"cached" => out.3 = p.value,
            _ => {}
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use virt::connect::Connect;

    fn test_domain() -> (Connect, Domain) {
        virt::error::clear_error_callback();
        let conn = Connect::open(Some("test:///default")).expect("open test driver");
        let dom = conn.lookup_domain_by_name("test").expect("test domain");
        (conn, dom)
    }

    #[test]
    fn max_downtime_fails_cleanly_where_the_driver_lacks_it() {
        // The test driver has no migration: the call reports libvirt's error and names itself.
        let (_conn, dom) = test_domain();
        match max_downtime(&dom) {
            Ok(ms) => assert!(ms > 0, "a downtime limit of 0 ms is no limit QEMU uses"),
            Err(e) => {
                assert!(e.to_string().starts_with("virDomainMigrateGetMaxDowntime: "), "{e}");
                assert!(e.libvirt_error().is_some());
            }
        }
    }

    #[test]
    fn state_of_running_test_domain() {
        let (_conn, dom) = test_domain();
        let st = domain_state(&dom).expect("state");
        assert_eq!(st.state, sys::VIR_DOMAIN_RUNNING);
    }

    #[test]
    fn abort_without_job_reports_the_call() {
        let (_conn, dom) = test_domain();
        let err = abort_job(&dom).expect_err("no job to abort");
        assert!(err.to_string().starts_with("virDomainAbortJob: "), "{err}");
        assert!(err.libvirt_error().is_some());
    }

    #[test]
    fn save_path_with_nul_is_rejected_before_libvirt() {
        let (_conn, dom) = test_domain();
        let err = save_domain(&dom, "/tmp/a\0b", 0).expect_err("NUL in path");
        assert!(matches!(err, Error::Nul { .. }), "{err}");
    }
}
