# coexist — multi-stage build with the same commands as the README.
#   docker build -t coexist .
#   docker run --rm -p 2525:2525 -p 8025:8025 coexist demo      # the README's first command
#   docker run -v /srv/coexist/etc:/etc/coexist -v /srv/coexist/state:/var/lib/coexist \
#       -p 25:2525 -p 587:2587 -p 8025:8025 coexist                # serve your own config
# Your coexist.toml should set `[routes] state_dir = "/var/lib/coexist"`, listen on 0.0.0.0
# (container ports above 1024: the process runs unprivileged; map 25 → 2525 on the host), and
# give `[admin] token_file` since the admin API is then not on loopback.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked && cargo test --release --locked --lib

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home-dir /var/lib/coexist coexist \
 && mkdir -p /etc/coexist /var/lib/coexist \
 && chown coexist /var/lib/coexist
COPY --from=build /src/target/release/coexist /usr/local/bin/coexist
COPY config/ /etc/coexist/
USER coexist
WORKDIR /var/lib/coexist
VOLUME ["/etc/coexist", "/var/lib/coexist"]
EXPOSE 2525 2587 2465 8025
# /healthz needs no token; the admin address comes from the config (8025 by default).
HEALTHCHECK --interval=30s --timeout=5s CMD curl -fsS http://127.0.0.1:8025/healthz || exit 1
ENTRYPOINT ["coexist"]
CMD ["serve", "-c", "/etc/coexist/coexist.toml"]
