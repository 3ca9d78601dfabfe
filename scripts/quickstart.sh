#!/usr/bin/env bash
# One-command local demo: builds passage, makes a throwaway PKI, starts
# passage-relay and passage-client on this machine in front of UPSTREAM, and
# prints the base_url to give your OpenAI SDK. Ctrl-C stops both.
#
# Usage: scripts/quickstart.sh [UPSTREAM_URL]
#   UPSTREAM_URL  default https://api.openai.com; use `mock` for the built-in
#                 mock upstream (no network or key needed)
# Environment:
#   OPENAI_API_KEY        if set, the relay injects it (apps need no key)
#   PASSAGE_RELAY_PORT    UDP port of the relay   (default 4433)
#   PASSAGE_CLIENT_PORT   TCP port of the client  (default 8710)
#   PASSAGE_PROFILE       release (default) or debug
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
upstream="${1:-https://api.openai.com}"
relay_port="${PASSAGE_RELAY_PORT:-4433}"
client_port="${PASSAGE_CLIENT_PORT:-8710}"
profile="${PASSAGE_PROFILE:-release}"

if [ "$profile" = release ]; then cargo build --release --workspace --bins; else cargo build --workspace --bins; fi
bin="$root/target/$profile"

work=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT INT TERM

if [ "$upstream" = mock ]; then
  "$bin/passage-mock-upstream" >"$work/mock.url" &
  pids+=($!)
  for _ in $(seq 100); do [ -s "$work/mock.url" ] && break; sleep 0.05; done
  upstream=$(cat "$work/mock.url")
fi

"$bin/passage-relay" init --dir "$work/pki"
"$bin/passage-relay" issue --dir "$work/pki" --name quickstart --relay "127.0.0.1:$relay_port" --out "$work/quickstart.toml"

key_args=()
if [ -n "${OPENAI_API_KEY:-}" ]; then key_args=(--api-key-env OPENAI_API_KEY); fi
"$bin/passage-relay" serve --pki "$work/pki" --listen "127.0.0.1:$relay_port" --upstream "$upstream" "${key_args[@]}" &
pids+=($!)
"$bin/passage-client" run --bundle "$work/quickstart.toml" --listen "127.0.0.1:$client_port" &
pids+=($!)

for _ in $(seq 100); do
  if python3 -c 'import sys,urllib.request; urllib.request.urlopen(sys.argv[1], timeout=1)' \
      "http://127.0.0.1:$client_port/healthz" 2>/dev/null; then break; fi
  sleep 0.1
done
cat <<MSG

passage is up: relay 127.0.0.1:$relay_port (UDP) -> $upstream
  base_url = http://127.0.0.1:$client_port/v1
  health   = curl http://127.0.0.1:$client_port/healthz
Press Ctrl-C to stop.
MSG
wait
