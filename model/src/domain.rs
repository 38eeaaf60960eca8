//! What vmha reads from a libvirt domain definition: its name and the resources it needs.

use roxmltree::Document;

use crate::ModelError;

/// A domain definition's identity and size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainSummary {
    pub name: String,
    pub uuid: Option<String>,
    pub vcpus: u32,
    /// Memory in MiB (from `<memory>` and its unit).
    pub memory_mib: u64,
}

fn invalid(why: &'static str) -> ModelError {
    ModelError::Invalid {
        what: "domain XML",
        value: String::new(),
        why,
    }
}

impl DomainSummary {
    pub fn parse(xml: &str) -> Result<Self, ModelError> {
        let doc = Document::parse(xml)?;
        let root = doc.root_element();
        if !root.has_tag_name("domain") {
            return Err(invalid("the root element is not <domain>"));
        }
        let text = |tag: &str| {
            root.children()
                .find(|n| n.has_tag_name(tag))
                .and_then(|n| n.text())
                .map(str::trim)
        };
        let name = text("name")
            .filter(|n| !n.is_empty())
            .ok_or_else(|| invalid("it has no <name>"))?;
        let vcpus = match text("vcpu") {
            Some(v) => v.parse().map_err(|_| invalid("<vcpu> is not a number"))?,
            None => 1,
        };
        let memory = root
            .children()
            .find(|n| n.has_tag_name("memory"))
            .ok_or_else(|| invalid("it has no <memory>"))?;
        let amount: u64 = memory
            .text()
            .map(str::trim)
            .and_then(|t| t.parse().ok())
            .ok_or_else(|| invalid("<memory> is not a number"))?;
        let kib = match memory.attribute("unit").unwrap_or("KiB") {
            "b" | "bytes" => amount / 1024,
            "KB" => amount * 1000 / 1024,
            "k" | "KiB" => amount,
            "MB" => amount * 1_000_000 / 1024,
            "M" | "MiB" => amount * 1024,
            "GB" => amount * 1_000_000_000 / 1024,
            "G" | "GiB" => amount * 1024 * 1024,
            "T" | "TiB" => amount * 1024 * 1024 * 1024,
            _ => return Err(invalid("<memory> has an unknown unit")),
        };
        Ok(DomainSummary {
            name: name.to_string(),
            uuid: text("uuid").map(str::to_string),
            vcpus,
            memory_mib: kib / 1024,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_name_vcpus_and_memory_in_any_unit() {
        let d = DomainSummary::parse("<domain type='qemu'><name>web1</name><vcpu placement='static'>2</vcpu><memory unit='MiB'>128</memory></domain>").unwrap();
        assert_eq!(
            d,
            DomainSummary {
                name: "web1".into(),
                uuid: None,
                vcpus: 2,
                memory_mib: 128
            }
        );
        let k = DomainSummary::parse("<domain><name>a</name><memory>262144</memory></domain>").unwrap();
        assert_eq!((k.vcpus, k.memory_mib), (1, 256));
        let g = DomainSummary::parse("<domain><name>a</name><memory unit='GiB'>2</memory></domain>").unwrap();
        assert_eq!(g.memory_mib, 2048);
    }

    #[test]
    fn rejects_what_is_not_a_usable_domain() {
        for bad in [
            "<vm><name>a</name></vm>",
            "<domain><memory>1</memory></domain>",
            "<domain><name>a</name></domain>",
            "<domain><name>a</name><memory unit='parsec'>1</memory></domain>",
            "<domain><name>a</name><vcpu>two</vcpu><memory>1</memory></domain>",
            "not xml",
        ] {
            assert!(DomainSummary::parse(bad).is_err(), "{bad}");
        }
    }
}

/// The vmha guest channel vmha adds to every domain it starts: a virtio-serial port named
/// [`PORT_NAME`](crate::guest::PORT_NAME) whose host side is the Unix socket vmhad connects to.
pub fn guest_channel_xml(vm: &str) -> String {
    format!(
        "<channel type='unix'><source mode='bind' path='{}'/><target type='virtio' name='{}'/></channel>",
        crate::change::escape(&crate::guest::channel_socket(vm)),
        crate::guest::PORT_NAME
    )
}

/// The domain XML with vmha's guest channel added, or `None` when it already has one (any channel whose
/// target is named [`PORT_NAME`](crate::guest::PORT_NAME)).
pub fn with_guest_channel(xml: &str) -> Result<Option<String>, ModelError> {
    let doc = Document::parse(xml)?;
    let root = doc.root_element();
    let has_channel = root
        .descendants()
        .any(|n| n.has_tag_name("target") && n.attribute("name") == Some(crate::guest::PORT_NAME));
    if has_channel {
        return Ok(None);
    }
    if !root.has_tag_name("domain") {
        return Err(invalid("the root element is not <domain>"));
    }
    let name = root
        .children()
        .find(|n| n.has_tag_name("name"))
        .and_then(|n| n.text())
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .ok_or_else(|| invalid("it has no <name>"))?;
    let channel = guest_channel_xml(name);
    // Insert as the last device (or in a new <devices> section), keeping the rest of the text as it is.
    let out = match root.children().find(|n| n.has_tag_name("devices")) {
        Some(devices) => {
            let end = devices.range().end;
            let close = xml[..end]
                .rfind("</")
                .ok_or_else(|| invalid("<devices> is not closed"))?;
            if xml[devices.range()].ends_with("/>") {
                let start = devices.range().start;
                format!("{}<devices>{channel}</devices>{}", &xml[..start], &xml[end..])
            } else {
                format!("{}{channel}{}", &xml[..close], &xml[close..])
            }
        }
        None => {
            let end = root.range().end;
            let close = xml[..end]
                .rfind("</")
                .ok_or_else(|| invalid("<domain> is not closed"))?;
            format!("{}<devices>{channel}</devices>{}", &xml[..close], &xml[close..])
        }
    };
    Ok(Some(out))
}

#[cfg(test)]
mod channel_tests {
    use super::*;

    fn channel_targets(xml: &str) -> Vec<String> {
        let doc = Document::parse(xml).unwrap();
        doc.descendants()
            .filter(|n| n.has_tag_name("channel"))
            .filter_map(|c| {
                c.children()
                    .find(|n| n.has_tag_name("target"))?
                    .attribute("name")
                    .map(str::to_string)
            })
            .collect()
    }

    #[test]
    fn adds_the_guest_channel_as_the_last_device() {
        let xml = "<domain type='qemu'><name>web1</name><memory>1</memory><devices><channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel></devices></domain>";
        let out = with_guest_channel(xml).unwrap().unwrap();
        assert_eq!(
            channel_targets(&out),
            vec!["org.qemu.guest_agent.0", "org.vmha.guest.0"]
        );
        assert!(out.contains("path='/var/lib/libvirt/qemu/vmha.web1.guest.0'"));
        assert!(with_guest_channel(&out).unwrap().is_none(), "added only once");
    }

    #[test]
    fn adds_a_devices_section_when_there_is_none_or_it_is_empty() {
        for xml in [
            "<domain><name>a</name><memory>1</memory></domain>",
            "<domain><name>a</name><memory>1</memory><devices/></domain>",
        ] {
            let out = with_guest_channel(xml).unwrap().unwrap();
            assert_eq!(channel_targets(&out), vec!["org.vmha.guest.0"], "{out}");
            assert_eq!(
                Document::parse(&out)
                    .unwrap()
                    .descendants()
                    .filter(|n| n.has_tag_name("devices"))
                    .count(),
                1
            );
        }
    }

    #[test]
    fn rejects_what_is_not_a_domain() {
        assert!(with_guest_channel("<vm/>").is_err());
        assert!(with_guest_channel("garbage").is_err());
    }
}
