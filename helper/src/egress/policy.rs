//! The allowlist matcher: which hosts a session's `allowedDomains` lets it
//! reach.
//!
//! A host (the session's, and each list entry) is normalised before any
//! comparison: lower case, ONE trailing dot stripped, IDNA to ASCII
//! (`bücher.example` is `xn--bcher-kva.example`). A host that does not
//! normalise (bad IDNA, an empty label, over [`MAX_HOST_LEN`], a character
//! no host name has, a name whose last label is numeric, which resolvers
//! read as an IPv4 address) is refused.
//!
//! Entries: `example.com` matches that host only; `*.example.com` matches
//! its subdomains, not `example.com` itself; `*` matches any host NAME;
//! an IP literal (`192.0.2.1`, `2001:db8::1`, `[2001:db8::1]`) matches only
//! that address, and an IP literal host matches nothing else (not `*`).
//! An empty or missing list matches nothing.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use socket_proto::egress::MAX_HOST_LEN;

use crate::lock;

/// Why a host name is refused before any policy applies.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum HostError {
    #[error("empty host")]
    Empty,
    #[error("host longer than {MAX_HOST_LEN} bytes")]
    TooLong,
    #[error("host is not a valid internationalised domain name")]
    Idna,
    #[error("host has an empty label or one over 63 bytes")]
    Label,
    #[error("host has a character no host name has")]
    Character,
    #[error("host ends in a numeric label (an IPv4 address in another spelling)")]
    NumericTail,
}

/// A host after normalisation.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Host {
    /// A DNS name: lower-case ASCII, no trailing dot.
    Name(String),
    /// An IP literal.
    Ip(IpAddr),
}

impl Host {
    /// The host as it is resolved and compared.
    pub fn as_text(&self) -> String {
        match self {
            Host::Name(n) => n.clone(),
            Host::Ip(ip) => ip.to_string(),
        }
    }
}

impl std::fmt::Display for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Host::Name(n) => f.write_str(n),
            Host::Ip(ip) => write!(f, "{ip}"),
        }
    }
}

/// Normalises `host` (see the module's text).
pub fn normalise(host: &str) -> Result<Host, HostError> {
    if host.is_empty() {
        return Err(HostError::Empty);
    }
    // Bound the work before IDNA sees the input (a label can grow under
    // punycode, never shrink below a quarter).
    if host.len() > 4 * MAX_HOST_LEN {
        return Err(HostError::TooLong);
    }
    let unbracketed = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if let Ok(ip) = unbracketed.parse::<IpAddr>() {
        return Ok(Host::Ip(ip));
    }
    let lower = host.to_lowercase();
    let stripped = lower.strip_suffix('.').unwrap_or(&lower);
    if stripped.is_empty() {
        return Err(HostError::Empty);
    }
    // A dotted-quad with a trailing dot is still an address.
    if let Ok(ip) = stripped.parse::<IpAddr>() {
        return Ok(Host::Ip(ip));
    }
    let ascii = idna::domain_to_ascii(stripped).map_err(|_| HostError::Idna)?;
    if ascii.is_empty() {
        return Err(HostError::Empty);
    }
    if ascii.len() > MAX_HOST_LEN {
        return Err(HostError::TooLong);
    }
    let mut last = "";
    for label in ascii.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err(HostError::Label);
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        {
            return Err(HostError::Character);
        }
        last = label;
    }
    // getaddrinfo reads `127.1`, `0x7f.1` and `2130706433` as addresses:
    // such a "name" would be an IP literal the list never named.
    let numeric = last.bytes().all(|b| b.is_ascii_digit())
        || (last.starts_with("0x") && last[2..].bytes().all(|b| b.is_ascii_hexdigit()));
    if numeric {
        return Err(HostError::NumericTail);
    }
    Ok(Host::Name(ascii))
}

/// The most entries of one session's list that are kept; the rest are
/// ignored (with a log line): the list is the client's input.
pub const MAX_ENTRIES: usize = 1024;

/// One session's `allowedDomains`, compiled.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Allowlist {
    exact: HashSet<String>,
    /// `*.example.com` as `.example.com`.
    suffixes: Vec<String>,
    any_name: bool,
    ips: HashSet<IpAddr>,
    /// Entries that did not normalise (ignored).
    pub invalid: usize,
}

impl Allowlist {
    /// Compiles `entries`; an entry that does not normalise matches nothing.
    pub fn new<S: AsRef<str>>(entries: &[S]) -> Self {
        let mut list = Allowlist::default();
        for entry in entries.iter().take(MAX_ENTRIES) {
            let entry = entry.as_ref().trim();
            if entry == "*" {
                list.any_name = true;
                continue;
            }
            if let Some(parent) = entry.strip_prefix("*.") {
                match normalise(parent) {
                    Ok(Host::Name(n)) => list.suffixes.push(format!(".{n}")),
                    _ => list.invalid += 1,
                }
                continue;
            }
            match normalise(entry) {
                Ok(Host::Name(n)) => {
                    list.exact.insert(n);
                }
                Ok(Host::Ip(ip)) => {
                    list.ips.insert(ip);
                }
                Err(_) => list.invalid += 1,
            }
        }
        list.invalid += entries.len().saturating_sub(MAX_ENTRIES);
        list
    }

    /// Whether the list lets a session reach `host`.
    pub fn allows(&self, host: &Host) -> bool {
        match host {
            Host::Ip(ip) => self.ips.contains(ip),
            Host::Name(n) => {
                self.any_name
                    || self.exact.contains(n)
                    || self
                        .suffixes
                        .iter()
                        .any(|s| n.len() > s.len() && n.ends_with(s.as_str()))
            }
        }
    }

    /// Whether the list matches nothing.
    pub fn is_empty(&self) -> bool {
        !self.any_name && self.exact.is_empty() && self.suffixes.is_empty() && self.ips.is_empty()
    }
}

/// The most sessions whose lists one VM keeps. Past it the oldest-recorded
/// list is dropped (that session then has no network until its next
/// spawn: failing closed).
pub const MAX_SESSIONS: usize = 1024;

/// The longest session name a policy is kept for.
pub const MAX_SESSION_NAME: usize = 256;

/// Each session's allowlist: the `allowedDomains` of its LATEST spawn.
/// A session with none has no network.
#[derive(Debug, Default)]
pub struct EgressPolicies {
    inner: Mutex<PolicyMap>,
}

#[derive(Debug, Default)]
struct PolicyMap {
    lists: HashMap<String, (u64, Arc<Allowlist>)>,
    next: u64,
}

impl EgressPolicies {
    /// Records `session`'s list (its latest spawn's `allowedDomains`). A
    /// session name over [`MAX_SESSION_NAME`] bytes is not recorded (no
    /// agent runs such a session; its streams are refused).
    pub fn record(&self, session: &str, allowed: Option<&[String]>) {
        if session.len() > MAX_SESSION_NAME {
            tracing::warn!(
                "a session name of {} bytes gets no network policy (at most {MAX_SESSION_NAME})",
                session.len()
            );
            return;
        }
        let list = Arc::new(Allowlist::new(allowed.unwrap_or(&[])));
        if list.invalid > 0 {
            tracing::info!(
                "session {session:?}: {} allowedDomains entries are not host names and match \
                 nothing",
                list.invalid
            );
        }
        let mut m = lock(&self.inner);
        if m.lists.len() >= MAX_SESSIONS && !m.lists.contains_key(session) {
            let oldest = m
                .lists
                .iter()
                .min_by_key(|(_, (n, _))| *n)
                .map(|(k, _)| k.clone());
            if let Some(k) = oldest {
                tracing::warn!(
                    "more than {MAX_SESSIONS} sessions have network policies; session {k:?} \
                     loses its own until its next spawn"
                );
                m.lists.remove(&k);
            }
        }
        m.next += 1;
        let n = m.next;
        m.lists.insert(session.to_owned(), (n, list));
    }

    /// `session`'s list; `None` for a session never recorded (no spawn
    /// of it went through this helper).
    pub fn get(&self, session: &str) -> Option<Arc<Allowlist>> {
        lock(&self.inner).lists.get(session).map(|(_, l)| l.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allows(list: &[&str], host: &str) -> bool {
        match normalise(host) {
            Ok(h) => Allowlist::new(list).allows(&h),
            Err(_) => false,
        }
    }

    #[test]
    fn exact_entries_match_only_themselves() {
        assert!(allows(&["api.example.com"], "api.example.com"));
        assert!(!allows(&["api.example.com"], "example.com"));
        assert!(!allows(&["api.example.com"], "x.api.example.com"));
        assert!(!allows(&["api.example.com"], "api.example.com.evil.test"));
        assert!(!allows(&["example.com"], "notexample.com"));
    }

    #[test]
    fn wildcards_match_subdomains_not_the_apex() {
        let l = ["*.example.com"];
        assert!(allows(&l, "a.example.com"));
        assert!(allows(&l, "a.b.example.com"));
        assert!(!allows(&l, "example.com"));
        assert!(!allows(&l, "badexample.com"));
        assert!(!allows(&l, ".example.com"));
    }

    #[test]
    fn star_matches_any_name_but_no_ip_literal() {
        assert!(allows(&["*"], "anything.test"));
        assert!(allows(&["*"], "localhost"));
        assert!(!allows(&["*"], "192.0.2.1"));
        assert!(!allows(&["*"], "::1"));
    }

    #[test]
    fn case_and_one_trailing_dot_are_normalised() {
        assert!(allows(&["API.Example.COM"], "api.example.com"));
        assert!(allows(&["api.example.com"], "API.EXAMPLE.com."));
        assert!(allows(&["api.example.com."], "api.example.com"));
        assert!(allows(&["*.Example.com"], "X.EXAMPLE.COM."));
        // Only one dot is stripped.
        assert!(!allows(&["api.example.com"], "api.example.com.."));
        assert_eq!(normalise("."), Err(HostError::Empty));
    }

    #[test]
    fn idna_forms_are_the_same_host() {
        assert!(allows(&["bücher.example"], "xn--bcher-kva.example"));
        assert!(allows(&["xn--bcher-kva.example"], "bücher.example"));
        assert!(allows(&["*.bücher.example"], "www.xn--bcher-kva.example"));
        assert!(allows(&["BÜCHER.example"], "bücher.example"));
        assert_eq!(
            normalise("bücher.example"),
            Ok(Host::Name("xn--bcher-kva.example".into()))
        );
        // Invalid punycode and characters no host has are refused.
        assert!(normalise("xn--a.example").is_err());
        assert!(normalise("a b.example").is_err());
        assert!(normalise("a/b.example").is_err());
        assert!(normalise("a..example").is_err());
        assert!(normalise(&format!("{}.example", "a".repeat(64))).is_err());
        assert!(normalise(&"a.".repeat(200)).is_err());
        assert!(!allows(&["*"], "a..example"));
    }

    #[test]
    fn ip_literals_match_only_when_listed_literally() {
        assert!(allows(&["192.0.2.1"], "192.0.2.1"));
        assert!(!allows(&["192.0.2.1"], "192.0.2.2"));
        assert!(allows(&["2001:db8::1"], "2001:db8::1"));
        assert!(allows(&["[2001:db8::1]"], "2001:db8:0::1"));
        assert!(allows(&["2001:db8::1"], "[2001:db8::1]"));
        assert!(!allows(&["example.com"], "192.0.2.1"));
        assert!(!allows(&["*.example.com"], "192.0.2.1"));
        // Another spelling of an address is not a name.
        for h in ["127.1", "0x7f.1", "2130706433", "a.0x7f"] {
            assert_eq!(normalise(h), Err(HostError::NumericTail), "{h}");
            assert!(!allows(&["*"], h), "{h}");
        }
        assert!(allows(&["*"], "1password.com"));
    }

    #[test]
    fn an_empty_list_matches_nothing() {
        let none: [&str; 0] = [];
        assert!(!allows(&none, "example.com"));
        assert!(Allowlist::new(&none).is_empty());
        assert!(!allows(&[""], "example.com"));
        let p = EgressPolicies::default();
        assert!(p.get("never").is_none());
        p.record("s", Some(&["example.com".to_owned()]));
        assert!(p
            .get("s")
            .unwrap()
            .allows(&Host::Name("example.com".into())));
        // The latest spawn's list replaces the earlier one.
        p.record("s", None);
        assert!(!p
            .get("s")
            .unwrap()
            .allows(&Host::Name("example.com".into())));
    }

    #[test]
    fn the_session_map_is_bounded() {
        let p = EgressPolicies::default();
        let list = ["example.com".to_owned()];
        for i in 0..MAX_SESSIONS + 10 {
            p.record(&format!("s{i}"), Some(&list));
        }
        assert_eq!(lock(&p.inner).lists.len(), MAX_SESSIONS);
        // The newest are kept.
        assert!(p
            .get(&format!("s{}", MAX_SESSIONS + 9))
            .unwrap()
            .allows(&Host::Name("example.com".into())));
        assert!(p.get("s0").is_none());
        let long = "s".repeat(MAX_SESSION_NAME + 1);
        p.record(&long, Some(&list));
        assert!(p.get(&long).is_none());
    }
}
