#!/usr/bin/env bash
# Create .venv and install controldiff with its test extra, every package at the version
# pinned in requirements/lock.txt (the versions the suite was last green with; refresh it
# with scripts/refresh_lock.sh). Idempotent: a second run only checks.
# torch==2.13.0 first: a bare "torch" requirement would pull a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
LOCK=${CONTROLDIFF_LOCK:-requirements/lock.txt}
quiet() { "$@" 2> >(grep -v '^WARNING: Location' >&2); }  # this machine's pip config lists absent mirrors
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.controldiff-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ "$LOCK" -nt "$stamp" ] \
    || [ "$(cat "$stamp")" != "$LOCK" ]; then
  torch_pin=$(grep -E '^torch==' "$LOCK" | head -n 1)
  .venv/bin/python -c "import torch" 2>/dev/null || quiet .venv/bin/python -m pip install -q "${torch_pin:-torch==2.13.0}"
  quiet .venv/bin/python -m pip install -q -c "$LOCK" -e ".[dev]"
  # every installed package must be pinned: one that is not came from a requirement added
  # after the lock was written, at whatever version is newest today
  unpinned=$(.venv/bin/python -m pip freeze --exclude-editable | sed 's/+[^ ]*$//' | grep -vxFf "$LOCK" || true)
  if [ -n "$unpinned" ]; then
    echo "setup: not as in $LOCK (run scripts/refresh_lock.sh): $(echo $unpinned)" >&2
  fi
  echo "$LOCK" > "$stamp"
fi
