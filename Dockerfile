# syntax=docker/dockerfile:1
#
# wirestub's container image: the `engine` and `compiler` binaries, and the
# bundled example (protos/ and rules/) under /app, served by default.
#
#   docker build -t wirestub:0.1.0 .
#   docker run --rm -p 50051:50051 -p 9901:9901 wirestub:0.1.0
#
# Serving your own mocks: mount them and name them, e.g.
#   docker run --rm -p 50051:50051 -p 9901:9901 -v "$PWD/mocks:/mocks:ro" \
#       wirestub:0.1.0 run --protos /mocks/protos --rules /mocks/rules
# (a plan file: `... run /mocks/plan.bin`). The listen addresses come from
# the environment (below), so a command of your own keeps them.
#
# tests/python/test_packaging.py reads this file: it runs the runtime
# stage's ENTRYPOINT and CMD, with its ENV, from a directory laid out as
# /app by the COPY lines (loopback ports instead of 0.0.0.0), runs the
# HEALTHCHECK against it, and checks the builder's cargo command.

# Any Debian bookworm Rust image of at least the workspace's rust-version
# (1.89, Cargo.toml) builds it; this is the toolchain CI uses.
ARG RUST_VERSION=1.95

# ---------------------------------------------------------------------------
# Builder: the release binaries, exactly as Cargo.lock pins the dependencies.
# ---------------------------------------------------------------------------
FROM rust:${RUST_VERSION}-bookworm AS builder
WORKDIR /src
# The whole workspace (see .dockerignore for what stays out): cargo loads
# every member's manifest even when building two packages.
COPY . .
# The registry and target directory live in BuildKit cache mounts, so a
# rebuild after a source change recompiles only what changed. The target
# directory is not part of the image: the binaries are copied out of it in
# the same step, their debug sections stripped (the symbols stay, so
# backtraces still name functions).
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p wirestub-engine -p wirestub-compiler \
    && mkdir -p /out \
    && cp target/release/engine target/release/compiler /out/ \
    && strip --strip-debug /out/engine /out/compiler

# ---------------------------------------------------------------------------
# Runtime: Debian slim (the builder's glibc), CA certificates for https://
# upstreams (the engine reads /etc/ssl/certs/ca-certificates.crt), a user
# of its own.
# ---------------------------------------------------------------------------
FROM debian:bookworm-slim AS runtime
ARG VERSION=0.1.0
ARG REVISION=""
ARG CREATED=""
ARG SOURCE=""
LABEL org.opencontainers.image.title="wirestub" \
      org.opencontainers.image.description="gRPC mock engine: serves .proto files and rule files to gRPC, gRPC-Web and Connect clients" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.licenses="MIT OR Apache-2.0" \
      org.opencontainers.image.base.name="docker.io/library/debian:bookworm-slim"

# ca-certificates unpinned: bookworm's current one (security updates).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 10001 wirestub \
    && useradd --uid 10001 --gid 10001 --home-dir /app --no-create-home \
       --shell /usr/sbin/nologin wirestub

COPY --from=builder /out/engine /out/compiler /usr/local/bin/

WORKDIR /app
# The bundled example. Owned by the engine's user: without a plan, mocks
# changed through the admin API (and the web UI's editor) are written into
# the first --protos and --rules directories.
COPY --chown=10001:10001 protos/ /app/protos/
COPY --chown=10001:10001 rules/ /app/rules/

# Every flag of `engine run` is also a WIRESTUB_* variable, and the command
# line wins over the environment: the addresses are set here rather than
# in CMD so that `docker run IMAGE run ...` with flags of your own still
# listens where the ports are published.
#
# The admin API must listen beyond loopback in a container (published
# ports, Kubernetes probes from the kubelet), and the engine refuses that
# without --admin-token unless --admin-insecure says so. A token cannot be
# baked into an image, so the image allows it: anyone who reaches port 9901
# can change the mocks and read the journal. Publish 9901 only where that
# is fine, or pass -e WIRESTUB_ADMIN_TOKEN=... : with a token every admin
# route but /healthz and /readyz needs `Authorization: Bearer TOKEN`
# whatever WIRESTUB_ADMIN_INSECURE says.
ENV WIRESTUB_LISTEN=0.0.0.0:50051 \
    WIRESTUB_ADMIN_LISTEN=0.0.0.0:9901 \
    WIRESTUB_ADMIN_INSECURE=true

USER 10001:10001
EXPOSE 50051 9901

# The engine has no probe subcommand and the image has no curl: bash's
# /dev/tcp sends GET /readyz (200 while serving, 503 while draining) to the
# admin port named by WIRESTUB_ADMIN_LISTEN. Kubernetes ignores this and
# uses the chart's probes (deploy/helm/wirestub) on the same routes. With
# the admin API off (WIRESTUB_ADMIN_LISTEN=off), run with --no-healthcheck.
HEALTHCHECK --interval=15s --timeout=3s --start-period=60s --retries=3 \
    CMD ["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/${WIRESTUB_ADMIN_LISTEN##*:} && printf 'GET /readyz HTTP/1.0\\r\\n\\r\\n' >&3 && read -r -t 2 status <&3 && [[ $status == *' 200 '* ]]"]

# SIGTERM (docker stop) drains: health NOT_SERVING, GOAWAY, in-flight calls
# get --drain-timeout-ms (5 s) to finish, within docker stop's 10 s.
ENTRYPOINT ["/usr/local/bin/engine"]
CMD ["run", "--protos", "protos", "--rules", "rules"]
