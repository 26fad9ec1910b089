//! The CA client against a real gRPC server on loopback: TLS with a test root, tonic serving
//! `IstioCertificateService`, answers that are right and answers that are wrong.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
    PKCS_ECDSA_P256_SHA256,
};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tonic::{Request, Response, Status};

use super::*;
use crate::identity::CaError;
use crate::proto::ca::istio_certificate_service_server::{
    IstioCertificateService, IstioCertificateServiceServer,
};
use crate::proto::ca::IstioCertificateResponse;

const SERVER_NAME: &str = "istiod.istio-system.svc";
const TOKEN: &str = "node-agent-token";
const CLUSTER: &str = "Kubernetes";

fn node_identity() -> Identity {
    Identity::new("cluster.local", "istio-system", "ztunnel")
}

fn workload() -> Identity {
    Identity::new("cluster.local", "shop", "cart")
}

/// A CA certificate and the issuer that signs with it.
struct TestRoot {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

impl TestRoot {
    fn new(name: &str) -> Self {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = params.self_signed(&key).unwrap();
        TestRoot {
            pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// An intermediate CA under this root.
    fn intermediate(&self, name: &str) -> TestRoot {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        TestRoot {
            pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }
}

/// How the test server answers.
#[derive(Clone, Copy, Debug)]
enum Answer {
    /// Signs the CSR under the mesh root, through an intermediate.
    Correct,
    /// Signs, but for another identity than the CSR's.
    WrongSan,
    /// Signs under a root the client does not trust.
    OtherRoot,
    /// Refuses, as a node check would.
    Deny,
}

/// What the server saw of one request.
#[derive(Clone, Debug, Default)]
struct Seen {
    authorization: Option<String>,
    cluster_id: Option<String>,
    impersonated: Option<String>,
    csr_uris: Vec<String>,
    validity: i64,
}

struct TestCa {
    intermediate: TestRoot,
    root_pem: String,
    other: TestRoot,
    answer: Mutex<Answer>,
    seen: Mutex<Vec<Seen>>,
}

fn leaf_params(
    csr: &CertificateSigningRequestParams,
    validity: i64,
) -> CertificateSigningRequestParams {
    let mut csr = csr.clone();
    let now = SystemTime::now();
    csr.params.not_before = (now - Duration::from_secs(60)).into();
    csr.params.not_after = (now + Duration::from_secs(validity.max(1) as u64)).into();
    csr.params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    csr.params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    csr.params.use_authority_key_identifier_extension = true;
    csr
}

#[tonic::async_trait]
impl IstioCertificateService for TestCa {
    async fn create_certificate(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        let header = |name: &str| {
            request
                .metadata()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let (authorization, cluster_id) = (header("authorization"), header("clusterid"));
        let body = request.get_ref();
        let impersonated = body
            .metadata
            .as_ref()
            .and_then(|m| m.fields.get(IMPERSONATED_IDENTITY))
            .and_then(|v| match &v.kind {
                Some(Kind::StringValue(s)) => Some(s.clone()),
                _ => None,
            });
        let csr = CertificateSigningRequestParams::from_pem(&body.csr)
            .map_err(|e| Status::invalid_argument(format!("bad CSR: {e}")))?;
        let csr_uris = csr
            .params
            .subject_alt_names
            .iter()
            .map(|san| match san {
                SanType::URI(u) => u.as_str().to_string(),
                other => format!("not a URI: {other:?}"),
            })
            .collect();
        self.seen.lock().unwrap().push(Seen {
            authorization,
            cluster_id,
            impersonated,
            csr_uris,
            validity: body.validity_duration,
        });

        let answer = *self.answer.lock().unwrap();
        let mut leaf = leaf_params(&csr, body.validity_duration);
        let chain = match answer {
            Answer::Deny => {
                return Err(Status::permission_denied(
                    "no instances of shop/cart found on node node-a",
                ))
            }
            Answer::Correct | Answer::WrongSan => {
                if matches!(answer, Answer::WrongSan) {
                    leaf.params.subject_alt_names = vec![SanType::URI(
                        "spiffe://cluster.local/ns/shop/sa/admin"
                            .try_into()
                            .unwrap(),
                    )];
                }
                let cert = leaf.signed_by(&self.intermediate.issuer).unwrap();
                // Like istiod: leaf, the chain, then the root bundle as one last string.
                vec![
                    cert.pem() + "\n",
                    self.intermediate.pem.clone(),
                    self.root_pem.clone(),
                ]
            }
            Answer::OtherRoot => {
                let cert = leaf.signed_by(&self.other.issuer).unwrap();
                vec![cert.pem(), self.other.pem.clone()]
            }
        };
        Ok(Response::new(IstioCertificateResponse {
            cert_chain: chain,
        }))
    }
}

/// The server on 127.0.0.1 and what the client needs to reach it.
struct Harness {
    ca: Arc<TestCa>,
    address: String,
    _dir: tempfile::TempDir,
    root_file: std::path::PathBuf,
    token_file: std::path::PathBuf,
    server: JoinHandle<()>,
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.server.abort();
    }
}

fn server_tls(root: &TestRoot) -> Arc<rustls::ServerConfig> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let params = CertificateParams::new(vec![SERVER_NAME.to_string()]).unwrap();
    let cert = params.signed_by(&key, &root.issuer).unwrap();
    crate::grpc::server_tls(
        vec![cert.der().clone()],
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
    )
    .unwrap()
}

async fn start() -> Harness {
    let root = TestRoot::new("mesh root");
    let ca = Arc::new(TestCa {
        intermediate: root.intermediate("istiod intermediate"),
        root_pem: root.pem.clone(),
        other: TestRoot::new("somebody else's root"),
        answer: Mutex::new(Answer::Correct),
        seen: Mutex::new(Vec::new()),
    });
    let dir = tempfile::tempdir().unwrap();
    let root_file = dir.path().join("root-cert.pem");
    std::fs::write(&root_file, &root.pem).unwrap();
    let token_file = dir.path().join("istio-token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = format!("https://{}", listener.local_addr().unwrap());
    let incoming = crate::grpc::tls_incoming(listener, server_tls(&root));
    let service = IstioCertificateServiceServer::from_arc(ca.clone());
    let server = tokio::spawn(async move {
        // One service, so no router: tonic's `router` feature is not needed.
        let _ = tonic::transport::Server::builder()
            .serve_with_incoming(service, incoming)
            .await;
    });
    Harness {
        ca,
        address,
        _dir: dir,
        root_file,
        token_file,
        server,
    }
}

fn settings(h: &Harness, root_file: &Path) -> IstioCaSettings {
    IstioCaSettings {
        target: GrpcTarget {
            address: h.address.clone(),
            root_cert: root_file.to_owned(),
            server_name: Some(SERVER_NAME.to_string()),
        },
        token: Some(TokenFile {
            path: h.token_file.clone(),
        }),
        cluster_id: CLUSTER.to_string(),
        node_identity: Some(node_identity()),
        trust_domain: "cluster.local".to_string(),
    }
}

fn client(h: &Harness) -> IstioCa {
    IstioCa::new(settings(h, &h.root_file)).unwrap()
}

fn remote(e: CaError) -> IstioCaError {
    match e {
        CaError::Remote(r) => *r,
        other => panic!("expected a CA client error, got {other}"),
    }
}

const TTL: Duration = Duration::from_secs(7200);

#[tokio::test]
async fn a_pod_identity_is_asked_for_on_its_behalf_and_checked() {
    let h = start().await;
    let ca = client(&h);
    let cert = ca.sign(&workload(), TTL).await.unwrap();

    let seen = h.ca.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1);
    let seen = &seen[0];
    assert_eq!(
        seen.authorization.as_deref(),
        Some("Bearer node-agent-token")
    );
    assert_eq!(seen.cluster_id.as_deref(), Some(CLUSTER));
    assert_eq!(
        seen.impersonated.as_deref(),
        Some("spiffe://cluster.local/ns/shop/sa/cart")
    );
    assert_eq!(
        seen.csr_uris,
        vec!["spiffe://cluster.local/ns/shop/sa/cart"]
    );
    assert_eq!(seen.validity, 7200);

    // Leaf and intermediate are presented; the root, which peers have, is not.
    assert_eq!(cert.identity, workload());
    assert_eq!(cert.chain.len(), 2);
    assert_eq!(
        crate::identity::cert::spiffe_identities(&cert.chain[0]).unwrap(),
        vec![workload()]
    );
    let life = cert.not_after.duration_since(cert.not_before).unwrap();
    assert_eq!(
        life,
        TTL + Duration::from_secs(60),
        "validity read from the leaf"
    );
    // The key is the one the leaf certifies: rustls accepts the pair.
    let provider = rustls::crypto::aws_lc_rs::default_provider();
    rustls::sign::CertifiedKey::from_der(cert.chain, cert.key, &provider).unwrap();
    assert_eq!(ca.roots().len(), 1);
}

#[tokio::test]
async fn weft_s_own_identity_is_asked_for_without_impersonation() {
    let h = start().await;
    let ca = client(&h);
    ca.sign(&node_identity(), TTL).await.unwrap();
    let seen = h.ca.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].impersonated, None);
    assert_eq!(
        seen[0].csr_uris,
        vec!["spiffe://cluster.local/ns/istio-system/sa/ztunnel"]
    );
    assert_eq!(
        seen[0].authorization.as_deref(),
        Some("Bearer node-agent-token")
    );
}

#[tokio::test]
async fn a_leaf_naming_another_identity_is_refused() {
    let h = start().await;
    *h.ca.answer.lock().unwrap() = Answer::WrongSan;
    let e = remote(client(&h).sign(&workload(), TTL).await.unwrap_err());
    assert!(matches!(e, IstioCaError::BadResponse { .. }), "{e}");
    let text = e.to_string();
    assert!(
        text.contains("spiffe://cluster.local/ns/shop/sa/admin"),
        "{text}"
    );
}

#[tokio::test]
async fn a_chain_to_another_root_is_refused() {
    let h = start().await;
    *h.ca.answer.lock().unwrap() = Answer::OtherRoot;
    let e = remote(client(&h).sign(&workload(), TTL).await.unwrap_err());
    let text = e.to_string();
    assert!(matches!(e, IstioCaError::BadResponse { .. }), "{text}");
    assert!(text.contains("does not verify to the mesh roots"), "{text}");
}

#[tokio::test]
async fn a_refusal_carries_its_status_and_message() {
    let h = start().await;
    *h.ca.answer.lock().unwrap() = Answer::Deny;
    let e = remote(client(&h).sign(&workload(), TTL).await.unwrap_err());
    match &e {
        IstioCaError::Refused { code, message, .. } => {
            assert_eq!(*code, tonic::Code::PermissionDenied);
            assert_eq!(message, "no instances of shop/cart found on node node-a");
        }
        other => panic!("expected a refusal, got {other}"),
    }
    assert_eq!(
        e.to_string(),
        "istiod refused a certificate for spiffe://cluster.local/ns/shop/sa/cart: \
         PermissionDenied: no instances of shop/cart found on node node-a"
    );
}

#[tokio::test]
async fn a_server_outside_the_roots_is_not_talked_to() {
    let h = start().await;
    // The client trusts only another root: the TLS handshake to the CA fails.
    let other = h._dir.path().join("other-root.pem");
    std::fs::write(&other, TestRoot::new("unrelated").pem).unwrap();
    let ca = IstioCa::new(settings(&h, &other)).unwrap();
    let e = remote(ca.sign(&workload(), TTL).await.unwrap_err());
    assert!(matches!(e, IstioCaError::Unreachable { .. }), "{e}");
    assert!(h.ca.seen.lock().unwrap().is_empty());
}

#[tokio::test]
async fn another_trust_domain_is_not_asked_for() {
    let h = start().await;
    let e = remote(
        client(&h)
            .sign(&Identity::new("elsewhere.org", "shop", "cart"), TTL)
            .await
            .unwrap_err(),
    );
    assert!(matches!(e, IstioCaError::ForeignTrustDomain { .. }), "{e}");
    assert!(h.ca.seen.lock().unwrap().is_empty());
}

#[test]
fn several_certificates_in_one_string_are_all_read() {
    let root = TestRoot::new("root");
    let mid = root.intermediate("mid");
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![SanType::URI(workload().to_string().try_into().unwrap())];
    let csr = CertificateSigningRequestParams::from_pem(
        &params.serialize_request(&key).unwrap().pem().unwrap(),
    )
    .unwrap();
    let leaf = leaf_params(&csr, 3600).signed_by(&mid.issuer).unwrap();
    let roots = vec![CertificateDer::from_pem_slice(root.pem.as_bytes()).unwrap()];
    let anchors: Vec<_> = roots
        .iter()
        .map(|r| webpki::anchor_from_trusted_cert(r).unwrap().to_owned())
        .collect();
    // The leaf and its intermediate in one string, the root in another.
    let chain = vec![leaf.pem() + &mid.pem, root.pem.clone()];
    let cert = accept_response(&workload(), &key, &chain, &roots, &anchors).unwrap();
    assert_eq!(cert.chain.len(), 2);

    // Without the intermediate the leaf does not chain.
    let short = vec![leaf.pem(), root.pem.clone()];
    let e = accept_response(&workload(), &key, &short, &roots, &anchors).unwrap_err();
    assert!(e.contains("does not verify"), "{e}");

    // A certificate for another key than the request's is refused.
    let other_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let e = accept_response(&workload(), &other_key, &chain, &roots, &anchors).unwrap_err();
    assert!(e.contains("other than the one in the request"), "{e}");

    // Nothing at all, or a string without PEM, is refused.
    assert!(accept_response(&workload(), &key, &[], &roots, &anchors).is_err());
    let e = accept_response(&workload(), &key, &["junk".into()], &roots, &anchors).unwrap_err();
    assert!(e.contains("no PEM certificate"), "{e}");
}
