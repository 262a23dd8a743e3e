#!/usr/bin/env bash
# Optimum's ONNX Runtime pipeline as a benchmark peer, in a virtual environment of its own (optimum-onnx requires
# transformers < 4.58, older than edgediff's export extra takes), and Optimum's own export of a checkpoint.
#
#   bash benchmarks/setup_optimum.sh benchmarks/checkpoints/sd-turbo benchmarks/bundles/sd-turbo-optimum
#
# `edgediff bench BUNDLE --compare optimum` then finds both (by default BUNDLE-optimum beside BUNDLE).
set -euo pipefail
src=${1:?usage: setup_optimum.sh CHECKPOINT_DIR OUT_DIR}
out=${2:?usage: setup_optimum.sh CHECKPOINT_DIR OUT_DIR}
venv=${OPTIMUM_VENV:-benchmarks/.venv-optimum}
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
    "$venv/bin/python" -m pip install -q --upgrade pip
    "$venv/bin/python" -m pip install -q torch==2.13.0  # the CPU wheel; a bare torch pulls a CUDA build
    "$venv/bin/python" -m pip install -q "optimum-onnx[onnxruntime]" "transformers<4.58" diffusers
fi
if [ ! -f "$out/model_index.json" ]; then
    "$venv/bin/optimum-cli" export onnx --model "$src" --task text-to-image "$out"
fi
echo "$out"
