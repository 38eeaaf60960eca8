//! The JSON that `vmha --output json` prints: a stable, versioned schema (`docs/json-output.md`).
//!
//! Every document is one JSON object with the members `"schema_version"` ([`SCHEMA_VERSION`]) and
//! `"kind"` (what the document is: `"status"`, `"vm_list"`, `"job"`, `"event"`...), followed by the
//! members of that kind. Member names are snake_case in every command. `vmha watch` prints one document
//! per line. Within one schema version members are only ever added; a removed or renamed member, or a
//! changed type, raises the version.
//!
//! The cluster, host and VM objects are typed here ([`Cluster`], [`Host`], [`Vm`]): they are built from
//! vmhad's D-Bus properties ([`Cluster::from_properties`]...), so the JSON does not change when a D-Bus
//! property is added, and a test of the CLI checks that every D-Bus property has its member here. Scripts
//! and the lab's tests read the output back into these types (they refuse unknown members).

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};
use zbus::zvariant::{OwnedValue, Value};

/// The version of the JSON schema; raised on any change that is not an added member.
pub const SCHEMA_VERSION: u32 = 1;

/// A document of `kind`: the members of `body` (an object; anything else is put under `"value"`) and
/// `schema_version` and `kind`.
pub fn document(kind: &str, body: impl Serialize) -> serde_json::Value {
    let mut out = serde_json::Map::new();
    out.insert("schema_version".into(), SCHEMA_VERSION.into());
    out.insert("kind".into(), kind.into());
    match serde_json::to_value(body) {
        Ok(serde_json::Value::Object(members)) => {
            for (k, v) in members {
                if k != "schema_version" && k != "kind" {
                    out.insert(k, v);
                }
            }
        }
        Ok(serde_json::Value::Null) => {}
        Ok(other) => {
            out.insert("value".into(), other);
        }
        Err(e) => {
            out.insert("error".into(), e.to_string().into());
        }
    }
    serde_json::Value::Object(out)
}

/// The cluster as vmhad on the asked host sees it. While that vmhad is still connecting (it has not read
/// the CIB yet) `quorate`, `designated_controller` and `stonith_enabled` are `null`: unknown.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cluster {
    /// Corosync's cluster name.
    pub name: String,
    pub quorate: Option<bool>,
    /// The host of Pacemaker's designated controller; `""` when there is none.
    pub designated_controller: Option<String>,
    /// Hosts in the Corosync membership.
    pub members: Vec<String>,
    /// Hosts whose vmhad is running.
    pub agents: Vec<String>,
    /// The host this vmhad runs on.
    pub local_host: String,
    pub stonith_enabled: Option<bool>,
    /// Whether vmhad is connected to the CIB now.
    pub connected: bool,
    /// The CIB version vmhad last read (`admin_epoch.epoch.num_updates`); `""` before the first read.
    pub cib_version: String,
    /// The virtual clusters (the CIB's tags): name -> member resources, as `vmha vcluster list` lists them.
    #[serde(default)]
    pub virtual_clusters: BTreeMap<String, Vec<String>>,
    /// The elastic groups of the stored placement policy, as `vmha group list` lists them.
    #[serde(default)]
    pub elastic_groups: Vec<ElasticGroup>,
}

/// An elastic group of the stored placement policy (D-Bus property `ElasticGroups`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ElasticGroup {
    pub name: String,
    /// The running VM its new members are live-cloned from (always a member).
    pub template: String,
    pub min: u32,
    pub max: u32,
    /// Its members in order, the newest last.
    pub members: Vec<String>,
}

/// One cluster host.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Host {
    pub name: String,
    /// `online`, `offline`, `standby`, `maintenance`, `unclean`...
    pub state: String,
    pub standby: bool,
    pub maintenance: bool,
    pub is_designated_controller: bool,
    /// Pacemaker utilization attributes (`cpu`, `hv_memory`...), as strings.
    pub utilization: BTreeMap<String, String>,
}

/// One VM resource.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Vm {
    pub name: String,
    /// The resource agent (`ocf:vmha:VirtualMachine`, `ocf:heartbeat:VirtualDomain`).
    pub agent: String,
    /// `running`, `stopped`, `migrating`, `failed`, `unknown`...
    pub state: String,
    /// Hosts it runs on (more than one only while migrating, or when something is wrong).
    pub hosts: Vec<String>,
    /// Hosts where its last operation failed.
    pub failed_on: Vec<String>,
    /// Fail count per host (`vmha vm cleanup` clears them).
    pub fail_counts: BTreeMap<String, u32>,
    /// The `target-role` meta attribute; `""` when not set.
    pub target_role: String,
    pub managed: bool,
    /// The domain XML file (`config` parameter).
    pub config: String,
    /// The ids of the constraints that name it.
    pub constraints: Vec<String>,
    pub utilization: BTreeMap<String, String>,
    /// Health monitoring: settings and, from the VM's host, what its vmhad sees (property `Health`).
    #[serde(default)]
    pub health: BTreeMap<String, String>,
}

/// `vmha status`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Status {
    pub schema_version: u32,
    pub kind: String,
    /// True while vmhad has not read the cluster yet (then quorum, DC and fencing are unknown).
    pub connecting: bool,
    pub cluster: Cluster,
    pub hosts: Vec<Host>,
    pub vms: Vec<Vm>,
}

/// `vmha vm list`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmList {
    pub schema_version: u32,
    pub kind: String,
    pub vms: Vec<Vm>,
}

/// `vmha host list`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostList {
    pub schema_version: u32,
    pub kind: String,
    pub hosts: Vec<Host>,
}

/// `vmha vm show`: kind `vm`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmShow {
    pub schema_version: u32,
    pub kind: String,
    pub vm: Vm,
}

/// The end of a job (`vmha clone`, `vm start|stop|move|add`, `host standby`...): kind `job`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobResult {
    pub schema_version: u32,
    pub kind: String,
    /// The job's D-Bus object path.
    pub job: String,
    pub success: bool,
    pub message: String,
    /// When it failed: the class of its error (`GuestRefused`, `Libvirt`, `Conflict`...; the names of
    /// `org.vmha.Vmha1.Error.*`, which also decide `vmha`'s exit status). Absent when it succeeded or
    /// the vmhad that ran it gave no class.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_class: Option<String>,
}

/// A D-Bus value as JSON: numbers, strings, arrays and dictionaries (keys as strings).
pub fn value_json(v: &Value<'_>) -> serde_json::Value {
    use serde_json::json;
    match v {
        Value::Bool(b) => json!(b),
        Value::U8(n) => json!(n),
        Value::U16(n) => json!(n),
        Value::U32(n) => json!(n),
        Value::U64(n) => json!(n),
        Value::I16(n) => json!(n),
        Value::I32(n) => json!(n),
        Value::I64(n) => json!(n),
        Value::F64(n) => json!(n),
        Value::Str(s) => json!(s.as_str()),
        Value::ObjectPath(p) => json!(p.as_str()),
        Value::Signature(s) => json!(s.to_string()),
        Value::Array(a) => serde_json::Value::Array(a.iter().map(value_json).collect()),
        Value::Dict(d) => {
            let mut m = serde_json::Map::new();
            for (k, val) in d.iter() {
                let key = match value_json(k) {
                    serde_json::Value::String(s) => s,
                    other => other.to_string(),
                };
                m.insert(key, value_json(val));
            }
            serde_json::Value::Object(m)
        }
        Value::Value(inner) => value_json(inner),
        Value::Structure(st) => serde_json::Value::Array(st.fields().iter().map(value_json).collect()),
        other => json!(format!("{other:?}")),
    }
}

/// The snake_case name of a D-Bus property or member (`IsDesignatedController` → `is_designated_controller`).
pub fn snake_case(name: &str) -> String {
    let mut out = String::with_capacity(name.len() + 4);
    for (i, c) in name.chars().enumerate() {
        if c.is_ascii_uppercase() {
            if i > 0 {
                out.push('_');
            }
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

/// D-Bus properties (`GetAll`, `PropertiesChanged`) as one JSON object with snake_case names.
pub fn properties_json(props: &HashMap<String, OwnedValue>) -> serde_json::Value {
    let sorted: BTreeMap<String, serde_json::Value> =
        props.iter().map(|(k, v)| (snake_case(k), value_json(v))).collect();
    serde_json::to_value(sorted).unwrap_or_default()
}

/// Reads typed members out of D-Bus properties; a missing or mistyped property gives the default (an
/// older vmhad may not publish it).
struct Props<'a>(&'a HashMap<String, OwnedValue>);

impl Props<'_> {
    fn json(&self, name: &str) -> serde_json::Value {
        self.0.get(name).map(|v| value_json(v)).unwrap_or_default()
    }
    fn string(&self, name: &str) -> String {
        self.json(name).as_str().unwrap_or_default().to_string()
    }
    fn boolean(&self, name: &str) -> bool {
        self.json(name).as_bool().unwrap_or_default()
    }
    fn strings(&self, name: &str) -> Vec<String> {
        serde_json::from_value(self.json(name)).unwrap_or_default()
    }
    fn map<T: serde::de::DeserializeOwned>(&self, name: &str) -> BTreeMap<String, T> {
        serde_json::from_value(self.json(name)).unwrap_or_default()
    }
}

/// The D-Bus properties each typed object is made from (the CLI's test compares them with the shipped
/// interface XML).
pub const CLUSTER_PROPERTIES: &[&str] = &[
    "Name",
    "Quorate",
    "DesignatedController",
    "Members",
    "Agents",
    "LocalHost",
    "StonithEnabled",
    "Connected",
    "CibVersion",
    "VirtualClusters",
    "ElasticGroups",
];
pub const HOST_PROPERTIES: &[&str] = &[
    "Name",
    "State",
    "Standby",
    "Maintenance",
    "IsDesignatedController",
    "Utilization",
];
pub const VM_PROPERTIES: &[&str] = &[
    "Name",
    "Agent",
    "State",
    "Hosts",
    "FailedOn",
    "FailCounts",
    "TargetRole",
    "Managed",
    "Config",
    "Constraints",
    "Utilization",
    "Health",
];

impl Cluster {
    /// From the Cluster interface's properties. Before vmhad has read the cluster (not connected and no
    /// CIB version) quorum, DC and fencing are unknown: `None`.
    pub fn from_properties(props: &HashMap<String, OwnedValue>) -> Cluster {
        let p = Props(props);
        let connected = p.boolean("Connected");
        let cib_version = p.string("CibVersion");
        let known = connected || !cib_version.is_empty();
        Cluster {
            name: p.string("Name"),
            quorate: known.then(|| p.boolean("Quorate")),
            designated_controller: known.then(|| p.string("DesignatedController")),
            members: p.strings("Members"),
            agents: p.strings("Agents"),
            local_host: p.string("LocalHost"),
            stonith_enabled: known.then(|| p.boolean("StonithEnabled")),
            connected,
            cib_version,
            virtual_clusters: serde_json::from_value::<Vec<(String, Vec<String>)>>(p.json("VirtualClusters"))
                .map(|v| v.into_iter().collect())
                .unwrap_or_default(),
            elastic_groups: serde_json::from_value::<Vec<(String, String, u32, u32, Vec<String>)>>(
                p.json("ElasticGroups"),
            )
            .map(|v| {
                v.into_iter()
                    .map(|(name, template, min, max, members)| ElasticGroup {
                        name,
                        template,
                        min,
                        max,
                        members,
                    })
                    .collect()
            })
            .unwrap_or_default(),
        }
    }

    /// True while vmhad has not read the cluster yet.
    pub fn connecting(&self) -> bool {
        !self.connected && self.cib_version.is_empty()
    }
}

impl Host {
    /// From a Host object's properties.
    pub fn from_properties(props: &HashMap<String, OwnedValue>) -> Host {
        let p = Props(props);
        Host {
            name: p.string("Name"),
            state: p.string("State"),
            standby: p.boolean("Standby"),
            maintenance: p.boolean("Maintenance"),
            is_designated_controller: p.boolean("IsDesignatedController"),
            utilization: p.map("Utilization"),
        }
    }
}

impl Vm {
    /// From a VirtualMachine object's properties.
    pub fn from_properties(props: &HashMap<String, OwnedValue>) -> Vm {
        let p = Props(props);
        Vm {
            name: p.string("Name"),
            agent: p.string("Agent"),
            state: p.string("State"),
            hosts: p.strings("Hosts"),
            failed_on: p.strings("FailedOn"),
            fail_counts: p.map("FailCounts"),
            target_role: p.string("TargetRole"),
            managed: p.boolean("Managed"),
            config: p.string("Config"),
            constraints: p.strings("Constraints"),
            utilization: p.map("Utilization"),
            health: p.map("Health"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn props(pairs: Vec<(&str, Value<'static>)>) -> HashMap<String, OwnedValue> {
        pairs
            .into_iter()
            .map(|(k, v)| (k.to_string(), OwnedValue::try_from(v).unwrap()))
            .collect()
    }

    #[test]
    fn names_become_snake_case() {
        assert_eq!(snake_case("IsDesignatedController"), "is_designated_controller");
        assert_eq!(snake_case("CibVersion"), "cib_version");
        assert_eq!(snake_case("Name"), "name");
        assert_eq!(snake_case("already_snake"), "already_snake");
    }

    #[test]
    fn a_document_starts_with_its_version_and_kind_and_keeps_the_body() {
        let d = document("vm_list", serde_json::json!({"vms": [], "kind": "spoofed"}));
        let keys: std::collections::BTreeSet<&String> = d.as_object().unwrap().keys().collect();
        assert_eq!(keys.into_iter().collect::<Vec<_>>(), ["kind", "schema_version", "vms"]);
        assert_eq!(d["kind"], "vm_list");
        assert_eq!(d["schema_version"], SCHEMA_VERSION);
        let d = document("ok", ());
        assert_eq!(d.as_object().unwrap().len(), 2);
        let d = document("names", vec!["a"]);
        assert_eq!(d["value"], serde_json::json!(["a"]));
    }

    #[test]
    fn a_connecting_cluster_has_unknown_quorum_dc_and_fencing() {
        let fresh = props(vec![
            ("Name", Value::from("")),
            ("Quorate", Value::from(false)),
            ("Connected", Value::from(false)),
            ("CibVersion", Value::from("")),
            ("StonithEnabled", Value::from(false)),
        ]);
        let c = Cluster::from_properties(&fresh);
        assert!(c.connecting());
        assert_eq!(
            (c.quorate, c.stonith_enabled, c.designated_controller),
            (None, None, None)
        );
        let read = props(vec![
            ("Quorate", Value::from(true)),
            ("Connected", Value::from(true)),
            ("CibVersion", Value::from("0.5.1")),
            ("DesignatedController", Value::from("h1")),
            ("Members", Value::from(vec!["h1", "h2"])),
        ]);
        let c = Cluster::from_properties(&read);
        assert!(!c.connecting());
        assert_eq!(c.quorate, Some(true));
        assert_eq!(c.designated_controller.as_deref(), Some("h1"));
        assert_eq!(c.stonith_enabled, Some(false));
        assert_eq!(c.members, ["h1", "h2"]);
    }

    #[test]
    fn virtual_clusters_and_elastic_groups_read_from_their_struct_arrays() {
        let vclusters = vec![("shop".to_string(), vec!["vm1".to_string(), "ip1".to_string()])];
        let groups = vec![(
            "web".to_string(),
            "web1".to_string(),
            1u32,
            3u32,
            vec!["web1".to_string()],
        )];
        let c = Cluster::from_properties(&props(vec![
            ("VirtualClusters", Value::from(vclusters)),
            ("ElasticGroups", Value::from(groups)),
        ]));
        assert_eq!(c.virtual_clusters.get("shop").unwrap(), &["vm1", "ip1"]);
        assert_eq!(
            c.elastic_groups,
            [ElasticGroup {
                name: "web".into(),
                template: "web1".into(),
                min: 1,
                max: 3,
                members: vec!["web1".into()],
            }]
        );
        // Without them (an older vmhad): empty, and a document without the members still reads.
        let old = Cluster::from_properties(&props(vec![("Name", Value::from("c"))]));
        assert!(old.virtual_clusters.is_empty() && old.elastic_groups.is_empty());
        let mut j = serde_json::to_value(&old).unwrap();
        let o = j.as_object_mut().unwrap();
        o.remove("virtual_clusters");
        o.remove("elastic_groups");
        assert_eq!(serde_json::from_value::<Cluster>(j).unwrap(), old);
    }

    #[test]
    fn a_vm_round_trips_and_keeps_host_names_as_data() {
        let mut counts = HashMap::new();
        counts.insert("NodeA", 2u32);
        let mut util = HashMap::new();
        util.insert("hv_memory", "512");
        let vm = Vm::from_properties(&props(vec![
            ("Name", Value::from("web1")),
            ("State", Value::from("running")),
            ("Hosts", Value::from(vec!["NodeA"])),
            ("FailCounts", Value::from(counts)),
            ("Utilization", Value::from(util)),
            ("Managed", Value::from(true)),
            ("SomethingNew", Value::from(7u32)),
        ]));
        assert_eq!(vm.fail_counts.get("NodeA"), Some(&2));
        assert_eq!(vm.hosts, ["NodeA"]);
        assert!(vm.managed);
        assert_eq!(vm.utilization.get("hv_memory").map(String::as_str), Some("512"));
        let shown = document("vm", serde_json::json!({ "vm": &vm }));
        let back: VmShow = serde_json::from_value(shown).unwrap();
        assert_eq!(back.vm, vm);
        assert_eq!(back.kind, "vm");
    }

    #[test]
    fn unknown_members_are_refused_when_reading_back() {
        let j = serde_json::json!({"schema_version": 1, "kind": "vm_list", "vms": [], "extra": 1});
        assert!(serde_json::from_value::<VmList>(j).is_err());
    }
}
