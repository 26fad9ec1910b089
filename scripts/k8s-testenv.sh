#!/usr/bin/env bash
# k8s-testenv.sh — a real control plane on this machine for weft's tests: etcd,
# kube-apiserver and istiod, all on loopback.
#
#   scripts/k8s-testenv.sh install          build/cache every binary (idempotent), print name=path
#   scripts/k8s-testenv.sh paths            print the same name=path lines without building
#   scripts/k8s-testenv.sh start DIR        start etcd + kube-apiserver, state in DIR
#   scripts/k8s-testenv.sh istiod DIR       start istiod against the API server of DIR
#   scripts/k8s-testenv.sh istiod-stop DIR  stop istiod (its ports and CA stay for the next start)
#   scripts/k8s-testenv.sh stop DIR         stop everything `start`/`istiod` started, wipe DIR
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
#     go.mod and go.sum and its standard build tags, in one `go build`. build_istio takes
#     package paths: istio-cni's node agent (./cni/cmd/istio-cni) can be added there.
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
set -euo pipefail


usage() {
  sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//' >&2
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

readonly ETCD_BIN="$BIN_DIR/etcd"
readonly KUBECTL_BIN="$BIN_DIR/kubectl"
readonly APISERVER_BIN="$BIN_DIR/kube-apiserver"
readonly PILOT_BIN="$BIN_DIR/pilot-discovery"
readonly ISTIOCTL_BIN="$BIN_DIR/istioctl"
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
# Istio's standard tags, into $BIN_DIR. The hook for the istio-cni node agent later:
#   build_istio "$stamp" ./cni/cmd/istio-cni   (Istio builds it with its AGENT_TAGS:
#   ISTIO_BUILD_TAGS_OVERRIDE=agent,disable_pgv,grpcnotrace,retrynotrace)
build_istio() {
  local stamp="$1"
  shift
  local dir out p
  dir="$(istio_src)"
  out="$dir/out"
  rm -rf "$out"
  BUILD_TAGS=("-tags=${ISTIO_BUILD_TAGS_OVERRIDE:-$ISTIO_TAGS}")
  go_build "$dir" "$out" "$(istio_ldflags)" istio "$@"
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
  mkdir -p "$dir/etcd-data"
  chmod 700 "$dir/etcd-data"
  nohup "$ETCD_BIN" --name weft-testenv --data-dir "$dir/etcd-data" \
    --listen-client-urls "http://127.0.0.1:$eport" --advertise-client-urls "http://127.0.0.1:$eport" \
    --listen-peer-urls "http://127.0.0.1:$pport" --initial-advertise-peer-urls "http://127.0.0.1:$pport" \
    --initial-cluster "weft-testenv=http://127.0.0.1:$pport" --initial-cluster-state new \
    --logger zap --log-outputs stderr \
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

case "${1:-}" in
  install) cmd_install ;;
  start) cmd_start "${2:-}" ;;
  stop) cmd_stop "${2:-}" ;;
  status) cmd_status "${2:-}" ;;
  istiod) cmd_istiod "${2:-}" ;;
  istiod-stop) cmd_istiod_stop "${2:-}" ;;
  paths) cmd_paths ;;
  *) usage ;;
esac
