# syntax=docker/dockerfile:1
# One image with the three service binaries (callback-service, upstream-demo, downstream-demo);
# compose.yaml picks the binary per service with `command:`. Build: `docker compose build`
# (or `docker build -t recheck .`). No protoc needed: the .proto files are compiled by protox.

FROM rust:1-bookworm AS builder
WORKDIR /src
COPY . .
# target/ and the cargo registry live in cache mounts (kept between builds, not in the layer),
# so the binaries are copied out in the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked -p callback-service -p upstream-demo -p downstream-demo \
    && install -d /out \
    && install -m 0755 target/release/callback-service target/release/upstream-demo \
        target/release/downstream-demo /out/

FROM debian:bookworm-slim
# ca-certificates for amqps:// and TLS database URLs. bash (essential in Debian) runs the
# compose healthchecks that use /dev/tcp and /proc/net/tcp.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*
RUN useradd --system --uid 10001 --user-group --home-dir /var/lib/recheck --shell /usr/sbin/nologin recheck \
    && install -d -o recheck -g recheck /var/lib/recheck
COPY --from=builder /out/ /usr/local/bin/
USER recheck:recheck
# The SQLite defaults (`sqlite://<name>.db`) land here when no DATABASE_URL is given.
WORKDIR /var/lib/recheck
# callback-service gRPC (Admin, health), upstream-demo gRPC (Orders, ResendHook, health).
EXPOSE 50051 50061
CMD ["callback-service"]
