#!/usr/bin/env bash
# End-to-end check with a real third-party client: the official `openai`
# Python SDK (installed from PyPI into a venv) does a streaming chat
# completion, a chat completion, a file upload, meets an upstream 429 and
# holds a Realtime session over WebSocket; the official Node SDK's Realtime
# WebSocket client holds one too (npm registry, the machine's Node.js);
# all through the real passage-client and passage-relay binaries, against
# the mock upstream on 127.0.0.1. The relay holds the API key; the check
# also greps both programs' logs to make sure the key never appears there.
# It runs twice: over QUIC, and with a relay reachable only over TCP (the
# client's `auto` transport must fall back by itself).
#
# Usage: scripts/sdk_check.sh        (run from anywhere; builds debug binaries)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

# The same build as `cargo test --workspace` (same features, so nothing is
# compiled twice when both run); it builds every binary of the workspace.
cargo test --workspace --no-run --quiet
bin="$root/target/debug"

venv="${PASSAGE_SDK_VENV:-$root/target/sdk-venv}"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
# The realtime extra brings `websockets`, which the SDK's Realtime client needs.
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check "openai[realtime]>=1.40,<3"
"$venv/bin/python" -c 'import openai; print("openai SDK", openai.__version__)'

# The official Node SDK's Realtime WebSocket client, from the npm registry,
# with the machine's Node.js (Debian's when it has none).
if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
  echo "installing nodejs and npm from Debian's packages" >&2
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm >/dev/null; } ||
    echo "could not install nodejs and npm" >&2
fi
node_dir="$root/target/sdk-node"
node_check=""
if command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1; then
  mkdir -p "$node_dir"
  [ -f "$node_dir/package.json" ] || echo '{"private": true, "type": "module"}' >"$node_dir/package.json"
  npm_install() { npm install --prefix "$node_dir" --no-audit --no-fund --silent "openai@6" "ws@8"; }
  npm_install || { sleep 2; npm_install; }
  # ESM resolves packages from the script's own directory.
  cp scripts/sdk_check_node.mjs "$node_dir/"
  node_check="$node_dir/sdk_check_node.mjs"
  echo "openai Node SDK $(node -p "require('$node_dir/node_modules/openai/package.json').version") on Node.js $(node --version)"
else
  echo "sdk-check: SKIP the Node SDK check: no Node.js and npm here" >&2
fi

work=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

free_port() { # $1: tcp, udp or both (a port free for TCP and UDP alike)
  python3 - "$1" <<'PY'
import socket, sys
kinds = {"tcp": [socket.SOCK_STREAM], "udp": [socket.SOCK_DGRAM]}.get(sys.argv[1], [socket.SOCK_STREAM, socket.SOCK_DGRAM])
for _ in range(100):
    first = socket.socket(socket.AF_INET, kinds[0]); first.bind(("127.0.0.1", 0))
    port, held = first.getsockname()[1], [first]
    try:
        for kind in kinds[1:]:
            other = socket.socket(socket.AF_INET, kind); other.bind(("127.0.0.1", port)); held.append(other)
    except OSError:
        continue
    print(port)
    break
PY
}
relay_key="sk-relay-held-$(python3 -c 'import secrets; print(secrets.token_hex(8))')"

"$bin/passage-mock-upstream" --listen 127.0.0.1:0 >"$work/mock.url" 2>"$work/mock.log" &
pids+=($!)
for _ in $(seq 100); do [ -s "$work/mock.url" ] && break; sleep 0.05; done
upstream=$(cat "$work/mock.url")
"$bin/passage-relay" init --dir "$work/pki" >/dev/null

passed=0
failed=0
# One round: a relay and a client, the SDK's checks through them, the logs
# searched for the key. $1 names the round: "quic" (the relay serves both
# transports, the client takes QUIC) or "tcp-only" (the relay's QUIC port
# is not the one in the bundle, so only TCP reaches it, as where UDP is
# blocked; the client's default `auto` must fall back by itself).
run_round() {
  local round=$1 dir="$work/$1"
  mkdir -p "$dir"
  local relay_port client_port quic_listen expected
  # The relay listens on this port for QUIC and TCP alike.
  relay_port=$(free_port both)
  client_port=$(free_port tcp)
  if [ "$round" = "tcp-only" ]; then
    quic_listen="127.0.0.1:$(free_port udp)"
    expected=tcp
  else
    quic_listen="127.0.0.1:$relay_port"
    expected=quic
  fi
  "$bin/passage-relay" issue --dir "$work/pki" --name "sdk-$round" --relay "127.0.0.1:$relay_port" --out "$dir/client.toml" >/dev/null
  PASSAGE_TEST_KEY="$relay_key" RUST_LOG=debug "$bin/passage-relay" serve --pki "$work/pki" \
    --listen "$quic_listen" --listen-tcp "127.0.0.1:$relay_port" \
    --upstream "$upstream" --api-key-env PASSAGE_TEST_KEY 2>"$dir/relay.log" &
  local relay_pid=$!
  pids+=("$relay_pid")
  RUST_LOG=debug "$bin/passage-client" run --bundle "$dir/client.toml" --state-file none \
    --listen "127.0.0.1:$client_port" 2>"$dir/client.log" &
  local client_pid=$!
  pids+=("$client_pid")

  local transport=""
  for _ in $(seq 200); do
    transport=$(python3 -c 'import json,sys,urllib.request; print(json.load(urllib.request.urlopen(sys.argv[1], timeout=1))["transport"])' \
      "http://127.0.0.1:$client_port/healthz" 2>/dev/null) && break
    sleep 0.05
  done
  local status=0
  if [ "$transport" != "$expected" ]; then
    echo "FAIL ($round): the tunnel is not up over $expected (got '${transport}')" >&2
    status=1
  else
    echo "== $round: tunnel up over $transport"
    "$venv/bin/python" scripts/sdk_check.py "http://127.0.0.1:$client_port/v1" || status=$?
    if [ -n "$node_check" ]; then
      node "$node_check" "http://127.0.0.1:$client_port/v1" || status=1
    fi
  fi
  if grep -q -- "$relay_key" "$dir/relay.log" "$dir/client.log"; then
    echo "FAIL ($round): the relay's API key appears in a log" >&2
    status=1
  fi
  kill "$client_pid" "$relay_pid" 2>/dev/null || true
  wait "$client_pid" "$relay_pid" 2>/dev/null || true
  if [ "$status" -ne 0 ]; then
    echo "--- relay log ($round)" >&2; tail -n 40 "$dir/relay.log" >&2
    echo "--- client log ($round)" >&2; tail -n 40 "$dir/client.log" >&2
    failed=$((failed + 1))
  else
    echo "the relay's key appears in no log line ($round)"
    passed=$((passed + 1))
  fi
}

run_round quic
run_round tcp-only
echo "sdk-check: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
