"""Which PyTorch parameter each ONNX initializer holds, so weights can be swapped in by name later.

The TorchScript exporter keeps most parameter names but constant-folds the transpose of every Linear
weight into a new initializer (``onnx::MatMul_1234``). Matching by content (a digest of the bytes, in
the exported dtype, as-is or transposed) recovers the mapping exactly, whatever names the exporter chose.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from onnx.external_data_helper import uses_external_data


def _digest(a: np.ndarray) -> str:
    return hashlib.blake2b(np.ascontiguousarray(a).tobytes(), digest_size=16).hexdigest() + str(a.shape)


def build_refit_map(model: onnx.ModelProto, module: torch.nn.Module, dtype: torch.dtype,
                    base_dir: str | os.PathLike[str] = "") -> dict[str, Any]:
    """Map initializer name -> {"param": name, "transpose": bool} for every initializer that is a weight.

    ``module`` is the diffusers/transformers module (parameter names as in its state dict). Initializers in
    external data are read from ``base_dir`` one at a time (``model`` is left as it is). Parameters
    whose values occur more than once (all-zero biases, say) are listed under ``"ambiguous"``: a refit
    must then set them together.
    """
    table: dict[str, list[tuple[str, bool]]] = {}
    for name, p in module.state_dict().items():
        t = p.detach().to(dtype).cpu()
        # numpy has no bf16: its bits as int16 (the digest reads bytes and shape, as the graph's bf16 array's)
        a = (t.view(torch.int16) if dtype == torch.bfloat16 else t).numpy()
        table.setdefault(_digest(a), []).append((name, False))
        if a.ndim == 2:
            table.setdefault(_digest(a.T), []).append((name, True))
        if a.ndim == 1:  # GroupNorm's affine parameters are folded as (C, 1, 1)
            table.setdefault(_digest(a.reshape(-1, 1, 1)), []).append((name, False))
    mapping: dict[str, dict[str, Any]] = {}  # "transpose" also covers the (C,1,1) reshape: same bytes
    ambiguous: dict[str, list[str]] = {}
    for init in model.graph.initializer:
        if uses_external_data(init):
            held = onnx.TensorProto()
            held.CopyFrom(init)  # to_array reads the bytes into the tensor it is given
            arr = numpy_helper.to_array(held, os.fspath(base_dir))
            del held
        else:
            arr = numpy_helper.to_array(init)
        if arr.size < 2:
            continue  # scalars are folded constants, not weights
        hits = table.get(_digest(arr))
        if not hits:
            continue
        name, transpose = hits[0]
        mapping[init.name] = {"param": name, "transpose": transpose}
        if len({h[0] for h in hits}) > 1:
            ambiguous[init.name] = sorted({h[0] for h in hits})
    return {"initializers": mapping, "ambiguous": ambiguous}
