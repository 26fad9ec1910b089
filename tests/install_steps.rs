//! The install steps of daemonset/README.md, run as written against a real API server (etcd +
//! kube-apiserver from scripts/k8s-testenv.sh): the fenced block right after the
//! `<!-- install-steps` marker is run with bash, from a directory laid out like the root of
//! the repository (its `daemonset/` is the repository's, so `kubectl apply -k daemonset/`
//! applies the real manifests; `./weft-ca` is made there, not in the working tree), with
//! this build's `weft` and the test environment's `kubectl` first on PATH.
//!
//! Then what the steps made is checked: the CA's key material is in the Secret `weft-ca`,
//! the ConfigMap `weft-ca-root` holds the root and nothing else, the CA's Deployment,
//! Service, PodDisruptionBudget and RBAC are there, the Secret is mounted by the CA
//! Deployment only, and the node agents' DaemonSet mounts no Secret at all but the trust
//! bundle and a projected token for the CA. No kubelet runs, so no pod starts.

#[allow(dead_code)]
#[path = "common/apiserver.rs"]
mod apiserver;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use apiserver::{cached_binary, ApiServer};
use base64::Engine;
use serde_json::{json, Value};

const MARKER: &str = "<!-- install-steps";
const NS: &str = "weft-system";
const CA_FILES: [&str; 4] = [
    "ca-cert.pem",
    "ca-key.pem",
    "root-cert.pem",
    "cert-chain.pem",
];

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The body of the ```sh block that follows the marker comment (the only one) of the README.
fn install_steps(readme: &str) -> String {
    assert_eq!(
        readme.matches(MARKER).count(),
        1,
        "daemonset/README.md must mark exactly one block with {MARKER:?}"
    );
    let mut lines = readme.lines().skip_while(|l| !l.contains(MARKER)).skip(1);
    let fence = lines.next().unwrap_or_default();
    assert_eq!(
        fence.trim_end(),
        "```sh",
        "the line after {MARKER:?} must open a ```sh block"
    );
    let mut body = String::new();
    for line in lines.by_ref() {
        if line.trim_end() == "```" {
            assert!(!body.trim().is_empty(), "the install-steps block is empty");
            return body;
        }
        body.push_str(line);
        body.push('\n');
    }
    panic!("the install-steps block of daemonset/README.md is not closed");
}

fn get(api: &ApiServer, args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.extend(["-o", "json"]);
    serde_json::from_str(&api.kubectl(&all)).expect("kubectl -o json")
}

/// `kubectl auth can-i` as `user`: does RBAC allow it?
fn can_i(api: &ApiServer, user: &str, args: &[&str]) -> bool {
    let out = Command::new(cached_binary("kubectl"))
        .env("KUBECONFIG", api.kubeconfig())
        .args(["auth", "can-i", "--as", user])
        .args(args)
        .output()
        .expect("run kubectl auth can-i");
    let answer = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(
        answer == "yes" || answer == "no",
        "kubectl auth can-i {args:?} as {user}: {answer:?} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    answer == "yes"
}

/// The Secrets a pod spec uses, as volumes (direct or projected) or in its environment.
fn secrets_of(pod_spec: &Value) -> Vec<String> {
    let mut found = Vec::new();
    for v in pod_spec["volumes"].as_array().into_iter().flatten() {
        if let Some(name) = v["secret"]["secretName"].as_str() {
            found.push(name.to_string());
        }
        for src in v["projected"]["sources"].as_array().into_iter().flatten() {
            if let Some(name) = src["secret"]["name"].as_str() {
                found.push(name.to_string());
            }
        }
    }
    let containers = ["initContainers", "containers", "ephemeralContainers"]
        .iter()
        .flat_map(|k| pod_spec[*k].as_array().into_iter().flatten());
    for c in containers {
        for e in c["envFrom"].as_array().into_iter().flatten() {
            if let Some(name) = e["secretRef"]["name"].as_str() {
                found.push(name.to_string());
            }
        }
        for e in c["env"].as_array().into_iter().flatten() {
            if let Some(name) = e["valueFrom"]["secretKeyRef"]["name"].as_str() {
                found.push(name.to_string());
            }
        }
    }
    found
}

/// The file a container sees at `path`, as (volume name, path inside the volume).
fn volume_file(container: &Value, path: &str) -> (String, String) {
    container["volumeMounts"]
        .as_array()
        .into_iter()
        .flatten()
        .find_map(|m| {
            let dir = m["mountPath"].as_str()?;
            let rest = path.strip_prefix(dir)?.strip_prefix('/')?;
            Some((m["name"].as_str()?.to_string(), rest.to_string()))
        })
        .unwrap_or_else(|| panic!("{path} is on no volume mount of {}", container["name"]))
}

fn arg_after<'a>(args: &'a [Value], flag: &str) -> Option<&'a str> {
    let i = args.iter().position(|a| a == flag)?;
    args.get(i + 1)?.as_str()
}

fn volume<'a>(pod_spec: &'a Value, name: &str) -> &'a Value {
    pod_spec["volumes"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|v| v["name"] == name)
        .unwrap_or_else(|| panic!("no volume {name}"))
}

fn container<'a>(pod_spec: &'a Value, name: &str) -> &'a Value {
    pod_spec["containers"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no container {name}"))
}

fn run_install_steps(api: &ApiServer, work: &Path) {
    let readme = std::fs::read_to_string(repo().join("daemonset/README.md")).expect("README");
    let steps = install_steps(&readme);
    for command in ["weft ca init", "kubectl apply -k daemonset/"] {
        assert!(
            steps.contains(command),
            "install steps without {command:?}:\n{steps}"
        );
    }
    let script = work.join("install-steps.sh");
    std::fs::write(&script, &steps).expect("write steps");
    // The working directory stands for the repository root.
    std::os::unix::fs::symlink(repo().join("daemonset"), work.join("daemonset"))
        .expect("symlink daemonset/");

    let weft = PathBuf::from(env!("CARGO_BIN_EXE_weft"));
    let kubectl = cached_binary("kubectl");
    let mut path = std::ffi::OsString::new();
    path.push(weft.parent().expect("weft's directory"));
    path.push(":");
    path.push(kubectl.parent().expect("kubectl's directory"));
    if let Some(p) = std::env::var_os("PATH") {
        path.push(":");
        path.push(p);
    }
    let out = Command::new("bash")
        .args(["-euxo", "pipefail"])
        .arg(&script)
        .current_dir(work)
        .env("PATH", path)
        .env("KUBECONFIG", api.kubeconfig())
        .env("KUBECACHEDIR", work.join("kube-cache"))
        .output()
        .expect("run bash");
    assert!(
        out.status.success(),
        "the install steps of daemonset/README.md failed ({}):\n{steps}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn readme_install_steps_keep_the_ca_key_off_the_node_agents() {
    let api = ApiServer::start();
    let work = tempfile::tempdir().expect("tempdir");
    run_install_steps(&api, work.path());
    let ca_dir = work.path().join("weft-ca");
    let file = |name: &str| std::fs::read_to_string(ca_dir.join(name)).expect("CA file");

    // The Secret: the four files of `weft ca init`, as they are on disk.
    let secret = get(&api, &["get", "secret", "weft-ca", "-n", NS]);
    let data: BTreeMap<String, String> = secret["data"]
        .as_object()
        .expect("secret data")
        .iter()
        .map(|(k, v)| {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(v.as_str().expect("base64 string"))
                .expect("base64");
            (k.clone(), String::from_utf8(bytes).expect("PEM text"))
        })
        .collect();
    let want: BTreeMap<String, String> =
        CA_FILES.iter().map(|f| (f.to_string(), file(f))).collect();
    assert_eq!(data, want, "Secret weft-ca");
    assert!(data["ca-key.pem"].contains("PRIVATE KEY"));

    // The ConfigMap: the root, and nothing else.
    let root = get(&api, &["get", "configmap", "weft-ca-root", "-n", NS]);
    assert_eq!(
        root["data"],
        json!({"root-cert.pem": file("root-cert.pem")}),
        "ConfigMap weft-ca-root"
    );
    assert!(root.get("binaryData").is_none(), "{root}");
    assert!(!root.to_string().contains("PRIVATE KEY"));

    // The DaemonSet: no Secret at all; the trust bundle and a projected token for the CA.
    let ds = get(&api, &["get", "ds", "weft", "-n", NS]);
    let ds_pod = &ds["spec"]["template"]["spec"];
    assert_eq!(
        secrets_of(ds_pod),
        Vec::<String>::new(),
        "the DaemonSet uses Secrets"
    );
    let weft = container(ds_pod, "weft");
    let args = weft["args"].as_array().expect("weft args").clone();
    assert!(
        !args.iter().any(|a| a == "--ca-dir"),
        "--ca-dir in {args:?}"
    );
    assert_eq!(
        arg_after(&args, "--ca-address"),
        Some("weft-ca.weft-system.svc:15012")
    );
    let root_file = arg_after(&args, "--ca-root-ca").expect("--ca-root-ca");
    let (vol, item) = volume_file(weft, root_file);
    let root_vol = volume(ds_pod, &vol);
    assert_eq!(root_vol["configMap"]["name"], "weft-ca-root", "{root_vol}");
    let items = root_vol["configMap"]["items"].as_array();
    let served_as = items.map_or(Some("root-cert.pem"), |items| {
        items
            .iter()
            .find(|i| i["path"] == item.as_str())
            .and_then(|i| i["key"].as_str())
    });
    assert_eq!(
        served_as,
        Some("root-cert.pem"),
        "--ca-root-ca {root_file} is not the ConfigMap's root-cert.pem: {root_vol}"
    );
    let token_file = arg_after(&args, "--token-file").expect("--token-file");
    let (vol, item) = volume_file(weft, token_file);
    let token_vol = volume(ds_pod, &vol);
    let token = token_vol["projected"]["sources"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|s| s["serviceAccountToken"]["path"] == item.as_str())
        .unwrap_or_else(|| panic!("--token-file {token_file} is no projected token: {token_vol}"));
    assert_eq!(token["serviceAccountToken"]["audience"], "istio-ca");
    assert_eq!(token["serviceAccountToken"]["expirationSeconds"], 43200);
    assert_eq!(ds_pod["serviceAccountName"], "weft");

    // The CA: Deployment, Service, PodDisruptionBudget, ServiceAccount and RBAC.
    let deploy = get(&api, &["get", "deployment", "weft-ca", "-n", NS]);
    assert_eq!(deploy["spec"]["replicas"], 2);
    let ca_pod = &deploy["spec"]["template"]["spec"];
    assert_eq!(ca_pod["serviceAccountName"], "weft-ca");
    let ca = container(ca_pod, "weft-ca");
    assert_eq!(ca["image"], weft["image"], "the CA runs weft's image");
    let ca_args = ca["args"].as_array().expect("CA args");
    assert_eq!(ca_args[0..2], [json!("ca"), json!("serve")], "{ca_args:?}");
    let ca_dir_arg = arg_after(ca_args, "--ca-dir").unwrap_or("/etc/weft/ca");
    let (vol, _) = volume_file(ca, &format!("{ca_dir_arg}/ca-key.pem"));
    let key_vol = volume(ca_pod, &vol);
    assert_eq!(key_vol["secret"]["secretName"], "weft-ca", "{key_vol}");
    assert_eq!(key_vol["secret"]["defaultMode"], 0o400, "{key_vol}");
    let key_mount = ca["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == vol.as_str())
        .unwrap();
    assert_eq!(key_mount["readOnly"], true, "{key_mount}");
    let sc = &ca["securityContext"];
    assert_eq!(sc["readOnlyRootFilesystem"], true, "{sc}");
    assert_eq!(sc["allowPrivilegeEscalation"], false, "{sc}");
    assert_eq!(sc["capabilities"], json!({"drop": ["ALL"]}), "{sc}");
    assert!(
        sc["runAsNonRoot"] == true || ca_pod["securityContext"]["runAsNonRoot"] == true,
        "the CA may run as root: {sc}"
    );
    for probe in ["readinessProbe", "livenessProbe"] {
        assert_eq!(
            ca[probe]["httpGet"],
            json!({"path": "/healthz/ready", "port": 15014, "scheme": "HTTP"}),
            "{probe}"
        );
    }

    let svc = get(&api, &["get", "service", "weft-ca", "-n", NS]);
    assert_eq!(
        svc["spec"]["ports"],
        json!([{"name": "grpc-tls", "port": 15012, "protocol": "TCP", "targetPort": 15012}])
    );
    assert_eq!(
        svc["spec"]["selector"],
        deploy["spec"]["selector"]["matchLabels"]
    );
    let pdb = get(&api, &["get", "poddisruptionbudget", "weft-ca", "-n", NS]);
    assert_eq!(pdb["spec"]["minAvailable"], 1);
    assert_eq!(pdb["spec"]["selector"], deploy["spec"]["selector"]);
    get(&api, &["get", "serviceaccount", "weft-ca", "-n", NS]);
    let role = get(&api, &["get", "clusterrole", "weft-ca"]);
    assert_eq!(
        role["rules"],
        json!([
            {"apiGroups": ["authentication.k8s.io"], "resources": ["tokenreviews"], "verbs": ["create"]},
            {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]},
        ])
    );
    let binding = get(&api, &["get", "clusterrolebinding", "weft-ca"]);
    assert_eq!(binding["roleRef"]["name"], "weft-ca");
    assert_eq!(
        binding["subjects"],
        json!([{"kind": "ServiceAccount", "name": "weft-ca", "namespace": NS}])
    );
    // What that grants, as the API server decides it.
    let ca_sa = "system:serviceaccount:weft-system:weft-ca";
    assert!(can_i(
        &api,
        ca_sa,
        &["create", "tokenreviews.authentication.k8s.io"]
    ));
    assert!(can_i(&api, ca_sa, &["list", "pods", "--all-namespaces"]));
    assert!(can_i(&api, ca_sa, &["get", "pods", "-n", "shop"]));
    assert!(!can_i(&api, ca_sa, &["watch", "pods", "--all-namespaces"]));
    assert!(!can_i(&api, ca_sa, &["get", "secrets", "-n", NS]));
    assert!(!can_i(&api, ca_sa, &["create", "pods", "-n", NS]));
    // Nor can the node agents read the key through the API.
    let weft_sa = "system:serviceaccount:weft-system:weft";
    assert!(!can_i(&api, weft_sa, &["get", "secrets", "-n", NS]));
    assert!(!can_i(
        &api,
        weft_sa,
        &["list", "secrets", "--all-namespaces"]
    ));

    // Of every workload in the cluster, only the CA Deployment uses the Secret weft-ca.
    let all = get(
        &api,
        &[
            "get",
            "pods,daemonsets,deployments,replicasets,statefulsets,jobs,cronjobs",
            "--all-namespaces",
        ],
    );
    let mut users = Vec::new();
    for o in all["items"].as_array().expect("items") {
        let spec = match o["kind"].as_str() {
            Some("Pod") => &o["spec"],
            Some("CronJob") => &o["spec"]["jobTemplate"]["spec"]["template"]["spec"],
            _ => &o["spec"]["template"]["spec"],
        };
        if secrets_of(spec).iter().any(|s| s == "weft-ca") {
            users.push(format!(
                "{}/{}/{}",
                o["kind"].as_str().unwrap_or_default(),
                o["metadata"]["namespace"].as_str().unwrap_or_default(),
                o["metadata"]["name"].as_str().unwrap_or_default()
            ));
        }
    }
    assert_eq!(users, vec!["Deployment/weft-system/weft-ca".to_string()]);
}

#[test]
fn the_marked_block_is_found_and_ends_at_its_fence() {
    let readme = "intro\n\n<!-- install-steps -->\n```sh\necho one   # comment\necho two\n```\n\n```sh\necho other\n```\n";
    assert_eq!(install_steps(readme), "echo one   # comment\necho two\n");
}
