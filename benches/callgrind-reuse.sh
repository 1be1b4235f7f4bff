#!/usr/bin/env bash
# Instructions coexist executes per message on the reuse workload, counted by callgrind:
# a number that does not depend on what else the machine is doing (unlike time or CPU
# seconds), for comparing two builds side by side.
#
# Postfix smtp-source (connection reuse, -d) -> coexist (under valgrind --tool=callgrind,
# one worker thread) -> two smtp-sink backends, all on loopback. Counters are zeroed after
# a warm-up, then MSGS messages are sent and the counters dumped; the result is the total
# instruction count (Ir) divided by MSGS.
#
# Usage, from the repo root, after `cargo build --release` (needs valgrind and Postfix's
# smtp-source/smtp-sink: `apt-get install valgrind postfix`, or ../shared/bench/setup.sh):
#   bash benches/callgrind-reuse.sh [BINARY...]      # default: target/release/coexist
# Env: MSGS (2000), WARMUP (200), SESSIONS (4), SIZE (4096), RCPTS (1), BASE_PORT (26100).
set -euo pipefail

MSGS=${MSGS:-2000}
WARMUP=${WARMUP:-200}
SESSIONS=${SESSIONS:-4}
SIZE=${SIZE:-4096}
RCPTS=${RCPTS:-1}
BASE_PORT=${BASE_PORT:-26100}
BINS=("$@")
[ ${#BINS[@]} -gt 0 ] || BINS=(target/release/coexist)

for b in valgrind callgrind_control /usr/sbin/smtp-source /usr/sbin/smtp-sink; do
  command -v "$b" >/dev/null || { echo "callgrind-reuse: missing $b" >&2; exit 1; }
done

T=$(mktemp -d /tmp/callgrind-reuse.XXXXXX)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$T"; }
trap cleanup EXIT

OLD_PORT=$BASE_PORT NEW_PORT=$((BASE_PORT + 1)) LISTEN_PORT=$((BASE_PORT + 2)) ADMIN_PORT=$((BASE_PORT + 3))
/usr/sbin/smtp-sink -u nobody -c 127.0.0.1:$OLD_PORT 1024 >"$T/old.log" 2>&1 & PIDS+=($!)
/usr/sbin/smtp-sink -u nobody -c 127.0.0.1:$NEW_PORT 1024 >"$T/new.log" 2>&1 & PIDS+=($!)

cat >"$T/coexist.toml" <<EOF
[routes]
path = "routes.toml"
[admin]
listen = "127.0.0.1:$ADMIN_PORT"
[smtp]
hostname = "callgrind.example"
add_received = false
[[smtp.listener]]
listen = "127.0.0.1:$LISTEN_PORT"
mode = "relay"
[targets.old]
smtp = ["127.0.0.1:$OLD_PORT"]
[targets.new]
smtp = ["127.0.0.1:$NEW_PORT"]
EOF
cat >"$T/routes.toml" <<'EOF'
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

wait_port() {
  for _ in $(seq 1 600); do
    (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0
    sleep 0.1
  done
  echo "callgrind-reuse: nothing listens on $1" >&2
  return 1
}

send() {
  /usr/sbin/smtp-source -s "$SESSIONS" -m "$1" -l "$SIZE" -r "$RCPTS" -d \
    -f sender@bench.example -t rcpt@old.example -M client.example "127.0.0.1:$LISTEN_PORT"
}

printf '%-40s %14s %12s\n' binary "Ir/message" messages
for bin in "${BINS[@]}"; do
  rm -rf "$T/state" "$T/spool" "$T"/callgrind.out.*
  COEXIST_WORKER_THREADS=1 COEXIST_LOG=warn valgrind --tool=callgrind --callgrind-out-file="$T/callgrind.out.%p" \
    "$bin" serve -c "$T/coexist.toml" >"$T/coexist.log" 2>&1 &
  vpid=$!
  PIDS+=($vpid)
  wait_port $LISTEN_PORT
  send "$WARMUP"
  callgrind_control -z "$vpid" >/dev/null 2>&1
  send "$MSGS"
  callgrind_control -d "$vpid" >/dev/null 2>&1
  sleep 1
  # The dump after zeroing holds only what the MSGS messages cost.
  out=$(ls -t "$T"/callgrind.out.* | head -1)
  ir=$(callgrind_annotate "$out" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1; exit}')
  kill "$vpid" 2>/dev/null || true
  wait "$vpid" 2>/dev/null || true
  printf '%-40s %14s %12s\n' "$bin" "$((ir / MSGS))" "$MSGS"
done
