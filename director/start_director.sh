#!/usr/bin/env bash
# Start the tutorial's director. Works from any folder; extra arguments go to
# `fedjax director start` after the defaults, e.g. ./start_director.sh --log-level DEBUG
# mTLS when the config has a `tls:` section, plaintext (as in the seed) when it has none;
# FEDJAX_TLS=1 or FEDJAX_TLS=0 forces one or the other.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
fedjax="${FEDJAX_BIN:-$here/../.venv/bin/fedjax}"
[ -x "$fedjax" ] || fedjax="$(command -v fedjax || true)"
if [ -z "$fedjax" ]; then
  echo "start_director.sh: fedjax is not installed here: run 'make install' in the repository root, put the fedjax command on PATH (pip install the fedjax-core package: README, 'Running on your own machines'), or set FEDJAX_BIN=/path/to/fedjax" >&2
  exit 1
fi
config="${DIRECTOR_CONFIG:-$here/director_config.yaml}"
if [ ! -f "$config" ]; then
  echo "start_director.sh: director config not found: $config" >&2
  exit 1
fi
# TLS when the config has a tls: section (or FEDJAX_TLS=1); plaintext otherwise (or with FEDJAX_TLS=0)
if [ "${FEDJAX_TLS:-}" = "1" ]; then
  tls_flag=(); tls_why="mTLS (FEDJAX_TLS=1)"
elif [ "${FEDJAX_TLS:-}" = "0" ]; then
  tls_flag=(--disable-tls); tls_why="plaintext (FEDJAX_TLS=0)"
elif grep -q '^tls:' "$config"; then
  tls_flag=(); tls_why="mTLS (the config has a tls: section; FEDJAX_TLS=0 for plaintext)"
else
  tls_flag=(--disable-tls); tls_why="plaintext (the config has no tls: section; see README, 'Running on your own machines')"
fi
echo "director: $tls_why"
cd "$here"
echo "director: state in $here/director_state, TensorBoard logs in $here/logs (tensorboard --logdir $here/logs)"
exec "$fedjax" director start -c "$config" "${tls_flag[@]}" "$@"
