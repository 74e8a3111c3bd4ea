"""Issue 27: the shortcut audit's cost at publish, with its figures kept. The window statistics
are resampled four maps per call and the blind answerers fit on merged (question, answer) rows;
each is pinned to the computation it replaced."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression

from counterfactory import audit


@pytest.mark.parametrize("shape", [(256, 256), (250, 311), (17, 9), (480, 640)])
def test_cells_by_area_weights_equal_an_area_resize_per_map(shape):
    """The window means as two matrix products with the area weights, every map at once: the
    numbers of OpenCV's area resize of each map (to float32 rounding)."""
    import cv2

    from counterfactory.audit_features import _cells_stack

    rng = np.random.default_rng(shape[0])
    maps = rng.normal(0, 50, (19, *shape)).astype(np.float32)
    got = _cells_stack(maps, 8)
    assert got.shape == (19, 8, 8) and got.dtype == np.float32
    for g, m in zip(got, maps, strict=True):
        ref = cv2.resize(m, (8, 8), interpolation=cv2.INTER_AREA)
        assert np.allclose(g, ref, rtol=1e-5, atol=1e-3)
        assert np.allclose(g, audit._cells(m, 8), rtol=1e-6, atol=1e-4)  # one map: another kernel


def _templated(rng: np.random.Generator, n: int) -> tuple[list[str], list[str]]:
    shapes, colors = ["circle", "square", "star", "triangle"], ["red", "blue", "green"]
    texts, ys = [], []
    for _ in range(n):
        kind = rng.choice(["existence", "count", "color"])
        s = rng.choice(shapes)
        q = {"existence": f"is there a {s}?", "count": f"how many {s}s are there?",
             "color": f"what color is the {s}?"}[kind]
        texts.append(f"{q} kind_{kind}")
        ys.append({"existence": rng.choice(["yes", "no"]), "count": str(rng.integers(0, 4)),
                   "color": rng.choice(colors)}[kind])
    return texts, ys


def test_merged_rows_give_the_vectorizer_and_the_classifier_of_every_row():
    rng = np.random.default_rng(0)
    texts, ys = _templated(rng, 1200)
    vec, x, (ty, tw) = audit._tfidf_weighted(texts, ys)
    assert x.shape[0] == len(ty) < 100 and tw.sum() == len(texts)
    ref = TfidfVectorizer(ngram_range=(1, 2), lowercase=True).fit(texts)
    test_texts, _ = _templated(rng, 200)
    assert np.array_equal(vec(test_texts).toarray(), ref.transform(test_texts).toarray())
    full = LogisticRegression(C=10.0, max_iter=5000).fit(ref.transform(texts), ys)
    merged = LogisticRegression(C=10.0, max_iter=5000).fit(x, ty, sample_weight=tw)
    assert list(merged.classes_) == list(full.classes_)
    np.testing.assert_allclose(merged.predict_proba(vec(test_texts)), full.predict_proba(ref.transform(test_texts)),
                               atol=2e-3)
    assert list(merged.predict(vec(test_texts))) == list(full.predict(ref.transform(test_texts)))
