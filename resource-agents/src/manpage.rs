//! The manual page `ocf_vmha_VirtualMachine(7)`, generated from the same parameter and action tables as
//! the meta-data (as resource-agents generates `ocf_heartbeat_*(7)` from theirs), so the two never
//! disagree. `vmha generate man DIR` writes it; the packages install it in section 7.

use roff::{bold, italic, roman, Roff};

use crate::metadata::{ACTIONS, LONGDESC};
use crate::params::{ParamKind, PARAMETERS};

/// The page's file name.
pub const FILE_NAME: &str = "ocf_vmha_VirtualMachine.7";

/// The exit statuses the agent uses, with what Pacemaker does on each.
const EXIT_STATUSES: &[(u8, &str, &str)] = &[
    (0, "OCF_SUCCESS", "the action succeeded; for monitor: the VM runs here."),
    (
        1,
        "OCF_ERR_GENERIC",
        "the action failed (a soft error): Pacemaker recovers the VM, by restarting it or, after a failed stop, by fencing the host.",
    ),
    (2, "OCF_ERR_ARGS", "a parameter is wrong on this host: the VM is not run here."),
    (3, "OCF_ERR_UNIMPLEMENTED", "the action is not supported."),
    (4, "OCF_ERR_PERM", "insufficient privileges."),
    (
        5,
        "OCF_ERR_INSTALLED",
        "something this host needs is missing (libvirtd unreachable, the config file absent): the VM is not run here.",
    ),
    (
        6,
        "OCF_ERR_CONFIGURED",
        "the resource's configuration is invalid: the VM is stopped everywhere until it is fixed.",
    ),
    (7, "OCF_NOT_RUNNING", "monitor and probe: the VM is cleanly stopped here."),
];

fn kind_text(kind: ParamKind) -> String {
    match kind {
        ParamKind::String => "string".into(),
        ParamKind::Integer => "integer".into(),
        ParamKind::Boolean => "boolean".into(),
        ParamKind::Select(options) => format!("one of {}", options.join(", ")),
    }
}

/// The manual page (roff) for agent version `version`.
pub fn render(version: &str) -> String {
    let mut page = Roff::new();
    page.control(
        "TH",
        [
            "OCF_VMHA_VIRTUALMACHINE",
            "7",
            "",
            &format!("vmha {version}"),
            "OCF resource agents",
        ],
    );
    page.control("SH", ["NAME"]);
    page.text([roman(
        "ocf_vmha_VirtualMachine - manages a libvirt virtual machine as a Pacemaker resource (vmha)",
    )]);

    page.control("SH", ["SYNOPSIS"]);
    page.text([
        bold("pcs resource create"),
        roman(" "),
        italic("NAME"),
        roman(" ocf:vmha:VirtualMachine config="),
        italic("FILE"),
        roman(" ["),
        italic("parameter"),
        roman("="),
        italic("value"),
        roman(" ...] meta allow-migrate=true op monitor interval=10s"),
    ]);
    page.control("br", [] as [&str; 0]);
    page.text([
        bold("crm configure primitive"),
        roman(" "),
        italic("NAME"),
        roman(" ocf:vmha:VirtualMachine params config="),
        italic("FILE"),
        roman(" ["),
        italic("parameter"),
        roman("="),
        italic("value"),
        roman(" ...] meta allow-migrate=true op monitor interval=10s"),
    ]);
    page.control("br", [] as [&str; 0]);
    page.text([
        bold("/usr/lib/ocf/resource.d/vmha/VirtualMachine"),
        roman(" start | stop | monitor | status | migrate_to | migrate_from | reload-agent | validate-all | meta-data | usage"),
    ]);

    page.control("SH", ["DESCRIPTION"]);
    page.text([roman(LONGDESC)]);
    page.control("PP", [] as [&str; 0]);
    page.text([roman(
        "Pacemaker runs the agent with the instance parameters in the environment (OCF_RESKEY_name). \
         With vmhad running on the host, a VM whose QEMU dies is reported to Pacemaker at once instead of \
         at the next monitor, and host capacity and VM utilization are kept up to date; the agent works \
         without vmhad too.",
    )]);

    page.control("SH", ["SUPPORTED PARAMETERS"]);
    for spec in PARAMETERS {
        page.control("TP", [] as [&str; 0]);
        page.text([bold(spec.name)]);
        let mut facts = vec![kind_text(spec.kind)];
        facts.push(if spec.default.is_empty() {
            "no default".to_string()
        } else {
            format!("default {}", spec.default)
        });
        if spec.reloadable {
            facts.push("reloadable without a restart".into());
        }
        if let Some(group) = spec.unique_group {
            facts.push(format!("unique across resources (group {group})"));
        }
        page.text([
            roman(format!("{}. ", spec.shortdesc)),
            italic(format!("({})", facts.join("; "))),
        ]);
        page.control("br", [] as [&str; 0]);
        page.text([roman(spec.longdesc)]);
    }

    page.control("SH", ["SUPPORTED ACTIONS"]);
    page.text([roman(
        "The timeouts below are suggestions (what pcs proposes); the agent bounds every libvirt and guest \
         call by the operation's real timeout.",
    )]);
    for action in ACTIONS {
        page.control("TP", [] as [&str; 0]);
        page.text([bold(action.name)]);
        let mut facts = vec![format!("timeout {}s", action.timeout_s)];
        if let Some(interval) = action.interval_s {
            facts.push(format!("interval {interval}s"));
        }
        if let Some(depth) = action.depth {
            facts.push(format!("depth {depth}"));
        }
        page.text([roman(facts.join(", "))]);
    }

    page.control("SH", ["EXIT STATUS"]);
    for (code, name, meaning) in EXIT_STATUSES {
        page.control("TP", [] as [&str; 0]);
        page.text([bold(format!("{code} {name}"))]);
        page.text([roman(*meaning)]);
    }

    page.control("SH", ["ENVIRONMENT"]);
    for (name, meaning) in [
        ("OCF_RESKEY_name", "each instance parameter."),
        (
            "OCF_RESKEY_CRM_meta_timeout",
            "the operation's timeout (ms): every call's deadline is derived from it.",
        ),
        (
            "OCF_CHECK_LEVEL",
            "monitor depth: 0 asks libvirt, 10 also pings the guest agent.",
        ),
        ("OCF_RESOURCE_INSTANCE", "the resource's name, in log lines."),
    ] {
        page.control("TP", [] as [&str; 0]);
        page.text([bold(name)]);
        page.text([roman(meaning)]);
    }

    page.control("SH", ["EXAMPLES"]);
    page.text([roman(
        "A VM defined by an XML file on shared storage, live-migrated when moved:",
    )]);
    page.control("PP", [] as [&str; 0]);
    page.control("nf", [] as [&str; 0]);
    page.text([roman(
        "pcs resource create web1 ocf:vmha:VirtualMachine config=/shared/web1.xml \\\n    \
         meta allow-migrate=true op monitor interval=10s\n\
         crm configure primitive web1 ocf:vmha:VirtualMachine params config=/shared/web1.xml \\\n    \
         meta allow-migrate=true op monitor interval=10s",
    )]);
    page.control("fi", [] as [&str; 0]);
    page.control("PP", [] as [&str; 0]);
    page.text([roman("Moving it to another host, and clearing its failures:")]);
    page.control("PP", [] as [&str; 0]);
    page.control("nf", [] as [&str; 0]);
    page.text([roman(
        "vmha vm move web1 node2          # or: pcs resource move web1 node2 / crm resource move web1 node2\n\
         vmha vm cleanup web1             # or: pcs resource cleanup web1 / crm resource cleanup web1",
    )]);
    page.control("fi", [] as [&str; 0]);

    page.control("SH", ["SEE ALSO"]);
    page.text([roman(
        "vmha(1), vmhad(8), pcs(8), crm(8), crm_resource(8), ocf_heartbeat_VirtualDomain(7); \
         moving VMs from ocf:heartbeat:VirtualDomain to this agent without downtime: \
         /usr/share/doc/vmha/migrating-from-virtualdomain.md.",
    )]);
    page.render()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_lists_every_parameter_and_action_of_the_meta_data() {
        let page = render("9.9.9");
        assert!(page.contains("\n.TH OCF_VMHA_VIRTUALMACHINE 7"), "{}", &page[..200]);
        for spec in PARAMETERS {
            let name = spec.name.replace('-', "\\-");
            assert!(page.contains(&format!("\\fB{name}\\fR")), "{} missing", spec.name);
        }
        for action in ACTIONS {
            // roff writes a hyphen as \-.
            let name = action.name.replace('-', "\\-");
            assert!(page.contains(&format!("\\fB{name}\\fR")), "{} missing", action.name);
        }
        for section in [
            "NAME",
            "SYNOPSIS",
            "DESCRIPTION",
            "SUPPORTED PARAMETERS",
            "EXIT STATUS",
            "EXAMPLES",
        ] {
            assert!(page.contains(&format!(".SH \"{section}\"")) || page.contains(&format!(".SH {section}")));
        }
        assert!(page.contains("vmha 9.9.9"));
    }
}
