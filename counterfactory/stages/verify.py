"""verify: measure every variant against the original and reject the ones that fail.

Metrics (kept in the sample's JSON whether they pass or not):
- ``mask_area_frac``: the evidence mask's share of the image: under ``min_area_frac`` the input
  is rejected; over ``max_area_frac`` only the variants that must invent what lies under the
  evidence (``REMOVAL``: remove, swap) are, each with its reason; flip, attribute, blackout,
  count and the control still make sense on a big object (a cat filling the photo);
- ``outside_changed_frac``: share of pixels outside the edited region that differ (must be 0);
- ``inside_mad``: mean absolute difference inside the edited region (it really changed);
- ``contrast_ratio`` (remove): how far the filled region stands out from the ring around it,
  relative to how far the object stood out (the object no longer looks like it);
- ``control_overlap_px`` (random_mask): control pixels on the evidence (must be 0);
- footprint (remove, count; ``counterfactory.footprint``, the same figures the validity
  benchmark prints): ``texture_ratio`` (fill texture over ring texture; a smooth smear is
  rejected as ``fill_texture_flat``), ``flat_patch`` (a flat-texture detector finds the
  footprint: ``fill_flat_patch``), ``color_distance`` (the fill's colors against the ring's: a
  collage of copies from elsewhere, ``fill_color_mismatch``), ``boundary_score`` (gradient across the old outline over
  the ring's texture: ``outline_kept``), ``seam_score`` (the same across the fill's own edge:
  ``fill_seam``). ``contrast_ratio`` applies to low-contrast objects
  too, against a floor of ``min_object_contrast`` (a camera on dark grass was exempt before).
- ``invented_ncc`` (remove, count; ``stages.invented``, issue 31): the best correlation of any other
  annotated object (and, for count, each kept instance) with the fill, placed on it; over
  ``max_invented_ncc`` the fill reproduces an object: ``object_invented``;
- insert footprint (``footprint.insert_metrics``): the inserted object (its edit record's
  polygon) against its ring and against the real object in the same image (the evidence, in the
  original): ``insert_flat`` when its texture is under ``min_insert_texture_share`` of what the
  real object shows (only where real objects are photographed, not drawn flat as in procedural
  scenes), ``insert_flat_patch`` when the flat-texture detector finds it but not the real
  object, ``insert_texture_busy`` over ``max_texture_ratio``, ``insert_color_foreign`` for a
  colored object in an achromatic (grayscale) original; ``insert_seam`` when the step where the
  pasted pixels end (``insert_seam_score``, the fill seam's measure on the insert's region) is
  over ``max_seam_score``. A real cut-out (``stages/cutouts.py``) is not held to
  ``max_texture_ratio``: a motorcycle in front of a plain wall is busier than the wall.
A sample left without any counterfactual variant is rejected whole.
"""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from counterfactory import footprint, scenes
from counterfactory.rules import ANSWER_RULES, color_name
from counterfactory.sample import Reject, Sample, Stage
from counterfactory.stages import register
from counterfactory.stages.invented import annotated_others, copied_object, other_objects
from counterfactory.stages.shared import box_of, original_look, ring

# every edit type except the control counts as a counterfactual
CONTROLS = ("random_mask",)
COUNTERFACTUALS = tuple(k for k in ANSWER_RULES if k not in ("orig", *CONTROLS))
# variants that must invent what lies under the whole evidence: not on a too-big evidence mask
REMOVAL = ("remove", "swap")
# variants whose region is only filled background: the footprint metrics apply
FILLED = ("remove", "count")
_ONES = np.ones((1, 3), np.float32)


_ZEROS = np.zeros((512, 512, 3), np.uint8)
_ZEROS.flags.writeable = False  # only ever read: the zeros copied under a mask


def _clear(dst: np.ndarray, mask: np.ndarray) -> None:
    """``dst[mask > 0] = 0`` in place (``dst`` may be a view): cv2.copyTo of zeros, ~8x faster
    than numpy's boolean assignment on a region's box; the zeros a view of one read-only
    block when the box fits in it (issue 27: no new array per variant)."""
    h, w = dst.shape[:2]
    fits = dst.dtype == np.uint8 and dst.ndim == 3 and dst.shape[2] == 3 and h <= 512 and w <= 512
    try:
        if cv2.copyTo(_ZEROS[:h, :w] if fits else np.zeros_like(dst), mask, dst) is dst:
            return
    except cv2.error:  # a view OpenCV cannot wrap
        pass
    dst[mask > 0] = 0


def _mean_color(img: np.ndarray, sel: np.ndarray, win: tuple[slice, slice] | None = None) -> np.ndarray:
    """The mean color under ``sel`` (``win``: ``box_of(sel)`` when the caller has it)."""
    win = box_of(sel) if win is None else win
    return np.array(cv2.mean(img[win], mask=sel[win])[:3])


@register
class PixelVerify(Stage):
    name = "verify"
    backend = "default"

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        min_area_frac: float = Field(0.0005, ge=0, le=1)
        max_area_frac: float = Field(0.6, ge=0, le=1)
        max_outside_changed_frac: float = Field(0.0, ge=0, le=1)
        min_inside_mad: float = Field(6.0, ge=0, description="mean |difference| inside the region, 0-255 scale")
        max_contrast_ratio: float = Field(0.8, ge=0, description="remove: filled-vs-ring contrast over object-vs-ring contrast")
        min_object_contrast: float = Field(12.0, ge=0, description="object contrasts under this count as this "
                                           "much (a faint object's fill may not stand out more than this)")
        ring_px: int = Field(6, ge=1)
        min_texture_ratio: float = Field(0.7, ge=0, description="fill texture energy over its ring's, at least")
        max_texture_ratio: float = Field(2.5, gt=0, description="and at most (a busy patch in a calm place)")
        reject_flat_patch: bool = Field(True, description="reject a fill the flat-texture detector finds")
        max_boundary_score: float = Field(2.0, gt=0, description="gradient across the old outline over the "
                                          "ring's texture, at most")
        max_color_distance: float = Field(0.35, ge=0, le=1, description="Hellinger distance of the fill's colors "
                                          "to its ring's, at most (object-free truth on procedural scenes: <= 0.23)")
        max_seam_score: float = Field(2.5, gt=0, description="gradient across the fill's own edge over the ring's "
                                      "texture, at most (object-free truth: <= 1.27)")
        footprint_ring_px: int = Field(8, ge=2)
        min_insert_texture_share: float = Field(
            0.5, ge=0, description="insert: the object's texture ratio over the real object's (at most 1), at "
            "least (a flat paste on a photograph reads <= 0.15 of it; the grained insert ~1)")
        max_insert_chroma: float = Field(12.0, ge=0, description="insert on an achromatic original: mean "
                                         "channel spread of the object, at most (0-255)")
        max_invented_ncc: float = Field(0.9, ge=0, le=1, description="remove/count: correlation of the fill with "
                                        "another annotated object placed on it, at most (object_invented)")

    def _metrics(self, img: np.ndarray, out: np.ndarray, region: np.ndarray,
                 win: tuple[slice, slice] | None = None) -> dict[str, Any]:
        # OpenCV reductions with masks: several times faster than numpy fancy indexing here
        absdiff = cv2.absdiff(out, img)
        # the region's mean taken, and its pixels cleared, on its bounding box (``win``)
        win = box_of(region) if win is None else win
        sub = region[win]
        n_out = img.shape[0] * img.shape[1] - cv2.countNonZero(sub)
        inside = cv2.mean(absdiff[win], mask=sub)[:3]
        _clear(absdiff[win], sub)
        n_changed = 0
        if cv2.countNonZero(absdiff.reshape(absdiff.shape[0], -1)):  # some channel changed outside
            # channel sum, saturating at 255: non-zero exactly where any channel changed
            n_changed = cv2.countNonZero(cv2.transform(absdiff, _ONES))
        return {
            "outside_changed_frac": round(n_changed / n_out, 6) if n_out else 0.0,
            # np.mean of the three: their sum in order over 3 (the same float, without numpy's call)
            "inside_mad": round((inside[0] + inside[1] + inside[2]) / 3, 3),
        }

    def process(self, sample: Sample) -> None:
        p = self.params
        a, m = sample.arrays, sample.meta
        img, mask = a["image"], a["mask"]
        area_frac = m["mask"]["area_frac"]
        metrics: dict[str, Any] = {"mask_area_frac": area_frac}
        m["metrics"] = metrics
        if area_frac < p.min_area_frac:
            raise Reject("mask_area_out_of_bounds", f"mask_area_frac={area_frac} < {p.min_area_frac}")
        too_big = area_frac > p.max_area_frac
        band = None  # the evidence's ring: only an inpainted variant reads it (issue 27)
        for v in list(m["variants"]):
            out = sample.variant(v)
            edit = m["edits"][v]
            if edit.get("region") == "global":
                vm = self._global_metrics(v, img, out)
            else:
                region = sample.region(v, mask)
                box = box_of(region)  # once for every figure of this region (issue 27)
                vm = self._metrics(img, out, region, box)
                if v in CONTROLS:
                    vm["control_overlap_px"] = int(cv2.countNonZero(cv2.bitwise_and(region, mask)))
                if edit.get("inpainted") and band is None:
                    band = ring(mask, p.ring_px)
                if edit.get("inpainted") and cv2.countNonZero(band):
                    # the filled region should blend with its surroundings, unlike the object did
                    ring_v = band if region is mask else ring(region, p.ring_px)
                    rbox = box_of(ring_v)
                    before = float(np.abs(_mean_color(img, region, box) - _mean_color(img, ring_v, rbox)).max())
                    after = float(np.abs(_mean_color(out, region, box) - _mean_color(out, ring_v, rbox)).max())
                    vm["object_contrast"] = round(before, 3)
                    vm["fill_contrast"] = round(after, 3)
                    vm["contrast_ratio"] = round(after / before, 4) if before > 0 else 0.0
                if "new_value" in edit and "color_before" in edit:
                    vm["color_after"] = color_name(_mean_color(out, region, box))
                    vm["color_target"] = edit["new_value"]
                if v in FILLED and edit.get("inpainted"):
                    core = cv2.bitwise_and(a["mask_core"], region)
                    vm.update(footprint.footprint_metrics(img, out, region, core, p.footprint_ring_px))
                    others = sample.memo("invented/annotated", lambda: annotated_others(m, a), "mask")
                    vm.update(copied_object(img, out, region, other_objects(m, a, edit, others)))
                if edit.get("inserted_category") and edit.get("region") == "inserted":
                    vm.update(self._insert_metrics(img, out, region, edit, a.get("mask_core"),
                                                   original_look(sample, p.footprint_ring_px)))
            metrics[v] = vm
            failure = self._failure(v, vm)
            if too_big and v in REMOVAL:
                failure = ("mask_area_out_of_bounds",
                           f"{v}: mask_area_frac={area_frac} > {p.max_area_frac} (nothing to copy the background from)")
            if failure:
                sample.reject_variant(self.name, v, failure[0], failure[1])
        if not any(v in COUNTERFACTUALS for v in m["variants"]):
            raise Reject("no_valid_counterfactual", "every counterfactual variant failed verification")

    def _insert_metrics(self, img: np.ndarray, out: np.ndarray, region: np.ndarray, edit: dict[str, Any],
                        core: np.ndarray | None, look_of: Any = None) -> dict[str, Any]:
        h, w = img.shape[:2]
        # the object as the edit painted it (its polygon); a backend that records none: its region
        obj = scenes.polygon_mask(edit["polygon"], w, h) if edit.get("polygon") else region > 0
        # issue 31: the step where the pasted pixels end (a cut-out's border as pasted: a hard
        # cut, a box of its old background), as the fill's seam (``seam``: on the insert's crop);
        # a real cut-out's own texture
        m = footprint.insert_metrics(img, out, obj, region, core, self.params.footprint_ring_px, look_of, seam=True)
        return m | {"cutout": bool(edit.get("cutout"))}

    @staticmethod
    def _global_metrics(v: str, img: np.ndarray, out: np.ndarray) -> dict[str, Any]:
        if v == "flip":  # against OpenCV's mirror: comparing with the reversed view cost ~15x more
            return {"mirror_exact": bool(np.array_equal(out, cv2.flip(img, 1)))}
        return {}

    def _failure(self, v: str, vm: dict[str, Any]) -> tuple[str, str] | None:
        p = self.params
        if vm.get("mirror_exact") is False:
            return "not_a_mirror", "the flipped image is not the exact mirror of the original"
        if "mirror_exact" in vm:
            return None
        if vm.get("color_after", vm.get("color_target")) != vm.get("color_target"):
            return "attribute_not_applied", f"region reads as {vm['color_after']}, wanted {vm['color_target']}"
        if vm["outside_changed_frac"] > p.max_outside_changed_frac:
            return "pixels_outside_changed", f"outside_changed_frac={vm['outside_changed_frac']}"
        if vm["inside_mad"] < p.min_inside_mad:
            return "region_unchanged", f"inside_mad={vm['inside_mad']} < {p.min_inside_mad}"
        if vm.get("control_overlap_px", 0) > 0:
            return "control_overlaps_evidence", f"control_overlap_px={vm['control_overlap_px']}"
        if vm.get("invented_ncc", 0) > p.max_invented_ncc:
            return "object_invented", (f"the fill reproduces a {vm['invented_category']} (invented_ncc="
                                       f"{vm['invented_ncc']} > {p.max_invented_ncc})")
        if "object_contrast" in vm:
            # a faint object's fill may stand out no more than the floor allows: the ratio alone
            # let a fill 1.15x as visible as a low-contrast camera through
            if vm["fill_contrast"] > p.max_contrast_ratio * max(vm["object_contrast"], p.min_object_contrast):
                return "object_still_visible", (f"contrast_ratio={vm['contrast_ratio']} > {p.max_contrast_ratio}"
                                                f" (object_contrast={vm['object_contrast']})")
        if vm.get("boundary_score", 0) > p.max_boundary_score:
            # first: a ghost outline also lifts the texture ratio, but this is what a person sees
            return "outline_kept", f"boundary_score={vm['boundary_score']} > {p.max_boundary_score}"
        if vm.get("seam_score", 0) > p.max_seam_score:
            return "fill_seam", f"seam_score={vm['seam_score']} > {p.max_seam_score}"
        if "insert_texture_ratio" in vm:
            failure = self._insert_failure(vm)
            if failure:
                return failure
        if "texture_ratio" in vm:
            if not p.min_texture_ratio <= vm["texture_ratio"] <= p.max_texture_ratio:
                return "fill_texture_flat" if vm["texture_ratio"] < p.min_texture_ratio else "fill_texture_busy", (
                    f"texture_ratio={vm['texture_ratio']} not in [{p.min_texture_ratio}, {p.max_texture_ratio}]")
            if p.reject_flat_patch and vm["flat_patch"]:
                return "fill_flat_patch", f"flat_share={vm['flat_share']} (ring {vm['flat_share_ring']})"
            if vm["color_distance"] > p.max_color_distance:
                return "fill_color_mismatch", f"color_distance={vm['color_distance']} > {p.max_color_distance}"
        return None

    def _insert_failure(self, vm: dict[str, Any]) -> tuple[str, str] | None:
        p = self.params
        if vm["achromatic"] and vm["insert_chroma"] > p.max_insert_chroma:
            return "insert_color_foreign", (f"insert_chroma={vm['insert_chroma']} > {p.max_insert_chroma} "
                                            "in an achromatic image")
        if vm.get("insert_seam_score", 0) > p.max_seam_score:
            return "insert_seam", f"insert_seam_score={vm['insert_seam_score']} > {p.max_seam_score}"
        ref = vm["object_texture_ratio"]
        ref = 1.0 if ref is None else min(ref, 1.0)  # no real object to read: hold it to its ring's
        tex = vm["insert_texture_ratio"]
        if ref >= footprint.PHOTO_OBJECT_TEXTURE and tex < p.min_insert_texture_share * ref:
            return "insert_flat", (f"insert_texture_ratio={tex} < {p.min_insert_texture_share} x the real "
                                   f"object's {ref}")
        if tex > p.max_texture_ratio and not vm.get("cutout"):  # a real object may be busier than a wall
            return "insert_texture_busy", f"insert_texture_ratio={tex} > {p.max_texture_ratio}"
        if (p.reject_flat_patch and ref >= footprint.PHOTO_OBJECT_TEXTURE and vm["insert_flat_patch"]
                and not vm["object_flat_patch"]):
            return "insert_flat_patch", (f"insert_flat_share={vm['insert_flat_share']} (ring "
                                         f"{vm['insert_flat_share_ring']}); the real object is not flat")
        return None
