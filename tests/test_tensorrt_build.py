"""`edgediff build` without a GPU: profiles from manifests of every family and from requests, engine keys and the
engine chosen for a request, and the build itself (atomic, resumable) against tests/fake_tensorrt.py."""

from __future__ import annotations

import json
import subprocess
import sys

import fake_tensorrt
import pytest
from click.testing import CliRunner

from edgediff.build.profiles import BuildRequest, bundle_profiles, component_profile, doubles_batch
from edgediff.build.tensorrt import BuildOptions, build_engines
from edgediff.bundle import BundleError, read_manifest
from edgediff.cli import main
from edgediff.models import BUILTIN_BUNDLE
from edgediff.runtime import engines
from edgediff.runtime.engines import EngineEntry, Machine, ShapeRange

H100 = Machine("9.0", "10.8.0.43")


def r(lo, opt, hi):
    return ShapeRange(tuple(lo), tuple(opt), tuple(hi))


# --- profiles -----------------------------------------------------------------------------------------------------

def test_builtin_profiles_follow_the_manifest_and_lcm_does_not_double():
    m = read_manifest(BUILTIN_BUNDLE)
    p = bundle_profiles(m, BuildRequest())
    assert not doubles_batch(m, "unet")  # LCM guidance embedding: no CFG batch
    assert p["text_encoder"] == {"input_ids": r((1, 20), (1, 20), (8, 20))}
    assert p["unet"]["sample"] == r((1, 4, 4, 4), (1, 4, 8, 8), (8, 4, 16, 16))
    assert p["unet"]["timestep_cond"] == r((1, 128), (1, 128), (8, 128))
    assert p["vae_decoder"] == {"latent_sample": r((1, 4, 4, 4), (1, 4, 8, 8), (8, 4, 16, 16))}
    assert p["vae_encoder"] == {"sample": r((1, 3, 16, 16), (1, 3, 32, 32), (8, 3, 64, 64))}


def test_size_and_batch_requests_narrow_the_profile():
    m = read_manifest(BUILTIN_BUNDLE)
    static = BuildRequest.make(size=(48, 32), batch=2)
    assert component_profile(m, "unet", static)["sample"] == r((2, 4, 8, 12), (2, 4, 8, 12), (2, 4, 8, 12))
    assert component_profile(m, "vae_encoder", static)["sample"] == r((2, 3, 32, 48), (2, 3, 32, 48), (2, 3, 32, 48))
    ranged = BuildRequest.make(min_size=(16, 16), opt_size=(32, 24), max_size=(64, 32), max_batch=4)
    assert component_profile(m, "unet", ranged)["sample"] == r((1, 4, 4, 4), (1, 4, 6, 8), (4, 4, 8, 16))


@pytest.mark.parametrize("kwargs, words", [
    ({"size": (128, 128)}, "exported for 16..64"),
    ({"size": (36, 32)}, "multiples of 8"),
    ({"size": (32, 32), "max_size": (64, 64)}, "either --size"),
    ({"batch": 1, "max_batch": 2}, "either --batch"),
    ({"min_size": (64, 64), "max_size": (32, 32)}, "not in order"),
    ({"batch": 0}, "positive"),
])
def test_impossible_requests_are_refused_in_one_line(kwargs, words):
    m = read_manifest(BUILTIN_BUNDLE)
    with pytest.raises(BundleError, match=words) as e:
        bundle_profiles(m, BuildRequest.make(**kwargs))
    assert "\n" not in str(e.value)


def test_sd1_cfg_bundle_doubles_the_unet_and_text_encoder_batch(bundle):
    m = read_manifest(bundle("sd1"))
    assert doubles_batch(m, "unet") and doubles_batch(m, "text_encoder") and not doubles_batch(m, "vae_decoder")
    p = bundle_profiles(m, BuildRequest())
    batch = m.components["unet"].axes["batch"]
    assert p["unet"]["sample"].min[0] == batch.min and p["unet"]["sample"].max[0] == 2 * batch.max
    assert p["vae_decoder"]["latent_sample"].max[0] == batch.max
    one = bundle_profiles(m, BuildRequest.make(batch=1, size=(32, 32)))
    assert one["unet"]["sample"].static and one["unet"]["sample"].min[0] == 2
    assert one["text_encoder"]["input_ids"].min[0] == 2 and one["vae_decoder"]["latent_sample"].min[0] == 1


def test_sdxl_profiles_cover_both_encoders_and_the_added_conditions(bundle):
    m = read_manifest(bundle("sdxl"))
    p = bundle_profiles(m, BuildRequest.make(batch=1))
    assert {"text_encoder", "text_encoder_2", "unet"} <= set(p)
    assert p["text_encoder_2"]["input_ids"].min[0] == 2
    assert {"sample", "encoder_hidden_states", "text_embeds", "time_ids"} <= set(p["unet"])
    assert all(s.min[0] == 2 for s in p["unet"].values() if s.min)


# --- keys and the choice of engine ---------------------------------------------------------------------------------

def test_engine_keys_carry_gpu_version_precision_and_profile():
    m = read_manifest(BUILTIN_BUNDLE)
    unet = m.components["unet"]
    p = component_profile(m, "unet", BuildRequest())
    key = engines.engine_key("unet", unet, H100, p)
    assert key.startswith("unet.fp32.sm90.trt10.8.0.43.")
    others = {engines.engine_key("unet", unet, Machine("8.6", "10.8.0.43"), p),
              engines.engine_key("unet", unet, Machine("9.0", "11.0.0.1"), p),
              engines.engine_key("unet", unet, H100, component_profile(m, "unet", BuildRequest.make(batch=1))),
              engines.engine_key("unet", unet, H100, p, weight_streaming=True)}
    assert key not in others and len(others) == 4


def entry(profile, **kw):
    return EngineEntry(component="unet", file="x.plan", precision="fp32", compute_capability="9.0",
                       tensorrt="10.8.0.43", graph="g", profile=profile, **kw)


def test_the_engine_for_a_request_is_a_covering_one_static_first_then_tightest():
    dynamic = entry({"sample": r((1, 4, 4, 4), (1, 4, 8, 8), (8, 4, 16, 16))})
    small = entry({"sample": r((1, 4, 4, 4), (1, 4, 8, 8), (2, 4, 8, 8))})
    static = entry({"sample": r((1, 4, 8, 8), (1, 4, 8, 8), (1, 4, 8, 8))})
    pool = [dynamic, small, static]
    assert engines.choose(pool, {"sample": (1, 4, 8, 8)}) is static
    assert engines.choose(pool, {"sample": (2, 4, 6, 6)}) is small
    assert engines.choose(pool, {"sample": (8, 4, 16, 12)}) is dynamic
    assert engines.choose(pool, {"sample": (9, 4, 8, 8)}) is None


# --- the build ----------------------------------------------------------------------------------------------------

def test_build_writes_engines_and_their_index_beside_an_untouched_manifest(gpu, builtin_copy):
    manifest_bytes = (builtin_copy / "manifest.json").read_bytes()
    result = CliRunner().invoke(main, ["build", str(builtin_copy), "--size", "32x32", "--workspace", "2"])
    assert result.exit_code == 0, result.output
    assert "precision: fp32, as exported" in result.output and "--precision" in result.output
    index = json.loads((builtin_copy / "engines" / "index.json").read_text())
    assert index["format"] == "edgediff-engines" and index["format_version"] == 1
    listed = index["engines"]
    assert sorted(e["component"] for e in listed.values()) == ["text_encoder", "unet", "vae_decoder", "vae_encoder"]
    for key, e in listed.items():
        assert e["file"] == f"{key}.plan" and (builtin_copy / "engines" / e["file"]).stat().st_size == e["size"]
        assert e["compute_capability"] == "9.0" and e["tensorrt"] == "10.8.0.43" and e["precision"] == "fp32"
    assert (builtin_copy / "manifest.json").read_bytes() == manifest_bytes
    read_manifest(builtin_copy)  # still valid, checksums and all
    trt = sys.modules["tensorrt"]
    for b in gpu.builds:  # strongly typed, no precision flags; the workspace and timing cache as asked
        assert b["flags"] == 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
        assert b["config"].flags == set() and b["config"].pools == {trt.MemoryPoolType.WORKSPACE: 2 << 30}
    assert (builtin_copy / "engines" / "timing.sm90.trt10.8.0.43.cache").read_bytes().count(b";") == 4
    assert not [p for p in (builtin_copy / "engines").iterdir() if ".partial" in p.name]


def test_info_lists_the_engines_a_bundle_holds(gpu, builtin_copy):
    assert "TensorRT engine" not in CliRunner().invoke(main, ["info", str(builtin_copy)]).output
    build_engines(builtin_copy, BuildOptions(BuildRequest.make(size=(32, 32))))
    result = CliRunner().invoke(main, ["info", str(builtin_copy)])
    assert result.exit_code == 0, result.output
    lines = [line.strip() for line in result.output.splitlines() if "TensorRT engine" in line]
    assert len(lines) == 4 and all("fp32" in line and "sm90" in line for line in lines), lines
    assert any(line.startswith("TensorRT engine: unet.fp32.sm90") for line in lines)


def test_a_second_build_skips_what_is_built(gpu, builtin_copy):
    build_engines(builtin_copy)
    again = build_engines(builtin_copy)
    assert all(b.skipped for b in again) and len(gpu.builds) == 4
    other = build_engines(builtin_copy, BuildOptions(BuildRequest.make(size=(32, 32))))
    # the text encoder has no size axis: its engine is the same one
    assert [b.skipped for b in other] == [True, False, False, False] and len(gpu.builds) == 7
    assert len(engines.read_index(builtin_copy / "engines").engines) == 7


def test_an_interrupted_build_keeps_finished_engines_and_resumes(gpu, builtin_copy):
    gpu.fail_build = {"vae_decoder"}
    with pytest.raises(KeyboardInterrupt):
        build_engines(builtin_copy)
    folder = builtin_copy / "engines"
    listed = engines.read_index(folder).engines
    assert sorted(e.component for e in listed.values()) == ["text_encoder", "unet"]
    assert sorted(p.name for p in folder.iterdir() if not p.name.startswith("timing")) == sorted(
        [e.file for e in listed.values()] + ["index.json"])  # no partial file, nothing unlisted
    gpu.fail_build = set()
    resumed = build_engines(builtin_copy)
    assert [b.skipped for b in resumed] == [True, True, False, False]


def test_a_failed_engine_write_leaves_nothing(gpu, builtin_copy, monkeypatch):
    import edgediff.build.tensorrt as build_module

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(build_module, "add_entry", full_disk)
    with pytest.raises(OSError):
        build_engines(builtin_copy)
    folder = builtin_copy / "engines"
    assert not engines.read_index(folder).engines
    assert not [p for p in folder.iterdir() if ".partial" in p.name]


def test_a_read_only_bundle_builds_into_the_user_cache(gpu, builtin_copy, monkeypatch, tmp_path):
    monkeypatch.setattr(engines, "writable", lambda folder: False)
    built = build_engines(builtin_copy)
    cache = tmp_path / "cache" / "edgediff" / "engines" / engines.bundle_id(read_manifest(builtin_copy))
    assert all(b.path.parent == cache for b in built) and (cache / "index.json").is_file()
    assert not (builtin_copy / "engines").exists()
    assert len(engines.engines_for(builtin_copy, read_manifest(builtin_copy), "unet")) == 1


def test_tensorrt_11_builds_strongly_typed_without_the_flag(monkeypatch, tmp_path, builtin_copy):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    gpu = fake_tensorrt.install(monkeypatch, version="11.0.0.7", strongly_typed_flag=False)
    built = build_engines(builtin_copy, BuildOptions(weight_streaming=True))
    assert ".trt11.0.0.7." in built[0].key and all(b["flags"] == 0 for b in gpu.builds)
    trt = sys.modules["tensorrt"]
    assert all(b["config"].flags == {trt.BuilderFlag.WEIGHT_STREAMING} for b in gpu.builds)


@pytest.mark.parametrize("missing, words", [("tensorrt", "TensorRT is not installed"), ("gpu", "no NVIDIA GPU")])
def test_no_tensorrt_or_no_gpu_is_one_line_and_exit_2(monkeypatch, tmp_path, builtin_copy, missing, words):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    gpu = fake_tensorrt.install(monkeypatch)
    if missing == "tensorrt":
        monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt raises ImportError
    else:
        gpu.devices = 0
    result = CliRunner().invoke(main, ["build", str(builtin_copy)])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and words in lines[0] and "Traceback" not in result.output
    assert not (builtin_copy / "engines").exists()


def test_importing_edgediff_needs_neither_tensorrt_nor_cuda_python():
    code = ("import sys, edgediff, edgediff.cli, edgediff.build.tensorrt, edgediff.runtime.backends.tensorrt, "
            "edgediff.runtime.backends.ort; "
            "assert not {'tensorrt', 'cuda'} & set(sys.modules), sorted({'tensorrt', 'cuda'} & set(sys.modules))")
    subprocess.run([sys.executable, "-c", code], check=True)
