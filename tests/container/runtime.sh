#!/usr/bin/env bash
# The container image's runtime, without a container engine: the release binary runs as the
# image's unprivileged user (uid 10001) with the image's files in the image's places, in a
# private mount and network namespace:
#   /etc/coexist       read-only: config/installed/coexist.toml + the sample seed table
#   /var/lib/coexist   empty, owned by 10001 (the image's volume)
# and with COEXIST_CONFIG set as the Dockerfile sets it. It must serve mail, pass its health
# check, cut over and roll back (writing only under /var/lib/coexist), drain on SIGTERM, and
# the demo must listen on all addresses with `demo --listen 0.0.0.0`.
# Needs root (namespaces, bind mounts), util-linux (unshare, setpriv), iproute2, python3 and
# Postfix's smtp-sink as the two backends (installed by tests/interop/install-deps.sh).
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=${COEXIST_BIN:-target/release/coexist}

die() { echo "container runtime: FAIL: $*" >&2; exit 1; }
pass=0
ok() { pass=$((pass + 1)); echo "  ok: $*"; }

[ "$(id -u)" = 0 ] || die "must run as root (namespaces and bind mounts)"
for t in unshare setpriv ip python3 smtp-sink ss; do
  command -v "$t" >/dev/null || die "missing $t"
done
[ -x "$BIN" ] || die "no binary at $BIN (cargo build --release)"

# The Dockerfile is what this test stands in for: its layout must be the one tested here.
grep -q '^COPY config/installed/coexist.toml /etc/coexist/coexist.toml$' Dockerfile || die "Dockerfile: installed config"
grep -q '^COPY config/routes.toml config/mailboxes.csv /etc/coexist/$' Dockerfile || die "Dockerfile: seed table"
grep -q '^ENV COEXIST_CONFIG=/etc/coexist/coexist.toml$' Dockerfile || die "Dockerfile: COEXIST_CONFIG"
grep -q 'useradd --system --uid 10001' Dockerfile || die "Dockerfile: uid 10001"
grep -q '^USER coexist$' Dockerfile || die "Dockerfile: USER"
grep -q '^HEALTHCHECK .*CMD \["coexist", "health"\]$' Dockerfile || die "Dockerfile: HEALTHCHECK"
grep -q '^VOLUME \["/var/lib/coexist"\]$' Dockerfile || die "Dockerfile: VOLUME"
ok "Dockerfile layout is the one tested"

W=$(mktemp -d /tmp/coexist-container.XXXXXX)
chmod 755 "$W"
cleanup() { rm -rf "$W"; }
trap cleanup EXIT
install -d -m 755 "$W/bin" "$W/etc" "$W/var" "$W/sink"
install -m 755 "$BIN" "$W/bin/coexist"
install -m 444 config/installed/coexist.toml "$W/etc/coexist.toml"
install -m 444 config/routes.toml config/mailboxes.csv "$W/etc/"
chmod 555 "$W/etc"
chown 10001:10001 "$W/var"
chown nobody: "$W/sink"
export W

# Everything below runs in its own mount and network namespace: /etc/coexist and
# /var/lib/coexist are bind mounts that vanish with it, and the fixed ports of the installed
# config (2525, 8025, 2601, 2602) are on a loopback of its own.
unshare --mount --net --fork bash -euo pipefail <<'INNER'
die() { echo "container runtime: FAIL: $*" >&2; exit 1; }
ip link set lo up
made_etc=0; made_var=0
[ -d /etc/coexist ] || { mkdir /etc/coexist; made_etc=1; }
[ -d /var/lib/coexist ] || { mkdir -p /var/lib/coexist; made_var=1; }
cleanup() {
  umount /etc/coexist /var/lib/coexist 2>/dev/null || true
  [ "$made_etc" = 0 ] || rmdir /etc/coexist 2>/dev/null || true
  [ "$made_var" = 0 ] || rmdir /var/lib/coexist 2>/dev/null || true
  jobs -p | xargs -r kill 2>/dev/null || true
}
trap cleanup EXIT
mount --bind "$W/etc" /etc/coexist
mount -o remount,bind,ro /etc/coexist
mount --bind "$W/var" /var/lib/coexist
if touch /etc/coexist/probe 2>/dev/null; then die "/etc/coexist is writable"; fi

export COEXIST_CONFIG=/etc/coexist/coexist.toml
as_app() { setpriv --reuid=10001 --regid=10001 --clear-groups env HOME=/var/lib/coexist "$@"; }
C="$W/bin/coexist"

smtp-sink -u nobody -d "$W/sink/old." 127.0.0.1:2601 16 >"$W/sink-old.log" 2>&1 &
smtp-sink -u nobody -d "$W/sink/new." 127.0.0.1:2602 16 >"$W/sink-new.log" 2>&1 &

(cd /var/lib/coexist && exec setpriv --reuid=10001 --regid=10001 --clear-groups "$C" serve) \
  >"$W/serve.log" 2>&1 &
serve=$!
ready=0
for _ in $(seq 1 100); do
  if as_app "$C" health >/dev/null 2>&1; then ready=1; break; fi
  kill -0 "$serve" 2>/dev/null || { cat "$W/serve.log" >&2; die "serve exited"; }
  sleep 0.1
done
[ "$ready" = 1 ] || { cat "$W/serve.log" >&2; die "never healthy"; }
echo "  ok: serve as uid 10001 with a read-only /etc/coexist; coexist health follows the admin address"

live=/var/lib/coexist/routes/routes.toml
[ -f "$live" ] && [ -f /var/lib/coexist/routes/mailboxes.csv ] || die "the seed was not copied: $(ls -R /var/lib/coexist)"
cmp -s "$live" /etc/coexist/routes.toml || die "the live table differs from its seed"
[ -d /var/lib/coexist/state ] && [ -d /var/lib/coexist/spool ] || die "state or spool missing"
[ "$(stat -c %u "$live")" = 10001 ] || die "live table not owned by 10001"
echo "  ok: first start created the live table from the seed, state and spool under /var/lib/coexist"

ss -ltn | grep -q '0.0.0.0:2525 ' || die "SMTP not on 0.0.0.0:2525: $(ss -ltn)"

send() { # send RCPT: prints the final reply code
  python3 - "$1" <<'PY'
import smtplib, sys
s = smtplib.SMTP("127.0.0.1", 2525, timeout=20)
s.ehlo("container.test")
try:
    s.sendmail("ops@internet.example", [sys.argv[1]], "Subject: container\r\n\r\nhello\r\n")
    print(250)
except smtplib.SMTPRecipientsRefused as e:
    print(list(e.recipients.values())[0][0])
s.quit()
PY
}
delivered() { grep -ls "X-Rcpt-Args: <$2>" "$W/sink/$1."* 2>/dev/null | wc -l; }
[ "$(send carol@example.com)" = 250 ] || die "carol not accepted"
sleep 0.3
[ "$(delivered old carol@example.com)" = 1 ] || die "carol did not reach OLD"
[ "$(send someone@gmail.com)" = 550 ] || die "relay not denied"
echo "  ok: mail routed (carol -> OLD), relay denied"

seed_sum=$(sha256sum /etc/coexist/routes.toml)
out=$(as_app "$C" cutover berlin --to new) || die "cutover failed: $out"
echo "$out" | grep -q 'cutover site berlin -> new: applied' || die "cutover: $out"
grep -q '^owner = "new"' <(sed -n '/^\[sites.berlin\]/,/^\[/p' "$live") || die "live table not rewritten"
[ "$(send carol@example.com)" = 250 ] || die "carol not accepted after cutover"
sleep 0.3
[ "$(delivered new carol@example.com)" = 1 ] || die "carol did not reach NEW after the cutover"
out=$(as_app "$C" rollback) || die "rollback failed: $out"
echo "$out" | grep -q 'rollback to 1-' || die "rollback: $out"
cmp -s "$live" /etc/coexist/routes.toml || die "rollback did not restore the live table"
[ "$(sha256sum /etc/coexist/routes.toml)" = "$seed_sum" ] || die "the seed changed"
as_app "$C" status | grep -q 'berlin .*owner old' || die "status after rollback: $(as_app "$C" status)"
echo "  ok: cutover and rollback as uid 10001 rewrite only the live table"

kill -TERM "$serve"
wait "$serve" || { cat "$W/serve.log" >&2; die "serve did not exit 0 on SIGTERM"; }
grep -q 'Permission denied\|Read-only file system' "$W/serve.log" && { cat "$W/serve.log" >&2; die "a write was refused"; }
echo "  ok: SIGTERM drains and exits 0; no write was refused"

# A restart keeps the live table (its own now), not the seed.
(cd /var/lib/coexist && exec setpriv --reuid=10001 --regid=10001 --clear-groups "$C" serve) \
  >"$W/serve2.log" 2>&1 &
serve=$!
for _ in $(seq 1 100); do as_app "$C" health >/dev/null 2>&1 && break; sleep 0.1; done
as_app "$C" cutover paris --to old >/dev/null || die "cutover after restart"
kill -TERM "$serve"; wait "$serve" || die "second serve"
(cd /var/lib/coexist && exec setpriv --reuid=10001 --regid=10001 --clear-groups "$C" serve) \
  >"$W/serve3.log" 2>&1 &
serve=$!
for _ in $(seq 1 100); do as_app "$C" health >/dev/null 2>&1 && break; sleep 0.1; done
as_app "$C" status | grep -q 'paris .*owner old' || die "a restart went back to the seed"
kill -TERM "$serve"; wait "$serve" || true
echo "  ok: a restart serves the live table, not the seed"

# The demo as the image runs it: `docker run -p 2525:2525 -p 8025:8025 coexist demo --listen 0.0.0.0`.
pkill -f smtp-sink || true
sleep 0.2
(cd /var/lib/coexist && exec setpriv --reuid=10001 --regid=10001 --clear-groups "$C" demo --listen 0.0.0.0) \
  >"$W/demo.log" 2>&1 &
demo=$!
for _ in $(seq 1 100); do grep -q 'Ctrl-C stops the demo' "$W/demo.log" && break; sleep 0.1; done
grep -q 'Ctrl-C stops the demo' "$W/demo.log" || { cat "$W/demo.log" >&2; die "demo did not start"; }
ss -ltn | grep -q '0.0.0.0:2525 ' || die "demo SMTP not on all addresses"
ss -ltn | grep -q '0.0.0.0:8025 ' || die "demo status page not on all addresses"
code=$(python3 -c 'import urllib.request;print(urllib.request.urlopen("http://127.0.0.1:8025/").status)')
[ "$code" = 200 ] || die "status page: $code"
code=$(python3 -c '
import urllib.request, urllib.error
try:
    urllib.request.urlopen(urllib.request.Request("http://127.0.0.1:8025/routes/rollback", data=b"{}", method="POST"))
    print(200)
except urllib.error.HTTPError as e:
    print(e.code)')
[ "$code" = 401 ] || die "a change without the token answered $code"
grep -q 'sent "Hello both' "$W/demo.log" || die "the tour did not run"
cfg=$(grep -o -- '-c [^ ]*coexist.toml' "$W/demo.log" | head -1 | cut -c4-)
as_app "$C" cutover berlin --to new -c "$cfg" | grep -q applied || die "the demo's printed command did not run"
kill -TERM "$demo"; wait "$demo" || true
echo "  ok: demo --listen 0.0.0.0 as uid 10001: page open, changes need the token, printed commands run"
INNER
echo "container runtime: all checks passed"
