"""A version folder is what the Hugging Face Hub reads: plain ``datasets.load_dataset(folder)``
through the card's front matter, Ray Data's ``read_webdataset`` with its default decoder, and
webdataset, all on the ``pairs/`` layout; ``push`` goes through the real huggingface_hub client
(offline mode: a clear one-line error) and refuses a version that fails verify."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import yaml

from counterfactory import hub
from counterfactory import versions as V
from counterfactory.layout import VERSION_FILE
from counterfactory.pipeline.config import load_config
from counterfactory.pipeline.runner import run_pipeline
from counterfactory.verify import verify
from tests.conftest import REPO

DEMO = REPO / "configs" / "demo.yaml"


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo's photographs: samples carry different variants (the case readers failed on)."""
    tmp = tmp_path_factory.mktemp("photos")
    cfg = load_config(DEMO, [f"output.root={tmp}", "output.shard_size=4"])
    return run_pipeline(cfg, limit=12, local=True, progress=False).out_dir


def per_source_docs(folder: Path) -> dict[str, dict[str, Any]]:
    m = json.loads((folder / "manifest.json").read_text())
    docs = {}
    for s in m["shards"]:
        with tarfile.open(folder / s["name"]) as tf:
            for mem in tf:
                if mem.name.endswith(".json"):
                    d = json.loads(tf.extractfile(mem).read())
                    docs[d["key"]] = d
    return docs


def expected_pairs(folder: Path) -> list[tuple[str, str]]:
    rows = pq.read_table(folder / "index.parquet", columns=["key", "variants"]).to_pylist()
    return [(r["key"], v) for r in rows for v in r["variants"]]


def pair_paths(folder: Path) -> list[str]:
    return sorted(str(p) for p in (folder / "pairs").glob("*.tar"))


def test_plain_load_dataset_reads_the_folder(photos: Path, tmp_path: Path) -> None:
    from datasets import load_dataset

    ds = load_dataset(str(photos), split="train", cache_dir=str(tmp_path / "hf"))
    want = expected_pairs(photos)
    assert [(r["key"], r["variant"]) for r in ds["json"]] == want
    assert ds["__key__"] == [f"{k}_{v}" for k, v in want]
    assert len({v for _, v in want}) > 3  # the taxonomy varies per sample: the old failure case
    docs = per_source_docs(photos)
    for row in ds:
        j = row["json"]
        doc = docs[j["key"]]
        assert row["orig.jpg"].size == row["counterfactual.jpg"].size == row["mask.png"].size
        assert [(q["question"], q["answer_orig"], q["answer_counterfactual"]) for q in j["qa"]] == \
            [(q["question"], q["answers"]["orig"], q["answers"][j["variant"]]) for q in doc["qa"]]
        # every counterfactual changes some answer; the control (random_mask) changes none
        assert any(q["changed"] for q in j["qa"]) == (j["variant"] != "random_mask")


def test_card_front_matter_declares_the_layout(photos: Path, tmp_path: Path) -> None:
    text = (photos / "README.md").read_text()
    front = yaml.safe_load(text.split("---")[1])
    assert front["configs"] == [{"config_name": "default", "data_files": [{"split": "train", "path": "pairs/*.tar"}]}]
    assert front["license"] == "unknown" and "none declared" in text
    assert front["task_categories"] == ["visual-question-answering"]
    assert {"counterfactual", "webdataset"} <= set(front["tags"])
    assert [f["name"] for f in front["dataset_info"]["features"]][:4] == ["orig.jpg", "counterfactual.jpg",
                                                                          "mask.png", "json"]
    # a declared license reaches the front matter
    cfg = load_config(DEMO, [f"output.root={tmp_path}", "card.license=cc-by-4.0", "card.tags=[coco]"])
    out = run_pipeline(cfg, limit=3, local=True, progress=False).out_dir
    front = yaml.safe_load((out / "README.md").read_text().split("---")[1])
    assert front["license"] == "cc-by-4.0" and "coco" in front["tags"]


def test_ray_read_webdataset_with_default_arguments(photos: Path) -> None:
    import ray

    owned = not ray.is_initialized()
    if owned:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
        got = ray.data.read_webdataset(pair_paths(photos)).take_all()
    finally:
        if owned:
            ray.shutdown()
    want = expected_pairs(photos)
    assert sorted(g["__key__"] for g in got) == sorted(f"{k}_{v}" for k, v in want)
    for g in got:
        assert {"orig.jpg", "counterfactual.jpg", "mask.png", "json"} <= set(g)
        assert g["orig.jpg"].shape == g["counterfactual.jpg"].shape and g["orig.jpg"].ndim == 3
        assert g["json"]["key"] + "_" + g["json"]["variant"] == g["__key__"]


def test_webdataset_reads_the_pairs(photos: Path) -> None:
    import webdataset as wds

    got = list(wds.WebDataset(pair_paths(photos), shardshuffle=False, empty_check=False).decode("pil"))
    assert [(s["json"]["key"], s["json"]["variant"]) for s in got] == expected_pairs(photos)
    assert {frozenset(k for k in s if not k.startswith("__")) for s in got} == \
        {frozenset({"orig.jpg", "counterfactual.jpg", "mask.png", "json"})}


def test_pairs_are_in_the_manifest_and_verified(photos: Path, tmp_path: Path) -> None:
    m = json.loads((photos / "manifest.json").read_text())
    listed = sorted(n for n in m["files"] if n.startswith("pairs/"))
    assert listed == [f"pairs/{s['name']}" for s in m["shards"]]
    assert sum(m["files"][n]["samples"] for n in listed) == m["counts"]["pairs"] == len(expected_pairs(photos))
    copy = tmp_path / "demo" / photos.name
    shutil.copytree(photos, copy)
    assert all(c.ok for c in verify(V.read_version(copy)))
    p = copy / listed[0]
    data = bytearray(p.read_bytes())
    data[700] ^= 1
    p.write_bytes(bytes(data))
    bad = [c for c in verify(V.read_version(copy)) if not c.ok]
    assert [c.name for c in bad] == [listed[0]]
    (copy / "pairs" / "demo-999999.tar").write_bytes(b"")  # data_files: pairs/*.tar would read it
    bad = [c for c in verify(V.read_version(copy)) if not c.ok]
    assert [c.name for c in bad] == ["pairs/demo-999999.tar", listed[0]]


def test_pairs_are_byte_identical_on_a_rerun(photos: Path, tmp_path: Path) -> None:
    cfg = load_config(DEMO, [f"output.root={tmp_path}", "output.shard_size=4"])
    again = run_pipeline(cfg, limit=12, local=True, progress=False).out_dir
    assert (again / "manifest.json").read_bytes() == (photos / "manifest.json").read_bytes()
    for p in pair_paths(photos):
        assert (again / "pairs" / Path(p).name).read_bytes() == Path(p).read_bytes()


def test_without_pairs_the_card_points_at_the_shards(tmp_path: Path) -> None:
    cfg = load_config(DEMO, [f"output.root={tmp_path}", "output.pairs=false"])
    out = run_pipeline(cfg, limit=3, local=True, progress=False).out_dir
    assert not (out / "pairs").exists() and "pairs" not in json.loads((out / "manifest.json").read_text())["counts"]
    front = yaml.safe_load((out / "README.md").read_text().split("---")[1])
    assert front["configs"][0]["data_files"][0]["path"] == "demo-*.tar" and "dataset_info" not in front


# -- push ----------------------------------------------------------------------------------
def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    e = {**os.environ, **(env or {})}
    e["PYTHONPATH"] = os.pathsep.join([str(REPO), e.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-m", "counterfactory.cli", *args], capture_output=True, text=True,
                          env=e, timeout=120)


def test_push_offline_is_one_line_and_records_nothing(photos: Path) -> None:
    before = (photos / VERSION_FILE).read_bytes()
    r = _cli("push", str(photos), "someone/demo", env={"HF_HUB_OFFLINE": "1", "HF_TOKEN": "hf_test"})
    assert r.returncode == 1, r.stderr
    assert r.stderr.count("\n") == 1 and "HF_HUB_OFFLINE" in r.stderr and "Traceback" not in r.stderr
    assert (photos / VERSION_FILE).read_bytes() == before


def test_push_refuses_a_version_that_fails_verify(photos: Path, tmp_path: Path) -> None:
    copy = tmp_path / "demo" / photos.name
    shutil.copytree(photos, copy)
    (copy / "index.parquet").write_bytes(b"not parquet")
    with pytest.raises(hub.HubError, match="fails verify.*nothing pushed"):
        hub.push(V.read_version(copy), "someone/demo")
    r = _cli("push", str(copy), "someone/demo", env={"HF_HUB_OFFLINE": "1"})
    assert r.returncode == 1 and "fails verify" in r.stderr and r.stderr.count("\n") == 1
    assert "hub" not in json.loads((copy / VERSION_FILE).read_text())


def test_push_of_a_malformed_repo_id_is_one_line(photos: Path) -> None:
    r = _cli("push", str(photos), "not a repo!", env={"HF_HUB_OFFLINE": "1"})
    assert r.returncode == 1 and r.stderr.startswith("error: 'not a repo!' is not a repo id") and r.stderr.count("\n") == 1
