//! Reading identities and facts out of certificates, and writing them as PEM for /config_dump.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

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
    Ok(uri_sans(der)?
        .iter()
        .filter_map(|uri| uri.parse().ok())
        .collect())
}

/// The certificate's expiry, for /config_dump and the expiry gauge.
pub fn not_after_unix(der: &[u8]) -> Result<i64, CertError> {
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| CertError::Parse(e.to_string()))?;
    Ok(cert.validity().not_after.timestamp())
}

/// Every URI in the certificate's subjectAltName, SPIFFE or not: what a CA's answer is checked
/// against (it must name exactly the identity asked for, and nothing else).
pub fn uri_sans(der: &[u8]) -> Result<Vec<String>, CertError> {
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
            GeneralName::URI(uri) => Some((*uri).to_string()),
            _ => None,
        })
        .collect())
}

/// What /config_dump shows of one certificate, read from its DER.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertFacts {
    /// The serial number in decimal (what istioctl parses).
    pub serial: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// The raw subjectPublicKey bits (for comparing with the key a CSR was made from).
    pub public_key: Vec<u8>,
}

pub fn facts(der: &[u8]) -> Result<CertFacts, CertError> {
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| CertError::Parse(e.to_string()))?;
    let at = |ts: i64| UNIX_EPOCH + Duration::from_secs(u64::try_from(ts).unwrap_or(0));
    Ok(CertFacts {
        serial: cert.tbs_certificate.serial.to_string(),
        not_before: at(cert.validity().not_before.timestamp()),
        not_after: at(cert.validity().not_after.timestamp()),
        public_key: cert.public_key().subject_public_key.data.to_vec(),
    })
}

/// `-----BEGIN CERTIFICATE-----` text for a DER certificate, 64 columns, trailing newline.
pub fn der_to_pem(der: &[u8]) -> String {
    let config = pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF);
    pem::encode_config(&pem::Pem::new("CERTIFICATE", der), config)
}

/// Standard base64 with padding (RFC 4648 §4).
pub fn base64(data: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(data)
}

/// RFC 3339 in UTC to the second (`2026-03-11T12:57:26Z`), as istioctl parses it.
pub fn rfc3339(t: SystemTime) -> String {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    match time::OffsetDateTime::from_unix_timestamp(secs) {
        Ok(dt) => format!(
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
            dt.year(),
            u8::from(dt.month()),
            dt.day(),
            dt.hour(),
            dt.minute(),
            dt.second()
        ),
        Err(_) => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pem_round_trips() {
        let der = b"not really a certificate, any bytes will do".to_vec();
        let pem = der_to_pem(&der);
        assert!(
            pem.starts_with("-----BEGIN CERTIFICATE-----\n")
                && pem.ends_with("-----END CERTIFICATE-----\n"),
            "{pem}"
        );
        assert_eq!(pem::parse(&pem).unwrap().contents(), der.as_slice());
    }

    #[test]
    fn base64_matches_rfc4648_vectors() {
        for (input, want) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(input.as_bytes()), want, "{input:?}");
        }
    }

    #[test]
    fn rfc3339_is_utc_to_the_second() {
        let t = UNIX_EPOCH + Duration::from_secs(1_678_539_446);
        assert_eq!(rfc3339(t), "2023-03-11T12:57:26Z");
    }
}
