//! The DNS proxy: in every captured pod (port 15053 on its loopback, UDP and TCP), where the
//! capture rules send the pod's DNS (weft's own rules in standalone mode, istio-cni's under
//! Istio).
//!
//! - [`answer`]: what weft answers itself: A/AAAA for the mesh's service hostnames
//!   (Kubernetes services with their short forms and the pod's search list, ServiceEntry hosts
//!   that have no real DNS record), from the state. A pure function.
//! - [`resolv`]: the pod's own resolvers and search list (its resolv.conf).
//! - [`server`]: the sockets, forwarding everything else to the pod's resolvers from inside
//!   its namespace, and the bounds.
//! - [`metrics`]: Istio's `istio_dns_*` families.
//! - [`lookup`]: weft's own lookups, of endpoints known only by a hostname (ServiceEntries
//!   with `resolution: DNS`), made when a connection is routed to one.
//!
//! On by default, as in Istio; off per node (`--dns-capture false`, or ztunnel's
//! `ISTIO_META_DNS_CAPTURE=false`) or per pod (`ambient.istio.io/dns-capture: "false"`).

pub mod answer;
pub mod lookup;
pub mod metrics;
pub mod resolv;
pub mod server;

pub use server::PodDns;
