//! Each of weft's limits, attacked as a peer or a pod would: the attack is bounded, the limit
//! is counted in `weft_limit_reached_total`, and legitimate traffic carries on.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::raw_hbone::*;
use common::*;
use http::StatusCode;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use weft::config::{Limits, Settings};
use weft::node::Node;

struct Fixture {
    _dir: tempfile::TempDir,
    node: Node,
    subnet: [u8; 3],
    hbone: SocketAddr,
    echo: SocketAddr,
}

/// Node b (the server workload's) with `limits`, and an echo server as the app.
async fn fixture(limits: Limits) -> Fixture {
    let subnet = unique_subnet();
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), &two_workloads(subnet));
    let node = start_node_with(with_limits("b", limits), &cfg).await;
    let (echo, _) = echo_server(ip(subnet, 3)).await;
    Fixture {
        _dir: dir,
        node,
        subnet,
        hbone: SocketAddr::new(ip(subnet, 3), 15008),
        echo,
    }
}

fn with_limits(node: &str, limits: Limits) -> Settings {
    Settings {
        limits,
        ..settings(node)
    }
}

/// A `limit reached` line names `limit` and who reached it (`who` is part of its address).
fn assert_logged(logs: &LogBuffer, limit: &str, who: &str) {
    let lines = logs.lines_with("limit reached");
    assert!(
        lines.iter().any(|l| l.contains(limit) && l.contains(who)),
        "{limit} reached by {who} is not logged: {lines:?}"
    );
}

async fn reached(node: &Node, limit: &str) -> f64 {
    metric(
        &scrape(node.metrics_addr).await,
        "weft_limit_reached_total",
        &[&format!("limit=\"{limit}\"")],
    )
    .unwrap_or(0.0)
}

async fn client(f: &Fixture) -> h2::client::SendRequest<Bytes> {
    raw_connect(f.hbone, raw_config(Some((&mesh_ca(), client_id()))))
        .await
        .expect("a legitimate client connects")
}

/// Opens a CONNECT stream to the echo server and keeps it open.
async fn hold_stream(
    send: &h2::client::SendRequest<Bytes>,
    echo: SocketAddr,
) -> (h2::SendStream<Bytes>, h2::RecvStream) {
    let (status, stream) = request(send, connect_req(echo)).await;
    assert_eq!(status, StatusCode::OK);
    stream.expect("an open stream")
}

/// A listener whose accept queue is full and never drained: connects to it hang (the kernel
/// drops their SYNs), as to a host that does not answer.
fn hung_listener(ip: IpAddr) -> (socket2::Socket, SocketAddr, Vec<std::net::TcpStream>) {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    s.bind(&SocketAddr::new(ip, 0).into()).unwrap();
    s.listen(0).unwrap();
    let addr = s.local_addr().unwrap().as_socket().unwrap();
    let mut fillers = Vec::new();
    for _ in 0..4 {
        if let Ok(c) = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
            fillers.push(c);
        }
    }
    (s, addr, fillers)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_per_connection_are_advertised_held_to_and_counted() {
    let logs = logs();
    let f = fixture(Limits {
        streams_per_connection: 8,
        ..Limits::default()
    })
    .await;
    let send = client(&f).await;
    assert_eq!(
        send.current_max_send_streams(),
        8,
        "SETTINGS_MAX_CONCURRENT_STREAMS"
    );
    let mut held = Vec::new();
    for _ in 0..8 {
        held.push(hold_stream(&send, f.echo).await);
    }
    // The ninth waits for a free stream instead of being served.
    let mut ready = send.clone().ready().await.unwrap();
    let (ninth, _tx9) = ready.send_request(connect_req(f.echo), false).unwrap();
    let mut ninth = Box::pin(ninth);
    assert!(
        tokio::time::timeout(Duration::from_millis(500), &mut ninth)
            .await
            .is_err(),
        "a ninth stream was served while eight were open"
    );
    assert_eq!(reached(&f.node, "streams_per_connection").await, 1.0);
    assert_logged(&logs, "streams_per_connection", "127.");
    // Another connection is served meanwhile.
    echo_through(&client(&f).await, f.echo, b"a second connection").await;
    // One stream ends; the ninth gets its place.
    let (mut tx, mut rx) = held.pop().unwrap();
    tx.send_data(Bytes::new(), true).unwrap();
    while let Some(chunk) = rx.data().await {
        chunk.unwrap();
    }
    let resp = tokio::time::timeout(Duration::from_secs(10), ninth)
        .await
        .expect("the ninth stream is served once one ended")
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_header_lists_get_431_and_the_connection_carries_on() {
    let logs = logs();
    let f = fixture(Limits::default()).await;
    let send = client(&f).await;
    let mut req = connect_req(f.echo);
    for i in 0..4 {
        req.headers_mut().insert(
            http::HeaderName::try_from(format!("x-pad-{i}")).unwrap(),
            http::HeaderValue::from_str(&"a".repeat(20 * 1024)).unwrap(),
        );
    }
    let (status, _) = request(&send, req).await;
    assert_eq!(status, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    echo_through(&send, f.echo, b"after 80 KiB of headers").await;
    assert_eq!(reached(&f.node, "header_list").await, 1.0);
    assert_logged(&logs, "header_list", "127.");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hbone_connections_are_capped_per_peer_and_in_total() {
    let f = fixture(Limits {
        connections_per_peer: 3,
        connections: 5,
        ..Limits::default()
    })
    .await;
    let cfg = raw_config(Some((&mesh_ca(), client_id())));
    let from = |host: u8| Some(ip(f.subnet, host));
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(
            raw_connect_from(from(10), f.hbone, cfg.clone())
                .await
                .unwrap(),
        );
    }
    assert!(
        raw_connect_from(from(10), f.hbone, cfg.clone())
            .await
            .is_err(),
        "a fourth connection from one peer"
    );
    assert_eq!(reached(&f.node, "connections_per_peer").await, 1.0);
    for _ in 0..2 {
        held.push(
            raw_connect_from(from(11), f.hbone, cfg.clone())
                .await
                .unwrap(),
        );
    }
    assert!(
        raw_connect_from(from(12), f.hbone, cfg.clone())
            .await
            .is_err(),
        "a sixth connection in all"
    );
    assert_eq!(reached(&f.node, "connections").await, 1.0);
    let metrics = f.node.metrics_addr;
    assert_eq!(
        metric(&scrape(metrics).await, "weft_hbone_connections", &[]),
        Some(5.0)
    );
    // The connections held still carry streams.
    echo_through(&held[0], f.echo, b"held").await;
    // A connection that ends gives its place back.
    held.truncate(4);
    eventually_metric(metrics, "weft_hbone_connections", &[], 4.0).await;
    let fresh = raw_connect_from(from(12), f.hbone, cfg).await.unwrap();
    echo_through(&fresh, f.echo, b"a new peer, once there is room").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_without_streams_are_closed_and_busy_ones_kept() {
    let f = fixture(Limits {
        idle_connection: Duration::from_secs(1),
        ..Limits::default()
    })
    .await;
    let idle = client(&f).await;
    echo_through(&idle, f.echo, b"once").await;
    let busy = client(&f).await;
    let (mut tx, mut rx) = hold_stream(&busy, f.echo).await;

    tokio::time::sleep(Duration::from_millis(2500)).await;
    eventually_metric(f.node.metrics_addr, "weft_hbone_connections", &[], 1.0).await;
    assert_eq!(reached(&f.node, "idle_connection").await, 1.0);
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        match idle.clone().ready().await {
            Err(_) => true,
            Ok(mut r) => r.send_request(connect_req(f.echo), true).is_err(),
        }
    })
    .await
    .expect("the idle connection's state is known");
    assert!(closed, "the idle connection was closed with GOAWAY");

    // The connection with a stream in flight was left alone.
    assert_eq!(
        finish_and_read(&mut tx, &mut rx, b"still here").await,
        b"still here"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_connects_to_an_app_are_capped_per_pod_and_time_out() {
    let f = fixture(Limits {
        pending_connects_per_pod: 3,
        connect_timeout: Duration::from_secs(1),
        ..Limits::default()
    })
    .await;
    let (_hung, hung, _fillers) = hung_listener(ip(f.subnet, 3));
    let send = client(&f).await;
    let mut pending = Vec::new();
    for _ in 0..3 {
        let mut ready = send.clone().ready().await.unwrap();
        let (resp, tx) = ready.send_request(connect_req(hung), false).unwrap();
        pending.push((resp, tx));
    }
    // The three are pending (their connects hang); give weft the time to start them.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    let (status, _) = request(&send, connect_req(hung)).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        started.elapsed() < Duration::from_millis(900),
        "the fourth is refused at once, not after the connect timeout"
    );
    assert_eq!(reached(&f.node, "pending_connects_per_pod").await, 1.0);
    for (resp, _tx) in pending {
        let resp = tokio::time::timeout(Duration::from_secs(5), resp)
            .await
            .expect("a pending connect is given up within the connect timeout")
            .unwrap();
        assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    }
    assert_eq!(reached(&f.node, "connect_timeout").await, 3.0);
    // The budget is back: the pod's app is reachable again on the same connection.
    echo_through(&send, f.echo, b"after the hung connects").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbound_passthrough_connect_times_out_and_closes_the_client() {
    let subnet = unique_subnet();
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), &two_workloads(subnet));
    let a = start_node_with(
        with_limits(
            "a",
            Limits {
                connect_timeout: Duration::from_secs(1),
                ..Limits::default()
            },
        ),
        &cfg,
    )
    .await;
    // An address outside the mesh that never answers.
    let (_hung, hung, _fillers) = hung_listener(ip(subnet, 9));
    let (_fwd, listen) = forward(&a, "client-uid", ip(subnet, 2), hung);
    let mut c = TcpStream::connect(listen).await.unwrap();
    let started = Instant::now();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(5), c.read(&mut buf))
        .await
        .expect("the client is closed once the connect is given up")
        .unwrap_or(0);
    assert_eq!(n, 0, "nothing but the close");
    assert!(started.elapsed() >= Duration::from_millis(900));
    let text = scrape(a.metrics_addr).await;
    assert_eq!(
        metric(
            &text,
            "weft_limit_reached_total",
            &["limit=\"connect_timeout\""]
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(
            &text,
            "istio_tcp_connections_failed_total",
            &["response_flags=\"CONNECT\""]
        ),
        Some(1.0)
    );
}

/// An app that writes as fast as it may on every connection (at most 256 MiB each).
async fn chatty_app(ip: IpAddr) -> SocketAddr {
    let l = tokio::net::TcpListener::bind(SocketAddr::new(ip, 0))
        .await
        .unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                use tokio::io::AsyncWriteExt;
                let chunk = vec![b'x'; 256 * 1024];
                for _ in 0..1024 {
                    if s.write_all(&chunk).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_does_not_read_holds_no_more_than_its_connections_buffer_budget() {
    const BUDGET: usize = 1024 * 1024;
    let logs = logs();
    let f = fixture(Limits {
        buffered_bytes_per_connection: BUDGET,
        ..Limits::default()
    })
    .await;
    let app = chatty_app(ip(f.subnet, 3)).await;
    let cfg = raw_config(Some((&mesh_ca(), client_id())));
    // 8 streams granted 8 MiB each: without a budget weft would queue 8 × 400 KiB for them.
    let (send, stalled, conn) = stalling_connect(f.hbone, cfg, 8 << 20).await;
    let mut streams = Vec::new();
    for _ in 0..8 {
        streams.push(hold_stream(&send, app).await);
    }
    stalled.store(true, std::sync::atomic::Ordering::Release);
    let metrics = f.node.metrics_addr;
    let deadline = Instant::now() + Duration::from_secs(20);
    while reached(&f.node, "buffered_bytes_per_connection").await < 1.0 {
        assert!(
            Instant::now() < deadline,
            "the budget was never reached:\n{}",
            scrape(metrics).await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for _ in 0..10 {
        let held = metric(&scrape(metrics).await, "weft_buffered_bytes", &[]).unwrap();
        assert!(
            held > 0.0 && held <= BUDGET as f64,
            "weft holds {held} bytes for a peer whose budget is {BUDGET}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_logged(&logs, "buffered_bytes_per_connection", "127.");
    // Other peers' traffic carries on.
    echo_through(&client(&f).await, f.echo, b"another peer").await;
    // When the peer goes, what was queued for it is given back.
    conn.abort();
    drop((streams, send));
    eventually_metric(metrics, "weft_buffered_bytes", &[], 0.0).await;
}
