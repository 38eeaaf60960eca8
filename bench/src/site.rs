//! Disaster recovery between sites (issue 20): switchover time, and RPO and RTO when a whole site is
//! lost while vmhad's replication service (`vmha site replication VC --every`, run by the DC's vmhad)
//! keeps the peer's copy of a running VM's disk and the guest writes steadily.
//!
//! Two sites (2 + 2 hosts, each its own cluster with fencing), booth's arbitrator at a third place, one
//! TCG guest with a raw disk of incompressible bytes (/dev/urandom) in virtual cluster `bench`, protected
//! at both sites (ticket expire [`EXPIRE`] s), as in the lab scenario.
//!
//! Every time is taken by this process's monotonic clock, from outside both clusters:
//! - switchover: from the moment `vmha site switchover` is run at the holding site until Pacemaker shows
//!   the VM at the other site and exactly one QEMU runs it there (polled every [`POLL`]);
//! - RPO: the guest writes a block of random bytes every second (its steady load), and this process
//!   writes a numbered marker to a sector of the guest's disk about 4 times a second through
//!   qemu-guest-agent, noting when each write returned (synced). Site A is powered off at a moment that
//!   falls anywhere in the replication period; once B runs the VM, the marker B's copy holds says which
//!   write was the last one saved: RPO = power-off time minus that write's time. What the guest wrote
//!   after it is lost.
//! - RTO: from A's power-off until B runs the VM (booth's ticket expiry, then Pacemaker's start at B).
//!
//! No baseline runs beside it: Pacemaker's own way across sites is booth with the same ticket expiry (so
//! the same RTO floor), and neither VirtualDomain nor Proxmox replicates a running VM's disks between
//! clusters. The figures are for judging vmha's own goals: RPO within one period plus one round.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use vmha_e2e::{domain_with_raw_disk, guest_exec, with_test_timing};
use vmha_lab::lab::target_binary;
use vmha_lab::site::{Site, SiteLab, SiteLabConfig};
use vmha_lab::{wait_for, Lab};

use crate::report::{cell, median, verdict, Run};

const VM: &str = "sbvm";
const VC: &str = "bench";
const TICKET: &str = "bench";
const EXPIRE: u32 = 20;
const POLL: Duration = Duration::from_millis(50);
/// The sector the markers go to (the guest's load writes far from it).
const MARKER_SECTOR: u32 = 100;

#[derive(clap::Args, Debug)]
pub struct SiteArgs {
    /// Rounds (each: switchover A -> B and back, then site A lost under replication and failed back).
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// The replication period (`vmha site replication --every`), seconds.
    #[arg(long, default_value_t = 10)]
    every: u64,
    /// The VM's disk, MiB of incompressible bytes.
    #[arg(long, default_value_t = 256)]
    disk_mib: u64,
    /// One switchover each way and one replication round, no site loss: proves the bench works,
    /// measures nothing.
    #[arg(long)]
    quick: bool,
    /// Site A's lab name (B's is its first 7 characters and `2`).
    #[arg(long, default_value = "sbn")]
    lab: String,
    /// Site A's subnet (first three octets); B and the arbitrator take the next two.
    #[arg(long, default_value = "10.213.231")]
    subnet: String,
    /// Also write the report (markdown) to this file.
    #[arg(long)]
    out: Option<PathBuf>,
}

fn config(name: &str, subnet: &str) -> Result<SiteLabConfig> {
    SiteLabConfig::two_sites(
        name,
        subnet,
        ("ra", "rb"),
        vec![(TICKET.into(), EXPIRE)],
        with_test_timing,
    )
}

/// `vmha ARGS` on host `n`; its stdout, or an error with its output.
fn vmha(lab: &Lab, n: u8, args: &[&str]) -> Result<String> {
    let mut all = vec!["vmha"];
    all.extend_from_slice(args);
    let out = lab.exec_with_deadline(n, &all, Duration::from_secs(600))?;
    if !out.status.success() {
        bail!(
            "vmha {} on {}: {}{}",
            args.join(" "),
            lab.cfg.host_name(n),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The host of `lab` where Pacemaker runs the VM and exactly one QEMU runs it.
fn running_at(lab: &Lab) -> Option<u8> {
    let s = lab.status_from_any().ok()?;
    let n = lab.cfg.host_number(s.running_on(VM)?)?;
    let q = lab.qemu_processes(VM);
    (q.len() == 1 && q[0].0 == n).then_some(n)
}

fn wait_running_at(lab: &Lab, limit: Duration) -> Result<u8> {
    wait_for(&format!("{VM} running at {}", lab.cfg.name), limit, POLL, || {
        running_at(lab)
    })
}

/// The VM running at `lab` with its guest agent answering (a freeze needs it; right after a start it is not
/// connected yet): the host it runs on.
fn wait_guest_agent(lab: &Lab) -> Result<u8> {
    let n = wait_running_at(lab, Duration::from_secs(90))?;
    wait_for("the guest agent", Duration::from_secs(90), POLL, || {
        shell(lab, n, "true").ok()
    })?;
    Ok(n)
}

/// A host of `lab` that is powered on.
fn live_host(lab: &Lab) -> Result<u8> {
    lab.cfg
        .host_numbers()
        .find(|&n| lab.host_alive(n))
        .ok_or_else(|| anyhow!("no host of {} runs", lab.cfg.name))
}

fn granted_here(lab: &Lab) -> Option<bool> {
    vmha_lab::site::granted_here(lab, TICKET)
}

fn shell(lab: &Lab, n: u8, script: &str) -> Result<String> {
    guest_exec(lab, n, VM, "/bin/sh", &["-c", script], Duration::from_secs(30))
}

fn write_marker(lab: &Lab, n: u8, k: u64) -> Result<()> {
    let out = shell(
        lab,
        n,
        &format!(
            "printf 'marker-{k:08}' > /tmp/m && dd if=/tmp/m of=/dev/vda bs=512 count=1 seek={MARKER_SECTOR} conv=sync,fsync 2>&1"
        ),
    )?;
    if !out.contains("1+0 records out") {
        bail!("writing marker {k}: {out}");
    }
    Ok(())
}

fn read_marker(lab: &Lab, n: u8) -> Result<Option<u64>> {
    let out = wait_for("the guest agent", Duration::from_secs(60), POLL, || {
        shell(
            lab,
            n,
            &format!("dd if=/dev/vda bs=512 count=1 skip={MARKER_SECTOR} 2>/dev/null | tr -d '\\000'"),
        )
        .ok()
    })?;
    Ok(out.trim().strip_prefix("marker-").and_then(|k| k.parse().ok()))
}

/// The bench's lab: two sites with the VM protected, running at A.
struct Bench {
    sites: SiteLab,
    addr: [String; 2],
    storage_ab: String,
    storage_ba: String,
}

impl Bench {
    fn up(cfg: SiteLabConfig, disk_mib: u64) -> Result<Bench> {
        let t0 = Instant::now();
        let sites = SiteLab::up(cfg.clone())?;
        let build = target_binary("vmhad")?;
        let build = build.parent().ok_or_else(|| anyhow!("no build directory"))?;
        for lab in [&sites.a, &sites.b] {
            lab.install_build(build)?;
            for n in lab.cfg.host_numbers() {
                lab.start_vmhad(n)?;
            }
        }
        let addr = [
            SiteLabConfig::site_address(&sites.a.cfg),
            SiteLabConfig::site_address(&sites.b.cfg),
        ];
        let (a, b) = (&sites.a, &sites.b);
        a.exec_ok(
            1,
            &[
                "booth",
                "grant",
                "-w",
                "-s",
                &addr[0],
                TICKET,
                "-c",
                "/etc/booth/booth.conf",
            ],
        )?;
        wait_for("the ticket granted at A", Duration::from_secs(30), POLL, || {
            granted_here(a).filter(|g| *g)
        })?;
        // The disk: incompressible bytes, so every copy is real work.
        let disk = a.cfg.shared_dir().join(format!("{VM}.img"));
        let mut f = std::fs::File::create(&disk)?;
        std::io::copy(&mut std::fs::File::open("/dev/urandom")?.take(disk_mib << 20), &mut f)?;
        f.sync_all()?;
        let xml = a.cfg.shared_dir().join(format!("{VM}.xml"));
        std::fs::write(&xml, domain_with_raw_disk(a, VM))?;
        let xml = xml.to_str().ok_or_else(|| anyhow!("non-UTF-8 path"))?;
        vmha(a, 1, &["vm", "add", VM, "--config", xml])?;
        // The capture freezes the guest through its agent: it must answer first.
        wait_guest_agent(a)?;
        vmha(a, 1, &["vcluster", "create", VC, VM])?;
        let archive = cfg.dir().join("bench.vmha");
        let _ = std::fs::remove_file(&archive);
        let archive = archive.to_str().ok_or_else(|| anyhow!("non-UTF-8 path"))?;
        vmha(
            a,
            1,
            &[
                "site",
                "protect",
                VC,
                "--ticket",
                TICKET,
                "--peer",
                &addr[1],
                "--archive",
                archive,
            ],
        )?;
        let dirs = |x: &Lab, y: &Lab| {
            format!(
                "storage={}:{}",
                x.cfg.shared_dir().display(),
                y.cfg.shared_dir().display()
            )
        };
        let (storage_ab, storage_ba) = (dirs(a, b), dirs(b, a));
        let image_dir = vmha_lab::guest::image_dir();
        let images = format!("storage={}:{}", image_dir.display(), image_dir.display());
        vmha(
            b,
            1,
            &[
                "site",
                "protect",
                VC,
                "--ticket",
                TICKET,
                "--peer",
                &addr[0],
                "--from-archive",
                archive,
                "--map",
                "hosts=ra1:rb1,ra2:rb2",
                "--map",
                &storage_ab,
                "--map",
                &images,
            ],
        )?;
        println!("two sites up, VM protected, in {:.1} s", t0.elapsed().as_secs_f64());
        Ok(Bench {
            sites,
            addr,
            storage_ab,
            storage_ba,
        })
    }

    /// `vmha site switchover` from `from` to the other site: seconds until the VM runs there.
    fn switchover(&self, from: Site) -> Result<f64> {
        let (here, there, to, map) = match from {
            Site::A => (&self.sites.a, &self.sites.b, &self.addr[1], &self.storage_ab),
            Site::B => (&self.sites.b, &self.sites.a, &self.addr[0], &self.storage_ba),
        };
        let n = live_host(here)?;
        let t = Instant::now();
        let out = vmha(here, n, &["site", "switchover", VC, "--to", to, "--map", map])?;
        let command = t.elapsed().as_secs_f64();
        wait_running_at(there, Duration::from_secs(120))?;
        let total = t.elapsed().as_secs_f64();
        println!(
            "switchover {} -> {}: command {command:.1} s, VM running {total:.1} s\n{}",
            here.cfg.name,
            there.cfg.name,
            out.trim()
        );
        Ok(total)
    }
}

/// One site loss under replication: (RPO, RTO, replication rounds completed before it), seconds.
fn site_loss(bench: &Bench, every: u64, phase: f64) -> Result<(f64, f64, usize)> {
    let (a, b) = (&bench.sites.a, &bench.sites.b);
    let na = wait_guest_agent(a)?;
    // The guest's steady load: 1 MiB of random bytes every second, synced, away from the marker.
    shell(
        a,
        na,
        "nohup /bin/sh -c 'i=0; while :; do dd if=/dev/urandom of=/dev/vda bs=64k count=16 seek=$((1024 + (i % 32) * 16)) conv=notrunc,fsync 2>/dev/null; i=$((i+1)); sleep 1; done' >/dev/null 2>&1 &",
    )?;
    write_marker(a, na, 0)?;
    // The product's replication as an operator sets it up: vmhad's service at A (the DC's vmhad runs a
    // round every `every` s while A holds the ticket). A round is seen done when the copy at B changes:
    // each round stamps the peer's image with its consistent point (its mtime), read here on the file.
    let replica = b.cfg.shared_dir().join(format!("{VM}.img"));
    let stamp = |p: &std::path::Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let before = stamp(&replica);
    vmha(
        a,
        1,
        &[
            "site",
            "replication",
            VC,
            "--every",
            &every.to_string(),
            "--map",
            &bench.storage_ab,
        ],
    )?;
    let rounds = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let watching = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let watcher = {
        let (rounds, watching) = (std::sync::Arc::clone(&rounds), std::sync::Arc::clone(&watching));
        std::thread::spawn(move || {
            let mut last = before;
            while watching.load(std::sync::atomic::Ordering::Relaxed) {
                let now = stamp(&replica);
                if now.is_some() && now != last {
                    last = now;
                    rounds.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    // Markers until two rounds are done, then on for `phase` of a period (a moment anywhere in it).
    let mut written: Vec<(u64, Instant)> = vec![(0, Instant::now())];
    let mut k = 0;
    let mut after_two: Option<Instant> = None;
    let limit = Instant::now() + Duration::from_secs(every * 4 + 120);
    loop {
        k += 1;
        write_marker(a, na, k)?;
        written.push((k, Instant::now()));
        let done = rounds.load(std::sync::atomic::Ordering::Relaxed);
        if done >= 2 && after_two.is_none() {
            after_two = Some(Instant::now());
        }
        if after_two.is_some_and(|t| t.elapsed().as_secs_f64() >= phase * every as f64) {
            break;
        }
        if Instant::now() > limit {
            watching.store(false, std::sync::atomic::Ordering::Relaxed);
            let _ = watcher.join();
            bail!(
                "vmhad's replication every {every} s completed {done} rounds in {} s",
                every * 4 + 120
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    let completed = rounds.load(std::sync::atomic::Ordering::Relaxed);
    let lost_at = Instant::now();
    bench.sites.power_off_site(Site::A)?;
    watching.store(false, std::sync::atomic::Ordering::Relaxed);
    let _ = watcher.join();
    let nb = wait_running_at(b, Duration::from_secs(u64::from(EXPIRE) * 2 + 120))?;
    let rto = lost_at.elapsed().as_secs_f64();
    let saved = read_marker(b, nb)?.ok_or_else(|| anyhow!("B's copy holds no marker"))?;
    let at = written
        .iter()
        .find(|(m, _)| *m == saved)
        .map(|(_, t)| *t)
        .ok_or_else(|| anyhow!("B's copy holds marker {saved}, never written"))?;
    let rpo = lost_at.duration_since(at).as_secs_f64();
    // A back, booth there follows B; the VM failed back to A for the next round.
    bench.sites.power_on_site(Site::A)?;
    wait_for("booth running at A again", Duration::from_secs(180), POLL, || {
        a.status_from_any().ok()?.running_on("booth-site").map(|_| ())
    })?;
    // Off before the failback gives A the ticket again (the next round's switchovers run without it).
    vmha(a, live_host(a)?, &["site", "replication", VC, "--off"])?;
    Ok((rpo, rto, completed))
}

pub fn run(args: SiteArgs) -> Result<()> {
    vmha_lab::init_logging();
    let cfg = config(&args.lab, &args.subnet)?;
    let run = Run::start(&cfg.a.shared_dir());
    let bench = Bench::up(cfg.clone(), if args.quick { 16 } else { args.disk_mib })?;
    // Never two QEMUs of the VM on this machine (both sites), polled every 50 ms for the whole run.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let most = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let polls = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let poller = {
        use std::sync::atomic::Ordering::Relaxed;
        let (stop, most, polls) = (stop.clone(), most.clone(), polls.clone());
        let watcher = Lab::attach(cfg.a.clone())?;
        std::thread::spawn(move || {
            while !stop.load(Relaxed) {
                most.fetch_max(watcher.qemu_processes(VM).len(), Relaxed);
                polls.fetch_add(1, Relaxed);
                std::thread::sleep(POLL);
            }
        })
    };
    let mut there = Vec::new();
    let mut back = Vec::new();
    let mut failback = Vec::new();
    let (mut rpo, mut rto) = (Vec::new(), Vec::new());
    let mut rounds_before = Vec::new();
    let rounds = if args.quick { 1 } else { args.rounds };
    for r in 0..rounds {
        there.push(bench.switchover(Site::A)?);
        back.push(bench.switchover(Site::B)?);
        if args.quick {
            // The round freezes the guest through its agent: right after the switchover back it is
            // not connected yet.
            let a = &bench.sites.a;
            wait_guest_agent(a)?;
            let out = vmha(a, 1, &["site", "replicate", VC, "--map", &bench.storage_ab])?;
            if !out.contains("consistent point") {
                bail!("vmha site replicate: {out}");
            }
            break;
        }
        // The loss falls at a different moment of the period each round.
        let phase = (r as f64 + 0.5) / rounds as f64;
        let (p, t, done) = site_loss(&bench, args.every, phase)?;
        println!(
            "round {}: switchover {:.1} / {:.1} s, RPO {p:.1} s, RTO {t:.1} s ({done} replication rounds)",
            r + 1,
            there[r],
            back[r]
        );
        rpo.push(p);
        rto.push(t);
        rounds_before.push(done as f64);
        failback.push(bench.switchover(Site::B)?);
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = poller.join();
    let (most, polls) = (
        most.load(std::sync::atomic::Ordering::Relaxed),
        polls.load(std::sync::atomic::Ordering::Relaxed),
    );
    let bound = args.every as f64;
    let rpo_goal = !rpo.is_empty() && rpo.iter().all(|p| *p <= bound + 5.0);
    let mut body = String::new();
    body.push_str(&format!(
        "Two sites of 2 hosts, booth ticket expire {EXPIRE} s (acquire-after 10 s); one TCG guest, raw disk of {} MiB of \
         /dev/urandom bytes; replication by vmhad's service, `vmha site replication bench --every {}` set at A for each loss and off \
         again before the failback (a full copy of the disk each round; a round counted when the copy at B \
         changes); the \
         guest writes 1 MiB of random bytes every second, and this process writes a numbered marker about 4 \
         times a second.\n\n",
        if args.quick { 16 } else { args.disk_mib },
        args.every
    ));
    body.push_str("| figure | median (min–max, IQR, n) | goal |\n|---|---|---|\n");
    body.push_str(&format!(
        "| switchover A → B (command to VM running at B) | {} | |\n",
        cell(&there, 1, "s")
    ));
    body.push_str(&format!("| switchover B → A | {} | |\n", cell(&back, 1, "s")));
    if !rpo.is_empty() {
        body.push_str(&format!(
            "| RPO: site A powered off; the last write B's copy holds, before the power-off | {} | at most one period + 5 s ({} s): **{}** |\n",
            cell(&rpo, 1, "s"),
            bound + 5.0,
            verdict(rpo_goal)
        ));
        body.push_str(&format!(
            "| RTO: site A powered off until B runs the VM | {} | ticket expire {EXPIRE} s + start |\n",
            cell(&rto, 1, "s")
        ));
        body.push_str(&format!(
            "| failback B → A after A is back (switchover) | {} | |\n",
            cell(&failback, 1, "s")
        ));
        body.push_str(&format!(
            "\nReplication rounds completed before each loss: median {:.0}.\n",
            median(&rounds_before)
        ));
    }
    body.push_str(&format!(
        "\nQEMU processes of the VM on this machine (both sites), polled every 50 ms over the run: at most **{most}** at once in {polls} polls{}.\n",
        if most > 1 { " (**the VM ran at both sites at once**)" } else { "" }
    ));
    let report = run.finish("Sites: switchover, RPO and RTO", &body);
    if most > 1 {
        crate::report::emit(&report, args.out.as_deref())?;
        bail!("the VM ran at both sites at once ({most} QEMU processes)");
    }
    crate::report::emit(&report, args.out.as_deref())?;
    drop(bench);
    let _ = std::io::stdout().flush();
    Ok(())
}
