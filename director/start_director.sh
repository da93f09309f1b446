#!/usr/bin/env bash
# Start the tutorial's director. Works from any folder; extra arguments go to
# `fedjax director start` after the defaults, e.g. ./start_director.sh --log-level DEBUG
# Plaintext by default, as in the seed; FEDJAX_TLS=1 uses the config's `tls:` section instead.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
fedjax="${FEDJAX_BIN:-$here/../.venv/bin/fedjax}"
[ -x "$fedjax" ] || fedjax="$(command -v fedjax || true)"
if [ -z "$fedjax" ]; then
  echo "start_director.sh: fedjax is not installed: run 'make install' in the repository root" >&2
  exit 1
fi
config="${DIRECTOR_CONFIG:-$here/director_config.yaml}"
if [ ! -f "$config" ]; then
  echo "start_director.sh: director config not found: $config" >&2
  exit 1
fi
tls_flag=(--disable-tls)
[ "${FEDJAX_TLS:-0}" = "1" ] && tls_flag=()
cd "$here"
echo "director: state in $here/director_state, TensorBoard logs in $here/logs (tensorboard --logdir $here/logs)"
exec "$fedjax" director start -c "$config" "${tls_flag[@]}" "$@"
