"""Driver-side commit cost per sample: DatasetCommit.on_write_result + on_write_complete over
shards written beforehand by ShardWriters (the workers' part, not timed)."""
# Usage: python bench/commit_cost.py N OUT_DIR  (issue 26; prints ms of driver CPU per input)

import resource
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from counterfactory.pipeline.writer import DatasetCommit, ShardWriter, shard_range  # noqa: E402

N, S = int(sys.argv[1]), 64
out = Path(sys.argv[2])
shutil.rmtree(out, ignore_errors=True)
out.mkdir(parents=True)
meta = {"source": {"image": "procedural://1/0?size=256x256", "origin": "procedural:1/0#q0", "sha256": "ab" * 32},
        "variants": ["remove", "blackout", "flip", "random_mask", "insert", "attribute"],
        "qa": [{"question": "Is there a red circle in the image?", "kind": "existence", "targets": ["circle"],
                "answers": {"orig": "yes", "remove": "no", "blackout": "unknown", "flip": "yes", "random_mask": "yes",
                            "insert": "yes", "attribute": "yes"}}],
        "targets": ["circle"], "instances": [{}], "mask": {"area_frac": 0.1},
        "metrics": {"mask_area_frac": 0.1, "remove": {"inside_mad": 12.5, "seam": 3.1}, "flip": {"mirror_exact": True}},
        "seconds": {"ingest": 0.001, "localize": 0.002, "segment": 0.003, "edit": 0.02, "qa": 0.001, "verify": 0.01},
        "variant_rejects": [{"stage": "verify", "variant": "swap", "reason": "r", "detail": "d" * 60}]}
entries = []
for k in range((N + S - 1) // S):
    lo, hi = shard_range(k, S, N)
    w = ShardWriter(out, "d", k, lo, hi, pairs=False)
    for i in range(lo, hi):
        w.add(i, f"{i:032x}", "ok", meta, {"json": b"{}"})
    entries.append(w.finish())


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


c0 = cpu()
commit = DatasetCommit(out, "d", S, N, {"a": 1}, "h", pairs=False)
commit.on_write_start()  # fresh commit over journals already there: resumes them (sha256 of each tar)
c1 = cpu()
m = commit.on_write_complete()
c2 = cpu()
print(f"N={N}: resume check {1000 * (c1 - c0) / N:.3f} ms/input, on_write_complete {1000 * (c2 - c1) / N:.3f} ms/input")
