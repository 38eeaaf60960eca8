//! A running VM live-migrates to another host through Pacemaker (`pcs resource move`), under both
//! `ocf:heartbeat:VirtualDomain` and vmha's `ocf:vmha:VirtualMachine`: the guest keeps running (its uptime
//! goes on), exactly one QEMU is left, on the target, and no move constraint stays behind.

use std::time::Duration;

use vmha_e2e::{guest_uptime, leftover_move_constraints, wait_running, Timeline, POLL};
use vmha_lab::guest::GuestSpec;
use vmha_lab::lab::VmAgent;
use vmha_lab::wait_for;

#[test]
#[ignore = "lab scenario: needs root and the lab's daemons (run ci/test)"]
fn running_vms_live_migrate_without_reboot_and_leave_one_qemu() {
    let lab = vmha_e2e::lab();
    for (vm, agent) in [("vd1", VmAgent::VirtualDomain), ("vm1", VmAgent::Vmha)] {
        lab.add_vm(&GuestSpec::new(vm), agent).unwrap();
        let from = wait_running(&lab, vm, Duration::from_secs(120));
        let up_before = wait_for("the guest agent to answer", Duration::from_secs(60), POLL, || {
            guest_uptime(&lab, from, vm).ok()
        })
        .unwrap();
        let to = lab.other_host(from).unwrap();
        let mut t = Timeline::start();
        lab.exec_ok(1, &["pcs", "resource", "move", vm, &lab.cfg.host_name(to)])
            .unwrap();
        let landed = wait_for(&format!("{vm} on node{to}"), Duration::from_secs(120), POLL, || {
            // During a live migration the target's QEMU waits for the incoming state: two processes, one running.
            let qemus = lab.qemu_processes(vm);
            assert!(qemus.len() <= 2, "{vm}: {qemus:?}");
            let s = lab.status_from_any().ok()?;
            let n = lab.cfg.host_number(s.running_on(vm)?)?;
            (n == to && qemus.len() == 1 && qemus[0].0 == to).then_some(n)
        })
        .unwrap();
        t.mark("running on the target, one QEMU");
        assert_eq!(landed, to);
        let up_after = guest_uptime(&lab, to, vm).unwrap();
        assert!(
            up_after > up_before,
            "{vm} was rebooted, not migrated: uptime {up_before} s before, {up_after} s after"
        );
        assert_eq!(
            leftover_move_constraints(&lab, 1),
            Vec::<String>::new(),
            "pcs resource move leaves no constraint"
        );
        t.print(&format!(
            "{vm} ({agent:?}) node{from} -> node{to}, guest uptime {up_before:.1} s -> {up_after:.1} s:"
        ));
    }
}
