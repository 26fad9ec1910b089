//! The DNS proxy of one captured pod: UDP and TCP on the pod's loopback (where the capture
//! redirects the pod's DNS), answers for the mesh's names from the state, everything else
//! forwarded to the pod's own resolvers from inside the pod's namespace.
//!
//! Bounds: forwarded queries in flight per pod and in total (over them: SERVFAIL at once, and
//! `weft_limit_reached_total{limit="dns_pending..."}`), each forwarded query within the
//! configured time (then SERVFAIL), TCP clients per pod and their idle time. Answers from the
//! state cost no upstream and are not limited. A packet that is not a DNS query is dropped and
//! counted; nothing else notices.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, MessageType};
use hickory_proto::rr::Name;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use super::answer::{self, Asker, Lookup};
use super::metrics::{DnsLabels, DnsProtocol, MalformedLabels};
use super::resolv::{self, Cached};
use crate::capture::NsId;
use crate::proxy::limits::{Limit, PodBudget};
use crate::proxy::socket::{self, into_tokio_listener, ListenOptions, SocketFactory};
use crate::proxy::ProxyContext;
use crate::state::Workload;

/// Largest DNS message (TCP's length prefix; also the UDP receive buffer).
const MAX_MESSAGE: usize = 65535;
/// A TCP client that sends no query for this long is closed (ztunnel's).
const TCP_IDLE: Duration = Duration::from_secs(5);
/// TCP clients of one pod served at once.
const TCP_CLIENTS_PER_POD: usize = 64;

/// The running DNS proxy of one pod; stops when dropped.
pub struct PodDns {
    pub bound: Vec<SocketAddr>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for PodDns {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Everything one pod's proxy shares between its listeners and queries.
struct PodResolver {
    ctx: Arc<ProxyContext>,
    factory: Arc<dyn SocketFactory>,
    netns: NsId,
    namespace: String,
    canonical_service: String,
    canonical_revision: String,
    svc_domain: Name,
    cluster_domain: Name,
    budget: PodBudget,
    /// The pod's resolvers, read without a lock by every query.
    upstreams: arc_swap::ArcSwapOption<Cached>,
    /// Held across a refresh, so a burst of queries on a cold or stale cache waits for one
    /// read of /proc rather than starting one each.
    refresh: tokio::sync::Mutex<()>,
}

impl PodDns {
    /// Binds the proxy's UDP and TCP sockets on the pod's loopback (IPv4, and IPv6 when the
    /// pod has it) and starts serving.
    pub fn start(
        ctx: Arc<ProxyContext>,
        workload: &Workload,
        factory: Arc<dyn SocketFactory>,
        netns: NsId,
        ipv6: bool,
    ) -> io::Result<PodDns> {
        let port = ctx.settings.ports.dns;
        let suffix = &ctx.settings.dns.domain_suffix;
        let name = |s: &str| {
            Name::from_ascii(s).map(|mut n| {
                n.set_fqdn(true);
                n
            })
        };
        let (svc_domain, cluster_domain) = match (name(&format!("svc.{suffix}")), name(suffix)) {
            (Ok(a), Ok(b)) => (a, b),
            _ => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("domain suffix {suffix:?} is not a DNS name"),
                ))
            }
        };
        let pod = format!("{}/{}", workload.namespace, workload.name);
        let resolver = Arc::new(PodResolver {
            budget: PodBudget::new(
                &pod,
                ctx.settings.dns.pending_per_pod,
                ctx.dns_pending.clone(),
                (Limit::DnsPendingPerPod, Limit::DnsPending),
                "DNS query answered SERVFAIL while forwarded queries are pending",
                ctx.limits.clone(),
            ),
            ctx,
            factory,
            netns,
            namespace: workload.namespace.clone(),
            canonical_service: workload.app().to_string(),
            canonical_revision: workload.canonical_revision.clone(),
            svc_domain,
            cluster_domain,
            upstreams: Default::default(),
            refresh: Default::default(),
        });
        let mut ips = vec![IpAddr::V4(Ipv4Addr::LOCALHOST)];
        if ipv6 {
            ips.push(IpAddr::V6(Ipv6Addr::LOCALHOST));
        }
        let mut dns = PodDns {
            bound: Vec::new(),
            tasks: Vec::new(),
        };
        let tcp_clients = Arc::new(Semaphore::new(TCP_CLIENTS_PER_POD));
        for ip in ips {
            let addr = SocketAddr::new(ip, port);
            let udp = resolver.factory.listen_udp(addr)?;
            udp.set_nonblocking(true)?;
            let udp = UdpSocket::from_std(udp)?;
            dns.bound.push(udp.local_addr().unwrap_or(addr));
            dns.tasks
                .push(tokio::spawn(serve_udp(udp, resolver.clone())));
            let tcp =
                into_tokio_listener(resolver.factory.listen(addr, ListenOptions::default())?)?;
            dns.tasks.push(tokio::spawn(serve_tcp(
                tcp,
                resolver.clone(),
                tcp_clients.clone(),
            )));
        }
        info!(workload = %pod, bound = ?dns.bound, "DNS proxy started");
        Ok(dns)
    }
}

impl PodResolver {
    fn labels(&self, query: &Message, protocol: DnsProtocol) -> DnsLabels {
        DnsLabels {
            request_query_type: answer::query_type(query),
            request_protocol: protocol,
            source_canonical_service: self.canonical_service.clone(),
            source_canonical_revision: self.canonical_revision.clone(),
        }
    }

    /// The pod's resolvers and search list, from the cache or read anew (off the runtime).
    async fn upstreams(&self) -> Arc<Cached> {
        let fresh = || self.upstreams.load_full().filter(|c| c.is_fresh());
        if let Some(c) = fresh() {
            return c;
        }
        let _one = self.refresh.lock().await;
        // Another query may have refreshed it while this one waited.
        if let Some(c) = fresh() {
            return c;
        }
        let (netns, fallback) = (self.netns, self.ctx.settings.dns.own_resolv_conf.clone());
        let read = tokio::task::spawn_blocking(move || resolv::read_for_pod(netns, &fallback))
            .await
            .unwrap_or_else(|e| {
                warn!(pod = self.budget.pod(), error = %e, "reading the pod's resolv.conf failed");
                Cached::empty()
            });
        let read = Arc::new(read);
        self.upstreams.store(Some(read.clone()));
        read
    }

    /// The answer to one query as bytes, or None when the packet is dropped (not a query).
    /// Over UDP the answer fits the client's EDNS size (at least 512 bytes) or is truncated.
    async fn handle(&self, packet: &[u8], protocol: DnsProtocol) -> Option<Vec<u8>> {
        let query = match Message::from_vec(packet) {
            Ok(m) if m.message_type() == MessageType::Query => m,
            other => {
                self.ctx
                    .metrics
                    .dns
                    .malformed
                    .get_or_create(&MalformedLabels {
                        request_protocol: protocol,
                    })
                    .inc();
                debug!(pod = self.budget.pod(), error = ?other.err(), "dropped a packet that is not a DNS query");
                return None;
            }
        };
        let limit = match protocol {
            DnsProtocol::udp => usize::from(query.max_payload()),
            DnsProtocol::tcp => MAX_MESSAGE,
        };
        let labels = self.labels(&query, protocol);
        self.ctx.metrics.dns.requests.get_or_create(&labels).inc();
        let upstreams = self.upstreams().await;
        let lookup = {
            let snap = self.ctx.state.snapshot();
            let asker = Asker {
                namespace: &self.namespace,
                search: &upstreams.conf.search,
                svc_domain: &self.svc_domain,
                cluster_domain: &self.cluster_domain,
            };
            answer::lookup(&snap, &asker, &query)
        };
        let reply = match lookup {
            Lookup::Answer(m) => answer::encode_within(&m, limit).ok(),
            Lookup::Forward => {
                self.forward(&query, packet, protocol, &upstreams, labels)
                    .await
            }
        };
        // Nothing encodable (cannot happen for messages built here): SERVFAIL.
        reply.or_else(|| answer::servfail(&query).to_vec().ok())
    }

    /// Forwards the query as it came (id and flags are the client's) to the pod's resolvers,
    /// in order, within the configured time; SERVFAIL when none answers.
    async fn forward(
        &self,
        query: &Message,
        packet: &[u8],
        protocol: DnsProtocol,
        upstreams: &Cached,
        labels: DnsLabels,
    ) -> Option<Vec<u8>> {
        let dns = &self.ctx.metrics.dns;
        let fail = || {
            dns.upstream_failures.get_or_create(&labels).inc();
            answer::servfail(query).to_vec().ok()
        };
        let Ok(_permit) = self.budget.start() else {
            return fail();
        };
        let servers = &upstreams.conf.nameservers;
        if servers.is_empty() {
            debug!(
                pod = self.budget.pod(),
                "no upstream resolver known; SERVFAIL"
            );
            return fail();
        }
        dns.upstream_requests.get_or_create(&labels).inc();
        let t0 = Instant::now();
        let deadline = tokio::time::Instant::now() + self.ctx.settings.dns.upstream_timeout;
        let share = self.ctx.settings.dns.upstream_timeout / servers.len() as u32;
        for (i, server) in servers.iter().enumerate() {
            // Each resolver gets its share; the last one gets what is left.
            let until = if i + 1 == servers.len() {
                deadline
            } else {
                (tokio::time::Instant::now() + share).min(deadline)
            };
            let tried = match protocol {
                DnsProtocol::udp => {
                    tokio::time::timeout_at(until, self.ask_udp(*server, query.id(), packet)).await
                }
                DnsProtocol::tcp => {
                    tokio::time::timeout_at(until, self.ask_tcp(*server, packet)).await
                }
            };
            match tried {
                Ok(Ok(reply)) => {
                    dns.upstream_duration
                        .get_or_create(&labels)
                        .observe(t0.elapsed().as_secs_f64());
                    return Some(reply);
                }
                Ok(Err(e)) => {
                    debug!(pod = self.budget.pod(), upstream = %server, error = %e, "upstream resolver failed")
                }
                Err(_) => {
                    debug!(pod = self.budget.pod(), upstream = %server, "upstream resolver did not answer in time")
                }
            }
        }
        fail()
    }

    /// One UDP exchange from a fresh socket in the pod's namespace (a random source port per
    /// query, as a stub resolver uses). The reply is passed on as the resolver sent it (a
    /// truncated one too: the client then asks over TCP).
    async fn ask_udp(&self, server: SocketAddr, id: u16, packet: &[u8]) -> io::Result<Vec<u8>> {
        let s = self.factory.udp(server.ip())?;
        let s = UdpSocket::from_std(s.into())?;
        s.connect(server).await?;
        s.send(packet).await?;
        let mut buf = vec![0u8; MAX_MESSAGE];
        loop {
            let n = s.recv(&mut buf).await?;
            // Only the answer to this query (same id, a response) counts; stray datagrams
            // are ignored.
            if n >= 12 && u16::from_be_bytes([buf[0], buf[1]]) == id && buf[2] & 0x80 != 0 {
                buf.truncate(n);
                return Ok(buf);
            }
        }
    }

    /// One TCP exchange (RFC 7766 length prefix) from the pod's namespace.
    async fn ask_tcp(&self, server: SocketAddr, packet: &[u8]) -> io::Result<Vec<u8>> {
        let mut s = socket::connect(&*self.factory, server, None).await?;
        write_frame(&mut s, packet).await?;
        read_frame(&mut s)
            .await?
            .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "no answer"))
    }
}

async fn serve_udp(socket: UdpSocket, resolver: Arc<PodResolver>) {
    let socket = Arc::new(socket);
    let mut buf = vec![0u8; MAX_MESSAGE];
    loop {
        let (n, client) = match socket.recv_from(&mut buf).await {
            Ok(r) => r,
            Err(e) => {
                warn!(pod = resolver.budget.pod(), error = %e, "DNS receive failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let packet = buf[..n].to_vec();
        let (socket, resolver) = (socket.clone(), resolver.clone());
        // One task per query: a slow forwarded query never holds up the next one.
        tokio::spawn(async move {
            if let Some(reply) = resolver.handle(&packet, DnsProtocol::udp).await {
                if let Err(e) = socket.send_to(&reply, client).await {
                    debug!(%client, error = %e, "DNS reply not sent");
                }
            }
        });
    }
}

async fn serve_tcp(
    listener: tokio::net::TcpListener,
    resolver: Arc<PodResolver>,
    clients: Arc<Semaphore>,
) {
    loop {
        let (mut s, client) = match listener.accept().await {
            Ok(r) => r,
            Err(e) => {
                warn!(pod = resolver.budget.pod(), error = %e, "DNS accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = clients.clone().try_acquire_owned() else {
            debug!(%client, "too many DNS TCP clients; closed");
            continue;
        };
        let resolver = resolver.clone();
        tokio::spawn(async move {
            let _permit = permit;
            // Queries one after another until the client goes quiet or closes.
            while let Ok(Ok(Some(packet))) =
                tokio::time::timeout(TCP_IDLE, read_frame(&mut s)).await
            {
                let Some(reply) = resolver.handle(&packet, DnsProtocol::tcp).await else {
                    // Not DNS: this is no DNS client; hang up.
                    return;
                };
                if write_frame(&mut s, &reply).await.is_err() {
                    return;
                }
            }
        });
    }
}

async fn write_frame(s: &mut TcpStream, msg: &[u8]) -> io::Result<()> {
    let len = u16::try_from(msg.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "DNS message over 64 KiB"))?;
    let mut frame = Vec::with_capacity(msg.len() + 2);
    frame.extend_from_slice(&len.to_be_bytes());
    frame.extend_from_slice(msg);
    s.write_all(&frame).await
}

/// One length-prefixed message, or None at a clean end of stream.
async fn read_frame(s: &mut TcpStream) -> io::Result<Option<Vec<u8>>> {
    let mut len = [0u8; 2];
    match s.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let mut msg = vec![0u8; usize::from(u16::from_be_bytes(len))];
    s.read_exact(&mut msg).await?;
    Ok(Some(msg))
}
