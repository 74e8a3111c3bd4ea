"""Issue 26, planning at scale: a dry run streams (its memory does not grow with the manifest's
lines) and a run's plan is compact (a few numbers per slice, made into dicts where read)."""

from __future__ import annotations

import json
import pickle
import tracemalloc
from pathlib import Path

import yaml
from conftest import demo_dict

from counterfactory.cli import main
from counterfactory.pipeline.config import load_config
from counterfactory.pipeline.inputs import plan_inputs, read_slice


def _manifest(folder: Path, n: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "m.jsonl", "w") as f:
        f.write("".join(json.dumps({"image": f"img{i % 3}.png", "question": f"Is there a cup number {i}?",
                                    "objects": [{"category": "cup", "box": [1, 2, 30, 40]}]}) + "\n"
                        for i in range(n)))
    cfg = demo_dict()
    cfg["inputs"] = [{"kind": "manifest", "path": "m.jsonl"}]
    cfg["output"]["root"] = "out"
    cfg["limits"] = {"max_inputs": 10_000_000}
    (folder / "c.yaml").write_text(yaml.safe_dump(cfg))
    return folder / "c.yaml"


def _peak(fn) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_dry_run_memory_does_not_grow_with_lines(tmp_path, capsys):
    small, big = _manifest(tmp_path / "s", 5_000), _manifest(tmp_path / "b", 50_000)
    main(["run", str(small), "--dry-run"])  # imports (rich, the stages) out of the figures
    capsys.readouterr()
    peaks = {}
    for name, cfg in (("small", small), ("big", big)):
        peaks[name] = _peak(lambda cfg=cfg: main(["run", str(cfg), "--dry-run"]))
        assert f"stage plan ({5_000 if name == 'small' else 50_000} inputs)" in capsys.readouterr().out
    # 10x the lines: the same memory (before: ~120 B per line of slice dicts, 6 MB at 50k)
    assert peaks["big"] < 1.2 * peaks["small"] + (256 << 10), peaks


def test_run_plan_is_compact_and_reads_the_same_records(tmp_path):
    cfg = load_config(_manifest(tmp_path, 50_000), [])
    holder = {}
    peak = _peak(lambda: holder.setdefault("plan", plan_inputs(cfg, per_slice=8)))
    plan = holder["plan"]
    assert plan.n == 50_000 and len(plan.slices) == 6_250
    assert peak < 2 << 20, peak  # ~80 bytes per slice (before: ~1 KB per slice dict, 7 MB)
    assert len(pickle.dumps(plan.slices)) < 100 * len(plan.slices)
    sl = plan.slices[2_345]
    recs = read_slice(sl)
    assert sl["idx0"] == 2_345 * 8 and [r["origin"] for r in recs] == [f"m.jsonl:{i}#q0" for i in
                                                                       range(sl["idx0"] + 1, sl["idx0"] + 9)]
    # a shard task carries a view of its slices alone: the same dicts
    view = plan.slices[100:103]
    assert len(pickle.dumps(view)) < 1000 and list(view) == [plan.slices[i] for i in (100, 101, 102)]
