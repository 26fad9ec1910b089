//! The xDS source at scale: a full push of 10 000 workloads, 1 000 services and 1 000
//! policies over real gRPC and TLS (the protocol-faithful server of the tests) into a running
//! weft, then single-resource updates into that state. Reports the time until each push is
//! applied (ACKed), per-update latency, and the process's memory before and after.
//!
//!   cargo bench --bench xds            # defaults: 10000 workloads, 1000 services, 1000 policies
//!   WEFT_BENCH_WORKLOADS=50000 cargo bench --bench xds

#[path = "../tests/common/fake_xds.rs"]
#[allow(dead_code)]
mod fake_xds;

use std::time::{Duration, Instant};

use fake_xds::{resource, FakeIstiod, SAN};
use weft::config::Settings;
use weft::grpc::GrpcTarget;
use weft::identity::CertificateAuthority;
use weft::node::{Node, Sources};
use weft::proto::discovery::DeltaDiscoveryResponse;
use weft::proto::security as sec;
use weft::proto::workload as wl;
use weft::xds::{translate::Defaults, NodeIdentity, XdsSettings, ADDRESS_TYPE, AUTHORIZATION_TYPE};

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// (VmRSS, RssAnon) in KiB, from /proc/self/status.
fn memory() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("RssAnon:"))
}

fn workload(i: usize, services: usize, policies: usize) -> wl::Address {
    let ns = format!("ns{}", i % 100);
    let svc = format!("{ns}/svc{}.{ns}.svc.cluster.local", i % services.max(1));
    wl::Address {
        r#type: Some(wl::address::Type::Workload(wl::Workload {
            uid: format!("Kubernetes//Pod/{ns}/pod{i}"),
            name: format!("pod{i}"),
            namespace: ns.clone(),
            addresses: vec![vec![10, (i >> 16) as u8 | 64, (i >> 8) as u8, i as u8]],
            tunnel_protocol: wl::TunnelProtocol::Hbone as i32,
            service_account: format!("sa{}", i % 50),
            node: format!("node{}", i % 100),
            canonical_name: format!("app{}", i % services.max(1)),
            canonical_revision: "v1".into(),
            workload_name: format!("app{}", i % services.max(1)),
            services: [(
                svc,
                wl::PortList {
                    ports: vec![wl::Port {
                        service_port: 80,
                        target_port: 8080,
                        app_protocol: 0,
                    }],
                },
            )]
            .into(),
            authorization_policies: vec![format!("{ns}/policy{}", i % policies.max(1))],
            cluster_id: "Kubernetes".into(),
            ..Default::default()
        })),
    }
}

fn service(i: usize) -> wl::Address {
    let ns = format!("ns{}", i % 100);
    wl::Address {
        r#type: Some(wl::address::Type::Service(wl::Service {
            name: format!("svc{i}"),
            namespace: ns.clone(),
            hostname: format!("svc{i}.{ns}.svc.cluster.local"),
            addresses: vec![wl::NetworkAddress {
                network: String::new(),
                address: vec![10, 200, (i >> 8) as u8, i as u8],
                length: None,
            }],
            ports: vec![wl::Port {
                service_port: 80,
                target_port: 8080,
                app_protocol: 0,
            }],
            ..Default::default()
        })),
    }
}

fn policy(i: usize) -> sec::Authorization {
    let ns = format!("ns{}", i % 100);
    sec::Authorization {
        name: format!("policy{i}"),
        namespace: ns,
        scope: sec::Scope::WorkloadSelector as i32,
        action: sec::Action::Allow as i32,
        rules: vec![sec::Rule {
            clauses: vec![sec::Clause {
                matches: vec![sec::Match {
                    principals: vec![sec::StringMatch {
                        match_type: Some(sec::string_match::MatchType::Prefix(format!(
                            "cluster.local/ns/ns{}/",
                            i % 100
                        ))),
                    }],
                    destination_ports: vec![8080],
                    ..Default::default()
                }],
            }],
        }],
        ..Default::default()
    }
}

async fn acked(fake: &mut FakeIstiod, nonce: &str) {
    loop {
        let r = fake.request().await;
        if r.response_nonce == nonce {
            assert!(r.error_detail.is_none(), "NACK: {:?}", r.error_detail);
            return;
        }
    }
}

fn main() {
    let n_workloads = env("WEFT_BENCH_WORKLOADS", 10_000);
    let n_services = env("WEFT_BENCH_SERVICES", 1_000);
    let n_policies = env("WEFT_BENCH_POLICIES", 1_000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let ca = tempfile::tempdir().expect("tempdir");
        CertificateAuthority::init(ca.path(), "cluster.local").expect("CA");
        let mut fake = FakeIstiod::start().await;
        let mut settings = Settings {
            node_name: "bench-node".into(),
            ca_dir: ca.path().to_owned(),
            ..Settings::default()
        };
        settings.ports.admin = 0;
        settings.ports.metrics = 0;
        settings.ports.readiness = 0;
        settings.node_bind = std::net::Ipv4Addr::LOCALHOST.into();
        let xds = XdsSettings {
            target: GrpcTarget {
                address: fake.addr.to_string(),
                root_cert: fake.root_cert.clone(),
                server_name: Some(SAN.into()),
            },
            token: None,
            node: NodeIdentity {
                pod_name: "bench".into(),
                pod_namespace: "istio-system".into(),
                node_name: "bench-node".into(),
                cluster_id: "Kubernetes".into(),
                ..NodeIdentity::default()
            },
            defaults: Defaults {
                trust_domain: "cluster.local".into(),
                cluster_id: "Kubernetes".into(),
            },
            node_name: "bench-node".into(),
            find_netns: true,
        };
        let node = Node::start(
            settings,
            Sources {
                xds: Some(xds),
                ..Sources::default()
            },
            None,
            None,
        )
        .await
        .expect("node");
        fake.request().await;
        fake.request().await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        let (rss0, anon0) = memory();

        let resources: Vec<_> = (0..n_workloads)
            .map(|i| {
                let a = workload(i, n_services, n_policies);
                let name = match &a.r#type {
                    Some(wl::address::Type::Workload(w)) => w.uid.clone(),
                    _ => unreachable!(),
                };
                resource(ADDRESS_TYPE, &name, "1", &a)
            })
            .chain((0..n_services).map(|i| {
                let ns = format!("ns{}", i % 100);
                resource(
                    ADDRESS_TYPE,
                    &format!("{ns}/svc{i}.{ns}.svc.cluster.local"),
                    "1",
                    &service(i),
                )
            }))
            .collect();
        let policies: Vec<_> = (0..n_policies)
            .map(|i| {
                resource(
                    AUTHORIZATION_TYPE,
                    &format!("ns{}/policy{i}", i % 100),
                    "1",
                    &policy(i),
                )
            })
            .collect();

        let t0 = Instant::now();
        fake.push(DeltaDiscoveryResponse {
            type_url: ADDRESS_TYPE.into(),
            nonce: "full".into(),
            resources,
            ..Default::default()
        })
        .await;
        acked(&mut fake, "full").await;
        let address_push = t0.elapsed();
        let t0 = Instant::now();
        fake.push(DeltaDiscoveryResponse {
            type_url: AUTHORIZATION_TYPE.into(),
            nonce: "policies".into(),
            resources: policies,
            ..Default::default()
        })
        .await;
        acked(&mut fake, "policies").await;
        let policy_push = t0.elapsed();
        let snap = node.ctx.state.snapshot();
        assert_eq!(snap.workloads.len(), n_workloads);
        assert_eq!(snap.policies.len(), n_policies);
        tokio::time::sleep(Duration::from_secs(11)).await; // one malloc_trim period
        let (rss1, anon1) = memory();

        // Single-workload updates into the full state: what pod churn costs.
        let mut lat = Vec::new();
        for round in 0..200 {
            let i = round * 37 % n_workloads;
            let mut a = workload(i, n_services, n_policies);
            if let Some(wl::address::Type::Workload(w)) = &mut a.r#type {
                w.canonical_revision = format!("v{round}");
            }
            let nonce = format!("u{round}");
            let t0 = Instant::now();
            fake.push(DeltaDiscoveryResponse {
                type_url: ADDRESS_TYPE.into(),
                nonce: nonce.clone(),
                resources: vec![resource(
                    ADDRESS_TYPE,
                    &format!("Kubernetes//Pod/ns{}/pod{i}", i % 100),
                    &format!("{}", round + 2),
                    &a,
                )],
                ..Default::default()
            })
            .await;
            acked(&mut fake, &nonce).await;
            lat.push(t0.elapsed());
        }
        lat.sort();
        // One policy changed: the policy index is rebuilt, the workloads are untouched.
        let mut plat = Vec::new();
        for round in 0..50 {
            let nonce = format!("p{round}");
            let mut p = policy(round);
            p.dry_run = round % 2 == 0;
            let t0 = Instant::now();
            fake.push(DeltaDiscoveryResponse {
                type_url: AUTHORIZATION_TYPE.into(),
                nonce: nonce.clone(),
                resources: vec![resource(
                    AUTHORIZATION_TYPE,
                    &format!("ns{}/policy{round}", round % 100),
                    &format!("{}", round + 2),
                    &p,
                )],
                ..Default::default()
            })
            .await;
            acked(&mut fake, &nonce).await;
            plat.push(t0.elapsed());
        }
        plat.sort();
        let pct = |v: &[Duration], p: usize| v[(v.len() * p / 100).min(v.len() - 1)];
        println!(
            "xds bench: {n_workloads} workloads, {n_services} services, {n_policies} policies"
        );
        println!(
            "  full Address push applied+ACKed: {:.1} ms",
            address_push.as_secs_f64() * 1e3
        );
        println!(
            "  full Authorization push applied+ACKed: {:.1} ms",
            policy_push.as_secs_f64() * 1e3
        );
        println!(
            "  one workload update (push→ACK) p50 {:.0} µs, p99 {:.0} µs",
            pct(&lat, 50).as_secs_f64() * 1e6,
            pct(&lat, 99).as_secs_f64() * 1e6
        );
        println!(
            "  one policy update (push→ACK) p50 {:.0} µs, p99 {:.0} µs",
            pct(&plat, 50).as_secs_f64() * 1e6,
            pct(&plat, 99).as_secs_f64() * 1e6
        );
        println!(
            "  memory: VmRSS {:.1} → {:.1} MiB (+{:.1}), RssAnon {:.1} → {:.1} MiB (+{:.1})",
            rss0 as f64 / 1024.0,
            rss1 as f64 / 1024.0,
            (rss1.saturating_sub(rss0)) as f64 / 1024.0,
            anon0 as f64 / 1024.0,
            anon1 as f64 / 1024.0,
            (anon1.saturating_sub(anon0)) as f64 / 1024.0
        );
        drop(node);
    });
}
