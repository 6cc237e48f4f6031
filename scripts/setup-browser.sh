#!/usr/bin/env bash
# Installs what the console's browser tests drive (crates/ddpm-server/tests/api/console.rs):
# Debian's chromium and chromium-driver, and a font for the pages' text. Idempotent: with
# both present it only checks. Needs root or sudo and Debian's package registry; on other
# systems install Chromium and a matching chromedriver yourself and point DDPM_CHROMIUM
# and DDPM_CHROMEDRIVER at them.
set -euo pipefail

chromium=${DDPM_CHROMIUM:-/usr/bin/chromium}
chromedriver=${DDPM_CHROMEDRIVER:-chromedriver}
if [ -x "$chromium" ] && command -v "$chromedriver" >/dev/null; then
  exit 0
fi
if ! command -v apt-get >/dev/null; then
  echo "setup-browser: no apt-get here: install Chromium and chromedriver, then set" \
    "DDPM_CHROMIUM and DDPM_CHROMEDRIVER" >&2
  exit 1
fi
sudo=
[ "$(id -u)" = 0 ] || sudo=sudo
echo "setup-browser: installing chromium and chromium-driver (one time)" >&2
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
  chromium chromium-driver fonts-dejavu-core >/dev/null
"$chromium" --version >&2
