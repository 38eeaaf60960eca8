//! vmhad's command line. It lives in the library so that `vmha generate man` can write vmhad's manual page
//! from the same definition the daemon parses.

use clap::Parser;

/// vmhad's command-line options (also settable through `/etc/default/vmhad` in the packaged unit).
#[derive(Parser, Debug)]
#[command(
    name = "vmhad",
    version,
    about = "vmha's per-host D-Bus service",
    long_about = "vmha's per-host D-Bus service. Owns org.vmha.Vmha1 on the system bus and publishes the \
                  cluster (members, quorum, DC, hosts, VMs) as objects under /org/vmha/Vmha1; follows every \
                  change of the CIB and of the Corosync membership; runs VM and host operations as jobs; \
                  reports VMs whose QEMU dies to Pacemaker at once. Normally started by systemd (vmhad.service) \
                  or by D-Bus activation. Log level: RUST_LOG (default info). Logs go to the journal with the fields \
                  VMHA_HOST, VMHA_VM, VMHA_JOB and VMHA_JOB_KIND (journalctl VMHA_VM=vm1), syslog when the journal \
                  does not answer, or stderr (see --log)."
)]
pub struct VmhadArgs {
    /// This host's name in the cluster (default: the system host name).
    #[arg(long)]
    pub host: Option<String>,
    /// libvirt URI of this host's hypervisor.
    #[arg(long, default_value = "qemu:///system")]
    pub hypervisor: String,
    /// libvirt URI of another host's hypervisor (`{host}` is replaced by its name), for live clones.
    #[arg(long, default_value = "qemu+tcp://{host}/system")]
    pub peer_uri: String,
    /// Where to log: auto is the journal when systemd connected stderr to it or stderr goes nowhere, and
    /// stderr when it is a terminal, a file or a pipe; journal falls back to syslog.
    #[arg(long, value_enum, default_value_t = crate::logging::LogTarget::Auto)]
    pub log: crate::logging::LogTarget,
    /// Where the post-mortem of a hung guest (its console tail, a screenshot, the reason) is kept before
    /// vmhad resets it: one directory per hang under <DIR>/<vm>/, the newest five per VM.
    #[arg(long, value_name = "DIR", default_value = crate::postmortem::DEFAULT_DIR)]
    pub postmortem_dir: std::path::PathBuf,
    /// Where virtual-cluster archives captured and instantiated by name (CaptureVclusterToStore,
    /// InstantiateVclusterFromStore: the web console's way, which can pass no file) are kept: made mode
    /// 0700 when missing, one <name>.vmha per archive.
    #[arg(long, value_name = "DIR", default_value = crate::archive_store::DEFAULT_DIR)]
    pub archive_dir: std::path::PathBuf,
    /// How long before a time bound's window starts (by this host's local clock, when it is the DC) the
    /// members the bound will stop are asked to drain, in seconds (0: they are not asked).
    #[arg(long, value_name = "SECS", default_value_t = 60)]
    pub time_bound_drain_lead: u32,
    /// How long those members' guests have to answer, in ms (at most until the window starts).
    #[arg(long, value_name = "MS", default_value_t = 30_000)]
    pub time_bound_drain_timeout_ms: u32,
}

/// This machine's host name (of its UTS namespace), Pacemaker's node name for it by default.
pub fn system_hostname() -> anyhow::Result<String> {
    use anyhow::Context;
    let name = nix::unistd::gethostname().context("reading the host name")?;
    name.into_string()
        .map_err(|n| anyhow::anyhow!("the host name {n:?} is not UTF-8"))
}
