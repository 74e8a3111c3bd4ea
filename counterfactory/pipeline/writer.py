"""The output format: WebDataset shards of paired samples, an index, a rejects ledger, a manifest.

Two halves: ``PartEncoder`` runs on the Ray workers as the last map step and turns a sample's
arrays into the bytes of its tar members; ``DatasetWriter`` runs in the driver and only writes
bytes. It reorders rows by input index so shard contents never depend on Ray's execution order,
writes each shard under a temporary name, fsyncs and renames it, and streams index and rejects
rows to parquet as shards complete. The manifest (per-shard sha256, bytes, sample count) holds
no timestamps, so the same config and inputs give a byte-identical manifest.

Resume: after each shard is renamed into place the writer journals it (``.journal/NNNNNN.json``,
written atomically): the shard's name, sha256, bytes and samples, the input index the stream
has reached, the shard's index rows, the rejects recorded since the previous shard, and the
running counters. ``resume()`` replays the journal of a staging folder left by a killed run,
keeps every shard whose bytes still match its sha256 (the first mismatch ends the replay) and
says from which input to continue. Shards are assigned in input order, so recomputing the
inputs after that point gives the same following shards: the final manifest equals an
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


class PartEncoder:
    """Last map step, on the workers: arrays -> encoded tar members (image encode is the costly
    part of writing, so it runs in parallel rather than in the driver)."""

    def __init__(self, image_format: str = "jpg", jpeg_quality: int = 95) -> None:
        self.fmt = image_format
        self.quality = jpeg_quality
        cv2.setNumThreads(1)

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
            parts = {f"orig.{self.fmt}": _encode_image(a["image"], self.fmt, self.quality),
                     "mask.png": _encode_image(a["mask"], "png", 0)}
            for v in s.meta["variants"]:
                parts[f"{v}.{self.fmt}"] = _encode_image(a[f"variant/{v}"], self.fmt, self.quality)
            for v in s.meta["variants"]:  # each edit with a region of its own: its mask too
                if f"mask/{v}" in a:
                    name = "control_mask.png" if v == "random_mask" else f"{v}_mask.png"
                    parts[name] = _encode_image(a[f"mask/{v}"], "png", 0)
            doc = sample_json(s.meta, s.key)
            doc["parts"] = sorted([*parts, "json"])
            parts["json"] = json.dumps(doc, sort_keys=True, ensure_ascii=False).encode()
            s.arrays = {"parts": parts}

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


class DatasetWriter:
    """Driver side: ordered, atomic, streaming. ``add`` rows in any order; ``close`` at the end."""

    def __init__(self, out_dir: Path, dataset: str, shard_size: int, n_inputs: int,
                 config: dict[str, Any], config_hash: str, *, max_rejected_inputs: int | None = None,
                 fill_missing: bool = False, pairs: bool = True) -> None:
        self.out_dir = out_dir
        # the pairs layout (``pairs/``), written beside each shard from the same bytes
        self.pairs = pairs
        self.pair_shards: list[dict[str, Any]] = []
        self._pair_tar: _TarShard | None = None
        # failure budget: more rejected inputs than this stops the run (None: no limit)
        self.max_rejected_inputs = max_rejected_inputs
        # inputs lost with an errored block (Ray Data max_errored_blocks) become rejects at close
        self.fill_missing = fill_missing
        self.rejected_inputs = 0
        self.resumed_shards = 0
        self.resumed_inputs = 0
        self._cursor = 0  # inputs fully accounted for (journaled with each shard)
        self._rejects_journaled = 0
        self.dataset = dataset
        self.shard_size = shard_size
        self.n_inputs = n_inputs
        self.config = config
        self.config_hash = config_hash
        out_dir.mkdir(parents=True, exist_ok=True)
        self.pending: dict[int, tuple[str, str, dict[str, Any], dict[str, bytes]]] = {}
        self.next_idx = 0
        self.keys: set[str] = set()
        self.shards: list[dict[str, Any]] = []
        self._tar: _TarShard | None = None
        self._index_rows: list[dict[str, Any]] = []
        self._index_writer = pq.ParquetWriter(out_dir / ".index.parquet.tmp", INDEX_SCHEMA)
        self._rejects: list[dict[str, Any]] = []
        self.stage_seconds: dict[str, float] = defaultdict(float)
        self.variant_counts: Counter[str] = Counter()
        self.kind_counts: Counter[str] = Counter()
        # which members samples carry (variants differ per sample): readers that need one
        # schema for the whole dataset (Hugging Face datasets) take it from here
        self.part_counts: Counter[str] = Counter()
        self.samples = 0

    # -- rows in ---------------------------------------------------------------------------
    def add_batch(self, batch: dict[str, np.ndarray]) -> None:
        for s in decode_batch(batch):
            self.add(s.idx, s.key, s.status, s.meta, s.arrays.get("parts", {}))

    def add(self, idx: int, key: str, status: str, meta: dict[str, Any], parts: dict[str, bytes]) -> None:
        if idx in self.pending or idx < self.next_idx:
            raise RuntimeError(f"input {idx} arrived twice")
        self.pending[idx] = (key, status, meta, parts)
        while self.next_idx in self.pending:
            self._emit(self.next_idx, *self.pending.pop(self.next_idx))
            self.next_idx += 1

    def _emit(self, idx: int, key: str, status: str, meta: dict[str, Any], parts: dict[str, bytes]) -> None:
        self._cursor = idx + 1  # everything this input adds precedes a shard close it triggers
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
        # the row must be queued before the write, which may close (and flush) the shard
        shard = self._shard_name(len(self.shards))
        self.samples += 1
        self.variant_counts.update(meta["variants"])
        self.part_counts.update(parts.keys())
        self.kind_counts.update(q["kind"] for q in meta["qa"])
        self._index_rows.append({
            "key": key, "shard": shard, "input_index": idx, "source": source,
            "source_sha256": meta["source"]["sha256"], "variants": meta["variants"],
            "questions": [q["question"] for q in meta["qa"]],
            "question_kinds": [q["kind"] for q in meta["qa"]],
            "answers": index_answers(meta["qa"]),
            "targets": meta["targets"], "n_instances": len(meta["instances"]),
            "mask_area_frac": meta["mask"]["area_frac"],
            "metrics": index_metrics(meta["metrics"]),
        })
        self._write_sample(key, parts, meta)

    def _reject(self, key, idx, source, origin, stage, reason, detail, variant) -> None:
        self._rejects.append({"key": key, "input_index": idx, "source": source, "origin": origin,
                              "stage": stage, "reason": reason, "detail": detail, "variant": variant})
        if variant is None:
            self.rejected_inputs += 1
            cap = self.max_rejected_inputs
            if cap is not None and self.rejected_inputs > cap:
                raise FailureBudgetExceeded(
                    f"failure budget exceeded: {self.rejected_inputs} of {self.n_inputs} inputs rejected "
                    f"(failure_budget.max_reject_share allows {cap}); last: input {idx} at {stage}: {reason}; "
                    f"{len(self.shards)} completed shard(s) kept, rerun the same spec to resume")

    # -- shards ------------------------------------------------------------------------------
    def _shard_name(self, i: int) -> str:
        return f"{self.dataset}-{i:06d}.tar"

    def _write_sample(self, key: str, parts: dict[str, bytes], meta: dict[str, Any]) -> None:
        if self._tar is None:
            name = self._shard_name(len(self.shards))
            self._tar = _TarShard(self.out_dir / f".{name}.tmp")
            if self.pairs:
                (self.out_dir / PAIRS_DIR).mkdir(exist_ok=True)
                self._pair_tar = _TarShard(self.out_dir / PAIRS_DIR / f".{name}.tmp")
        self._tar.write_sample(key, parts)
        if self._pair_tar is not None:
            # the sample's own fields (what KEY.json holds), so pairs and shard never disagree
            for pair_key, members in pair_samples({**meta, "key": key}, parts):
                self._pair_tar.write_sample(pair_key, members)
        if self._tar.samples >= self.shard_size:
            self._close_shard()

    def _close_shard(self) -> None:
        tar = self._tar
        if tar is None:
            return
        tar.finish()  # end blocks, fsync, close
        name = self._shard_name(len(self.shards))
        os.replace(tar.tmp, self.out_dir / name)
        # hashed on the way out: one pass over the bytes, not a re-read of the shard
        self.shards.append({"name": name, "sha256": tar.sha.hexdigest(), "bytes": tar.size,
                            "samples": tar.samples})
        if self._pair_tar is not None:
            pt, self._pair_tar = self._pair_tar, None
            pt.finish()
            os.replace(pt.tmp, self.out_dir / PAIRS_DIR / name)
            self.pair_shards.append({"name": f"{PAIRS_DIR}/{name}", "sha256": pt.sha.hexdigest(),
                                     "bytes": pt.size, "samples": pt.samples})
        self._index_writer.write_table(pa.Table.from_pylist(self._index_rows, schema=INDEX_SCHEMA))
        self._journal(self._index_rows)
        self._index_rows = []
        self._tar = None

    # -- journal / resume ----------------------------------------------------------------------
    def _journal(self, index_rows: list[dict[str, Any]]) -> None:
        """Record the shard just renamed into place; atomic, so a kill leaves it whole or absent."""
        entry = {
            "shard": self.shards[-1],
            "pair_shard": self.pair_shards[-1] if self.pairs else None,
            "next_idx": self._cursor,
            "index_rows": index_rows,
            "rejects": self._rejects[self._rejects_journaled:],
            "stage_seconds": dict(self.stage_seconds),
            "variant_counts": dict(self.variant_counts),
            "kind_counts": dict(self.kind_counts),
            "part_counts": dict(self.part_counts),
        }
        jdir = self.out_dir / JOURNAL
        jdir.mkdir(exist_ok=True)
        atomic_write(jdir / f"{len(self.shards) - 1:06d}.json", json.dumps(entry, sort_keys=True).encode())
        self._rejects_journaled = len(self._rejects)

    def resume(self) -> int:
        """Restore the state journaled by an earlier, killed run in this folder; return the first
        input index still to compute. Only shards whose bytes match the journal are kept."""
        jdir = self.out_dir / JOURNAL
        entries = sorted(jdir.glob("[0-9]*.json")) if jdir.is_dir() else []
        kept = 0
        for i, path in enumerate(entries):
            try:
                e = json.loads(path.read_text())
            except (OSError, ValueError):
                break
            sh = e["shard"]
            f = self.out_dir / sh["name"]
            if (path.name != f"{i:06d}.json" or sh["name"] != self._shard_name(i) or not f.is_file()
                    or f.stat().st_size != sh["bytes"] or sha256_file(f) != sh["sha256"]):
                break
            ps = e.get("pair_shard")
            if self.pairs and not (ps and (self.out_dir / ps["name"]).is_file()
                                   and sha256_file(self.out_dir / ps["name"]) == ps["sha256"]):
                break
            self.shards.append(sh)
            if self.pairs:
                self.pair_shards.append(ps)
            self._index_writer.write_table(pa.Table.from_pylist(e["index_rows"], schema=INDEX_SCHEMA))
            self.keys.update(r["key"] for r in e["index_rows"])
            self.samples += sh["samples"]
            self._rejects.extend(e["rejects"])
            self.next_idx = self._cursor = e["next_idx"]
            self.stage_seconds = defaultdict(float, e["stage_seconds"])
            self.variant_counts = Counter(e["variant_counts"])
            self.kind_counts = Counter(e["kind_counts"])
            self.part_counts = Counter(e["part_counts"])
            kept += 1
        for path in entries[kept:]:  # journal past a damaged or missing shard is void
            path.unlink(missing_ok=True)
        self._rejects_journaled = len(self._rejects)
        self.rejected_inputs = sum(1 for r in self._rejects if r["variant"] is None)
        self.resumed_shards = kept
        self.resumed_inputs = self.next_idx
        return self.next_idx

    def drop_journal(self) -> None:
        import shutil

        shutil.rmtree(self.out_dir / JOURNAL, ignore_errors=True)

    # -- the end ----------------------------------------------------------------------------
    def close(self) -> dict[str, Any]:
        if self.fill_missing and self.next_idx < self.n_inputs:
            # inputs of blocks Ray Data gave up on (within max_errored_blocks): rejects, in order
            for idx in range(self.next_idx, self.n_inputs):
                if idx in self.pending:
                    self._emit(idx, *self.pending.pop(idx))
                else:
                    self._cursor = idx + 1
                    self._reject("", idx, "", "", "pipeline", "errored_block",
                                 "the block holding this input failed after retries", None)
                self.next_idx = idx + 1
        if self.pending or self.next_idx != self.n_inputs:
            missing = self.n_inputs - self.next_idx
            raise RuntimeError(f"{missing} input(s) never came back from the pipeline; nothing finalized")
        self._close_shard()
        self._index_writer.close()
        os.replace(self.out_dir / ".index.parquet.tmp", self.out_dir / INDEX)
        rej = pa.Table.from_pylist(self._rejects, schema=REJECT_SCHEMA)
        sink = pa.BufferOutputStream()
        pq.write_table(rej, sink)
        atomic_write(self.out_dir / REJECTS, sink.getvalue().to_pybytes())
        atomic_write(self.out_dir / CONFIG, yaml.safe_dump(self.config, sort_keys=False).encode())
        # Shard index in the wids format (webdataset's indexed reader), plus our sha256:
        # loaders size epochs from it without opening a tar. URLs are relative to this file.
        shard_index = {
            "__kind__": "wids-shard-index-v1",
            "wids_version": 1,
            "name": self.dataset,
            "shardlist": [{"url": s["name"], "nsamples": s["samples"], "filesize": s["bytes"],
                           "sha256": s["sha256"]} for s in self.shards],
        }
        atomic_write(self.out_dir / SHARDS_INDEX, json.dumps(shard_index, indent=1).encode())
        rejected_inputs = self.rejected_inputs
        by_reason = Counter(
            (r["stage"], r["reason"], "variant" if r["variant"] else "input") for r in self._rejects
        )
        files = {n: {"sha256": sha256_file(self.out_dir / n), "bytes": (self.out_dir / n).stat().st_size}
                 for n in (INDEX, REJECTS, CONFIG, SHARDS_INDEX)}
        # pair shards are files of the version like the index: verify checks their sha256
        files.update({p["name"]: {k: p[k] for k in ("sha256", "bytes", "samples")} for p in self.pair_shards})
        manifest = {
            "format": FORMAT,
            "dataset": self.dataset,
            "package_version": __version__,
            "config_hash": self.config_hash,
            "counts": {
                "inputs": self.n_inputs,
                "samples": self.samples,
                "rejected_inputs": rejected_inputs,
                "rejected_variants": len(self._rejects) - rejected_inputs,
                "variants": dict(sorted(self.variant_counts.items())),
                "question_kinds": dict(sorted(self.kind_counts.items())),
                "parts": dict(sorted(self.part_counts.items())),
                **({"pairs": sum(p["samples"] for p in self.pair_shards)} if self.pairs else {}),
            },
            "rejects": [{"stage": s, "reason": r, "scope": sc, "count": c}
                        for (s, r, sc), c in sorted(by_reason.items())],
            "shards": self.shards,
            "files": files,
        }
        if self.samples + rejected_inputs != self.n_inputs:
            raise RuntimeError(f"accounting error: {self.samples} samples + {rejected_inputs} rejects != {self.n_inputs} inputs")
        atomic_write(self.out_dir / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True).encode())
        return manifest
