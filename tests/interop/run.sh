#!/usr/bin/env bash
# Interop tests: coexist between independently written SMTP software.
#
#   client : swaks (Debian package)
#   OLD    : Postfix smtp-sink, dumping every transaction to a file (-d)
#   NEW    : a real Postfix instance (master + smtpd + qmgr + virtual) running
#            from its own config/queue directory in the temp dir and delivering
#            to per-recipient Maildirs; INTEROP_NEW_BACKEND=sink uses a second
#            smtp-sink instead.
#
# Everything listens on 127.0.0.1 high ports, lives in a `mktemp -d` directory
# and is stopped by PID on exit. No system service is started or touched (the
# private Postfix has its own queue, data and pid directories).
#
# Needs: smtp-sink, postfix (for the default NEW backend), swaks with TLS
# (libnet-ssleay-perl), openssl: `bash tests/interop/install-deps.sh` as root.
# A missing tool is a failure, never a skip.
#
# Knobs (env):
#   COEXIST_BIN=target/debug/coexist   binary under test (relative to the repo root)
#   INTEROP_BASE_PORT=27100            ports BASE..BASE+12 must be free
#   INTEROP_NEW_BACKEND=postfix|sink
#   KEEP_TMP=1                         keep the temp dir (configs, logs, mail)
#
# Output: one `PASS name` / `FAIL name: reason` line per scenario, then
# `N passed, M failed` alone on a line; exit 1 if anything failed.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"

COEXIST_BIN=${COEXIST_BIN:-target/debug/coexist}
BASE=${INTEROP_BASE_PORT:-27100}
NEW_BACKEND=${INTEROP_NEW_BACKEND:-postfix}
KEEP_TMP=${KEEP_TMP:-0}

PORT_OLD=$BASE
PORT_NEW=$((BASE + 1))
PORT_NEW_PROXY=$((BASE + 2))   # the same Postfix, an smtpd that takes PROXY v2 headers
PORT_CLIENT=$((BASE + 3))      # swaks' own port where a scenario needs to recognise it
PORT_RELAY=$((BASE + 10))
PORT_SUBMISSION=$((BASE + 11))
PORT_ADMIN=$((BASE + 12))

PASSED=0
FAILED=0

# ------------------------------------------------------------------ reporting
pass() { echo "PASS $1"; PASSED=$((PASSED + 1)); }
fail() { echo "FAIL $1: $2"; FAILED=$((FAILED + 1)); }
summary() { echo "$PASSED passed, $FAILED failed"; }

# A setup problem is a failure with a loud message and the summary line, so CI
# never mistakes a broken harness for a green run.
die() {
  echo "FAIL setup: $*"
  FAILED=$((FAILED + 1))
  summary
  exit 1
}

# ------------------------------------------------------------------ prerequisites
# /usr/sbin is not on every PATH (non-login shells, non-root users).
PATH=$PATH:/usr/sbin:/usr/lib/postfix/sbin
missing=""
for tool in smtp-sink swaks openssl; do
  command -v "$tool" >/dev/null 2>&1 || missing="$missing $tool"
done
if [ "$NEW_BACKEND" = postfix ]; then
  for tool in postfix postconf; do
    command -v "$tool" >/dev/null 2>&1 || missing="$missing $tool"
  done
fi
if [ -n "$missing" ]; then
  echo "!!!!! interop: missing tools:$missing" >&2
  echo "!!!!! run (as root): bash tests/interop/install-deps.sh" >&2
  die "missing tools:$missing"
fi
if ! swaks --support 2>&1 | grep -q '=== TLS supported'; then
  echo "!!!!! interop: swaks has no TLS support; install libnet-ssleay-perl (tests/interop/install-deps.sh)" >&2
  die "swaks without TLS support"
fi
case $NEW_BACKEND in
  postfix)
    # The private Postfix needs root: master binds, chowns its queue and
    # switches to the postfix user / the virtual delivery uid.
    [ "$(id -u)" = 0 ] || die "INTEROP_NEW_BACKEND=postfix needs root (or use INTEROP_NEW_BACKEND=sink)"
    ;;
  sink) ;;
  *) die "INTEROP_NEW_BACKEND must be postfix or sink, not '$NEW_BACKEND'" ;;
esac
if [ ! -x "$COEXIST_BIN" ]; then
  echo "!!!!! interop: coexist binary not found at $COEXIST_BIN (cargo build first, or set COEXIST_BIN)" >&2
  die "no coexist binary at $COEXIST_BIN"
fi
COEXIST_BIN=$(cd "$(dirname "$COEXIST_BIN")" && pwd)/$(basename "$COEXIST_BIN")

# ------------------------------------------------------------------ port helpers
port_listening() {
  if command -v ss >/dev/null 2>&1; then
    ss -Hltn "sport = :$1" 2>/dev/null | grep -q .
  else
    # no iproute2: a TCP connect is enough (the daemons ignore an empty session)
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
  fi
}
# wait_port PORT PID SECONDS: until something listens on PORT; fail if PID died
wait_port() {
  local port=$1 pid=$2 secs=$3 i
  for ((i = 0; i < secs * 10; i++)); do
    port_listening "$port" && return 0
    kill -0 "$pid" 2>/dev/null || return 1
    sleep 0.1
  done
  return 1
}
for p in $PORT_OLD $PORT_NEW $PORT_NEW_PROXY $PORT_CLIENT $PORT_RELAY $PORT_SUBMISSION $PORT_ADMIN; do
  if port_listening "$p"; then die "port $p is already in use (set INTEROP_BASE_PORT)"; fi
done

# ------------------------------------------------------------------ temp dir + cleanup
T=$(mktemp -d /tmp/coexist-interop.XXXXXX)
# Postfix daemons (user postfix) and the sinks/virtual delivery (user nobody)
# must be able to traverse it; mktemp makes it 0700.
chmod 755 "$T"

PIDS=()        # everything we started, stopped in reverse order
PF_MASTER=""   # Postfix master pid (it daemonizes, so it is read from its pid file)

descendants() {
  local c
  for c in $(ps -o pid= --ppid "$1" 2>/dev/null); do
    descendants "$c"
    echo "$c"
  done
}
# stop_pid PID: TERM it (and, afterwards, any children it left), KILL after 10 s
stop_pid() {
  local pid=$1 kids p i
  kill -0 "$pid" 2>/dev/null || return 0
  kids=$(descendants "$pid")
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < 100; i++)); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  kill -KILL "$pid" 2>/dev/null || true
  for p in $kids; do kill -TERM "$p" 2>/dev/null || true; done
  wait "$pid" 2>/dev/null || true
}
cleanup() {
  local rc=$? i
  trap - EXIT INT TERM
  for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do stop_pid "${PIDS[$i]}"; done
  # Postfix master on SIGTERM stops its own children (smtpd, qmgr, ...).
  if [ -n "$PF_MASTER" ]; then stop_pid "$PF_MASTER"; fi
  if [ "$FAILED" -gt 0 ] || [ "$rc" -ne 0 ]; then
    echo "---- coexist log (tail)" >&2
    tail -n 40 "$T/coexist.log" 2>/dev/null >&2 || true
    if [ -f "$T/pf/maillog" ]; then
      echo "---- postfix (NEW) maillog (tail)" >&2
      tail -n 30 "$T/pf/maillog" >&2 || true
    fi
  fi
  if [ "$KEEP_TMP" = 1 ]; then echo "kept $T" >&2; else rm -rf "$T"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# start_bg NAME CMD...: background daemon, output in $T/NAME.log
start_bg() {
  local name=$1
  shift
  "$@" >"$T/$name.log" 2>&1 &
  PIDS+=("$!")
  LAST_PID=$!
}

# ------------------------------------------------------------------ TLS material
# Self-signed, for the proxy's STARTTLS; swaks does not verify certificates.
openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "/CN=mx.test" \
  -addext "subjectAltName=DNS:mx.test,IP:127.0.0.1" \
  -keyout "$T/key.pem" -out "$T/cert.pem" >"$T/openssl.log" 2>&1 ||
  { cat "$T/openssl.log" >&2; die "openssl could not make a certificate"; }

# ------------------------------------------------------------------ backends
# smtp-sink must drop root (-u) when started as root; its dump directory must
# then be writable by that user.
SINK_USER=()
if [ "$(id -u)" = 0 ]; then SINK_USER=(-u nobody); fi

# start_sink NAME PORT: smtp-sink writing each completed transaction to
# $T/dump-NAME/m.<random>. Dump format (see smtp-sink(1) DUMP FILE FORMAT):
#   X-Client-Addr / X-Client-Proto / X-Helo-Args / X-Mail-Args: <sender>
#   X-Rcpt-Args: <rcpt>            one line per RCPT, in order
#   Received: (3 lines)            then the message as received (CRLF -> LF,
#                                  dot-stuffing undone), then an empty line.
# An aborted transaction (connection lost during DATA) leaves no file.
start_sink() {
  local name=$1 port=$2
  mkdir -p "$T/dump-$name"
  if [ "$(id -u)" = 0 ]; then chown nobody: "$T/dump-$name"; fi
  start_bg "sink-$name" smtp-sink "${SINK_USER[@]}" -h "$name-sink.test" \
    -d "$T/dump-$name/m." "127.0.0.1:$port" 64
  wait_port "$port" "$LAST_PID" 30 || { cat "$T/sink-$name.log" >&2; die "smtp-sink $name did not listen on $port"; }
}

# start_postfix PORT: a private Postfix instance.
# - config_directory/queue_directory/data_directory all under $T/pf, so it shares
#   nothing with a system Postfix (none is configured by install-deps.sh);
# - master.cf has one inet service, smtpd on 127.0.0.1:PORT, and no chroot;
# - example.com is a virtual mailbox domain: alice/bob/unknown get their own
#   Maildir, any other @example.com lands in catchall/ (so a misrouted
#   recipient shows up instead of being refused), delivered as uid nobody;
#   other domains are refused (mynetworks does not contain 127.0.0.1) and
#   nothing can leave the box (default/relay transport = error);
# - logging to $T/pf/maillog (maillog_file + postlogd; no syslog needed);
# - smtpd_forbid_bare_newline = no: keep this Postfix vulnerable to bare-LF
#   SMTP smuggling (the 3.7 default), so the smuggling scenarios detect a proxy
#   that lets one through.
# Deliveries are asynchronous (queue -> qmgr -> virtual): checks poll for the
# Maildir file and wait for the queue to drain before asserting absence.
start_postfix() {
  local port=$1 PF=$T/pf i
  mkdir -p "$PF/etc" "$PF/spool" "$PF/data" "$PF/mail"
  chown postfix "$PF/data"
  chown nobody: "$PF/mail"
  cat >"$PF/etc/main.cf" <<EOF
compatibility_level = 3.6
config_directory = $PF/etc
queue_directory = $PF/spool
data_directory = $PF/data
maillog_file = $PF/maillog
maillog_file_prefixes = $PF
myhostname = new-pf.test
mydomain = test
myorigin = new-pf.test
mydestination =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 192.0.2.1/32
alias_maps =
alias_database =
relayhost =
default_transport = error:interop test: no outbound mail
relay_transport = error:interop test: no outbound mail
virtual_mailbox_domains = example.com
virtual_mailbox_base = $PF/mail
virtual_mailbox_maps = texthash:$PF/etc/vmailbox
virtual_uid_maps = static:$(id -u nobody)
virtual_gid_maps = static:$(id -g nobody)
virtual_minimum_uid = 100
smtpd_banner = \$myhostname ESMTP interop-postfix
smtpd_forbid_bare_newline = no
biff = no
EOF
  # virtual(8) refuses regexp substitutions for mailbox paths, hence a fixed list.
  cat >"$PF/etc/vmailbox" <<EOF
alice@example.com alice/
bob@example.com bob/
unknown@example.com unknown/
@example.com catchall/
EOF
  cat >"$PF/etc/master.cf" <<EOF
# service type  private unpriv  chroot  wakeup  maxproc command
127.0.0.1:$port inet n - n - - smtpd
127.0.0.1:$PORT_NEW_PROXY inet n - n - - smtpd -o smtpd_upstream_proxy_protocol=haproxy -o smtpd_client_port_logging=yes
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
virtual   unix  -       n       n       -       -       virtual
lmtp      unix  -       -       n       -       -       lmtp
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
EOF
  postfix -c "$PF/etc" check </dev/null >"$T/postfix-start.log" 2>&1 ||
    { cat "$T/postfix-start.log" "$PF/maillog" 2>/dev/null >&2; die "postfix check failed for the private instance"; }
  postfix -c "$PF/etc" start </dev/null >>"$T/postfix-start.log" 2>&1 ||
    { cat "$T/postfix-start.log" "$PF/maillog" 2>/dev/null >&2; die "postfix start failed for the private instance"; }
  for ((i = 0; i < 100; i++)); do
    [ -s "$PF/spool/pid/master.pid" ] && break
    sleep 0.1
  done
  PF_MASTER=$(tr -d ' \n' <"$PF/spool/pid/master.pid" 2>/dev/null || true)
  [ -n "$PF_MASTER" ] || { cat "$T/postfix-start.log" "$PF/maillog" 2>/dev/null >&2; die "postfix master wrote no pid file"; }
  wait_port "$port" "$PF_MASTER" 30 || { cat "$PF/maillog" >&2; die "postfix did not listen on $port"; }
  wait_port "$PORT_NEW_PROXY" "$PF_MASTER" 30 || { cat "$PF/maillog" >&2; die "postfix did not listen on $PORT_NEW_PROXY"; }
}

start_sink old "$PORT_OLD"
if [ "$NEW_BACKEND" = postfix ]; then start_postfix "$PORT_NEW"; else start_sink new "$PORT_NEW"; fi

# ------------------------------------------------------------------ delivery inspection
kind_of() { if [ "$1" = new ] && [ "$NEW_BACKEND" = postfix ]; then echo postfix; else echo sink; fi; }

# all_files BACKEND: every delivered message file (one per recipient for
# Postfix Maildirs, one per transaction for smtp-sink)
all_files() {
  if [ "$(kind_of "$1")" = postfix ]; then
    find "$T/pf/mail" -path '*/new/*' -type f 2>/dev/null | sort
  else
    find "$T/dump-$1" -type f -name 'm.*' 2>/dev/null | sort
  fi
}
count_all() { all_files "$1" | grep -c . || true; }
# files_with BACKEND NONCE
files_with() {
  local f
  all_files "$1" | while read -r f; do grep -qF -- "$2" "$f" && echo "$f"; done
  return 0
}
count_with() { files_with "$1" "$2" | grep -c . || true; }

headers_of() { sed -e 's/\r$//' -e '/^$/q' "$1"; }
# rcpts_of BACKEND FILE: the envelope recipients the backend saw for this file,
# lowercase, sorted, comma-separated
rcpts_of() {
  if [ "$(kind_of "$1")" = postfix ]; then
    headers_of "$2" | grep -i -m1 '^X-Original-To:' | sed 's/^[^:]*:[[:space:]]*//' | tr '[:upper:]' '[:lower:]'
  else
    grep '^X-Rcpt-Args:' "$2" | sed -e 's/^X-Rcpt-Args:[[:space:]]*//' -e 's/^<//' -e 's/>.*//' |
      tr '[:upper:]' '[:lower:]' | sort | paste -sd, -
  fi
}
# deliveries BACKEND NONCE: one line per message file holding NONCE, its recipients
deliveries() {
  local f
  files_with "$1" "$2" | while read -r f; do rcpts_of "$1" "$f"; done | sort
}
# strip_trailing_blank: drop empty lines at the end of the input
strip_trailing_blank() { awk '{ l[NR] = $0 } length($0) { last = NR } END { for (i = 1; i <= last; i++) print l[i] }'; }
# body_of FILE: the message body (after the first empty line), LF line ends,
# trailing empty lines dropped (swaks and the sink's dump format add some).
# Both Postfix and smtp-sink undo the wire's dot-stuffing.
body_of() { sed -e 's/\r$//' "$1" | sed -e '1,/^$/d' | strip_trailing_blank; }
message_id_of() { headers_of "$1" | grep -i -m1 '^Message-Id:' | sed 's/^[^:]*:[[:space:]]*//'; }

# wait_count BACKEND NONCE N SECS: until N files hold NONCE
wait_count() {
  local i
  for ((i = 0; i < $4 * 10; i++)); do
    [ "$(count_with "$1" "$2")" -ge "$3" ] && return 0
    sleep 0.1
  done
  return 1
}
# settle: let stragglers arrive before asserting absence. The sink writes its
# file before answering 250; Postfix delivers from its queue, so wait (<=15 s)
# for the queue to drain.
settle() {
  local i
  sleep "${1:-0.5}"
  if [ "$NEW_BACKEND" = postfix ]; then
    for ((i = 0; i < 150; i++)); do
      find "$T/pf/spool/incoming" "$T/pf/spool/active" "$T/pf/spool/maildrop" \
        -type f 2>/dev/null | grep -q . || break
      sleep 0.1
    done
  fi
}
describe() {  # describe NONCE: what each backend got, for failure messages
  echo "new got [$(deliveries new "$1" | paste -sd';' -)], old got [$(deliveries old "$1" | paste -sd';' -)]"
}

# ------------------------------------------------------------------ client
SWAKS_COMMON=(--helo client.interop.test --from sender@client.interop.test --timeout 20)
# swaks_run NAME PORT ARGS...: transcript in $T/swaks-NAME.out, exit code in SW_RC
swaks_run() {
  local name=$1 port=$2
  shift 2
  SW_OUT=$T/swaks-$name.out
  set +e
  swaks --server "127.0.0.1:$port" "${SWAKS_COMMON[@]}" "$@" >"$SW_OUT" 2>&1
  SW_RC=$?
  set -e
}
show_transcript() { sed 's/^/    | /' "$SW_OUT" | tail -n "${1:-20}"; }

# A body with leading dots: dot-stuffing must be transparent through the proxy.
make_body() {
  printf '%s\n' "interop body $1" ".leading dot" "..two leading dots" "" "last line $1"
}

# ------------------------------------------------------------------ harness self-check
# Talk to the backends directly once, so a broken harness (no delivery, wrong
# parsing) fails here and not as a misleading proxy failure.
selfcheck() {
  local b port nonce got
  for b in old new; do
    port=$PORT_OLD
    [ "$b" = new ] && port=$PORT_NEW
    nonce=selfcheck-$b-$RANDOM$RANDOM
    swaks_run "selfcheck-$b" "$port" --to bob@example.com --header "Subject: $nonce" --body "$(make_body "$nonce")"
    [ "$SW_RC" = 0 ] || { show_transcript >&2; die "backend $b refused a direct message (swaks rc $SW_RC)"; }
    wait_count "$b" "$nonce" 1 15 || die "backend $b did not deliver a direct message within 15 s"
    got=$(deliveries "$b" "$nonce")
    [ "$got" = bob@example.com ] || die "backend $b: recipients parsed as '$got', expected bob@example.com"
    f=$(files_with "$b" "$nonce" | head -1)
    [ "$(body_of "$f")" = "$(make_body "$nonce" | strip_trailing_blank)" ] ||
      die "backend $b: stored body differs from what swaks sent ($f)"
  done
}
selfcheck

# ------------------------------------------------------------------ coexist
cat >"$T/coexist.toml" <<EOF
[routes]
path = "routes.toml"

[admin]
listen = "127.0.0.1:$PORT_ADMIN"

[smtp]
hostname = "mx.test"
mixed_recipients = "fanout"

[[smtp.listener]]
listen = "127.0.0.1:$PORT_RELAY"
mode = "relay"

[[smtp.listener]]
listen = "127.0.0.1:$PORT_SUBMISSION"
mode = "submission"

[smtp.tls]
cert = "cert.pem"
key = "key.pem"

[targets.old]
smtp = ["127.0.0.1:$PORT_OLD"]

[targets.new]
smtp = ["127.0.0.1:$PORT_NEW"]

$(if [ "$NEW_BACKEND" = postfix ]; then
  printf '[targets.newpx]\nsmtp = ["127.0.0.1:%s"]\nproxy_protocol = true\n' "$PORT_NEW_PROXY"
else
  printf '[targets.newpx]\nsmtp = ["127.0.0.1:%s"]\n' "$PORT_NEW"
fi)
EOF
cat >"$T/routes.toml" <<'EOF'
[domains."example.com"]
unknown = "old"

[sites.paris]
owner = "new"

[sites.berlin]
owner = "old"

[[mailbox]]
address = "alice@example.com"
site = "paris"

[[mailbox]]
address = "bob@example.com"
site = "berlin"

[[mailbox]]
address = "carol@example.com"
site = "paris"

[sites.lyon]
owner = "newpx"

[[mailbox]]
address = "dave@example.com"
site = "lyon"
EOF

start_bg coexist "$COEXIST_BIN" serve -c "$T/coexist.toml"
COEXIST_PID=$LAST_PID
# Only the SMTP listeners are waited for: these tests do not use the admin API.
for p in $PORT_RELAY $PORT_SUBMISSION; do
  wait_port "$p" "$COEXIST_PID" 30 || {
    if kill -0 "$COEXIST_PID" 2>/dev/null; then die "coexist did not listen on $p within 30 s"; else die "coexist exited before listening on $p"; fi
  }
done

# ------------------------------------------------------------------ scenarios
# Each scenario returns 0 or sets WHY and returns 1. Run inside `if`, so set -e
# is off there: every step is checked explicitly.

# deliver_one NAME RCPT EXPECT_NEW EXPECT_OLD [swaks args]: one message through
# the relay listener; EXPECT_* are the recipients each side must have got
# (empty = nothing)
deliver_one() {
  local name=$1 rcpt=$2 exp_new=$3 exp_old=$4 nonce want got_new got_old
  shift 4
  nonce=$name-$RANDOM$RANDOM
  swaks_run "$name" "$PORT_RELAY" --to "$rcpt" --header "Subject: $nonce" --body "$(make_body "$nonce")" "$@"
  if [ "$SW_RC" != 0 ]; then WHY="swaks exit $SW_RC: $(grep -m1 -E '^(<\*\*|\*\*\*)' "$SW_OUT" || echo 'no error line')"; return 1; fi
  want=0
  [ -n "$exp_new" ] && want=1
  wait_count new "$nonce" "$want" 15 || { WHY="nothing arrived at NEW within 15 s; $(describe "$nonce")"; return 1; }
  want=0
  [ -n "$exp_old" ] && want=1
  wait_count old "$nonce" "$want" 15 || { WHY="nothing arrived at OLD within 15 s; $(describe "$nonce")"; return 1; }
  settle
  got_new=$(deliveries new "$nonce")
  got_old=$(deliveries old "$nonce")
  if [ "$got_new" != "$exp_new" ] || [ "$got_old" != "$exp_old" ]; then
    WHY="expected new [$exp_new] old [$exp_old]; $(describe "$nonce")"
    return 1
  fi
  local f b
  for b in new old; do
    for f in $(files_with "$b" "$nonce"); do
      [ "$(body_of "$f")" = "$(make_body "$nonce" | strip_trailing_blank)" ] ||
        { WHY="body at $b differs from what was sent ($f)"; return 1; }
    done
  done
  LAST_NONCE=$nonce
  return 0
}

sc_alice_to_new() { deliver_one alice-to-new alice@example.com alice@example.com ""; }
sc_bob_to_old() { deliver_one bob-to-old bob@example.com "" bob@example.com; }
sc_unknown_to_old() { deliver_one unknown-to-old unknown@example.com "" unknown@example.com; }

# One message for both sides: each gets it exactly once, with only its own
# recipient, and both copies carry the same body and Message-Id.
sc_mixed_fanout() {
  local fn fo
  deliver_one mixed-fanout alice@example.com,bob@example.com alice@example.com bob@example.com || return 1
  fn=$(files_with new "$LAST_NONCE")
  fo=$(files_with old "$LAST_NONCE")
  [ "$(body_of "$fn")" = "$(body_of "$fo")" ] || { WHY="bodies differ between NEW and OLD"; return 1; }
  if [ -z "$(message_id_of "$fn")" ] || [ "$(message_id_of "$fn")" != "$(message_id_of "$fo")" ]; then
    WHY="Message-Id differs: new '$(message_id_of "$fn")' old '$(message_id_of "$fo")'"
    return 1
  fi
}

# Never an open relay: 550 5.7.1 for a foreign domain, nothing delivered.
sc_relay_denied() {
  local nonce=relay-denied-$RANDOM$RANDOM n0 o0
  n0=$(count_all new)
  o0=$(count_all old)
  swaks_run relay-denied "$PORT_RELAY" --to x@gmail.com --header "Subject: $nonce" --body "$(make_body "$nonce")"
  # swaks exit 24 = no RCPT accepted
  [ "$SW_RC" = 24 ] || { WHY="swaks exit $SW_RC, expected 24 (no RCPT accepted)"; return 1; }
  grep -qE '^<\*\* +550[ -]5\.7\.1' "$SW_OUT" || { WHY="no '550 5.7.1' reply: $(grep -m1 '^<\*\*' "$SW_OUT" || echo none)"; return 1; }
  settle
  if [ "$(count_all new)" != "$n0" ] || [ "$(count_all old)" != "$o0" ]; then
    WHY="a backend received something; $(describe "$nonce")"
    return 1
  fi
}

# STARTTLS on the relay listener (advertised, negotiated), then delivery.
sc_starttls_relay() {
  deliver_one starttls-relay alice@example.com alice@example.com "" -tls || return 1
  grep -qE '^<-  250[ -]STARTTLS' "$SW_OUT" || { WHY="STARTTLS not advertised"; return 1; }
  grep -q '^=== TLS started' "$SW_OUT" || { WHY="swaks did not report a TLS session"; return 1; }
}

# Submission: STARTTLS advertised, AUTH refused before TLS (spec: no AUTH before
# TLS), nothing delivered. Beyond the minimal brief, but cheap.
sc_submission_no_auth_before_tls() {
  local nonce=sub-notls-$RANDOM$RANDOM n0 o0
  n0=$(count_all new)
  o0=$(count_all old)
  swaks_run submission-no-auth-before-tls "$PORT_SUBMISSION" --to alice@example.com \
    --auth PLAIN --auth-user alice@example.com --auth-password not-a-secret \
    --header "Subject: $nonce" --body "$(make_body "$nonce")"
  grep -q '^<-  220' "$SW_OUT" || { WHY="no 220 banner (swaks exit $SW_RC)"; return 1; }
  grep -qE '^<-  250[ -]STARTTLS' "$SW_OUT" || { WHY="STARTTLS not advertised"; return 1; }
  # 28 = AUTH failed or not offered
  [ "$SW_RC" = 28 ] || { WHY="swaks exit $SW_RC, expected 28 (AUTH refused/not offered before TLS)"; return 1; }
  settle
  if [ "$(count_all new)" != "$n0" ] || [ "$(count_all old)" != "$o0" ]; then
    WHY="a backend received something; $(describe "$nonce")"
    return 1
  fi
}

# SMTP smuggling: DATA with a bare LF / bare CR end-of-data lookalike followed
# by a second transaction. swaks --no-data-fixup (-ndf) with --data @file sends
# the file's bytes unchanged and appends CRLF (checked against a raw socket
# server by hand), so the file ends with "\r\n." to close the DATA.
# The outer message is for alice (NEW, the real Postfix, which itself accepts
# bare LF as a line end) and the smuggled one for bob (OLD), so a proxy that
# passes the bytes through makes the smuggled message appear.
# Expected: a 5xx reply to the DATA content and no new file on either backend.
smuggle() {
  local name=$1 sep_before=$2 sep_after=$3 nonce n0 o0
  nonce=$name-$RANDOM$RANDOM
  n0=$(count_all new)
  o0=$(count_all old)
  printf "Subject: %s\r\nFrom: <sender@client.interop.test>\r\nTo: <alice@example.com>\r\n\r\nouter %s${sep_before}.${sep_after}MAIL FROM:<evil@client.interop.test>${sep_after}RCPT TO:<bob@example.com>${sep_after}DATA${sep_after}Subject: smuggled %s${sep_after}${sep_after}smuggled %s${sep_after}.${sep_after}\r\n." \
    "$nonce" "$nonce" "$nonce" "$nonce" >"$T/$name.data"
  swaks_run "$name" "$PORT_RELAY" --to alice@example.com -ndf --data "@$T/$name.data"
  settle 1
  if [ "$(count_all new)" != "$n0" ] || [ "$(count_all old)" != "$o0" ]; then
    WHY="a backend received mail: new $n0 -> $(count_all new), old $o0 -> $(count_all old); $(describe "$nonce")"
    return 1
  fi
  # swaks exit 26 = not accepted after DATA; the reply must be a 5xx
  [ "$SW_RC" = 26 ] || { WHY="swaks exit $SW_RC, expected 26 (message refused after DATA): $(grep -m1 -E '^<\*\*' "$SW_OUT" || tail -n1 "$SW_OUT")"; return 1; }
  grep -qE '^<\*\* +5[0-9][0-9]' "$SW_OUT" || { WHY="refusal was not 5xx: $(grep -m1 '^<\*\*' "$SW_OUT")"; return 1; }
}
# A client that pipelines (swaks --pipeline: MAIL, RCPT, DATA in one write): coexist
# sends DATA to Postfix in the same write as MAIL and RCPT ("early DATA").
sc_pipelined_to_new() {
  deliver_one pipelined-to-new alice@example.com alice@example.com "" --pipeline || return 1
  grep -qE '^<-  250[ -]PIPELINING' "$SW_OUT" || { WHY="PIPELINING not advertised"; return 1; }
}

# Python's smtplib (waits for every reply) sends three messages over one connection:
# after a one-recipient message coexist guesses that the next one has one recipient too
# and sends Postfix its DATA early; the third message has a second NEW recipient, which
# then goes to Postfix in a second transaction. Each recipient must get each message once.
# metric 'NAME{LABELS}': its value on coexist's /metrics, 0 when absent
metric() {
  python3 - "$PORT_ADMIN" "$1" <<'PY'
import sys, urllib.request
text = urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/metrics", timeout=10).read().decode()
print(next((int(float(l.rsplit(" ", 1)[1])) for l in text.splitlines() if l.startswith(sys.argv[2] + " ")), 0))
PY
}

sc_one_session_three_messages() {
  local base=three-$RANDOM$RANDOM i used0 split0 used1 split1
  used0=$(metric 'coexist_smtp_early_data_total{outcome="used"}')
  split0=$(metric 'coexist_smtp_early_data_total{outcome="split"}')
  if ! python3 - "$PORT_RELAY" "$base" >"$T/three.out" 2>&1 <<'PY'
import smtplib, sys
port, base = int(sys.argv[1]), sys.argv[2]
with smtplib.SMTP("127.0.0.1", port, timeout=20) as s:
    s.ehlo("client.interop.test")
    for i, rcpts in enumerate([["alice@example.com"], ["alice@example.com"],
                               ["alice@example.com", "carol@example.com"]], 1):
        msg = (f"From: sender@client.interop.test\r\nTo: {', '.join(rcpts)}\r\n"
               f"Subject: {base}-{i}\r\nMessage-Id: <{base}-{i}@client.interop.test>\r\n\r\n"
               f"body {base}-{i}\r\n.leading dot\r\n")
        refused = s.sendmail("sender@client.interop.test", rcpts, msg)
        if refused:
            sys.exit(f"message {i}: refused {refused}")
PY
  then
    WHY="smtplib: $(tail -n1 "$T/three.out")"
    return 1
  fi
  wait_count new "$base-3" 2 15 || { WHY="message 3 did not reach both NEW recipients; $(describe "$base-3")"; return 1; }
  settle
  for i in 1 2; do
    [ "$(deliveries new "$base-$i" | paste -sd';' -)" = alice@example.com ] ||
      { WHY="message $i: $(describe "$base-$i"), expected alice once"; return 1; }
  done
  [ "$(deliveries new "$base-3" | paste -sd';' -)" = "alice@example.com;carol@example.com" ] ||
    { WHY="message 3: $(describe "$base-3"), expected alice and carol once each"; return 1; }
  [ "$(count_with old "$base")" = 0 ] || { WHY="OLD got some: $(describe "$base")"; return 1; }
  local f1 f2
  f1=$(files_with new "$base-3" | head -1)
  f2=$(files_with new "$base-3" | tail -1)
  [ "$(body_of "$f1")" = "$(body_of "$f2")" ] || { WHY="the two copies of message 3 differ"; return 1; }
  body_of "$f1" | grep -q '^\.leading dot$' || { WHY="dot-stuffing not undone: $(body_of "$f1" | tail -n1)"; return 1; }
  # The path under test was taken: message 2 used an early DATA, message 3 was split.
  used1=$(metric 'coexist_smtp_early_data_total{outcome="used"}')
  split1=$(metric 'coexist_smtp_early_data_total{outcome="split"}')
  [ "$used1" -gt "$used0" ] && [ "$split1" -gt "$split0" ] ||
    { WHY="early DATA counters: used $used0 -> $used1, split $split0 -> $split1"; return 1; }
}

# PROXY protocol v2 towards Postfix (smtpd_upstream_proxy_protocol = haproxy, which drops
# a connection without a valid header): delivered, and Postfix logs swaks' own port as the
# client's (from the header), not coexist's.
sc_proxy_protocol_to_postfix() {
  deliver_one proxy-protocol-to-postfix dave@example.com dave@example.com "" --local-port "$PORT_CLIENT" || return 1
  grep -qE "connect from [^ ]*\[127\.0\.0\.1\]:$PORT_CLIENT\b" "$T/pf/maillog" ||
    { WHY="Postfix did not log the client port $PORT_CLIENT: $(grep -m2 'connect from' "$T/pf/maillog" | tail -n1)"; return 1; }
}

sc_smuggle_lf() { smuggle smuggle-lf-dot-lf '\n' '\n'; }
sc_smuggle_crlf_lf() { smuggle smuggle-crlf-dot-lf '\r\n' '\n'; }
sc_smuggle_lf_crlf() { smuggle smuggle-lf-dot-crlf '\n' '\r\n'; }
sc_smuggle_cr() { smuggle smuggle-cr-dot-cr '\r' '\r'; }

run() {  # run NAME FUNCTION
  WHY=""
  if "$2"; then
    pass "$1"
  else
    fail "$1" "$WHY"
    [ -f "${SW_OUT:-}" ] && show_transcript 15
  fi
  return 0
}

run alice-to-new sc_alice_to_new
run bob-to-old sc_bob_to_old
run unknown-to-old sc_unknown_to_old
run mixed-fanout sc_mixed_fanout
run relay-denied sc_relay_denied
run starttls-relay sc_starttls_relay
run submission-no-auth-before-tls sc_submission_no_auth_before_tls
run pipelined-to-new sc_pipelined_to_new
run one-session-three-messages sc_one_session_three_messages
if [ "$NEW_BACKEND" = postfix ]; then
  run proxy-protocol-to-postfix sc_proxy_protocol_to_postfix
else
  echo "SKIP proxy-protocol-to-postfix: needs the Postfix NEW backend (INTEROP_NEW_BACKEND=postfix, the default)"
fi
run smuggle-lf-dot-lf sc_smuggle_lf
run smuggle-crlf-dot-lf sc_smuggle_crlf_lf
run smuggle-lf-dot-crlf sc_smuggle_lf_crlf
run smuggle-cr-dot-cr sc_smuggle_cr

summary
[ "$FAILED" -eq 0 ]
