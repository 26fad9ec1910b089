#!/usr/bin/env bash
# k8s-testenv.sh — a real Kubernetes API server (etcd + kube-apiserver) on this
# machine, for weft's Kubernetes tests and manifest validation.
#
#   scripts/k8s-testenv.sh install        apt packages + build/cache kube-apiserver
#   scripts/k8s-testenv.sh start DIR      start etcd + kube-apiserver, state in DIR
#   scripts/k8s-testenv.sh stop DIR       stop exactly what `start DIR` started, wipe DIR
#   scripts/k8s-testenv.sh status DIR     exit 0 when the API server in DIR is ready
#   scripts/k8s-testenv.sh paths          print the cached binary paths
#
# Everything comes from Debian bookworm alone:
#   * etcd 3.4 and kubectl 1.20 from the binary packages `etcd-server` and
#     `kubernetes-client`. They are unpacked with `dpkg -x` into the cache rather
#     than installed: installing etcd-server would start a system etcd, and
#     kubernetes-client's /usr/bin/kubectl may clash with another kubectl.
#   * kube-apiserver v1.20.2 built from the `kubernetes` *source* package (which
#     ships its whole vendor/ tree) with golang-1.19, offline. The vendored
#     github.com/modern-go/reflect2 v1.0.1 crashes the server on the first
#     custom-resource watch when built with Go >= 1.18, so it is replaced by
#     Debian's golang-github-modern-go-reflect2-dev (1.0.2) before building.
# The build takes 5-17 minutes on 2 cores (the latter on a busy machine); the
# binaries are cached in ${WEFT_CACHE:-$HOME/.cache/weft}/k8s/bin and the build
# is skipped when they are present.
#
# `start DIR` writes:
#   DIR/kubeconfig          server https://127.0.0.1:PORT, CA data, admin bearer token
#   DIR/env                 KEY=VALUE lines (KUBECONFIG, server URL, token, pids, ports)
#   DIR/etcd.pid, DIR/kube-apiserver.pid
#   DIR/etcd.log, DIR/kube-apiserver.log
# The admin token belongs to group system:masters; authorization is RBAC.
# There is no controller-manager, scheduler or kubelet: tests create the objects
# they need (a namespace's "default" ServiceAccount is never auto-created, and
# deleted namespaces stay Terminating). The ServiceAccount admission plugin is
# disabled so that pods can be created without service-account token secrets.
#
# Environment knobs:
#   WEFT_CACHE                 cache root (default $HOME/.cache/weft)
#   WEFT_ETCD_PORT             etcd client port      (default: a free port)
#   WEFT_ETCD_PEER_PORT        etcd peer port        (default: a free port)
#   WEFT_APISERVER_PORT        kube-apiserver port   (default: a free port)
#   WEFT_START_TIMEOUT         seconds to wait for /readyz (default 60)
#   WEFT_BUILD_TIMEOUT         seconds allowed for the kube-apiserver build (default 3600)
#   WEFT_APISERVER_EXTRA_ARGS  extra kube-apiserver flags (word-split)
set -euo pipefail

readonly SELF="k8s-testenv"
readonly K8S_CACHE="${WEFT_CACHE:-${HOME:-/root}/.cache/weft}/k8s"
readonly BIN_DIR="$K8S_CACHE/bin"
readonly ETCD_BIN="$BIN_DIR/etcd"
readonly KUBECTL_BIN="$BIN_DIR/kubectl"
readonly APISERVER_BIN="$BIN_DIR/kube-apiserver"
# Written next to kube-apiserver once it was built with the reflect2 fix; a
# binary without it is rebuilt.
readonly APISERVER_STAMP="$BIN_DIR/kube-apiserver.stamp"
readonly STAMP_CONTENT="kube-apiserver from Debian bookworm source package kubernetes, golang-1.19, reflect2 1.0.2"
readonly SRC_LIST="/etc/apt/sources.list.d/weft-src.sources"
readonly GO_ROOT="/usr/lib/go-1.19"
readonly SERVICE_CIDR="10.250.128.0/20"

log() { printf '%s: %s\n' "$SELF" "$*" >&2; }
die() { printf '%s: error: %s\n' "$SELF" "$*" >&2; exit 1; }

usage() {
  sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
}

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

have_cached_bins() {
  [[ -x $ETCD_BIN && -x $KUBECTL_BIN && -x $APISERVER_BIN && -f $APISERVER_STAMP ]] &&
    [[ "$(cat "$APISERVER_STAMP")" == "$STAMP_CONTENT" ]]
}

# Prints "URI<TAB>SIGNED_BY" of the apt entry that serves Debian bookworm
# binary packages (SIGNED_BY may be empty). Handles deb822 (.sources) and
# one-line (.list) formats; our own file is ignored.
find_bookworm_entry() {
  local f
  local files=()
  [[ -f /etc/apt/sources.list ]] && files+=(/etc/apt/sources.list)
  for f in /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
    [[ -f $f && $f != "$SRC_LIST" ]] && files+=("$f")
  done
  for f in "${files[@]}"; do
    if [[ $f == *.sources ]]; then
      awk '
        function flush() {
          if (types ~ /(^| )deb( |$)/ && suites ~ /(^| )bookworm( |$)/ && uri != "" && enabled != "no") {
            split(uri, u, " "); printf "%s\t%s\n", u[1], signed; found = 1; exit
          }
          types = suites = uri = signed = ""; enabled = "yes"
        }
        BEGIN { enabled = "yes" }
        /^[ \t]*#/ { next }
        /^[ \t]*$/ { flush(); next }
        /^[A-Za-z-]+:/ {
          key = tolower($1); sub(/:$/, "", key); val = $0; sub(/^[^:]*:[ \t]*/, "", val)
          if (key == "types") types = val
          else if (key == "suites") suites = val
          else if (key == "uris") uri = val
          else if (key == "signed-by") signed = val
          else if (key == "enabled") enabled = tolower(val)
        }
        END { if (!found) flush() }
      ' "$f"
    else
      awk '
        /^[ \t]*deb[ \t]/ {
          line = $0; opts = ""
          if (match(line, /\[[^]]*\]/)) { opts = substr(line, RSTART + 1, RLENGTH - 2); line = substr(line, 1, RSTART - 1) substr(line, RSTART + RLENGTH) }
          n = split(line, w, /[ \t]+/)
          if (w[3] == "bookworm") {
            signed = ""
            m = split(opts, o, /[ \t]+/)
            for (i = 1; i <= m; i++) if (o[i] ~ /^signed-by=/) { signed = o[i]; sub(/^signed-by=/, "", signed) }
            printf "%s\t%s\n", w[2], signed; exit
          }
        }
      ' "$f"
    fi
  done | head -n1
}

ensure_deb_src() {
  local entry uri signed want
  entry="$(find_bookworm_entry)"
  [[ -n $entry ]] || die "no apt source for Debian bookworm binary packages found in /etc/apt; \
install needs a Debian 12 (bookworm) host, or a cache pre-populated in $BIN_DIR"
  uri="${entry%%$'\t'*}"
  signed="${entry#*$'\t'}"
  [[ $signed == /* || -z $signed ]] ||
    die "the bookworm apt entry uses an inline Signed-By key; add a 'deb-src' entry for bookworm by hand as $SRC_LIST"
  want="# Written by weft's scripts/k8s-testenv.sh: the kubernetes source package.
Types: deb-src
URIs: $uri
Suites: bookworm
Components: main"
  [[ -n $signed ]] && want+=$'\n'"Signed-By: $signed"
  if [[ ! -f $SRC_LIST || "$(cat "$SRC_LIST")" != "$want" ]]; then
    log "adding deb-src for bookworm ($uri) as $SRC_LIST"
    printf '%s\n' "$want" | as_root tee "$SRC_LIST" >/dev/null
    apt_get update
  elif [[ -z "$(apt-cache showsrc kubernetes 2>/dev/null)" ]]; then
    apt_get update
  fi
}

# Downloads the named binary packages into $1 and unpacks them into $1/root.
fetch_debs() {
  local dir="$1"
  shift
  mkdir -p "$dir/root"
  (cd "$dir" && apt_get download "$@") || {
    apt_get update
    (cd "$dir" && apt_get download "$@")
  } || die "could not download $*"
  local deb
  for deb in "$dir"/*.deb; do
    dpkg -x "$deb" "$dir/root"
  done
}

build_apiserver() {
  local work="$1"
  local src="$work/src"
  log "building kube-apiserver v1.20.2 from Debian's kubernetes source package (5-17 min on 2 cores)"

  # Build tools: Go 1.19, and rsync/make for the code generators.
  local missing=()
  [[ -x $GO_ROOT/bin/go ]] || missing+=(golang-1.19-go)
  command -v rsync >/dev/null 2>&1 || missing+=(rsync)
  command -v make >/dev/null 2>&1 || missing+=(make)
  if ((${#missing[@]})); then
    log "installing build tools: ${missing[*]}"
    apt_get install -y --no-install-recommends "${missing[@]}" ||
      { apt_get update && apt_get install -y --no-install-recommends "${missing[@]}"; }
  fi

  ensure_deb_src
  mkdir -p "$work/dl" "$src"
  (cd "$work/dl" && apt_get source --download-only kubernetes) ||
    die "apt-get source --download-only kubernetes failed"
  local orig
  orig="$(find "$work/dl" -maxdepth 1 -name 'kubernetes_*.orig.tar.*' | head -n1)"
  [[ -n $orig ]] || die "no kubernetes_*.orig.tar.* downloaded"
  log "unpacking $(basename "$orig")"
  tar -xf "$orig" -C "$src" --strip-components=1
  [[ -d $src/vendor/github.com/modern-go/reflect2 ]] || die "unexpected source tree: no vendored reflect2"

  # reflect2 1.0.1 -> 1.0.2 (Go >= 1.18 fix). Only the package files change;
  # vendor/modules.txt keeps matching go.mod, so -mod=vendor stays happy.
  fetch_debs "$work/reflect2" golang-github-modern-go-reflect2-dev
  local r2="$work/reflect2/root/usr/share/gocode/src/github.com/modern-go/reflect2"
  [[ -f $r2/go_above_118.go ]] || die "golang-github-modern-go-reflect2-dev does not carry reflect2 >= 1.0.2"
  rm -f "$src"/vendor/github.com/modern-go/reflect2/*.go "$src"/vendor/github.com/modern-go/reflect2/*.s
  cp "$r2"/*.go "$r2"/*.s "$src/vendor/github.com/modern-go/reflect2/"

  local logf="$K8S_CACHE/build.log" t0=$SECONDS
  log "make WHAT=cmd/kube-apiserver (log: $logf)"
  mkdir -p "$work/home" "$work/gocache" "$work/gopath"
  if ! (
    cd "$src" &&
      env PATH="$GO_ROOT/bin:$PATH" HOME="$work/home" GOCACHE="$work/gocache" GOPATH="$work/gopath" \
        GOROOT="$GO_ROOT" GOPROXY=off GOFLAGS=-mod=vendor GO111MODULE=on GOTOOLCHAIN=local \
        CGO_ENABLED=0 KUBE_VERBOSE=1 \
        timeout "${WEFT_BUILD_TIMEOUT:-3600}" make WHAT=cmd/kube-apiserver
  ) >"$logf" 2>&1; then
    tail -n 40 "$logf" >&2
    die "kube-apiserver build failed or timed out (full log: $logf)"
  fi
  local out="$src/_output/bin/kube-apiserver"
  [[ -x $out ]] || out="$(find "$src/_output" -type f -name kube-apiserver -perm -u+x | head -n1)"
  [[ -n $out && -x $out ]] || die "build finished but no kube-apiserver binary found (log: $logf)"
  "$out" --version | grep -q 'v1\.20\.' || die "built kube-apiserver reports $("$out" --version)"
  install -m 0755 "$out" "$APISERVER_BIN"
  printf '%s\n' "$STAMP_CONTENT" >"$APISERVER_STAMP"
  log "kube-apiserver built in $((SECONDS - t0)) s"
}

cmd_install() {
  mkdir -p "$BIN_DIR"
  command -v openssl >/dev/null 2>&1 || apt_get install -y --no-install-recommends openssl
  if have_cached_bins; then
    log "cached binaries present in $BIN_DIR, nothing to build"
  else
    local work
    work="$(mktemp -d "$K8S_CACHE/work.XXXXXX")"
    # shellcheck disable=SC2064
    trap "rm -rf '$work'" EXIT
    if [[ ! -x $ETCD_BIN || ! -x $KUBECTL_BIN ]]; then
      log "fetching etcd-server and kubernetes-client (unpacked, not installed)"
      fetch_debs "$work/debs" etcd-server kubernetes-client
      install -m 0755 "$work/debs/root/usr/bin/etcd" "$ETCD_BIN"
      install -m 0755 "$work/debs/root/usr/bin/kubectl" "$KUBECTL_BIN"
    fi
    if [[ ! -x $APISERVER_BIN || ! -f $APISERVER_STAMP || "$(cat "$APISERVER_STAMP")" != "$STAMP_CONTENT" ]]; then
      build_apiserver "$work"
    fi
    rm -rf "$work"
    trap - EXIT
  fi
  cmd_paths
}

cmd_paths() {
  echo "etcd=$ETCD_BIN"
  echo "kubectl=$KUBECTL_BIN"
  echo "kube-apiserver=$APISERVER_BIN"
}

# ---------------------------------------------------------------------------
# start / stop / status
# ---------------------------------------------------------------------------

# true if something listens on TCP port $1 (any address, v4 or v6).
port_in_use() {
  local hex
  hex="$(printf '%04X' "$1")"
  awk -v p=":$hex" 'NR > 1 && $4 == "0A" && substr($2, length($2) - 4) == p { f = 1 } END { exit !f }' \
    /proc/net/tcp /proc/net/tcp6 2>/dev/null
}

# Prints a free port in 20000-59999 that is not in $@.
free_port() {
  local p i taken
  for ((i = 0; i < 200; i++)); do
    p=$((20000 + (RANDOM * 32768 + RANDOM) % 40000))
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

kubectl_dir() { "$KUBECTL_BIN" --kubeconfig "$1/kubeconfig" --request-timeout=5s "${@:2}"; }

is_ready() {
  [[ -f $1/kubeconfig ]] && [[ "$(kubectl_dir "$1" get --raw /readyz 2>/dev/null)" == ok ]]
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
  # Service-account token signing key (required flags since 1.20).
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
  # shellcheck disable=SC2086
  nohup "$APISERVER_BIN" \
    --bind-address=127.0.0.1 --advertise-address=127.0.0.1 --secure-port="$aport" --insecure-port=0 \
    --etcd-servers="http://127.0.0.1:$eport" \
    --tls-cert-file="$dir/pki/serving.crt" --tls-private-key-file="$dir/pki/serving.key" \
    --token-auth-file="$dir/pki/tokens.csv" --authorization-mode=RBAC --anonymous-auth=false \
    --service-account-issuer=https://kubernetes.default.svc.cluster.local \
    --service-account-key-file="$dir/pki/sa.pub" --service-account-signing-key-file="$dir/pki/sa.key" \
    --service-cluster-ip-range="$SERVICE_CIDR" \
    --allow-privileged=true --disable-admission-plugins=ServiceAccount \
    --profiling=false --logtostderr=true --v=1 \
    ${WEFT_APISERVER_EXTRA_ARGS:-} \
    </dev/null >"$dir/kube-apiserver.log" 2>&1 &
  apid=$!
  echo "$apid" >"$dir/kube-apiserver.pid"

  local ca server="https://127.0.0.1:$aport"
  ca="$(base64 -w0 <"$dir/pki/ca.crt")"
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

  local timeout="${WEFT_START_TIMEOUT:-60}" t0=$SECONDS
  until is_ready "$dir"; do
    if ! pid_is "$epid" "$ETCD_BIN"; then
      tail -n 30 "$dir/etcd.log" >&2
      cmd_stop "$dir" >/dev/null 2>&1 || true
      die "etcd exited during start-up (log above)"
    fi
    if ! pid_is "$apid" "$APISERVER_BIN"; then
      tail -n 30 "$dir/kube-apiserver.log" >&2
      cmd_stop "$dir" >/dev/null 2>&1 || true
      die "kube-apiserver exited during start-up (log above)"
    fi
    if ((SECONDS - t0 >= timeout)); then
      tail -n 30 "$dir/kube-apiserver.log" >&2
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
  stop_pid "$(read_pid "$dir/kube-apiserver.pid")" "$APISERVER_BIN" kube-apiserver
  stop_pid "$(read_pid "$dir/etcd.pid")" "$ETCD_BIN" etcd
  # Only what `start` created; DIR itself goes if it is then empty.
  rm -rf "$dir/etcd-data" "$dir/pki"
  rm -f "$dir/etcd.pid" "$dir/kube-apiserver.pid" "$dir/kubeconfig" "$dir/env" \
    "$dir/etcd.log" "$dir/kube-apiserver.log"
  rmdir "$dir" 2>/dev/null || true
}

cmd_status() {
  [[ -n ${1:-} && -d $1 ]] || die "no such environment directory: ${1:-}"
  local dir
  dir="$(cd "$1" && pwd -P)"
  local epid apid
  epid="$(read_pid "$dir/etcd.pid")"
  apid="$(read_pid "$dir/kube-apiserver.pid")"
  pid_is "$epid" "$ETCD_BIN" || die "etcd is not running"
  pid_is "$apid" "$APISERVER_BIN" || die "kube-apiserver is not running"
  is_ready "$dir" || die "kube-apiserver is not ready"
  echo "ready: etcd pid $epid, kube-apiserver pid $apid, KUBECONFIG=$dir/kubeconfig"
}

case "${1:-}" in
  install) cmd_install ;;
  start) cmd_start "${2:-}" ;;
  stop) cmd_stop "${2:-}" ;;
  status) cmd_status "${2:-}" ;;
  paths) cmd_paths ;;
  *) usage ;;
esac
