//! A graceful shutdown of a host moves its VMs away alive: the lab does what systemd does with vmha's
//! shipped ordering (pacemaker.service.d/50-vmha-shutdown-order.conf, vmhad.service `Before=pacemaker`):
//! Pacemaker stops first, then vmhad, libvirtd and Corosync ([`vmha_lab::Lab::shutdown_host`]). Two VMs
//! under `ocf:vmha:VirtualMachine` run on the host, one with a qcow2 disk on the shared directory
//! (`shared_storage=true`, `cache='none'`); after the shutdown each runs on another host with its guest's
//! uptime going on (live-migrated, never restarted), exactly once, and nothing was fenced: the host left
//! the cluster cleanly. `vmha check` on the host before the shutdown reports the ordering green (the lab
//! installs the drop-in with the build).

use std::path::Path;
use std::time::Duration;

use vmha_e2e::{guest_uptime, lab_with_vmhad, wait_running, Timeline, POLL};
use vmha_lab::guest::GuestSpec;
use vmha_lab::lab::VmAgent;
use vmha_lab::wait_for;

#[test]
#[ignore = "lab scenario: needs root and the lab's daemons (run ci/test)"]
fn host_shutdown_moves_its_vms_away_alive() {
    let lab = lab_with_vmhad();
    let dc = lab.status_from_any().unwrap().dc.unwrap();
    // The host to shut down: not the DC (a DC leaving adds an election, tested elsewhere).
    let victim = lab.cfg.host_numbers().find(|&n| lab.cfg.host_name(n) != dc).unwrap();
    let victim_name = lab.cfg.host_name(victim);
    let shared = lab.cfg.shared_dir();
    let disk = shared.join("sd1.vda.qcow2");
    vmha_lab::guest::disk_on_base(&shared.join("base.qcow2"), &disk, "64M").unwrap();
    let vms = [
        (
            GuestSpec::new("sd1").with_disk(Path::new(&disk), "none"),
            vec!["shared_storage=true"],
        ),
        (GuestSpec::new("sd2"), vec![]),
    ];
    // The VMs start on the victim (the other hosts stand by meanwhile) and stay there (resource stickiness).
    let others: Vec<String> = lab
        .cfg
        .host_numbers()
        .filter(|&n| n != victim)
        .map(|n| lab.cfg.host_name(n))
        .collect();
    for other in &others {
        lab.exec_ok(victim, &["pcs", "node", "standby", other]).unwrap();
    }
    for (spec, params) in &vms {
        lab.add_vm_with(spec, VmAgent::Vmha, params).unwrap();
    }

    // `vmha check` exits 1 when any item is red: only this item matters here.
    let out = lab.exec(victim, &["vmha", "--output", "json", "check"]).unwrap();
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let order = report["findings"]
        .as_array()
        .and_then(|f| f.iter().find(|x| x["item"] == "shutdown-order"))
        .cloned()
        .unwrap_or_else(|| panic!("no shutdown-order item: {report}"));
    assert_eq!(order["level"], "green", "{order}");

    let mut before = Vec::new();
    for (spec, _) in &vms {
        let n = wait_running(&lab, &spec.name, Duration::from_secs(120));
        assert_eq!(n, victim, "{} runs on the host to shut down", spec.name);
        let up = wait_for("the guest agent to answer", Duration::from_secs(60), POLL, || {
            guest_uptime(&lab, n, &spec.name).ok()
        })
        .unwrap();
        before.push(up);
    }
    for other in &others {
        lab.exec_ok(victim, &["pcs", "node", "unstandby", other]).unwrap();
    }
    wait_for(
        "every host online, none standing by",
        Duration::from_secs(60),
        POLL,
        || {
            let s = lab.status_from_any().ok()?;
            (s.online_nodes().len() == 3 && s.nodes.iter().all(|n| !n.standby)).then_some(())
        },
    )
    .unwrap();
    for (spec, _) in &vms {
        let n = wait_running(&lab, &spec.name, Duration::from_secs(10));
        assert_eq!(n, victim, "{} stays on {victim_name}", spec.name);
    }
    let fences_before = lab.power_events().len();

    let mut t = Timeline::start();
    lab.shutdown_host(victim, Duration::from_secs(240)).unwrap();
    t.mark(&format!("{victim_name} shut down"));
    for ((spec, _), up_before) in vms.iter().zip(&before) {
        let vm = &spec.name;
        let now = wait_for(
            &format!("{vm} running elsewhere"),
            Duration::from_secs(60),
            POLL,
            || {
                let qemus = lab.qemu_processes(vm);
                assert!(qemus.len() <= 1, "{vm} runs {} times: {qemus:?}", qemus.len());
                let s = lab.status_from_any().ok()?;
                let n = lab.cfg.host_number(s.running_on(vm)?)?;
                (n != victim && qemus.len() == 1 && qemus[0].0 == n).then_some(n)
            },
        )
        .unwrap();
        let up_after = guest_uptime(&lab, now, vm).unwrap();
        assert!(
            up_after > *up_before,
            "{vm} was restarted, not live-migrated: uptime {up_before} s before, {up_after} s after"
        );
        println!("{vm}: node{victim} -> node{now}, guest uptime {up_before:.1} s -> {up_after:.1} s");
    }
    t.mark("every VM running elsewhere, uptime going on");
    assert_eq!(
        lab.power_events().len(),
        fences_before,
        "a graceful shutdown fences nothing: {:?}",
        lab.power_events()
    );
    let s = lab.status_from_any().unwrap();
    assert!(
        !s.online_nodes().contains(&victim_name.as_str()),
        "{victim_name} left the cluster: {:?}",
        s.online_nodes()
    );
    // Pacemaker's log on the host shows the migrations it took part in (migrate_to), not stops.
    let log = std::fs::read_to_string(lab.cfg.host_dir(victim).join("var-log-pacemaker/pacemaker.log")).unwrap();
    for (spec, _) in &vms {
        assert!(
            log.lines().any(
                |l| l.contains(&format!("Result of migrate_to operation for {} ", spec.name)) && l.contains(": ok")
            ),
            "no successful migrate_to of {} in {victim_name}'s Pacemaker log",
            spec.name
        );
    }
    t.print(&format!("graceful shutdown of {victim_name}:"));
}
