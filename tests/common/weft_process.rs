//! weft as a real process (the `weft` binary the tests build), for tests where what the
//! process does on exit, or in which network namespace it runs, is the point.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::ca_dir;

/// One weft process for a lab node.
pub struct Weft {
    child: Child,
    pub readiness: SocketAddr,
    pub metrics: SocketAddr,
    drain: Duration,
    /// Lines of its log that say how the drain went.
    drained: mpsc::Receiver<String>,
}

impl Weft {
    /// Starts weft for `node` with `config`, in the network namespace `netns` (a name under
    /// /run/netns) or in the test's own; returns once it has started.
    pub fn start(node: &str, config: &Path, netns: Option<&str>, drain: Duration) -> Weft {
        let mut cmd = match netns {
            Some(ns) => {
                // `ip netns exec` execs weft in place: the child's PID is weft's.
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, env!("CARGO_BIN_EXE_weft")]);
                c
            }
            None => Command::new(env!("CARGO_BIN_EXE_weft")),
        };
        let mut child = cmd
            .arg("run")
            .arg("--config")
            .arg(config)
            .arg("--ca-dir")
            .arg(ca_dir())
            .args(["--node-name", node, "--node-bind", "127.0.0.1"])
            .args([
                "--admin-port",
                "0",
                "--metrics-port",
                "0",
                "--readiness-port",
                "0",
            ])
            .args(["--drain-seconds", &drain.as_secs().to_string()])
            .env("RUST_LOG", "info,access=warn")
            .stderr(Stdio::piped())
            .spawn()
            .expect("start weft");
        let err = child.stderr.take().expect("stderr");
        let (started_tx, started_rx) = mpsc::channel();
        let (drained_tx, drained) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                if line.contains("weft started") {
                    let _ = started_tx.send(line);
                } else if line.contains("drain finished") {
                    let _ = drained_tx.send(line);
                }
            }
        });
        let line = started_rx
            .recv_timeout(Duration::from_secs(60))
            .expect("weft started");
        let addr = |key: &str| -> SocketAddr {
            let rest = line.split(&format!("{key}=")).nth(1).expect(key);
            rest.split_whitespace().next().unwrap().parse().expect(key)
        };
        Weft {
            readiness: addr("readiness_addr"),
            metrics: addr("metrics_addr"),
            drain,
            child,
            drained,
        }
    }

    /// SIGTERM, as the kubelet sends it.
    pub fn terminate(&self) {
        let st = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(st.success(), "SIGTERM delivered");
    }

    /// Waits for the process to exit; its drain report and whether it exited cleanly.
    pub fn wait(mut self) -> (String, bool) {
        let until = Instant::now() + self.drain + Duration::from_secs(10);
        loop {
            if let Some(st) = self.child.try_wait().expect("wait") {
                let report = self.drained.try_recv().unwrap_or_default();
                return (report, st.success());
            }
            assert!(Instant::now() < until, "weft did not exit after its drain");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Weft {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
