//! What a virtual cluster is in a CIB: its tag, the member resources, the constraints among them (and to
//! hosts), and the VMs with their domain files. Pure: reads a CIB document, changes nothing.

use std::collections::{BTreeMap, BTreeSet};

use roxmltree::{Document, Node};
use serde::Serialize;
use vmha_model::change::escape;
use vmha_model::VM_AGENTS;

use crate::VclusterError;

/// A virtual cluster as the CIB describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Captured {
    /// The tag id.
    pub name: String,
    pub cluster_name: Option<String>,
    /// Every host (node) of the cluster.
    pub hosts: Vec<String>,
    /// Member resource ids as the tag lists them.
    pub members: Vec<String>,
    /// `<resources>` with the members' elements as they are in the CIB.
    pub resources_xml: String,
    /// `<constraints>` with the constraints whose resources are all members.
    pub constraints_xml: String,
    /// The `<tag>` element.
    pub tag_xml: String,
    /// Constraint ids, kept.
    pub constraints: Vec<String>,
    /// Constraints that name a member and a resource outside: left out, with the outsider.
    pub left_out: Vec<(String, String)>,
    /// The VM primitives (members or inside member groups).
    pub vms: Vec<CapturedVm>,
}

/// A VM resource of the virtual cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CapturedVm {
    pub resource: String,
    /// `config` parameter: the domain XML file.
    pub config: Option<String>,
    /// `domain` parameter.
    pub domain: Option<String>,
    /// `hypervisor` parameter.
    pub hypervisor: Option<String>,
    pub migration_transport: Option<String>,
    /// `target-role` meta attribute and its nvpair id, when set.
    pub target_role: Option<(String, String)>,
}

fn section<'a, 'i>(doc: &'a Document<'i>, tag: &str) -> Option<Node<'a, 'i>> {
    doc.root_element()
        .children()
        .find(|n| n.has_tag_name("configuration"))?
        .children()
        .find(|n| n.has_tag_name(tag))
}

/// The ids of the resources an element holds (itself and, for groups/clones, its primitives).
fn resource_ids(node: Node) -> Vec<String> {
    node.descendants()
        .filter(|n| matches!(n.tag_name().name(), "primitive" | "group" | "clone" | "bundle"))
        .filter_map(|n| n.attribute("id").map(str::to_string))
        .collect()
}

/// Every resource a constraint names (`rsc`, `with-rsc`, `first`, `then`, `resource_ref` of sets).
pub fn constraint_resources(c: Node) -> Vec<String> {
    let mut out: Vec<String> = ["rsc", "with-rsc", "first", "then"]
        .iter()
        .filter_map(|a| c.attribute(*a).map(str::to_string))
        .collect();
    out.extend(
        c.descendants()
            .filter(|n| n.has_tag_name("resource_ref"))
            .filter_map(|n| n.attribute("id").map(str::to_string)),
    );
    out
}

/// Host names a constraint names (`node=`, `#uname` rule expressions).
pub fn constraint_hosts(c: Node) -> Vec<String> {
    let mut out: Vec<String> = c.attribute("node").map(str::to_string).into_iter().collect();
    out.extend(
        c.descendants()
            .filter(|n| n.has_tag_name("expression") && n.attribute("attribute") == Some("#uname"))
            .filter_map(|n| n.attribute("value").map(str::to_string)),
    );
    out
}

fn nvpair<'a>(node: Node<'a, '_>, set: &str, name: &str) -> Option<(String, &'a str)> {
    node.children()
        .filter(|n| n.has_tag_name(set))
        .flat_map(|s| s.children())
        .find(|n| n.has_tag_name("nvpair") && n.attribute("name") == Some(name))
        .map(|n| {
            (
                n.attribute("id").unwrap_or("").to_string(),
                n.attribute("value").unwrap_or(""),
            )
        })
}

/// The names of the tags (virtual clusters) in a CIB, with their members.
pub fn list(cib: &str) -> Result<BTreeMap<String, Vec<String>>, VclusterError> {
    let doc = Document::parse(cib)?;
    Ok(section(&doc, "tags").map(vmha_model::cib::tags_of).unwrap_or_default())
}

/// Every `id` in the CIB's configuration.
pub fn configuration_ids(cib: &str) -> Result<BTreeSet<String>, VclusterError> {
    let doc = Document::parse(cib)?;
    let configuration = doc
        .root_element()
        .children()
        .find(|n| n.has_tag_name("configuration"))
        .ok_or_else(|| VclusterError::Cib("the CIB has no configuration section".into()))?;
    Ok(configuration
        .descendants()
        .filter(|n| n.is_element() && !n.has_tag_name("obj_ref") && !n.has_tag_name("resource_ref"))
        .filter_map(|n| n.attribute("id").map(str::to_string))
        .collect())
}

/// Reads virtual cluster `name` from a whole CIB.
pub fn capture(cib: &str, name: &str) -> Result<Captured, VclusterError> {
    let doc = Document::parse(cib)?;
    let tag = section(&doc, "tags")
        .and_then(|tags| {
            tags.children()
                .find(|n| n.has_tag_name("tag") && n.attribute("id") == Some(name))
        })
        .ok_or_else(|| VclusterError::NotFound(format!("no virtual cluster (tag) named {name:?}")))?;
    let members: Vec<String> = tag
        .children()
        .filter(|n| n.has_tag_name("obj_ref"))
        .filter_map(|n| n.attribute("id").map(str::to_string))
        .collect();
    let resources = section(&doc, "resources").ok_or_else(|| VclusterError::Cib("no resources section".into()))?;
    let mut elements = Vec::new();
    let mut covered = BTreeSet::new();
    for m in &members {
        let el = resources
            .children()
            .find(|n| n.is_element() && n.attribute("id") == Some(m.as_str()))
            .ok_or_else(|| {
                VclusterError::NotFound(format!(
                    "member {m:?} of {name:?} is not a top-level resource (primitive, group or clone) in the CIB"
                ))
            })?;
        covered.extend(resource_ids(el));
        elements.push(el);
    }
    let mut resources_xml = String::from("<resources>\n");
    let mut vms = Vec::new();
    for el in &elements {
        resources_xml.push_str(&cib[el.range()]);
        resources_xml.push('\n');
        for p in el.descendants().filter(|n| n.has_tag_name("primitive")) {
            let agent = (
                p.attribute("class").unwrap_or(""),
                p.attribute("provider").unwrap_or(""),
                p.attribute("type").unwrap_or(""),
            );
            if !VM_AGENTS.contains(&agent) {
                continue;
            }
            let param = |n: &str| nvpair(p, "instance_attributes", n).map(|(_, v)| v.to_string());
            vms.push(CapturedVm {
                resource: p.attribute("id").unwrap_or("").to_string(),
                config: param("config").filter(|v| !v.is_empty()),
                domain: param("domain").filter(|v| !v.is_empty()),
                hypervisor: param("hypervisor").filter(|v| !v.is_empty()),
                migration_transport: param("migration_transport").filter(|v| !v.is_empty()),
                target_role: nvpair(p, "meta_attributes", "target-role").map(|(id, v)| (id, v.to_string())),
            });
        }
    }
    resources_xml.push_str("</resources>\n");
    let mut constraints_xml = String::from("<constraints>\n");
    let mut kept = Vec::new();
    let mut left_out = Vec::new();
    if let Some(constraints) = section(&doc, "constraints") {
        for c in constraints.children().filter(|n| n.is_element()) {
            let named = constraint_resources(c);
            if named.is_empty() || !named.iter().any(|r| covered.contains(r)) {
                continue;
            }
            // A constraint may name the tag itself: it is a member then too.
            if let Some(outsider) = named.iter().find(|r| !covered.contains(*r) && r.as_str() != name) {
                left_out.push((c.attribute("id").unwrap_or("").to_string(), outsider.clone()));
                continue;
            }
            constraints_xml.push_str(&cib[c.range()]);
            constraints_xml.push('\n');
            kept.push(c.attribute("id").unwrap_or("").to_string());
        }
    }
    constraints_xml.push_str("</constraints>\n");
    let hosts = section(&doc, "nodes")
        .map(|n| {
            n.children()
                .filter(|c| c.has_tag_name("node"))
                .filter_map(|c| c.attribute("uname").map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    let cluster_name = section(&doc, "crm_config").and_then(|c| {
        c.descendants()
            .find(|n| n.has_tag_name("nvpair") && n.attribute("name") == Some("cluster-name"))
            .and_then(|n| n.attribute("value").map(str::to_string))
    });
    Ok(Captured {
        name: name.to_string(),
        cluster_name,
        hosts,
        members,
        resources_xml,
        constraints_xml,
        tag_xml: cib[tag.range()].to_string(),
        constraints: kept,
        left_out,
        vms,
    })
}

/// The `<tag>` element for a new virtual cluster.
pub fn tag_xml(name: &str, members: &[String]) -> String {
    let mut s = format!("<tag id=\"{}\">", escape(name));
    for m in members {
        s.push_str(&format!("<obj_ref id=\"{}\"/>", escape(m)));
    }
    s.push_str("</tag>");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    pub const CIB: &str = include_str!("testdata/cib.xml");

    #[test]
    fn captures_members_constraints_and_vms() {
        let c = capture(CIB, "shop").unwrap();
        assert_eq!(c.members, ["web", "db", "vip"]);
        assert_eq!(c.cluster_name.as_deref(), Some("siteA"));
        assert_eq!(c.hosts, ["node1", "node2", "node3"]);
        assert_eq!(
            c.constraints,
            ["web-after-db", "vip-with-web", "db-prefers-node1", "web-rule"]
        );
        assert_eq!(c.left_out, [("other-with-web".to_string(), "other".to_string())]);
        assert_eq!(c.vms.len(), 2);
        assert_eq!(c.vms[0].config.as_deref(), Some("/srv/a/shared/web.xml"));
        assert_eq!(
            c.vms[1].target_role,
            Some(("db-meta-target-role".into(), "Started".into()))
        );
        assert!(c.resources_xml.contains("<primitive id=\"vip\""));
        assert!(!c.resources_xml.contains("id=\"other\""));
        roxmltree::Document::parse(&c.resources_xml).unwrap();
        roxmltree::Document::parse(&c.constraints_xml).unwrap();
        assert_eq!(list(CIB).unwrap()["shop"], ["web", "db", "vip"]);
    }

    #[test]
    fn unknown_tag_or_member_is_an_error() {
        assert!(capture(CIB, "nope")
            .unwrap_err()
            .to_string()
            .contains("no virtual cluster"));
        let broken = CIB.replace("<obj_ref id=\"vip\"/>", "<obj_ref id=\"ghost\"/>");
        assert!(capture(&broken, "shop").unwrap_err().to_string().contains("\"ghost\""));
    }
}
