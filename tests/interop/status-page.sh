#!/usr/bin/env bash
# The admin status page in a real headless browser (Debian's chromium): it renders, shows
# the active version, per-site progress and pinned mailboxes, and refreshes itself. Runs `coexist demo` (fixed loopback ports 2525, 2601, 2602, 8025).
# Fails loudly when chromium or the binary is missing: never skips.
set -euo pipefail
BIN=${COEXIST_BIN:-target/debug/coexist}
CHROMIUM=$(command -v chromium || command -v chromium-browser || true)
pass=0; fail=0
result() { if [ "$1" = 0 ]; then echo "PASS $2"; pass=$((pass+1)); else echo "FAIL $2: $3"; fail=$((fail+1)); fi; }
if [ -z "$CHROMIUM" ] || [ ! -x "$BIN" ]; then
  echo "FAIL setup: chromium (${CHROMIUM:-missing}) or $BIN missing"
  echo "0 passed, 1 failed"
  exit 1
fi
T=$(mktemp -d /tmp/coexist-page.XXXXXX)
"$BIN" demo > "$T/demo.out" 2>&1 &
DEMO=$!
trap 'kill $DEMO 2>/dev/null; wait $DEMO 2>/dev/null; rm -rf "$T"' EXIT
for _ in $(seq 1 300); do
  grep -q "Deliveries are printed below" "$T/demo.out" 2>/dev/null && break
  kill -0 $DEMO 2>/dev/null || { cat "$T/demo.out"; echo "FAIL setup: demo exited"; echo "0 passed, 1 failed"; exit 1; }
  sleep 0.1
done
version=$(sed -n 's/.*(version \([0-9]*-[0-9a-f]*\),.*/\1/p' "$T/demo.out" | head -1)
# The flags keep Chromium off the network (this machine has none) and out of any profile.
flags=(--headless --no-sandbox --disable-gpu --disable-quic --no-first-run
       --disable-background-networking --disable-component-update --disable-sync
       --user-data-dir="$T/profile")
timeout 60 "$CHROMIUM" "${flags[@]}" --dump-dom http://127.0.0.1:8025/ > "$T/dom.html" 2>"$T/chromium.log" || true
if grep -q "id=\"version\">$version<" "$T/dom.html" && [ -n "$version" ]; then
  result 0 "status-page-shows-active-version"
else
  result 1 "status-page-shows-active-version" "version '$version' not in the rendered DOM ($(wc -c < "$T/dom.html") bytes)"
fi
if grep -q "<td>paris</td><td>new</td>" "$T/dom.html"; then
  result 0 "status-page-lists-sites-and-owners"
else
  result 1 "status-page-lists-sites-and-owners" "no paris/new row"
fi
# Refreshes itself while an operator watches a cutover, without script.
if grep -q '<meta http-equiv="refresh" content="5">' "$T/dom.html"; then
  result 0 "status-page-refreshes-itself"
else
  result 1 "status-page-refreshes-itself" "no refresh meta in the DOM"
fi
# Per-site progress, from the sample tables and the demo's tour: berlin (owner old) has
# four mailboxes, bob pinned to new; the tour sent two recipients there, both on old.
berlin=$(grep -o '<tr id="site-berlin">.*' "$T/dom.html" | sed 's|</tr>.*||')
if [[ "$berlin" == *'<td>berlin</td><td>old</td><td>4</td>'* && "$berlin" == *'old 3 (75%)'* \
      && "$berlin" == *'new 1 (25%)'* && "$berlin" == *'old 2 (100%)'* ]]; then
  result 0 "status-page-shows-site-progress"
else
  result 1 "status-page-shows-site-progress" "berlin row: ${berlin:-missing}"
fi
if grep -q '<td>bob@example.com</td><td>berlin</td><td>old</td><td>new</td>' "$T/dom.html" \
   && grep -q '<b id="pinned-total">1</b>' "$T/dom.html"; then
  result 0 "status-page-lists-pinned-mailboxes"
else
  result 1 "status-page-lists-pinned-mailboxes" "bob (berlin, pinned to new) not listed"
fi
timeout 60 "$CHROMIUM" "${flags[@]}" --window-size=1000,800 --screenshot="$T/page.png" http://127.0.0.1:8025/ >/dev/null 2>&1 || true
if [ -s "$T/page.png" ]; then
  result 0 "status-page-screenshot"
  [ -n "${KEEP_SCREENSHOT:-}" ] && cp "$T/page.png" "$KEEP_SCREENSHOT"
else
  result 1 "status-page-screenshot" "no screenshot written"
fi
echo "$pass passed, $fail failed"
[ "$fail" = 0 ]
