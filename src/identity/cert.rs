//! Reading identities out of peer certificates.

use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use super::Identity;

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("certificate is not valid DER X.509: {0}")]
    Parse(String),
    #[error("certificate has a malformed subjectAltName extension: {0}")]
    San(String),
}

/// Every Istio-shaped SPIFFE identity in the certificate's URI SANs. URIs that are not
/// `spiffe://td/ns/x/sa/y` are skipped, not errors: a certificate may carry other names.
pub fn spiffe_identities(der: &[u8]) -> Result<Vec<Identity>, CertError> {
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| CertError::Parse(e.to_string()))?;
    let Some(san) = cert
        .subject_alternative_name()
        .map_err(|e| CertError::San(e.to_string()))?
    else {
        return Ok(Vec::new());
    };
    Ok(san
        .value
        .general_names
        .iter()
        .filter_map(|name| match name {
            GeneralName::URI(uri) => uri.parse().ok(),
            _ => None,
        })
        .collect())
}

/// The certificate's expiry, for /config_dump and the expiry gauge.
pub fn not_after_unix(der: &[u8]) -> Result<i64, CertError> {
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| CertError::Parse(e.to_string()))?;
    Ok(cert.validity().not_after.timestamp())
}
