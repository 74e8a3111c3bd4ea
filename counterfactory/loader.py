"""Feed counterfactory shards to trainers: one record per source, original and counterfactuals together.

Paired objectives (contrastive original-vs-counterfactual losses, pair-wise advantage
normalization, DeFacto-style rewards) need an image and its edited variants in the same batch,
with the answer each variant should get. ``load`` returns a ``PairDataset``, a PyTorch
``IterableDataset`` built on ``webdataset`` (``DataPipeline``, ``shuffle``, ``map``,
``with_epoch``) that yields exactly that, or, with ``flat=True``, one
(image, question, answer, variant) row at a time for plain SFT.

Reading is streaming and in memory: members are read with ``tarfile`` in stream mode straight
from the (fsspec) file object and nothing is ever extracted to disk. The member iterator is
ours rather than webdataset's because webdataset silently skips links and device entries and
cannot tell a shard cut at a member boundary from a complete one; here a link, a device entry,
an absolute name or a ``..`` component is refused (``UnsafeMemberError``), and a short shard
(fewer samples than ``shards.json`` says, a sample missing a part its JSON lists, fewer bytes
than recorded) raises ``ShardError`` naming the shard, or is skipped with a warning when
``errors="skip"``.

Epochs are sized from ``shards.json`` (and ``index.parquet`` in flat mode) without opening a tar.
Without resampling every sample is read exactly once per epoch across nodes and DataLoader
workers (shards are split by rank, then by worker). With ``resampled=True`` shards are drawn
with replacement and every rank yields exactly ``samples_per_epoch`` items, so ranks with
uneven shard shares still take the same number of steps and distributed training cannot hang
on a rank that ran out early.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import random
import stat
import sys
import tarfile
import warnings
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import fsspec
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info
from webdataset.tariterators import base_plus_ext

from counterfactory import layout
from counterfactory.layout import UnsafeMember, tar_members

__all__ = [
    "LoaderError",
    "PairDataset",
    "Shard",
    "ShardError",
    "UnsafeMemberError",
    "collate_pairs",
    "hf_webdataset_args",
    "load",
    "read_shard",
    "resolve_shards",
]

SHARD_INDEX = layout.SHARDS_INDEX
INDEX_PARQUET = layout.INDEX
MASK_PARTS = ("mask", "control_mask")
DEFAULT_MAX_MEMBER_BYTES = 1 << 30  # one member never legitimately approaches this
Transform = Callable[[dict[str, Any]], dict[str, Any]]


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


def _as_fsspec(filesystem: Any) -> fsspec.AbstractFileSystem | None:
    """Accept an fsspec filesystem or a pyarrow one (wrapped), so one code path reads both."""
    if filesystem is None or isinstance(filesystem, fsspec.AbstractFileSystem):
        return filesystem
    import pyarrow.fs as pafs

    if isinstance(filesystem, pafs.FileSystem):
        from fsspec.implementations.arrow import ArrowFSWrapper

        return ArrowFSWrapper(filesystem)
    raise TypeError(f"filesystem must be an fsspec or pyarrow filesystem, not {type(filesystem).__name__}")


def _fs_for(url: str, fs: fsspec.AbstractFileSystem | None) -> tuple[fsspec.AbstractFileSystem, str]:
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


def _join(base: str, name: str) -> str:
    if "://" in name or name.startswith("/"):
        return name
    return base.rstrip("/") + "/" + name


def _split_ref(source: str, root: str | None, fs: fsspec.AbstractFileSystem | None) -> str:
    """``DATASET@VERSION`` -> ``ROOT/DATASET/VERSION`` (``PATH/DATASET@VERSION`` -> that path's
    version; ``DATASET`` alone -> ``ROOT/DATASET``); an existing path is left alone."""
    fsys, path = _fs_for(source, fs)
    if fsys.exists(path):
        return source
    if "@" not in source:  # a bare DATASET name under root: its latest version
        bare = root is not None and "/" not in source and "://" not in source
        return _join(root, source) if bare else source
    name, _, version = source.rpartition("@")
    if not name or not version or "/" in version:
        raise LoaderError(f"{source!r}: expected DATASET@VERSION")
    if "/" not in name and "://" not in name:
        name = _join(root or os.environ.get("COUNTERFACTORY_ROOT") or "outputs", name)
    # `latest` is resolved by _dataset_dir: a file naming the version, or a link/folder
    return name if version == "latest" else _join(name, version)


def _dataset_dir(source: str, root: str | None, fs: fsspec.AbstractFileSystem | None) -> str:
    """The folder holding ``shards.json`` for a path, a ``shards.json`` path, a dataset folder
    whose ``latest`` file (or symlink) names the version, or ``DATASET@VERSION``."""
    source = _split_ref(source, root, fs)
    fsys, path = _fs_for(source, fs)
    if path.endswith(SHARD_INDEX) and fsys.isfile(path):
        return source[: -len(SHARD_INDEX)].rstrip("/") or "/"
    for _ in range(2):  # the folder itself, or the version its `latest` points at
        if fsys.isfile(_join(path, SHARD_INDEX)):
            return source
        latest = _join(path, "latest")
        if fsys.isdir(latest):
            source, path = _join(source, "latest"), latest
        elif fsys.isfile(latest):
            version = fsys.cat_file(latest).decode().strip()
            if not version or "/" in version or version in (".", ".."):
                raise LoaderError(f"{source}: the 'latest' file names no version ({version!r})")
            source, path = _join(source, version), _join(path, version)
        else:
            break
    raise LoaderError(f"{source}: no {SHARD_INDEX} here (nor under a 'latest' version); "
                      "expected a dataset folder written by `counterfactory run`")


def resolve_shards(source: str | os.PathLike[str] | Sequence[str], *, root: str | None = None,
                   filesystem: Any = None) -> tuple[list[Shard], str | None]:
    """Shards of a dataset, and its folder (None for a bare URL list).

    ``source``: a dataset folder (local path, ``file://`` or any fsspec URL), a ``shards.json``
    path, ``DATASET@VERSION`` (resolved as ``ROOT/DATASET/VERSION``; ``root`` defaults to
    ``$COUNTERFACTORY_ROOT`` or ``outputs``), a brace pattern ``x-{000000..000003}.tar``, or a
    list of shard URLs.
    """
    fs = _as_fsspec(filesystem)
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
    return _shard_index(folder, fs), folder


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


def _shard_index(folder: str, fs: fsspec.AbstractFileSystem | None) -> list[Shard]:
    fsys, path = _fs_for(folder, fs)
    where = f"{folder}/{SHARD_INDEX}"
    index_path = _join(path, SHARD_INDEX)
    try:
        _local_regular(fsys, index_path, SHARD_INDEX)
    except ShardError as e:
        raise LoaderError(f"{where}: {e}") from None
    try:
        with fsys.open(index_path, "rb") as f:
            raw = f.read(MAX_SHARD_INDEX_BYTES + 1)
    except OSError as e:
        raise LoaderError(f"{where}: cannot read ({e})") from None
    if len(raw) > MAX_SHARD_INDEX_BYTES:
        raise LoaderError(f"{where}: over {MAX_SHARD_INDEX_BYTES} bytes; not a shard index")
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise LoaderError(f"{where}: not JSON ({type(e).__name__})") from None
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
        shards.append(Shard(_join(folder, url), n, size, sha))
    return shards


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
        fsys, path = _fs_for(url, fs)
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


# -- decoding ------------------------------------------------------------------------------


def _image_part(sample: dict[str, Any], name: str) -> bytes | None:
    for ext in ("jpg", "png", "jpeg", "webp"):
        data = sample.get(f"{name}.{ext}")
        if data is not None:
            return data
    return None


def _decode_image(data: bytes, mode: str, size: tuple[int, int] | None, fit: str = "stretch") -> Image.Image:
    with Image.open(io.BytesIO(data)) as im:
        im = im.convert(mode)
    if size is not None and im.size != (size[1], size[0]):
        # masks stay binary: nearest neighbour; pictures bilinear (PIL antialiases when shrinking)
        resample = Image.Resampling.NEAREST if mode == "L" else Image.Resampling.BILINEAR
        im = _fit_image(im, size, fit, resample)
    return im


# -- aspect-preserving resize (one geometry for a sample's pictures and masks) -----------------
FITS = ("pad", "crop", "stretch")


def _fit_box(w: int, h: int, size: tuple[int, int], fit: str) -> tuple[int, int, int, int]:
    """(scaled width, scaled height, x offset, y offset) of a w x h picture in ``size``
    (height, width): ``pad`` fits it inside (centered, zero borders), ``crop`` covers the size
    and cuts the centre, ``stretch`` ignores the aspect ratio. It depends only on the source
    size, so an original, its variants and its masks get the same geometry (pairs stay aligned)."""
    th, tw = size
    if fit == "stretch":
        return tw, th, 0, 0
    scale = min(tw / w, th / h) if fit == "pad" else max(tw / w, th / h)
    sw, sh = max(1, round(w * scale)), max(1, round(h * scale))
    return sw, sh, (tw - sw) // 2, (th - sh) // 2


def _fit_image(im: Image.Image, size: tuple[int, int], fit: str, resample: Any) -> Image.Image:
    sw, sh, x, y = _fit_box(im.width, im.height, size, fit)
    im = im.resize((sw, sh), resample)
    if (sw, sh) == (size[1], size[0]):
        return im
    canvas = Image.new(im.mode, (size[1], size[0]), 0)
    canvas.paste(im, (x, y))  # pad: at an offset; crop: at a negative offset (the centre stays)
    return canvas


def _resize_frames(frames: Any, size: tuple[int, int] | None, mask: bool, fit: str = "stretch") -> Any:
    """T x H x W (x 3) uint8 frames at ``size`` (height, width): masks nearest, pictures area
    when shrinking and bilinear when growing; ``fit`` as for pictures (``_fit_box``)."""
    import cv2
    import numpy as np

    if size is None or frames.shape[1:3] == tuple(size):
        return frames
    interp = cv2.INTER_NEAREST if mask else (
        cv2.INTER_AREA if size[0] * size[1] < frames.shape[1] * frames.shape[2] else cv2.INTER_LINEAR)
    sw, sh, x, y = _fit_box(frames.shape[2], frames.shape[1], size, fit)
    scaled = np.stack([cv2.resize(f, (sw, sh), interpolation=interp) for f in frames])
    if (sw, sh) == (size[1], size[0]):
        return scaled
    out = np.zeros((frames.shape[0], size[0], size[1], *frames.shape[3:]), dtype=frames.dtype)
    ys, xs = max(0, y), max(0, x)  # destination window
    yo, xo = max(0, -y), max(0, -x)  # source window (crop)
    hh, ww = min(sh - yo, size[0] - ys), min(sw - xo, size[1] - xs)
    out[:, ys:ys + hh, xs:xs + ww] = scaled[:, yo:yo + hh, xo:xo + ww]
    return out


def _to_tensor(im: Image.Image, mask: bool) -> torch.Tensor:
    t = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
    t = t.view(im.height, im.width, len(im.getbands())).permute(2, 0, 1)
    return (t > 127).float() if mask else t.float().div_(255.0)


# -- the dataset -----------------------------------------------------------------------------


class PairDataset(IterableDataset):
    """Counterfactual pairs (or flat SFT rows) streamed from shards; see ``load``."""

    def __init__(self, shards: Sequence[Shard], *, folder: str | None = None, filesystem: Any = None,
                 variants: Sequence[str] | None = None, flat: bool = False,
                 image_size: int | tuple[int, int] | None = None, resize: str = "pad",
                 decode: Literal["tensor", "pil"] = "tensor", transform: Transform | None = None,
                 shuffle: int = 0, seed: int = 0, resampled: bool = False,
                 samples_per_epoch: int | None = None, rank: int | None = None,
                 world_size: int | None = None, errors: Literal["raise", "skip"] = "raise",
                 verify: bool = True, max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES) -> None:
        super().__init__()
        if decode not in ("tensor", "pil"):
            raise ValueError(f"decode must be 'tensor' or 'pil', not {decode!r}")
        if errors not in ("raise", "skip"):
            raise ValueError(f"errors must be 'raise' or 'skip', not {errors!r}")
        if not shards:
            raise LoaderError("no shards")
        self.shards = list(shards)
        self.folder = folder
        self.fs = _as_fsspec(filesystem)
        self.variants = tuple(variants) if variants is not None else None
        if self.variants is not None and "orig" in self.variants:
            raise ValueError("'orig' is always included; variants names the counterfactuals")
        self.flat = flat
        self.size = (image_size, image_size) if isinstance(image_size, int) else image_size
        if resize not in FITS:
            raise ValueError(f"resize must be one of {', '.join(FITS)}, not {resize!r}")
        self.fit = resize
        self.decode = decode
        self.transform = transform
        self.shuffle = shuffle
        self.seed = seed
        self.resampled = resampled
        self.errors = errors
        self.verify = verify
        self.max_member_bytes = max_member_bytes
        self.epoch = 0
        if rank is None or world_size is None:
            rank, world_size, _, _ = wds.utils.pytorch_worker_info()
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.rank, self.world_size = rank, world_size
        self._rows_per_shard: dict[str, int] | None = None
        if resampled and samples_per_epoch is None:
            # one node's share of a full pass, the same on every rank
            samples_per_epoch = math.ceil(self._epoch_total(self.shards) / world_size)
        self.samples_per_epoch = samples_per_epoch

    # epoch sizing ----------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Reseed shard order, shuffle buffer and resampling (call before each epoch; DataLoader
        workers are re-created per epoch unless persistent, so set it before iterating)."""
        self.epoch = epoch

    def node_shards(self) -> list[Shard]:
        """This rank's shards for the current epoch, in the order they will be read."""
        order = list(self.shards)
        if self.shuffle:
            random.Random(f"{self.seed}/{self.epoch}/shards").shuffle(order)
        return order[self.rank::self.world_size]

    def _rows(self, shard: Shard) -> int:
        if not self.flat:
            if shard.nsamples is None:
                raise TypeError("length unknown: shard URLs without shards.json (pass samples_per_epoch with resampled=True)")
            return shard.nsamples
        if self._rows_per_shard is None:
            self._rows_per_shard = self._flat_rows()
        return self._rows_per_shard.get(shard.url, 0)

    def _flat_rows(self) -> dict[str, int]:
        """Rows per shard in flat mode: questions x (orig + chosen variants), from index.parquet."""
        if self.folder is None:
            raise TypeError("length unknown: flat rows are counted from index.parquet, which a bare URL list lacks")
        import pyarrow.parquet as pq

        fsys, path = _fs_for(self.folder, self.fs)
        with fsys.open(_join(path, INDEX_PARQUET), "rb") as f:
            table = pq.read_table(f, columns=["shard", "questions", "variants"])
        rows: dict[str, int] = {}
        for shard, qs, vs in zip(*(table.column(c).to_pylist() for c in ("shard", "questions", "variants")),
                                 strict=True):
            chosen = [v for v in vs if self.variants is None or v in self.variants]
            url = _join(self.folder, shard)
            rows[url] = rows.get(url, 0) + len(qs) * (1 + len(chosen))
        return rows

    def _epoch_total(self, shards: Sequence[Shard]) -> int:
        return sum(self._rows(s) for s in shards)

    def __len__(self) -> int:
        """Items this rank yields per epoch (over all its DataLoader workers)."""
        if self.resampled:
            assert self.samples_per_epoch is not None
            return self.samples_per_epoch
        return self._epoch_total(self.node_shards())

    # iteration ----------------------------------------------------------------------------------
    def _shard_stream(self, worker: int, num_workers: int) -> Iterator[Shard]:
        if not self.resampled:
            yield from self.node_shards()[worker::num_workers]
            return
        rng = random.Random(f"{self.seed}/{self.epoch}/{self.rank}/{worker}/resample")
        while True:
            yield rng.choice(self.shards)

    def _samples(self, shards: Iterator[Shard]) -> Iterator[dict[str, Any]]:
        for shard in shards:
            try:
                yield from read_shard(shard, fs=self.fs, verify=self.verify,
                                      max_member_bytes=self.max_member_bytes)
            except ShardError as e:
                if self.errors == "raise":
                    raise
                warnings.warn(f"skipping the rest of {e}", stacklevel=2)

    def _clips(self, sample: dict[str, Any], present: list[str]) -> dict[str, Any]:
        """A video sample's clips (T x 3 x H x W) and its per-frame evidence masks (T x 1 x H x W)."""
        import numpy as np

        from counterfactory.video_io import read_frames

        out: dict[str, Any] = {}
        for name in ("orig", *present):
            data = sample.get(f"{name}.mp4")
            if data is None:
                raise ShardError(sample["__url__"], f"sample {sample['__key__']} has no {name} clip")
            out[name] = _resize_frames(read_frames(data)[0], self.size, mask=False, fit=self.fit)
        if "masks.npz" not in sample:
            raise ShardError(sample["__url__"], f"sample {sample['__key__']} has no masks.npz")
        masks = np.load(io.BytesIO(sample["masks.npz"]))["masks"]
        out["mask"] = _resize_frames((masks > 0).astype(np.uint8) * 255, self.size, mask=True, fit=self.fit)
        if self.decode == "pil":
            return {n: [Image.fromarray(f) for f in a] for n, a in out.items()}
        from torchvision import tv_tensors

        clip = {n: tv_tensors.Video(torch.from_numpy(a).permute(0, 3, 1, 2).float().div_(255.0))
                for n, a in out.items() if n != "mask"}
        return {**clip, "mask": tv_tensors.Mask(torch.from_numpy(out["mask"] > 127).float().unsqueeze(1))}

    def _record(self, sample: dict[str, Any]) -> dict[str, Any]:
        doc = sample["json"]
        present = [v for v in doc.get("variants", []) if self.variants is None or v in self.variants]
        if "orig.mp4" in sample:  # a clip: the same record, tensors with a time axis first
            images = self._clips(sample, present)
            return self._finish(sample, doc, present, images)
        mode_images: dict[str, tuple[str, bytes]] = {}
        for name in ("orig", *present, *MASK_PARTS):
            data = _image_part(sample, name)
            if data is None:
                if name in ("orig", "mask") or name in present:
                    raise ShardError(sample["__url__"], f"sample {sample['__key__']} has no {name} image")
                continue
            if name == "control_mask" and "random_mask" not in present:
                continue
            mode_images[name] = ("L" if name in MASK_PARTS else "RGB", data)
        images: dict[str, Any] = {n: _decode_image(d, m, self.size, self.fit) for n, (m, d) in mode_images.items()}
        if self.decode == "tensor":
            from torchvision import tv_tensors

            images = {n: (tv_tensors.Mask if n in MASK_PARTS else tv_tensors.Image)(
                _to_tensor(im, n in MASK_PARTS)) for n, im in images.items()}
        return self._finish(sample, doc, present, images)

    def _finish(self, sample: dict[str, Any], doc: dict[str, Any], present: list[str],
                images: dict[str, Any]) -> dict[str, Any]:
        if self.transform is not None:
            images = self.transform(images)
        if self.decode == "tensor":
            images = {n: t.as_subclass(torch.Tensor) for n, t in images.items()}
        shown = ("orig", *present)
        qa = [{"question": q["question"], "kind": q.get("kind"), "targets": q.get("targets", []),
               "answers": {v: q["answers"][v] for v in shown if v in q.get("answers", {})}}
              for q in doc.get("qa", [])]
        return {"key": sample["__key__"], "url": sample["__url__"], "orig": images["orig"],
                "variants": {v: images[v] for v in present}, "mask": images["mask"],
                "control_mask": images.get("control_mask"), "qa": qa, "meta": doc}

    @staticmethod
    def _rows_of(records: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for r in records:
            for v in ("orig", *r["variants"]):
                image = r["orig"] if v == "orig" else r["variants"][v]
                for i, q in enumerate(r["qa"]):
                    if v in q["answers"]:
                        yield {"key": r["key"], "image": image, "question": q["question"],
                               "answer": q["answers"][v], "variant": v, "kind": q["kind"], "qa_index": i}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        salt = f"{self.seed}/{self.epoch}/{self.rank}/{worker}"
        stages: list[Any] = [lambda: self._shard_stream(worker, num_workers), self._samples]
        if self.shuffle:
            stages.append(wds.shuffle(self.shuffle, initial=min(self.shuffle, 100),
                                      rng=random.Random(salt + "/samples")))
        stages.append(wds.map(self._record))
        if self.flat:
            stages.append(self._rows_of)
            if self.shuffle:
                stages.append(wds.shuffle(self.shuffle, initial=min(self.shuffle, 100),
                                          rng=random.Random(salt + "/rows")))
        pipeline = wds.DataPipeline(*stages)
        if self.resampled:
            assert self.samples_per_epoch is not None
            per, extra = divmod(self.samples_per_epoch, num_workers)
            pipeline = pipeline.with_epoch(per + (1 if worker < extra else 0))
        return iter(pipeline)


def load(source: str | os.PathLike[str] | Sequence[str], *, root: str | None = None, filesystem: Any = None,
         **options: Any) -> PairDataset:
    """Open a dataset version for training.

    ``source``: see ``resolve_shards`` (folder, ``DATASET@VERSION`` with ``root=``, a folder
    with a ``latest`` version, brace pattern or list of URLs; local, ``file://`` or any fsspec
    URL, or paths on an fsspec/pyarrow ``filesystem``). Options (``PairDataset``):

    - ``variants``: counterfactuals to include (default: all a sample has); orig always comes.
    - ``image_size`` (int or (height, width)): resize pictures (bilinear) and masks (nearest);
      ``resize="pad"`` (default) keeps the aspect ratio inside zero borders, ``"crop"`` fills the
      size and cuts the centre, ``"stretch"`` ignores the aspect ratio.
    - ``decode``: ``"tensor"`` (float32 CHW in [0, 1]; masks float32 1xHxW of 0/1) or ``"pil"``.
      A video dataset gives clips: ``tv_tensors.Video`` of T x 3 x H x W and masks T x 1 x H x W
      (a list of PIL frames with ``"pil"``); frame times and fps are in ``meta["source"]``, and a
      batch of clips needs equal frame counts (the ingest stage's ``max_frames``).
    - ``transform``: called once per record with ``{"orig", VARIANT..., "mask", "control_mask"}``;
      in tensor mode pictures are ``tv_tensors.Image`` and masks ``tv_tensors.Mask``, so one
      ``torchvision.transforms.v2`` call applies the same random draw to all of them (pairs stay
      aligned) and keeps masks binary.
    - ``shuffle``: buffer size (0: shard order, samples in order); ``seed``; ``set_epoch(e)``.
    - ``resampled`` + ``samples_per_epoch``: draw shards with replacement, fixed epoch length.
    - ``rank``/``world_size``: node split (default: torch.distributed or $RANK/$WORLD_SIZE).
    - ``flat``: one ``{"image", "question", "answer", "variant", "kind", "key", "qa_index"}`` row
      per variant x question.
    - ``errors="skip"``: warn and skip the rest of a missing/truncated/corrupt shard.
    - ``verify`` (default True): check each shard's sha256 against ``shards.json`` before its
      samples are used; ``verify=False`` for trusted storage (see BENCHMARKS.md for the cost).
    """
    announce = options.pop("announce", True)
    shards, folder = resolve_shards(source, root=root, filesystem=filesystem)
    if announce:
        print(f"counterfactory.loader: {describe_version(folder, filesystem, len(shards))}", file=sys.stderr)
    return PairDataset(shards, folder=folder, filesystem=filesystem, **options)


def describe_version(folder: str | None, filesystem: Any = None, n_shards: int = 0) -> str:
    """Which version a loader reads (dataset@label, content id), from its version.json: a run
    trained on a --limit version, or on yesterday's, says so in its first line of output."""
    what = f"{n_shards} shard(s)"
    if folder is None:
        return f"reading {what} given as URLs (no version folder)"
    try:
        fsys, path = _fs_for(folder, _as_fsspec(filesystem))
        with fsys.open(_join(path, layout.VERSION_FILE), "rb") as f:
            info = json.loads(f.read())
    except (OSError, ValueError):
        return f"reading {what} from {folder} (no version.json)"
    limited = " (a limited --limit run)" if info.get("limited") else ""
    return (f"reading {info.get('dataset', '?')}@{info.get('label', '?')}{limited}, content id "
            f"{(info.get('content_id') or '-')[:12]}, {what} from {folder}")


def hf_webdataset_args(source: str | os.PathLike[str], *, root: str | None = None, filesystem: Any = None,
                       split: str = "train") -> dict[str, Any]:
    """Keyword arguments for ``datasets.load_dataset("webdataset", **args, split=split)``.

    Hugging Face infers the columns from the first few samples of the first shard and refuses
    a dataset whose samples differ, which ours do when a variant was rejected for some samples.
    Passing the full schema (every variant any sample has, ``json`` as ``Json``) fixes that;
    missing variants then read as None.
    """
    import pyarrow.parquet as pq
    from datasets import Features, Value
    from datasets import Image as HFImage

    try:
        from datasets import Json
    except ImportError as e:  # Json arrived in datasets 4
        raise ImportError("hf_webdataset_args needs datasets>=4 (the Json feature)") from e
    shards, folder = resolve_shards(source, root=root, filesystem=filesystem)
    if folder is None:
        raise LoaderError("hf_webdataset_args needs a dataset folder (it reads index.parquet), not shard URLs")
    fsys, path = _fs_for(folder, _as_fsspec(filesystem))
    with fsys.open(_join(path, INDEX_PARQUET), "rb") as f:
        per_sample = pq.read_table(f, columns=["variants"]).column("variants").to_pylist()
    with fsys.open(_join(path, layout.MANIFEST), "rb") as f:
        parts = json.loads(f.read()).get("counts", {}).get("parts")
    if parts is None:  # datasets written before the manifest listed its parts
        with contextlib.closing(read_shard(shards[0], fs=_as_fsspec(filesystem))) as samples:
            first = next(samples)
        ext = next(p.split(".", 1)[1] for p in first if p.startswith("orig."))
        variants = sorted({v for vs in per_sample for v in vs})
        parts = [f"{n}.{ext}" for n in ("orig", *variants)] + ["mask.png", "json"]
        if "random_mask" in variants:
            parts.append("control_mask.png")
    image_ext = ("jpg", "jpeg", "png", "webp")
    features = Features({
        "__key__": Value("string"), "__url__": Value("string"),
        **{p: (Json() if p == "json" else HFImage() if p.rsplit(".", 1)[-1] in image_ext else Value("binary"))
           for p in sorted(parts)},
    })
    return {"data_files": {split: [s.url for s in shards]}, "features": features}


def collate_pairs(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Batch pair records for a DataLoader. Variants a sample lacks are zero images with
    ``present[variant] = False``, so batches stay rectangular and a loss can mask them out."""
    if not records or not isinstance(records[0]["orig"], torch.Tensor):
        raise TypeError("collate_pairs needs decode='tensor' records")
    shapes = {tuple(r["orig"].shape) for r in records}
    if len(shapes) > 1:
        raise ValueError(f"images of different sizes {sorted(shapes)}: pass image_size= to load()")
    names = sorted({v for r in records for v in r["variants"]})
    orig = torch.stack([r["orig"] for r in records])
    mask = torch.stack([r["mask"] for r in records])
    blank, blank_mask = torch.zeros_like(orig[0]), torch.zeros_like(mask[0])
    return {
        "key": [r["key"] for r in records],
        "orig": orig,
        "mask": mask,
        "variants": {v: torch.stack([r["variants"].get(v, blank) for r in records]) for v in names},
        "present": {v: torch.tensor([v in r["variants"] for r in records]) for v in names},
        "control_mask": torch.stack([blank_mask if r["control_mask"] is None else r["control_mask"]
                                     for r in records]),
        "qa": [r["qa"] for r in records],
    }
