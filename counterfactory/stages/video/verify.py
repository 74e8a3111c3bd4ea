"""verify for clips (``backend: video``): pixels outside the masks unchanged, the object gone
(contrast), temporal flicker inside the mask; temporal edits really reorder frames and only
reuse original frames."""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from counterfactory.sample import Reject, Sample, Stage
from counterfactory.stages import register
from counterfactory.stages.shared import ring
from counterfactory.stages.video.edit import TEMPORAL_EDITS


def flicker(video: np.ndarray, region: np.ndarray) -> float | None:
    """Mean |frame t - frame t-1| (0-255, channel mean) over pixels in the region on both frames."""
    total, count = 0.0, 0
    for t in range(1, len(video)):
        sel = region[t] & region[t - 1]
        c = int(sel.sum())
        if c:
            d = np.abs(video[t][sel].astype(np.int16) - video[t - 1][sel].astype(np.int16)).mean()
            total += float(d) * c
            count += c
    return round(total / count, 4) if count else None


@register
class VideoVerify(Stage):
    name = "verify"
    backend = "video"

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        max_area_frac: float = Field(0.6, ge=0, le=1, description="largest evidence share of any one frame")
        max_outside_changed_frac: float = Field(0.0, ge=0, le=1)
        min_inside_mad: float = Field(6.0, ge=0)
        max_contrast_ratio: float = Field(0.8, ge=0)
        min_object_contrast: float = Field(12.0, ge=0)
        min_frames_moved_frac: float = Field(0.1, ge=0, le=1, description="temporal edits: share of frames that must differ")
        ring_px: int = Field(6, ge=1)

    def process(self, sample: Sample) -> None:
        p = self.params
        a, m = sample.arrays, sample.meta
        frames, masks = a["video"], a["masks"] > 0
        metrics: dict[str, Any] = {"mask_area_frac": m["mask"]["area_frac"], "max_mask_area_frac": m["mask"]["max_area_frac"],
                                   "tracking_keyframe_iou": m["tracking"].get("keyframe_iou_mean")}
        m["metrics"] = metrics
        if m["mask"]["max_area_frac"] > p.max_area_frac:
            raise Reject("mask_area_out_of_bounds", f"max_area_frac={m['mask']['max_area_frac']} > {p.max_area_frac}")
        union = masks.any(axis=0)
        digests = {hashlib.sha1(f.tobytes()).hexdigest() for f in frames}
        for v in list(m["variants"]):
            out = sample.variant(v)
            vm: dict[str, Any] = {}
            if v in TEMPORAL_EDITS:
                moved = np.array([not np.array_equal(out[t], frames[t]) for t in range(len(frames))])
                vm["frames_moved_frac"] = round(float(moved.mean()), 4)
                vm["only_original_frames"] = all(hashlib.sha1(f.tobytes()).hexdigest() in digests for f in out)
                failure = None
                if not vm["only_original_frames"]:
                    failure = ("foreign_frames", "a temporal edit produced a frame not in the original")
                elif vm["frames_moved_frac"] < p.min_frames_moved_frac:
                    failure = ("clip_unchanged", f"frames_moved_frac={vm['frames_moved_frac']} (static clip?)")
            else:
                region = sample.region(v) if v == "random_mask" else masks
                diff = np.abs(out.astype(np.int16) - frames.astype(np.int16)).max(axis=3)
                outside = diff[~region]
                vm["outside_changed_frac"] = round(float((outside > 0).mean()) if outside.size else 0.0, 6)
                vm["inside_mad"] = round(float(diff[region].mean()) if region.any() else 0.0, 3)
                vm["flicker_inside"] = flicker(out, region)
                if v == "random_mask":
                    vm["control_overlap_px"] = int((region & union[None]).sum())
                vm["flicker_background"] = flicker(frames, np.repeat(~union[None], len(frames), axis=0))
                if v == "remove":
                    vm["flicker_inside_orig"] = flicker(frames, masks)
                    ratios, befores = [], []
                    # the object itself (the undilated core) against a ring clear of the dilated
                    # mask: on textured ground the dilated mask's own background differs from the
                    # ring as much as a faint object would, and hid every removal behind it
                    cores = a["masks_core"] > 0 if "masks_core" in a else masks
                    for t in range(len(frames)):
                        sel = cores[t]
                        band = ring(masks[t].astype(np.uint8), p.ring_px) > 0
                        if not sel.any() or not band.any():
                            continue
                        b = float(np.abs(frames[t][sel].mean(0) - frames[t][band].mean(0)).max())
                        af = float(np.abs(out[t][sel].mean(0) - out[t][band].mean(0)).max())
                        befores.append(b)
                        ratios.append(af / b if b > 0 else 0.0)
                    vm["object_contrast"] = round(float(np.mean(befores)), 3) if befores else 0.0
                    vm["contrast_ratio"] = round(float(np.mean(ratios)), 4) if ratios else 0.0
                    vm.update({k: m["edits"][v][k] for k in ("propagated_frac", "inpainted_frac")})
                failure = None
                if vm["outside_changed_frac"] > p.max_outside_changed_frac:
                    failure = ("pixels_outside_changed", f"outside_changed_frac={vm['outside_changed_frac']}")
                elif vm["inside_mad"] < p.min_inside_mad:
                    failure = ("region_unchanged", f"inside_mad={vm['inside_mad']} < {p.min_inside_mad}")
                elif vm.get("control_overlap_px", 0) > 0:
                    failure = ("control_overlaps_evidence", f"control_overlap_px={vm['control_overlap_px']}")
                elif (v == "remove" and vm["object_contrast"] >= p.min_object_contrast
                      and vm["contrast_ratio"] > p.max_contrast_ratio):
                    failure = ("object_still_visible", f"contrast_ratio={vm['contrast_ratio']} > {p.max_contrast_ratio}")
            metrics[v] = vm
            if failure:
                sample.reject_variant(self.name, v, *failure)
        if not [v for v in m["variants"] if v != "random_mask"]:
            raise Reject("no_valid_counterfactual", "every counterfactual variant failed verification")
