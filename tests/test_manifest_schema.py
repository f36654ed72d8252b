"""The export manifest's schema: each export records the lowest schema that reads it, so an older sdrt refuses,
naming the upgrade, only an export it would misread (a text encoder with an attention mask), and reads the rest."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from sdrt.runtime import manifest as manifest_module
from sdrt.runtime.errors import CompatibilityError
from sdrt.runtime.manifest import MANIFEST_NAME, Component, ExportManifest, TensorSpec
from tests.helpers.models import export_manifest


def _with_text_mask(m: ExportManifest) -> ExportManifest:
    te = m.components["text_encoder"]
    masked = replace(te, inputs=(*te.inputs, TensorSpec("attention_mask", "int32", ("batch", 77))))
    return replace(m, components={**m.components, "text_encoder": masked}, schema=1)


def test_an_export_without_a_text_mask_stays_schema_1() -> None:
    assert export_manifest().schema == 1
    assert json.loads(export_manifest().to_json())["schema"] == 1


def test_a_text_mask_raises_the_schema_to_2_and_it_survives_a_round_trip(tmp_path) -> None:
    m = _with_text_mask(export_manifest())
    assert m.schema == 2
    m.write(tmp_path)
    assert json.loads((tmp_path / MANIFEST_NAME).read_text())["schema"] == 2
    assert ExportManifest.read(tmp_path).schema == 2


def test_a_reader_of_schema_1_refuses_a_masked_export_before_any_graph_runs(tmp_path, monkeypatch) -> None:
    """What an sdrt that knew only schema 1 would do with the new export (its bound, set here): refuse it with the
    upgrade, instead of failing inside the text encoder ("missing inputs ['attention_mask']")."""
    _with_text_mask(export_manifest()).write(tmp_path / "masked")
    export_manifest().write(tmp_path / "plain")
    monkeypatch.setattr(manifest_module, "SCHEMA_VERSION", 1)
    with pytest.raises(CompatibilityError, match=r"schema 2 is newer.*upgrade sdrt"):
        ExportManifest.read(tmp_path / "masked")
    assert ExportManifest.read(tmp_path / "plain").schema == 1  # the rest it reads as before


def test_a_newer_schema_than_this_sdrt_reads_is_refused(tmp_path) -> None:
    doc = json.loads(export_manifest().to_json())
    (tmp_path / MANIFEST_NAME).write_text(json.dumps({**doc, "schema": manifest_module.SCHEMA_VERSION + 1}))
    with pytest.raises(CompatibilityError, match="newer than this sdrt understands"):
        ExportManifest.read(tmp_path)


def test_the_exporter_writes_schema_2_for_masked_clip_encoders(tiny_export) -> None:
    """A real export: the tiny SD 1.5 text encoder takes the mask (compel MASK), so its manifest records 2."""
    m = ExportManifest.read(tiny_export("sd15-tiny"))
    assert any(t.name == "attention_mask" for t in m.components["text_encoder"].inputs)
    assert m.schema == 2


def test_component_inputs_alone_decide(tmp_path) -> None:
    """An input of that name on any component counts (the rule is about what the runtime must feed)."""
    m = export_manifest()
    extra = Component("x/model.onnx", "fp32", (TensorSpec("attention_mask", "int32", ("batch", 77)),), ())
    assert replace(m, components={**m.components, "x": extra}, schema=1).schema == 2


def test_flux_control_latents_need_schema_2_too() -> None:
    """FLUX.1 Depth / Canny's transformer takes the control image's latents, which an sdrt reading 1 would not feed:
    the runtime's own input name is the one the rule knows."""
    from sdrt.runtime.control_latents import CONTROL_INPUT

    assert manifest_module.INPUT_SCHEMAS[CONTROL_INPUT] == 2
    m = export_manifest()
    unet = m.components["unet"]
    control = replace(unet, inputs=(*unet.inputs, TensorSpec(CONTROL_INPUT, "float32", (1, 16, "height", "width"))))
    assert replace(m, components={**m.components, "unet": control}, schema=1).schema == 2


def test_flux_controlnet_inputs_need_schema_2() -> None:
    """A Union net's mode (the exporter's own input name) and the single-stream samples unet_control takes."""
    from sdrt.export.flux_controlnet import MODE

    assert manifest_module.input_schema(MODE) == 2
    assert manifest_module.input_schema("controlnet_0_single_block_3") == 2
    assert manifest_module.input_schema("controlnet_0_block_3") == 1  # SD 3's ControlNets' too: read since 1
    assert manifest_module.input_schema("sample") == 1
