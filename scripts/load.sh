#!/usr/bin/env bash
# A load run with token rotation, measured: sipp UAC -> sidecar -> simulated core ->
# sipp UAS, UDP on loopback. The core (byoc-sidecar sim core) checks every request's
# Bearer token against its own token endpoint under the chosen validation mode and relays
# accepted calls to the UAS. Prints one summary line; exits 1 when a call failed.
#
#   scripts/load.sh [--rate 200] [--seconds 300] [--ttl 10s] [--hold-ms 1000]
#                   [--validation revoke-on-reissue|any-unexpired|propagation-lag=500ms]
#
# With propagation-lag the sidecar runs with activation_delay set to twice the lag.
# A benchmark as much as a check: its numbers go into the README; a short run of it is
# part of the test suite (tests/load_script.rs).
set -euo pipefail
cd "$(dirname "$0")/.."
rate=200 seconds=300 ttl=10s hold=1000 validation=revoke-on-reissue
while [ $# -gt 0 ]; do
  case "$1" in
    --rate) rate=$2; shift 2 ;;
    --seconds) seconds=$2; shift 2 ;;
    --ttl) ttl=$2; shift 2 ;;
    --hold-ms) hold=$2; shift 2 ;;
    --validation) validation=$2; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 64 ;;
  esac
done
calls=$(( rate * seconds ))
# BYOC_BINARY: a binary already built (the test suite passes its own); else a release build.
binary=${BYOC_BINARY:-target/release/byoc-sidecar}
work=$(mktemp -d)
cleanup() {
  for pid in $(cat "$work"/*.pid 2>/dev/null); do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
command -v sipp >/dev/null || { echo "sipp is missing: apt-get install sip-tester" >&2; exit 1; }
[ -n "${BYOC_BINARY:-}" ] || cargo build --release --quiet

# shellcheck source=scripts/lib.sh
. scripts/lib.sh
core_port=$(free_port); idp_port=$(free_port); edge_port=$(free_port); side_port=$(free_port)
uas_port=$(free_port); uac_port=$(free_port)

activation=0s
case "$validation" in
  propagation-lag=*) lag=${validation#propagation-lag=}
    activation=$(python3 -c "
import re,sys; m=re.fullmatch(r'(\d+)(ms|s)', '$lag') or sys.exit('bad lag $lag')
ms=int(m[1])*(1 if m[2]=='ms' else 1000); print(f'{2*ms}ms')") ;;
esac

secret="load-secret-$RANDOM$RANDOM"
(cd "$work" && exec sipp -sf "$OLDPWD/tests/scenarios/uas.xml" -i 127.0.0.1 -p "$uas_port" \
    -m $(( calls * 2 )) -nostdin >/dev/null 2>&1) &
echo $! > "$work/uas.pid"
"$binary" sim core --listen "127.0.0.1:$core_port" --idp-listen "127.0.0.1:$idp_port" \
    --ttl "$ttl" --validation "$validation" --far-end "127.0.0.1:$uas_port" \
    --client "load-edge:$secret:org-load" > "$work/core.out" 2>&1 &
echo $! > "$work/core.pid"
sleep 0.5
grep -q "token endpoint" "$work/core.out" || { cat "$work/core.out" >&2; exit 1; }
printf '%s' "$secret" > "$work/secret"
cat > "$work/sidecar.toml" <<TOML
[edge]
listen = ["udp:127.0.0.1:$edge_port"]
allow = ["127.0.0.0/8"]
[core_side]
listen = ["udp:127.0.0.1:$side_port"]
allow = ["127.0.0.0/8"]
[log]
level = "warn"
[[trunk]]
name = "load"
edge = "udp:127.0.0.1:9"
core = "udp:127.0.0.1:$core_port"
auth = "bearer"
[trunk.credentials]
kind = "oauth2"
token_url = "http://127.0.0.1:$idp_port/oauth/token"
client_id = "load-edge"
client_secret_file = "$work/secret"
organization = "org-load"
refresh_buffer = "1s"
force_refresh_interval = "1s"
activation_delay = "$activation"
TOML
"$binary" run --config "$work/sidecar.toml" 2> "$work/sidecar.log" &
sidecar=$!
echo $sidecar > "$work/sidecar.pid"
sleep 1

start=$(date +%s.%N)
(cd "$work" && exec sipp -sf "$OLDPWD/tests/scenarios/uac.xml" -i 127.0.0.1 -p "$uac_port" \
    "127.0.0.1:$edge_port" -m "$calls" -r "$rate" -d "$hold" -l $(( rate * (hold / 1000 + 5) + 100 )) \
    -nostdin -trace_stat -stf uac.csv -trace_rtt -rtt_freq 1 -trace_err \
    -timeout $(( seconds * 2 + 60 ))s -timeout_error >/dev/null 2>"$work/uac.err") || true
end=$(date +%s.%N)

ticks=$(awk '{ print $14 + $15 }' "/proc/$sidecar/stat")
hwm=$(awk '/VmHWM/ { print $2 }' "/proc/$sidecar/status")
kill "$sidecar"; wait "$sidecar" 2>/dev/null || true
kill "$(cat "$work/core.pid")"; sleep 0.5
column() { awk -F';' -v name="$1" 'NR == 1 { for (i = 1; i <= NF; i++) if ($i == name) c = i } END { print $c + 0 }' "$work/uac.csv"; }
ok=$(column "SuccessfulCall(C)"); failed=$(column "FailedCall(C)")
summary=$(grep "sim core:.*tokens issued" "$work/core.out" | tail -1)
tokens=$(echo "$summary" | sed -n 's/.*: \([0-9]*\) tokens issued.*/\1/p')
rejected=$(echo "$summary" | sed -n 's/.* \([0-9]*\) 403.*/\1/p')
p99=$(python3 - "$work"/*_rtt.csv <<'PY'
import sys, csv
values = []
for path in sys.argv[1:]:
    with open(path) as f:
        for row in csv.reader(f, delimiter=';'):
            try: values.append(float(row[1]))
            except (ValueError, IndexError): pass
values.sort()
print(f"{values[min(len(values)-1, int(len(values)*0.99))]:.1f} ms" if values else "-")
PY
)
hz=$(getconf CLK_TCK)
python3 - <<PY
elapsed = $end - $start
print(f"load: validation=$validation rate=$rate seconds=$seconds ttl=$ttl calls=$calls completed=$ok failed=$failed "
      f"achieved={$ok / elapsed:.0f}cps tokens=${tokens:-0} core_403=${rejected:-0} p99_setup=$p99 "
      f"sidecar_cpu={$ticks / $hz:.1f}s peak_rss={$hwm / 1024:.0f}MiB")
PY
if [ "$failed" -ne 0 ] || [ "$ok" -ne "$calls" ]; then
  echo "first failures (sipp's error log):" >&2
  grep -h -A12 "Aborting\|Dead call\|Timeout" "$work"/*_errors.log 2>/dev/null | head -40 >&2 || true
  [ -n "${BYOC_LOAD_KEEP:-}" ] && cp "$work/sidecar.log" "$BYOC_LOAD_KEEP"
  exit 1
fi
