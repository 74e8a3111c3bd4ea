"""Video backends of the six stages (``backend: video``): one sample per clip, same contract.

Arrays: ``video`` (T x H x W x 3 uint8), ``masks_core`` / ``masks`` (T x H x W uint8 0/1: the
evidence on every frame, exact and dilated), ``labels`` (T x H x W uint8: track id + 1),
``variant/<v>`` (T x H x W x 3). Meta as for images (``source``, ``targets``, ``instances`` --
one per track --, ``mask``, ``variants``, ``edits``, ``qa``, ``metrics``), plus ``tracking``.

- ingest: PyAV decode, timestamp sampling at ``fps``, capped (see ``video_io``).
- localize: question targets matched to annotated objects; their keyframe polygons/boxes become
  detections on the nearest sampled frame (optionally only every ``keyframe_every`` frames, as a
  detector run every N frames would see them).
- segment: tracks carried between detection frames by dense optical flow (Farneback; each
  track's mask moves by the median flow under it), re-anchored at every detection frame by IoU
  matching; an unmatched detection starts a track (an object entering mid-clip) that is also
  carried backwards to the previous detection frame; gaps between two detections take the
  nearer anchor's propagation.
- edit: ``remove`` fills each masked pixel from the frames where that pixel is background
  (per-pixel median, static camera), then inpaints once what no frame shows, so the fill does not
  flicker; ``blackout`` flat fill; ``reverse``, ``shuffle`` (seeded derangement of segments) and
  ``freeze`` (a held frame over the middle segment) need no model.
- qa: existence/count/direction/order/temporal questions, answered per variant by
  ``rules.answer_for`` from the structured edit context; a variant on which no answer changes
  is dropped (it would teach nothing).
- verify: pixels outside the masks unchanged, the object gone (contrast), temporal flicker
  inside the mask; temporal edits really reorder frames and only reuse original frames.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from counterfactory import video_scenes
from counterfactory.layout import sha256_file
from counterfactory.rules import answer_for, classify_question, match_categories, plural
from counterfactory.sample import Reject, Sample, Stage
from counterfactory.scenes import polygon_mask
from counterfactory.stages import register
from counterfactory.stages.ingest import read_source_object, sample_key, source_file_size
from counterfactory.stages.regions import control_mask
from counterfactory.stages.segment import dilate
from counterfactory.storage import is_remote, resolve_path
from counterfactory.video_io import Caps, VideoError, decode_clip, encode_mp4

VideoEditType = Literal["remove", "blackout", "random_mask", "reverse", "shuffle", "freeze"]
TEMPORAL_EDITS = ("reverse", "shuffle", "freeze")

# --- ingest ---------------------------------------------------------------------------------


@register
class VideoIngest(Stage):
    name = "ingest"
    backend = "video"

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        fps: float = Field(8.0, gt=0, le=60, description="sampling rate (never above the source's)")
        max_frames: int = Field(48, ge=2, le=1000, description="sampled frames kept per clip")
        min_frames: int = Field(4, ge=1)
        max_side: int = Field(320, ge=16, description="frames downscaled to at most this side (even sizes)")
        max_duration_s: float = Field(600.0, gt=0, description="longer clips (after the span) are rejected unread")
        over_frames: Literal["trim", "reject"] = Field("trim", description="clips over max_frames: keep the first max_frames, or reject")
        vfr: Literal["resample", "reject"] = "resample"

    def caps(self) -> Caps:
        p = self.params
        limits = self.run.limits
        return Caps(fps=p.fps, max_frames=p.max_frames, min_frames=p.min_frames, max_side=p.max_side,
                    max_pixels=limits.max_pixels, max_duration_s=p.max_duration_s,
                    over_frames=p.over_frames, vfr=p.vfr)

    def process(self, sample: Sample) -> None:
        m = sample.meta
        if "error" in m:
            reason, _, detail = m["error"].partition(": ")
            raise Reject(reason, detail)
        if m.get("media") != "video":
            raise Reject("not_a_video_input", "the video ingest backend reads video_manifest/procedural_video inputs")
        ref = m["image"]
        span = tuple(m["span"]) if m.get("span") else None
        if ref.startswith("procedural-video://"):
            seed, index, size, n, fps = video_scenes.parse_clip_uri(ref)
            spec = video_scenes.clip_spec(seed, index, size, n, fps)
            raw = video_scenes.render_clip(spec)
            digest = hashlib.sha256(raw.tobytes() + str(raw.shape).encode()).hexdigest()
            src: Path | bytes = encode_mp4(raw, fps)  # through the real decode path
            fmt = "procedural"
        elif is_remote(ref):  # an object-store or web URI: decoded from memory
            src = read_source_object(ref)
            if not src:
                raise Reject("empty_file", ref)
            digest, fmt = hashlib.sha256(src).hexdigest(), None
        else:
            path = resolve_path(ref, None) if ref.startswith("pkg:") else Path(ref)
            if source_file_size(path) == 0:
                raise Reject("empty_file", str(path))
            try:
                digest = sha256_file(path)
            except OSError as exc:
                raise Reject("read_error", f"{path}: {exc.strerror or exc}") from None
            src, fmt = path, None
        try:
            clip = decode_clip(src, self.caps(), span)
        except VideoError as exc:
            raise Reject(exc.reason, exc.detail) from None
        qtext = "\n".join(q["question"].strip() for q in m["questions"])
        sample.key = sample_key(digest, f"{qtext}\nspan={list(span) if span else None}")
        info = clip.info
        if fmt:
            info["format"] = fmt
        m["source"] = {"image": ref, "video": ref, "origin": m.pop("origin"), "sha256": digest,
                       "times": clip.times, **info}
        m.pop("image")
        sample.arrays["video"] = clip.frames


# --- localize -------------------------------------------------------------------------------


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


# --- segment (tracking) ---------------------------------------------------------------------


def _det_mask(det: dict[str, Any], w: int, h: int) -> np.ndarray:
    if "polygon" in det:
        return polygon_mask(det["polygon"], w, h).copy()
    x0, y0, x1, y1 = det["box"]
    out = np.zeros((h, w), bool)
    out[max(0, int(np.floor(y0))):max(0, int(np.ceil(y1))), max(0, int(np.floor(x0))):max(0, int(np.ceil(x1)))] = True
    return out


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.count_nonzero(a | b)
    return float(np.count_nonzero(a & b)) / union if union else 0.0


class MaskCarrier:
    """Moves a track's mask between neighbouring frames by masked template matching (the
    object's own pixels on frame ``a`` searched for on frame ``b``; OpenCV ``matchTemplate``).

    Dense optical flow (Farneback, DIS) was measured first: on flat-coloured objects its median
    under the mask underestimated the motion by 30-90 %, and tracks drifted off their objects.
    Masks live on a padded canvas so the part of an object outside the frame is kept; while the
    visible part touches the border (matching would be biased towards staying in the frame),
    the track moves at its last velocity instead.
    """

    def __init__(self, frames: np.ndarray, search_px: int, pad: int) -> None:
        self.frames = frames
        self.search = search_px
        self.pad = pad
        self.h, self.w = frames.shape[1:3]

    def canvas(self, mask: np.ndarray) -> np.ndarray:
        return np.pad(mask, self.pad)

    def visible(self, canvas: np.ndarray) -> np.ndarray:
        p = self.pad
        return canvas[p : p + self.h, p : p + self.w]

    def match(self, vis: np.ndarray, a: int, b: int) -> tuple[int, int]:
        ys, xs = np.nonzero(vis)
        y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        s = self.search
        wy0, wy1, wx0, wx1 = max(0, y0 - s), min(self.h, y1 + s), max(0, x0 - s), min(self.w, x1 + s)
        tpl = np.ascontiguousarray(self.frames[a][y0:y1, x0:x1])
        tmask = np.repeat(vis[y0:y1, x0:x1, None], 3, axis=2).astype(np.uint8)
        win = np.ascontiguousarray(self.frames[b][wy0:wy1, wx0:wx1])
        res = cv2.matchTemplate(win, tpl, cv2.TM_SQDIFF, mask=tmask)
        _, _, loc, _ = cv2.minMaxLoc(res)
        return loc[0] + wx0 - x0, loc[1] + wy0 - y0

    def carry(self, canvas: np.ndarray, a: int, b: int, prior: tuple[int, int] | None) -> tuple[np.ndarray, tuple[int, int]]:
        vis = self.visible(canvas)
        if not vis.any():
            return np.zeros_like(canvas), (0, 0)
        ys, xs = np.nonzero(vis)
        y0, y1, x0, x1 = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
        dx, dy = self.match(vis, a, b)
        shifts = [(0, 0), (dx, dy)] + ([prior] if prior is not None else [])
        at_border = any(min(x0 + sx, y0 + sy) <= 0 or x1 + sx >= self.w or y1 + sy >= self.h for sx, sy in shifts)
        if at_border and prior is not None:
            dx, dy = prior  # matching is biased towards the frame here: keep the track's velocity
        moved = np.zeros_like(canvas)
        hh, ww = canvas.shape
        src = canvas[max(0, -dy) : hh - max(0, dy), max(0, -dx) : ww - max(0, dx)]
        moved[max(0, dy) : max(0, dy) + src.shape[0], max(0, dx) : max(0, dx) + src.shape[1]] = src
        return moved, (dx, dy)


@register
class VideoSegment(Stage):
    name = "segment"
    backend = "video"

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        iou_match: float = Field(0.3, gt=0, le=1, description="a detection continues a track at or above this IoU")
        search_px: int = Field(24, ge=2, le=256, description="largest motion between two sampled frames, pixels")
        min_area_px: int = Field(12, ge=1, description="a carried mask smaller than this has left the frame")
        dilate_px: int = Field(4, ge=0)
        dilate_frac: float = Field(0.06, ge=0, le=0.5, description="extra margin as a share of sqrt(median track area)")

    def __init__(self, params=None, run=None) -> None:
        super().__init__(params, run)
        cv2.setNumThreads(1)

    def process(self, sample: Sample) -> None:
        m = sample.meta
        frames = sample.arrays["video"]
        n, h, w = frames.shape[:3]
        p = self.params
        dets = {int(k): v for k, v in m["detections"].items()}
        det_frames = sorted(dets)
        car = MaskCarrier(frames, p.search_px, pad=p.search_px * 4)
        tracks: list[dict[str, Any]] = []
        drift: list[float] = []

        def step(tr: dict[str, Any], a: int, b: int, key: str) -> bool:
            moved, vel = car.carry(tr["canvas"][a], a, b, tr.get(key))
            if car.visible(moved).sum() < p.min_area_px:
                return False
            tr["canvas"][b] = moved
            tr[key] = vel
            if key == "v_fwd":
                tr.setdefault("vel", {})[b] = vel
            return True

        for t in range(n):
            for tr in tracks:
                if tr["active"] and t - 1 in tr["canvas"] and not step(tr, t - 1, t, "v_fwd"):
                    tr["active"] = False  # it left the frame
            if t not in dets:
                continue
            det_masks = [_det_mask(d, w, h) for d in dets[t]]
            cand = [(iou(car.visible(tr["canvas"][t]), det_masks[di]), ti, di)
                    for ti, tr in enumerate(tracks) if tr["active"] and t in tr["canvas"]
                    for di, d in enumerate(dets[t]) if d["category"] == tr["category"]]
            used_t, used_d = set(), set()
            for score, ti, di in sorted(cand, key=lambda c: (-c[0], c[1], c[2])):
                if score < p.iou_match or ti in used_t or di in used_d:
                    continue
                used_t.add(ti)
                used_d.add(di)
                drift.append(score)
                # the detection replaces the carried mask inside the frame; outside it, the
                # carried part stays (the rest of an object half out of view)
                outside = tracks[ti]["canvas"][t].copy()
                car.visible(outside)[:] = False
                tracks[ti]["canvas"][t] = car.canvas(det_masks[di]) | outside
                tracks[ti]["anchors"].append(t)
                tracks[ti]["objects"].add(dets[t][di]["object"])
            prev = max([f for f in det_frames if f < t], default=-1)
            for di, d in enumerate(dets[t]):
                if di in used_d or det_masks[di].sum() < p.min_area_px:
                    continue
                tr = {"category": d["category"], "attributes": d.get("attributes", {}),
                      "canvas": {t: car.canvas(det_masks[di])}, "anchors": [t], "objects": {d["object"]},
                      "active": True}
                if t + 1 < n:  # its velocity, for carrying it back out of the frame it entered from
                    _, (dx, dy) = car.carry(tr["canvas"][t], t, t + 1, None)
                    tr["v_bwd"] = (-dx, -dy)
                for b in range(t - 1, prev, -1):  # it was there before this detection saw it
                    if not step(tr, b + 1, b, "v_bwd"):
                        break
                tracks.append(tr)
        for tr in tracks:  # between two anchors, the nearer anchor's propagation
            for a, b in zip(tr["anchors"], tr["anchors"][1:], strict=False):
                fwd = tr.get("vel", {}).get(b)  # the velocity it arrived with: a prior at the border
                tr["v_bwd"] = (-fwd[0], -fwd[1]) if fwd else None
                for t in range(b - 1, (a + b) // 2, -1):
                    if not step(tr, t + 1, t, "v_bwd"):
                        break
        for tr in tracks:
            tr["masks"] = {t: car.visible(c) for t, c in tr["canvas"].items() if car.visible(c).any()}
        tracks.sort(key=lambda tr: (min(tr["masks"]), min(tr["objects"])))
        core = np.zeros((n, h, w), np.uint8)
        labels = np.zeros((n, h, w), np.uint8)
        times = m["source"]["times"]
        t0 = times[0]
        instances = []
        for k, tr in enumerate(tracks):
            path = []
            area = []
            for t in sorted(tr["masks"]):
                mk = tr["masks"][t]
                core[t][mk] = 1
                labels[t][mk] = min(k + 1, 255)
                ys, xs = np.nonzero(mk)
                path.append([t, round(float(xs.mean()), 1), round(float(ys.mean()), 1)])
                area.append(int(mk.sum()))
            fr = sorted(tr["masks"])
            union = np.zeros((h, w), bool)
            for mk in tr["masks"].values():
                union |= mk
            ys, xs = np.nonzero(union)
            instances.append({
                "category": tr["category"], "attributes": tr["attributes"], "track": k,
                "box": [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1],
                "frames": [fr[0], fr[-1]], "t_start": round(times[fr[0]] - t0, 4), "t_end": round(times[fr[-1]] - t0, 4),
                "anchors": tr["anchors"], "mask_method": "keyframe+flow", "mask_area": int(np.median(area)),
                "path": path,
            })
        typical = float(np.median([i["mask_area"] for i in instances])) if instances else 0.0
        px = p.dilate_px + int(round(p.dilate_frac * np.sqrt(typical)))
        masks = np.stack([dilate(c, px) for c in core]) if instances else core.copy()
        frac = masks.reshape(n, -1).mean(axis=1)
        sample.arrays["masks_core"] = core
        sample.arrays["masks"] = masks
        sample.arrays["labels"] = labels
        m["instances"] = instances
        m["mask"] = {"area_frac": round(float(frac.mean()), 6), "max_area_frac": round(float(frac.max()), 6),
                     "frames_with_evidence": int((frac > 0).sum()), "core_area": int(core.sum()), "dilate_px": px}
        m["tracking"].update({"tracks": len(tracks), "keyframe_iou_mean": round(float(np.mean(drift)), 4) if drift else None,
                              "keyframe_iou_min": round(float(np.min(drift)), 4) if drift else None})
        m.pop("detections", None)


# --- edit -----------------------------------------------------------------------------------


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
        filled = cv2.inpaint(np.ascontiguousarray(plate), never, radius, flag)
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


def control_masks(masks: np.ndarray, rng: np.random.Generator, tries: int, gap: int,
                  avoid: np.ndarray | None = None) -> np.ndarray | None:
    """DeFacto's control for a clip (issue 16): on each frame a rectangle or ellipse of that
    frame's evidence area (a fixed neutral family, never the evidence's silhouette), all sharing
    one center and aspect, placed ``gap`` pixels clear of the evidence's whole footprint and of
    ``avoid`` (other annotated objects, HxW). None when nothing fits."""
    t, h, w = masks.shape
    union = masks.any(axis=0).astype(np.uint8) * 255
    areas = masks.reshape(t, -1).sum(axis=1)
    if not areas.max():
        return None
    # the largest frame's shape (a little bigger, so every frame's exact area fits), placed clear
    # of the whole footprint; each frame takes the pixels of it nearest its center, in the
    # shape's own norm (Chebyshev for a rectangle, Euclidean for an ellipse), so its area equals
    # the evidence's on that frame exactly and the control keeps the neutral shape
    base = control_mask(union, rng, tries, gap, avoid=avoid, area=int(np.ceil(areas.max() * 1.06)) + 4)
    if base is None:
        return None
    x, y, bw, bh = cv2.boundingRect(base)
    rect = bool((base[y : y + bh, x : x + bw] > 0).all())
    ys, xs = np.nonzero(base)
    dy, dx = (ys - (y + (bh - 1) / 2)) / max(bh, 1), (xs - (x + (bw - 1) / 2)) / max(bw, 1)
    dist = np.maximum(np.abs(dx), np.abs(dy)) if rect else np.hypot(dx, dy)
    order = np.argsort(dist, kind="stable")
    out = np.zeros((t, h, w), bool)
    for i in range(t):
        k = int(areas[i])
        if k:
            sel = order[:k]
            out[i, ys[sel], xs[sel]] = True
    return out


@register
class VideoEdit(Stage):
    name = "edit"
    backend = "video"

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        variants: list[VideoEditType] = Field(["remove", "blackout", "reverse", "shuffle", "freeze"], min_length=1)
        inpaint_method: Literal["telea", "ns"] = "telea"
        inpaint_radius: int = Field(3, ge=1, le=50)
        fill: tuple[int, int, int] = (0, 0, 0)
        shuffle_segments: int = Field(4, ge=2, le=16)
        control_tries: int = Field(64, ge=1)
        control_gap: int = Field(4, ge=0, description="pixels between the control region and the evidence")
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
        m["variants"], m["edits"] = [], {}
        instances = m["instances"]
        for v in p.variants:
            if v == "random_mask":
                ctrl = control_masks(masks, np.random.default_rng([sample.seed, 7]), p.control_tries, p.control_gap)
                if ctrl is None:
                    sample.reject_variant(self.name, v, "no_room_for_control",
                                          "no offset moves the evidence clear of its own footprint in every frame")
                    continue
                out = frames.copy()
                out[ctrl] = np.array(p.fill, np.uint8)
                sample.arrays["masks/random_mask"] = ctrl
                info = {"type": v, "region": "control", "removed_instances": 0, "method": "flat-fill", "affects": []}
            elif v in ("remove", "blackout"):
                if not instances:
                    sample.reject_variant(self.name, v, "no_evidence", "no annotated target to remove")
                    continue
                ev = [t for t in range(n) if masks[t].any()]
                info: dict[str, Any] = {"type": v, "region": "evidence", "removed_instances": len(instances),
                                        "removed": [f"{i['attributes'].get('color', '')} {i['category']}".strip() for i in instances],
                                        "frames": [ev[0], ev[-1]], "t_start": rel[ev[0]], "t_end": rel[ev[-1]]}
                if v == "remove":
                    out, stats = temporal_fill(frames, masks, p.inpaint_radius, p.inpaint_method)
                    info.update(stats, method=f"temporal-median+opencv-{p.inpaint_method}")
                else:
                    out = frames.copy()
                    out[masks > 0] = np.array(p.fill, np.uint8)
                    info["method"] = "flat-fill"
            else:
                order, info = self._temporal(v, n, rel, np.random.default_rng([sample.seed, 11]))
                if order is None:
                    sample.reject_variant(self.name, v, "clip_too_short", info["detail"])
                    continue
                out = frames[order]
                info["frame_order"] = order
                info["removed_instances"] = 0
            sample.arrays[f"variant/{v}"] = np.ascontiguousarray(out)
            m["variants"].append(v)
            m["edits"][v] = info

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


# --- qa -------------------------------------------------------------------------------------


def _phrase(inst: dict[str, Any]) -> str:
    color = str(inst.get("attributes", {}).get("color", "")).strip()
    return f"{color} {inst['category']}".strip()


def track_direction(inst: dict[str, Any], width: int, min_frac: float) -> str | None:
    path = inst["path"]
    if len(path) < 2:
        return None
    dx = path[-1][1] - path[0][1]
    if abs(dx) < min_frac * width:
        return None
    steps = np.diff([pt[1] for pt in path])
    if np.mean(np.sign(steps) == np.sign(dx)) < 0.7:  # not a steady motion one way
        return None
    return "right" if dx > 0 else "left"


def middle_crossing(inst: dict[str, Any], width: int) -> float | None:
    path = inst["path"]
    mid = width / 2
    for (t0, x0, _), (t1, x1, _) in zip(path, path[1:], strict=False):
        if (x0 - mid) * (x1 - mid) <= 0 and x0 != x1 and t1 == t0 + 1:
            return t0 + (mid - x0) / (x1 - x0)
    return None


@register
class VideoQA(Stage):
    name = "qa"
    backend = "video"

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        extra_questions: list[Literal["existence", "count", "direction", "order"]] = Field(
            ["existence", "direction", "order"], description="template question kinds added from the tracks")
        min_motion_frac: float = Field(0.15, ge=0, le=1, description="direction needs this share of the width travelled")
        min_order_gap: float = Field(2.0, ge=0, description="frames between two events for an order question")
        require_answer_change: bool = Field(True, description="drop a variant on which no answer differs from the original")

    def _derived(self, kind: str, insts: list[dict[str, Any]], width: int) -> str | None:
        if kind == "existence":
            return "yes" if insts else None
        if kind == "count":
            return str(len(insts))
        if kind == "direction" and len(insts) == 1:
            return track_direction(insts[0], width, self.params.min_motion_frac)
        return None

    def _templates(self, m: dict[str, Any], width: int) -> list[dict[str, Any]]:
        out = []
        insts = m["instances"]
        phrases: dict[str, list[dict[str, Any]]] = {}
        for i in insts:
            phrases.setdefault(_phrase(i), []).append(i)
        single = [(ph, v[0]) for ph, v in phrases.items() if len(v) == 1]
        for kind in self.params.extra_questions:
            if kind == "existence":
                out += [{"question": f"Is there a {ph} in the video?", "kind": kind, "answer": "yes",
                         "targets": [i["category"]]} for ph, i in single]
            elif kind == "count":
                cats = sorted({i["category"] for i in insts})
                for c in cats:
                    k = sum(i["category"] == c for i in insts)
                    out.append({"question": f"How many {plural(c)} appear in the video?", "kind": kind,
                                "answer": str(k), "targets": [c]})
            elif kind == "direction":
                for ph, i in single:
                    d = track_direction(i, width, self.params.min_motion_frac)
                    if d:
                        out.append({"question": f"Does the {ph} move to the left or to the right?", "kind": kind,
                                    "answer": d, "targets": [i["category"]]})
            elif kind == "order" and len(single) >= 2:
                (pa, a), (pb, b) = single[0], single[1]
                ta, tb = middle_crossing(a, width), middle_crossing(b, width)
                if ta is not None and tb is not None and abs(ta - tb) >= self.params.min_order_gap:
                    out.append({"question": f"Does the {pa} reach the middle of the frame before or after the {pb}?",
                                "kind": kind, "answer": "before" if ta < tb else "after",
                                "targets": [a["category"], b["category"]]})
        return out

    def process(self, sample: Sample) -> None:
        m = sample.meta
        width = m["source"]["width"]
        abstain = self.run.abstain_answer
        items, notes = [], []
        for q in m["questions"]:
            kind = q.get("kind", "other")
            insts = [i for i in m["instances"] if i["category"] in q.get("targets", [])]
            given = q.get("answer")
            derived = self._derived(kind, insts, width)
            if kind == "existence" and given is not None and given.strip().lower() in ("no", "false"):
                notes.append(f"qa: {q['question']!r} dropped: answer {given!r} but the target is annotated")
                continue
            if given is not None and derived is not None and kind == "direction" and given.strip().lower() != derived:
                notes.append(f"qa: {q['question']!r}: given {given!r}, tracks say {derived!r}; the given answer is kept")
            answer = given if given is not None else derived
            if answer is None:
                notes.append(f"qa: {q['question']!r} dropped: no answer given and none derivable")
                continue
            items.append({"question": q["question"], "kind": kind, "answer": answer, "targets": q.get("targets", []),
                          "source": "input"})
        seen = {(it["kind"], tuple(sorted(it["targets"]))) for it in items} | {it["question"].lower() for it in items}
        for t in self._templates(m, width):
            if (t["kind"], tuple(sorted(t["targets"]))) in seen or t["question"].lower() in seen:
                continue
            seen.add((t["kind"], tuple(sorted(t["targets"]))))
            items.append(t | {"source": "template"})
        if not items:
            raise Reject("no_answer", "; ".join(notes)[:400] or "no question with an answer")
        for v in m["variants"]:  # a kind a model edit brought in: absent from the original clip
            cat = m["edits"][v].get("inserted_category")
            if cat and f"is there a {cat} in the video?" not in seen:
                seen.add(f"is there a {cat} in the video?")
                items.append({"question": f"Is there a {cat} in the video?", "kind": "existence", "answer": "no",
                              "targets": [cat], "source": "template"})
        if notes:
            m.setdefault("notes", []).extend(notes)
        qa = []
        for it in items:
            answers = {"orig": it["answer"]}
            for v in m["variants"]:
                e = m["edits"].get(v, {})
                # a model edit that brings in a new kind (replace): questions about it follow insert
                rule_edit = "insert" if e.get("inserted_category") in it["targets"] else v
                removed = (sum(1 for i in m["instances"] if i["category"] in it["targets"])
                           if v in ("remove", "blackout", "replace") else 0)
                try:
                    answers[v] = answer_for(rule_edit, it["kind"], it["answer"], removed=removed,
                                            inserted=e.get("inserted_instances", 0), abstain=abstain)
                except ValueError as exc:
                    raise Reject("answer_rule_failed", str(exc)) from None
            qa.append({k: it[k] for k in ("question", "kind", "targets", "source")} | {"answers": answers})
        m["qa"] = qa
        if self.params.require_answer_change:
            for v in list(m["variants"]):
                if v != "random_mask" and all(q["answers"][v] == q["answers"]["orig"] for q in qa):
                    sample.reject_variant(self.name, v, "answers_unchanged",
                                          f"no question's answer differs from the original under {v}")


# --- verify ---------------------------------------------------------------------------------


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


def _ring(mask: np.ndarray, px: int) -> np.ndarray:
    k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * px + 1, 2 * px + 1))
    return (cv2.dilate(mask.astype(np.uint8), k) > 0) & ~mask


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
            out = a[f"variant/{v}"]
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
                region = a["masks/random_mask"] if v == "random_mask" else masks
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
                        ring = _ring(masks[t], p.ring_px)
                        if not sel.any() or not ring.any():
                            continue
                        b = float(np.abs(frames[t][sel].mean(0) - frames[t][ring].mean(0)).max())
                        af = float(np.abs(out[t][sel].mean(0) - out[t][ring].mean(0)).max())
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
