//! A real etcd + kube-apiserver on loopback, from scripts/k8s-testenv.sh, for one test.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

pub(crate) fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/k8s-testenv.sh")
}

/// A binary as cached by `k8s-testenv.sh install` (`name` as in its `paths` output: etcd,
/// kube-apiserver, kubectl, pilot-discovery, istioctl).
pub(crate) fn cached_binary(name: &str) -> PathBuf {
    let out = Command::new("bash")
        .arg(script())
        .arg("paths")
        .output()
        .expect("k8s-testenv.sh paths");
    let prefix = format!("{name}=");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix(prefix.as_str()).map(PathBuf::from))
        .unwrap_or_else(|| panic!("no {name} in `k8s-testenv.sh paths`"))
}

fn kubectl() -> PathBuf {
    cached_binary("kubectl")
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

    /// The environment's directory (kubeconfig, env, pid files, logs; istiod's files too).
    pub fn dir(&self) -> &Path {
        self.dir.path()
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

    /// Sets a pod's status as a kubelet would: Running, Ready, with its IP (and the node's
    /// address as hostIP).
    pub fn set_pod_running(&self, namespace: &str, pod: &str, ip: &str) {
        let status = format!(
            r#"{{"status":{{"phase":"Running","podIP":"{ip}","podIPs":[{{"ip":"{ip}"}}],"hostIP":"10.250.0.1","conditions":[{{"type":"Ready","status":"True"}}]}}}}"#
        );
        self.kubectl(&[
            "patch",
            "pod",
            pod,
            "-n",
            namespace,
            "--subresource=status",
            "--type=merge",
            "-p",
            &status,
        ]);
    }

    /// Runs kubectl as the admin; returns its stdout. Panics with its stderr if it fails.
    pub fn kubectl(&self, args: &[&str]) -> String {
        self.run_kubectl(args, None)
    }

    /// `kubectl apply -f -` of the given YAML (one or more documents), as the admin.
    pub fn apply_yaml(&self, yaml: &str) {
        self.run_kubectl(&["apply", "-f", "-"], Some(yaml));
    }

    /// A service-account token from the TokenRequest API (`kubectl create token`) for
    /// `namespace/service_account` with `audience`, bound to the Pod `bound_pod` of that
    /// namespace if given (the Pod must exist; the token then carries its name and UID, which
    /// istiod's CA needs to authorize a node proxy's impersonation).
    pub fn token(
        &self,
        namespace: &str,
        service_account: &str,
        audience: &str,
        bound_pod: Option<&str>,
    ) -> String {
        let mut args = vec![
            "create",
            "token",
            service_account,
            "-n",
            namespace,
            "--audience",
            audience,
            "--duration",
            "1h",
        ];
        if let Some(pod) = bound_pod {
            args.extend(["--bound-object-kind", "Pod", "--bound-object-name", pod]);
        }
        let token = self.kubectl(&args).trim().to_string();
        assert!(
            token.split('.').count() == 3,
            "TokenRequest gave no JWT: {token:?}"
        );
        token
    }

    /// kubectl with `input` on its standard input (e.g. `create -o json -f -`); returns stdout.
    pub fn kubectl_stdin(&self, args: &[&str], input: &str) -> String {
        self.run_kubectl(args, Some(input))
    }

    fn run_kubectl(&self, args: &[&str], input: Option<&str>) -> String {
        use std::io::Write;
        let mut child = Command::new(kubectl())
            .env("KUBECONFIG", self.kubeconfig())
            .arg("--request-timeout=30s")
            .args(args)
            .stdin(if input.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run kubectl");
        if let Some(text) = input {
            let mut stdin = child.stdin.take().expect("kubectl stdin");
            stdin
                .write_all(text.as_bytes())
                .expect("write kubectl stdin");
        }
        let out = child.wait_with_output().expect("kubectl output");
        assert!(
            out.status.success(),
            "kubectl {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
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
