"""Dataset versions: ``Version``, ``vN`` labels, ``latest`` and tags, locating a version (local or
on an object store). File names are ``layout.py``'s, ids ``spec.py``'s, the publish rename
``publish.py``'s.

Layout::

    ROOT/DATASET/
      v1/ v2/ ...        one folder per version, labels in order of creation, never overwritten
      latest             a small text file holding the newest label ("v2\\n"); a file rather than
                         a symlink so that it works on every filesystem (SMB, FAT, object-store
                         mounts) and is replaced atomically like every other file we write
      tags/NAME          a name given to a label, once
      .cache/            source-hash cache (stat-keyed), safe to delete
      .staging-*         a run in progress (or one that crashed); never a version

The **content id** = sha256 of ``manifest.json`` (per-shard sha256 and counts, no timestamps), so
equal content ids mean byte-identical shards, index, rejects and config.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

from counterfactory.layout import (
    LABEL_RE,
    LATEST,
    MANIFEST,
    STAGING_PREFIX,
    TAGS,
    VERSION_FILE,
    Folder,
    atomic_write,
    manifest_problem,
    sha256_bytes,
    sha256_file,
)
from counterfactory.storage import (
    StorageError,
    is_remote,
    join_uri,
    local_path,
    open_dir,
)

TAG_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,63}$")


class VersionError(Exception):
    """A version that cannot be found or read; reported as one line by the CLI."""


# -- versions --------------------------------------------------------------------------------
def content_id(version_dir: Path) -> str:
    return sha256_file(version_dir / MANIFEST)


@dataclass
class Version:
    """One version folder (``folder``: local, or on an object store; a path is taken as a local
    folder). ``path`` is its local side: the folder itself, or for a version on an object store
    a local mirror of its small files (card, index, manifest, config); shards are always read
    through ``folder`` (``open``/``sizes``/``sha256``), wherever they are."""

    label: str
    folder: Folder
    info: dict[str, Any]

    def __post_init__(self) -> None:
        self.folder = open_dir(self.folder)

    @property
    def path(self) -> Path:
        return self.folder.workdir()

    @property
    def number(self) -> int:
        return int(self.label[1:])

    @property
    def location(self) -> str:
        return self.folder.uri

    @property
    def dataset(self) -> str:
        return self.folder.parent_name

    @property
    def committed(self) -> bool:
        """Published whole: renamed into place, or uploaded up to its commit marker."""
        return bool(self.info) or self.folder.is_local

    def read_bytes(self, name: str) -> bytes:
        return self.folder.read_bytes(name)

    def open(self, name: str) -> Any:
        """A seekable binary file of a member of the version (a shard, the index, ...)."""
        return self.folder.open(name)

    def sizes(self, names: list[str]) -> dict[str, int | None]:
        return self.folder.sizes(names)

    def sha256(self, name: str) -> str:
        return self.folder.sha256(name)

    def names(self, rel: str = "") -> list[str]:
        """The files at the top of the version folder (or of its folder ``rel``)."""
        return sorted(n for n, is_dir, _ in self.folder.list(rel) if not is_dir)

    def manifest(self) -> dict[str, Any]:
        return json.loads(self.read_bytes(MANIFEST))

    def content_id(self) -> str:
        """sha256 of the manifest as it is now (``info["content_id"]`` is what was recorded)."""
        return sha256_bytes(self.read_bytes(MANIFEST))

    def status(self) -> str:
        """Cheap health check (existence and sizes; ``verify`` recomputes checksums)."""
        try:
            raw = self.read_bytes(MANIFEST)
        except (FileNotFoundError, OSError):
            return "incomplete: no manifest"
        if not self.committed:
            return "incomplete: no version.json (upload unfinished?)"
        if self.info.get("content_id") and sha256_bytes(raw) != self.info["content_id"]:
            return "modified: manifest changed"
        try:
            doc = json.loads(raw)
        except (ValueError, RecursionError):
            doc = None
        if doc is None or manifest_problem(doc):
            return "damaged: manifest.json is not a manifest"
        shards = doc["shards"]
        got = self.sizes([s["name"] for s in shards])
        missing = [s["name"] for s in shards if got[s["name"]] is None]
        if missing:
            return f"damaged: {len(missing)} shard(s) missing"
        wrong = [s["name"] for s in shards if got[s["name"]] != s["bytes"]]
        if wrong:
            return f"damaged: {len(wrong)} shard(s) of the wrong size"
        return "complete"


def read_version(where: Folder | Path, strict: bool = True) -> Version:
    """The version in ``where``; a garbled ``version.json`` is a VersionError, or with
    ``strict=False`` (listing every version) a version without a record."""
    folder = open_dir(where)
    try:
        info = json.loads(folder.read_bytes(VERSION_FILE))
    except (FileNotFoundError, NotADirectoryError):
        info = {}  # no record: on an object store an unfinished upload (version.json is written last)
    except (OSError, ValueError, RecursionError) as exc:  # a garbled commit marker: a damaged version
        if strict:
            raise VersionError(f"{folder}/{VERSION_FILE}: unreadable: {type(exc).__name__}: {exc}"
                               .splitlines()[0]) from None
        info = {}
    if not isinstance(info, dict):
        if strict:
            raise VersionError(f"{folder}/{VERSION_FILE}: not a version record (a JSON object)")
        info = {}
    return Version(folder.name, folder, info)


Dataset = Folder  # ROOT/DATASET: a local folder or a folder on an object store


def list_versions(ds_dir: Dataset | Path) -> list[Version]:
    ds = open_dir(ds_dir)
    labels = [n for n, is_dir, _ in ds.list() if is_dir and LABEL_RE.match(n)]
    with ThreadPoolExecutor(max_workers=8) as pool:  # an object store answers each in a round trip
        found = list(pool.map(lambda lb: read_version(ds.child(lb), strict=False), labels))
    return sorted(found, key=lambda v: v.number)


def read_latest(ds_dir: Dataset | Path) -> str | None:
    ds = open_dir(ds_dir)
    named = ds.read_pointer(LATEST)
    if named is not None:
        return named.strip() or None
    versions = [v for v in list_versions(ds) if v.committed and not is_limited(v)]
    return versions[-1].label if versions else None


def write_latest(ds_dir: Dataset | Path, label: str) -> None:
    open_dir(ds_dir).write_bytes(LATEST, f"{label}\n".encode())


def work_dir(ds_dir: Dataset | Path) -> Path:
    """Where a run of this dataset stages its shards (the dataset folder itself when local; a
    local working folder for one on an object store, which also holds its versions' mirrors)."""
    return open_dir(ds_dir).workdir()


def staging_dirs(ds_dir: Dataset | Path) -> list[Path]:
    """Unfinished runs (in progress or crashed) of this dataset on this machine."""
    return sorted(work_dir(ds_dir).glob(f"{STAGING_PREFIX}*"))


def find_complete(ds_dir: Dataset | Path, sid: str) -> Version | None:
    for v in reversed(list_versions(ds_dir)):
        if v.info.get("spec_id") == sid and v.status() == "complete":
            return v
    return None


def next_label(ds_dir: Dataset | Path) -> str:
    nums = [v.number for v in list_versions(ds_dir)]
    return f"v{max(nums, default=0) + 1}"


def migrate_flat_layout(ds_dir: Path) -> str | None:
    """A dataset written before versions existed (files directly in ROOT/DATASET) becomes v1,
    by two renames; returns the label, or None when there was nothing to migrate. ``ds_dir`` is
    a dataset's ``workdir()``: an object-store dataset's never held the flat layout."""
    if not (ds_dir / MANIFEST).is_file():
        return None
    tmp = ds_dir.with_name(f".{ds_dir.name}.migrating")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    os.replace(ds_dir, tmp / "v1")
    info = {"format": "counterfactory-version/1", "label": "v1", "dataset": ds_dir.name,
            "spec_id": None, "content_id": content_id(tmp / "v1"), "created": None, "parent": None,
            "note": "migrated from the flat layout (no spec recorded)"}
    atomic_write(tmp / "v1" / VERSION_FILE, json.dumps(info, indent=2).encode())
    atomic_write(tmp / LATEST, b"v1\n")
    os.replace(tmp, ds_dir)
    return "v1"


def fetch_mirror(version: Version) -> Version:
    """Bring a remote version's small files (everything but shards) into its local mirror, so
    card, diff, eval, regenerate and the viewer read them like a local version's."""
    version.folder.mirror(version.info.get("content_id"))
    return version


# -- limited runs and tags -------------------------------------------------------------------


def is_limited(v: Version) -> bool:
    """A ``run --limit N`` version that left inputs out: never `latest` unless asked."""
    return bool(v.info.get("limited"))


def read_tags(ds_dir: Dataset | Path) -> dict[str, str]:
    folder = open_dir(ds_dir)
    try:
        names = [n.rsplit("/", 1)[-1] for n, is_dir, _ in folder.list(TAGS) if not is_dir]
    except (FileNotFoundError, OSError):
        return {}
    return {n: folder.read_text(f"{TAGS}/{n}").strip() for n in sorted(names) if TAG_RE.match(n)}


def write_tag(ds_dir: Dataset | Path, name: str, label: str) -> None:
    """Name a version; a name is given once (moving it would change what a reference means)."""
    if not TAG_RE.match(name) or LABEL_RE.match(name) or name == LATEST:
        raise VersionError(f"bad tag {name!r}: a letter, then letters, digits, '_', '.', '-' "
                           "(not 'latest' nor a label like v3)")
    have = read_tags(ds_dir)
    if name in have:
        raise VersionError(f"tag {name!r} exists (it names {have[name]}); tags are never moved: choose another name")
    try:  # of two concurrent local taggers exactly one wins
        open_dir(ds_dir).create(f"{TAGS}/{name}", f"{label}\n".encode())
    except FileExistsError:
        raise VersionError(f"tag {name!r} exists; tags are never moved: choose another name") from None


def now_utc() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# -- locating --------------------------------------------------------------------------------
def split_ref(ref: str) -> tuple[str, str | None]:
    name, at, label = ref.rpartition("@")
    if not at:
        return ref, None
    return name, label or None


def short_name(text: str, n: int = 160) -> str:
    """A path or name as an error line shows it: a 5,000-character one cut in the middle."""
    return text if len(text) <= n else f"{text[:n // 2]}...{text[-n // 2:]} ({len(text)} characters)"


def _unusable(name: str, exc: Exception) -> VersionError:
    """One line for a name the filesystem refuses (too long, a file on the way): no errno text."""
    why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    return VersionError(f"{short_name(name)}: {why}")


def locate_dataset(name: str, root: str | Path = "outputs") -> Dataset:
    """``DATASET`` is a name under ``--root`` or a path (or URI) to ``ROOT/DATASET``; ``root``
    may be an object-store URI (``s3://bucket/prefix``)."""
    if is_remote(name) or (is_remote(root) and not local_path(name).is_dir()):
        uri = name if is_remote(name) else join_uri(str(root), name)
        try:
            ds = open_dir(uri)
            found = ds.exists()
        except StorageError as exc:
            raise VersionError(str(exc)) from None
        except (OSError, ValueError) as exc:  # unreachable, unauthorized, or a malformed path
            raise _unusable(uri, exc) from None
        if not found:
            raise VersionError(f"no dataset at {uri}")
        return ds
    p = local_path(name)
    if p.is_dir() and (list_versions(p) or (p / LATEST).exists()):
        return open_dir(p)
    q = local_path(root) / name
    if q.is_dir():
        return open_dir(q)
    if p.is_dir() and (p / MANIFEST).exists():
        raise VersionError(f"{p} is a dataset in the flat layout; run it again to migrate it to {p}/v1")
    raise VersionError(f"no dataset {name!r} (looked for {q} and {p})")


def locate(ref: str, root: str | Path = "outputs") -> Version:
    """``DATASET[@VERSION]`` -> the version (``latest`` when no label is given). A path to a
    version folder (``ROOT/DATASET/v2``, or its URI) works as well. A version on an object
    store comes back with its small files mirrored locally (``fetch_mirror``)."""
    name, label = split_ref(ref)
    last = PurePosixPath(urlsplit(name).path if is_remote(name) else name).name
    if label is None and LABEL_RE.match(last):
        try:
            folder = open_dir(name)
            folder = folder.parent().child(folder.name)  # through its dataset: where its mirror is
            v = read_version(folder)
            found = bool(v.info) or folder.exists(MANIFEST)
        except StorageError as exc:
            raise VersionError(str(exc)) from None
        except (OSError, ValueError) as exc:
            raise _unusable(name, exc) from None
        if found:
            if not v.committed:  # version.json is the commit marker
                raise VersionError(f"{name}: no version.json: an unfinished upload, not a version "
                                   "(run the same spec again to finish it)")
            return fetch_mirror(v)
    try:
        ds_dir = locate_dataset(name, root)
        if label in (None, LATEST):
            label = read_latest(ds_dir)
            if label is None:
                limited = [v.label for v in list_versions(ds_dir) if is_limited(v)]
                raise VersionError(f"{ds_dir} has no latest version" + (
                    f" ({', '.join(limited)}: limited runs, never latest; name one, or run with --latest)"
                    if limited else " yet"))
        if not LABEL_RE.match(label):
            tagged = read_tags(ds_dir).get(label) if TAG_RE.match(label) else None
            if tagged is None:
                raise VersionError(f"bad version label {label!r}: expected v1, v2, ..., latest or a tag")
            label = tagged
        v = read_version(ds_dir.child(label))
        if not v.info and not (v.committed and v.folder.exists()):  # a folder, or an upload's marker
            have = ", ".join(x.label for x in list_versions(ds_dir) if x.committed) or "none"
            raise VersionError(f"{ds_dir} has no version {label} (versions: {have})")
        return fetch_mirror(v)
    except StorageError as exc:
        raise VersionError(str(exc)) from None
    except (OSError, ValueError) as exc:
        raise _unusable(name, exc) from None
