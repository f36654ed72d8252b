"""LoRA slots: the UNet's adapted layers take low-rank factors as graph inputs (``sdrt export --lora-slots``).

A slotted linear layer computes ``W x + up (down x)`` where ``down`` [rank, in] and ``up`` [out, rank] are inputs
of the graph (``lora.<module>.down``, ``lora.<module>.up``; runtime/lora_adapters.py fills them per request: zeros
when no adapter is active, a LoRA's factors zero-padded to the slot's rank with its scale folded into ``up``,
several LoRAs side by side on the rank axis). A slotted convolution (LoCon) computes ``conv(x) + up * (down * x)``:
``down`` [rank, in, kh, kw] is a convolution with the base layer's kernel size, stride, padding and dilation,
``up`` [out, rank, 1, 1] a 1x1 one, as kohya's LoCon and PEFT's convolution LoRA build them. The weights stay as
exported, so one export serves any LoRA of the targeted layers whose ranks sum to at most the slot's rank,
without re-export, rebuild or refit.

Targets (the layers that get a slot): ``attn`` (the default; diffusers' LoRA training scripts' targets: every
attention's ``to_q``, ``to_k``, ``to_v``, ``to_out.0``), ``attn-ff`` (also the transformer blocks' feed-forward
``ff.net.0.proj`` and ``ff.net.2``, and ``proj_in`` / ``proj_out`` where they are linear, as kohya's scripts
train) or ``attn-ff-conv`` (LoCon: also the convolutions kohya's LoCon and LyCORIS' ``locon`` adapt, the ResNet
blocks' ``conv1``, ``conv2``, ``conv_shortcut`` and their linear ``time_emb_proj``, the down- and upsamplers'
``conv``, and ``proj_in`` / ``proj_out`` where they are 1x1 convolutions, SD 1.x / 2.x's). The CLIP text encoders
get slots too, where LoRAs that train them adapt them: every attention's ``q_proj``, ``k_proj``, ``v_proj``,
``out_proj`` (and with ``attn-ff`` or ``attn-ff-conv`` the MLP's ``fc1``, ``fc2``, kohya's text-encoder targets).
The UNet's ``conv_in`` / ``conv_out`` and grouped convolutions have no slot.

SD 3 / 3.5 and FLUX.1 (``slot_components``): the family declares its transformer's targets
(``Family.lora_targets``: every attention projection of the blocks, or with ``attn-ff`` every linear layer of the
blocks; runtime/families/transformer_lora.py), the CLIP encoders take the text targets above, T5 none. The slots
go on the layers the export wrapper runs (FLUX.1's runs a copy of the transformer), on first-block caching's cached
step and skip-layer guidance's pass for the layers they run, on ``unet_control`` (the transformer taking
ControlNet samples: the same slots, after the samples; the ControlNets get none, as diffusers' ``load_lora_weights``
adapts the transformer and the text encoders, not the ControlNet) and on a streamed transformer
(``slotted_streamed``: traced in fake mode with it, its reduced-depth gate slotted alike, ``slotted_gate``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F

from sdrt.runtime.control_stage import CONTROL_UNET
from sdrt.runtime.errors import InputError
from sdrt.runtime.families import Family
from sdrt.runtime.feature_cache import SHALLOW_UNET
from sdrt.runtime.layer_skip import SKIP_UNET
from sdrt.runtime.lora_adapters import LORA_PREFIX, slot_input

from .onnx_export import ComponentSpec
from .streamed import StreamedSpec

_ATTN = ("to_q", "to_k", "to_v", "to_out.0")
_FF = ("ff.net.0.proj", "ff.net.2", "proj_in", "proj_out")
# kohya's LoCon (networks.lora with conv_dim) and LyCORIS' locon adapt every Linear and Conv2d of the ResNet blocks
# and the down- and upsamplers (besides the transformers' layers): time_emb_proj is a linear layer among them
_CONV = ("conv1", "conv2", "conv_shortcut", "time_emb_proj", "downsamplers.0.conv", "upsamplers.0.conv")
TARGETS = {
    "attn": _ATTN,
    "attn-ff": (*_ATTN, *_FF),
    "attn-ff-conv": (*_ATTN, *_FF, *_CONV),
}
CONV_TARGETS = ("attn-ff-conv",)  # the target sets whose convolutions get slots (the others slot linear layers only)
# the CLIP text encoders' layers of the same kinds (attention projections; the MLP with attn-ff and attn-ff-conv)
TEXT_TARGETS = {
    "attn": ("q_proj", "k_proj", "v_proj", "out_proj"),
    "attn-ff": ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
    "attn-ff-conv": ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
}
RANK_MAX = 256
DEFAULT_TARGETS = "attn"


@dataclass(frozen=True)
class SlotPlan:
    """``rank`` (the most a request's adapters may sum to, per layer) and ``targets`` (a TARGETS key)."""

    rank: int
    targets: str = DEFAULT_TARGETS

    @classmethod
    def parse(cls, text: str) -> SlotPlan:
        """``RANK[:TARGETS]``, e.g. ``32``, ``64:attn-ff`` or ``32:attn-ff-conv``."""
        rank, _, targets = str(text).partition(":")
        if not rank.strip().isdigit() or not 1 <= int(rank) <= RANK_MAX:
            raise InputError(f"--lora-slots {text!r}: the rank must be an integer from 1 to {RANK_MAX} (e.g. 32, or "
                             "64:attn-ff)")
        plan = cls(int(rank), targets.strip() or DEFAULT_TARGETS)
        if plan.targets not in TARGETS:
            raise InputError(f"--lora-slots {text!r}: targets {plan.targets!r} is not one of {', '.join(TARGETS)} "
                             "(attn-ff-conv for LoCon, whose convolutions have slots then)")
        return plan


Layer = torch.nn.Linear | torch.nn.Conv2d  # a slotted layer


def _slottable(m: torch.nn.Module, conv: bool) -> bool:
    """A linear layer, or (``conv``) a plain 2-D convolution: one group, zero padding (what LoCon adapts)."""
    if isinstance(m, torch.nn.Linear):
        return True
    return (conv and isinstance(m, torch.nn.Conv2d) and m.groups == 1 and m.padding_mode == "zeros"
            and not isinstance(m.padding, str))


def slot_layers(unet: torch.nn.Module, plan: SlotPlan, text: bool = False,
                patterns: Sequence[str] | None = None) -> list[tuple[str, Layer]]:
    """The layers that get a slot, by module name, in module order: the UNet's, or (``text``) a CLIP text
    encoder's (TEXT_TARGETS). Linear layers, and with a CONV_TARGETS set the UNet's convolutions too.
    ``patterns``: the denoiser's targets as the family declares them (``Family.lora_targets``: full-match patterns
    over module names, linear layers only), in place of the UNet's."""
    if patterns is not None and not text:
        regex = re.compile("|".join(f"(?:{p})" for p in patterns))
        layers = [(n, m) for n, m in unet.named_modules()
                  if isinstance(m, torch.nn.Linear) and regex.fullmatch(n)]
    else:
        ends = (TEXT_TARGETS if text else TARGETS)[plan.targets]
        conv = plan.targets in CONV_TARGETS and not text
        layers = [(n, m) for n, m in unet.named_modules()
                  if _slottable(m, conv) and any(n == e or n.endswith("." + e) for e in ends)]
    if not layers:
        what = "text encoder" if text else "UNet" if patterns is None else "denoiser"
        raise InputError(f"the {what} has no {plan.targets} layers to slot")
    return layers


def _kernel(m: Layer) -> tuple[int, ...]:
    """A convolution's kernel size (a linear layer: none)."""
    return tuple(int(k) for k in m.kernel_size) if isinstance(m, torch.nn.Conv2d) else ()


def _features(m: Layer) -> tuple[int, int]:
    if isinstance(m, torch.nn.Conv2d):
        return int(m.in_channels), int(m.out_channels)
    return int(m.in_features), int(m.out_features)


def split_inert(module: torch.nn.Module, example: tuple[torch.Tensor, ...],
                layers: list[tuple[str, Layer]]) -> tuple[list[tuple[str, Layer]], list[str]]:
    """``layers`` split into those whose output reaches ``module``'s outputs on ``example`` and the names of those
    that do not (a CLIP encoder's last layer when the penultimate states condition the UNet, the layers past a
    clip skip): a slot there would be an input the ONNX graph drops. An adapter's factors for an inert layer
    change nothing, so the runtime skips them (the manifest records them)."""
    probes = {n: torch.zeros((), requires_grad=True) for n, _ in layers}
    handles = [m.register_forward_hook(lambda _m, _i, out, z=probes[n]: out + z) for n, m in layers]
    try:
        with torch.enable_grad():
            res = module(*example)
    finally:
        for h in handles:
            h.remove()
    outs = [t for t in (res if isinstance(res, (tuple, list)) else (res,)) if t.is_floating_point()]
    grads = torch.autograd.grad(sum(t.float().sum() for t in outs), list(probes.values()), allow_unused=True)
    used = [(n, m) for (n, m), g in zip(layers, grads, strict=True) if g is not None]
    return used, [n for (n, _), g in zip(layers, grads, strict=True) if g is None]


def slot_inputs(layers: list[tuple[str, Layer]], rank: int) -> list[tuple[str, str, tuple[int | str, ...]]]:
    """The graph inputs of the slots, two per layer: ``down`` [rank, in] and ``up`` [out, rank] (a convolution:
    ``down`` [rank, in, kh, kw], ``up`` [out, rank, 1, 1])."""
    out: list[tuple[str, str, tuple[int | str, ...]]] = []
    for name, m in layers:
        fin, fout = _features(m)
        kernel = _kernel(m)
        out.append((slot_input(name, "down"), "float", (rank, fin, *kernel)))
        out.append((slot_input(name, "up"), "float", (fout, rank, *(1 for _ in kernel))))
    return out


def slot_example(layers: list[tuple[str, Layer]], rank: int, g: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Factors for the trace and the parity gate: small and random, so the gate checks the slots' arithmetic."""
    args: list[torch.Tensor] = []
    for _, m in layers:
        fin, fout = _features(m)
        kernel = _kernel(m)
        fan_in = fin * math.prod(kernel)
        args.append(torch.randn(rank, fin, *kernel, generator=g) * (0.5 / fan_in ** 0.5))
        args.append(torch.randn(fout, rank, *(1 for _ in kernel), generator=g) * (0.5 / rank ** 0.5))
    return tuple(args)


def _low_rank(m: Layer, down: torch.Tensor, up: torch.Tensor) -> Callable[..., torch.Tensor]:
    """The forward hook adding ``up (down x)`` to ``m``'s output: matrix products for a linear layer; for a
    convolution ``down`` convolves with the layer's own stride, padding and dilation and ``up`` is 1x1 (kohya's
    LoCon, PEFT's Conv2d LoRA)."""
    if isinstance(m, torch.nn.Conv2d):
        stride, padding, dilation = m.stride, m.padding, m.dilation
        return lambda _m, inp, out: out + F.conv2d(F.conv2d(inp[0], down, None, stride, padding, dilation), up)
    return lambda _m, inp, out: out + F.linear(F.linear(inp[0], down), up)


class Slotted(torch.nn.Module):
    """``inner`` (a UNet or text-encoder wrapper) whose slotted layers add ``up (down x)``: its own inputs, then the factors in
    ``slot_inputs`` order. The hooks live only for the call (the model is shared with the export's other
    components)."""

    def __init__(self, inner: torch.nn.Module, layers: list[tuple[str, Layer]], inert: Sequence[str] = ()) -> None:
        super().__init__()
        self.inner = inner
        self.layers = [m for _, m in layers]  # not registered: the inner wrapper owns them
        self.inert = tuple(inert)  # targeted layers without a slot: they do not reach the outputs

    def forward(self, *args: torch.Tensor) -> object:
        n = len(args) - 2 * len(self.layers)
        base, factors = args[:n], args[n:]
        handles = [m.register_forward_hook(_low_rank(m, factors[2 * i], factors[2 * i + 1]))
                   for i, m in enumerate(self.layers)]
        try:
            return self.inner(*base)
        finally:
            for h in handles:
                h.remove()


def slotted(spec: ComponentSpec, layers: list[tuple[str, Layer]], rank: int,
            inert: Sequence[str] = ()) -> ComponentSpec:
    """``spec`` whose ``layers`` take LoRA factors as inputs after its own; ``inert``: the targeted layers left
    without a slot because they do not reach the outputs (recorded in the manifest)."""
    example = spec.example

    def slotted_example(g: torch.Generator, b: int, h: int, w: int) -> tuple[torch.Tensor, ...]:
        return (*example(g, b, h, w), *slot_example(layers, rank, g))

    return replace(spec, module=Slotted(spec.module, layers, inert), inputs=[*spec.inputs, *slot_inputs(layers, rank)],
                   example=slotted_example)


def slot_components(specs: Sequence[ComponentSpec], plan: SlotPlan, patterns: Sequence[str],
                    text: Sequence[str]) -> tuple[list[ComponentSpec], dict[str, list[str]]]:
    """A transformer family's components with slots: the denoiser's (``unet``: the layers ``patterns`` name, as
    its family declares them) and the CLIP text encoders' named in ``text`` (their attention, and with
    ``attn-ff`` their MLP, the UNet families' text targets); the rest (T5, the VAE) as they are. Returns the
    specs and, per text encoder, its targeted layers that do not reach its outputs (left without a slot)."""
    out: list[ComponentSpec] = []
    inert: dict[str, list[str]] = {}
    for spec in specs:
        if spec.name in text:
            layers = slot_layers(spec.weights, plan, text=True)
            used, dead = split_inert(spec.module, spec.example(torch.Generator().manual_seed(0), 1, 8, 8), layers)
            spec = slotted(spec, used, plan.rank, dead)
            if dead:
                inert[spec.name] = dead
        elif spec.name in ("unet", CONTROL_UNET):
            # the transformer taking ControlNet samples: its factors after the samples, under the denoiser's names,
            # so the loop feeds it the call's factors as it feeds the denoiser (the nets themselves get no slots:
            # LoRAs adapt the transformer and the text encoders, not the ControlNets)
            layers = slot_layers(spec.weights, plan, patterns=patterns)
            spec = slotted(spec, _in_wrapper(spec.module, layers), plan.rank)
        elif spec.name in (SHALLOW_UNET, SKIP_UNET):
            # first-block caching's cached step, skip-layer guidance's pass: the slotted layers each runs (the first
            # block's; every block but the skipped ones), under the denoiser's input names, so the loop feeds it the
            # call's factors as it feeds the denoiser
            layers = _in_wrapper(spec.module, slot_layers(spec.weights, plan, patterns=patterns))
            used, _ = split_inert(spec.module, spec.example(torch.Generator().manual_seed(0), 1, 8, 8), layers)
            spec = slotted(spec, used, plan.rank)
        out.append(spec)
    return out, inert


def slotted_streamed(spec: StreamedSpec, plan: SlotPlan, patterns: Sequence[str]) -> StreamedSpec:
    """A streamed denoiser (export/streamed.py: built and traced in fake mode) whose targeted layers take LoRA
    factors as inputs after its own, as ``slot_components`` gives an in-memory one: the layers found by name in
    the module the wrapper runs (``spec.prefix`` names it), the factors static inputs of the traced graph."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    inner_prefix = spec.prefix.rstrip(".")

    def layers_of(wrapper: torch.nn.Module) -> list[tuple[str, Layer]]:
        return _in_wrapper(wrapper, slot_layers(wrapper.get_submodule(inner_prefix), plan, patterns=patterns))

    with FakeTensorMode():
        io = slot_inputs(layers_of(spec.build()), plan.rank)  # shapes only: nothing is allocated

    def build() -> torch.nn.Module:
        wrapper = spec.build()
        return Slotted(wrapper, layers_of(wrapper))

    def example() -> tuple[torch.Tensor, ...]:
        return (*spec.example(), *(torch.zeros(*(int(d) for d in shape)) for _, _, shape in io))

    def dynamic() -> dict[str, Any]:
        dims = spec.dynamic()  # by the wrapper's argument names; Slotted takes them all as *args
        names = [n for n, _, _ in spec.inputs]
        # a wrapper taking its last inputs as *args (unet_control's ControlNet samples) has one entry for them all,
        # a tuple in order, under that argument's name: its entries go to the inputs not named in dims
        packed = [d for k, d in dims.items() if k not in names and isinstance(d, tuple)]
        rest = iter(packed[0] if len(packed) == 1 else ())
        return {"args": (*(dims[n] if n in dims else next(rest, None) for n in names), *(None for _ in io))}

    return replace(spec, build=build, prefix=f"inner.{spec.prefix}", inputs=[*spec.inputs, *io], example=example,
                   dynamic=dynamic)


def slotted_gate(sspec: StreamedSpec, cspec: ComponentSpec, module: torch.nn.Module, plan: SlotPlan,
                 patterns: Sequence[str]) -> tuple[StreamedSpec, ComponentSpec]:
    """A streamed denoiser's reduced-depth gate with the same slots on both sides: the streamed graph and the
    in-memory copy ``module`` it is compared with (random factors)."""
    streamed = slotted_streamed(sspec, plan, patterns)
    inputs = {n for n, _, _ in streamed.inputs}  # a cached step's: its first block's layers alone
    layers = [(n, m) for n, m in _in_wrapper(cspec.module, slot_layers(module, plan, patterns=patterns))
              if slot_input(n, "down") in inputs]
    return streamed, slotted(cspec, layers, plan.rank)


def _in_wrapper(wrapper: torch.nn.Module, layers: list[tuple[str, Layer]]) -> list[tuple[str, Layer]]:
    """``layers`` (named as in the denoiser) as the modules ``wrapper`` runs: a wrapper may run a copy of the
    denoiser (FLUX.1's, with explicit RMS norms for the TorchScript exporter), whose layers must carry the slots."""
    found: dict[str, list[tuple[str, torch.nn.Module]]] = {}
    names = {n for n, _ in layers}
    for n, m in wrapper.named_modules():
        for name in _suffixes(n):
            if name in names:
                found.setdefault(name, []).append((n, m))
    out: list[tuple[str, Layer]] = []
    for name, layer in layers:
        hits = [m for _, m in found.get(name, []) if isinstance(m, type(layer))]
        if len(hits) != 1:
            raise InputError(f"the denoiser's layer {name} is found {len(hits)} times in its export wrapper; "
                             "it cannot take a LoRA slot")
        out.append((name, hits[0]))
    return out


def _suffixes(name: str) -> list[str]:
    """``a.b.c`` -> ``a.b.c``, ``b.c``, ``c``: the names a module could have inside what wraps it."""
    parts = name.split(".")
    return [".".join(parts[i:]) for i in range(len(parts))]


def check_slots(family: Family, plan: SlotPlan | None) -> tuple[str, ...]:
    """A transformer family's export with ``plan``'s slots, checked before any work: the family's targets for the
    denoiser (its ``lora_targets``; empty without a plan). Refused: a target set the family has not."""
    if plan is None:
        return ()
    patterns = family.lora_targets(plan.targets)
    assert patterns is not None, f"the {family.label} family declares no LoRA targets for its transformer"
    return tuple(patterns)


def slots_record(plan: SlotPlan | None, inert: Mapping[str, list[str]]) -> dict[str, object]:
    """The manifest's ``source`` entry of an export with slots (none without)."""
    if plan is None:
        return {}
    return {"lora_slots": {"rank": plan.rank, "targets": plan.targets, **({"inert": dict(inert)} if inert else {})}}


__all__ = ["CONV_TARGETS", "LORA_PREFIX", "RANK_MAX", "TARGETS", "TEXT_TARGETS", "Layer", "SlotPlan", "Slotted",
           "check_slots", "slot_components", "slot_example", "slot_inputs", "slot_layers", "slots_record", "slotted",
           "slotted_gate", "slotted_streamed", "split_inert"]
