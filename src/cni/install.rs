//! Installing the `weft-cni` chained plugin on a node, and removing it again.
//!
//! The DaemonSet's init container runs `weft cni install` before weft starts: the plugin binary
//! is copied into the node's CNI bin directory and the entry
//!
//! ```json
//! {"type": "weft-cni", "socket": "/var/run/weft/cni.sock", "failOpen": false}
//! ```
//!
//! is appended to the `plugins` list of the network configuration the container runtime uses
//! (the lexicographically first `*.conf`, `*.conflist` or `*.json` of the configuration
//! directory, unless one is named). A single-plugin `.conf` (or `.json`) is turned into a
//! `.conflist` the way the runtime itself reads it: the conf's `cniVersion` and `name` at the top,
//! the conf as the one plugin.
//!
//! Editing is textual: the file's own bytes are kept and only the entry's text is inserted,
//! replaced or cut out, so every other key, plugin, order and indentation stays as it was, a
//! second install changes nothing, and an uninstall after an install gives back the original
//! file byte for byte. Every result is parsed again and compared with the input before it is
//! written (temporary file in the same directory, fsync, rename), so a broken file is never
//! written; an input the runtime could not use either is refused with its path and the reason.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{anyhow, bail, Context};
use serde_json::{Map, Value};

/// The plugin's `type` in the configuration list, and the binary's file name.
pub const PLUGIN_TYPE: &str = "weft-cni";
/// Where weft listens for the plugin, as seen from the node.
pub const DEFAULT_SOCKET: &str = "/var/run/weft/cni.sock";

/// The extensions the runtime reads network configurations from (libcni's `ConfFiles`).
const CONF_EXTENSIONS: [&str; 3] = ["conf", "conflist", "json"];
/// Temporary files: hidden and ending in `.tmp`, so a runtime listing the directory never
/// takes one for a configuration.
const TEMP_PREFIX: &str = ".weft-install.";
const TEMP_SUFFIX: &str = ".tmp";
/// A temporary file older than this is left over from an interrupted run and removed.
const STALE_TEMP: Duration = Duration::from_secs(600);
const POLL: Duration = Duration::from_millis(500);

/// Where the plugin goes and what its configuration entry says.
#[derive(clap::Args, Debug, Clone)]
pub struct InstallOptions {
    /// The node's CNI plugin binary directory (as mounted into this container).
    #[arg(long, env = "WEFT_CNI_BIN_DIR", default_value = "/opt/cni/bin")]
    pub cni_bin_dir: PathBuf,
    /// The node's CNI network configuration directory (as mounted into this container).
    #[arg(long, env = "WEFT_CNI_CONF_DIR", default_value = "/etc/cni/net.d")]
    pub cni_conf_dir: PathBuf,
    /// The weft-cni binary to install [default: weft-cni next to this executable].
    #[arg(long, env = "WEFT_CNI_PLUGIN_BINARY")]
    pub plugin_binary: Option<PathBuf>,
    /// weft's Unix socket for the plugin, as a path on the node (written into the entry).
    #[arg(long, env = "WEFT_CNI_SOCKET", default_value = DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// Let pods start uncaptured when weft cannot be reached (default: they fail to start).
    #[arg(long, env = "WEFT_CNI_FAIL_OPEN")]
    pub fail_open: bool,
    /// The configuration file (a name in --cni-conf-dir) to chain into [default: the one the
    /// runtime uses, the lexicographically first *.conf, *.conflist or *.json].
    #[arg(long, env = "WEFT_CNI_CONF_FILE")]
    pub conf_file: Option<String>,
    /// Namespaces whose pods the plugin lets start without asking weft (comma-separated):
    /// weft's own namespace belongs here, or weft's pod could never start where weft is down.
    #[arg(long, env = "WEFT_CNI_EXCLUDE_NAMESPACES", value_delimiter = ',')]
    pub exclude_namespaces: Vec<String>,
    /// How long to wait for the primary network plugin's configuration to appear (0: not at all).
    #[arg(long, env = "WEFT_CNI_WAIT_SECONDS", default_value_t = 300)]
    pub wait_seconds: u64,
}

impl InstallOptions {
    /// Options with the defaults of the command line, for the given directories.
    pub fn new(cni_bin_dir: impl Into<PathBuf>, cni_conf_dir: impl Into<PathBuf>) -> Self {
        InstallOptions {
            cni_bin_dir: cni_bin_dir.into(),
            cni_conf_dir: cni_conf_dir.into(),
            plugin_binary: None,
            socket: DEFAULT_SOCKET.into(),
            fail_open: false,
            conf_file: None,
            exclude_namespaces: Vec::new(),
            wait_seconds: 300,
        }
    }

    /// The binary to copy: --plugin-binary, else `weft-cni` in the running executable's directory.
    pub fn plugin_binary(&self) -> anyhow::Result<PathBuf> {
        if let Some(path) = &self.plugin_binary {
            return Ok(path.clone());
        }
        let exe = std::env::current_exe().context("locating the running executable")?;
        let dir = exe
            .parent()
            .ok_or_else(|| anyhow!("{}: executable without a directory", exe.display()))?;
        Ok(dir.join(PLUGIN_TYPE))
    }

    /// The installed binary's path.
    pub fn installed_binary(&self) -> PathBuf {
        self.cni_bin_dir.join(PLUGIN_TYPE)
    }

    fn checked_conf_file(&self) -> anyhow::Result<Option<&str>> {
        let Some(name) = self.conf_file.as_deref() else {
            return Ok(None);
        };
        if name.is_empty() || name.contains('/') || name == "." || name == ".." {
            bail!("--conf-file {name:?}: must be a file name in --cni-conf-dir, without '/'");
        }
        if conf_extension(name).is_none() {
            bail!("--conf-file {name:?}: the runtime only reads *.conf, *.conflist and *.json");
        }
        Ok(Some(name))
    }
}

/// weft-cni's entry in a configuration list, as text and as the value it parses to.
struct Entry {
    text: String,
    value: Value,
}

impl Entry {
    fn new(opts: &InstallOptions) -> anyhow::Result<Self> {
        let socket = opts.socket.to_str().ok_or_else(|| {
            anyhow!(
                "--socket {}: not valid UTF-8",
                opts.socket.to_string_lossy()
            )
        })?;
        if !opts.socket.is_absolute() {
            bail!("--socket {socket}: must be an absolute path (the plugin runs on the node)");
        }
        let excluded: Vec<&str> = opts
            .exclude_namespaces
            .iter()
            .map(|n| n.trim())
            .filter(|n| !n.is_empty())
            .collect();
        let exclude = if excluded.is_empty() {
            String::new()
        } else {
            format!(", \"excludeNamespaces\": {}", Value::from(excluded))
        };
        let text = format!(
            "{{\"type\": \"{PLUGIN_TYPE}\", \"socket\": {}, \"failOpen\": {}{exclude}}}",
            Value::from(socket),
            opts.fail_open
        );
        let value = serde_json::from_str(&text).expect("the entry is valid JSON");
        Ok(Entry { text, value })
    }
}

/// What `install` did to the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfChange {
    /// The entry was appended to the list.
    Added,
    /// A single-plugin configuration (this file) became the list, with the entry.
    Converted { from: PathBuf },
    /// An entry with other options was replaced in place.
    Replaced,
    /// The entry was there already, as wanted: nothing was written.
    Unchanged,
}

/// What `install` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstallOutcome {
    /// The configuration list that now holds the entry.
    pub conf_path: PathBuf,
    pub conf: ConfChange,
    /// The installed plugin binary.
    pub binary_path: PathBuf,
    /// Whether the binary was (re)written; false when it was there with the same bytes.
    pub binary_copied: bool,
}

impl InstallOutcome {
    /// Whether anything on the node changed.
    pub fn changed(&self) -> bool {
        self.binary_copied || self.conf != ConfChange::Unchanged
    }
}

impl fmt::Display for InstallOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let conf = self.conf_path.display();
        match &self.conf {
            ConfChange::Added => write!(f, "installed {PLUGIN_TYPE} into {conf}")?,
            ConfChange::Converted { from } => write!(
                f,
                "installed {PLUGIN_TYPE} into {conf} (converted from {})",
                from.display()
            )?,
            ConfChange::Replaced => write!(f, "updated the {PLUGIN_TYPE} entry in {conf}")?,
            ConfChange::Unchanged => write!(f, "{PLUGIN_TYPE} already installed in {conf}")?,
        }
        let binary = self.binary_path.display();
        if self.binary_copied {
            write!(f, "; copied the plugin to {binary}")
        } else {
            write!(f, "; {binary} already up to date")
        }
    }
}

/// Installs the plugin binary and chains the entry into the runtime's network configuration.
/// Waits up to `wait_seconds` for that configuration to appear. Idempotent. Nothing is written
/// when the configuration cannot be used.
pub fn install(opts: &InstallOptions) -> anyhow::Result<InstallOutcome> {
    let entry = Entry::new(opts)?;
    let conf_file = opts.checked_conf_file()?;
    let source = opts.plugin_binary()?;
    let meta = fs::metadata(&source)
        .with_context(|| format!("plugin binary {}: cannot be read", source.display()))?;
    if !meta.is_file() {
        bail!("plugin binary {}: not a regular file", source.display());
    }
    if !opts.cni_bin_dir.is_dir() {
        bail!(
            "CNI bin dir {}: not a directory (is the node's directory mounted?)",
            opts.cni_bin_dir.display()
        );
    }

    let path = wait_for_config(&opts.cni_conf_dir, conf_file, opts.wait_seconds)?;
    let text = read_config(&path)?;
    let plan = plan_install(&path, &text, &entry)?;

    // The binary first: once the entry is in place, the runtime calls the plugin.
    remove_stale_temps(&opts.cni_bin_dir);
    let binary_copied = install_binary(&source, &opts.cni_bin_dir)?;

    remove_stale_temps(&opts.cni_conf_dir);
    let like = fs::metadata(&path).with_context(|| format!("{}", path.display()))?;
    match &plan.change {
        ConfChange::Unchanged => {}
        ConfChange::Added | ConfChange::Replaced => {
            write_atomic(&path, plan.text.as_bytes(), &like)?;
        }
        ConfChange::Converted { .. } => {
            // As istio-cni does: the list first replaces the single conf under its own name,
            // then one rename gives it the .conflist name and makes the .conf disappear. In
            // between, the runtime would find a .conf without "type" and refuse to start pods
            // (rather than start them uncaptured from the old conf); a run interrupted there
            // is completed by the next one (plan_install).
            write_atomic(&path, plan.text.as_bytes(), &like)?;
            rename(&path, &plan.target)?;
            sync_dir(&opts.cni_conf_dir)?;
        }
    }
    let outcome = InstallOutcome {
        conf_path: plan.target,
        conf: plan.change,
        binary_path: opts.installed_binary(),
        binary_copied,
    };
    tracing::info!(%outcome, "CNI plugin installation");
    Ok(outcome)
}

/// Removes weft-cni's entry from the configuration lists of the configuration directory (only
/// the named file and its `.conflist` sibling with --conf-file), then the plugin binary. Every
/// other plugin and key stays. Idempotent: nothing installed is fine. The binary stays when an
/// entry could not be removed, so that entry keeps working.
pub fn uninstall(opts: &InstallOptions) -> anyhow::Result<()> {
    let conf_file = opts.checked_conf_file()?;
    let dir = &opts.cni_conf_dir;
    let candidates: Vec<PathBuf> = match conf_file {
        Some(name) => {
            let mut names = vec![name.to_owned()];
            names.extend(conflist_name(name));
            names.into_iter().map(|n| dir.join(n)).collect()
        }
        None => config_names(dir)?
            .into_iter()
            .filter(|n| n.ends_with(".conflist"))
            .map(|n| dir.join(n))
            .collect(),
    };
    for path in candidates {
        if !path.is_file() {
            continue;
        }
        let text = read_config(&path)?;
        if !text.contains(PLUGIN_TYPE) {
            continue;
        }
        if conf_extension(&path.to_string_lossy()) != Some("conflist") && !is_list(&text) {
            continue; // a single-plugin configuration: not ours to edit
        }
        if let Some(new) = plan_uninstall(&path, &text)? {
            let like = fs::metadata(&path).with_context(|| format!("{}", path.display()))?;
            write_atomic(&path, new.as_bytes(), &like)?;
            tracing::info!(path = %path.display(), "removed the {PLUGIN_TYPE} entry");
        }
    }
    remove_stale_temps(dir);

    let binary = opts.installed_binary();
    match fs::remove_file(&binary) {
        Ok(()) => tracing::info!(path = %binary.display(), "removed the plugin binary"),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing {}", binary.display())),
    }
    remove_stale_temps(&opts.cni_bin_dir);
    Ok(())
}

// ---- choosing the configuration file ------------------------------------------------------

fn conf_extension(name: &str) -> Option<&'static str> {
    let (_, ext) = name.rsplit_once('.')?;
    CONF_EXTENSIONS.into_iter().find(|e| *e == ext)
}

/// `x.conf` / `x.json` → `x.conflist`.
fn conflist_name(name: &str) -> Option<String> {
    let stem = name
        .strip_suffix(".conf")
        .or_else(|| name.strip_suffix(".json"))?;
    Some(format!("{stem}.conflist"))
}

/// The configuration files of `dir` in the order the runtime considers them.
fn config_names(dir: &Path) -> anyhow::Result<Vec<String>> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("listing {}", dir.display())),
    };
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.with_context(|| format!("listing {}", dir.display()))?;
        let Ok(name) = entry.file_name().into_string() else {
            continue;
        };
        // is_file follows symbolic links, as the runtime does; directories are skipped.
        if conf_extension(&name).is_some() && entry.path().is_file() {
            names.push(name);
        }
    }
    names.sort();
    Ok(names)
}

fn find_config(dir: &Path, conf_file: Option<&str>) -> anyhow::Result<Option<PathBuf>> {
    let Some(name) = conf_file else {
        return Ok(config_names(dir)?.into_iter().next().map(|n| dir.join(n)));
    };
    // A .conf named on the command line is a .conflist after the first install; a .conflist
    // named may still be the primary plugin's .conf.
    let mut names = vec![name.to_owned()];
    names.extend(conflist_name(name));
    if let Some(stem) = name.strip_suffix(".conflist") {
        names.push(format!("{stem}.conf"));
    }
    Ok(names.into_iter().map(|n| dir.join(n)).find(|p| p.is_file()))
}

fn wait_for_config(
    dir: &Path,
    conf_file: Option<&str>,
    wait_seconds: u64,
) -> anyhow::Result<PathBuf> {
    let deadline = Instant::now() + Duration::from_secs(wait_seconds);
    let mut waiting = false;
    loop {
        if let Some(path) = find_config(dir, conf_file)? {
            return Ok(path);
        }
        let now = Instant::now();
        if now >= deadline {
            let what = match conf_file {
                Some(name) => name.to_owned(),
                None => "network configuration (*.conf, *.conflist, *.json)".to_owned(),
            };
            bail!(
                "no CNI {what} in {} after {wait_seconds} s: is the primary network plugin installed?",
                dir.display()
            );
        }
        if !waiting {
            tracing::info!(dir = %dir.display(), "waiting for the primary network plugin's configuration");
            waiting = true;
        }
        std::thread::sleep(POLL.min(deadline - now));
    }
}

fn read_config(path: &Path) -> anyhow::Result<String> {
    let bytes = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    String::from_utf8(bytes).map_err(|_| anyhow!("{}: not UTF-8 text", path.display()))
}

// ---- planning the edit (pure) -------------------------------------------------------------

struct Plan {
    /// The file that holds the entry afterwards.
    target: PathBuf,
    /// Its new contents (the current ones when unchanged).
    text: String,
    change: ConfChange,
}

fn plan_install(path: &Path, text: &str, entry: &Entry) -> anyhow::Result<Plan> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let Some(list_name) = conflist_name(&name) else {
        let (text, change) = add_entry(path, text, entry)?;
        return Ok(Plan {
            target: path.to_owned(),
            text,
            change,
        });
    };
    let target = path.with_file_name(list_name);
    let converted = ConfChange::Converted {
        from: path.to_owned(),
    };
    if is_list(text) && has_entry(text) {
        // A conversion interrupted between its two renames: the .conf holds our list already.
        let (text, _) = add_entry(path, text, entry)?;
        return Ok(Plan {
            target,
            text,
            change: converted,
        });
    }
    let text = conf_to_conflist(path, text, entry)?;
    Ok(Plan {
        target,
        text,
        change: converted,
    })
}

fn plan_uninstall(path: &Path, text: &str) -> anyhow::Result<Option<String>> {
    let list = ConfList::parse(path, text)?;
    let ours = list.ours();
    if ours.is_empty() {
        return Ok(None);
    }
    if ours.len() == list.plugins.len() {
        bail!(
            "{}: {PLUGIN_TYPE} is the only plugin in \"plugins\"; not removing it (the list would \
             be empty and unusable); delete the file if it is not needed",
            path.display()
        );
    }
    let new = apply_edits(text, list.removals(&ours));
    verify(path, &list, &new, None)?;
    Ok(Some(new))
}

/// Adds or replaces the entry in a configuration list's text.
fn add_entry(path: &Path, text: &str, entry: &Entry) -> anyhow::Result<(String, ConfChange)> {
    let list = ConfList::parse(path, text)?;
    let ours = list.ours();
    let (edits, change) = match ours.as_slice() {
        [] => {
            let n = list.elements.len();
            let last = list.elements[n - 1];
            // The separator the list already uses ("," and the indentation).
            let sep = if n >= 2 {
                text[list.elements[n - 2].end..last.start].to_owned()
            } else {
                format!(",{}", &text[list.array.start + 1..last.start])
            };
            let insert = format!("{sep}{}", entry.text);
            (vec![(last.end..last.end, insert)], ConfChange::Added)
        }
        [one] if list.plugins[*one] == entry.value => (Vec::new(), ConfChange::Unchanged),
        [first, rest @ ..] => {
            let span = list.elements[*first];
            let mut edits = list.removals(rest);
            edits.push((span.start..span.end, entry.text.clone()));
            (edits, ConfChange::Replaced)
        }
    };
    if change == ConfChange::Unchanged {
        return Ok((text.to_owned(), change));
    }
    let new = apply_edits(text, edits);
    verify(path, &list, &new, Some(&entry.value))?;
    Ok((new, change))
}

/// A single-plugin configuration as the list the runtime reads it as, plus the entry.
fn conf_to_conflist(path: &Path, text: &str, entry: &Entry) -> anyhow::Result<String> {
    let p = path.display();
    let conf = parse_object(path, text)?;
    match conf.get("type") {
        Some(Value::String(t)) if !t.is_empty() => {
            if t == PLUGIN_TYPE {
                bail!("{p}: the single plugin is {PLUGIN_TYPE} itself; it must follow a network plugin");
            }
        }
        Some(_) => bail!("{p}: \"type\" is not a non-empty string"),
        None if conf.contains_key("plugins") => bail!(
            "{p}: has \"plugins\" but no \"type\": a configuration list must be named *.conflist"
        ),
        None => bail!("{p}: no \"type\": not a CNI network configuration"),
    }
    let name = match conf.get("name") {
        Some(Value::String(n)) if !n.is_empty() => n,
        _ => bail!("{p}: no \"name\" (string): a network configuration needs one"),
    };
    let mut out = String::from("{\n");
    match conf.get("cniVersion") {
        Some(v @ Value::String(_)) => out.push_str(&format!("  \"cniVersion\": {v},\n")),
        Some(_) => bail!("{p}: \"cniVersion\" is not a string"),
        None => {}
    }
    out.push_str(&format!("  \"name\": {},\n", Value::from(name.as_str())));
    out.push_str("  \"plugins\": [\n    ");
    // Re-indented by adding spaces after line breaks: JSON strings hold no raw line breaks, so
    // only whitespace between tokens changes.
    out.push_str(&text.trim().replace('\n', "\n    "));
    out.push_str(",\n    ");
    out.push_str(&entry.text);
    out.push_str("\n  ]\n}\n");

    let list = ConfList::parse(path, &out)
        .with_context(|| format!("{p}: internal error converting to a list"))?;
    if list.plugins.len() != 2
        || list.plugins[0] != Value::Object(conf)
        || list.plugins[1] != entry.value
    {
        bail!("{p}: internal error converting to a list: the result does not read back");
    }
    Ok(out)
}

fn parse_object(path: &Path, text: &str) -> anyhow::Result<Map<String, Value>> {
    let value: Value = serde_json::from_str(text)
        .map_err(|e| anyhow!("{}: not valid JSON: {e}", path.display()))?;
    match value {
        Value::Object(map) => Ok(map),
        _ => bail!("{}: not a JSON object", path.display()),
    }
}

fn is_list(text: &str) -> bool {
    matches!(serde_json::from_str::<Value>(text), Ok(Value::Object(m)) if !m.contains_key("type") && m.contains_key("plugins"))
}

fn has_entry(text: &str) -> bool {
    let Ok(Value::Object(m)) = serde_json::from_str::<Value>(text) else {
        return false;
    };
    m.get("plugins")
        .and_then(Value::as_array)
        .is_some_and(|ps| ps.iter().any(is_ours))
}

fn is_ours(plugin: &Value) -> bool {
    plugin.get("type").and_then(Value::as_str) == Some(PLUGIN_TYPE)
}

/// A parsed configuration list and where its plugins are in the text.
struct ConfList {
    top: Map<String, Value>,
    plugins: Vec<Value>,
    /// The `[ ... ]` of "plugins".
    array: Span,
    elements: Vec<Span>,
}

impl ConfList {
    /// Parses and checks what the runtime checks (libcni): an object with a "name", a non-empty
    /// "plugins" list of objects each with a "type".
    fn parse(path: &Path, text: &str) -> anyhow::Result<Self> {
        let p = path.display();
        let top = parse_object(path, text)?;
        match top.get("name") {
            Some(Value::String(n)) if !n.is_empty() => {}
            _ => bail!("{p}: no \"name\" (string): not a usable CNI configuration list"),
        }
        if top.get("cniVersion").is_some_and(|v| !v.is_string()) {
            bail!("{p}: \"cniVersion\" is not a string");
        }
        let plugins = match top.get("plugins") {
            None if top.contains_key("type") => bail!(
                "{p}: a single-plugin configuration (it has \"type\", no \"plugins\") in a \
                 *.conflist file; name it *.conf"
            ),
            None => bail!("{p}: no \"plugins\" list: not a CNI configuration list"),
            Some(Value::Array(a)) if a.is_empty() => {
                bail!("{p}: \"plugins\" is empty: the runtime would not use this file")
            }
            Some(Value::Array(a)) => a.clone(),
            Some(_) => bail!("{p}: \"plugins\" is not a list"),
        };
        for (i, plugin) in plugins.iter().enumerate() {
            match plugin.get("type") {
                _ if !plugin.is_object() => bail!("{p}: plugins[{i}] is not an object"),
                Some(Value::String(t)) if !t.is_empty() => {}
                _ => bail!("{p}: plugins[{i}] has no \"type\" (non-empty string)"),
            }
        }
        let (array, elements) = locate_plugins(text)
            .map_err(|e| anyhow!("{p}: {e}"))?
            .ok_or_else(|| anyhow!("{p}: no \"plugins\" list"))?;
        if elements.len() != plugins.len() {
            bail!("{p}: internal error locating the plugins in the text");
        }
        Ok(ConfList {
            top,
            plugins,
            array,
            elements,
        })
    }

    /// Indexes of weft-cni entries.
    fn ours(&self) -> Vec<usize> {
        (0..self.plugins.len())
            .filter(|i| is_ours(&self.plugins[*i]))
            .collect()
    }

    /// Edits removing the given elements (sorted indexes, not all of them) with their separators.
    fn removals(&self, remove: &[usize]) -> Vec<(std::ops::Range<usize>, String)> {
        let e = &self.elements;
        let mut edits = Vec::new();
        let mut i = 0;
        while i < remove.len() {
            // A run of consecutive removed elements [a, b].
            let a = remove[i];
            let mut b = a;
            while i + 1 < remove.len() && remove[i + 1] == b + 1 {
                i += 1;
                b += 1;
            }
            i += 1;
            let range = if a > 0 {
                e[a - 1].end..e[b].end // ", <elements>" after the kept one before
            } else if b + 1 < e.len() {
                e[a].start..e[b + 1].start // "<elements>, " before the kept one after
            } else {
                e[a].start..e[b].end
            };
            edits.push((range, String::new()));
        }
        edits
    }
}

/// Checks that `new` is a valid list holding the same keys and other plugins as `old`, in the
/// same order, and exactly one entry equal to `entry` (none when `entry` is None).
fn verify(path: &Path, old: &ConfList, new: &str, entry: Option<&Value>) -> anyhow::Result<()> {
    let p = path.display();
    let new = ConfList::parse(path, new).with_context(|| format!("{p}: internal error editing"))?;
    let without_plugins = |m: &Map<String, Value>| {
        let mut m = m.clone();
        m.remove("plugins");
        m
    };
    let others = |l: &ConfList| -> Vec<Value> {
        l.plugins.iter().filter(|v| !is_ours(v)).cloned().collect()
    };
    let ours: Vec<&Value> = new.plugins.iter().filter(|v| is_ours(v)).collect();
    let entry_ok = match entry {
        Some(want) => ours.len() == 1 && ours[0] == want,
        None => ours.is_empty(),
    };
    if without_plugins(&old.top) != without_plugins(&new.top)
        || others(old) != others(&new)
        || !entry_ok
    {
        bail!("{p}: internal error editing: the result does not keep the file's contents");
    }
    Ok(())
}

fn apply_edits(text: &str, mut edits: Vec<(std::ops::Range<usize>, String)>) -> String {
    edits.sort_by_key(|(r, _)| std::cmp::Reverse(r.start));
    let mut out = text.to_owned();
    for (range, with) in edits {
        out.replace_range(range, &with);
    }
    out
}

// ---- locating values in JSON text ---------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Span {
    start: usize,
    end: usize,
}

/// The span of the top-level "plugins" array and of each of its elements. The text must be
/// valid JSON (checked with serde_json before), whose nesting serde_json also bounds.
fn locate_plugins(text: &str) -> Result<Option<(Span, Vec<Span>)>, String> {
    let mut sc = Scanner {
        s: text.as_bytes(),
        i: 0,
    };
    sc.ws();
    let mut found = None;
    for (key, value) in sc.members()? {
        let key: String =
            serde_json::from_str(&text[key.start..key.end]).map_err(|e| e.to_string())?;
        if key == "plugins" {
            if found.is_some() {
                return Err("\"plugins\" appears more than once".into());
            }
            found = Some(value);
        }
    }
    let Some(array) = found else { return Ok(None) };
    let mut sc = Scanner {
        s: text.as_bytes(),
        i: array.start,
    };
    let elements = sc.elements()?;
    Ok(Some((array, elements)))
}

struct Scanner<'a> {
    s: &'a [u8],
    i: usize,
}

impl Scanner<'_> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }

    fn ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.i += 1;
        }
    }

    fn expect(&mut self, c: u8) -> Result<(), String> {
        self.ws();
        if self.peek() == Some(c) {
            self.i += 1;
            Ok(())
        } else {
            Err(format!("expected '{}' at byte {}", c as char, self.i))
        }
    }

    fn value(&mut self) -> Result<Span, String> {
        self.ws();
        let start = self.i;
        match self.peek() {
            Some(b'{') => {
                self.members()?;
            }
            Some(b'[') => {
                self.elements()?;
            }
            Some(b'"') => self.string()?,
            Some(_) => {
                while !matches!(
                    self.peek(),
                    None | Some(b',' | b']' | b'}' | b' ' | b'\t' | b'\n' | b'\r')
                ) {
                    self.i += 1;
                }
            }
            None => return Err("unexpected end".into()),
        }
        Ok(Span { start, end: self.i })
    }

    fn string(&mut self) -> Result<(), String> {
        self.expect(b'"')?;
        loop {
            match self.peek() {
                Some(b'\\') => self.i += 2,
                Some(b'"') => {
                    self.i += 1;
                    return Ok(());
                }
                Some(_) => self.i += 1,
                None => return Err("unterminated string".into()),
            }
        }
    }

    /// An object's members as (key span, value span).
    fn members(&mut self) -> Result<Vec<(Span, Span)>, String> {
        self.expect(b'{')?;
        let mut out = Vec::new();
        self.ws();
        if self.peek() == Some(b'}') {
            self.i += 1;
            return Ok(out);
        }
        loop {
            self.ws();
            let start = self.i;
            self.string()?;
            let key = Span { start, end: self.i };
            self.expect(b':')?;
            out.push((key, self.value()?));
            self.ws();
            match self.peek() {
                Some(b',') => self.i += 1,
                Some(b'}') => {
                    self.i += 1;
                    return Ok(out);
                }
                _ => return Err(format!("expected ',' or '}}' at byte {}", self.i)),
            }
        }
    }

    fn elements(&mut self) -> Result<Vec<Span>, String> {
        self.expect(b'[')?;
        let mut out = Vec::new();
        self.ws();
        if self.peek() == Some(b']') {
            self.i += 1;
            return Ok(out);
        }
        loop {
            out.push(self.value()?);
            self.ws();
            match self.peek() {
                Some(b',') => self.i += 1,
                Some(b']') => {
                    self.i += 1;
                    return Ok(out);
                }
                _ => return Err(format!("expected ',' or ']' at byte {}", self.i)),
            }
        }
    }
}

// ---- files --------------------------------------------------------------------------------

/// A temporary file that is removed unless it was renamed into place.
struct Temp {
    path: PathBuf,
    keep: bool,
}

impl Drop for Temp {
    fn drop(&mut self) {
        if !self.keep {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// Writes `contents` to a new temporary file in `dir` (mode `mode`, owner `owner`), synced.
fn write_temp(
    dir: &Path,
    name: &str,
    contents: &[u8],
    mode: u32,
    owner: Option<(u32, u32)>,
) -> anyhow::Result<Temp> {
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let path = dir.join(format!(
        "{TEMP_PREFIX}{name}.{}.{nanos}{TEMP_SUFFIX}",
        std::process::id()
    ));
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("creating {}", path.display()))?;
    let temp = Temp { path, keep: false };
    let ctx = || format!("writing {}", temp.path.display());
    file.write_all(contents).with_context(ctx)?;
    // fchmod: not subject to the umask, unlike the mode given at creation.
    file.set_permissions(fs::Permissions::from_mode(mode))
        .with_context(ctx)?;
    if let Some((uid, gid)) = owner {
        let meta = file.metadata().with_context(ctx)?;
        if (meta.uid(), meta.gid()) != (uid, gid) {
            if let Err(e) = std::os::unix::fs::fchown(&file, Some(uid), Some(gid)) {
                tracing::warn!(path = %temp.path.display(), "cannot keep the file's owner {uid}:{gid}: {e}");
            }
        }
    }
    file.sync_all().with_context(ctx)?;
    Ok(temp)
}

/// Replaces `path` with `contents` atomically, with the mode and owner of `like`.
fn write_atomic(path: &Path, contents: &[u8], like: &fs::Metadata) -> anyhow::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mode = like.permissions().mode() & 0o7777;
    let mut temp = write_temp(dir, &name, contents, mode, Some((like.uid(), like.gid())))?;
    rename(&temp.path, path)?;
    temp.keep = true;
    sync_dir(dir)
}

fn rename(from: &Path, to: &Path) -> anyhow::Result<()> {
    fs::rename(from, to).with_context(|| format!("renaming {} to {}", from.display(), to.display()))
}

fn sync_dir(dir: &Path) -> anyhow::Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("syncing directory {}", dir.display()))
}

/// Copies the plugin into `bin_dir` (mode 0755, atomically); false when it was there already.
fn install_binary(source: &Path, bin_dir: &Path) -> anyhow::Result<bool> {
    let contents = fs::read(source)
        .with_context(|| format!("reading the plugin binary {}", source.display()))?;
    if contents.is_empty() {
        bail!("plugin binary {}: empty file", source.display());
    }
    let target = bin_dir.join(PLUGIN_TYPE);
    if let Ok(meta) = fs::symlink_metadata(&target) {
        if meta.is_file()
            && meta.permissions().mode() & 0o7777 == 0o755
            && fs::read(&target).ok().as_ref() == Some(&contents)
        {
            return Ok(false);
        }
    }
    // A running plugin keeps its (old) inode: replacing by rename never fails with ETXTBSY.
    let mut temp = write_temp(bin_dir, PLUGIN_TYPE, &contents, 0o755, None)?;
    rename(&temp.path, &target)?;
    temp.keep = true;
    sync_dir(bin_dir)?;
    Ok(true)
}

/// Removes temporary files of interrupted runs (old enough not to belong to a live one).
fn remove_stale_temps(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if !(name.starts_with(TEMP_PREFIX) && name.ends_with(TEMP_SUFFIX)) {
            continue;
        }
        let old = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > STALE_TEMP);
        if old {
            let _ = fs::remove_file(entry.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

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
      "ipam": {
        "type": "calico-ipam"
      },
      "kubernetes": {
        "kubeconfig": "/etc/cni/net.d/calico-kubeconfig"
      }
    },
    {
      "type": "portmap",
      "snat": true,
      "capabilities": {"portMappings": true}
    }
  ],
  "zzz-extra": {"keep": ["me", 1, null, "],}{\"plugins\": []"]}
}
"#;

    const ENTRY: &str =
        r#"{"type": "weft-cni", "socket": "/var/run/weft/cni.sock", "failOpen": false}"#;

    struct Node {
        _tmp: tempfile::TempDir,
        opts: InstallOptions,
    }

    impl Node {
        fn new() -> Self {
            let tmp = tempfile::tempdir().unwrap();
            let bin = tmp.path().join("bin");
            let conf = tmp.path().join("net.d");
            fs::create_dir(&bin).unwrap();
            fs::create_dir(&conf).unwrap();
            let source = tmp.path().join("weft-cni-build");
            fs::write(&source, b"#!/bin/sh\necho weft-cni\n").unwrap();
            let mut opts = InstallOptions::new(bin, conf);
            opts.plugin_binary = Some(source);
            opts.wait_seconds = 0;
            Node { _tmp: tmp, opts }
        }

        fn conf(&self, name: &str) -> PathBuf {
            self.opts.cni_conf_dir.join(name)
        }

        fn write(&self, name: &str, text: &str) -> PathBuf {
            let path = self.conf(name);
            fs::write(&path, text).unwrap();
            path
        }

        fn read(&self, name: &str) -> String {
            fs::read_to_string(self.conf(name)).unwrap()
        }

        /// File names in the configuration and bin directories (temporary files included).
        fn listing(&self) -> Vec<String> {
            let mut names = Vec::new();
            for dir in [&self.opts.cni_conf_dir, &self.opts.cni_bin_dir] {
                for e in fs::read_dir(dir).unwrap() {
                    names.push(e.unwrap().file_name().to_string_lossy().into_owned());
                }
            }
            names.sort();
            names
        }
    }

    fn json(text: &str) -> Value {
        serde_json::from_str(text).unwrap()
    }

    #[test]
    fn conflist_gets_the_entry_appended_and_keeps_everything_else_byte_for_byte() {
        let node = Node::new();
        let path = node.write("10-calico.conflist", CALICO_CONFLIST);
        fs::set_permissions(&path, fs::Permissions::from_mode(0o640)).unwrap();

        let outcome = install(&node.opts).unwrap();
        assert_eq!(outcome.conf, ConfChange::Added);
        assert_eq!(outcome.conf_path, path);
        assert!(outcome.binary_copied);
        assert_eq!(
            outcome.to_string(),
            format!(
                "installed weft-cni into {}; copied the plugin to {}",
                path.display(),
                node.opts.installed_binary().display()
            )
        );
        let want = CALICO_CONFLIST.replace(
            "      \"capabilities\": {\"portMappings\": true}\n    }\n",
            &format!("      \"capabilities\": {{\"portMappings\": true}}\n    }},\n    {ENTRY}\n"),
        );
        assert_ne!(want, CALICO_CONFLIST);
        assert_eq!(node.read("10-calico.conflist"), want);
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o7777,
            0o640
        );

        let binary = node.opts.installed_binary();
        assert_eq!(fs::read(&binary).unwrap(), b"#!/bin/sh\necho weft-cni\n");
        assert_eq!(
            fs::metadata(&binary).unwrap().permissions().mode() & 0o7777,
            0o755
        );
        assert_eq!(node.listing(), ["10-calico.conflist", "weft-cni"]);
    }

    #[test]
    fn single_conf_becomes_a_conflist_as_the_runtime_reads_it() {
        let node = Node::new();
        let conf = node.write("10-flannel.conf", FLANNEL_CONF);
        fs::set_permissions(&conf, fs::Permissions::from_mode(0o600)).unwrap();

        let outcome = install(&node.opts).unwrap();
        let list_path = node.conf("10-flannel.conflist");
        assert_eq!(outcome.conf, ConfChange::Converted { from: conf.clone() });
        assert_eq!(outcome.conf_path, list_path);
        assert!(outcome.to_string().starts_with(&format!(
            "installed weft-cni into {} (converted from {})",
            list_path.display(),
            conf.display()
        )));
        assert!(!conf.exists(), "the .conf is renamed away");
        assert_eq!(node.listing(), ["10-flannel.conflist", "weft-cni"]);

        let text = node.read("10-flannel.conflist");
        let list = json(&text);
        assert_eq!(list["cniVersion"], "0.3.1");
        assert_eq!(list["name"], "cbr0");
        assert_eq!(
            list["plugins"][0],
            json(FLANNEL_CONF),
            "the conf is the first plugin, whole"
        );
        assert_eq!(list["plugins"][1], json(ENTRY));
        assert_eq!(list["plugins"].as_array().unwrap().len(), 2);
        assert_eq!(list.as_object().unwrap().len(), 3);
        assert!(text.contains(&format!("    {ENTRY}\n  ]\n}}\n")), "{text}");
        assert_eq!(
            fs::metadata(&list_path).unwrap().permissions().mode() & 0o7777,
            0o600
        );

        // Again: nothing changes, and the conflist is what the runtime now finds.
        let again = install(&node.opts).unwrap();
        assert_eq!(again.conf, ConfChange::Unchanged);
        assert_eq!(node.read("10-flannel.conflist"), text);
    }

    #[test]
    fn json_extension_is_a_single_conf_too() {
        let node = Node::new();
        node.write("05-bridge.json", FLANNEL_CONF);
        let outcome = install(&node.opts).unwrap();
        assert_eq!(outcome.conf_path, node.conf("05-bridge.conflist"));
        assert_eq!(node.listing(), ["05-bridge.conflist", "weft-cni"]);
    }

    #[test]
    fn conf_without_cni_version_gives_a_list_without_one() {
        let node = Node::new();
        node.write("10-x.conf", r#"{"name": "x", "type": "bridge"}"#);
        install(&node.opts).unwrap();
        let list = json(&node.read("10-x.conflist"));
        assert!(list.get("cniVersion").is_none());
        assert_eq!(
            list["plugins"][0],
            json(r#"{"name": "x", "type": "bridge"}"#)
        );
    }

    #[test]
    fn second_install_changes_nothing_byte_for_byte() {
        for (name, text) in [
            ("10-calico.conflist", CALICO_CONFLIST),
            ("10-flannel.conf", FLANNEL_CONF),
        ] {
            let node = Node::new();
            node.write(name, text);
            let first = install(&node.opts).unwrap();
            let bytes = fs::read(&first.conf_path).unwrap();
            let mtime = fs::metadata(&first.conf_path).unwrap().modified().unwrap();
            let binary_mtime = fs::metadata(node.opts.installed_binary())
                .unwrap()
                .modified()
                .unwrap();

            let second = install(&node.opts).unwrap();
            assert_eq!(second.conf, ConfChange::Unchanged);
            assert!(!second.binary_copied);
            assert!(!second.changed());
            assert_eq!(second.conf_path, first.conf_path);
            assert_eq!(
                second.to_string(),
                format!(
                    "weft-cni already installed in {}; {} already up to date",
                    first.conf_path.display(),
                    node.opts.installed_binary().display()
                )
            );
            assert_eq!(fs::read(&first.conf_path).unwrap(), bytes);
            assert_eq!(
                fs::metadata(&first.conf_path).unwrap().modified().unwrap(),
                mtime,
                "not rewritten"
            );
            assert_eq!(
                fs::metadata(node.opts.installed_binary())
                    .unwrap()
                    .modified()
                    .unwrap(),
                binary_mtime
            );
        }
    }

    #[test]
    fn changed_options_replace_the_entry_in_place() {
        let node = Node::new();
        let original = r#"{"cniVersion": "1.0.0", "name": "n", "plugins": [{"type": "ptp"}, {"type": "weft-cni", "socket": "/old.sock", "failOpen": false, "extra": 1}, {"type": "bandwidth"}]}"#;
        node.write("10-n.conflist", original);
        let mut opts = node.opts.clone();
        opts.socket = "/run/weft/other.sock".into();
        opts.fail_open = true;
        let outcome = install(&opts).unwrap();
        assert_eq!(outcome.conf, ConfChange::Replaced);
        assert!(outcome
            .to_string()
            .starts_with("updated the weft-cni entry in"));
        let want = r#"{"cniVersion": "1.0.0", "name": "n", "plugins": [{"type": "ptp"}, {"type": "weft-cni", "socket": "/run/weft/other.sock", "failOpen": true}, {"type": "bandwidth"}]}"#;
        assert_eq!(node.read("10-n.conflist"), want);
        assert_eq!(install(&opts).unwrap().conf, ConfChange::Unchanged);

        // Back to the defaults.
        assert_eq!(install(&node.opts).unwrap().conf, ConfChange::Replaced);
        assert_eq!(
            node.read("10-n.conflist"),
            want.replace(
                r#""/run/weft/other.sock", "failOpen": true"#,
                r#""/var/run/weft/cni.sock", "failOpen": false"#
            )
        );
    }

    #[test]
    fn duplicate_entries_collapse_into_one() {
        let node = Node::new();
        node.write(
            "10-n.conflist",
            r#"{"name": "n", "plugins": [{"type": "weft-cni"}, {"type": "ptp"}, {"type": "weft-cni"}, {"type": "weft-cni", "x": 1}]}"#,
        );
        assert_eq!(install(&node.opts).unwrap().conf, ConfChange::Replaced);
        assert_eq!(
            node.read("10-n.conflist"),
            format!(r#"{{"name": "n", "plugins": [{ENTRY}, {{"type": "ptp"}}]}}"#)
        );
    }

    #[test]
    fn compact_and_single_plugin_lists() {
        let node = Node::new();
        node.write("a.conflist", r#"{"name":"n","plugins":[{"type":"ptp"}]}"#);
        install(&node.opts).unwrap();
        assert_eq!(
            node.read("a.conflist"),
            format!(r#"{{"name":"n","plugins":[{{"type":"ptp"}},{ENTRY}]}}"#)
        );
        uninstall(&node.opts).unwrap();
        assert_eq!(
            node.read("a.conflist"),
            r#"{"name":"n","plugins":[{"type":"ptp"}]}"#
        );

        let multi = "{\"name\": \"n\", \"plugins\": [\n\t{\"type\": \"ptp\"}\n]}\n";
        node.write("a.conflist", multi);
        install(&node.opts).unwrap();
        assert_eq!(
            node.read("a.conflist"),
            format!(
                "{{\"name\": \"n\", \"plugins\": [\n\t{{\"type\": \"ptp\"}},\n\t{ENTRY}\n]}}\n"
            )
        );
    }

    #[test]
    fn uninstall_gives_back_the_original_list() {
        let node = Node::new();
        node.write("10-calico.conflist", CALICO_CONFLIST);
        install(&node.opts).unwrap();
        uninstall(&node.opts).unwrap();
        assert_eq!(node.read("10-calico.conflist"), CALICO_CONFLIST);
        assert_eq!(node.listing(), ["10-calico.conflist"], "binary removed");
        // Idempotent.
        uninstall(&node.opts).unwrap();
        assert_eq!(node.read("10-calico.conflist"), CALICO_CONFLIST);
    }

    #[test]
    fn uninstall_after_conversion_leaves_the_list_minus_weft() {
        let node = Node::new();
        node.write("10-flannel.conf", FLANNEL_CONF);
        install(&node.opts).unwrap();
        uninstall(&node.opts).unwrap();
        let list = json(&node.read("10-flannel.conflist"));
        assert_eq!(list["plugins"], Value::Array(vec![json(FLANNEL_CONF)]));
        assert_eq!(list["name"], "cbr0");
        assert_eq!(node.listing(), ["10-flannel.conflist"]);
    }

    #[test]
    fn uninstall_removes_only_weft_cni_from_every_list_and_touches_nothing_else() {
        let node = Node::new();
        let first = format!(
            r#"{{"name": "a", "plugins": [{ENTRY}, {{"type": "ptp"}}, {{"type": "weft-cni", "socket": "/x"}}, {{"type": "tuning"}}]}}"#
        );
        node.write("10-a.conflist", &first);
        node.write(
            "20-b.conflist",
            r#"{"name": "b", "plugins": [{"type": "ptp"}]}"#,
        );
        let broken = "{ this mentions nothing of ours";
        node.write("30-c.conflist", broken);
        node.write(
            "40-d.conf",
            r#"{"name": "d", "type": "weft-cni-lookalike"}"#,
        );
        uninstall(&node.opts).unwrap();
        assert_eq!(
            node.read("10-a.conflist"),
            r#"{"name": "a", "plugins": [{"type": "ptp"}, {"type": "tuning"}]}"#
        );
        assert_eq!(
            node.read("20-b.conflist"),
            r#"{"name": "b", "plugins": [{"type": "ptp"}]}"#
        );
        assert_eq!(node.read("30-c.conflist"), broken);
    }

    #[test]
    fn uninstall_of_nothing_is_fine() {
        let node = Node::new();
        uninstall(&node.opts).unwrap();
        let mut opts = node.opts.clone();
        opts.cni_conf_dir = node.conf("does-not-exist");
        opts.conf_file = Some("10-x.conf".into());
        uninstall(&opts).unwrap();
    }

    #[test]
    fn uninstall_refuses_to_empty_a_list_and_a_malformed_list_of_ours() {
        let node = Node::new();
        let only = format!(r#"{{"name": "n", "plugins": [{ENTRY}]}}"#);
        node.write("10-n.conflist", &only);
        fs::write(node.opts.installed_binary(), b"x").unwrap();
        let err = uninstall(&node.opts).unwrap_err().to_string();
        assert!(
            err.contains("10-n.conflist") && err.contains("only plugin"),
            "{err}"
        );
        assert_eq!(node.read("10-n.conflist"), only);
        assert!(
            node.opts.installed_binary().exists(),
            "binary kept while an entry remains"
        );

        let broken = r#"{"name": "n", "plugins": [{"type": "weft-cni"},]}"#;
        node.write("10-n.conflist", broken);
        let err = uninstall(&node.opts).unwrap_err().to_string();
        assert!(err.contains("10-n.conflist: not valid JSON"), "{err}");
        assert_eq!(node.read("10-n.conflist"), broken);
    }

    #[test]
    fn malformed_configurations_are_refused_and_left_untouched() {
        let cases: &[(&str, &str, &str)] = &[
            ("10-x.conflist", "", "not valid JSON"),
            (
                "10-x.conflist",
                "{\"name\": \"n\", \"plugins\": [",
                "not valid JSON",
            ),
            (
                "10-x.conflist",
                r#"{"name": "n", "plugins": [{"type": "ptp"}],}"#,
                "not valid JSON",
            ),
            ("10-x.conflist", r#"[{"type": "ptp"}]"#, "not a JSON object"),
            ("10-x.conflist", r#"{"name": "n"}"#, "no \"plugins\" list"),
            (
                "10-x.conflist",
                r#"{"name": "n", "type": "ptp"}"#,
                "name it *.conf",
            ),
            (
                "10-x.conflist",
                r#"{"name": "n", "plugins": {"type": "ptp"}}"#,
                "\"plugins\" is not a list",
            ),
            (
                "10-x.conflist",
                r#"{"name": "n", "plugins": []}"#,
                "\"plugins\" is empty",
            ),
            (
                "10-x.conflist",
                r#"{"name": "n", "plugins": [{"type": "ptp"}, 7]}"#,
                "plugins[1] is not an object",
            ),
            (
                "10-x.conflist",
                r#"{"name": "n", "plugins": [{"ipam": {}}]}"#,
                "plugins[0] has no \"type\"",
            ),
            (
                "10-x.conflist",
                r#"{"plugins": [{"type": "ptp"}]}"#,
                "no \"name\"",
            ),
            (
                "10-x.conflist",
                r#"{"name": "n", "cniVersion": 1, "plugins": [{"type": "ptp"}]}"#,
                "\"cniVersion\" is not a string",
            ),
            (
                "10-x.conflist",
                r#"{"name": "n", "plugins": [{"type": "a"}], "plugins": [{"type": "b"}]}"#,
                "\"plugins\" appears more than once",
            ),
            ("10-x.conf", r#"{"name": "n"}"#, "no \"type\""),
            (
                "10-x.conf",
                r#"{"name": "n", "plugins": [{"type": "ptp"}]}"#,
                "must be named *.conflist",
            ),
            ("10-x.conf", r#"{"type": "ptp"}"#, "no \"name\""),
            (
                "10-x.conf",
                r#"{"name": "n", "type": "weft-cni"}"#,
                "must follow a network plugin",
            ),
            (
                "10-x.conf",
                "{\"name\": \"n\", \"type\": \"ptp\"} trailing",
                "not valid JSON",
            ),
        ];
        for (name, text, reason) in cases {
            let node = Node::new();
            let path = node.write(name, text);
            let err = format!("{:#}", install(&node.opts).unwrap_err());
            assert!(err.contains(&path.display().to_string()), "{text:?}: {err}");
            assert!(err.contains(reason), "{text:?}: want {reason:?} in {err:?}");
            assert_eq!(node.read(name), *text, "left untouched");
            assert_eq!(
                node.listing(),
                [*name],
                "{text:?}: nothing else written (no binary, no temp file)"
            );
        }
        // Not UTF-8.
        let node = Node::new();
        fs::write(node.conf("10-x.conflist"), b"{\"name\": \"\xff\"}").unwrap();
        let err = install(&node.opts).unwrap_err().to_string();
        assert!(err.contains("not UTF-8"), "{err}");
    }

    #[test]
    fn the_runtimes_file_is_the_lexicographically_first() {
        let node = Node::new();
        node.write(
            "20-b.conflist",
            r#"{"name": "b", "plugins": [{"type": "ptp"}]}"#,
        );
        node.write(
            "10-a.conflist",
            r#"{"name": "a", "plugins": [{"type": "ptp"}]}"#,
        );
        node.write("00-ignored.bak", "not a configuration");
        node.write("05-ignored.conflist.tmp", "not a configuration");
        fs::create_dir(node.conf("01-dir.conf")).unwrap();
        let outcome = install(&node.opts).unwrap();
        assert_eq!(outcome.conf_path, node.conf("10-a.conflist"));
        assert!(!node.read("20-b.conflist").contains("weft-cni"));

        // The first one broken: refused, not skipped (containerd would refuse it too).
        let node = Node::new();
        node.write("10-a.conflist", "{");
        node.write(
            "20-b.conflist",
            r#"{"name": "b", "plugins": [{"type": "ptp"}]}"#,
        );
        assert!(install(&node.opts)
            .unwrap_err()
            .to_string()
            .contains("10-a.conflist: not valid JSON"));
        assert!(!node.read("20-b.conflist").contains("weft-cni"));
    }

    #[test]
    fn a_named_conf_file_is_followed_through_its_conversion() {
        let node = Node::new();
        node.write(
            "10-a.conflist",
            r#"{"name": "a", "plugins": [{"type": "ptp"}]}"#,
        );
        node.write("20-flannel.conf", FLANNEL_CONF);
        let mut opts = node.opts.clone();
        opts.conf_file = Some("20-flannel.conf".into());
        assert_eq!(
            install(&opts).unwrap().conf_path,
            node.conf("20-flannel.conflist")
        );
        assert_eq!(install(&opts).unwrap().conf, ConfChange::Unchanged);
        assert!(!node.read("10-a.conflist").contains("weft-cni"));
        // Named by its future name, the .conf is used too.
        let node2 = Node::new();
        node2.write("20-flannel.conf", FLANNEL_CONF);
        let mut opts2 = node2.opts.clone();
        opts2.conf_file = Some("20-flannel.conflist".into());
        assert_eq!(
            install(&opts2).unwrap().conf_path,
            node2.conf("20-flannel.conflist")
        );

        uninstall(&opts).unwrap();
        assert!(!node.read("20-flannel.conflist").contains("weft-cni"));

        for bad in ["../x.conf", "x.txt", ""] {
            opts.conf_file = Some(bad.into());
            assert!(
                install(&opts)
                    .unwrap_err()
                    .to_string()
                    .contains("--conf-file"),
                "{bad}"
            );
        }
    }

    #[test]
    fn an_interrupted_conversion_is_completed() {
        let node = Node::new();
        node.write("10-flannel.conf", FLANNEL_CONF);
        install(&node.opts).unwrap();
        let list = node.read("10-flannel.conflist");
        // As if the run had stopped between its two renames.
        fs::rename(
            node.conf("10-flannel.conflist"),
            node.conf("10-flannel.conf"),
        )
        .unwrap();
        let outcome = install(&node.opts).unwrap();
        assert!(matches!(outcome.conf, ConfChange::Converted { .. }));
        assert_eq!(node.read("10-flannel.conflist"), list);
        assert_eq!(node.listing(), ["10-flannel.conflist", "weft-cni"]);
    }

    #[test]
    fn waits_for_the_primary_configuration() {
        let node = Node::new();
        let err = install(&node.opts).unwrap_err().to_string();
        assert!(
            err.contains(&node.opts.cni_conf_dir.display().to_string())
                && err.contains("primary network plugin"),
            "{err}"
        );
        assert!(!node.opts.installed_binary().exists());

        let mut opts = node.opts.clone();
        opts.wait_seconds = 30;
        let path = node.conf("10-late.conflist");
        let writer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            fs::write(path, r#"{"name": "late", "plugins": [{"type": "ptp"}]}"#).unwrap();
        });
        let start = Instant::now();
        let outcome = install(&opts).unwrap();
        writer.join().unwrap();
        assert_eq!(outcome.conf, ConfChange::Added);
        assert!(start.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn a_changed_binary_is_replaced_and_bad_sources_refused() {
        let node = Node::new();
        node.write(
            "10-a.conflist",
            r#"{"name": "a", "plugins": [{"type": "ptp"}]}"#,
        );
        fs::write(node.opts.installed_binary(), b"old").unwrap();
        let outcome = install(&node.opts).unwrap();
        assert!(outcome.binary_copied);
        assert_eq!(
            fs::read(node.opts.installed_binary()).unwrap(),
            b"#!/bin/sh\necho weft-cni\n"
        );
        // Same bytes, wrong mode: fixed.
        fs::set_permissions(
            node.opts.installed_binary(),
            fs::Permissions::from_mode(0o644),
        )
        .unwrap();
        assert!(install(&node.opts).unwrap().binary_copied);

        let mut opts = node.opts.clone();
        opts.plugin_binary = Some(node.conf("missing"));
        assert!(install(&opts)
            .unwrap_err()
            .to_string()
            .contains("plugin binary"));
        opts.plugin_binary = Some(node.opts.cni_conf_dir.clone());
        assert!(install(&opts)
            .unwrap_err()
            .to_string()
            .contains("not a regular file"));
        let mut opts = node.opts.clone();
        opts.socket = "relative.sock".into();
        assert!(install(&opts).unwrap_err().to_string().contains("absolute"));
        let mut opts = node.opts.clone();
        opts.cni_bin_dir = node.conf("no-bin");
        assert!(install(&opts)
            .unwrap_err()
            .to_string()
            .contains("not a directory"));
    }

    #[test]
    fn entry_text_escapes_the_socket_path() {
        let mut opts = InstallOptions::new("/b", "/c");
        opts.socket = "/run/we\"ft/c.sock".into();
        let entry = Entry::new(&opts).unwrap();
        assert_eq!(entry.value["socket"], "/run/we\"ft/c.sock");
        assert_eq!(
            Entry::new(&InstallOptions::new("/b", "/c")).unwrap().text,
            ENTRY
        );
    }

    #[test]
    fn stale_temporary_files_are_removed_and_fresh_ones_kept() {
        let node = Node::new();
        node.write(
            "10-a.conflist",
            r#"{"name": "a", "plugins": [{"type": "ptp"}]}"#,
        );
        let stale = node.conf(".weft-install.10-a.conflist.1.2.tmp");
        let fresh = node.conf(".weft-install.10-a.conflist.3.4.tmp");
        fs::write(&stale, "x").unwrap();
        fs::write(&fresh, "x").unwrap();
        let old = SystemTime::now() - Duration::from_secs(3600);
        File::options()
            .write(true)
            .open(&stale)
            .unwrap()
            .set_modified(old)
            .unwrap();
        install(&node.opts).unwrap();
        assert!(!stale.exists());
        assert!(fresh.exists());
    }

    #[test]
    fn command_line_defaults_and_flags() {
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            opts: InstallOptions,
        }
        let defaults = Cli::try_parse_from(["weft"]).unwrap().opts;
        assert_eq!(defaults.cni_bin_dir, Path::new("/opt/cni/bin"));
        assert_eq!(defaults.cni_conf_dir, Path::new("/etc/cni/net.d"));
        assert_eq!(defaults.socket, Path::new(DEFAULT_SOCKET));
        assert!(!defaults.fail_open);
        assert_eq!(defaults.wait_seconds, 300);
        assert_eq!(defaults.conf_file, None);
        let exe = std::env::current_exe().unwrap();
        assert_eq!(
            defaults.plugin_binary().unwrap(),
            exe.parent().unwrap().join("weft-cni")
        );

        let set = Cli::try_parse_from([
            "weft",
            "--cni-bin-dir",
            "/host/bin",
            "--cni-conf-dir",
            "/host/net.d",
            "--plugin-binary",
            "/p",
            "--socket",
            "/s.sock",
            "--fail-open",
            "--conf-file",
            "10-x.conflist",
            "--wait-seconds",
            "5",
        ])
        .unwrap()
        .opts;
        assert_eq!(set.cni_bin_dir, Path::new("/host/bin"));
        assert_eq!(set.plugin_binary().unwrap(), Path::new("/p"));
        assert!(set.fail_open);
        assert_eq!(set.conf_file.as_deref(), Some("10-x.conflist"));
        assert_eq!(set.wait_seconds, 5);
        assert!(Entry::new(&set)
            .unwrap()
            .text
            .contains(r#""socket": "/s.sock", "failOpen": true"#));
    }

    #[test]
    fn scanner_finds_elements_whatever_their_strings_hold() {
        let text = r#" { "a": "plugins", "plu\u0067ins" : [ {"x": "]},[{\"\\"}, [1, [2]], "s", 3.5e2 , null ] } "#;
        let (array, elements) = locate_plugins(text).unwrap().unwrap();
        assert!(
            text[array.start..array.end].starts_with('[')
                && text[array.start..array.end].ends_with(']')
        );
        let got: Vec<&str> = elements.iter().map(|s| &text[s.start..s.end]).collect();
        assert_eq!(
            got,
            [
                r#"{"x": "]},[{\"\\"}"#,
                "[1, [2]]",
                r#""s""#,
                "3.5e2",
                "null"
            ]
        );
    }
}
