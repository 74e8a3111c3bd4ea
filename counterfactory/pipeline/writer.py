"""The output format: WebDataset shards of paired samples, an index, a rejects ledger, a manifest.

Three parts: ``PartEncoder`` turns a sample's arrays into the bytes of its tar members;
``ShardWriter`` writes one shard where its samples are made (a Ray task beside the stages, see
``datasink``): shard ``k`` is the accepted samples of inputs ``[k * shard_size, (k + 1) *
shard_size)`` in input order, under a temporary name, fsynced and renamed, with its ``pairs/``
copy, then its journal entry (``.journal/K.json``: checksums, index rows, rejects, counters);
``DatasetCommit`` runs in the driver in the shape of a Ray ``Datasink``: it receives each
shard's small result, never a sample's bytes, and at the end makes index and rejects (from the
journal entries, in shard order), config, shard index and the manifest (per-shard sha256, bytes,
sample count; no timestamps, so the same config and inputs give a byte-identical manifest).

Resume: ``on_write_start`` keeps every journaled shard whose files still match their sha256,
each on its own (a kill leaves any pattern of finished shards); only the others are written
again, and since a shard's content is fixed by its input range the final manifest equals an
uninterrupted run's.
"""

# Over ~450 lines on purpose: the byte format (tar headers, pairs layout, journal, index rows)
# must have one owner, or determinism has several.

from __future__ import annotations

import hashlib
import json
import os
import tarfile
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from counterfactory import __version__
from counterfactory.audit_features import AuditCollector, audit_sample, write_plan
from counterfactory.index import (
    INDEX_SCHEMA,
    REJECT_SCHEMA,
    index_answers,
    index_metrics,
    pair_samples,
    source_uri,
)
from counterfactory.layout import (
    CONFIG,
    INDEX,
    JOURNAL,
    MANIFEST,
    PAIRS_DIR,
    REJECTS,
    SHARDS_INDEX,
    atomic_write,
    sha256_file,
)
from counterfactory.pipeline.dedupe import KeysSeen, drop_inputs
from counterfactory.pipeline.remote_shards import (
    fetch,
    journal_name,
    keep_entry,
    put_shard,
    remote_dir,
    remote_entries,
)
from counterfactory.publish import FailureBudgetExceeded
from counterfactory.sample import Sample, decode_batch, encode_batch

FORMAT = "counterfactory/1"
TAR_MTIME = 0  # fixed member metadata: reruns give identical bytes


def _encode_image(arr: np.ndarray, fmt: str, quality: int) -> bytes:
    if arr.ndim == 3:  # RGB -> BGR for OpenCV (cvtColor: the same bytes as a reversed copy, ~10x faster)
        arr = cv2.cvtColor(np.ascontiguousarray(arr), cv2.COLOR_RGB2BGR) if arr.shape[2] == 3 else arr[..., ::-1]
    if fmt == "jpg":
        ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(arr), [cv2.IMWRITE_JPEG_QUALITY, quality])
    else:
        ok, buf = cv2.imencode(".png", np.ascontiguousarray(arr), [cv2.IMWRITE_PNG_COMPRESSION, 3])
    if not ok:
        raise RuntimeError(f"OpenCV could not encode a {arr.shape} image as {fmt}")
    return buf.tobytes()


# mask parts: rows unfiltered, deflated by zlib's run-length strategy at level 1. libpng's default
# tries all five row filters on every row (~0.5 ms for a 256 x 256 mask at any level) for a
# picture of two values where no filter helps: ~5x less CPU and about half the bytes (issue 27)
_MASK_PNG = [cv2.IMWRITE_PNG_COMPRESSION, 1, cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_RLE,
             cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_NONE]


def encode_mask(arr: np.ndarray) -> bytes:
    """A mask part (H x W uint8: 0 and 255) as an 8-bit grayscale PNG (``_MASK_PNG``)."""
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(arr), _MASK_PNG)
    if not ok:
        raise RuntimeError(f"OpenCV could not encode a {arr.shape} mask as png")
    return buf.tobytes()


def sample_json(meta: dict[str, Any], key: str) -> dict[str, Any]:
    """The ``KEY.json`` member: everything a trainer or auditor needs, nothing run-dependent."""
    prov = dict(meta.get("provenance", {}))
    prov["run_seed"] = meta.get("run_seed")
    prov["config_hash"] = meta.get("config_hash")
    prov["package_version"] = __version__
    out = {
        "key": key,
        "source": meta["source"],
        "qa": meta["qa"],
        "targets": meta["targets"],
        "instances": meta["instances"],
        "variants": meta["variants"],
        "edits": meta["edits"],
        "mask": meta["mask"],
        "metrics": meta["metrics"],
        "provenance": prov,
    }
    if meta.get("annotated"):  # every annotated object's box: what the paper layouts ask about (issue 29)
        out["annotated"] = [{"category": o["category"], "box": o["box"]} for o in meta["annotated"]]
    if meta.get("variant_rejects"):
        out["variant_rejects"] = meta["variant_rejects"]
    if meta.get("notes"):
        out["notes"] = meta["notes"]
    return out


_BLOCK = 512
_RECORD = 20 * _BLOCK  # tarfile's record size: a closed archive is padded to a multiple of it
_NUL = bytes(_BLOCK)
# A member header (``_ustar_header``) is these fixed parts around the name (bytes 0..99), the
# size (124..134) and the checksum (148..154; byte 155 stays a space, as tarfile leaves it).
_HDR_MID_A = b"0000644\0" + b"0000000\0" * 2  # mode, uid, gid
_HDR_MID_B = b"\0" + b"%011o\0" % TAR_MTIME  # size's NUL, mtime
_HDR_TAIL = (b" " + tarfile.REGTYPE + bytes(100) + tarfile.POSIX_MAGIC  # chksum's space, type, linkname
             + bytes(32 + 32 + 8 + 8 + 155) + bytes(_BLOCK - 500))  # uname, gname, devs, prefix, pad
# the checksum sums every header byte with the checksum field read as 8 spaces
_HDR_CONST_SUM = sum(_HDR_MID_A) + sum(_HDR_MID_B) + 8 * ord(" ") + sum(_HDR_TAIL) - ord(" ")


def _ustar_header(name: str, size: int) -> bytes:
    """The 512-byte header ``tarfile`` writes for a regular file with our fixed metadata
    (mode 0644, uid/gid 0, empty user/group, mtime ``TAR_MTIME``), byte for byte.

    tarfile's ``TarInfo.tobuf`` spends ~30 us per member on dicts and per-field formatting; a
    shard of 256 samples has ~3,000 members. Names that tarfile would not put in a plain ustar
    block (non-ASCII, over 100 characters) and sizes of 8 GiB or more go through tarfile itself
    (it adds a pax header), so the bytes stay what tarfile writes in every case."""
    if len(name) <= 100 and name.isascii() and size < 8 ** 11:
        raw = name.encode("ascii")
        sz = b"%011o" % size
        head = raw + bytes(100 - len(raw)) + _HDR_MID_A + sz + _HDR_MID_B
        chksum = _HDR_CONST_SUM + sum(raw) + sum(sz)
        return head + b"%06o\0" % chksum + _HDR_TAIL
    ti = tarfile.TarInfo(name)
    ti.size, ti.mode, ti.mtime, ti.uname, ti.gname = size, 0o644, TAR_MTIME, "", ""
    return ti.tobuf(tarfile.PAX_FORMAT, tarfile.ENCODING, "surrogateescape")


class _TarShard:
    """One shard being written: a plain tar stream into a temporary file, hashed on the way out.

    Writes what ``tarfile`` (or webdataset's ``TarWriter`` on top of it) would write for the
    same members, sorted by part name, with the fixed metadata above, but one ``write`` and one
    hash update per sample instead of tarfile's per-member copies and buffering."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.f = open(tmp, "wb", buffering=0)  # noqa: SIM115 - closed by finish()
        self.sha = hashlib.sha256()
        self.size = 0
        self.samples = 0

    def write_sample(self, key: str, parts: dict[str, bytes]) -> None:
        chunks: list[Any] = []
        for ext in sorted(parts):
            data = parts[ext]
            if isinstance(data, str):
                data = data.encode("utf-8")
            elif not isinstance(data, bytes | bytearray | memoryview):
                raise ValueError(f"part {ext!r} of {key} is {type(data).__name__}, not bytes")
            n = len(data)
            chunks.append(_ustar_header(f"{key}.{ext}", n))
            chunks.append(data)
            if n % _BLOCK:
                chunks.append(_NUL[: _BLOCK - n % _BLOCK])
        self._write(b"".join(chunks))
        self.samples += 1

    def _write(self, buf: bytes) -> None:
        self.sha.update(buf)
        view = memoryview(buf)
        while view:  # an unbuffered write may be partial
            view = view[self.f.write(view):]
        self.size += len(buf)

    def finish(self) -> None:
        """End of archive (two zero blocks, padded to tarfile's record size), then fsync."""
        end = self.size + 2 * _BLOCK
        self._write(bytes(2 * _BLOCK + (-end) % _RECORD))
        os.fsync(self.f.fileno())
        self.f.close()


# PartEncoder._reuse keeps the last sample's pictures one sample longer: at most this many bytes
# of them (a 12 Mpx photo with eight variants would otherwise hold ~300 MB for nothing)
_REUSE_MAX_BYTES = 64 << 20


class PartEncoder:
    """Last map step, on the workers: arrays -> encoded tar members (image encode is the costly
    part of writing, so it runs in parallel rather than in the driver)."""

    def __init__(self, image_format: str = "jpg", jpeg_quality: int = 95) -> None:
        self.fmt = image_format
        self.quality = jpeg_quality
        cv2.setNumThreads(1)
        # the last sample's source sha256 and its pictures by part name, (array, bytes): see ``_reuse``
        self._last_source: str | None = None
        self._last: dict[str, tuple[np.ndarray, bytes]] = {}
        self._kept = 0  # bytes of the arrays in ``_last`` (at most _REUSE_MAX_BYTES)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        samples = decode_batch(batch)
        self.encode_samples(samples)
        return encode_batch(samples)

    def encode_samples(self, samples: list[Sample]) -> None:
        """Replace each accepted sample's arrays with its encoded members (``{"parts": ...}``)."""
        for s in samples:
            if not s.ok:
                continue
            a = s.arrays
            if "video" in a:
                parts = self._video_parts(s.meta, a)
                doc = sample_json(s.meta, s.key)
                doc["parts"] = sorted([*parts, "json"])
                parts["json"] = json.dumps(doc, sort_keys=True, ensure_ascii=False).encode()
                s.arrays = {"parts": parts}
                continue
            image, mask = self._reuse(s.meta.get("source", {}).get("sha256"))
            parts = {f"orig.{self.fmt}": image(f"orig.{self.fmt}", a["image"]), "mask.png": mask("mask.png", a["mask"])}
            for v in s.meta["variants"]:
                parts[f"{v}.{self.fmt}"] = image(f"{v}.{self.fmt}", a[f"variant/{v}"])
            for v in s.meta["variants"]:  # each edit with a region of its own: its mask too
                if f"mask/{v}" in a:
                    name = "control_mask.png" if v == "random_mask" else f"{v}_mask.png"
                    parts[name] = mask(name, a[f"mask/{v}"])
            doc = sample_json(s.meta, s.key)
            doc["parts"] = sorted([*parts, "json"])
            parts["json"] = json.dumps(doc, sort_keys=True, ensure_ascii=False).encode()
            s.arrays = {"parts": parts}

    def _reuse(self, source: str | None) -> tuple[Any, Any]:
        """The encoders of one sample's pictures (image, mask), each ``(part name, array) -> bytes``.

        Inputs are one per image and question, so consecutive samples often share their source
        image (``questions_per_scene``, a manifest's or COCO's questions of one image): then the
        original, and any variant or mask the questions share (a flip, an edit of the same
        target), is the same array. A part whose array equals the one under its name in the
        previous sample of the same source (``np.array_equal``: a few us against ~0.3 ms for a
        JPEG) takes its bytes as they are, which encoding again would reproduce exactly (the
        encoders are deterministic); another source compares nothing. Arrays that share memory
        are encoded afresh: the kept array then holds what was encoded, even if a stage broke the
        rule that arrays are replaced, never changed in place."""
        prev = self._last if source is not None and source == self._last_source else {}
        self._last_source, self._last, self._kept = source, {}, 0

        def cached(encode: Any) -> Any:
            def part(name: str, arr: np.ndarray) -> bytes:
                hit = prev.get(name)
                if (hit is not None and hit[0].shape == arr.shape and hit[0].dtype == arr.dtype
                        and not np.may_share_memory(hit[0], arr) and np.array_equal(hit[0], arr)):
                    data = hit[1]
                else:
                    data = encode(arr)
                if source is not None and (keep := self._kept + arr.nbytes) <= _REUSE_MAX_BYTES:
                    self._last[name], self._kept = (arr, data), keep
                return data
            return part

        return cached(lambda arr: _encode_image(arr, self.fmt, self.quality)), cached(encode_mask)

    @staticmethod
    def _video_parts(meta: dict[str, Any], a: dict[str, np.ndarray]) -> dict[str, bytes]:
        """One clip: H.264 mp4 per variant (fixed encoder settings) and the per-frame masks."""
        from counterfactory.video_io import encode_mp4, encode_npz

        fps = meta["source"]["fps_fraction"]
        parts = {"orig.mp4": encode_mp4(a["video"], fps)}
        for v in meta["variants"]:
            parts[f"{v}.mp4"] = encode_mp4(a[f"variant/{v}"], fps)
        parts["masks.npz"] = encode_npz({
            "masks": a["masks"], "masks_core": a["masks_core"], "labels": a["labels"],
            "times": np.asarray(meta["source"]["times"], dtype=np.float64),
            **({"control_masks": a["mask/random_mask"]} if "mask/random_mask" in a else {})})
        return parts


def shard_name(dataset: str, k: int) -> str:
    return f"{dataset}-{k:06d}.tar"


def shard_range(k: int, shard_size: int, n_inputs: int) -> tuple[int, int]:
    """Shard ``k`` holds the accepted samples of inputs ``[k * shard_size, (k + 1) * shard_size)``:
    fixed by input index alone, so no block size, task order or cluster size moves a sample."""
    return k * shard_size, min((k + 1) * shard_size, n_inputs)


def n_shards(shard_size: int, n_inputs: int) -> int:
    return -(-n_inputs // shard_size)


class ShardWriter:
    """One shard, written where its samples are made (a Ray task, or the local loop): the
    accepted samples of inputs ``[lo, hi)`` in input order, the ``pairs/`` copy beside it from the
    same bytes, each under a temporary name, fsynced and renamed; then its journal entry
    (``.journal/K.json``: the shard's checksums, index rows, rejects and counters). A retried
    task writes the same bytes under the same names, so a retry is harmless. ``finish`` returns
    the entry without its rows: the small result the driver commits (``DatasetCommit``)."""

    def __init__(self, out_dir: Path, dataset: str, k: int, lo: int, hi: int, *, pairs: bool = True) -> None:
        self.out_dir, self.dataset, self.k, self.lo, self.hi, self.pairs = out_dir, dataset, k, lo, hi, pairs
        self.name = shard_name(dataset, k)
        self.next_idx = lo
        self.keys: set[str] = set()
        self._tar: _TarShard | None = None
        self._pair_tar: _TarShard | None = None
        self.index_rows: list[dict[str, Any]] = []
        self.rejects: list[dict[str, Any]] = []
        self.stage_seconds: dict[str, float] = defaultdict(float)
        self.variant_counts: Counter[str] = Counter()
        self.kind_counts: Counter[str] = Counter()
        self.part_counts: Counter[str] = Counter()
        # the shortcut audit's sampled samples, statistics computed here (issue 27; None: audit off)
        self.audit = AuditCollector.open(out_dir, self.name)

    def add_batch(self, batch: dict[str, np.ndarray]) -> None:
        for s in decode_batch(batch):
            self.add(s.idx, s.key, s.status, s.meta, s.arrays.get("parts", {}))

    def add(self, idx: int, key: str, status: str, meta: dict[str, Any], parts: dict[str, bytes]) -> None:
        """The next input of the range (inputs come in order: one task reads its range in order)."""
        if idx != self.next_idx:
            raise RuntimeError(f"shard {self.k}: input {idx} arrived, expected {self.next_idx}")
        self.next_idx += 1
        for stage, sec in meta.get("seconds", {}).items():
            self.stage_seconds[stage] += sec
        # an input rejected before ingest has no source record yet: its reference is still "uri"
        source = source_uri(meta.get("source", {})) or meta.get("uri", "")
        origin = meta.get("source", {}).get("origin") or meta.get("origin", "")
        if status != "ok":
            r = meta.get("reject", {"stage": "unknown", "reason": "unknown", "detail": ""})
            self._reject(key, idx, source, origin, r["stage"], r["reason"], r.get("detail", ""), None)
            return
        if key in self.keys:
            self._reject(key, idx, source, origin, "shard", "duplicate",
                         "same source bytes and question as an earlier input", None)
            return
        self.keys.add(key)
        for vr in meta.get("variant_rejects", []):
            self._reject(key, idx, source, origin, vr["stage"], vr["reason"], vr["detail"], vr["variant"])
        self.variant_counts.update(meta["variants"])
        self.part_counts.update(parts.keys())
        self.kind_counts.update(q["kind"] for q in meta["qa"])
        self.index_rows.append({
            "key": key, "shard": self.name, "input_index": idx, "source": source,
            "source_sha256": meta["source"]["sha256"], "variants": meta["variants"],
            "questions": [q["question"] for q in meta["qa"]],
            "question_kinds": [q["kind"] for q in meta["qa"]],
            "answers": index_answers(meta["qa"]),
            "targets": meta["targets"], "n_instances": len(meta["instances"]),
            "mask_area_frac": meta["mask"]["area_frac"],
            "metrics": index_metrics(meta["metrics"]),
        })
        if self._tar is None:
            self._open()
        self._tar.write_sample(key, parts)
        if self.audit is not None:
            self.audit.add(key, parts)
        if self._pair_tar is not None:
            # the sample's own fields (what KEY.json holds), so pairs and shard never disagree
            for pair_key, members in pair_samples({**meta, "key": key}, parts):
                self._pair_tar.write_sample(pair_key, members)

    def _open(self) -> None:
        self._tar = _TarShard(self.out_dir / f".{self.name}.{os.getpid()}.tmp")
        if self.pairs:
            (self.out_dir / PAIRS_DIR).mkdir(exist_ok=True)
            self._pair_tar = _TarShard(self.out_dir / PAIRS_DIR / f".{self.name}.{os.getpid()}.tmp")

    def _reject(self, key, idx, source, origin, stage, reason, detail, variant) -> None:
        self.rejects.append({"key": key, "input_index": idx, "source": source, "origin": origin,
                             "stage": stage, "reason": reason, "detail": detail, "variant": variant})

    @staticmethod
    def _close(tar: _TarShard, final: Path, name: str) -> dict[str, Any]:
        tar.finish()  # end blocks, fsync, close
        os.replace(tar.tmp, final)
        # hashed on the way out: one pass over the bytes, not a re-read of the shard
        return {"name": name, "sha256": tar.sha.hexdigest(), "bytes": tar.size, "samples": tar.samples}

    def finish(self) -> dict[str, Any]:
        """Close the shard, journal it, and return the driver's part of the journal entry. A range
        whose inputs were all rejected gets an empty tar: shard names stay 0..K-1 without gaps
        (``{000000..K-1}`` brace patterns), and a file per shard says the shard is done."""
        if self.next_idx != self.hi:
            raise RuntimeError(f"shard {self.k}: inputs {self.next_idx}..{self.hi - 1} never arrived")
        if self._tar is None:
            self._open()
        shard = self._close(self._tar, self.out_dir / self.name, self.name)
        pair = None
        if self._pair_tar is not None:
            pair = self._close(self._pair_tar, self.out_dir / PAIRS_DIR / self.name, f"{PAIRS_DIR}/{self.name}")
        if self.audit is not None:  # before the journal entry: a journaled shard has its features
            self.audit.finish()
        whole = [r for r in self.rejects if r["variant"] is None]
        entry = {
            "k": self.k, "lo": self.lo, "hi": self.hi,
            "shard": shard, "pair_shard": pair,
            "samples": len(self.index_rows), "rejected_inputs": len(whole),
            "rejected_variants": len(self.rejects) - len(whole),
            "input_reject_reasons": dict(Counter(f"{r['stage']}/{r['reason']}" for r in whole)),
            "variant_reject_stages": dict(Counter(r["stage"] for r in self.rejects if r["variant"] is not None)),
            "last_reject": whole[-1] if whole else None,
            "stage_seconds": dict(self.stage_seconds),
            "variant_counts": dict(self.variant_counts),
            "kind_counts": dict(self.kind_counts),
            "part_counts": dict(self.part_counts),
        }
        jdir = self.out_dir / JOURNAL
        jdir.mkdir(exist_ok=True)
        atomic_write(jdir / f"{self.k:06d}.json", json.dumps(
            {**entry, "index_rows": self.index_rows, "rejects": self.rejects}, sort_keys=True).encode())
        return entry


def read_journal(out_dir: Path, k: int) -> dict[str, Any] | None:
    try:
        return json.loads((out_dir / JOURNAL / f"{k:06d}.json").read_bytes())
    except (OSError, ValueError):
        return None


class DatasetCommit:
    """Driver side, in the shape of a Ray ``Datasink``: ``on_write_start`` (what a killed run of
    this spec already wrote: the shards still to write), ``on_write_result`` for each shard's small
    result as it arrives in any order (counts, the failure budget, live progress), and
    ``on_write_complete`` (index, rejects, config, shard index and manifest, made from the
    shards' journal entries in shard order). It never sees a sample's bytes."""

    def __init__(self, out_dir: Path, dataset: str, shard_size: int, n_inputs: int,
                 config: dict[str, Any], config_hash: str, *, max_rejected_inputs: int | None = None,
                 fill_missing: bool = False, pairs: bool = True, remote: str | None = None,
                 writers_here: bool = False) -> None:
        self.out_dir = out_dir
        # the shard writers run in this process (a run in one process): the audit's helper
        # process takes their statistics and publish's fits (audit_features.write_plan)
        self.writers_here = writers_here
        # an object-store root: the staging prefix the writers put shards and journal entries in
        self.remote = remote
        self.pairs = pairs
        # failure budget: more rejected inputs than this stops the run (None: no limit)
        self.max_rejected_inputs = max_rejected_inputs
        # inputs lost with an errored block (Ray Data max_errored_blocks) become rejects at close
        self.fill_missing = fill_missing
        self.dataset = dataset
        self.shard_size = shard_size
        self.n_inputs = n_inputs
        self.n_shards = n_shards(shard_size, n_inputs)
        self.config = config
        self.config_hash = config_hash
        out_dir.mkdir(parents=True, exist_ok=True)
        self.done: set[int] = set()
        self.next_idx = 0  # inputs accounted for (the live display's count)
        self.samples = 0
        self.rejected_inputs = 0
        self.resumed_shards = 0
        self.resumed_inputs = 0
        self.reject_counts: Counter[str] = Counter()  # whole-input rejects by "stage/reason"
        self.variant_reject_stages: Counter[str] = Counter()
        self.stage_seconds: dict[str, float] = defaultdict(float)
        self.variant_counts: Counter[str] = Counter()

    @property
    def shards(self) -> list[int]:
        """The shards written so far (by this run or kept from a killed one)."""
        return sorted(self.done)

    def shard_range(self, k: int) -> tuple[int, int]:
        return shard_range(k, self.shard_size, self.n_inputs)

    # -- resume ------------------------------------------------------------------------------
    def on_write_start(self) -> list[int]:
        """Keep every journaled shard whose files still match their checksums; return the shards
        still to write (a kill leaves each shard whole or absent, in any pattern)."""
        write_plan(self.out_dir, audit_sample(self.config, self.n_inputs), helper=self.writers_here)
        if self.remote:
            return self._resume_remote()
        jdir = self.out_dir / JOURNAL
        for path in sorted(jdir.glob("[0-9]*.json")) if jdir.is_dir() else []:
            e = read_journal(self.out_dir, int(path.stem)) if path.stem.isdigit() else None
            if e is None or not self._intact(e):
                path.unlink(missing_ok=True)  # its shard is written again
                continue
            self._count(e)
            self.resumed_shards += 1
            self.resumed_inputs += e["hi"] - e["lo"]
        return [k for k in range(self.n_shards) if k not in self.done]

    def _resume_remote(self) -> list[int]:
        """On an object store the store's journal entries decide (a kill on another machine, a
        shard written on another node): each one whose objects are there is kept, and copied
        into the local journal; a local entry the store lacks is written again."""
        kept = remote_entries(self.remote, self.n_shards)
        jdir = self.out_dir / JOURNAL
        for path in sorted(jdir.glob("*.json")) if jdir.is_dir() else []:
            if not path.stem.isdigit() or int(path.stem) not in kept:
                path.unlink(missing_ok=True)
        for k, e in sorted(kept.items()):
            if (e["lo"], e["hi"]) != self.shard_range(k) or e["k"] != k:
                continue
            keep_entry(self.out_dir, e)
            self._count(e)
            self.resumed_shards += 1
            self.resumed_inputs += e["hi"] - e["lo"]
        return [k for k in range(self.n_shards) if k not in self.done]

    def _journal(self, k: int) -> dict[str, Any] | None:
        e = read_journal(self.out_dir, k)
        if e is None and self.remote:  # written on another node: its entry is on the store
            fetch(self.out_dir, self.remote, [journal_name(k)])
            e = read_journal(self.out_dir, k)
        return e

    def _intact(self, e: dict[str, Any]) -> bool:
        k = e.get("k")
        if not isinstance(k, int) or not 0 <= k < self.n_shards or (e["lo"], e["hi"]) != self.shard_range(k):
            return False
        for sh, want in ((e["shard"], shard_name(self.dataset, k)),
                         (e["pair_shard"] if self.pairs else None, f"{PAIRS_DIR}/{shard_name(self.dataset, k)}")):
            if sh is None and want.startswith(PAIRS_DIR) and not self.pairs:
                continue
            if sh is None:
                return False
            f = self.out_dir / sh["name"]
            if sh["name"] != want or not f.is_file() or f.stat().st_size != sh["bytes"] or sha256_file(f) != sh["sha256"]:
                return False
        return True

    # -- results in --------------------------------------------------------------------------
    def on_write_result(self, entry: dict[str, Any]) -> None:
        """One shard written (any order). Checks the failure budget."""
        self._count(entry)
        cap = self.max_rejected_inputs
        if cap is not None and self.rejected_inputs > cap:
            last = entry.get("last_reject") or {}
            raise FailureBudgetExceeded(
                f"failure budget exceeded: {self.rejected_inputs} of {self.n_inputs} inputs rejected "
                f"(failure_budget.max_reject_share allows {cap}); last: input {last.get('input_index')} at "
                f"{last.get('stage')}: {last.get('reason')}; "
                f"{len(self.done)} completed shard(s) kept, rerun the same spec to resume")

    def _count(self, e: dict[str, Any]) -> None:
        if e["k"] in self.done:
            raise RuntimeError(f"shard {e['k']} was written twice")
        self.done.add(e["k"])
        self.next_idx += e["hi"] - e["lo"]
        self.samples += e["samples"]
        self.rejected_inputs += e["rejected_inputs"]
        self.reject_counts.update(e["input_reject_reasons"])
        self.variant_reject_stages.update(e["variant_reject_stages"])
        for stage, sec in e["stage_seconds"].items():
            self.stage_seconds[stage] += sec
        self.variant_counts.update(e["variant_counts"])

    def drop_journal(self) -> None:
        import shutil

        shutil.rmtree(self.out_dir / JOURNAL, ignore_errors=True)
        if self.remote:
            remote_dir(self.remote).delete_tree(JOURNAL)

    # -- the end ----------------------------------------------------------------------------
    def _write_missing(self, k: int) -> dict[str, Any]:
        """A shard Ray Data gave up on (within max_errored_blocks): its inputs become rejects, its
        tar an empty one (no sample bytes pass through the driver)."""
        lo, hi = self.shard_range(k)
        w = ShardWriter(self.out_dir, self.dataset, k, lo, hi, pairs=self.pairs)
        why = {"stage": "pipeline", "reason": "errored_block", "detail": "the block holding this input failed after retries"}
        for i in range(lo, hi):
            w.add(i, "", "rejected", {"reject": why}, {})
        entry = w.finish()
        if self.remote:
            put_shard(self.out_dir, self.remote, entry)
        return entry

    def _drop_later_copies(self, e: dict[str, Any], keys: set[str]) -> dict[str, Any]:
        """Shard ``e["k"]`` rewritten without its copies of keys an earlier shard keeps; the run's
        counts follow (the failure budget was checked on the counts before)."""
        if self.remote:  # the shard may have been written on another node or machine
            fetch(self.out_dir, self.remote, [sh["name"] for sh in (e["shard"], e.get("pair_shard")) if sh])
        new = drop_inputs(self.out_dir, e, keys, _TarShard)
        if self.remote:  # the new shard replaces the stored one, its journal entry last
            put_shard(self.out_dir, self.remote, new)
        self.samples += new["samples"] - e["samples"]
        self.rejected_inputs += new["rejected_inputs"] - e["rejected_inputs"]
        self.reject_counts.update(new["input_reject_reasons"])
        self.reject_counts.subtract(e["input_reject_reasons"])
        self.variant_reject_stages.update(new["variant_reject_stages"])
        self.variant_reject_stages.subtract(e["variant_reject_stages"])
        self.variant_counts.update(new["variant_counts"])
        self.variant_counts.subtract(e["variant_counts"])
        for c in (self.reject_counts, self.variant_reject_stages, self.variant_counts):
            for key in [key for key, n in c.items() if n <= 0]:
                del c[key]
        return new

    def on_write_complete(self) -> dict[str, Any]:
        missing = [k for k in range(self.n_shards) if k not in self.done]
        if missing and self.fill_missing:
            for k in missing:
                self._count(self._write_missing(k))
        elif missing:
            lost = sum(hi - lo for lo, hi in map(self.shard_range, missing))
            raise RuntimeError(f"{lost} input(s) never came back from the pipeline; nothing finalized")
        # a worker killed mid-shard (its task retried elsewhere) leaves its temporary file behind
        for d in (self.out_dir, self.out_dir / PAIRS_DIR):
            for tmp in d.glob(f".{self.dataset}-*.tar.*.tmp"):
                tmp.unlink(missing_ok=True)
        index_tmp, rejects_tmp = self.out_dir / ".index.parquet.tmp", self.out_dir / ".rejects.parquet.tmp"
        index_w = pq.ParquetWriter(index_tmp, INDEX_SCHEMA)
        rejects_w = pq.ParquetWriter(rejects_tmp, REJECT_SCHEMA)
        shards: list[dict[str, Any]] = []
        pair_shards: list[dict[str, Any]] = []
        kinds: Counter[str] = Counter()
        parts: Counter[str] = Counter()
        variants: Counter[str] = Counter()
        by_reason: Counter[tuple[str, str, str]] = Counter()
        samples = rejected_inputs = 0
        seen = KeysSeen()  # the cross-shard duplicate rule (see dedupe.py)
        # one shard's journal at a time, in shard order: driver memory does not grow with the run
        for k in range(self.n_shards):
            e = self._journal(k)
            if e is None:
                raise RuntimeError(f"shard {k}: its journal entry is gone; nothing finalized")
            if later := seen.later(e):
                e = self._drop_later_copies(e, later)
            seen.take(e)
            shards.append(e["shard"])
            if self.pairs and e["pair_shard"]:
                pair_shards.append(e["pair_shard"])
            if e["index_rows"]:
                index_w.write_table(pa.Table.from_pylist(e["index_rows"], schema=INDEX_SCHEMA))
            if e["rejects"]:
                rejects_w.write_table(pa.Table.from_pylist(e["rejects"], schema=REJECT_SCHEMA))
            samples += e["samples"]
            rejected_inputs += e["rejected_inputs"]
            kinds.update(e["kind_counts"])
            parts.update(e["part_counts"])
            variants.update(e["variant_counts"])
            by_reason.update((r["stage"], r["reason"], "variant" if r["variant"] else "input") for r in e["rejects"])
        index_w.close()
        rejects_w.close()
        cap = self.max_rejected_inputs
        if cap is not None and rejected_inputs > cap:  # duplicates across shards are found only here
            index_tmp.unlink()
            rejects_tmp.unlink()
            raise FailureBudgetExceeded(
                f"failure budget exceeded: {rejected_inputs} of {self.n_inputs} inputs rejected "
                f"(failure_budget.max_reject_share allows {cap}), {self.reject_counts['shard/duplicate']} of them "
                "duplicates of earlier inputs in other shards; every shard kept, rerun the same spec to resume")
        os.replace(index_tmp, self.out_dir / INDEX)
        os.replace(rejects_tmp, self.out_dir / REJECTS)
        atomic_write(self.out_dir / CONFIG, yaml.safe_dump(self.config, sort_keys=False).encode())
        # Shard index in the wids format (webdataset's indexed reader), plus our sha256:
        # loaders size epochs from it without opening a tar. URLs are relative to this file.
        shard_index = {
            "__kind__": "wids-shard-index-v1",
            "wids_version": 1,
            "name": self.dataset,
            "shardlist": [{"url": s["name"], "nsamples": s["samples"], "filesize": s["bytes"],
                           "sha256": s["sha256"]} for s in shards],
        }
        atomic_write(self.out_dir / SHARDS_INDEX, json.dumps(shard_index, indent=1).encode())
        files = {n: {"sha256": sha256_file(self.out_dir / n), "bytes": (self.out_dir / n).stat().st_size}
                 for n in (INDEX, REJECTS, CONFIG, SHARDS_INDEX)}
        # pair shards are files of the version like the index: verify checks their sha256
        files.update({p["name"]: {k: p[k] for k in ("sha256", "bytes", "samples")} for p in pair_shards})
        n_rejects = sum(by_reason.values())
        manifest = {
            "format": FORMAT,
            "dataset": self.dataset,
            "package_version": __version__,
            "config_hash": self.config_hash,
            "counts": {
                "inputs": self.n_inputs,
                "samples": samples,
                "rejected_inputs": rejected_inputs,
                "rejected_variants": n_rejects - rejected_inputs,
                "variants": dict(sorted(variants.items())),
                "question_kinds": dict(sorted(kinds.items())),
                "parts": dict(sorted(parts.items())),
                **({"pairs": sum(p["samples"] for p in pair_shards)} if self.pairs else {}),
            },
            "rejects": [{"stage": s, "reason": r, "scope": sc, "count": c}
                        for (s, r, sc), c in sorted(by_reason.items())],
            "shards": shards,
            "files": files,
        }
        if samples + rejected_inputs != self.n_inputs:
            raise RuntimeError(f"accounting error: {samples} samples + {rejected_inputs} rejects != {self.n_inputs} inputs")
        atomic_write(self.out_dir / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True).encode())
        return manifest

    close = on_write_complete
