//! The cluster as Pacemaker reports it (`crm_mon --output-as=xml`), parsed into plain structs.

use anyhow::{anyhow, Result};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeStatus {
    pub name: String,
    pub online: bool,
    pub standby: bool,
    pub maintenance: bool,
    pub unclean: bool,
    pub pending: bool,
    pub is_dc: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResourceStatus {
    pub id: String,
    /// e.g. `ocf:heartbeat:VirtualDomain`, `stonith:fence_vmha_lab`.
    pub agent: String,
    /// e.g. `Started`, `Stopped`, `Migrating`.
    pub role: String,
    pub active: bool,
    pub failed: bool,
    /// Hosts the resource runs on (more than one only while something is wrong).
    pub nodes: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterStatus {
    pub dc: Option<String>,
    pub quorate: bool,
    pub nodes: Vec<NodeStatus>,
    pub resources: Vec<ResourceStatus>,
}

fn flag(node: roxmltree::Node, attr: &str) -> bool {
    node.attribute(attr) == Some("true")
}

impl ClusterStatus {
    /// Parses the output of `crm_mon --one-shot --output-as=xml`.
    pub fn parse(xml: &str) -> Result<Self> {
        let doc = roxmltree::Document::parse(xml).map_err(|e| anyhow!("crm_mon XML: {e}"))?;
        let root = doc.root_element();
        let current_dc = root.descendants().find(|n| n.has_tag_name("current_dc"));
        let dc = current_dc
            .filter(|n| flag(*n, "present"))
            .and_then(|n| n.attribute("name"))
            .map(str::to_string);
        let quorate = current_dc.is_some_and(|n| flag(n, "with_quorum"));
        let nodes = root
            .descendants()
            .find(|n| n.has_tag_name("nodes"))
            .map(|nodes| {
                nodes
                    .children()
                    .filter(|n| n.has_tag_name("node"))
                    .map(|n| NodeStatus {
                        name: n.attribute("name").unwrap_or_default().to_string(),
                        online: flag(n, "online"),
                        standby: flag(n, "standby"),
                        maintenance: flag(n, "maintenance"),
                        unclean: flag(n, "unclean"),
                        pending: flag(n, "pending"),
                        is_dc: flag(n, "is_dc"),
                    })
                    .collect()
            })
            .unwrap_or_default();
        let resources = root
            .descendants()
            .find(|n| n.has_tag_name("resources"))
            .map(|rs| {
                rs.descendants()
                    .filter(|n| n.has_tag_name("resource"))
                    .map(|r| ResourceStatus {
                        id: r.attribute("id").unwrap_or_default().to_string(),
                        agent: r.attribute("resource_agent").unwrap_or_default().to_string(),
                        role: r.attribute("role").unwrap_or_default().to_string(),
                        active: flag(r, "active"),
                        failed: flag(r, "failed"),
                        nodes: r
                            .children()
                            .filter(|n| n.has_tag_name("node"))
                            .filter_map(|n| n.attribute("name").map(str::to_string))
                            .collect(),
                    })
                    .collect()
            })
            .unwrap_or_default();
        Ok(ClusterStatus {
            dc,
            quorate,
            nodes,
            resources,
        })
    }

    pub fn node(&self, name: &str) -> Option<&NodeStatus> {
        self.nodes.iter().find(|n| n.name == name)
    }

    pub fn resource(&self, id: &str) -> Option<&ResourceStatus> {
        self.resources.iter().find(|r| r.id == id)
    }

    pub fn online_nodes(&self) -> Vec<&str> {
        self.nodes
            .iter()
            .filter(|n| n.online)
            .map(|n| n.name.as_str())
            .collect()
    }

    /// The single host a resource is started on, if it runs on exactly one.
    pub fn running_on(&self, id: &str) -> Option<&str> {
        let r = self.resource(id)?;
        (r.active && r.role == "Started" && r.nodes.len() == 1).then(|| r.nodes[0].as_str())
    }

    /// Human-readable summary: hosts, DC, quorum, VMs and where they run.
    pub fn render(&self, cluster: &str) -> String {
        let mut s = format!(
            "cluster {cluster}: {} of {} hosts online, {}, DC {}\n\nHOST      STATE\n",
            self.online_nodes().len(),
            self.nodes.len(),
            if self.quorate { "quorate" } else { "NOT quorate" },
            self.dc.as_deref().unwrap_or("(none)")
        );
        for n in &self.nodes {
            let mut state = if n.online {
                "online".to_string()
            } else {
                "OFFLINE".to_string()
            };
            for (on, word) in [
                (n.is_dc, "DC"),
                (n.standby, "standby"),
                (n.maintenance, "maintenance"),
                (n.unclean, "UNCLEAN"),
                (n.pending, "pending"),
            ] {
                if on {
                    state.push_str(", ");
                    state.push_str(word);
                }
            }
            s.push_str(&format!("{:<9} {state}\n", n.name));
        }
        s.push_str("\nRESOURCE       AGENT                          STATE      HOST\n");
        for r in &self.resources {
            let state = if r.failed {
                format!("{} FAILED", r.role)
            } else {
                r.role.clone()
            };
            s.push_str(&format!(
                "{:<14} {:<30} {:<10} {}\n",
                r.id,
                r.agent,
                state,
                r.nodes.join(",")
            ));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"<pacemaker-result api-version="2.25" request="crm_mon -1 --output-as=xml">
  <summary>
    <stack type="corosync"/>
    <current_dc present="true" version="2.1.5" name="node2" id="2" with_quorum="true"/>
    <nodes_configured number="3"/>
  </summary>
  <nodes>
    <node name="node1" id="1" online="true" standby="false" standby_onfail="false" maintenance="false" pending="false" unclean="false" shutdown="false" expected_up="true" is_dc="false" resources_running="1" type="member"/>
    <node name="node2" id="2" online="true" standby="false" standby_onfail="false" maintenance="false" pending="false" unclean="false" shutdown="false" expected_up="true" is_dc="true" resources_running="1" type="member"/>
    <node name="node3" id="3" online="false" standby="false" standby_onfail="false" maintenance="false" pending="false" unclean="true" shutdown="false" expected_up="true" is_dc="false" resources_running="0" type="member"/>
  </nodes>
  <resources>
    <resource id="fence-lab" resource_agent="stonith:fence_vmha_lab" role="Started" active="true" orphaned="false" blocked="false" managed="true" failed="false" failure_ignored="false" nodes_running_on="1">
      <node name="node1" id="1" cached="true"/>
    </resource>
    <resource id="vm1" resource_agent="ocf:heartbeat:VirtualDomain" role="Started" active="true" orphaned="false" blocked="false" managed="true" failed="false" failure_ignored="false" nodes_running_on="1">
      <node name="node2" id="2" cached="true"/>
    </resource>
    <resource id="vm2" resource_agent="ocf:heartbeat:VirtualDomain" role="Stopped" active="false" orphaned="false" blocked="false" managed="true" failed="false" failure_ignored="false" nodes_running_on="0"/>
  </resources>
</pacemaker-result>"#;

    #[test]
    fn parses_dc_nodes_and_resources() {
        let s = ClusterStatus::parse(SAMPLE).unwrap();
        assert_eq!(s.dc.as_deref(), Some("node2"));
        assert!(s.quorate);
        assert_eq!(s.online_nodes(), vec!["node1", "node2"]);
        assert!(s.node("node3").unwrap().unclean);
        assert!(s.node("node2").unwrap().is_dc);
        assert_eq!(s.running_on("vm1"), Some("node2"));
        assert_eq!(s.running_on("vm2"), None);
        assert_eq!(s.resource("fence-lab").unwrap().agent, "stonith:fence_vmha_lab");
        let text = s.render("lab");
        assert!(text.contains("2 of 3 hosts online, quorate, DC node2"));
        assert!(text.contains("node3     OFFLINE, UNCLEAN"));
    }

    #[test]
    fn no_dc_while_electing() {
        let xml = r#"<pacemaker-result><summary><current_dc present="false"/></summary><nodes/></pacemaker-result>"#;
        let s = ClusterStatus::parse(xml).unwrap();
        assert_eq!(s.dc, None);
        assert!(!s.quorate);
        assert!(ClusterStatus::parse("not xml").is_err());
    }
}
