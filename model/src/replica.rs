//! Replication of a running virtual cluster's disks to the peer site (`vmha site replicate`): which disks
//! of a running domain are copied where, read from the domain's live XML (libvirt's, but written from a
//! domain definition that may have come from an archive: untrusted text), and the push-mode backup
//! request that makes libvirt copy them as they were at one point in time while the guest runs.
//!
//! Every disk the guest writes is either replicated or the plan is refused: a data disk that is not a
//! plain file (a block device, a network or pool volume) would leave the peer with a stale disk beside
//! fresh ones, so it is an error, not a skip. Removable media (cdrom, floppy) and read-only disks hold
//! nothing the guest writes and are left out.

use std::collections::BTreeSet;

use crate::change::escape;

/// Why a domain's disks cannot be replicated.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReplicaError {
    #[error("domain {domain}: its XML does not parse: {why}")]
    Xml { domain: String, why: String },
    #[error("domain {domain}, disk {disk}: {why}")]
    Disk { domain: String, disk: String, why: String },
    #[error("the replication setting of {vc}: {why}")]
    Setting { vc: String, why: String },
}

/// One disk copied to the peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaDisk {
    /// The disk's target name in the domain (`vda`).
    pub dev: String,
    /// The image the guest runs on here.
    pub source: String,
    /// `raw` or `qcow2`: the copy has the same format.
    pub format: String,
    /// Where the peer's copy is (the storage map applied to `source`).
    pub target: String,
}

impl ReplicaDisk {
    /// Where round `round`'s copy is written first: a hidden sibling of `target`, renamed over it once
    /// every copy of the round is complete.
    pub fn partial(&self, round: &str) -> String {
        partial_name(&self.target, round)
    }
}

/// What a replication round does with one running domain.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ReplicaPlan {
    pub disks: Vec<ReplicaDisk>,
    /// Target names of the disks left out (removable media, read-only disks).
    pub skipped: Vec<String>,
}

/// The partial copy's name for `target` in round `round` (a round's own id, so that two rounds running
/// at once never write or remove each other's files): `/dir/.name.ROUND.vmha-replica`.
pub fn partial_name(target: &str, round: &str) -> String {
    match target.rsplit_once('/') {
        Some((dir, base)) => format!("{dir}/.{base}.{round}{PARTIAL_SUFFIX}"),
        None => format!(".{target}.{round}{PARTIAL_SUFFIX}"),
    }
}

/// The end of every partial copy's name.
pub const PARTIAL_SUFFIX: &str = ".vmha-replica";

/// Whether `name` (a file name in the directory of `target`) is a partial copy of `target` by some round.
pub fn is_partial_of(name: &str, target: &str) -> bool {
    let base = target.rsplit_once('/').map_or(target, |(_, b)| b);
    name.strip_prefix('.')
        .and_then(|n| n.strip_prefix(base))
        .and_then(|n| n.strip_prefix('.'))
        .and_then(|n| n.strip_suffix(PARTIAL_SUFFIX))
        .is_some_and(|round| !round.is_empty() && round.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// A disk target name as libvirt writes it: 1-32 lowercase letters and digits.
fn valid_dev(dev: &str) -> bool {
    !dev.is_empty() && dev.len() <= 32 && dev.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

/// An absolute path with no control characters, no `..` or `.` component and no empty component.
fn valid_path(p: &str) -> bool {
    p.starts_with('/')
        && p.len() > 1
        && p.len() <= 4096
        && !p.chars().any(char::is_control)
        && p[1..].split('/').all(|c| !c.is_empty() && c != "." && c != "..")
}

/// Plans the replication of `domain`'s disks from its live XML: every writable file disk with the peer's
/// path given by `map` (the storage map; `None`: not covered). Refuses anything it cannot copy faithfully.
pub fn replica_plan(
    domain: &str,
    xml: &str,
    map: impl Fn(&str) -> Option<String>,
) -> Result<ReplicaPlan, ReplicaError> {
    let doc = roxmltree::Document::parse(xml).map_err(|e| ReplicaError::Xml {
        domain: crate::printable(domain),
        why: e.to_string(),
    })?;
    let root = doc.root_element();
    if !root.has_tag_name("domain") {
        return Err(ReplicaError::Xml {
            domain: crate::printable(domain),
            why: format!(
                "the root element is <{}>, not <domain>",
                crate::printable(root.tag_name().name())
            ),
        });
    }
    let devices = root.children().filter(|n| n.has_tag_name("devices"));
    let mut plan = ReplicaPlan::default();
    let mut devs = BTreeSet::new();
    let mut targets = BTreeSet::new();
    for disk in devices.flat_map(|d| d.children()).filter(|n| n.has_tag_name("disk")) {
        let child = |tag: &str| disk.children().find(|c| c.has_tag_name(tag));
        let dev = child("target").and_then(|t| t.attribute("dev")).unwrap_or("");
        let err = |why: String| ReplicaError::Disk {
            domain: crate::printable(domain),
            disk: crate::printable(dev),
            why,
        };
        if !valid_dev(dev) {
            return Err(err("its target name must be 1-32 lowercase letters and digits".into()));
        }
        if !devs.insert(dev.to_string()) {
            return Err(err("two disks have this target name".into()));
        }
        let device = disk.attribute("device").unwrap_or("disk");
        if matches!(device, "cdrom" | "floppy") || child("readonly").is_some() {
            plan.skipped.push(dev.to_string());
            continue;
        }
        let kind = disk.attribute("type").unwrap_or("");
        if kind != "file" {
            return Err(err(format!(
                "a {} disk of type {:?}: only file disks are replicated, and the peer would get a stale copy of it",
                crate::printable(device),
                crate::printable(kind)
            )));
        }
        let Some(source) = child("source").and_then(|s| s.attribute("file")) else {
            return Err(err("a file disk with no source file".into()));
        };
        if !valid_path(source) {
            return Err(err(format!(
                "its source {:?} is not a plain absolute path",
                crate::printable(source)
            )));
        }
        let format = child("driver").and_then(|d| d.attribute("type")).unwrap_or("raw");
        if !matches!(format, "raw" | "qcow2") {
            return Err(err(format!(
                "format {:?}: only raw and qcow2 images are replicated",
                crate::printable(format)
            )));
        }
        let Some(target) = map(source) else {
            return Err(err(format!(
                "no --map storage=... covers its image {}",
                crate::printable(source)
            )));
        };
        if !valid_path(&target) {
            return Err(err(format!(
                "the peer's path {:?} is not a plain absolute path",
                crate::printable(&target)
            )));
        }
        if target == source {
            return Err(err(format!("the peer's copy of {source} would be the image itself")));
        }
        if !targets.insert(target.clone()) {
            return Err(err(format!("two disks map to the same peer path {target}")));
        }
        plan.disks.push(ReplicaDisk {
            dev: dev.to_string(),
            source: source.to_string(),
            format: format.to_string(),
            target,
        });
    }
    Ok(plan)
}

/// libvirt's push-mode backup request for `plan` (`virDomainBackupBegin`): a full copy of every planned
/// disk into its partial file, as the disk was when the job began; every other disk named and left out.
pub fn backup_xml(plan: &ReplicaPlan, round: &str) -> String {
    let mut out = String::from("<domainbackup mode='push'>\n  <disks>\n");
    for d in &plan.disks {
        out.push_str(&format!(
            "    <disk name='{}' backup='yes' type='file'>\n      <target file='{}'/>\n      <driver type='{}'/>\n    </disk>\n",
            escape(&d.dev),
            escape(&d.partial(round)),
            escape(&d.format)
        ));
    }
    for dev in &plan.skipped {
        out.push_str(&format!("    <disk name='{}' backup='no'/>\n", escape(dev)));
    }
    out.push_str("  </disks>\n</domainbackup>\n");
    out
}

/// Cluster property names that hold a virtual cluster's replication setting: `vmha-replicate-VC`, in
/// the `crm_config` property set [`REPLICATION_SET`].
pub const REPLICATE_PREFIX: &str = "vmha-replicate-";
/// The id of the `cluster_property_set` vmha writes replication settings to.
pub const REPLICATION_SET: &str = "vmha-site-replication";
/// Bounds of a replication period, seconds.
pub const EVERY_MIN: u64 = 5;
pub const EVERY_MAX: u64 = 86_400;
/// Without `stale=SECS`, a replica is stale after this many periods without a round that succeeded.
pub const STALE_PERIODS: u64 = 3;
/// The longest `stale=SECS` (a week).
pub const STALE_MAX: u64 = 7 * 86_400;

/// How vmhad replicates a protected virtual cluster while this site holds its ticket (`vmha site
/// replication VC --every SECS --map storage=/HERE:/PEER [--stale-after SECS]`). Stored in the CIB as
/// `every=SECS [stale=SECS] storage=/HERE:/PEER [storage=...]`: CIB text, so read as untrusted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicationSetting {
    pub every_secs: u64,
    /// After how long without a round that succeeded the replica is reported stale (`None`:
    /// [`STALE_PERIODS`] periods); at least one period, at most [`STALE_MAX`].
    pub stale_secs: Option<u64>,
    /// Storage maps (here, peer): absolute plain paths.
    pub storage: Vec<(String, String)>,
}

impl ReplicationSetting {
    /// Reads a setting's value; any deviation is an error naming the virtual cluster.
    pub fn parse(vc: &str, value: &str) -> Result<Self, ReplicaError> {
        let bad = |why: String| ReplicaError::Setting {
            vc: crate::printable(vc),
            why,
        };
        if value.len() > 4096 {
            return Err(bad("longer than 4096 bytes".into()));
        }
        let mut every = None;
        let mut stale = None;
        let mut storage = Vec::new();
        for word in value.split_ascii_whitespace() {
            if let Some(n) = word.strip_prefix("every=") {
                let n: u64 = n
                    .parse()
                    .map_err(|_| bad(format!("every={} is not a number of seconds", crate::printable(n))))?;
                if !(EVERY_MIN..=EVERY_MAX).contains(&n) {
                    return Err(bad(format!("every={n}: must be {EVERY_MIN} to {EVERY_MAX} seconds")));
                }
                if every.replace(n).is_some() {
                    return Err(bad("every= given twice".into()));
                }
            } else if let Some(n) = word.strip_prefix("stale=") {
                let n: u64 = n
                    .parse()
                    .map_err(|_| bad(format!("stale={} is not a number of seconds", crate::printable(n))))?;
                if stale.replace(n).is_some() {
                    return Err(bad("stale= given twice".into()));
                }
            } else if let Some(pair) = word.strip_prefix("storage=") {
                let Some((here, peer)) = pair.split_once(':') else {
                    return Err(bad(format!("storage={}: not HERE:PEER", crate::printable(pair))));
                };
                for p in [here, peer] {
                    if !valid_path(p) {
                        return Err(bad(format!(
                            "storage path {:?} is not a plain absolute path",
                            crate::printable(p)
                        )));
                    }
                }
                if here == peer {
                    return Err(bad(format!(
                        "storage={here}:{peer}: the peer's copies would be the images"
                    )));
                }
                if storage.len() == 16 {
                    return Err(bad("more than 16 storage maps".into()));
                }
                storage.push((here.to_string(), peer.to_string()));
            } else {
                return Err(bad(format!("unknown word {:?}", crate::printable(word))));
            }
        }
        let every_secs = every.ok_or_else(|| bad("no every=SECS".into()))?;
        if storage.is_empty() {
            return Err(bad("no storage=HERE:PEER".into()));
        }
        if let Some(n) = stale {
            if !(every_secs..=STALE_MAX).contains(&n) {
                return Err(bad(format!(
                    "stale={n}: must be one period (every={every_secs}) to {STALE_MAX} seconds"
                )));
            }
        }
        Ok(ReplicationSetting {
            every_secs,
            stale_secs: stale,
            storage,
        })
    }

    /// After how many seconds without a round that succeeded the replica is stale.
    pub fn stale_after_secs(&self) -> u64 {
        self.stale_secs
            .unwrap_or_else(|| self.every_secs.saturating_mul(STALE_PERIODS))
    }

    /// The value stored in the CIB.
    pub fn value(&self) -> String {
        let mut out = format!("every={}", self.every_secs);
        if let Some(n) = self.stale_secs {
            out.push_str(&format!(" stale={n}"));
        }
        for (here, peer) in &self.storage {
            out.push_str(&format!(" storage={here}:{peer}"));
        }
        out
    }

    /// The maps as `vmha vcluster` takes them (`storage=HERE:PEER`).
    pub fn maps(&self) -> Vec<String> {
        self.storage.iter().map(|(h, p)| format!("storage={h}:{p}")).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(p: &str) -> Option<String> {
        p.strip_prefix("/srv/a/").map(|rest| format!("/srv/b/{rest}"))
    }

    fn domain(disks: &str) -> String {
        format!("<domain type='kvm'><name>web</name><devices>{disks}</devices></domain>")
    }

    const RAW: &str = "<disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='/srv/a/web.img'/><target dev='vda' bus='virtio'/></disk>";

    #[test]
    fn file_disks_are_copied_beside_the_peers_image_and_media_left_out() {
        let xml = domain(&format!(
            "{RAW}<disk type='file' device='disk'><driver type='qcow2'/><source file='/srv/a/data.qcow2'/><backingStore/><target dev='vdb'/></disk>\
             <disk type='file' device='cdrom'><target dev='hdc'/><readonly/></disk>\
             <disk type='file' device='disk'><source file='/srv/a/ro.img'/><target dev='vdc'/><readonly/></disk>"
        ));
        let plan = replica_plan("web", &xml, map).unwrap();
        assert_eq!(
            plan.disks,
            vec![
                ReplicaDisk {
                    dev: "vda".into(),
                    source: "/srv/a/web.img".into(),
                    format: "raw".into(),
                    target: "/srv/b/web.img".into()
                },
                ReplicaDisk {
                    dev: "vdb".into(),
                    source: "/srv/a/data.qcow2".into(),
                    format: "qcow2".into(),
                    target: "/srv/b/data.qcow2".into()
                },
            ]
        );
        assert_eq!(plan.skipped, vec!["hdc".to_string(), "vdc".to_string()]);
        assert_eq!(plan.disks[0].partial("1f"), "/srv/b/.web.img.1f.vmha-replica");
        assert!(is_partial_of(".web.img.1f.vmha-replica", "/srv/b/web.img"));
        for other in [
            ".web.img.vmha-replica",
            ".web.img.x1.vmha-replica",
            ".web.img2.1f.vmha-replica",
            "web.img",
            ".data.qcow2.1f.vmha-replica",
        ] {
            assert!(!is_partial_of(other, "/srv/b/web.img"), "{other}");
        }
        let b = backup_xml(&plan, "1f");
        assert!(b.contains("<disk name='vda' backup='yes' type='file'>\n      <target file='/srv/b/.web.img.1f.vmha-replica'/>\n      <driver type='raw'/>"), "{b}");
        assert!(b.contains("<disk name='hdc' backup='no'/>"), "{b}");
        assert!(roxmltree::Document::parse(&b).is_ok());
    }

    #[test]
    fn a_disk_that_cannot_be_copied_faithfully_refuses_the_whole_plan() {
        let cases = [
            ("<disk type='block' device='disk'><source dev='/dev/sdb'/><target dev='vdb'/></disk>", "only file disks"),
            ("<disk type='network' device='disk'><source protocol='nbd' name='x'/><target dev='vdb'/></disk>", "only file disks"),
            ("<disk type='volume' device='lun'><source pool='p' volume='v'/><target dev='sda'/></disk>", "only file disks"),
            ("<disk type='file' device='disk'><target dev='vdb'/></disk>", "no source file"),
            ("<disk type='file' device='disk'><driver type='vmdk'/><source file='/srv/a/x.vmdk'/><target dev='vdb'/></disk>", "only raw and qcow2"),
            ("<disk type='file' device='disk'><source file='/srv/other/x.img'/><target dev='vdb'/></disk>", "no --map"),
            ("<disk type='file' device='disk'><source file='/srv/a/../../etc/shadow'/><target dev='vdb'/></disk>", "plain absolute path"),
            ("<disk type='file' device='disk'><source file='srv/a/x.img'/><target dev='vdb'/></disk>", "plain absolute path"),
            ("<disk type='file' device='disk'><source file='/srv/a/x&#10;y.img'/><target dev='vdb'/></disk>", "plain absolute path"),
            ("<disk type='file' device='disk'><source file='/srv/a/web.img'/><target dev='vdb'/></disk>", "same peer path"),
            ("<disk type='file' device='disk'><source file='/srv/a/x.img'/><target dev='vda'/></disk>", "two disks have this target"),
            ("<disk type='file' device='disk'><source file='/srv/a/x.img'/><target dev='VDB&apos;/>'/></disk>", "target name"),
            ("<disk type='file' device='disk'><source file='/srv/a/x.img'/></disk>", "target name"),
        ];
        for (extra, why) in cases {
            let xml = domain(&format!("{RAW}{extra}"));
            let e = replica_plan("web", &xml, map).unwrap_err().to_string();
            assert!(e.contains(why), "{extra}: {e}");
        }
        // The map must not send a copy onto the image itself, nor anywhere that is not a plain path.
        let same = replica_plan("web", &domain(RAW), |p| Some(p.to_string())).unwrap_err();
        assert!(same.to_string().contains("the image itself"), "{same}");
        let odd = replica_plan("web", &domain(RAW), |_| Some("/srv/b/x\u{1b}[2J".into())).unwrap_err();
        assert!(odd.to_string().contains("not a plain absolute path"), "{odd}");
        assert!(
            !odd.to_string().contains('\u{1b}'),
            "control characters are escaped: {odd}"
        );
    }

    #[test]
    fn hostile_documents_are_errors() {
        for xml in [
            "",
            "<domain",
            "<dom/>",
            "<!DOCTYPE x [<!ENTITY a 'b'>]><domain>&a;</domain>",
        ] {
            assert!(replica_plan("web", xml, map).is_err(), "{xml:?}");
        }
        // A domain with no disks replicates nothing (the caller says so).
        assert_eq!(replica_plan("web", &domain(""), map).unwrap(), ReplicaPlan::default());
    }

    #[test]
    fn replication_settings_read_back_and_refuse_anything_else() {
        let s = ReplicationSetting::parse("shop", "every=60 storage=/srv/a:/srv/b  storage=/x:/y").unwrap();
        assert_eq!(s.every_secs, 60);
        assert_eq!(
            s.storage,
            vec![("/srv/a".into(), "/srv/b".into()), ("/x".into(), "/y".into())]
        );
        assert_eq!(s.value(), "every=60 storage=/srv/a:/srv/b storage=/x:/y");
        assert_eq!(ReplicationSetting::parse("shop", &s.value()).unwrap(), s);
        assert_eq!(
            (s.stale_secs, s.stale_after_secs()),
            (None, 180),
            "3 periods by default"
        );
        let t = ReplicationSetting::parse("shop", "stale=600 every=60 storage=/srv/a:/srv/b").unwrap();
        assert_eq!((t.stale_secs, t.stale_after_secs()), (Some(600), 600));
        assert_eq!(t.value(), "every=60 stale=600 storage=/srv/a:/srv/b");
        assert_eq!(ReplicationSetting::parse("shop", &t.value()).unwrap(), t);
        let one = ReplicationSetting::parse("shop", "every=60 stale=60 storage=/a:/b").unwrap();
        assert_eq!(one.stale_after_secs(), 60);
        assert_eq!(
            s.maps(),
            vec!["storage=/srv/a:/srv/b".to_string(), "storage=/x:/y".to_string()]
        );
        let too_many = format!("every=5{}", " storage=/a:/b".repeat(17));
        let long = format!("every=5 storage=/a:/{}", "b".repeat(5000));
        for (value, why) in [
            ("", "no every="),
            ("every=60", "no storage="),
            ("storage=/a:/b", "no every="),
            ("every=4 storage=/a:/b", "must be 5 to 86400"),
            ("every=86401 storage=/a:/b", "must be 5 to 86400"),
            ("every=-1 storage=/a:/b", "not a number"),
            ("every=1e3 storage=/a:/b", "not a number"),
            ("every=60 every=60 storage=/a:/b", "twice"),
            (
                "every=60 stale=59 storage=/a:/b",
                "must be one period (every=60) to 604800",
            ),
            ("every=60 stale=604801 storage=/a:/b", "to 604800 seconds"),
            ("every=60 stale=0 storage=/a:/b", "must be one period"),
            ("every=60 stale=-1 storage=/a:/b", "not a number"),
            ("every=60 stale=18446744073709551616 storage=/a:/b", "not a number"),
            ("every=60 stale=60 stale=60 storage=/a:/b", "twice"),
            ("every=60 stale= storage=/a:/b", "not a number"),
            ("every=60 storage=/a", "not HERE:PEER"),
            ("every=60 storage=a:/b", "plain absolute path"),
            ("every=60 storage=/a:/b/../../etc", "plain absolute path"),
            ("every=60 storage=/a:/b\u{7}", "plain absolute path"),
            ("every=60 storage=/a:/a", "would be the images"),
            ("every=60 storage=/a:/b; rm -rf /", "unknown word"),
            ("every=60 storage=/a:/b --wait=1", "unknown word"),
            (too_many.as_str(), "more than 16"),
            (long.as_str(), "longer than 4096"),
        ] {
            let e = ReplicationSetting::parse("shop", value).unwrap_err().to_string();
            assert!(
                e.starts_with("the replication setting of shop: ") && e.contains(why),
                "{value:?}: {e}"
            );
        }
    }
}
