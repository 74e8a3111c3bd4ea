"""ingest for clips (``backend: video``): PyAV decode, timestamp sampling at ``fps``, capped
(see ``video_io``); a procedural clip is rendered and taken through the same decode path."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from counterfactory import video_scenes
from counterfactory.sample import Reject, Sample, Stage
from counterfactory.stages import register
from counterfactory.stages.shared import array_digest, raise_input_error, read_source, sample_key
from counterfactory.video_io import Caps, VideoError, decode_clip, encode_mp4

_CAPS = Caps()


@register
class VideoIngest(Stage):
    name = "ingest"
    backend = "video"

    class Params(BaseModel):  # the defaults are video_io's (``Caps``), written there once
        model_config = ConfigDict(extra="forbid")
        fps: float = Field(_CAPS.fps, gt=0, le=60, description="sampling rate (never above the source's)")
        max_frames: int = Field(_CAPS.max_frames, ge=2, le=1000, description="sampled frames kept per clip")
        min_frames: int = Field(_CAPS.min_frames, ge=1)
        max_side: int = Field(_CAPS.max_side, ge=16, description="frames downscaled to at most this side (even sizes)")
        max_duration_s: float = Field(_CAPS.max_duration_s, gt=0,
                                      description="longer clips (after the span) are rejected unread")
        over_frames: Literal["trim", "reject"] = Field(_CAPS.over_frames,
                                                       description="clips over max_frames: keep the first max_frames, or reject")
        vfr: Literal["resample", "reject"] = _CAPS.vfr

    def caps(self) -> Caps:
        p = self.params
        limits = self.run.limits
        return Caps(fps=p.fps, max_frames=p.max_frames, min_frames=p.min_frames, max_side=p.max_side,
                    max_pixels=limits.max_pixels, max_duration_s=p.max_duration_s,
                    over_frames=p.over_frames, vfr=p.vfr)

    def process(self, sample: Sample) -> None:
        m = sample.meta
        raise_input_error(m)
        if m.get("media") != "video":
            raise Reject("not_a_video_input", "the video ingest backend reads video_manifest/procedural_video inputs")
        ref = m["uri"]
        span = tuple(m["span"]) if m.get("span") else None
        if ref.startswith("procedural-video://"):
            seed, index, size, n, fps = video_scenes.parse_clip_uri(ref)
            spec = video_scenes.clip_spec(seed, index, size, n, fps)
            raw = video_scenes.render_clip(spec)
            digest = array_digest(raw)
            src: Path | bytes = encode_mp4(raw, fps)  # through the real decode path
            fmt = "procedural"
        else:  # an object-store or web URI is decoded from memory, a local file from its path
            src, digest = read_source(ref, stream_local=True)
            fmt = None
        try:
            clip = decode_clip(src, self.caps(), span)
        except VideoError as exc:
            raise Reject(exc.reason, exc.detail) from None
        qtext = "\n".join(q["question"].strip() for q in m["questions"])
        sample.key = sample_key(digest, f"{qtext}\nspan={list(span) if span else None}")
        info = clip.info
        if fmt:
            info["format"] = fmt
        m["source"] = {"video": m.pop("uri"), "origin": m.pop("origin"), "sha256": digest, "times": clip.times, **info}
        sample.arrays["video"] = clip.frames
