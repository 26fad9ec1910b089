//! The gRPC service: one `CreateCertificate` = authenticate, authorize, check the CSR, cap
//! the lifetime, rate-limit, sign, audit.

use std::sync::Arc;
use std::time::Duration;

use prost_types::value::Kind;
use rustls_pki_types::CertificateDer;
use tonic::{Code, Request, Response, Status};
use tracing::{info, warn};

use super::authn::{PodDirectory, ReviewError, TokenReviewer};
use super::authorize::{decide, refuse, Grant, Refusal};
use super::limit::RateLimiter;
use super::metrics::{CaMetrics, IssuedLabels, RefusedLabels};
use super::{csr, CaServiceSettings, MAX_REQUEST_BYTES};
use crate::identity::istio_ca::IMPERSONATED_IDENTITY;
use crate::identity::{cert::der_to_pem, CertificateAuthority};
use crate::proto::ca::istio_certificate_service_server::{
    IstioCertificateService, IstioCertificateServiceServer,
};
use crate::proto::ca::{IstioCertificateRequest, IstioCertificateResponse};

pub struct Service {
    settings: CaServiceSettings,
    ca: Arc<CertificateAuthority>,
    reviewer: Arc<dyn TokenReviewer>,
    pods: Arc<dyn PodDirectory>,
    limiter: RateLimiter,
    metrics: Arc<CaMetrics>,
}

impl Service {
    pub fn new(
        settings: CaServiceSettings,
        ca: Arc<CertificateAuthority>,
        reviewer: Arc<dyn TokenReviewer>,
        pods: Arc<dyn PodDirectory>,
        metrics: Arc<CaMetrics>,
    ) -> Self {
        Service {
            limiter: RateLimiter::new(settings.rate_per_second, settings.burst),
            settings,
            ca,
            reviewer,
            pods,
            metrics,
        }
    }

    pub fn into_server(self) -> IstioCertificateServiceServer<Service> {
        IstioCertificateServiceServer::new(self).max_decoding_message_size(MAX_REQUEST_BYTES)
    }

    async fn create(
        &self,
        request: Request<IstioCertificateRequest>,
        peer: &str,
    ) -> Result<(IstioCertificateResponse, String), Refusal> {
        let token = bearer(&request)?;
        let caller = self
            .reviewer
            .review(&token, &self.settings.audience)
            .await
            .map_err(|e| match e {
                ReviewError::Rejected(r) => refuse(Code::Unauthenticated, r),
                ReviewError::Unavailable(r) => refuse(Code::Unavailable, r),
            })?;
        let req = request.into_inner();
        let impersonated = impersonated_identity(&req)?;
        let who = caller.name();
        let with_caller = |r: Refusal| Refusal {
            code: r.code,
            reason: format!("caller {who}: {}", r.reason),
        };
        let grant = decide(
            &caller,
            impersonated.as_deref(),
            &self.settings.trust_domain,
            &self.settings.node_agents,
        )
        .map_err(with_caller)?;
        if let Grant::OnNodeOf {
            identity,
            agent_pod,
        } = &grant
        {
            let node = self
                .pods
                .node_of(&caller.namespace, agent_pod)
                .await
                .map_err(|e| refuse(Code::Unavailable, e))?
                .ok_or_else(|| {
                    with_caller(refuse(
                        Code::PermissionDenied,
                        "the token's pod is gone or not scheduled on a node",
                    ))
                })?;
            let present = self
                .pods
                .runs_on(&identity.namespace, &identity.service_account, &node)
                .await
                .map_err(|e| refuse(Code::Unavailable, e))?;
            if !present {
                return Err(with_caller(refuse(
                    Code::PermissionDenied,
                    format!("no pod of {identity} is scheduled on node {node}"),
                )));
            }
        }
        let identity = grant.identity().clone();
        let request = csr::check(&req.csr, &identity).map_err(|e| {
            let code = match e {
                csr::CsrError::Malformed(_) => Code::InvalidArgument,
                csr::CsrError::WrongIdentity { .. } => Code::PermissionDenied,
            };
            with_caller(refuse(code, e.to_string()))
        })?;
        if !self
            .limiter
            .allow(&format!("{}/{}", caller.namespace, caller.service_account))
        {
            return Err(with_caller(refuse(
                Code::ResourceExhausted,
                "issuance rate limit reached; retry later",
            )));
        }
        let ttl = capped(req.validity_duration, self.settings.max_ttl);
        let chain = self
            .ca
            .sign_request(request, &identity, ttl)
            .map_err(|e| refuse(Code::Internal, e.to_string()))?;
        self.metrics
            .issued
            .get_or_create(&IssuedLabels {
                impersonated: matches!(grant, Grant::OnNodeOf { .. }).to_string(),
            })
            .inc();
        info!(target: "audit", caller = %who, %peer, %identity, ttl_seconds = ttl.as_secs(), "certificate issued");
        Ok((
            IstioCertificateResponse {
                cert_chain: chain_pem(&chain, self.ca.root_certificates()),
            },
            identity.to_string(),
        ))
    }
}

#[tonic::async_trait]
impl IstioCertificateService for Service {
    async fn create_certificate(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        let peer = request
            .remote_addr()
            .map_or_else(|| "-".to_string(), |a| a.to_string());
        match self.create(request, &peer).await {
            Ok((resp, _)) => Ok(Response::new(resp)),
            Err(r) => {
                self.metrics
                    .refused
                    .get_or_create(&RefusedLabels {
                        code: format!("{:?}", r.code),
                    })
                    .inc();
                warn!(%peer, code = ?r.code, reason = %r.reason, "certificate request refused");
                Err(Status::new(r.code, r.reason))
            }
        }
    }
}

fn bearer<T>(request: &Request<T>) -> Result<String, Refusal> {
    let value = request
        .metadata()
        .get("authorization")
        .ok_or_else(|| refuse(Code::Unauthenticated, "no bearer token"))?;
    let text = value
        .to_str()
        .map_err(|_| refuse(Code::Unauthenticated, "authorization header is not text"))?;
    text.strip_prefix("Bearer ")
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty())
        .ok_or_else(|| refuse(Code::Unauthenticated, "authorization is not a bearer token"))
}

fn impersonated_identity(req: &IstioCertificateRequest) -> Result<Option<String>, Refusal> {
    let Some(field) = req
        .metadata
        .as_ref()
        .and_then(|m| m.fields.get(IMPERSONATED_IDENTITY))
    else {
        return Ok(None);
    };
    match &field.kind {
        Some(Kind::StringValue(s)) => Ok(Some(s.clone())),
        _ => Err(refuse(
            Code::InvalidArgument,
            format!("{IMPERSONATED_IDENTITY} is not a string"),
        )),
    }
}

/// The requested lifetime, capped; zero or negative asks for the cap.
fn capped(requested_seconds: i64, max: Duration) -> Duration {
    match u64::try_from(requested_seconds) {
        Ok(s) if s > 0 => Duration::from_secs(s).min(max),
        _ => max,
    }
}

/// The chain as Istio sends it: leaf, intermediates, root; a bundle's other roots follow, so
/// clients in a rotation learn both.
fn chain_pem(chain: &[CertificateDer<'static>], roots: &[CertificateDer<'static>]) -> Vec<String> {
    let mut out: Vec<String> = chain.iter().map(|c| der_to_pem(c)).collect();
    for r in roots {
        if !chain.contains(r) {
            out.push(der_to_pem(r));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lifetimes_are_capped() {
        let max = Duration::from_secs(3600);
        assert_eq!(capped(60, max), Duration::from_secs(60));
        assert_eq!(capped(86_400, max), max);
        assert_eq!(capped(0, max), max);
        assert_eq!(capped(-5, max), max);
    }
}
