"""The baseline, diffusers on PyTorch with the export's own weights: the rows a run measures (eager, compiled, bf16
autocast), the diffusers folder they load, diffusers' pipeline class per family and workload, and which row each
measurement is compared with."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from sdrt.runtime.families import family_named

from .artifacts import Emit
from .records import BackendRecord

BF16_SUFFIX = "-bf16"  # the PyTorch bf16 autocast baseline: torch-cpu-bf16


class BaselineRow(NamedTuple):
    name: str  # "torch-cpu", "torch-cuda-compile", "torch-cpu-bf16"
    device: str
    compiled: bool  # torch.compile on the UNet
    autocast: str | None  # "bfloat16": fp32 weights under torch.autocast


def baseline_rows(devices: list[str], compile: bool, bf16: bool) -> list[BaselineRow]:
    """Per device, eager diffusers; with ``compile`` also torch.compile; with ``bf16``, on CPU also bf16 autocast."""
    rows = []
    for d in devices:
        variants: list[tuple[bool, str | None]] = [(c, None) for c in ((False, True) if compile else (False,))]
        if bf16 and d == "cpu":
            variants.append((False, "bfloat16"))
        for compiled, autocast in variants:
            name = f"torch-{d}" + ("-compile" if compiled else "") + (BF16_SUFFIX if autocast else "")
            rows.append(BaselineRow(name, d, compiled, autocast))
    return rows


def baseline_record(row: BaselineRow, precision: str, folder: Path | None, reason: str | None) -> BackendRecord:
    """A baseline row's entry: skipped, with the reason, where it cannot run."""
    b = BackendRecord(row.name, "baseline", row.device,
                      precision=f"{precision} weights, bf16 autocast" if row.autocast else precision)
    if folder is None:
        b.status, b.reason = "skipped", reason
    elif row.device == "cuda" and not torch_cuda():
        b.status, b.reason = "skipped", "torch has no CUDA device here (torch.cuda.is_available() is False)"
    elif row.autocast and precision != "fp32":
        b.status, b.reason = "skipped", (f"the bf16 autocast baseline runs fp32 weights; this run's "
                                         f"weights are {precision} (use --precision fp32)")
    return b


INTEL_ROWS = ("optimum-intel", "openvino-genai")  # Intel's CPU pipelines (--intel-python), beside diffusers
INTEL_MARKER = "model_index.json"  # an Intel export folder holding it is complete, and reused


def baseline_of(m: dict[str, Any]) -> str | None:
    """The row a measurement is compared with: the eager baseline on its device (None for that row itself; the
    compiled, bf16 and Intel rows are compared with it as sdrt's are)."""
    if m["role"] == "baseline" and not m["backend"].endswith(("-compile", BF16_SUFFIX)) \
            and m["backend"] not in INTEL_ROWS:
        return None
    return f"torch-{m['device']}"


def intel_reason(cfg: Any, family: str, devices: list[str]) -> str | None:
    """Why Intel's pipelines cannot be measured in this run (None: they can)."""
    if cfg.intel_python is None:
        return "not asked (--intel-python PYTHON: an environment with optimum-intel and openvino-genai)"
    if "cpu" not in devices:
        return "Intel's pipelines are CPU baselines; this run measures no CPU backend"
    if cfg.workload != "txt2img":
        return f"measured on the txt2img workload only, not {cfg.workload}"
    fam = family_named(family)
    if fam.diffusers_pipeline != "StableDiffusion":  # OVStableDiffusionPipeline is StableDiffusionPipeline's peer
        return (f"measured on SD 1.x / 2.x models (optimum-intel's OVStableDiffusionPipeline), not an {fam.label} "
                "model")
    return None


def intel_export(baseline: Path, folder: Path,
                 run: Callable[[dict[str, Any]], dict[str, Any]]) -> tuple[str | None, float | None]:
    """Intel's OpenVINO export of the diffusers folder ``baseline`` into ``folder``, by ``run`` (the Intel
    environment's worker running ``optimum-cli export openvino``): (None, seconds it took) once ``folder`` holds it,
    or (why not, None). optimum-cli writes into a temporary sibling of ``folder``, renamed into place only after it
    finished and its ``model_index.json`` is there, so a run stopped half-way (``model_index.json`` written, the
    weights not) leaves nothing a later run would take for a finished export (a folder with ``model_index.json`` is
    reused); whatever ``folder`` held without one is replaced."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.partial-", dir=folder.parent))
    try:
        out = tmp / folder.name  # a folder optimum-cli creates, as it would the final one
        res = run({"job": "intel-export", "folder": str(baseline), "out": str(out)})
        if res["status"] != "ok":
            return f"the OpenVINO export failed: {res.get('reason')}", None
        if not (out / INTEL_MARKER).is_file():
            return f"optimum-cli export openvino finished without writing {INTEL_MARKER}", None
        if folder.is_dir() and not folder.is_symlink():
            shutil.rmtree(folder)
        elif folder.exists() or folder.is_symlink():
            folder.unlink()
        os.replace(out, folder)
        return None, res.get("export_s")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def baseline_weights(workload: str, work: Path, onnx_folder: Path, manifest: Any, precision: str,
                     emit: Emit) -> tuple[Path | None, str | None]:
    """A diffusers folder with the export's weights (saved once, then reused), or the reason there is none."""
    src = dict(manifest.source)
    kind = src.get("kind")
    if kind == "diffusers":
        path = Path(str(src.get("path", "")))
        if (path / "model_index.json").is_file():
            return path, None
        return None, f"the export was made from the diffusers folder {path}, which is not here any more"
    if kind not in ("random", "single_file"):
        return None, f"the export does not record where its weights came from (source kind {kind!r})"
    digest = hashlib.sha256(json.dumps([src, workload], sort_keys=True).encode()).hexdigest()[:12]
    folder = work / f"diffusers-{manifest.preset}-{precision}-{digest}"
    if (folder / "model_index.json").is_file():
        return folder, None
    from sdrt.export.loading import load_model
    from sdrt.export.preset_tables import load_random

    emit("baseline", f"saving the same weights as a diffusers folder for the baseline ({precision})")
    if kind == "random":
        model = load_random(str(src["preset"]), int(src.get("seed", 0)))
    else:
        path = Path(str(src.get("path", "")))
        if not path.is_file():
            return None, f"the export was made from {path}, which is not here any more"
        if path.suffix.lower() != ".safetensors":
            return None, f"the export was made from a pickled checkpoint ({path.name}); the bench does not unpickle"
        model = load_model(path)
    nets = [controlnet_from_source(c, model) for c in src.get("controlnets", [])][:1]
    if workload == "controlnet" and not nets:
        return None, "the export records no ControlNet the baseline could rebuild"
    save_diffusers(model, onnx_folder, folder, manifest.family, precision, nets[0] if nets else None, workload)
    return folder, None


def controlnet_from_source(src: dict[str, Any], model: Any) -> Any:
    """The torch ControlNet an export recorded (synthetic: rebuilt from its preset or the UNet and seed)."""
    from sdrt.export.controlnet_loading import controlnet_from_unet, load_controlnet, random_controlnet

    kind = src.get("kind")
    if kind == "random":
        return random_controlnet(str(src["preset"]), int(src.get("seed", 0))).controlnet
    if kind == "from_unet":
        return controlnet_from_unet(model, int(src.get("seed", 0))).controlnet
    return load_controlnet(str(src.get("path", ""))).controlnet


def save_diffusers(model: Any, onnx_folder: Path, out: Path, family: str, precision: str, controlnet: Any = None,
                   workload: str = "txt2img") -> None:
    """Save ``model``'s modules as a diffusers pipeline folder (tokenizers from the export), the workload's
    pipeline: txt2img, ControlNet (with ``controlnet``) or inpainting."""
    import diffusers
    import torch
    from transformers import CLIPTokenizer

    from sdrt.export.flux_loading import LoadedFlux
    from sdrt.export.sd3_model import LoadedSd3
    from sdrt.runtime.atomic import atomic_dir

    if isinstance(model, LoadedSd3):
        save_sd3_diffusers(model, onnx_folder, out, precision)
        return
    if isinstance(model, LoadedFlux):
        save_flux_diffusers(model, onnx_folder, out, precision)
        return
    cfg = dict(model.scheduler_config)
    sched_cls = getattr(diffusers, str(cfg.get("_class_name", "PNDMScheduler")), diffusers.PNDMScheduler)
    scheduler = sched_cls.from_config(cfg)
    if getattr(model.preset, "refiner", False):  # one encoder and aesthetic scores: diffusers' refiner configuration
        pipe: Any = diffusers.StableDiffusionXLImg2ImgPipeline(
            vae=model.vae, text_encoder=None, text_encoder_2=model.text_encoders[0], tokenizer=None,
            tokenizer_2=CLIPTokenizer.from_pretrained(onnx_folder / "tokenizer_2"), unet=model.unet,
            scheduler=scheduler, requires_aesthetics_score=True, force_zeros_for_empty_prompt=False,
            add_watermarker=False)
        if precision == "fp16":
            pipe = pipe.to(torch.float16)
        with atomic_dir(out, marker="model_index.json", what="a diffusers folder") as tmp:
            pipe.save_pretrained(tmp, safe_serialization=True)
        return
    tok = CLIPTokenizer.from_pretrained(onnx_folder / "tokenizer")
    cls = pipeline_class(family, workload)
    extra: dict[str, Any] = {} if controlnet is None else {"controlnet": controlnet}
    if len(family_named(family).encoders) == 2:  # diffusers' two-encoder (XL) pipelines
        tok2 = CLIPTokenizer.from_pretrained(onnx_folder / "tokenizer_2")
        if workload == "inpaint":
            extra["requires_aesthetics_score"] = False
        else:
            extra["add_watermarker"] = False
        pipe = cls(
            vae=model.vae, text_encoder=model.text_encoders[0], text_encoder_2=model.text_encoders[1], tokenizer=tok,
            tokenizer_2=tok2, unet=model.unet, scheduler=scheduler, force_zeros_for_empty_prompt=True, **extra)
    else:
        pipe = cls(vae=model.vae, text_encoder=model.text_encoders[0], tokenizer=tok, unet=model.unet,
                   scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
                   **extra)
    if precision == "fp16":
        pipe = pipe.to(torch.float16)
    with atomic_dir(out, marker="model_index.json", what="a diffusers folder") as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)


def save_sd3_diffusers(model: Any, onnx_folder: Path, out: Path, precision: str) -> None:
    """Save an SD 3 / 3.5 model (``sd3_model.LoadedSd3``) as a ``StableDiffusion3Pipeline`` folder with the
    export's tokenizers; an export without T5 gives a folder without ``text_encoder_3`` (diffusers' None). A
    streamed transformer (a full-size preset's) is built in memory from the export's weights: the baseline
    needs room for it (8.4 GiB in fp32 for 3.5 Medium)."""
    import diffusers
    import torch
    from transformers import CLIPTokenizer, T5TokenizerFast  # type: ignore[attr-defined]

    from sdrt.runtime.atomic import atomic_dir

    t5_folder = onnx_folder / "tokenizer_3"
    # the export left T5 out: so does the baseline; streamed components are built from the same weights
    mods = model.held(t5=t5_folder.is_dir())
    clip_l, clip_g, t5 = mods.text_encoders
    pipe: Any = diffusers.StableDiffusion3Pipeline(
        transformer=mods.transformer, vae=mods.vae,
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler.from_config(dict(model.scheduler_config)),
        text_encoder=clip_l, tokenizer=CLIPTokenizer.from_pretrained(onnx_folder / "tokenizer"),
        text_encoder_2=clip_g, tokenizer_2=CLIPTokenizer.from_pretrained(onnx_folder / "tokenizer_2"),
        text_encoder_3=t5, tokenizer_3=T5TokenizerFast.from_pretrained(t5_folder) if t5 is not None else None)
    if precision == "fp16":
        pipe = pipe.to(torch.float16)
    with atomic_dir(out, marker="model_index.json", what="a diffusers folder") as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)


def save_flux_diffusers(model: Any, onnx_folder: Path, out: Path, precision: str) -> None:
    """Save a FLUX.1 model (``flux_loading.LoadedFlux``) as a ``FluxPipeline`` folder with the export's tokenizers;
    an fp16 baseline is saved in bf16, as FLUX.1 runs on GPUs (it overflows fp16: NaN images)."""
    import diffusers
    import torch
    from transformers import CLIPTokenizer, T5TokenizerFast  # type: ignore[attr-defined]

    from sdrt.runtime.atomic import atomic_dir

    m = model.held()  # streamed components built from the same weights
    pipe: Any = diffusers.FluxPipeline(
        transformer=m.transformer, vae=m.vae,
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler.from_config(dict(model.scheduler_config)),
        text_encoder=m.clip, tokenizer=CLIPTokenizer.from_pretrained(onnx_folder / "tokenizer"),
        text_encoder_2=m.t5, tokenizer_2=T5TokenizerFast.from_pretrained(onnx_folder / "tokenizer_2"))
    if precision == "fp16":
        pipe = pipe.to(torch.bfloat16)
    with atomic_dir(out, marker="model_index.json", what="a diffusers folder") as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)


def pipeline_class(family: str, workload: str) -> Any:
    """diffusers' pipeline class for a family and workload (the baseline's)."""
    import diffusers

    kinds = {"controlnet": "ControlNet", "inpaint": "Inpaint"}  # few-step, base-refiner: txt2img's pipeline
    return getattr(diffusers, f"{family_named(family).diffusers_pipeline}{kinds.get(workload, '')}Pipeline")


def torch_cuda() -> bool:
    """Whether torch sees a CUDA device (False without torch)."""
    try:
        import torch

        return bool(torch.cuda.is_available())
    except ImportError:
        return False
