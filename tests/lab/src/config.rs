//! What a lab is made of: its name, hosts, addresses, Corosync timing and where its state lives.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

/// Root of all labs' state on this machine (each lab has a sub-directory named after it).
pub const LAB_ROOT: &str = "/var/tmp/vmha-lab";

/// One lab's shape. Two labs with different names (and subnets) can run side by side.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LabConfig {
    /// Short name (at most 8 characters: it goes into namespace and interface names).
    pub name: String,
    /// Number of hosts (1..=9).
    pub hosts: u8,
    /// First three octets of the lab subnet; host N gets `<subnet>.<10+N>/24`. The subnet exists only
    /// inside the lab's own namespaces.
    pub subnet: String,
    /// Host names are `<host_prefix><N>`.
    pub host_prefix: String,
    /// Corosync token timeout in ms (`None`: Corosync's default).
    pub token_ms: Option<u32>,
    /// Corosync token_coefficient (`Some(0)` makes `token_ms` the effective timeout).
    pub token_coefficient: Option<u32>,
}

impl LabConfig {
    /// A lab of `hosts` hosts with failover-friendly Corosync timing (token 1000 ms, coefficient 0).
    pub fn new(name: &str, hosts: u8, subnet: &str) -> Self {
        LabConfig {
            name: name.to_string(),
            hosts,
            subnet: subnet.to_string(),
            host_prefix: "node".to_string(),
            token_ms: Some(1000),
            token_coefficient: Some(0),
        }
    }

    /// Checks the values that end up in namespace names, addresses and file names.
    pub fn validate(&self) -> Result<()> {
        let n = &self.name;
        if n.is_empty() || n.len() > 8 || !n.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit()) {
            bail!("lab name {n:?} must be 1-8 characters of a-z and 0-9");
        }
        if !(1..=9).contains(&self.hosts) {
            bail!("a lab has 1 to 9 hosts, not {}", self.hosts);
        }
        let octets: Vec<&str> = self.subnet.split('.').collect();
        if octets.len() != 3 || octets.iter().any(|o| o.parse::<u8>().is_err()) {
            bail!("subnet {:?} must be three octets, e.g. 10.213.0", self.subnet);
        }
        let p = &self.host_prefix;
        if p.is_empty()
            || p.len() > 20
            || !p
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        {
            bail!("host prefix {p:?} must be 1-20 characters of a-z, 0-9 and '-'");
        }
        Ok(())
    }

    /// Host numbers, 1-based.
    pub fn host_numbers(&self) -> impl Iterator<Item = u8> {
        1..=self.hosts
    }

    pub fn host_name(&self, n: u8) -> String {
        format!("{}{}", self.host_prefix, n)
    }

    /// Host number of a host name of this lab.
    pub fn host_number(&self, name: &str) -> Option<u8> {
        let n: u8 = name.strip_prefix(&self.host_prefix)?.parse().ok()?;
        (1..=self.hosts).contains(&n).then_some(n)
    }

    pub fn host_address(&self, n: u8) -> String {
        format!("{}.{}", self.subnet, 10 + u32::from(n))
    }

    /// All host names, space-separated (Pacemaker's `pcmk_host_list` form).
    pub fn host_list(&self) -> String {
        self.host_numbers()
            .map(|n| self.host_name(n))
            .collect::<Vec<_>>()
            .join(" ")
    }

    pub fn dir(&self) -> PathBuf {
        Path::new(LAB_ROOT).join(&self.name)
    }

    pub fn host_dir(&self, n: u8) -> PathBuf {
        self.dir().join("hosts").join(format!("h{n}"))
    }

    /// Storage every host sees at the same path (domain XML, kernels, disks).
    pub fn shared_dir(&self) -> PathBuf {
        self.dir().join("shared")
    }

    pub fn switch_netns(&self) -> String {
        format!("vmha-{}-sw", self.name)
    }

    pub fn host_netns(&self, n: u8) -> String {
        format!("vmha-{}-h{n}", self.name)
    }

    /// The switch-side end of host N's cable (bring it down to cut the host off the network).
    pub fn switch_port(&self, n: u8) -> String {
        format!("port{n}")
    }

    /// Unix socket of the lab's power controller (serves the lab fence agent).
    pub fn power_socket(&self) -> PathBuf {
        self.dir().join("power.sock")
    }

    pub fn power_log(&self) -> PathBuf {
        self.dir().join("power.log")
    }

    pub fn config_file(&self) -> PathBuf {
        self.dir().join("lab.json")
    }

    /// Reads the configuration of a lab that was brought up before.
    pub fn load(name: &str) -> Result<Self> {
        let path = Path::new(LAB_ROOT).join(name).join("lab.json");
        let text = std::fs::read_to_string(&path)
            .map_err(|e| anyhow::anyhow!("no lab named {name:?} ({}: {e})", path.display()))?;
        let cfg: LabConfig = serde_json::from_str(&text)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Corosync configuration shared by all hosts (knet transport, no crypto inside the lab).
    pub fn corosync_conf(&self) -> String {
        let mut s = String::new();
        s.push_str("totem {\n  version: 2\n");
        s.push_str(&format!("  cluster_name: {}\n", self.name));
        s.push_str("  transport: knet\n  crypto_cipher: none\n  crypto_hash: none\n");
        if let Some(t) = self.token_ms {
            s.push_str(&format!("  token: {t}\n"));
        }
        if let Some(c) = self.token_coefficient {
            s.push_str(&format!("  token_coefficient: {c}\n"));
        }
        s.push_str("}\n\nnodelist {\n");
        for n in self.host_numbers() {
            s.push_str(&format!(
                "  node {{\n    ring0_addr: {}\n    name: {}\n    nodeid: {n}\n  }}\n",
                self.host_address(n),
                self.host_name(n)
            ));
        }
        s.push_str("}\n\nquorum {\n  provider: corosync_votequorum\n");
        if self.hosts == 2 {
            s.push_str("  two_node: 1\n");
        }
        // Like Debian's pacemaker (/etc/corosync/uidgid.d/pacemaker): processes of group haclient may use
        // Corosync's IPC (CPG included), not only root.
        s.push_str("}\n\nuidgid {\n  gid: haclient\n");
        s.push_str("}\n\nlogging {\n  to_stderr: no\n  to_logfile: yes\n");
        s.push_str("  logfile: /var/log/corosync/corosync.log\n  to_syslog: no\n  timestamp: hires\n}\n");
        s
    }

    /// /etc/hosts of every lab host: all hosts resolve by name inside the lab.
    pub fn etc_hosts(&self) -> String {
        let mut s = String::from("127.0.0.1 localhost\n");
        for n in self.host_numbers() {
            s.push_str(&format!("{} {}\n", self.host_address(n), self.host_name(n)));
        }
        s
    }

    /// Lines appended to host N's libvirtd.conf: TCP listener without authentication (lab only: the
    /// subnet exists only inside the lab), a distinct host UUID (migration refuses "the same host"),
    /// logs in the host's own log directory.
    pub fn libvirtd_conf_extra(&self, n: u8) -> String {
        format!(
            "\n# vmha lab\nlisten_tls = 0\nlisten_tcp = 1\nlisten_addr = \"{}\"\nauth_tcp = \"none\"\n\
             host_uuid = \"00000000-0000-4000-8000-{:012x}\"\n\
             log_outputs = \"3:file:/var/log/libvirt/libvirtd.log\"\n",
            self.host_address(n),
            u64::from(n)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_names_that_do_not_fit_namespace_names() {
        assert!(LabConfig::new("demo", 3, "10.213.0").validate().is_ok());
        assert!(LabConfig::new("toolongname", 3, "10.213.0").validate().is_err());
        assert!(LabConfig::new("Demo", 3, "10.213.0").validate().is_err());
        assert!(LabConfig::new("demo", 0, "10.213.0").validate().is_err());
        assert!(LabConfig::new("demo", 3, "10.213").validate().is_err());
        assert!(LabConfig::new("demo", 3, "10.213.300").validate().is_err());
    }

    #[test]
    fn host_names_and_addresses_round_trip() {
        let cfg = LabConfig::new("t", 3, "10.213.5");
        assert_eq!(cfg.host_name(2), "node2");
        assert_eq!(cfg.host_number("node2"), Some(2));
        assert_eq!(cfg.host_number("node4"), None);
        assert_eq!(cfg.host_number("other2"), None);
        assert_eq!(cfg.host_address(3), "10.213.5.13");
        assert_eq!(cfg.host_list(), "node1 node2 node3");
        assert!(cfg.etc_hosts().contains("10.213.5.12 node2\n"));
    }

    #[test]
    fn corosync_conf_lists_every_host_and_timing() {
        let cfg = LabConfig::new("t", 3, "10.213.5");
        let conf = cfg.corosync_conf();
        assert!(conf.contains("token: 1000"));
        assert!(conf.contains("token_coefficient: 0"));
        assert_eq!(conf.matches("ring0_addr").count(), 3);
        assert!(conf.contains("ring0_addr: 10.213.5.13\n    name: node3\n    nodeid: 3"));
        assert!(!conf.contains("two_node"));
        assert!(LabConfig::new("t", 2, "10.1.1").corosync_conf().contains("two_node: 1"));
        assert!(conf.contains("uidgid {\n  gid: haclient\n}"), "{conf}");
    }

    #[test]
    fn each_libvirtd_gets_its_own_uuid_and_address() {
        let cfg = LabConfig::new("t", 3, "10.213.5");
        assert!(cfg
            .libvirtd_conf_extra(1)
            .contains("00000000-0000-4000-8000-000000000001"));
        assert!(cfg.libvirtd_conf_extra(3).contains("listen_addr = \"10.213.5.13\""));
    }
}
