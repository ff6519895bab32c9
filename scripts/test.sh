#!/usr/bin/env bash
# Set up, then run the whole test suite (parity with diffusers on tiny random models).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The web page's test drives Debian's Chromium headless (playwright cannot download its own here).
if ! command -v chromium >/dev/null; then
  (apt-get install -y -q chromium || { apt-get update -q && apt-get install -y -q chromium; }) >/dev/null
fi
exec .venv/bin/python -m pytest -n 2 -q "$@"
