//! Finding a pod's network namespace from its IP address.
//!
//! Kubernetes tells weft a pod's IP but not its netns. On the node, every pod's netns is held by
//! at least one process (the pause container), so scanning `/proc/*/ns/net` finds it: each
//! distinct namespace is entered once, its interface addresses are read, and the one holding the
//! pod IP is the pod's. The path handed out is `/proc/PID/ns/net` of a process in it; the
//! enroller opens it at once and keeps the fd, so the process may exit later.

use std::collections::HashMap;
use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use nix::ifaddrs::getifaddrs;
use tracing::{debug, info, warn};

use crate::state::Workload;

use super::netns::{Netns, NsId};

/// One scan of the node: which namespace holds which address.
#[derive(Debug, Default)]
pub struct NetnsIndex {
    by_ip: HashMap<IpAddr, Vec<(NsId, PathBuf)>>,
}

/// What a scan says about one address.
#[derive(Debug, PartialEq, Eq)]
pub enum Located<'a> {
    Found(NsId, &'a Path),
    Missing,
    /// Several namespaces hold the address: capturing any of them could capture the wrong pod.
    Ambiguous(usize),
}

impl NetnsIndex {
    /// Scans every process's netns except weft's own (the host's addresses are not pods').
    /// Each namespace is read by its own [`Netns`] worker; the calling thread stays home.
    pub fn scan() -> io::Result<NetnsIndex> {
        let own = NsId::of_path("/proc/self/ns/net")?;
        let mut candidates: HashMap<NsId, PathBuf> = HashMap::new();
        for entry in std::fs::read_dir("/proc")? {
            let Ok(entry) = entry else { continue };
            let name = entry.file_name();
            if !name.to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
                continue;
            }
            let path = entry.path().join("ns/net");
            // Processes come and go during the scan; one that vanished is simply skipped.
            let Ok(id) = NsId::of_path(&path) else {
                continue;
            };
            if id != own {
                candidates.entry(id).or_insert(path);
            }
        }
        let mut index = NetnsIndex::default();
        for (id, path) in candidates {
            match addresses_in(&path) {
                Ok(ips) => {
                    for ip in ips {
                        index.by_ip.entry(ip).or_default().push((id, path.clone()));
                    }
                }
                Err(e) => debug!(path = %path.display(), error = %e, "skipping netns"),
            }
        }
        Ok(index)
    }

    /// The netns holding `ip`, as a path and the namespace's identity.
    pub fn lookup(&self, ip: IpAddr) -> Located<'_> {
        match self.by_ip.get(&ip).map(Vec::as_slice) {
            None | Some([]) => Located::Missing,
            Some([(id, path)]) => Located::Found(*id, path),
            Some(many) => Located::Ambiguous(many.len()),
        }
    }
}

/// The non-loopback addresses of the namespace at `path`, read inside it by its worker
/// ([`Netns`], the one way weft enters a namespace).
fn addresses_in(path: &Path) -> io::Result<Vec<IpAddr>> {
    Netns::open(path)
        .and_then(|ns| ns.run(own_addresses))
        .map_err(io::Error::other)?
}

/// The calling thread's namespace's non-loopback addresses.
fn own_addresses() -> io::Result<Vec<IpAddr>> {
    let mut ips = Vec::new();
    for ifa in getifaddrs().map_err(io::Error::from)? {
        let Some(addr) = ifa.address else { continue };
        let ip = if let Some(v4) = addr.as_sockaddr_in() {
            IpAddr::V4(v4.ip())
        } else if let Some(v6) = addr.as_sockaddr_in6() {
            IpAddr::V6(v6.ip())
        } else {
            continue;
        };
        if !ip.is_loopback() {
            ips.push(ip);
        }
    }
    Ok(ips)
}

/// Whether `path` still names the namespace `id` (the process behind a `/proc` path may have
/// exited, or its PID been reused).
pub fn still_names(path: &Path, id: NsId) -> bool {
    NsId::of_path(path).is_ok_and(|now| now == id)
}

/// Finds local pods' network namespaces, remembering each answer while it stays true so that a
/// pod keeps the same netns path (a changed path would look like a new pod to the enroller).
#[derive(Default)]
pub struct NetnsFinder {
    known: HashMap<String, (IpAddr, NsId, PathBuf)>,
    /// Pods asked about in the current rebuild; the others are forgotten at its end.
    asked: std::collections::HashSet<String>,
    /// Scanned during the current rebuild already: at most one `/proc` scan per rebuild.
    scan: Option<NetnsIndex>,
    pub unresolved: usize,
}

impl NetnsFinder {
    pub fn netns_of(&mut self, w: &Workload) -> Option<PathBuf> {
        self.asked.insert(w.uid.clone());
        let ip = *w.workload_ips.first()?;
        if let Some((known_ip, id, path)) = self.known.get(&w.uid) {
            if *known_ip == ip && still_names(path, *id) {
                return Some(path.clone());
            }
        }
        if self.scan.is_none() {
            match NetnsIndex::scan() {
                Ok(index) => self.scan = Some(index),
                Err(e) => warn!(error = %e, "scanning /proc for pod network namespaces"),
            }
        }
        let pod = format!("{}/{}", w.namespace, w.name);
        match self
            .scan
            .as_ref()
            .map_or(Located::Missing, |s| s.lookup(ip))
        {
            Located::Found(id, path) => {
                let path = path.to_path_buf();
                info!(%pod, %ip, netns = %path.display(), "found pod network namespace");
                self.known.insert(w.uid.clone(), (ip, id, path.clone()));
                Some(path)
            }
            Located::Missing => {
                self.unresolved += 1;
                debug!(%pod, %ip, "no network namespace holds the pod IP yet");
                None
            }
            Located::Ambiguous(n) => {
                self.unresolved += 1;
                warn!(%pod, %ip, namespaces = n, "several network namespaces hold the pod IP; not capturing until only one does");
                None
            }
        }
    }
}

impl NetnsFinder {
    /// Starts a rebuild: a fresh scan is allowed again, and counts restart.
    pub fn begin(&mut self) {
        self.scan = None;
        self.unresolved = 0;
        self.asked.clear();
    }

    /// Forgets one pod (it left), for callers that ask about changed pods only and so never
    /// call [`NetnsFinder::end`].
    pub fn forget(&mut self, uid: &str) {
        self.known.remove(uid);
    }

    pub fn end(&mut self) {
        let asked = &self.asked;
        self.known.retain(|uid, _| asked.contains(uid));
        self.scan = None;
    }
}
