use super::*;

/// A domain as the lab's VMs have it (tests/lab GuestSpec plus a disk), after a storage map to /srv/b.
const GENUINE: &str = "<domain type='qemu'>
  <name>h1web</name>
  <uuid>6f1c2d8e-0000-4000-8000-000000000001</uuid>
  <memory unit='MiB'>96</memory>
  <vcpu placement='static'>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>/srv/guest/vmlinuz</kernel>
    <initrd>/srv/guest/initrd.gz</initrd>
    <cmdline>console=ttyS0 quiet panic=-1</cmdline>
  </os>
  <features><acpi/></features>
  <clock offset='utc'/>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='/srv/b/h1web.img'/><target dev='vda' bus='virtio'/></disk>
    <interface type='network'><mac address='52:54:00:00:00:01'/><source network='lan-b'/><model type='virtio'/></interface>
    <serial type='pty'>
      <log file='/var/log/libvirt/qemu/h1web-console.log' append='on'/>
    </serial>
    <console type='pty'/>
    <channel type='unix'>
      <target type='virtio' name='org.qemu.guest_agent.0'/>
    </channel>
    <memballoon model='none'/>
  </devices>
</domain>
";

fn roots() -> Roots {
    Roots {
        dirs: vec!["/srv/b".into(), "/srv/guest".into()],
        files: vec![],
    }
}

/// The genuine domain with `from` replaced by `to` (which must occur).
fn hostile(from: &str, to: &str) -> String {
    assert!(GENUINE.contains(from), "{from}");
    GENUINE.replacen(from, to, 1)
}

/// The refusal of `xml` without options: its findings' categories and the message.
fn refused(xml: &str) -> (Vec<Category>, String) {
    match check(xml, &roots(), &Allow::default()) {
        Ok(s) => panic!("accepted: {s:?}\n{xml}"),
        Err(e @ DomainCheckError::Refused(_)) => {
            let DomainCheckError::Refused(f) = &e else {
                unreachable!()
            };
            (f.iter().map(|f| f.category).collect(), e.to_string())
        }
        Err(e) => panic!("not a refusal: {e}"),
    }
}

fn allow(c: &[Category]) -> Allow {
    Allow {
        categories: c.iter().copied().collect(),
        agents: BTreeSet::new(),
    }
}

#[test]
fn the_genuine_domain_passes_and_lists_its_devices() {
    let s = check(GENUINE, &roots(), &Allow::default()).unwrap();
    assert!(s.allowed.is_empty());
    let d = s.devices.join("\n");
    assert!(d.contains("kernel /srv/guest/vmlinuz"), "{d}");
    assert!(d.contains("emulator /usr/bin/qemu-system-x86_64"), "{d}");
    assert!(
        d.contains("disk type=file device=disk source.file=/srv/b/h1web.img target.dev=vda"),
        "{d}"
    );
    assert!(
        d.contains("interface type=network") && d.contains("source.network=lan-b"),
        "{d}"
    );
    assert!(
        d.contains("serial type=pty log.file=/var/log/libvirt/qemu/h1web-console.log"),
        "{d}"
    );
    assert!(
        d.contains("channel type=unix target.name=org.qemu.guest_agent.0"),
        "{d}"
    );
}

#[test]
fn raw_qemu_arguments_are_refused_whatever_the_prefix() {
    for prefix in ["qemu", "q", "evil"] {
        let xml = hostile(
            "<domain type='qemu'>",
            &format!("<domain type='qemu' xmlns:{prefix}='{QEMU_NS}'>"),
        )
        .replace(
            "</devices>",
            &format!("</devices><{prefix}:commandline><{prefix}:arg value='-set'/></{prefix}:commandline>"),
        );
        let (cats, msg) = refused(&xml);
        assert!(cats.contains(&Category::QemuArgs), "{msg}");
        assert!(
            msg.contains(&format!("<{prefix}:commandline>")) && msg.contains("--allow qemu-args"),
            "{msg}"
        );
    }
    // The namespace as a default namespace on the element itself.
    let xml = hostile(
        "</devices>",
        &format!("</devices><capabilities xmlns='{QEMU_NS}'><add capability='x'/></capabilities>"),
    );
    assert!(refused(&xml).0.contains(&Category::QemuArgs));
    // A namespaced attribute.
    let xml = hostile(
        "<memballoon model='none'/>",
        &format!("<memballoon xmlns:x='{QEMU_NS}' x:opt='1' model='none'/>"),
    );
    assert!(refused(&xml).0.contains(&Category::QemuArgs));
    // Other namespaces are fine inside <metadata> only.
    let meta = "<metadata><libosinfo:libosinfo xmlns:libosinfo='http://libosinfo.org/xmlns/libvirt/domain/1.0'><libosinfo:os id='x'/></libosinfo:libosinfo></metadata>";
    check(&hostile("<vcpu", &format!("{meta}<vcpu")), &roots(), &Allow::default()).unwrap();
    let xml = hostile(
        "<vcpu",
        "<lxc:namespace xmlns:lxc='http://libvirt.org/schemas/domain/lxc/1.0'/><vcpu",
    );
    assert!(refused(&xml)
        .1
        .contains("namespace http://libvirt.org/schemas/domain/lxc/1.0"));
    // Allowed: listed.
    let xml = hostile(
        "</devices>",
        &format!("</devices><qemu:commandline xmlns:qemu='{QEMU_NS}'><qemu:arg value='-x'/></qemu:commandline>"),
    );
    let s = check(&xml, &roots(), &allow(&[Category::QemuArgs])).unwrap();
    assert_eq!(s.allowed.len(), 2, "{:?}", s.allowed);
    assert!(s.allowed[0].element.contains("<qemu:commandline>"));
}

#[test]
fn a_host_file_as_a_disk_is_refused() {
    for path in [
        "/etc/shadow",
        "/srv/b/../../etc/shadow",
        "srv/b/x.img",
        "/srv/bx/x.img",
        "/srv/b/./../x",
    ] {
        let (cats, msg) = refused(&hostile("/srv/b/h1web.img", path));
        assert_eq!(cats, [Category::HostPaths], "{path}: {msg}");
        assert!(msg.contains("<source file="), "{msg}");
    }
    // A path that normalises under a root is fine; a carried disk elsewhere too.
    check(
        &hostile("/srv/b/h1web.img", "/srv/b//./h7web.img"),
        &roots(),
        &Allow::default(),
    )
    .unwrap();
    let mut r = roots();
    r.files.push("/data/h7web.img".into());
    check(&hostile("/srv/b/h1web.img", "/data/h7web.img"), &r, &Allow::default()).unwrap();
    // Allowed: shown.
    let s = check(
        &hostile("/srv/b/h1web.img", "/etc/shadow"),
        &roots(),
        &allow(&[Category::HostPaths]),
    )
    .unwrap();
    assert!(
        s.allowed[0].why.contains("/etc/shadow is outside every storage root"),
        "{:?}",
        s.allowed
    );
}

#[test]
fn boot_files_logs_and_sockets_must_be_in_storage() {
    for (from, to, what) in [
        ("/srv/guest/vmlinuz", "/boot/vmlinuz", "kernel"),
        ("/srv/guest/initrd.gz", "/etc/shadow", "initrd"),
        (
            "<cmdline>",
            "<loader readonly='yes'>/etc/shadow</loader><cmdline>",
            "loader",
        ),
        ("<cmdline>", "<nvram>/etc/passwd</nvram><cmdline>", "nvram"),
        ("/var/log/libvirt/qemu/h1web-console.log", "/etc/cron.d/evil", "log"),
        (
            "/var/log/libvirt/qemu/h1web-console.log",
            "/var/log/libvirt/qemu/../../../etc/x",
            "log",
        ),
        (
            "<channel type='unix'>",
            "<channel type='unix'><source mode='bind' path='/run/evil.sock'/>",
            "source",
        ),
        ("<features><acpi/></features>", "<features><acpi/></features>", "none"),
    ] {
        let xml = hostile(from, to);
        if what == "none" {
            check(&xml, &roots(), &Allow::default()).unwrap();
            continue;
        }
        let (cats, msg) = refused(&xml);
        assert_eq!(cats, [Category::HostPaths], "{what}: {msg}");
        assert!(msg.contains(&format!("<{what}")), "{what}: {msg}");
    }
    // Firmware from the distribution is fine.
    check(
        &hostile("<cmdline>", "<loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE.fd</loader><nvram template='/usr/share/OVMF/OVMF_VARS.fd'>/srv/b/web_VARS.fd</nvram><cmdline>"),
        &roots(),
        &Allow::default(),
    )
    .unwrap();
}

#[test]
fn seclabel_overrides_are_refused() {
    for label in [
        "<seclabel type='none'/>",
        "<seclabel type='static' model='dac'><label>0:0</label></seclabel>",
        "<seclabel type='dynamic' model='dac' relabel='no'/>",
        "<seclabel type='dynamic' model='selinux'><baselabel>unconfined_u:unconfined_r:unconfined_t:s0</baselabel></seclabel>",
    ] {
        let (cats, msg) = refused(&hostile("</devices>", &format!("</devices>{label}")));
        assert_eq!(cats, [Category::Seclabel], "{msg}");
        assert!(msg.contains("<seclabel"), "{msg}");
    }
    // Device level.
    let xml = hostile(
        "<source file='/srv/b/h1web.img'/>",
        "<source file='/srv/b/h1web.img'><seclabel model='dac' relabel='no'/></source>",
    );
    let (cats, msg) = refused(&xml);
    assert_eq!(cats, [Category::Seclabel], "{msg}");
    assert!(msg.contains("in <source>"), "{msg}");
    // The default is fine.
    check(
        &hostile(
            "</devices>",
            "</devices><seclabel type='dynamic' model='dac' relabel='yes'/>",
        ),
        &roots(),
        &Allow::default(),
    )
    .unwrap();
    check(
        &hostile("</devices>", "</devices><seclabel type='none'/>"),
        &roots(),
        &allow(&[Category::Seclabel]),
    )
    .unwrap();
}

#[test]
fn host_devices_are_refused() {
    for (device, cat, name) in [
        ("<disk type='block' device='disk'><source dev='/dev/sda'/><target dev='vdb'/></disk>", Category::HostDevices, "<disk type='block'"),
        ("<disk type='volume' device='disk'><source pool='default' volume='x'/><target dev='vdb'/></disk>", Category::HostDevices, "<disk type='volume'"),
        ("<disk type='network' device='disk'><source protocol='nbd' name='x'><host name='10.0.0.1'/></source><target dev='vdb'/></disk>", Category::HostDevices, "<disk type='network'"),
        ("<hostdev mode='subsystem' type='pci'><source><address domain='0' bus='1' slot='0' function='0'/></source></hostdev>", Category::Hostdev, "<hostdev"),
        ("<interface type='hostdev'><source><address type='pci' bus='1'/></source></interface>", Category::Hostdev, "<interface type='hostdev'"),
        ("<interface type='direct'><source dev='eth0' mode='bridge'/></interface>", Category::HostDevices, "<interface type='direct'"),
        ("<serial type='dev'><source path='/dev/ttyS0'/></serial>", Category::HostDevices, "<serial type='dev'"),
        ("<channel type='tcp'><source mode='connect' host='10.0.0.1' service='22'/><target type='virtio' name='x'/></channel>", Category::HostDevices, "<channel type='tcp'"),
        ("<filesystem type='mount'><source dir='/'/><target dir='root'/></filesystem>", Category::Filesystem, "<filesystem"),
        ("<tpm model='tpm-tis'><backend type='passthrough'><device path='/dev/tpm0'/></backend></tpm>", Category::HostDevices, "<backend type='passthrough'"),
        ("<rng model='virtio'><backend model='random'>/dev/sda</backend></rng>", Category::HostDevices, "<backend model='random'"),
        ("<input type='evdev'><source dev='/dev/input/event0'/></input>", Category::HostDevices, "<input type='evdev'"),
        ("<interface type='ethernet'><script path='/srv/b/up.sh'/></interface>", Category::Scripts, "<script"),
        (
            "<interface type='ethernet'><target dev='vnet7' managed='no'/></interface>",
            Category::HostDevices,
            "<interface",
        ),
    ] {
        let (cats, msg) = refused(&hostile("<memballoon", &format!("{device}<memballoon")));
        assert!(cats.contains(&cat), "{device}: {cats:?} {msg}");
        assert!(msg.contains(name), "{device}: {msg}");
        assert!(msg.contains(&format!("--allow {cat}")), "{msg}");
    }
}

#[test]
fn the_emulator_is_one_of_the_hosts() {
    for e in [
        "/tmp/qemu-system-x86_64",
        "/usr/bin/sh",
        "/usr/bin/qemu-system-",
        "/usr/bin/../../tmp/qemu-kvm",
        "qemu-kvm",
    ] {
        let (cats, msg) = refused(&hostile("/usr/bin/qemu-system-x86_64", e));
        assert_eq!(cats, [Category::Emulator], "{e}: {msg}");
        assert!(msg.contains("<emulator>"), "{msg}");
    }
    for e in ["/usr/libexec/qemu-kvm", "/usr/bin/qemu-system-aarch64", "/usr/bin/kvm"] {
        check(&hostile("/usr/bin/qemu-system-x86_64", e), &roots(), &Allow::default()).unwrap();
    }
    // Without an emulator libvirt picks the host's.
    check(
        &hostile("<emulator>/usr/bin/qemu-system-x86_64</emulator>", ""),
        &roots(),
        &Allow::default(),
    )
    .unwrap();
}

#[test]
fn every_refusal_is_reported_at_once_and_control_characters_are_escaped() {
    let xml = hostile("/srv/b/h1web.img", "/etc/shadow\u{9b}2J\u{202e}")
        .replace("</devices>", "</devices><seclabel type='none'/>");
    let (cats, msg) = refused(&xml);
    assert_eq!(cats, [Category::HostPaths, Category::Seclabel]);
    assert!(!msg.chars().any(|c| c.is_control()), "{msg:?}");
    assert!(msg.contains("\\u{9b}2J\\u{202e}"), "{msg}");
}

#[test]
fn not_a_domain_or_a_dtd_is_an_error() {
    assert!(matches!(
        check("<network/>", &roots(), &Allow::default()),
        Err(DomainCheckError::Xml(_))
    ));
    let dtd = "<!DOCTYPE domain [<!ENTITY x SYSTEM '/etc/shadow'>]><domain>&x;</domain>";
    assert!(matches!(
        check(dtd, &roots(), &Allow::default()),
        Err(DomainCheckError::Xml(_))
    ));
    assert!(matches!(
        check("<domain", &roots(), &Allow::default()),
        Err(DomainCheckError::Xml(_))
    ));
}

#[test]
fn allow_parses_categories_and_agents() {
    let a = Allow::parse(&["qemu-args,seclabel".into(), "agent=ocf:heartbeat:anything".into()]).unwrap();
    assert!(a.has(Category::QemuArgs) && a.has(Category::Seclabel) && !a.has(Category::Hostdev));
    assert!(a.agent("ocf:heartbeat:anything") && a.agent("ocf:vmha:VirtualMachine") && !a.agent("ocf:heartbeat:Dummy"));
    assert_eq!(Allow::parse(&a.to_items()).unwrap(), a);
    assert!(Allow::parse(&["everything".into()])
        .unwrap_err()
        .contains("unknown category"));
    assert!(Allow::parse(&["agent=ocf:x:a b".into()]).is_err());
}

#[test]
fn paths_normalise_without_resolving_dotdot() {
    assert_eq!(normalise("/srv//b/./x").as_deref(), Some("/srv/b/x"));
    assert_eq!(normalise("/"), Some("/".into()));
    assert_eq!(normalise("/srv/b/../x"), None);
    assert_eq!(normalise("srv"), None);
    assert!(under("/srv/b/x", "/srv/b") && !under("/srv/bx", "/srv/b") && under("/x", "/"));
}

#[test]
fn vmhas_own_guest_channel_passes_and_only_for_this_domain() {
    let own = vmha_model::domain::guest_channel_xml("h1web");
    check(
        &hostile("<memballoon", &format!("{own}<memballoon")),
        &roots(),
        &Allow::default(),
    )
    .unwrap();
    // Another domain's socket, or the socket on another port: a host path.
    let other = vmha_model::domain::guest_channel_xml("prod");
    let (cats, msg) = refused(&hostile("<memballoon", &format!("{other}<memballoon")));
    assert_eq!(cats, [Category::HostPaths], "{msg}");
    let wrong_port = own.replace("org.vmha.guest.0", "org.example.0");
    assert_eq!(
        refused(&hostile("<memballoon", &format!("{wrong_port}<memballoon"))).0,
        [Category::HostPaths]
    );
}

#[test]
fn a_tap_interface_libvirt_creates_passes() {
    let xml = hostile(
        "<interface type='network'><mac address='52:54:00:00:00:01'/><source network='lan-b'/>",
        "<interface type='ethernet'><mac address='52:54:00:00:00:01'/><target dev='vnet3'/>",
    );
    check(&xml, &roots(), &Allow::default()).expect("a tap libvirt creates for the guest is no host device");
}
