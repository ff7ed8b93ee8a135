#!/usr/bin/env bash
# Best effort: install a Debian package for the tests that need its command.
#   scripts/ensure-apt.sh COMMAND PACKAGE "what it is for"
# Idempotent and quiet; never fails the build: without root or apt-get it says why and exits 0,
# and the tests that need COMMAND skip with their own reason.
set -u

command_name=$1 package=$2 purpose=$3
say() { echo "ensure-apt($package): $*"; }

if command -v "$command_name" >/dev/null 2>&1; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  say "apt-get not found; install $package yourself for $purpose"
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  say "not root; run 'sudo apt-get install $package' for $purpose"
  exit 0
fi

export DEBIAN_FRONTEND=noninteractive
install_package() {
  # No recommends: none of the tests needs them.
  apt-get install -y -qq --no-install-recommends "$package" >/dev/null
}

# Package lists may be missing (slim images) or stale (a superseded version 404s): refresh them
# once, only when the first attempt fails.
if ! install_package 2>/dev/null; then
  apt-get update -qq >/dev/null 2>&1 || true
  if ! install_package; then
    say "could not install with apt-get; the tests for $purpose will skip"
    exit 0
  fi
fi
say "installed $("$command_name" --version 2>/dev/null | head -n 1)"
exit 0
