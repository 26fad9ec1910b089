//! `weft ca serve` at load, against the real Kubernetes API server of the tests: certificates
//! issued per second by one CA replica (every request a TokenReview, a pod read and a pod
//! list, then one signature), the cost of the signature alone, and the time from a pod's
//! enrollment in a node agent's certificate manager to its certificate being served.
//!
//!   cargo bench --bench ca                    # needs `bash scripts/k8s-testenv.sh install`
//!   WEFT_BENCH_CA_REQUESTS=2000 WEFT_BENCH_CA_CONCURRENCY=16 cargo bench --bench ca

#[path = "../tests/common/apiserver.rs"]
#[allow(dead_code)]
mod apiserver;

use std::sync::Arc;
use std::time::{Duration, Instant};

use apiserver::ApiServer;
use weft::ca_service::authn::KubeApi;
use weft::ca_service::{CaService, CaServiceSettings};
use weft::grpc::{GrpcTarget, TokenFile};
use weft::identity::istio_ca::{IstioCa, IstioCaSettings};
use weft::identity::{CertManager, CertificateAuthority, CertificateSigner, Identity};

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

const MANIFESTS: &str = "apiVersion: v1\nkind: Namespace\nmetadata: {name: weft-system}\n---\napiVersion: v1\nkind: ServiceAccount\nmetadata: {name: weft, namespace: weft-system}\n---\napiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: weft-a, namespace: weft-system}\nspec: {nodeName: node-a, serviceAccountName: weft, containers: [{name: c, image: c}]}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: cart-1, namespace: shop}\nspec: {nodeName: node-a, serviceAccountName: cart, containers: [{name: c, image: c}]}\n";

fn main() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let requests = env("WEFT_BENCH_CA_REQUESTS", 1000);
    let concurrency = env("WEFT_BENCH_CA_CONCURRENCY", 8).max(1);
    let api = ApiServer::start();
    api.apply_yaml(MANIFESTS);
    let ca_dir = tempfile::tempdir().unwrap();
    CertificateAuthority::init(ca_dir.path(), "cluster.local").unwrap();
    let token = ca_dir.path().join("token");
    std::fs::write(
        &token,
        api.token("weft-system", "weft", "istio-ca", Some("weft-a")),
    )
    .unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        // The signature alone, on this thread.
        let ca = CertificateAuthority::load(ca_dir.path()).unwrap();
        let cart = Identity::new("cluster.local", "shop", "cart");
        let n = 2000;
        let t0 = Instant::now();
        for _ in 0..n {
            ca.issue(&cart, Duration::from_secs(3600)).unwrap();
        }
        let sign = t0.elapsed() / n;
        println!("ca/sign_only: {:.0} µs per certificate (key generation and signature)", sign.as_secs_f64() * 1e6);

        let client = weft::k8s::client(&weft::k8s::KubeSettings {
            kubeconfig: Some(api.kubeconfig()),
            domain_suffix: String::new(),
            auto_allocate_vips: true,
        })
        .await
        .unwrap();
        let kube = Arc::new(KubeApi { client });
        let service = CaService::start(
            CaServiceSettings {
                ca_dir: ca_dir.path().to_owned(),
                listen: "127.0.0.1:0".parse().unwrap(),
                metrics_listen: "127.0.0.1:0".parse().unwrap(),
                server_names: vec!["weft-ca.weft-system.svc".into()],
                trust_domain: "cluster.local".into(),
                audience: "istio-ca".into(),
                node_agents: vec!["weft-system/weft".into()],
                max_ttl: Duration::from_secs(86400),
                rate_per_second: 1e9,
                burst: u32::MAX,
            },
            kube.clone(),
            kube,
        )
        .await
        .unwrap();
        let signer = Arc::new(
            IstioCa::new(IstioCaSettings {
                target: GrpcTarget {
                    address: format!("https://127.0.0.1:{}", service.addr.port()),
                    root_cert: ca_dir.path().join("root-cert.pem"),
                    server_name: Some("weft-ca.weft-system.svc".into()),
                },
                token: Some(TokenFile { path: token }),
                cluster_id: "Kubernetes".into(),
                node_identity: Some(Identity::new("cluster.local", "weft-system", "weft")),
                trust_domain: "cluster.local".into(),
            })
            .unwrap(),
        );
        // Warm: the channel's connection, the API server's caches.
        signer.sign(&cart, Duration::from_secs(3600)).await.unwrap();

        let t0 = Instant::now();
        let per_task = requests.div_ceil(concurrency);
        let tasks: Vec<_> = (0..concurrency)
            .map(|_| {
                let (signer, cart) = (signer.clone(), cart.clone());
                tokio::spawn(async move {
                    let mut lat = Vec::with_capacity(per_task);
                    for _ in 0..per_task {
                        let t = Instant::now();
                        signer.sign(&cart, Duration::from_secs(3600)).await.unwrap();
                        lat.push(t.elapsed());
                    }
                    lat
                })
            })
            .collect();
        let mut lat = Vec::new();
        for t in tasks {
            lat.extend(t.await.unwrap());
        }
        let elapsed = t0.elapsed();
        lat.sort();
        println!(
            "ca/create_certificate: {} requests, {} concurrent: {:.0} certificates/s; latency p50 {:.2} ms, p99 {:.2} ms",
            lat.len(),
            concurrency,
            lat.len() as f64 / elapsed.as_secs_f64(),
            lat[lat.len() / 2].as_secs_f64() * 1e3,
            lat[lat.len() * 99 / 100].as_secs_f64() * 1e3,
        );

        // Enrollment to certificate: what a new pod waits for before its first connection.
        let manager = Arc::new(CertManager::new(
            signer.clone(),
            weft::hbone::tls::provider(),
            Duration::from_secs(3600),
        ));
        let mut waits = Vec::new();
        for i in 0..50 {
            let holder = format!("pod-{i}");
            let t = Instant::now();
            manager.enroll(&cart, &holder);
            manager
                .fetch_within(&cart, Duration::from_secs(10))
                .await
                .unwrap();
            waits.push(t.elapsed());
            // The last holder's release drops the certificate: the next enrollment asks again.
            manager.release(&cart, &holder);
        }
        waits.sort();
        println!(
            "ca/enroll_to_certificate: p50 {:.2} ms, max {:.2} ms (50 enrollments)",
            waits[waits.len() / 2].as_secs_f64() * 1e3,
            waits[waits.len() - 1].as_secs_f64() * 1e3,
        );
    });
}
