"""The classical edit stage's inpainting and its shortcuts: two-pass fill of large holes, one
evidence fill shared by remove/count/swap, windowed insert placement. Each shortcut is checked
against the plain computation it replaces (byte-identical where it must be), and for
determinism."""

from __future__ import annotations

import copy

import cv2
import numpy as np
import pytest
from pydantic import ValidationError

from counterfactory import scenes
from counterfactory.pipeline.runner import local_batches
from counterfactory.sample import Sample, decode_batch
from counterfactory.stages import edit as E
from counterfactory.stages import shared
from tests.conftest import load_records, make_config, textured

ALL = ["remove", "blackout", "random_mask", "attribute", "flip", "count", "insert", "swap"]


@pytest.fixture(scope="module")
def segmented(tmp_path_factory) -> list[Sample]:
    """Procedural scenes (256 px, as the benchmark) and the demo's first photos, after segment."""
    tmp = tmp_path_factory.mktemp("edit")
    inputs = [{"kind": "manifest", "path": "pkg:counterfactory/demo/photos.jsonl"},
              {"kind": "procedural", "count": 40, "seed": 1, "size": [256, 256], "questions_per_scene": 1}]
    cfg = make_config(tmp, inputs)
    records = load_records(cfg)
    records = records[:6] + [r for r in records if r["uri"].startswith("procedural")]
    out = [s for b in local_batches(cfg, records, stop_after="segment") for s in decode_batch(b)]
    assert all(s.ok for s in out)
    return out


def _hole_scene(w: int = 320, h: int = 240, r: int = 70) -> tuple[np.ndarray, np.ndarray]:
    img = textured(w, h, seed=3)
    mask = np.zeros((h, w), np.uint8)
    cv2.circle(mask, (w // 2, h // 2), r, 255, -1)
    return img, mask


def test_small_hole_is_one_full_resolution_pass_on_the_crop():
    img, mask = _hole_scene(r=20)  # 1.2k pixels, under work_max_area
    out = E.inpaint(img, mask, 5, "telea")
    # the crop is exact: the same bytes as OpenCV on the whole image
    assert np.array_equal(out, cv2.inpaint(img, mask, 5, cv2.INPAINT_TELEA))


def test_large_hole_two_passes_coarse_then_band(monkeypatch):
    img, mask = _hole_scene(r=70)  # ~15k pixels
    calls = []
    real = cv2.inpaint

    def spy(src, m, radius, flag):
        calls.append((src.shape[:2], cv2.countNonZero(m), radius))
        return real(src, m, radius, flag)

    monkeypatch.setattr(E.cv2, "inpaint", spy)
    out = E.inpaint(img, mask, 5, "telea", work_max_area=4096, band_px=6)
    (coarse_shape, coarse_area, coarse_r), (full_shape, band_area, band_r) = calls
    area = cv2.countNonZero(mask)
    assert coarse_shape[0] < full_shape[0] and coarse_area < 0.5 * area and coarse_r == 3
    assert band_r == 5 and 0 < band_area < 0.25 * area  # only the band at full resolution
    assert np.array_equal(out[mask == 0], img[mask == 0])
    assert np.array_equal(out, E.inpaint(img, mask, 5, "telea", work_max_area=4096, band_px=6))


def test_two_pass_fill_quality_matches_one_pass():
    """On a smooth textured background the coarse-to-fine fill is as close to the truth as one
    full-resolution pass, and the band along the edge carries no seam."""
    img, mask = _hole_scene(r=70)
    truth = img.copy()
    painted = img.copy()
    painted[mask > 0] = (230, 20, 20)
    one = E.inpaint(painted, mask, 5, "telea", work_max_side=10**6, work_max_area=10**9)
    two = E.inpaint(painted, mask, 5, "telea", work_max_area=4096)
    sel = mask > 0
    err = {k: np.abs(v[sel].astype(int) - truth[sel]).mean() for k, v in (("one", one), ("two", two))}
    assert err["two"] <= 1.2 * err["one"] + 1.0, err
    edge = sel & (cv2.erode(mask, np.ones((7, 7), np.uint8)) == 0)
    edge_diff = np.abs(two[edge].astype(int) - one[edge]).mean()
    assert edge_diff < 3.0, edge_diff
    red = (np.abs(two[sel].astype(int) - (230, 20, 20)).max(axis=1) < 40).mean()
    assert red == 0.0  # nothing of the object is left


def test_params_are_validated_and_recorded():
    st = E.ClassicalEdit({"work_max_area": 4096, "inpaint_band_px": 4})
    assert st.describe()["params"]["work_max_area"] == 4096
    assert st.describe()["params"]["inpaint_band_px"] == 4
    for bad in ({"work_max_area": 10}, {"inpaint_band_px": 0}, {"inpaint_band_px": 100}, {"work_max_side": 8}):
        with pytest.raises(ValidationError):
            E.ClassicalEdit(bad)


def _run(st: E.ClassicalEdit, s0: Sample) -> Sample:
    s = copy.deepcopy(s0)
    st.process(s)
    return s


def test_edits_are_deterministic(segmented):
    st = E.ClassicalEdit({"variants": ALL})
    for s0 in segmented:
        a, b = _run(st, s0), _run(E.ClassicalEdit({"variants": ALL}), s0)
        assert a.meta["variants"] == b.meta["variants"] and a.meta["edits"] == b.meta["edits"]
        for k, v in a.arrays.items():
            assert np.array_equal(v, b.arrays[k]), k


def test_one_evidence_fill_serves_remove_count_and_swap(segmented, monkeypatch):
    calls = []
    real = E.patch_fill  # the default fill
    monkeypatch.setattr(E, "patch_fill", lambda img, hole, *a, **k: calls.append(hole) or real(img, hole, *a, **k))
    seen = set()
    for s0 in segmented:
        calls.clear()
        s = _run(E.ClassicalEdit({"variants": ["remove", "count", "swap"]}), s0)
        mask = s.arrays["mask"] > 0
        assert np.array_equal(calls[0], s.arrays["mask"])  # the evidence, filled first
        img, removed = s.arrays["image"], s.arrays["variant/remove"]
        if "count" in s.meta["variants"]:
            seen.add("count")
            region = s.arrays["mask/count"] > 0
            out = s.arrays["variant/count"]
            assert region.any() and not (region & ~mask).any()
            assert np.array_equal(out[region], removed[region])
            assert np.array_equal(out[~region], img[~region])
        if "swap" in s.meta["variants"]:
            seen.add("swap")
            # the second inpaint covers only b's hole: none of the evidence mask again
            assert len(calls) <= 2 and all(not (c[mask] > 0).any() for c in calls[1:])
            out, region = s.arrays["variant/swap"], s.arrays["mask/swap"] > 0
            assert np.array_equal(out[~region], img[~region])
        assert len(calls) <= 2
    assert seen == {"count", "swap"}


def test_count_without_remove_gives_the_same_pixels(segmented):
    """The shared fill does not depend on which other variants run."""
    both = E.ClassicalEdit({"variants": ["remove", "count"]})
    alone = E.ClassicalEdit({"variants": ["count"]})
    n = 0
    for s0 in segmented:
        a, b = _run(both, s0), _run(alone, s0)
        if "count" in a.meta["variants"]:
            n += 1
            assert np.array_equal(a.arrays["variant/count"], b.arrays["variant/count"])
    assert n


def test_evidence_fill_is_reused_across_samples_with_the_same_evidence(segmented, monkeypatch):
    """Questions about the same evidence in one image share the fill; the bytes are those of a
    fresh computation, and the cache stays within its byte budget."""
    calls = []
    real = E.patch_fill  # the default fill
    monkeypatch.setattr(E, "patch_fill", lambda img, hole, *a, **k: calls.append(hole) or real(img, hole, *a, **k))
    photo, scene = segmented[0], segmented[-1]
    st = E.ClassicalEdit({"variants": ["remove"]})
    first = _run(st, photo).arrays["variant/remove"]
    _run(st, scene)
    again = _run(st, photo).arrays["variant/remove"]
    assert len(calls) == 2 and np.array_equal(first, again)
    other = copy.deepcopy(photo)
    other.arrays["image"] = other.arrays["image"].copy()
    other.arrays["image"][0, 0] ^= 1  # one pixel differs: a miss
    _run(st, other)
    assert len(calls) == 3
    assert len(st._fills) == 3
    monkeypatch.setattr(E, "_FILL_CACHE_BYTES", 1)
    other.arrays["image"][0, 0] ^= 2  # another miss: the older fills go, the newest stays
    _run(st, other)
    assert len(calls) == 4 and len(st._fills) == 1


def _place_shape_full(sample, shape, r, rng, tries):
    """The reference: every try rasterized and dilated on the whole image."""
    h, w = sample.arrays["mask"].shape
    keepout = sample.arrays["mask"] > 0
    for a in sample.meta.get("annotated", []):
        x0, y0, x1, y1 = a["box"]
        keepout[y0:y1, x0:x1] = True
    m = int(r) + 4
    for _ in range(tries):
        cx, cy = rng.uniform(m, w - m), rng.uniform(m, h - m)
        poly = scenes.shape_polygon(shape, cx, cy, r, float(rng.uniform(0, np.pi)))
        obj = scenes.polygon_mask(poly, w, h)
        region = cv2.dilate(obj.astype(np.uint8) * 255, shared.CLONE_MARGIN)
        if not (keepout & (region > 0)).any():
            return poly, obj, region
    raise shared.Skip("no_room_for_insert", "")


def test_windowed_placement_equals_whole_image_placement(segmented):
    n = 0
    for s in segmented:
        h, w = s.arrays["mask"].shape
        for shape in scenes.SHAPES:
            for seed in range(3):
                r = max(6.0, 0.12 * min(h, w)) * (1 + seed)
                got = want = None
                try:
                    got = shared.place_shape(s, shape, r, np.random.default_rng(seed), 16)
                except shared.Skip:
                    pass
                try:
                    want = _place_shape_full(s, shape, r, np.random.default_rng(seed), 16)
                except shared.Skip:
                    pass
                assert (got is None) == (want is None)
                if got is not None:
                    n += 1
                    assert got[0] == want[0]
                    assert np.array_equal(got[1], want[1]) and np.array_equal(got[2], want[2])
    assert n > 50


def test_placement_refuses_crowded_tries_without_their_polygon(monkeypatch):
    """Tries whose center square meets the keepout are refused before their polygon is made
    (issue 27, s28fill), and the placement stays the whole-image reference's, draw for draw, on
    crowded images (many boxes, tries refused either way) for every shape and odd radii."""
    made = []
    real = scenes.shape_polygon
    for shape in scenes.SHAPES if hasattr(shared, "_inradius") else ():
        shared._inradius(shape)  # each shape's own polygon, once per process: not a try
    monkeypatch.setattr(scenes, "shape_polygon", lambda *a: made.append(1) or real(*a))
    n_fit = n_tries = 0
    for seed in range(40):
        rng = np.random.default_rng(seed)
        h, w = int(rng.integers(120, 260)), int(rng.integers(120, 260))
        mask = np.zeros((h, w), np.uint8)
        cv2.circle(mask, (int(rng.integers(w)), int(rng.integers(h))), int(rng.integers(5, 40)), 255, -1)
        boxes = []
        for _ in range(int(rng.integers(0, 9))):
            x0, y0 = int(rng.integers(0, w - 10)), int(rng.integers(0, h - 10))
            boxes.append({"box": [x0, y0, x0 + int(rng.integers(3, 60)), y0 + int(rng.integers(3, 60))]})
        s = Sample(0, "k", "ok", {"annotated": boxes}, {"mask": mask})
        for shape in scenes.SHAPES:
            r = float(rng.uniform(6, 0.2 * min(h, w)))
            got = want = None
            made.clear()
            try:
                got = shared.place_shape(s, shape, r, np.random.default_rng(seed), 12)
            except shared.Skip:
                pass
            n_made = len(made)
            made.clear()
            try:
                want = _place_shape_full(s, shape, r, np.random.default_rng(seed), 12)
            except shared.Skip:
                pass
            n_tries += len(made)  # the reference makes one polygon per try
            assert n_made <= len(made)
            n_fit += n_made < len(made)
            assert (got is None) == (want is None)
            if got is not None:
                assert got[0] == want[0]
                assert np.array_equal(got[1], want[1]) and np.array_equal(got[2], want[2])
    assert n_fit > 50 and n_tries > 500  # the shortcut is taken, on many tries


def test_insert_blend_by_planes_is_numpys_broadcast():
    """The insert's feathered blend with alpha as three planes and OpenCV's saturating
    conversion (issue 27, s28fill) gives the bytes of numpy's broadcast, rint and clip, for
    flat and shaded, grained paints (halves and out-of-range values included)."""
    rng = np.random.default_rng(0)
    for _ in range(20):
        h, w = int(rng.integers(5, 60)), int(rng.integers(5, 60))
        alpha = cv2.GaussianBlur((rng.random((h, w)) > 0.5).astype(np.float32), (0, 0), 0.8)
        alpha[rng.random((h, w)) < 0.2] = 0.0
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        paint = (rng.normal(128, 90, (h, w, 3)).astype(np.float32) if rng.random() < 0.5
                 else np.broadcast_to(np.array([220.5, 40, 255.5], np.float32), (h, w, 3)))
        paint = np.where(rng.random((h, w, 3)) < 0.1, np.round(paint) + 0.5, paint).astype(np.float32)
        a = alpha[..., None]
        want = np.clip(np.rint(a * paint + (1 - a) * img.astype(np.float32)), 0, 255).astype(np.uint8)
        a3 = cv2.merge([alpha] * 3)
        got = cv2.add(a3 * paint + (1 - a3) * img.astype(np.float32), 0, dtype=cv2.CV_8U)
        assert np.array_equal(got, want)


def test_paste_writes_through_views_and_falls_back():
    rng = np.random.default_rng(0)
    src = rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)
    mask = (rng.random((20, 30)) > 0.5).astype(np.uint8) * 255
    for view in (lambda a: a, lambda a: a[2:18, 5:25], lambda a: a[:, ::-1], lambda a: a[::2]):
        dst = np.zeros((20, 30, 3), np.uint8)
        want = dst.copy()
        d, s_, m = view(dst), view(src), view(mask)
        sel = m > 0
        view(want)[sel] = s_[sel]
        E._paste(d, s_, m)
        assert np.array_equal(dst, want)
