"""Issue 27 (s28verify): localize's boxes from each object's polygons in Python (min/max over the
points, the polygons and box once per object) give what the numpy version gave, and the stage's
evidence and annotated lists are the same, on random annotations (ints and floats, several
polygons, boxes only, objects outside the image, non-finite points)."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest

from counterfactory.sample import Sample
from counterfactory.stages.localize import AnnotationLocalize, _clip_box, instance_polygons


def _numpy_clip_box(obj, w, h):
    """_clip_box as it was before (numpy's concatenate and reductions)."""
    polys = instance_polygons(obj)
    if polys:
        pts = np.concatenate([np.asarray(p, dtype=np.float64).reshape(-1, 2) for p in polys])
        x0, y0 = pts.min(axis=0)
        x1, y1 = pts.max(axis=0)
    elif "box" in obj and len(obj["box"]) == 4:
        x0, y0, x1, y1 = (float(v) for v in obj["box"])
    else:
        return None
    if not all(np.isfinite([x0, y0, x1, y1])) or x1 <= x0 or y1 <= y0:
        return None
    bx = [int(np.floor(max(0.0, x0))), int(np.floor(max(0.0, y0))),
          int(np.ceil(min(float(w), x1))), int(np.ceil(min(float(h), y1)))]
    if bx[2] - bx[0] < 1 or bx[3] - bx[1] < 1:
        return None
    return bx


def _random_object(rng: np.random.Generator, w: int, h: int, cat: str) -> dict:
    def point():
        x, y = rng.uniform(-0.3 * w, 1.3 * w), rng.uniform(-0.3 * h, 1.3 * h)
        return [int(x), int(y)] if rng.random() < 0.3 else [round(float(x), 2), round(float(y), 2)]

    o: dict = {"category": cat, "attributes": {"color": str(rng.choice(["red", "blue"]))}}
    kind = rng.integers(4)
    if kind == 0:
        o["polygon"] = [point() for _ in range(int(rng.integers(1, 9)))]
    elif kind == 1:
        o["polygons"] = [[point() for _ in range(int(rng.integers(2, 7)))] for _ in range(int(rng.integers(1, 4)))]
    elif kind == 2:
        x0, y0 = point()
        o["box"] = [x0, y0, x0 + float(rng.uniform(-5, 60)), y0 + float(rng.uniform(-5, 60))]
    else:
        o["polygon"] = [point() for _ in range(4)]
        if rng.random() < 0.5:
            o["polygon"][int(rng.integers(4))][int(rng.integers(2))] = float(rng.choice([math.inf, -math.inf, math.nan]))
    return o


@pytest.mark.parametrize("seed", range(30))
def test_clip_box_and_stage_equal_the_numpy_version(seed):
    rng = np.random.default_rng(seed)
    w, h = int(rng.integers(32, 300)), int(rng.integers(32, 300))
    objects = [_random_object(rng, w, h, str(rng.choice(["circle", "star", "square"])))
               for _ in range(int(rng.integers(1, 8)))]
    for o in objects:
        assert _clip_box(o, w, h) == _numpy_clip_box(o, w, h)
    meta = {"question": {"question": "Is there a circle or a star?", "kind": "existence"},
            "objects": copy.deepcopy(objects), "source": {"width": w, "height": h}}
    s = Sample(idx=0, key="k", status="ok", meta=meta)
    try:
        AnnotationLocalize().process(s)
    except Exception as exc:  # noqa: BLE001 - a reject is an outcome to compare too
        assert type(exc).__name__ == "Reject"
        return
    expected = [{"category": o["category"], "box": b} | ({"polygons": instance_polygons(o)} if instance_polygons(o) else {})
                for o in objects if (b := _numpy_clip_box(o, w, h))]
    assert s.meta["annotated"] == expected
    for inst in s.meta["instances"]:
        assert inst["box"] in [e["box"] for e in expected]
