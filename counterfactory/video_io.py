"""Video in and out: capped, timestamp-based frame sampling with PyAV, and byte-stable encoding.

Decoding never holds a long clip whole: frames are decoded one at a time, only the sampled ones
are kept (downscaled at once), and decoding stops at ``max_frames`` sampled frames. The cap rule:

- a clip (after its optional span) longer than ``max_duration_s`` is rejected before decoding;
- a clip that would give more than ``max_frames`` frames at the sampling rate is trimmed to its
  first ``max_frames`` frames (``over_frames="trim"``, noted in the source info) or rejected
  (``over_frames="reject"``);
- frames above ``max_pixels`` are rejected before decoding; fewer than ``min_frames`` sampled
  frames is a reject too.

Encoding (H.264 via libx264, yuv420p) uses fixed settings, one thread and bit-exact muxing, so
the same frames give the same bytes on the same machine; mask archives are zip files with a
fixed entry date.

``MAX_PIXELS`` is the one default pixel cap, of a clip's frames here and of an image
(``sample.LimitsConfig.max_pixels``): the sample contract imports it, so PyAV and OpenCV are
imported where they are used, not with this module.
"""

from __future__ import annotations

import contextlib
import io
import zipfile
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import av

# The default pixel cap of one decoded picture: a clip's frame (``Caps``) or an image
# (``LimitsConfig.max_pixels``, config ``limits.max_pixels``, which the video ingest passes on)
MAX_PIXELS = 16_000_000

# Fixed encoder settings: part of the output format (changing them changes every shard's bytes).
X264_OPTIONS = {
    "crf": "18",
    "preset": "medium",
    "g": "16",  # fixed GOP
    "keyint_min": "16",
    "sc_threshold": "0",  # no scene-cut keyframes: GOP structure independent of content
    "bf": "0",
    "threads": "1",
    # No lookahead and no mb-tree: with them, the same clip encoded to different bytes in about
    # 2 of 5 test processes that had run torch models first (6 of 6 identical without).
    "x264-params": "threads=1:lookahead-threads=1:sliced-threads=0:rc-lookahead=0:mbtree=0",
}
ZIP_DATE = (1980, 1, 1, 0, 0, 0)
_CONTAINER_MAGIC = (b"ftyp", b"\x1a\x45\xdf\xa3", b"RIFF", b"OggS", b"FLV", b"\x00\x00\x01\xba", b"moov", b"mdat")


class VideoError(Exception):
    """A data fault of one input video: ``reason`` is the rejects-ledger reason."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass
class Caps:
    fps: float = 8.0
    max_frames: int = 48
    min_frames: int = 4
    max_side: int = 320
    max_pixels: int = MAX_PIXELS
    max_duration_s: float = 600.0
    over_frames: str = "trim"  # or "reject"
    vfr: str = "resample"  # or "reject"


@dataclass
class Clip:
    frames: np.ndarray  # T x H x W x 3 uint8, H and W even
    times: list[float]  # source timestamps (seconds) of the sampled frames
    info: dict[str, Any] = field(default_factory=dict)


def _looks_like_container(head: bytes) -> bool:
    return any(m in head[:64] for m in _CONTAINER_MAGIC)


def even_size(w: int, h: int, max_side: int) -> tuple[int, int, float, float]:
    """Target size: at most ``max_side``, both sides even (yuv420p); returns (w, h, sx, sy)."""
    s = min(1.0, max_side / max(w, h))
    nw, nh = max(2, int(round(w * s / 2)) * 2), max(2, int(round(h * s / 2)) * 2)
    return nw, nh, nw / w, nh / h


def decode_clip(src: Path | bytes, caps: Caps, span: tuple[float, float | None] | None = None) -> Clip:
    """Sample frames at ``caps.fps`` (never above the source rate) from ``span`` of the video."""
    import av
    import cv2

    notes: list[str] = []
    try:
        container = av.open(io.BytesIO(src) if isinstance(src, bytes) else str(src), mode="r")
    except av.error.FFmpegError as exc:
        head = src[:64] if isinstance(src, bytes) else Path(src).open("rb").read(64)
        reason = "corrupt_video" if _looks_like_container(head) else "not_a_video"
        raise VideoError(reason, f"{type(exc).__name__}: {exc}") from None
    with container:
        if not container.streams.video:
            kinds = sorted({s.type for s in container.streams})
            raise VideoError("no_video_stream", f"streams: {', '.join(kinds) or 'none'}")
        stream = container.streams.video[0]
        cc = stream.codec_context
        w, h = int(cc.width or 0), int(cc.height or 0)
        if w <= 0 or h <= 0:
            raise VideoError("corrupt_video", "video stream has no frame size")
        if w * h > caps.max_pixels:
            raise VideoError("too_large", f"{w}x{h} = {w * h} pixels per frame > cap {caps.max_pixels}")
        rate = stream.average_rate or stream.guessed_rate
        src_fps = float(rate) if rate else None
        tb = stream.time_base
        duration = None
        if stream.duration is not None and tb is not None:
            duration = float(stream.duration * tb)
        elif container.duration is not None:
            duration = container.duration / 1_000_000
        t0 = float(span[0]) if span else 0.0
        t1 = float(span[1]) if span and span[1] is not None else None
        if duration is not None:
            if t0 >= duration:
                raise VideoError("span_outside_video", f"span starts at {t0}s, video lasts {duration:.3f}s")
            if t1 is not None and t1 > duration:
                t1 = duration
        length = ((t1 if t1 is not None else duration) - t0) if duration is not None else None
        if length is not None and length > caps.max_duration_s:
            raise VideoError("too_long", f"{length:.2f}s > max_duration_s {caps.max_duration_s}")
        fps = min(caps.fps, src_fps) if src_fps else caps.fps
        step = 1.0 / fps
        tol = 0.25 * step + 1e-6  # a frame this close to a sample point stands for it
        if length is not None and int(np.floor(length * fps + 1e-6)) > caps.max_frames:
            if caps.over_frames == "reject":
                raise VideoError("too_long", f"{length:.2f}s at {fps:g} fps > max_frames {caps.max_frames}")
            notes.append(f"trimmed to the first {caps.max_frames} frames ({caps.max_frames / fps:.2f}s of {length:.2f}s)")
        # times count from the stream's first timestamp (an MPEG-TS starts at ~1.4 s, an edited
        # MP4 anywhere): spans, keyframe times and frame numbers are all relative to it
        start = float(stream.start_time * tb) if stream.start_time is not None and tb is not None else 0.0
        nw = nh = 0
        sx = sy = 1.0
        quarter_turns = 0  # counterclockwise, from the display matrix of the first frame
        if t0 > 0 and tb is not None:
            container.seek(int((t0 + start) / tb), stream=stream, backward=True)
        frames: list[np.ndarray] = []
        times: list[float] = []
        deltas: list[float] = []
        last_ts: float | None = None
        target = t0
        n_decoded = 0
        try:
            for frame in container.decode(stream):
                if frame.pts is None or frame.time is None:
                    continue
                ts = float(frame.time) - start
                if last_ts is not None and ts > last_ts:
                    deltas.append(ts - last_ts)
                last_ts = ts
                n_decoded += 1
                if ts < t0 - 1e-6:
                    continue
                if t1 is not None and ts >= t1 - 1e-6:
                    break
                if duration is None and ts - t0 > caps.max_duration_s:
                    raise VideoError("too_long", f"over {caps.max_duration_s}s (no duration in the header)")
                if ts < target - tol:
                    continue  # between sample points
                if len(frames) >= caps.max_frames:
                    if caps.over_frames == "reject":
                        raise VideoError("too_long", f"more than max_frames {caps.max_frames} at {fps:g} fps")
                    if not any(n.startswith("trimmed") for n in notes):
                        notes.append(f"trimmed to the first {caps.max_frames} frames")
                    break
                if not frames:  # sizes as displayed: a phone video stored sideways is turned upright
                    quarter_turns = int(round(float(getattr(frame, "rotation", 0) or 0) / 90)) % 4
                    dw, dh = (h, w) if quarter_turns % 2 else (w, h)
                    nw, nh, sx, sy = even_size(dw, dh, caps.max_side)
                    if quarter_turns:
                        notes.append(f"rotated {90 * quarter_turns} degrees counterclockwise (display matrix)")
                    if (nw, nh) != (dw, dh):
                        notes.append(f"frames resized from {dw}x{dh} to {nw}x{nh}")
                rgb = frame.to_ndarray(format="rgb24")
                if quarter_turns:
                    rgb = np.rot90(rgb, quarter_turns)
                if rgb.shape[1] != nw or rgb.shape[0] != nh:
                    rgb = cv2.resize(rgb, (nw, nh), interpolation=cv2.INTER_AREA)
                frames.append(np.ascontiguousarray(rgb))
                times.append(round(ts, 6))
                while target <= ts + tol:
                    target += step
        except av.error.FFmpegError as exc:
            if len(frames) < caps.min_frames:
                raise VideoError("decode_error", f"{type(exc).__name__}: {exc}") from None
            notes.append(f"decoding stopped early after {len(frames)} frames: {type(exc).__name__}")
        if len(frames) < caps.min_frames:
            raise VideoError("too_few_frames", f"{len(frames)} sampled frame(s) ({n_decoded} decoded) < min_frames {caps.min_frames}")
        vfr = False
        if len(deltas) >= 3:
            d = np.asarray(deltas)
            vfr = bool(d.max() > 1.5 * np.median(d))
        if vfr:
            if caps.vfr == "reject":
                raise VideoError("variable_frame_rate", f"frame intervals from {d.min():.4f}s to {d.max():.4f}s")
            notes.append("variable frame rate: sampled by timestamp")
        fps_frac = Fraction(fps).limit_denominator(1001)
        info = {
            "format": container.format.name, "codec": cc.name, "src_width": w, "src_height": h,
            "rotation": 90 * quarter_turns, "start_time": round(start, 6),
            "width": nw, "height": nh, "scale": [round(sx, 6), round(sy, 6)],
            "src_fps": round(src_fps, 4) if src_fps else None, "fps": float(fps_frac),
            "fps_fraction": [fps_frac.numerator, fps_frac.denominator],
            "duration": round(duration, 4) if duration is not None else None,
            "span": [t0, t1], "frames": len(frames), "vfr": vfr, "notes": notes,
        }
    return Clip(np.stack(frames), times, info)


def encode_mp4(frames: np.ndarray, fps: float | Fraction | list[int]) -> bytes:
    """H.264 mp4 with fixed settings (see ``X264_OPTIONS``): same frames, same bytes."""
    if isinstance(fps, list | tuple):
        rate = Fraction(int(fps[0]), int(fps[1]))
    else:
        rate = Fraction(fps).limit_denominator(1001)
    t, h, w = frames.shape[:3]
    if h % 2 or w % 2:
        raise ValueError(f"frame size {w}x{h} must be even for yuv420p")
    import av

    buf = io.BytesIO()
    with _ieee_denormals(), av.open(buf, mode="w", format="mp4", options={"fflags": "+bitexact"}) as c:
        s = c.add_stream("libx264", rate=rate)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        s.codec_context.thread_count = 1
        s.codec_context.options = dict(X264_OPTIONS)
        for i in range(t):
            fr = _yuv420p_frame(frames[i])
            fr.pts = i
            for p in s.encode(fr):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return buf.getvalue()


@contextlib.contextmanager
def _ieee_denormals():
    """x264's float decisions (rate control, psy, mb-tree) depend on the thread's
    flush-to-zero/denormals-are-zero flags. Some library loaded into the process sets them
    (a fast-math build does so at load time), so the same clip encoded to different bytes
    depending on what had been imported. Encode with IEEE behaviour, always: measured, the
    flags toggled through torch changed the output; pinned, 10 of 10 encodes agree."""
    import torch

    torch.set_flush_denormal(False)
    yield


def _yuv420p_frame(rgb: np.ndarray) -> av.VideoFrame:
    """An encoder-ready frame whose every byte is written by us. Frames from
    ``VideoFrame.from_ndarray`` + swscale leave the row padding of each plane uninitialized,
    and the same clip then encoded to different bytes in a long-running process (seen after
    model tests had churned the heap). OpenCV does the RGB -> I420 conversion (BT.601,
    deterministic), and the planes are copied in with zeroed padding."""
    import av
    import cv2

    h, w = rgb.shape[:2]
    flat = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2YUV_I420).ravel()
    n, c = h * w, (h // 2) * (w // 2)  # planes are packed back to back, not row-aligned
    y = flat[:n].reshape(h, w)
    u = flat[n : n + c].reshape(h // 2, w // 2)
    v = flat[n + c : n + 2 * c].reshape(h // 2, w // 2)
    frame = av.VideoFrame(w, h, "yuv420p")
    for plane, data in zip(frame.planes, (y, u, v), strict=True):
        padded = np.zeros((data.shape[0], plane.line_size), np.uint8)
        padded[:, : data.shape[1]] = data
        plane.update(padded.tobytes())
    return frame


def encode_npz(arrays: dict[str, np.ndarray]) -> bytes:
    """``np.savez_compressed`` layout with a fixed entry date (numpy stamps the current time)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name in sorted(arrays):
            info = zipfile.ZipInfo(f"{name}.npy", date_time=ZIP_DATE)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            arr = io.BytesIO()
            np.lib.format.write_array(arr, np.ascontiguousarray(arrays[name]), allow_pickle=False)
            zf.writestr(info, arr.getvalue(), compresslevel=6)
    return buf.getvalue()


def read_frames(data: bytes) -> tuple[np.ndarray, float]:
    """Every frame of an mp4 (tests and readers) and its average frame rate."""
    import av

    with av.open(io.BytesIO(data)) as c:
        st = c.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(st)]
        return np.stack(frames), float(st.average_rate)
