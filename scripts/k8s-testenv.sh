#!/usr/bin/env bash
# k8s-testenv.sh — a real control plane on this machine for weft's tests: etcd,
# kube-apiserver and istiod on loopback, istio-cni's node agent in a test's network namespace.
#
#   scripts/k8s-testenv.sh install          build/cache every binary (idempotent), print name=path
#   scripts/k8s-testenv.sh paths            print the same name=path lines without building
#   scripts/k8s-testenv.sh start DIR        start etcd + kube-apiserver, state in DIR
#   scripts/k8s-testenv.sh istiod DIR       start istiod against the API server of DIR
#   scripts/k8s-testenv.sh istiod-stop DIR  stop istiod (its ports and CA stay for the next start)
#   scripts/k8s-testenv.sh istio-cni DIR NETNS NODE  start istio-cni's node agent (ambient) for
#                                           node NODE inside network namespace NETNS
#   scripts/k8s-testenv.sh istio-cni-stop DIR NODE   stop that node agent (its ports stay)
#   scripts/k8s-testenv.sh stop DIR         stop everything `start`/`istiod`/`istio-cni` started, wipe DIR
#   scripts/k8s-testenv.sh status DIR       exit 0 when the API server in DIR is ready
#
# Where the binaries come from (one way only, everything under
# ${WEFT_CACHE:-$HOME/.cache/weft}; GOMODCACHE, GOCACHE and GOPATH are there too, so a
# warm cache downloads and compiles nothing; each binary has a NAME.stamp next to it saying
# what it was built from, and a binary whose stamp differs is rebuilt):
#   * kube-apiserver and kubectl v1.34.4 from the Go module k8s.io/kubernetes. Its go.mod
#     replaces each staging module (k8s.io/api, k8s.io/client-go, ...) with ./staging/...
#     paths the module zip lacks, so a wrapper module (written into the cache) requires
#     k8s.io/kubernetes v1.34.4 and replaces each of them, as listed in the downloaded
#     go.mod, with the published k8s.io/<name> v0.34.4. One `go build` makes both commands
#     and etcd.
#   * etcd v3.6.4 from go.etcd.io/etcd/server/v3 (its main package is the etcd server),
#     the version k8s.io/kubernetes v1.34.4 pins in its go.mod, built in the same wrapper
#     module and the same `go build` (it shares gRPC, protobuf and the etcd client with
#     kube-apiserver, so those compile once). Not Debian bookworm's etcd-server 3.4.23:
#     kube-apiserver 1.34 starts on it, TokenRequest/TokenReview and plain watches work,
#     but it finds that etcd without usable progress notifications ("RequestWatchProgress
#     feature is not supported") and then refuses every watch-list stream
#     (sendInitialEvents=true: "a watch stream was requested by the client but the
#     required storage feature RequestWatchProgress is disabled", HTTP 500), which current
#     clients (client-go's WatchListClient, kube-rs' streaming lists) use.
#   * istiod (pilot-discovery) and istioctl from the module
#     istio.io/istio@v0.0.0-20260827124520-eed52ebb66ad (Istio 1.31 development), built
#     in a writable copy of the module (in the cache) as the main module, with Istio's
#     go.mod and go.sum and its standard build tags, in one `go build`.
#   * istio-cni's node agent (install-cni: the installer and, with ambient on, the node agent
#     with the ZDS server) and its CNI plugin (istio-cni), from the same copy of the module,
#     with Istio's AGENT_TAGS (agent,disable_pgv,grpcnotrace,retrynotrace), in a second
#     `go build` sharing GOCACHE: 37 s on top of a cache that had built istiod (idle
#     machine), 11 s when only its stamp changed (link steps).
# All builds: CGO_ENABLED=0, -trimpath, -ldflags "-s -w" plus the version variables, -p 2.
# Wall times of `install` on a 2-core machine of this workplace (measured while another
# cargo build shared the cores, load 5-9; an idle machine is faster):
#   fresh cache, downloads included: 1516 s (25 min) in all: kube-apiserver + kubectl + etcd
#     746 s (module downloads 15 s), pilot-discovery + istioctl 749 s (download 2 s);
#     6.4 GB of cache in all (mostly GOCACHE);
#   warm cache: 0.2 s (stamps match, nothing is run); after a change of one stamp only the
#     link steps and the changed packages run (adding etcd to the kubernetes build: 63 s).
#
# `start DIR` writes:
#   DIR/kubeconfig          server https://127.0.0.1:PORT, CA data, admin bearer token
#   DIR/env                 KEY=VALUE lines (KUBECONFIG, server URL, token, pids, ports)
#   DIR/etcd.pid, DIR/kube-apiserver.pid, DIR/etcd.log, DIR/kube-apiserver.log
# The admin token belongs to group system:masters; authorization is RBAC. Service-account
# tokens: issuer https://kubernetes.default.svc.cluster.local, a signing key per DIR, so
# TokenRequest (`kubectl create token SA --audience istio-ca --bound-object-kind Pod
# --bound-object-name P`) and TokenReview work. There is no controller-manager, scheduler
# or kubelet: tests create the objects they need (ServiceAccounts too: a namespace's
# "default" ServiceAccount is never auto-created, and deleted namespaces stay
# Terminating). The ServiceAccount admission plugin is disabled so that pods can be
# created without service-account token secrets.
#
# `istiod DIR` (after `start DIR`) creates namespace istio-system, Istio's CRDs (from the
# module's manifests/charts/base), the ServiceAccounts istiod and ztunnel and the mesh
# config (ConfigMap istio), starts pilot-discovery out of cluster with --kubeconfig and
# waits for its /ready and the root certificate. It writes:
#   DIR/istiod.env          WEFT_ISTIOD_XDS_ADDR (TLS: xDS and CA, istiod's 15012),
#                           WEFT_ISTIOD_PLAINTEXT_ADDR (15010), WEFT_ISTIOD_DEBUG_ADDR
#                           (8080: /ready, /debug/...), WEFT_ISTIOD_WEBHOOK_ADDR (15017),
#                           WEFT_ISTIOD_MONITORING_ADDR (15014), WEFT_ISTIOD_ROOT_CERT,
#                           WEFT_ISTIOD_SAN (istiod.istio-system.svc), WEFT_ISTIOD_NAMESPACE,
#                           WEFT_ISTIOD_TRUST_DOMAIN, WEFT_ISTIOD_CLUSTER_ID,
#                           WEFT_ISTIOD_TOKEN_AUDIENCE, WEFT_ISTIOD_LOG, WEFT_ISTIOD_PID
#   DIR/istiod-root-cert.pem  the mesh root (ConfigMap istio-ca-root-cert)
#   DIR/istiod.ports, DIR/istiod.pid, DIR/istiod.log, DIR/istiod/ (its working directory)
# The CA is istiod's self-signed one, kept in Secret istio-system/istio-ca-secret, so
# `istiod-stop DIR` then `istiod DIR` restarts it on the same ports with the same root.
#
# `istio-cni DIR NETNS NODE` (after `start DIR`) runs the real istio-cni node agent, ambient
# mode, as the istio-cni chart's DaemonSet pod would on node NODE, but out of cluster:
#   * network: inside network namespace NETNS (e.g. a lab node, PREFIX-na), never the root
#     one: the agent writes its host rules (probe SNAT: iptables nat ISTIO_POSTRT, or nftables
#     table inet istio-ambient-nat) and its probe address set there. The API server on the
#     root netns' loopback is reached through a forwarder (python3) listening on
#     127.0.0.1:PORT inside NETNS (PORT: the API server's own when free there).
#   * files: in a mount namespace of its own, chrooted into a new root that mirrors / and adds
#     the DaemonSet's mounts at the fixed paths the agent uses (/host/proc, /host/run/netns,
#     /host/opt/cni/bin, /host/etc/cni/net.d, /opt/cni/bin, the service account directory);
#     see _istio-cni-exec. Nothing is mounted or created outside DIR.
#   * Kubernetes: in-cluster config (KUBERNETES_SERVICE_HOST/PORT + service account token,
#     the admin's); watches Pods with spec.nodeName=NODE and all Namespaces.
#   * chart defaults (ambient profile, DNS capture on) except: race repair off, sockets and
#     directories under DIR, free ports, FORCE_IPTABLES_BINARY=nft, and no
#     ALLOW_SWITCH_TO_HOST_NS (which would point its host rules at PID 1's root netns).
#   * the installer chains istio-cni into DIR/istio-cni-NODE/net.d/10-weft-lab.conflist
#     (a primary network written here, never executed) and copies the plugin to .../bin.
# It returns once /readyz (127.0.0.1:8000 in NETNS) answers 200 and the plugin is installed.
# A ztunnel (weft) then connects to the ZDS socket; a test plays the container runtime by
# running the plugin (CNI_COMMAND=ADD, in NETNS, the istio-cni entry of the conflist with
# name, cniVersion and a prevResult on stdin); the agent writes the in-pod rules and sends
# AddWorkload with the pod's netns fd over ZDS, and the plugin returns once it is acked.
# It writes:
#   DIR/istio-cni-NODE.env   WEFT_ISTIO_CNI_NODE, WEFT_ISTIO_CNI_NETNS,
#                            WEFT_ISTIO_CNI_ZDS_SOCKET (ztunnel's /var/run/ztunnel/ztunnel.sock),
#                            WEFT_ISTIO_CNI_PLUGIN (the installed plugin), WEFT_ISTIO_CNI_PATH
#                            (CNI_PATH), WEFT_ISTIO_CNI_CONF (the conflist), WEFT_ISTIO_CNI_RUN_DIR
#                            (pluginevent.sock, log.sock, the plugin's kubeconfig),
#                            WEFT_ISTIO_CNI_BACKEND, WEFT_ISTIO_CNI_APISERVER (as seen in NETNS),
#                            WEFT_ISTIO_CNI_READY_ADDR, WEFT_ISTIO_CNI_MONITORING_ADDR (in NETNS),
#                            WEFT_ISTIO_CNI_LOG, WEFT_ISTIO_CNI_PID, WEFT_ISTIO_CNI_FORWARDER_PID
#   DIR/istio-cni-NODE/      agent.log (all starts appended), ports, pid files, the state above
# `istio-cni-stop DIR NODE` sends SIGTERM: with no DaemonSet istio-system/istio-cni-node the
# agent takes it for an uninstall and removes the plugin from the conflist, the plugin binary
# and kubeconfig, its host rules and address set (in-pod rules stay); a later `istio-cni`
# restarts it on the same ports and socket paths.
#
# Environment knobs:
#   WEFT_CACHE                 cache root (default $HOME/.cache/weft)
#   WEFT_GO                    the go command (default: go on PATH, else /usr/local/go/bin/go)
#   WEFT_ETCD_PORT             etcd client port      (default: a free port)
#   WEFT_ETCD_PEER_PORT        etcd peer port        (default: a free port)
#   WEFT_APISERVER_PORT        kube-apiserver port   (default: a free port)
#   WEFT_START_TIMEOUT         seconds to wait for /readyz (default 60)
#   WEFT_ISTIOD_TIMEOUT        seconds to wait for istiod (default 90)
#   WEFT_ISTIOD_LOG_LEVEL      istiod's --log_output_level (default default:info)
#   WEFT_APISERVER_EXTRA_ARGS  extra kube-apiserver flags (word-split)
#   WEFT_ISTIOD_EXTRA_ARGS     extra pilot-discovery flags (word-split)
#   WEFT_ISTIO_CNI_BACKEND     iptables (the chart's default) or nftables (NATIVE_NFTABLES=true;
#                              a "kubelet" stand-in process then runs in NETNS,
#                              see cmd_istio_cni)
#   WEFT_ISTIO_CNI_LOG_LEVEL   the agent's --log_output_level (default default:info)
#   WEFT_ISTIO_CNI_TIMEOUT     seconds to wait for the agent to be ready (default 60)
set -euo pipefail


usage() {
  sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
}

readonly SELF="k8s-testenv"
readonly CACHE="${WEFT_CACHE:-${HOME:-/root}/.cache/weft}"
readonly BIN_DIR="$CACHE/bin"
readonly GO_DIR="$CACHE/go"
readonly LOCK_FILE="$CACHE/install.lock"

readonly K8S_VERSION="v1.34.4"
readonly ISTIO_VERSION="v0.0.0-20260827124520-eed52ebb66ad"
readonly ISTIO_RELEASE="1.31-dev"     # Istio's VERSION file at that commit says 1.31
readonly ISTIO_TAGS="vtprotobuf,disable_pgv" # Istio's STANDARD_TAGS (Makefile.core.mk)
readonly ISTIO_AGENT_TAGS="agent,disable_pgv,grpcnotrace,retrynotrace" # its AGENT_TAGS

readonly ETCD_BIN="$BIN_DIR/etcd"
readonly KUBECTL_BIN="$BIN_DIR/kubectl"
readonly APISERVER_BIN="$BIN_DIR/kube-apiserver"
readonly PILOT_BIN="$BIN_DIR/pilot-discovery"
readonly ISTIOCTL_BIN="$BIN_DIR/istioctl"
readonly INSTALL_CNI_BIN="$BIN_DIR/install-cni"  # istio-cni's node agent (and installer)
readonly CNI_PLUGIN_BIN="$BIN_DIR/istio-cni"     # the CNI plugin the runtime executes
readonly SERVICE_CIDR="10.250.128.0/20"

log() { printf '%s: %s\n' "$SELF" "$*" >&2; }
die() { printf '%s: error: %s\n' "$SELF" "$*" >&2; exit 1; }

as_root() {
  if [[ $EUID -eq 0 ]]; then
    "$@"
  elif command -v sudo >/dev/null 2>&1; then
    sudo "$@"
  else
    die "'$*' needs root (run as root or install sudo)"
  fi
}

apt_get() {
  # apt's progress goes to stderr: stdout of `install` is the list of paths.
  as_root env DEBIAN_FRONTEND=noninteractive apt-get -q \
    -o DPkg::Lock::Timeout=300 -o APT::Sandbox::User=root "$@" >&2
}

# ---------------------------------------------------------------------------
# install
# ---------------------------------------------------------------------------

# The toolchain used when the machine has no Go new enough: fetched from the Go module proxy
# as the module golang.org/toolchain (how `go` itself switches toolchains), bootstrapped by
# Debian's golang-1.19-go when there is no Go at all.
readonly GO_TOOLCHAIN="go1.26.8"
readonly GO_MIN_MINOR=26

# True if $1 is a Go of at least 1.$GO_MIN_MINOR.
go_new_enough() {
  local v
  v="$("$1" env GOVERSION 2>/dev/null)" || return 1
  [[ $v =~ ^go1\.([0-9]+) ]] && ((BASH_REMATCH[1] >= GO_MIN_MINOR))
}

# The go command: $WEFT_GO, else go on PATH, else the official tarball's place, else the
# toolchain module in the cache (downloaded once).
go_bin() {
  local g="${WEFT_GO:-}"
  [[ -n $g ]] || g="$(command -v go 2>/dev/null || true)"
  [[ -n $g ]] || g=/usr/local/go/bin/go
  if [[ -x $g ]] && go_new_enough "$g"; then
    echo "$g"
    return 0
  fi
  local arch
  case "$(uname -m)" in
    x86_64) arch=amd64 ;;
    aarch64) arch=arm64 ;;
    *) die "no Go >= 1.$GO_MIN_MINOR and no toolchain module for $(uname -m): set WEFT_GO" ;;
  esac
  local mod="golang.org/toolchain@v0.0.1-$GO_TOOLCHAIN.linux-$arch"
  local tc="$GO_DIR/mod/$mod"
  if [[ ! -x $tc/bin/go ]]; then
    local boot="$g"
    if [[ ! -x $boot ]]; then
      [[ -x /usr/lib/go-1.19/bin/go ]] || apt_get install -y --no-install-recommends golang-1.19-go
      boot=/usr/lib/go-1.19/bin/go
    fi
    log "no Go >= 1.$GO_MIN_MINOR here: fetching $mod from the Go module proxy"
    env GOMODCACHE="$GO_DIR/mod" GOFLAGS=-modcacherw GOTOOLCHAIN=local GO111MODULE=on \
      "$boot" mod download "$mod" >&2 || die "could not download $mod"
    # Module zips carry no file modes.
    chmod -R u+x "$tc/bin" "$tc/pkg/tool"
  fi
  go_new_enough "$tc/bin/go" || die "$tc/bin/go does not run"
  echo "$tc/bin/go"
}

# Runs go with everything under the cache: a warm cache downloads and compiles nothing.
# GOTOOLCHAIN=local: never fetch another toolchain; GOFLAGS=-modcacherw so the cache can be
# deleted with rm -rf; GOWORK=off so no go.work of the caller leaks in.
gocmd() {
  env GOMODCACHE="$GO_DIR/mod" GOCACHE="$GO_DIR/build" GOPATH="$GO_DIR/path" \
    GOTOOLCHAIN=local GOFLAGS="-modcacherw -buildvcs=false" GOWORK=off GO111MODULE=on \
    CGO_ENABLED=0 GOENV=off "$GO" "$@"
}

# A stamp per binary: what it was built from. A binary whose stamp differs is rebuilt.
stamp_ok() { [[ -x $1 && -f $1.stamp && "$(cat "$1.stamp")" == "$2" ]]; }

# Downloads module@version into the cache's GOMODCACHE; prints its directory.
mod_download() {
  local out
  out="$(cd "$GO_DIR" && gocmd mod download -json "$1")" || die "go mod download $1 failed"
  sed -n 's/^[[:space:]]*"Dir": "\(.*\)",*$/\1/p' <<<"$out" | head -n1
}

# go build in module dir $1 of the packages $4..., output into $2, ldflags $3; logs to
# $CACHE/logs/<name>.log and reports the wall time.
go_build() {
  local dir="$1" out="$2" ldflags="$3" name="$4"
  shift 4
  local logf="$CACHE/logs/$name.log" t0=$SECONDS
  mkdir -p "$CACHE/logs" "$out"
  log "building $name: go build $* (log: $logf)"
  if ! (cd "$dir" && gocmd build -p 2 -trimpath -ldflags "-s -w $ldflags" "${BUILD_TAGS[@]}" -o "$out/" "$@") \
    >"$logf" 2>&1; then
    tail -n 40 "$logf" >&2
    die "build of $name failed (full log: $logf)"
  fi
  log "built $name in $((SECONDS - t0)) s"
}

# kube-apiserver and kubectl from k8s.io/kubernetes. Its go.mod replaces every staging module
# (k8s.io/api, k8s.io/client-go, ...) with ./staging/src/... directories that the module zip
# does not contain, so a wrapper module requires k8s.io/kubernetes and replaces each of them
# with the published k8s.io/<name> v0.<minor>.<patch>. The list is read from the downloaded
# go.mod.
build_kubernetes() {
  local stamp="$1" etcd_ver="$2"
  local ver="$K8S_VERSION" minor patch staging wrap="$GO_DIR/wrap-kubernetes-$K8S_VERSION"
  minor="$(cut -d. -f2 <<<"$ver")"
  patch="$(cut -d. -f3 <<<"$ver")"
  staging="v0.$minor.$patch"
  local t0=$SECONDS src
  src="$(mod_download "k8s.io/kubernetes@$ver")"
  [[ -f $src/go.mod ]] || die "k8s.io/kubernetes@$ver has no go.mod in the module cache"
  log "downloaded k8s.io/kubernetes@$ver in $((SECONDS - t0)) s"
  local replaces godebug goline
  replaces="$(awk '
    /^replace[[:space:]]*\(/ { inblock = 1; next }
    inblock && /^\)/ { inblock = 0; next }
    inblock && $2 == "=>" && $3 ~ /^\.\/staging\// { print $1 }
    /^replace[[:space:]]+[^(]/ && $3 == "=>" && $4 ~ /^\.\/staging\// { print $2 }
  ' "$src/go.mod")"
  [[ -n $replaces ]] || die "no ./staging replace directives found in $src/go.mod"
  [[ $etcd_ver == v3.* ]] || die "no go.etcd.io/etcd/server/v3 requirement in $src/go.mod"
  goline="$(grep -m1 '^go ' "$src/go.mod")"
  godebug="$(grep -m1 '^godebug ' "$src/go.mod" || true)"
  rm -rf "$wrap"
  mkdir -p "$wrap"
  {
    echo "// Written by weft's scripts/k8s-testenv.sh: builds k8s.io/kubernetes $ver commands"
    echo "// with the published staging modules ($staging) instead of ./staging paths."
    echo "module weft.test/kubernetes-wrapper"
    echo
    echo "$goline"
    [[ -n $godebug ]] && echo "$godebug"
    echo
    echo "require k8s.io/kubernetes $ver"
    echo
    echo "replace ("
    local m
    for m in $replaces; do echo "	$m => $m $staging"; done
    echo ")"
  } >"$wrap/go.mod"
  log "wrapper module $wrap: $(wc -w <<<"$replaces") staging modules replaced with $staging"
  t0=$SECONDS
  (cd "$wrap" && gocmd get "k8s.io/kubernetes/cmd/kube-apiserver@$ver" "k8s.io/kubernetes/cmd/kubectl@$ver" \
    "go.etcd.io/etcd/server/v3@$etcd_ver") \
    >"$CACHE/logs/kubernetes-get.log" 2>&1 ||
    { tail -n 30 "$CACHE/logs/kubernetes-get.log" >&2; die "go get in the kubernetes wrapper failed"; }
  log "resolved and downloaded kubernetes dependencies in $((SECONDS - t0)) s"
  local date pkg ld=""
  date="$(date -u +%Y-%m-%dT%H:%M:%SZ)"
  for pkg in k8s.io/client-go/pkg/version k8s.io/component-base/version; do
    ld+=" -X $pkg.gitVersion=$ver -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
    ld+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=$date"
  done
  BUILD_TAGS=()
  go_build "$wrap" "$wrap/out" "$ld" kubernetes \
    k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kubectl go.etcd.io/etcd/server/v3
  "$wrap/out/kube-apiserver" --version | grep -qF "$ver" ||
    die "built kube-apiserver reports $("$wrap/out/kube-apiserver" --version)"
  # go names the binary of .../server/v3 after the element before the major version.
  local etcd_out="$wrap/out/server"
  [[ -x $etcd_out ]] || etcd_out="$wrap/out/v3"
  "$etcd_out" --version | grep -qF "${etcd_ver#v}" ||
    die "built etcd reports $("$etcd_out" --version | head -n1)"
  install -m 0755 "$wrap/out/kube-apiserver" "$APISERVER_BIN"
  install -m 0755 "$wrap/out/kubectl" "$KUBECTL_BIN"
  install -m 0755 "$etcd_out" "$ETCD_BIN"
  printf '%s\n' "$stamp kube-apiserver" >"$APISERVER_BIN.stamp"
  printf '%s\n' "$stamp kubectl" >"$KUBECTL_BIN.stamp"
  printf '%s\n' "$stamp etcd go.etcd.io/etcd/server/v3@$etcd_ver" >"$ETCD_BIN.stamp"
  rm -rf "$wrap/out"
}

# The writable copy of istio.io/istio@$ISTIO_VERSION (module cache files are read-only, and
# a module whose go.mod carries replace directives cannot be `go install`ed by version; the
# copy is built as the main module, with Istio's own go.mod and go.sum).
istio_src() {
  local dir="$GO_DIR/src/istio-$ISTIO_VERSION"
  if [[ ! -f $dir/.complete ]]; then
    local t0=$SECONDS src
    src="$(mod_download "istio.io/istio@$ISTIO_VERSION")"
    [[ -f $src/go.mod ]] || die "istio.io/istio@$ISTIO_VERSION has no go.mod in the module cache"
    rm -rf "$dir"
    mkdir -p "$(dirname "$dir")"
    cp -r "$src" "$dir.tmp"
    chmod -R u+w "$dir.tmp"
    mv "$dir.tmp" "$dir"
    touch "$dir/.complete"
    log "istio.io/istio@$ISTIO_VERSION downloaded and copied to $dir in $((SECONDS - t0)) s"
  fi
  echo "$dir"
}

istio_ldflags() {
  local p=istio.io/istio/pkg/version rev="${ISTIO_VERSION##*-}"
  echo "-X $p.buildVersion=$ISTIO_RELEASE -X $p.buildGitRevision=$rev -X $p.buildStatus=Clean" \
    "-X $p.buildTag=$ISTIO_VERSION -X $p.buildHub=weft-testenv -X $p.buildOS=linux" \
    "-X $p.buildArch=$(gocmd env GOARCH)"
}

# Builds Istio commands, given as package paths inside the module (./pilot/cmd/pilot-discovery),
# in one go build (shared packages compile once), with build tags $ISTIO_BUILD_TAGS_OVERRIDE or
# Istio's standard tags, into $BIN_DIR. istio-cni's binaries use Istio's AGENT_TAGS (its
# Makefile.core.mk builds CNI_BINARIES with them).
build_istio() {
  local stamp="$1"
  shift
  local dir out p
  dir="$(istio_src)"
  out="$dir/out"
  rm -rf "$out"
  BUILD_TAGS=("-tags=${ISTIO_BUILD_TAGS_OVERRIDE:-$ISTIO_TAGS}")
  go_build "$dir" "$out" "$(istio_ldflags)" "${ISTIO_BUILD_NAME:-istio}" "$@"
  for p in "$@"; do
    install -m 0755 "$out/$(basename "$p")" "$BIN_DIR/$(basename "$p")"
    printf '%s\n' "$stamp $(basename "$p") tags=${BUILD_TAGS[0]#-tags=}" >"$BIN_DIR/$(basename "$p").stamp"
  done
  rm -rf "$out"
}

cmd_install() {
  mkdir -p "$BIN_DIR" "$GO_DIR" "$CACHE/logs"
  command -v openssl >/dev/null 2>&1 || apt_get install -y --no-install-recommends openssl
  # One install at a time (scripts/test.sh and validate-manifests.sh both run it).
  exec 9>"$LOCK_FILE"
  flock 9
  GO="$(go_bin)"
  local gover t0=$SECONDS
  gover="$("$GO" env GOVERSION)"
  local k8s_stamp="k8s.io/kubernetes@$K8S_VERSION (staging modules v0.${K8S_VERSION#v1.}) $gover CGO_ENABLED=0 -trimpath -s -w"
  local istio_stamp="istio.io/istio@$ISTIO_VERSION $gover CGO_ENABLED=0 -trimpath -s -w"
  # etcd: the version k8s.io/kubernetes pins in its go.mod (what that release is tested with).
  local src etcd_ver
  src="$(mod_download "k8s.io/kubernetes@$K8S_VERSION")"
  etcd_ver="$(awk '$1 == "go.etcd.io/etcd/server/v3" { print $2; exit }' "$src/go.mod")"
  if stamp_ok "$APISERVER_BIN" "$k8s_stamp kube-apiserver" && stamp_ok "$KUBECTL_BIN" "$k8s_stamp kubectl" &&
    stamp_ok "$ETCD_BIN" "$k8s_stamp etcd go.etcd.io/etcd/server/v3@$etcd_ver"; then
    log "kube-apiserver, kubectl, etcd: cached"
  else
    build_kubernetes "$k8s_stamp" "$etcd_ver"
  fi
  istio_src >/dev/null # `istiod DIR` applies the CRDs of this copy
  if stamp_ok "$PILOT_BIN" "$istio_stamp pilot-discovery tags=$ISTIO_TAGS" &&
    stamp_ok "$ISTIOCTL_BIN" "$istio_stamp istioctl tags=$ISTIO_TAGS"; then
    log "pilot-discovery, istioctl: cached"
  else
    build_istio "$istio_stamp" ./pilot/cmd/pilot-discovery ./istioctl/cmd/istioctl
  fi
  if stamp_ok "$INSTALL_CNI_BIN" "$istio_stamp install-cni tags=$ISTIO_AGENT_TAGS" &&
    stamp_ok "$CNI_PLUGIN_BIN" "$istio_stamp istio-cni tags=$ISTIO_AGENT_TAGS"; then
    log "install-cni, istio-cni: cached"
  else
    ISTIO_BUILD_TAGS_OVERRIDE="$ISTIO_AGENT_TAGS" ISTIO_BUILD_NAME=istio-cni \
      build_istio "$istio_stamp" ./cni/cmd/install-cni ./cni/cmd/istio-cni
  fi
  log "install done in $((SECONDS - t0)) s"
  flock -u 9
  cmd_paths
}

cmd_paths() {
  echo "etcd=$ETCD_BIN"
  echo "kube-apiserver=$APISERVER_BIN"
  echo "kubectl=$KUBECTL_BIN"
  echo "pilot-discovery=$PILOT_BIN"
  echo "istioctl=$ISTIOCTL_BIN"
  echo "install-cni=$INSTALL_CNI_BIN"
  echo "istio-cni=$CNI_PLUGIN_BIN"
  echo "gateway-api-crds=$(gateway_api_crds)"
}

# The standard Gateway API CRDs of the version istiod was built with (its go.mod), from the
# module cache that build filled; empty before `install`.
gateway_api_crds() {
  local gomod="$GO_DIR/src/istio-$ISTIO_VERSION/go.mod" v
  [[ -f $gomod ]] || return 0
  v="$(awk '$1 == "sigs.k8s.io/gateway-api" { print $2; exit }' "$gomod")"
  [[ -n $v && -d $GO_DIR/mod/sigs.k8s.io/gateway-api@$v/config/crd/standard ]] || return 0
  echo "$GO_DIR/mod/sigs.k8s.io/gateway-api@$v/config/crd/standard"
}

# ---------------------------------------------------------------------------
# start / stop / status
# ---------------------------------------------------------------------------

# true if something listens on TCP port $1 (any address, v4 or v6).
port_in_use() {
  local hex
  hex="$(printf '%04X' "$1")"
  # Any state, not only listening: a connected socket on the port makes bind fail too.
  awk -v p=":$hex" 'NR > 1 && substr($2, length($2) - 4) == p { f = 1 } END { exit !f }' \
    /proc/net/tcp /proc/net/tcp6 2>/dev/null
}

# true if something listens on TCP port $1. What a restarted server on its old port needs:
# the connections it leaves behind (TIME_WAIT, FIN_WAIT2) do not stop a Go server's bind
# (SO_REUSEADDR), only a listener does.
port_listened() {
  local hex
  hex="$(printf '%04X' "$1")"
  awk -v p=":$hex" 'NR > 1 && $4 == "0A" && substr($2, length($2) - 4) == p { f = 1 } END { exit !f }' \
    /proc/net/tcp /proc/net/tcp6 2>/dev/null
}

# Prints a free port in 20000-32767 that is not in $@: below the kernel's ephemeral range
# (32768-60999 by default), where outgoing connections would take ports between our check and
# the server's bind.
free_port() {
  local p i taken
  for ((i = 0; i < 200; i++)); do
    p=$((20000 + (RANDOM * 32768 + RANDOM) % 12768))
    taken=0
    for x in "$@"; do [[ $x == "$p" ]] && taken=1; done
    ((taken)) && continue
    port_in_use "$p" || { echo "$p"; return 0; }
  done
  die "no free TCP port found"
}

# pid alive and its executable is $2 (guards against pid reuse).
pid_is() {
  local pid="$1" exe="$2"
  [[ $pid =~ ^[0-9]+$ ]] && [[ -d /proc/$pid ]] || return 1
  local real
  real="$(readlink "/proc/$pid/exe" 2>/dev/null || true)"
  [[ $real == "$(readlink -f "$exe")" || $real == "$(readlink -f "$exe") (deleted)" ]]
}

read_pid() { if [[ -f $1 ]]; then tr -dc '0-9' <"$1"; fi; }

abs_dir() {
  [[ -n ${1:-} ]] || usage
  [[ $1 != *[[:space:]]* ]] || die "DIR must not contain whitespace: '$1'"
  mkdir -p "$1"
  (cd "$1" && pwd -P)
}

existing_dir() {
  [[ -n ${1:-} ]] || usage
  [[ -d $1 ]] || die "no such environment directory: $1"
  (cd "$1" && pwd -P)
}

kubectl_dir() { "$KUBECTL_BIN" --kubeconfig "$1/kubeconfig" --request-timeout=10s "${@:2}"; }

is_ready() {
  [[ -f $1/kubeconfig ]] && [[ "$(kubectl_dir "$1" get --raw /readyz 2>/dev/null)" == ok ]]
}

# Prints the last lines of a log for a failure message.
show_log() {
  [[ -f $1 ]] || return 0
  printf '%s: last lines of %s:\n' "$SELF" "$1" >&2
  tail -n "${2:-30}" "$1" | sed 's/^/    /' >&2
}

gen_certs() {
  local d="$1/pki"
  mkdir -p "$d"
  chmod 700 "$d"
  openssl ecparam -name prime256v1 -genkey -noout -out "$d/ca.key" 2>/dev/null
  openssl req -x509 -new -key "$d/ca.key" -sha256 -days 3650 -subj "/CN=weft-testenv-ca" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -out "$d/ca.crt" 2>/dev/null
  openssl ecparam -name prime256v1 -genkey -noout -out "$d/serving.key" 2>/dev/null
  openssl req -new -key "$d/serving.key" -subj "/CN=kube-apiserver" -out "$d/serving.csr" 2>/dev/null
  cat >"$d/serving.ext" <<EOF
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local,IP:10.250.128.1
EOF
  openssl x509 -req -in "$d/serving.csr" -CA "$d/ca.crt" -CAkey "$d/ca.key" -CAcreateserial \
    -days 3650 -sha256 -extfile "$d/serving.ext" -out "$d/serving.crt" 2>/dev/null
  # Service-account token signing key: TokenRequest (bound tokens) and TokenReview.
  openssl genrsa -out "$d/sa.key" 2048 2>/dev/null
  openssl rsa -in "$d/sa.key" -pubout -out "$d/sa.pub" 2>/dev/null
  rm -f "$d/serving.csr" "$d/serving.ext" "$d/ca.srl"
}

cmd_start() {
  local dir
  dir="$(abs_dir "${1:-}")"
  for b in "$ETCD_BIN" "$KUBECTL_BIN" "$APISERVER_BIN"; do
    [[ -x $b ]] || die "$b missing: run '$0 install' first"
  done
  command -v openssl >/dev/null 2>&1 || die "openssl is required"

  local epid apid
  epid="$(read_pid "$dir/etcd.pid")"
  apid="$(read_pid "$dir/kube-apiserver.pid")"
  if pid_is "$epid" "$ETCD_BIN" && pid_is "$apid" "$APISERVER_BIN" && is_ready "$dir"; then
    log "already running in $dir (etcd pid $epid, kube-apiserver pid $apid)"
    echo "KUBECONFIG=$dir/kubeconfig"
    return 0
  fi
  if [[ -n $epid || -n $apid ]]; then
    log "stale or half-started environment in $dir: stopping it first"
    cmd_stop "$dir"
    mkdir -p "$dir"
  fi

  local eport="${WEFT_ETCD_PORT:-}" pport="${WEFT_ETCD_PEER_PORT:-}" aport="${WEFT_APISERVER_PORT:-}"
  [[ -n $eport ]] || eport="$(free_port "$pport" "$aport")"
  [[ -n $pport ]] || pport="$(free_port "$eport" "$aport")"
  [[ -n $aport ]] || aport="$(free_port "$eport" "$pport")"
  local p
  for p in "$eport" "$pport" "$aport"; do
    if port_in_use "$p"; then
      rmdir "$dir" 2>/dev/null || true
      die "port $p is already in use"
    fi
  done

  gen_certs "$dir"
  local token
  token="$(openssl rand -hex 24)"
  printf '%s,admin,weft-testenv-admin,"system:masters"\n' "$token" >"$dir/pki/tokens.csv"
  chmod 600 "$dir/pki/tokens.csv"

  log "starting etcd on 127.0.0.1:$eport"
  # No fsync: a test cluster's data never outlives its test, and fsync stalls behind a busy
  # disk (an image build beside it) turned into API timeouts.
  mkdir -p "$dir/etcd-data"
  chmod 700 "$dir/etcd-data"
  nohup "$ETCD_BIN" --name weft-testenv --data-dir "$dir/etcd-data" \
    --listen-client-urls "http://127.0.0.1:$eport" --advertise-client-urls "http://127.0.0.1:$eport" \
    --listen-peer-urls "http://127.0.0.1:$pport" --initial-advertise-peer-urls "http://127.0.0.1:$pport" \
    --initial-cluster "weft-testenv=http://127.0.0.1:$pport" --initial-cluster-state new \
    --logger zap --log-outputs stderr --unsafe-no-fsync \
    </dev/null >"$dir/etcd.log" 2>&1 &
  epid=$!
  echo "$epid" >"$dir/etcd.pid"

  log "starting kube-apiserver on https://127.0.0.1:$aport"
  # Bound service-account tokens: TokenRequest needs the issuer and the signing key; their
  # audience is what the caller asks for (istiod's CA wants istio-ca). No controller-manager
  # runs, so the ServiceAccount admission plugin (which would insist on the namespace's
  # "default" ServiceAccount) is disabled. No endpoint reconciler: the Endpoints of Service
  # "kubernetes" may not hold a loopback address, and nothing here needs them.
  # shellcheck disable=SC2086
  nohup "$APISERVER_BIN" \
    --bind-address=127.0.0.1 --advertise-address=127.0.0.1 --secure-port="$aport" \
    --etcd-servers="http://127.0.0.1:$eport" \
    --tls-cert-file="$dir/pki/serving.crt" --tls-private-key-file="$dir/pki/serving.key" \
    --token-auth-file="$dir/pki/tokens.csv" --authorization-mode=RBAC --anonymous-auth=false \
    --service-account-issuer=https://kubernetes.default.svc.cluster.local \
    --service-account-key-file="$dir/pki/sa.pub" --service-account-signing-key-file="$dir/pki/sa.key" \
    --api-audiences=https://kubernetes.default.svc.cluster.local \
    --service-cluster-ip-range="$SERVICE_CIDR" --endpoint-reconciler-type=none \
    --allow-privileged=true --disable-admission-plugins=ServiceAccount \
    --profiling=false --v=1 \
    ${WEFT_APISERVER_EXTRA_ARGS:-} \
    </dev/null >"$dir/kube-apiserver.log" 2>&1 &
  apid=$!
  echo "$apid" >"$dir/kube-apiserver.pid"

  local ca server="https://127.0.0.1:$aport"
  ca="$(base64 -w0 <"$dir/pki/ca.crt")"
  (
    umask 077
    cat >"$dir/kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: weft-testenv
  cluster:
    server: $server
    certificate-authority-data: $ca
users:
- name: admin
  user:
    token: $token
contexts:
- name: weft-testenv
  context:
    cluster: weft-testenv
    user: admin
current-context: weft-testenv
EOF
    cat >"$dir/env" <<EOF
KUBECONFIG=$dir/kubeconfig
WEFT_K8S_SERVER=$server
WEFT_K8S_TOKEN=$token
WEFT_K8S_CA=$dir/pki/ca.crt
WEFT_KUBECTL=$KUBECTL_BIN
WEFT_ETCD_ENDPOINT=http://127.0.0.1:$eport
WEFT_ETCD_PID=$epid
WEFT_APISERVER_PID=$apid
EOF
  )

  local timeout="${WEFT_START_TIMEOUT:-60}" t0=$SECONDS
  until is_ready "$dir"; do
    if ! pid_is "$epid" "$ETCD_BIN"; then
      show_log "$dir/etcd.log"
      cmd_stop "$dir" >/dev/null 2>&1 || true
      die "etcd exited during start-up (log above)"
    fi
    if ! pid_is "$apid" "$APISERVER_BIN"; then
      show_log "$dir/kube-apiserver.log"
      cmd_stop "$dir" >/dev/null 2>&1 || true
      die "kube-apiserver exited during start-up (log above)"
    fi
    if ((SECONDS - t0 >= timeout)); then
      show_log "$dir/kube-apiserver.log"
      cmd_stop "$dir" >/dev/null 2>&1 || true
      die "kube-apiserver not ready after ${timeout}s (log above)"
    fi
    sleep 0.5
  done
  log "ready after $((SECONDS - t0)) s: etcd pid $epid, kube-apiserver pid $apid"
  echo "KUBECONFIG=$dir/kubeconfig"
}

# Sends TERM, waits up to 15 s, then KILL (bounded), to a pid that is $2.
stop_pid() {
  local pid="$1" exe="$2" name="$3" i
  if ! pid_is "$pid" "$exe"; then
    [[ -n $pid ]] && log "$name (pid $pid) is not running"
    return 0
  fi
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < 150; i++)); do
    pid_is "$pid" "$exe" || { log "stopped $name (pid $pid)"; return 0; }
    sleep 0.1
  done
  log "$name (pid $pid) ignored SIGTERM for 15 s: SIGKILL"
  kill -KILL "$pid" 2>/dev/null || true
  for ((i = 0; i < 50; i++)); do
    pid_is "$pid" "$exe" || return 0
    sleep 0.1
  done
  die "$name (pid $pid) is still running"
}

cmd_stop() {
  [[ -n ${1:-} ]] || usage
  local dir="$1"
  if [[ ! -d $dir ]]; then
    log "$dir does not exist: nothing to stop"
    return 0
  fi
  dir="$(cd "$dir" && pwd -P)"
  local st
  for st in "$dir"/istio-cni-*/; do
    [[ -d $st ]] || continue
    st="${st%/}"
    stop_istio_cni "$dir" "${st##*/istio-cni-}"
    remove_istio_cni_state "$st"
  done
  stop_pid "$(read_pid "$dir/istiod.pid")" "$PILOT_BIN" istiod
  stop_pid "$(read_pid "$dir/kube-apiserver.pid")" "$APISERVER_BIN" kube-apiserver
  stop_pid "$(read_pid "$dir/etcd.pid")" "$ETCD_BIN" etcd
  # Only what `start` and `istiod` created; DIR itself goes if it is then empty.
  rm -rf "$dir/etcd-data" "$dir/pki" "$dir/istiod"
  rm -f "$dir/etcd.pid" "$dir/kube-apiserver.pid" "$dir/kubeconfig" "$dir/env" \
    "$dir/etcd.log" "$dir/kube-apiserver.log" \
    "$dir/istiod.pid" "$dir/istiod.env" "$dir/istiod.ports" "$dir/istiod.log" \
    "$dir/istiod-root-cert.pem"
  rmdir "$dir" 2>/dev/null || true
}

cmd_status() {
  local dir
  dir="$(existing_dir "${1:-}")"
  local epid apid
  epid="$(read_pid "$dir/etcd.pid")"
  apid="$(read_pid "$dir/kube-apiserver.pid")"
  pid_is "$epid" "$ETCD_BIN" || die "etcd is not running"
  pid_is "$apid" "$APISERVER_BIN" || die "kube-apiserver is not running"
  is_ready "$dir" || die "kube-apiserver is not ready"
  echo "ready: etcd pid $epid, kube-apiserver pid $apid, KUBECONFIG=$dir/kubeconfig"
}

# ---------------------------------------------------------------------------
# istiod
# ---------------------------------------------------------------------------

readonly ISTIO_NS="istio-system"
readonly ISTIOD_SAN="istiod.$ISTIO_NS.svc"

# The mesh config: the chart's (istio-discovery templates/configmap.yaml with the ambient
# profile's meshConfig merged in, as `istioctl manifest generate --set profile=ambient`
# renders it), as ConfigMap "istio", keys "mesh" and "meshNetworks", which is where istiod
# reads it when no file is at --meshConfig (the chart does the same).
mesh_configmap() {
  cat <<EOF
apiVersion: v1
kind: ConfigMap
metadata:
  name: istio
  namespace: $ISTIO_NS
  labels: {app: istiod, istio.io/rev: default, release: istio}
data:
  meshNetworks: |-
    networks: {}
  mesh: |-
    trustDomain: "cluster.local"
    rootNamespace: "$ISTIO_NS"
    defaultProviders:
      metrics:
      - prometheus
    enablePrometheusMerge: true
    defaultConfig:
      discoveryAddress: $ISTIOD_SAN:15012
      image:
        imageType: distroless
      proxyMetadata:
        ISTIO_META_ENABLE_HBONE: "true"
    serviceScopeConfigs:
    - servicesSelector:
        matchExpressions:
        - key: istio.io/global
          operator: In
          values: ["true"]
      scope: GLOBAL
EOF
}

# ServiceAccounts the chart creates: istiod's own and, from the ztunnel chart, the node
# proxy's (CA_TRUSTED_NODE_ACCOUNTS names it). Tests still create the ztunnel *Pod* (with
# spec.nodeName) themselves: istiod only lets a node proxy impersonate workloads of its node.
istio_accounts() {
  cat <<EOF
apiVersion: v1
kind: ServiceAccount
metadata: {name: istiod, namespace: $ISTIO_NS}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: ztunnel, namespace: $ISTIO_NS}
EOF
}

# Prints $1 (a file of KEY=VALUE lines) value of key $2.
env_get() { sed -n "s/^$2=//p" "$1" | head -n1; }

istiod_ready() {
  local port="$1"
  [[ "$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "http://127.0.0.1:$port/ready" 2>/dev/null)" == 200 ]]
}

cmd_istiod() {
  local dir
  dir="$(existing_dir "${1:-}")"
  [[ -x $PILOT_BIN ]] || die "$PILOT_BIN missing: run '$0 install' first"
  command -v curl >/dev/null 2>&1 || apt_get install -y --no-install-recommends curl
  is_ready "$dir" || die "no ready kube-apiserver in $dir: run '$0 start $dir' first"
  local pid
  pid="$(read_pid "$dir/istiod.pid")"
  if pid_is "$pid" "$PILOT_BIN" && [[ -f $dir/istiod.env ]] &&
    istiod_ready "$(env_get "$dir/istiod.ports" http)"; then
    log "istiod already running in $dir (pid $pid)"
    cat "$dir/istiod.env"
    return 0
  fi
  [[ -z $pid ]] || stop_pid "$pid" "$PILOT_BIN" istiod

  local kc=(kubectl_dir "$dir")
  local t0=$SECONDS
  # The namespace, the chart's ServiceAccounts, Istio's CRDs and the mesh config. The CRDs:
  # manifests/charts/base/templates/crds.yaml only re-labels files/crd-all.gen.yaml, which
  # is plain YAML (kubectl apply -f of it is supported upstream). Server-side apply: some
  # CRDs exceed the 256 KiB last-applied annotation of client-side apply.
  local src crds
  src="$GO_DIR/src/istio-$ISTIO_VERSION"
  crds="$src/manifests/charts/base/files/crd-all.gen.yaml"
  [[ -f $crds ]] || die "$crds missing: run '$0 install' first"
  local applied="$dir/istiod/.config-applied" # a restart finds them in the API server
  if [[ -f $applied ]]; then
    log "Istio's CRDs and mesh config already applied (restart)"
  else
    "${kc[@]}" create namespace "$ISTIO_NS" >/dev/null 2>&1 || "${kc[@]}" get namespace "$ISTIO_NS" >/dev/null ||
      die "cannot create namespace $ISTIO_NS"
    "${kc[@]}" apply --server-side --force-conflicts --field-manager=weft-testenv -f "$crds" >/dev/null ||
      die "applying Istio's CRDs ($crds) failed"
    "${kc[@]}" wait --for condition=established --timeout=60s -f "$crds" >/dev/null ||
      die "Istio's CRDs never became Established"
    istio_accounts | "${kc[@]}" apply -f - >/dev/null || die "creating Istio's ServiceAccounts failed"
    mesh_configmap | "${kc[@]}" apply -f - >/dev/null || die "applying the mesh config failed"
    log "CRDs ($(grep -c '^kind: CustomResourceDefinition' "$crds")), namespace, mesh config applied in $((SECONDS - t0)) s"
    mkdir -p "$dir/istiod"
    touch "$applied"
  fi

  # Ports: kept from an earlier `istiod DIR` (a restart keeps them), else free ones.
  local ports="$dir/istiod.ports"
  if [[ ! -f $ports ]]; then
    local taken=() name p
    for name in grpc secure http https monitoring ctrlz; do
      p="$(free_port "${taken[@]}")"
      taken+=("$p")
      echo "$name=$p"
    done >"$ports.tmp"
    mv "$ports.tmp" "$ports"
  fi
  local grpc secure http https monitoring ctrlz
  grpc="$(env_get "$ports" grpc)"
  secure="$(env_get "$ports" secure)"
  http="$(env_get "$ports" http)"
  https="$(env_get "$ports" https)"
  monitoring="$(env_get "$ports" monitoring)"
  ctrlz="$(env_get "$ports" ctrlz)"
  # A restart reuses the ports: only a listener on one of them is in the way (a stopped
  # istiod may hold its listeners a moment after its pid is gone; wait for that, bounded).
  local p i
  for p in "$grpc" "$secure" "$http" "$https" "$monitoring" "$ctrlz"; do
    for ((i = 0; i < 100; i++)); do
      port_listened "$p" || break
      sleep 0.1
    done
    port_listened "$p" && die "istiod port $p is already in use (something listens on it)"
  done

  # istiod's working directory: its relative defaults (./etc/cacerts for a plugged-in CA,
  # ./var/lib/istio/inject, ./etc/istio/config/mesh) resolve inside it and stay empty, so it
  # uses the self-signed CA in Secret istio-ca-secret (created on the first start, reused
  # on every restart) and the mesh config of ConfigMap "istio".
  mkdir -p "$dir/istiod"
  {
    echo "---- istiod start $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  } >>"$dir/istiod.log"

  # Environment: what the istio-discovery chart's Deployment sets (templates/deployment.yaml,
  # values.yaml, ambient profile; `istioctl manifest generate --set profile=ambient` renders
  # the same env, args and mesh config), then the out-of-cluster changes, each with its
  # reason. The chart's KUBECONFIG (/var/run/secrets/remote/config) and GOMAXPROCS (the
  # container's CPU limit) have local equivalents; JWT_POLICY is a node-agent setting that
  # istiod no longer reads (its CA checks tokens by TokenReview, audience TOKEN_AUDIENCES).
  local envs=(
    # chart
    REVISION=default
    PILOT_CERT_PROVIDER=istiod
    POD_NAME=istiod-weft-testenv
    POD_NAMESPACE="$ISTIO_NS"
    SERVICE_ACCOUNT=istiod
    # istiod talks to the API server as the admin (system:masters) rather than as its
    # ServiceAccount with the chart's ClusterRole.
    "KUBECONFIG=$dir/kubeconfig"
    CA_TRUSTED_NODE_ACCOUNTS="$ISTIO_NS/ztunnel"
    PILOT_ENABLE_AMBIENT=true
    PILOT_TRACE_SAMPLING=1
    PILOT_ENABLE_ANALYSIS=false
    CLUSTER_ID=Kubernetes
    PLATFORM=
    # Istio's defaults, spelt out because weft depends on them: the CA checks tokens by
    # TokenReview with this audience; ServiceEntry IPs are auto-allocated for ambient.
    TOKEN_AUDIENCES=istio-ca
    PILOT_ENABLE_IP_AUTOALLOCATE=true
    # Out of cluster:
    # - no Pod/Service of istiod exists and the API server cannot reach a webhook on this
    #   host's loopback, so the sidecar injector and the validating-webhook patcher are off
    #   (istiod would otherwise wait for/patch webhook configurations nobody serves);
    INJECT_ENABLED=false
    VALIDATION_WEBHOOK_CONFIG_NAME=
    INJECTION_WEBHOOK_CONFIG_NAME=
    # - one istiod only: no leader election, so a restarted istiod runs its controllers
    #   (the istio-ca-root-cert ConfigMaps among them) at once instead of waiting out the
    #   lease of its previous incarnation;
    ENABLE_LEADER_ELECTION=false
    # - the chart takes GOMAXPROCS from the container's CPU limit; this machine has 2 cores.
    GOMAXPROCS=2
  )
  local args=(
    discovery
    --kubeconfig "$dir/kubeconfig"
    --namespace "$ISTIO_NS"
    --domain cluster.local
    --keepaliveMaxServerConnectionAge 30m
    --log_output_level "${WEFT_ISTIOD_LOG_LEVEL:-default:info}"
    --grpcAddr "127.0.0.1:$grpc"
    --secureGRPCAddr "127.0.0.1:$secure"
    --httpAddr "127.0.0.1:$http"
    --httpsAddr "127.0.0.1:$https"
    --monitoringAddr "127.0.0.1:$monitoring"
    --ctrlz_address 127.0.0.1
    --ctrlz_port "$ctrlz"
    --shutdownDuration 1s
  )
  log "starting istiod: xDS+CA (TLS) 127.0.0.1:$secure, plaintext xDS 127.0.0.1:$grpc, http 127.0.0.1:$http"
  # shellcheck disable=SC2086
  (cd "$dir/istiod" && exec env "${envs[@]}" nohup "$PILOT_BIN" "${args[@]}" ${WEFT_ISTIOD_EXTRA_ARGS:-} \
    </dev/null >>"$dir/istiod.log" 2>&1) &
  pid=$!
  echo "$pid" >"$dir/istiod.pid"

  local timeout="${WEFT_ISTIOD_TIMEOUT:-90}" t1=$SECONDS
  local root="$dir/istiod-root-cert.pem"
  rm -f "$root"
  until istiod_ready "$http" && fetch_root "$dir" "$root"; do
    if ! pid_is "$pid" "$PILOT_BIN"; then
      show_log "$dir/istiod.log" 40
      die "istiod exited during start-up (log above)"
    fi
    if ((SECONDS - t1 >= timeout)); then
      show_log "$dir/istiod.log" 40
      stop_pid "$pid" "$PILOT_BIN" istiod
      die "istiod not ready (or no root certificate) after ${timeout}s (log above)"
    fi
    sleep 0.5
  done
  (
    umask 077
    cat >"$dir/istiod.env.tmp" <<EOF
WEFT_ISTIOD_XDS_ADDR=127.0.0.1:$secure
WEFT_ISTIOD_PLAINTEXT_ADDR=127.0.0.1:$grpc
WEFT_ISTIOD_DEBUG_ADDR=127.0.0.1:$http
WEFT_ISTIOD_WEBHOOK_ADDR=127.0.0.1:$https
WEFT_ISTIOD_MONITORING_ADDR=127.0.0.1:$monitoring
WEFT_ISTIOD_ROOT_CERT=$root
WEFT_ISTIOD_SAN=$ISTIOD_SAN
WEFT_ISTIOD_NAMESPACE=$ISTIO_NS
WEFT_ISTIOD_TRUST_DOMAIN=cluster.local
WEFT_ISTIOD_CLUSTER_ID=Kubernetes
WEFT_ISTIOD_TOKEN_AUDIENCE=istio-ca
WEFT_ISTIOD_LOG=$dir/istiod.log
WEFT_ISTIOD_PID=$pid
EOF
    mv "$dir/istiod.env.tmp" "$dir/istiod.env"
  )
  log "istiod ready after $((SECONDS - t1)) s (pid $pid)"
  cat "$dir/istiod.env"
}

# The mesh root: ConfigMap istio-ca-root-cert (istiod's namespace controller writes it into
# every namespace); it must hold a certificate.
fetch_root() {
  local dir="$1" out="$2"
  kubectl_dir "$dir" -n "$ISTIO_NS" get configmap istio-ca-root-cert \
    -o jsonpath='{.data.root-cert\.pem}' >"$out.tmp" 2>/dev/null || { rm -f "$out.tmp"; return 1; }
  grep -q 'BEGIN CERTIFICATE' "$out.tmp" || { rm -f "$out.tmp"; return 1; }
  mv "$out.tmp" "$out"
}

cmd_istiod_stop() {
  local dir
  dir="$(existing_dir "${1:-}")"
  stop_pid "$(read_pid "$dir/istiod.pid")" "$PILOT_BIN" istiod
  # istiod.ports stays: the next `istiod DIR` listens on the same ports. The CA stays in
  # Secret istio-ca-secret of the API server.
  rm -f "$dir/istiod.pid" "$dir/istiod.env"
}

# ---------------------------------------------------------------------------
# istio-cni (the node agent, ambient mode)
# ---------------------------------------------------------------------------

SCRIPT_PATH="$(readlink -f "${BASH_SOURCE[0]}")"
readonly SCRIPT_PATH
# Istio's default ambient enablement (istio-cni chart values.yaml, ambient.enablementSelectors):
# a pod labelled istio.io/dataplane-mode=ambient, or any pod not labelled
# istio.io/dataplane-mode=none in a namespace labelled istio.io/dataplane-mode=ambient.
readonly AMBIENT_SELECTOR='[{"podSelector":{"matchLabels":{"istio.io/dataplane-mode":"ambient"}}},{"podSelector":{"matchExpressions":[{"key":"istio.io/dataplane-mode","operator":"NotIn","values":["none"]}]},"namespaceSelector":{"matchLabels":{"istio.io/dataplane-mode":"ambient"}}}]'
# Debian's python3 (a python3 first on PATH may be a wrapper such as pyenv's shim, whose pid is
# not the interpreter's).
readonly SYSTEM_PYTHON=/usr/bin/python3
readonly CNI_READY_PORT=8000 # the agent's /readyz: constants.ReadinessPort, not configurable

# The API server's TCP port as a listener inside another network namespace: listens on
# 127.0.0.1:PORT in the namespace at path $1 (the socket is created there after setns), and
# connects each accepted connection to $3:$4 from the namespace it started in (setns back before
# any other thread runs). TLS passes through untouched: the API server's certificate names
# 127.0.0.1. Prints "ready" once listening.
forwarder_py() {
  cat <<'PY'
import ctypes, os, socket, sys, threading
CLONE_NEWNET = 0x40000000
libc = ctypes.CDLL(None, use_errno=True)
def setns(fd):
    if libc.setns(fd, CLONE_NEWNET) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
netns, port, host, hport = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
home = os.open("/proc/self/ns/net", os.O_RDONLY)
there = os.open(netns, os.O_RDONLY)
setns(there)
lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
lsock.bind(("127.0.0.1", port))
lsock.listen(128)
setns(home)
os.close(there)
def pump(src, dst):
    try:
        while True:
            data = src.recv(65536)
            if not data:
                break
            dst.sendall(data)
    except OSError:
        pass
    finally:
        try:
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass
def serve(client):
    try:
        upstream = socket.create_connection((host, hport), timeout=10)
        upstream.settimeout(None)
    except OSError:
        client.close()
        return
    back = threading.Thread(target=pump, args=(upstream, client), daemon=True)
    back.start()
    pump(client, upstream)
    back.join()
    client.close()
    upstream.close()
print("ready", flush=True)
while True:
    conn, _ = lsock.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
PY
}

# true if something listens on TCP port $2 inside network namespace $1.
ns_port_listened() {
  local hex
  hex="$(printf '%04X' "$2")"
  ip netns exec "$1" awk -v p=":$hex" \
    'NR > 1 && $4 == "0A" && substr($2, length($2) - 4) == p { f = 1 } END { exit !f }' \
    /proc/net/tcp /proc/net/tcp6 2>/dev/null
}

# A free port inside network namespace $1 that is not in ${@:2}.
ns_free_port() {
  local ns="$1" p i x taken
  shift
  for ((i = 0; i < 200; i++)); do
    p=$((20000 + (RANDOM * 32768 + RANDOM) % 12768))
    taken=0
    for x in "$@"; do [[ $x == "$p" ]] && taken=1; done
    ((taken)) && continue
    ns_port_listened "$ns" "$p" || { echo "$p"; return 0; }
  done
  die "no free TCP port found in network namespace $ns"
}

# pid $1 alive and running $2. A process chrooted in a mount namespace of its own shows
# /proc/PID/exe as a path of that namespace, so its command line is compared too.
pid_runs() {
  local pid="$1" exe="$2" argv0
  pid_is "$pid" "$exe" && return 0
  [[ $pid =~ ^[0-9]+$ ]] && [[ -r /proc/$pid/cmdline ]] || return 1
  argv0="$(tr '\0' '\n' <"/proc/$pid/cmdline" 2>/dev/null | head -n1)"
  [[ $argv0 == "$exe" ]]
}

istio_cni_ready() {
  local ns="$1" code
  code="$(ip netns exec "$ns" curl -s -o /dev/null -w '%{http_code}' --max-time 2 \
    "http://127.0.0.1:$CNI_READY_PORT/readyz" 2>/dev/null || true)"
  [[ $code == 200 ]]
}

# Mirrors directory $1 into directory $2 (on the new root's tmpfs): each entry of $1 is
# bind-mounted there (directories recursively, with their submounts) or copied (symbolic
# links), except entries named in $3... (paths relative to $1): an entry that is one of them is
# left out (the caller mounts it), an entry on the way to one of them becomes a plain
# directory mirrored the same way. Nothing is created outside $2.
mirror_dir() {
  local src="$1" dst="$2" e name n target on_way
  shift 2
  for e in "$src"/* "$src"/.[!.]* "$src"/..?*; do
    [[ -e $e || -L $e ]] || continue
    name="${e##*/}"
    target=0 on_way=0
    local sub=()
    for n in "$@"; do
      if [[ $n == "$name" ]]; then
        target=1
      elif [[ $n == "$name"/* ]]; then
        on_way=1
        sub+=("${n#"$name"/}")
      fi
    done
    ((target)) && continue
    if ((on_way)); then
      [[ -d $e && ! -L $e ]] || die "cannot mirror $e: it is on the way to ${sub[*]} but not a directory"
      mkdir "$dst/$name"
      mirror_dir "$e" "$dst/$name" "${sub[@]}"
    elif [[ -L $e ]]; then
      cp -P "$e" "$dst/$name"
    elif [[ -d $e ]]; then
      mkdir "$dst/$name"
      mount --rbind "$e" "$dst/$name"
    else
      touch "$dst/$name"
      mount --bind "$e" "$dst/$name"
    fi
  done
}

# `_istio-cni-exec STATE HOST_MNT_NS`: the last step of `istio-cni`, run by it inside the node's
# network namespace (ip netns exec) and a mount namespace of its own (unshare --mount
# --propagation slave: nothing mounted here is seen outside, and it all goes away with the
# agent). Builds the file system the istio-cni DaemonSet's container sees (its hostPath mounts
# at fixed paths the agent does not let one configure) as a new root on a tmpfs, then chroots
# into it and execs the agent:
#   everything of /          bind-mounted at the same path (so every path of the test, its
#                            sockets and directories, means the same inside and outside)
#   /host/proc               /proc (procfs: the agent finds pods' netns in /host/proc/PID/ns/net),
#                            with /host/proc/1/ns/net showing the node's netns (see below)
#   /host/run/netns, /host/var/run/netns   /run/netns (the agent opens /host + CNI_NETNS)
#   /host/opt/cni/bin        STATE/bin (the installer copies the plugin there)
#   /host/etc/cni/net.d      STATE/net.d (the installer chains istio-cni into the conflist there)
#   /opt/cni/bin/istio-cni   the cached plugin binary (what the image ships, copied by the installer)
#   /var/run/secrets/kubernetes.io/serviceaccount   STATE/serviceaccount (token, ca.crt,
#                            namespace: in-cluster API access, and what the installer writes
#                            into the plugin's kubeconfig)
cmd_istio_cni_exec() {
  local state="$1" host_mnt="$2" host_net="$3"
  [[ -n $state && -n $host_mnt && -n $host_net && -f $state/agent.env ]] || die "_istio-cni-exec: bad arguments"
  # Refuse to mount anything in the caller's mount namespace or to run in its netns.
  [[ "$(readlink /proc/self/ns/mnt)" != "$host_mnt" ]] || die "_istio-cni-exec: not in a mount namespace of its own"
  [[ "$(readlink /proc/self/ns/net)" != "$host_net" ]] ||
    die "_istio-cni-exec: refusing to run the node agent in the caller's network namespace"
  local root="$state/root"
  mount -t tmpfs -o mode=0755 weft-istio-cni "$root"
  # The top-level directory holding STATE first: its copy then holds the new root as the
  # empty tmpfs it is now, not copies of everything mounted below it later.
  local top="${state#/}"
  top="${top%%/*}"
  local run sa
  run="$(readlink -f /var/run)"
  sa="${run#/}/secrets/kubernetes.io/serviceaccount"
  [[ $top != "${sa%%/*}" && $top != opt && $top != host ]] ||
    die "the state directory $state must not be under /${sa%%/*}, /opt or /host"
  mkdir "$root/$top"
  mount --rbind "/$top" "$root/$top"
  mirror_dir / "$root" "$top" host opt/cni/bin "$sa"
  mkdir -p "$root/opt/cni/bin" "$root/$sa" "$root/host/proc" "$root/host/run/netns" \
    "$root/host/var/run/netns" "$root/host/opt/cni/bin" "$root/host/etc/cni/net.d"
  touch "$root/opt/cni/bin/istio-cni"
  mount --bind "$CNI_PLUGIN_BIN" "$root/opt/cni/bin/istio-cni"
  mount --bind "$state/serviceaccount" "$root/$sa"
  mount --rbind /proc "$root/host/proc"
  # The agent takes /host/proc/1/ns/net for the host's netns (it never enrolls a pod found
  # there). PID 1 is in the machine's root netns (and its ns links may not even be readable,
  # as in some sandboxes): here the host is the node's netns, so that is what it shows.
  mount -t tmpfs -o mode=0755 weft-host-ns "$root/host/proc/1/ns"
  touch "$root/host/proc/1/ns/net"
  mount --bind /proc/self/ns/net "$root/host/proc/1/ns/net"
  mount --rbind /run/netns "$root/host/run/netns"
  mount --rbind /run/netns "$root/host/var/run/netns"
  mount --bind "$state/bin" "$root/host/opt/cni/bin"
  mount --bind "$state/net.d" "$root/host/etc/cni/net.d"
  local envs=() args=() line
  while IFS= read -r line; do envs+=("$line"); done <"$state/agent.env"
  while IFS= read -r line; do args+=("$line"); done <"$state/agent.args"
  echo "---- install-cni start $(date -u +%Y-%m-%dT%H:%M:%SZ) (pid $$, netns $(readlink /proc/self/ns/net))"
  exec chroot "$root" /usr/bin/env -i "${envs[@]}" "$INSTALL_CNI_BIN" "${args[@]}"
}

valid_node_name() { [[ $1 =~ ^[a-z0-9]([-a-z0-9.]{0,61}[a-z0-9])?$ ]]; }

# Stops the agent of node $2 in environment directory $1 (and its API server forwarder).
stop_istio_cni() {
  local dir="$1" node="$2" state="$1/istio-cni-$2"
  stop_pid_runs "$(read_pid "$state/agent.pid")" "$INSTALL_CNI_BIN" "istio-cni node agent ($node)"
  stop_pid_runs "$(read_pid "$state/forwarder.pid")" "$(readlink -f "$SYSTEM_PYTHON")" \
    "API server forwarder ($node)"
  stop_pid_runs "$(read_pid "$state/kubelet.pid")" "$state/kubelet" "kubelet stand-in ($node)"
  rm -f "$state/agent.pid" "$state/forwarder.pid" "$state/kubelet.pid" "$dir/istio-cni-$node.env"
}

# Removes an agent's state directory $1 (after stop_istio_cni). Its root/ was the agent's new
# root only inside the agent's own mount namespace: here it must be an empty directory, and
# nothing is deleted if it is not.
remove_istio_cni_state() {
  local st="$1"
  if [[ -d $st/root ]]; then
    mountpoint -q "$st/root" && die "$st/root is a mount point here: not removing $st"
    rmdir "$st/root" || die "$st/root is not empty: not removing $st"
  fi
  rm -rf "$st"
}

# stop_pid for a process identified by pid_runs.
stop_pid_runs() {
  local pid="$1" exe="$2" name="$3" i
  if ! pid_runs "$pid" "$exe"; then
    [[ -n $pid ]] && log "$name (pid $pid) is not running"
    return 0
  fi
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < 200; i++)); do
    pid_runs "$pid" "$exe" || { log "stopped $name (pid $pid)"; return 0; }
    sleep 0.1
  done
  log "$name (pid $pid) ignored SIGTERM for 20 s: SIGKILL"
  kill -KILL "$pid" 2>/dev/null || true
  for ((i = 0; i < 50; i++)); do
    pid_runs "$pid" "$exe" || return 0
    sleep 0.1
  done
  die "$name (pid $pid) is still running"
}

cmd_istio_cni() {
  local dir netns="${2:-}" node="${3:-}"
  dir="$(existing_dir "${1:-}")"
  [[ -n $netns && -n $node ]] || usage
  valid_node_name "$node" || die "NODE_NAME '$node' is not a valid Kubernetes node name"
  [[ -x $INSTALL_CNI_BIN && -x $CNI_PLUGIN_BIN ]] || die "$INSTALL_CNI_BIN or $CNI_PLUGIN_BIN missing: run '$0 install' first"
  is_ready "$dir" || die "no ready kube-apiserver in $dir: run '$0 start $dir' first"
  local nspath="/run/netns/$netns"
  [[ -e $nspath ]] || die "no network namespace $netns ($nspath)"
  # Never the root network namespace: the agent writes host rules into the one it runs in.
  # (PID 1's namespace may not be readable here: then ours, which a test treats as the root.)
  local ino
  ino="$(stat -L -c %i "$nspath")"
  [[ $ino != "$(stat -L -c %i /proc/self/ns/net)" && $ino != "$(stat -L -c %i /proc/1/ns/net 2>/dev/null)" ]] ||
    die "$netns is the root network namespace: the node agent must run in a namespace of its own"
  local need=()
  command -v curl >/dev/null 2>&1 || need+=(curl)
  [[ -x $SYSTEM_PYTHON ]] || need+=(python3)
  command -v iptables >/dev/null 2>&1 || need+=(iptables)
  command -v nft >/dev/null 2>&1 || need+=(nftables)
  command -v unshare >/dev/null 2>&1 || need+=(util-linux)
  ((${#need[@]} == 0)) || apt_get install -y --no-install-recommends "${need[@]}"

  local state="$dir/istio-cni-$node"
  local pid
  pid="$(read_pid "$state/agent.pid")"
  if pid_runs "$pid" "$INSTALL_CNI_BIN" && [[ -f $dir/istio-cni-$node.env ]] && istio_cni_ready "$netns"; then
    log "istio-cni node agent for $node already running (pid $pid)"
    cat "$dir/istio-cni-$node.env"
    return 0
  fi
  stop_istio_cni "$dir" "$node"
  mkdir -p "$state"/{run,bin,net.d,serviceaccount,root}
  mountpoint -q "$state/root" && die "$state/root is a mount point in this mount namespace: refusing"

  # Ports inside $netns, kept across restarts: the API server forwarder (the API server's
  # own port number when free there), the agent's metrics and ControlZ.
  local ports="$state/ports" aport
  aport="$(sed -n 's#^WEFT_K8S_SERVER=https://127.0.0.1:##p' "$dir/env")"
  [[ $aport =~ ^[0-9]+$ ]] || die "no API server port in $dir/env"
  if [[ ! -f $ports ]]; then
    local fport mport cport
    if ns_port_listened "$netns" "$aport" || [[ $aport == "$CNI_READY_PORT" ]]; then
      fport="$(ns_free_port "$netns" "$CNI_READY_PORT")"
    else
      fport="$aport"
    fi
    mport="$(ns_free_port "$netns" "$fport" "$CNI_READY_PORT")"
    cport="$(ns_free_port "$netns" "$fport" "$mport" "$CNI_READY_PORT")"
    printf 'apiserver=%s\nmonitoring=%s\nctrlz=%s\n' "$fport" "$mport" "$cport" >"$ports.tmp"
    mv "$ports.tmp" "$ports"
  fi
  local fport mport cport p i
  fport="$(env_get "$ports" apiserver)"
  mport="$(env_get "$ports" monitoring)"
  cport="$(env_get "$ports" ctrlz)"
  for p in "$fport" "$mport" "$cport" "$CNI_READY_PORT"; do
    for ((i = 0; i < 100; i++)); do
      ns_port_listened "$netns" "$p" || break
      sleep 0.1
    done
    ns_port_listened "$netns" "$p" && die "port $p is already in use in network namespace $netns"
  done

  # The API server, reachable from $netns as https://127.0.0.1:$fport.
  local py
  py="$(readlink -f "$SYSTEM_PYTHON")"
  : >"$state/forwarder.log"
  nohup "$py" -u -c "$(forwarder_py)" "$nspath" "$fport" 127.0.0.1 "$aport" \
    </dev/null >>"$state/forwarder.log" 2>&1 &
  local fpid=$!
  echo "$fpid" >"$state/forwarder.pid"
  # Our own child, so its pid stays ours until reaped: "gone" means it exited. (Whether it
  # is python yet says nothing: under load the fork may not have exec'd it.)
  for ((i = 0; i < 100; i++)); do
    grep -qx ready "$state/forwarder.log" && break
    kill -0 "$fpid" 2>/dev/null || break
    sleep 0.1
  done
  grep -qx ready "$state/forwarder.log" || {
    show_log "$state/forwarder.log"
    stop_istio_cni "$dir" "$node"
    die "the API server forwarder did not start in $netns"
  }

  # What the pod's service account mount holds: the admin token (the agent and the plugin act
  # as the admin, as istiod does here, instead of as ServiceAccount istio-cni with the chart's
  # ClusterRole), the API server's CA, the namespace.
  local token
  token="$(sed -n 's/^WEFT_K8S_TOKEN=//p' "$dir/env")"
  (
    umask 077
    printf '%s' "$token" >"$state/serviceaccount/token"
    cp "$dir/pki/ca.crt" "$state/serviceaccount/ca.crt"
    printf '%s' "$ISTIO_NS" >"$state/serviceaccount/namespace"
  )
  # The node's primary CNI network, which the installer chains istio-cni into (as it does with
  # the network of the cluster's CNI). Its own plugin is never run: the lab has already wired
  # each pod, and a test hands the plugin that result as prevResult.
  local conflist="$state/net.d/10-weft-lab.conflist"
  cat >"$conflist" <<JSON
{
  "cniVersion": "1.0.0",
  "name": "weft-lab",
  "plugins": [
    {"type": "weft-lab-veth"}
  ]
}
JSON
  rm -f "$state/bin/istio-cni" "$state/run/istio-cni-kubeconfig"

  # The backend: iptables (the chart's default, global.nativeNftables=false) or nftables.
  local backend="${WEFT_ISTIO_CNI_BACKEND:-iptables}" native
  case "$backend" in
    iptables) native=false ;;
    nftables) native=true ;;
    *) die "WEFT_ISTIO_CNI_BACKEND must be iptables or nftables, not '$backend'" ;;
  esac
  if [[ $backend == nftables ]]; then
    # The nftables backend SNATs the kubelet's probes by the kubelet's UID ("meta skuid"),
    # which it finds at start-up as a process named kubelet in /host/proc (and fails without
    # one). There is no kubelet here: a stand-in (sleep, run as "kubelet", as root like a
    # real kubelet) in the node's netns, stopped with the agent.
    ln -sfn "$(readlink -f "$(command -v sleep)")" "$state/kubelet"
    nohup ip netns exec "$netns" "$state/kubelet" infinity </dev/null >/dev/null 2>&1 &
    echo $! >"$state/kubelet.pid"
  fi

  # Environment: the istio-cni chart's ConfigMap (configmap-cni.yaml; ambient profile:
  # ambient.enabled=true) and DaemonSet env (daemonset.yaml), then the out-of-cluster changes,
  # each with its reason.
  local envs=(
    PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
    HOME=/root
    # chart ConfigMap istio-cni-config
    AMBIENT_ENABLED=true
    "AMBIENT_ENABLEMENT_SELECTOR=$AMBIENT_SELECTOR"
    AMBIENT_IPV6=true
    AMBIENT_RECONCILE_POD_RULES_ON_STARTUP=true
    ENABLE_AMBIENT_DETECTION_RETRY=false
    ISTIO_OWNED_CNI_CONFIG=false
    CHAINED_CNI_PLUGIN=true
    EXCLUDE_NAMESPACES=kube-system
    "NATIVE_NFTABLES=$native"
    # chart DaemonSet env
    "REPAIR_NODE_NAME=$node"
    REPAIR_RUN_AS_DAEMON=true
    REPAIR_SIDECAR_ANNOTATION=sidecar.istio.io/status
    "NODE_NAME=$node"
    "POD_NAME=istio-cni-node-$node"
    "POD_NAMESPACE=$ISTIO_NS"
    GOMAXPROCS=2
    # what the kubelet gives every container: in-cluster API access (with the service
    # account mount above); the installer also writes them into the plugin's kubeconfig
    KUBERNETES_SERVICE_HOST=127.0.0.1
    "KUBERNETES_SERVICE_PORT=$fport"
    # DNS capture on, the chart's default: the pods' DNS goes to weft's DNS proxy.
    AMBIENT_DNS_CAPTURE=true
    # Out of cluster:
    # - no sidecar pods, so no race repair (chart default: true): it would run a second pod
    #   controller for nothing;
    REPAIR_ENABLED=false
    # - sockets under STATE instead of hostPath /var/run/istio-cni and /var/run/ztunnel;
    "CNI_AGENT_RUN_DIR=$state/run"
    "ZTUNNEL_UDS_ADDRESS=$state/ztunnel.sock"
    # - metrics on a free port of $netns (chart: 15014);
    "MONITORING_PORT=$mport"
    # - the installer's node name (else the host name);
    "KUBERNETES_NODE_NAME=$node"
    # - iptables-nft, Debian's iptables, always: the agent otherwise picks iptables-legacy as
    #   soon as any legacy table exists in the namespace (even one left by its own probe);
    FORCE_IPTABLES_BINARY=nft
    # - NOT the chart's ALLOW_SWITCH_TO_HOST_NS=true: that makes the agent write host rules
    #   into /host/proc/1/ns/net, the machine's root network namespace. Unset, the agent's
    #   "host" is the namespace it runs in, $netns.
  )
  local args=(
    --log_output_level "${WEFT_ISTIO_CNI_LOG_LEVEL:-default:info}"
    --ctrlz_address 127.0.0.1
    --ctrlz_port "$cport"
  )
  printf '%s\n' "${envs[@]}" >"$state/agent.env"
  printf '%s\n' "${args[@]}" >"$state/agent.args"

  local log="$state/agent.log"
  log "starting istio-cni node agent for node $node in netns $netns (backend $backend)"
  nohup ip netns exec "$netns" unshare --mount --propagation slave \
    bash "$SCRIPT_PATH" _istio-cni-exec "$state" "$(readlink /proc/self/ns/mnt)" "$(readlink /proc/self/ns/net)" \
    </dev/null >>"$log" 2>&1 &
  pid=$!
  echo "$pid" >"$state/agent.pid"

  local timeout="${WEFT_ISTIO_CNI_TIMEOUT:-60}" t0=$SECONDS
  until istio_cni_ready "$netns" && [[ -S $state/ztunnel.sock && -x $state/bin/istio-cni ]] &&
    grep -q '"type": *"istio-cni"' "$conflist" 2>/dev/null; do
    if ! kill -0 "$pid" 2>/dev/null; then
      show_log "$log" 40
      stop_istio_cni "$dir" "$node"
      die "the istio-cni node agent exited during start-up (log above)"
    fi
    if ((SECONDS - t0 >= timeout)); then
      show_log "$log" 40
      stop_istio_cni "$dir" "$node"
      die "the istio-cni node agent not ready after ${timeout}s (log above)"
    fi
    sleep 0.25
  done
  (
    umask 077
    cat >"$dir/istio-cni-$node.env.tmp" <<ENV
WEFT_ISTIO_CNI_NODE=$node
WEFT_ISTIO_CNI_NETNS=$netns
WEFT_ISTIO_CNI_ZDS_SOCKET=$state/ztunnel.sock
WEFT_ISTIO_CNI_PLUGIN=$state/bin/istio-cni
WEFT_ISTIO_CNI_PATH=$state/bin
WEFT_ISTIO_CNI_CONF=$conflist
WEFT_ISTIO_CNI_RUN_DIR=$state/run
WEFT_ISTIO_CNI_BACKEND=$backend
WEFT_ISTIO_CNI_APISERVER=https://127.0.0.1:$fport
WEFT_ISTIO_CNI_READY_ADDR=127.0.0.1:$CNI_READY_PORT
WEFT_ISTIO_CNI_MONITORING_ADDR=127.0.0.1:$mport
WEFT_ISTIO_CNI_LOG=$log
WEFT_ISTIO_CNI_PID=$pid
WEFT_ISTIO_CNI_FORWARDER_PID=$(read_pid "$state/forwarder.pid")
ENV
    mv "$dir/istio-cni-$node.env.tmp" "$dir/istio-cni-$node.env"
  )
  log "istio-cni node agent for $node ready after $((SECONDS - t0)) s (pid $pid)"
  cat "$dir/istio-cni-$node.env"
}

cmd_istio_cni_stop() {
  local dir node="${2:-}"
  dir="$(existing_dir "${1:-}")"
  [[ -n $node ]] || usage
  valid_node_name "$node" || die "NODE_NAME '$node' is not a valid Kubernetes node name"
  stop_istio_cni "$dir" "$node"
}

case "${1:-}" in
  install) cmd_install ;;
  start) cmd_start "${2:-}" ;;
  stop) cmd_stop "${2:-}" ;;
  status) cmd_status "${2:-}" ;;
  istiod) cmd_istiod "${2:-}" ;;
  istiod-stop) cmd_istiod_stop "${2:-}" ;;
  istio-cni) cmd_istio_cni "${2:-}" "${3:-}" "${4:-}" ;;
  istio-cni-stop) cmd_istio_cni_stop "${2:-}" "${3:-}" ;;
  _istio-cni-exec) cmd_istio_cni_exec "${2:-}" "${3:-}" "${4:-}" ;;
  paths) cmd_paths ;;
  *) usage ;;
esac
