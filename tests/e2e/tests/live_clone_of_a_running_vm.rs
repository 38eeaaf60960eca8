//! Live clone (`vmha clone`), against real guests whose hooks record what they are told: a refusal creates
//! nothing and leaves the template resumed; a clone runs on another host with its own UUID and MAC, its
//! guest saw post-clone, the template's guest saw prepare then resume, both are cluster resources;
//! `--force` clones without asking; `vmha vm remove --destroy` deletes a clone's resource, domain and
//! overlay; the clone and the template each survive a failure of their host; a clone asked for on any
//! host runs in the DC's vmhad; killing that vmhad (the host's supervisor restarts it, as systemd does),
//! and separately its whole host (the DC), in the middle of a clone leaves no orphan domain, file or
//! resource and the template resumed. The template runs with health monitoring on (threshold 5 s): no
//! clone's pause of it is taken for a hang.

use std::path::Path;
use std::time::{Duration, Instant};

use vmha_e2e::{guest_agent, guest_exec, hook_log, lab_with_vmhad, vmha_hosts, vmha_run, wait_running, POLL};
use vmha_lab::guest::GuestSpec;
use vmha_lab::lab::VmAgent;
use vmha_lab::{wait_for, Lab};

const TPL: &str = "ctpl";
/// The template's health settings.
const HEALTH: &[&str] = &["health_monitoring=true", "health_sensitivity=high", "health_grace=5"];

/// What the guest's hooks recorded: (hook, message JSON), oldest first.
fn seen(lab: &Lab, n: u8, vm: &str) -> Vec<(String, serde_json::Value)> {
    hook_log(lab, n, vm)
        .unwrap_or_default()
        .into_iter()
        .map(|(_, hook, msg)| (hook, msg))
        .collect()
}

/// The clone-related hooks a guest saw, in order.
fn clone_hooks(lab: &Lab, n: u8, vm: &str) -> Vec<String> {
    seen(lab, n, vm)
        .into_iter()
        .map(|(h, _)| h)
        .filter(|h| matches!(h.as_str(), "prepare-clone" | "resume" | "post-clone"))
        .collect()
}

fn shared_files(lab: &Lab, prefix: &str) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(lab.cfg.shared_dir())
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|f| f.starts_with(prefix) || f.starts_with(&format!(".{prefix}")) || f.ends_with(".mem"))
        .collect();
    v.sort();
    v
}

fn in_cib(lab: &Lab, n: u8, what: &str) -> bool {
    lab.exec_ok(n, &["cibadmin", "--query"])
        .map(|x| x.contains(what))
        .unwrap_or(true)
}

/// Nothing of clone `name` is left: no QEMU anywhere, no resource or constraint, no file, no journal.
fn assert_no_trace(lab: &Lab, n: u8, name: &str) {
    wait_for(&format!("no trace of {name}"), Duration::from_secs(60), POLL, || {
        let clean = lab.qemu_processes(name).is_empty()
            && !in_cib(lab, n, &format!("\"{name}\""))
            && !in_cib(lab, n, "vmha-clone-journal-")
            && shared_files(lab, name).is_empty();
        clean.then_some(())
    })
    .unwrap_or_else(|e| {
        panic!(
            "{e}: qemu {:?}, files {:?}, resource {}, journal {}",
            lab.qemu_processes(name),
            shared_files(lab, name),
            in_cib(lab, n, &format!("\"{name}\"")),
            in_cib(lab, n, "vmha-clone-journal-")
        )
    });
}

/// The template runs, on one host, and its guest's last clone hook is `resume`.
fn assert_template_resumed(lab: &Lab) -> u8 {
    let at = wait_running(lab, TPL, Duration::from_secs(60));
    let hooks = clone_hooks(lab, at, TPL);
    assert_eq!(
        hooks.last().map(String::as_str),
        Some("resume"),
        "template hooks: {hooks:?}"
    );
    at
}

fn domain_field(lab: &Lab, n: u8, vm: &str, args: &[&str]) -> String {
    let mut all = vec!["virsh", "-c", "qemu:///system"];
    all.extend_from_slice(args);
    all.push(vm);
    lab.exec_ok(n, &all).unwrap()
}

fn macs(lab: &Lab, n: u8, vm: &str) -> Vec<String> {
    domain_field(lab, n, vm, &["domiflist"])
        .split_whitespace()
        .filter(|w| w.len() == 17 && w.matches(':').count() == 5)
        .map(str::to_string)
        .collect()
}

fn journal_shows(lab: &Lab, n: u8, needle: &str) -> bool {
    lab.exec_ok(n, &["cibadmin", "--query", "--scope", "nodes"])
        .is_ok_and(|x| x.contains("vmha-clone-journal-") && x.contains(needle))
}

/// Starts `vmha clone` on host `n` in a thread and waits until its journal shows `needle` (the job is
/// midway); returns the thread.
fn clone_in_background<'a>(
    scope: &'a std::thread::Scope<'a, '_>,
    lab: &'a Lab,
    n: u8,
    args: Vec<String>,
    needle: &str,
) -> std::thread::ScopedJoinHandle<'a, (i32, String, String)> {
    let handle = scope.spawn(move || {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        vmha_run(lab, n, &a)
    });
    wait_for(
        "the clone job midway",
        Duration::from_secs(60),
        Duration::from_millis(20),
        || (journal_shows(lab, n, needle) || handle.is_finished()).then_some(()),
    )
    .unwrap();
    if handle.is_finished() {
        let (code, out, err) = handle.join().unwrap();
        panic!("the clone ended before it could be cut short: exit {code}: {out} {err}");
    }
    handle
}

#[test]
#[ignore = "lab scenario: needs root and the lab's daemons (run ci/test)"]
fn live_clone_of_a_running_vm() {
    let lab = lab_with_vmhad();
    let shared = lab.cfg.shared_dir();
    let base = shared.join("base.qcow2");
    let disk = shared.join(format!("{TPL}.vda.qcow2"));
    vmha_lab::guest::disk_on_base(&base, &disk, "64M").unwrap();
    // The template runs off the DC (whose death is tested below): the DC stands by while it starts. (The
    // lab's shared directory is local storage to libvirt, which refuses to live-migrate disks on it.)
    let dc_name = lab.status_from_any().unwrap().dc.unwrap();
    let d = lab.cfg.host_number(&dc_name).unwrap();
    lab.exec_ok(d, &["pcs", "node", "standby", &dc_name]).unwrap();
    let spec = GuestSpec::new(TPL).with_disk_and_nic(Path::new(&disk), "52:54:00:c0:00:01");
    // Health monitoring on (sensitivity high: 5 s without a heartbeat is a hang): no clone's pause of the
    // template may be taken for a hang.
    lab.add_vm_with(&spec, VmAgent::Vmha, HEALTH).unwrap();
    let a = wait_running(&lab, TPL, Duration::from_secs(120));
    lab.exec_ok(d, &["pcs", "node", "unstandby", &dc_name]).unwrap();
    assert_ne!(a, d);
    let b = lab.cfg.host_numbers().find(|&n| n != a && n != d).unwrap();
    let b_name = lab.cfg.host_name(b);
    println!(
        "template {TPL} on {}, DC {dc_name}, clones to {b_name}",
        lab.cfg.host_name(a)
    );
    // The template's guest channel is up when a request comes back done.
    wait_for("the template's guest channel", Duration::from_secs(90), POLL, || {
        let (code, _, _) = vmha_run(&lab, a, &["vm", "request", TPL, "test-ok", "--timeout-ms", "5000"]);
        (code == 0).then_some(())
    })
    .unwrap();
    // Its heartbeats are followed (so the no-hang check at the end is not vacuous).
    wait_for("the template's heartbeats", Duration::from_secs(60), POLL, || {
        let h = vmha_e2e::vmha_vm(&lab, a, TPL).ok()?.health;
        (h.get("heartbeats").map(String::as_str) == Some("yes")
            && h.get("monitoring").map(String::as_str) == Some("on"))
        .then_some(())
    })
    .unwrap();
    wait_for("the template's guest agent", Duration::from_secs(90), POLL, || {
        guest_agent(&lab, a, TPL, &serde_json::json!({"execute": "guest-ping"})).ok()
    })
    .unwrap();

    // 1. The guest refuses: nothing is created, the template is resumed. Asked on a host that is not the
    //    DC: the refusal's reason and class (GuestRefused, exit status 11) come back through the relay.
    guest_exec(
        &lab,
        a,
        TPL,
        "/bin/touch",
        &["/run/vmha-guest/refuse-clone"],
        Duration::from_secs(10),
    )
    .unwrap();
    let (code, _, err) = vmha_run(&lab, b, &["clone", TPL, "--name", "cl-no", "--host", &b_name]);
    assert_eq!(code, 11, "a guest's refusal is GuestRefused, also relayed: {err}");
    assert!(
        err.contains("application busy: not now"),
        "the guest's reason reaches the caller: {err}"
    );
    assert_no_trace(&lab, d, "cl-no");
    assert_eq!(clone_hooks(&lab, a, TPL), ["prepare-clone", "resume"]);
    println!("refused: {}", err.trim());

    // 2. A clone on another host, asked for on a host that is not the DC: the DC's vmhad runs the job
    // (its journal is the DC's node attribute) and the CLI follows it through its own vmhad.
    guest_exec(
        &lab,
        a,
        TPL,
        "/bin/rm",
        &["-f", "/run/vmha-guest/refuse-clone"],
        Duration::from_secs(10),
    )
    .unwrap();
    let t0 = Instant::now();
    let (code, out, err) = vmha_run(&lab, b, &["clone", TPL, "--name", "cl1", "--host", &b_name]);
    assert_eq!(code, 0, "clone failed: {err}");
    println!("cloned in {:.2} s: {}", t0.elapsed().as_secs_f64(), out.trim());
    assert!(err.contains('%'), "the CLI shows the job's progress: {err}");
    assert!(
        out.contains(&format!("run by vmhad on {dc_name}, the DC")),
        "the DC's vmhad ran the job: {out}"
    );
    let dc_log = lab
        .exec_ok(
            d,
            &[
                "grep",
                "-c",
                "running a clone job asked for by node",
                "/var/log/vmha/vmhad.log",
            ],
        )
        .unwrap_or_default();
    assert!(
        dc_log.trim().parse::<u32>().unwrap_or(0) >= 1,
        "the DC's vmhad took the relayed job"
    );
    assert_eq!(wait_running(&lab, "cl1", Duration::from_secs(60)), b);
    assert_eq!(
        clone_hooks(&lab, a, TPL),
        ["prepare-clone", "resume", "prepare-clone", "resume"]
    );
    let clone_seen = seen(&lab, b, "cl1");
    let post = clone_seen
        .iter()
        .find(|(h, _)| h == "post-clone")
        .unwrap_or_else(|| panic!("the clone's guest saw no post-clone: {clone_seen:?}"));
    assert_eq!(post.1["data"]["name"], "cl1");
    assert_eq!(post.1["data"]["template"], TPL);
    // The clone carries the template's memory: its guest's log holds what the template had seen up to the
    // capture (the refused round, then this prepare), then its own post-clone.
    assert_eq!(
        clone_hooks(&lab, b, "cl1"),
        ["prepare-clone", "resume", "prepare-clone", "post-clone"]
    );
    let (tpl_uuid, cl_uuid) = (
        domain_field(&lab, a, TPL, &["domuuid"]),
        domain_field(&lab, b, "cl1", &["domuuid"]),
    );
    assert_ne!(tpl_uuid.trim(), cl_uuid.trim());
    let (tpl_macs, cl_macs) = (macs(&lab, a, TPL), macs(&lab, b, "cl1"));
    assert_eq!(tpl_macs.len(), 1);
    assert_eq!(cl_macs.len(), 1);
    assert_ne!(tpl_macs, cl_macs);
    let blk = domain_field(&lab, b, "cl1", &["domblklist"]);
    assert!(
        blk.contains("cl1.vda.qcow2"),
        "the clone writes to its own overlay: {blk}"
    );
    let tpl_blk = domain_field(&lab, a, TPL, &["domblklist"]);
    assert!(
        !tpl_blk.contains(&format!("{TPL}.vda.qcow2")),
        "the template moved to a new overlay: {tpl_blk}"
    );
    let conf = std::fs::read_to_string(shared.join(format!("{TPL}.xml"))).unwrap();
    assert!(
        !conf.contains(&format!("{TPL}.vda.qcow2")),
        "the template's definition follows its overlay"
    );
    let status = lab.status_from_any().unwrap();
    assert!(status.resource("cl1").is_some(), "the clone is a cluster resource");

    // 3. --force clones without asking the guest (which would refuse).
    guest_exec(
        &lab,
        a,
        TPL,
        "/bin/touch",
        &["/run/vmha-guest/refuse-clone"],
        Duration::from_secs(10),
    )
    .unwrap();
    let (code, _, err) = vmha_run(
        &lab,
        d,
        &["clone", TPL, "--name", "cl-forced", "--host", &b_name, "--force"],
    );
    assert_eq!(code, 0, "forced clone failed: {err}");
    assert_eq!(
        clone_hooks(&lab, a, TPL).len(),
        4,
        "--force does not ask the template's guest"
    );
    // Two captures later the template's disk chain is one overlay on the disk it had before any clone
    // (itself on the base image): every clone adds a layer under the clones only.
    let xml = domain_field(&lab, a, TPL, &["dumpxml"]);
    let layers = xml.matches("<backingStore type='file'").count();
    assert_eq!(layers, 2, "the template's chain stays short: {xml}");
    assert!(
        xml.contains(&format!("/{TPL}.vda.qcow2'")) && xml.contains("base.qcow2"),
        "{xml}"
    );
    guest_exec(
        &lab,
        a,
        TPL,
        "/bin/rm",
        &["-f", "/run/vmha-guest/refuse-clone"],
        Duration::from_secs(10),
    )
    .unwrap();

    // 4. remove --destroy deletes the clone's resource, domain and overlay, and the frozen template layer
    // it was on (made by vmha in the clone before, used by no other image); a non-clone is refused.
    let (code, _, err) = vmha_run(&lab, d, &["vm", "remove", "--destroy", TPL]);
    assert_ne!(code, 0);
    assert!(err.contains("not a vmha clone"), "{err}");
    let forced_on = wait_running(&lab, "cl-forced", Duration::from_secs(30));
    let forced_disk = shared.join("cl-forced.vda.qcow2");
    let info = lab
        .exec_ok(
            forced_on,
            &[
                "qemu-img",
                "info",
                "-U",
                "--output",
                "json",
                forced_disk.to_str().unwrap(),
            ],
        )
        .unwrap();
    let info: serde_json::Value = serde_json::from_str(&info).unwrap();
    let layer = info["full-backing-filename"]
        .as_str()
        .or(info["backing-filename"].as_str())
        .unwrap_or_else(|| panic!("cl-forced's overlay has no backing file: {info}"))
        .to_string();
    assert!(Path::new(&layer).exists(), "{layer}");
    let (code, _, err) = vmha_run(&lab, d, &["vm", "remove", "--destroy", "cl-forced"]);
    assert_eq!(code, 0, "{err}");
    assert_no_trace(&lab, d, "cl-forced");
    assert!(
        !Path::new(&layer).exists(),
        "the frozen layer {layer} of cl-forced is gone"
    );
    let tpl_blk = domain_field(&lab, a, TPL, &["domblklist"]);
    let cl1_blk = domain_field(&lab, b, "cl1", &["domblklist"]);
    println!("after destroy: template on {tpl_blk}, cl1 on {cl1_blk}, layer {layer} removed");

    // 4b. Eight clones more in a row, each removed again: with cl1 and cl-forced, ten clones of the
    // monitored template, and two more captures cut short by a crash below.
    for i in 1..=8 {
        let name = format!("cl-r{i}");
        let (code, _, err) = vmha_run(&lab, d, &["clone", TPL, "--name", &name, "--host", &b_name]);
        assert_eq!(code, 0, "clone {name}: {err}");
        wait_running(&lab, &name, Duration::from_secs(60));
        let (code, _, err) = vmha_run(&lab, d, &["vm", "remove", "--destroy", &name]);
        assert_eq!(code, 0, "remove {name}: {err}");
        assert_no_trace(&lab, d, &name);
    }

    // 5. vmhad on the DC, running the job, crashes midway (SIGKILL; the request came from another host):
    // that host's CLI learns the job was lost; the host's supervisor restarts vmhad after RestartSec, as
    // systemd does (Restart=on-failure), and the restarted vmhad rolls the clone back: nobody starts it.
    let crashed = lab.vmhad_pid(d).unwrap().expect("vmhad runs on the DC");
    let args: Vec<String> = ["clone", TPL, "--name", "cl-v", "--host", &b_name]
        .iter()
        .map(|s| s.to_string())
        .collect();
    std::thread::scope(|scope| {
        let h = clone_in_background(scope, &lab, b, args, "mem&quot;");
        let nodes = lab.exec_ok(b, &["cibadmin", "--query", "--scope", "nodes"]).unwrap();
        let dc_node = nodes
            .split("<node ")
            .find(|n| n.contains(&format!("uname=\"{dc_name}\"")))
            .unwrap_or("");
        assert!(
            dc_node.contains("vmha-clone-journal-"),
            "the journal is the DC's: {nodes}"
        );
        lab.exec_ok(d, &["kill", "-9", &crashed.to_string()]).unwrap();
        let (code, _, err) = h.join().unwrap();
        assert_ne!(code, 0, "the CLI reports the lost job");
        assert!(err.contains("went away midway"), "{err}");
    });
    let restarted = lab.wait_new_vmhad(d, crashed, Duration::from_secs(30)).unwrap();
    assert_ne!(restarted, crashed, "the supervisor started a new vmhad");
    assert_no_trace(&lab, d, "cl-v");
    assert_template_resumed(&lab);
    println!("vmhad {crashed} killed midway: restarted by the supervisor as vmhad {restarted}, rolled back");

    // 6. The clone and the template are cluster resources like any other: the host of each fails in
    // turn, it restarts elsewhere (the template from its overlay on the base image) and its guest answers.
    for vm in ["cl1", TPL] {
        let from = wait_running(&lab, vm, Duration::from_secs(60));
        assert_ne!(from, d, "the DC's host stays up here");
        let from_name = lab.cfg.host_name(from);
        lab.power_off(from).unwrap();
        let moved = wait_running(&lab, vm, Duration::from_secs(120));
        assert_ne!(moved, from);
        wait_for(
            &format!("{vm}'s guest after the failover"),
            Duration::from_secs(90),
            POLL,
            || {
                let (code, _, _) = vmha_run(&lab, d, &["vm", "request", vm, "test-ok", "--timeout-ms", "5000"]);
                (code == 0).then_some(())
            },
        )
        .unwrap();
        println!(
            "{vm}: host {from_name} failed, restarted on {}",
            lab.cfg.host_name(moved)
        );
        lab.power_on(from).unwrap();
        wait_for("the failed host back", Duration::from_secs(120), POLL, || {
            let s = lab.status(d).ok()?;
            s.online_nodes().contains(&from_name.as_str()).then_some(())
        })
        .unwrap();
        // The host's boot starts vmhad (enabled), as systemd would: nobody starts it here.
        lab.wait_vmhad(from, Duration::from_secs(60)).unwrap();
        wait_for(
            "vmhad on the DC to see the host back",
            Duration::from_secs(60),
            POLL,
            || {
                let hosts = vmha_hosts(&lab, d).ok()?;
                hosts
                    .iter()
                    .any(|h| h.name == from_name && h.state == "online")
                    .then_some(())
            },
        )
        .unwrap();
    }
    let tpl_blk = domain_field(
        &lab,
        wait_running(&lab, TPL, Duration::from_secs(10)),
        TPL,
        &["domblklist"],
    );
    assert!(
        !tpl_blk.contains(&format!("{TPL}.vda.qcow2")),
        "the restarted template runs on its overlay, not the clones' frozen layer: {tpl_blk}"
    );

    // 7. The DC host, running the job, dies midway: the new DC's vmhad rolls the clone back. The template
    // must not die with it: if its failover put it on the DC's host, it is banned from there first.
    if wait_running(&lab, TPL, Duration::from_secs(60)) == d {
        lab.exec_ok(d, &["pcs", "resource", "ban", TPL, &dc_name]).unwrap();
        wait_for("the template off the DC's host", Duration::from_secs(120), POLL, || {
            let s = lab.status(d).ok()?;
            let on = s.running_on(TPL)?;
            (on != dc_name.as_str() && lab.qemu_processes(TPL).len() == 1).then_some(())
        })
        .unwrap();
        wait_for(
            "the template's guest after the move",
            Duration::from_secs(90),
            POLL,
            || {
                let (code, _, _) = vmha_run(&lab, d, &["vm", "request", TPL, "test-ok", "--timeout-ms", "5000"]);
                (code == 0).then_some(())
            },
        )
        .unwrap();
    }
    let a = wait_running(&lab, TPL, Duration::from_secs(60));
    assert_ne!(a, d);
    let target = lab.cfg.host_numbers().find(|&n| n != a && n != d).unwrap();
    let args: Vec<String> = ["clone", TPL, "--name", "cl-dc", "--host", &lab.cfg.host_name(target)]
        .iter()
        .map(|s| s.to_string())
        .collect();
    std::thread::scope(|scope| {
        let h = clone_in_background(scope, &lab, a, args, "mem&quot;");
        lab.power_off(d).unwrap();
        let _ = h.join();
    });
    let observer = lab.other_host(d).unwrap();
    assert_no_trace(&lab, observer, "cl-dc");
    assert_template_resumed(&lab);
    wait_running(&lab, "cl1", Duration::from_secs(120));
    println!("DC host killed midway: rolled back by the new DC");
    // Every clone paused the monitored template; none was taken for a hang.
    for n in lab.cfg.host_numbers() {
        let log = std::fs::read_to_string(lab.cfg.host_dir(n).join("var-log-vmha/vmhad.log")).unwrap_or_default();
        assert!(
            !log.contains("guest hung"),
            "{}: a clone's pause taken for a hang",
            lab.cfg.host_name(n)
        );
    }
}
