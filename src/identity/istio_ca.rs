//! A client of Istio's certificate service (`istio.v1.auth.IstioCertificateService`), the CA
//! that istiod serves on 15012 and that `weft ca serve` speaks too.
//!
//! One request per certificate: weft makes a P-256 key and a CSR whose only name is the SPIFFE
//! URI, and sends it with the node's bearer token and cluster id. istiod ignores the names in
//! the CSR and signs for the caller's identity (from the token), or, when the request carries
//! `ImpersonatedIdentity` and the caller is a trusted node agent (`CA_TRUSTED_NODE_ACCOUNTS`),
//! for that identity after checking that a pod with it runs on the caller's node. So what comes
//! back is checked, not trusted: the leaf must name exactly the identity asked for, carry the
//! key weft made, and chain to the mesh roots.

use std::collections::BTreeMap;
use std::time::Duration;

use prost_types::value::Kind;
use prost_types::{Struct, Value};
use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType, PKCS_ECDSA_P256_SHA256};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, TrustAnchor, UnixTime};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::Channel;
use tracing::debug;

use super::ca::{CertificateSigner, SignFuture, WorkloadCertificate};
use super::cert::{facts, uri_sans};
use super::Identity;
use crate::grpc::{self, GrpcError, GrpcTarget, TokenFile};
use crate::proto::ca::istio_certificate_service_client::IstioCertificateServiceClient;
use crate::proto::ca::IstioCertificateRequest;

/// The metadata key istiod reads the identity from when a node agent asks for a pod's.
pub const IMPERSONATED_IDENTITY: &str = "ImpersonatedIdentity";

/// How long one CreateCertificate call may take, connection included.
const RPC_TIMEOUT: Duration = Duration::from_secs(10);

/// How to reach and use the CA.
#[derive(Clone, Debug)]
pub struct IstioCaSettings {
    /// The CA's address (Istio's `CA_ADDR`, istiod's 15012) and the root bundle its serving
    /// certificate chains to (`CA_ROOT_CA`). That bundle is also the mesh trust: workload
    /// certificates from this CA must chain to it, and peers are verified against it.
    pub target: GrpcTarget,
    /// The node agent's service-account token, sent as `authorization: Bearer …`.
    pub token: Option<TokenFile>,
    /// Sent as `clusterid` metadata: istiod picks the cluster whose API server checks the token.
    pub cluster_id: String,
    /// weft's own identity. A certificate for any other identity is asked for on a pod's behalf
    /// (`ImpersonatedIdentity`); `None` means weft never asks for its own.
    pub node_identity: Option<Identity>,
    /// Only identities of this trust domain are asked for.
    pub trust_domain: String,
}

/// Why the CA gave no usable certificate.
#[derive(Debug, thiserror::Error)]
pub enum IstioCaError {
    #[error("the CA client: {0}")]
    Setup(#[from] GrpcError),
    #[error("the CA root bundle {path}: {reason}")]
    Roots {
        path: std::path::PathBuf,
        reason: String,
    },
    #[error("cluster id {0:?} is not a valid gRPC metadata value")]
    ClusterId(String),
    #[error("weft asks its CA only for identities of trust domain {trust_domain}; {identity} is not one")]
    ForeignTrustDomain {
        identity: Identity,
        trust_domain: String,
    },
    #[error("making the certificate request for {identity}: {source}")]
    Csr {
        identity: Identity,
        source: rcgen::Error,
    },
    /// The CA answered with an error status (istiod's node check answers `Unauthenticated`).
    #[error("istiod refused a certificate for {identity}: {code:?}: {message}")]
    Refused {
        identity: Identity,
        code: tonic::Code,
        message: String,
    },
    /// The call did not reach the CA or got no answer.
    #[error("could not reach the CA at {address} for {identity}: {code:?}: {message}")]
    Unreachable {
        identity: Identity,
        address: String,
        code: tonic::Code,
        message: String,
    },
    #[error("the CA at {address} did not answer within {waited:?} for {identity}")]
    Timeout {
        identity: Identity,
        address: String,
        waited: Duration,
    },
    /// The CA answered, but with something weft must not use.
    #[error("the CA's certificate for {identity} is unusable: {reason}")]
    BadResponse { identity: Identity, reason: String },
}

/// Istio's CA as a [`CertificateSigner`].
pub struct IstioCa {
    client: IstioCertificateServiceClient<Channel>,
    address: String,
    token: Option<TokenFile>,
    cluster_id: MetadataValue<Ascii>,
    node_identity: Option<Identity>,
    trust_domain: String,
    roots: Vec<CertificateDer<'static>>,
    anchors: Vec<TrustAnchor<'static>>,
}

impl std::fmt::Debug for IstioCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IstioCa")
            .field("address", &self.address)
            .field("node_identity", &self.node_identity)
            .field("roots", &self.roots.len())
            .finish()
    }
}

impl IstioCa {
    /// Reads the root bundle and prepares a channel that connects on first use; call it inside
    /// the Tokio runtime (the channel's worker is spawned now).
    ///
    /// The roots are read once, here: they are the mesh trust the TLS context is built from at
    /// start-up, so a root rotation needs a restart, as it does for the TLS context.
    pub fn new(settings: IstioCaSettings) -> Result<Self, IstioCaError> {
        let IstioCaSettings {
            target,
            token,
            cluster_id,
            node_identity,
            trust_domain,
        } = settings;
        let roots = grpc::read_roots(&target.root_cert)?;
        let anchors = roots
            .iter()
            .map(|der| {
                webpki::anchor_from_trusted_cert(der)
                    .map(|a| a.to_owned())
                    .map_err(|e| IstioCaError::Roots {
                        path: target.root_cert.clone(),
                        reason: e.to_string(),
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let cluster_id = cluster_id
            .parse()
            .map_err(|_| IstioCaError::ClusterId(cluster_id.clone()))?;
        let channel = grpc::channel(&target)?;
        Ok(IstioCa {
            client: IstioCertificateServiceClient::new(channel),
            address: target.address,
            token,
            cluster_id,
            node_identity,
            trust_domain,
            roots,
            anchors,
        })
    }

    async fn create(
        &self,
        identity: &Identity,
        ttl: Duration,
    ) -> Result<WorkloadCertificate, IstioCaError> {
        if identity.trust_domain != self.trust_domain {
            return Err(IstioCaError::ForeignTrustDomain {
                identity: identity.clone(),
                trust_domain: self.trust_domain.clone(),
            });
        }
        let csr_err = |source| IstioCaError::Csr {
            identity: identity.clone(),
            source,
        };
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(csr_err)?;
        let uri = identity.to_string();
        let mut params = CertificateParams::default();
        // The identity is the URI SAN alone; rcgen would otherwise invent a common name.
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(uri.clone().try_into().map_err(csr_err)?)];
        let csr = params
            .serialize_request(&key)
            .and_then(|r| r.pem())
            .map_err(csr_err)?;

        let impersonate = self.node_identity.as_ref() != Some(identity);
        let metadata = impersonate.then(|| Struct {
            fields: BTreeMap::from([(
                IMPERSONATED_IDENTITY.to_string(),
                Value {
                    kind: Some(Kind::StringValue(uri.clone())),
                },
            )]),
        });
        let mut request = tonic::Request::new(IstioCertificateRequest {
            csr,
            validity_duration: i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX),
            metadata,
        });
        if let Some(token) = &self.token {
            request
                .metadata_mut()
                .insert("authorization", token.bearer()?);
        }
        request
            .metadata_mut()
            .insert("clusterid", self.cluster_id.clone());
        request.set_timeout(RPC_TIMEOUT);

        debug!(identity = %identity, impersonate, ca = %self.address, "requesting a certificate");
        let mut client = self.client.clone();
        let response = tokio::time::timeout(RPC_TIMEOUT, client.create_certificate(request))
            .await
            .map_err(|_| IstioCaError::Timeout {
                identity: identity.clone(),
                address: self.address.clone(),
                waited: RPC_TIMEOUT,
            })?
            .map_err(|status| self.status_error(identity, &status))?
            .into_inner();
        accept_response(
            identity,
            &key,
            &response.cert_chain,
            &self.roots,
            &self.anchors,
        )
        .map_err(|reason| IstioCaError::BadResponse {
            identity: identity.clone(),
            reason,
        })
    }

    fn status_error(&self, identity: &Identity, status: &tonic::Status) -> IstioCaError {
        // Transport failures hide their cause in the source chain; keep it for the log.
        let mut message = status.message().to_string();
        let mut source = std::error::Error::source(status);
        while let Some(e) = source {
            message = format!("{message}: {e}");
            source = e.source();
        }
        let code = status.code();
        match code {
            tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Cancelled => {
                IstioCaError::Unreachable {
                    identity: identity.clone(),
                    address: self.address.clone(),
                    code,
                    message,
                }
            }
            _ => IstioCaError::Refused {
                identity: identity.clone(),
                code,
                message,
            },
        }
    }
}

impl CertificateSigner for IstioCa {
    fn sign<'a>(&'a self, identity: &'a Identity, ttl: Duration) -> SignFuture<'a> {
        Box::pin(async move { Ok(self.create(identity, ttl).await?) })
    }

    fn roots(&self) -> Vec<CertificateDer<'static>> {
        self.roots.clone()
    }
}

/// Turns the CA's answer into a certificate weft may present, or says why not.
///
/// Each string of `cert_chain` is PEM and may hold several certificates (istiod sends the root
/// bundle as one last string). The leaf comes first; what follows is the chain, of which the
/// roots themselves are left out of what weft presents (peers have them).
fn accept_response(
    identity: &Identity,
    key: &KeyPair,
    cert_chain: &[String],
    roots: &[CertificateDer<'static>],
    anchors: &[TrustAnchor<'static>],
) -> Result<WorkloadCertificate, String> {
    let mut certs = Vec::new();
    for (i, pem) in cert_chain.iter().enumerate() {
        let before = certs.len();
        for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
            certs.push(cert.map_err(|e| format!("element {i} of the chain: {e}"))?);
        }
        if certs.len() == before {
            return Err(format!("element {i} of the chain holds no PEM certificate"));
        }
    }
    let Some((leaf, rest)) = certs.split_first() else {
        return Err("the answer holds no certificate".into());
    };

    let uri = identity.to_string();
    let sans = uri_sans(leaf).map_err(|e| format!("the leaf: {e}"))?;
    if sans != [uri.as_str()] {
        return Err(format!(
            "the leaf names {sans:?}, not the requested {uri} alone"
        ));
    }
    let leaf_facts = facts(leaf).map_err(|e| format!("the leaf: {e}"))?;
    if leaf_facts.public_key != key.public_key_raw() {
        return Err("the leaf certifies a key other than the one in the request".into());
    }

    let end_entity = webpki::EndEntityCert::try_from(leaf).map_err(|e| format!("the leaf: {e}"))?;
    let algorithms = rustls::crypto::aws_lc_rs::default_provider()
        .signature_verification_algorithms
        .all;
    let now = UnixTime::now();
    for (usage, what) in [
        (webpki::KeyUsage::server_auth(), "server"),
        (webpki::KeyUsage::client_auth(), "client"),
    ] {
        end_entity
            .verify_for_usage(algorithms, anchors, rest, now, usage, None, None)
            .map_err(|e| {
                format!("the chain does not verify to the mesh roots for {what} use: {e}")
            })?;
    }

    let mut chain = Vec::with_capacity(certs.len());
    chain.push(leaf.clone());
    chain.extend(rest.iter().filter(|c| !roots.contains(c)).cloned());
    Ok(WorkloadCertificate {
        identity: identity.clone(),
        chain,
        key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        not_before: leaf_facts.not_before,
        not_after: leaf_facts.not_after,
    })
}

#[cfg(test)]
mod tests;
