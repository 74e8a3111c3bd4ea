"""verify by re-detection: the pixel checks of the default, then the detector is run on the
EDITED image of every ``remove`` variant (never on the original) for the sample's targets.
A box of a target that overlaps the edited region and scores at or above ``redetect_threshold``
means the object is still there: that variant is rejected (``target_still_detected``). The best
score is kept in the sample's metrics either way (``redetect_score``), next to the same score on
the original (``redetect_score_orig``) when ``score_original`` is on, so a reader can see the drop.
The original was already detected by a detector ``localize``: its instances (with their scores)
are that detection, so it is scored from them and not run through the detector again
(``redetect_orig_source: localize``); only originals localized without scores (annotations) are
detected here (``redetect``). Every edited image of a batch goes through the detector together.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pydantic import Field

from counterfactory.sample import Sample
from counterfactory.stages import register
from counterfactory.stages.models.common import ModelParams, SplitStage
from counterfactory.stages.models.grounding import Detector, DetectorKind
from counterfactory.stages.models.invented import InventedParams, check_invented
from counterfactory.stages.verify import COUNTERFACTUALS, PixelVerify


def overlap_score(dets: list[dict[str, Any]], targets: list[str], mask: np.ndarray, min_overlap: float) -> float:
    """Best score of a target's box whose area lies at least ``min_overlap`` inside the mask."""
    best = 0.0
    h, w = mask.shape
    for d in dets:
        if d["phrase"] not in targets:
            continue
        x0, y0, x1, y1 = (int(round(c)) for c in d["box"])
        x0, y0, x1, y1 = max(0, x0), max(0, y0), min(w, x1), min(h, y1)
        if x1 <= x0 or y1 <= y0:
            continue
        inside = float((mask[y0:y1, x0:x1] > 0).mean())
        if inside >= min_overlap:
            best = max(best, d["score"])
    return best


@register
class RedetectVerify(SplitStage, PixelVerify):
    name = "verify"
    backend = "redetect"
    stateful = True

    class Params(PixelVerify.Params, ModelParams, InventedParams):  # issue 31: object_invented
        detector: DetectorKind = "grounding-dino"
        redetect_threshold: float = Field(0.35, ge=0, le=1, description="a target box scoring this much is still there")
        text_threshold: float = Field(0.25, ge=0, le=1)
        min_overlap: float = Field(0.5, ge=0, le=1, description="share of a box inside the edited region")
        variants: list[str] = Field(["remove"], description="variants whose target must be gone")
        score_original: bool = Field(True, description="also score the original, for the metrics")

    host_parts = ("before",)

    def __init__(self, params=None, run=None) -> None:
        super().__init__(params, run)
        self.detector = Detector(self.params.detector, self.params, self.backend)

    def describe(self) -> dict[str, Any]:
        return super().describe() | {"models": {"detector": self.detector.record}}

    def host_before(self, samples: list[Sample]) -> None:
        """The pixel checks (no detector time on failures) and the original's score from its
        localize detection: CPU work, run in a CPU step beside the detector's actor."""
        for s in samples:
            self.guarded(s, super().process)
        if not self.params.score_original:
            return
        for s in samples:
            if s.ok and all("score" in i for i in s.meta["instances"]):
                dets = [{"phrase": i["category"], "box": i["box"], "score": i["score"]} for i in s.meta["instances"]]
                s.meta["metrics"]["redetect_score_orig"] = round(
                    overlap_score(dets, s.meta["targets"], s.arrays["mask"], self.params.min_overlap), 4)
                s.meta["metrics"]["redetect_orig_source"] = "localize"

    def model_batch(self, samples: list[Sample]) -> None:
        check_invented(self, samples)  # issue 31: an object painted into a removal's region
        jobs: list[tuple[Sample, str]] = []
        for s in samples:
            if not s.ok:  # rejected by the pixel checks or by check_invented: nothing to detect
                continue
            if self.params.score_original and not all("score" in i for i in s.meta["instances"]):
                jobs.append((s, "orig"))
            jobs += [(s, v) for v in s.meta["variants"] if v in self.params.variants]
        if not jobs:
            return
        images = [s.arrays["image"] if v == "orig" else s.variant(v) for s, v in jobs]
        phrases = [list(s.meta["targets"]) for s, _ in jobs]
        dets, failures = self.detector.detect(images, phrases, box_threshold=0.0,
                                              text_threshold=self.params.text_threshold, nms_iou=0.5,
                                              max_detections=50)
        for i, (s, v) in enumerate(jobs):
            if not s.ok:
                continue
            metrics = s.meta["metrics"]
            if i in failures:
                if v != "orig":
                    s.reject_variant(self.name, v, *failures[i])
                continue
            score = round(overlap_score(dets[i], s.meta["targets"], s.arrays["mask"], self.params.min_overlap), 4)
            if v == "orig":
                metrics["redetect_score_orig"] = score
                metrics["redetect_orig_source"] = "redetect"
                continue
            metrics.setdefault(v, {})["redetect_score"] = score
            if score >= self.params.redetect_threshold:
                s.reject_variant(self.name, v, "target_still_detected",
                                 f"{self.detector.kind} score {score} >= {self.params.redetect_threshold} "
                                 f"for {s.meta['targets']} inside the edited region")
        for s in samples:
            if s.ok and not any(v in COUNTERFACTUALS for v in s.meta["variants"]):
                s.reject(self.name, "no_valid_counterfactual", "every counterfactual variant failed verification")
