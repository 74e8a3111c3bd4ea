"""The files of a version folder: their names, atomic writes, checksums, the folder object and
the one safe tar reader (bottom layer: standard library only, so the trainers' ``loader``
imports it without Ray or pyarrow).

Layout of ``ROOT/DATASET/vN`` (``versions.py`` owns the labels, ``publish.py`` the renames)::

    DATASET-000000.tar ...   shards (KEY.json, KEY.orig.jpg, KEY.VARIANT.jpg, masks ...)
    pairs/*.tar              the pairs layout (one sample per original x variant)
    index.parquet            one row per sample          rejects.parquet  one row per reject
    shards.json              per-shard sha256/bytes/samples for loaders
    config.yaml              the resolved config         summary.json     the run report
    manifest.json            per-shard and per-file sha256, counts: its sha256 is the content id
    version.json             label, spec and content ids: the commit marker
    README.md, card.json, plots/   the data card (not in the manifest)
"""

from __future__ import annotations

import hashlib
import os
import re
import tarfile
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

# -- names ---------------------------------------------------------------------------------------
MANIFEST = "manifest.json"
INDEX = "index.parquet"
REJECTS = "rejects.parquet"
SHARDS_INDEX = "shards.json"
CONFIG = "config.yaml"
SUMMARY = "summary.json"
VERSION_FILE = "version.json"
CARD_JSON = "card.json"
README = "README.md"
PLOTS_DIR = "plots"
AUDIT_DIR = "audit"  # the audit's per-shard features (audit_features), outside the manifest like the card
PAIRS_DIR = "pairs"  # the pairs layout: one sample per original x variant, the same members in each
JOURNAL = ".journal"  # per-shard resume journal of a staging folder
LOCK = ".lock"
STAGING_PREFIX = ".staging-"  # ROOT/DATASET/.staging-<spec id>: a run in progress, never a version
CLAIM = ".claim.json"  # written first into a label being uploaded; removed once it is committed
LATEST = "latest"
TAGS = "tags"  # ROOT/DATASET/tags/NAME holds a label, like `latest`
HASH_CACHE = Path(".cache") / "source-hashes.json"
LABEL_RE = re.compile(r"^v(\d+)$")
# a file at the top of the version folder, or a pair shard in its pairs/ folder
MEMBER_NAME = re.compile(r"^(pairs/)?[A-Za-z0-9_][A-Za-z0-9_.\-]*$")


def features_name(shard: str) -> str:
    """``audit/NAME.npz`` for shard ``NAME.tar``: its audit features (``audit_features``), in a
    staging or version folder and in a staging prefix on an object store."""
    return f"{AUDIT_DIR}/{shard.rsplit('/', 1)[-1].removesuffix('.tar')}.npz"


# -- checksums and atomic writes ----------------------------------------------------------------
def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def atomic_write(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, rename: never a half-written file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; outputs are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class HashingReader:
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


# -- the manifest ------------------------------------------------------------------------------------
def manifest_problem(manifest: Any) -> str | None:
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
        if not isinstance(sh.get("name"), str) or not MEMBER_NAME.match(sh["name"]):
            return f"shards[{i}].name {sh.get('name')!r} is not a file name"
        for k, typ in (("bytes", int), ("samples", int), ("sha256", str)):
            if not isinstance(sh.get(k), typ) or isinstance(sh.get(k), bool):
                return f"shards[{i}] ({sh['name']}): '{k}' missing or not a {typ.__name__}"
    files = manifest.get("files", {})
    if not isinstance(files, dict):
        return "'files' is not an object"
    for name, meta in files.items():
        if not MEMBER_NAME.match(name) or not isinstance(meta, dict) or not isinstance(meta.get("sha256"), str):
            return f"files[{name!r}] is not a file name with a sha256"
    return None


# -- the folder object ------------------------------------------------------------------------------
def mirrored(name: str) -> bool:
    """A file of a version that its local mirror holds: all but the shards, the viewer (rebuilt
    on demand) and an upload's claim."""
    return not name.endswith(".tar") and not name.startswith("viewer/") and name != CLAIM


class Folder(ABC):
    """A folder read and written by names relative to it, wherever it lives: ``LocalDir`` here,
    ``storage.RemoteDir`` on an object store. Callers ask the folder, never its type; which
    class a path or URI gets is decided once, by ``storage.open_dir``."""

    #: a folder of this machine's filesystem: published by one rename (whole as soon as it
    #: exists) and readable by tools that take a path. An object-store folder is uploaded file by
    #: file and is whole only once its commit marker (``version.json``) is there.
    is_local: bool

    uri: str

    @property
    @abstractmethod
    def name(self) -> str:
        """The last component of its path."""

    @property
    @abstractmethod
    def parent_name(self) -> str:
        """The name of the folder it is in (a version's dataset)."""

    @abstractmethod
    def child(self, name: str) -> Folder: ...

    @abstractmethod
    def parent(self) -> Folder: ...

    @abstractmethod
    def workdir(self) -> Path:
        """The local folder that stands for this one on this machine: the folder itself, or for
        an object-store folder a working folder (a dataset's staging and its versions' mirrors)."""

    @abstractmethod
    def mirror(self, content_id: str | None) -> Path:
        """``workdir()`` holding this version folder's ``mirrored`` files (a local folder holds
        them already). A mirror whose manifest matches ``content_id`` is reused."""

    @abstractmethod
    def sizes(self, rels: Sequence[str]) -> dict[str, int | None]:
        """Size of each named file; None where it is missing."""

    @abstractmethod
    def exists(self, rel: str = "") -> bool: ...

    @abstractmethod
    def list(self, rel: str = "", recursive: bool = False) -> list[tuple[str, bool, int]]:
        """(name relative to this folder, is_dir, size) of its entries; [] when it is absent."""

    @abstractmethod
    def read_bytes(self, rel: str) -> bytes: ...

    def read_text(self, rel: str) -> str:
        return self.read_bytes(rel).decode()

    @abstractmethod
    def read_pointer(self, rel: str) -> str | None:
        """The text of a small file naming something (``latest``), None when there is none."""

    @abstractmethod
    def open(self, rel: str) -> Any:
        """A seekable binary file (tarfile reads members by offset)."""

    @abstractmethod
    def sha256(self, rel: str) -> str: ...

    @abstractmethod
    def write_bytes(self, rel: str, data: bytes) -> None:
        """Readers see the old file or the new one, never a part."""

    @abstractmethod
    def create(self, rel: str, data: bytes) -> None:
        """Write a new file; FileExistsError when it is there already, where the store can tell
        (an object store's PUT cannot: the caller's check before it is all there is)."""

    @abstractmethod
    def delete(self, rel: str) -> None: ...

    def __str__(self) -> str:
        return self.uri


class LocalDir(Folder):
    """A folder of this machine's filesystem."""

    is_local = True

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"LocalDir({str(self.path)!r})"

    def __str__(self) -> str:
        return str(self.path)

    @property
    def uri(self) -> str:
        return str(self.path.resolve())

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def parent_name(self) -> str:
        return self.path.parent.name

    def child(self, name: str) -> LocalDir:
        return LocalDir(self.path / name)

    def parent(self) -> LocalDir:
        return LocalDir(self.path.parent)

    def workdir(self) -> Path:
        return self.path

    def mirror(self, content_id: str | None) -> Path:
        return self.path

    def sizes(self, rels: Sequence[str]) -> dict[str, int | None]:
        return {r: (self.path / r).stat().st_size if (self.path / r).is_file() else None for r in rels}

    def exists(self, rel: str = "") -> bool:
        return (self.path / rel).exists()

    def list(self, rel: str = "", recursive: bool = False) -> list[tuple[str, bool, int]]:
        base = self.path / rel
        if not base.is_dir():
            return []
        found = base.rglob("*") if recursive else base.iterdir()
        return sorted((p.relative_to(self.path).as_posix(), p.is_dir(), p.stat().st_size if p.is_file() else 0)
                      for p in found)

    def read_bytes(self, rel: str) -> bytes:
        return (self.path / rel).read_bytes()

    def read_text(self, rel: str) -> str:
        return (self.path / rel).read_text()

    def read_pointer(self, rel: str) -> str | None:
        """A symbolic link (tolerated if someone made one by hand) names its target."""
        p = self.path / rel
        if p.is_symlink():
            return Path(os.readlink(p)).name
        return p.read_text() if p.is_file() else None

    def open(self, rel: str) -> Any:
        return open(self.path / rel, "rb")

    def sha256(self, rel: str) -> str:
        return sha256_file(self.path / rel)

    def write_bytes(self, rel: str, data: bytes) -> None:
        (self.path / rel).parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path / rel, data)

    def create(self, rel: str, data: bytes) -> None:
        """O_EXCL: of two concurrent writers exactly one wins."""
        (self.path / rel).parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path / rel, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    def delete(self, rel: str) -> None:
        (self.path / rel).unlink()


# -- the one tar reader -------------------------------------------------------------------------------
class UnsafeMember(ValueError):
    """A tar member that is not a plain file with a relative name (a link, a device, ``..``)."""

    def __init__(self, name: str, why: str) -> None:
        super().__init__(f"{name}: {why}")
        self.name, self.why = name, why


def member_problem(info: tarfile.TarInfo, max_bytes: int | None = None) -> str | None:
    """Why a member may not be read from a shard (None: a regular file with a safe name)."""
    name = info.name
    if info.issym() or info.islnk():
        return (f"a {'symbolic' if info.issym() else 'hard'} link "
                f"(to {info.linkname!r}); shards hold regular files only")
    if info.ischr() or info.isblk() or info.isfifo():
        return "a device or FIFO entry; shards hold regular files only"
    if not info.isreg():
        return "not a regular file; shards hold regular files only"
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":") or "\x00" in name:
        return "an absolute path"
    if ".." in name.replace("\\", "/").split("/"):
        return "a '..' path component"
    if max_bytes is not None and info.size > max_bytes:
        return f"{info.size} bytes, over the {max_bytes}-byte member limit"
    return None


def tar_members(f: Any, *, strict: bool = False, plain_names: bool = False, max_member_bytes: int | None = None,
                want: Callable[[str], bool] | None = None,
                mode: str = "r|") -> Iterator[tuple[tarfile.TarInfo, bytes]]:
    """(member, its bytes) of every regular file of a tar read as a stream (``f`` needs only
    ``read``), in memory: nothing is ever extracted. Anything else (a link, a device, a folder)
    is skipped, or with ``strict`` raises ``UnsafeMember``, as does a name other than a plain
    ``KEY.part`` with ``plain_names``. ``want(name)`` false: the bytes are not read (``b""``)."""
    with tarfile.open(fileobj=f, mode=mode) as tf:
        for m in tf:
            why = member_problem(m, max_member_bytes) if strict else None
            if not why and plain_names and ("/" in m.name or "\\" in m.name or "." not in m.name):
                why = "not a plain KEY.part name"
            if why:
                raise UnsafeMember(m.name, why)
            if not m.isfile():
                continue
            data = b""
            if want is None or want(m.name):
                member = tf.extractfile(m)
                data = member.read() if member is not None else b""
            tf.members = []  # stream mode keeps every TarInfo otherwise
            yield m, data


def tar_samples(f: Any, **kw: Any) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {part: bytes}) per sample of a shard, members of a sample being contiguous."""
    key: str | None = None
    parts: dict[str, bytes] = {}
    for m, data in tar_members(f, **kw):
        k, _, part = m.name.partition(".")
        if k != key:
            if key is not None:
                yield key, parts
            key, parts = k, {}
        parts[part] = data
    if key is not None:
        yield key, parts
