"""Where shards are written: beside the stages, never in the driver.

Shard ``k`` holds the accepted samples of inputs ``[k * shard_size, (k + 1) * shard_size)`` in
input order (``writer.shard_range``), so its bytes depend on the inputs alone, never on block
sizes, task order, retries or the cluster's size. The rows of one shard meet in one place:

- every stage a task (the CPU default): one Ray task per shard reads that input range, runs the
  stages batch by batch and streams each finished sample into its ``ShardWriter``
  (``make_and_write_shard``; read by ``source.ShardTasks``). Memory stays one batch deep.
- a stage in an actor pool (models): the stages run as map steps over the ranges of the shards
  still to write, and ``groupby(shard).map_groups(write_group)`` writes each shard from its rows.
- ``local=True``: the plain loop gives rows in input order; ``write_local`` cuts them into shards.

Each writer returns its shard's journal entry without the rows (checksums and counts, well under a
kilobyte per shard): the driver's ``writer.DatasetCommit`` commits those, and reads each shard's
index rows and rejects from its journal entry at the end. No Ray import here (see ``source.py``).
"""

from __future__ import annotations

import bisect
import itertools
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from counterfactory.pipeline.chain import StageChain, StageSpec
from counterfactory.pipeline.inputs import InputPlan, pipeline_rows, read_slice
from counterfactory.pipeline.remote_shards import put_shard
from counterfactory.pipeline.slices import SliceTable
from counterfactory.pipeline.writer import PartEncoder, ShardWriter, shard_range
from counterfactory.sample import RunSettings, Sample, decode_batch

_CHAINS: dict[str, StageChain] = {}
# bench/run.py --only driver: shard 0's task sleeps this many seconds first (a straggler: one slow
# input, a task retried after its node was lost), to show the driver holds nothing back for it
STRAGGLER_ENV = "COUNTERFACTORY_STRAGGLER_S"


def chain_key(specs: list[StageSpec], run: RunSettings, encode: dict | None) -> str:
    return json.dumps([[s.key() for s in specs], run.model_dump_json(), encode], sort_keys=True)


def cached_chain(specs: list[StageSpec], run: RunSettings, encode: dict | None) -> StageChain:
    """One chain per worker process and configuration, built on first use, reused by every batch
    and task that process runs (a model loads once)."""
    key = chain_key(specs, run, encode)
    chain = _CHAINS.get(key)
    if chain is None:
        chain = _CHAINS[key] = StageChain(specs, run, PartEncoder(**encode) if encode else None)
    return chain


def batches_of(rows: Iterator[dict[str, Any]], batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Pipeline rows in numpy batches of ``batch_size`` (the row format of ``sample.py``)."""
    for chunk in iter(lambda: list(itertools.islice(rows, batch_size)), []):
        yield {k: np.array([r[k] for r in chunk], dtype=np.int64 if k == "idx" else object) for k in chunk[0]}


def range_rows(slices: list[dict[str, Any]], lo: int, hi: int, seed: int, chash: str) -> Iterator[dict[str, Any]]:
    """The pipeline rows of inputs ``[lo, hi)``, read from ``slices`` in order (a slice that
    straddles a shard boundary is read by both shards' tasks; only its records are re-read)."""
    for sl in slices:
        for r in pipeline_rows(read_slice(sl), sl["idx0"], lo, seed, chash):
            if r["idx"] >= hi:
                return
            yield r


@dataclass(frozen=True)
class ShardSink:
    """Where and how shards are written: sent to every writing task (a few strings)."""

    out_dir: str
    dataset: str
    shard_size: int
    n_inputs: int
    pairs: bool = True
    remote: str | None = None  # an object-store root: the spec's staging prefix there (remote_shards.py)

    def writer(self, k: int) -> ShardWriter:
        if self.remote:  # each node writes its shard in its own working folder, then puts it on the store
            Path(self.out_dir).mkdir(parents=True, exist_ok=True)
        if not Path(self.out_dir).is_dir():  # made by the driver: a node that cannot see it
            raise RuntimeError(f"the staging folder {self.out_dir} is not visible on this node: the workers write "
                               "the shards, so on a multi-node cluster a local output root must be a folder every "
                               "node mounts (or use an object-store root: each node puts its shards there)")
        lo, hi = shard_range(k, self.shard_size, self.n_inputs)
        return ShardWriter(Path(self.out_dir), self.dataset, k, lo, hi, pairs=self.pairs)

    def close(self, writer: ShardWriter) -> dict[str, Any]:
        """Finish the shard (and on an object-store root put it there, its journal entry last):
        its journal entry without the rows, the task's result."""
        entry = writer.finish()
        if self.remote:
            put_shard(Path(self.out_dir), self.remote, entry)
        return entry


def shard_slices(plan: InputPlan, sink: ShardSink, ks: list[int]) -> Iterator[tuple[int, SliceTable]]:
    """For each shard of ``ks``: the plan's slices holding its inputs, as a small table of their
    own (a few numbers each; the worker makes their dicts). Slices are sorted by ``idx0``: one
    bisection each, so a plan of millions of slices is cut in one pass."""
    starts = plan.slices.idx0()
    for k in ks:
        lo, hi = shard_range(k, sink.shard_size, sink.n_inputs)
        yield k, plan.slices.view(plan.slices.position(lo), bisect.bisect_left(starts, hi))


def _feed(writer: ShardWriter, samples: list[Sample]) -> None:
    for s in samples:
        writer.add(s.idx, s.key, s.status, s.meta, s.arrays.get("parts", {}))


def make_and_write_shard(k: int, slices: list[dict[str, Any]], *, sink: ShardSink, seed: int, chash: str,
                         specs: list[StageSpec], run: RunSettings, encode: dict, batch_size: int) -> dict[str, Any]:
    """One shard, start to end in one task: read its inputs, run every stage and the part encoder
    on each batch, stream the samples into the shard; returns the journal entry."""
    if k == 0 and os.environ.get(STRAGGLER_ENV):
        time.sleep(float(os.environ[STRAGGLER_ENV]))
    chain = cached_chain(specs, run, encode)
    writer = sink.writer(k)
    for batch in batches_of(range_rows(slices, writer.lo, writer.hi, seed, chash), batch_size):
        samples = decode_batch(batch)
        for st in chain.stages:
            st.apply(samples)
        chain.encoder.encode_samples(samples)
        _feed(writer, samples)
    return sink.close(writer)


def add_shard_column(batch: dict[str, np.ndarray], *, shard_size: int) -> dict[str, np.ndarray]:
    return {**batch, "shard": batch["idx"] // shard_size}


def write_group(batch: dict[str, np.ndarray], *, sink: ShardSink) -> dict[str, np.ndarray]:
    """``map_groups`` over the shard column: every row of one shard, in any order."""
    order = np.argsort(batch["idx"], kind="stable")
    rows = {k: v[order] for k, v in batch.items() if k != "shard"}
    writer = sink.writer(int(batch["shard"][0]))
    _feed(writer, decode_batch(rows))
    return entry_batch(sink.close(writer))


def entry_batch(entry: dict[str, Any]) -> dict[str, np.ndarray]:
    """A shard's result as one row: what travels to the driver."""
    return {"k": np.array([entry["k"]], dtype=np.int64),
            "entry": np.array([json.dumps(entry, sort_keys=True)], dtype=object)}


def write_local(batches: Iterator[dict[str, np.ndarray]], sink: ShardSink) -> Iterator[dict[str, Any]]:
    """Rows in input order (the plain loop): each shard closed when the next one's first input
    arrives, and at the end; yields each shard's journal entry."""
    writer: ShardWriter | None = None
    for batch in batches:
        for s in decode_batch(batch):
            k = s.idx // sink.shard_size
            if writer is not None and writer.k != k:
                yield sink.close(writer)
                writer = None
            if writer is None:
                writer = sink.writer(k)
            _feed(writer, [s])
    if writer is not None:
        yield sink.close(writer)
