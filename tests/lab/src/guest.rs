//! The lab's test guest: a Debian cloud kernel and a busybox + qemu-guest-agent initramfs built by
//! `guest/build-guest` (with vmha-guest and test hooks when the workspace has a release build of it), and
//! the libvirt domain definitions that boot it under TCG.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};

use crate::config::LAB_ROOT;
use crate::process::run_ok;

/// The vmha-guest binary the image includes: `$VMHA_GUEST_BIN`, else the workspace's release build when
/// there is one: the static one of `guest/build-static` when it is newer than the plain one.
pub fn guest_binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("VMHA_GUEST_BIN") {
        return Some(PathBuf::from(p));
    }
    let target = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target");
    let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    [
        target.join("x86_64-unknown-linux-musl/release/vmha-guest"),
        target.join("release/vmha-guest"),
    ]
    .into_iter()
    .filter(|p| p.is_file())
    .max_by_key(|p| modified(p))
}

/// Where the guest image is built (shared by all labs on this machine; rebuilt when the build script or
/// the vmha-guest binary changes): `guest`, or `guest-vmha` for the image with vmha-guest, so that labs
/// with and without it do not rebuild each other's image. `$VMHA_GUEST_IMAGE_DIR` overrides it (a branch
/// that changes the image builds its own instead of rebuilding the shared one under other labs).
pub fn image_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("VMHA_GUEST_IMAGE_DIR") {
        return PathBuf::from(dir);
    }
    let name = if guest_binary().is_some() {
        "guest-vmha"
    } else {
        "guest"
    };
    Path::new(LAB_ROOT).join(name)
}

/// The guest build script in this source tree.
pub fn build_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("guest").join("build-guest")
}

/// Builds the guest kernel and initramfs unless an up-to-date build exists.
pub fn build_image() -> Result<PathBuf> {
    let dir = image_dir();
    let script = build_script();
    let script = script.to_str().context("guest build script path is not UTF-8")?;
    let out = dir.to_str().context("guest image path is not UTF-8")?;
    // Downloaded kernel packages are shared by both images.
    let cache = Path::new(LAB_ROOT).join("guest").join("cache");
    let cache = format!("VMHA_GUEST_CACHE={}", cache.display());
    let bin = match guest_binary() {
        Some(b) => format!("VMHA_GUEST_BIN={}", b.canonicalize().unwrap_or(b).display()),
        None => "VMHA_GUEST_BIN=".to_string(),
    };
    run_ok("env", &[&bin, &cache, "bash", script, out], Duration::from_secs(600))
        .context("building the lab guest image")?;
    Ok(dir)
}

/// A lab VM: what its domain definition needs.
#[derive(Debug, Clone)]
pub struct GuestSpec {
    pub name: String,
    pub memory_mib: u32,
    pub vcpus: u32,
    /// A virtio disk (qcow2 file on storage every host sees), when the VM has one.
    pub disk: Option<PathBuf>,
    /// A virtio NIC (type ethernet: a tap device on the host, connected to nothing) with this MAC.
    pub mac: Option<String>,
    /// The disk's cache mode (`cache='none'`...), when not QEMU's default (writeback).
    pub disk_cache: Option<String>,
}

impl GuestSpec {
    pub fn new(name: &str) -> Self {
        GuestSpec {
            name: name.to_string(),
            memory_mib: 128,
            vcpus: 1,
            disk: None,
            mac: None,
            disk_cache: None,
        }
    }

    /// The same VM with a virtio disk (`path`, a qcow2 file) in cache mode `cache` (e.g. `none`: no host
    /// page cache, what a disk on shared storage needs to live-migrate safely) and no NIC.
    pub fn with_disk(mut self, path: &Path, cache: &str) -> Self {
        self.disk = Some(path.to_path_buf());
        self.disk_cache = Some(cache.to_string());
        self
    }

    /// The same VM with a virtio disk (`path`, a qcow2 file) and a virtio NIC.
    pub fn with_disk_and_nic(mut self, path: &Path, mac: &str) -> Self {
        self.disk = Some(path.to_path_buf());
        self.mac = Some(mac.to_string());
        self
    }

    /// A stable UUID derived from the name (FNV-1a), formatted as a version-4 UUID.
    pub fn uuid(&self) -> String {
        let fnv = |seed: u64| {
            self.name
                .bytes()
                .fold(seed, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3))
        };
        let a = fnv(0xcbf2_9ce4_8422_2325);
        let b = fnv(0x8422_2325_cbf2_9ce4);
        let a = (a & 0xffff_ffff_ffff_0fff) | 0x4000;
        let b = (b & 0x3fff_ffff_ffff_ffff) | 0x8000_0000_0000_0000;
        format!(
            "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
            a >> 32,
            (a >> 16) & 0xffff,
            a & 0xffff,
            b >> 48,
            b & 0xffff_ffff_ffff
        )
    }

    fn extra_devices(&self) -> String {
        let mut x = String::new();
        if let Some(d) = &self.disk {
            let cache = self
                .disk_cache
                .as_deref()
                .map(|c| format!(" cache='{c}'"))
                .unwrap_or_default();
            x.push_str(&format!(
                "    <disk type='file' device='disk'><driver name='qemu' type='qcow2'{cache}/><source file='{}'/>\
                 <target dev='vda' bus='virtio'/></disk>\n",
                d.display()
            ));
        }
        if let Some(m) = &self.mac {
            x.push_str(&format!(
                "    <interface type='ethernet'><mac address='{m}'/><model type='virtio'/></interface>\n"
            ));
        }
        x
    }

    /// The libvirt domain XML: TCG (`type='qemu'`), direct kernel boot from `image_dir`, serial console
    /// logged to the host's libvirt log directory and a qemu-guest-agent virtio-serial channel. vmha's
    /// guest channel is not in it: `ocf:vmha:VirtualMachine` adds it when it starts the domain.
    pub fn domain_xml(&self, image_dir: &Path) -> String {
        let img = image_dir.display();
        format!(
            r#"<domain type='qemu'>
  <name>{name}</name>
  <uuid>{uuid}</uuid>
  <memory unit='MiB'>{mem}</memory>
  <currentMemory unit='MiB'>{mem}</currentMemory>
  <vcpu placement='static'>{vcpus}</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{img}/vmlinuz</kernel>
    <initrd>{img}/initrd.gz</initrd>
    <cmdline>console=ttyS0 quiet panic=-1</cmdline>
  </os>
  <features><acpi/></features>
  <clock offset='utc'/>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <serial type='pty'>
      <log file='/var/log/libvirt/qemu/{name}-console.log' append='on'/>
    </serial>
    <console type='pty'/>
    <channel type='unix'>
      <target type='virtio' name='org.qemu.guest_agent.0'/>
    </channel>
{extra}    <memballoon model='none'/>
  </devices>
</domain>
"#,
            extra = self.extra_devices(),
            name = self.name,
            uuid = self.uuid(),
            mem = self.memory_mib,
            vcpus = self.vcpus,
        )
    }
}

/// A qcow2 disk for a lab VM: an empty base image of `size` (e.g. `64M`) and `disk`, an overlay on it (the
/// shape live clone works with: a template's writable overlay on a shared base).
pub fn disk_on_base(base: &Path, disk: &Path, size: &str) -> Result<()> {
    let (b, d) = (base.to_string_lossy(), disk.to_string_lossy());
    run_ok(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", &b, size],
        Duration::from_secs(30),
    )?;
    run_ok(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "-b", &b, "-F", "qcow2", &d],
        Duration::from_secs(30),
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuid_is_stable_distinct_and_well_formed() {
        let a = GuestSpec::new("vm1").uuid();
        assert_eq!(a, GuestSpec::new("vm1").uuid());
        assert_ne!(a, GuestSpec::new("vm2").uuid());
        let parts: Vec<&str> = a.split('-').collect();
        assert_eq!(parts.iter().map(|p| p.len()).collect::<Vec<_>>(), vec![8, 4, 4, 4, 12]);
        assert!(parts[2].starts_with('4'));
        assert!(matches!(parts[3].chars().next(), Some('8' | '9' | 'a' | 'b')));
    }

    #[test]
    fn domain_xml_is_tcg_with_guest_agent_and_vmha_channels() {
        let xml = GuestSpec::new("web").domain_xml(Path::new("/img"));
        let doc = roxmltree::Document::parse(&xml).unwrap();
        let root = doc.root_element();
        assert_eq!(root.attribute("type"), Some("qemu"));
        let text = |tag: &str| root.descendants().find(|n| n.has_tag_name(tag)).and_then(|n| n.text());
        assert_eq!(text("name"), Some("web"));
        assert_eq!(text("kernel"), Some("/img/vmlinuz"));
        assert_eq!(text("memory"), Some("128"));
        let channels: Vec<_> = root.descendants().filter(|n| n.has_tag_name("channel")).collect();
        let attr = |c: usize, tag: &str, name: &str| {
            let node = channels[c].children().find(|n| n.has_tag_name(tag)).unwrap();
            node.attribute(name).map(str::to_string)
        };
        assert_eq!(attr(0, "target", "name").as_deref(), Some("org.qemu.guest_agent.0"));
        assert_eq!(channels.len(), 1, "vmha's guest channel is the agent's to add");
        assert!(!xml.contains("<disk"), "no disk unless asked for");
    }

    #[test]
    fn a_disk_gets_its_cache_mode() {
        let xml = GuestSpec::new("d")
            .with_disk(Path::new("/shared/d.qcow2"), "none")
            .domain_xml(Path::new("/img"));
        let doc = roxmltree::Document::parse(&xml).unwrap();
        let driver = doc.descendants().find(|n| n.has_tag_name("driver")).unwrap();
        assert_eq!(driver.attribute("type"), Some("qcow2"));
        assert_eq!(driver.attribute("cache"), Some("none"));
        let plain = GuestSpec::new("d")
            .with_disk_and_nic(Path::new("/shared/d.qcow2"), "52:54:00:00:00:01")
            .domain_xml(Path::new("/img"));
        assert!(!plain.contains("cache="), "{plain}");
    }
}
