//! Test: what vmhad serves on D-Bus is what `packaging/dbus/interfaces/*.xml` describes. The real
//! objects (Cluster, Host, VirtualMachine, Job, Readiness) are served on a peer-to-peer connection (no
//! bus, no root); their introspection is compared with the shipped XML: every method with its
//! arguments' types and directions (and the names of input arguments), every signal with its arguments'
//! types, every property with its type and access.

use std::collections::BTreeMap;
use std::sync::Arc;

use zbus::connection::Builder;

use crate::api::{self, Error};
use crate::backend::RecordingCib;
use crate::jobs::Job;
use crate::objects::{ClusterObject, HostObject, VmObject};
use crate::readiness::{ReadinessObject, Reports};
use crate::state::Shared;

/// One interface as a comparable summary: `method Name(in s name, out o)`, `signal ...`, `property ...`.
fn summary(xml: &str, interface: &str) -> BTreeMap<String, String> {
    let options = roxmltree::ParsingOptions {
        allow_dtd: true,
        ..Default::default()
    };
    let doc = roxmltree::Document::parse_with_options(xml, options).expect("introspection XML parses");
    let iface = doc
        .descendants()
        .find(|n| n.has_tag_name("interface") && n.attribute("name") == Some(interface))
        .unwrap_or_else(|| panic!("no interface {interface} in\n{xml}"));
    let mut out = BTreeMap::new();
    for member in iface.children().filter(|n| n.is_element()) {
        let name = member.attribute("name").unwrap_or("?");
        let kind = member.tag_name().name();
        let value = match kind {
            "method" | "signal" => member
                .children()
                .filter(|n| n.has_tag_name("arg"))
                .map(|a| {
                    let dir = a
                        .attribute("direction")
                        .unwrap_or(if kind == "signal" { "out" } else { "in" });
                    let ty = a.attribute("type").unwrap_or("?");
                    // Input names are part of the documentation; output names zbus does not know.
                    match (dir, a.attribute("name")) {
                        ("in", Some(n)) => format!("{dir} {ty} {n}"),
                        _ => format!("{dir} {ty}"),
                    }
                })
                .collect::<Vec<_>>()
                .join(", "),
            "property" => format!(
                "{} {}",
                member.attribute("type").unwrap_or("?"),
                member.attribute("access").unwrap_or("?")
            ),
            _ => continue,
        };
        out.insert(format!("{kind} {name}"), value);
    }
    out
}

/// The shipped XML of `interface`.
fn shipped(interface: &str) -> String {
    let path = format!(
        "{}/../packaging/dbus/interfaces/{interface}.xml",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// A served connection (vmhad's side) and a client, joined peer to peer.
async fn pair(shared: &Arc<Shared>) -> (zbus::Connection, zbus::Connection) {
    let (a, b) = tokio::net::UnixStream::pair().unwrap();
    let guid = zbus::Guid::generate();
    let server = Builder::unix_stream(a)
        .server(guid)
        .unwrap()
        .p2p()
        .serve_at(
            api::ROOT_PATH,
            ClusterObject {
                shared: Arc::clone(shared),
            },
        )
        .unwrap()
        .serve_at(api::ROOT_PATH, zbus::fdo::ObjectManager)
        .unwrap()
        .serve_at(
            api::READINESS_PATH,
            ReadinessObject {
                reports: Reports::new(),
            },
        )
        .unwrap()
        .serve_at(
            api::host_path("node-1"),
            HostObject {
                shared: Arc::clone(shared),
                name: "node-1".into(),
            },
        )
        .unwrap()
        .serve_at(
            api::vm_path("vm-1"),
            VmObject {
                shared: Arc::clone(shared),
                name: "vm-1".into(),
            },
        )
        .unwrap()
        .build();
    let client = Builder::unix_stream(b).p2p().build();
    let (server, client) = tokio::join!(server, client);
    (server.unwrap(), client.unwrap())
}

fn shared() -> Arc<Shared> {
    Shared::new("node-1".into(), Arc::new(RecordingCib::new("<cib/>")))
}

#[tokio::test]
async fn served_interfaces_match_the_shipped_xml() {
    let shared = shared();
    let (server, client) = pair(&shared).await;
    let job = Job::create(&server, &shared, "start", "vm-1".into()).await.unwrap();
    let objects = [
        (api::ROOT_PATH.to_string(), api::CLUSTER_INTERFACE),
        (api::host_path("node-1"), api::HOST_INTERFACE),
        (api::vm_path("vm-1"), api::VM_INTERFACE),
        (job.path().to_string(), api::JOB_INTERFACE),
        (api::READINESS_PATH.to_string(), api::READINESS_INTERFACE),
    ];
    let mut wrong = Vec::new();
    for (path, interface) in objects {
        let reply = client
            .call_method(
                None::<&str>,
                path.as_str(),
                Some("org.freedesktop.DBus.Introspectable"),
                "Introspect",
                &(),
            )
            .await
            .unwrap();
        let served: String = reply.body().deserialize().unwrap();
        let (served, shipped) = (summary(&served, interface), summary(&shipped(interface), interface));
        for key in served
            .keys()
            .chain(shipped.keys())
            .collect::<std::collections::BTreeSet<_>>()
        {
            match (served.get(key), shipped.get(key)) {
                (Some(a), Some(b)) if a == b => {}
                (a, b) => wrong.push(format!("{interface} {key}: vmhad serves {a:?}, the XML says {b:?}")),
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "vmhad and packaging/dbus/interfaces disagree:\n{}",
        wrong.join("\n")
    );
}

#[tokio::test]
async fn the_api_proxies_read_what_vmhad_serves_and_get_typed_errors() {
    let shared = shared();
    let (server, client) = pair(&shared).await;
    let job = Job::create(&server, &shared, "start", "vm-1".into()).await.unwrap();

    let cluster = api::proxy::ClusterProxy::new(&client).await.unwrap();
    assert_eq!(cluster.local_host().await.unwrap(), "node-1");
    assert!(!cluster.connected().await.unwrap());
    assert_eq!(cluster.cib_version().await.unwrap(), "");
    let host = api::proxy::HostProxy::builder(&client)
        .path(api::host_path("node-1"))
        .unwrap()
        .build()
        .await
        .unwrap();
    assert!(!host.standby().await.unwrap());
    let vm = api::proxy::VirtualMachineProxy::builder(&client)
        .path(api::vm_path("vm-1"))
        .unwrap()
        .build()
        .await
        .unwrap();
    assert_eq!(vm.name().await.unwrap(), "vm-1");
    let j = api::proxy::JobProxy::builder(&client)
        .path(job.path())
        .unwrap()
        .build()
        .await
        .unwrap();
    assert_eq!(j.kind().await.unwrap(), "start");
    assert_eq!(j.state().await.unwrap(), "running");
    let readiness = api::proxy::ReadinessProxy::new(&client).await.unwrap();
    assert_eq!(readiness.reports().await.unwrap(), "[]");

    // Every property of every proxy reads (its type matches what vmhad serves).
    let (_, _, _, _, _, _, _, _, _, _, _) = (
        cluster.name().await.unwrap(),
        cluster.quorate().await.unwrap(),
        cluster.designated_controller().await.unwrap(),
        cluster.members().await.unwrap(),
        cluster.agents().await.unwrap(),
        cluster.local_host().await.unwrap(),
        cluster.stonith_enabled().await.unwrap(),
        cluster.connected().await.unwrap(),
        cluster.cib_version().await.unwrap(),
        cluster.virtual_clusters().await.unwrap(),
        cluster.elastic_groups().await.unwrap(),
    );
    let (_, _, _, _, _, _) = (
        host.name().await.unwrap(),
        host.state().await.unwrap(),
        host.standby().await.unwrap(),
        host.maintenance().await.unwrap(),
        host.is_designated_controller().await.unwrap(),
        host.utilization().await.unwrap(),
    );
    let (_, _, _, _, _, _, _, _, _, _, _) = (
        vm.name().await.unwrap(),
        vm.agent().await.unwrap(),
        vm.state().await.unwrap(),
        vm.hosts().await.unwrap(),
        vm.failed_on().await.unwrap(),
        vm.fail_counts().await.unwrap(),
        vm.target_role().await.unwrap(),
        vm.managed().await.unwrap(),
        vm.config().await.unwrap(),
        vm.constraints().await.unwrap(),
        vm.utilization().await.unwrap(),
    );
    let (_, _, _, _) = (
        j.target().await.unwrap(),
        j.progress().await.unwrap(),
        j.message().await.unwrap(),
        j.details().await.unwrap(),
    );

    // Every method of every proxy, plain and interactive, reaches vmhad's method (a wrong name or
    // signature would be UnknownMethod or InvalidArgs): a change needs an authorized caller, and a
    // peer-to-peer call has no sender to ask polkit about, so each is AccessDenied.
    fn denied<T: std::fmt::Debug>(what: &str, r: Result<T, Error>) {
        match r {
            Err(Error::AccessDenied(m)) => assert!(m.contains("no sender"), "{what}: {m}"),
            other => panic!("{what}: expected AccessDenied, got {other:?}"),
        }
    }
    use std::os::fd::AsFd;
    let file = std::fs::File::open("/dev/null").unwrap();
    let fd = || zbus::zvariant::Fd::from(file.as_fd());
    let keys = [("k", "key")];
    denied("AddVm", cluster.add_vm("vm-2", "/x.xml", true).await);
    denied("AddVm!", cluster.add_vm_interactive("vm-2", "/x.xml", true).await);
    denied("CloneVm", cluster.clone_vm("vm-1", "", "", 1, false).await);
    denied("CloneVm!", cluster.clone_vm_interactive("vm-1", "", "", 1, false).await);
    denied("ScaleGroup", cluster.scale_group("web", 3, false, 30_000).await);
    denied("ScaleGroup!", cluster.scale_group_interactive("web", 1, true, 1).await);
    denied(
        "Capture",
        cluster.capture_vcluster("g", fd(), false, false, 3, &[fd()]).await,
    );
    denied(
        "Capture!",
        cluster
            .capture_vcluster_interactive("g", fd(), false, false, 3, &[])
            .await,
    );
    denied(
        "Instantiate",
        cluster
            .instantiate_vcluster(fd(), &["hosts=a:b"], "", true, 0, &[], false, &keys)
            .await,
    );
    denied(
        "Instantiate!",
        cluster
            .instantiate_vcluster_interactive(fd(), &[], "n", false, 9, &["qemu-args"], true, &[])
            .await,
    );
    denied("SetStandby", host.set_standby(true).await);
    denied("SetStandby!", host.set_standby_interactive(false).await);
    denied("SetMaintenance", host.set_maintenance(true).await);
    denied("SetMaintenance!", host.set_maintenance_interactive(false).await);
    denied("Start", vm.start().await);
    denied("Start!", vm.start_interactive().await);
    denied("Stop", vm.stop().await);
    denied("Stop!", vm.stop_interactive().await);
    denied("Cleanup", vm.cleanup("").await);
    denied("Cleanup!", vm.cleanup_interactive("node-1").await);
    denied("Move", vm.move_to("node-2").await);
    denied("Move!", vm.move_to_interactive("node-2").await);
    denied("GuestRequest", vm.guest_request("drain", "{}", 10).await);
    denied("GuestRequest!", vm.guest_request_interactive("drain", "{}", 10).await);
    denied("Destroy", vm.destroy().await);
    denied("Destroy!", vm.destroy_interactive().await);
    denied("Remove", vm.remove().await);
    denied("Remove!", vm.remove_interactive().await);
    // A missing object is the bus's error, not one of vmhad's.
    let nothing = api::proxy::VirtualMachineProxy::builder(&client)
        .path(api::vm_path("nosuch"))
        .unwrap()
        .build()
        .await
        .unwrap();
    match nothing.start().await {
        Err(e @ Error::ZBus(_)) => assert_eq!(e.short_name(), "org.freedesktop.DBus.Error.UnknownObject"),
        other => panic!("expected UnknownObject, got {other:?}"),
    }
}

/// The `_interactive` proxy methods set ALLOW_INTERACTIVE_AUTHORIZATION, the plain ones do not: what
/// vmhad reads to give polkit time for an authentication agent.
#[tokio::test]
async fn interactive_proxy_methods_allow_interactive_authorization() {
    use futures_util::StreamExt;
    let (a, b) = tokio::net::UnixStream::pair().unwrap();
    let guid = zbus::Guid::generate();
    let server = Builder::unix_stream(a).server(guid).unwrap().p2p().build();
    let client = Builder::unix_stream(b).p2p().build();
    let (server, client) = tokio::join!(server, client);
    let (server, client) = (server.unwrap(), client.unwrap());
    let mut calls = zbus::MessageStream::from(&server);
    let vm = api::proxy::VirtualMachineProxy::builder(&client)
        .path(api::vm_path("vm-1"))
        .unwrap()
        .build()
        .await
        .unwrap();
    for interactive in [false, true] {
        let call = async {
            if interactive {
                vm.stop_interactive().await
            } else {
                vm.stop().await
            }
        };
        let seen = async {
            loop {
                let m = calls.next().await.unwrap().unwrap();
                if m.header().member().is_some_and(|n| n.as_str() == "Stop") {
                    let flag = crate::auth::allows_interaction(&m.header());
                    let reply = zbus::fdo::Error::AccessDenied("test".into());
                    server.reply_dbus_error(&m.header(), reply).await.unwrap();
                    return flag;
                }
            }
        };
        let (r, flag) = tokio::join!(call, seen);
        assert!(matches!(r, Err(Error::ZBus(_))), "{r:?}");
        assert_eq!(flag, interactive);
    }
}

/// A CIB with the virtual cluster `shop` and a stored policy with the elastic group `web` (no hosts, no
/// VMs), at `epoch`.
fn cib_with_lists(epoch: u32, tags: &str) -> String {
    let policy = r#"{"groups": {"web": {"members": ["vm1"], "template": "vm1", "min": 1, "max": 3}}}"#;
    format!(
        r#"<cib admin_epoch="0" epoch="{epoch}" num_updates="0"><configuration><crm_config><cluster_property_set id="vmha-policy"><nvpair id="vmha-policy-p" name="vmha-policy" value="{}"/></cluster_property_set></crm_config><nodes/><resources/><constraints/>{tags}</configuration><status/></cib>"#,
        vmha_model::change::escape(policy)
    )
}

/// The Cluster's changed properties in the next PropertiesChanged signals, until one names `until`.
async fn changed_until(signals: &mut zbus::MessageStream, until: &str) -> Vec<Vec<String>> {
    use futures_util::StreamExt;
    let mut seen = Vec::new();
    let wait = async {
        loop {
            let m = signals.next().await.unwrap().unwrap();
            let h = m.header();
            if h.member().is_none_or(|n| n.as_str() != "PropertiesChanged") {
                continue;
            }
            let (iface, props, _): (
                String,
                std::collections::HashMap<String, zbus::zvariant::OwnedValue>,
                Vec<String>,
            ) = m.body().deserialize().unwrap();
            if iface != api::CLUSTER_INTERFACE {
                continue;
            }
            let mut names: Vec<String> = props.keys().cloned().collect();
            names.sort();
            let done = names.iter().any(|n| n == until);
            seen.push(names);
            if done {
                return;
            }
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(10), wait)
        .await
        .unwrap_or_else(|_| panic!("no PropertiesChanged of {until} within 10 s: {seen:?}"));
    seen
}

/// The lists of virtual clusters and elastic groups are published: PropertiesChanged when the CIB's tags
/// or stored policy change (and not when only something else changes), and the properties read them.
#[tokio::test]
async fn virtual_clusters_and_elastic_groups_are_published_when_they_change() {
    let shared = shared();
    let (server, client) = pair(&shared).await;
    let mut signals = zbus::MessageStream::from(&client);
    let shop = r#"<tags><tag id="shop"><obj_ref id="vm1"/><obj_ref id="ip1"/></tag></tags>"#;
    let publish = |xml: String| {
        let (server, shared) = (server.clone(), Arc::clone(&shared));
        async move {
            let old = shared.replace_view(vmha_model::ClusterView::from_cib(&xml).unwrap());
            crate::objects::publish(&server, &shared, &old, &shared.snapshot())
                .await
                .unwrap();
        }
    };

    publish(cib_with_lists(1, shop)).await;
    let seen = changed_until(&mut signals, "ElasticGroups").await;
    assert!(seen.iter().flatten().any(|n| n == "VirtualClusters"), "{seen:?}");
    let cluster = api::proxy::ClusterProxy::new(&client).await.unwrap();
    assert_eq!(
        cluster.virtual_clusters().await.unwrap(),
        [("shop".to_string(), vec!["vm1".to_string(), "ip1".to_string()])]
    );
    assert_eq!(
        cluster.elastic_groups().await.unwrap(),
        [("web".to_string(), "vm1".to_string(), 1, 3, vec!["vm1".to_string()])]
    );

    // Only the version changes: its signal, none for the lists.
    publish(cib_with_lists(2, shop)).await;
    let seen = changed_until(&mut signals, "CibVersion").await;
    assert!(
        !seen
            .iter()
            .flatten()
            .any(|n| n == "VirtualClusters" || n == "ElasticGroups"),
        "{seen:?}"
    );

    // The tags go: the virtual clusters change, the groups do not.
    publish(cib_with_lists(3, "")).await;
    let seen = changed_until(&mut signals, "VirtualClusters").await;
    assert!(!seen.iter().flatten().any(|n| n == "ElasticGroups"), "{seen:?}");
    let fresh = api::proxy::ClusterProxy::builder(&client)
        .cache_properties(zbus::proxy::CacheProperties::No)
        .build()
        .await
        .unwrap();
    assert!(fresh.virtual_clusters().await.unwrap().is_empty());
    assert_eq!(fresh.elastic_groups().await.unwrap().len(), 1);
}
