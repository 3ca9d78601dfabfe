#!/usr/bin/env bash
# Checks the systemd files in packaging/systemd/ the way systemd reads them:
#
#  1. systemd-analyze verify on each unit, alone and with the drop-ins
#     (the user unit with --user, under the name it is installed as);
#  2. the flags on each ExecStart= line against the built binaries'
#     argument parsers (`passage-relay serve ... --help` exits 2 on an
#     unknown flag), when target/release has them;
#  3. the sysusers.d file with systemd-sysusers --dry-run;
#  4. systemd-analyze security --offline=yes: prints each unit's overall
#     exposure and fails when it rises above the level recorded below.
#
# verify checks that ExecStart's program exists, so the units are copied to
# a temporary directory with /usr/local/bin/ and %h/.cargo/bin/ pointed at
# target/release (or at stub programs when no release build exists yet);
# nothing else in them changes. verify's exit code ignores most mistakes
# (an unknown key or a misspelt value is a warning), so any message about
# our files fails the check; messages about other units verify loads
# (sysinit.target and the like, from the host) are printed, not fatal.
#
# Usage: packaging/check.sh   (no root needed; needs systemd-analyze, i.e.
# Debian's `systemd` package). Exits 1 on any finding.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
units=packaging/systemd

# The exposure levels measured when the units were written (systemd 252).
# A change that loosens the sandbox fails here; raise a level only with the
# reason recorded in packaging/README.md.
declare -A max_exposure=(
  [passage-relay.service]=1.1
  [passage-client.service]=1.1
  [passage-client.user.service]=1.9
)

if ! command -v systemd-analyze >/dev/null 2>&1; then
  echo "check: systemd-analyze is missing (Debian: apt-get install systemd)" >&2
  exit 1
fi
systemd-analyze --version | head -n 1

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
failed=0
fail() {
  echo "FAIL: $*" >&2
  failed=1
}

bin="${CARGO_TARGET_DIR:-$root/target}/release"
case "$bin" in /*) ;; *) bin="$root/$bin" ;; esac
if [ -x "$bin/passage-relay" ] && [ -x "$bin/passage-client" ]; then
  echo "binaries: $bin (ExecStart flags are checked against them)"
  have_binaries=1
else
  echo "binaries: none in $bin yet; stubs stand in (ExecStart flags not checked)"
  bin="$work/stub-bin"
  mkdir -p "$bin"
  for program in passage-relay passage-client; do
    printf '#!/bin/sh\nexit 0\n' >"$bin/$program"
    chmod 0755 "$bin/$program"
  done
  have_binaries=0
fi

# Copies a unit or drop-in with the binaries' directory pointed at $bin.
place() {
  mkdir -p "$(dirname "$2")"
  sed -e "s#/usr/local/bin/passage-#$bin/passage-#g" \
    -e "s#%h/\\.cargo/bin/passage-#$bin/passage-#g" "$1" >"$2"
}

# Runs systemd-analyze with the arguments given; fails on a non-zero exit
# or on any line that names one of our units or files.
analyze() {
  local label=$1
  shift
  local out rc=0
  out=$(systemd-analyze "$@" 2>&1) || rc=$?
  local ours
  ours=$(printf '%s\n' "$out" | grep -E "passage-|$work" || true)
  if [ "$rc" -ne 0 ] || [ -n "$ours" ]; then
    fail "$label (exit $rc):"
    printf '%s\n' "$out" | sed 's/^/    /' >&2
  else
    echo "ok   $label"
    if [ -n "$out" ]; then
      printf '%s\n' "$out" | sed 's/^/     (not ours) /'
    fi
  fi
}

# 1. verify
mkdir -p "$work/system" "$work/dropins" "$work/user" "$work/xdg"
chmod 0700 "$work/xdg"
for unit in passage-relay.service passage-client.service; do
  place "$units/$unit" "$work/system/$unit"
done
place "$units/passage-relay.service" "$work/dropins/passage-relay.service"
for dropin in "$units"/*.conf; do
  place "$dropin" "$work/dropins/passage-relay.service.d/$(basename "$dropin")"
done
place "$units/passage-client.user.service" "$work/user/passage-client.service"

for unit in passage-relay.service passage-client.service; do
  analyze "verify $unit" verify "$work/system/$unit"
done
analyze "verify passage-relay.service with $(cd "$units" && echo *.conf)" \
  verify "$work/dropins/passage-relay.service"
XDG_RUNTIME_DIR="$work/xdg" analyze "verify --user passage-client.user.service" \
  --user verify "$work/user/passage-client.service"

# 2. the flags of each ExecStart= command (specifiers and variables get
# sample values; `--help` makes the parser stop once the flags are read).
check_flags() {
  local file=$1 line command
  while IFS= read -r line; do
    command=${line#ExecStart=}
    [ -n "$command" ] || continue
    case "$command" in
    *"exec $bin/passage-"*)
      command=${command#*exec }
      command=${command%\'}
      ;;
    "$bin/passage-"*) ;;
    *) continue ;;
    esac
    # shellcheck disable=SC2016 # the literal text "${CREDENTIALS_DIRECTORY}"
    command=${command//'${CREDENTIALS_DIRECTORY}'/\/run\/credentials\/unit}
    command=${command//%S/\/var\/lib}
    command=${command//%h/\/home\/user}
    local -a argv
    read -r -a argv <<<"$command"
    local out rc=0
    out=$("${argv[@]}" --help 2>&1 >/dev/null) || rc=$?
    if [ "$rc" -ne 0 ]; then
      fail "$file: ExecStart flags refused by ${argv[0]##*/}:"
      printf '%s\n' "$out" | sed 's/^/    /' >&2
    else
      echo "ok   flags: ${argv[0]##*/} ${argv[1]} (${file#"$work"/})"
    fi
  done < <(grep -h '^ExecStart=' "$file")
}
if [ "$have_binaries" -eq 1 ]; then
  for file in "$work/system"/*.service "$work/dropins/passage-relay.service.d"/*.conf \
    "$work/user/passage-client.service"; do
    check_flags "$file"
  done
fi

# 3. sysusers.d
sysroot="$work/sysroot"
mkdir -p "$sysroot/etc/sysusers.d"
cp "$units/passage-relay.sysusers" "$sysroot/etc/sysusers.d/passage-relay.conf"
out=$(systemd-sysusers --dry-run --root="$sysroot" 2>&1) && rc=0 || rc=$?
if [ "$rc" -ne 0 ] || printf '%s\n' "$out" | grep -q 'passage-relay.conf:'; then
  fail "systemd-sysusers --dry-run passage-relay.sysusers (exit $rc):"
  printf '%s\n' "$out" | sed 's/^/    /' >&2
elif ! printf '%s\n' "$out" | grep -q "Creating user 'passage-relay'"; then
  fail "passage-relay.sysusers creates no user passage-relay:"
  printf '%s\n' "$out" | sed 's/^/    /' >&2
else
  echo "ok   sysusers: passage-relay.sysusers"
fi

# 4. exposure
exposure() {
  local name=$1 file=$2
  shift 2
  local out rc=0 level
  out=$(systemd-analyze "$@" security --offline=yes "$file" 2>&1) || rc=$?
  level=$(printf '%s\n' "$out" | sed -n 's/.*Overall exposure level for [^:]*: \([0-9.]*\).*/\1/p')
  if [ "$rc" -ne 0 ] || [ -z "$level" ]; then
    fail "security $name (exit $rc):"
    printf '%s\n' "$out" | sed 's/^/    /' >&2
  elif awk -v l="$level" -v m="${max_exposure[$name]}" 'BEGIN { exit !(l > m) }'; then
    fail "security $name: exposure $level, above the recorded ${max_exposure[$name]}"
    printf '%s\n' "$out" | grep -v '^✓' | sed 's/^/    /' >&2
  else
    echo "ok   security $name: exposure $level (recorded ${max_exposure[$name]})"
  fi
}
exposure passage-relay.service "$work/system/passage-relay.service"
exposure passage-client.service "$work/system/passage-client.service"
XDG_RUNTIME_DIR="$work/xdg" exposure passage-client.user.service \
  "$work/user/passage-client.service" --user

if [ "$failed" -ne 0 ]; then
  echo "packaging check: FAILED" >&2
  exit 1
fi
echo "packaging check: ok"
