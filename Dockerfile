# The engine's image: `inventorysync run` by default; `inventorysync central` serves the
# reference central server from the same image.
FROM rust:1.95-bookworm AS build
# librdkafka and jemalloc (built from source by rdkafka-sys and tikv-jemalloc-sys) need a C
# toolchain and make; librdkafka also OpenSSL headers.
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential libssl-dev pkg-config \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin inventorysync \
 && cp target/release/inventorysync /usr/local/bin/inventorysync

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates libssl3 curl \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home-dir /etc/inventorysync inventorysync
COPY --from=build /usr/local/bin/inventorysync /usr/local/bin/inventorysync
COPY sql /usr/share/inventorysync/sql
WORKDIR /etc/inventorysync
USER inventorysync
EXPOSE 8080 9000
ENTRYPOINT ["inventorysync"]
CMD ["run"]
