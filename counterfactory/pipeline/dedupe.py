"""The global duplicate rule across shards (issue 26).

A sample's key (source bytes + question) is known only after ingest, on the worker that writes
its shard; ``ShardWriter.add`` rejects a repeat inside one shard. Across shards the driver applies
the same rule at close (``DatasetCommit.on_write_complete`` reads every journal entry in shard
order anyway): the input with the lowest index keeps the key, and every shard holding a later
copy is rewritten without it. The rewrite copies the shard's other samples' bytes as they are
(one shard is a concatenation of per-sample tar chunks) and records the dropped input as the
``shard/duplicate`` reject an in-stream rejection would have written, so the shard, its ``pairs/``
copy and its journal entry are byte for byte what one writer seeing both copies would make.

Resume-safe: the new shard and pair shard are renamed into place before the journal entry is
replaced; a kill in between leaves a journal whose checksums no longer match, so the next run
writes that shard again and this pass drops the copy again. With no duplicate it costs one set
lookup per sample (about 100 bytes of driver memory per sample at close).
"""

from __future__ import annotations

import json
import os
import tarfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from counterfactory.layout import JOURNAL, atomic_write

DUPLICATE = ("shard", "duplicate", "same source bytes and question as an earlier input")


def _sample_spans(path: Path) -> list[tuple[str, int, int, list[str]]]:
    """(sample key, start, end, member extensions) of each sample of a shard written by
    ``ShardWriter``: its members are consecutive and named ``KEY.EXT`` (a pax header included)."""
    out: list[tuple[str, int, int, list[str]]] = []
    with tarfile.open(path, "r:") as tar:
        for m in tar:
            key, _, ext = m.name.partition(".")
            end = m.offset_data + -(-m.size // 512) * 512
            if out and out[-1][0] == key:
                out[-1] = (key, out[-1][1], end, [*out[-1][3], ext])
            else:
                out.append((key, m.offset, end, [ext]))
    return out


def _rewrite_tar(path: Path, keep: Callable[[str], bool], new_tar: Callable[[Path], Any]) -> dict[str, Any]:
    """``path`` again with only the samples ``keep`` accepts (their chunks copied as they are),
    under a temporary name, fsynced, renamed: the ``_TarShard`` result fields."""
    spans = _sample_spans(path)
    tar = new_tar(path.parent / f".{path.name}.{os.getpid()}.tmp")
    with open(path, "rb") as f:
        for key, start, end, _ in spans:
            if keep(key):
                f.seek(start)
                tar._write(f.read(end - start))
                tar.samples += 1
    tar.finish()
    os.replace(tar.tmp, path)
    return {"sha256": tar.sha.hexdigest(), "bytes": tar.size, "samples": tar.samples}


def drop_inputs(out_dir: Path, journal: dict[str, Any], drop: set[str],
                new_tar: Callable[[Path], Any]) -> dict[str, Any]:
    """Shard ``journal["k"]`` rewritten without the samples whose keys are in ``drop`` (each a
    later copy of a key an earlier shard keeps); returns its new journal entry (rows included),
    already written to ``.journal/K.json``."""
    e = dict(journal)
    shard_path = out_dir / e["shard"]["name"]
    origins: dict[str, str] = {}
    parts: Counter[str] = Counter()
    spans = _sample_spans(shard_path)
    with open(shard_path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
        for key, _, _, exts in spans:
            if key in drop:
                parts.update(exts)
                doc = json.loads(tar.extractfile(f"{key}.json").read())
                origins[key] = (doc.get("source") or {}).get("origin", "")
    e["shard"] = {**e["shard"], **_rewrite_tar(shard_path, lambda key: key not in drop, new_tar)}
    if e.get("pair_shard"):
        e["pair_shard"] = {**e["pair_shard"], **_rewrite_tar(
            out_dir / e["pair_shard"]["name"], lambda pair_key: pair_key.split("_", 1)[0] not in drop, new_tar)}
    gone = [r for r in e["index_rows"] if r["key"] in drop]
    at = {r["input_index"] for r in gone}
    e["index_rows"] = [r for r in e["index_rows"] if r["key"] not in drop]
    # the copy's own variant rejects go with it: an in-stream duplicate is rejected before them
    rejects = [r for r in e["rejects"] if r["input_index"] not in at]
    rejects += [{"key": r["key"], "input_index": r["input_index"], "source": r["source"],
                 "origin": origins.get(r["key"], ""), "stage": DUPLICATE[0], "reason": DUPLICATE[1],
                 "detail": DUPLICATE[2], "variant": None} for r in gone]
    rejects.sort(key=lambda r: r["input_index"])  # stable: a sample's own rows keep their order
    e["rejects"] = rejects
    whole = [r for r in rejects if r["variant"] is None]
    e["samples"] = len(e["index_rows"])
    e["rejected_inputs"] = len(whole)
    e["rejected_variants"] = len(rejects) - len(whole)
    e["input_reject_reasons"] = dict(Counter(f"{r['stage']}/{r['reason']}" for r in whole))
    e["variant_reject_stages"] = dict(Counter(r["stage"] for r in rejects if r["variant"] is not None))
    e["last_reject"] = whole[-1] if whole else None
    e["variant_counts"] = dict(Counter(e["variant_counts"]) - Counter(v for r in gone for v in r["variants"]))
    e["kind_counts"] = dict(Counter(e["kind_counts"]) - Counter(q for r in gone for q in r["question_kinds"]))
    e["part_counts"] = dict(Counter(e["part_counts"]) - parts)
    atomic_write(out_dir / JOURNAL / f"{e['k']:06d}.json", json.dumps(e, sort_keys=True).encode())
    return e


class KeysSeen:
    """The keys of the shards read so far, in shard order: which of the next shard's samples are
    later copies (``later``), and the shard after dropping them (``take``)."""

    def __init__(self) -> None:
        self.keys: set[str] = set()

    def later(self, journal: dict[str, Any]) -> set[str]:
        return {r["key"] for r in journal["index_rows"] if r["key"] in self.keys}

    def take(self, journal: dict[str, Any]) -> None:
        self.keys.update(r["key"] for r in journal["index_rows"])
