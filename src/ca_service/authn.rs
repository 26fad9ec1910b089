//! Who is asking: the caller's bearer token reviewed by the Kubernetes API (TokenReview), and
//! the pods that say which node a caller runs on and which identities live there.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{ListParams, PostParams};
use kube::{Api, Client};

type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The pod a bound token names (`authentication.kubernetes.io/pod-*` in the review's extra).
const POD_NAME: &str = "authentication.kubernetes.io/pod-name";
const POD_UID: &str = "authentication.kubernetes.io/pod-uid";
const SA_PREFIX: &str = "system:serviceaccount:";

/// An authenticated caller: a service account, and the pod its token is bound to, if any.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    pub namespace: String,
    pub service_account: String,
    pub pod: Option<BoundPod>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BoundPod {
    pub name: String,
    pub uid: String,
}

impl Caller {
    pub fn name(&self) -> String {
        match &self.pod {
            Some(p) => format!(
                "{}/{} (pod {})",
                self.namespace, self.service_account, p.name
            ),
            None => format!("{}/{}", self.namespace, self.service_account),
        }
    }
}

/// Why a token was not accepted, or the review could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ReviewError {
    #[error("token not accepted: {0}")]
    Rejected(String),
    #[error("the API server could not review the token: {0}")]
    Unavailable(String),
}

pub trait TokenReviewer: Send + Sync + 'static {
    /// Reviews `token` for `audience`.
    fn review<'a>(
        &'a self,
        token: &'a str,
        audience: &'a str,
    ) -> BoxFuture<'a, Result<Caller, ReviewError>>;
}

pub trait PodDirectory: Send + Sync + 'static {
    /// The node a pod is scheduled on (None: not scheduled), after checking its UID.
    fn node_of<'a>(
        &'a self,
        namespace: &'a str,
        pod: &'a BoundPod,
    ) -> BoxFuture<'a, Result<Option<String>, String>>;
    /// Whether a pod running as `namespace/service_account` is scheduled on `node`.
    fn runs_on<'a>(
        &'a self,
        namespace: &'a str,
        service_account: &'a str,
        node: &'a str,
    ) -> BoxFuture<'a, Result<bool, String>>;
}

/// Both, against the Kubernetes API.
#[derive(Clone)]
pub struct KubeApi {
    pub client: Client,
}

impl TokenReviewer for KubeApi {
    fn review<'a>(
        &'a self,
        token: &'a str,
        audience: &'a str,
    ) -> BoxFuture<'a, Result<Caller, ReviewError>> {
        Box::pin(async move {
            let review = TokenReview {
                spec: TokenReviewSpec {
                    token: Some(token.to_string()),
                    audiences: Some(vec![audience.to_string()]),
                },
                ..TokenReview::default()
            };
            let done = Api::<TokenReview>::all(self.client.clone())
                .create(&PostParams::default(), &review)
                .await
                .map_err(|e| ReviewError::Unavailable(e.to_string()))?;
            caller_of(done, audience)
        })
    }
}

/// The caller a finished review names, if it says the token is good for `audience`.
pub fn caller_of(review: TokenReview, audience: &str) -> Result<Caller, ReviewError> {
    let status = review
        .status
        .ok_or_else(|| ReviewError::Rejected("the review has no status".into()))?;
    if status.authenticated != Some(true) {
        return Err(ReviewError::Rejected(
            status.error.unwrap_or_else(|| "not authenticated".into()),
        ));
    }
    // An API server that ignores the requested audience must not pass a token minted for
    // another one.
    if !status
        .audiences
        .as_ref()
        .is_some_and(|a| a.iter().any(|x| x == audience))
    {
        return Err(ReviewError::Rejected(format!(
            "token is not for audience {audience}"
        )));
    }
    let user = status.user.unwrap_or_default();
    let username = user.username.unwrap_or_default();
    let (namespace, service_account) = username
        .strip_prefix(SA_PREFIX)
        .and_then(|rest| rest.split_once(':'))
        .ok_or_else(|| ReviewError::Rejected(format!("{username:?} is not a service account")))?;
    let extra = user.extra.unwrap_or_default();
    let first = |k: &str| extra.get(k).and_then(|v| v.first()).cloned();
    let pod = match (first(POD_NAME), first(POD_UID)) {
        (Some(name), Some(uid)) => Some(BoundPod { name, uid }),
        _ => None,
    };
    Ok(Caller {
        namespace: namespace.to_string(),
        service_account: service_account.to_string(),
        pod,
    })
}

impl PodDirectory for KubeApi {
    fn node_of<'a>(
        &'a self,
        namespace: &'a str,
        pod: &'a BoundPod,
    ) -> BoxFuture<'a, Result<Option<String>, String>> {
        Box::pin(async move {
            let found = Api::<Pod>::namespaced(self.client.clone(), namespace)
                .get_opt(&pod.name)
                .await
                .map_err(|e| format!("reading pod {namespace}/{}: {e}", pod.name))?;
            // The name alone could be a new pod that took the old one's: the UID is the pod.
            Ok(found
                .filter(|p| p.metadata.uid.as_deref() == Some(pod.uid.as_str()))
                .and_then(|p| p.spec?.node_name))
        })
    }

    fn runs_on<'a>(
        &'a self,
        namespace: &'a str,
        service_account: &'a str,
        node: &'a str,
    ) -> BoxFuture<'a, Result<bool, String>> {
        Box::pin(async move {
            let params = ListParams::default().fields(&format!("spec.nodeName={node}"));
            let pods = Api::<Pod>::namespaced(self.client.clone(), namespace)
                .list(&params)
                .await
                .map_err(|e| format!("listing pods of {namespace} on {node}: {e}"))?;
            Ok(pods.items.iter().any(|p| {
                let sa = p
                    .spec
                    .as_ref()
                    .and_then(|s| s.service_account_name.as_deref())
                    .filter(|s| !s.is_empty())
                    .unwrap_or("default");
                let finished = p
                    .status
                    .as_ref()
                    .and_then(|s| s.phase.as_deref())
                    .is_some_and(|ph| ph == "Succeeded" || ph == "Failed");
                // A terminating pod still runs, and may still need its certificate renewed.
                sa == service_account && !finished
            }))
        })
    }
}

impl TokenReviewer for std::sync::Arc<dyn TokenReviewer> {
    fn review<'a>(
        &'a self,
        token: &'a str,
        audience: &'a str,
    ) -> BoxFuture<'a, Result<Caller, ReviewError>> {
        (**self).review(token, audience)
    }
}

/// How long a review's answer is reused for the same token. A node agent asks for many pods'
/// certificates with one token (a node starting up: one request per pod), and each review is
/// an API round trip; a token revoked meanwhile (its pod deleted) is honoured at most this
/// much longer, the same order as the API server's own authentication cache.
const REVIEW_TTL: std::time::Duration = std::time::Duration::from_secs(10);
/// Tokens remembered at most; beyond, expired answers are dropped, then everything.
const REVIEW_CACHE_MAX: usize = 10_000;

/// A [`TokenReviewer`] that remembers accepted tokens for [`REVIEW_TTL`]. Refusals are not
/// remembered: a caller whose token was just rejected (or whose review failed) asks again.
pub struct CachedReviewer<R> {
    inner: R,
    accepted: std::sync::Mutex<HashMap<(String, String), (Caller, std::time::Instant)>>,
}

impl<R: TokenReviewer> CachedReviewer<R> {
    pub fn new(inner: R) -> Self {
        CachedReviewer {
            inner,
            accepted: std::sync::Mutex::new(HashMap::new()),
        }
    }

    fn cached(&self, key: &(String, String)) -> Option<Caller> {
        let map = self.accepted.lock().unwrap_or_else(|p| p.into_inner());
        map.get(key)
            .filter(|(_, at)| at.elapsed() < REVIEW_TTL)
            .map(|(c, _)| c.clone())
    }
}

impl<R: TokenReviewer> TokenReviewer for CachedReviewer<R> {
    fn review<'a>(
        &'a self,
        token: &'a str,
        audience: &'a str,
    ) -> BoxFuture<'a, Result<Caller, ReviewError>> {
        Box::pin(async move {
            let key = (token.to_string(), audience.to_string());
            if let Some(c) = self.cached(&key) {
                return Ok(c);
            }
            let caller = self.inner.review(token, audience).await?;
            let mut map = self.accepted.lock().unwrap_or_else(|p| p.into_inner());
            if map.len() >= REVIEW_CACHE_MAX {
                map.retain(|_, (_, at)| at.elapsed() < REVIEW_TTL);
                if map.len() >= REVIEW_CACHE_MAX {
                    map.clear();
                }
            }
            map.insert(key, (caller.clone(), std::time::Instant::now()));
            Ok(caller)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    struct Counting(AtomicUsize);

    impl TokenReviewer for Counting {
        fn review<'a>(
            &'a self,
            token: &'a str,
            _audience: &'a str,
        ) -> BoxFuture<'a, Result<Caller, ReviewError>> {
            Box::pin(async move {
                self.0.fetch_add(1, Ordering::SeqCst);
                if token == "bad" {
                    return Err(ReviewError::Rejected("no".into()));
                }
                Ok(Caller {
                    namespace: "ns".into(),
                    service_account: token.into(),
                    pod: None,
                })
            })
        }
    }

    #[tokio::test]
    async fn accepted_tokens_are_reviewed_once_refusals_every_time() {
        let r = CachedReviewer::new(Counting(AtomicUsize::new(0)));
        for _ in 0..3 {
            assert_eq!(r.review("a", "aud").await.unwrap().service_account, "a");
        }
        assert_eq!(r.inner.0.load(Ordering::SeqCst), 1);
        r.review("a", "other-audience").await.unwrap();
        assert_eq!(r.inner.0.load(Ordering::SeqCst), 2, "per audience");
        for _ in 0..2 {
            assert!(r.review("bad", "aud").await.is_err());
        }
        assert_eq!(
            r.inner.0.load(Ordering::SeqCst),
            4,
            "refusals are not cached"
        );
    }
}
