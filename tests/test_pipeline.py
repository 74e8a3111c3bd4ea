"""End to end through Ray Data: the demo config on a slice, read back by the libraries trainers
use; determinism; accounting of every input; atomic publication."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from counterfactory.pipeline import writer as writer_mod
from counterfactory.pipeline.config import load_config
from counterfactory.pipeline.runner import run_pipeline
from tests.conftest import DEMO, make_config, scenes_input

LIMIT = 30


def _demo(tmp_path: Path, *extra: str):
    return load_config(DEMO, [f"output.root={tmp_path / 'out'}", "output.shard_size=8", *extra])


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, ray_local):
    tmp = tmp_path_factory.mktemp("demo")
    res = run_pipeline(_demo(tmp), limit=LIMIT, progress=False)
    return res


def test_demo_slice_reads_back_with_webdataset_and_tarfile(demo_run):
    out = demo_run.out_dir
    manifest = json.loads((out / "manifest.json").read_text())
    index = pq.read_table(out / "index.parquet").to_pylist()
    rejects = pq.read_table(out / "rejects.parquet").to_pylist()
    shards = sorted(out.glob("*.tar"))
    assert [s.name for s in shards] == [s["name"] for s in manifest["shards"]]
    assert not list(out.glob(".*")), "temporary files left behind"

    # every input is a sample or a whole-input reject: the totals add up
    c = manifest["counts"]
    whole = [r for r in rejects if r["variant"] is None]
    assert c["inputs"] == LIMIT == c["samples"] + len(whole) == len(index) + len(whole)
    assert {r["input_index"] for r in whole} | {r["input_index"] for r in index} == set(range(LIMIT))
    assert c["samples"] >= 20

    n_wds = 0
    for shard, entry in zip(shards, manifest["shards"], strict=True):
        assert writer_mod.sha256_file(shard) == entry["sha256"]
        with tarfile.open(shard) as tf:
            members = tf.getmembers()
            names = [m.name for m in members]
            assert all(m.isfile() and m.mtime == 0 and m.uid == 0 and m.gid == 0 for m in members)
            keys = list(dict.fromkeys(n.split(".", 1)[0] for n in names))
            assert len(keys) == entry["samples"]
            for k in keys:  # members of one sample are contiguous and sorted
                mine = [n for n in names if n.startswith(k + ".")]
                assert mine == sorted(mine)
        for sample in wds.WebDataset(str(shard), shardshuffle=False):
            n_wds += 1
            doc = json.loads(sample["json"])
            assert "." not in sample["__key__"] and doc["key"] == sample["__key__"]
            assert set(doc["parts"]) == {k for k in sample if not k.startswith("__")}
            assert {"orig.jpg", "mask.png", "json"} <= set(doc["parts"])
            assert {f"{v}.jpg" for v in doc["variants"]} <= set(doc["parts"])
            assert {"remove", "blackout"} & set(doc["variants"])
            orig = np.asarray(Image.open(io.BytesIO(sample["orig.jpg"])))
            mask = np.asarray(Image.open(io.BytesIO(sample["mask.png"])))
            assert orig.shape[:2] == mask.shape == (doc["source"]["height"], doc["source"]["width"])
            for q in doc["qa"]:
                assert set(q["answers"]) == {"orig", *doc["variants"]}
            assert doc["provenance"]["stages"]["edit"]["backend"] == "default"
            assert doc["provenance"]["config_hash"] == manifest["config_hash"]
    assert n_wds == c["samples"] == sum(s["samples"] for s in manifest["shards"])
    by_key = {r["key"]: r for r in index}
    assert len(by_key) == len(index)


def test_card_and_config_saved(demo_run):
    out = demo_run.out_dir
    card = (out / "README.md").read_text()
    c = json.loads((out / "manifest.json").read_text())["counts"]
    assert card.startswith("---\n") and f"| {c['inputs']} | {c['samples']} |" in card
    saved = load_config(out / "config.yaml", [f"output.root={out.parent}"])
    assert saved.config_hash() == json.loads((out / "manifest.json").read_text())["config_hash"]


def test_two_runs_are_byte_identical_and_match_the_plain_loop(tmp_path, demo_run):
    again = run_pipeline(_demo(tmp_path / "again"), limit=LIMIT, progress=False)
    local = run_pipeline(_demo(tmp_path / "local"), limit=LIMIT, local=True)
    ref = (demo_run.out_dir / "manifest.json").read_bytes()
    assert (again.out_dir / "manifest.json").read_bytes() == ref
    assert (local.out_dir / "manifest.json").read_bytes() == ref


def test_content_id_does_not_depend_on_placement(tmp_path, demo_run):
    """Shard k holds inputs [k * shard_size, (k + 1) * shard_size): one CPU per run or two, a
    stage moved into an actor pool (its shards then assembled from per-batch fragments) and the plain loop
    all write the same manifest; the placement is recorded in version.json, not config.yaml."""
    ref = (demo_run.out_dir / "manifest.json").read_bytes()
    one = run_pipeline(_demo(tmp_path / "one", "ray.num_cpus=1"), limit=LIMIT, progress=False)
    pool = run_pipeline(_demo(tmp_path / "pool", "stages.verify.resources.concurrency=1"), limit=LIMIT,
                        progress=False)
    assert (one.out_dir / "manifest.json").read_bytes() == ref
    assert (pool.out_dir / "manifest.json").read_bytes() == ref
    assert json.loads((one.out_dir / "version.json").read_text())["placement"]["ray"]["num_cpus"] == 1
    assert "ray" not in (one.out_dir / "config.yaml").read_text()


class _Killed(BaseException):
    """Stands in for the driver's SIGKILL: not an Exception, so nothing swallows it."""


def test_ray_run_killed_after_a_shard_resumes_per_shard(tmp_path, demo_run, monkeypatch):
    """The workers wrote and journaled the shards: a driver gone after the first result leaves
    them, and the rerun writes only the others, to the same manifest."""
    real = writer_mod.DatasetCommit.on_write_result

    def on_write_result(self, entry):
        real(self, entry)
        raise _Killed()

    with monkeypatch.context() as m:
        m.setattr(writer_mod.DatasetCommit, "on_write_result", on_write_result)
        with pytest.raises(_Killed):
            run_pipeline(_demo(tmp_path), limit=LIMIT, progress=False)
    res = run_pipeline(_demo(tmp_path), limit=LIMIT, progress=False)
    assert (res.out_dir / "manifest.json").read_bytes() == (demo_run.out_dir / "manifest.json").read_bytes()
    resumed = json.loads((res.out_dir / "summary.json").read_text())["resumed"]
    assert resumed["shards"] >= 1 and resumed["inputs"] >= 8


def test_bad_inputs_through_ray_nothing_lost(tmp_path, odd_inputs, ray_local):
    manifest, expect = odd_inputs
    cfg = make_config(tmp_path, [{"kind": "manifest", "path": str(manifest)}, scenes_input(3)],
                      limits={"max_pixels": 200_000})
    res = run_pipeline(cfg, progress=False)
    rejects = pq.read_table(res.out_dir / "rejects.parquet").to_pylist()
    whole = {Path(r["source"]).name if r["reason"] != "bad_manifest_line" else "<bad line>": r["reason"]
             for r in rejects if r["variant"] is None}
    assert whole == {k: v for k, v in expect.items() if v != "ok"}
    c = res.manifest["counts"]
    assert c["samples"] + c["rejected_inputs"] == c["inputs"] == len(expect) + 6
    assert all(r["detail"] or r["reason"] in ("not_an_image",) for r in rejects)


def test_duplicate_inputs_are_rejected_not_written_twice(tmp_path):
    cfg = make_config(tmp_path, [scenes_input(2), scenes_input(2)])
    res = run_pipeline(cfg, local=True)
    c = res.manifest["counts"]
    assert c["samples"] == 4 and c["rejected_inputs"] == 4
    assert {r["reason"] for r in res.manifest["rejects"] if r["scope"] == "input"} == {"duplicate"}


def test_failed_run_publishes_nothing_and_keeps_previous(tmp_path, monkeypatch):
    cfg = make_config(tmp_path, [scenes_input(2)])
    first = run_pipeline(cfg, local=True)
    before = (first.out_dir / "manifest.json").read_bytes()

    def boom(self):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(writer_mod.DatasetCommit, "on_write_complete", boom)
    with pytest.raises(RuntimeError, match="disk on fire"):
        run_pipeline(make_config(tmp_path, [scenes_input(3)]), local=True)
    assert (first.out_dir / "manifest.json").read_bytes() == before
    # ROOT/demo holds v1 and the latest pointer (plus the source-hash cache, and the failed
    # run's staging: its written shard stays for a resume, never a version)
    assert first.out_dir.name == "v1"
    assert sorted(p.name for p in first.out_dir.parent.iterdir()
                  if p.name != ".cache" and not p.name.startswith(".staging-")) == ["latest", "v1"]


def test_cli_run_prints_summary(tmp_path):
    exe = Path(sys.executable).parent / "counterfactory"
    out = tmp_path / "cli"
    r = subprocess.run([exe, "run", str(DEMO), f"output.root={out}", "ray.num_cpus=2", "--limit", "4", "--quiet"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    # --quiet: the version line only (the summary is tested in tests/test_cli.py)
    assert r.stdout.splitlines()[0].startswith("version: demo@v1  spec id ") and len(r.stdout.splitlines()) == 1, r.stdout


def test_sample_count_a_multiple_of_shard_size_keeps_every_index_row(tmp_path):
    cfg = make_config(tmp_path, [scenes_input(4, questions=2)])
    cfg.output.shard_size = 4
    res = run_pipeline(cfg, local=True)
    index = pq.read_table(res.out_dir / "index.parquet").to_pylist()
    assert res.manifest["counts"]["samples"] == len(index) == 8
    assert [s["samples"] for s in res.manifest["shards"]] == [4, 4]
    assert {r["shard"] for r in index} == {s["name"] for s in res.manifest["shards"]}
