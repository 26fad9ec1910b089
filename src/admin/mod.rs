//! The node's HTTP endpoints: admin (localhost :15000), metrics (:15020), readiness (:15021).

pub mod config_dump;
mod readiness;

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tracing::debug;

pub use readiness::Readiness;

use crate::identity::CertManager;
use crate::metrics::Metrics;
use crate::state::StateStore;

/// Changes the log filter at run time; returns an error message for a bad filter.
pub type LogControl = Arc<dyn Fn(&str) -> Result<(), String> + Send + Sync>;
/// Produces the captured-pod list for /config_dump.
pub type CapturedPods = Arc<dyn Fn() -> Vec<crate::capture::enroll::CapturedSummary> + Send + Sync>;

/// Everything the endpoints read.
pub struct AdminState {
    pub state: Arc<StateStore>,
    pub certs: Arc<CertManager>,
    pub metrics: Arc<Metrics>,
    pub readiness: Arc<Readiness>,
    pub captured: CapturedPods,
    pub log_control: Option<LogControl>,
    /// This node's name: `workloadState` lists the pods proxied here.
    pub node_name: String,
}

pub type Body = Full<Bytes>;

pub fn respond(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    if let Ok(v) = header::HeaderValue::from_str(content_type) {
        r.headers_mut().insert(header::CONTENT_TYPE, v);
    }
    r
}

/// Whether the scraper asked for OpenMetrics (else the classic text format).
pub fn wants_openmetrics(req: &Request<Incoming>) -> bool {
    req.headers()
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("application/openmetrics-text"))
}

/// A scrape's answer, in the format asked for.
pub fn metrics_response(
    openmetrics: bool,
    encoded: Result<String, std::fmt::Error>,
) -> Response<Body> {
    match encoded {
        Ok(body) if openmetrics => respond(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            body,
        ),
        Ok(body) => respond(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            body,
        ),
        Err(_) => respond(
            StatusCode::INTERNAL_SERVER_ERROR,
            "text/plain",
            "encoding failed",
        ),
    }
}

fn query(req: &Request<Incoming>) -> HashMap<String, String> {
    req.uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

impl AdminState {
    fn config_dump(&self) -> serde_json::Value {
        let snap = self.state.snapshot();
        let captured = (self.captured)();
        json!({
            "workloads": config_dump::workloads(&snap),
            "services": config_dump::services(&snap),
            "policies": config_dump::policies(&snap),
            "certificates": self.certs.config_dump(),
            "workloadState": config_dump::workload_state(&captured),
            "weft": {
                "generation": snap.generation,
                "capturedPods": captured,
                "rootNamespace": snap.policies.root_namespace(),
            },
        })
    }

    fn metrics(&self, req: &Request<Incoming>) -> Response<Body> {
        let openmetrics = wants_openmetrics(req);
        self.metrics.set_certificate_expiry(
            self.certs
                .summaries()
                .into_iter()
                .map(|c| (c.identity, c.seconds_to_expiry as f64)),
        );
        self.metrics
            .policies
            .set(self.state.snapshot().policies.len() as i64);
        metrics_response(openmetrics, self.metrics.encode(openmetrics))
    }

    fn logging(&self, req: &Request<Incoming>) -> Response<Body> {
        let Some(level) = query(req).remove("level") else {
            return respond(
                StatusCode::BAD_REQUEST,
                "text/plain",
                "usage: /logging?level=<filter>\n",
            );
        };
        let Some(control) = &self.log_control else {
            return respond(
                StatusCode::NOT_IMPLEMENTED,
                "text/plain",
                "log level is fixed in this process\n",
            );
        };
        match control(&level) {
            Ok(()) => respond(
                StatusCode::OK,
                "text/plain",
                format!("log level set to {level}\n"),
            ),
            Err(e) => respond(StatusCode::BAD_REQUEST, "text/plain", format!("{e}\n")),
        }
    }

    fn dashboard(&self) -> Response<Body> {
        let snap = self.state.snapshot();
        let mut rows = String::new();
        for w in snap.workloads.values() {
            let ips: Vec<String> = w.workload_ips.iter().map(ToString::to_string).collect();
            rows.push_str(&format!(
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{:?}</td><td>{}</td></tr>",
                html(&w.namespace),
                html(&w.name),
                html(&ips.join(", ")),
                w.protocol,
                if w.is_captured() { "captured" } else { "" }
            ));
        }
        let body = format!(
            "<!doctype html><title>weft</title><h1>weft</h1>\
             <p>generation {} · {} workloads · {} services · {} policies · <a href=/config_dump>config_dump</a></p>\
             <table border=1 cellpadding=4><tr><th>namespace<th>name<th>addresses<th>protocol<th></tr>{rows}</table>",
            snap.generation,
            snap.workloads.len(),
            snap.services.len(),
            snap.policies.len()
        );
        respond(StatusCode::OK, "text/html; charset=utf-8", body)
    }
}

fn html(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Which endpoints a listener serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoints {
    Admin,
    Metrics,
    Readiness,
}

async fn route(
    which: Endpoints,
    st: Arc<AdminState>,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path().to_string();
    let resp = match (which, req.method(), path.as_str()) {
        (Endpoints::Metrics, &Method::GET, "/metrics") => st.metrics(&req),
        (Endpoints::Readiness, &Method::GET, "/healthz/ready") => st.readiness.response(),
        (Endpoints::Admin, &Method::GET, "/config_dump") => respond(
            StatusCode::OK,
            "application/json",
            serde_json::to_vec_pretty(&st.config_dump()).unwrap_or_default(),
        ),
        (Endpoints::Admin, _, "/logging") => st.logging(&req),
        (Endpoints::Admin, &Method::GET, "/metrics") => st.metrics(&req),
        (Endpoints::Admin, &Method::GET, "/healthz/ready") => st.readiness.response(),
        (Endpoints::Admin, &Method::GET, "/") => st.dashboard(),
        _ => respond(StatusCode::NOT_FOUND, "text/plain", "not found\n"),
    };
    Ok(resp)
}

/// Binds `addr` and serves `which` until the task is aborted. Returns the bound address.
pub async fn serve(
    addr: SocketAddr,
    which: Endpoints,
    st: Arc<AdminState>,
) -> std::io::Result<(SocketAddr, JoinHandle<()>)> {
    serve_http(addr, move |req| route(which, st.clone(), req)).await
}

/// A small HTTP/1 server on `addr`: every request goes to `handler`. For weft's admin ports
/// and the CA service's metrics and readiness.
pub async fn serve_http<F, Fut>(
    addr: SocketAddr,
    handler: F,
) -> std::io::Result<(SocketAddr, JoinHandle<()>)>
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<Response<Body>, Infallible>> + Send + 'static,
{
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let task = tokio::spawn(async move {
        loop {
            let Ok((s, _)) = listener.accept().await else {
                continue;
            };
            let handler = handler.clone();
            tokio::spawn(async move {
                let svc = service_fn(handler);
                if let Err(e) = http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await
                {
                    debug!(error = %e, "admin connection error");
                }
            });
        }
    });
    Ok((bound, task))
}
