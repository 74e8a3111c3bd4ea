"""What the loader's default sha256 check costs (issue 21): reading a version's shards with
``verify=True`` (each shard read into memory and hashed before its first sample) against
``verify=False`` (trusted storage), raw samples and fully decoded pairs, interleaved rounds.

    python bench/loader_verify.py [--n 192] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from counterfactory.loader import load, read_shard, resolve_shards  # noqa: E402
from counterfactory.pipeline.runner import run_pipeline  # noqa: E402
from tests.conftest import make_config  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=192)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="cf-bench-loader-"))
    cfg = make_config(tmp, [{"kind": "procedural", "count": args.n, "seed": 0, "size": [256, 256],
                             "questions_per_scene": 1}], output={"shard_size": 32})
    folder = run_pipeline(cfg, local=True, progress=False).out_dir
    shards, _ = resolve_shards(str(folder))
    total = sum(s.filesize or 0 for s in shards)
    raw: dict[bool, list[float]] = {True: [], False: []}
    full: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(args.rounds):
        for verify in (False, True):
            t0 = time.perf_counter()
            n = sum(1 for s in shards for _ in read_shard(s, verify=verify))
            raw[verify].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            m = sum(1 for _ in load(str(folder), verify=verify))
            full[verify].append(time.perf_counter() - t0)
    print(f"{len(shards)} shards, {total / 2**20:.1f} MiB, {n} samples ({m} pairs); median of {args.rounds} rounds")
    for name, d in (("raw samples (read_shard)", raw), ("decoded pairs (load, tensors)", full)):
        off, on = statistics.median(d[False]), statistics.median(d[True])
        print(f"{name}: verify=False {total / 2**20 / off:.0f} MiB/s, verify=True {total / 2**20 / on:.0f} MiB/s "
              f"-> {on / off:.2f}x time ({(on - off) / n * 1e3:.2f} ms/sample)")


if __name__ == "__main__":
    main()
