# Gatehouse image: build with cargo in the Rust image, run from distroless as non-root.
#
#   docker build -t gatehouse .
#   docker run --rm -p 80:8080 -p 443:8443 \
#     -v "$PWD/gateway.toml:/etc/gatehouse/gateway.toml:ro" \
#     -v /etc/gatehouse/certs:/etc/gatehouse/certs:ro gatehouse
#   (with [acme] instead of certificate files: -v gatehouse-acme:/var/lib/gatehouse/acme)
#
# The process listens on 8080 (HTTP -> HTTPS redirect, ACME challenges) and 8443 (HTTPS):
# a non-root user cannot bind ports below 1024, so the host maps 80:8080 and 443:8443
# (set `listen.public_https_port = 443` so redirects omit the port).
# The config and the certificates are mounted read-only under /etc/gatehouse; the
# certificates as a directory, so a renewal written on the host is picked up without a
# restart. See docs/operations.md.
#
# No `# syntax=` line and no BuildKit-only instructions: the image builds offline and with
# the classic builder. The base images are build arguments, so a mirrored or locally
# built base can stand in (air-gapped registries, examples/docker-smoke.sh):
#   docker build --build-arg RUST_IMAGE=mirror/rust:1-bookworm \
#                --build-arg RUNTIME_IMAGE=mirror/distroless-cc:nonroot -t gatehouse .
ARG RUST_IMAGE=rust:1-bookworm
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot

# ---- build ------------------------------------------------------------------------------
FROM ${RUST_IMAGE} AS build
WORKDIR /src
# The whole workspace (the loadtest member must be present for cargo to read the
# workspace); .dockerignore keeps target/, .git/ and the dev keys out of the context.
COPY . .
RUN cargo build --release --locked --bin gatehouse \
    && install -m 0755 target/release/gatehouse /usr/local/bin/gatehouse \
    && install -d -m 0700 /var/lib/gatehouse/acme

# ---- runtime ----------------------------------------------------------------------------
# glibc + libgcc, CA roots, no shell, no package manager; `nonroot` is uid/gid 65532.
FROM ${RUNTIME_IMAGE} AS runtime
COPY --from=build /usr/local/bin/gatehouse /usr/local/bin/gatehouse
# `acme.storage`'s default, owned by nonroot: a named volume mounted there starts with
# this owner, so the ACME account and certificate can be written (docs/operations.md).
COPY --from=build --chown=65532:65532 /var/lib/gatehouse /var/lib/gatehouse
USER nonroot:nonroot
ENV GATEHOUSE_CONFIG=/etc/gatehouse/gateway.toml
EXPOSE 8080 8443
# `gatehouse health` asks the admin listener's /readyz (plain TCP from the binary
# itself: this image has no curl). The config must enable `[admin] listen`.
HEALTHCHECK --interval=15s --timeout=5s --start-period=10s --retries=3 \
    CMD ["/usr/local/bin/gatehouse", "health", "--config", "/etc/gatehouse/gateway.toml"]
# SIGTERM starts a graceful drain of `server.shutdown_grace` (default 8 s), which ends
# before Docker's 10 s stop timeout sends SIGKILL.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/gatehouse"]
CMD ["run", "--config", "/etc/gatehouse/gateway.toml"]
