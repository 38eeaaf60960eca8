//! With the shipped polkit rule (`packaging/polkit/60-vmha.rules`, installed into every lab host with the
//! build; polkitd runs on every host's own system bus), a non-root member of group haclient (alice) moves,
//! stops and starts a VM through `vmha` and Pacemaker does it; a user outside the group (bob) is refused
//! with AccessDenied naming the polkit action, also when he lets polkit interact, and nothing changes; both
//! read the cluster, its VMs and the hosts' readiness reports (the Readiness interface the bus policy
//! used to forget).

use std::time::{Duration, Instant};

use vmha_e2e::{wait_running, POLL};
use vmha_lab::guest::GuestSpec;
use vmha_lab::{wait_for, Lab};

/// The host whose vmhad alice and bob call (users are local to a host; each vmhad asks its own polkit).
const N: u8 = 2;

/// Runs `args` on host N as `user` (uid, gid and supplementary groups from the host's /etc): (exit code,
/// stdout, stderr).
fn as_user(lab: &Lab, user: &str, args: &[&str]) -> (i32, String, String) {
    let ids = [format!("--reuid={user}"), format!("--regid={user}")];
    let mut all = vec!["setpriv", &ids[0], &ids[1], "--init-groups", "--"];
    all.extend_from_slice(args);
    let out = lab.exec(N, &all).unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `vmha --timeout 180 ARGS` as `user` on host N.
fn vmha_as(lab: &Lab, user: &str, args: &[&str]) -> (i32, String, String) {
    let mut all = vec!["vmha", "--timeout", "180"];
    all.extend_from_slice(args);
    as_user(lab, user, &all)
}

/// What a refused user must not be able to change: the resources and constraints in the CIB.
fn cib_config(lab: &Lab) -> String {
    ["resources", "constraints"]
        .iter()
        .map(|scope| lab.exec_ok(1, &["cibadmin", "--query", "--scope", scope]).unwrap())
        .collect()
}

/// Pacemaker shows `vm` stopped (not active anywhere) and no QEMU runs it.
fn wait_stopped(lab: &Lab, vm: &str) {
    wait_for(&format!("{vm} stopped"), Duration::from_secs(60), POLL, || {
        let s = lab.status_from_any().ok()?;
        let r = s.resource(vm)?;
        (!r.active && r.nodes.is_empty() && lab.qemu_processes(vm).is_empty()).then_some(())
    })
    .unwrap();
}

#[test]
#[ignore = "lab scenario: needs root and the lab's daemons (run ci/test)"]
fn haclient_members_manage_vms_through_polkit_and_others_only_read() {
    let lab = vmha_e2e::lab_with_vmhad();
    for n in lab.cfg.host_numbers() {
        assert!(
            lab.bus_name_has_owner(n, "org.freedesktop.PolicyKit1").unwrap(),
            "polkitd runs on host {n}'s bus"
        );
    }
    lab.exec_ok(
        N,
        &[
            "useradd",
            "--no-create-home",
            "--user-group",
            "--groups",
            "haclient",
            "alice",
        ],
    )
    .unwrap();
    lab.exec_ok(N, &["useradd", "--no-create-home", "--user-group", "bob"])
        .unwrap();
    let (_, groups, _) = as_user(&lab, "alice", &["id", "-nG"]);
    assert!(groups.split_whitespace().any(|g| g == "haclient"), "alice: {groups}");
    let (_, groups, _) = as_user(&lab, "bob", &["id", "-nG"]);
    assert!(!groups.split_whitespace().any(|g| g == "haclient"), "bob: {groups}");

    let xml = lab.write_domain_xml(&GuestSpec::new("vm1")).unwrap();
    lab.exec_ok(1, &["vmha", "vm", "add", "vm1", "--config", xml.to_str().unwrap()])
        .unwrap();
    let from = wait_running(&lab, "vm1", Duration::from_secs(90));

    // Both read: the cluster, the VMs, one VM, and every host's readiness report.
    for user in ["alice", "bob"] {
        let (rc, out, err) = vmha_as(&lab, user, &["--output", "json", "status"]);
        assert_eq!(rc, 0, "{user} reads the status: {err}");
        let status: vmha_api::json::Status = vmha_e2e::parse_document(&out, "status").unwrap();
        assert_eq!(status.cluster.quorate, Some(true), "{user}: {out}");
        let (rc, out, err) = vmha_as(&lab, user, &["--output", "json", "vm", "list"]);
        assert_eq!(rc, 0, "{user} lists the VMs: {err}");
        let list: vmha_api::json::VmList = vmha_e2e::parse_document(&out, "vm_list").unwrap();
        assert!(list.vms.iter().any(|v| v.name == "vm1"), "{user}: {out}");
        let (rc, out, err) = vmha_as(&lab, user, &["--output", "json", "vm", "show", "vm1"]);
        assert_eq!(rc, 0, "{user} shows vm1: {err}");
        let vm: vmha_api::json::VmShow = vmha_e2e::parse_document(&out, "vm").unwrap();
        assert_eq!(vm.vm.hosts, [format!("node{from}")], "{user}: {out}");
        let reports = wait_for(
            &format!("{user} to read every host's readiness report"),
            Duration::from_secs(60),
            POLL,
            || {
                let (rc, out, err) = as_user(
                    &lab,
                    user,
                    &[
                        "dbus-send",
                        "--system",
                        "--print-reply=literal",
                        "--dest=org.vmha.Vmha1",
                        "/org/vmha/Vmha1/readiness",
                        "org.vmha.Vmha1.Readiness.Reports",
                    ],
                );
                assert_eq!(rc, 0, "{user} may call Readiness.Reports: {err}");
                let reports: Vec<serde_json::Value> = serde_json::from_str(out.trim()).ok()?;
                (reports.len() == 3).then_some(reports)
            },
        )
        .unwrap();
        assert!(reports.iter().all(|r| r["host"].is_string()), "{reports:?}");
        // `vmha check` reads the same reports through vmhad (its CIB facts need root or haclient).
        let (_, out, err) = vmha_as(&lab, user, &["--output", "json", "check"]);
        assert!(
            !out.contains("Rejected send message") && !err.contains("Rejected send message"),
            "{user}: vmha check was refused a read: {out} {err}"
        );
    }

    // bob is refused every change, with AccessDenied naming the action; nothing changes.
    let before = cib_config(&lab);
    let to = lab.other_host(from).unwrap();
    let to_name = format!("node{to}");
    for args in [
        vec!["vm", "stop", "vm1"],
        vec!["vm", "move", "vm1", to_name.as_str()],
        vec!["host", "standby", "node1"],
        vec!["vm", "remove", "vm1"],
    ] {
        let (rc, _, err) = vmha_as(&lab, "bob", &args);
        // vmha's exit status for AccessDenied (vmha --help lists them).
        assert_eq!(rc, 4, "bob: {args:?} must be refused as AccessDenied: {err}");
        assert!(
            err.contains("not root") && err.contains("org.vmha.Vmha1.manage") && err.trim().lines().count() == 1,
            "bob: {args:?}: {err}"
        );
    }
    // Letting polkit interact changes nothing when no authentication agent answers, and takes no 120 s.
    let t0 = Instant::now();
    let (rc, _, err) = vmha_as(&lab, "bob", &["--interactive", "vm", "stop", "vm1"]);
    assert_ne!(rc, 0, "bob --interactive must be refused");
    assert!(err.contains("org.vmha.Vmha1.manage"), "bob --interactive: {err}");
    println!(
        "bob --interactive refused in {:.2} s: {}",
        t0.elapsed().as_secs_f64(),
        err.trim()
    );
    assert!(
        t0.elapsed() < Duration::from_secs(60),
        "bob --interactive took {:?}",
        t0.elapsed()
    );
    // The D-Bus error itself, without the CLI.
    let (rc, _, err) = as_user(
        &lab,
        "bob",
        &[
            "dbus-send",
            "--system",
            "--print-reply",
            "--dest=org.vmha.Vmha1",
            "/org/vmha/Vmha1/vm/vm1",
            "org.vmha.Vmha1.VirtualMachine.Stop",
        ],
    );
    assert_ne!(rc, 0);
    assert!(
        err.contains("org.vmha.Vmha1.Error.AccessDenied") && err.contains("org.vmha.Vmha1.manage"),
        "bob's Stop over D-Bus: {err}"
    );
    assert_eq!(
        cib_config(&lab),
        before,
        "bob changed the CIB's resources or constraints"
    );
    assert_eq!(
        wait_running(&lab, "vm1", Duration::from_secs(5)),
        from,
        "vm1 stays where it ran"
    );

    // alice moves, stops and starts vm1: Pacemaker does it.
    let t0 = Instant::now();
    let (rc, out, err) = vmha_as(&lab, "alice", &["vm", "move", "vm1", &to_name]);
    assert_eq!(rc, 0, "alice moves vm1: {out} {err}");
    assert_eq!(wait_running(&lab, "vm1", Duration::from_secs(60)), to);
    println!("alice: vmha vm move: {:.2} s", t0.elapsed().as_secs_f64());
    let (rc, out, err) = vmha_as(&lab, "alice", &["vm", "stop", "vm1"]);
    assert_eq!(rc, 0, "alice stops vm1: {out} {err}");
    wait_stopped(&lab, "vm1");
    let (rc, out, err) = vmha_as(&lab, "alice", &["vm", "start", "vm1"]);
    assert_eq!(rc, 0, "alice starts vm1: {out} {err}");
    wait_running(&lab, "vm1", Duration::from_secs(90));

    // alice's grants leave bob where he was.
    let (rc, _, err) = vmha_as(&lab, "bob", &["vm", "stop", "vm1"]);
    assert!(
        rc != 0 && err.contains("org.vmha.Vmha1.manage"),
        "bob still refused: {err}"
    );
    wait_running(&lab, "vm1", Duration::from_secs(5));
}
