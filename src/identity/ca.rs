//! The built-in certificate authority: signs workload certificates with a CA whose files are laid
//! out like Istio's plugged-in `cacerts` secret, so an operator can reuse the CA they already have.
//!
//! | file            | what it is                                                  |
//! |-----------------|-------------------------------------------------------------|
//! | `ca-cert.pem`   | the certificate that signs workload certificates            |
//! | `ca-key.pem`    | its private key                                             |
//! | `root-cert.pem` | the trust anchor(s) every weft and ztunnel verifies against |
//! | `cert-chain.pem`| `ca-cert.pem` up to (and possibly including) the root       |

use std::fs;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
    PKCS_ECDSA_P256_SHA256,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use super::Identity;

pub const CA_CERT: &str = "ca-cert.pem";
pub const CA_KEY: &str = "ca-key.pem";
pub const ROOT_CERT: &str = "root-cert.pem";
pub const CERT_CHAIN: &str = "cert-chain.pem";

/// Certificates that were signed slightly in the future on a peer with a skewed clock would be
/// refused; back-dating the start by this much avoids that.
const CLOCK_SKEW_ALLOWANCE: Duration = Duration::from_secs(300);

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} holds no PEM certificate")]
    NoCertificate { path: PathBuf },
    #[error("{path}: {reason}")]
    BadPem { path: PathBuf, reason: String },
    #[error("{0} already exists; refusing to overwrite a CA (remove it first)")]
    Exists(PathBuf),
    #[error("signing a certificate for {identity}: {source}")]
    Sign {
        identity: String,
        source: rcgen::Error,
    },
    #[error("creating the root CA: {0}")]
    Generate(rcgen::Error),
    /// A remote CA (istiod, `weft ca serve`) did not give a usable certificate. Boxed: it is
    /// the largest error here, and the local CA's results should not carry its size.
    #[error(transparent)]
    Remote(Box<super::istio_ca::IstioCaError>),
}

impl From<super::istio_ca::IstioCaError> for CaError {
    fn from(e: super::istio_ca::IstioCaError) -> Self {
        CaError::Remote(Box::new(e))
    }
}

/// A freshly signed workload certificate with its key, ready for rustls.
#[derive(Debug)]
pub struct WorkloadCertificate {
    pub identity: Identity,
    /// Leaf first, then the CA chain.
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

/// What [`CertificateSigner::sign`] returns: boxed, so that the trait stays usable as
/// `Arc<dyn CertificateSigner>` (the node picks its signer at start-up).
pub type SignFuture<'a> =
    Pin<Box<dyn Future<Output = Result<WorkloadCertificate, CaError>> + Send + 'a>>;

/// Something that can issue workload certificates and names the roots peers must chain to.
/// The built-in CA is one; Istio's CA service ([`super::IstioCa`]) is another.
///
/// Signing is asynchronous because a remote CA is a network call; the certificate manager
/// calls it in the background, never from inside a TLS handshake.
pub trait CertificateSigner: Send + Sync + 'static {
    /// A new key and a certificate for `identity`, valid for `ttl` (the CA may shorten it).
    fn sign<'a>(&'a self, identity: &'a Identity, ttl: Duration) -> SignFuture<'a>;
    /// The trust anchors every peer certificate must chain to. Synchronous: the TLS context is
    /// built from them at start-up.
    fn roots(&self) -> Vec<CertificateDer<'static>>;
}

/// A CA loaded from `cacerts`-style files.
pub struct CertificateAuthority {
    issuer: Issuer<'static, KeyPair>,
    chain: Vec<CertificateDer<'static>>,
    roots: Vec<CertificateDer<'static>>,
}

fn read(path: &Path) -> Result<String, CaError> {
    fs::read_to_string(path).map_err(|source| CaError::Read {
        path: path.to_owned(),
        source,
    })
}

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, CaError> {
    let text = read(path)?;
    let certs = CertificateDer::pem_slice_iter(text.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CaError::BadPem {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(CaError::NoCertificate {
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

impl CertificateAuthority {
    pub fn load(dir: &Path) -> Result<Self, CaError> {
        let key_path = dir.join(CA_KEY);
        let key = KeyPair::from_pem(&read(&key_path)?).map_err(|e| CaError::BadPem {
            path: key_path,
            reason: e.to_string(),
        })?;
        let ca_path = dir.join(CA_CERT);
        let ca_pem = read(&ca_path)?;
        let issuer = Issuer::from_ca_cert_pem(&ca_pem, key).map_err(|e| CaError::BadPem {
            path: ca_path.clone(),
            reason: e.to_string(),
        })?;
        let roots = certificates(&dir.join(ROOT_CERT))?;
        // cert-chain.pem is optional in practice: a self-signed root is its own chain.
        let chain_path = dir.join(CERT_CHAIN);
        let chain = if chain_path.exists() {
            certificates(&chain_path)?
        } else {
            certificates(&ca_path)?
        };
        Ok(CertificateAuthority {
            issuer,
            chain,
            roots,
        })
    }

    /// Creates a new self-signed root in `dir` (all four files; the key readable by root only).
    pub fn init(dir: &Path, trust_domain: &str) -> Result<(), CaError> {
        let files = [CA_CERT, CA_KEY, ROOT_CERT, CERT_CHAIN].map(|f| dir.join(f));
        if let Some(existing) = files.iter().find(|p| p.exists()) {
            return Err(CaError::Exists(existing.clone()));
        }
        fs::create_dir_all(dir).map_err(|source| CaError::Write {
            path: dir.to_owned(),
            source,
        })?;
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(CaError::Generate)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, trust_domain);
        dn.push(DnType::CommonName, "weft root CA");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = SystemTime::now();
        params.not_before = (now - CLOCK_SKEW_ALLOWANCE).into();
        params.not_after = (now + Duration::from_secs(10 * 365 * 24 * 3600)).into();
        params.serial_number = Some(random_serial());
        let cert = params.self_signed(&key).map_err(CaError::Generate)?;
        let cert_pem = cert.pem();
        let write = |name: &str, body: &str| {
            let path = dir.join(name);
            fs::write(&path, body).map_err(|source| CaError::Write { path, source })
        };
        write(CA_CERT, &cert_pem)?;
        write(ROOT_CERT, &cert_pem)?;
        write(CERT_CHAIN, &cert_pem)?;
        write(CA_KEY, &key.serialize_pem())?;
        set_owner_only(&dir.join(CA_KEY))
    }
}

fn set_owner_only(path: &Path) -> Result<(), CaError> {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path, fs::Permissions::from_mode(0o600)).map_err(|source| CaError::Write {
        path: path.to_owned(),
        source,
    })
}

fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    // A positive DER INTEGER: clear the top bit.
    bytes[0] &= 0x7f;
    SerialNumber::from_slice(&bytes)
}

impl CertificateAuthority {
    /// Signs a certificate for `identity` here and now: a new P-256 key and one ECDSA
    /// signature, well under a millisecond.
    pub fn issue(
        &self,
        identity: &Identity,
        ttl: Duration,
    ) -> Result<WorkloadCertificate, CaError> {
        let sign_err = |source| CaError::Sign {
            identity: identity.to_string(),
            source,
        };
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(sign_err)?;
        let uri = identity.to_string().try_into().map_err(sign_err)?;
        let (params, not_before, not_after) = leaf_params(vec![SanType::URI(uri)], ttl);
        let leaf = params.signed_by(&key, &self.issuer).map_err(sign_err)?;
        Ok(WorkloadCertificate {
            identity: identity.clone(),
            chain: self.with_chain(leaf.der().clone()),
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            not_before,
            not_after,
        })
    }

    /// Signs the holder's own public key from a certificate request as `identity`. Only the
    /// key is taken from the request (whose signature rcgen verified when parsing it):
    /// names, usages and lifetime are the CA's. Returns the chain, leaf first.
    pub fn sign_request(
        &self,
        request: CertificateSigningRequestParams,
        identity: &Identity,
        ttl: Duration,
    ) -> Result<Vec<CertificateDer<'static>>, CaError> {
        let sign_err = |source| CaError::Sign {
            identity: identity.to_string(),
            source,
        };
        let uri = identity.to_string().try_into().map_err(sign_err)?;
        let (params, _, _) = leaf_params(vec![SanType::URI(uri)], ttl);
        let request = CertificateSigningRequestParams {
            params,
            public_key: request.public_key,
        };
        let leaf = request.signed_by(&self.issuer).map_err(sign_err)?;
        Ok(self.with_chain(leaf.der().clone()))
    }

    /// A serving certificate with DNS names (the CA service's own TLS), from this CA.
    pub fn issue_for_names(
        &self,
        names: &[String],
        ttl: Duration,
    ) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), CaError> {
        let sign_err = |source| CaError::Sign {
            identity: names.join(","),
            source,
        };
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(sign_err)?;
        let sans = names
            .iter()
            .map(|n| n.clone().try_into().map(SanType::DnsName))
            .collect::<Result<Vec<_>, _>>()
            .map_err(sign_err)?;
        let (params, _, _) = leaf_params(sans, ttl);
        let leaf = params.signed_by(&key, &self.issuer).map_err(sign_err)?;
        Ok((
            self.with_chain(leaf.der().clone()),
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        ))
    }

    /// The roots peers must chain to (root-cert.pem; two during a root rotation).
    pub fn root_certificates(&self) -> &[CertificateDer<'static>] {
        &self.roots
    }

    fn with_chain(&self, leaf: CertificateDer<'static>) -> Vec<CertificateDer<'static>> {
        let mut chain = Vec::with_capacity(1 + self.chain.len());
        chain.push(leaf);
        chain.extend(self.chain.iter().cloned());
        chain
    }
}

/// The parameters of every certificate weft's CA signs: no subject (the SAN is the identity,
/// as in Istio), both TLS usages, a random serial, valid from a little before now.
fn leaf_params(sans: Vec<SanType>, ttl: Duration) -> (CertificateParams, SystemTime, SystemTime) {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = sans;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    let now = SystemTime::now();
    let not_before = now - CLOCK_SKEW_ALLOWANCE;
    let not_after = now + ttl;
    params.not_before = not_before.into();
    params.not_after = not_after.into();
    params.serial_number = Some(random_serial());
    (params, not_before, not_after)
}

impl CertificateSigner for CertificateAuthority {
    /// Signs inline, on the calling task: key generation and one ECDSA signature take well
    /// under a millisecond and happen once per identity per half-lifetime, so a hop to the
    /// blocking pool would cost more (a thread hand-off, perhaps a thread start) than it saves.
    fn sign<'a>(&'a self, identity: &'a Identity, ttl: Duration) -> SignFuture<'a> {
        Box::pin(async move { self.issue(identity, ttl) })
    }

    fn roots(&self) -> Vec<CertificateDer<'static>> {
        self.roots.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_then_sign() {
        let dir = tempfile::tempdir().unwrap();
        CertificateAuthority::init(dir.path(), "cluster.local").unwrap();
        assert!(matches!(
            CertificateAuthority::init(dir.path(), "cluster.local"),
            Err(CaError::Exists(_))
        ));
        let ca = CertificateAuthority::load(dir.path()).unwrap();
        let id = Identity::new("cluster.local", "shop", "cart");
        let cert = ca.issue(&id, Duration::from_secs(3600)).unwrap();
        assert_eq!(cert.chain.len(), 2);
        let ids = super::super::cert::spiffe_identities(&cert.chain[0]).unwrap();
        assert_eq!(ids, vec![id]);
    }
}
