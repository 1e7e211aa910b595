#!/usr/bin/env bash
# Install agentflan-ray and its test tools into the current Python environment.
#
# Without an NVIDIA GPU it installs PyTorch's CPU build first (a local CPU wheel if pip can find
# one, else PyTorch's CPU index), so no CUDA wheels are downloaded. With a GPU, the regular build.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}

if ! "$PY" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    "$PY" -m pip install "torch==${TORCH_VERSION}"
  elif ! "$PY" -m pip install "torch==${TORCH_VERSION}+cpu"; then
    "$PY" -m pip install "torch==${TORCH_VERSION}" --index-url https://download.pytorch.org/whl/cpu
  fi
fi
"$PY" -m pip install -e ".[test]"
