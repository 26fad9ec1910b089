//! The state store: one read-mostly snapshot of everything weft knows, merged from every source
//! (local file, Kubernetes, istiod) and read without locks on the data path.
//!
//! Updates are incremental. A snapshot's maps are persistent (imbl): the next snapshot shares
//! everything with the last but the paths to what changed, so applying one xDS resource to a
//! mesh of 10 000 workloads costs a few map operations, not a rebuild of the world. Sources that
//! can only say "here is everything" (the local file, the Kubernetes mirrors) go through the
//! same path: [`StateStore::replace_source`] turns their full state into the changes against
//! what they said before.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use imbl::{HashMap as PHashMap, OrdMap};
use serde::Serialize;
use tokio::sync::watch;

use super::service::{Endpoint, Service, ServiceKey};
use super::workload::{HealthStatus, Workload};
use crate::authz::{Policy, PolicySet};

/// What one configuration source currently says, whole. Sources never see each other's data;
/// the store merges them.
#[derive(Clone, Debug, Default)]
pub struct SourceData {
    pub workloads: Vec<Workload>,
    pub services: Vec<Service>,
    /// Endpoints a source states directly: service → (workload uid, port map).
    pub endpoints: Vec<(ServiceKey, String, BTreeMap<u16, u16>)>,
    pub policies: Vec<Policy>,
}

/// Port maps of the services one workload is an endpoint of.
pub type EndpointPorts = BTreeMap<ServiceKey, BTreeMap<u16, u16>>;

/// Changes one source makes. Applied in one step: readers see all of it or none of it.
#[derive(Clone, Debug, Default)]
pub struct Delta {
    /// A workload, with the services it is an endpoint of (replacing what the source said of
    /// that workload's endpoints before).
    pub upsert_workloads: Vec<(Workload, EndpointPorts)>,
    /// Workload uids whose workload and endpoints this source no longer states.
    pub remove_workloads: Vec<String>,
    /// Endpoints stated for a workload another source describes (a service's endpoint list in
    /// the local file naming a Kubernetes pod, say).
    pub upsert_endpoints: Vec<(String, EndpointPorts)>,
    pub upsert_services: Vec<Service>,
    pub remove_services: Vec<ServiceKey>,
    pub upsert_policies: Vec<Policy>,
    /// `namespace/name` keys.
    pub remove_policies: Vec<String>,
}

impl Delta {
    pub fn is_empty(&self) -> bool {
        self.upsert_workloads.is_empty()
            && self.remove_workloads.is_empty()
            && self.upsert_endpoints.is_empty()
            && self.upsert_services.is_empty()
            && self.remove_services.is_empty()
            && self.upsert_policies.is_empty()
            && self.remove_policies.is_empty()
    }
}

/// An immutable view of the merged state. Cheap to hold across a whole connection.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Snapshot {
    pub generation: u64,
    pub workloads: OrdMap<String, Arc<Workload>>,
    /// Workloads by address. More than one only where networks reuse addresses (each
    /// network is its own address space) or two workloads briefly overlap, in arrival order.
    #[serde(skip)]
    by_ip: PHashMap<IpAddr, Arc<[Arc<Workload>]>>,
    pub services: OrdMap<ServiceKey, Arc<Service>>,
    #[serde(skip)]
    by_vip: PHashMap<IpAddr, Arc<Service>>,
    /// hostname → the namespaces with a service of that hostname (DNS answers by name).
    #[serde(skip)]
    by_hostname: PHashMap<String, imbl::OrdSet<String>>,
    /// service → workload uid → endpoint.
    pub endpoints: OrdMap<ServiceKey, OrdMap<String, Endpoint>>,
    /// workload uid → the services it is an endpoint of (the reverse of `endpoints`).
    #[serde(skip)]
    services_by_uid: PHashMap<String, Arc<BTreeSet<ServiceKey>>>,
    pub policies: Arc<PolicySet>,
}

impl Snapshot {
    /// The workload with address `ip`: one this weft captures if any (its own pods are the
    /// ones an address arriving here means), else the one that arrived last.
    pub fn workload_by_ip(&self, ip: IpAddr) -> Option<&Arc<Workload>> {
        let all = self.by_ip.get(&ip)?;
        all.iter().find(|w| w.is_captured()).or(all.last())
    }

    /// The workload with address `ip` on `network`.
    pub fn workload_on(&self, network: &str, ip: IpAddr) -> Option<&Arc<Workload>> {
        self.by_ip
            .get(&ip)?
            .iter()
            .rev()
            .find(|w| w.network == network)
    }

    pub fn workload_by_uid(&self, uid: &str) -> Option<&Arc<Workload>> {
        self.workloads.get(uid)
    }

    pub fn service(&self, key: &ServiceKey) -> Option<&Arc<Service>> {
        self.services.get(key)
    }

    pub fn service_by_vip(&self, ip: IpAddr) -> Option<&Arc<Service>> {
        self.by_vip.get(&ip)
    }

    /// Services with this hostname (one per namespace that has one), lowercase as stored.
    pub fn services_by_hostname<'a>(
        &'a self,
        hostname: &'a str,
    ) -> impl Iterator<Item = &'a Arc<Service>> + 'a {
        self.by_hostname
            .get(hostname)
            .into_iter()
            .flat_map(|namespaces| namespaces.iter())
            .filter_map(move |ns| {
                self.services.get(&ServiceKey {
                    namespace: ns.clone(),
                    hostname: hostname.to_string(),
                })
            })
    }

    /// Healthy endpoints of a service.
    pub fn healthy_endpoints(&self, key: &ServiceKey) -> impl Iterator<Item = &Endpoint> {
        self.endpoints
            .get(key)
            .into_iter()
            .flat_map(|eps| eps.values())
            .filter(|e| e.workload.status == HealthStatus::Healthy)
    }

    /// Services a workload is an endpoint of (for metrics' destination_service).
    pub fn services_of<'a>(&'a self, uid: &str) -> impl Iterator<Item = &'a Arc<Service>> + 'a {
        self.services_by_uid
            .get(uid)
            .into_iter()
            .flat_map(|keys| keys.iter())
            .filter_map(|k| self.services.get(k))
    }
}

/// What one source holds, kept so that the store can tell which source wins a key and what a
/// full replacement changes.
#[derive(Clone, Debug, Default)]
struct SourceMaps {
    workloads: OrdMap<String, Arc<Workload>>,
    endpoints: OrdMap<String, Arc<EndpointPorts>>,
    services: OrdMap<ServiceKey, Arc<Service>>,
    policies: OrdMap<String, Arc<Policy>>,
}

/// Sources by name; for a key held by several, the last in name order wins.
#[derive(Default)]
struct Sources(BTreeMap<String, SourceMaps>);

impl Sources {
    fn workload(&self, uid: &str) -> Option<&Arc<Workload>> {
        self.0.values().rev().find_map(|s| s.workloads.get(uid))
    }
    fn endpoints(&self, uid: &str) -> Option<&Arc<EndpointPorts>> {
        self.0.values().rev().find_map(|s| s.endpoints.get(uid))
    }
    fn service(&self, key: &ServiceKey) -> Option<&Arc<Service>> {
        self.0.values().rev().find_map(|s| s.services.get(key))
    }
    fn policies(&self) -> Vec<Policy> {
        let mut merged: BTreeMap<&str, &Arc<Policy>> = BTreeMap::new();
        for s in self.0.values() {
            for (k, p) in s.policies.iter() {
                merged.insert(k, p);
            }
        }
        merged.into_values().map(|p| (**p).clone()).collect()
    }
}

/// Holds the current snapshot and tells subscribers when it changes.
pub struct StateStore {
    current: ArcSwap<Snapshot>,
    sources: Mutex<Sources>,
    changed: watch::Sender<u64>,
    root_namespace: String,
}

impl StateStore {
    pub fn new(root_namespace: impl Into<String>) -> Arc<Self> {
        let (changed, _) = watch::channel(0);
        let root_namespace = root_namespace.into();
        let empty = Snapshot {
            policies: Arc::new(PolicySet::new(Vec::new(), root_namespace.clone())),
            ..Snapshot::default()
        };
        Arc::new(StateStore {
            current: ArcSwap::from_pointee(empty),
            sources: Mutex::new(Sources::default()),
            changed,
            root_namespace,
        })
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// Replaces everything `source` said before with `data`: applied as the changes between
    /// the two, so unchanged objects keep their place (and their `Arc`) in the snapshot.
    pub fn replace_source(&self, source: &str, data: SourceData) {
        let mut sources = self.sources.lock().unwrap_or_else(|p| p.into_inner());
        let old = sources.0.get(source).cloned().unwrap_or_default();
        let delta = diff(&old, data);
        self.apply_locked(&mut sources, source, delta);
    }

    /// Applies changes from `source`.
    pub fn apply(&self, source: &str, delta: Delta) {
        let mut sources = self.sources.lock().unwrap_or_else(|p| p.into_inner());
        self.apply_locked(&mut sources, source, delta);
    }

    fn apply_locked(&self, sources: &mut Sources, source: &str, delta: Delta) {
        if delta.is_empty() {
            return;
        }
        let mine = sources.0.entry(source.to_string()).or_default();
        let mut touched_uids: BTreeSet<String> = BTreeSet::new();
        let mut touched_services: BTreeSet<ServiceKey> = BTreeSet::new();
        let policies_changed =
            !delta.upsert_policies.is_empty() || !delta.remove_policies.is_empty();
        for uid in delta.remove_workloads {
            mine.workloads.remove(&uid);
            mine.endpoints.remove(&uid);
            touched_uids.insert(uid);
        }
        for (w, eps) in delta.upsert_workloads {
            let uid = w.uid.clone();
            mine.workloads.insert(uid.clone(), Arc::new(w));
            if eps.is_empty() {
                mine.endpoints.remove(&uid);
            } else {
                mine.endpoints.insert(uid.clone(), Arc::new(eps));
            }
            touched_uids.insert(uid);
        }
        for (uid, eps) in delta.upsert_endpoints {
            mine.workloads.remove(&uid);
            mine.endpoints.insert(uid.clone(), Arc::new(eps));
            touched_uids.insert(uid);
        }
        for key in delta.remove_services {
            mine.services.remove(&key);
            touched_services.insert(key);
        }
        for s in delta.upsert_services {
            let key = s.key();
            mine.services.insert(key.clone(), Arc::new(s));
            touched_services.insert(key);
        }
        for key in delta.remove_policies {
            mine.policies.remove(&key);
        }
        for p in delta.upsert_policies {
            mine.policies.insert(p.key(), Arc::new(p));
        }

        let mut snap = (**self.current.load()).clone();
        snap.generation += 1;
        for uid in &touched_uids {
            merge_workload(&mut snap, sources, uid);
        }
        for key in &touched_services {
            merge_service(&mut snap, sources, key);
        }
        if policies_changed {
            snap.policies = Arc::new(PolicySet::new(
                sources.policies(),
                self.root_namespace.clone(),
            ));
        }
        let generation = snap.generation;
        self.current.store(Arc::new(snap));
        self.changed.send_replace(generation);
    }

    /// Notified with the new generation after every change.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }
}

/// Sets what the address index holds for `uid` at `ip`: `w`, or nothing; the other workloads
/// with that address stay.
fn index_address(
    by_ip: &mut PHashMap<IpAddr, Arc<[Arc<Workload>]>>,
    ip: IpAddr,
    uid: &str,
    w: Option<&Arc<Workload>>,
) {
    let mut all: Vec<Arc<Workload>> = by_ip
        .get(&ip)
        .map(|a| a.iter().filter(|o| o.uid != uid).cloned().collect())
        .unwrap_or_default();
    all.extend(w.cloned());
    if all.is_empty() {
        by_ip.remove(&ip);
    } else {
        by_ip.insert(ip, all.into());
    }
}

/// Makes the snapshot's view of workload `uid` (its addresses and endpoints) what the sources
/// now say.
fn merge_workload(snap: &mut Snapshot, sources: &Sources, uid: &str) {
    if let Some(old) = snap.workloads.remove(uid) {
        for ip in &old.workload_ips {
            index_address(&mut snap.by_ip, *ip, uid, None);
        }
    }
    if let Some(keys) = snap.services_by_uid.remove(uid) {
        for key in keys.iter() {
            if let Some(eps) = snap.endpoints.get_mut(key) {
                eps.remove(uid);
                if eps.is_empty() {
                    snap.endpoints.remove(key);
                }
            }
        }
    }
    let Some(w) = sources.workload(uid) else {
        return;
    };
    snap.workloads.insert(uid.to_string(), w.clone());
    for ip in &w.workload_ips {
        index_address(&mut snap.by_ip, *ip, uid, Some(w));
    }
    let Some(eps) = sources.endpoints(uid) else {
        return;
    };
    for (key, ports) in eps.iter() {
        snap.endpoints.entry(key.clone()).or_default().insert(
            uid.to_string(),
            Endpoint {
                workload: w.clone(),
                ports: ports.clone(),
            },
        );
    }
    snap.services_by_uid
        .insert(uid.to_string(), Arc::new(eps.keys().cloned().collect()));
}

fn merge_service(snap: &mut Snapshot, sources: &Sources, key: &ServiceKey) {
    if let Some(old) = snap.services.remove(key) {
        for vip in &old.vips {
            if snap.by_vip.get(vip).is_some_and(|s| s.key() == *key) {
                snap.by_vip.remove(vip);
            }
        }
        let emptied = snap.by_hostname.get_mut(&key.hostname).is_some_and(|nss| {
            nss.remove(&key.namespace);
            nss.is_empty()
        });
        if emptied {
            snap.by_hostname.remove(&key.hostname);
        }
    }
    if let Some(s) = sources.service(key) {
        snap.services.insert(key.clone(), s.clone());
        for vip in &s.vips {
            snap.by_vip.insert(*vip, s.clone());
        }
        snap.by_hostname
            .entry(key.hostname.clone())
            .or_default()
            .insert(key.namespace.clone());
    }
}

/// The changes that turn what a source held into `data`.
fn diff(old: &SourceMaps, data: SourceData) -> Delta {
    let mut delta = Delta::default();
    let mut endpoints: BTreeMap<String, EndpointPorts> = BTreeMap::new();
    for (key, uid, ports) in data.endpoints {
        endpoints.entry(uid).or_default().insert(key, ports);
    }
    let mut seen = BTreeSet::new();
    for w in data.workloads {
        let eps = endpoints.remove(&w.uid).unwrap_or_default();
        let same = old.workloads.get(&w.uid).is_some_and(|o| **o == w)
            && old
                .endpoints
                .get(&w.uid)
                .map_or(eps.is_empty(), |o| **o == eps);
        seen.insert(w.uid.clone());
        if !same {
            delta.upsert_workloads.push((w, eps));
        }
    }
    // What is left names workloads this source does not describe.
    for (uid, eps) in endpoints {
        let same = !old.workloads.contains_key(&uid)
            && old.endpoints.get(&uid).is_some_and(|o| **o == eps);
        seen.insert(uid.clone());
        if !same {
            delta.upsert_endpoints.push((uid, eps));
        }
    }
    delta.remove_workloads = old
        .workloads
        .keys()
        .chain(old.endpoints.keys())
        .filter(|uid| !seen.contains(*uid))
        .cloned()
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let mut seen_services = BTreeSet::new();
    for s in data.services {
        let key = s.key();
        let same = old.services.get(&key).is_some_and(|o| **o == s);
        seen_services.insert(key);
        if !same {
            delta.upsert_services.push(s);
        }
    }
    delta.remove_services = old
        .services
        .keys()
        .filter(|k| !seen_services.contains(*k))
        .cloned()
        .collect();
    let mut seen_policies = BTreeSet::new();
    for p in data.policies {
        let key = p.key();
        let same = old.policies.get(&key).is_some_and(|o| **o == p);
        seen_policies.insert(key);
        if !same {
            delta.upsert_policies.push(p);
        }
    }
    delta.remove_policies = old
        .policies
        .keys()
        .filter(|k| !seen_policies.contains(*k))
        .cloned()
        .collect();
    delta
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::authz::{Action, Scope};

    fn w(uid: &str, ip: &str) -> Workload {
        Workload {
            uid: uid.into(),
            name: uid.into(),
            namespace: "shop".into(),
            workload_ips: vec![ip.parse().unwrap()],
            ..Workload::default()
        }
    }

    fn svc(host: &str, vip: &str) -> Service {
        Service {
            name: host.into(),
            namespace: "shop".into(),
            hostname: host.into(),
            vips: vec![vip.parse().unwrap()],
            ports: BTreeMap::from([(80, 8080)]),
            subject_alt_names: vec![],
            passthrough: false,
            visibility: Default::default(),
            waypoint: None,
        }
    }

    fn key(host: &str) -> ServiceKey {
        ServiceKey {
            namespace: "shop".into(),
            hostname: host.into(),
        }
    }

    fn policy(name: &str) -> Policy {
        Policy {
            name: name.into(),
            namespace: "shop".into(),
            scope: Scope::Namespace,
            action: Action::Deny,
            rules: vec![],
            dry_run: false,
            warnings: vec![],
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn an_address_two_networks_reuse_names_a_workload_on_each() {
        let on = |uid: &str, network: &str| Workload {
            network: network.into(),
            ..w(uid, "10.0.0.1")
        };
        let captured = Workload {
            netns: Some(crate::state::Netns::Here),
            ..on("local", "east")
        };
        let store = StateStore::new("istio-system");
        store.apply(
            "xds",
            Delta {
                upsert_workloads: vec![
                    (captured, EndpointPorts::new()),
                    (on("remote", "west"), EndpointPorts::new()),
                ],
                ..Delta::default()
            },
        );
        let s = store.snapshot();
        let uid = |w: Option<&Arc<Workload>>| w.map(|w| w.uid.clone());
        assert_eq!(
            uid(s.workload_on("east", ip("10.0.0.1"))),
            Some("local".into())
        );
        assert_eq!(
            uid(s.workload_on("west", ip("10.0.0.1"))),
            Some("remote".into())
        );
        assert_eq!(uid(s.workload_on("north", ip("10.0.0.1"))), None);
        // Unqualified, the address means this weft's own pod, whichever arrived last.
        assert_eq!(uid(s.workload_by_ip(ip("10.0.0.1"))), Some("local".into()));
        // Removing one leaves the other indexed.
        store.apply(
            "xds",
            Delta {
                remove_workloads: vec!["local".into()],
                ..Delta::default()
            },
        );
        let s = store.snapshot();
        assert_eq!(uid(s.workload_by_ip(ip("10.0.0.1"))), Some("remote".into()));
        assert_eq!(uid(s.workload_on("east", ip("10.0.0.1"))), None);
    }

    #[test]
    fn deltas_update_every_index_and_leave_the_rest_shared() {
        let store = StateStore::new("istio-system");
        let eps = EndpointPorts::from([(key("web"), BTreeMap::from([(80, 8080)]))]);
        store.apply(
            "xds",
            Delta {
                upsert_workloads: vec![
                    (w("a", "10.0.0.1"), eps.clone()),
                    (w("b", "10.0.0.2"), eps),
                ],
                upsert_services: vec![svc("web", "10.1.0.1")],
                upsert_policies: vec![policy("p")],
                ..Delta::default()
            },
        );
        let s1 = store.snapshot();
        assert_eq!(s1.healthy_endpoints(&key("web")).count(), 2);
        assert_eq!(s1.services_of("a").count(), 1);
        assert!(s1.service_by_vip(ip("10.1.0.1")).is_some());
        assert_eq!(s1.policies.len(), 1);

        // A workload moves to another IP and leaves the service; the other is untouched.
        store.apply(
            "xds",
            Delta {
                upsert_workloads: vec![(w("a", "10.0.0.9"), EndpointPorts::new())],
                ..Delta::default()
            },
        );
        let s2 = store.snapshot();
        assert!(
            s2.workload_by_ip(ip("10.0.0.1")).is_none(),
            "old address forgotten"
        );
        assert_eq!(
            s2.workload_by_ip(ip("10.0.0.9")).map(|w| w.uid.as_str()),
            Some("a")
        );
        assert_eq!(s2.services_of("a").count(), 0);
        assert_eq!(s2.healthy_endpoints(&key("web")).count(), 1);
        assert!(
            Arc::ptr_eq(
                s1.workload_by_uid("b").unwrap(),
                s2.workload_by_uid("b").unwrap()
            ),
            "an unchanged workload is the same object"
        );
        assert!(
            Arc::ptr_eq(&s1.policies, &s2.policies),
            "no policy change, no policy rebuild"
        );
        assert_eq!(s2.generation, s1.generation + 1);

        // Removals.
        store.apply(
            "xds",
            Delta {
                remove_workloads: vec!["b".into()],
                remove_services: vec![key("web")],
                remove_policies: vec!["shop/p".into()],
                ..Delta::default()
            },
        );
        let s3 = store.snapshot();
        assert!(s3.workload_by_ip(ip("10.0.0.2")).is_none());
        assert!(s3.endpoints.get(&key("web")).is_none());
        assert!(s3.service_by_vip(ip("10.1.0.1")).is_none());
        assert!(s3.policies.is_empty());
        // The old snapshot a connection holds is unchanged.
        assert_eq!(s1.workloads.len(), 2);
    }

    #[test]
    fn replace_source_is_a_diff_and_sources_merge_by_name() {
        let store = StateStore::new("istio-system");
        let data = |ip_a: &str| SourceData {
            workloads: vec![w("a", ip_a), w("b", "10.0.0.2")],
            services: vec![svc("web", "10.1.0.1")],
            endpoints: vec![(key("web"), "a".into(), BTreeMap::new())],
            policies: vec![policy("p")],
        };
        store.replace_source("kubernetes", data("10.0.0.1"));
        let s1 = store.snapshot();
        let g = s1.generation;
        store.replace_source("kubernetes", data("10.0.0.1"));
        assert_eq!(
            store.snapshot().generation,
            g,
            "nothing changed, nothing applied"
        );
        store.replace_source("kubernetes", data("10.0.0.5"));
        let s2 = store.snapshot();
        assert!(Arc::ptr_eq(
            s1.workload_by_uid("b").unwrap(),
            s2.workload_by_uid("b").unwrap()
        ));
        assert!(Arc::ptr_eq(&s1.policies, &s2.policies));
        assert_eq!(
            s2.healthy_endpoints(&key("web"))
                .next()
                .map(|e| e.workload.workload_ips[0]),
            Some(ip("10.0.0.5"))
        );

        // A later source (by name) wins a key both hold; removing it reveals the other again.
        store.replace_source(
            "local",
            SourceData {
                workloads: vec![w("a", "10.0.0.7")],
                ..SourceData::default()
            },
        );
        assert_eq!(
            store.snapshot().workload_by_uid("a").unwrap().workload_ips[0],
            ip("10.0.0.7")
        );
        store.replace_source("local", SourceData::default());
        let s3 = store.snapshot();
        assert_eq!(
            s3.workload_by_uid("a").unwrap().workload_ips[0],
            ip("10.0.0.5")
        );
        assert!(s3.workload_by_ip(ip("10.0.0.7")).is_none());

        // Endpoints a source states for a workload it does not describe.
        store.replace_source(
            "local",
            SourceData {
                endpoints: vec![(key("web"), "b".into(), BTreeMap::new())],
                ..SourceData::default()
            },
        );
        assert_eq!(store.snapshot().services_of("b").count(), 1);
        store.replace_source("kubernetes", SourceData::default());
        let s4 = store.snapshot();
        assert!(s4.workloads.is_empty() && s4.services.is_empty() && s4.policies.is_empty());
        assert!(
            s4.endpoints.is_empty(),
            "no endpoint without its workload: {:?}",
            s4.endpoints
        );
    }
}
