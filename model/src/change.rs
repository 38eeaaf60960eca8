//! The CIB changes vmha makes, as XML fragments for the CIB API's create/modify/delete on one section.
//! Existing element ids are reused so a modify updates in place instead of adding a duplicate.

use roxmltree::{Document, Node};

use crate::ModelError;

/// XML-escapes an attribute value.
pub fn escape(value: &str) -> String {
    let mut s = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '&' => s.push_str("&amp;"),
            '<' => s.push_str("&lt;"),
            '>' => s.push_str("&gt;"),
            '"' => s.push_str("&quot;"),
            '\'' => s.push_str("&apos;"),
            c => s.push(c),
        }
    }
    s
}

/// Checks a resource or host name: it becomes part of XML ids, libvirt names and D-Bus object paths.
pub fn validate_name(what: &'static str, name: &str) -> Result<(), ModelError> {
    let invalid = |why| {
        Err(ModelError::Invalid {
            what,
            value: name.to_string(),
            why,
        })
    };
    if name.is_empty() || name.len() > 64 {
        return invalid("must be 1 to 64 characters");
    }
    if !name.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_') {
        return invalid("must start with a letter or '_'");
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
    {
        return invalid("may hold only letters, digits, '_', '-' and '.'");
    }
    Ok(())
}

fn parse(cib: &str) -> Result<Document<'_>, ModelError> {
    Ok(Document::parse(cib)?)
}

fn find<'a, 'i>(doc: &'a Document<'i>, tag: &str, id: &str) -> Option<Node<'a, 'i>> {
    doc.descendants()
        .find(|n| n.has_tag_name(tag) && n.attribute("id") == Some(id))
}

/// The id of an existing `<set_tag>` directly under `parent` and of its nvpair `name`, or fresh ids.
fn nvpair_ids(parent: Option<Node>, set_tag: &str, default_set_id: String, name: &str) -> (String, String) {
    let set = parent.and_then(|p| p.children().find(|n| n.has_tag_name(set_tag)));
    let set_id = set
        .and_then(|s| s.attribute("id"))
        .map(str::to_string)
        .unwrap_or(default_set_id);
    let pair_id = set
        .and_then(|s| {
            s.children()
                .find(|n| n.has_tag_name("nvpair") && n.attribute("name") == Some(name))
        })
        .and_then(|n| n.attribute("id"))
        .map(str::to_string)
        .unwrap_or_else(|| format!("{set_id}-{name}"));
    (set_id, pair_id)
}

/// The element whose attribute set a change addresses.
#[derive(Debug, Clone, Copy)]
enum Owner<'a> {
    /// A primitive resource, by id; the change is for a modify of `resources`.
    Resource(&'a str),
    /// A cluster node, by host name; the change is for a modify of `nodes`.
    Host(&'a str),
}

/// Sets nvpair `name` in the `set_tag` set (`meta_attributes`, `instance_attributes`, `utilization`) of
/// `owner`, reusing the ids the CIB already has.
fn set_nvpair(cib: &str, owner: Owner, set_tag: &str, name: &str, value: &str) -> Result<String, ModelError> {
    let doc = parse(cib)?;
    let (ids, open) = match owner {
        Owner::Resource(rsc) => {
            let primitive = find(&doc, "primitive", rsc).ok_or_else(|| ModelError::Invalid {
                what: "resource",
                value: rsc.to_string(),
                why: "no such resource in the CIB",
            })?;
            let default_set = format!("{rsc}-{set_tag}");
            (
                nvpair_ids(Some(primitive), set_tag, default_set, name),
                format!(r#"<primitive id="{}">"#, escape(rsc)),
            )
        }
        Owner::Host(host) => {
            let node = doc
                .descendants()
                .find(|n| n.has_tag_name("node") && n.attribute("uname") == Some(host))
                .ok_or_else(|| ModelError::Invalid {
                    what: "host",
                    value: host.to_string(),
                    why: "no such host in the CIB",
                })?;
            let id = node.attribute("id").unwrap_or(host);
            let default_set = match set_tag {
                "instance_attributes" => format!("nodes-{id}"),
                other => format!("nodes-{id}-{other}"),
            };
            (
                nvpair_ids(Some(node), set_tag, default_set, name),
                format!(r#"<node id="{}" uname="{}">"#, escape(id), escape(host)),
            )
        }
    };
    let (set_id, pair_id) = ids;
    let close = match owner {
        Owner::Resource(_) => "</primitive>",
        Owner::Host(_) => "</node>",
    };
    Ok(format!(
        r#"{open}<{set_tag} id="{}"><nvpair id="{}" name="{}" value="{}"/></{set_tag}>{close}"#,
        escape(&set_id),
        escape(&pair_id),
        escape(name),
        escape(value)
    ))
}

/// Sets meta attribute `name` of primitive `rsc` (e.g. `target-role`); for a modify of `resources`.
pub fn set_resource_meta(cib: &str, rsc: &str, name: &str, value: &str) -> Result<String, ModelError> {
    set_nvpair(cib, Owner::Resource(rsc), "meta_attributes", name, value)
}

/// Sets utilization attribute `name` of primitive `rsc`; for a modify of `resources`.
pub fn set_resource_utilization(cib: &str, rsc: &str, name: &str, value: &str) -> Result<String, ModelError> {
    set_nvpair(cib, Owner::Resource(rsc), "utilization", name, value)
}

/// Sets a permanent node attribute of `host` (e.g. `standby`, `maintenance`); for a modify of `nodes`.
pub fn set_node_attribute(cib: &str, host: &str, name: &str, value: &str) -> Result<String, ModelError> {
    set_nvpair(cib, Owner::Host(host), "instance_attributes", name, value)
}

/// Sets utilization attribute `name` of `host` (its capacity); for a modify of `nodes`.
pub fn set_node_utilization(cib: &str, host: &str, name: &str, value: &str) -> Result<String, ModelError> {
    set_nvpair(cib, Owner::Host(host), "utilization", name, value)
}

/// Id of the temporary location constraint vmha uses to move a VM.
pub fn move_constraint_id(rsc: &str) -> String {
    format!("vmha-move-{rsc}")
}

/// The temporary constraint that makes Pacemaker (live-)migrate `rsc` to `host`; for a create in
/// `constraints`. vmha removes it once the VM runs there (`pcs resource move` leaves its own behind).
pub fn move_constraint(rsc: &str, host: &str) -> String {
    format!(
        r#"<rsc_location id="{}" rsc="{}" role="Started" node="{}" score="INFINITY"/>"#,
        escape(&move_constraint_id(rsc)),
        escape(rsc),
        escape(host)
    )
}

/// Id of the constraint that keeps `rsc` off `host` after its application's health asked for a restart
/// elsewhere (`health_app_action=restart-elsewhere`); `vmha vm cleanup` removes it.
pub fn health_ban_id(rsc: &str, host: &str) -> String {
    format!("vmha-health-ban-{rsc}-{host}")
}

/// The constraint that keeps `rsc` off `host` (score -INFINITY); for a create in `constraints`.
pub fn health_ban(rsc: &str, host: &str) -> String {
    format!(
        r#"<rsc_location id="{}" rsc="{}" node="{}" score="-INFINITY"/>"#,
        escape(&health_ban_id(rsc, host)),
        escape(rsc),
        escape(host)
    )
}

/// The health bans of `rsc` in `cib` (on `host`, or on every host when `host` is empty), as fragments for
/// a delete in `constraints`.
pub fn health_bans(cib: &str, rsc: &str, host: &str) -> Result<Vec<String>, ModelError> {
    let doc = Document::parse(cib)?;
    Ok(doc
        .descendants()
        .filter(|n| n.has_tag_name("rsc_location"))
        .filter(|n| n.attribute("rsc") == Some(rsc))
        .filter(|n| host.is_empty() || n.attribute("node") == Some(host))
        .filter_map(|n| n.attribute("id"))
        .filter(|id| is_health_ban(id, rsc))
        .map(|id| format!(r#"<rsc_location id="{}"/>"#, escape(id)))
        .collect())
}

fn is_health_ban(id: &str, rsc: &str) -> bool {
    id.strip_prefix("vmha-health-ban-")
        .and_then(|rest| rest.strip_prefix(rsc))
        .is_some_and(|rest| rest.starts_with('-'))
}

/// What a new VM resource needs.
#[derive(Debug, Clone)]
pub struct NewVm<'a> {
    pub name: &'a str,
    /// Domain XML file on shared storage.
    pub config: &'a str,
    pub hypervisor: &'a str,
    pub migration_transport: &'a str,
    /// vCPUs and memory (MiB) of the domain, for placement.
    pub cpu: u32,
    pub memory_mib: u64,
    /// Start it right away.
    pub start: bool,
}

/// A VM primitive under `ocf:vmha:VirtualMachine` with vmha's defaults: live migration allowed, a
/// monitor every 10 s, honest operation timeouts and utilization from the domain definition; for a
/// create in `resources`.
pub fn vm_primitive(vm: &NewVm) -> Result<String, ModelError> {
    validate_name("VM name", vm.name)?;
    if !vm.config.starts_with('/') {
        return Err(ModelError::Invalid {
            what: "domain XML path",
            value: vm.config.into(),
            why: "must be absolute",
        });
    }
    let n = escape(vm.name);
    let param = |k: &str, v: &str| {
        format!(
            r#"<nvpair id="{n}-instance_attributes-{k}" name="{k}" value="{}"/>"#,
            escape(v)
        )
    };
    let op = |name: &str, interval: &str, timeout: &str| {
        format!(r#"<op id="{n}-{name}-interval-{interval}" name="{name}" interval="{interval}" timeout="{timeout}"/>"#)
    };
    Ok(format!(
        concat!(
            r#"<primitive id="{n}" class="ocf" provider="vmha" type="VirtualMachine">"#,
            r#"<instance_attributes id="{n}-instance_attributes">{p1}{p2}{p3}</instance_attributes>"#,
            r#"<meta_attributes id="{n}-meta_attributes">"#,
            r#"<nvpair id="{n}-meta_attributes-allow-migrate" name="allow-migrate" value="true"/>"#,
            r#"<nvpair id="{n}-meta_attributes-target-role" name="target-role" value="{role}"/>"#,
            r#"</meta_attributes>"#,
            r#"<utilization id="{n}-utilization">"#,
            r#"<nvpair id="{n}-utilization-cpu" name="cpu" value="{cpu}"/>"#,
            r#"<nvpair id="{n}-utilization-hv_memory" name="hv_memory" value="{mem}"/>"#,
            r#"</utilization>"#,
            r#"<operations>{o1}{o2}{o3}{o4}{o5}</operations></primitive>"#
        ),
        n = n,
        p1 = param("config", vm.config),
        p2 = param("hypervisor", vm.hypervisor),
        p3 = param("migration_transport", vm.migration_transport),
        role = if vm.start { "Started" } else { "Stopped" },
        cpu = vm.cpu,
        mem = vm.memory_mib,
        o1 = op("monitor", "10s", "30s"),
        o2 = op("start", "0s", "90s"),
        o3 = op("stop", "0s", "90s"),
        o4 = op("migrate_to", "0s", "120s"),
        o5 = op("migrate_from", "0s", "60s"),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_bans_are_found_per_vm_and_host() {
        let cib = format!(
            r#"<cib><configuration><constraints>{}{}{}<rsc_location id="cli-ban-vm1-on-n3" rsc="vm1" node="n3" score="-INFINITY"/><rsc_location id="vmha-health-ban-vm1-x-n1" rsc="vm1-x" node="n1" score="-INFINITY"/></constraints></configuration></cib>"#,
            health_ban("vm1", "n1"),
            health_ban("vm1", "n2"),
            health_ban("vm2", "n1")
        );
        assert_eq!(
            health_bans(&cib, "vm1", "").unwrap(),
            vec![
                r#"<rsc_location id="vmha-health-ban-vm1-n1"/>"#.to_string(),
                r#"<rsc_location id="vmha-health-ban-vm1-n2"/>"#.to_string()
            ],
            "an operator's ban (cli-ban) and another VM's stay"
        );
        assert_eq!(health_bans(&cib, "vm1", "n2").unwrap().len(), 1);
        assert!(health_bans(&cib, "vm3", "").unwrap().is_empty());
        assert!(health_bans("<cib", "vm1", "").is_err());
        assert!(health_ban("vm1", "n1").contains(r#"score="-INFINITY""#));
    }

    const CIB: &str = r#"<cib><configuration><nodes>
        <node id="1" uname="n1"><instance_attributes id="nodes-1"><nvpair id="nodes-1-standby" name="standby" value="off"/></instance_attributes></node>
        <node id="2" uname="n2"/></nodes>
        <resources><primitive id="vm1" class="ocf" provider="vmha" type="VirtualMachine">
          <meta_attributes id="vm1-meta"><nvpair id="vm1-meta-role" name="target-role" value="Started"/></meta_attributes>
        </primitive><primitive id="vm2" class="ocf" provider="vmha" type="VirtualMachine"/></resources>
        <constraints/></configuration><status/></cib>"#;

    fn parses(xml: &str) {
        roxmltree::Document::parse(xml).unwrap_or_else(|e| panic!("{e}: {xml}"));
    }

    #[test]
    fn meta_changes_reuse_existing_ids() {
        let x = set_resource_meta(CIB, "vm1", "target-role", "Stopped").unwrap();
        parses(&x);
        assert!(x.contains(
            r#"<meta_attributes id="vm1-meta"><nvpair id="vm1-meta-role" name="target-role" value="Stopped"/>"#
        ));
        let y = set_resource_meta(CIB, "vm2", "target-role", "Stopped").unwrap();
        assert!(y.contains(r#"<meta_attributes id="vm2-meta_attributes"><nvpair id="vm2-meta_attributes-target-role""#));
        assert!(set_resource_meta(CIB, "nosuch", "target-role", "Stopped").is_err());
    }

    #[test]
    fn node_attributes_reuse_existing_ids_and_reject_unknown_hosts() {
        let x = set_node_attribute(CIB, "n1", "standby", "on").unwrap();
        parses(&x);
        assert!(x.contains(r#"<node id="1" uname="n1"><instance_attributes id="nodes-1"><nvpair id="nodes-1-standby" name="standby" value="on"/>"#));
        let y = set_node_attribute(CIB, "n2", "maintenance", "on").unwrap();
        assert!(y.contains(r#"<nvpair id="nodes-2-maintenance" name="maintenance" value="on"/>"#));
        assert!(set_node_attribute(CIB, "n9", "standby", "on").is_err());
        let u = set_node_utilization(CIB, "n2", "cpu", "4").unwrap();
        assert!(u.contains(
            r#"<utilization id="nodes-2-utilization"><nvpair id="nodes-2-utilization-cpu" name="cpu" value="4"/>"#
        ));
    }

    #[test]
    fn move_constraint_pins_the_vm_to_the_target() {
        let x = move_constraint("vm1", "n2");
        parses(&x);
        assert_eq!(
            x,
            r#"<rsc_location id="vmha-move-vm1" rsc="vm1" role="Started" node="n2" score="INFINITY"/>"#
        );
    }

    #[test]
    fn new_vm_primitive_has_defaults_and_utilization() {
        let vm = NewVm {
            name: "web1",
            config: "/shared/web1.xml",
            hypervisor: "qemu:///system",
            migration_transport: "tcp",
            cpu: 2,
            memory_mib: 512,
            start: true,
        };
        let x = vm_primitive(&vm).unwrap();
        parses(&x);
        for needle in [
            r#"type="VirtualMachine""#,
            r#"name="config" value="/shared/web1.xml""#,
            r#"name="allow-migrate" value="true""#,
            r#"name="target-role" value="Started""#,
            r#"name="hv_memory" value="512""#,
            r#"name="monitor" interval="10s" timeout="30s""#,
        ] {
            assert!(x.contains(needle), "{needle} in {x}");
        }
        assert!(vm_primitive(&NewVm {
            name: "bad name",
            ..vm.clone()
        })
        .is_err());
        assert!(vm_primitive(&NewVm {
            config: "relative.xml",
            ..vm
        })
        .is_err());
    }

    #[test]
    fn names_and_values_are_checked_and_escaped() {
        assert!(validate_name("VM name", "vm-1.a_b").is_ok());
        for bad in ["", "1vm", "vm/1", "vm 1", "vm\"", &"x".repeat(65)] {
            assert!(validate_name("VM name", bad).is_err(), "{bad:?}");
        }
        assert_eq!(escape(r#"a<b>&"c'"#), "a&lt;b&gt;&amp;&quot;c&apos;");
    }
}
