//! Attribute matchers (strings, service accounts, CIDRs, ports) and the
//! evaluation of the model's rules → clauses → matches against one connection.

use std::net::IpAddr;

use ipnet::IpNet;
use serde::Serialize;

use super::model::{Clause, Match, Policy, Rule};

/// Istio's string pattern: exact, prefix (`x*`), suffix (`*x`) or presence (`*`).
///
/// Exists so that patterns are parsed once at load time rather than on every
/// connection. Serialized with ztunnel's variant names so `/config_dump`
/// reads like ztunnel's.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub enum StringMatch {
    Exact(String),
    Prefix(String),
    Suffix(String),
    /// Any non-empty value. An absent value (no identity) is not present.
    Presence,
}

impl StringMatch {
    /// Parses Istio's string form. The order of the checks is Istio's, so
    /// `*foo*` is a suffix match on `foo*`.
    pub fn from_istio(pattern: &str) -> Self {
        if pattern == "*" {
            StringMatch::Presence
        } else if let Some(suffix) = pattern.strip_prefix('*') {
            StringMatch::Suffix(suffix.to_owned())
        } else if let Some(prefix) = pattern.strip_suffix('*') {
            StringMatch::Prefix(prefix.to_owned())
        } else {
            StringMatch::Exact(pattern.to_owned())
        }
    }

    /// Whether `value` satisfies the pattern.
    pub fn matches(&self, value: &str) -> bool {
        match self {
            StringMatch::Exact(s) => value == s,
            StringMatch::Prefix(s) => value.starts_with(s.as_str()),
            StringMatch::Suffix(s) => value.ends_with(s.as_str()),
            StringMatch::Presence => !value.is_empty(),
        }
    }

    /// A principal pattern that can never match: the peer's principal is compared without
    /// `spiffe://` and the pattern as written (as Istio does), so one written with the prefix
    /// matches nobody. Worth a warning.
    pub(crate) fn is_spiffe_uri(&self) -> bool {
        match self {
            StringMatch::Exact(s) | StringMatch::Prefix(s) => s.starts_with("spiffe://"),
            _ => false,
        }
    }

    fn matches_opt(&self, value: Option<&str>) -> bool {
        value.is_some_and(|v| self.matches(v))
    }
}

/// A Kubernetes service account (`namespace` + name), matched against the
/// SPIFFE identity `<td>/ns/<namespace>/sa/<name>` whatever the trust domain.
///
/// Exists because Istio's `serviceAccounts` field and ztunnel's
/// `serviceAccounts` match on these two parts, not on the whole principal.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceAccountMatch {
    pub namespace: String,
    pub service_account: String,
}

/// The peer's principal: its SPIFFE identity without the leading `spiffe://`.
fn strip_spiffe(s: &str) -> &str {
    s.strip_prefix("spiffe://").unwrap_or(s)
}

/// Parses an `ipBlocks` entry: a CIDR, or a bare address meaning /32 or /128.
pub(crate) fn parse_ip_block(s: &str) -> Result<IpNet, String> {
    let s = s.trim();
    if s.contains('/') {
        s.parse::<IpNet>()
            .map(|net| net.trunc())
            .map_err(|_| "expected an IP address or CIDR, e.g. 10.0.0.0/8 or fd00::/64".to_owned())
    } else {
        s.parse::<IpAddr>()
            .map(IpNet::from)
            .map_err(|_| "expected an IP address or CIDR, e.g. 10.0.0.0/8 or fd00::/64".to_owned())
    }
}

/// Parses a port written the Kubernetes way, as a decimal string ("8080").
pub(crate) fn parse_port(s: &str) -> Result<u16, String> {
    // u16::from_str also takes "+80"; Istio's validation does not.
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err("a port must be a decimal number, e.g. \"8080\"".to_owned());
    }
    s.parse::<u16>()
        .map_err(|_| "a port must be between 0 and 65535".to_owned())
}

/// What a policy may look at, derived once per evaluation from the connection.
///
/// Exists so identity parsing and IP normalisation happen once per
/// connection, not once per policy.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Facts<'a> {
    /// Without `spiffe://`; `None` for plaintext.
    pub principal: Option<&'a str>,
    /// Only set when there is an identity.
    pub namespace: Option<&'a str>,
    /// Only set when the identity is `<td>/ns/<ns>/sa/<sa>`.
    pub service_account: Option<(&'a str, &'a str)>,
    pub source_ip: IpAddr,
    pub destination_ip: IpAddr,
    pub destination_port: u16,
}

impl<'a> Facts<'a> {
    pub(crate) fn new(
        principal: Option<&'a str>,
        namespace: Option<&'a str>,
        source_ip: IpAddr,
        destination_ip: IpAddr,
        destination_port: u16,
    ) -> Self {
        let principal = principal.map(strip_spiffe).filter(|p| !p.is_empty());
        let service_account = principal.and_then(spiffe_parts);
        // Without an identity there is no namespace, whatever the caller
        // guessed: Istio derives the source namespace from the peer's
        // certificate, and plaintext traffic has none.
        let namespace = match principal {
            None => None,
            Some(_) => service_account
                .map(|(ns, _)| ns)
                .or(namespace.filter(|ns| !ns.is_empty())),
        };
        Facts {
            principal,
            namespace,
            service_account,
            source_ip: source_ip.to_canonical(),
            destination_ip: destination_ip.to_canonical(),
            destination_port,
        }
    }
}

/// Splits `<td>/ns/<namespace>/sa/<account>` into (namespace, account).
fn spiffe_parts(principal: &str) -> Option<(&str, &str)> {
    let mut parts = principal.split('/');
    let (_td, ns_tag, ns, sa_tag, sa) = (
        parts.next()?,
        parts.next()?,
        parts.next()?,
        parts.next()?,
        parts.next()?,
    );
    if parts.next().is_some() || ns_tag != "ns" || sa_tag != "sa" {
        return None;
    }
    Some((ns, sa))
}

/// Positive list (if any) must hit, negative list must not.
fn check<T>(positive: &[T], negative: &[T], hit: impl Fn(&T) -> bool) -> bool {
    (positive.is_empty() || positive.iter().any(&hit)) && !negative.iter().any(&hit)
}

impl Match {
    pub(crate) fn matches(&self, f: &Facts<'_>) -> bool {
        if self.is_empty() {
            return false;
        }
        check(&self.destination_ports, &self.not_destination_ports, |p| {
            *p == f.destination_port
        }) && check(&self.source_ips, &self.not_source_ips, |n| {
            n.contains(&f.source_ip)
        }) && check(&self.destination_ips, &self.not_destination_ips, |n| {
            n.contains(&f.destination_ip)
        }) && check(&self.principals, &self.not_principals, |m| {
            m.matches_opt(f.principal)
        }) && check(&self.namespaces, &self.not_namespaces, |m| {
            m.matches_opt(f.namespace)
        }) && check(&self.service_accounts, &self.not_service_accounts, |m| {
            f.service_account
                .is_some_and(|(ns, sa)| m.namespace == ns && m.service_account == sa)
        })
    }
}

impl Clause {
    pub(crate) fn matches(&self, f: &Facts<'_>) -> bool {
        self.matches.is_empty() || self.matches.iter().any(|m| m.matches(f))
    }
}

impl Rule {
    pub(crate) fn matches(&self, f: &Facts<'_>) -> bool {
        self.clauses.iter().all(|c| c.matches(f))
    }
}

impl Policy {
    pub(crate) fn matches(&self, f: &Facts<'_>) -> bool {
        self.rules.iter().any(|r| r.matches(f))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn string_patterns() {
        let cases: &[(&str, &str, bool)] = &[
            ("foo", "foo", true),
            ("foo", "foobar", false),
            ("foo*", "foobar", true),
            ("foo*", "barfoo", false),
            ("*foo", "barfoo", true),
            ("*foo", "foobar", false),
            ("*", "x", true),
            ("*", "", false),
            ("*foo*", "xfoo*", true),
            ("", "", true),
        ];
        for (pattern, value, want) in cases {
            assert_eq!(
                StringMatch::from_istio(pattern).matches(value),
                *want,
                "{pattern:?} vs {value:?}"
            );
        }
        assert_eq!(StringMatch::from_istio("*"), StringMatch::Presence);
    }

    #[test]
    fn principal_patterns_are_compared_as_written() {
        let m = StringMatch::from_istio("spiffe://td/ns/a/sa/b");
        assert!(m.is_spiffe_uri());
        assert!(
            !m.matches("td/ns/a/sa/b"),
            "the peer's principal has no spiffe://"
        );
        assert!(!StringMatch::from_istio("td/ns/a/*").is_spiffe_uri());
    }

    #[test]
    fn ip_blocks() {
        let cases: &[(&str, Option<&str>)] = &[
            ("10.0.0.1", Some("10.0.0.1/32")),
            ("10.1.2.3/8", Some("10.0.0.0/8")),
            ("fd00::1", Some("fd00::1/128")),
            ("fd00::/64", Some("fd00::/64")),
            (" 10.0.0.0/24 ", Some("10.0.0.0/24")),
            ("10.0.0.0/33", None),
            ("not-an-ip", None),
            ("", None),
        ];
        for (input, want) in cases {
            let got = parse_ip_block(input).ok().map(|n| n.to_string());
            assert_eq!(got.as_deref(), *want, "{input:?}");
        }
    }

    #[test]
    fn ports() {
        assert_eq!(parse_port("8080"), Ok(8080));
        assert_eq!(parse_port("0"), Ok(0));
        for bad in ["", "http", "+80", "-1", "65536", "80-90", " 80"] {
            assert!(parse_port(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn identity_facts() {
        let ip: IpAddr = "10.0.0.1".parse().expect("test IP");
        let f = Facts::new(Some("spiffe://td/ns/a/sa/b"), Some("ignored"), ip, ip, 80);
        assert_eq!(f.principal, Some("td/ns/a/sa/b"));
        assert_eq!(f.namespace, Some("a"));
        assert_eq!(f.service_account, Some(("a", "b")));
        // No identity: the caller's namespace is not trusted.
        let f = Facts::new(None, Some("a"), ip, ip, 80);
        assert_eq!(f.namespace, None);
        // A non-SPIFFE-path identity keeps the caller's namespace.
        let f = Facts::new(Some("td/custom"), Some("a"), ip, ip, 80);
        assert_eq!((f.namespace, f.service_account), (Some("a"), None));
    }

    #[test]
    fn v4_mapped_v6_source_is_matched_as_v4() {
        let mapped: IpAddr = "::ffff:10.0.0.7".parse().expect("test IP");
        let f = Facts::new(None, None, mapped, mapped, 80);
        let m = Match {
            source_ips: vec![parse_ip_block("10.0.0.0/24").expect("test CIDR")],
            ..Match::default()
        };
        assert!(m.matches(&f));
    }
}
