"""MkDocs hook: lay the repository's folders out as the ``sdrt`` package for mkdocstrings.

The wheel maps folders into one namespace (``runtime/`` -> ``sdrt.runtime``, pyproject's ``package-dir``),
which griffe's static loader cannot follow; so the build first mirrors them, as links to the sources, in
``site-api/sdrt`` (git-ignored), and mkdocstrings reads the sources from there without importing them.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

from mkdocs.plugins import event_priority

ROOT = Path(__file__).resolve().parent
TREE = ROOT / "site-api"


@event_priority(100)  # before mkdocstrings' own on_config, which keeps only the handler paths that exist
def on_config(config: Any) -> Any:
    # pyproject's one-line table, read without tomllib (Python 3.11+; sdrt supports 3.10)
    table = re.search(r"^package-dir = \{(.*)\}$", (ROOT / "pyproject.toml").read_text(), re.MULTILINE)
    if table is None:
        raise RuntimeError("pyproject.toml has no one-line [tool.setuptools] package-dir table")
    dirs = dict(re.findall(r'"([\w.]+)" = "([\w./-]+)"', table.group(1)))
    if TREE.exists():
        shutil.rmtree(TREE)
    pkg = TREE / "sdrt"
    pkg.mkdir(parents=True)
    for name, folder in dirs.items():
        _link_sources(ROOT / folder, pkg.joinpath(*name.split(".")[1:]))
    return config


def _link_sources(src: Path, dst: Path) -> None:
    """Real folders with links to the ``.py`` files (griffe does not walk into linked folders)."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.suffix == ".py":
            (dst / f.name).symlink_to(f)
        elif f.is_dir() and (f / "__init__.py").is_file():
            _link_sources(f, dst / f.name)
