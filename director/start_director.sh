#!/usr/bin/env bash
# Start the tutorial's director. Works from any folder; extra arguments go to
# `fedjax director start` after the defaults, e.g. ./start_director.sh --log-level DEBUG --listen-port 50060
# mTLS when the config has a `tls:` section (or certificates are given as flags), plaintext (as in
# the seed) when it has neither; FEDJAX_TLS=1 or FEDJAX_TLS=0 forces one or the other.
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
config="$(cd "$(dirname "$config")" && pwd)/$(basename "$config")"
# TLS: FEDJAX_TLS=1 or 0 forces it; otherwise certificates on the command line or a tls: section in
# the config mean mTLS, and neither means plaintext (as in the seed); --disable-tls always means plaintext
case "${FEDJAX_TLS:-}" in
  1) tls_flag=(); tls_why="mTLS (FEDJAX_TLS=1)" ;;
  0) tls_flag=(--disable-tls); tls_why="plaintext (FEDJAX_TLS=0)" ;;
  "") if grep -q '^tls:' "$config"; then
        tls_flag=(); tls_why="mTLS (the config has a tls: section; FEDJAX_TLS=0 for plaintext)"
      else
        tls_flag=(--disable-tls)
        tls_why="plaintext (the config has no tls: section; see README, 'Running on your own machines')"
      fi
      for arg in "$@"; do
        case "$arg" in
          -rc|-pc|-pk|--root-cert-path*|--public-cert-path*|--private-key-path*)
            tls_flag=(); tls_why="mTLS (certificates given on the command line)" ;;
        esac
      done ;;
  *) echo "start_director.sh: FEDJAX_TLS must be 1 (mTLS) or 0 (plaintext), got '$FEDJAX_TLS'" >&2; exit 2 ;;
esac
for arg in "$@"; do
  [ "$arg" = "--disable-tls" ] && { tls_flag=(); tls_why="plaintext (--disable-tls given)"; }
done
echo "director: $tls_why"
cd "$here"
echo "director: config $config (its state_dir and log_dir are relative to its folder)"
exec "$fedjax" director start -c "$config" ${tls_flag[@]+"${tls_flag[@]}"} "$@"
