//! `Cluster.WhatIf`: vmhad's read-only what-if of a host or zone failure, the answer `vmha what-if
//! --fail HOSTS|--fail-zone ZONE --json` gives. Pacemaker's scheduler runs on a copy of the live CIB in a
//! child process (`vmhad schedule-copy`: libpacemaker keeps process-wide state), with a deadline; the
//! copy is made and read on tokio's blocking pool, so vmhad's event loop never waits for it. One run at a
//! time per vmhad: a second caller is refused at once (Conflict) rather than queued.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use vmha_model::whatif;
use vmha_model::ClusterView;

use crate::api::Error;
use crate::state::Shared;

/// At most this many hosts may be named (a what-if of more fails no more than the whole cluster).
pub const MAX_HOSTS: usize = 64;
/// The longest host or zone name accepted (Pacemaker's node names are host names: 255 at most).
pub const MAX_NAME: usize = 255;
/// The deadline of the scheduler child.
pub const SCHEDULER_DEADLINE: Duration = Duration::from_secs(60);

/// What the caller asked to fail, checked against the cluster's hosts and zones.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failing {
    Hosts(Vec<String>),
    /// A zone, with its hosts as the CIB names them.
    Zone {
        zone: String,
        hosts: Vec<String>,
    },
}

fn printable(s: &str) -> String {
    vmha_vcluster::printable(s)
}

fn check_name(what: &str, name: &str) -> Result<(), Error> {
    if name.is_empty() {
        return Err(Error::InvalidArgument(format!("an empty {what} name")));
    }
    if name.len() > MAX_NAME {
        return Err(Error::InvalidArgument(format!(
            "a {what} name of {} bytes (at most {MAX_NAME})",
            name.len()
        )));
    }
    if name.chars().any(|c| c.is_control()) {
        return Err(Error::InvalidArgument(format!(
            "the {what} name {} has control characters",
            printable(name)
        )));
    }
    Ok(())
}

/// Checks a request against the cluster (`cib` for the zones): exactly one of hosts (each a cluster
/// host, named once, at most [`MAX_HOSTS`]) or a zone some host is in. Nothing runs when it fails.
pub fn check_request(view: &ClusterView, cib: &str, hosts: &[String], zone: &str) -> Result<Failing, Error> {
    match (hosts.is_empty(), zone.is_empty()) {
        (true, true) => Err(Error::InvalidArgument(
            "name the hosts or the zone that fail (both are empty)".into(),
        )),
        (false, false) => Err(Error::InvalidArgument(
            "name the hosts or the zone that fail, not both".into(),
        )),
        (false, true) => {
            if hosts.len() > MAX_HOSTS {
                return Err(Error::InvalidArgument(format!(
                    "{} hosts named (at most {MAX_HOSTS})",
                    hosts.len()
                )));
            }
            let mut seen = BTreeSet::new();
            for h in hosts {
                check_name("host", h)?;
                if !seen.insert(h.as_str()) {
                    return Err(Error::InvalidArgument(format!("host {} is named twice", printable(h))));
                }
                if view.host(h).is_none() {
                    return Err(Error::UnknownHost(format!(
                        "what-if: host {} is not a node of this cluster",
                        printable(h)
                    )));
                }
            }
            Ok(Failing::Hosts(hosts.to_vec()))
        }
        (true, false) => {
            check_name("zone", zone)?;
            let hosts = whatif::hosts_in_zone(cib, zone)
                .map_err(|e| Error::InvalidArgument(format!("what-if: zone {}: {e}", printable(zone))))?;
            Ok(Failing::Zone {
                zone: zone.to_string(),
                hosts,
            })
        }
    }
}

/// Lets one what-if run at a time.
#[derive(Debug, Default)]
pub struct Gate(AtomicBool);

/// The one run a [`Gate`] let through; the gate opens again when it is dropped.
#[derive(Debug)]
pub struct Pass<'a>(&'a Gate);

impl Gate {
    pub const fn new() -> Gate {
        Gate(AtomicBool::new(false))
    }

    /// The pass, or Conflict while another run holds it.
    pub fn enter(&self) -> Result<Pass<'_>, Error> {
        self.0
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .map(|_| Pass(self))
            .map_err(|_| Error::Conflict("a what-if is already running; try again when it has answered".into()))
    }
}

impl Drop for Pass<'_> {
    fn drop(&mut self) {
        self.0 .0.store(false, Ordering::Release);
    }
}

/// vmhad's gate.
pub static GATE: Gate = Gate::new();

/// The what-if of `hosts` or `zone` failing on the live CIB, as `vmha what-if --json` prints it (one
/// line). Changes nothing.
pub async fn run(shared: &Arc<Shared>, hosts: Vec<String>, zone: String) -> Result<String, Error> {
    let _pass = GATE.enter()?;
    let cib = shared.backend.query().await.map_err(Error::cib)?;
    let runtime = tokio::runtime::Handle::current();
    tokio::task::spawn_blocking(move || {
        let events = whatif::Events::new(&cib).map_err(|e| Error::Cib(format!("what-if: reading the CIB: {e}")))?;
        let failing = check_request(events.view(), &cib, &hosts, &zone)?;
        let failed = match failing {
            Failing::Hosts(hosts) | Failing::Zone { hosts, .. } => hosts,
        };
        // The child and its deadline are driven by vmhad's runtime; this blocking-pool thread only waits.
        let p = runtime
            .block_on(crate::placement::predict(&events, &failed, None, SCHEDULER_DEADLINE))
            .map_err(|e| Error::Failed(format!("what-if of {}: {e:#}", failed.join(","))))?;
        serde_json::to_string(&vmha_api::json::document("what_if", &p)).map_err(Error::failed)
    })
    .await
    .map_err(|e| Error::Failed(format!("what-if: the worker ended: {e}")))?
}

#[cfg(test)]
mod tests {
    use super::*;

    const CIB: &str = r#"<cib admin_epoch="0" epoch="5" num_updates="2" have-quorum="1" dc-uuid="1">
  <configuration>
    <crm_config/>
    <nodes>
      <node id="1" uname="n1"><instance_attributes id="n1-a"><nvpair id="n1-z" name="vmha-zone-site" value="east"/></instance_attributes></node>
      <node id="2" uname="n2"><instance_attributes id="n2-a"><nvpair id="n2-z" name="vmha-zone-site" value="east"/></instance_attributes></node>
      <node id="3" uname="n3"><instance_attributes id="n3-a"><nvpair id="n3-z" name="vmha-zone-site" value="west"/></instance_attributes></node>
    </nodes>
    <resources/>
    <constraints/>
  </configuration>
  <status/>
</cib>"#;

    fn check(hosts: &[&str], zone: &str) -> Result<Failing, Error> {
        let view = ClusterView::from_cib(CIB).unwrap();
        let hosts: Vec<String> = hosts.iter().map(|h| h.to_string()).collect();
        check_request(&view, CIB, &hosts, zone)
    }

    fn refused(r: Result<Failing, Error>) -> (String, String) {
        let e = r.expect_err("refused");
        (e.short_name(), e.message())
    }

    #[test]
    fn hosts_or_a_zone_of_this_cluster_are_accepted() {
        assert_eq!(
            check(&["n1", "n3"], "").unwrap(),
            Failing::Hosts(vec!["n1".into(), "n3".into()])
        );
        assert_eq!(
            check(&[], "east").unwrap(),
            Failing::Zone {
                zone: "east".into(),
                hosts: vec!["n1".into(), "n2".into()]
            }
        );
    }

    #[test]
    fn neither_or_both_are_refused() {
        let (class, msg) = refused(check(&[], ""));
        assert_eq!(class, "InvalidArgument");
        assert!(msg.contains("both are empty"), "{msg}");
        let (class, msg) = refused(check(&["n1"], "east"));
        assert_eq!(class, "InvalidArgument");
        assert!(msg.contains("not both"), "{msg}");
    }

    #[test]
    fn unknown_hosts_and_zones_are_refused() {
        let (class, msg) = refused(check(&["n1", "n9"], ""));
        assert_eq!(class, "UnknownHost");
        assert!(msg.contains("n9"), "{msg}");
        let (class, msg) = refused(check(&[], "north"));
        assert_eq!(class, "InvalidArgument");
        assert!(msg.contains("north"), "{msg}");
    }

    #[test]
    fn hostile_names_are_refused_and_not_echoed_raw() {
        // Too many, repeated, empty, overlong, control characters.
        let many: Vec<String> = (0..=MAX_HOSTS).map(|i| format!("n{i}")).collect();
        let view = ClusterView::from_cib(CIB).unwrap();
        let e = check_request(&view, CIB, &many, "").unwrap_err();
        assert_eq!(e.short_name(), "InvalidArgument");
        assert!(e.message().contains("at most 64"), "{}", e.message());
        assert_eq!(refused(check(&["n1", "n1"], "")).0, "InvalidArgument");
        assert_eq!(refused(check(&[""], "")).0, "InvalidArgument");
        let long = "n".repeat(MAX_NAME + 1);
        assert_eq!(refused(check(&[&long], "")).0, "InvalidArgument");
        assert_eq!(refused(check(&[], &long)).0, "InvalidArgument");
        let (class, msg) = refused(check(&["n1\u{1b}[2J"], ""));
        assert_eq!(class, "InvalidArgument");
        assert!(!msg.contains('\u{1b}'), "{msg:?}");
        let (class, msg) = refused(check(&[], "east\nroot"));
        assert_eq!(class, "InvalidArgument");
        assert!(!msg.contains('\n'), "{msg:?}");
    }

    #[test]
    fn a_second_run_is_refused_while_one_runs() {
        let gate = Gate::new();
        let first = gate.enter().expect("the first run passes");
        let e = gate.enter().expect_err("the second is refused");
        assert_eq!(e.short_name(), "Conflict");
        assert!(e.message().contains("a what-if is already running"), "{}", e.message());
        drop(first);
        gate.enter().expect("free again once the first ended");
    }
}
