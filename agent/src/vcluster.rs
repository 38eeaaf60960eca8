//! `vmha vcluster`: virtual clusters (a Pacemaker tag naming a set of resources), their capture into an
//! archive and their instantiation on another cluster. The CLI works on this host's CIB through the
//! Pacemaker CIB API (vmha-pacemaker) and on libvirt through the `virt` crate; every call has a deadline.
//! The archive format, capture and translation are in the `vmha-vcluster` crate (pure logic).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use clap::Subcommand;
use serde_json::{json, Value};
use vmha_api::json::document;
use vmha_model::change::{escape, set_resource_meta, validate_name};
use vmha_model::{ClusterView, VmState};
use vmha_pacemaker::{Access, CallOptions, Cib, Scope};
use vmha_vcluster::archive::{self, ArchiveWriter, DiskFiles, DiskStats, Manifest, WriteBehind};
use vmha_vcluster::capture::{self, capture, configuration_ids};
use vmha_vcluster::domain_check::Allow;
use vmha_vcluster::printable;
use vmha_vcluster::signature::{self, SecretKey, Trust, TrustedKey};
use vmha_vcluster::translate::{domain_disks, plan, Maps, Plan, Target};
use vmha_vcluster::{manifest_for, metadata_entries};

use crate::confined::{check_free_space, exists_no_follow, ConfinedPath};

/// Deadline of one CIB call.
const CIB_DEADLINE: Duration = Duration::from_secs(30);
/// Deadline of one libvirt call (connect, lookup, guest agent command).
const LIBVIRT_DEADLINE: Duration = Duration::from_secs(20);
/// The guest agent's own timeout for fsfreeze (seconds).
const AGENT_TIMEOUT_S: i32 = 10;

#[derive(Subcommand, Debug)]
pub enum VclusterCmd {
    /// Make a virtual cluster: a Pacemaker tag naming resources (VMs, virtual IPs, ...).
    Create {
        name: String,
        /// Member resources (at least one).
        #[arg(required = true)]
        members: Vec<String>,
    },
    /// Add resources to a virtual cluster.
    Add {
        name: String,
        #[arg(required = true)]
        members: Vec<String>,
    },
    /// Remove resources from a virtual cluster, or (without resources) the virtual cluster itself (the
    /// resources stay).
    Remove { name: String, members: Vec<String> },
    /// List virtual clusters.
    List,
    /// A virtual cluster's members, where they run, and the constraints that a capture would keep.
    Show { name: String },
    /// Capture a virtual cluster into one archive: domain definitions, resources, constraints, the tag and
    /// optionally the disk images.
    Capture {
        name: String,
        /// The archive to write.
        #[arg(long = "out", short = 'o', value_name = "FILE")]
        out: PathBuf,
        /// Also the VMs' file-backed disk images (sparse-aware, compressed, streamed).
        #[arg(long)]
        with_disks: bool,
        /// Stop the members first (cold capture) and restore their target-role afterwards; without it a
        /// capture with disks freezes the guests' file systems (qemu-guest-agent) around the disk copy.
        #[arg(long)]
        halt: bool,
        /// zstd level (1 fast .. 19 small).
        #[arg(long, default_value_t = 1)]
        level: i32,
        /// Sign the archive with this secret key (made by `vmha vcluster keygen`; passed to vmhad as an
        /// open file, never as bytes on the bus).
        #[arg(long, value_name = "KEYFILE")]
        sign: Option<PathBuf>,
    },
    /// Make an operator key pair for signing archives: the secret key in KEYFILE (mode 0600), the public
    /// key in KEYFILE.pub (copy it to /etc/vmha/trusted-keys/ on the clusters that should trust it).
    Keygen {
        /// The secret key file to create (not overwritten).
        #[arg(long = "out", short = 'o', value_name = "KEYFILE")]
        out: PathBuf,
    },
    /// Create a captured virtual cluster on this cluster: verify the archive and the target, print the
    /// plan, write the domain definitions and disks, create everything in one CIB change, wait until it runs.
    Instantiate {
        file: PathBuf,
        /// hosts=OLD:NEW[,...], address=OLD/NN:NEW/NN, network=OLD:NEW[,...], storage=/OLD:/NEW[,...]
        #[arg(long = "map", value_name = "KIND=OLD:NEW")]
        maps: Vec<String>,
        /// Name the virtual cluster (tag) differently here.
        #[arg(long)]
        name: Option<String>,
        /// Let through what the safe subset refuses, by category (comma-separated): qemu-args (QEMU
        /// namespace), seclabel (security label overrides), hostdev (host device passthrough),
        /// host-devices (host block/char/network devices), filesystem (host directory passthrough),
        /// host-paths (files outside the storage directories), emulator (another emulator), scripts
        /// (host scripts). Every item let through is listed in the plan.
        #[arg(long = "allow", value_name = "CATEGORY[,...]")]
        allow: Vec<String>,
        /// Also create resources of this agent (CLASS:PROVIDER:TYPE), besides ocf:vmha:VirtualMachine,
        /// ocf:heartbeat:VirtualDomain and ocf:heartbeat:IPaddr2. Listed in the plan.
        #[arg(long = "allow-agent", value_name = "AGENT")]
        allow_agents: Vec<String>,
        /// Verify and print the plan; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Seconds to wait for the VMs to run (0: do not wait); past it everything created is removed.
        #[arg(long, default_value_t = 300)]
        wait: u64,
        /// Refuse the archive, before anything is created, unless it is signed by a trusted key.
        #[arg(long)]
        require_signature: bool,
        /// Trust this public key file (repeatable) instead of /etc/vmha/trusted-keys/*.pub.
        #[arg(long = "trusted-key", value_name = "PUBFILE")]
        trusted_keys: Vec<PathBuf>,
    },
}

impl VclusterCmd {
    /// Whether the CLI does it itself (tags in the CIB) rather than through vmhad (capture, instantiate).
    pub fn runs_locally(&self) -> bool {
        !matches!(self, VclusterCmd::Capture { .. } | VclusterCmd::Instantiate { .. })
    }
}

async fn connect() -> Result<Cib> {
    Cib::connect("vmha", Access::ReadWrite, CIB_DEADLINE)
        .await
        .context("connecting to this host's CIB (is Pacemaker running here?)")
}

async fn query(cib: &Cib) -> Result<String> {
    cib.query_all(CIB_DEADLINE).await.context("reading the CIB")
}

/// Runs `vmha vcluster ...`.
pub async fn run(cmd: VclusterCmd, json_out: bool) -> Result<ExitCode> {
    match cmd {
        VclusterCmd::Create { name, members } => create(&name, &members).await,
        VclusterCmd::Add { name, members } => add(&name, &members).await,
        VclusterCmd::Remove { name, members } => remove(&name, &members).await,
        VclusterCmd::List => list(json_out).await,
        VclusterCmd::Show { name } => show(&name, json_out).await,
        VclusterCmd::Keygen { out } => keygen(&out, json_out),
        VclusterCmd::Capture { .. } | VclusterCmd::Instantiate { .. } => {
            bail!("vmha vcluster capture and instantiate run in vmhad (the CLI calls its D-Bus methods)")
        }
    }?;
    Ok(ExitCode::SUCCESS)
}

/// `vmha vcluster keygen`: a new key pair, neither file overwritten.
fn keygen(out: &Path, json_out: bool) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let key = SecretKey::generate()?;
    let public = key.public();
    let pub_path = PathBuf::from(format!("{}.pub", out.display()));
    if pub_path.exists() {
        bail!("{} exists; not overwriting it", pub_path.display());
    }
    let create = |path: &Path, mode: u32, text: &str| -> Result<()> {
        let mut f = std::fs::File::options()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(path)
            .with_context(|| format!("creating {}", path.display()))?;
        f.write_all(text.as_bytes())
            .and_then(|()| f.sync_all())
            .with_context(|| format!("writing {}", path.display()))
    };
    create(out, 0o600, &key.to_text())?;
    if let Err(e) = create(&pub_path, 0o644, &format!("{}\n", public.to_text())) {
        let _ = std::fs::remove_file(out);
        return Err(e);
    }
    if json_out {
        println!(
            "{}",
            document(
                "signing_key",
                json!({"secret_key_file": out, "public_key_file": pub_path, "public_key": public.to_text(), "fingerprint": public.fingerprint()})
            )
        );
    } else {
        println!("{}", public.to_text());
        println!(
            "secret key {} (keep it private), public key {} (fingerprint {})",
            out.display(),
            pub_path.display(),
            public.fingerprint()
        );
    }
    Ok(())
}

fn top_level_resources(cib: &str) -> Result<Vec<String>> {
    let doc = roxmltree::Document::parse(cib)?;
    Ok(doc
        .descendants()
        .find(|n| n.has_tag_name("resources"))
        .map(|r| {
            r.children()
                .filter(|n| n.is_element())
                .filter_map(|n| n.attribute("id").map(str::to_string))
                .collect()
        })
        .unwrap_or_default())
}

fn check_members(cib: &str, members: &[String]) -> Result<()> {
    let resources = top_level_resources(cib)?;
    let missing: Vec<&str> = members
        .iter()
        .filter(|m| !resources.contains(m))
        .map(String::as_str)
        .collect();
    if !missing.is_empty() {
        bail!("no such resource: {}", missing.join(", "));
    }
    Ok(())
}

async fn create(name: &str, members: &[String]) -> Result<()> {
    validate_name("virtual cluster name", name)?;
    let cib = connect().await?;
    let xml = query(&cib).await?;
    if configuration_ids(&xml)?.contains(name) {
        bail!("the id {name} is already in use in the CIB");
    }
    check_members(&xml, members)?;
    let fragment = format!(
        "<configuration><tags>{}</tags></configuration>",
        capture::tag_xml(name, members)
    );
    cib.modify(
        &Scope::section("configuration"),
        &fragment,
        CallOptions::CAN_CREATE,
        CIB_DEADLINE,
    )
    .await
    .context("creating the tag")?;
    println!("virtual cluster {name} created with {}", members.join(", "));
    Ok(())
}

async fn add(name: &str, members: &[String]) -> Result<()> {
    let cib = connect().await?;
    let xml = query(&cib).await?;
    let tags = capture::list(&xml)?;
    let current = tags
        .get(name)
        .ok_or_else(|| anyhow!("no virtual cluster named {name}"))?;
    check_members(&xml, members)?;
    if let Some(dup) = members.iter().find(|m| current.contains(m)) {
        bail!("{dup} is already a member of {name}");
    }
    let refs: String = members
        .iter()
        .map(|m| format!("<obj_ref id=\"{}\"/>", escape(m)))
        .collect();
    let fragment = format!(
        "<configuration><tags><tag id=\"{}\">{refs}</tag></tags></configuration>",
        escape(name)
    );
    cib.modify(
        &Scope::section("configuration"),
        &fragment,
        CallOptions::NONE,
        CIB_DEADLINE,
    )
    .await
    .context("adding to the tag")?;
    println!("added to {name}: {}", members.join(", "));
    Ok(())
}

async fn remove(name: &str, members: &[String]) -> Result<()> {
    validate_name("virtual cluster name", name)?;
    let cib = connect().await?;
    let xml = query(&cib).await?;
    let tags = capture::list(&xml)?;
    let current = tags
        .get(name)
        .ok_or_else(|| anyhow!("no virtual cluster named {name}"))?;
    if members.is_empty() {
        cib.delete(
            &Scope::section("tags"),
            &format!("<tag id=\"{}\"/>", escape(name)),
            CallOptions::NONE,
            CIB_DEADLINE,
        )
        .await
        .context("removing the tag")?;
        println!("virtual cluster {name} removed (its resources stay)");
        return Ok(());
    }
    if let Some(m) = members.iter().find(|m| !current.contains(m)) {
        bail!("{m} is not a member of {name}");
    }
    if members.len() >= current.len() {
        bail!("that would leave {name} empty; remove the virtual cluster instead (vmha vcluster remove {name})");
    }
    for m in members {
        validate_name("resource", m)?;
    }
    let kept: Vec<String> = current.iter().filter(|m| !members.contains(m)).cloned().collect();
    cib.replace(
        &Scope::xpath(&format!("/cib/configuration/tags/tag[@id='{name}']")),
        &capture::tag_xml(name, &kept),
        CallOptions::NONE,
        CIB_DEADLINE,
    )
    .await
    .context("updating the tag")?;
    println!("removed from {name}: {}", members.join(", "));
    Ok(())
}

async fn list(json_out: bool) -> Result<()> {
    let cib = connect().await?;
    let tags = capture::list(&query(&cib).await?)?;
    if json_out {
        println!(
            "{}",
            serde_json::to_string_pretty(&document("vcluster_list", json!({ "vclusters": tags })))?
        );
    } else {
        for (name, members) in tags {
            println!("{name}: {}", members.join(" "));
        }
    }
    Ok(())
}

async fn show(name: &str, json_out: bool) -> Result<()> {
    let cib = connect().await?;
    let xml = query(&cib).await?;
    let c = capture(&xml, name)?;
    let view = ClusterView::from_cib(&xml)?;
    let vms: Vec<_> = c
        .vms
        .iter()
        .map(|v| {
            let state = view.vm(&v.resource);
            json!({
                "resource": v.resource,
                "config": v.config,
                "state": state.map(|s| s.state),
                "hosts": state.map(|s| s.hosts.clone()).unwrap_or_default(),
            })
        })
        .collect();
    let out = json!({
        "name": c.name,
        "members": c.members,
        "vms": vms,
        "constraints": c.constraints,
        "left_out": c.left_out.iter().map(|(c, o)| json!({"constraint": c, "outside": o})).collect::<Vec<_>>(),
    });
    if json_out {
        println!("{}", serde_json::to_string_pretty(&document("vcluster", &out))?);
    } else {
        println!("virtual cluster {}: {}", c.name, c.members.join(" "));
        for v in &vms {
            println!("{}", show_vm_line(v));
        }
        println!("  constraints: {}", c.constraints.join(", "));
        for (id, outsider) in &c.left_out {
            println!("  left out: {id} (names {outsider}, not a member)");
        }
    }
    Ok(())
}

/// One VM's line of `vmha vcluster show`: its resource, state and the hosts it runs on by name
/// ("vm vm1 running on node2"; "on node1,node2" while it is active on two; "nowhere" when on none).
fn show_vm_line(v: &Value) -> String {
    let hosts: Vec<&str> = v["hosts"]
        .as_array()
        .map(|h| h.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let on = if hosts.is_empty() {
        "nowhere".to_string()
    } else {
        format!("on {}", hosts.join(","))
    };
    format!(
        "  vm {} {} {on}",
        v["resource"].as_str().unwrap_or(""),
        v["state"].as_str().unwrap_or("?")
    )
}

/// Runs `f` on a thread and waits at most `limit` for it: a hung libvirtd cannot hang vmha.
fn with_deadline<T: Send + 'static>(
    what: String,
    limit: Duration,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(limit)
        .map_err(|_| anyhow!("{what}: no answer within {} s", limit.as_secs()))?
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// libvirt URI of the host running a VM.
fn libvirt_uri(vm: &capture::CapturedVm, host: &str) -> String {
    if host == hostname() {
        return vm.hypervisor.clone().unwrap_or_else(|| "qemu:///system".into());
    }
    let transport = vm.migration_transport.clone().unwrap_or_else(|| "tcp".into());
    format!("qemu+{transport}://{host}/system")
}

/// Sends a qemu-guest-agent command to a domain through libvirt, with a deadline.
fn agent_command(uri: &str, domain: &str, command: &str) -> Result<String> {
    let (uri, domain, command) = (uri.to_string(), domain.to_string(), command.to_string());
    with_deadline(
        format!("{command} on {domain} via {uri}"),
        LIBVIRT_DEADLINE,
        move || {
            let conn = virt::connect::Connect::open(Some(&uri)).map_err(|e| anyhow!("{uri}: {e}"))?;
            conn.lookup_domain_by_name(&domain)
                .and_then(|d| d.qemu_agent_command(&format!("{{\"execute\":\"{command}\"}}"), AGENT_TIMEOUT_S, 0))
                .map_err(|e| anyhow!("{command} on {domain}: {e}"))
        },
    )
}

/// Where a capture or an instantiate reports what it does: a D-Bus job (vmhad) or a test.
pub trait Report: Send + Sync {
    /// A step, or a transfer's progress; `fraction` of the whole operation when it is known.
    fn step(&self, fraction: Option<f64>, message: &str);
}

/// A report that goes nowhere.
#[derive(Debug, Default)]
pub struct Quiet;

impl Report for Quiet {
    fn step(&self, _: Option<f64>, _: &str) {}
}

/// Progress of a long transfer, reported at most every half second and once at the end.
struct Progress<'a> {
    report: &'a dyn Report,
    label: String,
    total: u64,
    /// The share of the whole operation this transfer's start and end stand for.
    span: (f64, f64),
    start: Instant,
    last: Option<Instant>,
}

impl<'a> Progress<'a> {
    fn new(report: &'a dyn Report, label: String, total: u64, span: (f64, f64)) -> Progress<'a> {
        Progress {
            report,
            label,
            total,
            span,
            start: Instant::now(),
            last: None,
        }
    }

    fn update(&mut self, done: u64) {
        if self.last.is_none_or(|l| l.elapsed() > Duration::from_millis(500)) {
            self.last = Some(Instant::now());
            self.send(done);
        }
    }

    fn send(&self, done: u64) {
        let secs = self.start.elapsed().as_secs_f64().max(1e-3);
        let share = if self.total == 0 {
            1.0
        } else {
            (done as f64 / self.total as f64).min(1.0)
        };
        self.report.step(
            Some(self.span.0 + (self.span.1 - self.span.0) * share),
            &format!(
                "{}: {:.1}/{:.1} MiB, {:.1} MiB/s",
                self.label,
                done as f64 / 1048576.0,
                self.total as f64 / 1048576.0,
                done as f64 / 1048576.0 / secs
            ),
        );
    }

    fn finish(&self, done: u64) {
        self.send(done);
    }
}

fn now_rfc3339() -> String {
    archive::rfc3339(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    )
}

/// Polls the CIB until `done` holds for the cluster view, or the deadline passes.
async fn wait_view(cib: &Cib, limit: Duration, what: &str, done: impl Fn(&ClusterView) -> bool) -> Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        let view = ClusterView::from_cib(&query(cib).await?)?;
        if done(&view) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("{what}: not reached within {} s", limit.as_secs());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn set_target_role(cib: &Cib, rsc: &str, role: &str) -> Result<()> {
    let xml = query(cib).await?;
    let change = set_resource_meta(&xml, rsc, "target-role", role)?;
    cib.modify(
        &Scope::section("resources"),
        &change,
        CallOptions::CAN_CREATE,
        CIB_DEADLINE,
    )
    .await
    .with_context(|| format!("setting target-role={role} on {rsc}"))
}

/// The `target-role` nvpair (id, value) of a resource.
fn target_role(cib: &str, rsc: &str) -> Result<Option<(String, String)>> {
    let doc = roxmltree::Document::parse(cib)?;
    Ok(doc
        .descendants()
        .find(|n| n.is_element() && n.attribute("id") == Some(rsc) && !n.has_tag_name("obj_ref"))
        .and_then(|r| {
            r.children()
                .filter(|n| n.has_tag_name("meta_attributes"))
                .flat_map(|s| s.children())
                .find(|n| n.has_tag_name("nvpair") && n.attribute("name") == Some("target-role"))
        })
        .map(|n| {
            (
                n.attribute("id").unwrap_or("").to_string(),
                n.attribute("value").unwrap_or("").to_string(),
            )
        }))
}

/// Puts back each resource's target-role as it was before a halt.
async fn restore_roles(cib: &Cib, before: &BTreeMap<String, Option<(String, String)>>) -> Result<()> {
    let mut errors = Vec::new();
    for (rsc, role) in before {
        let result = match role {
            Some((_, value)) => set_target_role(cib, rsc, value).await,
            None => {
                async {
                    let now = target_role(&query(cib).await?, rsc)?;
                    if let Some((id, _)) = now {
                        cib.delete(
                            &Scope::section("resources"),
                            &format!("<nvpair id=\"{}\"/>", escape(&id)),
                            CallOptions::NONE,
                            CIB_DEADLINE,
                        )
                        .await?;
                    }
                    Ok(())
                }
                .await
            }
        };
        if let Err(e) = result {
            errors.push(format!("{rsc}: {e:#}"));
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        bail!("restoring target-role failed: {}", errors.join("; "))
    }
}

/// What a capture is asked to do.
#[derive(Debug, Clone)]
pub struct CaptureOptions {
    pub name: String,
    pub with_disks: bool,
    pub halt: bool,
    /// zstd level.
    pub level: i32,
    /// Sign the archive with this key.
    pub sign: Option<SecretKey>,
}

/// Captures a virtual cluster into `out` (written from its start, synced; the caller names and removes
/// the file). Returns a summary (JSON) of what the archive holds.
pub async fn capture_to(opts: &CaptureOptions, out: File, report: &dyn Report) -> Result<Value> {
    if !(1..=19).contains(&opts.level) {
        bail!("zstd level {} is outside 1..19", opts.level);
    }
    report.step(Some(0.0), "reading the CIB");
    let cib = connect().await?;
    let xml = query(&cib).await?;
    let c = capture(&xml, &opts.name)?;
    let view = ClusterView::from_cib(&xml)?;
    let mut domains = BTreeMap::new();
    for vm in &c.vms {
        let path = vm.config.as_ref().ok_or_else(|| {
            anyhow!(
                "VM {} has no config parameter: vmha captures VMs whose domain XML is a file",
                vm.resource
            )
        })?;
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}'s domain XML {path}", vm.resource))?;
        domains.insert(vm.resource.clone(), text);
    }
    let metadata = metadata_entries(&c, &domains)?;
    let placement: BTreeMap<String, String> = c
        .vms
        .iter()
        .filter_map(|v| Some((v.resource.clone(), view.vm(&v.resource)?.hosts.first()?.clone())))
        .collect();
    let mut disks = Vec::new();
    if opts.with_disks {
        for vm in &c.vms {
            for path in domain_disks(&domains[&vm.resource])? {
                // Opened now: a missing disk fails the capture before any VM is stopped or frozen.
                let file = File::open(&path).with_context(|| format!("opening {}'s disk {path}", vm.resource))?;
                disks.push((vm.resource.clone(), path, file));
            }
        }
    }
    let mut out = Some(out);
    // The manifest lists the disks with their sizes: it is written once the VMs are stopped or frozen.
    let mut write = |consistency: &str| -> Result<(Manifest, Vec<DiskStats>)> {
        let out = out.take().ok_or_else(|| anyhow!("the archive is written once"))?;
        let sized = disks
            .iter()
            .map(|(vm, path, f)| Ok((vm.clone(), path.clone(), f.metadata()?.len())))
            .collect::<Result<Vec<_>>>()?;
        let manifest = manifest_for(&c, placement.clone(), now_rfc3339(), consistency, &sized);
        let out = BufWriter::with_capacity(1 << 20, WriteBehind::new(out)?);
        let mut writer = ArchiveWriter::new_signed(out, opts.level, manifest, &metadata, opts.sign.clone())?;
        let total: u64 = sized.iter().map(|d| d.2).sum::<u64>().max(1);
        let mut done = 0;
        for (vm, path, file) in &disks {
            let size = file.metadata()?.len();
            let span = (
                0.1 + 0.85 * done as f64 / total as f64,
                0.1 + 0.85 * (done + size) as f64 / total as f64,
            );
            let mut p = Progress::new(report, format!("{vm} {path}"), size, span);
            writer
                .add_disk(file, &mut |n| p.update(n))
                .with_context(|| format!("reading {vm}'s disk {path}"))?;
            p.finish(size);
            done += size;
        }
        let (w, manifest, stats) = writer.finish()?;
        w.into_inner()
            .map_err(|e| anyhow!("writing the archive: {}", e.error()))?
            .finish()
            .context("writing the archive")?;
        Ok((manifest, stats))
    };

    let consistency;
    let written = if disks.is_empty() {
        consistency = "metadata only";
        write(consistency)
    } else if opts.halt {
        consistency = "halted";
        let mut before = BTreeMap::new();
        for vm in &c.vms {
            before.insert(vm.resource.clone(), target_role(&xml, &vm.resource)?);
        }
        report.step(Some(0.05), "stopping the members (--halt)");
        let r = async {
            for vm in &c.vms {
                set_target_role(&cib, &vm.resource, "Stopped").await?;
            }
            let names: Vec<String> = c.vms.iter().map(|v| v.resource.clone()).collect();
            wait_view(&cib, Duration::from_secs(300), "members stopped", |v| {
                names
                    .iter()
                    .all(|n| v.vm(n).is_some_and(|vm| vm.state == VmState::Stopped))
            })
            .await?;
            write(consistency)
        }
        .await;
        report.step(Some(0.97), "restarting the members");
        let restored = restore_roles(&cib, &before).await;
        r.and_then(|w| restored.map(|()| w))
    } else {
        consistency = "frozen";
        report.step(Some(0.05), "freezing the guests' file systems");
        // Freeze every running member, copy, thaw every one that was frozen, whatever happened.
        let mut frozen = Vec::new();
        let mut r = Ok(());
        for vm in &c.vms {
            let Some(host) = placement.get(&vm.resource) else {
                continue;
            };
            let domain = vm.domain.clone().unwrap_or_else(|| vm.resource.clone());
            let uri = libvirt_uri(vm, host);
            match agent_command(&uri, &domain, "guest-fsfreeze-freeze") {
                Ok(_) => frozen.push((uri, domain)),
                Err(e) => {
                    r = Err(e.context(format!(
                        "freezing {}'s file systems (a live capture needs qemu-guest-agent in every running VM; \
                         --halt captures with the VMs stopped)",
                        vm.resource
                    )));
                    break;
                }
            }
        }
        let mut w = r.and_then(|()| write(consistency));
        report.step(Some(0.97), "thawing the guests' file systems");
        for (uri, domain) in &frozen {
            if let Err(e) = agent_command(uri, domain, "guest-fsfreeze-thaw") {
                tracing::warn!(%domain, "thawing failed: {e:#}");
                if w.is_ok() {
                    w = Err(e);
                }
            }
        }
        w
    };
    let (manifest, stats) = written?;
    let disks: Vec<Value> = manifest
        .disks
        .iter()
        .zip(&stats)
        .map(|(d, s)| json!({"id": d.id, "vm": d.vm, "path": d.path, "size": d.size, "chunks": s.chunks, "stored": s.stored}))
        .collect();
    Ok(json!({
        "name": manifest.name,
        "members": manifest.members,
        "constraints": c.constraints,
        "left_out": c.left_out.iter().map(|(c, o)| json!({"constraint": c, "names": o})).collect::<Vec<_>>(),
        "disks": disks,
        "consistency": consistency,
        "signed_by": opts.sign.as_ref().map(|k| k.public().fingerprint()),
    }))
}

/// One line for a capture summary.
pub fn capture_text(summary: &Value, archive: &Path) -> String {
    let count = |k: &str| summary[k].as_array().map_or(0, Vec::len);
    let mut text = format!(
        "captured {} ({} members, {} constraints, {} disks, {}) into {}",
        summary["name"].as_str().unwrap_or(""),
        count("members"),
        count("constraints"),
        count("disks"),
        summary["consistency"].as_str().unwrap_or(""),
        archive.display()
    );
    if let Some(fp) = summary["signed_by"].as_str() {
        text.push_str(&format!(", signed by {fp}"));
    }
    for l in summary["left_out"].as_array().into_iter().flatten() {
        text.push_str(&format!(
            "\n  left out: constraint {} (names {}, not a member)",
            l["constraint"].as_str().unwrap_or(""),
            l["names"].as_str().unwrap_or("")
        ));
    }
    text
}

/// Checks on this host what the plan needs: storage directories, free file names, libvirt networks and
/// bridges.
fn check_target(p: &Plan) -> Vec<String> {
    let mut problems = Vec::new();
    let mut paths: Vec<&str> = p.domains.iter().map(|d| d.path.as_str()).collect();
    paths.extend(p.disks.iter().map(|d| d.to.as_str()));
    for path in paths {
        let path = Path::new(path);
        if exists_no_follow(path) {
            problems.push(format!("{} exists already", printable(&path.to_string_lossy())));
        } else if !path.parent().is_some_and(Path::is_dir) {
            problems.push(format!(
                "storage directory {} is missing (map it with --map storage=OLD:NEW)",
                printable(&path.parent().unwrap_or(Path::new("/")).to_string_lossy())
            ));
        }
    }
    for d in &p.domains {
        let Ok(doc) = roxmltree::Document::parse(&d.xml) else {
            continue;
        };
        // A domain that takes the name or UUID of one libvirt has here would replace its definition.
        let child = |tag: &str| {
            doc.root_element()
                .children()
                .find(|n| n.has_tag_name(tag))
                .and_then(|n| n.text())
                .map(|t| t.trim().to_string())
        };
        let (name, uuid) = (child("name"), child("uuid"));
        let found = with_deadline(
            format!("looking up domain {}", printable(name.as_deref().unwrap_or(""))),
            LIBVIRT_DEADLINE,
            move || {
                let conn = virt::connect::Connect::open(Some("qemu:///system"))?;
                let by_name = name.as_deref().is_some_and(|n| conn.lookup_domain_by_name(n).is_ok());
                let by_uuid = uuid
                    .as_deref()
                    .is_some_and(|u| conn.lookup_domain_by_uuid_string(u).is_ok());
                Ok(by_name || by_uuid)
            },
        );
        match found {
            Ok(false) => {}
            Ok(true) => problems.push(format!(
                "VM {}: libvirt has a domain with its name or UUID on this host already",
                printable(&d.vm)
            )),
            Err(e) => problems.push(format!("VM {}: {}", printable(&d.vm), printable(&format!("{e:#}")))),
        }
        for s in doc
            .descendants()
            .filter(|n| n.has_tag_name("source") && n.parent().is_some_and(|p| p.has_tag_name("interface")))
        {
            if let Some(br) = s.attribute("bridge") {
                let name_ok = !br.is_empty() && br != "." && br != ".." && !br.contains('/');
                if !name_ok || !Path::new("/sys/class/net").join(br).exists() {
                    problems.push(format!(
                        "VM {}: bridge {} does not exist here (--map network=...)",
                        printable(&d.vm),
                        printable(br)
                    ));
                }
            }
            if let Some(net) = s.attribute("network") {
                let net = net.to_string();
                let found = with_deadline(format!("looking up network {net}"), LIBVIRT_DEADLINE, move || {
                    let conn = virt::connect::Connect::open(Some("qemu:///system"))?;
                    Ok(conn.lookup_network_by_name(&net).is_ok())
                });
                match found {
                    Ok(true) => {}
                    Ok(false) => problems.push(format!(
                        "VM {}: libvirt network {} does not exist here (--map network=...)",
                        printable(&d.vm),
                        printable(s.attribute("network").unwrap_or(""))
                    )),
                    Err(e) => problems.push(format!("VM {}: {}", printable(&d.vm), printable(&format!("{e:#}")))),
                }
            }
        }
    }
    problems
}

/// What an instantiate has created so far, removed again on failure.
#[derive(Default)]
struct Created {
    files: Vec<ConfinedPath>,
    /// (section, element xml) for CIB deletes.
    cib: Vec<(&'static str, String)>,
}

impl Created {
    fn is_empty(&self) -> bool {
        self.files.is_empty() && self.cib.is_empty()
    }

    async fn undo(&mut self, cib: &Cib, vms: &[String]) {
        for (section, xml) in self.cib.drain(..) {
            if let Err(e) = cib
                .delete(&Scope::section(section), &xml, CallOptions::NONE, CIB_DEADLINE)
                .await
            {
                tracing::warn!("rollback: deleting {xml} from {section}: {e}");
            }
        }
        // The domains must be gone before their files are.
        if let Err(e) = wait_view(cib, Duration::from_secs(120), "removed VMs stopped", |v| {
            vms.iter().all(|n| v.vm(n).is_none_or(|vm| vm.hosts.is_empty()))
        })
        .await
        {
            tracing::warn!("rollback: {e:#}");
        }
        self.undo_files();
    }

    fn undo_files(&mut self) {
        for f in self.files.drain(..).rev() {
            if let Err(e) = f.remove() {
                tracing::warn!("rollback: {e:#}");
            }
        }
    }
}

fn created_elements(fragment: &str) -> Result<Vec<(&'static str, String)>> {
    let doc = roxmltree::Document::parse(fragment)?;
    let mut out = Vec::new();
    for (section, tag) in [
        ("tags", "tags"),
        ("constraints", "constraints"),
        ("resources", "resources"),
    ] {
        if let Some(s) = doc.root_element().children().find(|n| n.has_tag_name(tag)) {
            for el in s.children().filter(|n| n.is_element()) {
                out.push((
                    section,
                    format!(
                        "<{} id=\"{}\"/>",
                        el.tag_name().name(),
                        escape(el.attribute("id").unwrap_or(""))
                    ),
                ));
            }
        }
    }
    Ok(out)
}

/// What an instantiate is asked to do.
#[derive(Debug, Clone)]
pub struct InstantiateOptions {
    /// `KIND=OLD:NEW` specifications (see [`Maps::parse`]).
    pub maps: Vec<String>,
    pub name: Option<String>,
    /// `--allow` categories and `agent=CLASS:PROVIDER:TYPE` items (see [`Allow::parse`]).
    pub allow: Vec<String>,
    pub dry_run: bool,
    /// How long to wait for the VMs to run (zero: do not wait).
    pub wait: Duration,
    /// Refuse an archive not signed by a trusted key.
    pub require_signature: bool,
    /// The trusted public keys as (source, key file text); empty: those in
    /// [`signature::TRUSTED_KEYS_DIR`].
    pub trusted_keys: Vec<(String, String)>,
}

impl InstantiateOptions {
    /// The keys to trust (read from [`signature::TRUSTED_KEYS_DIR`] unless given) and whether a
    /// signature is required.
    pub fn trust(&self) -> Result<Trust> {
        let keys = if self.trusted_keys.is_empty() {
            signature::load_dir(Path::new(signature::TRUSTED_KEYS_DIR))?
        } else {
            self.trusted_keys
                .iter()
                .map(|(source, text)| {
                    Ok(TrustedKey {
                        key: signature::PublicKey::parse(text, source)?,
                        source: source.clone(),
                    })
                })
                .collect::<Result<_>>()?
        };
        Ok(Trust {
            keys,
            require: self.require_signature,
        })
    }
}

/// How an instantiate went: the plan (once the archive's head was read) and the problems the target
/// has, then the outcome (the final message, or why it failed after removing what it had created).
#[derive(Debug)]
pub struct Instantiated {
    pub plan: Option<Plan>,
    pub problems: Vec<String>,
    pub result: Result<String>,
}

impl Instantiated {
    /// The plan and problems as JSON (the job's details).
    pub fn details(&self) -> Value {
        json!({
            "plan": self.plan,
            "plan_text": self.plan.as_ref().map(Plan::text),
            "problems": self.problems,
        })
    }
}

/// The hidden name a disk is written under until the whole archive checked out: next to its
/// destination (same directory, so that a link puts it in place).
fn staging_path(to: &ConfinedPath) -> ConfinedPath {
    to.sibling(format!(".{}.vmha-partial", to.name))
}

/// Instantiates the archive read from `input` on this cluster: one pass over the archive (its head is
/// checked and planned against this cluster before any disk data is read; the disks are written under
/// hidden names and put in place only once the whole archive checked out), then the domain definitions,
/// one CIB change and the wait for the VMs. On any failure what was created is removed again.
pub async fn instantiate_from(input: File, opts: &InstantiateOptions, report: &dyn Report) -> Instantiated {
    let mut outcome = Instantiated {
        plan: None,
        problems: Vec::new(),
        result: Ok(String::new()),
    };
    let mut staged: Vec<(ConfinedPath, ConfinedPath)> = Vec::new();
    let mut created = Created::default();
    let mut vms = Vec::new();
    let result = async {
        let trust = opts.trust()?;
        let mut maps = Maps::parse(&opts.maps, opts.name.clone())?;
        maps.allow = Allow::parse(&opts.allow).map_err(|e| anyhow!(e))?;
        let roots = maps.roots();
        report.step(Some(0.0), "reading the CIB");
        let cib = connect().await?;
        let xml = query(&cib).await?;
        let view = ClusterView::from_cib(&xml)?;
        let target = Target {
            hosts: view.hosts.iter().map(|h| h.name.clone()).collect(),
            ids: configuration_ids(&xml)?,
        };
        let total = input.metadata().map(|m| m.len()).unwrap_or(0);
        // Read front to back: a larger read-ahead.
        let _ = nix::fcntl::posix_fadvise(
            std::os::fd::AsRawFd::as_raw_fd(&input),
            0,
            0,
            nix::fcntl::PosixFadviseAdvice::POSIX_FADV_SEQUENTIAL,
        );
        let mut progress = Progress::new(report, "archive".into(), total, (0.05, 0.8));
        report.step(Some(0.02), "reading and checking the archive");
        let read = archive::read_trusting(
            BufReader::with_capacity(1 << 20, input),
            &trust,
            |head| -> Result<Option<DiskFiles>> {
                let p = plan(head, &maps, &target)?;
                let problems = check_target(&p);
                report.step(
                    Some(0.05),
                    &format!(
                        "planned: {} resources, {} domains, {} disks",
                        p.resources.len(),
                        p.domains.len(),
                        p.disks.len()
                    ),
                );
                outcome.problems = problems.clone();
                let disks = p.disks.clone();
                outcome.plan = Some(p);
                if !problems.is_empty() {
                    bail!("the target is not ready: {}", problems.join("; "));
                }
                if opts.dry_run {
                    return Ok(None);
                }
                // Every destination under a storage root, its directory opened without following links;
                // room for every disk's full size (the most the archive can write) before any is written.
                let mut destinations = Vec::new();
                for d in &disks {
                    destinations.push((ConfinedPath::locate(&d.to, &roots)?, d));
                }
                check_free_space(destinations.iter().map(|(to, d)| (to, d.size)))?;
                let mut files = DiskFiles::new();
                for (to, d) in destinations {
                    let stage = staging_path(&to);
                    let f = stage.create_new()?;
                    staged.push((stage, to));
                    files.insert(d.id, f);
                }
                Ok(Some(files))
            },
            &mut |n| progress.update(n),
        );
        progress.finish(total);
        read.context("the archive was rejected")?;
        let p = outcome.plan.as_ref().ok_or_else(|| anyhow!("no plan"))?;
        if opts.dry_run {
            return Ok("dry run: nothing changed".to_string());
        }
        vms = p.domains.iter().map(|d| d.vm.clone()).collect();
        report.step(Some(0.82), "placing the disks and domain definitions");
        for (stage, to) in staged.drain(..) {
            // A hard link does not replace a file that appeared meanwhile; then the hidden name goes.
            stage.link_to(&to)?;
            created.files.push(to);
            stage.remove()?;
        }
        apply(&cib, p, &roots, &mut created, opts.wait, &vms, report).await?;
        Ok(format!("virtual cluster {} instantiated", p.name))
    }
    .await;
    for (stage, _) in staged.drain(..) {
        let _ = stage.remove();
    }
    let mut rolled_back = false;
    if let Err(e) = &result {
        if !created.is_empty() {
            report.step(None, &format!("instantiate failed, removing what it created: {e:#}"));
            match connect().await {
                Ok(cib) => created.undo(&cib, &vms).await,
                Err(ce) => {
                    tracing::warn!("rollback: {ce:#}");
                    created.undo_files();
                }
            }
            rolled_back = true;
        }
    }
    outcome.result = result.map_err(|e| {
        if rolled_back {
            anyhow!("{e:#} (instantiate failed, removing what it created: done)")
        } else {
            e
        }
    });
    outcome
}

#[allow(clippy::too_many_arguments)]
async fn apply(
    cib: &Cib,
    p: &Plan,
    roots: &[String],
    created: &mut Created,
    wait: Duration,
    vms: &[String],
    report: &dyn Report,
) -> Result<()> {
    for d in &p.domains {
        let to = ConfinedPath::locate(&d.path, roots)?;
        let mut f = to.create_new()?;
        created.files.push(to);
        f.write_all(d.xml.as_bytes())?;
        f.sync_all()?;
    }
    report.step(
        Some(0.85),
        "creating the resources, constraints and tag (one CIB change)",
    );
    let elements = created_elements(&p.cib_fragment)?;
    cib.modify(
        &Scope::section("configuration"),
        &p.cib_fragment,
        CallOptions::CAN_CREATE,
        CIB_DEADLINE,
    )
    .await
    .context("creating the resources, constraints and tag (one CIB change)")?;
    created.cib = elements;
    if wait.is_zero() {
        return Ok(());
    }
    report.step(Some(0.9), "waiting for the virtual cluster to run");
    // Activation: every VM whose captured target-role is not Stopped runs.
    let xml = query(cib).await?;
    let expect: Vec<String> = vms
        .iter()
        .filter(|v| target_role(&xml, v).ok().flatten().is_none_or(|(_, r)| r != "Stopped"))
        .cloned()
        .collect();
    wait_view(cib, wait, "virtual cluster running", |v| {
        expect
            .iter()
            .all(|n| v.vm(n).is_some_and(|vm| vm.state == VmState::Running))
    })
    .await
}

/// Runs a capture or an instantiate to its end on the calling thread (a job's own thread in vmhad).
pub fn block_on<T>(f: impl std::future::Future<Output = T>) -> std::io::Result<T> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(f))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn show_names_the_host_a_vm_runs_on() {
        let v = json!({"resource": "vm1", "state": "running", "hosts": ["node2"]});
        assert_eq!(show_vm_line(&v), "  vm vm1 running on node2");
    }

    #[test]
    fn show_names_every_host_of_a_vm_active_on_several() {
        let v = json!({"resource": "vm1", "state": "running", "hosts": ["node1", "node3"]});
        assert_eq!(show_vm_line(&v), "  vm vm1 running on node1,node3");
    }

    #[test]
    fn show_says_nowhere_for_a_vm_on_no_host() {
        let v = json!({"resource": "vm2", "state": "stopped", "hosts": []});
        assert_eq!(show_vm_line(&v), "  vm vm2 stopped nowhere");
        let unknown = json!({"resource": "vm3", "state": null, "hosts": []});
        assert_eq!(show_vm_line(&unknown), "  vm vm3 ? nowhere");
    }
}
