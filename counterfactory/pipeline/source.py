"""The run's inputs as a Ray Data source: read tasks of consecutive input slices, so records
are made on the workers and streamed, never held in the driver. Imported only where a run goes
through Ray (it imports ``ray.data``)."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from counterfactory.pipeline.inputs import InputPlan, pipeline_rows, read_slice, slices_from

# Ray pays a fixed cost per task (scheduling, stats, an object per output, one more batch for
# the driver to fetch): with few CPUs, up to this many slices go into one read task, as long as
# every CPU still gets several tasks to balance the tail.
SLICES_PER_TASK_MAX = 4
TASKS_PER_CPU_MIN = 4


def read_blocks(slices: list[dict[str, Any]], start: int, seed: int, chash: str) -> Iterator[pa.Table]:
    """One read task: its input slices read on a worker, one Arrow table of pipeline rows each,
    yielded one at a time (Ray may join a task's tables into one block; the fused first step
    cuts it back into batches, see ``runner._chain_task``)."""
    for sl in slices:
        rows = pipeline_rows(read_slice(sl), sl["idx0"], start, seed, chash)
        yield pa.table({"idx": pa.array([r["idx"] for r in rows], pa.int64()),
                        "key": pa.array([""] * len(rows), pa.string()),
                        "status": pa.array(["ok"] * len(rows), pa.string()),
                        "blob": pa.array([b""] * len(rows), pa.binary()),
                        "meta": pa.array([r["meta"] for r in rows], pa.string())})


class InputSlices(Datasource):
    """The slices of an input plan at or after ``start`` (whole slices before it are left out:
    a resumed run), grouped into ``num_tasks`` read tasks."""

    def __init__(self, plan: InputPlan, start: int, seed: int, chash: str, cpus: float) -> None:
        slices = slices_from(plan, start)
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
                         BlockMetadata(num_rows=sum(sl["idx0"] + sl["n"] - max(self.start, sl["idx0"]) for sl in group),
                                       size_bytes=None, input_files=None, exec_stats=None),
                         per_task_row_limit=per_task_row_limit)
                for group in self.groups]
