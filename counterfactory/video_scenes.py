"""Seeded short clips with exact per-frame masks: a real photograph (scikit-image, no download)
as a static background, one shape crossing it, and often a second one entering mid-clip.

Everything is a pure function of ``(seed, index, size, frames, fps)``: ``clip_spec`` is geometry
only (JSON-able), ``render_clip`` gives the frames, and ``clip_record`` the manifest-style record
with keyframe polygons on every frame (the tracker uses those on its detection frames only, so
the others are ground truth) and questions answered from the geometry.
"""

from __future__ import annotations

import functools
import math
import re
from typing import Any

import cv2
import numpy as np

from counterfactory import scenes
from counterfactory.scenes import COLORS, polygon_mask

# the shared shape rasterization (public name in newer scenes.py, private before)
_shape_polygon = getattr(scenes, "shape_polygon", None) or scenes._shape_polygon

PHOTOS = ("coffee", "astronaut", "chelsea", "rocket")
SHAPES = ("circle", "square", "star", "hexagon")
_URI = re.compile(r"^procedural-video://(\d+)/(\d+)\?size=(\d+)x(\d+)&frames=(\d+)&fps=(\d+)$")


def clip_uri(seed: int, index: int, size: tuple[int, int], frames: int, fps: int) -> str:
    return f"procedural-video://{seed}/{index}?size={size[0]}x{size[1]}&frames={frames}&fps={fps}"


def parse_clip_uri(uri: str) -> tuple[int, int, tuple[int, int], int, int]:
    m = _URI.match(uri)
    if not m:
        raise ValueError(f"not a procedural video uri: {uri!r}")
    s, i, w, h, n, f = (int(g) for g in m.groups())
    return s, i, (w, h), n, f


@functools.lru_cache(maxsize=8)
def _photo(name: str) -> np.ndarray:
    import skimage.data

    img = getattr(skimage.data, name)()
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    return np.ascontiguousarray(img[..., :3])


def _background(name: str, crop: list[float], w: int, h: int) -> np.ndarray:
    photo = _photo(name)
    ph, pw = photo.shape[:2]
    # the largest crop of the target aspect, placed by ``crop`` (fractions of the free room)
    cw = min(pw, int(ph * w / h))
    ch = min(ph, int(cw * h / w))
    x0 = int(crop[0] * (pw - cw))
    y0 = int(crop[1] * (ph - ch))
    return cv2.resize(photo[y0 : y0 + ch, x0 : x0 + cw], (w, h), interpolation=cv2.INTER_AREA)


def clip_spec(seed: int, index: int, size: tuple[int, int] = (256, 192), frames: int = 24, fps: int = 8) -> dict[str, Any]:
    w, h = int(size[0]), int(size[1])
    if min(w, h) < 64 or frames < 8:
        raise ValueError(f"clip {w}x{h}x{frames} too small (min side 64, 8 frames)")
    rng = np.random.default_rng([seed, index, 17])
    m = min(w, h)
    shapes = [str(s) for s in rng.permutation(SHAPES)[:2]]
    colors = [str(c) for c in rng.permutation(list(COLORS))[:2]]
    r_a = float(rng.uniform(0.09, 0.12)) * m
    right = bool(rng.random() < 0.5)
    xa0, xa1 = (0.18 * w, 0.82 * w) if right else (0.82 * w, 0.18 * w)
    objects = [{
        "category": shapes[0], "color": colors[0], "r": round(r_a, 2), "y": round(float(rng.uniform(0.22, 0.32)) * h, 2),
        "enter": 0, "x0": round(xa0, 2), "vx": round((xa1 - xa0) / (frames - 1), 4),
        "rot": round(math.radians(float(rng.uniform(-20, 20))), 4),
    }]
    if rng.random() < 0.75:  # a second object slides in from the side mid-clip
        r_b = float(rng.uniform(0.08, 0.11)) * m
        from_right = bool(rng.random() < 0.5)
        enter = int(rng.integers(1, frames // 4 + 1))
        speed = float(rng.uniform(0.06, 0.09)) * w
        objects.append({
            "category": shapes[1], "color": colors[1], "r": round(r_b, 2), "y": round(float(rng.uniform(0.66, 0.76)) * h, 2),
            "enter": enter, "x0": round(w + r_b if from_right else -r_b, 2), "vx": round(-speed if from_right else speed, 4),
            "rot": round(math.radians(float(rng.uniform(-20, 20))), 4),
        })
    return {
        "width": w, "height": h, "frames": frames, "fps": fps,
        "photo": str(rng.choice(PHOTOS)), "crop": [round(float(v), 3) for v in rng.uniform(0, 1, 2)],
        "objects": objects,
    }


def object_polygon(obj: dict[str, Any], t: int) -> list[list[float]] | None:
    """The polygon of ``obj`` on frame ``t`` (None before it enters)."""
    if t < obj["enter"]:
        return None
    cx = obj["x0"] + obj["vx"] * (t - obj["enter"])
    return _shape_polygon(obj["category"], cx, obj["y"], obj["r"], obj["rot"] + 0.05 * (t - obj["enter"]))


def object_masks(spec: dict[str, Any]) -> np.ndarray:
    """K x T x H x W bool: exact masks of every object on every frame (ground truth)."""
    w, h, n = spec["width"], spec["height"], spec["frames"]
    out = np.zeros((len(spec["objects"]), n, h, w), bool)
    for k, o in enumerate(spec["objects"]):
        for t in range(n):
            poly = object_polygon(o, t)
            if poly is not None:
                out[k, t] = polygon_mask(poly, w, h)
    return out


def render_clip(spec: dict[str, Any]) -> np.ndarray:
    bg = _background(spec["photo"], spec["crop"], spec["width"], spec["height"])
    masks = object_masks(spec)
    frames = np.repeat(bg[None], spec["frames"], axis=0)
    for k, o in enumerate(spec["objects"]):
        frames[masks[k]] = COLORS[o["color"]]
    return frames


def _mid_cross(obj: dict[str, Any], w: int, n: int) -> float | None:
    """Frame time at which the object's center crosses the middle of the frame."""
    if obj["vx"] == 0:
        return None
    t = obj["enter"] + (w / 2 - obj["x0"]) / obj["vx"]
    return t if obj["enter"] <= t <= n - 1 else None


def clip_record(seed: int, index: int, size: tuple[int, int] = (256, 192), frames: int = 24, fps: int = 8) -> dict[str, Any]:
    """A video-manifest-style record for clip ``index``: annotations on every frame, and
    questions (existence, direction, order, temporal) with answers from the geometry."""
    spec = clip_spec(seed, index, size, frames, fps)
    w, n = spec["width"], spec["frames"]
    objects, questions = [], []
    for o in spec["objects"]:
        kfs = []
        for t in range(n):
            poly = object_polygon(o, t)
            if poly is None:
                continue
            xs = [p[0] for p in poly]
            if max(xs) < 0 or min(xs) > w - 1:
                continue  # wholly outside the frame
            kfs.append({"frame": t, "polygon": poly})
        objects.append({"category": o["category"], "attributes": {"color": o["color"]}, "keyframes": kfs})
    a = spec["objects"][0]
    name_a = f"{a['color']} {a['category']}"
    questions.append({"question": f"Is there a {name_a} in the video?", "answer": "yes", "kind": "existence",
                      "targets": [a["category"]]})
    questions.append({"question": f"Does the {name_a} move to the left or to the right?",
                      "answer": "right" if a["vx"] > 0 else "left", "kind": "direction", "targets": [a["category"]]})
    if len(spec["objects"]) > 1:
        b = spec["objects"][1]
        ta, tb = _mid_cross(a, w, n), _mid_cross(b, w, n)
        if ta is not None and tb is not None and abs(ta - tb) >= 2:
            questions.append({
                "question": f"Does the {name_a} reach the middle of the frame before or after the {b['color']} {b['category']}?",
                "answer": "before" if ta < tb else "after", "kind": "order", "targets": [a["category"], b["category"]]})
    questions.append({"question": f"Does the {name_a} keep moving after it reaches the middle of the frame?",
                      "answer": "yes", "kind": "temporal", "targets": [a["category"]]})
    return {"video": clip_uri(seed, index, (spec["width"], spec["height"]), n, fps), "questions": questions,
            "objects": objects}
