//! The vmha guest channel follows its VM (vmha-guest and the lab image's test hooks inside): one start is
//! one connection of vmhad to the channel; vmhad emits the `GuestMessage` D-Bus signal with the VM's name
//! and the guest's message; an unprivileged caller's `GuestRequest` is refused and never reaches the guest;
//! before a live migration (`pcs resource move`) the agent asks the guest (`migrate`, which the guest
//! refuses here) and migrates anyway; on the target the guest is told `migrated` and answers requests sent
//! through the new host's vmhad; and after its QEMU is killed and Pacemaker recovers the VM, the channel
//! connects again (once) and the guest answers again.

use std::time::{Duration, Instant};

use vmha_e2e::{guest_exec, guest_uptime, hook_log, vmha_as_nobody, wait_running, Timeline, POLL};
use vmha_lab::guest::GuestSpec;
use vmha_lab::lab::VmAgent;
use vmha_lab::{wait_for, Lab};

const VM: &str = "gmig1";

/// What the guest's test hooks recorded: (guest uptime, hook directory, message); `None` when
/// qemu-guest-agent could not run the reading.
fn seen(lab: &Lab, n: u8) -> Option<Vec<(f64, String, serde_json::Value)>> {
    hook_log(lab, n, VM).ok()
}

/// The messages hook `hook` recorded (retrying the reading until qemu-guest-agent answers).
fn seen_of(lab: &Lab, n: u8, hook: &str) -> Vec<serde_json::Value> {
    wait_for("the guest's seen.log", Duration::from_secs(60), POLL, || seen(lab, n))
        .unwrap()
        .into_iter()
        .filter(|(_, h, _)| h == hook)
        .map(|(_, _, m)| m)
        .collect()
}

/// `vmha --output json vm request VM NAME --timeout-ms T` on host `n`: (exit code, JSON, stderr).
fn request(lab: &Lab, n: u8, name: &str, timeout_ms: u32) -> (i32, serde_json::Value, String) {
    let t = timeout_ms.to_string();
    let out = lab
        .exec(
            n,
            &[
                "vmha",
                "--output",
                "json",
                "vm",
                "request",
                VM,
                name,
                "--timeout-ms",
                &t,
            ],
        )
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    (
        out.status.code().unwrap_or(-1),
        serde_json::from_str(stdout.trim()).unwrap_or(serde_json::Value::Null),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The guest's uptime, retrying while qemu-guest-agent is not ready (it starts after vmha-guest).
fn uptime(lab: &Lab, n: u8) -> f64 {
    wait_for("the guest's uptime", Duration::from_secs(60), POLL, || {
        guest_uptime(lab, n, VM).ok()
    })
    .unwrap()
}

fn answered_done(lab: &Lab, n: u8) -> bool {
    let (code, r, _) = request(lab, n, "test-ok", 5000);
    code == 0 && r["result"] == "done"
}

fn vmhad_log(lab: &Lab, n: u8) -> String {
    std::fs::read_to_string(lab.cfg.host_dir(n).join("var-log-vmha/vmhad.log")).unwrap_or_default()
}

/// How often host `n`'s vmhad logged `guest channel of VM <VM> <what>`.
fn channel_log(lab: &Lab, n: u8, what: &str) -> usize {
    let needle = format!("guest channel of VM {VM} {what}");
    vmhad_log(lab, n).lines().filter(|l| l.contains(&needle)).count()
}

fn pacemaker_log(lab: &Lab, n: u8) -> String {
    std::fs::read_to_string(lab.cfg.host_dir(n).join("var-log-pacemaker/pacemaker.log")).unwrap_or_default()
}

/// The `GuestMessage` signals dbus-monitor recorded: (VM, JSON) pairs.
fn guest_signals(path: &std::path::Path) -> Vec<(String, String)> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let arg = |l: &str| -> Option<String> {
        let s = l.trim().strip_prefix("string \"")?.strip_suffix('"')?;
        Some(s.to_string())
    };
    lines
        .iter()
        .enumerate()
        .filter(|(_, l)| l.starts_with("signal ") && l.contains("member=GuestMessage"))
        .filter_map(|(i, _)| Some((arg(lines.get(i + 1)?)?, arg(lines.get(i + 2)?)?)))
        .collect()
}

#[test]
#[ignore = "lab scenario: needs root and the lab's daemons (run ci/test)"]
fn guest_channel_follows_migration_and_restart() {
    let lab = vmha_e2e::lab_with_vmhad();
    lab.add_vm(&GuestSpec::new(VM), VmAgent::Vmha).unwrap();
    let a = wait_running(&lab, VM, Duration::from_secs(180));
    let a_name = lab.cfg.host_name(a);
    let t_start = Instant::now();
    wait_for("the guest to answer a request", Duration::from_secs(180), POLL, || {
        answered_done(&lab, a).then_some(())
    })
    .unwrap();
    println!(
        "{VM} on {a_name}: the guest answers ({:.1} s after Pacemaker showed it running)",
        t_start.elapsed().as_secs_f64()
    );

    // 1. One start, one connection: vmhad did not drop the channel while the CIB showed the first monitor
    //    pending (the VM on no host).
    let (connects, stops) = (channel_log(&lab, a, "connected"), channel_log(&lab, a, "stopped"));
    println!("vmhad on {a_name}: channel of {VM} connected {connects} time(s), stopped {stops} time(s)");
    assert_eq!((connects, stops), (1, 0), "one start must be one connection");

    // 2. The GuestMessage signal carries the VM's name and the guest's message.
    let signals_file = lab.cfg.host_dir(a).join("var-log-vmha/guest-signals.txt");
    let _ = std::fs::remove_file(&signals_file);
    lab.exec_ok(
        a,
        &[
            "sh",
            "-c",
            "timeout 300 dbus-monitor --system \
             \"type='signal',interface='org.vmha.Vmha1.Cluster',member='GuestMessage'\" \
             > /var/log/vmha/guest-signals.txt 2>&1 < /dev/null &",
        ],
    )
    .unwrap();
    let signal = wait_for(
        "a GuestMessage signal for a result",
        Duration::from_secs(30),
        POLL,
        || {
            assert!(answered_done(&lab, a));
            guest_signals(&signals_file)
                .into_iter()
                .find(|(_, json)| json.contains("\"type\":\"result\""))
        },
    )
    .unwrap();
    println!("GuestMessage signal: vm={} json={}", signal.0, signal.1);
    assert_eq!(signal.0, VM);
    let msg: serde_json::Value = serde_json::from_str(&signal.1).expect("the signal carries JSON");
    assert_eq!(
        (msg["v"].as_u64(), msg["result"].as_str()),
        (Some(1), Some("done")),
        "{msg}"
    );
    assert!(msg["id"].as_str().is_some_and(|id| !id.is_empty()), "{msg}");

    // 3. An unprivileged caller is refused and nothing reaches the guest: the next (root) request is the only
    //    new test-ok the guest's hook saw.
    let before = seen_of(&lab, a, "test-ok").len();
    let (rc, _, err) = vmha_as_nobody(&lab, a, &["vm", "request", VM, "test-ok", "--timeout-ms", "5000"]);
    println!("nobody: rc {rc}: {}", err.trim());
    assert_ne!(rc, 0, "nobody's request must be refused");
    assert!(err.contains("not root") && err.contains("polkit"), "{err}");
    assert!(answered_done(&lab, a));
    let after = seen_of(&lab, a, "test-ok").len();
    println!("the guest's test-ok hook ran {before} times before nobody's request, {after} times after root's");
    assert_eq!(
        after,
        before + 1,
        "the guest saw {} test-ok requests, expected 1 (root's)",
        after - before
    );

    // 4. Live migration: the guest is asked first (and refuses), the VM migrates anyway.
    guest_exec(
        &lab,
        a,
        VM,
        "/bin/sh",
        &["-c", "mkdir -p /run/vmha-guest && touch /run/vmha-guest/refuse-migrate"],
        Duration::from_secs(20),
    )
    .unwrap();
    let up_before = uptime(&lab, a);
    let b = lab.other_host(a).unwrap();
    let b_name = lab.cfg.host_name(b);
    let mut t = Timeline::start();
    lab.exec_ok(1, &["pcs", "resource", "move", VM, &b_name]).unwrap();
    wait_for(&format!("{VM} on {b_name}"), Duration::from_secs(120), POLL, || {
        let qemus = lab.qemu_processes(VM);
        assert!(qemus.len() <= 2, "{VM}: {qemus:?}");
        let s = lab.status_from_any().ok()?;
        let n = lab.cfg.host_number(s.running_on(VM)?)?;
        (n == b && qemus.len() == 1 && qemus[0].0 == b).then_some(())
    })
    .unwrap();
    t.mark(&format!("running on {b_name}, one QEMU"));
    let up_after = uptime(&lab, b);
    assert!(
        up_after > up_before,
        "{VM} rebooted instead of migrating: {up_before} s -> {up_after} s"
    );
    let asked = seen_of(&lab, b, "migrate");
    println!("the guest's migrate hook saw: {asked:?}");
    assert!(
        asked.iter().any(|m| m["type"] == "request"
            && m["data"]["source"] == a_name.as_str()
            && m["data"]["target"] == b_name.as_str()),
        "the guest was asked before the migration: {asked:?}"
    );
    // The agent's log on the source, in order: asked, refused, migrated anyway. The agent writes its lines
    // where Pacemaker's HA_LOGFILE says (the Pacemaker log; each line names the VM: `vm="..."`), or to its
    // stderr, which the executor records as "error output" of the operation.
    let log = pacemaker_log(&lab, a);
    let op = format!("{VM}_migrate_to_0");
    let field = format!("vm=\"{VM}\"");
    let ours: Vec<&str> = log
        .lines()
        .filter(|l| (l.contains(&op) && l.contains("error output")) || l.contains(&field))
        .collect();
    let refused = ours.iter().position(|l| {
        l.contains("the guest refused the migration (migrate refused by the lab guest); migrating anyway")
    });
    println!("migrate_to on {a_name}:\n  {}", ours.join("\n  "));
    let r = refused.expect("the agent logged the guest's refusal");
    assert!(
        ours[r..].iter().any(|l| l.contains("starting live migration")),
        "the refusal is logged before the migration starts"
    );

    // 5. On the target: the guest is told it arrived, and answers through the new host's vmhad.
    let arrived = wait_for("the guest's migrated hook", Duration::from_secs(60), POLL, || {
        seen_of(&lab, b, "migrated").into_iter().next()
    })
    .unwrap();
    t.mark("migrated hook ran in the guest");
    println!("migrated event: {arrived}");
    assert_eq!(arrived["data"]["source"], a_name.as_str(), "{arrived}");
    assert_eq!(arrived["data"]["target"], b_name.as_str(), "{arrived}");
    wait_for(
        &format!("the guest to answer through {b_name}'s vmhad"),
        Duration::from_secs(30),
        POLL,
        || answered_done(&lab, b).then_some(()),
    )
    .unwrap();
    t.mark(&format!("request through {b_name}'s vmhad: done"));
    // The old host's vmhad still takes requests for it: they are relayed to the new host.
    let (code, relayed, err) = request(&lab, a, "test-ok", 5000);
    assert_eq!((code, relayed["result"].as_str()), (0, Some("done")), "{err}");
    assert_eq!(
        channel_log(&lab, b, "connected"),
        1,
        "one arrival, one connection on {b_name}"
    );
    t.print(&format!(
        "{VM} {a_name} -> {b_name} (guest uptime {up_before:.1} s -> {up_after:.1} s):"
    ));

    // 6. QEMU killed: Pacemaker recovers the VM, the channel connects again (once) and the guest answers.
    let qemus = lab.qemu_processes(VM);
    assert_eq!(qemus.len(), 1, "{qemus:?}");
    let killed = qemus[0].1;
    let connects_before: Vec<usize> = lab
        .cfg
        .host_numbers()
        .map(|n| channel_log(&lab, n, "connected"))
        .collect();
    let mut t = Timeline::start();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(killed), nix::sys::signal::Signal::SIGKILL).unwrap();
    let c = wait_for(&format!("{VM} recovered"), Duration::from_secs(180), POLL, || {
        let qemus = lab.qemu_processes(VM);
        assert!(qemus.len() <= 1, "{VM}: {qemus:?}");
        let s = lab.status_from_any().ok()?;
        let n = lab.cfg.host_number(s.running_on(VM)?)?;
        (qemus.len() == 1 && qemus[0].1 != killed && qemus[0].0 == n).then_some(n)
    })
    .unwrap();
    let c_name = lab.cfg.host_name(c);
    t.mark(&format!("running again on {c_name}"));
    wait_for("the restarted guest to answer", Duration::from_secs(180), POLL, || {
        answered_done(&lab, c).then_some(())
    })
    .unwrap();
    t.mark("the restarted guest answers a request");
    let up_restarted = uptime(&lab, c);
    assert!(
        up_restarted < up_after,
        "the guest restarted: uptime {up_after} s -> {up_restarted} s"
    );
    let connects_after: Vec<usize> = lab
        .cfg
        .host_numbers()
        .map(|n| channel_log(&lab, n, "connected"))
        .collect();
    let new: usize = connects_after.iter().zip(&connects_before).map(|(a, b)| a - b).sum();
    println!("channel connections per host before the kill {connects_before:?}, after recovery {connects_after:?}");
    assert_eq!(new, 1, "one restart, one new connection");
    let idx = lab.cfg.host_numbers().position(|n| n == c).unwrap();
    assert_eq!(
        connects_after[idx] - connects_before[idx],
        1,
        "the new connection is {c_name}'s"
    );
    t.print(&format!("{VM}'s QEMU killed on {b_name}; recovered on {c_name}:"));
}
