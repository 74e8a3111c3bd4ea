"""Issue 27 (verify and the non-fill edits): each faster path pinned to the code it replaced
(frozen copies below), on random inputs, so a speed-up cannot move a decision, a metric or a
pixel: the dominant colored region's connected parts on its box, the control's spot drawn
from row counts, the template's flatness decided by OpenCV's std, verify's pixel metrics."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from counterfactory import scenes
from counterfactory.rules import side_of
from counterfactory.sample import Sample
from counterfactory.stages import invented
from counterfactory.stages.edit import _centroid, _LazyRng, dominant_region
from counterfactory.stages.shared import _nth_true, annotated_mask, box_of, flat_fill
from counterfactory.stages.verify import PixelVerify


def _old_dominant_region(img, core, min_saturation, annotated=None):
    """dominant_region as it was before (its connected parts on the whole image)."""
    from counterfactory.rules import HUES

    box = box_of(core)
    hsv = cv2.cvtColor(np.ascontiguousarray(img[box]), cv2.COLOR_RGB2HSV_FULL)
    sel = core[box] > 0
    sat_ok = sel & (hsv[..., 1] >= max(0.15, 0.6 * min_saturation) * 255) & (hsv[..., 2] >= 40)
    if not sat_ok.any():
        return np.zeros(core.shape, np.uint8)
    hue = hsv[..., 0][sat_ok].astype(np.int64)
    hist = np.bincount(hue // 8, minlength=32).astype(np.float64)
    hist = hist + np.roll(hist, 1) + np.roll(hist, -1)
    peak = (int(np.argmax(hist)) * 8 + 4) % 256
    if annotated in HUES:
        peak = int(round(HUES[annotated] / 360 * 256)) % 256
    dist = np.abs(((hsv[..., 0].astype(np.int64) - peak + 128) % 256) - 128)
    near = np.zeros(core.shape, np.uint8)
    near[box] = sat_ok & (dist <= 18)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(near, connectivity=8)
    if n < 2:
        return np.zeros(core.shape, np.uint8)
    biggest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    return (labels == biggest).astype(np.uint8) * 255


@pytest.mark.parametrize("seed", range(60))
def test_dominant_region_on_its_box_equals_the_whole_image(seed):
    rng = np.random.default_rng(seed)
    h, w = int(rng.integers(20, 120)), int(rng.integers(20, 120))
    # speckled hues: many small parts, often of equal area (the label order decides the tie)
    hsv = np.stack([rng.choice([0, 8, 85, 170], (h, w)), rng.integers(0, 256, (h, w)),
                    rng.integers(30, 256, (h, w))], -1).astype(np.uint8)
    img = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB_FULL)
    core = np.zeros((h, w), np.uint8)
    y0, x0 = int(rng.integers(0, h - 4)), int(rng.integers(0, w - 4))
    core[y0:int(rng.integers(y0 + 2, h + 1)), x0:int(rng.integers(x0 + 2, w + 1))] = 255
    core[rng.random((h, w)) < 0.2] = 0
    ann = [None, "red", "green"][seed % 3]
    assert np.array_equal(dominant_region(img, core, 0.25, ann), _old_dominant_region(img, core, 0.25, ann))


@pytest.mark.parametrize("seed", range(30))
def test_control_spot_from_row_counts_is_np_nonzero_s(seed):
    rng = np.random.default_rng(seed)
    free = rng.random((int(rng.integers(1, 50)), int(rng.integers(1, 50)))) < [0.0, 0.01, 0.5][seed % 3]
    a, b = np.random.default_rng(seed), np.random.default_rng(seed)
    ys, xs = np.nonzero(free)
    want = (int(ys[i]), int(xs[i])) if len(ys) and (i := int(a.integers(len(ys)))) >= 0 else (-1, -1)
    assert _nth_true(free, b) == want
    assert a.integers(1 << 30) == b.integers(1 << 30)  # the same draws consumed
    # a 0/255 uint8 mask (cv2.compare's, issue 27 s28fill): the same spot and draws
    c, d = np.random.default_rng(seed), np.random.default_rng(seed)
    assert _nth_true(free.view(np.uint8) * np.uint8(255), c) == _nth_true(free, d) == want
    assert c.integers(1 << 30) == d.integers(1 << 30)


@pytest.mark.parametrize("seed", range(10))
def test_flat_fill_on_its_box(seed):
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    region = ((rng.random((40, 50)) < 0.3) * 255).astype(np.uint8)
    want = img.copy()
    want[region > 0] = (7, 8, 9)
    assert np.array_equal(flat_fill(img, region, (7, 8, 9)), want)
    assert np.array_equal(flat_fill(img, np.zeros_like(region), (7, 8, 9)), img)  # an empty region


@pytest.mark.parametrize("seed", range(40))
def test_flat_template_decision_is_numpys(seed):
    rng = np.random.default_rng(seed)
    h, w = int(rng.integers(3, 40)), int(rng.integers(3, 40))
    # standard deviations around the floor (6 levels), some exactly at it
    crop = np.clip(128 + rng.normal(0, float(rng.uniform(4, 8)), (h, w, 3)), 0, 255).astype(np.uint8)
    if seed % 4 == 0:
        crop = np.where(rng.random((h, w, 1)) < 0.5, 122, 134).astype(np.uint8)  # std exactly 6
    tmask = ((rng.random((h, w)) < 0.8) * 1).astype(np.uint8)
    tmask[0, 0] = 1
    tpl = crop.astype(np.float32)
    want = float(tpl[tmask > 0].std(axis=0).max()) < invented.MIN_TEMPLATE_STD
    assert invented._flat_template(crop, tpl, tmask) == want


def _old_metrics(img, out, region):
    absdiff = cv2.absdiff(out, img)
    win = box_of(region)
    sub = region[win]
    n_out = img.shape[0] * img.shape[1] - cv2.countNonZero(sub)
    inside = cv2.mean(absdiff[win], mask=sub)[:3]
    absdiff[win][sub > 0] = 0
    n_changed = 0
    if cv2.countNonZero(absdiff.reshape(absdiff.shape[0], -1)):
        n_changed = cv2.countNonZero(cv2.transform(absdiff, np.ones((1, 3), np.float32)))
    return {"outside_changed_frac": round(n_changed / n_out, 6) if n_out else 0.0,
            "inside_mad": round(float(np.mean(inside)), 3)}


@pytest.mark.parametrize("seed", range(20))
def test_pixel_metrics_equal_the_old_ones(seed):
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, (50, 60, 3), dtype=np.uint8)
    region = np.zeros((50, 60), np.uint8)
    region[int(rng.integers(0, 20)):int(rng.integers(25, 50)), int(rng.integers(0, 20)):int(rng.integers(25, 60))] = 255
    out = img.copy()
    sel = region > 0
    out[sel] = rng.integers(0, 256, (int(sel.sum()), 3), dtype=np.uint8)
    if seed % 2:  # a few pixels outside changed too
        out[rng.integers(0, 50, 5), rng.integers(0, 60, 5)] += 1
    assert PixelVerify()._metrics(img, out, region) == _old_metrics(img, out, region)


@pytest.mark.parametrize("seed", range(30))
def test_side_and_centroid_on_the_box_equal_np_nonzero_means(seed):
    rng = np.random.default_rng(seed)
    h, w = (int(v) for v in rng.integers(1, 200, 2))
    m = np.zeros((h, w), bool)
    y0, x0 = int(rng.integers(0, h)), int(rng.integers(0, w))
    m[y0:int(rng.integers(y0, h + 1)), x0:int(rng.integers(x0, w + 1))] = True
    m &= rng.random((h, w)) < 0.7
    ys, xs = np.nonzero(m)
    if not len(xs):
        assert side_of(m) is None
        return
    f = (xs.mean() + 0.5) / w
    assert side_of(m) == side_of(m.astype(np.uint8) * 255) == ("left" if f < 0.4 else "right" if f > 0.6 else None)
    assert _centroid(m) == (xs.mean(), ys.mean())


def test_lazy_generator_draws_as_the_generator():
    a, b = _LazyRng([5, 17]), np.random.default_rng([5, 17])
    assert a.integers(1000) == b.integers(1000)
    assert np.array_equal(a.standard_normal(4), b.standard_normal(4))
    assert a.permutation(9).tolist() == b.permutation(9).tolist() and a.uniform(0, 1) == b.uniform(0, 1)


@pytest.mark.parametrize("seed", range(15))
def test_annotated_mask_draws_polygon_mask_s_union(seed):
    """Polygons drawn straight into the union: the pixels of polygon_mask, overlaps included."""
    rng = np.random.default_rng(seed)
    h, w = 60, 80
    objs = []
    for _ in range(int(rng.integers(1, 5))):
        polys = [rng.uniform(-10, 90, (int(rng.integers(3, 9)), 2)).tolist() for _ in range(int(rng.integers(1, 3)))]
        objs.append({"category": "x", "polygons": polys})
    objs.append({"category": "y", "box": [5.4, 6.6, 20.2, 30.9]})
    s = Sample(idx=0, key="k", status="ok", meta={"annotated": objs, "instances": []},
               arrays={"mask": np.zeros((h, w), np.uint8)})
    want = np.zeros((h, w), np.uint8)
    for o in objs:
        for poly in o.get("polygons") or []:
            want[scenes.polygon_mask(poly, w, h)] = 255
    want[7:31, 5:20] = 255
    assert np.array_equal(annotated_mask(s), want)
