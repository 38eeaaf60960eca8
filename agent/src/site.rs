//! `vmha site`: disaster recovery between sites with booth. Each site is its own cluster; booth (site
//! daemons as cluster resources, an arbitrator at a third place) decides with a ticket where a service may
//! run, and Pacemaker's `rsc_ticket` keeps a virtual cluster (a tag, see `vmha vcluster`) stopped wherever
//! its ticket is not granted.
//!
//! What is read: booth's configuration (`/etc/booth/booth.conf`: sites, arbitrators, tickets), the
//! tickets' state as booth committed it to this site's CIB (`status/tickets/ticket_state`, through the
//! Pacemaker CIB API), the `rsc_ticket` constraints (which virtual cluster holds which ticket), and which
//! site this cluster is (the address of the `ocf:heartbeat:IPaddr2` grouped with `ocf:pacemaker:booth-site`).
//! Where a ticket is granted across sites only booth knows: booth has no library or status socket other
//! than its client protocol, so `booth list`, `booth grant` and `booth revoke` are run as bounded-time child
//! processes ([`BOOTH_DEADLINE`], killed past it), with arguments checked here first (no name starts with
//! `-`, see [`validate_ticket`]).
//!
//! Operator input (virtual cluster, ticket and site names, maps) is checked before anything is changed.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use crate::vcluster::{connect, query};
use anyhow::{anyhow, bail, Context, Result};
use clap::{Subcommand, ValueEnum};
use serde::Serialize;
use vmha_api::json::document;
use vmha_model::change::{escape, set_resource_meta, validate_name};
pub use vmha_model::site::{
    parse_booth_list, validate_site, validate_ticket, BoothConf, BoothTicket, CibTicket, SiteError, SiteView,
    TicketBinding, TicketConf,
};
use vmha_model::ClusterView;
use vmha_pacemaker::{CallOptions, Cib, Scope};
use vmha_vcluster::capture;
use vmha_vcluster::translate::{domain_disks, Maps};

/// booth's configuration file (booth's default).
pub const BOOTH_CONF: &str = "/etc/booth/booth.conf";
/// Deadline of one booth client call (booth's own network timeout is 5 s by default; a grant waits for
/// the other sites' answers).
pub const BOOTH_DEADLINE: Duration = Duration::from_secs(30);
/// Deadline of one CIB call.
const CIB_DEADLINE: Duration = Duration::from_secs(30);

/// What a site does with a virtual cluster when its ticket is lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LossPolicy {
    /// Stop the resources (they must stop cleanly before the other site may start them).
    Stop,
    /// Fence the hosts running them.
    Fence,
}

impl LossPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            LossPolicy::Stop => "stop",
            LossPolicy::Fence => "fence",
        }
    }
}

/// The id of the `rsc_ticket` vmha makes for virtual cluster `vc`.
pub fn binding_id(vc: &str) -> String {
    format!("vmha-site-{vc}")
}

/// The `rsc_ticket` constraint holding virtual cluster (tag) `vc` by `ticket`.
pub fn rsc_ticket_xml(vc: &str, ticket: &str, loss: LossPolicy) -> String {
    format!(
        r#"<rsc_ticket id="{}" rsc="{}" ticket="{}" loss-policy="{}"/>"#,
        escape(&binding_id(vc)),
        escape(vc),
        escape(ticket),
        loss.as_str()
    )
}

#[derive(Subcommand, Debug)]
pub enum SiteCmd {
    /// Sites, tickets (granted where, until when) and which virtual cluster each ticket holds.
    Status,
    /// Protect a virtual cluster with a booth ticket. At the site that runs it (the ticket granted here):
    /// an rsc_ticket for its tag, and with --archive FILE a capture with disks for the peer. At the peer
    /// (--from-archive FILE): the rsc_ticket first, then the archive instantiated through the capture maps,
    /// held stopped by the ticket.
    Protect {
        vcluster: String,
        #[arg(long)]
        ticket: String,
        /// The other site (its booth site address).
        #[arg(long)]
        peer: String,
        /// What this site does when it loses the ticket.
        #[arg(long, value_enum, default_value_t = LossPolicy::Stop)]
        loss_policy: LossPolicy,
        /// At the running site: capture the virtual cluster with its disks into FILE for the peer.
        #[arg(long, value_name = "FILE", conflicts_with = "from_archive")]
        archive: Option<PathBuf>,
        /// At the peer site: instantiate this archive (made by protect --archive), held by the ticket.
        #[arg(long, value_name = "FILE")]
        from_archive: Option<PathBuf>,
        /// Maps for the instantiate at the peer (as `vmha vcluster instantiate --map`).
        #[arg(long = "map", value_name = "KIND=OLD:NEW", requires = "from_archive")]
        maps: Vec<String>,
        /// Protect although booth's messages are not authenticated here (booth.conf has no usable
        /// `authfile`): then anyone who can send to booth's port can grant or revoke the ticket.
        #[arg(long)]
        allow_unauthenticated_booth: bool,
    },
    /// Planned switchover (no data loss): stop the virtual cluster here, wait until it is stopped, copy
    /// its disks to the peer's storage (a full copy while stopped; --map storage=/HERE:/PEER), revoke the
    /// ticket here and grant it to the peer, which then starts it. Run it at the site that holds the ticket.
    Switchover {
        vcluster: String,
        /// The site to move to (its booth site address).
        #[arg(long)]
        to: String,
        /// storage=/HERE:/PEER: where the peer's copies of the disks are.
        #[arg(long = "map", value_name = "KIND=OLD:NEW")]
        maps: Vec<String>,
        /// Seconds to wait for the virtual cluster to stop here.
        #[arg(long, default_value_t = 120)]
        wait: u64,
    },
    /// Replication while running: bring the peer's copies of the virtual cluster's disks up to one
    /// consistent point (guests frozen through qemu-guest-agent only while libvirt's backup jobs start;
    /// the copy runs while they work on). Run it at the site that holds the ticket; the peer's copies are
    /// replaced only once every copy of the round is complete. A full copy each round.
    Replicate {
        vcluster: String,
        /// storage=/HERE:/PEER: where the peer's copies of the disks are (mounted on this site's hosts).
        #[arg(long = "map", value_name = "KIND=OLD:NEW")]
        maps: Vec<String>,
        /// Repeat every SECS seconds (a failed round is reported and the next one tried; stops when the
        /// ticket is no longer here).
        #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..))]
        every: Option<u64>,
        /// Seconds a round may take to copy before it is abandoned (the peer keeps its previous copies).
        #[arg(long, default_value_t = 3600)]
        wait: u64,
        /// Do not freeze the guests' file systems: crash-consistent copies (for VMs without qemu-guest-agent).
        #[arg(long)]
        no_freeze: bool,
    },
    /// Replication by vmhad: while this site holds the virtual cluster's ticket, the DC's vmhad runs a
    /// `replicate` round every SECS seconds (stored in this site's CIB; set it at each site, with that
    /// site's maps, so that the copies follow the ticket). --off removes it.
    Replication {
        vcluster: String,
        /// Seconds between rounds (5 to 86400).
        #[arg(long, value_name = "SECS", required_unless_present = "off")]
        every: Option<u64>,
        /// storage=/HERE:/PEER: where the peer's copies are.
        #[arg(long = "map", value_name = "KIND=OLD:NEW")]
        maps: Vec<String>,
        /// Report the replica stale (the D-Bus event `replica-stale`, a warning in vmhad's log) after SECS
        /// seconds without a round that succeeded: one period to a week; 3 periods when not given.
        #[arg(long, value_name = "SECS")]
        stale_after: Option<u64>,
        /// Stop vmhad's replication of the virtual cluster.
        #[arg(long, conflicts_with_all = ["every", "maps", "stale_after"])]
        off: bool,
    },
    /// Failover by hand when the site holding the ticket is known to be lost: the ticket is granted here
    /// with booth's override (`booth grant -F`), without waiting for the lost site to give it up. Booth
    /// does this itself after the ticket's expiry; this is for when the operator knows sooner.
    Failover {
        vcluster: String,
        /// The lost site (its booth site address).
        #[arg(long)]
        lost: String,
        /// The operator confirms the lost site runs nothing (powered off or fenced): without it nothing is
        /// done (two sites running one VM corrupts its disks).
        #[arg(long)]
        confirm_lost: bool,
    },
    /// What a takeover would do here if SITE were lost: the tickets it holds (booth list, or --ticket)
    /// granted to this cluster on a copy of its CIB, and Pacemaker's scheduler says which VMs would start
    /// where and which of this site's VMs would give way. Changes nothing.
    WhatIf {
        /// The site assumed lost (its booth site address).
        #[arg(long)]
        lost: String,
        /// The tickets to assume granted here (default: those booth says the lost site holds).
        #[arg(long = "ticket", value_name = "TICKET")]
        tickets: Vec<String>,
    },
}

impl SiteCmd {
    /// Whether the CLI does it without vmhad (all but a protect that captures or instantiates).
    pub fn runs_locally(&self) -> bool {
        !matches!(
            self,
            SiteCmd::Protect { archive: Some(_), .. }
                | SiteCmd::Protect {
                    from_archive: Some(_),
                    ..
                }
        )
    }
}

/// Runs the booth client with `args` (checked by the caller), killed after [`BOOTH_DEADLINE`]. Returns
/// stdout; a non-zero exit is an error naming the call.
pub async fn booth(args: &[&str]) -> Result<String> {
    let call = format!("booth {}", args.join(" "));
    // `-c FILE` last: Debian 12's booth client crashes (SIGSEGV) without -c, or with -c before -s.
    let child = tokio::process::Command::new("booth")
        .args(args)
        .args(["-c", BOOTH_CONF])
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(BOOTH_DEADLINE, child)
        .await
        .map_err(|_| anyhow!("{call}: no answer within {} s", BOOTH_DEADLINE.as_secs()))?
        .with_context(|| format!("running {call} (is booth installed?)"))?;
    if !out.status.success() {
        bail!(
            "{call} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// This site's booth address, for the client's `-s` (Debian 12's booth client crashes when it has to find
/// its site itself, so vmha always names it).
fn local_site(view: &SiteView) -> Result<String> {
    view.local_site.map(|a| a.to_string()).ok_or_else(|| {
        anyhow!("this cluster has no booth site group (an IPaddr2 grouped with ocf:pacemaker:booth-site)")
    })
}

/// Reads and parses booth's configuration.
pub fn read_booth_conf(path: &Path) -> Result<BoothConf> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading booth's configuration {} (is booth set up?)", path.display()))?;
    Ok(BoothConf::parse(&text)?)
}

/// Everything `vmha site status` shows.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub local_site: Option<Ipv4Addr>,
    pub sites: Vec<Ipv4Addr>,
    pub arbitrators: Vec<Ipv4Addr>,
    pub tickets: Vec<TicketStatus>,
    pub authentication: Authentication,
    /// This site's copies of the protected virtual clusters that do not run here: how old they are (the
    /// data a failover here would lose, up to now).
    pub replicas: Vec<ReplicaAge>,
    /// Replication by vmhad set at this site (`vmha site replication`).
    pub replication: Vec<ReplicationStatus>,
}

/// A replication setting of this site and, where the virtual cluster runs here, how old the peer's
/// copies are (read through the setting's storage maps).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ReplicationStatus {
    pub vcluster: String,
    /// The setting as stored (`every=SECS storage=/HERE:/PEER`).
    pub setting: String,
    /// Why vmhad does not use it, when it does not.
    pub problem: Option<String>,
    /// The oldest of the peer's copies (RFC 3339) and its age, when the virtual cluster runs here.
    pub peer_copies_as_of: Option<String>,
    pub age_seconds: Option<u64>,
}

/// The replication settings of this site's CIB, with the peer's copies' age where VC runs here.
fn replication_status(
    xml: &str,
    cluster: &ClusterView,
    tags: &BTreeMap<String, Vec<String>>,
) -> Vec<ReplicationStatus> {
    use vmha_model::replica::ReplicationSetting;
    cluster
        .replications
        .iter()
        .map(|(vc, raw)| {
            let members = tags.get(vc).cloned().unwrap_or_default();
            let runs_here = members.iter().any(|m| cluster.vm(m).is_some_and(not_settled_stopped));
            let setting = validate_name("virtual cluster name", vc)
                .map_err(anyhow::Error::from)
                .and_then(|()| Ok(ReplicationSetting::parse(vc, raw)?))
                .and_then(|s| Ok(Maps::parse(&s.maps(), None)?));
            let mut st = ReplicationStatus {
                vcluster: vmha_model::printable(vc),
                setting: vmha_model::printable(raw),
                problem: None,
                peer_copies_as_of: None,
                age_seconds: None,
            };
            match setting {
                Err(e) => st.problem = Some(format!("{e:#}")),
                Ok(maps) if runs_here => match disk_copies(xml, &members, &maps) {
                    Err(e) => st.problem = Some(format!("{e:#}")),
                    Ok(copies) => {
                        let oldest = copies
                            .iter()
                            .filter_map(|(_, to)| std::fs::symlink_metadata(to).and_then(|m| m.modified()).ok())
                            .min();
                        if let Some(t) = oldest {
                            st.peer_copies_as_of = Some(humantime::format_rfc3339_seconds(t).to_string());
                            st.age_seconds = Some(t.elapsed().map(|d| d.as_secs()).unwrap_or(0));
                        }
                    }
                },
                Ok(_) => {}
            }
            st
        })
        .collect()
}

/// How old this site's copy of a virtual cluster's disks is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ReplicaAge {
    pub vcluster: String,
    /// The oldest image's point (RFC 3339): `vmha site replicate` stamps each copy with its consistent
    /// point; a switchover's copy or an instantiate carries the time it was written.
    pub as_of: String,
    pub age_seconds: u64,
    pub images: usize,
}

/// The age of this site's copies of every protected virtual cluster of which nothing runs here.
fn replica_ages(view: &SiteView, cluster: &ClusterView, tags: &BTreeMap<String, Vec<String>>) -> Vec<ReplicaAge> {
    let mut out = Vec::new();
    for b in &view.bindings {
        let members = tags.get(&b.rsc).cloned().unwrap_or_default();
        if members.iter().any(|m| cluster.vm(m).is_some_and(not_settled_stopped)) {
            continue;
        }
        let mut oldest: Option<std::time::SystemTime> = None;
        let mut images = 0;
        for m in &members {
            let Some(config) = cluster.vm(m).and_then(|v| v.config.clone()) else {
                continue;
            };
            let Ok(domain) = std::fs::read_to_string(&config) else {
                continue;
            };
            for disk in domain_disks(&domain).unwrap_or_default() {
                if let Ok(t) = std::fs::symlink_metadata(&disk).and_then(|m| m.modified()) {
                    images += 1;
                    oldest = Some(oldest.map_or(t, |o| o.min(t)));
                }
            }
        }
        if let Some(t) = oldest {
            out.push(ReplicaAge {
                vcluster: b.rsc.clone(),
                as_of: humantime::format_rfc3339_seconds(t).to_string(),
                age_seconds: t.elapsed().map(|d| d.as_secs()).unwrap_or(0),
                images,
            });
        }
    }
    out
}

/// Whether booth's messages are authenticated here: booth.conf's `authfile` and what is wrong with it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Authentication {
    /// booth.conf's `authfile` (`None`: booth's messages are not authenticated).
    pub authfile: Option<String>,
    /// What is wrong with the key file (`None`: boothd can use it). Never the key itself.
    pub problem: Option<String>,
}

/// The longest key file vmha reads to check it: booth's keys are at most 64 bytes (plus white space).
const AUTHKEY_READ_LIMIT: u64 = 4096;

/// Checks booth.conf's `authfile` on this host: there, a regular file, owner-only, 8 to 64 bytes of key.
pub fn check_authentication(conf: &BoothConf) -> Authentication {
    use std::io::Read as _;
    use std::os::unix::fs::MetadataExt as _;
    let Some(path) = conf.authfile.clone() else {
        return Authentication::default();
    };
    let problem = (|| -> std::result::Result<(), String> {
        // Not followed through a symbolic link: boothd opens the path itself, and a link could point vmha
        // at a device or a huge file.
        let meta = std::fs::symlink_metadata(&path).map_err(|e| format!("cannot be read: {e}"))?;
        if !meta.file_type().is_file() {
            return Err("is not a regular file".into());
        }
        if meta.len() > AUTHKEY_READ_LIMIT {
            return Err(format!(
                "is {} bytes; booth needs a key of at most 64 (booth-keygen makes one)",
                meta.len()
            ));
        }
        let mut key = Vec::new();
        std::fs::File::open(&path)
            .and_then(|f| f.take(AUTHKEY_READ_LIMIT).read_to_end(&mut key))
            .map_err(|e| format!("cannot be read: {e}"))?;
        match vmha_model::site::authkey_problem(meta.mode(), &key) {
            Some(p) => Err(p),
            None => Ok(()),
        }
    })()
    .err();
    Authentication {
        authfile: Some(path),
        problem,
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct TicketStatus {
    pub name: String,
    pub expire_seconds: u32,
    pub manual: bool,
    /// booth's `acquire-after`: how long the losing site has to stop what the ticket holds.
    pub acquire_after_seconds: u32,
    /// The site booth says holds it (`None`: nobody, or booth did not answer).
    pub leader: Option<Ipv4Addr>,
    pub expires: Option<String>,
    pub granted_here: bool,
    /// Virtual clusters (tags) this ticket holds here, with their loss policy.
    pub vclusters: Vec<(String, String)>,
    /// Members of those virtual clusters running here.
    pub running_here: Vec<String>,
}

fn status_of(
    conf: &BoothConf,
    view: &SiteView,
    booth_list: &[BoothTicket],
    cluster: &ClusterView,
    tags: &BTreeMap<String, Vec<String>>,
    authentication: Authentication,
) -> Status {
    let tickets = conf
        .tickets
        .iter()
        .map(|t| {
            let b = booth_list.iter().find(|b| b.name == t.name);
            let vclusters: Vec<(String, String)> = view
                .bindings
                .iter()
                .filter(|x| x.ticket == t.name)
                .map(|x| (x.rsc.clone(), x.loss_policy.clone()))
                .collect();
            let running_here = vclusters
                .iter()
                .flat_map(|(vc, _)| tags.get(vc).cloned().unwrap_or_default())
                .filter(|m| cluster.vm(m).is_some_and(not_settled_stopped))
                .collect();
            TicketStatus {
                name: t.name.clone(),
                expire_seconds: t.expire,
                manual: t.manual,
                acquire_after_seconds: t.acquire_after,
                leader: b.and_then(|b| b.leader),
                expires: b.and_then(|b| b.expires.clone()),
                granted_here: view.granted_here(&t.name),
                vclusters,
                running_here,
            }
        })
        .collect();
    Status {
        local_site: view.local_site,
        sites: conf.sites.clone(),
        arbitrators: conf.arbitrators.clone(),
        tickets,
        authentication,
        replicas: Vec::new(),
        replication: Vec::new(),
    }
}

/// Human form of [`Status`].
pub fn status_text(s: &Status) -> String {
    let site = |a: &Ipv4Addr| {
        if Some(*a) == s.local_site {
            format!("{a} (this site)")
        } else {
            a.to_string()
        }
    };
    let mut out = format!(
        "sites: {}\narbitrators: {}\nbooth authentication: {}\n\nTICKET           EXPIRE  HOLDER                 UNTIL                VIRTUAL CLUSTERS (running here)\n",
        s.sites.iter().map(site).collect::<Vec<_>>().join(", "),
        s.arbitrators.iter().map(|a| a.to_string()).collect::<Vec<_>>().join(", "),
        match (&s.authentication.authfile, &s.authentication.problem) {
            (None, _) => "none".to_string(),
            (Some(path), None) => format!("key {}", vmha_model::printable(path)),
            (Some(path), Some(_)) => format!("key {} (unusable: see below)", vmha_model::printable(path)),
        }
    );
    for t in &s.tickets {
        let holder = t.leader.map(|l| site(&l)).unwrap_or_else(|| "(nobody)".into());
        let vcs = if t.vclusters.is_empty() {
            "-".to_string()
        } else {
            t.vclusters
                .iter()
                .map(|(v, l)| format!("{v} (loss-policy {l})"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        out.push_str(&format!(
            "{:<16} {:>5}s  {:<22} {:<20} {}{}\n",
            t.name,
            t.expire_seconds,
            holder,
            t.expires.as_deref().unwrap_or("-"),
            vcs,
            if t.running_here.is_empty() {
                String::new()
            } else {
                format!(" [{}]", t.running_here.join(", "))
            }
        ));
    }
    for r in &s.replicas {
        out.push_str(&format!(
            "replica here of {}: disks as of {} ({} s ago, {} image(s)): a failover here starts from it\n",
            r.vcluster, r.as_of, r.age_seconds, r.images
        ));
    }
    for r in &s.replication {
        out.push_str(&format!("replication of {} by vmhad: {}", r.vcluster, r.setting));
        match (&r.problem, &r.peer_copies_as_of, r.age_seconds) {
            (Some(p), _, _) => out.push_str(&format!(" (NOT USED: {p})\n")),
            (None, Some(t), Some(age)) => out.push_str(&format!("; the peer's copies as of {t} ({age} s ago)\n")),
            _ => out.push_str("; runs while this site holds the ticket\n"),
        }
    }
    for w in status_warnings(s) {
        out.push_str(&format!("\nwarning: {w}"));
    }
    if !out.ends_with('\n') {
        out.push('\n');
    }
    out
}

/// What an operator should fix in booth's configuration for the virtual clusters it protects.
pub fn status_warnings(s: &Status) -> Vec<String> {
    let auth = &s.authentication;
    let key = match (&auth.authfile, &auth.problem) {
        (None, _) => Some(
            "booth's messages are not authenticated (booth.conf sets no authfile): anyone who can send UDP to a \
             site or the arbitrator can grant or revoke tickets, and so start or stop virtual clusters; make a key \
             with booth-keygen, copy it to every site and the arbitrator, set authfile"
                .to_string(),
        ),
        (Some(path), Some(problem)) => Some(format!("booth's key file {} {problem}", vmha_model::printable(path))),
        (Some(_), None) => None,
    };
    key.into_iter()
        .chain(
            s.tickets
                .iter()
                .filter(|t| t.acquire_after_seconds == 0 && t.vclusters.iter().any(|(_, loss)| loss == "stop"))
                .map(|t| {
                    format!(
                "ticket {} has acquire-after 0 and loss-policy stop: after a link cut the other site may start \
                 the VMs while this site still stops them; set acquire-after (booth.conf) longer than they take \
                 to stop, or use --loss-policy fence",
                t.name
            )
                }),
        )
        .collect()
}

struct SiteContext {
    cib: Cib,
    xml: String,
    conf: BoothConf,
    view: SiteView,
}

async fn read_all() -> Result<SiteContext> {
    let conf = read_booth_conf(Path::new(BOOTH_CONF))?;
    let cib = connect().await?;
    let xml = query(&cib).await?;
    let view = SiteView::from_cib(&xml).context("reading the CIB")?;
    Ok(SiteContext { cib, xml, conf, view })
}

/// `vmha site status`.
pub async fn status(json_out: bool) -> Result<ExitCode> {
    let c = read_all().await?;
    // Booth's view of who holds what; without an answer the CIB's view is still shown.
    let list = match local_site(&c.view) {
        Ok(here) => booth(&["list", "-s", &here]).await,
        Err(e) => Err(e),
    };
    let list = match list {
        Ok(text) => parse_booth_list(&text),
        Err(e) => {
            eprintln!("vmha: {e:#} (showing this site's CIB only)");
            Vec::new()
        }
    };
    let cluster = ClusterView::from_cib(&c.xml).context("reading the CIB")?;
    let tags = capture::list(&c.xml)?;
    let mut s = status_of(&c.conf, &c.view, &list, &cluster, &tags, check_authentication(&c.conf));
    s.replicas = replica_ages(&c.view, &cluster, &tags);
    s.replication = replication_status(&c.xml, &cluster, &tags);
    if json_out {
        println!("{}", serde_json::to_string_pretty(&document("site_status", &s))?);
    } else {
        print!("{}", status_text(&s));
    }
    Ok(ExitCode::SUCCESS)
}

/// Checks a protect's input against booth.conf and this site's CIB, then that booth's messages are
/// authenticated here (unless `allow_unauthenticated`); returns the peer's address.
fn check_protect(
    c: &SiteContext,
    vc: &str,
    ticket: &str,
    peer: &str,
    at_peer: bool,
    allow_unauthenticated: bool,
) -> Result<Ipv4Addr> {
    let peer = check_protect_parts(&c.xml, &c.conf, &c.view, vc, ticket, peer, at_peer)?;
    require_authentication(&check_authentication(&c.conf), ticket, allow_unauthenticated)?;
    Ok(peer)
}

fn check_protect_parts(
    xml: &str,
    conf: &BoothConf,
    view: &SiteView,
    vc: &str,
    ticket: &str,
    peer: &str,
    at_peer: bool,
) -> Result<Ipv4Addr> {
    validate_name("virtual cluster name", vc)?;
    validate_ticket(ticket)?;
    let peer = validate_site(peer, conf)?;
    if conf.ticket(ticket).is_none() {
        bail!("booth.conf defines no ticket {ticket}");
    }
    if view.local_site == Some(peer) {
        bail!("{peer} is this site; --peer names the other one");
    }
    if let Some(b) = view.binding_of(vc) {
        bail!("{vc} is already held by ticket {} (constraint {})", b.ticket, b.id);
    }
    let granted = view.granted_here(ticket);
    if at_peer && granted {
        bail!("ticket {ticket} is granted at this site: instantiating {vc} here would start it at both sites");
    }
    if !at_peer {
        if !granted {
            bail!(
                "ticket {ticket} is not granted at this site: the rsc_ticket would stop {vc} here (grant it first: booth grant {ticket})"
            );
        }
        if !capture::list(xml)?.contains_key(vc) {
            bail!("no virtual cluster named {vc}");
        }
    }
    Ok(peer)
}

/// A protect puts a virtual cluster under a booth ticket: whoever can grant or revoke the ticket decides
/// where it runs. Without authenticated booth messages that is anyone who can send to booth's port, so a
/// protect refuses (changing nothing) unless the operator says `--allow-unauthenticated-booth`.
pub fn require_authentication(auth: &Authentication, ticket: &str, allow: bool) -> Result<()> {
    let why = match (&auth.authfile, &auth.problem) {
        (None, _) => "booth.conf sets no authfile".to_string(),
        (Some(path), Some(problem)) => format!("booth's key file {path} {problem}"),
        (Some(_), None) => return Ok(()),
    };
    if allow {
        eprintln!(
            "vmha: warning: {why}: booth's messages are not authenticated, anyone who can reach booth's port can grant or revoke ticket {ticket}"
        );
        return Ok(());
    }
    bail!(
        "{why}: booth's messages are not authenticated, so anyone who can reach booth's port could grant or revoke ticket {ticket} and start the virtual cluster at the wrong site; nothing changed. Make a key (booth-keygen), install it 0600 at every site and arbitrator, set authfile in booth.conf, or pass --allow-unauthenticated-booth"
    )
}

/// `vmha site protect` at either site, the CIB part: checks, then the rsc_ticket. At the peer the tag does
/// not exist yet: the constraint is made first so that the instantiated resources are held from the start.
pub async fn protect_here(
    vc: &str,
    ticket: &str,
    peer: &str,
    loss: LossPolicy,
    at_peer: bool,
    allow_unauthenticated: bool,
) -> Result<()> {
    let c = read_all().await?;
    check_protect(&c, vc, ticket, peer, at_peer, allow_unauthenticated)?;
    let fragment = rsc_ticket_xml(vc, ticket, loss);
    c.cib
        .create(
            &Scope::section("constraints"),
            &fragment,
            CallOptions::NONE,
            CIB_DEADLINE,
        )
        .await
        .with_context(|| format!("creating the rsc_ticket for {vc}"))?;
    println!("{vc} is held by ticket {ticket} here (loss-policy {})", loss.as_str());
    Ok(())
}

/// The peer's part of `vmha site protect` before the instantiate: checks, then Pacemaker's maintenance
/// mode on (nothing is started or stopped at this site while the resources exist without their
/// rsc_ticket: Pacemaker refuses a constraint naming a resource that does not exist yet).
pub async fn protect_peer_begin(vc: &str, ticket: &str, peer: &str, allow_unauthenticated: bool) -> Result<()> {
    let c = read_all().await?;
    check_protect(&c, vc, ticket, peer, true, allow_unauthenticated)?;
    set_maintenance(&c.cib, true).await
}

/// The peer's part of `vmha site protect` after a successful instantiate: the rsc_ticket (the new
/// resources are held stopped, the ticket being elsewhere), then maintenance mode off again.
pub async fn protect_peer_end(vc: &str, ticket: &str, loss: LossPolicy) -> Result<()> {
    let cib = connect().await?;
    let created = cib
        .create(
            &Scope::section("constraints"),
            &rsc_ticket_xml(vc, ticket, loss),
            CallOptions::NONE,
            CIB_DEADLINE,
        )
        .await
        .with_context(|| format!("creating the rsc_ticket for {vc} (maintenance mode stays on: nothing starts)"));
    created?;
    set_maintenance(&cib, false).await?;
    println!("{vc} is held by ticket {ticket} here (loss-policy {})", loss.as_str());
    Ok(())
}

/// Pacemaker's maintenance mode (cluster property `maintenance-mode`) on or off.
pub async fn set_maintenance(cib: &Cib, on: bool) -> Result<()> {
    let fragment = format!(
        r#"<crm_config><cluster_property_set id="cib-bootstrap-options"><nvpair id="cib-bootstrap-options-maintenance-mode" name="maintenance-mode" value="{on}"/></cluster_property_set></crm_config>"#
    );
    cib.modify(
        &Scope::section("crm_config"),
        &fragment,
        CallOptions::CAN_CREATE,
        CIB_DEADLINE,
    )
    .await
    .with_context(|| format!("setting maintenance-mode={on}"))
}

/// Maintenance mode off (a protect at the peer whose instantiate failed: it removed what it made).
pub async fn maintenance_off() -> Result<()> {
    let cib = connect().await?;
    set_maintenance(&cib, false).await
}

/// Removes the rsc_ticket of `vc` again (a protect at the peer whose instantiate failed).
pub async fn unprotect_here(vc: &str) -> Result<()> {
    validate_name("virtual cluster name", vc)?;
    let cib = connect().await?;
    cib.delete(
        &Scope::section("constraints"),
        &format!(r#"<rsc_ticket id="{}"/>"#, escape(&binding_id(vc))),
        CallOptions::NONE,
        CIB_DEADLINE,
    )
    .await
    .with_context(|| format!("removing the rsc_ticket of {vc}"))
}

/// Whether a VM may run on some host of this site: active somewhere, or an operation is under way
/// (Pacemaker records a pending stop, start or migration before it ends: a VM being stopped runs until its
/// stop completed), or its last operation failed (its state there is unknown until Pacemaker recovers it).
/// Only a VM whose every host's history ends in a completed stop (or a probe that found it not running)
/// is settled stopped.
pub fn not_settled_stopped(v: &vmha_model::VmView) -> bool {
    !v.hosts.is_empty() || v.state != vmha_model::VmState::Stopped
}

/// Members of `vc` that run, or may run, on some host of this site ([`not_settled_stopped`]).
fn running_members(xml: &str, members: &[String]) -> Result<Vec<String>> {
    let cluster = ClusterView::from_cib(xml).context("reading the CIB")?;
    Ok(members
        .iter()
        .filter(|m| cluster.vm(m).is_some_and(not_settled_stopped))
        .cloned()
        .collect())
}

/// Disk images of the VM members of `vc` (from their domain XML files) and where the peer's copies are.
pub fn disk_copies(xml: &str, members: &[String], maps: &Maps) -> Result<Vec<(String, String)>> {
    let cluster = ClusterView::from_cib(xml).context("reading the CIB")?;
    let mut out = Vec::new();
    for m in members {
        let Some(vm) = cluster.vm(m) else { continue };
        let Some(config) = &vm.config else { continue };
        let domain = std::fs::read_to_string(config).with_context(|| format!("{m}: reading {config}"))?;
        for disk in domain_disks(&domain)? {
            let to = maps
                .path(&disk)
                .ok_or_else(|| anyhow!("{m}: no --map storage=... covers its disk {disk}"))?;
            if to == disk {
                bail!("{m}: the peer's copy of {disk} is the same file");
            }
            out.push((disk, to));
        }
    }
    Ok(out)
}

/// `vmha site switchover VC --to PEER`.
pub async fn switchover(vc: &str, to: &str, maps: &[String], wait: Duration) -> Result<ExitCode> {
    validate_name("virtual cluster name", vc)?;
    let maps = Maps::parse(maps, None)?;
    let c = read_all().await?;
    let peer = validate_site(to, &c.conf)?;
    if c.view.local_site == Some(peer) {
        bail!("{peer} is this site: run the switchover at the site that holds the ticket");
    }
    let binding = c
        .view
        .binding_of(vc)
        .ok_or_else(|| anyhow!("{vc} is not protected by a ticket here (vmha site protect)"))?
        .clone();
    validate_ticket(&binding.ticket)?;
    if !c.view.granted_here(&binding.ticket) {
        bail!(
            "ticket {} is not granted at this site: nothing to switch over from here",
            binding.ticket
        );
    }
    let tags = capture::list(&c.xml)?;
    let members = tags
        .get(vc)
        .cloned()
        .ok_or_else(|| anyhow!("no virtual cluster named {vc}"))?;
    // Every check before the first change: the disks must be mapped.
    let copies = disk_copies(&c.xml, &members, &maps)?;
    let t0 = Instant::now();
    // 1. Stop here (target-role Stopped, kept until the ticket is gone).
    for m in &members {
        let xml = set_resource_meta(&c.xml, m, "target-role", "Stopped")?;
        c.cib
            .modify(&Scope::section("resources"), &xml, CallOptions::NONE, CIB_DEADLINE)
            .await
            .with_context(|| format!("stopping {m}"))?;
    }
    println!("stopping {vc} here ({})", members.join(", "));
    let deadline = Instant::now() + wait;
    loop {
        let xml = query(&c.cib).await?;
        let running = running_members(&xml, &members)?;
        if running.is_empty() {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "{} still running or stopping after {} s; nothing else was changed (the ticket stays here, target-role Stopped is set)",
                running.join(", "),
                wait.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    println!("{vc} stopped here after {:.1} s", t0.elapsed().as_secs_f64());
    // 2. Final disk sync: a full copy of each image while nothing runs it (first step; incremental
    //    replication while running is not there yet).
    for (from, to) in &copies {
        let (from2, to2) = (from.clone(), to.clone());
        let bytes = tokio::task::spawn_blocking(move || copy_image(Path::new(&from2), Path::new(&to2)))
            .await
            .context("the disk copy")??;
        println!("copied {from} to {to} ({bytes} bytes)");
    }
    // 3. The ticket: revoked here (the members stay stopped: no ticket), then granted to the peer.
    let ticket = binding.ticket.as_str();
    let here = local_site(&c.view)?;
    booth(&["revoke", "-w", "-s", &here, ticket]).await?;
    for m in &members {
        let xml = query(&c.cib).await?;
        let fragment = set_resource_meta(&xml, m, "target-role", "Started")?;
        c.cib
            .modify(&Scope::section("resources"), &fragment, CallOptions::NONE, CIB_DEADLINE)
            .await
            .with_context(|| format!("restoring the target-role of {m}"))?;
    }
    let peer_s = peer.to_string();
    if let Err(e) = booth(&["grant", "-w", "-s", &peer_s, ticket]).await {
        // Booth may have moved the ticket itself meanwhile: what counts is that the peer holds it.
        let list = parse_booth_list(&booth(&["list", "-s", &peer_s]).await.unwrap_or_default());
        if !list.iter().any(|t| t.name == ticket && t.leader == Some(peer)) {
            return Err(e.context(format!(
                "granting ticket {ticket} to {peer} ({vc} is stopped here and the ticket revoked: grant it by hand)"
            )));
        }
    }
    println!(
        "ticket {ticket} granted to {peer} after {:.1} s: the peer site starts {vc}",
        t0.elapsed().as_secs_f64()
    );
    Ok(ExitCode::SUCCESS)
}

/// Copies a disk image (the whole file, synced) under a temporary name renamed at the end.
fn copy_image(from: &Path, to: &Path) -> Result<u64> {
    let tmp = PathBuf::from(format!("{}.vmha-sync", to.display()));
    let bytes =
        std::fs::copy(from, &tmp).with_context(|| format!("copying {} to {}", from.display(), tmp.display()))?;
    std::fs::File::open(&tmp)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("syncing {}", tmp.display()))?;
    std::fs::rename(&tmp, to).with_context(|| format!("renaming {} to {}", tmp.display(), to.display()))?;
    Ok(bytes)
}

/// `vmha site failover VC --lost SITE --confirm-lost`, at the surviving site.
pub async fn failover(vc: &str, lost: &str, confirm_lost: bool) -> Result<ExitCode> {
    validate_name("virtual cluster name", vc)?;
    let c = read_all().await?;
    let lost = validate_site(lost, &c.conf)?;
    if c.view.local_site == Some(lost) {
        bail!("{lost} is this site: run the failover at the surviving site");
    }
    let binding = c
        .view
        .binding_of(vc)
        .ok_or_else(|| anyhow!("{vc} is not protected by a ticket here (vmha site protect)"))?
        .clone();
    validate_ticket(&binding.ticket)?;
    if c.view.granted_here(&binding.ticket) {
        println!("ticket {} is already granted here", binding.ticket);
        return Ok(ExitCode::SUCCESS);
    }
    if !confirm_lost {
        bail!(
            "refusing: grant ticket {} here only when {lost} runs nothing (powered off or fenced); say so with --confirm-lost",
            binding.ticket
        );
    }
    let here = local_site(&c.view)?;
    booth(&["grant", "-F", "-s", &here, &binding.ticket]).await?;
    println!(
        "ticket {} granted here (override): this site starts {vc}",
        binding.ticket
    );
    Ok(ExitCode::SUCCESS)
}

/// Runs the `vmha site` commands that need no vmhad.
pub async fn run(cmd: SiteCmd, json_out: bool) -> Result<ExitCode> {
    match cmd {
        SiteCmd::Status => status(json_out).await,
        SiteCmd::Protect {
            vcluster,
            ticket,
            peer,
            loss_policy,
            allow_unauthenticated_booth,
            ..
        } => {
            protect_here(
                &vcluster,
                &ticket,
                &peer,
                loss_policy,
                false,
                allow_unauthenticated_booth,
            )
            .await?;
            Ok(ExitCode::SUCCESS)
        }
        SiteCmd::Switchover {
            vcluster,
            to,
            maps,
            wait,
        } => switchover(&vcluster, &to, &maps, Duration::from_secs(wait)).await,
        SiteCmd::Replicate {
            vcluster,
            maps,
            every,
            wait,
            no_freeze,
        } => {
            replicate::replicate(
                &vcluster,
                &maps,
                every.map(Duration::from_secs),
                Duration::from_secs(wait),
                !no_freeze,
                json_out,
            )
            .await
        }
        SiteCmd::Replication {
            vcluster,
            every,
            maps,
            stale_after,
            off,
        } => replicate::configure(&vcluster, every, stale_after, &maps, off).await,
        SiteCmd::Failover {
            vcluster,
            lost,
            confirm_lost,
        } => failover(&vcluster, &lost, confirm_lost).await,
        SiteCmd::WhatIf { lost, tickets } => what_if(&lost, &tickets, json_out).await,
    }
}

/// How long `vmha site what-if` lets Pacemaker's scheduler run.
const WHAT_IF_DEADLINE: Duration = Duration::from_secs(120);

/// What `vmha site what-if` answers.
#[derive(Debug, Clone, Serialize)]
pub struct SiteWhatIf {
    pub lost_site: Ipv4Addr,
    /// The tickets assumed granted here.
    pub tickets: Vec<String>,
    /// Virtual clusters those tickets hold here, with their members.
    pub vclusters: BTreeMap<String, Vec<String>>,
    /// Every protected member gets a place here.
    pub takeover_complete: bool,
    /// What the scheduler would do, VM by VM (those that change or stay without a place).
    pub vms: Vec<vmha_model::whatif::VmPrediction>,
}

/// The tickets a lost site holds, as booth here says.
async fn tickets_held_by(view: &SiteView, lost: Ipv4Addr) -> Result<Vec<String>> {
    let here = local_site(view)?;
    let list = booth(&["list", "-s", &here])
        .await
        .context("asking booth which tickets the lost site holds (name them with --ticket)")?;
    Ok(parse_booth_list(&list)
        .into_iter()
        .filter(|t| t.leader == Some(lost))
        .map(|t| t.name)
        .collect())
}

/// Reads what the scheduler predicted for a takeover of `tickets` here.
pub fn site_what_if(
    lost: Ipv4Addr,
    tickets: Vec<String>,
    view: &SiteView,
    tags: &BTreeMap<String, Vec<String>>,
    is_vm: impl Fn(&str) -> bool,
    p: &vmha_model::whatif::Prediction,
) -> SiteWhatIf {
    use vmha_model::whatif::VmOutcome;
    let vclusters: BTreeMap<String, Vec<String>> = view
        .bindings
        .iter()
        .filter(|b| tickets.contains(&b.ticket))
        .map(|b| (b.rsc.clone(), tags.get(&b.rsc).cloned().unwrap_or_default()))
        .collect();
    // The VMs among the members: an address or another resource of the virtual cluster has no placement
    // in the prediction (Pacemaker's constraints start it with the VMs).
    let protected: Vec<&String> = vclusters.values().flatten().filter(|m| is_vm(m)).collect();
    let placement = p.placement();
    let takeover_complete = protected.iter().all(|m| placement.get(*m).is_some_and(|h| h.is_some()));
    let vms = p
        .vms
        .iter()
        .filter(|v| !matches!(v.outcome, VmOutcome::Stays { .. }) || protected.contains(&&v.vm))
        .cloned()
        .collect();
    SiteWhatIf {
        lost_site: lost,
        tickets,
        vclusters,
        takeover_complete,
        vms,
    }
}

/// Human form of [`SiteWhatIf`].
pub fn site_what_if_text(w: &SiteWhatIf) -> String {
    use vmha_model::whatif::VmOutcome;
    let mut out = format!(
        "if site {} is lost and this site takes ticket(s) {}:\n",
        w.lost_site,
        w.tickets.join(", ")
    );
    out.push_str(&format!(
        "{:<16} {:<16} {:>8}  OUTCOME\n",
        "VM", "VIRTUAL CLUSTER", "PRIORITY"
    ));
    for v in &w.vms {
        let vc = w
            .vclusters
            .iter()
            .find(|(_, members)| members.contains(&v.vm))
            .map_or("-", |(vc, _)| vc.as_str());
        let what = match &v.outcome {
            VmOutcome::Stays { host } => format!("runs on {host}"),
            VmOutcome::Moves { from, to } => format!("moves {from} -> {to}"),
            VmOutcome::Stops { from } => format!("STOPS (was on {from}): gives way"),
            VmOutcome::Starts { to } => format!("starts on {to}"),
            VmOutcome::StaysStopped => "STAYS STOPPED: no host has room".to_string(),
        };
        out.push_str(&format!("{:<16} {:<16} {:>8}  {what}\n", v.vm, vc, v.priority));
    }
    out.push_str(if w.takeover_complete {
        "takeover: every protected VM gets a place here\n"
    } else {
        "takeover: INCOMPLETE: some protected VMs would get no place here\n"
    });
    out
}

/// `vmha site what-if` (and `vmha what-if --fail-site`).
pub async fn what_if(lost: &str, tickets: &[String], json_out: bool) -> Result<ExitCode> {
    let c = read_all().await?;
    let lost = validate_site(lost, &c.conf)?;
    if c.view.local_site == Some(lost) {
        bail!("{lost} is this site; --lost names the other one");
    }
    let tickets = if tickets.is_empty() {
        tickets_held_by(&c.view, lost).await?
    } else {
        for t in tickets {
            validate_ticket(t)?;
            if c.conf.ticket(t).is_none() {
                bail!("booth.conf defines no ticket {t}");
            }
        }
        tickets.to_vec()
    };
    if tickets.is_empty() {
        bail!(
            "booth says site {lost} holds no ticket: a takeover here would start nothing (name tickets with --ticket)"
        );
    }
    let copy = vmha_model::whatif::grant_tickets(&c.xml, &tickets)?;
    let p = crate::placement::predict_cib(&c.xml, &copy, WHAT_IF_DEADLINE).await?;
    let tags = capture::list(&c.xml)?;
    let cluster = ClusterView::from_cib(&c.xml).context("reading the CIB")?;
    let w = site_what_if(lost, tickets, &c.view, &tags, |m| cluster.vm(m).is_some(), &p);
    if json_out {
        println!("{}", serde_json::to_string_pretty(&document("site_what_if", &w))?);
    } else {
        print!("{}", site_what_if_text(&w));
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests;

pub mod replicate;
