# byoc-sidecar: a SIP proxy beside a telephony Edge that owns the trunk's credentials.
#
#   docker build -t byoc-sidecar .
#   docker run --network host \
#     -v $PWD/deploy/sidecar.toml:/etc/byoc-sidecar/sidecar.toml:ro \
#     -v $PWD/secrets:/run/secrets/byoc:ro byoc-sidecar
#
# Build stage: the release binary from the locked dependency set (Cargo.lock).
FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
RUN cargo build --release --locked \
    && strip target/release/byoc-sidecar

# Runtime stage: slim Debian, a non-root user, nothing else but CA roots and curl for the
# health check. ca-certificates is needed twice over: token endpoints are https, and a
# core reached over TLS without [trunk.tls] ca_file is checked against these system roots
# (without any, `check` and `run` refuse such a trunk: "no CA certificates").
FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 byoc \
    && useradd --system --uid 10001 --gid byoc --no-create-home --shell /usr/sbin/nologin byoc \
    && mkdir -p /etc/byoc-sidecar /run/secrets/byoc
COPY --from=build /src/target/release/byoc-sidecar /usr/local/bin/byoc-sidecar
COPY deploy/sidecar.toml /etc/byoc-sidecar/sidecar.toml
USER byoc:byoc
# SIP toward the Edge and toward the core (UDP and TCP), and the admin listener. A tls:
# listener in the configuration needs its port published as well (5061/tcp, say).
EXPOSE 5060/udp 5060/tcp 5070/udp 5070/tcp 9090/tcp
# SIGTERM stops it cleanly (registrations unregister first).
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD curl -fsS http://127.0.0.1:9090/healthz || exit 1
ENTRYPOINT ["/usr/local/bin/byoc-sidecar"]
CMD ["run", "--config", "/etc/byoc-sidecar/sidecar.toml"]
