//! Enrollment: the one entry point through which a workload becomes captured by this node, from
//! whichever source (local file, Kubernetes) said so, and through which it is released.
//!
//! The enroller reconciles: after every state change it compares the local workloads that should
//! be captured with those that are, and starts or stops their proxies (and, for pods, their
//! capture rules). Failures are retried on a timer, so a pod whose netns is not there yet is
//! picked up once it is.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use tracing::{info, warn};

use super::pod::PodNetwork;
use crate::identity::Identity;
use crate::proxy::{DestinationMode, ListenerSet, LocalSockets, ProxyContext, WorkloadProxy};
use crate::state::{Netns, Snapshot, Workload};

const RETRY_EVERY: Duration = Duration::from_secs(2);

/// What about a workload, if it changes, needs its capture rebuilt.
#[derive(Clone, Debug, PartialEq, Eq)]
struct CaptureShape {
    netns: Netns,
    ips: Vec<IpAddr>,
    identity: Identity,
}

impl CaptureShape {
    fn of(w: &Workload) -> Option<Self> {
        Some(CaptureShape {
            netns: w.netns.clone()?,
            ips: w.workload_ips.clone(),
            identity: w.identity(),
        })
    }
}

struct Enrolled {
    shape: CaptureShape,
    name: String,
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
}

pub struct Enroller {
    ctx: Arc<ProxyContext>,
    node: String,
    enrolled: Mutex<HashMap<String, Enrolled>>,
}

impl Enroller {
    pub fn new(ctx: Arc<ProxyContext>, node: String) -> Arc<Self> {
        Arc::new(Enroller {
            ctx,
            node,
            enrolled: Mutex::new(HashMap::new()),
        })
    }

    pub fn context(&self) -> &Arc<ProxyContext> {
        &self.ctx
    }

    fn mine(&self, w: &Workload) -> bool {
        w.netns.is_some() && (w.node.is_empty() || self.node.is_empty() || w.node == self.node)
    }

    /// Brings the set of captured workloads in line with `snap`. Returns how many failed.
    pub fn reconcile(&self, snap: &Snapshot) -> usize {
        let desired: HashMap<&str, &Arc<Workload>> = snap
            .workloads
            .values()
            .filter(|w| self.mine(w))
            .map(|w| (w.uid.as_str(), w))
            .collect();
        let mut enrolled = self.enrolled.lock().unwrap_or_else(|p| p.into_inner());
        let stale: Vec<String> = enrolled
            .iter()
            .filter(|(uid, e)| {
                desired
                    .get(uid.as_str())
                    .is_none_or(|w| CaptureShape::of(w).as_ref() != Some(&e.shape))
            })
            .map(|(uid, _)| uid.clone())
            .collect();
        let certs = self.ctx.tls.cert_manager();
        for uid in stale {
            if let Some(e) = enrolled.remove(&uid) {
                let identity = e.shape.identity.clone();
                release(e);
                certs.release(&identity, &uid);
            }
        }
        let mut failures = 0;
        for (uid, w) in desired {
            if enrolled.contains_key(uid) {
                continue;
            }
            match self.enroll(w) {
                Ok(e) => {
                    // Its certificate is issued in the background from now on; its first
                    // connections wait for it.
                    certs.enroll(&e.shape.identity, uid);
                    enrolled.insert(uid.to_string(), e);
                }
                Err(err) => {
                    failures += 1;
                    warn!(workload = %format!("{}/{}", w.namespace, w.name), error = %err, "could not capture workload; will retry");
                }
            }
        }
        self.ctx.metrics.captured_pods.set(enrolled.len() as i64);
        failures
    }

    fn enroll(&self, w: &Workload) -> Result<Enrolled, anyhow::Error> {
        let shape =
            CaptureShape::of(w).ok_or_else(|| anyhow::anyhow!("workload is not captured"))?;
        let name = format!("{}/{}", w.namespace, w.name);
        let (proxy, capture) = match &shape.netns {
            Netns::Here => {
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
                (proxy, None)
            }
            Netns::Pod(path) => {
                let pod = PodNetwork::open(path, &self.ctx.settings)?;
                let listen = ListenerSet::wildcard(&self.ctx, pod.has_ipv6());
                // Listeners first: from the moment the rules are in, the pod's connections
                // arrive at them.
                let proxy = WorkloadProxy::start(
                    self.ctx.clone(),
                    w,
                    pod.sockets(),
                    &listen,
                    DestinationMode::Original,
                )?;
                pod.install()?;
                (proxy, Some(pod))
            }
        };
        info!(workload = %name, uid = %w.uid, netns = ?shape.netns, "workload captured");
        Ok(Enrolled {
            shape,
            name,
            proxy,
            capture,
        })
    }

    /// Shutdown: listeners close, but the pods' rules stay. A new weft (rolling update) binds
    /// the same ports with SO_REUSEPORT and re-installs the same rules idempotently; removing
    /// them here would leave the pods uncaptured in between. Un-enrolling is what removes rules.
    pub fn stop_listening(&self) {
        let mut enrolled = self.enrolled.lock().unwrap_or_else(|p| p.into_inner());
        for (_, mut e) in enrolled.drain() {
            e.proxy.stop();
        }
        self.ctx.metrics.captured_pods.set(0);
    }

    pub fn summaries(&self) -> Vec<CapturedSummary> {
        let enrolled = self.enrolled.lock().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<CapturedSummary> = enrolled
            .iter()
            .map(|(uid, e)| CapturedSummary {
                uid: uid.clone(),
                name: e.name.clone(),
                netns: match &e.shape.netns {
                    Netns::Here => "self".to_string(),
                    Netns::Pod(p) => p.display().to_string(),
                },
                addresses: e.shape.ips.iter().map(ToString::to_string).collect(),
            })
            .collect();
        out.sort_by(|a, b| a.uid.cmp(&b.uid));
        out
    }

    /// Reconciles on every state change, and retries failures on a timer.
    pub async fn run(self: Arc<Self>) {
        let mut changes = self.ctx.state.subscribe();
        loop {
            let failures = self.reconcile(&self.ctx.state.snapshot());
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
