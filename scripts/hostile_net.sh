#!/usr/bin/env bash
# The test bed for bad networks (issue 14, item 8). Builds release binaries
# (cargo reuses them when up to date), installs nftables and iproute2 from
# Debian's packages if missing, and runs passage-hostile-net: relay and
# client in two network namespaces joined by a veth pair, each scenario
# imposed with nftables, then the table scenario | target | measured | pass.
#
# Usage: scripts/hostile_net.sh [--only GROUP,...] [--time-limit SECONDS]
# Needs root; without it, prints a skip line and exits 0. Exits 1 when a
# row fails. Runs for one to three minutes; logs in target/hostile-net/.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

if [ "$(id -u)" -ne 0 ]; then
  echo "hostile-net: SKIP: needs root (network namespaces and nftables)"
  exit 0
fi

missing=()
command -v ip >/dev/null 2>&1 || [ -x /usr/sbin/ip ] || [ -x /sbin/ip ] || missing+=(iproute2)
command -v nft >/dev/null 2>&1 || [ -x /usr/sbin/nft ] || missing+=(nftables)
if [ "${#missing[@]}" -gt 0 ]; then
  echo "installing ${missing[*]} from Debian's packages" >&2
  # Where they cannot be installed, passage-hostile-net says so and skips.
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null; } ||
    echo "could not install ${missing[*]}" >&2
fi

cargo build --release --workspace --bins
bin="${CARGO_TARGET_DIR:-target}/release"
logs="${CARGO_TARGET_DIR:-target}/hostile-net"
rm -rf "$logs"
"$bin/passage-hostile-net" "$bin" --log-dir "$logs" "$@"
