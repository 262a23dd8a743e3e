#!/usr/bin/env bash
# OpenVINO GenAI as a benchmark peer, in a virtual environment of its own (optimum-intel pulls its own transformers
# and diffusers, newer or older than edgediff's export extra takes), and optimum-intel's OpenVINO exports of a
# checkpoint in the three variants the peer times:
#
#   bash benchmarks/setup_openvino.sh benchmarks/checkpoints/sd-turbo benchmarks/bundles/sd-turbo-openvino
#
# makes OUT/fp32 (--weight-format fp32), OUT/int8w (weights int8, activations float: the exporter's int8 mode) and
# OUT/int8 (weights and activations int8, calibrated on benchmarks/openvino_quantize.py's own prompts: no hub).
# `edgediff bench BUNDLE --compare openvino,openvino-int8w,openvino-int8 --openvino-model OUT` then times them.
set -euo pipefail
src=${1:?usage: setup_openvino.sh CHECKPOINT_DIR OUT_DIR}
out=${2:?usage: setup_openvino.sh CHECKPOINT_DIR OUT_DIR}
venv=${OPENVINO_VENV:-benchmarks/.venv-openvino}
here=$(cd "$(dirname "$0")" && pwd)
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
    "$venv/bin/python" -m pip install -q --upgrade pip
    "$venv/bin/python" -m pip install -q torch==2.13.0  # the CPU wheel; a bare torch pulls a CUDA build
    # one resolve (openvino-genai pins openvino exactly), with torch held to the CPU wheel: optimum-intel requires
    # torchvision, whose newest release pulls a newer torch (a CUDA build) and whose CUDA-built wheels do not load
    # against the CPU torch; only optimum-intel's vision-language models import it, so it goes again
    "$venv/bin/python" -m pip install -q torch==2.13.0 "torchvision==0.28.*" "optimum-intel[openvino]" openvino-genai diffusers
    "$venv/bin/python" -m pip uninstall -q -y torchvision
fi
# a checkpoint saved by a recent transformers is read through a view whose CLIP weights carry the prefix the
# exporter's transformers expects (openvino_checkpoint.py); without it the text encoder would be random
view=$src
if [ ! -f "$out/fp32/model_index.json" ] || [ ! -f "$out/int8w/model_index.json" ]; then
    view=$("$venv/bin/python" "$here/openvino_checkpoint.py" "$src" "$out/.checkpoint")
fi
ov_export() {  # into a .partial folder first, so that an interrupted export is never taken for a finished one
    [ -f "$out/$1/model_index.json" ] && return 0
    rm -rf "$out/$1.partial"
    # the module, not the optimum-cli script: a script's first line names the venv's path when it was made
    "$venv/bin/python" -m optimum.commands.optimum_cli export openvino --model "$view" --task text-to-image --weight-format "$2" "$out/$1.partial"
    mv "$out/$1.partial" "$out/$1"
}
ov_export fp32 fp32
ov_export int8w int8  # weights int8, activations float: the exporter's own int8 mode
if [ ! -f "$out/int8/model_index.json" ]; then
    "$venv/bin/python" "$here/openvino_quantize.py" "$out/fp32" "$out/int8"
fi
rm -rf "$out/.checkpoint"
echo "$out"
