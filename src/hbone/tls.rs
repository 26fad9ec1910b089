//! TLS for HBONE: TLS 1.3 only, AES-GCM, ALPN `h2`, mutual authentication by SPIFFE identity.
//!
//! Peers are named by identity, not by DNS, so both verifiers here have rustls verify the chain
//! against the mesh roots (its client-certificate verifier, and for servers its chain check
//! without the DNS-name check, which SPIFFE certificates would fail) and then compare SPIFFE
//! URI SANs:
//! - the server accepts a client whose chain verifies and whose trust domain is its own;
//! - the client accepts a server that presents one of the identities it expects.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{verify_server_cert_signed_by_trust_anchor, ResolvesClientCert};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ParsedCertificate, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, Error as TlsError,
    OtherError, RootCertStore, ServerConfig, SignatureScheme,
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use super::verified::{ChainKey, Role, VerifiedChains};
use crate::identity::cert::spiffe_identities;
use crate::identity::{CertManager, Identity};

pub const ALPN_H2: &[u8] = b"h2";

/// The one crypto provider weft uses: aws-lc-rs restricted to TLS 1.3 AES-GCM suites.
///
/// AES-128-GCM-SHA256 comes first: its hash runs on the CPU's SHA extensions where the
/// SHA-384 of the other suite does not (a tenth of a fresh handshake), and it encrypts with
/// fewer AES rounds. AES-256-GCM-SHA384 stays accepted for peers that want it.
pub fn provider() -> Arc<CryptoProvider> {
    use rustls::CipherSuite::{TLS13_AES_128_GCM_SHA256, TLS13_AES_256_GCM_SHA384};
    let mut p = rustls::crypto::aws_lc_rs::default_provider();
    p.cipher_suites.retain(|s| {
        matches!(
            s.suite(),
            TLS13_AES_128_GCM_SHA256 | TLS13_AES_256_GCM_SHA384
        )
    });
    p.cipher_suites
        .sort_by_key(|s| s.suite() != TLS13_AES_128_GCM_SHA256);
    Arc::new(p)
}

#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    #[error("no usable root certificate: {0}")]
    Roots(String),
    #[error("building the TLS configuration: {0}")]
    Config(#[from] TlsError),
}

/// The mesh trust: roots, trust domain and provider. Builds client and server configurations.
pub struct TlsContext {
    provider: Arc<CryptoProvider>,
    roots: Arc<RootCertStore>,
    /// rustls's verification of client chains against `roots`.
    clients: Arc<dyn ClientCertVerifier>,
    /// Chains verified against `roots`, shared by every configuration built here.
    verified: Arc<VerifiedChains>,
    trust_domain: String,
    certs: Arc<CertManager>,
}

impl std::fmt::Debug for TlsContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsContext")
            .field("trust_domain", &self.trust_domain)
            .field("roots", &self.roots.len())
            .finish()
    }
}

impl TlsContext {
    pub fn new(
        provider: Arc<CryptoProvider>,
        certs: Arc<CertManager>,
        trust_domain: String,
    ) -> Result<Self, TlsSetupError> {
        let roots = certs
            .roots()
            .iter()
            .map(|der| {
                webpki::anchor_from_trusted_cert(der)
                    .map(|a| a.to_owned())
                    .map_err(|e| TlsSetupError::Roots(e.to_string()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if roots.is_empty() {
            return Err(TlsSetupError::Roots("the root bundle is empty".into()));
        }
        let roots = Arc::new(RootCertStore { roots });
        let clients = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .map_err(|e| TlsSetupError::Roots(e.to_string()))?;
        Ok(TlsContext {
            provider,
            roots,
            clients,
            verified: Arc::default(),
            trust_domain,
            certs,
        })
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn cert_manager(&self) -> &Arc<CertManager> {
        &self.certs
    }

    /// Server side of HBONE for a workload with identity `local`.
    pub fn server_config(&self, local: Identity) -> Result<Arc<ServerConfig>, TlsSetupError> {
        let verifier = Arc::new(TrustDomainClientVerifier {
            chain: ChainVerifier::new(self),
            trust_domain: self.trust_domain.clone(),
        });
        let mut cfg = ServerConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(Arc::new(CurrentCertificate {
                identity: local,
                certs: self.certs.clone(),
            }));
        cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
        // HBONE connections are long-lived and pooled; tickets would only cost CPU.
        cfg.send_tls13_tickets = 0;
        Ok(Arc::new(cfg))
    }

    /// Client side of HBONE: presents `local`'s certificate and accepts a server only if it
    /// proves one of `expected`.
    pub fn client_config(
        &self,
        local: Identity,
        expected: Vec<Identity>,
    ) -> Result<Arc<ClientConfig>, TlsSetupError> {
        let verifier = Arc::new(ExpectedIdentityServerVerifier {
            chain: ChainVerifier::new(self),
            expected,
        });
        let mut cfg = ClientConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_cert_resolver(Arc::new(CurrentCertificate {
                identity: local,
                certs: self.certs.clone(),
            }));
        cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
        cfg.resumption = rustls::client::Resumption::disabled();
        Ok(Arc::new(cfg))
    }
}

/// The peer's identities as proven by a completed handshake.
pub fn peer_identities(certs: Option<&[CertificateDer<'_>]>) -> Vec<Identity> {
    certs
        .and_then(|c| c.first())
        .and_then(|leaf| spiffe_identities(leaf).ok())
        .unwrap_or_default()
}

/// Serves whatever certificate the manager currently holds for the identity, so a renewal takes
/// effect on the next handshake without rebuilding configurations.
///
/// Only a cache read: a handshake never waits for a signer. The connection paths fetch the
/// certificate before they start the handshake; if there is none, the handshake fails for want
/// of a certificate (the manager logs that once per identity).
#[derive(Debug)]
struct CurrentCertificate {
    identity: Identity,
    certs: Arc<CertManager>,
}

impl CurrentCertificate {
    fn current(&self) -> Option<Arc<CertifiedKey>> {
        self.certs
            .certificate(&self.identity)
            .map(|c| c.certified_key.clone())
    }
}

impl ResolvesServerCert for CurrentCertificate {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current()
    }
}

impl ResolvesClientCert for CurrentCertificate {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        self.current()
    }
    fn has_certs(&self) -> bool {
        true
    }
}

/// Chain verification shared by both directions: rustls's against the mesh roots, then the
/// SPIFFE identities of the leaf; a chain verified before is answered from `verified`.
#[derive(Debug, Clone)]
struct ChainVerifier {
    roots: Arc<RootCertStore>,
    clients: Arc<dyn ClientCertVerifier>,
    algorithms: WebPkiSupportedAlgorithms,
    verified: Arc<VerifiedChains>,
}

impl ChainVerifier {
    fn new(ctx: &TlsContext) -> Self {
        ChainVerifier {
            roots: ctx.roots.clone(),
            clients: ctx.clients.clone(),
            algorithms: ctx.provider.signature_verification_algorithms,
            verified: ctx.verified.clone(),
        }
    }

    fn verify(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        role: Role,
    ) -> Result<Vec<Identity>, TlsError> {
        let key = ChainKey::new(role, end_entity, intermediates);
        if let Some(ids) = self.verified.lookup(&key, now) {
            return Ok(ids);
        }
        match role {
            Role::Client => {
                self.clients
                    .verify_client_cert(end_entity, intermediates, now)?;
            }
            Role::Server => verify_server_cert_signed_by_trust_anchor(
                &ParsedCertificate::try_from(end_entity)?,
                &self.roots,
                intermediates,
                now,
                self.algorithms.all,
            )?,
        }
        let ids = spiffe_identities(end_entity)
            .map_err(|e| TlsError::InvalidCertificate(CertificateError::Other(other(e))))?;
        if ids.is_empty() {
            return Err(refuse("peer certificate carries no SPIFFE identity".into()));
        }
        self.verified.remember(key, end_entity, intermediates, &ids);
        Ok(ids)
    }

    fn tls13(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }
}

fn other(e: impl std::error::Error + Send + Sync + 'static) -> OtherError {
    OtherError(Arc::new(e))
}

/// An identity check that failed after the chain was fine. Logged by the caller with context.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct IdentityRefused(pub String);

fn refuse(reason: String) -> TlsError {
    TlsError::InvalidCertificate(CertificateError::Other(other(IdentityRefused(reason))))
}

#[derive(Debug)]
struct TrustDomainClientVerifier {
    chain: ChainVerifier,
    trust_domain: String,
}

impl ClientCertVerifier for TrustDomainClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, TlsError> {
        let ids = self
            .chain
            .verify(end_entity, intermediates, now, Role::Client)?;
        if ids.iter().any(|id| id.trust_domain == self.trust_domain) {
            return Ok(ClientCertVerified::assertion());
        }
        let seen: Vec<String> = ids.iter().map(ToString::to_string).collect();
        Err(refuse(format!(
            "client identity {} is not in trust domain {}",
            seen.join(","),
            self.trust_domain
        )))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        // Unreachable while only TLS 1.3 is enabled; verified properly should that change.
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.chain.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        self.chain.tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.chain.algorithms.supported_schemes()
    }
}

#[derive(Debug)]
struct ExpectedIdentityServerVerifier {
    chain: ChainVerifier,
    expected: Vec<Identity>,
}

impl ServerCertVerifier for ExpectedIdentityServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, TlsError> {
        let ids = self
            .chain
            .verify(end_entity, intermediates, now, Role::Server)?;
        if ids.iter().any(|id| self.expected.contains(id)) {
            return Ok(ServerCertVerified::assertion());
        }
        let seen: Vec<String> = ids.iter().map(ToString::to_string).collect();
        let want: Vec<String> = self.expected.iter().map(ToString::to_string).collect();
        Err(refuse(format!(
            "server identity {} is not one of the expected {}",
            seen.join(","),
            want.join(",")
        )))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        // Unreachable while only TLS 1.3 is enabled; verified properly should that change.
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.chain.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        self.chain.tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.chain.algorithms.supported_schemes()
    }
}
