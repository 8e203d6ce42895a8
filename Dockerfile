# secretfs image: build with the Rust toolchain, run on a slim Debian with only glibc and
# libgcc_s (all the binary links). FUSE mounts use mount(2) directly: no fuse3 package.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock build.rs ./
COPY proto proto
COPY src src
COPY benches benches
RUN cargo build --release --locked --bin secretfs \
    && strip target/release/secretfs

FROM debian:bookworm-slim
COPY --from=build /src/target/release/secretfs /usr/local/bin/secretfs
ENTRYPOINT ["/usr/local/bin/secretfs"]
CMD ["--help"]
