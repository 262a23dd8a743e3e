"""The export stage (needs the `export` extra: torch, diffusers, transformers, onnx).

This file imports none of them: the command line reads the precisions catalogue from it when it starts."""

# The precisions an export can write (`edgediff export --precision`), with what each means; convert.py and
# precision.py implement them, gate.py states how close each must stay.
PRECISIONS: dict[str, str] = {
    "fp32": "float32 throughout, proven against PyTorch",
    "fp16": "half-precision weights with fp32 islands (normalisations, softmax where it overflows)",
    "int8": "QDQ U-Net and VAE decoder, calibrated on denoising trajectories (text encoder and VAE encoder stay fp32)",
    "int4": "4-bit block-wise MatMul weights (int4 DequantizeLinear) for the transformer and T5 of SD3 / FLUX; the "
    "rest fp32",
}
