//! `weft ca serve` against the real Kubernetes API: tokens minted with the TokenRequest API
//! and bound to pods, reviewed with TokenReview; node agents get certificates only for
//! identities with a pod on their node, everyone else only their own; bad tokens, foreign
//! requests and bad CSRs are refused with the right status while others keep being served.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::apiserver::ApiServer;
use prost_types::{value::Kind, Struct, Value};
use rcgen::{CertificateParams, KeyPair, SanType, PKCS_ECDSA_P256_SHA256};
use tonic::Code;
use weft::ca_service::authn::KubeApi;
use weft::ca_service::{CaService, CaServiceSettings};
use weft::grpc::{GrpcTarget, TokenFile};
use weft::identity::istio_ca::{IstioCa, IstioCaSettings};
use weft::identity::{CertificateAuthority, CertificateSigner, Identity};
use weft::proto::ca::istio_certificate_service_client::IstioCertificateServiceClient;
use weft::proto::ca::IstioCertificateRequest;

const SERVER_NAME: &str = "weft-ca.weft-system.svc";

fn manifests() -> String {
    let pod = |ns: &str, name: &str, sa: &str, node: &str| {
        format!("---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}}}\nspec: {{nodeName: {node}, serviceAccountName: {sa}, containers: [{{name: c, image: c}}]}}\n")
    };
    let ns_sa = |ns: &str, sa: &str| {
        format!("---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: {ns}}}\n---\napiVersion: v1\nkind: ServiceAccount\nmetadata: {{name: {sa}, namespace: {ns}}}\n")
    };
    [
        ns_sa("weft-system", "weft"),
        ns_sa("shop", "cart"),
        ns_sa("bank", "vault"),
        pod("weft-system", "weft-a", "weft", "node-a"),
        pod("weft-system", "weft-b", "weft", "node-b"),
        pod("shop", "cart-1", "cart", "node-a"),
        pod("bank", "vault-1", "vault", "node-b"),
    ]
    .concat()
}

struct Setup {
    api: ApiServer,
    ca_dir: tempfile::TempDir,
    tokens: tempfile::TempDir,
}

impl Setup {
    fn token_file(
        &self,
        name: &str,
        ns: &str,
        sa: &str,
        aud: &str,
        pod: Option<&str>,
    ) -> TokenFile {
        let path = self.tokens.path().join(name);
        std::fs::write(&path, self.api.token(ns, sa, aud, pod)).unwrap();
        TokenFile { path }
    }

    fn target(&self, service: &CaService) -> GrpcTarget {
        GrpcTarget {
            address: format!("https://127.0.0.1:{}", service.addr.port()),
            root_cert: self.ca_dir.path().join("root-cert.pem"),
            server_name: Some(SERVER_NAME.into()),
        }
    }

    /// A CA client as weft's node agent uses it, running as `as_identity`.
    fn client(&self, service: &CaService, token: TokenFile, as_identity: Identity) -> IstioCa {
        IstioCa::new(IstioCaSettings {
            target: self.target(service),
            token: Some(token),
            cluster_id: "Kubernetes".into(),
            node_identity: Some(as_identity),
            trust_domain: "cluster.local".into(),
        })
        .expect("CA client")
    }

    async fn start(&self, burst: u32) -> CaService {
        self.start_with(self.ca_dir.path(), burst).await
    }

    async fn start_with(&self, ca_dir: &std::path::Path, burst: u32) -> CaService {
        let client = weft::k8s::client(&weft::k8s::KubeSettings {
            kubeconfig: Some(self.api.kubeconfig()),
            domain_suffix: String::new(),
            auto_allocate_vips: true,
        })
        .await
        .unwrap();
        let api = Arc::new(KubeApi { client });
        CaService::start(
            CaServiceSettings {
                ca_dir: ca_dir.to_owned(),
                listen: "127.0.0.1:0".parse().unwrap(),
                metrics_listen: "127.0.0.1:0".parse().unwrap(),
                server_names: vec![SERVER_NAME.into()],
                trust_domain: "cluster.local".into(),
                audience: "istio-ca".into(),
                node_agents: vec!["weft-system/weft".into()],
                max_ttl: Duration::from_secs(3600),
                rate_per_second: 0.01,
                burst,
            },
            api.clone(),
            api,
        )
        .await
        .expect("CA service starts")
    }
}

fn id(ns: &str, sa: &str) -> Identity {
    Identity::new("cluster.local", ns, sa)
}

fn csr(san: &str) -> String {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let mut p = CertificateParams::default();
    p.subject_alt_names = vec![SanType::URI(san.to_string().try_into().unwrap())];
    p.serialize_request(&key).unwrap().pem().unwrap()
}

/// A raw CreateCertificate, for requests weft's own client would never make.
async fn raw(
    target: &GrpcTarget,
    token: &str,
    csr: String,
    impersonate: Option<&str>,
    ttl: i64,
) -> Result<Vec<String>, tonic::Status> {
    let channel = weft::grpc::channel(target).unwrap();
    let mut client = IstioCertificateServiceClient::new(channel).max_encoding_message_size(1 << 22);
    let metadata = impersonate.map(|who| Struct {
        fields: [(
            "ImpersonatedIdentity".to_string(),
            Value {
                kind: Some(Kind::StringValue(who.into())),
            },
        )]
        .into(),
    });
    let mut req = tonic::Request::new(IstioCertificateRequest {
        csr,
        validity_duration: ttl,
        metadata,
    });
    req.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    client
        .create_certificate(req)
        .await
        .map(|r| r.into_inner().cert_chain)
}

/// `token` signed again with the API server's service-account key, its lifetime moved into
/// the past if `expire`: a genuine token, expired (TokenRequest will not mint one shorter than
/// ten minutes).
fn resigned(token: &str, sa_key: &std::path::Path, expire: bool) -> String {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
    use base64::Engine;
    let mut parts = token.trim().split('.');
    let (header, payload) = (parts.next().unwrap(), parts.next().unwrap());
    let mut claims: serde_json::Value =
        serde_json::from_slice(&B64.decode(payload).unwrap()).unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    if expire {
        claims["iat"] = (now - 7200).into();
        claims["nbf"] = (now - 7200).into();
        claims["exp"] = (now - 3600).into();
    }
    let signing_input = format!("{header}.{}", B64.encode(claims.to_string()));
    let mut openssl = std::process::Command::new("openssl")
        .args(["dgst", "-sha256", "-sign"])
        .arg(sa_key)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("openssl");
    use std::io::Write;
    openssl
        .stdin
        .take()
        .unwrap()
        .write_all(signing_input.as_bytes())
        .unwrap();
    let out = openssl.wait_with_output().unwrap();
    assert!(out.status.success());
    format!("{signing_input}.{}", B64.encode(out.stdout))
}

fn code_of(e: &weft::identity::CaError) -> String {
    format!("{e:?}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_agents_get_only_their_nodes_identities() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    common::logs();
    let setup = Setup {
        api: ApiServer::start(),
        ca_dir: tempfile::tempdir().unwrap(),
        tokens: tempfile::tempdir().unwrap(),
    };
    CertificateAuthority::init(setup.ca_dir.path(), "cluster.local").unwrap();
    setup.api.apply_yaml(&manifests());
    let service = setup.start(1000).await;
    let target = setup.target(&service);
    let agent = id("weft-system", "weft");

    // Node A's agent: the identity of a pod on node A, yes; of a pod only on node B, no.
    let node_a = setup.token_file("a", "weft-system", "weft", "istio-ca", Some("weft-a"));
    let ca_a = setup.client(&service, node_a.clone(), agent.clone());
    let cert = ca_a
        .sign(&id("shop", "cart"), Duration::from_secs(600))
        .await
        .expect("node A gets shop/cart");
    let leaf = x509_parser::parse_x509_certificate(&cert.chain[0])
        .unwrap()
        .1;
    let uris: Vec<String> = leaf
        .subject_alternative_name()
        .unwrap()
        .unwrap()
        .value
        .general_names
        .iter()
        .map(|n| format!("{n:?}"))
        .collect();
    assert!(
        uris.iter()
            .any(|u| u.contains("spiffe://cluster.local/ns/shop/sa/cart")),
        "{uris:?}"
    );
    let lifetime = leaf.validity().not_after.timestamp() - leaf.validity().not_before.timestamp();
    assert!(
        lifetime <= 600 + 300,
        "requested lifetime honoured: {lifetime}"
    );
    let denied = ca_a
        .sign(&id("bank", "vault"), Duration::from_secs(600))
        .await
        .unwrap_err();
    assert!(code_of(&denied).contains("PermissionDenied"), "{denied:?}");
    // Node B's agent gets bank/vault.
    let node_b = setup.token_file("b", "weft-system", "weft", "istio-ca", Some("weft-b"));
    setup
        .client(&service, node_b, agent.clone())
        .sign(&id("bank", "vault"), Duration::from_secs(600))
        .await
        .expect("node B gets bank/vault");

    // Bad tokens: forged, for another audience, not bound to a pod (node agents must be).
    let token_a = std::fs::read_to_string(&node_a.path).unwrap();
    let cart_csr = || csr("spiffe://cluster.local/ns/shop/sa/cart");
    let cart = "spiffe://cluster.local/ns/shop/sa/cart";
    let forged = format!("{}x", token_a.trim());
    let e = raw(&target, &forged, cart_csr(), Some(cart), 600)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    let e = raw(&target, "", cart_csr(), Some(cart), 600)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    let other_aud = setup
        .api
        .token("weft-system", "weft", "other", Some("weft-a"));
    let e = raw(&target, &other_aud, cart_csr(), Some(cart), 600)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    // Expired: the same claims signed again pass review, with their lifetime in the past not.
    let sa_key = setup.api.dir().join("pki/sa.key");
    raw(
        &target,
        &resigned(&token_a, &sa_key, false),
        cart_csr(),
        Some(cart),
        600,
    )
    .await
    .expect("re-signed with its own lifetime: accepted");
    let e = raw(
        &target,
        &resigned(&token_a, &sa_key, true),
        cart_csr(),
        Some(cart),
        600,
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "expired: {e:?}");
    let unbound = setup.api.token("weft-system", "weft", "istio-ca", None);
    let e = raw(&target, &unbound, cart_csr(), Some(cart), 600)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");

    // A CSR naming another identity than the authorized one; malformed and oversized CSRs.
    let e = raw(
        &target,
        &token_a,
        csr("spiffe://cluster.local/ns/bank/sa/vault"),
        Some(cart),
        600,
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    let e = raw(&target, &token_a, "not a csr".into(), Some(cart), 600)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let e = raw(&target, &token_a, "A".repeat(200_000), Some(cart), 600)
        .await
        .unwrap_err();
    assert_ne!(e.code(), Code::Ok, "{e:?}");
    // ...and the same caller is still served, with the lifetime capped at the maximum.
    let chain = raw(&target, &token_a, cart_csr(), Some(cart), 10 * 86_400)
        .await
        .expect("served");
    let leaf_pem = pem::parse(&chain[0]).unwrap();
    let leaf = x509_parser::parse_x509_certificate(leaf_pem.contents())
        .unwrap()
        .1;
    let lifetime = leaf.validity().not_after.timestamp() - leaf.validity().not_before.timestamp();
    assert!(lifetime <= 3600 + 300, "capped at the maximum: {lifetime}");
    assert_eq!(chain.len(), 2, "leaf and root");

    // Any other caller: its own identity only.
    let cart_token = setup.token_file("cart", "shop", "cart", "istio-ca", Some("cart-1"));
    let as_cart = setup.client(&service, cart_token.clone(), id("shop", "cart"));
    let e = as_cart
        .sign(&id("bank", "vault"), Duration::from_secs(600))
        .await
        .unwrap_err();
    assert!(code_of(&e).contains("PermissionDenied"), "{e:?}");
    let cart_raw = std::fs::read_to_string(&cart_token.path).unwrap();
    raw(&target, cart_raw.trim(), cart_csr(), None, 600)
        .await
        .expect("own identity without impersonation");

    // Audit lines and metrics.
    let logs = common::logs();
    assert!(
        logs.lines_with("certificate issued")
            .iter()
            .any(|l| l.contains("weft-system/weft (pod weft-a)") && l.contains("shop/sa/cart")),
        "audit line names caller and identity"
    );
    assert!(
        logs.lines_with("certificate request refused")
            .iter()
            .any(|l| l.contains(
                "no pod of spiffe://cluster.local/ns/bank/sa/vault is scheduled on node node-a"
            )),
        "refusal names the reason"
    );
    let m = common::http_get(service.metrics_addr, "/metrics").await;
    assert_eq!(
        common::metric(
            &m,
            "weft_ca_certificates_issued_total",
            &["impersonated=\"true\""]
        ),
        Some(4.0),
        "{m}"
    );
    assert_eq!(
        common::metric(
            &m,
            "weft_ca_requests_refused_total",
            &["code=\"Unauthenticated\""]
        ),
        Some(5.0),
        "{m}"
    );

    // Rate limit per caller: a second replica with a burst of two.
    let limited = setup.start(2).await;
    let t = setup.target(&limited);
    for _ in 0..2 {
        raw(&t, &token_a, cart_csr(), Some(cart), 600)
            .await
            .expect("within the burst");
    }
    let e = raw(&t, &token_a, cart_csr(), Some(cart), 600)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    raw(&t, cart_raw.trim(), cart_csr(), None, 600)
        .await
        .expect("another caller has its own budget");

    // Root rotation: a CA with a new root; nodes whose bundle holds both roots keep working,
    // a bundle with the old root alone does not trust the new CA.
    let new_root = tempfile::tempdir().unwrap();
    CertificateAuthority::init(new_root.path(), "cluster.local").unwrap();
    let rotated = setup.start_with(new_root.path(), 1000).await;
    let bundle = setup.tokens.path().join("bundle.pem");
    std::fs::write(
        &bundle,
        [
            std::fs::read_to_string(setup.ca_dir.path().join("root-cert.pem")).unwrap(),
            std::fs::read_to_string(new_root.path().join("root-cert.pem")).unwrap(),
        ]
        .concat(),
    )
    .unwrap();
    let with = |roots: &std::path::Path| {
        IstioCa::new(IstioCaSettings {
            target: GrpcTarget {
                root_cert: roots.to_owned(),
                ..setup.target(&rotated)
            },
            token: Some(node_a.clone()),
            cluster_id: "Kubernetes".into(),
            node_identity: Some(agent.clone()),
            trust_domain: "cluster.local".into(),
        })
        .unwrap()
    };
    with(&bundle)
        .sign(&id("shop", "cart"), Duration::from_secs(600))
        .await
        .expect("a two-root bundle trusts the new root");
    with(&setup.ca_dir.path().join("root-cert.pem"))
        .sign(&id("shop", "cart"), Duration::from_secs(600))
        .await
        .expect_err("the old root alone does not");
}
