#!/usr/bin/env bash
# Sets up the environment, then runs the whole test suite (about 10 minutes on 2 CPU cores).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
python -m pytest -q "$@"
