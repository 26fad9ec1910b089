//! The local configuration file, in ztunnel's local-config shape (`workloads`, `services`,
//! `policies`, camelCase), so a ztunnel local config loads unchanged. weft adds two workload
//! fields: `netns` (where a captured pod's sockets live: a path, or `self` for weft's own network
//! namespace) and `labels` (for policy selectors).
//!
//! The file is watched; an edit that does not parse or validate is refused with `file:line` and
//! the last good state stays in force.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::de::IgnoredAny;
use serde::Deserialize;
use serde_saphyr::Spanned;
use tracing::{error, info};

use super::service::{Service, ServiceKey};
use super::store::{SourceData, StateStore};
use super::workload::{
    GatewayAddress, GatewayDestination, HealthStatus, Locality, Netns, Protocol, Workload,
};
use crate::authz;

/// The name this source has in the state store.
pub const SOURCE: &str = "local-file";

/// Values a workload gets when the file leaves them out.
#[derive(Clone, Debug)]
pub struct Defaults {
    pub trust_domain: String,
    pub cluster_id: String,
}

#[derive(Debug, thiserror::Error)]
pub enum LocalConfigError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {size} bytes, more than the {limit} a configuration file may have")]
    TooLarge {
        path: PathBuf,
        size: u64,
        limit: u64,
    },
    #[error("{path}:{line}:{column}: {message}")]
    Syntax {
        path: PathBuf,
        line: u64,
        column: u64,
        message: String,
    },
    #[error("{path}:{line}: {what}: {message}")]
    Invalid {
        path: PathBuf,
        line: u64,
        what: String,
        message: String,
    },
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct LocalConfig {
    #[serde(default)]
    workloads: Vec<Spanned<LocalWorkload>>,
    #[serde(default)]
    services: Vec<Spanned<LocalService>>,
    #[serde(default)]
    policies: Vec<Spanned<authz::LocalPolicy>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct LocalWorkload {
    #[serde(default)]
    uid: String,
    #[serde(default)]
    name: String,
    namespace: String,
    #[serde(default)]
    service_account: String,
    #[serde(default)]
    trust_domain: String,
    #[serde(default)]
    workload_ips: Vec<IpAddr>,
    #[serde(default)]
    protocol: Protocol,
    #[serde(default)]
    node: String,
    #[serde(default)]
    cluster_id: String,
    #[serde(default)]
    canonical_name: String,
    #[serde(default)]
    canonical_revision: String,
    #[serde(default)]
    workload_name: String,
    #[serde(default)]
    status: HealthStatus,
    #[serde(default)]
    authorization_policies: Vec<String>,
    /// `"<namespace>/<hostname>" → {service port: target port}`.
    #[serde(default)]
    services: HashMap<String, BTreeMap<u16, u16>>,
    #[serde(default)]
    waypoint: Option<LocalGateway>,
    #[serde(default)]
    network_gateway: Option<LocalGateway>,
    #[serde(default)]
    network: String,
    #[serde(default)]
    workload_type: String,
    #[serde(default)]
    hostname: String,
    #[serde(default)]
    locality: LocalLocality,
    // Accepted so ztunnel configs load; weft does not use them (yet).
    #[serde(default, rename = "networkMode")]
    _network_mode: Option<IgnoredAny>,
    #[serde(default, rename = "nativeTunnel")]
    _native_tunnel: Option<IgnoredAny>,
    #[serde(default, rename = "applicationTunnel")]
    _application_tunnel: Option<IgnoredAny>,
    #[serde(default, rename = "capacity")]
    _capacity: Option<IgnoredAny>,
    // weft's additions.
    #[serde(default)]
    netns: Option<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

/// A waypoint or network gateway as ztunnel's local configuration writes it.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct LocalGateway {
    /// `<network>/<ip>` or `<namespace>/<hostname>`.
    destination: String,
    #[serde(default)]
    hbone_mtls_port: u16,
}

impl LocalGateway {
    fn parse(self, what: &str) -> Result<GatewayAddress, String> {
        let Some((scope, name)) = self.destination.split_once('/') else {
            return Err(format!(
                "{what} destination {:?} is neither <network>/<ip> nor <namespace>/<hostname>",
                self.destination
            ));
        };
        let destination = match name.parse::<IpAddr>() {
            Ok(address) => GatewayDestination::Address {
                network: scope.to_owned(),
                address,
            },
            Err(_) if !scope.is_empty() && !name.is_empty() => GatewayDestination::Hostname {
                namespace: scope.to_owned(),
                hostname: name.to_owned(),
            },
            Err(_) => {
                return Err(format!(
                    "{what} destination {:?} needs a namespace and a hostname",
                    self.destination
                ))
            }
        };
        Ok(GatewayAddress::new(destination, self.hbone_mtls_port))
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct LocalLocality {
    #[serde(default)]
    region: String,
    #[serde(default)]
    zone: String,
    /// ztunnel's; weft does not use it.
    #[serde(default, rename = "subzone")]
    _subzone: Option<IgnoredAny>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct LocalService {
    name: String,
    namespace: String,
    hostname: String,
    /// `"<network>/<ip>"` as ztunnel writes them, or a bare IP.
    #[serde(default)]
    vips: Vec<String>,
    #[serde(default)]
    ports: BTreeMap<u16, u16>,
    #[serde(default)]
    endpoints: HashMap<String, LocalEndpoint>,
    #[serde(default)]
    subject_alt_names: Vec<String>,
    #[serde(default)]
    waypoint: Option<LocalGateway>,
    #[serde(default, rename = "loadBalancer")]
    _load_balancer: Option<IgnoredAny>,
    #[serde(default, rename = "ipFamilies")]
    _ip_families: Option<IgnoredAny>,
    #[serde(default, rename = "canonical")]
    _canonical: Option<IgnoredAny>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct LocalEndpoint {
    workload_uid: String,
    #[serde(default)]
    port: BTreeMap<u16, u16>,
    #[serde(default, rename = "status")]
    _status: Option<IgnoredAny>,
}

/// A parsed file: its state, and the Kubernetes-form policies that had to be left out.
#[derive(Debug)]
pub struct LocalFile {
    pub data: SourceData,
    /// `file:line: error` for each policy document weft refused; the others are in `data`.
    pub rejected_policies: Vec<String>,
}

/// Parses and validates a whole file: the ztunnel-shaped config, optionally followed (or
/// replaced) by `AuthorizationPolicy` objects in Kubernetes form as further YAML documents.
/// Nothing is applied unless the config document is good; a policy document that is not is left
/// out alone, named in `rejected_policies`, and the other policies stay in force.
pub fn parse(text: &str, path: &Path, defaults: &Defaults) -> Result<LocalFile, LocalConfigError> {
    let docs = authz::k8s_form::yaml_documents(text);
    if docs.len() <= 1 && !docs.first().is_some_and(|d| d.is_k8s_object()) {
        return Ok(LocalFile {
            data: parse_config(text, path, defaults)?,
            rejected_policies: Vec::new(),
        });
    }
    let mut config: Option<SourceData> = None;
    let mut policies = Vec::new();
    let mut rejected_policies = Vec::new();
    for doc in &docs {
        match &doc.value {
            Ok(v) if doc.is_k8s_object() => match authz::k8s_form::from_k8s_value(v) {
                Ok(p) => policies.push(p),
                Err(e) => {
                    rejected_policies.push(format!("{}:{}: {e}", path.display(), doc.first_line))
                }
            },
            _ if config.is_some() => {
                return Err(LocalConfigError::Invalid {
                    path: path.to_owned(),
                    line: doc.first_line as u64,
                    what: format!("document {}", doc.index),
                    message: "a second config document (only one may lack `kind`)".into(),
                })
            }
            _ => config = Some(parse_config(&doc.padded_text(), path, defaults)?),
        }
    }
    let mut data = config.unwrap_or_default();
    data.policies.extend(policies);
    Ok(LocalFile {
        data,
        rejected_policies,
    })
}

/// Parses and validates the ztunnel-shaped document.
fn parse_config(
    text: &str,
    path: &Path,
    defaults: &Defaults,
) -> Result<SourceData, LocalConfigError> {
    let cfg: LocalConfig = serde_saphyr::from_str(text).map_err(|e| {
        let (line, column) = e
            .location()
            .map(|l| (l.line(), l.column()))
            .unwrap_or((0, 0));
        LocalConfigError::Syntax {
            path: path.to_owned(),
            line,
            column,
            message: first_line(&e.to_string()),
        }
    })?;
    let invalid = |line: u64, what: String, message: String| LocalConfigError::Invalid {
        path: path.to_owned(),
        line,
        what,
        message,
    };
    let mut data = SourceData::default();
    // Networks are address spaces: an address may repeat on another network.
    let mut seen_ips: HashMap<(String, IpAddr), String> = HashMap::new();
    // Workloads are keyed by uid in the store: a second one with the same uid would silently
    // replace the first.
    let mut seen_uids: HashMap<String, u64> = HashMap::new();
    for Spanned {
        value: w, defined, ..
    } in cfg.workloads
    {
        let line = defined.line();
        let what = format!("workload {}/{}", w.namespace, w.name);
        let (workload, services) =
            workload(w, defaults).map_err(|m| invalid(line, what.clone(), m))?;
        if let Some(first) = seen_uids.insert(workload.uid.clone(), line) {
            return Err(invalid(
                line,
                what,
                format!(
                    "uid {} is already used by the workload at line {first}",
                    workload.uid
                ),
            ));
        }
        for ip in &workload.workload_ips {
            if let Some(other) =
                seen_ips.insert((workload.network.clone(), *ip), workload.uid.clone())
            {
                return Err(invalid(
                    line,
                    what,
                    format!("address {ip} is already used by {other}"),
                ));
            }
        }
        for (key, ports) in services {
            data.endpoints.push((key, workload.uid.clone(), ports));
        }
        data.workloads.push(workload);
    }
    for Spanned {
        value: s, defined, ..
    } in cfg.services
    {
        let line = defined.line();
        let what = format!("service {}/{}", s.namespace, s.hostname);
        let key = ServiceKey {
            namespace: s.namespace.clone(),
            hostname: s.hostname.clone(),
        };
        for (_, ep) in s.endpoints.iter() {
            data.endpoints
                .push((key.clone(), ep.workload_uid.clone(), ep.port.clone()));
        }
        let vips = s
            .vips
            .iter()
            .map(|v| parse_vip(v))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|m| invalid(line, what.clone(), m))?;
        data.services.push(Service {
            name: s.name,
            namespace: s.namespace,
            hostname: s.hostname,
            vips,
            ports: s.ports,
            subject_alt_names: s.subject_alt_names,
            passthrough: false,
            visibility: Default::default(),
            waypoint: s
                .waypoint
                .map(|g| g.parse("waypoint"))
                .transpose()
                .map_err(|m| invalid(line, what.clone(), m))?,
        });
    }
    for Spanned {
        value: p, defined, ..
    } in cfg.policies
    {
        let line = defined.line();
        let policy = authz::Policy::try_from(p)
            .map_err(|e| invalid(line, "policy".to_string(), e.to_string()))?;
        data.policies.push(policy);
    }
    Ok(data)
}

/// The parser's message without its own "error: line N column M:" prefix (we print ours).
fn first_line(s: &str) -> String {
    let line = s.lines().next().unwrap_or_default();
    let line = line.strip_prefix("error: ").unwrap_or(line);
    match line
        .strip_prefix("line ")
        .and_then(|rest| rest.split_once(": "))
    {
        Some((_, msg)) => msg.to_string(),
        None => line.to_string(),
    }
}

fn parse_vip(v: &str) -> Result<IpAddr, String> {
    let ip = v.rsplit_once('/').map_or(v, |(_, ip)| ip);
    ip.parse()
        .map_err(|_| format!("vip {v:?} is not an IP address (or <network>/<ip>)"))
}

type ServicePorts = Vec<(ServiceKey, BTreeMap<u16, u16>)>;

fn workload(w: LocalWorkload, defaults: &Defaults) -> Result<(Workload, ServicePorts), String> {
    if w.namespace.is_empty() {
        return Err("namespace is required".into());
    }
    if w.name.is_empty() && w.uid.is_empty() {
        return Err("a workload needs a name or a uid".into());
    }
    let or = |v: String, d: &str| if v.is_empty() { d.to_string() } else { v };
    let cluster_id = or(w.cluster_id, &defaults.cluster_id);
    let uid = if w.uid.is_empty() {
        format!("{cluster_id}//Pod/{}/{}", w.namespace, w.name)
    } else {
        w.uid
    };
    let netns = match w.netns.as_deref() {
        None => None,
        Some("self") => Some(Netns::Here),
        Some(p) if p.starts_with('/') => Some(Netns::Pod(PathBuf::from(p))),
        Some(p) => {
            return Err(format!(
                "netns {p:?} must be an absolute path (e.g. /run/netns/x) or \"self\""
            ))
        }
    };
    if netns.is_some() && w.workload_ips.is_empty() {
        return Err("a captured workload (netns set) needs workloadIps".into());
    }
    let services = w
        .services
        .into_iter()
        .map(|(k, ports)| k.parse::<ServiceKey>().map(|k| (k, ports)))
        .collect::<Result<Vec<_>, _>>()?;
    let workload = Workload {
        uid,
        name: w.name,
        namespace: w.namespace,
        service_account: or(w.service_account, "default"),
        trust_domain: or(w.trust_domain, &defaults.trust_domain),
        workload_ips: w.workload_ips,
        protocol: w.protocol,
        node: w.node,
        cluster_id,
        canonical_name: w.canonical_name,
        canonical_revision: w.canonical_revision,
        workload_name: w.workload_name,
        workload_type: w.workload_type,
        locality: Locality {
            region: w.locality.region,
            zone: w.locality.zone,
        },
        labels: w.labels,
        status: w.status,
        authorization_policies: w.authorization_policies,
        netns,
        network: w.network,
        hostname: w.hostname,
        waypoint: w.waypoint.map(|g| g.parse("waypoint")).transpose()?,
        network_gateway: w
            .network_gateway
            .map(|g| g.parse("networkGateway"))
            .transpose()?,
        dns_capture: None,
    };
    Ok((workload, services))
}

/// Reads and parses the file; also returns its bytes so [`watch`] starts from them.
/// Largest configuration file weft reads. 10 000 workloads with their policies take a few
/// MiB; a file far beyond that is a mistake or an attack, and parsing it would cost many times
/// its size in memory.
pub const MAX_CONFIG_BYTES: u64 = 32 * 1024 * 1024;

pub fn load(path: &Path, defaults: &Defaults) -> Result<(SourceData, Vec<u8>), LocalConfigError> {
    let bytes = read_bounded(path)?;
    let file = parse(&String::from_utf8_lossy(&bytes), path, defaults)?;
    Ok((accept(file), bytes))
}

/// Reads the file, refusing one over [`MAX_CONFIG_BYTES`] before reading it (and, should it
/// grow meanwhile, without reading more than the limit).
fn read_bounded(path: &Path) -> Result<Vec<u8>, LocalConfigError> {
    use std::io::Read;
    let read_err = |source| LocalConfigError::Read {
        path: path.to_owned(),
        source,
    };
    let file = std::fs::File::open(path).map_err(read_err)?;
    let size = file.metadata().map_err(read_err)?.len();
    let too_large = |size| LocalConfigError::TooLarge {
        path: path.to_owned(),
        size,
        limit: MAX_CONFIG_BYTES,
    };
    if size > MAX_CONFIG_BYTES {
        return Err(too_large(size));
    }
    let mut bytes = Vec::with_capacity(size as usize);
    file.take(MAX_CONFIG_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(read_err)?;
    if bytes.len() as u64 > MAX_CONFIG_BYTES {
        return Err(too_large(bytes.len() as u64));
    }
    Ok(bytes)
}

/// What says a file changed without reading it: size, modification time, inode (an atomic
/// replace is a new inode with the same size and, within a second, the same time).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stamp {
    len: u64,
    modified: Option<std::time::SystemTime>,
    ino: u64,
}

fn stamp(path: &Path) -> Option<Stamp> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some(Stamp {
        len: m.len(),
        modified: m.modified().ok(),
        ino: m.ino(),
    })
}

/// Reports what was left out of a good file, and hands over the rest.
fn accept(file: LocalFile) -> SourceData {
    for r in &file.rejected_policies {
        error!(policy = %r, "AuthorizationPolicy rejected; the other policies stay in force");
    }
    let d = &file.data;
    info!(
        workloads = d.workloads.len(),
        services = d.services.len(),
        policies = d.policies.len(),
        rejected_policies = file.rejected_policies.len(),
        "config loaded"
    );
    file.data
}

/// Outcome of each reload, for metrics.
pub trait ReloadObserver: Send + Sync {
    fn reloaded(&self, ok: bool);
}

/// Polls the file and re-applies it whenever its content differs from `loaded` (what is in force).
///
/// Polling (rather than inotify) keeps working across editors that replace the file and
/// ConfigMap mounts that swap symlinks; a one-second poll of one file costs nothing.
pub async fn watch(
    path: PathBuf,
    defaults: Defaults,
    store: Arc<StateStore>,
    observer: Arc<dyn ReloadObserver>,
    loaded: Vec<u8>,
) {
    let mut last = Some(loaded);
    let mut seen = stamp(&path);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        // A stat a second; the file is read and parsed (on the blocking pool) only when it
        // changed, so a bad or huge file left in place costs nothing after its one rejection.
        let (p, d) = (path.clone(), defaults.clone());
        let known = last.clone();
        let checked = tokio::task::spawn_blocking(move || {
            let now = stamp(&p);
            if now == seen {
                return (now, None);
            }
            let outcome = match read_bounded(&p) {
                Ok(bytes) if known.as_ref() == Some(&bytes) => None,
                Ok(bytes) => {
                    let parsed = parse(&String::from_utf8_lossy(&bytes), &p, &d);
                    Some((Some(bytes), parsed))
                }
                Err(e) => Some((None, Err(e))),
            };
            (now, outcome)
        })
        .await;
        let Ok((now, outcome)) = checked else {
            continue;
        };
        seen = now;
        match outcome {
            None => {}
            Some((bytes, Ok(file))) => {
                store.replace_source(SOURCE, accept(file));
                observer.reloaded(true);
                last = bytes;
            }
            Some((bytes, Err(e))) => {
                error!(error = %e, "config rejected; keeping the last good config");
                observer.reloaded(false);
                // The rejected bytes are what "changed" is measured from next time.
                if bytes.is_some() {
                    last = bytes;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_over_the_limit_is_refused_before_it_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big.yaml");
        let f = std::fs::File::create(&path).unwrap();
        // Sparse: the size is there without writing 32 MiB.
        f.set_len(MAX_CONFIG_BYTES + 1).unwrap();
        match load(&path, &defaults()) {
            Err(LocalConfigError::TooLarge { size, limit, .. }) => {
                assert_eq!((size, limit), (MAX_CONFIG_BYTES + 1, MAX_CONFIG_BYTES))
            }
            other => panic!("expected TooLarge, got {:?}", other.map(|_| ())),
        }
    }

    fn defaults() -> Defaults {
        Defaults {
            trust_domain: "cluster.local".into(),
            cluster_id: "Kubernetes".into(),
        }
    }

    /// A local config as ztunnel's own examples and tests write it.
    const ZTUNNEL_SHAPED: &str = r#"
workloads:
- uid: cluster1//v1/Pod/default/local
  name: local
  namespace: default
  serviceAccount: default
  workloadIps: ["127.0.0.1"]
  protocol: HBONE
  node: local
  canonicalName: local
  canonicalRevision: v1
  workloadType: deployment
  workloadName: local-deploy
  network: ""
  status: Healthy
  services:
    "default/example.default.svc.cluster.local":
      80: 8080
- name: local-tcp
  namespace: default
  workloadIps: ["127.0.0.2"]
  protocol: TCP
  node: local
  services: {}
services:
- name: example
  namespace: default
  hostname: example.default.svc.cluster.local
  vips: ["/10.0.0.1"]
  ports: {80: 8080}
  endpoints: {}
  subjectAltNames: []
policies:
- name: deny-everything-else
  namespace: default
  scope: Namespace
  action: Deny
  rules:
  - - - notPrincipals: [{Presence: {}}]
"#;

    #[test]
    fn ztunnel_shaped_config_loads() {
        let d = parse(ZTUNNEL_SHAPED, Path::new("z.yaml"), &defaults())
            .unwrap()
            .data;
        assert_eq!(d.workloads.len(), 2);
        let w = &d.workloads[0];
        assert_eq!(w.protocol, Protocol::HBONE);
        assert_eq!(
            w.identity().to_string(),
            "spiffe://cluster.local/ns/default/sa/default"
        );
        assert_eq!(w.app(), "local");
        let tcp = &d.workloads[1];
        assert_eq!(
            tcp.uid, "Kubernetes//Pod/default/local-tcp",
            "uid defaults like ztunnel's"
        );
        assert_eq!(tcp.service_account, "default");
        assert_eq!(
            d.services[0].vips,
            vec!["10.0.0.1".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(d.endpoints.len(), 1);
        assert_eq!(d.policies.len(), 1);
    }

    #[test]
    fn networks_gateways_waypoints_type_and_locality_are_read_as_ztunnel_writes_them() {
        let text = r#"
workloads:
- name: remote
  namespace: shop
  workloadIps: ["10.9.0.5"]
  network: west
  networkGateway: {destination: "west/10.250.2.3", hboneMtlsPort: 15009}
  workloadType: cronjob
  locality: {region: eu-west, zone: eu-west-1a, subzone: rack-7}
- name: same-address-other-network
  namespace: shop
  workloadIps: ["10.9.0.5"]
  waypoint: {destination: "shop/waypoint.shop.svc.cluster.local"}
services:
- name: backend
  namespace: shop
  hostname: backend.shop.svc.cluster.local
  waypoint: {destination: "shop/waypoint.shop.svc.cluster.local", hboneMtlsPort: 15008}
"#;
        let d = parse(text, Path::new("n.yaml"), &defaults()).unwrap().data;
        let (remote, local) = (&d.workloads[0], &d.workloads[1]);
        assert_eq!(remote.network, "west");
        assert_eq!(
            remote.network_gateway,
            Some(GatewayAddress {
                destination: GatewayDestination::Address {
                    network: "west".into(),
                    address: "10.250.2.3".parse().unwrap()
                },
                hbone_mtls_port: 15009
            })
        );
        assert_eq!(remote.workload_type, "cronjob");
        assert_eq!(
            (
                remote.locality.region.as_str(),
                remote.locality.zone.as_str()
            ),
            ("eu-west", "eu-west-1a")
        );
        let waypoint = GatewayAddress {
            destination: GatewayDestination::Hostname {
                namespace: "shop".into(),
                hostname: "waypoint.shop.svc.cluster.local".into(),
            },
            hbone_mtls_port: 15008,
        };
        assert_eq!(local.network, "");
        assert_eq!(local.waypoint.as_ref(), Some(&waypoint), "no port: 15008");
        assert_eq!(d.services[0].waypoint, Some(waypoint));
    }

    #[test]
    fn errors_name_file_and_line() {
        let cases = [
            // (text, line, words the message must contain)
            ("workloads:\n- name: a\n  namespace: x\n  workloadIps: [\"nope\"]\n", 4, "invalid IP address"),
            ("workloads:\n- name: a\n  namespace: x\n  protocl: HBONE\n", 4, "protocl"),
            ("workloads:\n- name: a\n  namespace: x\n- name: b\n  namespace: x\n  netns: relative/path\n", 4, "netns"),
            (
                "workloads:\n- name: a\n  namespace: x\n  workloadIps: [\"10.0.0.1\"]\n- name: b\n  namespace: x\n  workloadIps: [\"10.0.0.1\"]\n",
                5,
                "already used",
            ),
            (
                "workloads:\n- uid: u\n  name: a\n  namespace: x\n- uid: u\n  name: b\n  namespace: x\n",
                5,
                "uid u is already used by the workload at line 2",
            ),
            ("services:\n- name: s\n  namespace: x\n  hostname: h\n  vips: [\"x/not-an-ip\"]\n", 2, "not-an-ip"),
            ("workloads:\n- name: a\n  namespace: x\n  waypoint: {destination: \"no-slash\"}\n", 2, "neither"),
            ("services:\n- name: s\n  namespace: x\n  hostname: h\n  waypoint: {destination: \"/h\"}\n", 2, "needs a namespace"),
            ("workloads: [\n", 0, "weft.yaml"),
        ];
        for (text, line, word) in cases {
            let e = parse(text, Path::new("/etc/weft.yaml"), &defaults())
                .unwrap_err()
                .to_string();
            assert!(e.starts_with("/etc/weft.yaml:"), "{e}");
            if line > 0 {
                assert!(
                    e.starts_with(&format!("/etc/weft.yaml:{line}:")),
                    "expected line {line}: {e}"
                );
            }
            assert!(e.contains(word), "{e}");
        }
    }

    const K8S_POLICIES: &str = r#"---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-frontend, namespace: shop}
spec:
  action: ALLOW
  rules:
  - from: [{source: {principals: ["cluster.local/ns/shop/sa/frontend"]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: broken, namespace: shop}
spec:
  action: PERMIT
"#;

    #[test]
    fn kubernetes_form_policies_follow_the_config_as_more_documents() {
        let text = format!("{ZTUNNEL_SHAPED}{K8S_POLICIES}");
        let f = parse(&text, Path::new("/etc/weft.yaml"), &defaults()).unwrap();
        assert_eq!(f.data.workloads.len(), 2, "the config document still loads");
        let keys: Vec<String> = f.data.policies.iter().map(|p| p.key()).collect();
        assert_eq!(
            keys,
            ["default/deny-everything-else", "shop/allow-frontend"]
        );
        let broken_line = text
            .lines()
            .position(|l| l.contains("name: broken"))
            .unwrap();
        assert_eq!(f.rejected_policies.len(), 1, "{:?}", f.rejected_policies);
        let r = &f.rejected_policies[0];
        assert!(r.contains("shop/broken") && r.contains("PERMIT"), "{r}");
        // The document starts two lines above its metadata (---, apiVersion, kind).
        assert!(
            r.starts_with(&format!("/etc/weft.yaml:{}:", broken_line - 1)),
            "{r}"
        );
    }

    #[test]
    fn a_file_of_only_kubernetes_policies_loads() {
        let f = parse(K8S_POLICIES, Path::new("p.yaml"), &defaults()).unwrap();
        assert!(f.data.workloads.is_empty());
        assert_eq!(f.data.policies.len(), 1);
        assert_eq!(f.rejected_policies.len(), 1);
    }

    #[test]
    fn errors_in_a_later_config_document_name_the_file_line() {
        let text =
            format!("{K8S_POLICIES}---\nworkloads:\n- name: a\n  namespace: x\n  protocl: HBONE\n");
        let line = text.lines().position(|l| l.contains("protocl")).unwrap() + 1;
        let e = parse(&text, Path::new("w.yaml"), &defaults())
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with(&format!("w.yaml:{line}:")),
            "expected line {line}: {e}"
        );
        let two = "workloads: []\n---\nservices: []\n";
        let e = parse(two, Path::new("w.yaml"), &defaults())
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("w.yaml:3:") && e.contains("second config document"),
            "{e}"
        );
    }
}
