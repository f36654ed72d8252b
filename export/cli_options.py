"""``sdrt export``'s shared options as export inputs: ``--lora`` specs, ``--lora-slots`` plans, ``--controlnet``
/ ``--random-controlnet`` nets, and what a LoRA merge matched as lines for the user."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdrt.runtime.errors import InputError
from sdrt.runtime.lora_files import LoraSpec, MergeReport

from .cli_exporter import Say

if TYPE_CHECKING:
    from sdrt.runtime.families import Family

    from .controlnet_loading import LoadedControlNet
    from .lora_slots import SlotPlan


def lora_spec(text: str) -> LoraSpec:
    """``--lora FILE[:SCALE]`` -> a LoraSpec whose file exists, or an InputError that names the real problem
    (a scale that is not a number reads as part of the file name otherwise)."""
    spec = LoraSpec.parse(text)
    if spec.path.is_file():
        return spec
    head, sep, tail = text.rpartition(":")
    if sep and head and Path(head).is_file():
        raise InputError(f"--lora {text}: the scale {tail!r} is not a number; give FILE:SCALE with a number "
                         f"(e.g. {head}:0.8), or FILE alone for scale 1")
    what = "is a folder" if spec.path.is_dir() else "does not exist"
    raise InputError(f"--lora {text}: the LoRA file {spec.path} {what}; give a .safetensors file, optionally "
                     "with :SCALE")


def slot_plan(text: str | None, family: Family | None = None) -> SlotPlan | None:
    """``--lora-slots`` (None where not given), checked against ``family``'s targets (a transformer family's,
    before the weights load; None: checked by the export)."""
    from .lora_slots import SlotPlan

    if text is None:
        return None
    plan = SlotPlan.parse(text)
    if family is not None:
        family.lora_targets(plan.targets)  # an InputError for a target set the family has not
    return plan


def load_controlnets(args: argparse.Namespace, say: Say, unet_config: Any = None,
                     transformer_config: Any = None) -> list[LoadedControlNet]:
    """--controlnet / --random-controlnet, loaded in the order given (``unet_config``: the UNet a single file's
    architecture is matched against; ``transformer_config``: the SD 3 / 3.5 transformer, whose head width a single
    file takes)."""
    nets: list[LoadedControlNet] = []
    if args.controlnets:
        from .controlnet_loading import load_controlnet, random_controlnet

        for kind, value in args.controlnets:
            say(f"loading ControlNet {value}" if kind == "path" else f"making a {value} ControlNet")
            nets.append(load_controlnet(value, allow_pickle=args.allow_pickle, unet_config=unet_config,
                                        transformer_config=transformer_config)
                        if kind == "path" else random_controlnet(value, seed=args.seed))
    return nets


def controlnet_files(args: argparse.Namespace) -> list[str]:
    """The ``--controlnet`` values that are single files (not folders), in the order given."""
    return [v for kind, v in args.controlnets or [] if kind == "path" and Path(v).is_file()]


def merged_lines(reports: Mapping[str, MergeReport], say: Say) -> None:
    """What ``--lora`` merged, per component (a component none of whose modules matched: said so)."""
    for comp, rep in reports.items():
        if rep.matched:
            say(f"merged LoRA into {len(rep.matched)} {comp} weights"
                + (f" ({len(rep.unmatched)} LoRA modules matched nothing)" if rep.unmatched else ""))
        elif rep.unmatched:
            say(f"{len(rep.unmatched)} LoRA modules of {comp} matched nothing (not applied; e.g. "
                f"{rep.unmatched[0]})")


def source_line(args: argparse.Namespace) -> str:
    return f"loading {args.model or f'synthetic {args.random} weights'}"


def dest(flag: str) -> str:
    """A flag's attribute in the parsed arguments (argparse's rule: ``--clip-l`` -> ``clip_l``)."""
    return flag.removeprefix("--").replace("-", "_")


def flag_options(args: argparse.Namespace, flags: tuple[str, ...]) -> dict[str, Any]:
    """``flags``' values as keyword arguments (``--clip-l`` -> ``clip_l=...``)."""
    return {dest(f): getattr(args, dest(f)) for f in flags}
