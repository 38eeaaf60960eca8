//! Sites and booth, as vmha reads them: booth's configuration (sites, arbitrators, tickets), the output
//! of `booth list`, and what a site's CIB says (tickets' state as booth committed it, `rsc_ticket`
//! constraints, this cluster's booth site address). All of it is untrusted text: booth.conf and the CIB
//! can be edited by anyone with that access, and `booth list` prints what the other sites sent. Parsing
//! never panics; a ticket or site name only comes out of here when it is safe on booth's command line
//! (see [`validate_ticket`]). Pure logic; `vmha site` (agent crate) does the I/O.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use serde::Serialize;

/// Errors of site input and booth's answers (names as the operator gave them, printable).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SiteError {
    #[error("{what} {value:?} is not valid: {why}")]
    Invalid {
        what: &'static str,
        value: String,
        why: &'static str,
    },
    #[error("booth.conf line {line}: {why}")]
    Conf { line: usize, why: String },
}

/// Checks a booth ticket name: it goes into booth's command line, booth.conf and the CIB. Letters, digits,
/// '_' and '-', starting with a letter, at most 63 characters (booth's name length).
pub fn validate_ticket(name: &str) -> Result<(), SiteError> {
    let invalid = |why| {
        Err(SiteError::Invalid {
            what: "ticket",
            value: crate::printable(name),
            why,
        })
    };
    if name.is_empty() || name.len() > 63 {
        return invalid("must be 1 to 63 characters");
    }
    if !name.starts_with(|c: char| c.is_ascii_alphabetic()) {
        return invalid("must start with a letter");
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-'))
    {
        return invalid("may hold only letters, digits, '_' and '-'");
    }
    Ok(())
}

/// Checks a site given by the operator: an IPv4 address (booth names sites by address) that booth.conf
/// lists as a site. Returns the address.
pub fn validate_site(value: &str, conf: &BoothConf) -> Result<Ipv4Addr, SiteError> {
    let addr: Ipv4Addr = value.parse().map_err(|_| SiteError::Invalid {
        what: "site",
        value: crate::printable(value),
        why: "must be a site address of booth.conf (e.g. 192.168.201.100)",
    })?;
    if !conf.sites.contains(&addr) {
        return Err(SiteError::Invalid {
            what: "site",
            value: value.to_string(),
            why: "is not a site of booth.conf",
        });
    }
    Ok(addr)
}

/// Checks booth.conf's `authfile`: an absolute path of printable characters (booth requires absolute
/// paths; vmha opens it to check it). Returns it.
pub fn validate_authfile(value: &str) -> Result<String, SiteError> {
    let invalid = |why| {
        Err(SiteError::Invalid {
            what: "authfile",
            value: crate::printable(value),
            why,
        })
    };
    if !value.starts_with('/') {
        return invalid("must be an absolute path");
    }
    if value.len() > 4096 {
        return invalid("is longer than 4096 bytes");
    }
    if value.chars().any(|c| c.is_control()) {
        return invalid("may not hold control characters");
    }
    Ok(value.to_string())
}

/// The shortest and longest key booth accepts (bytes, after leading and trailing white space of a text
/// key is dropped).
pub const AUTHKEY_LEN: std::ops::RangeInclusive<usize> = 8..=64;

/// What is wrong with booth's key file, from its permission bits and contents (`None`: nothing). boothd
/// refuses a key readable by anyone but its owner, and one shorter than 8 or longer than 64 bytes.
/// The key itself never appears in the answer.
pub fn authkey_problem(mode: u32, key: &[u8]) -> Option<String> {
    if mode & 0o077 != 0 {
        return Some(format!(
            "is accessible to others than its owner (mode {:04o}); booth refuses it: chmod 600",
            mode & 0o7777
        ));
    }
    let key = key.trim_ascii();
    if !AUTHKEY_LEN.contains(&key.len()) {
        return Some(format!(
            "holds a {}-byte key; booth needs {} to {} bytes (booth-keygen makes one)",
            key.len(),
            AUTHKEY_LEN.start(),
            AUTHKEY_LEN.end()
        ));
    }
    None
}

/// A booth ticket as booth.conf defines it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TicketConf {
    pub name: String,
    /// Lease time in seconds (booth's default 600).
    pub expire: u32,
    /// `manual` tickets are never moved by booth itself.
    pub manual: bool,
    /// Seconds booth waits after a ticket is lost before another site acquires it (`acquire-after`,
    /// booth's default 0): the time the losing site has to stop what the ticket held.
    pub acquire_after: u32,
}

/// booth's default lease time of a ticket, in seconds.
pub const DEFAULT_EXPIRE: u32 = 600;

/// What vmha reads of booth.conf.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct BoothConf {
    pub sites: Vec<Ipv4Addr>,
    pub arbitrators: Vec<Ipv4Addr>,
    pub tickets: Vec<TicketConf>,
    /// booth's `authfile`: the shared key that authenticates every booth message (`None`: messages are
    /// not authenticated). An absolute path.
    pub authfile: Option<String>,
}

impl BoothConf {
    /// Parses booth.conf (`key = value`, values optionally in double quotes, `#` comments; ticket
    /// settings follow their `ticket` line). A `ticket = "__defaults__"` stanza sets the defaults of the
    /// tickets after it (so do ticket settings before any ticket) and, as booth requires, must come before every other ticket. Bad addresses, ticket
    /// names or numbers, a ticket or an address listed twice and misplaced defaults are errors naming the line.
    pub fn parse(text: &str) -> Result<BoothConf, SiteError> {
        /// Where the parser is: before any ticket, in the __defaults__ stanza, or in a ticket's.
        enum Stanza {
            Global,
            Defaults,
            Ticket,
        }
        let mut conf = BoothConf::default();
        let mut defaults = TicketConf {
            name: String::new(),
            expire: DEFAULT_EXPIRE,
            manual: false,
            acquire_after: 0,
        };
        let mut stanza = Stanza::Global;
        for (i, raw) in text.lines().enumerate() {
            let line = raw.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let bad = |why: String| SiteError::Conf { line: i + 1, why };
            let (key, value) = line.split_once('=').ok_or_else(|| bad("expected key = value".into()))?;
            let key = key.trim();
            let value = value.trim();
            let value = value
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .unwrap_or(value);
            let addr = |v: &str| -> Result<Ipv4Addr, SiteError> {
                // booth allows IPv4-mapped IPv6 notation for IPv4 sites.
                v.trim_start_matches("::ffff:").parse().map_err(|_| {
                    bad(format!(
                        "{}: {:?} is not an IPv4 address",
                        crate::printable(key),
                        crate::printable(v)
                    ))
                })
            };
            let seconds = |v: &str| -> Result<u32, SiteError> {
                v.parse()
                    .map_err(|_| bad(format!("{key} {:?} is not a number", crate::printable(v))))
            };
            // The ticket whose settings this line changes: ticket settings before the first ticket
            // (globally, or in the __defaults__ stanza) are the defaults of the tickets after them.
            let current = match stanza {
                Stanza::Global | Stanza::Defaults => Some(&mut defaults),
                Stanza::Ticket => conf.tickets.last_mut(),
            };
            match key {
                "site" | "arbitrator" => {
                    let a = addr(value)?;
                    if conf.sites.contains(&a) || conf.arbitrators.contains(&a) {
                        return Err(bad(format!("{a} is listed twice")));
                    }
                    if key == "site" {
                        conf.sites.push(a)
                    } else {
                        conf.arbitrators.push(a)
                    }
                }
                "ticket" if value == "__defaults__" => {
                    if !conf.tickets.is_empty() {
                        return Err(bad("the __defaults__ ticket must come before every other ticket".into()));
                    }
                    stanza = Stanza::Defaults;
                }
                "ticket" => {
                    validate_ticket(value).map_err(|e| bad(e.to_string()))?;
                    if conf.ticket(value).is_some() {
                        return Err(bad(format!("ticket {value} is defined twice")));
                    }
                    conf.tickets.push(TicketConf {
                        name: value.to_string(),
                        ..defaults.clone()
                    });
                    stanza = Stanza::Ticket;
                }
                "expire" => {
                    let secs = seconds(value)?;
                    if let Some(t) = current {
                        t.expire = secs;
                    }
                }
                "acquire-after" => {
                    let secs = seconds(value)?;
                    if let Some(t) = current {
                        t.acquire_after = secs;
                    }
                }
                "authfile" => {
                    if conf.authfile.is_some() {
                        return Err(bad("authfile is set twice".into()));
                    }
                    conf.authfile = Some(validate_authfile(value).map_err(|e| bad(e.to_string()))?);
                }
                "mode" => {
                    if let Some(t) = current {
                        t.manual = value.eq_ignore_ascii_case("manual");
                    }
                }
                _ => {}
            }
        }
        Ok(conf)
    }

    pub fn ticket(&self, name: &str) -> Option<&TicketConf> {
        self.tickets.iter().find(|t| t.name == name)
    }

    /// The other site of a two-site configuration.
    pub fn other_site(&self, site: Ipv4Addr) -> Option<Ipv4Addr> {
        (self.sites.len() == 2).then(|| self.sites.iter().copied().find(|s| *s != site))?
    }
}

/// One line of `booth list`: `ticket: T, leader: ADDR, expires: TIME, ...`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BoothTicket {
    pub name: String,
    /// The site that holds the ticket (`None`: nobody).
    pub leader: Option<Ipv4Addr>,
    pub expires: Option<String>,
}

/// Parses `booth list`. Lines that are not ticket lines, and fields it does not know, are skipped; a
/// leader that is no address counts as none.
pub fn parse_booth_list(text: &str) -> Vec<BoothTicket> {
    text.lines()
        .filter_map(|line| {
            let fields: BTreeMap<&str, &str> = line
                .split(',')
                .filter_map(|f| f.split_once(':').map(|(k, v)| (k.trim(), v.trim())))
                .collect();
            let name = *fields.get("ticket")?;
            validate_ticket(name).ok()?;
            Some(BoothTicket {
                name: name.to_string(),
                leader: fields.get("leader").and_then(|l| l.parse().ok()),
                // "expires: 2026-12-06 06:40:00" holds ':' itself: take the rest of the line.
                expires: line
                    .split_once("expires:")
                    .map(|(_, rest)| rest.split(',').next().unwrap_or("").trim().to_string())
                    .filter(|s| !s.is_empty() && s != "INF"),
            })
        })
        .collect()
}

/// A ticket's state as booth committed it to this site's CIB.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct CibTicket {
    pub name: String,
    pub granted: bool,
    pub standby: bool,
    /// Unix time of the last grant here.
    pub last_granted: Option<u64>,
    /// booth's lease end (Unix time), when booth wrote one.
    pub expires: Option<u64>,
}

/// An `rsc_ticket` constraint: resource (a virtual cluster's tag) held by a ticket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TicketBinding {
    pub id: String,
    pub rsc: String,
    pub ticket: String,
    pub loss_policy: String,
}

/// What a site's CIB says about sites: tickets, bindings, and the booth site address of this cluster.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct SiteView {
    pub local_site: Option<Ipv4Addr>,
    pub tickets: Vec<CibTicket>,
    pub bindings: Vec<TicketBinding>,
}

impl SiteView {
    pub fn from_cib(cib: &str) -> Result<SiteView, roxmltree::Error> {
        let doc = roxmltree::Document::parse(cib)?;
        let tickets = doc
            .descendants()
            .filter(|n| n.has_tag_name("ticket_state"))
            .filter_map(|t| {
                Some(CibTicket {
                    name: t.attribute("id")?.to_string(),
                    granted: t.attribute("granted") == Some("true"),
                    standby: t.attribute("standby") == Some("true"),
                    last_granted: t.attribute("last-granted").and_then(|v| v.parse().ok()),
                    expires: t.attribute("expires").and_then(|v| v.parse().ok()),
                })
            })
            .collect();
        let bindings = doc
            .descendants()
            .filter(|n| n.has_tag_name("rsc_ticket"))
            .filter_map(|c| {
                Some(TicketBinding {
                    id: c.attribute("id")?.to_string(),
                    rsc: c.attribute("rsc")?.to_string(),
                    ticket: c.attribute("ticket")?.to_string(),
                    loss_policy: c.attribute("loss-policy").unwrap_or("stop").to_string(),
                })
            })
            .collect();
        // booth's documented setup: a group holding an IPaddr2 (the site address) and booth-site.
        let local_site = doc
            .descendants()
            .filter(|g| g.has_tag_name("group"))
            .find(|g| {
                g.children()
                    .any(|p| p.has_tag_name("primitive") && p.attribute("type") == Some("booth-site"))
            })
            .and_then(|g| {
                g.children()
                    .filter(|p| p.has_tag_name("primitive") && p.attribute("type") == Some("IPaddr2"))
                    .flat_map(|p| p.descendants())
                    .find(|n| n.has_tag_name("nvpair") && n.attribute("name") == Some("ip"))
                    .and_then(|n| n.attribute("value")?.parse().ok())
            });
        Ok(SiteView {
            local_site,
            tickets,
            bindings,
        })
    }

    pub fn ticket(&self, name: &str) -> Option<&CibTicket> {
        self.tickets.iter().find(|t| t.name == name)
    }

    pub fn granted_here(&self, name: &str) -> bool {
        self.ticket(name).is_some_and(|t| t.granted)
    }

    /// The ticket that holds virtual cluster `vc`.
    pub fn binding_of(&self, vc: &str) -> Option<&TicketBinding> {
        self.bindings.iter().find(|b| b.rsc == vc)
    }
}

#[cfg(test)]
mod tests;
