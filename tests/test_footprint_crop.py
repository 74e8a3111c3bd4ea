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


def _old_u8(mask):
    return (mask > 0).astype(np.uint8) * 255


def _old_flat_patch(out, region, ring_px=8, hp=None, around=None):
    """flat_patch as it was before issue 27 (np.median, boolean means), on the whole image."""
    region = _old_u8(region)
    rng_m = fp.ring(region, ring_px) if around is None else _old_u8(around)
    if not cv2.countNonZero(region) or not cv2.countNonZero(rng_m):
        return False, 0.0, 0.0
    hp = fp.highpass(out) if hp is None else hp
    local = cv2.boxFilter(hp, -1, (fp.FLAT_WINDOW, fp.FLAT_WINDOW))
    ref = float(np.median(local[rng_m > 0]))
    if ref < fp._MIN_RING_ENERGY:
        return False, 0.0, 1.0
    flat = local < fp.FLAT_FRACTION * ref
    share_in = float(flat[region > 0].mean())
    share_ring = float(flat[rng_m > 0].mean())
    return bool(share_in > 0.5 and share_ring < 0.5), round(share_in, 4), round(share_ring, 4)


def _old_boundary_score(out, core, region, ring_px=8):
    """boundary_score as it was before issue 27: the outline normal on the whole image."""
    core, region = _old_u8(core), _old_u8(region)
    contour = cv2.morphologyEx(core, cv2.MORPH_GRADIENT, np.ones((3, 3), np.uint8))
    contour[region == 0] = 0
    contour[:2], contour[-2:], contour[:, :2], contour[:, -2:] = 0, 0, 0, 0
    rng_m = fp.ring(region, ring_px)
    if not cv2.countNonZero(contour) or not cv2.countNonZero(rng_m):
        return 0.0
    gx, gy = fp._gradients(out)
    cm = cv2.GaussianBlur(core.astype(np.float32) / 255, (0, 0), 2.0)
    nx, ny = cv2.Sobel(cm, cv2.CV_32F, 1, 0, ksize=3), cv2.Sobel(cm, cv2.CV_32F, 0, 1, ksize=3)
    norm = cv2.magnitude(nx, ny) + 1e-6
    across = cv2.absdiff(gx * nx / norm + gy * ny / norm, 0.0)
    base = cv2.mean(cv2.magnitude(gx, gy), mask=rng_m)[0] * fp._ISOTROPIC
    val = cv2.mean(across, mask=contour)[0]
    return round(float(val / max(base, 1.0)), 4)


def _whole_image_footprint(out, region, core, ring_px):
    """footprint_metrics as it was before issue 27: every figure on the whole image."""
    hp = fp.highpass(out)
    found, share_in, share_ring = _old_flat_patch(out, region, ring_px, hp=hp)
    m = {"texture_ratio": fp.texture_ratio(out, region, ring_px, hp=hp), "flat_patch": found,
         "flat_share": share_in, "flat_share_ring": share_ring,
         "color_distance": fp.color_distance(out, region, ring_px)}
    if core is not None:
        m["boundary_score"] = _old_boundary_score(out, core, region, ring_px)
    m["seam_score"] = _old_boundary_score(out, region, region, ring_px)
    return m


def _whole_image_insert(orig, out, obj, region, core, ring_px):
    inner = fp.interior(obj)
    if not cv2.countNonZero(inner):
        inner = fp._u8(obj)
    around = fp.ring(fp._u8(region), ring_px)
    hp = fp.highpass(out)
    found, share_in, share_ring = _old_flat_patch(out, inner, hp=hp, around=around)
    ref, ref_flat = _old_object_texture(orig, core, ring_px)
    spread = np.max(out, axis=2).astype(np.int16) - np.min(out, axis=2)
    spread_orig = np.max(orig, axis=2).astype(np.int16) - np.min(orig, axis=2)
    return {"insert_texture_ratio": fp.texture_ratio(out, inner, hp=hp, around=around),
            "insert_flat_patch": found, "insert_flat_share": share_in, "insert_flat_share_ring": share_ring,
            "object_texture_ratio": ref, "object_flat_patch": ref_flat,
            "achromatic": bool(np.percentile(spread_orig, 99.5) <= fp.ACHROMATIC_SPREAD),
            "insert_chroma": round(float(cv2.mean(spread.astype(np.uint8), mask=inner)[0]), 3),
            "insert_seam_score": _old_boundary_score(out, region, region, ring_px)}


def _old_object_texture(img, core, ring_px=8):
    """object_texture on the whole image (its interior and ring too), as before issue 27."""
    if core is None:
        return None, False
    core = _old_u8(core)
    inner = fp.interior(core)
    if not cv2.countNonZero(inner):
        return None, False
    around = fp.ring(core, ring_px)
    hp = fp.highpass(img)
    return fp.texture_ratio(img, inner, hp=hp, around=around), _old_flat_patch(img, inner, hp=hp, around=around)[0]


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
    got = fp.insert_metrics(orig, out, obj > 0, region, core, 8, seam=True)
    assert got == _whole_image_insert(orig, out, obj > 0, region, core, 8)


@pytest.mark.parametrize("seed", range(40))
def test_median_and_u8_equal_numpy(seed):
    """Issue 27: the flat detector's median without np.median's wrapper, and the one-compare
    0/255 mask, give numpy's numbers (odd and even counts, ties)."""
    rng = np.random.default_rng(seed)
    v = rng.gamma(2.0, 3.0, int(rng.integers(1, 3000))).astype(np.float32)
    if seed % 2:
        v = np.round(v, 1).astype(np.float32)  # many ties
    assert fp._median(v) == float(np.median(v))
    m = rng.integers(0, 3, (int(rng.integers(1, 40)), int(rng.integers(1, 40)))).astype(np.uint8) * 7
    for mask in (m, m > 0, m[:, ::2], (m > 0)[::-1], m.astype(np.float32)):
        got = fp._u8(mask)
        assert got.dtype == np.uint8 and np.array_equal(got, _old_u8(mask))


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


@pytest.mark.parametrize("seed", range(40))
def test_boundary_score_on_the_contour_box_equals_the_whole_image(seed):
    """Issue 27 (s28verify): the normal's products on the contour's own box, in place, and the
    masks handed over as they are (``_boundary``): the whole-image number, for an outline inside,
    at or across the border, a core with holes, and a core that leaves the region."""
    rng = np.random.default_rng(500 + seed)
    h, w = (int(rng.integers(40, 180)), int(rng.integers(40, 180)))
    out = _image(rng, h, w, gray=bool(seed % 4 == 0))
    region = _blob(rng, h, w, "border" if seed % 3 == 0 else "inside")
    core = cv2.erode(region, np.ones((5, 5), np.uint8))
    if seed % 5 == 1:  # holes in the core
        core[rng.random(core.shape) > 0.97] = 0
    if seed % 5 == 2:  # a core partly outside the region
        core = np.roll(core, int(rng.integers(3, 9)), axis=1)
    ring_px = int(rng.choice([4, 8]))
    assert fp.boundary_score(out, core, region, ring_px) == _old_boundary_score(out, core, region, ring_px)
    assert fp.boundary_score(out, region, region, ring_px) == _old_boundary_score(out, region, region, ring_px)
