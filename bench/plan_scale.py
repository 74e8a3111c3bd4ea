"""Planning at scale (issue 26): ``counterfactory run CONFIG --dry-run`` over a manifest of N lines
(each one question on one of three small images), in a child process: its CPU seconds and peak
RSS. The manifest is written to a temporary folder and deleted after.

Usage: python bench/plan_scale.py N [N ...] [--full]  (--full: a run's plan with its slices)
"""

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
FULL_PLAN = ("import sys; from counterfactory.pipeline.config import load_config; "
             "from counterfactory.pipeline.inputs import plan_inputs; "
             "p = plan_inputs(load_config(sys.argv[1], []), per_slice=8); "
             "print(f'stage plan ({p.n} inputs, {len(p.slices)} slices)')")


def write_inputs(folder: Path, n: int) -> Path:
    for i in range(3):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
    objs = [{"category": "cup", "box": [1, 2, 30, 40]}]
    with open(folder / "manifest.jsonl", "w") as f:
        chunk = []
        for i in range(n):
            chunk.append(json.dumps({"image": f"img{i % 3}.png", "question": f"Is there a cup number {i}?",
                                     "objects": objs}))
            if len(chunk) == 10000:
                f.write("\n".join(chunk) + "\n")
                chunk = []
        if chunk:
            f.write("\n".join(chunk) + "\n")
    cfg = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())  # the demo's stages
    cfg.update(dataset="scale", inputs=[{"kind": "manifest", "path": "manifest.jsonl"}])
    cfg["output"]["root"] = "out"
    cfg.setdefault("limits", {})["max_inputs"] = 100_000_000
    (folder / "config.yaml").write_text(yaml.safe_dump(cfg))
    return folder / "config.yaml"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("n", type=int, nargs="+")
    ap.add_argument("--full", action="store_true", help="a run's plan (plan_inputs with its slices), not the dry run")
    args = ap.parse_args()
    for n in args.n:
        folder = Path(tempfile.mkdtemp(prefix="cf-plan-scale-"))
        try:
            cfg = write_inputs(folder, n)
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            t0 = time.perf_counter()
            cmd = ([sys.executable, "-c", FULL_PLAN, str(cfg)] if args.full else
                   [sys.executable, "-c", "from counterfactory.cli import main; main()", "run", str(cfg), "--dry-run"])
            r = subprocess.run(cmd,
                               capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
            wall = time.perf_counter() - t0
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            if r.returncode or "stage plan" not in r.stdout:
                sys.exit(r.stdout[-1000:] + r.stderr[-2000:])
            line = next((ln for ln in r.stdout.splitlines() if "stage plan" in ln), "")
            cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
            print(json.dumps({"lines": n, "cpu_s": round(cpu, 2), "wall_s": round(wall, 2),
                              "peak_rss_mib": round(after.ru_maxrss / 1024, 1), "plan": line.strip()}), flush=True)
        finally:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
