//! Kubernetes objects → weft's state, as pure functions of what the watches currently hold.
//!
//! Kept free of I/O so the rules (who is in the mesh, which identity a pod has, which pods back
//! a service) are tested without an API server, and so every rebuild is the same function of the
//! same inputs: a re-list after a watch error yields exactly the state it replaces.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Namespace, Pod, Service as K8sService};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::DynamicObject;
use serde_json::Value;

use super::{network, waypoint};
use crate::authz::peer_authn::{self, PeerAuthns};
use crate::authz::{self, Policy};
use crate::state::{HealthStatus, Netns, Protocol, Service, ServiceKey, SourceData, Workload};

/// The namespace (and pod) label that puts workloads into the mesh.
pub const DATAPLANE_MODE: &str = "istio.io/dataplane-mode";
pub const AMBIENT: &str = "ambient";
/// A pod labelled `istio.io/dataplane-mode=none` stays out even in an ambient namespace.
pub const OPT_OUT: &str = "none";
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// A pod's opt-in or opt-out of DNS capture, as istio-cni reads it ("true"/"false"; anything
/// else is ignored, as there).
pub const DNS_CAPTURE_ANNOTATION: &str = "ambient.istio.io/dns-capture";

/// Node-level facts the translation needs.
#[derive(Clone, Debug)]
pub struct ClusterFacts {
    pub trust_domain: String,
    pub cluster_id: String,
    pub domain_suffix: String,
    /// Istio's root namespace: where mesh-wide PeerAuthentication lives.
    pub root_namespace: String,
    /// Allocate addresses to ServiceEntries that have none (`KubeSettings`).
    pub auto_allocate_vips: bool,
}

#[cfg(test)]
impl ClusterFacts {
    /// The facts of a default Istio cluster, for the translation's unit tests.
    pub fn for_tests() -> ClusterFacts {
        ClusterFacts {
            trust_domain: "cluster.local".into(),
            cluster_id: "Kubernetes".into(),
            domain_suffix: "cluster.local".into(),
            root_namespace: "istio-system".into(),
            auto_allocate_vips: true,
        }
    }
}

/// Everything the watches hold at one moment.
#[derive(Default)]
pub struct ClusterView {
    pub namespaces: Vec<Arc<Namespace>>,
    pub pods: Vec<Arc<Pod>>,
    pub services: Vec<Arc<K8sService>>,
    pub endpoint_slices: Vec<Arc<DynamicObject>>,
    pub policies: Vec<Arc<DynamicObject>>,
    pub peer_authentications: Vec<Arc<DynamicObject>>,
    pub service_entries: Vec<Arc<DynamicObject>>,
    pub workload_entries: Vec<Arc<DynamicObject>>,
}

/// An object (AuthorizationPolicy, PeerAuthentication, ServiceEntry, WorkloadEntry) the API
/// server accepted but weft cannot use, with why; the others stay in force.
#[derive(Debug)]
pub struct RejectedPolicy {
    pub key: String,
    pub error: String,
}

/// The translation's result: the state, and the policies that were left out.
pub struct Translated {
    pub data: SourceData,
    pub rejected: Vec<RejectedPolicy>,
}

/// Builds weft's view of the cluster. `netns_of` is asked for the network namespace of each
/// in-mesh pod that `captures` says this node should capture.
pub fn translate(
    view: &ClusterView,
    facts: &ClusterFacts,
    captures: impl Fn(&Pod) -> bool,
    mut netns_of: impl FnMut(&Workload) -> Option<PathBuf>,
) -> Translated {
    let ambient: HashMap<&str, bool> = view
        .namespaces
        .iter()
        .filter_map(|ns| Some((ns.metadata.name.as_deref()?, namespace_is_ambient(ns))))
        .collect();

    let namespace_labels: HashMap<&str, &BTreeMap<String, String>> = view
        .namespaces
        .iter()
        .filter_map(|ns| Some((ns.metadata.name.as_deref()?, ns.metadata.labels.as_ref()?)))
        .collect();

    let gateways = network::Gateways::from_services(&view.services);
    let system_labels = namespace_labels.get(facts.root_namespace.as_str()).copied();

    let mut data = SourceData::default();
    let mut by_ip: HashMap<IpAddr, String> = HashMap::new();
    let mut pods_by_ns: HashMap<&str, Vec<(&Pod, String)>> = HashMap::new();
    for pod in &view.pods {
        let Some(mut w) = pod_workload(pod, facts, &ambient) else {
            continue;
        };
        w.waypoint = waypoint::for_workload(pod.metadata.labels.as_ref(), &w.namespace, facts);
        w.network = network::of_pod(
            pod.metadata.labels.as_ref(),
            namespace_labels.get(w.namespace.as_str()).copied(),
            system_labels,
        );
        if w.protocol == Protocol::HBONE && captures(pod) {
            w.netns = netns_of(&w).map(Netns::Pod);
        }
        for ip in &w.workload_ips {
            by_ip.insert(*ip, w.uid.clone());
        }
        pods_by_ns
            .entry(pod.metadata.namespace.as_deref().unwrap_or("default"))
            .or_default()
            .push((pod, w.uid.clone()));
        data.workloads.push(w);
    }

    let mut rejected = Vec::new();
    super::service_entry::translate(
        &view.service_entries,
        &view.workload_entries,
        &pods_by_ns,
        &namespace_labels,
        facts,
        &mut data,
        &mut rejected,
    );

    let mut slices_by_service: HashMap<(&str, &str), Vec<&DynamicObject>> = HashMap::new();
    for slice in &view.endpoint_slices {
        let (Some(ns), Some(svc)) = (
            slice.metadata.namespace.as_deref(),
            slice
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(SERVICE_NAME_LABEL)),
        ) else {
            continue;
        };
        slices_by_service
            .entry((ns, svc.as_str()))
            .or_default()
            .push(slice);
    }

    for svc in &view.services {
        let Some(mut service) = service_of(svc, facts) else {
            continue;
        };
        service.waypoint = waypoint::for_service(
            svc.metadata.labels.as_ref(),
            namespace_labels.get(service.namespace.as_str()).copied(),
            &service.namespace,
            &service.hostname,
            facts,
        );
        for ip in gateways.addresses_of(&service.namespace, &service.name) {
            if !service.vips.contains(&ip) {
                service.vips.push(ip);
            }
        }
        let key = service.key();
        let spec = svc.spec.as_ref();
        match spec
            .and_then(|s| s.selector.as_ref())
            .filter(|s| !s.is_empty())
        {
            // A selector: the endpoints are the selected pods (as istiod computes them for
            // ambient), with named target ports resolved against each pod's container ports.
            Some(selector) => {
                for (pod, uid) in pods_by_ns
                    .get(service.namespace.as_str())
                    .into_iter()
                    .flatten()
                {
                    if selects(selector, pod) {
                        data.endpoints
                            .push((key.clone(), uid.clone(), endpoint_ports(svc, pod)));
                    }
                }
            }
            // No selector: someone else (a controller, an operator) maintains EndpointSlices.
            None => {
                let slices = slices_by_service
                    .get(&(service.namespace.as_str(), service.name.as_str()))
                    .map(Vec::as_slice)
                    .unwrap_or_default();
                for slice in slices {
                    slice_endpoints(slice, svc, &service, facts, &by_ip, &mut data);
                }
            }
        }
        data.services.push(service);
    }

    for obj in &view.policies {
        let key = format!(
            "{}/{}",
            obj.metadata.namespace.as_deref().unwrap_or("default"),
            obj.metadata.name.as_deref().unwrap_or("?")
        );
        let parsed: Result<Policy, String> = serde_json::to_value(obj.as_ref())
            .map_err(|e| e.to_string())
            .and_then(|v| authz::k8s_form::from_k8s_value(&v).map_err(|e| e.to_string()));
        match parsed {
            Ok(p) => data.policies.push(p),
            Err(error) => rejected.push(RejectedPolicy { key, error }),
        }
    }
    let mut peer_authns = Vec::new();
    for obj in &view.peer_authentications {
        let parsed = serde_json::to_value(obj.as_ref())
            .map_err(|e| e.to_string())
            .and_then(|v| peer_authn::from_k8s_value(&v).map_err(|e| e.reason));
        match parsed {
            Ok(pa) => peer_authns.push(pa),
            Err(error) => rejected.push(RejectedPolicy {
                key: format!(
                    "{}/{} (PeerAuthentication)",
                    obj.metadata.namespace.as_deref().unwrap_or("default"),
                    obj.metadata.name.as_deref().unwrap_or("?")
                ),
                error,
            }),
        }
    }
    // As istiod does for ztunnel: PeerAuthentication becomes DENY policies, and each workload
    // names the ones that apply to it.
    let peer_authns = PeerAuthns::new(&facts.root_namespace, peer_authns);
    for w in &mut data.workloads {
        w.authorization_policies = peer_authns.policy_keys(&w.namespace, &w.labels);
    }
    data.policies.extend(peer_authns.derived_policies());
    // As istiod sends them: every workload of a network with a gateway names it (a client on
    // the same network never uses it).
    for w in &mut data.workloads {
        if w.network_gateway.is_none() {
            w.network_gateway = gateways.for_network(&w.network);
        }
    }
    Translated { data, rejected }
}

pub fn namespace_is_ambient(ns: &Namespace) -> bool {
    ns.metadata.deletion_timestamp.is_none()
        && label(&ns.metadata.labels, DATAPLANE_MODE) == Some(AMBIENT)
}

/// Whether a pod is in the mesh, given whether its namespace is: the one admission rule, for
/// the Kubernetes source and for weft-cni's capture before the pod starts.
pub fn pod_is_ambient(pod: &Pod, namespace_ambient: bool) -> bool {
    namespace_ambient
        && label(&pod.metadata.labels, DATAPLANE_MODE) != Some(OPT_OUT)
        && pod.spec.as_ref().and_then(|s| s.host_network) != Some(true)
}

fn label<'a>(labels: &'a Option<BTreeMap<String, String>>, key: &str) -> Option<&'a str> {
    labels.as_ref()?.get(key).map(String::as_str)
}

/// The workload a pod is, or None for pods that carry no traffic of their own (no IP yet,
/// finished, host network).
pub fn pod_workload(
    pod: &Pod,
    facts: &ClusterFacts,
    ambient: &HashMap<&str, bool>,
) -> Option<Workload> {
    let meta = &pod.metadata;
    let name = meta.name.clone()?;
    let namespace = meta.namespace.clone().unwrap_or_else(|| "default".into());
    let spec = pod.spec.as_ref()?;
    let status = pod.status.as_ref()?;
    if spec.host_network == Some(true) {
        return None;
    }
    if matches!(status.phase.as_deref(), Some("Succeeded" | "Failed")) {
        return None;
    }
    let mut ips: Vec<IpAddr> = status
        .pod_ips
        .iter()
        .flatten()
        .filter_map(|p| p.ip.parse().ok())
        .collect();
    if ips.is_empty() {
        ips.extend(
            status
                .pod_ip
                .as_deref()
                .and_then(|ip| ip.parse::<IpAddr>().ok()),
        );
    }
    if ips.is_empty() {
        return None;
    }
    let in_mesh = pod_is_ambient(
        pod,
        ambient.get(namespace.as_str()).copied().unwrap_or(false),
    );
    let labels = meta.labels.clone().unwrap_or_default();
    let workload_name = owner_workload_name(pod).unwrap_or_else(|| name.clone());
    let pick = |keys: &[&str]| keys.iter().find_map(|k| labels.get(*k).cloned());
    let canonical_name = pick(&[
        "service.istio.io/canonical-name",
        "app.kubernetes.io/name",
        "app",
    ])
    .unwrap_or_else(|| workload_name.clone());
    let canonical_revision = pick(&[
        "service.istio.io/canonical-revision",
        "app.kubernetes.io/version",
        "version",
    ])
    .unwrap_or_else(|| "latest".into());
    let ready = match &status.conditions {
        Some(conds) if conds.iter().any(|c| c.type_ == "Ready") => conds
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True"),
        _ => status.phase.as_deref() == Some("Running"),
    };
    Some(Workload {
        uid: format!("{}//Pod/{namespace}/{name}", facts.cluster_id),
        service_account: spec
            .service_account_name
            .clone()
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "default".into()),
        trust_domain: facts.trust_domain.clone(),
        workload_ips: ips,
        protocol: if in_mesh {
            Protocol::HBONE
        } else {
            Protocol::TCP
        },
        node: spec.node_name.clone().unwrap_or_default(),
        cluster_id: facts.cluster_id.clone(),
        canonical_name,
        canonical_revision,
        workload_name,
        // What istiod sends ztunnel for every pod, whatever owns it.
        workload_type: "pod".into(),
        // Nodes' topology labels are not watched in this mode.
        locality: Default::default(),
        labels,
        status: if ready {
            HealthStatus::Healthy
        } else {
            HealthStatus::Unhealthy
        },
        authorization_policies: Vec::new(),
        netns: None,
        dns_capture: meta
            .annotations
            .as_ref()
            .and_then(|a| a.get(DNS_CAPTURE_ANNOTATION))
            .and_then(|v| v.parse::<bool>().ok()),
        network: String::new(),
        hostname: String::new(),
        waypoint: None,
        network_gateway: None,
        name,
        namespace,
    })
}

/// The name of the workload a pod belongs to: a Deployment's pods are named after their
/// ReplicaSet `<deployment>-<hash>`, so the hash is dropped; other owners are used as they are.
fn owner_workload_name(pod: &Pod) -> Option<String> {
    let owner = pod
        .metadata
        .owner_references
        .as_ref()?
        .iter()
        .find(|o| o.controller == Some(true))?;
    if owner.kind == "ReplicaSet" {
        if let Some((deployment, _hash)) = owner.name.rsplit_once('-') {
            return Some(deployment.to_string());
        }
    }
    Some(owner.name.clone())
}

fn service_of(svc: &K8sService, facts: &ClusterFacts) -> Option<Service> {
    let name = svc.metadata.name.clone()?;
    let namespace = svc
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    let spec = svc.spec.as_ref()?;
    if spec.type_.as_deref() == Some("ExternalName") {
        return None;
    }
    let mut vips: Vec<IpAddr> = spec
        .cluster_ips
        .iter()
        .flatten()
        .filter_map(|ip| ip.parse().ok())
        .collect();
    if vips.is_empty() {
        vips.extend(
            spec.cluster_ip
                .as_deref()
                .and_then(|ip| ip.parse::<IpAddr>().ok()),
        );
    }
    let ports = spec
        .ports
        .iter()
        .flatten()
        .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
        .filter_map(|p| {
            let port = u16::try_from(p.port).ok()?;
            let target = match &p.target_port {
                Some(IntOrString::Int(t)) => u16::try_from(*t).unwrap_or(0),
                // Named target ports differ per pod: resolved per endpoint.
                _ => 0,
            };
            Some((port, target))
        })
        .collect();
    Some(Service {
        hostname: format!("{name}.{namespace}.svc.{}", facts.domain_suffix),
        name,
        namespace,
        vips,
        ports,
        subject_alt_names: Vec::new(),
        passthrough: false,
        visibility: Default::default(),
        waypoint: None,
    })
}

fn selects(selector: &BTreeMap<String, String>, pod: &Pod) -> bool {
    let labels = pod.metadata.labels.as_ref();
    selector
        .iter()
        .all(|(k, v)| labels.and_then(|l| l.get(k)) == Some(v))
}

/// Service port → pod port for the service's named target ports, from the pod's containers.
fn endpoint_ports(svc: &K8sService, pod: &Pod) -> BTreeMap<u16, u16> {
    let mut out = BTreeMap::new();
    let container_ports: Vec<_> = pod
        .spec
        .iter()
        .flat_map(|s| &s.containers)
        .flat_map(|c| c.ports.iter().flatten())
        .collect();
    for sp in svc.spec.iter().flat_map(|s| s.ports.iter().flatten()) {
        let Some(IntOrString::String(target_name)) = &sp.target_port else {
            continue;
        };
        let found = container_ports
            .iter()
            .find(|cp| cp.name.as_deref() == Some(target_name.as_str()));
        if let (Ok(port), Some(Ok(target))) = (
            u16::try_from(sp.port),
            found.map(|cp| u16::try_from(cp.container_port)),
        ) {
            out.insert(port, target);
        }
    }
    out
}

/// Endpoints of a selector-less service from one EndpointSlice (v1 or v1beta1: the fields weft
/// reads are the same). An address that is a known pod becomes that pod; any other becomes a
/// plain-TCP workload of its own, so traffic to the service still reaches it.
fn slice_endpoints(
    slice: &DynamicObject,
    svc: &K8sService,
    service: &Service,
    facts: &ClusterFacts,
    pods_by_ip: &HashMap<IpAddr, String>,
    data: &mut SourceData,
) {
    let slice_ports: HashMap<String, u16> = slice
        .data
        .get("ports")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|p| {
            let name = p
                .get("name")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string();
            let port = u16::try_from(p.get("port")?.as_u64()?).ok()?;
            Some((name, port))
        })
        .collect();
    let mut ports = BTreeMap::new();
    for sp in svc.spec.iter().flat_map(|s| s.ports.iter().flatten()) {
        let name = sp.name.clone().unwrap_or_default();
        if let (Ok(port), Some(target)) = (u16::try_from(sp.port), slice_ports.get(&name)) {
            ports.insert(port, *target);
        }
    }
    let key: ServiceKey = service.key();
    for ep in slice
        .data
        .get("endpoints")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let ready = ep
            .pointer("/conditions/ready")
            .and_then(Value::as_bool)
            .unwrap_or(true);
        for ip in ep
            .get("addresses")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|a| a.as_str()?.parse::<IpAddr>().ok())
        {
            let uid = match pods_by_ip.get(&ip) {
                Some(uid) => uid.clone(),
                None => {
                    let uid = format!(
                        "{}//EndpointSlice/{}/{}/{ip}",
                        facts.cluster_id,
                        service.namespace,
                        slice.metadata.name.as_deref().unwrap_or("?")
                    );
                    data.workloads.push(Workload {
                        uid: uid.clone(),
                        name: ep
                            .pointer("/targetRef/name")
                            .and_then(Value::as_str)
                            .map_or_else(|| ip.to_string(), str::to_string),
                        namespace: service.namespace.clone(),
                        service_account: "default".into(),
                        trust_domain: facts.trust_domain.clone(),
                        workload_ips: vec![ip],
                        protocol: Protocol::TCP,
                        cluster_id: facts.cluster_id.clone(),
                        status: if ready {
                            HealthStatus::Healthy
                        } else {
                            HealthStatus::Unhealthy
                        },
                        ..Workload::default()
                    });
                    uid
                }
            };
            data.endpoints.push((key.clone(), uid, ports.clone()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn facts() -> ClusterFacts {
        ClusterFacts::for_tests()
    }

    fn obj<T: serde::de::DeserializeOwned>(v: Value) -> Arc<T> {
        Arc::new(serde_json::from_value(v).expect("test object"))
    }

    fn ns(name: &str, mode: Option<&str>) -> Arc<Namespace> {
        let labels = mode
            .map(|m| json!({ DATAPLANE_MODE: m }))
            .unwrap_or(json!({}));
        obj(json!({"metadata": {"name": name, "labels": labels}}))
    }

    fn pod(ns: &str, name: &str, ip: &str, node: &str, labels: Value) -> Arc<Pod> {
        obj(json!({
            "metadata": {"name": name, "namespace": ns, "labels": labels,
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-7d9f", "uid": "x", "controller": true}]},
            "spec": {"nodeName": node, "serviceAccountName": "web-sa",
                "containers": [{"name": "c", "ports": [{"name": "http", "containerPort": 8080}]}]},
            "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
                "conditions": [{"type": "Ready", "status": "True"}]}
        }))
    }

    /// The translated workloads by pod name.
    fn by_name(t: &Translated) -> HashMap<&str, &Workload> {
        t.data
            .workloads
            .iter()
            .map(|w| (w.name.as_str(), w))
            .collect()
    }

    fn run(view: &ClusterView) -> Translated {
        translate(
            view,
            &facts(),
            |p| p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some("n1"),
            |w| Some(PathBuf::from(format!("/proc/1/{}", w.name))),
        )
    }

    #[test]
    fn pods_in_ambient_namespaces_are_hbone_and_captured_on_their_node() {
        let view = ClusterView {
            namespaces: vec![ns("shop", Some("ambient")), ns("legacy", None)],
            pods: vec![
                pod("shop", "a", "10.0.0.1", "n1", json!({"app": "web"})),
                pod("shop", "b", "10.0.0.2", "n2", json!({})),
                pod(
                    "shop",
                    "c",
                    "10.0.0.3",
                    "n1",
                    json!({DATAPLANE_MODE: "none"}),
                ),
                pod("legacy", "d", "10.0.0.4", "n1", json!({})),
            ],
            ..Default::default()
        };
        let t = run(&view);
        let w = by_name(&t);
        assert_eq!(w["a"].protocol, Protocol::HBONE);
        assert_eq!(w["a"].netns, Some(Netns::Pod("/proc/1/a".into())));
        assert_eq!(w["a"].uid, "Kubernetes//Pod/shop/a");
        assert_eq!(
            w["a"].identity().to_string(),
            "spiffe://cluster.local/ns/shop/sa/web-sa"
        );
        assert_eq!(w["a"].canonical_name, "web");
        assert_eq!(w["a"].workload_name, "web");
        assert_eq!(
            (w["b"].protocol, &w["b"].netns),
            (Protocol::HBONE, &None),
            "other node: not ours to capture"
        );
        assert_eq!(
            (w["c"].protocol, &w["c"].netns),
            (Protocol::TCP, &None),
            "opted out"
        );
        assert_eq!(
            (w["d"].protocol, &w["d"].netns),
            (Protocol::TCP, &None),
            "namespace not ambient"
        );
    }

    #[test]
    fn networks_come_from_labels_and_each_names_its_gateway() {
        let mut system = (*ns("istio-system", None)).clone();
        system.metadata.labels = Some(BTreeMap::from([(
            network::NETWORK_LABEL.into(),
            "east".into(),
        )]));
        let gateway: Arc<K8sService> = obj(json!({
            "metadata": {"name": "eastwest", "namespace": "istio-system",
                         "labels": {network::NETWORK_LABEL: "west"}},
            "spec": {"clusterIP": "10.96.0.20", "selector": {"app": "eastwest"},
                     "ports": [{"port": 15008}], "externalIPs": ["192.0.2.7"]}
        }));
        let view = ClusterView {
            namespaces: vec![Arc::new(system), ns("shop", Some("ambient"))],
            pods: vec![
                pod("shop", "a", "10.0.0.1", "n1", json!({})),
                pod(
                    "shop",
                    "b",
                    "10.0.0.2",
                    "n2",
                    json!({network::NETWORK_LABEL: "west"}),
                ),
            ],
            services: vec![gateway],
            ..Default::default()
        };
        let t = run(&view);
        let w = by_name(&t);
        assert_eq!(w["a"].network, "east", "the cluster's network");
        assert_eq!(w["a"].network_gateway, None, "east has no gateway");
        assert_eq!(w["b"].network, "west", "the pod's own label");
        assert_eq!(
            w["b"].network_gateway,
            Some(crate::state::GatewayAddress {
                destination: crate::state::GatewayDestination::Address {
                    network: "west".into(),
                    address: "192.0.2.7".parse().unwrap(),
                },
                hbone_mtls_port: 15008,
            })
        );
        // The gateway's reachable address is one of its service's VIPs, so routing finds its
        // instances (and their identities) from it.
        assert_eq!(
            t.data.services[0].vips,
            vec![
                "10.96.0.20".parse::<IpAddr>().unwrap(),
                "192.0.2.7".parse().unwrap()
            ]
        );
    }

    #[test]
    fn terminating_namespace_releases_its_pods() {
        let mut terminating = (*ns("shop", Some("ambient"))).clone();
        terminating.metadata.deletion_timestamp = Some(
            k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(Default::default()),
        );
        let view = ClusterView {
            namespaces: vec![Arc::new(terminating)],
            pods: vec![pod("shop", "a", "10.0.0.1", "n1", json!({}))],
            ..Default::default()
        };
        assert_eq!(run(&view).data.workloads[0].protocol, Protocol::TCP);
    }

    #[test]
    fn pods_without_ip_or_finished_are_not_workloads() {
        let mut no_ip = (*pod("shop", "a", "10.0.0.1", "n1", json!({}))).clone();
        if let Some(s) = no_ip.status.as_mut() {
            s.pod_ip = None;
            s.pod_ips = None;
        }
        let mut done = (*pod("shop", "b", "10.0.0.2", "n1", json!({}))).clone();
        if let Some(s) = done.status.as_mut() {
            s.phase = Some("Succeeded".into());
        }
        let view = ClusterView {
            namespaces: vec![ns("shop", Some("ambient"))],
            pods: vec![Arc::new(no_ip), Arc::new(done)],
            ..Default::default()
        };
        assert!(run(&view).data.workloads.is_empty());
    }

    #[test]
    fn services_select_pods_and_resolve_named_ports() {
        let svc: Arc<K8sService> = obj(json!({
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {"clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"], "selector": {"app": "web"},
                "ports": [{"name": "http", "port": 80, "targetPort": "http"}, {"name": "raw", "port": 90, "targetPort": 9090}]}
        }));
        let view = ClusterView {
            namespaces: vec![ns("shop", Some("ambient"))],
            pods: vec![
                pod("shop", "a", "10.0.0.1", "n1", json!({"app": "web"})),
                pod("shop", "b", "10.0.0.2", "n1", json!({"app": "db"})),
            ],
            services: vec![svc],
            ..Default::default()
        };
        let t = run(&view);
        let s = &t.data.services[0];
        assert_eq!(s.hostname, "web.shop.svc.cluster.local");
        assert_eq!(s.vips, vec!["10.96.0.10".parse::<IpAddr>().unwrap()]);
        assert_eq!(s.ports, BTreeMap::from([(80, 0), (90, 9090)]));
        assert_eq!(t.data.endpoints.len(), 1);
        let (key, uid, ports) = &t.data.endpoints[0];
        assert_eq!(
            (key.hostname.as_str(), uid.as_str()),
            ("web.shop.svc.cluster.local", "Kubernetes//Pod/shop/a")
        );
        assert_eq!(ports, &BTreeMap::from([(80, 8080)]));
    }

    #[test]
    fn selectorless_services_use_endpoint_slices() {
        let svc: Arc<K8sService> = obj(json!({
            "metadata": {"name": "ext", "namespace": "shop"},
            "spec": {"clusterIP": "10.96.0.11", "ports": [{"name": "tcp", "port": 5432}]}
        }));
        let slice: Arc<DynamicObject> = obj(json!({
            "apiVersion": "discovery.k8s.io/v1beta1", "kind": "EndpointSlice",
            "metadata": {"name": "ext-1", "namespace": "shop", "labels": {SERVICE_NAME_LABEL: "ext"}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": ["10.0.0.1"]}, {"addresses": ["192.0.2.7"], "conditions": {"ready": false}}],
            "ports": [{"name": "tcp", "port": 6432}]
        }));
        let view = ClusterView {
            namespaces: vec![ns("shop", Some("ambient"))],
            pods: vec![pod("shop", "a", "10.0.0.1", "n1", json!({}))],
            services: vec![svc],
            endpoint_slices: vec![slice],
            ..Default::default()
        };
        let t = run(&view);
        let uids: Vec<&str> = t
            .data
            .endpoints
            .iter()
            .map(|(_, u, _)| u.as_str())
            .collect();
        assert_eq!(
            uids,
            [
                "Kubernetes//Pod/shop/a",
                "Kubernetes//EndpointSlice/shop/ext-1/192.0.2.7"
            ]
        );
        assert!(t
            .data
            .endpoints
            .iter()
            .all(|(_, _, p)| p == &BTreeMap::from([(5432, 6432)])));
        let external = t
            .data
            .workloads
            .iter()
            .find(|w| w.name == "192.0.2.7")
            .expect("synthesised");
        assert_eq!(
            (external.protocol, external.status),
            (Protocol::TCP, HealthStatus::Unhealthy)
        );
    }

    #[test]
    fn policies_parse_and_bad_ones_are_named() {
        let good: Arc<DynamicObject> = obj(json!({
            "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
            "metadata": {"name": "allow-web", "namespace": "shop"},
            "spec": {"action": "ALLOW", "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/shop/sa/web"]}}]}]}
        }));
        let bad: Arc<DynamicObject> = obj(json!({
            "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
            "metadata": {"name": "broken", "namespace": "shop"},
            "spec": {"action": "MAYBE"}
        }));
        let t = run(&ClusterView {
            policies: vec![good, bad],
            ..Default::default()
        });
        assert_eq!(t.data.policies.len(), 1);
        assert_eq!(t.data.policies[0].key(), "shop/allow-web");
        assert_eq!(t.rejected.len(), 1);
        assert_eq!(t.rejected[0].key, "shop/broken");
        assert!(
            t.rejected[0].error.contains("action"),
            "{}",
            t.rejected[0].error
        );
    }

    #[test]
    fn peer_authentications_become_named_deny_policies_and_bad_ones_are_named() {
        let pa = |name: &str, spec: Value| {
            obj(json!({
                "apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
                "metadata": {"name": name, "namespace": "shop"}, "spec": spec
            }))
        };
        let t = run(&ClusterView {
            namespaces: vec![ns("shop", Some("ambient"))],
            pods: vec![
                pod("shop", "web-1", "10.0.0.1", "n1", json!({"app": "web"})),
                pod("shop", "db-1", "10.0.0.2", "n1", json!({"app": "db"})),
            ],
            peer_authentications: vec![
                pa("default", json!({"mtls": {"mode": "STRICT"}})),
                pa(
                    "web-metrics",
                    json!({"selector": {"matchLabels": {"app": "web"}},
                        "portLevelMtls": {"9090": {"mode": "PERMISSIVE"}}}),
                ),
                pa("broken", json!({"mtls": {"mode": "SOMETIMES"}})),
            ],
            ..Default::default()
        });
        let keys: Vec<String> = t.data.policies.iter().map(Policy::key).collect();
        assert_eq!(
            keys,
            [
                "istio-system/istio_converted_static_strict",
                "shop/converted_peer_authentication_web-metrics"
            ]
        );
        let names = |pod: &str| {
            t.data
                .workloads
                .iter()
                .find(|w| w.name == pod)
                .map(|w| w.authorization_policies.clone())
                .unwrap_or_default()
        };
        assert_eq!(
            names("web-1"),
            ["shop/converted_peer_authentication_web-metrics"]
        );
        assert_eq!(
            names("db-1"),
            ["istio-system/istio_converted_static_strict"]
        );
        assert_eq!(t.rejected.len(), 1);
        assert_eq!(t.rejected[0].key, "shop/broken (PeerAuthentication)");
        assert!(
            t.rejected[0].error.contains("spec"),
            "{}",
            t.rejected[0].error
        );
    }

    #[test]
    fn a_pods_dns_capture_annotation_is_read_as_istio_cni_reads_it() {
        let with = |v: &str| {
            let mut p = (*pod("shop", "web-1", "10.0.0.1", "n1", json!({}))).clone();
            p.metadata.annotations = Some(BTreeMap::from([(
                DNS_CAPTURE_ANNOTATION.to_string(),
                v.to_string(),
            )]));
            let t = run(&ClusterView {
                namespaces: vec![ns("shop", Some("ambient"))],
                pods: vec![Arc::new(p)],
                ..Default::default()
            });
            t.data.workloads[0].dns_capture
        };
        assert_eq!(with("false"), Some(false));
        assert_eq!(with("true"), Some(true));
        assert_eq!(with("tweedledum"), None, "not a boolean: the node decides");
        let dns = crate::config::Dns::default();
        assert!(dns.captures(None) && !dns.captures(Some(false)));
        let off = crate::config::Dns {
            enabled: false,
            ..Default::default()
        };
        assert!(off.captures(Some(true)) && !off.captures(None));
    }
}
