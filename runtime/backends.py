"""The backend a pipeline runs on, by name: ``make_backend`` picks and configures one (``auto``: TensorRT for an
engine folder, else ort-cuda with a GPU, else OpenVINO, else ONNX Runtime's CPU EP)."""

from __future__ import annotations

from pathlib import Path

from .engine import Backend
from .errors import CompatibilityError, InputError, SdrtError

BACKENDS = ("auto", "ort-cpu", "ort-cuda", "tensorrt", "openvino")


def make_backend(name: str, folder: Path, threads: int | None = None, cuda_graph: bool | None = None,
                 device_id: int = 0, precision: str | None = None, share: Backend | None = None,
                 static_shapes: bool = False) -> Backend:
    """``cuda_graph`` None: the backend's default (tensorrt: on; ort-cuda: off). ``precision``: openvino's
    inference precision (``auto``, ``bf16``, ``fp32``); None: its default, ``auto``. Other backends compute
    in their graphs' (or engines') precision and refuse it. ``share``: a tensorrt backend whose device,
    stream and scratch block a second model uses (other backends have nothing to share: each ONNX Runtime
    session keeps its own arena). ``static_shapes``: openvino compiles each graph for the exact shapes of its
    calls (once per new shape) instead of once with dynamic axes; other backends refuse it."""
    from .ort_backend import OrtBackend

    name = resolve_backend(name, folder)
    if cuda_graph and name in ("ort-cpu", "openvino"):
        raise InputError(f"cuda_graph needs a GPU backend (ort-cuda or tensorrt); the backend here is {name}")
    if precision is not None and name != "openvino":
        raise InputError(
            f"precision={precision!r} sets the openvino backend's inference precision; the backend here is {name}, "
            "which computes in its graphs' precision (choose that at export or build): leave precision out, or "
            "use backend=\"openvino\"",
            cli=f"--precision sets the openvino backend's inference precision; the backend here is {name}, which "
                "computes in its graphs' precision (chosen at `sdrt export`, --fp32 or the fp16 default): leave "
                "--precision out, or use --backend openvino")
    if static_shapes and name != "openvino":
        raise InputError(f"static_shapes compiles the openvino backend's graphs per shape; the backend here is {name}: "
                         "leave static_shapes out, or use backend=\"openvino\"",
                         cli=f"--static-shapes is for the openvino backend; the backend here is {name}: leave it out, "
                             "or use --backend openvino")
    if name == "openvino":
        from .ov_backend import OvBackend

        return OvBackend(threads=threads, precision=precision or "auto", static_shapes=static_shapes)
    if name == "tensorrt":
        from .trt_backend import TrtBackend

        shared = share if isinstance(share, TrtBackend) else None
        return TrtBackend(folder, device_id=device_id, cuda_graph=cuda_graph is not False, share=shared)
    if name == "ort-cuda":
        return OrtBackend("cuda", threads=threads, cuda_graph=bool(cuda_graph), device_id=device_id)
    return OrtBackend("cpu", threads=threads)


def resolve_backend(name: str, folder: Path) -> str:
    """The backend ``name`` means for ``folder`` on this machine (``auto``: tensorrt for an engine folder, else
    ort-cuda where a GPU is, else openvino where it is installed, else ort-cpu), checked against the folder's
    kind; nothing is loaded."""
    from .ort_backend import cuda_available

    if name not in BACKENDS:
        raise InputError(f"unknown backend {name!r}; choose one of: {', '.join(BACKENDS)}")
    engine_folder = (folder / "sdrt-engines.json").is_file()
    if engine_folder and name in ("ort-cpu", "ort-cuda", "openvino"):
        raise engine_folder_error(folder, name)
    if name != "auto":
        return name
    if engine_folder:
        return "tensorrt"
    if cuda_available():
        return "ort-cuda"
    # measured: OpenVINO (bf16 where the CPU has it) is 2.25x ort-cpu on a full-size UNet step
    from .ov_backend import available as openvino_available

    return "openvino" if openvino_available() else "ort-cpu"


def engine_folder_error(folder: Path, backend: str) -> CompatibilityError:
    """An engine folder opened with an ONNX Runtime backend: name the backend, or the export it came from."""
    from .engine_manifest import EngineManifest

    try:
        onnx_dir: str | None = EngineManifest.read(folder, allow_old=True).onnx_dir
    except SdrtError:
        onnx_dir = None
    source = f"the ONNX export it was built from, {onnx_dir}" if onnx_dir else "the ONNX export it was built from"
    head = f"{folder} is a TensorRT engine folder (made by `sdrt build`), which {backend} cannot run"
    return CompatibilityError(
        f"{head}: load it with backend=\"tensorrt\", or load {source} with backend={backend!r}",
        cli=f"{head}: use --backend tensorrt, or pass {source} with --backend {backend}",
    )
