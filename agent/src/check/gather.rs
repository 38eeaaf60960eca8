//! Reading the facts `vmha check` evaluates. Every call has a deadline; a fact that cannot be read in
//! time becomes an `Err` with the reason, never a hang.

use std::future::Future;
use std::time::Duration;

use vmha_corosync::{Cmap, CmapValue, Votequorum};
use vmha_pacemaker::{Access, Cib};
use zbus::Connection;

use super::{CibFacts, Inputs, QuorumFacts, ShutdownFacts, TotemFacts, VmhadFacts};
use crate::api::proxy::ReadinessProxy;
use crate::api::{BUS_NAME, CLUSTER_INTERFACE, ROOT_PATH};
use crate::readiness::ReceivedReport;

async fn bounded<T, E: std::fmt::Display>(
    what: &str,
    limit: Duration,
    f: impl Future<Output = Result<T, E>>,
) -> Result<T, String> {
    match tokio::time::timeout(limit, f).await {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(_) => Err(format!("{what}: no answer within {} s", limit.as_secs())),
    }
}

/// Reads every fact; `limit` bounds each call.
pub async fn gather(conn: &Connection, hypervisor: &str, limit: Duration) -> Inputs {
    let (cib, corosync, libvirt, vmhad, reports, shutdown) = tokio::join!(
        cib_facts(limit),
        corosync_facts(limit),
        libvirt_version(hypervisor, limit),
        vmhad_facts(conn, limit),
        reports(conn, limit),
        shutdown_facts(limit),
    );
    let (quorum, totem) = match corosync {
        Ok((q, t)) => (Ok(q), Ok(t)),
        Err(e) => (Err(e.clone()), Err(e)),
    };
    Inputs {
        cib,
        quorum,
        totem,
        libvirt,
        hypervisor: hypervisor.to_string(),
        vmhad,
        reports,
        shutdown,
    }
}

/// The unit files and libvirt-guests' settings, read from this host's disk.
async fn shutdown_facts(limit: Duration) -> Result<ShutdownFacts, String> {
    let read = tokio::task::spawn_blocking(|| ShutdownFacts::read(std::path::Path::new("/")));
    match tokio::time::timeout(limit, read).await {
        Ok(Ok(facts)) => Ok(facts),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!(
            "reading the systemd units: no answer within {} s",
            limit.as_secs()
        )),
    }
}

async fn cib_facts(limit: Duration) -> Result<CibFacts, String> {
    let cib = bounded(
        "connecting to the CIB",
        limit,
        Cib::connect("vmha-check", Access::ReadOnly, limit),
    )
    .await?;
    let xml = bounded("reading the CIB", limit, cib.query_all(limit)).await?;
    CibFacts::parse(&xml)
}

fn number(v: Option<CmapValue>) -> Option<u32> {
    v.and_then(|v| v.as_i128()).and_then(|n| u32::try_from(n).ok())
}

async fn corosync_facts(limit: Duration) -> Result<(QuorumFacts, TotemFacts), String> {
    let cmap = bounded("connecting to Corosync's cmap", limit, Cmap::connect(limit)).await?;
    let nodes =
        u32::try_from(bounded("reading the nodelist", limit, cmap.node_names()).await?.len()).unwrap_or(u32::MAX);
    let get = |key: &'static str| {
        let cmap = &cmap;
        async move { bounded(key, limit, cmap.get_opt(key)).await.map(number) }
    };
    let effective_token_ms = get("runtime.config.totem.token")
        .await?
        .ok_or("Corosync does not report runtime.config.totem.token")?;
    let totem = TotemFacts {
        configured_token_ms: get("totem.token").await?,
        token_coefficient_ms: get("totem.token_coefficient").await?,
        effective_token_ms,
        consensus_ms: get("runtime.config.totem.consensus").await?,
        nodes,
    };
    let this_node = get("runtime.votequorum.this_node_id").await?.unwrap_or(0);
    let (votequorum, _events) = bounded("connecting to votequorum", limit, Votequorum::connect(limit)).await?;
    let info = bounded("votequorum_getinfo", limit, votequorum.get_info(this_node)).await?;
    let quorum = QuorumFacts {
        nodes,
        quorate: info.flags.quorate(),
        expected_votes: info.expected_votes,
        total_votes: info.total_votes,
        quorum: info.quorum,
        two_node: info.flags.two_node(),
        wait_for_all: info.flags.wait_for_all(),
        last_man_standing: info.flags.last_man_standing(),
        qdevice: info.flags.qdevice_registered(),
    };
    Ok((quorum, totem))
}

async fn libvirt_version(uri: &str, limit: Duration) -> Result<String, String> {
    let uri = uri.to_string();
    let probe = tokio::task::spawn_blocking(move || {
        let conn = virt::connect::Connect::open_read_only(Some(&uri)).map_err(|e| e.to_string())?;
        conn.lib_version().map_err(|e| e.to_string())
    });
    match tokio::time::timeout(limit, probe).await {
        Ok(Ok(Ok(v))) => Ok(format!("{}.{}.{}", v / 1_000_000, v / 1000 % 1000, v % 1000)),
        Ok(Ok(Err(e))) => Err(e),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer within {} s (is libvirtd hung?)", limit.as_secs())),
    }
}

async fn vmhad_facts(conn: &Connection, limit: Duration) -> Result<VmhadFacts, String> {
    let props = zbus::fdo::PropertiesProxy::builder(conn)
        .destination(BUS_NAME)
        .and_then(|b| b.path(ROOT_PATH))
        .map_err(|e| e.to_string())?
        .build()
        .await
        .map_err(|e| e.to_string())?;
    let iface = zbus::names::InterfaceName::try_from(CLUSTER_INTERFACE).map_err(|e| e.to_string())?;
    let all = bounded("vmhad", limit, props.get_all(iface)).await?;
    let strings = |key: &str| -> Vec<String> {
        all.get(key)
            .and_then(|v| Vec::<String>::try_from(v.try_clone().ok()?).ok())
            .unwrap_or_default()
    };
    Ok(VmhadFacts {
        local_host: all
            .get("LocalHost")
            .and_then(|v| String::try_from(v.try_clone().ok()?).ok())
            .unwrap_or_default(),
        members: strings("Members"),
        agents: strings("Agents"),
    })
}

async fn reports(conn: &Connection, limit: Duration) -> Result<Vec<ReceivedReport>, String> {
    let call = async {
        let proxy = ReadinessProxy::builder(conn)
            .cache_properties(zbus::proxy::CacheProperties::No)
            .build()
            .await?;
        proxy.reports().await
    };
    // A bus error reads as zbus writes it (name: message), as vmhad's own errors do by their message.
    let json = bounded("vmhad's readiness reports", limit, async {
        call.await.map_err(|e| match e {
            crate::api::Error::ZBus(z) => z.to_string(),
            vmhad => format!("{}: {vmhad}", vmhad.short_name()),
        })
    })
    .await?;
    serde_json::from_str(&json).map_err(|e| format!("vmhad's readiness reports: {e}"))
}
