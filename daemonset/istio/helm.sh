#!/usr/bin/env bash
# helm.sh — helm and Istio's ztunnel chart for installing weft under Istio, on a machine
# without either (as the tests run it).
#
#   daemonset/istio/helm.sh install   build helm once (cached), print helm=PATH and chart=DIR
#   daemonset/istio/helm.sh paths     print the same two lines without building
#
# * helm: the command helm.sh/helm/v3/cmd/helm of the Go module helm.sh/helm/v3 at
#   $HELM_VERSION, built with `go install` into ${WEFT_CACHE:-~/.cache/weft}/bin/helm (a
#   helm.stamp next to it says what it was built from; a differing stamp rebuilds it). The Go
#   toolchain, module cache and build cache are scripts/k8s-testenv.sh's (that script is run
#   first: it fetches a Go new enough when the machine has none).
# * chart: manifests/charts/ztunnel of the istio.io/istio module that scripts/k8s-testenv.sh
#   pins (the istiod the tests run), from the module cache. A cluster installs the same chart
#   from Istio's Helm repository instead (README.md, "Install under Istio").
# Environment: WEFT_CACHE, WEFT_GO (as scripts/k8s-testenv.sh).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
CACHE="${WEFT_CACHE:-${HOME:-/root}/.cache/weft}"
GO_DIR="$CACHE/go"
HELM_VERSION="v3.22.0"
HELM_BIN="$CACHE/bin/helm"
ISTIO_VERSION="$(sed -n 's/^readonly ISTIO_VERSION="\(.*\)"$/\1/p' "$ROOT/scripts/k8s-testenv.sh")"
[[ -n $ISTIO_VERSION ]] || { echo "helm.sh: no ISTIO_VERSION in scripts/k8s-testenv.sh" >&2; exit 1; }
CHART="$GO_DIR/mod/istio.io/istio@$ISTIO_VERSION/manifests/charts/ztunnel"

die() { printf 'helm.sh: error: %s\n' "$*" >&2; exit 1; }

go_ok() { [[ -x $1 ]] && [[ "$("$1" env GOVERSION 2>/dev/null)" =~ ^go1\.([0-9]+) ]] && ((BASH_REMATCH[1] >= 24)); }

# The go command, as scripts/k8s-testenv.sh chooses it: WEFT_GO, go on PATH, the official
# tarball's place, else the toolchain module it fetched into the cache.
find_go() {
  local g
  for g in "${WEFT_GO:-}" "$(command -v go 2>/dev/null || true)" /usr/local/go/bin/go \
    "$GO_DIR"/mod/golang.org/toolchain@*/bin/go; do
    [[ -n $g ]] && go_ok "$g" && { echo "$g"; return 0; }
  done
  die "no Go 1.24 or newer (scripts/k8s-testenv.sh install provides one)"
}

gocmd() {
  env GOMODCACHE="$GO_DIR/mod" GOCACHE="$GO_DIR/build" GOPATH="$GO_DIR/path" \
    GOTOOLCHAIN=local GOFLAGS="-modcacherw -buildvcs=false" GOWORK=off GO111MODULE=on \
    CGO_ENABLED=0 GOENV=off nice -n 10 "$GO" "$@"
}

paths() {
  echo "helm=$HELM_BIN"
  echo "chart=$CHART"
}

install() {
  # Go, the module cache, and the istio module (its chart) come with the test environment.
  bash "$ROOT/scripts/k8s-testenv.sh" install >/dev/null
  GO="$(find_go)"
  [[ -f $CHART/Chart.yaml ]] || (cd "$GO_DIR" && gocmd mod download "istio.io/istio@$ISTIO_VERSION") >&2
  [[ -f $CHART/Chart.yaml ]] || die "no ztunnel chart at $CHART"
  local stamp goversion
  goversion="$("$GO" env GOVERSION)"
  stamp="helm.sh/helm/v3/cmd/helm@$HELM_VERSION $goversion"
  if [[ ! -x $HELM_BIN || "$(cat "$HELM_BIN.stamp" 2>/dev/null)" != "$stamp" ]]; then
    echo "helm.sh: building helm $HELM_VERSION from its Go module (a few minutes, once)" >&2
    mkdir -p "$CACHE/bin"
    local gobin
    gobin="$(mktemp -d "$CACHE/bin/.helm.XXXXXX")"
    # The version helm reports (`helm version`), as its Makefile sets it.
    (cd "$GO_DIR" && export GOBIN="$gobin" && gocmd install -p 2 -trimpath \
        -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION" \
        "helm.sh/helm/v3/cmd/helm@$HELM_VERSION" >&2) || { rm -rf "$gobin"; die "building helm failed"; }
    mv "$gobin/helm" "$HELM_BIN"
    rm -rf "$gobin"
    echo "$stamp" >"$HELM_BIN.stamp"
  fi
  "$HELM_BIN" version --short >&2
  paths
}

case "${1:-}" in
  install) install ;;
  paths) paths ;;
  *) sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
esac
