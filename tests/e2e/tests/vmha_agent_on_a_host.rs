//! vmha's OCF agent `ocf:vmha:VirtualMachine` called on real lab hosts, outside Pacemaker, as `ocf-tester`
//! and an operator's mistakes call it: the standard OCF sequence passes, `pcs` reads its meta-data, bad
//! input gets the right code and a readable reason and changes nothing, a hung libvirtd yields an error
//! within the operation's timeout, and live migration (also a failed one) leaves the VM on one host.

use std::time::Duration;

use vmha_e2e::{domains, guest_uptime, run_agent, signal_libvirtd, POLL, VMHA_AGENT};
use vmha_lab::guest::GuestSpec;
use vmha_lab::{wait_for, Lab};

const SHARED_PARAMS: [(&str, &str); 2] = [("hypervisor", "qemu:///system"), ("migration_transport", "tcp")];

/// OCF parameters of one agent call.
type Params<'a> = Vec<(&'a str, &'a str)>;

fn params(config: &str) -> Params<'_> {
    let mut p = vec![("config", config)];
    p.extend(SHARED_PARAMS);
    p
}

#[test]
#[ignore = "lab scenario: needs root and the lab's daemons (run ci/test)"]
fn vmha_agent_passes_ocf_tester_rejects_bad_input_survives_hung_libvirtd_and_migrates_once() {
    let lab = vmha_e2e::lab();
    ocf_tester_and_pcs_accept_the_agent(&lab);
    bad_input_gets_the_right_code_and_changes_nothing(&lab);
    hung_libvirtd_gives_an_error_within_the_timeout(&lab);
    live_migration_by_the_agent_leaves_the_vm_on_one_host(&lab);
}

fn ocf_tester_and_pcs_accept_the_agent(lab: &Lab) {
    let config = lab.write_domain_xml(&GuestSpec::new("ocft1")).unwrap();
    let config = config.to_str().unwrap();
    let out = lab
        .exec(
            1,
            &[
                "ocf-tester",
                "-n",
                "ocft1",
                "-o",
                &format!("config={config}"),
                "-o",
                "hypervisor=qemu:///system",
                "-o",
                "migration_transport=tcp",
                VMHA_AGENT,
            ],
        )
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && text.contains("passed all tests"),
        "ocf-tester:\n{text}"
    );
    assert!(
        lab.qemu_processes("ocft1").is_empty(),
        "ocf-tester's last stop left no QEMU"
    );
    println!(
        "ocf-tester: {}",
        text.lines()
            .filter(|l| l.contains("passed"))
            .collect::<Vec<_>>()
            .join(" ")
    );

    let describe = lab
        .exec_ok(1, &["pcs", "resource", "describe", "ocf:vmha:VirtualMachine"])
        .unwrap();
    for param in [
        "config",
        "hypervisor",
        "force_stop",
        "shutdown_mode",
        "migration_transport",
        "migration_downtime",
        "save_on_stop",
    ] {
        assert!(
            describe.contains(param),
            "pcs resource describe shows {param}:\n{describe}"
        );
    }
}

fn bad_input_gets_the_right_code_and_changes_nothing(lab: &Lab) {
    lab.exec_ok(
        1,
        &[
            "sh",
            "-c",
            "echo 'this is <not xml' > /tmp/garbage.xml && chmod 644 /tmp/garbage.xml",
        ],
    )
    .unwrap();
    let before = domains(lab, 1);
    // (what is wrong, action, parameters, expected OCF code)
    let cases: [(&str, &str, Params, i32); 8] = [
        ("missing domain XML", "validate-all", params("/nonexistent/vm.xml"), 5),
        ("missing domain XML", "start", params("/nonexistent/vm.xml"), 5),
        ("malformed domain XML", "validate-all", params("/tmp/garbage.xml"), 6),
        ("malformed domain XML", "start", params("/tmp/garbage.xml"), 6),
        (
            "unknown domain",
            "start",
            vec![("domain", "no-such-vm"), ("hypervisor", "qemu:///system")],
            5,
        ),
        (
            "unknown domain",
            "validate-all",
            vec![("domain", "no-such-vm"), ("hypervisor", "qemu:///system")],
            5,
        ),
        (
            "bad hypervisor URI",
            "start",
            vec![("domain", "x"), ("hypervisor", "::not a uri")],
            6,
        ),
        ("relative XML path", "start", vec![("config", "vm.xml")], 6),
    ];
    for (what, action, params, want) in cases {
        let run = run_agent(lab, 1, "bad1", action, &params, 20_000, &[]);
        assert_eq!(
            run.rc,
            want,
            "{what}: {action} returned {} ({})",
            run.rc,
            run.stderr.trim()
        );
        let reason = run
            .exit_reason()
            .unwrap_or_else(|| panic!("{what}: no ocf-exit-reason in {:?}", run.stderr));
        assert!(!reason.trim().is_empty());
        println!("{what:>22}: {action:<12} -> {} \"{}\"", run.rc, reason.trim());
    }
    // A well-formed URI of a hypervisor that is not there (an unused address of the lab's own subnet):
    // an error with a reason, never success.
    let absent = format!("qemu+tcp://{}.99/system", lab.cfg.subnet);
    let run = run_agent(
        lab,
        1,
        "bad1",
        "start",
        &[("domain", "x"), ("hypervisor", &absent)],
        20_000,
        &[],
    );
    assert_ne!(run.rc, 0);
    assert!(run.exit_reason().is_some(), "{}", run.stderr);
    assert_eq!(domains(lab, 1), before, "bad input changed nothing on the host");
    assert!(lab.qemu_processes("bad1").is_empty() && lab.qemu_processes("x").is_empty());
}

fn hung_libvirtd_gives_an_error_within_the_timeout(lab: &Lab) {
    let config = lab.write_domain_xml(&GuestSpec::new("hang1")).unwrap();
    let p = params(config.to_str().unwrap());
    assert_eq!(run_agent(lab, 2, "hang1", "start", &p, 90_000, &[]).rc, 0);
    assert_eq!(
        run_agent(lab, 2, "hang1", "monitor", &p, 20_000, &[("interval", "10000")]).rc,
        0
    );

    signal_libvirtd(lab, 2, "STOP");
    let monitor = run_agent(lab, 2, "hang1", "monitor", &p, 5_000, &[("interval", "10000")]);
    let stop = run_agent(lab, 2, "hang1", "stop", &p, 6_000, &[]);
    signal_libvirtd(lab, 2, "CONT");

    assert_eq!(monitor.rc, 1, "monitor with libvirtd hung: {}", monitor.stderr);
    assert!(
        monitor.elapsed < Duration::from_secs(5),
        "monitor answered within its 5 s timeout: {:?}",
        monitor.elapsed
    );
    assert!(
        monitor.exit_reason().is_some_and(|r| r.contains("libvirt")),
        "{}",
        monitor.stderr
    );
    assert_ne!(stop.rc, 0, "stop cannot claim success while libvirtd hangs");
    assert_ne!(stop.rc, 7, "stop never returns 7");
    assert!(
        stop.elapsed < Duration::from_secs(6),
        "stop answered within its 6 s timeout: {:?}",
        stop.elapsed
    );
    println!(
        "libvirtd SIGSTOPped: monitor -> {} after {:.2} s (timeout 5 s), stop -> {} after {:.2} s (timeout 6 s)",
        monitor.rc,
        monitor.elapsed.as_secs_f64(),
        stop.rc,
        stop.elapsed.as_secs_f64()
    );

    // Once libvirtd answers again, stop completes and nothing is left.
    assert_eq!(run_agent(lab, 2, "hang1", "stop", &p, 90_000, &[]).rc, 0);
    assert_eq!(
        run_agent(lab, 2, "hang1", "monitor", &p, 20_000, &[("interval", "0")]).rc,
        7
    );
    assert!(lab.qemu_processes("hang1").is_empty());
}

fn live_migration_by_the_agent_leaves_the_vm_on_one_host(lab: &Lab) {
    let config = lab.write_domain_xml(&GuestSpec::new("mig1")).unwrap();
    let p = params(config.to_str().unwrap());
    assert_eq!(run_agent(lab, 1, "mig1", "start", &p, 90_000, &[]).rc, 0);
    let up_before = wait_for("mig1's guest agent", Duration::from_secs(60), POLL, || {
        guest_uptime(lab, 1, "mig1").ok()
    })
    .unwrap();

    // A successful migration node1 -> node2: migrate_to on the source, migrate_from on the target.
    let meta = [("migrate_source", "node1"), ("migrate_target", "node2")];
    let to = run_agent(lab, 1, "mig1", "migrate_to", &p, 120_000, &meta);
    assert_eq!(to.rc, 0, "migrate_to: {}", to.stderr);
    let from = run_agent(lab, 2, "mig1", "migrate_from", &p, 60_000, &meta);
    assert_eq!(from.rc, 0, "migrate_from: {}", from.stderr);
    let qemus = lab.qemu_processes("mig1");
    assert_eq!(qemus.len(), 1, "{qemus:?}");
    assert_eq!(qemus[0].0, 2, "mig1 runs on node2 only");
    assert_eq!(
        run_agent(lab, 1, "mig1", "monitor", &p, 20_000, &[("interval", "0")]).rc,
        7
    );
    assert_eq!(
        run_agent(lab, 2, "mig1", "monitor", &p, 20_000, &[("interval", "10000")]).rc,
        0
    );
    let up_after = guest_uptime(lab, 2, "mig1").unwrap();
    assert!(
        up_after > up_before,
        "migrated, not rebooted: {up_before} -> {up_after}"
    );
    println!(
        "agent live migration node1 -> node2: migrate_to {:.2} s + migrate_from {:.2} s",
        to.elapsed.as_secs_f64(),
        from.elapsed.as_secs_f64()
    );

    // A migration that cannot complete (the target's libvirtd hangs) fails within its timeout and leaves
    // the VM running on the source only.
    signal_libvirtd(lab, 3, "STOP");
    let meta = [("migrate_source", "node2"), ("migrate_target", "node3")];
    let failed = run_agent(lab, 2, "mig1", "migrate_to", &p, 10_000, &meta);
    signal_libvirtd(lab, 3, "CONT");
    assert_ne!(failed.rc, 0, "migration to a hung host cannot succeed");
    assert!(
        failed.elapsed < Duration::from_secs(10),
        "migrate_to answered within its timeout: {:?}",
        failed.elapsed
    );
    assert!(failed.exit_reason().is_some(), "{}", failed.stderr);
    assert_eq!(
        run_agent(lab, 2, "mig1", "monitor", &p, 20_000, &[("interval", "10000")]).rc,
        0,
        "still running on the source"
    );
    wait_for("node3 to hold no running mig1", Duration::from_secs(60), POLL, || {
        let running = lab
            .exec_ok(3, &["virsh", "-c", "qemu:///system", "list", "--name"])
            .ok()?;
        let qemus = lab.qemu_processes("mig1");
        (!running.lines().any(|l| l.trim() == "mig1") && qemus.iter().all(|(h, _)| *h == 2)).then_some(())
    })
    .unwrap();
    println!(
        "failed migration to a hung host: migrate_to -> {} after {:.2} s; mig1 still on node2 only",
        failed.rc,
        failed.elapsed.as_secs_f64()
    );
    assert_eq!(run_agent(lab, 2, "mig1", "stop", &p, 90_000, &[]).rc, 0);
    assert!(lab.qemu_processes("mig1").is_empty());
}
