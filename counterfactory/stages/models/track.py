"""segment for video with a learned tracker: ``sam2-video`` (``Sam2VideoModel``), ``edgetam``
(``EdgeTamVideoModel``), ``sam3-tracker`` (``Sam3TrackerVideoModel``), all driven through the
same ``Sam2VideoProcessor`` session API.

They replace the flow carrier of ``segment: video`` (keyframes + carrying) when chosen: the
video localize's keyframe detections become box prompts (``prompts: first``: each object's first
detection only, pure tracking; ``all``: every detection re-anchors its object), and the tracker
propagates every object through the clip with its memory, forward from the first prompt and
backward to the clip's start. Identities are the annotation's objects (obj id = object index +
1), so each instance is one track with a per-frame id in ``labels`` (track + 1), exactly the
contract of ``segment: video`` (``masks_core``, dilated ``masks``, ``labels``, ``instances`` with
frames/path/anchors, ``meta["tracking"]``) that edit, qa and verify read.

A clip longer than ``max_frames`` (the tracker's memory and time budget) is rejected with
``clip_too_long_for_tracker``, never truncated silently. ``track_quality`` measures a tracking
against ground-truth masks: mean/min IoU per (object, frame) and identity switches.
"""

from __future__ import annotations

from typing import Any, ClassVar

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
from counterfactory.stages.shared import det_mask, iou, set_clip_masks


class TrackParams(ModelParams):
    max_frames: int = Field(240, ge=1, description="longest clip, in sampled frames, the tracker takes; longer: reject")
    prompts: str = Field("all", pattern="^(first|all)$",
                         description="first: each object's first detection only; all: every detection re-anchors")
    mask_threshold: float = Field(0.0, description="on the mask logits")
    min_area_px: int = Field(12, ge=1, description="a mask smaller than this: the object is not in that frame")
    dilate_px: int = Field(4, ge=0)
    dilate_frac: float = Field(0.06, ge=0, le=0.5, description="extra margin as a share of sqrt(median track area)")


def track_quality(labels: np.ndarray, truth: np.ndarray) -> dict[str, Any]:
    """``labels``: T x H x W predicted track ids (0 = none); ``truth``: K x T x H x W bool.
    Per ground-truth object and frame where it is visible: the IoU with the predicted track that
    overlaps it most; an identity switch is that track changing between two frames."""
    ious, switches = [], 0
    for k in range(truth.shape[0]):
        prev = None
        for t in range(truth.shape[1]):
            gt = truth[k, t]
            if not gt.any():
                continue
            ids, counts = np.unique(labels[t][gt], return_counts=True)
            keep = ids > 0
            if not keep.any():
                ious.append(0.0)
                continue
            best = int(ids[keep][np.argmax(counts[keep])])
            ious.append(iou(labels[t] == best, gt))
            if prev is not None and best != prev:
                switches += 1
            prev = best
    return {"mean_iou": round(float(np.mean(ious)), 4) if ious else None,
            "min_iou": round(float(np.min(ious)), 4) if ious else None, "identity_switches": switches}


def paint_track(core: np.ndarray, labels: np.ndarray, masks: dict[int, np.ndarray],
                label: int) -> tuple[list[list[float]], list[int], np.ndarray]:
    """Write one track's per-frame masks into ``core``/``labels`` (id ``label``, capped at 255):
    its centroid path, per-frame areas and the union of its masks, in frame order."""
    path, area = [], []
    union = np.zeros(core.shape[1:], bool)
    for t in sorted(masks):
        mk = masks[t]
        core[t][mk] = 1
        labels[t][mk] = min(label, 255)
        ys, xs = np.nonzero(mk)
        path.append([t, round(float(xs.mean()), 1), round(float(ys.mean()), 1)])
        area.append(int(mk.sum()))
        union |= mk
    return path, area, union


class VideoTracker(Stage):
    name = "segment"
    stateful = True
    Params = TrackParams
    model_class: ClassVar[str]

    def __init__(self, params=None, run=None) -> None:
        super().__init__(params, run)
        p = self.params
        tf, kw = transformers_setup(self, p, self.backend, prefer="bfloat16")
        self.model = load_pretrained(getattr(tf, self.model_class), p, self.backend, dtype=self.dtype, **kw)
        self.model = self.model.to(self.device).eval()
        self.processor = tf.AutoProcessor.from_pretrained(p.model, revision=p.revision)
        self.record = model_record(p.model, p.revision, architecture=f"transformers.{self.model_class}",
                                   dtype=str(self.dtype).removeprefix("torch."), device=self.device)

    def describe(self) -> dict[str, Any]:
        return super().describe() | {"models": {"tracker": self.record}}

    def _track(self, frames: np.ndarray, prompts: dict[int, list[tuple[int, list[float]]]]) -> dict[int, dict[int, np.ndarray]]:
        """Per object id: per frame, its mask (bool), from one session over the clip."""
        import torch

        n, h, w = frames.shape[:3]
        session = self.processor.init_video_session(video=list(frames), inference_device=self.device, dtype=self.dtype)
        first = min(prompts)
        out: dict[int, dict[int, np.ndarray]] = {}
        passes = [(first, False)] + ([(first, True)] if first > 0 else [])
        with torch.inference_mode():
            for t in sorted(prompts):
                ids = [oid for oid, _ in prompts[t]]
                self.processor.add_inputs_to_inference_session(inference_session=session, frame_idx=t, obj_ids=ids,
                                                               input_boxes=[[box for _, box in prompts[t]]])
                # the prompted frame is segmented now, so its memory exists when propagation reaches
                # it (an object that enters mid-clip is prompted on a later frame)
                self.model(inference_session=session, frame_idx=t)
            for start, reverse in passes:
                for o in self.model.propagate_in_video_iterator(inference_session=session, start_frame_idx=start,
                                                                reverse=reverse):
                    masks = self.processor.post_process_masks(
                        [o.pred_masks.float()], original_sizes=[[h, w]], binarize=True,
                        mask_threshold=self.params.mask_threshold)[0]  # (objects, 1, h, w)
                    for j, oid in enumerate(session.obj_ids):
                        out.setdefault(oid, {}).setdefault(o.frame_idx, masks[j, 0].cpu().numpy().astype(bool))
        return out

    def process(self, sample: Sample) -> None:
        m, p = sample.meta, self.params
        frames = sample.arrays["video"]
        n, h, w = frames.shape[:3]
        if n > p.max_frames:
            raise Reject("clip_too_long_for_tracker", f"{n} sampled frames > max_frames={p.max_frames} of {self.backend}")
        dets = {int(k): v for k, v in m["detections"].items()}
        prompts: dict[int, list[tuple[int, list[float]]]] = {}
        meta_of: dict[int, dict[str, Any]] = {}
        det_masks: dict[tuple[int, int], np.ndarray] = {}
        for t in sorted(dets):
            for d in dets[t]:
                oid = int(d["object"]) + 1
                mk = det_mask(d, w, h)
                if not mk.any():
                    continue
                det_masks[(oid, t)] = mk
                if p.prompts == "first" and oid in meta_of:
                    continue
                ys, xs = np.nonzero(mk)
                prompts.setdefault(t, []).append((oid, [float(xs.min()), float(ys.min()), float(xs.max() + 1),
                                                        float(ys.max() + 1)]))
                meta_of.setdefault(oid, {"category": d["category"], "attributes": d.get("attributes", {}),
                                         "anchors": []})["anchors"].append(t)
        if not prompts:
            raise Reject("no_detection_to_track", "no keyframe detection with any pixel to prompt the tracker")
        tracked = self._track(frames, prompts)
        core = np.zeros((n, h, w), np.uint8)
        labels = np.zeros((n, h, w), np.uint8)
        times = m["source"]["times"]
        instances, drift = [], []
        tracks = sorted(((oid, {t: mk for t, mk in per.items() if mk.sum() >= p.min_area_px})
                         for oid, per in tracked.items()), key=lambda x: (min(x[1], default=n), x[0]))
        for oid, masks in tracks:
            if not masks:
                continue
            k = len(instances)
            path, area, union = paint_track(core, labels, masks, k + 1)
            drift += [iou(masks.get(t, np.zeros((h, w), bool)), dm) for (o, t), dm in det_masks.items() if o == oid]
            ys, xs = np.nonzero(union)
            fr = sorted(masks)
            info = meta_of[oid]
            instances.append({
                "category": info["category"], "attributes": info["attributes"], "track": k, "object_id": oid,
                "box": [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1],
                "frames": [fr[0], fr[-1]], "t_start": round(times[fr[0]] - times[0], 4),
                "t_end": round(times[fr[-1]] - times[0], 4), "anchors": info["anchors"],
                "mask_method": self.backend, "mask_area": int(np.median(area)), "path": path})
        if not instances:
            raise Reject("target_lost", f"{self.backend} kept no mask of {p.min_area_px} px or more on any frame")
        m["instances"] = instances
        set_clip_masks(sample, core, labels, p.dilate_px, p.dilate_frac)
        m["tracking"].update({"tracker": self.backend, "prompts": p.prompts, "tracks": len(instances),
                              "prompt_frames": sorted(prompts),
                              "keyframe_iou_mean": round(float(np.mean(drift)), 4) if drift else None,
                              "keyframe_iou_min": round(float(np.min(drift)), 4) if drift else None})
        m.pop("detections", None)


@register
class Sam2VideoTrack(VideoTracker):
    backend = "sam2-video"
    model_class = "Sam2VideoModel"


@register
class EdgeTamTrack(VideoTracker):
    backend = "edgetam"
    model_class = "EdgeTamVideoModel"


@register
class Sam3TrackerTrack(VideoTracker):
    backend = "sam3-tracker"
    model_class = "Sam3TrackerVideoModel"
