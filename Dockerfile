# syntax=docker/dockerfile:1
# Build:  docker build -t deskbridge .
#         (buildah: buildah bud --format docker -t deskbridge . — the docker format keeps HEALTHCHECK)
# Run:    docker run -p 8080:8080 -e AMQP_URL=amqp://user:pass@rabbitmq:5672/%2f \
#           -e DESKBRIDGE_AUTH_MODE=jwt -e DESKBRIDGE_JWT_SECRET=... deskbridge
#         with a config file: -v ./deskbridge.toml:/etc/deskbridge/deskbridge.toml:ro \
#           -e DESKBRIDGE_CONFIG=/etc/deskbridge/deskbridge.toml
# Check:  scripts/image-test (builds it and runs it against a private RabbitMQ node);
#         deployment (compose, Kubernetes): docs/deploy.md.
# The bind below is not loopback, so deskbridge refuses to start until auth is chosen:
# DESKBRIDGE_AUTH_MODE=jwt (with DESKBRIDGE_JWT_SECRET or a public key in a mounted config), or
# DESKBRIDGE_ALLOW_ANONYMOUS=true on a trusted network.

# rust:1-bookworm already has OpenSSL's headers and pkg-config (libssl-dev), which amqps:// needs.
FROM rust:1-bookworm AS build
WORKDIR /src
# Dependencies first, in their own layer: source edits do not rebuild them.
COPY Cargo.toml Cargo.lock ./
# Cargo reads every target the manifest declares before it builds one: the [[bench]] `load`
# (benches/load/main.rs) needs a placeholder file. It is never built here. Examples and tests are
# found by directory and are not in this context, so they need none.
RUN mkdir -p src static benches/load \
 && echo 'fn main() {}' > src/main.rs \
 && echo 'fn main() {}' > benches/load/main.rs \
 && touch src/lib.rs static/index.html \
 && cargo build --release --locked --bin deskbridge \
 && rm -rf src static
COPY src ./src
COPY static ./static
# Touch so cargo sees the real sources as newer than the placeholder build.
RUN touch src/main.rs src/lib.rs \
 && cargo build --release --locked --bin deskbridge \
 && strip target/release/deskbridge

FROM debian:bookworm-slim
# libssl3 for amqps://; ca-certificates is the system trust store used when amqp.tls.ca_file is unset.
RUN apt-get update \
 && apt-get install -y --no-install-recommends libssl3 ca-certificates \
 && rm -rf /var/lib/apt/lists/*
RUN groupadd --system --gid 10001 deskbridge \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin deskbridge \
 && mkdir -p /etc/deskbridge
COPY --from=build /src/target/release/deskbridge /usr/local/bin/deskbridge
# What a registry and a platform team read (OCI image annotations), after the RUN steps so
# that new values do not rebuild them. A build passes its own revision and date
# (scripts/image-test: --label, which no layer cache can leave stale; or --build-arg).
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=unknown
ARG SOURCE=unknown
LABEL org.opencontainers.image.title="deskbridge" \
      org.opencontainers.image.description="Routes messages between browsers (WebSocket) and desktop apps (RabbitMQ, AMQP 0-9-1)" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.base.name="docker.io/library/debian:bookworm-slim"
USER 10001:10001
# Every setting has a default; these are the ones a container usually sets.
# The config file: mount it at /etc/deskbridge/deskbridge.toml and set
# DESKBRIDGE_CONFIG=/etc/deskbridge/deskbridge.toml (or pass --config). It is unset here on
# purpose: with it set, a missing or unreadable file stops the start (exit 2) instead of
# silently running on defaults, so a failed mount cannot go unnoticed.
ENV DESKBRIDGE_BIND=0.0.0.0:8080 \
    AMQP_URL=amqp://guest:guest@rabbitmq:5672/%2f \
    RUST_LOG=info
EXPOSE 8080
# Probes: GET /health/live (process serving) and GET /health (200 only with both AMQP links up).
# The image has no curl: the binary probes itself over loopback (`deskbridge health`, see
# src/probe.rs). Liveness, not readiness: a broker outage must not get every instance restarted.
# Kept by Docker's image format only (OCI drops it: buildah needs --format docker).
HEALTHCHECK --interval=10s --timeout=5s --start-period=10s --retries=3 \
  CMD ["/usr/local/bin/deskbridge", "health"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/deskbridge"]
