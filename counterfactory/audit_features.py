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
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image

from counterfactory.audit_config import AuditConfig
from counterfactory.layout import AUDIT_DIR, atomic_write
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


def write_plan(out_dir: Path, sample: AuditSample | None) -> None:
    """The driver's word to the writers of ``out_dir`` (before the first shard): the sample rule,
    or none (audit off: no features are computed)."""
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
    """``audit/NAME.npz`` for shard ``NAME.tar``."""
    return Path(out_dir) / AUDIT_DIR / (shard.rsplit("/", 1)[-1].removesuffix(".tar") + ".npz")


# -- image statistics (never the mask) ---------------------------------------------------------------
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


def _block_edges(n: int) -> np.ndarray:
    """1 on the last pixel of each 8-pixel JPEG block along an axis of ``n`` pixels."""
    return (np.arange(n) % 8 == 7).astype(np.float32)


def window_features(img: np.ndarray, grid: int) -> np.ndarray:
    """(grid*grid, len(WINDOW_FEATURES)) statistics of an RGB uint8 image, one row per window.
    Every value is computed in float32 (so a float32 copy of the result loses nothing)."""
    with one_blas_thread():  # its matrix products are small: BLAS's threads would only spin
        return _window_features(img, grid)


def _window_features(img: np.ndarray, grid: int) -> np.ndarray:
    h, w = img.shape[:2]
    gray = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY).astype(np.float32)
    lab = cv2.cvtColor(img, cv2.COLOR_RGB2LAB).astype(np.float32)
    sat = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)[..., 1].astype(np.float32) / 255.0
    lap = np.abs(cv2.Laplacian(gray, cv2.CV_32F, ksize=3))
    # numpy's float32 sqrt(x*x + y*y), not cv2.magnitude: OpenCV's gives another last bit on some
    # pixels depending on the process (seen after scikit-learn is imported), and the statistics
    # must be the same in a worker and at publish
    sx, sy = cv2.Sobel(gray, cv2.CV_32F, 1, 0), cv2.Sobel(gray, cv2.CV_32F, 0, 1)
    grad = np.sqrt(sx * sx + sy * sy)
    hp = gray - cv2.GaussianBlur(gray, (0, 0), 1.0)
    maps = np.empty((11, h, w), np.float32)
    maps[0:3] = lab.transpose(2, 0, 1)
    np.square(maps[0:3], out=maps[3:6])
    maps[6], maps[7], maps[8], maps[9], maps[10] = sat, lap, grad, hp * hp, lap < 2
    c = _cells_stack(maps, grid)
    cols = [(c[i], np.sqrt(np.maximum(c[3 + i] - c[i] * c[i], 0))) for i in range(3)]
    feats = [cols[0][0], cols[1][0], cols[2][0], cols[0][1], cols[1][1], cols[2][1], c[6],
             np.log1p(c[7]), np.log1p(c[8]), np.log1p(c[9]), c[10]]
    # JPEG blockiness: neighbour differences across the 8-pixel block grid over those inside it
    # (the block mask folded into the weights: the mean of d * edge over a cell is d weighted by
    # the cell's weights times edge)
    wr, wc = _area_weights(h, grid), _area_weights(w, grid)
    for axis in (1, 0):
        d = np.zeros((h, w), np.float32)
        (d[:, :-1] if axis else d[:-1])[...] = np.abs(np.diff(gray, axis=axis))
        wa = wc if axis else wr
        edge = _block_edges(wa.shape[1])
        split = np.concatenate([wa * edge, wa * (1 - edge)])  # (2 grid, n)
        if axis:
            both = _cells_stack(d[None], grid, cols=split)[0]  # (grid, 2 grid)
            on, off = both[:, :grid], both[:, grid:]
        else:
            both = _cells_stack(d[None], grid, rows=split)[0]  # (2 grid, grid)
            on, off = both[:grid], both[grid:]
        share = wa @ edge  # each cell's share of edge pixels along the axis, the same across it
        share = share[None, :] if axis else share[:, None]
        at = on / np.maximum(share, 1e-6)
        inside = off / np.maximum(1 - share, 1e-6)
        feats.append(np.log1p(at) - np.log1p(inside))
    return np.stack([np.broadcast_to(f, (grid, grid)).reshape(-1) for f in feats], axis=1).astype(np.float64)


def image_features(win: np.ndarray) -> np.ndarray:
    """One vector per image: each window feature's spread over the windows (an edit shows as an
    outlying window: a flat fill is a minimum of texture, a pasted shape a maximum of saturation)."""
    q = np.percentile(win, [0, 10, 50, 90, 100], axis=0)
    return np.concatenate([q.reshape(-1), win.std(axis=0)])


def _decode(data: bytes, gray: bool = False) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("L" if gray else "RGB"))


def _part(sample: dict[str, Any], name: str) -> bytes | None:
    for ext in ("jpg", "png", "jpeg", "webp"):
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
    orig = _decode(orig_data)
    rec["images"] = 1
    rec["orig_win"] = window_features(orig, grid).astype(np.float32)
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
        mask_data = None if region == "global" else (
            _part(parts, f"{v}_mask") or (_part(parts, "control_mask") if region == "control" else None)
            or _part(parts, "mask"))
        cover = None
        if mask_data is not None:
            cover = _cells((_decode(mask_data, gray=True) > 0).astype(np.float32), grid).reshape(-1)
        rec["pairs"].append({"v": v, "cf_win": window_features(cf, grid).astype(np.float32), "cover": cover})
    return rec


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
    its features; a shard written again writes them again)."""

    def __init__(self, out_dir: Path, shard: str, sample: AuditSample) -> None:
        self.out_dir, self.shard, self.sample = Path(out_dir), shard, sample
        self.records: list[dict[str, Any]] = []
        self.seconds = 0.0

    @classmethod
    def open(cls, out_dir: Path, shard: str) -> AuditCollector | None:
        sample = read_plan(out_dir)
        return None if sample is None else cls(out_dir, shard, sample)

    def add(self, key: str, parts: dict[str, Any]) -> None:
        """One accepted sample (its tar members, ``json`` among them), if the sample rule takes it."""
        raw = parts.get("json")
        if raw is None or not self.sample.wants(key):
            return
        t0 = time.perf_counter()
        doc = json.loads(raw) if isinstance(raw, bytes | bytearray | str) else raw
        self.records.append(sample_record(key, doc, parts, self.sample.grid, self.sample.abstain))
        self.seconds += time.perf_counter() - t0

    def finish(self) -> None:
        path = features_path(self.out_dir, self.shard)
        if not self.records:
            path.unlink(missing_ok=True)  # a stale file of an earlier run of this shard
            return
        path.parent.mkdir(exist_ok=True)
        atomic_write(path, pack(self.records, self.sample, self.shard, self.seconds))


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
