# syntax=docker/dockerfile:1
# Build:  docker build -t deskbridge .
# Run:    docker run -p 8080:8080 -e AMQP_URL=amqp://user:pass@rabbitmq:5672/%2f \
#           -e DESKBRIDGE_AUTH_MODE=jwt -e DESKBRIDGE_JWT_SECRET=... deskbridge
# The bind below is not loopback, so deskbridge refuses to start until auth is chosen:
# DESKBRIDGE_AUTH_MODE=jwt (with DESKBRIDGE_JWT_SECRET or a public key in a mounted config), or
# DESKBRIDGE_ALLOW_ANONYMOUS=true on a trusted network.

# rust:1-bookworm already has OpenSSL's headers and pkg-config (libssl-dev), which amqps:// needs.
FROM rust:1-bookworm AS build
WORKDIR /src
# Dependencies first, in their own layer: source edits do not rebuild them.
COPY Cargo.toml Cargo.lock ./
# (benches/load.rs is declared in Cargo.toml, so a placeholder must exist; it is never built here.)
RUN mkdir -p src static benches \
 && echo 'fn main() {}' > src/main.rs \
 && echo 'fn main() {}' > benches/load.rs \
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
 && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin deskbridge
COPY --from=build /src/target/release/deskbridge /usr/local/bin/deskbridge
USER 10001:10001
# Every setting has a default; these are the ones a container usually sets.
ENV DESKBRIDGE_BIND=0.0.0.0:8080 \
    AMQP_URL=amqp://guest:guest@rabbitmq:5672/%2f \
    RUST_LOG=info
EXPOSE 8080
# Probes: GET /health/live (process serving) and GET /health (200 only with both AMQP links up).
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/deskbridge"]
