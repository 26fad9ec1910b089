//! The three listeners of one workload and their accept loops.

use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsFd;
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

use super::admit::InboundDoor;
use super::inbound::Inbound;
use super::inbound_plain::InboundPlain;
use super::limits::ConnectBudget;
use super::outbound::Outbound;
use super::socket::{into_tokio_listener, ListenOptions, SocketFactory};
use super::ProxyContext;
use crate::hbone::server::{self, ServeOptions};
use crate::identity::CERTIFICATE_WAIT;
use crate::state::Workload;

/// Where a captured connection was headed.
#[derive(Clone, Copy, Debug)]
pub enum DestinationMode {
    /// Redirected by the capture rules: ask conntrack (`SO_ORIGINAL_DST`).
    Original,
    /// Every connection goes to this address (an explicit forward; used by in-process tests).
    Fixed(SocketAddr),
}

/// Addresses each listener binds.
#[derive(Clone, Debug, Default)]
pub struct ListenerSet {
    pub outbound: Vec<SocketAddr>,
    pub inbound_plaintext: Vec<SocketAddr>,
    pub hbone: Vec<SocketAddr>,
}

impl ListenerSet {
    /// Wildcard addresses for a pod network namespace: IPv4, plus IPv6 when the pod has it.
    pub fn wildcard(ctx: &ProxyContext, ipv6: bool) -> Self {
        let p = &ctx.settings.ports;
        let mut ips: Vec<IpAddr> = vec![IpAddr::from([0, 0, 0, 0])];
        if ipv6 {
            ips.push(IpAddr::from([0u16; 8]));
        }
        let at = |port: u16| ips.iter().map(|ip| SocketAddr::new(*ip, port)).collect();
        ListenerSet {
            outbound: at(p.outbound),
            inbound_plaintext: at(p.inbound_plaintext),
            hbone: at(p.hbone),
        }
    }

    /// The workload's own addresses (weft's own network namespace: many workloads share it).
    pub fn on_workload_ips(ctx: &ProxyContext, w: &Workload) -> Self {
        let p = &ctx.settings.ports;
        let at = |port: u16| {
            w.workload_ips
                .iter()
                .map(|ip| SocketAddr::new(*ip, port))
                .collect()
        };
        ListenerSet {
            outbound: at(p.outbound),
            inbound_plaintext: at(p.inbound_plaintext),
            hbone: at(p.hbone),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("listening on {addr} for {workload}: {source}")]
    Listen {
        addr: SocketAddr,
        workload: String,
        source: io::Error,
    },
    #[error("TLS for {workload}: {source}")]
    Tls {
        workload: String,
        source: crate::hbone::tls::TlsSetupError,
    },
}

/// A running set of listeners for one workload. Dropping or [`stop`](Self::stop)ping it closes
/// the listeners; connections already accepted run to completion (that is the drain).
pub struct WorkloadProxy {
    pub uid: String,
    pub bound: ListenerSet,
    tasks: Vec<JoinHandle<()>>,
    /// The pod's DNS proxy, when its DNS is captured.
    dns: Option<crate::dns::PodDns>,
}

impl WorkloadProxy {
    pub fn start(
        ctx: Arc<ProxyContext>,
        workload: &Workload,
        factory: Arc<dyn SocketFactory>,
        listen: &ListenerSet,
        outbound_dest: DestinationMode,
    ) -> Result<Self, ProxyError> {
        let name = format!("{}/{}", workload.namespace, workload.name);
        let bind = |addr: SocketAddr| -> Result<TcpListener, ProxyError> {
            let err = |source| ProxyError::Listen {
                addr,
                workload: name.clone(),
                source,
            };
            let l = factory
                .listen(addr, ListenOptions::default())
                .map_err(err)?;
            into_tokio_listener(l).map_err(err)
        };
        let mut bound = ListenerSet::default();
        let mut tasks = Vec::new();

        let tls = ctx
            .tls
            .server_config(workload.identity())
            .map_err(|source| ProxyError::Tls {
                workload: name.clone(),
                source,
            })?;
        let acceptor = TlsAcceptor::from(tls);
        let budget = ConnectBudget::for_pod(
            &name,
            &ctx.settings.limits,
            ctx.connects.clone(),
            ctx.limits.clone(),
        );
        let door = Arc::new(InboundDoor {
            ctx: ctx.clone(),
            factory: factory.clone(),
            budget: budget.clone(),
        });
        let inbound = Arc::new(Inbound { door: door.clone() });
        let options = Arc::new(ServeOptions {
            tuning: ctx.settings.h2.clone(),
            limits: ctx.settings.limits.clone(),
            reports: ctx.limits.clone(),
            metrics: ctx.metrics.clone(),
            buffers: ctx.send_buffers.clone(),
        });
        let identity = Arc::new(workload.identity());
        for addr in &listen.hbone {
            let l = bind(*addr)?;
            bound.hbone.push(local(&l, *addr));
            let (acceptor, inbound, options, ctx) = (
                acceptor.clone(),
                inbound.clone(),
                options.clone(),
                ctx.clone(),
            );
            let (certs, identity) = (ctx.tls.cert_manager().clone(), identity.clone());
            tasks.push(tokio::spawn(accept_loop(l, "hbone", move |s, _| {
                let (acceptor, inbound, options, ctx) = (
                    acceptor.clone(),
                    inbound.clone(),
                    options.clone(),
                    ctx.clone(),
                );
                let (certs, identity) = (certs.clone(), identity.clone());
                async move {
                    let Ok(peer) = s.peer_addr() else { return };
                    // Counted before the handshake: the handshake is what a flood costs.
                    let Ok(_slot) = ctx.connections.admit(peer.ip()) else {
                        return;
                    };
                    // The handshake reads the certificate from the cache; wait for it here.
                    // Without one there is no TLS to answer on, so the connection is closed.
                    if let Err(e) = certs.fetch_within(&identity, CERTIFICATE_WAIT).await {
                        warn!(%peer, error = %e, "HBONE connection refused");
                        return;
                    }
                    let _ =
                        server::serve(s, acceptor, &options, inbound, ctx.drain.signalled()).await;
                }
            })));
        }

        let plain = Arc::new(InboundPlain { door });
        for addr in &listen.inbound_plaintext {
            let l = bind(*addr)?;
            bound.inbound_plaintext.push(local(&l, *addr));
            let plain = plain.clone();
            tasks.push(tokio::spawn(accept_loop(l, "inbound", move |s, listener_addr| {
                let plain = plain.clone();
                async move {
                    match original_destination(&s, listener_addr) {
                        Ok(dst) => plain.handle(s, dst).await,
                        Err(e) => debug!(error = %e, "inbound connection without an original destination"),
                    }
                }
            })));
        }

        let outbound = Arc::new(Outbound {
            ctx: ctx.clone(),
            source: Arc::new(workload.clone()),
            factory: factory.clone(),
            budget,
        });
        for addr in &listen.outbound {
            let l = bind(*addr)?;
            bound.outbound.push(local(&l, *addr));
            let outbound = outbound.clone();
            tasks.push(tokio::spawn(accept_loop(l, "outbound", move |s, listener_addr| {
                let outbound = outbound.clone();
                async move {
                    let dst = match outbound_dest {
                        DestinationMode::Fixed(d) => Ok(d),
                        DestinationMode::Original => original_destination(&s, listener_addr),
                    };
                    match dst {
                        Ok(dst) => outbound.handle(s, dst).await,
                        Err(e) => debug!(error = %e, "outbound connection without an original destination"),
                    }
                }
            })));
        }
        info!(workload = %name, uid = %workload.uid, ?bound, "workload proxy started");
        Ok(WorkloadProxy {
            uid: workload.uid.clone(),
            bound,
            tasks,
            dns: None,
        })
    }

    /// Runs the pod's DNS proxy with its listeners (it stops with them).
    pub fn attach_dns(&mut self, dns: crate::dns::PodDns) {
        self.dns = Some(dns);
    }

    /// Stops accepting; connections in flight finish on their own.
    pub fn stop(&mut self) {
        for t in self.tasks.drain(..) {
            t.abort();
        }
        self.dns = None;
    }
}

impl Drop for WorkloadProxy {
    fn drop(&mut self) {
        self.stop();
    }
}

fn local(l: &TcpListener, fallback: SocketAddr) -> SocketAddr {
    l.local_addr().unwrap_or(fallback)
}

/// Accepts forever, one task per connection. Accept errors (EMFILE and the like) are logged and
/// retried after a short pause rather than ending the listener.
async fn accept_loop<F, Fut>(listener: TcpListener, what: &'static str, handle: F)
where
    F: Fn(TcpStream, SocketAddr) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let listener_addr = local(&listener, SocketAddr::from(([0, 0, 0, 0], 0)));
    loop {
        match listener.accept().await {
            Ok((s, _)) => {
                tokio::spawn(handle(s, listener_addr));
            }
            Err(e) => {
                warn!(listener = what, addr = %listener_addr, error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

/// The destination a redirected connection was headed for. A connection made straight to the
/// listener (not redirected) is refused: proxying it would loop back to weft.
pub fn original_destination(s: &TcpStream, listener_addr: SocketAddr) -> io::Result<SocketAddr> {
    use nix::sys::socket::{getsockopt, sockopt};
    let local = s.local_addr()?;
    let dst = if local.is_ipv4() {
        let a = getsockopt(&s.as_fd(), sockopt::OriginalDst).map_err(io::Error::from)?;
        SocketAddr::from((
            std::net::Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)),
            u16::from_be(a.sin_port),
        ))
    } else {
        let a = getsockopt(&s.as_fd(), sockopt::Ip6tOriginalDst).map_err(io::Error::from)?;
        SocketAddr::from((
            std::net::Ipv6Addr::from(a.sin6_addr.s6_addr),
            u16::from_be(a.sin6_port),
        ))
    };
    if dst == local || dst.port() == listener_addr.port() && dst.ip() == local.ip() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("connection to {dst} was not redirected"),
        ));
    }
    Ok(dst)
}
