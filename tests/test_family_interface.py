"""The model-family interface: family knowledge lives in runtime/families only, and each family's declared
facts match the diffusers pipelines they mirror."""

from __future__ import annotations

import ast
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from sdrt.runtime.errors import ArtifactError, InputError
from sdrt.runtime.families import FAMILY_KEYS, family_named, has_refiner

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("runtime", "export", "serve", "benchmarks", "sdrt", "engines", "quality")
NAMES = {"sd1", "sd2", "sdxl", "sdxl-refiner", "sdxl_refiner"}


def _family_names(node: ast.AST) -> list[str]:
    """The family-name string constants directly in ``node`` (a constant, or a tuple/list/set of them)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in NAMES:
        return [node.value]
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return [n for elt in node.elts for n in _family_names(elt)]
    return []


def _comparisons(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Compare):
            names = [n for side in (node.left, *node.comparators) for n in _family_names(side)]
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr in ("startswith", "endswith")):
            names = [n for a in node.args for n in _family_names(a)]
            names += [a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)
                      and any(a.value and name.startswith(a.value) for name in NAMES) and a.value.startswith("sd")]
        else:
            continue
        if names:
            found.append(f"{path.relative_to(ROOT)}:{node.lineno} compares with {sorted(set(names))}")
    return found


def test_no_family_name_comparison_outside_the_family_modules() -> None:
    """Outside runtime/families, code asks the family object (its encoders, pooled embedding, time ids, rules)
    instead of comparing family names: a new family adds a module instead of editing every such place."""
    found = [hit for pkg in PACKAGES for path in sorted((ROOT / pkg).rglob("*.py"))
             if "families" not in path.relative_to(ROOT).parts for hit in _comparisons(path)]
    assert found == [], "family-name comparisons outside runtime/families:\n" + "\n".join(found)


def test_the_checker_sees_the_forms_it_forbids(tmp_path: Path) -> None:
    """The scan above is only as good as what it recognises: each form is caught."""
    src = tmp_path / "m.py"
    src.write_text('a = f == "sdxl"\nb = f in ("sd1", "sd2")\nc = f.startswith("sdxl")\nd = f != "x"\n')
    global ROOT
    root, ROOT = ROOT, tmp_path
    try:
        hits = _comparisons(src)
    finally:
        ROOT = root
    assert [h.split(":")[1].split()[0] for h in hits] == ["1", "2", "3"]


def test_registry_maps_every_manifest_family() -> None:
    assert FAMILY_KEYS == ("sd1", "sd2", "sdxl", "sd3", "flux")
    assert [family_named(k).key for k in FAMILY_KEYS] == list(FAMILY_KEYS)
    assert has_refiner("sdxl") and not has_refiner("sd1")
    with pytest.raises(ArtifactError, match="unknown model family 'sd9'.*sd1"):
        family_named("sd9")
    with pytest.raises(ArtifactError, match="unknown model refiner family 'sd1'"):
        family_named("sd1", refiner=True)


def test_families_declare_what_diffusers_does() -> None:
    """Each family's facts against diffusers' pipelines for it (read from their code, not from sdrt)."""
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    sd1, sdxl, refiner = family_named("sd1"), family_named("sdxl"), family_named("sdxl", refiner=True)
    assert sd1.encoders == ("text_encoder",) and not sd1.pooled and sd1.time_ids == 0
    assert sdxl.encoders == ("text_encoder", "text_encoder_2") and sdxl.pooled_encoder == "text_encoder_2"
    assert refiner.encoders == ("text_encoder_2",) and not refiner.generates
    # diffusers' defaults for force_zeros_for_empty_prompt: the base pipeline True, the refiner's config False
    import inspect

    base_default = inspect.signature(StableDiffusionXLPipeline.__init__).parameters["force_zeros_for_empty_prompt"]
    assert sdxl.zero_negatives is base_default.default is True
    assert not refiner.zero_negatives and not sd1.zero_negatives
    assert f"{sdxl.diffusers_pipeline}Pipeline" == StableDiffusionXLPipeline.__name__
    assert f"{refiner.diffusers_pipeline}Img2ImgPipeline" == StableDiffusionXLImg2ImgPipeline.__name__


def test_time_ids_match_diffusers_add_time_ids() -> None:
    """SDXL's and its refiner's time ids against diffusers' own ``_get_add_time_ids`` (original size = target
    size = the image's, no crop; the refiner's aesthetic scores)."""
    import torch
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    h, w, b = 96, 128, 2

    def pipe(ids: int, aesthetics: bool) -> SimpleNamespace:  # what _get_add_time_ids reads of its pipeline
        unet = SimpleNamespace(config=SimpleNamespace(addition_time_embed_dim=4),
                               add_embedding=SimpleNamespace(linear_1=SimpleNamespace(in_features=4 * ids + 8)))
        return SimpleNamespace(unet=unet, config=SimpleNamespace(requires_aesthetics_score=aesthetics))

    want = StableDiffusionXLPipeline._get_add_time_ids(pipe(6, False), (h, w), (0, 0), (h, w), torch.float64,
                                                       text_encoder_projection_dim=8)
    got = family_named("sdxl").extra_conditioning(h, w, b, guided=True)["time_ids"]
    np.testing.assert_array_equal(got, np.repeat(want.numpy(), 2 * b, axis=0))

    pos, neg = StableDiffusionXLImg2ImgPipeline._get_add_time_ids(
        pipe(5, True), (h, w), (0, 0), (h, w), 7.0, 1.5, (h, w), (0, 0), (h, w), torch.float64,
        text_encoder_projection_dim=8)
    got = family_named("sdxl", refiner=True).extra_conditioning(h, w, b, guided=True, scores=(7.0, 1.5))["time_ids"]
    np.testing.assert_array_equal(got, np.concatenate([np.repeat(neg.numpy(), b, 0), np.repeat(pos.numpy(), b, 0)]))


def test_scores_are_refused_by_families_that_take_none() -> None:
    with pytest.raises(InputError, match="condition an SDXL refiner; this model takes none"):
        family_named("sdxl").check_scores((6.0, None))
    assert family_named("sdxl", refiner=True).check_scores(None) == (6.0, 2.5)
    with pytest.raises(InputError, match="aesthetic_score must be a number from 0 to 10"):
        family_named("sdxl", refiner=True).check_scores((11.0, None))

