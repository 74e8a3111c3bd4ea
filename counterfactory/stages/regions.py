"""Where an edit may act (issue 16): every annotated object's pixels, the neutral control
region (an equal-area rectangle or ellipse clear of all of them), and an object's dominant
colored region (what ``attribute`` recolors). Shared by the classical edit stage, the model
edit stage (``control_mask``) and the video edit stage."""

from __future__ import annotations

import cv2
import numpy as np

from counterfactory import scenes
from counterfactory.rules import HUES
from counterfactory.sample import Sample


def annotated_mask(sample: Sample) -> np.ndarray:
    """uint8 0/255 mask of every object the sample knows about: each annotated object (its
    polygons, else its box) and each evidence instance. The fill never copies from them, the
    control never covers them."""
    h, w = sample.arrays["mask"].shape
    out = np.zeros((h, w), np.uint8)
    for o in [*sample.meta.get("annotated", []), *sample.meta.get("instances", [])]:
        if o.get("polygons"):
            for poly in o["polygons"]:
                out[scenes.polygon_mask(poly, w, h)] = 255
        elif o.get("box"):
            x0, y0, x1, y1 = (int(round(v)) for v in o["box"])
            out[max(0, y0):max(0, y1), max(0, x0):max(0, x1)] = 255
    if "mask_core" in sample.arrays:
        out |= (sample.arrays["mask_core"] > 0).astype(np.uint8) * 255
    return out


CONTROL_SHAPES = ("rectangle", "ellipse")


def control_mask(evidence: np.ndarray, rng: np.random.Generator, tries: int, gap: int,
                 avoid: np.ndarray | None = None, area: int | None = None) -> np.ndarray | None:
    """DeFacto's control region: a shape of the evidence's area from a fixed neutral family
    (rectangle or ellipse, aspect 1:2 to 2:1), never the evidence's own silhouette (a black star
    pasted elsewhere is a new star), placed ``gap`` pixels clear of the evidence and of every
    pixel of ``avoid`` (all annotated objects). ``tries`` (shape, aspect) draws; for each, every
    position that fits is found at once (an integral image over the shape's box) and one is
    drawn, so a spot is missed only when none exists. ``area``: the shape's area when not the
    evidence's (a clip's largest frame). None when nothing fits."""
    h, w = evidence.shape
    blocked = evidence > 0 if avoid is None else (evidence > 0) | (avoid > 0)
    keepout = cv2.dilate(blocked.astype(np.uint8), cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * gap + 1,) * 2))
    integ = cv2.integral(keepout)
    area = cv2.countNonZero(evidence) if area is None else area
    if not area:
        return None
    for _ in range(min(tries, 8)):
        kind = CONTROL_SHAPES[int(rng.integers(len(CONTROL_SHAPES)))]
        aspect = float(np.exp(rng.uniform(np.log(0.5), np.log(2.0))))
        # an ellipse inscribed in a box of area A*4/pi has area A
        box_area = area * (4 / np.pi if kind == "ellipse" else 1.0)
        bw = int(round(np.sqrt(box_area * aspect)))
        bh = int(round(box_area / max(bw, 1)))
        if not (0 < bw <= w and 0 < bh <= h):
            continue
        shape = _neutral_shape(kind, bw, bh)
        for _ in range(3):  # a small ellipse rasterizes a few % off its area: rescale to match
            k = np.sqrt(area / max(int(shape.sum()), 1))
            if abs(k * k - 1) <= 0.01:
                break
            bw, bh = max(1, int(round(bw * k))), max(1, int(round(bh * k)))
            shape = _neutral_shape(kind, bw, bh)
        bh, bw = shape.shape
        if not (bw <= w and bh <= h):
            continue
        free = (integ[bh:, bw:] - integ[:-bh, bw:] - integ[bh:, :-bw] + integ[:-bh, :-bw]) == 0
        ys, xs = np.nonzero(free)
        if not len(ys):
            continue
        i = int(rng.integers(len(ys)))
        y, x = int(ys[i]), int(xs[i])
        out = np.zeros((h, w), np.uint8)
        out[y : y + bh, x : x + bw][shape] = 255
        return out
    return None


def _neutral_shape(kind: str, bw: int, bh: int) -> np.ndarray:
    """A filled ``bw`` x ``bh`` rectangle or the ellipse inscribed in that box (bool)."""
    if kind == "rectangle":
        return np.ones((bh, bw), bool)
    m = np.zeros((bh, bw), np.uint8)
    cv2.ellipse(m, (((bw - 1) / 2, (bh - 1) / 2), (float(bw), float(bh)), 0.0), 1, -1)
    return m > 0


def dominant_region(img: np.ndarray, core: np.ndarray, min_saturation: float,
                    annotated: str | None = None) -> np.ndarray:
    """The object's dominant colored region inside ``core``: saturated pixels whose hue lies
    within 25 degrees of the annotated color's hue (else of the strongest hue bin), their
    largest connected part. The coffee in a red cup, a white rim or the table seen through a
    loose polygon are not part of it."""
    hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV_FULL)  # hue 0..255 for the full circle
    sel = core > 0
    sat_ok = sel & (hsv[..., 1] >= max(0.15, 0.6 * min_saturation) * 255) & (hsv[..., 2] >= 40)
    if not sat_ok.any():
        return np.zeros(core.shape, np.uint8)
    hue = hsv[..., 0][sat_ok].astype(np.int64)
    hist = np.bincount(hue // 8, minlength=32).astype(np.float64)
    hist = hist + np.roll(hist, 1) + np.roll(hist, -1)  # circular smoothing
    peak = (int(np.argmax(hist)) * 8 + 4) % 256
    if annotated in HUES:  # the color the answer names: the part of the object that has it
        peak = int(round(HUES[annotated] / 360 * 256)) % 256
    dist = np.abs(((hsv[..., 0].astype(np.int64) - peak + 128) % 256) - 128)
    near = (sat_ok & (dist <= 18)).astype(np.uint8)  # 18/256 of the circle: ~25 degrees
    n, labels, stats, _ = cv2.connectedComponentsWithStats(near, connectivity=8)
    if n < 2:
        return np.zeros(core.shape, np.uint8)
    biggest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    return (labels == biggest).astype(np.uint8) * 255
