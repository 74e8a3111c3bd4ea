"""Publishing a staged version: a local rename onto the next free label, or an upload to an
object store with ``version.json`` (the commit marker) last, as the dataset folder's
``is_local`` says; and the run's refusal to publish (``FailureBudgetExceeded``, exit 3)."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath
from typing import Any

from counterfactory.layout import (
    CLAIM,
    JOURNAL,
    LABEL_RE,
    LOCK,
    MANIFEST,
    PAIRS_DIR,
    VERSION_FILE,
    atomic_write,
    features_name,
)
from counterfactory.storage import RemoteDir, StorageError
from counterfactory.versions import (
    Dataset,
    Version,
    list_versions,
    next_label,
    read_latest,
    read_version,
    write_latest,
)


class FailureBudgetExceeded(RuntimeError):
    """The run rejected more inputs than the config's failure budget allows (one-line message)."""


def publish_version(staging: Path, ds_dir: Dataset, make_info: Callable[[str], dict[str, Any]],
                    finish: Callable[[Path, dict[str, Any]], None], *, set_latest: bool = True) -> Version:
    """Publish the staging folder as the next free label of ``ds_dir``: renamed into place in a
    local folder (``_publish_by_rename``), uploaded to an object store (``_publish_by_upload``).

    ``make_info(label)`` gives version.json; ``finish(staging, info)`` writes label-dependent
    files (the card). The staging folder's resume journal goes once nothing can fail half-way:
    before the rename, after the upload (a rerun of a cut upload resumes with every shard)."""
    how = _publish_by_rename if ds_dir.is_local else _publish_by_upload
    return how(staging, ds_dir, make_info, finish, set_latest=set_latest)


def finish_reused(ds_dir: Dataset, version: Version, staging: Path) -> None:
    """A complete version found again (its spec rerun). An upload can be cut after its commit
    marker: finish it (``repair_remote``) and drop the spec's local staging. A rename leaves
    nothing unfinished."""
    if not ds_dir.is_local:
        repair_remote(ds_dir, version)
        shutil.rmtree(staging, ignore_errors=True)
        ds_dir.delete_tree(staging.name)  # a staging prefix left by a publish cut after its commit


def _publish_by_rename(staging: Path, ds_dir: Dataset, make_info: Callable[[str], dict[str, Any]],
                       finish: Callable[[Path, dict[str, Any]], None], *, set_latest: bool = True) -> Version:
    """Name the staging folder with the next free label and rename it into place. Two
    concurrent runs may pick the same label: the rename of the loser fails (the target exists
    and is not empty), and it retries with the next label."""
    shutil.rmtree(staging / JOURNAL, ignore_errors=True)
    for _ in range(100):
        label = next_label(ds_dir)
        info = make_info(label)
        atomic_write(staging / VERSION_FILE, json.dumps(info, indent=2, sort_keys=True).encode())
        finish(staging, info)
        target = ds_dir.workdir() / label  # a local folder is its own workdir
        try:
            target.mkdir()  # claims the label (atomic); fails if another run took it
        except FileExistsError:
            continue
        os.replace(staging, target)  # onto an empty folder: atomic on POSIX
        if set_latest:
            write_latest(ds_dir, label)
        return read_version(target)
    raise RuntimeError(f"could not allocate a version label in {ds_dir}")


def _publish_by_upload(staging: Path, ds: RemoteDir, make_info: Callable[[str], dict[str, Any]],
                       finish: Callable[[Path, dict[str, Any]], None], *, set_latest: bool = True) -> Version:
    """Upload the staging folder as ``DATASET/vN`` on the object store: a claim naming the
    content, the shards copied server-side from the spec's staging prefix where the writers put
    them (issue 26; uploaded from here only when some are missing there), every other file, then
    ``manifest.json``, then ``version.json`` (the commit marker: a
    label folder without it is an unfinished upload, never taken as a version), then
    ``latest``. A rerun after an upload was cut off finishes the same label. The local staging
    folder becomes the version's local mirror, without its shards.

    Object stores have no atomic rename or create-if-absent here, so two runs publishing
    different content to one dataset at the same instant are told apart by reading the claim
    and version.json back: the loser moves on, or fails with a clear message."""
    probe = make_info("v0")
    ours = {"spec_id": probe["spec_id"], "content_id": probe["content_id"]}

    def claim_of(label: str) -> dict[str, Any] | None:
        try:
            return json.loads(ds.read_bytes(f"{label}/{CLAIM}"))
        except (FileNotFoundError, OSError, ValueError):
            return None

    unfinished = [v.label for v in list_versions(ds) if not v.info and claim_of(v.label) == ours]
    direct = _staged_shards(staging, ds.child(staging.name))
    for _ in range(100):
        label = unfinished.pop(0) if unfinished else next_label(ds)
        target = ds.child(label)
        if claim_of(label) != ours:
            if target.exists():  # another run is uploading this label
                continue
            target.write_bytes(CLAIM, json.dumps(ours).encode())
            if claim_of(label) != ours:
                continue
        info = make_info(label)
        atomic_write(staging / VERSION_FILE, json.dumps(info, indent=2, sort_keys=True).encode())
        finish(staging, info)
        if direct:  # the shards the workers put in the staging prefix: copied on the store
            _copy_on_store(ds, staging.name, label, direct)
        ds.upload(staging, label, last=(MANIFEST, VERSION_FILE),
                  skip={LOCK, JOURNAL, *(PurePosixPath(n).name for n in direct)})
        got = json.loads(target.read_bytes(VERSION_FILE))
        if (got.get("spec_id"), got.get("content_id")) != (info["spec_id"], info["content_id"]):
            raise StorageError(f"{target.uri}: another run published this label at the same time; "
                               "run again to publish under the next label")
        target.delete(CLAIM)
        if set_latest:
            finish_remote(ds, label)
        ds.delete_tree(staging.name)  # the staging prefix: its shards are the version's now
        mirror = target.workdir()
        shutil.rmtree(mirror, ignore_errors=True)
        for tar in [*staging.glob("*.tar"), *staging.glob(f"{PAIRS_DIR}/*.tar")]:
            tar.unlink()
        os.replace(staging, mirror)
        shutil.rmtree(mirror / JOURNAL, ignore_errors=True)
        return Version(label, target, info)
    raise RuntimeError(f"could not allocate a version label in {ds}")


def _staged_shards(staging: Path, remote: RemoteDir) -> list[str]:
    """The version's tar files (shards and pair shards) when every one of them is in the
    spec's staging prefix on the store at its manifest size (the writers put them there); a
    shard missing here (written on another node) is fetched for the card. [] otherwise: the
    local files are uploaded as they are."""
    manifest = json.loads((staging / MANIFEST).read_bytes())
    want = {s["name"]: s["bytes"] for s in manifest["shards"]}
    want.update({n: f["bytes"] for n, f in manifest["files"].items() if n.startswith(f"{PAIRS_DIR}/")})
    got = remote.sizes(sorted(want))
    if any(got[n] != size for n, size in want.items()):
        return []
    remote.download([n for n in sorted(want) if not (staging / n).is_file()], staging)
    # the audit features of shards written on another node or machine: the audit reads them
    # instead of decoding those shards (a shard without any is read by the audit as before)
    features = [features_name(s["name"]) for s in manifest["shards"]]
    stored = remote.sizes([n for n in features if not (staging / n).is_file()])
    remote.download([n for n, size in stored.items() if size is not None], staging)
    return sorted(want)


def _copy_on_store(ds: RemoteDir, staging: str, label: str, names: list[str]) -> None:
    """Server-side copies from the staging prefix into the version folder, sizes checked."""
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(lambda n: ds.copy(f"{staging}/{n}", f"{label}/{n}"), names))
    want = ds.sizes([f"{staging}/{n}" for n in names])
    got = ds.sizes([f"{label}/{n}" for n in names])
    bad = [n for n in names if got[f"{label}/{n}"] != want[f"{staging}/{n}"]]
    if bad:
        raise StorageError(f"{ds.uri}/{label}: {len(bad)} shard(s) not copied whole, e.g. {bad[0]}")


def finish_remote(ds: Dataset, label: str) -> None:
    """After ``label`` is committed: point ``latest`` at it unless a newer version is already
    there (a rerun finishing a cut upload of an older label must not move it back)."""
    current = read_latest(ds)
    if current is None or not LABEL_RE.match(current) or int(current[1:]) <= int(label[1:]):
        write_latest(ds, label)


def repair_remote(ds: Dataset, version: Version) -> None:
    """Finish what a publish cut off after the commit marker: a leftover claim and a ``latest``
    that was never moved to it."""
    if version.folder.exists(CLAIM):
        version.folder.delete(CLAIM)
    finish_remote(ds, version.label)
