"""object_invented on the CPU default (issue 31): does a fill reproduce another annotated object?

A removal must leave background. A fill that copies pixels from elsewhere in the image can copy
another object into the hole (a second coin where one was removed, the cup's rim in the
saucer's place): "is there a coin?" then has a true answer the rule table does not give. The
patch fill is told never to copy from annotated objects, but a loose polygon, a fill from
another backend or a later change can still do it, so verify checks the result, not the intent.

The check: each other annotated object (in the original: its polygon, else its box, cropped to
its bounding box) is a template; it is slid over the edited image around the filled region
(``cv2.matchTemplate``, zero-mean normalized cross-correlation under the object's own mask), and
the best correlation among the positions where at least ``min_cover`` of the object's pixels
would land on filled pixels (not on the object's own place) is its score. A copy scores ~1;
background texture that merely resembles an object scores well under 0.9. Templates with no
texture to correlate (a flat object: std under ``MIN_TEMPLATE_STD`` gray levels) are skipped,
and large objects are compared at a scale where their longer side is ``WORK_SIDE`` pixels.
"""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np

from counterfactory import scenes

MIN_TEMPLATE_STD = 6.0  # levels, in its most varied channel: a flatter object has nothing a correlation could recognise
OUTLINE_PX = 3  # px of the surroundings each template keeps around its object
WORK_SIDE = 32  # px: an object's template is at most this long at the scale it is compared at


def other_objects(sample_meta: dict[str, Any], arrays: dict[str, np.ndarray],
                  edit: dict[str, Any], annotated: list[tuple[str, np.ndarray]] | None = None,
                  ) -> list[tuple[str, np.ndarray]]:
    """(category, bool mask) of every annotated object an edit's fill must not reproduce: the
    objects that are not the evidence, and (``count``) the evidence instances that stay.
    ``annotated``: ``annotated_others(sample_meta, arrays)`` when the caller has it (the same
    for every variant of a sample)."""
    targets = set(sample_meta.get("targets", []))
    out = list(annotated_others(sample_meta, arrays) if annotated is None else annotated)
    inst = arrays.get("instance_masks")
    removed = edit.get("removed_indices")
    if inst is not None and removed is not None:
        cat = next(iter(targets), "evidence")
        out += [(cat, inst[i] > 0) for i in range(len(inst)) if i not in set(removed)]
    return out


def annotated_others(sample_meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> list[tuple[str, np.ndarray]]:
    """(category, bool mask) of each annotated object that is not the evidence (its polygons,
    else its box); read-only masks."""
    h, w = arrays["mask"].shape
    targets = set(sample_meta.get("targets", []))
    out: list[tuple[str, np.ndarray]] = []
    for o in sample_meta.get("annotated", []):
        if o["category"] in targets:
            continue
        polys = o.get("polygons") or []
        # the first polygon's own fresh mask, the others OR-ed in (issue 27: no blank image first)
        m = scenes.polygon_mask(polys[0], w, h) if polys else np.zeros((h, w), bool)
        for poly in polys[1:]:
            m |= scenes.polygon_mask(poly, w, h)
        if not cv2.countNonZero(m.view(np.uint8)) and o.get("box"):
            x0, y0, x1, y1 = (int(round(v)) for v in o["box"])
            m[max(0, y0):max(0, y1), max(0, x0):max(0, x1)] = True
        if cv2.countNonZero(m.view(np.uint8)):
            m.flags.writeable = False
            out.append((o["category"], m))
    return out


def _float3(img: np.ndarray) -> np.ndarray:
    """RGB as float32 (a gray image as three equal channels): the correlation sums the channels,
    so a red star on a green ground of the same brightness is still seen."""
    return (img if img.ndim == 3 else cv2.cvtColor(img, cv2.COLOR_GRAY2RGB)).astype(np.float32)


_OUTLINE = np.ones((2 * OUTLINE_PX + 1,) * 2, np.uint8)
_STD_MARGIN = 0.01  # levels: OpenCV's double-precision std decides alone this far from the floor


def _flat_template(crop: np.ndarray, tpl: np.ndarray, tmask: np.ndarray) -> bool:
    """Whether a template (``tpl``: ``_float3(crop)``, under ``tmask``, uint8) has no texture to
    correlate: its most varied channel's std under ``MIN_TEMPLATE_STD``, as numpy's float32 std
    reads it. OpenCV's ``meanStdDev`` (double) decides when it is clearly off the floor (issue 27:
    ~10x cheaper than the boolean gather); numpy's figure only within ``_STD_MARGIN`` of it."""
    _, sd = cv2.meanStdDev(crop, mask=tmask)
    s = float(sd.max())
    if abs(s - MIN_TEMPLATE_STD) > _STD_MARGIN:
        return s < MIN_TEMPLATE_STD
    return float(tpl[tmask > 0].std(axis=0).max()) < MIN_TEMPLATE_STD


REFINE_MARGIN = 1e-4  # the placements this close to the best (float32) score are scored again in float64
REFINE_MAX = 8  # at most this many of them (the best first)
_FLAT = 10 * float(np.finfo(np.float32).eps)  # a variance this small against its sum of squares: rounding
_SUM3 = np.ones((1, 3))


def _best_masked_ncc(win: np.ndarray, tpl: np.ndarray, tm: np.ndarray, ok: np.ndarray, floor: float = -1.0) -> float:
    """The best zero-mean normalized cross-correlation of ``tpl`` under the 0/1 mask ``tm``
    (float32, the channels summed: OpenCV's masked ``TM_CCOEFF_NORMED``) with ``win`` among
    the placements ``ok``; 0.0 where none has texture to correlate with. A best under ``floor``
    (the best so far: it cannot be the answer) is returned as float32 found it.

    Issue 27: OpenCV's masked correlation costs ~7 DFT correlations per channel; this one takes
    two unmasked ``TM_CCORR`` calls (float32) on mean-subtracted values: the numerator with the
    template zero-meaned under its mask (zero outside it), and each channel's sum and the sum of
    squares under the mask, four planes side by side in one image, for each placement's variance.
    The placements within ``REFINE_MARGIN`` of the best are then scored again in float64 from
    their pixels, so the figure kept is the exact one (float32 rounding, OpenCV's or this one's,
    is ~1e-6; the value is stored to 4 places)."""
    tmu = (tm > 0).view(np.uint8)
    n = float(cv2.countNonZero(tmu))
    tz = cv2.subtract(tpl, cv2.mean(tpl, mask=tmu))
    tz *= tm[..., None]  # zero-mean under the mask, zero outside: sum(tz * w) = sum(tz * (w - mean))
    tnorm2 = cv2.norm(tz, cv2.NORM_L2SQR)
    w = win.shape[1]
    wz = cv2.subtract(win, cv2.mean(win))  # mean-subtracted: the variance's difference loses less
    planes = np.empty((win.shape[0], 4 * w), np.float32)
    planes[:, :3 * w].reshape(-1, 3, w)[:] = wz.transpose(0, 2, 1)
    cv2.transform(cv2.multiply(wz, wz), _SUM3, dst=planes[:, 3 * w:])
    sums = cv2.matchTemplate(planes, tm, cv2.TM_CCORR)
    ow = ok.shape[1]  # each plane's sums at the placements read (row-major, as np.flatnonzero)
    s1r, s1g, s1b, s2 = (sums[:, c * w:c * w + ow][ok].astype(np.float64) for c in range(4))
    var = s2 - (s1r * s1r + s1g * s1g + s1b * s1b) / n
    # a flat window (0/0, as OpenCV's NaN and inf, read as no correlation): its variance lost in
    # float32's rounding of the sum of squares
    good = (var > 0) & (var > _FLAT * s2)
    if not good.any() or tnorm2 <= 0:
        return 0.0
    r = cv2.matchTemplate(wz, tz, cv2.TM_CCORR)[ok][good] / np.sqrt(tnorm2 * var[good])
    top = float(r.max())
    if top < floor - REFINE_MARGIN:
        return top
    near = np.flatnonzero(r >= top - REFINE_MARGIN)
    if len(near) > REFINE_MAX:
        near = near[np.argpartition(r[near], -REFINE_MAX)[-REFINE_MAX:]]
    ys, xs = np.divmod(np.flatnonzero(ok)[np.flatnonzero(good)[near]], ow)
    return max(-1.0, min(1.0, _exact_ncc(win, tpl, tmu, ys, xs)))


def _exact_ncc(win: np.ndarray, tpl: np.ndarray, tmu: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> float:
    """The best masked zero-mean normalized cross-correlation at the placements (ys, xs), in
    double precision (``tmu``: the mask, uint8 0/1); a placement with no variance reads 0."""
    th, tw = tmu.shape
    t = tpl.astype(np.float64)
    t -= cv2.mean(t, mask=tmu)[:3]
    t *= tmu[..., None]
    tnorm2 = float(np.dot(t.ravel(), t.ravel()))
    best = -1.0
    for y, x in zip(ys.tolist(), xs.tolist(), strict=True):
        patch = win[y:y + th, x:x + tw]
        _, sd = cv2.meanStdDev(patch, mask=tmu)
        var = float(np.dot(sd.ravel(), sd.ravel()))  # per pixel, the channels summed
        num = float(np.dot(t.ravel(), patch.astype(np.float64).ravel()))
        r = num / np.sqrt(tnorm2 * var * cv2.countNonZero(tmu)) if var > 0 else 0.0
        best = max(best, r)
    return best


def copied_object(orig: np.ndarray, out: np.ndarray, region: np.ndarray,
                  objects: list[tuple[str, np.ndarray]], min_cover: float = 0.5) -> dict[str, Any]:
    """The best correlation of any of ``objects`` (templates from ``orig``) with ``out`` at a
    position where it lies mostly on the filled ``region``: ``invented_ncc`` (-1..1, 0.0 when no
    object can lie there) and ``invented_category``."""
    # a uint8 or bool region as it is (OpenCV reads non-zero); a bool copy only of each window
    # (issue 27: the whole image's ``region > 0`` cost as much as the window's work)
    reg = region.view(np.uint8) if region.dtype in (np.uint8, np.bool_) else (region > 0).view(np.uint8)
    n_region = cv2.countNonZero(reg)
    h, w = region.shape
    best, best_cat = 0.0, None
    if not n_region:
        return {"invented_ncc": 0.0, "invented_category": None}
    rx0, ry0, rw, rh = cv2.boundingRect(reg)
    ry1, rx1 = ry0 + rh, rx0 + rw
    for cat, m in objects:
        m = np.ascontiguousarray(m, dtype=bool)
        area = cv2.countNonZero(m.view(np.uint8))
        if not area or area * min_cover > n_region:
            continue  # too big to fit into the fill
        # the object and a thin band of what was around it: a flat object (a drawn star) is
        # recognised by its outline against its surroundings
        bx, by, bw, bh = cv2.boundingRect(m.view(np.uint8))
        oy0, oy1 = max(0, by - OUTLINE_PX), min(h, by + bh + OUTLINE_PX)
        ox0, ox1 = max(0, bx - OUTLINE_PX), min(w, bx + bw + OUTLINE_PX)
        th, tw = oy1 - oy0, ox1 - ox0
        # only the crops are converted to float (issue 27: the same values, not two whole images)
        crop = orig[oy0:oy1, ox0:ox1]
        tmask = cv2.dilate(m[oy0:oy1, ox0:ox1].view(np.uint8), _OUTLINE)
        tpl = _float3(crop)
        if _flat_template(crop, tpl, tmask):
            continue
        tmask = tmask > 0
        # the window: every placement of the object's box that reaches the region's box
        wy0, wy1 = max(0, ry0 - th + 1), min(h, ry1 + th - 1)
        wx0, wx1 = max(0, rx0 - tw + 1), min(w, rx1 + tw - 1)
        if wy1 - wy0 < th or wx1 - wx0 < tw:
            continue
        # filled pixels a copy could sit on: the region, less the object's own place (where an
        # untouched object would match itself)
        free = ((reg[wy0:wy1, wx0:wx1] != 0) & ~m[wy0:wy1, wx0:wx1]).astype(np.float32)
        win = None  # at the object's own scale: only the placements' part is read (below)
        k = min(1.0, WORK_SIDE / max(th, tw))
        tm = tmask.astype(np.float32)
        if k < 1.0:
            size = (max(1, round(tw * k)), max(1, round(th * k)))
            wsize = (max(size[0], round((wx1 - wx0) * k)), max(size[1], round((wy1 - wy0) * k)))
            tpl = cv2.resize(tpl, size, interpolation=cv2.INTER_AREA)
            tm = (cv2.resize(tm, size, interpolation=cv2.INTER_AREA) > 0.5).astype(np.float32)
            win = cv2.resize(_float3(out[wy0:wy1, wx0:wx1]), wsize, interpolation=cv2.INTER_AREA)
            free = cv2.resize(free, wsize, interpolation=cv2.INTER_AREA)
        if not tm.any():
            continue
        om = m[oy0:oy1, ox0:ox1].astype(np.float32)  # the object itself must land on the fill
        if k < 1.0:
            om = cv2.resize(om, tm.shape[::-1], interpolation=cv2.INTER_AREA)
        cover = cv2.matchTemplate(free, om, cv2.TM_CCORR) / max(float(om.sum()), 1.0)
        ok = cover >= min_cover - 1e-6
        if not ok.any():
            continue
        # the correlation only over the placements that land on the fill (their box)
        x0, y0, bw2, bh2 = cv2.boundingRect(ok.view(np.uint8))
        y1, x1 = y0 + bh2, x0 + bw2
        th2, tw2 = tm.shape
        part = (win[y0:y1 + th2 - 1, x0:x1 + tw2 - 1] if win is not None
                else _float3(out[wy0 + y0:wy0 + y1 + th2 - 1, wx0 + x0:wx0 + x1 + tw2 - 1]))
        score = _best_masked_ncc(part, tpl, tm, ok[y0:y1, x0:x1], max(best, 0.0))
        if score > best:
            best, best_cat = score, cat
    return {"invented_ncc": round(best, 4), "invented_category": best_cat}
