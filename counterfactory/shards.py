"""Locating and reading counterfactory shards safely: the part of the loader that trusts nothing.

``resolve_shards`` turns a dataset reference (a folder, ``DATASET@VERSION``, a ``latest``
version, a brace pattern or a list of URLs; local, fsspec or pyarrow storage) into ``Shard``
records, reading ``shards.json`` as untrusted data (bounded read, schema checked, no shard name
that leaves the dataset folder). ``read_shard`` yields one shard's samples.

Reading is streaming and in memory: members are read with ``tarfile`` in stream mode straight
from the (fsspec) file object and nothing is ever extracted to disk. The member iterator is
ours rather than webdataset's because webdataset silently skips links and device entries and
cannot tell a shard cut at a member boundary from a complete one; here a link, a device entry,
an absolute name or a ``..`` component is refused (``UnsafeMemberError``), and a short shard
(fewer samples than ``shards.json`` says, a sample missing a part its JSON lists, fewer bytes
than recorded) raises ``ShardError`` naming the shard (``PairDataset`` skips it with a warning
when ``errors="skip"``).

No torch here: ``counterfactory.loader`` builds the trainer-facing dataset on top of it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat
import tarfile
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import fsspec
import webdataset as wds
from webdataset.tariterators import base_plus_ext

from counterfactory import layout
from counterfactory.layout import UnsafeMember, tar_members

__all__ = [
    "LoaderError",
    "check_against_manifest",
    "Shard",
    "ShardError",
    "UnsafeMemberError",
    "describe_version",
    "read_shard",
    "resolve_shards",
]

SHARD_INDEX = layout.SHARDS_INDEX
DEFAULT_MAX_MEMBER_BYTES = 1 << 30  # one member never legitimately approaches this


class LoaderError(RuntimeError):
    """Base class: a dataset reference or a shard the loader cannot use."""


class ShardError(LoaderError):
    """A shard that cannot be read completely (missing, truncated, corrupt). Skippable."""

    def __init__(self, url: str, message: str) -> None:
        super().__init__(f"shard {url}: {message}")
        self.url = url


class UnsafeMemberError(LoaderError):
    """A tar member that a counterfactory writer never produces and that would be dangerous if
    someone extracted the shard: never skipped, because it means the shard was tampered with."""

    def __init__(self, url: str, member: str, why: str) -> None:
        super().__init__(f"shard {url}: refusing member {member!r}: {why}")
        self.url = url
        self.member = member


@dataclass(frozen=True)
class Shard:
    """One tar shard as listed in ``shards.json``; counts are None for bare URL lists."""

    url: str
    nsamples: int | None = None
    filesize: int | None = None
    sha256: str | None = None


# -- resolving a dataset reference ----------------------------------------------------------


def as_fsspec(filesystem: Any) -> fsspec.AbstractFileSystem | None:
    """Accept an fsspec filesystem or a pyarrow one (wrapped), so one code path reads both."""
    if filesystem is None or isinstance(filesystem, fsspec.AbstractFileSystem):
        return filesystem
    import pyarrow.fs as pafs

    if isinstance(filesystem, pafs.FileSystem):
        from fsspec.implementations.arrow import ArrowFSWrapper

        return ArrowFSWrapper(filesystem)
    raise TypeError(f"filesystem must be an fsspec or pyarrow filesystem, not {type(filesystem).__name__}")


def fs_for(url: str, fs: fsspec.AbstractFileSystem | None) -> tuple[fsspec.AbstractFileSystem, str]:
    if fs is not None:
        return fs, url
    try:
        return fsspec.core.url_to_fs(url)
    except ImportError:
        # no fsspec implementation installed for the scheme (s3:// without s3fs, ...): pyarrow's
        # own S3/GCS/HDFS filesystems, the ones `counterfactory run` wrote with, read it too
        from fsspec.implementations.arrow import ArrowFSWrapper

        from counterfactory.storage import open_filesystem

        pfs, path = open_filesystem(url)
        return ArrowFSWrapper(pfs), path


def join(base: str, name: str) -> str:
    if "://" in name or name.startswith("/"):
        return name
    return base.rstrip("/") + "/" + name


def _split_ref(source: str, root: str | None, fs: fsspec.AbstractFileSystem | None) -> str:
    """``DATASET@VERSION`` -> ``ROOT/DATASET/VERSION`` (``PATH/DATASET@VERSION`` -> that path's
    version; ``DATASET`` alone -> ``ROOT/DATASET``); an existing path is left alone."""
    fsys, path = fs_for(source, fs)
    if fsys.exists(path):
        return source
    if "@" not in source:  # a bare DATASET name under root: its latest version
        bare = root is not None and "/" not in source and "://" not in source
        return join(root, source) if bare else source
    name, _, version = source.rpartition("@")
    if not name or not version or "/" in version:
        raise LoaderError(f"{source!r}: expected DATASET@VERSION")
    if "/" not in name and "://" not in name:
        name = join(root or os.environ.get("COUNTERFACTORY_ROOT") or "outputs", name)
    # `latest` is resolved by _dataset_dir: a file naming the version, or a link/folder
    return name if version == "latest" else join(name, version)


def _dataset_dir(source: str, root: str | None, fs: fsspec.AbstractFileSystem | None) -> str:
    """The folder holding ``shards.json`` for a path, a ``shards.json`` path, a dataset folder
    whose ``latest`` file (or symlink) names the version, or ``DATASET@VERSION``."""
    source = _split_ref(source, root, fs)
    fsys, path = fs_for(source, fs)
    if path.endswith(SHARD_INDEX) and fsys.isfile(path):
        return source[: -len(SHARD_INDEX)].rstrip("/") or "/"
    for _ in range(2):  # the folder itself, or the version its `latest` points at
        if fsys.isfile(join(path, SHARD_INDEX)):
            return source
        latest = join(path, "latest")
        if fsys.isdir(latest):
            source, path = join(source, "latest"), latest
        elif fsys.isfile(latest):
            version = fsys.cat_file(latest).decode().strip()
            if not version or "/" in version or version in (".", ".."):
                raise LoaderError(f"{source}: the 'latest' file names no version ({version!r})")
            source, path = join(source, version), join(path, version)
        else:
            break
    raise LoaderError(f"{source}: no {SHARD_INDEX} here (nor under a 'latest' version); "
                      "expected a dataset folder written by `counterfactory run`")


def resolve_shards(source: str | os.PathLike[str] | Sequence[str], *, root: str | None = None,
                   filesystem: Any = None, check_manifest: bool = True) -> tuple[list[Shard], str | None]:
    """Shards of a dataset, and its folder (None for a bare URL list).

    ``source``: a dataset folder (local path, ``file://`` or any fsspec URL), a ``shards.json``
    path, ``DATASET@VERSION`` (resolved as ``ROOT/DATASET/VERSION``; ``root`` defaults to
    ``$COUNTERFACTORY_ROOT`` or ``outputs``), a brace pattern ``x-{000000..000003}.tar``, or a
    list of shard URLs.

    With ``check_manifest`` (the default) a dataset folder's ``shards.json`` must agree with its
    ``manifest.json`` (names, sizes, sample counts, sha256), the manifest with the content id in
    ``version.json``, and no ``.tar`` may sit in the folder unlisted (``check_against_manifest``);
    ``read_shard`` then checks each shard's bytes against that sha256 as it reads them. Bare URL
    lists and brace patterns have no manifest to check.
    """
    fs = as_fsspec(filesystem)
    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    if not isinstance(source, str):
        urls = [str(u) for u in source]
        if not urls:
            raise LoaderError("an empty list of shard URLs")
        return [Shard(u) for u in urls], None
    if source.endswith(".tar") or "{" in source:
        return [Shard(u) for u in wds.shardlists.expand_urls(source)], None
    folder = _dataset_dir(source, root, fs)
    shards = _shard_index(folder, fs)
    if check_manifest:
        check_against_manifest(folder, shards, fs)
    return shards, folder


# -- shards.json as untrusted data (security: bounded read, schema, no path out of the folder) --
MAX_SHARD_INDEX_BYTES = 64 << 20  # ~300,000 shards; a larger one is not ours


def _local_regular(fsys: fsspec.AbstractFileSystem, path: str, what: str) -> None:
    """On a local filesystem, a regular file only (links followed): a device such as /dev/zero
    never ends and a FIFO blocks forever."""
    from fsspec.implementations.local import LocalFileSystem

    if isinstance(fsys, LocalFileSystem):
        try:
            st = os.stat(fsys._strip_protocol(path))
        except OSError as e:
            raise ShardError(path, f"cannot open ({e.strerror or e})") from None
        if not stat.S_ISREG(st.st_mode):
            raise ShardError(path, f"{what} is not a regular file (a device, FIFO or folder)")


def _safe_shard_url(url: Any, where: str) -> str:
    """A shard name relative to the dataset folder: no scheme, no absolute path, no ``..``,
    so a shards.json can never make the loader read outside its own folder or URL prefix."""
    if not isinstance(url, str) or not url or "\x00" in url:
        raise LoaderError(f"{where}: shard url {url!r} is not a file name")
    parts = url.replace("\\", "/").split("/")
    if "://" in url or url.startswith(("/", "\\", "~")) or (len(url) > 1 and url[1] == ":"):
        raise LoaderError(f"{where}: shard url {url!r} is absolute; shards are named relative to the dataset folder")
    if ".." in parts:
        raise LoaderError(f"{where}: shard url {url!r} leaves the dataset folder")
    return url


def _read_small(folder: str, name: str, fs: fsspec.AbstractFileSystem | None, limit: int) -> bytes:
    """The bytes of a small file of the dataset folder: a regular file, at most ``limit`` bytes."""
    fsys, path = fs_for(folder, fs)
    where = f"{folder}/{name}"
    file_path = join(path, name)
    try:
        _local_regular(fsys, file_path, name)
    except ShardError as e:
        raise LoaderError(f"{where}: {e}") from None
    try:
        with fsys.open(file_path, "rb") as f:
            raw = f.read(limit + 1)
    except OSError as e:
        raise LoaderError(f"{where}: cannot read ({e})") from None
    if len(raw) > limit:
        raise LoaderError(f"{where}: over {limit} bytes; not a file counterfactory wrote")
    return raw


def _json_of(raw: bytes, where: str) -> Any:
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise LoaderError(f"{where}: not JSON ({type(e).__name__})") from None


def _shard_index(folder: str, fs: fsspec.AbstractFileSystem | None) -> list[Shard]:
    where = f"{folder}/{SHARD_INDEX}"
    doc = _json_of(_read_small(folder, SHARD_INDEX, fs, MAX_SHARD_INDEX_BYTES), where)
    if not isinstance(doc, dict) or doc.get("__kind__") != "wids-shard-index-v1" or not isinstance(doc.get("shardlist"), list):
        raise LoaderError(f"{where}: not a wids-shard-index-v1 shard index")
    shards = []
    for i, s in enumerate(doc["shardlist"]):
        if not isinstance(s, dict):
            raise LoaderError(f"{where}: shardlist[{i}] is not an object")
        url = _safe_shard_url(s.get("url"), where)
        n, size, sha = s.get("nsamples"), s.get("filesize"), s.get("sha256")
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise LoaderError(f"{where}: shardlist[{i}].nsamples {n!r} is not a count")
        if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 0):
            raise LoaderError(f"{where}: shardlist[{i}].filesize {size!r} is not a byte count")
        if sha is not None and not (isinstance(sha, str) and len(sha) == 64):
            raise LoaderError(f"{where}: shardlist[{i}].sha256 {sha!r} is not a sha256")
        shards.append(Shard(join(folder, url), n, size, sha))
    return shards


# -- the manifest and the content id: what `counterfactory verify` checks, before a shard is read --
MAX_VERSION_BYTES = 1 << 20
_HEX = frozenset("0123456789abcdef")


def _content_id(folder: str, fs: fsspec.AbstractFileSystem | None) -> str | None:
    """The content id ``version.json`` records (None: no version.json, a folder not published
    yet); a garbled record is refused, since it is the one anchor of everything else."""
    fsys, path = fs_for(folder, fs)
    if not fsys.exists(join(path, layout.VERSION_FILE)):
        return None
    where = f"{folder}/{layout.VERSION_FILE}"
    info = _json_of(_read_small(folder, layout.VERSION_FILE, fs, MAX_VERSION_BYTES), where)
    cid = info.get("content_id") if isinstance(info, dict) else None
    if not (isinstance(cid, str) and len(cid) == 64 and set(cid) <= _HEX):
        raise LoaderError(f"{where}: not a version record with a content id (garbled or edited); "
                          "run `counterfactory verify` on it")
    return cid


def check_against_manifest(folder: str, shards: Sequence[Shard], fs: fsspec.AbstractFileSystem | None) -> None:
    """Refuse a version whose files disagree with each other: ``manifest.json`` against the
    content id (its sha256) in ``version.json``; ``shards.json`` against the manifest's shard
    list; and any ``.tar`` in the folder that the manifest does not list (a reader globbing
    ``*.tar`` would take it). One small read each; the shards' bytes are hashed by
    ``read_shard`` while they are read for training, never in a second pass."""
    cid = _content_id(folder, fs)
    where = f"{folder}/{layout.MANIFEST}"
    raw = _read_small(folder, layout.MANIFEST, fs, MAX_SHARD_INDEX_BYTES)
    named = f"content id {cid[:12]}" if cid else "no version.json"
    digest = hashlib.sha256(raw).hexdigest()
    if cid is not None and digest != cid:
        raise LoaderError(f"{where}: sha256 {digest[:12]} is not the content id {cid[:12]} in "
                          f"{layout.VERSION_FILE} (edited or damaged); run `counterfactory verify` on it")
    manifest = _json_of(raw, where)
    problem = layout.manifest_problem(manifest)
    if problem:
        raise LoaderError(f"{where} ({named}): not a manifest: {problem}")
    want = [(s["name"], s["samples"], s["bytes"], s["sha256"]) for s in manifest["shards"]]
    counts = manifest.get("counts")
    total = counts.get("samples") if isinstance(counts, dict) else None
    if total != sum(w[1] for w in want):
        raise LoaderError(f"{where} ({named}): counts {total!r} samples, its shards hold "
                          f"{sum(w[1] for w in want)}; run `counterfactory verify` on it")
    prefix = folder.rstrip("/") + "/"
    have = [(s.url[len(prefix):] if s.url.startswith(prefix) else s.url, s.nsamples, s.filesize, s.sha256)
            for s in shards]
    if have != want:
        bad = next((h for h, w in zip(have, want, strict=False) if h != w), None)
        what = (f"shard {bad[0]}" if bad else f"{len(have)} shard(s) against {len(want)}")
        raise LoaderError(f"{folder}/{SHARD_INDEX} disagrees with {layout.MANIFEST} ({named}): {what} "
                          "(name, samples, bytes or sha256); run `counterfactory verify` on it")
    fsys, path = fs_for(folder, fs)
    listed = {w[0] for w in want}
    try:
        names = [str(n).rstrip("/").rsplit("/", 1)[-1] for n in fsys.ls(path, detail=False)]
    except OSError as e:
        raise LoaderError(f"{folder}: cannot list ({e})") from None
    extra = sorted(n for n in names if n.endswith(".tar") and n not in listed)
    if extra:
        raise LoaderError(f"{folder}: {extra[0]} is a shard {layout.MANIFEST} ({named}) does not list"
                          + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "")
                          + "; run `counterfactory verify` on it")


# -- reading shards safely -------------------------------------------------------------------


class _CountingReader(io.RawIOBase):
    """Counts (and optionally hashes) the bytes tarfile pulls, so the end of a shard can be
    checked against ``shards.json`` without a second pass over the file."""

    def __init__(self, raw: Any, hash_it: bool, limit: int | None = None) -> None:
        self.raw = raw
        self.nbytes = 0
        self.sha = hashlib.sha256() if hash_it else None
        self.limit = limit  # a read past the listed size stops here (one byte over tells)

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        if self.limit is not None:
            room = self.limit - self.nbytes
            size = room if size is None or size < 0 else min(size, room)
            if size <= 0:
                return b""
        data = self.raw.read(size)
        self.nbytes += len(data)
        if self.sha is not None:
            self.sha.update(data)
        return data

    def readinto(self, b: Any) -> int:
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)

    def drain(self) -> None:
        while self.read(1 << 20):
            pass


def _complete(sample: dict[str, Any], url: str) -> dict[str, Any]:
    """Parse the JSON and check that every part it lists is there: a shard cut at a member
    boundary leaves a sample that parses but lacks its last parts."""
    key = sample["__key__"]
    if "json" not in sample:
        raise ShardError(url, f"sample {key} has no json member (truncated or not a counterfactory shard)")
    try:
        doc = json.loads(sample["json"])
    except ValueError as e:
        raise ShardError(url, f"sample {key}: unreadable json ({e})") from None
    missing = [p for p in doc.get("parts", []) if p not in sample]
    if missing:
        raise ShardError(url, f"sample {key} lacks {missing} (truncated?)")
    sample["json"] = doc
    return sample


VERIFY_BUFFER_BYTES = 1 << 30  # a verified shard up to this size is checked before any sample leaves


def read_shard(shard: Shard, *, fs: fsspec.AbstractFileSystem | None = None, verify: bool = True,
               max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES) -> Iterator[dict[str, Any]]:
    """Samples of one shard, in order, as ``{"__key__", "__url__", "json": dict, SUFFIX: bytes}``.

    Raises ``ShardError`` (shard named) when the shard cannot be read to its end or disagrees
    with ``shards.json``. With ``verify`` (the default) its sha256 is checked too: a shard of
    known size (every shard a shards.json lists, up to ``VERIFY_BUFFER_BYTES``) is read into
    memory and hashed before its first sample is yielded, so a tampered or bit-flipped shard
    gives no sample at all; ``verify=False`` skips the hash for trusted storage. Reads never go
    past the listed size, and a local shard must be a regular file (not /dev/zero, not a FIFO).
    An incomplete trailing sample is never yielded.
    """
    url = shard.url
    try:
        fsys, path = fs_for(url, fs)
        _local_regular(fsys, path, "the shard")
        raw = fsys.open(path, "rb")
    except (OSError, ValueError) as e:
        raise ShardError(url, f"cannot open ({e})") from None
    check = verify and shard.sha256 is not None
    limit = None if shard.filesize is None else shard.filesize + 1
    if check and shard.filesize is not None and shard.filesize <= VERIFY_BUFFER_BYTES:
        with raw:
            try:
                reader, chunks = _CountingReader(raw, hash_it=False, limit=limit), []
                while chunk := reader.read(8 << 20):
                    chunks.append(chunk)
                data = b"".join(chunks)
            except OSError as e:
                raise ShardError(url, f"unreadable ({e})") from None
        if len(data) != shard.filesize:
            raise ShardError(url, f"{len(data)}{'+' if len(data) > shard.filesize else ''} bytes, "
                             f"{SHARD_INDEX} lists {shard.filesize}")
        digest = hashlib.sha256(data).hexdigest()
        if digest != shard.sha256:
            raise ShardError(url, f"sha256 {digest} differs from {SHARD_INDEX}")
        raw, check = io.BytesIO(data), False  # verified: parse from memory
    n = 0
    with raw:
        counter = _CountingReader(raw, hash_it=check, limit=limit)
        current: dict[str, Any] | None = None
        try:
            for info, data in tar_members(counter, strict=True, max_member_bytes=max_member_bytes, mode="r|*"):
                key, suffix = base_plus_ext(info.name)
                if key is None:
                    continue  # a name without an extension belongs to no sample
                if len(data) != info.size:
                    raise ShardError(url, f"member {info.name} ends after {len(data)} of {info.size} bytes")
                if current is None or current["__key__"] != key:
                    if current is not None:
                        yield _complete(current, url)
                        n += 1
                    current = {"__key__": key, "__url__": url}
                suffix = suffix.lower()
                if suffix in current:
                    raise ShardError(url, f"duplicate member {info.name}")
                current[suffix] = data
            counter.drain()
        except UnsafeMember as e:
            raise UnsafeMemberError(url, e.name, e.why) from None
        except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
            raise ShardError(url, f"corrupt or truncated after {n} complete samples ({e})") from None
        if current is not None:
            yield _complete(current, url)
            n += 1
    if shard.nsamples is not None and n != shard.nsamples:
        raise ShardError(url, f"ended after {n} of {shard.nsamples} samples listed in {SHARD_INDEX} (truncated?)")
    if shard.filesize is not None and counter.nbytes != shard.filesize:  # over: the limit read one byte more
        raise ShardError(url, f"{counter.nbytes} bytes, {SHARD_INDEX} lists {shard.filesize} (truncated?)")
    if counter.sha is not None and counter.sha.hexdigest() != shard.sha256:
        raise ShardError(url, f"sha256 {counter.sha.hexdigest()} differs from {SHARD_INDEX}")



def describe_version(folder: str | None, filesystem: Any = None, n_shards: int = 0) -> str:
    """Which version a loader reads (dataset@label, content id), from its version.json: a run
    trained on a --limit version, or on yesterday's, says so in its first line of output."""
    what = f"{n_shards} shard(s)"
    if folder is None:
        return f"reading {what} given as URLs (no version folder)"
    try:
        fsys, path = fs_for(folder, as_fsspec(filesystem))
        with fsys.open(join(path, layout.VERSION_FILE), "rb") as f:
            info = json.loads(f.read())
    except (OSError, ValueError):
        return f"reading {what} from {folder} (no version.json)"
    limited = " (a limited --limit run)" if info.get("limited") else ""
    return (f"reading {info.get('dataset', '?')}@{info.get('label', '?')}{limited}, content id "
            f"{(info.get('content_id') or '-')[:12]}, {what} from {folder}")
