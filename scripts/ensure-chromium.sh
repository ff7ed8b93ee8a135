#!/usr/bin/env bash
# Best effort: install Debian's `chromium` for the HTML report test (tests/test_reports.py renders
# the report headless and checks its plots are drawn). Idempotent and quiet; never fails the
# build: without root or apt-get it says why and exits 0, and that test skips with the reason.
set -u

if command -v chromium >/dev/null 2>&1; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "ensure-chromium: apt-get not found; install chromium yourself to run the HTML report test"
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "ensure-chromium: not root; run 'sudo apt-get install chromium' to run the HTML report test"
  exit 0
fi

export DEBIAN_FRONTEND=noninteractive
install_chromium() {
  # No recommends: headless rendering needs neither the sandbox helper nor extra fonts
  # (matplotlib draws SVG text as paths).
  apt-get install -y -qq --no-install-recommends chromium >/dev/null
}

# Package lists may be missing (slim images) or stale (a superseded version 404s): refresh them
# once, only when the first attempt fails.
if ! install_chromium 2>/dev/null; then
  apt-get update -qq >/dev/null 2>&1 || true
  if ! install_chromium; then
    echo "ensure-chromium: could not install chromium with apt-get; the HTML report test will skip"
    exit 0
  fi
fi
echo "ensure-chromium: installed $(chromium --version 2>/dev/null || echo chromium)"
exit 0
