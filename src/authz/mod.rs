//! L4 authorization: Istio's `AuthorizationPolicy`, enforced the way ztunnel
//! enforces it (see DESIGN.md §5).
//!
//! - [`model`]: the policy model both input forms are converted into.
//! - [`matcher`]: string, service-account, CIDR and port matchers, and how a
//!   policy's rules are matched against one connection.
//! - [`eval`]: [`PolicySet`] (policies indexed by scope) and [`evaluate`].
//! - [`local_form`]: ztunnel's local-config shape ([`LocalPolicy`]).
//! - [`k8s_form`]: the Kubernetes resource ([`from_k8s_value`],
//!   [`parse_k8s_yaml_stream`]).
//!
//! Semantics worth knowing:
//! - Plaintext traffic has no identity: `principals`, `namespaces`,
//!   `serviceAccounts` (and their `when` keys) never match it, while their
//!   negations (`notPrincipals`, ...) do, as in ztunnel and Envoy. So the
//!   usual "require mTLS" policy, DENY with `notPrincipals: ["*"]`, denies
//!   plaintext traffic.
//! - `remoteIpBlocks` and `remote.ip` are not L4 attributes (as in Istio's
//!   translation for ztunnel): treated like HTTP attributes below.
//! - Principal patterns are compared as written with the peer's identity
//!   without `spiffe://`: a pattern written with the prefix never matches
//!   (a warning says so).
//! - A namespace-wide policy in the root namespace is mesh-wide; a selector
//!   policy there selects in every namespace.
//!
//! What cannot be enforced at L4 (HTTP attributes, unknown fields) is never
//! dropped silently: a rule using it never matches in an ALLOW policy, is
//! applied without it in a DENY policy, and a warning is attached to the
//! [`Policy`].

pub mod error;
pub mod eval;
pub mod k8s_form;
pub mod local_form;
pub mod matcher;
pub mod model;
pub mod peer_authn;
pub mod xds_form;

pub use error::AuthzError;
pub use eval::{evaluate, ConnFacts, Decision, DryRun, PolicySet, Target, Verdict};
pub use k8s_form::{from_k8s_value, parse_k8s_yaml_stream};
pub use local_form::{from_local, LocalPolicy};
pub use matcher::{ServiceAccountMatch, StringMatch};
pub use model::{Action, Clause, Match, Policy, Rule, Scope};
pub use xds_form::from_xds;

#[cfg(test)]
mod tests;
