//! The node agent: wires state sources, certificates, the proxy, enrollment and the admin
//! endpoints into one running weft.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::task::JoinHandle;
use tracing::{debug, info};

use crate::admin::{self, AdminState, Endpoints, LogControl, Readiness};
use crate::capture::enroll::Enroller;
use crate::cni::server::CniServer;
use crate::config::Settings;
use crate::dns::lookup::HostResolver;
use crate::hbone::pool::Pool;
use crate::hbone::tls::{self, TlsContext};
use crate::identity::{CertManager, CertificateAuthority, CertificateSigner};
use crate::k8s::{self, translate::ClusterFacts, KubeSettings};
use crate::metrics::Metrics;
use crate::proxy::buffers::SendBuffers;
use crate::proxy::drain::Drain;
use crate::proxy::limits::{ConnectBudget, ConnectionCaps, LimitReports};
use crate::proxy::tracker::ConnectionTracker;
use crate::proxy::{authorize, ProxyContext};
use crate::state::local::{self, Defaults};
use crate::state::StateStore;

/// Where configuration comes from.
#[derive(Default)]
pub struct Sources {
    /// ztunnel-shaped local YAML, watched.
    pub config_file: Option<PathBuf>,
    /// The Kubernetes API, watched.
    pub kubernetes: Option<KubeSettings>,
    /// istiod, over delta ADS.
    pub xds: Option<crate::xds::XdsSettings>,
    /// istio-cni's node agent, over ZDS: it hands pods' namespaces over (its socket path).
    pub zds: Option<PathBuf>,
    /// weft's own CNI plugin, weft-cni, served on a Unix socket.
    pub cni: Option<crate::cni::CniServerSettings>,
}

/// A running weft.
pub struct Node {
    pub ctx: Arc<ProxyContext>,
    pub enroller: Arc<Enroller>,
    pub readiness: Arc<Readiness>,
    pub admin_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub readiness_addr: SocketAddr,
    tasks: Vec<JoinHandle<()>>,
}

impl Node {
    /// Starts everything. The signer defaults to the built-in CA in `settings.ca_dir`.
    pub async fn start(
        settings: Settings,
        sources: Sources,
        signer: Option<Arc<dyn CertificateSigner>>,
        log_control: Option<LogControl>,
    ) -> anyhow::Result<Node> {
        let settings = Arc::new(settings);
        let signer: Arc<dyn CertificateSigner> =
            match signer {
                Some(s) => s,
                None => Arc::new(CertificateAuthority::load(&settings.ca_dir).with_context(
                    || format!("loading the CA from {}", settings.ca_dir.display()),
                )?),
            };
        let provider = tls::provider();
        let certs = Arc::new(CertManager::new(
            signer,
            provider.clone(),
            settings.cert_ttl,
        ));
        let tls = Arc::new(TlsContext::new(
            provider,
            certs.clone(),
            settings.trust_domain.clone(),
        )?);
        let metrics = Arc::new(Metrics::new());
        let state = StateStore::new(settings.root_namespace.clone());
        let readiness = Arc::new(Readiness::default());
        let mut tasks = Vec::new();

        if let Some(path) = &sources.config_file {
            readiness.pending("local config");
            let defaults = Defaults {
                trust_domain: settings.trust_domain.clone(),
                cluster_id: settings.cluster_id.clone(),
            };
            // The first load must succeed: starting with a broken file would start with nothing.
            let (data, loaded) = local::load(path, &defaults)?;
            state.replace_source(local::SOURCE, data);
            metrics.record_reload(true);
            readiness.done("local config");
            tasks.push(tokio::spawn(local::watch(
                path.clone(),
                defaults,
                state.clone(),
                metrics.clone(),
                loaded,
            )));
        }

        let mut kube_client = None;
        if let Some(kube) = &sources.kubernetes {
            let client = k8s::client(kube).await?;
            kube_client = Some(client.clone());
            let facts = ClusterFacts {
                trust_domain: settings.trust_domain.clone(),
                cluster_id: settings.cluster_id.clone(),
                domain_suffix: kube.domain_suffix.clone(),
                root_namespace: settings.root_namespace.clone(),
                auto_allocate_vips: kube.auto_allocate_vips,
            };
            tasks.extend(k8s::start(
                client,
                facts,
                settings.node_name.clone(),
                state.clone(),
                readiness.clone(),
                sources.zds.is_none(),
            ));
        }

        if let Some(xds) = &sources.xds {
            tasks.push(crate::xds::client::start(
                xds.clone(),
                state.clone(),
                readiness.clone(),
                metrics.clone(),
            ));
        }

        let pool = Pool::new(
            settings.h2.max_streams_per_connection,
            settings.h2.pool_idle_timeout,
            settings.h2.pool_spare_idle_timeout,
        );
        tasks.push(tokio::spawn(pool.clone().run_reaper()));
        tasks.push(tokio::spawn(certs.clone().run_renewals()));
        crate::allocator::release_free_memory();
        let limits = Arc::new(LimitReports::new(metrics.clone()));
        let hosts = {
            let path = settings.dns.own_resolv_conf.clone();
            tokio::task::spawn_blocking(move || HostResolver::from_resolv_conf(&path))
                .await
                .context("reading weft's own resolv.conf")?
        };
        let ctx = Arc::new(ProxyContext {
            settings: settings.clone(),
            state: state.clone(),
            tls,
            pool,
            metrics: metrics.clone(),
            tracker: Arc::new(ConnectionTracker::default()),
            connections: ConnectionCaps::new(&settings.limits, limits.clone(), metrics.clone()),
            connects: ConnectBudget::process(&settings.limits),
            send_buffers: SendBuffers::new(
                &settings.limits,
                limits.clone(),
                metrics.buffered_bytes.clone(),
            ),
            dns_pending: Arc::new(tokio::sync::Semaphore::new(settings.dns.pending)),
            hosts: Arc::new(hosts),
            limits,
            drain: Drain::default(),
        });

        let enroller = Enroller::new(ctx.clone(), settings.node_name.clone());
        readiness.pending("workload listeners");
        let failures = enroller.clone().reconcile_blocking().await;
        if failures == 0 {
            readiness.done("workload listeners");
        }
        {
            let (enroller, readiness) = (enroller.clone(), readiness.clone());
            tasks.push(tokio::spawn(async move {
                // Ready once a reconcile has captured everything it was asked to.
                while enroller.clone().reconcile_blocking().await > 0 {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                readiness.done("workload listeners");
                enroller.run().await;
            }));
        }
        if let Some(cni) = &sources.cni {
            // Pods handed to an earlier weft are served again before weft says it is ready;
            // then new ones are taken.
            readiness.pending("weft-cni pods");
            let server = CniServer::new(cni.clone(), enroller.clone(), kube_client.clone());
            let restored = server.restore().await;
            info!(restored, socket = %cni.socket.display(), "serving weft-cni");
            tasks.push(
                server
                    .serve()
                    .await
                    .with_context(|| format!("binding the CNI socket {}", cni.socket.display()))?,
            );
            readiness.done("weft-cni pods");
        }
        if let Some(socket) = &sources.zds {
            tasks.push(crate::zds::start(
                socket.clone(),
                enroller.clone(),
                readiness.clone(),
            ));
        }
        tasks.push(tokio::spawn(revalidate_on_change(ctx.clone())));
        tasks.push(tokio::spawn(forget_departed_workloads(
            state.clone(),
            metrics.clone(),
            settings.metrics_retention,
        )));

        let captured = {
            let enroller = enroller.clone();
            Arc::new(move || enroller.summaries())
        };
        let admin_state = Arc::new(AdminState {
            state,
            certs,
            metrics,
            readiness: readiness.clone(),
            captured,
            log_control,
            node_name: settings.node_name.clone(),
        });
        let p = &settings.ports;
        let loopback = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let (admin_addr, t1) = admin::serve(
            SocketAddr::new(loopback, p.admin),
            Endpoints::Admin,
            admin_state.clone(),
        )
        .await
        .with_context(|| format!("binding admin port {}", p.admin))?;
        let (metrics_addr, t2) = admin::serve(
            SocketAddr::new(settings.node_bind, p.metrics),
            Endpoints::Metrics,
            admin_state.clone(),
        )
        .await
        .with_context(|| format!("binding metrics port {}", p.metrics))?;
        let (readiness_addr, t3) = admin::serve(
            SocketAddr::new(settings.node_bind, p.readiness),
            Endpoints::Readiness,
            admin_state,
        )
        .await
        .with_context(|| format!("binding readiness port {}", p.readiness))?;
        tasks.extend([t1, t2, t3]);
        info!(%admin_addr, %metrics_addr, %readiness_addr, "weft started");
        Ok(Node {
            ctx,
            enroller,
            readiness,
            admin_addr,
            metrics_addr,
            readiness_addr,
            tasks,
        })
    }

    /// Stops accepting (capture rules stay for the next weft), and gives live connections `grace` to end.
    pub async fn shutdown(self, grace: Duration) {
        // Closing the listeners first: with the capture rules' reuse-port listeners and
        // `tcp_migrate_req`, connections not yet accepted go to the weft that took over.
        self.enroller.stop_listening();
        self.ctx.drain.start();
        self.ctx.pool.drain();
        let deadline = tokio::time::Instant::now() + grace;
        let live = || self.ctx.metrics.live_connections.get();
        while live() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        info!(left = live(), "drain finished");
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Now and then, drops the metric series of workloads gone for longer than `retention`.
async fn forget_departed_workloads(
    state: Arc<StateStore>,
    metrics: Arc<Metrics>,
    retention: Duration,
) {
    let mut tick = tokio::time::interval(
        (retention / 4).clamp(Duration::from_millis(100), Duration::from_secs(60)),
    );
    loop {
        tick.tick().await;
        let snap = state.snapshot();
        let present: std::collections::HashSet<(&str, &str)> = snap
            .workloads
            .values()
            .map(|w| (w.namespace.as_str(), w.workload_name_or_name()))
            .collect();
        let removed = metrics.forget_departed(|ns, name| present.contains(&(ns, name)), retention);
        if removed > 0 {
            info!(removed, "metric series of departed workloads removed");
        }
    }
}

/// After every state change, closes live connections the new policies no longer allow.
async fn revalidate_on_change(ctx: Arc<ProxyContext>) {
    let mut changes = ctx.state.subscribe();
    while changes.changed().await.is_ok() {
        let snap = ctx.state.snapshot();
        let r = ctx.tracker.revalidate(
            snap.generation,
            |uid| {
                snap.workload_by_uid(uid)
                    .map(|w| authorize::inputs(&snap, w))
            },
            |c| {
                snap.workload_by_uid(&c.destination_uid)
                    .is_some_and(|w| authorize::check(&snap, w, c).is_ok())
            },
        );
        if r.closed > 0 {
            info!(
                closed = r.closed,
                checked = r.checked,
                generation = snap.generation,
                "closed connections that the new policies deny"
            );
        } else if r.checked > 0 {
            debug!(
                checked = r.checked,
                generation = snap.generation,
                "live connections re-checked"
            );
        }
    }
}
