#!/usr/bin/env bash
# validate-manifests.sh — check daemonset/ against a real Kubernetes API server
# (v1.34, from scripts/k8s-testenv.sh) and against the published JSON schemas.
#
#   scripts/validate-manifests.sh
#
# Steps:
#   1. render daemonset/ with kubectl's kustomize (kubectl 1.34, kustomize v5); no
#      Secret and no key material may be in it;
#   2. kubernetes-validate --strict: daemonset/ and daemonset/cni-uninstall.yaml (not
#      part of the kustomization) against the oldest schema the package ships (1.25)
#      and against 1.34, the API server's version;
#   3. start a throwaway etcd + kube-apiserver, apply the CRD and the Namespace for
#      real (namespaced objects cannot be dry-run into a namespace that does not
#      exist), then `kubectl apply -k daemonset/ --dry-run=server` and
#      `kubectl apply -f daemonset/cni-uninstall.yaml --dry-run=server` must succeed,
#      with field validation Strict (an unknown or duplicate field is an error); in
#      what the server returns, the Secret weft-ca is mounted by the Deployment
#      weft-ca only and no other workload mounts any Secret;
#   4. the AuthorizationPolicy samples in daemonset/README.md are applied for real,
#      read back (no field pruned) and watched; an invalid action is refused;
#   5. stop the API server (always, also on failure).
#
# Needs: python3 (with venv; installed with apt when missing and run as root), and
# PyPI access the first time (kubernetes-validate goes into a venv in the cache).
# Environment: WEFT_CACHE (see k8s-testenv.sh); WEFT_SKIP_SCHEMA=1 skips step 2
# (e.g. without access to PyPI).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TESTENV="$ROOT/scripts/k8s-testenv.sh"
MANIFESTS="$ROOT/daemonset"
CACHE="${WEFT_CACHE:-${HOME:-/root}/.cache/weft}"
KV_VERSION="1.34.1" # schemas 1.25 .. 1.34
KV_SCHEMAS="1.25.0 1.34.0"
KV_VENV="$CACHE/venv-kubernetes-validate-$KV_VERSION"

step() { printf '\n== %s\n' "$*" >&2; }
ok() { printf '   ok: %s\n' "$*" >&2; }
fail() { printf 'validate-manifests: FAILED: %s\n' "$*" >&2; exit 1; }

work="$(mktemp -d "${TMPDIR:-/tmp}/weft-validate.XXXXXX")"
envdir="$work/k8s"
cleanup() {
  local rc=$?
  if [[ -d $envdir ]]; then "$TESTENV" stop "$envdir" >/dev/null 2>&1 || rc=1; fi
  rm -rf "$work"
  exit "$rc"
}
trap cleanup EXIT

step "k8s-testenv install (cached after the first run)"
"$TESTENV" install >"$work/paths"
KUBECTL_BIN="$(sed -n 's/^kubectl=//p' "$work/paths")"
[[ -x $KUBECTL_BIN ]] || fail "no kubectl from k8s-testenv.sh install"
ok "kubectl $("$KUBECTL_BIN" version --client -o json 2>/dev/null | sed -n 's/.*"gitVersion": *"\([^"]*\)".*/\1/p' | head -n1)"

step "render daemonset/ (kubectl kustomize)"
"$KUBECTL_BIN" kustomize "$MANIFESTS" >"$work/rendered.yaml"
kinds="$(grep -E '^kind: ' "$work/rendered.yaml" | sort | tr '\n' ' ')"
want="kind: ClusterRole kind: ClusterRole kind: ClusterRoleBinding kind: ClusterRoleBinding kind: ConfigMap kind: CustomResourceDefinition kind: CustomResourceDefinition kind: CustomResourceDefinition kind: CustomResourceDefinition kind: DaemonSet kind: Deployment kind: Namespace kind: PodDisruptionBudget kind: Service kind: ServiceAccount kind: ServiceAccount "
[[ $kinds == "$want" ]] || fail "unexpected objects in daemonset/: $kinds"
[[ $(grep -E '^kind: ' "$MANIFESTS/cni-uninstall.yaml") == "kind: DaemonSet" ]] ||
  fail "cni-uninstall.yaml: expected one DaemonSet"
if grep -rqE 'PRIVATE KEY|^kind: Secret' "$MANIFESTS" "$work/rendered.yaml"; then
  fail "daemonset/ must not contain secrets or keys"
fi
ok "$(grep -c '^kind: ' "$work/rendered.yaml") objects, no secrets"

if [[ ${WEFT_SKIP_SCHEMA:-0} == 1 ]]; then
  step "kubernetes-validate: skipped (WEFT_SKIP_SCHEMA=1)"
else
  step "kubernetes-validate $KV_VERSION --strict"
  if [[ ! -x $KV_VENV/bin/kubernetes-validate ]]; then
    if ! python3 -c 'import venv, ensurepip' 2>/dev/null; then
      [[ $EUID -eq 0 ]] || fail "python3 with venv is needed (Debian: apt-get install python3-venv)"
      DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends python3 python3-venv >&2
    fi
    rm -rf "$KV_VENV"
    python3 -m venv "$KV_VENV"
    "$KV_VENV/bin/pip" install -q "kubernetes-validate==$KV_VERSION" ||
      fail "pip install kubernetes-validate==$KV_VERSION failed (set WEFT_SKIP_SCHEMA=1 to skip)"
  fi
  for v in $KV_SCHEMAS; do
    "$KV_VENV/bin/kubernetes-validate" --strict --quiet -k "$v" "$work/rendered.yaml" ||
      fail "daemonset/ does not validate against $v"
    ok "daemonset/ against $v"
    "$KV_VENV/bin/kubernetes-validate" --strict --quiet -k "$v" "$MANIFESTS/cni-uninstall.yaml" ||
      fail "daemonset/cni-uninstall.yaml does not validate against $v"
    ok "daemonset/cni-uninstall.yaml against $v"
  done
fi

step "start a throwaway kube-apiserver"
"$TESTENV" start "$envdir" >/dev/null
set -a
# shellcheck disable=SC1091
. "$envdir/env"
set +a
kc() { "$KUBECTL_BIN" --kubeconfig "$KUBECONFIG" --cache-dir "$work/kube-cache" --request-timeout=30s "$@"; }
server_version="$(kc version -o json 2>/dev/null | python3 -c 'import json,sys; print(json.load(sys.stdin)["serverVersion"]["gitVersion"])')"
[[ $server_version == v1.34.* ]] || fail "expected kube-apiserver v1.34, got '$server_version'"
ok "kube-apiserver $server_version"

step "apply the CRD and the Namespace for real"
kc apply -f "$MANIFESTS/crds/"
kc wait --for condition=established --timeout=60s crd/authorizationpolicies.security.istio.io \
  crd/peerauthentications.security.istio.io crd/serviceentries.networking.istio.io crd/workloadentries.networking.istio.io
kc apply -f "$MANIFESTS/namespace.yaml"

step "server-side dry run of daemonset/ and cni-uninstall.yaml (strict field validation)"
kc apply -k "$MANIFESTS" --dry-run=server --validate=strict -o json >"$work/dry-run.json"
ok "daemonset/ accepted by kube-apiserver $server_version"
kc apply -f "$MANIFESTS/cni-uninstall.yaml" --dry-run=server --validate=strict -o json >"$work/dry-run-cni-uninstall.json"
ok "daemonset/cni-uninstall.yaml accepted by kube-apiserver $server_version"
python3 - "$work/dry-run.json" "$work/dry-run-cni-uninstall.json" <<'EOF' || fail "a Secret is mounted where it must not be"
# The CA's key (Secret weft-ca) reaches the CA Deployment only; no other pod template
# (the node agents' DaemonSet above all) mounts any Secret, directly or projected.
import json, sys
items = []
for path in sys.argv[1:]:
    doc = json.load(open(path))
    items += doc.get("items", [doc])
mounts = {}
for o in items:
    spec = o.get("spec", {}).get("template", {}).get("spec")
    if spec is None:
        continue
    name = f'{o["kind"]}/{o["metadata"]["name"]}'
    for v in spec.get("volumes", []):
        secrets = [v["secret"]["secretName"]] if "secret" in v else []
        for src in v.get("projected", {}).get("sources", []):
            if "secret" in src:
                secrets.append(src["secret"]["name"])
        for secret in secrets:
            mounts.setdefault(name, []).append(secret)
want = {"Deployment/weft-ca": ["weft-ca"]}
sys.exit(0 if mounts == want else f"want {want}, got {mounts}")
EOF
ok "Secret weft-ca mounted by Deployment/weft-ca only; no other Secret mounted"

step "README AuthorizationPolicy samples: apply, read back, watch"
python3 - "$MANIFESTS/README.md" "$work/samples" <<'EOF'
import re, sys, os
text = open(sys.argv[1]).read()
os.makedirs(sys.argv[2])
n = 0
for block in re.findall(r"```yaml\n(.*?)```", text, re.S):
    if "kind: AuthorizationPolicy" in block:
        n += 1
        open(os.path.join(sys.argv[2], f"policy-{n}.yaml"), "w").write(block)
if n == 0:
    sys.exit("no AuthorizationPolicy sample in README.md")
print(f"   {n} samples found", file=sys.stderr)
EOF
for f in "$work"/samples/*.yaml; do
  ns="$(sed -n 's/^  namespace: //p' "$f")"
  kc get namespace "$ns" >/dev/null 2>&1 || kc create namespace "$ns" >/dev/null
done
kc apply --dry-run=server -f "$work/samples"
(kc get authorizationpolicies.security.istio.io -A --watch --request-timeout=10s >"$work/watch.out" 2>&1 || true) &
watcher=$!
sleep 2
kc apply -f "$work/samples"
wait "$watcher"
for f in "$work"/samples/*.yaml; do
  name="$(sed -n 's/^  name: //p' "$f")"
  ns="$(sed -n 's/^  namespace: //p' "$f")"
  grep -q "$name" "$work/watch.out" || { cat "$work/watch.out" >&2; fail "watch did not report $ns/$name"; }
  # Every field of the sample must survive (no pruning).
  kc get authorizationpolicy.v1.security.istio.io -n "$ns" "$name" -o json >"$work/got.json"
  kc create --dry-run=client -f "$f" -o json >"$work/want.json"
  python3 - "$work/want.json" "$work/got.json" <<'EOF' || fail "$ns/$name: fields lost on the way through the API server"
import json, sys
want = json.load(open(sys.argv[1]))["spec"]
got = json.load(open(sys.argv[2]))["spec"]
sys.exit(0 if want == got else f"want {want}\n got {got}")
EOF
  kc get authorizationpolicy.v1beta1.security.istio.io -n "$ns" "$name" >/dev/null
done
ok "samples stored, served as v1 and v1beta1, seen by a watch"
bad="$work/bad-policy.yaml"
cat >"$bad" <<'EOF'
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: bad, namespace: default}
spec:
  action: PERMIT
EOF
if kc apply --dry-run=server -f "$bad" >/dev/null 2>&1; then
  fail "an AuthorizationPolicy with action PERMIT was accepted"
fi
ok "action PERMIT refused by the CRD schema"

step "README PeerAuthentication sample: apply, read back; a mode that does not exist refused"
python3 - "$MANIFESTS/README.md" "$work/peer-authn.yaml" <<'EOF'
import re, sys
text = open(sys.argv[1]).read()
blocks = [b for b in re.findall(r"```yaml\n(.*?)```", text, re.S) if "kind: PeerAuthentication" in b]
if not blocks:
    sys.exit("no PeerAuthentication sample in README.md")
open(sys.argv[2], "w").write("---\n".join(blocks))
EOF
kc get namespace shop >/dev/null 2>&1 || kc create namespace shop >/dev/null
kc apply -f "$work/peer-authn.yaml"
kc get peerauthentications.v1.security.istio.io -n shop -o json >"$work/pa-got.json"
kc create --dry-run=client -f "$work/peer-authn.yaml" -o json >"$work/pa-want.json"
python3 - "$work/pa-want.json" "$work/pa-got.json" <<'EOF' || fail "PeerAuthentication fields lost on the way through the API server"
import json, sys
def specs(path):
    # One object, a List, or (kubectl create --dry-run=client of several) objects one after another.
    text, dec, docs, at = open(path).read(), json.JSONDecoder(), [], 0
    while text[at:].strip():
        doc, end = dec.raw_decode(text, at + len(text[at:]) - len(text[at:].lstrip()))
        docs.extend(doc.get("items", [doc]))
        at = end
    return sorted((i["metadata"]["name"], json.dumps(i["spec"], sort_keys=True)) for i in docs)
want, got = specs(sys.argv[1]), specs(sys.argv[2])
sys.exit(0 if want == got else f"want {want}\n got {got}")
EOF
kc get peerauthentications.v1beta1.security.istio.io -n shop >/dev/null
cat >"$bad" <<'EOF'
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: bad, namespace: default}
spec:
  mtls: {mode: SOMETIMES}
EOF
if kc apply --dry-run=server -f "$bad" >/dev/null 2>&1; then
  fail "a PeerAuthentication with mode SOMETIMES was accepted"
fi
ok "PeerAuthentication sample stored as written, served as v1 and v1beta1; mode SOMETIMES refused"

step "all manifest checks passed"
