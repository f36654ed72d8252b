"""The ``sdrt`` command. The only place that prints, draws progress bars and exits.

Each subcommand lives in ``sdrt.commands.<name>`` with ``register(subparsers)`` and ``run(args) -> int``,
and is imported only when invoked, so ``sdrt info`` never pays for torch.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# name -> one-line help; the module sdrt.commands.<name> holds the rest
COMMANDS: dict[str, str] = {
    "demo": "draw a prompt with the shapes model sdrt ships, say what the picture shows, print timings (no GPU, no download)",
    "export": "export a checkpoint (or synthetic weights) to ONNX, verified against PyTorch",
    "build": "build TensorRT engines from an ONNX export",
    "refit": "apply new weights or LoRAs to a refittable TensorRT engine",
    "generate": "generate images from an ONNX export or engine folder",
    "bench": "benchmark it/s, per-stage latency and memory against PyTorch",
    "serve": "serve a model over HTTP (OpenAI images API, AUTOMATIC1111 API) with request batching",
    "info": "backends found, GPU, versions",
}


def version() -> str:
    """The installed distribution's version; a checkout run without installing has sdrt.__version__."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("sdrt")
    except PackageNotFoundError:
        import sdrt

        return str(getattr(sdrt, "__version__", "unknown"))


class _Version(argparse.Action):
    """argparse's version action, with the version looked up only when asked (the lookup scans the installed
    distributions)."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS, help: str | None = None) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help=help)

    def __call__(self, parser: argparse.ArgumentParser, namespace: object, values: object,
                 option_string: str | None = None) -> None:
        print(f"sdrt {version()}")  # stdout, as argparse's own version action
        parser.exit()


def _parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    parser = argparse.ArgumentParser(prog="sdrt", description="Stable Diffusion on ONNX Runtime and TensorRT")
    parser.add_argument("--version", action=_Version, help="print sdrt's version and exit")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    subs = {name: sub.add_parser(name, help=help_, description=help_) for name, help_ in COMMANDS.items()}
    return parser, subs


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, subs = _parser()
    # Only the chosen subcommand's module is imported (and registers its options).
    chosen = next((a for a in argv if a in COMMANDS), None)
    if chosen is None:
        args = parser.parse_args(argv)
        parser.print_help()
        return 2
    module = importlib.import_module(f"sdrt.commands.{chosen}")
    module.register(subs[chosen])
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")

    from sdrt.runtime.errors import SdrtError

    try:
        return int(module.run(args) or 0)
    except SdrtError as e:
        print(f"sdrt {chosen}: error: {e.for_cli()}", file=sys.stderr)
        return 1
    except ModuleNotFoundError as e:
        from sdrt.commands._extras import missing_extra

        message = missing_extra(chosen, e)
        if message is None:
            raise
        print(f"sdrt {chosen}: error: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"sdrt {chosen}: interrupted; nothing was left half-written", file=sys.stderr)
        return 130
