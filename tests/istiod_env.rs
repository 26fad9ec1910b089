//! The test control plane itself: a real kube-apiserver (TokenRequest, TokenReview) and a real
//! istiod (self-signed CA, ambient) from scripts/k8s-testenv.sh, as weft's xDS and CA clients
//! will meet them.

mod common;

use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::pem::PemObject;
use serde_json::Value;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use common::apiserver::ApiServer;
use common::istio::Istiod;

/// The certificates of a PEM file; panics unless there is at least one and each parses.
fn pem_certs(path: &std::path::Path) -> Vec<CertificateDer<'static>> {
    let text = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&text)
        .collect::<Result<_, _>>()
        .unwrap_or_else(|e| panic!("{}: not PEM: {e:?}", path.display()));
    assert!(!certs.is_empty(), "{}: no certificate", path.display());
    certs
}

/// TLS to istiod's xDS/CA port, verifying its certificate against `roots` for `name`, with
/// ALPN h2 as a gRPC client would; returns the server's leaf certificate.
async fn tls_handshake(
    addr: std::net::SocketAddr,
    roots: &[CertificateDer<'static>],
    name: &str,
) -> Result<CertificateDer<'static>, String> {
    let mut store = RootCertStore::empty();
    for c in roots {
        store.add(c.clone()).map_err(|e| e.to_string())?;
    }
    let mut cfg = ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(store)
    .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let server_name = ServerName::try_from(name.to_string()).map_err(|e| e.to_string())?;
    let tls = tokio::time::timeout(
        Duration::from_secs(10),
        TlsConnector::from(Arc::new(cfg)).connect(server_name, tcp),
    )
    .await
    .map_err(|_| "TLS handshake timed out".to_string())?
    .map_err(|e| e.to_string())?;
    let (_, conn) = tls.get_ref();
    assert_eq!(conn.alpn_protocol(), Some(&b"h2"[..]), "istiod speaks h2");
    Ok(conn.peer_certificates().expect("server certificate")[0].clone())
}

async fn http_status(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let resp = common::http_get(addr, path).await;
    let code = resp
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("GET {path}: not HTTP: {resp:.200}"));
    let body = resp
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (code, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apiserver_tokens_and_istiod_ca_and_xds_port() {
    let api = ApiServer::start();
    let mut istiod = Istiod::start(&api);

    // The mesh root: one self-signed CA certificate, the same as in istiod's CA secret.
    let roots = pem_certs(&istiod.root_cert());
    let (_, root) = x509_parser::parse_x509_certificate(&roots[0]).expect("root parses as X.509");
    assert!(root.is_ca(), "the mesh root is a CA certificate");
    assert_eq!(root.subject(), root.issuer(), "self-signed root");
    let secret_ca = api.kubectl(&[
        "-n",
        "istio-system",
        "get",
        "secret",
        "istio-ca-secret",
        "-o",
        "jsonpath={.data.ca-cert\\.pem}",
    ]);
    assert!(!secret_ca.trim().is_empty(), "istio-ca-secret holds the CA");

    // TokenRequest for a ServiceAccount, bound to a Pod that exists as an API object; TokenReview
    // with istiod's audience accepts it and names the Pod (what istiod's CA checks).
    api.apply_yaml(
        r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: client, namespace: shop}
---
apiVersion: v1
kind: Pod
metadata: {name: client-0, namespace: shop}
spec:
  nodeName: node-a
  serviceAccountName: client
  containers: [{name: app, image: app}]
"#,
    );
    let token = api.token("shop", "client", "istio-ca", Some("client-0"));
    let review = api.kubectl_stdin(
        &["create", "-o", "json", "-f", "-"],
        &format!(
            r#"{{"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
                "spec": {{"token": "{token}", "audiences": ["istio-ca"]}}}}"#
        ),
    );
    let review: Value = serde_json::from_str(&review).expect("TokenReview JSON");
    let status = &review["status"];
    assert_eq!(status["authenticated"], true, "{review}");
    assert_eq!(
        status["user"]["username"], "system:serviceaccount:shop:client",
        "{review}"
    );
    assert_eq!(
        status["user"]["extra"]["authentication.kubernetes.io/pod-name"][0], "client-0",
        "{review}"
    );
    assert_eq!(status["audiences"][0], "istio-ca", "{review}");
    // A token for another audience is refused for istio-ca.
    let other = api.token("shop", "client", "someone-else", None);
    let refused = api.kubectl_stdin(
        &["create", "-o", "json", "-f", "-"],
        &format!(
            r#"{{"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
                "spec": {{"token": "{other}", "audiences": ["istio-ca"]}}}}"#
        ),
    );
    let refused: Value = serde_json::from_str(&refused).expect("TokenReview JSON");
    assert_ne!(refused["status"]["authenticated"], true, "{refused}");

    // istiod's HTTP port: ready, and its debug endpoints answer.
    let (code, body) = http_status(istiod.debug_addr(), "/ready").await;
    assert_eq!(code, 200, "/ready: {body}");
    let (code, body) = http_status(istiod.debug_addr(), "/debug/syncz").await;
    assert_eq!(code, 200, "/debug/syncz: {body}");
    assert!(
        serde_json::from_str::<Value>(body.trim()).is_ok_and(|v| v.is_array()),
        "/debug/syncz is a JSON list: {body:.300}"
    );

    // The xDS/CA port serves a certificate for the SAN, signed by the mesh root.
    let leaf = tls_handshake(istiod.xds_addr(), &roots, &istiod.san())
        .await
        .unwrap_or_else(|e| panic!("TLS to istiod as {}: {e}", istiod.san()));
    let (_, leaf) = x509_parser::parse_x509_certificate(&leaf).expect("leaf parses");
    assert_ne!(
        leaf.subject(),
        leaf.issuer(),
        "istiod's certificate is not the root"
    );
    assert!(
        tls_handshake(istiod.xds_addr(), &roots, "not-istiod.example")
            .await
            .is_err(),
        "a wrong server name is refused"
    );

    // A restart keeps the ports and the CA.
    let (xds, root_before) = (
        istiod.xds_addr(),
        std::fs::read(istiod.root_cert()).unwrap(),
    );
    let pid = istiod.pid();
    istiod.restart(Duration::from_millis(500));
    assert_ne!(istiod.pid(), pid, "a new istiod process");
    assert_eq!(istiod.xds_addr(), xds, "same xDS port");
    assert_eq!(
        std::fs::read(istiod.root_cert()).unwrap(),
        root_before,
        "same CA"
    );
    tls_handshake(istiod.xds_addr(), &roots, &istiod.san())
        .await
        .expect("TLS after the restart");
    assert!(
        istiod.plaintext_addr().port() != 0 && istiod.log().exists(),
        "plaintext port and log"
    );
}
