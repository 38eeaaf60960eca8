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
