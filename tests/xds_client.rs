//! weft's xDS client against a protocol-faithful delta-ADS server (tests/common/fake_xds.rs):
//! what a real istiod cannot be made to send — a malformed resource next to good ones, a stream
//! cut at a chosen moment — and exactly what weft answers.

mod common;

use std::time::Duration;

use common::fake_xds::{resource, FakeIstiod, SAN};
use common::*;

use weft::grpc::GrpcTarget;
use weft::node::{Node, Sources};
use weft::proto::discovery::DeltaDiscoveryResponse;
use weft::proto::security as sec;
use weft::proto::workload as wl;
use weft::xds::{translate::Defaults, NodeIdentity, XdsSettings, ADDRESS_TYPE, AUTHORIZATION_TYPE};

fn workload(uid: &str, ip: Vec<u8>) -> wl::Address {
    wl::Address {
        r#type: Some(wl::address::Type::Workload(wl::Workload {
            uid: uid.into(),
            name: uid.into(),
            namespace: "shop".into(),
            addresses: vec![ip],
            tunnel_protocol: wl::TunnelProtocol::Hbone as i32,
            service_account: "client".into(),
            node: "elsewhere".into(),
            ..Default::default()
        })),
    }
}

fn service() -> wl::Address {
    wl::Address {
        r#type: Some(wl::address::Type::Service(wl::Service {
            name: "web".into(),
            namespace: "shop".into(),
            hostname: "web.shop.svc.cluster.local".into(),
            addresses: vec![wl::NetworkAddress {
                network: String::new(),
                address: vec![10, 250, 128, 10],
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

fn policy(name: &str, port: u32) -> sec::Authorization {
    sec::Authorization {
        name: name.into(),
        namespace: "shop".into(),
        scope: sec::Scope::Namespace as i32,
        action: sec::Action::Deny as i32,
        rules: vec![sec::Rule {
            clauses: vec![sec::Clause {
                matches: vec![sec::Match {
                    destination_ports: vec![port],
                    ..Default::default()
                }],
            }],
        }],
        ..Default::default()
    }
}

async fn start(fake: &FakeIstiod) -> Node {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    logs();
    let xds = XdsSettings {
        target: GrpcTarget {
            address: fake.addr.to_string(),
            root_cert: fake.root_cert.clone(),
            server_name: Some(SAN.into()),
        },
        token: None,
        node: NodeIdentity {
            pod_name: "ztunnel-x".into(),
            pod_namespace: "istio-system".into(),
            pod_ip: "10.250.0.9".into(),
            node_name: "node-x".into(),
            cluster_id: "Kubernetes".into(),
            metadata: [("ENABLE_HBONE".to_string(), "true".to_string())].into(),
        },
        defaults: Defaults {
            trust_domain: "cluster.local".into(),
            cluster_id: "Kubernetes".into(),
        },
        node_name: "node-x".into(),
        find_netns: true,
    };
    Node::start(
        settings("node-x"),
        Sources {
            xds: Some(xds),
            ..Sources::default()
        },
        None,
        None,
    )
    .await
    .expect("node starts")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nacks_a_bad_resource_applies_the_rest_and_resumes_from_what_it_holds() {
    let mut fake = FakeIstiod::start().await;
    let node = start(&fake).await;

    // Introduces itself as ztunnel does, once per type, holding nothing yet.
    let mut types = Vec::new();
    for _ in 0..2 {
        let req = fake.request().await;
        let n = req.node.as_ref().expect("node on the initial request");
        assert_eq!(
            n.id,
            "ztunnel~10.250.0.9~ztunnel-x.istio-system~istio-system.svc.cluster.local"
        );
        let meta = &n.metadata.as_ref().expect("metadata").fields;
        for (k, v) in [
            ("NODE_NAME", "node-x"),
            ("CLUSTER_ID", "Kubernetes"),
            ("ENABLE_HBONE", "true"),
        ] {
            let got = meta.get(k).and_then(|v| match &v.kind {
                Some(prost_types::value::Kind::StringValue(s)) => Some(s.as_str()),
                _ => None,
            });
            assert_eq!(got, Some(v), "metadata {k}");
        }
        assert!(req.initial_resource_versions.is_empty());
        types.push(req.type_url);
    }
    types.sort();
    assert_eq!(
        types,
        vec![AUTHORIZATION_TYPE.to_string(), ADDRESS_TYPE.to_string()]
    );
    assert!(
        !node.readiness.is_ready(),
        "not ready before the first push"
    );

    // One response: two good resources and a workload with a 3-byte address.
    fake.push(DeltaDiscoveryResponse {
        type_url: ADDRESS_TYPE.into(),
        nonce: "n1".into(),
        resources: vec![
            resource(
                ADDRESS_TYPE,
                "Kubernetes//Pod/shop/w1",
                "v1",
                &workload("Kubernetes//Pod/shop/w1", vec![10, 250, 3, 1]),
            ),
            resource(
                ADDRESS_TYPE,
                "Kubernetes//Pod/shop/bad",
                "v1",
                &workload("Kubernetes//Pod/shop/bad", vec![10, 250, 3]),
            ),
            resource(
                ADDRESS_TYPE,
                "shop/web.shop.svc.cluster.local",
                "v1",
                &service(),
            ),
        ],
        ..Default::default()
    })
    .await;
    let nack = fake.request().await;
    assert_eq!(nack.response_nonce, "n1");
    let detail = nack.error_detail.expect("a NACK");
    assert!(
        detail.message.contains("Kubernetes//Pod/shop/bad")
            && detail.message.contains("addresses[0]"),
        "{}",
        detail.message
    );
    let snap = node.ctx.state.snapshot();
    assert!(
        snap.workload_by_uid("Kubernetes//Pod/shop/w1").is_some(),
        "the good workload is applied"
    );
    assert!(snap.workload_by_uid("Kubernetes//Pod/shop/bad").is_none());
    assert!(snap
        .service_by_vip("10.250.128.10".parse().unwrap())
        .is_some());

    // Policies: one good, one with a port out of range.
    fake.push(DeltaDiscoveryResponse {
        type_url: AUTHORIZATION_TYPE.into(),
        nonce: "p1".into(),
        resources: vec![
            resource(
                AUTHORIZATION_TYPE,
                "shop/deny-80",
                "v1",
                &policy("deny-80", 80),
            ),
            resource(
                AUTHORIZATION_TYPE,
                "shop/bad-port",
                "v1",
                &policy("bad-port", 70_000),
            ),
        ],
        ..Default::default()
    })
    .await;
    let nack = fake.request().await;
    assert_eq!(nack.response_nonce, "p1");
    assert!(nack.error_detail.expect("a NACK").message.contains("70000"));
    let snap = node.ctx.state.snapshot();
    assert!(snap.policies.get("shop/deny-80").is_some());
    assert!(snap.policies.get("shop/bad-port").is_none());
    eventually("ready after both first pushes", || {
        node.readiness.is_ready()
    })
    .await;

    // A clean update is ACKed; a removal takes the workload out.
    fake.push(DeltaDiscoveryResponse {
        type_url: ADDRESS_TYPE.into(),
        nonce: "n2".into(),
        removed_resources: vec!["Kubernetes//Pod/shop/w1".into()],
        resources: vec![resource(
            ADDRESS_TYPE,
            "Kubernetes//Pod/shop/w2",
            "v7",
            &workload("Kubernetes//Pod/shop/w2", vec![10, 250, 3, 2]),
        )],
        ..Default::default()
    })
    .await;
    let ack = fake.request().await;
    assert_eq!(ack.response_nonce, "n2");
    assert!(ack.error_detail.is_none(), "an ACK: {:?}", ack.error_detail);
    let snap = node.ctx.state.snapshot();
    assert!(snap.workload_by_uid("Kubernetes//Pod/shop/w1").is_none());
    assert!(snap.workload_by_ip("10.250.3.2".parse().unwrap()).is_some());

    // The stream is cut: weft keeps its state and comes back saying what it holds.
    fake.cut().await;
    let mut resumed = std::collections::BTreeMap::new();
    for _ in 0..2 {
        let req = fake.request().await;
        resumed.insert(req.type_url.clone(), req.initial_resource_versions);
    }
    assert_eq!(
        resumed[ADDRESS_TYPE],
        [
            ("Kubernetes//Pod/shop/w2".to_string(), "v7".to_string()),
            (
                "shop/web.shop.svc.cluster.local".to_string(),
                "v1".to_string()
            ),
        ]
        .into(),
        "what weft holds, without the refused or removed resources"
    );
    assert_eq!(
        resumed[AUTHORIZATION_TYPE],
        [("shop/deny-80".to_string(), "v1".to_string())].into()
    );
    let snap = node.ctx.state.snapshot();
    assert!(
        snap.workload_by_ip("10.250.3.2".parse().unwrap()).is_some(),
        "state kept across the cut"
    );
    assert!(node.readiness.is_ready());
    drop(node);
    tokio::time::sleep(Duration::from_millis(10)).await;
}
