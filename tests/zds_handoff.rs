//! weft under a protocol-faithful stand-in for istio-cni's node agent, speaking ZDS over a real
//! SOCK_SEQPACKET socket with the pods' real network namespaces passed as descriptors: Add
//! captures (weft installs no rules of its own), Del and snapshots release, bad requests are
//! refused per request without disturbing the connection or other pods, and a reconnect keeps
//! what is served. The real node agent is driven in tests/istio_cni_e2e.rs.

mod common;

use std::fs::File;
use std::io::IoSlice;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::lab::Lab;
use common::*;
use nix::sys::socket::{
    accept, bind, listen, recv, sendmsg, socket, AddressFamily, Backlog, ControlMessage, MsgFlags,
    SockFlag, SockType, UnixAddr,
};
use prost::Message;
use weft::node::{Node, Sources};
use weft::proto::zds::{
    workload_request::Payload, workload_response, AddWorkload, DelWorkload, KeepWorkload,
    SnapshotSent, Version, WorkloadInfo, WorkloadRequest, WorkloadResponse, ZdsHello,
};

const CLIENT: &str = "spiffe://cluster.local/ns/shop/sa/client";

/// The node agent's side: listens, and speaks to one proxy at a time.
struct Agent {
    listener: OwnedFd,
}

struct Conn {
    fd: OwnedFd,
}

impl Agent {
    fn listen(path: &Path) -> Agent {
        let listener = socket(
            AddressFamily::Unix,
            SockType::SeqPacket,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .unwrap();
        bind(listener.as_raw_fd(), &UnixAddr::new(path).unwrap()).unwrap();
        listen(&listener, Backlog::new(4).unwrap()).unwrap();
        Agent { listener }
    }

    /// Accepts the proxy's connection (bounded) and reads its hello.
    fn accept(&self) -> Conn {
        let fd = self.listener.as_raw_fd();
        let raw = std::thread::scope(|s| {
            let h = s.spawn(move || accept(fd));
            let deadline = std::time::Instant::now() + Duration::from_secs(15);
            while !h.is_finished() {
                assert!(
                    std::time::Instant::now() < deadline,
                    "weft did not connect to the node agent"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
            h.join().unwrap().unwrap()
        });
        // SAFETY: accept returned a new descriptor that nothing else owns.
        let conn = Conn {
            fd: unsafe { std::os::fd::FromRawFd::from_raw_fd(raw) },
        };
        let hello = ZdsHello::decode(conn.packet().as_slice()).expect("hello decodes");
        assert_eq!(hello.version, Version::V1 as i32);
        conn
    }
}

impl Conn {
    fn packet(&self) -> Vec<u8> {
        let tv = nix::sys::time::TimeVal::new(15, 0);
        nix::sys::socket::setsockopt(&self.fd, nix::sys::socket::sockopt::ReceiveTimeout, &tv)
            .unwrap();
        let mut buf = vec![0u8; 4096];
        let n = recv(self.fd.as_raw_fd(), &mut buf, MsgFlags::empty()).expect("weft answers");
        buf.truncate(n);
        buf
    }

    /// Sends raw bytes (with descriptors), returns the Ack's error ("" = accepted).
    fn send_raw(&self, bytes: &[u8], fds: &[i32]) -> String {
        let cmsg = [ControlMessage::ScmRights(fds)];
        let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &cmsg };
        sendmsg::<()>(
            self.fd.as_raw_fd(),
            &[IoSlice::new(bytes)],
            cmsgs,
            MsgFlags::empty(),
            None,
        )
        .unwrap();
        let reply = WorkloadResponse::decode(self.packet().as_slice()).expect("ack decodes");
        match reply.payload {
            Some(workload_response::Payload::Ack(a)) => a.error,
            None => panic!("reply without an ack"),
        }
    }

    fn send(&self, payload: Payload, fds: &[i32]) -> String {
        let req = WorkloadRequest {
            payload: Some(payload),
        };
        self.send_raw(&req.encode_to_vec(), fds)
    }

    fn add(&self, uid: &str, name: &str, sa: &str, netns: &File) -> String {
        self.send(add(uid, name, sa), &[netns.as_raw_fd()])
    }
}

fn add(uid: &str, name: &str, sa: &str) -> Payload {
    Payload::Add(AddWorkload {
        uid: uid.into(),
        workload_info: Some(WorkloadInfo {
            name: name.into(),
            namespace: "shop".into(),
            service_account: sa.into(),
        }),
    })
}

/// What istio-cni does before its Add: redirection inside the pod. Here weft's ruleset under
/// another table name stands in for it, so that weft's own table staying absent shows that
/// weft installed nothing.
fn agent_rules(lab: &Lab, pod: &str) {
    let rules = weft::capture::RuleParams::default()
        .ruleset()
        .replace("table inet weft", "table inet cni_agent");
    let mut child = Command::new("ip")
        .args(["netns", "exec", &lab.ns(pod), "nft", "-f", "-"])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(rules.as_bytes())
        .unwrap();
    assert!(child.wait().unwrap().success(), "stand-in rules installed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_handed_over_zds_are_served_released_and_kept_across_reconnects() {
    let logs = logs();
    let mut lab = Lab::up(&[]);
    let dir = tempfile::tempdir().unwrap();
    // Node a's pods come only from ZDS; b1 on node b is captured the usual way.
    let cfg = write_config(
        dir.path(),
        &format!(
            "workloads:\n- uid: b1\n  name: b1\n  namespace: shop\n  serviceAccount: server\n  workloadIps: [\"10.250.2.2\"]\n  protocol: HBONE\n  node: b\n  netns: {}\n",
            lab.netns_path("b1")
        ),
    );
    let socket = dir.path().join("ztunnel.sock");
    let agent = Agent::listen(&socket);
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let a = Node::start(
        settings("a"),
        Sources {
            config_file: Some(cfg.clone()),
            zds: Some(socket.clone()),
            ..Sources::default()
        },
        None,
        None,
    )
    .await
    .expect("node a starts");
    let _b = start_node("b", &cfg).await;
    let b1 = lab.serve("b1", 8080);
    let not_ready = http_get(a.readiness_addr, "/healthz/ready").await;
    assert!(
        not_ready.starts_with("HTTP/1.1 503") && not_ready.contains("zds snapshot"),
        "ready before the snapshot: {not_ready}"
    );

    let conn = agent.accept();
    let a1_ns = File::open(lab.netns_path("a1")).unwrap();
    let a2_ns = File::open(lab.netns_path("a2")).unwrap();
    agent_rules(&lab, "a1");
    agent_rules(&lab, "a2");
    assert_eq!(conn.add("uid-a1", "a1", "client", &a1_ns), "");
    assert_eq!(conn.add("uid-a2", "a2", "other", &a2_ns), "");
    assert_eq!(conn.send(Payload::SnapshotSent(SnapshotSent {}), &[]), "");
    eventually("ready after the snapshot", || a.readiness.is_ready()).await;
    assert!(
        lab.ruleset("a1").is_none(),
        "weft installs no rules under the CNI agent"
    );

    // Captured: over HBONE with the identity from the hand-off.
    assert_eq!(
        lab.send("a1", "10.250.2.2", 8080, "zds-1"),
        Ok("zds-1".into())
    );
    assert_eq!(b1.next_peer(), "10.250.1.2");
    eventually("a1's connection at b1", || {
        logs.inbound_to_from("10.250.2.2:8080", CLIENT) == 1
    })
    .await;

    // Bad requests: each refused with a reason, the connection and the pods unaffected.
    let regular = File::open("/proc/self/status").unwrap();
    let bad_fd = conn.add("uid-x", "x", "x", &regular);
    assert!(bad_fd.contains("setns"), "{bad_fd}");
    let no_fd = conn.send(add("uid-y", "y", "y"), &[]);
    assert!(no_fd.contains("0 descriptors"), "{no_fd}");
    // Field 9 is no payload weft knows.
    let unknown = conn.send_raw(&[0x4a, 0x00], &[]);
    assert!(unknown.contains("no payload"), "{unknown}");
    let full = WorkloadRequest {
        payload: Some(add("uid-z", "z", "z")),
    }
    .encode_to_vec();
    let truncated = conn.send_raw(&full[..full.len() / 2], &[]);
    assert!(truncated.contains("undecodable"), "{truncated}");
    let keep_late = conn.send(
        Payload::Keep(KeepWorkload {
            uid: "uid-a1".into(),
        }),
        &[],
    );
    assert!(keep_late.contains("after the snapshot"), "{keep_late}");
    let second_snapshot = conn.send(Payload::SnapshotSent(SnapshotSent {}), &[]);
    assert!(
        second_snapshot.contains("second SnapshotSent"),
        "{second_snapshot}"
    );
    assert_eq!(
        lab.send("a1", "10.250.2.2", 8080, "zds-2"),
        Ok("zds-2".into())
    );
    eventually("a1 still served", || {
        logs.inbound_to_from("10.250.2.2:8080", CLIENT) == 2
    })
    .await;

    // The node agent restarts while a1 holds a connection: weft reconnects; a Keep for a1 and
    // a snapshot without a2 release only a2, and a1's open connection carries on.
    let held = lab.send_in_background("a1", "10.250.2.2", 8080, "held", 3.0);
    tokio::time::sleep(Duration::from_millis(500)).await;
    drop(conn);
    let conn = agent.accept();
    assert_eq!(
        conn.send(
            Payload::Keep(KeepWorkload {
                uid: "uid-a1".into()
            }),
            &[]
        ),
        ""
    );
    // An Add of a pod weft already serves, in the same namespace, changes nothing.
    assert_eq!(conn.add("uid-a1", "a1", "client", &a1_ns), "");
    assert_eq!(conn.send(Payload::SnapshotSent(SnapshotSent {}), &[]), "");
    assert_eq!(held.join(), Ok("held".into()), "held connection survived");
    let dump = http_get(a.admin_addr, "/config_dump").await;
    assert!(
        dump.contains("zds:shop/a1") && !dump.contains("zds:shop/a2"),
        "{dump}"
    );
    assert_eq!(
        metric(&scrape(a.metrics_addr).await, "weft_captured_pods", &[]),
        Some(1.0)
    );

    // Del: a1 is released; with the agent's rules still in place its traffic has no
    // listener to go to.
    assert_eq!(
        conn.send(
            Payload::Del(DelWorkload {
                uid: "uid-a1".into()
            }),
            &[]
        ),
        ""
    );
    let dump = http_get(a.admin_addr, "/config_dump").await;
    assert!(!dump.contains("zds:shop/a1"), "{dump}");
    assert!(lab.send("a1", "10.250.2.2", 8080, "after-del").is_err());
    assert_eq!(
        logs.inbound_to_from("10.250.2.2:8080", CLIENT),
        3,
        "only the held connection was added"
    );
}
