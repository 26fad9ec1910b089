//! CPU-only benchmarks of the per-connection work that is not moving bytes:
//!
//! - `authz_10k/*`: `PolicySet::evaluate` with 10 000 policies loaded. `spread` is a mesh where
//!   they are spread over 500 namespaces (the index narrows a decision to ~20); `all_apply` has
//!   every policy apply to the destination, 5 000 DENY that miss and 5 000 ALLOW of which only
//!   the last matches (the worst case: a linear walk). `index_build` is the cost of indexing the
//!   10 000 on a configuration change.
//! - `metrics/*`: building a connection's Istio label set (`ConnLabels::new`), and the whole
//!   per-connection metrics cost: a `ConnectionGuard` opened and dropped (one lookup of the
//!   label set's shared counters, one close counter, one access-log line formatted at `info`
//!   into a discarded writer).
//!
//! See BENCHMARKS.md.

mod support;

use std::collections::BTreeMap;
use std::hint::black_box;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};

use weft::authz::{
    Action, Clause, ConnFacts, Match, Policy, PolicySet, Rule, Scope, StringMatch, Target,
};
use weft::identity::Identity;
use weft::metrics::access_log::{AccessLogEntry, Direction};
use weft::metrics::connection::ConnectionGuard;
use weft::metrics::labels::{ConnLabels, Peers, Reporter};
use weft::metrics::Metrics;
use weft::state::local::{parse, Defaults};
use weft::state::StateStore;

const POLICIES: usize = 10_000;

/// One policy whose single rule needs a principal from `principals` and a port from `ports`.
fn policy(
    name: String,
    namespace: String,
    scope: Scope,
    action: Action,
    principals: Vec<String>,
    ports: Vec<u16>,
) -> Policy {
    let from = Clause {
        matches: vec![Match {
            principals: principals.into_iter().map(StringMatch::Exact).collect(),
            ..Match::default()
        }],
    };
    let to = Clause {
        matches: vec![Match {
            destination_ports: ports,
            ..Match::default()
        }],
    };
    Policy {
        name,
        namespace,
        scope,
        action,
        rules: vec![Rule {
            clauses: vec![from, to],
        }],
        dry_run: false,
        warnings: Vec::new(),
    }
}

fn selector(app: String) -> Scope {
    Scope::WorkloadSelector {
        match_labels: BTreeMap::from([("app".to_string(), app)]),
    }
}

/// 500 namespaces × 20 policies: per namespace 5 DENY and 5 ALLOW namespace-wide, and 10 ALLOW
/// selecting one app each.
fn spread() -> Vec<Policy> {
    let mut out = Vec::with_capacity(POLICIES);
    for ns in 0..POLICIES / 20 {
        let namespace = format!("ns-{ns}");
        for i in 0..5 {
            out.push(policy(
                format!("deny-{i}"),
                namespace.clone(),
                Scope::Namespace,
                Action::Deny,
                vec![format!("cluster.local/ns/intruders/sa/sa-{i}")],
                vec![],
            ));
            out.push(policy(
                format!("allow-{i}"),
                namespace.clone(),
                Scope::Namespace,
                Action::Allow,
                vec![format!("cluster.local/ns/ns-{}/sa/sa-{i}", (ns + 1) % 500)],
                vec![8080, 9090],
            ));
        }
        for i in 0..10 {
            out.push(policy(
                format!("app-{i}"),
                namespace.clone(),
                selector(format!("app-{i}")),
                Action::Allow,
                vec![format!("cluster.local/ns/ns-{ns}/sa/client-{i}")],
                vec![8080],
            ));
        }
    }
    out
}

/// 10 000 namespace-wide policies in the destination's namespace: 5 000 DENY naming other
/// principals, then 5 000 ALLOW of which only the last names the client.
fn all_apply() -> Vec<Policy> {
    let ns = "shop".to_string();
    let mut out = Vec::with_capacity(POLICIES);
    for i in 0..POLICIES / 2 {
        out.push(policy(
            format!("deny-{i}"),
            ns.clone(),
            Scope::Namespace,
            Action::Deny,
            vec![format!("cluster.local/ns/other/sa/sa-{i}")],
            vec![],
        ));
    }
    for i in 0..POLICIES / 2 {
        let who = if i + 1 == POLICIES / 2 {
            "cluster.local/ns/web/sa/frontend".to_string()
        } else {
            format!("cluster.local/ns/web/sa/sa-{i}")
        };
        out.push(policy(
            format!("allow-{i}"),
            ns.clone(),
            Scope::Namespace,
            Action::Allow,
            vec![who],
            vec![8080],
        ));
    }
    out
}

fn authz(c: &mut Criterion) {
    let mut g = c.benchmark_group("authz_10k");
    g.warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(2));
    let src: IpAddr = [10, 250, 1, 2].into();
    let dst: IpAddr = [10, 250, 2, 2].into();

    let spread_set = PolicySet::new(spread(), "istio-system".into());
    let labels = BTreeMap::from([
        ("app".to_string(), "app-3".to_string()),
        ("version".to_string(), "v1".to_string()),
    ]);
    let target = Target {
        namespace: "ns-250",
        labels: &labels,
        policy_names: &[],
    };
    let conn = ConnFacts {
        source_ip: src,
        source_principal: Some("cluster.local/ns/ns-250/sa/client-3"),
        source_namespace: Some("ns-250"),
        destination_ip: dst,
        destination_port: 8080,
    };
    assert!(
        spread_set.evaluate(&target, &conn).is_allowed(),
        "the spread case should end in an ALLOW"
    );
    g.bench_function("spread", |b| {
        b.iter(|| spread_set.evaluate(black_box(&target), black_box(&conn)))
    });

    let worst = PolicySet::new(all_apply(), "istio-system".into());
    let none = BTreeMap::new();
    let target = Target {
        namespace: "shop",
        labels: &none,
        policy_names: &[],
    };
    let conn = ConnFacts {
        source_principal: Some("cluster.local/ns/web/sa/frontend"),
        source_namespace: Some("web"),
        ..conn
    };
    assert!(
        worst.evaluate(&target, &conn).is_allowed(),
        "the worst case should end in an ALLOW by the last policy"
    );
    g.bench_function("all_apply", |b| {
        b.iter(|| worst.evaluate(black_box(&target), black_box(&conn)))
    });

    let policies = spread();
    g.sample_size(10);
    g.bench_function("index_build", |b| {
        b.iter_batched(
            || policies.clone(),
            |p| PolicySet::new(p, "istio-system".into()),
            BatchSize::LargeInput,
        )
    });
    g.finish();
}

const WORKLOADS: &str = r#"
workloads:
- uid: frontend-7d9f-abc12
  name: frontend-7d9f-abc12
  namespace: web
  serviceAccount: frontend
  workloadName: frontend
  canonicalName: frontend
  canonicalRevision: v3
  workloadIps: ["10.250.1.2"]
  protocol: HBONE
  node: node-a
- uid: cart-5c4b-xyz89
  name: cart-5c4b-xyz89
  namespace: shop
  serviceAccount: cart
  workloadName: cart
  canonicalName: cart
  canonicalRevision: v1
  workloadIps: ["10.250.2.2"]
  protocol: HBONE
  node: node-b
  services:
    shop/cart.shop.svc.cluster.local: {80: 8080}
services:
- name: cart
  namespace: shop
  hostname: cart.shop.svc.cluster.local
  vips: ["/10.250.128.10"]
  ports: {80: 8080}
"#;

fn metrics(c: &mut Criterion) {
    let defaults = Defaults {
        trust_domain: "cluster.local".into(),
        cluster_id: "Kubernetes".into(),
    };
    let data = match parse(WORKLOADS, Path::new("bench.yaml"), &defaults) {
        Ok(file) => file.data,
        Err(e) => panic!("benchmark config: {e}"),
    };
    let store = StateStore::new("istio-system");
    store.replace_source("bench", data);
    let snap = store.snapshot();
    let (Some(src), Some(dst)) = (
        snap.workload_by_uid("frontend-7d9f-abc12"),
        snap.workload_by_uid("cart-5c4b-xyz89"),
    ) else {
        panic!("benchmark workloads missing from the snapshot");
    };
    let svc = snap.services_of(&dst.uid).next().cloned();
    let (src_id, dst_id): (Identity, Identity) = (src.identity(), dst.identity());
    let peers = Peers {
        source: Some(src),
        source_identity: Some(&src_id),
        destination: Some(dst),
        destination_identity: Some(&dst_id),
        destination_service: svc.as_deref(),
    };

    let mut g = c.benchmark_group("metrics");
    g.warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(2));
    g.bench_function("conn_labels_new", |b| {
        b.iter(|| ConnLabels::new(Reporter::source, black_box(&peers), true))
    });

    let metrics = Arc::new(Metrics::new());
    let from = SocketAddr::from(([10, 250, 1, 2], 40000));
    let to = SocketAddr::from(([10, 250, 2, 2], 8080));
    g.bench_function("guard_open_close", |b| {
        b.iter(|| {
            let labels = ConnLabels::new(Reporter::source, &peers, true);
            let mut entry = AccessLogEntry::new(Direction::Outbound, from, to);
            entry.protocol = "HBONE";
            let mut guard = ConnectionGuard::open(metrics.clone(), labels, entry);
            guard.counters().to_server.inc_by(1024);
            guard.set_bytes(1024, 1024);
        })
    });
    g.finish();
}

fn config() -> Criterion {
    support::quiet_logging();
    Criterion::default()
}

criterion_group! {
    name = control;
    config = config();
    targets = authz, metrics
}
criterion_main!(control);
