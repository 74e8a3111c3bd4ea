"""The shortcut audit's per-sample image statistics, computed in the stream (issue 27).

The audit (``counterfactory.audit``) fits small models at publish; what it fits on is computed
here, per sample, where the sample is written: ``ShardWriter`` (``pipeline/writer.py``) hands
each sampled sample's encoded members (the bytes the shard stores) to an ``AuditCollector``,
which decodes them, computes the window statistics of the original and of each variant and the
edit's cover of the windows, and writes them beside the shard (``audit/SHARD.npz``: a few KB
per sampled sample, outside the manifest like the card, so no content id moves). At publish the
audit reads those files and the index: no shard is read, no image decoded.

The sample is a hash threshold on the sample key (``AuditSample``): ``sha256(seed:key)`` read as
a 64-bit integer below a cut that gives ``sample_pairs`` of the planned inputs in expectation,
so a worker decides per sample without seeing the others, and a reader of a published version
finds the same sample from its index and manifest alone. The same ``sample_record`` computes the
statistics from a shard's members when a shard has no features file (a version written before
this, a file lost): the same bytes in, the same numbers out.

Cost (issue 27, ~20 -> ~10 CPU ms per sampled sample): a variant changes the pixels of its edit
(and JPEG's blocks around it), so its windows whose pixels and the filters' reach are the
original's take the original's rows; the others are computed on one crop around them (a global
edit, a flip, on the whole image). Members are decoded by OpenCV (BGR, the same pixels as
Pillow's), each mask once per sample, BLAS held to one thread once per sample; a crop's weights
are made once per image size and cell range, the changed windows come from one int32 integral of
the channels' OR'd differences (session 5: ~3 % less, the same numbers; decoding and the changed
windows' pixel work are ~7.5 of the ~11 ms: BENCHMARKS.md, part s28audit).

~610 lines on purpose: the sample rule, the statistics and the features file are one contract
between the writers and the audit (the same numbers from the stream and from a shard); the
audit's fits live in ``audit``.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import io
import json
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image

from counterfactory import helper_process
from counterfactory.audit_config import AuditConfig
from counterfactory.layout import AUDIT_DIR, atomic_write, features_name
from counterfactory.stages.qa import PRESUPPOSING_KINDS, subject_present
from counterfactory.stages.shared import one_blas_thread

FEATURES_FORMAT = "counterfactory-audit-features/1"
PLAN = "plan.json"  # audit/plan.json in a staging folder: the sample rule the writers apply
# window features, in this order (see window_features)
WINDOW_FEATURES = ("L_mean", "a_mean", "b_mean", "L_std", "a_std", "b_std", "saturation", "log_laplacian",
                   "log_gradient", "log_highpass_energy", "flat_share", "blockiness_h", "blockiness_v")
_BAD_EXAMPLES = 5  # examples of presupposing questions kept (per sample here, overall in the audit)


# -- the sample rule -----------------------------------------------------------------------------
def key_hash(seed: int, key: str) -> int:
    """A sample key's place in the audit's sample: sha256(seed:key), first 8 bytes, big-endian."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "big")


def sample_cut(sample_pairs: int, n_inputs: int) -> int:
    """The hash cut that keeps ``sample_pairs`` of ``n_inputs`` in expectation (every key when
    ``sample_pairs >= n_inputs``; none when 0). Integer arithmetic: no float rounding."""
    if n_inputs <= 0 or sample_pairs >= n_inputs:
        return 1 << 64
    return -(-sample_pairs * (1 << 64) // n_inputs)


@dataclass(frozen=True)
class AuditSample:
    """Which samples the audit looks at and how: what the writers of a staging folder apply
    (``audit/plan.json``) and what the audit of a version recomputes from its config and manifest."""

    seed: int
    sample_pairs: int
    n_inputs: int
    grid: int
    abstain: str

    @property
    def cut(self) -> int:
        return sample_cut(self.sample_pairs, self.n_inputs)

    def wants(self, key: str) -> bool:
        return bool(key) and key_hash(self.seed, key) < self.cut

    def same_features(self, meta: dict[str, Any]) -> bool:
        """Whether a features file was made under this rule (else its shard is recomputed)."""
        return (meta.get("format") == FEATURES_FORMAT
                and all(meta.get(k) == v for k, v in asdict(self).items() if k != "n_inputs")
                and meta.get("cut") == str(self.cut))


def audit_sample(config: dict[str, Any], n_inputs: int) -> AuditSample | None:
    """The sample rule of a run from its resolved config (its ``audit:`` section, ``seed`` of the
    audit, ``abstain_answer``) and planned input count; None when the config has no ``audit:``
    section or turns the audit off (``sample_pairs: 0``)."""
    if not isinstance(config.get("audit"), dict):
        return None
    s = AuditConfig.model_validate(config["audit"])
    if s.sample_pairs == 0:
        return None
    return AuditSample(seed=s.seed, sample_pairs=s.sample_pairs, n_inputs=n_inputs, grid=s.grid,
                       abstain=config.get("abstain_answer", "unknown"))


# what publish imports (the audit's fits, the card's plots): ~1.7 CPU s of imports (scikit-learn
# pulls scipy.stats and pandas), done on a daemon thread of the driver while the stream runs rather
# than after its last shard (issue 27: what runs after the stream)
# pandas: pyarrow imports it at its first conversion of Python rows (the index, at publish: 0.3 s)
_PUBLISH_IMPORTS = ("pandas", "matplotlib.figure", "matplotlib.backends.backend_agg", "matplotlib.ticker",
                    "matplotlib.lines")
_AUDIT_IMPORTS = ("sklearn.linear_model", "sklearn.metrics", "sklearn.model_selection", "sklearn.pipeline",
                  "sklearn.preprocessing", "sklearn.feature_extraction.text", "threadpoolctl")
_prewarmed: set[str] = set()
_prewarm_threads: list[threading.Thread] = []


def prewarm_publish(audit: bool, helper: bool = False) -> None:
    """Import, on a daemon thread, the modules publish will need (the audit's only when it runs
    here); once per process. ``helper``: the audit's work goes to the helper process (started
    here; it imports them there), for a run whose shard writers are in this process: a Ray run's
    writers compute their statistics in their tasks, and a helper only for publish's fits would
    hold ~290 MB beside them to save ~1 s. Nothing is computed: an import that fails here fails
    again, loudly, where it is needed."""
    here = audit and not (helper and helper_process.start())
    names = [m for m in (*_PUBLISH_IMPORTS, *(_AUDIT_IMPORTS if here else ())) if m not in _prewarmed]
    if not names:
        return
    _prewarmed.update(names)

    def run() -> None:
        for name in names:
            try:
                importlib.import_module(name)
            except Exception:  # noqa: BLE001 - see the docstring
                return

    t = threading.Thread(target=run, name="counterfactory-prewarm", daemon=True)
    t.start()
    _prewarm_threads.append(t)


def finish_prewarm() -> None:
    """Wait for the prewarm imports (publish needs those modules next; the thread ends here,
    not at some later point of the process)."""
    while _prewarm_threads:
        _prewarm_threads.pop().join()


def write_plan(out_dir: Path, sample: AuditSample | None, helper: bool = False) -> None:
    """The driver's word to the writers of ``out_dir`` (before the first shard): the sample rule,
    or none (audit off: no features are computed). The driver's publish imports start here, and
    the helper process when the writers are in this process (``helper``)."""
    prewarm_publish(sample is not None, helper)
    path = Path(out_dir) / AUDIT_DIR / PLAN
    if sample is None:
        path.unlink(missing_ok=True)
        return
    path.parent.mkdir(exist_ok=True)
    atomic_write(path, json.dumps(asdict(sample), sort_keys=True).encode())


def read_plan(out_dir: Path) -> AuditSample | None:
    try:
        return AuditSample(**json.loads((Path(out_dir) / AUDIT_DIR / PLAN).read_bytes()))
    except (OSError, ValueError, TypeError):
        return None


def features_path(out_dir: Path, shard: str) -> Path:
    return Path(out_dir) / features_name(shard)


# -- image statistics (never the mask) ---------------------------------------------------------------
# the filters' reach around a pixel: GaussianBlur(sigma 1) on float32 takes a 9-tap kernel (radius
# 4); Sobel, Laplacian (ksize 3) and the neighbour differences reach 1. A window's statistics read
# the pixels of its cell plus this margin, so a window whose cell and margin are the same pixels in
# two images has the same statistics in both (a local edit changes a few windows: issue 27)
_REACH = 4
_CODES = {False: (cv2.COLOR_RGB2GRAY, cv2.COLOR_RGB2LAB, cv2.COLOR_RGB2HSV),
          True: (cv2.COLOR_BGR2GRAY, cv2.COLOR_BGR2LAB, cv2.COLOR_BGR2HSV)}
_FULL_SHARE = 0.6  # a variant whose changed windows span more of the grid than this: computed whole


@functools.lru_cache(maxsize=64)
def _area_weights(n: int, grid: int) -> np.ndarray:
    """(grid, n): each cell's share of each of ``n`` pixels when they are cut into ``grid`` equal
    cells (an area resampling's weights; the rows sum to 1)."""
    size = n / grid
    lo = np.arange(grid)[:, None] * size
    j = np.arange(n)[None, :]
    w = (np.clip(np.minimum(lo + size, j + 1) - np.maximum(lo, j), 0, None) / size).astype(np.float32)
    w.setflags(write=False)
    return w


@functools.lru_cache(maxsize=64)
def _axis_plan(n: int, grid: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Along an axis of ``n`` pixels cut into ``grid`` cells: each cell's first and last + 1
    pixel of nonzero weight, the 8-pixel JPEG block edges, and each cell's share of edge pixels."""
    w = _area_weights(n, grid)
    nz = w > 0
    lo, hi = nz.argmax(axis=1), n - nz[:, ::-1].argmax(axis=1)
    edge = (np.arange(n) % 8 == 7).astype(np.float32)  # 1 on the last pixel of each 8-pixel block
    share = w @ edge
    for a in (lo, hi, edge, share):
        a.setflags(write=False)
    return lo, hi, edge, share


# 256: one image size's ranges at grid 8 (<= 36 per axis) for a few sizes at once; bounded so a
# manifest of many large sizes keeps <= ~64 MB of plans (4000 px, grid 8: <= 256 KB a plan)
@functools.lru_cache(maxsize=256)
def _crop_plan(n: int, grid: int, c0: int, c1: int) -> tuple[int, int, np.ndarray, np.ndarray, np.ndarray]:
    """Along an axis of ``n`` pixels, for cells [c0, c1): the crop [p0, p1) that holds their
    pixels plus the filters' reach, their weights on it, those weights split into the block-edge
    pixels' and the others' (stacked: 2 (c1 - c0) rows), and their share of edge pixels. Made once
    per size and cell range (a sample's variants share most ranges), the same arrays every time."""
    lo, hi, edge, share = _axis_plan(n, grid)
    p0, p1 = max(0, int(lo[c0]) - _REACH), min(n, int(hi[c1 - 1]) + _REACH)
    w = _area_weights(n, grid)[c0:c1, p0:p1]
    e = edge[p0:p1]
    both = np.concatenate([w * e, w * (1 - e)])
    sh = share[c0:c1]
    for a in (both, sh):
        a.setflags(write=False)
    return p0, p1, w, both, sh


def _cells_stack(maps: np.ndarray, grid: int, rows: np.ndarray | None = None,
                 cols: np.ndarray | None = None) -> np.ndarray:
    """(k, grid, grid) means of (k, h, w) float32 maps over each cell of a grid x grid split, as two
    matrix products with the area weights (one pass over the pixels for every map at once, where
    an area resize took one pass per map). ``rows``/``cols``: other weights (a pixel mask folded in)."""
    k, h, w = maps.shape
    wr = _area_weights(h, grid) if rows is None else rows
    wc = _area_weights(w, grid) if cols is None else cols
    return wr @ (maps.reshape(k * h, w) @ wc.T).reshape(k, h, wc.shape[0])


def _cells(x: np.ndarray, grid: int) -> np.ndarray:
    """Mean of ``x`` over each cell of a grid x grid split (float32, deterministic)."""
    with one_blas_thread():  # the same products on one thread wherever they run
        return _cells_stack(x.astype(np.float32)[None], grid)[0]


def window_features(img: np.ndarray, grid: int) -> np.ndarray:
    """(grid*grid, len(WINDOW_FEATURES)) statistics of an RGB uint8 image, one row per window.
    Every value is computed in float32 (so a float32 copy of the result loses nothing)."""
    with one_blas_thread():  # its matrix products are small: BLAS's threads would only spin
        return _window_rows(img, grid, bgr=False).astype(np.float64)


def _window_rows(img: np.ndarray, grid: int, bgr: bool = True) -> np.ndarray:
    """``window_features`` in float32, of an RGB or (``bgr``: as OpenCV decodes) BGR image."""
    return _block_features(img, grid, bgr, 0, grid, 0, grid).reshape(grid * grid, -1)


def _block_features(img: np.ndarray, grid: int, bgr: bool, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
    """(r1 - r0, c1 - c0, len(WINDOW_FEATURES)) float32 statistics of the windows of rows
    [r0, r1) and columns [c0, c1) of the grid, computed on the crop of ``img`` that holds their
    cells plus the filters' reach (the whole image for the whole grid)."""
    y0, y1, wr, wr_both, yshare = _crop_plan(img.shape[0], grid, r0, r1)
    x0, x1, wc, wc_both, xshare = _crop_plan(img.shape[1], grid, c0, c1)
    im = img[y0:y1, x0:x1]
    h, w = im.shape[:2]
    to_gray, to_lab, to_hsv = _CODES[bgr]
    gray = cv2.cvtColor(im, to_gray).astype(np.float32)
    maps = np.empty((12, h, w), np.float32)
    for i, plane in enumerate(cv2.split(cv2.cvtColor(im, to_lab))):
        maps[i] = plane
    # the spread as E[(x - 128)^2] - (E[x] - 128)^2: centred, float32's cancellation on a window of
    # one colour stays under 1e-3 (uncentred, E[x^2] - E[x]^2 of 8-bit Lab lost up to 0.03, and
    # the same window computed on a crop and on the whole image differed by that much)
    np.square(np.subtract(maps[0:3], np.float32(128), out=maps[3:6]), out=maps[3:6])
    np.divide(cv2.extractChannel(cv2.cvtColor(im, to_hsv), 1), np.float32(255.0), out=maps[6])
    np.abs(cv2.Laplacian(gray, cv2.CV_32F, ksize=3), out=maps[7])
    # numpy's float32 sqrt(x*x + y*y), not cv2.magnitude: OpenCV's gives another last bit on some
    # pixels depending on the process (seen after scikit-learn is imported), and the statistics
    # must be the same in a worker and at publish
    sx, sy = cv2.Sobel(gray, cv2.CV_32F, 1, 0), cv2.Sobel(gray, cv2.CV_32F, 0, 1)
    np.multiply(sx, sx, out=sx)
    np.multiply(sy, sy, out=sy)
    np.sqrt(np.add(sx, sy, out=sx), out=maps[8])
    hp = cv2.GaussianBlur(gray, (0, 0), 1.0)
    np.square(np.subtract(gray, hp, out=hp), out=maps[9])
    np.less(maps[7], 2, out=maps[10])
    # JPEG blockiness: neighbour differences across the 8-pixel block grid over those inside it
    # (the block mask folded into the weights: the mean of d * edge over a cell is d weighted by
    # the cell's weights times edge); the vertical differences ride with the other maps
    np.abs(np.subtract(gray[1:], gray[:-1], out=maps[11, :-1]), out=maps[11, :-1])
    maps[11, -1] = 0
    inner = (maps.reshape(12 * h, w) @ wc.T).reshape(12, h, c1 - c0)
    c = wr @ inner[:11]
    v_both = wr_both @ inner[11]  # (2 rows, cols)
    dh = np.empty((h, w), np.float32)
    dh[:, -1] = 0
    np.abs(np.subtract(gray[:, 1:], gray[:, :-1], out=dh[:, :-1]), out=dh[:, :-1])
    h_both = wr @ (dh @ wc_both.T)  # (rows, 2 cols)
    nr, nc = r1 - r0, c1 - c0
    out = np.empty((nr, nc, len(WINDOW_FEATURES)), np.float32)
    out[..., 0:3] = c[0:3].transpose(1, 2, 0)
    m = c[0:3] - np.float32(128)
    out[..., 3:6] = np.sqrt(np.maximum(c[3:6] - m * m, 0)).transpose(1, 2, 0)
    out[..., 6] = c[6]
    out[..., 7:10] = np.log1p(c[7:10]).transpose(1, 2, 0)
    out[..., 10] = c[10]
    for j, (on, off, share) in enumerate(((h_both[:, :nc], h_both[:, nc:], xshare[None, :]),
                                          (v_both[:nr], v_both[nr:], yshare[:, None]))):
        at = on / np.maximum(share, 1e-6)
        inside = off / np.maximum(1 - share, 1e-6)
        out[..., 11 + j] = np.log1p(at) - np.log1p(inside)
    return out


@functools.lru_cache(maxsize=64)
def _reach_bounds(n: int, grid: int) -> tuple[np.ndarray, np.ndarray]:
    """Along an axis of ``n`` pixels: each cell's first and last + 1 pixel widened by the filters'
    reach (clipped to the image)."""
    lo, hi, _, _ = _axis_plan(n, grid)
    out = np.maximum(lo - _REACH, 0), np.minimum(hi + _REACH, n)
    for a in out:
        a.setflags(write=False)
    return out


def _changed_windows(orig: np.ndarray, cf: np.ndarray, grid: int) -> np.ndarray:
    """(grid, grid) bool: the windows whose cell or the filters' reach around it holds a pixel that
    differs between the two images (the others have the same statistics in both): the sums of the
    absolute differences over each window's cell plus the reach, from one integral image."""
    hh, ww = orig.shape[:2]
    d = cv2.absdiff(orig, cf)
    if d.ndim == 3:  # a pixel differs where a channel does: the channels' differences OR'd into one plane
        planes = cv2.split(d)
        d = planes[0]
        for p in planes[1:]:
            d = cv2.bitwise_or(d, p)
    # int32 sums: exact (at most 255 * h * w, under 2^31 up to 8.4 Mpx; larger: float64, exact under 2^53)
    s = cv2.integral(d, sdepth=cv2.CV_32S if 255 * hh * ww < 1 << 31 else cv2.CV_64F)
    y0, y1 = _reach_bounds(hh, grid)
    x0, x1 = _reach_bounds(ww, grid)
    y0, y1 = y0[:, None], y1[:, None]
    return (s[y1, x1] - s[y0, x1] - s[y1, x0] + s[y0, x0]) > 0


def _variant_rows(orig: np.ndarray, cf: np.ndarray, orig_rows: np.ndarray, grid: int) -> np.ndarray:
    """A variant's window rows: the original's where the variant left the window's pixels (and the
    filters' reach) as they were, computed on the crop around the changed windows elsewhere, on the
    whole image when they span most of it (a flip)."""
    changed = _changed_windows(orig, cf, grid)
    out = orig_rows.copy()
    if not changed.any():
        return out
    ri, ci = np.nonzero(changed.any(axis=1))[0], np.nonzero(changed.any(axis=0))[0]
    r0, r1, c0, c1 = int(ri[0]), int(ri[-1]) + 1, int(ci[0]), int(ci[-1]) + 1
    if (r1 - r0) * (c1 - c0) > _FULL_SHARE * grid * grid:
        r0, r1, c0, c1 = 0, grid, 0, grid
    block = _block_features(cf, grid, True, r0, r1, c0, c1)
    full = out.reshape(grid, grid, -1)
    sub = changed[r0:r1, c0:c1]
    full[r0:r1, c0:c1][sub] = block[sub]
    return out


def image_features(win: np.ndarray) -> np.ndarray:
    """One vector per image: each window feature's spread over the windows (an edit shows as an
    outlying window: a flat fill is a minimum of texture, a pasted shape a maximum of saturation)."""
    q = np.percentile(win, [0, 10, 50, 90, 100], axis=0)
    return np.concatenate([q.reshape(-1), win.std(axis=0)])


def image_features_many(wins: list[np.ndarray]) -> np.ndarray:
    """``image_features`` of each of several images' windows (same shape), in one call per
    statistic: row i is ``image_features(wins[i])``, bit for bit."""
    if not wins:
        return np.zeros((0, 6 * len(WINDOW_FEATURES)))
    w = np.stack(wins)
    q = np.percentile(w, [0, 10, 50, 90, 100], axis=1)  # (5, images, features)
    return np.concatenate([q.transpose(1, 0, 2).reshape(len(wins), -1), w.std(axis=1)], axis=1)


def _decode(data: bytes, gray: bool = False) -> np.ndarray:
    """A member's pixels: BGR uint8 (as OpenCV decodes: the statistics take BGR), or grayscale.
    OpenCV's decoder (libjpeg-turbo, as Pillow's: the same pixels) at a third less CPU; Pillow
    for what it cannot read."""
    flags = (cv2.IMREAD_GRAYSCALE if gray else cv2.IMREAD_COLOR) | cv2.IMREAD_IGNORE_ORIENTATION
    out = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    if out is not None:
        return out
    with Image.open(io.BytesIO(data)) as im:
        arr = np.asarray(im.convert("L" if gray else "RGB"))
    return arr if gray else arr[..., ::-1].copy()


_PICTURE_EXTS = ("jpg", "png", "jpeg", "webp")  # the members the statistics read (a clip's mp4: none)


def _part(sample: dict[str, Any], name: str) -> bytes | None:
    for ext in _PICTURE_EXTS:
        if f"{name}.{ext}" in sample:
            return sample[f"{name}.{ext}"]
    return None


# -- (d) presupposition -------------------------------------------------------------------------------
def presupposing(doc: dict[str, Any], abstain: str) -> list[tuple[str, str, dict[str, Any]]]:
    """(finding, image, item) for one sample's JSON: ``on_original`` (an attribute question
    about an object the original does not show), ``answered_on_absent`` (answered with anything
    but the abstention on a variant without its object), ``abstained_on_absent`` (the rule:
    DeFacto's abstention), ``orig_abstain_on_present`` ("unknown" on an original that shows it).
    Presence comes from the item's targets and the edit records (``qa.subject_present``)."""
    out = []
    for it in doc.get("qa", []):
        for v, a in sorted(it["answers"].items()):
            if v != "orig" and v not in doc.get("edits", {}):
                continue
            present = subject_present(it, doc, v)
            if v == "orig" and present and a == abstain:
                out.append(("orig_abstain_on_present", v, it))
            if it["kind"] not in PRESUPPOSING_KINDS or present:
                continue
            what = "on_original" if v == "orig" else "answered_on_absent" if a != abstain else "abstained_on_absent"
            out.append((what, v, it))
    return out


# -- one sample --------------------------------------------------------------------------------------------
def exhaustive_tag(doc: dict[str, Any]) -> str:
    ex = doc.get("source", {}).get("exhaustive")
    return "all categories" if ex == "*" else "listed categories" if ex else "none" if ex == [] else "not recorded"


def sample_record(key: str, doc: dict[str, Any], parts: dict[str, Any], grid: int,
                  abstain: str) -> dict[str, Any]:
    """What the audit needs of one sample, from its JSON and its encoded members: the annotation
    tag, the presupposition findings, and for an image sample the window statistics (float32) of
    the original (``orig_win``) and of each variant of its shape (``pairs``: variant, ``cf_win``,
    ``cover``: the share of each window the edit's mask covers, or None)."""
    pres = presupposing(doc, abstain)
    rec: dict[str, Any] = {
        "key": key, "exhaustive": exhaustive_tag(doc),
        "presupposition": dict(Counter(w for w, _, _ in pres)),
        "examples": [f"{key} {v}: {it['question']!r} -> {it['answers'][v]!r}" for w, v, it in pres
                     if w in ("on_original", "answered_on_absent")][:_BAD_EXAMPLES],
        "images": 0, "orig_win": None, "pairs": []}
    orig_data = _part(parts, "orig")
    if orig_data is None:  # a clip: the image probe does not apply
        return rec
    with one_blas_thread():  # once per sample: the statistics' matrix products are small
        _image_records(rec, doc, parts, orig_data, grid)
    return rec


def _image_records(rec: dict[str, Any], doc: dict[str, Any], parts: dict[str, Any], orig_data: bytes,
                   grid: int) -> None:
    orig = _decode(orig_data)
    rec["images"] = 1
    orig_rows = _window_rows(orig, grid)
    rec["orig_win"] = orig_rows
    covers: dict[str, np.ndarray] = {}  # one decode per mask member (the evidence mask serves several)
    for v in doc["variants"]:
        data = _part(parts, v)
        if data is None:
            continue
        cf = _decode(data)
        rec["images"] += 1
        if cf.shape != orig.shape:
            continue
        # the region the edit changed: its own mask, the control's, else the evidence's
        region = doc["edits"].get(v, {}).get("region")
        name = None if region == "global" else next(
            (n for n in (f"{v}_mask", "control_mask" if region == "control" else None, "mask")
             if n is not None and _part(parts, n)), None)
        if name is not None and name not in covers:
            covers[name] = _cells_stack((_decode(_part(parts, name), gray=True) > 0).astype(np.float32)[None],
                                        grid)[0].reshape(-1)
        rec["pairs"].append({"v": v, "cf_win": _variant_rows(orig, cf, orig_rows, grid),
                             "cover": None if name is None else covers[name]})


# -- a shard's features file ------------------------------------------------------------------------------
def pack(records: list[dict[str, Any]], sample: AuditSample, shard: str, seconds: float) -> bytes:
    """One shard's records as an ``.npz``: the windows of every image in one float32 array, the
    covers in another, the rest as JSON (no pickle)."""
    wins: list[np.ndarray] = []
    covers: list[np.ndarray] = []
    docs = []
    for r in records:
        d = {k: r[k] for k in ("key", "exhaustive", "presupposition", "examples", "images")}
        if r["orig_win"] is not None:
            d["orig_win"] = len(wins)
            wins.append(r["orig_win"])
        d["pairs"] = []
        for p in r["pairs"]:
            d["pairs"].append({"v": p["v"], "cf_win": len(wins), "cover": None if p["cover"] is None else len(covers)})
            wins.append(p["cf_win"])
            if p["cover"] is not None:
                covers.append(p["cover"])
        docs.append(d)
    g2 = sample.grid * sample.grid
    meta = {**asdict(sample), "cut": str(sample.cut), "format": FEATURES_FORMAT, "shard": shard,
            "seconds": round(seconds, 4), "samples": docs}
    buf = io.BytesIO()
    np.savez(buf, meta=np.frombuffer(json.dumps(meta, sort_keys=True).encode(), np.uint8),
             win=np.stack(wins) if wins else np.zeros((0, g2, len(WINDOW_FEATURES)), np.float32),
             cover=np.stack(covers) if covers else np.zeros((0, g2), np.float32))
    return buf.getvalue()


def unpack(data: bytes) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(file meta, records) of a features file (``pack``'s inverse)."""
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        meta = json.loads(z["meta"].tobytes())
        win, cover = z["win"], z["cover"]
    records = []
    for d in meta.pop("samples"):
        r = {k: d[k] for k in ("key", "exhaustive", "presupposition", "examples", "images")}
        r["orig_win"] = win[d["orig_win"]] if "orig_win" in d else None
        r["pairs"] = [{"v": p["v"], "cf_win": win[p["cf_win"]],
                       "cover": None if p["cover"] is None else cover[p["cover"]]} for p in d["pairs"]]
        records.append(r)
    return meta, records


class AuditCollector:
    """In a ``ShardWriter``: the sampled samples' records of one shard, written beside it
    (``audit/SHARD.npz``) when the shard closes, before its journal entry (a journaled shard has
    its features; a shard written again writes them again). In the driver (a run in one
    process) each record is computed by the helper process while the writer goes on; in a Ray
    task, here. At most ``_PENDING`` samples' members wait for the helper at once, and at most
    ``_PENDING_BYTES`` of them beyond the oldest (12-megapixel PNG members are ~200 MB a sample:
    sixteen of them held for a slow helper were gigabytes the inline writer never held)."""

    _PENDING = 16
    _PENDING_BYTES = 64 << 20

    def __init__(self, out_dir: Path, shard: str, sample: AuditSample) -> None:
        self.out_dir, self.shard, self.sample = Path(out_dir), shard, sample
        self.records: list[dict[str, Any]] = []
        self.seconds = 0.0
        self._pending: list[tuple[Any, tuple[Any, ...], int]] = []  # (future, its arguments, bytes), in order
        self._pending_bytes = 0

    @classmethod
    def open(cls, out_dir: Path, shard: str) -> AuditCollector | None:
        sample = read_plan(out_dir)
        return None if sample is None else cls(out_dir, shard, sample)

    def add(self, key: str, parts: dict[str, Any]) -> None:
        """One accepted sample (its tar members, ``json`` among them), if the sample rule takes it."""
        raw = parts.get("json")
        if raw is None or not self.sample.wants(key):
            return
        doc = json.loads(raw) if isinstance(raw, bytes | bytearray | str) else raw
        # the pictures alone (what sample_record reads; not the writer's dict, not a clip's video)
        pictures = {k: v for k, v in parts.items() if k.rpartition(".")[2] in _PICTURE_EXTS}
        args = (key, doc, pictures, self.sample.grid, self.sample.abstain)
        size = sum(len(v) for v in pictures.values() if isinstance(v, bytes | bytearray | memoryview))
        self._pending.append((helper_process.submit(timed_record, *args), args, size))
        self._pending_bytes += size
        while self._pending and (self._pending[0][0] is None or len(self._pending) > self._PENDING
                                 or (len(self._pending) > 1 and self._pending_bytes > self._PENDING_BYTES)):
            self._collect()

    def _collect(self) -> None:
        fut, args, size = self._pending.pop(0)
        self._pending_bytes -= size
        rec, seconds = helper_process.result(fut, timed_record, *args)
        self.records.append(rec)
        self.seconds += seconds

    def finish(self) -> None:
        while self._pending:
            self._collect()
        path = features_path(self.out_dir, self.shard)
        if not self.records:
            path.unlink(missing_ok=True)  # a stale file of an earlier run of this shard
            return
        path.parent.mkdir(exist_ok=True)
        atomic_write(path, pack(self.records, self.sample, self.shard, self.seconds))


def timed_record(key: str, doc: dict[str, Any], parts: dict[str, Any], grid: int,
                 abstain: str) -> tuple[dict[str, Any], float]:
    """``sample_record`` and the seconds it took (where it ran: the card states the audit's cost)."""
    t0 = time.perf_counter()
    rec = sample_record(key, doc, parts, grid, abstain)
    return rec, time.perf_counter() - t0


def read_features(out_dir: Path, shard: str, sample: AuditSample) -> tuple[list[dict[str, Any]], float] | None:
    """A shard's records and their in-stream seconds, or None when it has no usable file (absent,
    unreadable, or made under another sample rule): then the audit computes them from the shard."""
    try:
        meta, records = unpack(features_path(out_dir, shard).read_bytes())
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not sample.same_features(meta) or meta.get("shard") != shard.rsplit("/", 1)[-1]:
        return None
    return records, float(meta.get("seconds") or 0.0)
