# syntax=docker/dockerfile:1
# weft's container image, for users with a registry. The same contents, entrypoint, user and
# labels as the offline build of scripts/image-build.sh (which builds here from Debian's
# packages alone, reproducibly): Debian bookworm, slim, with nftables (weft runs nft) and
# weft's release binaries weft and weft-cni in /usr/local/bin.
#
#   docker build -t registry.example.com/weft:0.1.0 \
#     --build-arg REVISION="$(git rev-parse HEAD)" \
#     --build-arg CREATED="$(git log -1 --format=%cd --date=format-local:%Y-%m-%dT%H:%M:%SZ)" \
#     --build-arg SOURCE_DATE_EPOCH="$(git log -1 --format=%ct)" .
#
# VERSION must be Cargo.toml's version (tests/image_podman.rs checks the default below).
# The node agent runs as root with the DaemonSet's capabilities (its securityContext says
# so); the image's default user is the unprivileged 65532, for everything else (weft ca serve).
ARG RUST_IMAGE=rust:1-bookworm
ARG BASE_IMAGE=debian:bookworm-slim

FROM ${RUST_IMAGE} AS build
ARG REVISION=unknown
WORKDIR /src
COPY . .
# The release profile of Cargo.toml, stripped; the revision for `weft version` (.git is not
# sent to the builder: .dockerignore).
ENV WEFT_GIT_REVISION=${REVISION} \
    CARGO_PROFILE_RELEASE_STRIP=symbols \
    CARGO_PROFILE_RELEASE_DEBUG=0
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin weft --bin weft-cni \
 && install -D -m 0755 -t /out target/release/weft target/release/weft-cni

FROM ${BASE_IMAGE}
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG SOURCE=https://github.com/weft-mesh/weft
ARG CREATED=1970-01-01T00:00:00Z
# The run-time packages of image/packages.lock ("# include:"), at its versions; the slim rules
# of the offline build for anything installed later; the non-root user.
COPY image/packages.lock image/dpkg-slim.cfg /tmp/weft-image/
RUN set -eux; \
    cp /tmp/weft-image/dpkg-slim.cfg /etc/dpkg/dpkg.cfg.d/weft-slim; \
    pkgs=""; \
    for p in $(sed -n 's/^# include: //p' /tmp/weft-image/packages.lock | tr ',' ' '); do \
      v="$(awk -v p="$p" '$1 == p { print $2 }' /tmp/weft-image/packages.lock)"; \
      pkgs="$pkgs $p${v:+=$v}"; \
    done; \
    apt-get update; \
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $pkgs; \
    rm -rf /var/lib/apt/lists/* /var/cache/apt/* /var/log/apt/* /var/log/dpkg.log /tmp/weft-image; \
    echo 'nonroot:x:65532:65532:weft:/nonexistent:/usr/sbin/nologin' >>/etc/passwd; \
    echo 'nonroot:x:65532:' >>/etc/group; \
    echo 'nonroot:!:' >>/etc/gshadow; \
    echo 'nonroot:*:0:0:99999:7:::' >>/etc/shadow
COPY --from=build /out/weft /out/weft-cni /usr/local/bin/
LABEL org.opencontainers.image.title="weft" \
      org.opencontainers.image.description="Node-level L4 tunnel for Istio ambient mode (HBONE, mTLS, L4 policy)" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.created="${CREATED}"
ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
# ztunnel's relative default paths (./var/run/secrets/...) resolve from /, as in its image.
WORKDIR /
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/weft"]
CMD ["--help"]
