"""Running on a Ray cluster: job submission (submit/status/logs/stop) and a resource preflight.

``submit`` validates the config here, then submits ``counterfactory run`` as a Ray job through
the job submission SDK (the head's dashboard, ``http://HEAD:8265``). The job ships the config's
folder as its ``working_dir``; relative input paths and the output root are made absolute as
seen from here, so they must name a filesystem the cluster shares at the same path (the job
driver alone writes the output). The cluster's Python must have counterfactory installed, or be
given it with ``--pip`` (runtime_env ``pip``) or ``--ship-package`` (runtime_env ``py_modules``).

``plan`` compares what each pipeline step asks for (``plan_steps``) with the cluster's nodes and
says what cannot be placed and what will sit idle, before anything runs.
"""

from __future__ import annotations

import os
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from counterfactory.pipeline.config import ConfigError, PipelineConfig, load_config

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def dashboard_address(address: str | None) -> str:
    addr = address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
    if not addr:
        raise ConfigError("--address: give the Ray dashboard address, e.g. http://HEAD:8265 "
                          "(or set RAY_API_SERVER_ADDRESS)")
    if "://" not in addr:
        addr = f"http://{addr}"
    return addr


# seconds to connect to the job server, and between bytes of its reply: Ray's client sets none,
# so a server that accepts and never answers held `submit` and `status --wait` forever
JOB_SERVER_TIMEOUT = (10, 120)


def client(address: str | None):
    from ray.job_submission import JobSubmissionClient

    class _Client(JobSubmissionClient):
        def _do_request(self, method: str, endpoint: str, **kw: Any) -> Any:  # Ray's one HTTP call site
            kw.setdefault("timeout", JOB_SERVER_TIMEOUT)
            return super()._do_request(method, endpoint, **kw)

    return _Client(dashboard_address(address))


def _absolute_overrides(cfg: PipelineConfig) -> list[str]:
    """Overrides that pin the config's local paths (output root, input files) as absolute."""
    from counterfactory.storage import is_remote, local_path

    root = cfg.output.root
    if is_remote(root):  # an object store: the same URI everywhere
        out = []
    else:
        out = [f"output.root={(local_path(root) if root.startswith('file://') else cfg.path(root)).resolve()}"]
    for i, inp in enumerate(cfg.inputs):
        p = getattr(inp, "path", None)
        if isinstance(p, str) and p and not p.startswith("pkg:") and "://" not in p and not Path(p).is_absolute():
            out.append(f"inputs.{i}.path={cfg.path(p).resolve()}")
    return out


def job_env(items: list[str] | None) -> dict[str, str]:
    """``NAME=VALUE`` as given, or ``NAME`` alone: its value in this environment (how object-store
    credentials or an endpoint such as AWS_ENDPOINT_URL reach the job's driver and workers)."""
    env: dict[str, str] = {}
    for item in items or []:
        name, eq, value = item.partition("=")
        if not name:
            raise ConfigError(f"--env {item!r}: expected NAME or NAME=VALUE")
        if not eq:
            if name not in os.environ:
                raise ConfigError(f"--env {name}: not set in this environment (give NAME=VALUE)")
            value = os.environ[name]
        env[name] = value
    return env


def build_job(config: str, overrides: list[str], *, limit: int | None = None,
              pip: list[str] | None = None, ship_package: bool = False,
              env: list[str] | None = None) -> dict[str, Any]:
    """The ``submit_job`` arguments for running CONFIG on a cluster (validated here first)."""
    cfg = load_config(config, overrides)
    path = Path(config).resolve()
    # not --quiet: the job's log keeps the end-of-run summary (no live display off a terminal)
    args = ["counterfactory", "run", path.name, *overrides, *_absolute_overrides(cfg)]
    if limit is not None:
        args += ["--limit", str(limit)]
    runtime_env: dict[str, Any] = {
        "working_dir": str(path.parent),
        "excludes": ["*.tar", "*.parquet", "outputs/", ".staging-*", "__pycache__/"],
    }
    if pip:
        runtime_env["pip"] = list(pip)
    if env:
        runtime_env["env_vars"] = job_env(env)
    if ship_package:
        import counterfactory

        runtime_env["py_modules"] = [str(Path(counterfactory.__file__).parent)]
    return {"entrypoint": shlex.join(args), "runtime_env": runtime_env,
            "metadata": {"dataset": cfg.dataset, "config": path.name}}


def submit(config: str, overrides: list[str], address: str | None, *, agent_wait_s: float = 60.0,
           **kw: Any) -> str:
    job = build_job(config, overrides, **kw)
    jobs = client(address)
    deadline, delay = time.monotonic() + agent_wait_s, 1.0
    while True:
        try:
            return jobs.submit_job(**job)
        except RuntimeError as exc:
            # A head that has just started (or is loaded) answers 500 "No available agent to
            # submit job, please try again later" until its job agent is up; nothing was
            # submitted, so trying again is safe. Anything else is not ours to retry.
            if "No available agent" not in str(exc):
                raise
            if time.monotonic() + delay > deadline:
                raise ConnectionError(f"{address or 'the cluster'}: the job server had no agent to run jobs "
                                      f"for {agent_wait_s:.0f} s; check the cluster (`ray status`)") from None
            time.sleep(delay)
            delay = min(2 * delay, 8.0)


def wait(job_id: str, address: str | None, timeout: float, poll: float = 1.0) -> str:
    """Poll until the job ends or ``timeout`` seconds pass; returns the last status."""
    c = client(address)
    deadline = time.monotonic() + timeout
    while True:
        st = c.get_job_status(job_id)
        status = str(getattr(st, "value", st))
        if status in TERMINAL or time.monotonic() > deadline:
            return status
        time.sleep(poll)


# -- plan ---------------------------------------------------------------------------------------
@dataclass
class Node:
    node_id: str
    cpus: float
    gpus: float
    memory: float  # bytes
    alive: bool = True


@dataclass
class Plan:
    nodes: list[Node]
    steps: list[dict[str, Any]] = field(default_factory=list)
    wont_fit: list[str] = field(default_factory=list)
    idle: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.wont_fit


def local_nodes() -> list[Node]:
    import psutil

    gpus = 0
    try:
        import torch

        gpus = torch.cuda.device_count()
    except Exception:  # noqa: BLE001 - no torch or no driver: no GPUs
        gpus = 0
    return [Node("local", float(os.cpu_count() or 1), float(gpus), float(psutil.virtual_memory().total))]


def cluster_nodes(address: str) -> list[Node]:
    """Alive nodes of the cluster behind a dashboard (http://HEAD:8265, or HEAD:8265) or GCS
    (HOST:PORT, ray://) address; one ConfigError line when nothing answers there."""
    try:
        return _cluster_nodes(address)
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - Ray raises many kinds for an address with nothing behind it
        why = f"{type(exc).__name__}: {exc}".strip().splitlines()[0][:300]
        raise ConfigError(f"--address {address}: cannot list the cluster's nodes ({why})") from None


def _cluster_nodes(address: str) -> list[Node]:
    if address.startswith(("http://", "https://")) or address.rstrip("/").endswith(":8265"):
        from ray.util.state import list_nodes

        nodes = []
        # the state API returns 100 entries unless asked for more (its own cap is 10,000)
        for n in list_nodes(address=dashboard_address(address), detail=True, limit=10_000):
            res = n.resources_total or {}
            nodes.append(Node(n.node_id, float(res.get("CPU", 0)), float(res.get("GPU", 0)),
                              float(res.get("memory", 0)), n.state == "ALIVE"))
        return [n for n in nodes if n.alive]
    import ray

    ray.init(address=address, ignore_reinit_error=True, log_to_driver=False)
    try:
        return [Node(n["NodeID"], float(n["Resources"].get("CPU", 0)), float(n["Resources"].get("GPU", 0)),
                     float(n["Resources"].get("memory", 0))) for n in ray.nodes() if n.get("Alive")]
    finally:
        ray.shutdown()


def make_plan(cfg: PipelineConfig, nodes: list[Node]) -> Plan:
    from counterfactory.pipeline.runner import plan_steps

    plan = Plan(nodes)
    total = {"cpus": sum(n.cpus for n in nodes), "gpus": sum(n.gpus for n in nodes),
             "memory": sum(n.memory for n in nodes)}
    fixed = {"cpus": 0.0, "gpus": 0.0}
    elastic_cpu = False
    for step in plan_steps(cfg):
        r = step.resources
        need = {"cpus": float(r.num_cpus), "gpus": float(r.num_gpus or 0), "memory": float(r.memory or 0)}
        lo, hi = r.pool  # an autoscaling pool: [min, max]
        n = (lo if lo == hi else f"{lo}-{hi}") if step.actors else None
        fits_on = [nd for nd in nodes if nd.cpus >= need["cpus"] and nd.gpus >= need["gpus"]
                   and (not need["memory"] or nd.memory >= need["memory"])]
        plan.steps.append({"step": step.names, "runs_as": "actors" if step.actors else "tasks",
                           **need, "concurrency": n if n else "auto", "nodes_that_fit": len(fits_on)})
        what = f"{step.names}: {need['cpus']:g} CPU, {need['gpus']:g} GPU" + (
            f", {need['memory'] / 2**30:.1f} GiB" if need["memory"] else "")
        if not fits_on:
            plan.wont_fit.append(f"{what} per {'actor' if step.actors else 'task'}: no node has that "
                                 f"(largest: {max((nd.cpus for nd in nodes), default=0):g} CPU, "
                                 f"{max((nd.gpus for nd in nodes), default=0):g} GPU)")
            continue
        if step.actors:
            slots = sum(_slots(nd, need) for nd in fits_on)
            if slots < lo:
                plan.wont_fit.append(f"{what}: {lo} actors asked, only {slots} fit on the cluster; "
                                     "the rest will never start and the run waits for them")
            elif slots < hi:
                plan.notes.append(f"{step.names}: the pool can grow to {slots} of its {hi} actors here")
            fixed["cpus"] += need["cpus"] * min(hi, slots)
            fixed["gpus"] += need["gpus"] * min(hi, slots)
        else:
            elastic_cpu = elastic_cpu or need["cpus"] > 0
            if need["gpus"]:
                plan.notes.append(f"{step.names}: GPU tasks (no concurrency set) start a fresh process "
                                  "per task; set concurrency to keep a model loaded")
    used_gpus = fixed["gpus"] + sum(float(s["gpus"]) for s in plan.steps if s["runs_as"] == "tasks")
    if total["gpus"] and not used_gpus:
        plan.idle.append(f"{total['gpus']:g} GPU(s) on the cluster, no stage asks for one: they sit idle")
    elif total["gpus"] > used_gpus and all(s["runs_as"] == "actors" for s in plan.steps if s["gpus"]):
        plan.idle.append(f"actor pools use {used_gpus:g} of {total['gpus']:g} GPUs; "
                         f"{total['gpus'] - used_gpus:g} sit idle (raise concurrency)")
    if fixed["cpus"] > total["cpus"]:
        plan.wont_fit.append(f"actor pools together need {fixed['cpus']:g} CPUs, the cluster has "
                             f"{total['cpus']:g}: not all of them can run at once")
    elif not elastic_cpu and fixed["cpus"] < total["cpus"]:
        plan.idle.append(f"all steps are fixed-size actor pools using {fixed['cpus']:g} of "
                         f"{total['cpus']:g} CPUs; {total['cpus'] - fixed['cpus']:g} sit idle")
    elif elastic_cpu:
        plan.notes.append(f"task steps scale to the CPUs left ({max(0.0, total['cpus'] - fixed['cpus']):g} "
                          "after the actor pools)")
    return plan


def _slots(node: Node, need: dict[str, float]) -> int:
    caps = []
    for k in ("cpus", "gpus", "memory"):
        if need[k]:
            caps.append(int(getattr(node, k) // need[k]))
    return min(caps) if caps else 1_000_000
