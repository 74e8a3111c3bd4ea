"""CPU cost of the edit stage alone (issue 27, session 5, part s28fill): ``ClassicalEdit.process``
replayed on the samples that bench/cpu_cost.py's procedural inputs bring to it (ingest to segment
run once, untimed), in CPU time, the best of ``--rounds``; per edit type too. Prints a digest of
every variant it makes (image, region, edit record, skips): the same digest = the same bytes.

``--tree DIR``: import ``counterfactory`` from another checkout (a ``git worktree`` of an older
commit) instead of this one; run both at the same time so both see the same load.

Usage: python bench/edit_cost.py [--n 300] [--rounds 3] [--tree /tmp/before]
"""

from __future__ import annotations

import argparse
import cProfile
import hashlib
import json
import pstats
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--profile", type=int, default=0, help="print this many cProfile entries of the last round")
    ap.add_argument("--sort", default="tottime", help="profile order: tottime or cumulative")
    ap.add_argument("--tree", default=None, help="the checkout whose counterfactory runs (default: this one)")
    a = ap.parse_args()
    tree = Path(a.tree).resolve() if a.tree else REPO
    sys.path[:0] = [str(tree), str(tree / "bench")]
    import cv2
    import run as bench_run  # the tree's own (it puts its tree first on the path)

    import counterfactory
    from counterfactory.pipeline.runner import local_batches, plan_steps
    from counterfactory.sample import Sample
    from tests.conftest import load_records

    assert Path(counterfactory.__file__).resolve().is_relative_to(tree), counterfactory.__file__
    cv2.setNumThreads(1)
    cfg = bench_run.scenes_config(a.n, Path(tempfile.mkdtemp(prefix="cf-edit-")))
    before = [s for b in local_batches(cfg, load_records(cfg), stop_after="segment", as_samples=True)
              for s in b if s.ok]
    spec = next(s for st in plan_steps(cfg) for s in st.specs if s.name == "edit")
    stage = spec.build(cfg.run_settings())
    per: dict[str, float] = {}
    for v in stage.params.variants:  # each edit's own CPU (the wrapper's cost is in the total only)
        fn = getattr(stage, f"_{v}")

        def timed(sample, rng, fn=fn, v=v):
            c0 = time.process_time()
            try:
                return fn(sample, rng)
            finally:
                per[v] = per.get(v, 0.0) + time.process_time() - c0
        setattr(stage, f"_{v}", timed)
    best, best_per, digest = float("inf"), {}, ""
    for _ in range(a.rounds):
        samples = [Sample(s.idx, s.key, s.status, json.loads(json.dumps(s.meta)), dict(s.arrays)) for s in before]
        per.clear()
        stage._fills.clear()
        pr = cProfile.Profile(time.process_time) if a.profile else None
        c0 = time.process_time()
        if pr:
            pr.enable()
        for s in samples:
            stage.guarded(s, stage.process)
        if pr:
            pr.disable()
        cpu = time.process_time() - c0
        if cpu < best:
            best, best_per = cpu, dict(per)
        h = hashlib.sha256()
        for s in samples:
            meta = {k: v for k, v in s.meta.items() if k != "seconds"}  # wall time of the earlier stages
            h.update(f"{s.key}|{s.status}|{json.dumps(meta, sort_keys=True, default=str)}".encode())
            for k in sorted(s.arrays):
                if k.startswith(("variant/", "mask/")):
                    h.update(k.encode() + s.arrays[k].tobytes())
        digest = h.hexdigest()[:16]
    n = len(before)
    print(f"edit.process on {n} samples ({tree}): {1000 * best / n:.2f} CPU ms/input (best of {a.rounds}); "
          + ", ".join(f"{k} {1000 * t / n:.2f}" for k, t in sorted(best_per.items(), key=lambda kv: -kv[1]))
          + f"; variants digest {digest}")
    if pr:
        pstats.Stats(pr).sort_stats(a.sort).print_stats(a.profile)


if __name__ == "__main__":
    main()
