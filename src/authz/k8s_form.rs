//! The Kubernetes `AuthorizationPolicy` resource (`security.istio.io/v1` and
//! `v1beta1`), from the JSON a watcher hands over or from a YAML stream.
//!
//! The object is walked by hand rather than through derived structs so that
//! every error and warning can name the exact field path
//! (`spec.rules[0].from[1].source.ipBlocks[2]`) and so that unknown fields
//! become warnings instead of being dropped.
//!
//! The conversion follows istiod's translation for ztunnel: a rule's `from`
//! is one clause (a match per source), its `to` another, each `when`
//! condition one more. Where istiod's output would make ztunnel skip a DENY
//! rule whose remaining conditions are empty, weft applies it (fail closed).

use std::collections::BTreeMap;

use serde_json::{Map, Value};

use super::error::AuthzError;
use super::matcher::{parse_ip_block, parse_port, ServiceAccountMatch, StringMatch};
use super::model::{Action, Clause, Match, Policy, Rule, Scope};

const API_VERSIONS: &[&str] = &["security.istio.io/v1", "security.istio.io/v1beta1"];
const DRY_RUN_ANNOTATION: &str = "istio.io/dry-run";

/// Converts one `AuthorizationPolicy` object (as JSON) into a [`Policy`].
///
/// `apiVersion` and `kind` are checked when present. A missing
/// `metadata.namespace` means `default`, as for `kubectl apply`. A namespace-
/// wide policy comes back as [`Scope::Namespace`] even in the root
/// namespace; [`super::PolicySet::new`] knows the root namespace and promotes it.
pub fn from_k8s_value(v: &Value) -> Result<Policy, AuthzError> {
    let obj = v.as_object().ok_or_else(|| AuthzError::InvalidValue {
        policy: "<unnamed>".to_owned(),
        field: "(document)".to_owned(),
        value: kind_of(v).to_owned(),
        reason: "expected a mapping".to_owned(),
    })?;
    let api_version = obj.get("apiVersion").and_then(Value::as_str);
    let kind = obj.get("kind").and_then(Value::as_str);
    if api_version.is_some_and(|a| !API_VERSIONS.contains(&a))
        || kind.is_some_and(|k| k != "AuthorizationPolicy")
    {
        return Err(AuthzError::WrongKind {
            api_version: api_version.unwrap_or_default().to_owned(),
            kind: kind.unwrap_or_default().to_owned(),
        });
    }

    let meta = obj.get("metadata").and_then(Value::as_object);
    let (name, namespace, warnings) = identify(meta)?;
    let mut cx = Cx {
        key: format!("{namespace}/{name}"),
        namespace,
        warnings,
    };
    let dry_run = cx.dry_run(meta);

    let empty = Map::new();
    let spec = match obj.get("spec") {
        None | Some(Value::Null) => &empty,
        Some(v) => cx.object(v, "spec")?,
    };
    cx.check_spec_fields(spec)?;
    let action = cx.action(spec.get("action"))?;
    let scope = cx.scope(spec.get("selector"))?;

    let rules = match spec.get("rules") {
        None | Some(Value::Null) => {
            if action == Action::Deny {
                cx.warnings.push(
                    "spec.rules missing: a DENY policy without rules never matches; add an empty rule `- {}` to deny everything".to_owned(),
                );
            }
            Vec::new()
        }
        Some(v) => {
            let list = cx.array(v, "spec.rules")?;
            let mut rules = Vec::with_capacity(list.len());
            for (i, r) in list.iter().enumerate() {
                if let Some(rule) = cx.rule(action, r, &format!("spec.rules[{i}]"))? {
                    rules.push(rule);
                }
            }
            rules
        }
    };

    Ok(Policy {
        name: name.to_owned(),
        namespace: namespace.to_owned(),
        scope,
        action,
        rules,
        dry_run,
        warnings: cx.warnings,
    })
}

/// `metadata.name` and `metadata.namespace` (defaulted, with a warning).
fn identify(meta: Option<&Map<String, Value>>) -> Result<(&str, &str, Vec<String>), AuthzError> {
    let field = |field: &str| -> Result<Option<&str>, AuthzError> {
        match meta.and_then(|m| m.get(field)) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) if s.is_empty() => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.as_str())),
            Some(other) => Err(AuthzError::InvalidValue {
                policy: "<unnamed>".to_owned(),
                field: format!("metadata.{field}"),
                value: other.to_string(),
                reason: format!("expected a string, found {}", kind_of(other)),
            }),
        }
    };
    let name = field("name")?.ok_or_else(|| AuthzError::Missing {
        policy: "<unnamed>".to_owned(),
        field: "metadata.name".to_owned(),
    })?;
    let mut warnings = Vec::new();
    let namespace = match field("namespace")? {
        Some(ns) => ns,
        None => {
            warnings.push("metadata.namespace missing: using \"default\"".to_owned());
            "default"
        }
    };
    Ok((name, namespace, warnings))
}

/// Parses a multi-document YAML stream of `AuthorizationPolicy` objects.
///
/// Each document yields its own result, so one bad policy is rejected while
/// the others stay in force. Errors carry the 1-based document number and the
/// line it starts on (or the line of a syntax error). Empty documents are
/// skipped.
pub fn parse_k8s_yaml_stream(text: &str) -> Vec<Result<Policy, AuthzError>> {
    yaml_documents(text)
        .into_iter()
        .filter_map(|doc| match doc.value {
            Ok(v) if v.is_null() => None,
            Ok(v) => Some(from_k8s_value(&v).map_err(|e| e.in_document(doc.index, doc.first_line))),
            Err(e) => Some(Err(e)),
        })
        .collect()
}

/// One document of a YAML stream, parsed on its own.
pub struct YamlDocument {
    /// 1-based position in the stream.
    pub index: usize,
    /// Line of the stream where the document's first line of text starts (its `---`, if any).
    pub start_line: usize,
    /// Line of the first line with content, for messages.
    pub first_line: usize,
    pub text: String,
    /// The document as JSON, or its syntax error positioned in the stream.
    pub value: Result<Value, AuthzError>,
}

impl YamlDocument {
    /// Whether the document is a Kubernetes object (it says its `kind`).
    pub fn is_k8s_object(&self) -> bool {
        self.value
            .as_ref()
            .is_ok_and(|v| v.get("kind").is_some() || v.get("apiVersion").is_some())
    }

    /// The document's text with blank lines in front, so that a parser's positions are lines of
    /// the whole stream.
    pub fn padded_text(&self) -> String {
        let mut padded = "\n".repeat(self.start_line.saturating_sub(1));
        padded.push_str(&self.text);
        padded
    }
}

/// Splits a YAML stream into documents and parses each; empty documents are left out.
pub fn yaml_documents(text: &str) -> Vec<YamlDocument> {
    split_documents(text)
        .into_iter()
        .enumerate()
        .map(|(i, doc)| {
            let index = i + 1;
            let value = serde_saphyr::from_str_with_options::<Value>(&doc.text, yaml_options())
                .map_err(|_| yaml_error(index, &doc));
            YamlDocument {
                index,
                start_line: doc.start_line,
                first_line: doc.first_line,
                value,
                text: doc.text,
            }
        })
        .filter(|d| !matches!(&d.value, Ok(Value::Null)))
        .collect()
}

struct Doc {
    text: String,
    /// Line of the document's first line of text (its `---`, if any).
    start_line: usize,
    /// Line of the first line with content, for messages.
    first_line: usize,
}

/// Splits a YAML stream at document markers.
///
/// Splitting by hand (rather than letting the parser read the whole stream)
/// confines a syntax error to its own document. A `---` or `...` at column 0
/// always ends a document in YAML (content of block scalars is indented and
/// markers are forbidden inside quoted scalars), so a line-based split is exact.
fn split_documents(text: &str) -> Vec<Doc> {
    let mut docs = Vec::new();
    let mut cur = Doc {
        text: String::new(),
        start_line: 1,
        first_line: 0,
    };
    let mut flush = |cur: &mut Doc, next_start: usize| {
        let done = std::mem::replace(
            cur,
            Doc {
                text: String::new(),
                start_line: next_start,
                first_line: 0,
            },
        );
        if done.first_line != 0 {
            docs.push(done);
        }
    };
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        if let Some(rest) = marker(line, "---") {
            flush(&mut cur, n);
            // Inline content after `---` belongs to the new document.
            let rest = rest.trim();
            if !rest.is_empty() && !rest.starts_with('#') {
                cur.first_line = n;
            }
        } else if marker(line, "...").is_some() {
            flush(&mut cur, n + 1);
            continue;
        } else if line.starts_with('%') {
            // A directive; weft needs none of them.
            cur.text.push('\n');
            continue;
        } else if cur.first_line == 0 {
            let t = line.trim();
            if !t.is_empty() && !t.starts_with('#') {
                cur.first_line = n;
            }
        }
        cur.text.push_str(line);
        cur.text.push('\n');
    }
    let end = text.lines().count() + 1;
    flush(&mut cur, end);
    docs
}

/// YAML 1.2 booleans only: with YAML 1.1's, `namespace: n` or `values: [y]`
/// would silently become booleans.
fn yaml_options() -> serde_saphyr::Options {
    let mut o = serde_saphyr::Options::default();
    o.strict_booleans = true;
    o
}

/// The rest of `line` if it is the document marker `m` (alone, or followed
/// by white space).
fn marker<'l>(line: &'l str, m: &str) -> Option<&'l str> {
    line.strip_prefix(m)
        .filter(|rest| rest.is_empty() || rest.starts_with([' ', '\t']))
}

/// Builds the error for a document that is not valid YAML.
///
/// The document is parsed again with empty lines in front, so that the
/// parser's message speaks of lines of the whole stream. Only done on this
/// error path: padding every document would be quadratic in the stream size.
fn yaml_error(index: usize, doc: &Doc) -> AuthzError {
    let mut padded = "\n".repeat(doc.start_line.saturating_sub(1));
    padded.push_str(&doc.text);
    let (line, message) =
        match serde_saphyr::from_str_with_options::<Value>(&padded, yaml_options()) {
            Ok(_) => (doc.first_line, "invalid YAML".to_owned()),
            Err(e) => {
                let e = e.without_snippet();
                let line = e
                    .location()
                    .and_then(|l| usize::try_from(l.line()).ok())
                    .unwrap_or(doc.first_line);
                let message = e.to_string();
                let message = message.strip_prefix("error: ").unwrap_or(&message);
                (line, message.to_owned())
            }
        };
    AuthzError::Yaml {
        index,
        line,
        message,
    }
}

/// Go's `strconv.ParseBool`, which Istio uses for the dry-run annotation.
fn parse_go_bool(s: &str) -> Option<bool> {
    match s {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "a mapping",
    }
}

/// Conversion context: the policy being converted and what it collected.
struct Cx<'a> {
    key: String,
    namespace: &'a str,
    warnings: Vec<String>,
}

/// Converts one source or operation mapping (see [`Cx::source`]).
type ConvertFn<C> =
    fn(&mut C, &Map<String, Value>, &str, &mut Unenforceable) -> Result<Option<Match>, AuthzError>;

/// Attributes of one rule that cannot be enforced at L4.
#[derive(Default)]
struct Unenforceable {
    http: Vec<String>,
    unknown: Vec<String>,
}

impl Unenforceable {
    fn is_empty(&self) -> bool {
        self.http.is_empty() && self.unknown.is_empty()
    }

    fn describe(&self) -> String {
        let mut parts = Vec::new();
        if !self.http.is_empty() {
            parts.push(format!("HTTP-only attributes ({})", self.http.join(", ")));
        }
        if !self.unknown.is_empty() {
            parts.push(format!("unknown fields ({})", self.unknown.join(", ")));
        }
        parts.join(" and ")
    }
}

impl Cx<'_> {
    /// The `istio.io/dry-run` annotation, read the way Istio reads it.
    fn dry_run(&mut self, meta: Option<&Map<String, Value>>) -> bool {
        let value = meta
            .and_then(|m| m.get("annotations"))
            .and_then(|a| a.get(DRY_RUN_ANNOTATION));
        match value {
            None | Some(Value::Null) => false,
            Some(v) => match v.as_str().and_then(parse_go_bool).or(v.as_bool()) {
                Some(b) => b,
                None => {
                    // Istio treats an unparsable value as "not dry-run".
                    self.warnings.push(format!(
                        "metadata.annotations.{DRY_RUN_ANNOTATION}: {v} is not a boolean; the policy is enforced"
                    ));
                    false
                }
            },
        }
    }

    /// Refuses what binds the policy elsewhere; warns about unknown fields.
    fn check_spec_fields(&mut self, spec: &Map<String, Value>) -> Result<(), AuthzError> {
        for (k, v) in spec {
            match k.as_str() {
                "selector" | "action" | "rules" => {}
                _ if v.is_null() => {}
                "targetRef" | "targetRefs" => {
                    return Err(AuthzError::Unsupported {
                        policy: self.key.clone(),
                        field: format!("spec.{k}"),
                        reason: "the policy is bound to a waypoint or gateway, not enforced by the node tunnel; use spec.selector".to_owned(),
                    });
                }
                "provider" => {
                    return Err(self.invalid(
                        "spec.provider",
                        v,
                        "only allowed with action CUSTOM, which weft does not support",
                    ));
                }
                _ => self
                    .warnings
                    .push(format!("spec.{k}: unknown field ignored")),
            }
        }
        Ok(())
    }

    fn action(&self, v: Option<&Value>) -> Result<Action, AuthzError> {
        match v {
            None | Some(Value::Null) => Ok(Action::Allow),
            Some(Value::String(s)) if s == "ALLOW" => Ok(Action::Allow),
            Some(Value::String(s)) if s == "DENY" => Ok(Action::Deny),
            Some(other) => Err(AuthzError::UnsupportedAction {
                policy: self.key.clone(),
                action: other
                    .as_str()
                    .map_or_else(|| other.to_string(), str::to_owned),
            }),
        }
    }

    fn invalid(&self, field: &str, value: &Value, reason: &str) -> AuthzError {
        let value = match value {
            Value::String(s) => format!("{s:?}"),
            other => other.to_string(),
        };
        AuthzError::InvalidValue {
            policy: self.key.clone(),
            field: field.to_owned(),
            value,
            reason: reason.to_owned(),
        }
    }

    fn object<'v>(&self, v: &'v Value, field: &str) -> Result<&'v Map<String, Value>, AuthzError> {
        v.as_object().ok_or_else(|| {
            self.invalid(
                field,
                v,
                &format!("expected a mapping, found {}", kind_of(v)),
            )
        })
    }

    fn array<'v>(&self, v: &'v Value, field: &str) -> Result<&'v [Value], AuthzError> {
        v.as_array().map(Vec::as_slice).ok_or_else(|| {
            self.invalid(field, v, &format!("expected a list, found {}", kind_of(v)))
        })
    }

    /// A list of non-empty strings. Numbers are taken as written, since an
    /// unquoted `80` in YAML is still meant as the port "80".
    fn strings(&self, v: &Value, field: &str) -> Result<Vec<String>, AuthzError> {
        if v.is_null() {
            return Ok(Vec::new());
        }
        let list = self.array(v, field)?;
        let mut out = Vec::with_capacity(list.len());
        for (i, item) in list.iter().enumerate() {
            let s = match item {
                Value::String(s) => s.clone(),
                Value::Number(n) => n.to_string(),
                Value::Bool(_) => {
                    // YAML reads unquoted yes/no/y/n/on/off as booleans.
                    return Err(self.invalid(
                        &format!("{field}[{i}]"),
                        item,
                        "expected a string, found a boolean (quote the value in YAML)",
                    ));
                }
                other => {
                    return Err(self.invalid(
                        &format!("{field}[{i}]"),
                        other,
                        &format!("expected a string, found {}", kind_of(other)),
                    ))
                }
            };
            if s.is_empty() {
                return Err(self.invalid(&format!("{field}[{i}]"), item, "must not be empty"));
            }
            out.push(s);
        }
        Ok(out)
    }

    fn string_matches(&self, v: &Value, field: &str) -> Result<Vec<StringMatch>, AuthzError> {
        Ok(self
            .strings(v, field)?
            .iter()
            .map(|s| StringMatch::from_istio(s))
            .collect())
    }

    /// Principal patterns, as written (see [`Match::spiffe_uri_warnings`]).
    fn principal_matches(
        &mut self,
        v: &Value,
        field: &str,
    ) -> Result<Vec<StringMatch>, AuthzError> {
        let found = self.string_matches(v, field)?;
        if found.iter().any(StringMatch::is_spiffe_uri) {
            self.warnings.push(format!(
                "{field}: a principal written with spiffe:// never matches; Istio compares principals without it"
            ));
        }
        Ok(found)
    }

    fn ip_blocks(&self, v: &Value, field: &str) -> Result<Vec<ipnet::IpNet>, AuthzError> {
        self.strings(v, field)?
            .iter()
            .enumerate()
            .map(|(i, s)| {
                parse_ip_block(s).map_err(|reason| {
                    self.invalid(&format!("{field}[{i}]"), &Value::String(s.clone()), &reason)
                })
            })
            .collect()
    }

    fn ports(&self, v: &Value, field: &str) -> Result<Vec<u16>, AuthzError> {
        self.strings(v, field)?
            .iter()
            .enumerate()
            .map(|(i, s)| {
                parse_port(s).map_err(|reason| {
                    self.invalid(&format!("{field}[{i}]"), &Value::String(s.clone()), &reason)
                })
            })
            .collect()
    }

    /// `ns/sa`, or `sa` in the policy's own namespace (Istio's rule).
    fn service_accounts(
        &self,
        v: &Value,
        field: &str,
    ) -> Result<Vec<ServiceAccountMatch>, AuthzError> {
        self.strings(v, field)?
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let (ns, sa) = s.split_once('/').unwrap_or((self.namespace, s.as_str()));
                if ns.is_empty() || sa.is_empty() || sa.contains('/') {
                    return Err(self.invalid(
                        &format!("{field}[{i}]"),
                        &Value::String(s.clone()),
                        "expected \"<namespace>/<serviceaccount>\" or \"<serviceaccount>\"",
                    ));
                }
                Ok(ServiceAccountMatch {
                    namespace: ns.to_owned(),
                    service_account: sa.to_owned(),
                })
            })
            .collect()
    }

    fn scope(&mut self, selector: Option<&Value>) -> Result<Scope, AuthzError> {
        let sel = match selector {
            None | Some(Value::Null) => return Ok(Scope::Namespace),
            Some(v) => self.object(v, "spec.selector")?,
        };
        let mut labels = BTreeMap::new();
        for (k, v) in sel {
            match k.as_str() {
                "matchLabels" if !v.is_null() => {
                    for (lk, lv) in self.object(v, "spec.selector.matchLabels")? {
                        let field = format!("spec.selector.matchLabels.{lk}");
                        let lv = lv
                            .as_str()
                            .ok_or_else(|| self.invalid(&field, lv, "label values are strings"))?;
                        labels.insert(lk.clone(), lv.to_owned());
                    }
                }
                _ if v.is_null() => {}
                _ => self
                    .warnings
                    .push(format!("spec.selector.{k}: unknown field ignored")),
            }
        }
        // An empty selector selects every workload of the namespace (of the
        // mesh, in the root namespace): exactly what a namespace-wide policy
        // does. Saying so keeps "selector with no labels" free to mean
        // "attached by name only" for the ztunnel form.
        Ok(if labels.is_empty() {
            Scope::Namespace
        } else {
            Scope::WorkloadSelector {
                match_labels: labels,
            }
        })
    }

    /// One `spec.rules[i]`. `None` when the rule can never match at L4.
    fn rule(&mut self, action: Action, v: &Value, at: &str) -> Result<Option<Rule>, AuthzError> {
        let obj = match v {
            Value::Null => return Err(self.invalid(at, v, "a rule must not be null")),
            v => self.object(v, at)?,
        };
        let mut bad = Unenforceable::default();
        let mut clauses = Vec::new();
        for (k, v) in obj {
            if v.is_null() {
                continue;
            }
            match k.as_str() {
                "from" => {
                    let clause =
                        self.clause(v, &format!("{at}.from"), "source", &mut bad, Self::source)?;
                    clauses.extend(clause);
                }
                "to" => {
                    let clause = self.clause(
                        v,
                        &format!("{at}.to"),
                        "operation",
                        &mut bad,
                        Self::operation,
                    )?;
                    clauses.extend(clause);
                }
                "when" => {
                    let field = format!("{at}.when");
                    for (j, c) in self.array(v, &field)?.iter().enumerate() {
                        let field = format!("{at}.when[{j}]");
                        if let Some(m) = self.condition(c, &field, &mut bad)? {
                            clauses.push(Clause { matches: vec![m] });
                        }
                    }
                }
                other => bad.unknown.push(format!("{at}.{other}")),
            }
        }
        if bad.is_empty() {
            return Ok(Some(Rule { clauses }));
        }
        let what = bad.describe();
        match action {
            Action::Allow => {
                self.warnings.push(format!(
                    "{at}: {what} cannot be enforced at L4; in an ALLOW policy this rule never matches (use a waypoint for HTTP rules)"
                ));
                Ok(None)
            }
            Action::Deny => {
                self.warnings.push(format!(
                    "{at}: {what} cannot be enforced at L4; this DENY rule is applied without them (fail closed)"
                ));
                Ok(Some(Rule { clauses }))
            }
        }
    }

    /// A rule's `from` or `to`: one match per `{<inner>: {...}}` item.
    /// `None` when one of the items matches anything: then so does the clause,
    /// which is simply left out.
    fn clause(
        &mut self,
        v: &Value,
        at: &str,
        inner: &str,
        bad: &mut Unenforceable,
        convert: ConvertFn<Self>,
    ) -> Result<Option<Clause>, AuthzError> {
        let list = self.array(v, at)?;
        if list.is_empty() {
            let name = at.rsplit('.').next().unwrap_or(at);
            return Err(self.invalid(at, v, &format!("`{name}` must not be empty")));
        }
        let mut matches = Vec::with_capacity(list.len());
        let mut anything = false;
        for (j, item) in list.iter().enumerate() {
            let field = format!("{at}[{j}]");
            let obj = self.wrapped(item, inner, &field, bad)?;
            match convert(self, obj, &format!("{field}.{inner}"), bad)? {
                Some(m) => matches.push(m),
                None => anything = true,
            }
        }
        Ok((!anything).then_some(Clause { matches }))
    }

    /// `{source: {...}}` / `{operation: {...}}`: the inner mapping.
    fn wrapped<'v>(
        &self,
        item: &'v Value,
        inner: &str,
        field: &str,
        bad: &mut Unenforceable,
    ) -> Result<&'v Map<String, Value>, AuthzError> {
        let obj = self.object(item, field)?;
        for (k, v) in obj {
            if k != inner && !v.is_null() {
                bad.unknown.push(format!("{field}.{k}"));
            }
        }
        match obj.get(inner) {
            None | Some(Value::Null) => Err(AuthzError::Missing {
                policy: self.key.clone(),
                field: format!("{field}.{inner}"),
            }),
            Some(v) => self.object(v, &format!("{field}.{inner}")),
        }
    }

    /// One `from[].source`. `None` when only unenforceable attributes were
    /// given: at L4 what is left matches every connection.
    fn source(
        &mut self,
        src: &Map<String, Value>,
        at: &str,
        bad: &mut Unenforceable,
    ) -> Result<Option<Match>, AuthzError> {
        let mut m = Match::default();
        let mut unenforceable = false;
        for (k, v) in src {
            let field = format!("{at}.{k}");
            match k.as_str() {
                "principals" => m.principals = self.principal_matches(v, &field)?,
                "notPrincipals" => m.not_principals = self.principal_matches(v, &field)?,
                "namespaces" => m.namespaces = self.string_matches(v, &field)?,
                "notNamespaces" => m.not_namespaces = self.string_matches(v, &field)?,
                "serviceAccounts" => m.service_accounts = self.service_accounts(v, &field)?,
                "notServiceAccounts" => {
                    m.not_service_accounts = self.service_accounts(v, &field)?
                }
                "ipBlocks" => m.source_ips = self.ip_blocks(v, &field)?,
                "notIpBlocks" => m.not_source_ips = self.ip_blocks(v, &field)?,
                // Not L4 attributes for Istio (the original client behind a proxy): as with
                // HTTP attributes, an ALLOW rule using them never matches and a DENY rule
                // applies without them.
                "remoteIpBlocks" | "notRemoteIpBlocks" => {
                    if !self.ip_blocks(v, &field)?.is_empty() {
                        bad.http.push(k.clone());
                        unenforceable = true;
                    }
                }
                "requestPrincipals" | "notRequestPrincipals" => {
                    if !self.strings(v, &field)?.is_empty() {
                        bad.http.push(k.clone());
                        unenforceable = true;
                    }
                }
                _ if v.is_null() => {}
                _ => {
                    bad.unknown.push(field);
                    unenforceable = true;
                }
            }
        }
        if (!m.service_accounts.is_empty() || !m.not_service_accounts.is_empty())
            && (!m.principals.is_empty()
                || !m.not_principals.is_empty()
                || !m.namespaces.is_empty()
                || !m.not_namespaces.is_empty())
        {
            return Err(AuthzError::InvalidValue {
                policy: self.key.clone(),
                field: at.to_owned(),
                value: "serviceAccounts with principals/namespaces".to_owned(),
                reason: "serviceAccounts cannot be combined with principals or namespaces"
                    .to_owned(),
            });
        }
        self.finish(m, unenforceable, at, "`from.source` must not be empty")
    }

    /// One `to[].operation`; `None` as for [`Cx::source`].
    fn operation(
        &mut self,
        op: &Map<String, Value>,
        at: &str,
        bad: &mut Unenforceable,
    ) -> Result<Option<Match>, AuthzError> {
        let mut m = Match::default();
        let mut unenforceable = false;
        for (k, v) in op {
            let field = format!("{at}.{k}");
            match k.as_str() {
                "ports" => m.destination_ports = self.ports(v, &field)?,
                "notPorts" => m.not_destination_ports = self.ports(v, &field)?,
                "hosts" | "notHosts" | "methods" | "notMethods" | "paths" | "notPaths" => {
                    if !self.strings(v, &field)?.is_empty() {
                        bad.http.push(k.clone());
                        unenforceable = true;
                    }
                }
                _ if v.is_null() => {}
                _ => {
                    bad.unknown.push(field);
                    unenforceable = true;
                }
            }
        }
        self.finish(m, unenforceable, at, "`to.operation` must not be empty")
    }

    fn finish(
        &self,
        m: Match,
        unenforceable: bool,
        at: &str,
        empty_reason: &str,
    ) -> Result<Option<Match>, AuthzError> {
        match (m.is_empty(), unenforceable) {
            (false, _) => Ok(Some(m)),
            (true, true) => Ok(None),
            // Istio's validation rejects it; silently matching all (or
            // nothing) would be a guess.
            (true, false) => Err(self.invalid(at, &Value::Object(Map::new()), empty_reason)),
        }
    }

    /// One `when[]` condition; `None` when its key is not an L4 attribute.
    fn condition(
        &mut self,
        c: &Value,
        at: &str,
        bad: &mut Unenforceable,
    ) -> Result<Option<Match>, AuthzError> {
        let obj = self.object(c, at)?;
        let mut key = None;
        let (mut values, mut not_values) = (&Value::Null, &Value::Null);
        for (k, v) in obj {
            match k.as_str() {
                "key" => key = Some(v),
                "values" => values = v,
                "notValues" => not_values = v,
                _ if v.is_null() => {}
                _ => bad.unknown.push(format!("{at}.{k}")),
            }
        }
        let key = match key {
            Some(Value::String(k)) if !k.is_empty() => k.as_str(),
            Some(other) if !other.is_null() => {
                return Err(self.invalid(
                    &format!("{at}.key"),
                    other,
                    "expected a non-empty string",
                ))
            }
            _ => {
                return Err(AuthzError::Missing {
                    policy: self.key.clone(),
                    field: format!("{at}.key"),
                })
            }
        };
        let vf = format!("{at}.values");
        let nf = format!("{at}.notValues");
        if self.strings(values, &vf)?.is_empty() && self.strings(not_values, &nf)?.is_empty() {
            return Err(self.invalid(at, c, "at least one of `values` or `notValues` must be set"));
        }
        let mut m = Match::default();
        match key {
            "source.ip" => {
                m.source_ips = self.ip_blocks(values, &vf)?;
                m.not_source_ips = self.ip_blocks(not_values, &nf)?;
            }
            "source.namespace" => {
                m.namespaces = self.string_matches(values, &vf)?;
                m.not_namespaces = self.string_matches(not_values, &nf)?;
            }
            "source.principal" => {
                m.principals = self.principal_matches(values, &vf)?;
                m.not_principals = self.principal_matches(not_values, &nf)?;
            }
            "destination.ip" => {
                m.destination_ips = self.ip_blocks(values, &vf)?;
                m.not_destination_ips = self.ip_blocks(not_values, &nf)?;
            }
            "destination.port" => {
                m.destination_ports = self.ports(values, &vf)?;
                m.not_destination_ports = self.ports(not_values, &nf)?;
            }
            other => {
                // Istio's L4 keys are the five above; `remote.ip` (the client behind a
                // proxy) is not one of them.
                if other.starts_with("request.") || other == "remote.ip" {
                    bad.http.push(other.to_owned());
                } else {
                    bad.unknown.push(format!("{at}.key: {other}"));
                }
                return Ok(None);
            }
        }
        Ok(Some(m))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const STREAM: &str = r#"# three policies, one of them broken
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: good
  namespace: app
spec:
  selector:
    matchLabels: {app: web}
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/a/sa/client"]
    to:
    - operation:
        ports: ["80"]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: bad
  namespace: app
spec:
  rules:
  - to:
    - operation:
        ports: ["http"]
---
---
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata:
  name: l7
  namespace: app
spec:
  action: DENY
  rules:
  - to:
    - operation:
        methods: ["POST"]
        ports: ["8080"]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: broken-yaml, namespace: app}
spec:
  rules: [ {from: }
...
"#;

    #[test]
    fn stream_keeps_good_policies_and_names_bad_ones() {
        let out = parse_k8s_yaml_stream(STREAM);
        assert_eq!(out.len(), 4, "{out:?}");

        let good = out[0].as_ref().expect("good");
        assert_eq!(good.key(), "app/good");
        assert_eq!(
            good.scope,
            Scope::WorkloadSelector {
                match_labels: BTreeMap::from([("app".to_owned(), "web".to_owned())])
            }
        );
        assert_eq!(good.rules[0].clauses.len(), 2);

        let bad = out[1].as_ref().expect_err("bad port").to_string();
        assert_eq!(
            bad,
            "document 2 (line 18): authorization policy app/bad: spec.rules[0].to[0].operation.ports[0]: invalid value \"http\": a port must be a decimal number, e.g. \"8080\""
        );

        let l7 = out[2].as_ref().expect("l7 policy");
        assert_eq!(l7.action, Action::Deny);
        assert_eq!(
            l7.rules[0].clauses[0].matches[0].destination_ports,
            vec![8080]
        );
        assert_eq!(l7.warnings.len(), 1);
        assert!(
            l7.warnings[0].contains("HTTP-only attributes (methods)"),
            "{:?}",
            l7.warnings
        );

        match out[3].as_ref().expect_err("yaml") {
            AuthzError::Yaml {
                index,
                line,
                message,
            } => {
                assert_eq!(*index, 4, "empty documents are not counted");
                assert_eq!(*line, 47, "{message}");
                assert!(message.contains("line 47"), "{message}");
            }
            other => panic!("unexpected {other}"),
        }
    }

    #[test]
    fn watcher_json_v1beta1() {
        let v = json!({
            "apiVersion": "security.istio.io/v1beta1",
            "kind": "AuthorizationPolicy",
            "metadata": {"name": "p", "namespace": "n", "uid": "x", "resourceVersion": "1",
                          "annotations": {"istio.io/dry-run": "True"}},
            "spec": {"rules": [{"when": [{"key": "source.ip", "notValues": ["10.0.0.0/8"]}]}]}
        });
        let p = from_k8s_value(&v).expect("valid");
        assert!(p.dry_run);
        assert_eq!(p.action, Action::Allow);
        assert_eq!(p.scope, Scope::Namespace);
        assert_eq!(
            p.rules[0].clauses[0].matches[0].not_source_ips,
            vec![parse_ip_block("10.0.0.0/8").expect("cidr")]
        );
    }

    fn policy(spec: Value) -> Result<Policy, AuthzError> {
        from_k8s_value(&json!({"metadata": {"name": "p", "namespace": "n"}, "spec": spec}))
    }

    fn err(spec: Value) -> String {
        match policy(spec) {
            Ok(p) => panic!("accepted: {p:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn rejected_policies_name_policy_and_field() {
        let cases: Vec<(Value, &str)> = vec![
            (
                json!({"action": "AUDIT"}),
                "authorization policy n/p: unsupported action \"AUDIT\"",
            ),
            (
                json!({"action": "CUSTOM", "provider": {"name": "x"}}),
                "spec.provider",
            ),
            (json!({"action": "CUSTOM"}), "unsupported action \"CUSTOM\""),
            (json!({"action": "allow"}), "unsupported action \"allow\""),
            (
                json!({"targetRefs": [{"kind": "Gateway", "name": "w"}]}),
                "spec.targetRefs is not supported",
            ),
            (
                json!({"targetRef": {"kind": "Service", "name": "w"}}),
                "spec.targetRef is not supported",
            ),
            (
                json!({"rules": [{"from": []}]}),
                "spec.rules[0].from: invalid value []: `from` must not be empty",
            ),
            (
                json!({"rules": [{"from": [{"source": {}}]}]}),
                "`from.source` must not be empty",
            ),
            (
                json!({"rules": [{"from": [{}]}]}),
                "missing required field spec.rules[0].from[0].source",
            ),
            (
                json!({"rules": [{"to": [{"operation": {}}]}]}),
                "`to.operation` must not be empty",
            ),
            (
                json!({"rules": [{"to": [{"operation": {"ports": ["99999"]}}]}]}),
                "ports[0]: invalid value \"99999\"",
            ),
            (
                json!({"rules": [{"to": [{"operation": {"notPorts": ["80-90"]}}]}]}),
                "notPorts[0]: invalid value \"80-90\"",
            ),
            (
                json!({"rules": [{"from": [{"source": {"ipBlocks": ["10.0.0.0/40"]}}]}]}),
                "source.ipBlocks[0]: invalid value \"10.0.0.0/40\"",
            ),
            (
                json!({"rules": [{"from": [{"source": {"principals": [""]}}]}]}),
                "principals[0]: invalid value \"\": must not be empty",
            ),
            (
                json!({"rules": [{"from": [{"source": {"principals": [true]}}]}]}),
                "quote the value",
            ),
            (
                json!({"rules": [{"from": [{"source": {"serviceAccounts": ["a/b"], "namespaces": ["a"]}}]}]}),
                "cannot be combined",
            ),
            (
                json!({"rules": [{"from": [{"source": {"serviceAccounts": ["a/b/c"]}}]}]}),
                "serviceAccounts[0]",
            ),
            (
                json!({"rules": [{"when": [{"key": "source.ip"}]}]}),
                "at least one of `values` or `notValues`",
            ),
            (
                json!({"rules": [{"when": [{"values": ["x"]}]}]}),
                "missing required field spec.rules[0].when[0].key",
            ),
            (
                json!({"rules": [{"when": [{"key": "destination.port", "values": ["x"]}]}]}),
                "when[0].values[0]: invalid value \"x\"",
            ),
            (
                json!({"rules": "all"}),
                "spec.rules: invalid value \"all\": expected a list",
            ),
            (
                json!({"selector": {"matchLabels": {"v": 1}}}),
                "spec.selector.matchLabels.v",
            ),
        ];
        for (spec, want) in cases {
            let got = err(spec.clone());
            assert!(got.contains(want), "{spec}: got {got:?}, want {want:?}");
        }
    }

    #[test]
    fn document_level_errors() {
        let wrong = from_k8s_value(
            &json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s"}}),
        );
        assert!(matches!(wrong, Err(AuthzError::WrongKind { .. })));
        let unnamed = from_k8s_value(&json!({"kind": "AuthorizationPolicy", "metadata": {}}));
        assert_eq!(
            unnamed.map_err(|e| e.to_string()),
            Err("authorization policy <unnamed>: missing required field metadata.name".to_owned())
        );
        let no_ns = from_k8s_value(&json!({"metadata": {"name": "p"}})).expect("defaults");
        assert_eq!(no_ns.key(), "default/p");
        assert_eq!(no_ns.warnings.len(), 1);
        assert!(from_k8s_value(&json!([1])).is_err());
    }

    #[test]
    fn warnings_for_what_l4_cannot_enforce() {
        let p = policy(json!({"rules": [
            {"to": [{"operation": {"methods": ["GET"], "paths": ["/x"]}}]},
            {"from": [{"source": {"remoteIpBlocks": ["1.2.3.4"]}}], "when": [{"key": "request.auth.claims[iss]", "values": ["x"]}]},
            {"from": [{"source": {"ipBlocks": ["1.2.3.4"]}}]}
        ], "extra": 1})).expect("valid");
        // Both L7 rules are dropped from the ALLOW policy, the third is kept.
        assert_eq!(p.rules.len(), 1);
        let w = p.warnings.join("\n");
        for want in [
            "spec.extra: unknown field ignored",
            "spec.rules[0]: HTTP-only attributes (methods, paths) cannot be enforced at L4; in an ALLOW policy this rule never matches",
            "spec.rules[1]: HTTP-only attributes (remoteIpBlocks, request.auth.claims[iss])",
        ] {
            assert!(w.contains(want), "missing {want:?} in:\n{w}");
        }

        let p = policy(json!({"action": "DENY", "rules": [{"from": [{"source": {"namespaces": ["a"], "bogus": ["x"]}}]}]}))
            .expect("valid");
        assert_eq!(
            p.rules[0].clauses[0].matches[0].namespaces,
            vec![StringMatch::Exact("a".into())]
        );
        assert!(
            p.warnings[0].contains("unknown fields (spec.rules[0].from[0].source.bogus)"),
            "{:?}",
            p.warnings
        );

        let p = policy(json!({"action": "DENY", "rules": [{"when": [{"key": "connection.sni", "values": ["x"]}]}]}))
            .expect("valid");
        assert!(p.rules[0].clauses.is_empty(), "applies to everything");
        assert!(
            p.warnings[0].contains("unknown fields (spec.rules[0].when[0].key: connection.sni)"),
            "{:?}",
            p.warnings
        );

        let p = policy(json!({"action": "DENY"})).expect("valid");
        assert!(p.rules.is_empty());
        assert!(p.warnings[0].contains("never matches"));
    }

    #[test]
    fn dry_run_annotation_values() {
        for (value, dry, warns) in [
            (json!("true"), true, false),
            (json!("1"), true, false),
            (json!("false"), false, false),
            (json!(true), true, false),
            (json!("yes"), false, true),
        ] {
            let p = from_k8s_value(&json!({"metadata": {"name": "p", "namespace": "n",
                "annotations": {"istio.io/dry-run": value}}}))
            .expect("valid");
            assert_eq!((p.dry_run, !p.warnings.is_empty()), (dry, warns), "{value}");
        }
    }

    #[test]
    fn numbers_are_normalised_and_spiffe_principals_kept_as_written() {
        let p = policy(json!({"rules": [{"to": [{"operation": {"ports": [80]}}],
            "from": [{"source": {"notPrincipals": ["spiffe://td/ns/a/sa/b"]}}]}]}))
        .expect("valid");
        let clauses = &p.rules[0].clauses;
        assert!(clauses
            .iter()
            .any(|c| c.matches[0].destination_ports == vec![80]));
        assert!(clauses.iter().any(|c| c.matches[0].not_principals
            == vec![StringMatch::Exact("spiffe://td/ns/a/sa/b".into())]));
        assert!(
            p.warnings
                .iter()
                .any(|w| w.contains("spiffe://") && w.contains("never matches")),
            "{:?}",
            p.warnings
        );
    }

    #[test]
    fn document_splitting() {
        let docs =
            split_documents("%YAML 1.2\n---\na: 1\n--- {b: 2}\n# only a comment\n---\n...\nc: 3\n");
        let got: Vec<(usize, usize)> = docs.iter().map(|d| (d.start_line, d.first_line)).collect();
        assert_eq!(got, vec![(2, 3), (4, 4), (8, 8)]);
    }
}
