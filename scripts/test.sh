#!/usr/bin/env bash
# Runs every check and test of the project, the way CI does. Installs what the tests
# need when it is missing (sipp from Debian's sip-tester, kamailio as a real Digest core,
# kamailio-tls-modules for the TLS core, and openssl, whose s_client probes it) and fails
# loudly if it cannot.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v sipp >/dev/null 2>&1 || missing+=(sip-tester)
[ -x /usr/sbin/kamailio ] || missing+=(kamailio)
kamailio_tls_present() { compgen -G '/usr/lib/*/kamailio/modules/tls.so' >/dev/null; }
kamailio_tls_present || missing+=(kamailio-tls-modules)
command -v openssl >/dev/null 2>&1 || missing+=(openssl)
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
if ! kamailio_tls_present; then
  echo "error: kamailio's tls.so is still missing after installing kamailio-tls-modules; the TLS core tests need it" >&2
  exit 1
fi
if ! command -v openssl >/dev/null 2>&1; then
  echo "error: openssl is still missing after installing it; the TLS core tests probe with openssl s_client" >&2
  exit 1
fi

cargo fmt --all -- --check
cargo clippy --all-targets -- -D warnings
cargo test --all-targets
