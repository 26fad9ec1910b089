//! Per-identity workload certificates: issued on first use, renewed at half their lifetime, and
//! replaced only once the new one exists, so a failed renewal never leaves a workload without a
//! certificate.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use rustls::crypto::CryptoProvider;
use rustls::sign::CertifiedKey;
use rustls_pki_types::CertificateDer;
use serde::Serialize;
use tracing::{info, warn};

use super::ca::{CaError, CertificateSigner, WorkloadCertificate};
use super::Identity;

/// First retry after a failed renewal; doubles up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(300);

#[derive(Debug, thiserror::Error)]
pub enum CertManagerError {
    #[error(transparent)]
    Ca(#[from] CaError),
    #[error("the private key for {identity} is not usable by rustls: {source}")]
    Key {
        identity: String,
        source: rustls::Error,
    },
}

/// A certificate in service, in the form rustls wants.
pub struct IssuedCertificate {
    pub identity: Identity,
    pub certified_key: Arc<CertifiedKey>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl IssuedCertificate {
    fn renew_at(&self) -> SystemTime {
        let life = self
            .not_after
            .duration_since(self.not_before)
            .unwrap_or_default();
        self.not_before + life / 2
    }
}

struct Slot {
    current: Arc<IssuedCertificate>,
    /// Set after a failed renewal: do not try again before this.
    retry_at: Option<(SystemTime, Duration)>,
}

/// What `/config_dump` shows of a certificate.
#[derive(Serialize, Debug)]
pub struct CertificateSummary {
    pub identity: String,
    pub not_before_unix: u64,
    pub not_after_unix: u64,
    pub seconds_to_expiry: i64,
}

pub struct CertManager {
    signer: Arc<dyn CertificateSigner>,
    provider: Arc<CryptoProvider>,
    ttl: Duration,
    slots: Mutex<HashMap<Identity, Slot>>,
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl CertManager {
    pub fn new(
        signer: Arc<dyn CertificateSigner>,
        provider: Arc<CryptoProvider>,
        ttl: Duration,
    ) -> Self {
        CertManager {
            signer,
            provider,
            ttl,
            slots: Mutex::new(HashMap::new()),
        }
    }

    pub fn roots(&self) -> Vec<CertificateDer<'static>> {
        self.signer.roots()
    }

    fn issue(&self, id: &Identity) -> Result<Arc<IssuedCertificate>, CertManagerError> {
        let WorkloadCertificate {
            identity,
            chain,
            key,
            not_before,
            not_after,
        } = self.signer.sign(id, self.ttl)?;
        let certified_key =
            CertifiedKey::from_der(chain, key, &self.provider).map_err(|source| {
                CertManagerError::Key {
                    identity: id.to_string(),
                    source,
                }
            })?;
        info!(identity = %id, expires_in_s = self.ttl.as_secs(), "issued workload certificate");
        Ok(Arc::new(IssuedCertificate {
            identity,
            certified_key: Arc::new(certified_key),
            not_before,
            not_after,
        }))
    }

    /// The certificate for `id`, issuing one if this identity has none yet.
    ///
    /// Signing happens under the map lock; it is a local ECDSA operation (well under a
    /// millisecond) and happens once per identity, so the lock is never held long.
    pub fn certificate(&self, id: &Identity) -> Result<Arc<IssuedCertificate>, CertManagerError> {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(slot) = slots.get(id) {
            return Ok(slot.current.clone());
        }
        let issued = self.issue(id)?;
        slots.insert(
            id.clone(),
            Slot {
                current: issued.clone(),
                retry_at: None,
            },
        );
        Ok(issued)
    }

    /// Renews every certificate past half its life. A failure keeps the old certificate and
    /// schedules a retry with exponential back-off.
    pub fn renew_due(&self, now: SystemTime) {
        let due: Vec<Identity> = {
            let slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
            slots
                .iter()
                .filter(|(_, s)| {
                    now >= s.current.renew_at() && s.retry_at.is_none_or(|(at, _)| now >= at)
                })
                .map(|(id, _)| id.clone())
                .collect()
        };
        for id in due {
            let result = self.issue(&id);
            let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
            let Some(slot) = slots.get_mut(&id) else {
                continue;
            };
            match result {
                Ok(issued) => {
                    slot.current = issued;
                    slot.retry_at = None;
                }
                Err(e) => {
                    let backoff = slot
                        .retry_at
                        .map_or(MIN_BACKOFF, |(_, b)| (b * 2).min(MAX_BACKOFF));
                    warn!(identity = %id, error = %e, retry_in_s = backoff.as_secs(),
                        "certificate renewal failed; keeping the current certificate");
                    slot.retry_at = Some((now + backoff, backoff));
                }
            }
        }
    }

    /// Runs renewals until the task is dropped.
    pub async fn run_renewals(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            self.renew_due(SystemTime::now());
        }
    }

    pub fn summaries(&self) -> Vec<CertificateSummary> {
        let now = SystemTime::now();
        let slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<CertificateSummary> = slots
            .values()
            .map(|s| CertificateSummary {
                identity: s.current.identity.to_string(),
                not_before_unix: unix(s.current.not_before),
                not_after_unix: unix(s.current.not_after),
                seconds_to_expiry: unix(s.current.not_after) as i64 - unix(now) as i64,
            })
            .collect();
        out.sort_by(|a, b| a.identity.cmp(&b.identity));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    /// Delegates to a real CA but can be told to fail, to exercise the back-off path.
    struct Flaky {
        ca: super::super::CertificateAuthority,
        fail: AtomicBool,
        calls: AtomicUsize,
    }

    impl CertificateSigner for Flaky {
        fn sign(&self, id: &Identity, ttl: Duration) -> Result<WorkloadCertificate, CaError> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            if self.fail.load(Ordering::SeqCst) {
                return Err(CaError::NoCertificate {
                    path: "unavailable".into(),
                });
            }
            self.ca.sign(id, ttl)
        }
        fn roots(&self) -> Vec<CertificateDer<'static>> {
            self.ca.roots()
        }
    }

    #[test]
    fn renews_at_half_life_and_keeps_old_on_failure() {
        let dir = tempfile::tempdir().unwrap();
        super::super::CertificateAuthority::init(dir.path(), "cluster.local").unwrap();
        let signer = Arc::new(Flaky {
            ca: super::super::CertificateAuthority::load(dir.path()).unwrap(),
            fail: AtomicBool::new(false),
            calls: AtomicUsize::new(0),
        });
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mgr = CertManager::new(signer.clone(), provider, Duration::from_secs(3600));
        let id = Identity::new("cluster.local", "a", "b");
        let first = mgr.certificate(&id).unwrap();
        // Same identity, same certificate: one per identity.
        assert!(Arc::ptr_eq(&first, &mgr.certificate(&id).unwrap()));

        let now = SystemTime::now();
        mgr.renew_due(now);
        assert!(
            Arc::ptr_eq(&first, &mgr.certificate(&id).unwrap()),
            "renewed too early"
        );

        signer.fail.store(true, Ordering::SeqCst);
        let late = now + Duration::from_secs(1900);
        mgr.renew_due(late);
        assert!(
            Arc::ptr_eq(&first, &mgr.certificate(&id).unwrap()),
            "old cert must stay"
        );
        let calls = signer.calls.load(Ordering::SeqCst);
        mgr.renew_due(late); // inside the back-off window: no new attempt
        assert_eq!(signer.calls.load(Ordering::SeqCst), calls);

        signer.fail.store(false, Ordering::SeqCst);
        mgr.renew_due(late + Duration::from_secs(2));
        assert!(
            !Arc::ptr_eq(&first, &mgr.certificate(&id).unwrap()),
            "renewal after back-off"
        );
    }
}
