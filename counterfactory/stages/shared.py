"""Helpers the image and video stages share: reading a source, sample keys, morphology
(disk, dilation, rings), the neutral control region (image and clip) and the flat-fill
control variant with its parameters, shape placing for inserts, detection masks.

One copy of each: the image stages (``ingest``, ``segment``, ``edit``, ``verify``), the model
backends (``models/*``) and the video package (``video/*``) import them from here. A little over
~580 lines on purpose: one place to look for each helper, and the helpers build on one another
(the morphology under the control region and the placement).
"""

from __future__ import annotations

import functools
import hashlib
import math
import stat
import statistics
from pathlib import Path
from typing import Any, ClassVar

import cv2
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, model_serializer

from counterfactory import footprint, scenes
from counterfactory.layout import sha256_file
from counterfactory.sample import Reject, Sample
from counterfactory.storage import (
    FetchError,
    ObjectTooLarge,
    StorageError,
    is_remote,
    read_object,
    resolve_path,
)

# --- sources and keys -----------------------------------------------------------------------


def raise_input_error(meta: dict[str, Any]) -> None:
    """An input the driver already found broken (``meta["error"]``: "reason: detail") is
    rejected with that reason by the first stage that sees it."""
    if "error" in meta:
        reason, _, detail = meta["error"].partition(": ")
        raise Reject(reason, detail)


def sample_key(source_sha256: str, question: str) -> str:
    """Stable key from the source content and the question; hex only (no dots for webdataset)."""
    return hashlib.sha256(f"{source_sha256}\n{question.strip()}".encode()).hexdigest()[:24]


def array_digest(arr: np.ndarray) -> str:
    """The sha256 of a rendered (procedural) source: its pixels and its shape."""
    h = hashlib.sha256(np.ascontiguousarray(arr))  # its buffer, not a copy of it (the same digest)
    h.update(str(arr.shape).encode())
    return h.hexdigest()


def local_source(ref: str) -> Path:
    """The file a local source reference names (``pkg:`` paths resolved into the package)."""
    return resolve_path(ref, None) if ref.startswith("pkg:") else Path(ref)


def source_file_size(path: Path, max_bytes: int | None = None) -> int:
    """The size of a source file that can be read, or a reject saying why it cannot."""
    try:
        st = path.stat()
    except (FileNotFoundError, NotADirectoryError):
        raise Reject("file_not_found", str(path)) from None
    except (OSError, ValueError) as exc:  # permissions, a name too long, a NUL in the path
        raise Reject("read_error", f"{path}: {getattr(exc, 'strerror', None) or exc}") from None
    if not stat.S_ISREG(st.st_mode):  # a folder, a FIFO or a device (/dev/zero) is never read
        raise Reject("not_a_file", str(path))
    if max_bytes is not None and st.st_size > max_bytes:
        raise Reject("too_large", f"{path}: {st.st_size} bytes > limits.max_image_bytes {max_bytes}")
    return st.st_size


def read_source_object(uri: str, max_bytes: int | None = None) -> bytes:
    """The bytes of a source named by an object-store or web URI, or a reject saying why not."""
    try:
        return read_object(uri, max_bytes)
    except StorageError as exc:
        raise Reject("unsupported_uri", str(exc).replace("\n", " ")) from None
    except FetchError as exc:
        raise Reject("fetch_error", str(exc)) from None
    except FileNotFoundError:
        raise Reject("file_not_found", uri) from None
    except IsADirectoryError:
        raise Reject("not_a_file", uri) from None
    except ObjectTooLarge as exc:
        raise Reject("too_large", f"{exc} (limits.max_image_bytes)") from None
    except Exception as exc:  # noqa: BLE001 - network and permission errors differ per filesystem
        raise Reject("read_error", f"{uri}: {type(exc).__name__}: {exc}".replace("\n", " ")) from None


def read_source(ref: str, max_bytes: int | None = None, *, stream_local: bool = False) -> tuple[bytes | Path, str]:
    """A (non-procedural) source and the sha256 of its bytes, or a reject saying why not: an
    object-store or web URI is read into memory, a local file too unless ``stream_local`` (a
    clip: decoded from its path, hashed in chunks). An empty source is ``empty_file``."""
    if is_remote(ref):
        data = read_source_object(ref, max_bytes)
        if not data:
            raise Reject("empty_file", ref)
        return data, hashlib.sha256(data).hexdigest()
    path = local_source(ref)
    if source_file_size(path, max_bytes) == 0:
        raise Reject("empty_file", str(path))
    try:
        if stream_local:
            return path, sha256_file(path)
        data = path.read_bytes()
    except OSError as exc:
        raise Reject("read_error", f"{path}: {exc.strerror or exc}") from None
    if not data:  # emptied between the size check and the read
        raise Reject("empty_file", str(path))
    return data, hashlib.sha256(data).hexdigest()


# --- morphology -----------------------------------------------------------------------------


def disk(px: int) -> np.ndarray:
    """The elliptic structuring element of radius ``px``."""
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * px + 1, 2 * px + 1))


def dilate(mask: np.ndarray, px: int) -> np.ndarray:
    if px <= 0:
        return mask
    return cv2.dilate(mask, disk(px))


def ring(mask: np.ndarray, px: int) -> np.ndarray:
    """The ``px``-wide band around a uint8 mask (the mask's own pixels cleared)."""
    return footprint.ring(mask, px)


def cv_inpaint(img: np.ndarray, mask: np.ndarray, radius: float, flag: int = cv2.INPAINT_TELEA) -> np.ndarray:
    """``cv2.inpaint``, deterministic on a one-row image too: OpenCV's Telea reads past the
    image when it has a single row (its output then changed from call to call: 12 of 200 random
    1 x N cases, not one N x 1 or 2 x N), so such an image is inpainted with one replicated row
    (and mask row) on each side, then cut back. Every other size is inpainted as it is, byte for
    byte as before. The mask's rows are replicated too: a pad pixel beside the hole is hole, so
    no copy of the hole's own pixels becomes a known pixel."""
    if img.shape[0] != 1:
        return cv2.inpaint(img, mask, radius, flag)
    padded = cv2.inpaint(cv2.copyMakeBorder(img, 1, 1, 0, 0, cv2.BORDER_REPLICATE),
                         cv2.copyMakeBorder(mask, 1, 1, 0, 0, cv2.BORDER_REPLICATE), radius, flag)
    return np.ascontiguousarray(padded[1:2])


def bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1) of a uint8 mask's non-zero pixels."""
    x, y, w, h = cv2.boundingRect(mask)
    return y, y + h, x, x + w


def box_of(mask: np.ndarray) -> tuple[slice, slice]:
    """(rows, columns) of the bounding box of a mask's non-zero pixels, the whole image when it
    has none: where a per-pixel step or a masked figure needs to read (issue 27; uint8 sums are
    exact integers, so a masked mean over the box is the same number as over the whole image)."""
    y0, y1, x0, x1 = bbox(mask if mask.dtype == np.uint8 else (mask != 0).view(np.uint8))
    return (slice(y0, y1), slice(x0, x1)) if y1 > y0 and x1 > x0 else (slice(None), slice(None))


def det_mask(det: dict[str, Any], w: int, h: int) -> np.ndarray:
    """A detection's pixels (bool, h x w): its polygon, else its box."""
    if "polygon" in det:
        return scenes.polygon_mask(det["polygon"], w, h).copy()
    x0, y0, x1, y1 = det["box"]
    out = np.zeros((h, w), bool)
    out[max(0, int(np.floor(y0))):max(0, int(np.ceil(y1))), max(0, int(np.floor(x0))):max(0, int(np.ceil(x1)))] = True
    return out


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.count_nonzero(a | b)
    return float(np.count_nonzero(a & b)) / union if union else 0.0


# --- the evidence mask: instances merged, then dilated --------------------------------------


def margin_px(instances: list[dict[str, Any]], dilate_px: int, dilate_frac: float) -> int:
    """The dilation margin: ``dilate_px`` plus ``dilate_frac`` of the square root of the median
    instance area (the typical instance, not the union: 24 coins are not one big coin)."""
    # statistics.median: np.median's number for these integers (the middle one, or the mean of
    # the middle two) without its array machinery (issue 27)
    typical = float(statistics.median([i["mask_area"] for i in instances])) if instances else 0.0
    return dilate_px + int(round(dilate_frac * math.sqrt(typical)))


def set_evidence_mask(sample: Sample, core: np.ndarray, dilate_px: int, dilate_frac: float) -> None:
    """An image's evidence (``core``: uint8 0/1, the instances merged) dilated by the margin:
    arrays ``mask_core`` and ``mask`` (0/255) and its figures in ``meta["mask"]``."""
    h, w = core.shape
    px = margin_px(sample.meta["instances"], dilate_px, dilate_frac)
    mask = dilate(core, px)
    sample.arrays["mask_core"] = core * 255
    sample.arrays["mask"] = mask * 255
    # 0/1 masks: their sums are their counts (issue 27: OpenCV's count, not numpy's sum)
    area = cv2.countNonZero(mask)
    sample.meta["mask"] = {"core_area": cv2.countNonZero(core), "area": area,
                           "area_frac": round(float(area) / (h * w), 6), "dilate_px": px}


def set_clip_masks(sample: Sample, core: np.ndarray, labels: np.ndarray, dilate_px: int, dilate_frac: float) -> None:
    """A clip's evidence (``core``: T x H x W uint8 0/1, the tracks merged) dilated frame by
    frame by the margin: arrays ``masks_core``, ``masks``, ``labels``, figures in ``meta["mask"]``."""
    instances = sample.meta["instances"]
    px = margin_px(instances, dilate_px, dilate_frac)
    masks = np.stack([dilate(c, px) for c in core]) if instances else core.copy()
    frac = masks.reshape(len(core), -1).mean(axis=1)
    sample.arrays["masks_core"], sample.arrays["masks"], sample.arrays["labels"] = core, masks, labels
    sample.meta["mask"] = {"area_frac": round(float(frac.mean()), 6), "max_area_frac": round(float(frac.max()), 6),
                           "frames_with_evidence": int((frac > 0).sum()), "core_area": int(core.sum()),
                           "dilate_px": px}


# --- where an edit may act (issue 16) -------------------------------------------------------


class Skip(Exception):
    """This variant cannot be made for this sample (recorded as a variant reject)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def annotated_mask(sample: Sample) -> np.ndarray:
    """uint8 0/255 mask of every object the sample knows about: each annotated object (its
    polygons, else its box) and each evidence instance. The fill never copies from them, the
    control never covers them."""
    h, w = sample.arrays["mask"].shape
    out = np.zeros((h, w), np.uint8)
    for o in [*sample.meta.get("annotated", []), *sample.meta.get("instances", [])]:
        if o.get("polygons"):
            # drawn straight into the union (issue 27): polygon_mask's rasterization (fillPoly,
            # 8-connected, its rounded points), without a whole-image mask and index per polygon;
            # one call each (several contours in one call would leave their overlap empty)
            for poly in o["polygons"]:
                cv2.fillPoly(out, [scenes._points(poly)], 255, lineType=cv2.LINE_8)
        elif o.get("box"):
            x0, y0, x1, y1 = (int(round(v)) for v in o["box"])
            out[max(0, y0):max(0, y1), max(0, x0):max(0, x1)] = 255
    if "mask_core" in sample.arrays:
        out |= (sample.arrays["mask_core"] > 0).astype(np.uint8) * 255
    return out


def annotated_mask_of(sample: Sample) -> np.ndarray:
    """``annotated_mask(sample)``, made once per sample (read-only; issue 27: the fill, the
    control and the swap each drew every polygon again). Kept while the sample's evidence masks
    are the same arrays: segment sets them with the instances they are made of."""
    def make() -> np.ndarray:
        m = annotated_mask(sample)
        m.flags.writeable = False
        return m

    return sample.memo("annotated_mask", make, "mask", "mask_core")


def annotated_keepout(sample: Sample, skip: tuple[int, ...] = ()) -> np.ndarray:
    """uint8 0/255: every annotated object's pixels (``annotated_mask``) and its box (a hand-drawn
    polygon on a photo is loose: a spoon's handle can lie outside it, never outside its box).
    What a control and a moved object keep off (issue 31). ``skip``: indices into
    ``meta["annotated"]`` left out (the objects a swap moves; the evidence's instances and core
    are then left out too, the caller moves them)."""
    h, w = sample.arrays["mask"].shape
    out = annotated_mask_of(sample).copy() if not skip else np.zeros((h, w), np.uint8)
    for i, o in enumerate(sample.meta.get("annotated", [])):
        if i in skip:
            continue
        for poly in (o.get("polygons") or []) if skip else []:  # else annotated_mask drew them already
            out[scenes.polygon_mask(poly, w, h)] = 255
        if o.get("box"):
            x0, y0, x1, y1 = (int(round(v)) for v in o["box"])
            out[max(0, y0):max(0, y1), max(0, x0):max(0, x1)] = 255
    return out


CONTROL_SHAPES = ("rectangle", "ellipse")


def control_mask(evidence: np.ndarray, rng: np.random.Generator, tries: int, gap: int,
                 avoid: np.ndarray | None = None, area: int | None = None) -> np.ndarray | None:
    """DeFacto's control region: a shape of the evidence's area from a fixed neutral family
    (rectangle or ellipse, aspect 1:2 to 2:1), never the evidence's own silhouette (a black star
    pasted elsewhere is a new star), placed ``gap`` pixels clear of the evidence and of every
    pixel of ``avoid`` (all annotated objects). ``tries`` (shape, aspect) draws; for each, every
    position that fits is found at once (an integral image over the shape's box) and one is
    drawn, so a spot is missed only when none exists. ``area``: the shape's area when not the
    evidence's (a clip's largest frame). None when nothing fits."""
    h, w = evidence.shape
    if avoid is not None and evidence.dtype == avoid.dtype == np.uint8:
        # 1 where either is non-zero, as below, in OpenCV passes (issue 27): the same integral
        # 0/255: a box sum is zero exactly where the 0/1 one is (issue 27, s28fill: no cv2.min)
        keepout = cv2.dilate(cv2.bitwise_or(evidence, avoid), disk(gap))
    else:
        blocked = evidence > 0 if avoid is None else (evidence > 0) | (avoid > 0)
        keepout = cv2.dilate(blocked.astype(np.uint8), disk(gap))
    # int32 sums only while they cannot wrap (a 0/255 keepout: 255 * h * w; OpenCV's int32
    # subtract below saturates, so a wrapped integral would misplace spots): float64 past that,
    # exact under 2^53 (4000 x 3000 with most of it kept out wrapped)
    integ = cv2.integral(keepout, sdepth=cv2.CV_32S if 255 * h * w < 1 << 31 else cv2.CV_64F)
    area = cv2.countNonZero(evidence) if area is None else area
    if not area:
        return None
    for _ in range(min(tries, 8)):
        kind = CONTROL_SHAPES[int(rng.integers(len(CONTROL_SHAPES)))]
        aspect = float(np.exp(rng.uniform(np.log(0.5), np.log(2.0))))
        # an ellipse inscribed in a box of area A*4/pi has area A
        box_area = area * (4 / np.pi if kind == "ellipse" else 1.0)
        bw = int(round(np.sqrt(box_area * aspect)))
        bh = int(round(box_area / max(bw, 1)))
        if not (0 < bw <= w and 0 < bh <= h):
            continue
        shape = _neutral_shape(kind, bw, bh)
        for _ in range(3):  # a small ellipse rasterizes a few % off its area: rescale to match
            k = np.sqrt(area / max(int(shape.sum()), 1))
            if abs(k * k - 1) <= 0.01:
                break
            bw, bh = max(1, int(round(bw * k))), max(1, int(round(bh * k)))
            shape = _neutral_shape(kind, bw, bh)
        bh, bw = shape.shape
        if not (bw <= w and bh <= h):
            continue
        # the box sums of every spot in OpenCV passes on the integral's int32 views (issue 27,
        # s28fill: numpy's three subtractions and compare were most of a try): the same integers
        box = cv2.add(cv2.subtract(integ[bh:, bw:], integ[:-bh, bw:]), cv2.subtract(integ[:-bh, :-bw], integ[bh:, :-bw]))
        # a 1 x 1 box (the shape as large as the image) beside a number is a scalar to OpenCV
        # (a 4 x 1 answer of spots that do not exist): numpy's compare there
        y, x = _nth_true(cv2.compare(box, 0, cv2.CMP_EQ) if box.size > 1 else box == 0, rng)
        if y < 0:
            continue
        out = np.zeros((h, w), np.uint8)
        out[y : y + bh, x : x + bw][shape] = 255
        return out
    return None


def _nth_true(free: np.ndarray, rng: np.random.Generator) -> tuple[int, int]:
    """(row, column) of a uniformly drawn True of a 2-D bool array, (-1, -1) when it has none:
    the ``rng.integers(n)``-th in row-major order, as ``np.nonzero`` lists them (issue 27: the
    same draw and spot, found from the row counts instead of listing every free spot). Or a
    0/255 uint8 mask (``cv2.compare``'s), its row counts by OpenCV."""
    if free.dtype == np.uint8:
        per_row = cv2.reduce(free, 1, cv2.REDUCE_SUM, dtype=cv2.CV_32S).ravel() // 255
    else:
        per_row = np.count_nonzero(free, axis=1)
    cum = np.cumsum(per_row)
    n = int(cum[-1]) if len(cum) else 0
    if not n:
        return -1, -1
    i = int(rng.integers(n))
    y = int(np.searchsorted(cum, i, side="right"))
    before = int(cum[y - 1]) if y else 0
    return y, int(np.flatnonzero(free[y])[i - before])


def _neutral_shape(kind: str, bw: int, bh: int) -> np.ndarray:
    """A filled ``bw`` x ``bh`` rectangle or the ellipse inscribed in that box (bool)."""
    if kind == "rectangle":
        return np.ones((bh, bw), bool)
    m = np.zeros((bh, bw), np.uint8)
    cv2.ellipse(m, (((bw - 1) / 2, (bh - 1) / 2), (float(bw), float(bh)), 0.0), 1, -1)
    return m > 0


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


class FlatFillParams(BaseModel):
    """The flat fill (``blackout``, ``random_mask``) and the control region's placement: the
    parameters every edit backend with those variants shares (as ``ModelParams`` for models).

    A backend names in ``flat_fill_after`` the fields these followed when each backend declared
    them itself: a version's ``config.yaml`` lists a stage's parameters in that order, and a new
    order would change the bytes (and content id) of every dataset built before."""

    model_config = ConfigDict(extra="forbid")
    # (the field ``fill`` follows, the field ``control_tries``/``control_gap`` follow)
    flat_fill_after: ClassVar[tuple[str, str] | None] = None
    fill: tuple[int, int, int] = (0, 0, 0)
    control_tries: int = Field(64, ge=1)
    control_gap: int = Field(4, ge=0, description="pixels between the control region and the evidence")

    @model_serializer(mode="wrap")
    def _in_declared_order(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        out = handler(self)
        if not self.flat_fill_after or not isinstance(out, dict):
            return out
        after = {"fill": self.flat_fill_after[0], "control_tries": self.flat_fill_after[1],
                 "control_gap": "control_tries"}  # moved field -> the field it follows
        moved = {k: out.pop(k) for k in after if k in out}
        ordered: dict[str, Any] = {}

        def put(k: str, v: Any) -> None:
            ordered[k] = v
            for m, anchor in after.items():
                if anchor == k and m in moved:
                    put(m, moved.pop(m))

        for k, v in out.items():
            put(k, v)
        return ordered | moved


def flat_fill(media: np.ndarray, region: np.ndarray, fill: tuple[int, int, int]) -> np.ndarray:
    """A copy of an image (H x W x 3) or clip (T x H x W x 3) with ``region`` set to ``fill``."""
    out = media.copy()
    # on the region's bounding box (issue 27: the whole-image boolean index cost ~1 ms a call)
    sel = region > 0 if region.ndim != 2 else None
    if sel is None:
        y0, y1, x0, x1 = bbox(region)
        win, sub = out[y0:y1, x0:x1], region[y0:y1, x0:x1]
        if win.size:
            color = np.empty_like(win)
            color[...] = np.array(fill, np.uint8)
            try:
                done = cv2.copyTo(color, sub, win) is win
            except cv2.error:  # a view or mask OpenCV cannot take
                done = False
            if not done:
                win[sub > 0] = np.array(fill, np.uint8)
    else:
        out[sel] = np.array(fill, np.uint8)
    return out


# the salt of the control's random draws (``[sample.seed, CONTROL_SALT]``), for image and clip
CONTROL_SALT = 7


def control_variant(sample: Sample, p: FlatFillParams) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """The ``random_mask`` control of an image or a clip (DeFacto): the flat fill over a neutral
    region of the evidence's area, clear of the evidence (an image's: of every annotated object
    too). Returns (media, region, edit record); ``Skip`` when nothing fits."""
    rng = np.random.default_rng([sample.seed, CONTROL_SALT])
    record = {"method": "flat-fill", "region": "control", "affects": []}
    if "video" in sample.arrays:
        frames = sample.arrays["video"]
        ctrl = control_masks(sample.arrays["masks"], rng, p.control_tries, p.control_gap)
        if ctrl is None:
            raise Skip("no_room_for_control", "no offset moves the evidence clear of its own footprint in every frame")
        return flat_fill(frames, ctrl, p.fill), ctrl, record
    mask = sample.arrays["mask"]
    ctrl = control_mask(mask, rng, p.control_tries, p.control_gap, annotated_keepout(sample))
    if ctrl is None:
        raise Skip("no_room_for_control", f"no rectangle or ellipse of area {cv2.countNonZero(mask)} "
                   "clear of every annotated object and its box")
    return flat_fill(sample.arrays["image"], ctrl, p.fill), ctrl, record


def original_look(sample: Sample, ring_px: int = 8) -> tuple[tuple[float | None, bool], bool]:
    """(``footprint.object_texture`` of the original's real object (its core), whether the
    original is ``footprint.achromatic``): what an insert takes its look from (edit) and is held
    to (verify), computed once per sample (issue 27)."""
    def look() -> tuple[tuple[float | None, bool], bool]:
        img = sample.arrays["image"]
        return footprint.object_texture(img, sample.arrays.get("mask_core"), ring_px), footprint.achromatic(img)

    return sample.memo(f"original_look/{ring_px}", look, "image", "mask_core")


# --- where an inserted object goes ----------------------------------------------------------

CLONE_MARGIN = disk(6)


@functools.cache
def _inradius(shape: str) -> float:
    """The radius of the largest disk about a ``shape``'s center inside it, over its radius
    (rotation-invariant): the least distance from the center to an edge of its polygon."""
    p = np.asarray(scenes.shape_polygon(shape, 0.0, 0.0, 1000.0, 0.0))
    a, d = p, np.roll(p, -1, axis=0) - p
    t = np.clip(-(a * d).sum(1) / np.maximum((d * d).sum(1), 1e-12), 0.0, 1.0)
    return float(np.hypot(*(a + t[:, None] * d).T).min()) / 1000.0


def place_shape(sample: Sample, shape: str, r: float, rng: np.random.Generator,
                tries: int) -> tuple[list[list[float]], np.ndarray, np.ndarray]:
    """Where an inserted object goes: a ``shape`` of radius ``r`` whose region (with a margin
    for blending) covers neither the evidence nor any annotated object's box. Returns the
    polygon, the object mask and the region mask; ``Skip`` when nothing fits."""
    h, w = sample.arrays["mask"].shape
    keepout = sample.arrays["mask"] > 0
    for a in sample.meta.get("annotated", []):
        x0, y0, x1, y1 = a["box"]
        keepout[y0:y1, x0:x1] = True
    m = int(r) + 4
    if h <= 2 * m or w <= 2 * m:
        raise Skip("no_room_for_insert", f"image {w}x{h} too small for a {shape} of radius {r:.0f}")
    half = CLONE_MARGIN.shape[0] // 2
    # A try whose center square holds a keepout pixel is refused before its polygon is made
    # (issue 27, s28fill: most refused tries, ~0.1 ms each): a pixel of the square of half-side
    # s lies within sqrt(2) s + 0.71 (the center rounded) of the center, and the polygon with
    # its vertices rounded (<= 0.72 px) still holds the disk of radius inradius - 0.72, whose
    # pixels at least 1 px inside are filled; the margin's disk (radius 6: every offset of
    # squared length <= 36) reaches 4 px further in every direction (4^2 + 4^2 <= 36). So the
    # region covers the square of half-side s + 4: the exact test below would refuse the try
    s = int((_inradius(shape) * r - 3) / np.sqrt(2)) if shape in scenes.SHAPES else -1
    integ = cv2.integral(keepout.view(np.uint8)) if s >= 0 else None
    for _ in range(tries):
        cx, cy = rng.uniform(m, w - m), rng.uniform(m, h - m)
        rot = float(rng.uniform(0, np.pi))
        if integ is not None:
            ix, iy = int(round(cx)), int(round(cy))
            ya, yb, xa, xb = max(0, iy - s - 4), min(h, iy + s + 5), max(0, ix - s - 4), min(w, ix + s + 5)
            if integ[yb, xb] - integ[ya, xb] - integ[yb, xa] + integ[ya, xa]:
                continue
        poly = scenes.shape_polygon(shape, cx, cy, r, rot)
        # Each try is tested in the polygon's box grown by the margin (the region cannot reach
        # past it), with the rasterization scenes.polygon_mask uses; full-size masks only for
        # the spot that fits, from the same window (the polygon's pixels and its dilation)
        pts = np.round(np.asarray(poly, dtype=np.float64)).astype(np.int32)
        x0, y0 = max(0, int(pts[:, 0].min()) - half), max(0, int(pts[:, 1].min()) - half)
        x1, y1 = min(w, int(pts[:, 0].max()) + half + 1), min(h, int(pts[:, 1].max()) + half + 1)
        win = np.zeros((y1 - y0, x1 - x0), np.uint8)
        cv2.fillPoly(win, [(pts - np.array([x0, y0], np.int32)).reshape(-1, 1, 2)], 255, lineType=cv2.LINE_8)
        grown = cv2.dilate(win, CLONE_MARGIN)
        if not (keepout[y0:y1, x0:x1] & (grown > 0)).any():
            obj = np.zeros((h, w), bool)
            obj[y0:y1, x0:x1] = win > 0
            # the margin dilated on the box it can reach (a dilation's border adds nothing): the
            # same region as on the whole image
            region = np.zeros((h, w), np.uint8)
            region[y0:y1, x0:x1] = grown
            return poly, obj, region
    raise Skip("no_room_for_insert", f"no spot for a {shape} of radius {r:.0f} clear of annotated objects")


_BLAS = None


def one_blas_thread():
    """A context in which BLAS/LAPACK run on one thread. The work runs in one process per CPU
    (Ray workers, the plain loop): OpenBLAS's own threads only wait on each other there, and for
    the small products of the fill's membrane and the audit's window statistics they cost 2-100x
    the work itself (measured on this 2-core machine; worse when it is loaded)."""
    global _BLAS
    if _BLAS is None:
        from threadpoolctl import ThreadpoolController  # scikit-learn's dependency

        _BLAS = ThreadpoolController()
    return _BLAS.limit(limits=1, user_api="blas")
