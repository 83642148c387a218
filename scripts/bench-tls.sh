#!/usr/bin/env bash
# What TLS toward the core costs per call, against TCP, measured side by side in one run.
# A benchmark, not a test: it prints numbers and asserts nothing.
#
#   scripts/bench-tls.sh [repetitions] [rate] [seconds]        (defaults: 3, 300, 10)
#
# The chain: sipp UAC -(UDP)-> sidecar A -(TCP or TLS)-> sidecar B -(UDP)-> sipp UAS.
# A is the sidecar under test (the TLS client toward its core, with SNI and certificate
# checks against a CA the script generates); B plays the core and terminates TLS on its
# Edge-side listener. Each run places rate x seconds calls (INVITE/100/180/200/ACK/BYE/200,
# no hold time); the runs alternate TCP and TLS. Reported: calls that failed, and the CPU
# time (user + system, from /proc) of A and of B per call; medians over the repetitions.
# Handshakes are few (connections are reused per destination), so this is the cost of
# encrypting and decrypting the messages themselves.
set -euo pipefail
cd "$(dirname "$0")/.."
repetitions=${1:-3}
rate=${2:-300}
seconds=${3:-10}
calls=$(( rate * seconds ))
scenarios=tests/scenarios
binary=target/release/byoc-sidecar
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT

for tool in sipp openssl python3; do
  command -v "$tool" >/dev/null || { echo "$tool is missing (scripts/test.sh installs sipp and openssl)" >&2; exit 1; }
done
cargo build --release --quiet

# A CA and a certificate for core.test and 127.0.0.1, as the core would have.
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
  -subj /CN=bench-ca -keyout "$work/ca.key" -out "$work/ca.pem" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
  -subj /CN=core.test -keyout "$work/core.key" -out "$work/core.csr" 2>/dev/null
printf 'subjectAltName=DNS:core.test,IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n' > "$work/ext"
openssl x509 -req -in "$work/core.csr" -CA "$work/ca.pem" -CAkey "$work/ca.key" -CAcreateserial \
  -days 2 -extfile "$work/ext" -out "$work/core.pem" 2>/dev/null

# shellcheck source=scripts/lib.sh
. scripts/lib.sh
ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }

# One run over $1 (tcp or tls): prints "failed cpu_a_us cpu_b_us".
run() {
  local transport=$1
  local a_edge a_core b_edge b_core uas uac
  a_edge=$(free_port); a_core=$(free_port); b_edge=$(free_port); b_core=$(free_port)
  uas=$(free_port); uac=$(free_port)
  local tls_table="[core_side.tls]
certificate_file = \"$work/core.pem\"
key_file = \"$work/core.key\""
  local b_tls_table="[edge.tls]
certificate_file = \"$work/core.pem\"
key_file = \"$work/core.key\""
  [ "$transport" = tcp ] && tls_table="" && b_tls_table=""
  local trunk_tls=""
  [ "$transport" = tls ] && trunk_tls="[trunk.tls]
ca_file = \"$work/ca.pem\"
server_name = \"core.test\""
  cat > "$work/a.toml" <<TOML
[edge]
listen = ["udp:127.0.0.1:$a_edge"]
allow = ["127.0.0.0/8"]
[core_side]
listen = ["$transport:127.0.0.1:$a_core"]
allow = ["127.0.0.0/8"]
$tls_table
[log]
level = "warn"
[[trunk]]
name = "bench"
edge = "udp:127.0.0.1:$uac"
core = "$transport:127.0.0.1:$b_edge"
$trunk_tls
TOML
  cat > "$work/b.toml" <<TOML
[edge]
listen = ["$transport:127.0.0.1:$b_edge"]
allow = ["127.0.0.0/8"]
$b_tls_table
[core_side]
listen = ["udp:127.0.0.1:$b_core"]
allow = ["127.0.0.0/8"]
[log]
level = "warn"
[[trunk]]
name = "core"
edge = "$transport:127.0.0.1:$a_core"
core = "udp:127.0.0.1:$uas"
$trunk_tls
TOML
  "$binary" run --config "$work/b.toml" 2>"$work/b.log" & local b=$!
  "$binary" run --config "$work/a.toml" 2>"$work/a.log" & local a=$!
  (cd "$work" && exec sipp -sf "$OLDPWD/$scenarios/uas.xml" -i 127.0.0.1 -p "$uas" -m "$calls" \
      -nostdin -timeout $(( seconds * 4 + 20 ))s -timeout_error >/dev/null 2>&1) & local server=$!
  sleep 0.5
  local a0 b0
  a0=$(ticks "$a"); b0=$(ticks "$b")
  (cd "$work" && exec sipp -sf "$OLDPWD/$scenarios/uac.xml" -i 127.0.0.1 -p "$uac" "127.0.0.1:$a_edge" \
      -m "$calls" -r "$rate" -d 0 -l 100000 -nostdin -timeout $(( seconds * 4 + 20 ))s -timeout_error \
      -trace_stat -stf "$work/uac.csv" -fd 1 >/dev/null 2>&1) || true
  local a1 b1
  a1=$(ticks "$a"); b1=$(ticks "$b")
  kill "$server" "$a" "$b" 2>/dev/null || true
  wait "$server" "$a" "$b" 2>/dev/null || true
  local failed
  failed=$(python3 - "$work/uac.csv" <<'PY'
import sys
lines = [line for line in open(sys.argv[1]) if line.strip()]
header, last = lines[0].split(';'), lines[-1].split(';')
print(last[header.index('FailedCall(C)')])
PY
)
  local hz; hz=$(getconf CLK_TCK)
  python3 -c "print($failed, round(($a1 - $a0) / $hz / $calls * 1e6), round(($b1 - $b0) / $hz / $calls * 1e6))"
}

median() { sort -n | awk '{ values[NR] = $1 } END { print values[int((NR + 1) / 2)] }'; }

: > "$work/tcp"; : > "$work/tls"
for repetition in $(seq "$repetitions"); do
  for transport in tcp tls; do
    read -r failed cpu_a cpu_b < <(run "$transport")
    echo "run $repetition $transport: $calls calls at $rate/s, $failed failed; CPU per call: sidecar (TLS/TCP client) ${cpu_a} us, its core (server) ${cpu_b} us"
    echo "$cpu_a $cpu_b $failed" >> "$work/$transport"
  done
done
for transport in tcp tls; do
  a=$(awk '{ print $1 }' "$work/$transport" | median)
  b=$(awk '{ print $2 }' "$work/$transport" | median)
  f=$(awk '{ sum += $3 } END { print sum }' "$work/$transport")
  echo "median $transport: client ${a} us per call, server ${b} us per call, failed calls in all runs: $f"
  echo "$a $b" > "$work/$transport.median"
done
read -r tcp_a tcp_b < "$work/tcp.median"; read -r tls_a tls_b < "$work/tls.median"
python3 -c "print(f'TLS over TCP, CPU per call: client {$tls_a / $tcp_a:.2f}x (+{$tls_a - $tcp_a} us), server {$tls_b / $tcp_b:.2f}x (+{$tls_b - $tcp_b} us)')"
