"""``counterfactory verify``: recompute the checksums of a version folder (local or on an object
store) against its manifest, and the manifest's own against the recorded content id."""

from __future__ import annotations

import hashlib
import json
import tarfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from counterfactory.layout import (
    INDEX,
    MANIFEST,
    PAIRS_DIR,
    VERSION_FILE,
    HashingReader,
    manifest_problem,
    sha256_bytes,
    tar_members,
)
from counterfactory.storage import read_parquet
from counterfactory.versions import Version


def count_tar_samples(f: Any) -> int:
    """Distinct sample keys in a tar read as a stream (``f`` needs only ``read``)."""
    return len({m.name.split(".", 1)[0] for m, _ in tar_members(f, want=lambda _: False)})


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


def verify(version: Version) -> list[Check]:
    """Recompute every shard's sha256, size and sample count, and every listed file's sha256,
    against the manifest; and the manifest's own sha256 against the recorded content id.
    Works the same on a version on an object store (shards are streamed, not downloaded)."""
    out: list[Check] = []
    try:
        raw = version.read_bytes(MANIFEST)
    except (FileNotFoundError, OSError):
        return [Check(MANIFEST, False, "missing")]
    cid = sha256_bytes(raw)
    want = version.info.get("content_id")
    if not version.info:  # the commit marker: without it nothing says what the manifest should be
        out.append(Check(VERSION_FILE, False, "missing: the content id cannot be checked"))
    out.append(Check(MANIFEST, want in (None, cid),
                     f"content id {cid[:12]}" + ("" if want in (None, cid) else f" != recorded {want[:12]}")))
    try:
        manifest = json.loads(raw)
        problem = manifest_problem(manifest)
    except (ValueError, RecursionError) as exc:
        problem = f"{type(exc).__name__}: {exc}"
    if problem:  # a hand-edited or garbled manifest is a failed check, never a traceback
        return [*out, Check(MANIFEST, False, f"not a manifest: {problem}")]
    listed = [s["name"] for s in manifest["shards"]]
    sizes = version.sizes(listed + sorted(manifest.get("files", {})))
    # a reader globbing *.tar (the card's data_files: DATASET-*.tar) would take an unlisted shard
    out.extend(Check(n, False, "a shard the manifest does not list") for n in version.names()
               if n.endswith(".tar") and n not in sizes)
    out.extend(_unlisted_pairs(version, manifest))

    def check_shard(s: dict[str, Any]) -> Check:
        size = sizes[s["name"]]
        if size is None:
            return Check(s["name"], False, "missing")
        problems = []
        if size != s["bytes"]:
            problems.append(f"{size} bytes, manifest says {s['bytes']}")
        n = -1
        h = hashlib.sha256()
        try:
            # one sequential read does both: the tar is parsed in stream mode through a reader
            # that hashes every byte it hands on (a remote shard is fetched once, not twice)
            with version.open(s["name"]) as f:
                reader = HashingReader(f, h)
                try:
                    n = count_tar_samples(reader)
                finally:
                    reader.drain()
            if n != s["samples"]:
                problems.append(f"{n} samples, manifest says {s['samples']}")
        except (tarfile.TarError, OSError) as exc:
            problems.append(f"unreadable tar: {exc}")
        digest = h.hexdigest()
        if digest != s["sha256"]:
            problems.append(f"sha256 {digest[:12]} != manifest {s['sha256'][:12]}")
        return Check(s["name"], not problems, "; ".join(problems) or f"ok, {n} samples")

    # hashing releases the GIL and remote reads wait on the network: a few shards at a time
    with ThreadPoolExecutor(max_workers=4) as pool:
        out.extend(pool.map(check_shard, manifest["shards"]))
    if sizes.get(INDEX) is not None or version.folder.exists(INDEX):
        try:
            # single-threaded: Arrow's CPU and I/O pools, once started, can abort the process at exit
            # ("terminate called without an active exception", ~4% of `verify` runs, more with
            # OpenCV loaded); one small column gains nothing from threads
            with version.open(INDEX) as f:
                per = Counter(read_parquet(f, ["shard"]).column("shard").to_pylist())
        except (OSError, ValueError, KeyError) as exc:  # pyarrow's ArrowInvalid is a ValueError
            out.append(Check(INDEX, False, f"unreadable: {type(exc).__name__}: {exc}".splitlines()[0]))
        else:
            want_per = {s["name"]: s["samples"] for s in manifest["shards"]}
            wrong = sorted(n for n in set(per) | set(want_per) if per.get(n, 0) != want_per.get(n, 0))
            out.append(Check("index rows", not wrong, "one row per sample of every shard" if not wrong else
                             "; ".join(f"{n}: {per.get(n, 0)} rows, manifest says {want_per.get(n, 0)} samples"
                                       for n in wrong)))
    for name, meta in sorted(manifest.get("files", {}).items()):
        if sizes.get(name) is None:
            out.append(Check(name, False, "missing"))
        elif version.sha256(name) != meta["sha256"]:
            out.append(Check(name, False, "sha256 differs from the manifest"))
        else:
            out.append(Check(name, True, "ok"))
    return out


def _unlisted_pairs(version: Version, manifest: dict[str, Any]) -> list[Check]:
    """The card's data_files (pairs/*.tar) would take a pair shard the manifest does not list."""
    listed = set(manifest.get("files", {}))
    return [Check(n, False, "a pair shard the manifest does not list") for n in version.names(PAIRS_DIR)
            if n.endswith(".tar") and n not in listed]
