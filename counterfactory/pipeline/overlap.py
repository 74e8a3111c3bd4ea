"""The single-process run (``run_pipeline(local=True)``) with host and device work overlapped.

The plain loop runs read -> stages -> encode -> write one batch at a time, so the GPU idles while
the host decodes inputs, encodes JPEG/PNG parts and writes shards, and the host idles while a
model runs. Here every step of the plan (the fused CPU stages, each model stage, the part
encoder) runs in its own thread, joined by bounded queues: while the edit model diffuses batch
``i``, segment already encodes batch ``i+1``, the reader decodes batch ``i+2`` and the encoder
compresses batch ``i-1``. Threads are enough: torch, OpenCV, PIL's codecs and numpy release the
GIL in their kernels, and CUDA launches are asynchronous.

Used where the plan has a model step (``runner._local_entries``): with CPU stages only there is
no device to hide work behind, and threads on the same cores only trade the GIL.

Outputs are the loop's, byte for byte: each step's stage objects live in one thread and see the
batches in input order (FIFO queues), and every random choice is seeded per sample.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

_END = object()


class _Failed:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


def staged(source: Iterator[Any], steps: list[Callable[[Any], Any]], depth: int = 2) -> Iterator[Any]:
    """``source`` read in a thread, each of ``steps`` applied in a thread of its own, results
    yielded in order. An exception in any thread ends the run and is raised here; closing the
    generator early stops the threads."""
    stop = threading.Event()
    queues = [queue.Queue(maxsize=depth) for _ in range(len(steps) + 1)]

    def put(q: queue.Queue, item: Any) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def get(q: queue.Queue) -> Any:
        while not stop.is_set():
            try:
                return q.get(timeout=0.1)
            except queue.Empty:
                continue
        return _END

    def read() -> None:
        try:
            for item in source:
                if not put(queues[0], item):
                    return
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            put(queues[0], _Failed(exc))
            return
        put(queues[0], _END)

    def work(fn: Callable[[Any], Any], q_in: queue.Queue, q_out: queue.Queue) -> None:
        while True:
            item = get(q_in)
            if item is _END or isinstance(item, _Failed):
                put(q_out, item)
                return
            try:
                out = fn(item)
            except BaseException as exc:  # noqa: BLE001 - handed to the consumer
                put(q_out, _Failed(exc))
                return
            if not put(q_out, out):
                return

    threads = [threading.Thread(target=read, name="cf-read", daemon=True)]
    threads += [threading.Thread(target=work, args=(fn, queues[i], queues[i + 1]), name=f"cf-step{i}", daemon=True)
                for i, fn in enumerate(steps)]
    for t in threads:
        t.start()
    try:
        while True:
            item = get(queues[-1])
            if item is _END:
                return
            if isinstance(item, _Failed):
                raise item.exc
            yield item
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
