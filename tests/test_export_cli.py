"""``sdrt export`` asks its table of exporters (export/exporters.py) which one claims the source, and refuses a
flag of another family with one message built from the table; the command itself names no family."""

from __future__ import annotations

import argparse
import ast
from pathlib import Path

import pytest

from sdrt.cli import main
from sdrt.export.cli_options import dest
from sdrt.export.exporters import EXPORTERS, family_flags, option_flags
from sdrt.export.preset_tables import preset_names
from sdrt.runtime.families import FAMILY_KEYS

COMMAND = Path(__file__).resolve().parents[1] / "sdrt" / "commands" / "export.py"
UNET = "a UNet model (SD 1.x, SD 2.x, SDXL base, SDXL refiner)"


def test_the_export_command_names_no_family() -> None:
    """No family key or model preset as a string, no ``is_*_source`` call, no import of a family's export module:
    a new family adds its exporter to the table, not a branch to the command."""
    tree = ast.parse(COMMAND.read_text())
    strings = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    assert strings & {*FAMILY_KEYS, *preset_names()} == set()
    called = {n.func.id if isinstance(n.func, ast.Name) else getattr(n.func, "attr", "")
              for n in ast.walk(tree) if isinstance(n, ast.Call)}
    assert [c for c in called if c.startswith("is_") and c.endswith("_source")] == []
    imported = {n.module.rsplit(".", 1)[-1] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert [m for m in imported if m.split("_")[0] in FAMILY_KEYS] == []


def test_the_table_flags_are_the_commands() -> None:
    """Every flag the table judges is the command's, read at the attribute ``dest`` names, not set by default
    (None, False or 0) and set once given: what the command's check of the given flags relies on."""
    from sdrt.commands.export import register

    p = argparse.ArgumentParser()
    register(p)
    defaults = vars(p.parse_args(["--list"]))
    for flag in option_flags():
        assert defaults[dest(flag)] in (None, False), flag
        given, _ = p.parse_known_args(["--list", flag, "1"])  # "1": its value, or left over for an on/off flag
        assert getattr(given, dest(flag)) not in (None, False), flag
    assert {u.flag for e in EXPORTERS for u in e.takes} <= set(option_flags())


def test_each_family_flag_is_registered_as_its_exporter_declares_it() -> None:
    """The command writes no family-specific flag: each is registered once, from the table, with the help its
    exporter declares (a flag several exporters take: one declaration they share). A flag an exporter takes that
    the command registers itself fails here."""
    tree = ast.parse(COMMAND.read_text())
    strings = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    assert strings & set(family_flags()) == set()

    from sdrt.commands.export import register

    class Recording(argparse.ArgumentParser):
        def add_argument(self, *names: str, **options: object) -> argparse.Action:  # type: ignore[override]
            added.append((names, options.get("help")))
            return super().add_argument(*names, **options)  # type: ignore[arg-type]

    added: list[tuple[tuple[str, ...], object]] = []
    register(Recording())
    for flag in family_flags():
        uses = {u for e in EXPORTERS for u in e.takes if u.flag == flag}
        assert len(uses) == 1, flag
        assert [h for names, h in added if flag in names] == [uses.pop().help], flag


@pytest.fixture
def no_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any weights loading fails the test: the refusals come first."""
    from sdrt.export import flux_loading, loading, sd3_loading

    for module, name in ((loading, "load_model"), (sd3_loading, "load_sd3"), (flux_loading, "load_flux")):
        monkeypatch.setattr(module, name, lambda *a, **k: pytest.fail("weights loaded before the refusal"))


@pytest.mark.parametrize(("argv", "message"), [
    (["--random", "sd15-tiny", "--without-t5"],
     ("--without-t5 goes with SD 3 / 3.5, to leave out the T5-XXL text encoder (zeros in its place); this model is "
     f"not SD 3 / 3.5 but {UNET}, which takes --clip-skip, --vae-fp32, --no-ema, --ort-cuda")),
    (["--random", "sd3-tiny", "--vae-fp32"],
     (f"--vae-fp32 goes with {UNET}, to keep the VAE in fp32 in an fp16 export; this model is not {UNET} but SD 3 / "
     "3.5, which takes --without-t5, --skip-layers, --clip-l, --clip-g, --t5, --tokenizers, --bf16")),
    (["--random", "sdxl-tiny", "--clip-l", "x.safetensors"],
     ("--clip-l goes with an SD 3 / 3.5 single file (Stability's layout: model.diffusion_model.joint_blocks.*) or a "
     "FLUX.1 single file (Black Forest Labs' layout), for its CLIP-L text encoder as a separate file")),
    (["--random", "flux-schnell-tiny", "--skip-layers", "1", "--no-ema"],
     ("--skip-layers goes with SD 3 / 3.5, to also export the transformer pass with those blocks skipped, for "
     f"skip-layer guidance\n--no-ema goes with {UNET}, to load a single file's non-EMA UNet weights\nthis model is "
     "none of those but FLUX.1, which takes --clip-l, --t5, --vae, --tokenizers, --bf16")),
    (["--random", "sd15-tiny", "--bf16"],
     (f"--bf16 goes with SD 3 / 3.5 or FLUX.1, to export its text encoders and transformer in bf16; this model is "
      f"not SD 3 / 3.5 or FLUX.1 but {UNET}, which takes --clip-skip, --vae-fp32, --no-ema, --ort-cuda")),
    (["--random", "sd3-tiny", "--arch", "sd3-tiny", "--t5", "t5.safetensors"],
     "--t5, --arch go with an SD 3 / 3.5 single file, not --random (pick the architecture with --random PRESET)"),
])
def test_a_flag_the_model_does_not_take_is_refused_before_loading(
    no_loading: None, argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["export", *argv, "--out", str(tmp_path / "o")]) == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
