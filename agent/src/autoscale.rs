//! The load signal of elastic groups' autoscale rule: each member's CPU load, measured through libvirt
//! on the host that runs it (two samples of the domain's CPU time, `sample` apart).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Result};
use virt::connect::Connect;

/// How long the libvirt calls of one measurement may take beyond the sample itself.
const LIBVIRT_SLACK: Duration = Duration::from_secs(30);

/// The libvirt URI of `host`: `local` for this host, `peer` with `{host}` replaced otherwise.
pub fn uri_for(host: &str, local_host: &str, local: &str, peer: &str) -> String {
    if host == local_host {
        local.to_string()
    } else {
        peer.replace("{host}", host)
    }
}

/// CPU load (percent of its vCPUs) of each VM in `members` (vm -> the libvirt URI of its host), measured
/// over `sample`. A VM that cannot be measured is an error naming it.
pub async fn measure(members: BTreeMap<String, String>, sample: Duration) -> Result<BTreeMap<String, f64>> {
    let limit = sample + LIBVIRT_SLACK;
    let work = tokio::task::spawn_blocking(move || -> Result<BTreeMap<String, f64>> {
        let mut conns: BTreeMap<String, Connect> = BTreeMap::new();
        for uri in members.values() {
            if !conns.contains_key(uri) {
                let c = Connect::open(Some(uri)).map_err(|e| anyhow!("libvirt at {uri}: {e}"))?;
                conns.insert(uri.clone(), c);
            }
        }
        let info = |vm: &str, uri: &str| -> Result<(u64, u32)> {
            let dom = conns[uri]
                .lookup_domain_by_name(vm)
                .map_err(|e| anyhow!("VM {vm} at {uri}: {e}"))?;
            let i = dom.info().map_err(|e| anyhow!("VM {vm} at {uri}: {e}"))?;
            Ok((i.cpu_time, i.nr_virt_cpu))
        };
        let first: Vec<(String, String, (u64, u32))> = members
            .iter()
            .map(|(vm, uri)| Ok((vm.clone(), uri.clone(), info(vm, uri)?)))
            .collect::<Result<_>>()?;
        let t0 = Instant::now();
        std::thread::sleep(sample);
        let mut out = BTreeMap::new();
        for (vm, uri, (before, _)) in first {
            let (after, vcpus) = info(&vm, &uri)?;
            out.insert(vm, vmha_model::group::cpu_percent(before, after, t0.elapsed(), vcpus));
        }
        Ok(out)
    });
    match tokio::time::timeout(limit, work).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => Err(anyhow!("measuring the members' load: {e}")),
        Err(_) => Err(anyhow!(
            "measuring the members' load: libvirt did not answer within {} s",
            limit.as_secs()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_name_the_host() {
        assert_eq!(
            uri_for("n1", "n1", "qemu:///system", "qemu+tcp://{host}/system"),
            "qemu:///system"
        );
        assert_eq!(
            uri_for("n2", "n1", "qemu:///system", "qemu+tcp://{host}/system"),
            "qemu+tcp://n2/system"
        );
    }

    #[tokio::test]
    async fn the_test_driver_measures_and_unknown_vms_are_named() {
        let one: BTreeMap<String, String> = [("test".to_string(), "test:///default".to_string())].into();
        let load = measure(one, Duration::from_millis(50)).await.unwrap();
        assert!((0.0..=100.0).contains(&load["test"]), "{load:?}");
        let unknown: BTreeMap<String, String> = [("nope".to_string(), "test:///default".to_string())].into();
        let e = measure(unknown, Duration::from_millis(10))
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("VM nope"), "{e}");
    }
}
