//! Peer certificate chains already verified.
//!
//! A mesh peer presents the same certificate on every connection until it is renewed (hours),
//! yet each TLS handshake would verify the chain again: a signature check per certificate,
//! path building and DER parsing, a third of a fresh handshake's CPU. A chain is remembered by
//! its exact bytes with what verifying it established (the identities it proves, and the time
//! window in which all of its certificates are valid), so a later handshake with the same chain
//! only checks the clock. The peer's handshake signature, which proves it holds the key, is
//! checked on every handshake all the same.
//!
//! The remembered answer is only as good as the roots it was checked against, so a cache
//! belongs to one set of roots (one `TlsContext`).

use std::collections::HashMap;
use std::sync::Mutex;

use rustls_pki_types::{CertificateDer, UnixTime};
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::identity::Identity;

/// Chains remembered at most; when full, the cache starts over (certificates are per identity
/// and renewed every few hours, so a node sees far fewer).
const CAPACITY: usize = 1024;

/// What a chain was verified for: the same bytes may pass as a client and fail as a server.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    Client,
    Server,
}

#[derive(Clone, Debug)]
struct Verified {
    identities: Vec<Identity>,
    /// Seconds since the epoch: the latest notBefore and earliest notAfter of the chain.
    not_before: u64,
    not_after: u64,
}

#[derive(Debug, Default)]
pub struct VerifiedChains {
    chains: Mutex<HashMap<Vec<u8>, Verified>>,
}

/// The exact bytes that identify a chain for a role.
pub struct ChainKey(Vec<u8>);

impl ChainKey {
    pub fn new(role: Role, end_entity: &[u8], intermediates: &[CertificateDer<'_>]) -> Self {
        let len =
            1 + 4 + end_entity.len() + intermediates.iter().map(|c| 4 + c.len()).sum::<usize>();
        let mut key = Vec::with_capacity(len);
        key.push(role as u8);
        for der in std::iter::once(end_entity).chain(intermediates.iter().map(|c| c.as_ref())) {
            // Lengths keep two different splits of the same bytes apart.
            key.extend_from_slice(&(der.len() as u32).to_be_bytes());
            key.extend_from_slice(der);
        }
        ChainKey(key)
    }
}

impl VerifiedChains {
    /// The identities a chain proved, if it was verified before and all of it is valid `now`.
    pub fn lookup(&self, key: &ChainKey, now: UnixTime) -> Option<Vec<Identity>> {
        let chains = self.chains.lock().unwrap_or_else(|p| p.into_inner());
        let v = chains.get(&key.0)?;
        let now = now.as_secs();
        (v.not_before <= now && now <= v.not_after).then(|| v.identities.clone())
    }

    /// Remembers a chain that has just been verified. A chain whose validity cannot be read is
    /// not remembered (it will simply be verified again).
    pub fn remember(
        &self,
        key: ChainKey,
        end_entity: &[u8],
        intermediates: &[CertificateDer<'_>],
        identities: &[Identity],
    ) {
        let Some((not_before, not_after)) = validity(end_entity, intermediates) else {
            return;
        };
        let mut chains = self.chains.lock().unwrap_or_else(|p| p.into_inner());
        if chains.len() >= CAPACITY {
            chains.clear();
        }
        chains.insert(
            key.0,
            Verified {
                identities: identities.to_vec(),
                not_before,
                not_after,
            },
        );
    }
}

/// The window in which every certificate of the chain is valid.
fn validity(end_entity: &[u8], intermediates: &[CertificateDer<'_>]) -> Option<(u64, u64)> {
    let mut window = (0u64, u64::MAX);
    for der in std::iter::once(end_entity).chain(intermediates.iter().map(|c| c.as_ref())) {
        let (_, cert) = X509Certificate::from_der(der).ok()?;
        let v = cert.validity();
        window.0 = window.0.max(u64::try_from(v.not_before.timestamp()).ok()?);
        window.1 = window.1.min(u64::try_from(v.not_after.timestamp()).ok()?);
    }
    Some(window)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::CertificateAuthority;
    use std::time::Duration;

    fn leaf() -> (Vec<u8>, Identity) {
        let dir = tempfile::tempdir().unwrap();
        CertificateAuthority::init(dir.path(), "cluster.local").unwrap();
        let ca = CertificateAuthority::load(dir.path()).unwrap();
        let id = Identity::new("cluster.local", "ns", "sa");
        let issued = ca.issue(&id, Duration::from_secs(3600)).unwrap();
        (issued.chain[0].to_vec(), id)
    }

    #[test]
    fn answers_only_for_the_same_bytes_role_and_validity() {
        let (der, id) = leaf();
        let cache = VerifiedChains::default();
        let now = UnixTime::now();
        let key = || ChainKey::new(Role::Client, &der, &[]);
        assert!(cache.lookup(&key(), now).is_none());
        cache.remember(key(), &der, &[], std::slice::from_ref(&id));
        assert_eq!(cache.lookup(&key(), now), Some(vec![id]));
        assert!(cache
            .lookup(&ChainKey::new(Role::Server, &der, &[]), now)
            .is_none());
        let mut other = der.clone();
        *other.last_mut().unwrap() ^= 1;
        assert!(cache
            .lookup(&ChainKey::new(Role::Client, &other, &[]), now)
            .is_none());
        let later = UnixTime::since_unix_epoch(Duration::from_secs(now.as_secs() + 7200));
        assert!(cache.lookup(&key(), later).is_none(), "expired since");
    }
}
