//! A VM with a qcow2 disk (an overlay on a base image, both on the lab's shared directory) live-migrates
//! under vmha's `ocf:vmha:VirtualMachine` with `shared_storage=true`: libvirt sees the lab's shared
//! directory as local storage and refuses a plain live migration of such a VM ("Migration without shared
//! storage is unsafe", checked first by hand), so without the parameter Pacemaker would stop and restart the
//! VM. With it (and the disk in `cache='none'`), `pcs resource move` live-migrates the VM: the guest's uptime
//! goes on (the same guest kernel, never rebooted), exactly one QEMU is left, on the target, and what the
//! guest wrote to its disk before the move is read back from the disk (page cache dropped) after it; the
//! guest also writes on the target and reads both back.

use std::path::Path;
use std::time::Duration;

use vmha_e2e::{guest_exec, guest_uptime, lab_with_vmhad, leftover_move_constraints, wait_running, Timeline, POLL};
use vmha_lab::guest::GuestSpec;
use vmha_lab::lab::VmAgent;
use vmha_lab::{wait_for, Lab};

const VM: &str = "disk1";

/// Writes `text` into sector `sector` of the guest's /dev/vda (zero-padded, synced to the disk).
fn write_sector(lab: &Lab, n: u8, sector: u32, text: &str) {
    let script = format!(
        "printf '%s' '{text}' > /tmp/sector && dd if=/tmp/sector of=/dev/vda bs=512 count=1 seek={sector} conv=sync,fsync 2>&1"
    );
    let out = guest_exec(lab, n, VM, "/bin/sh", &["-c", &script], Duration::from_secs(30)).unwrap();
    assert!(out.contains("1+0 records out"), "dd into /dev/vda: {out}");
}

/// Reads sector `sector` of the guest's /dev/vda from the disk (the guest's page cache dropped first).
fn read_sector(lab: &Lab, n: u8, sector: u32) -> String {
    let script = format!(
        "sync; echo 3 > /proc/sys/vm/drop_caches; dd if=/dev/vda bs=512 count=1 skip={sector} 2>/dev/null | tr -d '\\000'"
    );
    guest_exec(lab, n, VM, "/bin/sh", &["-c", &script], Duration::from_secs(30)).unwrap()
}

#[test]
#[ignore = "lab scenario: needs root and the lab's daemons (run ci/test)"]
fn vm_with_qcow2_disk_live_migrates_with_shared_storage() {
    let lab = lab_with_vmhad();
    let shared = lab.cfg.shared_dir();
    let disk = shared.join(format!("{VM}.vda.qcow2"));
    vmha_lab::guest::disk_on_base(&shared.join("base.qcow2"), &disk, "64M").unwrap();
    let spec = GuestSpec::new(VM).with_disk(Path::new(&disk), "none");
    lab.add_vm_with(&spec, VmAgent::Vmha, &["shared_storage=true"]).unwrap();
    let from = wait_running(&lab, VM, Duration::from_secs(120));
    let to = lab.other_host(from).unwrap();
    let up_before = wait_for("the guest agent to answer", Duration::from_secs(60), POLL, || {
        guest_uptime(&lab, from, VM).ok()
    })
    .unwrap();
    let lsblk = guest_exec(
        &lab,
        from,
        VM,
        "/bin/cat",
        &["/sys/block/vda/size"],
        Duration::from_secs(10),
    )
    .unwrap();
    assert_eq!(lsblk.trim(), "131072", "the guest sees its 64 MiB disk as /dev/vda");
    let before = format!("written on node{from} at uptime {up_before}");
    write_sector(&lab, from, 2048, &before);

    // libvirt itself refuses to live-migrate this VM: the lab's shared directory is local storage to it.
    let refused = lab
        .exec(
            from,
            &[
                "virsh",
                "-c",
                "qemu:///system",
                "migrate",
                "--live",
                "--p2p",
                VM,
                &format!("qemu+tcp://{}/system", lab.cfg.host_name(to)),
            ],
        )
        .unwrap();
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "libvirt migrated a disk it sees as local");
    assert!(err.contains("unsafe"), "libvirt's refusal: {err}");
    let qemus = lab.qemu_processes(VM);
    assert!(
        qemus.len() == 1 && qemus[0].0 == from,
        "the VM still runs once, on node{from}: {qemus:?}"
    );

    let mut t = Timeline::start();
    lab.exec_ok(1, &["pcs", "resource", "move", VM, &lab.cfg.host_name(to)])
        .unwrap();
    wait_for(&format!("{VM} on node{to}"), Duration::from_secs(120), POLL, || {
        let qemus = lab.qemu_processes(VM);
        assert!(qemus.len() <= 2, "{VM}: {qemus:?}");
        let s = lab.status_from_any().ok()?;
        let n = lab.cfg.host_number(s.running_on(VM)?)?;
        (n == to && qemus.len() == 1 && qemus[0].0 == to).then_some(())
    })
    .unwrap();
    t.mark("running on the target, one QEMU");
    let up_after = guest_uptime(&lab, to, VM).unwrap();
    assert!(
        up_after > up_before,
        "{VM} was restarted, not live-migrated: uptime {up_before} s before, {up_after} s after"
    );
    assert_eq!(read_sector(&lab, to, 2048), before, "the disk after the move");
    let after = format!("written on node{to} at uptime {up_after}");
    write_sector(&lab, to, 4096, &after);
    assert_eq!(read_sector(&lab, to, 4096), after);
    assert_eq!(read_sector(&lab, to, 2048), before);
    // The migration was Pacemaker's: no failure left on the resource (a refused migrate_to would be one).
    let failures = lab.exec_ok(1, &["crm_mon", "--one-shot", "--failcounts"]).unwrap();
    assert!(
        !failures.lines().any(|l| l.contains(VM) && l.contains("fail-count")),
        "{failures}"
    );
    assert_eq!(leftover_move_constraints(&lab, 1), Vec::<String>::new());
    t.print(&format!(
        "{VM} (qcow2 overlay, cache=none, shared_storage=true) node{from} -> node{to}, guest uptime {up_before:.1} s -> {up_after:.1} s:"
    ));
}
