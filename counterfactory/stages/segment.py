"""segment: pixel masks for every evidence instance, merged and dilated.

Embedded default: annotated polygons are rasterized exactly; a box without a polygon is refined
by GrabCut on a crop around it (seeded, so reruns agree), falling back to the box itself when
GrabCut finds too little foreground. The union is dilated: edges, halos and shadows betray a
removed object otherwise.
"""

from __future__ import annotations

import cv2
import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from counterfactory.sample import Sample, Stage
from counterfactory.scenes import polygon_mask
from counterfactory.stages import register
from counterfactory.stages.shared import set_evidence_mask


@register
class ClassicalSegment(Stage):
    name = "segment"
    backend = "default"

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        box_refine: str = Field("grabcut", pattern="^(grabcut|box)$")
        grabcut_iters: int = Field(4, ge=1, le=20)
        grabcut_min_fill: float = Field(0.15, ge=0, le=1, description="below this share of the box, use the box")
        dilate_px: int = Field(4, ge=0, description="fixed dilation margin in pixels")
        dilate_frac: float = Field(0.03, ge=0, le=0.5, description="extra margin as a share of sqrt(median instance area)")
        # GrabCut costs ~0.1 s a box: beyond this many boxes in one image the rest keep their
        # box as the mask (method "box_capped"), so a crowd of boxes cannot stall a worker
        grabcut_max_boxes: int = Field(32, ge=0, description="GrabCut calls per image at most")

    def __init__(self, params=None, run=None) -> None:
        super().__init__(params, run)
        cv2.setNumThreads(1)  # parallelism comes from Ray workers, not OpenCV threads

    def _grabcut(self, img: np.ndarray, box: list[int], seed: int) -> tuple[np.ndarray, str]:
        h, w = img.shape[:2]
        x0, y0, x1, y1 = box
        full = np.zeros((h, w), np.uint8)
        bw, bh = x1 - x0, y1 - y0
        if self.params.box_refine == "box" or bw < 8 or bh < 8:
            full[y0:y1, x0:x1] = 1
            return full, "box"
        # GrabCut needs background around the box; work on a crop for speed on large images
        m = max(8, int(0.25 * max(bw, bh)))
        cx0, cy0, cx1, cy1 = max(0, x0 - m), max(0, y0 - m), min(w, x1 + m), min(h, y1 + m)
        crop = np.ascontiguousarray(img[cy0:cy1, cx0:cx1, ::-1])  # BGR for OpenCV
        rect = (x0 - cx0, y0 - cy0, bw, bh)
        if rect[0] == 0 and rect[1] == 0 and rect[2] == crop.shape[1] and rect[3] == crop.shape[0]:
            full[y0:y1, x0:x1] = 1  # the box is the whole image: nothing to learn background from
            return full, "box"
        gc = np.zeros(crop.shape[:2], np.uint8)
        bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
        cv2.setRNGSeed(seed % 2**31)  # GrabCut's k-means init draws from OpenCV's global RNG (a C int)
        try:
            cv2.grabCut(crop, gc, rect, bgd, fgd, self.params.grabcut_iters, cv2.GC_INIT_WITH_RECT)
        except cv2.error:
            full[y0:y1, x0:x1] = 1
            return full, "box"
        fg = ((gc == cv2.GC_FGD) | (gc == cv2.GC_PR_FGD)).astype(np.uint8)
        if fg.sum() < self.params.grabcut_min_fill * bw * bh:
            full[y0:y1, x0:x1] = 1
            return full, "box"
        full[cy0:cy1, cx0:cx1] = fg
        return full, "grabcut"

    def process(self, sample: Sample) -> None:
        img = sample.arrays["image"]
        h, w = img.shape[:2]
        core = np.zeros((h, w), np.uint8)
        per_instance = []
        grabcuts = 0
        for i, inst in enumerate(sample.meta["instances"]):
            if inst.get("polygons"):
                # polygon_mask's own 0/1 buffer (a fresh array per call), the rest OR-ed in
                m = polygon_mask(inst["polygons"][0], w, h).view(np.uint8)
                for poly in inst["polygons"][1:]:
                    m |= polygon_mask(poly, w, h).view(np.uint8)
                method = "polygon"
            elif grabcuts >= self.params.grabcut_max_boxes and self.params.box_refine == "grabcut":
                x0, y0, x1, y1 = inst["box"]
                m = np.zeros((h, w), np.uint8)
                m[y0:y1, x0:x1] = 1
                method = "box_capped"
            else:
                m, method = self._grabcut(img, inst["box"], sample.seed + i)
                grabcuts += 1
            inst["mask_method"] = method
            inst["mask_area"] = cv2.countNonZero(m)  # a 0/1 mask: its sum (issue 27: OpenCV's count, not numpy's sum)
            core |= m
            per_instance.append(m)
        sample.arrays["instance_masks"] = np.stack(per_instance)  # 0/1, for edits of some instances
        set_evidence_mask(sample, core, self.params.dilate_px, self.params.dilate_frac)
