//! `/config_dump` in ztunnel's JSON shape, so `istioctl ztunnel-config workloads|services|
//! policies|certificates` reads weft as it reads ztunnel: lists of workloads, services (with
//! their endpoints), policies (rules as nested lists of matches) and certificates, and a
//! `workloadState` map of the pods this node proxies. weft's own extras sit under `weft`.

use crate::capture::enroll::CapturedSummary;
use serde_json::{json, Map, Value};

use crate::authz::{Action, Match, Policy, Scope, ServiceAccountMatch, StringMatch};
use crate::state::{
    GatewayAddress, GatewayDestination, HealthStatus, Protocol, Snapshot, Workload,
};

pub fn workloads(snap: &Snapshot) -> Value {
    Value::Array(snap.workloads.values().map(|w| workload(w)).collect())
}

fn gateway(g: &GatewayAddress) -> Value {
    let destination = match &g.destination {
        GatewayDestination::Hostname {
            namespace,
            hostname,
        } => format!("{namespace}/{hostname}"),
        GatewayDestination::Address { network, address } => format!("{network}/{address}"),
    };
    json!({ "destination": destination, "hboneMtlsPort": g.hbone_mtls_port })
}

fn workload(w: &Workload) -> Value {
    let mut v = json!({
        "uid": w.uid,
        "workloadIps": w.workload_ips.iter().map(|ip| ip.to_string()).collect::<Vec<_>>(),
        "protocol": match w.protocol { Protocol::HBONE => "HBONE", Protocol::TCP => "TCP" },
        "name": w.name,
        "namespace": w.namespace,
        "serviceAccount": w.service_account,
        "workloadName": w.workload_name,
        "workloadType": "pod",
        "canonicalName": w.canonical_name,
        "canonicalRevision": w.canonical_revision,
        "clusterId": w.cluster_id,
        "trustDomain": w.trust_domain,
        "node": w.node,
        "network": w.network,
        "status": match w.status { HealthStatus::Healthy => "Healthy", HealthStatus::Unhealthy => "Unhealthy" },
        "hostname": w.hostname,
        "capacity": 1,
        "authorizationPolicies": w.authorization_policies,
    });
    if let Some(o) = v.as_object_mut() {
        if let Some(g) = &w.waypoint {
            o.insert("waypoint".into(), gateway(g));
        }
        if let Some(g) = &w.network_gateway {
            o.insert("networkGateway".into(), gateway(g));
        }
        if !w.labels.is_empty() {
            o.insert("labels".into(), json!(w.labels));
        }
        if let Some(ns) = &w.netns {
            o.insert("netns".into(), json!(ns));
        }
    }
    v
}

pub fn services(snap: &Snapshot) -> Value {
    let list = snap.services.values().map(|s| {
        let key = s.key();
        let endpoints: Map<String, Value> = snap
            .endpoints
            .get(&key)
            .into_iter()
            .flat_map(|eps| eps.iter())
            .map(|(uid, ep)| {
                let port: Map<String, Value> = s
                    .ports
                    .keys()
                    .map(|p| (p.to_string(), json!(ep.target_port(s, *p))))
                    .collect();
                (
                    format!("{key}/{uid}"),
                    json!({
                        "workloadUid": uid,
                        "service": key.to_string(),
                        "address": ep.workload.workload_ips.first().map(|ip| ip.to_string()),
                        "port": port,
                    }),
                )
            })
            .collect();
        let ports: Map<String, Value> = s
            .ports
            .iter()
            .map(|(p, t)| (p.to_string(), json!(t)))
            .collect();
        let mut v = json!({
            "name": s.name,
            "namespace": s.namespace,
            "hostname": s.hostname,
            "vips": s.vips.iter().map(|ip| format!("/{ip}")).collect::<Vec<_>>(),
            "ports": ports,
            "endpoints": endpoints,
            "subjectAltNames": s.subject_alt_names,
            "ipFamilies": "IPv4",
        });
        if let (Some(g), Some(o)) = (&s.waypoint, v.as_object_mut()) {
            o.insert("waypoint".into(), gateway(g));
        }
        v
    });
    Value::Array(list.collect())
}

fn string_match(m: &StringMatch) -> Value {
    match m {
        StringMatch::Exact(s) => json!({ "Exact": s }),
        StringMatch::Prefix(s) => json!({ "Prefix": s }),
        StringMatch::Suffix(s) => json!({ "Suffix": s }),
        StringMatch::Presence => json!({ "Presence": {} }),
    }
}

fn policy_match(m: &Match) -> Value {
    let strings = |v: &[StringMatch]| v.iter().map(string_match).collect::<Vec<_>>();
    let nets = |v: &[ipnet::IpNet]| v.iter().map(|n| n.to_string()).collect::<Vec<_>>();
    let accounts = |v: &[ServiceAccountMatch]| {
        v.iter()
            .map(|a| json!({ "namespace": a.namespace, "serviceAccount": a.service_account }))
            .collect::<Vec<_>>()
    };
    let mut o = Map::new();
    let mut put = |k: &str, v: Vec<Value>| {
        if !v.is_empty() {
            o.insert(k.into(), Value::Array(v));
        }
    };
    put("namespaces", strings(&m.namespaces));
    put("notNamespaces", strings(&m.not_namespaces));
    put("principals", strings(&m.principals));
    put("notPrincipals", strings(&m.not_principals));
    put("serviceAccounts", accounts(&m.service_accounts));
    put("notServiceAccounts", accounts(&m.not_service_accounts));
    put(
        "sourceIps",
        nets(&m.source_ips).into_iter().map(Value::from).collect(),
    );
    put(
        "notSourceIps",
        nets(&m.not_source_ips)
            .into_iter()
            .map(Value::from)
            .collect(),
    );
    put(
        "destinationIps",
        nets(&m.destination_ips)
            .into_iter()
            .map(Value::from)
            .collect(),
    );
    put(
        "notDestinationIps",
        nets(&m.not_destination_ips)
            .into_iter()
            .map(Value::from)
            .collect(),
    );
    put(
        "destinationPorts",
        m.destination_ports.iter().map(|p| json!(p)).collect(),
    );
    put(
        "notDestinationPorts",
        m.not_destination_ports.iter().map(|p| json!(p)).collect(),
    );
    Value::Object(o)
}

fn policy(p: &Policy) -> Value {
    let rules: Vec<Value> = p
        .rules
        .iter()
        .map(|r| {
            Value::Array(
                r.clauses
                    .iter()
                    .map(|c| Value::Array(c.matches.iter().map(policy_match).collect()))
                    .collect(),
            )
        })
        .collect();
    let mut v = json!({
        "name": p.name,
        "namespace": p.namespace,
        "scope": match &p.scope {
            Scope::Global => "Global",
            Scope::Namespace => "Namespace",
            Scope::WorkloadSelector { .. } => "WorkloadSelector",
        },
        "action": match p.action { Action::Allow => "Allow", Action::Deny => "Deny" },
        "rules": rules,
        "dryRun": p.dry_run,
    });
    if let Some(o) = v.as_object_mut() {
        if let Scope::WorkloadSelector { match_labels } = &p.scope {
            if !match_labels.is_empty() {
                o.insert("matchLabels".into(), json!(match_labels));
            }
        }
        if !p.warnings.is_empty() {
            o.insert("warnings".into(), json!(p.warnings));
        }
    }
    v
}

pub fn policies(snap: &Snapshot) -> Value {
    Value::Array(snap.policies.policies().map(policy).collect())
}

/// `workloadState`: the pods this node proxies, by uid (the Kubernetes pod UID for pods the
/// CNI layer handed over, as ztunnel keys them; else the workload uid).
pub fn workload_state(captured: &[CapturedSummary]) -> Value {
    let states: Map<String, Value> = captured
        .iter()
        .map(|c| {
            (
                c.pod_uid.clone().unwrap_or_else(|| c.uid.clone()),
                json!({
                    "state": "Up",
                    "info": {
                        "name": c.info.name,
                        "namespace": c.info.namespace,
                        "trustDomain": c.info.trust_domain,
                        "serviceAccount": c.info.service_account,
                    },
                }),
            )
        })
        .collect();
    Value::Object(states)
}
