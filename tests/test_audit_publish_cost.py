"""Issue 27, after the stream: what the audit does at publish costs less and gives the same
figures. The probes' Newton solver finds lbfgs's optimum (AUCs within its tolerance), the image
summaries are computed at once (bit for bit the one-by-one ones), scikit-learn's per-call checks
are skipped (same numbers), a blind answerer fitted on the same rows twice is fitted once, and
the driver imports what publish needs while the stream runs."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from counterfactory import audit, audit_features, scenes


def _pairs(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        img = scenes.render_scene(scenes.scene_spec(11, i, (96, 96)))
        cf = img.copy()
        y, x = (int(v) for v in rng.integers(4, 60, 2))
        cf[y:y + 24, x:x + 24] = cf[y:y + 24, x:x + 24] // 2 + 60  # a faint patch: not trivially separable
        mask = np.zeros((96, 96), np.float32)
        mask[y:y + 24, x:x + 24] = 1
        ow, cw = audit.window_features(img, 8), audit.window_features(cf, 8)
        out.append({"orig_img": audit.image_features(ow), "cf_img": audit.image_features(cw),
                    "orig_win": ow, "cf_win": cw, "cover": audit._cells(mask, 8).reshape(-1)})
    return out


def test_the_newton_probe_gives_lbfgs_s_figures(monkeypatch):
    pairs = _pairs(24)
    new = audit._probe(pairs, 4, 8)
    monkeypatch.setattr(audit, "_PROBE_SOLVER", "lbfgs")
    old = audit._probe(pairs, 4, 8)
    assert audit._PROBE_SOLVER != "newton-cholesky" and 0.5 < old["auc"] < 1
    assert abs(new["auc"] - old["auc"]) <= 2e-3
    for k in ("top_window_hit_rate", "top_k_iou"):
        assert abs(new["heatmap"][k] - old["heatmap"][k]) <= 0.05
    assert new["heatmap"]["scored"] == old["heatmap"]["scored"]


def test_image_summaries_at_once_equal_one_by_one():
    rng = np.random.default_rng(1)
    wins = [rng.normal(0, 10.0 ** rng.integers(-2, 3), (64, 13)).astype(np.float32).astype(np.float64)
            for _ in range(40)]
    many = audit_features.image_features_many(wins)
    assert np.array_equal(many, np.stack([audit_features.image_features(w) for w in wins]))
    assert audit_features.image_features_many([]).shape == (0, 6 * len(audit_features.WINDOW_FEATURES))


def test_the_blind_answerers_fit_the_same_rows_once(monkeypatch):
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(2)
    rows = []
    for g in range(30):
        for q, k in (("is there a cup?", "existence"), ("what color is the star?", "color")):
            a = str(rng.choice(["yes", "no"])) if k == "existence" else str(rng.choice(["red", "blue"]))
            for v, ans in (("orig", a), ("random_mask", a), ("remove", "no" if k == "existence" else "unknown")):
                rows.append({"g": g, "v": v, "q": q, "k": k, "a": ans, "orig": a})
    fits = {"n": 0}
    real = LogisticRegression.fit

    def counting(self, *a, **k):
        fits["n"] += 1
        return real(self, *a, **k)

    monkeypatch.setattr(LogisticRegression, "fit", counting)
    got = audit._blind(rows, ["random_mask", "remove"], 3)
    # pooled (3 folds) + orig (3); random_mask's rows are orig's: no fit of its own; remove's
    # training rows are the same sequence in every fold (one answer per question): one fit
    assert fits["n"] == 3 + 3 + 0 + 1
    assert got["random_mask"] == got["orig"] and got["remove"]["text_given_variant"] == 1.0


@pytest.mark.parametrize("audit_on,helper", [(True, True), (True, False), (False, True)])
def test_publish_s_imports_start_while_the_stream_runs(tmp_path, audit_on, helper):
    """The driver imports the plots' modules (and pandas, which pyarrow's first conversion of
    rows imports) on a thread; the audit's scikit-learn is imported by the helper process, or by
    the driver's thread when there is no helper."""
    code = f"""
import sys, threading
from counterfactory import helper_process
from counterfactory.audit_features import AuditSample, write_plan
assert "sklearn" not in sys.modules and "matplotlib.figure" not in sys.modules
helper_process._failed = not {helper}
write_plan({str(tmp_path)!r}, AuditSample(0, 8, 10, 8, "unknown") if {audit_on} else None, helper=True)
for t in threading.enumerate():
    if t.name == "counterfactory-prewarm":
        t.join()
there = helper_process.run(eval, "'sklearn.linear_model' in __import__('sys').modules")
print("sklearn.linear_model" in sys.modules, "matplotlib.figure" in sys.modules, "pandas" in sys.modules,
      helper_process.running(), there)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    in_helper = audit_on and helper
    assert out == [str(audit_on and not helper), "True", "True", str(in_helper), str(audit_on)]


def test_the_blind_answerers_fitted_dense_answer_as_sparse(monkeypatch):
    """Small TF-IDF matrices are fitted dense (scipy.sparse's per-iteration overhead): the same
    objective, the same answers as the sparse fit."""
    rng = np.random.default_rng(3)
    shapes, colors = ["circle", "square", "star", "triangle", "cup"], ["red", "blue", "green"]
    rows = []
    for g in range(40):
        for s in rng.choice(shapes, 3, replace=False):
            a = str(rng.choice(colors))
            for v, ans in (("orig", a), ("remove", "unknown" if rng.random() < 0.7 else a)):
                rows.append({"g": g, "v": v, "q": f"what color is the {s}?", "k": "color", "a": ans, "orig": a})
            e = str(rng.choice(["yes", "no"]))
            rows.append({"g": g, "v": "orig", "q": f"is there a {s}?", "k": "existence", "a": e, "orig": e})
    dense = audit._blind(rows, ["remove"], 4)
    monkeypatch.setattr(audit, "_DENSE_CELLS", 0)
    assert audit._blind(rows, ["remove"], 4) == dense
    assert 0 < dense["orig"]["text_only"] < 1


def test_no_prewarm_thread_outlives_publish(tmp_path):
    import threading

    from counterfactory.pipeline.runner import run_pipeline
    from tests.conftest import make_config, scenes_input

    res = run_pipeline(make_config(tmp_path, [scenes_input(3, seed=1)]), local=True, progress=False)
    assert (res.out_dir / "card.json").exists()
    assert not [t for t in threading.enumerate() if t.name == "counterfactory-prewarm"]


def test_warm_coefficients_map_by_answer_and_term():
    prev = (["no", "red", "yes"], np.array([2, 5, 9]), np.arange(9.0).reshape(3, 3), np.array([10.0, 20.0, 30.0]))
    coef, icpt = audit._warm_coef(prev, ["blue", "no", "yes"], np.array([5, 7, 2]))
    # blue: a new answer (0); no: row 0 of prev; yes: row 2. Terms 5 -> col 1, 7 new, 2 -> col 0
    assert np.array_equal(coef, [[0, 0, 0], [1, 0, 0], [7, 0, 6]]) and np.array_equal(icpt, [0, 10, 30])
    binary = (["no", "yes"], np.array([1, 2]), np.array([[4.0, 5.0]]), np.array([1.5]))
    c, i = audit._warm_coef(binary, ["no", "yes"], np.array([2, 3]))
    assert np.array_equal(c, [[5, 0]]) and np.array_equal(i, [1.5])
    assert audit._warm_coef(binary, ["no", "red", "yes"], np.array([2])) is None
    assert audit._warm_coef(prev, ["no", "yes"], np.array([2])) is None
    assert audit._warm_coef(None, ["no", "yes"], np.array([2])) is None


def test_warm_started_blind_answerers_take_fewer_steps_to_the_same_accuracies(monkeypatch):
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(4)
    shapes, colors = ["circle", "square", "star", "triangle", "cup", "ring"], ["red", "blue", "green", "gray"]
    rows = []
    for g in range(80):
        for s in rng.choice(shapes, 3, replace=False):
            a = str(rng.choice(colors, p=[0.4, 0.3, 0.2, 0.1]))
            for v, ans in (("orig", a), ("remove", "unknown" if rng.random() < 0.7 else a)):
                rows.append({"g": g, "v": v, "q": f"what color is the {s}?", "k": "color", "a": ans, "orig": a})
            e = str(rng.choice(["yes", "no"]))
            rows.append({"g": g, "v": "orig", "q": f"is there a {s}?", "k": "existence", "a": e, "orig": e})
    steps = {"n": 0}
    real = LogisticRegression.fit

    def counting(self, *a, **k):
        out = real(self, *a, **k)
        steps["n"] += int(np.max(out.n_iter_))
        return out

    monkeypatch.setattr(LogisticRegression, "fit", counting)
    warm = audit._blind(rows, ["remove"], 5)
    warm_steps, steps["n"] = steps["n"], 0
    monkeypatch.setattr(audit, "_warm_coef", lambda *a: None)
    cold = audit._blind(rows, ["remove"], 5)
    assert warm_steps < 0.9 * steps["n"]
    for v in cold:
        for k, x in cold[v].items():
            assert abs(warm[v][k] - x) <= 0.01, (v, k, warm[v][k], x)
