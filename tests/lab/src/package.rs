//! Installing vmha into the lab hosts from its Debian package, the way an operator installs it on a KVM
//! host: `dpkg -i` runs inside each host, unpacks the files, records them in dpkg's database, installs the
//! conffile `/etc/default/vmhad` and runs the maintainer scripts.
//!
//! How a host gets a system of its own to install into: host-init gives every host copy-on-write layers
//! (overlayfs, upper directories in the host's state directory) over `/usr`, `/etc`, `/var/lib/dpkg`
//! and `/var/lib/systemd`. dpkg therefore sees the machine's database (corosync, pacemaker, libvirt and
//! dbus are installed, so vmha's Depends are met) and whatever one host installs, enables or records
//! stays in that host; the machine and the other hosts, of this lab and of others, see none of it.
//!
//! Two things differ from a real host, on purpose, and are spelled out here:
//! - `--no-triggers`: the triggers vmha's files activate (man-db's index in `/var/cache/man`, dbus's
//!   reload) would run in directories the hosts share with the machine. dpkg records them as pending in
//!   the host's own database; the lab does the one that matters itself: it tells the host's dbus-daemon
//!   to reload its configuration (vmhad's bus policy).
//! - The lab has no systemd (see /work/shared/docs/lab.md), so the postinst only records the unit's
//!   enablement (deb-systemd-helper) and starts nothing; the lab enables and starts vmhad with
//!   [`Lab::start_vmhad`], and the host's vmhad supervisor (host-init starts it) starts it at boot and
//!   restarts it on failure as systemd would. D-Bus activation is not routed through it: the host's
//!   dbus-daemon runs the activation file's Exec= itself (on a real host systemd would start the unit).

use std::path::Path;

use anyhow::{bail, Context, Result};

use crate::lab::Lab;

/// dpkg's log inside a host (the machine's `/var/log/dpkg.log` is left alone).
const DPKG_LOG: &str = "/var/log/vmha/dpkg.log";

impl Lab {
    /// Installs (or upgrades to) the Debian packages `debs` in every running host with `dpkg -i`, checks
    /// that dpkg reports each one installed, and reloads the host's D-Bus configuration. Returns the
    /// hosts it installed into. Needs a lab whose hosts have their own dpkg database (brought up by this
    /// version of the lab).
    pub fn install_package(&self, debs: &[&Path]) -> Result<Vec<String>> {
        if debs.is_empty() {
            bail!("no package to install");
        }
        let mut names = Vec::new();
        let mut paths = Vec::new();
        for deb in debs {
            if !deb.is_file() {
                bail!(
                    "{} is missing: build the packages first (bash ci/build-packages)",
                    deb.display()
                );
            }
            let path = deb
                .canonicalize()
                .with_context(|| format!("resolving {}", deb.display()))?
                .to_str()
                .context("package path is not UTF-8")?
                .to_string();
            let file = deb.file_name().and_then(|f| f.to_str()).unwrap_or_default();
            let name = file.split('_').next().unwrap_or_default().to_string();
            if name.is_empty() {
                bail!(
                    "{}: not a Debian package file name (name_version_arch.deb)",
                    deb.display()
                );
            }
            names.push(name);
            paths.push(path);
        }
        let mut installed = Vec::new();
        for n in self.cfg.host_numbers().filter(|&n| self.host_alive(n)) {
            let host = self.cfg.host_name(n);
            // The host's dpkg database must be its own: never install into the machine's.
            let own = self.exec_ok(
                n,
                &[
                    "sh",
                    "-c",
                    "findmnt -rn -o FSTYPE /var/lib/dpkg; findmnt -rn -o FSTYPE /etc",
                ],
            )?;
            if own.lines().filter(|l| l.trim() == "overlay").count() != 2 {
                bail!(
                    "{host} has no dpkg database and /etc of its own (a lab brought up by an older vmha-lab): \
                     bring the lab down and up again"
                );
            }
            let mut args = vec!["dpkg", "--log", DPKG_LOG, "--no-triggers", "--force-confold", "-i"];
            args.extend(paths.iter().map(String::as_str));
            self.exec_ok(n, &args).with_context(|| format!("dpkg -i on {host}"))?;
            for name in &names {
                let status = self.exec_ok(n, &["dpkg-query", "-W", "-f=${Status}", name])?;
                if status.trim() != "install ok installed" {
                    bail!("{name} on {host}: dpkg says {status:?} after dpkg -i");
                }
            }
            // What dbus's trigger would do: the host's bus reads vmhad's policy.
            self.exec_ok(n, &["sh", "-c", "kill -HUP $(cat /run/dbus/pid)"])?;
            // polkitd reads the package's action and rule (60-vmha.rules).
            self.restart_polkitd(n)?;
            installed.push(host);
        }
        Ok(installed)
    }

    /// The version of package `name` dpkg has installed in host N (`None`: not installed).
    pub fn package_version(&self, n: u8, name: &str) -> Result<Option<String>> {
        let out = self.exec(n, &["dpkg-query", "-W", "-f=${Status}\t${Version}", name])?;
        let text = String::from_utf8_lossy(&out.stdout);
        Ok(match text.split_once('\t') {
            Some((status, version)) if out.status.success() && status == "install ok installed" => {
                Some(version.trim().to_string())
            }
            _ => None,
        })
    }
}

/// The newest `<name>_*.deb` in `dir` (by modification time).
pub fn newest_package(dir: &Path, name: &str) -> Result<std::path::PathBuf> {
    let prefix = format!("{name}_");
    let mut best: Option<(std::time::SystemTime, std::path::PathBuf)> = None;
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let entry = entry?;
        let file = entry.file_name();
        let file = file.to_string_lossy();
        if !(file.starts_with(&prefix) && file.ends_with(".deb")) {
            continue;
        }
        let modified = entry.metadata()?.modified()?;
        if best.as_ref().is_none_or(|(t, _)| modified > *t) {
            best = Some((modified, entry.path()));
        }
    }
    best.map(|(_, p)| p).with_context(|| {
        format!(
            "no {name}_*.deb in {}: build the packages first (bash ci/build-packages)",
            dir.display()
        )
    })
}
