//! A running lab: bring it up, act on its hosts, observe the cluster, tear it down by PID.

use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use nix::sys::signal::Signal;

use crate::cluster::ClusterStatus;
use crate::config::LabConfig;
use crate::guest::{self, GuestSpec};
use crate::power;
use crate::process::{self, run_ok, run_with_deadline, ProcId};
use crate::wait::wait_for;

/// Every lab host's first CIB: empty, but for a 2 s dc-deadtime (see `Lab::prepare_host`).
const FIRST_CIB: &str = r#"<cib validate-with="pacemaker-3.9" epoch="1" num_updates="0" admin_epoch="0">
  <configuration>
    <crm_config>
      <cluster_property_set id="cib-bootstrap-options">
        <nvpair id="cib-bootstrap-options-dc-deadtime" name="dc-deadtime" value="2s"/>
      </cluster_property_set>
    </crm_config>
    <nodes/>
    <resources/>
    <constraints/>
  </configuration>
  <status/>
</cib>
"#;

/// The host's PID 1 script, written into the lab directory at bring-up.
const HOST_INIT: &str = include_str!("../scripts/host-init");
/// The lab's stand-in for systemd supervising vmhad (host-init starts it in every host).
const VMHAD_SUPERVISOR: &str = include_str!("../scripts/vmhad-supervisor");
/// Where vmha's package installs its ordering of a host shutdown (packaging/systemd/pacemaker.service.d).
pub const SHUTDOWN_ORDER_DROP_IN: &str = "/usr/lib/systemd/system/pacemaker.service.d/50-vmha-shutdown-order.conf";
/// The shipped unit: the supervisor reads its Restart= and RestartSec=.
const VMHAD_UNIT: &str = include_str!("../../../packaging/systemd/vmhad.service");

/// Which resource agent runs a lab VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmAgent {
    /// Pacemaker's `ocf:heartbeat:VirtualDomain` (the agent vmha replaces; kept for comparisons).
    VirtualDomain,
    /// vmha's `ocf:vmha:VirtualMachine`, installed into the hosts with [`Lab::install_build`].
    Vmha,
}

/// A lab on this machine. A lab brought up by [`Lab::up`] is owned: dropping it (also when a test panics)
/// collects the daemons' logs if the thread is panicking and tears everything down by PID.
#[derive(Debug)]
pub struct Lab {
    pub cfg: LabConfig,
    owned: bool,
}

impl Drop for Lab {
    fn drop(&mut self) {
        if !self.owned {
            return;
        }
        if std::thread::panicking() {
            match self.collect_logs(&default_log_dir(&self.cfg.name)) {
                Ok(dir) => {
                    eprintln!("lab {}: daemon logs collected in {}", self.cfg.name, dir.display());
                    eprintln!("{}", self.log_tails(25));
                }
                Err(e) => eprintln!("lab {}: collecting logs failed: {e:#}", self.cfg.name),
            }
            if let Some(failure) = crate::last_panic() {
                eprintln!("lab {}: the scenario failed at {failure}", self.cfg.name);
            }
        }
        if let Err(e) = self.down() {
            eprintln!("lab {}: tear-down failed: {e:#}", self.cfg.name);
        }
    }
}

/// Where logs go when a test fails: `lab-logs/<lab>-<time>` at the workspace root.
pub fn default_log_dir(name: &str) -> PathBuf {
    let stamp = power::now() as u64;
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../lab-logs")
        .join(format!("{name}-{stamp}"))
}

/// Finds the `vmha-lab` binary: `$VMHA_LAB_BIN`, this executable, or a sibling in the cargo target directory.
pub fn lab_binary() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("VMHA_LAB_BIN") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe()?;
    if exe.file_name().is_some_and(|n| n == "vmha-lab") {
        return Ok(exe);
    }
    target_binary("vmha-lab")
}

/// A binary of this workspace next to the running executable (target/<profile>/NAME, also from
/// target/<profile>/deps where test binaries live).
pub fn target_binary(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let mut dir = exe.parent();
    while let Some(d) = dir {
        let candidate = d.join(name);
        if candidate.is_file() {
            return Ok(candidate);
        }
        if d.file_name().is_some_and(|n| n == "target") {
            break;
        }
        dir = d.parent();
    }
    bail!(
        "binary {name} not found next to {}: build the workspace first (cargo build --workspace)",
        exe.display()
    )
}

fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

impl Lab {
    /// A handle on an existing lab (nothing is started or stopped when it is dropped).
    pub fn attach(cfg: LabConfig) -> Result<Lab> {
        cfg.validate()?;
        Ok(Lab { cfg, owned: false })
    }

    /// A handle on the lab brought up earlier under `name`.
    pub fn attach_named(name: &str) -> Result<Lab> {
        Lab::attach(LabConfig::load(name)?)
    }

    /// Stops owning the lab: it keeps running after this handle is dropped.
    pub fn release(mut self) {
        self.owned = false;
    }

    /// Brings a fresh lab up from nothing (tearing down any earlier lab of the same name first): network,
    /// hosts with Corosync, Pacemaker, D-Bus, virtlogd and libvirtd, the power controller, and a fence
    /// device with fencing enabled. Returns once every host is online, a DC is elected and fencing runs.
    pub fn up(cfg: LabConfig) -> Result<Lab> {
        cfg.validate()?;
        if !nix::unistd::geteuid().is_root() {
            bail!("the lab needs root (namespaces, mounts, network devices)");
        }
        Lab::attach(cfg.clone())?.down()?;
        let mut lab = Lab { cfg, owned: true };
        let t0 = Instant::now();
        if let Err(e) = lab.bring_up() {
            let dir = lab.collect_logs(&default_log_dir(&lab.cfg.name));
            eprintln!("{}", lab.log_tails(25));
            return Err(e.context(format!(
                "bringing up lab {} (logs: {})",
                lab.cfg.name,
                dir.map(|d| d.display().to_string()).unwrap_or_else(|e| e.to_string())
            )));
        }
        tracing::info!(lab = %lab.cfg.name, secs = t0.elapsed().as_secs_f64(), "lab up");
        lab.owned = true;
        Ok(lab)
    }

    /// Reuses a healthy running lab of the same configuration, or brings a fresh one up. Not owned.
    pub fn ensure_up(cfg: LabConfig) -> Result<Lab> {
        if let Ok(existing) = LabConfig::load(&cfg.name) {
            let lab = Lab::attach(existing.clone())?;
            // A lab brought up by an older vmha-lab has no vmhad supervisor in its hosts: brought up anew.
            let supervised = cfg.dir().join("bin/vmhad-supervisor").is_file();
            if existing == cfg && supervised && lab.is_running() && lab.status_from_any().is_ok_and(|s| s.dc.is_some())
            {
                tracing::info!(lab = %cfg.name, "lab already up");
                return Ok(lab);
            }
        }
        let lab = Lab::up(cfg)?;
        let cfg = lab.cfg.clone();
        lab.release();
        Lab::attach(cfg)
    }

    /// True when the power controller and every host are running.
    pub fn is_running(&self) -> bool {
        self.power_controller().is_some_and(|p| p.alive()) && self.cfg.host_numbers().all(|n| self.host_alive(n))
    }

    fn bring_up(&self) -> Result<()> {
        let cfg = &self.cfg;
        let dir = cfg.dir();
        if dir.exists() {
            fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
        }
        fs::create_dir_all(dir.join("bin"))?;
        fs::create_dir_all(cfg.shared_dir())?;
        fs::write(cfg.config_file(), serde_json::to_string_pretty(cfg)?)?;
        let bin = dir.join("bin/vmha-lab");
        fs::copy(lab_binary()?, &bin).context("copying the vmha-lab binary into the lab")?;
        write_executable(&dir.join("bin/host-init"), HOST_INIT)?;
        write_executable(&dir.join("bin/vmhad-supervisor"), VMHAD_SUPERVISOR)?;
        fs::write(dir.join("bin/vmhad.service"), VMHAD_UNIT)?;
        guest::build_image()?;
        self.create_network()?;
        for n in cfg.host_numbers() {
            self.prepare_host(n, &bin)?;
        }
        self.start_power_controller(&bin)?;
        for n in cfg.host_numbers() {
            self.start_host(n)?;
        }
        let formed = wait_for(
            "every host online and a DC elected",
            Duration::from_secs(180),
            Duration::from_secs(1),
            || {
                let s = self.status(1).ok()?;
                (s.dc.is_some() && s.online_nodes().len() == usize::from(cfg.hosts)).then_some(s)
            },
        )?;
        tracing::info!(dc = ?formed.dc, "cluster formed");
        self.configure_cluster()?;
        for n in cfg.host_numbers() {
            wait_for(
                &format!("libvirtd on {}", cfg.host_name(n)),
                Duration::from_secs(60),
                Duration::from_millis(250),
                || {
                    self.exec(n, &["virsh", "-c", "qemu:///system", "version"])
                        .ok()
                        .filter(|o| o.status.success())
                },
            )?;
        }
        Ok(())
    }

    fn create_network(&self) -> Result<()> {
        let cfg = &self.cfg;
        let sw = cfg.switch_netns();
        let ip = |args: &[&str]| run_ok("ip", args, Duration::from_secs(20));
        ip(&["netns", "add", &sw])?;
        ip(&["-n", &sw, "link", "set", "lo", "up"])?;
        ip(&[
            "-n",
            &sw,
            "link",
            "add",
            "br0",
            "type",
            "bridge",
            "stp_state",
            "0",
            "forward_delay",
            "0",
        ])?;
        ip(&["-n", &sw, "link", "set", "br0", "up"])?;
        for n in cfg.host_numbers() {
            let ns = cfg.host_netns(n);
            let port = cfg.switch_port(n);
            let tmp = format!("vmha-{}-v{n}", cfg.name);
            ip(&["netns", "add", &ns])?;
            ip(&[
                "link", "add", &tmp, "netns", &ns, "type", "veth", "peer", "name", &port, "netns", &sw,
            ])?;
            ip(&["-n", &ns, "link", "set", &tmp, "name", "eth0"])?;
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{}/24", cfg.host_address(n)),
                "dev",
                "eth0",
            ])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
            ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
            ip(&["-n", &sw, "link", "set", &port, "master", "br0"])?;
            ip(&["-n", &sw, "link", "set", &port, "up"])?;
        }
        Ok(())
    }

    /// Gives host N its own copies of the cluster and libvirt state and configuration.
    fn prepare_host(&self, n: u8, bin: &Path) -> Result<()> {
        let cfg = &self.cfg;
        let d = cfg.host_dir(n);
        fs::create_dir_all(&d)?;
        for (src, name) in [
            ("/etc/corosync", "etc-corosync"),
            ("/var/lib/pacemaker", "var-lib-pacemaker"),
            ("/var/log/pacemaker", "var-log-pacemaker"),
            ("/etc/libvirt", "etc-libvirt"),
            ("/var/lib/libvirt", "var-lib-libvirt"),
            ("/var/log/libvirt", "var-log-libvirt"),
            ("/var/cache/libvirt", "var-cache-libvirt"),
        ] {
            let dest = d.join(name);
            run_ok("cp", &["-a", src, path_str(&dest)?], Duration::from_secs(60))?;
        }
        for name in [
            "var-lib-corosync",
            "var-log-corosync",
            "var-log-vmha",
            "var-lib-vmha",
            "usr-upper/sbin",
            "usr-work",
            "etc-upper",
            "etc-work",
            "dpkg-upper",
            "dpkg-work",
            "systemd-upper",
            "systemd-work",
        ] {
            fs::create_dir_all(d.join(name))?;
        }
        // No libvirt default NAT network inside the lab.
        if let Ok(entries) = fs::read_dir(d.join("etc-libvirt/qemu/networks/autostart")) {
            for e in entries.flatten() {
                fs::remove_file(e.path())?;
            }
        }
        // The first CIB: Pacemaker's controller waits dc-deadtime (20 s by default) after it starts before it
        // holds the first DC election. The lab's hosts start together, so it waits 2 s.
        let cib = d.join("var-lib-pacemaker/cib/cib.xml");
        fs::write(&cib, FIRST_CIB)?;
        run_ok(
            "chown",
            &["hacluster:haclient", path_str(&cib)?],
            Duration::from_secs(10),
        )?;
        run_ok("chmod", &["0600", path_str(&cib)?], Duration::from_secs(10))?;
        fs::write(d.join("etc-corosync/corosync.conf"), cfg.corosync_conf())?;
        fs::write(d.join("hosts"), cfg.etc_hosts())?;
        fs::write(d.join("hostname"), format!("{}\n", cfg.host_name(n)))?;
        append(&d.join("etc-libvirt/libvirtd.conf"), &cfg.libvirtd_conf_extra(n))?;
        // No cgroups (they are not mounted inside the lab's namespaces and would clash between hosts) and
        // no per-VM mount namespaces (they cannot re-create the hidden /dev/kvm).
        append(
            &d.join("etc-libvirt/qemu.conf"),
            "\n# vmha lab\ncgroup_controllers = [ ]\nnamespaces = [ ]\n",
        )?;
        let agent = format!(
            "#!/bin/sh\n# vmha lab fence agent: asks the lab power controller to power this lab's hosts off/on.\nexec {} fence-agent --lab {} \"$@\"\n",
            sh_quote(path_str(bin)?),
            cfg.name
        );
        write_executable(&d.join("usr-upper/sbin/fence_vmha_lab"), &agent)?;
        Ok(())
    }

    fn start_power_controller(&self, bin: &Path) -> Result<()> {
        let log = fs::File::create(self.cfg.dir().join("power-controller.log"))?;
        let child = Command::new(bin)
            .args(["power-controller", "--lab", &self.cfg.name])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0)
            .spawn()
            .context("starting the lab power controller")?;
        let id = ProcId::of(child.id() as i32)?;
        reap_in_background(child);
        id.save(&self.cfg.dir().join("power.pid"))?;
        wait_for(
            "the power controller",
            Duration::from_secs(10),
            Duration::from_millis(50),
            || {
                power::request(&self.cfg, "ping", Duration::from_secs(2))
                    .ok()
                    .filter(|r| r == "pong")
            },
        )?;
        Ok(())
    }

    fn power_controller(&self) -> Option<ProcId> {
        ProcId::load(&self.cfg.dir().join("power.pid")).ok().flatten()
    }

    /// Starts host N (its namespaces and daemons); the host's PID 1 is recorded by PID and start time.
    fn start_host(&self, n: u8) -> Result<()> {
        let cfg = &self.cfg;
        let d = cfg.host_dir(n);
        let console = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(d.join("console.log"))?;
        let init = cfg.dir().join("bin/host-init");
        let child = Command::new("ip")
            .args(["netns", "exec", &cfg.host_netns(n)])
            .args([
                "unshare",
                "--mount",
                "--uts",
                "--ipc",
                "--pid",
                "--fork",
                "--mount-proc",
                "--propagation",
                "private",
            ])
            .arg(&init)
            .arg(&d)
            .arg(cfg.host_name(n))
            .stdin(Stdio::null())
            .stdout(console.try_clone()?)
            .stderr(console)
            .process_group(0)
            .spawn()
            .with_context(|| format!("starting host {}", cfg.host_name(n)))?;
        let outer = child.id() as i32;
        reap_in_background(child);
        let my_ns = process::pid_namespace(std::process::id() as i32);
        let init_str = path_str(&init)?.to_string();
        let pid = wait_for(
            &format!("PID 1 of {}", cfg.host_name(n)),
            Duration::from_secs(10),
            Duration::from_millis(20),
            || {
                // The host's PID 1 is the descendant of `unshare` that runs host-init in a new PID namespace.
                let mut frontier = vec![outer];
                for _ in 0..3 {
                    let mut next = Vec::new();
                    for p in frontier {
                        if process::cmdline(p).iter().any(|a| a == &init_str) && process::pid_namespace(p) != my_ns {
                            return Some(p);
                        }
                        next.extend(process::children(p));
                    }
                    frontier = next;
                }
                None
            },
        )?;
        let id = ProcId::of(pid)?;
        id.save(&d.join("pid"))?;
        if let Some(ns) = id.pid_namespace() {
            fs::write(d.join("pidns"), ns.to_string())?;
        }
        tracing::info!(host = %cfg.host_name(n), pid, "host started");
        Ok(())
    }

    fn host_init(&self, n: u8) -> Option<ProcId> {
        ProcId::load(&self.cfg.host_dir(n).join("pid")).ok().flatten()
    }

    /// True while host N is powered on.
    pub fn host_alive(&self, n: u8) -> bool {
        self.host_init(n).is_some_and(|p| p.alive())
    }

    /// Hard power-off of host N: SIGKILL to its PID 1, which makes the kernel kill every process of the host.
    /// Returns once none of them is left.
    pub fn power_off(&self, n: u8) -> Result<()> {
        self.kill_host(n, "powered-off-at")?;
        tracing::info!(host = %self.cfg.host_name(n), "powered off");
        Ok(())
    }

    /// SIGKILL to host N's PID 1 under its power switch; records the time in the host's file `stamp` and
    /// returns once every process of the host has ended.
    fn kill_host(&self, n: u8, stamp: &str) -> Result<()> {
        let _lock = self.power_lock(n)?;
        let Some(init) = self.host_init(n).filter(|p| p.alive()) else {
            return Ok(());
        };
        let ns = init.pid_namespace();
        init.signal(Signal::SIGKILL)?;
        fs::write(self.cfg.host_dir(n).join(stamp), format!("{}\n", power::now()))?;
        if let Some(ns) = ns {
            wait_for(
                &format!("every process of {} to end", self.cfg.host_name(n)),
                Duration::from_secs(30),
                Duration::from_millis(20),
                || process::pids_in_namespace(ns).is_empty().then_some(()),
            )?;
        }
        Ok(())
    }

    /// Graceful shutdown of host N, as systemd does it with vmha's shipped ordering (pacemaker.service
    /// `After=` libvirtd, libvirt-guests and the VMs' scopes; vmhad.service `Before=` pacemaker.service):
    /// Pacemaker is stopped first and the host's pacemakerd exits only once its resources are gone from it
    /// (live-migrated away when they allow it, stopped otherwise); then vmhad, libvirtd (and whatever QEMU is
    /// left), virtlogd, Corosync (the host leaves the membership cleanly) and the rest: the host powers off.
    /// `limit` bounds Pacemaker's stop. Returns once every process of the host has ended.
    pub fn shutdown_host(&self, n: u8, limit: Duration) -> Result<()> {
        let host = self.cfg.host_name(n);
        if !self.host_alive(n) {
            return Ok(());
        }
        // 1. Pacemaker: pacemakerd asks the DC to move the host's resources away and then stops its daemons.
        self.exec_ok(n, &["sh", "-c", "p=$(pidof pacemakerd) && kill -TERM $p"])
            .with_context(|| format!("stopping Pacemaker on {host}"))?;
        wait_for(
            &format!("Pacemaker on {host} to stop (its resources moved away)"),
            limit,
            Duration::from_millis(200),
            || {
                let out = self
                    .exec(n, &["sh", "-c", "pidof pacemakerd pacemaker-controld pacemaker-execd"])
                    .ok()?;
                String::from_utf8_lossy(&out.stdout).trim().is_empty().then_some(())
            },
        )?;
        tracing::info!(%host, "Pacemaker stopped");
        // 2. vmhad (the supervisor, as systemd, is told it is a stop, not a failure).
        self.stop_vmhad(n)?;
        // 3. libvirtd (QEMU processes still running here are left for the power-off), virtlogd, Corosync.
        self.exec_ok(
            n,
            &[
                "sh",
                "-c",
                "[ -f /run/libvirtd.pid ] && kill -TERM $(cat /run/libvirtd.pid) 2>/dev/null; \
                 for i in $(seq 1 100); do pidof libvirtd > /dev/null || break; sleep 0.1; done; \
                 p=$(pidof virtlogd) && kill -TERM $p; \
                 p=$(pidof corosync) && kill -TERM $p; \
                 for i in $(seq 1 100); do pidof corosync > /dev/null || break; sleep 0.1; done; true",
            ],
        )?;
        // 4. Power off.
        self.kill_host(n, "shut-down-at")?;
        tracing::info!(%host, "shut down");
        Ok(())
    }

    /// Powers host N on (a no-op when it runs). Its state directories are kept, as a real disk would be.
    pub fn power_on(&self, n: u8) -> Result<()> {
        let _lock = self.power_lock(n)?;
        if self.host_alive(n) {
            return Ok(());
        }
        self.start_host(n)
    }

    /// Host N's power switch: held across a power action, by the scenario's process and by the lab's power
    /// controller (fencing) alike, so that a fence reboot and a scenario's power-on never both start the
    /// host (two instances of one host, one of them unknown to the lab and left behind at tear-down).
    fn power_lock(&self, n: u8) -> Result<nix::fcntl::Flock<fs::File>> {
        // A lab never brought up (or removed) has no host directory yet: its switch is made here.
        fs::create_dir_all(self.cfg.host_dir(n))
            .with_context(|| format!("creating {}", self.cfg.host_dir(n).display()))?;
        let path = self.cfg.host_dir(n).join("power.lock");
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, e)| anyhow!("locking {}: {e}", path.display()))
    }

    /// Unplugs host N's network cable (its switch port goes down).
    pub fn cut_network(&self, n: u8) -> Result<()> {
        self.set_switch_port(n, "down")
    }

    /// Plugs host N's network cable back in.
    pub fn heal_network(&self, n: u8) -> Result<()> {
        self.set_switch_port(n, "up")
    }

    fn set_switch_port(&self, n: u8, state: &str) -> Result<()> {
        let (sw, port) = (self.cfg.switch_netns(), self.cfg.switch_port(n));
        run_ok("ip", &["-n", &sw, "link", "set", &port, state], Duration::from_secs(10))?;
        Ok(())
    }

    fn nsenter_args(&self, n: u8) -> Result<Vec<String>> {
        let init = self
            .host_init(n)
            .filter(|p| p.alive())
            .ok_or_else(|| anyhow!("{} is not running", self.cfg.host_name(n)))?;
        Ok([
            "nsenter",
            "-t",
            &init.pid.to_string(),
            "-m",
            "-u",
            "-i",
            "-n",
            "-p",
            "--",
            "env",
            "PCMK_logfacility=none",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect())
    }

    /// A command that runs `args` on host N (inside all its namespaces), for the caller to spawn and talk to
    /// (stdin and stdout are the caller's to set). The host's power-off kills it with the host.
    pub fn command(&self, n: u8, args: &[&str]) -> Result<Command> {
        let pre = self.nsenter_args(n)?;
        let mut cmd = Command::new(&pre[0]);
        cmd.args(&pre[1..]).args(args);
        Ok(cmd)
    }

    /// Runs a command on host N (inside all its namespaces), killed after 60 s.
    pub fn exec(&self, n: u8, args: &[&str]) -> Result<Output> {
        self.exec_with_deadline(n, args, Duration::from_secs(60))
    }

    pub fn exec_with_deadline(&self, n: u8, args: &[&str], limit: Duration) -> Result<Output> {
        let pre = self.nsenter_args(n)?;
        let mut all: Vec<&str> = pre.iter().skip(1).map(String::as_str).collect();
        all.extend_from_slice(args);
        run_with_deadline("nsenter", &all, limit)
    }

    /// Runs a command on host N and returns its stdout, failing unless it exits 0.
    pub fn exec_ok(&self, n: u8, args: &[&str]) -> Result<String> {
        let out = self.exec(n, args)?;
        if !out.status.success() {
            bail!(
                "on {}: {} failed ({}): {}{}",
                self.cfg.host_name(n),
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim(),
                String::from_utf8_lossy(&out.stdout).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs a command on host N with the caller's terminal (for the CLI); returns its exit code.
    pub fn exec_interactive(&self, n: u8, args: &[String]) -> Result<i32> {
        let pre = self.nsenter_args(n)?;
        let status = Command::new(&pre[0]).args(&pre[1..]).args(args).status()?;
        Ok(status.code().unwrap_or(1))
    }

    /// Pacemaker's view of the cluster from host N.
    pub fn status(&self, n: u8) -> Result<ClusterStatus> {
        let out = self.exec_with_deadline(
            n,
            &["crm_mon", "--one-shot", "--output-as=xml"],
            Duration::from_secs(15),
        )?;
        if !out.status.success() {
            bail!(
                "crm_mon on {}: {}",
                self.cfg.host_name(n),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        ClusterStatus::parse(&String::from_utf8_lossy(&out.stdout))
    }

    /// Pacemaker's view from the first host that answers.
    pub fn status_from_any(&self) -> Result<ClusterStatus> {
        let mut last = anyhow!("no host is running");
        for n in self.cfg.host_numbers().filter(|&n| self.host_alive(n)) {
            match self.status(n) {
                Ok(s) => return Ok(s),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// The lab hosts in Corosync's membership as host `n` sees it (`corosync-quorumtool -l`); empty when
    /// it cannot be asked.
    pub fn corosync_members(&self, n: u8) -> Vec<String> {
        let Ok(out) = self.exec_ok(n, &["corosync-quorumtool", "-l"]) else {
            return Vec::new();
        };
        out.lines()
            .filter_map(|l| l.split_whitespace().nth(2))
            .filter(|name| self.cfg.host_number(name).is_some())
            .map(str::to_string)
            .collect()
    }

    /// The first running host other than `not`.
    pub fn other_host(&self, not: u8) -> Option<u8> {
        self.cfg.host_numbers().find(|&n| n != not && self.host_alive(n))
    }

    /// Cluster-wide settings every VM cluster wants: fencing on with the lab's fence device, and resource
    /// stickiness (a recovered VM stays where it runs instead of bouncing back when its host returns).
    fn configure_cluster(&self) -> Result<()> {
        self.exec_ok(
            1,
            &[
                "crm_attribute",
                "--type",
                "rsc_defaults",
                "--name",
                "resource-stickiness",
                "--update",
                "100",
            ],
        )?;
        let hosts = format!("pcmk_host_list={}", self.cfg.host_list());
        self.exec_ok(
            1,
            &[
                "pcs",
                "stonith",
                "create",
                "fence-lab",
                "fence_vmha_lab",
                &hosts,
                "op",
                "monitor",
                "interval=60s",
            ],
        )?;
        self.exec_ok(
            1,
            &[
                "crm_attribute",
                "--type",
                "crm_config",
                "--name",
                "stonith-enabled",
                "--update",
                "true",
            ],
        )?;
        wait_for(
            "the fence device to start",
            Duration::from_secs(60),
            Duration::from_millis(500),
            || {
                let s = self.status(1).ok()?;
                s.resource("fence-lab")
                    .filter(|r| r.active && r.role == "Started")
                    .map(|_| ())
            },
        )
    }

    /// Copies `src` (a path on this machine) to `dest` inside host N with mode `mode`.
    pub fn install(&self, n: u8, src: &Path, dest: &str, mode: &str) -> Result<()> {
        self.exec_ok(n, &["install", "-D", "-m", mode, path_str(src)?, dest])?;
        Ok(())
    }

    /// Installs the workspace's build into every running host from `build_dir` (e.g. target/release): the
    /// OCF agent `ocf:vmha:VirtualMachine`, and when built, `vmhad`, the `vmha` CLI and vmhad's bus policy
    /// (the host's D-Bus daemon is told to reload it).
    pub fn install_build(&self, build_dir: &Path) -> Result<Vec<String>> {
        let agent = build_dir.join("vmha-ocf-virtualmachine");
        if !agent.is_file() {
            bail!("{} is missing: build the workspace first", agent.display());
        }
        let daemon = build_dir.join("vmhad");
        let cli = build_dir.join("vmha");
        let packaging = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../packaging");
        let policy = packaging.join("dbus/org.vmha.Vmha1.conf");
        let action = packaging.join("polkit/org.vmha.Vmha1.policy");
        let rule = packaging.join("polkit/60-vmha.rules");
        let shutdown_order = packaging.join("systemd/pacemaker.service.d/50-vmha-shutdown-order.conf");
        let mut installed = Vec::new();
        for n in self.cfg.host_numbers().filter(|&n| self.host_alive(n)) {
            self.install(n, &agent, "/usr/lib/ocf/resource.d/vmha/VirtualMachine", "0755")?;
            // The package's ordering of a host shutdown (Pacemaker stops before libvirt), for vmha check.
            self.install(n, &shutdown_order, SHUTDOWN_ORDER_DROP_IN, "0644")?;
            if daemon.is_file() && cli.is_file() {
                self.install_authkey(n)?;
                self.install(n, &daemon, "/usr/sbin/vmhad", "0755")?;
                self.install(n, &cli, "/usr/bin/vmha", "0755")?;
                self.install(n, &policy, "/usr/share/dbus-1/system.d/org.vmha.Vmha1.conf", "0644")?;
                self.install(n, &action, "/usr/share/polkit-1/actions/org.vmha.Vmha1.policy", "0644")?;
                self.install(n, &rule, "/usr/share/polkit-1/rules.d/60-vmha.rules", "0644")?;
                self.exec_ok(n, &["sh", "-c", "kill -HUP $(cat /run/dbus/pid)"])?;
                self.restart_polkitd(n)?;
            }
            installed.push(self.cfg.host_name(n));
        }
        Ok(installed)
    }

    /// The lab's relay key (what `vmha keygen` makes on a real cluster): one per lab, made once in the
    /// lab's directory (root, 0600), the same in every host.
    pub fn authkey(&self) -> Result<PathBuf> {
        use std::io::{Read, Write};
        use std::os::unix::fs::OpenOptionsExt;
        let path = self.cfg.dir().join("authkey");
        if !path.exists() {
            let mut key = [0u8; 64];
            fs::File::open("/dev/urandom")?.read_exact(&mut key)?;
            let tmp = self.cfg.dir().join(format!(".authkey.{}", std::process::id()));
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(&key)?;
            f.sync_all()?;
            // Another process of the same lab may have made it meanwhile: the first one stays.
            if fs::hard_link(&tmp, &path).is_err() && !path.exists() {
                bail!("cannot create {}", path.display());
            }
            fs::remove_file(&tmp)?;
        }
        Ok(path)
    }

    /// Installs the lab's relay key as host N's /etc/vmha/authkey (root, 0600), as an operator copies
    /// the key made by `vmha keygen` to every host.
    pub fn install_authkey(&self, n: u8) -> Result<()> {
        let key = self.authkey()?;
        self.exec_ok(
            n,
            &[
                "install",
                "-D",
                "-m",
                "0600",
                "-o",
                "root",
                "-g",
                "root",
                path_str(&key)?,
                "/etc/vmha/authkey",
            ],
        )?;
        Ok(())
    }

    /// `systemctl enable --now vmhad` on host N (vmhad installed by [`Lab::install_build`] or
    /// [`Lab::install_package`]): marks vmhad enabled (/etc/vmha/lab-enabled, so the host's supervisor
    /// starts it at every boot), asks the supervisor to start it unless it runs, waits until it owns its
    /// bus name and returns its PID inside the host (also in the host's /run/vmhad.pid).
    /// Its log is the host's /var/log/vmha/vmhad.log; the supervisor's is vmhad-supervisor.log.
    /// A host without /etc/vmha/authkey gets the lab's first (the relay between vmhads needs it).
    pub fn start_vmhad(&self, n: u8) -> Result<u32> {
        if !self.exec(n, &["test", "-e", "/etc/vmha/authkey"])?.status.success() {
            self.install_authkey(n)?;
        }
        self.exec_ok(
            n,
            &[
                "sh",
                "-c",
                "[ -x /usr/sbin/vmhad ] || { echo 'vmhad is not installed' >&2; exit 1; }; \
                 [ -f /run/vmhad-supervisor.pid ] && kill -0 $(cat /run/vmhad-supervisor.pid) 2>/dev/null || \
                 { echo 'no vmhad supervisor (a lab brought up by an older vmha-lab: bring it down and up again)' >&2; exit 1; }; \
                 mkdir -p /etc/vmha && touch /etc/vmha/lab-enabled && echo start > /run/vmhad.want && \
                 kill -USR1 $(cat /run/vmhad-supervisor.pid)",
            ],
        )?;
        self.wait_vmhad(n, Duration::from_secs(30))
    }

    /// Waits (at most `limit`) until a running vmhad on host N, started by the host's supervisor, owns
    /// its bus name, without starting anything; returns its PID inside the host.
    pub fn wait_vmhad(&self, n: u8, limit: Duration) -> Result<u32> {
        self.wait_vmhad_not(n, None, limit)
    }

    /// Like [`Lab::wait_vmhad`], for a vmhad other than `old` (one just killed may still own its bus
    /// name and answer `kill -0` while it exits, until its supervisor reaps it).
    pub fn wait_new_vmhad(&self, n: u8, old: u32, limit: Duration) -> Result<u32> {
        self.wait_vmhad_not(n, Some(old), limit)
    }

    fn wait_vmhad_not(&self, n: u8, old: Option<u32>, limit: Duration) -> Result<u32> {
        wait_for(
            &format!("vmhad on {} to own its bus name", self.cfg.host_name(n)),
            limit,
            Duration::from_millis(100),
            || {
                let pid = self.vmhad_pid(n).ok()?.filter(|p| Some(*p) != old)?;
                self.bus_name_has_owner(n, "org.vmha.Vmha1").ok()?.then_some(())?;
                // The owner is that process (not a previous vmhad leaving the bus).
                (self.vmhad_pid(n).ok()?? == pid).then_some(pid)
            },
        )
    }

    /// The PID (inside host N) of its running vmhad, as its supervisor recorded it.
    pub fn vmhad_pid(&self, n: u8) -> Result<Option<u32>> {
        let out = self.exec(
            n,
            &[
                "sh",
                "-c",
                "p=$(cat /run/vmhad.pid 2>/dev/null) && kill -0 \"$p\" 2>/dev/null && echo \"$p\"",
            ],
        )?;
        let text = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() || text.trim().is_empty() {
            return Ok(None);
        }
        Ok(Some(
            text.trim().parse().with_context(|| format!("vmhad pid {text:?}"))?,
        ))
    }

    /// Whether bus name `name` has an owner on host N's system bus.
    pub fn bus_name_has_owner(&self, n: u8, name: &str) -> Result<bool> {
        let out = self.exec_ok(
            n,
            &[
                "dbus-send",
                "--system",
                "--print-reply",
                "--dest=org.freedesktop.DBus",
                "/org/freedesktop/DBus",
                "org.freedesktop.DBus.NameHasOwner",
                &format!("string:{name}"),
            ],
        )?;
        Ok(out.contains("boolean true"))
    }

    /// Restarts polkit's daemon on host N (host-init starts it and records its PID in /run/polkitd.pid), so
    /// that it reads the actions and rules installed since, and waits until it owns its bus name again.
    /// Nothing to do on a machine without polkitd.
    pub fn restart_polkitd(&self, n: u8) -> Result<()> {
        const POLKIT: &str = "org.freedesktop.PolicyKit1";
        let host = self.cfg.host_name(n);
        let present = self.exec(n, &["test", "-x", "/usr/lib/polkit-1/polkitd"])?;
        if !present.status.success() {
            tracing::warn!(%host, "no /usr/lib/polkit-1/polkitd (ci/install-deps installs polkitd): no polkit");
            return Ok(());
        }
        self.exec_ok(
            n,
            &[
                "sh",
                "-c",
                "if [ -f /run/polkitd.pid ]; then kill $(cat /run/polkitd.pid) 2>/dev/null; rm -f /run/polkitd.pid; fi",
            ],
        )?;
        wait_for(
            &format!("the old polkitd on {host} to leave the bus"),
            Duration::from_secs(15),
            Duration::from_millis(50),
            || (!self.bus_name_has_owner(n, POLKIT).ok()?).then_some(()),
        )?;
        self.exec_ok(
            n,
            &[
                "sh",
                "-c",
                "setsid /usr/lib/polkit-1/polkitd --no-debug >> /var/log/vmha/polkitd.log 2>&1 < /dev/null & \
                 echo $! > /run/polkitd.pid",
            ],
        )?;
        wait_for(
            &format!("polkitd on {host} to own {POLKIT}"),
            Duration::from_secs(30),
            Duration::from_millis(100),
            || self.bus_name_has_owner(n, POLKIT).ok()?.then_some(()),
        )
    }

    /// `systemctl stop vmhad` on host N: the supervisor is told not to restart it, vmhad gets SIGTERM;
    /// returns once it has exited. It stays enabled: the host's next boot starts it again.
    pub fn stop_vmhad(&self, n: u8) -> Result<()> {
        self.exec_ok(
            n,
            &[
                "sh",
                "-c",
                "echo stop > /run/vmhad.want; \
                 if [ -f /run/vmhad-supervisor.pid ]; then kill -USR1 $(cat /run/vmhad-supervisor.pid) 2>/dev/null; fi; \
                 if [ -f /run/vmhad.pid ]; then kill $(cat /run/vmhad.pid) 2>/dev/null; fi; true",
            ],
        )?;
        wait_for(
            &format!("vmhad on {} to stop", self.cfg.host_name(n)),
            Duration::from_secs(30),
            Duration::from_millis(50),
            || self.vmhad_pid(n).ok()?.is_none().then_some(()),
        )
    }

    /// Writes a lab guest's domain XML to shared storage and returns its path.
    pub fn write_domain_xml(&self, spec: &GuestSpec) -> Result<PathBuf> {
        let path = self.cfg.shared_dir().join(format!("{}.xml", spec.name));
        fs::write(&path, spec.domain_xml(&guest::image_dir()))?;
        Ok(path)
    }

    /// Creates a VM as a cluster resource (live-migratable, monitored every 10 s) unless it exists.
    pub fn add_vm(&self, spec: &GuestSpec, agent: VmAgent) -> Result<()> {
        self.add_vm_with(spec, agent, &[])
    }

    /// [`Lab::add_vm`] with extra instance parameters of the agent (`name=value`, e.g.
    /// `shared_storage=true`).
    pub fn add_vm_with(&self, spec: &GuestSpec, agent: VmAgent, params: &[&str]) -> Result<()> {
        let n = self.other_host(0).ok_or_else(|| anyhow!("no host is running"))?;
        let existing = self.status(n)?;
        if existing.resource(&spec.name).is_some() {
            return Ok(());
        }
        let xml = self.write_domain_xml(spec)?;
        let config = format!("config={}", path_str(&xml)?);
        let mut args: Vec<&str> = vec!["pcs", "resource", "create", &spec.name];
        match agent {
            VmAgent::VirtualDomain => args.extend([
                "ocf:heartbeat:VirtualDomain",
                &config,
                "hypervisor=qemu:///system",
                "migration_transport=tcp",
                "force_stop=true",
            ]),
            VmAgent::Vmha => args.extend([
                "ocf:vmha:VirtualMachine",
                &config,
                "hypervisor=qemu:///system",
                "migration_transport=tcp",
            ]),
        }
        args.extend(params);
        args.extend([
            "meta",
            "allow-migrate=true",
            "op",
            "monitor",
            "interval=10s",
            "timeout=30s",
            "op",
            "start",
            "timeout=90s",
            "op",
            "stop",
            "timeout=90s",
            "op",
            "migrate_to",
            "timeout=120s",
            "op",
            "migrate_from",
            "timeout=60s",
        ]);
        self.exec_ok(n, &args)?;
        Ok(())
    }

    /// QEMU processes running the libvirt domain `vm`, anywhere on this machine, with the lab host each runs
    /// on (0 when it is in no host of this lab).
    pub fn qemu_processes(&self, vm: &str) -> Vec<(u8, i32)> {
        let host_ns: Vec<(u8, u64)> = self
            .cfg
            .host_numbers()
            .filter_map(|n| {
                Some((
                    n,
                    fs::read_to_string(self.cfg.host_dir(n).join("pidns"))
                        .ok()?
                        .trim()
                        .parse()
                        .ok()?,
                ))
            })
            .collect();
        process::all_pids()
            .into_iter()
            .filter(|&p| process::qemu_guest_name(&process::cmdline(p)).as_deref() == Some(vm))
            .map(|p| {
                let ns = process::pid_namespace(p);
                let host = host_ns.iter().find(|(_, h)| Some(*h) == ns).map_or(0, |(n, _)| *n);
                (host, p)
            })
            .collect()
    }

    /// Power actions the lab's power controller carried out (fencing), oldest first.
    pub fn power_events(&self) -> Vec<power::PowerEvent> {
        power::events(&self.cfg)
    }

    /// Copies every daemon log of every host (Corosync, Pacemaker, libvirt, QEMU, consoles) and the power
    /// controller's log into `dest`.
    pub fn collect_logs(&self, dest: &Path) -> Result<PathBuf> {
        fs::create_dir_all(dest)?;
        for n in self.cfg.host_numbers() {
            let d = self.cfg.host_dir(n);
            let to = dest.join(self.cfg.host_name(n));
            fs::create_dir_all(&to)?;
            for name in [
                "var-log-corosync",
                "var-log-pacemaker",
                "var-log-libvirt",
                "var-log-vmha",
                "var-lib-vmha",
                "console.log",
            ] {
                let src = d.join(name);
                if src.exists() {
                    let _ = run_ok("cp", &["-a", path_str(&src)?, path_str(&to)?], Duration::from_secs(60));
                }
            }
        }
        for name in ["power.log", "power-controller.log", "lab.json"] {
            let _ = fs::copy(self.cfg.dir().join(name), dest.join(name));
        }
        Ok(dest.to_path_buf())
    }

    /// The last `lines` lines of each host's Pacemaker and Corosync logs, for a failing test's output.
    pub fn log_tails(&self, lines: usize) -> String {
        let mut s = String::new();
        for n in self.cfg.host_numbers() {
            for log in ["var-log-corosync/corosync.log", "var-log-pacemaker/pacemaker.log"] {
                let path = self.cfg.host_dir(n).join(log);
                let Ok(text) = fs::read_to_string(&path) else { continue };
                let all: Vec<&str> = text.lines().collect();
                s.push_str(&format!("---- {} {log} (last {lines} lines)\n", self.cfg.host_name(n)));
                for l in &all[all.len().saturating_sub(lines)..] {
                    s.push_str(l);
                    s.push('\n');
                }
            }
        }
        s
    }

    /// Tears the lab down: the power controller and every host by PID (which ends every process the host
    /// ran), then the lab's network namespaces. Safe to call on a lab that is partly or not running.
    pub fn down(&self) -> Result<()> {
        if let Some(p) = self.power_controller() {
            p.signal(Signal::SIGKILL)?;
        }
        for n in self.cfg.host_numbers() {
            self.power_off(n)?;
        }
        let existing = run_ok("ip", &["netns", "list"], Duration::from_secs(10))?;
        let names: Vec<String> = existing
            .lines()
            .filter_map(|l| l.split_whitespace().next().map(str::to_string))
            .collect();
        let mut ours: Vec<String> = self.cfg.host_numbers().map(|n| self.cfg.host_netns(n)).collect();
        ours.push(self.cfg.switch_netns());
        for ns in ours.iter().filter(|ns| names.contains(ns)) {
            run_ok("ip", &["netns", "del", ns], Duration::from_secs(10))?;
        }
        let _ = fs::remove_file(self.cfg.power_socket());
        Ok(())
    }
}

fn path_str(p: &Path) -> Result<&str> {
    p.to_str().ok_or_else(|| anyhow!("path {} is not UTF-8", p.display()))
}

fn write_executable(path: &Path, text: &str) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent)?;
    }
    fs::write(path, text)?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o755))?;
    Ok(())
}

fn append(path: &Path, text: &str) -> Result<()> {
    use std::io::Write;
    let mut f = fs::OpenOptions::new()
        .append(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    f.write_all(text.as_bytes())?;
    Ok(())
}

/// Waits for a child in a thread so it never lingers as a zombie.
fn reap_in_background(mut child: std::process::Child) {
    std::thread::spawn(move || {
        let _ = child.wait();
    });
}
