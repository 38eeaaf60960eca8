//! Disaster recovery between two sites with booth. Site A (2 hosts `sa1..2`) and site B (2 hosts
//! `sb1..2`) are two clusters on their own subnets, routed to each other and to booth's arbitrator in a
//! namespace of its own; booth's site daemon runs at each site as a cluster resource group (site address
//! and booth-site). A virtual cluster `shop` of two VMs with raw disks and an address runs at A, holding
//! ticket `shop` (expire 20 s):
//! - `vmha site protect` at A (rsc_ticket, capture with disks) and at B (rsc_ticket first, then the archive
//!   instantiated through the maps, held stopped by the ticket);
//! - `vmha site switchover` A -> B and back: what the guest wrote to its disk before each switchover is
//!   there after it; a 50 ms poll over every QEMU of the machine never sees the VM run twice, also when
//!   a switchover follows the last at once (its guests just booted: their stops take seconds);
//! - site A powered off while it runs the VM: booth grants the ticket to B after its expiry and B runs the
//!   VM from its copy (what was synced at the last switchover); A powered on again does not start it;
//! - failback: a switchover B -> A copies B's disk back, A runs the VM with what B wrote;
//! - `vmha site replicate` at A while the VM runs (refused at B, which lacks the ticket, and without a
//!   map): B's copy brought to a consistent point, the VM's QEMU untouched, no partial file left, B's
//!   `vmha site status` shows the replica's point; then `vmha site replication` (hostile settings refused)
//!   and vmhad's own rounds bring B's copy past a later write;
//! - the link between the sites cut with the arbitrator reachable from B only: A's lease runs out and A
//!   stops the VM (loss-policy stop, within booth's acquire-after), B takes the ticket and runs the VM
//!   from its copy, which has what A wrote before the rounds; the link back, A does not start it again.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmha_e2e::{domain_with_raw_disk, guest_exec, release_build, vmha_long, vmha_long_ok, POLL};
use vmha_lab::guest::image_dir;
use vmha_lab::process::run_with_deadline;
use vmha_lab::site::{Site, SiteLab, SiteLabConfig, BOOTH_AUTHKEY};
use vmha_lab::{wait_for, Lab};

const VM: &str = "stvm";
/// The virtual cluster's second VM and its address (an `ocf:heartbeat:IPaddr2` at `.60` of the site's
/// subnet, mapped to the other site's subnet by the protect).
const VM2: &str = "stvm2";
const IP: &str = "shopip";
const VC: &str = "shop";
const TICKET: &str = "shop";
const EXPIRE: u32 = 20;
const DISK_MIB: u64 = 16;

/// Site A on `$VMHA_E2E_SUBNET` (default 10.213.191), B on the next subnet, the arbitrator on the one after.
fn config() -> SiteLabConfig {
    let name = std::env::var("VMHA_E2E_LAB").unwrap_or_else(|_| "st".into());
    let subnet = std::env::var("VMHA_E2E_SUBNET").unwrap_or_else(|_| "10.213.191".into());
    SiteLabConfig::two_sites(
        &name,
        &subnet,
        ("sa", "sb"),
        vec![(TICKET.into(), EXPIRE)],
        vmha_e2e::with_test_timing,
    )
    .unwrap()
}

fn site_address(lab: &Lab) -> String {
    SiteLabConfig::site_address(&lab.cfg)
}

/// Whether the ticket is granted at a site, as `vmha site status` there says.
fn granted_here(lab: &Lab) -> Option<bool> {
    vmha_lab::site::granted_here(lab, TICKET)
}

/// The host of `lab` where Pacemaker runs the VM and exactly one QEMU runs it, once the whole virtual
/// cluster runs in `lab`: the second VM the same way, and its address.
fn running_at(lab: &Lab) -> Option<u8> {
    let s = lab.status_from_any().ok()?;
    s.running_on(IP)?;
    let mut hosts = [VM, VM2].into_iter().map(|vm| {
        let n = lab.cfg.host_number(s.running_on(vm)?)?;
        let q = lab.qemu_processes(vm);
        (q.len() == 1 && q[0].0 == n).then_some(n)
    });
    let n = hosts.next()??;
    hosts.next()??;
    Some(n)
}

/// Every member of the virtual cluster is defined in `lab` and none is active (held by the ticket).
fn held_stopped(lab: &Lab) -> bool {
    let s = lab.status(1).unwrap();
    [VM, VM2, IP].iter().all(|r| s.resource(r).is_some_and(|x| !x.active))
}

/// The host of `lab` that holds the virtual cluster's address (`.60` of the lab's subnet), by `ip addr`
/// there, where Pacemaker says it runs.
fn address_at(lab: &Lab) -> Option<u8> {
    let n = lab.cfg.host_number(lab.status_from_any().ok()?.running_on(IP)?)?;
    let out = lab.exec_ok(n, &["ip", "-o", "-4", "addr", "show"]).ok()?;
    out.contains(&format!(" {}.60/24 ", lab.cfg.subnet)).then_some(n)
}

/// Waits until the second VM's guest agent answers in `lab` (a capture or a replication round freezes
/// every guest of the virtual cluster through its agent; right after a start it is not connected yet).
fn wait_second_agent(lab: &Lab) {
    wait_for("the second guest's agent", Duration::from_secs(90), POLL, || {
        let n = lab.cfg.host_number(lab.status_from_any().ok()?.running_on(VM2)?)?;
        guest_exec(lab, n, VM2, "/bin/true", &[], Duration::from_secs(30)).ok()
    })
    .unwrap();
}

/// Whether any member of the virtual cluster runs in `lab`.
fn any_running(lab: &Lab) -> bool {
    let s = lab.status(1).or_else(|_| lab.status_from_any()).unwrap();
    [VM, VM2, IP].iter().any(|r| s.running_on(r).is_some())
}

fn wait_running_at(lab: &Lab, limit: Duration) -> u8 {
    wait_for(&format!("{VM} running at {}", lab.cfg.name), limit, POLL, || {
        running_at(lab)
    })
    .unwrap()
}

/// Writes `text` into sector `sector` of the guest's disk (synced), through qemu-guest-agent.
fn write_sector(lab: &Lab, n: u8, sector: u32, text: &str) {
    let script = format!(
        "printf '%s' '{text}' > /tmp/sector && dd if=/tmp/sector of=/dev/vda bs=512 count=1 seek={sector} conv=sync,fsync 2>&1"
    );
    // The guest agent may not answer in the first seconds after boot (the write is idempotent).
    let out = wait_for("the guest agent", Duration::from_secs(60), POLL, || {
        guest_exec(lab, n, VM, "/bin/sh", &["-c", &script], Duration::from_secs(30)).ok()
    })
    .unwrap();
    assert!(out.contains("1+0 records out"), "dd into /dev/vda: {out}");
}

fn read_sector(lab: &Lab, n: u8, sector: u32) -> String {
    let script = format!(
        "sync; echo 3 > /proc/sys/vm/drop_caches; dd if=/dev/vda bs=512 count=1 skip={sector} 2>/dev/null | tr -d '\\000'"
    );
    // The guest agent may not answer in the first seconds after boot.
    wait_for("the guest agent", Duration::from_secs(60), POLL, || {
        guest_exec(lab, n, VM, "/bin/sh", &["-c", &script], Duration::from_secs(30)).ok()
    })
    .unwrap()
}

#[test]
#[ignore = "lab scenario: needs root and the lab's daemons (run ci/test)"]
fn site_switchover_and_failover_with_booth() {
    vmha_lab::init_logging();
    let t0 = Instant::now();
    let cfg = config();
    let site_lab = SiteLab::up(cfg.clone()).expect("two sites and the arbitrator");
    println!(
        "two sites, router and arbitrator up in {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    let (a, b) = (&site_lab.a, &site_lab.b);
    for lab in [a, b] {
        lab.install_build(&release_build()).expect("installing the build");
        for n in lab.cfg.host_numbers() {
            lab.start_vmhad(n).expect("starting vmhad");
        }
    }
    let (addr_a, addr_b) = (site_address(a), site_address(b));

    // Hostile operator input: refused with a clear error, nothing changed.
    for (args, expect) in [
        (vec!["site", "protect", VC, "--ticket=-F", "--peer", &addr_b], "ticket"),
        (
            vec!["site", "protect", VC, "--ticket", "a;reboot", "--peer", &addr_b],
            "ticket",
        ),
        (
            vec!["site", "protect", VC, "--ticket", TICKET, "--peer", "10.0.0.1"],
            "not a site",
        ),
        (vec!["site", "switchover", VC, "--to=--help;x"], "site"),
        (
            vec!["site", "failover", "a/b", "--lost", &addr_a],
            "virtual cluster name",
        ),
    ] {
        let (code, out, err) = vmha_long(a, 1, &args);
        assert_ne!(code, 0, "{args:?} was accepted: {out}");
        assert!(err.contains(expect), "{args:?}: {err}");
    }

    // The ticket to A; the VM at A with a disk on A's storage, in virtual cluster `shop`.
    // Debian 12's booth client needs -s SITE and, after it, -c FILE (it crashes otherwise).
    a.exec_ok(
        1,
        &[
            "booth",
            "grant",
            "-w",
            "-s",
            &addr_a,
            TICKET,
            "-c",
            "/etc/booth/booth.conf",
        ],
    )
    .unwrap();
    wait_for("the ticket granted at A", Duration::from_secs(30), POLL, || {
        granted_here(a).filter(|g| *g)
    })
    .unwrap();
    assert_eq!(granted_here(b), Some(false));
    for vm in [VM, VM2] {
        let disk = a.cfg.shared_dir().join(format!("{vm}.img"));
        std::fs::File::create(&disk).unwrap().set_len(DISK_MIB << 20).unwrap();
        let xml = a.cfg.shared_dir().join(format!("{vm}.xml"));
        std::fs::write(&xml, domain_with_raw_disk(a, vm)).unwrap();
        vmha_long_ok(a, 1, &["vm", "add", vm, "--config", xml.to_str().unwrap()]);
    }
    a.exec_ok(
        1,
        &[
            "pcs",
            "resource",
            "create",
            IP,
            "ocf:heartbeat:IPaddr2",
            &format!("ip={}.60", a.cfg.subnet),
            "cidr_netmask=24",
            "op",
            "monitor",
            "interval=10s",
        ],
    )
    .unwrap();
    let n = wait_running_at(a, Duration::from_secs(90));
    vmha_long_ok(a, 1, &["vcluster", "create", VC, VM, VM2, IP]);
    write_sector(a, n, 100, "written-at-A-before-protect");
    // The protect's capture freezes both guests through their agents: the second's must answer too.
    wait_second_agent(a);

    // Never two QEMUs of the VM on this machine (both sites together), polled every 50 ms from here on.
    let stop = Arc::new(AtomicBool::new(false));
    let most = Arc::new(AtomicUsize::new(0));
    let polls = Arc::new(AtomicUsize::new(0));
    let poller = {
        let (stop, most, polls) = (Arc::clone(&stop), Arc::clone(&most), Arc::clone(&polls));
        let watcher = Lab::attach(a.cfg.clone()).unwrap();
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let count = watcher.qemu_processes(VM).len().max(watcher.qemu_processes(VM2).len());
                most.fetch_max(count, Ordering::Relaxed);
                polls.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };

    // Protect: A keeps running it and captures it; B gets it held stopped by the ticket.
    let archive = cfg.dir().join("shop.vmha");
    let _ = std::fs::remove_file(&archive);
    vmha_long_ok(
        a,
        1,
        &[
            "site",
            "protect",
            VC,
            "--ticket",
            TICKET,
            "--peer",
            &addr_b,
            "--archive",
            archive.to_str().unwrap(),
        ],
    );
    let storage_ab = format!(
        "storage={}:{}",
        a.cfg.shared_dir().display(),
        b.cfg.shared_dir().display()
    );
    let storage_ba = format!(
        "storage={}:{}",
        b.cfg.shared_dir().display(),
        a.cfg.shared_dir().display()
    );
    let images = format!("storage={}:{}", image_dir().display(), image_dir().display());
    let addresses = format!("address={}.0/24:{}.0/24", a.cfg.subnet, b.cfg.subnet);
    let protect_b = [
        "site",
        "protect",
        VC,
        "--ticket",
        TICKET,
        "--peer",
        &addr_a,
        "--from-archive",
        archive.to_str().unwrap(),
        "--map",
        "hosts=sa1:sb1,sa2:sb2",
        "--map",
        &addresses,
        "--map",
        &storage_ab,
        "--map",
        &images,
    ];
    // Hostile: B's booth key readable by others (booth's messages not safely authenticated there): the
    // protect is refused before it changes anything; with the key owner-only again it goes through.
    let config_b = || {
        b.exec_ok(1, &["cibadmin", "--query", "--scope", "configuration"])
            .unwrap()
    };
    let before = config_b();
    b.exec_ok(1, &["chmod", "0644", "/etc/booth/authkey"]).unwrap();
    let (code, out, err) = vmha_long(b, 1, &protect_b);
    b.exec_ok(1, &["chmod", "0600", "/etc/booth/authkey"]).unwrap();
    assert_ne!(code, 0, "protect with an open booth key was accepted: {out}");
    assert!(
        err.contains("booth's key file /etc/booth/authkey is accessible to others")
            && err.contains("mode 0644")
            && err.contains("nothing changed"),
        "{err}"
    );
    assert_eq!(config_b(), before, "a refused protect changes nothing at B");
    vmha_long_ok(b, 1, &protect_b);
    let status = vmha_long_ok(b, 1, &["site", "status"]);
    println!("site B after protect:\n{status}");
    assert!(status.contains("shop (loss-policy stop)"), "{status}");
    // booth's messages are authenticated with the lab's key, and vmha says so without a warning.
    assert!(
        status.contains("booth authentication: key /etc/booth/authkey\n"),
        "{status}"
    );
    assert!(!status.contains("warning: booth"), "{status}");
    // Hostile: from the arbitrator's network (which reaches both sites), a booth client without the key
    // asks site A to revoke the ticket. It is refused and A keeps the ticket and the VM.
    let forged = cfg.dir().join("forged.conf");
    std::fs::write(
        &forged,
        cfg.booth_conf(BOOTH_AUTHKEY)
            .replace("authfile = /etc/booth/authkey\n", ""),
    )
    .unwrap();
    let revoke = run_with_deadline(
        "ip",
        &[
            "netns",
            "exec",
            &cfg.arbitrator_netns(),
            "booth",
            "revoke",
            "-s",
            &addr_a,
            TICKET,
            "-c",
            forged.to_str().unwrap(),
        ],
        Duration::from_secs(30),
    )
    .unwrap();
    println!(
        "booth revoke without the key: {} {}",
        revoke.status,
        String::from_utf8_lossy(&revoke.stderr).trim()
    );
    assert!(
        !revoke.status.success(),
        "booth revoked the ticket for a client without the key"
    );
    assert_eq!(
        granted_here(a),
        Some(true),
        "site A lost the ticket to a client without the key"
    );
    assert_eq!(running_at(a), Some(n), "the VM at A after the forged revoke");
    // What-if at B: site A lost, B takes its ticket: the VM would start at B, and nothing changed.
    let configuration = |lab: &Lab| {
        lab.exec_ok(1, &["cibadmin", "--query", "--scope", "configuration"])
            .unwrap()
    };
    let config_before = configuration(b);
    let what_if = vmha_long_ok(b, 1, &["site", "what-if", "--lost", &addr_a]);
    println!("site B, what if A is lost:\n{what_if}");
    assert!(
        what_if
            .lines()
            .any(|l| l.starts_with(VM) && l.contains(&format!(" {VC} ")) && l.contains("starts on sb")),
        "{what_if}"
    );
    assert!(
        what_if.contains("takeover: every protected VM gets a place here"),
        "{what_if}"
    );
    let through_what_if = vmha_long_ok(b, 1, &["what-if", "--fail-site", &addr_a]);
    assert_eq!(
        through_what_if, what_if,
        "vmha what-if --fail-site answers as vmha site what-if"
    );
    assert_eq!(configuration(b), config_before, "the what-if changed B's configuration");
    assert_eq!(granted_here(b), Some(false), "the what-if granted the ticket at B");
    // Held stopped at B while A runs it.
    assert!(held_stopped(b));
    assert_eq!(running_at(a), Some(n));
    assert!(address_at(a).is_some(), "the address is not up at A");

    // Switchover A -> B.
    let t = Instant::now();
    vmha_long_ok(a, 1, &["site", "switchover", VC, "--to", &addr_b, "--map", &storage_ab]);
    wait_running_at(b, Duration::from_secs(90));
    println!(
        "switchover A -> B: VM running at B after {:.1} s",
        t.elapsed().as_secs_f64()
    );
    // At once back and forth again: the guests have just booted and ignore the ACPI shutdown for a
    // while, so each stop takes seconds. The switchover waits until Pacemaker's stop completed (a
    // pending stop in the history is a VM still running), so the poller never sees a VM at both sites.
    for (from, to, addr, map) in [(b, a, &addr_a, &storage_ba), (a, b, &addr_b, &storage_ab)] {
        let t = Instant::now();
        vmha_long_ok(from, 1, &["site", "switchover", VC, "--to", addr, "--map", map]);
        wait_running_at(to, Duration::from_secs(90));
        println!(
            "switchover at once {} -> {}: running after {:.1} s",
            from.cfg.name,
            to.cfg.name,
            t.elapsed().as_secs_f64()
        );
    }
    let nb = wait_running_at(b, Duration::from_secs(90));
    assert_eq!(read_sector(b, nb, 100), "written-at-A-before-protect");
    assert_eq!(granted_here(a), Some(false));
    assert!(held_stopped(a));
    // The address moved with it, mapped to B's subnet.
    wait_for("the address up at B", Duration::from_secs(30), POLL, || address_at(b)).unwrap();
    write_sector(b, nb, 101, "written-at-B");

    // Switchover B -> A.
    let t = Instant::now();
    vmha_long_ok(b, 1, &["site", "switchover", VC, "--to", &addr_a, "--map", &storage_ba]);
    let na = wait_running_at(a, Duration::from_secs(90));
    println!(
        "switchover B -> A: VM running at A after {:.1} s",
        t.elapsed().as_secs_f64()
    );
    assert_eq!(read_sector(a, na, 101), "written-at-B");
    assert_eq!(read_sector(a, na, 100), "written-at-A-before-protect");

    // Site A lost: B runs the VM after the ticket's expiry, from its copy.
    let t = Instant::now();
    site_lab.power_off_site(Site::A).unwrap();
    let nb = wait_running_at(b, Duration::from_secs(u64::from(EXPIRE) + 90));
    let rto = t.elapsed().as_secs_f64();
    println!("site A powered off: VM running at B after {rto:.1} s (ticket expire {EXPIRE} s)");
    // Booth renews the lease every expire/2: at the power-off at least half of it was left, and B may
    // take the ticket only once it has run out.
    assert!(
        rto >= f64::from(EXPIRE) / 2.0 - 0.5,
        "B started it before A's lease can have run out ({rto:.1} s)"
    );
    assert_eq!(read_sector(b, nb, 101), "written-at-B");

    // A comes back: its cluster forms, booth there learns B holds the ticket, the VM stays off at A.
    site_lab.power_on_site(Site::A).unwrap();
    wait_for("booth running at A again", Duration::from_secs(120), POLL, || {
        a.status_from_any().ok()?.running_on("booth-site").map(|_| ())
    })
    .unwrap();
    let back = Instant::now();
    while back.elapsed() < Duration::from_secs(15) {
        assert!(!granted_here(a).unwrap_or(false), "the ticket came back to A");
        assert!(!any_running(a), "A started the virtual cluster again");
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(running_at(b), Some(nb));

    // Failback after resync: a switchover B -> A copies B's disk back over A's stale copy.
    let t = Instant::now();
    vmha_long_ok(b, 1, &["site", "switchover", VC, "--to", &addr_a, "--map", &storage_ba]);
    let na = wait_running_at(a, Duration::from_secs(90));
    println!(
        "failback B -> A: VM running at A after {:.1} s",
        t.elapsed().as_secs_f64()
    );
    assert_eq!(read_sector(a, na, 101), "written-at-B");
    write_sector(a, na, 102, "written-at-A-after-failback");
    wait_second_agent(a);

    // Replication while running: B's copy brought to one consistent point while the VM runs on at A.
    // Hostile first: at B (the ticket is at A, so B's copy could be in use) and without a map: refused.
    let (code, out, err) = vmha_long(b, 1, &["site", "replicate", VC, "--map", &storage_ba]);
    assert_ne!(code, 0, "replicate at the site without the ticket was accepted: {out}");
    assert!(err.contains("is not granted at this site"), "{err}");
    let (code, out, err) = vmha_long(a, 1, &["site", "replicate", VC]);
    assert_ne!(code, 0, "replicate without a map was accepted: {out}");
    assert!(err.contains("no --map storage="), "{err}");
    let qemu_before = a.qemu_processes(VM);
    let t = Instant::now();
    let out = vmha_long_ok(a, 1, &["site", "replicate", VC, "--map", &storage_ab]);
    println!(
        "replicate A -> B while running ({:.1} s by the test's clock): {}",
        t.elapsed().as_secs_f64(),
        out.trim()
    );
    let point = out
        .split("consistent point ")
        .nth(1)
        .and_then(|r| r.split(',').next())
        .unwrap_or_else(|| panic!("no consistent point in {out}"))
        .to_string();
    assert_eq!(
        a.qemu_processes(VM),
        qemu_before,
        "the VM's QEMU changed during the replication"
    );
    assert_eq!(running_at(a), Some(na));
    let leftovers: Vec<_> = std::fs::read_dir(b.cfg.shared_dir())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".vmha-replica"))
        .collect();
    assert!(leftovers.is_empty(), "partial copies left at B: {leftovers:?}");
    let status = vmha_long_ok(b, 1, &["site", "status"]);
    assert!(
        status.contains(&format!("replica here of {VC}: disks as of {point} (")),
        "B's status does not show the replica's point {point}:\n{status}"
    );
    write_sector(a, na, 103, "written-at-A-after-replicate");
    let written = Instant::now();

    // Replication by vmhad: A's DC runs a round every 5 s while A holds the ticket. Hostile settings
    // first: refused, nothing stored.
    for (args, expect) in [
        (vec!["--every", "1", "--map", storage_ab.as_str()], "must be 5 to 86400"),
        (
            vec!["--every", "5", "--map", "hosts=sa1:sb1"],
            "only storage=/HERE:/PEER",
        ),
        (vec!["--every", "5", "--map", "storage=relative:/x"], "storage"),
        (
            vec!["--every", "5", "--stale-after", "4", "--map", storage_ab.as_str()],
            "must be one period (every=5) to 604800",
        ),
    ] {
        let mut all = vec!["site", "replication", VC];
        all.extend(args.iter().copied());
        let (code, out, err) = vmha_long(a, 1, &all);
        assert_ne!(code, 0, "{all:?} was accepted: {out}");
        assert!(err.contains(expect), "{all:?}: {err}");
    }
    assert!(!vmha_long_ok(a, 1, &["site", "status"]).contains("replication of"));
    // The rounds run on A's DC; its vmhad tells each on the bus (`vmha watch` there, in the background).
    let dc_a = a
        .status_from_any()
        .ok()
        .and_then(|s| s.dc)
        .and_then(|d| a.cfg.host_number(&d))
        .expect("site A has a DC");
    let watch_log = a.cfg.dir().join("watch-replication.log");
    let mut watch = a
        .command(dc_a, &["vmha", "watch"])
        .unwrap()
        .stdout(std::fs::File::create(&watch_log).unwrap())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    vmha_long_ok(
        a,
        1,
        &[
            "site",
            "replication",
            VC,
            "--every",
            "5",
            "--stale-after",
            "10",
            "--map",
            &storage_ab,
        ],
    );
    // B's copy gets a point after the write within two periods or so, by vmhad alone.
    let t = Instant::now();
    let age = wait_for("a replication round by vmhad", Duration::from_secs(60), POLL, || {
        let (code, out, _) = vmha_long(b, 1, &["--output", "json", "site", "status"]);
        let v: serde_json::Value = serde_json::from_str(&out).ok().filter(|_| code == 0)?;
        let age = v["replicas"].as_array()?.iter().find(|r| r["vcluster"] == VC)?["age_seconds"].as_u64()?;
        (age + 1 < written.elapsed().as_secs()).then_some(age)
    })
    .unwrap();
    println!(
        "vmhad's replication: B's copy {age} s old, {:.1} s after it was set",
        t.elapsed().as_secs_f64()
    );
    // The events `vmha watch` on A's DC printed: the first line after `after` lines that has `text`.
    let watched = |what: &str, text: &str, after: usize, limit: u64| {
        wait_for(what, Duration::from_secs(limit), POLL, || {
            let log = std::fs::read_to_string(&watch_log).ok()?;
            let lines: Vec<&str> = log.lines().collect();
            let at = lines.iter().skip(after).position(|l| l.contains(text))? + after;
            Some((at, lines[at].to_string()))
        })
        .unwrap_or_else(|e| {
            panic!(
                "{e}: vmha watch on A's DC printed:\n{}",
                std::fs::read_to_string(&watch_log).unwrap_or_default()
            )
        })
    };
    let (at, told) = watched(
        "the round's Event on A's DC",
        &format!(" replication {VC} replicated to the peer site: "),
        0,
        30,
    );
    println!("vmha watch on A's DC: {told}");
    // Rounds that fail: B's image of the second VM moved aside and a directory in its place, so the
    // rename onto it fails. Each failure is an event, and after 10 s (`--stale-after 10`) without a round
    // that succeeded, `replica-stale` once. The first failed round had committed (its record written
    // before its renames): its copies stay at B with its record, to be completed; the rounds after it
    // fail completing it, before they copy anything. Then the image back: the next round completes the
    // committed one, replicates, and `replica-current` says so; no record and no copy of a failed round
    // is left at B.
    let b_image = b.cfg.shared_dir().join(format!("{VM2}.img"));
    let aside = b.cfg.shared_dir().join(format!("{VM2}.img.aside"));
    std::fs::rename(&b_image, &aside).unwrap();
    std::fs::create_dir(&b_image).unwrap();
    std::fs::write(b_image.join("keep"), b"").unwrap();
    let broken = Instant::now();
    let (at, failed) = watched(
        "a failed round's Event",
        &format!(" replication-failed {VC} replication round failed"),
        at + 1,
        30,
    );
    println!("vmha watch on A's DC: {failed}");
    assert!(failed.contains("renaming"), "{failed}");
    let (at, stale) = watched("replica-stale", &format!(" replica-stale {VC} replica stale: "), at, 60);
    let stale_after = broken.elapsed().as_secs_f64();
    println!("vmha watch on A's DC, {stale_after:.1} s after the rounds began to fail: {stale}");
    assert!(stale.contains("stale after 10 s"), "{stale}");
    // The count runs from the last round that succeeded, at most a period (and a round) before.
    assert!(
        stale_after >= 4.0,
        "stale {stale_after:.1} s after the rounds began to fail: sooner than the limit allows"
    );
    // Each failed round's event names its partial copy (`.IMAGE.ROUND.vmha-replica`) and comes after the
    // round removed its copies; a round running now has partial copies of its own, with another id.
    let failed_rounds: Vec<String> = std::fs::read_to_string(&watch_log)
        .unwrap()
        .lines()
        .filter(|l| l.contains(&format!(" replication-failed {VC} ")))
        .filter_map(|l| {
            let after = l.split(&format!(".{VM2}.img.")).nth(1)?;
            Some(after.split(".vmha-replica").next()?.to_string())
        })
        .collect();
    assert!(!failed_rounds.is_empty(), "no failed round named its copy");
    let at_b = || -> (Vec<String>, Vec<String>) {
        let names: Vec<String> = std::fs::read_dir(b.cfg.shared_dir())
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .collect();
        let records = names
            .iter()
            .filter_map(|n| Some(n.strip_prefix(".vmha-round-")?.strip_suffix(".json")?.to_string()))
            .collect();
        let partials = names
            .into_iter()
            .filter(|n| n.ends_with(".vmha-replica") && failed_rounds.iter().any(|id| n.contains(id.as_str())))
            .collect();
        (records, partials)
    };
    let (records, partials) = at_b();
    assert_eq!(records.len(), 1, "one committed round's record at B: {records:?}");
    let committed = &records[0];
    assert!(
        failed_rounds.iter().all(|id| id == committed),
        "every failed round names the committed round's copy (the later ones fail completing it): \
         {failed_rounds:?}, committed {committed}"
    );
    assert_eq!(
        partials,
        vec![format!(".{VM2}.img.{committed}.vmha-replica")],
        "the committed round's copy that could not be renamed waits at B"
    );
    println!(
        "{} failed round(s): round {committed} committed, its copy of {VM2} and its record wait at B",
        failed_rounds.len()
    );
    std::fs::remove_dir_all(&b_image).unwrap();
    std::fs::rename(&aside, &b_image).unwrap();
    let (_, current) = watched(
        "replica-current",
        &format!(" replica-current {VC} replica current again"),
        at,
        30,
    );
    println!("vmha watch on A's DC: {current}");
    let (records, partials) = at_b();
    assert!(
        records.is_empty() && partials.is_empty(),
        "left at B after the rounds succeeded again: records {records:?}, copies {partials:?}"
    );
    let _ = watch.kill();
    let _ = watch.wait();
    let status_a = vmha_long_ok(a, 1, &["site", "status"]);
    assert!(
        status_a.contains(&format!("replication of {VC} by vmhad: every=5 stale=10 storage="))
            && status_a.contains("; the peer's copies as of"),
        "{status_a}"
    );

    // The link between the sites cut, the arbitrator reachable from B only (A's leg of the router
    // down): A's lease runs out, A stops the VM (loss-policy stop) within acquire-after, B and the
    // arbitrator move the ticket to B, and B starts the VM from its copy. Never both (the poller).
    let t = Instant::now();
    site_lab.cut_site(Site::A).unwrap();
    let nb = wait_running_at(b, Duration::from_secs(u64::from(EXPIRE) * 2 + 90));
    let rto = t.elapsed().as_secs_f64();
    println!(
        "link to A cut: VM running at B after {rto:.1} s (expire {EXPIRE} s, acquire-after {} s)",
        EXPIRE / 2
    );
    assert!(
        rto >= f64::from(EXPIRE) / 2.0 - 0.5,
        "B started it before A's lease can have run out ({rto:.1} s)"
    );
    assert!(
        !any_running(a),
        "A still runs the virtual cluster after losing the ticket"
    );
    assert_eq!(granted_here(a), Some(false), "A still holds the ticket");
    assert_eq!(read_sector(b, nb, 101), "written-at-B");
    // A's writes before the manual round and before vmhad's round are at B.
    assert_eq!(read_sector(b, nb, 102), "written-at-A-after-failback");
    assert_eq!(read_sector(b, nb, 103), "written-at-A-after-replicate");
    // The link back: booth at A learns B holds the ticket; A does not start the VM again.
    site_lab.heal_site(Site::A).unwrap();
    let healed = Instant::now();
    while healed.elapsed() < Duration::from_secs(u64::from(EXPIRE)) {
        assert!(!granted_here(a).unwrap_or(false), "the ticket came back to A");
        assert!(!any_running(a), "A started the virtual cluster again");
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(running_at(b), Some(nb));

    stop.store(true, Ordering::Relaxed);
    poller.join().unwrap();
    let (most, polls) = (most.load(Ordering::Relaxed), polls.load(Ordering::Relaxed));
    println!("QEMU processes of {VM} and of {VM2} on this machine: at most {most} each in {polls} polls of 50 ms");
    assert_eq!(most, 1, "the VM ran at both sites at once");
    assert!(polls > 100);
    println!("scenario took {:.1} s", t0.elapsed().as_secs_f64());
}
