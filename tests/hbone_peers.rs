//! weft's HBONE server against an independent client (plain `h2` + `rustls`, written here), and
//! against peers that are wrong in every way a peer can be.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::raw_hbone::*;
use common::*;
use http::{Method, Request, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use weft::identity::{CertificateAuthority, Identity};

struct Fixture {
    _dir: tempfile::TempDir,
    _b: weft::node::Node,
    hbone: SocketAddr,
    echo: SocketAddr,
}

async fn fixture() -> Fixture {
    let subnet = unique_subnet();
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), &two_workloads(subnet));
    let b = start_node("b", &cfg).await;
    let (echo, _) = echo_server(ip(subnet, 3)).await;
    Fixture {
        _dir: dir,
        _b: b,
        hbone: SocketAddr::new(ip(subnet, 3), 15008),
        echo,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn independent_client_gets_200_and_echo() {
    let f = fixture().await;
    let ca = mesh_ca();
    let send = raw_connect(f.hbone, raw_config(Some((&ca, client_id()))))
        .await
        .unwrap();
    echo_through(&send, f.echo, b"independent hello").await;
}

/// The 200 describes the destination in `baggage`, as ztunnel's answers do: a client that went
/// through a network's gateway names the endpoint it reached from it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_answer_names_the_destination_in_baggage() {
    let f = fixture().await;
    let ca = mesh_ca();
    let send = raw_connect(f.hbone, raw_config(Some((&ca, client_id()))))
        .await
        .unwrap();
    let mut ready = send.clone().ready().await.unwrap();
    let (resp, _stream) = ready.send_request(connect_req(f.echo), false).unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(10), resp)
        .await
        .expect("answered in time")
        .expect("an answer");
    assert_eq!(resp.status(), StatusCode::OK);
    let baggage = weft::hbone::wire::response_baggage(&resp).expect("a baggage header");
    let described = weft::hbone::wire::Baggage::parse(baggage);
    assert_eq!(described.namespace, "shop", "{baggage}");
    assert_eq!(described.cluster, "Kubernetes", "{baggage}");
    // The server of this config has no workload name, canonical service or locality: those
    // keys are left out, as ztunnel leaves out empty ones.
    assert_eq!(
        baggage,
        "k8s.cluster.name=Kubernetes,k8s.namespace.name=shop"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_get_400_and_unreachable_gets_503() {
    let f = fixture().await;
    let ca = mesh_ca();
    let send = raw_connect(f.hbone, raw_config(Some((&ca, client_id()))))
        .await
        .unwrap();

    let get = Request::builder()
        .method(Method::GET)
        .uri(format!("https://{}/", f.echo))
        .body(())
        .unwrap();
    assert_eq!(request(&send, get).await.0, StatusCode::BAD_REQUEST);

    let elsewhere = SocketAddr::new("127.0.0.1".parse().unwrap(), f.echo.port());
    assert_eq!(
        request(&send, connect_req(elsewhere)).await.0,
        StatusCode::BAD_REQUEST,
        "authority IP mismatch"
    );

    let own_port = SocketAddr::new(f.echo.ip(), 15008);
    assert_eq!(
        request(&send, connect_req(own_port)).await.0,
        StatusCode::BAD_REQUEST,
        "weft's own port"
    );

    let closed_port = SocketAddr::new(f.echo.ip(), 9);
    assert_eq!(
        request(&send, connect_req(closed_port)).await.0,
        StatusCode::SERVICE_UNAVAILABLE
    );

    // The connection survived all of that.
    echo_through(&send, f.echo, b"still fine").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_without_a_mesh_identity_are_refused() {
    let logs = logs();
    let f = fixture().await;
    // No client certificate.
    let e = raw_connect(f.hbone, raw_config(None)).await.unwrap_err();
    assert!(!e.is_empty());
    // Right CA, wrong trust domain.
    let ca = mesh_ca();
    let foreign = Identity::new("evil.example", "shop", "client-sa");
    assert!(raw_connect(f.hbone, raw_config(Some((&ca, foreign))))
        .await
        .is_err());
    // A certificate from another CA.
    let other = tempfile::tempdir().unwrap();
    CertificateAuthority::init(other.path(), "cluster.local").unwrap();
    let other_ca = CertificateAuthority::load(other.path()).unwrap();
    assert!(
        raw_connect(f.hbone, raw_config(Some((&other_ca, client_id()))))
            .await
            .is_err()
    );

    let local = format!("local={}", f.hbone);
    let mine = || -> Vec<String> {
        logs.lines_with("HBONE connection refused")
            .into_iter()
            .filter(|l| l.contains(&local))
            .collect()
    };
    eventually("three refusals logged", || mine().len() >= 3).await;
    let mine = mine();
    assert!(
        mine.iter()
            .any(|l| l.contains("not in trust domain cluster.local")),
        "{mine:#?}"
    );
    // Another CA with the same subject name: found as issuer, then its signature fails.
    assert!(
        mine.iter()
            .any(|l| l.contains("UnknownIssuer") || l.contains("BadSignature")),
        "{mine:#?}"
    );
    assert!(
        mine.iter().any(|l| l.contains("peer sent no certificates")),
        "{mine:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_does_not_disturb_other_tunnels() {
    let f = fixture().await;
    let ca = mesh_ca();
    let send = raw_connect(f.hbone, raw_config(Some((&ca, client_id()))))
        .await
        .unwrap();
    let (status, stream) = request(&send, connect_req(f.echo)).await;
    assert_eq!(status, StatusCode::OK);
    let (mut tx, mut rx) = stream.unwrap();

    // What refusing a non-TLS peer looks like on the wire: one TLS record of type alert (21),
    // version 3.3, length 2, level fatal (2), description decode_error (50); then the server
    // closes cleanly. Anything else (no answer, a reset, HTTP, the junk echoed back by a
    // passthrough) is wrong.
    const DECODE_ERROR_ALERT: [u8; 7] = [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 50];
    let logs = logs();
    for junk in [
        &b"GET / HTTP/1.1\r\n\r\n"[..],
        &[0u8; 64][..],
        &[0x16, 3, 1, 0xff, 0xff, 1, 2, 3][..],
    ] {
        let mut s = TcpStream::connect(f.hbone).await.unwrap();
        let me = s.local_addr().unwrap();
        s.write_all(junk).await.unwrap();
        let mut buf = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("{junk:?}: the server did not close the connection"))
            .unwrap_or_else(|e| panic!("{junk:?}: closed with an error, not an alert: {e}"));
        assert_eq!(
            buf, DECODE_ERROR_ALERT,
            "{junk:?}: the answer is a fatal TLS decode_error alert and nothing else"
        );
        let peer = format!("peer={me}");
        eventually("the refusal of the garbage logged", || {
            logs.lines_with("HBONE connection refused")
                .iter()
                .any(|l| l.contains(&peer))
        })
        .await;
    }

    // The tunnel opened before the garbage still works.
    assert_eq!(
        finish_and_read(&mut tx, &mut rx, b"after the storm").await,
        b"after the storm"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weft_client_refuses_a_server_with_the_wrong_identity() {
    let logs = logs();
    let subnet = unique_subnet();
    let dir_a = tempfile::tempdir().unwrap();
    let dir_b = tempfile::tempdir().unwrap();
    // Node a believes the server runs as `expected-sa`; node b serves it as `server-sa`.
    let view_a =
        two_workloads(subnet).replace("serviceAccount: server-sa", "serviceAccount: expected-sa");
    let a = start_node("a", &write_config(dir_a.path(), &view_a)).await;
    let _b = start_node("b", &write_config(dir_b.path(), &two_workloads(subnet))).await;
    let (echo, _) = echo_server(ip(subnet, 3)).await;
    let (_fwd, entry) = forward(&a, "client-uid", ip(subnet, 2), echo);
    let mut c = TcpStream::connect(entry).await.unwrap();
    let _ = c.write_all(b"secret").await;
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), c.read_to_end(&mut buf))
        .await
        .unwrap();
    assert!(buf.is_empty(), "no bytes may come back from an impostor");
    let needle = format!("dst.addr={echo}");
    eventually("outbound failure logged", || {
        logs.lines_with(&needle)
            .iter()
            .any(|l| l.contains("not one of the expected"))
    })
    .await;
}
