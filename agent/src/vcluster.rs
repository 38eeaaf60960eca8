//! `vmha vcluster`: virtual clusters (a Pacemaker tag naming a set of resources), their capture into an
//! archive and their instantiation on another cluster. The tag commands work on this host's CIB through
//! the Pacemaker CIB API (vmha-pacemaker); every call has a deadline. Capture and instantiate are
//! operations of the `vmha-ops` crate (journaled, rolled back); vmhad runs them with the archive file
//! read or written here ([`FileArchive`], [`FileSink`]). The archive format, capture and translation
//! are in the `vmha-vcluster` crate (pure logic).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use clap::Subcommand;
use serde_json::{json, Value};
use vmha_api::json::document;
use vmha_model::change::{escape, validate_name};
use vmha_model::ClusterView;
use vmha_ops::ports::BoxFuture;
use vmha_ops::vcluster::{ArchiveSink, ArchiveSource, CaptureSpec, InstantiateSpec, Instantiated};
use vmha_ops::{OpError, Ports};
use vmha_pacemaker::{Access, CallOptions, Cib, Scope};
use vmha_vcluster::archive::{self, ArchiveWriter, DiskFiles, DiskStats, Manifest, Verified, WriteBehind};
use vmha_vcluster::capture::{self, capture, configuration_ids, Captured};
use vmha_vcluster::manifest_for;
use vmha_vcluster::signature::{self, SecretKey, Trust, TrustedKey};

/// Deadline of one CIB call.
const CIB_DEADLINE: Duration = Duration::from_secs(30);

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

/// A read-write connection to this host's CIB, for the CLI's own commands (`vmha vcluster`, `vmha site`).
pub(crate) async fn connect() -> Result<Cib> {
    Cib::connect("vmha", Access::ReadWrite, CIB_DEADLINE)
        .await
        .context("connecting to this host's CIB (is Pacemaker running here?)")
}

/// The whole CIB through `cib`.
pub(crate) async fn query(cib: &Cib) -> Result<String> {
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

/// The time now, RFC 3339 in UTC (as the archives write it).
pub(crate) fn now_rfc3339() -> String {
    archive::rfc3339(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    )
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

impl InstantiateOptions {
    /// The operation's request: the maps, the opt-ins and the trust (keys read here).
    pub fn spec(&self) -> Result<InstantiateSpec> {
        Ok(InstantiateSpec {
            maps: self.maps.clone(),
            name: self.name.clone(),
            allow: self.allow.clone(),
            dry_run: self.dry_run,
            wait: self.wait,
            trust: self.trust()?,
        })
    }
}

/// What the archive reader thread sends.
enum Read {
    Head(Box<Verified>),
    Done(Result<(), String>),
}

/// The archive file of an instantiate, read once on a thread of its own ([`archive::read_trusting`]):
/// the head is sent to the operation, which answers with the files the disks go to; the thread then
/// writes the disks and checks the rest. Dropped midway, the thread stops at its next entry.
pub struct FileArchive {
    input: Option<File>,
    trust: Trust,
    report: Arc<dyn Report>,
    files: Option<std::sync::mpsc::Sender<Option<DiskFiles>>>,
    read: Option<tokio::sync::mpsc::UnboundedReceiver<Read>>,
}

impl std::fmt::Debug for FileArchive {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileArchive").finish_non_exhaustive()
    }
}

impl FileArchive {
    pub fn new(input: File, trust: Trust, report: Arc<dyn Report>) -> Self {
        FileArchive {
            input: Some(input),
            trust,
            report,
            files: None,
            read: None,
        }
    }

    fn start(&mut self) -> Result<(), String> {
        let input = self.input.take().ok_or("the archive is read once")?;
        let trust = self.trust.clone();
        let report = Arc::clone(&self.report);
        let (files_tx, files_rx) = std::sync::mpsc::channel::<Option<DiskFiles>>();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        self.files = Some(files_tx);
        self.read = Some(rx);
        std::thread::Builder::new()
            .name("vmha-archive".into())
            .spawn(move || {
                let total = input.metadata().map(|m| m.len()).unwrap_or(0);
                // Read front to back: a larger read-ahead.
                let _ = nix::fcntl::posix_fadvise(
                    std::os::fd::AsRawFd::as_raw_fd(&input),
                    0,
                    0,
                    nix::fcntl::PosixFadviseAdvice::POSIX_FADV_SEQUENTIAL,
                );
                let mut progress = Progress::new(&*report, "archive".into(), total, (0.05, 0.8));
                let head_tx = tx.clone();
                let read = archive::read_trusting(
                    BufReader::with_capacity(1 << 20, input),
                    &trust,
                    |head| -> std::result::Result<Option<DiskFiles>, archive::ArchiveError> {
                        let _ = head_tx.send(Read::Head(Box::new(head.clone())));
                        files_rx
                            .recv()
                            .map_err(|_| archive::ArchiveError::Unsupported("the instantiate stopped".into()))
                    },
                    &mut |n| progress.update(n),
                );
                progress.finish(total);
                let _ = tx.send(Read::Done(read.map(|_| ()).map_err(|e| e.to_string())));
            })
            .map_err(|e| format!("cannot start the archive reader: {e}"))?;
        Ok(())
    }

    async fn next(&mut self) -> Option<Read> {
        self.read.as_mut()?.recv().await
    }
}

impl ArchiveSource for FileArchive {
    fn head(&mut self) -> BoxFuture<'_, std::result::Result<Verified, String>> {
        Box::pin(async move {
            self.start()?;
            match self.next().await {
                Some(Read::Head(head)) => Ok(*head),
                Some(Read::Done(Err(e))) => Err(e),
                Some(Read::Done(Ok(()))) | None => Err("the archive reader stopped".into()),
            }
        })
    }

    fn rest(&mut self, files: Option<BTreeMap<u32, File>>) -> BoxFuture<'_, std::result::Result<(), String>> {
        Box::pin(async move {
            let tx = self.files.take().ok_or("the archive's head was not read")?;
            tx.send(files).map_err(|_| "the archive reader stopped".to_string())?;
            match self.next().await {
                Some(Read::Done(r)) => r,
                _ => Err("the archive reader stopped".into()),
            }
        })
    }
}

/// The archive file a capture writes (from its start, synced), signed with the key given, the disks'
/// progress reported.
pub struct FileSink {
    out: Option<File>,
    level: i32,
    sign: Option<SecretKey>,
    report: Arc<dyn Report>,
    disks: Vec<(String, String, File)>,
}

impl std::fmt::Debug for FileSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileSink")
            .field("level", &self.level)
            .finish_non_exhaustive()
    }
}

impl FileSink {
    pub fn new(out: File, opts: &CaptureOptions, report: Arc<dyn Report>) -> Self {
        FileSink {
            out: Some(out),
            level: opts.level,
            sign: opts.sign.clone(),
            report,
            disks: Vec::new(),
        }
    }
}

fn sink_error(e: impl std::fmt::Display) -> OpError {
    OpError::Data {
        what: "writing the archive".into(),
        reason: e.to_string(),
    }
}

impl ArchiveSink for FileSink {
    fn open_disks(&mut self, disks: Vec<(String, String)>) -> BoxFuture<'_, std::result::Result<(), OpError>> {
        Box::pin(async move {
            for (vm, path) in disks {
                let file = File::open(&path).map_err(|e| {
                    OpError::Storage(vmha_ops::ports::StorageError {
                        path: path.clone(),
                        message: format!("opening {vm}'s disk: {e}"),
                    })
                })?;
                self.disks.push((vm, path, file));
            }
            Ok(())
        })
    }

    fn write<'a>(
        &'a mut self,
        c: &'a Captured,
        metadata: &'a BTreeMap<String, Vec<u8>>,
        placement: BTreeMap<String, String>,
        consistency: &'a str,
    ) -> BoxFuture<'a, std::result::Result<(Manifest, Vec<DiskStats>), OpError>> {
        let out = self.out.take();
        let disks = std::mem::take(&mut self.disks);
        let (c, metadata, consistency) = (c.clone(), metadata.clone(), consistency.to_string());
        let (level, sign, report) = (self.level, self.sign.clone(), Arc::clone(&self.report));
        Box::pin(async move {
            let out = out.ok_or_else(|| sink_error("the archive is written once"))?;
            let work = tokio::task::spawn_blocking(move || -> Result<(Manifest, Vec<DiskStats>)> {
                // The manifest lists the disks with their sizes as they are now (stopped or frozen).
                let sized = disks
                    .iter()
                    .map(|(vm, path, f)| Ok((vm.clone(), path.clone(), f.metadata()?.len())))
                    .collect::<Result<Vec<_>>>()?;
                let manifest = manifest_for(&c, placement, now_rfc3339(), &consistency, &sized);
                let out = BufWriter::with_capacity(1 << 20, WriteBehind::new(out)?);
                let mut writer = ArchiveWriter::new_signed(out, level, manifest, &metadata, sign)?;
                let total: u64 = sized.iter().map(|d| d.2).sum::<u64>().max(1);
                let mut done = 0;
                for (vm, path, file) in &disks {
                    let size = file.metadata()?.len();
                    let span = (
                        0.1 + 0.85 * done as f64 / total as f64,
                        0.1 + 0.85 * (done + size) as f64 / total as f64,
                    );
                    let mut p = Progress::new(&*report, format!("{vm} {path}"), size, span);
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
            });
            work.await
                .map_err(sink_error)?
                .map_err(|e| sink_error(format!("{e:#}")))
        })
    }
}

/// Instantiates the archive in `input` with vmhad's ports (see [`vmha_ops::vcluster::instantiate`]).
pub async fn run_instantiate(
    p: &Ports,
    progress: &dyn vmha_ops::ports::Progress,
    report: Arc<dyn Report>,
    input: File,
    spec: &InstantiateSpec,
    job_id: &str,
) -> Instantiated {
    let mut archive = FileArchive::new(input, spec.trust.clone(), report);
    vmha_ops::vcluster::instantiate(p, progress, spec, &mut archive, job_id).await
}

/// Captures a virtual cluster into `out` with vmhad's ports (see [`vmha_ops::vcluster::capture`]);
/// the summary names the signer.
pub async fn run_capture(
    p: &Ports,
    progress: &dyn vmha_ops::ports::Progress,
    report: Arc<dyn Report>,
    opts: &CaptureOptions,
    out: File,
    job_id: &str,
) -> std::result::Result<Value, OpError> {
    let mut sink = FileSink::new(out, opts, report);
    let spec = CaptureSpec {
        name: opts.name.clone(),
        with_disks: opts.with_disks,
        halt: opts.halt,
    };
    let mut summary = vmha_ops::vcluster::capture(p, progress, &spec, &mut sink, job_id).await?;
    summary["signed_by"] = json!(opts.sign.as_ref().map(|k| k.public().fingerprint()));
    Ok(summary)
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
