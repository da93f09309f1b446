#!/usr/bin/env bash
# Start a tutorial envoy: ./start_envoy.sh NAME CONFIG [more fedjax envoy start arguments]
# e.g. ./start_envoy.sh env_one envoy_config.yaml
#      ./start_envoy.sh env_two envoy_config_2.yaml -dh director.example.org -dp 50060
# mTLS when the config has a `tls:` section (or certificates are given as flags), plaintext (as in
# the seed) when it has neither; FEDJAX_TLS=1 or FEDJAX_TLS=0 forces one or the other.
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 NAME CONFIG [fedjax envoy start arguments...]" >&2
  exit 2
fi
name="$1"; config="$2"; shift 2
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
case "$config" in /*) ;; *) [ -f "$config" ] || config="$here/$config" ;; esac
if [ ! -f "$config" ]; then
  echo "start_envoy.sh: envoy config not found: $config" >&2
  exit 1
fi
config="$(cd "$(dirname "$config")" && pwd)/$(basename "$config")"
fedjax="${FEDJAX_BIN:-$here/../.venv/bin/fedjax}"
[ -x "$fedjax" ] || fedjax="$(command -v fedjax || true)"
if [ -z "$fedjax" ]; then
  echo "start_envoy.sh: fedjax is not installed here: run 'make install' in the repository root, put the fedjax command on PATH (pip install the fedjax-core package: README, 'Running on your own machines'), or set FEDJAX_BIN=/path/to/fedjax" >&2
  exit 1
fi
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
  *) echo "start_envoy.sh: FEDJAX_TLS must be 1 (mTLS) or 0 (plaintext), got '$FEDJAX_TLS'" >&2; exit 2 ;;
esac
for arg in "$@"; do
  [ "$arg" = "--disable-tls" ] && { tls_flag=(); tls_why="plaintext (--disable-tls given)"; }
done
echo "envoy: $tls_why"
cd "$here"
echo "envoy $name: config $config, work files in $(dirname "$config")/envoy_workspace/$name (unless it sets work_dir)"
exec "$fedjax" envoy start -n "$name" -c "$config" -dh localhost -dp 50055 ${tls_flag[@]+"${tls_flag[@]}"} "$@"
