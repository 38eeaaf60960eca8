//! What the agent needs from a domain XML file: the domain's name and UUID, and the libvirt
//! networks and storage pools it uses. Nothing else is interpreted; libvirt validates the rest.

/// The facts read from a `<domain>` definition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainConfig {
    /// `<name>`.
    pub name: String,
    /// `<uuid>`, if the file sets one.
    pub uuid: Option<String>,
    /// Networks of `<interface type='network'><source network='...'/>`, in order, once each.
    pub networks: Vec<String>,
    /// Pools of `<disk type='volume'><source pool='...'/>`, in order, once each.
    pub pools: Vec<String>,
    /// Writable disks (by target device, else source) whose cache mode lets the host page cache hold their
    /// data (`writeback`, QEMU's default, `writethrough`, `unsafe`): not safe to live-migrate on storage
    /// libvirt cannot check (`shared_storage=true`).
    pub host_cached_disks: Vec<String>,
}

/// Why a file is not a usable domain definition.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("not well-formed XML: {0}")]
    Malformed(String),
    #[error("the root element is <{0}>, not <domain>")]
    NotADomain(String),
    #[error("<domain> has no <name>")]
    NoName,
}

impl DomainConfig {
    /// Reads the facts from the text of a domain XML file.
    pub fn parse(xml: &str) -> Result<DomainConfig, ConfigError> {
        let doc = roxmltree::Document::parse(xml).map_err(|e| ConfigError::Malformed(e.to_string()))?;
        let root = doc.root_element();
        if root.tag_name().name() != "domain" || root.tag_name().namespace().is_some() {
            return Err(ConfigError::NotADomain(root.tag_name().name().to_owned()));
        }
        let child_text = |tag: &str| {
            root.children()
                .find(|n| n.is_element() && n.has_tag_name(tag))
                .and_then(|n| n.text())
                .map(str::trim)
                .filter(|t| !t.is_empty())
                .map(str::to_owned)
        };
        let name = child_text("name").ok_or(ConfigError::NoName)?;
        let uuid = child_text("uuid");

        let mut networks = Vec::new();
        let mut pools = Vec::new();
        let mut host_cached_disks = Vec::new();
        let devices = root
            .children()
            .filter(|n| n.is_element() && n.has_tag_name("devices"))
            .flat_map(|d| d.children().filter(|n| n.is_element()));
        for device in devices {
            let source = || device.children().find(|n| n.is_element() && n.has_tag_name("source"));
            let child = |tag: &str| device.children().find(|n| n.is_element() && n.has_tag_name(tag));
            if device.has_tag_name("disk")
                && matches!(device.attribute("device"), None | Some("disk" | "lun"))
                && child("readonly").is_none()
                && child("shareable").is_none()
                && source().is_some()
                && !matches!(
                    child("driver").and_then(|d| d.attribute("cache")),
                    Some("none" | "directsync")
                )
            {
                let target = child("target").and_then(|t| t.attribute("dev"));
                let src = source().and_then(|s| s.attribute("file").or(s.attribute("dev")));
                if let Some(name) = target.or(src) {
                    host_cached_disks.push(name.to_owned());
                }
            }
            let (list, attr) = match (device.tag_name().name(), device.attribute("type")) {
                ("interface", Some("network")) => (&mut networks, "network"),
                ("disk", Some("volume")) => (&mut pools, "pool"),
                _ => continue,
            };
            if let Some(value) = source().and_then(|s| s.attribute(attr)) {
                if !list.iter().any(|v| v == value) {
                    list.push(value.to_owned());
                }
            }
        }
        Ok(DomainConfig {
            name,
            uuid,
            networks,
            pools,
            host_cached_disks,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FULL: &str = r#"<?xml version="1.0"?>
<domain type='kvm'>
  <name> web1 </name>
  <uuid>4dea22b3-1d52-d8f3-2516-782e98ab3fa0</uuid>
  <metadata><app:name xmlns:app="urn:x">not-this</app:name></metadata>
  <memory unit='MiB'>512</memory>
  <devices>
    <disk type='volume' device='disk'><source pool='images' volume='web1.qcow2'/></disk>
    <disk type='file' device='disk'><source file='/var/lib/x.img'/></disk>
    <disk type='volume' device='disk'><source pool='images' volume='web1-data.qcow2'/></disk>
    <interface type='network'><source network='default'/></interface>
    <interface type='bridge'><source bridge='br0'/></interface>
    <interface type='network'><source network='migration'/></interface>
  </devices>
</domain>"#;

    #[test]
    fn reads_name_uuid_networks_and_pools() {
        let c = DomainConfig::parse(FULL).expect("valid");
        assert_eq!(c.name, "web1");
        assert_eq!(c.uuid.as_deref(), Some("4dea22b3-1d52-d8f3-2516-782e98ab3fa0"));
        assert_eq!(c.networks, vec!["default", "migration"]);
        assert_eq!(c.pools, vec!["images"]);
        assert_eq!(
            c.host_cached_disks,
            vec!["/var/lib/x.img"],
            "no cache mode: QEMU's writeback"
        );
    }

    #[test]
    fn disks_that_bypass_the_host_page_cache_are_not_listed() {
        let xml = r#"<domain><name>d</name><devices>
            <disk type='file' device='disk'><driver name='qemu' type='qcow2' cache='none'/><source file='/s/a.qcow2'/><target dev='vda'/></disk>
            <disk type='block' device='disk'><driver name='qemu' cache='directsync'/><source dev='/dev/sdb'/><target dev='vdb'/></disk>
            <disk type='file' device='disk'><driver name='qemu' cache='writeback'/><source file='/s/c.img'/><target dev='vdc'/></disk>
            <disk type='file' device='disk'><driver name='qemu' cache='writethrough'/><source file='/s/d.img'/><target dev='vdd'/><readonly/></disk>
            <disk type='file' device='disk'><source file='/s/e.img'/><target dev='vde'/><shareable/></disk>
            <disk type='file' device='cdrom'><source file='/s/x.iso'/><target dev='hdc'/></disk>
            <disk type='file' device='cdrom'><target dev='hdd'/></disk>
        </devices></domain>"#;
        assert_eq!(DomainConfig::parse(xml).expect("valid").host_cached_disks, vec!["vdc"]);
    }

    #[test]
    fn minimal_domain_has_no_uuid_or_resources() {
        let c = DomainConfig::parse("<domain><name>a</name></domain>").expect("valid");
        assert_eq!(c.name, "a");
        assert_eq!(c.uuid, None);
        assert!(c.networks.is_empty() && c.pools.is_empty());
    }

    #[test]
    fn rejects_what_is_not_a_named_domain() {
        let table = [
            ("<domain><name>a</name>", "not well-formed"),
            ("", "not well-formed"),
            ("<network><name>a</name></network>", "<network>"),
            ("<domain><uuid>x</uuid></domain>", "no <name>"),
            ("<domain><name>  </name></domain>", "no <name>"),
            ("<domain><devices><name>a</name></devices></domain>", "no <name>"),
        ];
        for (xml, needle) in table {
            let err = DomainConfig::parse(xml).expect_err(xml);
            assert!(err.to_string().contains(needle), "{xml}: {err}");
        }
    }
}
