//! vmhad's `Cluster.WhatIf(as hosts, s zone)`: any caller the bus lets in may send any strings. vmhad
//! looks each host up in the cluster view, finds the hosts of the zone by the CIB's node attributes
//! (`whatif::hosts_in_zone`), and echoes names in its errors through `printable`. None of that may panic;
//! the hosts of a zone are hosts of the cluster; an echoed name carries no control character.
//!
//! The input is text: the first line the zone, each further line a host.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmha_model::whatif::hosts_in_zone;
use vmha_model::{printable, ClusterView};

const CIB: &str = r#"<cib admin_epoch="0" epoch="5" num_updates="2" have-quorum="1" dc-uuid="1">
  <configuration>
    <crm_config/>
    <nodes>
      <node id="1" uname="n1"><instance_attributes id="n1-a"><nvpair id="n1-z" name="vmha-zone-site" value="east"/><nvpair id="n1-r" name="vmha-zone-rack" value="east/b1/r1/k1"/></instance_attributes></node>
      <node id="2" uname="n2"><instance_attributes id="n2-a"><nvpair id="n2-z" name="vmha-zone-site" value="east"/></instance_attributes></node>
      <node id="3" uname="n3"><instance_attributes id="n3-a"><nvpair id="n3-z" name="vmha-zone-site" value="west"/></instance_attributes></node>
      <node id="4" uname="n4"/>
    </nodes>
    <resources/>
    <constraints/>
  </configuration>
  <status/>
</cib>"#;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut lines = text.split('\n');
    let zone = lines.next().unwrap_or("");
    let view = ClusterView::from_cib(CIB).expect("the fixed CIB reads");
    for host in lines.take(100) {
        let _ = view.host(host);
        assert!(
            !printable(host).chars().any(|c| c.is_control()),
            "printable left a control character"
        );
    }
    assert!(
        !printable(zone).chars().any(|c| c.is_control()),
        "printable left a control character"
    );
    if let Ok(hosts) = hosts_in_zone(CIB, zone) {
        assert!(!hosts.is_empty());
        for h in &hosts {
            assert!(view.host(h).is_some(), "zone {zone:?} named {h}, not a host");
        }
    }
});
