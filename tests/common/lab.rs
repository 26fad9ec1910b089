//! The network-namespace lab of DESIGN.md §8, built by scripts/lab.sh, with real processes
//! (tests/fixtures/tcp_tool.py) as the pods' apps.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::time::Duration;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub struct Lab {
    pub prefix: String,
    children: Vec<Child>,
}

/// An app server in a pod; `peers` yields the source IP of every connection it accepts.
pub struct AppServer {
    pub peers: mpsc::Receiver<String>,
}

impl AppServer {
    /// Forgets the peers seen so far (waits until none has arrived for a moment).
    pub fn drain(&self) {
        while self.peers.recv_timeout(Duration::from_millis(300)).is_ok() {}
    }

    pub fn next_peer(&self) -> String {
        self.peers
            .recv_timeout(Duration::from_secs(10))
            .expect("server saw a connection")
    }
}

impl Lab {
    pub fn up(v4_only: &[&str]) -> Lab {
        static N: AtomicU32 = AtomicU32::new(0);
        let prefix = format!(
            "wt{}x{}",
            std::process::id() % 100000,
            N.fetch_add(1, Ordering::Relaxed)
        );
        let mut args = vec!["up".to_string(), prefix.clone()];
        if !v4_only.is_empty() {
            args.push("--v4-only".into());
            args.extend(v4_only.iter().map(|s| s.to_string()));
        }
        let st = Command::new("bash")
            .arg(repo().join("scripts/lab.sh"))
            .args(&args)
            .status()
            .expect("run lab.sh");
        assert!(st.success(), "lab.sh up failed");
        Lab {
            prefix,
            children: Vec::new(),
        }
    }

    pub fn ns(&self, pod: &str) -> String {
        format!("{}-{pod}", self.prefix)
    }

    pub fn netns_path(&self, pod: &str) -> String {
        format!("/run/netns/{}", self.ns(pod))
    }

    /// Keeps a process (a pod's "pause container") in each pod's netns, so that the pod's
    /// namespace appears under /proc/*/ns/net as on a real node.
    pub fn hold(&mut self, pods: &[&str]) {
        for pod in pods {
            let child = Command::new("ip")
                .args(["netns", "exec", &self.ns(pod), "sleep", "900"])
                .spawn()
                .expect("start pause process");
            self.children.push(child);
        }
    }

    pub fn serve(&mut self, pod: &str, port: u16) -> AppServer {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.ns(pod), "python3", "-u"])
            .arg(repo().join("tests/fixtures/tcp_tool.py"))
            .args(["serve", &port.to_string()])
            .stdout(Stdio::piped())
            .spawn()
            .expect("start app server");
        let out = child.stdout.take().expect("stdout");
        self.children.push(child);
        let (ready_tx, ready_rx) = mpsc::channel();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if line == "ready" {
                    let _ = ready_tx.send(());
                } else if let Some(ip) = line.strip_prefix("peer ") {
                    let _ = tx.send(ip.to_string());
                }
            }
        });
        ready_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("app server ready");
        AppServer { peers: rx }
    }

    /// Runs the client app in `pod`: Ok(reply) or Err(what went wrong).
    pub fn send(&self, pod: &str, host: &str, port: u16, msg: &str) -> Result<String, String> {
        self.send_holding(pod, host, port, msg, 0.0)
    }

    /// Like send, but keeps the connection open `hold` seconds before half-closing.
    pub fn send_holding(
        &self,
        pod: &str,
        host: &str,
        port: u16,
        msg: &str,
        hold: f64,
    ) -> Result<String, String> {
        send_from(&self.ns(pod), host, port, msg, hold)
    }

    /// [`Lab::send_holding`] on its own thread, for a connection that stays open while the
    /// test does something else. The thread is joined even when the test fails first, so the
    /// lab is always torn down after it.
    pub fn send_in_background(
        &self,
        pod: &str,
        host: &str,
        port: u16,
        msg: &str,
        hold: f64,
    ) -> Held {
        let (ns, host, msg) = (self.ns(pod), host.to_string(), msg.to_string());
        Held(Some(std::thread::spawn(move || {
            send_from(&ns, &host, port, &msg, hold)
        })))
    }

    /// Opens `n` connections one after another from `pod` to `addr`, each sending 16 bytes
    /// and reading their echo, from a thread inside the pod's namespace (no process per
    /// connection); returns the mean time per connection. For figures a test prints, never
    /// for asserts: it times the machine.
    pub async fn time_connections(&self, pod: &str, addr: SocketAddr, n: u32) -> Duration {
        let netns = weft::capture::Netns::open(self.netns_path(pod)).expect("pod netns");
        let run = move || {
            netns.run(move || {
                let start = std::time::Instant::now();
                for i in 0..n {
                    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))
                        .unwrap_or_else(|e| panic!("connection {i} to {addr}: {e}"));
                    s.set_read_timeout(Some(Duration::from_secs(5)))
                        .expect("timeout");
                    let msg = *b"0123456789abcdef";
                    s.write_all(&msg).expect("send");
                    let mut got = [0u8; 16];
                    s.read_exact(&mut got).expect("echo");
                    assert_eq!(got, msg, "connection {i} echoed");
                }
                start.elapsed() / n.max(1)
            })
        };
        tokio::task::spawn_blocking(run)
            .await
            .expect("timing thread")
            .expect("netns worker")
    }

    /// `nft list table inet weft` in a pod, or None when absent.
    pub fn ruleset(&self, pod: &str) -> Option<String> {
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.ns(pod),
                "nft",
                "list",
                "table",
                "inet",
                "weft",
            ])
            .output()
            .expect("nft");
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).to_string())
    }

    pub fn ip_rules(&self, pod: &str) -> String {
        let out = Command::new("ip")
            .args(["-n", &self.ns(pod), "rule", "show"])
            .output()
            .expect("ip rule");
        String::from_utf8_lossy(&out.stdout).to_string()
    }

    /// The config: a1, a2 (node a) and b1 (node b) captured in their namespaces; b2 outside the
    /// mesh. `extra` is appended (policies).
    pub fn config(&self, extra: &str) -> String {
        let captured = |name: &str, sa: &str, ip: &str, node: &str| {
            format!(
                "- uid: {name}\n  name: {name}\n  namespace: shop\n  serviceAccount: {sa}\n  workloadIps: [\"{ip}\"]\n  protocol: HBONE\n  node: {node}\n  netns: {}\n  labels: {{app: {name}}}\n",
                self.netns_path(name)
            )
        };
        format!(
            "workloads:\n{}{}{}- uid: b2\n  name: b2\n  namespace: legacy\n  workloadIps: [\"10.250.2.3\"]\n  protocol: TCP\n  node: b\n{extra}",
            captured("a1", "client", "10.250.1.2", "a"),
            captured("a2", "other", "10.250.1.3", "a"),
            captured("b1", "server", "10.250.2.2", "b"),
        )
    }
}

/// A client connection running on its own thread ([`Lab::send_in_background`]).
pub struct Held(Option<std::thread::JoinHandle<Result<String, String>>>);

impl Held {
    /// The reply, as [`Lab::send`] gives it.
    pub fn join(mut self) -> Result<String, String> {
        let h = self.0.take().expect("joined once");
        h.join().expect("the client thread did not panic")
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if let Some(h) = self.0.take() {
            let _ = h.join();
        }
    }
}

/// One client connection from inside netns `ns` (tests/fixtures/tcp_tool.py).
fn send_from(ns: &str, host: &str, port: u16, msg: &str, hold: f64) -> Result<String, String> {
    let out = Command::new("timeout")
        .args(["30", "ip", "netns", "exec", ns, "python3"])
        .arg(repo().join("tests/fixtures/tcp_tool.py"))
        .args(["send", host, &port.to_string(), msg, &hold.to_string()])
        .output()
        .expect("run client");
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    match text.strip_prefix("reply ") {
        Some(r) if out.status.success() => Ok(r.to_string()),
        _ => Err(text),
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = Command::new("bash")
            .arg(repo().join("scripts/lab.sh"))
            .args(["down", &self.prefix])
            .status();
    }
}
