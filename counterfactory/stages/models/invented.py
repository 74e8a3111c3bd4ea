"""verify: did the remover invent an object? (issue 31, the model side of ``object_invented``)

A remover that paints a new object into the hole makes the "no" of an existence question false.
After a removal, the EDITED image is searched by the run's detector (the ``redetect`` verifier's
Grounding DINO or OWLv2) for every category the input annotates besides the removed target (a
fill that reproduces the cup next to it) plus generic prompts ("object"); a box scoring at least
``invented_threshold`` that lies in the edited region rejects the variant as ``object_invented``.
"In the region" is OSOR's recipe (its verification: Grounding DINO at score 0.3, box IoU 0.3
with the changed region) or, for an object smaller than a large hole, most of its box inside
the region. The best such score is kept in the variant's metrics (``invented_score``) either way.
The target itself coming back is ``target_still_detected`` (the re-detection), not this.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pydantic import BaseModel, Field

from counterfactory.sample import Sample
from counterfactory.stages.verify import COUNTERFACTUALS


class InventedParams(BaseModel):
    invented_threshold: float | None = Field(
        0.3, ge=0, le=1, description="detector score of an object inside the edited region that rejects the "
        "variant as object_invented (OSOR: 0.3); null turns the check off")
    invented_iou: float = Field(0.3, ge=0, le=1, description="box IoU with the edited region's box (OSOR: 0.3)")
    invented_inside: float = Field(0.8, gt=0, le=1, description="or: share of the box inside the edited region")
    invented_prompts: list[str] = Field(["object"], description="generic phrases searched besides the "
                                        "categories the input annotates")
    invented_variants: list[str] = Field(["remove"], description="variants that must not gain an object")


def invented_phrases(s: Sample, prompts: list[str]) -> list[str]:
    """Every category the input annotates except the removed targets, then the generic prompts."""
    targets = set(s.meta.get("targets", []))
    cats = [str(a["category"]).lower() for a in s.meta.get("annotated", []) if a.get("category")]
    return list(dict.fromkeys([c for c in cats if c not in targets] + [p.lower() for p in prompts]))


def _box_of(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    ys, xs = np.nonzero(mask)
    if not len(xs):
        return None
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def invented_hit(dets: list[dict[str, Any]], region: np.ndarray, iou: float,
                 inside: float) -> tuple[float, dict[str, Any] | None]:
    """The best-scoring detection lying in the edited ``region`` (HxW, nonzero = edited): box IoU
    with the region's bounding box at least ``iou``, or at least ``inside`` of its area inside the
    region. A box that does not touch the region never counts. Returns (score, detection)."""
    rbox = _box_of(region > 0)
    if rbox is None:
        return 0.0, None
    h, w = region.shape
    rx0, ry0, rx1, ry1 = rbox
    best, hit = 0.0, None
    for d in dets:
        x0, y0, x1, y1 = (int(round(c)) for c in d["box"])
        x0, y0, x1, y1 = max(0, x0), max(0, y0), min(w, x1), min(h, y1)
        if x1 <= x0 or y1 <= y0:
            continue
        share = float((region[y0:y1, x0:x1] > 0).mean())
        if share == 0:
            continue
        ix = max(0, min(x1, rx1) - max(x0, rx0)) * max(0, min(y1, ry1) - max(y0, ry0))
        union = (x1 - x0) * (y1 - y0) + (rx1 - rx0) * (ry1 - ry0) - ix
        if (ix / union >= iou or share >= inside) and d["score"] > best:
            best, hit = float(d["score"]), d
    return best, hit


def check_invented(stage: Any, samples: list[Sample]) -> None:
    """Run ``stage.detector`` on the edited image of each of ``invented_variants`` still standing,
    one batch for all of them, and reject those with an object inside the edited region (and the
    sample, as ``no_valid_counterfactual``, when that leaves it no counterfactual)."""
    p = stage.params
    if p.invented_threshold is None:
        return
    jobs = [(s, v) for s in samples if s.ok for v in s.meta.get("variants", []) if v in p.invented_variants]
    if not jobs:
        return
    phrases = [invented_phrases(s, p.invented_prompts) for s, _ in jobs]
    dets, failures = stage.detector.detect([s.variant(v) for s, v in jobs], phrases, box_threshold=0.0,
                                           text_threshold=p.text_threshold, nms_iou=0.5, max_detections=50)
    for i, (s, v) in enumerate(jobs):
        if i in failures:
            s.reject_variant(stage.name, v, *failures[i])
            continue
        region = s.arrays.get(f"mask/{v}", s.arrays["mask"])
        score, hit = invented_hit(dets[i], region, p.invented_iou, p.invented_inside)
        score = round(score, 4)  # the figure recorded is the figure judged
        s.meta["metrics"].setdefault(v, {})["invented_score"] = score
        if hit is not None and score >= p.invented_threshold:
            s.reject_variant(stage.name, v, "object_invented",
                             f"{stage.detector.kind} found {hit['phrase']!r} (score {score} >= "
                             f"{p.invented_threshold}) in the edited region")
    for s in {id(s): s for s, _ in jobs}.values():
        if s.ok and not any(v in COUNTERFACTUALS for v in s.meta["variants"]):
            s.reject(stage.name, "no_valid_counterfactual", "every counterfactual variant failed verification")
