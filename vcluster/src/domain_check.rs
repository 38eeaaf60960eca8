//! The safe subset of libvirt domain XML an archive may bring: a domain from an archive is untrusted
//! input that libvirtd, running as root, turns into a QEMU process. [`check`] parses it (roxmltree, no DTD)
//! and refuses, naming the element, whatever would reach outside the guest: elements of the QEMU
//! namespace (`qemu:commandline`, `qemu:capabilities`, found by namespace URI, not by prefix) or any other
//! namespace outside `<metadata>`, security label overrides, host device passthrough, host block, network
//! and directory disks, character devices and interfaces on host devices, host scripts, file system
//! passthrough, an emulator that is not one of the host's QEMU binaries, and every file path (disk
//! sources, kernel, initrd, loader, nvram, logs, sockets, ...) that does not normalise to a place under a
//! storage root. Each category can be allowed by the operator ([`Allow`]); what was allowed is reported
//! so that the plan shows it. Pure: the caller passes the roots (the target sides of `--map storage=`).

use std::collections::BTreeSet;
use std::fmt::Write as _;

use roxmltree::{Document, Node};
use serde::Serialize;

use crate::printable;

/// libvirt's QEMU namespace (`qemu:commandline`, `qemu:capabilities`, `qemu:override`, ...).
pub const QEMU_NS: &str = "http://libvirt.org/schemas/domain/qemu/1.0";

/// Resource agents a capture of VMs and their addresses produces: allowed without an option.
pub const DEFAULT_AGENTS: [&str; 3] = [
    "ocf:vmha:VirtualMachine",
    "ocf:heartbeat:VirtualDomain",
    "ocf:heartbeat:IPaddr2",
];

/// Directories whose firmware a `<loader>` or an `<nvram template>` may name (read-only, shipped by the
/// distribution's firmware packages).
const FIRMWARE_DIRS: [&str; 6] = [
    "/usr/share/OVMF",
    "/usr/share/AAVMF",
    "/usr/share/edk2",
    "/usr/share/qemu",
    "/usr/share/seabios",
    "/usr/share/ovmf",
];

/// libvirt's own directory for QEMU logs: a `<log file>` may name a plain file in it.
const LIBVIRT_LOG_DIR: &str = "/var/log/libvirt/qemu";

/// A kind of risky content the operator can allow with `--allow NAME`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Category {
    /// Elements or attributes of the QEMU namespace (raw QEMU arguments, capabilities) or of any other
    /// namespace outside `<metadata>`.
    QemuArgs,
    /// `<seclabel>` other than a dynamic default: static labels, `type='none'`, `relabel='no'`, device
    /// level labels.
    Seclabel,
    /// `<hostdev>`, `<interface type='hostdev'>`: host PCI/USB/SCSI devices handed to the guest.
    Hostdev,
    /// Host block devices, directories, volumes and network disks; character devices, interfaces, input,
    /// TPM, smartcard and RNG backends on host devices or sockets.
    HostDevices,
    /// `<filesystem>`: host directories shared with the guest.
    Filesystem,
    /// Files outside every storage root (disk images, kernel, initrd, loader, nvram, logs, sockets, ...).
    HostPaths,
    /// An `<emulator>` other than the host's own QEMU binaries.
    Emulator,
    /// Host scripts run as root: `<script>` of an interface, a VM agent's `monitor_scripts`.
    Scripts,
    /// A VM agent's libvirt or migration URIs (`hypervisor`, `remote_uri`, `migrate_uri`) other than
    /// QEMU's system driver over the plain, TLS or SSH transports and a `tcp://` migration address: other
    /// transports run programs (`qemu+ext`, `?command=`) or reach sockets of the host's choosing.
    Connections,
}

impl Category {
    pub const ALL: [Category; 9] = [
        Category::QemuArgs,
        Category::Seclabel,
        Category::Hostdev,
        Category::HostDevices,
        Category::Filesystem,
        Category::HostPaths,
        Category::Emulator,
        Category::Scripts,
        Category::Connections,
    ];

    /// The name `--allow` takes.
    pub fn name(self) -> &'static str {
        match self {
            Category::QemuArgs => "qemu-args",
            Category::Seclabel => "seclabel",
            Category::Hostdev => "hostdev",
            Category::HostDevices => "host-devices",
            Category::Filesystem => "filesystem",
            Category::HostPaths => "host-paths",
            Category::Emulator => "emulator",
            Category::Scripts => "scripts",
            Category::Connections => "connections",
        }
    }

    pub fn parse(name: &str) -> Option<Category> {
        Category::ALL.into_iter().find(|c| c.name() == name)
    }
}

impl std::fmt::Display for Category {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What the operator allowed beyond the safe subset: categories (`--allow`) and resource agents
/// (`--allow-agent`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Allow {
    pub categories: BTreeSet<Category>,
    /// `class:provider:type` (or `class:type`) of agents allowed besides [`DEFAULT_AGENTS`].
    pub agents: BTreeSet<String>,
}

impl Allow {
    /// Parses option values: `qemu-args,seclabel` (categories) and `agent=ocf:heartbeat:anything` (an
    /// agent), as the D-Bus call carries them.
    pub fn parse(items: &[String]) -> Result<Allow, String> {
        let mut allow = Allow::default();
        for item in items {
            if let Some(agent) = item.strip_prefix("agent=") {
                let parts: Vec<&str> = agent.split(':').collect();
                let ok = (2..=3).contains(&parts.len())
                    && parts
                        .iter()
                        .all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)));
                if !ok {
                    return Err(format!(
                        "--allow-agent {:?}: expected CLASS:PROVIDER:TYPE (e.g. ocf:heartbeat:anything)",
                        printable(agent)
                    ));
                }
                allow.agents.insert(agent.to_string());
                continue;
            }
            for name in item.split(',').filter(|s| !s.is_empty()) {
                let c = Category::parse(name).ok_or_else(|| {
                    format!(
                        "--allow {:?}: unknown category (one of: {})",
                        printable(name),
                        Category::ALL.map(Category::name).join(", ")
                    )
                })?;
                allow.categories.insert(c);
            }
        }
        Ok(allow)
    }

    /// The option values that [`Allow::parse`] reads back.
    pub fn to_items(&self) -> Vec<String> {
        let mut items: Vec<String> = self.categories.iter().map(|c| c.name().to_string()).collect();
        items.extend(self.agents.iter().map(|a| format!("agent={a}")));
        items
    }

    pub fn has(&self, c: Category) -> bool {
        self.categories.contains(&c)
    }

    /// Whether an agent may be created: one of [`DEFAULT_AGENTS`] or allowed.
    pub fn agent(&self, agent: &str) -> bool {
        DEFAULT_AGENTS.contains(&agent) || self.agents.contains(agent)
    }
}

/// Where the files of a domain may be: under one of `dirs` (the storage roots), or one of `files` (the
/// disks the archive carries).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Roots {
    pub dirs: Vec<String>,
    pub files: Vec<String>,
}

impl Roots {
    /// Whether `path` normalises to a place under a root (or is a carried disk); the normal form.
    pub fn contains(&self, path: &str) -> Option<String> {
        let p = normalise(path)?;
        let inside = self.dirs.iter().filter_map(|d| normalise(d)).any(|d| under(&p, &d))
            || self.files.iter().filter_map(|f| normalise(f)).any(|f| f == p);
        inside.then_some(p)
    }
}

/// `path` in normal form: absolute, `.` and empty components dropped; `None` for a relative path, one
/// holding `..` (refused rather than resolved: the directories on the way may be links) or control
/// characters.
pub fn normalise(path: &str) -> Option<String> {
    if !path.starts_with('/') || path.chars().any(char::is_control) {
        return None;
    }
    let mut out = String::new();
    for c in path.split('/') {
        match c {
            "" | "." => {}
            ".." => return None,
            c => {
                out.push('/');
                out.push_str(c);
            }
        }
    }
    if out.is_empty() {
        out.push('/');
    }
    Some(out)
}

/// Whether normalised `path` is `dir` or below it (whole components).
pub fn under(path: &str, dir: &str) -> bool {
    dir == "/" || path == dir || path.strip_prefix(dir).is_some_and(|rest| rest.starts_with('/'))
}

/// One risky item: its category and the element, printable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    pub category: Category,
    /// The element as `<disk type='block'>`, with where it is.
    pub element: String,
    /// Why it is risky.
    pub why: String,
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {} (--allow {})", self.element, self.why, self.category)
    }
}

/// What a domain will have: its devices and boot files (printable, one line each) and the risky items
/// the operator allowed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct DomainSummary {
    pub devices: Vec<String>,
    pub allowed: Vec<Finding>,
}

/// Why a domain was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DomainCheckError {
    #[error("domain XML: {0}")]
    Xml(String),
    #[error("domain XML refused: {}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Refused(Vec<Finding>),
}

/// An element as `<name a='v' ...>` (printable, at most 160 characters), with its parent's name.
fn describe(n: Node) -> String {
    let mut s = String::from("<");
    if let Some(ns) = n.tag_name().namespace() {
        let prefix = n.lookup_prefix(ns).unwrap_or("?");
        let _ = write!(s, "{prefix}:");
    }
    s.push_str(n.tag_name().name());
    for a in n.attributes() {
        let _ = write!(s, " {}='{}'", a.name(), a.value());
    }
    s.push('>');
    let mut s = printable(&s);
    if s.chars().count() > 160 {
        s = s.chars().take(157).collect::<String>() + "...";
    }
    match n
        .parent_element()
        .filter(|p| !p.has_tag_name("devices") && !p.has_tag_name("domain"))
    {
        Some(p) => format!("{s} in <{}>", printable(p.tag_name().name())),
        None => s,
    }
}

struct Checker<'r> {
    roots: &'r Roots,
    found: Vec<Finding>,
    devices: Vec<String>,
    /// vmha's guest channel socket of this domain (the one path outside storage a `<source path>` may
    /// name: vmhad connects to it).
    guest_socket: Option<String>,
}

impl Checker<'_> {
    fn flag(&mut self, category: Category, n: Node, why: impl Into<String>) {
        self.found.push(Finding {
            category,
            element: describe(n),
            why: why.into(),
        });
    }

    /// A path `n` names (in attribute `what` or its text): under a root, or in one of `extra` dirs.
    fn path(&mut self, n: Node, what: &str, value: &str, extra: &[&str]) {
        if self.roots.contains(value).is_some() {
            return;
        }
        if let Some(p) = normalise(value) {
            if extra.iter().any(|d| under(&p, d)) {
                return;
            }
        }
        let why = match normalise(value) {
            None => format!("{what} {:?} is not an absolute path without '..'", printable(value)),
            Some(_) => format!("{what} {} is outside every storage root", printable(value)),
        };
        self.flag(Category::HostPaths, n, why);
    }
}

fn in_metadata(n: Node) -> bool {
    n.ancestors()
        .any(|a| a.has_tag_name("metadata") && a.tag_name().namespace().is_none())
}

/// Whether `path` is one of the host's QEMU binaries by name.
fn host_emulator(path: &str) -> bool {
    let Some(p) = normalise(path) else {
        return false;
    };
    let (dir, file) = p.rsplit_once('/').unwrap_or(("", &p));
    matches!(dir, "/usr/bin" | "/usr/libexec" | "/usr/local/bin")
        && (file == "qemu-kvm"
            || file == "kvm"
            || file
                .strip_prefix("qemu-system-")
                .is_some_and(|arch| !arch.is_empty() && arch.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')))
}

/// The devices line of an element: its name, type, and the sources and targets below it.
fn device_line(n: Node) -> String {
    let mut s = n.tag_name().name().to_string();
    for a in ["type", "device", "model"] {
        if let Some(v) = n.attribute(a) {
            let _ = write!(s, " {a}={v}");
        }
    }
    for d in n.descendants().filter(|d| d.is_element() && *d != n) {
        for a in d.attributes() {
            if matches!(
                a.name(),
                "file"
                    | "path"
                    | "dir"
                    | "dev"
                    | "network"
                    | "bridge"
                    | "socket"
                    | "name"
                    | "protocol"
                    | "mode"
                    | "address"
            ) && !(d.has_tag_name("driver") && a.name() == "name")
            {
                let _ = write!(s, " {}.{}={}", d.tag_name().name(), a.name(), a.value());
            }
        }
    }
    if let Some(t) = n.text().map(str::trim).filter(|t| !t.is_empty()) {
        let _ = write!(s, " {t}");
    }
    printable(&s)
}

/// Character device types whose other end stays inside QEMU/libvirt (a `unix` or `file` path is checked
/// as a path).
const SAFE_CHAR_TYPES: [&str; 9] = [
    "pty",
    "unix",
    "file",
    "null",
    "vc",
    "spicevmc",
    "spiceport",
    "qemu-vdagent",
    "dbus",
];

/// Attributes that name host files (checked against the roots wherever they appear).
const PATH_ATTRIBUTES: [&str; 6] = ["file", "path", "dir", "socket", "evdev", "logFile"];

/// Checks domain XML (as it will be defined, with target paths) against the safe subset: `Ok` with what
/// the domain has and the risky items `allow` let through, or every refused item at once.
pub fn check(xml: &str, roots: &Roots, allow: &Allow) -> Result<DomainSummary, DomainCheckError> {
    let doc = Document::parse(xml).map_err(|e| DomainCheckError::Xml(e.to_string()))?;
    let root = doc.root_element();
    if !root.has_tag_name("domain") || root.tag_name().namespace().is_some() {
        return Err(DomainCheckError::Xml(format!(
            "the root element is <{}>, not <domain>",
            printable(root.tag_name().name())
        )));
    }
    let name = root
        .children()
        .find(|n| n.has_tag_name("name"))
        .and_then(|n| n.text())
        .map(str::trim)
        .filter(|n| vmha_model::guest::valid_name(n));
    let mut c = Checker {
        roots,
        found: Vec::new(),
        devices: Vec::new(),
        guest_socket: name.map(vmha_model::guest::channel_socket),
    };
    for n in root.descendants().filter(|n| n.is_element()) {
        if in_metadata(n) {
            continue;
        }
        if let Some(ns) = n.tag_name().namespace() {
            let why = if ns == QEMU_NS {
                "QEMU namespace: raw QEMU arguments, capabilities or overrides".to_string()
            } else {
                format!("element of namespace {} outside <metadata>", printable(ns))
            };
            c.flag(Category::QemuArgs, n, why);
            continue;
        }
        if let Some(a) = n.attributes().find(|a| a.namespace().is_some()) {
            let why = format!(
                "attribute {} of namespace {}",
                printable(a.name()),
                printable(a.namespace().unwrap_or(""))
            );
            c.flag(Category::QemuArgs, n, why);
        }
        let kind = n.attribute("type").unwrap_or("");
        let parent = n.parent_element().map(|p| p.tag_name().name()).unwrap_or("");
        match n.tag_name().name() {
            "seclabel" => {
                let default = n.parent_element() == Some(root)
                    && n.attribute("type").is_none_or(|t| t == "dynamic")
                    && n.attribute("relabel").is_none_or(|r| r == "yes")
                    && !n
                        .children()
                        .any(|k| k.has_tag_name("baselabel") || k.has_tag_name("label"));
                if !default {
                    c.flag(Category::Seclabel, n, "security label override");
                }
            }
            "hostdev" => c.flag(Category::Hostdev, n, "host device passthrough"),
            "filesystem" => c.flag(Category::Filesystem, n, "host directory passthrough"),
            "script" => c.flag(Category::Scripts, n, "a host script libvirt runs as root"),
            "emulator" => {
                let path = n.text().unwrap_or("").trim();
                if !host_emulator(path) {
                    c.flag(
                        Category::Emulator,
                        n,
                        format!(
                            "{} is not one of the host's QEMU binaries (/usr/bin/qemu-system-*, /usr/libexec/qemu-kvm)",
                            printable(path)
                        ),
                    );
                }
                c.devices.push(format!("emulator {}", printable(path)));
            }
            "kernel" | "initrd" | "dtb" | "nvram" | "table" | "path" => {
                let text = n.text().unwrap_or("").trim();
                if !text.is_empty() {
                    c.path(n, n.tag_name().name(), text, &[]);
                }
                if n.tag_name().name() == "nvram" {
                    if let Some(t) = n.attribute("template") {
                        c.path(n, "nvram template", t, &FIRMWARE_DIRS);
                    }
                }
                if parent == "os" && !text.is_empty() {
                    c.devices.push(format!("{} {}", n.tag_name().name(), printable(text)));
                }
            }
            "loader" => {
                let text = n.text().unwrap_or("").trim();
                if !text.is_empty() {
                    c.path(n, "loader", text, &FIRMWARE_DIRS);
                    c.devices.push(format!("loader {}", printable(text)));
                }
            }
            // libvirt's default disk type is file.
            "disk" if !matches!(kind, "" | "file") => c.flag(
                Category::HostDevices,
                n,
                format!("a {} disk reaches host storage directly", printable(kind)),
            ),
            "interface" => match kind {
                "network" | "bridge" | "user" => {}
                // A tap device libvirt creates for this guest (what the lab's VMs and their clones have);
                // an existing host device (`<target managed='no'>`) reaches beyond the guest.
                "ethernet"
                    if !n
                        .children()
                        .any(|t| t.has_tag_name("target") && t.attribute("managed") == Some("no")) => {}
                "hostdev" => c.flag(Category::Hostdev, n, "host network device passthrough"),
                _ => c.flag(
                    Category::HostDevices,
                    n,
                    format!("a {} interface works on host devices or sockets", printable(kind)),
                ),
            },
            "serial" | "console" | "channel" | "parallel"
                if parent == "devices" && !SAFE_CHAR_TYPES.contains(&kind) =>
            {
                c.flag(
                    Category::HostDevices,
                    n,
                    format!("a {} character device reaches the host", printable(kind)),
                )
            }
            "smartcard" if n.attribute("mode") != Some("emulated") => {
                c.flag(Category::HostDevices, n, "a smartcard on the host's reader")
            }
            "input" if matches!(kind, "passthrough" | "evdev") => {
                c.flag(Category::HostDevices, n, "a host input device")
            }
            "redirdev" if kind != "spicevmc" => c.flag(Category::HostDevices, n, "USB redirection from a host socket"),
            "shmem" => c.flag(Category::HostDevices, n, "host shared memory"),
            "backend" if parent == "tpm" && kind == "passthrough" => c.flag(Category::HostDevices, n, "the host's TPM"),
            "backend" if parent == "rng" => {
                let dev = n.text().unwrap_or("").trim();
                let ok = n.attribute("model").is_none_or(|m| m == "random")
                    && (dev.is_empty() || matches!(dev, "/dev/urandom" | "/dev/random" | "/dev/hwrng"));
                if !ok {
                    c.flag(Category::HostDevices, n, "an RNG backend on a host device or socket");
                }
            }
            _ => {}
        }
        if parent == "devices" && n.tag_name().name() != "emulator" {
            c.devices.push(device_line(n));
        }
        for a in n.attributes() {
            if !PATH_ATTRIBUTES.contains(&a.name()) {
                continue;
            }
            // A log in libvirt's own log directory (a plain file name there).
            let libvirt_log = n.has_tag_name("log")
                && a.name() == "file"
                && normalise(a.value()).is_some_and(|p| p.rsplit_once('/').is_some_and(|(d, _)| d == LIBVIRT_LOG_DIR));
            // vmha's own guest channel (a unix channel to org.vmha.guest.0 on this domain's socket).
            let guest_channel = n.has_tag_name("source")
                && a.name() == "path"
                && c.guest_socket.as_deref() == Some(a.value())
                && n.parent_element().is_some_and(|ch| {
                    ch.has_tag_name("channel")
                        && ch.attribute("type") == Some("unix")
                        && ch.children().any(|t| {
                            t.has_tag_name("target") && t.attribute("name") == Some(vmha_model::guest::PORT_NAME)
                        })
                });
            if !libvirt_log && !guest_channel {
                c.path(n, a.name(), a.value(), &[]);
            }
        }
        if n.has_tag_name("source") {
            if let Some(dev) = n.attribute("dev") {
                if !n.parent_element().is_some_and(|p| {
                    (p.has_tag_name("disk") && p.attribute("type") == Some("block")) || p.has_tag_name("interface")
                }) {
                    c.flag(Category::HostDevices, n, format!("host device {}", printable(dev)));
                }
            }
        }
    }
    let (allowed, refused): (Vec<Finding>, Vec<Finding>) = c.found.into_iter().partition(|f| allow.has(f.category));
    if !refused.is_empty() {
        return Err(DomainCheckError::Refused(refused));
    }
    Ok(DomainSummary {
        devices: c.devices,
        allowed,
    })
}

#[cfg(test)]
mod tests;
