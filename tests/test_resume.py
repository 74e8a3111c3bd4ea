"""Resume without Ray: a run killed after some shards continues; the manifest is unchanged."""

from __future__ import annotations

import json

import pytest
from conftest import make_config, scenes_input

from counterfactory.pipeline import writer as writer_mod
from counterfactory.pipeline.config import ConfigError, validate_config
from counterfactory.pipeline.runner import run_pipeline


class Killed(BaseException):
    """Stands in for SIGKILL: not an Exception, so nothing in the stages swallows it."""


def _crash_after(monkeypatch, n: int) -> None:
    """The driver killed once ``n`` shards are written and journaled (by their writers)."""
    real = writer_mod.DatasetCommit.on_write_result
    calls = {"n": 0}

    def on_write_result(self, entry):
        real(self, entry)
        calls["n"] += 1
        if calls["n"] == n:
            raise Killed()

    monkeypatch.setattr(writer_mod.DatasetCommit, "on_write_result", on_write_result)


def _cfg(tmp_path, name: str, **top):
    cfg = make_config(tmp_path / name, [scenes_input(10, questions=2)], **top)
    cfg.output.shard_size = 3
    return cfg


def _stagings(cfg):
    ds = cfg.path(cfg.output.root) / cfg.dataset
    return sorted(p for p in ds.iterdir() if p.name.startswith(".staging-"))


def _reference_and_killed_run(tmp_path, monkeypatch):
    """An uninterrupted run, and the same spec killed after its third shard: (ref, cfg, staging)."""
    ref = run_pipeline(_cfg(tmp_path, "ref"), local=True, progress=False)
    cfg = _cfg(tmp_path, "run")
    with monkeypatch.context() as m:
        _crash_after(m, 3)
        with pytest.raises(Killed):
            run_pipeline(cfg, local=True, progress=False)
    (staging,) = _stagings(cfg)
    return ref, cfg, staging


def test_killed_run_resumes_to_identical_manifest(tmp_path, monkeypatch):
    ref, cfg, staging = _reference_and_killed_run(tmp_path, monkeypatch)
    assert len(list((staging / ".journal").glob("*.json"))) == 3
    res = run_pipeline(cfg, local=True, progress=False)
    assert (res.out_dir / "manifest.json").read_bytes() == (ref.out_dir / "manifest.json").read_bytes()
    summary = json.loads((res.out_dir / "summary.json").read_text())
    assert summary["resumed"]["shards"] == 3 and summary["resumed"]["inputs"] > 0
    assert not _stagings(cfg) and not (res.out_dir / ".journal").exists()
    assert [s["stage"] for s in summary["stages"]][:2] == ["ingest", "localize"]


def test_damaged_shard_is_recomputed(tmp_path, monkeypatch):
    ref, cfg, staging = _reference_and_killed_run(tmp_path, monkeypatch)
    shard = staging / "demo-000001.tar"
    shard.write_bytes(shard.read_bytes()[:-10] + b"x" * 10)  # same size, other bytes
    res = run_pipeline(cfg, local=True, progress=False)
    # shards stand alone: 0 and 2 are kept, only the damaged 1 is written again
    assert json.loads((res.out_dir / "summary.json").read_text())["resumed"]["shards"] == 2
    assert (res.out_dir / "manifest.json").read_bytes() == (ref.out_dir / "manifest.json").read_bytes()


def test_changed_spec_never_resumes(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path, "run")
    with monkeypatch.context() as m:
        _crash_after(m, 2)
        with pytest.raises(Killed):
            run_pipeline(cfg, local=True, progress=False)
    other = _cfg(tmp_path, "run", seed=1)
    res = run_pipeline(other, local=True, progress=False)
    assert json.loads((res.out_dir / "summary.json").read_text())["resumed"]["shards"] == 0
    assert len(_stagings(cfg)) == 1  # the first spec's progress is still there, untouched


def test_failure_budget_stops_and_keeps_progress(tmp_path):
    # 10 scenes x 2 questions, over-tight verify: most inputs are rejected
    cfg = _cfg(tmp_path, "run", failure_budget={"max_reject_share": 0.0})
    cfg.stage("verify").set_params(min_area_frac=0.05)  # (an over-big mask now rejects only remove/swap)
    with pytest.raises(writer_mod.FailureBudgetExceeded, match="failure budget exceeded"):
        run_pipeline(cfg, local=True, progress=False)
    cfg.failure_budget.max_reject_share = 1.0  # raising the budget is the same spec: resumes
    res = run_pipeline(cfg, local=True, progress=False)
    assert res.manifest["counts"]["rejected_inputs"] > 0


def test_failure_budget_is_validated(tmp_path):
    data = json.loads(json.dumps(make_config(tmp_path).resolved()))
    data["failure_budget"] = {"max_reject_share": 1.5}
    with pytest.raises(ConfigError, match="failure_budget.max_reject_share"):
        validate_config(data, source="test", base_dir=tmp_path)


def test_unsupported_output_uri_is_one_line(tmp_path):
    cfg = make_config(tmp_path)
    cfg.output.root = "s3://bucket/out"
    with pytest.raises(ConfigError, match="output.root"):
        run_pipeline(cfg, local=True, progress=False, limit=1)
