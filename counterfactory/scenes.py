"""Seeded procedural scenes: flat-colored shapes on a muted textured background.

Used by tests, benchmarks and the demo, so everything is a pure function of ``(seed, index, size)``:
``scene_spec`` is cheap (geometry only, JSON-serializable), ``render_scene`` turns a spec into pixels.
Objects are painted with exactly the rasterization of ``polygon_mask``, so a mask is ground truth.
"""

from __future__ import annotations

import functools
import json
import math
import re
from typing import Any

import cv2
import numpy as np

from counterfactory.rules import side_of_x

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "hexagon")
# Saturated colors (channel spread >= 130); the background is kept low-saturation, so no
# background pixel can ever equal an object color.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (150, 60, 200),
    "cyan": (30, 190, 200),
}
GAP = 6  # min background pixels between two objects
BORDER = 4  # min background pixels between an object and the image edge
# Rounding a vertex moves it <= 0.71 px and LINE_8 edges stray <= 0.5 px more, so a rasterized
# shape lies within radius + 1.21 of its center: these slacks keep the pixel-level guarantees.
_SLACK = 2
_URI = re.compile(r"^procedural://(\d+)/(\d+)(?:\?size=(\d+)x(\d+))?$")


def _points(polygon: Any) -> np.ndarray:
    """A polygon's vertices as OpenCV rasterizes them (rounded to whole pixels)."""
    return np.round(np.asarray(polygon, dtype=np.float64)).astype(np.int32).reshape(-1, 1, 2)


def polygon_mask(polygon: Any, width: int, height: int) -> np.ndarray:
    """HxW bool mask of a polygon; the single rasterization shared by rendering and masks."""
    mask = np.zeros((height, width), np.uint8)
    cv2.fillPoly(mask, [_points(polygon)], 1, lineType=cv2.LINE_8)
    return mask.view(bool)


def shape_polygon(shape: str, cx: float, cy: float, r: float, rot: float) -> list[list[float]]:
    """Vertices of ``shape`` inscribed in the circle (cx, cy, r), rotated by ``rot`` radians."""
    if shape == "star":
        k = np.arange(10)
        radii = np.where(k % 2 == 0, r, 0.45 * r)
        ang = rot - math.pi / 2 + k * math.pi / 5
    else:
        n = {"circle": 48, "square": 4, "triangle": 3, "hexagon": 6}[shape]
        radii = np.full(n, r)
        # Squares start flat (not diamond), triangles point up.
        start = {"square": math.pi / 4, "triangle": -math.pi / 2}.get(shape, 0.0)
        ang = rot + start + np.arange(n) * 2 * math.pi / n
    xs, ys = cx + radii * np.cos(ang), cy + radii * np.sin(ang)
    # tolist: Python floats at once, not a numpy scalar per coordinate (the same values)
    return [[round(x, 2), round(y, 2)] for x, y in zip(xs.tolist(), ys.tolist(), strict=True)]


def scene_spec(seed: int, index: int, size: tuple[int, int] = (256, 256)) -> dict:
    """Geometry and background parameters for scene ``index`` of ``seed`` (no pixels): a fresh
    dict each call. The reader makes a scene's record from its spec and ingest renders it from
    the spec again, in the same process in the plain loop and in a shard's task: the last few
    hundred specs are kept as JSON text (issue 27: ~0.4 ms of Python per spec, ~20 us to load)."""
    return json.loads(_spec_json(seed, index, int(size[0]), int(size[1])))


@functools.lru_cache(maxsize=256)
def _spec_json(seed: int, index: int, w: int, h: int) -> str:
    return json.dumps(_make_spec(seed, index, (w, h)))


def _pick(rng: np.random.Generator, items: list[str]) -> str:
    """``str(rng.choice(items))``, the same draw: ``Generator.choice`` of a list with replacement
    and no weights takes one ``integers(0, len(items))`` (int64) and indexes; this is that call
    alone (issue 27: choice's array conversion cost ~5x the draw; pinned by tests/test_scenes.py)."""
    return items[int(rng.integers(0, len(items), dtype=np.int64))]


def _make_spec(seed: int, index: int, size: tuple[int, int]) -> dict:
    w, h = int(size[0]), int(size[1])
    if min(w, h) < 32:
        raise ValueError(f"scene size {w}x{h} too small (min side 32)")
    rng = np.random.default_rng([seed, index])
    m = min(w, h)
    background = {
        "base": [int(v) for v in rng.integers(100, 180) + rng.integers(-15, 16, 3)],
        "gradient": [round(float(v), 2) for v in rng.uniform(-25, 25, 2)],  # total change in x, y
        "pattern": _pick(rng, ["stripes", "checker"]),
        "period": int(rng.integers(8, 24)),
        "angle": round(float(rng.uniform(0, math.pi)), 3),
        "pattern_amp": round(float(rng.uniform(3, 8)), 2),
        "noise_amp": round(float(rng.uniform(3, 7)), 2),
        "noise_seed": int(rng.integers(2**31)),
    }
    placed: list[tuple[float, float, float]] = []  # (cx, cy, r) bounding circles
    objects: list[dict] = []
    free_colors = list(COLORS)
    for _ in range(int(rng.integers(1, 6))):
        counts = {s: sum(o["category"] == s for o in objects) for s in SHAPES}
        repeatable = [s for s in SHAPES if 0 < counts[s] < 3]
        # Repeat a shape ~40% of the time so count questions get answers 2 and 3 (never more).
        pool = (
            repeatable
            if repeatable and rng.random() < 0.4
            else [s for s in SHAPES if counts[s] < 3]
        )
        shape = _pick(rng, pool)
        r = float(rng.uniform(0.05, 0.125)) * m
        spot = None
        for attempt in range(120):
            if attempt and attempt % 40 == 0:
                r = max(0.05 * m, r * 0.8)  # crowded: shrink before giving up
            lo = r + BORDER + _SLACK
            if lo > min(w, h) - 1 - lo:
                continue
            cx, cy = float(rng.uniform(lo, w - 1 - lo)), float(rng.uniform(lo, h - 1 - lo))
            if all(
                math.hypot(cx - px, cy - py) >= r + pr + GAP + 2 * _SLACK for px, py, pr in placed
            ):
                spot = (cx, cy, r)
                break
        if spot is None:
            continue  # no room left; fewer objects (the first always fits)
        placed.append(spot)
        color = free_colors.pop(int(rng.integers(len(free_colors))))  # distinct colors per scene
        tilt = {"square": 15, "triangle": 20, "star": 36, "hexagon": 30, "circle": 0}[shape]
        rot = math.radians(float(rng.uniform(-tilt, tilt)))
        objects.append(
            {
                "category": shape,
                "attributes": {"color": color},
                "polygon": shape_polygon(shape, *spot, rot),
            }
        )
    return {"width": w, "height": h, "background": background, "objects": objects}


def _background(bg: dict, w: int, h: int) -> np.ndarray:
    """Muted texture: tinted base + linear gradient + stripes/checker + smooth and fine noise."""
    rng = np.random.default_rng(bg["noise_seed"])
    x = np.arange(w, dtype=np.float32)[None, :] / w
    y = np.arange(h, dtype=np.float32)[:, None] / h
    gx, gy = bg["gradient"]
    p, a = bg["period"], float(bg["angle"])
    if bg["pattern"] == "stripes":
        pat = np.sin((x * (w * math.cos(a)) + y * (h * math.sin(a))) * np.float32(2 * math.pi / p))
    else:
        pat = ((np.arange(w)[None, :] // p) ^ (np.arange(h)[:, None] // p)) & 1
        pat = pat.astype(np.float32) * 2 - 1
    lum = gx * (x - 0.5) + gy * (y - 0.5) + np.float32(bg["pattern_amp"]) * pat
    lum += (rng.random((h, w), dtype=np.float32) - 0.5) * np.float32(2 * bg["noise_amp"])
    # Smooth per-channel blotches: coarse noise upsampled (bilinear is deterministic in cv2).
    coarse = (rng.random((max(2, h // 32), max(2, w // 32), 3), dtype=np.float32) - 0.5) * 16
    blotch = cv2.resize(coarse, (w, h), interpolation=cv2.INTER_LINEAR)
    # Per-channel cv2 ops instead of a broadcast HxWx3 float sum: ~3x faster. Values stay in
    # [37, 242] by construction, so convertScaleAbs is a plain rounding cast to uint8.
    lum = lum.astype(np.float32, copy=False)
    chans = [
        cv2.convertScaleAbs(cv2.add(lum, np.ascontiguousarray(blotch[:, :, c])), beta=b)
        for c, b in enumerate(bg["base"])
    ]
    return cv2.merge(chans)


def render_background(spec: dict) -> np.ndarray:
    """The scene with no object: exactly what lies under every object in ``render_scene``
    (the ground truth a removal is measured against)."""
    return _background(spec["background"], spec["width"], spec["height"])


def render_scene(spec: dict) -> np.ndarray:
    """HxWx3 uint8 RGB image of ``spec``; object pixels are exactly their ``polygon_mask``."""
    w, h = spec["width"], spec["height"]
    img = _background(spec["background"], w, h)
    for obj in spec["objects"]:
        # drawn in place with polygon_mask's rasterization (issue 27: no whole-image mask and
        # boolean index per object; the same pixels, pinned by a test)
        cv2.fillPoly(img, [_points(obj["polygon"])], tuple(int(c) for c in COLORS[obj["attributes"]["color"]]),
                     lineType=cv2.LINE_8)
    return img


def scene_questions(spec: dict, n: int, seed: int) -> list[dict]:
    """Up to ``n`` distinct questions about present objects, mixing kinds round-robin."""
    objs, w = spec["objects"], spec["width"]
    by_shape: dict[str, list[dict]] = {}
    for o in objs:
        by_shape.setdefault(o["category"], []).append(o)
    pool: dict[str, list[tuple[str, str, str]]] = {
        k: [] for k in ("existence", "count", "color", "position")
    }
    for shape, group in sorted(by_shape.items()):
        pool["existence"].append((f"Is there a {shape} in the image?", "yes", shape))
        for o in group:
            c = o["attributes"]["color"]
            pool["existence"].append((f"Is there a {c} {shape} in the image?", "yes", shape))
        pool["count"].append((f"How many {shape}s are there?", str(len(group)), shape))
        if len(group) == 1:
            pool["color"].append(
                (f"What color is the {shape}?", group[0]["attributes"]["color"], shape)
            )
            cx = float(np.mean(np.asarray(group[0]["polygon"], np.float64)[:, 0]))
            side = side_of_x(cx, w)
            if side:
                pool["position"].append((f"Is the {shape} on the left or the right?", side, shape))
    rng = np.random.default_rng([seed, 0x5CE4E])
    for items in pool.values():
        rng.shuffle(items)
    out: list[dict] = []
    while len(out) < n and any(pool.values()):
        # One question per kind per round, kinds in random order: keeps the mix varied.
        for kind in rng.permutation(list(pool)):
            if pool[kind] and len(out) < n:
                q, a, shape = pool[kind].pop()
                out.append({"question": q, "answer": a, "kind": str(kind), "targets": [shape]})
    return out


def scene_record(
    seed: int, index: int, size: tuple[int, int] = (256, 256), n_questions: int = 2
) -> dict:
    """A dataset record for a procedural scene; the image is a ``procedural://`` URI."""
    spec = scene_spec(seed, index, size)
    qseed = int(np.random.default_rng([seed, index, 1]).integers(2**31))
    return {
        "image": f"procedural://{seed}/{index}?size={spec['width']}x{spec['height']}",
        "width": spec["width"],
        "height": spec["height"],
        "objects": spec["objects"],
        # every object of a scene is annotated: "no triangle" and "0 stars" are ground truth
        "exhaustive": "*",
        "questions": scene_questions(spec, n_questions, qseed),
    }


def parse_procedural_uri(uri: str) -> tuple[int, int, tuple[int, int]]:
    """``procedural://SEED/INDEX?size=WxH`` -> (seed, index, (W, H)); size defaults to 256x256."""
    m = _URI.match(uri)
    if not m:
        raise ValueError(f"not a procedural:// image URI: {uri!r}")
    w, h = (int(m[3]), int(m[4])) if m[3] else (256, 256)
    return int(m[1]), int(m[2]), (w, h)
