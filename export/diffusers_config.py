"""The class a diffusers folder's configuration names (``_class_name``): how the loaders tell a FLUX.1, an SD 3 /
3.5 or a ControlNet folder from another before reading anything else."""

from __future__ import annotations

import json
from pathlib import Path


def class_name(config: Path) -> str | None:
    """The ``_class_name`` of a diffusers configuration file (a folder's model_index.json, a model's config.json);
    None where the file is missing, unreadable or names none."""
    if not config.is_file():
        return None
    try:
        name = json.loads(config.read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError):
        return None
    return name if isinstance(name, str) else None
