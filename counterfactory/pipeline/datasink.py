"""Where shards are written: beside the stages, never in the driver.

Shard ``k`` holds the accepted samples of inputs ``[k * shard_size, (k + 1) * shard_size)`` in
input order (``writer.shard_range``), so its bytes depend on the inputs alone, never on block
sizes, task order, retries or the cluster's size. The rows of one shard meet in one place:

- every stage a task (the CPU default): one Ray task per shard reads that input range, runs the
  stages batch by batch and streams each finished sample into its ``ShardWriter``
  (``make_and_write_shard``; read by ``source.ShardTasks``). Memory stays one batch deep.
- a stage in an actor pool (models): the stages run as map steps over the ranges of the shards
  still to write; the last step saves each batch's rows as per-shard fragments in the staging
  folder (``write_fragments``) and the driver has a task assemble each shard from its fragments
  as soon as its range is complete (``assemble_shard``): the write streams, memory stays bounded.
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
import pickle
import shutil
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
# the same after an actor step: the batch holding the run's last input sleeps this many seconds
# before its fragments are written (tests: the other shards are on disk before it is computed)
STRAGGLER_LAST_ENV = "COUNTERFACTORY_STRAGGLER_LAST_S"
# after an actor step: per-batch pieces of each shard, assembled once the shard's range is in
FRAGMENTS = ".fragments"


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


def fragment_path(sink: ShardSink, k: int, first: int, n: int) -> Path:
    return Path(sink.out_dir) / FRAGMENTS / f"{k:06d}" / f"{first:012d}-{n}.pkl"


def write_fragments(batch: dict[str, np.ndarray], *, sink: ShardSink) -> dict[str, np.ndarray]:
    """After an actor step, the last map step (a CPU task, the parts already encoded): the batch's
    rows cut by shard, each piece saved in the staging folder as a fragment named by its shard, its
    first input and its row count (tmp + rename: a retried batch writes the same file again). Only
    ``(k, first, n)`` per fragment goes on to the driver, which has a shard assembled
    (``assemble_shard``) once its fragments cover its range: the write streams, memory bounded."""
    idx = batch["idx"]
    if os.environ.get(STRAGGLER_LAST_ENV) and (idx == sink.n_inputs - 1).any():
        time.sleep(float(os.environ[STRAGGLER_LAST_ENV]))
    order = np.argsort(idx, kind="stable")
    rows = {c: v[order] for c, v in batch.items()}
    shards = rows["idx"] // sink.shard_size
    cuts = [0, *(np.flatnonzero(np.diff(shards)) + 1).tolist(), len(order)]
    out: dict[str, list[int]] = {"k": [], "first": [], "n": []}
    for a, b in itertools.pairwise(cuts):
        k, first, n = int(shards[a]), int(rows["idx"][a]), b - a
        path = fragment_path(sink, k, first, n)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(pickle.dumps({c: v[a:b] for c, v in rows.items()}, protocol=5))
        os.replace(tmp, path)
        for key, val in (("k", k), ("first", first), ("n", n)):
            out[key].append(val)
    return {key: np.array(val, dtype=np.int64) for key, val in out.items()}


def assemble_shard(k: int, fragments: list[tuple[int, int]], sink: ShardSink) -> dict[str, Any]:
    """Shard ``k`` from the fragments the driver counted, in input order (the same ShardWriter and
    bytes as every other path); returns its journal entry. Fragments are read as the next input
    needs them, so a shard's rows are in memory one fragment deep when the fragments are
    contiguous; an input present twice (a retried batch cut otherwise) is taken once."""
    writer = sink.writer(k)
    todo = sorted(fragments)
    held: dict[int, Sample] = {}
    for want in range(writer.lo, writer.hi):
        while want not in held and todo and todo[0][0] <= want:
            first, n = todo.pop(0)
            rows = pickle.loads(fragment_path(sink, k, first, n).read_bytes())  # noqa: S301 - our own staging files
            for s in decode_batch(rows):
                if s.idx >= want:
                    held.setdefault(s.idx, s)
        if want not in held:
            raise RuntimeError(f"shard {k}: input {want} is in none of its fragments")
        _feed(writer, [held.pop(want)])
    return sink.close(writer)


def drop_fragments(sink: ShardSink, k: int | None = None) -> None:
    """A shard's fragments once it is journaled (``k``), or all of them (a run's start and end)."""
    root = Path(sink.out_dir) / FRAGMENTS
    shutil.rmtree(root if k is None else root / f"{k:06d}", ignore_errors=True)


def write_local(batches: Iterator[dict[str, np.ndarray] | list[Sample]], sink: ShardSink) -> Iterator[dict[str, Any]]:
    """Rows in input order (the plain loop): each shard closed when the next one's first input
    arrives, and at the end; yields each shard's journal entry. A batch is rows or, from
    ``local_batches(as_samples=True)``, its samples as they are (as ``make_and_write_shard``'s)."""
    writer: ShardWriter | None = None
    for batch in batches:
        for s in batch if isinstance(batch, list) else decode_batch(batch):
            k = s.idx // sink.shard_size
            if writer is not None and writer.k != k:
                yield sink.close(writer)
                writer = None
            if writer is None:
                writer = sink.writer(k)
            _feed(writer, [s])
    if writer is not None:
        yield sink.close(writer)
