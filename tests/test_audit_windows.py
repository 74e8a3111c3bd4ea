"""Issue 27: the audit's window statistics of a variant are computed only where it differs from
its original. A window whose pixels (plus the filters' reach) are the original's gets the
original's row; the others are computed on a crop around them and equal the whole-image
computation; a global edit (a flip) falls back to the whole image. The colour spreads are
computed centred, so a window's spread is the same on a crop and on the whole image."""

from __future__ import annotations

import io

import cv2
import numpy as np
import pytest
from PIL import Image

from counterfactory import audit_features as af
from counterfactory import scenes
from counterfactory.stages.shared import one_blas_thread


def _jpeg(img: np.ndarray, quality: int = 90) -> bytes:
    ok, buf = cv2.imencode(".jpg", img[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return buf.tobytes()


def _png(mask: np.ndarray) -> bytes:
    return cv2.imencode(".png", mask)[1].tobytes()


def _scene(i: int, size=(256, 256)) -> np.ndarray:
    return scenes.render_scene(scenes.scene_spec(5, i, size))


def _patched(img: np.ndarray, y: int, x: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    cf = img.copy()
    cf[y:y + n, x:x + n] = (30, 200, 40)
    mask = np.zeros(img.shape[:2], np.uint8)
    mask[y:y + n, x:x + n] = 255
    return cf, mask


@pytest.mark.parametrize("size", [(256, 256), (250, 311), (96, 140)])
def test_a_local_edit_keeps_the_original_rows_outside_it_and_the_whole_image_numbers_inside(size):
    img = _scene(1, size)
    h, w = img.shape[:2]
    cf, _ = _patched(img, h // 3, w // 4, min(h, w) // 6)
    orig_b, cf_b = af._decode(_jpeg(img)), af._decode(_jpeg(cf))
    with one_blas_thread():
        orig_rows = af._window_rows(orig_b, 8)
        got = af._variant_rows(orig_b, cf_b, orig_rows, 8)
        whole = af._window_rows(cf_b, 8)
    changed = af._changed_windows(orig_b, cf_b, 8).reshape(-1)
    assert 0 < changed.sum() < 32  # JPEG spreads a change over its blocks, not over the image
    # a window the edit left alone (pixels and the filters' reach): the original's row, bit for bit
    assert np.array_equal(got[~changed], orig_rows[~changed])
    # ... which is what the whole image gives there, and the changed windows are the whole image's
    # (to float32 rounding: a crop's products sum in another order; a spread is a difference of
    # two float32 means, exact only where the cells' weights are powers of two)
    np.testing.assert_allclose(np.delete(got, [3, 4, 5], axis=1), np.delete(whole, [3, 4, 5], axis=1),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got[:, 3:6], whole[:, 3:6], atol=2e-3)
    if size == (256, 256):
        assert np.array_equal(got[:, 3:6], whole[:, 3:6])
    assert not np.array_equal(got[changed], orig_rows[changed])


def test_changed_windows_are_found_from_the_pixels_with_the_filters_reach():
    img = _scene(2)
    cf = img.copy()
    cf[100, 48] ^= 1  # one pixel, one bit: inside window (3, 1) of a 32-pixel grid, far from its sides
    ch = af._changed_windows(img, cf, 8)
    assert ch.sum() == 1 and ch[3, 1]
    cf = img.copy()
    cf[100, 64 + 3] += 1  # 3 pixels right of the border of window (3, 1): within the blur's reach
    ch = af._changed_windows(img, cf, 8)
    assert ch[3, 2] and ch[3, 1] and ch.sum() == 2
    cf = img.copy()
    cf[100, 64 + af._REACH] += 1  # out of window (3, 1)'s reach
    assert af._changed_windows(img, cf, 8).sum() == 1
    assert not af._changed_windows(img, img.copy(), 8).any()


def test_a_flip_is_computed_on_the_whole_image():
    img = _scene(3)
    orig_b, cf_b = af._decode(_jpeg(img)), af._decode(_jpeg(np.ascontiguousarray(img[:, ::-1])))
    with one_blas_thread():
        orig_rows = af._window_rows(orig_b, 8)
        got = af._variant_rows(orig_b, cf_b, orig_rows, 8)
        whole = af._window_rows(cf_b, 8)
    assert af._changed_windows(orig_b, cf_b, 8).all()
    assert np.array_equal(got, whole)


def test_the_bgr_path_equals_the_rgb_window_features_and_the_decoders_agree():
    img = _scene(4, (120, 200))
    data = _jpeg(img)
    bgr = af._decode(data)
    with Image.open(io.BytesIO(data)) as im:
        rgb = np.asarray(im.convert("RGB"))
    assert np.array_equal(bgr[..., ::-1], rgb)  # OpenCV's decode: Pillow's pixels
    with one_blas_thread():
        assert np.array_equal(af._window_rows(bgr, 8).astype(np.float64), af.window_features(rgb, 8))
    mask = (np.arange(120 * 200).reshape(120, 200) % 7 == 0).astype(np.uint8) * 255
    assert np.array_equal(af._decode(_png(mask), gray=True), mask)


def test_the_colour_spread_is_accurate_on_a_flat_window():
    """Centred: a window of one colour with a few pixels off has the spread float64 gives (the
    uncentred E[x^2] - E[x]^2 in float32 lost up to 0.03 there)."""
    rng = np.random.default_rng(0)
    img = np.full((256, 256, 3), (200, 190, 180), np.uint8)
    img[rng.integers(0, 256, 300), rng.integers(0, 256, 300)] = (205, 185, 181)
    lab = cv2.cvtColor(img, cv2.COLOR_RGB2LAB).astype(np.float64)
    ref = lab.reshape(8, 32, 8, 32, 3).std(axis=(1, 3)).reshape(64, 3)
    got = af.window_features(img, 8)[:, 3:6]
    assert np.abs(got - ref).max() < 2e-3


def test_sample_record_of_a_local_edit_copies_the_unchanged_windows_and_shares_the_mask():
    img = _scene(6)
    cf, mask = _patched(img, 40, 150, 50)
    doc = {"variants": ["remove", "blackout"], "qa": [],
           "edits": {"remove": {"region": "evidence"}, "blackout": {"region": "evidence"}}}
    parts = {"orig.jpg": _jpeg(img), "remove.jpg": _jpeg(cf), "blackout.jpg": _jpeg(cf), "mask.png": _png(mask)}
    rec = af.sample_record("k", doc, parts, 8, "unknown")
    assert rec["images"] == 3 and [p["v"] for p in rec["pairs"]] == ["remove", "blackout"]
    cover = rec["pairs"][0]["cover"]
    with one_blas_thread():
        assert np.array_equal(cover, af._cells((mask > 0).astype(np.float32), 8).reshape(-1))
    assert rec["pairs"][1]["cover"] is cover  # one decode of the evidence mask for both
    same = np.all(rec["pairs"][0]["cf_win"] == rec["orig_win"], axis=1)
    assert 40 <= same.sum() < 64 and not same[cover > 0].any()
    assert np.array_equal(rec["pairs"][0]["cf_win"], rec["pairs"][1]["cf_win"])


@pytest.mark.parametrize("size", [(256, 256), (250, 311)])
def test_a_window_outside_the_reach_of_a_change_has_the_same_whole_image_statistics(size):
    """The reach is the filters' (the blur's 9 taps): a pixel changed anywhere leaves every window
    not marked changed with the same statistics, computed on the whole of both images."""
    rng = np.random.default_rng(size[1])
    img = _scene(7, size)
    h, w = img.shape[:2]
    with one_blas_thread():
        base = af._window_rows(img, 8, bgr=False)
        for y, x in [*(tuple(int(v) for v in rng.integers(0, (h, w))) for _ in range(6)), (0, 0),
                     (h - 1, w - 1), (h // 2, 0)]:
            cf = img.copy()
            cf[y, x] = 255 - cf[y, x]
            keep = ~af._changed_windows(img, cf, 8).reshape(-1)
            rows = af._window_rows(cf, 8, bgr=False)
            assert 0 < (~keep).sum() <= 4
            assert np.array_equal(rows[keep], base[keep]) and not np.array_equal(rows, base)


def _changed_by_definition(orig: np.ndarray, cf: np.ndarray, grid: int) -> np.ndarray:
    """A window changed = a pixel of its cell plus the filters' reach differs (window by window)."""
    hh, ww = orig.shape[:2]
    ylo, yhi, _, _ = af._axis_plan(hh, grid)
    xlo, xhi, _, _ = af._axis_plan(ww, grid)
    diff = np.any(orig != cf, axis=2)
    return np.array([[diff[max(0, ylo[r] - af._REACH):yhi[r] + af._REACH,
                           max(0, xlo[c] - af._REACH):xhi[c] + af._REACH].any() for c in range(grid)]
                     for r in range(grid)])


@pytest.mark.parametrize("side", [2900, 2910])  # 255 * side^2 under 2^31 (int32 sums), and past it
def test_changed_windows_stay_exact_where_the_difference_sums_near_the_integer_limit(side):
    # every pixel saturated but one window's area and the reach around it: the integral's sums
    # come within 1 % of 2^31 (int32) or pass it (float64), and the windows must still be exact
    orig = np.zeros((side, side, 3), np.uint8)
    cf = np.full_like(orig, 255)
    lo, hi, _, _ = af._axis_plan(side, 8)
    cf[lo[5] - af._REACH:hi[6] + af._REACH, lo[2] - af._REACH:hi[3] + af._REACH] = 0
    cf[(lo[6] + hi[6]) // 2, (lo[3] + hi[3]) // 2] = 7  # one pixel of window (6, 3) differs again
    got = af._changed_windows(orig, cf, 8)
    assert np.array_equal(got, _changed_by_definition(orig, cf, 8))
    assert not got[5, 2] and got[6, 3] and got.sum() == 64 - 3


@pytest.mark.parametrize("n", [256, 250, 311, 96, 140])
def test_a_crop_plan_is_the_whole_axis_weights_cut_to_its_cells(n):
    w = af._area_weights(n, 8)
    lo, hi, edge, share = af._axis_plan(n, 8)
    for c0, c1 in [(0, 8), (0, 1), (3, 5), (7, 8), (2, 7)]:
        p0, p1, wc, both, sh = af._crop_plan(n, 8, c0, c1)
        assert (p0, p1) == (max(0, int(lo[c0]) - af._REACH), min(n, int(hi[c1 - 1]) + af._REACH))
        assert np.array_equal(wc, w[c0:c1, p0:p1])
        e = edge[p0:p1]
        assert np.array_equal(both, np.concatenate([wc * e, wc * (1 - e)])) and np.array_equal(sh, share[c0:c1])
        assert af._crop_plan(n, 8, c0, c1)[3] is both  # made once per size and cell range

