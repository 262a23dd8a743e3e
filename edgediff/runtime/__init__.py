"""The runtime: NumPy, ONNX Runtime, tokenizers and Pillow. It never imports torch, diffusers or transformers."""
