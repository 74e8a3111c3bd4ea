"""CPU cost of verify and of the edits outside the fill (issue 27, part s27verify), per input.

Runs the floor's chain (``local_batches``, as ``bench/cpu_cost.py --stream``) on the bench's
procedural set with accumulating CPU-time timers (``time.process_time``, no profiler) around
``verify.process``, its parts (``copied_object``, ``footprint_metrics``, ``_insert_metrics``,
``_metrics``) and each edit; "edit outside the fill" is ``edit.process`` less the time inside
its fill (``ClassicalEdit._inpaint``). Issue 27, part s28verify: also ingest, localize, segment
and qa, and the reader (``read_slice``: the scenes' specs, records and questions, which the
floor's reader thread runs), with their sum ("ingest group").

Usage: python bench/verify_cost.py [N]   (default 300)
Two commits side by side: run it at the same time with each one's PYTHONPATH (this checkout's
``counterfactory`` is used only when none is on PYTHONPATH), e.g.
  PYTHONPATH=/tmp/before python bench/verify_cost.py 300 & python bench/verify_cost.py 300
"""

from __future__ import annotations

import collections
import functools
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.append(str(REPO))  # after PYTHONPATH: the commit under test comes from there
sys.path.append(str(REPO / "bench"))

import scipy.sparse.linalg  # noqa: E402, F401 - the fill imports it once per process, not per input

from counterfactory import footprint  # noqa: E402
from counterfactory.pipeline.runner import local_batches  # noqa: E402
from counterfactory.stages import edit, ingest, localize, qa, segment, verify  # noqa: E402
from tests.conftest import load_records  # noqa: E402

ACC: collections.Counter = collections.Counter()
CALLS: collections.Counter = collections.Counter()


def _timed(owner: object, name: str, label: str) -> None:
    f = getattr(owner, name)

    @functools.wraps(f)
    def g(*a, **k):
        t = time.process_time()
        try:
            return f(*a, **k)
        finally:
            ACC[label] += time.process_time() - t
            CALLS[label] += 1

    setattr(owner, name, g)


def main() -> None:
    import run as bench_run  # after the package: it puts this checkout first on sys.path

    n = int(sys.argv[1]) if len(sys.argv) > 1 else 300
    for name in ("process", "_metrics", "_insert_metrics"):
        _timed(verify.PixelVerify, name, f"verify.{name}")
    _timed(verify, "copied_object", "verify: copied_object")
    _timed(footprint, "footprint_metrics", "verify: footprint_metrics")
    for name in ("process", "_inpaint", "_remove", "_count", "_swap", "_insert", "_random_mask", "_attribute",
                 "_blackout", "_flip"):
        _timed(edit.ClassicalEdit, name, f"edit.{name}")
    for owner, label in ((ingest.Ingest, "ingest"), (localize.AnnotationLocalize, "localize"),
                         (segment.ClassicalSegment, "segment"), (qa.TemplateQA, "qa")):
        _timed(owner, "process", f"{label}.process")
    cfg = bench_run.scenes_config(n, Path(tempfile.mkdtemp(prefix="cf-verify-cost-")))
    t = time.process_time()
    records = load_records(cfg)  # the reader's part (read_slice on every slice), outside the chain's total
    ACC["reader: read_slice"] += time.process_time() - t
    CALLS["reader: read_slice"] += 1
    c0 = time.process_time()
    for _ in local_batches(cfg, records):
        pass
    total = time.process_time() - c0
    print(f"{verify.__file__}: stage code, {n} inputs: {1000 * total / n:.2f} CPU ms/input")
    for k in sorted(ACC):
        print(f"  {k:28s} {1000 * ACC[k] / n:7.3f} CPU ms/input ({CALLS[k]} calls)")
    v, outside = ACC["verify.process"], ACC["edit.process"] - ACC["edit._inpaint"]
    print(f"verify {1000 * v / n:.2f} + edit outside the fill {1000 * outside / n:.2f} = "
          f"{1000 * (v + outside) / n:.2f} CPU ms/input")
    group = sum(ACC[k] for k in ("ingest.process", "localize.process", "segment.process", "qa.process",
                                 "reader: read_slice"))
    print(f"ingest group (ingest + localize + segment + qa + reader) {1000 * group / n:.2f} CPU ms/input")


if __name__ == "__main__":
    main()
