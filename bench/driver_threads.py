"""The driver's CPU during a Ray run, per thread (issue 26): where the driver's own CPU goes.

Runs the bench's procedural-scenes config on a local Ray instance of ``--cpus`` CPUs (after a
small warm-up run), then reads every thread of this process from /proc (utime + stime): Python
threads by their name (the main thread's iterator, Ray Data's executor loop, its prefetcher),
Ray core's C++ threads by their kernel name, from the stream's start to its last shard's
entry (``runner._Stream.consume``: what grows with the inputs; the commit's close, the card and
the audit after it are left out). Prints one JSON line per thread and the totals
per input and per wall second of the stream.

Usage: python bench/driver_threads.py [--n 1000] [--cpus 2] [--shard-size 64]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TICK = os.sysconf("SC_CLK_TCK")


def threads_cpu() -> dict[int, tuple[str, float]]:
    """{tid: (kernel name, CPU seconds)} of every thread of this process."""
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            stat = Path(f"/proc/self/task/{tid}/stat").read_text()
        except OSError:
            continue
        name = stat[stat.index("(") + 1:stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2:].split()
        out[int(tid)] = (name, (int(fields[11]) + int(fields[12])) / TICK)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--shard-size", type=int, default=None)
    args = ap.parse_args()
    if args.shard_size:
        os.environ["COUNTERFACTORY_BENCH_SHARD_SIZE"] = str(args.shard_size)
    import ray

    from bench.run import scenes_config
    from counterfactory.pipeline import runner
    from counterfactory.pipeline.runner import run_pipeline

    root = Path(tempfile.mkdtemp(prefix="cf-drv-"))
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    run_pipeline(scenes_config(32, root / "warm", args.cpus), progress=False)
    names: dict[int, str] = {}
    stop = threading.Event()

    seen: dict[int, tuple[str, float]] = {}  # a thread that ends leaves /proc: its last reading

    def watch() -> None:  # Python threads come and go with each dataset: name them while alive
        while not stop.is_set():
            for t in threading.enumerate():
                if t.native_id and t is not threading.current_thread():
                    names[t.native_id] = t.name
            if "before" in snaps and "after" not in snaps:
                seen.update(threads_cpu())
            time.sleep(0.05)

    snaps: dict[str, dict[int, tuple[str, float]]] = {}
    w = threading.Thread(target=watch, daemon=True, name="watch")
    w.start()
    real = runner._Stream.consume

    def consume(self, *a, **kw):  # the stream alone: first shard asked for to last entry committed
        snaps["before"] = threads_cpu()
        try:
            return real(self, *a, **kw)
        finally:
            snaps["after"] = threads_cpu()

    runner._Stream.consume = consume
    after_stream: dict[str, float] = {}

    def timed(name, fn):  # the driver's work after the stream, on its main thread
        def wrapper(*a, **kw):
            c0 = time.thread_time()
            try:
                return fn(*a, **kw)
            finally:
                after_stream[name] = after_stream.get(name, 0.0) + time.thread_time() - c0
        return wrapper

    real_stats, real_complete = runner._ray_operator_stats, runner.DatasetCommit.on_write_complete
    runner._ray_operator_stats = timed("ray_operator_stats", real_stats)
    runner.DatasetCommit.on_write_complete = timed("on_write_complete", real_complete)
    t0 = time.perf_counter()
    res = run_pipeline(scenes_config(args.n, root / "run", args.cpus), progress=False)
    wall = time.perf_counter() - t0
    runner._Stream.consume = real
    runner._ray_operator_stats, runner.DatasetCommit.on_write_complete = real_stats, real_complete
    before, after = snaps["before"], {**seen, **snaps["after"]}
    stop.set()
    w.join()
    names[threading.main_thread().native_id] = "MainThread"
    rows: dict[str, float] = {}
    for tid, (kname, c) in after.items():
        d = c - before.get(tid, (kname, 0.0))[1]
        if tid == w.native_id or d <= 0:
            continue
        label = names.get(tid, kname)
        rows[label] = rows.get(label, 0.0) + d
    summary = json.loads((res.out_dir / "summary.json").read_text())
    stream = summary["pipeline"]["wall_seconds"]
    total = sum(rows.values())
    for label, c in sorted(rows.items(), key=lambda kv: -kv[1]):
        print(json.dumps({"thread": label, "cpu_s": round(c, 3), "ms_per_input": round(1000 * c / args.n, 3),
                          "ms_per_stream_s": round(1000 * c / stream, 1)}))
    print(json.dumps({"total_cpu_s": round(total, 3), "ms_per_input": round(1000 * total / args.n, 3),
                      "ms_per_stream_s": round(1000 * total / stream, 1), "stream_s": stream, "run_wall_s": round(wall, 2),
                      "driver_cpu_seconds": summary["pipeline"]["driver_cpu_seconds"],
                      **{f"{k}_cpu_s": round(v, 3) for k, v in after_stream.items()},
                      "samples": res.manifest["counts"]["samples"]}))


if __name__ == "__main__":
    main()
