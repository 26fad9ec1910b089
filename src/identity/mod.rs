//! Workload identity: SPIFFE ids, the certificate authority and per-identity certificates.

pub mod ca;
pub mod cert;
pub mod manager;
mod spiffe;

pub use ca::{CertificateAuthority, CertificateSigner};
pub use manager::CertManager;
pub use spiffe::{Identity, IdentityError, SPIFFE_SCHEME};
