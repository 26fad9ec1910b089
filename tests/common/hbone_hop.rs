//! A test HBONE hop: terminates HBONE (plain `h2` + `rustls`, independent of weft's server)
//! on a socket inside a lab pod's namespace, records what each CONNECT says and who sent it,
//! answers 200 and forwards the stream's bytes in plain TCP (from the same namespace) to an
//! upstream chosen by the authority. It stands where a waypoint (ambient mode's L7 proxy) or
//! a network's east-west gateway stands; what it checks is only what a node proxy must send
//! them. As a gateway it forwards the inner tunnel of double HBONE untouched, as Istio's does.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Response, StatusCode};
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use weft::capture::Netns;
use weft::identity::{CertificateAuthority, Identity};

/// One CONNECT the waypoint received.
#[derive(Clone, Debug)]
pub struct Seen {
    pub authority: String,
    /// The SPIFFE identity of the client's certificate.
    pub client: String,
    pub forwarded: String,
    /// The `x-forwarded-network` header (double HBONE puts it on the inner request only).
    pub network: Option<String>,
    pub baggage: String,
}

/// Where the hop sends a stream.
#[derive(Clone, Debug)]
pub enum Upstream {
    /// Every stream to one address (a waypoint in front of one workload).
    Fixed(SocketAddr),
    /// By CONNECT authority (a gateway: service `host:port` → an endpoint's HBONE port);
    /// an authority it does not know is answered 503.
    ByAuthority(Vec<(String, SocketAddr)>),
}

impl Upstream {
    fn pick(&self, authority: &str) -> Option<SocketAddr> {
        match self {
            Upstream::Fixed(a) => Some(*a),
            Upstream::ByAuthority(routes) => routes
                .iter()
                .find(|(a, _)| a == authority)
                .map(|(_, to)| *to),
        }
    }
}

pub struct TestHop {
    pub seen: Arc<Mutex<Vec<Seen>>>,
    /// TLS handshakes completed (connections, not streams).
    pub handshakes: Arc<AtomicUsize>,
    /// TCP connections opened to upstreams (one per stream forwarded).
    pub upstream_connects: Arc<AtomicUsize>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TestHop {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TestHop {
    /// Listens on `listen` inside `netns_path`, presenting a certificate for `identity` from
    /// `ca` and requiring a client certificate from the same CA.
    pub async fn start(
        netns_path: &str,
        listen: SocketAddr,
        ca: &CertificateAuthority,
        identity: &Identity,
        upstream: Upstream,
    ) -> TestHop {
        let netns = Netns::open(netns_path).expect("waypoint netns");
        let std_listener = netns
            .run(move || std::net::TcpListener::bind(listen))
            .expect("netns worker")
            .expect("bind the waypoint");
        std_listener.set_nonblocking(true).expect("nonblocking");
        let listener = tokio::net::TcpListener::from_std(std_listener).expect("listener");
        let cert = ca
            .issue(identity, Duration::from_secs(3600))
            .expect("waypoint certificate");
        let mut roots = RootCertStore::empty();
        for r in ca.root_certificates() {
            roots.add(r.clone()).expect("root");
        }
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .build()
                .expect("client verifier");
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("TLS 1.3")
            .with_client_cert_verifier(verifier)
            .with_single_cert(cert.chain, cert.key)
            .expect("server certificate");
        config.alpn_protocols = vec![b"h2".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let handshakes = Arc::new(AtomicUsize::new(0));
        let upstream_connects = Arc::new(AtomicUsize::new(0));
        let (seen2, handshakes2, connects2) =
            (seen.clone(), handshakes.clone(), upstream_connects.clone());
        let (stop_tx, mut stop_rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            // Owned by this task: aborting it (drop) closes every connection too.
            let mut connections = tokio::task::JoinSet::new();
            loop {
                let accepted = tokio::select! {
                    a = listener.accept() => a,
                    _ = &mut stop_rx => {
                        // Every connection closed before `stop` returns.
                        connections.shutdown().await;
                        return;
                    }
                };
                let Ok((tcp, _)) = accepted else {
                    return;
                };
                // As a real proxy does: small frames leave at once, not after a delayed ACK.
                let _ = tcp.set_nodelay(true);
                let (acceptor, seen, handshakes, netns, connects, upstream) = (
                    acceptor.clone(),
                    seen2.clone(),
                    handshakes2.clone(),
                    netns.clone(),
                    connects2.clone(),
                    upstream.clone(),
                );
                connections.spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    handshakes.fetch_add(1, Ordering::SeqCst);
                    let client = tls
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|c| c.first())
                        .and_then(|c| weft::identity::cert::spiffe_identities(c).ok())
                        .and_then(|ids| ids.first().map(|i| i.to_string()))
                        .unwrap_or_default();
                    let Ok(mut conn) = h2::server::handshake(tls).await else {
                        return;
                    };
                    let mut streams = tokio::task::JoinSet::new();
                    while let Some(Ok((req, respond))) = conn.accept().await {
                        let header = |name: &str| {
                            req.headers()
                                .get(name)
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or_default()
                                .to_string()
                        };
                        let authority = req
                            .uri()
                            .authority()
                            .map(|a| a.to_string())
                            .unwrap_or_default();
                        seen.lock().unwrap().push(Seen {
                            authority: authority.clone(),
                            client: client.clone(),
                            forwarded: header("forwarded"),
                            baggage: header("baggage"),
                            network: req
                                .headers()
                                .get("x-forwarded-network")
                                .and_then(|v| v.to_str().ok())
                                .map(str::to_string),
                        });
                        let to = upstream.pick(&authority);
                        let (netns, connects) = (netns.clone(), connects.clone());
                        streams.spawn(forward(req.into_body(), respond, netns, to, connects));
                    }
                });
            }
        });
        TestHop {
            seen,
            handshakes,
            upstream_connects,
            stop: Some(stop_tx),
            task,
        }
    }

    /// Stops it and waits until its listener and every connection are closed (dropping it
    /// only asks the runtime to, so its port and connections may outlive the drop a moment).
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = (&mut self.task).await;
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

/// Answers 200 and relays the stream to `upstream`, connected from the hop's namespace; 503
/// when there is none or it cannot be reached.
async fn forward(
    mut from_client: h2::RecvStream,
    mut respond: h2::server::SendResponse<Bytes>,
    netns: Netns,
    upstream: Option<SocketAddr>,
    connects: Arc<AtomicUsize>,
) {
    let socket = netns
        .run(tokio::net::TcpSocket::new_v4)
        .ok()
        .and_then(|s| s.ok());
    let Some(socket) = socket else {
        return;
    };
    let connected = match upstream {
        Some(to) => socket.connect(to).await.ok(),
        None => None,
    };
    if let Some(tcp) = &connected {
        connects.fetch_add(1, Ordering::SeqCst);
        let _ = tcp.set_nodelay(true);
    }
    let Some(tcp) = connected else {
        let _ = respond.send_response(
            Response::builder()
                .status(StatusCode::SERVICE_UNAVAILABLE)
                .body(())
                .unwrap(),
            true,
        );
        return;
    };
    let Ok(mut to_client) = respond.send_response(Response::new(()), false) else {
        return;
    };
    let (mut rd, mut wr) = tcp.into_split();
    let up = async move {
        while let Some(Ok(chunk)) = from_client.data().await {
            let _ = from_client.flow_control().release_capacity(chunk.len());
            if wr.write_all(&chunk).await.is_err() {
                return;
            }
        }
        let _ = wr.shutdown().await;
    };
    let down = async move {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => {
                    let _ = to_client.send_data(Bytes::new(), true);
                    return;
                }
                Ok(n) => {
                    if to_client
                        .send_data(Bytes::copy_from_slice(&buf[..n]), false)
                        .is_err()
                    {
                        return;
                    }
                }
            }
        }
    };
    tokio::join!(up, down);
}
