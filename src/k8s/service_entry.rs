//! Istio's `ServiceEntry` and `WorkloadEntry` (`networking.istio.io`) → services and workloads,
//! as istiod builds them for ztunnel, for the Kubernetes-direct mode.
//!
//! - A WorkloadEntry is a workload (a VM, an address outside the cluster's pods): HBONE when it
//!   is enrolled in the mesh (`ambient.istio.io/redirection: enabled`, or the label
//!   `networking.istio.io/tunnel: http`), plain TCP otherwise. Never captured by a weft: nothing
//!   of it runs in a pod here.
//! - A ServiceEntry is one service per host, in its namespace: VIPs from `spec.addresses`, else
//!   the addresses allocated in `status.addresses` (istiod's auto-allocation), else ones weft
//!   allocates itself (see [`allocate`]); ports with their target ports (the port number when
//!   unset). Its endpoints are the pods and WorkloadEntries of its namespace that its
//!   `workloadSelector` selects, or its inline `endpoints` (each a workload of its own), or,
//!   with `resolution: DNS` and neither, the host itself: an endpoint known by name, looked
//!   up when a connection picks it. `resolution: NONE` makes the service a passthrough one
//!   (connections go to the address dialled). `location` changes nothing at L4: istiod sends
//!   ztunnel nothing for it either.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use k8s_openapi::api::core::v1::Pod;
use kube::api::DynamicObject;
use serde::Deserialize;

use super::translate::{ClusterFacts, RejectedPolicy};
use super::waypoint;
use crate::state::{HealthStatus, Locality, Protocol, Service, SourceData, Workload};

mod allocate;

const REDIRECTION_ANNOTATION: &str = "ambient.istio.io/redirection";
const TUNNEL_LABEL: &str = "networking.istio.io/tunnel";
/// A ServiceEntry labelled with it `"false"` gets no allocated addresses (Istio's opt-out).
const AUTOALLOCATE_LABEL: &str = "networking.istio.io/enable-autoallocate-ip";

/// How a ServiceEntry's endpoints are found. Istio's default is NONE.
#[derive(Deserialize, Default, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
enum Resolution {
    #[default]
    None,
    Static,
    Dns,
    DnsRoundRobin,
    DynamicDns,
}

impl Resolution {
    fn by_dns(self) -> bool {
        matches!(
            self,
            Resolution::Dns | Resolution::DnsRoundRobin | Resolution::DynamicDns
        )
    }
}

/// Validated only: at L4 the location changes nothing.
#[derive(Deserialize, Default, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
enum Location {
    #[default]
    MeshExternal,
    MeshInternal,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
struct WorkloadEntrySpec {
    address: String,
    ports: BTreeMap<String, u32>,
    labels: BTreeMap<String, String>,
    network: String,
    service_account: String,
    /// `region/zone/subzone`, any part empty.
    locality: String,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
struct ServiceEntrySpec {
    hosts: Vec<String>,
    addresses: Vec<String>,
    ports: Vec<SePort>,
    endpoints: Vec<WorkloadEntrySpec>,
    workload_selector: Option<Selector>,
    subject_alt_names: Vec<String>,
    resolution: Resolution,
    #[serde(rename = "location")]
    _location: Location,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
struct SePort {
    number: u32,
    name: String,
    target_port: u32,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct Selector {
    labels: BTreeMap<String, String>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct SeStatus {
    addresses: Vec<AllocatedAddress>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct AllocatedAddress {
    value: String,
    host: String,
}

/// A WorkloadEntry as a ServiceEntry's selector sees it.
struct SelectableEntry {
    uid: String,
    labels: BTreeMap<String, String>,
    /// Its port numbers by port name.
    ports: BTreeMap<String, u32>,
}

/// One object's identity and parsed spec.
struct Entry<'a, S> {
    obj: &'a DynamicObject,
    namespace: String,
    name: String,
    spec: S,
}

fn parse<'a, S: for<'de> Deserialize<'de> + Default>(
    obj: &'a DynamicObject,
    kind: &str,
    rejected: &mut Vec<RejectedPolicy>,
) -> Option<Entry<'a, S>> {
    let namespace = obj
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    let name = obj.metadata.name.clone().unwrap_or_default();
    let spec = match obj.data.get("spec") {
        None => S::default(),
        Some(v) => match S::deserialize(v) {
            Ok(s) => s,
            Err(e) => {
                rejected.push(RejectedPolicy {
                    key: format!("{namespace}/{name} ({kind})"),
                    error: format!("spec: {e}"),
                });
                return None;
            }
        },
    };
    Some(Entry {
        obj,
        namespace,
        name,
        spec,
    })
}

fn label_map(obj: &DynamicObject) -> BTreeMap<String, String> {
    obj.metadata.labels.clone().unwrap_or_default()
}

/// istiod's rule for a WorkloadEntry (and a ServiceEntry's own endpoints): HBONE when the
/// object says it is redirected into the mesh, or tunnels natively.
fn tunnel(labels: &BTreeMap<String, String>, obj: &DynamicObject) -> Protocol {
    let annotated = obj
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(REDIRECTION_ANNOTATION))
        .is_some_and(|v| v == "enabled");
    if annotated || labels.get(TUNNEL_LABEL).is_some_and(|v| v == "http") {
        Protocol::HBONE
    } else {
        Protocol::TCP
    }
}

/// The workload a WorkloadEntry spec stands for (of a WorkloadEntry, or inline in a
/// ServiceEntry).
fn entry_workload(
    uid: String,
    name: &str,
    namespace: &str,
    spec: &WorkloadEntrySpec,
    labels: BTreeMap<String, String>,
    protocol: Protocol,
    facts: &ClusterFacts,
) -> Workload {
    let (workload_ips, hostname) = match spec.address.parse::<IpAddr>() {
        Ok(ip) => (vec![ip], String::new()),
        Err(_) => (Vec::new(), spec.address.clone()),
    };
    let pick = |keys: &[&str]| keys.iter().find_map(|k| labels.get(*k).cloned());
    Workload {
        uid,
        name: name.to_string(),
        namespace: namespace.to_string(),
        service_account: if spec.service_account.is_empty() {
            "default".into()
        } else {
            spec.service_account.clone()
        },
        trust_domain: facts.trust_domain.clone(),
        workload_ips,
        hostname,
        protocol,
        network: spec.network.clone(),
        cluster_id: facts.cluster_id.clone(),
        canonical_name: pick(&[
            "service.istio.io/canonical-name",
            "app.kubernetes.io/name",
            "app",
        ])
        .unwrap_or_else(|| name.to_string()),
        canonical_revision: pick(&[
            "service.istio.io/canonical-revision",
            "app.kubernetes.io/version",
            "version",
        ])
        .unwrap_or_else(|| "latest".into()),
        workload_name: name.to_string(),
        // As istiod sends WorkloadEntries and inline endpoints to ztunnel.
        workload_type: "pod".into(),
        locality: parse_locality(&spec.locality),
        labels,
        status: HealthStatus::Healthy,
        ..Workload::default()
    }
}

/// Istio's locality string, `region/zone/subzone` (the subzone is not used here).
fn parse_locality(s: &str) -> Locality {
    let mut parts = s.split('/').map(str::trim);
    Locality {
        region: parts.next().unwrap_or_default().to_string(),
        zone: parts.next().unwrap_or_default().to_string(),
    }
}

/// Adds the WorkloadEntries and ServiceEntries of `view` to `data`. `pods_by_ns` are the pods
/// already translated (with their workload uids), for ServiceEntry selectors.
pub fn translate(
    service_entries: &[Arc<DynamicObject>],
    workload_entries: &[Arc<DynamicObject>],
    pods_by_ns: &HashMap<&str, Vec<(&Pod, String)>>,
    namespace_labels: &HashMap<&str, &BTreeMap<String, String>>,
    facts: &ClusterFacts,
    data: &mut SourceData,
    rejected: &mut Vec<RejectedPolicy>,
) {
    // WorkloadEntries: workloads, indexed by namespace for the selectors below.
    let mut wes_by_ns: HashMap<String, Vec<SelectableEntry>> = HashMap::new();
    for obj in workload_entries {
        let Some(we) = parse::<WorkloadEntrySpec>(obj, "WorkloadEntry", rejected) else {
            continue;
        };
        // Labels may be on the object and in the spec; the spec's win (as istiod merges them).
        let mut labels = label_map(we.obj);
        labels.extend(we.spec.labels.clone());
        let uid = format!(
            "{}/networking.istio.io/WorkloadEntry/{}/{}",
            facts.cluster_id, we.namespace, we.name
        );
        let protocol = tunnel(&labels, we.obj);
        wes_by_ns
            .entry(we.namespace.clone())
            .or_default()
            .push(SelectableEntry {
                uid: uid.clone(),
                labels: labels.clone(),
                ports: we.spec.ports.clone(),
            });
        data.workloads.push(entry_workload(
            uid,
            &we.name,
            &we.namespace,
            &we.spec,
            labels,
            protocol,
            facts,
        ));
    }

    // Services (indexes into `data.services`) that get addresses from weft's allocator.
    let mut to_allocate = Vec::new();
    for obj in service_entries {
        let Some(se) = parse::<ServiceEntrySpec>(obj, "ServiceEntry", rejected) else {
            continue;
        };
        let key = format!("{}/{} (ServiceEntry)", se.namespace, se.name);
        if se.spec.hosts.is_empty() {
            rejected.push(RejectedPolicy {
                key,
                error: "spec.hosts is empty".into(),
            });
            continue;
        }
        let mut ports = BTreeMap::new();
        let mut port_names = BTreeMap::new();
        for p in &se.spec.ports {
            let (Ok(number), Ok(target)) = (u16::try_from(p.number), u16::try_from(p.target_port))
            else {
                rejected.push(RejectedPolicy {
                    key: key.clone(),
                    error: format!(
                        "spec.ports: {} / targetPort {} is not a port",
                        p.number, p.target_port
                    ),
                });
                continue;
            };
            ports.insert(number, if target == 0 { number } else { target });
            port_names.insert(number, p.name.clone());
        }
        // CIDR addresses (for NONE resolution) are not VIPs weft can answer or route by.
        let spec_vips: Vec<IpAddr> = se
            .spec
            .addresses
            .iter()
            .filter_map(|a| a.parse().ok())
            .collect();
        let allocated: Vec<AllocatedAddress> = se
            .obj
            .data
            .get("status")
            .and_then(|s| SeStatus::deserialize(s).ok())
            .map(|s| s.addresses)
            .unwrap_or_default();
        let resolution = se.spec.resolution;
        // Istio's rule for allocating: not for NONE, not when the user gave addresses, not
        // when opted out by label; per host, not for a wildcard (unless DYNAMIC_DNS).
        let may_allocate = facts.auto_allocate_vips
            && resolution != Resolution::None
            && se.spec.addresses.is_empty()
            && !label_map(se.obj)
                .get(AUTOALLOCATE_LABEL)
                .is_some_and(|v| v.eq_ignore_ascii_case("false"));

        // Endpoints: (workload uid, its own port map, the only host it serves if not all).
        let mut endpoints: Vec<(String, BTreeMap<u16, u16>, Option<String>)> = Vec::new();
        if let Some(selector) = &se.spec.workload_selector {
            let selects = |labels: &BTreeMap<String, String>| {
                selector
                    .labels
                    .iter()
                    .all(|(k, v)| labels.get(k) == Some(v))
            };
            for (pod, uid) in pods_by_ns.get(se.namespace.as_str()).into_iter().flatten() {
                if selects(pod.metadata.labels.as_ref().unwrap_or(&BTreeMap::new())) {
                    endpoints.push((uid.clone(), BTreeMap::new(), None));
                }
            }
            for we in wes_by_ns.get(&se.namespace).into_iter().flatten() {
                if selects(&we.labels) {
                    endpoints.push((we.uid.clone(), named_ports(&port_names, &we.ports), None));
                }
            }
        } else {
            let labels = label_map(se.obj);
            let protocol = tunnel(&labels, se.obj);
            // With DNS resolution and no endpoints, each host is its own endpoint, by name.
            let implicit: Vec<WorkloadEntrySpec>;
            let (inline, one_host_each) = if se.spec.endpoints.is_empty() && resolution.by_dns() {
                implicit = se
                    .spec
                    .hosts
                    .iter()
                    .filter(|h| !h.starts_with('*'))
                    .map(|h| WorkloadEntrySpec {
                        address: h.to_lowercase(),
                        ..WorkloadEntrySpec::default()
                    })
                    .collect();
                (&implicit, true)
            } else {
                (&se.spec.endpoints, false)
            };
            for ep in inline {
                let uid = format!(
                    "{}/networking.istio.io/ServiceEntry/{}/{}/{}",
                    facts.cluster_id, se.namespace, se.name, ep.address
                );
                let mut labels = labels.clone();
                labels.extend(ep.labels.clone());
                endpoints.push((
                    uid.clone(),
                    named_ports(&port_names, &ep.ports),
                    one_host_each.then(|| ep.address.clone()),
                ));
                data.workloads.push(entry_workload(
                    uid,
                    &se.name,
                    &se.namespace,
                    ep,
                    labels,
                    protocol,
                    facts,
                ));
            }
        }

        for host in &se.spec.hosts {
            let host = host.to_lowercase();
            let vips: Vec<IpAddr> = if spec_vips.is_empty() {
                allocated
                    .iter()
                    .filter(|a| a.host.eq_ignore_ascii_case(&host))
                    .filter_map(|a| a.value.parse().ok())
                    .collect()
            } else {
                spec_vips.clone()
            };
            let service = Service {
                name: se.name.clone(),
                namespace: se.namespace.clone(),
                hostname: host.clone(),
                vips,
                ports: ports.clone(),
                subject_alt_names: se.spec.subject_alt_names.clone(),
                waypoint: waypoint::for_service(
                    se.obj.metadata.labels.as_ref(),
                    namespace_labels.get(se.namespace.as_str()).copied(),
                    &se.namespace,
                    &host,
                    facts,
                ),
                passthrough: resolution == Resolution::None,
                visibility: Default::default(),
            };
            let wildcard = host.starts_with('*') && resolution != Resolution::DynamicDns;
            if service.vips.is_empty() && may_allocate && !wildcard {
                to_allocate.push(data.services.len());
            }
            for (uid, p, only) in &endpoints {
                if only.as_ref().is_none_or(|h| *h == host) {
                    data.endpoints.push((service.key(), uid.clone(), p.clone()));
                }
            }
            data.services.push(service);
        }
    }
    allocate::assign(&mut data.services, &to_allocate);
}

/// A ServiceEntry port → the endpoint's own port of the same name (WorkloadEntry `ports`).
fn named_ports(
    port_names: &BTreeMap<u16, String>,
    own: &BTreeMap<String, u32>,
) -> BTreeMap<u16, u16> {
    port_names
        .iter()
        .filter_map(|(number, name)| {
            let target = u16::try_from(*own.get(name)?).ok()?;
            Some((*number, target))
        })
        .collect()
}

#[cfg(test)]
mod tests;
