"""The trainer-facing loader, and every popular reader, on datasets written by the pipeline.

Two datasets are built once per module with the in-process runner: procedural scenes (22
samples, shards of 5/5/5/5/2, every variant present) and the demo photographs (9 samples,
shards of 4/4/1, random_mask missing for some), so uneven shards and missing variants are
always exercised.
"""

from __future__ import annotations

import importlib.util
import io
import json
import math
import os
import shutil
import tarfile
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from counterfactory.index import answers_of
from counterfactory.loader import (
    LoaderError,
    ShardError,
    UnsafeMemberError,
    collate_pairs,
    hf_webdataset_args,
    load,
    resolve_shards,
)
from counterfactory.pipeline.config import load_config
from counterfactory.pipeline.runner import run_pipeline
from tests.conftest import LENIENT_FOOTPRINT, REPO, make_config, scenes_input


@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("scenes")
    cfg = make_config(tmp, [scenes_input(11, questions=2)], output={"shard_size": 5})
    # the same members in every sample (readers that infer one schema need nothing more);
    # the photos fixture below has the full, per-sample-varying taxonomy
    cfg.stage("edit").set_params(variants=["remove", "blackout", "random_mask"])
    return run_pipeline(cfg, local=True, progress=False).out_dir


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("photos")
    cfg = load_config(REPO / "configs" / "demo.yaml", [f"output.root={tmp}", "output.shard_size=4", *LENIENT_FOOTPRINT])
    return run_pipeline(cfg, limit=12, local=True, progress=False).out_dir


def index_rows(folder: Path) -> list[dict[str, Any]]:
    return pq.read_table(folder / "index.parquet").to_pylist()


def shard_urls(folder: Path) -> list[str]:
    doc = json.loads((folder / "shards.json").read_text())
    return [str(folder / s["url"]) for s in doc["shardlist"]]


# -- records ------------------------------------------------------------------------------


def test_pair_records_match_the_index(photos: Path) -> None:
    rows = index_rows(photos)
    assert any("random_mask" not in r["variants"] for r in rows)  # the fixture really mixes
    records = list(load(photos, image_size=(40, 48)))
    assert [r["key"] for r in records] == [r["key"] for r in rows]
    for rec, row in zip(records, rows, strict=True):
        assert list(rec["variants"]) == row["variants"]
        assert rec["orig"].shape == (3, 40, 48) and rec["orig"].dtype == torch.float32
        assert 0.0 <= rec["orig"].min() and rec["orig"].max() <= 1.0
        assert set(rec["mask"].unique().tolist()) <= {0.0, 1.0} and rec["mask"].shape == (1, 40, 48)
        assert (rec["control_mask"] is None) == ("random_mask" not in row["variants"])
        assert [q["answers"] for q in rec["qa"]] == answers_of(row["answers"])
        assert [q["question"] for q in rec["qa"]] == row["questions"]
        assert Path(rec["url"]).name == row["shard"]


def test_variant_choice_and_pil_decoding(photos: Path) -> None:
    n = 0
    for rec in load(photos, variants=["remove"], decode="pil"):
        if not rec["variants"]:  # chelsea: kept since issue 16 for its other variants, no remove
            continue
        n += 1
        assert list(rec["variants"]) == ["remove"] and rec["control_mask"] is None
        assert all(set(q["answers"]) == {"orig", "remove"} for q in rec["qa"])
        src = rec["meta"]["source"]
        assert isinstance(rec["orig"], Image.Image) and rec["orig"].size == (src["width"], src["height"])
        assert rec["orig"].mode == "RGB" and rec["mask"].mode == "L"
        assert rec["variants"]["remove"].size == rec["orig"].size
    assert n >= 9
    with pytest.raises(ValueError, match="orig"):
        load(photos, variants=["orig", "remove"])


def test_collate_pairs_marks_missing_variants(photos: Path) -> None:
    records = list(load(photos, image_size=32))
    batch = collate_pairs(records)
    assert batch["orig"].shape == (len(records), 3, 32, 32)
    assert set(batch["variants"]) == {v for r in records for v in r["variants"]} >= {"remove", "blackout"}
    present = batch["present"]["random_mask"].tolist()
    assert present == ["random_mask" in r["variants"] for r in records] and not all(present)
    missing = [i for i, p in enumerate(present) if not p]
    assert batch["variants"]["random_mask"][missing].abs().sum() == 0
    with pytest.raises(ValueError, match="image_size"):
        collate_pairs(list(load(photos)))  # the photos differ in size


def test_transform_sees_the_whole_record(scenes: Path) -> None:
    from torchvision.transforms import v2

    base = {r["key"]: r for r in load(scenes, image_size=32)}
    torch.manual_seed(0)
    flips = Counter()
    for rec in load(scenes, image_size=32, transform=v2.RandomHorizontalFlip(p=0.5)):
        b = base[rec["key"]]
        if torch.equal(b["mask"], b["mask"].flip(-1)):
            continue  # a symmetric mask cannot tell whether the record was flipped
        flipped = torch.equal(rec["mask"], b["mask"].flip(-1))
        assert flipped or torch.equal(rec["mask"], b["mask"])
        flips[flipped] += 1
        same = (lambda t: t.flip(-1)) if flipped else (lambda t: t)
        assert torch.equal(rec["orig"], same(b["orig"]))
        for v, t in rec["variants"].items():  # one random draw for the original and its variants
            assert torch.equal(t, same(b["variants"][v])), v
        assert torch.equal(rec["control_mask"], same(b["control_mask"]))
    assert flips[True] and flips[False]
    for rec in load(scenes, image_size=32, transform=v2.ColorJitter(brightness=(1.5, 1.5))):
        b = base[rec["key"]]
        assert torch.equal(rec["mask"], b["mask"])  # masks are Mask tv_tensors: never color-jittered
        assert not torch.equal(rec["orig"], b["orig"])


def test_flat_rows_for_sft(photos: Path) -> None:
    ds = load(photos, flat=True, variants=["remove"], image_size=24)
    answers = {r["key"]: answers_of(r["answers"]) for r in index_rows(photos)}
    has_remove = {r["key"]: "remove" in r["variants"] for r in index_rows(photos)}  # not chelsea (issue 16)
    rows = list(ds)
    assert len(rows) == len(ds) == sum((1 + has_remove[k]) * len(a) for k, a in answers.items())
    seen = Counter((r["key"], r["variant"], r["qa_index"]) for r in rows)
    assert max(seen.values()) == 1 and {v for _, v, _ in seen} == {"orig", "remove"}
    for r in rows:
        assert r["answer"] == answers[r["key"]][r["qa_index"]][r["variant"]]
        assert r["image"].shape == (3, 24, 24)
    full = load(photos, flat=True)
    assert len(full) == sum(1 for _ in full)


# -- references -----------------------------------------------------------------------------


def test_every_reference_form_reads_the_same_samples(scenes: Path, tmp_path: Path) -> None:
    import fsspec
    import pyarrow.fs as pafs

    keys = [r["key"] for r in index_rows(scenes)]
    root = tmp_path / "root"
    shutil.copytree(scenes, root / "demo" / "v1")
    os.symlink("v1", root / "demo" / "latest")
    other = tmp_path / "other"
    shutil.copytree(scenes, other / "demo" / "v7")
    (other / "demo" / "latest").write_text("v7\n")  # for filesystems without symlinks
    mem = fsspec.filesystem("memory")
    for f in (p for p in scenes.iterdir() if p.is_file()):
        mem.pipe(f"/loader-test/{f.name}", f.read_bytes())
    urls = shard_urls(scenes)
    sources: dict[str, Any] = {
        "folder": (str(scenes), {}),
        "file url": (scenes.as_uri(), {}),
        "shards.json": (str(scenes / "shards.json"), {}),
        "name@version": ("demo@v1", {"root": str(root)}),
        "name@latest": ("demo@latest", {"root": str(root)}),
        "latest symlink": (str(root / "demo"), {}),
        "latest file": (str(other / "demo"), {}),
        "pipeline layout": (str(scenes.parent), {}),
        "pipeline name@latest": ("demo@latest", {"root": str(scenes.parent.parent)}),
        "pipeline name": ("demo", {"root": str(scenes.parent.parent)}),
        "path@version": (f"{scenes.parent}@{scenes.name}", {}),
        "fsspec memory": ("memory://loader-test", {}),
        "pyarrow fs": (str(scenes), {"filesystem": pafs.LocalFileSystem()}),
        "url list": (urls, {}),
        "braces": (str(scenes / "demo-{000000..000004}.tar"), {}),
    }
    try:
        for name, (src, kw) in sources.items():
            ds = load(src, decode="pil", **kw)
            assert [r["key"] for r in ds] == keys, name
            if not isinstance(src, list) and "{" not in src:
                assert len(ds) == len(keys), name
    finally:
        mem.rm("/loader-test", recursive=True)
    with pytest.raises(TypeError, match="shards.json"):
        len(load(urls))
    with pytest.raises(LoaderError, match="no shards.json"):
        load(tmp_path)
    with pytest.raises(LoaderError, match="no shards.json"):
        load("demo@v2", root=str(root))


# -- epochs, workers, nodes ------------------------------------------------------------------


def test_dataloader_two_workers_each_sample_once_per_epoch(scenes: Path) -> None:
    keys = sorted(r["key"] for r in index_rows(scenes))
    ds = load(scenes, image_size=32, shuffle=8, seed=3)
    loader = DataLoader(ds, batch_size=4, num_workers=2, collate_fn=collate_pairs)
    assert len(ds) == len(keys) == 22 and len(loader) == math.ceil(22 / 4)
    orders = []
    for epoch in range(2):
        ds.set_epoch(epoch)
        seen = [k for batch in loader for k in batch["key"]]
        assert sorted(seen) == keys, f"epoch {epoch}"
        orders.append(seen)
    assert orders[0] != orders[1]  # the shuffle is reseeded per epoch
    flat = load(scenes, flat=True, image_size=16)
    rows = [(k, v, int(i)) for b in DataLoader(flat, batch_size=16, num_workers=2)
            for k, v, i in zip(b["key"], b["variant"], b["qa_index"], strict=True)]
    assert len(rows) == len(set(rows)) == len(flat)


@pytest.mark.parametrize("world_size", [2, 3])
def test_split_by_node_covers_every_sample_once(scenes: Path, world_size: int) -> None:
    keys = sorted(r["key"] for r in index_rows(scenes))
    per_rank = [load(scenes, decode="pil", shuffle=4, rank=r, world_size=world_size) for r in range(world_size)]
    seen = [[rec["key"] for rec in ds] for ds in per_rank]
    assert sorted(k for s in seen for k in s) == keys
    assert [len(ds) for ds in per_rank] == [len(s) for s in seen]  # len() is exact per rank


def test_resampled_epochs_have_a_fixed_length_on_every_rank(scenes: Path) -> None:
    # shards of 5/5/5/5/2 on 2 ranks: without resampling the ranks get 12 and 10 samples
    plain = [load(scenes, rank=r, world_size=2) for r in range(2)]
    assert [len(d) for d in plain] == [12, 10]
    for rank in range(2):
        ds = load(scenes, image_size=16, rank=rank, world_size=2, resampled=True, samples_per_epoch=7, seed=rank)
        got = list(DataLoader(ds, batch_size=None, num_workers=2))
        assert len(got) == len(ds) == 7
        assert load(scenes, rank=rank, world_size=2, resampled=True).samples_per_epoch == 11


# -- security and damaged shards ------------------------------------------------------------


def _evil_tar(path: Path, kind: str) -> str:
    """A tar holding one good sample and one member of the given kind; returns that member's name."""
    good = json.dumps({"parts": ["json"], "variants": [], "qa": []}).encode()
    names = {"symlink": "k.orig.jpg", "hardlink": "k.orig.jpg", "dotdot": "../k.orig.jpg",
             "absolute": "/tmp/k.orig.jpg", "chardev": "k.orig.jpg", "fifo": "k.orig.jpg",
             "directory": "k.d"}
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tf:
        info = tarfile.TarInfo("a.json")
        info.size = len(good)
        tf.addfile(info, __import__("io").BytesIO(good))
        info = tarfile.TarInfo(names[kind])
        info.type = {"symlink": tarfile.SYMTYPE, "hardlink": tarfile.LNKTYPE, "chardev": tarfile.CHRTYPE,
                     "fifo": tarfile.FIFOTYPE, "directory": tarfile.DIRTYPE}.get(kind, tarfile.REGTYPE)
        if kind in ("symlink", "hardlink"):
            info.linkname = "/etc/passwd" if kind == "symlink" else "a.json"
        data = b"x" * 10 if info.type == tarfile.REGTYPE else b""
        info.size = len(data)
        tf.addfile(info, __import__("io").BytesIO(data))
    return names[kind]


@pytest.mark.parametrize("kind", ["symlink", "hardlink", "dotdot", "absolute", "chardev", "fifo", "directory"])
def test_unsafe_members_are_refused(tmp_path: Path, kind: str) -> None:
    shard = tmp_path / f"evil-{kind}.tar"
    member = _evil_tar(shard, kind)
    for errors in ("raise", "skip"):  # refusing is not a skippable data fault
        with pytest.raises(UnsafeMemberError) as exc:
            list(load([str(shard)], errors=errors))
        assert exc.value.member == member and str(shard) in str(exc.value)


def test_shards_are_never_extracted_to_disk(scenes: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*a: Any, **k: Any) -> None:
        raise AssertionError("the loader extracted a member to disk")

    for name in ("extract", "extractall", "_extract_member", "makefile"):
        monkeypatch.setattr(tarfile.TarFile, name, refuse)
    before = sorted(p for p in scenes.rglob("*"))
    monkeypatch.chdir(tmp_path)
    assert len(list(load(scenes, image_size=16))) == 22
    assert sorted(p for p in scenes.rglob("*")) == before and not any(tmp_path.iterdir())


def _member_ends(shard: Path) -> list[tuple[str, int]]:
    with tarfile.open(shard) as tf:
        return [(m.name, m.offset_data + math.ceil(m.size / 512) * 512) for m in tf.getmembers()]


@pytest.mark.parametrize("cut", ["mid-member", "member boundary", "sample boundary", "missing"])
def test_damaged_shard_names_itself_or_is_skipped(scenes: Path, tmp_path: Path, cut: str) -> None:
    folder = Path(shutil.copytree(scenes, tmp_path / "demo"))
    shard = folder / "demo-000001.tar"
    ends = _member_ends(shard)
    per_sample = len(ends) // 5
    size = {"mid-member": ends[3][1] - 700, "member boundary": ends[per_sample + 2][1],
            "sample boundary": ends[2 * per_sample - 1][1], "missing": 0}[cut]
    if cut == "missing":
        shard.unlink()
    else:
        with open(shard, "r+b") as f:
            f.truncate(size)
    with pytest.raises(ShardError, match="demo-000001.tar") as exc:
        list(load(folder, decode="pil"))
    assert exc.value.url.endswith("demo-000001.tar")
    with pytest.warns(UserWarning, match="demo-000001.tar"):
        keys = [r["key"] for r in load(folder, decode="pil", errors="skip")]
    rows = index_rows(scenes)
    others = [r["key"] for r in rows if r["shard"] != "demo-000001.tar"]
    ours = [r["key"] for r in rows if r["shard"] == "demo-000001.tar"]
    # every other shard is read whole; of the damaged one, only complete samples before the damage
    assert [k for k in keys if k not in ours] == others
    assert [k for k in keys if k in ours] == ours[: len(keys) - len(others)] and len(keys) < len(rows)
    # the error also crosses a DataLoader worker with the shard's name in it
    with pytest.raises(Exception, match="demo-000001.tar"):
        list(DataLoader(load(folder, decode="pil"), batch_size=None, num_workers=2))


def test_verify_catches_a_flipped_byte(scenes: Path, tmp_path: Path) -> None:
    folder = Path(shutil.copytree(scenes, tmp_path / "demo"))
    shard = folder / "demo-000002.tar"
    name, end = _member_ends(shard)[0]
    data = bytearray(shard.read_bytes())
    data[end - 600] ^= 0xFF  # inside the first member's data: the tar still parses
    shard.write_bytes(bytes(data))
    assert len(list(load(folder, decode="pil", verify=False))) == 22  # trusted storage: no check
    seen = []
    with pytest.raises(ShardError, match="demo-000002.tar.*sha256"):  # checked by default
        for rec in load(folder, decode="pil"):
            seen.append(rec["key"])
    # the damaged shard is refused before any of its samples is handed to the trainer
    keys = {r["key"] for r in load(folder, decode="pil", verify=False)}
    from counterfactory.loader import Shard, read_shard
    bad = {smp["__key__"] for smp in read_shard(Shard(str(shard)), verify=False)}
    assert bad and not bad & set(seen) and set(seen) <= keys


# -- the readers people already use -----------------------------------------------------------


def test_plain_webdataset_pipeline(photos: Path) -> None:
    import webdataset as wds

    rows = index_rows(photos)
    samples = list(wds.WebDataset(shard_urls(photos), shardshuffle=False).decode("pil"))
    assert [s["__key__"] for s in samples] == [r["key"] for r in rows]
    for s, row in zip(samples, rows, strict=True):
        assert [q["answers"] for q in s["json"]["qa"]] == answers_of(row["answers"])
        assert s["orig.jpg"].size == (s["json"]["source"]["width"], s["json"]["source"]["height"])
        assert ("random_mask.jpg" in s) == ("random_mask" in row["variants"])


def test_huggingface_datasets(scenes: Path, photos: Path, tmp_path: Path) -> None:
    from datasets import load_dataset

    rows = index_rows(scenes)
    hf = load_dataset("webdataset", data_files={"train": shard_urls(scenes)}, split="train",
                      cache_dir=str(tmp_path / "hf"))
    assert hf.num_rows == len(rows) and hf["__key__"] == [r["key"] for r in rows]
    first = hf[0]
    assert first["remove.jpg"].size == first["orig.jpg"].size
    assert [q["answers"] for q in first["json"]["qa"]] == answers_of(rows[0]["answers"])
    # missing variants: HF infers columns from the first samples; the full schema fixes that
    rows = index_rows(photos)
    hf = load_dataset("webdataset", **hf_webdataset_args(str(photos)), split="train",
                      cache_dir=str(tmp_path / "hf2"))
    assert hf["__key__"] == [r["key"] for r in rows]
    assert [x is not None for x in hf["random_mask.jpg"]] == ["random_mask" in r["variants"] for r in rows]
    assert hf[0]["json"]["qa"][0]["answers"] == answers_of(rows[0]["answers"])[0]


def test_ray_data_read_webdataset(scenes: Path) -> None:
    import ray

    def decode_row(row: dict[str, Any]) -> dict[str, Any]:
        out = {}
        for k, v in row.items():
            if v is None:
                continue
            if k.endswith((".jpg", ".png")):
                out[k] = np.asarray(Image.open(io.BytesIO(v)))
            else:
                out[k] = json.loads(v) if k == "json" else v
        return out

    owned = not ray.is_initialized()
    if owned:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
        # decoder=None: samples carry different variants, and Ray's default image decoder
        # cannot build a tensor column with holes; decode per row instead (as a trainer would)
        got = (ray.data.read_webdataset(shard_urls(scenes), decoder=None)
               .map(decode_row).take_all())
    finally:
        if owned:
            ray.shutdown()
    rows = {r["key"]: r for r in index_rows(scenes)}
    assert sorted(g["__key__"] for g in got) == sorted(rows)
    for g in got:
        assert {"orig.jpg", "remove.jpg", "blackout.jpg", "random_mask.jpg", "mask.png", "json"} <= set(g)
        assert np.asarray(g["orig.jpg"]).shape == np.asarray(g["remove.jpg"]).shape
        doc = g["json"] if isinstance(g["json"], dict) else json.loads(g["json"])
        assert [q["answers"] for q in doc["qa"]] == answers_of(rows[g["__key__"]]["answers"])


def test_pyarrow_reads_the_index(scenes: Path) -> None:
    table = pq.read_table(scenes / "index.parquet")
    manifest = json.loads((scenes / "manifest.json").read_text())
    shards = json.loads((scenes / "shards.json").read_text())["shardlist"]
    assert table.num_rows == manifest["counts"]["samples"] == sum(s["nsamples"] for s in shards)
    assert Counter(table.column("shard").to_pylist()) == {s["url"]: s["nsamples"] for s in shards}
    assert table.column("key").to_pylist() == [r["key"] for r in load(scenes, decode="pil")]
    got, folder = resolve_shards(str(scenes))
    assert folder == str(scenes) and [(Path(s.url).name, s.nsamples) for s in got] == \
        [(s["url"], s["nsamples"]) for s in shards]


# -- the example ---------------------------------------------------------------------------------


def test_train_pairs_example_runs(scenes: Path) -> None:
    spec = importlib.util.spec_from_file_location("train_pairs", REPO / "examples" / "train_pairs.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    torch.manual_seed(0)
    init = mod.TinyEncoder().state_dict()
    out = mod.main(["--data", str(scenes), "--steps", "3", "--batch-size", "4", "--image-size", "32",
                    "--workers", "0"])
    assert len(out["losses"]) == 3 and all(math.isfinite(x) for x in out["losses"])
    assert 0 < out["pairs"] <= 3 * 4 * 7  # steps x batch x at most every variant
    after = out["model"].state_dict()
    assert any(not torch.equal(init[k], after[k]) for k in init)


def test_shard_index_cannot_point_outside_the_dataset(scenes: Path, tmp_path: Path) -> None:
    folder = Path(shutil.copytree(scenes, tmp_path / "demo"))
    doc = json.loads((folder / "shards.json").read_text())
    doc["shardlist"][0]["url"] = "../elsewhere/demo-000000.tar"
    (folder / "shards.json").write_text(json.dumps(doc))
    with pytest.raises(LoaderError, match="leaves the dataset folder"):
        load(folder)
