//! Generated protobuf types and gRPC stubs for the Istio protocols weft speaks, from the
//! definitions in `proto/` (see build.rs). Field numbers there are the wire contract.

#![allow(clippy::all, clippy::pedantic, missing_docs)]

/// `istio.workload`: Workload and Service (the xDS `Address` resource).
pub mod workload {
    tonic::include_proto!("istio.workload");
}

/// `istio.security`: the L4 `Authorization` resource.
pub mod security {
    tonic::include_proto!("istio.security");
}

/// `envoy.service.discovery.v3`: the delta ADS stream.
pub mod discovery {
    tonic::include_proto!("envoy.service.discovery.v3");
}

/// `istio.v1.auth`: the certificate service.
pub mod ca {
    tonic::include_proto!("istio.v1.auth");
}

/// `istio.workload.zds`: the CNI node agent's hand-off of pod network namespaces.
pub mod zds {
    tonic::include_proto!("istio.workload.zds");
}
