"""The export stage (needs the `export` extra: torch, diffusers, transformers, onnx)."""
