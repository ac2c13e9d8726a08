#!/usr/bin/env bash
# Installs Debian's redis-server (the tests start their own on a free port).
set -euo pipefail
if command -v redis-server >/dev/null 2>&1; then exit 0; fi
echo "hack/install-redis.sh: installing redis-server" >&2
if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq redis-server redis-tools >/dev/null
# Debian starts a system-wide instance on 6379; the tests never use it.
$SUDO systemctl disable --now redis-server >/dev/null 2>&1 || $SUDO service redis-server stop >/dev/null 2>&1 || true
