//! When the host running a VM crashes, the cluster fences it and restarts the VM on another host, and
//! at no moment does the VM run on two hosts.

use vmha_e2e::{fail_vm_host_and_check_recovery, HostFailure};
use vmha_lab::guest::GuestSpec;
use vmha_lab::lab::VmAgent;

#[test]
#[ignore = "lab scenario: needs root and the lab's daemons (run ci/test)"]
fn vm_host_crash_is_fenced_and_the_vm_restarts_elsewhere_exactly_once() {
    let lab = vmha_e2e::lab();
    lab.add_vm(&GuestSpec::new("vm1"), VmAgent::Vmha).unwrap();
    let t = fail_vm_host_and_check_recovery(&lab, "vm1", HostFailure::Crash);
    t.print(&format!(
        "vm1's host crashed (fencing on, token {} ms):",
        vmha_e2e::token_ms()
    ));
}
