#!/usr/bin/env bash
# Two coexist builds side by side on the shared SMTP bench (../shared/bench/smtp.sh):
# rounds alternate A and B, each round a full run of every workload against direct
# delivery, so the machine's drift hits both builds alike. Prints, per workload and build,
# the median over the rounds of msg/s, the ratio to direct delivery in the same run, and
# coexist's own CPU per message.
#
# Usage, from the repo root:
#   PIN=0:1 bash benches/ab-smtp.sh OLD_BINARY NEW_BINARY
# Env: ROUNDS (3), SHARED_BENCH (../shared/bench), and anything smtp.sh takes (MSGS,
# SESSIONS, WORKLOADS, PIN, ...).
set -euo pipefail

[ $# -eq 2 ] || { echo "usage: $0 OLD_BINARY NEW_BINARY" >&2; exit 2; }
HERE=$(cd "$(dirname "$0")" && pwd)
SHARED_BENCH=${SHARED_BENCH:-$HERE/../../shared/bench}
ROUNDS=${ROUNDS:-3}
A=$1 B=$2
OUT=$(mktemp /tmp/ab-smtp.XXXXXX)
trap 'rm -f "$OUT"' EXIT

for r in $(seq 1 "$ROUNDS"); do
  for label in A B; do
    bin=$A; [ $label = B ] && bin=$B
    log=$(mktemp /tmp/ab-smtp-run.XXXXXX)
    echo "round $r: $label ($bin)" >&2
    COEXIST_BIN=$bin CONFIGS="direct proxy" REPEAT=1 \
      bash "$SHARED_BENCH/smtp.sh" "$HERE/smtp-proxy-wrapper.sh" >"$log" 2>&1 \
      || { echo "smtp.sh failed:" >&2; tail -20 "$log" >&2; exit 1; }
    # Table lines: "config msg/s min max spread% vs_direct cpu_us/m sink_us/m other% runs"
    awk -v label=$label '
      /^-- workload/ { wl = $3 }
      $1 == "proxy" && wl != "" { print label, wl, $2, $6, $7 }
    ' "$log" >>"$OUT"
    rm -f "$log"
  done
done

median() { sort -n | awk '{v[NR]=$1} END {if (NR%2) print v[(NR+1)/2]; else print (v[NR/2]+v[NR/2+1])/2}'; }
printf '%-14s %-5s %10s %10s %10s   %s\n' workload build 'msg/s' vs_direct 'cpu us/m' 'rounds (vs_direct/cpu)'
for wl in $(awk '{print $2}' "$OUT" | awk '!seen[$0]++'); do
  for label in A B; do
    sel() { awk -v l=$label -v w="$wl" -v c="$1" '$1 == l && $2 == w {print $c}' "$OUT"; }
    rounds=$(awk -v l=$label -v w="$wl" '$1 == l && $2 == w {printf "%s/%s ", $4, $5}' "$OUT")
    printf '%-14s %-5s %10s %10s %10s   %s\n' "$wl" "$label" "$(sel 3 | median)" "$(sel 4 | median)" "$(sel 5 | median)" "$rounds"
  done
done
echo "A = $A"
echo "B = $B"
