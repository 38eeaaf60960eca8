//! Two labs as two sites of a booth setup: site A and site B are each their own cluster (Corosync,
//! Pacemaker, fencing on, as [`Lab::up`] makes one) on their own subnet and host names; a router namespace
//! joins the two sites' switches and a third subnet, where booth's arbitrator runs in a namespace of its
//! own. At each site booth's site daemon runs as a cluster resource group (an `ocf:heartbeat:IPaddr2`
//! site address and `ocf:pacemaker:booth-site`), as booth's documentation sets it up. Everything started
//! here is tracked by PID and torn down by PID; the namespaces are this site lab's own.

use std::fs;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use nix::sys::signal::Signal;

use crate::config::{LabConfig, LAB_ROOT};
use crate::lab::Lab;
use crate::process::{run_ok, ProcId};
use crate::wait::wait_for;

/// Where booth's configuration lives on every site host (booth's default).
pub const BOOTH_CONF: &str = "/etc/booth/booth.conf";

/// Where booth's key lives on every site host (booth-keygen's default).
pub const BOOTH_AUTHKEY: &str = "/etc/booth/authkey";

/// The shape of a two-site lab.
#[derive(Debug, Clone)]
pub struct SiteLabConfig {
    /// Site A's cluster (its lab name also names the router and arbitrator namespaces).
    pub a: LabConfig,
    /// Site B's cluster.
    pub b: LabConfig,
    /// First three octets of the arbitrator's subnet (the router is `.1`, the arbitrator `.10`).
    pub arbitrator_subnet: String,
    /// Booth tickets (name, expire seconds).
    pub tickets: Vec<(String, u32)>,
}

impl SiteLabConfig {
    /// Two sites of two hosts each: A named `name` on `subnet` (three octets), with hosts `prefixes.0`1 and
    /// 2; B named after A (its first 7 characters and `2`: lab names are at most 8) on the next subnet, with
    /// hosts `prefixes.1`1 and 2; the arbitrator on the subnet after that. Each site's [`LabConfig`] goes
    /// through `timing` (e.g. the tests' Corosync and Pacemaker timing).
    pub fn two_sites(
        name: &str,
        subnet: &str,
        prefixes: (&str, &str),
        tickets: Vec<(String, u32)>,
        timing: impl Fn(LabConfig) -> LabConfig,
    ) -> Result<SiteLabConfig> {
        let (prefix, third) = subnet
            .rsplit_once('.')
            .ok_or_else(|| anyhow!("subnet {subnet}: three octets wanted"))?;
        let third: u8 = third
            .parse()
            .with_context(|| format!("subnet {subnet}: three octets wanted"))?;
        let next = |k: u8| -> Result<String> {
            let octet = third
                .checked_add(k)
                .ok_or_else(|| anyhow!("subnet {subnet}: no room for two more subnets after it"))?;
            Ok(format!("{prefix}.{octet}"))
        };
        let mut a = LabConfig::new(name, 2, subnet);
        a.host_prefix = prefixes.0.into();
        let short: String = name.chars().take(7).collect();
        let mut b = LabConfig::new(&format!("{short}2"), 2, &next(1)?);
        b.host_prefix = prefixes.1.into();
        Ok(SiteLabConfig {
            a: timing(a),
            b: timing(b),
            arbitrator_subnet: next(2)?,
            tickets,
        })
    }

    /// Site address of a site: `.100` of its subnet, held by the site's booth group.
    pub fn site_address(cfg: &LabConfig) -> String {
        format!("{}.100", cfg.subnet)
    }

    pub fn arbitrator_address(&self) -> String {
        format!("{}.10", self.arbitrator_subnet)
    }

    pub fn router_netns(&self) -> String {
        format!("vmha-{}-rt", self.a.name)
    }

    pub fn arbitrator_netns(&self) -> String {
        format!("vmha-{}-arb", self.a.name)
    }

    /// The router's leg into a site's switch (bring it down to cut the site off).
    pub fn router_leg(&self, site: Site) -> &'static str {
        match site {
            Site::A => "site-a",
            Site::B => "site-b",
        }
    }

    /// The site lab's own directory (booth configuration, arbitrator PID and log).
    pub fn dir(&self) -> PathBuf {
        PathBuf::from(LAB_ROOT).join(format!("{}-booth", self.a.name))
    }

    /// The lab's booth key (the arbitrator's copy; every site host has it as [`BOOTH_AUTHKEY`]).
    pub fn authkey(&self) -> PathBuf {
        self.dir().join("authkey")
    }

    /// booth.conf, the same at both sites and the arbitrator but for where the key is (`authfile`: the
    /// sites' /etc/booth/authkey; the arbitrator runs in a network namespace only, so its copy is in the
    /// lab's directory). Every booth message is authenticated with that key, as in production. Short
    /// timing so that a lost site's ticket moves within a test: timeout * (retries + 1) < expire / 2, as
    /// booth requires; `acquire-after` half the expire time, so a site cut off has that long after its
    /// lease ran out to stop what the ticket holds.
    pub fn booth_conf(&self, authfile: &str) -> String {
        let mut s = format!("# vmha site lab\ntransport = UDP\nport = 9929\nauthfile = {authfile}\n");
        s.push_str(&format!("site = {}\n", Self::site_address(&self.a)));
        s.push_str(&format!("site = {}\n", Self::site_address(&self.b)));
        s.push_str(&format!("arbitrator = {}\n", self.arbitrator_address()));
        s.push_str("arbitrator-user = root\narbitrator-group = root\n");
        for (t, expire) in &self.tickets {
            s.push_str(&format!(
                "ticket = \"{t}\"\n    expire = {expire}\n    acquire-after = {}\n    timeout = 1\n    retries = 3\n",
                expire / 2
            ));
        }
        s
    }
}

/// One of the two sites.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Site {
    A,
    B,
}

/// A running two-site lab. Dropping it tears down the arbitrator and the router by PID and namespace,
/// and both sites (each [`Lab`] is owned).
#[derive(Debug)]
pub struct SiteLab {
    pub cfg: SiteLabConfig,
    pub a: Lab,
    pub b: Lab,
}

impl Drop for SiteLab {
    fn drop(&mut self) {
        if let Err(e) = self.down_booth() {
            eprintln!(
                "site lab {}: tear-down of router and arbitrator failed: {e:#}",
                self.cfg.a.name
            );
        }
    }
}

impl SiteLab {
    /// Brings both sites up (one after the other: two cores), the router and the arbitrator, and booth at
    /// each site. Returns once both sites' booth groups run and the arbitrator answers.
    pub fn up(cfg: SiteLabConfig) -> Result<SiteLab> {
        if cfg.a.subnet == cfg.b.subnet || cfg.a.host_prefix == cfg.b.host_prefix {
            bail!("the two sites need different subnets and host names");
        }
        for (t, _) in &cfg.tickets {
            if t.is_empty() || !t.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
                bail!("ticket name {t:?}: letters, digits, '-' and '_' only");
            }
        }
        // An earlier site lab of the same name: its router and arbitrator go first.
        let stale = StaleBooth(cfg.clone());
        stale.down()?;
        let a = Lab::up(cfg.a.clone())?;
        let b = Lab::up(cfg.b.clone())?;
        let lab = SiteLab { cfg, a, b };
        let started = lab
            .create_router()
            .and_then(|()| lab.start_arbitrator())
            .and_then(|()| {
                [Site::A, Site::B]
                    .into_iter()
                    .try_for_each(|site| lab.start_booth_site(site))
            });
        if let Err(e) = started {
            for l in [&lab.a, &lab.b] {
                if let Ok(dir) = l.collect_logs(&crate::lab::default_log_dir(&l.cfg.name)) {
                    eprintln!("site lab: logs of {} in {}", l.cfg.name, dir.display());
                }
            }
            return Err(e);
        }
        Ok(lab)
    }

    pub fn site(&self, site: Site) -> &Lab {
        match site {
            Site::A => &self.a,
            Site::B => &self.b,
        }
    }

    fn create_router(&self) -> Result<()> {
        let c = &self.cfg;
        let ip = |args: &[&str]| run_ok("ip", args, Duration::from_secs(20));
        let rt = c.router_netns();
        let arb = c.arbitrator_netns();
        ip(&["netns", "add", &rt])?;
        ip(&["netns", "add", &arb])?;
        no_ipv6(&arb)?;
        ip(&["-n", &rt, "link", "set", "lo", "up"])?;
        ip(&["-n", &arb, "link", "set", "lo", "up"])?;
        run_ok(
            "ip",
            &["netns", "exec", &rt, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1"],
            Duration::from_secs(10),
        )?;
        for site in [Site::A, Site::B] {
            let lab = self.site(site);
            let leg = c.router_leg(site);
            let sw = lab.cfg.switch_netns();
            let tmp = format!("vmha-{}-r", lab.cfg.name);
            ip(&[
                "link", "add", &tmp, "netns", &rt, "type", "veth", "peer", "name", "router", "netns", &sw,
            ])?;
            ip(&["-n", &rt, "link", "set", &tmp, "name", leg])?;
            ip(&[
                "-n",
                &rt,
                "addr",
                "add",
                &format!("{}.1/24", lab.cfg.subnet),
                "dev",
                leg,
            ])?;
            ip(&["-n", &rt, "link", "set", leg, "up"])?;
            ip(&["-n", &sw, "link", "set", "router", "master", "br0"])?;
            ip(&["-n", &sw, "link", "set", "router", "up"])?;
            // Each host reaches the other site and the arbitrator through the router (no default route).
            let other = self.site(if site == Site::A { Site::B } else { Site::A });
            for n in lab.cfg.host_numbers() {
                let ns = lab.cfg.host_netns(n);
                no_ipv6(&ns)?;
                for dest in [&other.cfg.subnet, &c.arbitrator_subnet] {
                    ip(&[
                        "-n",
                        &ns,
                        "route",
                        "add",
                        &format!("{dest}.0/24"),
                        "via",
                        &format!("{}.1", lab.cfg.subnet),
                    ])?;
                }
            }
        }
        let tmp = format!("vmha-{}-ar", c.a.name);
        ip(&[
            "link", "add", &tmp, "netns", &rt, "type", "veth", "peer", "name", "eth0", "netns", &arb,
        ])?;
        ip(&["-n", &rt, "link", "set", &tmp, "name", "arb"])?;
        ip(&[
            "-n",
            &rt,
            "addr",
            "add",
            &format!("{}.1/24", c.arbitrator_subnet),
            "dev",
            "arb",
        ])?;
        ip(&["-n", &rt, "link", "set", "arb", "up"])?;
        ip(&[
            "-n",
            &arb,
            "addr",
            "add",
            &format!("{}/24", c.arbitrator_address()),
            "dev",
            "eth0",
        ])?;
        ip(&["-n", &arb, "link", "set", "eth0", "up"])?;
        for site in [&c.a, &c.b] {
            ip(&[
                "-n",
                &arb,
                "route",
                "add",
                &format!("{}.0/24", site.subnet),
                "via",
                &format!("{}.1", c.arbitrator_subnet),
            ])?;
        }
        Ok(())
    }

    fn start_arbitrator(&self) -> Result<()> {
        let c = &self.cfg;
        let dir = c.dir();
        fs::create_dir_all(&dir)?;
        // One key for the whole lab, made by booth's own tool; the sites' copies go with their booth.conf.
        let key = c.authkey();
        match fs::remove_file(&key) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
            _ => {}
        }
        let key_s = key.to_str().ok_or_else(|| anyhow!("lab path is not UTF-8"))?;
        run_ok("booth-keygen", &[key_s], Duration::from_secs(10)).context("making booth's key")?;
        fs::write(dir.join("booth.conf"), c.booth_conf(BOOTH_AUTHKEY))?;
        let conf = dir.join("arbitrator.conf");
        fs::write(&conf, c.booth_conf(key_s))?;
        let log = fs::File::create(dir.join("arbitrator.log"))?;
        let conf_s = conf.to_str().ok_or_else(|| anyhow!("lab path is not UTF-8"))?;
        let lock = dir.join("arbitrator.lock");
        let lock_s = lock.to_str().ok_or_else(|| anyhow!("lab path is not UTF-8"))?;
        // boothd in the foreground (-S), in the arbitrator's network namespace; it finds its role from
        // the address it has there.
        let mut child = Command::new("ip")
            .args([
                "netns",
                "exec",
                &c.arbitrator_netns(),
                "boothd",
                "daemon",
                "-S",
                "-c",
                conf_s,
                "-l",
                lock_s,
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0)
            .spawn()
            .context("starting booth's arbitrator")?;
        // `ip netns exec` execs boothd: the child's PID is boothd's.
        let id = ProcId::of(child.id() as i32)?;
        id.save(&dir.join("arbitrator.pid"))?;
        std::thread::spawn(move || {
            let _ = child.wait();
        });
        wait_for(
            "booth's arbitrator to listen",
            Duration::from_secs(15),
            Duration::from_millis(100),
            || {
                let out = run_ok(
                    "ip",
                    &[
                        "netns",
                        "exec",
                        &c.arbitrator_netns(),
                        "ss",
                        "-lunH",
                        "sport",
                        "= :9929",
                    ],
                    Duration::from_secs(5),
                )
                .ok()?;
                (!out.trim().is_empty() && id.alive()).then_some(())
            },
        )
    }

    /// Installs booth.conf into every host of `site` and creates the booth group (site address and
    /// booth-site daemon); waits until it runs.
    fn start_booth_site(&self, site: Site) -> Result<()> {
        let lab = self.site(site);
        let conf = self.cfg.dir().join("booth.conf");
        for n in lab.cfg.host_numbers() {
            lab.install(n, &conf, BOOTH_CONF, "0644")?;
            lab.install(n, &self.cfg.authkey(), BOOTH_AUTHKEY, "0600")?;
        }
        let ip = format!("ip={}", SiteLabConfig::site_address(&lab.cfg));
        lab.exec_ok(
            1,
            &[
                "pcs",
                "resource",
                "create",
                "booth-ip",
                "ocf:heartbeat:IPaddr2",
                &ip,
                "cidr_netmask=24",
                "op",
                "monitor",
                "interval=10s",
                "--group",
                "booth",
            ],
        )?;
        let config = format!("config={BOOTH_CONF}");
        lab.exec_ok(
            1,
            &[
                "pcs",
                "resource",
                "create",
                "booth-site",
                "ocf:pacemaker:booth-site",
                &config,
                "op",
                "monitor",
                "interval=10s",
                "--group",
                "booth",
            ],
        )?;
        let last = std::cell::RefCell::new(String::new());
        // Debian 12's booth client crashes (SIGSEGV) unless it is given -s SITE and, after it, -c FILE.
        let addr = SiteLabConfig::site_address(&lab.cfg);
        wait_for(
            &format!("booth at site {site:?}"),
            Duration::from_secs(90),
            Duration::from_millis(500),
            || {
                let s = lab.status(1).ok()?;
                s.running_on("booth-site")?;
                // The booth client on a site host reaches its site's daemon.
                match lab.exec_with_deadline(
                    1,
                    &["booth", "list", "-s", &addr, "-c", BOOTH_CONF],
                    Duration::from_secs(15),
                ) {
                    Ok(out) if out.status.success() => Some(()),
                    Ok(out) => {
                        *last.borrow_mut() = format!(
                            "booth list: {} {}{}",
                            out.status,
                            String::from_utf8_lossy(&out.stderr),
                            String::from_utf8_lossy(&out.stdout)
                        );
                        None
                    }
                    Err(e) => {
                        *last.borrow_mut() = format!("booth list: {e:#}");
                        None
                    }
                }
            },
        )
        .with_context(|| format!("last: {}", last.borrow()))
    }

    /// `booth list -s SITE` on host `n` of `site`: one line per ticket.
    pub fn booth_list(&self, site: Site, n: u8) -> Result<String> {
        let lab = self.site(site);
        lab.exec_ok(
            n,
            &[
                "booth",
                "list",
                "-s",
                &SiteLabConfig::site_address(&lab.cfg),
                "-c",
                BOOTH_CONF,
            ],
        )
    }

    /// The site address holding ticket `t`, as booth at `site` (host `n`) sees it (`None`: nobody).
    pub fn ticket_leader(&self, site: Site, n: u8, t: &str) -> Result<Option<String>> {
        let out = self.booth_list(site, n)?;
        Ok(out
            .lines()
            .find(|l| l.starts_with(&format!("ticket: {t},")))
            .and_then(|l| l.split(", ").find_map(|f| f.strip_prefix("leader: ")))
            .map(str::trim)
            .filter(|l| !l.is_empty() && *l != "NONE")
            .map(str::to_string))
    }

    /// Cuts `site` off the other site and the arbitrator (the router's leg into it goes down).
    pub fn cut_site(&self, site: Site) -> Result<()> {
        self.set_leg(site, "down")
    }

    pub fn heal_site(&self, site: Site) -> Result<()> {
        self.set_leg(site, "up")
    }

    fn set_leg(&self, site: Site, state: &str) -> Result<()> {
        run_ok(
            "ip",
            &[
                "-n",
                &self.cfg.router_netns(),
                "link",
                "set",
                self.cfg.router_leg(site),
                state,
            ],
            Duration::from_secs(10),
        )?;
        Ok(())
    }

    /// Powers every host of `site` off (hard, as a data centre losing power).
    pub fn power_off_site(&self, site: Site) -> Result<()> {
        let lab = self.site(site);
        for n in lab.cfg.host_numbers() {
            lab.power_off(n)?;
        }
        Ok(())
    }

    /// Powers every host of `site` on again; returns once its cluster has a DC.
    pub fn power_on_site(&self, site: Site) -> Result<()> {
        let lab = self.site(site);
        for n in lab.cfg.host_numbers() {
            lab.power_on(n)?;
        }
        wait_for(
            &format!("site {site:?} to form its cluster again"),
            Duration::from_secs(120),
            Duration::from_secs(1),
            || lab.status(1).ok().filter(|s| s.dc.is_some()).map(|_| ()),
        )
    }

    fn down_booth(&self) -> Result<()> {
        StaleBooth(self.cfg.clone()).down()
    }
}

/// Turns IPv6 off in network namespace `ns` (its interfaces lose their IPv6 addresses). Debian 12's booth
/// (1.0-283) reads the local addresses through a netlink dump that expects the end-of-dump message in a
/// reply of its own; since Linux 6.9 it comes in the same reply as the last IPv6 address, and boothd (and
/// the booth client) wait forever (fixed upstream in booth's commit 7d93365, "Fix _find_myself for kernel
/// 6.9"). An IPv6 dump with no address at all is the end message alone, and the IPv4 dump still ends in
/// a reply of its own, so booth works in namespaces without IPv6: the lab's sites and arbitrator use IPv4.
fn no_ipv6(ns: &str) -> Result<()> {
    run_ok(
        "ip",
        &[
            "netns",
            "exec",
            ns,
            "sysctl",
            "-q",
            "-w",
            "net.ipv6.conf.all.disable_ipv6=1",
            "net.ipv6.conf.default.disable_ipv6=1",
        ],
        Duration::from_secs(10),
    )?;
    Ok(())
}

/// The router and arbitrator of a site lab, torn down by PID and by this lab's namespace names.
struct StaleBooth(SiteLabConfig);

impl StaleBooth {
    fn down(&self) -> Result<()> {
        let c = &self.0;
        if let Some(p) = ProcId::load(&c.dir().join("arbitrator.pid")).ok().flatten() {
            p.signal(Signal::SIGKILL)?;
        }
        let existing = run_ok("ip", &["netns", "list"], Duration::from_secs(10))?;
        let names: Vec<&str> = existing.lines().filter_map(|l| l.split_whitespace().next()).collect();
        for ns in [c.router_netns(), c.arbitrator_netns()] {
            if names.contains(&ns.as_str()) {
                run_ok("ip", &["netns", "del", &ns], Duration::from_secs(10))?;
            }
        }
        Ok(())
    }
}

/// Whether `ticket` is granted at `lab`'s site, as `vmha site status --output json` on a powered-on host
/// there says; `None` when no host answers.
pub fn granted_here(lab: &Lab, ticket: &str) -> Option<bool> {
    let n = lab.cfg.host_numbers().find(|&n| lab.host_alive(n))?;
    let out = lab
        .exec_with_deadline(
            n,
            &["vmha", "--output", "json", "site", "status"],
            Duration::from_secs(120),
        )
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    v["tickets"].as_array()?.iter().find(|t| t["name"] == ticket)?["granted_here"].as_bool()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> SiteLabConfig {
        SiteLabConfig::two_sites("st", "10.213.191", ("sa", "sb"), vec![("shop".into(), 20)], |c| c).unwrap()
    }

    #[test]
    fn two_sites_take_the_next_two_subnets_and_a_short_name_for_b() {
        let c = cfg();
        assert_eq!((c.a.name.as_str(), c.a.subnet.as_str()), ("st", "10.213.191"));
        assert_eq!((c.b.name.as_str(), c.b.subnet.as_str()), ("st2", "10.213.192"));
        assert_eq!(
            (c.a.host_name(1), c.b.host_name(2)),
            ("sa1".to_string(), "sb2".to_string())
        );
        assert_eq!(c.arbitrator_subnet, "10.213.193");
        let long = SiteLabConfig::two_sites("abcdefgh", "10.213.1", ("a", "b"), vec![], |c| c).unwrap();
        assert_eq!(long.b.name, "abcdefg2", "at most 8 characters");
        let timed = SiteLabConfig::two_sites("t", "10.213.1", ("a", "b"), vec![], |mut c| {
            c.token_ms = Some(7);
            c
        })
        .unwrap();
        assert_eq!((timed.a.token_ms, timed.b.token_ms), (Some(7), Some(7)));
        for bad in ["10.213.254", "10.213.x", "10213"] {
            assert!(
                SiteLabConfig::two_sites("t", bad, ("a", "b"), vec![], |c| c).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn booth_conf_names_both_sites_the_arbitrator_and_short_tickets() {
        let conf = cfg().booth_conf(BOOTH_AUTHKEY);
        assert!(conf.contains("port = 9929\nauthfile = /etc/booth/authkey\n"));
        assert!(conf.contains("site = 10.213.191.100\nsite = 10.213.192.100\narbitrator = 10.213.193.10\n"));
        assert!(conf.contains("ticket = \"shop\"\n    expire = 20\n    acquire-after = 10\n"));
    }

    #[test]
    fn namespaces_are_this_labs_own() {
        let c = cfg();
        assert_eq!(c.router_netns(), "vmha-st-rt");
        assert_eq!(c.arbitrator_netns(), "vmha-st-arb");
        assert!(c.dir().ends_with("st-booth"));
    }
}
