"""The patch fill's output quality in finer figures than bench/validity.py's table (issue 27,
part fill): the same scenes and demo photos through the stage code (``validity.measure``'s run),
and per source and removal variant the mean of every footprint figure verify records (texture
ratio, flat share, color distance, boundary and seam scores), the flat-patch rate, and on the
scenes the mean and 95th percentile of |fill - object-free render| inside the mask, to three
decimals: a change of the fill's bytes is judged on these, before and after.

Usage: python bench/fill_quality.py [--scenes 100] [--no-photos]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import validity  # noqa: E402

from counterfactory import footprint, scenes  # noqa: E402
from counterfactory.pipeline.runner import local_batches  # noqa: E402
from counterfactory.sample import decode_batch  # noqa: E402
from tests.conftest import load_records  # noqa: E402

FIGURES = ("texture_ratio", "flat_share", "color_distance", "boundary_score", "seam_score")


def figures(cfg) -> dict:
    st: dict = defaultdict(lambda: defaultdict(list))
    for b in local_batches(cfg, load_records(cfg), stop_after="edit"):
        for s in decode_batch(b):
            if not s.ok:
                continue
            spec = validity._spec(s)
            src = "scene" if spec else "photo"
            img = s.arrays["image"]
            for v in s.meta["variants"]:
                if v not in ("remove", "count"):
                    continue
                out = s.arrays[f"variant/{v}"]
                region = s.arrays.get(f"mask/{v}", s.arrays["mask"])
                core = np.where(region > 0, s.arrays["mask_core"], 0).astype(np.uint8)
                m = footprint.footprint_metrics(img, out, region, core)
                d = st[(src, v)]
                d["n"].append(1)
                d["flat_patch"].append(float(m["flat_patch"]))
                for k in FIGURES:
                    if m.get(k) is not None:
                        d[k].append(float(m[k]))
                if spec and v == "remove":
                    mask = s.arrays["mask"] > 0
                    truth = scenes.render_background(spec).astype(int)
                    e = np.abs(out[mask].astype(int) - truth[mask])
                    d["err"].append(float(e.mean()))
                    d["err_p95"].append(float(np.percentile(e, 95)))
    return st


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scenes", type=int, default=100)
    ap.add_argument("--no-photos", action="store_true")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        st = figures(validity.config(a.scenes, not a.no_photos, "patch", Path(tmp)))
    cols = ["n", "flat_patch", *FIGURES, "err", "err_p95"]
    print("source | variant | " + " | ".join(cols))
    for (src, v), d in sorted(st.items()):
        cells = [str(len(d["n"]))] + [f"{np.mean(d[k]):.3f}" if d[k] else "-" for k in cols[1:]]
        print(f"{src} | {v} | " + " | ".join(cells))


if __name__ == "__main__":
    main()
