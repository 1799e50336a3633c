#!/usr/bin/env bash
# Sets up the environment, then runs the whole test suite (about 10 minutes on 2 CPU cores).
set -euo pipefail
cd "$(dirname "$0")/.."
FORGETLESS_EXTRAS="${FORGETLESS_EXTRAS:-dev,harness}" bash scripts/setup.sh  # harness: the lm-evaluation-harness tests run too
. .venv/bin/activate
python -m pytest -q "$@"
