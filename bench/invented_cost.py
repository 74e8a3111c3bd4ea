"""The invented-object check old and new on the same calls (issue 27, part s27invent).

Runs the floor's chain (``local_batches``) on the bench's procedural set; every call verify makes
to ``copied_object`` is also made to an older ``stages/invented.py`` (``--old``, loaded from its
file), each timed in CPU time (``time.process_time``, one OpenCV thread as in the stages), and
their answers compared: ``invented_ncc`` as stored (4 places), the decision against verify's
``max_invented_ncc`` (0.9) and ``invented_category``. Both run in the same process on the same
inputs, so the load is the same for both.

Usage: python bench/invented_cost.py [N] --old /tmp/before-2659781/counterfactory/stages/invented.py
[--old-footprint /tmp/before-386b596/counterfactory/footprint.py]

``--old-footprint`` (issue 27, part s28verify): verify's ``footprint_metrics`` and
``insert_metrics`` calls too, each made to the older ``footprint.py`` as well, timed and compared
the same way (every figure of the returned dict).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.append(str(REPO))  # after PYTHONPATH: the commit under test comes from there
sys.path.append(str(REPO / "bench"))

import cv2  # noqa: E402
import scipy.sparse.linalg  # noqa: E402, F401 - the fill imports it once per process, not per input

from counterfactory import footprint  # noqa: E402
from counterfactory.pipeline.runner import local_batches  # noqa: E402
from counterfactory.stages import verify  # noqa: E402
from tests.conftest import load_records  # noqa: E402


def _load(path: str, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _compare_footprint(old_path: str) -> dict:
    """Patch ``footprint_metrics`` and ``insert_metrics`` (as verify calls them) to run the old
    module's function too on every call; returns the running tallies."""
    old_fp = _load(old_path, "old_footprint")
    tally: dict = {}
    for name in ("footprint_metrics", "insert_metrics"):
        new_f, old_f = getattr(footprint, name), getattr(old_fp, name)
        t = tally[name] = {"old": 0.0, "new": 0.0, "calls": 0, "differ": 0}

        def both(*a, _new=new_f, _old=old_f, _t=t, **k):
            c = time.process_time()
            b = _old(*a, **k)
            _t["old"] += time.process_time() - c
            c = time.process_time()
            r = _new(*a, **k)
            _t["new"] += time.process_time() - c
            _t["calls"] += 1
            _t["differ"] += r != b
            return r

        setattr(footprint, name, both)
    return tally


def main() -> None:
    import run as bench_run  # after the package: it puts this checkout first on sys.path

    ap = argparse.ArgumentParser()
    ap.add_argument("n", nargs="?", type=int, default=300)
    ap.add_argument("--old", required=True, help="an older counterfactory/stages/invented.py")
    ap.add_argument("--old-footprint", default=None, help="an older counterfactory/footprint.py: also compare "
                    "verify's footprint_metrics and insert_metrics calls")
    args = ap.parse_args()
    old_mod = _load(args.old, "old_invented")
    tally = _compare_footprint(args.old_footprint) if args.old_footprint else {}
    threshold = verify.PixelVerify.Params().max_invented_ncc
    new, old = verify.copied_object, old_mod.copied_object
    cpu = {"old": 0.0, "new": 0.0}
    seen = {"calls": 0, "stored": 0, "decision": 0, "category": 0, "max": 0.0, "diff": 0.0}

    def both(orig, out, region, objects, min_cover=0.5):
        cv2.setNumThreads(1)
        t = time.process_time()
        b = old(orig, out, region, objects, min_cover)
        cpu["old"] += time.process_time() - t
        t = time.process_time()
        a = new(orig, out, region, objects, min_cover)
        cpu["new"] += time.process_time() - t
        seen["calls"] += 1
        seen["stored"] += a["invented_ncc"] != b["invented_ncc"]
        seen["decision"] += (a["invented_ncc"] > threshold) != (b["invented_ncc"] > threshold)
        seen["category"] += a["invented_category"] != b["invented_category"]
        seen["max"] = max(seen["max"], a["invented_ncc"], b["invented_ncc"])
        seen["diff"] = max(seen["diff"], abs(a["invented_ncc"] - b["invented_ncc"]))
        return a

    verify.copied_object = both
    cfg = bench_run.scenes_config(args.n, Path(tempfile.mkdtemp(prefix="cf-invented-cost-")))
    for _ in local_batches(cfg, load_records(cfg)):
        pass
    n = seen["calls"]
    print(f"{args.n} inputs, {n} calls of copied_object: old {1000 * cpu['old'] / n:.3f} / new "
          f"{1000 * cpu['new'] / n:.3f} CPU ms per call ({cpu['old'] / cpu['new']:.2f}x); "
          f"per input old {1000 * cpu['old'] / args.n:.3f} / new {1000 * cpu['new'] / args.n:.3f}")
    print(f"invented_ncc stored differently: {seen['stored']} of {n} (at most {seen['diff']:.4f}); decisions "
          f"(> {threshold}) changed: {seen['decision']}; categories changed: {seen['category']}; "
          f"highest score: {seen['max']}")
    for name, t in tally.items():
        print(f"{name}: {t['calls']} calls, old {1000 * t['old'] / args.n:.3f} / new {1000 * t['new'] / args.n:.3f} CPU "
              f"ms per input ({t['old'] / t['new']:.2f}x); results that differ: {t['differ']}")


if __name__ == "__main__":
    main()
