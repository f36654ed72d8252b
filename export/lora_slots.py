"""LoRA slots: the UNet's adapted layers take low-rank factors as graph inputs (``sdrt export --lora-slots``).

A slotted layer computes ``W x + up (down x)`` where ``down`` [rank, in] and ``up`` [out, rank] are inputs of the
graph (``lora.<module>.down``, ``lora.<module>.up``; runtime/lora_adapters.py fills them per request: zeros when no
adapter is active, a LoRA's factors zero-padded to the slot's rank with its scale folded into ``up``, several
LoRAs side by side on the rank axis). The weights stay as exported, so one export serves any LoRA of the
targeted layers whose ranks sum to at most the slot's rank, without re-export, rebuild or refit.

Targets (the layers that get a slot): ``attn`` (the default; diffusers' LoRA training scripts' targets: every
attention's ``to_q``, ``to_k``, ``to_v``, ``to_out.0``) or ``attn-ff`` (also the transformer blocks' feed-forward
``ff.net.0.proj`` and ``ff.net.2``, and ``proj_in`` / ``proj_out`` where they are linear, as kohya's scripts
train). The CLIP text encoders get slots too, where LoRAs that train them adapt them: every attention's
``q_proj``, ``k_proj``, ``v_proj``, ``out_proj`` (and with ``attn-ff`` the MLP's ``fc1``, ``fc2``, kohya's
text-encoder targets). Linear layers only: LoCon's convolution adapters have no slot (an adapter with one is
refused by name).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sdrt.runtime.errors import InputError
from sdrt.runtime.lora_adapters import LORA_PREFIX, slot_input

TARGETS = {
    "attn": ("to_q", "to_k", "to_v", "to_out.0"),
    "attn-ff": ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out"),
}
# the CLIP text encoders' layers of the same kinds (attention projections; the MLP with attn-ff)
TEXT_TARGETS = {
    "attn": ("q_proj", "k_proj", "v_proj", "out_proj"),
    "attn-ff": ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
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
        """``RANK[:TARGETS]``, e.g. ``32`` or ``64:attn-ff``."""
        rank, _, targets = str(text).partition(":")
        if not rank.strip().isdigit() or not 1 <= int(rank) <= RANK_MAX:
            raise InputError(f"--lora-slots {text!r}: the rank must be an integer from 1 to {RANK_MAX} (e.g. 32, or "
                             "64:attn-ff)")
        plan = cls(int(rank), targets.strip() or DEFAULT_TARGETS)
        if plan.targets not in TARGETS:
            raise InputError(f"--lora-slots {text!r}: targets {plan.targets!r} is not one of {', '.join(TARGETS)}")
        return plan


def slot_layers(unet: torch.nn.Module, plan: SlotPlan, text: bool = False) -> list[tuple[str, torch.nn.Linear]]:
    """The linear layers that get a slot, by module name, in module order: the UNet's, or (``text``) a CLIP text
    encoder's (TEXT_TARGETS)."""
    ends = (TEXT_TARGETS if text else TARGETS)[plan.targets]
    layers = [(n, m) for n, m in unet.named_modules()
              if isinstance(m, torch.nn.Linear) and any(n == e or n.endswith("." + e) for e in ends)]
    if not layers:
        raise InputError(f"the {'text encoder' if text else 'UNet'} has no linear {plan.targets} layers to slot")
    return layers


def split_inert(module: torch.nn.Module, example: tuple[torch.Tensor, ...],
                layers: list[tuple[str, torch.nn.Linear]]) -> tuple[list[tuple[str, torch.nn.Linear]], list[str]]:
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


def slot_inputs(layers: list[tuple[str, torch.nn.Linear]], rank: int) -> list[tuple[str, str, tuple[int | str, ...]]]:
    """The graph inputs of the slots, two per layer: ``down`` [rank, in], ``up`` [out, rank]."""
    out: list[tuple[str, str, tuple[int | str, ...]]] = []
    for name, m in layers:
        out.append((slot_input(name, "down"), "float", (rank, int(m.in_features))))
        out.append((slot_input(name, "up"), "float", (int(m.out_features), rank)))
    return out


def slot_example(layers: list[tuple[str, torch.nn.Linear]], rank: int,
                 g: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Factors for the trace and the parity gate: small and random, so the gate checks the slots' arithmetic."""
    args: list[torch.Tensor] = []
    for _, m in layers:
        args.append(torch.randn(rank, m.in_features, generator=g) * (0.5 / m.in_features ** 0.5))
        args.append(torch.randn(m.out_features, rank, generator=g) * (0.5 / rank ** 0.5))
    return tuple(args)


class Slotted(torch.nn.Module):
    """``inner`` (a UNet or text-encoder wrapper) whose slotted layers add ``up (down x)``: its own inputs, then the factors in
    ``slot_inputs`` order. The hooks live only for the call (the model is shared with the export's other
    components)."""

    def __init__(self, inner: torch.nn.Module, layers: list[tuple[str, torch.nn.Linear]],
                 inert: Sequence[str] = ()) -> None:
        super().__init__()
        self.inner = inner
        self.layers = [m for _, m in layers]  # not registered: the inner wrapper owns them
        self.inert = tuple(inert)  # targeted layers without a slot: they do not reach the outputs

    def forward(self, *args: torch.Tensor) -> object:
        n = len(args) - 2 * len(self.layers)
        base, factors = args[:n], args[n:]

        def hook(down: torch.Tensor, up: torch.Tensor) -> Callable[..., torch.Tensor]:
            return lambda _m, inp, out: out + F.linear(F.linear(inp[0], down), up)

        handles = [m.register_forward_hook(hook(factors[2 * i], factors[2 * i + 1]))
                   for i, m in enumerate(self.layers)]
        try:
            return self.inner(*base)
        finally:
            for h in handles:
                h.remove()


__all__ = ["LORA_PREFIX", "RANK_MAX", "TARGETS", "TEXT_TARGETS", "SlotPlan", "Slotted", "slot_example", "slot_inputs",
           "slot_layers", "split_inert"]
