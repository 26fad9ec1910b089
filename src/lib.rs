//! weft: a node-level L4 tunnel for ambient service meshes.
//!
//! One weft per node captures the TCP traffic of the node's enrolled pods from inside their
//! network namespaces and carries it to the destination node in HBONE (HTTP/2 CONNECT over
//! mutual TLS with SPIFFE identities), enforcing L4 authorization on arrival.

pub mod admin;
pub mod allocator;
pub mod authz;
pub mod ca_service;
pub mod capture;
pub mod cni;
pub mod config;
pub mod dns;
pub mod grpc;
pub mod hbone;
pub mod identity;
pub mod k8s;
pub mod metrics;
pub mod node;
pub mod proto;
pub mod proxy;
pub mod state;
pub mod xds;
pub mod zds;
