"""Engine manifest: round trip, cache keys, and every mismatch explained with the rebuild command."""

from __future__ import annotations

import dataclasses

import pytest

from sdrt.runtime.engine_manifest import (
    BuildFlags,
    EngineEnv,
    EngineManifest,
    EngineRecord,
    ProfileShapes,
    TensorShapes,
    build_mismatches,
    cache_key,
    check_engine,
    env_mismatches,
)
from sdrt.runtime.errors import ArtifactError, CompatibilityError, InputError

ENV = EngineEnv("tensorrt", "10.13.0.35", "NVIDIA H100 80GB HBM3", "9.0")
SHAPES = (TensorShapes("sample", (2, 4, 64, 64), (2, 4, 64, 64), (2, 4, 64, 64)),
          TensorShapes("timestep", (2,), (2,), (2,)))
CMD = "sdrt build /x/onnx --out /x/engines --profile sd15-512"


DEFAULT_FLAGS = BuildFlags()


def _record(env: EngineEnv = ENV, flags: BuildFlags = DEFAULT_FLAGS, **kw) -> EngineRecord:
    fields = {"component": "unet", "file": "unet.engine", "precision": "fp16", "shapes": SHAPES, "flags": flags,
              "onnx_sha256": "ab" * 32, "env": env, "size_bytes": 10}
    fields.update(kw)
    key = cache_key(fields["component"], fields["onnx_sha256"], fields["precision"], fields["shapes"],
                    fields["flags"], fields["env"])
    return EngineRecord(cache_key=key, **fields)


def _manifest(*records: EngineRecord) -> EngineManifest:
    prof = ProfileShapes((1, 1, 1), (512, 512, 512), (512, 512, 512))
    return EngineManifest("sd15-512", prof, records or (_record(),), "/x/onnx", CMD)


def test_round_trip(tmp_path) -> None:
    m = _manifest(_record(flags=BuildFlags(refittable=True, workspace_bytes=1 << 30)))
    m.write(tmp_path)
    assert EngineManifest.read(tmp_path) == m


def test_missing_or_corrupt_manifest(tmp_path) -> None:
    with pytest.raises(ArtifactError, match="sdrt build ONNX_DIR"):
        EngineManifest.read(tmp_path)
    (tmp_path / "sdrt-engines.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="rebuild"):
        EngineManifest.read(tmp_path)


def test_newer_schema_is_refused(tmp_path) -> None:
    import json

    d = json.loads(_manifest().to_json())
    d["schema"] = 99
    with pytest.raises(CompatibilityError, match="newer"):
        EngineManifest.from_dict(d)


def test_a_t5_range_raises_the_schema_and_a_folder_without_one_stays_readable_by_older_sdrt(tmp_path) -> None:
    """A folder whose profile records a T5 range is written as schema 3 (an sdrt that reads only 2 would ignore the
    range and feed its engines the default length: it refuses the folder as newer instead); one without stays
    schema 2. This sdrt reads both back as written."""
    import json

    plain = _manifest()
    ranged = dataclasses.replace(plain, profile=dataclasses.replace(plain.profile, t5_tokens=(32, 64, 128)))
    assert json.loads(plain.to_json())["schema"] == 2
    assert json.loads(ranged.to_json())["schema"] == 3
    for m in (plain, ranged):
        m.write(tmp_path)
        assert EngineManifest.read(tmp_path) == m


def test_a_schema_1_folder_is_refused_with_the_command_that_rebuilds_it(tmp_path) -> None:
    """A folder built by an older sdrt (schema 1: without the small device graphs) is refused by name, with its
    own build command; the build itself still reads it, to reuse its engines, whose cache keys are unchanged."""
    import hashlib
    import json

    m = _manifest()
    d = json.loads(m.to_json())
    assert d["schema"] == 2
    d["schema"] = 1
    (tmp_path / "sdrt-engines.json").write_text(json.dumps(d))
    with pytest.raises(CompatibilityError) as e:
        EngineManifest.read(tmp_path)
    msg = str(e.value)
    assert str(tmp_path) in msg and "older sdrt" in msg and "device-side graphs" in msg and CMD in msg
    assert EngineManifest.read(tmp_path, allow_old=True) == dataclasses.replace(m, schema=1)
    # no recorded command (a hand-edited manifest): the command from the export folder it records
    del d["build_command"]
    with pytest.raises(CompatibilityError, match=f"sdrt build /x/onnx --out {tmp_path}"):
        EngineManifest.from_dict(d, folder=tmp_path)
    # the key an older sdrt wrote for the same engine (its payload, schema 1, by hand): the rebuild reuses it
    r = _record()
    payload = {"schema": 1, "component": r.component, "onnx_sha256": r.onnx_sha256, "precision": r.precision,
               "shapes": [dataclasses.asdict(s) for s in r.shapes], "flags": dataclasses.asdict(r.flags),
               "env": dataclasses.asdict(r.env)}
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
    assert r.cache_key == hashlib.sha256(blob).hexdigest()


def test_cache_key_changes_with_every_field() -> None:
    base = _record()
    variants = [
        _record(onnx_sha256="cd" * 32),
        _record(precision="fp32"),
        _record(shapes=SHAPES[:1]),
        _record(component="vae_decoder"),
        _record(env=dataclasses.replace(ENV, version="10.14.0")),
        _record(env=dataclasses.replace(ENV, gpu_name="NVIDIA A100")),
        _record(env=dataclasses.replace(ENV, compute_capability="8.0")),
        _record(env=dataclasses.replace(ENV, backend="tensorrt_rtx")),
    ]
    for f in dataclasses.fields(BuildFlags):
        value = getattr(BuildFlags(), f.name)
        new = {bool: lambda v: not v, int: lambda v: v + 1, str: lambda v: "ampere_plus"}.get(type(value),
                                                                                             lambda v: 123)(value)
        variants.append(_record(flags=dataclasses.replace(BuildFlags(), **{f.name: new})))
    keys = {v.cache_key for v in variants}
    assert base.cache_key not in keys and len(keys) == len(variants)
    assert _record().cache_key == base.cache_key  # deterministic


def test_same_environment_loads() -> None:
    check_engine(_manifest(), ENV)


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        (dataclasses.replace(ENV, version="10.14.1.1"), "built with TensorRT 10.13.0.35, this is TensorRT 10.14.1.1"),
        (dataclasses.replace(ENV, backend="tensorrt_rtx"), "built for tensorrt, but this runtime uses tensorrt_rtx"),
        (dataclasses.replace(ENV, compute_capability="8.9", gpu_name="NVIDIA L4"), "compute capability 9.0"),
        (dataclasses.replace(ENV, gpu_name="NVIDIA H200"), "built on NVIDIA H100 80GB HBM3, this GPU is NVIDIA H200"),
    ],
)
def test_each_environment_mismatch_is_explained(env: EngineEnv, needle: str) -> None:
    with pytest.raises(CompatibilityError) as e:
        check_engine(_manifest(), env)
    assert needle in str(e.value)
    assert CMD in str(e.value)  # the command that rebuilds it


def test_every_mismatch_is_listed_at_once() -> None:
    env = EngineEnv("tensorrt", "10.9.0", "NVIDIA A100", "8.0")
    with pytest.raises(CompatibilityError) as e:
        check_engine(_manifest(), env)
    text = str(e.value)
    assert "TensorRT 10.13.0.35" in text and "compute capability 9.0" in text and "NVIDIA A100" in text


def test_version_compatible_engines_run_on_later_tensorrt_of_the_same_major() -> None:
    rec = _record(flags=BuildFlags(version_compatible=True))
    assert env_mismatches(rec, dataclasses.replace(ENV, version="10.15.1")) == []
    assert env_mismatches(rec, dataclasses.replace(ENV, version="10.2.0"))  # older
    assert env_mismatches(rec, dataclasses.replace(ENV, version="11.0.0"))  # another major


def test_hardware_compatible_engines_run_on_ampere_and_newer() -> None:
    rec = _record(flags=BuildFlags(hardware_compatibility="ampere_plus"))
    assert env_mismatches(rec, dataclasses.replace(ENV, gpu_name="NVIDIA A10", compute_capability="8.6")) == []
    bad = env_mismatches(rec, dataclasses.replace(ENV, gpu_name="Tesla T4", compute_capability="7.5"))
    assert bad and "needs 8.0 or newer" in bad[0]


def test_unknown_gpu_is_not_compared() -> None:
    assert env_mismatches(_record(), dataclasses.replace(ENV, gpu_name=None, compute_capability=None)) == []


def test_missing_and_truncated_engine_files(tmp_path) -> None:
    m = _manifest()
    with pytest.raises(CompatibilityError, match="unet.engine is missing"):
        check_engine(m, ENV, folder=tmp_path)
    (tmp_path / "unet.engine").write_bytes(b"12345")
    with pytest.raises(CompatibilityError, match="5 bytes, the manifest says 10"):
        check_engine(m, ENV, folder=tmp_path)
    (tmp_path / "unet.engine").write_bytes(b"0123456789")
    check_engine(m, ENV, folder=tmp_path)
    with pytest.raises(CompatibilityError, match="vae_decoder: no engine"):
        check_engine(m, ENV, components=["unet", "vae_decoder"])


def test_build_mismatches_name_each_difference() -> None:
    old = _record()
    assert build_mismatches(old, _record()) == []
    assert "ONNX graph changed" in build_mismatches(old, _record(onnx_sha256="cd" * 32))[0]
    assert "precision fp16 -> fp32" in build_mismatches(old, _record(precision="fp32"))[0]
    assert "profile shapes differ: timestep [2]/[2]/[2] -> absent" in build_mismatches(old, _record(shapes=SHAPES[:1]))[0]
    assert "refittable False -> True" in build_mismatches(old, _record(flags=BuildFlags(refittable=True)))[0]
    assert "refitted weights" in build_mismatches(dataclasses.replace(old, weights="lora a:0.8"), _record())[0]


def test_profile_shapes_round_trip() -> None:
    p = ProfileShapes((1, 1, 4), (256, 512, 1024), (256, 512, 1024), (1, 1, 3), True)
    assert ProfileShapes.from_dict(dataclasses.asdict(p)) == p
    t5 = dataclasses.replace(p, t5_tokens=(128, 256, 512))
    assert ProfileShapes.from_dict(dataclasses.asdict(t5)) == t5


def test_the_t5_range_checks_a_call_and_an_older_folder_means_the_default() -> None:
    """A recorded T5 range takes a call's length inside it and refuses one outside, naming the range, the keyword
    (the flag on the command line) and a rebuild covering it; a folder that records none (built before the range
    was recorded, or with the family's default) takes the family's default length alone."""
    old = {"batch": [1, 1, 1], "height": [512, 512, 512], "width": [512, 512, 512], "chunks": [1, 1, 1], "cfg": True}
    legacy = ProfileShapes.from_dict(old)
    assert legacy.t5_tokens is None and legacy.t5_range(256) == (256, 256, 256) and "T5" not in legacy.describe()
    legacy.check_t5_tokens(256, 256)
    with pytest.raises(InputError, match=r"max_sequence_length 64 is outside the T5 tokens per prompt these engines "
                                         r"were built for \(256\): give max_sequence_length 256, or rebuild .*"
                                         r"--t5-tokens 64:256:256") as e:
        legacy.check_t5_tokens(64, 256)
    assert e.value.for_cli().startswith("--max-sequence-length 64 is outside")
    ranged = ProfileShapes.from_dict({**old, "t5_tokens": [128, 256, 384]})
    assert ranged.t5_tokens == (128, 256, 384) and not ranged.static
    assert "T5 tokens 128..384 (opt 256)" in ranged.describe()
    for n in (128, 200, 384):
        ranged.check_t5_tokens(n, 512)
    with pytest.raises(InputError, match=r"max_sequence_length 512 \(the model's default where a call gives none\) "
                                         r"is outside .* \(128\.\.384\): give max_sequence_length from 128 to 384, "
                                         r"or rebuild .*--t5-tokens 128:256:512"):
        ranged.check_t5_tokens(512, 512)
    with pytest.raises(InputError, match=r"--t5-tokens 100:256:384"):
        ranged.check_t5_tokens(100, 512)


def test_tensorrt_for_rtx_engines_are_portable_across_gpus() -> None:
    """TensorRT for RTX compiles for every GPU of compute capability 8.0+ (even on a machine without one) and
    specializes at load: another GPU, or none recorded at build time, is no mismatch; an older GPU is."""
    built = EngineEnv("tensorrt_rtx", "1.7.1.116", None, None)  # built without a GPU
    m = dataclasses.replace(_manifest(), engines=(_record(env=built),))
    check_engine(m, EngineEnv("tensorrt_rtx", "1.7.1.116", "NVIDIA GeForce RTX 4090", "8.9"))
    check_engine(dataclasses.replace(m, engines=(_record(env=dataclasses.replace(
        built, gpu_name="NVIDIA RTX A6000", compute_capability="8.6")),)), EngineEnv(
        "tensorrt_rtx", "1.7.1.116", "NVIDIA GeForce RTX 5090", "12.0"))
    with pytest.raises(CompatibilityError, match="compute capability 8.0 or newer; this GPU has 7.5"):
        check_engine(m, EngineEnv("tensorrt_rtx", "1.7.1.116", "NVIDIA GeForce RTX 2080 Ti", "7.5"))
    with pytest.raises(CompatibilityError, match="this is TensorRT 1.8.0"):
        check_engine(m, EngineEnv("tensorrt_rtx", "1.8.0", "NVIDIA GeForce RTX 4090", "8.9"))


def test_requests_without_guidance_on_cfg_engines_and_the_reverse() -> None:
    cfg = ProfileShapes((1, 1, 2), (512, 512, 512), (512, 512, 512))  # UNet rows 2..4
    cfg.check_request(1, 512, 512, guided=True)
    cfg.check_request(2, 512, 512, guided=False)  # 2 rows: inside 2..4
    with pytest.raises(InputError, match=r"at 1 rows, but these engines were built for classifier-free guidance "
                                         r"\(2\.\.4 rows\).*--no-cfg"):
        cfg.check_request(1, 512, 512, guided=False)
    plain = dataclasses.replace(cfg, batch=(1, 1, 2), cfg=False)  # UNet rows 1..2
    plain.check_request(1, 512, 512, guided=False)
    plain.check_request(1, 512, 512, guided=True)  # 2 rows
    with pytest.raises(InputError, match=r"2 x 2 rows, but these engines were built without classifier-free "
                                         r"guidance \(--no-cfg: 1\.\.2 rows\)"):
        plain.check_request(2, 512, 512, guided=True)
    cfg.check_request(1, 512, 512)  # guided unknown: only the ranges
