"""Every example in README.md and docs/ works: the Python ones run, the `sdrt` command lines parse.

Python blocks (```python) run in a folder where the names the examples use are tiny synthetic exports
(``sd15-onnx`` is ``sd15-tiny``, ``sdxl-onnx`` ``sdxl-tiny``, ``sd35-medium-onnx`` ``sd35-medium-tiny``, ...)
and images (``photo.png``, ...); the sizes 512, 768 and 1024 become 64, the tiny models' size, so a full-size example runs in seconds. A block
that cannot run here (a GPU, a real checkpoint) says so in a comment, ``# not run: <why>``, and is skipped
with that reason. Bash blocks (```bash): every line that starts with ``sdrt`` is parsed by the CLI's own
parser (the subcommand's options registered as ``sdrt.cli.main`` does), without running it; ``[...]`` marks
an optional part, which is parsed as if given.
"""

from __future__ import annotations

import importlib
import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
NOT_RUN = re.compile(r"#\s*not run:\s*(.+)")
FENCE = re.compile(r"^(\s*)```(\w*)\s*$")


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    lang: str
    code: str

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def blocks(path: Path) -> list[Block]:
    """The fenced code blocks of a Markdown file, dedented by their fence's indentation (list items)."""
    out: list[Block] = []
    lines = path.read_text().split("\n")
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, lang, start = len(m.group(1)), m.group(2), i
        body: list[str] = []
        i += 1
        while i < len(lines) and lines[i].strip() != "```":
            body.append(lines[i][indent:] if lines[i][:indent].strip() == "" else lines[i])
            i += 1
        out.append(Block(path, start + 1, lang, "\n".join(body) + "\n"))
        i += 1
    return out


ALL = [b for p in DOCS for b in blocks(p)]
PYTHON = [b for b in ALL if b.lang == "python"]
BASH = [b for b in ALL if b.lang == "bash"]


def sdrt_lines(code: str) -> list[str]:
    """The `sdrt ...` command lines of a shell block, continuations joined."""
    joined = re.sub(r"\\\n\s*", " ", code)
    return [line.strip() for line in joined.split("\n") if line.strip().startswith("sdrt ")]


def test_the_examples_are_found() -> None:
    """The extraction sees the blocks the docs hold (a broken fence would silently drop them)."""
    assert {b.path.name for b in PYTHON} >= {"README.md", "generate.md", "sdxl.md", "openvino.md"}
    assert len(PYTHON) >= 6
    commands = [c for b in BASH for c in sdrt_lines(b.code)]
    assert len(commands) >= 25
    assert {shlex.split(c)[1] for c in commands} >= {"export", "build", "refit", "generate", "serve", "bench"}
    skipped = [b for b in PYTHON if NOT_RUN.search(b.code)]
    assert skipped and all(NOT_RUN.search(b.code).group(1).strip() for b in skipped)  # each says why
    staged = [b for b in PYTHON if "prepare_latents(plan, 512, 512, seed=[1, 2])" in b.code]
    assert len(staged) == 1 and staged[0].path.name == "generate.md"


@pytest.mark.parametrize("block", BASH, ids=[b.id for b in BASH])
def test_sdrt_commands_parse(block: Block) -> None:
    from sdrt import cli

    for line in sdrt_lines(block.code):
        argv = [t.strip("[]") for t in shlex.split(line, comments=True)[1:]]
        argv = [t for t in argv if t]
        command = next(a for a in argv if not a.startswith("-"))
        assert command in cli.COMMANDS, f"{block.id}: unknown command in {line!r}"
        parser, subs = cli._parser()
        importlib.import_module(f"sdrt.commands.{command}").register(subs[command])
        try:
            args = parser.parse_args(argv)
        except SystemExit as e:  # argparse printed why
            pytest.fail(f"{block.id}: `{line}` does not parse (exit {e.code})")
        assert args.command == command


@pytest.fixture(scope="module")
def example_dir(tmp_path_factory: pytest.TempPathFactory, tiny_export, tiny_controlnet_export,
                deepcache_export, sd3_export, slotted_export, flux_export) -> Path:
    """A folder holding what the examples name: exports (tiny models; sd15-onnx, sd35-medium-onnx and
    flux-dev-onnx made with --feature-cache, which changes no uncached image) and input images."""
    import numpy as np
    from PIL import Image

    d = tmp_path_factory.mktemp("examples")
    folders = {"sd15-onnx": deepcache_export("sd15-tiny"), "sdxl-onnx": tiny_export("sdxl-tiny"),
               "refiner-onnx": tiny_export("sdxl-refiner-tiny"), "sd15-cn": tiny_controlnet_export(nets=1),
               "sd35-medium-onnx": sd3_export("sd35-medium-tiny", block_cache=True),
               "sd15-slots": slotted_export("sd15-tiny"),
               "flux-dev-onnx": flux_export("flux-dev-tiny", block_cache=True),
               "flux-fill-onnx": flux_export("flux-fill-dev-tiny"),
               "flux-kontext-onnx": flux_export("flux-kontext-dev-tiny"),
               "flux-depth-onnx": flux_export("flux-depth-dev-tiny")}
    for name, folder in folders.items():
        (d / name).symlink_to(folder, target_is_directory=True)
    from sdrt.export.loading import random_model

    from .helpers.models import make_lora

    (d / "loras").mkdir()
    unet = random_model("sd15-tiny").unet
    for i, name in enumerate(("watercolor", "detail")):  # attention LoRAs for the slotted export's examples
        make_lora(d / "loras" / f"{name}.safetensors", unet, None, "kohya", seed=i, rank=2,
                  unet_targets=("to_q", "to_k", "to_v", "to_out.0"))
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(d / "photo.png")
    edges = np.zeros((64, 64, 3), np.uint8)
    edges[16:48, 16] = edges[16:48, 47] = edges[16, 16:48] = edges[47, 16:48] = 255
    Image.fromarray(edges).save(d / "edges.png")
    mask = np.zeros((64, 64), np.uint8)
    mask[20:44, 20:44] = 255
    Image.fromarray(mask).save(d / "mask.png")
    return d


def run_example(block: Block) -> dict:
    """Run a block's code (sizes scaled to the tiny models) and return its namespace."""
    code = re.sub(r"\b(512|768|1024)\b", "64", block.code)
    namespace: dict = {"__name__": "__docs_example__"}
    # running the docs' own examples is what this test is for
    exec(compile(code, block.id, "exec"), namespace)  # noqa: S102
    return namespace


@pytest.mark.parametrize("block", PYTHON, ids=[b.id for b in PYTHON])
def test_python_example_runs(block: Block, request: pytest.FixtureRequest, tmp_path: Path,
                             monkeypatch: pytest.MonkeyPatch) -> None:
    reason = NOT_RUN.search(block.code)
    if reason:
        pytest.skip(f"{block.id}: {reason.group(1).strip()}")
    if "OvBackend" in block.code:
        pytest.importorskip("openvino", reason="the openvino extra is not installed")
    example_dir: Path = request.getfixturevalue("example_dir")  # the exports only for blocks that run
    monkeypatch.chdir(example_dir)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # openvino's compiled models ("auto")
    before = set(os.listdir(example_dir))
    ns = run_example(block)
    for name in set(os.listdir(example_dir)) - before:  # the images an example saved
        assert name.endswith(".png"), name
        os.remove(example_dir / name)
    for value in ns.values():
        close = getattr(value, "close", None)
        if type(value).__name__ == "Pipeline" and callable(close):
            close()


def test_the_staged_example_makes_one_image_per_seed(example_dir: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """prepare_latents(plan, H, W, seed=[1, 2]) makes two images' latents (batch_size from the seeds), and the
    stages give the images the one-call API gives for those seeds."""
    import numpy as np

    import sdrt

    (block,) = [b for b in PYTHON if "prepare_latents(plan, 512, 512, seed=[1, 2])" in b.code]
    monkeypatch.chdir(example_dir)
    ns = run_example(block)
    assert len(ns["images"]) == 2 and ns["nonfinite"] == [False, False]
    assert ns["images"][0].size == (64, 64)
    with sdrt.Pipeline.load("sd15-onnx", backend=ns["pipe"].backend.name) as pipe:
        ref = pipe("a cat", negative_prompt="blurry", height=64, width=64, steps=30, sampler="dpmpp-2m",
                   guidance_scale=7.5, seed=[1, 2], batch_size=2).images
    for got, want in zip(ns["images"], ref, strict=True):
        assert np.array_equal(np.asarray(got), np.asarray(want))
