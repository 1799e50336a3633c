#!/usr/bin/env bash
# Creates .venv (if needed) and installs forgetless with its test dependencies into it.
#
# torch is installed first, pinned to the release the project is tested with. On a CPU-only
# machine whose pip has that CPU wheel at hand, that wheel is used; elsewhere pip picks the
# default build for the platform (on Linux x86_64 that is the CUDA build, right for a GPU).
# To choose another build, set FORGETLESS_TORCH to a pip requirement (e.g. "torch==2.13.0" plus
# your own --index-url), or install torch into .venv yourself first: an installed torch is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
if ! python -c "import torch" 2>/dev/null; then
  # shellcheck disable=SC2086
  python -m pip install --quiet ${FORGETLESS_TORCH:-torch==2.13.0}
fi
# FORGETLESS_EXTRAS: the optional extras to install with it (the test script adds harness).
python -m pip install --quiet -e ".[${FORGETLESS_EXTRAS:-dev}]"
python -c "import torch, transformers, peft, accelerate; print(f'forgetless env ready: torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, accelerate {accelerate.__version__}')"
