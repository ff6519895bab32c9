#!/usr/bin/env bash
# Test the lower bounds of the runtime dependencies in pyproject.toml.
#
#   bash scripts/check_bounds.sh [PYTEST ARGS ...]
#
# Installs every runtime dependency at exactly the lowest version pyproject.toml allows
# ("torch>=2.9" -> torch==2.9), the test tools at whatever fits beside them, and runs the
# whole suite in a scratch venv. The upper end of each range is what requirements/lock.txt
# pins (scripts/refresh_lock.sh moves it to the newest releases). torch below the version
# on this disk comes from PyPI as a CUDA build (about 3 GB of downloads); it runs on the CPU.
# The venv is kept in .venv-min/ (7 GB; delete it when done) and rebuilt when pyproject.toml changes.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
venv=.venv-min
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
quiet() { "$@" 2> >(grep -v '^WARNING: Location' >&2); }

"$PY" - > "$work/minimum.txt" <<'EOF'
import re, tomllib
for dep in tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]:
    m = re.match(r"([A-Za-z0-9_.-]+).*?>=\s*([0-9][^,;\s]*)", dep)
    if not m:
        raise SystemExit(f"check_bounds: no lower bound in {dep!r}")
    print(f"{m.group(1)}=={m.group(2)}")
EOF
echo "Lower bounds under test: $(tr '\n' ' ' < "$work/minimum.txt")"
pip=("$venv/bin/python" -m pip)
if [ ! -f "$venv/.installed" ] || [ pyproject.toml -nt "$venv/.installed" ]; then
  rm -rf "$venv"
  "$PY" -m venv "$venv"
  quiet "${pip[@]}" install -q -c "$work/minimum.txt" "$(grep -i '^torch==' "$work/minimum.txt")"
  quiet "${pip[@]}" install -q -c "$work/minimum.txt" -e ".[dev]"
  touch "$venv/.installed"
fi
echo "Installed:"
"${pip[@]}" freeze --exclude-editable | grep -i -E "^($(cut -d= -f1 "$work/minimum.txt" | paste -sd'|'))=="
"$venv/bin/python" -m pytest -n 2 -q -p no:cacheprovider "$@"
