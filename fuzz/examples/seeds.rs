//! Writes the seed corpora in `fuzz/corpus/<target>/` from the project's own test data: archives made by
//! vcluster's writer from vcluster's test CIB (as vcluster's translate tests make them), domain XML from the
//! tests (and the hostile kinds issue 15 lists), guest protocol lines made by the protocol's own
//! constructors, agent environments and policy documents from the tests and documentation.
//!
//! `cargo run --manifest-path fuzz/Cargo.toml --example seeds` (no instrumentation needed). Deterministic:
//! rerunning it rewrites the same files.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use vmha_model::guest::{GuestMessage, HostMessage, Outcome};
use vmha_vcluster::archive::ArchiveWriter;
use vmha_vcluster::capture::capture;
use vmha_vcluster::{manifest_for, metadata_entries};

const CIB: &str = include_str!("../../vcluster/src/testdata/cib.xml");

/// The domain of vcluster's translate tests.
fn domain(vm: &str, dir: &str, net: &str) -> String {
    format!(
        "<domain type='qemu'><name>{vm}</name><devices>\
         <disk type='file' device='disk'><source file='{dir}/{vm}.img'/><target dev='vda'/></disk>\
         <disk type='file' device='cdrom'><source file='/iso/x.iso'/></disk>\
         <interface type='network'><source network='{net}'/></interface></devices>\
         <os><kernel>{dir}/vmlinuz</kernel></os></domain>"
    )
}

/// A lab guest's domain (tests/lab/src/guest.rs), with a disk and the vmha channel.
const LAB_DOMAIN: &str = r#"<domain type='qemu'>
  <name>vm1</name>
  <uuid>df162f03-a4e6-4100-9b32-403b09af9e6a</uuid>
  <memory unit='MiB'>128</memory>
  <currentMemory unit='MiB'>128</currentMemory>
  <vcpu placement='static'>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>/srv/a/shared/vmlinuz</kernel>
    <initrd>/srv/a/shared/initrd.gz</initrd>
    <cmdline>console=ttyS0 quiet panic=-1</cmdline>
  </os>
  <features><acpi/></features>
  <clock offset='utc'/>
  <on_poweroff>destroy</on_poweroff>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/srv/a/shared/vm1.qcow2'/>
      <backingStore type='file'><format type='qcow2'/><source file='/srv/a/shared/base.qcow2'/></backingStore>
      <target dev='vda' bus='virtio'/>
    </disk>
    <interface type='bridge'><source bridge='lan-a'/><mac address='52:54:00:00:00:01'/><model type='virtio'/></interface>
    <serial type='pty'><log file='/var/log/libvirt/qemu/vm1-console.log' append='on'/></serial>
    <console type='pty'/>
    <channel type='unix'><source mode='bind' path='/var/lib/libvirt/qemu/vmha.vm1.guest.0'/><target type='virtio' name='org.vmha.guest.0'/></channel>
    <channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>
  </devices>
</domain>
"#;

/// What issue 15's hostile archives carried in their domains.
const HOSTILE_DOMAIN: &str = r#"<domain type='kvm' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>evil</name>
  <os><type>hvm</type><loader readonly='yes' type='pflash'>/srv/a/shared/../../../usr/share/OVMF/OVMF_CODE.fd</loader><nvram>/etc/shadow</nvram></os>
  <seclabel type='none' model='dac'/>
  <devices>
    <emulator>/tmp/qemu</emulator>
    <disk type='file' device='disk'><source file='/etc/shadow'/><target dev='vdb'/></disk>
    <disk type='block' device='disk'><source dev='/dev/sda'/><target dev='vdc'/></disk>
    <hostdev mode='subsystem' type='pci'><source><address domain='0' bus='0' slot='2' function='0'/></source></hostdev>
    <filesystem type='mount'><source dir='/'/><target dir='root'/></filesystem>
    <serial type='file'><source path='/root/.ssh/authorized_keys'/></serial>
  </devices>
  <qemu:commandline><qemu:arg value='-device'/><qemu:arg value='x'/></qemu:commandline>
  <qemu:capabilities><qemu:del capability='sandbox'/></qemu:capabilities>
</domain>
"#;

fn write(dir: &Path, name: &str, data: &[u8]) {
    fs::create_dir_all(dir).expect("create corpus directory");
    fs::write(dir.join(name), data).expect("write seed");
}

/// Captures `shop` from vcluster's test CIB into an archive, optionally with a small disk image.
fn archive(disk: Option<&[u8]>) -> Vec<u8> {
    let c = capture(CIB, "shop").expect("the test CIB captures");
    let domains: BTreeMap<String, String> = c
        .vms
        .iter()
        .map(|v| (v.resource.clone(), domain(&v.resource, "/srv/a/shared", "lan-a")))
        .collect();
    let placement = BTreeMap::from([("web".to_string(), "node1".to_string()), ("vip".into(), "node2".into())]);
    let disks: Vec<(String, String, u64)> = disk
        .iter()
        .map(|d| ("web".to_string(), "/srv/a/shared/web.img".to_string(), d.len() as u64))
        .collect();
    let m = manifest_for(&c, placement, "2026-11-22T00:00:00Z".into(), "frozen", &disks);
    let entries = metadata_entries(&c, &domains).expect("metadata");
    let mut w = ArchiveWriter::new(Vec::new(), 19, m, &entries).expect("writer");
    if let Some(data) = disk {
        let path = std::env::temp_dir().join(format!("vmha-fuzz-seed-disk-{}", std::process::id()));
        fs::File::create(&path)
            .and_then(|mut f| f.write_all(data))
            .expect("disk file");
        let f = fs::File::open(&path).expect("disk file");
        w.add_disk(&f, &mut |_| {}).expect("add disk");
        fs::remove_file(&path).expect("remove disk file");
    }
    w.finish().expect("finish").0
}

fn main() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("corpus");

    let dir = root.join("archive_reader");
    let mut disk = vec![0u8; 8192];
    disk[..13].copy_from_slice(b"vmha-fuzz-mbr");
    disk[4096..4100].copy_from_slice(b"data");
    for (name, bytes) in [("shop", archive(None)), ("shop-disk", archive(Some(&disk)))] {
        let tar = zstd::stream::decode_all(bytes.as_slice()).expect("the writer's archive decompresses");
        write(&dir, &format!("{name}.vca"), &bytes);
        // The tar stream alone: the target compresses it (see archive_reader.rs).
        write(&dir, &format!("{name}.tar"), &tar);
    }

    let dir = root.join("domain_translate");
    write(
        &dir,
        "translate-test.xml",
        domain("web", "/srv/a/shared", "lan-a").as_bytes(),
    );
    write(&dir, "lab-guest.xml", LAB_DOMAIN.as_bytes());
    write(&dir, "hostile.xml", HOSTILE_DOMAIN.as_bytes());

    let dir = root.join("guest_line");
    let data = serde_json::json!({"members": ["node1", "node2"], "dc": "node1"});
    let lines = [
        GuestMessage::hello("0.1.0").to_line(),
        GuestMessage::result("r-1", Outcome::Done, "").to_line(),
        GuestMessage::result("clone.7_a", Outcome::Refused, "database busy").to_line(),
        GuestMessage::result("r-2", Outcome::Failed, "hook prepare-clone exited 1").to_line(),
        HostMessage::event("membership", data.clone()).to_line(),
        HostMessage::event("migrated", serde_json::json!({})).to_line(),
        HostMessage::request("r-3", "prepare-clone", 30_000, serde_json::json!({"clone": "web-2"})).to_line(),
        HostMessage::request("r-4", "drain", 1, data).to_line(),
        GuestMessage::heartbeat(0).to_line(),
        GuestMessage::heartbeat(u64::MAX).to_line(),
        GuestMessage::health(false, "hook 10-web exited with status 1").to_line(),
        GuestMessage::health(true, "").to_line(),
        GuestMessage::stopping(3).to_line(),
    ];
    for (i, line) in lines.iter().enumerate() {
        write(&dir, &format!("line-{i}"), format!("{line}\n").as_bytes());
    }
    write(&dir, "stream", format!("{}\n", lines.join("\n")).as_bytes());

    let dir = root.join("ocf_params");
    let envs = [
        ("config", "config=/shared/web1.xml\nOCF_RESKEY_CRM_meta_timeout=20000\nOCF_RESKEY_CRM_meta_interval=0\nOCF_RESOURCE_INSTANCE=web1\n"),
        ("domain", "domain=web1\nhypervisor=qemu:///system\nforce_stop=false\nshutdown_mode=both\nshutdown_timeout=60\nOCF_CHECK_LEVEL=10\nmonitor_guest_agent_timeout=2000\n"),
        ("save", "config=/shared/web1.xml\nsave_on_stop=/shared/state\nstart_networks=lan-a, mgmt\nstart_pools=shared\nstart_resources=yes\nguest_channel=off\n"),
        ("migrate", "domain=web1\nhypervisor=qemu+ssh://node1/system?socket=/run/x\nmigration_transport=tls\nmigration_user=root\nmigration_network_suffix=-mig\nmigration_speed=100\nmigration_downtime=300\nguest_migrate_timeout=10000\nOCF_RESKEY_CRM_meta_migrate_target=node2.example.com\nOCF_RESKEY_CRM_meta_migrate_source=node1\nOCF_RESKEY_CRM_meta_timeout=120000\n"),
        ("remote", "config=/shared/web1.xml\nremote_uri=qemu+tcp://%n/system\nmigrate_uri=tcp://%n:49152\nOCF_RESKEY_CRM_meta_migrate_target=node3\n"),
        ("bad", "config=relative.xml\ndomain=a/b\nforce_stop=maybe\nsave_on_stop=/x\nshutdown_timeout=-1\nOCF_RESKEY_CRM_meta_timeout=18446744073709551615\n"),
    ];
    for (name, env) in envs {
        write(&dir, name, env.as_bytes());
    }

    let dir = root.join("policy_doc");
    let policies = [
        (
            "tests",
            r#"{
  "zones": {"a": {"overcommit": 1.5}},
  "hosts": {"n1": {"zone": "a/r1"}, "n2": {"zone": "a/r2"}, "n3": {"zone": "b", "capacity": {"hv_memory": 256}}},
  "vms": {"vm1": {"priority": 10, "zone": "a"}, "vm2": {"priority": 5, "zone": "b", "strict_zone": true}, "vm3": {}},
  "groups": {"app": {"members": ["vm1", "vm2", "vm3"], "anti_affinity": "host"}}
}"#,
        ),
        (
            "elastic",
            r#"{
  "placement_strategy": "balanced",
  "home_score": 100,
  "hosts": {"n1": {"zone": "eu/b1/r1/k1"}, "n2": {"zone": "eu/b1/r2"}, "n3": {"zone": "us/b1", "capacity": {"cpu": 8, "hv_memory": 16384}}},
  "vms": {"vm1": {"priority": 100, "zone": "eu"}, "vm2": {"priority": 1, "zone": "eu/b1", "strict_zone": true}},
  "groups": {"web": {"members": ["vm1", "vm2"], "affinity": "site", "score": "500"},
             "app": {"members": ["vm3"], "template": "vm3", "min": 1, "max": 4, "anti_affinity": "rack",
                     "autoscale": {"cpu_above": 70, "cpu_below": 20}}}
}"#,
        ),
        (
            "arbitration",
            r#"{
  "hosts": {"n1": {"zone": "a"}, "n2": {"zone": "a"}},
  "groups": {"web": {"members": ["vm1"], "template": "vm1", "min": 1, "max": 4, "priority": 50},
             "batch": {"members": ["vm2", "vm3"], "template": "vm2", "min": 1, "max": 9, "priority": 1,
                       "time_bounds": [{"max": 1, "from": "20:00", "to": "06:00"}, {"max": 2, "from": "06:00", "to": "07:00"}]}}
}"#,
        ),
        ("empty", "{}"),
    ];
    for (name, doc) in policies {
        write(&dir, name, doc.as_bytes());
    }

    // The history set's contents: versions as vmha records them, a broken one, one with a mismatched
    // number, one not named as vmha names them.
    let dir = root.join("policy_history");
    let version = |n: u32, policy: &str| {
        let v = vmha_model::policy::history::Version {
            version: n,
            time: "2026-12-06T06:00:00Z".into(),
            who: "root@node1".into(),
            note: if n == 3 { "rollback to 1".into() } else { "apply".into() },
            policy: serde_json::from_str(policy).expect("a seed policy is JSON"),
        };
        let set = vmha_model::policy::history::record_xml(&v);
        set[set.find("<nvpair").expect("an nvpair")..set.find("</cluster").expect("the set's end")].to_string()
    };
    let three = format!(
        "{}{}{}",
        version(1, policies[0].1),
        version(2, policies[1].1),
        version(3, policies[0].1)
    );
    write(&dir, "three", three.as_bytes());
    write(
        &dir,
        "broken",
        format!(
            r#"{}<nvpair id="vmha-history.v7" name="vmha-policy-v7" value="{{&quot;version&quot;:"/>"#,
            version(1, "{}")
        )
        .as_bytes(),
    );
    write(
        &dir,
        "mismatch",
        version(4, "{}").replace("vmha-policy-v4", "vmha-policy-v9").as_bytes(),
    );
    write(&dir, "unnamed", r#"<nvpair id="x" name="y" value="{}"/>"#.as_bytes());
    // booth.conf, `booth list` and a site's CIB, separated by NUL bytes (see booth_inputs.rs).
    let dir = root.join("booth_inputs");
    let conf = "transport = UDP\nport = 9929\nsite = 10.213.191.100\nsite = \"10.213.192.100\"\narbitrator = 10.213.193.10\n\
                ticket = \"__defaults__\"\n    expire = 300\nticket = \"shop\"\n    expire = 20\n    timeout = 1\nticket = db-8\n    mode = manual\n";
    let list = "ticket: shop, leader: 10.213.191.100, expires: 2026-12-06 06:40:00, commit: 2026-12-06 06:39:40\n\
                ticket: db-8, leader: NONE\n10.213.192.100\n";
    let cib = r#"<cib><configuration><resources><group id="booth"><primitive id="booth-ip" class="ocf" provider="heartbeat" type="IPaddr2"><instance_attributes id="booth-ip-ia"><nvpair id="booth-ip-ip" name="ip" value="10.213.191.100"/></instance_attributes></primitive><primitive id="booth-site" class="ocf" provider="pacemaker" type="booth-site"/></group></resources><constraints><rsc_ticket id="vmha-site-shop" rsc="shop" ticket="shop" loss-policy="stop"/></constraints></configuration><status><tickets><ticket_state id="shop" granted="true" last-granted="1796000000" expires="1796000020"/></tickets></status></cib>"#;
    write(&dir, "two-sites", format!("{conf}\0{list}\0{cib}").as_bytes());
    write(
        &dir,
        "authfile",
        "authfile = /etc/booth/authkey\nsite = 10.0.0.1\n\0\0  0123456789abcdef\n".as_bytes(),
    );
    // The third text's lines as replication settings (`vmha-replicate-VC`).
    write(
        &dir,
        "replication",
        "site = 10.0.0.1\n\0\0every=60 storage=/srv/a:/srv/b\nevery=5 stale=10 storage=/a:/b storage=/c:/d\nstale=9 every=10 storage=/a:/b\n".as_bytes(),
    );
    write(&dir, "hostile", "ticket = -F\nsite = ::ffff:1.2.3.4\n\0ticket: --help, leader: 1.2.3.4\nticket: a\u{1b}[2J\0<cib><tickets><ticket_state/></tickets></cib>".as_bytes());
    // Cluster.WhatIf's strings: the zone on the first line, a host on each further one (whatif_request.rs).
    let dir = root.join("whatif_request");
    write(&dir, "zone", b"east");
    write(&dir, "rack", b"east/b1/r1/k1");
    write(&dir, "hosts", b"\nn1\nn3");
    write(
        &dir,
        "hostile",
        "east/../west\nn1\u{1b}[2J\n\u{202e}n2\n\\x00\n".as_bytes(),
    );
    // Diffs as the CIB manager sends them (format 2, as `crm_diff --cib` writes them), against the base CIB
    // of cib_patchset.rs: values changed, created, moved, deleted (a comment by its position), a digest.
    let dir = root.join("cib_patchset");
    let wrap = |digest: &str, changes: &str| {
        format!(
            r#"<diff format="2"{digest}><version><source admin_epoch="0" epoch="1" num_updates="0"/><target admin_epoch="0" epoch="2" num_updates="0"/></version><change operation="modify" path="/cib"><change-list><change-attr name="epoch" operation="set" value="2"/></change-list><change-result><cib admin_epoch="0" epoch="2" num_updates="0" crm_feature_set="3.16.2" validate-with="pacemaker-3.9"/></change-result></change>{changes}</diff>"#
        )
    };
    write(
        &dir,
        "modify-create",
        wrap(
            "",
            r#"<change operation="modify" path="/cib/configuration/resources/primitive[@id='vm1']/meta_attributes[@id='vm1-m']/nvpair[@id='vm1-m-t']"><change-list><change-attr name="value" operation="set" value="Stopped"/></change-list><change-result><nvpair id="vm1-m-t" name="target-role" value="Stopped"/></change-result></change><change operation="create" path="/cib/configuration/resources" position="3"><primitive id="vm3" class="ocf" provider="vmha" type="VirtualMachine"/></change>"#,
        )
        .as_bytes(),
    );
    write(
        &dir,
        "delete-move",
        wrap(
            "",
            r#"<change operation="delete" path="/cib/configuration/resources/comment" position="1"/><change operation="delete" path="/cib/status/node_state[@id='1']/lrm[@id='1']/lrm_resources/lrm_resource[@id='vm1']"/><change operation="move" path="/cib/configuration/resources/primitive[@id='vm2']" position="0"/>"#,
        )
        .as_bytes(),
    );
    write(
        &dir,
        "digest",
        wrap(
            r#" digest="0123456789abcdef0123456789abcdef""#,
            r#"<change operation="create" path="/cib/status" position="1"><node_state id="2" uname="n2"/></change>"#,
        )
        .as_bytes(),
    );
    println!("seeds written under {}", root.display());
}
