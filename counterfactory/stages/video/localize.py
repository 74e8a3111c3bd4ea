"""localize for clips (``backend: video``): question targets matched to annotated objects; their
keyframe polygons/boxes become detections on the nearest sampled frame (optionally only every
``keyframe_every`` frames, as a detector run every N frames would see them)."""

from __future__ import annotations

from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from counterfactory.rules import classify_question, match_categories
from counterfactory.sample import Reject, Sample, Stage
from counterfactory.stages import register


def _kf_geometry(kf: dict[str, Any], sx: float, sy: float) -> dict[str, Any] | None:
    if isinstance(kf.get("polygon"), list) and len(kf["polygon"]) >= 3:
        return {"polygon": [[float(x) * sx, float(y) * sy] for x, y in kf["polygon"]]}
    if isinstance(kf.get("box"), list) and len(kf["box"]) == 4:
        x0, y0, x1, y1 = (float(v) for v in kf["box"])
        if x1 > x0 and y1 > y0:
            return {"box": [x0 * sx, y0 * sy, x1 * sx, y1 * sy]}
    return None


@register
class VideoLocalize(Stage):
    name = "localize"
    backend = "video"

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        keyframe_every: int | None = Field(None, ge=1, description="use annotations only on every N-th sampled frame "
                                           "(a detector run every N frames); None: every annotated keyframe")
        match_tolerance: float = Field(0.5, gt=0, le=2, description="keyframe-to-sampled-frame distance, in sampling intervals")

    def _frame_index(self, kf: dict[str, Any], times: np.ndarray, src_fps: float | None, step: float) -> int | None:
        if isinstance(kf.get("t"), int | float):
            t = float(kf["t"])
        elif isinstance(kf.get("frame"), int) and src_fps:
            t = kf["frame"] / src_fps
        else:
            return None
        i = int(np.argmin(np.abs(times - t)))
        return i if abs(times[i] - t) <= self.params.match_tolerance * step + 1e-6 else None

    def process(self, sample: Sample) -> None:
        m = sample.meta
        src = m["source"]
        objects = [o for o in m.get("objects", []) if isinstance(o, dict) and o.get("category")]
        categories = {str(o["category"]) for o in objects}
        kept, dropped = [], []
        targets: set[str] = set()
        if m.get("targets"):
            targets = set(match_categories(" ".join(m["targets"]), categories))
            if not targets:
                raise Reject("target_not_found", f"{m['targets']!r} matches none of {sorted(categories) or 'no annotations'}")
        for q in m["questions"]:
            if q.pop("kind_auto", False):
                q["kind"] = classify_question(q["question"])
            asked = " ".join(q["targets"]) if q.get("targets") else q["question"]
            found = match_categories(asked, categories)
            if not found and (q.get("targets") or q["kind"] in ("existence", "count", "color", "position", "direction")):
                dropped.append(f"{q['question']!r}: target not annotated")
                continue
            q["targets"] = found
            if not m.get("targets"):
                targets.update(found)
            kept.append(q)
        if not kept:
            raise Reject("target_not_found", "; ".join(dropped)[:400] or "no question left")
        if dropped:
            m.setdefault("notes", []).extend(f"localize: question dropped, {d}" for d in dropped)
        m["questions"] = kept
        times = np.asarray(src["times"], dtype=np.float64)
        step = 1.0 / src["fps"]
        sx, sy = src["scale"]
        src_fps = src.get("src_fps")
        every = self.params.keyframe_every
        detections: dict[str, list[dict[str, Any]]] = {}
        n_kf = n_used = 0
        for oi, o in enumerate(objects):
            if o["category"] not in targets:
                continue
            for kf in o.get("keyframes", []):
                if not isinstance(kf, dict):
                    continue
                n_kf += 1
                t = self._frame_index(kf, times, src_fps, step)
                geom = _kf_geometry(kf, sx, sy)
                if t is None or geom is None or (every and t % every):
                    continue
                n_used += 1
                detections.setdefault(str(t), []).append(
                    {"object": oi, "category": o["category"], "attributes": o.get("attributes", {}), **geom})
        if targets and not detections:
            raise Reject("no_keyframe_in_clip", f"none of {n_kf} keyframe(s) of {sorted(targets)} falls on a sampled frame")
        m["targets"] = sorted(targets)
        m["detections"] = detections
        m["tracking"] = {"keyframes_annotated": n_kf, "keyframes_used": n_used,
                         "detection_frames": sorted(int(k) for k in detections)}
        m.pop("objects", None)
