//! SPIFFE identities as weft uses them: `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
//!
//! Identity is what authorization and certificate checks compare, so it gets one type with one
//! parser instead of string juggling at every call site.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The URI scheme every workload identity carries in its certificate's URI SAN.
pub const SPIFFE_SCHEME: &str = "spiffe://";

/// A workload identity in Istio's SPIFFE form.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identity {
    pub trust_domain: String,
    pub namespace: String,
    pub service_account: String,
}

/// Why a string is not an Istio SPIFFE identity.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdentityError {
    #[error("identity {0:?} does not start with spiffe://")]
    NotSpiffe(String),
    #[error("identity {0:?} is not of the form spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>")]
    Shape(String),
    #[error("identity {0:?} has an empty or invalid segment")]
    Segment(String),
}

impl Identity {
    pub fn new(
        trust_domain: impl Into<String>,
        namespace: impl Into<String>,
        service_account: impl Into<String>,
    ) -> Self {
        Identity {
            trust_domain: trust_domain.into(),
            namespace: namespace.into(),
            service_account: service_account.into(),
        }
    }

    /// The identity as authorization policies name it: the URI without `spiffe://`.
    pub fn principal(&self) -> String {
        format!(
            "{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{SPIFFE_SCHEME}{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

/// A segment is a DNS-label-ish token; anything that could smuggle a `/` or
/// whitespace into a principal comparison is refused.
fn valid_segment(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
}

impl FromStr for Identity {
    type Err = IdentityError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let rest = s
            .strip_prefix(SPIFFE_SCHEME)
            .ok_or_else(|| IdentityError::NotSpiffe(s.to_string()))?;
        let parts: Vec<&str> = rest.split('/').collect();
        let [td, "ns", ns, "sa", sa] = parts.as_slice() else {
            return Err(IdentityError::Shape(s.to_string()));
        };
        if ![td, ns, sa].iter().all(|p| valid_segment(p)) {
            return Err(IdentityError::Segment(s.to_string()));
        }
        Ok(Identity::new(*td, *ns, *sa))
    }
}

impl Serialize for Identity {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Identity {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let id: Identity = "spiffe://cluster.local/ns/shop/sa/cart".parse().unwrap();
        assert_eq!(id, Identity::new("cluster.local", "shop", "cart"));
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/shop/sa/cart");
        assert_eq!(id.principal(), "cluster.local/ns/shop/sa/cart");
    }

    #[test]
    fn refuses_malformed() {
        for bad in [
            "cluster.local/ns/a/sa/b",
            "spiffe://cluster.local/ns/a",
            "spiffe://cluster.local/ns/a/sa/b/extra",
            "spiffe://cluster.local/namespace/a/sa/b",
            "spiffe:///ns/a/sa/b",
            "spiffe://td/ns/a b/sa/c",
        ] {
            assert!(bad.parse::<Identity>().is_err(), "{bad} parsed");
        }
    }
}
