#!/usr/bin/env bash
# The main job: set up, then generate. Arguments go to `controldiff generate`;
# with no model path the embedded default model is used.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ $# -eq 0 ]; then
  set -- --prompt "a large red circle at the top right on a blue background" --steps 20 --seed 1
fi
exec .venv/bin/controldiff generate "$@"
