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
"$(dirname "${BASH_SOURCE[0]}")/apt-install.sh" setup-browser \
  "install Chromium and chromedriver, then set DDPM_CHROMIUM and DDPM_CHROMEDRIVER" \
  chromium chromium-driver fonts-dejavu-core
"$chromium" --version >&2
