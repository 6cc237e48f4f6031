#!/usr/bin/env bash
# Prints a PostgreSQL URL the tests can use, starting a server if none is running:
#   1. $DDPM_TEST_POSTGRES_URL, if set;
#   2. a server already listening on 127.0.0.1:5432 (user postgres, trust auth);
#   3. the machine's Debian cluster, started with pg_ctlcluster;
#   4. a throwaway cluster (initdb) under the cache directory, on port 55432;
#   5. as root on Debian/Ubuntu: apt-get install postgresql, then 3.
# Everything but the URL goes to stderr.
set -euo pipefail

say() { echo "test-postgres: $*" >&2; }
ready() { pg_isready -q -h 127.0.0.1 -p "$1" 2>/dev/null; }
wait_ready() {
  for _ in $(seq 1 60); do ready "$1" && return 0; sleep 0.5; done
  return 1
}

if [ -n "${DDPM_TEST_POSTGRES_URL:-}" ]; then
  echo "$DDPM_TEST_POSTGRES_URL"; exit 0
fi

default_url=postgres://postgres@127.0.0.1:5432/postgres
if command -v pg_isready >/dev/null && ready 5432; then
  echo "$default_url"; exit 0
fi

start_debian_cluster() {
  command -v pg_lsclusters >/dev/null || return 1
  local line version name
  line=$(pg_lsclusters --no-header 2>/dev/null | head -n 1) || return 1
  [ -n "$line" ] || return 1
  version=$(echo "$line" | awk '{print $1}'); name=$(echo "$line" | awk '{print $2}')
  say "starting PostgreSQL cluster $version/$name"
  pg_ctlcluster --skip-systemctl-redirect "$version" "$name" start >&2 || true
  wait_ready 5432
}

if start_debian_cluster; then
  echo "$default_url"; exit 0
fi

bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
if [ -z "$bin" ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  say "installing PostgreSQL from the distribution's packages"
  DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >&2
  if start_debian_cluster; then echo "$default_url"; exit 0; fi
  bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
fi
[ -n "$bin" ] || { say "no PostgreSQL found: install it or set DDPM_TEST_POSTGRES_URL"; exit 1; }

# A private cluster: initdb refuses to run as root, so root runs it as 'postgres'/'nobody'.
cache=${DDPM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/ddpm}
pgdata="$cache/test-postgres"
port=55432
as_owner=()
if [ "$(id -u)" = 0 ]; then
  owner=$(id -u postgres >/dev/null 2>&1 && echo postgres || echo nobody)
  as_owner=(runuser -u "$owner" --)
  mkdir -p "$pgdata"; chown "$owner" "$pgdata"
fi
if [ ! -f "$pgdata/PG_VERSION" ]; then
  say "creating a throwaway cluster in $pgdata"
  "${as_owner[@]}" "$bin/initdb" -D "$pgdata" -U postgres -A trust >/dev/null
fi
if ! ready $port; then
  "${as_owner[@]}" "$bin/pg_ctl" -D "$pgdata" -l "$pgdata/log" -o "-p $port -k /tmp -c listen_addresses=127.0.0.1" start >&2
  wait_ready $port || { say "the throwaway cluster did not start; see $pgdata/log"; exit 1; }
fi
echo "postgres://postgres@127.0.0.1:$port/postgres"
