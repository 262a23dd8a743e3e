#!/usr/bin/env bash
# The GPU check, for a lent GPU machine (one H200: PyTorch with CUDA, onnx and onnxruntime's CPU build present;
# diffusers not). Meant to finish in under 4 minutes. Run from anywhere:
#
#     bash benchmarks/gpu/check.sh            # results under $OUT (or /tmp/edgediff-gpu)
#
# 1. installs from benchmarks/gpu/wheels/ if present (no network): onnxruntime-gpu in place of onnxruntime (its
#    wheel may come in parts, NAME.whl.part-aa, -ab, …, joined here), diffusers and whatever else is carried;
# 2. `edgediff info --runtime`: the onnxruntime distribution and providers;
# 3. tiny fixtures (sd1, sdxl): fp32 and fp16 bundles; each fp16 component on CUDA against the fp32 one on the
#    CPU within the fp16 bundle's recorded gate, then a whole render through the I/O binding;
# 4. the full-size SD-Turbo architecture (random weights): an fp16 bundle, timed at 512², 1 and 4 steps, per
#    stage, on the cuda backend against diffusers' fp16 CUDA pipeline (`edgediff bench --compare diffusers-cuda`);
# 5. where TensorRT's libraries load: the same parity on ort-tensorrt, and (ORT_TRT_FULL=1, the U-Net's engine
#    build takes minutes) the full-size bench on it too.
set -euo pipefail

cd "$(dirname "$0")/../.."
ROOT=$PWD
OUT=${OUT:-/tmp/edgediff-gpu}
WORK=${WORK:-/tmp/edgediff-gpu-work}
WHEELS=benchmarks/gpu/wheels
PY=${PYTHON:-python}
mkdir -p "$OUT" "$WORK"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
START=$SECONDS
FAILED=0

phase() { echo "== [$((SECONDS - START)) s] $*" | tee -a "$OUT/log.txt"; }
run() { "$@" 2>&1 | tee -a "$OUT/log.txt"; return "${PIPESTATUS[0]}"; }

phase "install"
if [ -d "$WHEELS" ]; then
  shopt -s nullglob
  for first in "$WHEELS"/*.whl.part-aa; do
    wheel=${first%.part-aa}
    [ -f "$wheel" ] || cat "$wheel".part-* > "$wheel"
  done
  wheels=("$WHEELS"/*.whl)
  shopt -u nullglob
  if ls "$WHEELS"/onnxruntime_gpu-*.whl > /dev/null 2>&1; then
    run "$PY" -m pip uninstall -y onnxruntime
  fi
  if [ "${#wheels[@]}" -gt 0 ]; then
    run "$PY" -m pip install --no-index --no-deps "${wheels[@]}"
  fi
fi
# onnxruntime-gpu loads CUDA and cuDNN by name: torch's pip-installed NVIDIA libraries serve
NVIDIA_LIBS=$("$PY" - <<'EOF'
import glob, os, site
dirs = [d for s in site.getsitepackages() for d in glob.glob(os.path.join(s, "nvidia", "*", "lib"))]
dirs += [d for s in site.getsitepackages() for d in glob.glob(os.path.join(s, "tensorrt_libs"))]
print(":".join(dirs))
EOF
)
export LD_LIBRARY_PATH="$NVIDIA_LIBS${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
run "$PY" - <<'EOF'
import importlib
missing = [m for m in ("numpy", "onnxruntime", "tokenizers", "PIL", "click", "tqdm", "torch", "onnx", "diffusers",
                       "transformers", "safetensors") if importlib.util.find_spec(m) is None]
print("missing modules:", ", ".join(missing) if missing else "none")
EOF

phase "runtime"
run "$PY" -m edgediff.cli info --runtime
BACKENDS=cuda
if "$PY" -c "import ctypes; ctypes.CDLL('libnvinfer.so.10')" 2> /dev/null; then
  BACKENDS=cuda,ort-tensorrt
fi
phase "backends to check: $BACKENDS"

phase "tiny fixtures"
for family in sd1 sdxl; do
  ck=$WORK/ck-$family
  [ -d "$ck" ] || run "$PY" -c "import sys; sys.path.insert(0, 'tests'); import tiny_pipelines as t; \
from pathlib import Path; t.build('$family', Path('$ck'))"
  for precision in fp32 fp16; do
    run "$PY" -m edgediff.cli export "$ck" "$WORK/$family-$precision" --precision "$precision" --force
  done
  for backend in ${BACKENDS//,/ }; do
    run timeout 300 "$PY" benchmarks/gpu/parity.py "$WORK/$family-fp32" "$WORK/$family-fp16" --backend "$backend" \
      --json "$OUT/parity-$family-$backend.json" || FAILED=1
  done
done

phase "SD-Turbo, full size, fp16"
CK=$WORK/ck-sd-turbo
B16=$WORK/sd-turbo-fp16
[ -d "$CK" ] || run "$PY" benchmarks/make_checkpoints.py sd-turbo "$CK"
[ -d "$B16" ] || run timeout 300 "$PY" -m edgediff.cli export "$CK" "$B16" --preset turbo --precision fp16
BENCH_BACKENDS=cuda
if [ "${ORT_TRT_FULL:-0}" = 1 ] && [ "$BACKENDS" != cuda ]; then
  BENCH_BACKENDS=cuda,ort-tensorrt
fi
phase "bench: $BENCH_BACKENDS against diffusers-cuda"
run timeout 300 "$PY" -m edgediff.cli bench "$B16" --size 512x512 --steps 1,4 --runs 3 --warmup 2 \
  --backend "$BENCH_BACKENDS" --compare diffusers-cuda --json "$OUT/bench-sd-turbo-fp16-gpu.json" || FAILED=1

phase "done (failed: $FAILED)"
exit "$FAILED"
