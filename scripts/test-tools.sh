#!/usr/bin/env bash
# What the tests need beyond setup.sh, from Debian's packages: chromium and chromium-driver (the fleet
# console's browser tests drive it through selenium; no browser is downloaded) and prometheus (its
# promtool checks deploy/prometheus/, and its server scrapes a running service in the metrics tests).
set -euo pipefail
say() { printf '\033[1m[test-tools]\033[0m %s\n' "$*" >&2; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
missing=()
command -v chromium >/dev/null || missing+=(chromium)
command -v chromedriver >/dev/null || missing+=(chromium-driver)
command -v promtool >/dev/null && command -v prometheus >/dev/null || missing+=(prometheus)
if [ ${#missing[@]} -gt 0 ]; then
  say "installing Debian's ${missing[*]}"
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
