"""On a real two-node Ray cluster on this machine (loopback only): job submission, a worker
killed mid-run (Ray retries), a driver killed mid-run (resume), identical manifests.

The head runs the job server (dashboard) on 127.0.0.1; a second node joins it. Each node gets
1 CPU and its own temp dir (nodes sharing one would share the runtime_env folder, and one
node's cleanup would delete the job's working_dir under the other). Ray maps 127.0.0.1 to the
machine's outward address unless told otherwise: the head and every driver run with
RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (loopback node address), the second node is started with
``get_node_ip_address`` pinned to 127.0.0.1. Teardown kills exactly the processes of this
cluster (found by its temp dir, and their children), also when a test fails.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
from conftest import DEMO

from counterfactory.pipeline.config import load_config
from counterfactory.pipeline.runner import run_pipeline

BIN = Path(sys.executable).parent
IDLE_TITLES = ("IDLE", "Agent", "Actor", "JobSupervisor", "Coordinator")
# The whole demo in small shards and small input slices: ~23 tasks on the two 1-CPU nodes, so
# a kill lands between the first journaled shard and the end of the stream (with 20 inputs in
# 7 slices the first slice could finish last, and every shard was written in one burst)
LIMIT = 69
OVERRIDES = ["output.shard_size=4", "stages.ingest.resources.batch_size=2"]

pytestmark = pytest.mark.skipif(shutil.which("ray", path=str(BIN)) is None, reason="ray CLI not installed")

WORKER_START = """
import sys
import ray._private.services as services
services.get_node_ip_address = lambda address=None: "127.0.0.1"
from ray.scripts.scripts import main
sys.argv = ["ray", *sys.argv[1:]]
sys.exit(main())
"""


def _node_ports() -> list[str]:
    """Every port a node would otherwise take at its fixed default: a Ray instance already
    running on this machine (the suite's in-process ``ray_local``, a user's own) holds the
    dashboard agent's 52365 and the metrics ports, and a head whose agent cannot bind has no job
    agent ("No available agent to submit job"); two nodes on one machine would collide too."""
    return [f"--dashboard-agent-listen-port={_free_port()}", f"--dashboard-agent-grpc-port={_free_port()}",
            f"--metrics-export-port={_free_port()}", f"--runtime-env-agent-port={_free_port()}"]


def _metrics_env() -> dict[str, str]:
    """The autoscaler's and the dashboard's metrics ports (44217, 44227 by default)."""
    return {"AUTOSCALER_METRIC_PORT": str(_free_port()), "DASHBOARD_METRIC_PORT": str(_free_port())}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update({"PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}", "RAY_AUTH_MODE": "disabled",
                "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0", **extra})
    return env


def _cluster_procs(temp: str) -> dict[int, psutil.Process]:
    me = psutil.Process()
    skip = {me.pid, *(p.pid for p in me.parents())}
    found: dict[int, psutil.Process] = {}
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if p.pid not in skip and any(temp in a for a in (p.info["cmdline"] or [])):
                found[p.pid] = p
                for c in p.children(recursive=True):
                    found[c.pid] = c
        except psutil.Error:
            pass
    return found


def _teardown(temp: str) -> None:
    procs = _cluster_procs(temp)
    for p in procs.values():
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(list(procs.values()), timeout=15)
    shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster():
    temp = tempfile.mkdtemp(prefix="cfr", dir="/tmp")  # short: Ray's socket paths are length-capped
    gcs, dash, client = _free_port(), _free_port(), _free_port()
    try:
        head = subprocess.run(
            [BIN / "ray", "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}",
             "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--include-dashboard=true",
             f"--ray-client-server-port={client}", "--num-cpus=1", "--disable-usage-stats",
             f"--temp-dir={temp}/h", *_node_ports()], env=_env(**_metrics_env()), capture_output=True, text=True,
            timeout=90)
        assert head.returncode == 0, head.stderr[-3000:]
        node = subprocess.run(
            [sys.executable, "-c", WORKER_START, "start", f"--address=127.0.0.1:{gcs}", "--num-cpus=1",
             "--disable-usage-stats", f"--temp-dir={temp}/w", *_node_ports()],
            env=_env(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="1", **_metrics_env()), capture_output=True, text=True,
            timeout=90)
        assert node.returncode == 0, node.stderr[-3000:]
        yield {"gcs": f"127.0.0.1:{gcs}", "dashboard": f"http://127.0.0.1:{dash}", "temp": temp}
    finally:
        _teardown(temp)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The same config and limit run in this process without Ray."""
    root = tmp_path_factory.mktemp("ref")
    cfg = load_config(str(DEMO), [*OVERRIDES, f"output.root={root}"])
    res = run_pipeline(cfg, limit=LIMIT, local=True, progress=False)
    return (res.out_dir / "manifest.json").read_bytes()


def _cli(*args: str, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([BIN / "counterfactory", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def _wait_for(pred, timeout: float, what: str, poll: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _run_cmd(root: Path) -> list[str]:
    return [str(BIN / "counterfactory"), "run", str(DEMO), *OVERRIDES, f"output.root={root}",
            "--limit", str(LIMIT)]  # not --quiet: the summary says "resumed after"


def _journal(root: Path) -> list[Path]:
    ds = root / "demo"
    return sorted(ds.glob(".staging-*/.journal/*.json")) if ds.is_dir() else []


def _latest_manifest(root: Path) -> bytes:
    ds = root / "demo"
    return (ds / (ds / "latest").read_text().strip() / "manifest.json").read_bytes()


def test_plan_sees_both_nodes(cluster):
    r = _cli("plan", str(DEMO), "--address", cluster["dashboard"], env=_env(), timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "2 node(s)" in r.stdout and "2 CPU" in r.stdout, r.stdout


def _submit_and_wait(cluster, *args: str) -> str:
    """``counterfactory submit DEMO ... --wait``; the job id, or the test fails with the job's logs."""
    env = _env()
    r = _cli("submit", str(DEMO), *OVERRIDES, *args, "--limit", str(LIMIT),
             "--address", cluster["dashboard"], "--wait", "180", env=env, timeout=200)
    job = r.stdout.split()[0] if r.stdout else ""
    if r.returncode != 0 and job:
        logs = _cli("logs", job, "--address", cluster["dashboard"], env=env, timeout=30).stdout
        pytest.fail(f"job {job} did not succeed: {r.stdout}\n{logs[-3000:]}")
    assert r.returncode == 0, r.stderr[-2000:]
    return job


def test_submit_matches_in_process_run(cluster, reference, tmp_path):
    job = _submit_and_wait(cluster, f"output.root={tmp_path}")
    st = _cli("status", job, "--address", cluster["dashboard"], env=_env(), timeout=30)
    assert "SUCCEEDED" in st.stdout
    logs = _cli("logs", job, "--address", cluster["dashboard"], env=_env(), timeout=30)
    assert "run report" in logs.stdout
    assert _latest_manifest(tmp_path) == reference


def test_submit_to_an_object_store_root(cluster, reference, s3_server):
    """The output root is an s3:// URI (a real S3 endpoint on loopback); the job's driver gets the
    endpoint and credentials only through ``submit --env``, as a user's job would."""
    from conftest import S3_BUCKET

    _submit_and_wait(cluster, f"output.root=s3://{S3_BUCKET}/cluster",
                     *[a for k, v in s3_server["env"].items() for a in ("--env", f"{k}={v}")])
    fs = s3_server["fs"]
    label = fs.open_input_stream(f"{S3_BUCKET}/cluster/demo/latest").read().decode().strip()
    assert fs.open_input_stream(f"{S3_BUCKET}/cluster/demo/{label}/manifest.json").read() == reference


def test_worker_killed_mid_run_is_retried(cluster, reference, tmp_path):
    proc = subprocess.Popen(_run_cmd(tmp_path), env=_env(RAY_ADDRESS=cluster["gcs"]),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        def busy_worker():
            for p in _cluster_procs(cluster["temp"]).values():
                try:
                    title = " ".join(p.cmdline())
                except psutil.Error:
                    continue
                # a worker busy with a task is titled by it (ray::_map_task, ray::MapBatches(...));
                # idle workers, agents and Ray Data's own actors are left alone
                if title.startswith("ray::") and not any(w in title for w in IDLE_TITLES):
                    return p
            if proc.poll() is not None:
                raise AssertionError("the run ended before a worker could be killed")
            return None

        victim = _wait_for(busy_worker, 60, "a Ray worker running a map task", poll=0.02)
        victim.send_signal(signal.SIGKILL)
        out, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    assert proc.returncode == 0, out[-3000:]
    assert _latest_manifest(tmp_path) == reference


def test_driver_killed_then_resumed(cluster, reference, tmp_path):
    env = _env(RAY_ADDRESS=cluster["gcs"])
    log = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen(_run_cmd(tmp_path), env=env, stdout=log, stderr=subprocess.STDOUT)

    def first_shard():
        if proc.poll() is not None:
            raise AssertionError("the run ended before it could be killed:\n"
                                 + (tmp_path / "first.log").read_text()[-3000:])
        return _journal(tmp_path)

    try:
        _wait_for(first_shard, 150, "the first shard")
        assert proc.poll() is None, "the run ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    assert not (tmp_path / "demo" / "latest").exists()
    again = subprocess.run(_run_cmd(tmp_path), env=env, capture_output=True, text=True, timeout=240)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert "resumed after" in again.stdout
    ds = tmp_path / "demo"
    summary = json.loads((ds / (ds / "latest").read_text().strip() / "summary.json").read_text())
    assert summary["resumed"]["shards"] >= 1
    assert _latest_manifest(tmp_path) == reference
    assert not list(ds.glob(".staging-*"))
