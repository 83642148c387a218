#!/usr/bin/env bash
# Runs every check and test of the project, the way CI does. Installs what the tests
# need when it is missing (sipp from Debian's sip-tester, and kamailio as a real Digest
# core) and fails loudly if it cannot.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v sipp >/dev/null 2>&1 || missing+=(sip-tester)
[ -x /usr/sbin/kamailio ] || missing+=(kamailio)
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing test dependencies: ${missing[*]}"
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y "${missing[@]}"
fi
if ! command -v sipp >/dev/null 2>&1; then
  echo "error: sipp is still missing after installing sip-tester; the integration tests need it" >&2
  exit 1
fi
if [ ! -x /usr/sbin/kamailio ]; then
  echo "error: /usr/sbin/kamailio is still missing after installing kamailio; the Digest tests need it" >&2
  exit 1
fi

cargo fmt --all -- --check
cargo clippy --all-targets -- -D warnings
cargo test --all-targets
