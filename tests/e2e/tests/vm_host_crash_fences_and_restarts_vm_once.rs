//! When the host running a VM crashes, the cluster fences it and restarts the VM on another host, and
//! at no moment does the VM run on two hosts.

use std::time::Duration;

use vmha_e2e::{Timeline, POLL};
use vmha_lab::guest::GuestSpec;
use vmha_lab::lab::VmAgent;
use vmha_lab::wait_for;

#[test]
#[ignore = "lab scenario: needs root and the lab's daemons (run ci/test)"]
fn vm_host_crash_is_fenced_and_the_vm_restarts_elsewhere_exactly_once() {
    let lab = vmha_e2e::lab();
    lab.add_vm(&GuestSpec::new("vm1"), VmAgent::VirtualDomain).unwrap();
    let host = wait_for("vm1 running", Duration::from_secs(120), POLL, || {
        let s = lab.status(1).ok()?;
        let h = s.running_on("vm1")?.to_string();
        let qemus = lab.qemu_processes("vm1");
        let n = lab.cfg.host_number(&h)?;
        (qemus.len() == 1 && qemus[0].0 == n).then_some(n)
    })
    .unwrap();
    let observer = lab.other_host(host).unwrap();
    let victim = lab.cfg.host_name(host);

    let mut t = Timeline::start();
    let mut max_qemus = 0;
    lab.power_off(host).unwrap();
    t.mark("host powered off");
    let new_host = wait_for("vm1 restarted on another host", Duration::from_secs(120), POLL, || {
        let qemus = lab.qemu_processes("vm1");
        max_qemus = max_qemus.max(qemus.len());
        assert!(qemus.len() <= 1, "vm1 runs {} times at once: {qemus:?}", qemus.len());
        let s = lab.status(observer).ok()?;
        if s.node(&victim).is_some_and(|n| !n.online) {
            t.mark("detected: pacemaker sees the host offline");
        }
        if lab.power_events().iter().any(|e| e.host == victim && e.result == "ok") {
            t.mark("fenced: power controller confirmed");
        }
        let on = s.running_on("vm1")?;
        let n = lab.cfg.host_number(on)?;
        (n != host && qemus.len() == 1 && qemus[0].0 == n).then_some(n)
    })
    .unwrap();
    t.mark("vm1 running on another host");
    assert_ne!(new_host, host);
    assert!(t.get("fenced: power controller confirmed").is_some(), "the dead host was fenced before recovery");
    let fence = lab.power_events().into_iter().find(|e| e.host == victim).unwrap();
    assert!(matches!(fence.action.as_str(), "reboot" | "off"), "fence action {}", fence.action);

    // Stays exactly once while the fenced host comes back and rejoins.
    wait_for("the fenced host to rejoin", Duration::from_secs(120), Duration::from_millis(500), || {
        let qemus = lab.qemu_processes("vm1");
        assert_eq!(qemus.len(), 1, "vm1 QEMU processes after recovery: {qemus:?}");
        (lab.status(observer).ok()?.online_nodes().len() == 3).then_some(())
    })
    .unwrap();
    t.mark("fenced host back online");
    let final_status = lab.status(observer).unwrap();
    assert_eq!(final_status.resource("vm1").unwrap().nodes.len(), 1);
    t.print(&format!("vm1's host {victim} crashed; vm1 now on node{new_host} (max QEMU processes seen at once: {max_qemus}):"));
}
