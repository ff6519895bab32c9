#!/usr/bin/env bash
# Refresh requirements/lock.txt, the exact versions scripts/setup.sh installs.
#
#   bash scripts/refresh_lock.sh [REQUIREMENT ...]
#
# Installs the newest versions pyproject.toml allows into a scratch venv, runs the whole
# suite there, and writes the lock only if the suite passes. Either way it prints what
# moved against the current lock. REQUIREMENTs hold packages back when the newest release
# breaks something, e.g.  bash scripts/refresh_lock.sh 'transformers<5.24'
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
LOCK=requirements/lock.txt
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
quiet() { "$@" 2> >(grep -v '^WARNING: Location' >&2); }

"$PY" -m venv "$work/venv"
pip=("$work/venv/bin/python" -m pip)
quiet "${pip[@]}" install -q "torch==2.13.0"   # the CPU build on this disk; see README
printf '%s\n' "$@" > "$work/hold.txt"
quiet "${pip[@]}" install -q -c "$work/hold.txt" -e ".[dev]"
"${pip[@]}" freeze --exclude-editable | sed 's/+[^ ]*$//' | sort -f > "$work/new.txt"

echo "What moved against $LOCK:"
python3 - "$LOCK" "$work/new.txt" <<'EOF'
import sys

def read(path):
    pins = {}
    for line in open(path):
        line = line.strip()
        if line and not line.startswith("#") and "==" in line:
            name, version = line.split("==", 1)
            pins[name.lower()] = version
    return pins

old, new = read(sys.argv[1]), read(sys.argv[2])
moved = [f"  {n}: {old.get(n, '(new)')} -> {new.get(n, '(removed)')}"
         for n in sorted(old.keys() | new.keys()) if old.get(n) != new.get(n)]
print("\n".join(moved) if moved else "  nothing")
EOF

echo "Running the suite with these versions..."
start=$(date +%s)
if ! "$work/venv/bin/python" -m pytest -n 2 -q -p no:cacheprovider; then
  echo "refresh_lock: the suite fails with the newest versions; $LOCK is unchanged." >&2
  echo "Hold the culprit back and retry, e.g. bash scripts/refresh_lock.sh 'package<X.Y'" >&2
  exit 1
fi
{
  echo "# Exact versions the whole suite passed with ($(( $(date +%s) - start )) s, $(date -u +%Y-%m-%d))."
  echo "# Installed by scripts/setup.sh; rewritten by scripts/refresh_lock.sh.${*:+ Held back: $*}"
  cat "$work/new.txt"
} > "$LOCK"
echo "refresh_lock: wrote $LOCK"
