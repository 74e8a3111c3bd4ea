"""Feed counterfactory shards to trainers: one record per source, original and counterfactuals together.

Paired objectives (contrastive original-vs-counterfactual losses, pair-wise advantage
normalization, DeFacto-style rewards) need an image and its edited variants in the same batch,
with the answer each variant should get. ``load`` returns a ``PairDataset``, a PyTorch
``IterableDataset`` built on ``webdataset`` (``DataPipeline``, ``shuffle``, ``map``,
``with_epoch``) that yields exactly that, or, with ``flat=True``, one
(image, question, answer, variant) row at a time for plain SFT.

Shards are located and read by ``counterfactory.shards`` (streaming, in memory, nothing
extracted; unsafe members refused, short or corrupt shards raise ``ShardError`` naming the
shard, or are skipped with a warning when ``errors="skip"``); its public names are re-exported
here. This module decodes, resizes and batches.

Epochs are sized from ``shards.json`` (and ``index.parquet`` in flat mode) without opening a tar.
Without resampling every sample is read exactly once per epoch across nodes and DataLoader
workers (shards are split by rank, then by worker). With ``resampled=True`` shards are drawn
with replacement and every rank yields exactly ``samples_per_epoch`` items, so ranks with
uneven shard shares still take the same number of steps and distributed training cannot hang
on a rank that ran out early.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import random
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal

import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from counterfactory import layout
from counterfactory.resize import FITS, decode_image, image_part, resize_frames, to_tensor
from counterfactory.shards import (
    DEFAULT_MAX_MEMBER_BYTES,
    LoaderError,
    Shard,
    ShardError,
    UnsafeMemberError,
    as_fsspec,
    describe_version,
    fs_for,
    join,
    read_shard,
    resolve_shards,
)

__all__ = [
    "LoaderError",
    "PairDataset",
    "Shard",
    "ShardError",
    "UnsafeMemberError",
    "collate_pairs",
    "describe_version",
    "hf_webdataset_args",
    "load",
    "read_shard",
    "resolve_shards",
]

INDEX_PARQUET = layout.INDEX
MASK_PARTS = ("mask", "control_mask")
Transform = Callable[[dict[str, Any]], dict[str, Any]]


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
        self.fs = as_fsspec(filesystem)
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

        fsys, path = fs_for(self.folder, self.fs)
        with fsys.open(join(path, INDEX_PARQUET), "rb") as f:
            table = pq.read_table(f, columns=["shard", "questions", "variants"])
        rows: dict[str, int] = {}
        for shard, qs, vs in zip(*(table.column(c).to_pylist() for c in ("shard", "questions", "variants")),
                                 strict=True):
            chosen = [v for v in vs if self.variants is None or v in self.variants]
            url = join(self.folder, shard)
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
            out[name] = resize_frames(read_frames(data)[0], self.size, mask=False, fit=self.fit)
        if "masks.npz" not in sample:
            raise ShardError(sample["__url__"], f"sample {sample['__key__']} has no masks.npz")
        masks = np.load(io.BytesIO(sample["masks.npz"]))["masks"]
        out["mask"] = resize_frames((masks > 0).astype(np.uint8) * 255, self.size, mask=True, fit=self.fit)
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
            data = image_part(sample, name)
            if data is None:
                if name in ("orig", "mask") or name in present:
                    raise ShardError(sample["__url__"], f"sample {sample['__key__']} has no {name} image")
                continue
            if name == "control_mask" and "random_mask" not in present:
                continue
            mode_images[name] = ("L" if name in MASK_PARTS else "RGB", data)
        images: dict[str, Any] = {n: decode_image(d, m, self.size, self.fit) for n, (m, d) in mode_images.items()}
        if self.decode == "tensor":
            from torchvision import tv_tensors

            images = {n: (tv_tensors.Mask if n in MASK_PARTS else tv_tensors.Image)(
                to_tensor(im, n in MASK_PARTS)) for n, im in images.items()}
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
    - ``check_manifest`` (default True): refuse a version folder whose ``shards.json``,
      ``manifest.json`` and content id (``version.json``) disagree, or that holds a ``.tar`` the
      manifest does not list (``LoaderError``, the content id named); ``False`` reads what
      ``shards.json`` lists without that check (a folder assembled by hand).
    """
    announce = options.pop("announce", True)
    shards, folder = resolve_shards(source, root=root, filesystem=filesystem,
                                    check_manifest=options.pop("check_manifest", True))
    if announce:
        print(f"counterfactory.loader: {describe_version(folder, filesystem, len(shards))}", file=sys.stderr)
    return PairDataset(shards, folder=folder, filesystem=filesystem, **options)


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
    fsys, path = fs_for(folder, as_fsspec(filesystem))
    with fsys.open(join(path, INDEX_PARQUET), "rb") as f:
        per_sample = pq.read_table(f, columns=["variants"]).column("variants").to_pylist()
    with fsys.open(join(path, layout.MANIFEST), "rb") as f:
        parts = json.loads(f.read()).get("counts", {}).get("parts")
    if parts is None:  # datasets written before the manifest listed its parts
        with contextlib.closing(read_shard(shards[0], fs=as_fsspec(filesystem))) as samples:
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
