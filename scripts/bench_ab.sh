#!/usr/bin/env bash
# A/B of the request-overhead scenario between a git revision and the
# working tree, for "did this change cost anything": builds REV in a git
# worktree (target/ab/REV) and the current tree, then runs
# `passage-bench --only overhead` alternately, REV first, ROUNDS times each
# (default 2), and prints per run: the median latency passage adds over
# direct at 1 connection, the CPU the two passage processes spend per
# request, and 32-connection throughput as a ratio of nginx's. Each run
# has its own direct/nginx baselines, so runs compare by those figures.
#
# Usage: scripts/bench_ab.sh REV [ROUNDS]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
rev=${1:?usage: scripts/bench_ab.sh REV [ROUNDS]}
rounds=${2:-2}
command -v wrk >/dev/null 2>&1 && { command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ]; } &&
  command -v stunnel4 >/dev/null 2>&1 || {
  apt-get update -qq && apt-get install -y -qq wrk nginx-light stunnel4 >/dev/null
}
base=target/ab/$(git rev-parse --short "$rev")
if [ ! -d "$base" ]; then
  git worktree add --detach "$base" "$rev" >/dev/null
fi
(cd "$base" && cargo build --release --workspace --bins)
cargo build --release --workspace --bins
out=target/ab/runs
mkdir -p "$out"
printf '%-6s %-5s %22s %22s %18s %18s\n' side round "added p50 @1 (µs)" "CPU/request (µs)" "@32 vs nginx" "@1 vs stunnel"
for round in $(seq 1 "$rounds"); do
  for side in base new; do
    bins=target/release
    [ "$side" = base ] && bins=$base/target/release
    report=$out/$side-$round.md
    target/release/passage-bench --bin-dir "$bins" --only overhead --out "$report" >/dev/null
    direct=$(awk -F'|' '$2 ~ /^ direct / {print $3+0}' "$report")
    passage=$(awk -F'|' '$2 ~ /^ passage / {print $3+0; exit}' "$report")
    cpu=$(awk -F'|' '$2 ~ /^ passage / {print $5+0; exit}' "$report")
    ratio=$(awk -F'|' '$2 ~ /req\/s @32 conns vs nginx/ {gsub(/[ ×]/, "", $3); print $3}' "$report")
    stunnel=$(awk -F'|' '$2 ~ /req\/s @1 conn vs stunnel pair/ {gsub(/[ ×]/, "", $3); print $3}' "$report")
    printf '%-6s %-5s %22s %22s %18s %18s\n' "$side" "$round" "$((passage - direct))" "$cpu" "$ratio" "$stunnel"
  done
done
echo "reports: $out (base = $rev, new = working tree)"
