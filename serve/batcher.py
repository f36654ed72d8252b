"""Request batching: a bounded queue, compatibility keys, a batch window, deadlines, cancellation, and one
worker thread per device.

The batching rule: requests whose images can share one UNet batch without changing any image run
together. They must agree on size, steps, sampler, guided-or-not, the guidance scale (one ``guidance``
input per sampler step), the number of 77-token prompt chunks (the text encoder pads a batch to its
longest prompt, so a long prompt would change its neighbours' conditioning) and the feature-caching policy
(a loop runs one plan of full-UNet and shallow steps for all its rows). img2img and inpainting
requests run on their own (one init image and mask per pipeline call). Requests with control images (ControlNets,
FLUX.1 Depth / Canny) share a batch only with requests of the same control images (by their pixels' digest) and
settings: the pipeline takes one control image per net for every row of a call. Each keeps its own prompt,
negative prompt and seeds, and since the pipeline draws one noise generator per image, its images are
bit-identical to running alone.
The oldest queued request always leads the next batch, so no request starves.

At saturation the clients of the batch that just finished are still on their way back when the worker
frees up; taking the queue at that instant would split them over two smaller batches, and the split would
persist. So a worker back from a batch of n images, with m images queued meanwhile, waits until n + m are
queued (all the clients it has recently seen), at most one window or 5% of that batch's run time,
whichever is longer (so waiting for clients that do not return costs at most 5% of throughput); two groups
of clients that alternated merge into one batch. PNG encoding runs on a small pool of its own, so the
worker starts the next batch while the last one's images are encoded.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import io
import itertools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, cast

import numpy as np

from sdrt.runtime.errors import SdrtError
from sdrt.runtime.feature_cache import CachePolicy
from sdrt.runtime.layer_skip import SkipGuidance
from sdrt.runtime.request import GenerationRequest

log = logging.getLogger("sdrt.serve")


class QueueFull(SdrtError):
    """The queue holds ``max_queue`` requests; retry later (HTTP 429)."""


class DeadlineExceeded(SdrtError):
    """A request waited past its deadline before its batch could start (HTTP 504)."""


class ShuttingDown(SdrtError):
    """The server is stopping and takes no new work (HTTP 503)."""


_ids = itertools.count()
# a worker back from a batch waits for its clients at most this share of the batch's run time
RETURN_SHARE = 0.05


@dataclass
class Job:
    """One request's images: a ``GenerationRequest`` with one prompt, negative and seed per image, and its place
    in the queue (deadline, id, batch key, future)."""

    request: GenerationRequest
    deadline: float = float("inf")  # time.monotonic()
    request_id: str = ""
    key: tuple[Any, ...] = ()
    enqueued: float = 0.0
    future: concurrent.futures.Future[JobResult] = field(default_factory=concurrent.futures.Future)

    @classmethod
    def of(cls, prompts: list[str], negatives: list[str] | None, seeds: list[int], height: int, width: int,
           steps: int, sampler: str, guidance: float, *, image: Any = None, strength: float | None = 0.8,
           mask: Any = None, paste_back: float | None = None, padding_mask_crop: int | None = None,
           cache: CachePolicy | None = None,
           loras: list[tuple[str, float]] | None = None, prompt_syntax: str = "plain",
           max_sequence_length: int | None = None, reference: Any = None, skip: SkipGuidance | None = None,
           control: dict[str, Any] | None = None) -> Job:
        """A job from an API's fields: ``negatives`` None: no negative prompt at all (the model's rule for that
        applies: SDXL zeroes the negatives); ``image`` (img2img, a PIL image of height x width) with
        ``strength`` (None: the pipeline's default; inpainting: 1), ``mask`` (inpainting: white = repaint) and
        ``paste_back`` (the original pasted back through the mask blurred this much), ``padding_mask_crop`` (inpaint
        only the mask's region, padded this much, at the full size; the pipeline's argument); ``cache``: the feature-caching
        policy (None: every step runs the full UNet); ``loras``: (name, scale) pairs, checked (``checks.loras_of``);
        ``prompt_syntax``: how the prompts are read ("plain"; "a1111": A1111's emphasis and BREAK; "compel");
        ``max_sequence_length``: T5's tokens per prompt (None: the model's default); ``reference``: an editing
        model's (FLUX.1 Kontext) image to edit, resized by the pipeline; ``skip``: skip-layer guidance, checked
        (``checks.skip_guidance_of``); ``control``: the Pipeline's control keywords (``control_images`` and the rest),
        checked (``control.check``)."""
        caching = loop_fields(cache, skip)
        return cls(GenerationRequest(prompt=list(prompts), negative_prompt=None if negatives is None else list(negatives),
                                     height=height, width=width, steps=steps, guidance_scale=guidance, sampler=sampler,
                                     seed=list(seeds), image=image, strength=None if image is None else strength,
                                     mask_image=mask, paste_back=paste_back, padding_mask_crop=padding_mask_crop,
                                     loras=loras or None,
                                     prompt_syntax=prompt_syntax, max_sequence_length=max_sequence_length,
                                     reference_image=reference, **caching, **(control or {})))

    @property
    def prompts(self) -> list[str]:
        return list(self.request.prompt or [])

    @property
    def negatives(self) -> list[str] | None:
        neg = self.request.negative_prompt
        return None if neg is None else list(neg)

    @property
    def seeds(self) -> list[int]:
        return list(cast("list[int]", self.request.seed))  # Job.of gives every image its seed

    @property
    def n(self) -> int:
        return len(self.prompts)


def loop_fields(cache: CachePolicy | None, skip: SkipGuidance | None) -> dict[str, Any]:
    """A checked feature-caching policy and skip-layer guidance as ``GenerationRequest``'s fields ({}: neither)."""
    out: dict[str, Any] = {} if cache is None else {"cache": cache.kind, "cache_interval": cache.interval,
                                                    "cache_schedule": cache.schedule, "cache_threshold": cache.threshold}
    if skip is not None:
        out.update(skip_layer_guidance_scale=skip.scale, skip_layer_guidance_start=skip.start,
                   skip_layer_guidance_stop=skip.stop)
    return out


@dataclass
class JobResult:
    png: list[bytes]
    seeds: list[int]
    timings: dict[str, Any]  # the batch's stage timings (ms), queue_ms, batch_images, batch_requests
    nonfinite: list[bool]


class Batcher:
    """Runs queued jobs in compatible batches on ``pipes`` (one worker thread each).

    ``loaders``: callables that return a loaded Pipeline, run in the worker thread (so the event loop
    stays free while engines load); ``warmup``: run one small generation before reporting ready.
    ``batching=False`` runs each request in a batch of its own (the baseline the benchmark compares with).
    """

    def __init__(self, loaders: Sequence[Callable[[], Any]], *, max_batch: int = 8, window_s: float = 0.01,
                 max_queue: int = 64, batching: bool = True, warmup: bool = True,
                 on_batch: Callable[[list[Job], dict[str, Any]], None] | None = None,
                 owns_pipelines: bool = True) -> None:
        if max_batch < 1 or max_queue < 1 or window_s < 0:
            raise ValueError("max_batch and max_queue must be >= 1 and the window >= 0")
        self.max_batch = max_batch
        self.window_s = window_s
        self.max_queue = max_queue
        self.batching = batching
        self.warmup = warmup
        self.on_batch = on_batch
        self.owns_pipelines = owns_pipelines
        self.pipes: list[Any] = []
        self._loaders = list(loaders)
        self._queue: list[Job] = []
        self._cond = threading.Condition()
        self._closed = False
        self._stopping = False
        self._running = 0  # batches in flight
        self._ready = threading.Event()
        self._failed: BaseException | None = None
        self._loaded = 0
        self._threads: list[threading.Thread] = []
        # zlib releases the GIL, so encoding overlaps the next batch's device work
        self._encoder = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="sdrt-serve-png")

    # -- lifecycle ----------------------------------------------------------------------------------
    def start(self) -> None:
        for i, loader in enumerate(self._loaders):
            t = threading.Thread(target=self._worker, args=(loader,), name=f"sdrt-serve-worker-{i}", daemon=True)
            t.start()
            self._threads.append(t)

    @property
    def ready(self) -> bool:
        return self._ready.is_set() and not self._closed

    @property
    def failed(self) -> BaseException | None:
        return self._failed

    def wait_ready(self, timeout: float | None = None) -> bool:
        return self._ready.wait(timeout)

    def close(self, grace_s: float = 30.0) -> None:
        """Take no new work; fail what is still queued; let batches in flight finish within ``grace_s``."""
        with self._cond:
            self._closed = True
            self._stopping = True
            left, self._queue = self._queue, []
            self._cond.notify_all()
        for job in left:
            _fail(job, ShuttingDown("the server is shutting down; retry on another replica"))
        for t in self._threads:
            t.join(grace_s)
        self._encoder.shutdown(wait=True)  # the images of the batches that finished are delivered
        if self.owns_pipelines:
            for p in self.pipes:
                p.close()

    # -- the queue ------------------------------------------------------------------------------------
    @property
    def depth(self) -> int:
        return len(self._queue)

    @property
    def in_flight(self) -> int:
        return self._running

    def key(self, job: Job) -> tuple[Any, ...]:
        """What must agree for jobs to share a UNet batch without changing any image."""
        r = job.request
        guided = r.guidance_scale > 1.0
        pipe = self.pipes[0] if self.pipes else None
        # the pipeline says what its conditioning needs to agree on (guidance, text chunks, the family's rules)
        conditioning = (pipe.conditioning_key(job.prompts, job.negatives, r.guidance_scale, r.prompt_syntax,
                                              r.max_sequence_length) if pipe is not None else ())
        # an image request runs alone; so does one cached by a threshold: the rule decides on the whole batch's
        # residual, so a neighbour would change which of its steps run in full
        policy = r.cache_policy
        solo = next(_ids) if r.image is not None or r.reference_image is not None or (
            policy is not None and policy.threshold is not None) else None
        # cached and uncached requests (or other intervals / schedules) run different per-step plans; a LoRA set
        # is the UNet's inputs for the whole batch (the factors are shared by its rows, not per image)
        loras = tuple((str(n), float(s)) for n, s in r.loras or ())
        # skip-layer guidance (or its window) is the denoiser's for the whole batch; so are the control images and
        # their settings (one per net for every row of a call): only requests with the same ones share a batch
        return (r.height, r.width, r.steps, r.sampler, guided, r.guidance_scale if guided else None,
                conditioning, policy, loras, r.prompt_syntax, r.skip_guidance, control_identity(r), solo)

    def submit(self, job: Job) -> concurrent.futures.Future[JobResult]:
        """Queue the job; its ``key`` is computed here unless the caller set it (``run_job`` does, off the event
        loop: the key digests the control images)."""
        if job.n > self.max_batch:
            raise ValueError(f"{job.n} images in one request; at most {self.max_batch}")
        job.key = job.key or self.key(job)
        with self._cond:
            if self._closed:
                raise ShuttingDown("the server is shutting down; retry on another replica")
            if len(self._queue) >= self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} requests waiting); retry after a moment")
            job.enqueued = time.monotonic()
            self._queue.append(job)
            self._cond.notify_all()
        return job.future

    def cancel(self, job: Job) -> bool:
        """Cancel a queued job (the client went away); False once its batch has started."""
        with self._cond:
            if job in self._queue:
                self._queue.remove(job)
                self._cond.notify_all()
        return job.future.cancel()

    # -- the worker -----------------------------------------------------------------------------------
    def _worker(self, loader: Callable[[], Any]) -> None:
        try:
            pipe = loader()
            with self._cond:
                self.pipes.append(pipe)
            if self.warmup:
                pipe.generate(pipe.warmup_request())
        except BaseException as e:
            log.exception("loading or warming up the pipeline failed")
            self._failed = e
            return
        with self._cond:
            self._loaded += 1
            if self._loaded == len(self._loaders):
                self._ready.set()
        back: tuple[float, int] = (float("-inf"), 0)
        while True:
            batch = self._next_batch(*back)
            if batch is None:
                return
            t0 = time.monotonic()
            self._run(pipe, batch)
            now = time.monotonic()
            # wait for this batch's clients until then, at most one window or 5% of its run time
            with self._cond:
                waiting = sum(j.n for j in self._queue)
            back = (now + max(self.window_s, RETURN_SHARE * (now - t0)), sum(j.n for j in batch) + waiting)

    def _next_batch(self, returns_until: float = float("-inf"), expected: int = 0) -> list[Job] | None:
        """The next batch; until ``returns_until``, wait for ``expected`` images (the last batch's and those
        queued while it ran)."""
        with self._cond:
            while True:
                if self._stopping:
                    return None
                self._sweep()
                if not self._queue:
                    self._cond.wait()
                    continue
                head = self._queue[0]
                now = time.monotonic()
                compatible = [j for j in self._queue if j.key == head.key] if self.batching else [head]
                queued = sum(j.n for j in compatible)
                full = queued >= self.max_batch
                wait = head.enqueued + self.window_s - now
                if queued < min(expected, self.max_batch):
                    wait = max(wait, returns_until - now)
                if self.batching and not full and wait > 0:
                    self._cond.wait(wait)
                    continue
                taken, total = [], 0
                for j in compatible:
                    if total + j.n <= self.max_batch:
                        taken.append(j)
                        total += j.n
                for j in taken:
                    self._queue.remove(j)
                batch = [j for j in taken if j.future.set_running_or_notify_cancel()]
                if batch:
                    self._running += 1
                    return batch

    def _sweep(self) -> None:
        """Drop queued jobs that were cancelled or are past their deadline (lock held)."""
        now = time.monotonic()
        keep = []
        for j in self._queue:
            if j.future.cancelled():
                continue
            if now >= j.deadline:
                _fail(j, DeadlineExceeded(f"request {j.request_id} waited past its deadline in the queue; "
                                          "retry, or start the server with a longer --request-timeout"))
                continue
            keep.append(j)
        self._queue[:] = keep

    def _run(self, pipe: Any, batch: list[Job]) -> None:
        started = time.monotonic()
        head = batch[0]
        try:
            prompts = [p for j in batch for p in j.prompts]
            seeds = [s for j in batch for s in j.seeds]
            # jobs without negatives share a batch with others only where that changes nothing (the key says)
            negs = None if all(j.negatives is None for j in batch) else [
                n for j in batch for n in (j.negatives or [""] * j.n)]
            res = pipe.generate(replace(head.request, prompt=prompts, negative_prompt=negs, seed=seeds))
        except BaseException as e:  # noqa: BLE001 - every waiting request learns why
            for j in batch:
                _fail(j, e)
            return
        finally:
            with self._cond:
                self._running -= 1
        timings = dict(res.timings, batch_images=len(prompts), batch_requests=len(batch))
        if self.on_batch is not None:
            self.on_batch(batch, timings)
        try:
            self._encoder.submit(self._deliver, batch, res, timings, started)
        except RuntimeError:  # the pool is shut down (close() timed out on this batch): encode here
            self._deliver(batch, res, timings, started)

    @staticmethod
    def _deliver(batch: list[Job], res: Any, timings: dict[str, Any], started: float) -> None:
        try:
            pngs = [_png(img) for img in res.images]
        except BaseException as e:  # noqa: BLE001
            for j in batch:
                _fail(j, e)
            return
        i = 0
        for j in batch:
            t = dict(timings, queue_ms=(started - j.enqueued) * 1e3)
            j.future.set_result(JobResult(pngs[i:i + j.n], j.seeds, t, res.nonfinite[i:i + j.n]))
            i += j.n


def control_identity(r: GenerationRequest) -> tuple[Any, ...] | None:
    """What a request's control inputs are, for the batch key: each control image's digest (its mode, size and
    pixels) and the settings as given; None without control images."""
    if not r.control_images:
        return None
    digests: list[tuple[str, tuple[int, ...], str] | None] = []
    for im in r.control_images:
        if im is None:
            digests.append(None)
            continue
        pixels = np.asarray(im)
        h = hashlib.sha256(pixels.tobytes())
        if getattr(im, "mode", "") in ("P", "PA"):  # a palette image's pixels are indices: its colours are the palette
            h.update(bytes(im.getpalette() or []))
        digests.append((getattr(im, "mode", ""), pixels.shape, h.hexdigest()))
    settings = tuple(repr(v) for v in (r.control_scales, r.control_start, r.control_end, r.guess_mode,
                                      r.control_preprocess, r.control_modes))
    return (tuple(digests), settings)


def _fail(job: Job, e: BaseException) -> None:
    if not job.future.done() and (job.future.running() or job.future.set_running_or_notify_cancel()):
        job.future.set_exception(e)


def _png(image: Any) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()
