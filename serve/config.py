"""What a server is started with: batching, backpressure, deadlines, limits, auth."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

API_KEY_ENV = "SDRT_API_KEY"


@dataclass
class ServeConfig:
    max_batch: int = 8  # images per UNet batch (capped by the engines' batch limit)
    batch_window_ms: float = 10.0  # how long the oldest request waits for companions
    max_queue: int = 64  # requests waiting; beyond: 429 with Retry-After
    request_timeout_s: float = 300.0  # a request still queued past this gets 504
    batching: bool = True  # False: every request runs in a batch of its own
    api_key: str | None = field(default_factory=lambda: os.environ.get(API_KEY_ENV) or None)
    max_body_bytes: int = 16 * 1024 * 1024
    max_pixels: int = 1024 * 1024  # width * height of a generated image
    max_upload_pixels: int = 2048 * 2048  # width * height of an uploaded image, checked before decoding
    max_n: int | None = None  # images per request; default: max_batch
    max_prompt_chars: int = 2000
    max_steps: int = 100
    default_steps: int = 30
    default_guidance: float = 7.5
    default_sampler: str | None = None  # None: the model's (dpmpp-2m; flow-euler for a flow-matching model)
    image_dir: Path | None = None  # where response_format=url keeps images; None refuses url
    lora_dir: Path | None = None  # the LoRAs requests may name (an export made with --lora-slots); None: none
    static_shapes: bool = False  # openvino: compile each graph per request shape (3% per image; 10 s per new size)
    grace_s: float = 30.0  # SIGTERM: how long in-flight batches may take to finish
    warmup: bool = True
    model_id: str | None = None  # the name /v1/models lists; default: the folder's name
    retry_after_s: int = 1
    # finish loading and warming up before the app's startup returns: under Ray Serve, a replica then
    # receives requests only once it can run them
    load_before_serving: bool = False

    def check(self) -> None:
        """Refuse a setting out of its range (InputError naming the flag), before anything is loaded or bound."""
        from sdrt.runtime.errors import InputError

        at_least = (("max_batch", "--max-batch", 1), ("max_queue", "--max-queue", 1),
                    ("max_body_bytes", "--max-body-bytes", 1), ("max_pixels", "--max-pixels", 64 * 64),
                    ("max_upload_pixels", "--max-upload-pixels", 64 * 64), ("max_steps", "--max-steps", 1),
                    ("max_prompt_chars", "--max-prompt-chars", 1), ("batch_window_ms", "--batch-window-ms", 0),
                    ("grace_s", "--grace", 0))
        for name, flag, low in at_least:
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not v >= low:
                raise InputError(f"{name} {v!r} must be at least {low}", cli=f"{flag} {v!r} must be at least {low}")
        if self.max_n is not None and not 1 <= self.max_n:
            raise InputError(f"max_n {self.max_n!r} must be at least 1 (or None: max_batch)",
                             cli=f"--max-n {self.max_n!r} must be at least 1 (or leave it out: --max-batch)")
        if self.lora_dir is not None and not Path(self.lora_dir).is_dir():
            raise InputError(f"lora_dir {self.lora_dir} is not a folder; give a folder of LoRA .safetensors files",
                             cli=f"--lora-dir {self.lora_dir} is not a folder; give a folder of LoRA .safetensors files")
        if not self.request_timeout_s > 0:
            raise InputError(f"request_timeout_s {self.request_timeout_s!r} must be above 0",
                             cli=f"--request-timeout {self.request_timeout_s!r} must be above 0 seconds")

    @property
    def images_per_request(self) -> int:
        return min(self.max_n or self.max_batch, self.max_batch)
