"""Run a validated config as a Ray Data streaming pipeline and write the dataset.

Each stage is one ``map_batches`` step placed with the resources of its config entry.
Stateless stages run as Ray tasks (Ray fuses consecutive ones into one operator, so the CPU
default pays no hand-off between stages); stages that hold models, or whose config sets
``concurrency``, run as actor pools, constructed once per actor. The driver only consumes
finished rows and writes bytes (``DatasetWriter``).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from counterfactory import versions
from counterfactory.pipeline.card import write_card
from counterfactory.pipeline.config import PipelineConfig
from counterfactory.pipeline.inputs import load_records
from counterfactory.pipeline.sample import StageChain
from counterfactory.pipeline.writer import DatasetWriter, PartEncoder, atomic_write
from counterfactory.stages import get_backend

_CHAIN_CACHE: dict[str, StageChain] = {}


def _chain_task(batch: dict, *, specs: list[dict], run: dict, encode: dict | None) -> dict:
    """Task-mode entry: build the chain once per worker process and reuse it for every batch."""
    cache_key = json.dumps([specs, run, encode], sort_keys=True)
    chain = _CHAIN_CACHE.get(cache_key)
    if chain is None:
        encoder = PartEncoder(**encode) if encode else None
        chain = _CHAIN_CACHE[cache_key] = StageChain(specs, run, encoder)
    return chain(batch)


def run_settings(cfg: PipelineConfig) -> dict[str, Any]:
    """Run-level settings every stage may read (small, JSON-able)."""
    return {"seed": cfg.seed, "abstain_answer": cfg.abstain_answer, "limits": cfg.limits.model_dump()}


@dataclass
class StepPlan:
    name: str
    backend: str
    mode: str  # "tasks" or "actors"
    num_cpus: float
    num_gpus: float
    concurrency: Any
    batch_size: int


def stage_plan(cfg: PipelineConfig) -> list[StepPlan]:
    plan = []
    for sc in cfg.stages:
        cls = get_backend(sc.name, sc.backend)
        r = sc.resources
        actors = cls.stateful or r.concurrency is not None
        plan.append(StepPlan(sc.name, sc.backend, "actors" if actors else "tasks", r.num_cpus, r.num_gpus,
                             (r.concurrency or 1) if actors else "auto", r.batch_size))
    return plan


def init_ray(cfg: PipelineConfig) -> None:
    import ray

    if ray.is_initialized():
        return
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    kwargs: dict[str, Any] = {"ignore_reinit_error": True, "log_to_driver": True}
    if address:
        kwargs["address"] = address
    else:
        kwargs["include_dashboard"] = False
        if cfg.ray.num_cpus:
            kwargs["num_cpus"] = cfg.ray.num_cpus
    ray.init(**kwargs)


def initial_rows(cfg: PipelineConfig, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    chash = cfg.config_hash()
    return [
        {"idx": i, "key": "", "status": "ok", "blob": b"",
         "meta": json.dumps({**rec, "run_seed": cfg.seed, "config_hash": chash})}
        for i, rec in enumerate(records)
    ]


@dataclass
class Step:
    """One map_batches step: a chain of stages sharing resources and execution mode."""

    specs: list[dict[str, Any]]
    actors: bool
    resources: Any  # config Resources of the step's stages

    @property
    def names(self) -> str:
        return "+".join(s["name"] for s in self.specs)


def plan_steps(cfg: PipelineConfig, stop_after: str | None = None) -> list[Step]:
    """Group consecutive task-mode stages with identical resources (what Ray would fuse);
    a stage that holds a model or sets ``concurrency`` is an actor-pool step of its own."""
    steps: list[Step] = []
    for sc in cfg.stages:
        cls = get_backend(sc.name, sc.backend)
        actors = cls.stateful or sc.resources.concurrency is not None
        spec = {"name": sc.name, "backend": sc.backend, "params": sc.params}
        last = steps[-1] if steps else None
        if last and not actors and not last.actors and last.resources == sc.resources:
            last.specs.append(spec)
        else:
            steps.append(Step([spec], actors, sc.resources))
        if sc.name == stop_after:
            break
    return steps


def local_batches(cfg: PipelineConfig, records: list[dict[str, Any]], *, stop_after: str | None = None,
                  encode: bool = True, batch_size: int = 8) -> Iterator[dict[str, Any]]:
    """The same stage code in a plain loop in this process, no Ray: for tests, debugging and
    the benchmark floor. ``stop_after`` ends after the named stage (arrays left unencoded)."""
    run = run_settings(cfg)
    specs = [spec for step in plan_steps(cfg, stop_after) for spec in step.specs]
    encoder = (PartEncoder(cfg.output.image_format, cfg.output.jpeg_quality)
               if encode and stop_after is None else None)
    chain = StageChain(specs, run, encoder)
    rows = initial_rows(cfg, records)
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        batch = {k: np.array([r[k] for r in chunk], dtype=np.int64 if k == "idx" else object) for k in chunk[0]}
        yield chain(batch)


def build_dataset(cfg: PipelineConfig, records: list[dict[str, Any]]):
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = cfg.ray.preserve_order
    ctx.op_resource_reservation_enabled = cfg.ray.op_resource_reservation
    run = run_settings(cfg)
    items = initial_rows(cfg, records)
    first = cfg.stages[0].resources.batch_size
    ds = ray.data.from_items(items, override_num_blocks=max(1, min(len(items), -(-len(items) // first))))
    steps = plan_steps(cfg)
    encode = {"image_format": cfg.output.image_format, "jpeg_quality": cfg.output.jpeg_quality}
    for i, step in enumerate(steps):
        r = step.resources
        common: dict[str, Any] = {"batch_size": r.batch_size, "batch_format": "numpy", "num_cpus": r.num_cpus}
        if r.num_gpus:
            common["num_gpus"] = r.num_gpus
        if r.memory:
            common["memory"] = r.memory
        # Image encoding is the heavy half of writing: done on the workers, chained onto the
        # last CPU step rather than in the driver.
        enc = encode if i == len(steps) - 1 and not step.actors and not r.num_gpus else None
        if step.actors:
            ds = ds.map_batches(StageChain, fn_constructor_kwargs={"specs": step.specs, "run": run},
                                concurrency=r.concurrency or 1, **common)
        else:
            ds = ds.map_batches(_chain_task, fn_kwargs={"specs": step.specs, "run": run, "encode": enc}, **common)
    if enc is None:
        ds = ds.map_batches(_chain_task, fn_kwargs={"specs": [], "run": run, "encode": encode},
                            batch_size=steps[-1].resources.batch_size, batch_format="numpy", num_cpus=1)
    return ds


@dataclass
class RunResult:
    out_dir: Path  # the version folder, ROOT/DATASET/vN
    manifest: dict[str, Any]
    seconds: float
    stage_seconds: dict[str, float] = field(default_factory=dict)
    label: str = ""
    spec_id: str = ""
    content_id: str = ""
    reused: bool = False  # the spec's complete version existed: nothing ran


def run_pipeline(cfg: PipelineConfig, *, limit: int | None = None, progress: bool = True,
                 local: bool = False, command: str | None = None, force: bool = False) -> RunResult:
    """Run and publish a new version ``ROOT/DATASET/vN`` (see ``counterfactory.versions``).

    When a complete version with the same spec id exists, nothing runs and that version is
    returned (``reused=True``) unless ``force``. ``local=True`` runs the stages in this process
    without Ray (same code, same bytes). ``command`` is recorded as the command that made it."""
    t0 = time.perf_counter()
    records = load_records(cfg, limit)
    ds_dir = cfg.path(cfg.output.root) / cfg.dataset
    ds_dir.mkdir(parents=True, exist_ok=True)
    versions.migrate_flat_layout(ds_dir)
    spec, source_hashes = versions.build_spec(cfg, records, limit, ds_dir / versions.HASH_CACHE)
    sid = versions.spec_id(spec)
    existing = None if force else versions.find_complete(ds_dir, sid)
    if existing is not None:
        return RunResult(existing.path, existing.manifest(), time.perf_counter() - t0, {},
                         existing.label, sid, existing.info["content_id"], reused=True)
    parent = versions.read_latest(ds_dir)
    staging = Path(tempfile.mkdtemp(dir=ds_dir, prefix=".staging-"))
    staging.chmod(0o755)
    try:
        saved = cfg.resolved()
        # the saved spec is location-free so that the same run elsewhere has the same manifest
        saved["output"].pop("root")
        writer = DatasetWriter(staging, cfg.dataset, cfg.output.shard_size, len(records),
                               saved, cfg.config_hash())
        if records and local:
            for batch in local_batches(cfg, records):
                writer.add_batch(batch)
        elif records:
            init_ray(cfg)
            import ray

            ray.data.DataContext.get_current().enable_progress_bars = progress
            ds = build_dataset(cfg, records)
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2):
                writer.add_batch(batch)
        manifest = writer.close()
        changed = versions.check_sources_unchanged(
            source_hashes, pq.read_table(staging / "index.parquet", columns=["source", "source_sha256"]).to_pylist())
        if changed:
            raise RuntimeError(f"{len(changed)} input file(s) changed during the run, e.g. {changed[0]}; "
                               "nothing published")
        seconds = time.perf_counter() - t0
        summary = {"wall_seconds": round(seconds, 3),
                   "stage_seconds": {k: round(v, 3) for k, v in writer.stage_seconds.items()},
                   "limit": limit, "counts": manifest["counts"]}
        atomic_write(staging / "summary.json", json.dumps(summary, indent=2).encode())
        cid = versions.content_id(staging)

        def make_info(label: str) -> dict[str, Any]:
            return {"format": "counterfactory-version/1", "label": label, "dataset": cfg.dataset,
                    "spec_id": sid, "content_id": cid, "created": versions.now_utc(),
                    "parent": parent, "spec": spec, "base_dir": str(cfg.base_dir) if cfg.base_dir else None,
                    "root": str(ds_dir.parent), "command": command}

        version = versions.publish_version(staging, ds_dir, make_info,
                                           lambda d, info: write_card(d))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return RunResult(version.path, manifest, seconds, dict(writer.stage_seconds), version.label, sid, cid)
