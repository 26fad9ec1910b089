//! Enrollment: the one entry point through which a workload becomes captured by this node, from
//! whichever source (local file, Kubernetes) said so, and through which it is released.
//!
//! The enroller reconciles: after every state change it compares the local workloads that should
//! be captured with those that are, and starts or stops their proxies (and, for pods, their
//! capture rules). Failures are retried on a timer, so a pod whose netns is not there yet is
//! picked up once it is.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use tracing::{info, warn};

use super::netns::{Netns as NetnsHandle, NsId};
use super::pod::{PodNetwork, RulesBy};
use crate::identity::Identity;
use crate::proxy::{DestinationMode, ListenerSet, LocalSockets, ProxyContext, WorkloadProxy};
use crate::state::{Netns, Snapshot, Workload};

const RETRY_EVERY: Duration = Duration::from_secs(2);

/// A pod whose network namespace the CNI layer handed to weft (weft-cni, or istio-cni over
/// ZDS) instead of weft finding it: the namespace is already open, and the pod may not be in
/// weft's state yet (its IP is assigned moments before), so the hand-off says who it is.
pub struct HandedPod {
    /// The Kubernetes pod UID, as the hand-off names the pod.
    pub pod_uid: String,
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    /// The pod's addresses, when the hand-off knows them (CNI's prevResult; ZDS does not say).
    pub ips: Vec<IpAddr>,
    pub netns: NetnsHandle,
    pub rules_by: RulesBy,
}

struct Handed {
    pod: HandedPod,
    /// Stands for the pod until the control plane knows it.
    workload: Arc<Workload>,
}

/// Where a desired workload's sockets are to live.
#[derive(Clone, Copy)]
enum Place<'a> {
    Here,
    Path(&'a PathBuf),
    Handed(&'a HandedPod),
}

/// Which namespace a capture is in, as far as "has it changed" goes.
#[derive(Clone, Debug, PartialEq, Eq)]
enum NetnsKey {
    Here,
    Path(PathBuf),
    Handed(NsId, RulesBy),
}

/// What about a workload, if it changes, needs its capture rebuilt.
#[derive(Clone, Debug, PartialEq, Eq)]
struct CaptureShape {
    netns: NetnsKey,
    /// The listeners' addresses in weft's own namespace; pods listen on wildcards, so their
    /// addresses changing needs no rebuild.
    ips: Vec<IpAddr>,
    identity: Identity,
}

impl CaptureShape {
    fn of(w: &Workload, place: Place<'_>) -> Self {
        let (netns, ips) = match place {
            Place::Here => (NetnsKey::Here, w.workload_ips.clone()),
            Place::Path(p) => (NetnsKey::Path(p.clone()), Vec::new()),
            Place::Handed(h) => (NetnsKey::Handed(h.netns.id(), h.rules_by), Vec::new()),
        };
        CaptureShape {
            netns,
            ips,
            identity: w.identity(),
        }
    }
}

struct Enrolled {
    shape: CaptureShape,
    name: String,
    /// Handed over by the CNI layer (its Kubernetes UID): when released, the pod is gone, so
    /// its connections close.
    handed: Option<String>,
    info: WorkloadInfo,
    netns_label: String,
    addresses: Vec<IpAddr>,
    proxy: WorkloadProxy,
    /// Rules and routes installed in the pod (None for weft's own namespace).
    capture: Option<PodNetwork>,
}

/// What /config_dump shows for a captured workload.
#[derive(Serialize)]
pub struct CapturedSummary {
    pub uid: String,
    pub name: String,
    pub netns: String,
    pub addresses: Vec<String>,
    /// The Kubernetes pod UID of a pod handed over by the CNI layer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod_uid: Option<String>,
    #[serde(skip)]
    pub info: WorkloadInfo,
}

/// Who a captured workload is, as ztunnel's `workloadState` shows it.
#[derive(Clone, Debug, Default)]
pub struct WorkloadInfo {
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    pub trust_domain: String,
}

#[derive(Default)]
struct Books {
    enrolled: HashMap<String, Enrolled>,
    /// Handed pods by workload uid.
    handed: HashMap<String, Handed>,
}

/// Why a handed pod could not be captured; the hand-off reports it to the CNI layer.
#[derive(Debug, thiserror::Error)]
#[error("capturing {pod}: {reason}")]
pub struct AdoptError {
    pub pod: String,
    pub reason: String,
}

pub struct Enroller {
    ctx: Arc<ProxyContext>,
    node: String,
    books: Mutex<Books>,
}

impl Enroller {
    pub fn new(ctx: Arc<ProxyContext>, node: String) -> Arc<Self> {
        Arc::new(Enroller {
            ctx,
            node,
            books: Mutex::new(Books::default()),
        })
    }

    pub fn context(&self) -> &Arc<ProxyContext> {
        &self.ctx
    }

    fn books(&self) -> std::sync::MutexGuard<'_, Books> {
        self.books.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn mine(&self, w: &Workload) -> bool {
        w.netns.is_some() && (w.node.is_empty() || self.node.is_empty() || w.node == self.node)
    }

    /// The uid the control plane gives a pod (`cluster//Pod/namespace/name`, as istiod and
    /// weft's Kubernetes source both do), so a handed pod and its state entry are one workload.
    pub fn workload_uid(&self, namespace: &str, name: &str) -> String {
        format!("{}//Pod/{namespace}/{name}", self.ctx.settings.cluster_id)
    }

    /// Brings the set of captured workloads in line with `snap`. Returns how many failed.
    /// Blocking (netns workers, `nft`): from async code, call it on the blocking pool.
    pub fn reconcile(&self, snap: &Snapshot) -> usize {
        let mut books = self.books();
        self.reconcile_locked(&mut books, snap).len()
    }

    /// Reconciles and returns the failures by workload uid.
    fn reconcile_locked(&self, books: &mut Books, snap: &Snapshot) -> HashMap<String, String> {
        let Books { enrolled, handed } = books;
        let mut desired: HashMap<&str, (&Workload, Place<'_>)> = HashMap::new();
        for w in snap.workloads.values().filter(|w| self.mine(w)) {
            let place = match &w.netns {
                Some(Netns::Here) => Place::Here,
                Some(Netns::Pod(p)) => Place::Path(p),
                None => continue,
            };
            desired.insert(w.uid.as_str(), (w.as_ref(), place));
        }
        // A handed namespace wins over one found by scanning; the control plane's view of the
        // pod wins over what the hand-off said about it, once it has one.
        for (uid, h) in handed.iter() {
            let w = snap
                .workload_by_uid(uid)
                .map_or(h.workload.as_ref(), AsRef::as_ref);
            desired.insert(uid.as_str(), (w, Place::Handed(&h.pod)));
        }
        let stale: Vec<String> = enrolled
            .iter()
            .filter(|(uid, e)| {
                desired
                    .get(uid.as_str())
                    .is_none_or(|(w, place)| CaptureShape::of(w, *place) != e.shape)
            })
            .map(|(uid, _)| uid.clone())
            .collect();
        let certs = self.ctx.tls.cert_manager();
        for uid in stale {
            if let Some(e) = enrolled.remove(&uid) {
                let identity = e.shape.identity.clone();
                let handed = e.handed.is_some();
                release(e);
                if handed {
                    // A handed pod that leaves is gone (or moved): its connections go too.
                    let closed = self.ctx.tracker.close_all_to(&uid);
                    info!(uid = %uid, closed, "closed the released pod's connections");
                }
                certs.release(&identity, &uid);
            }
        }
        let mut failures = HashMap::new();
        for (uid, (w, place)) in desired {
            if enrolled.contains_key(uid) {
                continue;
            }
            match self.enroll(w, place) {
                Ok(e) => {
                    // Its certificate is issued in the background from now on; its first
                    // connections wait for it.
                    certs.enroll(&e.shape.identity, uid);
                    enrolled.insert(uid.to_string(), e);
                }
                Err(err) => {
                    warn!(workload = %format!("{}/{}", w.namespace, w.name), error = %err, "could not capture workload; will retry");
                    failures.insert(uid.to_string(), format!("{err:#}"));
                }
            }
        }
        self.ctx.metrics.captured_pods.set(enrolled.len() as i64);
        failures
    }

    /// Captures a pod handed over by the CNI layer, now: when this returns Ok its listeners
    /// are up (and weft's rules, if weft installs them), so the pod's first connection is
    /// captured. A pod handed again in the same namespace is left as it is. Blocking.
    pub fn adopt(&self, pod: HandedPod) -> Result<(), AdoptError> {
        let snap = self.ctx.state.snapshot();
        // The control plane's entry for the pod, if it has one already, names the workload.
        let uid = snap
            .workloads
            .values()
            .find(|w| {
                w.namespace == pod.namespace
                    && w.name == pod.name
                    && (w.node.is_empty() || self.node.is_empty() || w.node == self.node)
            })
            .map_or_else(
                || self.workload_uid(&pod.namespace, &pod.name),
                |w| w.uid.clone(),
            );
        let label = format!("{}/{}", pod.namespace, pod.name);
        let workload = Arc::new(Workload {
            uid: uid.clone(),
            name: pod.name.clone(),
            namespace: pod.namespace.clone(),
            service_account: pod.service_account.clone(),
            trust_domain: self.ctx.settings.trust_domain.clone(),
            cluster_id: self.ctx.settings.cluster_id.clone(),
            workload_ips: pod.ips.clone(),
            protocol: crate::state::Protocol::HBONE,
            node: self.node.clone(),
            netns: Some(Netns::Pod(pod.netns.path().to_path_buf())),
            ..Workload::default()
        });
        let mut books = self.books();
        let previous = books.handed.insert(uid.clone(), Handed { pod, workload });
        let failures = self.reconcile_locked(&mut books, &snap);
        match failures.get(&uid) {
            None => Ok(()),
            Some(reason) => {
                // Refused: what was there before stays (a re-sent pod keeps serving).
                match previous {
                    Some(p) => {
                        books.handed.insert(uid.clone(), p);
                    }
                    None => {
                        books.handed.remove(&uid);
                    }
                }
                Err(AdoptError {
                    pod: label,
                    reason: reason.clone(),
                })
            }
        }
    }

    /// Releases a handed pod by its Kubernetes UID: listeners close, weft's rules (if any) go,
    /// its connections close. Returns whether it was handed. Blocking.
    pub fn release_handed(&self, pod_uid: &str) -> bool {
        let snap = self.ctx.state.snapshot();
        let mut books = self.books();
        let before = books.handed.len();
        books.handed.retain(|_, h| h.pod.pod_uid != pod_uid);
        let found = books.handed.len() != before;
        if found {
            self.reconcile_locked(&mut books, &snap);
        }
        found
    }

    /// Kubernetes UIDs of the handed pods.
    pub fn handed_pods(&self) -> Vec<String> {
        self.books()
            .handed
            .values()
            .map(|h| h.pod.pod_uid.clone())
            .collect()
    }

    fn enroll(&self, w: &Workload, place: Place<'_>) -> Result<Enrolled, anyhow::Error> {
        let shape = CaptureShape::of(w, place);
        let name = format!("{}/{}", w.namespace, w.name);
        let (proxy, capture, netns_label) = match place {
            Place::Here => {
                let factory = Arc::new(LocalSockets {
                    mark: Some(self.ctx.settings.mark),
                });
                let listen = ListenerSet::on_workload_ips(&self.ctx, w);
                let proxy = WorkloadProxy::start(
                    self.ctx.clone(),
                    w,
                    factory,
                    &listen,
                    DestinationMode::Original,
                )?;
                (proxy, None, "self".to_string())
            }
            Place::Path(path) => {
                let dns = self.ctx.settings.dns.captures(w.dns_capture);
                let pod = PodNetwork::open(path, &self.ctx.settings, dns)?;
                let proxy = self.start_in_pod(w, &pod)?;
                (proxy, Some(pod), path.display().to_string())
            }
            Place::Handed(h) => {
                let dns = self.ctx.settings.dns.captures(w.dns_capture);
                let pod = PodNetwork::new(h.netns.clone(), &self.ctx.settings, h.rules_by, dns)?;
                let proxy = self.start_in_pod(w, &pod)?;
                (proxy, Some(pod), h.netns.path().display().to_string())
            }
        };
        info!(workload = %name, uid = %w.uid, netns = %netns_label, "workload captured");
        Ok(Enrolled {
            shape,
            name,
            handed: match place {
                Place::Handed(h) => Some(h.pod_uid.clone()),
                _ => None,
            },
            info: WorkloadInfo {
                name: w.name.clone(),
                namespace: w.namespace.clone(),
                service_account: w.service_account.clone(),
                trust_domain: w.trust_domain.clone(),
            },
            netns_label,
            addresses: w.workload_ips.clone(),
            proxy,
            capture,
        })
    }

    fn start_in_pod(&self, w: &Workload, pod: &PodNetwork) -> Result<WorkloadProxy, anyhow::Error> {
        let listen = ListenerSet::wildcard(&self.ctx, pod.has_ipv6());
        // Listeners first: from the moment the rules are in, the pod's connections arrive at
        // them.
        let mut proxy = WorkloadProxy::start(
            self.ctx.clone(),
            w,
            pod.sockets(),
            &listen,
            DestinationMode::Original,
        )?;
        if pod.captures_dns() {
            let dns = crate::dns::PodDns::start(
                self.ctx.clone(),
                w,
                pod.sockets(),
                pod.netns().id(),
                pod.has_ipv6(),
            )
            .map_err(|e| {
                anyhow::anyhow!(
                    "DNS proxy for {}/{} on port {}: {e}",
                    w.namespace,
                    w.name,
                    self.ctx.settings.ports.dns
                )
            })?;
            proxy.attach_dns(dns);
        }
        pod.install()?;
        Ok(proxy)
    }

    /// Shutdown: listeners close, but the pods' rules stay. A new weft (rolling update) binds
    /// the same ports with SO_REUSEPORT and re-installs the same rules idempotently; removing
    /// them here would leave the pods uncaptured in between. Un-enrolling is what removes rules.
    pub fn stop_listening(&self) {
        let mut books = self.books();
        for (_, mut e) in books.enrolled.drain() {
            e.proxy.stop();
        }
        self.ctx.metrics.captured_pods.set(0);
    }

    pub fn summaries(&self) -> Vec<CapturedSummary> {
        let books = self.books();
        let mut out: Vec<CapturedSummary> = books
            .enrolled
            .iter()
            .map(|(uid, e)| CapturedSummary {
                uid: uid.clone(),
                name: e.name.clone(),
                netns: e.netns_label.clone(),
                addresses: e.addresses.iter().map(ToString::to_string).collect(),
                pod_uid: e.handed.clone(),
                info: e.info.clone(),
            })
            .collect();
        out.sort_by(|a, b| a.uid.cmp(&b.uid));
        out
    }

    /// Reconciles on every state change, and retries failures on a timer. The reconcile
    /// itself runs on the blocking pool.
    pub async fn run(self: Arc<Self>) {
        let mut changes = self.ctx.state.subscribe();
        loop {
            let failures = self.clone().reconcile_blocking().await;
            if failures > 0 {
                tokio::select! {
                    _ = changes.changed() => {}
                    () = tokio::time::sleep(RETRY_EVERY) => {}
                }
            } else if changes.changed().await.is_err() {
                return;
            }
        }
    }

    /// [`Enroller::reconcile`] with the current state, on the blocking pool.
    pub async fn reconcile_blocking(self: Arc<Self>) -> usize {
        tokio::task::spawn_blocking(move || self.reconcile(&self.ctx.state.snapshot()))
            .await
            .unwrap_or(1)
    }
}

/// Un-enrolls: listeners stop accepting at once (connections in flight drain on their own), then
/// the pod's rules are removed so its traffic flows uncaptured.
fn release(mut e: Enrolled) {
    e.proxy.stop();
    if let Some(pod) = e.capture.take() {
        if let Err(err) = pod.uninstall() {
            warn!(workload = %e.name, error = %err, "removing capture rules failed");
        }
    }
    info!(workload = %e.name, "workload released");
}
