"""``segment: sam3-video``: SAM 3 concept segmentation and tracking through a clip
(``transformers.Sam3VideoModel`` + ``Sam3VideoProcessor``).

Where ``sam2-video``/``edgetam``/``sam3-tracker`` (track.py) propagate the annotation's keyframe
boxes, this backend needs no box: each target phrase localize found (``meta["targets"]``) is one
text prompt of one video session, and SAM 3 detects EVERY instance of it on every frame and
tracks each with its own identity (its detector + tracker fusion: new detections start tracks,
matched ones keep them, hot-start heuristics drop spurious ones). So an instance the annotation
missed is still found (no wrong count), and the output is the contract of ``segment: video``
(``masks_core``, dilated ``masks``, per-frame track ids in ``labels``, ``instances`` with
frames/path, ``meta["mask"]``, ``meta["tracking"]``) that edit, qa and verify read unchanged.

- Presence: the detector's presence head ("is this concept in the frame at all") is read on
  every frame of every phrase; on a frame where it is below ``presence_threshold`` the phrase
  yields no detection there (a forward hook on the detector sets its presence logit to -inf
  before the library's own ``probability x presence > detection threshold`` rule). The highest
  presence per phrase is recorded in ``meta["presence"]``.
- No instance of any phrase on any frame: ``target_not_found`` (the reject every localize/segment
  backend uses for an absent target); instances all under ``min_area_px``: ``target_lost``;
  a clip longer than ``max_frames``: ``clip_too_long_for_tracker``, never truncated.
- Quality recorded as the other trackers do: each annotated keyframe mask localize handed over
  (``detections``) is compared with the best same-phrase track on its frame
  (``tracking.keyframe_iou_mean``/``min``); a track that overlaps an annotated object
  (IoU >= ``match_iou`` on its keyframes) takes that object's id and attributes (colour, for
  the qa templates); the others keep ``object_id: None`` and no attributes.
- The library fetches a compiled NMS/hole-filling kernel from the Hub (``kernels-community/
  cv-utils``) on first use when the ``kernels`` package is installed: code from the Hub, so it
  is only allowed with ``hub_kernels: true`` (off: the library's documented fallback, no NMS
  between detections of one frame, no hole filling). The switch is per process.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pydantic import Field

from counterfactory.sample import Reject, Sample, Stage
from counterfactory.stages import register
from counterfactory.stages.models.common import (
    ModelParams,
    load_pretrained,
    model_record,
    transformers_setup,
)
from counterfactory.stages.models.track import paint_track
from counterfactory.stages.shared import det_mask as _det_mask
from counterfactory.stages.shared import dilate, iou


class Sam3VideoParams(ModelParams):
    max_frames: int = Field(240, ge=1, description="longest clip, in sampled frames, the tracker takes; longer: reject")
    presence_threshold: float = Field(0.5, ge=0, le=1,
                                      description="SAM 3 presence score at which a phrase is present on a frame")
    detection_threshold: float | None = Field(
        None, ge=0, le=1, description="query probability x presence at which a detection counts (None: the "
        "checkpoint's score_threshold_detection, 0.5)")
    new_object_threshold: float | None = Field(
        None, ge=0, le=1, description="score at which an unmatched detection starts a new track (None: the "
        "checkpoint's new_det_thresh, 0.7)")
    max_objects: int = Field(64, ge=1, le=255, description="most tracks per clip (all phrases together; labels are uint8)")
    min_area_px: int = Field(12, ge=1, description="a mask smaller than this: the object is not in that frame")
    match_iou: float = Field(0.3, gt=0, le=1, description="a track takes an annotated object's id and attributes "
                             "at this IoU with its keyframe masks")
    dilate_px: int = Field(4, ge=0)
    dilate_frac: float = Field(0.06, ge=0, le=0.5, description="extra margin as a share of sqrt(median track area)")
    hub_kernels: bool = Field(False, description="let transformers download and run the kernels-community/cv-utils "
                              "kernel (mask NMS, hole filling) from the Hub; off: its fallback, no remote code")


def allow_hub_kernels(allowed: bool) -> None:
    """transformers loads the cv-utils kernel from the Hub on first use (module global None =
    not tried yet, False = unavailable). Not allowed: mark it unavailable before it is tried."""
    from transformers.models.sam3_video import modeling_sam3_video as mod

    if not allowed:
        mod.cv_utils_kernel = False
    elif mod.cv_utils_kernel is False:
        mod.cv_utils_kernel = None


@register
class Sam3VideoSegment(Stage):
    name = "segment"
    backend = "sam3-video"
    stateful = True
    Params = Sam3VideoParams

    def __init__(self, params=None, run=None) -> None:
        super().__init__(params, run)
        p = self.params
        tf, kw = transformers_setup(self, p, self.backend, prefer="bfloat16")
        self.model = load_pretrained(tf.Sam3VideoModel, p, self.backend, dtype=self.dtype, **kw)
        self.model = self.model.to(self.device).eval()
        # the thresholds live as attributes of the model (read from its config at init)
        if p.detection_threshold is not None:
            self.model.score_threshold_detection = p.detection_threshold
        if p.new_object_threshold is not None:
            self.model.new_det_thresh = p.new_object_threshold
        self.model.max_num_objects = p.max_objects
        allow_hub_kernels(p.hub_kernels)
        self.processor = tf.Sam3VideoProcessor.from_pretrained(p.model, revision=p.revision)
        self.record = model_record(p.model, p.revision, architecture="transformers.Sam3VideoModel",
                                   dtype=str(self.dtype).removeprefix("torch."), device=self.device)
        self._presence: list[float] | None = None  # per detector call while a clip runs
        self.model.detector_model.register_forward_hook(self._gate_presence)

    def describe(self) -> dict[str, Any]:
        return super().describe() | {"models": {"tracker": self.record}}

    def _gate_presence(self, module, args, output):
        """Forward hook on the detector (one call per phrase per frame, in prompt order):
        record the presence score, and below the threshold make the phrase absent there."""
        if self._presence is None or output.presence_logits is None:
            return None
        import torch

        score = output.presence_logits.float().sigmoid()
        self._presence.append(float(score.max()))
        if float(score.max()) < self.params.presence_threshold:
            output.presence_logits = torch.full_like(output.presence_logits, -1e4)
        return output

    def _track(self, frames: np.ndarray, phrases: list[str]) -> tuple[dict[int, dict[int, np.ndarray]],
                                                                       dict[int, str], dict[int, float], list[float]]:
        """One session over the clip, one text prompt per phrase. Per SAM 3 object id: per frame
        its mask (bool, clip resolution); its phrase; its detection score; presence per call."""
        import torch

        session = self.processor.init_video_session(video=list(frames), inference_device=self.device,
                                                    dtype=self.dtype)
        self.processor.add_text_prompt(session, phrases)
        out: dict[int, dict[int, np.ndarray]] = {}
        scores: dict[int, float] = {}
        self._presence = []
        try:
            with torch.inference_mode():
                for o in self.model.propagate_in_video_iterator(inference_session=session, start_frame_idx=0):
                    r = self.processor.postprocess_outputs(session, o)
                    masks = r["masks"].cpu().numpy()
                    for j, oid in enumerate(r["object_ids"].tolist()):
                        out.setdefault(oid, {})[o.frame_idx] = masks[j].astype(bool)
                        scores[oid] = round(float(r["scores"][j]), 4)
            presence = self._presence
        finally:
            self._presence = None
        phrase_of = {oid: session.prompts[session.obj_id_to_prompt_id[oid]] for oid in out}
        return out, phrase_of, scores, presence

    def process(self, sample: Sample) -> None:
        m, p = sample.meta, self.params
        frames = sample.arrays["video"]
        n, h, w = frames.shape[:3]
        if n > p.max_frames:
            raise Reject("clip_too_long_for_tracker", f"{n} sampled frames > max_frames={p.max_frames} of {self.backend}")
        phrases = list(dict.fromkeys(str(t) for t in m.get("targets", []) if str(t).strip()))
        if not phrases:
            raise Reject("no_target_phrase", "segment: sam3-video prompts with the targets localize found: none")
        tracked, phrase_of, scores, presence = self._track(frames, phrases)
        k = len(phrases)
        m["presence"] = {ph: round(max(presence[i::k], default=0.0), 4) for i, ph in enumerate(phrases)}
        if not any(mk.any() for per in tracked.values() for mk in per.values()):
            raise Reject("target_not_found", f"sam3-video found no instance of {phrases} on any of {n} frames: "
                         f"presence {m['presence']} (presence_threshold={p.presence_threshold})")
        # keyframe annotations localize handed over: per (object, frame) its mask and category
        dets = {int(t): v for t, v in m.get("detections", {}).items()}
        det_masks = {(int(d["object"]), t): (d, _det_mask(d, w, h)) for t in sorted(dets) for d in dets[t]}
        tracks = sorted(((oid, {t: mk for t, mk in per.items() if mk.sum() >= p.min_area_px})
                         for oid, per in tracked.items()), key=lambda x: (min(x[1], default=n), x[0]))
        tracks = [(oid, masks) for oid, masks in tracks if masks]
        if not tracks:
            raise Reject("target_lost", f"{self.backend} kept no mask of {p.min_area_px} px or more on any frame")
        core = np.zeros((n, h, w), np.uint8)
        labels = np.zeros((n, h, w), np.uint8)
        times = m["source"]["times"]
        instances = []
        for k_, (oid, masks) in enumerate(tracks):
            path, area, union = paint_track(core, labels, masks, k_ + 1)
            # the annotated object this track follows, if any: best mean IoU on its keyframes
            by_obj: dict[int, list[float]] = {}
            for (obj, t), (d, dm) in det_masks.items():
                if d["category"] == phrase_of[oid]:
                    by_obj.setdefault(obj, []).append(iou(masks.get(t, np.zeros((h, w), bool)), dm))
            best = max(by_obj, key=lambda o: (float(np.mean(by_obj[o])), -o), default=None)
            matched = best if best is not None and float(np.mean(by_obj[best])) >= p.match_iou else None
            attrs = next((d.get("attributes", {}) for (obj, _), (d, _) in det_masks.items() if obj == matched), {})
            ys, xs = np.nonzero(union)
            fr = sorted(masks)
            instances.append({
                "category": phrase_of[oid], "attributes": attrs, "track": k_,
                "object_id": None if matched is None else matched + 1, "sam3_id": int(oid), "score": scores.get(oid),
                "box": [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1],
                "frames": [fr[0], fr[-1]], "t_start": round(times[fr[0]] - times[0], 4),
                "t_end": round(times[fr[-1]] - times[0], 4), "anchors": [],
                "mask_method": self.backend, "mask_area": int(np.median(area)), "path": path})
        # each annotated keyframe mask against the best same-phrase track on its frame
        drift = [max((iou(masks.get(t, np.zeros((h, w), bool)), dm) for oid, masks in tracks
                      if phrase_of[oid] == d["category"]), default=0.0) for (_, t), (d, dm) in det_masks.items()]
        typical = float(np.median([i["mask_area"] for i in instances]))
        px = p.dilate_px + int(round(p.dilate_frac * np.sqrt(typical)))
        masks_d = np.stack([dilate(c, px) for c in core])
        frac = masks_d.reshape(n, -1).mean(axis=1)
        sample.arrays["masks_core"], sample.arrays["masks"], sample.arrays["labels"] = core, masks_d, labels
        m["instances"] = instances
        m["mask"] = {"area_frac": round(float(frac.mean()), 6), "max_area_frac": round(float(frac.max()), 6),
                     "frames_with_evidence": int((frac > 0).sum()), "core_area": int(core.sum()), "dilate_px": px}
        m.setdefault("tracking", {}).update({
            "tracker": self.backend, "prompts": "text", "phrases": phrases, "tracks": len(instances),
            "instances_per_phrase": {ph: sum(i["category"] == ph for i in instances) for ph in phrases},
            "matched_objects": sorted(i["object_id"] for i in instances if i["object_id"] is not None),
            "keyframe_iou_mean": round(float(np.mean(drift)), 4) if drift else None,
            "keyframe_iou_min": round(float(np.min(drift)), 4) if drift else None})
        missing = [ph for ph in phrases if not m["tracking"]["instances_per_phrase"][ph]]
        if missing:  # a phrase with no instance: said in the notes (its questions reach qa as they are)
            m.setdefault("notes", []).append(f"segment: sam3-video found no instance of {missing}")
        m.pop("detections", None)
