//! ZDS: weft as the node proxy that istio-cni's node agent hands pods to.
//!
//! weft connects to the agent's Unix socket and says hello; the agent then sends every pod it
//! has captured (`Add`, each with the pod's netns as a descriptor, or `Keep` for one weft
//! already serves), then `SnapshotSent`, then changes as they happen. weft answers every
//! request with an `Ack` whose error, if any, refuses it. Under istio-cni the redirection
//! rules are the agent's: weft only opens its listeners in the namespace it is given.
//!
//! The pods weft serves outlive a connection: when the agent restarts, weft reconnects and the
//! new snapshot names them again (`Add` for a pod it already serves in the same namespace
//! changes nothing); only pods missing from the snapshot are released.

pub mod socket;

use std::collections::HashSet;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use prost::Message;
use tracing::{debug, info, warn};

use crate::admin::Readiness;
use crate::capture::enroll::{Enroller, HandedPod};
use crate::capture::netns::Netns;
use crate::capture::pod::RulesBy;
use crate::proto::zds::{
    workload_request::Payload, workload_response, Ack, AddWorkload, Version, WorkloadRequest,
    WorkloadResponse, ZdsHello,
};
use socket::{Packet, SeqpacketStream};

/// istio-cni's default socket path (ztunnel's `INPOD_UDS`).
pub const DEFAULT_SOCKET: &str = "/var/run/ztunnel/ztunnel.sock";

const READINESS_TASK: &str = "zds snapshot";
const RECONNECT_EVERY: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("connecting: {0}")]
    Connect(std::io::Error),
    #[error("socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("the node agent closed the connection")]
    Closed,
}

/// Starts the client; it runs (reconnecting) until the task is aborted. Readiness waits for
/// the first snapshot: before it weft does not know which pods it must serve.
pub fn start(
    socket: PathBuf,
    enroller: Arc<Enroller>,
    readiness: Arc<Readiness>,
) -> tokio::task::JoinHandle<()> {
    readiness.pending(READINESS_TASK);
    tokio::spawn(run(socket, enroller, readiness))
}

async fn run(path: PathBuf, enroller: Arc<Enroller>, readiness: Arc<Readiness>) {
    let mut warned = false;
    loop {
        match session(&path, &enroller, &readiness).await {
            Err(SessionError::Connect(e)) => {
                // The agent may not be up yet; say so once, then quietly retry.
                if !warned {
                    warn!(socket = %path.display(), error = %e, "cannot reach the CNI node agent; retrying every second");
                    warned = true;
                } else {
                    debug!(socket = %path.display(), error = %e, "cannot reach the CNI node agent");
                }
            }
            Err(e) => {
                warn!(socket = %path.display(), error = %e, "ZDS connection ended; reconnecting (captured pods keep being served)");
                warned = false;
            }
            Ok(()) => {}
        }
        tokio::time::sleep(RECONNECT_EVERY).await;
    }
}

async fn session(
    path: &std::path::Path,
    enroller: &Arc<Enroller>,
    readiness: &Readiness,
) -> Result<(), SessionError> {
    let conn = SeqpacketStream::connect(path).map_err(SessionError::Connect)?;
    let hello = ZdsHello {
        version: Version::V1 as i32,
    };
    conn.send(&hello.encode_to_vec()).await?;
    info!(socket = %path.display(), "connected to the CNI node agent");
    // Pods named in this connection's snapshot (Add or Keep) until SnapshotSent.
    let mut snapshot: Option<HashSet<String>> = Some(HashSet::new());
    loop {
        let packet = conn.recv().await?.ok_or(SessionError::Closed)?;
        let answer = handle(packet, enroller, &mut snapshot, readiness).await;
        if let Err(reason) = &answer {
            warn!(error = %reason, "ZDS request refused");
        }
        let ack = WorkloadResponse {
            payload: Some(workload_response::Payload::Ack(Ack {
                error: answer.err().unwrap_or_default(),
            })),
        };
        conn.send(&ack.encode_to_vec()).await?;
    }
}

/// Serves one request; the error string is the refusal sent back in the Ack.
async fn handle(
    packet: Packet,
    enroller: &Arc<Enroller>,
    snapshot: &mut Option<HashSet<String>>,
    readiness: &Readiness,
) -> Result<(), String> {
    let Packet {
        bytes,
        mut fds,
        truncated,
    } = packet;
    if truncated {
        return Err(format!(
            "message longer than {} bytes or with too many descriptors",
            socket::MAX_PACKET
        ));
    }
    let request = WorkloadRequest::decode(bytes.as_slice())
        .map_err(|e| format!("undecodable request: {e}"))?;
    let payload = request
        .payload
        .ok_or("request with no payload weft knows (empty, or a newer protocol)")?;
    if !matches!(payload, Payload::Add(_)) && !fds.is_empty() {
        // Dropping them closes them; the request itself may still be fine.
        warn!(
            descriptors = fds.len(),
            "ZDS request other than Add carried descriptors; closed them"
        );
        fds.clear();
    }
    match payload {
        Payload::Add(add) => {
            let uid = add.uid.clone();
            let netns = match fds.len() {
                1 => fds.pop().ok_or("no descriptor")?,
                n => return Err(format!("Add of {uid} carried {n} descriptors, not one")),
            };
            adopt(enroller, add, netns).await?;
            if let Some(seen) = snapshot.as_mut() {
                seen.insert(uid);
            }
            Ok(())
        }
        Payload::Keep(keep) => {
            // The agent keeps a pod whose namespace it could not find again; a pod weft does
            // not serve (weft restarted) stays unserved until the agent sends its Add.
            let Some(seen) = snapshot.as_mut() else {
                return Err(format!("Keep of {} after the snapshot", keep.uid));
            };
            if !enroller.handed_pods().contains(&keep.uid) {
                warn!(uid = %keep.uid, "ZDS: Keep of a pod weft does not serve; it stays uncaptured until the agent adds it");
            }
            seen.insert(keep.uid);
            Ok(())
        }
        Payload::Del(del) => {
            // Before the snapshot ends, a deleted pod must not count as named in it.
            if let Some(seen) = snapshot.as_mut() {
                seen.remove(&del.uid);
            }
            let enroller = enroller.clone();
            let uid = del.uid.clone();
            let found = tokio::task::spawn_blocking(move || enroller.release_handed(&uid))
                .await
                .map_err(|e| format!("releasing {}: {e}", del.uid))?;
            info!(uid = %del.uid, found, "ZDS: pod released");
            Ok(())
        }
        Payload::SnapshotSent(_) => {
            let Some(seen) = snapshot.take() else {
                return Err("a second SnapshotSent on one connection".into());
            };
            let gone: Vec<String> = enroller
                .handed_pods()
                .into_iter()
                .filter(|uid| !seen.contains(uid))
                .collect();
            let enroller = enroller.clone();
            let released = gone.len();
            tokio::task::spawn_blocking(move || {
                for uid in gone {
                    enroller.release_handed(&uid);
                }
            })
            .await
            .map_err(|e| format!("releasing pods missing from the snapshot: {e}"))?;
            info!(
                pods = seen.len(),
                released, "ZDS: snapshot received; pods missing from it released"
            );
            readiness.done(READINESS_TASK);
            Ok(())
        }
    }
}

/// Opens the handed namespace and captures the pod in it (both on the blocking pool: a
/// namespace worker thread starts, sockets are bound inside).
async fn adopt(enroller: &Arc<Enroller>, add: AddWorkload, netns: OwnedFd) -> Result<(), String> {
    let info = add
        .workload_info
        .ok_or_else(|| format!("Add of {} without workload info", add.uid))?;
    if add.uid.is_empty() || info.name.is_empty() || info.namespace.is_empty() {
        return Err(format!(
            "Add with an empty uid, name or namespace (uid {:?}, {}/{})",
            add.uid, info.namespace, info.name
        ));
    }
    let enroller = enroller.clone();
    let label = format!("zds:{}/{}", info.namespace, info.name);
    tokio::task::spawn_blocking(move || {
        let netns = Netns::from_fd(netns, label).map_err(|e| e.to_string())?;
        enroller
            .adopt(HandedPod {
                pod_uid: add.uid,
                name: info.name,
                namespace: info.namespace,
                service_account: info.service_account,
                ips: Vec::new(),
                netns,
                rules_by: RulesBy::CniAgent,
            })
            .map_err(|e| e.to_string())
    })
    .await
    .map_err(|e| format!("capture task failed: {e}"))?
}
