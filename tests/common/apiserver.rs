//! A real etcd + kube-apiserver on loopback, from scripts/k8s-testenv.sh, for one test.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/k8s-testenv.sh")
}

/// kubectl as cached by `k8s-testenv.sh install`.
fn kubectl() -> PathBuf {
    let out = Command::new("bash")
        .arg(script())
        .arg("paths")
        .output()
        .expect("k8s-testenv.sh paths");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("kubectl=").map(PathBuf::from))
        .expect("kubectl path")
}

pub struct ApiServer {
    dir: tempfile::TempDir,
    /// A kube-apiserver started by [`ApiServer::restart`], reaped after `stop` killed it.
    restarted: std::sync::Mutex<Option<std::process::Child>>,
}

impl ApiServer {
    /// Starts etcd and kube-apiserver (the binaries must have been built by
    /// `scripts/k8s-testenv.sh install`, which scripts/test.sh runs).
    pub fn start() -> ApiServer {
        let dir = tempfile::tempdir().expect("tempdir");
        let st = Command::new("bash")
            .arg(script())
            .arg("start")
            .arg(dir.path())
            .stdout(Stdio::null())
            .status()
            .expect("run k8s-testenv.sh");
        assert!(
            st.success(),
            "k8s-testenv.sh start failed: run `scripts/k8s-testenv.sh install` first"
        );
        ApiServer {
            dir,
            restarted: Default::default(),
        }
    }

    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.path().join("kubeconfig")
    }

    /// The kubeconfig, acting as `user` (impersonation), so that what `user` may do is what
    /// RBAC grants it, not what the admin may do.
    pub fn kubeconfig_as(&self, user: &str) -> PathBuf {
        let admin = std::fs::read_to_string(self.kubeconfig()).expect("kubeconfig");
        let as_user = admin.replacen("    token: ", &format!("    as: {user}\n    token: "), 1);
        assert_ne!(admin, as_user, "kubeconfig has a token line");
        let path = self.dir.path().join("kubeconfig-as");
        std::fs::write(&path, as_user).expect("write kubeconfig");
        path
    }

    /// `kubectl apply -f` the given manifests of the repository, for real.
    pub fn apply(&self, manifests: &[&str]) {
        let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        let mut cmd = Command::new(kubectl());
        cmd.env("KUBECONFIG", self.kubeconfig()).arg("apply");
        for m in manifests {
            cmd.arg("-f").arg(repo.join(m));
        }
        let out = cmd.output().expect("run kubectl");
        assert!(
            out.status.success(),
            "kubectl apply {manifests:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn pid_file(&self) -> PathBuf {
        self.dir.path().join("kube-apiserver.pid")
    }

    /// Kills kube-apiserver (etcd keeps the data), waits `down`, starts it again with the same
    /// command line and waits until it answers. Returns when it is back.
    pub fn restart(&self, down: Duration) {
        let pid: i32 = std::fs::read_to_string(self.pid_file())
            .expect("pid file")
            .trim()
            .parse()
            .expect("pid");
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).expect("cmdline");
        let argv: Vec<String> = cmdline
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        Command::new("kill")
            .arg(pid.to_string())
            .status()
            .expect("kill");
        let gone = Instant::now();
        while Path::new(&format!("/proc/{pid}")).exists()
            && gone.elapsed() < Duration::from_secs(20)
        {
            std::thread::sleep(Duration::from_millis(100));
        }
        std::thread::sleep(down);
        let log = std::fs::File::create(self.dir.path().join("kube-apiserver.restarted.log"))
            .expect("log file");
        let child = Command::new(&argv[0])
            .args(&argv[1..])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("restart kube-apiserver");
        std::fs::write(self.pid_file(), child.id().to_string()).expect("pid file");
        *self.restarted.lock().unwrap_or_else(|p| p.into_inner()) = Some(child);
        let started = Instant::now();
        loop {
            let ok = Command::new("bash")
                .arg(script())
                .arg("status")
                .arg(self.dir.path())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if ok {
                return;
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "kube-apiserver did not come back"
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(script())
            .arg("stop")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        if let Some(mut child) = self.restarted.lock().ok().and_then(|mut c| c.take()) {
            let _ = child.wait();
        }
    }
}
