"""edit: the counterfactual variants of one source.

Embedded default (OpenCV, CPU), one answer rule per edit type (``rules.ANSWER_RULES``):
- ``remove``: the dilated evidence is filled with copied background (``fill.patch_fill``: best
  ring-matching offset per piece, seam corrected; no smooth smear that a person or a
  flat-texture detector finds), or inpainted (Telea or Navier-Stokes) when configured;
- ``blackout``: the evidence is covered with a flat fill (DeFacto's counterfactual);
- ``random_mask``: the same fill over an equal-area rectangle or ellipse (a fixed neutral
  family, never the evidence's silhouette, which would paste a new black triangle or star) clear
  of every annotated object (DeFacto's control: the answer must not change);
- ``attribute``: the evidence's dominant colored region (hue cluster, largest connected part,
  inside the core mask only) set to another named color that still reads as that name after
  the edit (color answers change; ``color_before`` is the original's annotated answer);
- ``flip``: the image mirrored (CounterCurate: left and right swap);
- ``count``: k of n evidence instances removed, the rest kept (count answers become n - k);
- ``swap``: the evidence and another annotated object on the other side trade places (each
  cut out, the holes inpainted, both pasted at the other's centroid; position answers change);
- ``insert``: a shape that no annotation names, alpha-blended with a feathered edge where it
  covers no annotated object (HalluciDoctor: existence becomes yes, counts go up), with the look
  of the objects really in the image (``insert_paint``): flat like a procedural scene's drawn
  objects; on a photograph lit by its spot and grained like its ring, gray on a grayscale one
  (no pasted sticker); ``new_value`` is the color it reads as. On a photograph with a cut-out
  bank (``cutouts``, issue 31) a real object instead: an annotated instance of another image of
  the run, of a category this one lacks (``stages/cutouts.py``).
Every pixel outside an edit's region is copied from the original, bit for bit (``flip`` aside,
which is an exact mirror). Each variant's edit record names the categories it ``affects``, so
the qa stage changes only the answers about those.

Cost: inpainting is most of this stage's time. The evidence is inpainted once per distinct
(image, evidence mask), also across questions about the same image, and ``remove``, ``count``
and ``swap`` paste from that one fill; a large hole is filled coarse-to-fine
(``inpaint``: a low-resolution pass, then a full-resolution band along its edge), small ones in
one full-resolution pass.
"""

# Over ~450 lines on purpose: the seven CPU edits share one Params, one fill cache and one
# rng discipline; split by edit they would each re-import and re-declare them.

from __future__ import annotations

from collections import deque
from typing import Any, Literal

import cv2
import numpy as np
from pydantic import Field

from counterfactory import footprint, scenes
from counterfactory.rules import ACHROMATIC, EDIT_COLORS, HUES, color_name, side_of
from counterfactory.sample import Sample, Stage
from counterfactory.stages import register
from counterfactory.stages.cutouts import insert_cutout, is_photo
from counterfactory.stages.fill import patch_fill
from counterfactory.stages.shared import (
    CONTROL_SALT,
    FlatFillParams,
    Skip,
    annotated_keepout,
    annotated_mask_of,
    bbox,
    box_of,
    control_variant,
    cv_inpaint,
    disk,
    flat_fill,
    original_look,
    place_shape,
)

EditType = Literal["remove", "blackout", "random_mask", "attribute", "flip", "count", "insert", "swap"]
_SALT = {"random_mask": CONTROL_SALT, "attribute": 11, "count": 13, "insert": 17, "swap": 19}
# recent evidence fills kept per stage instance (see _evidence_filled): at most this many, and
# this many bytes
_FILL_CACHE_ENTRIES = 8
_FILL_CACHE_BYTES = 64 * 2**20


def inpaint(img: np.ndarray, mask: np.ndarray, radius: int, method: str, work_max_side: int = 384,
            work_max_area: int = 8192, band_px: int = 6) -> np.ndarray:
    """OpenCV inpainting of ``mask``; every pixel outside it is copied from ``img`` bit for bit.

    Telea/NS cost grows with the hole's area times ``radius``², and a large hole's interior is a
    smooth fill anyway. So a hole of more than ``work_max_area`` pixels (or whose crop is wider
    than ``work_max_side``) is filled in two passes, when that is cheaper: (1) the whole hole at
    a lower resolution, with the radius scaled alike (so the fill draws from about as far away as
    at full resolution), upscaled; (2) at full resolution, only the band of ``band_px`` pixels
    inside the hole's edge, with the coarse interior as known pixels, so the fill meets the
    surrounding pixels (and their fine detail) without a seam. Small holes take one
    full-resolution pass, as before. Single-threaded OpenCV: the same input gives the same bytes."""
    flag = cv2.INPAINT_TELEA if method == "telea" else cv2.INPAINT_NS
    h, w = mask.shape
    # Work on the bounding crop of the mask plus a margin: inpainting reads only pixels within
    # ``radius`` of the hole (4r + 8 also holds OpenCV's outer fast-marching band).
    by0, by1, bx0, bx1 = bbox(mask)
    pad = 4 * radius + 8
    y0, y1 = max(0, by0 - pad), min(h, by1 + pad)
    x0, x1 = max(0, bx0 - pad), min(w, bx1 + pad)
    crop, cmask = np.ascontiguousarray(img[y0:y1, x0:x1]), np.ascontiguousarray(mask[y0:y1, x0:x1])
    ch, cw = cmask.shape
    area = cv2.countNonZero(cmask)
    scale = min(1.0, work_max_side / max(ch, cw), (work_max_area / max(area, 1)) ** 0.5)
    # the radius scales with the image, but not below 3: a 1-2 px window at the coarse scale
    # draws blocky streaks that the upscale makes visible
    coarse_radius = max(min(radius, 3), round(radius * scale))
    inner = None
    if scale < 1.0:
        inner = cv2.erode(cmask, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * band_px + 1,) * 2))
        band_area = area - cv2.countNonZero(inner)
        # cost in full-resolution pixels x radius²: one pass = area; two = coarse + band
        if area * scale**2 * (coarse_radius / radius) ** 2 + band_area >= area:
            inner = None
    if inner is None:
        filled = cv_inpaint(crop, cmask, radius, flag)
    else:
        sw, sh = max(1, round(cw * scale)), max(1, round(ch * scale))
        small = cv2.resize(crop, (sw, sh), interpolation=cv2.INTER_AREA)
        smask = (cv2.resize(cmask, (sw, sh), interpolation=cv2.INTER_NEAREST) > 0).astype(np.uint8)
        smask = cv2.dilate(smask, np.ones((3, 3), np.uint8))  # no hole pixels averaged into known ones
        coarse = cv_inpaint(small, smask, coarse_radius, flag)
        coarse = cv2.resize(coarse, (cw, ch), interpolation=cv2.INTER_CUBIC)
        crop = crop.copy()
        _paste(crop, coarse, inner)  # the coarse interior becomes known pixels
        filled = cv_inpaint(crop, cv2.subtract(cmask, inner), radius, flag)
    out = img.copy()
    _paste(out[y0:y1, x0:x1], filled, cmask)
    return out


def _paste(dst: np.ndarray, src: np.ndarray, mask: np.ndarray) -> None:
    """``dst[mask > 0] = src[mask > 0]`` in place (``dst`` may be a view). cv2.copyTo is many
    times faster than numpy's boolean indexing on photo-sized masks."""
    try:
        if cv2.copyTo(src, mask, dst) is dst:
            return
    except cv2.error:  # a view OpenCV cannot wrap (negative or non-unit strides)
        pass
    sel = mask > 0
    dst[sel] = src[sel]


def recolor(img: np.ndarray, region: np.ndarray, target: str, min_saturation: float) -> np.ndarray:
    """Set the hue inside ``region`` to the named ``target`` hue. Saturation and value (texture,
    shading) are kept, except that a target that needs light to read as itself (yellow turns
    olive when dark) has its value lifted to the level the name needs."""
    # on the region's bounding box (issue 27): every step is per pixel, so the same pixels
    box = box_of(region)
    hsv = cv2.cvtColor(np.ascontiguousarray(img[box]), cv2.COLOR_RGB2HSV_FULL)
    sel = region[box] > 0
    sat = hsv[..., 1][sel].astype(np.float64) / 255
    if not sel.any() or sat.mean() < min_saturation:
        raise Skip("achromatic_evidence", f"mean saturation {sat.mean() if sel.any() else 0:.2f} < {min_saturation}")
    recolored = hsv.copy()
    recolored[..., 0][sel] = int(round(HUES[target] / 360 * 256)) % 256
    if target in ("yellow", "cyan"):
        v = recolored[..., 2].astype(np.float32)
        mean_v = float(v[sel].mean())
        if mean_v < 200:
            v[sel] = np.minimum(255, v[sel] * (200 / max(mean_v, 1.0)))
            recolored[..., 2] = np.rint(v).astype(np.uint8)
    out = img.copy()
    out[box][sel] = cv2.cvtColor(recolored, cv2.COLOR_HSV2RGB_FULL)[sel]
    return out


def dominant_region(img: np.ndarray, core: np.ndarray, min_saturation: float,
                    annotated: str | None = None) -> np.ndarray:
    """The object's dominant colored region inside ``core``: saturated pixels whose hue lies
    within 25 degrees of the annotated color's hue (else of the strongest hue bin), their
    largest connected part. The coffee in a red cup, a white rim or the table seen through a
    loose polygon are not part of it."""
    # the colors on the core's bounding box only (issue 27: nothing outside the core is read);
    # the connected parts on the whole image, as before
    box = box_of(core)
    hsv = cv2.cvtColor(np.ascontiguousarray(img[box]), cv2.COLOR_RGB2HSV_FULL)  # hue 0..255 for the full circle
    sel = core[box] > 0
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
    # the connected parts on the box too, grown to even coordinates (issue 27): every candidate
    # pixel lies in it, and OpenCV's block-based labelling scans it on the whole image's 2 x 2
    # grid, so the parts, their labels and areas are the same (pinned by a test)
    ys, xs = box  # a real box: the core has pixels (sat_ok has)
    y0, x0 = ys.start & ~1, xs.start & ~1
    cbox = (slice(y0, ys.stop), slice(x0, xs.stop))
    near = np.zeros((ys.stop - y0, xs.stop - x0), np.uint8)
    near[ys.start - y0:, xs.start - x0:] = sat_ok & (dist <= 18)  # 18/256 of the circle: ~25 degrees
    n, labels, stats, _ = cv2.connectedComponentsWithStats(near, connectivity=8)
    out = np.zeros(core.shape, np.uint8)
    if n < 2:
        return out
    biggest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    out[cbox] = (labels == biggest).view(np.uint8) * 255
    return out


@register
class ClassicalEdit(Stage):
    name = "edit"
    backend = "default"

    class Params(FlatFillParams):
        flat_fill_after = ("inpaint_band_px", "fill")  # where config.yaml lists the flat-fill fields
        variants: list[EditType] = Field(["remove", "blackout", "random_mask"], min_length=1)
        inpaint_method: Literal["patch", "telea", "ns"] = Field(
            "patch", description="patch: copied background (no texture-flat footprint); telea/ns: OpenCV diffusion")
        inpaint_radius: int = Field(5, ge=1, le=50)
        work_max_side: int = Field(384, ge=32, description="a hole's coarse pass works at most this wide")
        work_max_area: int = Field(8192, ge=64, description="a hole of more pixels gets its interior filled at a "
                                   "lower resolution (at most this many hole pixels), then a full-resolution band")
        inpaint_band_px: int = Field(6, ge=1, le=64, description="width of the band inside a large hole's edge "
                                     "that is inpainted at full resolution after the coarse pass")
        attribute_min_saturation: float = Field(0.25, ge=0, le=1, description="below: evidence too gray to recolor")
        insert_scale: float = Field(0.12, gt=0, le=0.5, description="inserted shape radius / min(image side)")
        insert_tries: int = Field(64, ge=1)
        cutouts: str | None = Field("run", description="insert on photographs: real cut-outs from \"run\" (the "
                                    "annotated instances of the run's manifests) or a folder FOLDER/<category>/*.png "
                                    "(RGBA); null: drawn shapes (stages/cutouts.py)")

    def __init__(self, params=None, run=None) -> None:
        super().__init__(params, run)
        cv2.setNumThreads(1)
        self._fills: deque[tuple[Any, ...]] = deque(maxlen=_FILL_CACHE_ENTRIES)  # (signature, arrays...)
        self._ann: tuple[Sample, np.ndarray] | None = None

    def _inpaint(self, img: np.ndarray, hole: np.ndarray, forbid: np.ndarray | None = None) -> np.ndarray:
        p = self.params
        if p.inpaint_method == "patch":
            # the radius is how far the fill reads around the hole: the ring it matches by (at
            # least radius + 1 pixels wide), and Telea's window where no copy fits
            return patch_fill(img, hole, forbid, radius=p.inpaint_radius, min_ring=p.inpaint_radius + 1)
        return inpaint(img, hole, p.inpaint_radius, p.inpaint_method, p.work_max_side, p.work_max_area,
                       p.inpaint_band_px)

    @property
    def _method(self) -> str:
        return "patch-transfer" if self.params.inpaint_method == "patch" else f"opencv-{self.params.inpaint_method}"

    def _evidence_filled(self, sample: Sample) -> np.ndarray:
        """The image with the whole evidence mask inpainted: remove's output, and the fill that
        count and swap paste from. Made once per distinct (image, evidence mask), by whichever
        variant asks first: the questions about one image are adjacent inputs (mostly in one
        batch), and several of them often share the evidence. Found by exact comparison of the
        arrays, and inpainting is a pure function, so a hit gives the bytes a recomputation
        would. Read-only; the last few are kept (newest looked at first)."""
        img, mask = sample.arrays["image"], sample.arrays["mask"]
        # the annotations are part of the key: the patch fill never copies another object
        forbid = self._annotated(sample)
        # the mask's area and box first (issue 27): an entry of another mask is passed over
        # without comparing whole arrays; a hit is still found by exact comparison
        m8 = mask if mask.dtype == np.uint8 else (mask != 0).view(np.uint8)
        sig = (img.shape, cv2.countNonZero(m8), cv2.boundingRect(m8))
        for sg, im, m, fb, filled in reversed(self._fills):
            if sg == sig and np.array_equal(m, mask) and np.array_equal(fb, forbid) and np.array_equal(im, img):
                return filled
        filled = self._inpaint(img, mask, forbid)
        filled.flags.writeable = False
        self._fills.append((sig, img.copy(), mask.copy(), forbid, filled))
        while len(self._fills) > 1 and sum(a.nbytes for e in self._fills for a in e[1:]) > _FILL_CACHE_BYTES:
            self._fills.popleft()
        return filled

    def _annotated(self, sample: Sample) -> np.ndarray:
        """``annotated_mask(sample)`` once per sample while its edits are made (issue 27: remove,
        count and swap each asked for it; the sample's annotations do not change meanwhile).
        Read-only: every caller reads it."""
        if self._ann is None or self._ann[0] is not sample:
            self._ann = (sample, annotated_mask_of(sample))  # the one the control reads too
        return self._ann[1]

    def process(self, sample: Sample) -> None:
        self._ann = None
        sample.begin_variants()
        seed = sample.seed
        for v in self.params.variants:
            rng = _LazyRng([seed, _SALT.get(v, 0)])
            try:
                out, region, info = getattr(self, f"_{v}")(sample, rng)
            except Skip as s:
                sample.reject_variant(self.name, v, s.reason, s.detail)
                continue
            sample.add_variant(v, out, info, region)

    # each edit: (edited image, its region mask or None for the evidence mask / global, record)
    def _remove(self, sample: Sample, rng) -> tuple[np.ndarray, Any, dict]:
        out = self._evidence_filled(sample).copy()
        return out, None, {"method": self._method, "region": "evidence", "inpainted": True,
                           "affects": sample.meta["targets"], "removed_instances": len(sample.meta["instances"])}

    def _blackout(self, sample: Sample, rng) -> tuple[np.ndarray, Any, dict]:
        out = flat_fill(sample.arrays["image"], sample.arrays["mask"], self.params.fill)
        return out, None, {"method": "flat-fill", "region": "evidence", "affects": sample.meta["targets"],
                           "removed_instances": len(sample.meta["instances"])}

    def _random_mask(self, sample: Sample, rng) -> tuple[np.ndarray, Any, dict]:
        out, ctrl, info = control_variant(sample, self.params)  # its own draws, from the same salt
        return out, ctrl, info | {"shape": "neutral"}

    def _attribute(self, sample: Sample, rng) -> tuple[np.ndarray, Any, dict]:
        img, core = sample.arrays["image"], sample.arrays["mask_core"]
        if "target_phrase" in sample.meta:
            # "is there a red circle?" would change meaning, not just its color answer
            raise Skip("not_applicable", f"the question names the color: {sample.meta['target_phrase']!r}")
        colors = {str(i.get("attributes", {}).get("color", "")).lower() for i in sample.meta["instances"]}
        if len(colors) != 1 or "" in colors:
            # no color question can be asked, so a recolored twin would teach nothing
            raise Skip("not_applicable", "the evidence has no single annotated color")
        (annotated,) = colors
        if annotated in ACHROMATIC:  # warm light can lift its measured saturation over the floor
            raise Skip("achromatic_evidence", f"annotated {annotated}: no hue to change")
        p = self.params
        region = dominant_region(img, core, p.attribute_min_saturation, annotated)
        if cv2.countNonZero(region) < 0.2 * cv2.countNonZero(core):
            raise Skip("achromatic_evidence", "no colored region covers a fifth of the object")
        box = box_of(region)  # the masked means on its box: the same sums and count (issue 27)
        measured = color_name(cv2.mean(img[box], mask=region[box])[:3])
        # neither the measured nor the annotated color: either would leave the answer unchanged;
        # a target that does not read as its own name after the edit is not used
        choices = [c for c in EDIT_COLORS if c not in (measured, annotated)]
        for i in rng.permutation(len(choices)):
            target = choices[int(i)]
            out = recolor(img, region, target, p.attribute_min_saturation)
            if color_name(cv2.mean(out[box], mask=region[box])[:3]) == target:
                # color_before is the original's answer (the annotation), not the measured name
                return out, region, {"method": "hue-set", "region": "evidence", "affects": sample.meta["targets"],
                                     "new_value": target, "color_before": annotated}
        raise Skip("attribute_unreadable", f"no edit color reads as itself on this {measured} region")

    def _flip(self, sample: Sample, rng) -> tuple[np.ndarray, Any, dict]:
        out = cv2.flip(sample.arrays["image"], 1)  # the exact mirror, as [:, ::-1] (issue 27: ~10x faster)
        return out, None, {"method": "mirror", "region": "global", "affects": ["*"]}

    def _count(self, sample: Sample, rng) -> tuple[np.ndarray, Any, dict]:
        inst = sample.arrays["instance_masks"]
        n = len(inst)
        if n < 2:
            raise Skip("not_applicable", f"count edits need 2+ instances, found {n}")
        k = int(rng.integers(1, n))
        chosen = np.sort(rng.choice(n, size=k, replace=False))
        removed = np.zeros(inst.shape[1:], np.uint8)
        for i in chosen:
            removed |= inst[i]
        kept = (inst.sum(axis=0) > 0) & (removed == 0)
        px = int(sample.meta["mask"]["dilate_px"])
        region = cv2.dilate(removed * 255, disk(px))
        region[kept] = 0  # never paint over an instance that stays
        img, mask = sample.arrays["image"], sample.arrays["mask"]
        # The region lies inside the evidence mask (the same dilation of a subset of the same
        # instances), so remove's fill serves here too; it was made with every instance as a
        # hole, so no kept instance's color bleeds into the fill.
        if cv2.countNonZero(cv2.bitwise_and(region, cv2.bitwise_not(mask))):
            filled = self._inpaint(img, region, self._annotated(sample))
        else:
            filled = self._evidence_filled(sample)
        out = img.copy()
        _paste(out, filled, region)
        return out, region, {"method": self._method, "region": "instances", "inpainted": True,
                             "affects": sample.meta["targets"], "removed_instances": k,
                             "remaining_instances": n - k, "removed_indices": [int(i) for i in chosen]}

    def _insert(self, sample: Sample, rng) -> tuple[np.ndarray, Any, dict]:
        if self.run.cutouts and is_photo(sample):  # a real object on a photograph (issue 31)
            return insert_cutout(sample, self.run.cutouts, rng)
        img = sample.arrays["image"]
        h, w = img.shape[:2]
        present = {a["category"] for a in sample.meta.get("annotated", [])} | set(sample.meta["targets"])
        shapes = [s for s in scenes.SHAPES if s not in present]
        if not shapes:
            raise Skip("not_applicable", "every insertable shape is already annotated in this image")
        shape = shapes[int(rng.integers(len(shapes)))]
        color = EDIT_COLORS[int(rng.integers(len(EDIT_COLORS)))]
        r = max(6.0, self.params.insert_scale * min(h, w))
        poly, obj, region = place_shape(sample, shape, r, rng, self.params.insert_tries)
        # Feathered alpha compositing. OpenCV's seamlessClone (Poisson) was the first choice, but
        # in OpenCV 5.0.0 identical calls returned different pixels (3 distinct outputs in 8
        # calls, single-threaded), which would break byte-identical reruns.
        # Only the region's bounding box is blended: the blur reads 3 px around the object, and
        # the region reaches 6 px past it, so the box gives the same pixels as the whole image.
        y0, y1, x0, x1 = bbox(region)
        win = (slice(y0, y1), slice(x0, x1))
        alpha = cv2.GaussianBlur(obj[win].astype(np.float32), (0, 0), 0.8)
        sel = region[win] > 0
        alpha[~sel] = 0.0
        paint, look = insert_paint(img, obj, region, sample.arrays.get("mask_core"), color, r, rng,
                                   original_look(sample))
        # alpha as three planes, not numpy's broadcasting of a trailing axis (issue 27, s28fill):
        # the same float32 products and sum; OpenCV's saturating conversion rounds half to even
        # as np.clip(np.rint(...)) did
        a3 = cv2.merge([alpha] * 3)
        blended = cv2.add(a3 * paint + (1 - a3) * img[win].astype(np.float32), 0, dtype=cv2.CV_8U)
        out = img.copy()
        _paste(out[win], blended, sel.view(np.uint8))
        # what the object reads as in the output, not what was asked for (shading can darken a
        # cyan into a blue; on a grayscale photograph it is gray)
        seen = color_name(cv2.mean(out[win], mask=obj[win].astype(np.uint8))[:3])  # obj lies inside the box
        return out, region, {"method": look.pop("method"), "region": "inserted", "affects": [shape],
                             "inserted_category": shape, "inserted_instances": 1,
                             "new_value": seen, "polygon": poly} | look

    def _swap(self, sample: Sample, rng) -> tuple[np.ndarray, Any, dict]:
        inst = sample.arrays["instance_masks"]
        if len(inst) != 1:
            raise Skip("not_applicable", f"swap needs exactly one evidence instance, found {len(inst)}")
        img = sample.arrays["image"]
        h, w = img.shape[:2]
        a = inst[0].astype(bool)
        side_a = side_of(a)
        if side_a is None:
            raise Skip("not_applicable", "the evidence is too central for a left/right swap")
        others = []
        # the evidence's own annotation (a purple star; another star of another color is a third object)
        ev = [(i.get("box"), i.get("polygons")) for i in sample.meta["instances"]]
        moved = [j for j, o in enumerate(sample.meta.get("annotated", [])) if (o.get("box"), o.get("polygons")) in ev]
        for j, o in enumerate(sample.meta.get("annotated", [])):
            if o["category"] in sample.meta["targets"] or not o.get("polygons"):
                continue
            b = np.zeros((h, w), bool)
            for poly in o["polygons"]:
                b |= scenes.polygon_mask(poly, w, h)
            if b.any() and not (b & a).any() and side_of(b) not in (None, side_a):
                others.append((o["category"], b, j))
        if not others:
            raise Skip("not_applicable", "no annotated object with a polygon on the other side to swap with")
        cat_b, b, j = others[int(rng.integers(len(others)))]
        (xa, ya), (xb, yb) = _centroid(a), _centroid(b)
        dx, dy = int(round(xb - xa)), int(round(yb - ya))
        a_to = _shift(a, dx, dy)
        b_to = _shift(b, -dx, -dy)
        if (_count(a_to) != _count(a) or _count(b_to) != _count(b)
                or cv2.countNonZero(cv2.bitwise_and(a_to.view(np.uint8), b_to.view(np.uint8)))):
            raise Skip("not_applicable", "the swapped objects would leave the image or overlap")
        side_new = side_of(a_to)
        if side_new in (None, side_a):
            raise Skip("not_applicable", "the swap would not move the evidence to the other side")
        px = int(sample.meta["mask"]["dilate_px"])
        hole_a = cv2.dilate(a.astype(np.uint8) * 255, disk(px))
        hole_b = cv2.dilate(b.astype(np.uint8) * 255, disk(px))
        hole = hole_a | hole_b
        # every other object stays whole: neither moved onto nor inpainted over (issue 31)
        touched = hole.copy()
        touched[a_to | b_to] = 255
        third = cv2.bitwise_and(annotated_keepout(sample, skip=(*moved, j)), touched)
        if cv2.countNonZero(third):
            raise Skip("swap_blocked", f"the swap would cover or inpaint {cv2.countNonZero(third)} px of "
                       "another annotated object (or its box)")
        mask = sample.arrays["mask"]
        if not cv2.countNonZero(cv2.bitwise_xor(hole_a, mask)):
            # a's hole is the evidence mask (a is its only instance): start from remove's fill
            # and inpaint only the part of b's hole outside it
            rest = cv2.bitwise_and(hole_b, cv2.bitwise_not(mask))
            filled = self._evidence_filled(sample)
            out = self._inpaint(filled, rest, self._annotated(sample)) if cv2.countNonZero(rest) else filled.copy()
        else:
            out = self._inpaint(img, hole, self._annotated(sample))
        _paste(out, _shift(img, dx, dy), a_to.view(np.uint8))  # exact pixel copies, integer translation
        _paste(out, _shift(img, -dx, -dy), b_to.view(np.uint8))
        region = hole.copy()
        region[a_to | b_to] = 255
        return out, region, {"method": f"cut-paste+{self._method}", "region": "swap",
                             "affects": sample.meta["targets"], "new_value": side_new, "swapped_with": cat_b,
                             "translation": [dx, dy]}


class _LazyRng:
    """``np.random.default_rng(seed)``, made when an edit first draws from it (issue 27: half the
    edits draw nothing, and a generator costs ~30 us to seed); the same draws."""

    def __init__(self, seed: list[int]) -> None:
        self._seed, self._rng = seed, None

    def __getattr__(self, name: str) -> Any:  # only for names not found: the generator's
        if name.startswith("_"):  # its own fields (before __init__ ran: copy, pickle) and dunders
            raise AttributeError(name)
        if self._rng is None:
            self._rng = np.random.default_rng(self._seed)
        value = getattr(self._rng, name)
        setattr(self, name, value)  # its bound method, found directly from now on
        return value


def insert_paint(img: np.ndarray, obj: np.ndarray, region: np.ndarray, core: np.ndarray | None, color: str,
                 r: float, rng: np.random.Generator,
                 look_of: tuple[tuple[float | None, bool], bool] | None = None) -> tuple[np.ndarray, dict]:
    """The pixels an inserted object is painted with over ``region``'s bounding box (float32
    RGB, before the feathered blend), and how (the edit record's ``method`` and look fields).

    The object takes the character of the objects really in the image. Where they are drawn
    flat (a procedural scene: the evidence's interior has < ``footprint.PHOTO_OBJECT_TEXTURE``
    of its ring's texture), it is drawn flat in its named color, as they are. Where they are
    photographed, it is lit and grained like its spot: (1) shading: its color times the local
    low-frequency luminance of the background under it (Gaussian, sigma r/2) over that
    luminance's mean on the object, and an exposure that follows the spot's brightness half-way
    (sqrt(L / 128), 0.45..1: no glowing sticker in a night sky); (2) grain: seeded Gaussian
    luminance noise, scaled so the object's high-pass energy is the ring's times the real
    object's own texture ratio (at most 1): an object as textured, relative to its surroundings,
    as the one the photographer caught. On an achromatic image (a grayscale photograph) the
    object is gray, its level 90 away from the spot's luminance, and every channel equal."""
    y0, y1, x0, x1 = bbox(region)
    win = (slice(y0, y1), slice(x0, x1))
    (ref, _), gray_img = look_of or (footprint.object_texture(img, core), footprint.achromatic(img))
    photo = ref is None or ref >= footprint.PHOTO_OBJECT_TEXTURE
    albedo = np.array(scenes.COLORS.get(color, (220, 40, 40)), np.float32)
    if not photo and not gray_img:
        return np.broadcast_to(albedo, (y1 - y0, x1 - x0, 3)), {"method": "feathered-alpha", "albedo": color}
    h, w = obj.shape
    sigma = max(2.0, r / 2)
    pad = max(int(3 * sigma) + 1, 16)  # the ring (8 px) and its high-pass (6 px) lie inside
    py0, py1, px0, px1 = max(0, y0 - pad), min(h, y1 + pad), max(0, x0 - pad), min(w, x1 + pad)
    lum = footprint.gray(img[py0:py1, px0:px1])
    low = cv2.GaussianBlur(lum, (0, 0), sigma)[y0 - py0:y1 - py0, x0 - px0:x1 - px0]
    o = obj[win].astype(np.uint8)
    spot = max(cv2.mean(low, mask=o)[0], 1.0)
    shade = np.clip(low / spot, 0.6, 1.4)
    look: dict[str, Any] = {"method": "feathered-alpha+shade+grain"}
    if gray_img:
        level = spot - 90 if spot >= 128 else spot + 90
        base = np.float32(np.clip(level, 16, 240))
        look["albedo"] = "gray"
    else:
        base = albedo * np.float32(np.clip(np.sqrt(spot / 128), 0.45, 1.0))
        look["albedo"] = color
    paint = base * shade[..., None]
    # grain: the ring's high-pass energy (footprint.highpass, the measure verify reads) times the
    # real object's texture ratio; the noise is scaled by its own measured energy, and its grain
    # size (a blur of white noise) is the one whose fine-to-coarse energy ratio is the ring's
    around = footprint.ring(region[py0:py1, px0:px1], 8)
    share = 1.0 if ref is None else min(ref, 1.0)
    target = cv2.mean(footprint.highpass(img[py0:py1, px0:px1]), mask=around)[0] * share
    want = _band_ratio(lum, around)
    white = rng.standard_normal((y1 - y0, x1 - x0)).astype(np.float32)
    grains = [cv2.GaussianBlur(white, (0, 0), s) for s in _GRAIN_SIGMAS]
    k = int(np.argmin([abs(_band_ratio(n, o) - want) for n in grains]))
    noise = grains[k]
    unit = cv2.mean(cv2.absdiff(noise, cv2.GaussianBlur(noise, (0, 0), 1.5)), mask=o)[0]
    amp = target / unit if unit > 0 else 0.0
    paint = paint + np.float32(amp) * noise[..., None]
    look |= {"grain": round(float(amp), 3), "grain_sigma": _GRAIN_SIGMAS[k], "object_texture_ratio": ref}
    return paint, look


_GRAIN_SIGMAS = (0.35, 0.5, 0.7, 1.0, 1.4)  # grain sizes an insert's noise is drawn at


def _band_ratio(g: np.ndarray, mask: np.ndarray) -> float:
    """Fine over coarse high-pass energy of ``g`` in ``mask``: high for pixel-sized grain,
    lower for coarser texture (what picks the grain size of an inserted object)."""
    fine = cv2.mean(cv2.absdiff(g, cv2.GaussianBlur(g, (0, 0), 0.7)), mask=mask)[0]
    coarse = cv2.mean(cv2.absdiff(g, cv2.GaussianBlur(g, (0, 0), 1.5)), mask=mask)[0]
    return fine / coarse if coarse > 0 else 0.0


def _count(m: np.ndarray) -> int:
    """Pixels of a bool mask (its sum), counted by OpenCV."""
    return cv2.countNonZero(m.view(np.uint8))


def _centroid(m: np.ndarray) -> tuple[float, float]:
    """(mean column, mean row) of a bool mask's pixels from OpenCV's moments: sums of integer
    coordinates, exact in float64, so the same floats as the means of ``np.nonzero``'s (as
    ``rules.side_of`` reads them; issue 27)."""
    m8 = m.view(np.uint8)
    x, y, w, h = cv2.boundingRect(m8)  # on its box: the offset times the count added back, exactly
    mo = cv2.moments(m8[y:y + h, x:x + w], binaryImage=True)
    return (mo["m10"] + x * mo["m00"]) / mo["m00"], (mo["m01"] + y * mo["m00"]) / mo["m00"]


def _shift(arr: np.ndarray, dx: int, dy: int) -> np.ndarray:
    """Integer translation of a mask or image (exact pixel copies); what moves past the
    border is lost, which the caller checks."""
    out = np.zeros_like(arr)
    h, w = arr.shape[:2]
    ys, xs = slice(max(0, dy), min(h, h + dy)), slice(max(0, dx), min(w, w + dx))
    yd, xd = slice(max(0, -dy), min(h, h - dy)), slice(max(0, -dx), min(w, w - dx))
    out[ys, xs] = arr[yd, xd]
    return out
