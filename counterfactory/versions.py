"""Dataset versions: identity, layout, lookup, verification, comparison and regeneration.

Layout::

    ROOT/DATASET/
      v1/ v2/ ...        one folder per version, labels in order of creation, never overwritten
      latest             a small text file holding the newest label ("v2\\n"); a file rather than
                         a symlink so that it works on every filesystem (SMB, FAT, object-store
                         mounts) and is replaced atomically like every other file we write
      .cache/            source-hash cache (stat-keyed), safe to delete
      .staging-*         a run in progress (or one that crashed); never a version

Identity:

- **spec id** = sha256 of the spec: the resolved config (Ray placement, stage resources and the
  output location excluded: they do not change a byte), the model ids and revisions it names,
  the input-set hash, ``--limit`` and the package version. Two runs with the same spec id are
  expected to produce the same bytes; running a spec whose complete version exists is a no-op.
- **input-set hash** = sha256 over the sorted hashes of every source the spec reads: each
  distinct image (stream-hashed in the driver, cached by path, size, mtime and inode) plus the
  annotation files (JSONL manifests, COCO json); a procedural image hashes its URI, which fully
  determines its pixels. After the run, the hashes that ingest computed from the bytes it
  actually read are checked against these: an input changed mid-run fails the run, so a
  version's spec id always describes the bytes it was built from.
- **content id** = sha256 of ``manifest.json`` (per-shard sha256 and counts, no timestamps), so
  equal content ids mean byte-identical shards, index, rejects and config.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import stat
import tarfile
import time
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import yaml

from counterfactory import __version__
from counterfactory.layout import atomic_write, sha256_file
from counterfactory.pipeline.writer import JOURNAL
from counterfactory.storage import (
    RemoteDir,
    StorageError,
    is_remote,
    join_uri,
    local_path,
    local_workdir,
    read_parquet,
)

VERSION_FILE = "version.json"
LATEST = "latest"
HASH_CACHE = Path(".cache") / "source-hashes.json"
LABEL_RE = re.compile(r"^v(\d+)$")
MODEL_KEY_RE = re.compile(r"(model|checkpoint|weights|revision|repo_id)", re.I)


class VersionError(Exception):
    """A version that cannot be found or read; reported as one line by the CLI."""


# -- identity --------------------------------------------------------------------------------
def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def spec_config(cfg_dict: dict[str, Any]) -> dict[str, Any]:
    """The part of a resolved config that shapes the output (same rule as ``config_hash``)."""
    d = json.loads(json.dumps(cfg_dict))
    d.pop("ray", None)
    d.pop("failure_budget", None)  # when to give up does not change a byte; raising it resumes
    d.get("output", {}).pop("root", None)
    for s in d.get("stages", []):
        s.pop("resources", None)
    return d


def model_refs(stages: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Model ids and revisions named in stage params (or provenance): any key that mentions
    model/checkpoint/weights/revision/repo_id, found at any depth."""
    def walk(node: Any, prefix: str, found: dict[str, Any]) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                key = f"{prefix}{k}"
                if MODEL_KEY_RE.search(str(k)) and not isinstance(v, dict | list):
                    found[key] = v
                else:
                    walk(v, f"{key}.", found)

    out = []
    for s in stages:
        found: dict[str, Any] = {}
        walk(s.get("params", {}), "", found)
        if found:
            out.append({"stage": s.get("name", "?"), "backend": s.get("backend", "default"), **found})
    return out


PROCEDURAL_SCHEMES = ("procedural://", "procedural-video://")


def _object_stamp(uri: str) -> str:
    """An object-store or web source is named by its size and modification time (reading every
    object on the driver to hash it would cost the whole input set's transfer before the run);
    ingest still records each sample's sha256 of the bytes it read."""
    import pyarrow.fs as pafs

    from counterfactory.storage import object_info

    try:
        info = object_info(uri)
    except Exception:  # noqa: BLE001 - an unknown scheme or an unreachable endpoint: ingest says which
        return "unreadable:" + sha256_bytes(uri.encode())
    if info.type == pafs.FileType.NotFound:
        return "missing:" + sha256_bytes(uri.encode())
    return "object:" + sha256_bytes(f"{uri}\n{info.type}\n{info.size}\n{info.mtime_ns}".encode())


class SourceHasher:
    """Stream-hash source files in a thread pool (hashlib releases the GIL), with a cache keyed
    by (path, size, mtime_ns, inode) so a second run of a large input set costs one stat per file."""

    def __init__(self, cache_path: Path | None) -> None:
        self.cache_path = cache_path
        self.cache: dict[str, list[Any]] = {}
        if cache_path and cache_path.exists():
            try:
                self.cache = json.loads(cache_path.read_text())
            except (OSError, ValueError):
                self.cache = {}
        self.dirty = False

    def _one(self, ref: str) -> tuple[str, str]:
        if is_remote(ref):
            return ref, _object_stamp(ref)
        from counterfactory.storage import resolve_path

        try:
            path = resolve_path(ref, None) if ref.startswith("pkg:") else Path(ref)
            st = path.stat()
        except (OSError, ValueError):
            return ref, "missing:" + sha256_bytes(ref.encode())
        if not stat.S_ISREG(st.st_mode):  # /dev/zero never ends, a FIFO blocks: ingest rejects them
            return ref, "not_a_file:" + sha256_bytes(ref.encode())
        stamp = [st.st_size, st.st_mtime_ns, st.st_ino]
        hit = self.cache.get(str(path))
        if hit and hit[:3] == stamp:
            return ref, hit[3]
        try:
            digest = sha256_file(path)
        except OSError:
            return ref, "unreadable:" + sha256_bytes(ref.encode())
        self.cache[str(path)] = [*stamp, digest]
        self.dirty = True
        return ref, digest

    def hash_all(self, refs: Iterable[str]) -> dict[str, str]:
        refs = sorted(set(refs))
        # a procedural scene or clip is its own content: hashed here, not handed to a thread
        # (10,000 scenes cost the driver 0.6 s of pool overhead before the stream could start)
        out = {r: "uri:" + sha256_bytes(r.encode()) for r in refs if r.startswith(PROCEDURAL_SCHEMES)}
        files = [r for r in refs if r not in out]
        with ThreadPoolExecutor(max_workers=min(8, max(1, len(files)))) as pool:
            out.update(pool.map(self._one, files))
        if self.dirty and self.cache_path:
            try:
                self.cache_path.parent.mkdir(parents=True, exist_ok=True)
                atomic_write(self.cache_path, json.dumps(self.cache).encode())
            except OSError:
                pass  # a cache is an optimisation, never a reason to fail
        return out


def build_spec(cfg: Any, plan: Any, limit: int | None,
               cache_path: Path | None = None) -> tuple[dict[str, Any], dict[str, str]]:
    """The spec (what the spec id hashes) and the per-source hashes it was computed from.
    ``plan`` is the run's ``InputPlan``: its record count and its source files."""
    hashes = SourceHasher(cache_path).hash_all(plan.sources)
    resolved = spec_config(cfg.resolved())
    spec = {
        "config": resolved,
        "models": model_refs(resolved.get("stages", [])),
        "input_set_hash": sha256_bytes("\n".join(sorted(hashes.values())).encode()),
        "inputs": {"records": plan.n, "sources": len(hashes)},
        "limit": limit,
        "package_version": __version__,
    }
    return spec, hashes


def spec_id(spec: dict[str, Any]) -> str:
    return sha256_bytes(json.dumps(spec, sort_keys=True, separators=(",", ":")).encode())


def check_sources_unchanged(hashes: dict[str, str], index_rows: list[dict[str, Any]]) -> list[str]:
    """Sources whose bytes, as ingest read them, differ from the pre-run hash (changed mid-run)."""
    bad = []
    for row in index_rows:
        pre = hashes.get(row["source"])
        if pre and ":" not in pre and pre != row["source_sha256"]:
            bad.append(row["source"])
    return sorted(set(bad))


# -- layout ----------------------------------------------------------------------------------
def content_id(version_dir: Path) -> str:
    return sha256_file(version_dir / "manifest.json")


@dataclass
class Version:
    """One version folder. ``path`` is local: the folder itself, or for a version on an object
    store (``remote`` set) a local mirror of its small files (card, index, manifest, config);
    shards are always read through ``open``/``sizes``/``sha256``, wherever they are."""

    label: str
    path: Path
    info: dict[str, Any]
    remote: RemoteDir | None = None

    @property
    def number(self) -> int:
        return int(self.label[1:])

    @property
    def location(self) -> str:
        return self.remote.uri if self.remote else str(self.path.resolve())

    @property
    def dataset(self) -> str:
        if self.remote:
            return urlsplit(self.remote.uri).path.rstrip("/").rsplit("/", 2)[-2]
        return self.path.parent.name

    def read_bytes(self, name: str) -> bytes:
        return self.remote.read_bytes(name) if self.remote else (self.path / name).read_bytes()

    def open(self, name: str) -> Any:
        """A seekable binary file of a member of the version (a shard, the index, ...)."""
        return self.remote.open(name) if self.remote else open(self.path / name, "rb")

    def sizes(self, names: list[str]) -> dict[str, int | None]:
        if self.remote:
            return self.remote.sizes(names)
        return {n: (self.path / n).stat().st_size if (self.path / n).is_file() else None for n in names}

    def sha256(self, name: str) -> str:
        return self.remote.sha256(name) if self.remote else sha256_file(self.path / name)

    def names(self) -> list[str]:
        """The files at the top of the version folder."""
        if self.remote:
            return sorted(n for n, is_dir, _ in self.remote.list() if not is_dir)
        return sorted(p.name for p in self.path.iterdir() if p.is_file())

    def manifest(self) -> dict[str, Any]:
        return json.loads(self.read_bytes("manifest.json"))

    def content_id(self) -> str:
        """sha256 of the manifest as it is now (``info["content_id"]`` is what was recorded)."""
        return sha256_bytes(self.read_bytes("manifest.json"))

    def status(self) -> str:
        """Cheap health check (existence and sizes; ``verify`` recomputes checksums)."""
        try:
            raw = self.read_bytes("manifest.json")
        except (FileNotFoundError, OSError):
            return "incomplete: no manifest"
        if self.remote and not self.info:
            return "incomplete: no version.json (upload unfinished?)"
        if self.info.get("content_id") and sha256_bytes(raw) != self.info["content_id"]:
            return "modified: manifest changed"
        try:
            doc = json.loads(raw)
        except (ValueError, RecursionError):
            doc = None
        if doc is None or _manifest_problem(doc):
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


def read_version(path: Path, strict: bool = True) -> Version:
    """The version in ``path``; a garbled ``version.json`` is a VersionError, or with
    ``strict=False`` (listing every version) a version without a record."""
    info_path = path / VERSION_FILE
    info: dict[str, Any] = {}
    if info_path.exists():
        try:  # a garbled commit marker is a damaged version, said in one line
            info = json.loads(info_path.read_bytes())
        except (OSError, ValueError, RecursionError) as exc:
            if not strict:
                return Version(path.name, path, {})
            raise VersionError(f"{info_path}: unreadable: {type(exc).__name__}: {exc}".splitlines()[0]) from None
        if not isinstance(info, dict):
            if not strict:
                return Version(path.name, path, {})
            raise VersionError(f"{info_path}: not a version record (a JSON object)")
    return Version(path.name, path, info)


Dataset = Path | RemoteDir  # ROOT/DATASET: a local folder or a folder on an object store


def remote_mirror(ds: RemoteDir) -> Path:
    """Local working folder of a dataset on an object store: staging of runs and mirrors of
    each version's small files."""
    return local_workdir(ds.uri)


def _read_remote_version(ds: RemoteDir, label: str) -> Version:
    try:
        info = json.loads(ds.read_bytes(f"{label}/{VERSION_FILE}"))
    except (FileNotFoundError, OSError, ValueError):
        info = {}  # an unfinished upload: version.json is written last
    return Version(label, remote_mirror(ds) / label, info, ds.child(label))


def list_versions(ds_dir: Dataset) -> list[Version]:
    if isinstance(ds_dir, RemoteDir):
        labels = [n for n, is_dir, _ in ds_dir.list() if is_dir and LABEL_RE.match(n)]
        with ThreadPoolExecutor(max_workers=8) as pool:
            found = list(pool.map(lambda lb: _read_remote_version(ds_dir, lb), labels))
        return sorted(found, key=lambda v: v.number)
    if not ds_dir.is_dir():
        return []
    found = [read_version(p, strict=False) for p in ds_dir.iterdir() if p.is_dir() and LABEL_RE.match(p.name)]
    return sorted(found, key=lambda v: v.number)


def read_latest(ds_dir: Dataset) -> str | None:
    if isinstance(ds_dir, RemoteDir):
        try:
            return ds_dir.read_text(LATEST).strip() or None
        except (FileNotFoundError, OSError):
            versions = [v for v in list_versions(ds_dir) if v.info and not is_limited(v)]
            return versions[-1].label if versions else None
    p = ds_dir / LATEST
    if p.is_symlink():  # tolerated if someone made one by hand
        return Path(os.readlink(p)).name
    if p.is_file():
        label = p.read_text().strip()
        return label or None
    versions = [v for v in list_versions(ds_dir) if not is_limited(v)]
    return versions[-1].label if versions else None


def write_latest(ds_dir: Dataset, label: str) -> None:
    if isinstance(ds_dir, RemoteDir):
        ds_dir.write_bytes(LATEST, f"{label}\n".encode())
    else:
        atomic_write(ds_dir / LATEST, f"{label}\n".encode())


def staging_dirs(ds_dir: Dataset) -> list[Path]:
    """Unfinished runs (in progress or crashed) of this dataset on this machine."""
    local = remote_mirror(ds_dir) if isinstance(ds_dir, RemoteDir) else ds_dir
    return sorted(local.glob(".staging-*"))


def work_dir(ds_dir: Dataset) -> Path:
    """Where a run of this dataset stages its shards (the dataset folder itself when local)."""
    return remote_mirror(ds_dir) if isinstance(ds_dir, RemoteDir) else ds_dir


def find_complete(ds_dir: Dataset, sid: str) -> Version | None:
    for v in reversed(list_versions(ds_dir)):
        if v.info.get("spec_id") == sid and v.status() == "complete":
            return v
    return None


def next_label(ds_dir: Dataset) -> str:
    nums = [v.number for v in list_versions(ds_dir)]
    return f"v{max(nums, default=0) + 1}"


def migrate_flat_layout(ds_dir: Path) -> str | None:
    """A dataset written before versions existed (files directly in ROOT/DATASET) becomes v1,
    by two renames; returns the label, or None when there was nothing to migrate."""
    if not (ds_dir / "manifest.json").is_file():
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


def publish_version(staging: Path, ds_dir: Dataset, make_info: Callable[[str], dict[str, Any]],
                    finish: Callable[[Path, dict[str, Any]], None], *, set_latest: bool = True) -> Version:
    """Name the staging folder with the next free label and rename it into place.

    ``make_info(label)`` gives version.json; ``finish(staging, info)`` writes label-dependent
    files (the card). Two concurrent runs may pick the same label: the rename of the loser
    fails (the target exists and is not empty), and it retries with the next label.
    On an object store the staging folder is uploaded instead (see ``_publish_remote``)."""
    if isinstance(ds_dir, RemoteDir):
        return _publish_remote(staging, ds_dir, make_info, finish, set_latest=set_latest)
    for _ in range(100):
        label = next_label(ds_dir)
        info = make_info(label)
        atomic_write(staging / VERSION_FILE, json.dumps(info, indent=2, sort_keys=True).encode())
        finish(staging, info)
        target = ds_dir / label
        try:
            target.mkdir()  # claims the label (atomic); fails if another run took it
        except FileExistsError:
            continue
        os.replace(staging, target)  # onto an empty folder: atomic on POSIX
        if set_latest:
            write_latest(ds_dir, label)
        return read_version(target)
    raise RuntimeError(f"could not allocate a version label in {ds_dir}")


CLAIM = ".claim.json"  # written first into a label being uploaded; removed once it is committed


def _publish_remote(staging: Path, ds: RemoteDir, make_info: Callable[[str], dict[str, Any]],
                    finish: Callable[[Path, dict[str, Any]], None], *, set_latest: bool = True) -> Version:
    """Upload the staging folder as ``DATASET/vN`` on the object store: a claim naming the
    content, every file, then ``manifest.json``, then ``version.json`` (the commit marker: a
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
        ds.upload(staging, label, last=("manifest.json", VERSION_FILE), skip={".lock", JOURNAL})
        got = json.loads(target.read_bytes(VERSION_FILE))
        if (got.get("spec_id"), got.get("content_id")) != (info["spec_id"], info["content_id"]):
            raise StorageError(f"{target.uri}: another run published this label at the same time; "
                               "run again to publish under the next label")
        target.delete(CLAIM)
        if set_latest:
            finish_remote(ds, label)
        mirror = remote_mirror(ds) / label
        shutil.rmtree(mirror, ignore_errors=True)
        for tar in [*staging.glob("*.tar"), *staging.glob("pairs/*.tar")]:
            tar.unlink()
        os.replace(staging, mirror)
        return Version(label, mirror, info, target)
    raise RuntimeError(f"could not allocate a version label in {ds}")


def finish_remote(ds: RemoteDir, label: str) -> None:
    """After ``label`` is committed: point ``latest`` at it unless a newer version is already
    there (a rerun finishing a cut upload of an older label must not move it back)."""
    current = read_latest(ds)
    if current is None or not LABEL_RE.match(current) or int(current[1:]) <= int(label[1:]):
        write_latest(ds, label)


def repair_remote(ds: RemoteDir, version: Version) -> None:
    """A complete version found again (its spec rerun): finish what a publish cut off after the
    commit marker, i.e. a leftover claim and a ``latest`` that was never moved to it."""
    if version.remote is not None and version.remote.exists(CLAIM):
        version.remote.delete(CLAIM)
    finish_remote(ds, version.label)


def fetch_mirror(version: Version) -> Version:
    """Bring a remote version's small files (everything but shards) into its local mirror, so
    card, diff, eval, regenerate and the viewer read them like a local version's. Versions
    never change, so a mirror whose manifest matches the recorded content id is reused."""
    if version.remote is None:
        return version
    mirror = version.path
    cid = version.info.get("content_id")
    if cid and (mirror / "manifest.json").is_file() and sha256_file(mirror / "manifest.json") == cid:
        return version
    names = [n for n, is_dir, _ in version.remote.list(recursive=True)
             if not is_dir and not n.endswith(".tar") and not n.startswith("viewer/") and n != CLAIM]
    # manifest.json last: a mirror is taken as complete only when it matches the content id
    version.remote.download([n for n in names if n != "manifest.json"], mirror)
    version.remote.download(["manifest.json"], mirror)
    return version


# -- limited runs and tags -------------------------------------------------------------------
TAGS = "tags"  # ROOT/DATASET/tags/NAME holds a label, like `latest`
TAG_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,63}$")


def is_limited(v: Version) -> bool:
    """A ``run --limit N`` version that left inputs out: never `latest` unless asked."""
    return bool(v.info.get("limited"))


def read_tags(ds_dir: Dataset) -> dict[str, str]:
    if isinstance(ds_dir, RemoteDir):
        try:
            names = [n.rsplit("/", 1)[-1] for n, is_dir, _ in ds_dir.child(TAGS).list() if not is_dir]
        except (FileNotFoundError, OSError):
            return {}
        return {n: ds_dir.read_text(f"{TAGS}/{n}").strip() for n in sorted(names) if TAG_RE.match(n)}
    d = ds_dir / TAGS
    return {p.name: p.read_text().strip() for p in sorted(d.iterdir())
            if p.is_file() and TAG_RE.match(p.name)} if d.is_dir() else {}


def write_tag(ds_dir: Dataset, name: str, label: str) -> None:
    """Name a version; a name is given once (moving it would change what a reference means)."""
    if not TAG_RE.match(name) or LABEL_RE.match(name) or name == LATEST:
        raise VersionError(f"bad tag {name!r}: a letter, then letters, digits, '_', '.', '-' "
                           "(not 'latest' nor a label like v3)")
    have = read_tags(ds_dir)
    if name in have:
        raise VersionError(f"tag {name!r} exists (it names {have[name]}); tags are never moved: choose another name")
    if isinstance(ds_dir, RemoteDir):
        ds_dir.write_bytes(f"{TAGS}/{name}", f"{label}\n".encode())
        return
    (ds_dir / TAGS).mkdir(exist_ok=True)
    try:  # O_EXCL: of two concurrent taggers exactly one wins
        fd = os.open(ds_dir / TAGS / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        raise VersionError(f"tag {name!r} exists; tags are never moved: choose another name") from None
    with os.fdopen(fd, "w") as f:
        f.write(f"{label}\n")
        f.flush()
        os.fsync(f.fileno())


def now_utc() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# -- locating --------------------------------------------------------------------------------
def split_ref(ref: str) -> tuple[str, str | None]:
    name, at, label = ref.rpartition("@")
    if not at:
        return ref, None
    return name, label or None


def locate_dataset(name: str, root: str | Path = "outputs") -> Dataset:
    """``DATASET`` is a name under ``--root`` or a path (or URI) to ``ROOT/DATASET``; ``root``
    may be an object-store URI (``s3://bucket/prefix``)."""
    if is_remote(name) or (is_remote(root) and not local_path(name).is_dir()):
        uri = name if is_remote(name) else join_uri(str(root), name)
        try:
            ds = RemoteDir(uri)
            found = ds.exists()
        except StorageError as exc:
            raise VersionError(str(exc)) from None
        except (OSError, ValueError) as exc:  # unreachable, unauthorized, or a malformed path
            raise VersionError(f"{uri}: {exc}") from None
        if not found:
            raise VersionError(f"no dataset at {uri}")
        return ds
    p = local_path(name)
    if p.is_dir() and (list_versions(p) or (p / LATEST).exists()):
        return p
    q = local_path(root) / name
    if q.is_dir():
        return q
    if p.is_dir() and (p / "manifest.json").exists():
        raise VersionError(f"{p} is a dataset in the flat layout; run it again to migrate it to {p}/v1")
    raise VersionError(f"no dataset {name!r} (looked for {q} and {p})")


def locate(ref: str, root: str | Path = "outputs") -> Version:
    """``DATASET[@VERSION]`` -> the version (``latest`` when no label is given). A path to a
    version folder (``ROOT/DATASET/v2``, or its URI) works as well. A version on an object
    store comes back with its small files mirrored locally (``fetch_mirror``)."""
    name, label = split_ref(ref)
    u = urlsplit(name) if is_remote(name) else None
    path_part = u.path if u else name
    if label is None and LABEL_RE.match(path_part.rstrip("/").rsplit("/", 1)[-1]):
        if u:
            parent_path, _, lb = u.path.rstrip("/").rpartition("/")
            parent = urlunsplit((u.scheme, u.netloc, parent_path, u.query, u.fragment))
            try:
                v = _read_remote_version(RemoteDir(parent), lb)
            except StorageError as exc:
                raise VersionError(str(exc)) from None
            except (OSError, ValueError) as exc:
                raise VersionError(f"{name}: {exc}") from None
            if v.info:  # version.json is the commit marker
                return fetch_mirror(v)
            if v.remote is not None and v.remote.exists("manifest.json"):
                raise VersionError(f"{name}: no version.json: an unfinished upload, not a version "
                                   "(run the same spec again to finish it)")
        else:
            p = local_path(name)
            if (p / "manifest.json").exists():
                return read_version(p)
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
        if isinstance(ds_dir, RemoteDir):
            v = _read_remote_version(ds_dir, label)
            if not v.info:
                have = ", ".join(x.label for x in list_versions(ds_dir) if x.info) or "none"
                raise VersionError(f"{ds_dir.uri} has no version {label} (versions: {have})")
            return fetch_mirror(v)
    except StorageError as exc:
        raise VersionError(str(exc)) from None
    except (OSError, ValueError) as exc:
        raise VersionError(f"{name}: {exc}") from None
    vdir = ds_dir / label
    if not vdir.is_dir():
        have = ", ".join(v.label for v in list_versions(ds_dir)) or "none"
        raise VersionError(f"{ds_dir.name} has no version {label} (versions: {have})")
    return read_version(vdir)


# -- verify ----------------------------------------------------------------------------------
class _HashingReader:
    """A read-only file that hashes what passes through it; ``drain`` hashes the rest."""

    def __init__(self, f: Any, h: Any) -> None:
        self.f, self.h = f, h

    def read(self, size: int = -1) -> bytes:
        data = self.f.read(size)
        self.h.update(data)
        return data

    def drain(self) -> None:
        while self.read(8 << 20):
            pass


def count_tar_samples(f: Any) -> int:
    """Distinct sample keys in a tar read as a stream (``f`` needs only ``read``)."""
    keys = set()
    with tarfile.open(fileobj=f, mode="r|") as tf:
        for m in tf:
            if m.isfile():
                keys.add(m.name.split(".", 1)[0])
    return len(keys)


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


# a file at the top of the version folder, or a pair shard in its pairs/ folder (writer.PAIRS_DIR)
_MEMBER_NAME = re.compile(r"^(pairs/)?[A-Za-z0-9_][A-Za-z0-9_.\-]*$")


def _manifest_problem(manifest: Any) -> str | None:
    """What makes ``manifest`` unusable for verify (None: usable). Names must be plain file
    names: a manifest is data, and ``../x`` or ``/etc/passwd`` must not be opened through it."""
    if not isinstance(manifest, dict):
        return "not a JSON object"
    shards = manifest.get("shards")
    if not isinstance(shards, list):
        return "'shards' is not a list"
    for i, sh in enumerate(shards):
        if not isinstance(sh, dict):
            return f"shards[{i}] is not an object"
        if not isinstance(sh.get("name"), str) or not _MEMBER_NAME.match(sh["name"]):
            return f"shards[{i}].name {sh.get('name')!r} is not a file name"
        for k, typ in (("bytes", int), ("samples", int), ("sha256", str)):
            if not isinstance(sh.get(k), typ) or isinstance(sh.get(k), bool):
                return f"shards[{i}] ({sh['name']}): '{k}' missing or not a {typ.__name__}"
    files = manifest.get("files", {})
    if not isinstance(files, dict):
        return "'files' is not an object"
    for name, meta in files.items():
        if not _MEMBER_NAME.match(name) or not isinstance(meta, dict) or not isinstance(meta.get("sha256"), str):
            return f"files[{name!r}] is not a file name with a sha256"
    return None


def verify(version: Version) -> list[Check]:
    """Recompute every shard's sha256, size and sample count, and every listed file's sha256,
    against the manifest; and the manifest's own sha256 against the recorded content id.
    Works the same on a version on an object store (shards are streamed, not downloaded)."""
    out: list[Check] = []
    try:
        raw = version.read_bytes("manifest.json")
    except (FileNotFoundError, OSError):
        return [Check("manifest.json", False, "missing")]
    cid = sha256_bytes(raw)
    want = version.info.get("content_id")
    if not version.info:  # the commit marker: without it nothing says what the manifest should be
        out.append(Check(VERSION_FILE, False, "missing: the content id cannot be checked"))
    out.append(Check("manifest.json", want in (None, cid),
                     f"content id {cid[:12]}" + ("" if want in (None, cid) else f" != recorded {want[:12]}")))
    try:
        manifest = json.loads(raw)
        problem = _manifest_problem(manifest)
    except (ValueError, RecursionError) as exc:
        problem = f"{type(exc).__name__}: {exc}"
    if problem:  # a hand-edited or garbled manifest is a failed check, never a traceback
        return [*out, Check("manifest.json", False, f"not a manifest: {problem}")]
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
                reader = _HashingReader(f, h)
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
    if sizes.get("index.parquet") is not None or (not version.remote and (version.path / "index.parquet").exists()):
        try:
            # single-threaded: Arrow's CPU and I/O pools, once started, can abort the process at exit
            # ("terminate called without an active exception", ~4% of `verify` runs, more with
            # OpenCV loaded); one small column gains nothing from threads
            with version.open("index.parquet") as f:
                per = Counter(read_parquet(f, ["shard"]).column("shard").to_pylist())
        except (OSError, ValueError, KeyError) as exc:  # pyarrow's ArrowInvalid is a ValueError
            out.append(Check("index.parquet", False, f"unreadable: {type(exc).__name__}: {exc}".splitlines()[0]))
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
    if version.remote is not None:
        names = [n for n, is_dir, _ in version.remote.list("pairs") if not is_dir]
    else:
        d = version.path / "pairs"
        names = [f"pairs/{p.name}" for p in sorted(d.iterdir()) if p.is_file()] if d.is_dir() else []
    return [Check(n, False, "a pair shard the manifest does not list") for n in names
            if n.endswith(".tar") and n not in listed]


# -- diff ------------------------------------------------------------------------------------
def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """Nested config -> dotted keys; lists of named items (stages) are keyed by name, so a
    change reads ``stages.edit.params.inpaint_radius``."""
    out: dict[str, Any] = {}
    if isinstance(node, dict):
        for k, v in node.items():
            out.update(flatten(v, f"{prefix}{k}."))
    elif isinstance(node, list) and node and all(isinstance(x, dict) and "name" in x for x in node):
        for x in node:
            out.update(flatten({k: v for k, v in x.items() if k != "name"}, f"{prefix}{x['name']}."))
    elif isinstance(node, list) and node and all(isinstance(x, dict) for x in node):
        for i, x in enumerate(node):
            out.update(flatten(x, f"{prefix}{i}."))
    else:
        out[prefix[:-1]] = node
    return out


def config_changes(a: dict[str, Any], b: dict[str, Any]) -> list[dict[str, Any]]:
    fa, fb = flatten(a), flatten(b)
    changes = []
    for k in sorted(set(fa) | set(fb)):
        if fa.get(k, "<absent>") != fb.get(k, "<absent>"):
            # Ray placement and stage resources change where work runs, never a byte of output
            placement = k.startswith("ray.") or ".resources." in k
            changes.append({"key": k, "a": fa.get(k, "<absent>"), "b": fb.get(k, "<absent>"),
                            "placement_only": placement})
    return changes


def version_config(vdir: Path) -> dict[str, Any]:
    return yaml.safe_load((vdir / "config.yaml").read_text()) or {}


def _index(vdir: Path) -> dict[str, dict[str, Any]]:
    return {r["key"]: r for r in read_parquet(vdir / "index.parquet").to_pylist()}


def _reject_counts(manifest: dict[str, Any]) -> dict[str, int]:
    return {f"{r['stage']}/{r['reason']} ({r['scope']})": r["count"] for r in manifest["rejects"]}


def spec_changes(a: dict[str, Any], b: dict[str, Any]) -> list[dict[str, Any]]:
    """Differences outside the config: inputs, limit, package version."""
    out = []
    sa, sb = a.get("spec") or {}, b.get("spec") or {}
    for key in ("input_set_hash", "limit", "package_version"):
        if sa.get(key) != sb.get(key):
            out.append({"key": key, "a": sa.get(key), "b": sb.get(key)})
    return out


def diff(a: Version, b: Version, *, samples: bool = True) -> dict[str, Any]:
    ma, mb = a.manifest(), b.manifest()
    ca, cb = ma["counts"], mb["counts"]
    counts = {}
    for k in ("inputs", "samples", "rejected_inputs", "rejected_variants"):
        counts[k] = {"a": ca[k], "b": cb[k], "delta": cb[k] - ca[k]}
    for group in ("variants", "question_kinds"):
        for k in sorted(set(ca[group]) | set(cb[group])):
            x, y = ca[group].get(k, 0), cb[group].get(k, 0)
            counts[f"{group}.{k}"] = {"a": x, "b": y, "delta": y - x}
    ra, rb = _reject_counts(ma), _reject_counts(mb)
    rejects = {k: {"a": ra.get(k, 0), "b": rb.get(k, 0), "delta": rb.get(k, 0) - ra.get(k, 0)}
               for k in sorted(set(ra) | set(rb)) if ra.get(k, 0) != rb.get(k, 0)}
    out: dict[str, Any] = {
        "a": f"{a.dataset}@{a.label}", "b": f"{b.dataset}@{b.label}",
        "content_identical": a.content_id() == b.content_id(),
        "config": config_changes(version_config(a.path), version_config(b.path)),
        "spec": spec_changes(a.info, b.info),
        "counts": counts,
        "rejects": rejects,
    }
    if samples:
        ia, ib = _index(a.path), _index(b.path)
        common = set(ia) & set(ib)
        fields = ("variants", "questions", "answers", "metrics", "mask_area_frac")
        out["samples"] = {
            "added": sorted(set(ib) - set(ia)),
            "removed": sorted(set(ia) - set(ib)),
            "changed": sorted(k for k in common if any(ia[k][f] != ib[k][f] for f in fields)),
            "unchanged": len([k for k in common if all(ia[k][f] == ib[k][f] for f in fields)]),
        }
    return out


# -- regenerate ------------------------------------------------------------------------------
def tar_sample_digests(f: Any) -> dict[str, str]:
    """key -> sha256 over the sample's member names and bytes, read in memory, never extracted."""
    acc: dict[str, Any] = {}
    with tarfile.open(fileobj=f, mode="r:") as tf:
        for m in tf:
            if not m.isfile():
                continue
            key = m.name.split(".", 1)[0]
            member = tf.extractfile(m)
            data = member.read() if member else b""
            acc.setdefault(key, hashlib.sha256()).update(m.name.encode() + b"\0" + data)
    return {k: h.hexdigest() for k, h in acc.items()}


def compare_versions(a: Version, b: Version) -> dict[str, Any]:
    """Which shards and samples differ between two versions (content ids differ)."""
    ma, mb = a.manifest(), b.manifest()
    sa = {s["name"]: s for s in ma["shards"]}
    sb = {s["name"]: s for s in mb["shards"]}
    shards = sorted(n for n in set(sa) | set(sb) if sa.get(n, {}).get("sha256") != sb.get(n, {}).get("sha256"))

    def digests(v: Version, names: dict[str, Any], n: str) -> dict[str, str]:
        if n not in names or v.sizes([n])[n] is None:
            return {}
        with v.open(n) as f:
            return tar_sample_digests(f)

    samples: set[str] = set()
    for n in shards:
        da, db = digests(a, sa, n), digests(b, sb, n)
        samples |= {k for k in set(da) | set(db) if da.get(k) != db.get(k)}
    files = sorted(n for n in set(ma.get("files", {})) | set(mb.get("files", {}))
                   if ma.get("files", {}).get(n) != mb.get("files", {}).get(n))
    other = sorted(k for k in set(ma) | set(mb) if k not in ("shards", "files") and ma.get(k) != mb.get(k))
    return {"shards": shards, "samples": sorted(samples), "files": files, "manifest_fields": other}


def regenerate(version: Version, scratch: Path, *, local: bool = False, progress: bool = False,
               verbose: bool = True) -> dict[str, Any]:
    """Re-run the stored spec into ``scratch`` and compare content ids byte for byte; the stored
    copy is verified as well (``stored_failures``)."""
    from counterfactory.pipeline.config import validate_config
    from counterfactory.pipeline.runner import run_pipeline

    info = version.info
    data = version_config(version.path)
    data.setdefault("output", {})["root"] = str(scratch)
    base = info.get("base_dir")
    cfg = validate_config(data, source=str(version.path / "config.yaml"),
                          base_dir=Path(base) if base else version.path)
    res = run_pipeline(cfg, limit=(info.get("spec") or {}).get("limit"), progress=progress, local=local,
                       verbose=verbose)
    want = info.get("content_id") or version.content_id()
    got = content_id(res.out_dir)
    report: dict[str, Any] = {
        "version": f"{version.dataset}@{version.label}",
        "scratch": str(res.out_dir),
        "content_id": want, "regenerated_content_id": got, "identical": want == got,
        "spec_id": info.get("spec_id"), "regenerated_spec_id": res.spec_id,
        "spec_changes": spec_changes(info, read_version(res.out_dir).info),
    }
    # the content id says what the version should hold; whether the stored copy still holds it
    # is verify's question, asked too, so "identical" is never said of a damaged copy
    report["stored_failures"] = [f"{c.name}: {c.detail}" for c in verify(version) if not c.ok]
    if want != got:
        report.update(compare_versions(version, read_version(res.out_dir)))
    return report


# -- helpers for the card ----------------------------------------------------------------------
def first_sample_provenance(vdir: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Stage provenance of the first sample (every sample of a version has the same stages)."""
    for s in manifest.get("shards", []):
        p = vdir / s["name"]
        if not p.exists():
            continue
        with tarfile.open(p, mode="r:") as tf:
            for m in tf:
                if m.name.endswith(".json"):
                    f = tf.extractfile(m)
                    doc = json.load(io.BytesIO(f.read())) if f else {}
                    return doc.get("provenance", {}).get("stages", {})
    return {}


def counter_dict(c: Counter) -> dict[str, int]:
    return dict(sorted(c.items()))
