"""Issue 26: the duplicate rule is global. The same source bytes and question at inputs in two
shards' ranges: the lowest index keeps the key, every later copy is a ``shard/duplicate``
reject, in every mode (plain loop, Ray, resume), and the same as one shard holding both."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
from conftest import make_config, scenes_input

from counterfactory.pipeline import dedupe
from counterfactory.pipeline.runner import run_pipeline


class Killed(BaseException):
    """Stands in for SIGKILL (not an Exception: nothing swallows it)."""


def _cfg(tmp_path, name: str, shard_size: int):
    # the same 2 scenes x 2 questions twice: inputs 4..7 repeat 0..3. With shard_size 3 a copy
    # lands in another shard than its original (4, 5 -> shard 1 beside 3; 6, 7 -> shard 2), and
    # shard 1 holds both an original (3) and later copies
    cfg = make_config(tmp_path / name, [scenes_input(2), scenes_input(2)])
    cfg.output.shard_size = shard_size
    return cfg


def _outcome(res) -> tuple[list, list]:
    index = pq.read_table(res.out_dir / "index.parquet", columns=["input_index", "key"]).to_pylist()
    rejects = pq.read_table(res.out_dir / "rejects.parquet").to_pylist()
    return ([(r["input_index"], r["key"]) for r in index],
            [(r["input_index"], r["key"], r["stage"], r["reason"], r["variant"]) for r in rejects])


def _check(res) -> None:
    kept, rejects = _outcome(res)
    c = res.manifest["counts"]
    assert c["samples"] + c["rejected_inputs"] == c["inputs"] == 8
    assert [i for i, _ in kept] == [0, 1, 2, 3]  # the lowest index keeps each key
    dups = [r for r in rejects if r[3] == "duplicate"]
    assert [(i, s) for i, _, s, _, _ in dups] == [(i, "shard") for i in (4, 5, 6, 7)]
    assert {k for _, k, *_ in dups} == {k for _, k in kept}
    assert not [r for r in rejects if r[0] >= 4 and r[3] != "duplicate"]  # a copy's variant rejects go
    n_keys = sum(1 for s in res.manifest["shards"] for _ in range(s["samples"]))
    assert n_keys == 4 and c["pairs"] == sum(p["samples"] for p in res.manifest["files"].values() if "samples" in p)


def test_cross_shard_duplicate_rejected_local_and_same_as_one_shard(tmp_path):
    three = run_pipeline(_cfg(tmp_path, "s3", 3), local=True, progress=False)
    _check(three)
    one = run_pipeline(_cfg(tmp_path, "s64", 64), local=True, progress=False)
    _check(one)
    assert _outcome(three) == _outcome(one)  # shard layouts differ: compare samples and rejects
    r3 = [r for r in pq.read_table(three.out_dir / "rejects.parquet").to_pylist() if r["reason"] == "duplicate"]
    r64 = [r for r in pq.read_table(one.out_dir / "rejects.parquet").to_pylist() if r["reason"] == "duplicate"]
    assert r3 == r64  # origin, source and detail as the in-stream rejection writes them
    assert three.manifest["counts"] == {**one.manifest["counts"]}


def test_cross_shard_duplicate_same_content_id_under_ray(tmp_path, ray_local):
    local = run_pipeline(_cfg(tmp_path, "local", 3), local=True, progress=False)
    ray = run_pipeline(_cfg(tmp_path, "ray", 3), progress=False, verbose=False)
    _check(ray)
    assert ray.content_id == local.content_id


def test_kill_during_duplicate_rewrite_resumes_to_the_same(tmp_path, monkeypatch):
    ref = run_pipeline(_cfg(tmp_path, "ref", 3), local=True, progress=False)
    cfg = _cfg(tmp_path, "run", 3)
    real = dedupe.atomic_write

    def journal_write(path, data):  # the rewritten tars are in place, the journal entry is not
        raise Killed()

    with monkeypatch.context() as m:
        m.setattr(dedupe, "atomic_write", journal_write)
        with pytest.raises(Killed):
            run_pipeline(cfg, local=True, progress=False)
    assert dedupe.atomic_write is real
    res = run_pipeline(cfg, local=True, progress=False)
    assert (res.out_dir / "manifest.json").read_bytes() == (ref.out_dir / "manifest.json").read_bytes()
    assert json.loads((res.out_dir / "summary.json").read_text())["resumed"]["shards"] == 2  # 1 written again
    # and a resume after the rewrite finished keeps the rewritten shard as it is
    cfg2 = _cfg(tmp_path, "run2", 3)
    with monkeypatch.context() as m:
        from counterfactory.pipeline import writer as writer_mod

        def boom(*a, **k):
            raise Killed()

        m.setattr(writer_mod, "sha256_file", boom)  # the manifest step dies after the pass
        with pytest.raises(Killed):
            run_pipeline(cfg2, local=True, progress=False)
    res2 = run_pipeline(cfg2, local=True, progress=False)
    assert res2.content_id == ref.content_id
    assert json.loads((res2.out_dir / "summary.json").read_text())["resumed"]["shards"] == 3


def test_duplicates_found_at_close_count_in_the_failure_budget(tmp_path):
    from counterfactory.publish import FailureBudgetExceeded

    cfg = _cfg(tmp_path, "budget", 3)
    cfg.failure_budget.max_reject_share = 0.25  # 2 of 8; the 4 copies are found only at close
    with pytest.raises(FailureBudgetExceeded, match="4 of them duplicates"):
        run_pipeline(cfg, local=True, progress=False)
    cfg.failure_budget.max_reject_share = 1.0  # the same spec: resumes with every shard
    res = run_pipeline(cfg, local=True, progress=False)
    _check(res)
    assert json.loads((res.out_dir / "summary.json").read_text())["resumed"]["shards"] == 3
