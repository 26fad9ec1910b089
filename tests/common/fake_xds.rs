//! A protocol-faithful delta-ADS server for the cases a real istiod cannot be made to produce
//! (a malformed resource, a stream cut at a chosen moment): real gRPC (tonic) over real TLS,
//! the messages of weft's own `proto/`. The test drives it: it sees every request weft sends
//! and decides every response.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::Stream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};

use weft::proto::discovery::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use weft::proto::discovery::{DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource};

/// The name in the fake's certificate, as in istiod's.
pub const SAN: &str = "istiod.istio-system.svc";

type Outbound = mpsc::Sender<Result<DeltaDiscoveryResponse, Status>>;

#[derive(Clone, Default)]
struct Shared {
    /// The open stream's sender; replaced when weft reconnects.
    current: Arc<Mutex<Option<Outbound>>>,
    requests: Arc<Mutex<Option<mpsc::UnboundedSender<DeltaDiscoveryRequest>>>>,
}

#[tonic::async_trait]
impl AggregatedDiscoveryService for Shared {
    type DeltaAggregatedResourcesStream =
        Pin<Box<dyn Stream<Item = Result<DeltaDiscoveryResponse, Status>> + Send + 'static>>;

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        let mut incoming = request.into_inner();
        let requests = self.requests.lock().unwrap().clone();
        tokio::spawn(async move {
            while let Some(Ok(req)) = incoming.next().await {
                if let Some(tx) = &requests {
                    let _ = tx.send(req);
                }
            }
        });
        let (tx, rx) = mpsc::channel(16);
        *self.current.lock().unwrap() = Some(tx);
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

pub struct FakeIstiod {
    pub addr: SocketAddr,
    pub root_cert: PathBuf,
    shared: Shared,
    requests: mpsc::UnboundedReceiver<DeltaDiscoveryRequest>,
    _dir: tempfile::TempDir,
}

impl FakeIstiod {
    pub async fn start() -> FakeIstiod {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let dir = tempfile::tempdir().unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let params = rcgen::CertificateParams::new(vec![SAN.to_string()]).unwrap();
        let cert = params.self_signed(&key).unwrap();
        let root_cert = dir.path().join("root-cert.pem");
        std::fs::write(&root_cert, cert.pem()).unwrap();
        let tls = weft::grpc::server_tls(
            vec![cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = Shared::default();
        let (tx, requests) = mpsc::unbounded_channel();
        *shared.requests.lock().unwrap() = Some(tx);
        let incoming = weft::grpc::tls_incoming(listener, tls);
        let service = AggregatedDiscoveryServiceServer::new(shared.clone());
        tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .serve_with_incoming(service, incoming)
                .await;
        });
        FakeIstiod {
            addr,
            root_cert,
            shared,
            requests,
            _dir: dir,
        }
    }

    /// The next request weft sends (bounded wait).
    pub async fn request(&mut self) -> DeltaDiscoveryRequest {
        tokio::time::timeout(Duration::from_secs(20), self.requests.recv())
            .await
            .expect("weft sent a request in time")
            .expect("request channel open")
    }

    /// Sends a response on the open stream.
    pub async fn push(&self, resp: DeltaDiscoveryResponse) {
        let tx = self
            .shared
            .current
            .lock()
            .unwrap()
            .clone()
            .expect("a stream is open");
        tx.send(Ok(resp)).await.expect("stream open");
    }

    /// Ends the open stream with an error, as a restarting istiod would.
    pub async fn cut(&self) {
        let tx = self.shared.current.lock().unwrap().take();
        if let Some(tx) = tx {
            let _ = tx.send(Err(Status::unavailable("going away"))).await;
        }
    }
}

/// A resource of `type_url` holding `msg`.
pub fn resource(type_url: &str, name: &str, version: &str, msg: &impl prost::Message) -> Resource {
    Resource {
        name: name.into(),
        version: version.into(),
        resource: Some(prost_types::Any {
            type_url: type_url.into(),
            value: msg.encode_to_vec(),
        }),
        ..Default::default()
    }
}
