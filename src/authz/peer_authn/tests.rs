//! PeerAuthentication decisions: sets of objects as users write them, the workload `app: a` in
//! namespace `foo` (and `app: b` beside it), and whether plaintext reaches each port.

use std::collections::BTreeMap;
use std::net::IpAddr;

use super::*;
use crate::authz::{ConnFacts, PolicySet, Target};

const ROOT: &str = "istio-system";

/// A PeerAuthentication from a YAML body; `created` orders it (seconds after a fixed time).
fn pa(ns: &str, name: &str, created: u32, spec: &str) -> PeerAuthn {
    let yaml = format!(
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {{name: {name}, namespace: {ns}, creationTimestamp: '2026-01-01T00:{:02}:{:02}Z'}}\nspec: {spec}\n",
        created / 60,
        created % 60
    );
    let v: Value = serde_saphyr::from_str(&yaml).expect("test YAML");
    from_k8s_value(&v).unwrap_or_else(|e| panic!("{e}\n{yaml}"))
}

fn labels(app: &str) -> BTreeMap<String, String> {
    BTreeMap::from([("app".to_owned(), app.to_owned())])
}

/// Whether a connection (plaintext or with an identity) to `app` on `port` is allowed.
fn allowed(set: &[PeerAuthn], app: &str, port: u16, mtls: bool) -> bool {
    let pas = PeerAuthns::new(ROOT, set.to_vec());
    let policies = PolicySet::new(pas.derived_policies(), ROOT.to_owned());
    let labels = labels(app);
    let names = pas.policy_keys("foo", &labels);
    let ip: IpAddr = "10.0.0.2".parse().unwrap();
    policies
        .evaluate(
            &Target {
                namespace: "foo",
                labels: &labels,
                policy_names: &names,
            },
            &ConnFacts {
                source_ip: "10.0.0.1".parse().unwrap(),
                source_principal: mtls.then_some("cluster.local/ns/x/sa/y"),
                source_namespace: mtls.then_some("x"),
                destination_ip: ip,
                destination_port: port,
            },
        )
        .is_allowed()
}

/// Plaintext to `app: a` on ports 8080, 9090 and 7070: which are admitted.
fn plaintext_ports(set: &[PeerAuthn]) -> [bool; 3] {
    [8080, 9090, 7070].map(|p| allowed(set, "a", p, false))
}

const OPEN: [bool; 3] = [true, true, true];
const CLOSED: [bool; 3] = [false, false, false];

#[test]
fn no_peer_authentication_is_permissive_and_adds_no_policy() {
    assert_eq!(plaintext_ports(&[]), OPEN);
    assert!(PeerAuthns::new(ROOT, vec![]).derived_policies().is_empty());
}

#[test]
fn strict_at_each_scope_refuses_plaintext_and_never_mtls() {
    for set in [
        vec![pa(ROOT, "mesh", 0, "{mtls: {mode: STRICT}}")],
        vec![pa("foo", "ns", 0, "{mtls: {mode: STRICT}}")],
        vec![pa(
            "foo",
            "w",
            0,
            "{selector: {matchLabels: {app: a}}, mtls: {mode: STRICT}}",
        )],
    ] {
        assert_eq!(plaintext_ports(&set), CLOSED, "{set:?}");
        for port in [8080, 9090] {
            assert!(allowed(&set, "a", port, true), "{set:?}");
        }
    }
    // The workload policy selects a only.
    let w = [pa(
        "foo",
        "w",
        0,
        "{selector: {matchLabels: {app: a}}, mtls: {mode: STRICT}}",
    )];
    assert!(allowed(&w, "b", 8080, false));
}

#[test]
fn the_nearer_scope_wins_and_unset_inherits() {
    let mesh_strict = pa(ROOT, "mesh", 0, "{mtls: {mode: STRICT}}");
    let ns_permissive = pa("foo", "ns", 1, "{mtls: {mode: PERMISSIVE}}");
    let ns_unset = pa("foo", "ns", 1, "{mtls: {mode: UNSET}}");
    let w_disable = pa(
        "foo",
        "w",
        2,
        "{selector: {matchLabels: {app: a}}, mtls: {mode: DISABLE}}",
    );
    let w_strict = pa(
        "foo",
        "w",
        2,
        "{selector: {matchLabels: {app: a}}, mtls: {mode: STRICT}}",
    );
    let ns_strict = pa("foo", "ns", 1, "{mtls: {mode: STRICT}}");
    assert_eq!(
        plaintext_ports(&[mesh_strict.clone(), ns_permissive.clone()]),
        OPEN
    );
    assert_eq!(
        plaintext_ports(&[mesh_strict.clone(), ns_unset.clone()]),
        CLOSED
    );
    assert_eq!(plaintext_ports(&[ns_strict.clone(), w_disable]), OPEN);
    assert_eq!(plaintext_ports(&[ns_permissive, w_strict]), CLOSED);
    // Not in another namespace: foo's policy is foo's.
    let other = pa("bar", "ns", 1, "{mtls: {mode: STRICT}}");
    assert_eq!(plaintext_ports(&[other]), OPEN);
}

#[test]
fn the_oldest_policy_of_a_level_wins() {
    let older = pa("foo", "old", 1, "{mtls: {mode: PERMISSIVE}}");
    let newer = pa("foo", "new", 5, "{mtls: {mode: STRICT}}");
    assert_eq!(plaintext_ports(&[newer.clone(), older.clone()]), OPEN);
    let older = pa("foo", "old", 1, "{mtls: {mode: STRICT}}");
    let newer = pa("foo", "new", 5, "{mtls: {mode: PERMISSIVE}}");
    assert_eq!(plaintext_ports(&[newer, older]), CLOSED);
}

#[test]
fn port_level_modes_override_the_workload_and_the_namespace() {
    let sel = |mode: &str, ports: &str| {
        pa(
            "foo",
            "w",
            3,
            &format!(
                "{{selector: {{matchLabels: {{app: a}}}}, {mode} portLevelMtls: {{{ports}}}}}"
            ),
        )
    };
    // STRICT workload, one PERMISSIVE and one DISABLE port.
    let w = sel(
        "mtls: {mode: STRICT},",
        "8080: {mode: PERMISSIVE}, 9090: {mode: DISABLE}",
    );
    assert_eq!(plaintext_ports(&[w]), [true, true, false]);
    // PERMISSIVE workload, one STRICT port.
    let w = sel("mtls: {mode: PERMISSIVE},", "9090: {mode: STRICT}");
    assert_eq!(plaintext_ports(&[w]), [true, false, true]);
    // STRICT namespace, the workload's mode unset, a PERMISSIVE port: only that port admits
    // plaintext, and the namespace's strictness stays on the others.
    let ns_strict = pa("foo", "ns", 1, "{mtls: {mode: STRICT}}");
    let w = sel("", "8080: {mode: PERMISSIVE}");
    assert_eq!(
        plaintext_ports(&[ns_strict.clone(), w]),
        [true, false, false]
    );
    // The same with DISABLE: istiod attaches only the static policy there, so the port stays
    // closed under it; weft decides alike.
    let w = sel("", "8080: {mode: DISABLE}");
    assert_eq!(plaintext_ports(&[ns_strict.clone(), w]), CLOSED);
    // A STRICT workload with a DISABLE port overrides the STRICT namespace on that port.
    let w = sel("mtls: {mode: STRICT},", "8080: {mode: DISABLE}");
    assert_eq!(plaintext_ports(&[ns_strict, w]), [true, false, false]);
    // Mesh STRICT, workload unset: a PERMISSIVE port is exempt, a STRICT port stays strict.
    let mesh = pa(ROOT, "mesh", 0, "{mtls: {mode: STRICT}}");
    let w = sel("", "9090: {mode: PERMISSIVE}, 8080: {mode: STRICT}");
    assert_eq!(plaintext_ports(&[mesh, w]), [false, true, false]);
    // Mesh PERMISSIVE, namespace UNSET, a STRICT and a PERMISSIVE port: only the STRICT one
    // refuses plaintext.
    let mesh = pa(ROOT, "mesh", 0, "{mtls: {mode: PERMISSIVE}}");
    let ns = pa("foo", "ns", 1, "{mtls: {mode: UNSET}}");
    let w = sel("", "9090: {mode: STRICT}, 8080: {mode: PERMISSIVE}");
    assert_eq!(plaintext_ports(&[mesh, ns, w]), [true, false, true]);
    // mTLS is never refused by PeerAuthentication.
    let w = sel("mtls: {mode: STRICT},", "8080: {mode: PERMISSIVE}");
    assert!(allowed(&[w], "a", 9090, true));
}

#[test]
fn derived_policies_have_istiods_names_and_shapes() {
    let set = PeerAuthns::new(
        ROOT,
        vec![
            pa(ROOT, "mesh", 0, "{mtls: {mode: STRICT}}"),
            pa(
                "foo",
                "w",
                1,
                "{selector: {matchLabels: {app: a}}, portLevelMtls: {9090: {mode: PERMISSIVE}, 8080: {mode: STRICT}}}",
            ),
        ],
    );
    let keys: Vec<String> = set.derived_policies().iter().map(Policy::key).collect();
    assert_eq!(
        keys,
        [
            "istio-system/istio_converted_static_strict",
            "foo/converted_peer_authentication_w"
        ]
    );
    // The workload names its converted policy instead of the static one; b the static one.
    assert_eq!(
        set.policy_keys("foo", &labels("a")),
        ["foo/converted_peer_authentication_w"]
    );
    assert_eq!(
        set.policy_keys("foo", &labels("b")),
        ["istio-system/istio_converted_static_strict"]
    );
    let converted = &set.derived_policies()[1];
    assert_eq!(converted.action, Action::Deny);
    assert_eq!(converted.rules.len(), 1);
    assert_eq!(converted.rules[0].clauses.len(), 2, "{converted:?}");
}

#[test]
fn malformed_objects_are_refused_with_the_field() {
    let bad = |spec: &str| {
        let v: Value = serde_saphyr::from_str(&format!(
            "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {{name: p, namespace: foo}}\nspec: {spec}\n"
        ))
        .unwrap();
        from_k8s_value(&v).expect_err(spec).to_string()
    };
    assert!(bad("{mtls: {mode: SOMETIMES}}").contains("foo/p: spec:"));
    assert!(
        bad("{selector: {matchLabels: {app: a}}, portLevelMtls: {http: {mode: STRICT}}}")
            .contains("\"http\" is not a port")
    );
    assert!(
        bad("{selector: {matchLabels: {app: a}}, portLevelMtls: {0: {mode: STRICT}}}")
            .contains("is not a port")
    );
    assert!(bad("{portLevelMtls: {8080: {mode: STRICT}}}").contains("needs spec.selector"));
    assert!(bad("{mtls: STRICT}").contains("spec:"));
}
