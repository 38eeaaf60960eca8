//! Translation of a captured virtual cluster for another cluster: host, address, network and storage maps
//! and a new name, into a [`Plan`]: what will be created where, every remapped value, and the one CIB
//! fragment that creates it all. Pure: the caller gathers the [`Target`] and applies the plan.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::ops::Range;

use roxmltree::{Document, Node};
use serde::Serialize;
use vmha_model::change::{escape, validate_name};

use crate::archive::{Verified, CONSTRAINTS, RESOURCES, TAG};
use crate::capture::{constraint_hosts, constraint_resources, tag_xml};
use crate::domain_check::{self, normalise, Allow, Category, Roots};
use crate::{printable, VclusterError};

/// One address map: addresses in `old/prefix` move to the same host part in `new/prefix`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AddressMap {
    pub old: Ipv4Addr,
    pub new: Ipv4Addr,
    pub prefix: u8,
}

impl AddressMap {
    fn mask(&self) -> u32 {
        if self.prefix == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(self.prefix))
        }
    }

    fn apply(&self, a: Ipv4Addr) -> Option<Ipv4Addr> {
        let m = self.mask();
        (u32::from(a) & m == u32::from(self.old) & m)
            .then(|| Ipv4Addr::from((u32::from(self.new) & m) | (u32::from(a) & !m)))
    }
}

/// The maps given with `--map` and `--name`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Maps {
    pub hosts: BTreeMap<String, String>,
    pub addresses: Vec<AddressMap>,
    pub networks: BTreeMap<String, String>,
    /// Path prefixes, longest first when applied.
    pub storage: Vec<(String, String)>,
    pub name: Option<String>,
    /// What the operator allowed beyond the safe subset (`--allow`, `--allow-agent`).
    pub allow: Allow,
}

fn pairs(kind: &str, list: &str) -> Result<Vec<(String, String)>, VclusterError> {
    let mut out = Vec::new();
    for item in list.split(',').filter(|s| !s.is_empty()) {
        let (a, b) = item
            .split_once(':')
            .ok_or_else(|| VclusterError::Usage(format!("--map {kind}=...: {item:?} is not OLD:NEW")))?;
        if a.is_empty() || b.is_empty() {
            return Err(VclusterError::Usage(format!(
                "--map {kind}=...: {item:?} has an empty side"
            )));
        }
        out.push((a.to_string(), b.to_string()));
    }
    if out.is_empty() {
        return Err(VclusterError::Usage(format!(
            "--map {kind}= needs at least one OLD:NEW"
        )));
    }
    Ok(out)
}

fn cidr(s: &str) -> Result<(Ipv4Addr, u8), VclusterError> {
    let bad = || {
        VclusterError::Usage(format!(
            "--map address=...: {s:?} is not an IPv4 network like 10.0.0.0/24"
        ))
    };
    let (a, p) = s.split_once('/').ok_or_else(bad)?;
    let p: u8 = p.parse().map_err(|_| bad())?;
    if p > 32 {
        return Err(bad());
    }
    Ok((a.parse().map_err(|_| bad())?, p))
}

impl Maps {
    /// Parses `--map` values (`hosts=a:b,c:d`, `address=10.0.0.0/24:10.1.0.0/24`, `network=a:b`,
    /// `storage=/old:/new`) and `--name`.
    pub fn parse(specs: &[String], name: Option<String>) -> Result<Maps, VclusterError> {
        let mut maps = Maps::default();
        if let Some(n) = &name {
            validate_name("virtual cluster name", n).map_err(|e| VclusterError::Usage(e.to_string()))?;
        }
        maps.name = name;
        for spec in specs {
            let (kind, list) = spec.split_once('=').ok_or_else(|| {
                VclusterError::Usage(format!(
                    "--map {spec:?}: expected hosts=, address=, network= or storage="
                ))
            })?;
            match kind {
                "hosts" | "host" => {
                    for (a, b) in pairs(kind, list)? {
                        if maps.hosts.insert(a.clone(), b).is_some() {
                            return Err(VclusterError::Usage(format!("host {a} is mapped twice")));
                        }
                    }
                }
                "address" | "addresses" => {
                    for item in list.split(',') {
                        // 10.0.0.0/24:10.1.0.0/24
                        let (a, b) = item.split_once(':').ok_or_else(|| {
                            VclusterError::Usage(format!("--map address=...: {item:?} is not OLD/NN:NEW/NN"))
                        })?;
                        let (old, p1) = cidr(a)?;
                        let (new, p2) = cidr(b)?;
                        if p1 != p2 {
                            return Err(VclusterError::Usage(format!(
                                "--map address={item}: both networks need the same prefix length (/{p1} vs /{p2})"
                            )));
                        }
                        maps.addresses.push(AddressMap { old, new, prefix: p1 });
                    }
                }
                "network" | "networks" => maps.networks.extend(pairs(kind, list)?),
                "storage" => {
                    for (a, b) in pairs(kind, list)? {
                        if !a.starts_with('/') || !b.starts_with('/') {
                            return Err(VclusterError::Usage(format!(
                                "--map storage={a}:{b}: both sides must be absolute paths"
                            )));
                        }
                        maps.storage
                            .push((a.trim_end_matches('/').to_string(), b.trim_end_matches('/').to_string()));
                    }
                    maps.storage.sort_by_key(|m| std::cmp::Reverse(m.0.len()));
                }
                other => {
                    return Err(VclusterError::Usage(format!(
                        "--map {other}=...: unknown map (hosts, address, network, storage)"
                    )))
                }
            }
        }
        Ok(maps)
    }

    /// The storage roots of this cluster: the target sides of the storage maps. Everything an
    /// instantiate writes, and every file a domain names, must be under one of them.
    pub fn roots(&self) -> Vec<String> {
        self.storage
            .iter()
            .map(|(_, new)| if new.is_empty() { "/".to_string() } else { new.clone() })
            .collect()
    }

    /// A path with its storage prefix replaced, if a map covers it.
    pub fn path(&self, value: &str) -> Option<String> {
        self.storage.iter().find_map(|(old, new)| {
            let rest = value.strip_prefix(old.as_str())?;
            (rest.is_empty() || rest.starts_with('/')).then(|| format!("{new}{rest}"))
        })
    }

    /// Every IPv4 address in `value` that an address map covers replaced; also the addresses no map covers.
    fn addresses_in(&self, value: &str) -> (Option<String>, Vec<String>) {
        let mut out = String::new();
        let mut changed = false;
        let mut unmapped = Vec::new();
        let bytes = value.as_bytes();
        let mut i = 0;
        while i < bytes.len() {
            let is_tok = |b: u8| b.is_ascii_digit() || b == b'.';
            if is_tok(bytes[i]) && (i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'.')) {
                let mut j = i;
                while j < bytes.len() && is_tok(bytes[j]) {
                    j += 1;
                }
                let tok = value[i..j].trim_end_matches('.');
                let end = i + tok.len();
                let standalone = end >= bytes.len() || !bytes[end].is_ascii_alphanumeric();
                if let (true, Ok(addr)) = (standalone, tok.parse::<Ipv4Addr>()) {
                    match self.addresses.iter().find_map(|m| m.apply(addr)) {
                        Some(new) => {
                            out.push_str(&new.to_string());
                            changed |= new != addr;
                        }
                        None => {
                            unmapped.push(tok.to_string());
                            out.push_str(tok);
                        }
                    }
                    i = end;
                    continue;
                }
                out.push_str(&value[i..j]);
                i = j;
                continue;
            }
            let c = value[i..].chars().next().unwrap_or(' ');
            out.push(c);
            i += c.len_utf8();
        }
        (changed.then_some(out), unmapped)
    }
}

/// What the target cluster has, as far as the plan needs it.
#[derive(Debug, Clone, Default)]
pub struct Target {
    pub hosts: Vec<String>,
    /// Every id in the target's CIB configuration.
    pub ids: BTreeSet<String>,
}

/// One value the plan changes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Remap {
    /// Where: `resource web param config`, `domain web <source file>`, `constraint x node`, ...
    pub place: String,
    pub old: String,
    pub new: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PlannedResource {
    pub id: String,
    pub kind: String,
    /// `class:provider:type` for primitives.
    pub agent: String,
    /// Host it ran on in the source cluster, and that host's counterpart here.
    pub ran_on: Option<String>,
    pub expected_on: Option<String>,
    /// Every instance attribute as it will be created (translated).
    pub params: BTreeMap<String, String>,
    /// Every meta attribute.
    pub meta: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PlannedDomain {
    pub vm: String,
    /// The translated domain XML is written here (the resource's `config`).
    pub path: String,
    /// Its devices and boot files, one line each.
    pub devices: Vec<String>,
    #[serde(skip)]
    pub xml: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PlannedDisk {
    pub id: u32,
    pub vm: String,
    pub from: String,
    pub to: String,
    pub size: u64,
}

/// Everything instantiate will do, before it does it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Plan {
    pub name: String,
    pub source_name: String,
    pub source_cluster: Option<String>,
    pub created: String,
    /// Who signed the archive (its signature checked), `None`: unsigned.
    pub signature: Option<crate::signature::Signer>,
    pub resources: Vec<PlannedResource>,
    pub constraints: Vec<String>,
    pub domains: Vec<PlannedDomain>,
    pub disks: Vec<PlannedDisk>,
    pub remaps: Vec<Remap>,
    pub warnings: Vec<String>,
    /// Every risky item the operator's `--allow`/`--allow-agent` let through.
    pub allowed: Vec<String>,
    /// Host map used (source host -> target host), for every host the archive names.
    pub hosts: BTreeMap<String, String>,
    /// The `<configuration>` fragment: resources, constraints and the tag, created in one CIB change.
    pub cib_fragment: String,
}

fn splice(text: &str, mut edits: Vec<(Range<usize>, String)>) -> String {
    edits.sort_by_key(|(r, _)| std::cmp::Reverse(r.start));
    let mut out = text.to_string();
    for (r, new) in edits {
        out.replace_range(r, &new);
    }
    out
}

fn element_path(n: Node) -> String {
    let id_owner = n.ancestors().find(|a| {
        matches!(
            a.tag_name().name(),
            "primitive" | "group" | "clone" | "rsc_location" | "rsc_colocation" | "rsc_order" | "rsc_ticket"
        )
    });
    id_owner.and_then(|o| o.attribute("id")).unwrap_or("?").to_string()
}

/// Elements the resources of a virtual cluster are made of.
const RESOURCE_ELEMENTS: [&str; 16] = [
    "primitive",
    "group",
    "clone",
    "instance_attributes",
    "meta_attributes",
    "utilization",
    "operations",
    "op",
    "nvpair",
    "rule",
    "expression",
    "date_expression",
    "date_spec",
    "duration",
    "op_expression",
    "rsc_expression",
];

/// Elements the constraints of a virtual cluster are made of.
const CONSTRAINT_ELEMENTS: [&str; 10] = [
    "rsc_location",
    "rsc_colocation",
    "rsc_order",
    "resource_set",
    "resource_ref",
    "rule",
    "expression",
    "date_expression",
    "date_spec",
    "duration",
];

/// `class:provider:type` (or `class:type`) of a primitive.
fn agent_of(p: Node) -> String {
    [p.attribute("class"), p.attribute("provider"), p.attribute("type")]
        .iter()
        .flatten()
        .copied()
        .collect::<Vec<_>>()
        .join(":")
}

/// An element named for a message: `<primitive id="x">`, printable.
fn named(n: Node) -> String {
    match n.attribute("id") {
        Some(id) => format!("<{} id={:?}>", printable(n.tag_name().name()), printable(id)),
        None => match element_path(n) {
            owner if owner != "?" => format!("<{}> in {}", printable(n.tag_name().name()), printable(&owner)),
            _ => format!("<{}>", printable(n.tag_name().name())),
        },
    }
}

/// A CIB id as Pacemaker's schema and vmha accept it.
fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 255
        && id.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

/// Checks that the archive's cluster part (to be created as virtual cluster `name`) is a virtual cluster and nothing else: `<resources>` holding
/// exactly the members the manifest lists (primitives, groups, clones of allowed agents),
/// `<constraints>` holding location, colocation and order constraints among them (or to hosts), a
/// `<tag>`; every id valid and defined once. Refusals go to `problems`, items `allow` let through to
/// `allowed`.
#[allow(clippy::too_many_arguments)] // the three documents, the archive, the name and the two outputs
fn check_cluster(
    rdoc: &Document,
    cdoc: &Document,
    tag: &Document,
    archive: &Verified,
    name: &str,
    allow: &Allow,
    problems: &mut Vec<String>,
    allowed: &mut Vec<String>,
) {
    let m = &archive.manifest;
    let mut refuse = |what: String| problems.push(what);
    for (doc, file, want) in [
        (rdoc, RESOURCES, "resources"),
        (cdoc, CONSTRAINTS, "constraints"),
        (tag, TAG, "tag"),
    ] {
        let root = doc.root_element();
        if !root.has_tag_name(want) || root.tag_name().namespace().is_some() {
            refuse(format!(
                "{file}: the root element is <{}>, not <{want}> (an archive brings resources, constraints and a tag, nothing else)",
                printable(root.tag_name().name())
            ));
        }
    }
    // Ids: valid, each defined once; id-refs only to them.
    let mut defined = BTreeSet::new();
    for doc in [rdoc, cdoc] {
        for n in doc
            .descendants()
            .filter(|n| n.is_element() && !n.has_tag_name("resource_ref"))
        {
            if let Some(id) = n.attribute("id") {
                if !valid_id(id) {
                    refuse(format!("{}: not a valid id", named(n)));
                } else if !defined.insert(id.to_string()) {
                    refuse(format!("{}: the id is defined twice", named(n)));
                }
            }
        }
    }
    for doc in [rdoc, cdoc] {
        for n in doc.descendants().filter(|n| n.is_element()) {
            if let Some(r) = n.attribute("id-ref") {
                if !defined.contains(r) {
                    refuse(format!(
                        "{}: id-ref {:?} refers to something outside the virtual cluster",
                        named(n),
                        printable(r)
                    ));
                }
            }
            for a in ["template", "rsc-pattern"] {
                if n.attribute(a).is_some() {
                    refuse(format!(
                        "{}: {a}= reaches beyond the virtual cluster's resources",
                        named(n)
                    ));
                }
            }
        }
    }
    // Resources: the members, made of resource elements only.
    let rroot = rdoc.root_element();
    let mut tops = Vec::new();
    for el in rroot.children().filter(|n| n.is_element()) {
        if !matches!(el.tag_name().name(), "primitive" | "group" | "clone") || el.tag_name().namespace().is_some() {
            refuse(format!(
                "{RESOURCES}: {} is not a resource a virtual cluster holds (primitives, groups and clones only)",
                named(el)
            ));
            continue;
        }
        let id = el.attribute("id").unwrap_or("");
        if !m.members.iter().any(|mm| mm == id) {
            refuse(format!("{RESOURCES}: {} is not a member the manifest lists", named(el)));
        }
        tops.push(id.to_string());
    }
    for mm in &m.members {
        if !tops.contains(mm) {
            refuse(format!("member {} has no definition in {RESOURCES}", printable(mm)));
        }
    }
    let mut resource_ids = BTreeSet::new();
    for n in rroot.descendants().filter(|n| n.is_element() && *n != rroot) {
        let name = n.tag_name().name();
        if !RESOURCE_ELEMENTS.contains(&name) || n.tag_name().namespace().is_some() {
            if n.parent_element() != Some(rroot) {
                refuse(format!(
                    "{RESOURCES}: {} is not part of a virtual cluster's resources",
                    named(n)
                ));
            }
            continue;
        }
        let parent = n.parent_element().map(|p| p.tag_name().name()).unwrap_or("");
        let placed = match name {
            "primitive" => matches!(parent, "resources" | "group" | "clone"),
            "group" => matches!(parent, "resources" | "clone"),
            "clone" => parent == "resources",
            _ => true,
        };
        if !placed {
            refuse(format!("{RESOURCES}: {} inside <{}>", named(n), printable(parent)));
        }
        if matches!(name, "primitive" | "group" | "clone") {
            resource_ids.insert(n.attribute("id").unwrap_or("").to_string());
        }
        if name == "primitive" {
            let agent = agent_of(n);
            if n.attribute("class") == Some("stonith") {
                refuse(format!(
                    "{}: a stonith (fencing) resource is not part of a virtual cluster",
                    named(n)
                ));
            } else if !domain_check::DEFAULT_AGENTS.contains(&agent.as_str()) {
                if allow.agents.contains(&agent) {
                    allowed.push(format!(
                        "resource {} with agent {} (--allow-agent)",
                        printable(n.attribute("id").unwrap_or("")),
                        printable(&agent)
                    ));
                } else {
                    refuse(format!(
                        "{}: agent {} is not allowed (a capture of VMs and their addresses makes {}; --allow-agent {} creates it anyway)",
                        named(n),
                        printable(&agent),
                        domain_check::DEFAULT_AGENTS.join(", "),
                        printable(&agent)
                    ));
                }
            }
        }
    }
    // Constraints: location, colocation and order among the resources (or the tag) and to hosts.
    let croot = cdoc.root_element();
    for c in croot.children().filter(|n| n.is_element()) {
        let kind = c.tag_name().name();
        if !matches!(kind, "rsc_location" | "rsc_colocation" | "rsc_order") || c.tag_name().namespace().is_some() {
            let why = if kind == "rsc_ticket" {
                "tickets are cluster-wide (multi-site), not part of a virtual cluster"
            } else {
                "only location, colocation and order constraints are part of a virtual cluster"
            };
            refuse(format!("{CONSTRAINTS}: {}: {why}", named(c)));
            continue;
        }
        for r in constraint_resources(c) {
            // The tag itself counts, under the name it is created with (not a tag of the target's).
            if !resource_ids.contains(&r) && r != name {
                refuse(format!(
                    "{CONSTRAINTS}: {} names {}, which is not one of the virtual cluster's resources",
                    named(c),
                    printable(&r)
                ));
            }
        }
        for n in c.descendants().filter(|n| n.is_element() && *n != c) {
            if !CONSTRAINT_ELEMENTS.contains(&n.tag_name().name()) || n.tag_name().namespace().is_some() {
                refuse(format!("{CONSTRAINTS}: {} is not part of a constraint", named(n)));
            }
        }
    }
    let troot = tag.root_element();
    if let Some(n) = troot
        .descendants()
        .find(|n| n.is_element() && *n != troot && !n.has_tag_name("obj_ref"))
    {
        refuse(format!("{TAG}: {} is not part of a tag", named(n)));
    }
}

/// Parameters and meta attributes of VM resources (as translated): paths under a storage root, no
/// monitor scripts (the agent runs them as root).
fn check_vm_params(
    doc: &Document,
    roots: &Roots,
    allow: &Allow,
    problems: &mut Vec<String>,
    allowed: &mut Vec<String>,
) {
    for p in doc.descendants().filter(|n| n.has_tag_name("primitive")) {
        let agent = (
            p.attribute("class").unwrap_or(""),
            p.attribute("provider").unwrap_or(""),
            p.attribute("type").unwrap_or(""),
        );
        if !vmha_model::VM_AGENTS.contains(&agent) {
            continue;
        }
        let id = printable(p.attribute("id").unwrap_or(""));
        for nv in p
            .children()
            .filter(|s| s.has_tag_name("instance_attributes") || s.has_tag_name("meta_attributes"))
            .flat_map(|s| s.children())
            .filter(|n| n.has_tag_name("nvpair"))
        {
            let name = printable(nv.attribute("name").unwrap_or(""));
            let value = nv.attribute("value").unwrap_or("");
            let finding = if name == "monitor_scripts" && !value.trim().is_empty() {
                Some((
                    Category::Scripts,
                    format!(
                        "resource {id} param {name}={}: scripts run as root on the hosts",
                        printable(value)
                    ),
                ))
            } else if let Some(why) = unsafe_connection(&name, value) {
                Some((
                    Category::Connections,
                    format!("resource {id} param {name}={}: {why}", printable(value)),
                ))
            } else if value.starts_with('/') && roots.contains(value).is_none() {
                Some((
                    Category::HostPaths,
                    format!(
                        "resource {id} {} {name}={}: outside every storage root",
                        if nv.parent().is_some_and(|s| s.has_tag_name("meta_attributes")) {
                            "meta"
                        } else {
                            "param"
                        },
                        printable(value)
                    ),
                ))
            } else {
                None
            };
            if let Some((category, what)) = finding {
                if allow.has(category) {
                    allowed.push(format!("{what} (--allow {category})"));
                } else {
                    problems.push(format!("{what} (--allow {category})"));
                }
            }
        }
    }
}

/// Why a VM agent's connection parameter (`hypervisor`, `remote_uri`, `migrate_uri`) is not a plain
/// connection to QEMU's system driver (or, for `migrate_uri`, a `tcp://` address), if it is not. The agent
/// hands these to libvirt as root: `qemu+ext` runs a program, `?command=`/`?socket=`/`?netcat=`/`?keyfile=`
/// name host programs and files.
pub fn unsafe_connection(name: &str, value: &str) -> Option<String> {
    let value = value.trim();
    if value.is_empty() {
        return None;
    }
    let (scheme, rest) = match value.split_once("://") {
        Some(parts) => parts,
        None if matches!(name, "hypervisor" | "remote_uri" | "migrate_uri") => {
            return Some("not a URI".into());
        }
        None => return None,
    };
    let authority_and_path = rest;
    let has_query = authority_and_path.contains(['?', '#']);
    match name {
        "hypervisor" | "remote_uri" => {
            let transports = [
                "qemu",
                "qemu+tcp",
                "qemu+tls",
                "qemu+ssh",
                "qemu+libssh",
                "qemu+libssh2",
            ];
            if !transports.contains(&scheme) {
                return Some(format!(
                    "libvirt transport {} (allowed: {})",
                    printable(scheme),
                    transports.join(", ")
                ));
            }
            if has_query {
                return Some("a libvirt URI with parameters (they may name host programs or sockets)".into());
            }
            // `%n` stands for the target host in remote_uri.
            let path = authority_and_path
                .find('/')
                .map(|i| &authority_and_path[i..])
                .unwrap_or("");
            if path != "/system" {
                return Some(format!("libvirt driver path {} (only /system)", printable(path)));
            }
            None
        }
        "migrate_uri" => {
            if scheme != "tcp" || has_query || authority_and_path.contains('/') {
                return Some("a migration address other than tcp://HOST[:PORT]".into());
            }
            None
        }
        _ => None,
    }
}

/// The instance and meta attributes of each resource in a translated `<resources>`.
fn attributes(doc: &Document, id: &str) -> (BTreeMap<String, String>, BTreeMap<String, String>) {
    let mut params = BTreeMap::new();
    let mut meta = BTreeMap::new();
    if let Some(r) = doc.descendants().find(|n| {
        n.is_element()
            && matches!(n.tag_name().name(), "primitive" | "group" | "clone")
            && n.attribute("id") == Some(id)
    }) {
        for set in r.children().filter(|s| s.is_element()) {
            let into = match set.tag_name().name() {
                "instance_attributes" => &mut params,
                "meta_attributes" => &mut meta,
                _ => continue,
            };
            for nv in set.children().filter(|n| n.has_tag_name("nvpair")) {
                into.insert(
                    nv.attribute("name").unwrap_or("").to_string(),
                    nv.attribute("value").unwrap_or("").to_string(),
                );
            }
        }
    }
    (params, meta)
}

/// Domain XML with storage paths and network names mapped.
pub fn translate_domain(vm: &str, xml: &str, maps: &Maps, remaps: &mut Vec<Remap>) -> Result<String, VclusterError> {
    let doc = Document::parse(xml).map_err(|e| VclusterError::Archive(format!("domain of {vm}: {e}")))?;
    if !doc.root_element().has_tag_name("domain") {
        return Err(VclusterError::Archive(format!("domain of {vm}: not a <domain>")));
    }
    let mut edits = Vec::new();
    for n in doc.descendants() {
        if n.is_element() {
            for a in n.attributes() {
                let network = n.has_tag_name("source")
                    && n.parent().is_some_and(|p| p.has_tag_name("interface"))
                    && matches!(a.name(), "network" | "bridge");
                let new = if network {
                    maps.networks.get(a.value()).cloned()
                } else {
                    maps.path(a.value())
                };
                if let Some(new) = new {
                    remaps.push(Remap {
                        place: format!("domain {vm} <{} {}>", n.tag_name().name(), a.name()),
                        old: a.value().to_string(),
                        new: new.clone(),
                    });
                    edits.push((a.range_value(), escape(&new)));
                }
            }
        } else if n.is_text() {
            let text = n.text().unwrap_or("");
            if let Some(new) = maps.path(text.trim()) {
                let parent = n.parent().map(|p| p.tag_name().name().to_string()).unwrap_or_default();
                remaps.push(Remap {
                    place: format!("domain {vm} <{parent}>"),
                    old: text.trim().to_string(),
                    new: new.clone(),
                });
                edits.push((n.range(), escape(&new)));
            }
        }
    }
    Ok(splice(xml, edits))
}

/// File-backed disks of a domain: `<disk type='file' device='disk'>` sources.
pub fn domain_disks(xml: &str) -> Result<Vec<String>, VclusterError> {
    let doc = Document::parse(xml).map_err(|e| VclusterError::Archive(format!("domain XML: {e}")))?;
    Ok(doc
        .descendants()
        .filter(|n| {
            n.has_tag_name("disk")
                && n.attribute("type") == Some("file")
                && n.attribute("device").unwrap_or("disk") == "disk"
        })
        .filter_map(|d| d.children().find(|c| c.has_tag_name("source")))
        .filter_map(|s| s.attribute("file").map(str::to_string))
        .collect())
}

/// Builds the plan for instantiating the verified archive on `target` with `maps`. Every problem found is
/// reported at once.
pub fn plan(archive: &Verified, maps: &Maps, target: &Target) -> Result<Plan, VclusterError> {
    let m = &archive.manifest;
    let mut problems = Vec::new();
    let mut remaps = Vec::new();
    let mut warnings = Vec::new();
    let name = maps.name.clone().unwrap_or_else(|| m.name.clone());
    validate_name("virtual cluster name", &name).map_err(|e| VclusterError::Archive(e.to_string()))?;

    // Hosts: every host the archive names must map to a host of the target.
    let resources_text = archive.text(RESOURCES)?;
    let constraints_text = archive.text(CONSTRAINTS)?;
    let rdoc = Document::parse(resources_text).map_err(|e| VclusterError::Archive(format!("{RESOURCES}: {e}")))?;
    let cdoc = Document::parse(constraints_text).map_err(|e| VclusterError::Archive(format!("{CONSTRAINTS}: {e}")))?;
    let tdoc = Document::parse(archive.text(TAG)?).map_err(|e| VclusterError::Archive(format!("{TAG}: {e}")))?;
    let mut allowed = Vec::new();
    check_cluster(
        &rdoc,
        &cdoc,
        &tdoc,
        archive,
        &name,
        &maps.allow,
        &mut problems,
        &mut allowed,
    );
    let roots = Roots {
        dirs: maps.roots(),
        files: Vec::new(),
    };
    if roots.dirs.is_empty() {
        problems.push(
            "no storage directory is mapped: instantiate writes domain definitions and disks, and lets domains \
             use files, only under the storage directories named with --map storage=OLD:NEW (also OLD:OLD)"
                .into(),
        );
    }
    let mut named_hosts: BTreeSet<String> = m.placement.values().cloned().collect();
    for c in cdoc.root_element().children().filter(|n| n.is_element()) {
        named_hosts.extend(constraint_hosts(c));
    }
    let mut host_map = BTreeMap::new();
    let mut unmapped = Vec::new();
    for h in &named_hosts {
        match maps.hosts.get(h) {
            Some(new) if target.hosts.contains(new) => {
                host_map.insert(h.clone(), new.clone());
            }
            Some(new) => problems.push(format!(
                "host map {}:{new}: {new} is not a host of this cluster (hosts: {})",
                printable(h),
                target.hosts.join(", ")
            )),
            None if target.hosts.contains(h) => {
                host_map.insert(h.clone(), h.clone());
            }
            None => unmapped.push(h.clone()),
        }
    }
    if !unmapped.is_empty() {
        problems.push(format!(
            "hosts without a mapping: {} (add --map hosts={}; this cluster's hosts: {})",
            unmapped.iter().map(|h| printable(h)).collect::<Vec<_>>().join(", "),
            unmapped
                .iter()
                .map(|h| format!("{}:NEW", printable(h)))
                .collect::<Vec<_>>()
                .join(","),
            target.hosts.join(", ")
        ));
    }
    for old in maps.hosts.keys() {
        if !named_hosts.contains(old) {
            warnings.push(format!("host map for {old}: the archive does not name that host"));
        }
    }

    // Ids must be free on the target.
    let mut ids: BTreeSet<String> = BTreeSet::new();
    for doc in [&rdoc, &cdoc] {
        for n in doc
            .descendants()
            .filter(|n| n.is_element() && !n.has_tag_name("resource_ref"))
        {
            if let Some(id) = n.attribute("id") {
                ids.insert(id.to_string());
            }
        }
    }
    ids.insert(name.clone());
    let taken: Vec<&String> = ids.iter().filter(|i| target.ids.contains(*i)).collect();
    if !taken.is_empty() {
        problems.push(format!(
            "ids already in use on this cluster: {}",
            taken.iter().map(|s| printable(s)).collect::<Vec<_>>().join(", ")
        ));
    }

    // Resources: params get address, storage and network maps.
    let mut redits = Vec::new();
    let mut resources = Vec::new();
    let mut configs: BTreeMap<String, String> = BTreeMap::new();
    for el in rdoc.root_element().children().filter(|n| n.is_element()) {
        for r in el
            .descendants()
            .filter(|n| matches!(n.tag_name().name(), "primitive" | "group" | "clone" | "bundle"))
        {
            let id = r.attribute("id").unwrap_or("").to_string();
            let ran_on = m.placement.get(&id).cloned();
            resources.push(PlannedResource {
                expected_on: ran_on.as_ref().and_then(|h| host_map.get(h).cloned()),
                ran_on,
                kind: r.tag_name().name().to_string(),
                agent: agent_of(r),
                id,
                params: BTreeMap::new(),
                meta: BTreeMap::new(),
            });
        }
    }
    for nv in rdoc
        .descendants()
        .filter(|n| n.has_tag_name("nvpair") && n.parent().is_some_and(|p| p.has_tag_name("instance_attributes")))
    {
        let (Some(pname), Some(value)) = (nv.attribute("name"), nv.attribute("value")) else {
            continue;
        };
        let owner = element_path(nv);
        let place = format!("resource {owner} param {pname}");
        let mut new = None;
        if pname == "start_networks" {
            let mapped: Vec<String> = value
                .split([' ', ','])
                .filter(|s| !s.is_empty())
                .map(|n| maps.networks.get(n).cloned().unwrap_or_else(|| n.to_string()))
                .collect();
            let joined = mapped.join(" ");
            if joined != value {
                new = Some(joined);
            }
        } else if let Some(p) = maps.path(value) {
            new = Some(p);
        } else {
            let (mapped, left) = maps.addresses_in(value);
            for a in left {
                warnings.push(format!("{place}: address {a} left as is (no address map covers it)"));
            }
            new = mapped;
        }
        if pname == "config" {
            configs.insert(owner.clone(), new.clone().unwrap_or_else(|| value.to_string()));
        }
        if let Some(new) = new {
            let attr = nv.attributes().find(|a| a.name() == "value").map(|a| a.range_value());
            if let Some(range) = attr {
                redits.push((range, escape(&new)));
            }
            remaps.push(Remap {
                place,
                old: value.to_string(),
                new,
            });
        }
    }
    let resources_xml = splice(resources_text, redits);
    let translated =
        Document::parse(&resources_xml).map_err(|e| VclusterError::Archive(format!("translated {RESOURCES}: {e}")))?;
    check_vm_params(&translated, &roots, &maps.allow, &mut problems, &mut allowed);
    for r in &mut resources {
        (r.params, r.meta) = attributes(&translated, &r.id);
    }

    // Constraints: host names.
    let mut cedits = Vec::new();
    let mut constraints = Vec::new();
    for c in cdoc.root_element().children().filter(|n| n.is_element()) {
        constraints.push(c.attribute("id").unwrap_or("").to_string());
        for n in c.descendants() {
            let attr = if n == c {
                n.attributes().find(|a| a.name() == "node")
            } else if n.has_tag_name("expression") && n.attribute("attribute") == Some("#uname") {
                n.attributes().find(|a| a.name() == "value")
            } else {
                None
            };
            if let Some(a) = attr {
                if let Some(new) = host_map.get(a.value()).filter(|new| *new != a.value()) {
                    remaps.push(Remap {
                        place: format!("constraint {} {}", element_path(n), a.name()),
                        old: a.value().to_string(),
                        new: new.clone(),
                    });
                    cedits.push((a.range_value(), escape(new)));
                }
            }
        }
    }
    let constraints_xml = splice(constraints_text, cedits);

    // Disks: written only under a storage root, each to a file of its own.
    let disks: Vec<PlannedDisk> = m
        .disks
        .iter()
        .map(|d| PlannedDisk {
            id: d.id,
            vm: d.vm.clone(),
            from: d.path.clone(),
            to: maps.path(&d.path).unwrap_or_else(|| d.path.clone()),
            size: d.size,
        })
        .collect();
    let mut destinations = BTreeSet::new();
    for d in &disks {
        match roots.contains(&d.to) {
            Some(to) if !destinations.insert(to.clone()) => problems.push(format!(
                "disk {}: {} is the destination of another file too",
                d.id,
                printable(&d.to)
            )),
            Some(_) => {}
            None => problems.push(format!(
                "disk {} of VM {}: its destination {} is outside every storage root (--map storage=OLD:NEW)",
                d.id,
                printable(&d.vm),
                printable(&d.to)
            )),
        }
    }

    // Domains: translated, then checked against the safe subset on their target paths.
    let mut domains = Vec::new();
    for vm in &m.vms {
        let xml = archive.text(&vm.domain_file)?;
        let translated = translate_domain(&vm.resource, xml, maps, &mut remaps)?;
        let Some(path) = configs.get(&vm.resource) else {
            problems.push(format!(
                "VM {} has no config parameter to write its domain to",
                printable(&vm.resource)
            ));
            continue;
        };
        match roots.contains(path) {
            Some(p) if !destinations.insert(p.clone()) => problems.push(format!(
                "VM {}: its domain definition {} is the destination of another file too",
                printable(&vm.resource),
                printable(path)
            )),
            Some(_) => {}
            None => problems.push(format!(
                "VM {}: its domain definition would be written to {}, outside every storage root (--map storage=OLD:NEW)",
                printable(&vm.resource),
                printable(path)
            )),
        }
        let vm_roots = Roots {
            dirs: roots.dirs.clone(),
            files: disks
                .iter()
                .filter(|d| d.vm == vm.resource)
                .map(|d| d.to.clone())
                .collect(),
        };
        let devices = match domain_check::check(&translated, &vm_roots, &maps.allow) {
            Ok(summary) => {
                allowed.extend(
                    summary
                        .allowed
                        .iter()
                        .map(|f| format!("domain {}: {f}", printable(&vm.resource))),
                );
                summary.devices
            }
            Err(e) => {
                problems.push(format!("domain of VM {}: {e}", printable(&vm.resource)));
                Vec::new()
            }
        };
        domains.push(PlannedDomain {
            vm: vm.resource.clone(),
            path: normalise(path).unwrap_or_else(|| path.clone()),
            devices,
            xml: translated,
        });
    }

    if !problems.is_empty() {
        return Err(VclusterError::Plan(problems));
    }
    let members: Vec<String> = rdoc
        .root_element()
        .children()
        .filter(|n| n.is_element())
        .filter_map(|n| n.attribute("id").map(str::to_string))
        .collect();
    let tag = tag_xml(&name, &members);
    if name != m.name {
        remaps.push(Remap {
            place: "tag".into(),
            old: m.name.clone(),
            new: name.clone(),
        });
    }
    let cib_fragment =
        format!("<configuration>\n{resources_xml}{constraints_xml}<tags>{tag}</tags>\n</configuration>\n");
    Document::parse(&cib_fragment).map_err(|e| VclusterError::Archive(format!("translated configuration: {e}")))?;
    Ok(Plan {
        name,
        source_name: m.name.clone(),
        source_cluster: m.source_cluster.clone(),
        created: m.created.clone(),
        signature: archive.signer.clone(),
        resources,
        constraints,
        domains,
        disks,
        remaps,
        warnings,
        allowed,
        hosts: host_map,
        cib_fragment,
    })
}

impl Plan {
    /// The plan as text for people: everything that will be created, every value from the archive
    /// escaped ([`printable`]).
    pub fn text(&self) -> String {
        let p = printable;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "virtual cluster {} (captured as {} on {} at {})",
            p(&self.name),
            p(&self.source_name),
            p(self.source_cluster.as_deref().unwrap_or("?")),
            p(&self.created)
        );
        let _ = writeln!(
            s,
            "archive: {}",
            crate::signature::Signer::text(self.signature.as_ref())
        );
        let _ = writeln!(s, "hosts:");
        for (a, b) in &self.hosts {
            let _ = writeln!(s, "  {} -> {}", p(a), p(b));
        }
        let _ = writeln!(s, "resources:");
        for r in &self.resources {
            let _ = write!(s, "  {} {} {}", p(&r.kind), p(&r.id), p(&r.agent));
            if let (Some(a), Some(b)) = (&r.ran_on, &r.expected_on) {
                let _ = write!(s, " (ran on {}, its counterpart here is {})", p(a), p(b));
            }
            s.push('\n');
            for (k, v) in &r.params {
                let _ = writeln!(s, "    param {}={}", p(k), p(v));
            }
            for (k, v) in &r.meta {
                let _ = writeln!(s, "    meta {}={}", p(k), p(v));
            }
        }
        let _ = writeln!(
            s,
            "constraints: {}",
            self.constraints.iter().map(|c| p(c)).collect::<Vec<_>>().join(", ")
        );
        let _ = writeln!(s, "domain definitions:");
        for d in &self.domains {
            let _ = writeln!(s, "  {} -> {}", p(&d.vm), p(&d.path));
            for dev in &d.devices {
                let _ = writeln!(s, "    {}", p(dev));
            }
        }
        if !self.disks.is_empty() {
            let _ = writeln!(s, "disks:");
            for d in &self.disks {
                let _ = writeln!(s, "  {} {} -> {} ({} bytes)", p(&d.vm), p(&d.from), p(&d.to), d.size);
            }
        }
        let _ = writeln!(s, "remapped values:");
        for r in &self.remaps {
            let _ = writeln!(s, "  {}: {} -> {}", p(&r.place), p(&r.old), p(&r.new));
        }
        if !self.allowed.is_empty() {
            let _ = writeln!(s, "ALLOWED beyond the safe subset (by --allow/--allow-agent):");
            for a in &self.allowed {
                let _ = writeln!(s, "  {}", p(a));
            }
        }
        for w in &self.warnings {
            let _ = writeln!(s, "warning: {}", p(w));
        }
        s
    }
}

#[cfg(test)]
mod tests;
