"""OpenVINO GenAI as a bench peer: `openvino_genai.Text2ImagePipeline` on optimum-intel's OpenVINO export of the
bundle's checkpoint, in a virtual environment of its own (benchmarks/setup_openvino.sh), in three variants.

The export folder holds one sub-folder per variant, as setup_openvino.sh lays them out. By default it lies beside the
first bundle and is named after the bundle's source checkpoint (bundles/sd-turbo-openvino for every sd-turbo
bundle), since fp32 and int8 bundles of one checkpoint share it.
"""

from __future__ import annotations

from pathlib import Path

# peer name -> the export's sub-folder: fp32 (--weight-format fp32), weight-only int8 (the exporter's int8 mode),
# full static int8 (the U-Net's activations too; benchmarks/openvino_quantize.py)
OPENVINO_PEERS = {"openvino": "fp32", "openvino-int8w": "int8w", "openvino-int8": "int8"}
DEFAULT_OPENVINO_PYTHON = Path("benchmarks/.venv-openvino/bin/python")
SETUP = "benchmarks/setup_openvino.sh"


def default_export(bundle: Path, source: str) -> Path:
    return bundle.parent / f"{Path(source).name}-openvino"


def openvino_spec(peer: str, bundle: Path, manifest, settings, notes: list[str]) -> dict | None:
    """The worker spec for one OpenVINO peer (settings: the harness's Settings), or None with one note saying why
    it is skipped."""
    python = settings.openvino_python
    folder = (settings.openvino_model or default_export(bundle, manifest.provenance.source)) / OPENVINO_PEERS[peer]
    if not Path(python).is_file():
        notes.append(f"{peer}: not installed (no {python}; make it with {SETUP}); skipped")
        return None
    if not (folder / "model_index.json").is_file():
        notes.append(f"{peer}: no OpenVINO export at {folder} (make it with {SETUP}); skipped")
        return None
    # static shapes for the first configuration, as OpenVINO's own samples and FastSD compile them; the worker
    # recompiles (in the unmeasured warm-up) when a later configuration's batch differs
    return {"engine": "openvino", "model": str(folder), "threads": settings.threads, "static": True,
            "width": settings.width, "height": settings.height, "batch": settings.batches[0],
            "guidance": manifest.defaults.guidance_scale}
