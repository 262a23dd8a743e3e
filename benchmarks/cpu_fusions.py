"""Apply onnxruntime's transformer-optimizer fusions that have CPU kernels to a bundle's U-Net graph.

Whether they pay on this CPU is then measured with benchmarks/session_options.py (docs/loading.md):

    python benchmarks/cpu_fusions.py benchmarks/bundles/sd-turbo scratch/fused-unet/model.onnx
    for level in extended all; do
        python benchmarks/session_options.py benchmarks/bundles/sd-turbo unet --level $level --runs 3
        python benchmarks/session_options.py benchmarks/bundles/sd-turbo unet --level $level --runs 3 \\
            --graph scratch/fused-unet/model.onnx
    done

Fusions with CUDA-only kernels in onnxruntime 1.32 (GroupNorm, SkipGroupNorm, NhwcConv, BiasSplitGelu, BiasAdd)
are turned off; what remains fuses self-attention into Attention, cross-attention into MultiHeadAttention and the
LayerNorms (with their residual adds) into LayerNormalization / SkipLayerNormalization.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

CUDA_ONLY = ("enable_group_norm", "enable_skip_group_norm", "enable_nhwc_conv", "enable_bias_splitgelu",
             "enable_bias_add")


def _patch_num_heads(fusion_attention_unet) -> None:
    """onnxruntime 1.32's U-Net attention fusion calls int() on a one-element array, an error in NumPy >= 2.4."""
    original = fusion_attention_unet.FusionAttentionUnet.get_num_heads

    def get_num_heads(self, reshape_q, is_torch2=False):
        parent = self.model.get_parent(reshape_q, 1)
        if is_torch2 and parent is not None and parent.op_type == "Concat" and len(parent.input) == 4:
            value = self.model.get_constant_value(parent.input[2])
            if isinstance(value, np.ndarray) and value.size == 1:
                return int(value.reshape(-1)[0])
        return original(self, reshape_q, is_torch2)

    fusion_attention_unet.FusionAttentionUnet.get_num_heads = get_num_heads


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("bundle", type=Path)
    p.add_argument("out", type=Path, help="the fused graph (its weights go to OUT.data)")
    args = p.parse_args(argv)

    import fusion_attention_unet  # onnxruntime.transformers puts its own folder on sys.path
    import onnxruntime.transformers.optimizer as optimizer
    from onnxruntime.transformers.fusion_options import FusionOptions

    _patch_num_heads(fusion_attention_unet)
    options = FusionOptions("unet")
    for name in CUDA_ONLY:
        setattr(options, name, False)
    options.enable_packed_qkv = options.enable_packed_kv = False
    start = time.perf_counter()
    model = optimizer.optimize_model(str(args.bundle / "unet" / "model.onnx"), model_type="unet", opt_level=0,
                                     optimization_options=options, use_gpu=False)
    print(f"fused in {time.perf_counter() - start:.0f} s: {model.get_fused_operator_statistics()}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    model.save_model_to_file(str(args.out), use_external_data_format=True, all_tensors_to_one_file=True)
    (args.out.parent / (args.out.name + ".data")).chmod(0o644)
    return 0


if __name__ == "__main__":
    sys.exit(main())
