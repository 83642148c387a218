#!/usr/bin/env bash
# What Digest toward the core costs, measured side by side in one run. A benchmark, not a
# test: it prints numbers and asserts nothing.
#
#   scripts/bench-digest.sh [repetitions] [rate] [seconds]     (defaults 3, 300, 10)
#
# sipp (Edge) -> sidecar -> Kamailio -> sipp (far end), UDP on loopback, rate x seconds
# calls (INVITE/100/180/200/ACK/BYE/200, no hold time), in three set-ups taken in turn
# in every repetition:
#
#   none     the trunk has auth = "none" and Kamailio demands nothing;
#   md5      auth = "digest", Kamailio demands Digest MD5 (407 on INVITE, qop=auth,
#            nonce counting, 30 s nonces; tests/kamailio/digest-core.cfg);
#   sha256   the same with SHA-256.
#
# For each it reports failed calls and the CPU time per call of the sidecar and of
# Kamailio (all its processes), medians over the repetitions.
set -euo pipefail
cd "$(dirname "$0")/.."
repetitions=${1:-3}
rate=${2:-300}
seconds=${3:-10}
calls=$(( rate * seconds ))
binary=target/release/byoc-sidecar
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; [ -f "$work/kamailio.pid" ] && kill -- -"$(cat "$work/kamailio.pid")" 2>/dev/null; rm -rf "$work"' EXIT

command -v sipp >/dev/null || { echo "sipp is missing: apt-get install sip-tester" >&2; exit 1; }
[ -x /usr/sbin/kamailio ] || { echo "kamailio is missing: apt-get install kamailio" >&2; exit 1; }
modules=$(dirname "$(ls /usr/lib/*/kamailio/modules/tm.so | head -1)")
cargo build --release --quiet
hz=$(getconf CLK_TCK)

# shellcheck source=scripts/lib.sh
. scripts/lib.sh
# CPU ticks (user + system) of every live process in a group, summed: Kamailio's
# workers are separate processes.
group_ticks() { ps -o pid= -g "$1" | while read -r pid; do awk '{ print $14 + $15 }' "/proc/$pid/stat" 2>/dev/null || true; done | awk '{ sum += $1 } END { print sum + 0 }'; }

# One run of a set-up: prints "failed sidecar_us kamailio_us".
run() {
  local setup=$1 algorithm=MD5 auth=digest define=(-A WITH_AUTH)
  case "$setup" in
    none) auth=none; define=() ;;
    sha256) algorithm=SHA-256 ;;
  esac
  local kamailio_port uas_port uac_port edge_port core_port
  kamailio_port=$(free_port); uas_port=$(free_port); uac_port=$(free_port)
  edge_port=$(free_port); core_port=$(free_port)
  mkdir -p "$work/db"
  printf 'id(int,auto) table_name(string) table_version(int) \n0:subscriber:7\n' > "$work/db/version"
  printf 'id(int,auto) username(string) domain(string) password(string) ha1(string,null) ha1b(string,null) \n1:alice:core.test:wonderland:::\n' > "$work/db/subscriber"
  printf 'wonderland' > "$work/password"
  sed -e "s|@PORT@|$kamailio_port|; s|@MODULES@|$modules|; s|@ALGORITHM@|$algorithm|" \
      -e "s|@NONCE_EXPIRE@|30|; s|@DB@|$work/db|; s|@FAR_END_PORT@|$uas_port|" \
      tests/kamailio/digest-core.cfg > "$work/kamailio.cfg"
  setsid /usr/sbin/kamailio -f "$work/kamailio.cfg" -DD -E "${define[@]}" -Y "$work" -w "$work" \
      >/dev/null 2>"$work/kamailio.log" &
  local kamailio=$!
  echo "$kamailio" > "$work/kamailio.pid"
  cat > "$work/sidecar.toml" <<TOML
[edge]
listen = ["udp:127.0.0.1:$edge_port"]
allow = ["127.0.0.0/8"]
[core_side]
listen = ["udp:127.0.0.1:$core_port"]
allow = ["127.0.0.0/8"]
[log]
level = "warn"
[[trunk]]
name = "bench"
edge = "udp:127.0.0.1:9"
core = "udp:127.0.0.1:$kamailio_port"
auth = "$auth"
$( [ "$auth" = digest ] && printf '[trunk.credentials]\nkind = "static"\nusername = "alice"\npassword_file = "%s"\n' "$work/password" )
TOML
  "$binary" run --config "$work/sidecar.toml" 2>"$work/sidecar.log" &
  local sidecar=$!
  (cd "$work" && exec sipp -sf "$OLDPWD/tests/scenarios/uas.xml" -i 127.0.0.1 -p "$uas_port" -m $(( calls * 2 )) \
      -nostdin -timeout $(( seconds * 4 + 20 ))s -timeout_error >/dev/null 2>&1) &
  # The far end is stopped when the UAC is done; its count is only a bound (a late INVITE
  # retransmission counts as a call of its own in sipp).
  local uas=$!
  sleep 1
  local sidecar_before kamailio_before
  sidecar_before=$(awk '{ print $14 + $15 }' "/proc/$sidecar/stat")
  kamailio_before=$(group_ticks "$kamailio")
  (cd "$work" && exec sipp -sf "$OLDPWD/tests/scenarios/uac.xml" -i 127.0.0.1 -p "$uac_port" \
      "127.0.0.1:$edge_port" -m "$calls" -r "$rate" -d 0 -nostdin -trace_stat -stf uac.csv -trace_err -error_file uac_errors.log \
      -timeout $(( seconds * 4 + 20 ))s -timeout_error >/dev/null 2>"$work/uac.err") || true
  local sidecar_after kamailio_after failed
  sidecar_after=$(awk '{ print $14 + $15 }' "/proc/$sidecar/stat")
  kamailio_after=$(group_ticks "$kamailio")
  failed=$(awk -F';' 'NR == 1 { for (i = 1; i <= NF; i++) if ($i == "FailedCall(C)") column = i } END { print $column }' "$work/uac.csv")
  rm -f "$work/uac.csv"
  kill "$uas" "$sidecar" 2>/dev/null || true
  kill -- -"$kamailio" 2>/dev/null || true
  wait "$uas" "$sidecar" "$kamailio" 2>/dev/null || true
  rm -f "$work/kamailio.pid"
  grep -h -A3 "Aborting\|Dead\|timeout\|Timeout" "$work/uac_errors.log" 2>/dev/null | head -12 >&2 || true; rm -f "$work/uac_errors.log"
  python3 -c "print($failed, round(($sidecar_after - $sidecar_before) / $hz / $calls * 1e6), round(($kamailio_after - $kamailio_before) / $hz / $calls * 1e6))"
}

median() { sort -n | awk '{ values[NR] = $1 } END { print values[int((NR + 1) / 2)] }'; }

for setup in none md5 sha256; do : > "$work/$setup.sidecar"; : > "$work/$setup.kamailio"; : > "$work/$setup.failed"; done
for repetition in $(seq "$repetitions"); do
  for setup in none md5 sha256; do
    read -r failed sidecar_us kamailio_us < <(run "$setup")
    echo "run $repetition $setup: $failed failed of $calls, sidecar $sidecar_us us/call, kamailio $kamailio_us us/call"
    echo "$sidecar_us" >> "$work/$setup.sidecar"; echo "$kamailio_us" >> "$work/$setup.kamailio"
    echo "$failed" >> "$work/$setup.failed"
  done
done
for setup in none md5 sha256; do
  echo "median of $repetitions, $setup: sidecar $(median < "$work/$setup.sidecar") us/call, kamailio $(median < "$work/$setup.kamailio") us/call, failed calls in all runs $(paste -sd+ "$work/$setup.failed" | bc)"
done
