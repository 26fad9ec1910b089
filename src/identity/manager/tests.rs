use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use rustls_pki_types::pem::PemObject;
use tokio::sync::Semaphore;

use super::*;
use crate::identity::ca::SignFuture;
use crate::identity::CertificateAuthority;

/// Delegates to a real CA, but counts calls, can be told to fail, and can be held at a gate.
struct TestSigner {
    ca: CertificateAuthority,
    fail: AtomicBool,
    calls: AtomicUsize,
    /// When set, each signing waits for one permit.
    gate: Option<Semaphore>,
}

impl CertificateSigner for TestSigner {
    fn sign<'a>(&'a self, id: &'a Identity, ttl: Duration) -> SignFuture<'a> {
        Box::pin(async move {
            self.calls.fetch_add(1, Ordering::SeqCst);
            if let Some(gate) = &self.gate {
                gate.acquire()
                    .await
                    .map_err(|_| CaError::NoCertificate {
                        path: "gate closed".into(),
                    })?
                    .forget();
            }
            if self.fail.load(Ordering::SeqCst) {
                return Err(CaError::NoCertificate {
                    path: "unavailable".into(),
                });
            }
            self.ca.issue(id, ttl)
        })
    }
    fn roots(&self) -> Vec<CertificateDer<'static>> {
        self.ca.roots()
    }
}

struct Fixture {
    signer: Arc<TestSigner>,
    mgr: Arc<CertManager>,
    _dir: tempfile::TempDir,
}

impl Fixture {
    fn new(gated: bool) -> Self {
        let dir = tempfile::tempdir().unwrap();
        CertificateAuthority::init(dir.path(), "cluster.local").unwrap();
        let signer = Arc::new(TestSigner {
            ca: CertificateAuthority::load(dir.path()).unwrap(),
            fail: AtomicBool::new(false),
            calls: AtomicUsize::new(0),
            gate: gated.then(|| Semaphore::new(0)),
        });
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mgr = Arc::new(CertManager::new(
            signer.clone(),
            provider,
            Duration::from_secs(3600),
        ));
        Fixture {
            signer,
            mgr,
            _dir: dir,
        }
    }

    fn calls(&self) -> usize {
        self.signer.calls.load(Ordering::SeqCst)
    }

    fn open_gate(&self, permits: usize) {
        if let Some(g) = &self.signer.gate {
            g.add_permits(permits);
        }
    }

    fn state(&self, id: &Identity) -> Option<String> {
        self.mgr
            .summaries()
            .into_iter()
            .find(|s| s.identity == id.to_string())
            .map(|s| s.state)
    }
}

fn id() -> Identity {
    Identity::new("cluster.local", "a", "b")
}

/// Waits (bounded) until `f` holds; the condition is checked here, in the test's own task.
async fn eventually(what: &str, f: impl Fn() -> bool) {
    for _ in 0..500 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting until {what}");
}

#[tokio::test]
async fn renews_at_half_life_and_keeps_old_on_failure() {
    let fx = Fixture::new(false);
    let (mgr, signer) = (&fx.mgr, &fx.signer);
    let id = id();
    mgr.enroll(&id, "uid-1");
    let first = mgr.fetch(&id).await.unwrap();
    // Same identity, same certificate: one per identity.
    assert!(Arc::ptr_eq(&first, &mgr.fetch(&id).await.unwrap()));
    assert!(Arc::ptr_eq(&first, &mgr.certificate(&id).unwrap()));

    let now = SystemTime::now();
    mgr.renew_due(now).await;
    assert!(
        Arc::ptr_eq(&first, &mgr.certificate(&id).unwrap()),
        "renewed too early"
    );
    assert_eq!(fx.calls(), 1);

    signer.fail.store(true, Ordering::SeqCst);
    let late = now + Duration::from_secs(1900);
    mgr.renew_due(late).await;
    assert!(
        Arc::ptr_eq(&first, &mgr.certificate(&id).unwrap()),
        "old cert must stay"
    );
    assert_eq!(fx.calls(), 2);
    assert_eq!(fx.state(&id).as_deref(), Some("Available"));
    mgr.renew_due(late).await; // inside the back-off window: no new attempt
    assert_eq!(fx.calls(), 2);

    signer.fail.store(false, Ordering::SeqCst);
    mgr.renew_due(late + Duration::from_secs(2)).await;
    let second = mgr.certificate(&id).unwrap();
    assert!(!Arc::ptr_eq(&first, &second), "renewal after back-off");
    assert_eq!(fx.calls(), 3);

    // Past its expiry with the CA down: the certificate is dropped, and retried.
    signer.fail.store(true, Ordering::SeqCst);
    let expired = second.not_after + Duration::from_secs(1);
    mgr.renew_due(expired).await;
    assert!(
        mgr.certificate(&id).is_none(),
        "an expired certificate stays"
    );
    assert_eq!(fx.calls(), 4);
    let state = fx.state(&id).unwrap();
    assert!(state.starts_with("Unavailable: "), "{state}");

    // Back-off doubles: 1 s after the first failure of a streak, then 2 s.
    mgr.renew_due(expired + Duration::from_secs(1)).await;
    assert_eq!(fx.calls(), 5);
    mgr.renew_due(expired + Duration::from_secs(2)).await;
    assert_eq!(fx.calls(), 5, "inside the doubled back-off");
    signer.fail.store(false, Ordering::SeqCst);
    mgr.renew_due(expired + Duration::from_secs(3)).await;
    assert_eq!(fx.calls(), 6);
    assert!(
        mgr.certificate(&id).is_some(),
        "issued again once the CA is back"
    );
    assert_eq!(fx.state(&id).as_deref(), Some("Available"));
}

#[tokio::test]
async fn concurrent_fetches_share_one_signing() {
    let fx = Fixture::new(true);
    let id = id();
    let fetches: Vec<_> = (0..10).map(|_| fx.mgr.fetch(&id)).collect();
    let all = futures::future::join_all(fetches);
    let opener = async {
        eventually("the signer is called", || fx.calls() > 0).await;
        // Give any duplicate issuance the chance to show itself before releasing the first.
        tokio::time::sleep(Duration::from_millis(50)).await;
        fx.open_gate(10);
    };
    let (results, ()) = tokio::join!(all, opener);
    let certs: Vec<_> = results.into_iter().map(Result::unwrap).collect();
    assert_eq!(fx.calls(), 1, "one signing for ten callers");
    assert!(certs.iter().all(|c| Arc::ptr_eq(c, &certs[0])));
}

#[tokio::test]
async fn certificate_reads_the_cache_only() {
    let fx = Fixture::new(false);
    let id = id();
    assert!(fx.mgr.certificate(&id).is_none());
    assert!(fx.mgr.certificate(&id).is_none());
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(fx.calls(), 0, "certificate() must not issue");
    assert!(fx.mgr.summaries().is_empty());
    let issued = fx.mgr.fetch(&id).await.unwrap();
    assert!(Arc::ptr_eq(&issued, &fx.mgr.certificate(&id).unwrap()));
}

#[tokio::test]
async fn enroll_issues_in_the_background_and_the_last_release_drops() {
    let fx = Fixture::new(false);
    let id = id();
    fx.mgr.enroll(&id, "uid-1");
    fx.mgr.enroll(&id, "uid-2");
    eventually("enrolment issued a certificate", || {
        fx.mgr.certificate(&id).is_some()
    })
    .await;
    assert_eq!(fx.calls(), 1);
    assert_eq!(fx.mgr.summaries()[0].holders, vec!["uid-1", "uid-2"]);

    fx.mgr.release(&id, "uid-1");
    assert!(fx.mgr.certificate(&id).is_some(), "uid-2 still holds it");
    fx.mgr.release(&id, "uid-1"); // twice: no effect
    assert!(fx.mgr.certificate(&id).is_some());
    fx.mgr.release(&id, "uid-2");
    assert!(
        fx.mgr.certificate(&id).is_none(),
        "the last release drops it"
    );
    assert!(fx.mgr.summaries().is_empty());
    assert!(fx.mgr.config_dump().is_empty());
}

#[tokio::test]
async fn a_release_during_issuance_keeps_nothing() {
    let fx = Fixture::new(true);
    let id = id();
    fx.mgr.enroll(&id, "uid-1");
    eventually("the signer is called", || fx.calls() > 0).await;
    assert_eq!(fx.state(&id).as_deref(), Some("Initializing"));
    let waiter = fx.mgr.fetch(&id);
    tokio::pin!(waiter);
    assert!(
        futures::poll!(&mut waiter).is_pending(),
        "joins the issuance in flight"
    );
    fx.mgr.release(&id, "uid-1");
    fx.open_gate(1);
    // Whoever waited gets the certificate; the manager does not keep it.
    waiter.await.unwrap();
    assert!(fx.mgr.certificate(&id).is_none());
    assert!(fx.mgr.summaries().is_empty());
}

#[tokio::test]
async fn a_failed_issuance_is_not_retried_by_every_caller() {
    let fx = Fixture::new(false);
    fx.signer.fail.store(true, Ordering::SeqCst);
    let id = id();
    fx.mgr.enroll(&id, "uid-1");
    let e = fx.mgr.fetch(&id).await.unwrap_err();
    assert!(e.to_string().contains("unavailable"), "{e}");
    let calls = fx.calls();
    assert_eq!(calls, 1);
    for _ in 0..5 {
        assert!(fx.mgr.fetch(&id).await.is_err());
    }
    assert_eq!(
        fx.calls(),
        calls,
        "callers during the back-off share the last error"
    );
    let state = fx.state(&id).unwrap();
    assert!(state.starts_with("Unavailable: "), "{state}");
    let dump = fx.mgr.config_dump();
    assert_eq!(dump[0].state, state);
    assert!(dump[0].cert_chain.is_empty() && dump[0].root_certs.is_empty());
}

#[tokio::test]
async fn fetch_within_bounds_the_wait_and_issuance_goes_on() {
    let fx = Fixture::new(true);
    let id = id();
    let e = fx
        .mgr
        .fetch_within(&id, Duration::from_millis(50))
        .await
        .unwrap_err();
    assert!(matches!(e, CertManagerError::Timeout { .. }), "{e}");
    fx.open_gate(1);
    let issued = fx
        .mgr
        .fetch_within(&id, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(
        fx.calls(),
        1,
        "the timed-out wait did not start a second issuance"
    );
    assert!(Arc::ptr_eq(&issued, &fx.mgr.certificate(&id).unwrap()));
}

#[tokio::test]
async fn config_dump_has_ztunnel_s_shape() {
    let fx = Fixture::new(false);
    let id = id();
    let issued = fx.mgr.fetch(&id).await.unwrap();
    let value = serde_json::to_value(fx.mgr.config_dump()).unwrap();
    let list = value.as_array().unwrap();
    assert_eq!(list.len(), 1);
    let entry = list[0].as_object().unwrap();
    let mut keys: Vec<&str> = entry.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(keys, ["certChain", "identity", "rootCerts", "state"]);
    assert_eq!(entry["identity"], "spiffe://cluster.local/ns/a/sa/b");
    assert_eq!(entry["state"], "Available");

    let chain = entry["certChain"].as_array().unwrap();
    assert_eq!(chain.len(), issued.certified_key.cert.len());
    let leaf = chain[0].as_object().unwrap();
    let mut keys: Vec<&str> = leaf.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(keys, ["expirationTime", "pem", "serialNumber", "validFrom"]);
    let der = &issued.certified_key.cert[0];
    let pem = der_to_pem(der);
    assert_eq!(leaf["pem"], base64(pem.as_bytes()));
    assert_eq!(
        &CertificateDer::from_pem_slice(pem.as_bytes()).unwrap(),
        der
    );
    let f = facts(der).unwrap();
    assert_eq!(leaf["serialNumber"], f.serial);
    assert!(f.serial.bytes().all(|b| b.is_ascii_digit()), "{}", f.serial);
    assert_eq!(leaf["validFrom"], rfc3339(issued.not_before));
    assert_eq!(leaf["expirationTime"], rfc3339(issued.not_after));
    assert_eq!(entry["rootCerts"].as_array().unwrap().len(), 1);

    let summary = &fx.mgr.summaries()[0];
    assert_eq!(summary.state, "Available");
    assert_eq!(summary.chain.len(), issued.certified_key.cert.len());
    assert!(summary.seconds_to_expiry > 3500);
}
