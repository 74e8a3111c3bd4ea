"""bench/bench_gpu_models.py in its CPU smoke mode: every issue-19 backend measured beside its
raw library call with the tests' tiny models (the GPU run uses full-size random weights)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_bench_models_tiny_on_cpu(tmp_path):
    sys.path.insert(0, str(REPO / "bench"))
    import bench_gpu_models

    out = tmp_path / "r.json"
    rep = bench_gpu_models.main(["--device", "cpu", "--tiny", "--batch", "2", "--reps", "1",
                                 "--work", str(tmp_path / "w"), "--out", str(out)])
    assert json.loads(out.read_text()) == rep and set(rep["results"]) == {"judge", "sam3", "instruct", "track"}
    r = rep["results"]
    assert r["judge"]["raw_questions_per_s"] > 0 and r["judge"]["stage_questions_per_s"] > 0
    assert r["judge"]["answer_tokens"] == 3 and r["judge"]["image_px"] == 448
    assert r["sam3"]["stage_images_per_s"] > 0 and r["instruct"]["pipeline"] == "FluxKontextPipeline"
    assert r["track"]["frames"] == 8 and all(v["stage_over_raw"] > 0 for v in r.values())
