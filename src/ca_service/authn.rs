//! Who is asking: the caller's bearer token reviewed by the Kubernetes API (TokenReview), and
//! the pods that say which node a caller runs on and which identities live there.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;
use std::time::{Duration, Instant};

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

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
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

impl PodDirectory for std::sync::Arc<dyn PodDirectory> {
    fn node_of<'a>(
        &'a self,
        namespace: &'a str,
        pod: &'a BoundPod,
    ) -> BoxFuture<'a, Result<Option<String>, String>> {
        (**self).node_of(namespace, pod)
    }

    fn runs_on<'a>(
        &'a self,
        namespace: &'a str,
        service_account: &'a str,
        node: &'a str,
    ) -> BoxFuture<'a, Result<bool, String>> {
        (**self).runs_on(namespace, service_account, node)
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

/// How long a positive answer is reused: a review for the same token, a pod of a service
/// account on a node. A node agent asks for many pods' certificates with one token (a node
/// starting up: one request per pod), and each answer is an API round trip; a token revoked
/// or a pod deleted meanwhile is honoured at most this much longer, the same order as the API
/// server's own authentication cache. Refusals are never remembered.
const ANSWER_TTL: Duration = Duration::from_secs(10);
/// Answers remembered at most, per kind.
const CACHE_MAX: usize = 10_000;

/// Remembered answers, each for [`ANSWER_TTL`], at most [`CACHE_MAX`].
struct TtlCache<K, V> {
    entries: Mutex<HashMap<K, (V, Instant)>>,
}

impl<K: std::hash::Hash + Eq, V: Clone> TtlCache<K, V> {
    fn new() -> Self {
        TtlCache {
            entries: Mutex::new(HashMap::new()),
        }
    }

    fn get(&self, key: &K) -> Option<V> {
        let map = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        map.get(key)
            .filter(|(_, at)| at.elapsed() < ANSWER_TTL)
            .map(|(v, _)| v.clone())
    }

    fn put(&self, key: K, value: V) {
        let mut map = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= CACHE_MAX {
            map.retain(|_, (_, at)| at.elapsed() < ANSWER_TTL);
            if map.len() >= CACHE_MAX {
                map.clear();
            }
        }
        map.insert(key, (value, Instant::now()));
    }
}

/// A [`TokenReviewer`] and [`PodDirectory`] that remember positive answers for
/// [`ANSWER_TTL`]: a caller refused a moment ago (or whose lookup failed) is asked about again.
pub struct Cached<R> {
    inner: R,
    reviews: TtlCache<(String, String), Caller>,
    nodes: TtlCache<(String, BoundPod), String>,
    present: TtlCache<(String, String, String), ()>,
}

impl<R> Cached<R> {
    pub fn new(inner: R) -> Self {
        Cached {
            inner,
            reviews: TtlCache::new(),
            nodes: TtlCache::new(),
            present: TtlCache::new(),
        }
    }
}

impl<R: TokenReviewer> TokenReviewer for Cached<R> {
    fn review<'a>(
        &'a self,
        token: &'a str,
        audience: &'a str,
    ) -> BoxFuture<'a, Result<Caller, ReviewError>> {
        Box::pin(async move {
            let key = (token.to_string(), audience.to_string());
            if let Some(c) = self.reviews.get(&key) {
                return Ok(c);
            }
            let caller = self.inner.review(token, audience).await?;
            self.reviews.put(key, caller.clone());
            Ok(caller)
        })
    }
}

impl<R: PodDirectory> PodDirectory for Cached<R> {
    fn node_of<'a>(
        &'a self,
        namespace: &'a str,
        pod: &'a BoundPod,
    ) -> BoxFuture<'a, Result<Option<String>, String>> {
        Box::pin(async move {
            let key = (namespace.to_string(), pod.clone());
            if let Some(node) = self.nodes.get(&key) {
                return Ok(Some(node));
            }
            let node = self.inner.node_of(namespace, pod).await?;
            if let Some(n) = &node {
                self.nodes.put(key, n.clone());
            }
            Ok(node)
        })
    }

    fn runs_on<'a>(
        &'a self,
        namespace: &'a str,
        service_account: &'a str,
        node: &'a str,
    ) -> BoxFuture<'a, Result<bool, String>> {
        Box::pin(async move {
            let key = (
                namespace.to_string(),
                service_account.to_string(),
                node.to_string(),
            );
            if self.present.get(&key).is_some() {
                return Ok(true);
            }
            let present = self.inner.runs_on(namespace, service_account, node).await?;
            if present {
                self.present.put(key, ());
            }
            Ok(present)
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

    impl PodDirectory for Counting {
        fn node_of<'a>(
            &'a self,
            _namespace: &'a str,
            pod: &'a BoundPod,
        ) -> BoxFuture<'a, Result<Option<String>, String>> {
            Box::pin(async move {
                self.0.fetch_add(1, Ordering::SeqCst);
                Ok((pod.name == "scheduled").then(|| "node-a".to_string()))
            })
        }

        fn runs_on<'a>(
            &'a self,
            _namespace: &'a str,
            service_account: &'a str,
            _node: &'a str,
        ) -> BoxFuture<'a, Result<bool, String>> {
            Box::pin(async move {
                self.0.fetch_add(1, Ordering::SeqCst);
                Ok(service_account == "present")
            })
        }
    }

    #[tokio::test]
    async fn pod_answers_are_remembered_only_when_positive() {
        let p = Cached::new(Counting(AtomicUsize::new(0)));
        let pod = |name: &str| BoundPod {
            name: name.into(),
            uid: "u".into(),
        };
        for _ in 0..2 {
            assert_eq!(
                p.node_of("ns", &pod("scheduled")).await.unwrap().as_deref(),
                Some("node-a")
            );
            assert!(p.runs_on("ns", "present", "node-a").await.unwrap());
        }
        assert_eq!(p.inner.0.load(Ordering::SeqCst), 2);
        for _ in 0..2 {
            assert_eq!(p.node_of("ns", &pod("pending")).await.unwrap(), None);
            assert!(!p.runs_on("ns", "absent", "node-a").await.unwrap());
        }
        assert_eq!(
            p.inner.0.load(Ordering::SeqCst),
            6,
            "negative answers are asked again"
        );
    }

    #[tokio::test]
    async fn accepted_tokens_are_reviewed_once_and_refusals_every_time() {
        let r = Cached::new(Counting(AtomicUsize::new(0)));
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
