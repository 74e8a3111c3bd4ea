"""The run's inputs as a Ray Data source: read tasks of consecutive input slices, so records
are made on the workers and streamed, never held in the driver. Imported only where a run goes
through Ray (it imports ``ray.data``)."""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from counterfactory.pipeline.datasink import ShardSink, make_and_write_shard, shard_slices
from counterfactory.pipeline.inputs import InputPlan, pipeline_rows, read_slice, slices_from

# Ray pays a fixed cost per task (scheduling, stats, an object per output, one more batch for
# the driver to fetch): with few CPUs, up to this many slices go into one read task, as long as
# every CPU still gets several tasks to balance the tail.
SLICES_PER_TASK_MAX = 4
TASKS_PER_CPU_MIN = 4


def _rows_of(sl: dict[str, Any], start: int) -> int:
    """How many of a slice's inputs are read: from ``start`` (or the slice's ``lo``) to its ``hi``."""
    lo, hi = max(start, sl.get("lo", 0), sl["idx0"]), min(sl["idx0"] + sl["n"], sl.get("hi", sl["idx0"] + sl["n"]))
    return max(0, hi - lo)


def read_blocks(slices: list[dict[str, Any]], start: int, seed: int, chash: str) -> Iterator[pa.Table]:
    """One read task: its input slices read on a worker, one Arrow table of pipeline rows each,
    yielded one at a time (Ray may join a task's tables into one block; the fused first step
    cuts it back into batches, see ``runner._chain_task``). A slice cut to a shard's range carries
    ``lo``/``hi``: only those inputs are read."""
    for sl in slices:
        rows = [r for r in pipeline_rows(read_slice(sl), sl["idx0"], max(start, sl.get("lo", 0)), seed, chash)
                if r["idx"] < sl.get("hi", r["idx"] + 1)]
        yield pa.table({"idx": pa.array([r["idx"] for r in rows], pa.int64()),
                        "key": pa.array([""] * len(rows), pa.string()),
                        "status": pa.array(["ok"] * len(rows), pa.string()),
                        "blob": pa.array([b""] * len(rows), pa.binary()),
                        "meta": pa.array([r["meta"] for r in rows], pa.string())})


class InputSlices(Datasource):
    """The slices of an input plan at or after ``start`` (whole slices before it are left out:
    a resumed run), grouped into ``num_tasks`` read tasks."""

    def __init__(self, plan: InputPlan, start: int, seed: int, chash: str, cpus: float,
                 slices: list[dict[str, Any]] | None = None) -> None:
        slices = slices_from(plan, start) if slices is None else slices
        per_task = max(1, min(SLICES_PER_TASK_MAX, len(slices) // max(1, int(TASKS_PER_CPU_MIN * cpus))))
        self.groups = [slices[i:i + per_task] for i in range(0, len(slices), per_task)]
        self.start, self.seed, self.chash = start, seed, chash

    @property
    def num_tasks(self) -> int:
        return len(self.groups)

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context: Any = None) -> list[ReadTask]:
        return [ReadTask(functools.partial(read_blocks, group, self.start, self.seed, self.chash),
                         BlockMetadata(num_rows=sum(_rows_of(sl, self.start) for sl in group),
                                       size_bytes=None, input_files=None, exec_stats=None),
                         per_task_row_limit=per_task_row_limit)
                for group in self.groups]


def _shard_task(k: int, slices: list[dict[str, Any]], **kwargs: Any) -> Iterator[pa.Table]:
    entry = make_and_write_shard(k, slices, **kwargs)
    yield pa.table({"k": pa.array([k], pa.int64()), "entry": pa.array([json.dumps(entry, sort_keys=True)], pa.string())})


class ShardTasks(Datasource):
    """One read task per shard still to write: it reads the shard's input range, runs every stage
    and writes the shard (``datasink.make_and_write_shard``); its one output row is the shard's
    journal entry, the only thing the driver receives."""

    def __init__(self, plan: InputPlan, ks: list[int], sink: ShardSink, **task_kwargs: Any) -> None:
        self.tasks = list(shard_slices(plan, sink, ks))
        self.sink, self.task_kwargs = sink, task_kwargs

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context: Any = None) -> list[ReadTask]:
        return [ReadTask(functools.partial(_shard_task, k, slices, sink=self.sink, **self.task_kwargs),
                         BlockMetadata(num_rows=1, size_bytes=None, input_files=None, exec_stats=None),
                         per_task_row_limit=per_task_row_limit)
                for k, slices in self.tasks]
