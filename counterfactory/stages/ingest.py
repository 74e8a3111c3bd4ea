"""ingest: read the source bytes, decode to upright 8-bit RGB under the pixel cap, hash, key.

Odd but valid images are normalized, not rejected: EXIF orientation is applied, grayscale,
palette, CMYK and 16-bit images become 8-bit RGB, alpha is composited on white, and the first
frame of a multi-frame file is used; what was done is recorded in the sample's source info.
Broken files (missing, empty, truncated, not an image, too small, over the cap) are rejected
with a reason.
"""

from __future__ import annotations

import io
import itertools
import math
import warnings
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict

from counterfactory import scenes
from counterfactory.rules import exhaustive_categories
from counterfactory.sample import Reject, Sample, Stage
from counterfactory.stages import register
from counterfactory.stages.shared import array_digest, raise_input_error, read_source, sample_key

# The pipeline checks the declared size against its own cap before decoding, so PIL's
# decompression-bomb guard (which raises on large but legitimate photos) is not needed.
Image.MAX_IMAGE_PIXELS = None


_SIGNATURES = ((b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"GIF87a", "GIF"), (b"GIF89a", "GIF"),
               (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"), (b"BM", "BMP"))


def _signature(data: bytes) -> str | None:
    """The image format a file's first bytes announce, if any."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    return next((fmt for sig, fmt in _SIGNATURES if data.startswith(sig)), None)


def _finite(v: Any) -> bool:
    if not isinstance(v, int | float) or isinstance(v, bool):
        return False
    try:
        return math.isfinite(v)
    except OverflowError:  # an int too large for a float (JSON allows 400 digits): not a coordinate
        return False


def _is_polygon(p: Any) -> bool:
    if not isinstance(p, list):
        return False
    # the common case, JSON's points ([x, y] lists of floats or ints) checked in C-level passes
    # (issue 27: a procedural scene's ~150 points cost ~0.4 ms per input one call per number);
    # anything else (tuples, bools, strings, an int too large for a float) takes the full check
    try:
        if (set(map(type, p)) <= {list} and set(map(len, p)) <= {2}
                and set(map(type, itertools.chain.from_iterable(p))) <= {float, int}):
            return all(map(math.isfinite, itertools.chain.from_iterable(p)))
    except OverflowError:
        pass
    return all(isinstance(q, list | tuple) and len(q) == 2 and _finite(q[0]) and _finite(q[1]) for q in p)


def check_objects(objects: Any, max_objects: int) -> None:
    """Annotations a later stage can use as they are, or a reject naming what is wrong: checked
    before any pixel is read, so a malformed box is ``bad_box``, never a crash or a misleading
    ``box_outside_image``, and 10,000 boxes are ``too_many_objects``, never 10,000 GrabCuts."""
    if not isinstance(objects, list):
        raise Reject("bad_annotation", f"'objects' must be a list, not {type(objects).__name__}")
    if len(objects) > max_objects:
        raise Reject("too_many_objects", f"{len(objects)} objects > limits.max_objects {max_objects}")
    for i, o in enumerate(objects):
        if not isinstance(o, dict):
            raise Reject("bad_annotation", f"objects[{i}] is not an object: {str(o)[:80]}")
        if "category" in o and not (isinstance(o["category"], str) and o["category"]):
            raise Reject("bad_annotation", f"objects[{i}].category must be a non-empty string: {str(o['category'])[:80]}")
        if "box" in o and not (isinstance(o["box"], list | tuple) and len(o["box"]) == 4 and all(map(_finite, o["box"]))):
            raise Reject("bad_box", f"objects[{i}].box {str(o['box'])[:80]} is not [x0, y0, x1, y1] (4 finite numbers)")
        if "polygon" in o and not _is_polygon(o["polygon"]):
            raise Reject("bad_polygon", f"objects[{i}].polygon is not a list of [x, y] points: {str(o['polygon'])[:80]}")
        if "polygons" in o and not (isinstance(o["polygons"], list) and all(map(_is_polygon, o["polygons"]))):
            raise Reject("bad_polygon", f"objects[{i}].polygons is not a list of polygons: {str(o['polygons'])[:80]}")
        if "attributes" in o and not isinstance(o["attributes"], dict):
            raise Reject("bad_annotation", f"objects[{i}].attributes must be an object: {str(o['attributes'])[:80]}")


def _to_rgb(img: Image.Image) -> tuple[np.ndarray, list[str]]:
    notes: list[str] = []
    mode = img.mode
    arr = np.asarray(img) if mode.startswith("I") else None
    if arr is not None and arr.min() >= 0 and arr.max() <= 65535:
        # 16-bit sources (PIL opens them as I;16 or I) use the full 0..65535 range; PIL's own
        # convert("L") would clip at 255.
        arr8 = (arr.astype(np.float64) / 257.0).round().astype(np.uint8)
        notes.append(f"{mode} scaled to 8 bit")
        return np.repeat(arr8[..., None], 3, axis=2), notes
    if mode == "F" or arr is not None:  # float, or 32-bit integers beyond 16 bits: their own range
        arr = np.asarray(img, dtype=np.float64)
        finite = np.isfinite(arr)
        lo, hi = (float(arr[finite].min()), float(arr[finite].max())) if finite.any() else (0.0, 0.0)
        with np.errstate(invalid="ignore", over="ignore"):
            arr8 = np.where(finite, (arr - lo) / (hi - lo or 1.0) * 255, 0).round().astype(np.uint8)
        notes.append(f"{mode} image min-max scaled to 8 bit" + ("" if finite.all() else ", NaN/inf as 0"))
        return np.repeat(arr8[..., None], 3, axis=2), notes
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba).convert("RGB")
        notes.append("alpha composited on white")
    if img.mode != "RGB":
        notes.append(f"{mode} converted to RGB")
        img = img.convert("RGB")
    return np.asarray(img, dtype=np.uint8).copy(), notes


def _scale_objects(objects: list[dict[str, Any]], s: float) -> list[dict[str, Any]]:
    out = []
    for o in objects:
        o = dict(o)
        if "box" in o:
            o["box"] = [float(v) * s for v in o["box"]]
        if "polygon" in o:
            o["polygon"] = [[float(x) * s, float(y) * s] for x, y in o["polygon"]]
        if "polygons" in o:
            o["polygons"] = [[[float(x) * s, float(y) * s] for x, y in p] for p in o["polygons"]]
        out.append(o)
    return out


@register
class Ingest(Stage):
    name = "ingest"
    backend = "default"

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")

    def _decode(self, data: bytes, sample: Sample) -> tuple[np.ndarray, dict[str, Any]]:
        limits = self.run.limits
        max_pixels = limits.max_pixels
        try:
            img = Image.open(io.BytesIO(data))
        except UnidentifiedImageError:
            fmt = _signature(data)
            if fmt:  # a PNG with a bad chunk CRC, a JPEG with a broken header: damaged, not foreign
                raise Reject("corrupt_image", f"{len(data)} bytes that start as {fmt} but do not decode") from None
            raise Reject("not_an_image", f"{len(data)} bytes that no image decoder recognizes") from None
        except Exception as exc:  # noqa: BLE001 - PIL raises many types for corrupt headers
            raise Reject("decode_error", f"{type(exc).__name__}: {exc}") from None
        info: dict[str, Any] = {"format": img.format, "mode": img.mode, "frames": getattr(img, "n_frames", 1)}
        w, h = img.size
        scale = 1.0
        if w * h > max_pixels:
            if limits.oversize == "reject":
                raise Reject("too_large", f"{w}x{h} = {w * h} pixels > cap {max_pixels}")
            scale = (max_pixels / (w * h)) ** 0.5
            img.draft("RGB", (int(w * scale), int(h * scale)))  # JPEG: decode at reduced size
            dw, dh = img.size  # what load() decodes: reduced for a JPEG, the full canvas otherwise
            cap = limits.max_decode_pixels
            if dw * dh > cap:
                raise Reject("too_large", f"{w}x{h} {img.format} decodes at {dw}x{dh} = {dw * dh} pixels before "
                                          f"downscaling > limits.max_decode_pixels {cap}")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                img.load()
                oriented = ImageOps.exif_transpose(img)
        except Exception as exc:  # noqa: BLE001 - truncated or corrupt pixel data
            raise Reject("decode_error", f"{type(exc).__name__}: {exc}") from None
        info["exif_orientation"] = int(img.getexif().get(0x0112, 1) or 1)
        arr, notes = _to_rgb(oriented)
        if scale < 1.0:
            import cv2

            # annotation coordinates refer to the full-size upright image, not to a JPEG draft
            ow, oh = (h, w) if info["exif_orientation"] in (5, 6, 7, 8) else (w, h)
            nh, nw = max(1, int(oh * scale)), max(1, int(ow * scale))
            # draft() may already have reduced a JPEG; resize the rest of the way
            arr = cv2.resize(arr, (nw, nh), interpolation=cv2.INTER_AREA)
            scale = nw / ow
            notes.append(f"downscaled from {ow}x{oh} to {nw}x{nh}")
        info["scale"] = scale
        info["notes"] = notes
        return arr, info

    def process(self, sample: Sample) -> None:
        m = sample.meta
        raise_input_error(m)
        check_objects(m.get("objects", []), self.run.limits.max_objects)
        ref = m["uri"]
        if ref.startswith("procedural://"):
            arr = scenes.render_scene(scenes.scene_spec(*scenes.parse_procedural_uri(ref)))
            digest = array_digest(arr)
            info: dict[str, Any] = {"format": "procedural", "mode": "RGB", "frames": 1, "scale": 1.0, "notes": []}
        else:
            data, digest = read_source(ref, self.run.limits.max_image_bytes)
            assert isinstance(data, bytes)
            arr, info = self._decode(data, sample)
        h, w = arr.shape[:2]
        min_side = self.run.limits.min_side
        if min(h, w) < min_side:
            raise Reject("too_small", f"{w}x{h} < min side {min_side}")
        if info["scale"] != 1.0:
            m["objects"] = _scale_objects(m.get("objects", []), info["scale"])
        sample.key = sample_key(digest, m["question"]["question"])
        m["source"] = {"image": m.pop("uri"), "origin": m.pop("origin"), "sha256": digest,
                       "width": w, "height": h, **info}
        # the categories whose every instance the input annotates (qa asserts absence only for
        # those; a record that declares nothing: the categories it annotates); kept with the
        # source so that a reader of the shards can tell too
        if "exhaustive" not in m:
            m["exhaustive"] = exhaustive_categories("annotated", m.get("objects", []))
        m["source"]["exhaustive"] = m["exhaustive"]
        sample.arrays["image"] = np.ascontiguousarray(arr)
