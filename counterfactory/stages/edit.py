"""edit: the counterfactual variants of one source.

Embedded default (OpenCV, CPU):
- ``remove``: the dilated evidence is inpainted away (Telea or Navier-Stokes);
- ``blackout``: the evidence is covered with a flat fill (DeFacto's counterfactual);
- ``random_mask``: the same fill over a region of equal area that does not touch the evidence
  (DeFacto's control: the answer must not change).
Every pixel outside the edited region is copied from the original, bit for bit.
"""

from __future__ import annotations

from typing import Literal

import cv2
import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from counterfactory.pipeline.sample import Sample, Stage
from counterfactory.stages import register

EditType = Literal["remove", "blackout", "random_mask"]


def inpaint(img: np.ndarray, mask: np.ndarray, radius: int, method: str, work_max_side: int) -> np.ndarray:
    """OpenCV inpainting, on a downscaled copy when the image is large (cost grows with mask
    area times radius squared; the fill is smooth anyway), pasted back inside the mask only."""
    flag = cv2.INPAINT_TELEA if method == "telea" else cv2.INPAINT_NS
    h, w = mask.shape
    # Work on the bounding crop of the mask plus a margin: inpainting reads only nearby pixels.
    ys, xs = np.nonzero(mask)
    pad = 4 * radius + 8
    y0, y1 = max(0, ys.min() - pad), min(h, ys.max() + 1 + pad)
    x0, x1 = max(0, xs.min() - pad), min(w, xs.max() + 1 + pad)
    crop, cmask = img[y0:y1, x0:x1], mask[y0:y1, x0:x1]
    ch, cw = cmask.shape
    scale = min(1.0, work_max_side / max(ch, cw))
    if scale < 1.0:
        sw, sh = max(1, round(cw * scale)), max(1, round(ch * scale))
        small = cv2.resize(crop, (sw, sh), interpolation=cv2.INTER_AREA)
        smask = (cv2.resize(cmask, (sw, sh), interpolation=cv2.INTER_NEAREST) > 0).astype(np.uint8)
        smask = cv2.dilate(smask, np.ones((3, 3), np.uint8))  # cover mask edges lost to resizing
        filled = cv2.inpaint(small, smask, radius, flag)
        filled = cv2.resize(filled, (cw, ch), interpolation=cv2.INTER_CUBIC)
    else:
        filled = cv2.inpaint(np.ascontiguousarray(crop), cmask, radius, flag)
    out = img.copy()
    sel = cmask > 0
    out[y0:y1, x0:x1][sel] = filled[sel]
    return out


def control_mask(evidence: np.ndarray, rng: np.random.Generator, tries: int, gap: int) -> np.ndarray | None:
    """A mask of the evidence's area that stays ``gap`` pixels clear of it: the evidence's own
    shape moved elsewhere, else an equal-area rectangle; None when nothing fits."""
    h, w = evidence.shape
    keepout = cv2.dilate(evidence, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * gap + 1,) * 2)) > 0
    ys, xs = np.nonzero(evidence)
    shape = evidence[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1] > 0
    area = int(shape.sum())
    candidates = [shape]
    for aspect in rng.uniform(0.5, 2.0, size=3):
        rw = int(round(np.sqrt(area * aspect)))
        rh = int(round(area / max(rw, 1)))
        if 0 < rw <= w and 0 < rh <= h:
            candidates.append(np.ones((rh, rw), bool))
    for cand in candidates:
        sh, sw = cand.shape
        if sh > h or sw > w:
            continue
        for _ in range(tries):
            y = int(rng.integers(0, h - sh + 1))
            x = int(rng.integers(0, w - sw + 1))
            if not (keepout[y : y + sh, x : x + sw] & cand).any():
                out = np.zeros((h, w), np.uint8)
                out[y : y + sh, x : x + sw][cand] = 255
                return out
    return None


@register
class ClassicalEdit(Stage):
    name = "edit"
    backend = "default"

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        variants: list[EditType] = Field(["remove", "blackout", "random_mask"], min_length=1)
        inpaint_method: Literal["telea", "ns"] = "telea"
        inpaint_radius: int = Field(5, ge=1, le=50)
        work_max_side: int = Field(384, ge=32, description="inpaint at most this size, then upscale into the mask")
        fill: tuple[int, int, int] = (0, 0, 0)
        control_tries: int = Field(64, ge=1)
        control_gap: int = Field(4, ge=0, description="pixels between the control region and the evidence")

    def __init__(self, params=None, run=None) -> None:
        super().__init__(params, run)
        cv2.setNumThreads(1)

    def process(self, sample: Sample) -> None:
        img, mask = sample.arrays["image"], sample.arrays["mask"]
        p = self.params
        fill = np.array(p.fill, np.uint8)
        sample.meta["variants"] = []
        sample.meta["edits"] = {}
        n = len(sample.meta["instances"])
        for v in p.variants:
            info: dict = {"region": "evidence", "removed_instances": n}
            if v == "remove":
                out = inpaint(img, mask, p.inpaint_radius, p.inpaint_method, p.work_max_side)
                info["method"] = f"opencv-{p.inpaint_method}"
            elif v == "blackout":
                out = img.copy()
                out[mask > 0] = fill
                info["method"] = "flat-fill"
            else:  # random_mask
                rng = np.random.default_rng([sample.seed, 7])
                ctrl = control_mask(mask, rng, p.control_tries, p.control_gap)
                if ctrl is None:
                    sample.reject_variant(self.name, v, "no_room_for_control",
                                          f"no region of area {int((mask > 0).sum())} clear of the evidence")
                    continue
                out = img.copy()
                out[ctrl > 0] = fill
                sample.arrays["mask/random_mask"] = ctrl
                info = {"region": "control", "removed_instances": 0, "method": "flat-fill"}
            sample.arrays[f"variant/{v}"] = out
            sample.meta["variants"].append(v)
            sample.meta["edits"][v] = info
