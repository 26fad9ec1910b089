//! Workload identity: SPIFFE ids, the certificate signers (the built-in CA, Istio's CA
//! service) and the per-identity certificates served to TLS.

pub mod ca;
pub mod cert;
pub mod istio_ca;
pub mod manager;
mod spiffe;

pub use ca::{CaError, CertificateAuthority, CertificateSigner, SignFuture, WorkloadCertificate};
pub use istio_ca::{IstioCa, IstioCaError, IstioCaSettings};
pub use manager::{CertManager, CertManagerError, CERTIFICATE_WAIT};
pub use spiffe::{Identity, IdentityError, SPIFFE_SCHEME};
