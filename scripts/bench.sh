#!/usr/bin/env bash
# The benchmark suite (issue: "Benchmarks and performance"). Builds release
# binaries, installs wrk and nginx from Debian's packages if they are
# missing, runs passage-bench, and writes BENCHMARKS.md from its results.
#
# Usage: scripts/bench.sh [--only overhead,streaming,bulk,many,longhaul,transport,cost,websocket] [--quick]
# PASSAGE_COST_BASE=DIR (a release binary directory of another commit)
# makes the cost scenario measure that build beside this one.
# The transport scenario's emulated link needs root (network namespaces
# and TUN devices) and the ip program; without them its link rows are skipped.
# Every figure is measured next to a baseline in the same invocation;
# BENCHMARKS.md records the machine, the command and the method.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

missing=()
command -v wrk >/dev/null 2>&1 || missing+=(wrk)
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing+=(nginx-light)
command -v stunnel4 >/dev/null 2>&1 || missing+=(stunnel4)
command -v ip >/dev/null 2>&1 || [ -x /usr/sbin/ip ] || [ -x /sbin/ip ] || missing+=(iproute2)
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
if [ "${#missing[@]}" -gt 0 ]; then
  echo "installing ${missing[*]} from Debian's packages" >&2
  apt-get update -qq && apt-get install -y -qq "${missing[@]}" >/dev/null
fi
# 5,000 held streams need about 10,000 descriptors in the benchmark and the client.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

cargo build --release --workspace --bins
out=BENCHMARKS.md
for arg in "$@"; do [ "$arg" = --quick ] && out=target/BENCHMARKS.quick.md; done
target/release/passage-bench --bin-dir target/release --out "$out" --command "scripts/bench.sh${*:+ $*}" "$@"
