"""Footprint metrics: does an edited region look like what surrounds it?

One small module shared by the verify stage (which rejects a fill a person would see) and
``bench/validity.py`` (which reports the same figures per variant), so the check and the
benchmark cannot drift apart. All figures are on the gray image, 0-255 scale, and are pure
functions of their inputs (OpenCV, single-threaded by the callers).

- ``texture_ratio``: high-frequency energy inside the region over that of the ring around it.
  A real background gives ~1; a Telea/Navier-Stokes smear gives ~0.2.
- ``flat_patch``: a plain flat-texture detector: pixels whose local energy (9x9 window) is under
  ``FLAT_FRACTION`` of the ring's median local energy. It "finds" the footprint when more than
  half of the region is flat while the ring mostly is not (a flat ring, e.g. sky, makes a flat
  fill correct, not a footprint).
- ``color_distance``: Hellinger distance between the color histograms (8 levels per channel)
  of the region and of its ring: 0 when the fill is made of the ring's colors; high when a
  fill copied pieces of something else (a collage keeps texture but not color).
- ``boundary_score``: the gradient across the old object's outline (the core mask's contour,
  along its normal) in the edited image, over what the ring's texture gives in any direction.
  ~1 or less when the outline is gone; well over 1 when a ghost outline is left.
- ``seam_score``: the same measure across the edited region's own edge (where the fill meets
  the original): a fill of another brightness shows its boundary (object-free truth on
  procedural scenes: mean 0.99, max 1.27).
- ``insert_metrics``: an inserted object against the objects really in the image. Its
  ``insert_texture_ratio`` (texture ``INTERIOR_PX`` inside its outline over the ring outside its
  blended region) is read against ``object_texture_ratio`` (the same on the evidence in the
  original): a procedural scene draws its objects flat (< 0.01 on 150 scenes), a photograph
  does not (>= 0.21 on the demo photos), so a flat paste is a footprint only where the real
  objects are not flat. ``insert_chroma`` (mean channel spread) against ``achromatic`` (the
  original has no color at all): a colored object pasted into a grayscale photograph.
"""

from __future__ import annotations

from functools import lru_cache

import cv2
import numpy as np

FLAT_FRACTION = 0.35  # a pixel is flat under this share of the ring's median local energy
FLAT_WINDOW = 9
_MIN_RING_ENERGY = 0.75  # a ring flatter than this (gray levels) has no texture to match
_ISOTROPIC = 2 / np.pi  # mean |cos| of a random direction: |g . n| of isotropic texture
# An object's own texture is measured this far inside its outline: the high-pass filter
# (sigma 1.5) spreads an edge over ~4 px. There a flat procedural object reads < 0.01 of its
# ring's texture (150 scenes, max 0.005) and a photographed one >= 0.21 (the demo photos).
INTERIOR_PX = 4
# a real object under this texture ratio is drawn flat (a procedural scene), not photographed
PHOTO_OBJECT_TEXTURE = 0.1
# channel spread (max - min, 0-255) under which a pixel has no color; an image is achromatic
# when 99.5% of its pixels are (a grayscale photograph, also after JPEG)
ACHROMATIC_SPREAD = 12


def gray(img: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(img, cv2.COLOR_RGB2GRAY).astype(np.float32) if img.ndim == 3 else img.astype(np.float32)


def highpass(img: np.ndarray, g: np.ndarray | None = None) -> np.ndarray:
    """|gray - Gaussian(gray, sigma 1.5)|: the fine texture a smooth fill lacks (``g``:
    ``gray(img)`` when the caller has it)."""
    g = gray(img) if g is None else g
    return cv2.absdiff(g, cv2.GaussianBlur(g, (0, 0), 1.5))


@lru_cache(maxsize=64)
def _disk(px: int) -> np.ndarray:
    k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * px + 1, 2 * px + 1))
    k.flags.writeable = False
    return k


def ring(region: np.ndarray, px: int) -> np.ndarray:
    """The band of ``px`` pixels just outside ``region`` (uint8 0/255; the shape and type of
    ``region``, a uint8 mask).

    Dilated on the crop that holds the region and ``px`` pixels around it (issue 27): a
    dilation reaches no further, and OpenCV's border for a dilation never adds a pixel, so the
    band is the same as on the whole image (pinned by a test) at a fraction of the cost."""
    out = np.zeros_like(region)
    x, y, w, h = cv2.boundingRect(region)
    if not w or not h:
        return out
    H, W = region.shape[:2]
    win = slice(max(0, y - px), min(H, y + h + px)), slice(max(0, x - px), min(W, x + w + px))
    crop = region[win]
    # the region's own pixels cleared with OpenCV (issue 27: ~1,400 calls per 300 inputs)
    out[win] = cv2.bitwise_and(cv2.dilate(crop, _disk(px)), 255, mask=cv2.compare(crop, 0, cv2.CMP_EQ))
    return out


def _u8(mask: np.ndarray) -> np.ndarray:
    """``mask`` as uint8 0/255 (a new array). One OpenCV compare for a uint8 or bool mask
    (issue 27: ~7,000 calls in a 200-input profile, three numpy passes each); numpy otherwise."""
    if (mask.size and mask.dtype in (np.uint8, np.bool_) and mask.ndim == 2 and mask.strides[1] == 1
            and mask.strides[0] >= mask.shape[1]):  # rows OpenCV wraps as they are
        return cv2.compare(mask.view(np.uint8), 0, cv2.CMP_GT)
    return (mask > 0).astype(np.uint8) * 255


def _rect(mask: np.ndarray) -> tuple[int, int, int, int]:
    """``cv2.boundingRect`` of a mask's non-zero pixels: of a uint8 or bool mask as it is (issue
    27: ``_u8``'s compare over a whole image first cost as much as the rectangle)."""
    if (mask.size and mask.dtype in (np.uint8, np.bool_) and mask.ndim == 2 and mask.strides[1] == 1
            and mask.strides[0] >= mask.shape[1]):
        return cv2.boundingRect(mask.view(np.uint8))
    return cv2.boundingRect(_u8(mask))


def _median(v: np.ndarray) -> float:
    """``np.median`` of a 1-D float32 array, the same number (the same order statistics; of an
    even count the mean of the middle two, in float32 as ``np.mean`` takes it) without its
    generic wrapper: ~3x cheaper on a ring's few thousand values."""
    n = v.size
    h = n // 2
    if n % 2:
        return float(np.partition(v, h)[h])
    p = np.partition(v, (h - 1, h))
    return float((p[h - 1] + p[h]) / 2)


def interior(mask: np.ndarray, px: int = INTERIOR_PX) -> np.ndarray:
    """``mask`` eroded by ``px`` (uint8 0/255): where an object's own texture is read."""
    return cv2.erode(_u8(mask), cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * px + 1, 2 * px + 1)))


def spread(img: np.ndarray) -> np.ndarray:
    """Per-pixel channel spread max - min (0-255): 0 on a gray pixel."""
    if img.ndim == 2:
        return np.zeros(img.shape, np.uint8)
    # per-channel OpenCV max/min: numpy's reduction over a 3-long last axis cost ~3 ms on a
    # 256 x 256 image (issue 27: 3,000 such calls in a 120-input profile); the same bytes
    ch = cv2.split(np.ascontiguousarray(img))
    hi, lo = ch[0], ch[0]
    for c in ch[1:]:
        hi, lo = cv2.max(hi, c), cv2.min(lo, c)
    return cv2.subtract(hi, lo)


def achromatic(img: np.ndarray, tol: int = ACHROMATIC_SPREAD) -> bool:
    """No color anywhere: 99.5% of the pixels have a channel spread <= ``tol``.

    Decided by counting the pixels over ``tol`` (the percentile is linear between the two order
    statistics around rank 0.995 (n - 1)): the same answer as ``np.percentile(spread, 99.5) <=
    tol`` without sorting the image; only when ``tol`` falls between those two order statistics
    is the percentile itself computed."""
    sp = spread(img)
    n = sp.size
    if n == 0:
        return True
    over = n - cv2.countNonZero(cv2.compare(sp, tol, cv2.CMP_LE)) if sp.ndim == 2 else int(np.count_nonzero(sp > tol))
    k = int(np.floor(0.995 * (n - 1)))  # order statistics k and k + 1 (0-based) bracket the percentile
    if over <= n - k - 2 or (k == n - 1 and over == 0):  # the (k+1)-th is <= tol: so is the percentile
        return True
    if over >= n - k:  # the k-th is over tol already
        return False
    return float(np.percentile(sp, 99.5)) <= tol


def texture_ratio(out: np.ndarray, region: np.ndarray, ring_px: int = 8, hp: np.ndarray | None = None,
                  around: np.ndarray | None = None) -> float:
    """High-frequency energy inside ``region`` of ``out`` over that of its ring (``around``
    when given); 1.0 when the ring itself has no texture (then a flat fill is the right fill)."""
    region = _u8(region)
    rng_m = ring(region, ring_px) if around is None else _u8(around)
    if not cv2.countNonZero(region) or not cv2.countNonZero(rng_m):
        return 1.0
    return _texture(highpass(out) if hp is None else hp, region, rng_m)


def flat_patch(out: np.ndarray, region: np.ndarray, ring_px: int = 8,
               hp: np.ndarray | None = None, around: np.ndarray | None = None) -> tuple[bool, float, float]:
    """(found, flat share of the region, flat share of the ring) for the flat-texture detector."""
    region = _u8(region)
    rng_m = ring(region, ring_px) if around is None else _u8(around)
    n_in, n_ring = cv2.countNonZero(region), cv2.countNonZero(rng_m)
    if not n_in or not n_ring:
        return False, 0.0, 0.0
    return _flat(highpass(out) if hp is None else hp, region, rng_m, n_in, n_ring)


def _texture(hp: np.ndarray, region: np.ndarray, rng_m: np.ndarray) -> float:
    """``texture_ratio`` of a non-empty uint8 0/255 region and ring on the high-pass ``hp``."""
    inside, around = cv2.mean(hp, mask=region)[0], cv2.mean(hp, mask=rng_m)[0]
    if around < _MIN_RING_ENERGY:
        return 1.0
    return round(float(inside / around), 4)


def _flat(hp: np.ndarray, region: np.ndarray, rng_m: np.ndarray, n_in: int, n_ring: int) -> tuple[bool, float, float]:
    """``flat_patch`` of a non-empty uint8 0/255 region and ring (``n_in``, ``n_ring`` pixels)."""
    local = cv2.boxFilter(hp, -1, (FLAT_WINDOW, FLAT_WINDOW))
    ref = _median(local[rng_m > 0])
    if ref < _MIN_RING_ENERGY:
        return False, 0.0, 1.0
    # the shares as counts (issue 27): a bool mean is the count over the size, the same float
    flat = (local < FLAT_FRACTION * ref).view(np.uint8)
    share_in = cv2.countNonZero(cv2.bitwise_and(flat, region)) / n_in
    share_ring = cv2.countNonZero(cv2.bitwise_and(flat, rng_m)) / n_ring
    return bool(share_in > 0.5 and share_ring < 0.5), round(share_in, 4), round(share_ring, 4)


def _texture_and_flat(hp: np.ndarray, region: np.ndarray, rng_m: np.ndarray) -> tuple[float, tuple[bool, float, float]]:
    """(``texture_ratio``, ``flat_patch``) of a uint8 0/255 region and ring that the caller has
    normalized already: the masks counted once for both (issue 27)."""
    n_in, n_ring = cv2.countNonZero(region), cv2.countNonZero(rng_m)
    if not n_in or not n_ring:
        return 1.0, (False, 0.0, 0.0)
    return _texture(hp, region, rng_m), _flat(hp, region, rng_m, n_in, n_ring)


_SQUARE3 = np.ones((3, 3), np.uint8)
_NORMAL_PX = 9  # how far the outline normal reads: the 17-tap Gaussian (sigma 2) and a 3x3 Sobel


def _gradients(out: np.ndarray, g: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Sobel gradients of ``out``'s smoothed gray image (``g``: ``gray(out)`` when known)."""
    g = cv2.GaussianBlur(gray(out) if g is None else g, (0, 0), 1.0)
    return cv2.Sobel(g, cv2.CV_32F, 1, 0, ksize=3), cv2.Sobel(g, cv2.CV_32F, 0, 1, ksize=3)


def boundary_score(out: np.ndarray, core: np.ndarray, region: np.ndarray, ring_px: int = 8,
                   grads: tuple[np.ndarray, ...] | None = None, around: np.ndarray | None = None) -> float:
    """Mean |gradient . outline normal| on the core mask's contour (inside the edited region,
    off the image border) in ``out``, over the ring's mean gradient magnitude times 2/pi (what
    isotropic texture gives across any line). 0.0 when there is no contour to measure.
    ``grads``: ``_gradients(out)`` (and their magnitude, and the base: its mean on ``around``
    times 2/pi) when the caller has them already; ``around``: ``region``'s ring."""
    core = _u8(core)
    region = core if region is core else _u8(region)
    rng_m = ring(region, ring_px) if around is None else _u8(around)
    return _boundary(out, core, region, rng_m, grads)


def _boundary(out: np.ndarray, core: np.ndarray, region: np.ndarray, rng_m: np.ndarray,
              grads: tuple[np.ndarray, ...] | None) -> float:
    """``boundary_score`` of uint8 0/255 masks the caller has normalized already (``rng_m``: the
    region's ring); issue 27: footprint_metrics and insert_metrics hand theirs over as they are."""
    contour = cv2.bitwise_and(cv2.morphologyEx(core, cv2.MORPH_GRADIENT, _SQUARE3), region)
    contour[:2], contour[-2:], contour[:, :2], contour[:, -2:] = 0, 0, 0, 0
    if not cv2.countNonZero(contour) or not cv2.countNonZero(rng_m):
        return 0.0
    gx, gy, *mag = _gradients(out) if grads is None else grads
    # (``grads`` may carry the base already: the magnitude's mean on this ring, times 2/pi)
    if len(mag) > 1:
        base = mag[1]
    else:
        base = cv2.mean(mag[0] if mag else cv2.magnitude(gx, gy), mask=rng_m)[0] * _ISOTROPIC
    # the outline's normal (the gradient of the smoothed core mask) is read on the contour only:
    # computed on the contour's box and the 9 px its 17-tap Gaussian and Sobel reach (at the
    # array's edge, to the edge: the same border), the same values there (issue 27)
    h, w = core.shape
    x, y, bw, bh = cv2.boundingRect(contour)
    y0, x0 = max(0, y - _NORMAL_PX), max(0, x - _NORMAL_PX)
    win = slice(y0, min(h, y + bh + _NORMAL_PX)), slice(x0, min(w, x + bw + _NORMAL_PX))
    cm = core[win].astype(np.float32)
    cm /= 255
    cm = cv2.GaussianBlur(cm, (0, 0), 2.0)
    # the products on the contour's own box: the mean reads no pixel outside it (issue 27:
    # the same per-pixel float32 operations in the same order, in place, on fewer pixels)
    inner = slice(y - y0, y - y0 + bh), slice(x - x0, x - x0 + bw)
    box = slice(y, y + bh), slice(x, x + bw)
    nx, ny = cv2.Sobel(cm, cv2.CV_32F, 1, 0, ksize=3)[inner], cv2.Sobel(cm, cv2.CV_32F, 0, 1, ksize=3)[inner]
    norm = cv2.magnitude(nx, ny)
    norm += 1e-6
    across = gx[box] * nx
    across /= norm
    dy = gy[box] * ny
    dy /= norm
    across += dy
    # numpy's abs in place, not cv2.absdiff(across, 0.0): OpenCV reads a 1 x 1 array beside a
    # number as a scalar (a 4 x 1 result, then cv2.mean's size check fails), and the contour's
    # box is 1 x 1 for a one-pixel contour (a small core near the border); the same floats
    val = cv2.mean(np.abs(across, out=across), mask=contour[box])[0]
    return round(float(val / max(base, 1.0)), 4)


def color_distance(out: np.ndarray, region: np.ndarray, ring_px: int = 8, around: np.ndarray | None = None) -> float:
    """Hellinger distance (0..1) between the region's and its ring's color histograms."""
    region = _u8(region)
    rng_m = ring(region, ring_px) if around is None else _u8(around)
    if not cv2.countNonZero(region) or not cv2.countNonZero(rng_m):
        return 0.0
    img = out if out.ndim == 3 else cv2.cvtColor(out, cv2.COLOR_GRAY2RGB)
    args = ([0, 1, 2], None, [8, 8, 8], [0, 256, 0, 256, 0, 256])
    a = cv2.calcHist([img], args[0], region, *args[2:])
    b = cv2.calcHist([img], args[0], rng_m, *args[2:])
    return round(float(cv2.compareHist(a, b, cv2.HISTCMP_BHATTACHARYYA)), 4)


def footprint_metrics(orig: np.ndarray, out: np.ndarray, region: np.ndarray, core: np.ndarray | None = None,
                      ring_px: int = 8) -> dict:
    """All three figures for one edited region (the ones verify records and the bench prints).
    ``object_texture_ratio``: the same ratio on the original, for reference.

    Computed on the crop around the region that holds every pixel a figure reads (``window``),
    once for all figures: the same numbers as on the whole image (pinned by a test)."""
    win = window(region.shape, ring_px, region)
    if win is None:
        win = (slice(0, region.shape[0]), slice(0, region.shape[1]))
    out, region = out[win], _u8(region[win])
    # the ring, the gray image, its high-pass and gradients once for every figure (issue 27)
    around = ring(region, ring_px)
    g = gray(out)
    hp = highpass(out, g)
    tex, (found, share_in, share_ring) = _texture_and_flat(hp, region, around)
    m = {"texture_ratio": tex, "flat_patch": found,
         "flat_share": share_in, "flat_share_ring": share_ring,
         "color_distance": color_distance(out, region, ring_px, around=around)}
    gx, gy = _gradients(out, g)
    mag = cv2.magnitude(gx, gy)
    # the magnitude and its ring mean (both scores' base) once for both scores
    grads = (gx, gy, mag, cv2.mean(mag, mask=around)[0] * _ISOTROPIC)
    if core is not None:
        m["boundary_score"] = _boundary(out, _u8(np.ascontiguousarray(core[win])), region, around, grads)
    m["seam_score"] = _boundary(out, region, region, around, grads)
    return m


# how far around a region the figures read: the ring, then the high-pass (13-tap Gaussian, 6 px)
# under the flat detector's 9 x 9 box (4 px), or the gradient (9-tap Gaussian + Sobel, 5 px) and
# the outline normal (17-tap Gaussian + Sobel, 9 px); 2 px more for the image-border rows that
# boundary_score leaves out
_READ_PX = 6 + FLAT_WINDOW // 2 + 2


def window(shape: tuple[int, ...], ring_px: int, *masks: np.ndarray | None) -> tuple[slice, slice] | None:
    """The crop (rows, columns) around the non-zero pixels of ``masks`` in which every footprint
    figure reads the same pixels as on the whole image: at an image border the crop reaches the
    border (so OpenCV's reflected border is the same one), elsewhere it stops ``ring_px`` +
    ``_READ_PX`` away. None when the masks are empty."""
    boxes = [_rect(m) for m in masks if m is not None]
    boxes = [b for b in boxes if b[2] and b[3]]
    if not boxes:
        return None
    h, w = shape[:2]
    pad = ring_px + _READ_PX
    y0, x0 = min(b[1] for b in boxes), min(b[0] for b in boxes)
    y1, x1 = max(b[1] + b[3] for b in boxes), max(b[0] + b[2] for b in boxes)
    return slice(max(0, y0 - pad), min(h, y1 + pad)), slice(max(0, x0 - pad), min(w, x1 + pad))


def object_texture(img: np.ndarray, core: np.ndarray | None, ring_px: int = 8) -> tuple[float | None, bool]:
    """(texture ratio, flat found) of a real object: its interior against the ring outside it, in
    ``img``; (None, False) when the object has no interior to read (too thin or absent)."""
    if core is None:
        return None, False
    core = _u8(core)
    # on the crop that holds the ring and all its figures read (the high-pass's 13-tap Gaussian,
    # the flat detector's 9x9 box): the same figures as on the whole image, at a fraction of the
    # cost on a large photograph; the erosion too (the crop reaches ``pad`` > ``INTERIOR_PX``
    # past the core, or the image's border, where the erosion's border is the same)
    x, y, w, h = cv2.boundingRect(core)
    if not w or not h:
        return None, False
    pad = ring_px + 6 + FLAT_WINDOW // 2 + 2
    y0, y1, x0, x1 = max(0, y - pad), min(core.shape[0], y + h + pad), max(0, x - pad), min(core.shape[1], x + w + pad)
    img, core = img[y0:y1, x0:x1], core[y0:y1, x0:x1]
    inner = interior(core)
    if not cv2.countNonZero(inner):
        return None, False
    tex, (found, _, _) = _texture_and_flat(highpass(img), inner, ring(core, ring_px))
    return tex, found


def insert_metrics(orig: np.ndarray, out: np.ndarray, obj: np.ndarray, region: np.ndarray,
                   core: np.ndarray | None = None, ring_px: int = 8,
                   look_of: tuple[tuple[float | None, bool], bool] | None = None, seam: bool = False) -> dict:
    """An inserted object (``obj``, blended inside ``region``) against its surroundings and
    against the image's real object (``core``, in ``orig``); see the module's docstring.
    The insert's figures are read on the crop around it (``window``; the same numbers).
    ``look_of``: (``object_texture(orig, core, ring_px)``, ``achromatic(orig)``) when the caller
    has them (a sample computes them once for edit and verify). ``seam``: also
    ``insert_seam_score``, ``boundary_score(out, region, region, ring_px)`` (the step where the
    pasted pixels end), on the same crop (issue 27: verify read it on the whole image)."""
    win = window(out.shape, ring_px, obj, region)
    if win is not None:
        out, obj, region = out[win], np.ascontiguousarray(obj[win]), np.ascontiguousarray(region[win])
    inner = interior(obj)
    if not cv2.countNonZero(inner):
        inner = _u8(obj)
    region = _u8(region)
    around = ring(region, ring_px)
    g = gray(out)
    hp = highpass(out, g)
    tex, (found, share_in, share_ring) = _texture_and_flat(hp, inner, around)
    (ref, ref_flat), gray_orig = look_of or (object_texture(orig, core, ring_px), achromatic(orig))
    m = {"insert_texture_ratio": tex,
         "insert_flat_patch": found, "insert_flat_share": share_in, "insert_flat_share_ring": share_ring,
         "object_texture_ratio": ref, "object_flat_patch": ref_flat,
         "achromatic": gray_orig,
         "insert_chroma": round(float(cv2.mean(spread(out), mask=inner)[0]), 3)}
    if seam:
        m["insert_seam_score"] = _boundary(out, region, region, around, _gradients(out, g))
    return m
