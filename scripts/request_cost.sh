#!/usr/bin/env bash
# Per-request cost accounting (issue 15, item 1): where each µs of CPU,
# each syscall, wake-up, task poll and packet of a request goes, in
# passage-client and passage-relay, at 1 and 32 connections, over QUIC and
# over TCP. Builds release binaries, installs wrk, nftables and perf from
# Debian's packages if missing, then runs scripts/request_cost.py, which
# prints one markdown table per transport and load (method in its header).
#
# Usage: scripts/request_cost.sh [--seconds N] [--transports quic,tcp]
#                                [--connections 1,32] [--base-bin-dir DIR]
#                                [--out FILE] [--json FILE]
# --base-bin-dir measures a second build (say, the commit before a change,
# built with `git worktree add`) in the same invocation, alternating with
# this one, and prints both side by side. Needs root (perf on other
# processes, uprobes, nftables); without it, prints a skip line, exits 0.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

if [ "$(id -u)" -ne 0 ]; then
  echo "request_cost: SKIP: needs root (perf on other processes, uprobes, nftables)"
  exit 0
fi
missing=()
command -v wrk >/dev/null 2>&1 || missing+=(wrk)
command -v nft >/dev/null 2>&1 || [ -x /usr/sbin/nft ] || missing+=(nftables)
command -v perf >/dev/null 2>&1 || missing+=(linux-perf)
command -v readelf >/dev/null 2>&1 || missing+=(binutils)
if [ "${#missing[@]}" -gt 0 ]; then
  echo "installing ${missing[*]} from Debian's packages" >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
cargo build --release --workspace --bins
exec python3 scripts/request_cost.py --bin-dir target/release "$@"
