//! Pacemaker runs VMs through vmha's agent: start, monitor, stop (disable/enable), and recovery when the
//! VM's QEMU process dies outside Pacemaker's control.

use std::time::Duration;

use vmha_e2e::{wait_running, Timeline, POLL};
use vmha_lab::guest::GuestSpec;
use vmha_lab::lab::VmAgent;
use vmha_lab::wait_for;

#[test]
#[ignore = "lab scenario: needs root and the lab's daemons (run ci/test)"]
fn pacemaker_starts_monitors_stops_and_recovers_vms_through_the_vmha_agent() {
    let lab = vmha_e2e::lab();
    lab.add_vm(&GuestSpec::new("vm1"), VmAgent::Vmha).unwrap();
    let host = wait_running(&lab, "vm1", Duration::from_secs(120));
    let agent = lab.status(1).unwrap().resource("vm1").unwrap().agent.clone();
    assert_eq!(agent, "ocf:vmha:VirtualMachine");

    // The recurring monitor runs and reports success.
    wait_for(
        "vm1's recurring monitor to succeed",
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

    // Stop: the domain is gone from every host; start again.
    lab.exec_ok(1, &["pcs", "resource", "disable", "vm1"]).unwrap();
    wait_for("vm1 stopped everywhere", Duration::from_secs(180), POLL, || {
        let s = lab.status(1).ok()?;
        let r = s.resource("vm1")?;
        (!r.active && lab.qemu_processes("vm1").is_empty()).then_some(())
    })
    .unwrap();
    let listed = lab
        .exec_ok(host, &["virsh", "-c", "qemu:///system", "list", "--all", "--name"])
        .unwrap();
    assert!(
        !listed.lines().any(|l| l.trim() == "vm1"),
        "a stopped VM leaves no domain behind on node{host}"
    );
    lab.exec_ok(1, &["pcs", "resource", "enable", "vm1"]).unwrap();
    let host = wait_running(&lab, "vm1", Duration::from_secs(120));

    // Kill the VM's QEMU behind Pacemaker's back: the monitor notices and Pacemaker recovers the VM.
    let qemus = lab.qemu_processes("vm1");
    assert_eq!(qemus.len(), 1);
    let killed = qemus[0].1;
    let mut t = Timeline::start();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(killed), nix::sys::signal::Signal::SIGKILL).unwrap();
    let recovered_on = wait_for("vm1 recovered with a new QEMU", Duration::from_secs(120), POLL, || {
        let qemus = lab.qemu_processes("vm1");
        assert!(qemus.len() <= 1, "{qemus:?}");
        if qemus.is_empty() {
            t.mark("QEMU gone");
        }
        let s = lab.status(1).ok()?;
        let n = lab.cfg.host_number(s.running_on("vm1")?)?;
        (qemus.len() == 1 && qemus[0].1 != killed && qemus[0].0 == n).then_some(n)
    })
    .unwrap();
    t.mark("vm1 running again");
    let failures = lab
        .exec_ok(
            1,
            &[
                "crm_failcount",
                "--query",
                "--resource",
                "vm1",
                "--node",
                &lab.cfg.host_name(host),
            ],
        )
        .unwrap();
    assert!(!failures.contains("value=0"), "the failure was counted: {failures}");
    t.print(&format!(
        "vm1's QEMU killed on node{host}; recovered on node{recovered_on} (Pacemaker alone: waits for the 10 s monitor):"
    ));
}
