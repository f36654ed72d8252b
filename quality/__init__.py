"""The shapes model: a tiny Stable Diffusion trained here on captioned pictures of shapes, and the score
that reads back whether an image shows what its prompt asked.

- ``shapes``: the captioned data set, drawn by code (seeded; nothing downloaded).
- ``score``: exact rules on the drawn shapes that read a picture's shape, colour, position and background.
- ``model``: the committed diffusers folder (trained by ``python -m sdrt.quality.train``).
- ``lora``: a LoRA for it that draws every shape larger than the base ever saw (``train --lora``).
- ``suite``: the fixed prompts and seeds that ``sdrt demo`` and ``sdrt bench --quality`` score.

Everything but ``train`` needs numpy and Pillow only.
"""

from pathlib import Path

MODEL_DIR = Path(__file__).parent / "model"
LORA_FILE = Path(__file__).parent / "lora" / "large.safetensors"  # its training record: large.json beside it
