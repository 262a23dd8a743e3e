"""Optimisation profiles: the min / opt / max shape of every dynamic input, from the manifest and a request.

The manifest states each dynamic axis's range (`Component.axes`, images per call as exported); a build may narrow
them: one size (`--size`: a static engine, whose steps can be replayed as a CUDA graph), a size range, one batch
or a largest batch. A request outside what the bundle was exported for is refused: the manifest is the contract.

CFG: a render above guidance 1 feeds the text encoders and the U-Net its negatives beside its prompts, one call of
twice the batch (runtime/plan.py `uses_cfg`, the bundle's default guidance). Their batch range is doubled for a
bundle whose default guidance uses CFG (its min kept, so a guidance-1 render still fits a dynamic engine); an LCM
bundle with a guidance embedding does not double.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..bundle import AxisRange, BundleError, Component, Manifest
from ..runtime.engines import ShapeRange
from ..runtime.plan import uses_cfg

DENOISERS = ("unet", "transformer")
PIXEL_AXES = {"width": 0, "height": 1}  # index into a (width, height) size
LATENT_AXES = {"latent_width": 0, "latent_height": 1}

Size = tuple[int, int]  # (width, height) in pixels, as --size WxH


@dataclass(frozen=True)
class BuildRequest:
    """What a build asks beyond the manifest: image sizes (min, opt, max) and a batch range; None keeps the
    manifest's."""

    sizes: tuple[Size, Size, Size] | None = None
    batch: AxisRange | None = None

    @classmethod
    def make(cls, *, size: Size | None = None, min_size: Size | None = None, opt_size: Size | None = None,
             max_size: Size | None = None, batch: int | None = None, max_batch: int | None = None) -> BuildRequest:
        ranged = (min_size, opt_size, max_size)
        if size is not None and any(ranged):
            raise BundleError("give either --size or --min-size/--opt-size/--max-size, not both")
        if batch is not None and max_batch is not None:
            raise BundleError("give either --batch or --max-batch, not both")
        sizes: tuple[Size, Size, Size] | None = (size, size, size) if size is not None else None
        if any(ranged):
            if not (min_size and max_size):
                raise BundleError("a size range needs --min-size and --max-size (and optionally --opt-size)")
            sizes = (min_size, opt_size or max_size, max_size)
            for i in (0, 1):
                if not sizes[0][i] <= sizes[1][i] <= sizes[2][i]:
                    raise BundleError(f"sizes not in order: min {_wxh(sizes[0])}, opt {_wxh(sizes[1])}, "
                                      f"max {_wxh(sizes[2])}")
        for n in (batch, max_batch):
            if n is not None and n < 1:
                raise BundleError(f"batch {n}: give a positive number of images")
        ranges = AxisRange(batch, batch, batch) if batch else AxisRange(1, 1, max_batch) if max_batch else None
        return cls(sizes, ranges)


def _wxh(size: Size) -> str:
    return f"{size[0]}x{size[1]}"


def doubles_batch(manifest: Manifest, name: str) -> bool:
    """Whether the component takes prompts and negatives in one call under the bundle's default guidance."""
    cfg_components = {e.component for e in manifest.text_encoders} | set(DENOISERS)
    return name in cfg_components and uses_cfg(manifest, manifest.defaults.guidance_scale)


def axis_ranges(manifest: Manifest, name: str, request: BuildRequest) -> dict[str, AxisRange]:
    """The component's dynamic axes after the request (checked against the manifest) and CFG doubling."""
    component = manifest.components[name]
    ranges = dict(component.axes)
    for axis, exported in component.axes.items():
        asked = _asked(manifest, axis, request)
        if asked is None:
            continue
        if asked.min < exported.min or asked.max > exported.max:
            scale = manifest.latent.downscale if axis in LATENT_AXES else 1  # said in pixels, as asked
            what = f"{axis.removeprefix('latent_')} in pixels" if axis != "batch" else axis
            raise BundleError(f"{name}: {what} {_range_text(asked, scale)} asked, the bundle was exported for "
                              f"{_range_text(exported, scale)}; build within that, or re-export")
        ranges[axis] = asked
    if "batch" in ranges and doubles_batch(manifest, name):
        b = ranges["batch"]
        ranges["batch"] = AxisRange(b.min if b.min != b.max else 2 * b.min, 2 * b.opt, 2 * b.max)
    return ranges


def _asked(manifest: Manifest, axis: str, request: BuildRequest) -> AxisRange | None:
    if axis == "batch":
        return request.batch
    if request.sizes is None or (axis not in PIXEL_AXES and axis not in LATENT_AXES):
        return None
    scale = 1 if axis in PIXEL_AXES else manifest.latent.downscale
    i = PIXEL_AXES.get(axis, LATENT_AXES.get(axis, 0))
    for size in request.sizes:
        if size[i] % manifest.size_multiple:
            raise BundleError(f"size {_wxh(size)}: sides must be multiples of {manifest.size_multiple} for this "
                              "bundle")
    low, opt, high = (size[i] // scale for size in request.sizes)
    return AxisRange(low, opt, high)


def _range_text(r: AxisRange, scale: int = 1) -> str:
    return str(r.min * scale) if r.min == r.max else f"{r.min * scale}..{r.max * scale}"


def component_profile(manifest: Manifest, name: str, request: BuildRequest) -> dict[str, ShapeRange]:
    """min / opt / max shape of each dynamic input of the component (fixed inputs need no profile)."""
    component: Component = manifest.components[name]
    ranges = axis_ranges(manifest, name, request)
    profile = {}
    for spec in component.inputs:
        if all(isinstance(d, int) for d in spec.shape):
            continue
        dims = [AxisRange(d, d, d) if isinstance(d, int) else ranges[d] for d in spec.shape]
        profile[spec.name] = ShapeRange(tuple(r.min for r in dims), tuple(r.opt for r in dims),
                                        tuple(r.max for r in dims))
    return profile


def bundle_profiles(manifest: Manifest, request: BuildRequest) -> dict[str, dict[str, ShapeRange]]:
    return {name: component_profile(manifest, name, request) for name in manifest.components}


def precision_line(manifest: Manifest) -> str:
    """What `edgediff build` says about precision: the engines take the bundle's, which only an export changes."""
    by = {name: c.precision for name, c in manifest.components.items()}
    kinds = set(by.values())
    stated = next(iter(kinds)) if len(kinds) == 1 else ", ".join(f"{n} {p}" for n, p in by.items())
    return (f"precision: {stated}, as exported (TensorRT builds strongly typed: fp16 casts and int8 QDQ come "
            "from the ONNX); for another precision re-export with `edgediff export --precision`")
