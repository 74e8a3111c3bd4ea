"""Shards on an object-store root, put there by the tasks that write them (issue 26).

A run on ``s3://...`` writes each shard where it is made, as on a local root, then puts the shard,
its ``pairs/`` copy and, last, its journal entry into the spec's staging prefix on the store
(``DATASET/.staging-SPEC/``): the journal entry is the shard's completion marker there, so a
rerun on any machine keeps every shard whose entry and objects are on the store (sizes checked in
one listing call) and writes only the others. The driver uploads only the small files at publish
(index, rejects, manifest, card, ``version.json`` last); the shards go from the staging prefix to
the version's folder by server-side copies (``publish._publish_by_upload``), no byte through it.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from counterfactory.layout import JOURNAL, atomic_write, features_name
from counterfactory.storage import RemoteDir


@functools.lru_cache(maxsize=8)
def remote_dir(uri: str) -> RemoteDir:
    """One filesystem per staging prefix per process (opening one may ask the store for its region)."""
    return RemoteDir(uri)


def journal_name(k: int) -> str:
    return f"{JOURNAL}/{k:06d}.json"


def put_shard(out_dir: Path, uri: str, entry: dict[str, Any]) -> None:
    """Put shard ``entry["k"]`` (its tar, its pair tar, its audit features when it has any, then
    its journal entry: the marker) from ``out_dir`` to the staging prefix ``uri``. Single-object
    PUTs: a reader sees an object whole or not at all, and the marker only after the shard."""
    remote = remote_dir(uri)
    for sh in (entry["shard"], entry.get("pair_shard")):
        if sh:
            remote.put(out_dir / sh["name"], sh["name"])
    features = features_name(entry["shard"]["name"])
    if (out_dir / features).is_file():  # the audit at publish reads it, not the shard, on any machine
        remote.put(out_dir / features, features)
    remote.put(out_dir / journal_name(entry["k"]), journal_name(entry["k"]))


def remote_entries(uri: str, n_shards: int) -> dict[int, dict[str, Any]]:
    """The journal entries on the store whose shard objects are all there at their sizes."""
    remote = remote_dir(uri)
    names = [n for n, is_dir, _ in remote.list(JOURNAL) if not is_dir]
    out: dict[int, dict[str, Any]] = {}
    for name in names:
        stem = name.rsplit("/", 1)[-1].removesuffix(".json")
        if not stem.isdigit() or not 0 <= int(stem) < n_shards:
            continue
        try:
            e = json.loads(remote.read_bytes(name))
        except (OSError, ValueError):
            continue
        out[int(stem)] = e
    wants = {sh["name"]: sh["bytes"] for e in out.values() for sh in (e.get("shard"), e.get("pair_shard")) if sh}
    got = remote.sizes(sorted(wants)) if wants else {}
    return {k: e for k, e in out.items()
            if all(got.get(sh["name"]) == sh["bytes"] for sh in (e.get("shard"), e.get("pair_shard")) if sh)}


def fetch(out_dir: Path, uri: str, names: list[str]) -> None:
    """Named files of the staging prefix into ``out_dir`` (a shard written on another node, or by a
    killed run on another machine: the duplicate pass and the card read it here)."""
    missing = [n for n in names if not (out_dir / n).is_file()]
    if missing:
        remote_dir(uri).download(missing, out_dir)


def keep_entry(out_dir: Path, entry: dict[str, Any]) -> None:
    (out_dir / JOURNAL).mkdir(exist_ok=True)
    atomic_write(out_dir / journal_name(entry["k"]), json.dumps(entry, sort_keys=True).encode())
