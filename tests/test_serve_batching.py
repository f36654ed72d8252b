"""The batcher's policy at saturation, on a stand-in pipeline that records the batches it is given, and the
server benchmark end to end on a tiny export."""

from __future__ import annotations

import io
import threading
import time
from types import SimpleNamespace
from typing import Any

from PIL import Image

from sdrt.serve.batcher import Batcher, Job


class RecordingPipe:
    """Takes ``run_s`` per call and records how many images each call had; one 8x8 image per prompt."""

    def __init__(self, run_s: float) -> None:
        self.run_s = run_s
        self.batches: list[int] = []
        self.threads: set[str] = set()

    def conditioning_key(self, prompts: list[str], negatives: list[str] | None, guidance: float,
                         prompt_syntax: str = "plain", max_sequence_length: int | None = None) -> tuple[Any, ...]:
        return guidance > 1.0, (1,), False, 77  # one 77-token chunk for every text, no zeroed negatives

    def generate(self, request: Any) -> Any:
        prompts = request.prompt
        self.batches.append(len(prompts))
        time.sleep(self.run_s)
        return SimpleNamespace(images=[Image.new("RGB", (8, 8), (i, 0, 0)) for i in range(len(prompts))],
                               timings={}, nonfinite=[False] * len(prompts))

    def close(self) -> None:
        pass


def _job(prompt: str, n: int = 1) -> Job:
    return Job.of([prompt] * n, [""] * n, list(range(n)), 64, 64, 2, "ddim", 7.5)


def test_requests_returning_just_after_a_batch_join_the_waiting_one() -> None:
    """A runs 2 images; B queues meanwhile; C arrives 50 ms after A's batch ends (a client whose answer just
    came back). B was enqueued long ago, but the worker back from 2 images (and 1 queued) waits (one window
    at most) for 3, so B and C share a batch instead of running one after the other."""
    pipe = RecordingPipe(run_s=0.4)
    c_future: list[Any] = []

    def after(jobs: list[Job], timings: dict[str, Any]) -> None:
        if jobs[0].prompts[0] == "a":
            threading.Timer(0.05, lambda: c_future.append(b.submit(_job("c")))).start()

    b = Batcher([lambda: pipe], max_batch=8, window_s=0.3, warmup=False, on_batch=after)
    b.start()
    assert b.wait_ready(10)
    try:
        fa = b.submit(_job("a", 2))
        time.sleep(0.45)  # past A's window: A is running
        fb = b.submit(_job("b"))
        fa.result(10)
        fb.result(10)
        c_future[0].result(10)
    finally:
        b.close()
    assert pipe.batches == [2, 2]


def test_a_worker_back_from_a_batch_waits_at_most_its_window() -> None:
    """Clients that do not come back cost one window, not more: B (queued during A) starts one window after
    A ends although A's 2 images do not come back."""
    pipe = RecordingPipe(run_s=0.4)
    ended: list[float] = []
    b = Batcher([lambda: pipe], max_batch=8, window_s=0.2, warmup=False,
                on_batch=lambda jobs, t: ended.append(time.monotonic()))
    b.start()
    assert b.wait_ready(10)
    try:
        fa = b.submit(_job("a", 2))
        time.sleep(0.3)  # past A's window: A is running
        fb = b.submit(_job("b"))
        fa.result(10)
        fb.result(10)
    finally:
        b.close()
    assert pipe.batches == [2, 1]
    # B's batch ended one window (0.2 s) + its run (0.4 s) after A's, not later
    assert 0.58 <= ended[1] - ended[0] < 0.9


def test_an_idle_server_waits_only_its_window() -> None:
    """The first request on an idle server is taken one window after it arrives, not later."""
    pipe = RecordingPipe(run_s=0.0)
    b = Batcher([lambda: pipe], max_batch=8, window_s=0.2, warmup=False)
    b.start()
    assert b.wait_ready(10)
    try:
        time.sleep(0.3)  # the worker has been idle for more than a window
        t0 = time.monotonic()
        res = b.submit(_job("a")).result(10)
        waited = time.monotonic() - t0
    finally:
        b.close()
    assert 0.18 <= waited < 1.0
    assert len(res.png) == 1 and res.png[0].startswith(b"\x89PNG")


def test_close_delivers_images_of_finished_batches() -> None:
    """PNG encoding runs after the batch, off the worker: close() still delivers what finished."""
    pipe = RecordingPipe(run_s=0.2)
    b = Batcher([lambda: pipe], max_batch=8, window_s=0.0, warmup=False)
    b.start()
    assert b.wait_ready(10)
    fut = b.submit(_job("a"))
    time.sleep(0.05)  # the batch is running
    b.close(grace_s=10)
    res = fut.result(0)
    assert Image.open(io.BytesIO(res.png[0])).getpixel((0, 0)) == (0, 0, 0)
