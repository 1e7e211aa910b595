#!/usr/bin/env bash
# Wheels for a GPU machine that has PyTorch, transformers and Triton but no Ray, DeepSpeed or Liger
# and no network (the machine bench/gpu_check.sh was written for: Python 3.12, x86-64). They go to
# .whl/ (ignored by git), which the device run carries; gpu_check.sh installs them privately there.
#
#   bash bench/gpu_wheels.sh            # versions: those installed here; GPU_PYTHON=3.11 for another Python
#
# Ray's wheel is 79 MB; its Java jar (32 MB), RLlib and the dashboard's web client are not used by a
# Python training job and are dropped, which brings it to about 43 MB. DeepSpeed is a source
# distribution; its wheel is built here without ops (they compile just in time where needed, and
# the default optimizer, PyTorch's fused AdamW, needs none).
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${DEST:-.whl}
PY=${PYTHON:-python3}
TARGET_PYTHON=${GPU_PYTHON:-3.12}
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64)
version() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }
rm -rf "$DEST" && mkdir -p "$DEST"

binary=(ray pydantic pydantic_core annotated_types typing_inspection typing_extensions jsonschema
        jsonschema_specifications referencing rpds_py hjson tensorboardX)
specs=()
for name in "${binary[@]}"; do specs+=("${name//_/-}==$(version "${name//_/-}")"); done
specs+=("liger-kernel==${LIGER_VERSION:-0.8.5}")
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$TARGET_PYTHON" --implementation cp \
  "${PLATFORMS[@]}" -d "$DEST" "${specs[@]}"
"$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$DEST" "deepspeed==$(version deepspeed)"

# Slim Ray: drop what a Python training job never loads, and fix the RECORD so pip accepts it.
ray_wheel=$(ls "$DEST"/ray-*.whl)
"$PY" - "$ray_wheel" <<'PY'
import sys, zipfile, os
path = sys.argv[1]
drop = ("ray/jars/", "ray/rllib/", "ray/dashboard/client/")
slim = path + ".slim"
with zipfile.ZipFile(path) as src, zipfile.ZipFile(slim, "w", zipfile.ZIP_DEFLATED) as dst:
    for item in src.infolist():
        if item.filename.startswith(drop):
            continue
        data = src.read(item.filename)
        if item.filename.endswith(".dist-info/RECORD"):
            data = b"\n".join(line for line in data.splitlines() if not line.decode().startswith(drop)) + b"\n"
        dst.writestr(item, data)
os.replace(slim, path)
PY
ls -la "$DEST"
du -ch "$DEST"/*.whl | tail -1
