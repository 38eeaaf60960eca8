//! The OCF 1.1 meta-data document, generated from the parameter table.

use std::fmt::Write;

use crate::params::{ParamKind, PARAMETERS};

/// An `<action>` hint: what Pacemaker and `pcs` propose when a resource is created.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ActionHint {
    pub name: &'static str,
    pub timeout_s: u32,
    pub interval_s: Option<u32>,
    pub depth: Option<u32>,
}

const fn hint(name: &'static str, timeout_s: u32) -> ActionHint {
    ActionHint {
        name,
        timeout_s,
        interval_s: None,
        depth: None,
    }
}

const fn recurring(name: &'static str, timeout_s: u32, interval_s: u32, depth: u32) -> ActionHint {
    ActionHint {
        name,
        timeout_s,
        interval_s: Some(interval_s),
        depth: Some(depth),
    }
}

/// The advertised actions with their suggested timeouts.
pub const ACTIONS: &[ActionHint] = &[
    hint("start", 90),
    hint("stop", 90),
    recurring("monitor", 30, 10, 0),
    recurring("monitor", 30, 60, 10),
    recurring("status", 30, 10, 0),
    hint("migrate_to", 120),
    hint("migrate_from", 60),
    hint("reload-agent", 10),
    hint("validate-all", 10),
    hint("meta-data", 5),
];

pub const LONGDESC: &str = "Runs one libvirt domain (a virtual machine) as a cluster resource, \
talking to libvirt through its C API: no virsh, no helper processes, so a monitor costs little \
more than loading libvirt. Every libvirt call is bounded by a deadline derived from the \
operation's timeout, so a hung libvirtd produces an error with a reason instead of a hang. \
Monitor depth 0 checks libvirt's domain state over a read-only connection; depth 10 also sends \
guest-ping through the QEMU guest agent. Live migration is peer-to-peer and managed by libvirt, so \
a failed migration leaves the VM running on one host only. The agent never writes utilization \
attributes.";

/// OCF 1.1 meta-data that also validates against the OCF 1.0 DTD shipped with resource-agents (which
/// `ocf-tester` checks with `xmllint --valid`): the DOCTYPE names that DTD, declares the two 1.1
/// parameter attributes it lacks and adds `reload-agent` to its action names (the first declaration of
/// an attribute binds, and the internal subset is read before the external DTD). Select-type parameters are rendered as strings with their choices in
/// the short description, since the 1.0 DTD has no `<option>` element.
const DOCTYPE: &str = "<!DOCTYPE resource-agent SYSTEM \"ra-api-1.dtd\" [\n\
<!ATTLIST parameter reloadable (0|1) \"0\" unique-group CDATA #IMPLIED>\n\
<!ATTLIST action name (start|stop|recover|monitor|restart|migrate_to|migrate_from|promote|demote|notify|\
status|reload|reload-agent|meta-data|usage|methods|validate-all) #REQUIRED>\n]>\n";

/// The meta-data XML for agent version `version`.
pub fn render(version: &str) -> String {
    let mut xml = String::with_capacity(16 * 1024);
    xml.push_str("<?xml version=\"1.0\"?>\n");
    xml.push_str(DOCTYPE);
    let _ = writeln!(
        xml,
        "<resource-agent name=\"VirtualMachine\" version=\"{}\">",
        escape(version)
    );
    xml.push_str("<version>1.1</version>\n");
    let _ = writeln!(xml, "<longdesc lang=\"en\">{}</longdesc>", escape(LONGDESC));
    xml.push_str("<shortdesc lang=\"en\">Manages a libvirt virtual machine (vmha)</shortdesc>\n<parameters>\n");
    for spec in PARAMETERS {
        let _ = write!(xml, "<parameter name=\"{}\"", spec.name);
        if let Some(group) = spec.unique_group {
            let _ = write!(xml, " unique-group=\"{group}\"");
        }
        let _ = writeln!(xml, " required=\"0\" reloadable=\"{}\">", u8::from(spec.reloadable));
        let _ = writeln!(xml, "<longdesc lang=\"en\">{}</longdesc>", escape(spec.longdesc));
        let (kind, choices) = match spec.kind {
            ParamKind::String => ("string", String::new()),
            ParamKind::Integer => ("integer", String::new()),
            ParamKind::Boolean => ("boolean", String::new()),
            ParamKind::Select(options) => ("string", format!(" (one of: {})", options.join(", "))),
        };
        let _ = writeln!(
            xml,
            "<shortdesc lang=\"en\">{}{}</shortdesc>",
            escape(spec.shortdesc),
            escape(&choices)
        );
        let _ = writeln!(xml, "<content type=\"{kind}\" default=\"{}\"/>", escape(spec.default));
        xml.push_str("</parameter>\n");
    }
    xml.push_str("</parameters>\n<actions>\n");
    for action in ACTIONS {
        let _ = write!(
            xml,
            "<action name=\"{}\" timeout=\"{}s\"",
            action.name, action.timeout_s
        );
        if let Some(interval) = action.interval_s {
            let _ = write!(xml, " interval=\"{interval}s\"");
        }
        if let Some(depth) = action.depth {
            let _ = write!(xml, " depth=\"{depth}\"");
        }
        xml.push_str("/>\n");
    }
    xml.push_str("</actions>\n</resource-agent>\n");
    xml
}

fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            _ => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc() -> String {
        render("0.1.0")
    }

    /// Parses the meta-data the way Pacemaker does: the DOCTYPE is read, not fetched.
    fn parse(text: &str) -> roxmltree::Document<'_> {
        let options = roxmltree::ParsingOptions {
            allow_dtd: true,
            ..Default::default()
        };
        roxmltree::Document::parse_with_options(text, options).expect("well-formed")
    }

    #[test]
    fn is_well_formed_ocf_1_1() {
        let text = doc();
        let parsed = parse(&text);
        let root = parsed.root_element();
        assert_eq!(root.tag_name().name(), "resource-agent");
        assert_eq!(root.attribute("name"), Some("VirtualMachine"));
        assert_eq!(root.attribute("version"), Some("0.1.0"));
        let children: Vec<&str> = root
            .children()
            .filter(|n| n.is_element())
            .map(|n| n.tag_name().name())
            .collect();
        assert_eq!(children, ["version", "longdesc", "shortdesc", "parameters", "actions"]);
        let version = root.children().find(|n| n.has_tag_name("version"));
        assert_eq!(version.and_then(|v| v.text()), Some("1.1"));
    }

    #[test]
    fn every_parameter_is_documented_with_type_and_default() {
        let text = doc();
        let parsed = parse(&text);
        let params: Vec<_> = parsed.descendants().filter(|n| n.has_tag_name("parameter")).collect();
        assert_eq!(params.len(), PARAMETERS.len());
        for (node, spec) in params.iter().zip(PARAMETERS) {
            assert_eq!(node.attribute("name"), Some(spec.name));
            assert!(matches!(node.attribute("reloadable"), Some("0" | "1")));
            let child = |tag| node.children().find(|c| c.has_tag_name(tag));
            for tag in ["longdesc", "shortdesc"] {
                let desc = child(tag).unwrap_or_else(|| panic!("{} lacks {tag}", spec.name));
                assert_eq!(desc.attribute("lang"), Some("en"));
                assert!(desc.text().is_some_and(|t| t.len() > 5), "{}", spec.name);
            }
            let content = child("content").expect("content");
            assert!(matches!(
                content.attribute("type"),
                Some("string" | "integer" | "boolean" | "select")
            ));
            assert_eq!(content.attribute("default"), Some(spec.default), "{}", spec.name);
        }
    }

    #[test]
    fn shutdown_mode_lists_its_options() {
        let text = doc();
        assert!(text.contains("(one of: acpi, agent, both)</shortdesc>\n<content type=\"string\" default=\"acpi\"/>"));
    }

    #[test]
    fn reloadable_parameters_are_marked() {
        let text = doc();
        assert!(text.contains("<parameter name=\"shutdown_timeout\" required=\"0\" reloadable=\"1\">"));
        assert!(text.contains("<parameter name=\"config\" unique-group=\"config\" required=\"0\" reloadable=\"0\">"));
    }

    #[test]
    fn action_hints_are_honest() {
        let text = doc();
        for line in [
            "<action name=\"start\" timeout=\"90s\"/>",
            "<action name=\"stop\" timeout=\"90s\"/>",
            "<action name=\"monitor\" timeout=\"30s\" interval=\"10s\" depth=\"0\"/>",
            "<action name=\"monitor\" timeout=\"30s\" interval=\"60s\" depth=\"10\"/>",
            "<action name=\"migrate_to\" timeout=\"120s\"/>",
            "<action name=\"migrate_from\" timeout=\"60s\"/>",
            "<action name=\"reload-agent\" timeout=\"10s\"/>",
            "<action name=\"validate-all\" timeout=\"10s\"/>",
            "<action name=\"meta-data\" timeout=\"5s\"/>",
        ] {
            assert!(text.contains(line), "missing {line}");
        }
        // Recurring monitors of one resource need distinct intervals.
        let mut intervals: Vec<_> = ACTIONS
            .iter()
            .filter(|a| a.name == "monitor")
            .map(|a| a.interval_s)
            .collect();
        intervals.dedup();
        assert_eq!(intervals.len(), 2);
    }

    #[test]
    fn text_is_escaped() {
        assert_eq!(escape("<a href=\"x\">&'"), "&lt;a href=&quot;x&quot;&gt;&amp;&apos;");
    }
}
