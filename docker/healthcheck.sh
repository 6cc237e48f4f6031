#!/usr/bin/env bash
# The ddpm-server image's HEALTHCHECK: GET PATH (default /healthz) from the server in this
# container, at the port of DDPM_BIND; healthy on 200. Uses bash's /dev/tcp, so the image
# needs no curl. `ddpm-healthcheck /readyz` asks whether a model is loaded as well.
set -euo pipefail

path=${1:-/healthz}
bind=${DDPM_BIND:-0.0.0.0:8080}
port=${bind##*:}
host=${bind%:*}
host=${host#[}
host=${host%]}
case $host in
  "" | 0.0.0.0) host=127.0.0.1 ;;
  ::) host=::1 ;;
esac

exec 3<>"/dev/tcp/$host/$port"
printf 'GET %s HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n' "$path" >&3
IFS=$' \t\r' read -r -t 5 _ status _ <&3
if [ "$status" != 200 ]; then
  echo "ddpm-healthcheck: GET $path on $host:$port answered ${status:-nothing}" >&2
  exit 1
fi
