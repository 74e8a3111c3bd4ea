"""Issue 27 (s27audit3): the audit's fits at publish for less CPU, the same numbers. Each shortcut
is pinned to the computation it replaced: a fold's vectorizer taken as columns of one fitted on
every text, the probes' folds fitted without ``cross_val_predict``."""

from __future__ import annotations

import numpy as np
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GroupKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from counterfactory import audit


def _texts(rng: np.random.Generator, n: int) -> tuple[list[str], list[str]]:
    shapes = ["circle", "square", "star", "triangle", "hexagon"]
    texts, ys = [], []
    for _ in range(n):
        s = rng.choice(shapes)
        kind = rng.choice(["existence", "count"])
        texts.append(f"is there a {s}? kind_{kind}" if kind == "existence" else f"how many {s}s? kind_{kind}")
        ys.append(str(rng.integers(0, 3)))
    return texts, ys


def test_a_folds_vectorizer_is_a_column_subset_of_one_fitted_on_every_text():
    rng = np.random.default_rng(1)
    texts, ys = _texts(rng, 600)
    terms = audit._TermCounts(texts)
    # a fold without some terms ("hexagon"): its vocabulary is smaller than the whole one's
    fold = [i for i, t in enumerate(texts) if "hexagon" not in t][:300]
    sub, sub_y = [texts[i] for i in fold], [ys[i] for i in fold]
    vec_all, x_all, w_all = audit._tfidf_weighted(sub, sub_y, terms)
    vec_own, x_own, w_own = audit._tfidf_weighted(sub, sub_y)
    assert x_all.shape == x_own.shape and x_all.shape[1] < terms.counts.shape[1]
    # bit for bit: the same matrices, so the same fits
    assert np.array_equal(x_all.toarray(), x_own.toarray()) and w_all[0] == w_own[0]
    assert np.array_equal(w_all[1], w_own[1])
    test = texts[300:] + ["is there a pentagon? kind_existence"]  # one text never fitted on
    assert np.array_equal(vec_all(test).toarray(), vec_own(test).toarray())
    ref = TfidfVectorizer(ngram_range=(1, 2), lowercase=True).fit(sub)
    np.testing.assert_allclose(vec_all(test).toarray(), ref.transform(test).toarray(), rtol=1e-12, atol=1e-15)
    a = LogisticRegression(C=10.0, max_iter=5000).fit(x_all.toarray(), w_all[0], sample_weight=w_all[1])
    b = LogisticRegression(C=10.0, max_iter=5000).fit(x_own.toarray(), w_own[0], sample_weight=w_own[1])
    assert np.array_equal(a.coef_, b.coef_)


def test_the_probe_gives_cross_val_predicts_numbers():
    """``_probe``'s own fold loop: the AUC and heat map of ``cross_val_predict`` with the same model."""
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(2)
    n, grid = 20, 2
    pairs = []
    for i in range(n):
        ow = rng.normal(0, 1, (grid * grid, 3))
        cw = ow.copy()
        cw[i % 4] += rng.normal(0.8, 0.5, 3)
        cover = np.zeros(grid * grid)
        cover[i % 4] = 1.0
        pairs.append({"orig_img": ow.mean(0), "cf_img": cw.mean(0), "orig_win": ow, "cf_win": cw, "cover": cover})
    got = audit._probe(pairs, 5, grid)
    x = np.stack([f for p in pairs for f in (p["orig_img"], p["cf_img"])])
    y = np.tile([0, 1], n)
    model = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=5000, solver=audit._PROBE_SOLVER))
    prob = cross_val_predict(model, x, y, groups=np.repeat(np.arange(n), 2), cv=GroupKFold(5),
                             method="predict_proba")[:, 1]
    assert got["auc"] == round(float(roc_auc_score(y, prob)), 4)
    assert got["heatmap"]["scored"] == n
