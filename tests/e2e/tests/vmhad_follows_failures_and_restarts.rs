//! vmhad follows the cluster through failures: a new DC reaches every surviving host's bus within 2 s of
//! Pacemaker electing it; a VM whose QEMU dies is reported to Pacemaker at once (recovery starts in
//! under a second instead of at the next monitor); and vmhad rides out restarts of Pacemaker, libvirtd
//! and itself without disturbing running VMs.
//! (Corosync restarts are covered too: the host's vmhad rejoins the vmhad process group.)

use std::time::Duration;

use vmha_e2e::{vmha_as_nobody, vmha_run, vmha_status, vmha_vm, wait_running, Timeline, POLL};
use vmha_lab::guest::GuestSpec;
use vmha_lab::lab::VmAgent;
use vmha_lab::{power, wait_for, Lab};

/// Starts `vmha watch --output json` on host `n`, writing events to /var/log/vmha/watch.json.
fn start_watch(lab: &Lab, n: u8) {
    lab.exec_ok(
        n,
        &[
            "sh",
            "-c",
            "setsid vmha watch --output json > /var/log/vmha/watch.json 2>&1 < /dev/null &",
        ],
    )
    .unwrap();
}

/// Events `vmha watch` printed on host `n`.
fn watched(lab: &Lab, n: u8) -> Vec<serde_json::Value> {
    vmha_e2e::json_lines(&lab.cfg.host_dir(n).join("var-log-vmha/watch.json"))
}

fn qemu_pid(lab: &Lab, vm: &str) -> i32 {
    let q = lab.qemu_processes(vm);
    assert_eq!(q.len(), 1, "{q:?}");
    q[0].1
}

#[test]
#[ignore = "lab scenario: needs root and the lab's daemons (run ci/test)"]
fn vmhad_reports_dc_changes_and_vm_failures_fast_and_survives_restarts() {
    let lab = vmha_e2e::lab_with_vmhad();
    lab.add_vm(&GuestSpec::new("vm1"), VmAgent::Vmha).unwrap();
    let vm_host = wait_running(&lab, "vm1", Duration::from_secs(120));

    // 1. Fast failure reporting: kill the VM's QEMU behind everyone's back.
    let killed = qemu_pid(&lab, "vm1");
    let mut t = Timeline::start();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(killed), nix::sys::signal::Signal::SIGKILL).unwrap();
    wait_for(
        "Pacemaker to record vm1's failure",
        Duration::from_secs(30),
        Duration::from_millis(50),
        || {
            let cib = lab.exec_ok(1, &["cibadmin", "--query", "--scope", "status"]).ok()?;
            cib.contains("fail-count-vm1").then_some(())
        },
    )
    .unwrap();
    let reported = t.mark("failure recorded by Pacemaker (recovery starts)");
    wait_for("vm1 running again", Duration::from_secs(60), POLL, || {
        let q = lab.qemu_processes("vm1");
        (q.len() == 1 && q[0].1 != killed && lab.status(1).ok()?.running_on("vm1").is_some()).then_some(())
    })
    .unwrap();
    t.mark("vm1 running again");
    t.print("vm1's QEMU killed (monitor interval 10 s: Pacemaker alone would notice after up to 10 s):");
    assert!(
        reported < Duration::from_secs(1),
        "recovery started {reported:?} after the kill (goal under 1 s)"
    );

    // 1b. Cleanup (the counterpart of `pcs resource cleanup`): vmha shows the failure; a non-root caller
    //     is refused and changes nothing; `vmha vm cleanup` clears the fail count in Pacemaker (attrd's
    //     transient attributes in the CIB status section) and in vmha's view, without touching the VM.
    let counts = wait_for("vmha to show vm1's fail count", Duration::from_secs(30), POLL, || {
        let c = vmha_vm(&lab, 1, "vm1").ok()?.fail_counts;
        c.values().any(|&n| n > 0).then_some(c)
    })
    .unwrap();
    println!("vm1's fail counts before cleanup: {counts:?}");
    let status_has = |what: &str| {
        lab.exec_ok(1, &["cibadmin", "--query", "--scope", "status"])
            .unwrap()
            .contains(what)
    };
    let (rc, _, err) = vmha_as_nobody(&lab, 2, &["vm", "cleanup", "vm1"]);
    assert_eq!(
        rc, 4,
        "cleanup by nobody must be refused as AccessDenied (exit status 4): {err}"
    );
    assert!(err.contains("not root") && err.contains("polkit"), "{err}");
    assert!(status_has("fail-count-vm1"), "the refused cleanup changed nothing");
    let (rc, _, err) = vmha_run(&lab, 2, &["vm", "cleanup", "vm1", "--host", "node9"]);
    assert_eq!(
        rc, 6,
        "an unknown host is refused as UnknownHost (vmha's exit status 6): {err}"
    );
    assert!(err.contains("node9 is not a cluster host"), "{err}");
    assert!(status_has("fail-count-vm1"), "the refused cleanup changed nothing");
    let qemu_running = qemu_pid(&lab, "vm1");
    let (rc, out, err) = vmha_run(&lab, 2, &["vm", "cleanup", "vm1"]);
    assert_eq!(rc, 0, "vmha vm cleanup vm1: {out} {err}");
    assert!(out.contains("fail counts cleared on every host"), "{out}");
    wait_for(
        "Pacemaker to drop vm1's fail count and failure history",
        Duration::from_secs(30),
        POLL,
        || {
            let cib = lab.exec_ok(1, &["cibadmin", "--query", "--scope", "status"]).ok()?;
            (!cib.contains("fail-count-vm1") && !cib.contains("last-failure-vm1") && !cib.contains("vm1_last_failure"))
                .then_some(())
        },
    )
    .unwrap();
    wait_for(
        "vmha's view without vm1's failures",
        Duration::from_secs(10),
        POLL,
        || {
            let v = vmha_vm(&lab, 1, "vm1").ok()?;
            (v.fail_counts.is_empty() && v.failed_on.is_empty()).then_some(())
        },
    )
    .unwrap();
    let crm_mon = lab.exec_ok(1, &["crm_mon", "-1"]).unwrap();
    assert!(!crm_mon.contains("Failed Resource Actions"), "{crm_mon}");
    wait_running(&lab, "vm1", Duration::from_secs(60));
    assert_eq!(
        qemu_pid(&lab, "vm1"),
        qemu_running,
        "the cleanup's probe left the VM alone"
    );

    // 2. vmhad restarts itself: running VMs are not disturbed.
    let vm_host = lab
        .cfg
        .host_number(lab.status(1).unwrap().running_on("vm1").unwrap())
        .unwrap_or(vm_host);
    let qemu_before = qemu_pid(&lab, "vm1");
    for n in lab.cfg.host_numbers() {
        lab.stop_vmhad(n).unwrap();
        lab.start_vmhad(n).unwrap();
    }
    wait_for("vmhad back with vm1", Duration::from_secs(30), POLL, || {
        (vmha_vm(&lab, vm_host, "vm1").ok()?.state == "running").then_some(())
    })
    .unwrap();
    assert_eq!(
        qemu_pid(&lab, "vm1"),
        qemu_before,
        "restarting vmhad did not touch the VM"
    );

    // 3. libvirtd restarts on the VM's host: vmhad survives, the VM keeps running.
    let vmhad_pid = lab.exec_ok(vm_host, &["cat", "/run/vmhad.pid"]).unwrap();
    lab.exec_ok(vm_host, &["sh", "-c", "kill $(cat /run/libvirtd.pid); while [ -e /run/libvirtd.pid ] && kill -0 $(cat /run/libvirtd.pid) 2>/dev/null; do sleep 0.1; done; libvirtd -d --listen"]).unwrap();
    wait_for("libvirtd back", Duration::from_secs(30), POLL, || {
        lab.exec(vm_host, &["virsh", "-c", "qemu:///system", "domstate", "vm1"])
            .ok()
            .filter(|o| o.status.success())
    })
    .unwrap();
    assert_eq!(qemu_pid(&lab, "vm1"), qemu_before);
    assert_eq!(lab.exec_ok(vm_host, &["cat", "/run/vmhad.pid"]).unwrap(), vmhad_pid);
    assert!(
        lab.exec(vm_host, &["sh", "-c", "kill -0 $(cat /run/vmhad.pid)"])
            .unwrap()
            .status
            .success(),
        "vmhad survived"
    );

    // 4. Pacemaker and Corosync restart on a host without VMs: that host's vmhad loses both, says so,
    //    and catches up; every vmhad sees it leave and rejoin the vmhad process group.
    let quiet = lab.cfg.host_numbers().find(|&n| n != vm_host).unwrap();
    let quiet_name = lab.cfg.host_name(quiet);
    let agents = |n: u8| vmha_status(&lab, n).ok().map(|s| s.cluster.agents);
    assert_eq!(
        agents(vm_host),
        Some(vec!["node1".to_string(), "node2".into(), "node3".into()]),
        "vmhad runs on every host"
    );
    lab.exec_ok(
        quiet,
        &[
            "sh",
            "-c",
            "kill $(pgrep -o -x pacemakerd); while pgrep -x pacemakerd > /dev/null; do sleep 0.1; done",
        ],
    )
    .unwrap();
    wait_for("vmhad to report the CIB lost", Duration::from_secs(60), POLL, || {
        (!vmha_status(&lab, quiet).ok()?.cluster.connected).then_some(())
    })
    .unwrap();
    lab.exec_ok(
        quiet,
        &[
            "sh",
            "-c",
            "corosync-cfgtool -H --force; while pgrep -x corosync > /dev/null; do sleep 0.1; done",
        ],
    )
    .unwrap();
    wait_for(
        "the others to see the host's vmhad leave the group",
        Duration::from_secs(60),
        POLL,
        || {
            let a = agents(vm_host)?;
            (!a.iter().any(|h| h == quiet_name.as_str())).then_some(())
        },
    )
    .unwrap();
    lab.exec_ok(quiet, &["sh", "-c", "setsid corosync >> /var/log/corosync/corosync.stdout 2>&1 < /dev/null; for i in $(seq 1 100); do corosync-cfgtool -s > /dev/null 2>&1 && break; sleep 0.1; done"]).unwrap();
    lab.exec_ok(quiet, &["sh", "-c", "PCMK_logfile=/var/log/pacemaker/pacemaker.log PCMK_logfacility=none setsid pacemakerd >> /var/log/pacemaker/pacemakerd.stdout 2>&1 < /dev/null &"]).unwrap();
    wait_for(
        "vmhad to catch up after Corosync's and Pacemaker's restart",
        Duration::from_secs(120),
        POLL,
        || {
            let s = vmha_status(&lab, quiet).ok()?;
            let me = s.hosts.iter().find(|h| h.name == quiet_name)?;
            let all = ["node1", "node2", "node3"];
            (s.cluster.connected && me.state == "online" && s.cluster.agents == all && s.cluster.members == all)
                .then_some(())
        },
    )
    .unwrap();
    assert_eq!(qemu_pid(&lab, "vm1"), qemu_before, "the VM ran on through it all");

    // 5. The DC host dies: every survivor's vmhad publishes the new DC within 2 s of Pacemaker.
    let dc = lab.status(1).unwrap().dc.unwrap();
    let victim = lab.cfg.host_number(&dc).unwrap();
    let survivors: Vec<u8> = lab.cfg.host_numbers().filter(|&n| n != victim).collect();
    for &n in &survivors {
        start_watch(&lab, n);
    }
    for &n in &survivors {
        wait_for(
            &format!("node{n}'s watcher to subscribe"),
            Duration::from_secs(10),
            POLL,
            || watched(&lab, n).iter().any(|e| e["event"] == "watching").then_some(()),
        )
        .unwrap();
    }
    lab.power_off(victim).unwrap();
    let (new_dc, pcmk_time) = wait_for(
        "Pacemaker's new DC",
        Duration::from_secs(60),
        Duration::from_millis(50),
        || {
            let s = lab.status(survivors[0]).ok()?;
            s.dc.filter(|d| *d != dc).map(|d| (d, power::now()))
        },
    )
    .unwrap();
    for &n in &survivors {
        let signal_time = wait_for(&format!("node{n}'s dc event"), Duration::from_secs(10), POLL, || {
            watched(&lab, n)
                .iter()
                .find(|e| e["event"] == "dc" && e["subject"] == new_dc.as_str())
                .and_then(|e| e["time"].as_f64())
        })
        .unwrap();
        let lag = signal_time - pcmk_time;
        println!("node{n}: DC signal {lag:+.2} s after crm_mon first showed the new DC {new_dc}");
        assert!(lag < 2.0, "node{n}'s signal came {lag:.2} s after Pacemaker's new DC");
        let prop = vmha_status(&lab, n).unwrap().cluster.designated_controller;
        assert_eq!(prop.as_deref(), Some(new_dc.as_str()));
    }
}
