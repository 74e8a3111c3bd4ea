"""Edge cases of session 5's CPU-cost changes (issue 27, part s29robust): each test pins a case
where a faster path must give what the plain one gives, at the sizes where it broke."""

from __future__ import annotations

import cv2
import numpy as np

from counterfactory import footprint as F
from counterfactory.stages.shared import control_mask


def test_control_mask_on_a_large_image_mostly_kept_out_places_as_the_plain_path():
    """A 4000 x 3000 evidence over three quarters of the image: the 0/255 keepout's integral
    passes 2^31 (255 * 9 Mpx) and an int32 one wraps; OpenCV's saturating int32 subtract then
    missed free spots, so the uniform draw picked another one. The 0/1 keepout (evidence
    without a uint8 ``avoid``) cannot wrap: both paths must place the same control."""
    h, w = 3000, 4000
    ev = np.zeros((h, w), np.uint8)
    ev[:, : 3 * w // 4] = 255
    avoid = np.zeros((h, w), np.uint8)
    for seed in range(2):
        fast = control_mask(ev, np.random.default_rng(seed), 8, 8, avoid, area=200 * 200)
        plain = control_mask(ev, np.random.default_rng(seed), 8, 8, None, area=200 * 200)
        assert fast is not None and plain is not None
        assert np.array_equal(fast, plain), seed
        assert not (fast & ev).any()


def test_control_mask_as_large_as_the_image_lands_on_the_image():
    """A control whose box is the whole image (nothing kept out, ``area`` = h * w): its box sums
    are one 1 x 1 array, which OpenCV beside a number reads as a scalar (a 4 x 1 answer): the
    draw then picked rows 1..3 of an image-sized box (IndexError). 386b596 placed it at (0, 0)."""
    ev = np.zeros((16, 16), np.uint8)
    placed = 0
    for seed in range(60):
        m = control_mask(ev, np.random.default_rng(seed), 8, 0, np.zeros_like(ev), area=256)
        if m is not None:
            placed += 1
            assert m.shape == ev.shape and cv2.countNonZero(m) >= 240
    assert placed  # the rectangle of aspect ~1 is drawn in some of these seeds


def _one_pixel_contour_case():
    g = np.random.default_rng(1)
    orig = g.integers(0, 255, (16, 16, 3), dtype=np.uint8)
    out = g.integers(0, 255, (16, 16, 3), dtype=np.uint8)
    region = np.full((16, 16), 255, np.uint8)
    region[-1, -1] = 0  # the core's contour, less the 2-pixel border, is one pixel
    return orig, out, region, cv2.erode(region, np.ones((3, 3), np.uint8))


def test_boundary_score_of_a_one_pixel_contour():
    """The contour-box path (s28: the products on the contour's own box) with a 1 x 1 box:
    cv2.absdiff(1 x 1, 0.0) is a 4 x 1 scalar result and cv2.mean's mask check failed. The
    figures are 386b596's (computed on the window there)."""
    orig, out, region, core = _one_pixel_contour_case()
    assert F.boundary_score(out, core, region) == 40.4781
    m = F.footprint_metrics(orig, out, region, core)
    assert (m["boundary_score"], m["seam_score"], m["texture_ratio"]) == (40.4781, 0.0, 6.4985)
    dot = np.zeros((16, 16), np.uint8)
    dot[8, 8] = 255  # a one-pixel region: its seam contour is one pixel too
    assert F.footprint_metrics(orig, out, dot, dot)["seam_score"] == 0.0
    obj = cv2.erode(dot, np.ones((3, 3), np.uint8)) > 0
    assert F.insert_metrics(orig, out, obj, dot, dot, seam=True)["insert_seam_score"] == 0.0


def test_inpaint_of_a_one_row_image_is_deterministic():
    """OpenCV's Telea reads past a one-row image: its output changed from call to call (12 of
    200 random 1 x N cases here). ``shared.cv_inpaint`` inpaints such an image with a replicated
    row on each side; every other size is ``cv2.inpaint`` itself, byte for byte."""
    from counterfactory.stages.shared import cv_inpaint

    rng = np.random.default_rng(1)
    for _ in range(120):
        n = int(rng.integers(2, 80))
        img = rng.integers(0, 255, (1, n, 3), dtype=np.uint8)
        mask = np.zeros((1, n), np.uint8)
        a = int(rng.integers(0, n))
        mask[0, a:int(rng.integers(a, n)) + 1] = 255
        r = int(rng.integers(1, 8))
        outs = set()
        for _ in range(12):
            churn = [np.full(int(rng.integers(1, 5000)), 77, np.uint8) for _ in range(3)]  # other heap contents
            out = cv_inpaint(img, mask, r)
            assert out.shape == img.shape and np.array_equal(out[:, mask[0] == 0], img[:, mask[0] == 0])
            outs.add(out.tobytes())
            del churn
        assert len(outs) == 1
    for shape in [(2, 40), (40, 1), (33, 47)]:
        img = rng.integers(0, 255, (*shape, 3), dtype=np.uint8)
        mask = np.zeros(shape, np.uint8)
        mask[shape[0] // 3: shape[0] // 2 + 1, shape[1] // 3: shape[1] // 2 + 1] = 255
        assert np.array_equal(cv_inpaint(img, mask, 3), cv2.inpaint(img, mask, 3, cv2.INPAINT_TELEA))
