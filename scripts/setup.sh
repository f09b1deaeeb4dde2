#!/usr/bin/env bash
# Installs the project into the current Python environment.
#   scripts/setup.sh        runtime dependencies
#   scripts/setup.sh dev    runtime + test/lint dependencies
# torch is installed first only when missing: TORCH_SPEC picks the build (default: the CPU wheel
# this project's CI machines carry). On a GPU machine install your CUDA build of torch beforehand.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="${PIP:-python -m pip}"
if ! python -c "import torch" >/dev/null 2>&1; then
    $PIP install --quiet "${TORCH_SPEC:-torch==2.13.0}"
fi
extra=""
[ "${1:-}" = "dev" ] && extra="[dev]"
$PIP install --quiet -e ".${extra}"
