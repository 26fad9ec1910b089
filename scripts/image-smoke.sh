#!/usr/bin/env bash
# image-smoke.sh — the container image's smoke test: tests/image_podman.rs's
# the_image_runs_as_the_daemonset_runs_it. podman (crun) starts the image as
# daemonset/daemonset.yaml starts weft (host PID namespace, the DaemonSet's capabilities and no
# others, its user, read-only root, no privilege escalation), in the lab's node network
# namespaces (scripts/lab.sh); the two containers capture the lab's pods and carry a1 → b1
# over HBONE. The same image without its nftables package must fail that run.
#
#   scripts/image-smoke.sh [IMAGE_ENV]   test the image IMAGE_ENV describes (an image.env of
#                                        scripts/image-build.sh); without one, build the release
#                                        image first (scripts/image-build.sh, into target/image)
#   scripts/image-smoke.sh --prepare     install what the image tests need and make the cached
#                                        root filesystem and helm (scripts/test.sh runs this;
#                                        its `cargo test` then tests an image of its own build)
#
# As root; installs podman, crun, debootstrap, umoci, skopeo (and the lab's iproute2, nftables,
# python3) with apt-get when missing.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${WEFT_CACHE:-${HOME:-/root}/.cache/weft}"
[[ $EUID -eq 0 ]] || { echo "image-smoke.sh: run as root" >&2; exit 1; }

need=()
for t in podman:podman crun:crun conmon:conmon catatonit:catatonit debootstrap:debootstrap umoci:umoci \
  skopeo:skopeo strip:binutils ip:iproute2 nft:nftables python3:python3 unshare:util-linux; do
  command -v "${t%%:*}" >/dev/null 2>&1 || [[ -x /usr/libexec/podman/${t%%:*} ]] || need+=("${t##*:}")
done
if ((${#need[@]})); then
  echo "image-smoke.sh: installing ${need[*]}" >&2
  install() { env DEBIAN_FRONTEND=noninteractive apt-get -q -o DPkg::Lock::Timeout=300 install -y --no-install-recommends "$@" >&2; }
  install "${need[@]}" || { apt-get -q update >&2 && install "${need[@]}"; }
fi

if [[ ${1:-} == --prepare ]]; then
  # The Debian root filesystem (debootstrap, cached; a mirror that moved past
  # image/packages.lock is reported, not fatal, here) and helm for the Istio install test.
  bash "$ROOT/scripts/image-build.sh" --rootfs-only --allow-drift --out "$CACHE/image-test/image" >/dev/null
  bash "$ROOT/daemonset/istio/helm.sh" install >/dev/null
  exit 0
fi

env_file="${1:-}"
if [[ -z $env_file ]]; then
  bash "$ROOT/scripts/image-build.sh" >/dev/null
  env_file="$ROOT/target/image/image.env"
fi
[[ -f $env_file ]] || { echo "image-smoke.sh: no $env_file" >&2; exit 1; }
cd "$ROOT"
exec env WEFT_IMAGE_ENV="$(cd "$(dirname "$env_file")" && pwd)/$(basename "$env_file")" \
  cargo test --locked --test image_podman -- --exact the_image_runs_as_the_daemonset_runs_it --nocapture
