"""Issue 27, the run spent in the stream: the driver's helper process (``helper_process``) takes
the audit's per-sample statistics and its fits at publish. It only moves work: the features and
the card's audit are the ones computed in the driver; a helper that dies or cannot start leaves
the driver to compute them; it leaves with its driver; a script without a ``__main__`` guard is
not run again by it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from concurrent.futures import Future
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np
import pytest

from counterfactory import audit_features, helper_process
from counterfactory.pipeline.runner import run_pipeline
from tests.conftest import REPO, make_config, scenes_input


def _features(vdir: Path) -> dict[str, tuple[dict, dict]]:
    out = {}
    for p in sorted((vdir / "audit").glob("*.npz")):
        with np.load(p) as z:
            meta = json.loads(z["meta"].tobytes())
            meta.pop("seconds")
            out[p.name] = (meta, {k: z[k].tobytes() for k in ("win", "cover")})
    return out


def _card_audit(vdir: Path) -> dict:
    a = json.loads((vdir / "card.json").read_text())["audit"]
    a.pop("cost")
    return a


def test_the_helper_s_features_and_audit_are_the_driver_s(tmp_path, monkeypatch):
    inputs = [scenes_input(24, seed=3)]
    helper_process.start()
    assert helper_process.running()
    a = run_pipeline(make_config(tmp_path / "a", inputs, output={"shard_size": 10}), local=True, progress=False)
    # the same run with no helper: every record and the audit computed in the driver
    monkeypatch.setattr(helper_process, "_executor", None)
    monkeypatch.setattr(helper_process, "_failed", True)
    b = run_pipeline(make_config(tmp_path / "b", inputs, output={"shard_size": 10}), local=True, progress=False)
    fa, fb = _features(a.out_dir), _features(b.out_dir)
    assert len(fa) == 5 and fa == fb  # 48 inputs (2 questions a scene), shards of 10
    assert _card_audit(a.out_dir) == _card_audit(b.out_dir)
    assert _card_audit(a.out_dir)["detectability"]


def test_a_dead_helper_s_work_is_done_here(monkeypatch):
    calls = []

    def work(x):
        calls.append(x)
        return x * 2

    dead: Future = Future()
    dead.set_exception(BrokenProcessPool("the worker died"))
    stopped = []
    monkeypatch.setattr(helper_process, "_give_up", lambda: stopped.append(True))
    assert helper_process.result(dead, work, 21) == 42 and calls == [21] and stopped == [True]
    # an error of the work itself is the work's: raised here as it would have been
    failed: Future = Future()
    failed.set_exception(ValueError("bad input"))
    with pytest.raises(ZeroDivisionError):
        helper_process.result(failed, lambda: 1 / 0)
    assert helper_process.result(None, work, 1) == 2  # no helper


def test_the_collector_waits_for_at_most_its_bound(tmp_path, monkeypatch):
    """At most ``_PENDING`` samples' members wait for the helper; the records keep their order."""
    sample = audit_features.AuditSample(seed=0, sample_pairs=10, n_inputs=10, grid=8, abstain="unknown")
    col = audit_features.AuditCollector(tmp_path, "demo-000000.tar", sample)
    futures: list[Future] = []

    def submit(fn, *args):
        f: Future = Future()
        futures.append(f)
        return f

    def result(fut, fn, *args):
        return ({"key": args[0]}, 0.5)

    monkeypatch.setattr(helper_process, "submit", submit)
    monkeypatch.setattr(helper_process, "result", result)
    monkeypatch.setattr(audit_features, "pack", lambda records, *a: json.dumps([r["key"] for r in records]).encode())
    doc = json.dumps({"qa": [], "variants": [], "edits": {}}).encode()
    for i in range(40):
        col.add(f"k{i:02d}", {"json": doc})
        assert len(col._pending) <= col._PENDING
    col.finish()
    assert [r["key"] for r in col.records] == [f"k{i:02d}" for i in range(40)] and col.seconds == 20.0


def _pids_of_children(pid: int) -> set[int]:
    out = set()
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if ppid == pid:
                out.add(int(d.name))
    return out


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc")
def test_the_helper_leaves_when_its_driver_is_killed(tmp_path):
    code = textwrap.dedent("""
        import os, sys, time
        from counterfactory import helper_process
        assert helper_process.start()
        assert helper_process.run(os.getpid) != os.getpid()
        print("up", flush=True)
        time.sleep(60)
    """)
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=REPO)
    assert p.stdout.readline().strip() == "up"
    kids = _pids_of_children(p.pid)
    assert kids
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    deadline = time.time() + 15
    alive = kids
    while alive and time.time() < deadline:
        time.sleep(0.3)
        alive = {k for k in alive if Path(f"/proc/{k}").exists()
                 and (Path(f"/proc/{k}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z")}
    for k in alive:  # do not leave them behind if the test fails
        os.kill(k, signal.SIGKILL)
    assert not alive


def test_a_script_without_a_main_guard_runs_once(tmp_path):
    """The helper is a fresh interpreter that does not import the caller's ``__main__``: a
    script that runs the pipeline at its top level is not run again by it."""
    script = tmp_path / "job.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(REPO)!r})
        from counterfactory.pipeline.runner import run_pipeline
        from tests.conftest import make_config, scenes_input
        from pathlib import Path
        print("top level", flush=True)
        res = run_pipeline(make_config(Path({str(tmp_path)!r}), [scenes_input(4, seed=5)]), local=True, progress=False)
        from counterfactory import helper_process
        print("published", res.out_dir.name, "helper", helper_process.running(), flush=True)
    """))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.count("top level") == 1 and out.stdout.count("published") == 1
    assert "helper True" in out.stdout  # a local run's audit went to the helper
    assert sorted(p.name for p in (tmp_path / "out").glob("*/v*")) == ["v1"]


def test_no_helper_on_one_cpu(monkeypatch):
    monkeypatch.setattr(helper_process, "_executor", None)
    monkeypatch.setattr(helper_process, "_failed", False)
    monkeypatch.setattr(helper_process, "_cpus", lambda: 1)
    assert not helper_process.start() and not helper_process.running()
    assert helper_process.submit(len, "abc") is None and helper_process.run(len, "abc") == 3


def test_a_ray_run_s_driver_starts_no_helper(tmp_path):
    """Ray's shard tasks compute their statistics where they run: the driver of a Ray run keeps
    the audit's imports on its thread and starts no helper (it would hold ~290 MB beside the
    workers to save ~1 s at publish)."""
    code = textwrap.dedent(f"""
        import threading
        from counterfactory import helper_process
        from counterfactory.audit_features import AuditSample, write_plan
        write_plan({str(tmp_path)!r}, AuditSample(0, 8, 10, 8, "unknown"))
        for t in threading.enumerate():
            if t.name == "counterfactory-prewarm":
                t.join()
        import sys
        print(helper_process.running(), "sklearn.linear_model" in sys.modules)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.split() == ["False", "True"]
