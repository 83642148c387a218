#!/usr/bin/env bash
# Highest call rate one sipp pair sustains with 0 failed calls, through the sidecar and
# directly, measured side by side in one run. A benchmark, not a test: it prints numbers
# and asserts nothing.
#
#   scripts/bench-cps.sh [repetitions] [seconds-per-step]     (0 repetitions: efficiency only)
#
# Afterwards it places 1000 calls/s for 10 s through the sidecar and reports the sidecar's
# CPU time per call and its peak RSS.
#
# Each step places rate x seconds calls (INVITE/100/180/200/ACK/BYE/200, no hold time)
# from a sipp UAC to a sipp UAS over UDP on loopback. A step passes when sipp reports 0
# failed calls and the calls took at most 10% longer than rate asked for. Rates climb
# from 100 by doubling, then bisect between the last pass and the first failure. The
# median over the repetitions is reported for each path.
set -euo pipefail
cd "$(dirname "$0")/.."
repetitions=${1:-3}
seconds=${2:-5}
scenarios=tests/scenarios
binary=target/release/byoc-sidecar
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT

command -v sipp >/dev/null || { echo "sipp is missing: apt-get install sip-tester" >&2; exit 1; }
cargo build --release --quiet

# shellcheck source=scripts/lib.sh
. scripts/lib.sh

# One step: prints "pass" or "fail". $1 = rate, $2 = "sidecar" or "direct".
step() {
  local rate=$1 path=$2 calls=$(( $1 * seconds ))
  local uas_port uac_port target
  uas_port=$(free_port); uac_port=$(free_port)
  if [ "$path" = sidecar ]; then
    local edge_port core_port
    edge_port=$(free_port); core_port=$(free_port)
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
core = "udp:127.0.0.1:$uas_port"
TOML
    "$binary" run --config "$work/sidecar.toml" 2>"$work/sidecar.log" &
    local sidecar=$!
    echo "$sidecar" > "$work/sidecar.pid"
    target=127.0.0.1:$edge_port
  else
    target=127.0.0.1:$uas_port
  fi
  (cd "$work" && exec sipp -sf "$OLDPWD/$scenarios/uas.xml" -i 127.0.0.1 -p "$uas_port" -m "$calls" \
      -nostdin -timeout $(( seconds * 4 + 20 ))s -timeout_error >/dev/null 2>&1) &
  local uas=$!
  sleep 0.5
  local start end status=0
  start=$(date +%s.%N)
  (cd "$work" && exec sipp -sf "$OLDPWD/$scenarios/uac.xml" -i 127.0.0.1 -p "$uac_port" "$target" \
      -m "$calls" -r "$rate" -d 0 -l 100000 -nostdin -timeout $(( seconds * 4 + 20 ))s -timeout_error \
      >/dev/null 2>&1) || status=$?
  end=$(date +%s.%N)
  kill "$uas" 2>/dev/null || true; wait "$uas" 2>/dev/null || true
  if [ "$path" = sidecar ]; then
    # CPU ticks (user + system) and peak RSS, read before the process goes away.
    awk '{ print $14 + $15 }' "/proc/$sidecar/stat" > "$work/sidecar.ticks"
    awk '/VmHWM/ { print $2 }' "/proc/$sidecar/status" > "$work/sidecar.hwm"
    kill "$sidecar"; wait "$sidecar" 2>/dev/null || true
  fi
  local slow
  slow=$(python3 -c "print(1 if ($end - $start) > $calls / $rate * 1.1 + 1 else 0)")
  if [ "$status" -eq 0 ] && [ "$slow" -eq 0 ]; then echo pass; else echo fail; fi
}

# The highest passing rate for one path.
search() {
  local path=$1 low=0 high=0 rate=100
  while [ "$(step "$rate" "$path")" = pass ]; do
    low=$rate; rate=$(( rate * 2 ))
    [ "$rate" -gt 20000 ] && { echo "$low"; return; }
  done
  high=$rate
  while [ $(( high - low )) -gt $(( low / 10 + 25 )) ]; do
    rate=$(( (low + high) / 2 ))
    if [ "$(step "$rate" "$path")" = pass ]; then low=$rate; else high=$rate; fi
  done
  echo "$low"
}

median() { sort -n | awk '{ values[NR] = $1 } END { print values[int((NR + 1) / 2)] }'; }

: > "$work/sidecar.results"; : > "$work/direct.results"
[ "$repetitions" -gt 0 ] && for run in $(seq "$repetitions"); do
  s=$(search sidecar); d=$(search direct)
  echo "run $run: through the sidecar $s calls/s, direct $d calls/s"
  echo "$s" >> "$work/sidecar.results"; echo "$d" >> "$work/direct.results"
done
s=$(median < "$work/sidecar.results"); d=$(median < "$work/direct.results")
[ "$repetitions" -gt 0 ] && python3 -c "print(f'median of $repetitions: through the sidecar $s calls/s, direct $d calls/s, ratio {$s / $d:.2f}')"

seconds=10
result=$(step 1000 sidecar)
ticks=$(cat "$work/sidecar.ticks"); hwm=$(cat "$work/sidecar.hwm"); hz=$(getconf CLK_TCK)
python3 -c "print(f'1000 calls/s for 10 s through the sidecar: {\"$result\"}, sidecar CPU {$ticks / $hz:.2f} s = {$ticks / $hz / 10000 * 1e6:.0f} us per call, peak RSS {$hwm / 1024:.1f} MiB')"
