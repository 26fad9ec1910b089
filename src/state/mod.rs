//! What weft knows about the mesh: workloads, services and policies, from every source.

pub mod local;
pub mod service;
pub mod store;
pub mod workload;

pub use service::{Endpoint, Service, ServiceKey, Visibility};
pub use store::{Delta, EndpointPorts, Snapshot, SourceData, StateStore};
pub use workload::{
    GatewayAddress, GatewayDestination, HealthStatus, Locality, Netns, Protocol, Workload,
};
