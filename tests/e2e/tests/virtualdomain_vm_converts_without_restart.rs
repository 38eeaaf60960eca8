//! A VM run by `ocf:heartbeat:VirtualDomain` moves to `ocf:vmha:VirtualMachine` while it runs, following
//! `docs/migrating-from-virtualdomain.md` step by step (pcs and cibadmin): unmanage, change the agent in
//! place (same resource id), refresh, manage. The same QEMU process runs the guest throughout, its uptime
//! continues, Pacemaker records no failure, and the converted VM then live-migrates with vmha.

use std::time::Duration;

use vmha_e2e::{guest_uptime, lab_with_vmhad, vmha_run, vmha_vm, wait_running, POLL};
use vmha_lab::guest::GuestSpec;
use vmha_lab::lab::VmAgent;
use vmha_lab::wait_for;

#[test]
#[ignore = "lab scenario: needs root and the lab's daemons (run ci/test)"]
fn a_running_virtualdomain_vm_converts_to_vmha_without_a_restart() {
    let lab = lab_with_vmhad();
    lab.add_vm(&GuestSpec::new("vm1"), VmAgent::VirtualDomain).unwrap();
    let host = wait_running(&lab, "vm1", Duration::from_secs(120));
    assert_eq!(
        lab.status(1).unwrap().resource("vm1").unwrap().agent,
        "ocf:heartbeat:VirtualDomain"
    );
    let before = lab.qemu_processes("vm1");
    assert_eq!(before.len(), 1, "{before:?}");
    let uptime_before = wait_for("vm1's guest to answer", Duration::from_secs(120), POLL, || {
        guest_uptime(&lab, host, "vm1").ok()
    })
    .unwrap();

    // The guide's procedure, with pcs.
    lab.exec_ok(1, &["pcs", "resource", "unmanage", "vm1"]).unwrap();
    let primitive = lab
        .exec_ok(1, &["cibadmin", "--query", "--xpath", "//primitive[@id='vm1']"])
        .unwrap();
    // The guide's sed: the first line (the <primitive> element) names the agent, in any attribute order.
    let (first, rest) = primitive.split_once('\n').unwrap();
    assert!(
        first.contains("provider=\"heartbeat\"") && first.contains("type=\"VirtualDomain\""),
        "{first}"
    );
    let first = first
        .replacen("provider=\"heartbeat\"", "provider=\"vmha\"", 1)
        .replacen("type=\"VirtualDomain\"", "type=\"VirtualMachine\"", 1);
    let converted = format!("{first}\n{rest}");
    let file = lab.cfg.shared_dir().join("vm1-primitive.xml");
    std::fs::write(&file, &converted).unwrap();
    lab.exec_ok(
        1,
        &[
            "cibadmin",
            "--replace",
            "--xpath",
            "//primitive[@id='vm1']",
            "--xml-file",
            file.to_str().unwrap(),
        ],
    )
    .unwrap();
    lab.exec_ok(1, &["crm_resource", "--refresh", "--resource", "vm1"])
        .unwrap();
    wait_for(
        "Pacemaker to see vm1 started by the vmha agent where it ran",
        Duration::from_secs(60),
        POLL,
        || {
            let s = lab.status(1).ok()?;
            let r = s.resource("vm1")?;
            (r.agent == "ocf:vmha:VirtualMachine" && r.active && r.nodes == [lab.cfg.host_name(host)] && !r.failed)
                .then_some(())
        },
    )
    .unwrap();
    lab.exec_ok(1, &["pcs", "resource", "manage", "vm1"]).unwrap();

    // Managed again: its monitor (the vmha agent's) succeeds on the same host.
    wait_for(
        "vm1's monitor by the vmha agent to succeed",
        Duration::from_secs(60),
        POLL,
        || {
            let cib = lab.exec_ok(1, &["cibadmin", "--query", "--scope", "status"]).ok()?;
            cib.lines()
                .any(|l| l.contains("operation_key=\"vm1_monitor_10000\"") && l.contains("rc-code=\"0\""))
                .then_some(())
        },
    )
    .unwrap();
    let crm_mon = lab.exec_ok(1, &["crm_mon", "-1", "-r"]).unwrap();
    assert!(!crm_mon.contains("Failed Resource Actions"), "{crm_mon}");
    assert!(!crm_mon.contains("unmanaged"), "{crm_mon}");
    assert_eq!(
        lab.qemu_processes("vm1"),
        before,
        "the same QEMU process runs vm1: it was never stopped"
    );
    let uptime_after = guest_uptime(&lab, host, "vm1").unwrap();
    assert!(
        uptime_after > uptime_before,
        "the guest's uptime continues ({uptime_before:.1} s, then {uptime_after:.1} s): no reboot"
    );
    let shown = wait_for("vmhad to show the new agent", Duration::from_secs(10), POLL, || {
        vmha_vm(&lab, 1, "vm1")
            .ok()
            .filter(|v| v.agent == "ocf:vmha:VirtualMachine")
    })
    .unwrap();
    assert_eq!(shown.state, "running");

    // The converted VM live-migrates with vmha: a new QEMU on the target, the guest's uptime going on.
    let to = lab.other_host(host).unwrap();
    let (code, _, err) = vmha_run(&lab, 1, &["vm", "move", "vm1", &lab.cfg.host_name(to)]);
    assert_eq!(code, 0, "vmha vm move: {err}");
    let now_on = wait_running(&lab, "vm1", Duration::from_secs(120));
    assert_eq!(now_on, to);
    let moved = lab.qemu_processes("vm1");
    assert_eq!(moved.len(), 1, "{moved:?}");
    assert_eq!(moved[0].0, to);
    let uptime_moved = guest_uptime(&lab, to, "vm1").unwrap();
    assert!(
        uptime_moved > uptime_after,
        "live migration keeps the guest running ({uptime_after:.1} s, then {uptime_moved:.1} s)"
    );
}
