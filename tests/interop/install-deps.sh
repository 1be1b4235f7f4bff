#!/usr/bin/env bash
# Install the independently-written SMTP software the interop tests talk to:
#   postfix  -> smtp-sink (backend) and a real smtpd instance run from a private
#               config/queue directory by tests/interop/run.sh
#   swaks    -> SMTP client (scenarios); libnet-ssleay-perl is only a
#               Recommends of swaks but is what gives it STARTTLS (-tls)
#   openssl  -> self-signed certificate for the proxy's STARTTLS
#   python3  -> raw-socket client for the bare-LF smuggling scenario
#   chromium -> headless browser for the admin status page check (status-page.sh)
#
# Idempotent: when everything is already installed it does no apt work at all.
# The system Postfix is never configured ("No configuration") and never left
# running: run.sh starts its own instances on high ports in a temp dir.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

if [ "$(id -u)" -ne 0 ]; then
  echo "install-deps.sh: must run as root (apt-get install)" >&2
  exit 1
fi

PKGS="postfix swaks libnet-ssleay-perl openssl python3 procps iproute2 chromium"
missing=""
for p in $PKGS; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done

if [ -z "$missing" ]; then
  echo "install-deps.sh: already installed:$(for p in $PKGS; do printf ' %s' "$p"; done)"
else
  # Keep maintainer scripts from starting services (postfix's postinst would
  # otherwise try to start the system MTA). Docker-style images ship a
  # policy-rc.d that exits 101; a plain VM does not, so install a temporary one
  # for the duration of the install only.
  TMP_POLICY=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    TMP_POLICY=1
  fi
  cleanup() { if [ "$TMP_POLICY" = 1 ]; then rm -f /usr/sbin/policy-rc.d; fi; }
  trap cleanup EXIT

  # Was a postfix master already running before us? Then it is not ours to stop.
  postfix_was_running=0
  if [ -r /var/spool/postfix/pid/master.pid ] &&
     kill -0 "$(tr -d ' ' < /var/spool/postfix/pid/master.pid)" 2>/dev/null; then
    postfix_was_running=1
  fi

  # Postfix asks debconf questions in its postinst; "No configuration" means no
  # main.cf is written and the daemon is not started.
  echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
  echo "postfix postfix/mailname string localhost" | debconf-set-selections

  echo "install-deps.sh: installing:$missing"
  apt-get update -q
  # shellcheck disable=SC2086
  apt-get install -y -q --no-install-recommends \
    -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold $missing

  # If the install started the system postfix anyway (policy ignored), stop it
  # so nothing of ours or the system's sits on port 25.
  if [ "$postfix_was_running" = 0 ] && [ -r /var/spool/postfix/pid/master.pid ]; then
    pid=$(tr -d ' ' < /var/spool/postfix/pid/master.pid)
    if kill -0 "$pid" 2>/dev/null; then
      echo "install-deps.sh: stopping system postfix master (pid $pid) started by the install"
      postfix stop 2>/dev/null || kill "$pid" 2>/dev/null || true
    fi
  fi
fi

# Sanity check: the binaries run.sh needs.
for b in /usr/sbin/smtp-sink /usr/sbin/postfix /usr/lib/postfix/sbin/master swaks openssl python3 chromium; do
  command -v "$b" >/dev/null 2>&1 || [ -x "$b" ] || { echo "install-deps.sh: MISSING $b after install" >&2; exit 1; }
done
swaks --support 2>&1 | grep -q '=== TLS supported' || { echo "install-deps.sh: swaks has no TLS support (Net::SSLeay)" >&2; exit 1; }
echo "install-deps.sh: ok (postfix $(dpkg-query -W -f='${Version}' postfix), swaks $(dpkg-query -W -f='${Version}' swaks))"
