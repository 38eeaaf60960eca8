//! The `shutdown-order` item: does a shutdown or reboot of this host move its VMs away alive?
//!
//! On shutdown systemd stops units in the reverse of their start order. Pacemaker, stopping, live-migrates
//! the VMs it runs here to other hosts; for that it must stop while libvirtd (or virtqemud) still answers,
//! before libvirt-guests shuts down or suspends every running VM (its `ON_SHUTDOWN`), and before the VMs'
//! own systemd scopes are stopped (libvirt orders them `Before=virt-guest-shutdown.target`). That takes
//! `After=` those units in `pacemaker.service`, which vmha's package ships as a drop-in
//! ([`DROP_IN`]). The facts come from the unit files and drop-ins on disk (as systemd merges them), not
//! from `systemctl`, so the item also works where systemd does not run (the lab).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use super::{finding, green, Finding, Level};

/// Where vmha's package installs its ordering drop-in.
pub const DROP_IN: &str = "/usr/lib/systemd/system/pacemaker.service.d/50-vmha-shutdown-order.conf";

/// The units Pacemaker must be ordered after (when they are installed), with what goes wrong without.
const NEEDED: &[(&str, &str)] = &[
    ("libvirtd.service", "libvirtd may stop while Pacemaker migrates the VMs"),
    (
        "virtqemud.service",
        "virtqemud may stop while Pacemaker migrates the VMs",
    ),
    (
        "libvirt-guests.service",
        "libvirt-guests acts on the VMs before Pacemaker can migrate them",
    ),
    (
        "virt-guest-shutdown.target",
        "systemd stops the VMs' scopes (kills QEMU) while Pacemaker migrates them",
    ),
];

/// Unit directories, highest priority first (systemd's system unit search path).
const UNIT_DIRS: &[&str] = &[
    "/etc/systemd/system",
    "/run/systemd/system",
    "/usr/local/lib/systemd/system",
    "/usr/lib/systemd/system",
    "/lib/systemd/system",
];

/// What the unit files say about the order of a host shutdown.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ShutdownFacts {
    /// `pacemaker.service` is installed (none: not a systemd host, or no Pacemaker).
    pub pacemaker_unit: Option<PathBuf>,
    /// The units `pacemaker.service` is ordered `After=`, from the unit and its drop-ins.
    pub pacemaker_after: BTreeSet<String>,
    /// The drop-ins of `pacemaker.service` that were read, in the order systemd applies them.
    pub drop_ins: Vec<PathBuf>,
    /// Which of the units in [`NEEDED`] are installed.
    pub installed: BTreeSet<String>,
    /// `libvirt-guests.service` is enabled (wanted by a target in /etc/systemd/system).
    pub guests_enabled: bool,
    /// libvirt-guests' `ON_SHUTDOWN` (its default, `shutdown`, when unset).
    pub guests_on_shutdown: String,
}

impl ShutdownFacts {
    /// Reads the facts from the file system under `root` (`/` on a host; a scratch directory in tests).
    pub fn read(root: &Path) -> ShutdownFacts {
        let under = |p: &str| root.join(p.trim_start_matches('/'));
        let find_unit = |name: &str| UNIT_DIRS.iter().map(|d| under(d).join(name)).find(|p| p.is_file());
        let mut facts = ShutdownFacts {
            pacemaker_unit: find_unit("pacemaker.service"),
            guests_on_shutdown: "shutdown".to_string(),
            ..Default::default()
        };
        for (unit, _) in NEEDED {
            if find_unit(unit).is_some() {
                facts.installed.insert((*unit).to_string());
            }
        }
        if let Some(main) = &facts.pacemaker_unit {
            let mut texts = vec![std::fs::read_to_string(main).unwrap_or_default()];
            // Drop-ins: by file name across all directories (a higher-priority directory's file of the same
            // name replaces a lower one's), applied in file-name order.
            let mut by_name: std::collections::BTreeMap<String, PathBuf> = std::collections::BTreeMap::new();
            for dir in UNIT_DIRS.iter().rev() {
                let Ok(entries) = std::fs::read_dir(under(dir).join("pacemaker.service.d")) else {
                    continue;
                };
                for e in entries.flatten() {
                    let name = e.file_name().to_string_lossy().into_owned();
                    if name.ends_with(".conf") {
                        by_name.insert(name, e.path());
                    }
                }
            }
            for path in by_name.into_values() {
                texts.push(std::fs::read_to_string(&path).unwrap_or_default());
                facts.drop_ins.push(path);
            }
            for text in &texts {
                facts.pacemaker_after.extend(unit_list(text, "Unit", "After"));
            }
        }
        facts.guests_enabled = std::fs::read_dir(under("/etc/systemd/system"))
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".wants"))
            .any(|e| {
                e.path().join("libvirt-guests.service").exists() || e.path().join("libvirt-guests.service").is_symlink()
            });
        for conf in ["/etc/default/libvirt-guests", "/etc/sysconfig/libvirt-guests"] {
            if let Ok(text) = std::fs::read_to_string(under(conf)) {
                if let Some(v) = shell_setting(&text, "ON_SHUTDOWN") {
                    facts.guests_on_shutdown = v;
                }
            }
        }
        facts
    }
}

/// Every value of `key=` in section `[section]` of a systemd unit file, split on white space.
fn unit_list(text: &str, section: &str, key: &str) -> Vec<String> {
    let mut current = String::new();
    let mut out = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.starts_with('#') || line.starts_with(';') || line.is_empty() {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            current = name.to_string();
            continue;
        }
        if current != section {
            continue;
        }
        if let Some((k, v)) = line.split_once('=') {
            if k.trim() == key {
                out.extend(v.split_whitespace().map(str::to_string));
            }
        }
    }
    out
}

/// The last assignment `key=value` of a shell-style settings file (quotes removed), if any.
fn shell_setting(text: &str, key: &str) -> Option<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .filter(|(k, _)| k.trim() == key)
        .map(|(_, v)| v.trim().trim_matches(|c| c == '"' || c == '\'').to_string())
        .next_back()
}

pub(super) const ITEM: &str = "shutdown-order";

/// Green when Pacemaker stops before everything installed that would stop or act on the VMs first.
pub(super) fn evaluate(f: &ShutdownFacts) -> Finding {
    let Some(unit) = &f.pacemaker_unit else {
        return finding(
            ITEM,
            Level::Yellow,
            "no pacemaker.service unit found: the order of a host shutdown was not checked",
            "install Pacemaker from the distribution's packages (its systemd unit), then run vmha check again",
        );
    };
    let guests_act = f.guests_enabled && f.guests_on_shutdown != "ignore";
    let missing: Vec<(&str, &str)> = NEEDED
        .iter()
        .copied()
        .filter(|(u, _)| f.installed.contains(*u) && !f.pacemaker_after.contains(*u))
        // libvirt-guests that does nothing on shutdown needs no ordering.
        .filter(|(u, _)| *u != "libvirt-guests.service" || guests_act)
        .collect();
    let guests = if f.installed.contains("libvirt-guests.service") {
        if f.guests_enabled {
            format!("libvirt-guests enabled, ON_SHUTDOWN={}", f.guests_on_shutdown)
        } else {
            "libvirt-guests disabled".to_string()
        }
    } else {
        "no libvirt-guests".to_string()
    };
    if !missing.is_empty() {
        let names: Vec<&str> = missing.iter().map(|(u, _)| *u).collect();
        let why: Vec<&str> = missing.iter().map(|(_, w)| *w).collect();
        return finding(
            ITEM,
            Level::Red,
            format!(
                "{} is not ordered After= {} ({guests}): on shutdown or reboot {}, so this host's VMs are stopped \
                 or killed instead of live-migrated",
                unit.display(),
                names.join(" "),
                why.join("; ")
            ),
            format!(
                "install vmha's drop-in {DROP_IN} (reinstall the vmha package), or add [Unit] After={} with \
                 `systemctl edit pacemaker.service`; then systemctl daemon-reload",
                NEEDED.iter().map(|(u, _)| *u).collect::<Vec<_>>().join(" ")
            ),
        );
    }
    let ordered: Vec<&str> = NEEDED
        .iter()
        .map(|(u, _)| *u)
        .filter(|u| f.installed.contains(*u) && f.pacemaker_after.contains(*u))
        .collect();
    if ordered.is_empty() {
        return finding(
            ITEM,
            Level::Yellow,
            format!("neither libvirtd.service nor virtqemud.service is installed ({guests}): the order of a host shutdown was not checked"),
            "install libvirt's daemon from the distribution's packages, then run vmha check again",
        );
    }
    green(
        ITEM,
        format!(
            "Pacemaker stops first on shutdown (migrating the VMs away), then {} ({guests})",
            ordered.join(", ")
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(after: &[&str], installed: &[&str]) -> ShutdownFacts {
        ShutdownFacts {
            pacemaker_unit: Some(PathBuf::from("/usr/lib/systemd/system/pacemaker.service")),
            pacemaker_after: after.iter().map(|s| s.to_string()).collect(),
            drop_ins: Vec::new(),
            installed: installed.iter().map(|s| s.to_string()).collect(),
            guests_enabled: true,
            guests_on_shutdown: "shutdown".into(),
        }
    }

    const DEBIAN_12: &[&str] = &[
        "libvirtd.service",
        "libvirt-guests.service",
        "virt-guest-shutdown.target",
    ];

    #[test]
    fn the_shipped_drop_in_orders_pacemaker_after_everything_needed() {
        let text = include_str!("../../../packaging/systemd/pacemaker.service.d/50-vmha-shutdown-order.conf");
        let after: BTreeSet<String> = unit_list(text, "Unit", "After").into_iter().collect();
        for (unit, _) in NEEDED {
            assert!(after.contains(*unit), "{unit} missing from the drop-in's After=");
        }
        assert_eq!(unit_list(text, "Unit", "Wants"), vec!["virt-guest-shutdown.target"]);
    }

    #[test]
    fn debian_12_with_the_drop_in_is_green() {
        let all: Vec<&str> = NEEDED.iter().map(|(u, _)| *u).collect();
        let f = evaluate(&facts(&all, DEBIAN_12));
        assert_eq!(f.level, Level::Green, "{f:?}");
        assert!(
            f.summary.contains("libvirtd.service, libvirt-guests.service"),
            "{}",
            f.summary
        );
        assert!(f.summary.contains("ON_SHUTDOWN=shutdown"), "{}", f.summary);
        assert!(f.fix.is_empty());
    }

    #[test]
    fn missing_ordering_is_red_naming_each_unit_and_the_fix() {
        // Debian 12's pacemaker.service as shipped: After= corosync and friends, nothing of libvirt.
        let f = evaluate(&facts(&["corosync.service", "network.target"], DEBIAN_12));
        assert_eq!(f.level, Level::Red);
        for unit in DEBIAN_12 {
            assert!(f.summary.contains(unit), "{unit}: {}", f.summary);
        }
        assert!(!f.summary.contains("virtqemud"), "not installed: {}", f.summary);
        assert!(f.summary.contains("ON_SHUTDOWN=shutdown"), "{}", f.summary);
        assert!(f.fix.contains(DROP_IN), "{}", f.fix);
        assert!(f.fix.contains("systemctl edit pacemaker.service"), "{}", f.fix);

        // Only libvirt-guests missing: red, and only it is named.
        let f = evaluate(&facts(&["libvirtd.service", "virt-guest-shutdown.target"], DEBIAN_12));
        assert_eq!(f.level, Level::Red);
        assert!(f.summary.contains("After= libvirt-guests.service ("), "{}", f.summary);
    }

    #[test]
    fn libvirt_guests_that_does_nothing_on_shutdown_needs_no_ordering() {
        let after = ["libvirtd.service", "virt-guest-shutdown.target"];
        let mut ignore = facts(&after, DEBIAN_12);
        ignore.guests_on_shutdown = "ignore".into();
        assert_eq!(evaluate(&ignore).level, Level::Green, "{:?}", evaluate(&ignore));
        let mut disabled = facts(&after, DEBIAN_12);
        disabled.guests_enabled = false;
        let f = evaluate(&disabled);
        assert_eq!(f.level, Level::Green, "{f:?}");
        assert!(f.summary.contains("libvirt-guests disabled"), "{}", f.summary);
        let mut suspend = facts(&after, DEBIAN_12);
        suspend.guests_on_shutdown = "suspend".into();
        let f = evaluate(&suspend);
        assert_eq!(f.level, Level::Red, "{f:?}");
        assert!(f.summary.contains("ON_SHUTDOWN=suspend"), "{}", f.summary);
    }

    #[test]
    fn modular_libvirt_needs_virtqemud_ordering() {
        let installed = ["virtqemud.service", "virt-guest-shutdown.target"];
        let f = evaluate(&facts(&["libvirtd.service", "virt-guest-shutdown.target"], &installed));
        assert_eq!(f.level, Level::Red, "{f:?}");
        assert!(f.summary.contains("virtqemud.service"), "{}", f.summary);
        let f = evaluate(&facts(&["virtqemud.service", "virt-guest-shutdown.target"], &installed));
        assert_eq!(f.level, Level::Green, "{f:?}");
    }

    #[test]
    fn no_pacemaker_unit_or_no_libvirt_is_yellow() {
        let mut none = facts(&[], DEBIAN_12);
        none.pacemaker_unit = None;
        assert_eq!(evaluate(&none).level, Level::Yellow);
        let f = evaluate(&facts(&["libvirtd.service"], &[]));
        assert_eq!(f.level, Level::Yellow, "{f:?}");
    }

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("vmha-check-shutdown-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn write(root: &Path, path: &str, text: &str) {
        let p = root.join(path.trim_start_matches('/'));
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }

    #[test]
    fn reading_merges_the_unit_its_drop_ins_and_libvirt_guests_settings() {
        let root = scratch("read");
        write(
            &root,
            "/usr/lib/systemd/system/pacemaker.service",
            "[Unit]\nAfter=network.target\nAfter=corosync.service\n# After=libvirtd.service\n[Service]\nAfter=nonsense.service\n",
        );
        for unit in [
            "libvirtd.service",
            "libvirt-guests.service",
            "virt-guest-shutdown.target",
        ] {
            write(&root, &format!("/usr/lib/systemd/system/{unit}"), "[Unit]\n");
        }
        write(
            &root,
            "/etc/default/libvirt-guests",
            "#ON_SHUTDOWN=shutdown\nON_SHUTDOWN=\"suspend\"\n",
        );
        write(
            &root,
            "/etc/systemd/system/multi-user.target.wants/libvirt-guests.service",
            "",
        );
        let before = ShutdownFacts::read(&root);
        assert!(before.pacemaker_unit.is_some());
        assert_eq!(
            before.pacemaker_after,
            ["corosync.service", "network.target"]
                .iter()
                .map(|s| s.to_string())
                .collect()
        );
        assert!(before.guests_enabled);
        assert_eq!(before.guests_on_shutdown, "suspend");
        assert_eq!(evaluate(&before).level, Level::Red);

        // The shipped drop-in, plus an administrator's drop-in of the same name in /etc that replaces it.
        let shipped = include_str!("../../../packaging/systemd/pacemaker.service.d/50-vmha-shutdown-order.conf");
        write(&root, DROP_IN, shipped);
        let after = ShutdownFacts::read(&root);
        assert_eq!(after.drop_ins.len(), 1);
        assert_eq!(evaluate(&after).level, Level::Green, "{:?}", evaluate(&after));
        write(
            &root,
            "/etc/systemd/system/pacemaker.service.d/50-vmha-shutdown-order.conf",
            "[Unit]\nAfter=libvirtd.service\n",
        );
        let overridden = ShutdownFacts::read(&root);
        let f = evaluate(&overridden);
        assert_eq!(f.level, Level::Red, "{f:?}");
        assert!(f.summary.contains("libvirt-guests.service"), "{}", f.summary);
        std::fs::remove_dir_all(&root).unwrap();
    }
}
