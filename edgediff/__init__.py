"""edgediff: text-to-image diffusion on ONNX Runtime, driven by NumPy; no PyTorch at run time."""

__version__ = "0.1.0"

from .bundle import BundleError  # noqa: E402
from .bundle import load_manifest as load_bundle
from .lora_format import LoraError  # noqa: E402
from .runtime.pipeline import Pipeline, PipelineOutput  # noqa: E402

__all__ = ["Pipeline", "PipelineOutput", "BundleError", "LoraError", "load_bundle", "__version__"]
