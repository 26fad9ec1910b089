//! Kubernetes as a configuration source: watches of Namespaces, Pods, Services, EndpointSlices,
//! AuthorizationPolicies, PeerAuthentications, ServiceEntries and WorkloadEntries, turned into
//! weft's state (the `kubernetes` source of the state store). Pods on this node in ambient namespaces become captured
//! workloads, and the enroller captures them through the same entry point as the local file's
//! pods.
//!
//! Each kind is mirrored by a reflector (a full in-memory copy, rebuilt on re-list after a watch
//! error or an API server restart), and the whole source is recomputed from those copies after
//! any change. Recomputing from the full copies, never patching by event, is what makes a
//! re-list land on exactly the same state: no duplicate captures, no forgotten pods.

pub mod network;
pub mod service_entry;
pub mod translate;
pub mod waypoint;

use std::fmt::Debug;
use std::hash::Hash;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Pod, Service as K8sService};
use kube::api::{Api, ApiResource, DynamicObject};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Client, Config, Resource};
use serde::de::DeserializeOwned;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::admin::Readiness;
use crate::capture::locate::NetnsFinder;
use crate::state::StateStore;
use translate::{ClusterFacts, ClusterView};

/// The name this source has in the state store.
pub const SOURCE: &str = "kubernetes";
const READINESS_TASK: &str = "kubernetes sync";
/// Changes arriving within this window are applied as one rebuild.
const DEBOUNCE: Duration = Duration::from_millis(20);
/// How often to look again for the netns of a local pod not found yet.
const NETNS_RETRY: Duration = Duration::from_secs(1);
/// How often to look again for an API group that is not served (a CRD not installed yet).
const DISCOVERY_RETRY: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error("reading kubeconfig {path}: {source}")]
    Kubeconfig {
        path: PathBuf,
        source: kube::config::KubeconfigError,
    },
    #[error("no Kubernetes configuration: neither in-cluster (service account) nor KUBECONFIG/~/.kube/config: {0}")]
    Infer(#[from] kube::config::InferConfigError),
    #[error("Kubernetes client: {0}")]
    Client(#[from] kube::Error),
}

/// How to reach the API server: a kubeconfig file, or inferred (in-cluster service account,
/// else `$KUBECONFIG`, else `~/.kube/config`).
#[derive(Clone, Debug, Default)]
pub struct KubeSettings {
    pub kubeconfig: Option<PathBuf>,
    /// DNS suffix of service hostnames.
    pub domain_suffix: String,
    /// Give ServiceEntries without addresses (and none allocated by istiod) addresses of
    /// weft's own, as istiod's `PILOT_ENABLE_IP_AUTOALLOCATE` does (on by default there too).
    pub auto_allocate_vips: bool,
}

pub async fn client(settings: &KubeSettings) -> Result<Client, KubeError> {
    let config = match &settings.kubeconfig {
        Some(path) => {
            let kc = Kubeconfig::read_from(path).map_err(|source| KubeError::Kubeconfig {
                path: path.clone(),
                source,
            })?;
            Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                .await
                .map_err(|source| KubeError::Kubeconfig {
                    path: path.clone(),
                    source,
                })?
        }
        None => Config::infer().await?,
    };
    Ok(Client::try_from(config)?)
}

/// Starts the watches and the task that turns them into state. The store's `kubernetes` source
/// is first written once namespaces, pods and services have been listed.
pub fn start(
    client: Client,
    facts: ClusterFacts,
    node_name: String,
    store: Arc<StateStore>,
    readiness: Arc<Readiness>,
    find_netns: bool,
) -> Vec<JoinHandle<()>> {
    readiness.pending(READINESS_TASK);
    let changed = Arc::new(Notify::new());
    let mut tasks = Vec::new();
    let namespaces = mirror::<Namespace>(Api::all(client.clone()), (), &changed, &mut tasks);
    let pods = mirror::<Pod>(Api::all(client.clone()), (), &changed, &mut tasks);
    let services = mirror::<K8sService>(Api::all(client.clone()), (), &changed, &mut tasks);
    let (slices_tx, slices) = tokio::sync::oneshot::channel();
    let (policies_tx, policies) = tokio::sync::oneshot::channel();
    let (peer_authns_tx, peer_authns) = tokio::sync::oneshot::channel();
    let (service_entries_tx, service_entries) = tokio::sync::oneshot::channel();
    let (workload_entries_tx, workload_entries) = tokio::sync::oneshot::channel();
    tasks.push(tokio::spawn(mirror_discovered(
        client.clone(),
        "discovery.k8s.io",
        "EndpointSlice",
        changed.clone(),
        slices_tx,
    )));
    tasks.push(tokio::spawn(mirror_discovered(
        client.clone(),
        "security.istio.io",
        "AuthorizationPolicy",
        changed.clone(),
        policies_tx,
    )));
    tasks.push(tokio::spawn(mirror_discovered(
        client.clone(),
        "security.istio.io",
        "PeerAuthentication",
        changed.clone(),
        peer_authns_tx,
    )));
    tasks.push(tokio::spawn(mirror_discovered(
        client.clone(),
        "networking.istio.io",
        "ServiceEntry",
        changed.clone(),
        service_entries_tx,
    )));
    tasks.push(tokio::spawn(mirror_discovered(
        client,
        "networking.istio.io",
        "WorkloadEntry",
        changed.clone(),
        workload_entries_tx,
    )));
    tasks.push(tokio::spawn(async move {
        let mirrors = Mirrors {
            namespaces,
            pods,
            services,
            endpoint_slices: ready_or_absent(slices).await,
            policies: ready_or_absent(policies).await,
            peer_authns: ready_or_absent(peer_authns).await,
            service_entries: ready_or_absent(service_entries).await,
            workload_entries: ready_or_absent(workload_entries).await,
        };
        if mirrors.wait_listed().await {
            rebuild_forever(
                mirrors, facts, node_name, store, readiness, changed, find_netns,
            )
            .await;
        }
    }));
    tasks
}

/// The reflector copies of every watched kind.
struct Mirrors {
    namespaces: Store<Namespace>,
    pods: Store<Pod>,
    services: Store<K8sService>,
    /// Each is `None` while its API group is not served; the watch starts once it is, and the
    /// store appears in the cell then.
    endpoint_slices: Arc<arc_swap::ArcSwapOption<Store<DynamicObject>>>,
    policies: Arc<arc_swap::ArcSwapOption<Store<DynamicObject>>>,
    peer_authns: Arc<arc_swap::ArcSwapOption<Store<DynamicObject>>>,
    service_entries: Arc<arc_swap::ArcSwapOption<Store<DynamicObject>>>,
    workload_entries: Arc<arc_swap::ArcSwapOption<Store<DynamicObject>>>,
}

impl Mirrors {
    /// Waits until the core kinds have been listed once. False if a watch task ended.
    async fn wait_listed(&self) -> bool {
        self.namespaces.wait_until_ready().await.is_ok()
            && self.pods.wait_until_ready().await.is_ok()
            && self.services.wait_until_ready().await.is_ok()
    }

    fn view(&self) -> ClusterView {
        let dynamic = |cell: &arc_swap::ArcSwapOption<Store<DynamicObject>>| {
            cell.load().as_ref().map(|s| s.state()).unwrap_or_default()
        };
        ClusterView {
            namespaces: self.namespaces.state(),
            pods: self.pods.state(),
            services: self.services.state(),
            endpoint_slices: dynamic(&self.endpoint_slices),
            policies: dynamic(&self.policies),
            peer_authentications: dynamic(&self.peer_authns),
            service_entries: dynamic(&self.service_entries),
            workload_entries: dynamic(&self.workload_entries),
        }
    }
}

/// Mirrors one kind: watch (re-listing and backing off after errors) into a reflector store.
fn mirror<K>(
    api: Api<K>,
    dyntype: K::DynamicType,
    changed: &Arc<Notify>,
    tasks: &mut Vec<JoinHandle<()>>,
) -> Store<K>
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Eq + Hash + Clone + Send + Sync,
{
    let kind = K::kind(&dyntype).to_string();
    let writer = reflector::store::Writer::new(dyntype);
    let reader = writer.as_reader();
    let changed = changed.clone();
    tasks.push(tokio::spawn(async move {
        let mut events = watcher(api, watcher::Config::default())
            .default_backoff()
            .reflect(writer)
            .boxed();
        while let Some(event) = events.next().await {
            match event {
                Ok(_) => changed.notify_one(),
                // The watcher re-lists on its own after the back-off; the store keeps the last
                // known objects meanwhile, so pods stay captured through an API outage.
                Err(e) => warn!(%kind, error = %e, "Kubernetes watch failed; retrying"),
            }
        }
    }));
    reader
}

type DynamicCell = Arc<arc_swap::ArcSwapOption<Store<DynamicObject>>>;

/// Mirrors a kind whose API group may not be served (yet): discovers the version the server
/// prefers, retrying until it is served, then watches it. Sends the (initially empty) cell at
/// once, and whether the first discovery found the group, so start-up does not wait for a CRD
/// that is not installed.
async fn mirror_discovered(
    client: Client,
    group: &'static str,
    kind: &'static str,
    changed: Arc<Notify>,
    announce: tokio::sync::oneshot::Sender<(DynamicCell, Option<Store<DynamicObject>>)>,
) {
    let cell: DynamicCell = Arc::default();
    let mut announce = Some(announce);
    let mut warned = false;
    let resource = loop {
        match discover(&client, group, kind).await {
            Some(ar) => break ar,
            None => {
                if !warned {
                    warn!(
                        group,
                        kind, "API group not served (CRD not installed?); watching it once it is"
                    );
                    warned = true;
                }
                if let Some(tx) = announce.take() {
                    let _ = tx.send((cell.clone(), None));
                }
                tokio::time::sleep(DISCOVERY_RETRY).await;
            }
        }
    };
    info!(kind, version = %resource.api_version, "watching");
    let api: Api<DynamicObject> = Api::all_with(client, &resource);
    let mut tasks = Vec::new();
    let store = mirror::<DynamicObject>(api, resource, &changed, &mut tasks);
    cell.store(Some(Arc::new(store.clone())));
    match announce.take() {
        Some(tx) => {
            let _ = tx.send((cell, Some(store)));
        }
        None => changed.notify_one(),
    }
    for t in tasks {
        let _ = t.await;
    }
}

async fn discover(client: &Client, group: &str, kind: &str) -> Option<ApiResource> {
    match kube::discovery::group(client, group).await {
        Ok(g) => g.recommended_kind(kind).map(|(ar, _)| ar),
        Err(e) => {
            debug!(group, error = %e, "discovery");
            None
        }
    }
}

/// The cell of a discovered kind, after its first list when the group was served at start.
async fn ready_or_absent(
    rx: tokio::sync::oneshot::Receiver<(DynamicCell, Option<Store<DynamicObject>>)>,
) -> DynamicCell {
    match rx.await {
        Ok((cell, Some(store))) => {
            let _ = store.wait_until_ready().await;
            cell
        }
        Ok((cell, None)) => cell,
        Err(_) => Arc::default(),
    }
}

async fn rebuild_forever(
    mirrors: Mirrors,
    facts: ClusterFacts,
    node_name: String,
    store: Arc<StateStore>,
    readiness: Arc<Readiness>,
    changed: Arc<Notify>,
    find_netns: bool,
) {
    let mut finder = NetnsFinder::default();
    let mut last_rejected: Vec<String> = Vec::new();
    let mut first = true;
    loop {
        let view = mirrors.view();
        let (facts2, node) = (facts.clone(), node_name.clone());
        let result = tokio::task::spawn_blocking(move || {
            finder.begin();
            let t = translate::translate(
                &view,
                &facts2,
                |pod| pod.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node.as_str()),
                // Under istio-cni, pods are captured when handed over, never found.
                |w| find_netns.then(|| finder.netns_of(w)).flatten(),
            );
            finder.end();
            (finder, t)
        })
        .await;
        let Ok((f, translated)) = result else {
            warn!("Kubernetes state rebuild panicked; keeping the previous state");
            return;
        };
        finder = f;
        let rejected: Vec<String> = translated
            .rejected
            .iter()
            .map(|r| format!("{}: {}", r.key, r.error))
            .collect();
        if rejected != last_rejected {
            for r in &translated.rejected {
                warn!(object = %r.key, error = %r.error, "object rejected; the others stay in force");
            }
            last_rejected = rejected;
        }
        for p in &translated.data.policies {
            for w in &p.warnings {
                debug!(policy = %p.key(), warning = %w, "AuthorizationPolicy");
            }
        }
        let unresolved = finder.unresolved;
        store.replace_source(SOURCE, translated.data);
        if first {
            readiness.done(READINESS_TASK);
            info!("Kubernetes state synced");
            first = false;
        }
        // Wait for a change, or retry soon while a local pod's netns is still missing (the CNI
        // may add the address after the API says the pod has it).
        if unresolved > 0 {
            let _ = tokio::time::timeout(NETNS_RETRY, changed.notified()).await;
        } else {
            changed.notified().await;
        }
        tokio::time::sleep(DEBOUNCE).await;
    }
}
