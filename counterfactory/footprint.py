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
"""

from __future__ import annotations

import cv2
import numpy as np

FLAT_FRACTION = 0.35  # a pixel is flat under this share of the ring's median local energy
FLAT_WINDOW = 9
_MIN_RING_ENERGY = 0.75  # a ring flatter than this (gray levels) has no texture to match
_ISOTROPIC = 2 / np.pi  # mean |cos| of a random direction: |g . n| of isotropic texture


def gray(img: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(img, cv2.COLOR_RGB2GRAY).astype(np.float32) if img.ndim == 3 else img.astype(np.float32)


def highpass(img: np.ndarray) -> np.ndarray:
    """|gray - Gaussian(gray, sigma 1.5)|: the fine texture a smooth fill lacks."""
    g = gray(img)
    return cv2.absdiff(g, cv2.GaussianBlur(g, (0, 0), 1.5))


def ring(region: np.ndarray, px: int) -> np.ndarray:
    """The band of ``px`` pixels just outside ``region`` (uint8 0/255)."""
    k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * px + 1, 2 * px + 1))
    out = cv2.dilate(region, k)
    out[region > 0] = 0
    return out


def _u8(mask: np.ndarray) -> np.ndarray:
    return (mask > 0).astype(np.uint8) * 255


def texture_ratio(out: np.ndarray, region: np.ndarray, ring_px: int = 8, hp: np.ndarray | None = None) -> float:
    """High-frequency energy inside ``region`` of ``out`` over that of its ring; 1.0 when the
    ring itself has no texture (then a flat fill is the right fill)."""
    region = _u8(region)
    rng_m = ring(region, ring_px)
    if not cv2.countNonZero(region) or not cv2.countNonZero(rng_m):
        return 1.0
    hp = highpass(out) if hp is None else hp
    inside, around = cv2.mean(hp, mask=region)[0], cv2.mean(hp, mask=rng_m)[0]
    if around < _MIN_RING_ENERGY:
        return 1.0
    return round(float(inside / around), 4)


def flat_patch(out: np.ndarray, region: np.ndarray, ring_px: int = 8,
               hp: np.ndarray | None = None) -> tuple[bool, float, float]:
    """(found, flat share of the region, flat share of the ring) for the flat-texture detector."""
    region = _u8(region)
    rng_m = ring(region, ring_px)
    if not cv2.countNonZero(region) or not cv2.countNonZero(rng_m):
        return False, 0.0, 0.0
    hp = highpass(out) if hp is None else hp
    local = cv2.boxFilter(hp, -1, (FLAT_WINDOW, FLAT_WINDOW))
    ref = float(np.median(local[rng_m > 0]))
    if ref < _MIN_RING_ENERGY:
        return False, 0.0, 1.0
    flat = local < FLAT_FRACTION * ref
    share_in = float(flat[region > 0].mean())
    share_ring = float(flat[rng_m > 0].mean())
    return bool(share_in > 0.5 and share_ring < 0.5), round(share_in, 4), round(share_ring, 4)


def boundary_score(out: np.ndarray, core: np.ndarray, region: np.ndarray, ring_px: int = 8) -> float:
    """Mean |gradient . outline normal| on the core mask's contour (inside the edited region,
    off the image border) in ``out``, over the ring's mean gradient magnitude times 2/pi (what
    isotropic texture gives across any line). 0.0 when there is no contour to measure."""
    core, region = _u8(core), _u8(region)
    h, w = core.shape
    contour = cv2.morphologyEx(core, cv2.MORPH_GRADIENT, np.ones((3, 3), np.uint8))
    contour[region == 0] = 0
    contour[:2], contour[-2:], contour[:, :2], contour[:, -2:] = 0, 0, 0, 0
    rng_m = ring(region, ring_px)
    if not cv2.countNonZero(contour) or not cv2.countNonZero(rng_m):
        return 0.0
    g = cv2.GaussianBlur(gray(out), (0, 0), 1.0)
    gx, gy = cv2.Sobel(g, cv2.CV_32F, 1, 0, ksize=3), cv2.Sobel(g, cv2.CV_32F, 0, 1, ksize=3)
    # the outline's normal: the gradient of the smoothed core mask
    cm = cv2.GaussianBlur(core.astype(np.float32) / 255, (0, 0), 2.0)
    nx, ny = cv2.Sobel(cm, cv2.CV_32F, 1, 0, ksize=3), cv2.Sobel(cm, cv2.CV_32F, 0, 1, ksize=3)
    norm = cv2.magnitude(nx, ny) + 1e-6
    across = cv2.absdiff(gx * nx / norm + gy * ny / norm, 0.0)
    mag = cv2.magnitude(gx, gy)
    base = cv2.mean(mag, mask=rng_m)[0] * _ISOTROPIC
    val = cv2.mean(across, mask=contour)[0]
    return round(float(val / max(base, 1.0)), 4)


def color_distance(out: np.ndarray, region: np.ndarray, ring_px: int = 8) -> float:
    """Hellinger distance (0..1) between the region's and its ring's color histograms."""
    region = _u8(region)
    rng_m = ring(region, ring_px)
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
    ``object_texture_ratio``: the same ratio on the original, for reference."""
    hp = highpass(out)
    found, share_in, share_ring = flat_patch(out, region, ring_px, hp=hp)
    m = {"texture_ratio": texture_ratio(out, region, ring_px, hp=hp), "flat_patch": found,
         "flat_share": share_in, "flat_share_ring": share_ring,
         "color_distance": color_distance(out, region, ring_px)}
    if core is not None:
        m["boundary_score"] = boundary_score(out, core, region, ring_px)
    m["seam_score"] = boundary_score(out, region, region, ring_px)
    return m
