//! A real istiod (`pilot-discovery`, built by scripts/k8s-testenv.sh from `istio.io/istio`)
//! against an [`ApiServer`], out of cluster on loopback, with its self-signed CA and ambient
//! mode on.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use super::apiserver::{cached_binary, script, ApiServer};

/// `istioctl` as cached by `k8s-testenv.sh install`.
pub fn istioctl() -> PathBuf {
    cached_binary("istioctl")
}

pub struct Istiod {
    dir: PathBuf,
    env: HashMap<String, String>,
}

impl Istiod {
    /// Applies Istio's CRDs and mesh config to `api` and starts istiod; returns once istiod is
    /// ready and the mesh root certificate is published.
    pub fn start(api: &ApiServer) -> Istiod {
        let dir = api.dir().to_owned();
        let env = run_istiod(&dir);
        Istiod { dir, env }
    }

    fn get(&self, key: &str) -> &str {
        self.env
            .get(key)
            .unwrap_or_else(|| panic!("{key} missing from istiod.env: {:?}", self.env))
    }

    fn addr(&self, key: &str) -> SocketAddr {
        self.get(key)
            .parse()
            .unwrap_or_else(|e| panic!("{key}: {e}"))
    }

    /// The TLS port that serves xDS and the CA (istiod's 15012).
    pub fn xds_addr(&self) -> SocketAddr {
        self.addr("WEFT_ISTIOD_XDS_ADDR")
    }

    /// Plaintext xDS (istiod's 15010).
    pub fn plaintext_addr(&self) -> SocketAddr {
        self.addr("WEFT_ISTIOD_PLAINTEXT_ADDR")
    }

    /// HTTP: `/ready`, `/debug/...` (istiod's 8080).
    pub fn debug_addr(&self) -> SocketAddr {
        self.addr("WEFT_ISTIOD_DEBUG_ADDR")
    }

    /// The mesh root certificate (PEM), which signs istiod's serving certificate and every
    /// workload certificate.
    pub fn root_cert(&self) -> PathBuf {
        PathBuf::from(self.get("WEFT_ISTIOD_ROOT_CERT"))
    }

    /// The DNS name in istiod's serving certificate that a client verifies.
    pub fn san(&self) -> String {
        self.get("WEFT_ISTIOD_SAN").to_string()
    }

    /// istiod's log file (all starts appended).
    pub fn log(&self) -> PathBuf {
        PathBuf::from(self.get("WEFT_ISTIOD_LOG"))
    }

    pub fn pid(&self) -> u32 {
        self.get("WEFT_ISTIOD_PID").parse().expect("istiod pid")
    }

    /// Stops istiod, waits `down`, and starts it again on the same ports with the same CA.
    pub fn restart(&mut self, down: Duration) {
        self.stop();
        std::thread::sleep(down);
        self.start_again();
    }

    /// Stops istiod (the API server and the CA secret in it stay).
    pub fn stop(&mut self) {
        stop_istiod(&self.dir);
    }

    /// Starts istiod again after [`Istiod::stop`], on the same ports with the same CA.
    pub fn start_again(&mut self) {
        self.env = run_istiod(&self.dir);
    }
}

fn run_istiod(dir: &Path) -> HashMap<String, String> {
    let st = Command::new("bash")
        .arg(script())
        .arg("istiod")
        .arg(dir)
        .stdout(Stdio::null())
        .status()
        .expect("run k8s-testenv.sh istiod");
    assert!(
        st.success(),
        "k8s-testenv.sh istiod failed (see above; binaries come from `scripts/k8s-testenv.sh install`)"
    );
    let text = std::fs::read_to_string(dir.join("istiod.env")).expect("istiod.env");
    text.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn stop_istiod(dir: &Path) {
    let _ = Command::new("bash")
        .arg(script())
        .arg("istiod-stop")
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

impl Drop for Istiod {
    fn drop(&mut self) {
        if self.dir.exists() {
            stop_istiod(&self.dir);
        }
    }
}
