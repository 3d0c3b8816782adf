#!/usr/bin/env bash
# The Debian packages the tests run for real, installed if missing (as root, or with sudo):
# g++ for the compiled decoder (Inductor builds C++), chromium for the docs pages (Playwright
# drives it; it cannot download its own browsers), redis-server and postgresql for the rate
# limits shared across workers and the user database, nginx for the proxy in front.
set -euo pipefail
missing=""
command -v c++ >/dev/null || missing="$missing g++"
command -v chromium >/dev/null || missing="$missing chromium"
command -v redis-server >/dev/null || missing="$missing redis-server"
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || missing="$missing nginx"
ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || missing="$missing postgresql"
[ -z "$missing" ] && exit 0
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
echo "installing Debian packages:$missing"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends $missing
