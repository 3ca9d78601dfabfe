#!/usr/bin/env bash
# The resilience soak (issue: "Resilience"). Builds release binaries and
# runs passage-soak: 500 requests in flight for 60 s (streams the app
# abandons, generations it gives up on before their head, streaming and
# plain chat completions), the relay restarted with SIGTERM half-way, then
# checks that no request hung and that the client's and relay's open
# streams, live tasks and memory return to their idle level.
#
# Usage: scripts/soak.sh [--seconds N] [--concurrency N] [--rss-slack-mib N]
# A short version runs in `cargo test` (bench/tests/soak_smoke.rs).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
# The soak restarts the relay with the kill program (procps).
if ! [ -x /usr/bin/kill ] && ! [ -x /bin/kill ]; then
  echo "installing procps from Debian's packages" >&2
  apt-get update -qq && apt-get install -y -qq procps >/dev/null
fi
# 500 app connections plus their tunnel streams need more than 1024 descriptors.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
cargo build --release --workspace --bins
target/release/passage-soak --bin-dir target/release "$@"
