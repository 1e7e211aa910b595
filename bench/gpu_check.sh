#!/usr/bin/env bash
# The GPU training path in one command: correctness, throughput/MFU with and without fused kernels,
# and Ray Train's overhead. See bench/gpu_check.py for the parts and the figures it prints.
#
#   python bench/gpu_check.py prepare       # once, here: the carried inputs (bench/_gpu)
#   bash bench/gpu_wheels.sh                # once, here: wheels for a GPU machine without them (.whl)
#   bash bench/gpu_check.sh [--out DIR]     # on the GPU machine
#   bash bench/gpu_check.sh --dry-run       # the same steps on CPU with a tiny model
#
# Where Ray or DeepSpeed is missing, the packages the machine lacks travel as wheels in .whl/ and go
# to a private directory first on the path; nothing is installed into the machine's own Python.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import ray, deepspeed" 2>/dev/null && compgen -G ".whl/*.whl" >/dev/null; then
  SITE=${TMPDIR:-/tmp}/agentflan-gpu-site
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
    || { echo '{"part": "setup", "error": "installing the carried wheels failed"}'; exit 1; }
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec "$PY" bench/gpu_check.py "$@"
