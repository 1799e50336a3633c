#!/usr/bin/env bash
# Sets up the environment, then runs the offline demo (a few minutes on 2 CPU cores).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
forgetless demo --overwrite "$@"
