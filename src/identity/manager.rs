//! Per-identity workload certificates, issued in the background and read from a cache.
//!
//! - A TLS handshake never waits on a signer: the rustls resolvers read [`CertManager::certificate`],
//!   a cache lookup. The connection paths call [`CertManager::fetch_within`] *before* they start
//!   a handshake; that waits (bounded) for an issuance in flight.
//! - Issuance is single-flight per identity: whoever asks first starts one signing task, and
//!   every caller until it ends shares its result.
//! - Workloads hold identities: [`enroll`](CertManager::enroll) starts issuance for a new one,
//!   [`release`](CertManager::release) by the last holder drops the certificate.
//! - Certificates are renewed at half their lifetime. A failed renewal keeps the current
//!   certificate while it is valid and retries with exponential back-off; an expired one is
//!   dropped (peers would refuse it) and issuance retried.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use futures_util::future::{BoxFuture, FutureExt, Shared};
use rustls::crypto::CryptoProvider;
use rustls::sign::CertifiedKey;
use rustls_pki_types::CertificateDer;
use serde::Serialize;
use tracing::{debug, info, warn};

use super::ca::{CaError, CertificateSigner, WorkloadCertificate};
use super::cert::{base64, der_to_pem, facts, rfc3339};
use super::Identity;

/// First retry after a failed issuance; doubles up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(300);

/// How long a connection waits for its certificate before it fails: as long as the HBONE
/// handshake itself may take.
pub const CERTIFICATE_WAIT: Duration = Duration::from_secs(10);

/// Why there is no certificate for an identity. Cloneable: every caller that waited on the same
/// issuance gets the same error.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CertManagerError {
    #[error(transparent)]
    Ca(Arc<CaError>),
    #[error("the private key for {identity} is not usable by rustls: {source}")]
    Key {
        identity: Identity,
        source: Box<rustls::Error>,
    },
    #[error("no certificate for {identity} after waiting {waited:?}")]
    Timeout {
        identity: Identity,
        waited: Duration,
    },
    #[error("issuing the certificate for {identity} was interrupted")]
    Interrupted { identity: Identity },
}

/// A certificate in service, in the form rustls wants.
#[derive(Debug)]
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

/// The shared result of one issuance in flight.
type Pending = Shared<BoxFuture<'static, Result<Arc<IssuedCertificate>, CertManagerError>>>;

#[derive(Clone, Copy, Debug)]
struct Retry {
    at: SystemTime,
    backoff: Duration,
}

/// Everything known about one identity.
struct Entry {
    /// Distinguishes this entry from an earlier one for the same identity that was released:
    /// an issuance started for that one must not land in this one.
    incarnation: u64,
    /// The workloads (uids) that need this identity.
    holders: BTreeSet<String>,
    current: Option<Arc<IssuedCertificate>>,
    pending: Option<Pending>,
    /// Set after a failed issuance: no new attempt before `at`.
    retry: Option<Retry>,
    last_error: Option<CertManagerError>,
}

impl Entry {
    fn in_backoff(&self, now: SystemTime) -> bool {
        self.retry.is_some_and(|r| now < r.at)
    }

    /// Whether the renewal loop should start an issuance now.
    fn due(&self, now: SystemTime) -> bool {
        self.pending.is_none()
            && !self.in_backoff(now)
            && self.current.as_ref().is_none_or(|c| now >= c.renew_at())
    }

    /// The state as ztunnel and istioctl name it.
    fn state(&self) -> String {
        match (&self.current, &self.last_error) {
            (Some(_), _) => "Available".to_string(),
            (None, Some(e)) => format!("Unavailable: {e}"),
            (None, None) => "Initializing".to_string(),
        }
    }
}

#[derive(Default)]
struct Certs {
    entries: HashMap<Identity, Entry>,
    /// Identities a handshake found without a certificate; each is logged once, until it gets
    /// one.
    warned: HashSet<Identity>,
    next_incarnation: u64,
}

impl Certs {
    fn entry(&mut self, id: &Identity) -> &mut Entry {
        let next = &mut self.next_incarnation;
        self.entries.entry(id.clone()).or_insert_with(|| {
            *next += 1;
            Entry {
                incarnation: *next,
                holders: BTreeSet::new(),
                current: None,
                pending: None,
                retry: None,
                last_error: None,
            }
        })
    }
}

struct Inner {
    signer: Arc<dyn CertificateSigner>,
    provider: Arc<CryptoProvider>,
    ttl: Duration,
    certs: Mutex<Certs>,
}

/// What happened to an issuance, for the log (written after the lock is released).
enum Landed {
    Issued,
    FailedKeepingCurrent(Duration),
    Failed(Duration),
    /// The identity was released (or released and enrolled again) meanwhile.
    Stale,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, Certs> {
        self.certs.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn issue(&self, id: &Identity) -> Result<Arc<IssuedCertificate>, CertManagerError> {
        let WorkloadCertificate {
            identity,
            chain,
            key,
            not_before,
            not_after,
        } = self
            .signer
            .sign(id, self.ttl)
            .await
            .map_err(|e| CertManagerError::Ca(Arc::new(e)))?;
        let certified_key =
            CertifiedKey::from_der(chain, key, &self.provider).map_err(|source| {
                CertManagerError::Key {
                    identity: id.clone(),
                    source: Box::new(source),
                }
            })?;
        Ok(Arc::new(IssuedCertificate {
            identity,
            certified_key: Arc::new(certified_key),
            not_before,
            not_after,
        }))
    }

    /// Signs, then puts the result in the entry it was started for (if that still exists).
    /// `started` is when the attempt began, on the clock the back-off is measured in.
    async fn issue_and_install(
        self: Arc<Self>,
        id: Identity,
        incarnation: u64,
        started: SystemTime,
    ) -> Result<Arc<IssuedCertificate>, CertManagerError> {
        let result = self.issue(&id).await;
        let landed = {
            let mut certs = self.lock();
            let Certs {
                entries, warned, ..
            } = &mut *certs;
            match entries
                .get_mut(&id)
                .filter(|e| e.incarnation == incarnation)
            {
                None => Landed::Stale,
                Some(entry) => {
                    entry.pending = None;
                    match &result {
                        Ok(issued) => {
                            entry.current = Some(issued.clone());
                            entry.retry = None;
                            entry.last_error = None;
                            warned.remove(&id);
                            Landed::Issued
                        }
                        Err(e) => {
                            let backoff = entry
                                .retry
                                .map_or(MIN_BACKOFF, |r| (r.backoff * 2).min(MAX_BACKOFF));
                            entry.retry = Some(Retry {
                                at: started + backoff,
                                backoff,
                            });
                            entry.last_error = Some(e.clone());
                            if entry.current.is_some() {
                                Landed::FailedKeepingCurrent(backoff)
                            } else {
                                Landed::Failed(backoff)
                            }
                        }
                    }
                }
            }
        };
        match (&landed, &result) {
            (Landed::Issued, Ok(c)) => {
                let valid_s = c
                    .not_after
                    .duration_since(SystemTime::now())
                    .unwrap_or_default()
                    .as_secs();
                info!(identity = %id, valid_s, "issued workload certificate");
            }
            (Landed::FailedKeepingCurrent(b), Err(e)) => {
                warn!(identity = %id, error = %e, retry_in_s = b.as_secs(),
                    "certificate renewal failed; keeping the current certificate");
            }
            (Landed::Failed(b), Err(e)) => {
                warn!(identity = %id, error = %e, retry_in_s = b.as_secs(),
                    "no certificate for this identity; will retry");
            }
            _ => debug!(identity = %id, "certificate issued for an identity no longer held"),
        }
        result
    }

    /// Starts an issuance for the (existing) entry of `id`. `None` outside a Tokio runtime.
    fn start(
        self: &Arc<Self>,
        certs: &mut Certs,
        id: &Identity,
        started: SystemTime,
    ) -> Option<Pending> {
        let runtime = tokio::runtime::Handle::try_current().ok()?;
        let entry = certs.entries.get_mut(id)?;
        let task = runtime.spawn(self.clone().issue_and_install(
            id.clone(),
            entry.incarnation,
            started,
        ));
        let identity = id.clone();
        let pending = async move {
            task.await
                .unwrap_or_else(|_| Err(CertManagerError::Interrupted { identity }))
        }
        .boxed()
        .shared();
        entry.pending = Some(pending.clone());
        Some(pending)
    }
}

/// What `/config_dump` shows of an identity's certificate.
#[derive(Serialize, Debug)]
pub struct CertificateSummary {
    pub identity: String,
    /// `Available`, `Initializing` or `Unavailable: <why>`.
    pub state: String,
    /// The workloads (uids) holding this identity.
    pub holders: Vec<String>,
    /// 0 while there is no certificate.
    pub not_before_unix: u64,
    pub not_after_unix: u64,
    pub seconds_to_expiry: i64,
    /// What weft presents, leaf first, as PEM.
    pub chain: Vec<String>,
}

/// One certificate as ztunnel's `/config_dump` shows it (and `istioctl ztunnel-config
/// certificates` reads it).
#[derive(Serialize, Debug, Clone, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct CertDump {
    /// The PEM text, base64-encoded.
    pub pem: String,
    /// Decimal.
    pub serial_number: String,
    /// RFC 3339, UTC, seconds.
    pub valid_from: String,
    pub expiration_time: String,
}

/// One identity as ztunnel's `/config_dump` shows it, under `certificates`.
#[derive(Serialize, Debug, Clone, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct CertsDump {
    pub identity: String,
    pub state: String,
    /// Leaf, then intermediates; empty unless `Available`.
    pub cert_chain: Vec<CertDump>,
    /// Empty unless `Available`.
    pub root_certs: Vec<CertDump>,
}

fn dump_cert(der: &[u8]) -> CertDump {
    let pem = base64(der_to_pem(der).as_bytes());
    match facts(der) {
        Ok(f) => CertDump {
            pem,
            serial_number: f.serial,
            valid_from: rfc3339(f.not_before),
            expiration_time: rfc3339(f.not_after),
        },
        Err(_) => CertDump {
            pem,
            ..CertDump::default()
        },
    }
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The node's workload certificates. Cheap to share (`Arc`); its tasks hold only what they need.
pub struct CertManager {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for CertManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertManager")
            .field("identities", &self.inner.lock().entries.len())
            .finish()
    }
}

impl CertManager {
    pub fn new(
        signer: Arc<dyn CertificateSigner>,
        provider: Arc<CryptoProvider>,
        ttl: Duration,
    ) -> Self {
        CertManager {
            inner: Arc::new(Inner {
                signer,
                provider,
                ttl,
                certs: Mutex::new(Certs::default()),
            }),
        }
    }

    pub fn roots(&self) -> Vec<CertificateDer<'static>> {
        self.inner.signer.roots()
    }

    /// The certificate in service for `id`, if there is one. Never issues: this is what the
    /// TLS resolvers call. A miss is logged once per identity (until it gets a certificate).
    pub fn certificate(&self, id: &Identity) -> Option<Arc<IssuedCertificate>> {
        let mut certs = self.inner.lock();
        if let Some(c) = certs.entries.get(id).and_then(|e| e.current.clone()) {
            return Some(c);
        }
        let first = certs.warned.insert(id.clone());
        let state = certs
            .entries
            .get(id)
            .map_or_else(|| "not requested".to_string(), Entry::state);
        drop(certs);
        if first {
            warn!(identity = %id, %state,
                "no certificate to present; TLS handshakes for this identity fail until one is issued");
        }
        None
    }

    /// The certificate for `id`: the one in service, else the result of the issuance in
    /// flight, else of a new one. While a failed issuance backs off, its error is returned at
    /// once rather than asking the CA again.
    pub async fn fetch(&self, id: &Identity) -> Result<Arc<IssuedCertificate>, CertManagerError> {
        let pending = {
            let mut certs = self.inner.lock();
            let now = SystemTime::now();
            let entry = certs.entry(id);
            if let Some(c) = &entry.current {
                return Ok(c.clone());
            }
            match (&entry.pending, &entry.last_error) {
                (Some(p), _) => p.clone(),
                (None, Some(e)) if entry.in_backoff(now) => return Err(e.clone()),
                (None, _) => self.inner.start(&mut certs, id, now).ok_or_else(|| {
                    CertManagerError::Interrupted {
                        identity: id.clone(),
                    }
                })?,
            }
        };
        pending.await
    }

    /// [`fetch`](Self::fetch), waiting at most `wait`. The issuance goes on if the wait ends.
    pub async fn fetch_within(
        &self,
        id: &Identity,
        wait: Duration,
    ) -> Result<Arc<IssuedCertificate>, CertManagerError> {
        let cached = self
            .inner
            .lock()
            .entries
            .get(id)
            .and_then(|e| e.current.clone());
        if let Some(c) = cached {
            return Ok(c);
        }
        tokio::time::timeout(wait, self.fetch(id))
            .await
            .unwrap_or_else(|_| {
                Err(CertManagerError::Timeout {
                    identity: id.clone(),
                    waited: wait,
                })
            })
    }

    /// Records that workload `holder` (a uid) has identity `id`, and starts issuance in the
    /// background if the identity has no certificate and none is coming.
    pub fn enroll(&self, id: &Identity, holder: &str) {
        let mut certs = self.inner.lock();
        let now = SystemTime::now();
        let entry = certs.entry(id);
        entry.holders.insert(holder.to_string());
        if entry.current.is_none() && entry.due(now) {
            // Outside a runtime nothing starts; the first fetch or renewal pass will.
            let _ = self.inner.start(&mut certs, id, now);
        }
    }

    /// Workload `holder` no longer has identity `id`. The last holder's release drops the
    /// certificate (an issuance in flight still completes, for whoever waits on it, but is
    /// not kept).
    pub fn release(&self, id: &Identity, holder: &str) {
        let mut certs = self.inner.lock();
        let Some(entry) = certs.entries.get_mut(id) else {
            return;
        };
        entry.holders.remove(holder);
        if entry.holders.is_empty() {
            certs.entries.remove(id);
            certs.warned.remove(id);
            drop(certs);
            info!(identity = %id, "workload certificate dropped: no workload holds it");
        }
    }

    /// One renewal pass at time `now`: drops expired certificates, forgets failed identities
    /// nobody holds, and starts issuance for every identity past half its certificate's life
    /// (or without one) that is not backing off. Returns a future that ends when the
    /// issuances started here have; the renewal loop does not wait for it, tests do.
    pub fn renew_due(&self, now: SystemTime) -> impl Future<Output = ()> + Send + 'static {
        let mut started = Vec::new();
        let mut expired = Vec::new();
        {
            let mut certs = self.inner.lock();
            certs.entries.retain(|_, e| {
                !(e.holders.is_empty()
                    && e.current.is_none()
                    && e.pending.is_none()
                    && e.last_error.is_some())
            });
            for (id, entry) in certs.entries.iter_mut() {
                if entry.current.as_ref().is_some_and(|c| now >= c.not_after) {
                    entry.current = None;
                    expired.push(id.clone());
                }
            }
            let due: Vec<Identity> = certs
                .entries
                .iter()
                .filter(|(_, e)| e.due(now))
                .map(|(id, _)| id.clone())
                .collect();
            for id in due {
                started.extend(self.inner.start(&mut certs, &id, now));
            }
        }
        for id in expired {
            warn!(identity = %id, "workload certificate expired before it could be renewed; dropped");
        }
        async move {
            for pending in started {
                let _ = pending.await;
            }
        }
    }

    /// Runs renewal passes once a second until the task is dropped.
    pub async fn run_renewals(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            // The issuances run as their own tasks; this loop does not wait for them.
            drop(self.renew_due(SystemTime::now()));
        }
    }

    /// Every identity known here, sorted, for `/config_dump` and the expiry gauge.
    pub fn summaries(&self) -> Vec<CertificateSummary> {
        let now = unix(SystemTime::now());
        let certs = self.inner.lock();
        let mut out: Vec<CertificateSummary> = certs
            .entries
            .iter()
            .map(|(id, e)| {
                let (not_before_unix, not_after_unix, chain) = match &e.current {
                    Some(c) => (
                        unix(c.not_before),
                        unix(c.not_after),
                        c.certified_key
                            .cert
                            .iter()
                            .map(|der| der_to_pem(der))
                            .collect(),
                    ),
                    None => (0, 0, Vec::new()),
                };
                CertificateSummary {
                    identity: id.to_string(),
                    state: e.state(),
                    holders: e.holders.iter().cloned().collect(),
                    not_before_unix,
                    not_after_unix,
                    seconds_to_expiry: if e.current.is_some() {
                        not_after_unix as i64 - now as i64
                    } else {
                        0
                    },
                    chain,
                }
            })
            .collect();
        out.sort_by(|a, b| a.identity.cmp(&b.identity));
        out
    }

    /// The `certificates` list of ztunnel's `/config_dump`, sorted by identity.
    pub fn config_dump(&self) -> Vec<CertsDump> {
        let chains: Vec<(String, String, Option<Vec<CertificateDer<'static>>>)> = {
            let certs = self.inner.lock();
            certs
                .entries
                .iter()
                .map(|(id, e)| {
                    let chain = e.current.as_ref().map(|c| c.certified_key.cert.clone());
                    (id.to_string(), e.state(), chain)
                })
                .collect()
        };
        // Parsed outside the lock: handshakes read the same map.
        let roots: Vec<CertDump> = self.roots().iter().map(|r| dump_cert(r)).collect();
        let mut out: Vec<CertsDump> = chains
            .into_iter()
            .map(|(identity, state, chain)| match chain {
                Some(chain) => CertsDump {
                    identity,
                    state,
                    cert_chain: chain.iter().map(|c| dump_cert(c)).collect(),
                    root_certs: roots.clone(),
                },
                None => CertsDump {
                    identity,
                    state,
                    ..CertsDump::default()
                },
            })
            .collect();
        out.sort_by(|a, b| a.identity.cmp(&b.identity));
        out
    }
}

#[cfg(test)]
mod tests;
