#!/usr/bin/env bash
# Start a tutorial envoy: ./start_envoy.sh NAME CONFIG [more fedjax envoy start arguments]
# e.g. ./start_envoy.sh env_one envoy_config.yaml
#      ./start_envoy.sh env_two envoy_config_2.yaml -dh director.example.org -dp 50060
# Plaintext by default, as in the seed; FEDJAX_TLS=1 uses the config's `tls:` section instead.
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
  echo "start_envoy.sh: fedjax is not installed: run 'make install' in the repository root (or set FEDJAX_BIN)" >&2
  exit 1
fi
tls_flag=(--disable-tls)
[ "${FEDJAX_TLS:-0}" = "1" ] && tls_flag=()
cd "$here"
echo "envoy $name: config $config, work files in $here/envoy_workspace/$name"
exec "$fedjax" envoy start -n "$name" -c "$config" -dh localhost -dp 50055 "${tls_flag[@]}" "$@"
