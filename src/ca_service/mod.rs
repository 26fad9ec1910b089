//! `weft ca serve`: the mesh's only signing key, behind Istio's certificate protocol.
//!
//! Node agents (and any other workload) ask `istio.v1.auth.IstioCertificateService/
//! CreateCertificate` over TLS with a bound service-account token. Every request is
//! authenticated with a Kubernetes TokenReview ([`authn`]), then authorized ([`authorize`]):
//! a node agent may obtain a certificate only for a service account that has a pod on the
//! node its own pod runs on (asked as `ImpersonatedIdentity`, as istiod does); any other caller
//! only its own identity. The request's CSR must name exactly the authorized identity
//! ([`csr`]); lifetimes are capped and each caller is rate-limited ([`limit`]). Every
//! issuance is an audit log line and a metric; every refusal a log line naming caller and
//! request, with `Unauthenticated`, `PermissionDenied`, `InvalidArgument` or
//! `ResourceExhausted`.

pub mod authn;
pub mod authorize;
pub mod csr;
pub mod limit;
pub mod metrics;
pub mod service;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tracing::info;

use crate::identity::CertificateAuthority;

/// How long the service's own TLS certificate is valid; it is re-issued at every start.
const SERVING_CERT_TTL: Duration = Duration::from_secs(365 * 24 * 3600);
/// Largest request accepted (a CSR is about 500 bytes).
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

#[derive(Clone, Debug)]
pub struct CaServiceSettings {
    pub ca_dir: PathBuf,
    pub listen: SocketAddr,
    pub metrics_listen: SocketAddr,
    /// DNS names of the service's own serving certificate.
    pub server_names: Vec<String>,
    pub trust_domain: String,
    pub audience: String,
    /// Service accounts (`namespace/name`) of node agents.
    pub node_agents: Vec<String>,
    pub max_ttl: Duration,
    pub rate_per_second: f64,
    pub burst: u32,
}

/// A running CA service.
pub struct CaService {
    pub addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl CaService {
    /// Loads the CA, issues the service's serving certificate and starts serving.
    pub async fn start(
        settings: CaServiceSettings,
        reviewer: Arc<dyn authn::TokenReviewer>,
        pods: Arc<dyn authn::PodDirectory>,
    ) -> anyhow::Result<CaService> {
        let ca_dir = settings.ca_dir.clone();
        let ca = tokio::task::spawn_blocking(move || CertificateAuthority::load(&ca_dir))
            .await?
            .with_context(|| format!("loading the CA from {}", settings.ca_dir.display()))?;
        let (chain, key) = ca
            .issue_for_names(&settings.server_names, SERVING_CERT_TTL)
            .context("issuing the service's own certificate")?;
        let tls = crate::grpc::server_tls(chain, key).context("the serving certificate")?;
        let metrics = Arc::new(metrics::CaMetrics::new());
        let reviewer: Arc<dyn authn::TokenReviewer> = Arc::new(authn::Cached::new(reviewer));
        let pods: Arc<dyn authn::PodDirectory> = Arc::new(authn::Cached::new(pods));
        let svc = service::Service::new(
            settings.clone(),
            Arc::new(ca),
            reviewer,
            pods,
            metrics.clone(),
        );
        let listener = tokio::net::TcpListener::bind(settings.listen)
            .await
            .with_context(|| format!("binding {}", settings.listen))?;
        let addr = listener.local_addr()?;
        let incoming = crate::grpc::tls_incoming(listener, tls);
        let server =
            tonic::transport::Server::builder().serve_with_incoming(svc.into_server(), incoming);
        let mut tasks = vec![tokio::spawn(async move {
            if let Err(e) = server.await {
                tracing::error!(error = %e, "CA service stopped");
            }
        })];
        let (metrics_addr, t) = metrics::serve(settings.metrics_listen, metrics).await?;
        tasks.push(t);
        info!(%addr, %metrics_addr, names = ?settings.server_names, "CA service started");
        Ok(CaService {
            addr,
            metrics_addr,
            tasks,
        })
    }
}

impl Drop for CaService {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}
