"""edit for clips (``backend: video``): ``remove`` fills each masked pixel from the frames where
that pixel is background (per-pixel median, static camera), then inpaints once what no frame
shows, so the fill does not flicker; ``blackout`` flat fill; ``random_mask`` the neutral control
(``shared.control_variant``); ``reverse``, ``shuffle`` (seeded derangement of segments) and
``freeze`` (a held frame over the middle segment) need no model."""

from __future__ import annotations

from typing import Any, Literal

import cv2
import numpy as np
from pydantic import Field

from counterfactory.sample import Sample, Stage
from counterfactory.stages import register
from counterfactory.stages.shared import (
    FlatFillParams,
    Skip,
    control_variant,
    cv_inpaint,
    flat_fill,
)

VideoEditType = Literal["remove", "blackout", "random_mask", "reverse", "shuffle", "freeze"]
TEMPORAL_EDITS = ("reverse", "shuffle", "freeze")


def temporal_fill(frames: np.ndarray, masks: np.ndarray, radius: int = 3, method: str = "telea") -> tuple[np.ndarray, dict[str, float]]:
    """Fill every masked pixel from the frames where it is background (per-pixel median over
    them; static camera), then inpaint once what no frame shows. One background plate serves
    every frame, so the fill itself does not flicker. Pixels outside the masks are untouched."""
    sel = masks > 0
    union = sel.any(axis=0)
    out = frames.copy()
    if not union.any():
        return out, {"propagated_frac": 0.0, "inpainted_frac": 0.0}
    ys, xs = np.nonzero(union)
    stack = frames[:, ys, xs].astype(np.float32)  # T x P x 3
    hidden = sel[:, ys, xs]  # T x P
    stack[hidden] = np.nan
    seen = ~hidden.all(axis=0)
    plate = frames[0].copy()
    if seen.any():
        plate[ys[seen], xs[seen]] = np.round(np.nanmedian(stack[:, seen], axis=0)).astype(np.uint8)
    never = np.zeros(union.shape, np.uint8)
    never[ys[~seen], xs[~seen]] = 1
    if never.any():
        flag = cv2.INPAINT_TELEA if method == "telea" else cv2.INPAINT_NS
        filled = cv_inpaint(np.ascontiguousarray(plate), never, radius, flag)
        plate[never > 0] = filled[never > 0]
    for t in range(len(frames)):
        out[t][sel[t]] = plate[sel[t]]
    total = int(sel.sum())
    never_b = never.astype(bool)
    inpainted = int(sum(int((sel[t] & never_b).sum()) for t in range(len(frames))))
    return out, {"propagated_frac": round(1 - inpainted / total, 6), "inpainted_frac": round(inpainted / total, 6)}


def derangement(n: int, rng: np.random.Generator) -> list[int]:
    """A seeded permutation of ``range(n)`` that leaves no item in place (n >= 2)."""
    for _ in range(1000):
        perm = [int(i) for i in rng.permutation(n)]
        if all(p != i for i, p in enumerate(perm)):
            return perm
    return list(range(1, n)) + [0]


@register
class VideoEdit(Stage):
    name = "edit"
    backend = "video"

    class Params(FlatFillParams):
        flat_fill_after = ("inpaint_radius", "shuffle_segments")  # where config.yaml lists the flat-fill fields
        variants: list[VideoEditType] = Field(["remove", "blackout", "reverse", "shuffle", "freeze"], min_length=1)
        inpaint_method: Literal["telea", "ns"] = "telea"
        inpaint_radius: int = Field(3, ge=1, le=50)
        shuffle_segments: int = Field(4, ge=2, le=16)
        freeze_frac: float = Field(0.4, gt=0, lt=1, description="share of the clip held on one frame (the middle)")

    def __init__(self, params=None, run=None) -> None:
        super().__init__(params, run)
        cv2.setNumThreads(1)

    def process(self, sample: Sample) -> None:
        frames, masks = sample.arrays["video"], sample.arrays["masks"]
        m = sample.meta
        p = self.params
        n = len(frames)
        times = m["source"]["times"]
        rel = [round(t - times[0], 4) for t in times]
        sample.begin_variants()
        instances = m["instances"]
        for v in p.variants:
            region = None
            if v == "random_mask":
                try:
                    out, region, info = control_variant(sample, p)
                except Skip as skip:
                    sample.reject_variant(self.name, v, skip.reason, skip.detail)
                    continue
                info |= {"type": v, "removed_instances": 0}
            elif v in ("remove", "blackout"):
                if not instances:
                    sample.reject_variant(self.name, v, "no_evidence", "no annotated target to remove")
                    continue
                ev = [t for t in range(n) if masks[t].any()]
                info = {"type": v, "region": "evidence", "removed_instances": len(instances),
                        "removed": [f"{i['attributes'].get('color', '')} {i['category']}".strip() for i in instances],
                        "frames": [ev[0], ev[-1]], "t_start": rel[ev[0]], "t_end": rel[ev[-1]]}
                if v == "remove":
                    out, stats = temporal_fill(frames, masks, p.inpaint_radius, p.inpaint_method)
                    info.update(stats, method=f"temporal-median+opencv-{p.inpaint_method}")
                else:
                    out = flat_fill(frames, masks, p.fill)
                    info["method"] = "flat-fill"
            else:
                order, info = self._temporal(v, n, rel, np.random.default_rng([sample.seed, 11]))
                if order is None:
                    sample.reject_variant(self.name, v, "clip_too_short", info["detail"])
                    continue
                out = frames[order]
                info["frame_order"] = order
                info["removed_instances"] = 0
            sample.add_variant(v, np.ascontiguousarray(out), info, region)

    def _temporal(self, v: str, n: int, rel: list[float], rng: np.random.Generator) -> tuple[list[int] | None, dict[str, Any]]:
        p = self.params
        if v == "reverse":
            return list(range(n - 1, -1, -1)), {"type": v, "region": "whole_clip", "frames": [0, n - 1],
                                                "t_start": rel[0], "t_end": rel[-1]}
        if v == "shuffle":
            k = p.shuffle_segments
            if n < 2 * k:
                return None, {"detail": f"{n} frames < 2 x {k} segments"}
            bounds = [round(i * n / k) for i in range(k + 1)]
            perm = derangement(k, rng)
            order = [t for s in perm for t in range(bounds[s], bounds[s + 1])]
            return order, {"type": v, "region": "whole_clip", "frames": [0, n - 1], "t_start": rel[0], "t_end": rel[-1],
                           "segments": [[bounds[s], bounds[s + 1] - 1] for s in range(k)], "segment_order": perm}
        length = max(2, int(round(p.freeze_frac * n)))
        if n < length + 2:
            return None, {"detail": f"{n} frames too few to freeze {length}"}
        a = (n - length) // 2
        b = a + length - 1
        order = list(range(a)) + [a] * length + list(range(b + 1, n))
        return order, {"type": v, "region": "segment", "frames": [a, b], "t_start": rel[a], "t_end": rel[b],
                       "held_frame": a}
