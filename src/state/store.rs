//! The state store: one read-mostly snapshot of everything weft knows, rebuilt whole when any
//! source (local file, Kubernetes) changes, and read without locks on the data path.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use serde::Serialize;
use tokio::sync::watch;

use super::service::{Endpoint, Service, ServiceKey};
use super::workload::{HealthStatus, Workload};
use crate::authz::{Policy, PolicySet};

/// What one configuration source currently says. Sources never see each other's data; the
/// store merges them.
#[derive(Clone, Debug, Default)]
pub struct SourceData {
    pub workloads: Vec<Workload>,
    pub services: Vec<Service>,
    /// Endpoints a source states directly: service → (workload uid, port map).
    pub endpoints: Vec<(ServiceKey, String, BTreeMap<u16, u16>)>,
    pub policies: Vec<Policy>,
}

/// An immutable view of the merged state. Cheap to hold across a whole connection.
#[derive(Debug, Default, Serialize)]
pub struct Snapshot {
    pub generation: u64,
    pub workloads: BTreeMap<String, Arc<Workload>>,
    #[serde(skip)]
    by_ip: HashMap<IpAddr, Arc<Workload>>,
    pub services: BTreeMap<ServiceKey, Arc<Service>>,
    #[serde(skip)]
    by_vip: HashMap<IpAddr, Arc<Service>>,
    pub endpoints: BTreeMap<ServiceKey, Vec<Endpoint>>,
    pub policies: PolicySet,
}

impl Snapshot {
    pub fn workload_by_ip(&self, ip: IpAddr) -> Option<&Arc<Workload>> {
        self.by_ip.get(&ip)
    }

    pub fn workload_by_uid(&self, uid: &str) -> Option<&Arc<Workload>> {
        self.workloads.get(uid)
    }

    pub fn service_by_vip(&self, ip: IpAddr) -> Option<&Arc<Service>> {
        self.by_vip.get(&ip)
    }

    /// Healthy endpoints of a service.
    pub fn healthy_endpoints(&self, key: &ServiceKey) -> impl Iterator<Item = &Endpoint> {
        self.endpoints
            .get(key)
            .into_iter()
            .flatten()
            .filter(|e| e.workload.status == HealthStatus::Healthy)
    }

    /// Services a workload is an endpoint of (for metrics' destination_service).
    pub fn services_of<'a>(&'a self, uid: &'a str) -> impl Iterator<Item = &'a Arc<Service>> + 'a {
        self.endpoints
            .iter()
            .filter(move |(_, eps)| eps.iter().any(|e| e.workload.uid == uid))
            .filter_map(|(k, _)| self.services.get(k))
    }

    fn build(generation: u64, sources: &BTreeMap<String, SourceData>, root_ns: &str) -> Self {
        let mut snap = Snapshot {
            generation,
            ..Default::default()
        };
        let mut policies = Vec::new();
        // Sources are merged in name order; a later source's object with the same key wins.
        for data in sources.values() {
            for w in &data.workloads {
                let w = Arc::new(w.clone());
                snap.workloads.insert(w.uid.clone(), w);
            }
            for s in &data.services {
                snap.services.insert(s.key(), Arc::new(s.clone()));
            }
            policies.extend(data.policies.iter().cloned());
        }
        for w in snap.workloads.values() {
            for ip in &w.workload_ips {
                snap.by_ip.insert(*ip, w.clone());
            }
        }
        for s in snap.services.values() {
            for vip in &s.vips {
                snap.by_vip.insert(*vip, s.clone());
            }
        }
        for data in sources.values() {
            for (key, uid, ports) in &data.endpoints {
                let Some(w) = snap.workloads.get(uid) else {
                    continue;
                };
                let eps = snap.endpoints.entry(key.clone()).or_default();
                eps.retain(|e| e.workload.uid != *uid);
                eps.push(Endpoint {
                    workload: w.clone(),
                    ports: ports.clone(),
                });
            }
        }
        snap.policies = PolicySet::new(policies, root_ns.to_string());
        snap
    }
}

/// Holds the current snapshot and tells subscribers when it changes.
pub struct StateStore {
    current: ArcSwap<Snapshot>,
    sources: Mutex<BTreeMap<String, SourceData>>,
    changed: watch::Sender<u64>,
    root_namespace: String,
}

impl StateStore {
    pub fn new(root_namespace: impl Into<String>) -> Arc<Self> {
        let (changed, _) = watch::channel(0);
        Arc::new(StateStore {
            current: ArcSwap::from_pointee(Snapshot::default()),
            sources: Mutex::new(BTreeMap::new()),
            changed,
            root_namespace: root_namespace.into(),
        })
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// Replaces everything `source` said before with `data`.
    pub fn replace_source(&self, source: &str, data: SourceData) {
        let mut sources = self.sources.lock().unwrap_or_else(|p| p.into_inner());
        sources.insert(source.to_string(), data);
        let generation = self.current.load().generation + 1;
        let snap = Snapshot::build(generation, &sources, &self.root_namespace);
        self.current.store(Arc::new(snap));
        drop(sources);
        self.changed.send_replace(generation);
    }

    /// Notified with the new generation after every change.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }
}
