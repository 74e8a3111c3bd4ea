"""Where datasets live: a local folder, or a folder on an object store named by a URI.

An output root is either a local path (``file://`` accepted) or a filesystem URI that
``pyarrow.fs.FileSystem.from_uri`` understands (``s3://bucket/prefix``, ``gs://``, ``hdfs://``,
``abfs://``; credentials and endpoints come from the usual environment, e.g. ``AWS_PROFILE``,
``AWS_ENDPOINT_URL`` for MinIO, or query parameters such as ``?region=``). Schemes pyarrow does
not know are opened with fsspec (``memory://``, or any installed fsspec implementation) and
wrapped as a pyarrow filesystem, so the rest of the code sees one interface.

Writing to an object store: each shard's writing task puts its shard, pair shard and journal
entry into the spec's staging prefix on the store as it finishes (``pipeline/remote_shards.py``);
at publish the shards are copied server-side into the version's folder and ``RemoteDir.upload``
sends the small files, the commit marker (``version.json``) last, so a reader never takes a
half-uploaded version for a complete one. Single-object PUTs are atomic on every object store;
renames are not, which is why nothing is renamed remotely.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.resources
import os
import shutil
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

import pyarrow as pa
import pyarrow.fs as pafs

from counterfactory.layout import MANIFEST, Folder, LocalDir, mirrored, sha256_file

COPY_CHUNK = 8 << 20
HTTP_CONNECT_TIMEOUT_S = 15
HTTP_READ_TIMEOUT_S = 60


def read_parquet(source: Any, columns: list[str] | None = None) -> pa.Table:
    """A small parquet file (index, rejects) read without starting Arrow's thread pools.

    ``pq.read_table`` goes through the dataset API, which starts Arrow's CPU and I/O pools even
    with ``use_threads=False``; when a short command (``verify``, ``card``) exits, those C++
    threads are torn down by static destructors and, a few percent of the time, a still-joinable
    ``std::thread`` aborts the process ("terminate called without an active exception", exit
    -6; more often with OpenCV loaded). ``ParquetFile.read`` with threads and pre-buffering off
    starts none, and these files are small enough that threads gain nothing."""
    import pyarrow.parquet as pq

    return pq.ParquetFile(source, pre_buffer=False).read(columns=columns, use_threads=False)


class ObjectTooLarge(Exception):
    """An input object over the size its reader allows."""


class StorageError(RuntimeError):
    """An object-store root that cannot be opened or read; reported as one line by the CLI."""


def is_remote(root: str | os.PathLike[str]) -> bool:
    """True for a filesystem URI other than ``file://`` (a local path is never remote)."""
    s = os.fspath(root)
    return "://" in s and not s.startswith("file://")


def local_path(root: str | os.PathLike[str]) -> Path:
    s = os.fspath(root)
    return Path(s[len("file://"):] if s.startswith("file://") else s).expanduser()


def join_uri(uri: str, *parts: str) -> str:
    """Append path parts to a URI, keeping its query (``s3://b/p?region=x`` + ``d`` ->
    ``s3://b/p/d?region=x``)."""
    u = urlsplit(uri)
    path = "/".join([u.path.rstrip("/"), *(p.strip("/") for p in parts if p)])
    return urlunsplit((u.scheme, u.netloc, path, u.query, u.fragment))


def open_filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path inside it) for a URI: pyarrow's own filesystems first, then
    any fsspec implementation wrapped in ``PyFileSystem``."""
    try:
        return pafs.FileSystem.from_uri(uri)
    except (pa.ArrowInvalid, ValueError, pa.ArrowNotImplementedError) as arrow_exc:
        try:
            import fsspec

            options: dict[str, Any] = {}
            if urlsplit(uri).scheme.lower() in ("http", "https"):
                import aiohttp

                # aiohttp waits 5 minutes by default: a dead host must not hold a worker that long
                options["client_kwargs"] = {"timeout": aiohttp.ClientTimeout(total=None, connect=HTTP_CONNECT_TIMEOUT_S,
                                                                             sock_read=HTTP_READ_TIMEOUT_S)}
            fs, path = fsspec.core.url_to_fs(uri, **options)
        except (ImportError, ValueError) as exc:
            raise StorageError(f"{uri}: cannot open this filesystem URI ({arrow_exc}; fsspec: {exc})") from None
        return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path.rstrip("/")
    except OSError as exc:
        raise StorageError(f"{uri}: {exc}") from None


# -- input objects: images and clips named by URI -------------------------------------------
@functools.lru_cache(maxsize=32)
def _bucket(scheme: str, netloc: str, query: str) -> tuple[pafs.FileSystem, str]:
    """One filesystem per bucket (or host), opened once per process: opening an S3 filesystem
    may ask the endpoint for the bucket's region, which must not happen once per image."""
    fs, root = open_filesystem(urlunsplit((scheme, netloc, "/", query, "")))
    return fs, root.rstrip("/")


def _object(uri: str) -> tuple[pafs.FileSystem, str]:
    u = urlsplit(uri)
    scheme = u.scheme.lower()
    if scheme in ("http", "https"):  # fsspec's HTTP filesystem names objects by their whole URL
        return _bucket(scheme, u.netloc, "")[0], uri
    fs, root = _bucket(scheme, u.netloc, u.query)  # the query holds filesystem options (?region=)
    return fs, f"{root}/{unquote(u.path).lstrip('/')}"


def object_info(uri: str) -> pafs.FileInfo:
    """Metadata of one object named by URI (``s3://b/k.jpg``, ``gs://``, ``https://`` through
    fsspec, ...). Raises StorageError for a scheme nothing here opens, OSError otherwise."""
    fs, path = _object(uri)
    return fs.get_file_info(path)


class FetchError(OSError):
    """A web object that could not be fetched (host unreachable, refused, an HTTP error other
    than 404/410): not the same as an object that is not there."""


def _http_missing_or_unreachable(uri: str) -> None:
    """fsspec's HTTP filesystem reports every failure as "not found"; one HEAD request tells a
    404 (FileNotFoundError) from a host that cannot be reached or refuses (FetchError)."""
    import urllib.error
    import urllib.request

    req = urllib.request.Request(uri, method="HEAD")
    try:
        with urllib.request.urlopen(req, timeout=HTTP_CONNECT_TIMEOUT_S):  # noqa: S310 - http(s) only
            pass
    except urllib.error.HTTPError as exc:
        if exc.code in (404, 410):
            raise FileNotFoundError(uri) from None
        raise FetchError(f"{uri}: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise FetchError(f"{uri}: unreachable ({reason})") from None
    raise FileNotFoundError(uri)  # HEAD answers but the filesystem found nothing


def read_object(uri: str, max_bytes: int | None = None) -> bytes:
    """The bytes of one input object. FileNotFoundError when absent, FetchError when a web
    host cannot be reached, IsADirectoryError for a prefix, ObjectTooLarge over ``max_bytes``;
    StorageError for a scheme nothing here opens."""
    fs, path = _object(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        if urlsplit(uri).scheme.lower() in ("http", "https"):
            _http_missing_or_unreachable(uri)
        raise FileNotFoundError(uri)
    if info.type != pafs.FileType.File:
        raise IsADirectoryError(uri)
    if max_bytes is not None and info.size is not None and info.size > max_bytes:
        raise ObjectTooLarge(f"{uri}: {info.size} bytes > {max_bytes}")
    with fs.open_input_stream(path) as f:
        return f.read()


class RemoteDir(Folder):
    """A folder on a (pyarrow) filesystem, all by name relative to the folder. Its local
    stand-in (``workdir``) is a working folder under ``cache_dir()``; a child's is its parent's
    child, so a version's mirror lies in its dataset's working folder however it was found."""

    is_local = False

    def __init__(self, uri: str, fs: pafs.FileSystem | None = None, path: str | None = None,
                 local: Path | None = None) -> None:
        self.uri = uri
        if fs is None or path is None:
            fs, path = open_filesystem(uri)
        if not path.strip("/"):
            raise StorageError(f"{uri}: names no bucket or folder")
        self.fs, self.path = fs, path.rstrip("/")
        self._local = local

    def __repr__(self) -> str:
        return f"RemoteDir({self.uri!r})"

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    @property
    def parent_name(self) -> str:
        return PurePosixPath(urlsplit(self.uri).path).parent.name

    def child(self, name: str) -> RemoteDir:
        return RemoteDir(join_uri(self.uri, name), self.fs, f"{self.path}/{name.strip('/')}",
                         self.workdir() / name)

    def parent(self) -> RemoteDir:
        u = urlsplit(self.uri)
        return RemoteDir(urlunsplit((u.scheme, u.netloc, u.path.rstrip("/").rpartition("/")[0], u.query, u.fragment)))

    def workdir(self) -> Path:
        return self._local if self._local is not None else local_workdir(self.uri)

    def mirror(self, content_id: str | None) -> Path:
        """Download the ``mirrored`` files, ``manifest.json`` last: a mirror is taken as
        complete only when its manifest matches the content id (versions never change)."""
        mirror = self.workdir()
        if content_id and (mirror / MANIFEST).is_file() and sha256_file(mirror / MANIFEST) == content_id:
            return mirror
        names = [n for n, is_dir, _ in self.list(recursive=True) if not is_dir and mirrored(n)]
        self.download([n for n in names if n != MANIFEST], mirror)
        self.download([MANIFEST], mirror)
        return mirror

    def _p(self, rel: str) -> str:
        return f"{self.path}/{rel}" if rel else self.path

    # -- reading -------------------------------------------------------------------------------
    def sizes(self, rels: Sequence[str]) -> dict[str, int | None]:
        """Size of each named file; None where it is missing (one batched metadata call)."""
        infos = self.fs.get_file_info([self._p(r) for r in rels])
        return {r: (i.size if i.type == pafs.FileType.File else None) for r, i in zip(rels, infos, strict=True)}

    def exists(self, rel: str = "") -> bool:
        return self.fs.get_file_info(self._p(rel)).type != pafs.FileType.NotFound

    def list(self, rel: str = "", recursive: bool = False) -> list[tuple[str, bool, int]]:
        """(name relative to this folder, is_dir, size) of its entries; [] when it is absent."""
        base = self._p(rel)
        sel = pafs.FileSelector(base, allow_not_found=True, recursive=recursive)
        out = []
        for i in self.fs.get_file_info(sel):
            name = i.path[len(self.path):].lstrip("/")
            out.append((name, i.type == pafs.FileType.Directory, i.size or 0))
        return sorted(out)

    def read_bytes(self, rel: str) -> bytes:
        with self.fs.open_input_stream(self._p(rel)) as f:
            return f.read()

    def read_pointer(self, rel: str) -> str | None:
        try:
            return self.read_text(rel)
        except OSError:  # FileNotFoundError, or a store that cannot be read: listed instead
            return None

    def open(self, rel: str) -> Any:
        return self.fs.open_input_file(self._p(rel))

    def sha256(self, rel: str) -> str:
        h = hashlib.sha256()
        with self.fs.open_input_stream(self._p(rel)) as f:
            while chunk := f.read(COPY_CHUNK):
                h.update(chunk)
        return h.hexdigest()

    # -- writing -------------------------------------------------------------------------------
    def write_bytes(self, rel: str, data: bytes) -> None:
        """One PUT: readers see the old object or the new one, never a part."""
        with self.fs.open_output_stream(self._p(rel)) as f:
            f.write(data)

    def create(self, rel: str, data: bytes) -> None:
        self.write_bytes(rel, data)

    def delete(self, rel: str) -> None:
        self.fs.delete_file(self._p(rel))

    def _upload_file(self, src: Path, rel: str) -> None:
        with open(src, "rb") as fin, self.fs.open_output_stream(self._p(rel)) as fout:
            shutil.copyfileobj(fin, fout, COPY_CHUNK)

    def put(self, src: Path, rel: str) -> None:
        """One local file to ``rel`` (one PUT, or a multipart upload completed at once)."""
        self._upload_file(src, rel)

    def copy(self, src_rel: str, dst_rel: str) -> None:
        """A server-side copy inside this folder (S3 CopyObject): no byte passes through here."""
        self.fs.copy_file(self._p(src_rel), self._p(dst_rel))

    def delete_tree(self, rel: str) -> None:
        """``rel`` and everything under it (nothing when it is absent)."""
        try:
            self.fs.delete_dir(self._p(rel))
        except FileNotFoundError:
            pass

    def upload(self, local_dir: Path, rel: str, *, last: Sequence[str] = (),
               skip: Iterable[str] = (), threads: int = 8) -> list[str]:
        """Copy ``local_dir`` to ``rel`` (files in parallel, then ``last`` in order), check
        every uploaded size, and return the uploaded names (relative to ``local_dir``)."""
        skip = set(skip)
        names = sorted(p.relative_to(local_dir).as_posix() for p in local_dir.rglob("*")
                       if p.is_file() and not any(part in skip for part in p.relative_to(local_dir).parts))
        first = [n for n in names if n not in last]
        self.fs.create_dir(self._p(rel), recursive=True)
        with ThreadPoolExecutor(max_workers=threads) as pool:
            list(pool.map(lambda n: self._upload_file(local_dir / n, f"{rel}/{n}"), first))
        for n in last:
            if (local_dir / n).is_file():
                self._upload_file(local_dir / n, f"{rel}/{n}")
        uploaded = first + [n for n in last if (local_dir / n).is_file()]
        got = self.sizes([f"{rel}/{n}" for n in uploaded])
        bad = [n for n in uploaded if got[f"{rel}/{n}"] != (local_dir / n).stat().st_size]
        if bad:
            raise StorageError(f"{join_uri(self.uri, rel)}: {len(bad)} file(s) did not arrive whole, e.g. {bad[0]}")
        return uploaded

    def download(self, rels: Sequence[str], dest: Path, threads: int = 8) -> None:
        """Fetch the named files into ``dest`` (each written to a temporary name, then renamed)."""
        def one(rel: str) -> None:
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.{os.getpid()}.part")  # two readers may mirror at once
            with self.fs.open_input_stream(self._p(rel)) as fin, open(tmp, "wb") as fout:
                shutil.copyfileobj(fin, fout, COPY_CHUNK)
            os.replace(tmp, target)

        with ThreadPoolExecutor(max_workers=threads) as pool:
            list(pool.map(one, rels))


def open_dir(where: str | os.PathLike[str] | Folder) -> Folder:
    """The folder object for a path or URI: the one place that decides where a folder lives. A
    filesystem URI other than ``file://`` is a folder on its object store, anything else a
    folder of this machine; a folder object comes back as it is."""
    if isinstance(where, Folder):
        return where
    if is_remote(where):
        return RemoteDir(os.fspath(where))
    return LocalDir(local_path(where))


def cache_dir() -> Path:
    """Local working space for object-store roots (staging of runs, mirrors of version
    metadata): ``$COUNTERFACTORY_CACHE`` or ``~/.cache/counterfactory``."""
    return Path(os.environ.get("COUNTERFACTORY_CACHE") or Path.home() / ".cache" / "counterfactory")


def local_workdir(uri: str) -> Path:
    """The local folder that stands in for an object-store dataset root on this machine."""
    key = hashlib.sha256(uri.rstrip("/").encode()).hexdigest()[:16]
    return cache_dir() / "remote" / key


def resolve_path(path: str, base: Path | None) -> Path:
    """Resolve ``pkg:PACKAGE/rel/path`` or a path relative to ``base`` (the config's folder)."""
    if path.startswith("pkg:"):
        package, _, rel = path[4:].partition("/")
        try:
            root = importlib.resources.files(package)
        except ModuleNotFoundError as exc:
            raise ValueError(f"package {package!r} is not installed") from exc
        return Path(str(root.joinpath(rel)))
    p = Path(path).expanduser()
    if not p.is_absolute() and base is not None:
        p = base / p
    return p
