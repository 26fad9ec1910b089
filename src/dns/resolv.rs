//! A pod's own resolvers and search list: its `/etc/resolv.conf`, read through a process of the
//! pod (`/proc/<pid>/root/etc/resolv.conf`), so forwarded queries go where the pod would have
//! sent them and short names are expanded with the pod's own search list.
//!
//! The file is read lazily (a pod captured before it starts has no process yet; when its first
//! query arrives, it has) and cached; reading it walks `/proc`, so it runs on the blocking pool.

use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

use hickory_proto::rr::Name;

use crate::capture::NsId;

/// A pod's file is read again after this long (kubelet writes it once; this only picks up a
/// pod whose process appeared late, or a rare rewrite).
const REFRESH: Duration = Duration::from_secs(30);
/// Without the pod's own file (no process of the pod visible yet), look again sooner.
const RETRY_FALLBACK: Duration = Duration::from_secs(2);

/// What a resolv.conf says that the proxy uses.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ResolvConf {
    pub nameservers: Vec<SocketAddr>,
    pub search: Vec<Name>,
}

/// Where a pod's resolvers came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// The pod's own file.
    Pod,
    /// weft's fallback (its own file): no process of the pod was visible.
    Fallback,
}

/// Parses resolv.conf text (resolv.conf(5)): `nameserver` lines (an address; port 53),
/// `search` (the last one wins) or `domain`; everything else is ignored, as are malformed
/// entries (a resolver library skips them too).
pub fn parse(text: &str) -> ResolvConf {
    let mut conf = ResolvConf::default();
    for line in text.lines() {
        let line = line.split(['#', ';']).next().unwrap_or("");
        let mut words = line.split_whitespace();
        match words.next() {
            Some("nameserver") => {
                // An IPv6 address may carry a zone (`fe80::1%eth0`): not usable from a pod's
                // netns by weft; skipped.
                if let Some(ip) = words.next().and_then(|w| w.parse::<IpAddr>().ok()) {
                    conf.nameservers.push(SocketAddr::new(ip, 53));
                }
            }
            Some("search") | Some("domain") => {
                conf.search = words
                    .filter_map(|w| Name::from_ascii(w).ok())
                    .map(|mut n| {
                        n.set_fqdn(true);
                        n
                    })
                    .collect();
            }
            _ => {}
        }
    }
    conf
}

/// A pod's resolvers, cached.
#[derive(Clone, Debug)]
pub struct Cached {
    pub conf: ResolvConf,
    pub origin: Origin,
    read_at: Instant,
}

impl Cached {
    /// Nothing known (a failed read): no resolvers, looked for again soon.
    pub fn empty() -> Cached {
        Cached {
            conf: ResolvConf::default(),
            origin: Origin::Fallback,
            read_at: Instant::now(),
        }
    }

    pub fn is_fresh(&self) -> bool {
        let ttl = match self.origin {
            Origin::Pod => REFRESH,
            Origin::Fallback => RETRY_FALLBACK,
        };
        self.read_at.elapsed() < ttl
    }
}

/// Reads the resolv.conf of a process in the pod's network namespace `pod`, else `fallback`.
/// Blocking (walks /proc): call on the blocking pool.
pub fn read_for_pod(pod: NsId, fallback: &Path) -> Cached {
    let (conf, origin) = match pod_file(pod) {
        Some(text) => (parse(&text), Origin::Pod),
        None => (
            parse(&std::fs::read_to_string(fallback).unwrap_or_default()),
            Origin::Fallback,
        ),
    };
    Cached {
        conf,
        origin,
        read_at: Instant::now(),
    }
}

/// The text of `/etc/resolv.conf` as a process of the pod sees it. A process in weft's own
/// mount namespace is not the pod's container (it would show the node's file), so only
/// processes in another mount namespace count.
fn pod_file(pod: NsId) -> Option<String> {
    let own_mnt = std::fs::metadata("/proc/self/ns/mnt").ok()?.ino();
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let name = entry.file_name();
        if !name
            .to_str()
            .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
        {
            continue;
        }
        let dir = entry.path();
        if NsId::of_path(dir.join("ns/net")).ok() != Some(pod) {
            continue;
        }
        match std::fs::metadata(dir.join("ns/mnt")) {
            Ok(m) if m.ino() != own_mnt => {}
            _ => continue,
        }
        if let Ok(text) = std::fs::read_to_string(dir.join("root/etc/resolv.conf")) {
            return Some(text);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nameservers_and_the_last_search_line() {
        let conf = parse(
            "# generated\nnameserver 10.96.0.10\nnameserver fd00::a ; second\nnameserver bogus\nsearch a.example b.example\noptions ndots:5\nsearch shop.svc.cluster.local svc.cluster.local cluster.local\n",
        );
        assert_eq!(
            conf.nameservers,
            vec![
                "10.96.0.10:53".parse().unwrap(),
                "[fd00::a]:53".parse().unwrap()
            ]
        );
        let search: Vec<String> = conf.search.iter().map(|n| n.to_ascii()).collect();
        assert_eq!(
            search,
            [
                "shop.svc.cluster.local.",
                "svc.cluster.local.",
                "cluster.local."
            ]
        );
    }

    #[test]
    fn an_empty_or_missing_file_gives_nothing() {
        assert_eq!(parse(""), ResolvConf::default());
        let c = read_for_pod(
            NsId { dev: 0, ino: 0 },
            Path::new("/nonexistent/resolv.conf"),
        );
        assert_eq!(c.origin, Origin::Fallback);
        assert!(c.conf.nameservers.is_empty());
    }
}
