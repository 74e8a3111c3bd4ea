"""The helper process at its edges (issue 27, review of session 30): the driver's exit does not
wait for the helper's queued work, a Ctrl-C at a terminal is the driver's alone, and the blind
answerers' warm starts never cost the audit."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from counterfactory import audit, helper_process
from tests.conftest import REPO

# the helper starts only beside another CPU (helper_process.start)
needs_helper = pytest.mark.skipif(helper_process._cpus() < 2, reason="no helper process on one CPU")


@needs_helper
def test_the_driver_s_exit_does_not_wait_for_the_helper_s_queue(tmp_path):
    """An interrupted run (or a publish that raised while its audit ran on the helper) leaves work
    queued there: the driver exits at once and the worker is gone, rather than loky's exit hook
    letting the worker finish every queued task first (20 s here)."""
    code = textwrap.dedent("""
        import os, sys, time
        from counterfactory import helper_process
        assert helper_process.start()
        print(helper_process.run(os.getpid), flush=True)
        for _ in range(4):
            helper_process.submit(time.sleep, 5)
        time.sleep(0.3)
        if sys.argv[1] == "interrupted":
            raise KeyboardInterrupt
    """)
    for how in ("exits", "interrupted"):
        p = subprocess.Popen([sys.executable, "-c", code, how], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, cwd=REPO)
        worker = int(p.stdout.readline())
        t0 = time.monotonic()
        try:
            p.wait(timeout=12)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        took = time.monotonic() - t0
        gone = time.monotonic() + 5
        while _alive(worker) and time.monotonic() < gone:
            time.sleep(0.1)
        if _alive(worker):  # never left behind by a failing test
            import os

            os.kill(worker, signal.SIGKILL)
            pytest.fail(f"{how}: the helper outlived its driver")
        assert took < 5, f"{how}: the driver waited {took:.1f} s for the helper's queue"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@needs_helper
def test_a_ctrl_c_is_the_driver_s():
    """A terminal's SIGINT reaches the process group: the helper ignores it (the driver stops it)."""
    assert helper_process.start()
    assert helper_process.run(signal.getsignal, signal.SIGINT) == signal.SIG_IGN


def _rows(n: int = 60) -> list[dict]:
    rng = np.random.default_rng(0)
    words = ["red", "blue", "cat", "dog", "left", "right", "two", "three"]
    out = []
    for g in range(n):
        for v in ("orig", "remove", "flip"):
            q = f"is there a {words[g % 8]} {words[(g * 3) % 8]}?"
            a = ["yes", "no", "unknown", "left"][int(rng.integers(0, 4 if v == "flip" else 2))]
            out.append({"g": g, "v": v, "q": q, "k": "existence", "a": a, "orig": "yes"})
    return out


def test_a_warm_start_scikit_learn_refuses_is_a_cold_fit(monkeypatch):
    rows = _rows()
    with monkeypatch.context() as m:
        m.setattr(audit, "_warm_coef", lambda prev, classes, cols: None)
        cold = audit._blind(rows, ["remove", "flip"], 5)
    # a start of the wrong shape for this fit (what a mapping bug would hand lbfgs)
    monkeypatch.setattr(audit, "_warm_coef", lambda prev, classes, cols: (np.zeros((7, 3)), np.zeros(7))
                        if prev is not None else None)
    assert audit._blind(rows, ["remove", "flip"], 5) == cold


@pytest.mark.parametrize("prev_classes,classes", [
    (["no", "yes"], ["no", "unknown", "yes"]),  # binary, then multinomial: a cold start
    (["no", "unknown", "yes"], ["no", "yes"]),
    (["no", "yes"], ["unknown", "yes"]),  # another binary pair: cold
    (["a", "b", "c"], ["d", "e", "f"]),  # no answer in common: zeros
    ([1, 2, 3], [2, 3, 4]),  # numbers as answers
])
def test_warm_coef_maps_answers_and_terms(prev_classes, classes):
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(1)
    p_cols, cols = np.array([0, 2, 4, 6]), np.array([1, 3, 5])  # no term in common either
    rows = 1 if len(prev_classes) == 2 else len(prev_classes)
    prev = (prev_classes, p_cols, rng.normal(size=(rows, 4)), rng.normal(size=rows))
    init = audit._warm_coef(prev, classes, cols)
    binary, p_binary = len(classes) == 2, len(prev_classes) == 2
    if binary != p_binary or (binary and prev_classes != classes):
        assert init is None
        return
    coef, icpt = init
    assert coef.shape == (1 if binary else len(classes), len(cols)) and not coef.any()
    shared = [c in prev_classes for c in classes]
    assert (icpt != 0).tolist() == shared
    x = rng.normal(size=(30, len(cols)))
    y = [classes[i % len(classes)] for i in range(30)]
    clf = LogisticRegression(C=10.0, max_iter=5000, warm_start=True)
    clf.coef_, clf.intercept_ = init
    clf.fit(x, y)  # scikit-learn takes the start
    assert audit._fit_answerer(x, y, np.ones(30), prev, cols).classes_.tolist() == sorted(classes)


def test_the_collector_bounds_the_bytes_it_holds(tmp_path, monkeypatch):
    """Large members (12-megapixel PNGs: ~200 MB a sample) wait for the helper up to a byte bound,
    not sixteen samples' worth; the records keep their order."""
    import json

    from counterfactory import audit_features

    sample = audit_features.AuditSample(seed=0, sample_pairs=10, n_inputs=10, grid=8, abstain="unknown")
    col = audit_features.AuditCollector(tmp_path, "demo-000000.tar", sample)
    monkeypatch.setattr(helper_process, "submit", lambda fn, *args: object())
    monkeypatch.setattr(helper_process, "result", lambda fut, fn, *args: ({"key": args[0]}, 0.5))
    monkeypatch.setattr(audit_features, "pack", lambda records, *a: json.dumps([r["key"] for r in records]).encode())
    doc = json.dumps({"qa": [], "variants": [], "edits": {}}).encode()
    big = bytes(30 << 20)  # one object: the test holds 30 MB, the collector counts each sample's
    for i in range(10):
        col.add(f"k{i}", {"json": doc, "orig.png": big})
        held = sum(len(a[2]["orig.png"]) for _, a, *_ in col._pending)
        assert held - (30 << 20) <= col._PENDING_BYTES  # beyond the oldest
        assert col._pending  # one always overlaps the helper, however large
    col.finish()
    assert [r["key"] for r in col.records] == [f"k{i}" for i in range(10)]


@needs_helper
@pytest.mark.skipif(not hasattr(signal, "alarm"), reason="POSIX fork")
def test_a_forked_child_computes_itself(tmp_path):
    """A child forked from a driver with a helper (``os.fork``, a fork-started multiprocessing
    pool) got a copy of the executor with no thread to run it: its first helper work waited
    forever. It computes itself, and leaves the parent's helper working."""
    code = textwrap.dedent("""
        import os, signal, sys
        from counterfactory import helper_process
        assert helper_process.start()
        parent_helper = helper_process.run(os.getpid)
        pid = os.fork()
        if pid == 0:
            signal.alarm(10)  # a hang is a death by SIGALRM
            ok = helper_process.run(os.getpid) == os.getpid() and not helper_process.running()
            sys.exit(0 if ok else 1)
        _, status = os.waitpid(pid, 0)
        print(status, helper_process.run(os.getpid) == parent_helper != os.getpid(), flush=True)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["0", "True"], (out.stdout, out.stderr[-2000:])


def _dying_record(*args):
    """``timed_record``, except that the helper process kills itself at its Nth call (the count in
    a file named by its driver's pid; in the driver, which has another parent, it never fires)."""
    import os
    from pathlib import Path

    from counterfactory.audit_features import sample_record

    marker = Path(f"/tmp/counterfactory-kill-helper-{os.getppid()}")
    if marker.exists():
        n = int(marker.read_text())
        if n <= 1:
            marker.unlink()
            os._exit(1)
        marker.write_text(str(n - 1))
    t0 = time.perf_counter()
    return sample_record(*args), time.perf_counter() - t0


@needs_helper
def test_a_helper_killed_mid_run_loses_nothing(tmp_path, monkeypatch):
    """The helper dies at its 5th sample of a run: the driver computes the rest (and whatever was
    queued), the features and the card's audit are those of a run with no helper."""
    import os
    from pathlib import Path

    from counterfactory import audit_features
    from counterfactory.pipeline.runner import run_pipeline
    from tests.conftest import make_config, scenes_input
    from tests.test_helper_process import _card_audit, _features

    def cfg(name):
        return make_config(tmp_path / name, [scenes_input(8, seed=3)], output={"shard_size": 6},
                           audit={"sample_pairs": 1000})

    with monkeypatch.context() as m:
        m.setattr(helper_process, "_executor", None)
        m.setattr(helper_process, "_failed", True)
        inline = run_pipeline(cfg("inline"), local=True, progress=False)
    helper_process.shutdown()
    monkeypatch.setattr(helper_process, "_failed", False)
    assert helper_process.start()
    marker = Path(f"/tmp/counterfactory-kill-helper-{os.getpid()}")
    marker.write_text("5")
    monkeypatch.setattr(audit_features, "timed_record", _dying_record)
    try:
        killed = run_pipeline(cfg("killed"), local=True, progress=False)
    finally:
        left = marker.exists()
        marker.unlink(missing_ok=True)
    assert not left and not helper_process.running()  # it died, and the driver took over
    fa, fb = _features(inline.out_dir), _features(killed.out_dir)
    assert len(fa) == 3 and fa == fb
    assert _card_audit(inline.out_dir) == _card_audit(killed.out_dir)
    assert killed.content_id == inline.content_id
