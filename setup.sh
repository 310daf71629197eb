#!/usr/bin/env bash
# Installs tokenprune and everything it needs: bash setup.sh
# On a machine without an NVIDIA GPU, PyTorch's CPU build goes in first, so that the package install
# below finds torch satisfied and pulls no CUDA packages (a plain `pip install torch` would).
set -euo pipefail
PY=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
if ! $PY -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    $PY -m pip install "torch==$TORCH_VERSION"
  elif $PY -m pip install --no-deps --no-index "torch==$TORCH_VERSION" 2>/dev/null; then
    # a CPU wheel this machine already has (pip's find-links); its dependencies from the usual index
    $PY -m pip install "torch==$TORCH_VERSION"
  else
    $PY -m pip install "torch==$TORCH_VERSION" --index-url https://download.pytorch.org/whl/cpu \
      --extra-index-url https://pypi.org/simple
  fi
fi
$PY -m pip install -e ".[dev]"
