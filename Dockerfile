# syntax=docker/dockerfile:1
# Base images are build arguments: the defaults are the public images; a mirror, or a base made
# locally (deploy/image/check.sh makes one with mmdebstrap), can stand in for either.
ARG BUILD_IMAGE=rust:1-bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim
# Where the binary comes from: `build` compiles it in BUILD_IMAGE (the default); `prebuilt`
# copies a binary built outside (for glibc 2.36 or older, as on bookworm) from EDGESLICE_BINARY
# in the build context, and BUILD_IMAGE is never pulled.
ARG BINARY_FROM=build

# Build stage: pingora-core needs cmake and a C compiler for zlib-ng; jemalloc (the allocator)
# builds with the C compiler and make, both in this image; the TLS backend compiles OpenSSL 3 in
# (the openssl crate's `vendored` build, with perl and make; libssl-dev and pkg-config are only
# what openssl-sys would fall back to).
FROM ${BUILD_IMAGE} AS build
RUN apt-get update && apt-get install -y --no-install-recommends cmake libssl-dev pkg-config && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY benches ./benches
# Pingora's core with edgeslice's one change (vendor/README.md), patched in by Cargo.toml.
COPY vendor ./vendor
RUN cargo build --release --locked --bin edgeslice && cp target/release/edgeslice /edgeslice

FROM scratch AS prebuilt
ARG EDGESLICE_BINARY=target/release/edgeslice
COPY ${EDGESLICE_BINARY} /edgeslice

FROM ${BINARY_FROM} AS binary

# Runtime stage: a small Debian with a non-root user. OpenSSL is in the binary: the image needs
# the CA certificates (HTTPS origins) and curl (the HEALTHCHECK), no libssl.
FROM ${RUNTIME_IMAGE}
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /var/cache/edgeslice edgeslice \
    && mkdir -p /etc/edgeslice /var/cache/edgeslice \
    && chown edgeslice /var/cache/edgeslice
COPY --from=binary /edgeslice /usr/local/bin/edgeslice
COPY conf/edgeslice.docker.yaml /etc/edgeslice/edgeslice.yaml
USER edgeslice
VOLUME ["/var/cache/edgeslice"]
EXPOSE 8080 9180
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD curl -fsS http://127.0.0.1:9180/healthz || exit 1
ENTRYPOINT ["/usr/local/bin/edgeslice"]
CMD ["-c", "/etc/edgeslice/edgeslice.yaml"]
