"""edgediff: text-to-image diffusion on ONNX Runtime, driven by NumPy; no PyTorch at run time."""

__version__ = "0.1.0"

from .bundle import BundleError, load_manifest as load_bundle  # noqa: E402
from .runtime.pipeline import Pipeline, PipelineOutput  # noqa: E402

__all__ = ["Pipeline", "PipelineOutput", "BundleError", "load_bundle", "__version__"]
