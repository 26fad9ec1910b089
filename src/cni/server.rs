//! weft's side of weft-cni: a Unix socket on which each connection carries one capture
//! request. ADD decides whether the pod is in the mesh (the Kubernetes API when weft watches
//! it, else weft's state), captures it through the enroller in the namespace the runtime
//! named, records it, and only then answers; DEL releases it; CHECK reports.
//!
//! The record (one small file per pod under the state directory, on the node's tmpfs) is what
//! a restarted weft serves again before it says it is ready: the pods' namespaces outlive
//! weft, and the runtime will not call ADD for them a second time.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::{Api, Client};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Semaphore;
use tracing::{info, warn};

use super::wire::{CaptureCommand, CaptureReply, CaptureRequest, MAX_REQUEST};
use crate::capture::enroll::{Enroller, HandedPod};
use crate::capture::netns::Netns;
use crate::capture::pod::RulesBy;
use crate::k8s::translate::{namespace_is_ambient, pod_is_ambient};

/// A request must arrive whole within this time.
const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Requests served at once; more wait (a node starts pods in bursts).
const CONCURRENT: usize = 16;

#[derive(Clone, Debug)]
pub struct CniServerSettings {
    pub socket: PathBuf,
    pub state_dir: PathBuf,
}

/// A handed pod as recorded on disk.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Record {
    request: CaptureRequest,
    service_account: String,
}

pub struct CniServer {
    settings: CniServerSettings,
    enroller: Arc<Enroller>,
    kube: Option<Client>,
    limit: Semaphore,
}

impl CniServer {
    pub fn new(
        settings: CniServerSettings,
        enroller: Arc<Enroller>,
        kube: Option<Client>,
    ) -> Arc<Self> {
        Arc::new(CniServer {
            settings,
            enroller,
            kube,
            limit: Semaphore::new(CONCURRENT),
        })
    }

    /// Serves again the pods recorded by an earlier weft. A pod whose namespace is gone is
    /// forgotten. Returns how many were restored.
    pub async fn restore(self: &Arc<Self>) -> usize {
        let me = self.clone();
        tokio::task::spawn_blocking(move || me.restore_blocking())
            .await
            .unwrap_or(0)
    }

    fn restore_blocking(&self) -> usize {
        let entries = match std::fs::read_dir(&self.settings.state_dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return 0,
            Err(e) => {
                warn!(dir = %self.settings.state_dir.display(), error = %e, "cannot read the record of handed pods");
                return 0;
            }
        };
        let mut restored = 0;
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().is_none_or(|e| e != "json") {
                continue;
            }
            let record = std::fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice::<Record>(&b).map_err(|e| e.to_string()));
            let record = match record {
                Ok(r) => r,
                Err(e) => {
                    warn!(file = %path.display(), error = %e, "unreadable record of a handed pod; removing it");
                    let _ = std::fs::remove_file(&path);
                    continue;
                }
            };
            let pod = format!(
                "{}/{}",
                record.request.pod_namespace, record.request.pod_name
            );
            match self.capture(&record.request, &record.service_account) {
                Ok(()) => {
                    info!(%pod, "pod handed to an earlier weft served again");
                    restored += 1;
                }
                Err(e) => {
                    info!(%pod, error = %e, "pod handed to an earlier weft is gone; forgetting it");
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
        restored
    }

    /// Accepts forever. The socket is re-created (a stale one from an earlier weft is
    /// removed) and only root may use it.
    pub async fn serve(self: Arc<Self>) -> anyhow::Result<tokio::task::JoinHandle<()>> {
        let path = self.settings.socket.clone();
        let listener = tokio::task::spawn_blocking(move || bind(&path)).await??;
        let me = self.clone();
        Ok(tokio::spawn(async move {
            loop {
                match listener.accept().await {
                    Ok((stream, _)) => {
                        let me = me.clone();
                        tokio::spawn(async move { me.connection(stream).await });
                    }
                    Err(e) => {
                        warn!(error = %e, "CNI socket: accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        }))
    }

    async fn connection(&self, mut stream: UnixStream) {
        let Ok(_permit) = self.limit.acquire().await else {
            return;
        };
        let reply = match read_request(&mut stream).await {
            Ok(req) => self.handle(req).await,
            Err(e) => {
                warn!(error = %e, "CNI socket: bad request");
                CaptureReply {
                    captured: false,
                    error: Some(e),
                }
            }
        };
        let mut bytes = serde_json::to_vec(&reply).unwrap_or_default();
        bytes.push(b'\n');
        if let Err(e) = stream.write_all(&bytes).await {
            warn!(error = %e, "CNI socket: the plugin left before the reply");
        }
    }

    async fn handle(&self, req: CaptureRequest) -> CaptureReply {
        let pod = format!("{}/{}", req.pod_namespace, req.pod_name);
        let result = match req.command {
            CaptureCommand::Add => self.add(&req).await,
            CaptureCommand::Del => self.del(&req).await.map(|()| false),
            CaptureCommand::Check => self.check(&req).await,
        };
        match result {
            Ok(captured) => {
                info!(%pod, command = ?req.command, captured, "CNI request served");
                CaptureReply {
                    captured,
                    error: None,
                }
            }
            Err(e) => {
                warn!(%pod, command = ?req.command, error = %e, "CNI request refused");
                CaptureReply {
                    captured: false,
                    error: Some(e),
                }
            }
        }
    }

    async fn add(&self, req: &CaptureRequest) -> Result<bool, String> {
        let Some(service_account) = self.admit(req).await? else {
            return Ok(false);
        };
        let (me, req) = (self.handle_for_blocking(), req.clone());
        tokio::task::spawn_blocking(move || {
            me.capture(&req, &service_account)?;
            me.record(&req, &service_account)
        })
        .await
        .map_err(|e| format!("capture task failed: {e}"))??;
        Ok(true)
    }

    async fn del(&self, req: &CaptureRequest) -> Result<(), String> {
        let (me, req) = (self.handle_for_blocking(), req.clone());
        tokio::task::spawn_blocking(move || {
            me.enroller.release_handed(req.pod_key());
            match std::fs::remove_file(me.record_path(req.pod_key())?) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(format!("removing the pod's record: {e}")),
            }
        })
        .await
        .map_err(|e| format!("release task failed: {e}"))?
    }

    /// Whether the pod is as it should be: captured if it is in the mesh.
    async fn check(&self, req: &CaptureRequest) -> Result<bool, String> {
        let wanted = self.admit(req).await?.is_some();
        let captured = self
            .enroller
            .handed_pods()
            .iter()
            .any(|k| k == req.pod_key());
        if wanted && !captured {
            return Err("the pod is in the mesh but weft does not capture it".into());
        }
        Ok(captured)
    }

    /// Whether the pod is to be captured, and as which service account. With the Kubernetes
    /// API the namespace and pod are read from it (the pod may be too new for weft's watch);
    /// without, weft's state must list the workload.
    async fn admit(&self, req: &CaptureRequest) -> Result<Option<String>, String> {
        let (ns, name) = (&req.pod_namespace, &req.pod_name);
        if ns.is_empty() || name.is_empty() {
            return Err("no pod namespace or name (K8S_POD_NAMESPACE, K8S_POD_NAME)".into());
        }
        match &self.kube {
            Some(client) => {
                let namespace = Api::<Namespace>::all(client.clone())
                    .get(ns)
                    .await
                    .map_err(|e| format!("reading namespace {ns}: {e}"))?;
                let pod = Api::<Pod>::namespaced(client.clone(), ns)
                    .get(name)
                    .await
                    .map_err(|e| format!("reading pod {ns}/{name}: {e}"))?;
                if !pod_is_ambient(&pod, namespace_is_ambient(&namespace)) {
                    return Ok(None);
                }
                Ok(Some(
                    pod.spec
                        .and_then(|s| s.service_account_name)
                        .filter(|s| !s.is_empty())
                        .unwrap_or_else(|| "default".into()),
                ))
            }
            None => {
                let snap = self.enroller.context().state.snapshot();
                Ok(snap
                    .workloads
                    .values()
                    .find(|w| &w.namespace == ns && &w.name == name)
                    .map(|w| w.service_account.clone()))
            }
        }
    }

    fn handle_for_blocking(&self) -> Blocking {
        Blocking {
            enroller: self.enroller.clone(),
            state_dir: self.settings.state_dir.clone(),
        }
    }

    fn capture(&self, req: &CaptureRequest, service_account: &str) -> Result<(), String> {
        self.handle_for_blocking().capture(req, service_account)
    }
}

/// The blocking half of a request, moved to the blocking pool.
struct Blocking {
    enroller: Arc<Enroller>,
    state_dir: PathBuf,
}

impl Blocking {
    fn capture(&self, req: &CaptureRequest, service_account: &str) -> Result<(), String> {
        let path = req
            .netns
            .as_deref()
            .filter(|p| !p.is_empty())
            .ok_or("no network namespace (CNI_NETNS)")?;
        let netns = Netns::open(path).map_err(|e| e.to_string())?;
        self.enroller
            .adopt(HandedPod {
                pod_uid: req.pod_key().to_string(),
                name: req.pod_name.clone(),
                namespace: req.pod_namespace.clone(),
                service_account: service_account.to_string(),
                ips: req.ips.clone(),
                netns,
                rules_by: RulesBy::Weft,
            })
            .map_err(|e| e.to_string())
    }

    fn record_path(&self, key: &str) -> Result<PathBuf, String> {
        if key.is_empty()
            || !key
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
            || key.starts_with('.')
        {
            return Err(format!("pod key {key:?} is not a plain name"));
        }
        Ok(self.state_dir.join(format!("{key}.json")))
    }

    /// Writes the pod's record atomically (temporary file, then rename).
    fn record(&self, req: &CaptureRequest, service_account: &str) -> Result<(), String> {
        let path = self.record_path(req.pod_key())?;
        let record = Record {
            request: req.clone(),
            service_account: service_account.to_string(),
        };
        let bytes = serde_json::to_vec(&record).map_err(|e| e.to_string())?;
        let write = || -> io::Result<()> {
            std::fs::create_dir_all(&self.state_dir)?;
            let tmp = path.with_extension("json.tmp");
            std::fs::write(&tmp, &bytes)?;
            std::fs::rename(&tmp, &path)
        };
        write().map_err(|e| format!("recording the pod in {}: {e}", path.display()))
    }
}

fn bind(path: &Path) -> io::Result<UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let std_listener = std::os::unix::net::UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    std_listener.set_nonblocking(true)?;
    UnixListener::from_std(std_listener)
}

/// Reads one request: a JSON object, whole within the time and size limits.
async fn read_request(stream: &mut UnixStream) -> Result<CaptureRequest, String> {
    let mut buf = Vec::with_capacity(1024);
    let read = async {
        let mut chunk = [0u8; 4096];
        loop {
            let n = stream.read(&mut chunk).await.map_err(|e| e.to_string())?;
            if n == 0 {
                return Ok::<(), String>(());
            }
            buf.extend_from_slice(&chunk[..n]);
            if buf.len() > MAX_REQUEST {
                return Err(format!("request longer than {MAX_REQUEST} bytes"));
            }
            if buf.contains(&b'\n') {
                return Ok(());
            }
        }
    };
    tokio::time::timeout(READ_TIMEOUT, read)
        .await
        .map_err(|_| format!("no whole request within {READ_TIMEOUT:?}"))??;
    serde_json::from_slice(&buf).map_err(|e| format!("malformed request: {e}"))
}
