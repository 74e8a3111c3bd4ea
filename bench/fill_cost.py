"""CPU cost of the patch fill alone (issue 27, part fill): ``stages/fill.patch_fill`` replayed on
the fills that bench/cpu_cost.py's procedural inputs ask for (captured once from the stage code
in a plain loop), in CPU time, the best of ``--rounds``. ``--against TREE``: also the
``stages/fill.py`` of another checkout (a ``git worktree`` of an older commit), loaded in the
same process and run alternately with this one on the same arguments, so that both see the same
load; prints both and their ratio, and a digest of each one's fills (the same digest = the same
bytes; the hashing is inside the timed loop, the same for both).

Usage: python bench/fill_cost.py [--n 120] [--rounds 4] [--against /tmp/before]
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import cv2  # noqa: E402
import run as bench_run  # noqa: E402

from counterfactory.pipeline.runner import local_batches  # noqa: E402
from counterfactory.stages import edit as E  # noqa: E402
from tests.conftest import load_records  # noqa: E402


def capture(n: int) -> list[tuple]:
    """The arguments of every patch_fill call the edit stage makes on ``n`` procedural inputs."""
    calls: list[tuple] = []
    real = E.patch_fill

    def keep(img, hole, forbid=None, **kw):
        calls.append((img.copy(), hole.copy(), None if forbid is None else forbid.copy(), kw))
        return real(img, hole, forbid, **kw)

    E.patch_fill = keep
    try:
        cfg = bench_run.scenes_config(n, Path(tempfile.mkdtemp(prefix="cf-fill-")))
        for _ in local_batches(cfg, load_records(cfg), stop_after="edit"):
            pass
    finally:
        E.patch_fill = real
    return calls


def _module(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=120)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--against", default=None, help="another checkout whose stages/fill.py runs alternately")
    a = ap.parse_args()
    cv2.setNumThreads(1)
    calls = capture(a.n)
    fills = {"this": _module(REPO / "counterfactory/stages/fill.py", "fill_this")}
    if a.against:
        fills["against"] = _module(Path(a.against) / "counterfactory/stages/fill.py", "fill_against")
    best = dict.fromkeys(fills, float("inf"))
    digest = {}
    for _ in range(a.rounds):
        for name, mod in fills.items():
            h = hashlib.sha256()
            c0 = time.process_time()
            for img, hole, forbid, kw in calls:
                h.update(mod.patch_fill(img, hole, forbid, **kw))
            best[name] = min(best[name], 1000 * (time.process_time() - c0))
            digest[name] = h.hexdigest()[:16]
    for name, ms in best.items():
        print(f"{name}: {len(calls)} fills of {a.n} inputs, {ms / len(calls):.2f} CPU ms/fill, "
              f"{ms / a.n:.2f} CPU ms/input (best of {a.rounds}); fills digest {digest[name]}")
    if a.against:
        print(f"against / this: {best['against'] / best['this']:.2f}x")


if __name__ == "__main__":
    main()
