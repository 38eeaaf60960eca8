//! Live clone, the pure part: libvirt's QEMU save-image header (the memory state of a live external
//! snapshot is one), the clone's new identity in its domain XML, and the clone's cluster resource copied
//! from the template's.
//!
//! A clone is made from the template's memory state (written by libvirt while the template keeps running)
//! and a copy-on-write overlay on the template's frozen disk layer. libvirt refuses to restore a save image
//! under another UUID (its ABI check), so vmha writes a new header carrying the clone's domain XML in front
//! of the untouched QEMU migration stream and restores that: the guest resumes where the template was, as a
//! new domain with its own name, UUID, MAC addresses, VM generation id, disk overlay and guest channel.

use std::ops::Range;

use crate::change::escape;
use crate::guest::channel_socket;
use crate::ModelError;

/// Magic of a complete libvirt QEMU save image.
pub const SAVE_MAGIC: &[u8; 16] = b"LibvirtQemudSave";
/// Magic of an image libvirt did not finish writing.
pub const SAVE_PARTIAL: &[u8; 16] = b"LibvirtQemudPart";
/// Length of the fixed header: magic, then 19 native-endian u32 (version, data_len, was_running,
/// compressed, cookie offset, 14 unused).
pub const HEADER_LEN: usize = 16 + 19 * 4;
/// The header version vmha understands (libvirt 6 to 10 write 2).
pub const SAVE_VERSION: u32 = 2;
/// Largest XML-plus-cookie area vmha accepts.
pub const MAX_DATA_LEN: u32 = 16 << 20;

/// Errors of the clone model.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CloneError {
    #[error("not a libvirt QEMU save image")]
    NotSaveImage,
    #[error("the save image is incomplete (libvirt did not finish writing it)")]
    Partial,
    #[error("save image version {0} is not supported (vmha reads version {SAVE_VERSION})")]
    Version(u32),
    #[error("save image header: {0}")]
    Header(String),
    #[error("domain XML: {0}")]
    Xml(String),
    #[error("CIB: {0}")]
    Cib(String),
}

impl From<roxmltree::Error> for CloneError {
    fn from(e: roxmltree::Error) -> Self {
        CloneError::Xml(e.to_string())
    }
}

impl From<ModelError> for CloneError {
    fn from(e: ModelError) -> Self {
        CloneError::Cib(e.to_string())
    }
}

/// A parsed save-image header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SaveImage {
    pub was_running: u32,
    pub compressed: u32,
    /// The domain XML libvirt recorded.
    pub xml: String,
    /// The save cookie (CPU definition and such), without its NUL, if any.
    pub cookie: Option<Vec<u8>>,
    /// Where the QEMU migration stream starts in the file.
    pub stream_offset: u64,
}

fn u32_at(buf: &[u8], index: usize) -> u32 {
    let at = 16 + index * 4;
    u32::from_ne_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]])
}

/// How many bytes [`parse_save_image`] needs: the fixed header, then (once that is read) its data area.
pub fn save_image_len(head: &[u8]) -> Result<usize, CloneError> {
    if head.len() < HEADER_LEN {
        return Err(CloneError::Header(format!("shorter than {HEADER_LEN} bytes")));
    }
    check_magic(head)?;
    let data_len = u32_at(head, 1);
    if data_len > MAX_DATA_LEN {
        return Err(CloneError::Header(format!(
            "data area of {data_len} bytes is too large"
        )));
    }
    Ok(HEADER_LEN + data_len as usize)
}

fn check_magic(buf: &[u8]) -> Result<(), CloneError> {
    match &buf[..16] {
        m if m == SAVE_MAGIC => Ok(()),
        m if m == SAVE_PARTIAL => Err(CloneError::Partial),
        _ => Err(CloneError::NotSaveImage),
    }
}

/// Parses the header and data area at the start of a save image (`buf` holds at least
/// [`save_image_len`] bytes).
pub fn parse_save_image(buf: &[u8]) -> Result<SaveImage, CloneError> {
    let total = save_image_len(buf)?;
    if buf.len() < total {
        return Err(CloneError::Header("truncated data area".into()));
    }
    let version = u32_at(buf, 0);
    if version != SAVE_VERSION {
        return Err(CloneError::Version(version));
    }
    let data = &buf[HEADER_LEN..total];
    let xml_end = data
        .iter()
        .position(|&b| b == 0)
        .ok_or_else(|| CloneError::Header("the domain XML is not NUL-terminated".into()))?;
    let xml = std::str::from_utf8(&data[..xml_end])
        .map_err(|_| CloneError::Header("the domain XML is not UTF-8".into()))?
        .to_string();
    let cookie_offset = u32_at(buf, 4) as usize;
    let cookie = if cookie_offset == 0 {
        None
    } else {
        if cookie_offset <= xml_end || cookie_offset >= data.len() {
            return Err(CloneError::Header(format!(
                "cookie offset {cookie_offset} is out of range"
            )));
        }
        let rest = &data[cookie_offset..];
        let end = rest
            .iter()
            .position(|&b| b == 0)
            .ok_or_else(|| CloneError::Header("the cookie is not NUL-terminated".into()))?;
        Some(rest[..end].to_vec())
    };
    Ok(SaveImage {
        was_running: u32_at(buf, 2),
        compressed: u32_at(buf, 3),
        xml,
        cookie,
        stream_offset: total as u64,
    })
}

/// The header and data area of a save image that carries `xml` in place of `image.xml`; the QEMU stream
/// (from `image.stream_offset` of the original) follows it unchanged. Padded to a 4 KiB boundary.
pub fn write_save_header(image: &SaveImage, xml: &str) -> Vec<u8> {
    let mut data = Vec::with_capacity(xml.len() + 4096);
    data.extend_from_slice(xml.as_bytes());
    data.push(0);
    let cookie_offset = match &image.cookie {
        Some(c) => {
            let at = data.len();
            data.extend_from_slice(c);
            data.push(0);
            at
        }
        None => 0,
    };
    let unpadded = HEADER_LEN + data.len();
    data.resize(data.len() + (4096 - unpadded % 4096) % 4096, 0);
    let mut out = Vec::with_capacity(HEADER_LEN + data.len());
    out.extend_from_slice(SAVE_MAGIC);
    let fields = [
        SAVE_VERSION,
        u32::try_from(data.len()).unwrap_or(u32::MAX),
        image.was_running,
        image.compressed,
        u32::try_from(cookie_offset).unwrap_or(u32::MAX),
    ];
    for f in fields.iter().chain([0u32; 14].iter()) {
        out.extend_from_slice(&f.to_ne_bytes());
    }
    out.extend_from_slice(&data);
    out
}

/// The backing file named in a qcow2 image's header (`head`: the image's first bytes, enough to hold the
/// name; 64 KiB always is), or `None` for an image without one or data that is not qcow2.
pub fn qcow2_backing(head: &[u8]) -> Option<String> {
    if head.len() < 20 || &head[..4] != b"QFI\xfb" {
        return None;
    }
    let offset = u64::from_be_bytes(head[8..16].try_into().ok()?);
    let size = u32::from_be_bytes(head[16..20].try_into().ok()?);
    if offset == 0 || size == 0 || size > 1023 {
        return None;
    }
    let start = usize::try_from(offset).ok()?;
    let name = head.get(start..start.checked_add(size as usize)?)?;
    String::from_utf8(name.to_vec()).ok()
}

/// Whether `file` (a base name) is a disk layer vmha made for `template` in a live clone:
/// `<template>.<stamp>.<dev>.qcow2`, the overlay the template moved to, which a later clone froze.
pub fn is_clone_layer(template: &str, file: &str) -> bool {
    let Some(rest) = file.strip_prefix(&format!("{template}.")) else {
        return false;
    };
    let Some(rest) = rest.strip_suffix(".qcow2") else {
        return false;
    };
    match rest.split_once('.') {
        Some((stamp, dev)) => {
            !stamp.is_empty() && stamp.bytes().all(|b| b.is_ascii_digit()) && !dev.is_empty() && !dev.contains('/')
        }
        None => false,
    }
}

/// How to shorten a template's disk chain (`chain[0]` its active layer): pull every layer vmha made in
/// earlier clones ([`is_clone_layer`]) that lies right below the active one into it, onto the first layer
/// vmha did not make (`base`; `None`: onto nothing, the whole chain). `dropped` are the layers that leave
/// the chain. `None` when the active layer already sits on a layer vmha did not make.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Compaction {
    pub base: Option<String>,
    pub dropped: Vec<String>,
}

pub fn compaction(template: &str, chain: &[String]) -> Option<Compaction> {
    let name = |p: &str| p.rsplit('/').next().unwrap_or(p).to_string();
    let keep = chain
        .iter()
        .enumerate()
        .skip(1)
        .find(|(_, layer)| !is_clone_layer(template, &name(layer)))
        .map(|(i, _)| i);
    match keep {
        Some(1) => None,
        Some(i) => Some(Compaction {
            base: Some(chain[i].clone()),
            dropped: chain[1..i].to_vec(),
        }),
        None if chain.len() > 1 => Some(Compaction {
            base: None,
            dropped: chain[1..].to_vec(),
        }),
        None => None,
    }
}

/// XML namespace of the `<vmha:clone template=.../>` mark vmha puts in a clone's domain metadata.
pub const CLONE_NS: &str = "https://vmha.dev/xmlns/clone/1";

/// The template a domain was cloned from, when its XML carries vmha's clone mark.
pub fn clone_of(xml: &str) -> Option<String> {
    let doc = roxmltree::Document::parse(xml).ok()?;
    doc.descendants()
        .find(|n| n.tag_name().namespace() == Some(CLONE_NS) && n.tag_name().name() == "clone")
        .and_then(|n| n.attribute("template").map(str::to_string))
}

/// Who the clone is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloneIdentity {
    pub template: String,
    pub name: String,
    pub uuid: String,
    /// New VM generation id (used only where the template has a `<genid>`).
    pub genid: String,
    /// New MAC addresses, one per `<interface>` in document order (missing ones keep nothing: an error).
    pub macs: Vec<String>,
    /// Disk image paths: template's path -> clone's path. Every writable file disk must be mapped.
    pub disks: Vec<(String, String)>,
}

/// A UUID (version 4 layout) from 16 random bytes.
pub fn uuid_from(mut b: [u8; 16]) -> String {
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!("{}-{}-{}-{}-{}", &h[..8], &h[8..12], &h[12..16], &h[16..20], &h[20..])
}

/// A locally administered MAC address in QEMU's 52:54:00 range from 3 random bytes.
pub fn mac_from(b: [u8; 3]) -> String {
    format!("52:54:00:{:02x}:{:02x}:{:02x}", b[0], b[1], b[2])
}

/// Names for `count` clones of `template`: `name` itself for one clone, else `name-1` ... `name-N`
/// (`name` defaults to `<template>-clone`).
pub fn clone_names(template: &str, name: Option<&str>, count: u32) -> Vec<String> {
    let base = name.map_or_else(|| format!("{template}-clone"), str::to_string);
    if count <= 1 {
        vec![base]
    } else {
        (1..=count).map(|i| format!("{base}-{i}")).collect()
    }
}

/// The writable file-backed disks of a domain: (target dev, source file), in document order.
pub fn writable_disks(xml: &str) -> Result<Vec<(String, String)>, CloneError> {
    let doc = roxmltree::Document::parse(xml)?;
    let mut out = Vec::new();
    for disk in doc.descendants().filter(|n| n.has_tag_name("disk")) {
        if disk.attribute("device").unwrap_or("disk") != "disk" || child(disk, "readonly").is_some() {
            continue;
        }
        let Some(file) = child(disk, "source").and_then(|s| s.attribute("file")) else {
            if disk.attribute("type") == Some("file") {
                return Err(CloneError::Xml("a file disk without a source file".into()));
            }
            return Err(CloneError::Xml(format!(
                "disk of type {:?} cannot be cloned (only file disks on shared storage)",
                disk.attribute("type").unwrap_or("?")
            )));
        };
        let dev = child(disk, "target").and_then(|t| t.attribute("dev")).unwrap_or("?");
        out.push((dev.to_string(), file.to_string()));
    }
    Ok(out)
}

fn child<'a, 'i>(node: roxmltree::Node<'a, 'i>, tag: &str) -> Option<roxmltree::Node<'a, 'i>> {
    node.children().find(|c| c.has_tag_name(tag))
}

/// Text edits applied back to front.
#[derive(Default)]
struct Edits(Vec<(Range<usize>, String)>);

impl Edits {
    fn replace(&mut self, range: Range<usize>, with: impl Into<String>) {
        self.0.push((range, with.into()));
    }

    fn apply(mut self, text: &str) -> String {
        self.0.sort_by_key(|(r, _)| std::cmp::Reverse(r.start));
        let mut out = text.to_string();
        for (r, with) in self.0 {
            out.replace_range(r, &with);
        }
        out
    }
}

fn text_range(node: roxmltree::Node) -> Option<Range<usize>> {
    node.first_child().filter(|c| c.is_text()).map(|c| c.range())
}

/// The template's domain XML (persistent or from a save image) with the clone's identity: name, UUID,
/// VM generation id, MAC addresses, disk paths, vmha guest channel socket and console log; runtime-only
/// details (aliases, tap names, disk backing chains) are dropped so libvirt assigns its own.
pub fn clone_domain_xml(xml: &str, id: &CloneIdentity) -> Result<String, CloneError> {
    let doc = roxmltree::Document::parse(xml)?;
    let root = doc.root_element();
    if !root.has_tag_name("domain") {
        return Err(CloneError::Xml("the root element is not <domain>".into()));
    }
    let mut edits = Edits::default();
    let name = child(root, "name").ok_or_else(|| CloneError::Xml("no <name>".into()))?;
    if name.text() != Some(id.template.as_str()) {
        return Err(CloneError::Xml(format!(
            "the domain is {:?}, not the template {:?}",
            name.text().unwrap_or(""),
            id.template
        )));
    }
    edits.replace(text_range(name).unwrap_or(name.range()), escape(&id.name));
    match child(root, "uuid") {
        Some(u) => edits.replace(u.range(), format!("<uuid>{}</uuid>", id.uuid)),
        None => edits.replace(name.range().end..name.range().end, format!("<uuid>{}</uuid>", id.uuid)),
    }
    let mark = format!(
        "<vmha:clone xmlns:vmha='{CLONE_NS}' template='{}'/>",
        escape(&id.template)
    );
    match child(root, "metadata") {
        Some(m) => {
            let at = m.last_child().map_or(m.range().end, |c| c.range().end);
            if m.first_child().is_none() {
                edits.replace(m.range(), format!("<metadata>{mark}</metadata>"));
            } else {
                edits.replace(at..at, mark);
            }
        }
        None => {
            let at = name.range().end;
            edits.replace(at..at, format!("<metadata>{mark}</metadata>"));
        }
    }
    if let Some(g) = child(root, "genid") {
        edits.replace(g.range(), format!("<genid>{}</genid>", id.genid));
    }
    for alias in root.descendants().filter(|n| n.has_tag_name("alias")) {
        edits.replace(alias.range(), "");
    }
    let mut macs = id.macs.iter();
    for iface in root.descendants().filter(|n| n.has_tag_name("interface")) {
        let mac = macs
            .next()
            .ok_or_else(|| CloneError::Xml("fewer MAC addresses than interfaces".into()))?;
        match child(iface, "mac") {
            Some(m) => edits.replace(m.range(), format!("<mac address='{mac}'/>")),
            None => {
                let at = iface.first_child().map_or(iface.range().end, |c| c.range().start);
                edits.replace(at..at, format!("<mac address='{mac}'/>"));
            }
        }
        if let Some(t) = child(iface, "target") {
            edits.replace(t.range(), "");
        }
    }
    let mut mapped = 0;
    for disk in root.descendants().filter(|n| n.has_tag_name("disk")) {
        if let Some(b) = child(disk, "backingStore") {
            edits.replace(b.range(), "");
        }
        let Some(source) = child(disk, "source") else { continue };
        let Some(file) = source.attribute_node("file") else {
            continue;
        };
        let writable = disk.attribute("device").unwrap_or("disk") == "disk" && child(disk, "readonly").is_none();
        match id.disks.iter().find(|(from, _)| from == file.value()) {
            Some((_, to)) => {
                edits.replace(file.range_value(), escape(to));
                mapped += 1;
            }
            None if writable => {
                return Err(CloneError::Xml(format!(
                    "writable disk {} has no clone overlay",
                    file.value()
                )))
            }
            None => {}
        }
    }
    if mapped != id.disks.len() {
        return Err(CloneError::Xml("a disk to map is not in the domain".into()));
    }
    let (old_socket, new_socket) = (channel_socket(&id.template), channel_socket(&id.name));
    for node in root.descendants().filter(|n| n.is_element()) {
        for attr in node.attributes() {
            let v = attr.value();
            let replaced = if v == old_socket {
                Some(new_socket.clone())
            } else if node.has_tag_name("log") && attr.name() == "file" {
                let old = format!("/{}-", id.template);
                v.contains(&old).then(|| v.replacen(&old, &format!("/{}-", id.name), 1))
            } else {
                None
            };
            if let Some(new) = replaced {
                edits.replace(attr.range_value(), escape(&new));
            }
        }
    }
    let out = edits.apply(xml);
    roxmltree::Document::parse(&out)?;
    Ok(out)
}

/// The parts of the CIB that make the template a cluster resource, copied for a clone: its primitive
/// (new id, `config` pointing at the clone's domain XML, nested ids renamed, started), and the
/// constraints naming the template (vmha's and Pacemaker's temporary move constraints excepted).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloneResource {
    pub primitive: String,
    /// (tag, id, xml) of each copied constraint.
    pub constraints: Vec<(String, String, String)>,
    /// Tags (ids) the template is in; the clone joins them.
    pub tags: Vec<String>,
}

/// The template's resource copied for `clone` (see [`CloneResource`]).
pub fn clone_resource(cib: &str, template: &str, clone: &str, config: &str) -> Result<CloneResource, CloneError> {
    let doc = roxmltree::Document::parse(cib)?;
    let prim = doc
        .descendants()
        .find(|n| n.has_tag_name("primitive") && n.attribute("id") == Some(template))
        .ok_or_else(|| CloneError::Cib(format!("no primitive {template}")))?;
    let rename = |old: &str| -> String {
        match old.strip_prefix(template) {
            Some(rest) => format!("{clone}{rest}"),
            None => format!("{clone}-{old}"),
        }
    };
    let base = prim.range().start;
    let mut edits = Edits::default();
    let shift = |r: Range<usize>| r.start - base..r.end - base;
    let mut has_config = false;
    // What the placement policy generated for the template (ids `vmha-policy-...`) is not copied: the
    // policy owns it and generates the clone's own when the clone is in the policy.
    let owned = |n: &roxmltree::Node| {
        n.ancestors()
            .take_while(|a| a.id() != prim.id())
            .any(|a| a.attribute("id").is_some_and(crate::policy::is_owned))
    };
    for node in prim.children().filter(|n| n.is_element() && owned(n)) {
        edits.replace(shift(node.range()), "");
    }
    for node in prim.descendants().filter(|n| n.is_element() && !owned(n)) {
        if let Some(a) = node.attribute_node("id") {
            edits.replace(shift(a.range_value()), escape(&rename(a.value())));
        }
        if node.has_tag_name("nvpair")
            && node.parent().is_some_and(|p| p.has_tag_name("instance_attributes"))
            && node.attribute("name") == Some("config")
        {
            if let Some(v) = node.attribute_node("value") {
                edits.replace(shift(v.range_value()), escape(config));
                has_config = true;
            }
        }
        if node.has_tag_name("nvpair")
            && node.attribute("name") == Some("target-role")
            && node.parent().is_some_and(|p| p.has_tag_name("meta_attributes"))
        {
            if let Some(v) = node.attribute_node("value") {
                edits.replace(shift(v.range_value()), "Started");
            }
        }
    }
    if !has_config {
        return Err(CloneError::Cib(format!("primitive {template} has no config parameter")));
    }
    let primitive = edits.apply(&cib[prim.range()]);

    let mut constraints = Vec::new();
    if let Some(section) = doc.descendants().find(|n| n.has_tag_name("constraints")) {
        for c in section.children().filter(|n| n.is_element()) {
            let id = c.attribute("id").unwrap_or("");
            if id.starts_with("vmha-move-") || id.starts_with("cli-") || crate::policy::is_owned(id) {
                continue;
            }
            let names_template = c.descendants().any(|n| {
                n.is_element()
                    && n.attributes().any(|a| {
                        matches!(a.name(), "rsc" | "with-rsc" | "first" | "then")
                            || (n.has_tag_name("resource_ref") && a.name() == "id")
                    })
                    && n.attributes()
                        .any(|a| a.value() == template && (a.name() != "id" || n.has_tag_name("resource_ref")))
            });
            if !names_template {
                continue;
            }
            let cbase = c.range().start;
            let mut edits = Edits::default();
            for n in c.descendants().filter(|n| n.is_element()) {
                for a in n.attributes() {
                    let r = a.range_value().start - cbase..a.range_value().end - cbase;
                    let refers = matches!(a.name(), "rsc" | "with-rsc" | "first" | "then")
                        || (n.has_tag_name("resource_ref") && a.name() == "id");
                    if refers && a.value() == template {
                        edits.replace(r, escape(clone));
                    } else if a.name() == "id" && !n.has_tag_name("resource_ref") {
                        edits.replace(r, escape(&format!("{}-{clone}", a.value())));
                    }
                }
            }
            constraints.push((
                c.tag_name().name().to_string(),
                format!("{id}-{clone}"),
                edits.apply(&cib[c.range()]),
            ));
        }
    }
    let tags = doc
        .descendants()
        .filter(|n| n.has_tag_name("tag"))
        .filter(|t| {
            t.children()
                .any(|r| r.has_tag_name("obj_ref") && r.attribute("id") == Some(template))
        })
        .filter_map(|t| t.attribute("id").map(str::to_string))
        .collect();
    Ok(CloneResource {
        primitive,
        constraints,
        tags,
    })
}

/// The backing chain of each file disk in a running domain's XML: (target dev, [active, backing, ...]).
pub fn disk_chains(xml: &str) -> Result<Vec<(String, Vec<String>)>, CloneError> {
    let doc = roxmltree::Document::parse(xml)?;
    let mut out = Vec::new();
    for disk in doc.descendants().filter(|n| n.has_tag_name("disk")) {
        let Some(dev) = child(disk, "target").and_then(|t| t.attribute("dev")) else {
            continue;
        };
        let mut chain = Vec::new();
        let mut node = Some(disk);
        while let Some(n) = node {
            match child(n, "source").and_then(|s| s.attribute("file")) {
                Some(f) => chain.push(f.to_string()),
                None => break,
            }
            node = child(n, "backingStore");
        }
        if !chain.is_empty() {
            out.push((dev.to_string(), chain));
        }
    }
    Ok(out)
}

/// The path of a new file beside `path` (same directory), named `<stem>.<suffix>.qcow2`.
pub fn sibling_path(path: &str, name: &str) -> String {
    match path.rsplit_once('/') {
        Some((dir, _)) => format!("{dir}/{name}"),
        None => name.to_string(),
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn qcow2_headers_name_their_backing_file() {
        let mut head = vec![0u8; 4096];
        head[..4].copy_from_slice(b"QFI\xfb");
        head[4..8].copy_from_slice(&3u32.to_be_bytes());
        assert_eq!(qcow2_backing(&head), None, "no backing file");
        let name = b"/srv/vm/tpl.vda.qcow2";
        head[8..16].copy_from_slice(&512u64.to_be_bytes());
        head[16..20].copy_from_slice(&(name.len() as u32).to_be_bytes());
        head[512..512 + name.len()].copy_from_slice(name);
        assert_eq!(qcow2_backing(&head).as_deref(), Some("/srv/vm/tpl.vda.qcow2"));
        assert_eq!(qcow2_backing(&head[..520]), None, "cut short");
        assert_eq!(qcow2_backing(b"not a qcow2 image at all"), None);
    }

    #[test]
    fn compaction_pulls_the_layers_vmha_made_onto_the_first_it_did_not() {
        let c = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        // After one clone: the template's original disk is kept under its new overlay.
        assert_eq!(
            compaction("t", &c(&["/d/t.2.vda.qcow2", "/d/t.vda.qcow2", "/d/base.qcow2"])),
            None
        );
        // After more (and after a rolled-back clone left a layer): every vmha layer goes.
        assert_eq!(
            compaction(
                "t",
                &c(&[
                    "/d/t.4.vda.qcow2",
                    "/d/t.3.vda.qcow2",
                    "/d/t.2.vda.qcow2",
                    "/d/t.vda.qcow2"
                ])
            ),
            Some(Compaction {
                base: Some("/d/t.vda.qcow2".into()),
                dropped: c(&["/d/t.3.vda.qcow2", "/d/t.2.vda.qcow2"]),
            })
        );
        // Only vmha's layers below: the whole chain is pulled.
        assert_eq!(
            compaction("t", &c(&["/d/t.4.vda.qcow2", "/d/t.3.vda.qcow2"])),
            Some(Compaction {
                base: None,
                dropped: c(&["/d/t.3.vda.qcow2"]),
            })
        );
        assert_eq!(compaction("t", &c(&["/d/t.vda.qcow2"])), None);
    }

    #[test]
    fn twenty_clones_of_one_template_leave_its_chain_three_layers_deep() {
        // Each live clone puts the template on a new overlay over its active layer (the clone's frozen
        // backing); compaction then pulls what lies between onto the first layer vmha did not make.
        let mut chain: Vec<String> = vec!["/d/t.vda.qcow2".into(), "/d/base.qcow2".into()];
        for stamp in 1..=20u64 {
            chain.insert(0, format!("/d/t.{stamp}.vda.qcow2"));
            if let Some(c) = compaction("t", &chain) {
                let rest = match &c.base {
                    Some(base) => chain.iter().skip_while(|l| *l != base).cloned().collect(),
                    None => Vec::new(),
                };
                assert_eq!(chain[1..chain.len() - rest.len()], c.dropped[..]);
                chain.truncate(1);
                chain.extend(rest);
            }
            assert!(chain.len() <= 3, "after clone {stamp}: {chain:?}");
        }
        assert_eq!(chain, ["/d/t.20.vda.qcow2", "/d/t.vda.qcow2", "/d/base.qcow2"]);
    }

    #[test]
    fn clone_layers_are_recognised_by_name() {
        assert!(is_clone_layer("web", "web.1795315621000.vda.qcow2"));
        assert!(
            !is_clone_layer("web", "web.vda.qcow2"),
            "the template's own disk is not vmha's"
        );
        assert!(!is_clone_layer("web", "web.data.vda.qcow2"));
        assert!(!is_clone_layer("web", "webx.123.vda.qcow2"));
        assert!(!is_clone_layer("web", "web.123.vda.raw"));
    }

    use super::*;

    const RUNTIME: &str = r#"<domain type='qemu' id='3'>
  <name>tpl</name>
  <uuid>df162f03-a4e6-4100-9b32-403b09af9e6a</uuid>
  <genid>341a278c-b0b2-4604-a4c3-37c462e9d748</genid>
  <memory unit='KiB'>131072</memory>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/shared/tpl.qcow2' index='2'/>
      <backingStore type='file' index='3'><format type='qcow2'/><source file='/shared/base.qcow2'/></backingStore>
      <target dev='vda' bus='virtio'/>
      <alias name='virtio-disk0'/>
    </disk>
    <disk type='file' device='cdrom'><source file='/iso/tools.iso'/><target dev='hdc'/><readonly/></disk>
    <interface type='ethernet'>
      <mac address='52:54:00:aa:00:01'/>
      <target dev='vnet3' managed='yes'/>
      <model type='virtio'/>
      <alias name='net0'/>
    </interface>
    <serial type='pty'><log file='/var/log/libvirt/qemu/tpl-console.log' append='on'/></serial>
    <channel type='unix'>
      <source mode='bind' path='/var/lib/libvirt/qemu/vmha.tpl.guest.0'/>
      <target type='virtio' name='org.vmha.guest.0'/>
    </channel>
  </devices>
</domain>"#;

    fn identity() -> CloneIdentity {
        CloneIdentity {
            template: "tpl".into(),
            name: "web2".into(),
            uuid: uuid_from([7; 16]),
            genid: uuid_from([9; 16]),
            macs: vec![mac_from([1, 2, 3])],
            disks: vec![("/shared/tpl.qcow2".into(), "/shared/web2.qcow2".into())],
        }
    }

    #[test]
    fn clone_xml_has_a_new_identity_and_nothing_of_the_template_runtime() {
        let out = clone_domain_xml(RUNTIME, &identity()).unwrap();
        let d = DomainCheck::new(&out);
        assert_eq!(d.text("name"), "web2");
        assert_eq!(d.text("uuid"), uuid_from([7; 16]));
        assert_eq!(d.text("genid"), uuid_from([9; 16]));
        assert!(out.contains("<mac address='52:54:00:01:02:03'/>"));
        assert!(out.contains("file='/shared/web2.qcow2'"));
        assert!(out.contains("file='/iso/tools.iso'"), "read-only media stay");
        assert!(out.contains("/var/lib/libvirt/qemu/vmha.web2.guest.0"));
        assert!(out.contains("/var/log/libvirt/qemu/web2-console.log"));
        assert_eq!(clone_of(&out).as_deref(), Some("tpl"));
        assert_eq!(clone_of(RUNTIME), None);
        for gone in [
            "vnet3",
            "alias",
            "backingStore",
            "52:54:00:aa:00:01",
            "df162f03",
            "tpl.",
            "tpl-",
            ">tpl<",
        ] {
            assert!(!out.contains(gone), "{gone} left in {out}");
        }
    }

    #[test]
    fn clone_xml_refuses_what_it_cannot_clone() {
        let mut id = identity();
        id.disks.clear();
        assert!(matches!(clone_domain_xml(RUNTIME, &id), Err(CloneError::Xml(m)) if m.contains("no clone overlay")));
        let mut id = identity();
        id.macs.clear();
        assert!(clone_domain_xml(RUNTIME, &id).is_err());
        let mut id = identity();
        id.template = "other".into();
        assert!(clone_domain_xml(RUNTIME, &id).is_err());
        assert!(clone_domain_xml("<domain><name>tpl</na", &identity()).is_err());
        let block = RUNTIME
            .replace("type='file' device='disk'", "type='block' device='disk'")
            .replace(
                "<source file='/shared/tpl.qcow2' index='2'/>",
                "<source dev='/dev/sdb'/>",
            );
        assert!(writable_disks(&block).is_err());
        assert_eq!(
            writable_disks(RUNTIME).unwrap(),
            vec![("vda".to_string(), "/shared/tpl.qcow2".to_string())]
        );
    }

    struct DomainCheck(String);
    impl DomainCheck {
        fn new(x: &str) -> Self {
            DomainCheck(x.to_string())
        }
        fn text(&self, tag: &str) -> String {
            let doc = roxmltree::Document::parse(&self.0).unwrap();
            let n = doc.descendants().find(|n| n.has_tag_name(tag)).unwrap();
            n.text().unwrap_or("").to_string()
        }
    }

    fn image(xml: &str, cookie: Option<&[u8]>, stream: &[u8]) -> Vec<u8> {
        let img = SaveImage {
            was_running: 1,
            compressed: 0,
            xml: String::new(),
            cookie: cookie.map(<[u8]>::to_vec),
            stream_offset: 0,
        };
        let mut out = write_save_header(&img, xml);
        out.extend_from_slice(stream);
        out
    }

    #[test]
    fn save_header_round_trips_and_keeps_the_stream_where_it_says() {
        let file = image("<domain/>", Some(b"<cookie/>"), b"QEVM-stream");
        assert_eq!(file.len() % 4096, 11);
        let len = save_image_len(&file[..HEADER_LEN]).unwrap();
        let img = parse_save_image(&file[..len]).unwrap();
        assert_eq!(img.xml, "<domain/>");
        assert_eq!(img.cookie.as_deref(), Some(&b"<cookie/>"[..]));
        assert_eq!(img.was_running, 1);
        assert_eq!(&file[img.stream_offset as usize..], b"QEVM-stream");
        let again = write_save_header(&img, "<domain><name>x</name></domain>");
        let img2 = parse_save_image(&again).unwrap();
        assert_eq!(img2.cookie, img.cookie);
        assert_eq!(img2.xml, "<domain><name>x</name></domain>");
        let plain = image("<domain/>", None, b"");
        assert_eq!(parse_save_image(&plain).unwrap().cookie, None);
    }

    #[test]
    fn broken_save_headers_are_refused() {
        let good = image("<domain/>", Some(b"<c/>"), b"");
        assert_eq!(
            parse_save_image(&good[..40]),
            Err(CloneError::Header(format!("shorter than {HEADER_LEN} bytes")))
        );
        let mut partial = good.clone();
        partial[..16].copy_from_slice(SAVE_PARTIAL);
        assert_eq!(parse_save_image(&partial), Err(CloneError::Partial));
        let mut other = good.clone();
        other[0] = b'X';
        assert_eq!(parse_save_image(&other), Err(CloneError::NotSaveImage));
        let mut v3 = good.clone();
        v3[16..20].copy_from_slice(&3u32.to_ne_bytes());
        assert_eq!(parse_save_image(&v3), Err(CloneError::Version(3)));
        let mut huge = good.clone();
        huge[20..24].copy_from_slice(&(MAX_DATA_LEN + 1).to_ne_bytes());
        assert!(parse_save_image(&huge).is_err());
        assert!(
            parse_save_image(&good[..HEADER_LEN + 4]).is_err(),
            "truncated data area"
        );
        let mut cookie = good.clone();
        cookie[32..36].copy_from_slice(&1u32.to_ne_bytes());
        assert!(parse_save_image(&cookie).is_err(), "cookie inside the XML");
        let mut unterminated = good;
        let end = HEADER_LEN + 4096 - HEADER_LEN;
        for b in &mut unterminated[HEADER_LEN..end] {
            *b = b'a';
        }
        assert!(parse_save_image(&unterminated).is_err());
    }

    const CIB: &str = r#"<cib><configuration><resources>
<primitive id="tpl" class="ocf" provider="vmha" type="VirtualMachine">
  <instance_attributes id="tpl-instance_attributes">
    <nvpair id="tpl-instance_attributes-config" name="config" value="/shared/tpl.xml"/>
  </instance_attributes>
  <meta_attributes id="tpl-meta_attributes">
    <nvpair id="tpl-meta_attributes-target-role" name="target-role" value="Stopped"/>
    <nvpair id="tpl-meta_attributes-priority" name="priority" value="5"/>
  </meta_attributes>
  <operations><op id="tpl-monitor-interval-10s" name="monitor" interval="10s"/></operations>
  <utilization id="tpl-utilization"><nvpair id="u1" name="hv_memory" value="128"/></utilization>
  <meta_attributes id="vmha-policy-meta-tpl" score="1000"><nvpair id="vmha-policy-meta-tpl-priority" name="priority" value="9"/></meta_attributes>
</primitive>
<primitive id="other" class="ocf" provider="vmha" type="VirtualMachine"/>
</resources><constraints>
<rsc_location id="loc-tpl" rsc="tpl" node="node1" score="50"/>
<rsc_location id="vmha-move-tpl" rsc="tpl" node="node2" score="INFINITY"/>
<rsc_colocation id="col" rsc="tpl" with-rsc="other" score="-INFINITY"/>
<rsc_colocation id="vmha-policy-apart-g-tpl-other" rsc="tpl" with-rsc="other" score="-INFINITY"/>
<rsc_order id="ord-other" first="other" then="x"/>
<rsc_order id="set"><resource_set id="s1"><resource_ref id="tpl"/><resource_ref id="other"/></resource_set></rsc_order>
</constraints><tags><tag id="web"><obj_ref id="tpl"/></tag><tag id="db"><obj_ref id="other"/></tag></tags>
</configuration></cib>"#;

    #[test]
    fn clone_resource_copies_settings_constraints_and_tags() {
        let r = clone_resource(CIB, "tpl", "web2", "/shared/web2.xml").unwrap();
        assert!(r.primitive.starts_with(r#"<primitive id="web2" "#));
        assert!(r.primitive.contains(r#"value="/shared/web2.xml""#));
        assert!(r
            .primitive
            .contains(r#"id="web2-meta_attributes-priority" name="priority" value="5""#));
        assert!(r.primitive.contains(r#"name="target-role" value="Started""#));
        assert!(r
            .primitive
            .contains(r#"<nvpair id="web2-u1" name="hv_memory" value="128"/>"#));
        assert!(!r.primitive.contains("tpl"), "{}", r.primitive);
        assert!(
            !r.primitive.contains("vmha-policy"),
            "the policy's own sets are not copied: {}",
            r.primitive
        );
        let ids: Vec<&str> = r.constraints.iter().map(|c| c.1.as_str()).collect();
        assert_eq!(ids, ["loc-tpl-web2", "col-web2", "set-web2"]);
        assert!(r.constraints[1].2.contains(r#"rsc="web2" with-rsc="other""#));
        assert!(r.constraints[2]
            .2
            .contains(r#"<resource_ref id="web2"/><resource_ref id="other"/>"#));
        assert!(r.constraints[2].2.contains(r#"resource_set id="s1-web2""#));
        assert_eq!(r.tags, ["web"]);
        assert!(clone_resource(CIB, "nope", "x", "/x").is_err());
        assert!(clone_resource(CIB, "other", "x", "/x").is_err(), "no config parameter");
    }

    #[test]
    fn disk_chains_follow_backing_stores() {
        let chains = disk_chains(RUNTIME).unwrap();
        assert_eq!(
            chains[0],
            (
                "vda".to_string(),
                vec!["/shared/tpl.qcow2".to_string(), "/shared/base.qcow2".to_string()]
            )
        );
        assert_eq!(chains[1].1, ["/iso/tools.iso"]);
    }

    #[test]
    fn names_identities_and_paths() {
        assert_eq!(clone_names("web", None, 1), ["web-clone"]);
        assert_eq!(clone_names("web", Some("app"), 3), ["app-1", "app-2", "app-3"]);
        let u = uuid_from([0xff; 16]);
        assert_eq!(u.len(), 36);
        assert_eq!(&u[14..15], "4");
        assert!(matches!(&u[19..20], "8" | "9" | "a" | "b"));
        assert_eq!(mac_from([0xab, 0, 1]), "52:54:00:ab:00:01");
        assert_eq!(sibling_path("/a/b/tpl.qcow2", "x.qcow2"), "/a/b/x.qcow2");
    }
}
