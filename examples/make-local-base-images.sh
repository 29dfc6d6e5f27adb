#!/bin/sh
# Builds local stand-ins for the registry images the Dockerfile, the compose file and
# examples/mysite/Dockerfile start from, for a Docker host that cannot pull from a
# registry (air-gapped, offline CI, a mirror without these images). Everything comes from
# Debian packages (debootstrap + apt) and the Rust toolchain installed on this host:
#
#   gatehouse-local/debian:bookworm   debootstrap --variant=minbase, `docker import`ed
#   gatehouse-local/rust:bookworm     for RUST_IMAGE    (rust:1-bookworm): gcc + the host's
#                                     toolchain (`rustc --print sysroot`, >= rust-version)
#   gatehouse-local/cc:nonroot        for RUNTIME_IMAGE (gcr.io/distroless/cc-debian12:nonroot):
#                                     glibc, libgcc, CA roots, user nonroot = 65532
#   gatehouse-local/python:bookworm   for PYTHON_IMAGE  (python:3.12-slim): python3 + a venv on PATH
#   gatehouse-local/redis:bookworm    for REDIS_IMAGE   (redis:7-alpine): Debian's redis-server 7
#
# Usage (root, or a user in the docker group with sudo for debootstrap):
#   apt-get install -y debootstrap docker.io
#   examples/make-local-base-images.sh            # then, as it prints:
#   RUST_IMAGE=gatehouse-local/rust:bookworm RUNTIME_IMAGE=gatehouse-local/cc:nonroot \
#   PYTHON_IMAGE=gatehouse-local/python:bookworm REDIS_IMAGE=gatehouse-local/redis:bookworm \
#     examples/docker-smoke.sh
#
# Needs a Debian mirror (DEBIAN_MIRROR, default deb.debian.org) and, for the derived
# images, network inside `docker build` for apt. Behind a TLS-inspecting proxy, cargo and
# pip in the build images must trust its CA: the host's extra CAs (EXTRA_CA_DIR, default
# /usr/local/share/ca-certificates, where `update-ca-certificates` reads them) are added
# to the rust and python images, never to the runtime image. Existing images are kept; pass --force to
# rebuild them. The stand-ins are not the real images: the runtime stand-in has a shell
# and apt (distroless has neither), so it proves the binary runs with glibc + libgcc as
# uid 65532, not that the image is as small as the distroless one.
set -eu

MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
SUITE=bookworm
FORCE=${1:-}
# Classic builder: the derived images need nothing BuildKit has.
export DOCKER_BUILDKIT=0

have_image() {
    [ "$FORCE" != "--force" ] && docker image inspect "$1" >/dev/null 2>&1
}

work=$(mktemp -d /var/tmp/gatehouse-local-images.XXXXXX)
trap 'rm -rf "$work"' EXIT INT TERM

# ---- the Debian base, from debootstrap ---------------------------------------------------
if have_image gatehouse-local/debian:$SUITE; then
    echo "gatehouse-local/debian:$SUITE exists (--force rebuilds it)"
else
    command -v debootstrap >/dev/null || { echo "debootstrap not found: apt-get install -y debootstrap" >&2; exit 1; }
    echo "debootstrap $SUITE from $MIRROR (a few minutes)..."
    debootstrap --variant=minbase "$SUITE" "$work/rootfs" "$MIRROR" >"$work/debootstrap.log" 2>&1 \
        || { tail -20 "$work/debootstrap.log" >&2; exit 1; }
    cat >"$work/rootfs/etc/apt/sources.list" <<EOF
deb $MIRROR $SUITE main
deb $MIRROR $SUITE-updates main
deb ${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security} $SUITE-security main
EOF
    # As in Debian's own container images: packages never start services during a build.
    printf '#!/bin/sh\nexit 101\n' >"$work/rootfs/usr/sbin/policy-rc.d"
    chmod 0755 "$work/rootfs/usr/sbin/policy-rc.d"
    rm -rf "$work/rootfs/var/cache/apt/archives/"*.deb "$work/rootfs/var/lib/apt/lists/"*
    tar -C "$work/rootfs" -c . | docker import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'CMD ["bash"]' - gatehouse-local/debian:$SUITE >/dev/null
    rm -rf "$work/rootfs"
    echo "built gatehouse-local/debian:$SUITE"
fi

# The host's extra CAs into $work/ctx/extra-ca (an empty directory when there are none).
add_host_cas() {
    mkdir -p "$work/ctx/extra-ca"
    for cert in "${EXTRA_CA_DIR:-/usr/local/share/ca-certificates}"/*.crt; do
        [ -f "$cert" ] && cp "$cert" "$work/ctx/extra-ca/"
    done
    return 0
}
CAS='COPY extra-ca/ /usr/local/share/ca-certificates/
RUN update-ca-certificates >/dev/null'

# build NAME: Dockerfile on stdin, context $work/ctx
build() {
    if have_image "$1"; then
        echo "$1 exists (--force rebuilds it)"
        return
    fi
    mkdir -p "$work/ctx"
    cat >"$work/ctx/Dockerfile"
    docker build -q -t "$1" "$work/ctx" >/dev/null
    rm -rf "$work/ctx"
    echo "built $1"
}

APT='export DEBIAN_FRONTEND=noninteractive && apt-get update -qq && apt-get install -y -qq --no-install-recommends'
CLEAN='rm -rf /var/lib/apt/lists/*'

# ---- RUNTIME_IMAGE: what distroless cc:nonroot offers -------------------------------------
build gatehouse-local/cc:nonroot <<EOF
FROM gatehouse-local/debian:$SUITE
RUN $APT ca-certificates && $CLEAN \
    && groupadd -g 65532 nonroot && useradd -u 65532 -g 65532 -M -d /home/nonroot -s /usr/sbin/nologin nonroot
USER nonroot:nonroot
WORKDIR /home/nonroot
EOF

# ---- RUST_IMAGE: a C toolchain (ring, aws-lc-sys) and the host's Rust toolchain -----------
if ! have_image gatehouse-local/rust:$SUITE; then
    sysroot=$(rustc --print sysroot)
    mkdir -p "$work/ctx/rust"
    # Without share/ (documentation): only the compilers, the standard library and cargo.
    for part in bin lib libexec etc; do
        [ -e "$sysroot/$part" ] && cp -a "$sysroot/$part" "$work/ctx/rust/"
    done
    echo "copying the host toolchain $("$sysroot/bin/rustc" --version) from $sysroot"
    add_host_cas
fi
build gatehouse-local/rust:$SUITE <<EOF
FROM gatehouse-local/debian:$SUITE
RUN $APT ca-certificates gcc g++ libc6-dev make perl pkg-config && $CLEAN
$CAS
COPY rust /usr/local/rust
ENV CARGO_HOME=/usr/local/cargo \
    PATH=/usr/local/cargo/bin:/usr/local/rust/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
RUN rustc --version && cargo --version
EOF
rm -rf "$work/ctx"

# ---- PYTHON_IMAGE: python3 with pip in a virtual environment on PATH ----------------------
have_image gatehouse-local/python:$SUITE || add_host_cas
build gatehouse-local/python:$SUITE <<EOF
FROM gatehouse-local/debian:$SUITE
RUN $APT ca-certificates python3 python3-venv && $CLEAN && python3 -m venv /opt/venv
$CAS
# pip trusts the system store (with the CAs above), not only its own certifi bundle.
ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PIP_CERT=/etc/ssl/certs/ca-certificates.crt \
    PYTHONUNBUFFERED=1
CMD ["python3"]
EOF

# ---- REDIS_IMAGE: Debian's redis-server, as user redis, data in /data ---------------------
build gatehouse-local/redis:$SUITE <<EOF
FROM gatehouse-local/debian:$SUITE
RUN $APT redis-server && $CLEAN && install -d -o redis -g redis -m 0750 /data
WORKDIR /data
USER redis
CMD ["redis-server"]
EOF

cat <<EOF

Local base images ready. Use them with:
  RUST_IMAGE=gatehouse-local/rust:$SUITE RUNTIME_IMAGE=gatehouse-local/cc:nonroot \\
  PYTHON_IMAGE=gatehouse-local/python:$SUITE REDIS_IMAGE=gatehouse-local/redis:$SUITE \\
    examples/docker-smoke.sh
or for the gateway image alone:
  docker build --build-arg RUST_IMAGE=gatehouse-local/rust:$SUITE \\
               --build-arg RUNTIME_IMAGE=gatehouse-local/cc:nonroot -t gatehouse .
EOF
