# coexist — multi-stage build with the same commands as the README.
#   docker build -t coexist .
#   docker run --rm -p 2525:2525 -p 8025:8025 coexist demo --listen 0.0.0.0   # the README's first command
#   docker run -d --name coexist -v coexist-state:/var/lib/coexist -p 25:2525 coexist
#       # serve: /etc/coexist/coexist.toml is config/installed/coexist.toml; mount your own
#       # /etc/coexist (read-only is fine) with coexist.toml and the seed routes.toml
#   docker exec coexist coexist status      # cutover, rollback, reload the same way
# The process runs as uid 10001 and writes only under /var/lib/coexist: the live routing
# table (created from /etc/coexist/routes.toml on the first start), the kept versions and
# the spool. The admin API listens on the container's loopback; the health check asks it.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked && cargo test --release --locked --lib

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home-dir /var/lib/coexist coexist \
 && mkdir -p /etc/coexist /var/lib/coexist \
 && chown coexist /var/lib/coexist
COPY --from=build /src/target/release/coexist /usr/local/bin/coexist
COPY config/routes.toml config/mailboxes.csv /etc/coexist/
COPY config/installed/coexist.toml /etc/coexist/coexist.toml
# Every command reads the installed config without -c (`docker exec coexist coexist status`).
ENV COEXIST_CONFIG=/etc/coexist/coexist.toml
USER coexist
WORKDIR /var/lib/coexist
VOLUME ["/var/lib/coexist"]
EXPOSE 2525 2587 2465 8025
# Follows the admin address in the config (no port written here); /readyz needs no token.
HEALTHCHECK --interval=30s --timeout=5s CMD ["coexist", "health"]
ENTRYPOINT ["coexist"]
CMD ["serve"]
