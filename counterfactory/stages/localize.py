"""localize: map the question to the evidence it depends on.

Embedded default: the question's explicit targets, or question words matched to the image's
annotation categories (singular/plural, a small synonym table); every instance of a matched
category is evidence, narrowed by a color word when the question names one and the
annotations carry colors. Geometry is clipped to the image; instances wholly outside it are
dropped, and a question left with no evidence is rejected.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from counterfactory.rules import match_categories, singular, words
from counterfactory.sample import Reject, Sample, Stage
from counterfactory.stages import register


def instance_polygons(obj: dict[str, Any]) -> list[list[list[float]]]:
    if "polygons" in obj:
        return [p for p in obj["polygons"] if len(p) >= 3]
    if "polygon" in obj and len(obj["polygon"]) >= 3:
        return [obj["polygon"]]
    return []


def _clip_box(obj: dict[str, Any], w: int, h: int, polys: list[list[list[float]]] | None = None) -> list[int] | None:
    """The instance's box (its polygons' extent, else its box) clipped to the image; None when
    nothing of it is left. ``polys``: ``instance_polygons(obj)`` when the caller has them."""
    polys = instance_polygons(obj) if polys is None else polys
    if polys:
        # the extent in Python over the points (issue 27: numpy's concatenate and reductions
        # cost more than the few dozen points): min and max pick the same numbers as float64
        xs = [float(q[0]) for p in polys for q in p]
        ys = [float(q[1]) for p in polys for q in p]
        if not all(map(math.isfinite, xs + ys)):  # ingest rejects such a polygon; numpy's min read NaN as None too
            return None
        x0, y0, x1, y1 = min(xs), min(ys), max(xs), max(ys)
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


@register
class AnnotationLocalize(Stage):
    name = "localize"
    backend = "default"

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        use_color_words: bool = True
        min_box_side: int = Field(2, ge=1)

    def process(self, sample: Sample) -> None:
        m = sample.meta
        q = m["question"]
        objects = [o for o in m.get("objects", []) if isinstance(o, dict) and o.get("category")]
        categories = {str(o["category"]) for o in objects}
        if q.get("targets"):
            wanted = " ".join(str(t) for t in q["targets"])
            targets = match_categories(wanted, categories)
        else:
            targets = match_categories(q["question"], categories)
        if not targets:
            asked = q.get("targets") or q["question"]
            raise Reject("target_not_found", f"{asked!r} matches none of {sorted(categories) or 'no annotations'}")
        chosen = [o for o in objects if o["category"] in targets]
        if self.params.use_color_words and q.get("kind") != "color":
            qwords = set(words(q["question"]))
            colors = {singular(str(o.get("attributes", {}).get("color", ""))) for o in chosen} - {""}
            named = qwords & colors
            if named:
                chosen = [o for o in chosen if singular(str(o.get("attributes", {}).get("color", ""))) in named]
                if len(targets) == 1 and len(named) == 1:
                    # template questions must ask about the same narrowed evidence
                    m["target_phrase"] = f"{named.pop()} {targets[0]}"
        w, h = m["source"]["width"], m["source"]["height"]
        # each object's polygons and clipped box once (issue 27: the evidence's were made twice)
        geometry = {}
        for o in objects:
            polys = instance_polygons(o)
            geometry[id(o)] = polys, _clip_box(o, w, h, polys)
        instances, dropped = [], 0
        for o in chosen:
            polys, box = geometry[id(o)]
            if box is None or min(box[2] - box[0], box[3] - box[1]) < self.params.min_box_side:
                dropped += 1
                continue
            inst = {"category": o["category"], "box": box, "attributes": o.get("attributes", {})}
            if polys:
                inst["polygons"] = polys
            instances.append(inst)
        if not instances:
            raise Reject("box_outside_image", f"all {len(chosen)} instances of {targets} lie outside the {w}x{h} image or are empty")
        m["targets"] = targets
        m["instances"] = instances
        if dropped:
            m.setdefault("notes", []).append(f"localize: {dropped} instance(s) outside the image dropped")
        m.pop("objects", None)
        # every annotated object's box: an inserted object must not cover any of them
        m["annotated"] = [{"category": o["category"], "box": b} | ({"polygons": polys} if polys else {})
                          for o in objects for polys, b in (geometry[id(o)],) if b]
