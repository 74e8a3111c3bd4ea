"""Run a validated config as a Ray Data streaming pipeline and write the dataset.

Each stage is one ``map_batches`` step placed with the resources of its config entry.
Stateless stages run as Ray tasks (Ray fuses consecutive ones into one operator, so the CPU
default pays no hand-off between stages); stages that hold models, or whose config sets
``concurrency``, run as actor pools, constructed once per actor. Shards are written
beside the stages (``datasink``: one task per shard, or a group per shard after an actor step);
the driver commits their small results (``writer.DatasetCommit``).
"""

# Over ~450 lines on purpose: Ray init, step planning, resume and the failure budget are one
# run's life cycle; publishing, layout and folders already live in publish/layout/storage.

from __future__ import annotations

import fcntl
import itertools
import json
import os
import shutil
import time
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from counterfactory import versions
from counterfactory.card import write_card
from counterfactory.layout import (
    HASH_CACHE,
    INDEX,
    JOURNAL,
    LOCK,
    REJECTS,
    STAGING_PREFIX,
    SUMMARY,
    atomic_write,
)
from counterfactory.pipeline.chain import StageChain, StageSpec
from counterfactory.pipeline.config import ConfigError, PipelineConfig
from counterfactory.pipeline.datasink import (
    ShardSink,
    assemble_shard,
    batches_of,
    cached_chain,
    drop_fragments,
    write_fragments,
    write_local,
)
from counterfactory.pipeline.inputs import (
    InputPlan,
    pipeline_rows,
    plan_inputs,
    read_slice,
    slices_from,
)
from counterfactory.pipeline.writer import DatasetCommit, PartEncoder, shard_range
from counterfactory.publish import FailureBudgetExceeded, finish_reused, publish_version
from counterfactory.sample import RunSettings
from counterfactory.spec import build_spec, check_sources_unchanged, spec_id, split_placement
from counterfactory.stages import get_backend
from counterfactory.storage import (
    StorageError,
    is_remote,
    join_uri,
    local_path,
    open_dir,
    read_parquet,
)


def _chain_task(batch: dict, *, specs: list[StageSpec], run: RunSettings, encode: dict | None,
                max_rows: int | None = None) -> dict:
    """Task-mode entry: build the chain once per worker process and reuse it for every batch.
    ``max_rows`` cuts a larger block into batches of at most that many rows (the read step of a
    task joins its slices into one block before the fused first step sees it)."""
    chain = cached_chain(specs, run, encode)
    n = len(batch["idx"])
    if not max_rows or n <= max_rows:
        return chain(batch)
    outs = [chain({k: v[i:i + max_rows] for k, v in batch.items()}) for i in range(0, n, max_rows)]
    return {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}


def quiet_ray_logs() -> None:
    """Ray Data configures its logger when it is imported; lower it afterwards."""
    import logging

    import ray.data  # noqa: F401 - configures the "ray.data" logger, which is then lowered

    for name in ("ray", "ray.data"):
        logging.getLogger(name).setLevel(logging.ERROR)


def init_ray(cfg: PipelineConfig, verbose: bool = True) -> None:
    """A local Ray instance, or the cluster's. ``verbose=False`` keeps Ray's own console lines
    (worker logs, Ray Data's INFO progress) out of a terminal that shows our progress display."""
    import logging

    import ray

    if not verbose:
        quiet_ray_logs()
    if ray.is_initialized():
        return
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    kwargs: dict[str, Any] = {"ignore_reinit_error": True, "log_to_driver": verbose}
    if not verbose:  # Ray's own INFO/WARNING lines (its logs stay in the session folder)
        kwargs["logging_level"] = logging.ERROR
    if address:
        kwargs["address"] = address
    else:
        kwargs["include_dashboard"] = False
        if cfg.ray.num_cpus:
            kwargs["num_cpus"] = cfg.ray.num_cpus
    from counterfactory.pipeline.ray_guard import local_ray_guard

    try:
        with local_ray_guard(enabled=not address):  # a local head's processes die with this driver
            ray.init(**kwargs)
    except Exception as exc:  # noqa: BLE001 - a node that timed out starting, an address nothing answers
        why = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
        raise RunStopped(f"Ray could not start ({why}); nothing was run, rerun to resume") from None


@dataclass
class Step:
    """One map_batches step: a chain of stages sharing resources and execution mode."""

    specs: list[StageSpec]
    actors: bool
    resources: Any  # config Resources of the step's stages

    @property
    def names(self) -> str:
        return "+".join(s.name if s.part in ("all", "model") else f"{s.name}({s.part})" for s in self.specs)


def plan_steps(cfg: PipelineConfig, stop_after: str | None = None) -> list[Step]:
    """Group consecutive task-mode stages with identical resources (what Ray would fuse);
    a stage that holds a model or sets ``concurrency`` is an actor-pool step of its own.
    A model stage with host work (``SplitStage.host_parts``) is split: its host parts run in
    CPU task steps around its actor (one CPU each, the stage's batch size; fused with an equal
    neighbour), so a GPU actor does only what needs the model (issue 28)."""
    steps: list[Step] = []

    def add(spec: StageSpec, actors: bool, res: Any) -> None:
        last = steps[-1] if steps else None
        if last and not actors and not last.actors and last.resources == res:
            last.specs.append(spec)
        else:
            steps.append(Step([spec], actors, res))

    for sc in cfg.stages:
        cls = get_backend(sc.name, sc.backend)
        actors = cls.stateful or sc.resources.concurrency is not None
        params = sc.typed_params()
        parts = getattr(cls, "host_parts", ()) if actors else ()
        if parts:
            host = sc.resources.model_copy(update={"num_cpus": 1.0, "num_gpus": 0.0, "concurrency": None,
                                                   "memory": None})
            if "before" in parts:
                add(StageSpec(sc.name, sc.backend, params, "before"), False, host)
            add(StageSpec(sc.name, sc.backend, params, "model"), True, sc.resources)
            if "after" in parts:
                add(StageSpec(sc.name, sc.backend, params, "after"), False, host)
        else:
            add(StageSpec(sc.name, sc.backend, params), actors, sc.resources)
        if sc.name == stop_after:
            break
    return steps


def local_batches(cfg: PipelineConfig, inputs: InputPlan | list[dict[str, Any]], *, stop_after: str | None = None,
                  encode: bool = True, batch_size: int = 8, start: int = 0, end: int | None = None,
                  overlap: bool = False, as_samples: bool = False) -> Iterator[Any]:
    """The same stage code in a plain loop in this process, no Ray: for tests, debugging and
    the benchmark floor. ``inputs`` is a run's input plan (read slice by slice) or a list of
    records; inputs ``[start, end)`` only. ``stop_after`` ends after the named stage (arrays left unencoded). ``overlap``
    runs the reader, each step and the encoder in threads of their own (``overlap.staged``):
    the same outputs, with host work beside the device work instead of between it. ``as_samples``:
    each batch as its list of ``Sample`` objects, not rows: a writer in this process takes them as
    a shard task's writer does (issue 27: no JSON and pickle round trip of every row on its way
    from the encoder to the writer)."""
    run = cfg.run_settings()
    specs = [spec for step in plan_steps(cfg, stop_after) for spec in step.specs]
    encoder = (PartEncoder(cfg.output.image_format, cfg.output.jpeg_quality)
               if encode and stop_after is None else None)
    chain = StageChain(specs, run, encoder)
    chash = cfg.config_hash()
    if isinstance(inputs, InputPlan):
        rows: Iterator[dict[str, Any]] = (row for sl in slices_from(inputs, start)
                                          for row in pipeline_rows(read_slice(sl), sl["idx0"], start, cfg.seed, chash))
    else:
        rows = iter(pipeline_rows(inputs, 0, start, cfg.seed, chash))
    if end is not None:
        rows = itertools.takewhile(lambda r: r["idx"] < end, rows)
    batches = batches_of(rows, batch_size)
    if not overlap:
        yield from (chain.samples(b) if as_samples else chain(b) for b in batches)
        return
    yield from _overlapped(chain, plan_steps(cfg, stop_after), batches, as_samples)


def _overlapped(chain: StageChain, steps: list[Step], batches: Iterator[dict[str, Any]],
                as_samples: bool = False) -> Iterator[Any]:
    """``chain``'s stages grouped by plan step, one thread per step (see ``overlap.staged``)."""
    from counterfactory.pipeline.overlap import staged
    from counterfactory.sample import decode_batch, encode_batch

    def step_fn(stages: list[Any], first: bool) -> Any:
        def fn(item: Any) -> Any:
            samples = decode_batch(item) if first else item
            for st in stages:
                st.apply(samples)
            return samples
        return fn

    fns, at = [], 0
    for i, step in enumerate(steps):
        fns.append(step_fn(chain.stages[at:at + len(step.specs)], i == 0))
        at += len(step.specs)

    def finish(samples: Any) -> dict[str, Any]:
        if chain.encoder is not None:
            chain.encoder.encode_samples(samples)
        return samples if as_samples else encode_batch(samples)

    return staged(batches, [*fns, finish])


def uses_actors(cfg: PipelineConfig) -> bool:
    return any(step.actors for step in plan_steps(cfg))


def build_dataset(cfg: PipelineConfig, plan: InputPlan, todo: list[int], sink: ShardSink):
    """The run as a Ray dataset whose rows are the written shards' journal entries (``k``,
    ``entry``): the shards ``todo`` are written by the workers (see ``datasink``). With an actor
    step its rows are the fragments written (``k``, ``first``, ``n``; see ``_assembled_entries``)."""
    import ray

    from counterfactory.pipeline.ray_driver import POLLING_ENV, event_driven_executor

    if os.environ.get(POLLING_ENV) != "1":  # Ray Data's own 0.1 s polling loop, e.g. to compare
        event_driven_executor()  # the driver's own CPU: Ray Data's loop wakes on events, not ten times a second
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = cfg.ray.preserve_order
    ctx.op_resource_reservation_enabled = cfg.ray.op_resource_reservation
    ctx.max_errored_blocks = cfg.failure_budget.max_errored_blocks
    retries = cfg.failure_budget.system_retries
    run = cfg.run_settings()
    # Ray 2.60 warns on any extra remote argument, but the retry settings below have no named
    # parameter yet: keep the warning out of every run's output.
    warnings.filterwarnings("ignore", message=r".*ray_remote_args.*deprecated")
    from counterfactory.pipeline.source import InputSlices, ShardTasks

    steps = plan_steps(cfg)
    encode = {"image_format": cfg.output.image_format, "jpeg_quality": cfg.output.jpeg_quality}
    if not any(step.actors for step in steps):
        # every stage a task: one task per shard reads, runs every stage and writes its shard,
        # asking for the most any step asks (the steps would share the task once fused anyway)
        source = ShardTasks(plan, todo, sink, seed=cfg.seed, chash=cfg.config_hash(),
                            specs=[sp for step in steps for sp in step.specs], run=run, encode=encode,
                            batch_size=steps[0].resources.batch_size)
        args: dict[str, Any] = {"num_cpus": max(st.resources.num_cpus for st in steps)}
        for key in ("num_gpus", "memory"):
            most = max((getattr(st.resources, key) or 0) for st in steps)
            if most:
                args[key] = most
        return ray.data.read_datasource(source, override_num_blocks=max(1, source.num_tasks),
                                        ray_remote_args={"max_retries": retries}, **args)
    # an actor step: the stages as map steps over the inputs of the shards still to write, then
    # each shard written from its rows, wherever they were computed
    from counterfactory.pipeline.datasink import shard_slices

    cut = [{**sl, "lo": lo, "hi": hi} for k, group in shard_slices(plan, sink, todo)
           for lo, hi in [shard_range(k, sink.shard_size, sink.n_inputs)] for sl in group]
    source = InputSlices(plan, 0, cfg.seed, cfg.config_hash(), ray.cluster_resources().get("CPU", 1), slices=cut)
    blocks = source.num_tasks
    # The read asks for exactly what a first task step on CPU asks (Ray fuses only equal
    # requests), and that step takes the read's block whole (batch_size None: Ray fuses no
    # read into a step with a batch size), cutting it into batches itself. Before an actor or
    # GPU step the read stays apart, on one CPU.
    first = steps[0].resources
    fused_read = not steps[0].actors and not first.num_gpus
    read_args: dict[str, Any] = {"num_cpus": first.num_cpus if fused_read else 1}
    if fused_read and first.memory:
        read_args["memory"] = first.memory
    ds = ray.data.read_datasource(source, override_num_blocks=max(1, blocks),
                                  ray_remote_args={"max_retries": retries}, **read_args)
    for i, step in enumerate(steps):
        r = step.resources
        whole = i == 0 and fused_read
        common: dict[str, Any] = {"batch_size": None if whole else r.batch_size, "batch_format": "numpy",
                                  "num_cpus": r.num_cpus}
        if r.num_gpus:
            common["num_gpus"] = r.num_gpus
        if r.memory:
            common["memory"] = r.memory
        # Image encoding is the heavy half of writing: done on the workers, chained onto the
        # last CPU step rather than in the driver.
        enc = encode if i == len(steps) - 1 and not step.actors and not r.num_gpus else None
        # system failures (worker process or node died, object lost) are retried by Ray; data
        # faults never raise out of a stage (they are rejects), so retries never repeat them
        if step.actors:
            ds = ds.map_batches(StageChain, fn_constructor_kwargs={"specs": step.specs, "run": run},
                                concurrency=r.concurrency or 1, max_restarts=retries,
                                max_task_retries=retries, **common)
        else:
            ds = ds.map_batches(_chain_task, fn_kwargs={"specs": step.specs, "run": run, "encode": enc,
                                                        "max_rows": r.batch_size if whole else None},
                                max_retries=retries, **common)
    if enc is None:
        ds = ds.map_batches(_chain_task, fn_kwargs={"specs": [], "run": run, "encode": encode},
                            batch_size=steps[-1].resources.batch_size, batch_format="numpy", num_cpus=1,
                            max_retries=retries)
    # each batch's rows saved as per-shard fragments; the driver has each shard assembled as soon
    # as its fragments are all in (``_assembled_entries``): no all-to-all step, the write streams
    return ds.map_batches(write_fragments, fn_kwargs={"sink": sink}, batch_size=None, batch_format="numpy",
                          num_cpus=1, max_retries=retries)


def dataset_location(cfg: PipelineConfig) -> tuple[versions.Dataset, str]:
    """(``ROOT/DATASET``, ``ROOT`` as version.json records it): a local folder (``file://``
    accepted; a relative root is under the config's folder), or a folder on an object store
    when the root is a filesystem URI (``s3://bucket/prefix``; see ``counterfactory.storage``).
    The driver alone writes, so on a cluster a local root must be a folder the driver's node
    sees; an object-store root needs no shared mount."""
    root = cfg.output.root
    if is_remote(root):  # the user's string: a URI stays as it is
        try:
            return open_dir(join_uri(root, cfg.dataset)), root
        except StorageError as exc:
            raise ConfigError(f"output.root: {exc}") from None
    local = local_path(root) if root.startswith("file://") else cfg.path(root)
    return open_dir(local / cfg.dataset), str(local)


class RunStopped(FailureBudgetExceeded):
    """A run that stops before publishing for a reason other than its rejects (the same spec
    already running, no inputs, inputs changed mid-run): one line, exit 3 like a spent budget."""


def _lock_staging(staging: Path) -> int:
    fd = os.open(staging / LOCK, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RunStopped(f"already running: another run of the same spec holds {staging}; "
                         "wait for it to finish (this run changed nothing)") from None
    return fd


class _Stream:
    """Feeds the written shards' results to the commit, timing how long the driver waited."""

    def __init__(self) -> None:
        self.wall = 0.0
        self.wait = 0.0
        self.ray_ops: list[dict[str, Any]] = []

    def consume(self, entries: Iterator[dict[str, Any]], commit: DatasetCommit, on_progress: Any = None) -> None:
        t0 = time.perf_counter()
        it = iter(entries)
        while True:
            tw = time.perf_counter()
            entry = next(it, None)
            self.wait += time.perf_counter() - tw
            if entry is None:
                break
            commit.on_write_result(entry)
            if on_progress is not None:
                on_progress(commit)
        self.wall = time.perf_counter() - t0


def _own_cpu() -> float:
    import resource

    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _blocks(ds: Any) -> Iterator[dict[str, np.ndarray]]:
    """The run's output blocks (small rows: journal entries or fragment counts) as numpy
    columns, each as it comes, with no prefetching thread (``iter_batches`` adds one, polling,
    for rows the driver takes one at a time)."""
    import ray
    from ray.data.block import BlockAccessor

    for bundle in ds.iter_internal_ref_bundles():
        slices = getattr(bundle, "slices", None) or (None,) * len(bundle.blocks)
        for ref, part in zip(bundle.block_refs, slices, strict=True):
            block = BlockAccessor.for_block(ray.get(ref))
            if part is not None:  # a bundle may carry part of a block (Ray Data's splitting)
                block = BlockAccessor.for_block(block.slice(part.start_offset, part.end_offset))
            yield block.to_numpy()


def _entries(ds: Any) -> Iterator[dict[str, Any]]:
    """The journal entries of the shards the workers wrote, as they finish (any order)."""
    for batch in _blocks(ds):
        for raw in batch["entry"]:
            yield json.loads(raw)


def _assembled_entries(ds: Any, sink: ShardSink, todo: list[int], retries: int) -> Iterator[dict[str, Any]]:
    """After an actor step: the fragments written, counted per shard as they stream in; a shard
    whose range is all in is assembled by a Ray task at once, and its journal entry yielded when
    that task ends (any order), its fragments then dropped. A shard left incomplete (a block Ray
    Data gave up on, within max_errored_blocks) is never assembled: the commit fills it at close."""
    import ray

    assemble = ray.remote(assemble_shard).options(num_cpus=1, max_retries=retries)
    need = {k: hi - lo for k in todo for lo, hi in [shard_range(k, sink.shard_size, sink.n_inputs)]}
    # Ray Data hands over each row once (a retried task's outputs replace the failed attempt's),
    # so a shard's fragments partition its range; a name seen twice is the same file
    frags: dict[int, set[tuple[int, int]]] = {}
    running: list[Any] = []

    def finished(block: bool) -> Iterator[dict[str, Any]]:
        nonlocal running
        while running:
            ready, running = ray.wait(running, num_returns=1 if block else len(running), timeout=None if block else 0)
            for ref in ready:
                entry = ray.get(ref)
                drop_fragments(sink, entry["k"])
                yield entry
            if not block:
                return

    drop_fragments(sink)  # a killed run's fragments: cut by other batches, never mixed in
    for batch in _blocks(ds):
        for k, first, n in zip(batch["k"].tolist(), batch["first"].tolist(), batch["n"].tolist(), strict=True):
            got = frags.setdefault(k, set()) if k in need else None
            if got is None or (first, n) in got:
                continue
            got.add((first, n))
            need[k] -= n
            if need[k] <= 0:
                del need[k]
                running.append(assemble.remote(k, sorted(frags.pop(k)), sink))
        yield from finished(block=False)
    yield from finished(block=True)
    drop_fragments(sink)


def _local_entries(cfg: PipelineConfig, plan: InputPlan, todo: list[int], sink: ShardSink) -> Iterator[dict[str, Any]]:
    """The plain loop, over each run of consecutive shards still to write. Its steps overlap in
    threads (``overlap.staged``) only where the plan has a model step, whose device time they
    hide host work behind. A plan of CPU stages runs in this thread alone: its stages, encoder
    and writer all want the same cores, and on them threads only trade the GIL (issue 27: the
    threaded CPU default took 15-20 % more CPU per pair for the same wall time)."""
    overlap = uses_actors(cfg)
    for _, run in itertools.groupby(enumerate(todo), key=lambda t: t[1] - t[0]):
        ks = [k for _, k in run]
        lo, hi = shard_range(ks[0], sink.shard_size, sink.n_inputs)[0], shard_range(ks[-1], sink.shard_size, sink.n_inputs)[1]
        yield from write_local(local_batches(cfg, plan, start=lo, end=hi, overlap=overlap, as_samples=True), sink)


def _ray_operator_stats(ds: Any) -> list[dict[str, Any]]:
    """Per-operator figures from Ray Data's own stats (best effort: a private API)."""
    try:
        summary = ds._get_stats_summary()
    except Exception:  # noqa: BLE001 - stats are a report, never a reason to fail a run
        return []
    out = []
    for op in summary.operators_stats:
        row: dict[str, Any] = {"operator": op.operator_name,
                               "seconds_active": round(op.time_total_s or 0.0, 3)}
        if op.wall_time is not None:
            row["task_wall_seconds"] = round(op.wall_time.sum, 3)
            row["tasks"] = op.wall_time.count
        if op.cpu_time is not None:
            row["task_cpu_seconds"] = round(op.cpu_time.sum, 3)
        if op.output_num_rows is not None:
            row["rows_out"] = int(op.output_num_rows.sum)
        out.append(row)
    return out


def stage_report(cfg: PipelineConfig, writer: DatasetCommit, stream: _Stream,
                 wall: float) -> list[dict[str, Any]]:
    """Per stage: rows in and out, rejects, busy seconds (time in the stage's code, summed over
    samples), throughput per busy second, and for GPU stages the share of GPU time used."""
    input_rejects: Counter[str] = Counter()
    for why, n in writer.reject_counts.items():
        input_rejects[why.split("/", 1)[0]] += n
    variant_rejects = writer.variant_reject_stages
    rows = writer.n_inputs
    table = []
    busy_wall = stream.wall if stream.wall > 0 else wall
    for sc in cfg.stages:
        busy = writer.stage_seconds.get(sc.name, 0.0)
        rej = input_rejects.get(sc.name, 0)
        row: dict[str, Any] = {
            "stage": sc.name, "backend": sc.backend, "rows_in": rows, "rows_out": rows - rej,
            "rejected_inputs": rej, "rejected_variants": variant_rejects.get(sc.name, 0),
            "busy_seconds": round(busy, 3),
            "rows_per_busy_second": round(rows / busy, 2) if busy > 0 else None,
        }
        r = sc.resources
        actors = r.pool[1]  # an autoscaling pool counted at its largest
        if r.concurrency and busy_wall > 0:  # an actor pool: the time its actors sat waiting
            row["waiting_seconds"] = round(max(0.0, actors * busy_wall - busy), 3)
        if r.num_gpus:
            gpus = r.num_gpus * actors
            row["gpus"] = gpus
            row["gpu_busy_share"] = round(min(1.0, busy / (busy_wall * gpus)), 3) if busy_wall > 0 else None
        table.append(row)
        rows -= rej
    return table


@dataclass
class RunResult:
    out_dir: Path  # the version folder ROOT/DATASET/vN (for an object-store root: its local mirror)
    manifest: dict[str, Any]
    seconds: float
    stage_seconds: dict[str, float] = field(default_factory=dict)
    label: str = ""
    spec_id: str = ""
    content_id: str = ""
    reused: bool = False  # the spec's complete version existed: nothing ran
    location: str = ""  # where the version lives: its folder, or its URI on an object store
    limited: bool = False  # a --limit run that left inputs out, not made latest


def _top_reasons(rejects: Path, k: int = 3) -> str:
    """The commonest whole-input reject reasons, each with one example detail."""
    rows = [r for r in read_parquet(rejects, ["stage", "reason", "detail", "variant"]).to_pylist()
            if r["variant"] is None]
    counts = Counter(f"{r['stage']}/{r['reason']}" for r in rows)
    example = {f"{r['stage']}/{r['reason']}": (r["detail"] or "")[:120] for r in reversed(rows)}
    return "; ".join(f"{n} x {why}" + (f": {example[why]}" if example[why] else "")
                     for why, n in counts.most_common(k))


def check_model_folders(cfg: PipelineConfig) -> None:
    """On a local Ray instance every actor runs on this machine: a model folder missing here, or
    holding only pickle checkpoints, would fail every actor (Ray prints a page of traceback per
    retry before our one line), so it is one config line before anything starts. On a cluster the
    folder may exist only on the workers; they check it when they load."""
    if cfg.ray.address or os.environ.get("RAY_ADDRESS"):
        return
    from counterfactory.stages.models.common import refuse_pickles

    for sc in cfg.stages:
        model = getattr(sc.typed_params(), "model", None)
        if isinstance(model, str) and model:
            try:
                refuse_pickles(model)
            except (OSError, ValueError) as exc:
                raise ConfigError(f"stages.{sc.name}.params.model: {exc}") from None


def run_pipeline(cfg: PipelineConfig, *, limit: int | None = None, progress: bool = True,
                 local: bool = False, command: str | None = None, force: bool = False,
                 latest: bool = False, on_progress: Any = None, verbose: bool = True) -> RunResult:
    """Run and publish a new version ``ROOT/DATASET/vN`` (see ``counterfactory.versions``).

    When a complete version with the same spec id exists, nothing runs and that version is
    returned (``reused=True``) unless ``force``. ``local=True`` runs the stages in this process
    without Ray (same code, same bytes). ``command`` is recorded as the command that made it.
    A ``limit`` run (a sample of the inputs) does not become ``latest`` unless ``latest``.
    ``on_progress(writer)`` is called after each batch reaches the writer (a live display)."""
    t0 = time.perf_counter()
    if limit is not None and limit < 1:  # 0 would publish an empty version as the latest
        raise ConfigError(f"limit must be at least 1, got {limit}")
    # counted here, read in slices where they are processed (see InputPlan)
    check_model_folders(cfg)
    plan = plan_inputs(cfg, limit, per_slice=cfg.stages[0].resources.batch_size)
    n_inputs = plan.n
    if not n_inputs:  # an empty version would become `latest` and answer every rerun of this spec
        raise RunStopped("no inputs: the configured inputs hold no record (an empty manifest?); nothing published")
    # limited: the limit left inputs out (a --limit at or above the input count is a full run)
    limited = limit is not None and plan_inputs(cfg, limit + 1, count_only=True).n > limit
    ds_dir, root = dataset_location(cfg)
    # where shards are staged: the dataset folder, or for an object store a local working folder
    work = ds_dir.workdir()
    work.mkdir(parents=True, exist_ok=True)
    versions.migrate_flat_layout(work)
    spec, source_hashes = build_spec(cfg, plan, limit, work / HASH_CACHE)
    sid = spec_id(spec)
    try:
        existing = None if force else versions.find_complete(ds_dir, sid)
        parent = versions.read_latest(ds_dir)
    except OSError as exc:  # an unreachable or unauthorized object store: one line, before any work
        raise ConfigError(f"output.root: {ds_dir}: {exc}") from None
    if existing is not None:
        finish_reused(ds_dir, existing, work / f"{STAGING_PREFIX}{sid[:24]}")
        return RunResult(existing.path, existing.manifest(), time.perf_counter() - t0, {},
                         existing.label, sid, existing.info["content_id"], reused=True,
                         location=existing.location)
    # The staging folder is named by the spec: a killed run of the same spec resumes in it, a
    # changed spec never does. A lock keeps two live runs of one spec apart.
    staging = work / f"{STAGING_PREFIX}{sid[:24]}"
    staging.mkdir(mode=0o755, exist_ok=True)
    lock = _lock_staging(staging)
    writer = None
    try:
        # the saved spec is location- and placement-free so that the same run elsewhere, on more
        # or fewer CPUs, has the same manifest (the placement goes to version.json)
        saved, placement = split_placement(cfg.resolved())
        share = cfg.failure_budget.max_reject_share
        # an object-store root: the writers put each shard in the spec's staging prefix there
        remote = None if ds_dir.is_local else ds_dir.child(staging.name).uri
        writer = DatasetCommit(staging, cfg.dataset, cfg.output.shard_size, n_inputs,
                               saved, cfg.config_hash(),
                               max_rejected_inputs=None if share is None else int(share * n_inputs),
                               fill_missing=cfg.failure_budget.max_errored_blocks > 0,
                               pairs=cfg.output.pairs, remote=remote, writers_here=local)
        todo = writer.on_write_start()
        start = writer.resumed_inputs
        sink = ShardSink(str(staging), cfg.dataset, cfg.output.shard_size, n_inputs, cfg.output.pairs, remote)
        stream = _Stream()
        cpu0 = _own_cpu()
        if todo and local:
            stream.consume(_local_entries(cfg, plan, todo, sink), writer, on_progress)
        elif todo:
            init_ray(cfg, verbose=verbose)
            import ray

            ray.data.DataContext.get_current().enable_progress_bars = progress
            ds = build_dataset(cfg, plan, todo, sink)
            entries = (_assembled_entries(ds, sink, todo, cfg.failure_budget.system_retries)
                       if uses_actors(cfg) else _entries(ds))
            stream.consume(entries, writer, on_progress)
            stream.ray_ops = _ray_operator_stats(ds)
        manifest = writer.on_write_complete()
        driver_cpu = _own_cpu() - cpu0  # the stream and the commit: what grows with the inputs
        if n_inputs and not manifest["counts"]["samples"]:
            # an empty version would become `latest` and, named by the same spec, be reused by
            # the rerun meant to fix it (a model that failed to load, an endpoint that was down)
            writer.drop_journal()
            raise FailureBudgetExceeded(f"no sample survived: all {n_inputs} input(s) were rejected ("
                                        f"{_top_reasons(staging / REJECTS)}); nothing published")
        changed = check_sources_unchanged(
            source_hashes, read_parquet(staging / INDEX, ["source", "source_sha256"]).to_pylist())
        if changed:
            writer.drop_journal()  # its shards were made from other bytes: never resume them
            raise RunStopped(f"{len(changed)} input file(s) changed during the run, e.g. {changed[0]}; "
                               "nothing published")
        seconds = time.perf_counter() - t0
        summary = {"wall_seconds": round(seconds, 3),
                   "stage_seconds": {k: round(v, 3) for k, v in writer.stage_seconds.items()},
                   "limit": limit, "counts": manifest["counts"],
                   "resumed": {"shards": writer.resumed_shards, "inputs": writer.resumed_inputs},
                   "stages": stage_report(cfg, writer, stream, seconds),
                   "pipeline": {"wall_seconds": round(stream.wall, 3),
                                "driver_wait_seconds": round(stream.wait, 3),
                                # this process's CPU (Ray's driver threads included) from the first
                                # shard to the manifest; with local=True it includes the stages
                                "driver_cpu_seconds": round(driver_cpu, 3),
                                "inputs_per_second": round((n_inputs - start) / stream.wall, 3)
                                if stream.wall > 0 else None},
                   "ray_operators": stream.ray_ops}
        atomic_write(staging / SUMMARY, json.dumps(summary, indent=2).encode())
        (staging / LOCK).unlink(missing_ok=True)
        cid = versions.content_id(staging)

        def make_info(label: str) -> dict[str, Any]:
            return {"format": "counterfactory-version/1", "label": label, "dataset": cfg.dataset,
                    "spec_id": sid, "content_id": cid, "created": versions.now_utc(),
                    "parent": parent, "spec": spec, "base_dir": str(cfg.base_dir) if cfg.base_dir else None,
                    "root": root, "placement": placement,
                    "command": command, **({"limited": True} if limited else {})}

        version = publish_version(staging, ds_dir, make_info,
                                           lambda d, info: write_card(d),
                                           set_latest=not limited or latest)
    except BaseException:
        # completed shards are kept for a resume; a run that completed none leaves nothing behind
        if writer is None or not writer.shards or not (staging / JOURNAL).is_dir():
            shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        os.close(lock)
    return RunResult(version.path, manifest, seconds, dict(writer.stage_seconds), version.label, sid, cid,
                     location=version.location, limited=limited and not latest)
