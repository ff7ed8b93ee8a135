#!/usr/bin/env bash
# Best effort: make `prometheus` and `promtool` available for tests/telemetry/test_alerting.py by
# installing Debian's `prometheus` package, when this machine is Debian-like and we are root.
# Idempotent: a second run installs nothing. Never fails the caller: when installing is
# impossible it says why and exits 0, and the alerting tests skip with their own reason.
#
# The package's own service must not run: it would take 127.0.0.1:9090 and scrape whatever it
# likes, while the tests start their own Prometheus on a free loopback port. So the install
# runs with service starts denied, and any service already started is stopped and disabled.
set -u

say() { echo "ensure-prometheus: $*"; }

have_prometheus() {
  command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1
}

# Keep the packaged daemon from running (init-system agnostic, each step optional).
stop_packaged_service() {
  [ -e /etc/init.d/prometheus ] || [ -e /lib/systemd/system/prometheus.service ] || return 0
  if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
    systemctl disable --now prometheus >/dev/null 2>&1 || true
  fi
  if [ -x /etc/init.d/prometheus ]; then
    service prometheus stop >/dev/null 2>&1 || /etc/init.d/prometheus stop >/dev/null 2>&1 || true
    command -v update-rc.d >/dev/null 2>&1 && update-rc.d prometheus disable >/dev/null 2>&1 || true
  fi
  # A daemon started outside the init system's bookkeeping: stop it by its recorded pid only.
  for pidfile in /run/prometheus.pid /run/prometheus/prometheus.pid; do
    if [ -s "$pidfile" ]; then
      pid=$(cat "$pidfile")
      if [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "prometheus" ]; then
        kill "$pid" 2>/dev/null || true
      fi
    fi
  done
  return 0
}

install_package() {
  if [ "$(id -u)" -ne 0 ]; then
    say "not root: cannot apt-get install prometheus (alerting tests will skip)"
    return 0
  fi
  if ! command -v apt-get >/dev/null 2>&1; then
    say "no apt-get on this machine: install Prometheus by hand (alerting tests will skip)"
    return 0
  fi
  export DEBIAN_FRONTEND=noninteractive
  # Deny service starts during the install unless the machine already has a policy
  # (Debian's invoke-rc.d honours /usr/sbin/policy-rc.d; exit 101 = "action forbidden").
  local made_policy=""
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d && made_policy=1
  fi
  # Update the package lists only when they do not know the package yet (fresh image), and
  # once more if an install from stale lists fails (e.g. a superseded .deb is gone).
  local updated=""
  if ! apt-cache policy prometheus 2>/dev/null | grep -q 'Candidate: [0-9]'; then
    say "apt-get update"
    apt-get update -qq && updated=1
  fi
  # --no-install-recommends: the recommended prometheus-node-exporter would listen on :9100,
  # the workers' metrics port.
  local install=(apt-get install -y -qq --no-install-recommends prometheus)
  if ! "${install[@]}" >/dev/null; then
    if [ -z "$updated" ]; then
      say "install failed; apt-get update and retry"
      apt-get update -qq && "${install[@]}" >/dev/null
    fi
  fi
  [ -n "$made_policy" ] && rm -f /usr/sbin/policy-rc.d
  return 0
}

if have_prometheus; then
  say "already installed ($(prometheus --version 2>&1 | head -n 1))"
else
  install_package
  if have_prometheus; then
    say "installed ($(prometheus --version 2>&1 | head -n 1))"
  else
    say "prometheus/promtool still missing (alerting tests will skip)"
  fi
fi
stop_packaged_service
exit 0
