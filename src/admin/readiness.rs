//! Readiness: not ready until every start-up task has finished, and it says which are pending.

use std::collections::BTreeSet;
use std::sync::Mutex;

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::Full;

#[derive(Default)]
pub struct Readiness {
    pending: Mutex<BTreeSet<String>>,
}

impl Readiness {
    pub fn pending(&self, task: &str) {
        self.lock().insert(task.to_string());
    }

    pub fn done(&self, task: &str) {
        self.lock().remove(task);
    }

    pub fn is_ready(&self) -> bool {
        self.lock().is_empty()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeSet<String>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn response(&self) -> Response<Full<Bytes>> {
        let pending = self.lock().clone();
        let (status, body) = if pending.is_empty() {
            (StatusCode::OK, "ready\n".to_string())
        } else {
            let list: Vec<String> = pending.into_iter().collect();
            (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: waiting for {}\n", list.join(", ")),
            )
        };
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = status;
        r
    }
}
