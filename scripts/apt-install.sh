#!/usr/bin/env bash
# Installs Debian packages for the project's set-up scripts, once: `apt-get update` and a
# quiet, non-interactive install without recommends, through sudo when not root.
#
#   scripts/apt-install.sh WHO WITHOUT_APT PACKAGE...
#
# WHO prefixes the messages; WITHOUT_APT is what to tell a user on a system without
# apt-get (the script then fails).
set -euo pipefail
who=$1 without_apt=$2
shift 2
if ! command -v apt-get >/dev/null; then
  echo "$who: no apt-get here: $without_apt" >&2
  exit 1
fi
sudo=
[ "$(id -u)" = 0 ] || sudo=sudo
echo "$who: installing $* (one time)" >&2
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "$@" >/dev/null
