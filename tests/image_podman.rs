//! weft's container image, run as a node would run it, and the two ways to install it.
//!
//! * `the_image_runs_as_the_daemonset_runs_it`: the image of scripts/image-build.sh (built
//!   here from this build's binaries and the cached Debian root filesystem, or the one an
//!   `image.env` in `WEFT_IMAGE_ENV` names, e.g. the release image of scripts/image-smoke.sh)
//!   is loaded into podman (crun) and started as daemonset/daemonset.yaml starts it: host PID
//!   namespace, its capabilities and no others, its user, read-only root, no privilege
//!   escalation, its tmpfs and netns mounts; the lab's node namespaces as the network. Two
//!   containers are nodes a and b of the lab; they capture the lab's pods (nft from the image)
//!   and carry a1 → b1 over HBONE. The same run with an image built without the nftables
//!   package must fail, naming nft: the test notices a missing run-time tool. Also checked:
//!   the image's entrypoint, user, working directory, labels and OCI annotations (version,
//!   source, revision, which `weft version` in the image prints), and the init container
//!   `install-cni` chaining weft-cni from the image.
//! * `readme_image_install_steps_apply_weft_from_your_registry`: README.md's standalone
//!   install block (a kustomize overlay with `images:`), run as written against a real API
//!   server.
//! * `readme_istio_install_steps_put_weft_into_the_ztunnel_chart`: README.md's Istio block
//!   (Istio's charts from the istio.io/istio module, helm built from its Go module), run as
//!   written against a real API server: the ztunnel DaemonSet runs weft's image with the
//!   chart's environment and volumes, and everything validates server-side (strict).
//!
//! Needs root, podman, crun, debootstrap, umoci, skopeo (scripts/image-build.sh and
//! scripts/image-smoke.sh install them; this test installs podman when it is missing).

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::apiserver::{cached_binary, ApiServer};
use common::lab::Lab;
use serde_json::{json, Value};

const CLIENT: &str = "spiffe://cluster.local/ns/shop/sa/client";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn cache() -> PathBuf {
    std::env::var_os("WEFT_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var("HOME").unwrap_or("/root".into())).join(".cache/weft")
        })
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

// ---------------------------------------------------------------------------------------------
// podman

/// podman, in a mount namespace of its own. crun refuses to start containers on a hybrid
/// cgroup host whose cgroup2 mount (/sys/fs/cgroup/unified) has controllers, as this machine
/// has; in the private namespace that mount is taken away, and nothing changes outside it.
fn podman(args: &[&str]) -> Command {
    let mut c = Command::new("unshare");
    c.args([
        "--mount",
        "--propagation",
        "private",
        "--",
        "sh",
        "-c",
        "if grep -q . /sys/fs/cgroup/unified/cgroup.controllers 2>/dev/null; then umount /sys/fs/cgroup/unified; fi; exec podman \"$@\"",
        "podman",
    ]);
    c.args(args);
    c
}

fn ensure_podman() {
    if Command::new("podman")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
        && Path::new("/usr/bin/crun").exists()
    {
        return;
    }
    run(Command::new("apt-get")
        .args([
            "-q",
            "-o",
            "DPkg::Lock::Timeout=300",
            "install",
            "-y",
            "--no-install-recommends",
        ])
        .args(["podman", "crun", "conmon", "catatonit"])
        .env("DEBIAN_FRONTEND", "noninteractive"));
}

/// The resource limits the containers get: podman's defaults raise RLIMIT_NOFILE and
/// RLIMIT_NPROC, which needs CAP_SYS_RESOURCE, which this machine's root does not have.
fn ulimits() -> Vec<String> {
    vec![
        "--ulimit=nofile=16384:16384".into(),
        "--ulimit=nproc=16384:16384".into(),
    ]
}

/// An image of scripts/image-build.sh, loaded into podman.
struct Image {
    env: BTreeMap<String, String>,
    /// podman's image id: the config's digest, without "sha256:".
    id: String,
    /// Built by this test: removed from podman's storage when done.
    ours: bool,
}

impl Drop for Image {
    fn drop(&mut self) {
        if self.ours {
            let _ = podman(&["rmi", "-f", &self.id]).output();
        }
    }
}

impl Image {
    fn get(&self, key: &str) -> &str {
        self.env
            .get(key)
            .unwrap_or_else(|| panic!("no {key} in image.env"))
    }

    fn load(env_file: &Path) -> Image {
        let env: BTreeMap<String, String> = std::fs::read_to_string(env_file)
            .unwrap_or_else(|e| panic!("{}: {e}", env_file.display()))
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let mut img = Image {
            env,
            id: String::new(),
            ours: false,
        };
        let archive = img.get("IMAGE_DOCKER_ARCHIVE").to_string();
        run(&mut podman(&["load", "-q", "-i", &archive]));
        img.id = img
            .get("IMAGE_CONFIG_DIGEST")
            .trim_start_matches("sha256:")
            .to_string();
        img
    }

    /// Builds with scripts/image-build.sh from the binaries next to this test's weft.
    fn build(out: &Path, extra: &[&str]) -> Image {
        let bins = PathBuf::from(env!("CARGO_BIN_EXE_weft"));
        let bins = bins.parent().unwrap().to_str().unwrap().to_string();
        Self::build_from(&bins, out, extra)
    }

    fn build_from(bins: &str, out: &Path, extra: &[&str]) -> Image {
        let t0 = Instant::now();
        run(Command::new("bash")
            .arg(repo().join("scripts/image-build.sh"))
            .args(["--binaries", bins, "--allow-drift", "--fast", "--out"])
            .arg(out)
            .args(extra)
            .stdout(Stdio::null()));
        eprintln!("image built in {:.0?}: {}", t0.elapsed(), out.display());
        let mut img = Image::load(&out.join("image.env"));
        img.ours = true;
        img
    }

    fn inspect(&self) -> Value {
        let text = run(&mut podman(&["image", "inspect", &self.id]));
        let v: Value = serde_json::from_str(&text).expect("podman image inspect");
        v[0].clone()
    }
}

/// A running container: `podman run` (attached, so the test owns it as a child and reads its
/// output); stopped with SIGTERM, which podman hands to weft.
struct Container {
    name: String,
    child: Option<Child>,
    log: Arc<Mutex<String>>,
}

impl Container {
    fn start(name: &str, args: &[String]) -> Container {
        let mut all = vec![
            "run".to_string(),
            "--rm".into(),
            "--pull=never".into(),
            "--sig-proxy=true".into(),
            format!("--name={name}"),
        ];
        all.extend(args.iter().cloned());
        let argv: Vec<&str> = all.iter().map(String::as_str).collect();
        eprintln!("podman {}", argv.join(" "));
        let mut child = podman(&argv)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("podman run");
        let log = Arc::new(Mutex::new(String::new()));
        for pipe in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let log = log.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    let mut l = log.lock().unwrap();
                    l.push_str(&line);
                    l.push('\n');
                }
            });
        }
        Container {
            name: name.to_string(),
            child: Some(child),
            log,
        }
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.as_mut()?.try_wait().ok().flatten()
    }

    /// The pid of the container's process (weft) in the host's PID namespace.
    fn pid(&self) -> u32 {
        let out = run(&mut podman(&[
            "inspect",
            "--format",
            "{{.State.Pid}}",
            &self.name,
        ]));
        out.trim().parse().expect("pid")
    }

    fn stop(&mut self) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        // SAFETY: a plain kill(2) of our own child's pid, which it still is (not yet waited for).
        unsafe {
            libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
        }
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(30) {
            if let Ok(Some(st)) = child.try_wait() {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = child.kill();
        let _ = child.wait();
        let _ = podman(&["rm", "-f", "-t", "0", &self.name]).output();
        None
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        self.stop();
    }
}

// ---------------------------------------------------------------------------------------------
// The DaemonSet, as the container runtime would be told to run it

fn daemonset_pod() -> Value {
    let text = std::fs::read_to_string(repo().join("daemonset/daemonset.yaml")).unwrap();
    let ds: Value = serde_saphyr::from_str(&text).expect("daemonset.yaml");
    ds["spec"]["template"]["spec"].clone()
}

fn named<'a>(list: &'a Value, name: &str) -> &'a Value {
    list.as_array()
        .into_iter()
        .flatten()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no {name} in {list}"))
}

/// podman flags for a container of the DaemonSet's pod: its securityContext, hostPID, and
/// the emptyDir/netns mounts weft uses here (the CNI directories and weft-cni's socket are
/// not used by a weft without --cni-socket).
fn security_flags(pod: &Value, container: &Value) -> Vec<String> {
    let sc = &container["securityContext"];
    let mut f = vec![];
    if pod["hostPID"] == true {
        f.push("--pid=host".into());
    }
    assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]), "{sc}");
    f.push("--cap-drop=all".into());
    for cap in sc["capabilities"]["add"].as_array().into_iter().flatten() {
        f.push(format!("--cap-add={}", cap.as_str().unwrap()));
    }
    assert_eq!(sc["privileged"], false);
    if sc["readOnlyRootFilesystem"] == true {
        f.push("--read-only".into());
        // podman would add writable /run, /tmp and /var/tmp; the pod has only its volumes.
        f.push("--read-only-tmpfs=false".into());
    }
    if sc["allowPrivilegeEscalation"] == false {
        f.push("--security-opt=no-new-privileges".into());
    }
    // seccompProfile RuntimeDefault: podman's default profile.
    assert_eq!(sc["seccompProfile"]["type"], "RuntimeDefault");
    let user = sc["runAsUser"].as_u64().expect("runAsUser");
    let group = sc["runAsGroup"].as_u64().unwrap_or(user);
    f.push(format!("--user={user}:{group}"));
    for m in container["volumeMounts"].as_array().into_iter().flatten() {
        let v = named(&pod["volumes"], m["name"].as_str().unwrap());
        let path = m["mountPath"].as_str().unwrap();
        if v["emptyDir"]["medium"] == "Memory" {
            let size = v["emptyDir"]["sizeLimit"]
                .as_str()
                .unwrap_or("16Mi")
                .replace("Mi", "m");
            f.push(format!("--tmpfs={path}:rw,size={size}"));
        } else if v["hostPath"]["path"] == "/var/run/netns" {
            // HostToContainer: the node's namespaces, also those made later.
            f.push(format!("--volume=/run/netns:{path}:ro,rslave"));
        }
    }
    f.extend(ulimits());
    f
}

/// CapEff/CapBnd as a mask of the named capabilities.
fn cap_mask(names: &[&str]) -> u64 {
    let bit = |n: &str| match n {
        "NET_ADMIN" => 12,
        "NET_RAW" => 13,
        "SYS_ADMIN" => 21,
        "SYS_PTRACE" => 19,
        "NET_BIND_SERVICE" => 10,
        other => panic!("capability {other} not in this table"),
    };
    names.iter().fold(0, |m, n| m | 1 << bit(n))
}

fn proc_status(pid: u32, key: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| {
            l.strip_prefix(&format!("{key}:"))
                .map(|v| v.trim().to_string())
        })
        .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/status"))
}

/// An HTTP GET to 127.0.0.1:port inside network namespace `ns` (a lab node, where a
/// container's weft listens).
fn http_in(ns: &str, port: u16, path: &str) -> Option<String> {
    let file = std::fs::File::open(format!("/run/netns/{ns}")).ok()?;
    let path = path.to_string();
    std::thread::spawn(move || {
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).ok()?;
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        Some(out)
    })
    .join()
    .ok()
    .flatten()
}

fn metric(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    common::metric(text, name, labels)
}

// ---------------------------------------------------------------------------------------------
// The lab, with weft in containers

/// What one run of the image in the lab showed.
struct Carried {
    b_metrics: String,
    b_log: String,
}

/// Nodes a and b of a fresh lab run `image`'s weft as the DaemonSet would; a1 sends to b1.
/// Err says what did not work (a container that never got ready, capture missing, traffic not
/// over HBONE), with the containers' logs.
fn carry_a1_to_b1(
    image: &Image,
    checks: &mut dyn FnMut(&Container, &Container),
) -> Result<Carried, String> {
    let pod = daemonset_pod();
    let weft = named(&pod["containers"], "weft");
    let mut lab = Lab::up(&["a1"]);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("weft.yaml"), lab.config("")).unwrap();
    let ca = common::ca_dir();
    let start = |node: &str| {
        let mut args = security_flags(&pod, weft);
        args.push(format!(
            "--network=ns:/run/netns/{}",
            lab.ns(&format!("n{node}"))
        ));
        args.push(format!(
            "--volume={}:/etc/weft-test:ro",
            dir.path().display()
        ));
        args.push(format!("--volume={}:/etc/weft/ca:ro", ca.display()));
        args.push("--env=RUST_LOG=info".into());
        args.push("--env=WEFT_DRAIN_SECONDS=1".into());
        args.push(image.id.clone());
        args.extend(
            [
                "run",
                "--config",
                "/etc/weft-test/weft.yaml",
                "--ca-dir",
                "/etc/weft/ca",
                "--node-name",
                node,
            ]
            .map(String::from),
        );
        Container::start(&format!("{}-{node}", lab.prefix), &args)
    };
    let mut a = start("a");
    let mut b = start("b");
    let logs = |a: &Container, b: &Container| {
        format!("--- node a:\n{}\n--- node b:\n{}", a.log(), b.log())
    };

    // Ready: configuration loaded, every captured pod's listeners and rules in place.
    let t0 = Instant::now();
    let mut ready = [false, false];
    let mut failed_since = None;
    while t0.elapsed() < Duration::from_secs(60) && !(ready[0] && ready[1]) {
        for (i, n) in ["na", "nb"].iter().enumerate() {
            ready[i] = http_in(&lab.ns(n), 15021, "/healthz/ready")
                .is_some_and(|r| r.starts_with("HTTP/1.1 200"));
        }
        if a.exited().is_some() || b.exited().is_some() {
            break;
        }
        // A capture that failed and keeps failing (weft retries it) will not get ready.
        let failing = [&a, &b]
            .iter()
            .any(|c| c.log().contains("could not capture workload"));
        match (failing, failed_since) {
            (true, None) => failed_since = Some(Instant::now()),
            (true, Some(t)) if t.elapsed() > Duration::from_secs(5) => break,
            _ => {}
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    if !(ready[0] && ready[1]) {
        let why = http_in(&lab.ns("na"), 15021, "/healthz/ready").unwrap_or_default();
        return Err(format!(
            "not ready after {:.0?} (a: {why:?}):\n{}",
            t0.elapsed(),
            logs(&a, &b)
        ));
    }
    checks(&a, &b);
    for p in ["a1", "b1"] {
        if lab.ruleset(p).is_none() {
            return Err(format!("no capture rules in {p}:\n{}", logs(&a, &b)));
        }
    }
    let b1 = lab.serve("b1", 8080);
    let reply = lab.send("a1", "10.250.2.2", 8080, "hello-b1");
    if reply != Ok("hello-b1".into()) {
        return Err(format!("a1 → b1: {reply:?}\n{}", logs(&a, &b)));
    }
    let peer = b1.next_peer();
    if peer != "10.250.1.2" {
        return Err(format!("b1 saw {peer}, not a1's own address"));
    }
    let labels = [
        "reporter=\"destination\"",
        "destination_workload=\"b1\"",
        &format!("source_principal=\"{CLIENT}\""),
        "connection_security_policy=\"mutual_tls\"",
    ];
    let t0 = Instant::now();
    let mut b_metrics = String::new();
    while t0.elapsed() < Duration::from_secs(10) {
        b_metrics = http_in(&lab.ns("nb"), 15020, "/metrics").unwrap_or_default();
        if metric(&b_metrics, "istio_tcp_connections_closed_total", &labels) == Some(1.0) {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    if metric(&b_metrics, "istio_tcp_connections_opened_total", &labels) != Some(1.0) {
        return Err(format!(
            "b did not receive a1's connection over HBONE:\n{b_metrics}\n{}",
            logs(&a, &b)
        ));
    }
    let a_metrics = http_in(&lab.ns("na"), 15020, "/metrics").unwrap_or_default();
    let src = [
        "reporter=\"source\"",
        "source_workload=\"a1\"",
        "destination_workload=\"b1\"",
    ];
    if metric(&a_metrics, "istio_tcp_connections_opened_total", &src) != Some(1.0) {
        return Err(format!("a did not send a1's connection:\n{a_metrics}"));
    }
    // weft stops on SIGTERM (drain, then exit 0), and podman removes the container.
    for (n, c) in [("a", &mut a), ("b", &mut b)] {
        let st = c.stop();
        if !st.is_some_and(|s| s.success()) {
            return Err(format!(
                "container {n} did not stop cleanly: {st:?}\n{}",
                c.log()
            ));
        }
    }
    Ok(Carried {
        b_metrics,
        b_log: b.log(),
    })
}

#[test]
fn the_image_runs_as_the_daemonset_runs_it() {
    ensure_podman();
    let t0 = Instant::now();
    let work = cache().join("image-test");
    let image = match std::env::var_os("WEFT_IMAGE_ENV") {
        Some(env) => Image::load(Path::new(&env)),
        None => Image::build(&work.join("image"), &["--tag", "localhost/weft:test"]),
    };
    let version = env!("CARGO_PKG_VERSION");

    // What the image says about itself.
    let inspect = image.inspect();
    let cfg = &inspect["Config"];
    assert_eq!(cfg["Entrypoint"], json!(["/usr/local/bin/weft"]), "{cfg}");
    assert_eq!(cfg["WorkingDir"], "/", "{cfg}");
    assert_eq!(cfg["User"], "65532:65532", "non-root by default: {cfg}");
    let revision = image.get("IMAGE_REVISION").to_string();
    assert!(
        revision.len() == 40 && revision.chars().all(|c| c.is_ascii_hexdigit()),
        "{revision}"
    );
    let want_labels = json!({
        "org.opencontainers.image.version": version,
        "org.opencontainers.image.revision": revision,
        "org.opencontainers.image.source": "https://github.com/weft-mesh/weft",
    });
    for (k, v) in want_labels.as_object().unwrap() {
        assert_eq!(&cfg["Labels"][k], v, "label {k}: {cfg}");
    }
    // The Dockerfile (for users with a registry; it cannot be built here) makes the same:
    // entrypoint, command, user, working directory, labels, the lock's run-time packages.
    let df = dockerfile_final_stage();
    assert_eq!(
        df["ENTRYPOINT"],
        json!([serde_json::to_string(&cfg["Entrypoint"]).unwrap()])
    );
    assert_eq!(
        df["CMD"],
        json!([serde_json::to_string(&cfg["Cmd"]).unwrap()])
    );
    assert_eq!(df["USER"], json!([cfg["User"]]));
    assert_eq!(df["WORKDIR"], json!([cfg["WorkingDir"]]));
    assert!(
        df["ARG"]
            .as_array()
            .unwrap()
            .contains(&json!(format!("VERSION={version}"))),
        "{df}"
    );
    let mut df_labels: Vec<String> = df["LABEL"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|l| {
            l.as_str()
                .unwrap()
                .split_whitespace()
                .filter_map(|kv| kv.split_once('=').map(|(k, _)| k.to_string()))
                .collect::<Vec<_>>()
        })
        .collect();
    df_labels.sort();
    let mut image_labels: Vec<String> =
        cfg["Labels"].as_object().unwrap().keys().cloned().collect();
    image_labels.sort();
    assert_eq!(df_labels, image_labels, "the Dockerfile's labels");
    let dockerfile = std::fs::read_to_string(repo().join("Dockerfile")).unwrap();
    assert!(
        dockerfile.contains("image/packages.lock")
            && dockerfile.contains("ARG BASE_IMAGE=debian:bookworm-slim")
    );
    // The OCI archive's manifest carries them as annotations.
    let oci = format!(
        "oci-archive:{}:{}",
        image.get("IMAGE_OCI_ARCHIVE"),
        image.get("IMAGE_REF")
    );
    let raw: Value =
        serde_json::from_str(&run(Command::new("skopeo").args(["inspect", "--raw", &oci])))
            .expect("manifest");
    for (k, v) in want_labels.as_object().unwrap() {
        assert_eq!(&raw["annotations"][k], v, "annotation {k}: {raw}");
    }
    // `weft version` in the image, as its default user, with nothing granted: the revision.
    let mut args = vec![
        "run",
        "--rm",
        "--pull=never",
        "--read-only",
        "--cap-drop=all",
    ];
    let ul = ulimits();
    args.extend(ul.iter().map(String::as_str));
    args.extend([image.id.as_str(), "version"]);
    let printed = run(&mut podman(&args));
    assert_eq!(printed.trim(), format!("weft {version} (git {revision})"));
    assert!(
        Command::new("git")
            .args([
                "-C",
                repo().to_str().unwrap(),
                "cat-file",
                "-e",
                &format!("{revision}^{{commit}}")
            ])
            .status()
            .is_ok_and(|s| s.success()),
        "{revision} is no commit of this repository"
    );

    // The init container: `weft cni install` from the image, as install-cni runs.
    install_cni_from_the_image(&image);

    // nodes a and b in containers; the checks run while both are up.
    let pod = daemonset_pod();
    let caps: Vec<String> = named(&pod["containers"], "weft")["securityContext"]["capabilities"]
        ["add"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap().to_string())
        .collect();
    let mask = cap_mask(&caps.iter().map(String::as_str).collect::<Vec<_>>());
    let mut checked = false;
    let carried = carry_a1_to_b1(&image, &mut |a, _b| {
        let pid = a.pid();
        let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap();
        assert_eq!(
            exe,
            Path::new("/usr/local/bin/weft"),
            "the container's process"
        );
        for key in ["CapEff", "CapPrm", "CapBnd"] {
            let v = u64::from_str_radix(&proc_status(pid, key), 16).unwrap();
            assert_eq!(
                v, mask,
                "{key} of weft in the container: {v:#x}, the DaemonSet's {caps:?} are {mask:#x}"
            );
        }
        assert_eq!(proc_status(pid, "NoNewPrivs"), "1");
        assert_eq!(proc_status(pid, "Uid").split_whitespace().next(), Some("0"));
        // host PID namespace: the container's weft sees the host's PID 1.
        assert_eq!(
            std::fs::read_link(format!("/proc/{pid}/ns/pid")).unwrap(),
            std::fs::read_link("/proc/self/ns/pid").unwrap()
        );
        let mountinfo = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
        let root = mountinfo
            .lines()
            .find(|l| l.split_whitespace().nth(4) == Some("/"))
            .expect("a root mount");
        assert!(
            root.split_whitespace()
                .nth(5)
                .unwrap()
                .split(',')
                .any(|o| o == "ro"),
            "the root filesystem is writable: {root}"
        );
        checked = true;
    })
    .unwrap_or_else(|e| panic!("the image did not carry a1 → b1 over HBONE: {e}"));
    assert!(checked);
    assert!(
        carried
            .b_log
            .lines()
            .any(|l| l.contains("direction=\"inbound\"")
                && l.contains("dst.addr=10.250.2.2:8080")
                && l.contains(&format!("src.identity=\"{CLIENT}\""))),
        "node b's access log names a1's identity:\n{}",
        carried.b_log
    );
    assert!(carried.b_metrics.contains("istio_tcp_received_bytes_total"));
    eprintln!("image ran as nodes a and b ({:.0?} so far)", t0.elapsed());

    // The same image without the nftables package: weft cannot capture, and the run above
    // must fail, saying why.
    let bins = image
        .env
        .get("IMAGE_DOCKER_ARCHIVE")
        .map(|p| Path::new(p).parent().unwrap().join("bin"))
        .unwrap();
    let broken = Image::build_from(
        bins.to_str().unwrap(),
        &work.join("without-nftables"),
        &[
            "--without",
            "nftables",
            "--tag",
            "localhost/weft:test-without-nftables",
        ],
    );
    assert_eq!(broken.get("IMAGE_WITHOUT"), "nftables");
    assert_ne!(broken.id, image.id);
    let err = match carry_a1_to_b1(&broken, &mut |_, _| {}) {
        Ok(_) => {
            panic!("an image without nftables carried a1 → b1: the test cannot see a missing tool")
        }
        Err(e) => e,
    };
    assert!(err.starts_with("not ready"), "{err}");
    assert!(
        err.contains("`nft` not found"),
        "the failure names nft: {err}"
    );
    eprintln!("the image test took {:.0?}", t0.elapsed());
}

/// The Dockerfile's final stage: each instruction's arguments, by instruction (continuation
/// lines joined; a LABEL's `key="value with spaces"` pairs kept as `key=...` words).
fn dockerfile_final_stage() -> Value {
    let text = std::fs::read_to_string(repo().join("Dockerfile")).unwrap();
    let joined = text.replace("\\\n", " ");
    let stage = joined.rsplit_once("\nFROM ").expect("a final FROM").1;
    let mut out = serde_json::Map::new();
    for line in stage.lines().skip(1) {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (ins, rest) = line.split_once(' ').unwrap_or((line, ""));
        let rest = if ins == "LABEL" {
            // key="a b c" → key=x, so that splitting on spaces finds the keys.
            let mut s = String::new();
            let mut quoted = false;
            for ch in rest.chars() {
                match ch {
                    '"' => quoted = !quoted,
                    _ if quoted => {}
                    c => s.push(c),
                }
            }
            s
        } else {
            rest.trim().to_string()
        };
        out.entry(ins.to_string())
            .or_insert_with(|| json!([]))
            .as_array_mut()
            .unwrap()
            .push(json!(rest));
    }
    Value::Object(out)
}

/// install-cni of daemonset.yaml, from the image: its arguments, its securityContext, the two
/// CNI directories; weft-cni lands in the bin directory and in the configuration list.
fn install_cni_from_the_image(image: &Image) {
    let pod = daemonset_pod();
    let init = named(&pod["initContainers"], "install-cni");
    let dir = tempfile::tempdir().unwrap();
    let (bin, conf) = (dir.path().join("bin"), dir.path().join("net.d"));
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::create_dir_all(&conf).unwrap();
    std::fs::write(
        conf.join("10-lab.conflist"),
        r#"{"cniVersion": "1.0.0", "name": "lab", "plugins": [{"type": "bridge"}]}"#,
    )
    .unwrap();
    let sc = &init["securityContext"];
    assert_eq!(sc["capabilities"], json!({"drop": ["ALL"]}));
    let mut args = vec!["--cap-drop=all".to_string()];
    if sc["readOnlyRootFilesystem"] == true {
        args.extend(["--read-only".into(), "--read-only-tmpfs=false".into()]);
    }
    args.push("--security-opt=no-new-privileges".into());
    args.push(format!("--user={}:{}", sc["runAsUser"], sc["runAsGroup"]));
    args.push("--network=none".into());
    for m in init["volumeMounts"].as_array().unwrap() {
        let host = named(&pod["volumes"], m["name"].as_str().unwrap())["hostPath"]["path"]
            .as_str()
            .unwrap()
            .to_string();
        let local = if host == "/opt/cni/bin" { &bin } else { &conf };
        args.push(format!(
            "--volume={}:{}",
            local.display(),
            m["mountPath"].as_str().unwrap()
        ));
    }
    args.extend(ulimits());
    args.push(image.id.clone());
    for a in init["args"].as_array().unwrap() {
        // What the kubelet expands: $(POD_NAMESPACE).
        args.push(
            a.as_str()
                .unwrap()
                .replace("$(POD_NAMESPACE)", "weft-system"),
        );
    }
    let mut all = vec!["run".to_string(), "--rm".into(), "--pull=never".into()];
    all.extend(args);
    let argv: Vec<&str> = all.iter().map(String::as_str).collect();
    run(&mut podman(&argv));
    let installed = std::fs::read(bin.join("weft-cni")).expect("weft-cni installed");
    let shipped = Path::new(image.get("IMAGE_DOCKER_ARCHIVE"))
        .parent()
        .unwrap()
        .join("bin/weft-cni");
    assert!(
        installed == std::fs::read(shipped).unwrap(),
        "weft-cni is the image's"
    );
    let list = std::fs::read_to_string(conf.join("10-lab.conflist")).unwrap();
    assert!(
        list.contains("\"type\": \"weft-cni\"") || list.contains("\"type\":\"weft-cni\""),
        "{list}"
    );
}

// ---------------------------------------------------------------------------------------------
// README.md's install blocks

/// The body of the ```sh block right after `marker` in README.md (exactly one such marker).
fn readme_block(marker: &str) -> String {
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    assert_eq!(
        readme.matches(marker).count(),
        1,
        "README.md must mark one block with {marker:?}"
    );
    let mut lines = readme.lines().skip_while(|l| !l.contains(marker)).skip(1);
    assert_eq!(
        lines.next().map(str::trim_end),
        Some("```sh"),
        "{marker} must precede a ```sh block"
    );
    let mut body = String::new();
    for line in lines {
        if line.trim_end() == "```" {
            return body;
        }
        body.push_str(line);
        body.push('\n');
    }
    panic!("the block after {marker} is not closed");
}

/// Runs a README block with bash in `work` (a directory standing for the repository's root:
/// its daemonset/ is the repository's), with weft, kubectl and `path` first on PATH.
fn run_block(api: &ApiServer, work: &Path, block: &str, path: &[PathBuf], env: &[(&str, &str)]) {
    let script = work.join("steps.sh");
    std::fs::write(&script, block).unwrap();
    if !work.join("daemonset").exists() {
        std::os::unix::fs::symlink(repo().join("daemonset"), work.join("daemonset")).unwrap();
    }
    let weft = PathBuf::from(env!("CARGO_BIN_EXE_weft"));
    let mut dirs = vec![
        weft.parent().unwrap().to_path_buf(),
        cached_binary("kubectl").parent().unwrap().to_path_buf(),
    ];
    dirs.extend(path.iter().map(|p| p.parent().unwrap().to_path_buf()));
    let mut p = std::env::join_paths(dirs).unwrap();
    if let Some(old) = std::env::var_os("PATH") {
        p = std::env::join_paths(std::env::split_paths(&p).chain(std::env::split_paths(&old)))
            .unwrap();
    }
    let out = Command::new("bash")
        .args(["-euxo", "pipefail"])
        .arg(&script)
        .current_dir(work)
        .env("PATH", p)
        .env("KUBECONFIG", api.kubeconfig())
        .env("KUBECACHEDIR", work.join("kube-cache"))
        .env("HELM_CACHE_HOME", work.join("helm/cache"))
        .env("HELM_CONFIG_HOME", work.join("helm/config"))
        .env("HELM_DATA_HOME", work.join("helm/data"))
        .envs(env.iter().copied())
        .output()
        .expect("bash");
    assert!(
        out.status.success(),
        "README.md block failed ({}):\n{block}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn get(api: &ApiServer, args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.extend(["-o", "json"]);
    serde_json::from_str(&api.kubectl(&all)).expect("kubectl -o json")
}

#[test]
fn readme_image_install_steps_apply_weft_from_your_registry() {
    let block = readme_block("<!-- image-install-steps");
    let image = block
        .lines()
        .find_map(|l| l.strip_prefix("IMAGE="))
        .map(|v| v.split_whitespace().next().unwrap().to_string())
        .expect("the block sets IMAGE=");
    assert!(
        block.contains("images:") && block.contains("kubectl apply -k"),
        "{block}"
    );
    let api = ApiServer::start();
    let work = tempfile::tempdir().unwrap();
    run_block(&api, work.path(), &block, &[], &[]);
    // Both of weft's workloads run the overridden image; nothing else changed.
    let ds = get(&api, &["get", "daemonset", "weft", "-n", "weft-system"]);
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(
        named(&pod["initContainers"], "install-cni")["image"],
        image.as_str()
    );
    assert_eq!(named(&pod["containers"], "weft")["image"], image.as_str());
    let ca = get(&api, &["get", "deployment", "weft-ca", "-n", "weft-system"]);
    assert_eq!(
        named(&ca["spec"]["template"]["spec"]["containers"], "weft-ca")["image"],
        image.as_str()
    );
    let repo_ds = daemonset_pod();
    assert_eq!(
        named(&pod["containers"], "weft")["securityContext"]["capabilities"],
        named(&repo_ds["containers"], "weft")["securityContext"]["capabilities"]
    );
}

#[test]
fn readme_istio_install_steps_put_weft_into_the_ztunnel_chart() {
    let block = readme_block("<!-- istio-install-steps");
    let out = run(Command::new("bash")
        .arg(repo().join("daemonset/istio/helm.sh"))
        .arg("install"));
    let line = |k: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix(&format!("{k}=")))
            .map(PathBuf::from)
            .unwrap_or_else(|| panic!("no {k}= from helm.sh install"))
    };
    let (helm, ztunnel) = (line("helm"), line("chart"));
    // Istio's charts as its Helm repository names them, from the istio.io/istio module.
    let charts_root = ztunnel.parent().unwrap();
    let work = tempfile::tempdir().unwrap();
    let charts = work.path().join("charts");
    std::fs::create_dir(&charts).unwrap();
    for (name, dir) in [
        ("base", "base"),
        ("istiod", "istio-control/istio-discovery"),
        ("cni", "istio-cni"),
        ("ztunnel", "ztunnel"),
    ] {
        std::os::unix::fs::symlink(charts_root.join(dir), charts.join(name)).unwrap();
    }
    let api = ApiServer::start();
    run_block(
        &api,
        work.path(),
        &block,
        &[helm],
        &[("ISTIO_CHARTS", charts.to_str().unwrap())],
    );

    let image = block
        .lines()
        .find_map(|l| l.strip_prefix("IMAGE="))
        .map(|v| v.split_whitespace().next().unwrap().to_string())
        .expect("the block sets IMAGE=");
    assert!(block.contains("--set image=\"$IMAGE\""), "{block}");
    // Without --set, the values name the image daemonset/ names.
    let values: Value = serde_saphyr::from_str(
        &std::fs::read_to_string(repo().join("daemonset/istio/values.yaml")).unwrap(),
    )
    .expect("values.yaml");
    assert_eq!(
        values["image"],
        named(&daemonset_pod()["containers"], "weft")["image"]
    );
    let ds = get(&api, &["get", "daemonset", "ztunnel", "-n", "istio-system"]);
    let pod = &ds["spec"]["template"]["spec"];
    let c = named(&pod["containers"], "istio-proxy");
    assert_eq!(
        c["image"],
        image.as_str(),
        "weft's image in ztunnel's place"
    );
    assert_eq!(
        c["args"],
        json!(["proxy", "ztunnel"]),
        "what `weft proxy ztunnel` takes"
    );
    let env: BTreeMap<String, Value> = c["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["name"].as_str().unwrap().to_string(), e.clone()))
        .collect();
    // The environment weft reads under `proxy ztunnel` (README.md's table), all from the chart.
    for name in [
        "CA_ADDRESS",
        "XDS_ADDRESS",
        "ISTIO_META_CLUSTER_ID",
        "POD_NAME",
        "POD_NAMESPACE",
        "NODE_NAME",
        "INSTANCE_IP",
        "SERVICE_ACCOUNT",
        "TERMINATION_GRACE_PERIOD_SECONDS",
        "RUST_LOG",
    ] {
        assert!(env.contains_key(name), "no {name} in {env:?}");
    }
    assert_eq!(env["XDS_ADDRESS"]["value"], "istiod.istio-system.svc:15012");
    assert_eq!(env["WEFT_DRAIN_SECONDS"]["value"], "25");
    let grace = pod["terminationGracePeriodSeconds"].as_u64().unwrap();
    assert!(25 < grace, "drain {grace}");
    // The files weft opens under `proxy ztunnel` (relative to the image's working directory
    // `/`) are on the chart's volumes.
    let mounts: BTreeMap<&str, &str> = c["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["mountPath"].as_str().unwrap(),
                m["name"].as_str().unwrap(),
            )
        })
        .collect();
    let vol = |path: &str| named(&pod["volumes"], mounts[path]).clone();
    assert_eq!(
        vol("/var/run/secrets/istio")["configMap"]["name"],
        "istio-ca-root-cert"
    );
    assert_eq!(
        vol("/var/run/secrets/tokens")["projected"]["sources"][0]["serviceAccountToken"]
            ["audience"],
        "istio-ca"
    );
    assert_eq!(
        vol("/var/run/ztunnel")["hostPath"]["path"],
        "/var/run/ztunnel"
    );
    assert!(vol("/tmp")["emptyDir"].is_object());
    let sc = &c["securityContext"];
    assert_eq!(sc["runAsUser"], 0);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]));
    let mut add: Vec<&str> = sc["capabilities"]["add"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    add.sort();
    assert_eq!(add, ["NET_ADMIN", "NET_RAW", "SYS_ADMIN"]);
    // Istio's own pieces the block installed: istiod, the CNI node agent, ztunnel's identity.
    get(&api, &["get", "deployment", "istiod", "-n", "istio-system"]);
    get(
        &api,
        &["get", "daemonset", "istio-cni-node", "-n", "istio-system"],
    );
    get(
        &api,
        &["get", "serviceaccount", "ztunnel", "-n", "istio-system"],
    );
}
