"""The plain loop's writer takes the encoder's samples as they are (issue 27, s27encode): no JSON
and pickle round trip of every row between the encoder thread and the writer, the same bytes."""

from __future__ import annotations

import json
from pathlib import Path

from counterfactory.pipeline import datasink
from counterfactory.pipeline.config import load_config
from counterfactory.pipeline.datasink import ShardSink, write_local
from counterfactory.pipeline.inputs import plan_inputs
from counterfactory.pipeline.runner import local_batches
from counterfactory.sample import Sample
from tests.conftest import DEMO


def _written(out: Path, batches, n: int) -> tuple[list[dict], dict[str, bytes]]:
    sink = ShardSink(str(out), "d", 5, n)
    out.mkdir()
    entries = list(write_local(iter(batches), sink))
    files = {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*.tar"))}
    journals = [json.loads((out / ".journal" / f"{e['k']:06d}.json").read_text()) for e in entries]
    return [{k: j[k] for k in ("index_rows", "rejects", "shard", "pair_shard", "part_counts")} for j in journals], files


def test_plain_loop_writes_its_samples_as_it_would_write_their_rows(tmp_path, monkeypatch):
    n = 12
    cfg = load_config(DEMO, [f"output.root={tmp_path / 'x'}"])
    plan = plan_inputs(cfg, n)
    rows = list(local_batches(cfg, plan, batch_size=5, overlap=True))
    samples = list(local_batches(cfg, plan, batch_size=5, overlap=True, as_samples=True))
    assert [len(b) for b in samples] == [len(b["idx"]) for b in rows]
    assert all(isinstance(s, Sample) for b in samples for s in b)
    assert sum(s.ok for b in samples for s in b) >= n // 2  # the demo's inputs: mostly accepted
    plain = list(local_batches(cfg, plan, batch_size=5, as_samples=True))  # no threads: the same
    assert [[s.key for s in b] for b in plain] == [[s.key for s in b] for b in samples]

    ref_journal, ref_files = _written(tmp_path / "rows", rows, n)

    def no_decode(batch):  # samples are written as they are, never decoded again
        raise AssertionError("write_local decoded a batch of samples")

    monkeypatch.setattr(datasink, "decode_batch", no_decode)
    journal, files = _written(tmp_path / "samples", samples, n)
    assert files == ref_files and len(files) == 2 * 3  # shards and their pairs/ copies
    assert journal == ref_journal


def test_a_cpu_plan_runs_its_plain_loop_in_one_thread_a_model_plan_overlaps(tmp_path, monkeypatch):
    """Issue 27: threads only pay where a model step's device time hides host work; with CPU
    stages alone they trade the GIL on the same cores (15-20 % more CPU per pair, no faster)."""
    from counterfactory.pipeline import overlap, runner

    calls: list[int] = []
    real = overlap.staged

    def counted(source, steps, depth=2):
        calls.append(len(steps))
        return real(source, steps, depth)

    monkeypatch.setattr(overlap, "staged", counted)
    cfg = load_config(DEMO, [f"output.root={tmp_path / 'cpu'}"])
    plan = plan_inputs(cfg, 4)
    sink = ShardSink(str(tmp_path / "cpu"), "d", 5, plan.n)
    (tmp_path / "cpu").mkdir()
    entries = list(runner._local_entries(cfg, plan, [0], sink))
    assert len(entries) == 1 and calls == []  # the demo's CPU stages: no thread
    monkeypatch.setattr(runner, "uses_actors", lambda c: True)  # a plan with a model step
    sink = ShardSink(str(tmp_path / "model"), "d", 5, plan.n)
    (tmp_path / "model").mkdir()
    assert len(list(runner._local_entries(cfg, plan, [0], sink))) == 1 and calls == [2]
