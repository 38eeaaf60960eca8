//! A deterministic simulated cluster for the operations: an in-memory CIB that applies changes the way
//! Pacemaker's CIB API does and whose status follows the domains (Pacemaker's part: a VM resource runs
//! where its domain runs, an orphaned resource's domain is stopped, a resource without a domain is started
//! on an online host), in-memory hypervisors (domains with disk chains, live snapshots, restores, block
//! pulls), shared storage (files with their qcow2 backing), guests that answer as told, several vmhads
//! (one [`Ports`] per host), and a fault injector that fails any call, or kills the calling vmhad or its
//! whole host at that call.
//!
//! Time is tokio's: run the simulator on a runtime with a paused clock (`#[tokio::test(start_paused =
//! true)]`) and waits take no real time. Every call is numbered; [`World::log`] keeps what changed.

pub mod scenario;
pub mod xml;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::watch;
use vmha_model::clone::{self as model, SaveImage};
use vmha_model::ClusterView;

use crate::ports::{
    BoxFuture, CibChange, CibError, Cluster, DiskChains, Environment, GuestAnswer, Guests, HvError, Hypervisor, Ports,
    Storage, StorageError,
};
use crate::state::{Membership, Snapshot};
use xml::Element;

/// Where the simulated VMs keep their files.
pub const STORAGE: &str = "/srv/vmha";

/// What an injected fault does at its call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultAction {
    /// The call fails.
    Fail,
    /// The calling vmhad dies at the call (the call never returns); the host runs on.
    KillVmhad,
    /// The calling vmhad's host dies at the call: fenced, its domains gone, the DC moves if it was there.
    KillHost,
}

/// When a fault strikes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trigger {
    /// At the n-th call of the whole run (1-based, every port call counts).
    Call(u64),
    /// At the n-th call of this name (1-based), e.g. `hv.restore`.
    Named(String, u32),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fault {
    pub trigger: Trigger,
    pub action: FaultAction,
}

#[derive(Debug, Clone)]
struct SimHost {
    id: String,
    online: bool,
    vmhad: bool,
}

/// A running domain.
#[derive(Debug, Clone)]
pub struct Domain {
    pub name: String,
    pub host: String,
    /// Its XML (disk sources are the active layers).
    pub xml: String,
    /// (target dev, [active layer, backing, ...]).
    pub disks: Vec<(String, Vec<String>)>,
}

#[derive(Debug, Clone)]
struct SimFile {
    data: Vec<u8>,
    backing: Option<String>,
}

/// How a guest behaves.
#[derive(Debug, Clone, Default)]
pub struct GuestSim {
    /// Request kind -> (outcome, reason) when it does not answer `done`.
    pub answers: BTreeMap<String, (String, String)>,
    /// The guest prepared for a clone and was not resumed.
    pub prepared: bool,
    /// The name the guest took in its post-clone request.
    pub identity: Option<String>,
}

struct Inner {
    /// `<cib>` with its configuration; the status is made from the domains.
    cib: Element,
    hosts: BTreeMap<String, SimHost>,
    dc: Option<String>,
    domains: Vec<Domain>,
    files: BTreeMap<String, SimFile>,
    guests: BTreeMap<String, GuestSim>,
    /// Resources Pacemaker manages or managed (to stop the domains of deleted ones).
    managed: BTreeSet<String>,
    faults: Vec<Fault>,
    calls: u64,
    named: BTreeMap<String, u32>,
    log: Vec<String>,
    rng: u64,
    epoch: u64,
    stamps: u64,
    /// Files at the start (the invariants allow them).
    initial_files: BTreeSet<String>,
    /// The file (inode number) behind each name an instantiate made (hard links share one).
    inodes: BTreeMap<String, u64>,
    next_inode: u64,
}

/// The simulated cluster.
pub struct World {
    inner: Mutex<Inner>,
    tx: watch::Sender<Arc<Snapshot>>,
    /// Bumped when a vmhad or host dies (runners stop the dead vmhad's job).
    deaths: watch::Sender<u64>,
}

impl std::fmt::Debug for World {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("World").finish_non_exhaustive()
    }
}

/// What a port call may do, decided by the fault injector.
enum Entry {
    Go,
    Fail(String),
    /// The caller is dead: never return.
    Stop,
}

fn lock(m: &Mutex<Inner>) -> MutexGuard<'_, Inner> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl World {
    /// A cluster of `hosts` (online, each running vmhad; the first is the DC).
    pub fn new(hosts: &[&str]) -> Arc<Self> {
        let mut cib = Element::parse(
            r#"<cib admin_epoch="0" epoch="1" num_updates="0"><configuration><crm_config/><nodes/><resources/><constraints/><tags/></configuration></cib>"#,
        )
        .expect("static CIB");
        let mut map = BTreeMap::new();
        for (i, h) in hosts.iter().enumerate() {
            let id = (i + 1).to_string();
            let mut node = Element::new("node");
            node.set_attr("id", &id);
            node.set_attr("uname", h);
            node.set_attr("type", "member");
            let mut util = Element::new("utilization");
            util.set_attr("id", &format!("{h}-utilization"));
            let mut nv = Element::new("nvpair");
            nv.set_attr("id", &format!("{h}-utilization-hv_memory"));
            nv.set_attr("name", "hv_memory");
            nv.set_attr("value", "8192");
            util.children.push(nv);
            node.children.push(util);
            cib.find_mut("nodes").expect("nodes").children.push(node);
            map.insert(
                h.to_string(),
                SimHost {
                    id,
                    online: true,
                    vmhad: true,
                },
            );
        }
        let inner = Inner {
            cib,
            hosts: map,
            dc: hosts.first().map(|h| h.to_string()),
            domains: Vec::new(),
            files: BTreeMap::new(),
            guests: BTreeMap::new(),
            managed: BTreeSet::new(),
            faults: Vec::new(),
            calls: 0,
            named: BTreeMap::new(),
            log: Vec::new(),
            rng: 0x9e37_79b9_7f4a_7c15,
            epoch: 1,
            stamps: 0,
            initial_files: BTreeSet::new(),
            inodes: BTreeMap::new(),
            next_inode: 1,
        };
        let (tx, _) = watch::channel(Arc::new(Snapshot::default()));
        let (deaths, _) = watch::channel(0);
        let world = Arc::new(World {
            inner: Mutex::new(inner),
            tx,
            deaths,
        });
        world.publish(&mut lock(&world.inner));
        world
    }

    /// Adds a VM resource `name` (ocf:vmha:VirtualMachine, `memory` MiB) with its domain XML file and
    /// one qcow2 disk on the storage, running on `host`, in the given tags.
    pub fn add_vm(&self, name: &str, host: &str, memory: u64, tags: &[&str]) {
        let config = format!("{STORAGE}/{name}.xml");
        let disk = format!("{STORAGE}/{name}.qcow2");
        let xml = domain_xml(name, &disk);
        let mut g = lock(&self.inner);
        g.files.insert(
            config.clone(),
            SimFile {
                data: xml.clone().into_bytes(),
                backing: None,
            },
        );
        g.files.insert(
            disk.clone(),
            SimFile {
                data: b"QFI\xfb".to_vec(),
                backing: None,
            },
        );
        let primitive = format!(
            r#"<primitive id="{name}" class="ocf" provider="vmha" type="VirtualMachine"><instance_attributes id="{name}-instance_attributes"><nvpair id="{name}-instance_attributes-config" name="config" value="{config}"/></instance_attributes><meta_attributes id="{name}-meta_attributes"><nvpair id="{name}-meta_attributes-allow-migrate" name="allow-migrate" value="true"/></meta_attributes><utilization id="{name}-utilization"><nvpair id="{name}-utilization-hv_memory" name="hv_memory" value="{memory}"/></utilization><operations><op id="{name}-monitor-10s" name="monitor" interval="10s"/></operations></primitive>"#
        );
        let p = Element::parse(&primitive).expect("primitive");
        g.cib.find_mut("resources").expect("resources").children.push(p);
        for tag in tags {
            let tags = g.cib.find_mut("tags").expect("tags");
            let mut r = Element::new("obj_ref");
            r.set_attr("id", name);
            match tags.children.iter_mut().find(|t| t.id() == Some(tag)) {
                Some(t) => t.children.push(r),
                None => {
                    let mut t = Element::new("tag");
                    t.set_attr("id", tag);
                    t.children.push(r);
                    tags.children.push(t);
                }
            }
        }
        g.managed.insert(name.to_string());
        g.domains.push(Domain {
            name: name.to_string(),
            host: host.to_string(),
            xml,
            disks: vec![("vda".into(), vec![disk])],
        });
        g.guests.entry(name.to_string()).or_default();
        let files: Vec<String> = g.files.keys().cloned().collect();
        g.initial_files.extend(files);
        self.publish(&mut g);
    }

    /// Puts a file at `path` on the storage (there before any operation: the invariants allow it).
    pub fn add_file(&self, path: &str) {
        let mut g = lock(&self.inner);
        g.files.insert(
            path.to_string(),
            SimFile {
                data: b"stray".to_vec(),
                backing: None,
            },
        );
        g.initial_files.insert(path.to_string());
    }

    /// A resource's `target-role`, if it has one.
    pub fn target_role(&self, rsc: &str) -> Option<String> {
        meta(&lock(&self.inner).cib, rsc, "target-role")
    }

    /// Makes `vm`'s guest answer `kind` with `outcome` (`refused`, `failed`) and `reason`.
    pub fn guest_answers(&self, vm: &str, kind: &str, outcome: &str, reason: &str) {
        lock(&self.inner)
            .guests
            .entry(vm.to_string())
            .or_default()
            .answers
            .insert(kind.to_string(), (outcome.to_string(), reason.to_string()));
    }

    pub fn inject(&self, fault: Fault) {
        lock(&self.inner).faults.push(fault);
    }

    pub fn clear_faults(&self) {
        lock(&self.inner).faults.clear();
    }

    /// How many port calls were made so far.
    pub fn calls(&self) -> u64 {
        lock(&self.inner).calls
    }

    /// How many calls named `call` (as the log names them: `cib.query`, ...) were made so far.
    pub fn calls_named(&self, call: &str) -> u32 {
        lock(&self.inner).named.get(call).copied().unwrap_or(0)
    }

    /// The log: every change, guest request, fault and death, in order.
    pub fn log(&self) -> Vec<String> {
        lock(&self.inner).log.clone()
    }

    /// Adds a line to the log (scenario commands and results).
    pub fn note(&self, line: impl Into<String>) {
        lock(&self.inner).log.push(line.into());
    }

    /// Every host's name.
    pub fn host_names(&self) -> Vec<String> {
        lock(&self.inner).hosts.keys().cloned().collect()
    }

    pub fn dc(&self) -> Option<String> {
        lock(&self.inner).dc.clone()
    }

    /// Whether vmhad runs on `host`.
    pub fn vmhad_alive(&self, host: &str) -> bool {
        lock(&self.inner).hosts.get(host).is_some_and(|h| h.online && h.vmhad)
    }

    /// Waits until vmhad on `host` is dead (returns at once when it is).
    pub async fn vmhad_dies(&self, host: &str) {
        let mut rx = self.deaths.subscribe();
        loop {
            if !self.vmhad_alive(host) {
                return;
            }
            if rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    /// Starts vmhad again on `host` (its host being up).
    pub fn restart_vmhad(&self, host: &str) {
        let mut g = lock(&self.inner);
        if let Some(h) = g.hosts.get_mut(host) {
            if h.online {
                h.vmhad = true;
            }
        }
        g.log.push(format!("vmhad starts on {host}"));
        self.publish(&mut g);
    }

    /// The running domains.
    pub fn domains(&self) -> Vec<Domain> {
        lock(&self.inner).domains.clone()
    }

    pub fn guest(&self, vm: &str) -> Option<GuestSim> {
        lock(&self.inner).guests.get(vm).cloned()
    }

    pub fn file_names(&self) -> Vec<String> {
        lock(&self.inner).files.keys().cloned().collect()
    }

    pub fn file(&self, path: &str) -> Option<String> {
        lock(&self.inner)
            .files
            .get(path)
            .map(|f| String::from_utf8_lossy(&f.data).into_owned())
    }

    /// The CIB as `cibadmin --query` would show it (configuration and the status made from the domains).
    pub fn cib(&self) -> String {
        full_cib(&lock(&self.inner))
    }

    /// The cluster view of the current CIB.
    pub fn view(&self) -> ClusterView {
        self.tx.borrow().view.clone().expect("the simulated CIB parses")
    }

    /// The context of the vmhad on `host`.
    pub fn vmhad(self: &Arc<Self>, host: &str) -> Ports {
        let at = || At {
            world: Arc::clone(self),
            host: host.to_string(),
        };
        Ports {
            cluster: Arc::new(at()),
            hypervisor: Arc::new(at()),
            storage: Arc::new(at()),
            guests: Arc::new(at()),
            env: Arc::new(at()),
        }
    }

    /// Counts a call by the vmhad on `host` and decides what it does.
    fn enter(&self, host: &str, call: &str, detail: &str) -> Entry {
        let mut g = lock(&self.inner);
        if !g.hosts.get(host).is_some_and(|h| h.online && h.vmhad) {
            return Entry::Stop;
        }
        g.calls += 1;
        let n = g.calls;
        let nth = {
            let c = g.named.entry(call.to_string()).or_insert(0);
            *c += 1;
            *c
        };
        let fault = g.faults.iter().position(|f| match &f.trigger {
            Trigger::Call(k) => *k == n,
            Trigger::Named(name, k) => name == call && *k == nth,
        });
        let Some(i) = fault else { return Entry::Go };
        let action = g.faults.remove(i).action;
        match action {
            FaultAction::Fail => {
                g.log.push(format!("FAULT {call} {detail} fails (call {n})"));
                Entry::Fail(format!("injected failure of {call}"))
            }
            FaultAction::KillVmhad => {
                g.log
                    .push(format!("FAULT vmhad on {host} killed at {call} {detail} (call {n})"));
                if let Some(h) = g.hosts.get_mut(host) {
                    h.vmhad = false;
                }
                self.publish(&mut g);
                drop(g);
                self.deaths.send_modify(|d| *d += 1);
                Entry::Stop
            }
            FaultAction::KillHost => {
                g.log
                    .push(format!("FAULT host {host} killed at {call} {detail} (call {n})"));
                if let Some(h) = g.hosts.get_mut(host) {
                    h.online = false;
                    h.vmhad = false;
                }
                let gone: Vec<String> = g
                    .domains
                    .iter()
                    .filter(|d| d.host == host)
                    .map(|d| d.name.clone())
                    .collect();
                g.domains.retain(|d| d.host != host);
                g.log.push(format!(
                    "host {host} fenced; its domains are gone: [{}]",
                    gone.join(", ")
                ));
                if g.dc.as_deref() == Some(host) {
                    g.dc = g.hosts.iter().find(|(_, h)| h.online).map(|(n, _)| n.clone());
                    let dc = g.dc.clone().unwrap_or_default();
                    g.log.push(format!("{dc} is the DC"));
                }
                self.publish(&mut g);
                drop(g);
                self.deaths.send_modify(|d| *d += 1);
                Entry::Stop
            }
        }
    }

    /// Pacemaker's part after a change: stops the domains of deleted resources, starts resources that
    /// run nowhere on the first online host; then publishes the new state.
    fn publish(&self, g: &mut Inner) {
        let resources: BTreeSet<String> = primitives(&g.cib);
        let orphans: Vec<Domain> = g
            .domains
            .iter()
            .filter(|d| g.managed.contains(&d.name) && !resources.contains(&d.name))
            .cloned()
            .collect();
        for d in orphans {
            g.domains.retain(|x| x.name != d.name);
            g.log.push(format!("pacemaker stops orphan {} on {}", d.name, d.host));
        }
        g.managed.retain(|m| resources.contains(m));
        let usable: Vec<String> = g
            .hosts
            .iter()
            .filter(|(n, h)| h.online && !is_true(node_attr(&g.cib, n, "standby").as_deref()))
            .map(|(n, _)| n.clone())
            .collect();
        for r in &resources {
            g.managed.insert(r.clone());
            let stopped = meta(&g.cib, r, "target-role").is_some_and(|v| v.eq_ignore_ascii_case("stopped"));
            let running = g.domains.iter().position(|d| &d.name == r);
            if stopped {
                if let Some(i) = running {
                    let d = g.domains.remove(i);
                    g.log.push(format!("pacemaker stops {r} on {}", d.host));
                }
                continue;
            }
            let preferred = preferred_host(&g.cib, r).filter(|h| usable.contains(h));
            if let Some(i) = running {
                let here = g.domains[i].host.clone();
                let to = match &preferred {
                    Some(h) if *h != here => Some(h.clone()),
                    None if !usable.contains(&here) => usable.first().cloned(),
                    _ => None,
                };
                if let Some(to) = to {
                    g.domains[i].host = to.clone();
                    g.log.push(format!("pacemaker migrates {r} from {here} to {to}"));
                }
                continue;
            }
            let Some(host) = preferred.or_else(|| usable.first().cloned()) else {
                continue;
            };
            let config = config_of(&g.cib, r);
            let xml = config
                .as_ref()
                .and_then(|c| g.files.get(c))
                .map(|f| String::from_utf8_lossy(&f.data).into_owned());
            match xml {
                Some(xml) => {
                    let disks = chains(&g.files, &xml);
                    g.domains.push(Domain {
                        name: r.clone(),
                        host: host.clone(),
                        xml,
                        disks,
                    });
                    g.guests.entry(r.clone()).or_default().prepared = false;
                    g.log.push(format!("pacemaker starts {r} on {host}"));
                }
                None => g.log.push(format!("pacemaker cannot start {r}: no domain XML")),
            }
        }
        g.epoch += 1;
        let epoch = g.epoch.to_string();
        g.cib.set_attr("epoch", &epoch);
        if let Some(id) = g.dc.as_ref().and_then(|d| g.hosts.get(d)).map(|h| h.id.clone()) {
            g.cib.set_attr("dc-uuid", &id);
        }
        let view = ClusterView::from_cib(&full_cib(g)).ok();
        let online: Vec<String> = g
            .hosts
            .iter()
            .filter(|(_, h)| h.online)
            .map(|(n, _)| n.clone())
            .collect();
        let membership = Membership {
            quorate: online.len() * 2 > g.hosts.len(),
            agents: g
                .hosts
                .iter()
                .filter(|(_, h)| h.online && h.vmhad)
                .map(|(n, _)| n.clone())
                .collect(),
            members: online,
        };
        self.tx.send_replace(Arc::new(Snapshot {
            view,
            membership: Some(membership),
            cib_connected: true,
        }));
    }

    fn next_random(&self) -> u64 {
        let mut g = lock(&self.inner);
        let mut x = g.rng;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        g.rng = x;
        x
    }

    /// What is wrong with the cluster now, after an operation ended (however it ended): an empty list when
    /// every invariant holds. `template` must run, resumed, its definition naming its active layers.
    pub fn violations(&self, template: &str) -> Vec<String> {
        let g = lock(&self.inner);
        let mut v = Vec::new();
        let resources = primitives(&g.cib);
        // One instance per VM.
        let mut seen = BTreeMap::<&str, Vec<&str>>::new();
        for d in &g.domains {
            seen.entry(&d.name).or_default().push(&d.host);
        }
        for (name, hosts) in &seen {
            if hosts.len() > 1 {
                v.push(format!("{name} runs {} times: on {}", hosts.len(), hosts.join(", ")));
            }
            if !resources.contains(*name) {
                v.push(format!(
                    "domain {name} runs on {} without a cluster resource",
                    hosts.join(", ")
                ));
            }
        }
        // Every resource runs (nothing half-created: a resource whose domain is missing).
        for r in &resources {
            if !seen.contains_key(r.as_str()) {
                v.push(format!("resource {r} runs nowhere"));
            }
        }
        // No journal left.
        let cib = full_cib(&g);
        for prefix in [
            crate::clone::JOURNAL_PREFIX,
            crate::group::JOURNAL_PREFIX,
            crate::vcluster::JOURNAL_PREFIX,
            crate::vcluster::CAPTURE_JOURNAL_PREFIX,
        ] {
            for j in crate::clone::attributes(&cib, prefix) {
                v.push(format!("journal {} left on {}", j.key, j.host));
            }
        }
        // Elastic groups: every member is a resource, and every clone of a group's template is a member.
        if let Ok(Some(policy)) = vmha_model::policy::Policy::from_cib(&cib) {
            for (name, spec) in &policy.groups {
                for m in &spec.members {
                    if !resources.contains(m) {
                        v.push(format!("group {name} lists {m}, which is no resource"));
                    }
                }
                let Some(template) = &spec.template else { continue };
                for r in &resources {
                    let clone_of = config_of(&g.cib, r)
                        .and_then(|c| g.files.get(&c))
                        .and_then(|f| model::clone_of(&String::from_utf8_lossy(&f.data)));
                    if clone_of.as_ref() == Some(template)
                        && r.starts_with(&format!("{name}-"))
                        && !spec.members.contains(r)
                    {
                        v.push(format!("{r}, a clone of group {name}'s template, is not a member"));
                    }
                }
            }
        }
        // The template runs, resumed, from the layers its definition names.
        match g.domains.iter().find(|d| d.name == template) {
            None => v.push(format!("template {template} does not run")),
            Some(d) => {
                if g.guests.get(template).is_some_and(|x| x.prepared) {
                    v.push(format!("template {template}'s guest is left prepared"));
                }
                let config = config_of(&g.cib, template).and_then(|c| g.files.get(&c).map(|f| (c, f)));
                match config {
                    None => v.push(format!("template {template}'s domain XML file is missing")),
                    Some((c, f)) => {
                        let xml = String::from_utf8_lossy(&f.data);
                        let defined: Vec<String> = model::writable_disks(&xml)
                            .unwrap_or_default()
                            .into_iter()
                            .map(|(_, p)| p)
                            .collect();
                        let active: Vec<String> = d.disks.iter().map(|(_, c)| c[0].clone()).collect();
                        if defined != active {
                            v.push(format!("{c} names {defined:?} but {template} runs on {active:?}"));
                        }
                    }
                }
            }
        }
        // Every layer a domain uses exists; every file is used, defined or was there before.
        let mut used = BTreeSet::new();
        for d in &g.domains {
            for (_, chain) in &d.disks {
                for layer in chain {
                    used.insert(layer.clone());
                    if !g.files.contains_key(layer) {
                        v.push(format!("{}'s disk layer {layer} is missing", d.name));
                    }
                }
            }
        }
        for r in &resources {
            if let Some(c) = config_of(&g.cib, r) {
                used.insert(c);
            }
        }
        for f in g.files.keys() {
            if f.ends_with(crate::vcluster::STAGED_SUFFIX) {
                v.push(format!("staged file {f} left behind"));
            } else if !used.contains(f) && !g.initial_files.contains(f) {
                v.push(format!("file {f} left behind"));
            }
        }
        // Tags list only resources.
        let mut refs = Vec::new();
        collect_refs(&g.cib, &mut refs);
        for r in refs {
            if !resources.contains(&r) {
                v.push(format!("a tag lists {r}, which is no resource"));
            }
        }
        v
    }
}

fn collect_refs(e: &Element, out: &mut Vec<String>) {
    for c in &e.children {
        if c.name == "obj_ref" {
            out.extend(c.id().map(str::to_string));
        }
        collect_refs(c, out);
    }
}

/// A domain XML with one qcow2 disk and one interface.
pub fn domain_xml(name: &str, disk: &str) -> String {
    format!(
        "<domain type='kvm'><name>{name}</name><uuid>00000000-0000-4000-8000-000000000001</uuid><memory unit='MiB'>512</memory>\
         <devices><disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='{disk}'/><target dev='vda' bus='virtio'/></disk>\
         <interface type='network'><mac address='52:54:00:00:00:01'/><source network='default'/></interface></devices></domain>"
    )
}

fn primitives(cib: &Element) -> BTreeSet<String> {
    fn walk(e: &Element, out: &mut BTreeSet<String>) {
        for c in &e.children {
            if c.name == "primitive" {
                out.extend(c.id().map(str::to_string));
            }
            walk(c, out);
        }
    }
    let mut out = BTreeSet::new();
    if let Some(r) = cib
        .children
        .iter()
        .find(|c| c.name == "configuration")
        .and_then(|c| c.children.iter().find(|s| s.name == "resources"))
    {
        walk(r, &mut out);
    }
    out
}

fn is_true(v: Option<&str>) -> bool {
    v.is_some_and(vmha_model::cib::is_true)
}

fn find_primitive<'a>(e: &'a Element, rsc: &str) -> Option<&'a Element> {
    if e.name == "primitive" && e.id() == Some(rsc) {
        return Some(e);
    }
    e.children.iter().find_map(|c| find_primitive(c, rsc))
}

/// A resource's meta attribute. A set under a rule (a time bound's date rule) never applies: the
/// simulator's clock is outside every window.
fn meta(cib: &Element, rsc: &str, name: &str) -> Option<String> {
    find_primitive(cib, rsc)?
        .children
        .iter()
        .filter(|c| c.name == "meta_attributes" && !c.children.iter().any(|r| r.name == "rule"))
        .flat_map(|m| m.children.iter())
        .find(|nv| nv.attr("name") == Some(name))
        .and_then(|nv| nv.attr("value"))
        .map(str::to_string)
}

/// A host's node attribute.
fn node_attr(cib: &Element, host: &str, name: &str) -> Option<String> {
    fn find<'a>(e: &'a Element, host: &str) -> Option<&'a Element> {
        if e.name == "node" && e.attr("uname") == Some(host) {
            return Some(e);
        }
        e.children.iter().find_map(|c| find(c, host))
    }
    find(cib, host)?
        .children
        .iter()
        .filter(|c| c.name == "instance_attributes")
        .flat_map(|m| m.children.iter())
        .find(|nv| nv.attr("name") == Some(name))
        .and_then(|nv| nv.attr("value"))
        .map(str::to_string)
}

/// The host an INFINITY location constraint sends a resource to.
fn preferred_host(cib: &Element, rsc: &str) -> Option<String> {
    fn walk(e: &Element, rsc: &str) -> Option<String> {
        for c in &e.children {
            if c.name == "rsc_location" && c.attr("rsc") == Some(rsc) && c.attr("score") == Some("INFINITY") {
                if let Some(n) = c.attr("node") {
                    return Some(n.to_string());
                }
            }
            if let Some(n) = walk(c, rsc) {
                return Some(n);
            }
        }
        None
    }
    walk(cib, rsc)
}

fn config_of(cib: &Element, rsc: &str) -> Option<String> {
    fn find<'a>(e: &'a Element, rsc: &str) -> Option<&'a Element> {
        if e.name == "primitive" && e.id() == Some(rsc) {
            return Some(e);
        }
        e.children.iter().find_map(|c| find(c, rsc))
    }
    let p = find(cib, rsc)?;
    p.children
        .iter()
        .filter(|c| c.name == "instance_attributes")
        .flat_map(|ia| ia.children.iter())
        .find(|nv| nv.attr("name") == Some("config"))
        .and_then(|nv| nv.attr("value"))
        .map(str::to_string)
}

/// The disk chains of a domain XML's writable disks, following the files' backing.
fn chains(files: &BTreeMap<String, SimFile>, xml: &str) -> Vec<(String, Vec<String>)> {
    model::writable_disks(xml)
        .unwrap_or_default()
        .into_iter()
        .map(|(dev, active)| {
            let mut chain = vec![active.clone()];
            let mut at = active;
            while let Some(b) = files.get(&at).and_then(|f| f.backing.clone()) {
                if chain.contains(&b) {
                    break;
                }
                chain.push(b.clone());
                at = b;
            }
            (dev, chain)
        })
        .collect()
}

/// The CIB with a status section made from the hosts and domains.
fn full_cib(g: &Inner) -> String {
    let mut cib = g.cib.clone();
    let mut status = Element::new("status");
    for (name, h) in &g.hosts {
        if !h.online {
            continue;
        }
        let mut ns = Element::new("node_state");
        for (k, v) in [
            ("id", h.id.as_str()),
            ("uname", name.as_str()),
            ("in_ccm", "true"),
            ("crmd", "online"),
            ("join", "member"),
            ("expected", "member"),
        ] {
            ns.set_attr(k, v);
        }
        let mut lrm = Element::new("lrm");
        lrm.set_attr("id", &h.id);
        let mut rscs = Element::new("lrm_resources");
        for d in g
            .domains
            .iter()
            .filter(|d| &d.host == name && g.managed.contains(&d.name))
        {
            let r = Element::parse(&format!(
                r#"<lrm_resource id="{0}" class="ocf" provider="vmha" type="VirtualMachine"><lrm_rsc_op id="{0}_last_0" operation="start" call-id="1" rc-code="0" op-status="0" interval="0"/></lrm_resource>"#,
                vmha_model::change::escape(&d.name)
            ))
            .expect("lrm_resource");
            rscs.children.push(r);
        }
        lrm.children.push(rscs);
        ns.children.push(lrm);
        status.children.push(ns);
    }
    cib.children.push(status);
    cib.to_xml()
}

/// Returns `Pending` once, so that concurrent jobs interleave at every call.
struct YieldOnce(bool);

impl std::future::Future for YieldOnce {
    type Output = ();

    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
        if self.0 {
            std::task::Poll::Ready(())
        } else {
            self.0 = true;
            cx.waker().wake_by_ref();
            std::task::Poll::Pending
        }
    }
}

/// One vmhad's view of the world (implements every port).
struct At {
    world: Arc<World>,
    host: String,
}

impl At {
    fn g(&self) -> MutexGuard<'_, Inner> {
        lock(&self.world.inner)
    }

    fn log(&self, line: String) {
        self.g().log.push(line);
    }

    fn hv_err(&self, host: &str, call: &'static str, message: impl Into<String>) -> HvError {
        HvError {
            host: host.to_string(),
            call,
            message: message.into(),
        }
    }
}

/// The error an injected failure of a hypervisor call on `host` gives.
fn hv_fail(host: &str, call: &'static str) -> impl FnOnce(String) -> HvError {
    let host = host.to_string();
    move |message| HvError { host, call, message }
}

/// The error an injected failure of a storage call on `path` gives.
fn st_fail(path: &str) -> impl FnOnce(String) -> StorageError {
    let path = path.to_string();
    move |message| StorageError { path, message }
}

fn st_err(path: &str, message: impl Into<String>) -> StorageError {
    StorageError {
        path: path.to_string(),
        message: message.into(),
    }
}

/// Runs `body` unless the fault injector says otherwise: `fail` makes its error, a dead caller never
/// returns.
macro_rules! guarded {
    ($self:ident, $call:expr, $detail:expr, $fail:expr, $body:expr) => {{
        let entry = $self.world.enter(&$self.host, $call, $detail.as_ref());
        Box::pin(async move {
            // Let other jobs run between any two calls, as a real daemon's would.
            YieldOnce(false).await;
            match entry {
                Entry::Go => $body,
                Entry::Fail(m) =>
                {
                    #[allow(clippy::redundant_closure_call)]
                    Err(($fail)(m))
                }
                Entry::Stop => std::future::pending().await,
            }
        })
    }};
}

impl Cluster for At {
    fn local_host(&self) -> &str {
        &self.host
    }

    fn snapshot(&self) -> Arc<Snapshot> {
        self.world.tx.borrow().clone()
    }

    fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.world.tx.subscribe()
    }

    fn job_deadline(&self) -> Duration {
        Duration::from_secs(180)
    }

    fn query(&self) -> BoxFuture<'_, Result<String, CibError>> {
        guarded!(
            self,
            "cib.query",
            "",
            |m| CibError {
                call: "query",
                message: m
            },
            { Ok(full_cib(&self.g())) }
        )
    }

    fn apply(&self, change: CibChange) -> BoxFuture<'_, Result<(), CibError>> {
        let detail = match &change {
            CibChange::Create { section, xml } => format!("create {section} {}", describe(xml)),
            CibChange::Modify { section, xml } => format!("modify {section} {}", describe(xml)),
            CibChange::Delete { section, xml } => format!("delete {section} {}", describe(xml)),
            CibChange::Replace { section, .. } => format!("replace {section}"),
        };
        let call = match &change {
            CibChange::Create { .. } => "cib.create",
            CibChange::Modify { .. } => "cib.modify",
            CibChange::Delete { .. } => "cib.delete",
            CibChange::Replace { .. } => "cib.replace",
        };
        let fail = move |m| CibError { call, message: m };
        guarded!(self, call, detail, fail, {
            let r = self.apply_now(&change);
            let mut g = self.g();
            match &r {
                Ok(()) => g.log.push(format!("{} cib {detail}", self.host)),
                Err(e) => g.log.push(format!("{} cib {detail} -> {e}", self.host)),
            }
            self.world.publish(&mut g);
            r
        })
    }
}

/// A short description of a CIB change's XML: its tag and id (and a node attribute's name).
fn describe(xml: &str) -> String {
    let Ok(e) = Element::parse(xml) else {
        return "(unparsable)".into();
    };
    let mut s = format!("{} {}", e.name, e.id().unwrap_or("-"));
    fn nv(e: &Element) -> Option<&Element> {
        if e.name == "nvpair" {
            return Some(e);
        }
        e.children.iter().find_map(nv)
    }
    if e.name == "node" {
        if let Some(n) = nv(&e) {
            s.push_str(&format!(" attribute {}", n.attr("name").unwrap_or("-")));
        }
    }
    s
}

impl At {
    fn apply_now(&self, change: &CibChange) -> Result<(), CibError> {
        let (section, xml, call) = match change {
            CibChange::Create { section, xml } => (*section, xml, "create"),
            CibChange::Modify { section, xml } => (*section, xml, "modify"),
            CibChange::Delete { section, xml } => (*section, xml, "delete"),
            CibChange::Replace { section, xml } => (*section, xml, "replace"),
        };
        let err = |m: &str| CibError {
            call,
            message: m.to_string(),
        };
        let update = Element::parse(xml).map_err(|e| err(&format!("bad XML: {e}")))?;
        let mut g = self.g();
        if section == "configuration" && matches!(change, CibChange::Modify { .. }) {
            // One change of several sections (cib_can_create: what is missing is created).
            if update.name != "configuration" {
                return Err(err("the update is not a <configuration>"));
            }
            let conf = g
                .cib
                .children
                .iter_mut()
                .find(|c| c.name == "configuration")
                .ok_or_else(|| err("No such section"))?;
            for part in &update.children {
                let sec = conf
                    .children
                    .iter_mut()
                    .find(|s| s.name == part.name)
                    .ok_or_else(|| err("No such section"))?;
                for el in &part.children {
                    sec.merge(el);
                }
            }
            return Ok(());
        }
        if section == "configuration" {
            if !matches!(change, CibChange::Replace { .. }) || update.name != "configuration" {
                return Err(err("only a replace of the whole configuration"));
            }
            let conf = g
                .cib
                .children
                .iter_mut()
                .find(|c| c.name == "configuration")
                .ok_or_else(|| err("No such section"))?;
            *conf = update;
            return Ok(());
        }
        let mut ids = Vec::new();
        g.cib.ids(&mut ids);
        let sec = g
            .cib
            .children
            .iter_mut()
            .find(|c| c.name == "configuration")
            .and_then(|c| c.children.iter_mut().find(|s| s.name == section))
            .ok_or_else(|| err("No such section"))?;
        match change {
            CibChange::Create { .. } => {
                let mut new_ids = Vec::new();
                if let Some(id) = update.id() {
                    new_ids.push(id.to_string());
                }
                update.ids(&mut new_ids);
                if let Some(dup) = new_ids.iter().find(|i| ids.contains(i)) {
                    return Err(err(&format!("Name not unique on network: id {dup}")));
                }
                sec.children.push(update);
            }
            // vmhad modifies with cib_can_create: what is missing is created.
            CibChange::Modify { .. } => sec.merge(&update),
            CibChange::Replace { .. } => {
                if update.name != section {
                    return Err(err("the replacement is not the section"));
                }
                *sec = update;
            }
            CibChange::Delete { .. } => {
                if !sec.remove(&update.name, update.id()) {
                    return Err(err("No such device or address"));
                }
            }
        }
        Ok(())
    }
}

impl Hypervisor for At {
    fn sees_files(&self, host: &str, files: Vec<(String, String)>) -> BoxFuture<'_, Result<(), HvError>> {
        let h = host.to_string();
        let fail = hv_fail(&h, "storage lookup");
        guarded!(self, "hv.sees_files", h.clone(), fail, {
            let g = self.g();
            if !g.hosts.get(&h).is_some_and(|x| x.online) {
                return Err(self.hv_err(&h, "connect", "host unreachable"));
            }
            for (dir, base) in &files {
                let path = format!("{dir}/{base}");
                if !g.files.contains_key(&path) {
                    return Err(self.hv_err(&h, "storage lookup", format!("no volume {path}")));
                }
            }
            Ok(())
        })
    }

    fn live_snapshot(
        &self,
        host: &str,
        vm: &str,
        snapshot_xml: String,
        reuse: bool,
        _stage: bool,
    ) -> BoxFuture<'_, Result<crate::ports::Captured, HvError>> {
        let (h, vm) = (host.to_string(), vm.to_string());
        let fail = hv_fail(&h, "live snapshot");
        guarded!(self, "hv.live_snapshot", format!("{vm} on {h}"), fail, {
            let snap = Element::parse(&snapshot_xml).map_err(|e| self.hv_err(&h, "live snapshot", e))?;
            let mut g = self.g();
            let Some(i) = g.domains.iter().position(|d| d.name == vm && d.host == h) else {
                return Err(self.hv_err(&h, "live snapshot", format!("no domain {vm}")));
            };
            let mut mem = None;
            let mut news = BTreeMap::new();
            for c in &snap.children {
                if c.name == "memory" {
                    mem = c.attr("file").map(str::to_string);
                }
                if c.name == "disks" {
                    for d in &c.children {
                        let src = d
                            .children
                            .iter()
                            .find(|s| s.name == "source")
                            .and_then(|s| s.attr("file"));
                        if let (Some(dev), Some(src)) = (d.attr("name"), src) {
                            news.insert(dev.to_string(), src.to_string());
                        }
                    }
                }
            }
            let mem = mem.ok_or_else(|| self.hv_err(&h, "live snapshot", "no memory file"))?;
            if g.files.contains_key(&mem) {
                return Err(self.hv_err(&h, "live snapshot", format!("{mem} exists")));
            }
            // As libvirt: without reuse the overlays must not exist; with it they must, on the disk's
            // current layer.
            for (dev, f) in &news {
                let current = g.domains[i]
                    .disks
                    .iter()
                    .find(|(d, _)| d == dev)
                    .and_then(|(_, c)| c.first().cloned());
                match (reuse, g.files.get(f)) {
                    (false, Some(_)) => return Err(self.hv_err(&h, "live snapshot", format!("{f} exists"))),
                    (true, None) => return Err(self.hv_err(&h, "live snapshot", format!("no {f} to reuse"))),
                    (true, Some(file)) if file.backing != current => {
                        return Err(self.hv_err(&h, "live snapshot", format!("{f} is not on the current layer")))
                    }
                    _ => {}
                }
            }
            let image = SaveImage {
                was_running: 1,
                compressed: 0,
                xml: g.domains[i].xml.clone(),
                cookie: None,
                stream_offset: 0,
            };
            let mut data = model::write_save_header(&image, &image.xml);
            data.extend_from_slice(b"QEMU-STREAM");
            g.files.insert(mem.clone(), SimFile { data, backing: None });
            let mut dom = g.domains[i].clone();
            for (dev, chain) in &mut dom.disks {
                if let Some(new) = news.get(dev.as_str()) {
                    let old = chain[0].clone();
                    dom.xml = dom.xml.replace(&format!("'{old}'"), &format!("'{new}'"));
                    chain.insert(0, new.clone());
                    g.files.insert(
                        new.clone(),
                        SimFile {
                            data: b"QFI\xfb".to_vec(),
                            backing: Some(old),
                        },
                    );
                }
            }
            g.domains[i] = dom;
            g.log.push(format!("{} hv live snapshot of {vm} on {h}", self.host));
            Ok(crate::ports::Captured {
                downtime_ms: Some(3),
                staged_copy_ms: None,
            })
        })
    }

    fn create_overlays(&self, host: &str, overlays: Vec<(String, String)>) -> BoxFuture<'_, Result<(), HvError>> {
        let h = host.to_string();
        let fail = hv_fail(&h, "create volume");
        let detail = overlays.iter().map(|(_, o)| o.as_str()).collect::<Vec<_>>().join(" ");
        guarded!(self, "hv.create_overlays", detail, fail, {
            let mut g = self.g();
            for (backing, overlay) in &overlays {
                if !g.files.contains_key(backing) {
                    return Err(self.hv_err(&h, "create volume", format!("no backing {backing}")));
                }
                if g.files.contains_key(overlay) {
                    return Err(self.hv_err(&h, "create volume", format!("{overlay} exists")));
                }
                g.files.insert(
                    overlay.clone(),
                    SimFile {
                        data: b"QFI\xfb".to_vec(),
                        backing: Some(backing.clone()),
                    },
                );
                g.log.push(format!("{} hv creates {overlay} on {backing}", self.host));
            }
            Ok(())
        })
    }

    fn restore(&self, host: &str, image: String) -> BoxFuture<'_, Result<(), HvError>> {
        let h = host.to_string();
        let fail = hv_fail(&h, "restore");
        guarded!(self, "hv.restore", image.clone(), fail, {
            let mut g = self.g();
            if !g.hosts.get(&h).is_some_and(|x| x.online) {
                return Err(self.hv_err(&h, "restore", "host unreachable"));
            }
            let file = g
                .files
                .get(&image)
                .ok_or_else(|| self.hv_err(&h, "restore", format!("no {image}")))?;
            let parsed = model::parse_save_image(&file.data).map_err(|e| self.hv_err(&h, "restore", e.to_string()))?;
            let name = roxmltree::Document::parse(&parsed.xml)
                .ok()
                .and_then(|d| {
                    d.descendants()
                        .find(|n| n.has_tag_name("name"))
                        .and_then(|n| n.text().map(str::to_string))
                })
                .ok_or_else(|| self.hv_err(&h, "restore", "no name in the image"))?;
            if g.domains.iter().any(|d| d.name == name && d.host == h) {
                return Err(self.hv_err(&h, "restore", format!("domain {name} exists")));
            }
            let disks = chains(&g.files, &parsed.xml);
            for (_, chain) in &disks {
                if !g.files.contains_key(&chain[0]) {
                    return Err(self.hv_err(&h, "restore", format!("no disk {}", chain[0])));
                }
            }
            g.domains.push(Domain {
                name: name.clone(),
                host: h.clone(),
                xml: parsed.xml,
                disks,
            });
            g.guests.entry(name.clone()).or_default();
            g.log.push(format!("{} hv restores {name} on {h}", self.host));
            self.world.publish(&mut g);
            Ok(())
        })
    }

    fn destroy_all(&self, host: &str, domains: Vec<String>) -> BoxFuture<'_, Result<(), HvError>> {
        let h = host.to_string();
        let fail = hv_fail(&h, "destroy");
        guarded!(self, "hv.destroy_all", format!("{} on {h}", domains.join(",")), fail, {
            let mut g = self.g();
            if !g.hosts.get(&h).is_some_and(|x| x.online) {
                // A dead host's domains are gone with it.
                return Ok(());
            }
            let before = g.domains.len();
            g.domains.retain(|d| !(d.host == h && domains.contains(&d.name)));
            let n = before - g.domains.len();
            g.log.push(format!(
                "{} hv destroys {n} of [{}] on {h}",
                self.host,
                domains.join(", ")
            ));
            self.world.publish(&mut g);
            Ok(())
        })
    }

    fn disk_chains(&self, host: &str, vm: &str) -> BoxFuture<'_, Result<DiskChains, HvError>> {
        let (h, vm) = (host.to_string(), vm.to_string());
        let fail = hv_fail(&h, "domain XML");
        guarded!(self, "hv.disk_chains", format!("{vm} on {h}"), fail, {
            let g = self.g();
            g.domains
                .iter()
                .find(|d| d.name == vm && d.host == h)
                .map(|d| d.disks.clone())
                .ok_or_else(|| self.hv_err(&h, "domain XML", format!("no domain {vm}")))
        })
    }

    fn compact(&self, host: &str, vm: &str) -> BoxFuture<'_, Result<Vec<String>, HvError>> {
        let (h, vm) = (host.to_string(), vm.to_string());
        let fail = hv_fail(&h, "block pull");
        guarded!(self, "hv.compact", format!("{vm} on {h}"), fail, {
            let mut g = self.g();
            let Some(i) = g.domains.iter().position(|d| d.name == vm && d.host == h) else {
                return Err(self.hv_err(&h, "block pull", format!("no domain {vm}")));
            };
            let mut dom = g.domains[i].clone();
            let mut dropped = Vec::new();
            for (_, chain) in &mut dom.disks {
                let Some(c) = model::compaction(&vm, chain) else {
                    continue;
                };
                let active = chain[0].clone();
                let rest: Vec<String> = match &c.base {
                    Some(b) => chain.iter().skip_while(|l| *l != b).cloned().collect(),
                    None => Vec::new(),
                };
                if let Some(f) = g.files.get_mut(&active) {
                    f.backing = c.base.clone();
                }
                *chain = std::iter::once(active).chain(rest).collect();
                dropped.extend(c.dropped);
            }
            g.domains[i] = dom;
            if !dropped.is_empty() {
                g.log
                    .push(format!("{} hv pulls [{}] into {vm}", self.host, dropped.join(", ")));
            }
            Ok(dropped)
        })
    }

    fn domain_problems(
        &self,
        host: &str,
        domains: Vec<(String, String)>,
    ) -> BoxFuture<'_, Result<Vec<String>, HvError>> {
        let h = host.to_string();
        let fail = hv_fail(&h, "domain lookup");
        guarded!(self, "hv.domain_problems", h.clone(), fail, {
            let g = self.g();
            Ok(domains
                .iter()
                .filter(|(vm, _)| g.domains.iter().any(|d| &d.name == vm && d.host == h))
                .map(|(vm, _)| format!("VM {vm}: libvirt has a domain with its name or UUID on this host already"))
                .collect())
        })
    }

    fn guest_fsfreeze(&self, host: &str, domain: &str, freeze: bool) -> BoxFuture<'_, Result<(), HvError>> {
        let (h, dom) = (host.to_string(), domain.to_string());
        let call = if freeze { "fsfreeze" } else { "fsthaw" };
        let fail = hv_fail(&h, call);
        guarded!(self, "hv.guest_fsfreeze", format!("{call} {dom} on {h}"), fail, {
            let mut g = self.g();
            if !g.domains.iter().any(|d| d.name == dom && d.host == h) {
                return Err(self.hv_err(&h, call, format!("no domain {dom}")));
            }
            g.log.push(format!("{} hv {call} {dom} on {h}", self.host));
            Ok(())
        })
    }
}

impl Storage for At {
    fn read_small(&self, path: &str) -> BoxFuture<'_, Result<String, StorageError>> {
        let p = path.to_string();
        let fail = st_fail(&p);
        guarded!(self, "storage.read", p.clone(), fail, {
            self.g()
                .files
                .get(&p)
                .map(|f| String::from_utf8_lossy(&f.data).into_owned())
                .ok_or_else(|| st_err(&p, "No such file or directory"))
        })
    }

    fn write_atomic(&self, path: &str, content: String) -> BoxFuture<'_, Result<(), StorageError>> {
        let p = path.to_string();
        let fail = st_fail(&p);
        guarded!(self, "storage.write", p.clone(), fail, {
            let mut g = self.g();
            g.files.insert(
                p.clone(),
                SimFile {
                    data: content.into_bytes(),
                    backing: None,
                },
            );
            g.log.push(format!("{} storage writes {p}", self.host));
            Ok(())
        })
    }

    fn exists(&self, path: &str) -> BoxFuture<'_, bool> {
        let p = path.to_string();
        let entry = self.world.enter(&self.host, "storage.exists", &p);
        Box::pin(async move {
            match entry {
                // A failed existence check reads as "exists" (the cautious answer).
                Entry::Fail(_) => true,
                Entry::Go => self.g().files.contains_key(&p),
                Entry::Stop => std::future::pending().await,
            }
        })
    }

    fn remove(&self, path: &str) -> BoxFuture<'_, Result<bool, StorageError>> {
        let p = path.to_string();
        let fail = st_fail(&p);
        guarded!(self, "storage.remove", p.clone(), fail, {
            let mut g = self.g();
            let existed = g.files.remove(&p).is_some();
            g.inodes.remove(&p);
            if existed {
                g.log.push(format!("{} storage removes {p}", self.host));
            }
            Ok(existed)
        })
    }

    fn read_image_header(&self, path: &str) -> BoxFuture<'_, Result<SaveImage, StorageError>> {
        let p = path.to_string();
        let fail = st_fail(&p);
        guarded!(self, "storage.read_image", p.clone(), fail, {
            let g = self.g();
            let f = g.files.get(&p).ok_or_else(|| st_err(&p, "No such file or directory"))?;
            model::parse_save_image(&f.data).map_err(|e| st_err(&p, e.to_string()))
        })
    }

    fn write_clone_image(
        &self,
        from: &str,
        image: SaveImage,
        xml: String,
        to: &str,
    ) -> BoxFuture<'_, Result<(), StorageError>> {
        let (from, to) = (from.to_string(), to.to_string());
        let fail = st_fail(&to);
        guarded!(self, "storage.write_image", to.clone(), fail, {
            let mut g = self.g();
            if g.files.contains_key(&to) {
                return Err(st_err(&to, "File exists"));
            }
            let src = g
                .files
                .get(&from)
                .ok_or_else(|| st_err(&from, "No such file or directory"))?;
            let offset = usize::try_from(image.stream_offset).unwrap_or(usize::MAX);
            let stream = src.data.get(offset..).unwrap_or_default().to_vec();
            let mut data = model::write_save_header(&image, &xml);
            data.extend_from_slice(&stream);
            g.files.insert(to.clone(), SimFile { data, backing: None });
            g.log.push(format!("{} storage writes image {to}", self.host));
            Ok(())
        })
    }

    fn backing_of(&self, image: &str) -> BoxFuture<'_, Result<Option<String>, StorageError>> {
        let p = image.to_string();
        let fail = st_fail(&p);
        guarded!(self, "storage.backing_of", p.clone(), fail, {
            Ok(self.g().files.get(&p).and_then(|f| f.backing.clone()))
        })
    }

    fn list_dir(&self, dir: &str) -> BoxFuture<'_, Result<Vec<String>, StorageError>> {
        let d = dir.trim_end_matches('/').to_string();
        let fail = st_fail(&d);
        guarded!(self, "storage.list_dir", d.clone(), fail, {
            let prefix = format!("{d}/");
            Ok(self
                .g()
                .files
                .keys()
                .filter(|n| n.strip_prefix(&prefix).is_some_and(|rest| !rest.contains('/')))
                .cloned()
                .collect())
        })
    }

    fn layer_users(&self, layer: &str) -> BoxFuture<'_, Result<Vec<String>, StorageError>> {
        let p = layer.to_string();
        let fail = st_fail(&p);
        guarded!(self, "storage.layer_users", p.clone(), fail, {
            let g = self.g();
            Ok(g.files
                .iter()
                .filter(|(_, f)| f.backing.as_deref() == Some(p.as_str()))
                .map(|(n, _)| n.clone())
                .collect())
        })
    }

    fn lexists(&self, path: &str) -> BoxFuture<'_, bool> {
        let p = path.to_string();
        let entry = self.world.enter(&self.host, "storage.lexists", &p);
        Box::pin(async move {
            YieldOnce(false).await;
            match entry {
                // A failed check reads as "exists" (the cautious answer).
                Entry::Fail(_) => true,
                Entry::Go => {
                    let g = self.g();
                    g.files.contains_key(&p) || is_dir(&g, &p)
                }
                Entry::Stop => std::future::pending().await,
            }
        })
    }

    fn is_dir(&self, path: &str) -> BoxFuture<'_, bool> {
        let p = path.to_string();
        let entry = self.world.enter(&self.host, "storage.is_dir", &p);
        Box::pin(async move {
            YieldOnce(false).await;
            match entry {
                Entry::Fail(_) => false,
                Entry::Go => is_dir(&self.g(), &p),
                Entry::Stop => std::future::pending().await,
            }
        })
    }

    fn create_new(&self, path: &str, roots: &[String]) -> BoxFuture<'_, Result<Option<std::fs::File>, StorageError>> {
        let (p, roots) = (path.to_string(), roots.to_vec());
        let fail = st_fail(&p);
        guarded!(self, "storage.create_new", p.clone(), fail, {
            let mut g = self.g();
            make_new(&mut g, &p, &roots, Vec::new())?;
            g.log.push(format!("{} storage creates {p}", self.host));
            Ok(None)
        })
    }

    fn write_new(&self, path: &str, roots: &[String], content: String) -> BoxFuture<'_, Result<(), StorageError>> {
        let (p, roots) = (path.to_string(), roots.to_vec());
        let fail = st_fail(&p);
        guarded!(self, "storage.write_new", p.clone(), fail, {
            let mut g = self.g();
            make_new(&mut g, &p, &roots, content.into_bytes())?;
            g.log.push(format!("{} storage writes new {p}", self.host));
            Ok(())
        })
    }

    fn link_new(&self, from: &str, to: &str, roots: &[String]) -> BoxFuture<'_, Result<(), StorageError>> {
        let (from, to, roots) = (from.to_string(), to.to_string(), roots.to_vec());
        let fail = st_fail(&to);
        guarded!(self, "storage.link_new", to.clone(), fail, {
            let mut g = self.g();
            confined(&g, &to, &roots)?;
            confined(&g, &from, &roots)?;
            if g.files.contains_key(&to) || is_dir(&g, &to) {
                return Err(st_err(&to, "File exists"));
            }
            let file = g
                .files
                .get(&from)
                .cloned()
                .ok_or_else(|| st_err(&from, "No such file or directory"))?;
            let ino = g.inodes.get(&from).copied();
            g.files.insert(to.clone(), file);
            if let Some(ino) = ino {
                g.inodes.insert(to.clone(), ino);
            }
            g.log.push(format!("{} storage links {to}", self.host));
            Ok(())
        })
    }

    fn same_file(&self, a: &str, b: &str) -> BoxFuture<'_, bool> {
        let (a, b) = (a.to_string(), b.to_string());
        let entry = self.world.enter(&self.host, "storage.same_file", &b);
        Box::pin(async move {
            YieldOnce(false).await;
            match entry {
                Entry::Fail(_) => false,
                Entry::Go => {
                    let g = self.g();
                    g.inodes.get(&a).is_some_and(|i| g.inodes.get(&b) == Some(i))
                }
                Entry::Stop => std::future::pending().await,
            }
        })
    }

    fn remove_confined(&self, path: &str, roots: &[String]) -> BoxFuture<'_, Result<bool, StorageError>> {
        let (p, roots) = (path.to_string(), roots.to_vec());
        let fail = st_fail(&p);
        guarded!(self, "storage.remove", p.clone(), fail, {
            let mut g = self.g();
            confined(&g, &p, &roots)?;
            let existed = g.files.remove(&p).is_some();
            g.inodes.remove(&p);
            if existed {
                g.log.push(format!("{} storage removes {p}", self.host));
            }
            Ok(existed)
        })
    }

    fn check_free_space(&self, files: Vec<(String, u64)>, roots: &[String]) -> BoxFuture<'_, Result<(), StorageError>> {
        let roots = roots.to_vec();
        let first = files.first().map(|(p, _)| p.clone()).unwrap_or_default();
        let fail = st_fail(&first);
        guarded!(self, "storage.free_space", first.clone(), fail, {
            let g = self.g();
            for (p, _) in &files {
                confined(&g, p, &roots)?;
            }
            Ok(())
        })
    }
}

/// Whether the simulated storage has a directory at `path`: the storage directory, one above it, or
/// one holding files.
fn is_dir(g: &Inner, path: &str) -> bool {
    let p = path.trim_end_matches('/');
    let p = if p.is_empty() { "/" } else { p };
    STORAGE == p
        || STORAGE.starts_with(&format!("{}/", p.trim_end_matches('/')))
        || g.files.keys().any(|f| f.starts_with(&format!("{p}/")))
}

/// Refuses `path` unless it is a file name in an existing directory under one of `roots` (the way
/// vmhad's confined paths do).
fn confined(g: &Inner, path: &str, roots: &[String]) -> Result<(), StorageError> {
    use vmha_vcluster::domain_check::{normalise, under};
    let n = normalise(path).ok_or_else(|| st_err(path, "not an absolute path without '..'"))?;
    let inside = roots
        .iter()
        .filter_map(|r| normalise(r))
        .any(|r| under(&n, &r) && n != r);
    if !inside {
        return Err(st_err(
            path,
            format!("outside every storage root ({})", roots.join(", ")),
        ));
    }
    let dir = n
        .rsplit_once('/')
        .map_or("/", |(d, _)| if d.is_empty() { "/" } else { d });
    if !is_dir(g, dir) {
        return Err(st_err(path, "its directory is missing"));
    }
    Ok(())
}

/// Creates a new file (refusing one that exists: O_EXCL) under `roots`, with an inode of its own.
fn make_new(g: &mut Inner, path: &str, roots: &[String], data: Vec<u8>) -> Result<(), StorageError> {
    confined(g, path, roots)?;
    if g.files.contains_key(path) || is_dir(g, path) {
        return Err(st_err(path, "File exists"));
    }
    g.files.insert(path.to_string(), SimFile { data, backing: None });
    let ino = g.next_inode;
    g.next_inode += 1;
    g.inodes.insert(path.to_string(), ino);
    Ok(())
}

impl At {
    /// The guest of `vm` on `host` answers `kind`.
    fn answer(&self, host: &str, vm: &str, kind: &str) -> Result<GuestAnswer, String> {
        let mut g = self.g();
        if !g.hosts.get(host).is_some_and(|h| h.online && h.vmhad) {
            return Err(format!("no vmhad on {host}"));
        }
        if !g.domains.iter().any(|d| d.name == vm && d.host == host) {
            return Err(format!("VM {vm} has no guest channel on {host}"));
        }
        let guest = g.guests.entry(vm.to_string()).or_default();
        let answer = match guest.answers.get(kind) {
            Some((outcome, reason)) => GuestAnswer {
                outcome: outcome.clone(),
                reason: reason.clone(),
            },
            None => {
                match kind {
                    "prepare-clone" => guest.prepared = true,
                    "resume" => guest.prepared = false,
                    "post-clone" => guest.identity = Some(vm.to_string()),
                    _ => {}
                }
                GuestAnswer {
                    outcome: "done".into(),
                    reason: String::new(),
                }
            }
        };
        g.log.push(format!(
            "{} guest {vm} on {host}: {kind} -> {}{}",
            self.host,
            answer.outcome,
            if answer.reason.is_empty() {
                String::new()
            } else {
                format!(" ({})", answer.reason)
            }
        ));
        Ok(answer)
    }
}

impl Guests for At {
    fn request(
        &self,
        vm: &str,
        kind: &str,
        _data: String,
        _timeout_ms: u32,
    ) -> BoxFuture<'_, Result<GuestAnswer, String>> {
        let (vm, kind) = (vm.to_string(), kind.to_string());
        guarded!(self, "guest.request", format!("{kind} {vm}"), |m| m, {
            let host = self
                .world
                .tx
                .borrow()
                .view
                .as_ref()
                .and_then(|v| v.vm(&vm))
                .and_then(|v| (v.hosts.len() == 1).then(|| v.hosts[0].clone()));
            match host {
                Some(host) => self.answer(&host, &vm, &kind),
                None => {
                    self.log(format!("{} guest {vm}: {kind} -> not running on one host", self.host));
                    Err(format!("VM {vm} does not run on one host"))
                }
            }
        })
    }

    fn request_on(
        &self,
        host: &str,
        vm: &str,
        kind: &str,
        _data: String,
        _timeout_ms: u32,
    ) -> BoxFuture<'_, Result<GuestAnswer, String>> {
        let (host, vm, kind) = (host.to_string(), vm.to_string(), kind.to_string());
        guarded!(self, "guest.request_on", format!("{kind} {vm} on {host}"), |m| m, {
            self.answer(&host, &vm, &kind)
        })
    }
}

impl Environment for At {
    fn unix_ms(&self) -> u128 {
        // Distinct for every call, so that two jobs never name a file alike.
        let mut g = self.g();
        g.stamps += 1;
        1_800_000_000_000 + u128::from(g.stamps) * 1000
    }

    fn random(&self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let r = self.world.next_random().to_le_bytes();
            chunk.copy_from_slice(&r[..chunk.len()]);
        }
    }
}

/// An archive in memory, read by an instantiate in the vmhad on `host` (its two reads are port calls:
/// `archive.head`, `archive.rest`). The disk data is checked, not written: the simulated files hold none.
#[derive(Debug)]
pub struct SimArchive {
    world: Arc<World>,
    host: String,
    bytes: Arc<Vec<u8>>,
    trust: vmha_vcluster::signature::Trust,
}

impl SimArchive {
    pub fn new(world: &Arc<World>, host: &str, bytes: Arc<Vec<u8>>) -> Self {
        SimArchive {
            world: Arc::clone(world),
            host: host.to_string(),
            bytes,
            trust: Default::default(),
        }
    }

    fn g(&self) -> MutexGuard<'_, Inner> {
        lock(&self.world.inner)
    }
}

impl crate::vcluster::ArchiveSource for SimArchive {
    fn head(&mut self) -> BoxFuture<'_, Result<vmha_vcluster::archive::Verified, String>> {
        guarded!(self, "archive.head", "", |m| m, {
            let mut v = vmha_vcluster::archive::verify_trusting(self.bytes.as_slice(), &self.trust)
                .map_err(|e| e.to_string())?;
            v.chunks = Default::default();
            self.g().log.push(format!("{} archive head read", self.host));
            Ok(v)
        })
    }

    fn rest(&mut self, files: Option<BTreeMap<u32, std::fs::File>>) -> BoxFuture<'_, Result<(), String>> {
        drop(files);
        guarded!(self, "archive.rest", "", |m| m, {
            vmha_vcluster::archive::verify_trusting(self.bytes.as_slice(), &self.trust).map_err(|e| e.to_string())?;
            self.g().log.push(format!("{} archive disks read", self.host));
            Ok(())
        })
    }
}

/// An archive a capture in the vmhad on `host` writes into memory (`archive.open_disks`,
/// `archive.write` are port calls). The simulated disks hold no data: each is stored empty.
#[derive(Debug)]
pub struct SimSink {
    world: Arc<World>,
    host: String,
    disks: Vec<(String, String)>,
    /// The archive, once written.
    pub bytes: Option<Vec<u8>>,
}

impl SimSink {
    pub fn new(world: &Arc<World>, host: &str) -> Self {
        SimSink {
            world: Arc::clone(world),
            host: host.to_string(),
            disks: Vec::new(),
            bytes: None,
        }
    }

    fn g(&self) -> MutexGuard<'_, Inner> {
        lock(&self.world.inner)
    }
}

fn capture_error(m: String) -> crate::OpError {
    crate::OpError::data("writing the archive", m)
}

impl crate::vcluster::ArchiveSink for SimSink {
    fn open_disks(&mut self, disks: Vec<(String, String)>) -> BoxFuture<'_, Result<(), crate::OpError>> {
        guarded!(self, "archive.open_disks", "", capture_error, {
            let g = self.g();
            if let Some((vm, path)) = disks.iter().find(|(_, p)| !g.files.contains_key(p)) {
                return Err(crate::OpError::Storage(st_err(
                    path,
                    format!("opening {vm}'s disk: No such file or directory"),
                )));
            }
            drop(g);
            self.disks = disks;
            Ok(())
        })
    }

    fn write<'a>(
        &'a mut self,
        c: &'a vmha_vcluster::capture::Captured,
        metadata: &'a BTreeMap<String, Vec<u8>>,
        placement: BTreeMap<String, String>,
        consistency: &'a str,
    ) -> BoxFuture<'a, Result<(vmha_vcluster::archive::Manifest, Vec<vmha_vcluster::archive::DiskStats>), crate::OpError>>
    {
        guarded!(self, "archive.write", consistency, capture_error, {
            let sized: Vec<(String, String, u64)> =
                self.disks.iter().map(|(vm, p)| (vm.clone(), p.clone(), 0)).collect();
            let manifest =
                vmha_vcluster::manifest_for(c, placement, "2026-12-06T00:00:00Z".into(), consistency, &sized);
            let e = |e: vmha_vcluster::archive::ArchiveError| capture_error(e.to_string());
            let mut w = vmha_vcluster::archive::ArchiveWriter::new(Vec::new(), 1, manifest, metadata).map_err(e)?;
            for _ in &sized {
                // An empty disk: nothing of it is stored.
                let empty = std::fs::File::open("/dev/null").map_err(|x| capture_error(x.to_string()))?;
                w.add_disk(&empty, &mut |_| {}).map_err(e)?;
            }
            let (bytes, manifest, stats) = w.finish().map_err(e)?;
            self.g().log.push(format!(
                "{} archive written ({consistency}, {} disks)",
                self.host,
                sized.len()
            ));
            self.bytes = Some(bytes);
            Ok((manifest, stats))
        })
    }
}
