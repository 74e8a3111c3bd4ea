"""Issue 27 (the invented-object check's masked correlation): ``copied_object`` no longer calls
OpenCV's masked ``TM_CCOEFF_NORMED`` (its float32 rounding moved ``invented_ncc``'s fourth
place); its correlation is two unmasked correlations plus a float64 rescoring of the best
placements. Pinned here: the figure is the exact masked zero-mean normalized correlation
(a brute-force float64 sum at every placement) to 1e-9, it is OpenCV's masked figure to 1e-4,
an object copied into the fill is found at its exact score, and a flat fill reads 0."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from counterfactory.stages import invented
from counterfactory.stages.invented import copied_object


def _brute(win: np.ndarray, tpl: np.ndarray, tm: np.ndarray, ok: np.ndarray) -> float:
    """The definition: at each placement, the masked pixels of the template and of the window,
    each less its own mean per channel, their dot product over their norms; a placement with no
    variance counts 0; the best over ``ok``, 0.0 when none counts."""
    m = tm > 0
    t = tpl[m].astype(np.float64)
    t -= t.mean(axis=0)
    th, tw = tm.shape
    best = None
    for y, x in zip(*np.nonzero(ok), strict=True):
        p = win[y:y + th, x:x + tw][m].astype(np.float64)
        p -= p.mean(axis=0)
        var = float((p * p).sum())
        if var <= 1e-6:  # flat (well under any texture: one level off in one pixel is ~1)
            continue
        r = float((p * t).sum()) / np.sqrt(var * float((t * t).sum()))
        best = r if best is None else max(best, r)
    return 0.0 if best is None else best


def _case(rng: np.random.Generator, textured: bool = False):
    th, tw = int(rng.integers(5, 33)), int(rng.integers(5, 33))
    h, w = th + int(rng.integers(0, 40)), tw + int(rng.integers(0, 40))
    level = rng.uniform(0, 255, 3)
    win = np.clip(level + rng.normal(0, rng.choice([3, 20] if textured else [0.5, 3, 20]), (h, w, 3)), 0, 255)
    win = np.round(win).astype(np.float32)
    tpl = rng.uniform(0, 255, (th, tw, 3)).astype(np.float32)
    tm = np.zeros((th, tw), np.float32)
    cv2.ellipse(tm, (tw // 2, th // 2), (max(1, tw // 2), max(1, th // 2)), 0, 0, 360, 1, -1)
    ok = rng.random((h - th + 1, w - tw + 1)) < 0.6
    ok[0, 0] = True
    if rng.random() < 0.5:  # a copy of the template, with noise, somewhere in the window
        y, x = int(rng.integers(0, h - th + 1)), int(rng.integers(0, w - tw + 1))
        win[y:y + th, x:x + tw] = np.clip(tpl + rng.normal(0, rng.uniform(0, 60), tpl.shape), 0, 255)
        ok[y, x] = True
    if rng.random() < 0.3 and not textured:  # a flat part, far from the window's mean (float32's hard case)
        win[: h // 2] = np.round(level)
    return win, tpl, tm, ok


@pytest.mark.parametrize("seed", range(60))
def test_best_masked_ncc_is_the_exact_masked_correlation(seed):
    win, tpl, tm, ok = _case(np.random.default_rng(seed))
    assert invented._best_masked_ncc(win, tpl, tm, ok) == pytest.approx(_brute(win, tpl, tm, ok), abs=1e-9)


@pytest.mark.parametrize("seed", range(60))
def test_best_masked_ncc_is_opencvs_masked_figure(seed):
    """On textured windows; on a nearly flat one (std ~0.4 levels: ``_case(rng(4))``) OpenCV's
    float32 figure is 1.7e-4 off the exact one, the fourth place the old code stored."""
    win, tpl, tm, ok = _case(np.random.default_rng(seed), textured=True)
    ncc = cv2.matchTemplate(win, tpl, cv2.TM_CCOEFF_NORMED, mask=tm)[ok]
    ncc = ncc[np.isfinite(ncc)]  # OpenCV's 0/0 on a flat window: NaN or inf
    want = float(ncc.max()) if ncc.size else 0.0
    assert invented._best_masked_ncc(win, tpl, tm, ok) == pytest.approx(want, abs=1e-4)


def _scene(rng: np.random.Generator, h: int = 128, w: int = 160):
    """A textured image, an object in it and a fill region elsewhere."""
    img = cv2.GaussianBlur(rng.integers(0, 256, (h, w, 3)).astype(np.uint8), (0, 0), 1.5)
    obj = np.zeros((h, w), bool)
    oy, ox = int(rng.integers(5, 30)), int(rng.integers(5, 40))
    oh, ow = int(rng.integers(10, 27)), int(rng.integers(10, 27))  # its template at most WORK_SIDE: its own scale
    cv2.ellipse(obj.view(np.uint8), (ox + ow // 2, oy + oh // 2), (ow // 2, oh // 2), 0, 0, 360, 1, -1)
    region = np.zeros((h, w), np.uint8)
    region[70:124, 80:156] = 255
    return img, obj, region


@pytest.mark.parametrize("seed", range(12))
def test_an_object_copied_into_the_fill_is_found_at_its_exact_score(seed):
    rng = np.random.default_rng(100 + seed)
    img, obj, region = _scene(rng)
    by, bx = np.nonzero(obj)
    y0, y1 = by.min() - invented.OUTLINE_PX, by.max() + 1 + invented.OUTLINE_PX
    x0, x1 = bx.min() - invented.OUTLINE_PX, bx.max() + 1 + invented.OUTLINE_PX
    out = img.copy()
    out[region > 0] = 128
    dy, dx = 75 - y0, 85 - x0  # the object and its outline band pasted into the fill
    noise = rng.normal(0, 6, (y1 - y0, x1 - x0, 3))
    out[y0 + dy:y1 + dy, x0 + dx:x1 + dx] = np.clip(img[y0:y1, x0:x1] + noise, 0, 255).astype(np.uint8)
    got = copied_object(img, out, region, [("blob", obj)])
    assert got["invented_category"] == "blob"
    # at the paste's own placement: the exact figure, as the definition computes it
    tmask = cv2.dilate(obj.view(np.uint8), np.ones((2 * invented.OUTLINE_PX + 1,) * 2, np.uint8))[y0:y1, x0:x1]
    at = _brute(out[y0 + dy:y1 + dy, x0 + dx:x1 + dx].astype(np.float32), img[y0:y1, x0:x1].astype(np.float32),
                tmask.astype(np.float32), np.ones((1, 1), bool))
    assert 0.8 < at <= got["invented_ncc"] + 5e-5
    assert got["invented_ncc"] == pytest.approx(at, abs=1e-4)  # the copy is the best placement


@pytest.mark.parametrize("noise", [0.0, 0.4, 1.0])
def test_a_flat_fill_is_no_copy(noise):
    rng = np.random.default_rng(7)
    img, obj, region = _scene(rng)
    out = img.copy()
    fill = np.clip(200 + rng.normal(0, noise, out.shape), 0, 255).astype(np.uint8)
    out[region > 0] = fill[region > 0]
    got = copied_object(img, out, region, [("blob", obj)])
    assert got["invented_ncc"] < 0.5


def test_a_flat_window_or_template_reads_zero_without_a_warning(recwarn):
    rng = np.random.default_rng(5)
    tm = np.ones((8, 8), np.float32)
    ok = np.ones((13, 13), bool)
    tpl = rng.uniform(0, 255, (8, 8, 3)).astype(np.float32)
    assert invented._best_masked_ncc(np.full((20, 20, 3), 201, np.float32), tpl, tm, ok) == 0.0
    win = rng.uniform(0, 255, (20, 20, 3)).astype(np.float32)
    assert invented._best_masked_ncc(win, np.full((8, 8, 3), 9, np.float32), tm, ok) == 0.0
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]
