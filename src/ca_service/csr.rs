//! The certificate request: parsed and its signature verified (rcgen), and held to the
//! identity the caller was authorized for.

use rcgen::{CertificateSigningRequestParams, SanType};

use crate::identity::Identity;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CsrError {
    #[error("the CSR is not a valid, correctly signed PKCS#10 request: {0}")]
    Malformed(String),
    #[error("the CSR names {found:?}, not exactly the authorized identity {authorized}")]
    WrongIdentity {
        found: Vec<String>,
        authorized: String,
    },
}

/// Parses `pem` and checks that its only name is `authorized` (one URI SAN, nothing else).
pub fn check(
    pem: &str,
    authorized: &Identity,
) -> Result<CertificateSigningRequestParams, CsrError> {
    let csr = CertificateSigningRequestParams::from_pem(pem)
        .map_err(|e| CsrError::Malformed(e.to_string()))?;
    let names: Vec<String> = csr
        .params
        .subject_alt_names
        .iter()
        .map(|san| match san {
            SanType::URI(u) => u.as_str().to_string(),
            other => format!("{other:?}"),
        })
        .collect();
    if names != [authorized.to_string()] {
        return Err(CsrError::WrongIdentity {
            found: names,
            authorized: authorized.to_string(),
        });
    }
    Ok(csr)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, KeyPair, PKCS_ECDSA_P256_SHA256};

    fn csr(sans: Vec<SanType>) -> String {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut p = CertificateParams::default();
        p.subject_alt_names = sans;
        p.serialize_request(&key).unwrap().pem().unwrap()
    }

    fn uri(s: &str) -> SanType {
        SanType::URI(s.to_string().try_into().unwrap())
    }

    #[test]
    fn exactly_the_authorized_identity_passes() {
        let id = Identity::new("cluster.local", "shop", "cart");
        assert!(check(&csr(vec![uri(&id.to_string())]), &id).is_ok());
        let other = csr(vec![uri("spiffe://cluster.local/ns/bank/sa/vault")]);
        assert!(matches!(
            check(&other, &id),
            Err(CsrError::WrongIdentity { .. })
        ));
        let extra = csr(vec![
            uri(&id.to_string()),
            SanType::DnsName("evil.example".try_into().unwrap()),
        ]);
        assert!(matches!(
            check(&extra, &id),
            Err(CsrError::WrongIdentity { .. })
        ));
        assert!(matches!(
            check(&csr(vec![]), &id),
            Err(CsrError::WrongIdentity { .. })
        ));
    }

    #[test]
    fn garbage_and_tampered_requests_are_malformed() {
        let id = Identity::new("cluster.local", "shop", "cart");
        assert!(matches!(check("hello", &id), Err(CsrError::Malformed(_))));
        // Flip a byte inside the signed body: the signature no longer verifies.
        let good = csr(vec![uri(&id.to_string())]);
        let der = pem::parse(&good).unwrap();
        let mut bytes = der.contents().to_vec();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0x01;
        let bad = pem::encode(&pem::Pem::new("CERTIFICATE REQUEST", bytes));
        assert!(matches!(check(&bad, &id), Err(CsrError::Malformed(_))));
    }
}
