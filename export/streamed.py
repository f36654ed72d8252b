"""Exporting a component too large to hold in memory (SD 3.5 Large's transformer, T5-XXL): its graph traced on
fake tensors, its weights streamed into the ONNX external data one tensor at a time.

The module is built inside ``FakeTensorMode`` (shapes and dtypes only: no weight is allocated), captured by
``torch.export`` with dynamic shapes and converted by ``torch.onnx``'s dynamo exporter. Its initializers keep
the module's parameter names; each is then bound to a lazy tensor that reads the weight from its source (a
checkpoint's safetensors, memory-mapped, or seeded synthetic values) only while the external data file is
written. Peak memory is the graph plus the largest tensor, not the model.

torch 2.13's ``torch.onnx`` has no fake mode of its own (``torch.onnx.export(module, dynamo=True)`` runs
the module on real tensors); exporting the ``ExportedProgram`` made under fake mode is the way that holds.
The TorchScript exporter, which the in-memory path uses, cannot trace meta or fake tensors.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sdrt.runtime.atomic import give_default_mode
from sdrt.runtime.errors import ArtifactError
from sdrt.runtime.manifest import Component

from .onnx_export import component_entry, fp32_interface

STREAM_OPSET = 18  # the dynamo exporter's oldest opset
WeightSource = Callable[[str], torch.Tensor]  # a parameter's name in the component's module -> its value
IoSpec = list[tuple[str, str, tuple[int | str, ...]]]


@dataclass(frozen=True)
class StreamedSpec:
    """What to export: ``build`` makes the float32 wrapper module (called inside fake mode; its parameters are
    named ``prefix`` + the checkpoint's names), ``example`` fake example inputs, ``dynamic`` torch.export's
    dynamic shapes by input name; I/O as ``ComponentSpec``'s ("float" follows the precision; a bf16 graph's
    is float32)."""

    name: str
    build: Callable[[], torch.nn.Module]
    prefix: str
    inputs: IoSpec
    outputs: IoSpec
    example: Callable[[], tuple[torch.Tensor, ...]]
    dynamic: Callable[[], dict[str, Any]]
    fp16_overflows: bool = False


def _torch_dtype(precision: str) -> torch.dtype:
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision, torch.float32)


def trace(spec: StreamedSpec, precision: str) -> tuple[Any, dict[str, str]]:
    """(the ONNX IR model with fake initializers, alias -> canonical parameter name for tied weights)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    default = torch.get_default_dtype()
    with FakeTensorMode():
        torch.set_default_dtype(_torch_dtype(precision))  # built in the precision: fake tensors cannot be cast
        try:
            module = spec.build().eval()
        finally:
            torch.set_default_dtype(default)
        # tied weights (T5's embed_tokens is its shared embedding) appear under each name in the graph
        canonical: dict[int, str] = {}
        aliases: dict[str, str] = {}
        for n, p in [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]:
            aliases[n] = canonical.setdefault(id(p), n)
        args = tuple(a.to(_torch_dtype(precision)) if kind == "float" else a
                     for a, (_, kind, _) in zip(spec.example(), spec.inputs, strict=True))
        program = torch.export.export(module, args, dynamic_shapes=spec.dynamic())
    quiet = logging.getLogger("torch.onnx")  # its notes on torchvision's absent operators are not the user's
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # the inputs named as the spec names them (a wrapper taking *args, LoRA slots', would be args_0, ...)
            onnx_program = torch.onnx.export(program, dynamo=True, opset_version=STREAM_OPSET, optimize=False,
                                             input_names=[n for n, _, _ in spec.inputs],
                                             output_names=[n for n, _, _ in spec.outputs], verbose=False)
    finally:
        quiet.setLevel(level)
    model = onnx_program.model
    names = [n for n, _, _ in spec.inputs]
    if len(model.graph.inputs) == len(names):  # a wrapper's *args come out as args_0, ...: the contract's names
        for value, name in zip(model.graph.inputs, names, strict=True):
            value.name = name
    return model, aliases


def export_streamed(spec: StreamedSpec, weights: WeightSource, precision: str, folder: Path, *,
                    progress: Callable[[str], None] = lambda msg: None) -> Component:
    """Export ``spec`` into ``folder/model.onnx`` + ``model.onnx_data`` with every weight read from ``weights``
    as it is written; returns its manifest entry (no parity figures: see ``check_streamed`` for the gate)."""
    import onnx
    import onnx_ir as ir

    precision = "fp32" if spec.fp16_overflows and precision == "fp16" else precision
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    progress(f"tracing {spec.name} on fake tensors ({precision})")
    model, aliases = trace(spec, precision)
    inits = list(model.graph.initializers.values())
    progress(f"traced {spec.name} in {time.perf_counter() - t0:.1f} s; streaming {len(inits)} weights")
    sums: dict[str, int] = {}
    for value in inits:
        name = aliases.get(value.name, value.name)
        if not name.startswith(spec.prefix):
            raise ArtifactError(f"{spec.name}: the graph holds a constant {value.name!r} that is no weight of the "
                                "model; this architecture cannot be streamed (export it in memory)")
        fake = value.const_value
        assert fake is not None
        # each weight in the dtype the graph was traced with (the precision's; a buffer the model keeps in
        # float32, such as SD3's position grid, stays so)
        shape, dtype = tuple(int(d) for d in fake.shape), fake.dtype
        value.const_value = ir.LazyTensor(_loader(weights, name[len(spec.prefix):], shape, dtype, spec.name, sums,
                                                  value.name), dtype=dtype, shape=ir.Shape(shape), name=value.name)
    path = folder / "model.onnx"
    ir.save(model, str(path), external_data="model.onnx_data")
    give_default_mode(folder / "model.onnx_data")
    if precision == "bf16":  # float32 inputs and outputs, cast at the graph's edges; the weights stay where written
        graph = onnx.load(str(path), load_external_data=False)
        fp32_interface(graph.graph)
        onnx.save_model(graph, str(path))
    onnx.checker.check_model(str(path))  # the graph file only: the weights are not read
    progress(f"wrote {spec.name} in {time.perf_counter() - t0:.1f} s; reading every weight back")
    checked = verify_weights(path, sums)
    progress(f"exported {spec.name} in {time.perf_counter() - t0:.1f} s (streamed; {checked} weights read back "
             "equal to what was written)")
    return component_entry(folder, precision, spec.inputs, spec.outputs, None)


def verify_weights(path: Path, sums: dict[str, int]) -> int:
    """Read every initializer of a written graph back from its external data, one at a time, and compare its
    crc32 with that of the bytes its source gave the writer (``sums``, by initializer name): what a streamed
    export can check within the memory of one tensor, without reading the source again. Returns the number
    checked; raises ArtifactError naming the first that differs or is missing."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    data = path.parent / "model.onnx_data"
    # read with seek + read, not a memory map: mapped pages of a 16 GB file would count as the process's memory
    with open(data if data.is_file() else path, "rb") as blob:
        for init in model.graph.initializer:
            info = {e.key: e.value for e in init.external_data}
            if info:
                blob.seek(int(info.get("offset", 0)))
                raw = blob.read(int(info["length"]))
            else:
                raw = init.raw_data
            if init.name not in sums or zlib.crc32(raw) != sums[init.name]:
                raise ArtifactError(f"{path}: weight {init.name} was not written as its source gave it; the export "
                                    "is incomplete: export again (is the disk full?)")
    return len(model.graph.initializer)


def _loader(weights: WeightSource, name: str, shape: tuple[int, ...], dtype: Any, component: str,
            sums: dict[str, int], key: str) -> Callable[[], Any]:
    """The lazy tensor's function: ``name`` from the source, checked against the traced shape and cast to the
    traced dtype; the crc32 of the bytes handed to the writer goes into ``sums[key]`` (the read-back check's)."""
    import onnx_ir as ir

    def load() -> Any:
        t = weights(name)
        if tuple(t.shape) != shape:
            raise ArtifactError(f"{component}: weight {name} is {list(t.shape)} in the checkpoint but the "
                                f"architecture needs {list(shape)}: the checkpoint is not this model")
        np_dtype = dtype.numpy()
        # a float weight via float32 (numpy has no bf16: a bf16 checkpoint's tensors too), then the traced dtype
        a = t.detach().to(torch.float32 if t.is_floating_point() else t.dtype).numpy().astype(np_dtype, copy=False)
        a = np.ascontiguousarray(a)
        sums[key] = zlib.crc32(a.view(np.uint8).data)  # bytes (ml_dtypes' bf16 exports no buffer format)
        return ir.Tensor(a)

    return load


# -- weight sources -----------------------------------------------------------------------------------------

def checkpoint_weights(folder: Path) -> WeightSource:
    """A diffusers / transformers component folder's safetensors (one file, or shards with their index), read
    one tensor at a time (memory-mapped)."""
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ArtifactError(f"{folder} holds no .safetensors weights (sdrt never unpickles .bin checkpoints for a "
                            "streamed export); convert them to safetensors first")
    where: dict[str, Path] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            for k in h.keys():  # noqa: SIM118 - safe_open has no iterator
                where[k] = f

    def get(name: str) -> torch.Tensor:
        if name not in where:
            raise ArtifactError(f"{folder}: the checkpoint has no weight {name!r}; it is not this architecture")
        with safe_open(str(where[name]), framework="pt") as h:
            return h.get_tensor(name)

    return get


def module_weights(module: torch.nn.Module) -> WeightSource:
    """A module already in memory (a small model, or the tests' reference) as a weight source."""
    state = module.state_dict()

    def get(name: str) -> torch.Tensor:
        if name not in state:
            raise ArtifactError(f"the module has no weight {name!r}")
        return state[name]

    return get


def synthetic_weights(seed: int, shapes: dict[str, tuple[int, ...]]) -> WeightSource:
    """Seeded stand-in weights for a full-size architecture that is never built in memory: biases 0, 1-D
    norm scales 1, everything else normal with std 1/sqrt(fan-in) (so activations keep their scale); each
    tensor drawn from its own generator (the seed and its name), so the same name always gets the same values."""

    def get(name: str) -> torch.Tensor:
        shape = shapes[name]
        if name.endswith("bias"):
            return torch.zeros(shape)
        if len(shape) == 1:
            return torch.ones(shape)
        g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        fan_in = math.prod(shape[1:]) if len(shape) > 1 else shape[0]
        return torch.randn(shape, generator=g) / math.sqrt(max(fan_in, 1))

    return get


def fake_shapes(build: Callable[[], torch.nn.Module], prefix: str) -> dict[str, tuple[int, ...]]:
    """Every parameter and buffer's shape of a module built in fake mode (names without ``prefix``)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        module = build()
        return {n[len(prefix):]: tuple(int(d) for d in t.shape)
                for n, t in [*module.named_parameters(), *module.named_buffers()]}


def materialize(spec: StreamedSpec, weights: WeightSource) -> torch.nn.Module:
    """The component ``spec`` streams, held in memory after all (float32, eval mode): built on the meta device,
    every parameter and buffer then read from ``weights`` under the names the streamed export gives them, so it
    computes what the export does. For a reference that needs the PyTorch module (the bench's diffusers
    baseline), on a machine with room for it. Tied weights stay tied."""
    with torch.device("meta"):
        wrapper = spec.build()
    made: dict[int, torch.Tensor] = {}
    pairs = [*wrapper.named_parameters(remove_duplicate=False), *wrapper.named_buffers(remove_duplicate=False)]
    for name, t in pairs:
        if id(t) not in made:  # the first name of a tied weight is the one the export reads (named_parameters')
            value = weights(name[len(spec.prefix):])
            value = value.to(torch.float32 if t.is_floating_point() else t.dtype)
            if tuple(value.shape) != tuple(t.shape):
                raise ArtifactError(f"{spec.name}: the weight {name!r} is {tuple(value.shape)}, the architecture "
                                    f"wants {tuple(t.shape)}")
            made[id(t)] = torch.nn.Parameter(value, requires_grad=False) if isinstance(t, torch.nn.Parameter) \
                else value
        owner, _, leaf = name.rpartition(".")
        setattr(wrapper.get_submodule(owner), leaf, made[id(t)])
    return wrapper.get_submodule(spec.prefix.rstrip(".")).float().eval()
