#!/usr/bin/env bash
# Set up ./.venv with stelab (editable), its test tools and the ONNX export extra
# (so the export tests run rather than skip).
#
# torch is installed first, pinned: on this CPU machine `torch==2.13.0` is the
# CPU build from local disk, while a bare `torch` requirement would pull a
# multi-GB CUDA build. Override with STELAB_TORCH (e.g. "torch==2.13.0+cu126").
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check "${STELAB_TORCH:-torch==2.13.0}"
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[dev,export]"
