//! The CA service's metrics and readiness, on their own port.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

use crate::admin::{metrics_response, respond, serve_http, wants_openmetrics, Body};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IssuedLabels {
    /// Whether a node agent asked on a pod's behalf.
    pub impersonated: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusedLabels {
    /// The gRPC status code of the refusal.
    pub code: String,
}

pub struct CaMetrics {
    registry: Registry,
    pub issued: Family<IssuedLabels, Counter>,
    pub refused: Family<RefusedLabels, Counter>,
}

impl CaMetrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let issued = Family::<IssuedLabels, Counter>::default();
        let refused = Family::<RefusedLabels, Counter>::default();
        let sub = registry.sub_registry_with_prefix("weft_ca");
        sub.register(
            "certificates_issued",
            "Certificates signed by this CA replica",
            issued.clone(),
        );
        sub.register(
            "requests_refused",
            "Certificate requests refused, by gRPC status code",
            refused.clone(),
        );
        CaMetrics {
            registry,
            issued,
            refused,
        }
    }

    pub fn encode(&self, openmetrics: bool) -> Result<String, std::fmt::Error> {
        crate::metrics::encode_registry(&self.registry, openmetrics)
    }
}

impl Default for CaMetrics {
    fn default() -> Self {
        Self::new()
    }
}

/// `/metrics` and `/healthz/ready` (ready once serving: the CA is loaded before this starts).
pub async fn serve(
    addr: SocketAddr,
    metrics: Arc<CaMetrics>,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    serve_http(addr, move |req: Request<Incoming>| {
        let metrics = metrics.clone();
        async move {
            Ok::<Response<Body>, Infallible>(match (req.method(), req.uri().path()) {
                (&Method::GET, "/metrics") => {
                    let om = wants_openmetrics(&req);
                    metrics_response(om, metrics.encode(om))
                }
                (&Method::GET, "/healthz/ready") => {
                    respond(StatusCode::OK, "text/plain", "ready\n")
                }
                _ => respond(StatusCode::NOT_FOUND, "text/plain", "not found\n"),
            })
        }
    })
    .await
}
