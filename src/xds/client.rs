//! The delta ADS stream to istiod.
//!
//! One stream carries both resource types. Each response is decoded resource by resource: what
//! is valid is applied to the state store as one change, what is not is named in a NACK (the
//! last good version of that resource stays in force), and everything else is ACKed. The
//! versions of what weft holds are remembered, so after a reconnect istiod is told what weft
//! already has (`initial_resource_versions`) and sends only what changed meanwhile.
//!
//! Local pods (this node's, speaking HBONE) also need their network namespace before they can
//! be captured; finding it scans `/proc` and enters namespaces, so it runs on the blocking pool,
//! and pods whose namespace is not there yet are retried every second.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use prost::Message;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::MetadataValue;
use tracing::{debug, info, warn};

use super::translate::{self, Translated};
use super::{XdsSettings, ADDRESS_TYPE, AUTHORIZATION_TYPE, SOURCE};
use crate::admin::Readiness;
use crate::capture::locate::NetnsFinder;
use crate::metrics::{Metrics, Termination, TerminationLabels, TypeUrlLabels};
use crate::proto::discovery::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use crate::proto::discovery::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, Node, Resource, Status,
};
use crate::proto::security::Authorization;
use crate::proto::workload::Address;
use crate::state::{Delta, EndpointPorts, Netns, Protocol, ServiceKey, StateStore, Workload};

const READINESS_TASK: &str = "istiod (xDS)";
const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(15);
/// How often to look again for the network namespace of a local pod not found yet.
const NETNS_RETRY: Duration = Duration::from_secs(1);
/// A full push of a large mesh is one message; tonic's 4 MiB default is far too small.
const MAX_MESSAGE: usize = 256 * 1024 * 1024;
/// google.rpc.Code INVALID_ARGUMENT, the code of a NACK.
const INVALID_ARGUMENT: i32 = 3;

#[derive(Debug, thiserror::Error)]
pub enum XdsError {
    #[error(transparent)]
    Grpc(#[from] crate::grpc::GrpcError),
    #[error("istiod: {}: {}", .0.code(), .0.message())]
    Status(#[from] tonic::Status),
    #[error("metadata value {0:?} is not valid in a gRPC header")]
    Header(String),
    #[error("the request stream closed")]
    RequestClosed,
}

/// What a resource name stood for, so that a removal can be applied.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Held {
    Workload(String),
    Service(ServiceKey),
    Policy(String),
}

/// Everything the client remembers across responses and reconnects.
#[derive(Default)]
struct Memory {
    /// type URL → resource name → version, of what was applied.
    versions: HashMap<&'static str, HashMap<String, String>>,
    names: HashMap<String, Held>,
    /// Local pods applied without a netns yet, retried until one holds their IP.
    unresolved: HashMap<String, (Workload, EndpointPorts)>,
    finder: Option<NetnsFinder>,
    /// Types whose first response was applied (readiness).
    synced: Vec<&'static str>,
}

/// Starts the client; it runs (reconnecting) until the task is aborted.
pub fn start(
    settings: XdsSettings,
    store: Arc<StateStore>,
    readiness: Arc<Readiness>,
    metrics: Arc<Metrics>,
) -> JoinHandle<()> {
    readiness.pending(READINESS_TASK);
    tokio::spawn(run(settings, store, readiness, metrics))
}

async fn run(
    settings: XdsSettings,
    store: Arc<StateStore>,
    readiness: Arc<Readiness>,
    metrics: Arc<Metrics>,
) {
    let mut memory = Memory {
        finder: Some(NetnsFinder::default()),
        ..Memory::default()
    };
    let mut backoff = MIN_BACKOFF;
    loop {
        let started = Instant::now();
        let result = session(&settings, &store, &readiness, &metrics, &mut memory).await;
        let reason = match &result {
            Ok(()) => Termination::Complete,
            Err(XdsError::Status(s)) if s.code() != tonic::Code::Unavailable => Termination::Error,
            Err(_) => Termination::ConnectionError,
        };
        metrics
            .xds_terminations
            .get_or_create(&TerminationLabels { reason })
            .inc();
        // A stream that lived a while was healthy: start the back-off over.
        if started.elapsed() > MAX_BACKOFF {
            backoff = MIN_BACKOFF;
        }
        match result {
            Ok(()) => {
                info!(address = %settings.target.address, "istiod closed the xDS stream; reconnecting")
            }
            Err(e) => {
                warn!(address = %settings.target.address, error = %e, retry_in_ms = backoff.as_millis() as u64,
                "xDS stream failed; keeping the last state and retrying")
            }
        }
        let jitter =
            Duration::from_millis(rand::random::<u64>() % (backoff.as_millis() as u64 / 4 + 1));
        tokio::time::sleep(backoff + jitter).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

fn node(settings: &XdsSettings) -> Node {
    use prost_types::{value::Kind, Struct, Value};
    let n = &settings.node;
    let text = |s: &str| Value {
        kind: Some(Kind::StringValue(s.to_string())),
    };
    let mut fields: std::collections::BTreeMap<String, Value> = n
        .metadata
        .iter()
        .map(|(k, v)| (k.clone(), text(v)))
        .collect();
    for (k, v) in [
        ("NAME", &n.pod_name),
        ("NAMESPACE", &n.pod_namespace),
        ("INSTANCE_IPS", &n.pod_ip),
        ("NODE_NAME", &n.node_name),
        ("CLUSTER_ID", &n.cluster_id),
    ] {
        fields.entry(k.to_string()).or_insert_with(|| text(v));
    }
    Node {
        id: n.node_id(),
        cluster: String::new(),
        metadata: Some(Struct { fields }),
        user_agent_name: "weft".into(),
        user_agent_version_type: Some(
            crate::proto::discovery::node::UserAgentVersionType::UserAgentVersion(
                env!("CARGO_PKG_VERSION").into(),
            ),
        ),
    }
}

async fn session(
    settings: &XdsSettings,
    store: &Arc<StateStore>,
    readiness: &Readiness,
    metrics: &Metrics,
    memory: &mut Memory,
) -> Result<(), XdsError> {
    let channel = crate::grpc::channel(&settings.target)?;
    let (tx, rx) = mpsc::channel::<DeltaDiscoveryRequest>(8);
    for type_url in [ADDRESS_TYPE, AUTHORIZATION_TYPE] {
        let held = memory.versions.get(type_url).cloned().unwrap_or_default();
        debug!(type_url, held = held.len(), "subscribing");
        let req = DeltaDiscoveryRequest {
            node: Some(node(settings)),
            type_url: type_url.into(),
            initial_resource_versions: held,
            ..Default::default()
        };
        tx.send(req).await.map_err(|_| XdsError::RequestClosed)?;
    }
    let mut request = tonic::Request::new(ReceiverStream::new(rx));
    if let Some(token) = &settings.token {
        request
            .metadata_mut()
            .insert("authorization", token.bearer()?);
    }
    let cluster: MetadataValue<_> = settings
        .node
        .cluster_id
        .parse()
        .map_err(|_| XdsError::Header(settings.node.cluster_id.clone()))?;
    request.metadata_mut().insert("clusterid", cluster);
    let mut client = AggregatedDiscoveryServiceClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE);
    let mut responses = client
        .delta_aggregated_resources(request)
        .await?
        .into_inner();
    info!(address = %settings.target.address, node_id = %settings.node.node_id(), "xDS stream open");
    let mut retry = tokio::time::interval(NETNS_RETRY);
    loop {
        tokio::select! {
            msg = responses.message() => {
                let Some(resp) = msg? else { return Ok(()) };
                let url = TypeUrlLabels { url: resp.type_url.clone() };
                metrics.xds_messages.get_or_create(&url).inc();
                let bytes: usize = resp.resources.iter().filter_map(|r| r.resource.as_ref()).map(|a| a.value.len()).sum();
                metrics.xds_message_bytes.get_or_create(&url).inc_by(bytes as u64);
                let reply = handle(settings, store, memory, resp).await;
                if reply.rejected > 0 {
                    metrics.xds_rejected.get_or_create(&url).inc_by(reply.rejected as u64);
                }
                if let Some(type_url) = reply.synced {
                    if !memory.synced.contains(&type_url) {
                        memory.synced.push(type_url);
                        if memory.synced.len() == 2 {
                            readiness.done(READINESS_TASK);
                            info!("first push from istiod applied");
                        }
                    }
                }
                tx.send(reply.request).await.map_err(|_| XdsError::RequestClosed)?;
            }
            _ = retry.tick(), if !memory.unresolved.is_empty() => {
                let waiting: Vec<_> = memory.unresolved.drain().map(|(_, v)| v).collect();
                let delta = resolve_local(memory, waiting, Delta::default(), settings).await;
                store.apply(SOURCE, delta);
            }
        }
    }
}

/// The reply to one response, and the type it completed a first push of.
struct Reply {
    request: DeltaDiscoveryRequest,
    synced: Option<&'static str>,
    /// Resources refused in this response.
    rejected: usize,
}

async fn handle(
    settings: &XdsSettings,
    store: &StateStore,
    memory: &mut Memory,
    resp: DeltaDiscoveryResponse,
) -> Reply {
    let t0 = Instant::now();
    let type_url: &'static str = match resp.type_url.as_str() {
        ADDRESS_TYPE => ADDRESS_TYPE,
        AUTHORIZATION_TYPE => AUTHORIZATION_TYPE,
        other => {
            warn!(
                type_url = other,
                "istiod sent a type weft did not ask for; NACK"
            );
            return Reply {
                request: nack(
                    other,
                    resp.nonce.clone(),
                    format!("type {other} is not subscribed"),
                ),
                synced: None,
                rejected: resp.resources.len(),
            };
        }
    };
    let mut delta = Delta::default();
    let mut local = Vec::new();
    let mut errors = Vec::new();
    let (received, removed) = (resp.resources.len(), resp.removed_resources.len());
    for r in resp.resources {
        match decode(type_url, &r, &settings.defaults) {
            Ok(decoded) => {
                let held = match decoded {
                    Decoded::Address(Translated::Workload(w, eps)) => {
                        let uid = w.uid.clone();
                        memory.unresolved.remove(&uid);
                        if settings.find_netns
                            && w.protocol == Protocol::HBONE
                            && w.node == settings.node_name
                        {
                            local.push((*w, eps));
                        } else {
                            delta.upsert_workloads.push((*w, eps));
                        }
                        Held::Workload(uid)
                    }
                    Decoded::Address(Translated::Service(s)) => {
                        let key = s.key();
                        delta.upsert_services.push(s);
                        Held::Service(key)
                    }
                    Decoded::Policy(p) => {
                        let key = p.key();
                        for w in &p.warnings {
                            debug!(policy = %key, warning = %w, "authorization from istiod");
                        }
                        delta.upsert_policies.push(p);
                        Held::Policy(key)
                    }
                };
                // A resource that changed kind or key: what it was is gone.
                if let Some(before) = memory.names.insert(r.name.clone(), held.clone()) {
                    if before != held {
                        remove_held(&mut delta, memory, before);
                    }
                }
                memory
                    .versions
                    .entry(type_url)
                    .or_default()
                    .insert(r.name, r.version);
            }
            Err(e) => {
                warn!(type_url, resource = %r.name, error = %e,
                    "refusing a resource from istiod; its last good version stays in force");
                errors.push(format!("{}: {e}", r.name));
            }
        }
    }
    for name in resp.removed_resources {
        if let Some(v) = memory.versions.get_mut(type_url) {
            v.remove(&name);
        }
        match memory.names.remove(&name) {
            Some(held) => remove_held(&mut delta, memory, held),
            None => debug!(type_url, resource = %name, "removal of a resource weft does not hold"),
        }
    }
    let delta = resolve_local(memory, local, delta, settings).await;
    store.apply(SOURCE, delta);
    debug!(
        type_url,
        received,
        removed,
        refused = errors.len(),
        apply_us = t0.elapsed().as_micros() as u64,
        "xDS response applied"
    );
    let rejected = errors.len();
    let request = if errors.is_empty() {
        DeltaDiscoveryRequest {
            type_url: type_url.into(),
            response_nonce: resp.nonce,
            ..Default::default()
        }
    } else {
        nack(type_url, resp.nonce, errors.join("; "))
    };
    Reply {
        request,
        synced: Some(type_url),
        rejected,
    }
}

fn remove_held(delta: &mut Delta, memory: &mut Memory, held: Held) {
    match held {
        Held::Workload(uid) => {
            memory.unresolved.remove(&uid);
            if let Some(f) = memory.finder.as_mut() {
                f.forget(&uid);
            }
            delta.remove_workloads.push(uid);
        }
        Held::Service(key) => delta.remove_services.push(key),
        Held::Policy(key) => delta.remove_policies.push(key),
    }
}

enum Decoded {
    Address(Translated),
    Policy(crate::authz::Policy),
}

fn decode(type_url: &str, r: &Resource, defaults: &translate::Defaults) -> Result<Decoded, String> {
    let any = r.resource.as_ref().ok_or("no resource body")?;
    if any.type_url != type_url {
        return Err(format!(
            "body of type {} in a {type_url} response",
            any.type_url
        ));
    }
    if type_url == ADDRESS_TYPE {
        let a = Address::decode(any.value.as_slice()).map_err(|e| format!("undecodable: {e}"))?;
        translate::address(a, defaults)
            .map(Decoded::Address)
            .map_err(|e| e.to_string())
    } else {
        let a =
            Authorization::decode(any.value.as_slice()).map_err(|e| format!("undecodable: {e}"))?;
        crate::authz::from_xds(a)
            .map(Decoded::Policy)
            .map_err(|e| e.to_string())
    }
}

/// Gives local pods their network namespace (on the blocking pool: it scans `/proc` and
/// enters namespaces) and adds them to `delta`. Pods whose namespace is not found are added
/// without one, so other pods can reach them, and remembered for a retry.
async fn resolve_local(
    memory: &mut Memory,
    local: Vec<(Workload, EndpointPorts)>,
    mut delta: Delta,
    settings: &XdsSettings,
) -> Delta {
    if local.is_empty() {
        return delta;
    }
    let mut finder = memory.finder.take().unwrap_or_default();
    let resolved = tokio::task::spawn_blocking(move || {
        finder.begin();
        let out: Vec<_> = local
            .into_iter()
            .map(|(mut w, eps)| {
                let found = finder.netns_of(&w);
                w.netns = found.map(Netns::Pod);
                (w, eps)
            })
            .collect();
        (finder, out)
    })
    .await;
    match resolved {
        Ok((finder, out)) => {
            memory.finder = Some(finder);
            for (w, eps) in out {
                if w.netns.is_none() {
                    debug!(pod = %format!("{}/{}", w.namespace, w.name), node = %settings.node_name,
                        "local pod's network namespace not found yet; retrying");
                    memory
                        .unresolved
                        .insert(w.uid.clone(), (w.clone(), eps.clone()));
                }
                delta.upsert_workloads.push((w, eps));
            }
        }
        Err(e) => {
            warn!(error = %e, "network namespace lookup panicked; local pods stay uncaptured")
        }
    }
    delta
}

fn nack(type_url: &str, nonce: String, reason: String) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        type_url: type_url.into(),
        response_nonce: nonce,
        error_detail: Some(Status {
            code: INVALID_ARGUMENT,
            message: reason,
            details: Vec::new(),
        }),
        ..Default::default()
    }
}
