//! weft's own lookups: the addresses of endpoints known only by a hostname (a ServiceEntry
//! with `resolution: DNS`, or a WorkloadEntry whose address is a name), resolved when a
//! connection picks one, with weft's own resolvers (its resolv.conf, not the pod's), as
//! ztunnel does. Answers are cached for their TTL by the resolver.

use std::net::IpAddr;
use std::path::Path;

use hickory_resolver::config::{ResolverConfig, ResolverOpts};
use hickory_resolver::name_server::TokioConnectionProvider;
use hickory_resolver::TokioResolver;
use rand::seq::IndexedRandom;

/// Cached answers kept at most (names, not records).
const CACHE_NAMES: usize = 4096;

pub struct HostResolver {
    resolver: TokioResolver,
    /// Why the resolv.conf could not be used; lookups then fail with it.
    unusable: Option<String>,
}

impl HostResolver {
    /// From the resolv.conf at `path`. Reads the file: call it off the async runtime.
    pub fn from_resolv_conf(path: &Path) -> HostResolver {
        let parsed = std::fs::read(path)
            .map_err(|e| e.to_string())
            .and_then(|text| {
                hickory_resolver::system_conf::parse_resolv_conf(text).map_err(|e| e.to_string())
            });
        let (config, mut opts, unusable) = match parsed {
            Ok((config, opts)) if !config.name_servers().is_empty() => (config, opts, None),
            Ok((config, opts)) => (config, opts, Some("it names no nameserver".to_string())),
            Err(e) => (
                ResolverConfig::default(),
                ResolverOpts::default(),
                Some(e.to_string()),
            ),
        };
        if let Some(why) = &unusable {
            tracing::warn!(
                path = %path.display(),
                "weft's own resolv.conf is unusable ({why}); endpoints known by hostname will not resolve"
            );
        }
        opts.cache_size = CACHE_NAMES;
        let resolver = TokioResolver::builder_with_config(
            if unusable.is_some() {
                ResolverConfig::from_parts(None, vec![], vec![])
            } else {
                config
            },
            TokioConnectionProvider::default(),
        )
        .with_options(opts)
        .build();
        HostResolver { resolver, unusable }
    }

    /// One address of `hostname`, picked at random among those of the family the client
    /// used (`prefer_v4`), else among the others.
    pub async fn lookup(&self, hostname: &str, prefer_v4: bool) -> Result<IpAddr, String> {
        if let Some(why) = &self.unusable {
            return Err(format!("weft's resolv.conf is unusable: {why}"));
        }
        let answer = self
            .resolver
            .lookup_ip(hostname)
            .await
            .map_err(|e| e.to_string())?;
        let (same, other): (Vec<IpAddr>, Vec<IpAddr>) =
            answer.iter().partition(|ip| ip.is_ipv4() == prefer_v4);
        let mut rng = rand::rng();
        same.choose(&mut rng)
            .or_else(|| other.choose(&mut rng))
            .copied()
            .ok_or_else(|| "no address in the answer".to_string())
    }
}
