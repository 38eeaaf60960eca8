//! `vmha check` in a lab where vmha was installed from its Debian package (dpkg -i in every host): all
//! green on a healthy cluster (fencing on, a VM running); then, one problem at a time, each restored
//! before the next, it names the problem and the fix and exits non-zero: fencing disabled
//! (stonith-enabled=false), the only fence device disabled, the package's shutdown ordering of Pacemaker
//! (pacemaker.service.d drop-in) removed from one host, the shared storage not mounted on one host,
//! one host with a relay key of its own (`vmha keygen --force` there: the fix says where to copy the key
//! from), vmhad stopped on one host (which a vmha call on that host then restarts through D-Bus activation).

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;
use vmha_lab::guest::GuestSpec;
use vmha_lab::lab::VmAgent;
use vmha_lab::{wait_for, Lab};

const ITEMS: [&str; 10] = [
    "fencing",
    "quorum-policy",
    "votequorum",
    "corosync-token",
    "libvirt",
    "shutdown-order",
    "vmhad",
    "shared-storage",
    "time-sync",
    "relay-authkey",
];

/// `vmha --output json check` on host `n`: (exit code, report, seconds it took).
fn check(lab: &Lab, n: u8) -> (i32, Value, f64) {
    let t0 = Instant::now();
    let out = lab.exec(n, &["vmha", "--output", "json", "check"]).unwrap();
    let took = t0.elapsed().as_secs_f64();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report: Value = serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!(
            "vmha check printed no JSON ({e}): {stdout} {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code().unwrap_or(-1), report, took)
}

fn item<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["findings"]
        .as_array()
        .and_then(|f| f.iter().find(|x| x["item"] == name))
        .unwrap_or_else(|| panic!("no item {name} in {report}"))
}

/// Polls `vmha check` on host `n` until `want` holds for its report; returns it with its exit code.
fn until(lab: &Lab, n: u8, what: &str, want: impl Fn(&Value) -> bool) -> (i32, Value) {
    let t0 = Instant::now();
    let got = wait_for(what, Duration::from_secs(90), Duration::from_millis(500), || {
        let (rc, report, _) = check(lab, n);
        want(&report).then_some((rc, report))
    })
    .unwrap_or_else(|e| panic!("{e}; last report: {}", check(lab, n).1));
    println!("{what}: after {:.1} s", t0.elapsed().as_secs_f64());
    got
}

fn all_green(report: &Value) -> bool {
    report["findings"]
        .as_array()
        .is_some_and(|f| f.len() == ITEMS.len() && f.iter().all(|x| x["level"] == "green"))
}

fn red(report: &Value, name: &str) -> bool {
    report["findings"]
        .as_array()
        .and_then(|f| f.iter().find(|x| x["item"] == name))
        .is_some_and(|x| x["level"] == "red")
}

/// Asserts a red finding whose summary and fix contain the given words, and a failing exit code.
fn assert_red(rc: i32, report: &Value, name: &str, summary: &[&str], fix: &[&str]) {
    assert_eq!(rc, 1, "vmha check exits 1 when something is red: {report}");
    assert_eq!(report["ok"], false);
    let x = item(report, name);
    assert_eq!(x["level"], "red", "{x}");
    let s = x["summary"].as_str().unwrap();
    let f = x["fix"].as_str().unwrap();
    for w in summary {
        assert!(s.contains(w), "{name} summary lacks {w:?}: {s}");
    }
    for w in fix {
        assert!(f.contains(w), "{name} fix lacks {w:?}: {f}");
    }
    println!("  red {name}: {s}\n      fix: {f}");
}

fn restored(lab: &Lab) {
    let (rc, report) = until(lab, 1, "all green again", all_green);
    assert_eq!(rc, 0, "{report}");
}

#[test]
#[ignore = "lab scenario: needs root and the lab's daemons (run ci/test)"]
fn vmha_check_reports_host_readiness() {
    vmha_lab::init_logging();
    let release = vmha_e2e::release_build();
    let target = release.parent().unwrap();
    let deb = vmha_lab::package::newest_package(&target.join("packages"), "vmha").unwrap();
    let built = |p: &Path| std::fs::metadata(p).unwrap().modified().unwrap();
    assert!(
        built(&deb) >= built(&release.join("vmhad")),
        "{} is older than the release build: run ci/build-packages",
        deb.display()
    );

    let t0 = Instant::now();
    let lab = Lab::up(vmha_e2e::config()).expect("lab bring-up");
    println!("lab up in {:.1} s", t0.elapsed().as_secs_f64());
    let t0 = Instant::now();
    let hosts = lab.install_package(&[&deb]).unwrap();
    println!(
        "dpkg -i {} into {} in {:.1} s",
        deb.display(),
        hosts.join(", "),
        t0.elapsed().as_secs_f64()
    );
    assert_eq!(hosts.len(), 3);
    let version = deb
        .file_name()
        .unwrap()
        .to_str()
        .unwrap()
        .split('_')
        .nth(1)
        .unwrap()
        .to_string();
    for n in lab.cfg.host_numbers() {
        assert_eq!(lab.package_version(n, "vmha").unwrap(), Some(version.clone()));
        // Installed by dpkg, in the host only: the machine's own dpkg database does not know vmha.
        lab.exec_ok(n, &["test", "-x", "/usr/sbin/vmhad"]).unwrap();
        lab.exec_ok(n, &["test", "-f", "/etc/default/vmhad"]).unwrap();
        lab.start_vmhad(n).unwrap();
    }
    let machine = std::process::Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", "vmha"])
        .output()
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&machine.stdout).contains("installed"),
        "the machine itself must not get the package"
    );
    lab.add_vm(&GuestSpec::new("vm1"), VmAgent::Vmha).unwrap();
    let vm_host = vmha_e2e::wait_running(&lab, "vm1", Duration::from_secs(120));

    // Healthy: all green, exit 0, and the items say what they saw.
    // vmhads report every 5 s: wait until the reports cover vm1 (its domain XML, kernel and initrd).
    let (rc, report) = until(&lab, 1, "all green on the healthy cluster, vm1's files seen", |r| {
        all_green(r)
            && item(r, "shared-storage")["summary"]
                .as_str()
                .is_some_and(|s| s.contains("the 3 files"))
    });
    assert_eq!(rc, 0);
    assert_eq!(report["ok"], true);
    for name in ITEMS {
        println!("  green {name}: {}", item(&report, name)["summary"].as_str().unwrap());
    }
    assert!(item(&report, "fencing")["summary"]
        .as_str()
        .unwrap()
        .contains("fence-lab"));
    assert!(item(&report, "vmhad")["summary"]
        .as_str()
        .unwrap()
        .contains("node1, node2, node3"));
    // vm1's domain XML, kernel and initrd, seen by all three hosts.
    let storage = item(&report, "shared-storage")["summary"].as_str().unwrap().to_string();
    assert!(storage.contains("the 3 files"), "{storage}");
    assert!(item(&report, "corosync-token")["summary"]
        .as_str()
        .unwrap()
        .starts_with(&format!("token timeout {} ms", vmha_e2e::token_ms())));
    let mut times = Vec::new();
    for n in lab.cfg.host_numbers() {
        // Each vmhad keeps the others' reports, sent every 5 s: a vmhad whose readiness session just
        // restarted (its reports forgotten) has every host's again within one interval.
        let (rc, r) = until(&lab, n, &format!("host {n}: all green"), all_green);
        assert_eq!(rc, 0, "host {n}: {r}");
        let (_, _, took) = check(&lab, n);
        times.push(took);
    }
    println!("vmha check on each host: {times:.2?} s");

    // Fencing off.
    lab.exec_ok(
        1,
        &[
            "crm_attribute",
            "--type",
            "crm_config",
            "--name",
            "stonith-enabled",
            "--update",
            "false",
        ],
    )
    .unwrap();
    let (rc, report) = until(&lab, 1, "fencing red (stonith-enabled=false)", |r| red(r, "fencing"));
    assert_red(
        rc,
        &report,
        "fencing",
        &["stonith-enabled=false"],
        &["pcs property set stonith-enabled=true"],
    );
    lab.exec_ok(
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
    )
    .unwrap();
    restored(&lab);

    // The only fence device disabled.
    lab.exec_ok(2, &["pcs", "stonith", "disable", "fence-lab"]).unwrap();
    let (rc, report) = until(&lab, 2, "fencing red (device disabled)", |r| red(r, "fencing"));
    assert_red(
        rc,
        &report,
        "fencing",
        &["every fence device is disabled", "fence-lab"],
        &["pcs stonith enable fence-lab"],
    );
    lab.exec_ok(2, &["pcs", "stonith", "enable", "fence-lab"]).unwrap();
    wait_for(
        "fence-lab started again",
        Duration::from_secs(60),
        Duration::from_millis(500),
        || {
            lab.status(1)
                .ok()?
                .resource("fence-lab")
                .filter(|r| r.active && r.role == "Started")
                .map(|_| ())
        },
    )
    .unwrap();
    restored(&lab);

    // The shared storage not mounted on a host that does not run vm1 (an empty directory over it, in that
    // host's own mount namespace only).
    let blind = lab.other_host(vm_host).unwrap();
    let blind_name = lab.cfg.host_name(blind);
    let shared = lab.cfg.shared_dir();
    let shared = shared.to_str().unwrap();
    lab.exec_ok(
        blind,
        &[
            "sh",
            "-c",
            &format!("mkdir -p /run/empty-shared && mount --bind /run/empty-shared {shared}"),
        ],
    )
    .unwrap();
    let (rc, report) = until(&lab, 1, "shared storage red", |r| red(r, "shared-storage"));
    assert_red(
        rc,
        &report,
        "shared-storage",
        &[&format!("{blind_name} cannot see {shared}/vm1.xml (VM vm1)")],
        &["mount the shared storage"],
    );
    lab.exec_ok(blind, &["umount", shared]).unwrap();
    restored(&lab);

    // The package's ordering of a host shutdown removed from node1 (its pacemaker.service is Debian's
    // again): red there, naming the units Pacemaker would stop in parallel with and the drop-in to install.
    let drop_in = vmha_lab::lab::SHUTDOWN_ORDER_DROP_IN;
    lab.exec_ok(1, &["cp", drop_in, "/run/shutdown-order.conf"]).unwrap();
    lab.exec_ok(1, &["rm", drop_in]).unwrap();
    let (rc, report) = until(&lab, 1, "shutdown-order red (no drop-in)", |r| red(r, "shutdown-order"));
    assert_red(
        rc,
        &report,
        "shutdown-order",
        &["is not ordered After=", "libvirtd.service", "libvirt-guests.service"],
        &[drop_in, "systemctl edit pacemaker.service"],
    );
    lab.exec_ok(1, &["cp", "/run/shutdown-order.conf", drop_in]).unwrap();
    restored(&lab);

    // node3 with a relay key of its own (`vmha keygen --force` there): red, saying where to copy it from.
    lab.exec_ok(3, &["vmha", "keygen", "--force"]).unwrap();
    lab.stop_vmhad(3).unwrap();
    lab.start_vmhad(3).unwrap();
    let (rc, report) = until(&lab, 1, "relay-authkey red (node3's key differs)", |r| {
        red(r, "relay-authkey")
    });
    assert_red(
        rc,
        &report,
        "relay-authkey",
        &["node3 has a different key (fingerprint"],
        &["copy /etc/vmha/authkey from node1 to node3 (root, mode 0600) and restart vmhad there"],
    );
    lab.install_authkey(3).unwrap();
    lab.stop_vmhad(3).unwrap();
    lab.start_vmhad(3).unwrap();
    restored(&lab);

    // vmhad stopped on node3: named, from any host that still runs it.
    lab.stop_vmhad(3).unwrap();
    let (rc, report) = until(&lab, 1, "vmhad red (node3)", |r| red(r, "vmhad"));
    assert_red(
        rc,
        &report,
        "vmhad",
        &["vmhad is not running on node3"],
        &["start vmhad on node3"],
    );
    // Without node3's vmhad nothing is known of its storage and clock: said, not guessed.
    for name in ["shared-storage", "time-sync"] {
        let x = item(&report, name);
        assert_eq!(x["level"], "yellow", "{x}");
        assert!(x["summary"].as_str().unwrap().contains("no report from node3"), "{x}");
    }
    // On node3 itself, a vmha call starts vmhad again through D-Bus activation (the package's
    // /usr/share/dbus-1/system-services/org.vmha.Vmha1.service; the lab has no systemd, so the host's
    // dbus-daemon runs its Exec=/usr/sbin/vmhad): vmha check there turns all green on its own.
    let (rc, _) = until(&lab, 3, "node3's vmhad activated by D-Bus, all green there", all_green);
    assert_eq!(rc, 0);
    restored(&lab);
}
