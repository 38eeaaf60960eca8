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

    // A change needs an authorized caller; a peer-to-peer call has no sender to ask polkit about.
    match vm.start().await {
        Err(Error::AccessDenied(m)) => assert!(m.contains("start VM vm-1"), "{m}"),
        other => panic!("expected AccessDenied, got {other:?}"),
    }
    match cluster.clone_vm_interactive("vm-1", "", "", 1, false).await {
        Err(Error::AccessDenied(_)) => {}
        other => panic!("expected AccessDenied, got {other:?}"),
    }
}
