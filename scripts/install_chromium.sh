#!/usr/bin/env bash
# Installs headless Chromium for the real-browser check of report.html
# (tests/report/test_browser.py renders it and inspects a screenshot). Optional: without a
# browser that test is skipped with its reason. Uses apt-get (Debian; about 80 s with the index
# update); run as root or with sudo. On Ubuntu the apt package is a snap wrapper that does not
# work in containers: install Chrome or Chromium another way and put it on PATH.
set -euo pipefail
for browser in chromium chromium-browser google-chrome; do
  if command -v "$browser" >/dev/null 2>&1; then
    echo "browser found: $(command -v "$browser")"
    exit 0
  fi
done
if ! command -v apt-get >/dev/null 2>&1; then
  echo "no apt-get here: install Chromium with your package manager to run the browser test" >&2
  exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  SUDO="sudo"
fi
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium
