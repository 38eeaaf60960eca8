//! The cockpit-vmha page (`cockpit/`) in a real browser against a real cluster: Debian's cockpit-ws runs in
//! lab host 1 (plain HTTP on the host's address, `AllowUnencrypted` in that host's own /etc), the page is
//! installed where the cockpit-vmha package puts it, and headless Chromium, driven through chromium-driver by
//! `tests/e2e/cockpit/drive_cockpit.py` (Selenium) in the same host, signs in with the host's own accounts.
//! alice (group haclient, which the shipped polkit rule lets manage) sees three hosts and both VMs, moves a
//! VM with the page's Move dialog and sees it arrive; the host it arrived on is powered off and the page
//! shows it come back elsewhere within seconds of Pacemaker; bob (no such group) sees the same cluster and
//! his Stop and his group scale are refused with vmhad's reason on the page, and nothing changes. Before the
//! move, the page's what-if of vm1's host failing answers VM by VM what `vmha what-if --json` answers, with
//! the CIB's configuration unchanged, and alice live-clones vm2 from the page and sees the job's steps until
//! the clone runs. The page's virtual clusters and elastic groups are what `vmha vcluster list` and `vmha
//! group list` list, before and after a virtual cluster, a member and two groups are added on other hosts
//! (without a reload); bob's refused scale picks its group from the dialog's list by keyboard. Virtual
//! clusters are captured from the page into vmhad's archive store; a plan in the cluster the archive came
//! from is refused with vmhad's reason, and after the operator removed the clone, the page's plan of a
//! capture of it is clean and its "Instantiate as planned…" brings the clone back. Screenshots go to
//! target/e2e-artifacts/cockpit/.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use vmha_e2e::{vmha_json, vmha_run, wait_running, POLL};
use vmha_lab::guest::GuestSpec;
use vmha_lab::{wait_for, Lab};

/// The host that runs cockpit-ws and the browser (never powered off here).
const N: u8 = 1;
const PORT: u16 = 9090;
const PAGE_FILES: [&str; 4] = ["manifest.json", "index.html", "vmha.js", "vmha.css"];

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn artifacts() -> PathBuf {
    vmha_e2e::release_build()
        .parent()
        .expect("target directory")
        .join("e2e-artifacts/cockpit")
}

/// The browser driver running in host N: one JSON command a line in, one JSON answer a line out.
struct Browser {
    child: Child,
    stdin: ChildStdin,
    lines: Receiver<String>,
}

impl Browser {
    fn start(lab: &Lab, url: &str) -> Browser {
        let script = repo().join("tests/e2e/cockpit/drive_cockpit.py");
        let out = artifacts();
        std::fs::create_dir_all(&out).unwrap();
        let mut child = lab
            .command(
                N,
                &[
                    "env",
                    "HOME=/tmp",
                    "/usr/bin/python3",
                    "-B",
                    script.to_str().unwrap(),
                    url,
                    out.to_str().unwrap(),
                ],
            )
            .unwrap()
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("starting the browser driver");
        let stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Browser { child, stdin, lines }
    }

    /// Sends `cmd` and returns its answer; panics with the driver's error (and the page's text) when it
    /// failed, or when no answer came within `limit` (each command waits on the page with its own deadline,
    /// shorter than this).
    fn ask(&mut self, cmd: Value, limit: Duration) -> Value {
        writeln!(self.stdin, "{cmd}").unwrap();
        self.stdin.flush().unwrap();
        let line = self
            .lines
            .recv_timeout(limit)
            .unwrap_or_else(|e| panic!("browser driver: no answer to {cmd} within {limit:?}: {e}"));
        let answer: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line}: {e}"));
        assert_eq!(answer["ok"], true, "browser: {cmd} failed: {answer:#}");
        println!("browser: {} -> {}", cmd["cmd"], answer);
        answer
    }

    /// Asks the page for the plan of an instantiate of stored archive `archive` (its Instantiate… button,
    /// the dialog's fields filled with `fill`, confirmed), checks the dry run was asked, and waits for the
    /// plan panel's answer (kept as screenshot `screenshot`).
    fn plan(&mut self, archive: &str, fill: Value, screenshot: &str) -> Value {
        let key = format!("archive-instantiate-{archive}");
        let asked = self.ask(
            json!({"cmd": "act", "key": key, "fill": fill}),
            Duration::from_secs(150),
        );
        assert_eq!(asked["outcome"], "done", "the plan of {archive} asked: {asked}");
        self.ask(
            json!({"cmd": "wait_plan", "archive": archive, "timeout": 120, "screenshot": screenshot}),
            Duration::from_secs(130),
        )
    }

    /// Waits until the page shows exactly the virtual clusters and elastic groups `lists` ([`cli_lists`])
    /// within `timeout` seconds; returns what it showed, how long that took and whether the page is still
    /// the one loaded at sign-in.
    fn wait_lists(&mut self, lists: &Value, timeout: u64, screenshot: Option<&str>) -> Value {
        let mut cmd = lists.as_object().unwrap().clone();
        cmd.insert("cmd".into(), json!("wait_lists"));
        cmd.insert("timeout".into(), json!(timeout));
        if let Some(name) = screenshot {
            cmd.insert("screenshot".into(), json!(name));
        }
        self.ask(Value::Object(cmd), Duration::from_secs(timeout + 60))
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = writeln!(self.stdin, "{}", json!({"cmd": "quit"}));
        let _ = self.stdin.flush();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `admin_epoch.epoch` of the CIB on host N: what any configuration change moves.
fn config_version(lab: &Lab) -> String {
    let xml = lab.exec_ok(N, &["cibadmin", "--query"]).unwrap();
    let head = &xml[..xml.find('>').expect("a <cib> element")];
    let attr = |name: &str| {
        let key = format!(" {name}=\"");
        let at = head.find(&key).unwrap_or_else(|| panic!("no {name} in {head}")) + key.len();
        head[at..].split('"').next().unwrap().to_string()
    };
    format!("{}.{}", attr("admin_epoch"), attr("epoch"))
}

/// Where each VM would run after the event, from a what-if document: VM -> (outcome, host or "").
fn then_on(vms: &Value) -> std::collections::BTreeMap<String, (String, String)> {
    vms.as_array()
        .expect("vms")
        .iter()
        .map(|v| {
            let outcome = v["outcome"].as_str().unwrap().to_string();
            let host = match outcome.as_str() {
                "stays" => v["host"].as_str(),
                "moves" | "starts" => v["to"].as_str(),
                _ => None,
            };
            (
                v["vm"].as_str().unwrap().to_string(),
                (outcome, host.unwrap_or("").to_string()),
            )
        })
        .collect()
}

fn host(n: u8) -> String {
    format!("node{n}")
}

/// The virtual clusters and elastic groups as the CLI on host N lists them (`vmha vcluster list`, `vmha group
/// list`), in the shape the browser driver reads the page: vclusters: name -> members; groups: name ->
/// template, min, max, size, members ({vm, host}). No stored policy lists no groups.
fn cli_lists(lab: &Lab) -> Value {
    let vclusters = vmha_json(lab, N, &["vcluster", "list"]).unwrap()["vclusters"].clone();
    let (code, out, err) = vmha_run(lab, N, &["--output", "json", "group", "list"]);
    let mut groups = serde_json::Map::new();
    if code == 0 {
        let listed: Value = serde_json::from_str(&out).unwrap();
        for g in listed["groups"].as_array().unwrap() {
            let mut g = g.clone();
            let name = g["group"].as_str().unwrap().to_string();
            let row = g.as_object_mut().unwrap();
            row.remove("group");
            groups.insert(name, g);
        }
    } else {
        assert!(err.contains("no policy is stored"), "vmha group list: {code} {err}");
    }
    json!({"vclusters": vclusters, "groups": groups})
}

/// The machine's own /etc/cockpit/cockpit.conf (None when absent): the lab must never touch it.
fn machine_cockpit_conf() -> Option<String> {
    std::fs::read_to_string("/etc/cockpit/cockpit.conf").ok()
}

#[test]
#[ignore = "lab scenario: needs root, the lab's daemons, cockpit-ws and chromium-driver (run ci/test)"]
fn cockpit_page_shows_moves_and_follows_failover_and_shows_refusals() {
    let machine_conf = machine_cockpit_conf();
    let lab = vmha_e2e::lab_with_vmhad();
    let addr = lab.cfg.host_address(N);

    // The page where the cockpit-vmha package puts it; plain HTTP allowed in this host's /etc only.
    for f in PAGE_FILES {
        lab.install(
            N,
            &repo().join("cockpit").join(f),
            &format!("/usr/share/cockpit/vmha/{f}"),
            "0644",
        )
        .unwrap();
    }
    let packages = lab.exec_ok(N, &["cockpit-bridge", "--packages"]).unwrap();
    assert!(
        packages.lines().any(|l| l.starts_with("vmha ")),
        "cockpit-bridge finds the page: {packages}"
    );
    lab.exec_ok(
        N,
        &[
            "sh",
            "-c",
            "mkdir -p /etc/cockpit && printf '[WebService]\\nAllowUnencrypted = true\\n' > /etc/cockpit/cockpit.conf",
        ],
    )
    .unwrap();
    assert_eq!(
        machine_cockpit_conf(),
        machine_conf,
        "the machine's /etc/cockpit changed"
    );

    // The host's own accounts: alice may manage (haclient), bob may only look.
    for (user, groups) in [("alice", Some("haclient")), ("bob", None)] {
        let mut args = vec!["useradd", "--no-create-home", "--user-group", "--shell", "/bin/sh"];
        if let Some(g) = groups {
            args.extend(["--groups", g]);
        }
        args.push(user);
        lab.exec_ok(N, &args).unwrap();
        lab.exec_ok(
            N,
            &["sh", "-c", &format!("echo '{user}:{user}-lab-password' | chpasswd")],
        )
        .unwrap();
    }

    let ws = lab
        .exec_ok(
            N,
            &[
                "sh",
                "-c",
                &format!(
                    "/usr/lib/cockpit/cockpit-ws --no-tls --port {PORT} --address {addr} \
                     > /var/log/vmha/cockpit-ws.log 2>&1 < /dev/null & echo $!"
                ),
            ],
        )
        .unwrap();
    println!("cockpit-ws on {addr}:{PORT} (pid {} in host {N})", ws.trim());
    wait_for(
        "cockpit-ws to listen",
        Duration::from_secs(30),
        Duration::from_millis(200),
        || {
            let probe = format!("exec 3<>/dev/tcp/{addr}/{PORT}");
            lab.exec(N, &["bash", "-c", &probe]).ok().filter(|o| o.status.success())
        },
    )
    .unwrap();

    for vm in ["vm1", "vm2"] {
        let xml = lab.write_domain_xml(&GuestSpec::new(vm)).unwrap();
        lab.exec_ok(1, &["vmha", "vm", "add", vm, "--config", xml.to_str().unwrap()])
            .unwrap();
    }
    let on1 = wait_running(&lab, "vm1", Duration::from_secs(90));
    let on2 = wait_running(&lab, "vm2", Duration::from_secs(90));

    // alice signs in and sees the cluster as Pacemaker has it.
    let mut b = Browser::start(&lab, &format!("http://{addr}:{PORT}"));
    let long = Duration::from_secs(150);
    let login = b.ask(
        json!({"cmd": "login", "user": "alice", "password": "alice-lab-password"}),
        long,
    );
    assert_eq!(login["user"], "alice", "{login}");
    let seen = b.ask(json!({"cmd": "wait_cluster", "hosts": 3, "timeout": 60}), long);
    let hosts = seen["hosts"].as_object().unwrap();
    assert_eq!(hosts.len(), 3, "three host columns: {seen}");
    for n in lab.cfg.host_numbers() {
        assert_eq!(hosts[&host(n)], "online", "{seen}");
    }
    assert!(
        seen["dc"].as_str().is_some_and(|dc| hosts.contains_key(dc)),
        "the DC is one of the hosts: {seen}"
    );
    for (vm, on) in [("vm1", on1), ("vm2", on2)] {
        b.ask(
            json!({"cmd": "wait_vm", "vm": vm, "host": host(on), "timeout": 30}),
            long,
        );
    }
    b.ask(json!({"cmd": "screenshot", "name": "cluster"}), long);

    // What if vm1's host failed? The page's answer (vmhad's WhatIf) is what `vmha what-if --json` says for
    // that host, VM by VM, and asking changed nothing in the CIB.
    let before = config_version(&lab);
    let t0 = Instant::now();
    let page = b.ask(
        json!({"cmd": "whatif", "host": host(on1), "timeout": 90, "screenshot": "what-if"}),
        long,
    );
    println!(
        "what-if of {} on the page: {:.1} s",
        host(on1),
        t0.elapsed().as_secs_f64()
    );
    let cli = vmha_json(&lab, N, &["what-if", "--fail", &host(on1)]).unwrap();
    assert_eq!(cli["failed_hosts"], json!([host(on1)]), "{cli}");
    let expected = then_on(&cli["vms"]);
    let shown: std::collections::BTreeMap<String, (String, String)> = page["vms"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(vm, v)| {
            (
                vm.clone(),
                (v[0].as_str().unwrap().to_string(), v[1].as_str().unwrap().to_string()),
            )
        })
        .collect();
    assert_eq!(shown, expected, "the page's what-if is the CLI's: {page} vs {cli}");
    assert!(shown.contains_key("vm1") && shown.contains_key("vm2"), "{page}");
    assert_ne!(shown["vm1"].1, host(on1), "vm1 leaves the failed host: {page}");
    assert_eq!(
        config_version(&lab),
        before,
        "the what-if changed the CIB's configuration"
    );
    assert_eq!(page["same_load"], true, "{page}");

    // alice live-clones vm2 from the page and follows the job step by step until the clone runs.
    wait_for("vm2's guest channel", Duration::from_secs(90), POLL, || {
        let (code, _, _) = vmha_run(&lab, on2, &["vm", "request", "vm2", "test-ok", "--timeout-ms", "5000"]);
        (code == 0).then_some(())
    })
    .unwrap();
    b.ask(json!({"cmd": "trace_jobs"}), long);
    let t0 = Instant::now();
    let cloned = b.ask(
        json!({"cmd": "act", "key": "vm-clone-vm2", "fill": {"id": "clone-name", "value": "vm2c"}}),
        long,
    );
    assert_eq!(cloned["outcome"], "done", "alice's clone: {cloned}");
    let job = b.ask(
        json!({"cmd": "wait_job", "kind": "clone", "timeout": 150, "screenshot": "clone-done"}),
        Duration::from_secs(170),
    );
    let steps: Vec<&str> = job["trace"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["state"] == "running")
        .map(|e| e["text"].as_str().unwrap())
        .collect();
    println!(
        "clone of vm2 from the page: {:.1} s, {} steps shown: {steps:?}",
        t0.elapsed().as_secs_f64(),
        steps.len()
    );
    assert!(steps.len() >= 3, "the clone's progress shown step by step: {job}");
    assert!(
        steps.iter().any(|s| s.contains("prepare")),
        "the guest's prepare step shown: {job}"
    );
    let at = wait_running(&lab, "vm2c", Duration::from_secs(90));
    b.ask(
        json!({"cmd": "wait_vm", "vm": "vm2c", "host": host(at), "timeout": 30}),
        long,
    );

    // Virtual clusters and elastic groups: none at first; then a virtual cluster and two groups are made
    // on other hosts, and a member added, and each time the page shows what `vmha vcluster list` and `vmha
    // group list` list, without a reload (from the Cluster's PropertiesChanged).
    let empty = cli_lists(&lab);
    assert_eq!(empty, json!({"vclusters": {}, "groups": {}}), "a lab without either");
    b.wait_lists(&empty, 10, None);
    let t0 = Instant::now();
    lab.exec_ok(2, &["vmha", "vcluster", "create", "pair", "vm1", "vm2"])
        .unwrap();
    let listed = cli_lists(&lab);
    assert_eq!(listed["vclusters"], json!({"pair": ["vm1", "vm2"]}), "{listed}");
    let shown = b.wait_lists(&listed, 15, None);
    println!(
        "virtual cluster pair on the page within {:.1} s of running `vmha vcluster create` (the CLI's list \
         commands included; {:.2} s of waiting on the page after them)",
        t0.elapsed().as_secs_f64(),
        shown["seconds"].as_f64().unwrap()
    );
    assert_eq!(shown["same_load"], true, "no reload: {shown}");
    let policy = json!({"groups": {
        "web": {"members": ["vm2"], "template": "vm2", "min": 1, "max": 3},
        "db": {"members": ["vm1"], "template": "vm1", "min": 1, "max": 2},
    }});
    let file = lab.cfg.shared_dir().join("cockpit-group-policy.json");
    std::fs::write(&file, policy.to_string()).unwrap();
    let t0 = Instant::now();
    lab.exec_ok(3, &["vmha", "policy", "set", file.to_str().unwrap()])
        .unwrap();
    lab.exec_ok(2, &["vmha", "vcluster", "add", "pair", "vm2c"]).unwrap();
    let listed = cli_lists(&lab);
    assert_eq!(listed["vclusters"], json!({"pair": ["vm1", "vm2", "vm2c"]}), "{listed}");
    let groups = listed["groups"].as_object().unwrap();
    assert_eq!(groups.keys().collect::<Vec<_>>(), ["db", "web"], "{listed}");
    assert_eq!(
        groups["web"]["members"],
        json!([{"vm": "vm2", "host": host(on2)}]),
        "{listed}"
    );
    let shown = b.wait_lists(&listed, 15, Some("lists"));
    println!(
        "the groups and the new member on the page within {:.1} s of running `vmha policy set` ({:.2} s of \
         waiting on the page after the CLI's list commands)",
        t0.elapsed().as_secs_f64(),
        shown["seconds"].as_f64().unwrap()
    );
    assert_eq!(shown["same_load"], true, "no reload: {shown}");

    // alice captures virtual cluster pair from the page into vmhad's archive store on host N (by name: no
    // file descriptor crosses Cockpit's bridge), and the archive is listed; then she asks for the plan of an
    // instantiate of it under another name (a dry run: the page offers an instantiate only after a plan).
    let t0 = Instant::now();
    let capture = b.ask(
        json!({"cmd": "act", "key": "vcluster-capture-pair", "fill": {"id": "capture-archive", "value": "pair-page"}}),
        long,
    );
    assert_eq!(capture["outcome"], "done", "alice's capture: {capture}");
    assert_eq!(
        capture["focused"], "capture-archive",
        "the name field takes the focus: {capture}"
    );
    let listed_archives = b.ask(
        json!({"cmd": "wait_archive", "name": "pair-page", "timeout": 120}),
        Duration::from_secs(130),
    );
    assert_eq!(listed_archives["archives"], json!(["pair-page"]), "{listed_archives}");
    let stat = lab
        .exec_ok(N, &["stat", "-c", "%a %U %F", "/var/lib/vmha/archives/pair-page.vmha"])
        .unwrap();
    assert_eq!(
        stat.trim(),
        "600 root regular file",
        "the stored archive is root's alone"
    );
    let leftovers = lab.exec_ok(N, &["ls", "-A", "/var/lib/vmha/archives"]).unwrap();
    assert_eq!(leftovers.trim(), "pair-page.vmha", "no partial file is left");
    println!(
        "virtual cluster pair captured from the page into the archive store and listed in {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    let before = cli_lists(&lab);
    let plan = b.plan("pair-page", json!({"id": "plan-name", "value": "pair2"}), "plan");
    // In the cluster it was captured from, vmhad's planning rejects it (its resources' ids are in use, no
    // storage directory is mapped): the page says so with vmhad's reason and offers no instantiate.
    assert_eq!(plan["state"], "failed", "{plan}");
    let title = plan["title"].as_str().unwrap();
    assert!(
        title.starts_with("No plan for pair-page: the archive was rejected")
            && title.contains("ids already in use on this cluster: vm1"),
        "vmhad's reason on the page: {plan}"
    );
    assert_eq!(
        plan["run_offered"], false,
        "no instantiate offered without a plan: {plan}"
    );
    assert_eq!(cli_lists(&lab), before, "the dry run created nothing");

    // The whole round from the page where it can succeed: a virtual cluster of the clone alone is captured
    // from the page; the operator removes the clone on a host (`vmha vm remove --destroy`: resource, tag
    // membership and domain file gone); the page's plan of the archive, with the lab's storage mapped onto
    // itself, lists no problem and offers the instantiate, which brings the clone back as it was captured.
    lab.exec_ok(2, &["vmha", "vcluster", "create", "solo", "vm2c"]).unwrap();
    let listed = cli_lists(&lab);
    assert_eq!(listed["vclusters"]["solo"], json!(["vm2c"]), "{listed}");
    b.wait_lists(&listed, 15, None);
    let capture = b.ask(
        json!({"cmd": "act", "key": "vcluster-capture-solo", "fill": {"id": "capture-archive", "value": "solo-page"}}),
        long,
    );
    assert_eq!(capture["outcome"], "done", "alice's capture of solo: {capture}");
    b.ask(
        json!({"cmd": "wait_archive", "name": "solo-page", "timeout": 120}),
        Duration::from_secs(130),
    );
    let vm2c_at = wait_running(&lab, "vm2c", Duration::from_secs(5));
    lab.exec_ok(2, &["vmha", "vm", "remove", "vm2c", "--destroy"]).unwrap();
    let listed = cli_lists(&lab);
    assert_eq!(
        listed["vclusters"],
        json!({"pair": ["vm1", "vm2"]}),
        "the removed clone left both virtual clusters (solo, empty, is gone): {listed}"
    );
    let maps = format!(
        "storage={shared}:{shared} storage={images}:{images}",
        shared = lab.cfg.shared_dir().display(),
        images = vmha_lab::guest::image_dir().display()
    );
    let before = cli_lists(&lab);
    let plan = b.plan("solo-page", json!([{"id": "plan-maps", "value": maps}]), "plan-ok");
    assert_eq!(plan["state"], "succeeded", "{plan}");
    assert_eq!(plan["problems"], json!([]), "{plan}");
    assert_eq!(
        plan["run_offered"], true,
        "the page offers the planned instantiate: {plan}"
    );
    assert!(
        plan["text"].as_str().unwrap().contains("vm2c"),
        "the plan shows what it would create: {plan}"
    );
    assert_eq!(cli_lists(&lab), before, "the dry run created nothing");
    b.ask(json!({"cmd": "trace_jobs"}), long);
    let t0 = Instant::now();
    let run = b.ask(json!({"cmd": "act", "key": "plan-run"}), long);
    assert_eq!(run["outcome"], "done", "alice's instantiate as planned: {run}");
    let notice = run["notice"].as_str().unwrap();
    let job = notice
        .split("(job ")
        .nth(1)
        .and_then(|rest| rest.split(')').next())
        .unwrap_or_else(|| panic!("the notice names the job: {run}"));
    let done = b.ask(
        json!({"cmd": "wait_job", "kind": "instantiate", "job": job, "timeout": 150, "screenshot": "instantiate-done"}),
        Duration::from_secs(170),
    );
    assert!(
        done["final"]["text"]
            .as_str()
            .unwrap()
            .starts_with("instantiate from archive solo-page: succeeded"),
        "the job names the archive: {done}"
    );
    println!(
        "instantiate of solo-page from the page's plan: {:.1} s, job {}",
        t0.elapsed().as_secs_f64(),
        done["final"]
    );
    let back_at = wait_running(&lab, "vm2c", Duration::from_secs(90));
    b.ask(
        json!({"cmd": "wait_vm", "vm": "vm2c", "host": host(back_at), "timeout": 30}),
        long,
    );
    let listed = cli_lists(&lab);
    assert_eq!(
        listed["vclusters"]["solo"],
        json!(["vm2c"]),
        "the tag is back: {listed}"
    );
    println!(
        "vm2c ran on {} before the removal, on {} after the instantiate",
        host(vm2c_at),
        host(back_at)
    );

    // alice moves vm1 (keyboard: the dialog takes the focus) to a host other than the browser's.
    let to = lab.cfg.host_numbers().find(|&n| n != N && n != on1).unwrap();
    let t0 = Instant::now();
    let moved = b.ask(
        json!({"cmd": "act", "key": "vm-move-vm1", "select": {"id": "move-host", "value": host(to)}}),
        long,
    );
    assert_eq!(moved["outcome"], "done", "alice's move: {moved}");
    assert_eq!(moved["focus_in_dialog"], true, "{moved}");
    assert_eq!(wait_running(&lab, "vm1", Duration::from_secs(90)), to);
    let arrived = b.ask(
        json!({"cmd": "wait_vm", "vm": "vm1", "host": host(to), "timeout": 30}),
        long,
    );
    println!(
        "vm1 moved {} -> {} through the page: on the page {:.1} s after the click",
        host(on1),
        host(to),
        t0.elapsed().as_secs_f64()
    );
    assert_eq!(arrived["host"], host(to));
    assert_eq!(arrived["same_load"], true, "no reload since sign-in: {arrived}");
    // Each host's readiness report (what `vmha check` reads), asked for again after that move's event.
    let ready = b.ask(json!({"cmd": "wait_readiness", "timeout": 20}), long);
    assert_eq!(ready["readiness"].as_object().map(|o| o.len()), Some(3), "{ready}");

    // The host vm1 now runs on loses power: Pacemaker fences it and restarts vm1 elsewhere, and the page
    // follows within seconds (from vmhad's signals, not a reload).
    let t0 = Instant::now();
    lab.power_off(to).unwrap();
    let back = wait_for(
        "vm1 running on a surviving host",
        Duration::from_secs(120),
        Duration::from_millis(250),
        || {
            let s = lab.status(N).ok()?;
            let n = lab.cfg.host_number(s.running_on("vm1")?)?;
            (n != to).then_some(n)
        },
    )
    .unwrap();
    let pacemaker_s = t0.elapsed().as_secs_f64();
    let shown = b.ask(
        json!({"cmd": "wait_vm", "vm": "vm1", "host": host(back), "timeout": 15}),
        long,
    );
    println!(
        "{} powered off: Pacemaker ran vm1 on {} after {pacemaker_s:.1} s; the page showed it {:.1} s after that \
         was seen",
        host(to),
        host(back),
        shown["seconds"].as_f64().unwrap()
    );
    assert_eq!(
        shown["same_load"], true,
        "the page followed the failover without being reloaded: {shown}"
    );
    let now = b.ask(json!({"cmd": "placement"}), long);
    assert_ne!(
        now["hosts"][&host(to)],
        "online",
        "the powered-off host is not shown online: {now}"
    );
    let events = b.ask(json!({"cmd": "events", "limit": 50}), long);
    assert!(
        events["events"].as_array().unwrap().iter().any(|e| e
            .as_str()
            .is_some_and(|e| e.contains("host-left") && e.contains(&host(to)))),
        "the event feed shows {} leaving: {events}",
        host(to)
    );
    b.ask(json!({"cmd": "screenshot", "name": "after-power-off"}), long);

    // bob sees the same and is refused, with vmhad's reason on the page; nothing changes.
    let login = b.ask(
        json!({"cmd": "login", "user": "bob", "password": "bob-lab-password"}),
        long,
    );
    assert_eq!(login["user"], "bob", "{login}");
    b.ask(
        json!({"cmd": "wait_vm", "vm": "vm1", "host": host(back), "timeout": 30}),
        long,
    );
    let refused = b.ask(
        json!({"cmd": "act", "key": "vm-stop-vm1", "screenshot": "refused"}),
        long,
    );
    assert_eq!(refused["outcome"], "refused", "bob's stop: {refused}");
    let reason = refused["error"].as_str().unwrap();
    assert!(
        reason.contains("org.vmha.Vmha1.manage") && reason.contains("AccessDenied"),
        "bob sees vmhad's reason: {reason}"
    );
    assert_eq!(
        wait_running(&lab, "vm1", Duration::from_secs(5)),
        back,
        "bob's refused stop changed nothing"
    );
    let capture = b.ask(
        json!({"cmd": "act", "key": "vcluster-capture-pair", "fill": {"id": "capture-archive", "value": "bob-page"}}),
        long,
    );
    assert_eq!(capture["outcome"], "refused", "bob's capture: {capture}");
    assert!(
        capture["error"].as_str().unwrap().contains("AccessDenied"),
        "bob sees vmhad's reason: {capture}"
    );
    assert_eq!(
        lab.exec_ok(N, &["ls", "-A", "/var/lib/vmha/archives"]).unwrap().trim(),
        "pair-page.vmha\nsolo-page.vmha",
        "bob's refused capture stored nothing"
    );
    // bob's group scale is refused with vmhad's reason too (vmhad checks who asks before anything else). He
    // opens db's Scale… by keyboard, and the dialog's labelled group list (focused first) offers the
    // groups vmhad lists; he picks web with the arrow keys, which sets the members' bounds to web's.
    let scale = b.ask(
        json!({"cmd": "scale", "from": "db", "group": "web", "size": 2, "screenshot": "scale-refused"}),
        long,
    );
    assert_eq!(
        scale["focused"], "scale-group",
        "the group list takes the focus: {scale}"
    );
    let fields = scale["fields"].as_array().unwrap();
    assert_eq!(fields[0]["label"], "Group", "{scale}");
    assert_eq!(
        fields[0]["options"],
        json!(["db", "web"]),
        "vmhad's groups to choose from: {scale}"
    );
    assert_eq!(fields[0]["value"], "web", "{scale}");
    assert_eq!(
        (&fields[1]["label"], &fields[1]["min"], &fields[1]["max"]),
        (&json!("Members"), &json!("1"), &json!("3")),
        "web's bounds: {scale}"
    );
    assert_eq!(scale["outcome"], "refused", "bob's scale: {scale}");
    let reason = scale["error"].as_str().unwrap();
    assert!(
        reason.contains("scale group web") && reason.contains("AccessDenied"),
        "bob sees vmhad's reason: {reason}"
    );

    // Readable in a narrow window: the host columns stack and nothing scrolls sideways.
    let narrow = b.ask(json!({"cmd": "narrow", "width": 420}), long);
    assert!(
        narrow["scroll_width"].as_f64().unwrap() <= narrow["viewport"].as_f64().unwrap() + 1.0,
        "no sideways scrolling in a narrow window: {narrow}"
    );

    // alice scales group web to 2 from the page: the job's steps show until it succeeds, and the group's
    // card then lists what `vmha group list` lists (the new member and where it runs), from vmhad's
    // signals. (Last: the scale applies the stored policy, which may place VMs anew.)
    let template_on = wait_running(&lab, "vm2", Duration::from_secs(90));
    wait_for("vm2's guest channel", Duration::from_secs(90), POLL, || {
        let (code, _, _) = vmha_run(
            &lab,
            template_on,
            &["vm", "request", "vm2", "test-ok", "--timeout-ms", "5000"],
        );
        (code == 0).then_some(())
    })
    .unwrap();
    b.ask(
        json!({"cmd": "login", "user": "alice", "password": "alice-lab-password"}),
        long,
    );
    b.ask(json!({"cmd": "trace_jobs"}), long);
    let t0 = Instant::now();
    let scaled = b.ask(json!({"cmd": "scale", "group": "web", "size": 2}), long);
    assert_eq!(scaled["outcome"], "done", "alice's scale: {scaled}");
    assert_eq!(
        scaled["fields"][1]["value"], "1",
        "the members start at web's size: {scaled}"
    );
    let job = b.ask(
        json!({"cmd": "wait_job", "kind": "scale", "timeout": 150, "screenshot": "scale-done"}),
        Duration::from_secs(170),
    );
    let steps = job["trace"].as_array().unwrap().len();
    let listed = wait_for(
        "web's two members running, as vmha group list lists them",
        Duration::from_secs(60),
        POLL,
        || {
            let l = cli_lists(&lab);
            let web = &l["groups"]["web"];
            let running = web["members"].as_array()?.iter().all(|m| m["host"].is_string());
            (web["size"] == 2 && running).then_some(l)
        },
    )
    .unwrap();
    let shown = b.wait_lists(&listed, 30, Some("scaled"));
    println!(
        "group web scaled 1 -> 2 from the page in {:.1} s ({steps} job lines shown); its card lists both members",
        t0.elapsed().as_secs_f64()
    );
    assert_eq!(shown["same_load"], true, "no reload: {shown}");
    drop(b);
    assert_eq!(
        machine_cockpit_conf(),
        machine_conf,
        "the machine's /etc/cockpit changed"
    );
}
