#!/usr/bin/env bash
# The proxy benchmark (issue 15): sipp to sipp directly, through Kamailio (tm + rr), and
# through the sidecar without and with bearer tokens, over UDP and TCP, side by side in
# one run. Results land in bench/results/. See scripts/bench.py for what is measured and
# its options (--repetitions, --calls, --paths, --transports, --skip ...).
#
#   scripts/bench.sh                       # the full run: 3 repetitions, 20,000-call steps
#   scripts/bench.sh --repetitions 1 --calls 5000 --skip rss   # a quick look
set -euo pipefail
cd "$(dirname "$0")/.."
for tool in sipp python3 /usr/sbin/kamailio; do
  command -v "$tool" >/dev/null || { echo "$tool is missing (scripts/test.sh installs sipp and kamailio)" >&2; exit 1; }
done
cargo build --release --quiet
exec python3 scripts/bench.py "$@"
