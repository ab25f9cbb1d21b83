#!/usr/bin/env bash
# Install Debian's chromium for the browser test (tests/test_demo.py, marker `browser`).
# Idempotent: does nothing when /usr/bin/chromium is already there. Playwright drives this
# system browser through `executable_path`, so `playwright install` (a download) is never needed.
set -euo pipefail

if command -v chromium >/dev/null 2>&1; then
    echo "chromium already installed: $(command -v chromium)"
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core
echo "installed: $(command -v chromium)"
