//! weft-cni, the chained CNI plugin (CNI spec 1.0: ADD, DEL, CHECK, VERSION; STATUS and GC of
//! 1.1). It holds no state: each call is one request to the node's weft.
//!
//! Its network configuration entry: `{"type": "weft-cni", "socket": PATH, "failOpen": BOOL}`
//! (the defaults: weft's socket, fail closed). ADD passes the previous plugin's result
//! through unchanged, as a chained plugin that adds no interface must.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::IpAddr;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use serde_json::{json, Value};

use super::wire::{CaptureCommand, CaptureReply, CaptureRequest};

pub const DEFAULT_SOCKET: &str = "/var/run/weft/cni.sock";
/// How long ADD waits for weft (capture takes milliseconds; this covers a busy node).
const TIMEOUT: Duration = Duration::from_secs(30);
const SUPPORTED: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// A CNI error: printed as the spec's error object on stdout, with a non-zero exit.
#[derive(Debug)]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    pub details: String,
}

/// The spec's well-known codes, and weft's own (100 and up are the plugin's to define).
pub mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const INVALID_ENVIRONMENT: u32 = 4;
    pub const IO_FAILURE: u32 = 5;
    pub const DECODE_FAILED: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
    pub const TRY_AGAIN_LATER: u32 = 11;
    /// weft answered and refused to capture the pod.
    pub const REFUSED: u32 = 100;
}

impl CniError {
    fn new(code: u32, msg: impl Into<String>, details: impl Into<String>) -> Self {
        CniError {
            code,
            msg: msg.into(),
            details: details.into(),
        }
    }

    pub fn to_json(&self, cni_version: &str) -> Value {
        json!({
            "cniVersion": cni_version,
            "code": self.code,
            "msg": self.msg,
            "details": self.details,
        })
    }
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct NetConf {
    cni_version: String,
    #[serde(default)]
    name: String,
    #[serde(default)]
    socket: Option<PathBuf>,
    #[serde(default)]
    fail_open: bool,
    /// Pods of these namespaces start without weft being asked (weft's own, so that weft can
    /// start on a node where it is not running yet).
    #[serde(default)]
    exclude_namespaces: Vec<String>,
    #[serde(default)]
    prev_result: Option<Value>,
}

/// One invocation's inputs, as the runtime gives them.
pub struct Invocation {
    pub env: HashMap<String, String>,
    pub stdin: Vec<u8>,
}

/// What the plugin prints and how it exits.
pub struct Outcome {
    pub stdout: Option<Value>,
    /// Lines for stderr (the runtime logs them).
    pub log: Vec<String>,
    pub exit_code: i32,
}

/// Runs one invocation.
pub fn run(inv: &Invocation) -> Outcome {
    let command = inv.env.get("CNI_COMMAND").map(String::as_str).unwrap_or("");
    if command == "VERSION" {
        return Outcome {
            stdout: Some(json!({"cniVersion": "1.0.0", "supportedVersions": SUPPORTED})),
            log: Vec::new(),
            exit_code: 0,
        };
    }
    let mut log = Vec::new();
    let conf: NetConf = match serde_json::from_slice(&inv.stdin) {
        Ok(c) => c,
        Err(e) => {
            return failure(
                "1.0.0",
                CniError::new(
                    code::DECODE_FAILED,
                    "cannot decode the network configuration",
                    e.to_string(),
                ),
                log,
            )
        }
    };
    let version = conf.cni_version.clone();
    if !SUPPORTED.contains(&version.as_str()) {
        return failure(
            &version,
            CniError::new(
                code::INCOMPATIBLE_VERSION,
                format!("CNI version {version} is not supported"),
                format!("supported: {}", SUPPORTED.join(", ")),
            ),
            log,
        );
    }
    let result = match command {
        "ADD" => add(&conf, &inv.env, &mut log),
        "DEL" => del(&conf, &inv.env, &mut log).map(|()| None),
        "CHECK" => check(&conf, &inv.env).map(|()| None),
        "STATUS" => status(&conf, &mut log).map(|()| None),
        // Nothing of weft's lives beyond a pod's namespace on disk that GC could collect.
        "GC" => Ok(None),
        other => Err(CniError::new(
            code::INVALID_ENVIRONMENT,
            format!("unknown CNI_COMMAND {other:?}"),
            "",
        )),
    };
    match result {
        Ok(stdout) => Outcome {
            stdout,
            log,
            exit_code: 0,
        },
        Err(e) => failure(&version, e, log),
    }
}

fn failure(version: &str, e: CniError, log: Vec<String>) -> Outcome {
    Outcome {
        stdout: Some(e.to_json(version)),
        log,
        exit_code: 1,
    }
}

fn socket(conf: &NetConf) -> PathBuf {
    conf.socket
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET))
}

/// `K8S_POD_NAMESPACE=..;K8S_POD_NAME=..` from `CNI_ARGS`.
fn cni_args(env: &HashMap<String, String>) -> HashMap<String, String> {
    env.get("CNI_ARGS")
        .map(|a| {
            a.split(';')
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        })
        .unwrap_or_default()
}

fn required<'a>(env: &'a HashMap<String, String>, key: &str) -> Result<&'a str, CniError> {
    env.get(key)
        .map(String::as_str)
        .filter(|v| !v.is_empty())
        .ok_or_else(|| CniError::new(code::INVALID_ENVIRONMENT, format!("{key} is not set"), ""))
}

/// The request for weft, or None for a sandbox that is not a Kubernetes pod.
fn request(
    command: CaptureCommand,
    conf: &NetConf,
    env: &HashMap<String, String>,
) -> Result<Option<CaptureRequest>, CniError> {
    let container_id = required(env, "CNI_CONTAINERID")?.to_string();
    let args = cni_args(env);
    let (Some(ns), Some(name)) = (args.get("K8S_POD_NAMESPACE"), args.get("K8S_POD_NAME")) else {
        return Ok(None);
    };
    if conf.exclude_namespaces.iter().any(|n| n == ns) {
        return Ok(None);
    }
    let netns = env.get("CNI_NETNS").filter(|n| !n.is_empty()).cloned();
    Ok(Some(CaptureRequest {
        command,
        container_id,
        netns,
        pod_namespace: ns.clone(),
        pod_name: name.clone(),
        pod_uid: args.get("K8S_POD_UID").cloned(),
        ips: conf
            .prev_result
            .as_ref()
            .map(result_ips)
            .unwrap_or_default(),
    }))
}

/// The addresses of a CNI result (`ips[].address`, CIDR notation).
fn result_ips(result: &Value) -> Vec<IpAddr> {
    result
        .get("ips")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|ip| ip.get("address")?.as_str())
        .filter_map(|cidr| cidr.split('/').next()?.parse().ok())
        .collect()
}

/// The previous plugin's result, which a chained plugin must have and pass on.
fn prev_result(conf: &NetConf) -> Result<Value, CniError> {
    let mut prev = conf.prev_result.clone().ok_or_else(|| {
        CniError::new(
            code::INVALID_CONFIG,
            "no prevResult: weft-cni is a chained plugin and must follow the pod's network plugin",
            format!("network {:?}", conf.name),
        )
    })?;
    if let Some(obj) = prev.as_object_mut() {
        obj.insert("cniVersion".into(), Value::String(conf.cni_version.clone()));
    }
    Ok(prev)
}

fn add(
    conf: &NetConf,
    env: &HashMap<String, String>,
    log: &mut Vec<String>,
) -> Result<Option<Value>, CniError> {
    let prev = prev_result(conf)?;
    required(env, "CNI_NETNS")?;
    let Some(req) = request(CaptureCommand::Add, conf, env)? else {
        return Ok(Some(prev));
    };
    match ask(&socket(conf), &req) {
        Ok(reply) => match reply.error {
            None => Ok(Some(prev)),
            Some(e) => fail_or_open(
                conf,
                log,
                CniError::new(code::REFUSED, "weft refused to capture the pod", e),
            ),
        },
        Err(e) => fail_or_open(conf, log, e),
    }
}

/// Fail closed (the pod does not start) unless configured to fail open.
fn fail_or_open(
    conf: &NetConf,
    log: &mut Vec<String>,
    e: CniError,
) -> Result<Option<Value>, CniError> {
    if conf.fail_open {
        log.push(format!(
            "weft-cni: failing open, the pod starts uncaptured: {}: {}",
            e.msg, e.details
        ));
        return Ok(Some(prev_result(conf)?));
    }
    Err(e)
}

fn del(
    conf: &NetConf,
    env: &HashMap<String, String>,
    log: &mut Vec<String>,
) -> Result<(), CniError> {
    let Some(req) = request(CaptureCommand::Del, conf, env)? else {
        return Ok(());
    };
    // DEL must not keep a pod from being torn down: with weft away, its namespace goes and
    // the capture with it; a restarted weft forgets pods whose namespace is gone.
    match ask(&socket(conf), &req) {
        Ok(CaptureReply { error: Some(e), .. }) => {
            log.push(format!("weft-cni: weft could not release the pod: {e}"))
        }
        Ok(_) => {}
        Err(e) => log.push(format!("weft-cni: {}: {}", e.msg, e.details)),
    }
    Ok(())
}

fn check(conf: &NetConf, env: &HashMap<String, String>) -> Result<(), CniError> {
    prev_result(conf)?;
    let Some(req) = request(CaptureCommand::Check, conf, env)? else {
        return Ok(());
    };
    match ask(&socket(conf), &req)? {
        CaptureReply { error: Some(e), .. } => Err(CniError::new(
            code::REFUSED,
            "the pod's capture is not as it should be",
            e,
        )),
        _ => Ok(()),
    }
}

/// STATUS reports the plugin ready even while weft is away: a failing STATUS marks the whole
/// node's network not ready, and then weft's own pod could not start to fix it. Pods of the
/// mesh still fail closed at ADD; the log line says weft is away.
fn status(conf: &NetConf, log: &mut Vec<String>) -> Result<(), CniError> {
    let path = socket(conf);
    if let Err(e) = UnixStream::connect(&path) {
        log.push(format!(
            "weft-cni: weft is not reachable at {}: {e}; mesh pods will not start until it is",
            path.display()
        ));
    }
    Ok(())
}

/// One request to weft, one reply.
fn ask(path: &std::path::Path, req: &CaptureRequest) -> Result<CaptureReply, CniError> {
    let unreachable = |e: std::io::Error| {
        CniError::new(
            code::TRY_AGAIN_LATER,
            "weft is not reachable on this node",
            format!("{}: {e}", path.display()),
        )
    };
    let mut stream = UnixStream::connect(path).map_err(unreachable)?;
    stream
        .set_read_timeout(Some(TIMEOUT))
        .map_err(unreachable)?;
    stream
        .set_write_timeout(Some(TIMEOUT))
        .map_err(unreachable)?;
    let mut bytes = serde_json::to_vec(req)
        .map_err(|e| CniError::new(code::IO_FAILURE, "cannot encode the request", e.to_string()))?;
    bytes.push(b'\n');
    stream.write_all(&bytes).map_err(unreachable)?;
    let mut reply = Vec::new();
    stream
        .take(super::wire::MAX_REQUEST as u64)
        .read_to_end(&mut reply)
        .map_err(|e| {
            CniError::new(
                code::IO_FAILURE,
                "no reply from weft",
                format!("{}: {e}", path.display()),
            )
        })?;
    serde_json::from_slice(&reply)
        .map_err(|e| CniError::new(code::IO_FAILURE, "weft's reply is malformed", e.to_string()))
}
