#!/usr/bin/env bash
# Adapter between the shared SMTP benchmark (shared/bench/smtp.sh) and coexist.
#
# smtp.sh starts "the proxy command" with these env vars (see shared/bench/README.md):
#   LISTEN_ADDR LISTEN_PORT  where the proxy must accept SMTP
#   OLD_PORT NEW_PORT        the two smtp-sink backends on 127.0.0.1;
#                            *@new.example belongs on NEW, everything else on OLD
#                            (the load itself is rcpt@old.example)
#   WORKERS                  worker threads the reference proxies get
#   BENCH_TMP                scratch dir
# This script writes a coexist config + routing table for that into $BENCH_TMP
# and execs `coexist serve` (exec: the PID smtp.sh holds is coexist's own).
#
# Usage, from the repo root:
#   cargo build --release
#   bash ../shared/bench/smtp.sh 'benches/smtp-proxy-wrapper.sh'
# Env: COEXIST_BIN (default: target/release/coexist in this script's repo),
#      COEXIST_LOG (default: warn).
set -euo pipefail

: "${LISTEN_PORT:?LISTEN_PORT not set (run via shared/bench/smtp.sh)}"
: "${OLD_PORT:?OLD_PORT not set}"
: "${NEW_PORT:?NEW_PORT not set}"
: "${BENCH_TMP:?BENCH_TMP not set}"
LISTEN_ADDR=${LISTEN_ADDR:-127.0.0.1}
WORKERS=${WORKERS:-1}

HERE=$(cd "$(dirname "$0")" && pwd)
COEXIST_BIN=${COEXIST_BIN:-$HERE/../target/release/coexist}
if [ ! -x "$COEXIST_BIN" ]; then
  echo "smtp-proxy-wrapper: no coexist binary at $COEXIST_BIN (cargo build --release, or set COEXIST_BIN)" >&2
  exit 1
fi

# Admin API out of the way of the bench's port block (BASE_PORT..BASE_PORT+20).
ADMIN_PORT=$((LISTEN_PORT + 1000))

cat >"$BENCH_TMP/coexist.toml" <<EOF
# written by benches/smtp-proxy-wrapper.sh for shared/bench/smtp.sh
[routes]
path = "routes.toml"

[admin]
listen = "127.0.0.1:$ADMIN_PORT"

[smtp]
hostname = "bench-coexist.example"
mixed_recipients = "fanout"
# haproxy/nginx forward the message unchanged; do the same so the sinks see
# identical sizes (coexist adds a Received: header by default).
add_received = false

[[smtp.listener]]
listen = "$LISTEN_ADDR:$LISTEN_PORT"
mode = "relay"

[targets.old]
smtp = ["127.0.0.1:$OLD_PORT"]

[targets.new]
smtp = ["127.0.0.1:$NEW_PORT"]
EOF

# Both bench domains route by their `unknown` rule. A routing table needs at
# least one site with a mailbox, so old.example gets one that the load does not
# use (the load's rcpt@old.example / NNrcpt@old.example take the domain default).
cat >"$BENCH_TMP/routes.toml" <<'EOF'
[domains."old.example"]
unknown = "old"

[domains."new.example"]
unknown = "new"

[sites.bench]
owner = "old"

[[mailbox]]
address = "postmaster@old.example"
site = "bench"
EOF

# Same thread count as the reference proxies (nginx workers / haproxy nbthread).
export COEXIST_WORKER_THREADS=$WORKERS
# The references log nothing per message (haproxy without log, nginx without
# access_log); keep coexist's per-recipient INFO lines out of the measurement
# too. COEXIST_LOG takes tracing EnvFilter directives; override to debug.
export COEXIST_LOG=${COEXIST_LOG:-warn}
exec "$COEXIST_BIN" serve -c "$BENCH_TMP/coexist.toml"
