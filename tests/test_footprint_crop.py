"""Issue 27: the footprint figures are computed on the crop around the edited region, and the
channel spread / achromatic test without numpy's slow reductions. Each is pinned here to the
whole-image reference it replaced (the same numbers, on random masks, including masks at and
across the image border), so the speed-up cannot move a verify decision or a benchmark figure."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from counterfactory import footprint as fp


def _image(rng: np.random.Generator, h: int, w: int, gray: bool = False) -> np.ndarray:
    base = cv2.GaussianBlur(rng.uniform(0, 255, (h, w, 3)).astype(np.float32), (0, 0), 3)
    img = np.clip(base + rng.normal(0, 9, (h, w, 3)), 0, 255).astype(np.uint8)
    if gray:
        img[...] = img[..., :1]
    return img


def _blob(rng: np.random.Generator, h: int, w: int, where: str) -> np.ndarray:
    """A random ellipse (uint8 0/255) inside, touching or cut by the image border."""
    m = np.zeros((h, w), np.uint8)
    ax = (int(rng.integers(4, w // 4)), int(rng.integers(4, h // 4)))
    if where == "inside":
        c = (int(rng.integers(w // 3, 2 * w // 3)), int(rng.integers(h // 3, 2 * h // 3)))
    else:  # centre on or near a random border or corner
        c = (int(rng.choice([0, rng.integers(0, w), w - 1])), int(rng.choice([0, h - 1, rng.integers(0, h)])))
    cv2.ellipse(m, c, ax, float(rng.uniform(0, 180)), 0, 360, 255, -1)
    return m


def _whole_image_footprint(out, region, core, ring_px):
    """footprint_metrics as it was before issue 27: every figure on the whole image."""
    hp = fp.highpass(out)
    found, share_in, share_ring = fp.flat_patch(out, region, ring_px, hp=hp)
    m = {"texture_ratio": fp.texture_ratio(out, region, ring_px, hp=hp), "flat_patch": found,
         "flat_share": share_in, "flat_share_ring": share_ring,
         "color_distance": fp.color_distance(out, region, ring_px)}
    if core is not None:
        m["boundary_score"] = fp.boundary_score(out, core, region, ring_px)
    m["seam_score"] = fp.boundary_score(out, region, region, ring_px)
    return m


def _whole_image_insert(orig, out, obj, region, core, ring_px):
    inner = fp.interior(obj)
    if not cv2.countNonZero(inner):
        inner = fp._u8(obj)
    around = fp.ring(fp._u8(region), ring_px)
    hp = fp.highpass(out)
    found, share_in, share_ring = fp.flat_patch(out, inner, hp=hp, around=around)
    ref, ref_flat = fp.object_texture(orig, core, ring_px)
    spread = np.max(out, axis=2).astype(np.int16) - np.min(out, axis=2)
    spread_orig = np.max(orig, axis=2).astype(np.int16) - np.min(orig, axis=2)
    return {"insert_texture_ratio": fp.texture_ratio(out, inner, hp=hp, around=around),
            "insert_flat_patch": found, "insert_flat_share": share_in, "insert_flat_share_ring": share_ring,
            "object_texture_ratio": ref, "object_flat_patch": ref_flat,
            "achromatic": bool(np.percentile(spread_orig, 99.5) <= fp.ACHROMATIC_SPREAD),
            "insert_chroma": round(float(cv2.mean(spread.astype(np.uint8), mask=inner)[0]), 3)}


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("where", ["inside", "border"])
def test_footprint_metrics_on_the_crop_equal_the_whole_image(seed, where):
    rng = np.random.default_rng(seed)
    h, w = (int(rng.integers(60, 200)), int(rng.integers(60, 200)))
    orig = _image(rng, h, w)
    region = _blob(rng, h, w, where)
    core = cv2.erode(region, np.ones((7, 7), np.uint8))
    out = orig.copy()
    # a fill of some sort: a smear inside the region, so every figure has something to read
    smear = cv2.GaussianBlur(orig, (0, 0), 4)
    out[region > 0] = smear[region > 0]
    ring_px = int(rng.choice([4, 8, 12]))
    got = fp.footprint_metrics(orig, out, region, core, ring_px)
    assert got == _whole_image_footprint(out, region, core, ring_px)


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("where", ["inside", "border"])
def test_insert_metrics_on_the_crop_equal_the_whole_image(seed, where):
    rng = np.random.default_rng(100 + seed)
    h, w = (int(rng.integers(60, 200)), int(rng.integers(60, 200)))
    orig = _image(rng, h, w, gray=bool(seed % 3 == 0))
    obj = _blob(rng, h, w, where)
    region = cv2.dilate(obj, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (13, 13)))
    core = _blob(rng, h, w, "inside")
    out = orig.copy()
    out[obj > 0] = rng.integers(0, 255, 3, dtype=np.uint8)
    got = fp.insert_metrics(orig, out, obj > 0, region, core, 8)
    assert got == _whole_image_insert(orig, out, obj > 0, region, core, 8)


@pytest.mark.parametrize("seed", range(20))
def test_spread_and_achromatic_equal_numpy(seed):
    rng = np.random.default_rng(seed)
    h, w = int(rng.integers(1, 90)), int(rng.integers(1, 90))
    img = _image(rng, max(h, 2), max(w, 2), gray=True)
    # a few colored pixels: around the 0.5 % that decides achromatic
    n = img.shape[0] * img.shape[1]
    k = int(rng.integers(0, max(2, n // 100)))
    ys, xs = rng.integers(0, img.shape[0], k), rng.integers(0, img.shape[1], k)
    img[ys, xs, 0] = np.clip(img[ys, xs, 0].astype(int) + rng.integers(0, 40, k), 0, 255)
    ref = np.max(img, axis=2).astype(np.int16) - np.min(img, axis=2)
    assert np.array_equal(fp.spread(img), ref.astype(np.uint8))
    for tol in (0, 5, 12, 20):
        assert fp.achromatic(img, tol) == bool(np.percentile(ref, 99.5) <= tol), tol
    view = img[:, ::-1]  # a mirrored view (negative strides) reads the same
    assert np.array_equal(fp.spread(view), ref[:, ::-1].astype(np.uint8))
