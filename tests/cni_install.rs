//! `weft cni install` and `weft cni uninstall`, the commands the DaemonSet's init container and
//! the clean-up DaemonSet run, against a node's CNI directories laid out in a temporary directory.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

const FLANNEL_CONF: &str = r#"{
  "name": "cbr0",
  "cniVersion": "0.3.1",
  "type": "flannel",
  "delegate": {
    "hairpinMode": true,
    "isDefaultGateway": true
  }
}
"#;

const CALICO_CONFLIST: &str = r#"{
  "name": "k8s-pod-network",
  "cniVersion": "0.3.1",
  "plugins": [
    {
      "type": "calico",
      "log_level": "info",
      "ipam": {"type": "calico-ipam"}
    },
    {
      "type": "portmap",
      "snat": true,
      "capabilities": {"portMappings": true}
    }
  ]
}
"#;

const PLUGIN: &[u8] = b"#!/bin/sh\nexit 0\n";

struct Node {
    _tmp: tempfile::TempDir,
    bin: PathBuf,
    conf: PathBuf,
    plugin: PathBuf,
}

impl Node {
    fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let bin = tmp.path().join("opt/cni/bin");
        let conf = tmp.path().join("etc/cni/net.d");
        fs::create_dir_all(&bin).unwrap();
        fs::create_dir_all(&conf).unwrap();
        // Any file stands in for the weft-cni binary.
        let plugin = tmp.path().join("weft-cni-under-test");
        fs::write(&plugin, PLUGIN).unwrap();
        Node {
            _tmp: tmp,
            bin,
            conf,
            plugin,
        }
    }

    /// Runs `weft cni <command> <extra>` against this node's directories.
    fn weft(&self, command: &str, extra: &[&str]) -> Output {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_weft"));
        cmd.args(["cni", command])
            .arg("--cni-bin-dir")
            .arg(&self.bin)
            .arg("--cni-conf-dir")
            .arg(&self.conf)
            .arg("--plugin-binary")
            .arg(&self.plugin)
            .args(["--wait-seconds", "0"])
            .args(extra);
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("WEFT_CNI_") {
                cmd.env_remove(name);
            }
        }
        cmd.output().expect("running weft")
    }

    fn ok(&self, command: &str, extra: &[&str]) -> String {
        let out = self.weft(command, extra);
        assert!(
            out.status.success(),
            "weft cni {command} failed: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn path(&self, name: &str) -> PathBuf {
        self.conf.join(name)
    }

    fn write_conf(&self, name: &str, text: &str) {
        fs::write(self.path(name), text).unwrap();
    }

    fn read(&self, name: &str) -> String {
        fs::read_to_string(self.path(name)).unwrap()
    }

    fn binary(&self) -> PathBuf {
        self.bin.join("weft-cni")
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }
}

fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap()
}

#[test]
fn single_conf_is_converted_chained_and_released() {
    let node = Node::new();
    node.write_conf("10-flannel.conf", FLANNEL_CONF);

    let stdout = node.ok("install", &[]);
    let list_path = node.path("10-flannel.conflist");
    assert!(
        stdout.contains(&format!("installed weft-cni into {}", list_path.display())),
        "{stdout}"
    );
    assert_eq!(Node::names(&node.conf), ["10-flannel.conflist"]);
    let text = node.read("10-flannel.conflist");
    let list = json(&text);
    assert_eq!(list["name"], "cbr0");
    assert_eq!(list["cniVersion"], "0.3.1");
    assert_eq!(
        list["plugins"],
        json(&format!(
            r#"[{FLANNEL_CONF}, {{"type": "weft-cni", "socket": "/var/run/weft/cni.sock", "failOpen": false}}]"#
        ))
    );
    assert_eq!(fs::read(node.binary()).unwrap(), PLUGIN);
    assert_eq!(
        fs::metadata(node.binary()).unwrap().permissions().mode() & 0o7777,
        0o755
    );

    let stdout = node.ok("install", &[]);
    assert!(stdout.contains("already installed"), "{stdout}");
    assert_eq!(
        node.read("10-flannel.conflist"),
        text,
        "second install: same bytes"
    );

    node.ok("uninstall", &[]);
    let list = json(&node.read("10-flannel.conflist"));
    assert_eq!(list["plugins"], json(&format!("[{FLANNEL_CONF}]")));
    assert!(!node.binary().exists());
    node.ok("uninstall", &[]);
}

#[test]
fn conflist_gets_the_entry_with_the_given_options_and_uninstall_restores_it() {
    let node = Node::new();
    node.write_conf("10-calico.conflist", CALICO_CONFLIST);
    // Another file the runtime does not use stays as it is.
    node.write_conf(
        "20-other.conflist",
        r#"{"name": "o", "plugins": [{"type": "ptp"}]}"#,
    );

    let args = ["--socket", "/run/custom/cni.sock", "--fail-open"];
    let stdout = node.ok("install", &args);
    assert!(
        stdout.contains(&format!(
            "installed weft-cni into {}",
            node.path("10-calico.conflist").display()
        )),
        "{stdout}"
    );
    let want = CALICO_CONFLIST.replace(
        "      \"capabilities\": {\"portMappings\": true}\n    }\n",
        "      \"capabilities\": {\"portMappings\": true}\n    },\n    \
         {\"type\": \"weft-cni\", \"socket\": \"/run/custom/cni.sock\", \"failOpen\": true}\n",
    );
    assert_eq!(node.read("10-calico.conflist"), want);
    assert_eq!(
        node.read("20-other.conflist"),
        r#"{"name": "o", "plugins": [{"type": "ptp"}]}"#
    );

    let stdout = node.ok("install", &args);
    assert!(stdout.contains("already installed"), "{stdout}");
    assert_eq!(node.read("10-calico.conflist"), want);

    // Other options: the entry is replaced, not added.
    let stdout = node.ok("install", &[]);
    assert!(stdout.contains("updated the weft-cni entry"), "{stdout}");
    assert_eq!(
        node.read("10-calico.conflist"),
        want.replace(
            r#""/run/custom/cni.sock", "failOpen": true"#,
            r#""/var/run/weft/cni.sock", "failOpen": false"#
        )
    );

    node.ok("uninstall", &[]);
    assert_eq!(node.read("10-calico.conflist"), CALICO_CONFLIST);
    assert_eq!(Node::names(&node.bin), Vec::<String>::new());
}

#[test]
fn malformed_configuration_fails_clearly_and_is_left_as_it_was() {
    for (text, reason) in [
        (
            r#"{"name": "n", "plugins": [{"type": "ptp"},]}"#,
            "not valid JSON",
        ),
        (
            r#"{"name": "n", "cniVersion": "1.0.0"}"#,
            "no \"plugins\" list",
        ),
    ] {
        let node = Node::new();
        node.write_conf("10-broken.conflist", text);
        let out = node.weft("install", &[]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{text}: install succeeded");
        let path = node.path("10-broken.conflist");
        assert!(
            stderr.contains(&format!("{}: {reason}", path.display())),
            "{text}: {stderr}"
        );
        assert_eq!(node.read("10-broken.conflist"), text);
        assert_eq!(Node::names(&node.conf), ["10-broken.conflist"]);
        assert_eq!(
            Node::names(&node.bin),
            Vec::<String>::new(),
            "no binary installed"
        );
    }
}

#[test]
fn no_primary_configuration_fails_after_the_wait() {
    let node = Node::new();
    let out = node.weft("install", &[]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&node.conf.display().to_string())
            && stderr.contains("primary network plugin"),
        "{stderr}"
    );
}
