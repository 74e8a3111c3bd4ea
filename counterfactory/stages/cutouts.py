"""Real objects inserted on photographs (issue 31): the cut-out bank and the insert made from it.

A flat star pasted on a photograph teaches "geometric shape = the inserted object" and asks about
a category no photo has. On a photograph the CPU ``insert`` pastes a real object instead: a
cut-out of an annotated instance of another input of the run, or one from a configured folder.

The bank (``pipeline.cutout_bank.build_bank``) is made once, in the driver, when the run's settings are made
(``PipelineConfig.run_settings``), and travels to every worker inside ``RunSettings``: a
bounded list (``MAX_BANK`` entries, ``MAX_PER_CATEGORY`` each) of small references (category,
source image, polygons, the object's share of its image), never pixels. So every worker sees the
same bank whatever slice it reads, a sample's insert depends only on the bank, the run seed and
its key, and memory stays bounded: a worker decodes a cut-out's source when an insert first
needs it and keeps the last ``_CACHE`` crops.

Sources (the edit stage's ``cutouts`` parameter):
- ``"run"``: every whole annotated instance with a polygon in the run's image manifests (the
  first ``MAX_LINES`` lines of each, local and ``pkg:`` images only: the driver reads their
  headers for the frame size). An instance whose polygon touches its image's border is cut off
  by the frame (half a cat, a tower without a top) and is left out: a truncated object pasted
  whole-looking is a tell.
- a folder: ``FOLDER/<category>/<name>.png``, RGBA cut-outs (the alpha is the object), sorted.
- ``None``: no bank; photos get the drawn shapes as before.

The insert (``insert_cutout``): a category the image neither annotates nor asks about, drawn
from the bank by the sample's seed; a cut-out of it from another image, scaled so its share of
the frame is its share of its own photo (within ``AREA_FRAC``), placed fully inside the frame
where it and a blending margin cover no annotated object nor its box, its foot in the
lower half of the frame (objects rest on something more often than they float: every scale is
tried there before any spot higher up), then lit like
its spot and grained like its ring (``cutout_paint``) and blended with a feathered alpha. On an
achromatic (grayscale) photograph the cut-out is made gray. Procedural scenes keep their drawn
shapes: their objects are drawn flat, and their bytes stay as they were.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from typing import Any

import cv2
import numpy as np

from counterfactory import footprint, scenes
from counterfactory.rules import color_name
from counterfactory.sample import Sample
from counterfactory.stages.shared import Skip, annotated_keepout

MAX_LINES = 2000  # manifest lines read per input for the bank
MAX_BANK = 64  # cut-outs in a bank, at most
MAX_PER_CATEGORY = 8
MIN_SIDE = 12  # px: a smaller instance is no cut-out
AREA_FRAC = (0.01, 0.06)  # an insert's share of the frame, at least / at most
SCALES = (1.0, 0.8, 0.64, 0.5, 0.4)  # tried in turn until the cut-out fits somewhere
FEATHER_PAD = 3  # px the feathered edge may reach past the object's box
MARGIN = 6  # px of blending margin around the object, kept off annotated objects too
_CACHE = 8  # decoded cut-outs kept per process
_cache: OrderedDict[tuple[str, str], tuple[np.ndarray, np.ndarray]] = OrderedDict()


# --- one cut-out's pixels (worker) ------------------------------------------------------------


def load_cutout(c: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """(RGB crop uint8, alpha float32 0..1) of a bank entry, cropped to the object's box."""
    key = (c["source"], json.dumps(c.get("polygons")))
    if key in _cache:
        _cache.move_to_end(key)
        return _cache[key]
    from PIL import Image, ImageOps

    from counterfactory.stages.shared import local_source

    with Image.open(local_source(c["source"])) as im:
        im.load()
        im = ImageOps.exif_transpose(im)
        if c.get("polygons") is None:
            rgba = np.asarray(im.convert("RGBA"))
            rgb, alpha = np.ascontiguousarray(rgba[..., :3]), rgba[..., 3].astype(np.float32) / 255
        else:
            rgb = np.asarray(im.convert("RGB"))
            h, w = rgb.shape[:2]
            m = np.zeros((h, w), bool)
            for p in c["polygons"]:
                m |= scenes.polygon_mask(p, w, h)
            alpha = m.astype(np.float32)
    ys, xs = np.nonzero(alpha > 0.5)
    if not len(ys):
        raise Skip("no_cutout", f"{c['source']}: the cut-out is empty")
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    out = (np.ascontiguousarray(rgb[y0:y1, x0:x1]), np.ascontiguousarray(alpha[y0:y1, x0:x1]))
    _cache[key] = out
    while len(_cache) > _CACHE:
        _cache.popitem(last=False)
    return out


# --- the insert (worker) ----------------------------------------------------------------------


def candidates(bank: tuple[dict[str, Any], ...], present: set[str], source: str) -> list[dict[str, Any]]:
    """Bank entries of categories the image does not show (by its annotations and its question)
    from another image."""
    return [c for c in bank if c["category"] not in present and c["source"] != source]


def _place(keepout: np.ndarray, shape: np.ndarray, rng: np.random.Generator,
           low: bool) -> tuple[int, int] | None:
    """A top-left corner where ``shape`` (bool, with its margin) lies inside the frame and off
    ``keepout``, drawn from all such corners; ``low``: only those whose foot is in the frame's
    lower half. None: no room."""
    h, w = keepout.shape
    sh, sw = shape.shape
    if sh > h or sw > w:
        return None
    hits = cv2.matchTemplate((keepout > 0).astype(np.float32), shape.astype(np.float32), cv2.TM_CCORR)
    ys, xs = np.nonzero(hits < 0.5)
    if not len(ys):
        return None
    if low:
        foot = ys + sh >= h / 2
        ys, xs = ys[foot], xs[foot]
        if not len(ys):
            return None
    i = int(rng.integers(len(ys)))
    return int(ys[i]), int(xs[i])


def cutout_paint(img: np.ndarray, rgb: np.ndarray, alpha: np.ndarray, y: int, x: int,
                 rng: np.random.Generator) -> tuple[np.ndarray, dict[str, Any]]:
    """The cut-out (``rgb`` at the top-left ``(y, x)``) lit like its spot and grained like its
    surroundings, float32 over its box: (1) exposure: its mean luminance moved half-way (in log)
    to the spot's low-frequency luminance, 0.6..1.5x; (2) shading: times the spot's light
    gradient across it (Gaussian, sigma a quarter of its size, over its mean; 0.75..1.25);
    (3) grain: seeded noise that brings its high-pass energy up to its ring's, never removes
    detail; gray on an achromatic photograph."""
    h, w = img.shape[:2]
    sh, sw = alpha.shape
    obj = (alpha > 0.5).astype(np.uint8)
    src = rgb.astype(np.float32)
    if footprint.achromatic(img):
        src = np.repeat(footprint.gray(rgb)[..., None], 3, axis=2)
    sigma = max(2.0, max(sh, sw) / 4)
    pad = int(3 * sigma) + 1
    py0, py1, px0, px1 = max(0, y - pad), min(h, y + sh + pad), max(0, x - pad), min(w, x + sw + pad)
    lum = footprint.gray(img[py0:py1, px0:px1])
    low = cv2.GaussianBlur(lum, (0, 0), sigma)[y - py0:y - py0 + sh, x - px0:x - px0 + sw]
    spot = max(cv2.mean(low, mask=obj)[0], 1.0)
    own = max(cv2.mean(footprint.gray(src.clip(0, 255).astype(np.uint8)), mask=obj)[0], 1.0)
    gain = float(np.clip(np.sqrt(spot / own), 0.6, 1.5))
    shade = np.clip(low / spot, 0.75, 1.25)
    paint = src * np.float32(gain) * shade[..., None]
    # grain: the ring's high-pass energy (the measure verify reads) against the cut-out's own
    region = np.zeros((py1 - py0, px1 - px0), np.uint8)
    region[y - py0:y - py0 + sh, x - px0:x - px0 + sw] = cv2.dilate(obj, footprint_disk(MARGIN))
    around = footprint.ring(region, 8)
    target = cv2.mean(footprint.highpass(img[py0:py1, px0:px1]), mask=around)[0]
    inner = footprint.interior(obj * 255)
    mine = cv2.mean(footprint.highpass(paint.clip(0, 255).astype(np.uint8)), mask=inner if inner.any() else obj)[0]
    amp = 0.0
    if target > mine:
        noise = cv2.GaussianBlur(rng.standard_normal((sh, sw)).astype(np.float32), (0, 0), 0.5)
        unit = cv2.mean(cv2.absdiff(noise, cv2.GaussianBlur(noise, (0, 0), 1.5)), mask=obj)[0]
        amp = float(np.sqrt(target**2 - mine**2) / unit) if unit > 0 else 0.0
        paint = paint + np.float32(amp) * noise[..., None]
    return paint, {"exposure": round(gain, 3), "grain": round(amp, 3)}


def _poly_box(polys: list | None) -> list[int] | None:
    """The integer box of an entry's polygons in its source image (which instance was cut out)."""
    if not polys:
        return None
    pts = np.concatenate([np.asarray(p, np.float64).reshape(-1, 2) for p in polys])
    return [int(np.floor(v)) for v in pts.min(axis=0)] + [int(np.ceil(v)) for v in pts.max(axis=0)]


def footprint_disk(px: int) -> np.ndarray:
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * px + 1, 2 * px + 1))


def is_photo(sample: Sample) -> bool:
    """Not a procedural scene (whose objects are drawn flat: they keep drawn inserts)."""
    return not str(sample.meta["source"]["image"]).startswith("procedural://")


def insert_cutout(sample: Sample, bank: tuple[dict[str, Any], ...],
                  rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """A real object pasted on the sample's image (see the module's docstring): (edited image,
    region mask 0/255, edit record); ``Skip`` when no cut-out fits."""
    img = sample.arrays["image"]
    keepout = annotated_keepout(sample) | sample.arrays["mask"]
    present = {a["category"] for a in sample.meta.get("annotated", [])} | set(sample.meta["targets"])
    pool = candidates(bank, present, sample.meta["source"]["image"])
    if not pool:
        raise Skip("no_cutout", f"no cut-out in the bank ({len(bank)}) of a category this image lacks")
    cats = sorted({c["category"] for c in pool})
    h, w = img.shape[:2]
    blocked = cv2.dilate(keepout, footprint_disk(MARGIN))
    # categories in a seeded order, a cut-out of each in a seeded order: the first that fits
    for ci in rng.permutation(len(cats)):
        cat = cats[int(ci)]
        mine = [c for c in pool if c["category"] == cat]
        for k in rng.permutation(len(mine)):
            c = mine[int(k)]
            rgb, alpha = load_cutout(c)
            ah, aw = alpha.shape
            frac = float(np.clip(c["area_frac"] or AREA_FRAC[1], *AREA_FRAC))
            base = min(1.0, np.sqrt(frac * h * w / max(float(alpha.sum()), 1.0)))  # never upscaled
            # a smaller object resting in the lower half before a bigger one floating higher up
            for low, s in ((low, s) for low in (True, False) for s in SCALES):
                size = (max(MIN_SIDE, round(aw * base * s)), max(MIN_SIDE, round(ah * base * s)))
                if size[0] > aw or size[1] > ah:
                    continue
                a = cv2.resize(alpha, size, interpolation=cv2.INTER_AREA)
                # the margin reaches past the object's box
                shape = cv2.dilate(np.pad((a > 0.02).astype(np.uint8), MARGIN), footprint_disk(MARGIN))
                spot = _place(blocked, shape, rng, low)
                if spot is None:
                    continue
                y, x = spot[0] + MARGIN, spot[1] + MARGIN
                r = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
                return _composite(img, r, a, y, x, c, rng)
    raise Skip("no_room_for_insert", f"no cut-out of {cats} fits clear of the annotated objects")


def _composite(img: np.ndarray, rgb: np.ndarray, alpha: np.ndarray, y: int, x: int, c: dict[str, Any],
               rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    h, w = img.shape[:2]
    full = alpha.shape[1]
    # a feathered edge: the polygon's hard cut softened over ~1 px; padded first, so the
    # feather also reaches past the object's box (inside the margin kept free for it)
    p = FEATHER_PAD
    rgb = cv2.copyMakeBorder(rgb, p, p, p, p, cv2.BORDER_REPLICATE)
    alpha = cv2.copyMakeBorder(alpha, p, p, p, p, cv2.BORDER_CONSTANT, value=0)
    y, x = y - p, x - p
    sh, sw = alpha.shape
    paint, look = cutout_paint(img, rgb, alpha, y, x, rng)
    a = cv2.GaussianBlur(alpha, (0, 0), 0.8)[..., None]
    win = (slice(y, y + sh), slice(x, x + sw))
    blended = np.clip(np.rint(a * paint + (1 - a) * img[win].astype(np.float32)), 0, 255).astype(np.uint8)
    out = img.copy()
    out[win] = blended
    obj = np.zeros((h, w), np.uint8)
    obj[win] = (alpha > 0.5).astype(np.uint8)
    region = np.zeros((h, w), np.uint8)
    region[win] = (a[..., 0] > 0).astype(np.uint8) * 255
    region = cv2.dilate(region, footprint_disk(1))
    out[region == 0] = img[region == 0]  # every pixel outside the region is the original's
    contours, _ = cv2.findContours(obj, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    poly = max(contours, key=cv2.contourArea).reshape(-1, 2)
    seen = color_name(cv2.mean(out, mask=obj)[:3])
    return out, region, {"method": "cutout+feathered-alpha+light+grain", "region": "inserted",
                         "affects": [c["category"]], "inserted_category": c["category"], "inserted_instances": 1,
                         "new_value": seen, "polygon": [[float(px), float(py)] for px, py in poly.tolist()],
                         "cutout": {"source": c["source"], "source_box": _poly_box(c.get("polygons")), "scale": round(full / max(1, load_cutout(c)[1].shape[1]), 4),
                                    "box": [x + p, y + p, x + sw - p, y + sh - p]}} | look
