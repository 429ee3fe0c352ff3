#!/usr/bin/env bash
# Prometheus server (Debian package), for the planner's Prometheus-source test: the test starts
# its own private instance on a free loopback port; nothing here starts a service.
set -euo pipefail
if command -v prometheus >/dev/null 2>&1; then
  echo "[install_prometheus] $(prometheus --version 2>&1 | head -1)" >&2
  exit 0
fi
as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }
echo "[install_prometheus] installing prometheus (Debian package)" >&2
as_root apt-get update -qq
DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends prometheus >/dev/null
