#!/usr/bin/env bash
# image-build.sh — weft's container image, built offline from Debian's packages alone:
# a root filesystem made with debootstrap (minbase and the runtime packages of
# image/packages.lock), weft's release binaries, turned into an OCI image with umoci and
# exported with skopeo. The Dockerfile builds the same contents for users with a registry.
#
#   scripts/image-build.sh [options]
#
#   --out DIR         where the image goes (default: target/image)
#   --rev REV         the commit to build (default: HEAD). The binaries are built from
#                     `git archive REV` (never from the working tree's uncommitted edits),
#                     SOURCE_DATE_EPOCH is that commit's time.
#   --binaries DIR    take weft and weft-cni from DIR instead of building them (the podman
#                     test uses the binaries the test suite built); the revision is then the
#                     one `DIR/weft version` prints
#   --revision REV    with --binaries: the commit they were built from, when their
#                     `weft version` names none
#   --without PKG     leave out the files of the Debian package PKG: a broken image for the
#                     test that must fail (e.g. --without nftables)
#   --allow-drift     the mirror's package set may differ from image/packages.lock: say so
#                     and go on (the test suite: a Debian point release must not fail it)
#   --update-lock     write the package set resolved now into image/packages.lock
#   --rootfs-only     only make (or find) the cached root filesystem, build no image
#   --fast            the layer as umoci compresses it (gzip's default level) instead of
#                     `gzip -9`, and no sizes.txt: 15 s instead of a minute (the tests)
#   --no-cache        make the root filesystem anew (debootstrap) even if it is cached
#   --tag NAME:TAG    the image's name (default: localhost/weft:VERSION)
#
# Writes into DIR:
#   weft-VERSION.oci.tar      OCI archive (skopeo copy oci-archive:DIR/weft-VERSION.oci.tar:NAME:TAG ...)
#   weft-VERSION.docker.tar   `docker load -i` / `podman load -i` tarball, tagged NAME:TAG
#   oci/                      the OCI image layout itself
#   image.env                 IMAGE_REF, IMAGE_DIGEST (the manifest's), IMAGE_CONFIG_DIGEST,
#                             IMAGE_REVISION, IMAGE_VERSION, IMAGE_CREATED, archive paths
#   sizes.txt                 compressed size, and what takes the space
#
# Reproducible: the same commit, lock file and binaries give the same image digest, byte for
# byte the same archives. The packages are pinned by image/packages.lock (name, version,
# architecture of each); every mtime is set to SOURCE_DATE_EPOCH (the commit's time), logs,
# caches, the machine id, backups of dpkg's and the account databases are removed, password
# dates are the commit's day, the layer's entries are sorted, the image config's and its
# history's `created` are the commit time.
#
# Needs root (debootstrap, file ownership) and Debian's debootstrap, umoci and skopeo
# (installed with apt-get when missing); binaries: cargo. Environment: WEFT_CACHE (default
# ~/.cache/weft): the cached root filesystem, the build's source tree and target dir
# (WEFT_CACHE/target-image); WEFT_DEBIAN_MIRROR (default: the first Debian mirror of
# /etc/apt/sources.list*, else http://deb.debian.org/debian).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${WEFT_CACHE:-${HOME:-/root}/.cache/weft}"
SUITE=bookworm
LOCK="$ROOT/image/packages.lock"

log() { printf 'image-build: %s\n' "$*" >&2; }
die() { printf 'image-build: error: %s\n' "$*" >&2; exit 1; }

revision_arg="" out="$ROOT/target/image" rev=HEAD binaries="" without="" allow_drift=0 update_lock=0 no_cache=0 tag="" rootfs_only=0 fast=0
while (($#)); do
  case "$1" in
    --out) out="$2"; shift 2 ;;
    --rev) rev="$2"; shift 2 ;;
    --binaries) binaries="$(cd "$2" && pwd)"; shift 2 ;;
    --revision) revision_arg="$2"; shift 2 ;;
    --without) without="$2"; shift 2 ;;
    --allow-drift) allow_drift=1; shift ;;
    --update-lock) update_lock=1; shift ;;
    --no-cache) no_cache=1; shift ;;
    --fast) fast=1; shift ;;
    --rootfs-only) rootfs_only=1; shift ;;
    --tag) tag="$2"; shift 2 ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument $1 (--help)" ;;
  esac
done
[[ $EUID -eq 0 ]] || die "run as root (debootstrap, and the image's files are root's)"
mkdir -p "$out" "$CACHE/image"
out="$(cd "$out" && pwd)"

# --- tools -------------------------------------------------------------------------------
need=()
for t in debootstrap:debootstrap umoci:umoci skopeo:skopeo strip:binutils python3:python3; do
  command -v "${t%%:*}" >/dev/null 2>&1 || need+=("${t##*:}")
done
if ((${#need[@]})); then
  log "installing ${need[*]}"
  env DEBIAN_FRONTEND=noninteractive apt-get -q -o DPkg::Lock::Timeout=300 install -y --no-install-recommends "${need[@]}" >&2 ||
    { apt-get -q update >&2 && env DEBIAN_FRONTEND=noninteractive apt-get -q -o DPkg::Lock::Timeout=300 install -y --no-install-recommends "${need[@]}" >&2; }
fi

# --- what is built -----------------------------------------------------------------------
commit="$(git -C "$ROOT" rev-parse --verify "$rev^{commit}")" || die "no commit $rev"
epoch="$(git -C "$ROOT" log -1 --format=%ct "$commit")"
created="$(date -u -d "@$epoch" +%Y-%m-%dT%H:%M:%SZ)"
version="$(git -C "$ROOT" show "$commit:Cargo.toml" | sed -n 's/^version = "\(.*\)"$/\1/p' | head -n1)"
[[ -n $version ]] || die "no version in Cargo.toml at $commit"
export SOURCE_DATE_EPOCH="$epoch"

# --- binaries ----------------------------------------------------------------------------
bins="$out/bin"
rm -rf "$bins"
mkdir -p "$bins"
if ((rootfs_only)); then
  revision="$commit"
elif [[ -n $binaries ]]; then
  for b in weft weft-cni; do
    [[ -x $binaries/$b ]] || die "no $b in $binaries"
    strip --strip-all -o "$bins/$b" "$binaries/$b"
  done
  revision="$("$bins/weft" version | sed -n 's/^weft [^ ]* (git \([^)]*\))$/\1/p')"
  [[ $revision != unknown ]] || revision=""
  [[ -n $revision ]] || revision="$(git -C "$ROOT" rev-parse --verify "${revision_arg:-none}^{commit}" 2>/dev/null || true)"
  [[ -n $revision ]] || die "$binaries/weft version does not name a git revision"
  # The binaries say which commit they are; its time is the image's.
  if git -C "$ROOT" cat-file -e "$revision^{commit}" 2>/dev/null; then
    epoch="$(git -C "$ROOT" log -1 --format=%ct "$revision")"
    created="$(date -u -d "@$epoch" +%Y-%m-%dT%H:%M:%SZ)"
    export SOURCE_DATE_EPOCH="$epoch"
  fi
  log "binaries from $binaries (revision $revision)"
else
  command -v cargo >/dev/null 2>&1 || die "cargo (Rust toolchain) is required to build the binaries"
  revision="$commit"
  src="$CACHE/image/src"
  # Always the same directory (cargo's fingerprints and the remapped paths stay put), filled
  # with exactly the commit's files.
  rm -rf "$src"
  mkdir -p "$src"
  git -C "$ROOT" archive --format=tar "$commit" | tar -x -C "$src"
  cargo_home="${CARGO_HOME:-${HOME:-/root}/.cargo}"
  log "building weft $version ($commit) with the release profile (fat LTO: 10-16 min on 2 cores)"
  (
    cd "$src"
    # The release profile of Cargo.toml, stripped (the image carries no debug info); paths
    # of this machine are remapped out of the binaries (panic locations).
    env CARGO_TARGET_DIR="$CACHE/target-image" WEFT_GIT_REVISION="$commit" \
      CARGO_PROFILE_RELEASE_STRIP=symbols CARGO_PROFILE_RELEASE_DEBUG=0 \
      RUSTFLAGS="--remap-path-prefix=$src=/weft --remap-path-prefix=$cargo_home=/cargo" \
      flock "$CACHE/image/cargo.lock" nice -n 10 cargo build --release --locked --bin weft --bin weft-cni >&2
  )
  for b in weft weft-cni; do
    install -m 0755 "$CACHE/target-image/release/$b" "$bins/$b"
  done
fi
[[ $revision =~ ^[0-9a-f]{40}$ ]] || die "revision '$revision' is not a commit id"
[[ -n $tag ]] || tag="localhost/weft:$version"
log "weft $version, revision $revision, created $created"

# --- the root filesystem (cached) ----------------------------------------------------------
# Debian's minbase and the runtime packages, updated from the suite's updates and security
# archives, slimmed like Debian's own slim images. Cached as a tar under WEFT_CACHE/image,
# keyed by the lock file, the slim rules, this function's text, the mirrors and debootstrap's
# version: a warm build does not run debootstrap.
mirror_of() { # the first URIs/deb line of the host's sources whose path ends in $1
  cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources 2>/dev/null |
    sed -n -e 's#^URIs: *\(https\?://[^ ]*\)$#\1#p' -e 's#^deb \(\[[^]]*\] \)\{0,1\}\(https\?://[^ ]*\) .*#\2#p' |
    grep -E "/$1/?\$" | head -n1 | sed 's#/$##' || true
}
MIRROR="${WEFT_DEBIAN_MIRROR:-$(mirror_of debian)}"
MIRROR="${MIRROR:-http://deb.debian.org/debian}"
SECURITY_MIRROR="${WEFT_DEBIAN_SECURITY_MIRROR:-$(mirror_of debian-security)}"
SECURITY_MIRROR="${SECURITY_MIRROR:-http://deb.debian.org/debian-security}"
# What the image's own sources.list names: Debian's public mirrors, whatever this build used.
PUBLIC_SOURCES="deb http://deb.debian.org/debian $SUITE main
deb http://deb.debian.org/debian $SUITE-updates main
deb http://deb.debian.org/debian-security $SUITE-security main"

lock_packages() { grep -vE '^\s*(#|$)' "$1" | awk '{print $1" "$2" "$3}' | sort; }

# make_rootfs DIR: debootstrap and slim into DIR (empty).
make_rootfs() {
  local dir="$1" include
  include="$(sed -n 's/^# include: //p' "$LOCK")"
  [[ -n $include ]] || die "$LOCK names no '# include:' packages"
  mkdir -p "$CACHE/image/debs"
  log "debootstrap --variant=minbase --include=$include $SUITE from $MIRROR"
  debootstrap --variant=minbase --include="$include" --components=main \
    --cache-dir="$CACHE/image/debs" "$SUITE" "$dir" "$MIRROR" >&2 ||
    { tail -n 30 "$dir/debootstrap/debootstrap.log" >&2 2>/dev/null; die "debootstrap failed"; }
  # Point release and security updates.
  printf 'deb %s %s main\ndeb %s %s-updates main\ndeb %s %s-security main\n' \
    "$MIRROR" "$SUITE" "$MIRROR" "$SUITE" "$SECURITY_MIRROR" "$SUITE" >"$dir/etc/apt/sources.list"
  cp "$ROOT/image/dpkg-slim.cfg" "$dir/etc/dpkg/dpkg.cfg.d/weft-slim"
  mount -t proc proc "$dir/proc"
  local rc=0
  chroot "$dir" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin DEBIAN_FRONTEND=noninteractive \
    sh -c 'apt-get -q update && apt-get -q -y -o Dpkg::Options::=--force-confold dist-upgrade && apt-get -q -y autoremove --purge' >&2 || rc=$?
  umount "$dir/proc"
  ((rc == 0)) || die "updating the root filesystem failed"
  printf '%s\n' "$PUBLIC_SOURCES" >"$dir/etc/apt/sources.list"
  # Slim: what dpkg-slim.cfg keeps out of later installs goes now too.
  find "$dir/usr/share/doc" -mindepth 1 \( -type f -o -type l \) ! -name copyright -delete
  find "$dir/usr/share/doc" -mindepth 1 -depth -type d -empty -delete
  local d
  for d in info linda lintian/overrides locale man; do
    [[ -d $dir/usr/share/$d ]] && find "$dir/usr/share/$d" -mindepth 1 -delete
  done
  # State that records this machine or this moment: apt's lists and caches, logs, backups of
  # dpkg's and debconf's databases and of the account files, the loader's aux cache, the
  # host's name and resolver (the runtime provides both), device nodes (likewise).
  rm -rf "$dir/var/lib/apt/lists"/* "$dir/var/cache/apt"/* "$dir/debootstrap"
  mkdir -p "$dir/var/lib/apt/lists/partial" "$dir/var/cache/apt/archives/partial"
  find "$dir/var/log" -type f -delete
  rm -f "$dir"/var/lib/dpkg/*-old "$dir"/var/cache/debconf/*-old "$dir"/etc/{passwd,group,shadow,gshadow}- \
    "$dir/var/cache/ldconfig/aux-cache" "$dir/etc/hostname" "$dir/etc/resolv.conf" "$dir/etc/machine-id"
  find "$dir/dev" "$dir/run" "$dir/tmp" "$dir/proc" "$dir/sys" -mindepth 1 \( ! -type d -o -empty \) -delete 2>/dev/null || true
  find "$dir/run" "$dir/tmp" -mindepth 1 -depth -type d -empty -delete
  mkdir -p "$dir/run/lock"
  chmod 1777 "$dir/tmp"
}

# The root filesystem's cache key: everything that decides its contents.
rootfs_key_now() {
  {
    cat "$LOCK" "$ROOT/image/dpkg-slim.cfg"
    declare -f make_rootfs
    echo "$SUITE $MIRROR $SECURITY_MIRROR $PUBLIC_SOURCES"
    dpkg-query -W -f '${Version}' debootstrap
  } | sha256sum | cut -c1-16
}

rootfs_key="$(rootfs_key_now)"
rootfs_tar="$CACHE/image/rootfs-$SUITE-$rootfs_key.tar"
# One root filesystem build at a time per cache.
exec 9>"$CACHE/image/rootfs.lock"
flock 9
if ((no_cache)) || [[ ! -f $rootfs_tar ]]; then
  work_rootfs="$CACHE/image/rootfs.tmp"
  if [[ -d $work_rootfs ]]; then
    mountpoint -q "$work_rootfs/proc" && umount "$work_rootfs/proc"
    rm -rf "$work_rootfs"
  fi
  mkdir -p "$work_rootfs"
  make_rootfs "$work_rootfs"
  # The package set, against the lock.
  resolved="$(chroot "$work_rootfs" dpkg-query -W -f '${Package} ${Version} ${Architecture}\n' | sort)"
  if [[ $resolved != "$(lock_packages "$LOCK")" ]]; then
    if ((update_lock)); then
      { sed -n '/^#/p' "$LOCK"; echo "$resolved"; } >"$LOCK.tmp" && mv "$LOCK.tmp" "$LOCK"
      log "wrote $(echo "$resolved" | wc -l) packages to image/packages.lock"
      rootfs_key="$(rootfs_key_now)"
      rootfs_tar="$CACHE/image/rootfs-$SUITE-$rootfs_key.tar"
    else
      diff <(lock_packages "$LOCK") <(echo "$resolved") | sed 's/^/image-build:   /' >&2 || true
      if ((allow_drift)); then
        log "warning: the mirror's packages differ from image/packages.lock (above; --allow-drift)"
      else
        rm -rf "$work_rootfs"
        die "the mirror's packages differ from image/packages.lock (< lock, > mirror): review and run with --update-lock"
      fi
    fi
  fi
  tar --sort=name --numeric-owner --xattrs --xattrs-include='*' -C "$work_rootfs" -cf "$rootfs_tar.tmp" .
  mv "$rootfs_tar.tmp" "$rootfs_tar"
  rm -rf "$work_rootfs"
  log "root filesystem cached: $rootfs_tar"
else
  log "root filesystem from the cache: $rootfs_tar"
fi
exec 9>&-
if ((rootfs_only)); then
  echo "IMAGE_ROOTFS=$rootfs_tar"
  exit 0
fi

# --- assemble ------------------------------------------------------------------------------
work="$(mktemp -d "$CACHE/image/work.XXXXXX")"
trap 'rm -rf "$work"' EXIT
rootfs="$work/rootfs"
mkdir -p "$rootfs"
tar --numeric-owner --xattrs --xattrs-include='*' -xpf "$rootfs_tar" -C "$rootfs"
install -o 0 -g 0 -m 0755 "$bins/weft" "$bins/weft-cni" "$rootfs/usr/local/bin/"
# The non-root user the image runs as by default (weft ca serve, weft version); the node agent
# runs as root by its pod's securityContext (its capabilities need it).
echo 'nonroot:x:65532:65532:weft:/nonexistent:/usr/sbin/nologin' >>"$rootfs/etc/passwd"
echo 'nonroot:x:65532:' >>"$rootfs/etc/group"
echo 'nonroot:!:' >>"$rootfs/etc/gshadow"
echo 'nonroot:*:0:0:99999:7:::' >>"$rootfs/etc/shadow"
# Password-change dates (days since 1970) are those of the commit, not of this build.
sed -i -E "s/^([^:]*:[^:]*:)[0-9]+:/\1$((epoch / 86400)):/" "$rootfs/etc/shadow"
if [[ -n $without ]]; then
  list="$rootfs/var/lib/dpkg/info/$without.list"
  [[ -f $list ]] || list="$rootfs/var/lib/dpkg/info/$without:amd64.list"
  [[ -f $list ]] || die "--without $without: no such package in the image"
  n=0
  while IFS= read -r f; do
    if [[ -f $rootfs$f || -L $rootfs$f ]] && [[ ! -d $rootfs$f ]]; then
      rm -f "$rootfs$f"
      n=$((n + 1))
    fi
  done <"$list"
  log "left out the $n files of $without (a broken image, for the test that must fail)"
fi
# Every mtime is the commit's.
find "$rootfs" -exec touch -h -d "@$epoch" {} +

source_url="${WEFT_IMAGE_SOURCE:-https://github.com/weft-mesh/weft}"
labels=(
  "org.opencontainers.image.title=weft"
  "org.opencontainers.image.description=Node-level L4 tunnel for Istio ambient mode (HBONE, mTLS, L4 policy)"
  "org.opencontainers.image.version=$version"
  "org.opencontainers.image.revision=$revision"
  "org.opencontainers.image.source=$source_url"
  "org.opencontainers.image.licenses=Apache-2.0"
  "org.opencontainers.image.created=$created"
)
layout="$out/oci"
rm -rf "$layout"
umoci init --layout "$layout"
umoci new --image "$layout:weft"
bundle="$work/bundle"
umoci unpack --image "$layout:weft" "$bundle" >/dev/null
rmdir "$bundle/rootfs"
mv "$rootfs" "$bundle/rootfs"
umoci repack --image "$layout:weft" --history.created="$created" --history.author="weft" \
  --history.created_by="scripts/image-build.sh (debootstrap $SUITE minbase, weft $version)" \
  --history.comment="$revision" "$bundle"
cfg=(--config.entrypoint /usr/local/bin/weft --config.cmd --help --config.workingdir /
  --config.user 65532:65532
  --config.env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
  --os linux --architecture amd64 --author weft --created "$created" --no-history)
for l in "${labels[@]}"; do cfg+=(--config.label "$l" --manifest.annotation "$l"); done
umoci config --image "$layout:weft" "${cfg[@]}"
umoci gc --layout "$layout"
if ((!fast)); then
  # umoci writes the layer with gzip's default level; `gzip -9 -n` (no name, no time: the same
  # bytes for the same input) makes it about 6% smaller. The layer's uncompressed digest
  # (the config's diff_id) stays; the manifest names the new blob.
  python3 - "$layout" <<'PY'
import hashlib, json, os, subprocess, sys
root = sys.argv[1]
blob = lambda d: os.path.join(root, "blobs", "sha256", d.split(":", 1)[1])
index = json.load(open(os.path.join(root, "index.json")))
old_manifest = index["manifests"][0]["digest"]
manifest = json.load(open(blob(old_manifest)))
for layer in manifest["layers"]:
    with open(blob(layer["digest"]), "rb") as f:
        raw = subprocess.run(["gzip", "-dc"], stdin=f, capture_output=True, check=True).stdout
    data = subprocess.run(["gzip", "-9", "-n"], input=raw, capture_output=True, check=True).stdout
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    os.remove(blob(layer["digest"]))
    open(blob(digest), "wb").write(data)
    layer["digest"], layer["size"] = digest, len(data)
text = json.dumps(manifest, separators=(",", ":")).encode()
digest = "sha256:" + hashlib.sha256(text).hexdigest()
os.remove(blob(old_manifest))
open(blob(digest), "wb").write(text)
index["manifests"][0]["digest"], index["manifests"][0]["size"] = digest, len(text)
json.dump(index, open(os.path.join(root, "index.json"), "w"), separators=(",", ":"))
PY
fi
# The index's reference name is the tag.
python3 - "$layout" "$tag" <<'PY'
import json, sys
path = sys.argv[1] + "/index.json"
idx = json.load(open(path))
for m in idx["manifests"]:
    m.setdefault("annotations", {})["org.opencontainers.image.ref.name"] = sys.argv[2]
json.dump(idx, open(path, "w"), separators=(",", ":"), sort_keys=True)
PY

oci_tar="$out/weft-$version.oci.tar"
docker_tar="$out/weft-$version.docker.tar"
rm -f "$oci_tar" "$docker_tar"
# The OCI archive is the layout as a tar (what skopeo's oci-archive: transport reads and
# writes), made here with sorted names and the commit's mtimes: skopeo's own gives every
# entry the time of the copy, so two builds would differ in those bytes.
chmod -R u=rwX,go=rX "$layout"
find "$layout" -exec touch -h -d "@$epoch" {} +
tar --sort=name --owner=0 --group=0 --numeric-owner --mtime="@$epoch" -C "$layout" -cf "$oci_tar" \
  oci-layout index.json blobs
skopeo --insecure-policy inspect -n "oci-archive:$oci_tar:$tag" >/dev/null ||
  die "skopeo cannot read $oci_tar"
skopeo --insecure-policy copy -q "oci:$layout:$tag" "docker-archive:$docker_tar:$tag"

manifest_digest="$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["manifests"][0]["digest"])' "$layout/index.json")"
manifest="$layout/blobs/sha256/${manifest_digest#sha256:}"
config_digest="$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["config"]["digest"])' "$manifest")"
cat >"$out/image.env" <<ENV
IMAGE_REF=$tag
IMAGE_DIGEST=$manifest_digest
IMAGE_CONFIG_DIGEST=$config_digest
IMAGE_VERSION=$version
IMAGE_REVISION=$revision
IMAGE_CREATED=$created
IMAGE_OCI_ARCHIVE=$oci_tar
IMAGE_DOCKER_ARCHIVE=$docker_tar
IMAGE_WITHOUT=$without
ENV

# --- sizes ---------------------------------------------------------------------------------
layer_bytes="$(python3 -c 'import json,sys; print(sum(l["size"] for l in json.load(open(sys.argv[1]))["layers"]))' "$manifest")"
if ((!fast)); then
  (
    cd "$bundle/rootfs"
    printf 'image %s (%s)\ncompressed (the layer, gzip): %s bytes = %.1f MB\nuncompressed: %s\n\n' \
      "$tag" "$manifest_digest" "$layer_bytes" "$(awk -v b="$layer_bytes" 'BEGIN { print b / 1000000 }')" "$(du -sh --apparent-size . | cut -f1)"
    echo "what takes the space (each part gzip-compressed on its own, bytes; files of the Debian packages per package)"
    gz() { tar --no-recursion --null -T - -cf - 2>/dev/null | gzip -n -6 | wc -c; }
    printf '%10s  %s\n' "$(printf 'usr/local/bin/weft\0' | gz)" "weft"
    printf '%10s  %s\n' "$(printf 'usr/local/bin/weft-cni\0' | gz)" "weft-cni"
    for list in var/lib/dpkg/info/*.list; do
      pkg="$(basename "$list" .list)"
      bytes="$(sed 's#^/##' "$list" | while IFS= read -r f; do if [[ -f $f && ! -L $f ]]; then printf '%s\0' "$f"; fi; done | gz)"
      printf '%10s  %s\n' "$bytes" "$pkg"
    done | sort -rn
    printf '%10s  %s\n' "$(printf 'var/lib/dpkg\0var/cache/debconf\0' | tar --null -T - -cf - | gzip -n -6 | wc -c)" "dpkg and debconf databases"
  ) >"$out/sizes.txt"
else
  printf 'image %s (%s)\ncompressed (the layer, gzip): %s bytes\n' "$tag" "$manifest_digest" "$layer_bytes" >"$out/sizes.txt"
fi
log "image $tag: $manifest_digest, $(sed -n 2p "$out/sizes.txt")"
log "  $oci_tar"
log "  $docker_tar"
cat "$out/image.env"
