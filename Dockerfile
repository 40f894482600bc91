# syntax=docker/dockerfile:1
#
# tokenproxy container image.
#
#   docker build -t tokenproxy:local .
#   docker run --rm -e PAY_CLIENT_ID=x -e PAY_CLIENT_SECRET=y \
#     -v "$PWD/config:/etc/tokenproxy:ro" tokenproxy:local check --config /etc/tokenproxy/example.toml
#
# Stage 1 builds a release binary; stage 2 is a distroless image holding only that
# binary. The build stage's Rust version must be at least `rust-version` in
# Cargo.toml (deploy/check.sh verifies this).

ARG RUST_VERSION=1.89

FROM rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
# Smaller binary without touching Cargo.toml's release profile.
ENV CARGO_PROFILE_RELEASE_STRIP=symbols \
    CARGO_TERM_COLOR=never

# Dependency layer: with only the manifest and lock file in place, build a stub
# crate so every dependency is compiled into a cached layer. This layer is
# rebuilt only when Cargo.toml or Cargo.lock change, not on every source edit.
COPY Cargo.toml Cargo.lock ./
COPY mock/Cargo.toml mock/Cargo.toml
RUN mkdir -p src mock/src \
 && echo 'fn main() {}' > src/main.rs \
 && touch src/lib.rs mock/src/lib.rs \
 && cargo build --release --locked -p tokenproxy \
 && rm -rf src mock/src

# The real sources: src/ and the mock crate (behind `tokenproxy demo`) are all
# the package builds from (copy build.rs or other target directories too if
# Cargo.toml ever names them). `touch` makes them newer than the stub's build
# artefacts: COPY keeps the build context's mtimes, which can be older, and
# cargo would then keep the stub binary.
COPY src ./src
COPY mock/src ./mock/src
RUN touch src/main.rs src/lib.rs mock/src/lib.rs \
 && cargo build --release --locked -p tokenproxy \
 && install -D -m 0755 target/release/tokenproxy /out/tokenproxy

# Stage 2: distroless "cc" = glibc + libgcc + ca-certificates, no shell, no
# package manager; the ":nonroot" variant's default user is 65532. Pin by digest
# (cc-debian12:nonroot@sha256:...) in production for reproducible rollouts.
#
# TLS: tokenproxy uses rustls with Mozilla's root certificates compiled in
# (webpki-roots) plus the system store, so /etc/ssl/certs is optional; mount a
# CA bundle there (or set SSL_CERT_FILE) only for a private CA.
FROM gcr.io/distroless/cc-debian12:nonroot AS runtime
COPY --from=build /out/tokenproxy /usr/local/bin/tokenproxy

# Numeric UID:GID so Kubernetes' runAsNonRoot can verify it without /etc/passwd.
USER 65532:65532

# 8080: where the app sends its API requests ([clients.NAME] listen).
# 9090: admin listener: /metrics /healthz /readyz /status ([admin] listen).
#
# tokenproxy listens on 127.0.0.1 by default. In a pod (or a compose service
# sharing the app's network namespace) the app reaches 127.0.0.1:8080 directly,
# so the client listener stays on loopback and is never exposed. The admin
# listener must bind 0.0.0.0:9090 (admin.listen in the config) so that the
# kubelet's probes and Prometheus, which connect to the pod IP, reach it.
# Refresh-token hand-over (POST /clients/NAME/refresh-token) stays loopback-only
# whatever admin.listen says.
EXPOSE 8080 9090

# Health: the orchestrator probes GET /healthz (liveness) and GET /readyz
# (readiness: 200 once every client holds a usable token) on the admin port.
# There is no HEALTHCHECK here: distroless has no shell and no curl to run one,
# and Kubernetes ignores HEALTHCHECK anyway; use the orchestrator's HTTP probes.
#
# Stopping: SIGTERM drains in-flight requests for limits.shutdown_grace
# (default 25s), then exits 0; give the container more than that to stop.
STOPSIGNAL SIGTERM

ENTRYPOINT ["/usr/local/bin/tokenproxy"]
CMD ["--config", "/etc/tokenproxy/tokenproxy.toml"]
