"""A chain of consecutive stages run on one batch with a single row decode and encode.

Lives in the pipeline layer: it builds stages from the registry (``counterfactory.stages``),
which itself sits above the sample contract (``counterfactory.sample``).
"""

from __future__ import annotations

import ctypes
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import BaseModel

from counterfactory.sample import RunSettings, Sample, StageStartError, decode_batch, encode_batch


@dataclass(frozen=True)
class StageSpec:
    """One configured stage as the driver hands it to a worker: its params already validated
    (``StageConfig.typed_params``), never re-read from a dict."""

    name: str
    backend: str
    params: BaseModel
    # "all": the whole stage; a model stage split by the plan (issue 28): "model" (its actor
    # part), "before" / "after" (its host work, in CPU steps; no model loaded)
    part: str = "all"

    def key(self) -> tuple[str, str, str, str]:
        return self.name, self.backend, self.params.model_dump_json(), self.part

    def build(self, run: RunSettings) -> Any:
        from counterfactory.stages import get_backend
        from counterfactory.stages.models.common import HostStep

        cls = get_backend(self.name, self.backend)
        if self.part in ("before", "after"):
            return HostStep(cls.host_only(self.params, run), self.part)
        stage = cls(params=self.params, run=run)
        if self.part == "model":
            stage.split = True
        return stage


_MALLOC_TUNED = False


def keep_freed_memory() -> None:
    """glibc's malloc told to keep what a batch frees for the next batch (once per process).

    By default every array over 128 KiB (an image in float32: 768 KiB at 256 px) is its own
    ``mmap`` and goes back to the kernel on free, so the next one is faulted in and zeroed page
    by page, and a freed heap top over 128 KiB is trimmed: on the CPU default that was 8-20 ms of
    system time per input (``strace -c``: ~110 mmap/munmap/brk calls per input; ``bench/cpu_cost.py``
    user 47 s, sys 8 s per 1,000 inputs). With arrays up to 32 MiB (glibc's ceiling) served from
    the heap and up to 512 MiB of free heap kept, a worker's memory plateaus at its largest batch's
    working set instead. Linux/glibc only; elsewhere nothing is changed."""
    global _MALLOC_TUNED
    if _MALLOC_TUNED or not sys.platform.startswith("linux"):
        return
    _MALLOC_TUNED = True
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # musl or another libc: its own allocator, left alone
        return
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3  # mallopt parameters (malloc.h)
    libc.mallopt(m_mmap_threshold, 32 << 20)
    libc.mallopt(m_trim_threshold, 512 << 20)
    libc.mallopt(m_top_pad, 64 << 20)


class StageChain:
    """Consecutive stages applied to one batch with a single decode and encode.

    Ray would fuse these map steps into one operator anyway (same resources, task mode);
    chaining them ourselves also skips the row (de)serialization between them, which cost
    about a third of the CPU default's time per sample.
    """

    def __init__(self, specs: list[StageSpec], run: RunSettings, encoder: Any = None) -> None:
        keep_freed_memory()  # a chain is built once per worker process (and per plain-loop run)
        self.stages = []
        for s in specs:
            try:
                self.stages.append(s.build(run))
            except Exception as exc:  # a model that does not load: name the stage, in one line
                why = f"{type(exc).__name__}: {exc}".strip().splitlines()[0]
                raise StageStartError(f"stage {s.name} ({s.backend}) could not start: {why}") from exc
        self.encoder = encoder

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return encode_batch(self.samples(batch))

    def samples(self, batch: dict[str, np.ndarray]) -> list[Sample]:
        """The batch's samples after every stage (and the encoder), not encoded back into rows:
        for a writer in the same process (the plain loop's ``datasink.write_local``)."""
        samples = decode_batch(batch)
        for st in self.stages:
            st.apply(samples)
        if self.encoder is not None:  # on the samples: no pickle round trip of the raw arrays
            self.encoder.encode_samples(samples)
        return samples
