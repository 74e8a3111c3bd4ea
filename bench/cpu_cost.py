"""CPU cost per pair of the embedded default (issue 27): the plain-loop floor, in CPU time.

On a shared or loaded machine wall time says little; this process's CPU time does (the floor
runs in one process). Prints one line per run: CPU ms per pair for the whole run, for the
stream (first input to last row) and for what runs after it (card, audit, publish), the audit's
own seconds, peak RSS and the content id (two commits that make the same bytes print the same
id). ``--profile``: the stage code alone (``local_batches`` through the part encoder) under
cProfile, top entries by own time; ``--audit DIR``: the shortcut audit of a published version
alone, in CPU seconds.

``--stream N``: the stage code and the part encoder alone (what the floor's stream runs), CPU ms
per input and a digest of the rows (same digest = same bytes), without the writer or the audit.

Usage: python bench/cpu_cost.py [--n 1000 [--sampler]] [--profile 120 [--sort cumulative]] [--stream 300]
[--audit outputs/demo/v1]
Run two commits side by side (a ``git worktree`` of the old one, each with its own PYTHONPATH)
at the same time: then both see the same load.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import json
import pstats
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import run as bench_run  # noqa: E402

from counterfactory.pipeline.runner import local_batches, run_pipeline  # noqa: E402


def floor(n: int, sampler: bool = False) -> str:
    """The whole floor run in this process. Its peak RSS is the kernel's ``ru_maxrss`` (one
    process, no children): the figures before issue 27's s27encode part ran it inside
    ``bench_run.PeakRSS``, a thread that lists every process of the machine through psutil five
    times a second, and charged that thread's CPU to the floor (``run.py``'s ``timed_run``
    subtracts it, this did not). ``sampler``: that old instrument again, its own CPU printed
    beside the floor's, so the old rows can be compared (old figure = floor + sampler)."""
    tmp = Path(tempfile.mkdtemp(prefix="cf-cpu-"))
    try:
        cfg = bench_run.scenes_config(n, tmp)
        with bench_run.PeakRSS() if sampler else contextlib.nullcontext() as mem:
            t0, c0 = time.perf_counter(), time.process_time()
            res = run_pipeline(cfg, local=True, progress=False)
            cpu, wall = time.process_time() - c0, time.perf_counter() - t0
        sampler_cpu = mem.cpu if sampler else 0.0
        cpu -= sampler_cpu
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
        summary = json.loads((res.out_dir / "summary.json").read_text())
        stream = summary["pipeline"]["wall_seconds"]
        card = json.loads((res.out_dir / "card.json").read_text())
        info = json.loads((res.out_dir / "version.json").read_text())
        s = res.manifest["counts"]["samples"]
        return (f"N={n}: {s} pairs, CPU {1000 * cpu / s:.1f} ms/pair ({s / wall:.1f} pairs/s wall); wall: stream "
                f"{stream:.1f} s, after it {wall - stream:.1f} s (audit {card['timing']['audit_seconds']} s); "
                f"peak RSS {peak / 2**20:.0f} MiB; content id {info['content_id'][:16]}"
                + (f"; the psutil sampler's own CPU {sampler_cpu:.2f} s ({1000 * sampler_cpu / s:.1f} ms/pair, "
                   f"peak RSS by it {mem.peak / 2**20:.0f} MiB), left out above" if sampler else ""))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def profile(n: int, top: int = 25, sort: str = "tottime") -> None:
    import scipy.sparse.linalg  # noqa: F401 - the fill imports it once per process, not per input

    from tests.conftest import load_records

    tmp = Path(tempfile.mkdtemp(prefix="cf-cpu-"))
    cfg = bench_run.scenes_config(n, tmp)
    records = load_records(cfg)
    # CPU time, not wall time: on a loaded machine a wall-clock profile charges other processes'
    # time to whatever call was running
    pr = cProfile.Profile(time.process_time)
    c0 = time.process_time()
    pr.enable()
    # the chain as the floor runs it: the part encoder on the samples (issue 27: the profile
    # used to pickle every raw array after verify and unpickle it for a separate encoder, a
    # round trip the floor never makes)
    for _ in local_batches(cfg, records):
        pass
    pr.disable()
    print(f"stage code + encoding, {n} inputs: {1000 * (time.process_time() - c0) / n:.1f} CPU ms/input under cProfile")
    st = pstats.Stats(pr)
    # per stage: the cumulative CPU of each stage's ``process`` and of the part encoder
    per = {f"{Path(f).parent.name}/{Path(f).stem}.{fn}": ct for (f, _, fn), (_, _, _, ct, _) in st.stats.items()
           if "counterfactory" in f and (fn == "process" and "/stages/" in f or fn == "encode_samples")}
    print("per stage, cumulative CPU ms/input: " + ", ".join(
        f"{k} {1000 * v / n:.1f}" for k, v in sorted(per.items(), key=lambda kv: -kv[1])))
    st.sort_stats(sort).print_stats(top)
    shutil.rmtree(tmp, ignore_errors=True)


def stream(n: int) -> str:
    """The stage code and the part encoder alone, as the floor's chain runs them (no cProfile, no
    writer, no audit): CPU ms per input, and a digest of every row it returns (keys, status, meta,
    encoded parts; the per-stage wall seconds left out), so two commits can be compared for the same bytes in a fraction of a run."""
    import hashlib
    import pickle

    from tests.conftest import load_records

    tmp = Path(tempfile.mkdtemp(prefix="cf-cpu-"))
    try:
        cfg = bench_run.scenes_config(n, tmp)
        records = load_records(cfg)
        digest = hashlib.sha256()
        c0 = time.process_time()
        for b in local_batches(cfg, records):
            for i in range(len(b["idx"])):
                meta = json.loads(b["meta"][i])
                meta.pop("seconds", None)  # wall time per stage: not part of the output
                digest.update(f"{b['idx'][i]}|{b['key'][i]}|{b['status'][i]}|{json.dumps(meta, sort_keys=True)}".encode())
                if len(b["blob"][i]):
                    parts = pickle.loads(b["blob"][i])["parts"]
                    for name in sorted(parts):
                        digest.update(name.encode() + bytes(parts[name]))
        cpu = time.process_time() - c0
        return f"stream alone, {n} inputs: {1000 * cpu / n:.1f} CPU ms/input; rows digest {digest.hexdigest()[:16]}"
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def audit_cost(vdir: str) -> str:
    from counterfactory import audit

    c0 = time.process_time()
    a = audit.audit_version(vdir)
    return (f"audit of {vdir}: {time.process_time() - c0:.1f} CPU s, {a['sample']['audited']} of "
            f"{a['sample']['samples']} samples, {a['cost']['images_decoded']} images decoded; probe AUC "
            + json.dumps({v: d.get("auc") for v, d in a["detectability"].items()}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--profile", type=int, default=0, help="profile the stage code on this many inputs instead")
    ap.add_argument("--stream", type=int, default=0, help="CPU and a digest of the stage code + encoder alone "
                    "on this many inputs instead")
    ap.add_argument("--sort", default="tottime", help="profile order: tottime (own time) or cumulative")
    ap.add_argument("--top", type=int, default=25, help="profile entries printed")
    ap.add_argument("--audit", default=None, help="time the audit of this published version instead")
    ap.add_argument("--sampler", action="store_true", help="the floor inside the old psutil RSS sampler "
                    "(bench/run.PeakRSS), its own CPU printed apart: compares with rows measured before s27encode")
    args = ap.parse_args()
    if args.audit:
        print(audit_cost(args.audit))
    elif args.stream:
        print(stream(args.stream))
    elif args.profile:
        profile(args.profile, args.top, args.sort)
    else:
        print(floor(args.n, args.sampler))


if __name__ == "__main__":
    main()
