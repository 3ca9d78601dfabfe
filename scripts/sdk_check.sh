#!/usr/bin/env bash
# End-to-end check with a real third-party client: the official `openai`
# Python SDK (installed from PyPI into a venv) does a streaming chat
# completion, a chat completion, a file upload and meets an upstream 429,
# all through the real passage-client and passage-relay binaries, against
# the mock upstream on 127.0.0.1. The relay holds the API key; the check
# also greps both programs' logs to make sure the key never appears there.
#
# Usage: scripts/sdk_check.sh        (run from anywhere; builds debug binaries)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

cargo build --workspace --bins --quiet
bin="$root/target/debug"

venv="${PASSAGE_SDK_VENV:-$root/target/sdk-venv}"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check "openai>=1.40,<3"
"$venv/bin/python" -c 'import openai; print("openai SDK", openai.__version__)'

work=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

free_port() { # $1: tcp or udp
  python3 -c 'import socket,sys; k=socket.SOCK_STREAM if sys.argv[1]=="tcp" else socket.SOCK_DGRAM; s=socket.socket(socket.AF_INET,k); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])' "$1"
}
relay_port=$(free_port udp)
client_port=$(free_port tcp)
relay_key="sk-relay-held-$(python3 -c 'import secrets; print(secrets.token_hex(8))')"

"$bin/passage-mock-upstream" --listen 127.0.0.1:0 >"$work/mock.url" 2>"$work/mock.log" &
pids+=($!)
for _ in $(seq 100); do [ -s "$work/mock.url" ] && break; sleep 0.05; done
upstream=$(cat "$work/mock.url")

"$bin/passage-relay" init --dir "$work/pki" >/dev/null
"$bin/passage-relay" issue --dir "$work/pki" --name sdk-check --relay "127.0.0.1:$relay_port" --out "$work/client.toml" >/dev/null

PASSAGE_TEST_KEY="$relay_key" RUST_LOG=debug "$bin/passage-relay" serve --pki "$work/pki" \
  --listen "127.0.0.1:$relay_port" --upstream "$upstream" --api-key-env PASSAGE_TEST_KEY 2>"$work/relay.log" &
pids+=($!)
RUST_LOG=debug "$bin/passage-client" run --bundle "$work/client.toml" --listen "127.0.0.1:$client_port" 2>"$work/client.log" &
pids+=($!)

healthy=""
for _ in $(seq 200); do
  if python3 -c 'import sys,urllib.request; urllib.request.urlopen(sys.argv[1], timeout=1)' \
      "http://127.0.0.1:$client_port/healthz" 2>/dev/null; then healthy=1; break; fi
  sleep 0.05
done
if [ -z "$healthy" ]; then
  echo "the tunnel did not come up; logs:" >&2
  cat "$work/relay.log" "$work/client.log" >&2
  exit 1
fi

status=0
"$venv/bin/python" scripts/sdk_check.py "http://127.0.0.1:$client_port/v1" || status=$?
if grep -q -- "$relay_key" "$work/relay.log" "$work/client.log"; then
  echo "FAIL: the relay's API key appears in a log" >&2
  status=1
fi
if [ "$status" -ne 0 ]; then
  echo "--- relay log" >&2; tail -n 40 "$work/relay.log" >&2
  echo "--- client log" >&2; tail -n 40 "$work/client.log" >&2
  echo "sdk-check: 0 passed, 1 failed"
  exit "$status"
fi
echo "the relay's key appears in no log line"
echo "sdk-check: 1 passed, 0 failed"
