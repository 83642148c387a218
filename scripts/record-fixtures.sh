#!/usr/bin/env bash
# Records the captures in pcap-fixtures/ from real programs on loopback: sipp, Kamailio,
# the sidecar and its simulated core, captured by tshark or tcpdump in several formats
# and link types. Not part of the test run (the captures are committed); run it again to
# renew them, then check the README there still describes them.
#
#   scripts/record-fixtures.sh [OUT_DIR]     (default pcap-fixtures; needs root for capture)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-pcap-fixtures}
mkdir -p "$out"
for tool in sipp tshark tcpdump /usr/sbin/kamailio curl python3; do
  command -v "$tool" >/dev/null || { echo "missing: $tool" >&2; exit 1; }
done
cargo build --release --quiet
binary=$PWD/target/release/byoc-sidecar
scenarios=$PWD/tests/scenarios
work=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  [ -f "$work/kamailio.pid" ] && kill -- "-$(cat "$work/kamailio.pid")" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# capture FILE TOOL ARGS...: starts a capture in the background, waits until it runs.
capture() {
  local file=$1 tool=$2; shift 2
  rm -f "$file"
  case "$tool" in
    tshark) tshark -q -w "$file" "$@" 2>"$work/capture.err" & ;;
    tcpdump) tcpdump -Z root -U -w "$file" "$@" 2>"$work/capture.err" & ;;
  esac
  capture_pid=$!
  for _ in $(seq 50); do
    grep -q "Capturing on\|listening on" "$work/capture.err" 2>/dev/null && break
    sleep 0.1
  done
  sleep 0.5
}
stop_capture() {
  sleep 0.5
  kill -INT "$capture_pid"; wait "$capture_pid" 2>/dev/null || true
}

# sidecar EDGE_PORT CORE_URI: a sidecar with one trunk and no credentials.
sidecar() {
  local side_port
  side_port=$(free_port)
  cat > "$work/sidecar.toml" <<TOML
[edge]
listen = ["udp:127.0.0.1:$1", "tcp:127.0.0.1:$1"]
allow = ["127.0.0.0/8"]
[core_side]
listen = ["udp:127.0.0.1:$side_port"]
allow = ["127.0.0.0/8"]
[log]
level = "warn"
[[trunk]]
name = "fixture"
edge = "udp:127.0.0.1:9"
core = "$2"
TOML
  "$binary" run --config "$work/sidecar.toml" 2>>"$work/sidecar.log" &
  sidecar_pid=$!
  pids+=("$sidecar_pid")
  sleep 0.5
}

sipp_run() { (cd "$work" && sipp -nostdin -m 1 -timeout 20s -timeout_error "$@" >/dev/null 2>&1); }

through_sidecar() { # FILE TOOL CAPTURE_ARGS -- UAC_SCENARIO UAS_SCENARIO TRANSPORT
  local file=$1 tool=$2 uac=$3 uas=$4 transport=$5; shift 5
  local edge_port uas_port
  edge_port=$(free_port); uas_port=$(free_port)
  sidecar "$edge_port" "udp:127.0.0.1:$uas_port"
  (cd "$work" && exec sipp -nostdin -sf "$scenarios/$uas" -i 127.0.0.1 -p "$uas_port" -m 1 \
     -timeout 20s >/dev/null 2>&1) &
  local uas_pid=$!
  capture "$file" "$tool" "$@" "port $edge_port or port $uas_port"
  local sipp_transport=u1
  [ "$transport" = tcp ] && sipp_transport=t1
  sipp_run -sf "$scenarios/$uac" -i 127.0.0.1 -t "$sipp_transport" -d 500 "127.0.0.1:$edge_port"
  wait "$uas_pid" || true
  stop_capture
  kill "$sidecar_pid"; wait "$sidecar_pid" 2>/dev/null || true
}

echo "call-udp.pcapng: sipp -> sidecar -> sipp over UDP, tshark on lo (pcapng, Ethernet)"
through_sidecar "$out/call-udp.pcapng" tshark uac.xml uas.xml udp -i lo -f
echo "call-tcp.pcap: sipp over TCP -> sidecar -> sipp over UDP, tcpdump on lo (pcap, ns)"
through_sidecar "$out/call-tcp.pcap" tcpdump uac.xml uas.xml tcp -i lo --time-stamp-precision=nano
echo "cancel.pcapng: sipp -> sidecar -> sipp, CANCEL after 180, tshark on lo (pcapng)"
through_sidecar "$out/cancel.pcapng" tshark uac_cancel.xml uas_cancel.xml udp -i lo -f
echo "reinvite.pcap: sipp -> sidecar -> sipp with a re-INVITE, tcpdump on lo (pcap, us)"
through_sidecar "$out/reinvite.pcap" tcpdump uac_reinvite.xml uas_reinvite.xml udp -i lo

echo "register-digest.pcapng: sipp -> Kamailio registrar (401, then 200), tshark on any (SLL)"
kamailio_port=$(free_port)
modules=$(dirname "$(ls /usr/lib/*/kamailio/modules/tm.so | head -1)")
mkdir -p "$work/db"
printf 'id(int,auto) table_name(string) table_version(int) \n0:subscriber:7\n' > "$work/db/version"
printf 'id(int,auto) username(string) domain(string) password(string) ha1(string,null) ha1b(string,null) \n1:alice:core.test:fixture-password:::\n' > "$work/db/subscriber"
sed -e "s|@PORT@|$kamailio_port|g" -e "s|@MODULES@|$modules|g" -e "s|@DB@|$work/db|g" \
    -e "s|@DIR@|$work|g" tests/kamailio/registrar.cfg > "$work/kamailio.cfg"
setsid /usr/sbin/kamailio -f "$work/kamailio.cfg" -DD -E -Y "$work" -w "$work" \
    >"$work/kamailio.out" 2>"$work/kamailio.log" &
echo $! > "$work/kamailio.pid"
sleep 1
capture "$out/register-digest.pcapng" tshark -i any -f "udp port $kamailio_port"
sipp_run -sf "$scenarios/uac_register_auth.xml" -i 127.0.0.1 -au alice -ap fixture-password \
    "127.0.0.1:$kamailio_port"
stop_capture
kill -- "-$(cat "$work/kamailio.pid")"; rm -f "$work/kamailio.pid"

echo "invite-403-after-rotation.pcap: an Edge calls the simulated core with a token another"
echo "  instance of its client has revoked: 403. tcpdump on any as SLL2 (pcap)"
core_port=$(free_port); idp_port=$(free_port)
"$binary" sim core --listen "127.0.0.1:$core_port" --idp-listen "127.0.0.1:$idp_port" \
    --kind opaque --client edge-a:fixture-secret:org-a --validation revoke-on-reissue \
    >"$work/core.out" 2>&1 &
pids+=("$!")
sleep 0.5
token() {
  curl -s -u edge-a:fixture-secret -H "X-Genesys-Organization: org-a" \
       -d grant_type=client_credentials "http://127.0.0.1:$idp_port/oauth/token" \
    | python3 -c 'import json,sys; print(json.load(sys.stdin)["access_token"])'
}
stale=$(token)
token >/dev/null   # the other instance: the first token is revoked now
capture "$out/invite-403-after-rotation.pcap" tcpdump -i any -y LINUX_SLL2 "udp port $core_port"
sipp_run -sf "$scenarios/uac_bearer_stale.xml" -i 127.0.0.1 -key token "$stale" \
    "127.0.0.1:$core_port"
stop_capture

for file in "$out"/*.pcap "$out"/*.pcapng; do
  printf '%s: ' "$file"
  "$binary" replay --list "$file" | tail -1 | cut -d';' -f1
done
